"""safe_torch_load against real torch.save files, hand-written lightning-style pickles and hostile pickles."""

from __future__ import annotations

import builtins
import collections
import contextlib
import importlib.util
import io
import os
import pickle
import pickletools
import random
import struct
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from mlsd.checkpoints.safe_pickle import InertObject, safe_torch_load
from mlsd.errors import InputFileError, UnsafePickleError

PROTOCOLS = [2, 3, 4, 5]
LAYOUTS = ["zip", "zip-nommap", "legacy"]


def _save(obj, path: Path, layout: str, protocol: int = 2) -> Path:
    torch.save(obj, path, pickle_protocol=protocol, _use_new_zipfile_serialization=layout != "legacy")
    return path


def _load(path: Path, layout: str = "zip"):
    return safe_torch_load(path, mmap=layout != "zip-nommap")


def _assert_same(expected: torch.Tensor, got: torch.Tensor) -> None:
    assert isinstance(got, torch.Tensor)
    assert got.dtype == expected.dtype
    assert got.shape == expected.shape
    assert got.stride() == expected.stride()
    assert torch.equal(got, expected)


def _weights() -> collections.OrderedDict:
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(6, 5, generator=gen)
    sd = collections.OrderedDict()
    sd["fp32"] = base
    sd["fp32.row_view"] = base[2]  # shares storage, non-zero offset
    sd["fp32.transposed"] = base.t()  # non-contiguous
    sd["fp32.strided"] = base[::2, 1::2]
    sd["fp16"] = torch.randn(4, 3, generator=gen).half()
    sd["bf16"] = torch.randn(7, generator=gen).bfloat16()
    sd["int64"] = torch.arange(-5, 5, dtype=torch.int64)
    sd["int32"] = torch.arange(3, dtype=torch.int32)
    sd["uint8"] = torch.tensor([0, 7, 255], dtype=torch.uint8)
    sd["bool"] = torch.tensor([True, False])
    sd["fp64.scalar"] = torch.tensor(3.25, dtype=torch.float64)
    sd["empty"] = torch.zeros(0, 3)
    return sd


def _check_weights(expected: collections.OrderedDict, got) -> None:
    assert isinstance(got, collections.OrderedDict)
    assert list(got) == list(expected)
    for key, tensor in expected.items():
        _assert_same(tensor, got[key])
    # Views must come back as views of one storage, as torch.load gives them.
    assert got["fp32.row_view"].untyped_storage().data_ptr() == got["fp32"].untyped_storage().data_ptr()


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_round_trip_nested_state_dict(tmp_path, layout, protocol):
    weights = _weights()
    obj = {"state_dict": weights, "global_step": 470000, "note": "x", "tags": {"a", "b"}, "raw": b"\x00\xffab"}
    loaded = _load(_save(obj, tmp_path / "model.ckpt", layout, protocol), layout)
    assert set(loaded) == set(obj)
    _check_weights(weights, loaded["state_dict"])
    assert loaded["global_step"] == 470000 and loaded["tags"] == {"a", "b"} and loaded["raw"] == b"\x00\xffab"


@pytest.mark.parametrize("layout", LAYOUTS)
def test_round_trip_flat_ordered_dict(tmp_path, layout):
    weights = _weights()
    _check_weights(weights, _load(_save(weights, tmp_path / "model.pt", layout), layout))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_round_trip_parameters_and_sizes(tmp_path, layout):
    plain = torch.nn.Parameter(torch.ones(2, 2))
    tagged = torch.nn.Parameter(torch.arange(3.0), requires_grad=False)
    tagged.origin = "ema"  # extra attribute makes torch use _rebuild_parameter_with_state
    obj = {"p": plain, "t": tagged, "size": torch.Size([3, 4]), "dtype": torch.float16}
    loaded = _load(_save(obj, tmp_path / "p.pth", layout), layout)
    assert isinstance(loaded["p"], torch.nn.Parameter) and loaded["p"].requires_grad
    _assert_same(plain.detach(), loaded["p"].detach())
    assert isinstance(loaded["t"], torch.nn.Parameter) and not loaded["t"].requires_grad
    assert loaded["t"].origin == "ema"
    assert loaded["size"] == torch.Size([3, 4]) and loaded["dtype"] is torch.float16


def test_zip_storages_are_memory_mapped(tmp_path):
    loaded = safe_torch_load(_save({"w": torch.ones(1000)}, tmp_path / "m.ckpt", "zip"))
    assert not loaded["w"].untyped_storage().resizable()  # a view into the mapped file, not a copy
    loaded["w"][0] = 5.0  # private mapping: writable, and the file is untouched
    assert safe_torch_load(tmp_path / "m.ckpt")["w"][0] == 1.0


def _rezip(src: Path, dst: Path, rename=lambda name: name, compress=zipfile.ZIP_STORED, edit=None) -> Path:
    """Copy a torch zip, renaming, recompressing, or editing entries ({name below the top folder: edit})."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", compression=compress) as zout:
        for name in zin.namelist():
            data = zin.read(name)
            inner = name.split("/", 1)[1]
            if edit and inner in edit:
                data = edit[inner](data)  # None drops the entry
            if data is not None:
                zout.writestr(rename(name), data)
    return dst


@pytest.mark.parametrize("mmap", [True, False])
def test_zip_with_other_top_folder_and_compressed_entries(tmp_path, mmap):
    weights = _weights()
    src = _save({"state_dict": weights}, tmp_path / "src.ckpt", "zip")
    renamed = _rezip(src, tmp_path / "renamed.ckpt", lambda n: "v1-5-pruned-emaonly/" + n.split("/", 1)[1])
    _check_weights(weights, safe_torch_load(renamed, mmap=mmap)["state_dict"])
    deflated = _rezip(src, tmp_path / "deflated.ckpt", compress=zipfile.ZIP_DEFLATED)
    _check_weights(weights, safe_torch_load(deflated, mmap=mmap)["state_dict"])


def test_zip_written_on_other_endianness_is_byteswapped(tmp_path):
    weights = {"f": torch.randn(5), "h": torch.randn(3).half(), "l": torch.arange(4)}
    src = _save(weights, tmp_path / "le.ckpt", "zip")
    other = "big" if sys.byteorder == "little" else "little"
    swapped = {"byteorder": lambda _: other.encode()}
    for key, name in (("f", "0"), ("h", "1"), ("l", "2")):
        size = weights[key].element_size()
        swapped[f"data/{name}"] = lambda d, s=size: b"".join(d[i : i + s][::-1] for i in range(0, len(d), s))
    swapped_path = _rezip(src, tmp_path / "be.ckpt", edit=swapped)
    with zipfile.ZipFile(swapped_path) as zf:
        assert zf.read("le/byteorder") == other.encode()
    loaded = safe_torch_load(swapped_path)
    for key, tensor in weights.items():
        _assert_same(tensor, loaded[key])


# ---------------------------------------------------------------- hand-written pickles


class _StorageRef:
    """Placeholder written as a persistent id, as torch.save does for storages (legacy ids add a view)."""

    def __init__(self, storage_type, key: str, numel: int, *legacy_view):
        self.pid = ("storage", storage_type, key, "cpu", numel, *legacy_view)


class _TorchStylePickler(pickle.Pickler):
    def persistent_id(self, obj):
        return obj.pid if isinstance(obj, _StorageRef) else None


class _RawTensor:
    """Pickles as torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...), like a real tensor."""

    def __init__(self, ref: _StorageRef, offset: int, size: tuple, stride: tuple):
        self.args = (ref, offset, size, stride, False, collections.OrderedDict())

    def __reduce__(self):
        return (torch._utils._rebuild_tensor_v2, self.args)


def _torch_pickle(obj, protocol: int = 2) -> bytes:
    buf = io.BytesIO()
    _TorchStylePickler(buf, protocol=protocol).dump(obj)
    return buf.getvalue()


def _zip_with_pickle(path: Path, pkl: bytes, storages: dict[str, bytes] | None = None) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", pkl)
        zf.writestr("archive/byteorder", sys.byteorder)
        for key, data in (storages or {}).items():
            zf.writestr(f"archive/data/{key}", data)
        zf.writestr("archive/version", "3\n")
    return path


def _write_torch_zip(path: Path, obj, storages: dict[str, bytes], protocol: int = 2) -> Path:
    return _zip_with_pickle(path, _torch_pickle(obj, protocol), storages)


def _write_legacy(path: Path, obj, storages: dict[str, tuple[int, bytes]]) -> Path:
    """The non-zip layout: magic, protocol, sys_info, main pickle, storage keys, then (numel, bytes) each."""
    sys_info = {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}}
    parts = [pickle.dumps(header, protocol=2) for header in (0x1950A86A20F9469CFC6C, 1001, sys_info)]
    parts += [_torch_pickle(obj), pickle.dumps(list(storages), protocol=2)]
    parts += [struct.pack("<q", numel) + data for numel, data in storages.values()]
    path.write_bytes(b"".join(parts))
    return path


LIGHTNING_MODULE = "pytorch_lightning.callbacks.model_checkpoint"


@contextlib.contextmanager
def _fake_lightning():
    """A ModelCheckpoint class importable only while pickles are written, like SD 1.4's training env."""
    names = ["pytorch_lightning", "pytorch_lightning.callbacks", LIGHTNING_MODULE]
    assert not any(name in sys.modules for name in names)
    modules = [types.ModuleType(name) for name in names]

    class ModelCheckpoint:
        def __init__(self):
            self.monitor, self.save_top_k, self.best_model_score = "val/loss", 3, 0.25

    ModelCheckpoint.__module__, ModelCheckpoint.__qualname__ = LIGHTNING_MODULE, "ModelCheckpoint"
    modules[2].ModelCheckpoint = ModelCheckpoint
    sys.modules.update(zip(names, modules))
    try:
        yield ModelCheckpoint
    finally:
        for name in names:
            del sys.modules[name]


def test_lightning_checkpoint_with_numpy_and_codecs(tmp_path):
    weight = torch.arange(12, dtype=torch.float32)
    ref = _StorageRef(torch.FloatStorage, "0", 12)
    sd = collections.OrderedDict(
        [("model.w", _RawTensor(ref, 0, (3, 4), (4, 1))), ("model.w_t", _RawTensor(ref, 0, (4, 3), (1, 4)))]
    )
    with _fake_lightning() as model_checkpoint:
        ckpt = {
            "epoch": 6,
            "global_step": 470000,
            "pytorch-lightning_version": "1.4.2",
            "callbacks": {model_checkpoint: {"best_model_score": np.float64(0.5), "kth": np.float32(1.5)}},
            "loop_state": model_checkpoint(),
            "dtype": np.dtype("float32"),
            "array": np.arange(4, dtype=np.int16),
            "blob": b"\x00\x01\xfeabc",
            "state_dict": sd,
        }
        path = _write_torch_zip(tmp_path / "sd-v1-4.ckpt", ckpt, {"0": weight.numpy().tobytes()})
    assert importlib.util.find_spec("pytorch_lightning") is None  # loading must not need it
    with zipfile.ZipFile(path) as zf:
        ops = {str(arg) for _op, arg, _pos in pickletools.genops(zf.read("archive/data.pkl"))}
    for needed in (f"{LIGHTNING_MODULE} ModelCheckpoint", "_codecs encode", "numpy dtype"):
        assert needed in ops
    # Spell numpy the numpy-1 way too, as SD 1.4 does (numpy.core.multiarray.scalar).
    _rezip(path, tmp_path / "np1.ckpt", edit={"data.pkl": lambda d: d.replace(b"numpy._core", b"numpy.core")})
    with zipfile.ZipFile(tmp_path / "np1.ckpt") as zf:
        assert b"numpy.core.multiarray\nscalar" in zf.read("archive/data.pkl")

    for name in ("sd-v1-4.ckpt", "np1.ckpt"):
        loaded = safe_torch_load(tmp_path / name)
        assert loaded["global_step"] == 470000 and loaded["epoch"] == 6
        _assert_same(weight.reshape(3, 4), loaded["state_dict"]["model.w"])
        _assert_same(weight.reshape(3, 4).t(), loaded["state_dict"]["model.w_t"])
        ((stand_in, state),) = loaded["callbacks"].items()
        assert issubclass(stand_in, InertObject) and stand_in.source == f"{LIGHTNING_MODULE}.ModelCheckpoint"
        assert state["best_model_score"] == 0.5 and isinstance(state["best_model_score"], np.float64)
        assert state["kth"] == 1.5 and isinstance(state["kth"], np.float32)
        assert isinstance(loaded["loop_state"], InertObject)
        assert loaded["loop_state"].state["monitor"] == "val/loss"
        assert loaded["dtype"] == np.dtype("float32")
        assert np.array_equal(loaded["array"], np.arange(4, dtype=np.int16))
        assert loaded["blob"] == b"\x00\x01\xfeabc"
        assert "pytorch_lightning" not in sys.modules


def test_view_past_end_of_storage_is_refused(tmp_path):
    ref = _StorageRef(torch.FloatStorage, "0", 4)
    path = _write_torch_zip(tmp_path / "big.ckpt", {"w": _RawTensor(ref, 0, (10**6,), (1,))}, {"0": bytes(16)})
    with pytest.raises(InputFileError):
        safe_torch_load(path)
    # Legacy storages are resizable: torch itself would grow them to fit the view.
    legacy_ref = _StorageRef(torch.FloatStorage, "0", 4, None)
    obj = {"w": _RawTensor(legacy_ref, 0, (10**9,), (1,))}
    with pytest.raises(InputFileError, match="past its storage"):
        safe_torch_load(_write_legacy(tmp_path / "big.pt", obj, {"0": (4, bytes(16))}))
    short = _write_torch_zip(tmp_path / "short.ckpt", {"w": _RawTensor(ref, 0, (4,), (1,))}, {"0": bytes(8)})
    with pytest.raises(InputFileError, match="short.ckpt"):
        safe_torch_load(short)


def test_legacy_storage_views(tmp_path):
    data = torch.arange(6, dtype=torch.float32)
    whole = _StorageRef(torch.FloatStorage, "0", 6, None)
    view = _StorageRef(torch.FloatStorage, "0", 6, ("view-0", 2, 3))  # torch < 1.0 wrote storage views
    obj = {"all": _RawTensor(whole, 0, (6,), (1,)), "mid": _RawTensor(view, 0, (3,), (1,))}
    loaded = safe_torch_load(_write_legacy(tmp_path / "views.pt", obj, {"0": (6, data.numpy().tobytes())}))
    _assert_same(data, loaded["all"])
    _assert_same(data[2:5], loaded["mid"])
    assert loaded["mid"].untyped_storage().data_ptr() == loaded["all"].untyped_storage().data_ptr() + 8


def test_legacy_sizes_are_checked_before_allocating(tmp_path):
    huge = {"w": _RawTensor(_StorageRef(torch.FloatStorage, "0", 10**12, None), 0, (1,), (1,))}
    with pytest.raises(InputFileError, match="more bytes than the file holds"):
        safe_torch_load(_write_legacy(tmp_path / "huge.pt", huge, {"0": (10**12, bytes(16))}))
    obj = {"w": _RawTensor(_StorageRef(torch.FloatStorage, "0", 4, None), 0, (4,), (1,))}
    with pytest.raises(InputFileError, match="size mismatch"):
        safe_torch_load(_write_legacy(tmp_path / "mismatch.pt", obj, {"0": (3, bytes(12))}))


class _NumpyTensor:
    """Pickles like a tensor on a storage-less device (XLA): rebuilt from a numpy copy."""

    def __init__(self, array: np.ndarray):
        self.array = array

    def __reduce__(self):
        return (torch._utils._rebuild_device_tensor_from_numpy, (self.array, torch.float16, "xla:0", False))


def test_device_tensor_from_numpy_lands_on_cpu(tmp_path):
    array = np.linspace(0, 1, 5, dtype=np.float32)
    loaded = safe_torch_load(_write_torch_zip(tmp_path / "xla.pt", {"w": _NumpyTensor(array)}, {}))
    _assert_same(torch.from_numpy(array).half(), loaded["w"])
    bad = {"w": torch.nn.Parameter(torch.ones(2))}
    bad["w"]._backward_hooks_extra = "x"  # private attributes are refused on rebuilt parameters
    with pytest.raises(InputFileError, match="_backward_hooks_extra"):
        safe_torch_load(_save(bad, tmp_path / "p.pt", "zip"))


# ---------------------------------------------------------------- hostile pickles


class _Payload:
    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return (self.func, self.args)


def _payloads(marker: Path) -> dict[str, _Payload]:
    cmd = f"touch {marker}"
    return {
        f"{os.system.__module__}.system": _Payload(os.system, cmd),  # posix.system on Linux and macOS
        "builtins.eval": _Payload(builtins.eval, f"__import__('os').system({cmd!r})"),
        "builtins.exec": _Payload(builtins.exec, f"import os; os.system({cmd!r})"),
        "builtins.getattr": _Payload(builtins.getattr, "text", "upper"),
        "subprocess.Popen": _Payload(subprocess.Popen, ["touch", str(marker)]),
    }


def _hostile(payload) -> dict:
    return {"state_dict": {"model.w": [0.5, 1.5], "nested": {"evil": payload}}, "global_step": 1}


def test_payloads_are_live(tmp_path):
    """Control: plain pickle really runs the payload, so the refusals below mean something."""
    marker = tmp_path / "MARKER"
    pickle.loads(pickle.dumps(_hostile(_payloads(marker)["posix.system" if os.name == "posix" else "nt.system"])))
    assert marker.exists()


@pytest.mark.parametrize("container", ["pickle", "zip"])
@pytest.mark.parametrize("protocol", range(6))
@pytest.mark.parametrize("global_name", list(_payloads(Path("MARKER"))))
def test_hostile_global_is_refused_before_running(tmp_path, container, protocol, global_name):
    marker = tmp_path / "MARKER"
    obj = _hostile(_payloads(marker)[global_name])
    path = tmp_path / "evil.ckpt"
    if container == "pickle":
        path.write_bytes(pickle.dumps(obj, protocol=protocol))
    else:
        _write_torch_zip(path, obj, {}, protocol=protocol)
    with pytest.raises(UnsafePickleError) as caught:
        safe_torch_load(path)
    message = str(caught.value)
    assert global_name in message and str(path) in message and ".safetensors" in message
    assert not marker.exists()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_hostile_global_after_real_tensors_is_refused(tmp_path, layout):
    marker = tmp_path / "MARKER"
    obj = {"state_dict": {"w": torch.ones(3), "evil": _payloads(marker)["subprocess.Popen"]}}
    with pytest.raises(UnsafePickleError, match="subprocess.Popen"):
        _load(_save(obj, tmp_path / "evil.pt", layout), layout)
    assert not marker.exists()


@pytest.mark.parametrize(
    "global_name",
    [
        "os.system",
        "nt.system",
        "builtins.__import__",
        "functools.partial",
        "torch.load",
        "torch.storage._load_from_bytes",
        "torch._utils._rebuild_from_type_v2",
        "numpy.load",
        "collections.namedtuple",
        "never_imported_mlsd_module.run",
    ],
)
def test_near_miss_globals_are_refused_without_import(tmp_path, global_name):
    module, name = global_name.rsplit(".", 1)
    path = tmp_path / "evil.pkl"
    path.write_bytes(b"\x80\x02c" + f"{module}\n{name}\n".encode() + b"X\x01\x00\x00\x00x\x85R.")
    with pytest.raises(UnsafePickleError, match=global_name.replace(".", r"\.")):
        safe_torch_load(path)
    assert "never_imported_mlsd_module" not in sys.modules


@pytest.mark.parametrize(
    "pkl",
    [
        # BUILD with slot state: setattr(_rebuild_tensor_v2, "__defaults__", (1,)) would outlive this load.
        b"ctorch._utils\n_rebuild_tensor_v2\n(N(S'__defaults__'\n(I1\ntdtb.",
        # BUILD with dict state: rewrite the dtype that FloatStorage maps to, for every later load.
        b"ctorch\nFloatStorage\n(S'dtype'\nctorch\nint8\ndb.",
        b"ctorch\nfloat16\n(S'itemsize'\nI1\ndb.",
    ],
)
def test_allowed_globals_cannot_be_modified(tmp_path, pkl):
    with pytest.raises(InputFileError):
        safe_torch_load(_zip_with_pickle(tmp_path / "tamper.ckpt", pkl))
    weights = _weights()
    _check_weights(weights, safe_torch_load(_save(weights, tmp_path / "after.ckpt", "zip")))


@pytest.mark.parametrize(
    "module, name, base",
    [(LIGHTNING_MODULE, "ModelCheckpoint", InertObject), ("torch.nn.modules.container", "ParameterDict", None)],
)
def test_named_classes_are_fresh_per_load_and_not_modifiable(tmp_path, module, name, base):
    base = base or torch.nn.ParameterDict
    original = base.__dict__.get("__setstate__")
    named = f"c{module}\n{name}\n.".encode()
    first = safe_torch_load(_zip_with_pickle(tmp_path / "a.ckpt", named))
    second = safe_torch_load(_zip_with_pickle(tmp_path / "b.ckpt", named))
    assert issubclass(first, base) and issubclass(second, base) and first is not second
    tamper = f"c{module}\n{name}\n(N(S'__setstate__'\nc__builtin__\nset\ndtb.".encode()
    with pytest.raises(InputFileError):
        safe_torch_load(_zip_with_pickle(tmp_path / "c.ckpt", tamper))
    assert base.__dict__.get("__setstate__") is original


def test_codecs_encode_only_decodes_latin1(tmp_path):
    path = tmp_path / "codec.pkl"
    path.write_bytes(b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00xX\x04\x00\x00\x00rot13\x86R.")
    with pytest.raises(InputFileError):
        safe_torch_load(path)


# ---------------------------------------------------------------- corrupt inputs


def test_truncated_zip(tmp_path):
    data = _save({"w": torch.randn(300)}, tmp_path / "full.ckpt", "zip").read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputFileError, match="cut.ckpt"):
        safe_torch_load(tmp_path / "cut.ckpt")


@pytest.mark.parametrize("cut", [0.3, 0.9, 0.995])
def test_truncated_legacy(tmp_path, cut):
    data = _save({"w": torch.randn(300)}, tmp_path / "full.pt", "legacy").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: int(len(data) * cut)])
    with pytest.raises(InputFileError):
        safe_torch_load(tmp_path / "cut.pt")


def test_random_bytes(tmp_path):
    (tmp_path / "noise.ckpt").write_bytes(random.Random(1234).randbytes(4096))
    with pytest.raises(InputFileError):
        safe_torch_load(tmp_path / "noise.ckpt")


def test_zip_without_data_pkl(tmp_path):
    with zipfile.ZipFile(tmp_path / "nodata.ckpt", "w") as zf:
        zf.writestr("archive/version", "3\n")
    with pytest.raises(InputFileError, match="data.pkl"):
        safe_torch_load(tmp_path / "nodata.ckpt")


def test_zip_missing_storage_record(tmp_path):
    src = _save({"w": torch.ones(4)}, tmp_path / "src.ckpt", "zip")
    broken = _rezip(src, tmp_path / "broken.ckpt", edit={"data/0": lambda _: None})
    with pytest.raises(InputFileError):
        safe_torch_load(broken)


def test_plain_pickle_is_not_a_checkpoint(tmp_path):
    (tmp_path / "plain.pt").write_bytes(pickle.dumps({"a": 1}, protocol=2))
    with pytest.raises(InputFileError, match="not a PyTorch checkpoint"):
        safe_torch_load(tmp_path / "plain.pt")


def test_missing_empty_and_directory(tmp_path):
    (tmp_path / "empty.ckpt").write_bytes(b"")
    for path in (tmp_path / "missing.ckpt", tmp_path / "empty.ckpt", tmp_path):
        with pytest.raises(InputFileError):
            safe_torch_load(path)
