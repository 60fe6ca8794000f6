"""``mam calibrate``: given weights, recalibrated for one source kind on a site's own recordings
with known outcomes, at the operating point the site chooses; the network is not touched."""

from __future__ import annotations

import argparse
from pathlib import Path

from mam.cli import options as O


def _share(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < v <= 1:
        raise argparse.ArgumentTypeError(f"a share in (0, 1] (e.g. 0.95), got {text}")
    return v


def register(sub) -> None:
    s = sub.add_parser(
        "calibrate",
        help="recalibrate weights on a site's labelled recordings at a chosen operating point",
    )
    O.add_verbose(s)
    O.add_weights(s)
    O.add_data(s, "labelled recordings the weights never trained on, in the training layout")
    s.add_argument("--out", type=Path, required=True, help="new weights path (no suffix)")
    target = s.add_mutually_exclusive_group()
    target.add_argument("--target-sensitivity", type=_share, metavar="S",
                        help="the highest threshold catching at least this share of the risk "
                             "infants (default: Youden's J)")  # fmt: skip
    target.add_argument("--target-specificity", type=_share, metavar="S",
                        help="the lowest threshold clearing at least this share of the normal "
                             "infants")  # fmt: skip
    s.add_argument("--kind", choices=["auto", "video", "pose_file"], default="auto",
                   help="source kind to calibrate (auto: the recordings' one)")  # fmt: skip
    s.add_argument("--version", help="version of the new weights (default: OLD+cal.N)")
    s.add_argument("--accept-small-data", action="store_true",
                   help="calibrate on fewer recordings than the minimum; the weights then warn "
                        "in every result")  # fmt: skip
    O.add_pose_backend(s)
    s.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mam.batch.runner import OutputNotWritableError
    from mam.model.weights import load_meta, load_weights, save_weights
    from mam.screening import default_weights
    from mam.training.calibration import OperatingPoint, calibrated_version, records_of_kind
    from mam.training.dataset import load_datasets
    from mam.training.fitting import recalibrate

    weights = Path(args.weights or default_weights()).with_suffix(".json")
    out = Path(args.out).with_suffix("")
    if out.with_suffix(".json").resolve() == weights.resolve():
        raise O.UsageError("--out would overwrite --weights: give the new weights a new name")
    model, meta = load_weights(weights)
    records = load_datasets(args.data, args.pose_backend)
    kind, records, left_out = records_of_kind(records, args.kind)
    if left_out:
        print(f"calibrating the {len(records)} {kind} recordings; {left_out} of another kind "
              "left out (each kind is calibrated on its own: see --kind)")  # fmt: skip
    if meta.domain is not None and kind not in meta.domain.kinds:
        print(f"note: these weights' domain check does not describe {kind} recordings, so "
              "their screening results stay indeterminate")  # fmt: skip
    if args.target_sensitivity is not None:
        target, value = "sensitivity", args.target_sensitivity
    elif args.target_specificity is not None:
        target, value = "specificity", args.target_specificity
    else:
        target, value = "youden", None
    old_version, small_before = meta.version, list(meta.provenance.get("small_data", []))
    # The weights recalibrated from, named before recalibration changes their digest.
    source = {"name": meta.name, "version": old_version, "weights_sha256": load_meta(weights)[2],
              "digest": meta.digest}  # fmt: skip
    meta = recalibrate(model, meta, records, kind, target=target, value=value,
                       accept_small_data=args.accept_small_data)  # fmt: skip
    meta.version = args.version or calibrated_version(old_version)
    meta.provenance.setdefault("recalibrated_from", []).append(source)
    op = OperatingPoint.from_dict(meta.provenance["calibration"]["operating_point"][kind])
    for warning in meta.provenance.get("small_data", []):
        if warning not in small_before:
            print(f"warning: {warning} (--accept-small-data)")
    print(f"operating point ({kind}, {_said(target, value)}): {op.describe()}")
    try:
        path = save_weights(model, meta, out)
    except OSError as e:
        raise OutputNotWritableError(f"cannot write {out}: {e.strerror or e}") from None
    print(f"version {meta.version} (from {old_version})")
    print(f"wrote {path}")
    return 0


def _said(target: str, value: float | None) -> str:
    return "Youden's J" if target == "youden" else f"target {target} {value:g}"
