"""A screening result as a DICOM Comprehensive SR, for PACS-centred sites (IHE AI Results).

``build_sr`` makes one Comprehensive SR instance (``highdicom``) whose content is a TID 1500
Measurement Report:

* Observation context: the model as a device observer (TID 1004: model name, version,
  manufacturer), derived from the model digest so one model is one observer everywhere.
* Procedure reported: ``(GMA-VIDEO, 99MAM)`` "Automated General Movements Assessment from video".
* Imaging Measurements, one TID 1501 group per subject of measurement, each with the algorithm's
  identification (TID 4019: model name, version, parameters ``model digest ...`` and ``weights
  sha256 ...``) and a tracking identifier:

  - ``recording``: P(risk) and the risk threshold, the FMs frequency, the tracked fraction and
    the duration (TID 300 measurements), the FMs category and whether the recording lies in the
    training domain (qualitative evaluations); it references the source video instance (an IMAGE
    item) when there is one;
  - ``clip N``, one per clip: P(FMs) of the clip, its start and end as time offsets into the
    recording in seconds (measurements, unit ``s``). TID 1501 has no temporal coordinate item
    (TCOORD), and the clip windows are on the 25 fps resampled recording, not on the source
    object's frames: offsets in seconds are what the JSON and FHIR outputs carry too.

* Qualitative Evaluations (TID 1500 row 12, ``(126010, DCM)``): the classification (a CODE:
  ``Normal (17621005, SCT)``, ``Indeterminate (82334004, SCT)`` or ``(RISK, 99MAM)``), each reason
  of an indeterminate result and each warning as TEXT, and the disclaimer (``Comment (121106,
  DCM)``: decision support, not a diagnosis).

As in the FHIR Bundle (``mam.fhir.bundle``), numbers the model must not be used for
(``probabilities_usable`` false) are left out: no P(risk), FMs frequency or per-clip P(FMs), only
the classification and its reasons. The report is PRELIMINARY, PARTIAL and UNVERIFIED: decision
support awaiting a GMA assessor.

Codes are DCM, SCT and UCUM where a code for the concept exists; the rest are of the private
scheme ``99MAM`` (``CODES``), declared in the SR's Coding Scheme Identification Sequence.

The source video. When the caller asks (``read_source``, the CLI's ``--echo-dicom-uids``), the
SR joins the video's study: the same Study Instance UID, the patient and study attributes
(patient name, id, birth date, sex, accession number, study id, date and time, referring
physician) copied from the video's header so that the PACS files it with the study, and the
video's SOP instance as evidence (Current Requested Procedure Evidence) and as the recording
group's source. Otherwise the SR opens a new study with empty patient attributes. None of these
values is ever logged. UIDs are derived from the result id (``uid_for``) and the instance's times
from the result's issue time: writing the same result twice gives the same instance, byte for
byte, which a PACS stores once.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from mam import DISCLAIMER
from mam.errors import DependencyMissingError, InputError

__all__ = ["CODES", "PRIVATE_SCHEME", "SourceVideo", "build_sr", "read_source", "sr_bytes",
           "uid_for", "write_sr"]  # fmt: skip

PRIVATE_SCHEME = "99MAM"
# Private codes, (value, meaning): concepts no DCM, SCT or LOINC code names.
CODES: dict[str, tuple[str, str]] = {
    "procedure": ("GMA-VIDEO", "Automated General Movements Assessment from video"),
    "risk_probability": ("P-RISK", "Probability of the risk class (fidgety movements absent)"),
    "risk_threshold": ("RISK-THRESHOLD", "Risk probability threshold"),
    "fms_frequency": ("FMS-FREQUENCY", "Fidgety movements frequency (share of clips)"),
    "fms_probability": ("P-FMS", "Probability of fidgety movements in the clip"),
    "clip_start": ("CLIP-START", "Clip start time offset"),
    "clip_end": ("CLIP-END", "Clip end time offset"),
    "tracked_fraction": ("TRACKED-FRACTION", "Fraction of frames with the infant tracked"),
    "duration": ("RECORDING-DURATION", "Recording duration"),
    "fms_category": ("FMS-CATEGORY", "Fidgety movements category"),
    "classification": ("GMA-CLASS", "Automated GMA classification"),
    "risk": ("RISK", "At risk (fidgety movements absent)"),
    "reason": ("INDETERMINATE-REASON", "Reason the result is indeterminate"),
    "warning": ("WARNING", "Warning"),
    "domain": ("TRAINING-DOMAIN", "Recording within the model's training domain"),
    "in_domain": ("IN-DOMAIN", "In the training domain"),
    "out_of_domain": ("OUT-OF-DOMAIN", "Out of the training domain"),
    "recording": ("RECORDING", "Whole recording"),
    "clip": ("CLIP", "Recording clip"),
    "continuous": ("FMS-CONTINUOUS", "Continuous fidgety movements"),
    "intermittent": ("FMS-INTERMITTENT", "Intermittent fidgety movements"),
    "sporadic": ("FMS-SPORADIC", "Sporadic fidgety movements"),
    "absent": ("FMS-ABSENT", "Absent fidgety movements"),
}
_UID_NAMESPACE = uuid.UUID("5b0c8f3e-1d2a-5c47-9a61-3f3a2c9d7e10")  # fixed: UIDs stay stable
SERIES_NUMBER = 9901  # high, out of the way of the modality's series
SERIES_DESCRIPTION = "MAM automated GMA (decision support, not a diagnosis)"
MANUFACTURER = "MAM (open source)"
# Attributes read from a source video: the references and what the PACS files the SR by.
_SOURCE_TAGS = (
    "SpecificCharacterSet", "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID",
    "SeriesInstanceUID", "AccessionNumber", "PatientName", "PatientID", "PatientBirthDate",
    "PatientSex", "StudyID", "StudyDate", "StudyTime", "ReferringPhysicianName",
)  # fmt: skip
_PATIENT_STUDY = _SOURCE_TAGS[5:]


def _hd():
    try:
        import highdicom
    except ImportError as e:  # a base dependency; only a broken install gets here
        raise DependencyMissingError(
            "DICOM SR output needs highdicom: pip install highdicom"
        ) from e
    return highdicom


@dataclass(frozen=True)
class SourceVideo:
    """The DICOM video a result was screened from: its header's references and the patient and
    study attributes the SR must share (a pydicom Dataset; never logged)."""

    header: object

    def _get(self, key: str) -> str | None:
        value = self.header.get(key)
        return (str(value).strip() or None) if value is not None else None

    @property
    def study_instance_uid(self) -> str | None:
        return self._get("StudyInstanceUID")

    @property
    def series_instance_uid(self) -> str | None:
        return self._get("SeriesInstanceUID")

    @property
    def sop_instance_uid(self) -> str | None:
        return self._get("SOPInstanceUID")

    @property
    def sop_class_uid(self) -> str | None:
        return self._get("SOPClassUID")

    @property
    def accession_number(self) -> str | None:
        return self._get("AccessionNumber")


def read_source(path: str | os.PathLike) -> SourceVideo | None:
    """The source reference of a DICOM file (None for any other file). A DICOM file without the
    UIDs to reference is an ``InputError``."""
    from mam.dicom_video import _read_header, is_dicom

    p = Path(os.fspath(path))
    if not is_dicom(p):
        return None
    source = SourceVideo(_read_header(p, _SOURCE_TAGS))
    if not all((source.study_instance_uid, source.series_instance_uid,
                source.sop_instance_uid, source.sop_class_uid)):  # fmt: skip
        raise InputError("the DICOM recording lacks a study, series or SOP instance UID to "
                         "reference")  # fmt: skip
    return source


def uid_for(result_id: str, part: str) -> str:
    """A UID (``2.25.`` and a name-based UUID, PS3.5 B.2) derived from the result id: the same
    result gives the same UIDs."""
    return "2.25." + str(uuid.uuid5(_UID_NAMESPACE, f"{result_id}/{part}").int)


def _code(key: str):
    from highdicom.sr import CodedConcept

    value, meaning = CODES[key]
    return CodedConcept(value, PRIVATE_SCHEME, meaning)


def build_sr(result, result_id: str, source: SourceVideo | None = None,
             issued: datetime | None = None):  # fmt: skip
    """The Comprehensive SR (a ``highdicom.sr.ComprehensiveSR``, a pydicom Dataset) of one
    ``ScreeningResult``; see the module docstring."""
    hd = _hd()
    from highdicom.coding_schemes import CodingSchemeIdentificationItem
    from pydicom import Dataset
    from pydicom.sr.codedict import codes

    sr = hd.sr
    issued = (issued or datetime.now(UTC)).astimezone(UTC)
    m = result.model
    algorithm = sr.AlgorithmIdentification(
        name=m.name,
        version=m.version,
        parameters=[f"model digest {m.digest}", f"weights sha256 {m.weights_sha256}",
                    f"pose backend {m.pose_backend}", f"calibration {m.calibration}"],
        manufacturer=MANUFACTURER,
    )  # fmt: skip
    observer = sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=sr.DeviceObserverIdentifyingAttributes(
            uid=uid_for(m.digest or m.weights_sha256, "device"),
            name=m.name,
            manufacturer_name=MANUFACTURER,
            model_name=f"{m.name} {m.version}",
        ),
    )
    no_units, second = codes.UCUM.NoUnits, codes.UCUM.Second

    def num(key: str, value: float, unit=no_units):
        return sr.Measurement(name=_code(key), value=round(float(value), 4), unit=unit)

    usable = result.probabilities_usable
    c, q, d = result.classification, result.quality, result.domain
    measurements = [num("tracked_fraction", q.tracked_fraction), num("duration", q.duration_s,
                                                                        second)]  # fmt: skip
    if usable:
        measurements = [
            num("risk_probability", result.risk_probability),
            num("risk_threshold", c.threshold),
            num("fms_frequency", result.fms_frequency),
            *measurements,
        ]
    category = (codes.SCT.Indeterminate if result.fms_category == "indeterminate"
                else _code(result.fms_category))  # fmt: skip
    evaluations = [
        sr.QualitativeEvaluation(_code("fms_category"), category),
        sr.QualitativeEvaluation(_code("domain"), _code("in_domain" if d.in_domain
                                                        else "out_of_domain")),
    ]  # fmt: skip
    sources = None
    if source is not None:
        sources = [sr.SourceImageForMeasurementGroup(source.sop_class_uid,
                                                     source.sop_instance_uid)]  # fmt: skip
    groups = [
        sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=sr.TrackingIdentifier(
                uid=uid_for(result_id, "recording"), identifier="recording"
            ),  # fmt: skip
            finding_type=_code("recording"),
            algorithm_id=algorithm,
            measurements=measurements,
            qualitative_evaluations=evaluations,
            source_images=sources,
        )
    ]
    if usable:
        for clip in result.clips:
            groups.append(
                sr.MeasurementsAndQualitativeEvaluations(
                    tracking_identifier=sr.TrackingIdentifier(
                        uid=uid_for(result_id, f"clip/{clip.index}"),
                        identifier=f"clip {clip.index}",
                    ),
                    finding_type=_code("clip"),
                    algorithm_id=algorithm,
                    measurements=[
                        num("fms_probability", clip.fms_probability),
                        num("clip_start", clip.start_s, second),
                        num("clip_end", clip.end_s, second),
                    ],
                )
            )
    report = sr.MeasurementReport(
        observation_context=sr.ObservationContext(observer_device_context=observer),
        procedure_reported=_code("procedure"),
        imaging_measurements=groups,
    )
    report[0].ContentSequence.append(_evaluations(result))

    if source is not None:
        evidence = Dataset()
        for key in _SOURCE_TAGS:
            if key in source.header:
                setattr(evidence, key, source.header[key].value)
        for key in _PATIENT_STUDY:  # Type 2: present, perhaps empty
            if key not in evidence:
                setattr(evidence, key, None)
    else:
        evidence = Dataset()  # stands for the study the SR opens; not recorded as evidence
        evidence.StudyInstanceUID = uid_for(result_id, "study")
        evidence.SeriesInstanceUID = uid_for(result_id, "no-series")
        evidence.SOPInstanceUID = uid_for(result_id, "no-instance")
        evidence.SOPClassUID = "1.2.840.10008.5.1.4.1.1.77.1.4.1"  # Video Photographic
        for key in _PATIENT_STUDY:
            setattr(evidence, key, None)
        evidence.StudyDate, evidence.StudyTime = issued.strftime("%Y%m%d"), issued.strftime(
            "%H%M%S")  # fmt: skip
    try:
        doc = sr.ComprehensiveSR(
            evidence=[evidence],
            content=report,
            series_instance_uid=uid_for(result_id, "series"),
            series_number=SERIES_NUMBER,
            sop_instance_uid=uid_for(result_id, "instance"),
            instance_number=1,
            manufacturer=MANUFACTURER,
            manufacturer_model_name=f"{m.name} {m.version}",
            software_versions=m.version,
            series_description=SERIES_DESCRIPTION,
            content_date=issued.date(),
            content_time=issued.time().replace(microsecond=0, tzinfo=None),
            coding_schemes=[
                CodingSchemeIdentificationItem(
                    PRIVATE_SCHEME,
                    name="MAM automated GMA private codes (mam.dicom_sr.CODES)",
                    responsible_organization=MANUFACTURER,
                )
            ],
        )
    except (ValueError, TypeError) as e:  # a source header highdicom refuses (values unechoed)
        raise InputError(
            f"the DICOM recording's patient or study attributes cannot be copied into an SR: "
            f"{type(e).__name__}"
        ) from None
    if source is None and "CurrentRequestedProcedureEvidenceSequence" in doc:
        del doc.CurrentRequestedProcedureEvidenceSequence
    doc.TimezoneOffsetFromUTC = "+0000"  # the content date and time are UTC
    # One SOP instance UID is one content: the instance is made when the result is, not when it
    # is serialised (highdicom stamps "now"), so writing it again gives the same bytes.
    doc.InstanceCreationDate, doc.InstanceCreationTime = doc.ContentDate, doc.ContentTime
    for item in doc.get("ContributingEquipmentSequence", []):
        if item.get("ManufacturerModelName") == "highdicom":
            item.ContributionDateTime = issued.strftime("%Y%m%d%H%M%S+0000")
    return doc


def _evaluations(result):
    """TID 1500 row 12: the classification, its reasons, the warnings and the disclaimer."""
    from highdicom.sr import (
        CodeContentItem,
        CodedConcept,
        ContainerContentItem,
        ContentSequence,
        RelationshipTypeValues,
        TextContentItem,
    )
    from pydicom.sr.codedict import codes

    contains = RelationshipTypeValues.CONTAINS
    label = result.classification.label
    value = {"normal": codes.SCT.Normal, "indeterminate": codes.SCT.Indeterminate}.get(label)
    container = ContainerContentItem(
        name=CodedConcept("126010", "DCM", "Qualitative Evaluations"), relationship_type=contains
    )
    items = [CodeContentItem(_code("classification"), value or _code("risk"), contains)]
    if label == "indeterminate":
        items += [TextContentItem(_code("reason"), t, contains)
                  for t in result.classification.reasons]  # fmt: skip
    items += [TextContentItem(_code("warning"), w, contains) for w in result.warnings]
    items.append(TextContentItem(codes.DCM.Comment, DISCLAIMER, contains))
    container.ContentSequence = ContentSequence(items)
    return container


def sr_bytes(result, result_id: str, source: SourceVideo | None = None,
             issued: datetime | None = None) -> bytes:  # fmt: skip
    """``build_sr`` as a DICOM Part 10 file's bytes."""
    import io

    buf = io.BytesIO()
    build_sr(result, result_id, source, issued).save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def write_sr(
    path: str | os.PathLike,
    result,
    result_id: str,
    source: SourceVideo | None = None,
    issued: datetime | None = None,
) -> Path:
    """``build_sr`` written atomically to ``path`` (a DICOM Part 10 file)."""
    from mam.files import write_atomic

    return write_atomic(Path(path), sr_bytes(result, result_id, source, issued))
