"""``mam screen``: one recording (also a DICOM video object) or pose file -> the result, as text,
JSON or an HL7 FHIR R4 Bundle (``--format fhir``, see ``mam.fhir``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mam import DISCLAIMER
from mam.cli import options as O


def register(sub) -> None:
    s = sub.add_parser("screen", help="screen one recording (or a precomputed pose file)")
    O.add_verbose(s)
    s.add_argument("video", nargs="?", type=Path,
                   help="recording (mp4/mov/avi/mkv..., or a DICOM video object)")  # fmt: skip
    s.add_argument("--pose", type=Path, help="precomputed 3D pose .npy [T, 17, 3] at 25 fps")
    O.add_infant(s)
    s.add_argument("--format", choices=["text", "json", "fhir"], default="text",
                   help="output format (fhir: an HL7 FHIR R4 transaction Bundle)")  # fmt: skip
    g = s.add_argument_group("FHIR output (--format fhir)")
    g.add_argument("--fhir-subject", metavar="Patient/ID",
                   help="the patient of the result (a FHIR reference; never logged)")  # fmt: skip
    g.add_argument("--fhir-encounter", metavar="Encounter/ID", help="the encounter, likewise")
    g.add_argument("--echo-dicom-uids", action="store_true",
                   help="put a DICOM recording's study and series UIDs in the Bundle")  # fmt: skip
    O.add_weights(s)
    O.add_pose_backend(s)
    s.add_argument("--no-abstain", action="store_true",
                   help="research use: keep the model's label when the recording is out of its "
                        "training domain (still marked not to be used)")  # fmt: skip
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mam.schemas import InfantData
    from mam.screening import Screener, ScreeningOptions

    if (args.video is None) == (args.pose is None):
        raise O.UsageError("give exactly one of VIDEO or --pose POSE.npy")
    if args.pose is not None:
        O.reject(args, ["pose_backend"], "not used with --pose (the poses are given)")
    if args.format != "fhir":
        O.reject(args, ["fhir_subject", "fhir_encounter", "echo_dicom_uids"],
                 "only with --format fhir")  # fmt: skip
    fhir = _fhir_context(args) if args.format == "fhir" else None  # references checked first
    infant = InfantData.parse(
        sex=args.sex,
        gestational_age_weeks=args.gestational_age_weeks,
        birth_weight_g=args.birth_weight_g,
        corrected_age_weeks=args.corrected_age_weeks,
    )
    screener = Screener(
        args.weights,
        ScreeningOptions(pose_backend=args.pose_backend, abstain=not args.no_abstain),
    )
    if args.pose is not None:
        result = screener.screen_pose_file(args.pose, infant)
    else:
        bar = progress = None
        if sys.stderr.isatty() and not args.quiet:
            from tqdm import tqdm

            bar = tqdm(desc="pose", unit="frame")

            def progress(done: int, total: int) -> None:
                bar.total = total
                bar.n = done
                bar.refresh()

        try:
            result = screener.screen_video(args.video, infant, progress)
        finally:
            if bar is not None:
                bar.close()
    if fhir is not None:
        import json

        from mam.fhir import FhirCodes, build_bundle

        print(json.dumps(build_bundle(result, fhir, FhirCodes.from_env()), indent=2))
    else:
        print(result.model_dump_json(indent=2) if args.format == "json" else text(result))
    return 0


def _fhir_context(args: argparse.Namespace):
    import uuid

    from mam.dicom_video import read_uids
    from mam.fhir import FhirContext

    uids = read_uids(args.video) if args.echo_dicom_uids and args.video is not None else None
    return FhirContext(
        result_id=str(uuid.uuid4()),
        subject=args.fhir_subject,
        encounter=args.fhir_encounter,
        study_instance_uid=getattr(uids, "study_instance_uid", None),
        series_instance_uid=getattr(uids, "series_instance_uid", None),
    )


def _p(x: float) -> str:
    """Three decimals, without printing a tiny probability as if it were zero."""
    return "<0.001" if x < 0.0005 else ">0.999" if x > 0.9995 else f"{x:.3f}"


def text(r) -> str:
    """The result as a clinician reads it: the answer, whether its numbers may be used, why."""
    c, d = r.classification, r.domain
    unusable = "" if r.probabilities_usable else "   [not to be used: see the warning]"
    if c.label == "indeterminate":
        head = "Classification:    INDETERMINATE (the model cannot speak for this recording)"
    else:
        head = (f"Classification:    {c.label.upper()} (P(risk) = {_p(r.risk_probability)}, "
                f"threshold {c.threshold:.2f})")  # fmt: skip
    score = "not scored" if d.score is None else f"score {d.score:.2f}, threshold {d.threshold:.2f}"
    lines = [
        head,
        f"P(risk):           {_p(r.risk_probability)} (model alone: {c.model_label}){unusable}",
        f"FMs frequency:     {r.fms_frequency:.2f} of {len(r.clips)} clips ({r.fms_category})"
        + unusable,
        f"Training domain:   {'in domain' if d.in_domain else 'OUT OF DOMAIN'} ({score})",
        f"Tracking quality:  {r.quality.tracked_fraction:.0%} of {r.quality.duration_s:.0f} s "
        f"tracked, longest gap {r.quality.longest_gap_s:.1f} s",
        "Top FMs clips:     "
        + ", ".join(
            f"{c.start_s:.1f}-{c.end_s:.1f} s (P={c.fms_probability:.2f})" for c in r.top_fms_clips
        ),
        f"Model:             {r.model.name} {r.model.version} ({r.model.provenance}); "
        f"{r.model.runtime}/{r.model.device}; pose {r.model.pose_backend}",
    ]
    lines += [f"Warning:           {w}" for w in r.warnings]
    lines.append(DISCLAIMER)
    return "\n".join(lines)
