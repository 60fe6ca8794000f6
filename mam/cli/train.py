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

    sub.add_parser(
        "train-lifter",
        add_help=False,
        help="train the VideoPose3D lifter on 3D motion seen through random cameras "
        "(`mam train-lifter --help`)",
    )


def run_train(args: argparse.Namespace) -> int:
    from mam.model.weights import save_weights
    from mam.training.dataset import check_dataset, check_trainable, load_datasets
    from mam.training.fitting import fit

    cfg = O.train_config(args)
    # Every error and the data's plan before any pose is estimated.
    report = check_dataset(args.data, args.calibration_fraction, args.seed, cfg.use_reference)
    for line in report.lines():
        print(line)
    report.raise_for_errors()
    check_trainable(report.plan, args.accept_small_data)
    records = load_datasets(args.data, args.pose_backend, report=report)
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
    path = save_weights(model, meta, out)
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
    import tempfile

    from mam.training.dataset import check_dataset, load_datasets
    from mam.training.evaluate import cross_validate, evaluate, fms_frequency_baseline
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
    use_info, abstain = not args.without_info, not args.no_abstain
    cfg = O.train_config(args) if args.folds else None
    with tempfile.TemporaryDirectory(prefix="mam-evaluate-") as tmp:
        if args.folds:
            res = cross_validate(records, cfg, args.folds, use_info, args.calibration_fraction,
                                 abstain=abstain)  # fmt: skip
        else:
            res = evaluate(args.weights, records, use_info, abstain)
        if external is not None:
            from mam.model.weights import save_weights
            from mam.training.fitting import fit

            weights = args.weights
            if args.folds:  # the external set is scored by a model trained on all the data
                model, meta = fit(records, cfg, name="all", version="eval",
                                  provenance={"summary": "all data of the cross-validation"},
                                  categories=[r.fms_category for r in records],
                                  calibration_fraction=args.calibration_fraction)  # fmt: skip
                weights = save_weights(model, meta, Path(tmp) / "all")
            res["external"] = evaluate(weights, external, use_info, abstain)
    if args.baselines:
        from mam.training.baselines import cross_validate_baselines, external_baselines

        res["baselines"] = {}
        if args.folds:
            res["baselines"]["cross-validation"] = {
                "FMs frequency": fms_frequency_baseline(res),
                **cross_validate_baselines(records, args.folds, args.seed),
            }
        if external is not None:
            res["baselines"]["external"] = {
                "FMs frequency": fms_frequency_baseline(res["external"]),
                **external_baselines(records, external, args.seed),
            }
    titles = {"main": f"cross-validation ({args.folds} folds)" if args.folds else "evaluation",
              "external": "external"}  # fmt: skip
    for key, r in (("main", res), ("external", res.get("external"))):
        check = (r or {}).get("leakage")
        if check and check["leaked"]:
            print(f"warning: {titles[key]}: {check['message']}", file=sys.stderr)
        elif check and not check["checked"]:
            print(f"note: {titles[key]}: leakage not checked: {check['message']}",
                  file=sys.stderr)  # fmt: skip
    if args.model_card:
        _write_card(args, res, card_info)
    if args.out:
        _write_reports(args, res, records, external, titles, card_info)
    _print_evaluation(args.format, res, titles)
    return 0


def _write_card(args: argparse.Namespace, res: dict, card_info: dict | None) -> None:
    """The card of the evaluated weights, or with --folds of the cross-validated recipe."""
    from mam.model.weights import load_meta
    from mam.screening import default_weights
    from mam.training.model_card import render

    data = ", ".join(f"`{d}`" for d in args.data)
    cols = {("cross-validation" if args.folds else data): res}
    if "external" in res:
        cols[f"external `{args.external}`"] = res["external"]
    if args.folds:
        card = render(None, cols, card_info=card_info, recipe=res["recipe"])
    else:
        meta, _, _ = load_meta(args.weights or default_weights())
        card = render(meta, cols, card_info=card_info)
    args.model_card.write_text(card)


def _write_reports(args, res: dict, records, external, titles: dict, card_info) -> None:
    """report.html and report.json, and the JSON, Markdown and PNGs of each set."""
    from mam.screening import default_weights
    from mam.training.evaluate import write_report
    from mam.training.report import build_report, data_identity, write_validation_report

    write_report(res, args.out)
    if "external" in res:
        write_report(res["external"], args.out, "external")
    if args.folds:
        model = {"title": f"the mam train recipe, {args.folds}-fold cross-validated",
                 "evaluated": f"{args.folds} models, one per fold (none of them shipped)",
                 "train_config": res["recipe"]["train_config"]}  # fmt: skip
        if "external" in res:
            m = res["external"]["model"]
            model["external_set_scored_by"] = (f"a model trained on all the data, digest "
                                               f"{m.get('digest') or m['sha256']}")  # fmt: skip
    else:
        m = res["model"]
        model = {"title": f"{m['name']} {m['version']}", "name": m["name"],
                 "version": m["version"], "digest": m.get("digest"), "sha256": m["sha256"],
                 "weights": str(args.weights or default_weights())}  # fmt: skip
    data = {titles["main"]: data_identity(records, args.data)}
    sets = {titles["main"]: res}
    if external is not None:
        data[titles["external"]] = data_identity(external, [args.external])
        sets[titles["external"]] = res["external"]
    baselines = None
    if res.get("baselines"):
        which = {"cross-validation": res, "external": res.get("external")}
        baselines = {titles["main" if k == "cross-validation" else "external"]:
                     {"MAM": which[k], **rows} for k, rows in res["baselines"].items()}  # fmt: skip
    report = build_report(sets, model, data, baselines, site=card_info)
    write_validation_report(report, args.out)


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
