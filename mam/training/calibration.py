"""Calibration of P(risk) and the decision thresholds, fitted on infants held out of training.

Method: Platt scaling, a logistic regression on the branches' normal log-odds: on the bag's alone
(for requests without infant data) and on the bag's and the Info branch's as two features (so the
held-out data weigh the Info branch rather than a fixed equal-weight sum). Without infant data it
is monotone, so it keeps the ranking (AUC) and only fixes the scale; with tens of infants it is
far less prone to overfit than isotonic regression. The risk threshold is Youden's J on the
calibrated P(risk); FMs-frequency category cut-offs are Youden's J between adjacent categories.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mam.model.weights import Calibration, KindCalibration

# Held-out infants of one source kind (mam.domain.kind_of) needed for a calibration of its own;
# with fewer, a 3-parameter Platt fit overfits (19 held-out videos: ECE 0.148 on the external
# set against 0.087 with the overall fit, issue 14).
MIN_KIND_INFANTS = 40


def fit_platt(
    z_bag: Sequence[float], normal: Sequence[bool], z_info: Sequence[float] | None = None
) -> Calibration:
    """P(normal) = sigmoid(a * z_bag [+ c * z_info] + b) by (lightly regularised) likelihood."""
    from sklearn.linear_model import LogisticRegression

    x = np.asarray(z_bag, np.float64).reshape(-1, 1)
    if z_info is not None:
        x = np.hstack([x, np.asarray(z_info, np.float64).reshape(-1, 1)])
    y = np.asarray(normal, bool)
    if y.all() or not y.any():
        raise ValueError("calibration needs both normal and risk infants")
    lr = LogisticRegression(C=100.0).fit(x, y)
    coef = lr.coef_[0]
    return Calibration(
        a=float(coef[0]),
        b=float(lr.intercept_[0]),
        c=float(coef[1]) if z_info is not None else 0.0,
        method="platt",
    )


def own_fit_possible(normal: np.ndarray) -> bool:
    """Whether held-out infants of one kind (their groups) can carry a calibration of its own."""
    normal = np.asarray(normal, bool)
    return len(normal) >= MIN_KIND_INFANTS and bool(normal.any()) and not normal.all()


def fit_calibration(
    z_bag: np.ndarray, z_info: np.ndarray, normal: np.ndarray, label: str = "platt"
) -> KindCalibration:
    """Platt scaling with and without the Info branch and the Youden risk threshold, fitted on
    held-out infants' log-odds (``z_info`` NaN where an infant has no data)."""
    z_bag, z_info, normal = (np.asarray(a) for a in (z_bag, z_info, normal))
    without = fit_platt(z_bag, normal)
    has = np.isfinite(z_info)
    if has.sum() >= 4 and len(set(normal[has])) == 2:
        with_info = fit_platt(z_bag[has], normal[has], z_info[has])
        p_risk = 1 - with_info.apply(z_bag[has], z_info[has])
        threshold = youden_threshold(p_risk, ~normal[has])
    else:
        with_info = without
        threshold = youden_threshold(1 - without.apply(z_bag), ~normal)
    with_info.method = without.method = label
    return KindCalibration(with_info, without, threshold, int(len(normal)))


def youden_threshold(scores: Sequence[float], positive: Sequence[bool]) -> float:
    """Score cut-off maximising sensitivity + specificity - 1 (ties: the middle of the gap)."""
    from sklearn.metrics import roc_curve

    s = np.asarray(scores, np.float64)
    fpr, tpr, thr = roc_curve(np.asarray(positive, bool), s)
    k = int(np.argmax(tpr - fpr))
    if not np.isfinite(thr[k]):
        return float(s.max())
    below = s[s < thr[k]]
    # Put the cut halfway to the next lower score, so it does not sit on a training point.
    return float((thr[k] + below.max()) / 2) if below.size else float(thr[k])


def expected_calibration_error(p: Sequence[float], y: Sequence[bool], bins: int = 10) -> float:
    """Mean |observed rate - mean predicted| over equal-width bins, weighted by bin size."""
    p = np.asarray(p, np.float64)
    y = np.asarray(y, np.float64)
    idx = np.minimum((p * bins).astype(int), bins - 1)
    err = 0.0
    for b in range(bins):
        m = idx == b
        if m.any():
            err += m.mean() * abs(y[m].mean() - p[m].mean())
    return float(err)


def ece_if_calibrated(
    p: Sequence[float], y: Sequence[bool] | None = None, draws: int = 2000, seed: int = 0
) -> dict:
    """What the binned calibration error would be if ``p`` were perfectly calibrated: outcomes
    drawn from ``p`` itself, ``draws`` times. On tens of infants the error is mostly sampling
    noise (60 video infants of the demo weights: a median of about 0.09 with perfect
    calibration), so a measured error means something only beside this reference. Returns the
    median, its 95% range and, given the observed ``y``, the share of draws at least as far off
    (a calibration test's p-value)."""
    p = np.asarray(p, np.float64)
    if not len(p):
        return {"ece_if_calibrated": None, "ece_if_calibrated_ci": None, "ece_p_value": None}
    rng = np.random.default_rng(seed)
    sims = np.array([expected_calibration_error(p, rng.random(len(p)) < p) for _ in range(draws)])
    out = {
        "ece_if_calibrated": float(np.median(sims)),
        "ece_if_calibrated_ci": [float(np.percentile(sims, 2.5)), float(np.percentile(sims, 97.5))],
        "ece_p_value": None,
    }
    if y is not None:
        out["ece_p_value"] = float(np.mean(sims >= expected_calibration_error(p, y) - 1e-12))
    return out


def category_thresholds(freq: Sequence[float], categories: Sequence[str]) -> dict[str, float]:
    """FMs-frequency cut-offs between adjacent categories (``mam.gma``): continuous vs
    intermittent, intermittent vs sporadic or absent, sporadic vs absent."""
    f = np.asarray(freq, np.float64)
    c = np.asarray(categories)
    out = {}
    cont, inter = c == "continuous", c == "intermittent"
    low = (c == "sporadic") | (c == "absent")
    if cont.any() and inter.any():
        m = cont | inter
        out["continuous"] = youden_threshold(f[m], cont[m])
    if inter.any() and low.any():
        m = inter | low
        out["intermittent"] = youden_threshold(f[m], inter[m])
    spor, absent = c == "sporadic", c == "absent"
    if spor.any() and absent.any():
        m = spor | absent
        out["sporadic"] = youden_threshold(f[m], spor[m])
    return out
