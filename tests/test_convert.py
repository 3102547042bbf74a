"""`mlsd convert`: bundle layout, Apple's I/O contract read from the saved specs, manifest, reuse, safety."""

from __future__ import annotations

import json
import pickle

import pytest

from converters.coreml.bundle import read_manifest
from converters.coreml.convert import ConvertOptions, convert_checkpoint, default_bundle_path
from converters.coreml.export import model_spec
from mlsd.errors import UnsafePickleError, UsageError

TEXT, UNET, DEC, ENC = "text_encoder", "unet", "vae_decoder", "vae_encoder"


def _io(package):
    spec = model_spec(package)
    kinds = {0: "unknown", 65568: "float32", 65552: "float16", 131104: "int32"}

    def feats(items):
        return {f.name: (list(f.type.multiArrayType.shape), kinds.get(f.type.multiArrayType.dataType))
                for f in items}

    return feats(spec.description.input), feats(spec.description.output)


@pytest.fixture(scope="module")
def sd1_bundle(tiny_bundles):
    return tiny_bundles("sd1-2chunks", chunks=2)


def test_bundle_layout_and_manifest(sd1_bundle):
    names = sorted(p.name for p in sd1_bundle.iterdir())
    assert names == ["TextEncoder.mlpackage", "UnetChunk1.mlpackage", "UnetChunk2.mlpackage",
                     "VAEDecoder.mlpackage", "VAEEncoder.mlpackage", "merges.txt", "mlsd.json", "vocab.json"]
    m = read_manifest(sd1_bundle)
    assert m["family"] == "sd1" and m["prediction_type"] == "epsilon"
    assert len(m["source"]["a1111_hash"]) == 10 and len(m["source"]["sha256"]) == 64
    assert set(m["components"]) == {TEXT, UNET, DEC, ENC}
    assert all(c["seconds"] > 0 for c in m["components"].values())
    plan = m["components"][UNET]["sizes"][0]["chunks"]
    assert plan["n"] == 2 and len(plan["crossing"]) == 1 and abs(sum(plan["fractions"]) - 1) < 1e-9
    assert m["tools"]["coremltools"] and m["options"]["attention"] == "split_einsum"
    assert not list(sd1_bundle.parent.glob(".*partial*")), "no temporary folder left behind"


def test_text_encoder_and_vae_follow_apples_contract(sd1_bundle):
    assert _io(sd1_bundle / "TextEncoder.mlpackage") == (
        {"input_ids": ([1, 77], "float32")},
        {"last_hidden_state": ([1, 77, 64], "float32"), "pooled_outputs": ([1, 64], "float32")})
    assert _io(sd1_bundle / "VAEDecoder.mlpackage") == ({"z": ([1, 4, 8, 8], "float32")},
                                                         {"image": ([1, 3, 64, 64], "float32")})
    assert _io(sd1_bundle / "VAEEncoder.mlpackage") == ({"x": ([1, 3, 64, 64], "float32")},
                                                         {"latent": ([1, 8, 8, 8], "float32")})


def test_unet_chunks_chain_by_tensor_name(sd1_bundle):
    ins1, outs1 = _io(sd1_bundle / "UnetChunk1.mlpackage")
    ins2, outs2 = _io(sd1_bundle / "UnetChunk2.mlpackage")
    assert ins1["sample"] == ([2, 4, 8, 8], "float16")
    assert ins1["timestep"] == ([2], "float16")
    assert ins1["encoder_hidden_states"] == ([2, 64, 1, 77], "float16")
    assert list(outs2) == ["noise_pred"] and outs2["noise_pred"] == ([2, 4, 8, 8], "float32")
    crossing = set(outs1)
    assert crossing and crossing <= set(ins2), "chunk 2 takes every tensor chunk 1 hands over"
    assert set(ins2) - crossing <= {"sample", "timestep", "encoder_hidden_states"}
    assert all(dtype == "float32" for _, dtype in outs1.values()), "boundaries are fp32 (Apple's contract)"


def test_rerun_reuses_unchanged_components_and_replaces_atomically(tiny_checkpoints, sd1_bundle, tmp_path):
    import shutil

    path, _ = tiny_checkpoints("sd1")
    target = tmp_path / "bundle"
    shutil.copytree(sd1_bundle, target)
    stages = []
    opts = ConvertOptions(sizes=[(64, 64)], chunks=2, components=(TEXT, DEC, ENC, UNET))
    convert_checkpoint(path, target, options=opts, on_stage=lambda c, s, t: stages.append((c, s)))
    assert {s for _, s in stages} == {"reused"}
    stages.clear()
    opts = ConvertOptions(sizes=[(64, 64)], chunks=2, clip_skip=2, components=(TEXT,))
    convert_checkpoint(path, target, options=opts, on_stage=lambda c, s, t: stages.append((c, s)))
    assert (TEXT, "done") in stages and (UNET, "reused") in stages
    m = read_manifest(target)
    assert m["clip_skip"] == 2 and set(m["components"]) == {TEXT, UNET, DEC, ENC}


def test_interrupted_conversion_leaves_the_old_bundle_untouched(tiny_checkpoints, sd1_bundle, tmp_path):
    import shutil

    path, _ = tiny_checkpoints("sd1")
    target = tmp_path / "bundle"
    shutil.copytree(sd1_bundle, target)
    before = (target / "mlsd.json").read_bytes()

    def boom(component, status, seconds):
        if component == TEXT and status == "start":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        convert_checkpoint(path, target, options=ConvertOptions(sizes=[(64, 64)], clip_skip=3, components=(TEXT,)),
                           on_stage=boom)
    assert (target / "mlsd.json").read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no partial folder remains"


def test_malicious_pickle_is_refused_before_anything_is_written(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            import os

            return os.system, (f"touch {marker}",)

    ckpt = tmp_path / "evil.ckpt"
    ckpt.write_bytes(pickle.dumps({"state_dict": {"x": Evil()}}, protocol=2))
    out = tmp_path / "out"
    with pytest.raises(UnsafePickleError, match="system"):
        convert_checkpoint(ckpt, out, options=ConvertOptions(sizes=[(64, 64)]))
    assert not marker.exists() and not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["evil.ckpt"] or set(p.name for p in tmp_path.iterdir()) == {
        "evil.ckpt"}


@pytest.mark.parametrize("kw,where", [
    ({"chunks": 0}, "--chunks"), ({"quantize_bits": 5}, "--quantize-bits"), ({"attention": "flash"}, "--attention"),
    ({"sizes": [(500, 512)]}, "--sizes"), ({"sizes": [(512, 512), (512, 768)]}, "--sizes"),
    ({"components": ("unet", "safety_checker")}, "--components"), ({"min_target": "macOS9"}, "--min-target"),
    ({"resources": True}, "--resources"),
])
def test_bad_options_are_refused_with_the_option_named(kw, where):
    with pytest.raises(UsageError) as e:
        ConvertOptions(**kw).validate()
    assert where in str(e.value)


def test_default_bundle_name(tmp_path):
    opts = ConvertOptions(sizes=[(512, 768)], quantize_bits=6)
    path = default_bundle_path(tmp_path, tmp_path / "v1-5.safetensors", [tmp_path / "style.safetensors"], opts)
    assert path == tmp_path / "Core-ML" / "v1-5-style-split_einsum-512x768-q6"


def test_inpainting_and_sd2_unets_convert(tiny_bundles):
    inpaint = tiny_bundles("inpaint", inpainting=True, chunks=1, components=(UNET,))
    ins, outs = _io(inpaint / "Unet.mlpackage")
    assert ins["sample"][0] == [2, 9, 8, 8] and outs["noise_pred"][0] == [2, 4, 8, 8]
    sd2 = tiny_bundles("sd2", family="sd2", chunks=1, components=(TEXT, UNET))
    ins, _ = _io(sd2 / "Unet.mlpackage")
    assert ins["encoder_hidden_states"][0] == [2, 128, 1, 77]
    assert _io(sd2 / "TextEncoder.mlpackage")[1]["last_hidden_state"][0] == [1, 77, 128]
    m = json.loads((sd2 / "mlsd.json").read_text())
    assert m["family"] == "sd2" and m["prediction_type"] == "v_prediction"


def test_quantized_three_chunk_unet_is_smaller_and_balanced(tiny_bundles, sd1_bundle):
    q = tiny_bundles("q6-3chunks", chunks=3, quantize_bits=6, components=(UNET,))
    m = read_manifest(q)["components"][UNET]
    plan = m["sizes"][0]["chunks"]
    assert plan["n"] == 3 and [f"UnetChunk{i}.mlpackage" for i in (1, 2, 3)] == m["files"]
    fp16 = sum(read_manifest(sd1_bundle)["components"][UNET]["bytes"].values())
    q6 = sum(m["bytes"].values())
    assert q6 < 0.6 * fp16, (q6, fp16)
