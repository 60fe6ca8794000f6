"""A senior's sign-off in the review app reaches the EHR: through the durable FHIR outbox, the
result's DiagnosticReport on a FHIR server (``tests.fhir_server``, on loopback) becomes ``final``
with the assessor as its interpreter and a verifier Provenance; an amendment makes it
``amended`` with a second one. ``mam review`` sends with its own worker; mounted in the service,
the service's worker sends. The Bundles validate with fhir.resources' R4B models."""

from __future__ import annotations

import json
import logging
import shutil
import time
import warnings

import pytest

pytest.importorskip("fhir.resources")

from fhir.resources.R4B import get_fhir_model_class  # noqa: E402
from fhir.resources.R4B.bundle import Bundle  # noqa: E402

from mam.batch.fhir import RESULTS_FHIR, row_result_id  # noqa: E402
from mam.batch.report import page_stem  # noqa: E402
from mam.fhir import FhirCodes, FhirContext, build_bundle  # noqa: E402
from mam.fhir.bundle import signed_off_bundle  # noqa: E402
from mam.fhir.outbox import Outbox  # noqa: E402
from mam.review import create_app  # noqa: E402
from mam.review.catalog import Catalog  # noqa: E402
from tests import review_helpers as H  # noqa: E402
from tests.fhir_server import FhirTestServer  # noqa: E402

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

HTML = {"accept": "text/html"}
MRN = "https://hospital.example/mrn|12345"


@pytest.fixture(scope="module")
def batch(tmp_path_factory) -> H.Batch:
    return H.make_batch(tmp_path_factory.mktemp("signoff-batch"), infants=2, video=False)


def _validate(bundle: dict) -> None:
    Bundle.model_validate(bundle)
    for e in bundle["entry"]:
        get_fhir_model_class(e["resource"]["resourceType"]).model_validate(e["resource"])


def _until(cond, timeout=15.0):
    end = time.time() + timeout
    while time.time() < end:
        if cond():
            return True
        time.sleep(0.05)
    return False


def _sign(c, rid, csrf, **form):
    return c.post(f"/r/{rid}/signoff", data={"csrf_token": csrf, **form}, headers=HTML,
                  follow_redirects=False)  # fmt: skip


def test_sign_off_and_amendment_reach_the_fhir_server(batch, tmp_path, caplog):
    out = tmp_path / "out"
    shutil.copytree(batch.out, out)
    b = H.Batch(batch.archive, out, batch.truth, dict(batch.rids))
    rec = next(r for r in Catalog(out, batch.archive).all() if r.status == "done")
    rid = page_stem({"path": rec.path, "id": rec.id})
    result_id = row_result_id(rec.key, rec.path, rec.id)
    server = FhirTestServer()
    system, mrn = MRN.split("|")  # the EHR knows the patient: the outbox links the report by id
    pid = server.add({"resourceType": "Patient", "identifier": [{"system": system, "value": mrn}]})
    box = tmp_path / "outbox.sqlite"
    # The batch's own Bundle for the result (its manifest gave the patient by MRN) reached the
    # EHR first (preliminary); the sign-off keeps its subject.
    first = build_bundle(rec.result(), FhirContext(result_id, patient_identifier=MRN), FhirCodes())
    lines = [x for x in (out / RESULTS_FHIR).read_text().splitlines() if result_id not in x]
    (out / RESULTS_FHIR).write_text("".join(x + "\n" for x in [*lines, json.dumps(first)]))
    assert server.handle("/fhir", {}, json.dumps(first).encode())[0] == 200
    report_id = next(iter(server.store["DiagnosticReport"]))
    assert server.store["DiagnosticReport"][report_id]["status"] == "preliminary"
    n_obs, n_prov = server.count("Observation"), server.count("Provenance")
    caplog.set_level(logging.DEBUG)
    try:
        cfg = H.config(b, fhir_base_url=server.url, fhir_outbox=box, fhir_auth={})
        app = create_app(cfg)
        with TestClient(app, base_url="http://testserver") as a:
            assert app.state.review.fhir_worker is not None  # mam review: its own worker
            csrf = H.login(a, "alice")
            r = _sign(a, rid, csrf, category="intermittent", group="normal")
            assert r.status_code == 303, r.text
            assert _until(lambda: server.store["DiagnosticReport"][report_id]["status"]
                          == "final")  # fmt: skip
            report = server.store["DiagnosticReport"][report_id]
            assert report["resultsInterpreter"] == [{"type": "Practitioner",
                                                     "display": "alice"}]  # fmt: skip
            codes = {c["code"] for cc in report["conclusionCode"] for c in cc.get("coding", [])}
            assert {"normal", "intermittent"} <= codes and "risk" not in codes
            verifiers = [p for p in server.store["Provenance"].values()
                         if p["agent"][0]["type"]["coding"][0]["code"] == "verifier"]  # fmt: skip
            assert len(verifiers) == 1
            assert verifiers[0]["target"] == [{"reference": f"DiagnosticReport/{report_id}"}]
            assert verifiers[0]["activity"]["coding"][0]["code"] == "VRF"
            # The AI's resources were not created again, nor a second report.
            assert server.count("DiagnosticReport") == 1
            assert server.count("Observation") == n_obs
            assert server.count("Provenance") == n_prov + 1
            # The amendment: amended, a second verifier Provenance with its reason.
            r = _sign(a, rid, csrf, action="amend", category="sporadic", group="risk",
                      reason="second look")  # fmt: skip
            assert r.status_code == 303, r.text
            assert _until(lambda: server.store["DiagnosticReport"][report_id]["status"]
                          == "amended")  # fmt: skip
            report = server.store["DiagnosticReport"][report_id]
            codes = {c["code"] for cc in report["conclusionCode"] for c in cc.get("coding", [])}
            assert {"risk", "sporadic"} <= codes and "normal" not in codes
            assert report["subject"] == {"reference": f"Patient/{pid}"}
            provs = [p for p in server.store["Provenance"].values()
                     if p["agent"][0]["type"]["coding"][0]["code"] == "verifier"]  # fmt: skip
            assert len(provs) == 2
            assert {p["activity"]["coding"][0]["code"] for p in provs} == {"VRF", "UPDATE"}
            assert server.count("DiagnosticReport") == 1
        # Both events were delivered (the app drained its outbox on shutdown).
        done = Outbox(box).entries()
        assert {e["state"] for e in done} == {"delivered"} and len(done) == 2
    finally:
        server.stop()
    for rec_ in caplog.records:  # counts and outcomes only: no result id, path or name
        text = rec_.getMessage()
        assert result_id not in text and rec.path not in text and rec.id not in text
        assert "12345" not in text and "alice" not in text


def test_signed_off_bundles_are_valid_and_idempotent(batch):
    rec = next(r for r in Catalog(batch.out, batch.archive).all() if r.status == "done")
    ctx = FhirContext(result_id=row_result_id(rec.key, rec.path, rec.id),
                      patient_identifier=MRN)  # fmt: skip
    codes = FhirCodes()
    verdict = {"category": "absent", "group": "risk"}
    final = signed_off_bundle(rec.result(), ctx, codes, verdict, "alice")
    amended = signed_off_bundle(rec.result(), ctx, codes, verdict, "alice", "amended", "typo")
    for bundle in (final, amended):
        _validate(bundle)
        report = next(e for e in bundle["entry"]
                      if e["resource"]["resourceType"] == "DiagnosticReport")  # fmt: skip
        assert report["request"]["method"] == "PUT"
        assert report["request"]["url"].startswith("DiagnosticReport?identifier=")
        assert report["resource"]["subject"] == {"reference": f"Patient?identifier={MRN}"}
        prov = bundle["entry"][-1]
        assert prov["resource"]["resourceType"] == "Provenance"
        assert prov["request"]["ifNoneExist"].startswith("_tag=")
        # Never a password: the interpreter is the assessor's name only.
        assert prov["resource"]["agent"][0]["who"] == {"type": "Practitioner", "display": "alice"}
    assert final["entry"][-1]["resource"]["activity"]["coding"][0]["code"] == "VRF"
    assert amended["entry"][-1]["resource"]["activity"]["coding"][0]["code"] == "UPDATE"
    assert final["identifier"]["value"] != amended["identifier"]["value"]
    statuses = [next(e["resource"]["status"] for e in b["entry"]
                     if e["resource"]["resourceType"] == "DiagnosticReport")
                for b in (final, amended)]  # fmt: skip
    assert statuses == ["final", "amended"]
    with pytest.raises(ValueError):
        signed_off_bundle(rec.result(), ctx, codes, verdict, "alice", "preliminary")


SERVICE_SCRIPT = r"""
import json, re, time, warnings
warnings.simplefilter("ignore")
from starlette.testclient import TestClient
import service.app as app
from mam.fhir.outbox import Outbox

out = {}
with TestClient(app.Screening.to_asgi()) as c:
    review = app._review[1]["mounted"].state.review
    out["review_worker"] = review.fhir_worker is not None
    page = c.get("/review/login")
    token = re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)
    c.post("/review/login", data={"name": "alice", "password": PASSWORD, "csrf_token": token},
           follow_redirects=False)
    csrf = re.search(r'name="csrf-token" content="([^"]+)"', c.get("/review/").text).group(1)
    r = c.post(f"/review/r/{RID}/signoff", data={"csrf_token": csrf, "category": "absent",
               "group": "risk"}, headers={"accept": "text/html"}, follow_redirects=False)
    out["signoff"] = r.status_code
    t0, box = time.time(), Outbox(OUTBOX)
    while box.counts()["delivered"] < 1 and time.time() - t0 < 25:
        time.sleep(0.05)
    out["delivered"], out["seconds"] = box.counts()["delivered"], time.time() - t0
print("RESULT " + json.dumps(out))
"""


def test_the_review_app_in_the_service_has_its_sign_offs_sent_by_the_service(batch, tmp_path):
    """Mounted in the service, the review app runs no worker of its own (no lifespan reaches
    it): its sign-offs go into the service's outbox file, and the service's worker sends them
    at once (woken by the enqueue, well before its 30 s poll)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from service.settings import hash_key
    from tests.service_helpers import API_KEY, service_env

    out = tmp_path / "out"
    shutil.copytree(batch.out, out)
    b = H.Batch(batch.archive, out, batch.truth, dict(batch.rids))
    H.config(b)  # the users file
    rec = next(r for r in Catalog(out, batch.archive).all() if r.status == "done")
    rid = page_stem({"path": rec.path, "id": rec.id})
    result_id = row_result_id(rec.key, rec.path, rec.id)
    server = FhirTestServer()
    box = tmp_path / "outbox.sqlite"
    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ) | service_env(hash_key(API_KEY)) | {
        "MAM_REVIEW_DIR": str(out), "MAM_REVIEW_ARCHIVE": str(batch.archive),
        "MAM_FHIR_BASE_URL": server.url, "MAM_FHIR_OUTBOX": str(box),
        "BENTOML_HOME": str(tmp_path / "home"), "TMPDIR": str(tmp_path),
        "PYTHONPATH": str(repo),
    }  # fmt: skip
    code = (f"PASSWORD = {H.PASSWORDS['alice']!r}\nRID = {rid!r}\nOUTBOX = {str(box)!r}\n"
            + SERVICE_SCRIPT)  # fmt: skip
    try:
        r = subprocess.run([sys.executable, "-c", code], env=env, cwd=repo, capture_output=True,
                           text=True, timeout=300)  # fmt: skip
        line = next((x for x in r.stdout.splitlines() if x.startswith("RESULT ")), None)
        assert line is not None, r.stderr[-3000:]
        got = json.loads(line[len("RESULT ") :])
        assert got["review_worker"] is False and got["signoff"] == 303
        assert got["delivered"] == 1 and got["seconds"] < 10, got
        (report,) = server.store["DiagnosticReport"].values()
        assert report["status"] == "final" and report["identifier"][0]["value"] == result_id
        assert report["resultsInterpreter"] == [{"type": "Practitioner", "display": "alice"}]
    finally:
        server.stop()
