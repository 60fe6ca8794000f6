"""``DIR/ledger.sqlite``: the durable record of a batch run (one row per screening job, keyed by
the recording's sha256 plus the infant data, and the paths that point at them). WAL, every write
its own committed transaction, so a killed run loses only the jobs in flight."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from collections.abc import Iterable
from pathlib import Path

from mam.batch.archive import Item

LEDGER = "ledger.sqlite"


def job_key(sha256: str, infant: dict[str, str]) -> str:
    """Ledger key: the content hash, plus a digest of the infant data when there are any (the same
    recording with other infant data is another result)."""
    if not infant:
        return sha256
    blob = json.dumps(infant, sort_keys=True).encode()
    return f"{sha256}+{hashlib.sha256(blob).hexdigest()[:16]}"


_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    key TEXT PRIMARY KEY,
    sha256 TEXT,
    kind TEXT,
    status TEXT NOT NULL CHECK (status IN ('done', 'failed')),
    error_code TEXT,
    error TEXT,
    result TEXT,
    finished_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS paths (
    path TEXT NOT NULL,
    id TEXT NOT NULL,
    key TEXT NOT NULL,
    sha256 TEXT,
    size INTEGER,
    mtime_ns INTEGER,
    PRIMARY KEY (path, id)
);
"""


class Ledger:
    """``DIR/ledger.sqlite``: jobs (one per content hash and infant data) and the paths that
    point at them. Every write is its own committed transaction."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(_SCHEMA)

    def close(self) -> None:
        self.db.close()

    def status(self, key: str) -> str | None:
        row = self.db.execute("SELECT status FROM jobs WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def cached_hash(self, path: str, size: int, mtime_ns: int) -> str | None:
        row = self.db.execute(
            "SELECT sha256 FROM paths WHERE path = ? AND size = ? AND mtime_ns = ?"
            " AND sha256 IS NOT NULL LIMIT 1",
            (path, size, mtime_ns),
        ).fetchone()
        return row[0] if row else None

    def set_path(self, item: Item, key: str, sha256=None, size=None, mtime_ns=None) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO paths (path, id, key, sha256, size, mtime_ns)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (item.path, item.id, key, sha256, size, mtime_ns),
        )

    def finish(self, key, sha256, kind, status, error_code=None, error=None, result=None) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO jobs (key, sha256, kind, status, error_code, error, result,"
            " finished_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (key, sha256, kind, status, error_code, error, result, time.time()),
        )

    def rows(self, paths: Iterable[str] | None = None) -> list[dict]:
        """Joined path + job rows (one per path and id), in path order (all, or the given paths)."""
        q = (
            "SELECT p.path, p.id, p.key, p.sha256, j.status, j.error_code, j.error, j.result,"
            " j.finished_at FROM paths p LEFT JOIN jobs j ON j.key = p.key"
        )
        cols = ("path", "id", "key", "sha256", "status", "error_code", "error", "result",
                "finished_at")  # fmt: skip
        rows = [dict(zip(cols, r)) for r in self.db.execute(q + " ORDER BY p.path, p.id")]
        if paths is not None:
            wanted = set(paths)
            rows = [r for r in rows if r["path"] in wanted]
        return rows
