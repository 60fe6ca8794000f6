"""``mam train``, ``mam evaluate`` and ``mam train-lifter``: weights from labelled data, and the
numbers they earn. The work is ``mam.training.pipeline``'s; this parses and prints."""

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
    O.add_accept_small_data(s)
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
    s.add_argument("--out", type=Path, help="write report.html and report.json (the validation "
                   "report), JSON, Markdown and PNG plots here")  # fmt: skip
    s.add_argument(
        "--model-card",
        type=Path,
        help="write a MODEL_CARD.md for --weights (with --folds: for the recipe)",
    )
    s.add_argument("--card-info", type=Path, metavar="FILE",
                   help="the site's JSON (intended_use, population, contacts, site, limitations) "
                   "for the model card and the report")  # fmt: skip
    s.add_argument("--baselines", action="store_true",
                   help="also score FMs frequency alone, EML and the infant data alone on the same "
                   "folds / external set (the paper's Table 2)")  # fmt: skip
    s.add_argument("--format", choices=["text", "json", "markdown"], default="text")
    O.add_pose_backend(s)
    O.add_train_options(s)
    s.set_defaults(func=run_evaluate)

    s = sub.add_parser(
        "train-lifter",
        help="train the VideoPose3D lifter on 3D motion seen through random cameras",
        description="Train the VideoPose3D lifter on 3D motion projected through random cameras "
        "(mam.pose.paper.lifter_train; defaults: LifterConfig's).",
    )
    O.add_verbose(s)
    s.add_argument("--data", required=True, help="npz with clips [N, T, 17, 3] and group:* keys")
    s.add_argument("--out", required=True, help="weights file (.pt); a .json sidecar is written")
    s.add_argument("--channels", type=int, help="convolution channels (256)")
    s.add_argument("--filter-widths",
                   help="comma-separated odd widths (3,3,3,3,3: 243 frames)")  # fmt: skip
    s.add_argument("--dropout", type=float, help="0.25")
    s.add_argument("--minutes", type=float, help="training time budget (6)")
    s.add_argument("--epochs", type=int, help="epoch limit (1000)")
    s.add_argument("--batch-size", type=int, help="clips per step (8)")
    s.add_argument("--lr", type=float, help="1e-3")
    s.add_argument("--noise", type=float, help="2D noise sd, screen units (0.01)")
    s.add_argument("--no-flip", action="store_true", help="no horizontal-flip augmentation")
    s.add_argument("--heldout-groups",
                   help="comma-separated groups to hold out (default: drawn by seed)")  # fmt: skip
    s.add_argument("--num-heldout", type=int, help="groups drawn when not named (2)")
    s.add_argument("--seed", type=int, help="0")
    s.add_argument("--threads", type=int,
                   help="torch CPU threads (1 is fastest on a busy machine)")  # fmt: skip
    s.set_defaults(func=run_train_lifter)


def run_train_lifter(args: argparse.Namespace) -> int:
    from mam.pose.paper.lifter_train import LifterConfig, save_lifter, train_lifter

    given = {
        "channels": args.channels,
        "filter_widths": (tuple(int(w) for w in args.filter_widths.split(","))
                          if args.filter_widths else None),
        "dropout": args.dropout,
        "epochs": args.epochs,
        "minutes": args.minutes,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "noise": args.noise,
        "flip": False if args.no_flip else None,
        "num_heldout": args.num_heldout,
        "heldout_groups": args.heldout_groups.split(",") if args.heldout_groups else None,
        "seed": args.seed,
        "threads": args.threads,
    }  # fmt: skip
    cfg = LifterConfig(**{k: v for k, v in given.items() if v is not None})
    result = train_lifter(args.data, cfg)
    command = "mam train-lifter " + " ".join(args.argv[args.argv.index("train-lifter") + 1 :])
    out = save_lifter(result, args.out, args.data, cfg, command=command)
    m = result.metrics
    print(f"held-out MPJPE {m['heldout_mpjpe']:.4f} (noisy 2D {m['heldout_mpjpe_noisy_2d']:.4f}, "
          f"N-MPJPE {m['heldout_n_mpjpe']:.4f}); untrained {m['untrained_mpjpe']:.4f}; mean pose "
          f"{m['mean_pose_mpjpe']:.4f}; flat 2D {m['flat_2d_mpjpe']:.4f} (units: isotropic "
          f"normalised, torso {m['torso_length']:.2f}); {m['heldout_clips']} held-out clips of "
          f"{len(result.split.heldout_groups)} groups; saved {out}")  # fmt: skip
    return 0


def run_train(args: argparse.Namespace) -> int:
    from mam.training.dataset import check_dataset
    from mam.training.pipeline import train_weights

    cfg = O.train_config(args)
    # Every error and the data's plan before any pose is estimated.
    report = check_dataset(args.data, args.calibration_fraction, args.seed, cfg.use_reference)
    for line in report.lines():
        print(line)
    path, meta = train_weights(report, args.data, args.out, cfg, pose_backend=args.pose_backend,
                               version=args.version, summary=args.provenance,
                               calibration_fraction=args.calibration_fraction,
                               accept_small_data=args.accept_small_data)  # fmt: skip
    for line in _trained_lines(meta):
        print(line)
    print(f"wrote {path}")
    print(_summary(meta, report.plan))
    return 0


def _trained_lines(meta) -> list[str]:
    """What the fit did: the domain check's coverage per kind and the calibration used."""
    p = meta.provenance
    out = [f"domain check, {k}: {v}" for k, v in p["domain"].get("coverage", {}).items()]
    cal = p.get("calibration") or {}
    if cal.get("infants"):
        kinds = ", ".join(f"{k} ({n} infants)" for k, n in cal.get("by_kind", {}).items())
        out.append(
            f"calibration: {cal['method']}, {cal['infants']} infants ({cal['risk_infants']} "
            f"risk); kinds with a fit of their own: {kinds or 'none (the overall fit for all)'}"
        )
    else:
        out.append("calibration: none (no infants held out)")
    return out


def _summary(meta, plan) -> str:
    """One paragraph: what the weights were trained on and what they can and cannot say."""
    p = meta.provenance
    g, h = plan.groups, plan.held_out
    kinds = ", ".join(f"{sum(n.values())} {k}" for k, n in plan.kinds.items())
    cov = p["domain"].get("coverage", {})
    known = [k for k, v in cov.items() if not v.startswith("not described")]
    unknown = [k for k in cov if k not in known]
    small = p.get("small_data") or []
    text = (
        f"Summary: trained on {plan.infants} infants ({g['normal']} normal, {g['risk']} risk; "
        f"{kinds}), {sum(h.values())} of them held out to calibrate ({h['normal']} normal, "
        f"{h['risk']} risk). The domain check describes {', '.join(known) or 'no kind'}"
        + (f"; recordings of kind {', '.join(unknown)} come back indeterminate" if unknown else "")
        + f". Reference branch {p.get('reference_branch', 'on')}. "
    )
    if small:
        text += (f"Below the documented minimum sizes ({'; '.join(small)}): recorded in the "
                 "weights, and every result of them carries a warning.")  # fmt: skip
    else:
        text += "Every documented minimum size is met."
    return text


def run_evaluate(args: argparse.Namespace) -> int:
    import sys

    from mam.training import pipeline
    from mam.training.dataset import check_dataset, load_datasets
    from mam.training.model_card import load_card_info
    from mam.training.report import check_output_paths

    if not args.folds:
        O.reject(args, O.TRAIN_OPTIONS, "training options need --folds (nothing is trained)")
    else:
        O.reject(args, ["weights"], "--folds trains its own weights; --weights is not used")
    if args.baselines and not (args.folds or args.external):
        raise O.UsageError("--baselines needs --folds or --external (the baselines are trained "
                           "on the folds, or on --data for the external set)")  # fmt: skip
    if args.card_info and not (args.model_card or args.out):
        raise O.UsageError("--card-info needs --model-card or --out (it goes into them)")
    # Everything that can be wrong with the outputs, before minutes of work.
    card_info = load_card_info(args.card_info) if args.card_info else None
    check_output_paths(args.out, [args.model_card])
    # Every row and file of both sets checked before any pose is estimated.
    ext_report = check_dataset([args.external]) if args.external else None
    if ext_report:
        ext_report.raise_for_errors()
    records = load_datasets(args.data, args.pose_backend)
    external = (load_datasets([args.external], args.pose_backend, report=ext_report)
                if args.external else None)  # fmt: skip
    res = pipeline.evaluate_sets(
        records, external, weights=args.weights,
        cfg=O.train_config(args) if args.folds else None, folds=args.folds,
        use_info=not args.without_info, abstain=not args.no_abstain,
        calibration_fraction=args.calibration_fraction, baselines=args.baselines, seed=args.seed,
    )  # fmt: skip
    titles = pipeline.set_titles(args.folds)
    for line in pipeline.leakage_notes(res, titles):
        print(line, file=sys.stderr)
    where = dict(data=args.data, external=args.external, folds=args.folds, weights=args.weights,
                 card_info=card_info)  # fmt: skip
    if args.model_card:
        pipeline.write_model_card(args.model_card, res, **where)
    if args.out:
        pipeline.write_reports(args.out, res, records, external, **where)
    _print_evaluation(args.format, res, titles)
    return 0


def _print_evaluation(fmt: str, res: dict, titles: dict) -> None:
    """Text (every scalar, the external set's too, the baselines' table), Markdown or JSON."""
    from mam.training.evaluate import markdown_table

    if fmt == "json":
        print(json.dumps(res, indent=2))
        return
    tables = []
    if res.get("baselines"):
        from mam.training.baselines import paper_table

        which = {"cross-validation": res, "external": res.get("external")}
        for k, rows in res["baselines"].items():
            tables.append((f"baselines, {k} (the paper's Table 2)",
                           paper_table({"MAM": which[k], **rows})))  # fmt: skip
    if fmt == "markdown":
        print(markdown_table(res), end="")
        if "external" in res:
            print(f"\n## {titles['external']}\n\n" + markdown_table(res["external"]), end="")
        for title, table in tables:
            print(f"\n## {title}\n\n```\n{table}```")
        return
    sets = [(None, res)] + ([(titles["external"], res["external"])] if "external" in res else [])
    for title, r in sets:
        if title:
            print(f"\n{title}")
        for k, v in r.items():
            if not isinstance(v, (dict, list)):
                print(f"{k:<48}{round(v, 4) if isinstance(v, float) else v}")
    for title, table in tables:
        print(f"\n{title}\n{table}", end="")
