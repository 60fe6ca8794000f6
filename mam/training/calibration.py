"""Calibration of P(risk) and the decision thresholds, fitted on infants held out of training.

Method: Platt scaling, a logistic regression on the branches' normal log-odds: on the bag's alone
(for requests without infant data) and on the bag's and the Info branch's as two features (so the
held-out data weigh the Info branch rather than a fixed equal-weight sum). Without infant data it
is monotone, so it keeps the ranking (AUC) and only fixes the scale; with tens of infants it is
far less prone to overfit than isotonic regression. The risk threshold is Youden's J on the
calibrated P(risk); FMs-frequency category cut-offs are Youden's J between adjacent categories.
A site that screens for a sensitivity (or specificity) chooses its operating point instead
(``operating_point``), with bootstrap intervals of what it achieves.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from mam.errors import InputError
from mam.model.weights import Calibration, KindCalibration

# Held-out infants of one source kind (mam.domain.kind_of) needed for a calibration of its own;
# with fewer, a 3-parameter Platt fit overfits (19 held-out videos: ECE 0.148 on the external
# set against 0.087 with the overall fit).
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


# Resamples of infants for an operating point's 95% intervals (as mam.training.evaluate).
BOOTSTRAP = 1000
TARGETS = ("youden", "sensitivity", "specificity")


@dataclass
class OperatingPoint:
    """A risk threshold on calibrated P(risk) (risk when P(risk) >= threshold), how it was
    chosen, and what it achieves on the infants it was chosen on, with 95% bootstrap intervals
    (resampling infants and choosing the threshold again in each resample)."""

    threshold: float
    sensitivity: float
    specificity: float
    target: str  # youden | sensitivity | specificity
    target_value: float | None  # the sensitivity or specificity asked for
    infants: int
    risk_infants: int
    threshold_ci: tuple[float, float] | None = None
    sensitivity_ci: tuple[float, float] | None = None
    specificity_ci: tuple[float, float] | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        for k in ("threshold_ci", "sensitivity_ci", "specificity_ci"):
            d[k] = None if d[k] is None else [float(v) for v in d[k]]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> OperatingPoint:
        return cls(**{k: tuple(v) if k.endswith("_ci") and v is not None else v
                      for k, v in d.items() if k in cls.__dataclass_fields__})  # fmt: skip

    def describe(self) -> str:
        """One line for people, e.g. ``P(risk) >= 0.231 (95% CI 0.18-0.29); sensitivity 0.96
        (0.90-1.00), specificity 0.71 (0.62-0.80) on 60 recordings``."""

        def ci(c, digits):
            return f"{c[0]:.{digits}f}-{c[1]:.{digits}f}" if c is not None else "n/a"

        return (
            f"P(risk) >= {self.threshold:.3f} (95% CI {ci(self.threshold_ci, 2)}); "
            f"sensitivity {self.sensitivity:.2f} ({ci(self.sensitivity_ci, 2)}), "
            f"specificity {self.specificity:.2f} ({ci(self.specificity_ci, 2)}) "
            f"on {self.infants} recordings"
        )


def choose_threshold(
    p_risk: Sequence[float], is_risk: Sequence[bool], target: str = "youden",
    value: float | None = None,
) -> float:  # fmt: skip
    """The risk threshold (risk when P(risk) >= threshold) for ``target``:

    - ``sensitivity``: the highest threshold whose sensitivity on these infants is >= ``value``
      (so that share of these risk infants is caught; specificity is the most it can be);
    - ``specificity``: the lowest threshold whose specificity is >= ``value``;
    - ``youden``: the one maximising sensitivity + specificity - 1 (``youden_threshold``).

    The cut lies halfway between two infants' scores, never on one: it achieves what a cut at
    the nearer score would, and a score computed again (another runtime's rounding) stays on
    its side.
    """
    p = np.asarray(p_risk, np.float64)
    y = np.asarray(is_risk, bool)
    if y.all() or not y.any():
        raise ValueError("an operating point needs both normal and risk infants")
    if target == "youden":
        return youden_threshold(p, y)
    if target not in TARGETS or value is None or not 0 < value <= 1:
        raise ValueError(f"target must be one of {TARGETS}, with a value in (0, 1]")
    if target == "sensitivity":
        pos = np.sort(p[y])[::-1]
        need = math.ceil(value * len(pos) - 1e-9)  # risk infants at or above the threshold
        cut = pos[need - 1]
        lower = p[p < cut]
        return float((cut + (lower.max() if lower.size else 0.0)) / 2)
    neg = np.sort(p[~y])
    need = math.ceil(value * len(neg) - 1e-9)  # normal infants strictly below the threshold
    cut = neg[need - 1]
    higher = p[p > cut]
    above = higher.min() if higher.size else 1.0
    t = (cut + above) / 2
    return float(t if t > cut else above)


def operating_point(
    p_risk: Sequence[float], is_risk: Sequence[bool], target: str = "youden",
    value: float | None = None, *, bootstrap: int = BOOTSTRAP, seed: int = 0,
    level: float = 0.95,
) -> OperatingPoint:  # fmt: skip
    """``choose_threshold`` on these infants, what it achieves on them, and percentile
    intervals from ``bootstrap`` resamples of the infants (with replacement; resamples lacking
    a group are skipped), the threshold chosen again in each: the interval of the threshold,
    and of the sensitivity and specificity each resample's own threshold achieves on it."""
    p = np.asarray(p_risk, np.float64)
    y = np.asarray(is_risk, bool)
    t = choose_threshold(p, y, target, value)
    rng = np.random.default_rng(seed)
    th, sens, spec = [], [], []
    for _ in range(bootstrap):
        i = rng.integers(0, len(y), len(y))
        yy, pp = y[i], p[i]
        if yy.all() or not yy.any():
            continue
        tt = choose_threshold(pp, yy, target, value)
        th.append(tt)
        sens.append(float(np.mean(pp[yy] >= tt)))
        spec.append(float(np.mean(pp[~yy] < tt)))
    lo, hi = (1 - level) / 2 * 100, (1 + level) / 2 * 100

    def ci(v):
        return (float(np.percentile(v, lo)), float(np.percentile(v, hi))) if v else None

    return OperatingPoint(
        threshold=t,
        sensitivity=float(np.mean(p[y] >= t)),
        specificity=float(np.mean(p[~y] < t)),
        target=target,
        target_value=None if target == "youden" else float(value),
        infants=int(len(y)),
        risk_infants=int(y.sum()),
        threshold_ci=ci(th),
        sensitivity_ci=ci(sens),
        specificity_ci=ci(spec),
    )


class SourceKindError(InputError):
    """The recordings to calibrate on are not of one source kind (each kind has its own fit),
    or none is of the kind asked for."""

    code = "source_kind"


def records_of_kind(records: Sequence, kind: str = "auto") -> tuple[str, list, int]:
    """``(kind, its records, how many others were left out)``: ``auto`` takes the one kind the
    records are of (``mam.domain.kind_of`` of their source) and refuses several."""
    from mam.domain import kind_of

    kinds = [kind_of(r.source) for r in records]
    counts = {k: kinds.count(k) for k in sorted(set(kinds))}
    said = ", ".join(f"{n} {k}" for k, n in counts.items()) or "no recordings"
    if kind == "auto":
        if len(counts) != 1:
            raise SourceKindError(f"the data hold recordings of several source kinds ({said})")
        kind = kinds[0]
    mine = [r for r, k in zip(records, kinds) if k == kind]
    if not mine:
        raise SourceKindError(f"no {kind} recordings in the data ({said})")
    return kind, mine, len(records) - len(mine)


def calibrated_version(version: str) -> str:
    """The version of weights recalibrated from ``version``: a local suffix counting
    recalibrations (``0.3.1`` -> ``0.3.1+cal.1`` -> ``0.3.1+cal.2``; PEP 440 local label)."""
    public, _, local = version.partition("+")
    parts = local.split(".") if local else []
    if len(parts) >= 2 and parts[-2] == "cal" and parts[-1].isdigit():
        parts[-1] = str(int(parts[-1]) + 1)
    else:
        parts += ["cal", "1"]
    return f"{public}+{'.'.join(parts)}"
