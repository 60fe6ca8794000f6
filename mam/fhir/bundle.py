"""A screening result as an HL7 FHIR R4 transaction Bundle, with AI provenance.

What an EHR receives for one result (``build_bundle``), each resource labelled as the HL7 AI
Transparency on FHIR guide (``hl7.fhir.uv.aitransparency#1.0.0-ballot``, FHIR 4.0.1) asks:

* ``Device``: the model (AI Device profile): name, version, model digest (a second
  ``version`` entry of type ``model-digest``, ``mam.model.weights``), weights SHA-256, pose
  backend, runtime; type ``Artificial-Intelligence`` with its kind (deep learning: the only
  kind code of the ballot package that fits); manufacturer, safety (decision support only),
  ``url`` the model card (also named in the note with the weights' provenance); ``owner`` and
  ``contact`` the site's (``FhirCodes``). Conditionally created on its configuration
  identifier, so a server keeps one Device per model configuration.
* ``Observation`` (status ``preliminary``, ``meta.security`` AIAST, ``device`` = the model):
  P(risk) with the risk threshold as its reference range; the classification (normal, risk or
  indeterminate, interpretation POS / NEG / IND); the FMs frequency; the FMs category; per-clip
  P(FMs) as one component per clip, each with its time window (``CLIP_WINDOW_EXTENSION``).
* ``DiagnosticReport`` (status ``preliminary``: decision support awaiting a GMA assessor's
  review; AIAST; category v2-0074 ``OTH``) referencing them, with the conclusion in words and as
  a code; ``performer`` the site's organisation when configured (R4 has no Device performer:
  the Device is the Provenance's author and each Observation's ``device``).
* Every Observation and the report: ``effectiveDateTime`` when the infant was recorded
  (``FhirContext.recorded_at``) if the caller knows it, else the screening time (``issued``);
  ``basedOn`` the order (``ServiceRequest?identifier=...``, or a logical reference by the
  accession number); the subject by id or as ``Patient?identifier=SYSTEM|VALUE``, a conditional
  reference the outbox resolves to ``Patient/<id>`` when it delivers (``mam.fhir.outbox``), or
  leaves for a server that resolves it. The accession number is also a report identifier (ACSN).
* ``Provenance`` (AI Provenance profile): the Device as author (role Artificial-Intelligence),
  reason AIAST, targets every AI-asserted resource; ``occurredDateTime`` the screening; the
  screened file as a source entity by its SHA-256 (never a path).

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

__all__ = ["FhirContext", "InvalidFhirIdentifierError", "InvalidFhirReferenceError",
           "as_correction", "build_bundle", "result_id_for", "signed_off_bundle"]  # fmt: skip

_ID = r"[A-Za-z0-9\-.]{1,64}"  # FHIR id
_INTERPRETATION = {
    "risk": ("POS", "Positive"),
    "normal": ("NEG", "Negative"),
    "indeterminate": ("IND", "Indeterminate"),
}


class InvalidFhirReferenceError(InputError):
    """A patient or encounter reference that is not one (the value itself is never echoed)."""

    code = "invalid_fhir_reference"


class InvalidFhirIdentifierError(InvalidFhirReferenceError):
    """A patient or order identifier, or an accession number, that is not one (never echoed);
    the same code as a bad reference: both are the caller's linkage."""


def _identifier(value: str | None, what: str) -> tuple[str, str] | None:
    """``SYSTEM|VALUE`` -> (system, value): the system an absolute URI (``https://...``,
    ``urn:oid:...``), the value without ``|`` or spaces at its ends."""
    if value is None or value == "":
        return None
    system, sep, ident = value.strip().partition("|")
    if (not sep or not ident.strip() or "|" in ident or len(value) > 512
            or not re.match(r"^(?:https?://\S+|urn:(?:oid|uuid):\S+)$", system)):  # fmt: skip
        raise InvalidFhirIdentifierError(
            f"the {what} must look like SYSTEM|VALUE with SYSTEM an absolute URI, e.g. "
            "https://hospital.example/mrn|12345 (the value given is not echoed)"
        )
    return system, ident.strip()


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
        patient_identifier: ``SYSTEM|VALUE`` (an MRN): the subject as the conditional reference
            ``Patient?identifier=SYSTEM|VALUE``, resolved at delivery; not with ``subject``.
        order_identifier: ``SYSTEM|VALUE`` of the ServiceRequest (the order) the result
            answers: ``basedOn`` ``ServiceRequest?identifier=SYSTEM|VALUE``.
        accession_number: the accession number: a DiagnosticReport identifier of type ACSN
            (and the order's, as a logical ``basedOn`` reference, when no order is given).
        accession_system: the system of the accession number (default: none, a bare value).
        recorded_at: when the infant was recorded (the ``effective[x]`` of the Observations
            and DiagnosticReport); None: unknown, the screening time (``issued``) is used.
        content_sha256: SHA-256 of the screened file: the Provenance's input entity.
    """

    result_id: str
    subject: str | None = None
    encounter: str | None = None
    issued: datetime | None = None
    study_instance_uid: str | None = None
    series_instance_uid: str | None = None
    patient_identifier: str | None = None
    order_identifier: str | None = None
    accession_number: str | None = None
    accession_system: str | None = None
    recorded_at: datetime | None = None
    content_sha256: str | None = None

    def __post_init__(self) -> None:
        if not re.match(r"^[A-Za-z0-9._:\-]{1,64}$", self.result_id or ""):
            raise ValueError("result_id must be 1-64 characters of [A-Za-z0-9._:-]")
        if self.patient_identifier and (self.subject or "").startswith("Patient?identifier="):
            object.__setattr__(self, "subject", None)  # replace() of a context by identifier
        object.__setattr__(self, "subject", _reference(self.subject, "Patient"))
        object.__setattr__(self, "encounter", _reference(self.encounter, "Encounter"))
        if self.subject and self.patient_identifier:
            raise InvalidFhirReferenceError(
                "give the patient by reference or by identifier, not both"
            )
        patient = _identifier(self.patient_identifier, "patient identifier")
        order = _identifier(self.order_identifier, "order identifier")
        for name, pair in (("patient_identifier", patient), ("order_identifier", order)):
            object.__setattr__(self, name, "|".join(pair) if pair else None)
        if self.patient_identifier:
            object.__setattr__(self, "subject", f"Patient?identifier={self.patient_identifier}")
        acc = (self.accession_number or "").strip() or None
        if acc is not None and (len(acc) > 64 or not re.match(r"^[^|\s][^|]*$", acc)):
            raise InvalidFhirIdentifierError(
                "the accession number must be 1-64 characters without '|' (not echoed)"
            )
        object.__setattr__(self, "accession_number", acc)
        if self.accession_system is not None:
            _identifier(f"{self.accession_system}|x", "accession number system")
        if self.content_sha256 is not None and not re.match(r"^[0-9a-f]{64}$",
                                                            self.content_sha256):  # fmt: skip
            raise ValueError("content_sha256 must be 64 lower-case hex digits")
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
        # When the infant was recorded when the caller knows it, else when it was screened.
        self.effective = _instant(ctx.recorded_at) if ctx.recorded_at else self.issued
        self.sys = codes.systems
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
        return {"system": self.sys.result_id, "value": value}

    def based_on(self) -> list[dict]:
        """The order: a conditional reference by its identifier, else a logical one by the
        accession number; none without either."""
        ctx = self.ctx
        if ctx.order_identifier:
            return [{"reference": f"ServiceRequest?identifier={ctx.order_identifier}"}]
        if ctx.accession_number:
            return [{"type": "ServiceRequest", "identifier": self.accession()}]
        return []

    def accession(self) -> dict:
        out = {"type": {"coding": [{"system": C.IDENTIFIER_TYPE, "code": "ACSN",
                                    "display": "Accession ID"}]}}  # fmt: skip
        if self.ctx.accession_system:
            out["system"] = self.ctx.accession_system
        out["value"] = self.ctx.accession_number
        return out

    def common(self) -> dict:
        """Fields every AI-asserted resource carries."""
        out: dict = {"meta": {"security": [dict(C.AIAST)]}}
        if based_on := self.based_on():
            out["basedOn"] = based_on
        if self.ctx.subject:
            out["subject"] = {"reference": self.ctx.subject}
        if self.ctx.encounter:
            out["encounter"] = {"reference": self.ctx.encounter}
        out["effectiveDateTime"] = self.effective
        return out

    # -- resources ---------------------------------------------------------------------------------
    def device(self) -> str:
        m = self.r.model
        # The digest, not the file's hash: recalibrated weights are another Device.
        key = f"{m.digest or m.weights_sha256}/{m.pose_backend}/{m.runtime}/{m.precision}"
        kinds = C.AI_KINDS

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
                {"system": self.sys.weights_sha256, "value": m.weights_sha256},
                {"system": self.sys.model_configuration, "value": key},
            ],
            "status": "active",
            "safety": [{"text": "Decision support only, not a diagnosis: every result is "
                                "reviewed by a certified GMA assessor"}],
            "manufacturer": C.MANUFACTURER,
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
            "url": self.codes.model_card_url,
            "note": [{"text": f"Model card: {self.codes.model_card_url}. Weights: {m.provenance}. "
                              f"{DISCLAIMER}"}],
        }  # fmt: skip
        if self.codes.owner:
            device["owner"] = {"reference": self.codes.owner}
        if self.codes.contact:
            contact = self.codes.contact
            kind = "email" if "@" in contact and "://" not in contact else "url"
            device["contact"] = [{"system": kind, "value": self.codes.contact}]
        return self.add("device", device,
                        f"identifier={self.sys.model_configuration}|{key}")  # fmt: skip

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
                    "extension": [{"url": self.sys.clip_window, "valueRange": window}],
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
            "identifier": [self.identifier()]
            + ([self.accession()] if self.ctx.accession_number else []),
            "status": "preliminary",
            "category": [
                {
                    "coding": [dict(C.REPORT_CATEGORY)],
                    "text": "Neurodevelopmental screening (video)",
                }
            ],
            "code": codes.concept("gma-screening-report"),
            "issued": self.issued,
            "result": [{"reference": u} for u in results],
            "conclusion": self.conclusion(),
            "conclusionCode": [codes.concept(c.label)],
        }
        if self.codes.owner:  # the Device is the Provenance's author: R4 performers are people
            report["performer"] = [{"reference": self.codes.owner}]
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
            "occurredDateTime": self.issued,
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
        entities = []
        if self.ctx.content_sha256:  # the input, by its content: never a path
            entities.append({
                "role": "source",
                "what": {"identifier": {"system": self.sys.content_sha256,
                                        "value": self.ctx.content_sha256},
                         "display": "the screened file (SHA-256 of its content)"},
            })  # fmt: skip
        if self.ctx.series_instance_uid:
            entities.append({
                "role": "source",
                "what": {"identifier": {"system": C.DICOM_UID_SYSTEM,
                                        "value": "urn:oid:" + self.ctx.series_instance_uid},
                         "display": "the DICOM series of the screened recording"},
            })  # fmt: skip
        if entities:
            provenance["entity"] = entities
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


TIME_FIELDS = ("timestamp", "issued", "recorded", "occurredDateTime", "effectiveDateTime")


def content_digest(entries: list[dict]) -> str:
    """SHA-256 of Bundle entries less their times (``issued``, ``recorded``, ...): the
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


PARTICIPATION_TYPE = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
SIGN_OFF_STATUSES = ("final", "amended")


def _verdict_concept(codes: FhirCodes, value: str) -> dict:
    """A verdict value as a concept: the project's code where it has one, else its words."""
    if value in C.CONCEPTS:
        return codes.concept(value)
    return {"text": value.replace("_", " ")}


def signed_off_bundle(
    result: ScreeningResult | InstancesResult | None,
    ctx: FhirContext,
    codes: FhirCodes | None,
    verdict: dict,
    assessor: str,
    status: str = "final",
    reason: str | None = None,
    signed_at: datetime | None = None,
    preliminary: dict | None = None,
) -> dict:
    """The transaction Bundle of an assessor's sign-off (``final``) or amendment (``amended``)
    of the result ``ctx.result_id``: the result's Bundle as first sent (``preliminary`` when the
    caller has it, which keeps its subject, order and accession; else built from ``result``)
    with its DiagnosticReport a conditional update (``PUT DiagnosticReport?identifier=...``)
    carrying ``status``, the assessor as ``resultsInterpreter`` (a Practitioner by display
    name only: the EHR's own practitioner ids are not known here) and the conclusion of the
    signed-off ``verdict`` (``category``, ``group``); plus a Provenance with the assessor as
    ``verifier`` (activity verify, or revise for an amendment), created once per sign-off event
    (``ifNoneExist`` on a tag of the result, the status, verdict, assessor and ``signed_at``).

    The AI's own resources keep their conditional creates, so the Device, Observations and
    the model's Provenance are not duplicated. The Bundle's identifier is the result id with
    the event (``<id>-final`` or ``<id>-amended-<key>``): an outbox keeps each event apart
    from the result's first push."""
    if status not in SIGN_OFF_STATUSES:
        raise ValueError(f"status must be one of {SIGN_OFF_STATUSES}")
    if not assessor or not str(assessor).strip():
        raise ValueError("the assessor's name is required")
    codes = codes or FhirCodes()
    if preliminary is not None:
        bundle = copy.deepcopy(preliminary)
    elif result is not None:
        bundle = build_bundle(result, ctx, codes)
    else:
        raise ValueError("give the result or the Bundle first sent for it")
    when = _instant(signed_at)
    entries = bundle["entry"]
    report_entry = next(e for e in entries if e["resource"]["resourceType"] == "DiagnosticReport")
    report = report_entry["resource"]
    ident = report["identifier"][0]
    report_entry["request"] = {
        "method": "PUT",
        "url": f"DiagnosticReport?identifier={ident['system']}|{ident['value']}",
    }
    category, group = verdict.get("category"), verdict.get("group")
    words = [f"FMs {str(category).replace('_', ' ')}"] if category else []
    if group:
        words.append(C.CONCEPTS.get(group, group))
    head = "Amended by" if status == "amended" else "Signed off by"
    conclusion = f"{head} a GMA assessor: {'; '.join(words) or 'no verdict'}."
    if status == "amended" and reason:
        conclusion += f" Reason for the amendment: {reason.strip()}."
    interpreter = {"type": "Practitioner", "display": str(assessor).strip()}
    report.update({
        "status": status,
        "issued": when,
        "resultsInterpreter": [interpreter],
        "conclusion": conclusion,
        "conclusionCode": [_verdict_concept(codes, v) for v in (group, category) if v],
    })  # fmt: skip
    activity = (
        {"system": C.DATA_OPERATION, "code": "UPDATE", "display": "revise"}
        if status == "amended"
        else {"system": PARTICIPATION_TYPE, "code": "VRF", "display": "verifier"}
    )
    key = hashlib.sha256(json.dumps(
        [status, category, group, str(assessor).strip(), reason or "", when], sort_keys=True
    ).encode()).hexdigest()[:16]  # fmt: skip
    tag = {"system": codes.systems.result_id, "code": f"{ctx.result_id}-{status}-{key}"}
    provenance = {
        "resourceType": "Provenance",
        "meta": {"tag": [tag]},
        "target": [{"reference": report_entry["fullUrl"]}],
        "occurredDateTime": when,
        "recorded": when,
        "activity": {"coding": [activity]},
        "agent": [{
            "type": {"coding": [{"system": C.PARTICIPANT_TYPE, "code": "verifier",
                                 "display": "Verifier"}]},
            "who": interpreter,
        }],
    }  # fmt: skip
    if status == "amended" and reason:
        provenance["reason"] = [{"text": reason.strip()}]
    part = f"{status}-{key}"
    entries.append({
        "fullUrl": "urn:uuid:" + str(uuid.uuid5(uuid.UUID(C.FULL_URL_NAMESPACE),
                                                f"{ctx.result_id}/{part}")),
        "resource": provenance,
        "request": {"method": "POST", "url": "Provenance",
                    "ifNoneExist": f"_tag={tag['system']}|{tag['code']}"},
    })  # fmt: skip
    event = "final" if status == "final" else f"amended-{key}"
    bundle["identifier"] = {**bundle["identifier"], "value": f"{ctx.result_id}-{event}"}
    bundle["timestamp"] = when
    return bundle
