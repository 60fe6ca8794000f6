"""The codes, systems and units of the FHIR output, and what a site may configure.

No LOINC or SNOMED CT code exists for Prechtl's General Movements Assessment or for the MAM
model's outputs, so the concepts are coded in a local code system, ``GMA_SYSTEM``. Every local
namespace below is a ``urn:uuid:`` (FHIR's choice for a system without a web home: globally
unique, owned by nobody else, never resolved); they are fixed for good, since receiving systems
match on them. A site that has its own codes (or, one day, LOINC ones) configures them in a JSON
file (``MAM_FHIR_CODES_FILE``): its codings are placed before the local one in each
CodeableConcept, and the local coding is always kept, so any reader can still find each value.

Local code system ``GMA_SYSTEM`` (``CONCEPTS``):

========================  ==========================================================
code                      meaning
========================  ==========================================================
gma-screening-report      DiagnosticReport.code: the automated GMA screening report
cp-risk-probability       Observation: calibrated P(risk) (absent or sporadic FMs)
gma-classification        Observation: normal / risk / indeterminate
fms-frequency             Observation: share of 9.6 s clips with FMs (P(FMs) > 0.5)
fms-category              Observation: continuous / intermittent / sporadic / absent /
                          indeterminate (Prechtl's categories, ``mam.gma``)
clip-fms-probability      Observation (one component per clip): P(FMs) of each clip
normal, risk,             answers of gma-classification (risk = sporadic or absent FMs)
indeterminate             answer of both gma-classification and fms-category
continuous, intermittent, answers of fms-category
sporadic, absent
mam-with-infant-data,     Observation.method: MAM with the Info branch, or the main branch
mam-without-infant-data   alone (the paper's MAM w/o info)
pose-backend, runtime,    Device.property types
precision
========================  ==========================================================

Site configuration (``MAM_FHIR_CODES_FILE``), e.g.::

    {"unit": "%",
     "codes": {"cp-risk-probability": [{"system": "https://site.example/codes",
                                        "code": "GMA-RISK", "display": "GMA risk"}]}}

``unit`` is UCUM ``%`` (default: 12.34 %, clearer in an EHR's flowsheet) or ``1`` (0.1234).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from mam.errors import InputError

# -- local namespaces (fixed for good) -------------------------------------------------------------
GMA_SYSTEM = "urn:uuid:56b2cb7a-0c30-41e2-9fcd-c46ced14c7b4"
"""Local code system of the GMA concepts above."""
RESULT_ID_SYSTEM = "urn:uuid:d671f6b9-15b4-48a6-b6ad-1f8363154a95"
"""Identifier system of a result: the service's request or task id, the CLI's or batch run's
result id (DiagnosticReport.identifier; each Observation adds its code after a hyphen)."""
WEIGHTS_SHA256_SYSTEM = "urn:uuid:4a50ac69-54ae-4f62-8d08-3329b57a96b2"
"""Identifier system of a model's weights: the SHA-256 of its weights file (Device)."""
MODEL_CONFIGURATION_SYSTEM = "urn:uuid:099e4905-9e39-4072-acd6-90ceb792e083"
"""Identifier system of a model configuration: model digest / pose backend / runtime /
precision (Device; the key a transaction's conditional create matches on)."""
CLIP_WINDOW_EXTENSION = "urn:uuid:7c5aecc3-7cb1-414b-8f82-29d60087a7a9"
"""Extension on a clip component: valueRange, the clip's start and end in seconds from the start
of the recording (absent for ready-made instances, which carry no times)."""
# A stable namespace for the deterministic fullUrls of a result's resources (uuid5).
FULL_URL_NAMESPACE = "3c7f5d0e-8a1b-5c59-9f3e-6a2d4b1c0e77"

# -- external systems ---------------------------------------------------------------------------
UCUM = "http://unitsofmeasure.org"
OBSERVATION_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
DATA_ABSENT_REASON = "http://terminology.hl7.org/CodeSystem/data-absent-reason"
DATA_OPERATION = "http://terminology.hl7.org/CodeSystem/v3-DataOperation"
PARTICIPANT_TYPE = "http://terminology.hl7.org/CodeSystem/provenance-participant-type"
DICOM_UID_SYSTEM = "urn:dicom:uid"  # ImagingStudy identifiers: value "urn:oid:<UID>"
# HL7 AI Transparency on FHIR (http://hl7.org/fhir/uv/aitransparency, STU1 ballot, FHIR 4.0.1).
OBSERVATION_VALUE = "http://terminology.hl7.org/CodeSystem/v3-ObservationValue"
AIAST = {
    "system": OBSERVATION_VALUE,
    "code": "AIAST",
    "display": "Artificial Intelligence asserted",
}
_AIT = "http://hl7.org/fhir/uv/aitransparency"
AI_DEVICE_PROFILE = f"{_AIT}/StructureDefinition/AI-Device"
AI_PROVENANCE_PROFILE = f"{_AIT}/StructureDefinition/AI-Provenance"
AI_KIND_EXTENSION = f"{_AIT}/StructureDefinition/aitransparency.AIKind"
AI_DEVICE_TYPE_SYSTEM = f"{_AIT}/CodeSystem/AIdeviceTypeCS"

CONCEPTS: dict[str, str] = {
    "gma-screening-report": "Automated General Movements Assessment (MAM), decision support",
    "cp-risk-probability": "Probability of cerebral-palsy risk (absent or sporadic fidgety "
    "movements), MAM",
    "gma-classification": "General Movements screening classification, MAM",
    "fms-frequency": "Fidgety movements frequency (share of 9.6 s clips with fidgety movements)",
    "fms-category": "Fidgety movements category (Prechtl)",
    "clip-fms-probability": "Probability of fidgety movements in a 9.6 s clip",
    "normal": "Normal: continuous or intermittent fidgety movements",
    "risk": "At risk: sporadic or absent fidgety movements",
    "indeterminate": "Indeterminate: the model cannot speak for this recording",
    "continuous": "Continuous fidgety movements",
    "intermittent": "Intermittent fidgety movements",
    "sporadic": "Sporadic fidgety movements",
    "absent": "Absent fidgety movements",
    "mam-with-infant-data": "MAM with the Info branch (infant data used)",
    "mam-without-infant-data": "MAM without infant data (main branch alone)",
    "pose-backend": "Pose estimator",
    "runtime": "Inference runtime and device",
    "precision": "Numeric precision",
}
Unit = Literal["%", "1"]
ENV_CODES_FILE = "MAM_FHIR_CODES_FILE"
ENV_UNIT = "MAM_FHIR_UNIT"


class InvalidFhirConfigError(InputError):
    """The site's FHIR code configuration cannot be used."""

    code = "invalid_fhir_config"


def coding(code: str) -> dict:
    """The local coding of a concept."""
    return {"system": GMA_SYSTEM, "code": code, "display": CONCEPTS[code]}


@dataclass(frozen=True)
class FhirCodes:
    """What a site configures: extra codings per local concept and the probability unit.

    Args:
        site: local code -> codings (``system``, ``code``, optional ``display``) to put first.
        unit: UCUM unit of probabilities and the FMs frequency: ``%`` or ``1``.
    """

    site: dict[str, tuple[dict, ...]] = field(default_factory=dict)
    unit: Unit = "%"

    def __post_init__(self) -> None:
        if self.unit not in ("%", "1"):
            raise InvalidFhirConfigError(
                f"the FHIR unit must be '%' or '1'; received {self.unit!r}"
            )
        for key, codings in self.site.items():
            if key not in CONCEPTS:
                raise InvalidFhirConfigError(
                    f"unknown concept {key!r} in the FHIR codes; known: {', '.join(CONCEPTS)}"
                )
            for c in codings:
                if not isinstance(c, dict) or not c.get("system") or not c.get("code"):
                    raise InvalidFhirConfigError(
                        f"FHIR codes for {key!r}: each coding needs a 'system' and a 'code'"
                    )
                if c["system"] == GMA_SYSTEM:
                    raise InvalidFhirConfigError(
                        f"FHIR codes for {key!r}: site codes need their own system"
                    )

    def concept(self, code: str, text: str | None = None) -> dict:
        """CodeableConcept: the site's codings, then the local one."""
        codings = [
            {k: v for k, v in c.items() if k in ("system", "version", "code", "display")}
            for c in self.site.get(code, ())
        ]
        out: dict = {"coding": [*codings, coding(code)]}
        out["text"] = text or CONCEPTS[code]
        return out

    def quantity(self, probability: float) -> dict:
        """A probability or share in the configured UCUM unit."""
        if self.unit == "%":
            value = round(probability * 100.0, 2)
            return {"value": value, "unit": "%", "system": UCUM, "code": "%"}
        return {"value": probability, "unit": "1", "system": UCUM, "code": "1"}

    @staticmethod
    def probability(quantity: dict) -> float:
        """Back from ``quantity`` (either unit), to the 4 decimals of a result."""
        code = quantity.get("code")
        value = float(quantity["value"])
        if code == "%":
            return round(value / 100.0, 4)
        if code == "1":
            return round(value, 4)
        raise ValueError(f"not a probability quantity (UCUM code {code!r})")

    @classmethod
    def load(cls, path: str | os.PathLike | None, unit: str | None = None) -> FhirCodes:
        """From a site's JSON file (see the module docstring); ``unit`` overrides its unit."""
        if path is None:
            return cls(unit=unit or "%")
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise InvalidFhirConfigError(
                f"cannot read the FHIR codes file {path}: {type(e).__name__}"
            ) from None
        if not isinstance(data, dict) or not isinstance(data.get("codes", {}), dict):
            raise InvalidFhirConfigError(f"{path}: expected {{'codes': {{...}}, 'unit': ...}}")
        raw = data.get("codes", {})
        site = {k: tuple(v if isinstance(v, list) else [v]) for k, v in raw.items()}
        return cls(site=site, unit=unit or data.get("unit", "%"))

    @classmethod
    def from_env(cls) -> FhirCodes:
        """``MAM_FHIR_CODES_FILE`` and ``MAM_FHIR_UNIT`` (the CLI and batch runs read them)."""
        return cls.load(os.environ.get(ENV_CODES_FILE) or None, os.environ.get(ENV_UNIT) or None)
