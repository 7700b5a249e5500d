"""ccds: compute-constrained data selection for LLM fine-tuning."""

import os as _os

# oneDNN (torch's bf16 CPU matmuls) keeps a compiled kernel per GEMM shape in two caches of
# 1024 entries each, a few hundred KB per entry. Batches of variable length make new shapes
# all the time, so with the defaults a scoring pass's memory climbs for a long while before
# it levels off (benchmarks/memory.py). 64 entries hold every shape of a LoRA training step;
# rebuilding a kernel is cheap next to a batch. Read at the first bf16 matmul; a value the
# user set wins.
for _var in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY"):
    _os.environ.setdefault(_var, "64")
# MKL (torch's fp32 CPU matmuls) may sum in a different order from run to run unless its
# conditional-numerical-reproducibility mode is on; AUTO keeps the fastest code path for
# this CPU (fp32 matmuls measured no slower with it) and makes a resumed training end
# bit-identical to an uninterrupted one (a CI run once saw the last bits differ without it).
_os.environ.setdefault("MKL_CBWR", "AUTO")

from .data.types import Example, Target  # noqa: E402
from .errors import CcdsError  # noqa: E402

__version__ = "0.1.0"
__all__ = ["CcdsError", "Example", "Target", "__version__"]
