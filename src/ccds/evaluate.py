"""Evaluate a (fine-tuned) causal LM on a target's test set T.

Three measures, all batched: mean response NLL (every example; for multiple choice it is the
NLL of the gold option, the most sensitive signal for small models), multiple-choice
accuracy by option log-likelihood, and exact match on greedy generations with answer
extraction. Optional k-shot prompting uses the first k examples of V as earlier turns.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from .data.types import Example, Target
from .flops import Ledger, Meter
from .io import bar
from .lm import option_logprobs, score_sequences
from .models import Runtime, batch_budget, param_counts, plain_head
from .tokenize import Encoded, Formatter, encode_pairs, length_batches


class EvalConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    shots: int = Field(0, ge=0, description="k-shot prompting from the first k of V")
    max_examples: int | None = Field(None, ge=1, description="cap on T (first n)")
    max_len: int = Field(1024, ge=8)
    batch_tokens: int = Field(8192, ge=16, description="the most tokens per batch (fewer on "
                              "a GPU whose free memory cannot hold them for this model)")
    generate: bool = Field(True, description="run exact match when the target asks for it")
    max_new_tokens: int = Field(128, ge=1)
    gen_batch: int = Field(64, ge=1, description="decoding is memory-bound: batch wide")
    length_norm: bool = Field(False, description="rank options by mean instead of sum logprob")
    measure_flops: bool = True
    measure_generation: bool = Field(False, description="FlopCounterMode doubles decoding "
                                     "time (many tiny ops), so decoding is analytic by default")


def evaluate(model, tokenizer, target: Target, cfg: EvalConfig | None = None, *,
             runtime: Runtime, ledger: Ledger | None = None, label: str = "",
             progress: str | None = "eval") -> dict:
    cfg = cfg or EvalConfig()
    test = target.test[: cfg.max_examples] if cfg.max_examples else target.test
    shots = target.val[: cfg.shots]
    meter = Meter(f"eval {target.name}{' ' + label if label else ''}", "evaluation",
                  param_counts(model), cfg.measure_flops, runtime.device)
    out: dict = {"target": target.name, "metric": target.metric, "n": len(test),
                 "shots": len(shots)}
    with meter:
        # one scoring pass: every option of multiple-choice examples, the response otherwise
        prompts, responses, owner = [], [], []
        for i, e in enumerate(test):
            for r in (e.choices or [e.response]):
                prompts.append(e.prompt)
                responses.append(r)
                owner.append(i)
        enc = encode_pairs(prompts, responses, tokenizer, cfg.max_len, shots=shots)
        owner_a = np.asarray(owner)
        desc = progress and f"{progress} {target.name}"
        budget = min(cfg.batch_tokens, batch_budget(model, runtime, default=cfg.batch_tokens))
        one_token = _one_token_options(enc, owner_a, test) if plain_head(model) else None
        if one_token is not None:  # the prompt is shared: one forward per question
            first, cands = one_token
            sub = Encoded([enc.ids[r] for r in first], enc.n_prompt[first], enc.n_suffix[first])
            lps = option_logprobs(model, sub, cands, tokenizer.pad_token_id, runtime,
                                  max_tokens=budget, progress=desc, meter=meter)
            nll, count = np.zeros(len(owner)), np.ones(len(owner))
            for i, lp in enumerate(lps):
                nll[first[i]:first[i] + len(lp)] = -lp
        else:
            s = score_sequences(model, enc, tokenizer.pad_token_id, runtime,
                                max_tokens=budget, progress=desc, meter=meter)
            nll, count = s["nll_sum"], np.maximum(s["n_tokens"], 1)
        gold_nll, gold_tok, correct, n_mc = [], [], 0, 0
        for i, e in enumerate(test):
            rows = np.flatnonzero(owner_a == i)
            g = rows[e.gold_index] if e.choices else rows[0]
            gold_nll.append(nll[g])
            gold_tok.append(count[g])
            if e.choices:
                n_mc += 1
                score = -nll[rows] / (count[rows] if cfg.length_norm else 1)
                correct += int(np.argmax(score) == e.gold_index)
        gold_nll_a, gold_tok_a = np.asarray(gold_nll), np.asarray(gold_tok)
        out["nll"] = float(np.mean(gold_nll_a / gold_tok_a)) if test else float("nan")
        out["nll_se"] = (float(np.std(gold_nll_a / gold_tok_a, ddof=1) / np.sqrt(len(test)))
                         if len(test) > 1 else None)  # how far V's mean can be trusted
        out["nll_token"] = float(gold_nll_a.sum() / gold_tok_a.sum()) if test else float("nan")
        out["truncated"] = enc.truncated
        if n_mc:
            out["accuracy"] = correct / n_mc
    stages = [meter.stage]
    if cfg.generate and target.metric == "exact":
        gen = Meter(f"generate {target.name}{' ' + label if label else ''}", "evaluation",
                    meter.params, cfg.measure_generation, runtime.device)
        with gen:
            texts = generate(model, tokenizer, [e.prompt for e in test], runtime, shots=shots,
                             max_new_tokens=cfg.max_new_tokens, batch=cfg.gen_batch,
                             meter=gen, progress=progress and f"generate {target.name}")
        hits = [answers_match(extract(t, target.extract), _gold(e)) for t, e in
                zip(texts, test, strict=True)]
        out["exact_match"] = float(np.mean(hits)) if hits else float("nan")
        out["samples"] = [{"prompt": e.prompt, "output": t, "gold": _gold(e)}
                          for e, t in list(zip(test, texts, strict=True))[:3]]
        stages.append(gen.stage)
    out["primary"] = {"mc": out.get("accuracy"), "exact": out.get("exact_match"),
                      "nll": out["nll"]}[target.metric]
    for st in stages:
        st.detail |= {k: out[k] for k in ("target", "n", "nll", "accuracy", "exact_match")
                      if k in out}
        if ledger is not None:
            ledger.add(st)
    out["flops"] = sum(st.analytic_flops for st in stages)
    out["wall_s"] = sum(st.wall_s for st in stages)
    return out


def _one_token_options(enc: Encoded, owner: np.ndarray, test: Sequence[Example]
                       ) -> tuple[np.ndarray, list[np.ndarray]] | None:
    """When every example is multiple choice and its options' encodings differ only in one
    scored token: each example's first row and its options' token ids; else None."""
    first, cands = [], []
    starts = np.searchsorted(owner, np.arange(len(test)))
    for i, e in enumerate(test):
        rows = np.arange(starts[i], starts[i] + len(e.choices or [0]))
        if not e.choices or np.any(enc.response_lengths[rows] - enc.n_suffix[rows] != 1):
            return None
        ref = enc.ids[rows[0]]
        pos = len(ref) - int(enc.n_suffix[rows[0]]) - 1
        for r in rows[1:]:
            x = enc.ids[r]
            if len(x) != len(ref) or not (np.array_equal(x[:pos], ref[:pos])
                                          and np.array_equal(x[pos + 1:], ref[pos + 1:])):
                return None
        first.append(rows[0])
        cands.append(np.array([enc.ids[r][pos] for r in rows]))
    return np.array(first, dtype=np.int64), cands


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[str], runtime: Runtime, *,
             shots: Sequence[Example] = (), max_new_tokens: int = 128, batch: int = 16,
             max_len: int = 1024, meter: Meter | None = None,
             progress: str | None = None) -> list[str]:
    """Greedy decoding in length-sorted, left-padded batches; returns text per prompt.

    Batches are as wide as `batch` allows whatever the prompt lengths: a decoding step
    costs about the same for 2 rows as for 64 (it is bound by reading the weights), so
    prompt padding is cheap and narrow batches, which pay that read per few rows, are not.
    """
    fmt = Formatter(tokenizer, shots)
    texts = [fmt.render(p, "")[0] for p in prompts]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    ids = [x[-(max_len - max_new_tokens):] for x in ids]
    lengths = np.array([len(x) for x in ids])
    stop = {tokenizer.eos_token_id, *(_as_list(model.generation_config.eos_token_id))}
    stop.discard(None)
    outputs: list[str] = [""] * len(prompts)
    batches = length_batches(lengths, 1 << 30, batch, max_pad=1.0)
    b = bar(len(prompts), progress, unit="ex")
    pad = tokenizer.pad_token_id
    for index in batches:
        width = int(lengths[index].max())
        inp = torch.full((len(index), width), pad, dtype=torch.long)
        mask = torch.zeros_like(inp)
        for r, i in enumerate(index):
            inp[r, width - len(ids[i]):] = torch.tensor(ids[i])
            mask[r, width - len(ids[i]):] = 1
        with runtime.amp():
            gen = model.generate(input_ids=inp.to(runtime.device),
                                 attention_mask=mask.to(runtime.device),
                                 max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=pad, eos_token_id=sorted(stop))
        new = gen[:, width:].cpu()
        new_lens = []
        for r, i in enumerate(index):
            row = new[r].tolist()
            cut = next((j for j, t in enumerate(row) if t in stop), len(row))
            new_lens.append(min(cut + 1, len(row)))
            outputs[i] = tokenizer.decode(row[:cut], skip_special_tokens=True).strip()
        if meter is not None:
            meter.generation(lengths[index], new_lens)
        b.update(len(index))
    b.close()
    return outputs


_NUM = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_ANSWER_IS = re.compile(r"answer is:?\s*(.+?)(?:\.\s*$|\.\s|\n|$)", re.IGNORECASE)


def extract(text: str, how: str) -> str:
    """Pull the final answer out of generated text.

    number: GSM8K's `#### n`, else "the answer is n", else the last number.
    first_line: "the answer is X" (chain-of-thought), else the first non-empty line.
    text: the whole output.
    """
    text = text.strip()
    if how == "number":
        if "####" in text:
            text = text.rsplit("####", 1)[1]
        elif m := _ANSWER_IS.search(text):
            found = _NUM.findall(m.group(1))
            if found:
                return _norm_number(found[0])
        nums = _NUM.findall(text)
        return _norm_number(nums[-1]) if nums else ""
    if how == "first_line":
        if m := _ANSWER_IS.search(text):
            return m.group(1).strip()
        return next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    return text


def answers_match(pred: str, gold: str) -> bool:
    p, g = _norm_text(pred), _norm_text(gold)
    if p == g:
        return True
    try:
        return abs(float(_norm_number(p)) - float(_norm_number(g))) < 1e-6
    except ValueError:
        return False


def _gold(e: Example) -> str:
    return e.answer if e.answer is not None else e.response


def _norm_number(s: str) -> str:
    s = s.replace(",", "").replace("$", "").strip().rstrip(".")
    try:
        f = float(s)
    except ValueError:
        return s
    return str(int(f)) if f == int(f) else str(f)


def _norm_text(s: str) -> str:
    return " ".join(s.strip().rstrip(".").lower().split())


def _as_list(x) -> list:
    if x is None:
        return []
    return list(x) if isinstance(x, (list, tuple)) else [x]
