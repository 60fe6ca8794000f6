"""Typed inputs and outputs at the edges of the library (CLI, service and batch runner share them).

Infant data are validated here; a screening result is what ``mam screen --format json`` prints and
what the service returns.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from mam import DISCLAIMER
from mam.errors import InvalidInfantDataError

# The paper's population: infants 9-20 weeks corrected age (the FMs period).
CORRECTED_AGE_RANGE_WEEKS = (9.0, 20.0)


class InfantData(BaseModel):
    """Sex, gestational age, birth weight and corrected age: the Info branch's inputs.

    Ranges reject impossible values; a corrected age outside 9-20 weeks is allowed but warned
    about in the result (FMs are assessed in that window)."""

    model_config = ConfigDict(extra="forbid")

    sex: Literal["male", "female"] | None = Field(None, description="Infant's sex.")
    gestational_age_weeks: float | None = Field(
        None, ge=22, le=45, description="Gestational age at birth, weeks."
    )
    birth_weight_g: float | None = Field(None, ge=300, le=7000, description="Birth weight, g.")
    corrected_age_weeks: float | None = Field(
        None, ge=0, le=60, description="Age at recording, corrected for prematurity, weeks."
    )

    @model_validator(mode="after")
    def _all_or_none(self) -> InfantData:
        given = {k: v is not None for k, v in self.__dict__.items()}
        if any(given.values()) and not all(given.values()):
            missing = sorted(k for k, g in given.items() if not g)
            raise ValueError(
                "the Info branch needs all four infant fields or none; missing: "
                + ", ".join(missing)
            )
        return self

    @property
    def complete(self) -> bool:
        return self.sex is not None

    def vector(self) -> list[float]:
        """Raw Info-branch input: [sex_male, GA weeks, BW g, corrected age weeks]."""
        return [
            float(self.sex == "male"),
            float(self.gestational_age_weeks),
            float(self.birth_weight_g),
            float(self.corrected_age_weeks),
        ]

    def warnings(self) -> list[str]:
        lo, hi = CORRECTED_AGE_RANGE_WEEKS
        a = self.corrected_age_weeks
        if a is not None and not lo <= a <= hi:
            return [
                f"corrected age {a:g} weeks is outside the {lo:g}-{hi:g} week window in which "
                "fidgety movements are assessed; the result may not be meaningful"
            ]
        return []

    @classmethod
    def parse(cls, **fields) -> InfantData | None:
        """Validate user input, raising the pipeline's typed error; None when nothing is given."""
        if all(v is None for v in fields.values()):
            return None
        try:
            return cls(**fields)
        except ValidationError as e:
            msgs = "; ".join(
                f"{'.'.join(map(str, err['loc'])) or 'infant data'}: {err['msg']}"
                for err in e.errors()
            )
            raise InvalidInfantDataError(f"invalid infant data: {msgs}") from None


class Clip(BaseModel):
    index: int
    start_s: float
    end_s: float
    fms_probability: float = Field(ge=0, le=1, description="P(fidgety movements) of this clip.")
    attention_weight: float = Field(ge=0, le=1, description="Weight in the bag fusion.")


class Classification(BaseModel):
    label: Literal["normal", "risk", "indeterminate"] = Field(
        description="The paper's two classes for a result the model can speak for; "
        "'indeterminate' when it cannot (out of its training domain, poor tracking, no "
        "movement): then see 'reasons', and the probabilities are not to be used."
    )
    threshold: float = Field(description="risk_probability at or above which the label is risk.")
    model_label: Literal["normal", "risk"] = Field(
        description="What risk_probability alone says against the threshold (research use)."
    )
    reasons: list[str] = Field(
        default_factory=list, description="Why the result is indeterminate, in plain words."
    )


class DomainCheck(BaseModel):
    """How far the recording is from what the weights were trained on (``mam.domain``)."""

    in_domain: bool = Field(description="True when the score is at most the threshold.")
    score: float | None = Field(
        None, description="The recording's largest distance over its threshold (None: cannot "
        "be scored, e.g. weights without domain statistics or a kind of input never trained on)."
    )  # fmt: skip
    threshold: float = Field(1.0, description="In domain while score <= threshold.")
    motion_score: float | None = Field(
        None, description="Motion statistics' distance over its threshold (None: tensors only)."
    )
    embedding_score: float | None = Field(
        None, description="Clip embeddings' mean distance over its threshold."
    )
    clip_scores: list[float] = Field(
        default_factory=list, description="Per clip, in clip order: the clip embedding's "
        "distance over the clip threshold (1.0, set at the 99th percentile of held-out clips)."
    )  # fmt: skip
    kind: str = Field(description="video (through a pose backend), pose_file or instances.")
    method: str = ""


class Quality(BaseModel):
    duration_s: float
    frames_total: int
    frames_tracked: int
    tracked_fraction: float
    frames_interpolated: int
    longest_gap_s: float
    mean_confidence: float
    clips_assessed: int
    warnings: list[str] = []


class ModelInfo(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    name: str
    version: str
    digest: str = Field(
        "", description="The model's identity: SHA-256 over the network's tensors and all that "
        "decides a label (calibration, thresholds, domain record, preprocessing); not name, "
        "version or provenance. Empty in results made before it was recorded."
    )  # fmt: skip
    weights_sha256: str = Field(description="SHA-256 of the weights file (integrity check).")
    provenance: str
    runtime: str
    device: str
    precision: str
    pose_backend: str
    used_info_branch: bool
    calibration: str = Field(description="How P(risk) was calibrated; 'none' = uncalibrated score.")


class Assessment(BaseModel):
    """What every result says. Probabilities are calibrated per the model card."""

    model_config = ConfigDict(protected_namespaces=())

    risk_probability: float = Field(ge=0, le=1)
    normal_probability: float = Field(ge=0, le=1)
    classification: Classification
    fms_frequency: float = Field(ge=0, le=1, description="Share of clips with P(FMs) > 0.5.")
    fms_category: Literal["continuous", "intermittent", "sporadic", "absent", "indeterminate"] = (
        Field(description="Prechtl's FMs category from the FMs frequency (mam.gma), or "
              "'indeterminate' when the model cannot speak for the recording.")
    )  # fmt: skip
    probabilities_usable: bool = Field(
        description="False when the model cannot speak for this input (out of domain, poor "
        "tracking, no movement): the probabilities and the FMs frequency are then returned "
        "for research and must not be used."
    )
    domain: DomainCheck


class ScreeningResult(Assessment):
    """One recording's assessment."""

    fms_category_thresholds: dict[str, float]
    clips: list[Clip]
    top_fms_clips: list[Clip] = Field(description="Clips most likely to show FMs, for review.")
    quality: Quality
    infant: InfantData | None
    model: ModelInfo
    timings_s: dict[str, float]
    warnings: list[str]
    disclaimer: str = DISCLAIMER


class InstancesResult(Assessment):
    """The model's answer for ready-made instance tensors (no recording, so no times or
    quality): what the service's tensors-in endpoint and the gRPC model return."""

    fms_probability: list[float] = Field(description="P(FMs) per instance, in input order.")
    attention_weight: list[float] = Field(description="Each instance's weight in the fusion.")
    infant: InfantData | None
    model: ModelInfo
    warnings: list[str]
    disclaimer: str = DISCLAIMER
