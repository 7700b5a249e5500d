"""The ray backend on a real two-node cluster on this machine: a head and a worker node,
each a separate `ray start` process (Ray binds a multi-node cluster to the machine's own
address, not 127.0.0.1; no other host is involved; token auth is off for the test cluster). Every per-example pass (perplexity,
embeddings, LESS gradient features, S2L trajectories, BM25's two passes) must give the local
backend's rows in pool order (the language-model passes on the tiny Llama, S2L on its scratch
proxy); a worker node killed mid-job, SmolLM2's shards in flight, must not change the result;
finished shards are not recomputed. Skips when ray is not installed."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from functools import partial
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray")

from ccds.data.synth import generate  # noqa: E402
from ccds.flops import Meter  # noqa: E402
from ccds.models import causal_lm, pick_runtime  # noqa: E402
from ccds.score import Context, get_method  # noqa: E402
from ccds.score.backend import map_pool  # noqa: E402
from ccds.score.base import Backend  # noqa: E402
from ccds.score.ppl import SequenceStats  # noqa: E402
from ccds.select import select  # noqa: E402

pytestmark = pytest.mark.slow
RAY = [sys.executable, "-m", "ray.scripts.scripts"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
os.environ["RAY_AUTH_MODE"] = "disabled"  # this process joins as a driver


def _start_worker(address: str, tmp: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [*RAY, "start", f"--address={address}", "--num-cpus=2",
         "--object-store-memory=100000000", "--block"],
        stdout=open(tmp / "worker.log", "ab"), stderr=subprocess.STDOUT,
        start_new_session=True, env=ENV)


def _nodes_alive() -> int:
    return sum(n["Alive"] for n in ray.nodes())


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """(address, worker process, tmp): head + worker node on loopback, 2 logical CPUs each
    (an actor takes 1; Ray Data's read tasks need the other)."""
    tmp = tmp_path_factory.mktemp("ray")
    port = _free_port()
    head = subprocess.run([*RAY, "start", "--head", f"--port={port}", "--num-cpus=2",
                           "--include-dashboard=false", "--object-store-memory=100000000",
                           "--disable-usage-stats"],
                          check=True, env=ENV, capture_output=True, text=True)
    address = re.search(r"--address='([^']+)'", head.stdout + head.stderr).group(1)
    worker = {"proc": _start_worker(address, tmp)}
    try:
        ray.init(address=address, log_to_driver=False)
        deadline = time.time() + 120
        while _nodes_alive() < 2 and time.time() < deadline:
            time.sleep(1)
        assert _nodes_alive() == 2, "worker node did not join"
        yield address, worker, tmp
    finally:
        ray.shutdown()
        if worker["proc"].poll() is None:
            os.killpg(worker["proc"].pid, signal.SIGKILL)
        subprocess.run([*RAY, "stop", "--force"], capture_output=True, env=ENV)


@pytest.fixture(scope="module")
def data():
    pool, targets = generate(seed=0, n_pool=48, n_val=4, n_test=4)
    return pool, targets[0]


def _ctx(tmp: Path, address: str | None = None, **kw) -> Context:
    rt = pick_runtime(dtype="fp32")  # same numbers on both sides, up to summation order
    if address is None:
        return Context(runtime=rt, progress=False)
    return Context(runtime=rt, progress=False, backend=Backend(
        kind="ray", address=address, shard_size=kw.get("shard_size", 12), concurrency=2,
        work=tmp / f"shards-{time.time_ns()}"))


def _score(name, params, pool, target, ctx, cache: Path, monkeypatch) -> tuple[np.ndarray, Meter]:
    monkeypatch.setenv("CCDS_CACHE", str(cache))  # LESS and S2L keep their own caches
    method = get_method(name, **params)
    meter = Meter("select", "selection", None, True)
    with meter:
        values = method.score(pool, target if method.needs_target else None, ctx, meter)
    return np.asarray(values), meter


@pytest.mark.parametrize("name,params", [
    ("ppl", {"variant": "low"}),
    ("embed", {}),
    ("less", {"warmup_epochs": 1, "warmup_fraction": 0.1, "proj_dim": 256}),
    ("s2l", {"checkpoints": 3, "k": 4}),
    ("bm25", {"shard_size": 10}),
], ids=["ppl", "embed", "less", "s2l", "bm25"])
def test_each_pass_on_ray_matches_local(cluster, data, tmp_path, monkeypatch, name, params,
                                        tiny_model_dir):
    address, _, _ = cluster
    pool, target = data
    if name in ("ppl", "less"):  # the backend is under test: a tiny model runs the same code
        params = {**params, "model": str(tiny_model_dir)}
    local, m_local = _score(name, params, pool, target, _ctx(tmp_path), tmp_path / "a",
                            monkeypatch)
    remote, m_remote = _score(name, params, pool, target, _ctx(tmp_path, address),
                              tmp_path / "b", monkeypatch)
    if name == "s2l":  # an order from k-means; compare the trajectories it clustered
        from ccds.score import proxy

        p = get_method(name, **params).params
        monkeypatch.setenv("CCDS_CACHE", str(tmp_path / "a"))
        local = proxy.trajectories(p, pool, _ctx(tmp_path)).loss
        monkeypatch.setenv("CCDS_CACHE", str(tmp_path / "b"))
        remote = proxy.trajectories(p, pool, _ctx(tmp_path, address)).loss
    np.testing.assert_allclose(remote, local, rtol=1e-4, atol=1e-5)
    if name == "bm25":  # exact math (integer counts, per-document sums): byte-identical
        assert remote.tobytes() == local.tobytes()
    if name != "s2l":  # the same selection, up to a swap of near-ties
        top = [set(select(v, fraction=0.25).tolist()) for v in (remote, local)]
        assert len(top[0] & top[1]) >= len(top[0]) - 1
    # the ledger is the same wherever the work ran
    assert m_remote.stage.analytic_flops == pytest.approx(m_local.stage.analytic_flops, rel=1e-9)
    assert m_remote.stage.measured_flops == pytest.approx(m_local.stage.measured_flops, rel=0.02)


def _stats_pass():
    return SequenceStats(partial(causal_lm, "smollm2-135m"), max_len=256)


def test_killed_worker_node_and_resume(cluster, data, tmp_path, figure):
    """Kill the worker node while shards are in flight: Ray retries them on the head and
    the rows match the local backend. Then delete two finished shards: a rerun recomputes
    only those."""
    address, worker, tmp = cluster
    pool = data[0] * 3  # 144 rows, 24 shards of 6
    local = map_pool(_stats_pass(), pool, _ctx(tmp_path), Meter("l", "selection"), key="k")
    ctx = _ctx(tmp_path, address, shard_size=6)
    root = ctx.backend.work / "k-6"
    killed, saved_at_kill = threading.Event(), []

    def kill_when_started():
        while not any(root.glob("out-*.npy")):
            time.sleep(0.05)
        os.killpg(worker["proc"].pid, signal.SIGKILL)
        saved_at_kill.append(len(list(root.glob("out-*.npy"))))
        killed.set()

    threading.Thread(target=kill_when_started, daemon=True).start()
    got = map_pool(_stats_pass(), pool, ctx, Meter("r", "selection"), key="k")
    assert killed.is_set()
    saved = len(list(root.glob("out-*.npy")))  # every shard, once finished
    np.testing.assert_allclose(got, local, rtol=1e-4)
    worker["proc"] = _start_worker(address, tmp)  # the next test gets its two nodes back

    for f in sorted(root.glob("out-*.npy"))[:2]:
        f.unlink()
    meter = Meter("r", "selection")
    again = map_pool(_stats_pass(), pool, ctx, meter, key="k")
    assert meter.stage.detail["backend"]["resumed"] == saved - 2
    figure("Ray: worker node SIGKILLed mid-pass (shards saved by then, of 24)",
           saved_at_kill[0])
    np.testing.assert_allclose(again, local, rtol=1e-4)


def test_cli_score_with_ray_backend(cluster, data, tmp_path, tiny_model_dir):
    from ccds.data.formats import write_examples

    address, _, _ = cluster
    write_examples(data[0], tmp_path / "pool.jsonl")
    outs = {}
    for backend in ("local", "ray"):
        out = tmp_path / f"{backend}.parquet"
        r = subprocess.run([sys.executable, "-m", "ccds", "score", "--pool",
                            str(tmp_path / "pool.jsonl"), "--method", "ppl", "--param",
                            "variant=low", "--param", f"model={tiny_model_dir}", "--out", str(out), "--backend", backend,
                            "--address", address, "--shard-size", "16", "--concurrency", "2",
                            "--work", str(tmp_path / "shards")],
                           capture_output=True, text=True,
                           env={**ENV, "CCDS_CACHE": str(tmp_path / backend),
                                "CCDS_DTYPE": "fp32"})
        assert r.returncode == 0, r.stderr[-2000:]
        from ccds.score.base import read_scores

        outs[backend] = read_scores(out).values
    np.testing.assert_allclose(outs["ray"], outs["local"], rtol=1e-4)
    assert list((tmp_path / "shards").rglob("*.npy")), "--work: the shards went elsewhere"
