"""What one Core ML package's spec says, without loading its weights: inputs and outputs (name -> shape,
dtype), op types, softmax axes and deployment target; read from the protobuf spec of an .mlpackage, or from
the metadata.json and model.mil text of a compiled .mlmodelc (which Core ML alone can load, on macOS)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from mlsd.errors import InputFileError

_SPEC_TARGETS = {7: "macOS13/iOS16", 8: "macOS14/iOS17", 9: "macOS15/iOS18"}
_DTYPES = {65568: "fp32", 65552: "fp16", 131104: "int32", "Float32": "fp32", "Float16": "fp16", "Int32": "int32"}


@dataclass(frozen=True)
class PackageInfo:
    """What the spec of one package says: I/O (name -> (shape, dtype)), op types, softmax axes, target."""

    path: Path
    inputs: dict[str, tuple[tuple[int, ...], str]]
    outputs: dict[str, tuple[tuple[int, ...], str]]
    op_types: frozenset[str]
    softmax_axes: frozenset[int]
    target: str | None

    @property
    def compiled(self) -> bool:
        return self.path.suffix == ".mlmodelc"


def read_package(path: Path) -> PackageInfo:
    """I/O, op types and target of one package, from its spec (.mlpackage) or metadata (.mlmodelc)."""
    return _read_compiled(path) if path.suffix == ".mlmodelc" else _read_mlpackage(path)


def _read_mlpackage(path: Path) -> PackageInfo:
    import coremltools as ct

    try:
        spec = ct.models.utils.load_spec(str(path))
    except Exception as exc:  # damaged packages raise assorted types
        raise InputFileError(f"Cannot read this Core ML package ({exc}).", where=path,
                             fix="download or convert it again") from exc

    def io(items):
        return {f.name: (tuple(int(d) for d in f.type.multiArrayType.shape),
                         _DTYPES.get(f.type.multiArrayType.dataType, "fp32")) for f in items}

    ops: set[str] = set()
    axes: set[int] = set()
    if spec.WhichOneof("Type") == "mlProgram":
        for function in spec.mlProgram.functions.values():
            for block in function.block_specializations.values():
                _walk(block, ops, axes)
    return PackageInfo(path, io(spec.description.input), io(spec.description.output), frozenset(ops),
                       frozenset(axes), _SPEC_TARGETS.get(spec.specificationVersion))


def _walk(block, ops: set[str], axes: set[int]) -> None:
    scalars = {}
    for op in block.operations:
        ops.add(op.type)
        if op.type == "const" and op.outputs:
            ints = op.attributes["val"].immediateValue.tensor.ints.values
            if len(ints) == 1:
                scalars[op.outputs[0].name] = int(ints[0])
        elif op.type == "softmax":
            arg = op.inputs["axis"].arguments[0] if "axis" in op.inputs else None
            if arg is not None and arg.name in scalars:
                axes.add(scalars[arg.name])
        for inner in op.blocks:
            _walk(inner, ops, axes)


def _read_compiled(path: Path) -> PackageInfo:
    """A compiled model keeps its I/O in metadata.json and its program as text in model.mil."""
    meta_file, mil = path / "metadata.json", path / "model.mil"
    inputs: dict = {}
    outputs: dict = {}
    target = None
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
        meta = meta[0] if isinstance(meta, list) else meta
        for key, out in (("inputSchema", inputs), ("outputSchema", outputs)):
            for item in meta.get(key, []):
                shape = tuple(int(d) for d in re.findall(r"\d+", str(item.get("shape", ""))))
                out[item["name"]] = (shape, _DTYPES.get(item.get("dataType"), "fp32"))
        target = meta.get("specificationVersion") and _SPEC_TARGETS.get(int(meta["specificationVersion"]))
    except (OSError, ValueError, KeyError, TypeError):
        pass  # described as unknown; loading on macOS reads the real thing
    ops = set(re.findall(r"=\s*([a-z_0-9]+)\(", mil.read_text(encoding="utf-8", errors="replace"))) \
        if mil.is_file() else set()
    return PackageInfo(path, inputs, outputs, frozenset(ops), frozenset(), target)


def role_by_io(info: PackageInfo) -> str | None:
    """Apple's I/O contract names each part; chunks are told apart by who feeds whom."""
    ins, outs = set(info.inputs), set(info.outputs)
    if "input_ids" in ins:
        return "text_encoder"
    if "noise_pred" in outs or {"sample", "timestep"} <= ins:
        return "unet"
    if "z" in ins and "image" in outs:
        return "vae_decoder"
    if "x" in ins and "latent" in outs:
        return "vae_encoder"
    if "clip_input" in ins or "has_nsfw_concepts" in outs:
        return "safety_checker"
    return None
