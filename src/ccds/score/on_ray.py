"""Running a pass on a Ray cluster (`Backend(kind="ray")`; `backend.map_pool` calls here).

The pool is written as Parquet shards and streamed through Ray Data's `map_batches` with an
actor pool (one model load per actor, GPUs requested when the cluster has them); each
finished shard is saved, so a killed job resumes without recomputing it, and rows are put
back in pool order. Each actor meters its own batches (analytic and FlopCounterMode FLOPs)
and the driver adds them up, so the ledger is the same as a local run's; off the CPU an
actor counts op by op only its first batches, over all its shards. Actors resolve the dtype
the user asked for on their own device and report it; a worker that resolves it otherwise
than the driver (whose dtype the cache key names) stops the pass with the setting to force
(a CPU head without bf16 and GPU workers: CCDS_DTYPE=bf16, not silently fp32). Before
starting, the actors are fitted to the cluster (a CPU stays free for Ray Data's read tasks);
a job that stops making progress stops with what it waits on.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import ray  # here only through a Backend(kind="ray"), whose check named the extra if missing
import torch

from ..data.types import Example
from ..errors import CcdsError
from ..flops import Meter, sampling
from ..io import atomic_path, read_json, write_json
from ..models import Runtime, cache_dir, pick_runtime
from .base import Backend, Pass

log = logging.getLogger(__name__)
STATS = ("analytic_flops", "paper_flops", "measured_flops", "tokens", "padded_tokens")


def ray_reduce(fn: Callable[[Sequence[Example]], object], shards: list, b: Backend) -> list:
    """`fn` of each shard as a Ray task, in order."""
    connect(b.address)
    task = ray.remote(num_cpus=b.cpus_per_actor, max_retries=3)(_apply)
    return ray.get([task.remote(fn, list(s)) for s in shards])


def _apply(fn, examples):
    return fn(examples)


class _Actor:
    """One model per actor; each call scores one batch of rows and meters it."""

    def __init__(self, p: Pass, dtype: str, measure: bool, threads: int):
        torch.set_num_threads(max(1, threads))
        self.runtime = pick_runtime(dtype=dtype)  # "auto" resolves on this worker's device
        self.p, self.measure = p, measure
        # one sample for the actor's life: its first batches, not every shard's
        self.sample = sampling(None)
        p.setup(self.runtime)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        examples = [Example(str(i), str(q), str(r), str(s)) for i, q, r, s in
                    zip(batch["id"], batch["prompt"], batch["response"], batch["source"],
                        strict=True)]
        meter = Meter("shard", "selection", None, self.measure, self.runtime.device,
                      self.sample)
        with meter:
            x = np.asarray(self.p(examples, self.runtime, meter))
        stats = np.zeros((len(examples), len(STATS)))  # the batch's totals ride on row 0
        stats[0] = [getattr(meter.stage, k) or 0.0 for k in STATS]
        return {"row": batch["row"], "x": x, "stats": stats,
                "dtype": np.full(len(examples), self.runtime.dtype_name)}


def _asked(rt: Runtime) -> str:
    """The dtype for workers to resolve: what the user asked for, not what the driver's
    device made of it."""
    return rt.requested or rt.dtype_name


def _one_dtype(seen: set[str], root: Path) -> str | None:
    """The one dtype the pass ran in (None: none reported yet); CcdsError if several: the
    driver and its workers, on different devices, resolved `auto` differently, and their rows
    would mix or be cached under a key that names another dtype."""
    if len(seen) > 1:
        raise CcdsError(f"the driver and its Ray workers resolved the dtype differently "
                        f"({', '.join(sorted(seen))}): their rows would not agree", str(root),
                        "force one, e.g. CCDS_DTYPE=bf16, and delete the shards in this folder")
    return next(iter(seen), None)


def connect(address: str | None) -> None:
    """Join the cluster at `address` (or start Ray here) once per process.

    Ray's own chatter stays off the user's terminal (in /tmp/ray/session_*/logs): Ray Data's
    INFO lines and its notice that progress bars are off, the notice that a new local cluster
    uses token auth, and the C++ driver's ERROR lines, which Ray echoes to stderr (every Ray
    Data actor pool triggers a harmless one about restartable actors). Those take
    RAY_BACKEND_LOG_LEVEL=fatal while Ray starts, so a local cluster's own processes log
    only fatal lines too, and the line in which Ray announces that level is dropped. A
    RAY_BACKEND_LOG_LEVEL the user set is kept, with everything it prints. Errors still reach
    the user as exceptions, and Ray's warnings as lines.
    """
    if not ray.is_initialized():
        logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(
            _quiet)
        ours = "RAY_BACKEND_LOG_LEVEL" not in os.environ
        os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
        try:
            with _stderr_less(b"Set ray log level from environment variable" if ours else None):
                ray.init(address=address, include_dashboard=False, log_to_driver=False,
                         configure_logging=False)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise CcdsError(f"cannot connect to Ray at {address or 'a new local cluster'} "
                            f"({str(e).splitlines()[0]})", None,
                            "check --address (ray status shows it on the head node)") from None
        finally:
            if ours:
                del os.environ["RAY_BACKEND_LOG_LEVEL"]
    ray.data.DataContext.get_current().enable_progress_bars = False
    for h in logging.getLogger("ray.data").handlers:  # the console one; files keep INFO
        if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
            h.setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)


@contextlib.contextmanager
def _stderr_less(drop: bytes | None) -> Iterator[None]:
    """Hold what this process writes to file descriptor 2 in the block (C++ code's lines
    too), then pass it on without the lines containing `drop` (None: do nothing)."""
    if drop is None:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            os.write(2, b"".join(line for line in held if drop not in line))


def _quiet(record: logging.LogRecord) -> bool:
    """Drop Ray's notice that a new local cluster has token auth on (its warning that auth
    is off passes)."""
    return not str(record.msg).startswith("Token authentication is enabled for this Ray")


def _fit_actors(b: Backend, gpus: float) -> int:
    """How many actors to start: `b.concurrency`, or fewer (with a warning) so that a CPU is
    left for Ray Data's read tasks. Without one, the actors start, hold every CPU and wait
    for input that never comes. Counted over the whole cluster's CPUs (and GPUs)."""
    have = ray.cluster_resources()
    fit = int((have.get("CPU", 0) - 1) // b.cpus_per_actor)
    if gpus:
        fit = min(fit, int(have.get("GPU", 0) // gpus))
    if fit < 1:
        raise CcdsError(f"the Ray cluster cannot run one actor ({_ask(b, gpus, 1)}) and keep "
                        f"a CPU for reading the pool: it has {_res(have)}", None,
                        "join a larger cluster (--address) or lower cpus_per_actor")
    if fit < b.concurrency:
        log.warning("ray: running %d of %d actors: the cluster has %s, each actor takes %s "
                    "and Ray Data's read tasks need a CPU", fit, b.concurrency, _res(have),
                    _ask(b, gpus, 1))
    return min(fit, b.concurrency)


def _ask(b: Backend, gpus: float, n: int) -> str:
    return f"{n * b.cpus_per_actor:g} CPU" + (f" + {n * gpus:g} GPU" if gpus else "")


def _res(r: dict) -> str:
    return " + ".join(f"{r.get(k, 0):g} {k}" for k in ("CPU", "GPU") if k == "CPU" or r.get(k))


def _batches(ds, stall_s: float, waiting: Callable[[], str]) -> Iterator[dict]:
    """`ds`'s batches as they come; CcdsError if none comes for `stall_s` seconds, saying
    what the job waits on (`waiting`). However the loop ends early, `ds`'s execution is
    stopped, so its actors stop holding the cluster."""
    got: queue.Queue = queue.Queue()
    end = object()

    def pull():
        try:
            for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
                got.put(batch)
            got.put(end)
        except BaseException as e:  # noqa: BLE001 (raised in the caller's thread)
            got.put(e)

    puller = threading.Thread(target=pull, daemon=True, name="ccds-ray-batches")
    puller.start()
    finished = False
    try:
        while True:
            try:
                item = got.get(timeout=stall_s)
            except queue.Empty:
                raise CcdsError(f"Ray made no progress for {stall_s:g} s: {waiting()}", None,
                                "free or add resources (ray status), lower --concurrency, "
                                "or raise Backend.stall_s if one shard takes longer"
                                ) from None
            if item is end:
                finished = True
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        if not finished:
            _stop(ds)
            puller.join(timeout=30)


def _stop(ds) -> None:
    """Shut down `ds`'s running execution and its actors. Ray Data has no public call for
    this (its iterator stops it only when closed, and a blocked iterator cannot be closed
    from another thread), but its executor is a thread that carries the dataset's id."""
    for t in threading.enumerate():
        if getattr(t, "_dataset_id", None) == ds.get_dataset_id() and hasattr(t, "shutdown"):
            t.shutdown(force=True)


def ray_map(p: Pass, pool: Sequence[Example], ctx, meter: Meter, key: str,
             desc: str | None) -> np.ndarray:
    from ..io import bar

    b: Backend = ctx.backend
    root = (b.work or cache_dir() / "ray") / f"{key}-{b.shard_size}"
    root.mkdir(parents=True, exist_ok=True)
    bounds = [(lo, min(lo + b.shard_size, len(pool))) for lo in range(0, len(pool), b.shard_size)]
    out = [root / f"out-{i:05d}.npy" for i in range(len(bounds))]
    todo = [i for i in range(len(bounds)) if not out[i].exists()]
    # the dtype the cache key names (the driver's), then shards saved before a restart: workers
    # that resolve `auto` to another would file their rows under the wrong key
    dtypes = {ctx.runtime.dtype_name} | {
        d for i in range(len(bounds)) if i not in todo
        if (d := read_json(out[i].with_suffix(".json")).get("dtype"))}
    _one_dtype(dtypes, root)
    progress = bar(len(pool), desc if ctx.progress else None, unit="ex")
    progress.update(sum(hi - lo for i, (lo, hi) in enumerate(bounds) if i not in todo))
    if todo:
        connect(b.address)
        files = [_write_shard(root / f"in-{i:05d}.parquet", pool, *bounds[i]) for i in todo]
        gpus = b.gpus_per_actor
        if gpus is None:
            gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
        actors = _fit_actors(b, gpus)
        ds = ray.data.read_parquet(  # a block per shard, so every actor gets work
            [str(f) for f in files]).repartition(len(files)).map_batches(
            _Actor, fn_constructor_args=(p, _asked(ctx.runtime), ctx.measure_flops,
                                         int(b.cpus_per_actor)),
            batch_size=b.shard_size, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_cpus=b.cpus_per_actor, num_gpus=gpus)  # Ray Data spreads actors by default

        def waiting() -> str:
            done = sum(out[i].exists() for i in todo)
            return (f"{actors} actors of {_ask(b, gpus, 1)} each, {done} of {len(todo)} "
                    f"shards done; the cluster has {_res(ray.cluster_resources())}, "
                    f"{_res(ray.available_resources())} free")

        pending: dict[int, list] = {}  # shard -> [rows, which arrived, metered work]
        for got in _batches(ds, b.stall_s, waiting):
            dtypes.update(str(d) for d in np.unique(got["dtype"]))
            dtype = _one_dtype(dtypes, root)  # before a shard of another dtype is saved
            shard = got["row"] // b.shard_size
            for i in np.unique(shard):
                lo, hi = bounds[i]
                buf = pending.setdefault(int(i), [None, np.zeros(hi - lo, bool),
                                                 np.zeros(len(STATS))])
                take = shard == i
                x = got["x"][take]
                if buf[0] is None:
                    buf[0] = np.zeros((hi - lo, *x.shape[1:]), x.dtype)
                buf[0][got["row"][take] - lo] = x
                buf[1][got["row"][take] - lo] = True
                buf[2] += got["stats"][take].sum(0)
                progress.update(int(take.sum()))
                if buf[1].all():  # shard complete: save it (rows last: they mark it done)
                    write_json(out[i].with_suffix(".json"),
                               {**dict(zip(STATS, buf[2].tolist(), strict=True)),
                                "dtype": dtype})
                    with atomic_path(out[i]) as tmp, open(tmp, "wb") as f:
                        np.save(f, buf[0])
                    del pending[int(i)]
        if pending:
            raise RuntimeError(f"Ray returned incomplete shards {sorted(pending)}")
        for f in files:  # only now: a lost block may be rebuilt from its file until the end
            f.unlink(missing_ok=True)
    progress.close()
    for i in range(len(bounds)):
        s = read_json(out[i].with_suffix(".json"))
        meter.merge(**{k: s[k] for k in STATS}, reused=i not in todo)
    meter.stage.detail["backend"] = {"kind": "ray", "shards": len(bounds),
                                     "resumed": len(bounds) - len(todo),
                                     "dtype": _one_dtype(dtypes, root)}
    return np.concatenate([np.load(f) for f in out])


def _write_shard(path: Path, pool: Sequence[Example], lo: int, hi: int) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not path.exists():
        rows = pool[lo:hi]
        table = pa.table({"row": np.arange(lo, hi, dtype=np.int64),
                          "id": [e.id for e in rows], "prompt": [e.prompt for e in rows],
                          "response": [e.response for e in rows],
                          "source": [e.source for e in rows]})
        with atomic_path(path) as tmp:
            pq.write_table(table, tmp)
    return path
