"""From a labelled dataset to shippable weights: train, then calibrate on held-out infants.

A stratified share of the infants (``calibration_fraction``) is kept out of training; the trained
model scores them, and Platt scaling, the Youden risk threshold and the FMs-frequency category
cut-offs are fitted on those scores (``mam.training.calibration``). Used by ``mam train`` and by
each fold of ``mam evaluate``.

The documented minimum sizes live here (README, "Training data layout"). Below them the fit still
runs (``mam train`` refuses unless ``--accept-small-data``); the weights then name every shortfall
in ``provenance["small_data"]`` and every screening result of them carries a warning.
"""

from __future__ import annotations

import dataclasses
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
from mam.errors import InputError
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

# Calibration hold-out: Platt scaling has two or three parameters and the Youden threshold is
# set by where the risk infants' scores fall; with 5 risk infants one infant moves the measured
# sensitivity by 20 points, with fewer the threshold is set by one or two recordings.
MIN_CALIBRATION_INFANTS = 20
MIN_CALIBRATION_PER_GROUP = 5
# Domain check, per source kind (mam.domain): the motion Gaussian has 15 statistics, and a
# covariance fitted on fewer than about twice as many recordings understates the spread that new
# recordings of the same kind show (they come back out of domain); its thresholds are log-normal
# quantiles of held-out distances, whose spread 10 recordings estimate to about +-25%.
MIN_DOMAIN_TRAIN = 30
MIN_DOMAIN_HELDOUT = 10
# Below this a kind is not described at all (refused as unknown), and held-out recordings fewer
# than this cannot set its thresholds: the training recordings do, and as they lie closer to
# their own fit than new recordings, too many new recordings of the kind come back out of domain.
DOMAIN_FIT_FLOOR = 4
SOURCE_KINDS = ("video", "pose_file")  # mam.domain.kind_of


class InsufficientDataError(InputError):
    """Too few infants to train or to calibrate (or, without ``--accept-small-data``, fewer than
    the documented minimums): the message names the numbers."""

    code = "insufficient_data"


def _counts(groups: np.ndarray) -> str:
    return f"{int((groups == 'normal').sum())} normal, {int((groups == 'risk').sum())} risk"


def data_problem(groups: Sequence[str], held: np.ndarray) -> str | None:
    """Why the infants cannot be trained on at all (a group missing from the training or the
    calibration share), in plain words with the numbers; None when they can."""
    g, held = np.asarray(groups), np.asarray(held, bool)
    calibrating = bool(held.any())
    need = 2 if calibrating else 1
    short = [grp for grp in ("normal", "risk") if (g[~held] == grp).sum() < 1
             or (calibrating and (g[held] == grp).sum() < 1)]  # fmt: skip
    if not short and len(g):
        return None
    what = "one to train on and one held out to calibrate on" if calibrating else "to train on"
    return (
        f"the data hold {len(g)} infants ({_counts(g)}); training needs at least {need} "
        f"infant{'s' if need > 1 else ''} of each group ({what})"
    )


def data_shortfalls(groups: Sequence[str], kinds: Sequence[str], held: np.ndarray) -> list[str]:
    """Every way the split falls below the documented minimums, one plain sentence each."""
    g, k, held = np.asarray(groups), np.asarray(kinds), np.asarray(held, bool)
    out = []
    hg = g[held]
    if not held.any():
        out.append("no calibration hold-out (calibration fraction 0): P(risk), its threshold "
                   "and the domain thresholds are set on the training infants")  # fmt: skip
    elif (
        len(hg) < MIN_CALIBRATION_INFANTS
        or min((hg == "normal").sum(), (hg == "risk").sum()) < MIN_CALIBRATION_PER_GROUP
    ):
        out.append(
            f"calibrated on {len(hg)} held-out infants ({_counts(hg)}); the minimum is "
            f"{MIN_CALIBRATION_INFANTS} with {MIN_CALIBRATION_PER_GROUP} of each group"
        )
    for kind in sorted(set(k.tolist())):
        tr, ho = int(((k == kind) & ~held).sum()), int(((k == kind) & held).sum())
        if tr < MIN_DOMAIN_TRAIN or ho < MIN_DOMAIN_HELDOUT:
            out.append(
                f"domain check of {kind} recordings fitted on {tr} training and {ho} held-out "
                f"recordings; the minimum is {MIN_DOMAIN_TRAIN} and {MIN_DOMAIN_HELDOUT}"
            )
    return out


def domain_coverage(train_kinds: Sequence[str], held_kinds: Sequence[str]) -> dict[str, str]:
    """Per source kind, whether the domain check describes it and why (not), in plain words;
    the rule of ``fit_domain``."""
    out = {}
    for kind in SOURCE_KINDS:
        tr, ho = list(train_kinds).count(kind), list(held_kinds).count(kind)
        if tr < DOMAIN_FIT_FLOOR:
            out[kind] = (
                f"not described: {tr} training recordings of this kind (at least "
                f"{DOMAIN_FIT_FLOOR} needed); its recordings are refused as indeterminate"
            )
        elif ho < DOMAIN_FIT_FLOOR:
            out[kind] = (
                f"described from {tr} training recordings, thresholds set on them (only {ho} "
                f"held out, {DOMAIN_FIT_FLOOR} needed): too many new recordings come back out "
                "of domain"
            )
        else:
            out[kind] = f"described from {tr} training recordings, thresholds from {ho} held out"
    return out


def reference_branch(intervals: Sequence[list | None], use_reference: bool) -> str:
    """``"on"``, or ``"off: why"``: the Ref Branch needs annotated FMs intervals (``intervals``:
    per infant, None where its folder has no fms_intervals.csv)."""
    if not use_reference:
        return "off: turned off (--no-reference)"
    if all(iv is None for iv in intervals):
        return "off: no FMs intervals (no fms_intervals.csv)"
    if not any(intervals):
        return "off: no FMs intervals (fms_intervals.csv lists none)"
    return "on"


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
        if len(tr) < DOMAIN_FIT_FLOOR:
            logger.warning("only %d training recordings of kind %s: not described", len(tr), kind)
            continue
        motion = Gaussian.fit(train.motion[tr])
        embedding = Gaussian.fit(np.concatenate([train.embeddings[i] for i in tr]))
        # Held-out infants set the thresholds; with too few, training infants do (optimistic).
        src, idx = (held, ho) if len(ho) >= DOMAIN_FIT_FLOOR else (train, tr)
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


def heldout_flags(domain: DomainModel, held: Scores, held_recs: Sequence[TrainRecord]):
    """Per held-out infant, whether the domain check flags it (bool array): computed once, for
    the domain record and the held-out results."""
    return np.array(
        [not domain.check(kind_of(r.source), held.embeddings[i], held.motion[i]).in_domain
         for i, r in enumerate(held_recs)], bool,
    )  # fmt: skip


def domain_record(domain: DomainModel, held_recs: Sequence[TrainRecord], flags) -> dict:
    """What the domain check does on the held-out infants (``flags``: ``heldout_flags``): their
    number and the share flagged, per kind (the thresholds aim at about 1-2%)."""
    flagged: dict[str, list[bool]] = {}
    for r, f in zip(held_recs, flags):
        flagged.setdefault(kind_of(r.source), []).append(bool(f))
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
    """Train on most infants, calibrate on the rest; returns the model and its metadata.

    The provenance records the data seen (content digests of the training and calibration
    poses, the infants declared simulated or recordings), the Ref Branch's state, the domain
    check's coverage per kind and every shortfall below the documented minimums."""
    groups = [r.group for r in records]
    held = (
        stratified_split(groups, calibration_fraction, cfg.seed)
        if calibration_fraction > 0
        else np.zeros(len(records), bool)
    )
    problem = data_problem(groups, held)
    if problem:
        raise InsufficientDataError(problem)
    reference = reference_branch([r.fms_intervals_s for r in records], cfg.use_reference)
    if reference != "on" and cfg.use_reference:
        logger.warning("reference branch %s", reference)
        cfg = dataclasses.replace(cfg, use_reference=False, use_closeness=False)
    train_recs = [r for r, h in zip(records, held) if not h]
    cal_recs = [r for r, h in zip(records, held) if h]
    small = data_shortfalls(groups, [kind_of(r.source) for r in records], held)
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
        provenance={
            **provenance,
            "train_config": cfg.to_dict(),
            "calibration": {},
            "reference_branch": reference,
            "small_data": small,
            "data_digests": {
                "train": sorted(r.digest for r in train_recs),
                "calibration": sorted(r.digest for r in cal_recs),
            },
            "data_declared": {
                "simulated": sum(r.simulated for r in records),
                "recordings": sum(not r.simulated for r in records),
            },
        },
    )
    s_train = score_records(model, meta, train_recs)
    s = score_records(model, meta, cal_recs) if cal_recs else s_train
    meta.domain = fit_domain(s_train, train_recs, s, cal_recs, cfg.representation)
    flags = heldout_flags(meta.domain, s, cal_recs)
    meta.provenance["domain"] = domain_record(meta.domain, cal_recs, flags)
    meta.provenance["domain"]["coverage"] = domain_coverage(
        [kind_of(r.source) for r in train_recs], [kind_of(r.source) for r in cal_recs]
    )
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
    meta.provenance["heldout_results"] = heldout_results(meta, s, cal_recs, flags)
    logger.info("calibrated on %d held-out infants", int(held.sum()))
    return model, meta


def calibrated_risk(cal, z_bag: np.ndarray, z_info: np.ndarray) -> np.ndarray:
    """P(risk) of a kind's calibration (``KindCalibration``) as screening computes it: with the
    Info branch where an infant has data (``z_info`` finite), without it elsewhere."""
    has = np.isfinite(z_info)
    return 1 - np.where(
        has,
        cal.calibration.apply(z_bag, np.where(has, z_info, 0.0)),
        cal.calibration_without_info.apply(z_bag),
    )


def heldout_results(meta: ModelMeta, held: Scores, held_recs: Sequence[TrainRecord], flags) -> dict:
    """Per kind, what the finished weights answer for the held-out infants: the share out of
    domain, and the share called risk among those in domain (each infant's calibrated P(risk)
    against its kind's threshold, with the Info branch where it has infant data). These are the
    validation-time expectations a deployment's drift alerts compare live rates with; the risk
    share is that of the held-out population (often enriched with infants at risk). ``flags``:
    ``heldout_flags``."""
    kinds = np.array([kind_of(r.source) for r in held_recs])
    out = {}
    for kind in sorted(set(kinds.tolist())):
        idx = np.flatnonzero(kinds == kind)
        cal = meta.calibrated(kind)
        p_risk = calibrated_risk(cal, held.z_bag[idx], held.z_info[idx])
        flagged = np.asarray(flags, bool)[idx]
        inside = ~flagged
        out[kind] = {
            "recordings": int(len(idx)),
            "out_of_domain": float(flagged.mean()),
            "risk": float(np.mean(p_risk[inside] >= cal.risk_threshold)) if inside.any() else None,
        }
    return out


def recalibrate(
    model: MAM, meta: ModelMeta, records: Sequence[TrainRecord], kind: str,
    *, target: str = "youden", value: float | None = None, accept_small_data: bool = False,
    bootstrap: int | None = None, seed: int = 0,
) -> ModelMeta:  # fmt: skip
    """Give ``kind`` a calibration of its own, fitted on ``records`` that the weights never
    trained on (e.g. recordings a site screened and knows the outcome of): the network, its
    domain record and every other kind's calibration stay as they were.

    The kind's risk threshold is the operating point ``target`` (``youden``, or
    ``sensitivity`` / ``specificity`` >= ``value``: ``mam.training.calibration.operating_point``)
    on the recalibrated P(risk), each recording's as screening computes it (with the Info branch
    where it has infant data). The provenance records the operating point with its bootstrap
    intervals, the data's size and the recordings' content digests (so that an evaluation on
    them can be told it is not independent). Fewer than ``MIN_KIND_INFANTS`` recordings raise
    ``InsufficientDataError`` unless ``accept_small_data``, which then records the shortfall in
    ``provenance["small_data"]`` (every result of the weights warns of it)."""
    from mam.training.calibration import BOOTSTRAP, operating_point

    if any(kind_of(r.source) != kind for r in records):
        raise ValueError(f"every record must be of kind {kind!r}")
    normal = np.array([r.group == "normal" for r in records], bool)
    n_normal, n_risk = int(normal.sum()), int((~normal).sum())
    counts = f"{len(records)} {kind} recordings ({n_normal} normal, {n_risk} risk)"
    if normal.all() or not normal.any():
        raise InsufficientDataError(f"{counts}: calibration needs both normal and risk infants")
    enough = own_fit_possible(normal)
    if not enough and not accept_small_data:
        raise InsufficientDataError(
            f"{counts}: a calibration of its own needs at least {MIN_KIND_INFANTS} infants "
            "of both groups"
        )
    said = f"{kind} calibration fitted on"  # replaces what an earlier one said of this kind
    if "small_data" in meta.provenance or not enough:
        small = meta.provenance.setdefault("small_data", [])
        small[:] = [w for w in small if not w.startswith(said)]
        if not enough:
            small.append(
                f"{said} {len(records)} recordings, {n_normal} normal and {n_risk} risk; the "
                f"minimum is {MIN_KIND_INFANTS}"
            )
    s = score_records(model, meta, records)
    cal = fit_calibration(s.z_bag, s.z_info, normal, f"platt ({kind})")
    p_risk = calibrated_risk(cal, s.z_bag, s.z_info)
    op = operating_point(
        p_risk, ~normal, target, value,
        bootstrap=BOOTSTRAP if bootstrap is None else bootstrap, seed=seed,
    )  # fmt: skip
    cal.risk_threshold = op.threshold
    meta.calibration_by_kind[kind] = cal
    prov = meta.provenance
    calib = prov.setdefault("calibration", {})
    calib.setdefault("by_kind", {})[kind] = len(records)
    calib.setdefault("operating_point", {})[kind] = {
        **op.to_dict(),
        "method": f"platt on {len(records)} recordings the weights never trained on",
        "recordings_with_infant_data": int(np.isfinite(s.z_info).sum()),
        "recalibrated_from_version": meta.version,
    }
    digests = prov.setdefault("data_digests", {})
    digests["calibration"] = sorted(
        set(digests.get("calibration", [])) | {r.digest for r in records}
    )
    logger.info("calibrated kind %s on %d infants", kind, len(records))
    return meta
