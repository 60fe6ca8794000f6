"""Evaluate MAM the way the paper does, on a dataset folder with known labels
(``mam.training.dataset``).

Metrics (risk is the positive class): AUC, PR-AUC (average precision), accuracy, sensitivity,
specificity, PPV, NPV at the model's threshold, with 95% bootstrap intervals over infants for AUC,
sensitivity and specificity; the FMs-frequency AUC for normal vs risk and continuous vs
intermittent;
Cohen's kappa per video between predicted FMs clips and annotated intervals (paper: 9.6 s clips
every 6 s, a clip is FMs when more than half of it is covered); expected calibration error. Each
is given on every infant (what the model says, abstained or not) and, under ``in_domain``, on the
infants whose result is not indeterminate, beside the abstention rate.
``cross_validate`` repeats train + calibrate + evaluate over stratified folds (paper: 5) and
reports mean and sd; an external set is evaluated with the model trained on all the data.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mam.features import intervals_to_mask
from mam.gma import FMS_CATEGORIES, clip_fms_labels, clip_kappa
from mam.schemas import InfantData
from mam.screening import Screener, ScreeningOptions
from mam.training.calibration import ece_if_calibrated, expected_calibration_error
from mam.training.dataset import DatasetError
from mam.training.train import TrainConfig, TrainRecord

KAPPA_CLIP_STEP = 150  # 6 s at 25 fps (paper, Cohort 2 concordance)
BOOTSTRAP = 1000  # resamples of infants for the 95% intervals
SUMMARY_KEYS = (
    "auc", "pr_auc", "accuracy", "sensitivity", "specificity", "ppv", "npv", "ece",
    "fms_frequency_auc", "fms_frequency_auc_continuous_vs_intermittent", "median_kappa",
    "abstention_rate",
)  # fmt: skip


def _ratio(a: int, b: int) -> float | None:
    return a / b if b else None


def _auc(y, s) -> float | None:
    from sklearn.metrics import roc_auc_score

    y = np.asarray(y, bool)
    return float(roc_auc_score(y, s)) if 0 < y.sum() < len(y) else None


def infant_data(info) -> InfantData | None:
    """A record's raw ``[sex_male, GA weeks, BW g, corrected age weeks]`` as the request type."""
    if info is None:
        return None
    sex, ga, bw, age = info
    return InfantData(
        sex="male" if sex else "female",
        gestational_age_weeks=ga,
        birth_weight_g=bw,
        corrected_age_weeks=age,
    )


def _kappa(rec: TrainRecord, clips, threshold: float) -> float:
    fms = intervals_to_mask(rec.fms_intervals_s, len(rec.joints))
    return clip_kappa(*clip_fms_labels(fms, clips, threshold))


def _metrics(y, p, threshold, freq, cats) -> dict:
    """Discrimination and calibration of one set of infants (risk is the positive class)."""
    from sklearn.metrics import average_precision_score

    y, p, f = np.asarray(y, bool), np.asarray(p, np.float64), np.asarray(freq, np.float64)
    pred = p >= threshold
    tp, tn = int(np.sum(pred & y)), int(np.sum(~pred & ~y))
    fp, fn = int(np.sum(pred & ~y)), int(np.sum(~pred & y))
    c = np.array([x or "" for x in cats])
    ci = (c == "continuous") | (c == "intermittent")
    return {
        "infants": int(len(y)),
        "risk_infants": int(y.sum()),
        "auc": _auc(y, p),
        "pr_auc": float(average_precision_score(y, p)) if 0 < y.sum() < len(y) else None,
        "accuracy": _ratio(tp + tn, len(y)),
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "ppv": _ratio(tp, tp + fp),
        "npv": _ratio(tn, tn + fn),
        "ece": expected_calibration_error(p, y) if len(y) else None,
        # High FMs frequency means normal, so risk is scored by 1 - frequency.
        "fms_frequency_auc": _auc(y, 1 - f),
        "fms_frequency_auc_continuous_vs_intermittent": _auc(c[ci] == "continuous", f[ci]),
    }


def bootstrap_ci(y, p, threshold, n: int = BOOTSTRAP, seed: int = 0, level: float = 0.95) -> dict:
    """Percentile intervals of AUC, sensitivity, specificity and the calibration error,
    resampling infants (the unit of the study) with replacement; resamples lacking a class are
    skipped for the metric that needs it. ``threshold``: one, or each infant's."""
    y, p = np.asarray(y, bool), np.asarray(p, np.float64)
    th = np.broadcast_to(np.asarray(threshold, np.float64), p.shape)
    rng = np.random.default_rng(seed)
    vals: dict[str, list[float]] = {"auc": [], "sensitivity": [], "specificity": [], "ece": []}
    for _ in range(n if len(y) else 0):
        i = rng.integers(0, len(y), len(y))
        yy, pp, tt = y[i], p[i], th[i]
        vals["ece"].append(expected_calibration_error(pp, yy))
        if 0 < yy.sum() < len(yy):
            vals["auc"].append(_auc(yy, pp))
        if yy.any():
            vals["sensitivity"].append(float(np.mean(pp[yy] >= tt[yy])))
        if (~yy).any():
            vals["specificity"].append(float(np.mean(pp[~yy] < tt[~yy])))
    lo, hi = (1 - level) / 2 * 100, (1 + level) / 2 * 100
    return {f"{k}_ci": [float(np.percentile(v, lo)), float(np.percentile(v, hi))] if v else None
            for k, v in vals.items()}  # fmt: skip


def evaluate_records(
    screener: Screener, records: Sequence[TrainRecord], use_info: bool = True
) -> dict:
    """Metrics of one model on labelled records: on every infant (what the model says,
    abstained or not) and on the part it speaks for (in domain, not indeterminate), with the
    abstention rate and bootstrap intervals; plus the per-infant values behind them."""
    risk, p_risk, freq, kappas, cats, abstained, in_domain, reasons, th = ([] for _ in range(9))
    for rec in records:
        r = screener.screen_pose(rec.pose(), infant_data(rec.info) if use_info else None)
        risk.append(rec.group == "risk")
        p_risk.append(r.risk_probability)
        freq.append(r.fms_frequency)
        cats.append(rec.fms_category)
        abstained.append(r.classification.label == "indeterminate")
        in_domain.append(r.domain.in_domain)
        reasons.append(r.classification.reasons)
        th.append(r.classification.threshold)  # the source kind's (mam.model.weights)
        kappas.append(
            _kappa(rec, r.clips, screener.meta.fms_clip_threshold)
            if rec.fms_intervals_s is not None else None
        )  # fmt: skip
    y, p, f = np.array(risk, bool), np.array(p_risk), np.array(freq)
    kept = ~np.array(abstained, bool)
    th = np.array(th, np.float64)
    one = len(set(th.tolist())) == 1
    res = {"use_info": use_info, "threshold": float(th[0]) if one else th.tolist(),
           **_metrics(y, p, th, f, cats)}  # fmt: skip
    res.update(bootstrap_ci(y, p, th))
    res.update(ece_if_calibrated(p, y))
    k_all = [k for k in kappas if k is not None]
    res["median_kappa"] = float(np.median(k_all)) if k_all else None
    res["kappa_videos"] = len(k_all)
    res["abstention_rate"] = float(np.mean(~kept)) if len(kept) else None
    res["out_of_domain_rate"] = float(1 - np.mean(in_domain)) if in_domain else None
    inside = _metrics(y[kept], p[kept], th[kept], f[kept], [c for c, k in zip(cats, kept) if k])
    inside.update(bootstrap_ci(y[kept], p[kept], th[kept]))
    inside.update(ece_if_calibrated(p[kept], y[kept]))
    k_in = [k for k, keep in zip(kappas, kept) if keep and k is not None]
    inside["median_kappa"] = float(np.median(k_in)) if k_in else None
    res["in_domain"] = inside
    res["per_infant"] = {
        "id": [r.infant_id for r in records],
        "risk": y.tolist(),
        "risk_probability": p.tolist(),
        "fms_frequency": f.tolist(),
        "fms_category": cats,
        "kappa": kappas,
        "indeterminate": (~kept).tolist(),
        "in_domain": in_domain,
        "reasons": reasons,
    }
    return res


def evaluate(
    weights, records: Sequence[TrainRecord], use_info: bool = True, abstain: bool = True
) -> dict:
    screener = Screener(weights, ScreeningOptions(clip_step=KAPPA_CLIP_STEP, abstain=abstain))
    res = evaluate_records(screener, records, use_info)
    res["model"] = {"name": screener.meta.name, "version": screener.meta.version}
    return res


def summarise(folds: list[dict]) -> dict:
    """Mean and sd over folds of each summary metric."""
    out = {}
    for k in SUMMARY_KEYS:
        v = np.array([f[k] for f in folds if f.get(k) is not None], np.float64)
        out[k] = float(v.mean()) if v.size else None
        out[f"{k}_sd"] = float(v.std(ddof=1)) if v.size > 1 else None
    return out


def cross_validate(
    records: Sequence[TrainRecord],
    cfg: TrainConfig,
    folds: int = 5,
    use_info: bool = True,
    calibration_fraction: float = 0.2,
    progress: bool | None = None,
) -> dict:
    """Stratified k-fold: train + calibrate on k-1 folds, evaluate on the held-out one."""
    from sklearn.model_selection import StratifiedKFold

    from mam.model.weights import save_weights
    from mam.training.fitting import fit

    groups = np.array([r.group for r in records])
    for g in ("normal", "risk"):
        n = int((groups == g).sum())
        if n < folds:
            raise DatasetError(
                f"{folds}-fold cross-validation needs at least {folds} {g} infants, found {n}: "
                "a fold would have none"
            )
    skf = StratifiedKFold(n_splits=folds, shuffle=True, random_state=cfg.seed)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for k, (tr, te) in enumerate(skf.split(np.zeros(len(groups)), groups)):
            train_recs = [records[i] for i in tr]
            model, meta = fit(
                train_recs, cfg, name=f"fold{k}", version="cv", provenance={},
                categories=[r.fms_category for r in train_recs],
                calibration_fraction=calibration_fraction, progress=progress,
            )  # fmt: skip
            path = save_weights(model, meta, Path(tmp) / f"fold{k}")
            res = evaluate(path, [records[i] for i in te], use_info)
            res["fold"] = k
            results.append(res)
    return {"folds": results, **summarise(results), "k": folds, "use_info": use_info}


def markdown_table(result: dict) -> str:
    """The summary as a Markdown table (mean +- sd over folds when present)."""
    rows = ["| metric | value |", "|---|---|"]
    for k in SUMMARY_KEYS:
        v = result.get(k)
        if v is None:
            continue
        sd = result.get(f"{k}_sd")
        rows.append(f"| {k} | {v:.3f}" + (f" +- {sd:.3f} |" if sd is not None else " |"))
    return "\n".join(rows) + "\n"


def write_report(result: dict, out: str | Path, title: str = "evaluation") -> list[Path]:
    """``out/NAME.json``, ``.md``, ROC curves and FMs-frequency box plots as PNG."""
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / f"{title}.json", out / f"{title}.md"]
    written[0].write_text(json.dumps(result, indent=2) + "\n")
    written[1].write_text(f"# {title}\n\n" + markdown_table(result))
    runs = result.get("folds") or [result]
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    for i, r in enumerate(runs):
        pi = r["per_infant"]
        if 0 < sum(pi["risk"]) < len(pi["risk"]):
            fpr, tpr, _ = roc_curve(pi["risk"], pi["risk_probability"])
            ax.plot(fpr, tpr, label=f"{'fold ' + str(i) if len(runs) > 1 else 'model'}")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title=f"ROC, risk ({title})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    written.append(out / f"{title}_roc.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)
    freq = [f for r in runs for f in r["per_infant"]["fms_frequency"]]
    cats = [c or "unknown" for r in runs for c in r["per_infant"]["fms_category"]]
    labels = [c for c in (*FMS_CATEGORIES, "unknown") if c in cats]
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.boxplot([[f for f, c in zip(freq, cats) if c == lab] for lab in labels])
    ax.set_xticks(range(1, len(labels) + 1), labels)
    ax.set(ylabel="FMs frequency", title=f"FMs frequency by category ({title})")
    fig.tight_layout()
    written.append(out / f"{title}_fms_frequency.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)
    return written
