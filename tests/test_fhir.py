"""FHIR R4 output (mam.fhir): every kind of result becomes a Bundle that fhir.resources' R4B
models accept, carrying the AI-transparency labels, and reads back to the same numbers; the
outbox's client posts its transaction to a local server, and the outbox retries, gives up or
stops as it should."""

from __future__ import annotations

import http.server
import json
import threading
import time

import numpy as np
import pytest

fhir_resources = pytest.importorskip("fhir.resources")

from fhir.resources.R4B import get_fhir_model_class  # noqa: E402
from fhir.resources.R4B.bundle import Bundle  # noqa: E402

from mam.fhir import (  # noqa: E402
    FhirCodes,
    FhirContext,
    InvalidFhirConfigError,
    InvalidFhirReferenceError,
    build_bundle,
    parse_bundle,
)
from mam.fhir import codes as C  # noqa: E402
from mam.fhir.outbox import FhirClient, Outbox, StaticToken  # noqa: E402
from mam.pose.precomputed import validate_pose_array  # noqa: E402
from mam.schemas import InfantData, InstancesResult, ScreeningResult  # noqa: E402
from mam.screening import Screener, softmax  # noqa: E402
from tests.service_helpers import INFANT, simulated  # noqa: E402

KINDS = ("risk", "normal", "indeterminate")


@pytest.fixture(scope="module")
def screener():
    return Screener()


@pytest.fixture(scope="module")
def made(screener):
    """Real results of the pipeline (pose in, and tensors in as the service scores them), with
    and without infant data."""
    _, joints, tensors = simulated("sporadic", 3)
    infant = InfantData(**INFANT)
    seq = validate_pose_array(joints)
    out = {}
    for with_infant in (True, False):
        inf = infant if with_infant else None
        out["screening", with_infant] = screener.screen_pose(seq, inf)
        s = screener.score_instances(tensors, inf)
        fields = screener.summarize(s, "instances", None, screener.instance_gates(tensors))
        _, logits = screener.runtime.clip(tensors)
        out["instances", with_infant] = InstancesResult(
            **fields,
            fms_probability=[round(float(p), 4) for p in softmax(logits)[:, 1]],
            attention_weight=[round(float(a), 4) for a in s.attention],
            infant=inf,
            model=screener.model_info("none (instances given)", s.used_info),
            warnings=screener.result_warnings(fields, inf),
        )
    return out


def as_kind(result, kind: str):
    """The result as the model would say it for each kind. The shipped demo weights are being
    retrained (their answers are not for tests to fix), so usable risk and normal results are
    made from real ones by setting what differs; indeterminate is forced the same way."""
    c = result.classification
    if kind == "indeterminate":
        cls = c.model_copy(update={"label": "indeterminate", "reasons": ["out of domain"]})
        return result.model_copy(update={"classification": cls, "probabilities_usable": False,
                                         "fms_category": "indeterminate"})  # fmt: skip
    p = round(min(0.97, c.threshold + 0.21), 4) if kind == "risk" else round(c.threshold / 3, 4)
    category = "sporadic" if kind == "risk" else "intermittent"
    cls = c.model_copy(update={"label": kind, "model_label": kind, "reasons": []})
    return result.model_copy(update={
        "classification": cls, "probabilities_usable": True, "risk_probability": p,
        "normal_probability": round(1 - p, 4), "fms_category": category,
    })  # fmt: skip


# Required bindings and invariants of FHIR R4 that fhir.resources does not check (it checks
# structure, cardinality, primitive formats and choice types, not value sets or FHIRPath rules).
REQUIRED_CODES = {
    ("Bundle", "type"): {"transaction"},
    ("DiagnosticReport", "status"): {"registered", "partial", "preliminary", "final", "amended",
                                     "corrected", "appended", "cancelled", "entered-in-error",
                                     "unknown"},
    ("Observation", "status"): {"registered", "preliminary", "final", "amended", "corrected",
                                "cancelled", "entered-in-error", "unknown"},
    ("Device", "status"): {"active", "inactive", "entered-in-error", "unknown"},
}  # fmt: skip
DEVICE_NAME_TYPES = {"udi-label-name", "user-friendly-name", "patient-reported-name",
                     "manufacturer-name", "model-name", "other"}  # fmt: skip


def validate(bundle: dict) -> None:
    """Every resource through its own R4B model, the Bundle as a whole, then the required
    bindings and invariants above (``ValueError`` for any)."""
    Bundle.model_validate(bundle)
    if bundle["type"] not in REQUIRED_CODES["Bundle", "type"]:
        raise ValueError("Bundle.type")
    for e in bundle["entry"]:
        res = e["resource"]
        kind = res["resourceType"]
        get_fhir_model_class(kind).model_validate(res)
        if e["request"]["method"] not in ("POST", "PUT") or e["request"]["url"] != kind:
            raise ValueError("Bundle.entry.request")
        for (k, name), allowed in REQUIRED_CODES.items():
            if k == kind and res.get(name) not in allowed:
                raise ValueError(f"{kind}.{name}: {res.get(name)!r}")
        if kind == "Device" and {n["type"] for n in res["deviceName"]} - DEVICE_NAME_TYPES:
            raise ValueError("Device.deviceName.type")
        if kind == "Observation":
            for part in (res, *res.get("component", [])):
                values = [k for k in part if k.startswith("value")]
                if "dataAbsentReason" in part and values:  # obs-6
                    raise ValueError("obs-6: dataAbsentReason with a value")
                for ext in part.get("extension", []):  # ext-1
                    if not any(k.startswith("value") for k in ext):
                        raise ValueError("ext-1")


def resources(bundle: dict, kind: str) -> list[dict]:
    return [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == kind]


CTX = FhirContext("res-1", subject="Patient/p-123", encounter="Encounter/e-9")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("with_infant", [True, False], ids=["infant", "no_infant"])
@pytest.mark.parametrize("what", ["screening", "instances"])
def test_every_kind_of_result_is_a_valid_labelled_bundle(made, kind, with_infant, what):
    r = as_kind(made[what, with_infant], kind)
    b = build_bundle(r, CTX)
    validate(b)
    assert b["type"] == "transaction"
    (report,) = resources(b, "DiagnosticReport")
    observations = resources(b, "Observation")
    (device,) = resources(b, "Device")
    (prov,) = resources(b, "Provenance")
    assert report["status"] == "preliminary"
    assert {o["status"] for o in observations} == {"preliminary"}
    for res in (report, *observations):  # AI-asserted content carries the AIAST label
        assert C.AIAST in res["meta"]["security"]
        assert res["subject"] == {"reference": "Patient/p-123"}
        assert res["encounter"] == {"reference": "Encounter/e-9"}
    assert C.AIAST not in device.get("meta", {}).get("security", [])
    # The model as an AI Device: type, name, version, weights digest, pose backend.
    assert device["meta"]["profile"] == [C.AI_DEVICE_PROFILE]
    assert device["type"]["coding"][0]["code"] == "Artificial-Intelligence"
    assert {"system": C.WEIGHTS_SHA256_SYSTEM, "value": r.model.weights_sha256} in device[
        "identifier"
    ]
    assert r.model.pose_backend in json.dumps(device["property"])
    assert {"type": {"text": "model-digest"}, "value": r.model.digest} in device["version"]
    # Provenance: the Device authored every AI-asserted resource, for the reason AIAST.
    urls = {e["resource"]["resourceType"] + str(i): e["fullUrl"] for i, e in enumerate(b["entry"])}
    dev_url = next(e["fullUrl"] for e in b["entry"] if e["resource"] is device)
    assert prov["agent"][0]["who"] == {"reference": dev_url}
    assert prov["reason"][0]["coding"] == [C.AIAST]
    targets = {t["reference"] for t in prov["target"]}
    asserted = ("DiagnosticReport", "Observation")
    assert targets == {
        e["fullUrl"] for e in b["entry"] if e["resource"]["resourceType"] in asserted
    }
    assert {ref["reference"] for ref in report["result"]} == targets - {
        next(e["fullUrl"] for e in b["entry"] if e["resource"] is report)
    }
    # Every internal reference resolves inside the Bundle.
    internal = {u for u in json.dumps(b).split('"') if u.startswith("urn:uuid:")}
    internal -= {C.GMA_SYSTEM, C.RESULT_ID_SYSTEM, C.WEIGHTS_SHA256_SYSTEM,
                 C.MODEL_CONFIGURATION_SYSTEM, C.CLIP_WINDOW_EXTENSION}  # fmt: skip
    assert internal <= set(urls.values())
    # Which branch ran is said; the infant data themselves are not sent.
    methods = {o["method"]["coding"][-1]["code"] for o in observations}
    assert methods == {"mam-with-infant-data" if with_infant else "mam-without-infant-data"}
    text = json.dumps(b)
    assert "gestational" not in text and "birth_weight" not in text and "3300" not in text
    interpretation = resources(b, "Observation")[1]["interpretation"][0]["coding"][0]["code"]
    assert interpretation == {"risk": "POS", "normal": "NEG", "indeterminate": "IND"}[kind]


@pytest.mark.parametrize("unit", ["%", "1"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("with_infant", [True, False], ids=["infant", "no_infant"])
def test_round_trip_gives_back_the_same_numbers(made, kind, with_infant, unit):
    r: ScreeningResult = as_kind(made["screening", with_infant], kind)
    back = parse_bundle(build_bundle(r, CTX, FhirCodes(unit=unit)))
    assert back.result_id == "res-1" and back.report_status == "preliminary"
    assert back.label == r.classification.label and back.fms_category == r.fms_category
    assert back.threshold == round(r.classification.threshold, 4)
    assert back.used_info_branch is with_infant
    assert (back.model_name, back.model_version, back.weights_sha256, back.pose_backend) == (
        r.model.name, r.model.version, r.model.weights_sha256, r.model.pose_backend)  # fmt: skip
    assert (back.subject, back.encounter) == ("Patient/p-123", "Encounter/e-9")
    if kind == "indeterminate":  # numbers not to be used are not sent to an EHR
        assert back.risk_probability is None and back.fms_frequency is None
        assert back.clips is None
        assert back.notes == r.warnings
        return
    assert back.risk_probability == r.risk_probability
    assert back.fms_frequency == r.fms_frequency
    assert [(c.start_s, c.end_s, c.fms_probability) for c in back.clips] == [
        (c.start_s, c.end_s, c.fms_probability) for c in r.clips
    ]


def test_instances_round_trip(made):
    r = as_kind(made["instances", False], "risk")
    back = parse_bundle(build_bundle(r, CTX))
    assert [c.fms_probability for c in back.clips] == r.fms_probability
    assert all(c.start_s is None for c in back.clips)  # tensors carry no times
    assert back.risk_probability == r.risk_probability


def test_a_bundle_under_a_site_canonical_base_reads_back_the_same(made):
    """A site that publishes the definitions on its own server writes every local URL under its
    base (``canonical_base``): the read-back finds that base in the Bundle, or is given it."""
    from mam.fhir.parse import canonical_base_of

    r = as_kind(made["screening", True], "risk")
    site = FhirCodes(canonical_base="https://fhir.site.example/mam", unit="1")
    b = build_bundle(r, CTX, site)
    assert C.GMA_SYSTEM not in json.dumps(b)  # nothing under the default base
    assert canonical_base_of(b) == "https://fhir.site.example/mam"
    want = parse_bundle(build_bundle(r, CTX, FhirCodes(unit="1")))
    fields = ("result_id", "label", "threshold", "risk_probability", "fms_frequency",
              "fms_category", "clips", "used_info_branch", "weights_sha256",
              "pose_backend")  # fmt: skip
    assert all(getattr(want, f) is not None for f in fields)
    for back in (parse_bundle(b), parse_bundle(b, site)):
        assert {f: getattr(back, f) for f in fields} == {f: getattr(want, f) for f in fields}
    assert any(c.start_s is not None for c in parse_bundle(b).clips)  # the clip extension too
    # Read under another base, the local codes are not this Bundle's: nothing is found.
    other = parse_bundle(b, FhirCodes())
    assert (other.result_id, other.label, other.risk_probability) == (None, None, None)


def test_unusable_numbers_say_why_they_are_absent(made):
    r = as_kind(made["screening", True], "indeterminate")
    b = build_bundle(r, CTX)
    (risk,) = [o for o in resources(b, "Observation")
               if o["code"]["coding"][-1]["code"] == "cp-risk-probability"]  # fmt: skip
    assert "valueQuantity" not in risk
    assert risk["dataAbsentReason"]["coding"][0]["code"] == "unknown"
    assert "out of domain" in risk["dataAbsentReason"]["text"]
    (report,) = resources(b, "DiagnosticReport")
    assert report["conclusion"].startswith("Indeterminate")


def test_the_validator_is_strict_enough_to_catch_a_broken_bundle(made):
    b = build_bundle(as_kind(made["screening", True], "risk"), CTX)
    bad = json.loads(json.dumps(b))
    resources(bad, "DiagnosticReport")[0]["status"] = "maybe"
    with pytest.raises(ValueError):
        validate(bad)
    bad = json.loads(json.dumps(b))
    resources(bad, "Observation")[0]["valueQuantity"]["value"] = "twelve"
    with pytest.raises(ValueError):
        validate(bad)
    bad = json.loads(json.dumps(b))
    resources(bad, "Observation")[0]["dataAbsentReason"] = {"text": "unknown"}
    with pytest.raises(ValueError):
        validate(bad)
    bad = json.loads(json.dumps(b))
    resources(bad, "Provenance")[0]["recorded"] = "yesterday"
    with pytest.raises(ValueError):
        validate(bad)


def test_references_are_the_callers_and_never_echoed_when_wrong(made):
    r = made["screening", False]
    b = build_bundle(r, FhirContext("r2"))
    validate(b)
    assert '"subject"' not in json.dumps(b) and '"encounter"' not in json.dumps(b)
    messages = set()
    for bad in ("Jane Doe", "Patient/", "Observation/1", "Patient/1 OR 1=1", "javascript:x"):
        with pytest.raises(InvalidFhirReferenceError) as e:
            FhirContext("r3", subject=bad)
        messages.add(str(e.value))
    assert len(messages) == 1 and "Jane" not in messages.pop()  # the same words, whatever was given
    with pytest.raises(InvalidFhirReferenceError):
        FhirContext("r3", encounter="Patient/1")
    absolute = FhirContext("r4", subject="https://ehr.example/fhir/Patient/77")
    assert parse_bundle(build_bundle(r, absolute)).subject == absolute.subject


def test_dicom_uids_only_when_echoed(made):
    r = made["screening", True]
    plain = json.dumps(build_bundle(r, CTX))
    assert C.DICOM_UID_SYSTEM not in plain
    ctx = FhirContext("r5", study_instance_uid="1.2.840.99.1", series_instance_uid="1.2.840.99.2")
    b = build_bundle(r, ctx)
    validate(b)
    back = parse_bundle(b)
    assert (back.study_instance_uid, back.series_instance_uid) == ("1.2.840.99.1", "1.2.840.99.2")
    with pytest.raises(Exception):  # noqa: B017 - a UID is digits and dots, nothing else
        FhirContext("r6", study_instance_uid="Doe^Jane")


def test_a_bundle_sent_twice_creates_nothing_twice(made):
    r = made["screening", True]
    a, b = build_bundle(r, CTX), build_bundle(r, CTX)
    assert [e["fullUrl"] for e in a["entry"]] == [e["fullUrl"] for e in b["entry"]]
    other = build_bundle(r, FhirContext("res-2"))
    assert not {e["fullUrl"] for e in a["entry"]} & {e["fullUrl"] for e in other["entry"]}
    for e in a["entry"]:
        kind = e["resource"]["resourceType"]
        if kind in ("DiagnosticReport", "Observation", "Device"):
            system, value = e["request"]["ifNoneExist"].removeprefix("identifier=").split("|")
            assert {"system": system, "value": value} in e["resource"]["identifier"]


def test_site_codes_come_first_and_the_local_code_stays(made, tmp_path):
    site = {"system": "https://hospital.example/codes", "code": "GMA-R", "display": "GMA risk"}
    cfg = tmp_path / "codes.json"
    cfg.write_text(json.dumps({"unit": "1", "codes": {"cp-risk-probability": [site]}}))
    codes = FhirCodes.load(cfg)
    r = as_kind(made["screening", True], "risk")
    b = build_bundle(r, CTX, codes)
    validate(b)
    risk = next(o for o in resources(b, "Observation")
                if o["code"]["coding"][-1]["code"] == "cp-risk-probability")  # fmt: skip
    assert risk["code"]["coding"][0] == site and risk["code"]["coding"][1]["system"] == C.GMA_SYSTEM
    assert (
        risk["valueQuantity"]["code"] == "1"
        and risk["valueQuantity"]["value"] == r.risk_probability
    )
    assert parse_bundle(b).risk_probability == r.risk_probability
    for bad in ({"codes": {"no-such-concept": [site]}}, {"unit": "percent"},
                {"codes": {"fms-frequency": [{"code": "x"}]}},
                {"codes": {"fms-frequency": [{"system": C.GMA_SYSTEM, "code": "x"}]}}):  # fmt: skip
        cfg.write_text(json.dumps(bad))
        with pytest.raises(InvalidFhirConfigError):
            FhirCodes.load(cfg)
    cfg.write_text("{not json")
    with pytest.raises(InvalidFhirConfigError):
        FhirCodes.load(cfg)


def test_every_new_error_code_has_a_one_line_fix():
    import inspect

    import mam.dicom_video
    import mam.fhir.bundle
    import mam.fhir.codes
    from mam.cli.errors import HINTS
    from mam.errors import MamError

    modules = (mam.dicom_video, mam.fhir.bundle, mam.fhir.codes)
    codes = {cls.code for m in modules for _, cls in inspect.getmembers(m, inspect.isclass)
             if issubclass(cls, MamError)}  # fmt: skip
    assert {"dicom_without_video", "invalid_fhir_reference", "invalid_fhir_config"} <= codes
    assert codes <= set(HINTS), codes - set(HINTS)


# -- push -------------------------------------------------------------------------------------
class FhirServer:
    """A local HTTP server standing in for a site's FHIR server: records what it receives and
    answers with the statuses it is told, in turn (the last one repeats)."""

    def __init__(self) -> None:
        self.received: list[dict] = []
        self.statuses = [200]
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["content-length"]))
                server.received.append({"path": self.path, "headers": dict(self.headers),
                                        "body": json.loads(body)})  # fmt: skip
                status = server.statuses.pop(0) if len(server.statuses) > 1 else server.statuses[0]
                answer = json.dumps({"resourceType": "Bundle", "type": "transaction-response"})
                self.send_response(status)
                self.send_header("content-type", "application/fhir+json")
                self.send_header("content-length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer.encode())

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/fhir"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def fhir_server():
    s = FhirServer()
    yield s
    s.close()


def test_push_posts_the_transaction_with_the_token(made, fhir_server, tmp_path):
    token = tmp_path / "token"
    token.write_text("s3cret-token\n")
    client = FhirClient(fhir_server.url, StaticToken(token_file=token))
    bundle = build_bundle(as_kind(made["screening", True], "risk"), CTX)
    try:
        a = client.send(bundle)
        token.write_text("rotated-token")  # a rotated secret is picked up at the next push
        client.send(bundle)
    finally:
        client.close()
    assert (a.status, a.error) == (200, None)
    first, second = fhir_server.received
    assert first["path"] == "/fhir" and first["body"] == bundle
    assert first["headers"]["Content-Type"] == "application/fhir+json"
    assert first["headers"]["Authorization"] == "Bearer s3cret-token"
    assert second["headers"]["Authorization"] == "Bearer rotated-token"


@pytest.mark.parametrize(
    "statuses, outcome, attempts",
    [
        ([503, 502, 200], "ok", 3),  # retried until it goes through
        ([503], "given_up", 3),  # gave up after every attempt
        ([400], "given_up", 1),  # a final answer: not retried
        ([429, 201], "ok", 2),
    ],
)
def test_push_retries_what_can_pass_and_stops_at_what_cannot(made, fhir_server, statuses, outcome,
                                                             attempts, tmp_path):  # fmt: skip
    fhir_server.statuses = list(statuses)
    box = Outbox(tmp_path / "o.sqlite", max_attempts=3, backoff_s=0.001, max_backoff_s=0.001)
    box.enqueue(build_bundle(made["screening", False], CTX))
    client = FhirClient(fhir_server.url)
    seen = []
    try:
        for _ in range(5):
            box.deliver(client, on_delivery=seen.append)
            time.sleep(0.01)
    finally:
        client.close()
    assert (seen[-1].outcome, seen[-1].attempts) == (outcome, attempts)
    assert [d.outcome for d in seen[:-1]] == ["retry"] * (attempts - 1)
    assert len(fhir_server.received) == attempts
    if statuses == [400]:
        assert seen[-1].reason == "rejected"


def test_push_to_nobody_fails_without_raising(made):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    client = FhirClient(f"http://127.0.0.1:{port}/fhir", timeout_s=5)
    try:
        a = client.send(build_bundle(made["screening", False], CTX))
    finally:
        client.close()
    assert a.status is None and a.error == "ConnectError"


def test_probabilities_survive_the_percent_unit_exactly():
    rng = np.random.default_rng(0)
    codes = FhirCodes(unit="%")
    for p in np.round(rng.random(2000), 4):
        assert FhirCodes.probability(codes.quantity(float(p))) == float(p)


# -- idempotency and corrections ----------------------------------------------------------------
def test_provenance_is_created_once_per_content_and_a_correction_updates(made):
    from mam.fhir.bundle import as_correction

    r = as_kind(made["screening", True], "risk")
    issued = __import__("datetime").datetime(2026, 1, 2, 3, 4, 5)
    ctx = FhirContext("res-1", subject="Patient/p-123", issued=issued)

    def provenance_request(b):
        (e,) = [e for e in b["entry"] if e["resource"]["resourceType"] == "Provenance"]
        return e["request"]

    later = FhirContext("res-1", subject="Patient/p-123")  # built again, at another time
    same = provenance_request(build_bundle(r, ctx)), provenance_request(build_bundle(r, later))
    other = provenance_request(build_bundle(as_kind(made["screening", True], "normal"), ctx))
    assert same[0] == same[1] and same[0]["ifNoneExist"].startswith("_tag=")
    assert other["ifNoneExist"] != same[0]["ifNoneExist"]  # a correction is another record
    b = build_bundle(r, ctx)
    validate(b)
    fixed = as_correction(b)
    Bundle.model_validate(fixed)  # structure; its requests are conditional updates, checked here
    assert b == build_bundle(r, ctx)  # the original is left as it was
    for e in fixed["entry"]:
        kind, req = e["resource"]["resourceType"], e["request"]
        if kind in ("Observation", "DiagnosticReport"):
            (ident,) = e["resource"]["identifier"]
            assert req == {
                "method": "PUT",
                "url": f"{kind}?identifier={ident['system']}|{ident['value']}",
            }
        else:
            assert req["method"] == "POST" and req["ifNoneExist"]
    (prov,) = resources(fixed, "Provenance")
    assert prov["activity"]["coding"][0]["code"] == "UPDATE"


def test_outbox_error_codes_have_a_one_line_fix():
    import inspect

    import mam.fhir.outbox
    from mam.cli.errors import HINTS
    from mam.errors import MamError

    codes = {cls.code for _, cls in inspect.getmembers(mam.fhir.outbox, inspect.isclass)
             if issubclass(cls, MamError) and cls.__module__ == "mam.fhir.outbox"}  # fmt: skip
    assert len(codes) == 7 and codes <= set(HINTS), codes - set(HINTS)
