"""PyTorch module -> Core ML ML Program, through torch.export (static shapes), plus spec helpers.

coremltools 9.0's TorchScript front end breaks under NumPy >= 2.4, so everything goes through
``torch.export``; ``run_decompositions({})`` lowers to the core ATen set the converter knows.
"""

from __future__ import annotations

import gc
import os
import shutil
import uuid
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

import coremltools as ct
import numpy as np
import torch

PRECISIONS = {"fp16": ct.precision.FLOAT16, "fp32": ct.precision.FLOAT32}


def to_mlprogram(
    module: torch.nn.Module,
    example_inputs: Mapping[str, torch.Tensor],
    *,
    input_dtypes: Mapping[str, np.dtype] | None = None,
    output_names: Sequence[str],
    output_dtypes: Mapping[str, np.dtype] | None = None,
    minimum_target=ct.target.macOS14,
    precision: str = "fp16",
    skip_model_load: bool = True,
    keep_mil_program: bool = False,
) -> ct.models.MLModel:
    """Convert ``module`` called as ``module(*example_inputs.values())`` with exactly these shapes.

    ``example_inputs`` order is the forward's positional order and its keys become the Core ML input
    names; ``input_dtypes`` overrides the Core ML dtype per input (default: the tensor's own dtype).
    ``output_dtypes`` pins output dtypes; left out, coremltools keeps fp16 outputs of an fp16 program
    (macOS13+ targets), which Apple's Swift pipeline cannot read (see components.py).
    ``skip_model_load`` stays True on Linux, where Core ML cannot compile or load a model.
    ``keep_mil_program=False`` drops the returned model's in-memory MIL program, a second copy of every
    weight (already written to the model's temporary package), which saving does not need.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    if not output_names:
        raise ValueError("output_names must name every output of the module")
    input_dtypes, output_dtypes = dict(input_dtypes or {}), dict(output_dtypes or {})
    checks = (("input", input_dtypes, example_inputs), ("output", output_dtypes, output_names))
    for what, given, known in checks:
        unknown = set(given) - set(known)
        if unknown:
            raise ValueError(f"{what}_dtypes names unknown {what}s: {sorted(unknown)}")

    module = module.eval()
    args = tuple(example_inputs.values())
    # fp32 export: Core ML does the fp16 cast itself, and an fp16 torch graph would differ from the source.
    with torch.no_grad():
        program = torch.export.export(module, args, strict=False).run_decompositions({})
    _drop_aliases(program)
    inputs = [
        ct.TensorType(
            name=name, shape=tuple(t.shape),
            dtype=np.dtype(input_dtypes.get(name, _numpy_dtype(t.dtype))).type,
        )
        for name, t in example_inputs.items()
    ]
    mlmodel = ct.convert(
        program,
        convert_to="mlprogram",
        minimum_deployment_target=minimum_target,
        compute_precision=PRECISIONS[precision],
        inputs=inputs,
        outputs=[
            ct.TensorType(name=n, dtype=np.dtype(output_dtypes[n]).type) if n in output_dtypes
            else ct.TensorType(name=n)
            for n in output_names
        ],
        skip_model_load=skip_model_load,
    )
    # The exported program shares the module's weights, so only the MIL program is worth freeing;
    # its ops and vars reference each other, hence the collect.
    if not keep_mil_program:
        mlmodel._mil_program = None
        release_memory()
    got = [o.name for o in mlmodel.get_spec().description.output]
    if got != list(output_names):
        raise RuntimeError(f"converted outputs are {got}, expected {list(output_names)}")
    return mlmodel


def release_memory() -> None:
    """Collect, then hand freed heap pages back to the OS (glibc keeps them otherwise, so the next stage's
    peak would stack on this one's). A no-op where glibc is not the allocator."""
    import ctypes
    import ctypes.util

    gc.collect()
    name = ctypes.util.find_library("c")
    try:
        ctypes.CDLL(name).malloc_trim(0)
    except (OSError, AttributeError, TypeError):
        pass


def _drop_aliases(program) -> None:
    """Bypass ``aten.alias`` nodes, which coremltools 9.0 rejects; without mutation they are no-ops.

    They appear e.g. where a buffer is sliced to its full length (CLIP's ``position_ids[:, :77]``).
    """
    graph = program.graph_module.graph
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is torch.ops.aten.alias.default:
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
    program.graph_module.recompile()


def _numpy_dtype(dtype: torch.dtype) -> np.dtype:
    return torch.empty((), dtype=dtype).numpy().dtype


def model_spec(mlmodel_or_path):
    """The protobuf spec of an MLModel or of a saved .mlpackage (opened without compiling it)."""
    if isinstance(mlmodel_or_path, ct.models.MLModel):
        return mlmodel_or_path.get_spec()
    return ct.models.MLModel(str(mlmodel_or_path), skip_model_load=True).get_spec()


def op_types(mlmodel_or_path) -> Counter:
    """How many times each MIL op type occurs in the program (nested blocks included)."""
    spec = model_spec(mlmodel_or_path)
    if spec.WhichOneof("Type") != "mlProgram":
        raise ValueError(f"not an ML Program: {spec.WhichOneof('Type')}")
    counts: Counter = Counter()

    def walk(block) -> None:
        for op in block.operations:
            counts[op.type] += 1
            for nested in op.blocks:
                walk(nested)

    for function in spec.mlProgram.functions.values():
        for block in function.block_specializations.values():
            walk(block)
    return counts


def save_package(mlmodel: ct.models.MLModel, path: str | Path) -> Path:
    """Save as ``path`` (.mlpackage) so that ``path`` is either the old package or the complete new one.

    A crash mid-save leaves only a hidden temporary sibling, never a half-written package a loader
    would trust.
    """
    path = Path(path)
    if path.suffix != ".mlpackage":
        raise ValueError(f"Core ML packages end in .mlpackage: {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    # Same folder, so the rename stays on one filesystem; coremltools insists on the .mlpackage suffix.
    tmp = path.with_name(f".{path.stem}.tmp-{tag}.mlpackage")
    old = path.with_name(f".{path.stem}.old-{tag}.mlpackage")
    try:
        mlmodel.save(str(tmp))
        if path.exists():
            # os.replace cannot overwrite a non-empty folder: move the old one aside first.
            os.replace(path, old)
        try:
            os.replace(tmp, path)
        except OSError:
            if old.exists():
                os.replace(old, path)
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return path


def save_multifunction(functions: Mapping[str, str | Path], path: str | Path) -> Path:
    """One multifunction package from single-function packages ({function name: package}), the first
    function the default. Functions with identical weights share them on disk (coremltools dedupes)."""
    path = Path(path)
    desc = ct.utils.MultiFunctionDescriptor()
    for function, source in functions.items():
        desc.add_function(str(source), src_function_name="main", target_function_name=function)
    desc.default_function_name = next(iter(functions))
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}.mlpackage")
    try:
        ct.utils.save_multifunction(desc, str(tmp))
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path
