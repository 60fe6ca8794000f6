"""Read a result's numbers back from its FHIR Bundle (``mam.fhir.bundle``): the round trip the
tests check, and what a receiving system written in Python can reuse.

Resources are found by the local codes (``mam.fhir.codes.GMA_SYSTEM``), never by position, so a
bundle whose entries a server reordered, or that carries a site's codes beside the local ones,
reads the same.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mam.fhir import codes as C
from mam.fhir.codes import FhirCodes

__all__ = ["ClipReadback", "FhirReadback", "parse_bundle"]


@dataclass(frozen=True)
class ClipReadback:
    index: int
    fms_probability: float
    start_s: float | None = None  # None: ready-made instances carry no times
    end_s: float | None = None


@dataclass
class FhirReadback:
    """What a bundle says; None where it says nothing (e.g. numbers not to be used)."""

    result_id: str | None = None
    label: str | None = None
    threshold: float | None = None
    risk_probability: float | None = None
    fms_frequency: float | None = None
    fms_category: str | None = None
    clips: list[ClipReadback] | None = None
    used_info_branch: bool | None = None
    subject: str | None = None
    encounter: str | None = None
    model_name: str | None = None
    model_version: str | None = None
    weights_sha256: str | None = None
    pose_backend: str | None = None
    study_instance_uid: str | None = None
    series_instance_uid: str | None = None
    report_status: str | None = None
    notes: list[str] = field(default_factory=list)


def _local_code(concept: dict | None) -> str | None:
    for c in (concept or {}).get("coding", []):
        if c.get("system") == C.GMA_SYSTEM:
            return c.get("code")
    return None


def _uid(identifier: dict | None) -> str | None:
    if not identifier or identifier.get("system") != C.DICOM_UID_SYSTEM:
        return None
    value = identifier.get("value", "")
    return value[len("urn:oid:") :] if value.startswith("urn:oid:") else value


def parse_bundle(bundle: dict) -> FhirReadback:
    """The numbers and codes of a bundle made by ``build_bundle``."""
    out = FhirReadback()
    resources = [e["resource"] for e in bundle.get("entry", [])]
    for res in resources:
        kind = res.get("resourceType")
        if kind == "DiagnosticReport" and _local_code(res.get("code")) == "gma-screening-report":
            out.report_status = res.get("status")
            out.result_id = next(
                (i["value"] for i in res.get("identifier", [])
                 if i.get("system") == C.RESULT_ID_SYSTEM), None)  # fmt: skip
            out.subject = res.get("subject", {}).get("reference")
            out.encounter = res.get("encounter", {}).get("reference")
            for ref in res.get("imagingStudy", []):
                out.study_instance_uid = _uid(ref.get("identifier")) or out.study_instance_uid
        elif kind == "Device":
            for i in res.get("identifier", []):
                if i.get("system") == C.WEIGHTS_SHA256_SYSTEM:
                    out.weights_sha256 = i.get("value")
            names = {n.get("type"): n.get("name") for n in res.get("deviceName", [])}
            out.model_name = names.get("model-name")
            out.model_version = next((v.get("value") for v in res.get("version", [])), None)
            for p in res.get("property", []):
                if _local_code(p.get("type")) == "pose-backend":
                    out.pose_backend = p["valueCode"][0].get("text")
        elif kind == "Provenance":
            for e in res.get("entity", []):
                out.series_instance_uid = _uid(e.get("what", {}).get("identifier"))
        elif kind == "Observation":
            _observation(res, out)
    return out


def _observation(res: dict, out: FhirReadback) -> None:
    code = _local_code(res.get("code"))
    method = _local_code(res.get("method"))
    if method is not None:
        out.used_info_branch = method == "mam-with-infant-data"
    q = res.get("valueQuantity")
    if code == "cp-risk-probability":
        out.risk_probability = FhirCodes.probability(q) if q else None
        for rr in res.get("referenceRange", []):
            if "high" in rr:
                out.threshold = FhirCodes.probability(rr["high"])
    elif code == "gma-classification":
        out.label = _local_code(res.get("valueCodeableConcept"))
        out.notes = [n.get("text", "") for n in res.get("note", [])]
    elif code == "fms-frequency":
        out.fms_frequency = FhirCodes.probability(q) if q else None
    elif code == "fms-category":
        out.fms_category = _local_code(res.get("valueCodeableConcept"))
    elif code == "clip-fms-probability":
        clips = []
        for i, comp in enumerate(res.get("component", [])):
            start = end = None
            for ext in comp.get("extension", []):
                if ext.get("url") == C.CLIP_WINDOW_EXTENSION:
                    start = float(ext["valueRange"]["low"]["value"])
                    end = float(ext["valueRange"]["high"]["value"])
            p = FhirCodes.probability(comp["valueQuantity"])
            clips.append(ClipReadback(i, p, start, end))
        out.clips = clips
