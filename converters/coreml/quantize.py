"""Post-training k-means palettization of a converted ML program (LUTs from `kmeans.kmeans_lut`).

Run it before `chunk.split_mlmodel`: every chunk then ships compressed, and the chunk balancer counts
the `constexpr_lut_to_dense` bytes (LUT + packed indices) that Apple's bisection ignores.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass

import coremltools as ct
import coremltools.optimize.coreml as cto
from threadpoolctl import threadpool_limits

from converters.coreml.chunk import load_program, program_weight_bytes
from converters.coreml.kmeans import lut_function
from mlsd.memory import release_memory

BITS = (8, 6, 4)
# coremltools' default (2048 elements) skips most weights of tiny test models; a 6-bit LUT is 128 bytes,
# so palettizing anything above 512 elements still saves space.
WEIGHT_THRESHOLD = 512
_META_KEY = "com.mlsd.palettize"
# Not a bare "embed": the UNet's time_embedding is an ordinary linear layer worth compressing.
_EMBEDDING_NAME = re.compile(r"(token|position|word|patch)_?embed", re.IGNORECASE)
_GATHERS = ("gather", "gather_along_axis", "gather_nd")


@dataclass(frozen=True)
class PalettizeStats:
    bits: int
    bytes_before: int
    bytes_after: int
    excluded: int  # ops kept uncompressed by `exclude`

    @property
    def ratio(self) -> float:
        return self.bytes_after / self.bytes_before if self.bytes_before else 1.0


def is_token_embedding(op) -> bool:
    """Embedding tables: a gather's constant `x`, or a const named like a token/position embedding.

    Lookup tables lose accuracy disproportionately under a shared LUT and are read row-wise anyway.
    """
    if op.op_type in _GATHERS:
        x = op.inputs.get("x")
        return x is not None and x.op is not None and x.op.op_type == "const"
    if op.op_type != "const":
        return False
    if _EMBEDDING_NAME.search(op.name):
        return True
    out = op.outputs[0]
    return any(c.op_type in _GATHERS and c.inputs.get("x") is out for c in out.child_ops)


def palettize(
    mlmodel: ct.models.MLModel,
    bits: int,
    *,
    exclude: Callable[[object], bool] = is_token_embedding,
    weight_threshold: int = WEIGHT_THRESHOLD,
) -> ct.models.MLModel:
    """k-means palettize every weight above `weight_threshold` elements to `bits`, except ops for which
    `exclude(op)` holds. Byte counts before/after are stored in the model metadata (`palettize_stats`)."""
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits}")
    program = load_program(mlmodel)
    skipped = sorted({op.name for op in program.functions["main"].operations if exclude(op)})
    bytes_before = program_weight_bytes(program)
    del program  # a whole copy of the weights: not to be held while coremltools loads its own
    release_memory()
    config = cto.OptimizationConfig(
        global_config=cto.OpPalettizerConfig(
            mode="custom",
            lut_function=lut_function(bits),
            weight_threshold=weight_threshold,
        ),
        op_name_configs={name: None for name in skipped},
    )
    # Many small NumPy calls per weight: BLAS/OpenMP thread start-up would dominate them.
    with threadpool_limits(1):
        out = cto.palettize_weights(mlmodel, config)
    release_memory()
    stats = PalettizeStats(bits=bits, bytes_before=bytes_before, bytes_after=program_weight_bytes(load_program(out)),
                           excluded=len(skipped))
    release_memory()
    out.user_defined_metadata[_META_KEY] = json.dumps(asdict(stats))
    return out


def palettize_stats(mlmodel: ct.models.MLModel) -> PalettizeStats | None:
    raw = mlmodel.user_defined_metadata.get(_META_KEY)
    return PalettizeStats(**json.loads(raw)) if raw else None
