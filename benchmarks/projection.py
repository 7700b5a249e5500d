"""LESS's random projection: ccds's chunked Rademacher matrix against a dense one (issue 6).

LESS projects each example's LoRA gradient (n = SmolLM2-135M's LoRA parameters at LESS's
rank) to k dimensions. A dense n × k fp32 matrix at the paper's k = 8192 is 30 GB; ccds
builds the same matrix chunk by chunk from (seed, chunk index) and keeps at most its packed
sign bits (n·k/8 bytes). Each (variant, k) runs in a fresh process: projection throughput
(rows/s for one `project_every` block of gradients, first call and with the bits cached),
the time to build the dense matrix, and the peak memory above the gradients themselves.
Both variants compute x @ R with the same R, so their outputs agree to fp32 summation order.

    .venv/bin/python benchmarks/projection.py        # ~5 min on the 2-core CPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

from peak import cpu

HERE = Path(__file__).parent


def _mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def lora_dim() -> int:
    """n: LoRA parameters of SmolLM2-135M under LESS's warmup settings (exact, no weights)."""
    from ccds.models import counts_without_weights
    from ccds.score import get_method

    less = get_method("less")
    return counts_without_weights(less.params.model, less.warmup_config())["lora"]


def worker(variant: str, n: int, k: int, rows: int, repeats: int) -> dict:
    """In a fresh process: time `repeats` projections of `rows` gradients; peak memory."""
    import numpy as np
    import torch

    from ccds.score.less import RademacherProjection

    x = torch.from_numpy(np.random.default_rng(0).standard_normal((rows, n), np.float32))
    proj = RademacherProjection(n, k, seed=0)
    before = _mib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    out: dict = {"variant": variant, "n": n, "k": k, "rows": rows}
    if variant == "dense":
        t = time.perf_counter()
        dense = torch.cat([proj.block(c) for c in range(-(-n // proj.chunk))])
        out["build_s"] = time.perf_counter() - t
        call = lambda: x @ dense  # noqa: E731
    else:
        call = lambda: proj(x)  # noqa: E731
    times = []
    for _ in range(repeats + 1):  # the first ccds call also draws the bits
        t = time.perf_counter()
        y = call()
        times.append(time.perf_counter() - t)
    out.update(first_s=times[0], times_s=times[1:], peak_mib=_mib("VmHWM") - before,
               matrix_mib=n * k * 4 / 2**20, bits_mib=n * k / 8 / 2**20)
    if variant == "dense":  # the same matrix: agreement with the chunked path on a few rows
        ref = RademacherProjection(n, k, seed=0)(x[:8])
        out["max_rel_diff"] = float(((y[:8] - ref).abs().max() / ref.abs().max()).item())
    return out


def main(argv=None) -> int:
    import numpy as np
    import torch

    from ccds.io import write_json, write_text

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--dims", type=int, nargs="+", default=[1024, 8192])
    ap.add_argument("--rows", type=int, default=256, help="LESS's project_every")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--worker", nargs=5, metavar=("VARIANT", "N", "K", "ROWS", "REPEATS"))
    args = ap.parse_args(argv)
    if args.worker:
        v, *nums = args.worker
        print(json.dumps(worker(v, *map(int, nums))))
        return 0
    t0 = time.perf_counter()
    n = lora_dim()
    ram_mib = _ram_mib()
    rows = []
    for k in args.dims:
        for variant in ("ccds", "dense"):
            need = n * k * 4 / 2**20 + args.rows * (n + k) * 4 / 2**20
            if variant == "dense" and need > 0.8 * ram_mib:
                rows.append({"variant": variant, "n": n, "k": k, "rows": args.rows,
                             "skipped": f"needs {need / 1024:.1f} GiB, the machine has "
                                        f"{ram_mib / 1024:.1f} GiB"})
            else:
                cmd = [sys.executable, __file__, "--worker", variant, str(n), str(k),
                       str(args.rows), str(args.repeats)]
                rows.append(json.loads(subprocess.run(cmd, check=True, capture_output=True,
                                                      text=True).stdout.splitlines()[-1]))
            print(rows[-1], flush=True)
    for r in rows:
        if "times_s" in r:
            r["rows_per_s"] = r["rows"] / float(np.median(r["times_s"]))
            r["gflops"] = 2 * r["rows"] * r["n"] * r["k"] / float(np.median(r["times_s"])) / 1e9
    res = {"command": "python benchmarks/projection.py " + " ".join(sys.argv[1:]),
           "date": str(date.today()),
           "machine": f"{cpu()}, "
                      f"{torch.get_num_threads()} threads, {ram_mib / 1024:.0f} GiB",
           "n": n, "rows": rows, "wall_s": time.perf_counter() - t0}
    write_json(args.out / "projection.json", res)
    write_text(args.out / "projection.md", markdown(res))
    print(markdown(res))
    return 0


def _ram_mib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) / 1024
    raise KeyError("MemTotal")


def markdown(r: dict) -> str:
    lines = ["# LESS projection: chunked Rademacher vs a dense matrix", "",
             f"Command: `{r['command']}` — {r['date']}, {r['machine']}, "
             f"{r['wall_s'] / 60:.1f} min. n = {r['n']:,} LoRA gradient entries per example "
             "(SmolLM2-135M, LESS's rank); one call projects the rows LESS projects together. "
             "Times are min / median / max of the calls after the first; peak memory is "
             "above the gradients themselves.", "",
             "| k | variant | matrix held | first call s | call s | rows/s | GFLOP/s | "
             "peak MiB | agreement |", "|---|---|---|---|---|---|---|---|---|"]
    for x in r["rows"]:
        if "skipped" in x:
            lines.append(f"| {x['k']:,} | {x['variant']} | {x['n'] * x['k'] * 4 / 2**30:.1f} "
                         f"GiB fp32 | — | — | — | — | — | not run: {x['skipped']} |")
            continue
        held = (f"{x['matrix_mib'] / 1024:.1f} GiB fp32 (built in {x['build_s']:.1f} s)"
                if x["variant"] == "dense" else
                f"{x['bits_mib']:,.0f} MiB of sign bits" if x["bits_mib"] <= 1024
                else "one chunk at a time")
        t = x["times_s"]
        agree = (f"max rel. diff {x['max_rel_diff']:.1e}" if "max_rel_diff" in x else "")
        lines.append(f"| {x['k']:,} | {x['variant']} | {held} | {x['first_s']:.1f} | "
                     f"{min(t):.1f} / {statistics.median(t):.1f} / {max(t):.1f} | "
                     f"{x['rows_per_s']:.1f} | {x['gflops']:.0f} | {x['peak_mib']:,.0f} | "
                     f"{agree} |")
    return "\n".join(lines + [""])


if __name__ == "__main__":
    sys.exit(main())
