"""The review store (``mam.review.store``) on both backends: SQLite, and a real PostgreSQL
server started for the session (Debian's ``postgresql``, installed with apt-get when missing).

What matters: every change lands with its reviewer and time in the audit trail; two reviewers
at once lose nothing (per field, last write wins, and the replaced value is reported); an
interval someone deleted cannot be edited silently; the two backends behave the same.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from mam.gma import clip_kappa as cohen_kappa
from mam.review.store import Gone, NotFound, ReviewInputError, ReviewStore
from tests import review_helpers as H

RID = "rec-0123456789abcdef"


@pytest.fixture(scope="session")
def pg_url():
    gen = H.postgres_server()
    url = next(gen)
    if not url.startswith("postgresql"):
        pytest.skip(url)
    yield url
    gen.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'review.sqlite'}"
    pg = request.getfixturevalue("pg_url")
    # A fresh database per test on the session's server.
    from sqlalchemy import create_engine, text

    name = f"t{time.monotonic_ns()}"
    admin = create_engine(pg, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f"CREATE DATABASE {name}"))
    admin.dispose()
    return pg.rsplit("/", 1)[0] + "/" + name


@pytest.fixture
def store(url):
    s = ReviewStore(url)
    yield s
    s.close()


def test_fields_revisions_and_audit(store):
    fields, over = store.set_fields(RID, "alice", {"category": ("intermittent", 0)})
    assert fields["category"]["value"] == "intermittent" and fields["category"]["rev"] == 1
    assert over == {}
    store.set_fields(RID, "alice", {"category": ("sporadic", 1), "group": ("risk", 0)})
    ann = store.annotation(RID)
    assert {k: v["value"] for k, v in ann["fields"].items()} == {
        "category": "sporadic", "group": "risk"
    }  # fmt: skip
    assert ann["fields"]["category"]["rev"] == 2 and ann["fields"]["category"]["by"] == "alice"
    # The same value again is no change: no new revision, no audit row.
    n = store.audit_count()
    store.set_fields(RID, "alice", {"category": ("sporadic", 2)})
    assert store.audit_count() == n == 3
    hist = store.history(RID)
    assert [(h["target"], h["old"], h["new"]) for h in hist] == [
        ("group", None, "risk"), ("category", "intermittent", "sporadic"),
        ("category", None, "intermittent"),
    ]  # fmt: skip
    assert all(h["reviewer"] == "alice" and abs(h["at"] - time.time()) < 60 for h in hist)
    assert store.summaries()[RID] == {"state": "in_progress", "category": "sporadic",
                                      "group": "risk"}  # fmt: skip
    store.set_fields(RID, "alice", {"state": ("done", 0)})
    assert store.summaries()[RID]["state"] == "done"


@pytest.mark.parametrize(
    "name, value",
    [("category", "fidgety"), ("group", "maybe"), ("state", "finished"), ("clip:3", "yes"),
     ("note", 5), ("note", "x" * 20_001), ("password", "x"), ("clip:x", "agree")],
)  # fmt: skip
def test_invalid_fields_are_refused(store, name, value):
    with pytest.raises(ReviewInputError):
        store.set_fields(RID, "alice", {name: (value, 0)})
    assert store.audit_count() == 0


def test_two_reviewers_last_write_wins_per_field_and_says_so(store):
    # Both opened the page with nothing saved (rev 0).
    store.set_fields(RID, "alice", {"category": ("continuous", 0)})
    _, over = store.set_fields(RID, "bob", {"note": ("FMs in the arms", 0)})
    assert over == {}  # another field: nothing to report, both kept
    fields, over = store.set_fields(RID, "bob", {"category": ("absent", 0)})
    assert fields["category"]["value"] == "absent"  # last write wins...
    assert over["category"]["value"] == "continuous" and over["category"]["by"] == "alice"
    ann = store.annotation(RID)["fields"]
    assert ann["note"]["value"] == "FMs in the arms" and ann["category"]["by"] == "bob"
    # ...and nothing is lost: alice's value is in the audit trail with her name.
    hist = [(h["reviewer"], h["target"], h["new"]) for h in store.history(RID)]
    assert ("alice", "category", "continuous") in hist and ("bob", "category", "absent") in hist
    # A reviewer replacing their own earlier value is not told about it.
    _, over = store.set_fields(RID, "bob", {"category": ("sporadic", 0)})
    assert over == {}


def test_concurrent_writers_lose_no_update(url):
    """Two stores (two app processes) hammer one field and add intervals at once: every write
    gets its own revision and audit row, every interval is kept."""
    stores = [ReviewStore(url), ReviewStore(url)]
    n = 15
    errors = []

    def work(k: int) -> None:
        s = stores[k]
        try:
            for i in range(n):
                s.set_fields(RID, f"r{k}", {"note": (f"r{k}-{i}", None)})
                s.add_interval(RID, f"r{k}", f"iv-r{k}-{i:04d}", i, i + 0.5)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert not errors
        ann = stores[0].annotation(RID)
        assert ann["fields"]["note"]["rev"] == 2 * n
        assert len(ann["intervals"]) == 2 * n
        assert stores[1].audit_count() == 4 * n
    finally:
        for s in stores:
            s.close()


def test_intervals_add_edit_delete_and_conflicts(store):
    iv = store.add_interval(RID, "alice", "iv-aaaa-0001", 3.0, 12.5, duration_s=60)
    assert (iv["start_s"], iv["end_s"], iv["rev"]) == (3.0, 12.5, 1)
    # A retried create (same id) is the same interval, not a second one.
    again = store.add_interval(RID, "alice", "iv-aaaa-0001", 3.0, 12.5, duration_s=60)
    assert again["id"] == iv["id"] and len(store.annotation(RID)["intervals"]) == 1
    moved, over = store.update_interval(RID, "bob", iv["id"], 4.0, 12.5, base_rev=1)
    assert moved["start_s"] == 4.0 and moved["rev"] == 2 and over is None
    # alice edits from her stale copy (rev 1): it lands and names bob's change it replaced.
    _, over = store.update_interval(RID, "alice", iv["id"], 2.0, 10.0, base_rev=1)
    assert over["by"] == "bob" and over["value"] == [4.0, 12.5]
    store.delete_interval(RID, "bob", iv["id"], base_rev=3)
    assert store.annotation(RID)["intervals"] == []
    with pytest.raises(Gone) as e:
        store.update_interval(RID, "alice", iv["id"], 1.0, 2.0, base_rev=3)
    assert e.value.by == "bob"
    with pytest.raises(NotFound):
        store.update_interval(RID, "alice", "iv-nope-0000", 1.0, 2.0, base_rev=1)
    with pytest.raises(NotFound):  # another recording's interval is not reachable from here
        store.update_interval("rec-ffffffffffffffff", "bob", iv["id"], 1.0, 2.0, base_rev=1)
    assert store.delete_interval(RID, "bob", iv["id"]) is None  # deleting twice: no-op
    actions = [h["action"] for h in store.history(RID)]
    assert actions == ["delete_interval", "edit_interval", "edit_interval", "add_interval"]


@pytest.mark.parametrize(
    "a, b", [(5, 5), (6, 5), (-1, 2), ("x", 3), (None, 2), (float("nan"), 3), (1, 61)]
)
def test_invalid_intervals_are_refused(store, a, b):
    with pytest.raises(ReviewInputError):
        store.add_interval(RID, "alice", "iv-bad-00001", a, b, duration_s=60)


def test_sessions_expire_and_end(store):
    store.create_session("a" * 64, "alice", "c" * 64, ttl_s=60)
    assert store.session("a" * 64).reviewer == "alice"
    store.create_session("b" * 64, "bob", "d" * 64, ttl_s=-1)
    assert store.session("b" * 64) is None
    store.delete_session("a" * 64)
    assert store.session("a" * 64) is None


def test_access_log_login_counters_and_export_job(store):
    store.log_event("login", "alice", "10.0.0.1", "failed")
    store.log_event("login", "alice", "10.0.0.2", "ok")
    assert [(e["event"], e["user"], e["client"], e["outcome"]) for e in store.events()] == [
        ("login", "alice", "10.0.0.1", "failed"), ("login", "alice", "10.0.0.2", "ok")
    ]  # fmt: skip
    assert [e["client"] for e in store.events(limit=1)] == ["10.0.0.2"]  # the newest
    key = "f" * 64
    assert store.login_failures("10.0.0.1", key) == (0, 0.0)
    assert [store.add_login_failure("10.0.0.1", key, at) for at in (5.0, 6.0)] == [1, 2]
    assert store.login_failures("10.0.0.1", key) == (2, 6.0)
    assert store.login_failures("10.0.0.2", key) == (0, 0.0)  # per client
    store.clear_login_failures("10.0.0.1", key)
    assert store.login_failures("10.0.0.1", key) == (0, 0.0)
    assert store.export_job() is None
    store.save_export_job({"state": "running", "done": 1})
    store.save_export_job({"state": "done", "done": 3})
    assert store.export_job() == {"state": "done", "done": 3}


def test_an_empty_note_is_no_change(store):
    fields, _ = store.set_fields(RID, "alice", {"note": ("", 0)})
    assert fields == {} and store.history(RID) == [] and store.summaries() == {}


def test_kappa_matches_sklearn():
    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    for _ in range(50):
        n = int(rng.integers(2, 40))
        a, b = rng.random(n) < rng.random(), rng.random(n) < rng.random()
        if len(set(a)) > 1 or len(set(b)) > 1:
            assert cohen_kappa(a, b) == pytest.approx(sk.cohen_kappa_score(a, b))
    assert cohen_kappa([True, True], [True, True]) == 1.0  # both constant, agreeing
    assert cohen_kappa([True, True], [False, False]) == 0.0
