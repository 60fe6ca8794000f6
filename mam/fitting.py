"""From a labelled dataset to shippable weights: train, then calibrate on held-out infants.

A stratified share of the infants (``calibration_fraction``) is kept out of training; the trained
model scores them, and Platt scaling, the Youden risk threshold and the FMs-frequency category
cut-offs are fitted on those scores (``mam.calibration``). Used by ``mam train`` and by each fold
of ``mam evaluate``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from mam.calibration import category_thresholds, fit_platt, youden_threshold
from mam.features import build_instances
from mam.model.network import MAM
from mam.model.weights import ModelMeta
from mam.screening import bag_log_odds, info_log_odds
from mam.train import TrainConfig, TrainRecord, train

logger = logging.getLogger(__name__)


@dataclass
class Scores:
    """Per-infant model outputs before calibration."""

    z_bag: np.ndarray  # the bag's normal log-odds
    z_info: np.ndarray  # the Info branch's normal log-odds, NaN where the infant has no data
    fms_frequency: np.ndarray


def score_records(model: MAM, meta: ModelMeta, records: Sequence[TrainRecord]) -> Scores:
    zb, zi, freq = [], [], []
    with torch.inference_mode():
        for r in records:
            inst = build_instances(
                r.joints, meta.normalizer, step=meta.clip_step,
                smoothing_window=meta.smoothing_window,
            )  # fmt: skip
            _, logits = model.forward_clips(torch.from_numpy(inst.tensors))
            bag, _ = model.forward_bag(logits[None])
            zb.append(float(bag_log_odds(bag.numpy())[0]))
            if r.info is not None:
                x = (np.asarray(r.info) - meta.info_mean) / meta.info_std
                info_l = model.forward_info(torch.tensor(x, dtype=torch.float32)[None])
                zi.append(float(info_log_odds(info_l.numpy())[0]))
            else:
                zi.append(np.nan)
            p = torch.softmax(logits, 1)[:, 1].numpy()
            freq.append(float(np.mean(p > meta.fms_clip_threshold)))
    return Scores(np.array(zb), np.array(zi), np.array(freq))


def stratified_split(groups: Sequence[str], fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of held-out infants, the same share of each group."""
    rng = np.random.default_rng(seed)
    g = np.asarray(groups)
    held = np.zeros(len(g), bool)
    for value in np.unique(g):
        idx = rng.permutation(np.flatnonzero(g == value))
        held[idx[: max(1, int(round(fraction * len(idx))))]] = True
    return held


def fit(
    records: Sequence[TrainRecord],
    cfg: TrainConfig,
    *,
    name: str,
    version: str,
    provenance: dict,
    categories: Sequence[str | None] | None = None,
    calibration_fraction: float = 0.2,
    log_csv=None,
    progress: bool | None = None,
) -> tuple[MAM, ModelMeta]:
    """Train on most infants, calibrate on the rest; returns the model and its metadata."""
    groups = [r.group for r in records]
    held = (
        stratified_split(groups, calibration_fraction, cfg.seed)
        if calibration_fraction > 0
        else np.zeros(len(records), bool)
    )
    train_recs = [r for r, h in zip(records, held) if not h]
    model, pre = train(train_recs, cfg, log_csv=log_csv, progress=progress)
    meta = ModelMeta(
        name=name,
        version=version,
        config=cfg.model,
        normalizer=pre["normalizer"],
        info_mean=pre["info_mean"],
        info_std=pre["info_std"],
        clip_step=cfg.clip_step,
        provenance={**provenance, "train_config": cfg.to_dict(), "calibration": {}},
    )
    if not held.any():
        return model, meta
    cal_recs = [r for r, h in zip(records, held) if h]
    s = score_records(model, meta, cal_recs)
    normal = np.array([r.group == "normal" for r in cal_recs])
    meta.calibration_without_info = fit_platt(s.z_bag, normal)
    has = np.isfinite(s.z_info)
    if has.sum() >= 4 and len(set(normal[has])) == 2:
        meta.calibration = fit_platt(s.z_bag[has], normal[has], s.z_info[has])
        p_risk = 1 - meta.calibration.apply(s.z_bag[has], s.z_info[has])
        meta.risk_threshold = youden_threshold(p_risk, ~normal[has])
    else:
        meta.calibration = meta.calibration_without_info
        p_risk = 1 - meta.calibration.apply(s.z_bag)
        meta.risk_threshold = youden_threshold(p_risk, ~normal)
    if categories is not None:
        cats = [c for c, h in zip(categories, held) if h]
        if all(cats):
            meta.fms_category_thresholds.update(category_thresholds(s.fms_frequency, cats))
    meta.provenance["calibration"] = {
        "method": "platt on held-out infants",
        "infants": int(held.sum()),
        "risk_infants": int((~normal).sum()),
    }
    logger.info("calibrated on %d held-out infants", int(held.sum()))
    return model, meta
