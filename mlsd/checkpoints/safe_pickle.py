"""Load PyTorch pickle checkpoints (.ckpt/.pt/.pth/.bin) without running anything from them.

A pickle is a program: every global it names is imported and may be called. Here every global goes
through ``RestrictedUnpickler.find_class``, which hands out only immutable values and small wrappers that
check their arguments, and refuses everything else before it is imported. Both torch layouts are parsed
here rather than by ``torch.load``, so no other unpickler ever sees the file: the zip layout of
``torch.save`` (storages memory-mapped) and the legacy layout (a row of pickles, then raw storage bytes).
"""

from __future__ import annotations

import _compat_pickle
import builtins
import collections
import io
import os
import pickle
import struct
import sys
import zipfile
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from mlsd.errors import InputFileError, MlsdError, UnsafePickleError

try:
    from numpy._core import multiarray as _np_multiarray
except ImportError:  # numpy < 2
    from numpy.core import multiarray as _np_multiarray

__all__ = ["InertObject", "RestrictedUnpickler", "safe_torch_load"]

UNSAFE_FIX = "convert the file to .safetensors with a trusted tool, or get a .safetensors version of this model"
CORRUPT_FIX = "download the file again (it may be truncated or damaged), or get a .safetensors version of this model"
_LEGACY_MAGIC, _LEGACY_PROTOCOL = 0x1950A86A20F9469CFC6C, 1001
# Training bookkeeping (callbacks, loop state) pickled by Lightning; never weights.
_INERT_ROOTS = {"pytorch_lightning", "lightning", "lightning_fabric"}
# Spelled out: reading torch.FloatStorage.dtype warns that TypedStorage is deprecated.
_STORAGE_DTYPES = {
    "Double": torch.float64, "Float": torch.float32, "Half": torch.float16, "BFloat16": torch.bfloat16,
    "Long": torch.int64, "Int": torch.int32, "Short": torch.int16, "Char": torch.int8, "Byte": torch.uint8,
    "Bool": torch.bool, "ComplexFloat": torch.complex64, "ComplexDouble": torch.complex128,
}  # fmt: skip


class InertObject:
    """Stand-in for a pytorch_lightning object: keeps whatever the pickle gives it as plain data."""

    source = "?"  # the `module.name` it stands in for

    def __init__(self, *args: Any, **kwargs: Any):
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state: Any) -> None:
        self.state = state  # stored, not setattr-ed: pickle-chosen keys stay out of the attributes

    def __repr__(self) -> str:
        return f"<inert stand-in for {self.source}>"


class _Frozen:
    """Read-only, slotted, no ``__setstate__``. A pickle can BUILD (setattr, ``__dict__`` update,
    ``__setstate__``) on any global it names; on a mutable global the change would outlive the load.
    (A frozen dataclass is not enough: with slots it gains a ``__setstate__`` that rewrites its fields.)"""

    __slots__ = ("value",)

    def __init__(self, value):
        object.__setattr__(self, "value", value)

    def __setattr__(self, name, value):
        raise pickle.UnpicklingError(f"a pickle may not set {name!r} on an allowed global")


class _StorageType(_Frozen):
    """What a storage class name resolves to: only its dtype (``value``) matters; it cannot be called."""

    __slots__ = ()


class _Sealed(_Frozen):
    """Call-only handle on an allowed function (a bare function has writable ``__defaults__``)."""

    __slots__ = ()

    def __call__(self, *args):
        return self.value(*args)


def _require(ok: bool, what: str) -> None:
    if not ok:
        raise pickle.UnpicklingError(what)


def _rebuild_tensor(storage, storage_offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    _require(isinstance(storage, torch.storage.TypedStorage), "tensor data is not a storage")
    # torch would grow a resizable (legacy-layout) storage to fit the view: a size-driven allocation bomb.
    if all(n > 0 for n in size):
        last = storage_offset + sum((n - 1) * step for n, step in zip(size, stride, strict=True))
        _require((last + 1) * storage.dtype.itemsize <= storage._nbytes(), "tensor reaches past its storage")
    # Hooks are callables; weights never need them, so they are dropped rather than attached.
    return torch._utils._rebuild_tensor_v2(
        storage, storage_offset, size, stride, requires_grad, collections.OrderedDict(), metadata
    )


def _rebuild_parameter(data, requires_grad, hooks, state=None):
    _require(isinstance(data, torch.Tensor), "parameter data is not a tensor")
    param = torch.nn.Parameter(data, requires_grad)
    dict_state, slots_state = state if isinstance(state, tuple) else (state, None)
    for key, value in {**(dict_state or {}), **(slots_state or {})}.items():
        # Public attributes are data; private and dunder ones hold hooks or the class itself.
        _require(isinstance(key, str) and not key.startswith("_"), f"parameter attribute {key!r} refused")
        setattr(param, key, value)
    return param


def _rebuild_device_tensor_from_numpy(data, dtype, device, requires_grad):
    ok = isinstance(data, np.ndarray) and not data.dtype.hasobject and isinstance(dtype, torch.dtype)
    _require(ok, "tensor from numpy needs a numeric array and a torch dtype")
    return torch.from_numpy(data).to(dtype=dtype).requires_grad_(bool(requires_grad))  # CPU: caller moves it


def _latin1_encode(text, encoding="utf-8"):
    # Protocol-2 pickles spell bytes as _codecs.encode(str, "latin1"); another codec means a codec lookup.
    _require(isinstance(text, str) and encoding in ("latin1", "latin-1"), f"_codecs.encode(..., {encoding!r})")
    return text.encode("latin1")


def _np_scalar(dtype, data):
    _require(isinstance(dtype, np.dtype) and not dtype.hasobject and isinstance(data, bytes), "bad numpy scalar")
    return _np_multiarray.scalar(dtype, data)


def _np_dtype(spec, align=False, copy=False):
    _require(isinstance(spec, str), "numpy dtype needs a string spec")  # numpy probes other objects' attributes
    return np.dtype(spec, align, copy)


def _np_reconstruct(subtype, shape, dtype):
    _require(subtype is np.ndarray, "numpy arrays can only be plain ndarrays")
    return _np_multiarray._reconstruct(subtype, shape, dtype)


def _allowed_globals() -> dict[tuple[str, str], Any]:
    """Everything handed out is immutable: C types and values, sealed functions, slotted markers."""
    functions = {
        ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
        ("torch._utils", "_rebuild_device_tensor_from_numpy"): _rebuild_device_tensor_from_numpy,
        ("_codecs", "encode"): _latin1_encode,
        ("numpy", "dtype"): _np_dtype,
    }
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        functions[(module, "scalar")], functions[(module, "_reconstruct")] = _np_scalar, _np_reconstruct
    allowed: dict[tuple[str, str], Any] = {key: _Sealed(fn) for key, fn in functions.items()}
    allowed.update({
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch", "Size"): torch.Size,
        ("torch", "device"): torch.device,
        ("torch", "UntypedStorage"): _StorageType(torch.uint8),
        ("torch.storage", "UntypedStorage"): _StorageType(torch.uint8),
        ("numpy", "ndarray"): np.ndarray,
    })  # fmt: skip
    allowed.update({("torch", f"{kind}Storage"): _StorageType(dt) for kind, dt in _STORAGE_DTYPES.items()})
    allowed.update({("torch", name): v for name, v in vars(torch).items() if isinstance(v, torch.dtype)})
    for name in ("set", "frozenset", "bytes", "bytearray", "complex", "slice"):
        allowed[("builtins", name)] = getattr(builtins, name)
    return allowed


_ALLOWED = _allowed_globals()
# Python classes a pickle may name. Each load gets its own subclass, so nothing done to it outlives the load.
_SUBCLASSED = {("torch.nn.modules.container", "ParameterDict"): torch.nn.ParameterDict}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler whose globals come only from the allow-list.

    ``make_storage(key, dtype, nbytes)`` supplies the untyped storage behind each persistent id; without
    it the pickle may not reference storages at all.
    """

    def __init__(self, file: IO[bytes], path: Path, make_storage=None):
        super().__init__(file, encoding="utf-8")
        self.path, self.make_storage = path, make_storage
        self.storages: dict[str, torch.storage.TypedStorage] = {}
        self._classes: dict[tuple[str, str], type] = {}

    def find_class(self, module: str, name: str) -> Any:
        # Protocols 0-2 spell Python 3 names the Python 2 way (__builtin__.eval); judge the real name.
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        else:
            module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if (found := _ALLOWED.get((module, name))) is not None:
            return found
        base = InertObject if module.split(".", 1)[0] in _INERT_ROOTS else _SUBCLASSED.get((module, name))
        if base is not None:
            if (module, name) not in self._classes:
                self._classes[(module, name)] = type(name, (base,), {"source": f"{module}.{name}"})
            return self._classes[(module, name)]
        raise UnsafePickleError(
            f"Refused to load {self.path.name}: its pickle asks for the global '{module}.{name}', which is not "
            "on the allow-list and could run code. Nothing from the file was executed.",
            where=self.path,
            fix=UNSAFE_FIX,
        )

    def persistent_load(self, pid: Any) -> Any:
        # zip layout: ('storage', type, key, location, numel); legacy adds (view_key, offset, size) or None.
        ok = self.make_storage is not None and isinstance(pid, tuple) and len(pid) in (5, 6)
        _require(ok and pid[0] in ("storage", b"storage"), f"unexpected persistent id {pid!r:.100}")
        _tag, storage_type, key, _location, numel = pid[:5]
        ok = isinstance(storage_type, _StorageType) and isinstance(key, str) and isinstance(numel, int)
        _require(ok and numel >= 0, f"malformed storage reference {pid!r:.100}")
        dtype = storage_type.value
        if (typed := self.storages.get(key)) is None:
            untyped = self.make_storage(key, dtype, numel * dtype.itemsize)
            typed = self.storages[key] = torch.storage.TypedStorage(wrap_storage=untyped, dtype=dtype, _internal=True)
        untyped = typed._untyped_storage
        if len(pid) == 6 and pid[5] is not None:
            _view_key, offset, size = pid[5]
            start, stop = offset * dtype.itemsize, (offset + size) * dtype.itemsize
            _require(0 <= start <= stop <= untyped.nbytes(), "storage view out of bounds")
            untyped = untyped[start:stop]
        elif typed.dtype == dtype:
            return typed
        return torch.storage.TypedStorage(wrap_storage=untyped, dtype=dtype, _internal=True)


def _read_into(stream: IO[bytes], storage: torch.UntypedStorage) -> None:
    buffer = memoryview(torch.empty(0, dtype=torch.uint8).set_(storage).numpy())
    filled = 0
    while filled < len(buffer):
        count = stream.readinto(buffer[filled:])
        _require(bool(count), f"storage data ends early ({filled} of {len(buffer)} bytes)")
        filled += count


def _load_zip(path: Path, use_mmap: bool) -> Any:
    with zipfile.ZipFile(path) as archive, open(path, "rb") as raw:
        names = archive.namelist()
        pickles = [name for name in names if name.count("/") == 1 and name.endswith("/data.pkl")]
        if len(pickles) != 1:
            what = f"{path.name} is a zip but not a PyTorch checkpoint (no single '<folder>/data.pkl')"
            raise InputFileError(what, where=path, fix=CORRUPT_FIX)
        prefix = pickles[0].removesuffix("data.pkl")
        byteorder = archive.read(prefix + "byteorder").decode() if prefix + "byteorder" in names else "little"
        file_size = os.path.getsize(path)
        # MAP_PRIVATE map of the whole file: tensors are copy-on-write views, pages load on first touch.
        whole = torch.UntypedStorage.from_file(os.fspath(path), False, file_size) if use_mmap else None

        def make_storage(key: str, dtype: torch.dtype, nbytes: int) -> torch.UntypedStorage:
            info = archive.getinfo(f"{prefix}data/{key}")
            _require(info.file_size >= nbytes, f"storage {key} holds {info.file_size} bytes, needs {nbytes}")
            if whole is not None and info.compress_type == zipfile.ZIP_STORED:
                raw.seek(info.header_offset)  # the local header's extra field may differ from the central one
                header = raw.read(30)
                _require(len(header) == 30 and header[:4] == b"PK\x03\x04", f"bad zip header for storage {key}")
                start = info.header_offset + 30 + sum(struct.unpack("<HH", header[26:30]))
                _require(start + nbytes <= file_size, f"storage {key} runs past the end of the file")
                storage = whole[start : start + nbytes]
            else:
                storage = torch.UntypedStorage(nbytes)
                with archive.open(info) as stream:
                    _read_into(stream, storage)
            if byteorder != sys.byteorder:
                storage.byteswap(dtype)
            return storage

        return RestrictedUnpickler(io.BytesIO(archive.read(pickles[0])), path, make_storage).load()


def _load_legacy(path: Path) -> Any:
    budget = [os.path.getsize(path)]  # never allocate more than the file could ever fill

    def make_storage(key: str, dtype: torch.dtype, nbytes: int) -> torch.UntypedStorage:
        budget[0] -= nbytes
        _require(budget[0] >= 0, f"storages claim more bytes than the file holds (at {key!r})")
        return torch.UntypedStorage(nbytes)

    with open(path, "rb") as f:
        # A fresh unpickler per pickle, as torch does: memos must not carry over between the pickles.
        if RestrictedUnpickler(f, path).load() != _LEGACY_MAGIC:
            what = f"{path.name} is a pickle but not a PyTorch checkpoint (no torch magic number)"
            raise InputFileError(what, where=path, fix=CORRUPT_FIX)
        _require(RestrictedUnpickler(f, path).load() == _LEGACY_PROTOCOL, "unknown legacy protocol version")
        RestrictedUnpickler(f, path).load()  # sys_info; legacy storage bytes are always little-endian
        main = RestrictedUnpickler(f, path, make_storage)
        result = main.load()
        keys = RestrictedUnpickler(f, path).load()
        _require(isinstance(keys, list), "storage key list missing")
        for key in keys:
            _require(key in main.storages, f"storage {key!r} is listed but never used")
            untyped, itemsize = main.storages[key]._untyped_storage, main.storages[key].dtype.itemsize
            header = f.read(8)
            _require(len(header) == 8, "storage data ends early")
            _require(struct.unpack("<q", header)[0] * itemsize == untyped.nbytes(), f"storage {key!r} size mismatch")
            _read_into(f, untyped)
    return result


def safe_torch_load(path: str | os.PathLike, *, mmap: bool = True) -> Any:
    """Unpickle a PyTorch checkpoint through an allow-list; tensors come back on CPU.

    Raises UnsafePickleError for any global outside the allow-list (before it is imported or called)
    and InputFileError for missing, truncated or corrupt files. ``mmap=False`` reads zip storages into
    memory instead of mapping the file.
    """
    path = Path(path)
    if not path.is_file():
        raise InputFileError(f"Checkpoint {path.name} does not exist or is not a file", where=path, fix="check the path")
    try:
        with open(path, "rb") as f:
            head = f.read(512)
        if not head:
            raise InputFileError(f"Checkpoint {path.name} is empty", where=path, fix=CORRUPT_FIX)
        if head.startswith(b"PK\x03\x04"):
            return _load_zip(path, mmap)
        if head[257:262] == b"ustar":
            raise InputFileError(f"{path.name} uses PyTorch's pre-1.0 tar layout", where=path, fix=UNSAFE_FIX)
        return _load_legacy(path)
    except MlsdError:
        raise
    except Exception as exc:  # zipfile, pickle, struct and torch each report damage their own way
        what = f"Cannot read checkpoint {path.name}: it is truncated, corrupt or not a PyTorch file"
        raise InputFileError(f"{what} ({type(exc).__name__}: {exc})", where=path, fix=CORRUPT_FIX) from exc
