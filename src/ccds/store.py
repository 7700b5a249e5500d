"""The run store: one SQLite file per sweep, one row per finished run.

A row is inserted in a single transaction after its run has finished, so a killed sweep
leaves either a whole row or none; the key (a hash of everything that determines the run)
makes re-running a finished run a no-op and a duplicate impossible.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

from .errors import CcdsError

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    key TEXT PRIMARY KEY,
    config_hash TEXT NOT NULL,
    target TEXT NOT NULL,
    model TEXT NOT NULL,
    method TEXT NOT NULL,
    fraction REAL NOT NULL,
    seed INTEGER NOT NULL,
    selection_flops REAL NOT NULL,
    training_flops REAL NOT NULL,
    perf REAL NOT NULL,
    result TEXT NOT NULL,
    created REAL NOT NULL DEFAULT (julianday('now'))
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


class Store:
    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._db(write=True) as db:
            db.executescript(SCHEMA)

    @contextmanager
    def _db(self, write: bool = False) -> Iterator[sqlite3.Connection]:
        """A connection (one transaction when `write`); a file that is not a database, a
        damaged one, or one that cannot be opened is the user's to fix, so a CcdsError."""
        try:
            with closing(sqlite3.connect(self.path, timeout=60)) as db:
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=FULL")
                if write:
                    with db:
                        yield db
                else:
                    yield db
        except sqlite3.DatabaseError as e:
            raise CcdsError(f"cannot use the run store ({e})", str(self.path),
                            "give a sweep's runs.sqlite; move a damaged one aside and re-run "
                            "the sweep") from None

    def has(self, key: str) -> bool:
        with self._db() as db:
            return db.execute("SELECT 1 FROM runs WHERE key = ?", (key,)).fetchone() is not None

    def add(self, key: str, config_hash: str, row: dict[str, Any]) -> None:
        """Insert a finished run (ignored if its key is already there)."""
        with self._db(write=True) as db:
            db.execute(
                "INSERT OR IGNORE INTO runs (key, config_hash, target, model, method, fraction,"
                " seed, selection_flops, training_flops, perf, result)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (key, config_hash, row["target"], row["model"], row["method"], row["fraction"],
                 row["seed"], row["selection_flops"], row["training_flops"], row["perf"],
                 json.dumps(row, default=str)))

    def runs(self) -> Iterator[dict[str, Any]]:
        with self._db() as db:
            for (result,) in db.execute("SELECT result FROM runs ORDER BY target, model, method,"
                                        " fraction, seed"):
                yield json.loads(result)

    def set_meta(self, key: str, value: Any) -> None:
        with self._db(write=True) as db:
            db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                       (key, json.dumps(value, default=str)))

    def meta(self) -> dict[str, Any]:
        with self._db() as db:
            return {k: json.loads(v) for k, v in db.execute("SELECT key, value FROM meta")}
