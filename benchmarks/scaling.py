"""How each selection method's cost grows with the pool: wall time and FLOPs at 1k, 10k and
100k real examples against MMLU (issue 6), as a plot.

FLOPs are every method's analytic count (`Method.cost`, what the ledger charges) at every
size. Wall time is measured where it fits this 2-core CPU (`--measure-up-to`, per method) on
the same code path as `ccds score`, with no score cache; above that it is extrapolated from
the largest measured size in proportion to FLOPs (LM work is linear in the pool's tokens),
drawn dashed and marked in the table.

    .venv/bin/python benchmarks/scaling.py          # ~15 min on the 2-core CPU
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

from peak import cpu

HERE = Path(__file__).parent
# the largest pool each method is timed on here; the SmolLM2 passes run ~2k tokens/s
MEASURE = {"random": 100_000, "bm25": 100_000, "embed": 10_000, "s2l": 10_000,
           "ppl": 1_000, "cascade": 1_000, "less": 200}
PARAMS = {"less": {"warmup_epochs": 1}, "cascade": {"cheap": "bm25", "expensive": "ppl",
                                                    "keep": 0.2}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    ap.add_argument("--methods", nargs="+", default=list(MEASURE))
    ap.add_argument("--scale-measured", type=float, default=1.0,
                    help="multiply every measuring cap (a quick smoke run: 0.01)")
    args = ap.parse_args(argv)
    os.environ["CCDS_CACHE"] = tempfile.mkdtemp(prefix="ccds-scaling-")  # nothing reused
    sys.path.insert(0, str(HERE))
    import matplotlib
    import torch
    from speed_select import real_documents

    from ccds.data.sources import load_target
    from ccds.io import write_json, write_text
    from ccds.score import get_method, run

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    target = load_target("mmlu")
    docs = real_documents(max(args.sizes))
    sizes = sorted(args.sizes)
    rows = []
    for name in args.methods:
        cap = MEASURE[name] * args.scale_measured
        measured = sorted({n for n in sizes if n <= cap} | ({int(cap)} if cap < sizes[0] else set()))
        ref = None
        for n in sorted(set(sizes) | set(measured)):
            m = get_method(name, **PARAMS.get(name, {}))
            flops = m.cost(docs[:n], target)
            if n in measured:
                t = time.perf_counter()
                s = run(m, docs[:n], target, cache=None)
                wall, how = time.perf_counter() - t, "measured"
                ref = (wall, flops, s.stage.analytic_flops)
            else:
                wall, how = ref[0] * flops / ref[1] if ref[1] else ref[0] * n / measured[-1], \
                    "extrapolated"
            rows.append({"method": name, "n": n, "flops": flops, "wall_s": wall, "wall": how,
                         "ledger_flops": ref[2] if how == "measured" else None})
            print(rows[-1], flush=True)

    r = {"command": "python benchmarks/scaling.py " + " ".join(sys.argv[1:]),
         "date": str(date.today()), "machine": f"{cpu()}, "
         f"{torch.get_num_threads()} threads, torch {torch.__version__}", "rows": rows}
    write_json(args.out / "scaling.json", r)

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, name in enumerate(args.methods):
        pts = [x for x in rows if x["method"] == name and x["n"] in sizes]
        c = f"C{i}"
        a.plot([x["n"] for x in pts], [max(x["flops"], 1.0) for x in pts], "o-", c=c, label=name)
        meas = [x for x in rows if x["method"] == name and x["wall"] == "measured"]
        extra = [meas[-1]] + [x for x in pts if x["wall"] == "extrapolated"] if meas else []
        b.plot([x["n"] for x in meas], [x["wall_s"] for x in meas], "o-", c=c, label=name)
        if len(extra) > 1:
            b.plot([x["n"] for x in extra], [x["wall_s"] for x in extra], "o--", c=c, mfc="none")
    for ax, y in ((a, "selection FLOPs (analytic; random plotted at 1)"),
                  (b, "wall seconds (dashed: extrapolated by FLOPs)")):
        ax.set(xscale="log", yscale="log", xlabel="pool size (examples)", ylabel=y)
        ax.grid(alpha=0.3, which="both")
    b.axhline(3600, c="grey", lw=0.8)
    b.text(sizes[0], 3600 * 1.15, "1 hour", color="grey", fontsize=8)
    a.legend(fontsize=8)
    fig.suptitle("Cost of selection vs pool size, MMLU target, SmolLM2-135M scorers, 2-core CPU")
    fig.tight_layout()
    fig.savefig(args.out / "scaling.png", dpi=120)

    lines = ["# Scaling: selection cost against pool size", "",
             f"Command: `{r['command']}` — {r['date']}, {r['machine']}. Pool: real text from "
             "../shared/data topped up with joined pairs; target MMLU. FLOPs analytic "
             "(`Method.cost`); wall measured on the `ccds score` path without cache, or "
             "extrapolated in proportion to FLOPs from the largest measured size.", "",
             "![scaling](scaling.png)", "",
             "| method | " + " | ".join(f"{n:,}" for n in sizes) + " |",
             "|---|" + "---|" * len(sizes)]
    for name in args.methods:
        cells = []
        for n in sizes:
            x = next(x for x in rows if x["method"] == name and x["n"] == n)
            star = "" if x["wall"] == "measured" else "*"
            cells.append(f"{x['flops']:.2e} FLOPs, {x['wall_s']:,.1f} s{star}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "\\* extrapolated from the largest measured size "
              "(" + ", ".join(f"{k} {v * args.scale_measured:,.0f}" for k, v in MEASURE.items()
                              if k in args.methods) + ") in proportion to analytic FLOPs.", ""]
    write_text(args.out / "scaling.md", "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
