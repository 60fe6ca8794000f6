"""The audit trail (mam.audit) and the batch run's share of hospital integration: one JSON line per
job, with digests and codes and nothing identifying; results.fhir.ndjson with the manifest's
references, one valid Bundle per line."""

from __future__ import annotations

import csv
import hashlib
import json

import numpy as np
import pytest

from mam.audit import FIELDS, AuditLog, key_id
from mam.batch import run_batch
from mam.batch.fhir import RESULTS_FHIR
from mam.fhir import InvalidFhirReferenceError, parse_bundle
from tests.service_helpers import simulated


def lines(path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x]


def test_a_record_is_one_json_line_of_known_fields_only(tmp_path):
    log = AuditLog(tmp_path / "a" / "audit.jsonl")
    try:
        written = log.record("screening_request", request_id="r1", route="screen", outcome="ok",
                             status=200, duration_ms=12.345, content_sha256="ab" * 32)  # fmt: skip
        with pytest.raises(ValueError):
            log.record("screening_request", route="screen", file_name="Jane_Doe.mp4")
        with pytest.raises(ValueError):
            log.record("something_else", route="screen")
    finally:
        log.close()
    (line,) = lines(tmp_path / "a" / "audit.jsonl")
    assert line == written
    assert list(line)[:5] == ["audit", "time", "event", "service", "version"]
    assert set(line) - {"audit", "time", "event", "service", "version"} <= set(FIELDS)
    assert line["duration_ms"] == 12.3 and line["time"].endswith("Z")
    assert "Jane" not in (tmp_path / "a" / "audit.jsonl").read_text()


def test_the_file_rotates_and_off_writes_nothing(tmp_path, capsys):
    log = AuditLog(tmp_path / "audit.jsonl", max_bytes=2000, backups=2)
    try:
        for i in range(100):
            log.record("batch_job", route="batch", result_id=f"r{i}", outcome="ok")
    finally:
        log.close()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["audit.jsonl", "audit.jsonl.1", "audit.jsonl.2"]
    assert all(len(p.read_bytes()) <= 2000 for p in tmp_path.iterdir())
    assert lines(tmp_path / "audit.jsonl")[-1]["result_id"] == "r99"  # the newest is kept
    off = AuditLog("off")
    off.record("batch_job", route="batch", outcome="ok")
    out = AuditLog("-")
    try:
        out.record("batch_job", route="batch", outcome="ok")
    finally:
        out.close()
    assert [json.loads(x)["event"] for x in capsys.readouterr().out.splitlines()] == ["batch_job"]


def test_key_id_is_the_start_of_the_configured_digest_never_the_key():
    from service.settings import hash_key

    assert key_id("k3y") == hash_key("k3y")[:16] and "k3y" not in key_id("k3y")
    assert key_id(None) == "none" and key_id("x", auth_disabled=True) == "auth_disabled"


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """Three pose files (two with the same content) named like patients, and a manifest with
    the caller's FHIR references."""
    d = tmp_path_factory.mktemp("archive")
    a, b = simulated("continuous", 11, 20.0)[1], simulated("absent", 12, 20.0)[1]
    np.save(d / "Jane_Doe.npy", a)
    np.save(d / "John_Roe.npy", b)
    np.save(d / "Jane_Doe_copy.npy", a)
    rows = [
        {"file": "Jane_Doe.npy", "id": "MRN001", "fhir_subject": "Patient/p1",
         "fhir_encounter": "Encounter/e1"},
        {"file": "John_Roe.npy", "id": "MRN002", "fhir_subject": "Patient/p2",
         "fhir_encounter": ""},
        {"file": "Jane_Doe_copy.npy", "id": "MRN003", "fhir_subject": "", "fhir_encounter": ""},
    ]  # fmt: skip
    with open(d / "manifest.csv", "w", newline="") as f:
        w = csv.DictWriter(f, list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return d


def test_batch_writes_one_audit_line_per_job_and_a_bundle_per_result(archive, tmp_path):
    from tests.test_fhir import validate

    out = tmp_path / "out"
    s = run_batch(archive / "manifest.csv", out, workers=1)
    assert (s.recordings, s.done, s.screened, s.duplicates) == (3, 3, 2, 1)
    audit = lines(out / "audit.jsonl")
    assert [x["event"] for x in audit] == ["batch_job", "batch_job"]  # one per job run
    digests = {hashlib.sha256((archive / n).read_bytes()).hexdigest()
               for n in ("Jane_Doe.npy", "John_Roe.npy")}  # fmt: skip
    assert {x["content_sha256"] for x in audit} == digests
    assert {x["outcome"] for x in audit} == {"ok"}
    text = (out / "audit.jsonl").read_text()
    for secret in ("Jane", "John", "MRN00", "Patient/", "p1", "Encounter"):
        assert secret not in text
    bundles = lines(out / RESULTS_FHIR)
    assert len(bundles) == 3  # one per reported recording
    for b in bundles:
        validate(b)
    backs = [parse_bundle(b) for b in bundles]
    assert {(x.subject, x.encounter) for x in backs} == {
        ("Patient/p1", "Encounter/e1"), ("Patient/p2", None), (None, None)}  # fmt: skip
    assert len({x.result_id for x in backs}) == 3  # the copy is another result
    assert {x["result_id"] for x in audit} <= {x.result_id for x in backs}
    ndjson = (out / RESULTS_FHIR).read_text()
    assert "Jane" not in ndjson and "MRN00" not in ndjson
    # Rebuilt identically on a rerun (nothing screened again, nothing audited again).
    run_batch(archive / "manifest.csv", out, workers=1)
    assert (out / RESULTS_FHIR).read_text() == ndjson
    assert len(lines(out / "audit.jsonl")) == 2


def test_a_manifest_reference_that_is_not_one_stops_the_run_before_any_work(archive, tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("file,id,fhir_subject\n" + str(archive / "Jane_Doe.npy") + ",x,Jane Doe\n")
    with pytest.raises(InvalidFhirReferenceError) as e:
        run_batch(bad, tmp_path / "out", workers=1)
    assert "manifest line 2" in str(e.value) and "Jane" not in str(e.value)
    assert not (tmp_path / "out" / "ledger.sqlite").exists()
