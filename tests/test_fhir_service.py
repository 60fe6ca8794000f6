"""Hospital integration in the REST service, in-process: FHIR answers on the screening routes and
task results, DICOM uploads, the push to a site's FHIR server (a local HTTP server here) and the
audit trail, one line per request, with nothing identifying in it."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time

import pytest

pytest.importorskip("bentoml")
pytest.importorskip("fhir.resources")

from mam.audit import FIELDS  # noqa: E402
from mam.fhir import parse_bundle  # noqa: E402
from tests.dicom_media import PATIENT_ID, PATIENT_NAME, write_dicom_image, write_dicom_video  # noqa: E402
from tests.media import write_video  # noqa: E402
from tests.service_helpers import API_KEY, INFANT, in_process_service, npy_bytes, simulated  # noqa: E402
from tests.test_fhir import FhirServer, validate  # noqa: E402

AUTH = {"Authorization": f"Bearer {API_KEY}"}
FHIR = {"Accept": "application/fhir+json"}
SUBJECT = {"X-MAM-FHIR-Subject": "Patient/p-42", "X-MAM-FHIR-Encounter": "Encounter/e-7"}


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[dict] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(json.loads(record.getMessage()))


@pytest.fixture(scope="module")
def fhir_server():
    s = FhirServer()
    yield s
    s.close()


@pytest.fixture(scope="module")
def svc(tmp_path_factory, fhir_server, prometheus_dir):
    from starlette.testclient import TestClient

    tmp = tmp_path_factory.mktemp("svc_fhir")
    with in_process_service(tmp, prometheus_dir) as app:
        # Settings are read at import (and the module may be imported already): set the push
        # ones on the live object, before the service starts and builds its pusher.
        push = {"fhir_base_url": fhir_server.url, "fhir_push_attempts": 2,
                "fhir_push_backoff_s": 0.01, "fhir_push_timeout_s": 5.0,
                "fhir_outbox": tmp / "fhir-outbox.sqlite"}  # fmt: skip
        saved = {k: getattr(app.S, k) for k in push}
        for k, v in push.items():
            setattr(app.S, k, v)
        audit = Lines()
        app.AUDIT.add_handler(audit)
        # `bentoml serve` creates the task store's table before the service starts; in-process,
        # the test does (tasks are otherwise tested against a real server, test_service_server).
        from _bentoml_impl.tasks.result import Sqlite3Store
        from bentoml._internal.configuration.containers import BentoMLContainer

        store = BentoMLContainer.result_store_file.get()
        os.makedirs(os.path.dirname(store), exist_ok=True)
        Sqlite3Store.init_db(store)
        try:
            with TestClient(app.Screening.to_asgi()) as c:
                c.app_module, c.audit, c.tmp = app, audit, tmp
                yield c
        finally:
            app.AUDIT._logger.removeHandler(audit)
            for k, v in saved.items():
                setattr(app.S, k, v)


@pytest.fixture(scope="module")
def pose_bytes():
    _, joints, tensors = simulated("intermittent", 5)
    return npy_bytes(joints), npy_bytes(tensors[:3])


def post(c, path, field, data, ctype="application/octet-stream", headers=None, params=None):
    return c.post(path, files={field: ("f.bin", data, ctype)}, data={"infant": json.dumps(INFANT)},
                  headers=AUTH | (headers or {}), params=params)  # fmt: skip


def metric(c, name: str, **labels) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in c.get("/metrics").text.splitlines():
        if line.startswith(f"{name}{{{want}}}" if want else name + " "):
            return float(line.split()[-1])
    return 0.0


def wait_for(pred, timeout: float = 30.0) -> None:
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout:
            raise AssertionError("timed out")
        time.sleep(0.05)


def test_fhir_answers_equal_the_json_ones(svc, pose_bytes):
    pose, tensors = pose_bytes
    plain = post(svc, "/screen_pose", "pose", pose)
    assert plain.status_code == 200, plain.text
    for how in ({"headers": FHIR | SUBJECT}, {"headers": SUBJECT, "params": {"format": "fhir"}}):
        r = post(svc, "/screen_pose", "pose", pose, **how)
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "application/fhir+json"
        bundle = r.json()
        validate(bundle)
        back, want = parse_bundle(bundle), plain.json()
        assert back.result_id == r.headers["x-request-id"]  # the result id is the request id
        assert (back.subject, back.encounter) == ("Patient/p-42", "Encounter/e-7")
        assert back.label == want["classification"]["label"]
        assert back.fms_category == want["fms_category"]
        assert back.threshold == round(want["classification"]["threshold"], 4)
        if want["probabilities_usable"]:
            assert back.risk_probability == want["risk_probability"]
    inst = post(svc, "/screen_instances", "instances", tensors, headers=FHIR)
    assert inst.status_code == 200 and inst.headers["content-type"] == "application/fhir+json"
    validate(inst.json())
    # format=json wins over Accept; errors for a FHIR client are an OperationOutcome
    assert post(svc, "/screen_pose", "pose", pose, headers=FHIR, params={"format": "json"}).json()[
        "disclaimer"
    ]
    bad = post(svc, "/screen_instances", "instances", b"nope", headers=FHIR)
    assert bad.status_code == 400
    assert bad.json()["issue"][0]["details"]["text"] == "malformed_request"


def test_a_reference_that_is_not_one_is_refused_before_any_work(svc, pose_bytes):
    r = post(svc, "/screen_pose", "pose", pose_bytes[0],
             headers=FHIR | {"X-MAM-FHIR-Subject": "Jane Doe 2026-01-01"})  # fmt: skip
    assert r.status_code == 422
    assert r.json()["issue"][0]["details"]["text"] == "invalid_fhir_reference"
    assert "Jane" not in r.text


@pytest.fixture(scope="module")
def dicom_upload(tmp_path_factory):
    """A 12 s DICOM video object (H.264 in MP4), and the MP4 it holds."""
    from mam.video import iter_frames

    d = tmp_path_factory.mktemp("svc_dicom")
    frames = list(iter_frames("demo/infant_demo.mp4", end_s=12, max_side=480))
    mp4 = write_video(d / "Baby_Doe_clip.mp4", frames, fps=25)
    dcm = write_dicom_video(d / "Baby_Doe.dcm", mp4, size=frames[0].shape[1::-1],
                            study_uid="1.2.3.4.5", series_uid="1.2.3.4.6")  # fmt: skip
    return dcm, mp4


def test_a_dicom_task_is_screened_answered_as_fhir_and_pushed(svc, dicom_upload, fhir_server):
    dcm, mp4 = dicom_upload
    data = dcm.read_bytes()
    before_ok = metric(svc, "mam_fhir_push_total", outcome="ok")
    headers = AUTH | SUBJECT | {"X-MAM-Echo-DICOM-UIDs": "true"}
    files = {"video": ("Baby_Doe.dcm", data, "video/mp4")}  # see the README: type video/*
    r = svc.post("/screen/submit", files=files, headers=headers)
    assert r.status_code == 200, r.text
    task_id = r.json()["task_id"]
    wait_for(lambda: svc.get("/screen/status", params={"task_id": task_id}, headers=AUTH)
             .json()["status"] in ("completed", "failed"), timeout=300)  # fmt: skip
    got = svc.get("/screen/get", params={"task_id": task_id, "format": "fhir"},
                  headers=AUTH | SUBJECT)  # fmt: skip
    assert got.status_code == 200, got.text
    bundle = got.json()
    validate(bundle)
    back = parse_bundle(bundle)
    assert back.result_id == task_id and back.subject == "Patient/p-42"
    assert (back.study_instance_uid, back.series_instance_uid) == ("1.2.3.4.5", "1.2.3.4.6")
    # The same JSON as the MP4 sent as a video (DICOM in, same pipeline).
    as_json = svc.get("/screen/get", params={"task_id": task_id}, headers=AUTH).json()
    video = svc.post("/screen", files={"video": ("v.mp4", mp4.read_bytes(), "video/mp4")},
                     headers=AUTH).json()  # fmt: skip
    for k in ("risk_probability", "fms_frequency", "clips", "quality", "classification"):
        assert as_json[k] == video[k], k
    # Pushed as a transaction, once, with the task's result id.
    wait_for(lambda: metric(svc, "mam_fhir_push_total", outcome="ok") >= before_ok + 1)
    pushed = [
        x["body"] for x in fhir_server.received if parse_bundle(x["body"]).result_id == task_id
    ]
    assert len(pushed) == 1 and pushed[0]["type"] == "transaction"
    assert parse_bundle(pushed[0]).study_instance_uid == "1.2.3.4.5"
    # Audit: the accepted submit and the finished task, with the DICOM file's digest.
    sha = hashlib.sha256(data).hexdigest()
    task_lines = [x for x in svc.audit.lines if x.get("result_id") == task_id]
    events = sorted(x["event"] for x in task_lines)
    assert events == [
        "fhir_push",
        "screening_request",
        "screening_request",
        "screening_request",
        "screening_task",
    ], events  # submit, get (fhir), get (json), task, push
    (task,) = [x for x in task_lines if x["event"] == "screening_task"]
    assert task["content_sha256"] == sha and task["outcome"] == "ok"
    assert task["api_key_id"] == hashlib.sha256(API_KEY.encode()).hexdigest()[:16]
    text = json.dumps(svc.audit.lines)
    for secret in ("Baby_Doe", "p-42", "e-7", "1.2.3.4.5", PATIENT_NAME, PATIENT_ID, API_KEY):
        assert secret not in text


def test_a_failing_fhir_server_loses_no_result_and_is_counted(svc, pose_bytes, fhir_server):
    fhir_server.statuses = [503]
    try:
        failed = metric(svc, "mam_fhir_push_total", outcome="failed")
        retries = metric(svc, "mam_fhir_push_retries_total")
        r = post(svc, "/screen_pose", "pose", pose_bytes[0], headers=SUBJECT)
        assert r.status_code == 200 and r.json()["disclaimer"]  # the answer does not wait
        wait_for(lambda: metric(svc, "mam_fhir_push_total", outcome="failed") == failed + 1)
        assert metric(svc, "mam_fhir_push_retries_total") == retries + 1  # 2 attempts
        assert metric(svc, "mam_fhir_push_pending") == 0
        rid = r.headers["x-request-id"]
        (line,) = [
            x for x in svc.audit.lines if x["event"] == "fhir_push" and x["result_id"] == rid
        ]
        assert (line["outcome"], line["status"], line["attempts"]) == ("failed", 503, 2)
    finally:
        fhir_server.statuses = [200]
    # Without a subject nothing is pushed (an EHR cannot file it), and that is counted too.
    skipped = metric(svc, "mam_fhir_push_total", outcome="skipped")
    assert post(svc, "/screen_pose", "pose", pose_bytes[0]).status_code == 200
    assert metric(svc, "mam_fhir_push_total", outcome="skipped") == skipped + 1


def test_every_screening_request_is_audited_without_identifying_data(svc, pose_bytes):
    pose = pose_bytes[0]
    n = len(svc.audit.lines)
    ok = post(svc, "/screen_pose", "pose", pose, headers={"x-request-id": "audit-1"})
    denied = svc.post("/screen_pose", files={"pose": ("Jane_Doe.npy", pose, "application/x")},
                      headers={"Authorization": "Bearer wrong"})  # fmt: skip
    svc.get("/screen/status", params={"task_id": "x"}, headers=AUTH)  # polls are not audited
    assert ok.status_code == 200 and denied.status_code == 401
    new = [x for x in svc.audit.lines[n:] if x["event"] == "screening_request"]
    assert [x["route"] for x in new] == ["screen_pose", "screen_pose"]
    first, second = new
    assert set(first) <= {"audit", "time", "event", "service", "version", *FIELDS}
    assert first["request_id"] == first["result_id"] == "audit-1" and first["outcome"] == "ok"
    assert first["content_sha256"] == hashlib.sha256(pose).hexdigest()
    assert first["time"].endswith("Z") and first["status"] == 200
    assert second["outcome"] == "unauthorized" and second["status"] == 401
    assert second["api_key_id"] == hashlib.sha256(b"wrong").hexdigest()[:16]
    assert "content_sha256" not in second  # refused before the body was read
    assert "Jane" not in json.dumps(new) and "wrong" not in json.dumps(new).replace("api_key", "")


def test_a_dicom_upload_without_video_is_a_typed_error(svc, tmp_path):
    still = write_dicom_image(tmp_path / "still.dcm").read_bytes()
    r = svc.post("/screen", files={"video": ("Doe.dcm", still, "video/mp4")}, headers=AUTH)
    assert r.status_code == 422 and r.json()["error"]["code"] == "dicom_without_video"
    assert PATIENT_NAME not in r.text and PATIENT_ID not in r.text and "Doe.dcm" not in r.text
    kept = [p for p in svc.tmp.rglob("*") if p.is_file() and PATIENT_ID.encode() in p.read_bytes()]
    assert kept == []
