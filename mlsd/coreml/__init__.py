"""Core ML tooling that runs on any OS; `Executor` runs saved ML Program packages with PyTorch ops.

Typical use, proving a converted package against its PyTorch source on Linux::

    from mlsd.coreml import Executor
    out = Executor("unet.mlpackage").run({"sample": x, "timestep": t, "encoder_hidden_states": c})
"""

from mlsd.coreml.executor import Executor, InputMismatchError, OpFailedError, UnsupportedOpError
from mlsd.coreml.ops import OPS, supported_op_types
from mlsd.coreml.program import MilExecutorError, MilProgram, ProgramLoadError, TensorSpec, load_program

__all__ = [
    "OPS",
    "Executor",
    "InputMismatchError",
    "MilExecutorError",
    "MilProgram",
    "OpFailedError",
    "ProgramLoadError",
    "TensorSpec",
    "UnsupportedOpError",
    "load_program",
    "supported_op_types",
]
