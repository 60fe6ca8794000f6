"""A screening result as an HL7 FHIR R4 transaction Bundle, with AI provenance.

What an EHR receives for one result (``build_bundle``), each resource labelled as the HL7 AI
Transparency on FHIR guide (STU1 ballot, FHIR 4.0.1) asks:

* ``Device``: the model (AI Device profile): name, version, model digest (a second
  ``version`` entry of type ``model-digest``, ``mam.model.weights``), weights SHA-256, pose
  backend, runtime; type ``Artificial-Intelligence`` with its kinds (deep learning, video data,
  deterministic); the weights' provenance as a note. Conditionally created on its configuration
  identifier, so a server keeps one Device per model configuration.
* ``Observation`` (status ``preliminary``, ``meta.security`` AIAST, ``device`` = the model):
  P(risk) with the risk threshold as its reference range; the classification (normal, risk or
  indeterminate, interpretation POS / NEG / IND); the FMs frequency; the FMs category; per-clip
  P(FMs) as one component per clip, each with its time window (``CLIP_WINDOW_EXTENSION``).
* ``DiagnosticReport`` (status ``preliminary``: decision support awaiting a GMA assessor's
  review; AIAST) referencing them, with the conclusion in words and as a code.
* ``Provenance`` (AI Provenance profile): the Device as author (role Artificial-Intelligence),
  reason AIAST, targets every AI-asserted resource.

Choices where FHIR and the guide leave room (written down here, see also ``mam.fhir.codes``):

* When the model cannot speak for the recording (``probabilities_usable`` false) the numbers
  the JSON result still carries for research are *not* sent: P(risk) and the FMs frequency get
  ``dataAbsentReason`` ``unknown`` with the reasons as text, and the per-clip series is left out.
  An EHR shows values to clinicians; numbers that must not be used have no place there.
* Patient and encounter references are only ever the caller's (``FhirContext``); without them
  the resources have no subject. Infant data (sex, ages, weight) are inputs the EHR already
  holds: only whether they were used is said (``Observation.method``).
* DICOM study and series UIDs appear only when the caller asks to echo them: the study as
  ``DiagnosticReport.imagingStudy`` (a logical reference by identifier, ``urn:dicom:uid``), the
  series as a Provenance source entity.
* Every ``fullUrl`` is a UUID derived from the result id, and the DiagnosticReport and
  Observations are conditionally created on their identifiers, the Provenance on a tag of the
  result id and the content's digest, so a transaction sent twice (a retried push) duplicates
  nothing. A corrected result (same id, other content) is sent through ``as_correction``:
  conditional updates of the report and Observations, and a Provenance of the update.

Built as plain JSON-ready dicts, not ``fhir.resources`` models: the base install stays free of a
library of every FHIR resource, and the tests validate each kind of bundle with
``fhir.resources``' R4B models (wire-compatible with R4 for these resources).
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

from mam import DISCLAIMER
from mam.errors import InputError
from mam.fhir import codes as C
from mam.fhir.codes import FhirCodes
from mam.schemas import InstancesResult, ScreeningResult

__all__ = ["FhirContext", "InvalidFhirReferenceError", "as_correction", "build_bundle",
           "result_id_for"]  # fmt: skip

_ID = r"[A-Za-z0-9\-.]{1,64}"  # FHIR id
_INTERPRETATION = {
    "risk": ("POS", "Positive"),
    "normal": ("NEG", "Negative"),
    "indeterminate": ("IND", "Indeterminate"),
}


class InvalidFhirReferenceError(InputError):
    """A patient or encounter reference that is not one (the value itself is never echoed)."""

    code = "invalid_fhir_reference"


def _reference(value: str | None, kind: str) -> str | None:
    if value is None or value == "":
        return None
    value = value.strip()
    pattern = rf"^(?:https?://[^\s?#]+/)?{kind}/{_ID}$"
    if not re.match(pattern, value):
        raise InvalidFhirReferenceError(
            f"the FHIR {kind.lower()} reference must look like {kind}/123 or "
            f"https://fhir.example/{kind}/123 (the value given is not echoed)"
        )
    return value


@dataclass(frozen=True)
class FhirContext:
    """What only the caller knows. References are checked (``InvalidFhirReferenceError``),
    never guessed, never logged.

    Args:
        result_id: the result's id (service request or task id; CLI and batch mint one).
        subject: ``Patient/<id>`` (or an absolute URL of one); None: no subject.
        encounter: ``Encounter/<id>``; None: none.
        issued: when the result was made (default: now, UTC).
        study_instance_uid, series_instance_uid: DICOM UIDs, only when the caller asked for
            them to be echoed.
    """

    result_id: str
    subject: str | None = None
    encounter: str | None = None
    issued: datetime | None = None
    study_instance_uid: str | None = None
    series_instance_uid: str | None = None

    def __post_init__(self) -> None:
        if not re.match(r"^[A-Za-z0-9._:\-]{1,64}$", self.result_id or ""):
            raise ValueError("result_id must be 1-64 characters of [A-Za-z0-9._:-]")
        object.__setattr__(self, "subject", _reference(self.subject, "Patient"))
        object.__setattr__(self, "encounter", _reference(self.encounter, "Encounter"))
        for name in ("study_instance_uid", "series_instance_uid"):
            uid = getattr(self, name)
            if uid is not None and not re.match(r"^[0-9]+(\.[0-9]+)*$", uid):
                raise InputError(f"{name} is not a DICOM UID (digits and dots)")


def result_id_for(key: str) -> str:
    """A stable result id from a stable key (a batch job's ledger key)."""
    return str(uuid.uuid5(uuid.UUID(C.FULL_URL_NAMESPACE), "result:" + key))


def _instant(t: datetime | None) -> str:
    t = t or datetime.now(UTC)
    if t.tzinfo is None:
        t = t.replace(tzinfo=UTC)
    return t.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _round(x: float) -> float:
    return round(float(x), 4)


class _Builder:
    def __init__(self, result, ctx: FhirContext, codes: FhirCodes) -> None:
        self.r, self.ctx, self.codes = result, ctx, codes
        self.issued = _instant(ctx.issued)
        self.entries: list[dict] = []
        self.ns = uuid.UUID(C.FULL_URL_NAMESPACE)

    def url(self, part: str) -> str:
        return "urn:uuid:" + str(uuid.uuid5(self.ns, f"{self.ctx.result_id}/{part}"))

    def add(self, part: str, resource: dict, if_none_exist: str | None = None) -> str:
        url = self.url(part)
        request = {"method": "POST", "url": resource["resourceType"]}
        if if_none_exist:
            request["ifNoneExist"] = if_none_exist
        self.entries.append({"fullUrl": url, "resource": resource, "request": request})
        return url

    def identifier(self, suffix: str = "") -> dict:
        value = self.ctx.result_id + (f"-{suffix}" if suffix else "")
        return {"system": C.RESULT_ID_SYSTEM, "value": value}

    def common(self) -> dict:
        """Fields every AI-asserted resource carries."""
        out: dict = {"meta": {"security": [dict(C.AIAST)]}}
        if self.ctx.subject:
            out["subject"] = {"reference": self.ctx.subject}
        if self.ctx.encounter:
            out["encounter"] = {"reference": self.ctx.encounter}
        return out

    # -- resources ---------------------------------------------------------------------------------
    def device(self) -> str:
        m = self.r.model
        # The digest, not the file's hash: recalibrated weights are another Device.
        key = f"{m.digest or m.weights_sha256}/{m.pose_backend}/{m.runtime}/{m.precision}"
        kinds = ("Deep-Learning-Models", "AI-for-Video-Data", "Deterministic-AI")

        def prop(code: str, text: str) -> dict:
            return {"type": self.codes.concept(code), "valueCode": [{"text": text}]}

        device = {
            "resourceType": "Device",
            "meta": {"profile": [C.AI_DEVICE_PROFILE]},
            "extension": [
                {
                    "url": C.AI_KIND_EXTENSION,
                    "valueCodeableConcept": {
                        "coding": [{"system": C.AI_DEVICE_TYPE_SYSTEM, "code": k}]
                    },
                }
                for k in kinds
            ],  # fmt: skip
            "identifier": [
                {"system": C.WEIGHTS_SHA256_SYSTEM, "value": m.weights_sha256},
                {"system": C.MODEL_CONFIGURATION_SYSTEM, "value": key},
            ],
            "status": "active",
            "deviceName": [
                {"name": m.name, "type": "model-name"},
                {
                    "name": "MAM automated General Movements Assessment (Gao, Yao et al., "
                    "Nat Commun 2023)",
                    "type": "user-friendly-name",
                },
            ],  # fmt: skip
            "type": {
                "coding": [
                    {
                        "system": C.AI_DEVICE_TYPE_SYSTEM,
                        "code": "Artificial-Intelligence",
                        "display": "All kinds of Artificial Intelligence",
                    }
                ],
                "text": "AI model",
            },  # fmt: skip
            "version": [{"value": m.version}]
            + ([{"type": {"text": "model-digest"}, "value": m.digest}] if m.digest else []),
            "property": [
                prop("pose-backend", m.pose_backend),
                prop("runtime", f"{m.runtime} ({m.device})"),
                prop("precision", m.precision),
            ],
            "note": [{"text": f"Weights: {m.provenance}. {DISCLAIMER}"}],
        }
        return self.add("device", device,
                        f"identifier={C.MODEL_CONFIGURATION_SYSTEM}|{key}")  # fmt: skip

    def observation(self, part: str, code: str, device: str, **fields) -> str:
        obs = {
            "resourceType": "Observation",
            **self.common(),
            "identifier": [self.identifier(code)],
            "status": "preliminary",
            "category": [
                {"coding": [{"system": C.OBSERVATION_CATEGORY, "code": "exam", "display": "Exam"}]}
            ],  # fmt: skip
            "code": self.codes.concept(code),
            "issued": self.issued,
            "device": {"reference": device},
            "method": self.method(),
        }
        # Observation puts subject/encounter after code; key order does not matter in JSON.
        obs.update(fields)
        ident = obs["identifier"][0]
        return self.add(part, obs, f"identifier={ident['system']}|{ident['value']}")

    def method(self) -> dict:
        used = self.r.model.used_info_branch
        code = "mam-with-infant-data" if used else "mam-without-infant-data"
        text = f"{C.CONCEPTS[code]}; calibration: {self.r.model.calibration}"
        return self.codes.concept(code, text)

    def absent(self) -> dict:
        reasons = "; ".join(self.r.classification.reasons) or "the model cannot speak for it"
        return {
            "dataAbsentReason": {
                "coding": [{"system": C.DATA_ABSENT_REASON, "code": "unknown",
                            "display": "Unknown"}],
                "text": f"Not to be used: {reasons}",
            }
        }  # fmt: skip

    def value(self, probability: float) -> dict:
        if not self.r.probabilities_usable:
            return self.absent()
        return {"valueQuantity": self.codes.quantity(_round(probability))}

    def clips(self) -> list[dict]:
        r = self.r
        out = []
        if isinstance(r, ScreeningResult):
            for c in r.clips:
                window = {
                    "low": {"value": c.start_s, "unit": "s", "system": C.UCUM, "code": "s"},
                    "high": {"value": c.end_s, "unit": "s", "system": C.UCUM, "code": "s"},
                }
                text = f"P(FMs), clip {c.index}, {c.start_s:g}-{c.end_s:g} s"
                out.append({
                    "extension": [{"url": C.CLIP_WINDOW_EXTENSION, "valueRange": window}],
                    "code": self.codes.concept("clip-fms-probability", text),
                    "valueQuantity": self.codes.quantity(_round(c.fms_probability)),
                })  # fmt: skip
        else:
            for i, p in enumerate(r.fms_probability):
                out.append({
                    "code": self.codes.concept("clip-fms-probability", f"P(FMs), instance {i}"),
                    "valueQuantity": self.codes.quantity(_round(p)),
                })  # fmt: skip
        return out

    def conclusion(self) -> str:
        r, c = self.r, self.r.classification
        if c.label == "indeterminate":
            head = ("Indeterminate: the model cannot speak for this recording ("
                    + "; ".join(c.reasons) + ").")  # fmt: skip
        else:
            head = f"{C.CONCEPTS[c.label]} (classification by the model)."
            if r.probabilities_usable:
                head += (f" P(risk) {r.risk_probability:.3f} against a threshold of "
                         f"{c.threshold:.3f}; FMs frequency {r.fms_frequency:.2f} "
                         f"({r.fms_category}).")  # fmt: skip
            else:
                head += " Not to be used: " + "; ".join(c.reasons) + "."
        return f"{head} {DISCLAIMER}"

    def build(self) -> dict:
        r, codes = self.r, self.codes
        c = r.classification
        device = self.device()
        results = []
        threshold = codes.quantity(_round(c.threshold))
        results.append(self.observation(
            "risk", "cp-risk-probability", device, **self.value(r.risk_probability),
            referenceRange=[{"high": threshold, "text": "below the risk threshold: normal; "
                             "at or above it: risk"}],
        ))  # fmt: skip
        notes = [{"text": w} for w in r.warnings]
        code, display = _INTERPRETATION[c.label]
        results.append(self.observation(
            "classification", "gma-classification", device,
            valueCodeableConcept=codes.concept(c.label),
            interpretation=[{"coding": [{"system": C.INTERPRETATION, "code": code,
                                         "display": display}]}],
            **({"note": notes} if notes else {}),
        ))  # fmt: skip
        results.append(self.observation(
            "fms-frequency", "fms-frequency", device, **self.value(r.fms_frequency)
        ))  # fmt: skip
        results.append(self.observation(
            "fms-category", "fms-category", device,
            valueCodeableConcept=codes.concept(r.fms_category),
        ))  # fmt: skip
        if r.probabilities_usable:
            results.append(self.observation(
                "clips", "clip-fms-probability", device, component=self.clips()
            ))  # fmt: skip
        report = {
            "resourceType": "DiagnosticReport",
            **self.common(),
            "identifier": [self.identifier()],
            "status": "preliminary",
            "code": codes.concept("gma-screening-report"),
            "issued": self.issued,
            "result": [{"reference": u} for u in results],
            "conclusion": self.conclusion(),
            "conclusionCode": [codes.concept(c.label)],
        }
        if self.ctx.study_instance_uid:
            report["imagingStudy"] = [{
                "identifier": {"system": C.DICOM_UID_SYSTEM,
                               "value": "urn:oid:" + self.ctx.study_instance_uid},
                "display": "the DICOM study of the screened recording",
            }]  # fmt: skip
        ident = report["identifier"][0]
        dr = self.add("report", report, f"identifier={ident['system']}|{ident['value']}")
        provenance = {
            "resourceType": "Provenance",
            "meta": {"profile": [C.AI_PROVENANCE_PROFILE]},
            "target": [{"reference": u} for u in (dr, *results)],
            "recorded": self.issued,
            "activity": {"coding": [{"system": C.DATA_OPERATION, "code": "CREATE",
                                     "display": "create"}]},
            "reason": [{"coding": [dict(C.AIAST)]}],
            "agent": [{
                "type": {"coding": [{"system": C.PARTICIPANT_TYPE, "code": "author",
                                     "display": "Author"}]},
                "role": [{"coding": [{"system": C.AI_DEVICE_TYPE_SYSTEM,
                                      "code": "Artificial-Intelligence"}]}],
                "who": {"reference": device},
            }],
        }  # fmt: skip
        if self.ctx.series_instance_uid:
            provenance["entity"] = [{
                "role": "source",
                "what": {"identifier": {"system": C.DICOM_UID_SYSTEM,
                                        "value": "urn:oid:" + self.ctx.series_instance_uid},
                         "display": "the DICOM series of the screened recording"},
            }]  # fmt: skip
        # Keyed by the result and what it asserts (not when the Bundle was built), so a re-push
        # creates nothing new and a correction (other content) records another Provenance. R4's
        # Provenance has no identifier element: the key is a tag, searchable as _tag.
        tag = self.identifier(f"provenance-{content_digest(self.entries)[:16]}")
        tag = {"system": tag["system"], "code": tag["value"]}
        provenance["meta"]["tag"] = [tag]
        self.add("provenance", provenance, f"_tag={tag['system']}|{tag['code']}")
        return {
            "resourceType": "Bundle",
            "identifier": self.identifier(),
            "type": "transaction",
            "timestamp": self.issued,
            "entry": self.entries,
        }


def build_bundle(
    result: ScreeningResult | InstancesResult,
    context: FhirContext,
    codes: FhirCodes | None = None,
) -> dict:
    """The FHIR R4 transaction Bundle of one result (see the module docstring)."""
    return _Builder(result, context, codes or FhirCodes()).build()


TIME_FIELDS = ("timestamp", "issued", "recorded")


def content_digest(entries: list[dict]) -> str:
    """SHA-256 of Bundle entries less when they were built (``issued``, ``recorded``): the
    same assertions give the same digest whenever the Bundle is built again."""
    kept = [{**e, "resource": {k: v for k, v in e["resource"].items() if k not in TIME_FIELDS}}
            for e in entries]  # fmt: skip
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()


# What a corrected result updates in place (the Device is one per model configuration).
CORRECTED_TYPES = frozenset({"Observation", "DiagnosticReport"})


def as_correction(bundle: dict) -> dict:
    """``bundle`` (a copy) sent as a correction of an earlier one with the same result id: its
    Observations and DiagnosticReport become conditional updates (``PUT Type?identifier=...``,
    creating what is not there yet) instead of conditional creates, which would keep the old
    resources; the Provenance records an update. The fullUrls stay, so references still
    resolve within the transaction."""
    out = copy.deepcopy(bundle)
    for entry in out.get("entry", ()):
        resource, request = entry["resource"], entry["request"]
        kind = resource["resourceType"]
        if kind in CORRECTED_TYPES and request.get("ifNoneExist"):
            entry["request"] = {"method": "PUT", "url": f"{kind}?{request['ifNoneExist']}"}
        elif kind == "Provenance":
            resource["activity"] = {"coding": [{"system": C.DATA_OPERATION, "code": "UPDATE",
                                                "display": "revise"}]}  # fmt: skip
    return out
