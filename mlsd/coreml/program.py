"""Read a saved Core ML ML Program (.mlpackage) back into coremltools' MIL form on any OS.

Core ML's own runtime exists only on Apple platforms; coremltools' milproto loader rebuilds the
MIL program (weights included, every function of a multifunction package) anywhere, which is
what the reference executor runs.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlsd.errors import MlsdError

WEIGHTS_SUBDIR = Path("Data") / "com.apple.CoreML" / "weights"


class MilExecutorError(MlsdError):
    """Base of the reference executor's errors."""

    title = "Core ML reference executor"


class ProgramLoadError(MilExecutorError, ValueError):
    """The path is not a readable ML Program package, or the function does not exist."""


@dataclass(frozen=True)
class TensorSpec:
    """One function input or output: MIL dtype name (fp16, fp32, int32, bool) and shape (None = flexible)."""

    name: str
    shape: tuple[int | None, ...]
    dtype: str


def dtype_name(var: Any) -> str:
    from coremltools.converters.mil.mil import types

    return types.builtin_to_string(var.dtype)


def _static_shape(var: Any) -> tuple[int | None, ...]:
    from coremltools.converters.mil.mil.types.symbolic import is_symbolic

    return tuple(None if is_symbolic(d) else int(d) for d in var.shape)


def tensor_spec(var: Any, name: str | None = None) -> TensorSpec:
    return TensorSpec(name or var.name, _static_shape(var), dtype_name(var))


@dataclass
class MilProgram:
    """A MIL program with one function picked to run."""

    program: Any  # coremltools.converters.mil.mil.Program
    function_name: str
    path: Path | None = None
    inputs: dict[str, TensorSpec] = field(init=False)
    outputs: dict[str, TensorSpec] = field(init=False)

    def __post_init__(self) -> None:
        if self.function_name not in self.program.functions:
            raise ProgramLoadError(
                f"Function {self.function_name!r} is not in the program",
                where=self.path,
                fix=f"pick one of: {', '.join(self.functions)}",
            )
        fn = self.function
        self.inputs = {name: tensor_spec(var, name) for name, var in fn.inputs.items()}
        self.outputs = {var.name: tensor_spec(var) for var in fn.outputs}

    @property
    def functions(self) -> tuple[str, ...]:
        return tuple(self.program.functions)

    @property
    def function(self) -> Any:
        return self.program.functions[self.function_name]

    def select(self, function: str) -> MilProgram:
        """The same program with another function picked (multifunction packages)."""
        return MilProgram(self.program, function, self.path)

    def operations(self) -> Iterator[Any]:
        """Every op of the function, ops of nested blocks (cond / while_loop bodies) included."""

        def walk(block: Any) -> Iterator[Any]:
            for op in block.operations:
                yield op
                for inner in op.blocks:
                    yield from walk(inner)

        yield from walk(self.function)

    def op_types(self) -> Counter[str]:
        return Counter(op.op_type for op in self.operations())

    def unsupported_ops(
        self, supported: Mapping[str, Any] | set[str] | frozenset[str]
    ) -> dict[str, list[str]]:
        """Op type -> names of the ops of that type that `supported` has no implementation for."""
        missing: dict[str, list[str]] = {}
        for op in self.operations():
            if op.op_type != "const" and op.op_type not in supported:
                missing.setdefault(op.op_type, []).append(op.name)
            elif op.blocks:
                # Ops with nested blocks (control flow) need a block runner the executor does not have.
                missing.setdefault(op.op_type, []).append(op.name)
        return missing


def _read_package(path: Path) -> tuple[Any, str]:
    import coremltools as ct
    from coremltools.converters.mil.frontend.milproto.load import load as load_milproto

    if not path.exists():
        raise ProgramLoadError("Core ML package not found", where=path, fix="check the path")
    if not path.is_dir():
        raise ProgramLoadError(
            "Not an .mlpackage directory (ML Programs keep weights beside the spec)",
            where=path,
            fix="pass the .mlpackage folder",
        )
    try:
        spec = ct.models.utils.load_spec(str(path))
    except Exception as exc:  # the reader raises assorted types for damaged packages
        raise ProgramLoadError(f"Cannot read the Core ML spec: {exc}", where=path) from exc
    if spec.WhichOneof("Type") != "mlProgram":
        raise ProgramLoadError(
            f"The package holds a {spec.WhichOneof('Type')} model, not an ML Program",
            where=path,
            fix="convert with convert_to='mlprogram'",
        )
    program = load_milproto(spec, spec.specificationVersion, str(path / WEIGHTS_SUBDIR))
    return program, spec.description.defaultFunctionName or "main"


def load_program(path: str | Path | Any, function: str | None = None) -> MilProgram:
    """Load an .mlpackage (or wrap an in-memory MIL Program / MLModel) and pick `function`.

    `function` defaults to the package's default function ("main" for single-function packages).
    """
    from coremltools.converters.mil.mil import Program

    if isinstance(path, MilProgram):
        return path if function in (None, path.function_name) else path.select(function)
    if isinstance(path, Program):
        names = list(path.functions)
        return MilProgram(path, function or ("main" if "main" in names else names[0]))
    if hasattr(path, "get_spec") and getattr(path, "package_path", None):
        path = path.package_path  # an MLModel: run what was written to disk, not the pre-save program
    path = Path(path)
    program, default = _read_package(path)
    return MilProgram(program, function or default, path)
