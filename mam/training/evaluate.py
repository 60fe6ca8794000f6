"""Evaluate MAM the way the paper does, on a dataset folder with known labels
(``mam.training.dataset``).

Metrics (risk is the positive class): AUC, PR-AUC (average precision), accuracy, sensitivity,
specificity, PPV, NPV at the model's threshold and confusion counts; the FMs-frequency AUC for
normal vs risk and continuous vs intermittent;
Cohen's kappa per video between predicted FMs clips and annotated intervals (paper: 9.6 s clips
every 6 s, a clip is FMs when more than half of it is covered); expected calibration error; each
with a 95% bootstrap interval over infants. Each is given on every infant (what the model says,
abstained or not) and, under ``in_domain``, on the infants whose result is not indeterminate,
beside the abstention rate. ``leakage_check`` counts evaluated infants the weights were trained
or calibrated on (by content digest).
``cross_validate`` repeats train + calibrate + evaluate over stratified folds (paper: 5,
``fold_indices``) and reports mean and sd, and the folds' infants pooled; an external set is
evaluated with the model trained on all the data. ``fms_frequency_baseline`` scores FMs
frequency alone (the paper's quantitative GMA) on the same infants.
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
    y, p, f = np.asarray(y, bool), np.asarray(p, np.float64), np.asarray(freq, np.float64)
    pred = p >= threshold
    tp, tn = int(np.sum(pred & y)), int(np.sum(~pred & ~y))
    fp, fn = int(np.sum(pred & ~y)), int(np.sum(~pred & y))
    c = np.array([x or "" for x in cats])
    ci = (c == "continuous") | (c == "intermittent")
    return {
        "infants": int(len(y)),
        "risk_infants": int(y.sum()),
        "confusion": {"tp": tp, "fp": fp, "fn": fn, "tn": tn},
        "auc": _auc(y, p),
        "pr_auc": _ap(y, p),
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


def _ap(y, s) -> float | None:
    from sklearn.metrics import average_precision_score

    return float(average_precision_score(y, s)) if 0 < np.sum(y) < len(y) else None


def _rank_auc(y: np.ndarray, s: np.ndarray) -> float:
    """ROC AUC as the Mann-Whitney statistic (ties count half): sklearn's ``roc_auc_score``
    without its per-call input checks, which dominate a 1000-fold bootstrap."""
    from scipy.stats import rankdata

    n1 = int(y.sum())
    return float((rankdata(s)[y].sum() - n1 * (n1 + 1) / 2) / (n1 * (len(y) - n1)))


def _rank_ap(y: np.ndarray, s: np.ndarray) -> float:
    """Average precision as sklearn's ``average_precision_score`` computes it (precision at
    each distinct score, weighted by the recall it adds), without its per-call checks."""
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.diff(s) != 0, True]  # the last infant of each run of tied scores
    tp = np.cumsum(y)[last]
    seen = np.arange(1, len(y) + 1)[last]
    return float(np.sum(np.diff(np.r_[0.0, tp / tp[-1]]) * tp / seen))


def bootstrap_ci(
    y, p, threshold, n: int = BOOTSTRAP, seed: int = 0, level: float = 0.95, kappa=None,
    freq=None,
) -> dict:  # fmt: skip
    """Percentile intervals of every metric of ``_metrics`` that depends on P(risk) (AUC,
    PR-AUC, accuracy, sensitivity, specificity, PPV, NPV, calibration error), of the median
    per-video kappa (``kappa``: each infant's, None where not annotated) and of the
    FMs-frequency AUC (``freq``), resampling infants (the unit of the study) with replacement;
    resamples lacking what a metric needs are skipped for it. ``threshold``: one, or each
    infant's."""
    y, p = np.asarray(y, bool), np.asarray(p, np.float64)
    th = np.broadcast_to(np.asarray(threshold, np.float64), p.shape)
    k = None if kappa is None else np.array([np.nan if v is None else v for v in kappa], float)
    f = None if freq is None else np.asarray(freq, np.float64)
    rng = np.random.default_rng(seed)
    keys = ["auc", "pr_auc", "accuracy", "sensitivity", "specificity", "ppv", "npv", "ece"]
    keys += [] if k is None else ["median_kappa"]
    keys += [] if f is None else ["fms_frequency_auc"]
    vals: dict[str, list[float]] = {key: [] for key in keys}
    for _ in range(n if len(y) else 0):
        i = rng.integers(0, len(y), len(y))
        yy, pp, tt = y[i], p[i], th[i]
        pred = pp >= tt
        vals["ece"].append(expected_calibration_error(pp, yy))
        vals["accuracy"].append(float(np.mean(pred == yy)))
        if 0 < yy.sum() < len(yy):
            vals["auc"].append(_rank_auc(yy, pp))
            vals["pr_auc"].append(_rank_ap(yy, pp))
            if f is not None:
                vals["fms_frequency_auc"].append(_rank_auc(yy, 1 - f[i]))
        for key, sel, hit in (("sensitivity", yy, pred), ("specificity", ~yy, ~pred),
                              ("ppv", pred, yy), ("npv", ~pred, ~yy)):  # fmt: skip
            if sel.any():
                vals[key].append(float(np.mean(hit[sel])))
        if k is not None and np.isfinite(k[i]).any():
            vals["median_kappa"].append(float(np.nanmedian(k[i])))
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
    info = [(None,) * 4 if r.info is None else tuple(float(v) for v in r.info) for r in records]
    per_infant = {
        "id": [r.infant_id for r in records],
        "risk": risk,
        "risk_probability": [float(v) for v in p_risk],
        "fms_frequency": [float(v) for v in freq],
        "fms_category": cats,
        "kappa": kappas,
        "indeterminate": abstained,
        "in_domain": in_domain,
        "reasons": reasons,
        "threshold": [float(v) for v in th],
        "sex": [None if i[0] is None else ("male" if i[0] else "female") for i in info],
        "gestational_age_weeks": [i[1] for i in info],
        "corrected_age_weeks": [i[3] for i in info],
    }
    return {"use_info": use_info, **metrics_of(per_infant)}


def metrics_of(per_infant: dict) -> dict:
    """Every metric, with its interval, of per-infant results (one model's, or several folds'
    pooled: each infant at its own model's threshold): on every infant, and under
    ``in_domain`` on those not indeterminate; ``per_infant`` is kept in the result."""
    pi = per_infant
    y, p, f = (
        np.array(pi["risk"], bool),
        np.array(pi["risk_probability"]),
        np.array(pi["fms_frequency"]),
    )
    kept = ~np.array(pi["indeterminate"], bool)
    th = np.array(pi["threshold"], np.float64)
    cats, kappas = pi["fms_category"], pi["kappa"]
    one = len(set(th.tolist())) == 1
    res = {"threshold": float(th[0]) if one and len(th) else th.tolist(),
           **_metrics(y, p, th, f, cats)}  # fmt: skip
    res.update(bootstrap_ci(y, p, th, kappa=kappas, freq=f))
    res.update(ece_if_calibrated(p, y))
    k_all = [k for k in kappas if k is not None]
    res["median_kappa"] = float(np.median(k_all)) if k_all else None
    res["kappa_videos"] = len(k_all)
    res["abstention_rate"] = float(np.mean(~kept)) if len(kept) else None
    res["out_of_domain_rate"] = float(1 - np.mean(pi["in_domain"])) if len(kept) else None
    k_in = [k for k, keep in zip(kappas, kept) if keep]
    inside = _metrics(y[kept], p[kept], th[kept], f[kept], [c for c, k in zip(cats, kept) if k])
    inside.update(bootstrap_ci(y[kept], p[kept], th[kept], kappa=k_in, freq=f[kept]))
    inside.update(ece_if_calibrated(p[kept], y[kept]))
    k_in = [k for k in k_in if k is not None]
    inside["median_kappa"] = float(np.median(k_in)) if k_in else None
    res["in_domain"] = inside
    res["per_infant"] = pi
    return res


def leakage_check(meta, records: Sequence[TrainRecord]) -> dict:
    """How many evaluated infants the weights were trained or calibrated on, by the content
    digests the weights record (``provenance.data_digests``); ``checked`` is False for weights
    that record none. Counts only: no infant is named."""
    digests = (meta.provenance or {}).get("data_digests")
    out = {"evaluated": len(records), "checked": isinstance(digests, dict)}
    if not out["checked"]:
        out.update(leaked=False, train=None, calibration=None, message=(
            "the weights record no digests of their training data: whether the evaluated "
            "infants were used to train or calibrate them cannot be checked"))  # fmt: skip
        return out
    mine = [r.digest for r in records]
    for part in ("train", "calibration"):
        seen = set(digests.get(part) or ())
        out[part] = sum(d in seen for d in mine)
    out["leaked"] = bool(out["train"] or out["calibration"])
    out["message"] = (
        f"{out['train']} of the {len(records)} evaluated infants were used to train these "
        f"weights and {out['calibration']} to calibrate them: these numbers are optimistic and "
        "do not measure how the weights do on new infants"
        if out["leaked"]
        else f"none of the {len(records)} evaluated infants was used to train or calibrate "
        "these weights"
    )
    return out


def evaluate(
    weights, records: Sequence[TrainRecord], use_info: bool = True, abstain: bool = True
) -> dict:
    screener = Screener(weights, ScreeningOptions(clip_step=KAPPA_CLIP_STEP, abstain=abstain))
    res = evaluate_records(screener, records, use_info)
    meta = screener.meta
    res["model"] = {
        "name": meta.name,
        "version": meta.version,
        "sha256": screener.weights_sha256,
        "digest": meta.digest,
        "risk_threshold": meta.risk_threshold,
        "fms_category_thresholds": dict(meta.fms_category_thresholds),
    }
    res["leakage"] = leakage_check(meta, records)
    return res


def summarise(folds: list[dict]) -> dict:
    """Mean and sd over folds of each summary metric."""
    out = {}
    for k in SUMMARY_KEYS:
        v = np.array([f[k] for f in folds if f.get(k) is not None], np.float64)
        out[k] = float(v.mean()) if v.size else None
        out[f"{k}_sd"] = float(v.std(ddof=1)) if v.size > 1 else None
    return out


def fold_indices(groups: Sequence[str], folds: int, seed: int) -> list[tuple[np.ndarray, ...]]:
    """``(train, test)`` indices of ``cross_validate``'s stratified folds (shuffled with
    ``seed``, over the groups in record order), so other methods can be scored on the same
    folds; refuses a fold without one of the groups."""
    from sklearn.model_selection import StratifiedKFold

    groups = np.asarray(groups)
    for g in ("normal", "risk"):
        n = int((groups == g).sum())
        if n < folds:
            raise DatasetError(
                f"{folds}-fold cross-validation needs at least {folds} {g} infants, found {n}: "
                "a fold would have none"
            )
    skf = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return list(skf.split(np.zeros(len(groups)), groups))


def pool(folds: list[dict]) -> dict:
    """The folds' per-infant results as one set (each infant at its fold model's threshold),
    with every metric and interval: for curves and subgroups over all infants."""
    keys = folds[0]["per_infant"].keys()
    return metrics_of({k: [v for f in folds for v in f["per_infant"][k]] for k in keys})


def cross_validate(
    records: Sequence[TrainRecord],
    cfg: TrainConfig,
    folds: int = 5,
    use_info: bool = True,
    calibration_fraction: float = 0.2,
    progress: bool | None = None,
    abstain: bool = True,
) -> dict:
    """Stratified k-fold: train + calibrate on k-1 folds, evaluate on the held-out one; mean
    and sd over folds, and under ``pooled`` the folds' infants taken together."""
    from mam.model.weights import save_weights
    from mam.training.fitting import fit

    splits = fold_indices([r.group for r in records], folds, cfg.seed)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for k, (tr, te) in enumerate(splits):
            train_recs = [records[i] for i in tr]
            model, meta = fit(
                train_recs, cfg, name=f"fold{k}", version="cv", provenance={},
                categories=[r.fms_category for r in train_recs],
                calibration_fraction=calibration_fraction, progress=progress,
            )  # fmt: skip
            path = save_weights(model, meta, Path(tmp) / f"fold{k}")
            res = evaluate(path, [records[i] for i in te], use_info, abstain)
            res["fold"] = k
            results.append(res)
    recipe = {
        "k": folds,
        "infants": len(records),
        "risk_infants": sum(r.group == "risk" for r in records),
        "calibration_fraction": calibration_fraction,
        "train_config": cfg.to_dict(),
        "data_declared": {
            "simulated": sum(r.simulated for r in records),
            "recordings": sum(not r.simulated for r in records),
        },
    }
    checks = [r["leakage"] for r in results]
    leakage = {"evaluated": sum(c["evaluated"] for c in checks),
               "checked": all(c["checked"] for c in checks)}  # fmt: skip
    if leakage["checked"]:
        leakage.update({part: sum(c[part] for c in checks) for part in ("train", "calibration")})
        leakage["leaked"] = bool(leakage["train"] or leakage["calibration"])
        leakage["message"] = (
            f"{leakage['train']} infants were in the training and {leakage['calibration']} in "
            "the calibration share of the fold they were evaluated in"
            if leakage["leaked"] else "no fold was evaluated on infants it was fitted on"
        )  # fmt: skip
    else:
        leakage.update(leaked=False, train=None, calibration=None,
                       message=next(c["message"] for c in checks if not c["checked"]))  # fmt: skip
    return {"folds": results, **summarise(results), "k": folds, "use_info": use_info,
            "pooled": pool(results), "recipe": recipe, "leakage": leakage}  # fmt: skip


def fms_frequency_baseline(result: dict) -> dict:
    """The paper's quantitative GMA: risk when MAM's own FMs frequency is below the weights'
    ``intermittent`` cut-off (each fold's own for a cross-validation, recorded in ``cutoff``),
    scored as P(risk) = 1 - frequency for the AUCs; same infants and metrics as MAM's."""

    def one(r: dict) -> dict:
        pi = r["per_infant"]
        cut = ((r.get("model") or {}).get("fms_category_thresholds") or {}).get("intermittent")
        if cut is None:
            return {"cutoff": None, "infants": len(pi["risk"])}
        f = np.array(pi["fms_frequency"], np.float64)
        # 1 - f >= just above 1 - cut  <=>  f < cut: intermittent (>= cut) is normal.
        th = float(np.nextafter(1.0 - cut, 2.0))
        out = {"cutoff": float(cut), **_metrics(pi["risk"], 1 - f, th, f, pi["fms_category"])}
        out["ece"] = None  # 1 - frequency is a score, not a probability
        return out

    if "folds" not in result:
        return one(result)
    folds = [{**one(f), "fold": f.get("fold")} for f in result["folds"]]
    return {"folds": folds, **summarise(folds), "k": len(folds),
            "cutoffs": [f["cutoff"] for f in folds]}  # fmt: skip


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
