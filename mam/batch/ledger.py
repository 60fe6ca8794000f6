"""``DIR/ledger.sqlite``: the durable record of a batch run (one row per screening job, keyed by
the recording's sha256 plus the infant data plus the model, and the paths that point at them).
WAL, every write its own committed transaction, so a killed run loses only the jobs in flight.

The model in the key (``@`` and the first 16 hex digits of its digest, ``mam.model.weights``)
makes a run with other weights screen every recording again instead of reporting the old
model's results; a ledger from before models were keyed has keys without ``@``, which match no
model, so its recordings are screened again too (its rows stay, unused).

Each result is written with its digest (``result_sha256``: sha256 of the job key and the result
JSON, :func:`result_digest`), checked when a result is reused and when outputs are rebuilt: a
result that no longer matches is an ``altered_result`` error naming the file and the job. A
result without a digest (a ledger from before digests; the column is added on opening) is
screened again by ``mam batch`` and refused (``unverified_result``) when outputs are only
rebuilt. Every SQLite failure is a typed error naming the file (:func:`typed_error`):
``corrupt_ledger``, ``disk_full``, ``output_not_writable`` or ``ledger_error``."""

from __future__ import annotations

import contextlib
import hashlib
import json
import sqlite3
import time
from collections.abc import Iterable
from pathlib import Path

from mam.batch.archive import Item
from mam.errors import (
    AlteredResultError,
    CorruptLedgerError,
    DiskFullError,
    LedgerError,
    MamError,
    OutputNotWritableError,
    UnverifiedResultError,
)

LEDGER = "ledger.sqlite"


MODEL_KEY_DIGITS = 16


def job_key(sha256: str, infant: dict[str, str], model: str | None = None) -> str:
    """Ledger key: the content hash, plus a digest of the infant data when there are any (the same
    recording with other infant data is another result), plus the model (``@`` and the start of
    its digest, or a tag such as ``service``) when given: another model's result is another job."""
    key = sha256
    if infant:
        blob = json.dumps(infant, sort_keys=True).encode()
        key = f"{sha256}+{hashlib.sha256(blob).hexdigest()[:16]}"
    return key if model is None else f"{key}@{model[:MODEL_KEY_DIGITS]}"


def content_key(key: str) -> str:
    """The key less its model part: the recording and infant data."""
    return key.split("@", 1)[0]


_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    key TEXT PRIMARY KEY,
    sha256 TEXT,
    kind TEXT,
    status TEXT NOT NULL CHECK (status IN ('done', 'failed')),
    error_code TEXT,
    error TEXT,
    result TEXT,
    finished_at REAL NOT NULL,
    result_sha256 TEXT
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
JOB_COLUMNS = ("key", "sha256", "kind", "status", "error_code", "error", "result", "finished_at",
               "result_sha256")  # fmt: skip


def result_digest(key: str, result: str) -> str:
    """The digest written with each result: sha256 of the job key and the result JSON, so a
    result edited in place, or moved to another job, no longer matches. It finds corruption and
    edits by anyone who does not recompute it; it is not a signature."""
    return hashlib.sha256(f"{key}\n{result}".encode()).hexdigest()


def typed_error(e: sqlite3.Error, path: Path) -> MamError:
    """Every SQLite failure of a ledger as the typed error a person can act on, naming the file:
    the one place where ``sqlite3`` errors are mapped."""
    primary = (getattr(e, "sqlite_errorcode", None) or 0) & 0xFF
    msg = str(e)
    if primary == sqlite3.SQLITE_FULL or "disk is full" in msg:
        return DiskFullError(f"the disk filled up while writing the ledger {path}")
    if primary in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB) or any(
        s in msg for s in ("not a database", "malformed", "no such table", "no such column")
    ):
        return CorruptLedgerError(f"{path} is not a readable batch ledger ({msg})")
    if primary in (sqlite3.SQLITE_READONLY, sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_PERM) or any(
        s in msg for s in ("readonly", "unable to open")
    ):
        return OutputNotWritableError(f"cannot write the ledger {path} ({msg})")
    return LedgerError(f"the ledger {path} failed: {msg}")


class Ledger:
    """``DIR/ledger.sqlite``: jobs (one per content hash and infant data) and the paths that
    point at them. Every write is its own committed transaction. Any SQLite failure is a typed
    error naming the file (:func:`typed_error`). Each result is written with its digest
    (:func:`result_digest`), checked whenever a result is reused (:meth:`status`) or reported
    (:meth:`rows` with ``verify``)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.db = None
        try:
            with self._guard():
                self.db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
                self.db.execute("PRAGMA journal_mode=WAL")
                self.db.execute("PRAGMA synchronous=FULL")
                self.db.executescript(_SCHEMA)
                cols = {r[1] for r in self.db.execute("PRAGMA table_info(jobs)")}
                if "result_sha256" not in cols:  # a ledger from before results were digested
                    try:
                        self.db.execute("ALTER TABLE jobs ADD COLUMN result_sha256 TEXT")
                    except sqlite3.OperationalError as e:
                        if "duplicate column" not in str(e):  # another process added it first
                            raise
        except MamError:
            if self.db is not None:
                self.db.close()
            raise

    @contextlib.contextmanager
    def _guard(self, path: Path | None = None):
        try:
            yield
        except sqlite3.Error as e:
            raise typed_error(e, path or self.path) from None

    def _all(self, sql: str, params: Iterable = ()) -> list[tuple]:
        with self._guard():
            return self.db.execute(sql, tuple(params)).fetchall()

    def close(self) -> None:
        if self.db is not None:
            with self._guard():
                self.db.close()

    def status(self, key: str) -> str | None:
        """The job's status; a done job's result is checked against its digest first:
        ``unverified`` when it has none (screen it again), :class:`AlteredResultError` when it
        does not match."""
        rows = self._all("SELECT status, result, result_sha256 FROM jobs WHERE key = ?", (key,))
        if not rows:
            return None
        status, result, digest = rows[0]
        if status == "done":
            if not digest or result is None:
                return "unverified"
            self._check(key, result, digest)
        return status

    def _check(self, key: str, result: str, digest: str) -> None:
        if result_digest(key, result) != digest:
            raise AlteredResultError(
                f"the result of job {key} in {self.path} does not match the digest written "
                "with it: it was changed after it was screened"
            )

    def cached_hash(self, path: str, size: int, mtime_ns: int) -> str | None:
        rows = self._all(
            "SELECT sha256 FROM paths WHERE path = ? AND size = ? AND mtime_ns = ?"
            " AND sha256 IS NOT NULL LIMIT 1",
            (path, size, mtime_ns),
        )
        return rows[0][0] if rows else None

    def set_path(self, item: Item, key: str, sha256=None, size=None, mtime_ns=None) -> None:
        self._all(
            "INSERT OR REPLACE INTO paths (path, id, key, sha256, size, mtime_ns)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (item.path, item.id, key, sha256, size, mtime_ns),
        )

    def finish(self, key, sha256, kind, status, error_code=None, error=None, result=None) -> None:
        digest = result_digest(key, result) if result is not None else None
        self._all(
            "INSERT OR REPLACE INTO jobs (key, sha256, kind, status, error_code, error, result,"
            " finished_at, result_sha256) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (key, sha256, kind, status, error_code, error, result, time.time(), digest),
        )

    def has_other_model(self, key: str) -> bool:
        """Whether the ledger holds a job of the same recording and infant data under another
        model (or from before models were keyed)."""
        base = content_key(key)
        return bool(self._all(
            "SELECT 1 FROM jobs WHERE (key = ? OR substr(key, 1, ?) = ?) AND key != ? LIMIT 1",
            (base, len(base) + 1, base + "@", key),
        ))  # fmt: skip

    def result_models(self, keys: Iterable[str]) -> list[tuple[str, str, str]]:
        """The distinct models (name, version, digest) whose results the given jobs hold."""
        keys, found = list(keys), set()
        for i in range(0, len(keys), 500):
            chunk = keys[i : i + 500]
            found.update(self._all(
                "SELECT DISTINCT json_extract(result, '$.model.name'),"
                " json_extract(result, '$.model.version'), json_extract(result, '$.model.digest')"
                f" FROM jobs WHERE status = 'done' AND key IN ({','.join('?' * len(chunk))})",
                chunk,
            ))  # fmt: skip
        return sorted((n or "?", v or "?", d or "") for n, v, d in found)

    def current_done(self) -> list[tuple[str, str, str]]:
        """(key, path, id) of every path whose current job (the one its path row points at: the
        latest model it was screened with) is done; results are not read. A job of another model
        that no path points at any more is not current."""
        return self._all(
            "SELECT p.key, p.path, p.id FROM paths p JOIN jobs j ON j.key = p.key"
            " WHERE j.status = 'done'"
        )

    def rows(self, paths: Iterable[str] | None = None, verify: bool = False) -> list[dict]:
        """Joined path + job rows (one per path and id), in path order (all, or the given paths).
        ``verified`` says whether a done row's result matches its digest (None: no digest, or
        not done). ``verify``: raise :class:`AlteredResultError` for a result that does not
        match, :class:`UnverifiedResultError` for done rows without a digest."""
        q = (
            "SELECT p.path, p.id, p.key, p.sha256, j.status, j.error_code, j.error, j.result,"
            " j.finished_at, j.result_sha256 FROM paths p LEFT JOIN jobs j ON j.key = p.key"
        )
        cols = ("path", "id", "key", "sha256", "status", "error_code", "error", "result",
                "finished_at", "result_sha256")  # fmt: skip
        rows = [dict(zip(cols, r)) for r in self._all(q + " ORDER BY p.path, p.id")]
        if paths is not None:
            wanted = set(paths)
            rows = [r for r in rows if r["path"] in wanted]
        unverified = 0
        for r in rows:
            digest = r.pop("result_sha256")
            done = r["status"] == "done" and r["result"] is not None and bool(digest)
            r["verified"] = (result_digest(r["key"], r["result"]) == digest) if done else None
            if verify and r["status"] == "done":
                if r["verified"] is None:
                    unverified += 1
                elif not r["verified"]:
                    self._check(r["key"], r["result"], digest)
        if unverified:
            raise UnverifiedResultError(
                f"{unverified} results in {self.path} carry no digest (written before results "
                "were digested), so they cannot be checked"
            )
        return rows

    def merge(self, src: str | Path) -> None:
        """Join another ledger (a shard's) into this one: its paths, and its jobs where this
        ledger has no done result of the same key. Results keep their digests; a shard ledger
        from before digests is given the column (its results stay unverified)."""
        src = Path(src)
        Ledger(src).close()  # a damaged shard ledger fails here, named; an old one is migrated
        cols = ", ".join(JOB_COLUMNS)
        updates = ", ".join(f"{c}=excluded.{c}" for c in JOB_COLUMNS[1:])
        with self._guard(src):
            self.db.execute("ATTACH DATABASE ? AS shard", (str(src),))
        try:
            with self._guard(src):
                self.db.execute(
                    f"INSERT INTO jobs ({cols}) SELECT {cols} FROM shard.jobs WHERE true "
                    f"ON CONFLICT(key) DO UPDATE SET {updates} WHERE jobs.status != 'done'"
                )
                self.db.execute(
                    "INSERT OR REPLACE INTO paths (path, id, key, sha256, size, mtime_ns)"
                    " SELECT path, id, key, sha256, size, mtime_ns FROM shard.paths"
                )
        finally:
            with self._guard():
                self.db.execute("DETACH DATABASE shard")
