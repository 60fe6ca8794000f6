"""Simple baselines scored the way MAM is (the paper's Table 2): same folds, same metrics.

* ``"EML"``: McCay et al.'s pose histograms with an ensemble of standard classifiers (EMBC 2019,
  IEEE Access 2020), written from the papers' description. Per limb segment
  (``mam.skeleton.BONES``) the 2D orientation of the segment in each frame, binned into 8
  directions of 45 degrees and normalised over the recording (HOJO2D); per joint the
  frame-to-frame 2D displacement, binned by its direction into 8 bins and weighted by its length,
  normalised (HOJD2D); all histograms concatenated into one vector per recording. The 2D joints
  are what the model sees (``image2d``: image plane, pelvis-relative, in trunk lengths, mean
  trunk turned up), so the pelvis, always at the origin, has no displacement histogram.
  Untracked frames are skipped (a displacement needs the joint in both frames). A histogram with
  nothing to count (a segment never tracked, a joint that never moved) is uniform, so every
  histogram sums to 1. The classifier: McCay et al. compared kNN (k = 1, 3), LDA and an
  ensemble classifier, their best; here standardised features and one soft-voting ensemble of
  standard scikit-learn classifiers: logistic regression, SVM with Platt probabilities, a random
  forest, kNN (k = 3) and LDA (shrinkage, as 256 features meet few infants).
* ``"infant data"``: logistic regression on the four standardised infant fields (sex, GA, BW,
  corrected age); an infant without them gets the training fold's risk prevalence as P(risk).

Both are fitted on the training fold only, which needs ``MIN_PER_GROUP`` infants of each group.
Operating point: P(risk) >= the training fold's risk
prevalence, i.e. the evidence raised the risk above its base rate (likelihood ratio >= 1). It is
the balanced operating point (the paper's baselines sit at sensitivity ~ specificity), needs no
held-out infants, and treats an infant without data as referred rather than cleared.
The FMs-frequency baseline needs MAM's own per-infant output and is not here.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mam.errors import InsufficientTrackingError
from mam.skeleton import BONES, JOINT_INDEX, NUM_JOINTS
from mam.training.dataset import DatasetError
from mam.training.evaluate import _metrics, bootstrap_ci, fold_indices, summarise
from mam.training.train import TrainRecord

ORIENTATION_BINS = 8  # HOJO2D, 45 degrees each (McCay et al.)
DIRECTION_BINS = 8  # HOJD2D
REPRESENTATION = "image2d"
METHODS = ("EML", "infant data")
TABLE_COLUMNS = (
    ("AUC", "auc"), ("Accuracy", "accuracy"), ("Sensitivity", "sensitivity"),
    ("Specificity", "specificity"), ("PPV", "ppv"), ("NPV", "npv"),
)  # fmt: skip
_MOVING_JOINTS = tuple(j for j in range(NUM_JOINTS) if j != JOINT_INDEX["pelvis"])
_NOT_MEASURED = ("fms_frequency_auc", "fms_frequency_auc_continuous_vs_intermittent")


def _histogram(angles: np.ndarray, weights: np.ndarray, bins: int) -> np.ndarray:
    """Normalised histogram of angles in [-pi, pi) over ``bins`` equal sectors; uniform when
    there is nothing to count."""
    k = np.floor((angles + np.pi) / (2 * np.pi) * bins).astype(np.int64) % bins
    h = np.bincount(k, weights=weights, minlength=bins).astype(np.float64)
    total = h.sum()
    return h / total if total > 0 else np.full(bins, 1.0 / bins)


def hojo2d(xy: np.ndarray) -> np.ndarray:
    """Histograms of joint orientation: per segment of ``BONES``, ``[len(BONES), 8]``."""
    out = np.empty((len(BONES), ORIENTATION_BINS))
    for b, (p, c) in enumerate(BONES):
        v = xy[:, c] - xy[:, p]
        v = v[np.isfinite(v).all(axis=-1)]
        out[b] = _histogram(np.arctan2(v[:, 1], v[:, 0]), np.ones(len(v)), ORIENTATION_BINS)
    return out


def hojd2d(xy: np.ndarray) -> np.ndarray:
    """Histograms of joint displacement: per joint but the pelvis, frame-to-frame displacement
    binned by direction and weighted by its length, ``[16, 8]``."""
    out = np.empty((len(_MOVING_JOINTS), DIRECTION_BINS))
    for i, j in enumerate(_MOVING_JOINTS):
        d = np.diff(xy[:, j], axis=0)
        d = d[np.isfinite(d).all(axis=-1)]
        out[i] = _histogram(
            np.arctan2(d[:, 1], d[:, 0]), np.hypot(d[:, 0], d[:, 1]), DIRECTION_BINS
        )
    return out


def eml_features(record: TrainRecord, position: int = 0, total: int = 1) -> np.ndarray:
    """One recording's HOJO2D and HOJD2D, concatenated.

    Raises:
        InsufficientTrackingError: no two consecutive tracked frames (nothing to measure);
        ``position`` of ``total`` names the recording without naming the infant.
    """
    tracked = np.isfinite(np.asarray(record.joints)).all(axis=(1, 2))
    if not (tracked[1:] & tracked[:-1]).any():
        raise InsufficientTrackingError(
            f"EML needs two consecutive tracked frames in every recording; recording "
            f"{position + 1} of {total} has none"
        )
    xy = np.asarray(record.model_input(REPRESENTATION)[..., :2], np.float64)
    return np.concatenate([hojo2d(xy).ravel(), hojd2d(xy).ravel()])


def eml_feature_matrix(records: Sequence[TrainRecord]) -> np.ndarray:
    """``[N, 256]``: each row depends on its recording alone."""
    return np.stack([eml_features(r, i, len(records)) for i, r in enumerate(records)])


def _labels(records: Sequence[TrainRecord]) -> np.ndarray:
    return np.array([r.group == "risk" for r in records], np.int64)


def _eml_classifier(seed: int, n_train: int, n_minority: int):
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
    from sklearn.ensemble import RandomForestClassifier, VotingClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    members = [
        ("lr", LogisticRegression(max_iter=2000)),
        ("rf", RandomForestClassifier(n_estimators=100, random_state=seed)),
        ("knn", KNeighborsClassifier(n_neighbors=min(3, n_train))),
        ("lda", LinearDiscriminantAnalysis(solver="lsqr", shrinkage="auto")),
    ]
    # Platt probabilities, cross-fitted within the training set (which has >= 2 of each group).
    svm = CalibratedClassifierCV(SVC(random_state=seed), cv=min(5, n_minority), ensemble=False)
    members.append(("svm", svm))
    return make_pipeline(StandardScaler(), VotingClassifier(members, voting="soft"))


def _fit_predict_eml(x_tr, y_tr, x_te, seed: int) -> np.ndarray:
    n_minority = int(min(np.sum(y_tr == 0), np.sum(y_tr == 1)))
    clf = _eml_classifier(seed, len(y_tr), n_minority).fit(x_tr, y_tr)
    return clf.predict_proba(x_te)[:, 1]


def _info_matrix(records: Sequence[TrainRecord]) -> np.ndarray:
    return np.array([r.info if r.info is not None else [np.nan] * 4 for r in records], np.float64)


def _fit_predict_info(x_tr, y_tr, x_te, seed: int) -> np.ndarray:
    """P(risk) from the infant data; the training prevalence where there are none (or where
    the training infants with data are of one group only)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    prevalence = float(np.mean(y_tr))
    p = np.full(len(x_te), prevalence)
    has_tr, has_te = np.isfinite(x_tr).all(axis=1), np.isfinite(x_te).all(axis=1)
    if len(set(y_tr[has_tr].tolist())) == 2 and has_te.any():
        clf = make_pipeline(StandardScaler(), LogisticRegression(random_state=seed))
        clf.fit(x_tr[has_tr], y_tr[has_tr])
        p[has_te] = clf.predict_proba(x_te[has_te])[:, 1]
    return p


_METHODS = {"EML": (eml_feature_matrix, _fit_predict_eml),
            "infant data": (_info_matrix, _fit_predict_info)}  # fmt: skip


def _score(records, y, p, threshold: float) -> dict:
    n = len(y)
    res = {"threshold": threshold, **_metrics(y, p, threshold, np.zeros(n), [None] * n)}
    for k in _NOT_MEASURED:
        res[k] = None
    res["per_infant"] = {
        "id": [r.infant_id for r in records],
        "risk": np.asarray(y, bool).tolist(),
        "risk_probability": np.asarray(p, np.float64).tolist(),
        "threshold": [threshold] * n,
    }
    return res


MIN_PER_GROUP = 2  # training infants of each group a baseline needs (LDA, the SVM's Platt fit)


def _check_groups(groups: Sequence[str], what: str) -> None:
    for g in ("normal", "risk"):
        n = list(groups).count(g)
        if n < MIN_PER_GROUP:
            raise DatasetError(
                f"{what} needs at least {MIN_PER_GROUP} {g} infants to fit a baseline, found {n}"
            )


def cross_validate_baselines(
    records: Sequence[TrainRecord], folds: int, seed: int
) -> dict[str, dict]:
    """Each baseline over the folds of ``mam.training.evaluate.cross_validate`` (same split,
    same seed): method -> ``{"folds": [metrics per fold], mean and sd as ``summarise``}``."""
    groups = [r.group for r in records]
    splits = fold_indices(groups, folds, seed)
    for tr, _ in splits:
        _check_groups(
            [groups[i] for i in tr], f"each training fold of {folds}-fold cross-validation"
        )
    y = _labels(records)
    out = {}
    for name, (features, fit_predict) in _METHODS.items():
        x = features(records)
        results = []
        for k, (tr, te) in enumerate(splits):
            p = fit_predict(x[tr], y[tr], x[te], seed)
            res = _score([records[i] for i in te], y[te], p, float(np.mean(y[tr])))
            res["fold"] = k
            results.append(res)
        out[name] = {"folds": results, **summarise(results), "k": folds}
    return out


def external_baselines(
    train_records: Sequence[TrainRecord], external_records: Sequence[TrainRecord], seed: int
) -> dict[str, dict]:
    """Each baseline fitted on all ``train_records`` and scored on ``external_records``, with
    bootstrap 95% intervals (``*_ci``) as the external set has no folds to give an sd."""
    _check_groups([r.group for r in train_records], "the training set")
    y_tr, y_te = _labels(train_records), _labels(external_records)
    out = {}
    for name, (features, fit_predict) in _METHODS.items():
        p = fit_predict(features(train_records), y_tr, features(external_records), seed)
        res = _score(external_records, y_te, p, float(np.mean(y_tr)))
        res.update(bootstrap_ci(y_te.astype(bool), p, res["threshold"], seed=seed))
        out[name] = res
    return out


def _cell(row: dict, key: str) -> str:
    v = row.get(key)
    if v is None:
        return "n/a"
    if "folds" not in row:
        return f"{v:.3f}"
    sd = row.get(f"{key}_sd")
    return f"{v:.3f} ± {sd:.3f}" if sd is not None else f"{v:.3f}"


def paper_table(rows: dict[str, dict]) -> str:
    """The paper's Table 2 layout: a row per method, AUC to NPV, ``mean ± sd`` over folds for
    a cross-validation result (one with ``"folds"``), the single value for an external set.
    Takes these baselines' results and MAM's ``cross_validate``/``evaluate`` results alike."""
    header = ["Method", *(c for c, _ in TABLE_COLUMNS)]
    body = [[name, *(_cell(row, k) for _, k in TABLE_COLUMNS)] for name, row in rows.items()]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *body]]
    return "\n".join(lines) + "\n"
