"""The FHIR conformance resources that define the project's local URLs, for a site to publish.

A receiving system or a validator that meets ``https://<base>/CodeSystem/gma`` in a result needs
its definition: ``definitions`` returns the CodeSystem of the GMA concepts
(``mam.fhir.codes.CONCEPTS``), the StructureDefinition of the clip-window extension, and one
NamingSystem per identifier system (result id, weights SHA-256, model configuration, content
SHA-256), all FHIR R4 (4.0.1), under the site's ``canonical_base`` (``FhirCodes``). ``mam fhir
definitions`` prints them: a ``collection`` Bundle (``--format json``) or one resource per line
(``--format ndjson``), ready to ``PUT`` on the site's terminology or FHIR server.
"""

from __future__ import annotations

from mam import __version__
from mam.fhir import codes as C
from mam.fhir.codes import FhirCodes

__all__ = ["definitions", "definitions_bundle"]

_PUBLISHER = C.MANUFACTURER
_DATE = "2026-12-07"  # when these definitions last changed (not when they are printed)


def _common(kind: str, rid: str, name: str, title: str, description: str) -> dict:
    return {
        "resourceType": kind,
        "id": rid,
        "name": name,
        "title": title,
        "status": "active",
        "experimental": False,
        "date": _DATE,
        "publisher": _PUBLISHER,
        "description": description,
    }


def code_system(codes: FhirCodes) -> dict:
    """The local code system of the GMA concepts and the Device property types."""
    out = _common(
        "CodeSystem", "gma", "MamGmaCodes", "MAM General Movements Assessment codes",
        "Concepts of the automated General Movements Assessment (MAM): report, observations, "
        "their answers, methods and Device property types. No LOINC or SNOMED CT codes exist "
        "for them.",
    )  # fmt: skip
    out["url"] = codes.systems.gma
    out["version"] = __version__
    out["caseSensitive"] = True
    out["content"] = "complete"
    out["count"] = len(C.CONCEPTS)
    out["concept"] = [{"code": k, "display": v} for k, v in C.CONCEPTS.items()]
    return out


def clip_window_extension(codes: FhirCodes) -> dict:
    """The extension on a clip component: the clip's start and end in seconds (a Range)."""
    url = codes.systems.clip_window
    out = _common(
        "StructureDefinition", "clip-window", "ClipWindow", "Clip time window",
        "Start and end, in seconds from the start of the recording, of the 9.6 s clip whose "
        "P(fidgety movements) an Observation component holds.",
    )  # fmt: skip
    out.update({
        "url": url,
        "version": __version__,
        "fhirVersion": "4.0.1",
        "kind": "complex-type",
        "abstract": False,
        "context": [{"type": "element", "expression": "Observation.component"}],
        "type": "Extension",
        "baseDefinition": "http://hl7.org/fhir/StructureDefinition/Extension",
        "derivation": "constraint",
        "differential": {"element": [
            {"id": "Extension", "path": "Extension", "short": "Clip time window",
             "definition": out["description"], "min": 0, "max": "1"},
            {"id": "Extension.extension", "path": "Extension.extension", "max": "0"},
            {"id": "Extension.url", "path": "Extension.url", "fixedUri": url},
            {"id": "Extension.value[x]", "path": "Extension.value[x]", "min": 1,
             "type": [{"code": "Range"}]},
        ]},
    })  # fmt: skip
    return out


_NAMING = {
    "result-id": ("result_id", "MamResultId", "MAM result id",
                  "A screening result's id (service request or task id, CLI or batch result "
                  "id); an Observation's adds its code after a hyphen."),
    "weights-sha256": ("weights_sha256", "MamWeightsSha256", "MAM weights SHA-256",
                       "SHA-256 (hex) of a model's weights file."),
    "model-configuration": ("model_configuration", "MamModelConfiguration",
                            "MAM model configuration",
                            "Model digest / pose backend / runtime / precision of a Device."),
    "content-sha256": ("content_sha256", "MamContentSha256", "Screened content SHA-256",
                       "SHA-256 (hex) of a screened file's bytes."),
}  # fmt: skip


def naming_systems(codes: FhirCodes) -> list[dict]:
    """One NamingSystem per local identifier system."""
    out = []
    for rid, (attr, name, title, description) in _NAMING.items():
        ns = _common("NamingSystem", rid, name, title, description)
        for k in ("title", "experimental"):  # not R4 NamingSystem elements
            ns.pop(k)
        ns["kind"] = "identifier"
        ns["uniqueId"] = [{"type": "uri", "value": getattr(codes.systems, attr),
                           "preferred": True}]  # fmt: skip
        out.append(ns)
    return out


def definitions(codes: FhirCodes | None = None) -> list[dict]:
    """Every conformance resource behind the local URLs, under ``codes.canonical_base``."""
    codes = codes or FhirCodes()
    return [code_system(codes), clip_window_extension(codes), *naming_systems(codes)]


def definitions_bundle(codes: FhirCodes | None = None) -> dict:
    """``definitions`` as a ``collection`` Bundle (fullUrl: each resource's canonical)."""
    codes = codes or FhirCodes()
    entries = []
    for r in definitions(codes):
        url = r.get("url") or f"{codes.canonical_base}/{r['resourceType']}/{r['id']}"
        entries.append({"fullUrl": url, "resource": r})
    return {"resourceType": "Bundle", "type": "collection", "entry": entries}
