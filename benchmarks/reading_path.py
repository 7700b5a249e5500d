"""How many ccds modules a reader follows for `ccds score --method less`, counted by tracing
a real run: every module with a function that runs (class bodies and import-time code left
out), with its lines. Issue 21 asked for fewer than before its layering.

    python benchmarks/reading_path.py                       # this checkout
    python benchmarks/reading_path.py --src OLD/src --label before   # another checkout

Each label's entry is kept in benchmarks/results/reading_path.{json,md}; ~1 min on a CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "results" / "reading_path"

CHILD = r'''
import collections, json, os, sys, threading
src, work = sys.argv[1], sys.argv[2]
sys.path.insert(0, src)
hits = collections.defaultdict(set)

def prof(frame, event, arg):
    if event != "call":
        return
    f, back = frame.f_code.co_filename, frame.f_back
    at_import = back is not None and back.f_code.co_name == "<module>" and \
        back.f_code.co_filename.startswith(src + "/ccds")
    if f.startswith(src + "/ccds") and frame.f_code.co_name != "<module>" and not at_import:
        hits[os.path.relpath(f, src)].add(frame.f_code.co_name)

sys.setprofile(prof)
threading.setprofile(prof)
from ccds.cli import main
try:
    main(["score", "--pool", f"{work}/pool.jsonl", "--target",
          f"{work}/targets/synth-arithmetic", "--method", "less", "--param", "warmup_epochs=1",
          "--param", "proj_dim=64", "--out", f"{work}/less.parquet"])
except SystemExit as e:
    assert not e.code, e.code
sys.setprofile(None)
print(json.dumps({k: sorted(v) for k, v in hits.items()}))
'''


def measure(src: Path) -> dict:
    with tempfile.TemporaryDirectory() as work:
        subprocess.run([sys.executable, "-c",
                        "import sys; sys.path.insert(0, sys.argv[1]);"
                        "from ccds.data.synth import generate;"
                        "from ccds.data.formats import write_examples;"
                        "from ccds.data.sources import save_target;"
                        "pool, ts = generate(0, n_pool=40, n_val=4, n_test=4);"
                        "write_examples(pool, sys.argv[2] + '/pool.jsonl');"
                        "[save_target(t, sys.argv[2] + '/targets/' + t.name) for t in ts]",
                        str(src), work], check=True)
        env = {**os.environ, "CCDS_CACHE": str(Path(work) / "cache"), "CCDS_DTYPE": "fp32"}
        r = subprocess.run([sys.executable, "-c", CHILD, str(src), work], env=env, check=True,
                           capture_output=True, text=True)
    hits = json.loads(r.stdout.strip().splitlines()[-1])
    lines = {m: len((src / m).read_text().splitlines()) for m in hits}
    return {"modules": len(hits), "lines": sum(lines.values()),
            "per_module": {m: {"lines": lines[m], "functions": hits[m]} for m in sorted(hits)}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", type=Path, default=HERE.parent / "src")
    ap.add_argument("--label", default="now")
    args = ap.parse_args()
    results = json.loads(OUT.with_suffix(".json").read_text()) \
        if OUT.with_suffix(".json").exists() else {}
    results[args.label] = measure(args.src.resolve())
    OUT.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    md = ["# Modules on the path of `ccds score --method less`", "",
          "Command: `python benchmarks/reading_path.py [--src CHECKOUT/src --label L]`: a traced"
          " run on 40 synthetic examples; a module counts when one of its functions runs.", "",
          "| label | modules | lines | modules on the path |", "|---|---|---|---|"]
    for label, r in results.items():
        md.append(f"| {label} | {r['modules']} | {r['lines']:,} | "
                  f"{', '.join(m.removeprefix('ccds/') for m in r['per_module'])} |")
    OUT.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
