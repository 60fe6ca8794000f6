"""The durable FHIR outbox (mam.fhir.outbox) and ``mam fhir``, pushing to a FHIR server on
loopback (tests.fhir_server: transactions, conditional create and update, OAuth2): a re-push
creates nothing new, a correction updates in place, an outage across a restart of the sender
loses nothing, given-up entries are kept and re-triable, tokens are refreshed on a 401, plain
http to another host is refused, and no patient reference reaches a log line. Conditional
patient and order references are resolved by the outbox against a real server (Medplum's), and
entries of one result are delivered in the order queued."""

from __future__ import annotations

import json
import logging
import time

import pytest

from mam.cli import main
from mam.fhir import FhirContext, build_bundle
from mam.fhir.outbox import (
    ClientCredentials,
    FhirClient,
    FhirTokenError,
    InsecureFhirUrlError,
    InvalidFhirAuthError,
    Outbox,
    OutboxEntryNotFoundError,
    OutboxWorker,
    StaticToken,
    check_url,
)
from mam.pose.precomputed import validate_pose_array
from mam.screening import Screener
from tests.fhir_server import FhirTestServer, MedplumServer, free_port, medplum_dir
from tests.service_helpers import simulated

PATIENT = "Patient/mrn-4711-secret"


@pytest.fixture(scope="module")
def result():
    _, joints, _ = simulated("sporadic", 3)
    return Screener().screen_pose(validate_pose_array(joints), None)


def bundle(result, rid: str = "res-1", risk: float | None = None) -> dict:
    r = result
    if risk is not None:
        r = result.model_copy(update={"risk_probability": risk, "probabilities_usable": True})
    return build_bundle(r, FhirContext(rid, subject=PATIENT))


@pytest.fixture
def server():
    s = FhirTestServer()
    yield s
    s.stop()


@pytest.fixture(autouse=True)
def no_patient_in_logs(caplog):
    """Every test: no log line names the patient (nor any Bundle content)."""
    caplog.set_level(logging.DEBUG)
    yield
    for rec in caplog.records:
        assert "mrn-4711" not in rec.getMessage(), rec.getMessage()


@pytest.fixture(scope="module")
def medplum_folder():
    folder = medplum_dir()
    if isinstance(folder, str):
        pytest.skip(folder)
    return folder


@pytest.fixture(scope="module")
def medplum(medplum_folder):
    server = MedplumServer(medplum_folder, free_port()).start()
    yield server
    server.stop()


def stored(server) -> dict[str, int]:
    return {k: server.count(k) for k in ("Device", "Observation", "DiagnosticReport",
                                         "Provenance")}  # fmt: skip


def tried_once(box: Outbox, timeout_s: float = 15.0) -> None:
    """Wait until every entry of ``box`` has been tried at least once (or ``timeout_s``)."""
    deadline = time.time() + timeout_s
    while min(e["attempts"] for e in box.entries()) < 1 and time.time() < deadline:
        time.sleep(0.05)


def test_delivered_bundle_is_stored_and_a_re_push_creates_nothing_new(result, server, tmp_path):
    b = bundle(result)
    client = FhirClient(server.url)
    box = Outbox(tmp_path / "o.sqlite")
    assert box.enqueue(b) == "queued"
    assert box.enqueue(json.dumps(b)) == "duplicate"  # the same content twice is one entry
    assert box.deliver(client) == {"ok": 1, "retry": 0, "given_up": 0}
    first = stored(server)
    assert first["Observation"] >= 4 and first["DiagnosticReport"] == first["Provenance"] == 1
    # Every reference was resolved within the transaction: the report's results exist.
    (report,) = server.store["DiagnosticReport"].values()
    for ref in report["result"]:
        kind, rid = ref["reference"].split("/")
        assert rid in server.store[kind]
    # Enqueued again after delivery: nothing to send. Pushed again from another outbox (a
    # second machine, a lost answer): the server creates nothing new.
    assert box.enqueue(b) == "duplicate" and box.deliver(client)["ok"] == 0
    other = Outbox(tmp_path / "other.sqlite")
    other.enqueue(b)
    assert other.deliver(client)["ok"] == 1
    assert stored(server) == first and server.transactions == 2
    assert all(v == 1 for v in server.versions.values())  # not even a new version
    # The delivered entry no longer holds the Bundle (patient references kept only while needed).
    row = box._db.execute("SELECT bundle, state FROM entries").fetchone()
    assert row == (None, "delivered")
    client.close()


def test_a_correction_updates_the_resources_in_place(result, server, tmp_path):
    client = FhirClient(server.url)
    box = Outbox(tmp_path / "o.sqlite")
    box.enqueue(bundle(result, risk=0.1234))
    box.deliver(client)
    before = stored(server)
    assert box.enqueue(bundle(result, risk=0.8765)) == "correction"
    assert box.deliver(client)["ok"] == 1
    after = stored(server)
    # The same Observations and report, updated; one more Provenance, recording the update.
    assert {k: after[k] for k in ("Observation", "DiagnosticReport", "Device")} == {
        k: before[k] for k in ("Observation", "DiagnosticReport", "Device")}  # fmt: skip
    assert after["Provenance"] == before["Provenance"] + 1
    (risk,) = [o for o in server.store["Observation"].values()
               if o["identifier"][0]["value"].endswith("cp-risk-probability")]  # fmt: skip
    assert risk["valueQuantity"]["value"] in (0.8765, 87.65) and risk["meta"]["versionId"] == "2"
    activities = sorted(p["activity"]["coding"][0]["code"]
                        for p in server.store["Provenance"].values())  # fmt: skip
    assert activities == ["CREATE", "UPDATE"]
    client.close()


def test_an_outage_across_a_restart_loses_nothing(result, server, tmp_path):
    path = tmp_path / "o.sqlite"
    server.stop()  # the FHIR server is down
    box = Outbox(path, backoff_s=0.05, max_backoff_s=0.2)
    worker = OutboxWorker(box, FhirClient(server.url, timeout_s=2), poll_s=0.1).start()
    for i in range(3):
        box.enqueue(bundle(result, f"res-{i}"))
        worker.wake()
    tried_once(box)
    assert box.counts()["pending"] == 3 and min(e["attempts"] for e in box.entries()) >= 1
    worker.stop()  # the sender goes away (a restart), mid-outage
    box.close()
    server.start()  # the server comes back on the same port
    box = Outbox(path, backoff_s=0.05, max_backoff_s=0.2)
    worker = OutboxWorker(box, FhirClient(server.url), poll_s=0.1).start()
    deadline = time.time() + 20
    while box.counts()["delivered"] < 3 and time.time() < deadline:
        time.sleep(0.05)
    worker.stop()
    assert box.counts() == {"pending": 0, "delivered": 3, "given_up": 0}
    assert server.count("DiagnosticReport") == 3


def test_an_entry_leased_by_a_killed_sender_is_sent_again(result, server, tmp_path):
    path = tmp_path / "o.sqlite"
    box = Outbox(path)
    box.enqueue(bundle(result))
    assert box._claim(time.time(), 1.5) is not None  # claimed, then the process was killed
    box.close()
    box = Outbox(path)
    assert box.deliver(FhirClient(server.url))["ok"] == 0  # still leased
    time.sleep(1.6)
    assert box.deliver(FhirClient(server.url))["ok"] == 1
    assert server.count("DiagnosticReport") == 1


def test_drain_on_shutdown_delivers_what_it_can_and_keeps_the_rest(result, server, tmp_path):
    box = Outbox(tmp_path / "o.sqlite")
    worker = OutboxWorker(box, FhirClient(server.url), poll_s=60).start()
    for i in range(4):
        box.enqueue(bundle(result, f"res-{i}"))
    worker.wake()
    assert worker.drain(10)["delivered"] == 4
    # Server down: the drain stops at its deadline and keeps every entry for the next start.
    server.stop()
    worker = OutboxWorker(box, FhirClient(server.url, timeout_s=1), poll_s=60).start()
    box.enqueue(bundle(result, "res-late"))
    t = time.time()
    counts = worker.drain(1.0)
    assert time.time() - t < 5 and counts["pending"] == 1


def test_given_up_entries_are_kept_visible_and_re_triable(result, server, tmp_path):
    box = Outbox(tmp_path / "o.sqlite", max_attempts=2, backoff_s=0.01, max_backoff_s=0.01)
    client = FhirClient(server.url)
    server.statuses = [503, 503]
    box.enqueue(bundle(result, "res-a"))
    box.deliver(client)
    time.sleep(0.02)
    assert box.deliver(client) == {"ok": 0, "retry": 0, "given_up": 1}
    server.statuses = [422]  # a final answer gives up at once
    box.enqueue(bundle(result, "res-b"))
    assert box.deliver(client)["given_up"] == 1
    (a, b) = box.entries("given_up")
    assert (a["reason"], a["last_status"], b["reason"], b["last_status"]) == (
        "expired", 503, "rejected", 422)  # fmt: skip
    assert box.retry("res-a") == 1 and box.retry() == 1  # one, then every other
    assert box.deliver(client)["ok"] == 2 and server.count("DiagnosticReport") == 2
    with pytest.raises(OutboxEntryNotFoundError):
        box.retry("no-such-result")


def test_oauth_token_is_cached_and_refreshed_once_on_a_401(result, tmp_path):
    server = FhirTestServer(client_id="mam", client_secret="s3cret")
    try:
        secret = tmp_path / "secret"
        secret.write_text("s3cret\n")
        auth = ClientCredentials(server.token_url, "mam", client_secret_file=secret)
        client = FhirClient(server.url, auth)
        box = Outbox(tmp_path / "o.sqlite")
        for i in range(2):
            box.enqueue(bundle(result, f"res-{i}"))
        assert box.deliver(client)["ok"] == 2 and server.token_requests == 1  # cached
        server.tokens.clear()  # the server revokes it: a 401, one refresh, then through
        box.enqueue(bundle(result, "res-2"))
        assert box.deliver(client)["ok"] == 1 and server.token_requests == 2
        bad = tmp_path / "bad"
        bad.write_text("wrong")
        wrong = ClientCredentials(server.token_url, "mam", client_secret_file=bad)
        with pytest.raises(FhirTokenError):
            FhirClient(server.url, wrong).check_auth()
        # Wrong credentials during delivery: a failure to retry, not a crash.
        box.enqueue(bundle(result, "res-3"))
        bad_client = FhirClient(server.url, ClientCredentials(server.token_url, "mam",
                                                              client_secret_file=bad))  # fmt: skip
        assert box.deliver(bad_client)["retry"] == 1
        assert box.entries("pending")[0]["last_error"] == "fhir_token_error"
    finally:
        server.stop()


def test_private_key_jwt_as_smart_backend_services(result, tmp_path):
    pytest.importorskip("jwt")
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    pem = tmp_path / "key.pem"
    pem.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))  # fmt: skip
    server = FhirTestServer(client_id="mam", public_key=key.public_key())
    try:
        auth = ClientCredentials(server.token_url, "mam", private_key_file=pem, key_id="k1")
        box = Outbox(tmp_path / "o.sqlite")
        box.enqueue(bundle(result))
        assert box.deliver(FhirClient(server.url, auth))["ok"] == 1
        assert server.token_requests == 1 and server.count("DiagnosticReport") == 1
        other = ec.generate_private_key(ec.SECP384R1())  # a key the server does not know
        pem.write_bytes(other.private_bytes(serialization.Encoding.PEM,
                                            serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption()))  # fmt: skip
        unknown = ClientCredentials(server.token_url, "mam", private_key_file=pem)
        with pytest.raises(FhirTokenError):
            FhirClient(server.url, unknown).check_auth()
        pem.write_text("not a key")
        with pytest.raises(InvalidFhirAuthError):
            ClientCredentials(server.token_url, "mam", private_key_file=pem)
    finally:
        server.stop()


def test_static_token_and_url_rules(tmp_path):
    with pytest.raises(InsecureFhirUrlError):
        check_url("http://ehr.example/fhir")
    with pytest.raises(InsecureFhirUrlError):
        ClientCredentials("http://auth.example/token", "mam", client_secret="x")
    for ok in ("https://ehr.example/fhir", "http://127.0.0.1:8080/fhir", "http://[::1]/fhir",
               "http://localhost/fhir"):  # fmt: skip
        assert check_url(ok) == ok
    with pytest.raises(InvalidFhirAuthError):
        ClientCredentials("https://auth.example/token", "mam")  # neither secret nor key
    with pytest.raises(InvalidFhirAuthError):
        StaticToken(token_file=tmp_path / "missing").header(None)


def test_cli_pushes_ndjson_and_manages_the_outbox(result, server, tmp_path, capsys):
    token = tmp_path / "token"
    token.write_text("t0ken")
    server.require_token, server.tokens = True, {"t0ken"}
    out = tmp_path / "batch"
    out.mkdir()
    no_subject = build_bundle(result, FhirContext("res-x"))
    lines = [bundle(result, "res-1"), bundle(result, "res-2"), no_subject]
    (out / "results.fhir.ndjson").write_text("".join(json.dumps(b) + "\n" for b in lines))
    box = str(tmp_path / "o.sqlite")
    base = ["fhir", "push", str(out), "--base-url", server.url, "--outbox", box]
    assert main([*base, "--token-file", str(token), "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["enqueued"] == {"queued": 2, "duplicate": 0, "correction": 0, "no_subject": 1}
    assert data["delivered"] == 2 and server.count("DiagnosticReport") == 2
    assert main([*base, "--token-file", str(token)]) == 0  # pushed again: nothing new
    assert "already known 2" in capsys.readouterr().out and server.count("DiagnosticReport") == 2
    # The server refuses: entries stay pending (exit 1), listed by result id only.
    server.statuses = [503] * 50
    (out / "more.ndjson").write_text(json.dumps(bundle(result, "res-3")) + "\n")
    assert main([*base, "--token-file", str(token), "--wait", "0"]) == 1
    capsys.readouterr()
    assert main(["fhir", "outbox", "--outbox", box, "status"]) == 0
    status = capsys.readouterr().out
    assert "1 pending" in status and "res-3" in status and "mrn-4711" not in status
    assert main(["fhir", "outbox", "--outbox", box, "give-up", "res-3"]) == 0
    assert main(["fhir", "outbox", "--outbox", box, "status", "--format", "json"]) == 0
    entries = json.loads(capsys.readouterr().out.split("\n", 1)[1])["entries"]
    assert [(e["result_id"], e["state"]) for e in entries] == [("res-3", "given_up")]
    assert main(["fhir", "outbox", "--outbox", box, "retry", "res-3"]) == 0
    server.statuses = []
    assert main(["fhir", "push", "--base-url", server.url, "--outbox", box, "--token-file",
                 str(token)]) == 0  # fmt: skip
    assert server.count("DiagnosticReport") == 3


@pytest.mark.parametrize(
    "argv, code",
    [
        (["--base-url", "http://ehr.example/fhir"], "insecure_fhir_url"),
        (["--base-url", ""], "invalid_fhir_url"),
        (["--base-url", "ehr.example/fhir"], "invalid_fhir_url"),
        (["--base-url", "https://ehr.example/fhir", "--client-id", "mam"], "invalid_fhir_auth"),
        (
            [
                "--base-url",
                "https://ehr.example/fhir",
                "--token-file",
                "/nonexistent/t",
                "--client-id",
                "mam",
                "--token-url",
                "https://a.example/t",
            ],
            "invalid_fhir_auth",
        ),
    ],
)
def test_cli_errors_are_typed_with_a_fix(argv, code, tmp_path, capsys):
    assert main(["fhir", "push", "--outbox", str(tmp_path / "o.sqlite"), *argv]) == 2
    err = capsys.readouterr().err
    assert f"error [{code}]" in err and "\nfix: " in err and "see the message" not in err


def test_cli_rejects_what_is_not_a_bundle(tmp_path, capsys):
    f = tmp_path / "x.ndjson"
    f.write_text('{"resourceType": "Patient", "id": "mrn-4711"}\n')
    assert main(["fhir", "push", str(f), "--base-url", "https://ehr.example/fhir", "--outbox",
                 str(tmp_path / "o.sqlite")]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "error [invalid_fhir_bundle]" in err and "mrn-4711" not in err


def test_a_damaged_outbox_is_a_typed_error(tmp_path, capsys):
    bad = tmp_path / "o.sqlite"
    bad.write_bytes(b"not a database, " * 100)
    assert main(["fhir", "outbox", "--outbox", str(bad), "status"]) == 1
    err = capsys.readouterr().err
    assert "error [fhir_outbox_error]" in err and "\nfix: check the disk" in err


# -- against a real FHIR server (Medplum's) ------------------------------------------------------
def test_a_real_fhir_server_stores_once_and_takes_a_correction(result, medplum, tmp_path):
    client = FhirClient(medplum.url)
    box = Outbox(tmp_path / "o.sqlite")
    box.enqueue(bundle(result, "real-1", risk=0.1234))
    assert box.deliver(client)["ok"] == 1
    first = stored(medplum)
    assert first["DiagnosticReport"] == first["Provenance"] == 1 and first["Observation"] >= 4
    (report,) = medplum.search("DiagnosticReport")
    ids = {o["id"] for o in medplum.search("Observation")}
    assert {ref["reference"].split("/")[1] for ref in report["result"]} <= ids  # resolved
    # Pushed again by another sender (a lost answer, a second machine): nothing new.
    other = Outbox(tmp_path / "other.sqlite")
    other.enqueue(bundle(result, "real-1", risk=0.1234))
    assert other.deliver(client)["ok"] == 1 and stored(medplum) == first
    # A correction under the same result id updates the same resources.
    assert box.enqueue(bundle(result, "real-1", risk=0.8765)) == "correction"
    assert box.deliver(client)["ok"] == 1
    after = stored(medplum)
    assert after["DiagnosticReport"] == 1 and after["Observation"] == first["Observation"]
    assert after["Provenance"] == 2
    (risk,) = [o for o in medplum.search("Observation")
               if o["identifier"][0]["value"].endswith("cp-risk-probability")]  # fmt: skip
    assert risk["valueQuantity"]["value"] in (0.8765, 87.65)
    client.close()


def test_a_real_fhir_server_down_across_a_sender_restart_gets_everything(result, medplum_folder,
                                                                          tmp_path):  # fmt: skip
    path, port = tmp_path / "o.sqlite", free_port()
    server = MedplumServer(medplum_folder, port)  # not started: the server is down
    box = Outbox(path, backoff_s=0.05, max_backoff_s=0.3)
    worker = OutboxWorker(box, FhirClient(server.url, timeout_s=2), poll_s=0.1).start()
    for i in range(3):
        box.enqueue(bundle(result, f"down-{i}"))
    worker.wake()
    tried_once(box)
    worker.stop()  # the sender is restarted while the server is down
    box.close()
    assert Outbox(path).counts()["pending"] == 3
    server.start()
    try:
        box = Outbox(path, backoff_s=0.05, max_backoff_s=0.3)
        worker = OutboxWorker(box, FhirClient(server.url), poll_s=0.1).start()
        deadline = time.time() + 30
        while box.counts()["delivered"] < 3 and time.time() < deadline:
            time.sleep(0.1)
        worker.stop()
        assert box.counts() == {"pending": 0, "delivered": 3, "given_up": 0}
        assert server.count("DiagnosticReport") == 3
    finally:
        server.stop()


def test_the_service_push_survives_a_restart_during_an_outage(result, server, tmp_path):
    """The service's own pusher (service.integration.Pushes) over the outbox: a result screened
    while the FHIR server is down, then a service restart (shutdown drains what it can and keeps
    the rest), then the server back: delivered once, audited, nothing lost or doubled."""
    from types import SimpleNamespace

    from service.integration import Pushes
    from service.settings import Settings

    class Counter:
        def __init__(self):
            self.n = 0

        def inc(self, *_):
            self.n += 1

        def set(self, v):
            self.n = v

        def labels(self, **_):
            return self

    metrics = SimpleNamespace(fhir_push=Counter(), fhir_push_retries=Counter(),
                              fhir_push_pending=Counter())  # fmt: skip
    lines = []
    audit = SimpleNamespace(record=lambda event, **kw: lines.append((event, kw)))
    server.stop()  # the FHIR server is down
    settings = Settings(fhir_base_url=server.url, fhir_outbox=tmp_path / "outbox.sqlite",
                        fhir_push_backoff_s=0.05, fhir_push_timeout_s=2,
                        fhir_drain_s=0.5)  # fmt: skip
    first = Pushes(settings, metrics, audit)
    assert first.push(result, FhirContext("svc-1", subject=PATIENT)) is True
    first.close()  # shutdown: the server is still down, the Bundle stays in the outbox
    assert metrics.fhir_push_pending.n == 1 and server.count("DiagnosticReport") == 0
    server.start()  # the server comes back on the same port; the service starts again
    second = Pushes(settings, metrics, audit)
    deadline = time.time() + 20
    while server.count("DiagnosticReport") < 1 and time.time() < deadline:
        time.sleep(0.05)
    second.close()
    assert server.count("DiagnosticReport") == 1
    assert ("fhir_push", {"route": "fhir_push", "result_id": "svc-1", "outcome": "ok"}) in [
        (e, {k: kw[k] for k in ("route", "result_id", "outcome")}) for e, kw in lines
    ]
    assert metrics.fhir_push_pending.n == 0


# -- conditional references resolved by the sender ----------------------------------------------
MRN_SYSTEM = "https://hospital.example/mrn"


def _patient(server, value: str) -> str:
    """Register a Patient with the MRN ``value`` on the Medplum server; its id."""
    import httpx

    body = {"resourceType": "Patient", "identifier": [{"system": MRN_SYSTEM, "value": value}]}
    r = httpx.post(f"{server.url}/Patient", json=body,
                   headers={"content-type": "application/fhir+json"}, timeout=30)  # fmt: skip
    assert r.status_code == 201, r.text
    return r.json()["id"]


def _by_mrn(result, rid: str, value: str) -> dict:
    return build_bundle(result, FhirContext(rid, patient_identifier=f"{MRN_SYSTEM}|{value}"))


def _subjects(server, rid: str) -> set[str]:
    """The subjects of the report and Observations of the result ``rid`` on the server."""
    out = set()
    for kind in ("DiagnosticReport", "Observation"):
        for r in server.search(kind):
            if any(i["value"].startswith(rid) for i in r.get("identifier", [])):
                out.add(r["subject"]["reference"])
    return out


def test_a_real_fhir_server_gets_the_patient_resolved_by_identifier(result, medplum_folder,
                                                                     tmp_path):  # fmt: skip
    """Medplum stores a conditional reference in a transaction as written (as many EHR
    endpoints do); the outbox resolves it first: one match is linked by id, none waits for the
    patient to be registered, two are given up as ambiguous."""
    from tests.test_fhir_linkage import medplum_validate

    server = MedplumServer(medplum_folder, free_port()).start()
    try:
        client = FhirClient(server.url)
        assert client.resolve == "client"  # the default
        box = Outbox(tmp_path / "o.sqlite", backoff_s=0.05, max_backoff_s=0.1)
        pid = _patient(server, "mrn-4711-a")
        b = _by_mrn(result, "cond-1", "mrn-4711-a")
        box.enqueue(b)
        assert box.deliver(client)["ok"] == 1
        assert _subjects(server, "cond-1") == {f"Patient/{pid}"}
        (report,) = server.search("DiagnosticReport", f"subject=Patient/{pid}")
        assert report["identifier"][0]["value"] == "cond-1"
        # What was sent is still a valid Bundle (an independent validator), linked by id.
        sent, stop = client.resolved(b)
        assert stop is None and f"Patient?identifier={MRN_SYSTEM}" in json.dumps(b)
        assert "Patient?identifier" not in json.dumps(sent) and f"Patient/{pid}" in json.dumps(sent)
        errors = medplum_validate([sent, *[e["resource"] for e in sent["entry"]]])
        assert errors == [[]] * len(errors), [e for e in errors if e]

        # Not registered yet: the entry waits (as queued) and is delivered once the patient is.
        box.enqueue(_by_mrn(result, "cond-2", "mrn-4711-b"))
        assert box.deliver(client) == {"ok": 0, "retry": 1, "given_up": 0}
        (waiting,) = box.entries("pending")
        assert waiting["last_error"] == "no Patient with that identifier yet"
        (kept,) = box._db.execute("SELECT bundle FROM entries WHERE state='pending'").fetchone()
        assert "Patient?identifier=" in kept  # the stored entry stays as queued
        assert not _subjects(server, "cond-2")
        pid_b = _patient(server, "mrn-4711-b")
        time.sleep(0.2)
        assert box.deliver(client)["ok"] == 1
        assert _subjects(server, "cond-2") == {f"Patient/{pid_b}"}

        # Two patients with one MRN: given up at once, with the reason.
        _patient(server, "mrn-4711-c")
        _patient(server, "mrn-4711-c")
        box.enqueue(_by_mrn(result, "cond-3", "mrn-4711-c"))
        assert box.deliver(client) == {"ok": 0, "retry": 0, "given_up": 1}
        (gone,) = box.entries("given_up")
        assert gone["reason"] == "ambiguous"
        assert gone["last_error"] == "more than one Patient with that identifier (ambiguous)"
        assert not _subjects(server, "cond-3")

        # Mode server: sent as written, and this server keeps the reference unresolved.
        as_written = FhirClient(server.url, resolve="server")
        other = Outbox(tmp_path / "other.sqlite")
        other.enqueue(_by_mrn(result, "cond-4", "mrn-4711-a"))
        assert other.deliver(as_written)["ok"] == 1
        assert _subjects(server, "cond-4") == {f"Patient?identifier={MRN_SYSTEM}|mrn-4711-a"}
    finally:
        server.stop()


def test_the_resolution_mode_is_a_setting(monkeypatch):
    from mam.fhir.codes import InvalidFhirConfigError
    from mam.settings import InvalidSettingError

    url = "https://ehr.example/fhir"
    monkeypatch.setenv("MAM_FHIR_RESOLVE_REFERENCES", "server")
    assert FhirClient(url).resolve == "server"
    assert FhirClient(url, resolve="client").resolve == "client"  # given beats the environment
    monkeypatch.setenv("MAM_FHIR_RESOLVE_REFERENCES", "maybe")
    with pytest.raises(InvalidSettingError, match="MAM_FHIR_RESOLVE_REFERENCES"):
        FhirClient(url)  # refused where settings are read
    monkeypatch.delenv("MAM_FHIR_RESOLVE_REFERENCES")
    with pytest.raises(InvalidFhirConfigError):
        FhirClient(url, resolve="maybe")
    assert FhirClient(url).resolve == "client"


def test_a_search_that_fails_is_retried_and_a_token_is_sent_with_it(result, tmp_path):
    server = FhirTestServer(client_id="mam", client_secret="s3cret")
    try:
        secret = tmp_path / "secret"
        secret.write_text("s3cret")
        client = FhirClient(server.url, ClientCredentials(server.token_url, "mam",
                                                          client_secret_file=secret))  # fmt: skip
        mrn = [{"system": MRN_SYSTEM, "value": "mrn-4711-d"}]
        pid = server.add({"resourceType": "Patient", "identifier": mrn})
        box = Outbox(tmp_path / "o.sqlite", backoff_s=0.01, max_backoff_s=0.01)
        box.enqueue(_by_mrn(result, "cond-5", "mrn-4711-d"))
        server.statuses = [503]  # the search meets the outage
        assert box.deliver(client)["retry"] == 1 and server.transactions == 0
        time.sleep(0.05)
        assert box.deliver(client)["ok"] == 1 and server.searches == 2
        (report,) = server.store["DiagnosticReport"].values()
        assert report["subject"] == {"reference": f"Patient/{pid}"}
    finally:
        server.stop()


# -- per-result order ---------------------------------------------------------------------------
def _signed(result, rid: str, status: str) -> dict:
    from mam.fhir.bundle import signed_off_bundle

    verdict = {"category": "sporadic", "group": "risk"} if status == "amended" else {
        "category": "intermittent", "group": "normal"}  # fmt: skip
    return signed_off_bundle(result, FhirContext(rid, subject=PATIENT), None, verdict, "alice",
                             status, "second look" if status == "amended" else None)  # fmt: skip


def test_entries_of_a_result_are_delivered_in_the_order_queued(result, server, tmp_path,
                                                               capsys):  # fmt: skip
    """A sign-off whose delivery failed is not overtaken by the amendment queued after it: the
    server ends with the amendment. A given-up earlier entry blocks nothing."""
    box = Outbox(tmp_path / "o.sqlite", backoff_s=0.2, max_backoff_s=0.2)
    client = FhirClient(server.url)
    assert box.enqueue(_signed(result, "ord-1", "final")) == "queued"
    assert box.enqueue(_signed(result, "ord-1", "amended")) == "queued"
    server.statuses = [503]  # the server is down for the first try
    assert box.deliver(client) == {"ok": 0, "retry": 1, "given_up": 0}
    final, amended = box.entries()
    assert (final["attempts"], amended["attempts"]) == (1, 0)  # the amendment was not sent
    assert amended["waits_for_earlier"] and not final["waits_for_earlier"]
    assert main(["fhir", "outbox", "--outbox", str(box.path), "status"]) == 0
    shown = capsys.readouterr().out
    assert "ord-1-final  pending, next try" in shown
    assert "pending, after an earlier entry of its result" in shown
    assert box.next_due() == box._db.execute("SELECT next_at FROM entries WHERE "
                                             "result_id='ord-1-final'").fetchone()[0]  # fmt: skip
    time.sleep(0.35)  # the server is back
    assert box.deliver(client)["ok"] == 2
    (report,) = server.store["DiagnosticReport"].values()
    assert report["status"] == "amended"
    # Another result: its sign-off is rejected (given up); its amendment still goes.
    box.enqueue(_signed(result, "ord-2", "final"))
    box.enqueue(_signed(result, "ord-2", "amended"))
    server.statuses = [422]
    assert box.deliver(client) == {"ok": 1, "retry": 0, "given_up": 1}
    assert [e["result_id"] for e in box.entries("given_up")] == ["ord-2-final"]
    reports = [r for r in server.store["DiagnosticReport"].values()
               if r["identifier"][0]["value"] == "ord-2"]  # fmt: skip
    assert [r["status"] for r in reports] == ["amended"]


def test_an_outbox_file_from_before_the_order_is_upgraded(result, server, tmp_path):
    import sqlite3

    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path)
    db.executescript("""CREATE TABLE entries (result_id TEXT PRIMARY KEY, digest TEXT NOT NULL,
        bundle TEXT, correction INTEGER NOT NULL DEFAULT 0, state TEXT NOT NULL, reason TEXT,
        attempts INTEGER NOT NULL DEFAULT 0, created_at REAL NOT NULL, next_at REAL NOT NULL,
        lease_until REAL NOT NULL DEFAULT 0, last_status INTEGER, last_error TEXT,
        delivered_at REAL);""")
    for i, status in enumerate(("final", "amended")):
        b = _signed(result, "old-1", status)
        db.execute("INSERT INTO entries (result_id, digest, bundle, state, created_at, next_at) "
                   "VALUES (?, 'x', ?, 'pending', ?, ?)",
                   (b["identifier"]["value"], json.dumps(b), i, i))  # fmt: skip
    db.commit()
    db.close()
    box = Outbox(path)
    assert [e["waits_for_earlier"] for e in box.entries()] == [False, True]
    assert box.deliver(FhirClient(server.url))["ok"] == 2
    (report,) = server.store["DiagnosticReport"].values()
    assert report["status"] == "amended"


def test_an_enqueue_wakes_the_worker_of_the_same_file(result, server, tmp_path):
    """What the review app mounted in the service relies on: it queues through its own
    ``Outbox`` on the service's file, and the service's worker sends at once (not at its poll)."""
    path = tmp_path / "o.sqlite"
    worker = OutboxWorker(Outbox(path), FhirClient(server.url), poll_s=60).start()
    try:
        time.sleep(0.2)  # the worker's first pass is over: it now sleeps for its poll
        other = Outbox(path)
        other.enqueue(bundle(result, "woken"))
        deadline = time.time() + 10
        while server.count("DiagnosticReport") < 1 and time.time() < deadline:
            time.sleep(0.05)
        assert server.count("DiagnosticReport") == 1
    finally:
        worker.stop()


def test_the_order_is_resolved_as_the_patient_is(result, server, tmp_path):
    """``basedOn`` the ServiceRequest by identifier: linked by id once the order is on the
    server; until then the entry waits, saying which kind it waits for."""
    order = "https://hospital.example/orders|ORD-77"
    ctx = FhirContext("cond-6", patient_identifier=f"{MRN_SYSTEM}|mrn-4711-e",
                      order_identifier=order)  # fmt: skip
    pid = server.add({"resourceType": "Patient",
                      "identifier": [{"system": MRN_SYSTEM, "value": "mrn-4711-e"}]})  # fmt: skip
    box = Outbox(tmp_path / "o.sqlite", backoff_s=0.01, max_backoff_s=0.01)
    box.enqueue(build_bundle(result, ctx))
    client = FhirClient(server.url)
    assert box.deliver(client)["retry"] == 1
    assert box.entries()[0]["last_error"] == "no ServiceRequest with that identifier yet"
    system, value = order.split("|")
    sid = server.add({"resourceType": "ServiceRequest",
                      "identifier": [{"system": system, "value": value}]})  # fmt: skip
    time.sleep(0.05)
    assert box.deliver(client)["ok"] == 1
    for kind in ("DiagnosticReport", "Observation"):
        for r in server.store[kind].values():
            assert r["subject"] == {"reference": f"Patient/{pid}"}
            assert r["basedOn"] == [{"reference": f"ServiceRequest/{sid}"}]
