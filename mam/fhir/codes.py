"""The codes, systems and units of the FHIR output, and what a site may configure.

No LOINC or SNOMED CT code exists for Prechtl's General Movements Assessment or for the MAM
model's outputs, so the concepts are coded in a local code system, ``GMA_SYSTEM``. Every local
namespace (the code system, the identifier systems, the clip extension) is a canonical https URL
under one base, ``CANONICAL_BASE`` (``https://mam-screening.example/fhir``; ``Systems``), and the
CodeSystem and StructureDefinition resources that define them ship with the package
(``mam.fhir.definitions``, ``mam fhir definitions``): a site publishes them on its own server
and, to make the URLs resolve there, sets its base in the codes file (``canonical_base``). The
URLs are stable for a given base; receiving systems match on them. A site that has its own codes
(or, one day, LOINC ones) configures them in a JSON file (``MAM_FHIR_CODES_FILE``): its codings
are placed before the local one in each CodeableConcept, and the local coding is always kept, so
any reader can still find each value.

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

    {"unit": "%", "canonical_base": "https://fhir.site.example/mam",
     "codes": {"cp-risk-probability": [{"system": "https://site.example/codes",
                                        "code": "GMA-RISK", "display": "GMA risk"}]}}

``unit`` is UCUM ``%`` (default: 12.34 %, clearer in an EHR's flowsheet) or ``1`` (0.1234).
``canonical_base`` (an https URL, no trailing slash) replaces ``CANONICAL_BASE`` in every local
system and extension URL (``Systems``); ``owner`` (a reference such as ``Organization/12``)
and ``contact`` (an email address or URL) fill the Device's ``owner`` and ``contact``;
``model_card`` (an https URL) is where the site publishes the model card (Device ``url``).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from mam.errors import InputError

# -- local namespaces (canonical URLs under one base) ---------------------------------------------
CANONICAL_BASE = "https://mam-screening.example/fhir"
"""Default base of every local canonical URL; a site sets its own (``canonical_base``)."""


@dataclass(frozen=True)
class Systems:
    """The local canonical URLs under ``base``: code system, identifier systems, extension."""

    base: str = CANONICAL_BASE

    @property
    def gma(self) -> str:
        """Local code system of the GMA concepts above."""
        return f"{self.base}/CodeSystem/gma"

    @property
    def result_id(self) -> str:
        """Identifier system of a result: the service's request or task id, the CLI's or batch
        run's result id (DiagnosticReport.identifier; each Observation adds its code after a
        hyphen)."""
        return f"{self.base}/NamingSystem/result-id"

    @property
    def weights_sha256(self) -> str:
        """Identifier system of a model's weights: the SHA-256 of its weights file (Device)."""
        return f"{self.base}/NamingSystem/weights-sha256"

    @property
    def model_configuration(self) -> str:
        """Identifier system of a model configuration: model digest / pose backend / runtime /
        precision (Device; the key a transaction's conditional create matches on)."""
        return f"{self.base}/NamingSystem/model-configuration"

    @property
    def content_sha256(self) -> str:
        """Identifier system of a recording's content: the SHA-256 of its bytes (Provenance
        input entity; never a path)."""
        return f"{self.base}/NamingSystem/content-sha256"

    @property
    def clip_window(self) -> str:
        """Extension on a clip component: valueRange, the clip's start and end in seconds from
        the start of the recording (absent for ready-made instances, which carry no times)."""
        return f"{self.base}/StructureDefinition/clip-window"

    @property
    def model_card(self) -> str:
        """Where the model card is published (Device.url and its model-card link)."""
        return f"{self.base}/model-card"


_DEFAULT = Systems()
GMA_SYSTEM = _DEFAULT.gma
RESULT_ID_SYSTEM = _DEFAULT.result_id
WEIGHTS_SHA256_SYSTEM = _DEFAULT.weights_sha256
MODEL_CONFIGURATION_SYSTEM = _DEFAULT.model_configuration
CONTENT_SHA256_SYSTEM = _DEFAULT.content_sha256
CLIP_WINDOW_EXTENSION = _DEFAULT.clip_window
# A stable namespace for the deterministic fullUrls of a result's resources (uuid5).
FULL_URL_NAMESPACE = "3c7f5d0e-8a1b-5c59-9f3e-6a2d4b1c0e77"

# -- external systems ---------------------------------------------------------------------------
UCUM = "http://unitsofmeasure.org"
OBSERVATION_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
DATA_ABSENT_REASON = "http://terminology.hl7.org/CodeSystem/data-absent-reason"
DATA_OPERATION = "http://terminology.hl7.org/CodeSystem/v3-DataOperation"
PARTICIPANT_TYPE = "http://terminology.hl7.org/CodeSystem/provenance-participant-type"
IDENTIFIER_TYPE = "http://terminology.hl7.org/CodeSystem/v2-0203"
REPORT_CATEGORY = {  # diagnostic service section (FHIR's example binding): none closer fits
    "system": "http://terminology.hl7.org/CodeSystem/v2-0074",
    "code": "OTH",
    "display": "Other",
}
MANUFACTURER = "MAM screening project (model of Gao, Yao et al., Nat Commun 2023)"
DICOM_UID_SYSTEM = "urn:dicom:uid"  # ImagingStudy identifiers: value "urn:oid:<UID>"
# HL7 AI Transparency on FHIR (http://hl7.org/fhir/uv/aitransparency), the STU1 ballot package
# hl7.fhir.uv.aitransparency#1.0.0-ballot (FHIR 4.0.1): every code used below is in it. Its
# AI-kind code system holds Deep-Learning-Models; AI-for-Video-Data and Deterministic-AI came
# only in the post-ballot build, so they are not sent.
AIT_PACKAGE = "hl7.fhir.uv.aitransparency"
AIT_VERSION = "1.0.0-ballot"
AI_KINDS = ("Deep-Learning-Models",)
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
        canonical_base: https base of the local canonical URLs (``Systems``).
        owner: the site operating the model, a Reference (``Organization/12``): Device.owner.
        contact: the site's contact for the model, an email address or https URL.
        model_card: where the site publishes the model card (``mam evaluate --model-card``);
            default ``<canonical_base>/model-card``.
    """

    site: dict[str, tuple[dict, ...]] = field(default_factory=dict)
    unit: Unit = "%"
    canonical_base: str = CANONICAL_BASE
    owner: str | None = None
    contact: str | None = None
    model_card: str | None = None

    @property
    def systems(self) -> Systems:
        return Systems(self.canonical_base)

    @property
    def model_card_url(self) -> str:
        return self.model_card or self.systems.model_card

    def __post_init__(self) -> None:
        base = self.canonical_base
        if not isinstance(base, str) or not re.match(r"^https://[^\s?#|]+[^/\s?#|]$", base):
            raise InvalidFhirConfigError(
                "canonical_base must be an https URL without a trailing slash"
            )
        if self.owner is not None and not re.match(r"^Organization/[A-Za-z0-9\-.]{1,64}$",
                                                   str(self.owner)):  # fmt: skip
            raise InvalidFhirConfigError("owner must be a reference such as Organization/12")
        if self.contact is not None and not isinstance(self.contact, str):
            raise InvalidFhirConfigError("contact must be an email address or a URL")
        if self.model_card is not None and not re.match(r"^https://\S+$", str(self.model_card)):
            raise InvalidFhirConfigError("model_card must be an https URL")
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
                if c["system"] in (GMA_SYSTEM, self.systems.gma):
                    raise InvalidFhirConfigError(
                        f"FHIR codes for {key!r}: site codes need their own system"
                    )

    def concept(self, code: str, text: str | None = None) -> dict:
        """CodeableConcept: the site's codings, then the local one."""
        codings = [
            {k: v for k, v in c.items() if k in ("system", "version", "code", "display")}
            for c in self.site.get(code, ())
        ]
        local = {"system": self.systems.gma, "code": code, "display": CONCEPTS[code]}
        out: dict = {"coding": [*codings, local]}
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
        return cls(site=site, unit=unit or data.get("unit", "%"),
                   canonical_base=data.get("canonical_base", CANONICAL_BASE),
                   owner=data.get("owner"), contact=data.get("contact"),
                   model_card=data.get("model_card"))  # fmt: skip

    @classmethod
    def from_env(cls) -> FhirCodes:
        """``MAM_FHIR_CODES_FILE`` and ``MAM_FHIR_UNIT`` (the CLI and batch runs read them)."""
        from mam.settings import current

        s = current()
        return cls.load(s.fhir_codes_file, s.fhir_unit)
