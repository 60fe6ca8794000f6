"""The screening service mounts the review app at ``/review`` when ``MAM_REVIEW_DIR`` is set.

In a subprocess, because the service reads its settings when ``service.app`` is imported (and
other tests import it without a review folder): the real ``Screening`` ASGI app, with its
API-key middleware, in a TestClient.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests import review_helpers as H
from tests.service_helpers import API_KEY, service_env

REPO = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import json, re, warnings
warnings.simplefilter("ignore")
from starlette.testclient import TestClient
import service.app as app

out = {}
with TestClient(app.Screening.to_asgi()) as c:
    r = c.get("/review/", headers={"accept": "text/html"}, follow_redirects=False)
    out["unauthenticated"] = [r.status_code, r.headers.get("location")]
    out["api_without_key"] = c.get("/screen/status?task_id=x").status_code
    out["review_static_without_login"] = c.get("/review/static/review.css").status_code
    page = c.get("/review/login")
    out["login_page"] = page.status_code
    token = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)
    r = c.post("/review/login", data={"name": "carol", "password": KEY, "csrf_token": token},
               follow_redirects=False)
    out["login"] = [r.status_code, r.headers.get("location"), r.headers.get("set-cookie", "")]
    home = c.get("/review/")
    out["worklist"] = home.status_code
    out["links"] = sorted(set(re.findall(r'href="(/review/r/rec-[0-9a-f]{16})"', home.text)))
    out["reviewer"] = re.search(r'id="reviewer">([^<]+)<', home.text).group(1)
    r = c.get(f"/review/r/{RID}/video", headers={"range": "bytes=0-9"})
    out["video"] = [r.status_code, len(r.content)]
    out["health"] = c.get("/livez").status_code
print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def batch(tmp_path_factory) -> H.Batch:
    return H.make_batch(tmp_path_factory.mktemp("svc-review"), infants=2)


def test_the_service_mounts_the_review_app(batch, tmp_path):
    from service.settings import hash_key

    H.config(batch)  # writes the users file (the service's key logs in here)
    rid = batch.rids["videos/ward_B_infant"]
    env = (
        dict(os.environ)
        | service_env(hash_key(API_KEY))
        | {
            "MAM_REVIEW_DIR": str(batch.out),
            "MAM_REVIEW_ARCHIVE": str(batch.archive),
            "BENTOML_HOME": str(tmp_path / "home"),
            "TMPDIR": str(tmp_path),
            "PYTHONPATH": str(REPO),
        }
    )
    code = f"KEY = {API_KEY!r}\nRID = {rid!r}\n" + SCRIPT
    r = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True,
                       text=True, timeout=300)  # fmt: skip
    line = next((x for x in r.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line is not None, r.stderr[-3000:]
    out = json.loads(line[len("RESULT ") :])
    assert out["unauthenticated"] == [303, "/review/login"]
    assert out["api_without_key"] == 401  # the service's own routes still need a key
    assert out["review_static_without_login"] == 401
    assert out["login_page"] == 200
    status, location, cookie = out["login"]
    assert (status, location) == (303, "/review/")
    assert "Path=/review" in cookie and "HttpOnly" in cookie and "SameSite=strict" in cookie
    assert out["worklist"] == 200 and len(out["links"]) == 3  # two pose files and the video
    assert out["reviewer"].startswith("carol~key-")
    assert out["video"] == [206, 10]  # range requests through the service's stack
    assert out["health"] == 200
