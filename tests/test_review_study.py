"""The assistance study (``mam.review.study``): simulated assessors with scripted answers of known
accuracy reproduce it in the report; order and washout decide which session is presented; the
app's study worklist, sessions and report over HTTP; the CLI's report.
"""

from __future__ import annotations

import math
import re
import shutil
import warnings

import pytest
from markupsafe import escape

from mam.cli import main
from mam.review import create_app
from mam.review import study as S
from mam.review.store import ReviewStore, default_url
from tests import review_helpers as H

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

DAY = 86400.0
T0 = 1_700_000_000.0
FLIP = {"normal": "risk", "risk": "normal"}


@pytest.fixture(scope="module")
def batch(tmp_path_factory) -> H.Batch:
    return H.make_batch(tmp_path_factory.mktemp("study-batch"), infants=20, seconds=20.0,
                        video=False)  # fmt: skip


@pytest.fixture
def fresh(batch, tmp_path) -> H.Batch:
    out, archive = tmp_path / "out", tmp_path / "archive"
    shutil.copytree(batch.out, out)
    shutil.copytree(batch.archive, archive)
    return H.Batch(archive, out, batch.truth, dict(batch.rids))


def _sign_off(store: ReviewStore, b: H.Batch) -> dict[str, str]:
    """The senior signs off every recording with its simulated truth; returns rid -> group."""
    ref = {}
    for lid, rid in b.rids.items():
        t = b.truth[lid]
        store.sign_off(rid, "alice", t["fms_category"], t["group"], None, [])
        ref[rid] = t["group"]
    return ref


def _wilson(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    p = k / n
    mid, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (mid - half) / (1 + z * z / n), (mid + half) / (1 + z * z / n)


def _inside(x: dict, value: float) -> bool:
    return x["ci"][0] - 1e-12 <= value <= x["ci"][1] + 1e-12


def test_simulated_assessors_known_accuracy_reproduced(batch, tmp_path):
    store = ReviewStore(f"sqlite:///{tmp_path / 'review.sqlite'}")
    ref = _sign_off(store, batch)
    recs = sorted(ref)
    assert len(recs) == 20 and set(ref.values()) == {"normal", "risk"}
    st = S.create_study(store, "beginners", recs, ["bob", "carol"], order="without_first",
                        washout_days=0, by="alice", now=T0)  # fmt: skip
    # bob: right on 12 of 20 without (60 %), 16 of 20 with (80 %); carol: 14 and 14 (70 %).
    right = {("bob", "without"): set(recs[:12]), ("bob", "with"): set(recs[4:]),
             ("carol", "without"): set(recs[6:]), ("carol", "with"): set(recs[:14])}  # fmt: skip
    t = T0
    for arm in S.ARMS:
        for who in ("bob", "carol"):
            for rid in recs:
                t += 60
                g = ref[rid] if rid in right[who, arm] else FLIP[ref[rid]]
                S.record_verdict(store, st, who, rid, arm, g, now=t)
    rep = S.report(store, st, bootstrap=1000)
    assert rep["reference"] == 20 and rep["not_signed_off"] == rep["no_group"] == 0
    rows = {r["assessor"]: r for r in rep["assessors"]}
    known = {("bob", "without"): 0.6, ("bob", "with"): 0.8, ("carol", "without"): 0.7,
             ("carol", "with"): 0.7}  # fmt: skip
    for (who, arm), acc in known.items():
        got = rows[who][arm]
        assert got["accuracy"]["value"] == pytest.approx(acc, abs=1e-12)
        assert got["accuracy"]["ci"] == pytest.approx(_wilson(round(acc * 20), 20), abs=1e-9)
        assert _inside(got["accuracy"], acc)
        pos = [r for r in recs if ref[r] == "risk"]
        neg = [r for r in recs if ref[r] == "normal"]
        sens = sum(r in right[who, arm] for r in pos) / len(pos)
        spec = sum(r in right[who, arm] for r in neg) / len(neg)
        assert got["sensitivity"]["value"] == pytest.approx(sens)
        assert got["specificity"]["value"] == pytest.approx(spec)
        assert _inside(got["sensitivity"], sens) and _inside(got["specificity"], spec)
    assert rows["bob"]["change"]["value"] == pytest.approx(0.2)
    assert rows["carol"]["change"]["value"] == pytest.approx(0.0)
    for who, d in (("bob", 0.2), ("carol", 0.0)):
        lo, hi = rows[who]["change"]["ci"]
        assert lo < d < hi or (d == 0 and lo <= 0 <= hi)
    # bob's paired differences (8 recordings +1, 4 -1, 8 unchanged) have a standard error near
    # 0.17: a bootstrap over recordings gives an interval about 0.65 wide, not a point
    lo, hi = rows["bob"]["change"]["ci"]
    assert 0.45 < hi - lo < 0.85
    m = rep["mean_change"]
    assert m["assessors"] == 2 and m["value"] == pytest.approx(0.1)
    assert m["ci"][0] < 0.1 < m["ci"][1]
    text = S.format_report(rep)
    assert "60.0%" in text and "80.0%" in text and "+20.0 points" in text and "+10.0" in text
    assert all(r not in text for r in recs)  # counts and rates only
    store.close()


def test_report_leaves_out_recordings_without_a_signed_off_group(tmp_path):
    store = ReviewStore(f"sqlite:///{tmp_path / 'review.sqlite'}")
    recs = [f"rec-{i:016x}" for i in range(4)]
    store.sign_off(recs[0], "alice", "absent", "risk", None, [])
    store.sign_off(recs[1], "alice", "continuous", "normal", None, [])
    store.sign_off(recs[2], "alice", "not_assessable", None, None, [])
    st = S.create_study(store, "s", recs, ["bob"], order="with_first", washout_days=0, now=T0)
    for i, rid in enumerate(recs):
        S.record_verdict(store, st, "bob", rid, "with", "risk", now=T0 + i)
    rep = S.report(store, st, bootstrap=200)
    assert (rep["reference"], rep["not_signed_off"], rep["no_group"]) == (2, 1, 1)
    bob = rep["assessors"][0]
    assert bob["with"]["accuracy"]["n"] == 2 and bob["with"]["accuracy"]["value"] == 0.5
    assert bob["without"]["accuracy"]["value"] is None and bob["change"]["value"] is None
    assert rep["mean_change"]["value"] is None
    store.close()


def test_order_and_washout_decide_what_is_presented(tmp_path):
    store = ReviewStore(f"sqlite:///{tmp_path / 'review.sqlite'}")
    recs = [f"rec-{i:016x}" for i in range(8)]
    st = S.create_study(store, "w", recs, ["bob", "carol"], order="random", seed=3,
                        washout_days=7, washout_recordings=3, now=T0)  # fmt: skip
    # randomised per assessor, reproducibly, both arms first for someone
    sb, sc = S.schedule(st, "bob"), S.schedule(st, "carol")
    assert sb == S.schedule(S.get_study(store, "w"), "bob") and sb != sc
    assert {a for _, a in sb + sc} == {"with", "without"}
    assert sorted(r for r, _ in sb) == sorted(recs)
    fixed = S.create_study(store, "f", recs, ["dan"], order="with_first", now=T0)
    assert {a for _, a in S.schedule(fixed, "dan")} == {"with"}
    # at first only the first session of each recording is due
    first = dict(sb)
    assert sorted(S.due(store, st, "bob", T0)) == sorted(first.items())
    rid, arm = sb[0]
    other = "with" if arm == "without" else "without"
    with pytest.raises(S.NotDue):  # the second session before the first
        S.record_verdict(store, st, "bob", rid, other, "risk", now=T0)
    S.record_verdict(store, st, "bob", rid, arm, "risk", now=T0)
    with pytest.raises(S.NotDue):  # recorded once
        S.record_verdict(store, st, "bob", rid, arm, "normal", now=T0 + 1)
    for k, (r, a) in enumerate(sb[1:3], start=1):  # two more recordings: one short
        S.record_verdict(store, st, "bob", r, a, "normal", now=T0 + k)
    late = T0 + 8 * DAY
    assert (rid, other) not in S.due(store, st, "bob", late)  # days passed, recordings not
    waiting = next(s for s in S.sessions(store, st, "bob", late) if s["rid"] == rid
                   and s["arm"] == other)  # fmt: skip
    assert waiting["state"] == "waiting" and waiting["more_recordings"] == 1
    S.record_verdict(store, st, "bob", *sb[3], "normal", now=T0 + 4)
    assert (rid, other) not in S.due(store, st, "bob", T0 + 6 * DAY)  # recordings, not days
    with pytest.raises(S.NotDue):
        S.record_verdict(store, st, "bob", rid, other, "risk", now=T0 + 6 * DAY)
    assert (rid, other) in S.due(store, st, "bob", late)
    S.record_verdict(store, st, "bob", rid, other, "normal", now=late)
    assert S.due(store, st, "carol", late) == [(r, a) for r, a in sc]  # untouched by bob's
    with pytest.raises(S.NotDue):  # not an assessor of this study
        S.record_verdict(store, fixed, "bob", rid, "with", "risk", now=late)
    with pytest.raises(S.StudyError):
        S.record_verdict(store, st, "carol", rid, "with", "maybe", now=late)
    # the model stays hidden on the ordinary pages until the without session is done
    hidden = S.hidden_rids(store, "bob")
    done_without = {r for r, a in [*sb[:4], (rid, other)] if a == "without"}
    assert hidden == set(recs) - done_without
    with pytest.raises(S.StudyError):
        S.create_study(store, "w", recs, ["bob"])  # name taken
    with pytest.raises(S.StudyError):
        S.create_study(store, "x", recs, ["bob"], order="sideways")
    with pytest.raises(S.StudyError):
        S.create_study(store, "bad name!", recs, ["bob"])
    store.close()


def _client(b: H.Batch) -> TestClient:
    return TestClient(create_app(H.config(b)), base_url="http://testserver")


def test_study_over_http(fresh):
    with _client(fresh) as a, _client(fresh) as b:
        ca, cb = H.login(a, "alice"), H.login(b, "bob")
        form = {"name": "s1", "recordings": "", "assessors": "bob,carol",
                "order": "without_first", "seed": "0", "washout_days": "0",
                "washout_recordings": "1"}  # fmt: skip
        assert b.post("/study", data={**form, "csrf_token": cb}).status_code == 403
        r = a.post("/study", data={**form, "csrf_token": ca}, follow_redirects=False)
        assert r.status_code == 303
        bad = a.post("/study", data={**form, "name": "s2", "assessors": "nobody",
                                     "csrf_token": ca})  # fmt: skip
        assert bad.status_code == 400 and "Study not created" in bad.text
        page = b.get("/study").text
        links = re.findall(r'href="/study/s1/(rec-[0-9a-f]{16})/(with|without)"', page)
        rids = set(fresh.rids.values())
        assert len(links) == len(rids) and {a_ for _, a_ in links} == {"without"}
        assert {r_ for r_, _ in links} == rids
        rid = links[0][0]
        rec = a.app.state.review.catalog.get(rid)
        result = rec.result()
        shown = a.app.state.review.env.filters["prob"]  # how the pages write a probability
        probs = [str(escape(shown(c.fms_probability))) for c in result.top_fms_clips]
        assert probs
        html = b.get(f"/study/s1/{rid}/without").text
        assert 'id="study-blind"' in html and 'id="mam-clips"' not in html
        assert not any(p in html for p in probs)
        assert f"{result.risk_probability:.3f}" not in html and 'id="model-label"' not in html
        # the ordinary page hides the model from bob too while his without session is pending
        assert 'id="top-clips"' not in b.get(f"/r/{rid}").text
        assert b.get(f"/study/s1/{rid}/with").status_code == 409  # not due yet
        for r_, _ in links[:2]:
            resp = b.post(f"/study/s1/{r_}/without", data={"csrf_token": cb, "group": "risk"},
                          follow_redirects=False)  # fmt: skip
            assert resp.status_code == 303
        again = b.post(f"/study/s1/{rid}/without", data={"csrf_token": cb, "group": "normal"})
        assert again.status_code == 409
        page = b.get("/study").text
        links = re.findall(r'href="/study/s1/(rec-[0-9a-f]{16})/(with|without)"', page)
        assert (rid, "with") in links and (links[1][0], "with") not in links  # washout 1
        html = b.get(f"/study/s1/{rid}/with").text
        assert 'id="mam-clips"' in html and all(p in html for p in probs)
        assert html.count("<tr><td>") == len(probs)
        assert b.get("/study/s1/report").status_code == 403
        rep = a.get("/study/s1/report", headers={"accept": "application/json"}).json()
        assert rep["reference"] == 0 and rep["assessors"][0]["sessions_done"] == 2
        assert "Mean change" in a.get("/study/s1/report").text


def test_cli_prints_the_report(fresh, capsys):
    store = ReviewStore(default_url(fresh.out))
    ref = _sign_off(store, fresh)
    recs = sorted(ref)
    st = S.create_study(store, "cli", recs, ["bob"], order="without_first", washout_days=0)
    for arm in S.ARMS:
        for rid in recs:
            S.record_verdict(store, st, "bob", rid, arm, ref[rid])
    store.close()
    assert main(["review", str(fresh.out), "--study-report", "cli"]) == 0
    out = capsys.readouterr().out
    assert "100.0% [" in out and "+0.0 points" in out
    assert main(["review", str(fresh.out), "--study-report", "nope"]) == 2
    assert "unknown_study" in capsys.readouterr().err
