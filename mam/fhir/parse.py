"""Read a result's numbers back from its FHIR Bundle (``mam.fhir.bundle``): the round trip the
tests check, and what a receiving system written in Python can reuse.

Resources are found by the local codes (``mam.fhir.codes.Systems.gma``), never by position, so
a bundle whose entries a server reordered, or that carries a site's codes beside the local ones,
reads the same. The local URLs are read under the canonical base the Bundle was written with: a
site's own (``canonical_base`` in its codes file) is found in the report's code, or given.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mam.fhir import codes as C
from mam.fhir.codes import FhirCodes, Systems

__all__ = ["ClipReadback", "FhirReadback", "canonical_base_of", "parse_bundle"]


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


_GMA_PATH = Systems("https://x").gma.removeprefix("https://x")  # "/CodeSystem/gma"


def canonical_base_of(bundle: dict) -> str:
    """The canonical base the Bundle's local URLs were written under: the one of its report's
    local code (``<base>/CodeSystem/gma``), else the default."""
    for e in bundle.get("entry") or ():
        res = e.get("resource") or {}
        if res.get("resourceType") != "DiagnosticReport":
            continue
        for c in (res.get("code") or {}).get("coding", []):
            system = c.get("system") or ""
            if c.get("code") == "gma-screening-report" and system.endswith(_GMA_PATH):
                return system.removesuffix(_GMA_PATH)
    return C.CANONICAL_BASE


def _local_code(concept: dict | None, sys: Systems) -> str | None:
    for c in (concept or {}).get("coding", []):
        if c.get("system") == sys.gma:
            return c.get("code")
    return None


def _uid(identifier: dict | None) -> str | None:
    if not identifier or identifier.get("system") != C.DICOM_UID_SYSTEM:
        return None
    value = identifier.get("value", "")
    return value[len("urn:oid:") :] if value.startswith("urn:oid:") else value


def parse_bundle(bundle: dict, codes: FhirCodes | None = None) -> FhirReadback:
    """The numbers and codes of a bundle made by ``build_bundle``, its local URLs under the
    canonical base of ``codes`` when given, else the one it was written with
    (``canonical_base_of``)."""
    sys = codes.systems if codes is not None else Systems(canonical_base_of(bundle))
    out = FhirReadback()
    resources = [e["resource"] for e in bundle.get("entry", [])]
    for res in resources:
        kind = res.get("resourceType")
        code = _local_code(res.get("code"), sys)
        if kind == "DiagnosticReport" and code == "gma-screening-report":
            out.report_status = res.get("status")
            out.result_id = next(
                (i["value"] for i in res.get("identifier", [])
                 if i.get("system") == sys.result_id), None)  # fmt: skip
            out.subject = res.get("subject", {}).get("reference")
            out.encounter = res.get("encounter", {}).get("reference")
            for ref in res.get("imagingStudy", []):
                out.study_instance_uid = _uid(ref.get("identifier")) or out.study_instance_uid
        elif kind == "Device":
            for i in res.get("identifier", []):
                if i.get("system") == sys.weights_sha256:
                    out.weights_sha256 = i.get("value")
            names = {n.get("type"): n.get("name") for n in res.get("deviceName", [])}
            out.model_name = names.get("model-name")
            out.model_version = next((v.get("value") for v in res.get("version", [])), None)
            for p in res.get("property", []):
                if _local_code(p.get("type"), sys) == "pose-backend":
                    out.pose_backend = p["valueCode"][0].get("text")
        elif kind == "Provenance":
            for e in res.get("entity", []):
                out.series_instance_uid = _uid(e.get("what", {}).get("identifier"))
        elif kind == "Observation":
            _observation(res, out, sys)
    return out


def _observation(res: dict, out: FhirReadback, sys: Systems) -> None:
    code = _local_code(res.get("code"), sys)
    method = _local_code(res.get("method"), sys)
    if method is not None:
        out.used_info_branch = method == "mam-with-infant-data"
    q = res.get("valueQuantity")
    if code == "cp-risk-probability":
        out.risk_probability = FhirCodes.probability(q) if q else None
        for rr in res.get("referenceRange", []):
            if "high" in rr:
                out.threshold = FhirCodes.probability(rr["high"])
    elif code == "gma-classification":
        out.label = _local_code(res.get("valueCodeableConcept"), sys)
        out.notes = [n.get("text", "") for n in res.get("note", [])]
    elif code == "fms-frequency":
        out.fms_frequency = FhirCodes.probability(q) if q else None
    elif code == "fms-category":
        out.fms_category = _local_code(res.get("valueCodeableConcept"), sys)
    elif code == "clip-fms-probability":
        clips = []
        for i, comp in enumerate(res.get("component", [])):
            start = end = None
            for ext in comp.get("extension", []):
                if ext.get("url") == sys.clip_window:
                    start = float(ext["valueRange"]["low"]["value"])
                    end = float(ext["valueRange"]["high"]["value"])
            p = FhirCodes.probability(comp["valueQuantity"])
            clips.append(ClipReadback(i, p, start, end))
        out.clips = clips
