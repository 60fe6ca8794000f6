"""``mam train``, ``mam evaluate`` and ``mam train-lifter``: weights from labelled data, and the
numbers they earn."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mam.cli import options as O


def register(sub) -> None:
    s = sub.add_parser("train", help="train + calibrate MAM on dataset folder(s)")
    O.add_verbose(s)
    O.add_data(s)
    s.add_argument("--out", type=Path, required=True, help="output weights path (no suffix)")
    O.add_pose_backend(s)
    O.add_train_options(s)
    s.add_argument("--version", default="0.1.0", help="model version to record")
    s.add_argument("--provenance", default="trained by mam train", help="one-line provenance")
    s.set_defaults(func=run_train)

    s = sub.add_parser("evaluate", help="metrics on a labelled dataset (or k-fold CV)")
    O.add_verbose(s)
    O.add_data(s)
    O.add_weights(s)
    s.add_argument("--folds", type=int, default=0, help="k-fold CV, training each fold (paper 5)")
    s.add_argument("--external", type=Path, help="a separate labelled set to evaluate too")
    s.add_argument("--without-info", action="store_true", help="ablation: MAM w/o info")
    s.add_argument("--no-abstain", action="store_true",
                   help="score every infant with the model's label (research)")  # fmt: skip
    s.add_argument("--out", type=Path, help="write JSON, Markdown and PNG plots here")
    s.add_argument("--model-card", type=Path, help="write a MODEL_CARD.md for --weights")
    s.add_argument("--format", choices=["text", "json", "markdown"], default="text")
    O.add_pose_backend(s)
    O.add_train_options(s)
    s.set_defaults(func=run_evaluate)

    sub.add_parser(
        "train-lifter",
        add_help=False,
        help="train the VideoPose3D lifter on 3D motion seen through random cameras "
        "(`mam train-lifter --help`)",
    )


def run_train(args: argparse.Namespace) -> int:
    from mam.model.weights import save_weights
    from mam.training.dataset import load_datasets
    from mam.training.fitting import fit

    cfg = O.train_config(args)
    records = load_datasets(args.data, args.pose_backend)
    out = Path(args.out)
    model, meta = fit(
        records,
        cfg,
        name=out.name,
        version=args.version,
        provenance={
            "summary": args.provenance,
            "data": [str(d) for d in args.data],
            "infants": len(records),
        },  # fmt: skip
        categories=[r.fms_category for r in records],
        calibration_fraction=args.calibration_fraction,
        log_csv=out.with_suffix(".log.csv"),
    )
    print(f"wrote {save_weights(model, meta, out)}")
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    from mam.training.dataset import load_datasets
    from mam.training.evaluate import cross_validate, evaluate, markdown_table, write_report

    if not args.folds:
        O.reject(args, O.TRAIN_OPTIONS, "training options need --folds (nothing is trained)")
    else:
        O.reject(args, ["weights"], "--folds trains its own weights; --weights is not used")
    records = load_datasets(args.data, args.pose_backend)
    use_info, abstain = not args.without_info, not args.no_abstain
    if args.folds:
        res = cross_validate(records, O.train_config(args), args.folds, use_info,
                             args.calibration_fraction)  # fmt: skip
    else:
        res = evaluate(args.weights, records, use_info, abstain)
    if args.external:
        from mam.model.weights import save_weights
        from mam.training.fitting import fit

        weights = args.weights
        if args.folds:  # the external set is scored by a model trained on all the data
            import tempfile

            model, meta = fit(records, O.train_config(args), name="all", version="eval",
                              provenance={}, categories=[r.fms_category for r in records],
                              calibration_fraction=args.calibration_fraction)  # fmt: skip
            weights = save_weights(model, meta, Path(tempfile.mkdtemp()) / "all")
        external = load_datasets([args.external], args.pose_backend)
        res["external"] = evaluate(weights, external, use_info, abstain)
    if args.model_card:
        from mam.model.weights import load_meta
        from mam.screening import default_weights
        from mam.training.model_card import render

        meta, _, _ = load_meta(args.weights or default_weights())
        data = ", ".join(f"`{d}`" for d in args.data)
        cols = {("cross-validation" if args.folds else data): res}
        if "external" in res:
            cols[f"external `{args.external}`"] = res["external"]
        args.model_card.write_text(render(meta, cols))
    if args.out:
        write_report(res, args.out)
        if "external" in res:
            write_report(res["external"], args.out, "external")
    if args.format == "json":
        print(json.dumps(res, indent=2))
    elif args.format == "markdown":
        print(markdown_table(res), end="")
    else:
        for k, v in res.items():
            if not isinstance(v, (dict, list)):
                print(f"{k:<48}{round(v, 4) if isinstance(v, float) else v}")
    return 0
