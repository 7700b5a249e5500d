"""ccds's multiple-choice evaluation beside lm-evaluation-harness 0.4.x (issue 30): the same
items, model and adapter through both harnesses; accuracy and per-item choices compared.

SmolLM2-135M (the dequantised GGUF folder ccds makes) in fp32, base and with one LoRA adapter
(trained here on the first 40 Alpaca examples, or --adapter), on MMLU (the first 2 test
questions of every subject: the study's T) and two BBH tasks with options, 40 items each:
navigate (Yes/No, one token each: ccds's one-forward-per-question path) and ruin_names
("(A)".."(D)", several tokens: its one-sequence-per-option path). The items are exported
once, as ccds target folders and as JSONL read by lm-eval task YAMLs (`dataset_path: json`),
and each harness reads its own copy, lm-eval offline through its Python API.

lm-eval scores two conventions: with the chat template (`--apply_chat_template`: the prompt
as the user turn, the option as the assistant's reply, no delimiter), which is ccds's, and
its default (plain prompt, " ", option). Where the convention is the same the targets are
accuracy within 0.5 points and >= 99% identical choices; a token check confirms both score
the same token ids.

    .venv/bin/python benchmarks/eval_agreement.py            # full run, 2 models x 194 items
    .venv/bin/python benchmarks/eval_agreement.py --quick    # 10 items a task, small adapter
    .venv/bin/python benchmarks/eval_agreement.py --export-only --tasks-dir /tmp/ccds-lm-eval
        # only the items, task YAMLs and ccds targets, to run lm_eval / ccds eval by hand
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
import tempfile
import time
from collections import Counter
from datetime import date
from pathlib import Path

import numpy as np
import yaml

import ccds.evaluate as ccds_eval
from ccds.data.sources import load_source, load_target, load_target_folder, save_target
from ccds.data.types import Target
from ccds.evaluate import EvalConfig, evaluate
from ccds.io import write_json, write_jsonl, write_text
from ccds.models import load_adapter, load_causal_lm, pick_runtime, resolve, save_adapter
from ccds.tokenize import Formatter, encode_pairs
from ccds.train import TrainConfig, train

MODEL = "smollm2-135m"
TASKS = {"mmlu": ("mmlu", 2), "bbh_navigate": ("bbh:navigate", 40),
         "bbh_ruin_names": ("bbh:ruin_names", 40)}  # name -> (ccds target spec, n_test)
ADAPTER_DATA = ("alpaca", 40)  # a study-pool source, its first n examples
QUICK = {"items": 10, "adapter_examples": 8}
TRAIN = TrainConfig(epochs=2, lr=5e-4, batch_tokens=1024, max_len=256, dtype="fp32",
                    measure_flops=False)
EVAL = EvalConfig(generate=False, measure_flops=False)  # `ccds eval`'s defaults otherwise
LM_EVAL_BATCH = 8
MAX_POINTS, MIN_SAME = 0.5, 0.99  # issue 30's targets where the conventions match
CONVENTIONS = {"chat": True, "plain": False}  # lm-eval run -> apply_chat_template


def task_name(name: str) -> str:
    return f"ccds_{name}"


def export(tasks_dir: Path, items: int | None) -> dict[str, Target]:
    """Write each task's items as a ccds target folder and as lm-eval JSONL + task YAML; the
    targets come back read from the folders, so the run scores what `ccds eval --target
    <folder>` scores."""
    out = {}
    for name, (spec, n_test) in TASKS.items():
        t = load_target(spec, n_test=n_test)
        t = dataclasses.replace(t, test=t.test[:items])
        save_target(t, tasks_dir / "ccds" / name)
        data = tasks_dir / f"{name}.jsonl"
        write_jsonl(data, [{"id": e.id, "text": e.prompt, "choices": e.choices,
                            "gold": e.gold_index} for e in t.test])
        # doc_to_* name fields, so lm-eval hands the strings over as they are (no Jinja)
        config = {"task": task_name(name), "dataset_path": "json",
                  "dataset_kwargs": {"data_files": {"test": str(data.resolve())}},
                  "test_split": "test", "output_type": "multiple_choice",
                  "doc_to_text": "text", "doc_to_choice": "choices", "doc_to_target": "gold",
                  "metric_list": [{"metric": "acc", "aggregation": "mean",
                                   "higher_is_better": True}]}
        write_text(tasks_dir / f"{name}.yaml", yaml.safe_dump(config, sort_keys=False))
        out[name] = load_target_folder(tasks_dir / "ccds" / name)
    return out


def train_adapter(path: Path, n: int) -> dict:
    """A short fp32 LoRA run, enough to move option log-likelihoods off the base model's."""
    source = ADAPTER_DATA[0]
    r = train(load_source(source)[:n], TRAIN, progress=None)
    save_adapter(path, r.model)
    return {"data": f"{source}[:{n}]", "steps": r.steps, "tokens": r.tokens,
            "loss": [r.losses[0], r.losses[-1]],
            "train": TRAIN.model_dump(include={"epochs", "lr", "lora_r", "lora_alpha",
                                               "target_modules", "batch_tokens", "max_len",
                                               "dtype", "seed"})}


# -- ccds ----------------------------------------------------------------------------------

@contextlib.contextmanager
def recorded_scores():
    """`evaluate` reports accuracy only; per-item choices come from what its two scoring
    paths (one-token options, whole sequences) return, recorded on the way back."""
    got: dict = {}
    saved = ccds_eval.option_logprobs, ccds_eval.score_sequences

    def keep(key, fn):
        def wrapped(*a, **k):
            got[key] = fn(*a, **k)
            return got[key]
        return wrapped

    ccds_eval.option_logprobs = keep("options", saved[0])
    ccds_eval.score_sequences = keep("sequences", saved[1])
    try:
        yield got
    finally:
        ccds_eval.option_logprobs, ccds_eval.score_sequences = saved


def item_scores(got: dict, target: Target) -> tuple[str, list[np.ndarray]]:
    """(path, options' summed log-probs per item): evaluate's rows run item by item, option
    by option."""
    if "options" in got:
        return "one-token", [np.asarray(x, dtype=float) for x in got["options"]]
    nll = np.asarray(got["sequences"]["nll_sum"], dtype=float)
    ends = np.cumsum([len(e.choices) for e in target.test])
    return "per-option", [-x for x in np.split(nll, ends[:-1])]


def ccds_run(adapter: Path | None, targets: dict[str, Target], device: str):
    """Score every task as `ccds eval --dtype fp32 [--adapter]` does; per task its accuracy,
    scoring path and per-item option log-probs, and the tokenizer."""
    rt = pick_runtime(device, "fp32")
    model, tok, _ = load_causal_lm(MODEL, runtime=rt)
    if adapter is not None:
        model = load_adapter(model, adapter)
    rt.place(model)
    out = {}
    for name, t in targets.items():
        with recorded_scores() as got:
            r = evaluate(model, tok, t, EVAL, runtime=rt, progress=None)
        path, lls = item_scores(got, t)
        picks = [int(np.argmax(x)) for x in lls]
        acc = float(np.mean([p == e.gold_index for p, e in zip(picks, t.test, strict=True)]))
        if abs(acc - r["accuracy"]) > 1e-12:  # the recording must be what evaluate ranked
            raise RuntimeError(f"{name}: recorded choices give {acc}, evaluate {r['accuracy']}")
        out[name] = {"acc": r["accuracy"], "path": path, "lls": lls, "truncated": r["truncated"]}
    return out, tok


# -- lm-eval -------------------------------------------------------------------------------

def hflm(adapter: Path | None, device: str):
    """lm-eval's HF model, as `--model hf --model_args pretrained=DIR,dtype=float32[,peft=A]`
    builds it; loaded once and used for both conventions."""
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=resolve(MODEL).path, dtype="float32", device=device,
                batch_size=LM_EVAL_BATCH, peft=str(adapter) if adapter else None)


def lm_eval_run(lm, tasks_dir: Path, names: list[str]) -> dict:
    """Per convention and task: lm-eval's reported accuracy and its samples in item order."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(tasks_dir), include_defaults=False)
    out: dict = {}
    for conv, chat in CONVENTIONS.items():
        r = simple_evaluate(model=lm, tasks=[task_name(n) for n in names], task_manager=tm,
                            apply_chat_template=chat, log_samples=True, bootstrap_iters=0)
        out[conv] = {n: {"acc": r["results"][task_name(n)]["acc,none"],
                         "samples": sorted(r["samples"][task_name(n)],
                                           key=lambda s: s["doc_id"])} for n in names}
    return out


def check_tokens(lm, tok, target: Target, samples: list[dict]) -> dict:
    """Whether lm-eval's chat-convention requests are ccds's sequences: same text, same ids
    (context + continuation), same scored ids; and what lm-eval scores beyond the option."""
    fmt = Formatter(tok)
    pairs = [(e.prompt, c) for e in target.test for c in e.choices]
    enc = encode_pairs(*zip(*pairs, strict=True), tok, EVAL.max_len)
    args = [a for s in samples for a in s["arguments"]]
    same_text = same_ids = same_scored = 0
    extra: Counter = Counter()
    for i, ((prompt, choice), (ctx, cont)) in enumerate(zip(pairs, args, strict=True)):
        head, resp, _ = fmt.render(prompt, choice)
        same_text += head + resp == ctx + cont
        ours = enc.ids[i][:len(enc.ids[i]) - enc.n_suffix[i]].tolist()
        scored = ours[enc.n_prompt[i]:]
        ctx_ids, cont_ids = lm._encode_pair(ctx, cont)
        same_ids += ctx_ids + cont_ids == ours
        k = len(cont_ids) - len(scored)
        same_scored += k >= 0 and cont_ids[k:] == scored
        extra[tok.decode(cont_ids[:k]) if k > 0 else ""] += 1
    return {"sequences": len(pairs), "same_text": same_text, "same_ids": same_ids,
            "same_scored_ids": same_scored,
            "lm_eval_extra_scored": dict(extra)}


# -- comparing -----------------------------------------------------------------------------

def lm_lls(samples: list[dict]) -> list[np.ndarray]:
    return [np.array([float(r[0]) for r in s["filtered_resps"]]) for s in samples]


def compare(target: Target, ours: dict, theirs: dict) -> dict:
    """One (model, task) row: both accuracies per convention, the share of identical choices,
    and for the chat convention how far lm-eval's log-likelihoods sit from ccds's (a shift
    shared by a question's options, `offset`, leaves its choice alone; `spread` is the rest)."""
    gold = [e.gold_index for e in target.test]
    pick = [int(np.argmax(x)) for x in ours["lls"]]
    row = {"n": len(gold), "ccds_path": ours["path"], "ccds_acc": ours["acc"],
           "truncated": ours["truncated"], "picks": {"gold": gold, "ccds": pick}}
    for conv, runs in theirs.items():
        lls = lm_lls(runs["samples"])
        their = [int(np.argmax(x)) for x in lls]
        row["picks"][conv] = their
        row[f"{conv}_acc"] = runs["acc"]
        row[f"{conv}_same"] = float(np.mean([a == b for a, b in zip(pick, their, strict=True)]))
        if conv == "chat":
            d = [t - o for t, o in zip(lls, ours["lls"], strict=True)]
            row["chat_offset"] = float(np.mean([x.mean() for x in d]))
            row["chat_spread"] = float(max(x.max() - x.min() for x in d))
    row["agrees"] = (abs(row["ccds_acc"] - row["chat_acc"]) * 100 <= MAX_POINTS
                     and row["chat_same"] >= MIN_SAME)
    return row


def shift(base: list[np.ndarray], tuned: list[np.ndarray]) -> float:
    """Mean |change| of an option's log-likelihood: shows the adapter was applied."""
    return float(np.mean(np.concatenate([np.abs(a - b) for a, b in zip(base, tuned,
                                                                      strict=True)])))


# -- report --------------------------------------------------------------------------------

def commands(tasks_dir: str, adapter: str) -> dict[str, str]:
    """The commands that print each harness's numbers from an exported folder."""
    tasks = ",".join(task_name(n) for n in TASKS)
    folders = " ".join(f"--target {tasks_dir}/ccds/{n}" for n in TASKS)
    lm = (f"HF_DATASETS_OFFLINE=1 .venv/bin/lm_eval --model hf --model_args "
          f"pretrained=$(.venv/bin/python -c \"from ccds.models import resolve; "
          f"print(resolve('{MODEL}').path)\"),dtype=float32[,peft={adapter}] --tasks {tasks} "
          f"--include_path {tasks_dir} --batch_size {LM_EVAL_BATCH}")
    return {"export": f".venv/bin/python benchmarks/eval_agreement.py --export-only "
                      f"--tasks-dir {tasks_dir}",
            "lm_eval_chat": lm + " --apply_chat_template",
            "lm_eval_plain": lm,
            "ccds": f".venv/bin/ccds eval {folders} --dtype fp32 --no-generate "
                    f"[--adapter {adapter}]"}


def markdown(r: dict) -> str:
    pct = lambda x: f"{100 * x:.1f}"  # noqa: E731
    a = r["adapter"]
    made = (f"LoRA trained here on {a['data']} ({a['steps']} steps, loss {a['loss'][0]:.2f} "
            f"-> {a['loss'][1]:.2f})" if "steps" in a else f"`{a['path']}`")
    lines = ["# ccds eval beside lm-evaluation-harness", "",
             f"Command: `{r['command']}` — {r['date']}, {r['machine']}, "
             f"{r['wall_s'] / 60:.1f} min. lm-eval {r['versions']['lm_eval']}, transformers "
             f"{r['versions']['transformers']}, peft {r['versions']['peft']}. Model: "
             f"{r['model']['name']} (`{r['model']['path']}`), fp32, zero-shot; adapter: "
             f"{made}."]
    lines += ["", "Accuracy (%). *chat*: lm-eval with `--apply_chat_template`, ccds's "
              "convention; *plain*: lm-eval's default (plain prompt, \" \", option). *same*: "
              "items where the harnesses pick the same option. Targets where the convention "
              f"is the same: |Δ accuracy| ≤ {MAX_POINTS} points and same ≥ {pct(MIN_SAME)}%.", "",
              "| model | task | items | ccds path | ccds | lm-eval chat | same | "
              "log-lik spread | lm-eval plain | same | agrees |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for x in r["rows"]:
        lines.append(f"| {x['model']} | {x['task']} | {x['n']} | {x['ccds_path']} | "
                     f"{pct(x['ccds_acc'])} | {pct(x['chat_acc'])} | {pct(x['chat_same'])} | "
                     f"{x['chat_spread']:.1e} | {pct(x['plain_acc'])} | "
                     f"{pct(x['plain_same'])} | {'yes' if x['agrees'] else '**no**'} |")
    tc = r["token_check"]
    n = sum(v["sequences"] for v in tc.values())
    extra = Counter()
    for v in tc.values():
        extra.update(v["lm_eval_extra_scored"])
    lines += ["", f"Token check (chat convention, every option of every item, {n} sequences): "
              f"same text {sum(v['same_text'] for v in tc.values())}, same token ids "
              f"{sum(v['same_ids'] for v in tc.values())}, same scored ids after what "
              f"lm-eval adds {sum(v['same_scored_ids'] for v in tc.values())}; lm-eval also "
              "scores " + ", ".join(f"`{k!r}` before the option in {v} sequences" for k, v in
                                    extra.items()) + ". The adapter moves an "
              f"option's log-likelihood by {r['adapter_shift']['ccds']:.3f} on average in ccds "
              f"and {r['adapter_shift']['lm_eval']:.3f} in lm-eval.", "",
              "## Where the conventions differ", "",
              "- **Prompt.** ccds renders the prompt with the tokenizer's chat template (the "
              "user turn; SmolLM2's template adds its default system turn) and scores the "
              "option as the assistant's reply, nothing between. That is lm-eval's "
              "`--apply_chat_template`, which drops `target_delimiter` for multiple choice. "
              "lm-eval's default scores `prompt + \" \" + option` on the plain text: the "
              "*plain* columns, a different number.",
              "- **Scored tokens.** lm-eval moves the context's trailing whitespace (the "
              "\"\\n\" after `assistant`) into the continuation and scores it with every "
              "option; ccds scores the option's tokens only. The extra term is the same for "
              "all options of a question (`chat_offset` in the JSON, the mean), so choices "
              "and accuracy are unchanged; what remains (*log-lik spread*, the largest "
              "within-question difference) is float noise.",
              "- **Normalisation.** Both rank by summed log-likelihood (lm-eval's `acc`). "
              "ccds's `length_norm` divides by option tokens, lm-eval's `acc_norm` by "
              "characters: not the same metric, not compared.",
              "- **Options.** The options are ccds's (`sources.py`): MMLU's letters A-D; BBH "
              "the \"(A)\" labels after \"Options:\" or a task's distinct targets (navigate: "
              "No/Yes). lm-eval's own `mmlu` (\"Answer:\" prompt) and `bbh` (generated "
              "answers, exact match) tasks score differently and are not these numbers.", "",
              "## Reproduce lm-eval's numbers by hand", "",
              "```"]
    lines += [r["commands"][k] for k in ("export", "lm_eval_chat", "lm_eval_plain", "ccds")]
    lines += ["```", "", "`[...,peft=DIR]` / `[--adapter DIR]`: with the adapter (a LoRA "
              "folder; this run trained its own, see the JSON). `ccds eval` prints ccds's "
              "accuracy, the first `lm_eval` the chat convention's, the second the default.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # before datasets is imported
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import lm_eval
    import peft
    import torch
    import transformers
    from peak import cpu

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--quick", action="store_true", help=f"{QUICK['items']} items a task, "
                    f"an adapter from {QUICK['adapter_examples']} examples; results under "
                    "--out as eval_agreement-quick.*")
    ap.add_argument("--items", type=int, help="cap on each task's items (default: all; "
                    f"{QUICK['items']} with --quick)")
    ap.add_argument("--adapter", type=Path, help="a LoRA adapter folder (default: train one)")
    ap.add_argument("--tasks-dir", type=Path, help="keep the exported items, task YAMLs, "
                    "ccds targets (and the trained adapter) here (default: a temp folder)")
    ap.add_argument("--export-only", action="store_true", help="export to --tasks-dir, stop")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    if args.export_only and args.tasks_dir is None:
        ap.error("--export-only needs --tasks-dir")
    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        work = args.tasks_dir or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        targets = export(work, args.items or (QUICK["items"] if args.quick else None))
        shown = str(args.tasks_dir or "/tmp/ccds-lm-eval")
        if args.export_only:
            print("\n".join(commands(shown, str(args.adapter or "ADAPTER")).values()))
            return 0
        adapter = args.adapter or work / "adapter"
        n = QUICK["adapter_examples"] if args.quick else ADAPTER_DATA[1]
        made = {"path": str(adapter)} | ({} if args.adapter else train_adapter(adapter, n))
        rows, token_check, lls = [], {}, {}
        for key, ad in (("base", None), ("adapter", adapter)):
            lm = hflm(ad, args.device)
            theirs = lm_eval_run(lm, work, list(targets))
            ours, tok = ccds_run(ad, targets, args.device)
            if key == "base":
                token_check = {n: check_tokens(lm, tok, t, theirs["chat"][n]["samples"])
                               for n, t in targets.items()}
            del lm
            for n, t in targets.items():
                row = compare(t, ours[n], {c: theirs[c][n] for c in CONVENTIONS})
                rows.append({"model": key, "task": n, **row})
                lls[key, n] = (ours[n]["lls"], lm_lls(theirs["chat"][n]["samples"]))
                print({k: v for k, v in rows[-1].items() if k != "picks"}, flush=True)
    ref = resolve(MODEL)
    r = {"command": " ".join(["python benchmarks/eval_agreement.py",
                              *(sys.argv[1:] if argv is None else argv)]),
         "date": str(date.today()),
         "machine": f"{cpu()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
                    f"{args.device} fp32",
         "versions": {"lm_eval": lm_eval.__version__, "transformers": transformers.__version__,
                      "peft": peft.__version__, "torch": torch.__version__},
         "model": {"name": MODEL, "path": ref.path, "fingerprint": ref.fingerprint},
         "adapter": made, "items": {n: len(t.test) for n, t in targets.items()},
         "targets": {"max_points": MAX_POINTS, "min_same": MIN_SAME},
         "token_check": token_check,
         "adapter_shift": {side: float(np.mean([shift(lls["base", n][k], lls["adapter", n][k])
                                                for n in targets]))
                           for k, side in enumerate(("ccds", "lm_eval"))},
         "rows": rows, "agrees": all(x["agrees"] for x in rows),
         "commands": commands(shown, "ADAPTER"), "wall_s": time.perf_counter() - t0}
    stem = "eval_agreement-quick" if args.quick else "eval_agreement"
    write_json(args.out / f"{stem}.json", r)
    write_text(args.out / f"{stem}.md", markdown(r))
    print(markdown(r))
    return 0 if r["agrees"] else 1


if __name__ == "__main__":
    sys.exit(main())
