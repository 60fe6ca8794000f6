"""The review store (``mam.review.store``) on both backends: SQLite, and a real PostgreSQL
server started for the session (Debian's ``postgresql``, installed with apt-get when missing).

What matters: every change lands with its reviewer and time in the audit trail; assessors'
reviews are independent; on a shared record (the final verdict) two writers at once lose nothing
(per field, last write wins, and the replaced value is reported); an interval someone deleted
cannot be edited silently; a signed-off recording is locked and amended only with a reason; the
two backends behave the same.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from mam.gma import clip_kappa as cohen_kappa
from mam.review.store import (
    FINAL,
    OUTCOME,
    Gone,
    Locked,
    NotFound,
    ReviewInputError,
    ReviewStore,
)
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
    ann = store.annotation(RID, "alice")
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
    mine = store.summaries("alice")[RID]
    assert {k: mine[k] for k in ("state", "category", "group")} == {
        "state": "in_progress", "category": "sporadic", "group": "risk"}  # fmt: skip
    store.set_fields(RID, "alice", {"state": ("done", 0)})
    assert store.summaries("alice")[RID]["state"] == "done"
    assert "state" not in store.summaries("bob")[RID]  # bob has not started


@pytest.mark.parametrize(
    "name, value",
    [("category", "fidgety"), ("group", "maybe"), ("state", "finished"), ("clip:3", "yes"),
     ("note", 5), ("note", "x" * 20_001), ("password", "x"), ("clip:x", "agree")],
)  # fmt: skip
def test_invalid_fields_are_refused(store, name, value):
    with pytest.raises(ReviewInputError):
        store.set_fields(RID, "alice", {name: (value, 0)})
    assert store.audit_count() == 0


def test_assessors_reviews_are_independent(store):
    store.set_fields(RID, "alice", {"category": ("continuous", 0)})
    fields, over = store.set_fields(RID, "bob", {"category": ("absent", 0)})
    assert fields["category"]["value"] == "absent" and over == {}  # nothing replaced
    assert store.annotation(RID, "alice")["fields"]["category"]["value"] == "continuous"
    store.add_interval(RID, "alice", "iv-alice-0001", 1.0, 4.0)
    with pytest.raises(NotFound):  # bob cannot reach alice's interval
        store.update_interval(RID, "bob", "iv-alice-0001", 1.0, 2.0, base_rev=1)
    assert sorted(store.reviews(RID)) == ["alice", "bob"]
    assert store.annotation(RID, "bob")["intervals"] == []


def test_two_writers_of_the_final_record_last_write_wins_and_says_so(store):
    # Both seniors opened the final record with nothing saved (rev 0).
    store.set_fields(RID, "alice", {"category": ("continuous", 0)}, owner=FINAL)
    _, over = store.set_fields(RID, "bob", {"note": ("FMs in the arms", 0)}, owner=FINAL)
    assert over == {}  # another field: nothing to report, both kept
    fields, over = store.set_fields(RID, "bob", {"category": ("absent", 0)}, owner=FINAL)
    assert fields["category"]["value"] == "absent"  # last write wins...
    assert over["category"]["value"] == "continuous" and over["category"]["by"] == "alice"
    ann = store.annotation(RID, FINAL)["fields"]
    assert ann["note"]["value"] == "FMs in the arms" and ann["category"]["by"] == "bob"
    # ...and nothing is lost: alice's value is in the audit trail with her name.
    hist = [(h["reviewer"], h["target"], h["new"]) for h in store.history(RID)]
    assert ("alice", "category", "continuous") in hist and ("bob", "category", "absent") in hist
    # A reviewer replacing their own earlier value is not told about it.
    _, over = store.set_fields(RID, "bob", {"category": ("sporadic", 0)}, owner=FINAL)
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
                s.set_fields(RID, f"r{k}", {"note": (f"r{k}-{i}", None)}, owner=FINAL)
                s.add_interval(RID, f"r{k}", f"iv-r{k}-{i:04d}", i, i + 0.5, owner=FINAL)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert not errors
        ann = stores[0].annotation(RID, FINAL)
        assert ann["fields"]["note"]["rev"] == 2 * n
        assert len(ann["intervals"]) == 2 * n
        assert stores[1].audit_count() == 4 * n
    finally:
        for s in stores:
            s.close()


def test_intervals_add_edit_delete_and_conflicts(store):
    iv = store.add_interval(RID, "alice", "iv-aaaa-0001", 3.0, 12.5, duration_s=60, owner=FINAL)
    assert (iv["start_s"], iv["end_s"], iv["rev"]) == (3.0, 12.5, 1)
    # A retried create (same id) is the same interval, not a second one.
    again = store.add_interval(RID, "alice", "iv-aaaa-0001", 3.0, 12.5, duration_s=60, owner=FINAL)
    assert again["id"] == iv["id"] and len(store.annotation(RID, FINAL)["intervals"]) == 1
    moved, over = store.update_interval(RID, "bob", iv["id"], 4.0, 12.5, base_rev=1, owner=FINAL)
    assert moved["start_s"] == 4.0 and moved["rev"] == 2 and over is None
    # alice edits from her stale copy (rev 1): it lands and names bob's change it replaced.
    _, over = store.update_interval(RID, "alice", iv["id"], 2.0, 10.0, base_rev=1, owner=FINAL)
    assert over["by"] == "bob" and over["value"] == [4.0, 12.5]
    store.delete_interval(RID, "bob", iv["id"], base_rev=3, owner=FINAL)
    assert store.annotation(RID, FINAL)["intervals"] == []
    with pytest.raises(Gone) as e:
        store.update_interval(RID, "alice", iv["id"], 1.0, 2.0, base_rev=3, owner=FINAL)
    assert e.value.by == "bob"
    with pytest.raises(NotFound):
        store.update_interval(RID, "alice", "iv-nope-0000", 1.0, 2.0, base_rev=1, owner=FINAL)
    with pytest.raises(NotFound):  # another recording's interval is not reachable from here
        store.update_interval(
            "rec-ffffffffffffffff", "bob", iv["id"], 1.0, 2.0, base_rev=1, owner=FINAL
        )
    assert store.delete_interval(RID, "bob", iv["id"], owner=FINAL) is None  # twice: no-op
    actions = [h["action"] for h in store.history(RID)]
    assert actions == ["final:delete_interval", "final:edit_interval", "final:edit_interval",
                       "final:add_interval"]  # fmt: skip


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


def test_sign_off_locks_and_an_amendment_needs_a_reason(store):
    store.set_fields(RID, "bob", {"category": ("sporadic", 0), "group": ("risk", 0)})
    store.add_interval(RID, "bob", "iv-bob-00001", 2.0, 5.0)
    final = store.sign_off(RID, "alice", "intermittent", "normal", "resolved", [(2.0, 5.0)])
    assert final["fields"]["state"]["value"] == "signed_off"
    assert [(i["start_s"], i["end_s"]) for i in final["intervals"]] == [(2.0, 5.0)]
    assert store.signed_off(RID)["by"] == "alice"
    # Every later write to an assessor's review or the final one is refused...
    for write in (
        lambda: store.set_fields(RID, "bob", {"note": ("later", 0)}),
        lambda: store.add_interval(RID, "bob", "iv-bob-00002", 6.0, 7.0),
        lambda: store.delete_interval(RID, "bob", "iv-bob-00001"),
        lambda: store.set_fields(RID, "alice", {"note": ("x", 0)}, owner=FINAL),
        lambda: store.sign_off(RID, "alice", "absent", "risk", None, []),
    ):
        with pytest.raises(Locked):
            write()
    with pytest.raises(ReviewInputError):  # an amendment without a reason
        store.sign_off(RID, "alice", "absent", "risk", None, [], reason="  ")
    # ...but the follow-up outcome is still recorded.
    store.set_fields(RID, "alice", {"cp_2y": ("no", 0), "outcome_source": ("clinic", 0)}, OUTCOME)
    assert store.outcomes()[RID]["cp_2y"] == "no"
    amended = store.sign_off(RID, "alice", "absent", "risk", None, [], reason="second look")
    assert amended["fields"]["category"]["value"] == "absent" and amended["intervals"] == []
    hist = store.history(RID)
    kinds = [(h["action"], (h["new"] or {}).get("reason") if h["action"] == "amend" else None)
             for h in hist if h["action"] in ("sign_off", "amend")]  # fmt: skip
    assert kinds == [("amend", "second look"), ("sign_off", None)]
    # An assessor's own view of the history has the sign-off but not the others' reviews.
    carol = store.history(RID, reviewer="carol")
    assert {h["action"] for h in carol} >= {"sign_off", "amend"}
    assert not [h for h in carol if h["reviewer"] == "bob"]
    with pytest.raises(ReviewInputError):  # outcome fields belong to the outcome record
        store.set_fields("rec-ffffffffffffffff", "bob", {"cp_2y": ("yes", 0)})
    with pytest.raises(ReviewInputError):
        store.sign_off("rec-ffffffffffffffff", "alice", "absent", None, None, [])


def test_a_shared_review_of_an_older_database_becomes_its_last_writers(tmp_path):
    import sqlite3

    db = tmp_path / "review.sqlite"
    con = sqlite3.connect(db)
    con.executescript(
        "CREATE TABLE review_fields (recording TEXT, field TEXT, value TEXT, rev INT, "
        "updated_by TEXT, updated_at REAL, PRIMARY KEY (recording, field));"
        "CREATE TABLE review_intervals (id TEXT PRIMARY KEY, recording TEXT, start_s REAL, "
        "end_s REAL, deleted BOOLEAN, rev INT, created_by TEXT, updated_by TEXT, "
        "updated_at REAL);"
        f"INSERT INTO review_fields VALUES ('{RID}', 'category', '\"absent\"', 1, 'alice', 1.0);"
        f"INSERT INTO review_fields VALUES ('{RID}', 'note', '\"x\"', 2, 'bob', 2.0);"
        f"INSERT INTO review_intervals VALUES ('iv-old-00001', '{RID}', 1, 3, 0, 1, 'alice', "
        "'alice', 1.5);"
    )
    con.commit()
    con.close()
    s = ReviewStore(f"sqlite:///{db}")
    try:
        reviews = s.reviews(RID)
        assert list(reviews) == ["bob"]  # the last to change it
        assert reviews["bob"]["fields"]["category"]["value"] == "absent"
        assert [i["id"] for i in reviews["bob"]["intervals"]] == ["iv-old-00001"]
    finally:
        s.close()
    again = ReviewStore(f"sqlite:///{db}")  # not copied twice
    try:
        assert len(again.reviews(RID)["bob"]["intervals"]) == 1
    finally:
        again.close()
