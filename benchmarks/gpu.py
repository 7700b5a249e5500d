"""ccds's passes at real model sizes on one GPU: loss scoring, LESS features and LoRA
training on random-init Llama-3.2-1B and Llama-3.1-8B (issue 22).

Prepared to run once, unattended, on a machine with no network and no weights: the models
are built from their published transformers configs (written below) in bf16 on the device,
the data are random token ids with a realistic length distribution, and every stage calls
ccds's own code (`lm.score_sequences`, the pass under `SequenceStats`; `LESS.features`, the
per-example gradients, Adam direction and projection to k = 8192 under `PoolGradients`;
`train.train`). Per model and stage: tokens/s, examples/s, MFU (ccds's analytic FLOPs of the
real tokens, `ccds.flops`, over the wall time and the bf16 matmul peak measured in the same
run) and peak memory (the CUDA allocator's). Each stage runs cold once, then on about two
batches to calibrate, then on as many examples as fill `--seconds`. Every loss (training),
NLL (scoring) and feature (LESS) is checked finite: a NaN or infinity fails its stage. A
failing stage is recorded with its one-line error and the others still run; a global time
budget stops the run cleanly, and the results are rewritten after every stage, so a run cut
short keeps what it measured.

    python benchmarks/gpu.py            # one GPU, within 8 minutes -> results/gpu.json, .md
    python benchmarks/gpu.py --smoke    # the same code on a tiny config on the CPU
                                        #   -> results/gpu-smoke.json, .md

It needs no ccds install: it imports ccds from this checkout's `src/`. Beyond torch,
transformers (>= 5.0), peft and accelerate, ccds needs pydantic and its dependencies
(`WHEELS`); where they are missing the script says so, names the wheels and exits 2. On the
device machine, which has no pydantic and no network (issue 31):

    benchmarks/gpu_run.sh wheels        # here, where pip reaches an index: the wheels -> .whl/
    bash benchmarks/gpu_run.sh          # there, with .whl carried: installs them into
                                        #   /tmp/site, runs this script, results -> $OUT
"""

from __future__ import annotations

import time

T0 = time.perf_counter()  # the budget counts the imports too

import argparse  # noqa: E402
import copy  # noqa: E402
import gc  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
from collections.abc import Callable  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from datetime import datetime, timezone  # noqa: E402
from pathlib import Path  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# ccds from the checkout this script is in, installed or not (an editable install already
# puts this very folder on the path)
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))
if str(HERE) not in sys.path:  # `peak`, beside this script (absent under `python -I`)
    sys.path.append(str(HERE))

# What ccds imports on this script's path beyond torch, transformers, peft and accelerate
# (and what those need): the device image lacks all but typing-extensions, carried too since
# pydantic needs a recent one. gguf and datasets are imported only where ccds reads .gguf
# files or datasets, never here.
WHEELS = ("pydantic", "pydantic-core", "annotated-types", "typing-inspection",
          "typing-extensions")
INSTALL = ("python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir "
           "--upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site")


def _norm(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def pinned(names: tuple[str, ...] = WHEELS) -> list[str]:
    """`name==version` as constraints.txt pins each (the versions ccds is tested with)."""
    try:
        lines = (ROOT / "constraints.txt").read_text().splitlines()
    except OSError:
        lines = []
    pins = {_norm(n): v.strip() for n, _, v in (line.partition("==") for line in lines)
            if v and not n.startswith("#")}
    return [f"{n}=={pins[_norm(n)]}" if _norm(n) in pins else n for n in names]


def download_command() -> str:
    """`pip download` of the wheels for this machine's Python and processor, as the device
    tool's README gives it (manylinux tags matched one by one)."""
    arch = platform.machine() or "x86_64"
    tags = " ".join(f"--platform {t}_{arch}" for t in (
        "manylinux_2_28", "manylinux_2_27", "manylinux_2_17", "manylinux2014", "manylinux1"))
    return (f"python3 -m pip download --no-deps --only-binary=:all: --python-version "
            f"{sys.version_info[0]}.{sys.version_info[1]} --implementation cp {tags} -d .whl "
            + " ".join(pinned()))


def missing_wheels() -> str | None:
    """None where ccds's imports beyond torch, transformers, peft and accelerate work here;
    else why not, in one line."""
    import importlib
    from importlib import metadata

    try:
        for name in WHEELS:
            importlib.import_module(name.replace("-", "_"))
        from pydantic import BaseModel  # noqa: F401 - what ccds imports
    except Exception as e:  # noqa: BLE001 - an old typing-extensions fails otherwise
        return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"
    try:  # pydantic's own pins (pydantic-core exactly, typing-extensions at least)
        from packaging.requirements import Requirement

        for line in metadata.requires("pydantic") or []:
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            have = metadata.version(req.name)
            if not req.specifier.contains(have, prereleases=True):
                return f"pydantic {metadata.version('pydantic')} needs {req}, found {have}"
    except (ImportError, metadata.PackageNotFoundError):
        pass  # no metadata to compare: the imports above worked
    return None


def wheels_message(why: str) -> str:
    return (f"gpu.py: ccds needs {', '.join(WHEELS)} beyond torch, transformers, peft and "
            f"accelerate, and this Python cannot use them ({why}). Carry these wheels: "
            f"{' '.join(pinned())}\n"
            "  1. where pip reaches an index, in the repository's root (or run "
            "`benchmarks/gpu_run.sh wheels` there):\n"
            f"     echo /.whl/ >> .git/info/exclude; {download_command()}\n"
            "  2. carry .whl to this machine (the device tool: carry [\".whl\"]) and, before "
            "this script, run (or run `bash benchmarks/gpu_run.sh`, which does both):\n"
            f"     {INSTALL}")


if _why := missing_wheels():
    if __name__ == "__main__":
        print(wheels_message(_why), file=sys.stderr)
        sys.exit(2)
    raise ImportError(wheels_message(_why))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from ccds.data.types import Example  # noqa: E402
from ccds.flops import (  # noqa: E402
    DEVICE_PEAK_FLOPS,
    SAMPLED_BATCHES,
    Meter,
    Stage,
    device_of,
)
from ccds.io import write_json, write_text  # noqa: E402
from ccds.lm import score_sequences  # noqa: E402
from ccds.models import Runtime, add_lora, batch_budget, param_counts  # noqa: E402
from ccds.score.less import LESS, RademacherProjection, lora_names  # noqa: E402
from ccds.score.ppl import PPLParams  # noqa: E402
from ccds.tokenize import Encoded  # noqa: E402
from ccds.train import TrainConfig, train  # noqa: E402

PAD, BOS, EOS = 0, 1, 2  # the id tokenizer's special tokens; data ids start after them

# rope_theta inside rope_parameters, as transformers 5 keeps it (top-level rope_theta and
# rope_scaling are deprecated there)
_LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
_LLAMA3 = {"vocab_size": 128256, "num_attention_heads": 32, "num_key_value_heads": 8,
           "max_position_embeddings": 131072, "rms_norm_eps": 1e-5}
# The published config.json of each model (sizes only matter for speed; weights are random).
CONFIGS: dict[str, dict] = {
    "llama-3.2-1b": {**_LLAMA3, "hidden_size": 2048, "intermediate_size": 8192,
                     "num_hidden_layers": 16, "head_dim": 64, "tie_word_embeddings": True,
                     "rope_parameters": {**_LLAMA3_ROPE, "factor": 32.0}},
    "llama-3.1-8b": {**_LLAMA3, "hidden_size": 4096, "intermediate_size": 14336,
                     "num_hidden_layers": 32, "head_dim": 128, "tie_word_embeddings": False,
                     "rope_parameters": {**_LLAMA3_ROPE, "factor": 8.0}},
    "tiny": {"vocab_size": 1024, "hidden_size": 64, "intermediate_size": 128,
             "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
             "max_position_embeddings": 1024, "tie_word_embeddings": True},
}
STAGES = ("score", "score_metered", "train", "less")
# (stage, metric, at least / at most, bound): issue 22's targets, at the largest model
TARGETS = [("score", "mfu", ">=", 0.50), ("train", "mfu", ">=", 0.45),
           ("less", "mfu", ">=", 0.35), ("less", "projection_share", "<=", 0.15),
           ("less", "peak_mem_gb", "<=", 80.0), ("train", "peak_mem_gb", "<=", 80.0)]
MAX_LEN = 512  # ccds's default for training, LESS and scoring


class StageTimeout(Exception):
    pass


class NotFinite(ValueError):
    """A stage gave a NaN or an infinity: its figures would time meaningless work."""


def check_finite(what: str, values) -> int:
    """Every number in `values` (an array, a tensor, a list of numbers, a dict of them) is
    finite, or NotFinite says how many are not and where the first is; returns how many."""
    if isinstance(values, dict):
        return sum(check_finite(f"{what} {k}", v) for k, v in values.items())
    if torch.is_tensor(values):
        a = values.detach().float().cpu().numpy()
    elif isinstance(values, (list, tuple)):
        a = np.asarray([float(v) for v in values], dtype=np.float64)
    else:
        a = np.asarray(values)
    bad = np.flatnonzero(~np.isfinite(a))
    if bad.size:
        i = int(bad[0])
        at = i if a.ndim <= 1 else tuple(int(j) for j in np.unravel_index(i, a.shape))
        raise NotFinite(f"{what}: {bad.size:,} of {a.size:,} not finite (first at {at}: "
                        f"{a.flat[i]})")
    return int(a.size)


@contextmanager
def time_limit(seconds: float):
    """Raise StageTimeout in this (main) thread after `seconds`; a stage stuck in a Python
    loop (the projection's chunks, a training step) stops between two ops."""
    def fire(signum, frame):
        raise StageTimeout(f"stopped after {seconds:.3g} s (time budget)")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def one_line(e: BaseException) -> str:
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first}"[:300]


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# -- data ---------------------------------------------------------------------------------

def id_tokenizer(vocab: int):
    """A tokenizer whose words are token ids ("17 4093 ..."), so ccds's `encode` (which
    `train` calls) gives back exactly the ids generated here, with no tokenizer files."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": PAD, "<s>": BOS, "</s>": EOS} | {str(i): i for i in range(3, vocab)}
    tk = Tokenizer(models.WordLevel(words, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>")


def synthetic(n: int, vocab: int, seed: int = 0) -> Encoded:
    """Instruction-tuning-like sequences: lengths lognormal around 256 tokens, cut to
    MAX_LEN; a response of 20-80% of each, closed by the end-of-turn token (trained, not
    scored), as `encode` lays them out."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(256), 0.6, n), 32, MAX_LEN).astype(np.int64)
    resp = np.clip((lengths * rng.uniform(0.2, 0.8, n)).astype(np.int64), 1, lengths - 2)
    ids = [np.append(rng.integers(3, vocab, int(k) - 1), EOS).astype(np.int32)
           for k in lengths]
    return Encoded(ids, lengths - resp - 1, np.ones(n, dtype=np.int64))


def subset(enc: Encoded, lo: int, hi: int) -> Encoded:
    return Encoded(enc.ids[lo:hi], enc.n_prompt[lo:hi], enc.n_suffix[lo:hi])


def as_examples(enc: Encoded) -> list[Example]:
    """The same sequences as text for `id_tokenizer` (training takes examples)."""
    out = []
    for i, (ids, p) in enumerate(zip(enc.ids, enc.n_prompt, strict=True)):
        out.append(Example(f"x{i}", " ".join(map(str, ids[:p])),
                           " ".join(map(str, ids[p:-1]))))
    return out


# -- the peak -----------------------------------------------------------------------------

def matmul_peak(device: torch.device, sizes: tuple[int, ...], seconds: float) -> dict:
    """Best bf16 FLOP/s of an n×n @ n×n over repeated, synchronised timings: the MFU
    denominator, measured on this device in this run."""
    best, best_n = 0.0, 0
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
        a @ b  # builds the kernel
        sync()
        end = time.perf_counter() + seconds / len(sizes)
        reps = 1
        while time.perf_counter() < end:
            t = time.perf_counter()
            for _ in range(reps):
                a @ b
            sync()
            dt = time.perf_counter() - t
            if 2 * n ** 3 * reps / dt > best:
                best, best_n = 2 * n ** 3 * reps / dt, n
            reps = min(reps * 2, 16) if dt < 0.05 else reps
        del a, b
    free_memory()
    return {"measured": best, "n": best_n, "dtype": "bf16"}


# -- the stages ---------------------------------------------------------------------------

def timed_calls(obj):
    """`obj` with its __call__ timed (synchronised) into `obj.call_s`, `obj.calls`: how long
    LESS spends projecting, whatever else it does around it."""
    base = type(obj)

    def __call__(self, *a, **k):
        sync()
        t = time.perf_counter()
        out = base.__call__(self, *a, **k)
        sync()
        self.call_s += time.perf_counter() - t
        self.calls += 1
        return out

    obj.__class__ = type(f"Timed{base.__name__}", (base,), {"__call__": __call__})
    obj.call_s, obj.calls = 0.0, 0
    return obj


def llama_config(name: str):
    """The transformers config of CONFIGS[name], with the id tokenizer's special tokens (a
    copy: transformers fills rope_parameters in place)."""
    from transformers import LlamaConfig

    return LlamaConfig(**copy.deepcopy(CONFIGS[name]), pad_token_id=PAD, bos_token_id=BOS,
                       eos_token_id=EOS)


class Bench:
    """One model on one device: the stages, each a function of a slice of the data."""

    def __init__(self, name: str, args, rt: Runtime, data: Encoded, tok):
        from transformers import AutoModelForCausalLM

        self.name, self.args, self.rt, self.data, self.tok = name, args, rt, data, tok
        torch.manual_seed(0)
        with torch.device(rt.device):
            model = AutoModelForCausalLM.from_config(llama_config(name), dtype=torch.bfloat16,
                                                     attn_implementation="sdpa")
        self.model = model.eval().requires_grad_(False)  # frozen, as load_causal_lm leaves it
        self.counts = param_counts(self.model)
        self.lora_model = None  # the model with the adapters of the stage that runs
        self.less = LESS(proj_dim=args.proj_dim)
        self.proj = None

    def meter(self, name: str, model, measure: bool = False) -> Meter:
        return Meter(name, "selection", param_counts(model), measure, self.rt.device)

    def score(self, enc: Encoded, measure: bool = False) -> Stage:
        m = self.meter("score", self.model, measure)
        with m:
            out = score_sequences(self.model, enc, PAD, self.rt, max_tokens=self.score_tokens,
                                  meter=m)
            sync()
        check_finite("scoring", out)  # the NLLs (and the probabilities)
        return m.stage

    @property
    def score_tokens(self) -> int:
        # what `ccds score --method ppl` batches by: from free memory unless set
        return PPLParams().batch_tokens or batch_budget(self.model, self.rt)

    def score_metered(self, enc: Encoded) -> Stage:
        """Scoring metered as ccds meters by default (op by op on a stage's first
        SAMPLED_BATCHES batches, then not at all): its cost on this device."""
        return self.score(enc, measure=True)

    def prepare(self, stage: str) -> None:
        """The adapters a stage runs with: training's (TrainConfig's LoRA), or LESS's
        warmup LoRA with moments as a checkpoint would hold them."""
        if stage == "train" and self.lora_model is None:
            # added here, not by train(), so a failed stage can still take them off
            self.lora_model = add_lora(self.model, self.train_config())
        if stage == "less" and self.proj is None:
            base = self.lora_model.unload() if self.lora_model is not None else self.model
            self.lora_model = add_lora(base, self.less.warmup_config())
            self.rt.place(self.lora_model)
            self.names = lora_names(self.lora_model)
            params = dict(self.lora_model.named_parameters())
            torch.manual_seed(0)
            self.moments = {n: (torch.randn_like(params[n]) * 1e-3,
                                torch.rand_like(params[n]) * 1e-6) for n in self.names}
            self.proj = timed_calls(RademacherProjection(
                param_counts(self.lora_model)["lora"], self.less.params.proj_dim,
                self.less.params.seed))

    def train_config(self) -> TrainConfig:
        return TrainConfig(measure_flops=False, max_len=MAX_LEN, seed=0)

    def train(self, enc: Encoded) -> Stage:
        res = train(as_examples(enc), self.train_config(), model=self.lora_model,
                    tokenizer=self.tok, runtime=self.rt, progress=None)
        sync()
        assert res.stage is not None
        if not check_finite("training losses", res.losses):
            raise RuntimeError("train() reported no losses")
        return res.stage

    def less_features(self, enc: Encoded) -> Stage:
        """Per-example LoRA gradients at a checkpoint, Adam-shaped with its moments and
        projected to k dimensions: the pool pass of LESS."""
        proj_s, calls = self.proj.call_s, self.proj.calls
        m = self.meter("less", self.lora_model)
        with m:
            features = self.less.features(self.lora_model, enc, self.tok, self.names,
                                          self.proj, self.moments, self.rt, m)
            sync()
        check_finite("LESS features", features)
        m.stage.detail |= {"projection_s": self.proj.call_s - proj_s,
                          "projection_calls": self.proj.calls - calls,
                          "lora_params": param_counts(self.lora_model)["lora"]}
        return m.stage

    def batch_tokens(self, stage: str) -> int:
        """What each pass batches by in ccds, for this model on this device."""
        if stage.startswith("score"):
            return self.score_tokens
        if stage == "train":  # a micro-batch, cut to fit free memory as train() cuts it
            return min(self.train_config().batch_tokens,
                       batch_budget(self.lora_model, self.rt, backward=True))
        return self.less.batch_tokens(self.rt, self.lora_model)


def take(enc: Encoded, start: int, tokens: float) -> tuple[int, int]:
    """[start, end) of the examples from `start` that hold about `tokens` tokens."""
    cum = np.cumsum(enc.lengths[start:])
    end = start + max(1, int(np.searchsorted(cum, tokens)) + 1)
    return start, min(end, len(enc))


def run_stage(bench: Bench, stage: str, seconds: float, peak: float, device_peak: float | None,
              held: int = 0) -> dict:
    """Cold run, calibration on about two batches, then the timed run sized to `seconds`.
    `held`: bytes of ballast the run holds, left out of the peak memory."""
    fn: Callable[[Encoded], Stage] = {"score": bench.score, "score_metered": bench.score_metered,
                                      "train": bench.train, "less": bench.less_features}[stage]
    bench.prepare(stage)
    data, bt = bench.data, bench.batch_tokens(stage)
    lo, hi = take(data, 0, bt)
    fn(subset(data, lo, hi))  # cold: kernels chosen, allocator warmed
    lo, hi = take(data, hi if hi < len(data) else 0, 2 * bt)
    cal = fn(subset(data, lo, hi))
    n_cal, rate = hi - lo, cal.tokens / max(cal.wall_s, 1e-9)
    lo, hi = take(data, 0, rate * seconds)  # the ids are random: reusing them is harmless
    free_memory()
    st = fn(subset(data, lo, hi))
    n, wall = hi - lo, max(st.wall_s, 1e-9)
    out = {"status": "ok", "error": None, "examples": n, "tokens": st.tokens,
           "padded_tokens": st.padded_tokens, "wall_s": st.wall_s,
           "tokens_per_s": st.tokens / wall, "examples_per_s": n / wall,
           "flops": st.analytic_flops, "tflops_per_s": st.analytic_flops / wall / 1e12,
           "mfu": st.analytic_flops / wall / peak,
           "mfu_datasheet": st.analytic_flops / wall / device_peak if device_peak else None,
           "peak_mem_gb": (st.peak_mem_mb * 2 ** 20 - held) / 1e9, "batch_tokens": bt,
           "calibration": {"examples": n_cal, "tokens": cal.tokens, "wall_s": cal.wall_s},
           "finite": True}  # every call's losses, NLLs or features (Bench's checks)
    if stage == "less":
        d = st.detail
        out["projection_s"] = d["projection_s"]
        out["projection_share"] = d["projection_s"] / wall if d["projection_calls"] else None
        out["lora_params"] = d["lora_params"]
        out["proj_dim"] = bench.less.params.proj_dim
        # the share of the sign matrix kept between flushes; the rest is regenerated each time
        out["projection_kept_share"] = bench.proj.kept / bench.proj.blocks
    return out


def projection_check(device: torch.device, n: int, k: int) -> dict:
    """The same seeded projection of the same vectors on the CPU and on `device`."""
    proj = RademacherProjection(n, k, 0)
    x = torch.randn(4, n, generator=torch.Generator().manual_seed(0))
    cpu = proj(x)
    t = time.perf_counter()
    dev = proj(x.to(device))
    sync()
    dev_s = time.perf_counter() - t
    check_finite("projection on the CPU", cpu)
    check_finite("projection on the device", dev)
    diff = float((dev.float().cpu() - cpu).abs().max() / cpu.abs().max())
    return {"status": "ok", "error": None, "n": n, "k": k, "device_s": dev_s,
            "max_rel_diff": diff, "same": diff < 1e-3, "finite": True}


# -- the run ------------------------------------------------------------------------------

class Run:
    def __init__(self, args, argv: list[str]):
        self.args = args
        self.device = torch.device("cpu" if args.smoke else "cuda")
        self.deadline = T0 + args.budget
        self.bench: Bench | None = None  # the model being measured
        self.held = 0  # bytes of device memory held back (see _hold)
        stem = "gpu-smoke" if args.smoke else "gpu"
        self.json, self.md = args.out / f"{stem}.json", args.out / f"{stem}.md"
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else cpu()
        key = device_of(name) if self.device.type == "cuda" else None
        self.device_peak = DEVICE_PEAK_FLOPS[key] if key else None
        self.res: dict = {
            "command": " ".join(["python", "benchmarks/gpu.py", *argv]),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "device": name, "smoke": args.smoke, "host": platform.machine(),
            "versions": versions(), "budget_s": args.budget, "seconds": args.seconds,
            "peak_flops": {"measured": None, "datasheet": self.device_peak},
            "models": {}, "checks": {}, "targets": [], "elapsed_s": 0.0}

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def guarded(self, where: dict, key: str, fn: Callable[[], dict], cap: float) -> dict:
        """Run `fn` within the time left (at most `cap`); a failure becomes one line."""
        if self.left() < self.args.min_stage:
            where[key] = {"status": "skipped", "error": "time budget spent"}
        else:
            t = time.perf_counter()
            try:
                with time_limit(min(cap, self.left())):
                    where[key] = fn()
            except Exception as e:  # noqa: BLE001 - one stage's failure must not lose the rest
                where[key] = {"status": "failed", "error": one_line(e),
                              "after_s": time.perf_counter() - t}
                if isinstance(e, NotFinite):
                    where[key]["finite"] = False
            free_memory()
        self.write()
        print(f"gpu.py: {key}: {where[key]['status']} "
              f"{where[key].get('error') or ''} ({time.perf_counter() - T0:.0f} s)",
              file=sys.stderr, flush=True)
        return where[key]

    def go(self) -> None:
        a = self.args
        peak = self.guarded(self.res, "peak", lambda: {
            "status": "ok", **matmul_peak(self.device, a.peak_sizes, a.peak_seconds)}, 60)
        self.res["peak_flops"]["measured"] = peak.get("measured")
        if not peak.get("measured"):
            return
        if self.device.type == "cuda" and a.card_gb:
            self.guarded(self.res, "card", self._hold, 30)
        rt = Runtime(self.device, torch.bfloat16)
        models = ["tiny"] if a.smoke else a.models
        smallest = min(models, key=lambda m: CONFIGS[m]["hidden_size"])
        vocab = min(CONFIGS[m]["vocab_size"] for m in models)
        tok = id_tokenizer(vocab)
        data = synthetic(a.pool, vocab)
        for name in models:
            entry = self.res["models"].setdefault(name, {"stages": {}})
            built = self.guarded(entry, "build", lambda n=name: self._build(n, rt, data, tok),
                                 120)
            entry["params_total"] = built.get("params_total")
            for stage in STAGES:
                if stage == "score_metered" and name != smallest:
                    continue  # FlopCounterMode's cost is one figure, on the smallest model
                if self.bench is None:
                    entry["stages"][stage] = {"status": "skipped", "error": "model not built"}
                    continue
                secs = a.seconds * (0.5 if stage == "score_metered" else 1)
                self.guarded(entry["stages"], stage,
                             lambda s=stage, t=secs: run_stage(
                                 self.bench, s, t, self.res["peak_flops"]["measured"],
                                 self.device_peak, self.held), a.stage_cap)
            self.bench = None
            free_memory()
        self.guarded(self.res["checks"], "projection_cpu_vs_device",
                     lambda: projection_check(self.device, a.check_rows, a.proj_dim), 90)

    def _hold(self) -> dict:
        """Take all but `card_gb` of the free device memory, so that every pass sizes its
        batches for, and must fit in, the card the targets are about (80 GB), not this one."""
        free, total = torch.cuda.mem_get_info(self.device)
        n = max(0, int(free - self.args.card_gb * 1e9))
        self._ballast = torch.empty(n, dtype=torch.uint8, device=self.device)
        self.held = n
        return {"status": "ok", "error": None, "card_gb": self.args.card_gb,
                "held_gb": n / 1e9, "device_total_gb": total / 1e9}

    def _build(self, name: str, rt: Runtime, data: Encoded, tok) -> dict:
        t = time.perf_counter()
        self.bench = b = Bench(name, self.args, rt, data, tok)
        sync()
        return {"status": "ok", "error": None, "wall_s": time.perf_counter() - t,
                "params_total": b.counts["total"], "params_non_embedding":
                b.counts["non_embedding"], "config": CONFIGS[name]}

    def write(self) -> None:
        self.res["elapsed_s"] = time.perf_counter() - T0
        self.res["targets"] = targets(self.res)
        write_json(self.json, self.res)
        try:
            text = markdown(self.res)
        except Exception as e:  # noqa: BLE001 - the JSON holds the results; never lose the run
            text = f"# ccds on a GPU\n\nThe report failed ({one_line(e)}); see {self.json.name}.\n"
        write_text(self.md, text)


def targets(res: dict) -> list[dict]:
    """Issue 22's targets, judged at the largest model that was built."""
    built = [(m["params_total"], n) for n, m in res["models"].items() if m.get("params_total")]
    if not built:
        return []
    name = max(built)[1]
    stages = res["models"][name]["stages"]
    out = []
    for stage, metric, op, bound in TARGETS:
        v = stages.get(stage, {}).get(metric)
        ok = None if v is None else (v >= bound if op == ">=" else v <= bound)
        out.append({"model": name, "stage": stage, "metric": metric, "op": op, "bound": bound,
                    "value": v, "pass": ok})
    return out


def versions() -> dict:
    import transformers

    try:
        import peft
        pv = peft.__version__
    except ImportError:
        pv = None
    return {"python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "transformers": transformers.__version__, "peft": pv}


def cpu() -> str:
    from peak import cpu as cpu_name

    return cpu_name()


# -- the report ---------------------------------------------------------------------------

def _f(v, fmt: str) -> str:
    return "—" if v is None or (isinstance(v, float) and not math.isfinite(v)) else \
        format(v, fmt)


COLUMNS = [("examples", ","), ("tokens", ","), ("wall_s", ".2f"), ("tokens_per_s", ",.0f"),
           ("examples_per_s", ",.1f"), ("tflops_per_s", ".3g"), ("mfu", ".1%"),
           ("mfu_datasheet", ".1%"), ("peak_mem_gb", ".2f"), ("batch_tokens", ","),
           ("projection_share", ".1%")]


def markdown(res: dict) -> str:
    peak = res["peak_flops"]
    v = res["versions"]
    lines = [f"# ccds on a GPU: scoring, LESS features, LoRA training{' (smoke)' * res['smoke']}",
             "",
             f"Command: `{res['command']}` — {res['date']}, {res['device']} (torch "
             f"{v['torch']}, CUDA {v['cuda']}, transformers {v['transformers']}, peft "
             f"{v['peft']}); {res['elapsed_s']:.0f} s of a {res['budget_s']:.0f} s budget.",
             ""]
    card = res.get("card", {})
    if card.get("status") == "ok":
        lines += [f"The run held {card['held_gb']:.1f} GB of the device's "
                  f"{card['device_total_gb']:.1f} GB back, so ccds saw {card['card_gb']:.0f} GB "
                  "free (a little less than an 80 GB card leaves) and sized its batches for "
                  "that; peak memory leaves the held part out.", ""]
    if res["smoke"]:
        lines += ["**Smoke run**: a tiny random-init Llama on the CPU, only to show the script "
                  "runs end to end (tests/test_gpu_bench.py); its figures say nothing about a "
                  "GPU.", ""]
    lines += [f"bf16 matmul peak measured in this run: {_f(peak['measured'], '.3g')} FLOP/s"
              f" (n = {res.get('peak', {}).get('n', '—')}); datasheet dense bf16: "
              f"{_f(peak['datasheet'], '.3g')}. MFU = ccds's analytic FLOPs of the real "
              "(unpadded) tokens (`ccds.flops`, ccds convention) / wall time / the measured "
              "peak; the datasheet column divides by the datasheet peak instead. Models: "
              "random-init from the published configs (bf16 weights, SDPA attention, LoRA "
              "adapters fp32); data: random token ids, lengths lognormal around 256 tokens "
              f"cut at {MAX_LEN}, responses 20-80% of each. Scoring is `lm.score_sequences` "
              "at `ppl`'s batch budget; LESS is `LESS.features` (per-example LoRA gradients, "
              "Adam direction, projection) at its own budget on its warmup LoRA (r 8, q/k/v/o); "
              "training is `train.train` with the default TrainConfig (LoRA r 16); "
              "`score_metered` is scoring with FlopCounterMode on, as ccds meters by default. "
              "Peak memory is the CUDA allocator's peak during the timed run, weights included "
              "(on a CPU: the process's resident set); GB = 10^9 bytes. Every call's "
              "training losses, scoring NLLs and LESS features were checked finite: a NaN or "
              "an infinity fails its stage, and its line below says which values.", "",
              "| model | stage | status | examples | tokens | wall s | tokens/s | examples/s "
              "| TFLOP/s | MFU | MFU (datasheet) | peak GB | batch tokens | projection share |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    problems = []
    for name, m in res["models"].items():
        if m.get("build", {}).get("status") not in (None, "ok"):
            problems.append(f"{name} build: {m['build']['status']}: {m['build']['error']}")
        for stage, s in m["stages"].items():
            if s["status"] != "ok":
                problems.append(f"{name} {stage}: {s['status']}: {s['error']}")
                lines.append(f"| {name} | {stage} | {s['status']} |" + " — |" * len(COLUMNS))
                continue
            cells = [_f(s.get(k), fmt) for k, fmt in COLUMNS]
            lines.append(f"| {name} | {stage} | ok | {' | '.join(cells)} |")
    for name, m in res["models"].items():
        plain, metered = m["stages"].get("score", {}), m["stages"].get("score_metered", {})
        if plain.get("tokens_per_s") and metered.get("tokens_per_s"):
            how = f"op by op on a stage's first {SAMPLED_BATCHES} batches"
            lines += ["", f"Metering FLOPs as ccds does by default ({how}) while scoring "
                      f"{name} runs at "
                      f"{metered['tokens_per_s'] / plain['tokens_per_s']:.0%} of the "
                      "unmetered speed."]
    if res["targets"]:
        t0 = res["targets"][0]["model"]
        lines += ["", f"## Targets (issue 22, at {t0})", "", "| stage | metric | target | "
                  "measured | result |", "|---|---|---|---|---|"]
        for t in res["targets"]:
            pct = t["metric"] != "peak_mem_gb"
            fmt = ".1%" if pct else ".1f"
            bound = f"{t['op']} {_f(t['bound'], '.0%' if pct else '.0f')}" + ("" if pct
                                                                             else " GB")
            verdict = {True: "pass", False: "FAIL", None: "not measured"}[t["pass"]]
            lines.append(f"| {t['stage']} | {t['metric']} | {bound} | "
                         f"{_f(t['value'], fmt)} | {verdict} |")
    check = res["checks"].get("projection_cpu_vs_device")
    if check:
        lines += ["", "## Projection on the CPU and on the device", ""]
        if check["status"] == "ok":
            lines.append(f"The same seeded projection ({check['n']:,} × {check['k']:,}) of the "
                         f"same 4 vectors: max relative difference {check['max_rel_diff']:.2e} "
                         f"({'same' if check['same'] else 'DIFFERENT'}); "
                         f"{check['device_s']:.2f} s on the device.")
        else:
            problems.append(f"projection check: {check['status']}: {check['error']}")
    if problems:
        lines += ["", "## Not measured", ""] + [f"- {p}" for p in problems]
    return "\n".join(lines) + "\n"


def parse(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true",
                    help="a tiny config on the CPU: the script's own test")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--models", nargs="+", default=["llama-3.1-8b", "llama-3.2-1b"],
                    choices=[m for m in CONFIGS if m != "tiny"],
                    help="in this order: the targets' model first, so a run cut short by "
                         "its budget loses the smaller one")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds for the whole run, imports included (default 450; smoke 60)")
    ap.add_argument("--seconds", type=float, default=None,
                    help="timed run per stage (default 15; smoke 0.5)")
    ap.add_argument("--stage-cap", type=float, default=None,
                    help="most seconds one stage may take (default 150; smoke 30)")
    ap.add_argument("--card-gb", type=float, default=80.0,
                    help="device memory (GB) left free for ccds, the rest held back: a "
                         "larger GPU measures as this card; 0 leaves all of it")
    ap.add_argument("--proj-dim", type=int, default=8192)
    ap.add_argument("--pool", type=int, default=None,
                    help="synthetic sequences (default 16000; smoke 400)")
    args = ap.parse_args(argv)
    smoke = args.smoke
    args.budget = args.budget if args.budget is not None else (60 if smoke else 450)
    args.seconds = args.seconds if args.seconds is not None else (0.5 if smoke else 15)
    args.stage_cap = args.stage_cap if args.stage_cap is not None else (30 if smoke else 150)
    args.pool = args.pool or (400 if smoke else 16000)
    args.min_stage = 1.0 if smoke else 15.0
    args.peak_sizes = (256,) if smoke else (8192, 16384)
    args.peak_seconds = 0.3 if smoke else 6.0
    args.check_rows = 4096 if smoke else 65536
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    if not args.smoke and not torch.cuda.is_available():
        print("gpu.py: no CUDA device; use --smoke on a CPU", file=sys.stderr)
        return 2
    run = Run(args, argv)
    try:
        run.go()
    finally:
        run.write()
    print(f"gpu.py: wrote {run.json} and {run.md} in {time.perf_counter() - T0:.0f} s",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
