"""From a labelled dataset to shippable weights: train, then calibrate on held-out infants.

A stratified share of the infants (``calibration_fraction``) is kept out of training; the trained
model scores them, and Platt scaling, the Youden risk threshold and the FMs-frequency category
cut-offs are fitted on those scores (``mam.training.calibration``). Used by ``mam train`` and by
each fold of ``mam evaluate``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from mam.domain import (
    CLIP_QUANTILE,
    DomainModel,
    Gaussian,
    KindModel,
    kind_of,
    lognormal_threshold,
    motion_statistics,
)
from mam.features import build_instances
from mam.model.network import MAM
from mam.model.weights import ModelMeta
from mam.pose.representation import raw_trunk_length
from mam.screening import bag_log_odds, info_log_odds
from mam.training.calibration import (
    MIN_KIND_INFANTS,
    category_thresholds,
    fit_calibration,
    own_fit_possible,
)
from mam.training.train import TrainConfig, TrainRecord, train

logger = logging.getLogger(__name__)


@dataclass
class Scores:
    """Per-infant model outputs before calibration, and what the domain check describes."""

    z_bag: np.ndarray  # the bag's normal log-odds
    z_info: np.ndarray  # the Info branch's normal log-odds, NaN where the infant has no data
    fms_frequency: np.ndarray
    embeddings: list[np.ndarray]  # per infant [N, D] clip representations
    motion: np.ndarray  # [infants, F] mam.domain.motion_statistics


def score_records(model: MAM, meta: ModelMeta, records: Sequence[TrainRecord]) -> Scores:
    zb, zi, freq, emb, motion = [], [], [], [], []
    with torch.inference_mode():
        for r in records:
            x = r.model_input(meta.representation)
            motion.append(motion_statistics(x, raw_trunk_length(r.joints)))
            inst = build_instances(
                x, meta.normalizer, step=meta.clip_step, smoothing_window=meta.smoothing_window,
            )  # fmt: skip
            feats, logits = model.forward_clips(torch.from_numpy(inst.tensors))
            emb.append(feats.numpy().astype(np.float64))
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
    return Scores(np.array(zb), np.array(zi), np.array(freq), emb, np.array(motion))


def fit_domain(
    train: Scores, train_recs: Sequence[TrainRecord], held: Scores,
    held_recs: Sequence[TrainRecord], representation: str,
) -> DomainModel:  # fmt: skip
    """Per kind of source, Gaussians of the training infants' motion statistics and clip
    embeddings, with thresholds set on the held-out infants (``mam.domain``)."""
    kinds: dict[str, KindModel] = {}
    for kind in sorted({kind_of(r.source) for r in train_recs}):
        tr = [i for i, r in enumerate(train_recs) if kind_of(r.source) == kind]
        ho = [i for i, r in enumerate(held_recs) if kind_of(r.source) == kind]
        if len(tr) < 4:
            logger.warning("only %d training recordings of kind %s: not described", len(tr), kind)
            continue
        motion = Gaussian.fit(train.motion[tr])
        embedding = Gaussian.fit(np.concatenate([train.embeddings[i] for i in tr]))
        # Held-out infants set the thresholds; with too few, training infants do (optimistic).
        src, idx = (held, ho) if len(ho) >= 4 else (train, tr)
        if src is train:
            logger.warning("domain thresholds of kind %s set on training data", kind)
        motion.threshold = lognormal_threshold(motion.distance(src.motion[idx]))
        clip_d = [embedding.distance(src.embeddings[i]) for i in idx]
        embedding.threshold = lognormal_threshold([d.mean() for d in clip_d])
        kinds[kind] = KindModel(
            motion, embedding, float(np.quantile(np.concatenate(clip_d), CLIP_QUANTILE)),
            recordings=len(tr), backends=sorted({r.source for i, r in enumerate(train_recs)
                                                  if i in set(tr)}),
        )  # fmt: skip
    return DomainModel(kinds, representation)


def domain_record(domain: DomainModel, held: Scores, held_recs: Sequence[TrainRecord]) -> dict:
    """What the domain check does on the held-out infants: their number and the share flagged,
    per kind (the thresholds aim at about 1-2%)."""
    flagged: dict[str, list[bool]] = {}
    for i, r in enumerate(held_recs):
        kind = kind_of(r.source)
        v = domain.check(kind, held.embeddings[i], held.motion[i])
        flagged.setdefault(kind, []).append(not v.in_domain)
    return {
        "method": domain.method,
        "heldout": {k: len(v) for k, v in flagged.items()},
        "heldout_flagged": {k: float(np.mean(v)) for k, v in flagged.items()},
    }


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
        representation=cfg.representation,
        provenance={**provenance, "train_config": cfg.to_dict(), "calibration": {}},
    )
    cal_recs = [r for r, h in zip(records, held) if h]
    s_train = score_records(model, meta, train_recs)
    s = score_records(model, meta, cal_recs) if cal_recs else s_train
    meta.domain = fit_domain(s_train, train_recs, s, cal_recs, cfg.representation)
    meta.provenance["domain"] = domain_record(meta.domain, s, cal_recs)
    if not held.any():
        return model, meta
    normal = np.array([r.group == "normal" for r in cal_recs])
    overall = fit_calibration(s.z_bag, s.z_info, normal)
    meta.calibration, meta.calibration_without_info = (
        overall.calibration,
        overall.calibration_without_info,
    )
    meta.risk_threshold = overall.risk_threshold
    kinds = np.array([kind_of(r.source) for r in cal_recs])
    for kind in sorted(set(kinds)):
        m = kinds == kind
        if own_fit_possible(normal[m]):
            meta.calibration_by_kind[kind] = fit_calibration(
                s.z_bag[m], s.z_info[m], normal[m], f"platt ({kind})"
            )
    if categories is not None:
        cats = [c for c, h in zip(categories, held) if h]
        if all(cats):
            meta.fms_category_thresholds.update(category_thresholds(s.fms_frequency, cats))
    meta.provenance["calibration"] = {
        "method": "platt on held-out infants",
        "infants": int(held.sum()),
        "risk_infants": int((~normal).sum()),
        "by_kind": {k: v.infants for k, v in meta.calibration_by_kind.items()},
    }
    logger.info("calibrated on %d held-out infants", int(held.sum()))
    return model, meta


def recalibrate(
    model: MAM, meta: ModelMeta, records: Sequence[TrainRecord], kind: str
) -> ModelMeta:
    """Give ``kind`` a calibration of its own, fitted on ``records`` that the weights never
    trained on (e.g. recordings a site screened and knows the outcome of): the network, its
    domain record and every other kind's calibration stay as they were."""
    if any(kind_of(r.source) != kind for r in records):
        raise ValueError(f"every record must be of kind {kind!r}")
    normal = np.array([r.group == "normal" for r in records])
    if not own_fit_possible(normal):
        raise ValueError(
            f"a calibration of its own needs at least {MIN_KIND_INFANTS} infants of both groups"
        )
    s = score_records(model, meta, records)
    meta.calibration_by_kind[kind] = fit_calibration(s.z_bag, s.z_info, normal, f"platt ({kind})")
    meta.provenance.setdefault("calibration", {}).setdefault("by_kind", {})[kind] = len(records)
    logger.info("calibrated kind %s on %d infants", kind, len(records))
    return meta
