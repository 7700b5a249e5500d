"""What ccds reads and writes: atomic files and folders, strict JSON/JSONL, content
hashes, locks, typed settings from YAML files (one `load_config` for the CLI and
`sweep.load_config`, so a bad setting reads the same wherever it comes from), and progress
bars on the terminal (tqdm on stderr; silent when stderr is not a terminal).

Every output ccds writes goes through `atomic_path`/`atomic_dir`, so a crash leaves either
the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from .errors import CcdsError

if TYPE_CHECKING:  # pydantic loads only where settings are read
    from pydantic import BaseModel


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file beside `path`; it replaces `path` only if the block succeeds.
    The file and then the folder are fsynced, so after a power cut the rename has either
    happened with all its bytes or not at all."""
    path = Path(path)
    _ensure_parent(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual mode
    try:
        yield Path(tmp)
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync(path.parent)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; it replaces `path` only if the block succeeds.

    On Linux the new folder and the old one swap names in one step (renameat2
    RENAME_EXCHANGE), so a reader never finds `path` missing or half-filled, and a crash
    leaves the old folder or the new one whole. Besides, a crash can leave the temporary
    folder (before the swap) or the old folder under that hidden name (between the swap and
    its removal), `.NAME.XXXXXXXX.tmp`; the next write to `path` removes it. Each live one
    is flock-ed by its writer, so a concurrent write is never touched (where flock fails, as
    on some network file systems, none is removed). Where the swap is unavailable (not
    Linux, or a file system without it) the old folder is renamed to `.NAME.old` first: a
    crash between the two renames leaves no folder at `path` and the old one there. Files
    and folders are fsynced before the swap, the parent after it.
    """
    path = Path(path)
    _ensure_parent(path)
    _remove_stale(path)
    tmp, lock = _locked_tmpdir(path)
    try:
        yield tmp
        for root, dirs, files in os.walk(tmp):
            for name in files + dirs:
                _fsync(os.path.join(root, name))
        _fsync(tmp)
        if not os.path.lexists(path):
            os.replace(tmp, path)
        elif _exchange(tmp, path):
            _remove(tmp)  # the old folder, now under the temporary name
        else:
            old = path.with_name(f".{path.name}.old")
            _remove(old)
            os.replace(path, old)
            os.replace(tmp, path)
            _remove(old)
    except BaseException:
        _remove(tmp)
        raise
    finally:
        os.close(lock)
    _fsync(path.parent)


def _locked_tmpdir(path: Path) -> tuple[Path, int]:
    """A new `.NAME.*.tmp` folder beside `path` and an fd holding its flock: the mark of a
    live write, which `_remove_stale` leaves alone."""
    import fcntl

    while True:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        fd = os.open(tmp, os.O_RDONLY)
        with contextlib.suppress(OSError):  # no flock here: then no cleaner removes it either
            fcntl.flock(fd, fcntl.LOCK_EX)
        with contextlib.suppress(FileNotFoundError):  # else a cleaner took it before the lock
            if os.path.samestat(os.fstat(fd), os.lstat(tmp)):
                os.chmod(tmp, 0o777 & ~_umask())
                return tmp, fd
        os.close(fd)


def _remove_stale(path: Path) -> None:
    """Remove the temporary folders of `path` that no live `atomic_dir` holds: a crash's."""
    import fcntl

    name = re.compile(rf"\.{re.escape(path.name)}\.[a-z0-9_]{{8}}\.tmp")  # mkdtemp's names
    for e in os.scandir(path.parent):
        if not (name.fullmatch(e.name) and e.is_dir(follow_symlinks=False)):
            continue
        try:
            fd = os.open(e.path, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            shutil.rmtree(e.path, ignore_errors=True)  # under the lock: see _locked_tmpdir
        except OSError:  # held: a write in progress
            pass
        finally:
            os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where the system
    or the file system cannot."""
    fn = _renameat2()
    if fn is None:
        return False
    if fn(-100, os.fsencode(a), -100, os.fsencode(b), 2) == 0:  # AT_FDCWD, RENAME_EXCHANGE
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


@functools.cache
def _renameat2():
    if sys.platform != "linux":
        return None
    fn = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)  # glibc >= 2.28
    if fn is not None:
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                       ctypes.c_uint]
    return fn


def _remove(path: Path) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


@contextlib.contextmanager
def locked(path: str | os.PathLike) -> Iterator[None]:
    """An exclusive lock on `path` (created if missing) for the duration of the block, so
    two processes never fill the same cache folder at once."""
    import fcntl

    _ensure_parent(Path(path))
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def safe_name(s: str) -> str:
    """A file name made from data (a target or model name): letters, digits, '.', '-' and
    '_' only, no leading dot, so it cannot leave the folder it is written into."""
    out = "".join(c if c.isascii() and (c.isalnum() or c in "._-") else "_" for c in s)
    return out.lstrip(".") or "_"


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=_jsonable) + "\n")


def write_jsonl(path: str | os.PathLike, rows: Any) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, default=_jsonable) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    """Parse a JSON file; a syntax error names the file and line."""
    path = Path(path)
    text = read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise CcdsError(f"malformed JSON ({e.msg})", f"{path}:{e.lineno}",
                        "fix the file or regenerate it") from None


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, object) for each non-blank line; bad lines name file:line."""
    path = Path(path)
    _check_file(path)
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                raise CcdsError("line is not valid UTF-8", where,
                                "re-encode the file as UTF-8") from None
            except json.JSONDecodeError as e:
                raise CcdsError(f"malformed JSON line ({e.msg})", where,
                                "each line must be one JSON object") from None
            if not isinstance(obj, dict):
                raise CcdsError(f"expected a JSON object, got {type(obj).__name__}", where,
                                "each line must be one JSON object")
            yield lineno, obj


def read_text(path: str | os.PathLike) -> str:
    path = Path(path)
    _check_file(path)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise CcdsError("file is not valid UTF-8", f"{path}:{line}",
                        "re-encode the file as UTF-8") from None


def walk_files(root: str | os.PathLike) -> Iterator[Path]:
    """Every file under `root`, depth first by name, as paths below `root` (not resolved).

    Symbolic links to folders are followed, since datasets on shared clusters are often
    linked in (`Path.rglob` skips them before Python 3.13), but each real folder is entered
    once, so a link cycle ends. Hidden entries (.git, .cache) are never data and are skipped,
    and so are unreadable folders, as `rglob` skips them.
    """
    seen: set[tuple[int, int]] = set()
    stack = [Path(root)]
    while stack:
        folder = stack.pop()
        try:
            st = folder.stat()
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            continue
        subfolders = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_dir():  # follows links
                subfolders.append(Path(entry.path))
            elif entry.is_file():
                yield Path(entry.path)
        stack += reversed(subfolders)


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def stable_hash(*parts: Any) -> str:
    """Short content hash of JSON-able parts (configs, example lists), for cache keys."""
    h = hashlib.sha256()
    for p in parts:
        h.update(json.dumps(p, sort_keys=True, ensure_ascii=False, default=_jsonable).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def _check_file(path: Path) -> None:
    if not path.exists():
        raise CcdsError("file not found", str(path), "check the path")
    if path.is_dir():
        raise CcdsError("expected a file, found a directory", str(path))


def _ensure_parent(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CcdsError(f"cannot create output folder ({e.strerror})", str(path.parent),
                        "choose a writable location") from None
    if not os.access(path.parent, os.W_OK):
        raise CcdsError("output folder is not writable", str(path.parent),
                        "choose a writable location")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync(path: str | os.PathLike) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _jsonable(o: Any) -> Any:
    if hasattr(o, "model_dump"):
        return o.model_dump()
    if hasattr(o, "to_dict"):
        return o.to_dict()
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


# -- typed settings from YAML files and the command line ----------------------------------

M = TypeVar("M", bound="BaseModel")


def load_config(model_cls: type[M], path: Path | None = None,
                overrides: dict[str, Any] | None = None) -> M:
    """`model_cls` from an optional YAML file, with `overrides` (None values ignored) on top.
    A malformed file or a bad setting is a CcdsError naming the file, line and setting."""
    import yaml
    from pydantic import ValidationError

    base: dict[str, Any] = {}
    if path is not None:
        try:
            base = yaml.safe_load(read_text(path)) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark else str(path)
            raise CcdsError(f"malformed YAML ({getattr(e, 'problem', e)})", where) from None
        if not isinstance(base, dict):
            raise CcdsError("expected a mapping of settings", str(path))
    base.update({k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        return model_cls(**base)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(map(str, err["loc"])) or "config"
        raise CcdsError(f"bad setting '{loc}': {err['msg']}", str(path) if path else None,
                        f"see `ccds ... --help` for valid {model_cls.__name__} settings") from None


def parse_params(items: list[str] | None, flag: str = "--param") -> dict[str, Any]:
    """`name=value` strings (values read as YAML: 3, 0.5, true, [a, b]) as a dict."""
    import yaml

    out: dict[str, Any] = {}
    for item in items or []:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise CcdsError(f"bad {flag} {item!r}", None, f"use {flag} name=value")
        out[key.strip()] = yaml.safe_load(value)
    return out


# -- progress on the terminal -------------------------------------------------------------

T = TypeVar("T")


class _Silent:
    def update(self, n: int = 1) -> None: ...
    def set_postfix_str(self, s: str) -> None: ...
    def close(self) -> None: ...


def bar(total: int | None, desc: str | None, unit: str = "it") -> Any:
    """A tqdm bar when `desc` is set and stderr is a terminal (or CCDS_PROGRESS=1)."""
    show = desc is not None and (sys.stderr.isatty() or os.environ.get("CCDS_PROGRESS") == "1")
    if not show:
        return _Silent()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True)


def track(items: Iterable[T], desc: str | None, total: int | None = None) -> Iterator[T]:
    n = total if total is not None else (len(items) if hasattr(items, "__len__") else None)
    b = bar(n, desc)
    try:
        for x in items:
            yield x
            b.update()
    finally:
        b.close()
