"""Where reviewers' judgements live: one storage interface, two backends (SQLAlchemy Core).

* SQLite by default (``DIR/review.sqlite`` beside the batch ledger; WAL, every change its own
  ``BEGIN IMMEDIATE`` transaction, so two processes never interleave a read-modify-write);
* PostgreSQL when a site gives a URL (``postgresql+psycopg://user@host/db``, psycopg 3): the
  same statements, rows locked with ``SELECT ... FOR UPDATE``.

What is stored, per recording (``rid``: the hash of its ledger path and id, never the path)
and per *owner*: each assessor's own review (owner = their name; assessors review independently
and never write each other's), the senior's signed-off verdict (owner :data:`FINAL`) and the
follow-up outcomes (owner :data:`OUTCOME`):

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
* the export button's last job, so a restart does not forget a finished export;
* settings of the worklist (blind review);
* studies of the model's assistance (:mod:`mam.review.study`): their definitions and each
  assessor's verdict per session, apart from their ordinary review.

Sign-off (:meth:`ReviewStore.sign_off`) writes the final verdict in one transaction and locks the
recording: every later write to an assessor's review or the final one is refused
(:class:`Locked`); a change after sign-off is an amendment with a reason, kept in the audit
trail. Databases written when there was one shared review per recording are migrated on open:
each shared review becomes the review of whoever last changed it.

Nothing here logs; the database holds health data and is the site's to protect.
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
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
    inspect,
    select,
)
from sqlalchemy.engine import Connection, Engine

from mam.gma import FMS_CATEGORIES, GROUPS

REVIEW_DB = "review.sqlite"
STATES = ("in_progress", "done")
SIGNED_OFF = "signed_off"  # the final review's state once a senior has signed it off
VERDICTS = ("agree", "disagree")
# The assessors' vocabulary: Prechtl's four FMs categories, abnormal FMs (the paper excludes these
# infants) and recordings that cannot be assessed (crying, sleeping, poor recording).
CATEGORIES = (*FMS_CATEGORIES, "abnormal", "not_assessable")
CATEGORY_LABELS = {**{c: c for c in FMS_CATEGORIES}, "abnormal": "abnormal FMs",
                   "not_assessable": "not assessable"}  # fmt: skip
NO_GROUP = ("abnormal", "not_assessable")  # categories that put an infant in no group
OUTCOMES = ("yes", "no", "unknown")  # CP diagnosed at follow-up (2 years)
OUTCOME_FIELDS = ("cp_2y", "outcome_source")
FINAL = "~final"  # owner of the senior's signed-off verdict (no user name starts with ~)
OUTCOME = "~outcome"  # owner of the follow-up outcome fields
MAX_NOTE = 20_000
MAX_SOURCE = 2_000
_FIELD = re.compile(r"^(category|group|note|state|clip:\d{1,5}|cp_2y|outcome_source)$")
_IID = re.compile(r"^[A-Za-z0-9_-]{8,64}$")

metadata = MetaData()
fields_t = Table(
    "review_fields2",
    metadata,
    Column("recording", String(64), primary_key=True),
    Column("owner", String(160), primary_key=True),
    Column("field", String(32), primary_key=True),
    Column("value", Text, nullable=True),  # JSON
    Column("rev", Integer, nullable=False),
    Column("updated_by", String(160), nullable=False),
    Column("updated_at", Float, nullable=False),
)
intervals_t = Table(
    "review_intervals2",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("recording", String(64), nullable=False, index=True),
    Column("owner", String(160), nullable=False),
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
settings_t = Table(
    "review_settings",
    metadata,
    Column("key", String(32), primary_key=True),
    Column("value", Text, nullable=False),  # JSON
)
# One shared review per recording, as stored before independent reviews: read once to migrate.
_legacy = MetaData()
_legacy_fields = Table(
    "review_fields", _legacy, Column("recording", String(64), primary_key=True),
    Column("field", String(32), primary_key=True), Column("value", Text),
    Column("rev", Integer), Column("updated_by", String(160)), Column("updated_at", Float),
)  # fmt: skip
_legacy_intervals = Table(
    "review_intervals", _legacy, Column("id", String(64), primary_key=True),
    Column("recording", String(64)), Column("start_s", Float), Column("end_s", Float),
    Column("deleted", Boolean), Column("rev", Integer), Column("created_by", String(160)),
    Column("updated_by", String(160)), Column("updated_at", Float),
)  # fmt: skip
# The beginner-assist study (:mod:`mam.review.study`): each study's definition, and each
# assessor's verdict per recording and session (without / with the model's assistance), kept
# apart from their ordinary review.
studies_t = Table(
    "review_studies",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("spec", Text, nullable=False),  # JSON
    Column("created_by", String(160), nullable=False),
    Column("created_at", Float, nullable=False),
)
study_verdicts_t = Table(
    "review_study_verdicts",
    metadata,
    Column("study", String(64), primary_key=True),
    Column("assessor", String(160), primary_key=True),
    Column("recording", String(64), primary_key=True),
    Column("arm", String(16), primary_key=True),
    Column("grp", String(16), nullable=False),
    Column("at", Float, nullable=False),
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


class Locked(Exception):
    """The recording is signed off (HTTP 403): an assessor's edit is refused; only a senior's
    amendment with a reason changes the final verdict."""

    def __init__(self, by: str, at: float) -> None:
        super().__init__(f"signed off by {by}")
        self.by, self.at = by, at


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


def check_field(name: str, value: Any, owner: str | None = None) -> Any:
    """The stored form of ``value`` for field ``name``; :class:`ReviewInputError` if invalid.
    Outcome fields belong to the :data:`OUTCOME` owner only, review fields to the others."""
    if not isinstance(name, str) or not _FIELD.match(name):
        raise ReviewInputError(f"unknown field {str(name)[:40]!r}")
    if (name in OUTCOME_FIELDS) != (owner == OUTCOME) and owner is not None:
        raise ReviewInputError(f"{name} is not a field of this record")
    if value is None:
        return None
    if name == "outcome_source":
        if not isinstance(value, str) or len(value) > MAX_SOURCE:
            raise ReviewInputError(f"the source is text of at most {MAX_SOURCE} characters")
        return value if value.strip() else None
    allowed = {"category": CATEGORIES, "group": GROUPS, "state": STATES,
               "cp_2y": OUTCOMES}.get(name)  # fmt: skip
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
        self._migrate_shared_reviews()

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

    # -- migration -------------------------------------------------------------------------------
    def _migrate_shared_reviews(self) -> None:
        """Copy the one shared review per recording of an older database into the review of
        whoever last changed it (once: only while the new tables are empty)."""
        if not inspect(self.engine).has_table("review_fields"):
            return
        with self._lock, self.engine.begin() as c:
            if c.execute(select(func.count()).select_from(fields_t)).scalar_one():
                return
            if c.execute(select(func.count()).select_from(intervals_t)).scalar_one():
                return
            f = c.execute(select(_legacy_fields)).all()
            iv = c.execute(select(_legacy_intervals)).all()
            last: dict[str, tuple[float, str]] = {}
            for r in [*f, *iv]:
                if r.rev and (r.recording not in last or r.updated_at > last[r.recording][0]):
                    last[r.recording] = (r.updated_at, r.updated_by)
            for r in f:
                if r.recording in last:
                    c.execute(fields_t.insert().values(
                        recording=r.recording, owner=last[r.recording][1], field=r.field,
                        value=r.value, rev=r.rev, updated_by=r.updated_by,
                        updated_at=r.updated_at))  # fmt: skip
            for r in iv:
                c.execute(intervals_t.insert().values(
                    id=r.id, recording=r.recording, owner=last[r.recording][1],
                    start_s=r.start_s, end_s=r.end_s, deleted=r.deleted, rev=r.rev,
                    created_by=r.created_by, updated_by=r.updated_by,
                    updated_at=r.updated_at))  # fmt: skip

    # -- sign-off --------------------------------------------------------------------------------
    def _final_state(self, c: Connection, rid: str):
        return c.execute(
            self._locked(
                select(fields_t).where(
                    fields_t.c.recording == rid, fields_t.c.owner == FINAL,
                    fields_t.c.field == "state",
                )
            )
        ).one_or_none()  # fmt: skip

    def _check_open(self, c: Connection, rid: str, owner: str) -> None:
        if owner == OUTCOME:
            return
        row = self._final_state(c, rid)
        if row is not None and _load(row.value) == SIGNED_OFF:
            raise Locked(row.updated_by, row.updated_at)

    def signed_off(self, rid: str) -> dict | None:
        """``{"by", "at"}`` of the sign-off (the last amendment's author) or None."""
        with self.engine.connect() as c:
            row = self._final_state(c, rid)
        if row is None or _load(row.value) != SIGNED_OFF:
            return None
        return {"by": row.updated_by, "at": row.updated_at}

    def sign_off(
        self, rid: str, senior: str, category: Any, group: Any, note: Any,
        intervals: list[tuple[Any, Any]], reason: str | None = None,
        duration_s: float | None = None,
    ) -> dict:  # fmt: skip
        """Record the final verdict and lock the recording. Once signed off, a change needs a
        ``reason`` (an amendment, kept in the audit trail with it); without one :class:`Locked`.
        Returns the final review (:meth:`annotation` of :data:`FINAL`)."""
        category = check_field("category", category)
        if category is None:
            raise ReviewInputError("the final verdict needs a category")
        group = None if category in NO_GROUP else check_field("group", group)
        if group is None and category not in NO_GROUP:
            raise ReviewInputError("the final verdict needs a group")
        note = check_field("note", note)
        ivs = [check_interval(a, b, duration_s) for a, b in intervals]
        if reason is not None:
            reason = reason.strip()[:MAX_SOURCE]
            if not reason:
                raise ReviewInputError("an amendment needs a reason")
        now = time.time()
        with self._lock, self.engine.begin() as c:
            row = self._final_state(c, rid)
            locked = row is not None and _load(row.value) == SIGNED_OFF
            if locked and reason is None:
                raise Locked(row.updated_by, row.updated_at)
            if not locked and reason is not None:
                raise ReviewInputError("nothing is signed off yet: sign off first")
            changes = {"category": (category, None), "group": (group, None), "note": (note, None),
                       "state": (SIGNED_OFF, None)}  # fmt: skip
            self._write_fields(c, rid, senior, FINAL, changes, now)
            live = c.execute(
                select(intervals_t).where(
                    intervals_t.c.recording == rid, intervals_t.c.owner == FINAL,
                    intervals_t.c.deleted.is_(False),
                )
            ).all()  # fmt: skip
            if sorted((r.start_s, r.end_s) for r in live) != sorted(ivs):
                for r in live:
                    c.execute(intervals_t.update().where(intervals_t.c.id == r.id)
                              .values(deleted=True, rev=r.rev + 1, updated_by=senior,
                                      updated_at=now))  # fmt: skip
                    self._audit(c, now, senior, rid, "final:delete_interval", r.id,
                                json.dumps([r.start_s, r.end_s]), None)  # fmt: skip
                for a, b in ivs:
                    iid = "final-" + uuid.uuid4().hex
                    c.execute(intervals_t.insert().values(
                        id=iid, recording=rid, owner=FINAL, start_s=a, end_s=b, deleted=False,
                        rev=1, created_by=senior, updated_by=senior, updated_at=now))  # fmt: skip
                    self._audit(c, now, senior, rid, "final:add_interval", iid, None,
                                json.dumps([a, b]))  # fmt: skip
            verdict = {"category": category, "group": group}
            if reason is not None:
                verdict["reason"] = reason
            self._audit(c, now, senior, rid, "amend" if locked else "sign_off", "final", None,
                        json.dumps(verdict))  # fmt: skip
        return self.annotation(rid, FINAL)

    # -- fields ----------------------------------------------------------------------------------
    def set_fields(
        self, rid: str, reviewer: str, changes: dict[str, tuple[Any, int | None]],
        owner: str | None = None,
    ) -> tuple[dict[str, dict], dict[str, dict]]:  # fmt: skip
        """Write ``{field: (value, base_rev)}`` into ``owner``'s review (default: the reviewer's
        own) in one transaction. ``base_rev`` is the revision the reviewer saw (0 or None: the
        field was empty). Returns ``(fields, overwrote)``: the fields as now stored, and for each
        field that had moved on since ``base_rev`` under someone else, the value replaced, by
        whom and when. :class:`Locked` once the recording is signed off."""
        owner = owner or reviewer
        checked = {name: (check_field(name, v, owner), base) for name, (v, base) in changes.items()}
        now = time.time()
        with self._lock, self.engine.begin() as c:
            self._check_open(c, rid, owner)
            return self._write_fields(c, rid, reviewer, owner, checked, now)

    def _write_fields(self, c, rid, reviewer, owner, checked, now):
        insert = self._insert()
        prefix = _prefix(owner)
        out, overwrote = {}, {}
        for name, (value, base) in checked.items():
            where = (fields_t.c.recording == rid, fields_t.c.owner == owner,
                     fields_t.c.field == name)  # fmt: skip
            c.execute(
                insert(fields_t)
                .values(recording=rid, owner=owner, field=name, value=None, rev=0,
                        updated_by=reviewer, updated_at=now)
                .on_conflict_do_nothing()
            )  # fmt: skip
            row = c.execute(self._locked(select(fields_t).where(*where))).one()
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
                .where(*where)
                .values(value=new, rev=rev, updated_by=reviewer, updated_at=now)
            )
            self._audit(c, now, reviewer, rid, prefix + "set", name, row.value, new)
            out[name] = _field(name, new, rev, reviewer, now)
        return out, overwrote

    # -- intervals -------------------------------------------------------------------------------
    def add_interval(
        self, rid: str, reviewer: str, iid: str, start_s, end_s, duration_s: float | None = None,
        owner: str | None = None,
    ) -> dict:  # fmt: skip
        """Add an FMs interval with the browser's id ``iid`` to ``owner``'s review (default:
        the reviewer's own); sending the same id again returns the interval already stored (a
        retried request is not a second interval)."""
        owner = owner or reviewer
        if not isinstance(iid, str) or not _IID.match(iid):
            raise ReviewInputError("an interval id is 8-64 letters, digits, '-' or '_'")
        a, b = check_interval(start_s, end_s, duration_s)
        now = time.time()
        insert = self._insert()
        with self._lock, self.engine.begin() as c:
            self._check_open(c, rid, owner)
            res = c.execute(
                insert(intervals_t)
                .values(id=iid, recording=rid, owner=owner, start_s=a, end_s=b, deleted=False,
                        rev=1, created_by=reviewer, updated_by=reviewer, updated_at=now)
                .on_conflict_do_nothing()
                .returning(intervals_t.c.id)
            ).first()  # fmt: skip
            row = c.execute(select(intervals_t).where(intervals_t.c.id == iid)).one()
            if row.recording != rid or row.owner != owner:
                raise ReviewInputError("that interval id is taken")
            if res is not None:  # inserted now, not a resent create
                self._audit(c, now, reviewer, rid, _prefix(owner) + "add_interval", iid, None,
                            json.dumps([a, b]))  # fmt: skip
        return _interval(row)

    def update_interval(
        self, rid, reviewer, iid, start_s, end_s, base_rev, duration_s: float | None = None,
        owner: str | None = None,
    ) -> tuple[dict, dict | None]:  # fmt: skip
        """Move an interval's ends. Returns ``(interval, overwrote)``; :class:`Gone` when it was
        deleted, :class:`NotFound` when it never existed in this review."""
        owner = owner or reviewer
        a, b = check_interval(start_s, end_s, duration_s)
        now = time.time()
        with self._lock, self.engine.begin() as c:
            self._check_open(c, rid, owner)
            row = self._interval_row(c, rid, iid, owner)
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
            self._audit(c, now, reviewer, rid, _prefix(owner) + "edit_interval", iid,
                        json.dumps([row.start_s, row.end_s]), json.dumps([a, b]))  # fmt: skip
            row = c.execute(select(intervals_t).where(intervals_t.c.id == iid)).one()
        return _interval(row), overwrote

    def delete_interval(self, rid, reviewer, iid, base_rev=None, owner=None) -> dict | None:
        """Delete an interval (kept as a deleted row for the audit trail). Returns what was
        overwritten when someone had moved it since ``base_rev``; deleting twice is a no-op."""
        owner = owner or reviewer
        now = time.time()
        with self._lock, self.engine.begin() as c:
            self._check_open(c, rid, owner)
            try:
                row = self._interval_row(c, rid, iid, owner)
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
            self._audit(c, now, reviewer, rid, _prefix(owner) + "delete_interval", iid,
                        json.dumps([row.start_s, row.end_s]), None)  # fmt: skip
        return overwrote

    def _interval_row(self, c: Connection, rid: str, iid: str, owner: str):
        row = c.execute(
            self._locked(
                select(intervals_t).where(
                    intervals_t.c.id == iid, intervals_t.c.recording == rid,
                    intervals_t.c.owner == owner,
                )
            )
        ).one_or_none()  # fmt: skip
        if row is None:
            raise NotFound("no such interval")
        if row.deleted:
            raise Gone(row.updated_by, row.updated_at)
        return row

    # -- reading ---------------------------------------------------------------------------------
    def annotation(self, rid: str, owner: str) -> dict:
        """``owner``'s review: ``{"fields": {name: {value, rev, by, at}}, "intervals": [...]}``
        (live intervals, by start)."""
        return self.reviews(rid, owner).get(owner) or {"fields": {}, "intervals": []}

    def reviews(self, rid: str, owner: str | None = None) -> dict[str, dict]:
        """Every review of a recording by owner (assessors' names and :data:`FINAL`; the
        outcome record too when asked for by ``owner``), as :meth:`annotation` gives one."""
        fq = select(fields_t).where(fields_t.c.recording == rid, fields_t.c.rev > 0)
        iq = (
            select(intervals_t)
            .where(intervals_t.c.recording == rid, intervals_t.c.deleted.is_(False))
            .order_by(intervals_t.c.start_s, intervals_t.c.id)
        )
        if owner is not None:
            fq = fq.where(fields_t.c.owner == owner)
            iq = iq.where(intervals_t.c.owner == owner)
        with self.engine.connect() as c:
            f, iv = c.execute(fq).all(), c.execute(iq).all()
        out: dict[str, dict] = {}
        for r in f:
            if r.owner == OUTCOME and owner != OUTCOME:
                continue
            d = out.setdefault(r.owner, {"fields": {}, "intervals": []})
            d["fields"][r.field] = _field(r.field, r.value, r.rev, r.updated_by, r.updated_at)
        for r in iv:
            out.setdefault(r.owner, {"fields": {}, "intervals": []})["intervals"].append(
                _interval(r)
            )
        return out

    def summaries(self, user: str | None = None) -> dict[str, dict]:
        """Per recording touched, one pass for the worklist and the export: ``reviews``
        (``{owner: {state, category, group}}``, every assessor's and :data:`FINAL`'s) and, for
        ``user``, their own ``state`` (``in_progress`` unless set to ``done``; absent when they
        have not started), ``category`` and ``group``."""
        out: dict[str, dict] = {}
        with self.engine.connect() as c:
            for r in c.execute(
                select(fields_t.c.recording, fields_t.c.owner, fields_t.c.field,
                       fields_t.c.value).where(fields_t.c.rev > 0, fields_t.c.owner != OUTCOME)
            ):  # fmt: skip
                s = out.setdefault(r.recording, {"reviews": {}})
                rv = s["reviews"].setdefault(r.owner, {"state": "in_progress"})
                if r.field in ("state", "category", "group") and r.value is not None:
                    rv[r.field] = json.loads(r.value)
            for rid, owner in c.execute(
                select(intervals_t.c.recording, intervals_t.c.owner).distinct()
            ):
                if owner != OUTCOME:
                    s = out.setdefault(rid, {"reviews": {}})
                    s["reviews"].setdefault(owner, {"state": "in_progress"})
        for s in out.values():
            if user is not None and user in s["reviews"]:
                s.update(s["reviews"][user])
        return out

    def outcomes(self) -> dict[str, dict]:
        """``{rid: {"cp_2y", "outcome_source", "by", "at"}}`` for every recording with a
        follow-up outcome."""
        out: dict[str, dict] = {}
        with self.engine.connect() as c:
            for r in c.execute(
                select(fields_t).where(fields_t.c.owner == OUTCOME, fields_t.c.rev > 0)
            ):
                blank = {"cp_2y": None, "outcome_source": None, "by": r.updated_by,
                         "at": r.updated_at}  # fmt: skip
                d = out.setdefault(r.recording, blank)
                d[r.field] = _load(r.value)
                if r.updated_at >= d["at"]:
                    d["by"], d["at"] = r.updated_by, r.updated_at
        return {k: v for k, v in out.items() if v["cp_2y"] or v["outcome_source"]}

    def history(self, rid: str, limit: int = 200, reviewer: str | None = None) -> list[dict]:
        """The recording's audit trail, newest first; with ``reviewer``, only what that
        assessor may see: their own changes and the sign-off (not the others' reviews)."""
        q = select(audit_t).where(audit_t.c.recording == rid)
        if reviewer is not None:
            q = q.where(
                (audit_t.c.reviewer == reviewer)
                | audit_t.c.action.in_(("sign_off", "amend"))
                | audit_t.c.action.like("final:%")
            )
        with self.engine.connect() as c:
            rows = c.execute(q.order_by(audit_t.c.seq.desc()).limit(limit)).all()
        return [
            {"at": r.at, "reviewer": r.reviewer, "action": r.action, "target": r.target,
             "old": _load(r.old), "new": _load(r.new)}
            for r in rows
        ]  # fmt: skip

    # -- settings --------------------------------------------------------------------------------
    def setting(self, key: str, default: Any = None) -> Any:
        with self.engine.connect() as c:
            r = c.execute(select(settings_t.c.value).where(settings_t.c.key == key)).scalar()
        return default if r is None else json.loads(r)

    def set_setting(self, key: str, value: Any) -> None:
        insert = self._insert()
        doc = json.dumps(value)
        with self._lock, self.engine.begin() as c:
            c.execute(
                insert(settings_t)
                .values(key=key, value=doc)
                .on_conflict_do_update(index_elements=["key"], set_={"value": doc})
            )

    # -- studies ---------------------------------------------------------------------------------
    def create_study(self, name: str, spec: dict, by: str, at: float) -> None:
        """Store a study's definition; :class:`ReviewInputError` when the name is taken."""
        insert = self._insert()
        with self._lock, self.engine.begin() as c:
            res = c.execute(
                insert(studies_t)
                .values(name=name, spec=json.dumps(spec), created_by=by, created_at=at)
                .on_conflict_do_nothing()
                .returning(studies_t.c.name)
            ).first()
        if res is None:
            raise ReviewInputError(f"a study named {name!r} exists already")

    def studies(self) -> list[dict]:
        """Every study's definition (``spec`` with ``name``, ``created_by``, ``created_at``),
        oldest first."""
        with self.engine.connect() as c:
            rows = c.execute(select(studies_t).order_by(studies_t.c.created_at)).all()
        return [{**json.loads(r.spec), "name": r.name, "created_by": r.created_by,
                 "created_at": r.created_at} for r in rows]  # fmt: skip

    def add_study_verdict(
        self, study: str, assessor: str, rid: str, arm: str, group: str, at: float
    ) -> None:
        """Record one session's verdict (once: a second one for the same session is refused,
        :class:`ReviewInputError`). The row, never changed, is its own record of who gave what
        when; it stays out of the recording's history, which shows the ordinary review."""
        insert = self._insert()
        with self._lock, self.engine.begin() as c:
            res = c.execute(
                insert(study_verdicts_t)
                .values(study=study, assessor=assessor, recording=rid, arm=arm, grp=group, at=at)
                .on_conflict_do_nothing()
                .returning(study_verdicts_t.c.study)
            ).first()
        if res is None:
            raise ReviewInputError("this session's verdict is recorded already")

    def study_verdicts(self, study: str, assessor: str | None = None) -> list[dict]:
        """``[{assessor, recording, arm, group, at}]`` of a study, in the order recorded."""
        q = select(study_verdicts_t).where(study_verdicts_t.c.study == study)
        if assessor is not None:
            q = q.where(study_verdicts_t.c.assessor == assessor)
        with self.engine.connect() as c:
            rows = c.execute(q.order_by(study_verdicts_t.c.at)).all()
        return [{"assessor": r.assessor, "recording": r.recording, "arm": r.arm,
                 "group": r.grp, "at": r.at} for r in rows]  # fmt: skip

    def final_groups(self, rids) -> dict[str, str | None]:
        """``{rid: group}`` of the signed-off verdicts among ``rids`` (None: signed off with
        no group, e.g. abnormal FMs or not assessable); recordings not signed off are absent."""
        rids = list(rids)
        out: dict[str, dict] = {}
        with self.engine.connect() as c:
            for r in c.execute(
                select(fields_t.c.recording, fields_t.c.field, fields_t.c.value).where(
                    fields_t.c.owner == FINAL, fields_t.c.rev > 0,
                    fields_t.c.field.in_(("state", "group")), fields_t.c.recording.in_(rids),
                )
            ):  # fmt: skip
                out.setdefault(r.recording, {})[r.field] = _load(r.value)
        return {k: v.get("group") for k, v in out.items() if v.get("state") == SIGNED_OFF}

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


def _prefix(owner: str) -> str:
    """Audit actions on the final and outcome records are named so (``final:set``)."""
    return owner[1:] + ":" if owner in (FINAL, OUTCOME) else ""


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
