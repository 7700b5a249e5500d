#!/usr/bin/env bash
# benchmarks/gpu.py on the device machine, as one command (issue 31). That machine has
# torch, transformers, peft and accelerate but no pydantic and no network: the wheels ccds
# needs beyond them travel with the working tree in .whl/ (never committed).
#
# Here, where pip reaches an index, once (about 3 MB):
#     benchmarks/gpu_run.sh wheels
# There (the device tool's run, carry [".whl"], timeout_s 600):
#     bash benchmarks/gpu_run.sh
# which installs .whl/*.whl into /tmp/site, runs gpu.py within BUDGET seconds (default 450,
# killed at BUDGET + 90) and writes gpu.json, gpu.md, gpu.log and nvidia-smi.csv to $OUT
# (benchmarks/results/ without $OUT). Extra arguments go to gpu.py.
set -uo pipefail
cd "$(dirname "$0")/.."

# gpu.py's WHEELS, pinned as constraints.txt pins them (tests/test_gpu_bench.py keeps the two
# lists the same)
WHEELS=(pydantic pydantic-core annotated-types typing-inspection typing-extensions)

if [ "${1:-}" = wheels ]; then
    pins=()
    for w in "${WHEELS[@]}"; do
        pin=$(grep -i -E "^${w//-/[-_]}==" constraints.txt) || { echo "no pin for $w in constraints.txt" >&2; exit 2; }
        pins+=("$pin")
    done
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >>.git/info/exclude
    for w in "${WHEELS[@]}"; do  # one version of each: two stop the install there
        rm -f ".whl/${w//-/_}-"*.whl
    done
    PY=${PYTHON:-python3}
    [ -x .venv/bin/python ] && PY=${PYTHON:-.venv/bin/python}
    exec "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform manylinux1_x86_64 -d .whl "${pins[@]}"
fi

OUT=${OUT:-benchmarks/results}
BUDGET=${BUDGET:-450}
mkdir -p "$OUT"
if compgen -G '.whl/*.whl' >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$OUT/nvidia-smi.csv" 2>&1
PYTHONUNBUFFERED=1 timeout -k 10 $((BUDGET + 90)) python3 benchmarks/gpu.py --budget "$BUDGET" \
    --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu.log"
