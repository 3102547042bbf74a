"""PyTorch module -> Core ML ML Program, through torch.export (static shapes), plus spec helpers.

coremltools 9.0's TorchScript front end breaks under NumPy >= 2.4, so everything goes through
``torch.export``; ``run_decompositions({})`` lowers to the core ATen set the converter knows.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections import Counter
from collections.abc import Mapping, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path

import coremltools as ct
import numpy as np
import torch

from mlsd.memory import release_memory  # noqa: F401  (the converter's stages import it from here)

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

    An fp32 module is the reference route (Core ML casts to fp16 itself). An fp16 module takes the fp16
    route: the exported graph and its weights are fp16 already, so no fp32 copy of the weights ever
    exists (a full SD1.5 UNet: 1.7 GB instead of 3.4 GB fp32 plus 1.7 GB of fp16 copies).

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
    fp16_graph = _module_dtype(module) == torch.float16
    if fp16_graph and precision != "fp16":
        raise ValueError("an fp16 module converts only at precision='fp16'")
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
    with fp16_frontend() if fp16_graph else nullcontext():
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


def _module_dtype(module: torch.nn.Module) -> torch.dtype | None:
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), None)


@contextmanager
def fp16_frontend():
    """coremltools 9.0's torch front end assumes fp32 graphs. Two of its habits break fp16 ones:
    group_norm adds a Python-float epsilon (an fp32 const) to fp16 variances, and binary ops promote
    fp16 tensors to fp32 whenever the other operand is a Python scalar (an attention scale, a constant
    in the timestep embedding). Here scalars take the tensor's dtype, as they do in torch itself."""
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.frontend.torch import ops
    from coremltools.converters.mil.mil import Var, types

    group_norm, promote = ops._group_norm_impl, ops.promote_input_dtypes

    def group_norm_fp16(x, num_groups, weight, bias, eps):
        return group_norm(x, num_groups, weight, bias, np.float16(eps) if x.dtype == types.fp16 else eps)

    def weak_scalar(v):
        if isinstance(v, float):
            return mb.const(val=np.float16(v))
        if isinstance(v, Var) and v.dtype == types.fp32 and v.val is not None and np.size(v.val) == 1:
            return mb.const(val=np.asarray(v.val, np.float16).reshape(np.shape(v.val)), name=f"{v.name}_fp16")
        return v

    def promote_fp16(input_vars):
        if any(isinstance(v, Var) and v.dtype == types.fp16 for v in input_vars):
            input_vars = [weak_scalar(v) for v in input_vars]
        return promote(input_vars)

    ops._group_norm_impl, ops.promote_input_dtypes = group_norm_fp16, promote_fp16
    try:
        yield
    finally:
        ops._group_norm_impl, ops.promote_input_dtypes = group_norm, promote


class _Fp16BatchNormBuilder:
    """The MIL builder as coremltools' elementwise->batch_norm fusion sees it, with one fix: the fusion
    writes fp32 mean/variance consts beside the graph's gamma, which an fp16 graph's batch_norm then
    rejects; here they take gamma's dtype. Everything else is the real builder."""

    def __getattr__(self, name):
        from coremltools.converters.mil import Builder as mb

        return getattr(mb, name)

    @staticmethod
    def batch_norm(*, mean, variance, gamma, **kwargs):
        from coremltools.converters.mil import Builder as mb

        if isinstance(gamma, np.ndarray) and gamma.dtype == np.float16:
            mean, variance = np.asarray(mean, np.float16), np.asarray(variance, np.float16)
        return mb.batch_norm(mean=mean, variance=variance, gamma=gamma, **kwargs)


def _fix_fp16_batchnorm_fusion() -> None:
    # Module-wide, because every later re-conversion (palettizing, chunking) runs the same pass.
    from coremltools.converters.mil.mil.passes.defs import optimize_elementwise_binary as fusion

    if not isinstance(fusion.mb, _Fp16BatchNormBuilder):
        fusion.mb = _Fp16BatchNormBuilder()


_fix_fp16_batchnorm_fusion()


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
