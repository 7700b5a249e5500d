"""The one interface every selection method implements, its registry, and the score cache.

A method turns (pool, target) into one score per pool example — higher means "select
first" — and can price that work before doing it (`cost`), so a planner can compare methods
without running them. `run` does the bookkeeping once for all methods: cache lookup keyed by
content hashes, the FLOPs/time/memory meter, and an atomic write of the scores.

The part of a method that grows with the pool is a `Pass`: a small picklable object that
loads its model once per process (`setup`) and maps examples to rows. `backend.map_pool`
runs it where `Context.backend` says (here, or on Ray); nothing in this module knows which.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..data.types import Example, Target
from ..errors import CcdsError, require
from ..flops import Ledger, Meter, Stage
from ..models import Runtime, cache_dir, pick_runtime

REGISTRY: dict[str, type[Method]] = {}
Reduce = Literal["mean", "max"]  # how per-subtask scores combine (`aggregate_subtasks`)


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # how to run, not what to compute: left out of the cache key
    execution: ClassVar[frozenset[str]] = frozenset()
    seed: int = Field(0, ge=0)


class Backend(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["local", "ray"] = "local"
    chunk: int = Field(4096, ge=1, description="local: pool rows tokenized and scored at a "
                       "time, so memory does not grow with the pool")
    address: str | None = Field(None, description="Ray address ('auto', 'host:port', "
                                "'ray://host:10001'); none starts Ray on this machine")
    shard_size: int = Field(1024, ge=1, description="pool rows per shard: the unit of "
                            "resume and of one actor call")
    concurrency: int = Field(1, ge=1, description="actors, each with its own model loaded; "
                             "fewer (with a warning) if the cluster cannot also spare a CPU "
                             "for Ray Data's read tasks")
    cpus_per_actor: float = Field(1, gt=0, description="also its torch threads")
    gpus_per_actor: float | None = Field(None, ge=0,
                                         description="none: 1 when the cluster has GPUs")
    work: Path | None = Field(None, description="shard files; shared storage on a multi-node "
                              "cluster (default: the ccds cache)")
    stall_s: float = Field(1800, gt=0, description="give up when no shard has come back for "
                           "this long (actors waiting for resources wait forever); more than "
                           "a model load plus one shard's scoring")

    @model_validator(mode="after")
    def _installed(self) -> Backend:
        """Ray asked for but not installed fails here, where the setting is read, naming the
        extra: not after a pool and a model have loaded, and not as a traceback."""
        if self.kind == "ray" and importlib.util.find_spec("ray") is None:
            require("ray.data", "dist", "the ray backend")  # raises, naming the extra
        return self


@dataclass
class Context:
    """What a method may use while scoring: where to compute and how to report progress."""

    runtime: Runtime = field(default_factory=pick_runtime)
    measure_flops: bool = True
    progress: bool = True
    backend: Backend = field(default_factory=Backend)  # where per-example passes run


class Method(ABC):
    """Score a pool against a target. Subclasses set `name`, `Params`, `cost`, `score`."""

    name: ClassVar[str]
    needs_target: bool = True  # a property where the parameters decide it (ppl, cascade)
    Params: ClassVar[type[Params]] = Params

    def __init__(self, **params):
        try:
            self.params = self.Params(**params)
        except ValidationError as e:
            err = e.errors()[0]
            raise CcdsError(f"bad parameter {'.'.join(map(str, err['loc']))} for method "
                            f"'{self.name}': {err['msg'].removeprefix('Value error, ')}"
                            ) from None

    def __init_subclass__(cls, **kw):
        """Register by `name`. A second class under a taken name would silently replace the
        first, so it is an error; the same class defined again (a module reload) replaces it."""
        super().__init_subclass__(**kw)
        if "name" not in cls.__dict__:
            return
        old = REGISTRY.get(cls.name)
        if old is not None and (old.__module__, old.__qualname__) != (cls.__module__,
                                                                      cls.__qualname__):
            raise TypeError(f"selection method name '{cls.name}' is taken by "
                            f"{old.__module__}.{old.__qualname__}; give "
                            f"{cls.__module__}.{cls.__qualname__} another name")
        REGISTRY[cls.name] = cls

    @abstractmethod
    def cost(self, pool: Sequence[Example], target: Target | None) -> float:
        """Analytic FLOPs of scoring this pool for this target (ccds convention)."""

    @abstractmethod
    def score(self, pool: Sequence[Example], target: Target | None, ctx: Context,
              meter: Meter) -> np.ndarray:
        """One float per pool example, higher = select first. Report work to `meter`."""

    def fingerprint(self) -> str:
        """Identity of the scorer beyond its parameters (e.g. a model's content hash)."""
        return ""

    def check_installed(self) -> None:
        """Raise `errors.require`'s line if an optional library this method needs is missing.
        `run` calls it first: the cache key alone may load a model, and scoring may train one."""
        return None  # most methods need nothing beyond ccds's own dependencies

    #: "given": train on the subset in the order `train_order` returns (a curriculum)
    order = "shuffle"

    def train_order(self, pool: Sequence[Example], subset: np.ndarray, ctx: Context
                    ) -> np.ndarray:
        """The selected indices in the order training should see them (if order="given")."""
        return subset

    def key(self, pool: Sequence[Example], target: Target | None,
            ctx: Context | None = None) -> str:
        """What the scores depend on; a model-based scorer's include the dtype it ran in
        (bf16 and fp32 scores differ in their last digits, and `auto` differs by machine)."""
        h = hashlib.sha256()
        p = self.params.model_dump_json(exclude=set(self.params.execution))
        model = self.fingerprint()
        if model and ctx is not None:
            model += f"/{ctx.runtime.dtype_name}"
        for part in (self.name, p, model,
                     examples_hash(pool), target_hash(target) if self.needs_target else ""):
            h.update(part.encode())
            h.update(b"\0")
        return h.hexdigest()[:20]


class Pass(ABC):
    """A per-example computation that can run in another process."""

    def setup(self, runtime: Runtime) -> None:  # noqa: B027 (most passes load a model)
        """Load what the pass needs (once per process)."""

    @abstractmethod
    def __call__(self, examples: Sequence[Example], runtime: Runtime, meter: Meter,
                 progress: str | None = None) -> np.ndarray:
        """[len(examples), ...] float rows, in the order given; report work to `meter`."""


class ModelPass(Pass):
    """A pass over a causal LM that may already be loaded (and trained) in this process.

    Locally the live model is used as it is. Pickled for another process, the pass carries
    its loader and the trained weights as safetensors bytes (LoRA adapter, or every weight),
    never the module, and `setup` rebuilds the model there: `load(runtime=...)` returns
    (model, tokenizer) loaded straight onto that runtime (e.g. `partial(causal_lm, name)`).
    """

    def __init__(self, load: Callable[[Runtime], tuple[Any, Any]], model=None, tok=None, *,
                 lora: bool = False):
        self.load, self.model, self.tok, self.lora = load, model, tok, lora
        self.weights: bytes | None = None

    def __getstate__(self) -> dict:
        d = dict(self.__dict__)
        if self.model is not None:
            d["weights"] = _weights_bytes(self.model, self.lora)
        d["model"] = d["tok"] = None
        return d

    def setup(self, runtime: Runtime) -> None:
        if self.model is None:
            self.model, self.tok = self.load(runtime=runtime)
            if self.weights is not None:
                from safetensors.torch import load

                apply_weights(self.model, load(self.weights), self.lora)
        runtime.place(self.model)


def apply_weights(model, state: dict[str, torch.Tensor], lora: bool) -> None:
    """Put a LoRA adapter (into a PEFT model) or every trained weight into `model`."""
    if lora:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, state)
        return
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:  # a tied head is not saved
        raise RuntimeError("the weights do not match the model")


def _weights_bytes(model, lora: bool) -> bytes:
    from safetensors.torch import save

    if lora:
        from peft import get_peft_model_state_dict

        state = get_peft_model_state_dict(model)
    else:
        state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"
                 or not model.config.tie_word_embeddings}
    return save({k: v.detach().cpu().contiguous() for k, v in state.items()})


def aggregate_subtasks(per_subtask: np.ndarray, reduce: Reduce) -> np.ndarray:
    """Combine [examples, subtasks] scores (each column already a mean over that subtask's
    V examples) into one score per example."""
    if reduce == "max":
        return per_subtask.max(axis=1)
    if reduce == "mean":
        return per_subtask.mean(axis=1)
    raise CcdsError(f"unknown subtask reduction '{reduce}'", None, "use mean or max")


def get_method(name: str, **params) -> Method:
    if name not in REGISTRY:
        raise CcdsError(f"unknown selection method '{name}'", None,
                        f"choose one of: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name](**params)


@dataclass
class Scores:
    method: str
    values: np.ndarray  # float64, one per pool example, in pool order
    ids: list[str]
    stage: Stage
    cached: bool = False


def run(method: Method, pool: Sequence[Example], target: Target | None = None, *,
        ctx: Context | None = None, ledger: Ledger | None = None,
        cache: Path | str | None = "default") -> Scores:
    """Score with caching: the same pool, target, method, params and model reuse one file."""
    if method.needs_target and target is None:
        raise CcdsError(f"method '{method.name}' needs a target", None, "pass --target")
    if not pool:
        raise CcdsError("the pool is empty", None, "give a pool with at least one example")
    method.check_installed()
    ctx = ctx or Context()
    path = None
    if cache is not None:
        root = cache_dir() / "scores" if cache == "default" else Path(cache)
        path = root / f"{method.name}-{method.key(pool, target, ctx)}.parquet"
        if path.exists():
            got = read_scores(path)
            if got is not None and got.ids == [e.id for e in pool]:
                got.cached = True
                if ledger is not None:
                    ledger.add(got.stage)
                return got
    meter = Meter(f"select {method.name}", "selection", None, ctx.measure_flops,
                  ctx.runtime.device)
    with meter:
        values = np.asarray(method.score(pool, target, ctx, meter), dtype=np.float64)
    if values.shape != (len(pool),):
        raise RuntimeError(f"{method.name} returned {values.shape} scores for {len(pool)}")
    if np.isnan(values).any():
        raise CcdsError(f"method '{method.name}' produced NaN scores for "
                        f"{int(np.isnan(values).sum())} examples", None,
                        "check those examples for empty text")
    meter.stage.detail.update({"params": method.params.model_dump(), "pool": len(pool),
                               "target": target.name if target else None})
    scores = Scores(method.name, values, [e.id for e in pool], meter.stage)
    if path is not None:
        write_scores(path, scores)
    if ledger is not None:
        ledger.add(meter.stage)
    return scores


def write_scores(path: Path | str, s: Scores) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ..io import atomic_path

    table = pa.table({"id": s.ids, "score": s.values})
    meta = {b"ccds": json.dumps({"method": s.method, "stage": s.stage.to_dict()}).encode()}
    table = table.replace_schema_metadata(meta)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def read_scores(path: Path | str) -> Scores | None:
    """Read a scores file; None when it is unreadable (a cache file is never trusted blindly)."""
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
        meta = json.loads(table.schema.metadata[b"ccds"])
        ids = table.column("id").to_pylist()
        values = table.column("score").to_numpy().astype(np.float64)
    except Exception:
        return None
    return Scores(meta["method"], values, ids, Stage(**meta["stage"]))


def scores_for(path: Path | str, pool: Sequence[Example], method: str | None = None) -> Scores:
    """The scores file at `path`, checked against the pool it will select from (and the
    method the user named, if any): a scores file from another pool, method or a broken run
    is a CcdsError, not a silent mis-selection."""
    path = Path(path)
    sc = read_scores(path)
    if sc is None:
        raise CcdsError("not a scores file from `ccds score`" if path.is_file() else
                        "no such scores file", str(path), "give the .parquet that ccds "
                                                          "score wrote")
    if method not in (None, sc.method):
        raise CcdsError(f"these are {sc.method} scores, not {method}", str(path),
                        "drop --method or score with it")
    if sc.ids != [e.id for e in pool]:
        raise CcdsError("scores file does not match the pool (ids differ)", str(path),
                        "re-run ccds score on this pool")
    if np.isnan(sc.values).any():
        raise CcdsError(f"{int(np.isnan(sc.values).sum())} NaN scores", str(path),
                        "re-score the pool; check those examples for empty text")
    return sc


def selection_costs(names: Sequence[str], pool: Sequence[Example], target: Target | None
                    ) -> dict[str, float | None]:
    """Analytic FLOPs of each method (default parameters) on `pool`, before running it;
    None for a method that needs a target when none is given."""
    out: dict[str, float | None] = {}
    for name in names:
        m = get_method(name)
        out[name] = None if m.needs_target and target is None else m.cost(pool, target)
    return out


def examples_hash(examples: Sequence[Example]) -> str:
    h = hashlib.sha256()
    for e in examples:
        for part in (e.id, e.prompt, e.response, e.source):
            h.update(part.encode("utf-8", "surrogatepass"))
            h.update(b"\x1f")
        h.update(b"\x1e")
    return h.hexdigest()


def target_hash(target: Target | None) -> str:
    if target is None:
        return ""
    return hashlib.sha256((target.name + examples_hash(target.val)).encode()).hexdigest()


def selection_record(scores: Scores, pool: Sequence[Example], idx: Sequence[int] | np.ndarray,
                     method: Method | None = None, /, **extra: Any) -> dict[str, Any]:
    """The sidecar `data.formats.write_subset` writes beside a subset of `pool` (the examples
    at `idx`, in that order), so the subset can be checked against its pool and reproduced:
    the method and its parameters (None for scores another program wrote), the pool's
    content hash and size, what scoring cost (`selection_flops`, and in the paper's convention:
    `ccds analyze` charges it to runs trained on the subset elsewhere), each selected
    example's score (None where not finite: the file is strict JSON), and whatever else the
    caller adds (`extra`: the pool's path, budget, target)."""
    values = scores.values[np.asarray(idx, dtype=np.int64)]
    return {"method": scores.method,
            "params": None if method is None else method.params.model_dump(mode="json"),
            "pool_hash": examples_hash(pool), "pool_size": len(pool),
            "selection_flops": scores.stage.analytic_flops,
            "selection_paper_flops": scores.stage.paper_flops, **extra,
            "scores": [float(v) if np.isfinite(v) else None for v in values]}
