"""This machine's dense matmul peak in fp32 and bf16 (GFLOP/s), the denominator of MFU.

Every benchmark measures it in its own run (`peak()`), because absolute speed on a shared
2-core machine drifts; ratios measured side by side are what results quote.

    .venv/bin/python benchmarks/peak.py
"""

from __future__ import annotations

import json
import sys
import time

import torch


def peak(dtype: torch.dtype = torch.float32, n: int = 2048, seconds: float = 2.0) -> float:
    """Best GFLOP/s of n×n @ n×n over repeated timings."""
    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    a @ b  # warm up the kernels
    best, t_end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t = time.perf_counter()
        a @ b
        best = max(best, 2 * n ** 3 / (time.perf_counter() - t) / 1e9)
    return best


def cpu() -> str:
    """The CPU's model name and its matrix instruction sets (AMX, AVX512-BF16, AVX512),
    which decide whether bf16 or fp32 is the faster dtype."""
    import platform

    from ccds.models import cpu_info

    name, flags = cpu_info()
    isa = [label for flag, label in (("amx_bf16", "AMX"), ("avx512_bf16", "AVX512-BF16"),
                                     ("avx512f", "AVX512")) if flag in flags]
    return f"{name or platform.processor() or platform.machine()} ({', '.join(isa) or 'no AVX512'})"


def main() -> int:
    out = {"cpu": cpu(), "threads": torch.get_num_threads(), "torch": torch.__version__,
           "fp32_gflops": round(peak(torch.float32), 1),
           "bf16_gflops": round(peak(torch.bfloat16), 1)}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
