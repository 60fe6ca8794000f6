"""What ``mam train`` and ``mam evaluate`` do, as library calls: checked data in, weights or
measured numbers and their reports out. The CLI parses options and prints; this does the work.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

from mam.training.dataset import DatasetReport, check_trainable, load_datasets
from mam.training.train import TrainConfig, TrainRecord


def train_weights(
    report: DatasetReport,
    data: Sequence[Path],
    out: Path,
    cfg: TrainConfig,
    *,
    pose_backend: str,
    version: str,
    summary: str,
    calibration_fraction: float,
    accept_small_data: bool = False,
) -> tuple[Path, object]:
    """Train, calibrate and save weights ``out`` (``.json`` + per-epoch ``.log.csv``) on the
    folders ``report`` checked; ``(weights path, WeightsMeta)``. Raises the report's errors and
    ``insufficient_data`` below the minimum sizes unless ``accept_small_data``."""
    from mam.model.weights import save_weights
    from mam.training.fitting import fit

    report.raise_for_errors()
    check_trainable(report.plan, accept_small_data)
    records = load_datasets(data, pose_backend, report=report)
    out = Path(out)
    model, meta = fit(
        records,
        cfg,
        name=out.name,
        version=version,
        provenance={"summary": summary, "data": [str(d) for d in data], "infants": len(records)},
        categories=[r.fms_category for r in records],
        calibration_fraction=calibration_fraction,
        log_csv=out.with_suffix(".log.csv"),
    )
    return save_weights(model, meta, out), meta


def set_titles(folds: int) -> dict[str, str]:
    """The names of the main and the external set in reports and printed output."""
    return {"main": f"cross-validation ({folds} folds)" if folds else "evaluation",
            "external": "external"}  # fmt: skip


def evaluate_sets(
    records: Sequence[TrainRecord],
    external: Sequence[TrainRecord] | None,
    *,
    weights: Path | None = None,
    cfg: TrainConfig | None = None,
    folds: int = 0,
    use_info: bool = True,
    abstain: bool = True,
    calibration_fraction: float = 0.2,
    baselines: bool = False,
    seed: int = 0,
) -> dict:
    """``mam evaluate``'s result: ``weights`` (or with ``folds``, ``cfg`` cross-validated) on
    ``records``; on ``external`` too, with ``folds`` scored by a model trained on all of
    ``records`` (in a temporary folder, deleted after); with ``baselines`` the paper's Table 2
    rows on the same folds / external set."""
    from mam.training.evaluate import cross_validate, evaluate, fms_frequency_baseline

    if folds:
        res = cross_validate(records, cfg, folds, use_info, calibration_fraction, abstain=abstain)
    else:
        res = evaluate(weights, records, use_info, abstain)
    if external is not None:
        if folds:  # the external set is scored by a model trained on all the data
            from mam.model.weights import save_weights
            from mam.training.fitting import fit

            model, meta = fit(records, cfg, name="all", version="eval",
                              provenance={"summary": "all data of the cross-validation"},
                              categories=[r.fms_category for r in records],
                              calibration_fraction=calibration_fraction)  # fmt: skip
            with tempfile.TemporaryDirectory(prefix="mam-evaluate-") as tmp:
                path = save_weights(model, meta, Path(tmp) / "all")
                res["external"] = evaluate(path, external, use_info, abstain)
        else:
            res["external"] = evaluate(weights, external, use_info, abstain)
    if baselines:
        from mam.training.baselines import cross_validate_baselines, external_baselines

        res["baselines"] = {}
        if folds:
            res["baselines"]["cross-validation"] = {
                "FMs frequency": fms_frequency_baseline(res),
                **cross_validate_baselines(records, folds, seed),
            }
        if external is not None:
            res["baselines"]["external"] = {
                "FMs frequency": fms_frequency_baseline(res["external"]),
                **external_baselines(records, external, seed),
            }
    return res


def leakage_notes(res: dict, titles: dict[str, str]) -> list[str]:
    """A warning per set whose infants the weights trained on, a note per set not checked."""
    out = []
    for key, r in (("main", res), ("external", res.get("external"))):
        check = (r or {}).get("leakage")
        if check and check["leaked"]:
            out.append(f"warning: {titles[key]}: {check['message']}")
        elif check and not check["checked"]:
            out.append(f"note: {titles[key]}: leakage not checked: {check['message']}")
    return out


def write_model_card(
    path: Path,
    res: dict,
    *,
    data: Sequence[Path],
    external: Path | None = None,
    folds: int = 0,
    weights: Path | None = None,
    card_info: dict | None = None,
) -> None:
    """The card of the evaluated weights, or with ``folds`` of the cross-validated recipe."""
    from mam.files import write_atomic
    from mam.model.weights import load_meta
    from mam.screening import default_weights
    from mam.training.model_card import render

    names = ", ".join(f"`{d}`" for d in data)
    cols = {("cross-validation" if folds else names): res}
    if "external" in res:
        cols[f"external `{external}`"] = res["external"]
    if folds:
        card = render(None, cols, card_info=card_info, recipe=res["recipe"])
    else:
        meta, _, _ = load_meta(weights or default_weights())
        card = render(meta, cols, card_info=card_info)
    write_atomic(Path(path), card.encode())


def write_reports(
    out: Path,
    res: dict,
    records: Sequence[TrainRecord],
    external_records: Sequence[TrainRecord] | None,
    *,
    data: Sequence[Path],
    external: Path | None = None,
    folds: int = 0,
    weights: Path | None = None,
    card_info: dict | None = None,
) -> None:
    """report.html and report.json, and the JSON, Markdown and PNGs of each set, in ``out``."""
    from mam.screening import default_weights
    from mam.training.evaluate import write_report
    from mam.training.report import build_report, data_identity, write_validation_report

    titles = set_titles(folds)
    write_report(res, out)
    if "external" in res:
        write_report(res["external"], out, "external")
    if folds:
        model = {"title": f"the mam train recipe, {folds}-fold cross-validated",
                 "evaluated": f"{folds} models, one per fold (none of them shipped)",
                 "train_config": res["recipe"]["train_config"]}  # fmt: skip
        if "external" in res:
            m = res["external"]["model"]
            model["external_set_scored_by"] = (f"a model trained on all the data, digest "
                                               f"{m.get('digest') or m['sha256']}")  # fmt: skip
    else:
        m = res["model"]
        model = {"title": f"{m['name']} {m['version']}", "name": m["name"],
                 "version": m["version"], "digest": m.get("digest"), "sha256": m["sha256"],
                 "weights": str(weights or default_weights())}  # fmt: skip
    identities = {titles["main"]: data_identity(records, data)}
    sets = {titles["main"]: res}
    if external_records is not None:
        identities[titles["external"]] = data_identity(external_records, [external])
        sets[titles["external"]] = res["external"]
    baselines = None
    if res.get("baselines"):
        which = {"cross-validation": res, "external": res.get("external")}
        baselines = {titles["main" if k == "cross-validation" else "external"]:
                     {"MAM": which[k], **rows} for k, rows in res["baselines"].items()}  # fmt: skip
    report = build_report(sets, model, identities, baselines, site=card_info)
    write_validation_report(report, out)
