"""Loaders for the shared datasets in their raw formats, and target/source spec strings.

The shared folder (env CCDS_DATA_DIR, else ../shared/data beside the repository) holds MMLU,
BBH, GSM8K, Alpaca and BIG-bench as published; this module turns each into `Example`s and
the usual target splits: MMLU (V = dev, T = test), BBH (V = the 3 chain-of-thought
exemplars, T = the examples), GSM8K (V = a few held-out train examples, T = test).

Where no data folder holds MMLU, BBH's examples or GSM8K, they come from their Hugging Face
hub copies (`HUB_REPOS`) through `datasets.load_dataset`, parsed into the same examples with
the same ids, so a target is the same whichever source served the rows. BBH's V is not on
the hub in its published form: it is read from `bbh/cot-prompts/` in the data folder.
"""

from __future__ import annotations

import csv
import logging
import os
import random
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from ..errors import CcdsError
from ..io import iter_jsonl, read_json, read_text, walk_files, write_json
from .formats import FILE_SUFFIXES, load_examples, write_examples
from .types import Example, Target

log = logging.getLogger(__name__)

TARGET_FORMS = ("mmlu[:subject,...]", "bbh[:task,...]", "gsm8k", "bigbench:<task>[,<task>...]",
                "a target folder written by save_target")
SOURCE_FORMS = ("bigbench[:task,...]", "gsm8k", "alpaca", "a .jsonl/.json/.parquet file",
                "a dataset folder", "a Hugging Face hub id (owner/name)")
_SET_DATA_DIR = "set CCDS_DATA_DIR to the folder holding mmlu/, bbh/, gsm8k/, ..."
BIGBENCH_MAX_BYTES = 50 << 20  # a task file bigger than this is skipped, not parsed
BIGBENCH_N_VAL = 5


def default_data_dir() -> Path | None:
    """CCDS_DATA_DIR if set (None if it does not exist), else ../shared/data beside the repo."""
    env = os.environ.get("CCDS_DATA_DIR")
    if env:
        path = Path(env).expanduser()
        return path.resolve() if path.is_dir() else None
    repo = Path(__file__).resolve().parents[3]
    roots = [repo] if (repo / "pyproject.toml").exists() else []
    for root in [*roots, Path.cwd()]:
        path = root.parent / "shared" / "data"
        if path.is_dir():
            return path.resolve()
    return None


def _dataset_dir(data_dir: str | os.PathLike | None, name: str) -> Path:
    base = Path(data_dir) if data_dir is not None else default_data_dir()
    if base is None or not base.is_dir():
        where = str(base) if base is not None else os.environ.get("CCDS_DATA_DIR")
        raise CcdsError(f"shared data folder not found (needed for {name})", where,
                        _SET_DATA_DIR)
    path = base / name
    if not path.is_dir():
        raise CcdsError(f"no {name}/ folder in the shared data", str(base), _SET_DATA_DIR)
    return path


# --- a data folder, else the hub ----------------------------------------------------------

HubDataset = Literal["mmlu", "bbh", "gsm8k"]
# BBH: the parquet copy lm-eval reads; lukaemon/bbh is a loading script that datasets >= 4
# refuses ("Dataset scripts are no longer supported").
HUB_REPOS: dict[HubDataset, str] = {"mmlu": "cais/mmlu", "bbh": "SaylorTwift/bbh",
                                    "gsm8k": "openai/gsm8k"}
_LOCAL_MARKER: dict[HubDataset, str] = {"mmlu": "test/*_test.csv", "bbh": "*.json",
                                        "gsm8k": "*.jsonl"}


def _local_dir(data_dir: str | os.PathLike | None, name: HubDataset) -> Path | None:
    """<data>/<name> when it holds the dataset's files; None sends the loader to the hub."""
    base = Path(data_dir) if data_dir is not None else default_data_dir()
    path = base / name if base is not None else None
    return path if path is not None and any(path.glob(_LOCAL_MARKER[name])) else None


def _hub_rows(data_dir: str | os.PathLike | None, name: HubDataset, config: str,
              split: str) -> tuple[str, list[dict[str, Any]]]:
    """(where, rows) of one split of `name`'s hub copy, through `datasets.load_dataset`, so
    the hub cache (HF_HOME) and offline switch (HF_DATASETS_OFFLINE) work as for any dataset;
    from $CCDS_HUB_MIRROR/<owner>/<name> instead when set (the repository's files as
    downloaded, for machines that never reach the hub). Neither: one line saying what to set."""
    import datasets

    repo = HUB_REPOS[name]
    mirror = os.environ.get("CCDS_HUB_MIRROR")
    path = str(Path(mirror).expanduser().resolve() / repo) if mirror else repo
    try:
        rows = datasets.load_dataset(path, config, split=split).to_list()
    except (OSError, ValueError, datasets.exceptions.DatasetsError) as e:
        # unreachable, not cached, not there, no such config or split, unreadable files
        base = Path(data_dir) if data_dir is not None else default_data_dir()
        local = f"no {name}/ folder in the shared data ({base})" if base is not None \
            else f"shared data folder not found (needed for {name})"
        detail = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise CcdsError(f"{local}, and {path} ({config}, {split}) did not load: {detail}",
                        None, f"set CCDS_DATA_DIR to a folder holding {name}/; or reach the "
                        f"hub once (datasets caches it under HF_HOME, read later also with "
                        f"HF_DATASETS_OFFLINE=1); or set CCDS_HUB_MIRROR to a folder holding "
                        f"{repo} as downloaded") from None
    return f"{path} {config}/{split}", rows


def _select(kind: str, available: list[str], wanted: list[str] | None) -> list[str]:
    if wanted is None:
        return available
    unknown = [w for w in wanted if w not in available]
    if unknown:
        raise CcdsError(f"unknown {kind} {', '.join(unknown)}",
                        fix=f"valid: {', '.join(available)}")
    return list(dict.fromkeys(wanted))


def _target_metric(test: list[Example]) -> str:
    return "mc" if all(e.choices for e in test) else "exact"


# --- MMLU ---------------------------------------------------------------------------------


MmluSplit = Literal["dev", "val", "test"]
_MMLU_HUB_SPLIT: dict[MmluSplit, str] = {"dev": "dev", "val": "validation", "test": "test"}
_MmluRow = tuple[str, list[str], str]  # question, the four options, answer letter


def mmlu_subjects(data_dir: str | os.PathLike | None = None) -> list[str]:
    root = _local_dir(data_dir, "mmlu")
    if root is None:
        return sorted(_mmlu_hub(data_dir, "dev"))
    return sorted(p.name[: -len("_test.csv")] for p in (root / "test").glob("*_test.csv"))


def load_mmlu(data_dir: str | os.PathLike | None = None, subjects: list[str] | None = None, *,
              split: MmluSplit = "test", limit_per_subject: int | None = None) -> list[Example]:
    """MMLU rows as 4-way multiple choice; the response is the gold letter. From the data
    folder's CSVs, else from cais/mmlu's "all" config (its `subject` column)."""
    root = _local_dir(data_dir, "mmlu")
    hub = _mmlu_hub(data_dir, split) if root is None else None
    out: list[Example] = []
    for subject in _select("MMLU subject", sorted(hub) if hub is not None
                           else mmlu_subjects(data_dir), subjects):
        rows = hub[subject][:limit_per_subject] if hub is not None \
            else _mmlu_csv(root, subject, split, limit_per_subject)
        for i, (question, options, letter) in enumerate(rows):
            lines = "\n".join(f"{k}. {o}" for k, o in zip("ABCD", options, strict=True))
            prompt = (f"The following is a multiple choice question about "
                      f"{subject.replace('_', ' ')}.\n\n{question}\n{lines}\n"
                      "Answer with the letter of the correct option.")
            out.append(Example(id=f"mmlu/{subject}/{split}-{i}", prompt=prompt,
                               response=letter, source=f"mmlu/{subject}",
                               choices=list("ABCD"), answer=letter))
    return out


def _mmlu_csv(root: Path, subject: str, split: str, limit: int | None) -> Iterator[_MmluRow]:
    """The rows of one subject's CSV (question, A, B, C, D, answer letter), up to `limit`."""
    path = root / split / f"{subject}_{split}.csv"
    if not path.exists():
        raise CcdsError(f"no MMLU {split} file for {subject}", str(path))
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        for i, row in enumerate(reader):
            if limit is not None and i >= limit:
                break
            if len(row) != 6 or row[5].strip() not in ("A", "B", "C", "D"):
                raise CcdsError("expected question, A, B, C, D, answer letter",
                                f"{path}:{reader.line_num}")
            question, *options, letter = (c.strip() for c in row)
            yield question, options, letter


def _mmlu_hub(data_dir: str | os.PathLike | None, split: MmluSplit) -> dict[str, list[_MmluRow]]:
    """cais/mmlu's rows by subject, in hub order: question, subject, choices (4 strings) and
    answer (0-3, the class label of A-D); cells stripped as the CSV loader strips them."""
    where, rows = _hub_rows(data_dir, "mmlu", "all", _MMLU_HUB_SPLIT[split])
    out: dict[str, list[_MmluRow]] = {}
    for k, r in enumerate(rows):
        choices, answer = r.get("choices"), r.get("answer")
        if not (isinstance(r.get("question"), str) and isinstance(r.get("subject"), str)
                and isinstance(choices, list) and len(choices) == 4
                and all(isinstance(c, str) for c in choices)
                and isinstance(answer, int) and 0 <= answer < 4):
            raise CcdsError("expected question, subject, 4 choices and answer 0-3",
                            f"{where} row {k}")
        out.setdefault(r["subject"], []).append(
            (r["question"].strip(), [c.strip() for c in choices], "ABCD"[answer]))
    return out


def mmlu_target(data_dir: str | os.PathLike | None = None, subjects: list[str] | None = None, *,
                n_test: int | None = None, name: str = "mmlu") -> Target:
    """V = dev (5 per subject), T = test (first `n_test` rows per subject if given)."""
    return Target(name, val=load_mmlu(data_dir, subjects, split="dev"),
                  test=load_mmlu(data_dir, subjects, limit_per_subject=n_test),
                  metric="mc", extract="first_line")


# --- BBH ----------------------------------------------------------------------------------

_OPTION_LABEL = re.compile(r"^(\([A-Z]\))", re.M)
_MAX_LABEL_SET = 10


BBH_TASKS = (
    "boolean_expressions", "causal_judgement", "date_understanding", "disambiguation_qa",
    "dyck_languages", "formal_fallacies", "geometric_shapes", "hyperbaton",
    "logical_deduction_five_objects", "logical_deduction_seven_objects",
    "logical_deduction_three_objects", "movie_recommendation", "multistep_arithmetic_two",
    "navigate", "object_counting", "penguins_in_a_table", "reasoning_about_colored_objects",
    "ruin_names", "salient_translation_error_detection", "snarks", "sports_understanding",
    "temporal_sequences", "tracking_shuffled_objects_five_objects",
    "tracking_shuffled_objects_seven_objects", "tracking_shuffled_objects_three_objects",
    "web_of_lies", "word_sorting")  # the 27 tasks: the hub copy's configs, one per task
_BBH_COT_FIX = ("BBH's V (the 3 chain-of-thought exemplars per task) is not on the hub: put "
                "cot-prompts/<task>.txt of github.com/suzgunmirac/BIG-Bench-Hard in "
                "bbh/cot-prompts/ of CCDS_DATA_DIR")


def bbh_tasks(data_dir: str | os.PathLike | None = None) -> list[str]:
    root = _local_dir(data_dir, "bbh")
    return sorted(p.stem for p in root.glob("*.json")) if root is not None else list(BBH_TASKS)


def load_bbh(data_dir: str | os.PathLike | None = None, tasks: list[str] | None = None, *,
             limit_per_task: int | None = None) -> list[Example]:
    """BBH examples (the usual T): prompt = input, response = answer = target; from the data
    folder's bbh/<task>.json, else the hub copy's <task> config (split test, input/target).

    Choices: the "(A)".."(K)" labels listed after "Options:" in the input, else (tasks with at
    most 10 distinct targets, e.g. True/False, valid/invalid) the sorted distinct targets.
    Three upstream examples have a target that is none of their own options (options split
    on commas: 1 in movie_recommendation, 2 in ruin_names); no option can score them, so they
    are dropped.
    """
    root = _local_dir(data_dir, "bbh")
    out: list[Example] = []
    for task in _select("BBH task", bbh_tasks(data_dir), tasks):
        if root is not None:
            where = str(root / f"{task}.json")
            data = read_json(where)
            rows = data.get("examples") if isinstance(data, dict) else None
            if not isinstance(rows, list):
                raise CcdsError("expected {\"examples\": [...]}", where)
        else:
            where, rows = _hub_rows(data_dir, "bbh", task, "test")
        out += _bbh_examples(task, rows, where, limit_per_task)
    return out


def _bbh_examples(task: str, rows: list[Any], where: str, limit: int | None) -> list[Example]:
    """One task's rows, from its file or its hub split alike: both sources parse one way."""
    for i, r in enumerate(rows):
        if not (isinstance(r, dict) and isinstance(r.get("input"), str)
                and isinstance(r.get("target"), str) and r["target"].strip()):
            raise CcdsError("example needs string input and non-empty target", f"{where} row {i}")
    labels = sorted({r["target"] for r in rows})
    label_set = labels if len(labels) <= _MAX_LABEL_SET else None
    out: list[Example] = []
    for i, r in enumerate(rows):
        if limit is not None and len(out) >= limit:
            break
        options = _OPTION_LABEL.findall(r["input"].partition("Options:")[2])
        choices = options or label_set
        if options and r["target"] not in options:
            log.debug("dropped %s row %d: target %r is not an option", where, i, r["target"])
            continue
        out.append(Example(id=f"bbh/{task}/test-{i}", prompt=r["input"], response=r["target"],
                           source=f"bbh/{task}", choices=list(choices) if choices else None,
                           answer=r["target"]))
    return out


def load_bbh_cot(data_dir: str | os.PathLike | None = None,
                 tasks: list[str] | None = None) -> list[Example]:
    """The 3 chain-of-thought exemplars per task (the usual V), from bbh/cot-prompts/ in the
    data folder, also when the examples come from the hub (which has no copy of them).

    Response = the whole reasoning after "A: "; answer = what follows the last
    "So the answer is " (trailing period stripped), in the same form as the T targets.
    """
    base = Path(data_dir) if data_dir is not None else default_data_dir()
    root = base / "bbh" / "cot-prompts" if base is not None else None
    out: list[Example] = []
    for task in _select("BBH task", bbh_tasks(data_dir), tasks):
        path = root / f"{task}.txt" if root is not None else None
        if path is None or not path.is_file():
            raise CcdsError(f"no chain-of-thought prompts for BBH task {task}",
                            str(path) if path is not None else None, _BBH_COT_FIX)
        for i, (question, reasoning, answer) in enumerate(parse_cot_prompt(path)):
            out.append(Example(id=f"bbh/{task}/cot-{i}", prompt=question, response=reasoning,
                               source=f"bbh/{task}", answer=answer))
    return out


def parse_cot_prompt(path: str | os.PathLike) -> list[tuple[str, str, str]]:
    """(question, reasoning, answer) per "Q: ... A: ..." block after the `-----` line."""
    text = read_text(path)
    head, sep, body = text.partition("\n-----\n")
    if not sep:
        raise CcdsError("no '-----' line before the exemplars", str(path))
    starts = [m.start() for m in re.finditer(r"^Q: ", body, flags=re.M)]
    out = []
    for start, end in zip(starts, [*starts[1:], len(body)], strict=True):
        line = head.count("\n") + 3 + body.count("\n", 0, start)
        question, sep, reasoning = body[start + 3:end].partition("\nA: ")
        answers = re.findall(r"So the answer is (.+)", reasoning)
        if not sep or not answers:
            raise CcdsError("exemplar needs 'A: ... So the answer is X.'", f"{path}:{line}")
        answer = answers[-1].strip()
        out.append((question.strip(), reasoning.strip(), answer.removesuffix(".").strip()))
    if not out:
        raise CcdsError("no 'Q: ' exemplars after the '-----' line", str(path))
    return out


def bbh_target(data_dir: str | os.PathLike | None = None, tasks: list[str] | None = None, *,
               n_test: int | None = None, name: str = "bbh") -> Target:
    val = load_bbh_cot(data_dir, tasks)  # first: it fails without a download when absent
    test = load_bbh(data_dir, tasks, limit_per_task=n_test)
    return Target(name, val=val, test=test, metric=_target_metric(test), extract="first_line")


# --- GSM8K --------------------------------------------------------------------------------


Gsm8kSplit = Literal["train", "test"]


def load_gsm8k(data_dir: str | os.PathLike | None = None,
               split: Gsm8kSplit = "train") -> list[Example]:
    """GSM8K: response = the full solution, answer = the number after "####" (no commas).
    From the data folder's <split>.jsonl, else openai/gsm8k's "main" config (question,
    answer), in file order either way: V's seeded pick depends on it."""
    root = _local_dir(data_dir, "gsm8k")
    if root is not None:
        path = root / f"{split}.jsonl"
        rows = [(f"{path}:{lineno}", row) for lineno, row in iter_jsonl(path)]
    else:
        where, hub = _hub_rows(data_dir, "gsm8k", "main", split)
        rows = [(f"{where} row {k}", row) for k, row in enumerate(hub)]
    out = []
    for i, (where, row) in enumerate(rows):
        question, solution = row.get("question"), row.get("answer")
        if not (isinstance(question, str) and isinstance(solution, str) and "####" in solution):
            raise CcdsError("expected string question and answer ending in '#### <n>'", where)
        answer = solution.rpartition("####")[2].strip().replace(",", "")
        out.append(Example(id=f"gsm8k/{split}-{i}", prompt=question, response=solution,
                           source="gsm8k", answer=answer))
    return out


def gsm8k_target(data_dir: str | os.PathLike | None = None, *, n_val: int = 8,
                 n_test: int | None = None, seed: int = 0) -> tuple[Target, list[str]]:
    """T = test (first `n_test`), V = `n_val` seeded train examples; also returns V's ids.

    V keeps its train ids, which are the ids `load_source("gsm8k")` gives, so a pool builder
    can exclude them (build_pool also drops them as exact copies of V).
    """
    train = load_gsm8k(data_dir, "train")
    val = [train[i] for i in sorted(random.Random(seed).sample(range(len(train)), n_val))]
    test = load_gsm8k(data_dir, "test")[:n_test]
    target = Target("gsm8k", val=val, test=test, metric="exact", extract="number")
    return target, [e.id for e in val]


# --- BIG-bench ----------------------------------------------------------------------------


def bigbench_tasks(data_dir: str | os.PathLike | None = None) -> list[str]:
    """Task names ("arithmetic/1_digit_addition") of every task.json, sorted; task folders
    may be symbolic links."""
    root = _dataset_dir(data_dir, "bigbench")
    return sorted(p.parent.relative_to(root).as_posix() for p in walk_files(root)
                  if p.name == "task.json")


def load_bigbench(data_dir: str | os.PathLike | None = None,
                  tasks: list[str] | None = None) -> list[Example]:
    """Examples of the BIG-bench JSON tasks (all, or `tasks`; a parent name selects its subtasks).

    Over all tasks, a broken task (malformed or huge file, no usable examples) is skipped and
    logged with a count; a task asked for by name must load, else CcdsError. Single examples
    without a usable target (e.g. empty strings) are skipped either way.
    """
    root = _dataset_dir(data_dir, "bigbench")
    available = bigbench_tasks(data_dir)
    if tasks is None:
        names = available
    else:
        names = []
        for t in tasks:
            matched = [a for a in available if a == t or a.startswith(t + "/")]
            if not matched:
                raise CcdsError(f"unknown BIG-bench task {t!r}",
                                str(root), "see the folder names under bigbench/")
            names += matched
        names = list(dict.fromkeys(names))
    out: list[Example] = []
    skipped: dict[str, str] = {}
    for name in names:
        try:
            out += load_bigbench_task(root / name / "task.json", name)
        except CcdsError as e:
            if tasks is not None:
                raise
            skipped[name] = str(e)
    if skipped:
        log.warning("skipped %d of %d BIG-bench tasks: %s", len(skipped), len(names),
                    "; ".join(skipped.values()))
    return out


def load_bigbench_task(path: str | os.PathLike, name: str) -> list[Example]:
    """One BIG-bench JSON task in BIG-bench's own zero-shot format.

    The task's `task_prefix`, `example_input_prefix` and `example_output_prefix` are applied,
    and for multiple choice the options are appended with `choice_prefix` unless
    `append_choices_to_input` is false, because many tasks are cloze frames whose bare input
    means nothing ("Today I " + "walk" + ". Yesterday I ") or instructions that live only in
    the prefix. BIG-bench's default "Q:"/"A:" prefixes are not added when a task sets none:
    prompt and response are already separate fields. Prompts are whitespace-stripped.
    Response: the first target, or for `target_scores` the highest-scored option (choices =
    the options in file order).
    """
    path = Path(path)
    if path.stat().st_size > BIGBENCH_MAX_BYTES:
        raise CcdsError(f"task file is over {BIGBENCH_MAX_BYTES >> 20} MB", str(path))
    data = read_json(path)
    rows = data.get("examples") if isinstance(data, dict) else None
    if not isinstance(rows, list):
        raise CcdsError("no 'examples' list", str(path))
    fmt = {k: data.get(k) for k in ("task_prefix", "example_input_prefix",
                                     "example_output_prefix", "choice_prefix")}
    fmt = {k: v if isinstance(v, str) else "" for k, v in fmt.items()}
    fmt["choice_prefix"] = fmt["choice_prefix"] or "\n  choice: "
    append = str(data.get("append_choices_to_input", True)).lower() != "false"
    out = []
    for i, row in enumerate(rows):
        ex = _bigbench_example(row, fmt, append)
        if ex is not None:
            prompt, response, choices, targets = ex
            out.append(Example(id=f"bigbench/{name}/{i}", prompt=prompt, response=response,
                               source=f"bigbench/{name}", choices=choices, answer=response,
                               metadata={"targets": targets} if len(targets) > 1 else {}))
    if not out:
        raise CcdsError(f"no usable examples (of {len(rows)})", str(path))
    return out


def _bigbench_example(row: Any, fmt: dict[str, str], append: bool
                      ) -> tuple[str, str, list[str] | None, list[str]] | None:
    """(prompt, response, choices, all targets), or None when the row has no usable target."""
    if not isinstance(row, dict) or not isinstance(row.get("input"), str):
        return None
    scores, target = row.get("target_scores"), row.get("target")
    choices = None
    if isinstance(scores, dict) and scores and all(
            isinstance(v, (int, float)) for v in scores.values()):
        choices = [str(k) for k in scores]
        targets = [max(choices, key=lambda k: scores[k])]
    elif isinstance(target, str):
        targets = [target]
    elif isinstance(target, list):
        targets = [t for t in target if isinstance(t, str) and t.strip()]
    else:
        return None
    if not targets or not targets[0].strip():
        return None
    task_prefix = row["task_prefix"] if isinstance(row.get("task_prefix"), str) \
        else fmt["task_prefix"]
    options = fmt["choice_prefix"] + fmt["choice_prefix"].join(choices) \
        if choices and append else ""
    prompt = (task_prefix + fmt["example_input_prefix"] + row["input"] + options
              + fmt["example_output_prefix"]).strip()
    return prompt, targets[0], choices, targets


def bigbench_target(data_dir: str | os.PathLike | None, tasks: list[str], *,
                    n_test: int | None = None, name: str | None = None) -> Target:
    """V = the first few examples of each (sub)task, T = the rest (first `n_test` if given)."""
    by_source: dict[str, list[Example]] = {}
    for e in load_bigbench(data_dir, tasks):
        by_source.setdefault(e.source, []).append(e)
    val: list[Example] = []
    test: list[Example] = []
    for exs in by_source.values():
        k = min(BIGBENCH_N_VAL, len(exs) // 2)
        val += exs[:k]
        test += exs[k:][:n_test]
    return Target(name or "bigbench:" + ",".join(tasks), val=val, test=test,
                  metric=_target_metric(test), extract="first_line")


# --- Alpaca -------------------------------------------------------------------------------


def load_alpaca(data_dir: str | os.PathLike | None = None) -> list[Example]:
    """Alpaca instruction data; the rows with an empty output (2 of 5,000) are skipped."""
    path = _dataset_dir(data_dir, "alpaca") / "alpaca_5000.json"
    return load_examples(path, source="alpaca", skip_empty=True)


# --- specs --------------------------------------------------------------------------------


def _spec(spec: str) -> tuple[str, list[str] | None]:
    name, _, arg = spec.partition(":")
    items = [s.strip() for s in arg.split(",") if s.strip()]
    return name.strip().lower(), items or None


def load_target(spec: str, data_dir: str | os.PathLike | None = None, *,
                n_test: int | None = None, seed: int = 0) -> Target:
    """A target from a spec string (see TARGET_FORMS); `n_test` caps T per subject/task."""
    if spec.strip() and Path(spec).is_dir():
        return load_target_folder(spec)
    name, items = _spec(spec)
    if name == "mmlu":
        return mmlu_target(data_dir, items, n_test=n_test, name=spec)
    if name == "bbh":
        return bbh_target(data_dir, items, n_test=n_test, name=spec)
    if name == "gsm8k" and items is None:
        return gsm8k_target(data_dir, n_test=n_test, seed=seed)[0]
    if name == "bigbench" and items:
        return bigbench_target(data_dir, items, n_test=n_test, name=spec)
    raise CcdsError(f"unknown target {spec!r}", fix=f"valid forms: {'; '.join(TARGET_FORMS)}")


def save_target(target: Target, folder: str | os.PathLike) -> None:
    """Write target.json + val.jsonl + test.jsonl, each atomically; target.json last."""
    folder = Path(folder)
    write_examples(target.val, folder / "val.jsonl")
    write_examples(target.test, folder / "test.jsonl")
    write_json(folder / "target.json",
               {"name": target.name, "metric": target.metric, "extract": target.extract})


def load_target_folder(folder: str | os.PathLike) -> Target:
    folder = Path(folder)
    meta = read_json(folder / "target.json")
    if not isinstance(meta, dict) or not isinstance(meta.get("name"), str):
        raise CcdsError("expected {name, metric, extract}", str(folder / "target.json"))
    if meta.get("metric", "nll") not in ("nll", "mc", "exact") or meta.get(
            "extract", "text") not in ("number", "first_line", "text"):
        raise CcdsError("bad metric or extract", str(folder / "target.json"),
                        "metric: nll|mc|exact; extract: number|first_line|text")
    for split in ("val", "test"):
        path = folder / f"{split}.jsonl"
        if path.exists() and not path.read_text(encoding="utf-8", errors="replace").strip():
            raise CcdsError(f"the target has no {'validation' if split == 'val' else 'test'} "
                            "examples", str(path), "a target needs V (to select with) and T "
                                                   "(to evaluate on)")
    return Target(meta["name"], val=load_examples(folder / "val.jsonl"),
                  test=load_examples(folder / "test.jsonl"),
                  metric=meta.get("metric", "nll"), extract=meta.get("extract", "text"))


def load_source(spec: str, data_dir: str | os.PathLike | None = None) -> list[Example]:
    """Pool candidates from a spec (see SOURCE_FORMS); other specs go to `load_examples`."""
    name, items = _spec(spec)
    if name == "bigbench" and not Path(spec).exists():
        return load_bigbench(data_dir, items)
    if name in ("gsm8k", "alpaca") and items is None and not Path(spec).exists():
        return load_gsm8k(data_dir, "train") if name == "gsm8k" else load_alpaca(data_dir)
    if "/" not in spec and Path(spec).suffix not in FILE_SUFFIXES and not Path(spec).exists():
        # a bare word is a misspelt source name: asking the hub about it only retries and fails
        raise CcdsError(f"unknown source {spec!r}", fix=f"valid forms: {'; '.join(SOURCE_FORMS)}")
    try:
        return load_examples(spec)
    except CcdsError as e:
        if e.what == "file not found" and e.where == spec:
            raise CcdsError(f"unknown source {spec!r}: no such file",
                            fix=f"valid forms: {'; '.join(SOURCE_FORMS)}") from None
        raise


def cap_test(target: Target, n: int | None) -> Target:
    """Cap T as a whole at `n`, except MMLU's and BBH's, which `load_target` caps per subject
    or task."""
    if n and not target.name.startswith(("mmlu", "bbh")):
        target.test = target.test[:n]
    return target
