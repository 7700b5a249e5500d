"""The ray backend without --address, on a local cluster that is as small as the machines
ccds runs on (2 CPUs, whatever this machine has): a job that asks for every CPU is clamped
with a warning and finishes, one that cannot run says so in one line, one that stops making
progress says why and frees the cluster, and Ray's own chatter stays off the terminal. Each
case runs in a subprocess with a timeout, since the failure being guarded against is a hang."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("ray")

from ccds.data.formats import write_examples  # noqa: E402
from ccds.data.synth import generate  # noqa: E402

pytestmark = pytest.mark.slow


def _env(tmp_path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    return {**env, "RAY_ADDRESS": "local",  # a new cluster, even if `ray start` left one
            "RAY_OVERRIDE_RESOURCES": json.dumps({"CPU": 2}), "RAY_USAGE_STATS_ENABLED": "0",
            "CCDS_CACHE": str(tmp_path / "cache"), "CCDS_DTYPE": "fp32"}


@pytest.fixture
def pool(tmp_path):
    write_examples(generate(seed=0, n_pool=48)[0], tmp_path / "pool.jsonl")
    return tmp_path / "pool.jsonl"


def test_every_cpu_asked_for_is_clamped_and_ray_stays_quiet(pool, tmp_path, tiny_model_dir):
    """Two actors of one CPU on two CPUs left none for Ray Data's read tasks: it hung."""
    r = subprocess.run([sys.executable, "-m", "ccds", "score", "--pool", str(pool), "--method",
                        "ppl", "--param", f"model={tiny_model_dir}",
                        "--out", str(tmp_path / "s.parquet"), "--backend", "ray",
                        "--concurrency", "2", "--shard-size", "16"],
                       capture_output=True, text=True, env=_env(tmp_path), timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "scored 48 examples" in r.stdout
    from ccds.score.base import read_scores

    backend = read_scores(tmp_path / "s.parquet").stage.detail["backend"]
    assert backend["dtype"] == "fp32"  # the actors' own, as CCDS_DTYPE forced it
    lines = r.stderr.splitlines()
    assert lines == ["ray: running 1 of 2 actors: the cluster has 2 CPU, each actor takes 1 "
                     "CPU and Ray Data's read tasks need a CPU"], r.stderr[-2000:]


def test_impossible_and_stalled_jobs_say_why(pool, tmp_path):
    script = textwrap.dedent(f"""
        import time, ray
        from ccds.data.formats import load_examples
        from ccds.errors import CcdsError
        from ccds.flops import Meter
        from ccds.models import pick_runtime
        from ccds.score import Context, get_method
        from ccds.score.base import Backend
        from ccds.score.on_ray import connect

        connect(None)
        pool = load_examples({str(pool)!r})

        def score(**kw):
            ctx = Context(runtime=pick_runtime(dtype="fp32"), progress=False,
                          backend=Backend(kind="ray", shard_size=16, **kw))
            try:
                with Meter("s", "selection", None, True) as m:
                    get_method("ppl").score(pool, None, ctx, m)
            except CcdsError as e:
                print("error:", e, flush=True)

        score(gpus_per_actor=1)  # no GPU here

        @ray.remote(num_cpus=1)
        class Hold:  # another job's actor
            pass

        held = Hold.remote()
        ray.get(held.__ray_ready__.remote())
        score(stall_s=10)  # our one actor takes the last CPU; the read tasks get none
        for _ in range(30):  # the stalled job's actor is gone: its CPU comes back
            if ray.available_resources().get("CPU") == 1:
                break
            time.sleep(1)
        print("free:", ray.available_resources().get("CPU"), flush=True)
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       env=_env(tmp_path), timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    out = r.stdout.splitlines()
    assert out[0].startswith("error: the Ray cluster cannot run one actor (1 CPU + 1 GPU) "
                             "and keep a CPU for reading the pool: it has 2 CPU"), out
    assert out[1].startswith("error: Ray made no progress for 10 s: 1 actors of 1 CPU each, "
                             "0 of 3 shards done; the cluster has 2 CPU, 0 CPU free"), out
    assert out[2] == "free: 1.0", out
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
