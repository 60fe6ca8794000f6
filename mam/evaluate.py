"""Evaluate weights on a dataset folder with known labels (the layout of ``mam.dataset``).

Reports the paper's metrics: AUC, accuracy, sensitivity, specificity, PPV, NPV at the model's
threshold (risk is the positive class), the FMs-frequency AUC, and Cohen's kappa per video between
predicted FMs clips and annotated intervals (paper: 9.6 s clips every 6 s, a clip is FMs when
more than half of it is covered). Cross-validation and calibration build on this (issue 3).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mam.dataset import load_dataset
from mam.pose import PoseSequence
from mam.schemas import InfantData
from mam.screening import Screener, ScreeningOptions
from mam.skeleton import FPS

KAPPA_CLIP_STEP = 150  # 6 s at 25 fps (paper, Cohort 2 concordance)


def _binary_metrics(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, float]:
    pred = p >= threshold
    tp, tn = int(np.sum(pred & y)), int(np.sum(~pred & ~y))
    fp, fn = int(np.sum(pred & ~y)), int(np.sum(~pred & y))

    def ratio(a: int, b: int) -> float | None:
        return a / b if b else None

    return {
        "accuracy": ratio(tp + tn, len(y)),
        "sensitivity": ratio(tp, tp + fn),
        "specificity": ratio(tn, tn + fp),
        "ppv": ratio(tp, tp + fp),
        "npv": ratio(tn, tn + fn),
    }


def evaluate(weights: str | Path | None, data: str | Path, use_info: bool = True) -> dict:
    """Metrics of ``weights`` on the labelled dataset ``data``."""
    from sklearn.metrics import cohen_kappa_score, roc_auc_score

    records = load_dataset(data)
    screener = Screener(weights, ScreeningOptions(clip_step=KAPPA_CLIP_STEP))
    y, p, freq, kappas = [], [], [], []
    for rec in records:
        seq = PoseSequence(rec.joints, np.isfinite(rec.joints[..., 0]).astype(np.float32))
        infant = None
        if use_info and rec.info is not None:
            sex, ga, bw, age = rec.info
            infant = InfantData(
                sex="male" if sex else "female",
                gestational_age_weeks=ga,
                birth_weight_g=bw,
                corrected_age_weeks=age,
            )
        r = screener.screen_pose(seq, infant)
        y.append(rec.group == "risk")
        p.append(r.risk_probability)
        freq.append(r.fms_frequency)
        if rec.fms_intervals_s is not None:
            fms = np.zeros(len(rec.joints), bool)
            for a, b in rec.fms_intervals_s:
                fms[int(round(a * FPS)) : int(round(b * FPS))] = True
            spans = [(round(c.start_s * FPS), round(c.end_s * FPS)) for c in r.clips]
            truth = [fms[a:b].mean() > 0.5 for a, b in spans]
            pred = [c.fms_probability > screener.meta.fms_clip_threshold for c in r.clips]
            if len(set(truth)) > 1 or len(set(pred)) > 1:
                kappas.append(float(cohen_kappa_score(truth, pred)))
            else:  # both constant: perfect agreement if equal (kappa undefined)
                kappas.append(1.0 if truth == pred else 0.0)
    y_arr, p_arr = np.array(y), np.array(p)
    return {
        "infants": len(records),
        "risk_infants": int(y_arr.sum()),
        "use_info": use_info,
        "auc": float(roc_auc_score(y_arr, p_arr)),
        "threshold": screener.meta.risk_threshold,
        **_binary_metrics(y_arr, p_arr, screener.meta.risk_threshold),
        # High FMs frequency means normal, so risk is scored by 1 - frequency.
        "fms_frequency_auc": float(roc_auc_score(y_arr, 1 - np.array(freq))),
        "median_kappa": float(np.median(kappas)) if kappas else None,
        "kappa_videos": len(kappas),
        "model": {"name": screener.meta.name, "version": screener.meta.version},
    }
