"""Generic pool I/O: read examples from JSONL/JSON/Parquet/HF datasets and write them back.

Candidate pools arrive in whatever layout their authors chose; `load_examples` recognises the
common ones so a user can point ccds at a file without writing a converter, and every bad row
is reported as one line naming the file and the line (or row index). Selected subsets leave
in the layouts the training stacks read (`write_subset`, spec §8), each with a sidecar that
ties it to its pool and method so it can be checked (`check_sidecar`) and reproduced.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, get_args

from .. import __version__
from ..errors import CcdsError
from ..io import (
    atomic_dir,
    atomic_path,
    file_sha256,
    iter_jsonl,
    locked,
    read_json,
    walk_files,
    write_json,
    write_jsonl,
)
from .types import Example

FILE_SUFFIXES = (".jsonl", ".json", ".parquet")
FORMATS = ("jsonl", "parquet", "hf")

# Flat layouts as (prompt column, response column), tried in this order; chat `messages` last.
_FLAT_LAYOUTS = [("prompt", "response"), ("prompt", "completion"), ("instruction", "output"),
                 ("question", "answer")]
_TRIED = ", ".join(f"{p}/{r}" for p, r in _FLAT_LAYOUTS) + ", messages, conversations"
_FIELDS = ("prompt", "response", "id", "source", "choices", "answer", "metadata")
_HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")
log = logging.getLogger(__name__)

Row = tuple[str, int, str, dict[str, Any]]  # (stem, row index, where, row)


MAX_EXAMPLE_CHARS = 1_000_000  # far beyond any context window; larger is a broken row


def load_examples(ref: str | os.PathLike, *, columns: dict[str, str] | None = None,
                  source: str | None = None, split: str = "train",
                  limit: int | None = None, skip_empty: bool = False) -> list[Example]:
    """Read examples from a file, a dataset folder, or a Hugging Face hub id.

    `columns` maps our fields (prompt, response, id, source, choices, answer, metadata) to the
    dataset's columns; without it the layout is detected per row. Ids default to
    `<file stem>-<row index>`; the source to the row's `source`/`task`, else `source`, else
    the file stem. An empty response is an error unless `skip_empty` (real pools such as
    Alpaca have a few), which drops and logs them.
    """
    if columns is not None:
        _check_columns(columns)
    examples: list[Example] = []
    first_seen: dict[str, str] = {}
    empty: list[str] = []
    for stem, i, where, row in itertools.islice(_rows(ref, split), limit):
        ex = _to_example(row, where, columns, f"{stem}-{i}", source or stem)
        if not ex.response.strip():
            if not skip_empty:
                raise CcdsError("empty response", where,
                                "every example needs a non-empty response")
            empty.append(where)
            continue
        size = len(ex.prompt) + len(ex.response)
        if size > MAX_EXAMPLE_CHARS:
            raise CcdsError(f"example of {size / 1e6:.1f} MB of text (limit "
                            f"{MAX_EXAMPLE_CHARS / 1e6:.0f} MB)", where,
                            "drop or split it; models see at most a few thousand tokens")
        if ex.id in first_seen:
            raise CcdsError(f"duplicate id {ex.id!r} (first at {first_seen[ex.id]})", where,
                            "ids must be unique; drop the id column to number rows instead")
        first_seen[ex.id] = where
        examples.append(ex)
    if empty:
        log.info("skipped %d examples with an empty response: %s", len(empty),
                 ", ".join(empty[:5]))
    if not examples:
        raise CcdsError("no examples found", str(ref), "the pool must not be empty")
    return examples


def write_examples(examples: Iterable[Example], path: str | os.PathLike,
                   fmt: str | None = None) -> None:
    """Write examples atomically as JSONL, Parquet, or a HF dataset folder.

    Without `fmt` the suffix decides (.jsonl, .parquet; anything else is a HF folder).
    Parquet and HF store `metadata` as a JSON string so arbitrary dicts survive Arrow's schema.
    """
    path = Path(path)
    fmt = fmt or {".jsonl": "jsonl", ".parquet": "parquet"}.get(path.suffix, "hf")
    if fmt not in FORMATS:
        raise CcdsError(f"unknown output format {fmt!r}", str(path),
                        f"use one of {', '.join(FORMATS)}")
    if fmt == "jsonl":
        write_jsonl(path, (e.to_dict() for e in examples))
        return
    import pyarrow as pa

    schema = pa.schema([("id", pa.string()), ("prompt", pa.string()), ("response", pa.string()),
                        ("source", pa.string()), ("choices", pa.list_(pa.string())),
                        ("answer", pa.string()), ("metadata", pa.string())])
    rows = [{"id": e.id, "prompt": e.prompt, "response": e.response, "source": e.source,
             "choices": e.choices, "answer": e.answer,
             "metadata": json.dumps(e.metadata, ensure_ascii=False) if e.metadata else None}
            for e in examples]
    if fmt == "parquet":
        import pyarrow.parquet as pq

        with atomic_path(path) as tmp:
            pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp)
    else:
        import datasets

        features = datasets.Features.from_arrow_schema(schema)
        quiet = datasets.are_progress_bars_disabled()
        datasets.disable_progress_bars()  # a per-save bar is noise in CLI output and logs
        try:
            with atomic_dir(path) as tmp:
                datasets.Dataset.from_list(rows, features=features).save_to_disk(str(tmp))
        finally:
            if not quiet:
                datasets.enable_progress_bars()


# --- subsets for the training stacks -------------------------------------------------------

SubsetFormat = Literal["ccds", "messages", "prompt-completion", "alpaca", "sharegpt"]
"""ccds: `write_examples`' layouts (the suffix picks JSONL, Parquet or a HF folder);
messages: chat JSONL (TRL, open-instruct); prompt-completion: TRL's standard prompt-completion;
alpaca and sharegpt: LLaMA-Factory's two layouts (axolotl reads alpaca too)."""
SUBSET_FORMATS: tuple[SubsetFormat, ...] = get_args(SubsetFormat)
SUBSET_SUFFIX: dict[SubsetFormat, str] = {"ccds": ".jsonl", "messages": ".jsonl",
                                          "prompt-completion": ".jsonl", "alpaca": ".json",
                                          "sharegpt": ".json"}
"""The usual file suffix of each format, for callers that name the subset file themselves."""
SIDECAR_SUFFIX = ".selection.json"
DATASET_INFO = "dataset_info.json"
_SIDECAR_NEEDS = ("method", "params", "pool_hash", "scores")
# LLaMA-Factory's description of each of its layouts, as a dataset_info.json entry holds it
_LLAMA_FACTORY: dict[str, dict[str, Any]] = {
    "alpaca": {"columns": {"prompt": "instruction", "query": "input", "response": "output"}},
    "sharegpt": {"columns": {"messages": "conversations"},
                 "tags": {"role_tag": "from", "content_tag": "value", "user_tag": "human",
                          "assistant_tag": "gpt"}},
}


def sidecar_path(path: str | os.PathLike) -> Path:
    """`<stem>.selection.json` beside a subset file or folder."""
    path = Path(path)
    return path.with_name(path.stem + SIDECAR_SUFFIX)


def write_subset(examples: Sequence[Example], path: str | os.PathLike,
                 format: SubsetFormat = "ccds", *, sidecar: dict[str, Any]) -> Path:
    """Write a selected subset, in selection order, for the stack that will train on it;
    returns the sidecar's path.

    The sidecar (`<stem>.selection.json`) is what makes the subset checkable and
    reproducible: the caller's `method`, `params`, `pool_hash` (`score.base.examples_hash`
    of the pool; this layer does not compute it, so it cannot drift from the scorer's) and
    `scores` (one per example, in the same order), plus any other keys it passes (budget,
    target); the ids, the format and the file's SHA-256 are added here. alpaca and sharegpt
    also get their entry, named after the stem, in the folder's LLaMA-Factory
    `dataset_info.json` (merged into one already there). Each file is written atomically:
    the subset first, then its sidecar, then the entry.
    """
    path = check_subset_path(path, format)
    missing = [k for k in _SIDECAR_NEEDS if k not in sidecar]
    if missing or len(sidecar["scores"]) != len(examples):
        raise ValueError(f"sidecar needs {', '.join(_SIDECAR_NEEDS)} with one score per "
                         f"example (missing {missing}, {len(examples)} examples)")
    if format == "ccds":
        write_examples(examples, path)
    else:
        rows = [_subset_row(e, format) for e in examples]
        if path.suffix == ".json":
            write_json(path, rows)
        else:
            write_jsonl(path, rows)
    side = sidecar_path(path)
    head = {"format": format, "file": path.name,
            "sha256": file_sha256(path) if path.is_file() else None, "n": len(examples),
            "ccds_version": __version__}
    tail = {"ids": [e.id for e in examples], "scores": list(sidecar["scores"])}
    write_json(side, head | {k: v for k, v in sidecar.items() if k not in head | tail} | tail)
    if format in _LLAMA_FACTORY:
        _add_dataset_info(path, {"file_name": path.name, "formatting": format,
                                 **_LLAMA_FACTORY[format], "num_samples": len(examples)})
    return side


def check_subset_path(path: str | os.PathLike, format: SubsetFormat) -> Path:
    """`path` if a subset in `format` may be written there; callers check before scoring, so
    a bad name fails before the work rather than after it."""
    path = Path(path)
    if format not in SUBSET_FORMATS:
        raise CcdsError(f"unknown subset format {format!r}", str(path),
                        f"use one of {', '.join(SUBSET_FORMATS)}")
    if format != "ccds" and (path.suffix not in (".jsonl", ".json")
                             or path.name == DATASET_INFO):
        stem = "subset" if path.name == DATASET_INFO else path.stem
        raise CcdsError(f"a {format} subset is a .jsonl or .json file other than "
                        f"{DATASET_INFO}", str(path), f"name it e.g. {stem}"
                        f"{SUBSET_SUFFIX[format]}")
    return path


def check_sidecar(path: str | os.PathLike, pool_hash: str | None) -> dict[str, Any]:
    """The sidecar of the subset at `path` (or the sidecar itself), checked against the pool
    the caller means to use it with (`pool_hash`: `score.base.examples_hash` of that pool;
    None where no pool is at hand, as for runs read back by `ccds analyze`), so a subset is
    never trained or reported against a pool it was not selected from; a subset file edited
    since is refused too. Returns the sidecar."""
    path = Path(path)
    side = path if path.name.endswith(SIDECAR_SUFFIX) else sidecar_path(path)
    if not side.is_file():
        raise CcdsError("no selection sidecar", str(side),
                        "select with ccds, which writes one beside the subset")
    d = read_json(side)
    if not isinstance(d, dict) or not isinstance(d.get("pool_hash"), str):
        raise CcdsError("not a selection sidecar (no pool_hash)", str(side),
                        "give the .selection.json that ccds wrote beside the subset")
    if pool_hash is not None and d["pool_hash"] != pool_hash:
        raise CcdsError(f"the subset was selected from another pool (pool hash "
                        f"{d['pool_hash'][:12]}, this pool's {pool_hash[:12]})", str(side),
                        "give the pool it was selected from, or select again from this one")
    data = side.parent / str(d.get("file", ""))
    if d.get("sha256") and data.is_file() and file_sha256(data) != d["sha256"]:
        raise CcdsError("the subset file changed after it was selected (SHA-256 differs from "
                        "its sidecar's)", str(data), "select again rather than edit a subset")
    return d


def _subset_row(e: Example, format: SubsetFormat) -> dict[str, Any]:
    """One row of a foreign layout; `id` and `source` ride along (open-instruct's Tulu rows
    carry both; the other readers ignore columns they do not map) so a row can be joined
    back to the pool."""
    if format == "messages":
        body: dict[str, Any] = {"messages": [{"role": "user", "content": e.prompt},
                                             {"role": "assistant", "content": e.response}]}
    elif format == "prompt-completion":
        # TRL joins the two with nothing between; without a chat template ccds trains on
        # `{prompt}\n{response}` (tokenize.Formatter), so the newline is written here
        body = {"prompt": e.prompt + "\n", "completion": e.response}
    elif format == "alpaca":
        body = {"instruction": e.prompt, "input": "", "output": e.response}
    else:
        body = {"conversations": [{"from": "human", "value": e.prompt},
                                  {"from": "gpt", "value": e.response}]}
    return {"id": e.id, **body, "source": e.source}


def _add_dataset_info(path: Path, entry: dict[str, Any]) -> None:
    """Put `entry` under the subset's stem in the folder's dataset_info.json, keeping the
    others; under a lock, so parallel selections into one folder do not drop each other's."""
    info = path.parent / DATASET_INFO
    with locked(path.parent / f".{DATASET_INFO}.lock"):
        entries = read_json(info) if info.exists() else {}
        if not isinstance(entries, dict):
            raise CcdsError(f"expected a JSON object, got {type(entries).__name__}", str(info),
                            "LLaMA-Factory's dataset_info.json maps names to datasets; move "
                            "this file away")
        write_json(info, entries | {path.stem: entry})


# --- reading rows -------------------------------------------------------------------------


def _rows(ref: str | os.PathLike, split: str) -> Iterator[Row]:
    path = Path(ref)
    if path.is_dir():
        if (path / "state.json").exists() or (path / "dataset_dict.json").exists():
            import datasets

            yield from _dataset_rows(datasets.load_from_disk(str(path)), split, path.name,
                                     str(path))
            return
        files = _data_files(path, split)
        if not files:
            raise CcdsError("folder holds no .jsonl/.json/.parquet files or saved HF dataset",
                            str(path))
        for f in files:
            yield from _file_rows(f)
    elif path.exists():
        yield from _file_rows(path)
    elif path.suffix not in FILE_SUFFIXES and _HUB_ID.fullmatch(str(ref)):
        yield from _hub_rows(str(ref), split)
    else:
        raise CcdsError("file not found", str(ref),
                        "give a .jsonl/.json/.parquet file, a dataset folder, or a hub id")


def _data_files(folder: Path, split: str) -> list[Path]:
    """Data files under `folder` (linked folders included, hidden ones not; subset sidecars
    and LLaMA-Factory's dataset_info.json are metadata); when some are named after `split`
    (HF repo style), only those."""
    files = sorted(p for p in walk_files(folder) if p.suffix in FILE_SUFFIXES
                   and not p.name.endswith(SIDECAR_SUFFIX) and p.name != DATASET_INFO)
    in_split = [p for p in files
                if split in re.split(r"[-_./\\]", str(p.relative_to(folder)))]
    return in_split or files


def _file_rows(path: Path) -> Iterator[Row]:
    stem = path.stem
    if path.suffix == ".jsonl":
        for i, (lineno, obj) in enumerate(iter_jsonl(path)):
            yield stem, i, f"{path}:{lineno}", obj
    elif path.suffix == ".json":
        try:
            data = read_json(path)
        except CcdsError as e:
            if "Extra data" not in e.what:  # HF's to_json writes JSON lines into .json files
                raise
            for i, (lineno, obj) in enumerate(iter_jsonl(path)):
                yield stem, i, f"{path}:{lineno}", obj
            return
        if not isinstance(data, list):
            raise CcdsError(f"expected a JSON list of objects, got {type(data).__name__}",
                            str(path), "use a list of objects or JSONL")
        for i, obj in enumerate(data):
            if not isinstance(obj, dict):
                raise CcdsError(f"expected a JSON object, got {type(obj).__name__}",
                                f"{path} row {i}")
            yield stem, i, f"{path} row {i}", obj
    elif path.suffix == ".parquet":
        yield from _parquet_rows(path)
    else:
        raise CcdsError(f"unsupported file type {path.suffix!r}", str(path),
                        "use .jsonl, .json, .parquet, or a dataset folder")


def _parquet_rows(path: Path) -> Iterator[Row]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=4096)
        rows = (row for batch in batches for row in batch.to_pylist())
        for i, row in enumerate(rows):
            yield path.stem, i, f"{path} row {i}", row
    except (pa.ArrowException, OSError) as e:
        raise CcdsError(f"cannot read Parquet ({e})", str(path),
                        "check the file is valid Parquet") from None


def _dataset_rows(ds: Any, split: str, stem: str, where: str) -> Iterator[Row]:
    if hasattr(ds, "keys"):  # DatasetDict
        if split not in ds:
            raise CcdsError(f"no split {split!r} (has: {', '.join(ds.keys())})", where,
                            "pass split=<one of those>")
        ds = ds[split]
    for i, row in enumerate(ds):
        yield stem, i, f"{where} row {i}", row


def _hub_rows(ref: str, split: str) -> Iterator[Row]:
    import datasets

    try:
        ds = datasets.load_dataset(ref, split=split)
    except Exception as e:  # network, auth, missing repo: all user-fixable
        raise CcdsError(f"cannot load hub dataset ({type(e).__name__}: {e})".splitlines()[0],
                        ref, "check the id and network access, or give a local path") from None
    yield from _dataset_rows(ds, split, ref.rsplit("/", 1)[-1], f"{ref}[{split}]")


# --- rows -> examples ---------------------------------------------------------------------


def _check_columns(columns: dict[str, str]) -> None:
    unknown = set(columns) - set(_FIELDS)
    missing = {"prompt", "response"} - set(columns)
    if unknown or missing:
        raise CcdsError(f"bad column mapping {columns!r}",
                        fix=f"keys must include prompt and response, from: {', '.join(_FIELDS)}")


def _to_example(row: dict[str, Any], where: str, columns: dict[str, str] | None,
                default_id: str, default_source: str) -> Example:
    if columns is not None:
        prompt = _text(row, columns["prompt"], where)
        response = _text(row, columns["response"], where)
        used = {columns["prompt"], columns["response"]}
        names = {f: columns.get(f, f) for f in ("id", "choices", "answer", "metadata")}
        names["source"] = columns.get("source") or ("source" if "source" in row else "task")
    else:
        prompt, response, used = _detect(row, where)
        names = {f: f for f in ("id", "choices", "answer", "metadata")}
        names["source"] = "source" if row.get("source") is not None else "task"
    opt = {f: row.get(col) if col not in used else None for f, col in names.items()}
    ex_id = _scalar(opt["id"], "id", where)
    answer = _scalar(opt["answer"], "answer", where)
    src = opt["source"]
    if src is not None and not isinstance(src, str):
        raise CcdsError(f"field 'source' must be a string, got {type(src).__name__}", where)
    choices = opt["choices"]
    if choices is not None and not (isinstance(choices, list)
                                    and all(isinstance(c, str) for c in choices)):
        raise CcdsError("field 'choices' must be a list of strings", where)
    if choices is not None and response not in choices:
        raise CcdsError("response is not one of the choices", where,
                        "the response of a multiple-choice example is the gold option")
    return Example(id=ex_id if ex_id is not None else default_id, prompt=prompt,
                   response=response, source=src or default_source, choices=choices,
                   answer=answer, metadata=_metadata(opt["metadata"]))


def _detect(row: dict[str, Any], where: str) -> tuple[str, str, set[str]]:
    """(prompt, response, columns used) for the first layout whose columns the row has."""
    present = {k for k, v in row.items() if v is not None}
    for p, r in _FLAT_LAYOUTS:
        if p in present and r in present:
            prompt = _text(row, p, where)
            response = _text(row, r, where)
            if p == "instruction":
                extra = _text(row, "input", where) if row.get("input") is not None else ""
                prompt = f"{prompt}\n\n{extra}" if extra.strip() else prompt
            return prompt, response, {p, r}
    if "messages" in present:
        return (*_chat(row["messages"], where), {"messages"})
    if "conversations" in present:  # sharegpt (LLaMA-Factory): from/value turns
        turns = row["conversations"]
        if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
            raise CcdsError("field 'conversations' must be a list of {from, value}", where)
        roles = {"human": "user", "gpt": "assistant"}
        return (*_chat([{"role": roles.get(t.get("from"), t.get("from")),
                         "content": t.get("value")} for t in turns], where),
                {"conversations"})
    raise CcdsError(f"missing fields: no known layout matches columns {sorted(present)} "
                    f"(tried {_TRIED})", where, "pass columns={'prompt': ..., 'response': ...}")


def _chat(messages: Any, where: str) -> tuple[str, str]:
    """Last assistant turn is the response; the system message and earlier turns, the prompt."""
    if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str) for m in messages):
        raise CcdsError("field 'messages' must be a list of {role, content} strings", where)
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        raise CcdsError("chat has no assistant message to use as the response", where)
    system = [m["content"] for m in messages[:last] if m["role"] == "system"]
    turns = [m for m in messages[:last] if m["role"] != "system"]
    if len(turns) == 1 and turns[0]["role"] == "user":
        body = [turns[0]["content"]]
    else:
        body = [f"{m['role'].capitalize()}: {m['content']}" for m in turns]
    return "\n\n".join(system + body), messages[last]["content"]


def _text(row: dict[str, Any], col: str, where: str) -> str:
    value = row.get(col)
    if value is None:
        raise CcdsError(f"missing field {col!r}", where)
    if not isinstance(value, str):
        raise CcdsError(f"field {col!r} must be a string, got {type(value).__name__}", where)
    return value


def _scalar(value: Any, name: str, where: str) -> str | None:
    """Ids and answers may be numbers in foreign data; anything else non-string is an error."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise CcdsError(f"field {name!r} must be a string, got {type(value).__name__}", where)


def _metadata(value: Any) -> dict[str, Any]:
    """Metadata is a dict, or (Parquet/HF) its JSON string; other values are kept under a key."""
    if value is None:
        return {}
    if isinstance(value, str):
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = None
        if isinstance(parsed, dict):
            return parsed
    return value if isinstance(value, dict) else {"metadata": value}
