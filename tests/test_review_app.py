"""The review app (``mam review``) in-process: login, CSRF, paths that try to leave the archive,
a recording gone from the archive, two reviewers at once, the skeleton overlay, the export and
the CLI. The batch output folder is made by the real batch runner (simulated infants' pose
files) plus one real MP4 (``tests.review_helpers``).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import re
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from mam.batch import Item, Ledger
from mam.batch.report import page_stem
from mam.cli import main
from mam.pose.base import PoseSequence, register_backend
from mam.review import create_app
from tests import review_helpers as H

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # starlette's note about httpx2
    from starlette.testclient import TestClient

HTML = {"accept": "text/html"}
FAKE_BACKEND = "review-test-fake"
FAKE_CALLS: list[int] = []
EVIL_ID = "<script>alert(1)</script>"


class _FakePose:
    """A pose backend with known 2D joints: joint j at x = 10 + 5 j px, y = 5 + frame % 100."""

    name = FAKE_BACKEND

    def estimate(self, frames, progress=None):
        n, size = 0, (0, 0)
        for f in frames:
            n += 1
            size = (f.shape[1], f.shape[0])
            if progress:
                progress(n)
        FAKE_CALLS.append(n)
        image = np.zeros((n, 17, 2), np.float32)
        image[..., 0] = 10 + 5 * np.arange(17)
        image[..., 1] = (5 + np.arange(n) % 100)[:, None]
        joints = np.random.default_rng(0).normal(0, 0.1, (n, 17, 3)).astype(np.float32)
        joints[:, 0] = 0
        return PoseSequence(joints, np.ones((n, 17), np.float32), source=FAKE_BACKEND,
                            meta={"image_joints": image, "image_size": size})  # fmt: skip

    def close(self) -> None:
        pass


register_backend(FAKE_BACKEND)(lambda **kw: _FakePose())


@pytest.fixture(scope="module")
def batch(tmp_path_factory) -> H.Batch:
    return H.make_batch(tmp_path_factory.mktemp("review-batch"))


@pytest.fixture
def fresh(batch, tmp_path) -> H.Batch:
    """A private copy of the batch folder and archive (tests change both)."""
    out, archive = tmp_path / "out", tmp_path / "archive"
    shutil.copytree(batch.out, out)
    shutil.copytree(batch.archive, archive)
    return H.Batch(archive, out, batch.truth, dict(batch.rids))


def client(b: H.Batch, **kw) -> TestClient:
    base = kw.pop("base_url", "http://testserver")
    addr = kw.pop("client", ("testclient", 50000))
    return TestClient(create_app(H.config(b, **kw)), base_url=base, client=addr)


def _rows(b: H.Batch) -> list[dict]:
    ledger = Ledger(b.out / "ledger.sqlite")
    try:
        return ledger.rows()
    finally:
        ledger.close()


def _add_row(b: H.Batch, path: str, ident: str) -> str:
    """Another ledger path for an already screened job (as a duplicate recording is kept)."""
    done = next(r for r in _rows(b) if r["path"] == H.VIDEO_PATH)
    ledger = Ledger(b.out / "ledger.sqlite")
    try:
        ledger.set_path(Item(b.archive / path, path, ident), done["key"], done["sha256"], 1, 1)
    finally:
        ledger.close()
    rid = page_stem({"path": path, "id": ident})
    b.rids[ident] = rid
    return rid


def put(c, rid, csrf, **values):
    changes = {k: {"value": v, "base_rev": None} for k, v in values.items()}
    return c.put(f"/api/r/{rid}/fields", json={"changes": changes},
                 headers={"x-csrf-token": csrf})  # fmt: skip


# -- access ---------------------------------------------------------------------------------------
def test_nothing_is_reachable_without_login(fresh):
    rid = fresh.rids["videos/ward_B_infant"]
    with client(fresh) as c:
        pages = ["/", f"/r/{rid}", "/export"]
        files = [f"/r/{rid}/video", f"/r/{rid}/pose", f"/api/r/{rid}", "/static/review.css",
                 "/static/recording.js", "/export/status", "/export/download", "/no/such/page",
                 "/static/../app.py", "/r/rec-0000000000000000/video"]  # fmt: skip
        for path in pages:
            r = c.get(path, headers=HTML, follow_redirects=False)
            assert r.status_code == 303 and r.headers["location"].startswith("/login"), path
        for path in pages + files:
            r = c.get(path, follow_redirects=False)
            assert r.status_code == 401, path
            assert r.json()["error"]["code"] == "unauthorized"
        for method, path in [("PUT", f"/api/r/{rid}/fields"), ("POST", f"/api/r/{rid}/intervals"),
                             ("DELETE", f"/api/r/{rid}/intervals/abcdefgh"),
                             ("POST", "/export"), ("POST", f"/r/{rid}/pose")]:  # fmt: skip
            assert c.request(method, path, json={}).status_code == 401, path
        # A made-up session cookie is no session.
        c.cookies.set("mam_review_session", "forged-token-value")
        assert c.get("/").status_code == 401
        # The login page itself needs nothing and carries its style inline (no file reachable).
        c.cookies.clear()
        page = c.get("/login")
        assert page.status_code == 200 and "<style nonce=" in page.text


def test_login_wrong_missing_and_throttled(fresh):
    with client(fresh) as c:
        token = re.search(r'name="csrf_token" value="([^"]+)"', c.get("/login").text).group(1)

        def attempt(name, password, csrf=token):
            data = {"name": name, "password": password}
            if csrf is not None:
                data["csrf_token"] = csrf
            return c.post("/login", data=data, follow_redirects=False)

        assert attempt("alice", "wrong-password").status_code == 401
        assert attempt("mallory", H.PASSWORDS["alice"]).status_code == 401
        assert attempt("alice", "").status_code == 401
        assert attempt("alice", H.PASSWORDS["alice"], csrf=None).status_code == 403
        assert attempt("alice", H.PASSWORDS["alice"], csrf="other").status_code == 403
        assert "mam_review_session" not in c.cookies
        for _ in range(4):
            attempt("alice", "wrong-password")
        slowed = attempt("alice", H.PASSWORDS["alice"])  # this client must wait first
        assert slowed.status_code == 429 and "Too many" in slowed.text
        assert int(slowed.headers["retry-after"]) >= 1
        ok = attempt("bob", H.PASSWORDS["bob"])  # other names are not slowed
        assert ok.status_code == 303 and ok.headers["location"] == "/"
        assert c.get("/").status_code == 200
        csrf = re.search(r'name="csrf-token" content="([^"]+)"', c.get("/").text).group(1)
        old = c.cookies["mam_review_session"]
        assert (
            c.post("/logout", data={"csrf_token": csrf}, follow_redirects=False).status_code == 303
        )
        c.cookies.set("mam_review_session", old)
        assert c.get("/").status_code == 401  # the session ended on the server, not only here


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_session_cookie_is_httponly_samesite_strict(fresh, scheme):
    with client(fresh, base_url=f"{scheme}://testserver") as c:
        page = c.get("/login")
        token = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)
        r = c.post("/login", data={"name": "alice", "password": H.PASSWORDS["alice"],
                                   "csrf_token": token}, follow_redirects=False)  # fmt: skip
        cookie = next(v for k, v in r.headers.multi_items()
                      if k == "set-cookie" and v.startswith("mam_review_session="))  # fmt: skip
        attrs = {a.strip().split("=")[0].lower() for a in cookie.split(";")[1:]}
        assert {"httponly", "samesite", "path", "max-age"} <= attrs
        assert "samesite=strict" in cookie.lower()
        assert ("secure" in attrs) == (scheme == "https")
        token = cookie.split(";")[0].split("=", 1)[1]
        assert len(token) >= 40  # 256 random bits
        # The store keeps the token's hash, never the token.
        db = b"".join(p.read_bytes() for p in fresh.out.glob("review.sqlite*"))  # + its WAL
        assert token.encode() not in db
        assert hashlib.sha256(token.encode()).hexdigest().encode() in db
        for h in ("content-security-policy", "x-frame-options", "x-content-type-options"):
            assert h in r.headers
        assert "default-src 'none'" in r.headers["content-security-policy"]


def test_service_keys_log_in_as_named_reviewers(fresh):
    key = "service-key-for-tests"
    digest = hashlib.sha256(key.encode()).hexdigest()
    with client(fresh, key_hashes=frozenset({digest})) as c:
        H.login(c, "carol", key)
        assert f"carol~key-{digest[:8]}" in c.get("/").text
    with client(fresh, key_hashes=frozenset({digest})) as c:
        page = c.get("/login")
        token = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)
        r = c.post("/login", data={"name": "carol", "password": "not-the-key",
                                   "csrf_token": token})  # fmt: skip
        assert r.status_code == 401


def test_csrf_is_checked_on_every_change(fresh):
    rid = fresh.rids["videos/ward_B_infant"]
    with client(fresh) as a, client(fresh) as b:
        csrf = H.login(a, "alice")
        other = H.login(b, "bob")
        changes = [
            ("PUT", f"/api/r/{rid}/fields", {"changes": {"note": {"value": "x", "base_rev": 0}}}),
            ("POST", f"/api/r/{rid}/intervals", {"id": "ivcsrf0001", "start_s": 1, "end_s": 3}),
            ("PATCH", f"/api/r/{rid}/intervals/ivcsrf0001", {"start_s": 1, "end_s": 2}),
            ("DELETE", f"/api/r/{rid}/intervals/ivcsrf0001", None),
            ("POST", f"/r/{rid}/pose", None),
            ("POST", "/export", None),
        ]
        for method, path, body in changes:
            for headers in ({}, {"x-csrf-token": "wrong"}, {"x-csrf-token": other}):
                r = a.request(method, path, json=body, headers=headers)
                assert r.status_code == 403, (method, path, headers)
                assert r.json()["error"]["code"] == "csrf"
        # Form posts carry it as a field: without it, no logout and no export.
        assert a.post("/logout", data={}).status_code == 403
        assert a.post("/export", data={"csrf_token": other}).status_code == 403
        assert a.get("/").status_code == 200  # still logged in
        store = a.app.state.review.store
        assert store.audit_count() == 0 and store.annotation(rid, "alice")["intervals"] == []
        assert a.app.state.review.export.state == "idle"
        # With the session's own token every change goes through.
        ok = {"x-csrf-token": csrf}
        assert a.put(changes[0][1], json=changes[0][2], headers=ok).status_code == 200
        assert a.post(changes[1][1], json=changes[1][2], headers=ok).status_code == 201
        assert a.patch(changes[2][1], json=changes[2][2], headers=ok).status_code == 200
        assert a.delete(changes[3][1], headers=ok).status_code == 200
        assert store.audit_count() == 4


# -- paths and files -----------------------------------------------------------------------------
def test_paths_never_escape_the_archive_root(fresh, tmp_path):
    secret = tmp_path / "outside.mp4"
    secret.write_bytes(b"SECRET-NOT-IN-THE-ARCHIVE")
    (fresh.archive / "videos" / "link.mp4").symlink_to(secret)
    rids = {
        "dotdot": _add_row(fresh, "../outside.mp4", "dotdot"),
        "absolute": _add_row(fresh, str(secret), "absolute"),
        "symlink": _add_row(fresh, "videos/link.mp4", "symlink"),
        "deep": _add_row(fresh, "videos/../../outside.mp4", "deep"),
    }
    with client(fresh) as c:
        H.login(c)
        for name, rid in rids.items():
            r = c.get(f"/r/{rid}/video")
            assert r.status_code == 404 and b"SECRET" not in r.content, name
            assert r.json()["error"]["code"] == "recording_missing"
            page = c.get(f"/r/{rid}")
            assert page.status_code == 200 and "outside the archive root" in page.text, name
        # Paths in URLs: only opaque ids route, and static files stay in their folder.
        for path in ["/r/..%2F..%2Foutside.mp4/video", "/r/../../outside.mp4/video",
                     "/static/..%2Fapp.py", "/static/%2e%2e/app.py", "/static/../../app.py",
                     f"/r/{rids['dotdot']}x/video", "/r/rec-zzzzzzzzzzzzzzzz/video"]:  # fmt: skip
            r = c.get(path)
            assert r.status_code == 404, path
            assert b"SECRET" not in r.content and b"import" not in r.content
        # A good recording still plays.
        assert c.get(f"/r/{fresh.rids['videos/ward_B_infant']}/video").status_code == 200


def test_video_is_served_with_range_requests(fresh):
    rid = fresh.rids["videos/ward_B_infant"]
    data = (fresh.archive / H.VIDEO_PATH).read_bytes()
    with client(fresh) as c:
        H.login(c)
        full = c.get(f"/r/{rid}/video")
        assert full.status_code == 200 and full.content == data
        assert full.headers["accept-ranges"] == "bytes"
        assert full.headers["content-type"] == "video/mp4"
        assert "content-disposition" not in full.headers  # no file name leaves the server
        part = c.get(f"/r/{rid}/video", headers={"range": "bytes=1000-1999"})
        assert part.status_code == 206 and part.content == data[1000:2000]
        assert part.headers["content-range"] == f"bytes 1000-1999/{len(data)}"
        tail = c.get(f"/r/{rid}/video", headers={"range": "bytes=-100"})
        assert tail.status_code == 206 and tail.content == data[-100:]
        assert c.get(f"/r/{rid}/video", headers={"range": "bytes=99999999-"}).status_code == 416
        pose_rid = fresh.rids["poses/sim0005_0000"]
        assert c.get(f"/r/{pose_rid}/video").json()["error"]["code"] == "no_video"


def test_a_recording_gone_from_the_archive(fresh, tmp_path):
    rid = fresh.rids["videos/ward_B_infant"]
    (fresh.archive / H.VIDEO_PATH).unlink()
    with client(fresh) as c:
        csrf = H.login(c)
        page = c.get(f"/r/{rid}")
        assert page.status_code == 200
        assert 'id="missing"' in page.text and "no longer in the archive" in page.text
        assert '<video id="video"' not in page.text
        r = c.get(f"/r/{rid}/video")
        assert r.status_code == 404 and r.json()["error"]["code"] == "recording_missing"
        r = c.post(f"/r/{rid}/pose", headers={"x-csrf-token": csrf})
        assert r.status_code == 404 and r.json()["error"]["code"] == "recording_missing"
        # The review still works and is kept; the export says why it cannot take it.
        assert put(c, rid, csrf, category="absent", group="risk", state="done").status_code == 200
        assert "done" in c.get("/").text
    out = tmp_path / "export"
    assert main(["review", str(fresh.out), "--archive", str(fresh.archive),
                 "--export", str(out)]) == 0  # fmt: skip
    summary = json.loads((out / "export.json").read_text())
    assert summary["exported"] == 0
    assert summary["skipped"][0]["reason"].startswith("recording_missing")


def test_pages_show_results_states_and_escape_data(fresh):
    evil = _add_row(fresh, "videos/evil.mp4", EVIL_ID)
    rows = _rows(fresh)
    ledger = Ledger(fresh.out / "ledger.sqlite")
    try:  # a recording that failed to screen
        ledger.set_path(Item(fresh.archive / "bad.mp4", "bad.mp4", "bad"), "k-bad", "k-bad", 1, 1)
        ledger.finish("k-bad", "k-bad", "video", "failed", "not_a_video", "not a video")
    finally:
        ledger.close()
    rid = fresh.rids["videos/ward_B_infant"]
    with client(fresh) as c:
        csrf = H.login(c)
        put(c, rid, csrf, category="intermittent")
        page = c.get("/").text
        assert "<script>alert" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
        assert page.count('class="rec-link"') == len(rows) + 1
        assert "not_a_video" in page and "in progress" in page and "intermittent" in page
        result = json.loads(rows[0]["result"])
        assert f'class="badge {result["classification"]["label"]}"' in page
        assert re.search(rf'<p id="counts">\s*{len(rows)} not reviewed, 1 in progress', page)
        rec = c.get(f"/r/{rid}").text
        assert rec.count('class="clip') == len(result["clips"])
        data = json.loads(re.search(r'id="rec-data">(.*?)</script>', rec, re.S).group(1))
        assert [x["i"] for x in data["clips"]] == [x["index"] for x in result["clips"]]
        assert data["top"] == [x["index"] for x in result["top_fms_clips"]]
        # Every script is a file of the app (the CSP allows no inline script).
        for tag in re.findall(r"<script[^>]*>", rec):
            assert 'src="/static/' in tag or 'type="application/json"' in tag
        if result["classification"]["label"] == "indeterminate":
            assert 'id="indeterminate"' in rec
            assert all(reason in rec for reason in map(_esc, result["classification"]["reasons"]))
        assert ("in domain" if result["domain"]["in_domain"] else "OUT OF DOMAIN") in rec
        assert "&lt;script&gt;" in c.get(f"/r/{evil}").text
        bad = page_stem({"path": "bad.mp4", "id": "bad"})
        assert "Not screened" in c.get(f"/r/{bad}").text
        r = put(c, bad, csrf, category="absent")
        assert r.status_code == 409 and r.json()["error"]["code"] == "not_screened"


def _esc(s: str) -> str:
    import html

    return html.escape(s, quote=True)


# -- two reviewers --------------------------------------------------------------------------------
def test_two_assessors_review_independently(fresh):
    """Each assessor has their own review: nothing of one overwrites the other's, and an
    assessor's page and JSON carry only their own review and history."""
    rid = fresh.rids["videos/ward_B_infant"]
    with client(fresh) as a, client(fresh) as b:
        ca, cb = H.login(a, "carol"), H.login(b, "bob")
        assert a.get(f"/api/r/{rid}").json()["fields"] == {}

        def change(c, csrf, **fields):
            body = {"changes": {k: {"value": v, "base_rev": 0} for k, v in fields.items()}}
            r = c.put(f"/api/r/{rid}/fields", json=body, headers={"x-csrf-token": csrf})
            assert r.status_code == 200, r.text
            return r.json()

        assert change(a, ca, category="continuous")["overwrote"] == {}
        r = change(b, cb, category="sporadic", note="arms and legs")
        assert r["overwrote"] == {} and r["fields"]["category"]["value"] == "sporadic"
        mine = a.get(f"/api/r/{rid}").json()
        assert mine["fields"]["category"]["value"] == "continuous" and "note" not in mine["fields"]
        assert {h["reviewer"] for h in mine["history"]} == {"carol"}  # not bob's review
        # Intervals too: each assessor's own; bob cannot touch carol's.
        h = {"a": {"x-csrf-token": ca}, "b": {"x-csrf-token": cb}}
        ia = a.post(f"/api/r/{rid}/intervals", json={"id": "iv-carol-1", "start_s": 1, "end_s": 4},
                    headers=h["a"]).json()["interval"]  # fmt: skip
        b.post(f"/api/r/{rid}/intervals", json={"id": "iv-bob-001", "start_s": 6, "end_s": 9},
               headers=h["b"])  # fmt: skip
        assert [i["id"] for i in a.get(f"/api/r/{rid}").json()["intervals"]] == ["iv-carol-1"]
        assert b.delete(f"/api/r/{rid}/intervals/{ia['id']}", headers=h["b"]).status_code == 404
        assert [i["id"] for i in a.get(f"/api/r/{rid}").json()["intervals"]] == ["iv-carol-1"]
        # Her own interval deleted in another tab: a later edit is refused, not dropped.
        assert a.delete(f"/api/r/{rid}/intervals/{ia['id']}", headers=h["a"]).status_code == 200
        r = a.patch(f"/api/r/{rid}/intervals/{ia['id']}", json={"start_s": 1, "end_s": 5,
                    "base_rev": 1}, headers=h["a"])  # fmt: skip
        assert r.status_code == 409 and r.json()["error"]["by"] == "carol"


def test_bad_changes_are_refused_with_reasons(fresh):
    rid = fresh.rids["videos/ward_B_infant"]
    with client(fresh) as c:
        csrf = H.login(c)
        hdr = {"x-csrf-token": csrf, "content-type": "application/json"}
        for body in [b"not json", b"[]", b'{"changes": {}}', b'{"changes": {"note": "x"}}',
                     b'{"changes": {"category": {"value": "fidgety"}}}',
                     b'{"changes": {"note": {"value": "x", "base_rev": "1"}}}']:  # fmt: skip
            r = c.put(f"/api/r/{rid}/fields", content=body, headers=hdr)
            assert r.status_code == 400 and r.json()["error"]["message"], body
        duration = json.loads(_rows(fresh)[0]["result"])["quality"]["duration_s"]
        r = c.post(f"/api/r/{rid}/intervals", json={"start_s": 1, "end_s": duration + 5},
                   headers=hdr)  # fmt: skip
        assert r.status_code == 400 and "after the recording" in r.json()["error"]["message"]
        r = c.patch(f"/api/r/{rid}/intervals/iv-none-0001", json={"start_s": 1, "end_s": 2},
                    headers=hdr)  # fmt: skip
        assert r.status_code == 404
        big = b'{"changes": {"note": {"value": "' + b"x" * (1 << 20) + b'"}}}'
        assert c.put(f"/api/r/{rid}/fields", content=big, headers=hdr).status_code == 400
        assert c.app.state.review.store.audit_count() == 0


# -- the skeleton overlay -------------------------------------------------------------------------
def _wait(c, rid, csrf, timeout=60.0) -> dict:
    t0 = time.monotonic()
    r = c.post(f"/r/{rid}/pose", headers={"x-csrf-token": csrf}).json()
    while r["state"] == "running" and time.monotonic() - t0 < timeout:
        time.sleep(0.1)
        r = c.get(f"/r/{rid}/pose").json()
    return r


def test_skeleton_overlay_comes_from_the_recordings_backend_once(fresh):
    rid = H.add_video_row(fresh.out, fresh.archive, "videos/fake.mp4", pose_backend=FAKE_BACKEND)
    calls = len(FAKE_CALLS)
    with client(fresh) as c:
        csrf = H.login(c)
        assert c.get(f"/r/{rid}/pose").json()["state"] == "none"  # nothing runs until asked
        r = _wait(c, rid, csrf)
        assert r["state"] == "done" and r["backend"] == FAKE_BACKEND
        ov = r["overlay"]
        assert (ov["frames"], ov["joints"], ov["width"], ov["height"]) == (300, 17, 160, 120)
        q = np.frombuffer(__import__("base64").b64decode(ov["data"]), "<u2").reshape(300, 17, 2)
        x = q[..., 0] / 65534 * 160
        y = q[..., 1] / 65534 * 120
        np.testing.assert_allclose(x[7], 10 + 5 * np.arange(17), atol=0.01)
        np.testing.assert_allclose(y[:, 3], 5 + np.arange(300) % 100, atol=0.01)
        assert len(ov["bones"]) == 16 and set(ov["side"]) == {"left", "right", "axial"}
    assert len(FAKE_CALLS) == calls + 1 and FAKE_CALLS[-1] == 300
    # Cached by content hash: a new app (a restart) draws it without estimating again.
    with client(fresh) as c:
        csrf = H.login(c)
        assert _wait(c, rid, csrf)["state"] == "done"
    assert len(FAKE_CALLS) == calls + 1
    kept = list((fresh.out / "poses").glob(f"{FAKE_BACKEND}-v3-*.npz"))
    assert len(kept) == 1  # where mam batch keeps poses, the backend recorded in the file
    with np.load(kept[0]) as z:
        assert (str(z["source"]), str(z["kind"])) == (FAKE_BACKEND, "video")


def _keep_fake_pose(b: H.Batch, path: str, legacy: bool = False) -> tuple[str, Path]:
    """A video row whose pose the batch kept (or, ``legacy``, the app cached under its old
    name, without the backend in the file); returns its rid and the pose file."""
    from mam.batch.poses import kept_pose_path
    from mam.model.weights import sha256_of
    from mam.pose.from_video import write_pose_cache

    rid = H.add_video_row(b.out, b.archive, path, pose_backend=FAKE_BACKEND)
    sha = sha256_of(b.archive / path)
    seq = _FakePose().estimate(np.zeros((300, 120, 160, 3), np.uint8))
    FAKE_CALLS.pop()  # made here, not estimated by the app
    if legacy:
        seq.source = "unknown"
        dest = b.out / ".review_cache" / "pose" / f"{FAKE_BACKEND}-v1-{sha}.npz"
    else:
        dest = kept_pose_path(b.out, FAKE_BACKEND, sha)
    return rid, write_pose_cache(seq, dest)


def test_overlay_and_export_take_the_pose_the_batch_kept(fresh, tmp_path):
    from mam.training.dataset import load_dataset

    rid, kept = _keep_fake_pose(fresh, "videos/kept.mp4")
    calls = len(FAKE_CALLS)
    with client(fresh) as c:
        csrf = H.login(c)
        r = c.get(f"/r/{rid}/pose").json()  # drawn at once: nothing to estimate
        assert r["state"] == "done" and r["overlay"]["frames"] == 300
        assert (r["overlay"]["width"], r["overlay"]["height"]) == (160, 120)
        _review_all(c, fresh, csrf)
        assert put(c, rid, csrf, category="continuous", group="normal", state="done").is_success
    out = tmp_path / "training"
    assert main(["review", str(fresh.out), "--archive", str(fresh.archive),
                 "--export", str(out)]) == 0  # fmt: skip
    assert len(FAKE_CALLS) == calls  # neither the overlay nor the export estimated it again
    with open(out / "infants.csv") as f:
        row = next(r for r in csv.DictReader(f) if r["id"] == "videos/kept")
    with np.load(kept) as a, np.load(out / row["file"]) as b:
        assert set(a.files) == set(b.files) and str(b["source"]) == FAKE_BACKEND
        assert all(np.array_equal(a[k], b[k]) for k in a.files)
    # Trained on, the exported pose is the video kind it came from; the pose files stay theirs.
    kinds = {r.infant_id: r.source for r in load_dataset(out)}
    assert kinds["videos/kept"] == FAKE_BACKEND
    assert {kinds[i] for i in fresh.truth} == {"precomputed"}
    declared = json.loads((out / "dataset.json").read_text())
    assert declared["data"] == "recordings"
    assert declared["kinds"] == {"pose_file": len(fresh.truth), "video": 1}


def test_a_pose_cached_before_the_batch_kept_poses_is_moved_not_estimated(fresh):
    rid, old = _keep_fake_pose(fresh, "videos/old.mp4", legacy=True)
    calls = len(FAKE_CALLS)
    with client(fresh) as c:
        H.login(c)
        assert c.get(f"/r/{rid}/pose").json()["state"] == "done"
    assert len(FAKE_CALLS) == calls and not old.exists()
    (moved,) = (fresh.out / "poses").glob(f"{FAKE_BACKEND}-v3-*.npz")
    with np.load(moved) as z:
        assert (str(z["source"]), str(z["kind"])) == (FAKE_BACKEND, "video")


def test_skeleton_refuses_a_recording_changed_since_screening(fresh):
    rid = H.add_video_row(fresh.out, fresh.archive, "videos/fake.mp4", pose_backend=FAKE_BACKEND)
    with open(fresh.archive / "videos" / "fake.mp4", "ab") as f:
        f.write(b"\0" * 16)  # another file than the one screened
    calls = len(FAKE_CALLS)
    with client(fresh) as c:
        csrf = H.login(c)
        r = _wait(c, rid, csrf)
        assert r["state"] == "failed" and r["code"] == "recording_changed"
    assert len(FAKE_CALLS) == calls


# -- export ---------------------------------------------------------------------------------------
def _review_all(c, b: H.Batch, csrf: str, done: bool = True) -> None:
    """Annotate every simulated infant with its ground truth, through the API."""
    hdr = {"x-csrf-token": csrf}
    for ident, t in b.truth.items():
        rid = b.rids[ident]
        for k, (a, e) in enumerate(t["intervals"]):
            r = c.post(f"/api/r/{rid}/intervals", headers=hdr,
                       json={"id": f"iv-{rid[4:]}-{k:03d}", "start_s": a, "end_s": e})  # fmt: skip
            assert r.status_code == 201, r.text
        r = put(c, rid, csrf, category=t["fms_category"], group=t["group"],
                state="done" if done else "in_progress")  # fmt: skip
        assert r.status_code == 200


def test_export_is_the_training_layout_with_an_agreement_report(fresh, tmp_path):
    fake = H.add_video_row(fresh.out, fresh.archive, "videos/fake.mp4", pose_backend=FAKE_BACKEND)
    with client(fresh) as c:
        csrf = H.login(c)
        _review_all(c, fresh, csrf)
        put(c, fake, csrf, category="continuous", group="normal", state="done")
        r = c.post(f"/api/r/{fake}/intervals", headers={"x-csrf-token": csrf},
                   json={"id": "iv-fake-0001", "start_s": 0.5, "end_s": 11.0})  # fmt: skip
        assert r.status_code == 201
        # In progress (never marked done) and done without a category: left out, with reasons.
        put(c, fresh.rids["videos/ward_B_infant"], csrf, note="still watching")
    out = tmp_path / "training"
    assert main(["review", str(fresh.out), "--archive", str(fresh.archive),
                 "--export", str(out)]) == 0  # fmt: skip
    with open(out / "infants.csv") as f:
        infants = {r["id"]: r for r in csv.DictReader(f)}
    assert set(infants) == set(fresh.truth) | {"videos/fake"}
    for ident, t in fresh.truth.items():
        row = infants[ident]
        assert (row["group"], row["fms_category"]) == (t["group"], t["fms_category"])
        assert row["file"].startswith("poses/rec-") and ident not in row["file"]
        assert np.array_equal(np.load(out / row["file"]),
                              np.load(fresh.archive / f"{ident}.npy"))  # fmt: skip
    assert infants["videos/fake"]["file"].endswith(".npz")
    with open(out / "fms_intervals.csv") as f:
        got = sorted((r["id"], float(r["start_s"]), float(r["end_s"])) for r in csv.DictReader(f))
    want = sorted([(i, a, b) for i, t in fresh.truth.items() for a, b in t["intervals"]]
                  + [("videos/fake", 0.5, 11.0)])  # fmt: skip
    # pytest.approx compares flat sequences only (9.2 refuses nested ones): ids, then numbers.
    assert [g[0] for g in got] == [w[0] for w in want]
    assert [g[1:] for g in got] == [pytest.approx(w[1:]) for w in want]
    # mam train's own loader reads it as it is.
    from mam.training.dataset import load_dataset

    recs = {r.infant_id: r for r in load_dataset(out)}
    assert set(recs) == set(infants)
    assert recs["videos/fake"].image_joints is not None  # the 2D pose travels with the 3D
    assert recs["videos/fake"].fms_intervals_s == [(0.5, 11.0)]
    summary = json.loads((out / "export.json").read_text())
    assert summary["exported"] == len(infants) and summary["skipped"] == []
    assert summary["groups"] == {g: sum(r["group"] == g for r in infants.values())
                                 for g in ("normal", "risk")}  # fmt: skip
    assert "mam train" in summary["validated"]
    with open(out / "agreement.csv") as f:
        agreement = {r["id"]: r for r in csv.DictReader(f)}
    assert set(agreement) == set(infants)
    for r in agreement.values():
        assert -1 <= float(r["kappa"]) <= 1 and int(r["clips"]) > 0
    report = json.loads((out / "agreement.json").read_text())
    kappas = [float(r["kappa"]) for r in agreement.values()]
    assert report["summary"]["median_kappa"] == pytest.approx(float(np.median(kappas)))
    # The same again into a folder that is not empty: refused, nothing overwritten.
    before = (out / "infants.csv").read_bytes()
    assert main(["review", str(fresh.out), "--archive", str(fresh.archive),
                 "--export", str(out)]) == 2  # fmt: skip
    assert (out / "infants.csv").read_bytes() == before


def test_export_button_writes_and_offers_the_same_layout(fresh):
    with client(fresh) as c:
        csrf = H.login(c)
        _review_all(c, fresh, csrf)
        r = c.post("/export", data={"csrf_token": csrf}, follow_redirects=False)
        assert r.status_code == 303
        t0 = time.monotonic()
        while c.get("/export/status").json()["state"] == "running":
            assert time.monotonic() - t0 < 60
            time.sleep(0.1)
        status = c.get("/export/status").json()
        assert status["state"] == "done", status
        assert status["summary"]["exported"] == len(fresh.truth)
        page = c.get("/export").text
        assert "Median per-video kappa" in page and 'id="export-download"' in page
        z = c.get("/export/download")
        assert z.status_code == 200 and z.headers["content-type"] == "application/zip"
        import io
        import zipfile

        names = zipfile.ZipFile(io.BytesIO(z.content)).namelist()
        stem = status["name"]
        assert {f"{stem}/infants.csv", f"{stem}/fms_intervals.csv", f"{stem}/agreement.csv"} <= set(
            names
        )
        assert sum(n.startswith(f"{stem}/poses/") for n in names) == len(fresh.truth)
        assert (fresh.out / "review_exports" / stem / "infants.csv").is_file()


# -- CLI, logs -------------------------------------------------------------------------------------
def test_cli_users_and_usage(fresh, tmp_path, capsys, monkeypatch):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("dave-password-9\n"))
    assert main(["review", str(fresh.out), "--add-user", "dave"]) == 0
    users = (fresh.out / "review_users").read_text()
    # The first user can do everything (someone must sign off and export).
    assert "dave:senior,admin:scrypt$" in users and "dave-password-9" not in users
    assert oct((fresh.out / "review_users").stat().st_mode & 0o777) == "0o600"
    for name, role, want in (("erin", None, "assessor"), ("fay", "senior", "senior"),
                             ("gil", "assessor,admin", "assessor,admin")):  # fmt: skip
        monkeypatch.setattr("sys.stdin", io.StringIO("long-enough-pw\n"))
        extra = ["--role", role] if role else []
        assert main(["review", str(fresh.out), "--add-user", name, *extra]) == 0
        assert f"\n{name}:{want}:scrypt$" in (fresh.out / "review_users").read_text()
    monkeypatch.setattr("sys.stdin", io.StringIO("long-enough-pw\n"))
    assert main(["review", str(fresh.out), "--add-user", "hal", "--role", "boss"]) == 2
    assert "role" in capsys.readouterr().err
    assert (
        main(["review", str(fresh.out), "--role", "senior", "--export", str(tmp_path / "r")]) == 2
    )
    monkeypatch.setattr("sys.stdin", io.StringIO("short\n"))
    assert main(["review", str(fresh.out), "--add-user", "eve"]) == 2
    assert main(["review", str(fresh.out), "--add-user", "x", "--port", "1"]) == 2
    assert main(["review", str(fresh.out), "--export", str(tmp_path / "e"), "--port", "9"]) == 2
    assert "--port" in capsys.readouterr().err
    assert main(["review", str(tmp_path / "nothing"), "--export", str(tmp_path / "e")]) == 2
    assert "mam batch" in capsys.readouterr().err
    with client(fresh) as c:
        H.login(c, "dave", "dave-password-9")


def test_logs_carry_no_ids_paths_or_annotations(fresh, caplog):
    caplog.set_level(logging.DEBUG)
    secret_note = "Baby Jane Doe, bed 4"
    rid = H.add_video_row(fresh.out, fresh.archive, "videos/fake.mp4", pose_backend=FAKE_BACKEND)
    with client(fresh) as c:
        csrf = H.login(c)
        for r_id in fresh.rids.values():
            c.get(f"/r/{r_id}")
        put(c, rid, csrf, note=secret_note, category="absent", group="risk", state="done")
        _wait(c, rid, csrf)
        c.get("/r/rec-0000000000000000/video")
        c.put(f"/api/r/{rid}/fields", content=b"{bad", headers={"x-csrf-token": csrf})
        c.post("/export", data={"csrf_token": csrf})
        t0 = time.monotonic()
        while c.get("/export/status").json()["state"] == "running" and time.monotonic() - t0 < 60:
            time.sleep(0.1)
    # The app's own records at any level, and everything at INFO and above; not the test
    # client's (httpx logs the URLs it requests).
    text = "\n".join(
        r.getMessage()
        for r in caplog.records
        if r.name != "httpx" and (r.name.startswith("mam.review") or r.levelno >= logging.INFO)
    )
    assert "review export: 1 recordings" in text  # the capture works
    forbidden = [secret_note, str(fresh.archive), str(fresh.out), "alice", *fresh.rids,
                 *(r["path"] for r in _rows(fresh)), *fresh.rids.values(), rid]  # fmt: skip
    for word in forbidden:
        assert word not in text, word


def test_the_review_package_has_no_network_assets():
    """Offline: no page or script names another origin (no CDN)."""
    root = Path(__file__).resolve().parents[1] / "mam" / "review"
    for f in list((root / "templates").glob("*.html")) + list((root / "static").glob("*")):
        text = f.read_text()
        assert not re.search(r"(src|href)=\"(https?:)?//", text), f.name
        assert "http://" not in text.replace("http://www.w3.org/2000/svg", ""), f.name
        assert "https://" not in text, f.name
    assert os.path.getsize(root / "static" / "recording.js") < 64_000


# -- login throttle, access log, secure cookies, defects -------------------------------------------
def _attempt(c, name, password):
    page = c.get("/login")
    token = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)
    return c.post("/login", data={"name": name, "password": password, "csrf_token": token},
                  follow_redirects=False)  # fmt: skip


def test_wrong_passwords_slow_one_client_and_never_lock_the_name(fresh):
    app = create_app(H.config(fresh))
    review = app.state.review
    now = [1_000_000.0]
    review.throttle.clock = lambda: now[0]
    wrong = "wrong-password-xyz"
    with TestClient(app, client=("10.0.0.1", 5000)) as a:
        # Six wrong passwords from one client: three free, then 1, 2, 4 s waits (429), each
        # answered before the password is even checked.
        statuses, waits = [], []
        while statuses.count(401) < 6:
            r = _attempt(a, "alice", wrong)
            statuses.append(r.status_code)
            if r.status_code == 429:
                assert "Too many failed logins" in r.text
                waits.append(int(r.headers["retry-after"]))
                now[0] += waits[-1]
        assert statuses == [401] * 3 + [429, 401] * 3
        assert waits == [1, 2, 4]
        # The right password from another client: in at once (the name is not locked).
        b = TestClient(app, client=("10.0.0.2", 5001))
        r = _attempt(b, "alice", H.PASSWORDS["alice"])
        assert r.status_code == 303
        # The first client is slowed, not locked: after the wait, the right password works.
        r = _attempt(a, "alice", H.PASSWORDS["alice"])
        assert r.status_code == 429 and r.headers["retry-after"] == "8"
        now[0] += 8
        assert _attempt(a, "alice", H.PASSWORDS["alice"]).status_code == 303
        # A password typed as a name is not kept: unknown names are logged as such.
        assert _attempt(a, "my-Secret-pw", wrong).status_code == 401
        # The counters are in the database: a restart does not reset them.
        for _ in range(3):
            _attempt(a, "bob", wrong)
        again = create_app(H.config(fresh))
        again.state.review.throttle.clock = lambda: now[0]
        with TestClient(again, client=("10.0.0.1", 5000)) as a2:
            assert _attempt(a2, "bob", H.PASSWORDS["bob"]).status_code == 429
        events = review.store.events()
    failed = [e for e in events if e["outcome"] == "failed"]
    assert [(e["user"], e["client"]) for e in failed] == (
        [("alice", "10.0.0.1")] * 6 + [("(unknown name)", "10.0.0.1")] + [("bob", "10.0.0.1")] * 3
    )
    assert sum(e["outcome"] == "throttled" for e in events) == 5
    ok = [
        (e["user"], e["client"]) for e in events if e["event"] == "login" and e["outcome"] == "ok"
    ]
    assert ok == [("alice", "10.0.0.2"), ("alice", "10.0.0.1")]
    db = b"".join(p.read_bytes() for p in fresh.out.glob("review.sqlite*"))
    for secret in (wrong, H.PASSWORDS["alice"], "my-Secret-pw"):
        assert secret.encode() not in db


def test_the_access_log_records_logins_logouts_exports_and_downloads(fresh):
    with client(fresh, client=("10.1.2.3", 4000)) as c:
        csrf = H.login(c)
        assert c.get("/export/download").status_code == 404
        _review_all(c, fresh, csrf)
        assert (
            c.post("/export", data={"csrf_token": csrf}, follow_redirects=False).status_code == 303
        )
        t0 = time.monotonic()
        while c.get("/export/status").json()["state"] == "running":
            assert time.monotonic() - t0 < 60
            time.sleep(0.1)
        assert c.get("/export/download").status_code == 200
        page = c.get("/audit", headers=HTML)
        assert page.status_code == 200
        c.post("/logout", data={"csrf_token": csrf}, follow_redirects=False)
        assert "/login" in c.get("/audit", headers=HTML, follow_redirects=False).headers["location"]
        events = [(e["event"], e["user"], e["client"], e["outcome"])
                  for e in c.app.state.review.store.events()]  # fmt: skip
    who = ("alice", "10.1.2.3")
    assert events == [("login", *who, "ok"), ("download", *who, "no_export"),
                      ("export", *who, "started"), ("export", *who, "done"),
                      ("download", *who, "ok"), ("logout", *who, "ok")]  # fmt: skip
    rows = re.findall(r'<tr class="ev [a-z_]+"><td>[^<]+</td><td>(\w+)</td><td>(\w+)</td>'
                      r"<td>([\d.]+)</td><td>(\w+)</td></tr>", page.text)  # fmt: skip
    assert rows == [e for e in events[::-1] if e[0] != "logout"]  # newest first
    assert not any(rid in page.text for rid in fresh.rids.values())


def test_export_job_survives_a_restart(fresh):
    with client(fresh) as c:
        csrf = H.login(c)
        _review_all(c, fresh, csrf)
        c.post("/export", data={"csrf_token": csrf})
        t0 = time.monotonic()
        while (status := c.get("/export/status").json())["state"] == "running":
            assert time.monotonic() - t0 < 60
            time.sleep(0.1)
    with client(fresh) as c:  # the app restarted: the finished export is still offered
        H.login(c)
        assert c.get("/export/status").json() == status
        assert 'id="export-download"' in c.get("/export").text
        assert c.get("/export/download").status_code == 200
        # An export the restart cut short says so instead of "running" for ever.
        c.app.state.review.store.save_export_job({**status, "state": "running"})
    with client(fresh) as c:
        H.login(c)
        assert c.get("/export/status").json()["state"] == "interrupted"
        page = c.get("/export").text
        assert 'id="export-interrupted"' in page and "start it again" in page
        assert c.get("/export/download").status_code == 404


def test_secure_cookie_setting_is_honoured_by_mam_review_and_the_service(fresh, monkeypatch):
    from mam.review.config import ReviewConfig

    def cookie_attrs(config, scheme="http"):
        """The attributes of the login form's cookie and of the session cookie."""
        with TestClient(create_app(config), base_url=f"{scheme}://testserver") as c:
            page = c.get("/login")
            token = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)
            # Sent by hand: the test client, like a browser, keeps a Secure cookie off http.
            r = c.post("/login", headers={"cookie": f"mam_review_login={token}"},
                       data={"name": "alice", "password": H.PASSWORDS["alice"],
                             "csrf_token": token}, follow_redirects=False)  # fmt: skip
        assert r.status_code == 303
        attrs = set()
        for resp, name in ((page, "mam_review_login="), (r, "mam_review_session=")):
            cookie = next(v for k, v in resp.headers.multi_items()
                          if k == "set-cookie" and v.startswith(name))  # fmt: skip
            attrs.add("secure" in {a.strip().split("=")[0].lower() for a in cookie.split(";")})
        assert len(attrs) == 1  # both cookies alike
        return {"secure"} if attrs.pop() else set()

    H.config(fresh)  # the users file
    served = []
    monkeypatch.setattr("mam.cli.review._serve", lambda config, host, port: served.append(config))
    monkeypatch.setenv("MAM_REVIEW_SECURE_COOKIE", "1")
    main(["review", str(fresh.out), "--archive", str(fresh.archive)])
    assert "secure" in cookie_attrs(served[-1])  # over plain http too: the proxy speaks https
    monkeypatch.setenv("MAM_REVIEW_DIR", str(fresh.out))
    assert "secure" in cookie_attrs(ReviewConfig.from_env())
    monkeypatch.setenv("MAM_REVIEW_SECURE_COOKIE", "0")
    main(["review", str(fresh.out)])
    assert "secure" not in cookie_attrs(served[-1], "https")
    monkeypatch.delenv("MAM_REVIEW_SECURE_COOKIE")
    main(["review", str(fresh.out)])
    assert "secure" in cookie_attrs(served[-1], "https")
    assert "secure" not in cookie_attrs(served[-1], "http")


def test_login_page_style_is_css_and_a_wrong_password_keeps_the_name(fresh):
    with client(fresh) as c:
        page = c.get("/login").text
        style = re.search(r"<style[^>]*>(.*?)</style>", page, re.S).group(1)
        assert "'Segoe UI'" in style and "&#39;" not in style and "&amp;" not in style
        r = _attempt(c, "alice", "wrong-password")
        assert r.status_code == 401
        assert re.search(r'<input id="name" [^>]*value="alice"', r.text)
        assert re.search(r'<input id="password" [^>]*autofocus', r.text)
        r = _attempt(c, 'x"><script>alert(1)</script>', "wrong-password")
        assert "<script>alert" not in r.text


def test_an_empty_write_changes_nothing(fresh):
    rid = fresh.rids["videos/ward_B_infant"]
    with client(fresh) as c:
        csrf = H.login(c)
        for value in ("", "   "):
            r = put(c, rid, csrf, note=value)
            assert r.status_code == 200 and r.json()["fields"] == {}
        assert c.get(f"/api/r/{rid}").json()["history"] == []
        row = re.search(rf'<tr data-state="(\w+)"[^>]*data-rid="{rid}"', c.get("/").text)
        assert row.group(1) == "not_reviewed"
        # A real note, then cleared: two changes, the second to nothing.
        put(c, rid, csrf, note="seen")
        put(c, rid, csrf, note="")
        hist = c.get(f"/api/r/{rid}").json()["history"]
        assert [(h["old"], h["new"]) for h in hist] == [("seen", None), (None, "seen")]


def test_clips_have_one_name_in_the_tables_the_timeline_and_the_history(fresh):
    rid = fresh.rids["videos/ward_B_infant"]
    with client(fresh) as c:
        H.login(c)
        page = c.get(f"/r/{rid}").text
    top = re.search(r'<table id="top-clips">.*?</table>', page, re.S).group(0)
    assert "<th>Clip</th>" in top
    cells = re.findall(r'<tr data-i="(\d+)"><td class="num">(\d+)</td>', top)
    assert cells and all(i == shown for i, shown in cells)  # the clip's number, not its rank
    assert any(i != str(k) for k, (i, _) in enumerate(cells, start=1))  # (ranks would differ)
    marks = re.findall(r'<g class="clip top" data-i="(\d+)".*?<text class="rank"[^>]*>(\d+)<',
                       page, re.S)  # fmt: skip
    assert marks and all(i == shown for i, shown in marks)
    assert "top FMs clip 1" not in page


def test_a_result_altered_inside_the_ledger_is_never_shown_as_the_models(fresh):
    """The ledger's per-result digest (mam.batch.ledger): a P(risk) edited in place reads as a
    failed recording, not as what the model said."""
    import sqlite3

    from mam.review.catalog import Catalog

    ident = next(i for i in fresh.rids if i.startswith("poses/"))
    db = sqlite3.connect(fresh.out / "ledger.sqlite")
    key = db.execute("SELECT key FROM paths WHERE id = ?", (ident,)).fetchone()[0]
    (result,) = db.execute("SELECT result FROM jobs WHERE key = ?", (key,)).fetchone()
    changed = json.loads(result)
    changed["risk_probability"] = 1 - changed["risk_probability"]
    db.execute("UPDATE jobs SET result = ? WHERE key = ?", (json.dumps(changed), key))
    db.commit()
    db.close()
    recs = {r.id: r for r in Catalog(fresh.out, fresh.archive).all()}
    assert recs[ident].status == "failed" and recs[ident].error_code == "altered_result"
    assert all(r.status == "done" for i, r in recs.items() if i != ident and i.startswith("poses/"))


# -- independent blind review, roles, sign-off, agreement, vocabulary ------------------------------
RISK = 0.7312  # a P(risk) no other number on the pages spells


def _odd_result(doc: dict) -> None:
    """Risk at a distinctive P(risk), with an FMs category (intermittent) that alone means
    normal."""
    doc["risk_probability"], doc["normal_probability"] = RISK, round(1 - RISK, 4)
    doc["classification"]["label"] = doc["classification"]["model_label"] = "risk"
    doc["fms_category"] = "intermittent"


def _shows_model(html: str) -> bool:
    return "0.731" in html or str(RISK) in html or 'id="model-label"' in html


def test_blind_review_hides_the_model_until_the_assessors_own_verdict(fresh):
    rid = H.add_video_row(fresh.out, fresh.archive, "videos/odd.mp4", mutate=_odd_result)
    with client(fresh, blind=True) as b, client(fresh, blind=True) as c:
        cb = H.login(b, "bob")
        H.login(c, "carol")
        for page in (f"/r/{rid}", "/"):
            html = b.get(page).text
            assert not _shows_model(html), page
            assert "blind review" in html
        assert 'id="top-clips"' not in b.get(f"/r/{rid}").text
        assert str(RISK) not in b.get(f"/api/r/{rid}").text
        assert put(b, rid, cb, category="sporadic", group="risk").is_success
        assert not _shows_model(b.get(f"/r/{rid}").text)  # a category is not a verdict yet
        assert put(b, rid, cb, state="done").is_success
        page = b.get(f"/r/{rid}").text
        assert "0.731" in page and 'id="model-label"' in page and 'id="top-clips"' in page
        assert 'id="at-odds"' in page  # risk, yet an intermittent category
        assert not _shows_model(c.get(f"/r/{rid}").text)  # carol has not finished
        assert not _shows_model(c.get("/").text)


def test_blind_review_set_for_the_worklist_by_an_admin(fresh):
    rid = H.add_video_row(fresh.out, fresh.archive, "videos/odd.mp4", mutate=_odd_result)
    with client(fresh) as a, client(fresh) as b:
        ca, cb = H.login(a, "alice"), H.login(b, "bob")
        assert _shows_model(b.get(f"/r/{rid}").text)
        assert b.post("/settings/blind", data={"csrf_token": cb, "blind": "1"}).status_code == 403
        r = a.post("/settings/blind", data={"csrf_token": ca, "blind": "1"},
                   follow_redirects=False)  # fmt: skip
        assert r.status_code == 303
        assert not _shows_model(b.get(f"/r/{rid}").text)
        a.post("/settings/blind", data={"csrf_token": ca, "blind": "0"})
        assert _shows_model(b.get(f"/r/{rid}").text)


def test_roles_gate_the_export_the_access_log_and_the_agreement(fresh):
    with client(fresh) as a, client(fresh) as b:
        H.login(a, "alice")
        cb = H.login(b, "bob")
        for path in ("/export", "/export/status", "/export/download", "/audit", "/agreement"):
            assert b.get(path, headers=HTML).status_code == 403, path
            assert a.get(path, headers=HTML).status_code in (200, 404), path
        assert b.post("/export", data={"csrf_token": cb}).status_code == 403
        home = b.get("/").text
        assert 'href="/export"' not in home and 'href="/audit"' not in home
        assert 'href="/export"' in a.get("/").text
        events = a.app.state.review.store.events()
        assert ("download", "bob", "forbidden") in [(e["event"], e["user"], e["outcome"])
                                                    for e in events]  # fmt: skip


def _sign(c, rid, csrf, **form):
    return c.post(f"/r/{rid}/signoff", data={"csrf_token": csrf, **form}, headers=HTML,
                  follow_redirects=False)  # fmt: skip


def test_a_senior_resolves_signs_off_and_amends(fresh, tmp_path):
    ident = sorted(fresh.truth)[0]
    rid = fresh.rids[ident]
    with client(fresh) as a, client(fresh) as b, client(fresh) as c:
        ca, cb, cc = H.login(a, "alice"), H.login(b, "bob"), H.login(c, "carol")
        hdr = {"b": {"x-csrf-token": cb}, "c": {"x-csrf-token": cc}}
        b.post(f"/api/r/{rid}/intervals", json={"id": "iv-bob-0001", "start_s": 2, "end_s": 12},
               headers=hdr["b"])  # fmt: skip
        c.post(f"/api/r/{rid}/intervals", json={"id": "iv-carol-001", "start_s": 20, "end_s": 28},
               headers=hdr["c"])  # fmt: skip
        put(b, rid, cb, category="intermittent", group="normal", state="done")
        put(c, rid, cc, category="sporadic", group="risk", state="done")
        # An assessor sees neither the other's review nor the sign-off form.
        page = b.get(f"/r/{rid}").text
        assert 'data-assessor="carol"' not in page and 'id="signoff-form"' not in page
        assert _sign(b, rid, cb, category="sporadic", group="risk").status_code == 403
        # The senior sees both, with their agreement.
        page = a.get(f"/r/{rid}").text
        assert 'data-assessor="bob"' in page and 'data-assessor="carol"' in page
        assert 'id="pair-agreement"' in page and "bob &amp; carol" in page
        bad = _sign(a, rid, ca, category="intermittent", group="normal", intervals_from="nobody")
        assert bad.status_code == 400  # intervals only from a review of this recording
        r = _sign(a, rid, ca, category="intermittent", group="normal", intervals_from="bob",
                  note="FMs seen in the arms")  # fmt: skip
        assert r.status_code == 303, r.text
        # Locked: an assessor's later edit is refused, with the reason in the envelope.
        r = put(c, rid, cc, note="changed my mind")
        assert r.status_code == 403 and r.json()["error"]["code"] == "signed_off"
        r = c.post(f"/api/r/{rid}/intervals", json={"id": "iv-carol-002", "start_s": 1,
                   "end_s": 2}, headers=hdr["c"])  # fmt: skip
        assert r.status_code == 403
        assert "Signed off" in c.get(f"/r/{rid}").text
        # Signing off again is refused; an amendment needs a reason, and keeps it.
        assert _sign(a, rid, ca, category="absent", group="risk").status_code == 403
        r = _sign(a, rid, ca, action="amend", category="sporadic", group="risk",
                  intervals_from="final", reason="")  # fmt: skip
        assert r.status_code == 400
        r = _sign(a, rid, ca, action="amend", category="sporadic", group="risk",
                  intervals_from="final", reason="second look at 00:20")  # fmt: skip
        assert r.status_code == 303
        hist = c.get(f"/api/r/{rid}").json()["history"]
        amend = [h for h in hist if h["action"] == "amend"]
        assert amend and amend[0]["new"]["reason"] == "second look at 00:20"
        assert {h["reviewer"] for h in hist} == {"carol", "alice"}  # not bob's changes
        # Follow-up outcome, by the senior.
        r = a.post(f"/r/{rid}/outcome", data={"csrf_token": ca, "cp_2y": "no",
                   "outcome_source": "clinic letter 2027"}, follow_redirects=False)  # fmt: skip
        assert r.status_code == 303
        assert (
            c.post(f"/r/{rid}/outcome", data={"csrf_token": cc, "cp_2y": "yes"}).status_code == 403
        )
        agreement = a.get("/agreement").text
        assert 'id="inter-kappa"' in agreement and 'id="model-kappa"' in agreement
        assert "bob &amp; carol" in agreement
    out = tmp_path / "training"
    assert (
        main(["review", str(fresh.out), "--archive", str(fresh.archive), "--export", str(out)]) == 0
    )
    with open(out / "infants.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["id"], r["fms_category"], r["group"]) for r in rows] == [
        (ident, "sporadic", "risk")
    ]  # the amended, signed-off verdict
    with open(out / "fms_intervals.csv") as f:
        assert [(r["id"], float(r["start_s"]), float(r["end_s"])) for r in csv.DictReader(f)] == [
            (ident, 2.0, 12.0)
        ]  # bob's, kept through the amendment
    with open(out / "inter_assessor.csv") as f:
        pairs = list(csv.DictReader(f))
    assert [(p["assessor_a"], p["assessor_b"], p["category_agrees"]) for p in pairs] == [
        ("bob", "carol", "False")
    ]
    # The two assessors' intervals share no clip: kappa is no better than chance.
    assert float(pairs[0]["kappa"]) <= 0
    with open(out / "outcomes.csv") as f:
        outcomes = list(csv.DictReader(f))
    assert [(o["id"], o["cp_2y"], o["outcome_source"], o["exported"]) for o in outcomes] == [
        (ident, "no", "clinic letter 2027", "True")
    ]
    report = json.loads((out / "agreement.json").read_text())
    assert report["summary"]["inter_assessor"]["pairs"] == 1
    assert report["summary"]["assessor_model"]["reviews"] == 2
    with open(out / "agreement.csv") as f:
        assert [r["source"] for r in csv.DictReader(f)] == ["signed_off"]


def test_without_sign_off_only_agreed_verdicts_are_exported(fresh, tmp_path):
    ids = sorted(fresh.truth)
    agreed, split, abnormal, unassessable = (fresh.rids[i] for i in ids[:4])
    with client(fresh) as b, client(fresh) as c:
        cb, cc = H.login(b, "bob"), H.login(c, "carol")
        for cl, csrf, iv in ((b, cb, (1.0, 10.0)), (c, cc, (5.0, 20.0))):
            cl.post(f"/api/r/{agreed}/intervals", json={"id": f"iv-{csrf[:10]}",
                    "start_s": iv[0], "end_s": iv[1]}, headers={"x-csrf-token": csrf})  # fmt: skip
            put(cl, agreed, csrf, category="continuous", group="normal", state="done")
            put(cl, abnormal, csrf, category="abnormal", state="done")
        put(b, split, cb, category="continuous", group="normal", state="done")
        put(c, split, cc, category="absent", group="risk", state="done")
        put(b, unassessable, cb, category="not_assessable", state="done")
    out = tmp_path / "training"
    assert (
        main(["review", str(fresh.out), "--archive", str(fresh.archive), "--export", str(out)]) == 0
    )
    with open(out / "infants.csv") as f:
        assert [r["id"] for r in csv.DictReader(f)] == [ids[0]]
    with open(out / "fms_intervals.csv") as f:  # where both marked FMs
        assert [(float(r["start_s"]), float(r["end_s"])) for r in csv.DictReader(f)] == [
            (5.0, 10.0)
        ]
    skipped = {s["id"]: s["reason"] for s in json.loads((out / "export.json").read_text())[
        "skipped"]}  # fmt: skip
    assert "disagree" in skipped[ids[1]] and "no senior has signed off" in skipped[ids[1]]
    assert "abnormal FMs" in skipped[ids[2]] and "excludes" in skipped[ids[2]]
    assert "not assessable" in skipped[ids[3]]


def test_every_page_names_the_model_and_marks_what_not_to_use(fresh):
    def indeterminate(doc):
        doc["classification"]["label"] = "indeterminate"
        doc["classification"]["reasons"] = ["out of the training domain"]
        doc["probabilities_usable"] = False

    rid = H.add_video_row(fresh.out, fresh.archive, "videos/ind.mp4", mutate=indeterminate)
    model = json.loads(next(r for r in _rows(fresh) if r["status"] == "done")["result"])["model"]
    with client(fresh) as a:
        H.login(a, "alice")
        for path in ("/", f"/r/{rid}", "/agreement", "/audit", "/export"):
            html = a.get(path).text
            assert model["name"] in html and model["version"] in html, path
            assert model["digest"][:12] in html, path
            assert "demo weights, trained on simulated movement, not for clinical use" in html
        page = a.get(f"/r/{rid}").text
        assert 'id="timeline-not-to-use"' in page and 'id="top-not-to-use"' in page
        assert 'id="at-odds"' not in page
        # The vocabulary: abnormal FMs and not assessable.
        assert ">abnormal FMs<" in page and ">not assessable<" in page
