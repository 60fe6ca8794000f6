"""Where reviewers' judgements live: one storage interface, two backends (SQLAlchemy Core).

* SQLite by default (``DIR/review.sqlite`` beside the batch ledger; WAL, every change its own
  ``BEGIN IMMEDIATE`` transaction, so two processes never interleave a read-modify-write);
* PostgreSQL when a site gives a URL (``postgresql+psycopg://user@host/db``, psycopg 3): the
  same statements, rows locked with ``SELECT ... FOR UPDATE``.

What is stored, per recording (``rid``: the hash of its ledger path and id, never the path):

* fields, each its own row with a revision: ``category``, ``group``, ``note``, ``state`` (in
  progress / done) and ``clip:N`` (agree / disagree with the model on clip N). A change names
  the revision it was made on; the write always lands (last write wins, per field), and when the
  field had moved on since, the answer says whose value it replaced, so the reviewer's page can
  say so: nothing is lost silently, and the audit trail keeps every value;
* FMs intervals, each its own row (an id the browser makes, so a resent create is not a
  duplicate): two reviewers adding intervals at once never collide; an edit of an interval
  someone deleted is refused (:class:`Gone`), not dropped;
* the audit trail: every change with reviewer id, time, old and new value;
* login sessions (the SHA-256 of the cookie's token, never the token; the CSRF token);
* the access log (:meth:`ReviewStore.log_event`): logins, failed logins, logouts, exports and
  downloads with time, user, client address and outcome (never a password, never a recording);
* failed-login counters per client address and name (the name as its SHA-256: a password typed
  into the name field is not kept), so a restart does not reset the login throttle;
* the export button's last job, so a restart does not forget a finished export.

Nothing here logs; the database holds health data and is the site's to protect.
"""

from __future__ import annotations

import json
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Boolean,
    Column,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    event,
    func,
    select,
)
from sqlalchemy.engine import Connection, Engine

from mam.gma import FMS_CATEGORIES, GROUPS

REVIEW_DB = "review.sqlite"
STATES = ("in_progress", "done")
VERDICTS = ("agree", "disagree")
MAX_NOTE = 20_000
_FIELD = re.compile(r"^(category|group|note|state|clip:\d{1,5})$")
_IID = re.compile(r"^[A-Za-z0-9_-]{8,64}$")

metadata = MetaData()
fields_t = Table(
    "review_fields",
    metadata,
    Column("recording", String(64), primary_key=True),
    Column("field", String(32), primary_key=True),
    Column("value", Text, nullable=True),  # JSON
    Column("rev", Integer, nullable=False),
    Column("updated_by", String(160), nullable=False),
    Column("updated_at", Float, nullable=False),
)
intervals_t = Table(
    "review_intervals",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("recording", String(64), nullable=False, index=True),
    Column("start_s", Float, nullable=False),
    Column("end_s", Float, nullable=False),
    Column("deleted", Boolean, nullable=False, default=False),
    Column("rev", Integer, nullable=False),
    Column("created_by", String(160), nullable=False),
    Column("updated_by", String(160), nullable=False),
    Column("updated_at", Float, nullable=False),
)
audit_t = Table(
    "review_audit",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("at", Float, nullable=False),
    Column("reviewer", String(160), nullable=False),
    Column("recording", String(64), nullable=False, index=True),
    Column("action", String(32), nullable=False),
    Column("target", String(64), nullable=False),
    Column("old", Text, nullable=True),
    Column("new", Text, nullable=True),
)
sessions_t = Table(
    "review_sessions",
    metadata,
    Column("token_sha256", String(64), primary_key=True),
    Column("reviewer", String(160), nullable=False),
    Column("csrf", String(64), nullable=False),
    Column("created_at", Float, nullable=False),
    Column("expires_at", Float, nullable=False),
)

events_t = Table(
    "review_events",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("at", Float, nullable=False),
    Column("event", String(32), nullable=False),
    Column("user", String(160), nullable=False),
    Column("client", String(64), nullable=False),
    Column("outcome", String(32), nullable=False),
)
login_failures_t = Table(
    "review_login_failures",
    metadata,
    Column("client", String(64), primary_key=True),
    Column("name_sha256", String(64), primary_key=True),
    Column("failures", Integer, nullable=False),
    Column("last_at", Float, nullable=False),
)
export_job_t = Table(
    "review_export_job",
    metadata,
    Column("id", Integer, primary_key=True),  # one row: the export button's last job
    Column("job", Text, nullable=False),  # JSON
    Column("updated_at", Float, nullable=False),
)


class ReviewInputError(ValueError):
    """A change the store refuses (unknown field, bad value, bad interval): HTTP 400."""


class NotFound(LookupError):
    """No such interval for this recording: HTTP 404."""


class Gone(Exception):
    """The interval was deleted by someone (HTTP 409): the edit is refused, not dropped."""

    def __init__(self, by: str, at: float) -> None:
        super().__init__(f"deleted by {by}")
        self.by, self.at = by, at


@dataclass
class Session:
    reviewer: str
    csrf: str
    expires_at: float


def check_field(name: str, value: Any) -> Any:
    """The stored form of ``value`` for field ``name``; :class:`ReviewInputError` if invalid."""
    if not isinstance(name, str) or not _FIELD.match(name):
        raise ReviewInputError(f"unknown field {str(name)[:40]!r}")
    if value is None:
        return None
    allowed = {"category": FMS_CATEGORIES, "group": GROUPS, "state": STATES}.get(name)
    if name.startswith("clip:"):
        allowed = VERDICTS
    if allowed is not None:
        if value not in allowed:
            raise ReviewInputError(f"{name} must be one of {', '.join(allowed)} or null")
        return value
    if not isinstance(value, str) or len(value) > MAX_NOTE:  # note
        raise ReviewInputError(f"note must be text of at most {MAX_NOTE} characters")
    # An empty note is no note: storing "" over nothing would be a change that changes nothing
    # (a history line "(empty) -> (empty)" and a recording marked in progress).
    return value if value.strip() else None


def check_interval(
    start_s: Any, end_s: Any, duration_s: float | None = None
) -> tuple[float, float]:
    try:
        a, b = float(start_s), float(end_s)
    except (TypeError, ValueError):
        raise ReviewInputError("start_s and end_s must be numbers of seconds") from None
    if not (a == a and b == b) or not 0 <= a < b:  # NaN fails a == a
        raise ReviewInputError("an FMs interval needs 0 <= start_s < end_s")
    if duration_s is not None and b > duration_s + 0.05:
        raise ReviewInputError(f"the interval ends after the recording ({duration_s:.1f} s)")
    return round(a, 3), round(b, 3)


def _dump(v: Any) -> str | None:
    return None if v is None else json.dumps(v)


def _load(v: str | None) -> Any:
    return None if v is None else json.loads(v)


def default_url(out_dir: str | Path) -> str:
    return f"sqlite:///{Path(out_dir).resolve() / REVIEW_DB}"


class ReviewStore:
    """Reviewers' fields, intervals, audit trail and sessions in SQLite or PostgreSQL.

    Args:
        url: an SQLAlchemy URL: ``sqlite:///PATH`` or ``postgresql+psycopg://...``.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        if url.startswith("sqlite"):
            self.dialect = "sqlite"
            self.engine: Engine = create_engine(url, connect_args={"timeout": 30})
            _sqlite_transactions(self.engine)
        elif url.startswith("postgresql"):
            self.dialect = "postgresql"
            self.engine = create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5)
        else:
            raise ReviewInputError("the review database URL must be sqlite:/// or postgresql://")
        metadata.create_all(self.engine)
        self._lock = threading.Lock()  # one writer per process; the database orders processes

    def close(self) -> None:
        self.engine.dispose()

    # -- helpers ---------------------------------------------------------------------------------
    def _insert(self):
        if self.dialect == "sqlite":
            from sqlalchemy.dialects.sqlite import insert
        else:
            from sqlalchemy.dialects.postgresql import insert
        return insert

    def _locked(self, stmt):
        return stmt.with_for_update() if self.dialect == "postgresql" else stmt

    @staticmethod
    def _audit(c: Connection, now, reviewer, rid, action, target, old, new) -> None:
        c.execute(
            audit_t.insert().values(
                at=now, reviewer=reviewer, recording=rid, action=action, target=target,
                old=old, new=new,
            )
        )  # fmt: skip

    # -- fields ----------------------------------------------------------------------------------
    def set_fields(
        self, rid: str, reviewer: str, changes: dict[str, tuple[Any, int | None]]
    ) -> tuple[dict[str, dict], dict[str, dict]]:
        """Write ``{field: (value, base_rev)}`` in one transaction. ``base_rev`` is the revision
        the reviewer saw (0 or None: the field was empty). Returns ``(fields, overwrote)``: the
        fields as now stored, and for each field that had moved on since ``base_rev`` under
        someone else, the value replaced, by whom and when."""
        checked = {name: (check_field(name, v), base) for name, (v, base) in changes.items()}
        insert = self._insert()
        now = time.time()
        out, overwrote = {}, {}
        with self._lock, self.engine.begin() as c:
            for name, (value, base) in checked.items():
                c.execute(
                    insert(fields_t)
                    .values(recording=rid, field=name, value=None, rev=0, updated_by=reviewer,
                            updated_at=now)
                    .on_conflict_do_nothing()
                )  # fmt: skip
                row = c.execute(
                    self._locked(
                        select(fields_t).where(
                            fields_t.c.recording == rid, fields_t.c.field == name
                        )
                    )
                ).one()
                new = _dump(value)
                if (base or 0) != row.rev and row.updated_by != reviewer and row.value != new:
                    overwrote[name] = {
                        "value": _load(row.value), "by": row.updated_by, "at": row.updated_at,
                        "rev": row.rev,
                    }  # fmt: skip
                if row.value == new and (row.rev > 0 or new is None):
                    if row.rev > 0:
                        out[name] = _field(name, row.value, row.rev, row.updated_by,
                                           row.updated_at)  # fmt: skip
                    continue  # nothing changes: no new revision, no audit row
                rev = row.rev + 1
                c.execute(
                    fields_t.update()
                    .where(fields_t.c.recording == rid, fields_t.c.field == name)
                    .values(value=new, rev=rev, updated_by=reviewer, updated_at=now)
                )
                self._audit(c, now, reviewer, rid, "set", name, row.value, new)
                out[name] = _field(name, new, rev, reviewer, now)
        return out, overwrote

    # -- intervals -------------------------------------------------------------------------------
    def add_interval(
        self, rid: str, reviewer: str, iid: str, start_s, end_s, duration_s: float | None = None
    ) -> dict:
        """Add an FMs interval with the browser's id ``iid``; sending the same id again returns
        the interval already stored (a retried request is not a second interval)."""
        if not isinstance(iid, str) or not _IID.match(iid):
            raise ReviewInputError("an interval id is 8-64 letters, digits, '-' or '_'")
        a, b = check_interval(start_s, end_s, duration_s)
        now = time.time()
        insert = self._insert()
        with self._lock, self.engine.begin() as c:
            res = c.execute(
                insert(intervals_t)
                .values(id=iid, recording=rid, start_s=a, end_s=b, deleted=False, rev=1,
                        created_by=reviewer, updated_by=reviewer, updated_at=now)
                .on_conflict_do_nothing()
                .returning(intervals_t.c.id)
            ).first()  # fmt: skip
            row = c.execute(select(intervals_t).where(intervals_t.c.id == iid)).one()
            if row.recording != rid:
                raise ReviewInputError("that interval id is taken")
            if res is not None:  # inserted now, not a resent create
                self._audit(c, now, reviewer, rid, "add_interval", iid, None,
                            json.dumps([a, b]))  # fmt: skip
        return _interval(row)

    def update_interval(
        self, rid, reviewer, iid, start_s, end_s, base_rev, duration_s: float | None = None
    ) -> tuple[dict, dict | None]:
        """Move an interval's ends. Returns ``(interval, overwrote)``; :class:`Gone` when it was
        deleted, :class:`NotFound` when it never existed here."""
        a, b = check_interval(start_s, end_s, duration_s)
        now = time.time()
        with self._lock, self.engine.begin() as c:
            row = self._interval_row(c, rid, iid)
            overwrote = None
            if base_rev is not None and base_rev != row.rev and row.updated_by != reviewer:
                overwrote = {"value": [row.start_s, row.end_s], "by": row.updated_by,
                             "at": row.updated_at, "rev": row.rev}  # fmt: skip
            if (row.start_s, row.end_s) == (a, b):
                return _interval(row), None
            c.execute(
                intervals_t.update()
                .where(intervals_t.c.id == iid)
                .values(start_s=a, end_s=b, rev=row.rev + 1, updated_by=reviewer, updated_at=now)
            )
            self._audit(c, now, reviewer, rid, "edit_interval", iid,
                        json.dumps([row.start_s, row.end_s]), json.dumps([a, b]))  # fmt: skip
            row = c.execute(select(intervals_t).where(intervals_t.c.id == iid)).one()
        return _interval(row), overwrote

    def delete_interval(self, rid, reviewer, iid, base_rev=None) -> dict | None:
        """Delete an interval (kept as a deleted row for the audit trail). Returns what was
        overwritten when someone had moved it since ``base_rev``; deleting twice is a no-op."""
        now = time.time()
        with self._lock, self.engine.begin() as c:
            try:
                row = self._interval_row(c, rid, iid)
            except Gone:
                return None
            overwrote = None
            if base_rev is not None and base_rev != row.rev and row.updated_by != reviewer:
                overwrote = {"value": [row.start_s, row.end_s], "by": row.updated_by,
                             "at": row.updated_at, "rev": row.rev}  # fmt: skip
            c.execute(
                intervals_t.update()
                .where(intervals_t.c.id == iid)
                .values(deleted=True, rev=row.rev + 1, updated_by=reviewer, updated_at=now)
            )
            self._audit(c, now, reviewer, rid, "delete_interval", iid,
                        json.dumps([row.start_s, row.end_s]), None)  # fmt: skip
        return overwrote

    def _interval_row(self, c: Connection, rid: str, iid: str):
        row = c.execute(
            self._locked(
                select(intervals_t).where(intervals_t.c.id == iid, intervals_t.c.recording == rid)
            )
        ).one_or_none()
        if row is None:
            raise NotFound("no such interval")
        if row.deleted:
            raise Gone(row.updated_by, row.updated_at)
        return row

    # -- reading ---------------------------------------------------------------------------------
    def annotation(self, rid: str) -> dict:
        """``{"fields": {name: {value, rev, by, at}}, "intervals": [...]}`` (live intervals, by
        start)."""
        with self.engine.connect() as c:
            f = c.execute(select(fields_t).where(fields_t.c.recording == rid)).all()
            iv = c.execute(
                select(intervals_t)
                .where(intervals_t.c.recording == rid, intervals_t.c.deleted.is_(False))
                .order_by(intervals_t.c.start_s, intervals_t.c.id)
            ).all()
        return {
            "fields": {
                r.field: _field(r.field, r.value, r.rev, r.updated_by, r.updated_at)
                for r in f
                if r.rev > 0
            },
            "intervals": [_interval(r) for r in iv],
        }

    def summaries(self) -> dict[str, dict]:
        """Per recording touched: ``state`` (``in_progress`` unless set to ``done``) and the
        reviewer's ``category`` and ``group``: one pass for the worklist."""
        out: dict[str, dict] = {}
        with self.engine.connect() as c:
            for r in c.execute(
                select(fields_t.c.recording, fields_t.c.field, fields_t.c.value).where(
                    fields_t.c.rev > 0
                )
            ):
                s = out.setdefault(r.recording, {"state": "in_progress"})
                if r.field in ("state", "category", "group") and r.value is not None:
                    s[r.field] = json.loads(r.value)
            for (rid,) in c.execute(select(intervals_t.c.recording).distinct()):
                out.setdefault(rid, {"state": "in_progress"})
        return out

    def history(self, rid: str, limit: int = 200) -> list[dict]:
        with self.engine.connect() as c:
            rows = c.execute(
                select(audit_t)
                .where(audit_t.c.recording == rid)
                .order_by(audit_t.c.seq.desc())
                .limit(limit)
            ).all()
        return [
            {"at": r.at, "reviewer": r.reviewer, "action": r.action, "target": r.target,
             "old": _load(r.old), "new": _load(r.new)}
            for r in rows
        ]  # fmt: skip

    def audit_count(self) -> int:
        with self.engine.connect() as c:
            return int(c.execute(select(func.count()).select_from(audit_t)).scalar_one())

    # -- access log, login throttle, export job --------------------------------------------------
    def log_event(self, event: str, user: str, client: str, outcome: str) -> None:
        """One line of the access log (who did what from where, and how it went)."""
        with self._lock, self.engine.begin() as c:
            c.execute(
                events_t.insert().values(at=time.time(), event=event[:32], user=user[:160],
                                         client=client[:64], outcome=outcome[:32])
            )  # fmt: skip

    def events(self, limit: int | None = None) -> list[dict]:
        """The access log, oldest first (the newest ``limit`` lines when given)."""
        q = select(events_t).order_by(events_t.c.seq.desc())
        if limit is not None:
            q = q.limit(limit)
        with self.engine.connect() as c:
            rows = c.execute(q).all()
        return [
            {"at": r.at, "event": r.event, "user": r.user, "client": r.client,
             "outcome": r.outcome}
            for r in reversed(rows)
        ]  # fmt: skip

    def login_failures(self, client: str, name_sha256: str) -> tuple[int, float]:
        """``(failures since the last good login, time of the last)`` for a client and name."""
        with self.engine.connect() as c:
            r = c.execute(
                select(login_failures_t).where(
                    login_failures_t.c.client == client[:64],
                    login_failures_t.c.name_sha256 == name_sha256,
                )
            ).one_or_none()
        return (0, 0.0) if r is None else (r.failures, r.last_at)

    def add_login_failure(self, client: str, name_sha256: str, at: float) -> int:
        """Count one more failure; returns the count. Counters untouched for a day are dropped
        (so names tried once each cannot fill the table)."""
        insert = self._insert()
        with self._lock, self.engine.begin() as c:
            c.execute(login_failures_t.delete().where(login_failures_t.c.last_at < at - 86400))
            c.execute(
                insert(login_failures_t)
                .values(client=client[:64], name_sha256=name_sha256, failures=0, last_at=at)
                .on_conflict_do_nothing()
            )
            where = (login_failures_t.c.client == client[:64],
                     login_failures_t.c.name_sha256 == name_sha256)  # fmt: skip
            n = c.execute(self._locked(select(login_failures_t.c.failures).where(*where))).scalar()
            c.execute(login_failures_t.update().where(*where).values(failures=n + 1, last_at=at))
        return n + 1

    def clear_login_failures(self, client: str, name_sha256: str) -> None:
        with self._lock, self.engine.begin() as c:
            c.execute(
                login_failures_t.delete().where(
                    login_failures_t.c.client == client[:64],
                    login_failures_t.c.name_sha256 == name_sha256,
                )
            )

    def save_export_job(self, job: dict) -> None:
        insert = self._insert()
        doc, now = json.dumps(job), time.time()
        with self._lock, self.engine.begin() as c:
            c.execute(
                insert(export_job_t)
                .values(id=1, job=doc, updated_at=now)
                .on_conflict_do_update(index_elements=["id"], set_={"job": doc, "updated_at": now})
            )

    def export_job(self) -> dict | None:
        with self.engine.connect() as c:
            r = c.execute(select(export_job_t.c.job).where(export_job_t.c.id == 1)).scalar()
        return None if r is None else json.loads(r)

    # -- sessions --------------------------------------------------------------------------------
    def create_session(self, token_sha256: str, reviewer: str, csrf: str, ttl_s: float) -> None:
        now = time.time()
        with self._lock, self.engine.begin() as c:
            c.execute(sessions_t.delete().where(sessions_t.c.expires_at < now))
            c.execute(
                sessions_t.insert().values(token_sha256=token_sha256, reviewer=reviewer,
                                           csrf=csrf, created_at=now, expires_at=now + ttl_s)
            )  # fmt: skip

    def session(self, token_sha256: str) -> Session | None:
        with self.engine.connect() as c:
            r = c.execute(
                select(sessions_t).where(sessions_t.c.token_sha256 == token_sha256)
            ).one_or_none()
        if r is None or r.expires_at < time.time():
            return None
        return Session(r.reviewer, r.csrf, r.expires_at)

    def delete_session(self, token_sha256: str) -> None:
        with self._lock, self.engine.begin() as c:
            c.execute(sessions_t.delete().where(sessions_t.c.token_sha256 == token_sha256))


def _field(name: str, value: str | None, rev: int, by: str, at: float) -> dict:
    return {"value": _load(value), "rev": rev, "by": by, "at": at}


def _interval(r) -> dict:
    return {"id": r.id, "start_s": r.start_s, "end_s": r.end_s, "rev": r.rev,
            "created_by": r.created_by, "by": r.updated_by, "at": r.updated_at}  # fmt: skip


def _sqlite_transactions(engine: Engine) -> None:
    """pysqlite's own transaction handling is off; every transaction is ``BEGIN IMMEDIATE``,
    so a read-modify-write holds the write lock from its read (SQLAlchemy's documented recipe
    for SQLite transactions)."""

    @event.listens_for(engine, "connect")
    def _connect(dbapi_conn, _record):
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.close()

    @event.listens_for(engine, "begin")
    def _begin(conn):
        conn.exec_driver_sql("BEGIN IMMEDIATE")
