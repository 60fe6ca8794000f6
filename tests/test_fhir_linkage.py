"""FHIR linkage, terminology and the fields an integration engineer expects: the patient by
identifier (a conditional reference), the order and accession number, https canonical URLs
defined by shipped CodeSystem / StructureDefinition / NamingSystem resources, effective times,
Provenance input, the Device's manufacturer and safety, and OperationOutcome errors for FHIR
clients. Every Bundle and definition is validated with fhir.resources' R4B models."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

pytest.importorskip("fhir.resources")

from fhir.resources.R4B import get_fhir_model_class  # noqa: E402

import tests.test_fhir as F  # noqa: E402
from mam.fhir import (  # noqa: E402
    FhirCodes,
    FhirContext,
    InvalidFhirConfigError,
    InvalidFhirReferenceError,
    build_bundle,
    operation_outcome,
    parse_bundle,
)
from mam.fhir import codes as C  # noqa: E402
from mam.fhir.definitions import definitions, definitions_bundle  # noqa: E402

screener, made = F.screener, F.made  # the real results of tests.test_fhir, as fixtures here

MRN = "https://hospital.example/mrn|MRN-0042"
ORDER = "https://hospital.example/orders|ORD-77"
SHA = "ab" * 32


def _by_kind(bundle: dict, kind: str) -> list[dict]:
    return F.resources(bundle, kind)


def _linked(made, **kw) -> dict:
    ctx = FhirContext("r-link", patient_identifier=MRN, order_identifier=ORDER,
                      accession_number="ACC-2026-1", content_sha256=SHA, **kw)  # fmt: skip
    return build_bundle(F.as_kind(made["screening", True], "risk"), ctx)


def test_patient_by_identifier_order_and_accession_are_linked(made):
    b = _linked(made)
    F.validate(b)
    report = _by_kind(b, "DiagnosticReport")[0]
    observations = _by_kind(b, "Observation")
    for r in (report, *observations):
        assert r["subject"] == {"reference": f"Patient?identifier={MRN}"}
        assert r["basedOn"] == [{"reference": f"ServiceRequest?identifier={ORDER}"}]
    acsn = [i for i in report["identifier"] if i.get("type", {}).get("coding", [{}])[0].get(
        "code") == "ACSN"]  # fmt: skip
    assert [i["value"] for i in acsn] == ["ACC-2026-1"]
    ctx = FhirContext("r", patient_identifier=MRN)  # a copy of a context stays valid
    assert dataclasses.replace(ctx, result_id="r2").subject == ctx.subject
    # without an order, the accession number names it (a logical reference)
    ctx = FhirContext("r-acc", subject="Patient/p1", accession_number="ACC-9")
    lone = build_bundle(F.as_kind(made["screening", True], "normal"), ctx)
    F.validate(lone)
    (based,) = _by_kind(lone, "DiagnosticReport")[0]["basedOn"]
    assert based["type"] == "ServiceRequest" and based["identifier"]["value"] == "ACC-9"
    assert parse_bundle(lone).subject == "Patient/p1"


@pytest.mark.parametrize("kw", [
    {"patient_identifier": "MRN-0042"},  # no system
    {"patient_identifier": "mrn|MRN-0042"},  # a system that is not a URI
    {"order_identifier": "https://h.example/o|"},
    {"accession_number": "A|B"},
    {"subject": "Patient/p1", "patient_identifier": MRN},  # both
])  # fmt: skip
def test_linkage_that_is_not_one_is_refused_without_echo(kw):
    with pytest.raises(InvalidFhirReferenceError) as e:
        FhirContext("r", **kw)
    assert "MRN-0042" not in str(e.value) and "A|B" not in str(e.value)


def test_effective_is_the_recording_time_when_known_else_the_screening_time(made):
    issued = datetime(2026, 12, 7, 10, 0, tzinfo=UTC)
    recorded = issued - timedelta(days=3)
    result = F.as_kind(made["screening", True], "normal")
    for when, want in ((recorded, "2026-12-04T10:00:00.000Z"), (None, "2026-12-07T10:00:00.000Z")):
        b = build_bundle(result, FhirContext("r-eff", issued=issued, recorded_at=when))
        F.validate(b)
        for r in (*_by_kind(b, "Observation"), *_by_kind(b, "DiagnosticReport")):
            assert r["effectiveDateTime"] == want
    # a Bundle built again later is the same assertion: its Provenance key does not move
    later = build_bundle(result, FhirContext("r-eff", issued=issued + timedelta(hours=5)))
    tag = [_by_kind(x, "Provenance")[0]["meta"]["tag"] for x in (b, later)]
    assert tag[0] == tag[1]


def test_report_provenance_and_device_carry_the_missing_fields(made, tmp_path):
    site = tmp_path / "codes.json"
    site.write_text(json.dumps({"owner": "Organization/nicu-1",
                                "contact": "gma-team@hospital.example"}))  # fmt: skip
    codes = FhirCodes.load(site)
    ctx = FhirContext("r-f", subject="Patient/p", content_sha256=SHA)
    b = build_bundle(F.as_kind(made["screening", False], "risk"), ctx, codes)
    F.validate(b)
    report = _by_kind(b, "DiagnosticReport")[0]
    assert report["category"][0]["coding"][0]["code"] == "OTH"
    assert report["performer"] == [{"reference": "Organization/nicu-1"}]
    prov = _by_kind(b, "Provenance")[0]
    assert prov["occurredDateTime"] == prov["recorded"]
    (entity,) = prov["entity"]
    assert entity["what"]["identifier"] == {"system": C.CONTENT_SHA256_SYSTEM, "value": SHA}
    device = _by_kind(b, "Device")[0]
    assert device["manufacturer"] and device["safety"][0]["text"]
    assert device["owner"] == {"reference": "Organization/nicu-1"}
    assert device["contact"] == [{"system": "email", "value": "gma-team@hospital.example"}]
    assert device["url"].startswith("https://") and device["url"] in device["note"][0]["text"]
    # only AI-kind codes of the targeted ballot package
    kinds = {e["valueCodeableConcept"]["coding"][0]["code"] for e in device["extension"]}
    assert kinds == set(C.AI_KINDS) and "AI-for-Video-Data" not in kinds
    # without a site setting, no owner or performer is invented
    bare = build_bundle(F.as_kind(made["screening", False], "risk"), FhirContext("r-g"))
    assert "owner" not in _by_kind(bare, "Device")[0]
    assert "performer" not in _by_kind(bare, "DiagnosticReport")[0]
    assert "entity" not in _by_kind(bare, "Provenance")[0]


def _local_urls(bundle: dict, base: str) -> set[str]:
    text = json.dumps(bundle)
    return {u for u in text.split('"') if u.startswith(base)}


def test_every_local_url_is_https_and_defined_by_a_shipped_resource(made):
    b = _linked(made)
    urls = _local_urls(b, C.CANONICAL_BASE)
    assert urls and all(u.startswith("https://") for u in urls)
    defs = definitions()
    for r in defs:  # each a valid R4 resource
        get_fhir_model_class(r["resourceType"]).model_validate(r)
    get_fhir_model_class("Bundle").model_validate(definitions_bundle())
    defined = {r.get("url") for r in defs} | {u["value"] for r in defs
                                              for u in r.get("uniqueId", ())}  # fmt: skip
    used = urls - {C.Systems().model_card}
    assert used <= defined, used - defined
    cs = next(r for r in defs if r["resourceType"] == "CodeSystem")
    codings = [c for e in b["entry"] for c in e["resource"].get("code", {}).get("coding", [])]
    coded = {c["code"] for c in codings if c["system"] == cs["url"]}
    assert coded and coded <= {c["code"] for c in cs["concept"]}


def test_a_site_base_moves_every_local_url_and_must_be_https(made, tmp_path):
    site = tmp_path / "codes.json"
    site.write_text(json.dumps({"canonical_base": "https://fhir.site.example/mam"}))
    codes = FhirCodes.load(site)
    b = build_bundle(F.as_kind(made["screening", True], "normal"),
                     FhirContext("r-site", subject="Patient/p"), codes)  # fmt: skip
    F.validate(b)
    assert not _local_urls(b, C.CANONICAL_BASE)
    assert _local_urls(b, "https://fhir.site.example/mam/CodeSystem/gma")
    assert definitions(codes)[0]["url"] == "https://fhir.site.example/mam/CodeSystem/gma"
    for base in ("http://fhir.site.example/mam", "https://fhir.site.example/mam/", "mam"):
        with pytest.raises(InvalidFhirConfigError):
            FhirCodes(canonical_base=base)


def test_cli_fhir_output_has_no_urn_uuid_systems_and_links(tmp_path, capsys):
    from mam.cli import main
    from tests.service_helpers import simulated

    _, joints, _ = simulated("intermittent", 11)
    pose = tmp_path / "pose.npy"
    np.save(pose, joints)
    code = main(["screen", "--pose", str(pose), "--format", "fhir", "-q",
                 "--fhir-patient-identifier", MRN, "--fhir-order-identifier", ORDER,
                 "--accession-number", "ACC-5"])  # fmt: skip
    assert code == 0
    bundle = json.loads(capsys.readouterr().out)
    F.validate(bundle)

    def systems(x):
        if isinstance(x, dict):
            for k, v in x.items():
                if k in ("system", "url") and isinstance(v, str):
                    yield v
                yield from systems(v)
        elif isinstance(x, list):
            for v in x:
                yield from systems(v)

    found = set(systems([e["resource"] for e in bundle["entry"]]))
    assert found and not [s for s in found if s.startswith("urn:uuid:")]
    report = _by_kind(bundle, "DiagnosticReport")[0]
    assert report["subject"]["reference"] == f"Patient?identifier={MRN}"
    prov = _by_kind(bundle, "Provenance")[0]
    sha = hashlib.sha256(pose.read_bytes()).hexdigest()
    assert prov["entity"][0]["what"]["identifier"]["value"] == sha
    assert str(pose) not in json.dumps(bundle)
    # linkage only with --format fhir
    assert main(["screen", "--pose", str(pose), "--accession-number", "ACC-5"]) == 2
    assert "--accession-number: only with" in capsys.readouterr().err


def test_definitions_are_printable(capsys):
    from mam.cli import main

    assert main(["fhir", "definitions"]) == 0
    bundle = json.loads(capsys.readouterr().out)
    get_fhir_model_class("Bundle").model_validate(bundle)
    assert bundle["type"] == "collection" and len(bundle["entry"]) == len(definitions())
    assert main(["fhir", "definitions", "--format", "ndjson"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    kinds = [json.loads(line)["resourceType"] for line in lines]
    assert kinds.count("CodeSystem") == 1 and kinds.count("StructureDefinition") == 1


def test_operation_outcome_is_valid_and_maps_codes():
    cases = (("malformed_request", "structure"), ("not_found", "not-found"),
             ("no_infant_detected", "processing"), ("internal_error", "exception"))  # fmt: skip
    for code, want in cases:
        oo = operation_outcome(code, "what was wrong")
        get_fhir_model_class("OperationOutcome").model_validate(oo)
        (issue,) = oo["issue"]
        assert (issue["severity"], issue["code"], issue["diagnostics"]) == (
            "error", want, "what was wrong")  # fmt: skip


def test_manifest_linkage_columns(tmp_path):
    from mam.batch.archive import collect
    from mam.batch.fhir import contexts

    for name in ("a.npy", "b.npy"):
        np.save(tmp_path / name, np.zeros((10, 17, 3), np.float32))
    manifest = tmp_path / "m.csv"
    cols = ["file", "fhir_patient_identifier", "fhir_order_identifier", "accession_number"]

    def write(rows):
        with open(manifest, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(cols)
            w.writerows(rows)

    write([["a.npy", MRN, ORDER, "ACC-1"], ["b.npy", "", "", ""]])
    items = collect(manifest)
    got = contexts(manifest, items)
    a, b = (got[i.path, i.id] for i in items)
    assert (a.patient_identifier, a.order_identifier, a.accession_number) == (MRN, ORDER, "ACC-1")
    assert (b.patient_identifier, b.accession_number) == (None, None)
    write([["a.npy", "MRN-0042", "", ""], ["b.npy", "", "", ""]])
    with pytest.raises(InvalidFhirReferenceError, match="line 2") as e:
        contexts(manifest, collect(manifest))
    assert "MRN-0042" not in str(e.value)


@pytest.fixture(scope="module")
def svc(tmp_path_factory, prometheus_dir):
    pytest.importorskip("bentoml")
    from starlette.testclient import TestClient

    from tests.service_helpers import in_process_service

    with in_process_service(tmp_path_factory.mktemp("svc_link"), prometheus_dir) as app:
        with TestClient(app.Screening.to_asgi()) as c:
            yield c


def _post(c, path, field, data, headers):
    from tests.service_helpers import API_KEY, INFANT

    return c.post(path, files={field: ("f.bin", data, "application/octet-stream")},
                  data={"infant": json.dumps(INFANT)},
                  headers={"Authorization": f"Bearer {API_KEY}"} | headers)  # fmt: skip


def test_service_links_by_headers_and_answers_fhir_clients_with_operation_outcomes(svc):
    from tests.service_helpers import npy_bytes, simulated

    fhir = {"Accept": "application/fhir+json"}
    _, joints, tensors = simulated("intermittent", 5)
    linkage = {"X-MAM-FHIR-Patient-Identifier": MRN, "X-MAM-FHIR-Order-Identifier": ORDER,
               "X-MAM-Accession-Number": "ACC-7"}  # fmt: skip
    pose = npy_bytes(joints)
    r = _post(svc, "/screen_pose", "pose", pose, fhir | linkage)
    assert r.status_code == 200, r.text
    bundle = r.json()
    F.validate(bundle)
    report = _by_kind(bundle, "DiagnosticReport")[0]
    assert report["subject"]["reference"] == f"Patient?identifier={MRN}"
    assert report["basedOn"] == [{"reference": f"ServiceRequest?identifier={ORDER}"}]
    prov = _by_kind(bundle, "Provenance")[0]
    assert prov["entity"][0]["what"]["identifier"]["value"] == hashlib.sha256(pose).hexdigest()
    # errors: the same status, as an OperationOutcome for a FHIR client, the envelope otherwise
    cases = [
        ("/screen_pose", "pose", pose, {"X-MAM-FHIR-Patient-Identifier": "Jane Doe"}),  # middleware
        ("/screen_instances", "instances", b"nope", {}),  # BentoML's own
        ("/screen_pose", "pose", npy_bytes(joints[:5]), {}),  # the handler's typed error
    ]
    for path, field, data, headers in cases:
        plain = _post(svc, path, field, data, headers)
        oo = _post(svc, path, field, data, headers | fhir)
        assert plain.status_code >= 400 and oo.status_code == plain.status_code, oo.text
        assert oo.headers["content-type"].startswith("application/fhir+json")
        body = oo.json()
        get_fhir_model_class("OperationOutcome").model_validate(body)
        (issue,) = body["issue"]
        err = plain.json()["error"]
        assert issue["severity"] == "error" and issue["diagnostics"] == err["message"]
        assert issue["details"]["text"] == err["code"] and "Jane" not in oo.text


def medplum_validate(resources: list[dict]) -> list[list[str]]:
    """Each resource's errors by Medplum's validator (``tests/fhir_validate_medplum.mjs``), an
    implementation independent of fhir.resources; skips without Node.js and npm."""
    import shutil
    import subprocess
    from pathlib import Path

    from tests.fhir_server import medplum_dir

    folder = medplum_dir()
    if isinstance(folder, str):
        pytest.skip(folder)
    shutil.copy(Path(__file__).with_name("fhir_validate_medplum.mjs"), folder / "validate.mjs")
    major = int(subprocess.run(["node", "--version"], capture_output=True,
                               text=True).stdout.strip().lstrip("v").split(".")[0])  # fmt: skip
    flags = ["--experimental-websocket"] if major < 22 else []  # Medplum's core needs it
    out = subprocess.run(["node", *flags, "validate.mjs"], cwd=folder, capture_output=True,
                         text=True, timeout=120,
                         input="\n".join(json.dumps(r) for r in resources))  # fmt: skip
    assert out.returncode == 0, out.stderr[-500:]
    lines = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == len(resources)
    return [line["errors"] for line in lines]


def test_an_independent_validator_accepts_bundles_definitions_and_outcomes(made):
    linked = _linked(made, encounter="Encounter/e1", recorded_at=datetime(2026, 12, 1, tzinfo=UTC))
    ctx = FhirContext("r-ind", subject="Patient/p", accession_number="A-2")
    absent = build_bundle(F.as_kind(made["instances", False], "indeterminate"), ctx)
    kept = [
        linked,
        *[e["resource"] for b in (linked, absent) for e in b["entry"]],
        *definitions(),
        definitions_bundle(),
        operation_outcome("not_found", "no such task"),
    ]
    broken = json.loads(json.dumps(_by_kind(linked, "Observation")[0]))
    broken["effectiveDateTime"] = "yesterday"  # the validator can fail
    errors = medplum_validate([*kept, broken])
    assert errors[:-1] == [[]] * len(kept), [e for e in errors if e]
    assert errors[-1] and "effective" in errors[-1][0]
