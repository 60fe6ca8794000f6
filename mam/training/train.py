"""Training MAM with the paper's loss (Methods, "Construction details and loss functions").

loss = L_t (triplet, margin 0.4, on the Ref Branch's labelled clips)
     + L_c (closeness: instance representations pulled toward the FMs or non-FMs centre)
     + L_c1 (clip cross-entropy, Ref Branch) + L_c2 (bag cross-entropy, Main + Info Branch).

A step holds labelled reference clips (half FMs, half non-FMs) and the instances of one normal
and one risk infant's bags, like the paper's batch of 64. SGD with CyclicLR. The Info branch's
input is dropped for a share of the bags (``info_dropout``) so that the bag log-odds alone stay
meaningful when a request carries no infant data (the paper trains MAM.w/o.info separately).
"""

from __future__ import annotations

import csv
import hashlib
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from mam.features import (
    CLIP_FRAMES,
    Normalizer,
    clip_bounds,
    intervals_to_mask,
    prepare_sequence,
)
from mam.model.config import MAMConfig
from mam.model.network import MAM
from mam.pose.base import PoseSequence
from mam.pose.representation import model_input
from mam.training.presets import MODEL_CONFIGS, PRESETS
from mam.training.presets import (
    compact_model_config as compact_model_config,  # callers import it here
)

logger = logging.getLogger(__name__)


@dataclass
class TrainRecord:
    """One infant's recording for training: pose ``[T, 17, 3]`` (NaN where untracked), and
    for a recording the pose backend's 2D image joints ``[T, 17, 2]`` and name (``source``)."""

    infant_id: str
    joints: np.ndarray
    group: str  # "normal" | "risk"
    fms_intervals_s: list[tuple[float, float]] | None = None
    info: np.ndarray | None = None  # raw [sex_male, GA weeks, BW g, corrected age weeks]
    fms_category: str | None = None  # continuous / intermittent / sporadic / absent, if known
    image_joints: np.ndarray | None = None
    source: str = "precomputed"
    simulated: bool = False  # declared by its folder's dataset.json (mam.training.dataset)

    def pose(self) -> PoseSequence:
        meta = {} if self.image_joints is None else {"image_joints": self.image_joints}
        conf = np.isfinite(self.joints).all(axis=-1).astype(np.float32)
        return PoseSequence(self.joints, conf, source=self.source, meta=meta)

    def model_input(self, representation: str) -> np.ndarray:
        """What the model sees of this recording (``mam.pose.representation``)."""
        return model_input(self.pose(), representation)

    @property
    def digest(self) -> str:
        """sha256 of the pose's joints (float32, C order): the same recording gives the same
        digest whether it was posed from video, read from the batch's kept pose or exported by
        the review app, so weights can name the data they saw without naming an infant."""
        return pose_digest(self.joints)


def pose_digest(joints: np.ndarray) -> str:
    """Content digest of a pose ``[T, 17, 3]`` (see ``TrainRecord.digest``)."""
    return hashlib.sha256(np.ascontiguousarray(joints, np.float32).tobytes()).hexdigest()


@dataclass
class TrainConfig:
    """Every hyper-parameter of a run; written next to the weights."""

    model: MAMConfig = field(default_factory=MAMConfig.paper)
    epochs: int = 300
    pretrain_epochs: int = 0
    ref_clips_per_step: int = 32
    instances_per_bag: int = 16
    clip_step: int = 90
    ref_clip_step: int = 30
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = 1e-3
    max_lr: float = 1e-2
    momentum: float = 0.9
    weight_decay: float = 1e-4
    triplet_margin: float = 0.4
    info_dropout: float = 0.5
    use_reference: bool = True  # ablation: False trains from bag labels alone (no Ref Branch)
    use_closeness: bool = True  # ablation: False drops the closeness loss
    representation: str = "image2d"  # the pose coordinates the model sees
    seed: int = 0
    threads: int | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["model"] = self.model.to_dict()
        return d

    @classmethod
    def preset(cls, name: str, **overrides) -> TrainConfig:
        """A named recipe (``mam.training.presets.PRESETS``) with any field replaced (``model``
        also by name): ``"compact"`` is what ``mam train`` does by default (minutes on a 2-core
        CPU), ``"paper"`` the paper's run (300 epochs of SGD on its network, these defaults)."""
        if name not in PRESETS:
            raise ValueError(f"unknown training preset {name!r}; choose from {', '.join(PRESETS)}")
        fields = {**PRESETS[name], **overrides}
        if isinstance(fields.get("model"), str):
            fields["model"] = MODEL_CONFIGS[fields["model"]]()
        return cls(**fields)


def difference_tensor(poses: torch.Tensor) -> torch.Tensor:
    """``[B, T, V, 3]`` -> ``[B, T, 3, V, V]`` (the rule of ``features.difference_matrices``)."""
    x = poses.transpose(-1, -2)
    return x.unsqueeze(-1) - x.unsqueeze(-2)


def triplet_loss(features: torch.Tensor, labels: torch.Tensor, margin: float) -> torch.Tensor:
    """Paper eqs. 2-3: each anchor's mean distance to its class minus to the other, plus margin."""
    dist = torch.cdist(features, features)
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=features.device)
    d_pos = (dist * (same & ~eye)).sum(1) / (same & ~eye).sum(1).clamp(min=1)
    d_neg = (dist * ~same).sum(1) / (~same).sum(1).clamp(min=1)
    return F.relu(d_pos - d_neg + margin).mean()


def closeness_loss(
    inst_features: torch.Tensor, inst_fms_prob: torch.Tensor, fms_centre: torch.Tensor, non_centre
) -> torch.Tensor:
    """Paper eqs. 4-7: weight alpha(1 - alpha) times the softmax share of the distance to the
    centre the instance is predicted to belong to."""
    d = torch.stack(
        [
            torch.norm(inst_features - fms_centre, dim=1),
            torch.norm(inst_features - non_centre, dim=1),
        ],
        dim=1,
    )
    share = torch.softmax(d, dim=1)
    own = torch.where(inst_fms_prob >= 0.5, share[:, 0], share[:, 1])
    return (inst_fms_prob * (1 - inst_fms_prob) * own).mean()


class _Prepared:
    """Smoothed, normalised sequences with their instance windows and reference clips."""

    def __init__(
        self, inputs: Sequence[np.ndarray], records: Sequence[TrainRecord], normalizer: Normalizer,
        cfg: TrainConfig,
    ):  # fmt: skip
        self.seqs = [prepare_sequence(x, normalizer) for x in inputs]
        self.groups = np.array([r.group == "normal" for r in records])
        self.windows: list[list[int]] = []
        self.ref: list[tuple[int, int, int]] = []  # (record, start, label)
        for k, (r, seq) in enumerate(zip(records, self.seqs)):
            ok = np.isfinite(seq).all(axis=(1, 2))
            bounds = clip_bounds(len(seq), CLIP_FRAMES, cfg.clip_step)
            self.windows.append([s for s, e in bounds if ok[s:e].all()])
            if r.fms_intervals_s is None:
                continue
            fms = intervals_to_mask(r.fms_intervals_s, len(seq))
            for s, e in clip_bounds(len(seq), CLIP_FRAMES, cfg.ref_clip_step, cover_tail=False):
                if not ok[s:e].all():
                    continue
                if fms[s:e].all():
                    self.ref.append((k, s, 1))  # fully covered by FMs (paper, Cohort 3)
                elif not fms[s:e].any():
                    self.ref.append((k, s, 0))  # no FMs at all
        self.ref_arr = np.array(self.ref, dtype=np.int64).reshape(-1, 3)

    def window(self, k: int, start: int) -> np.ndarray:
        return np.nan_to_num(self.seqs[k][start : start + CLIP_FRAMES])


def _info_vectors(records: Sequence[TrainRecord]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    info = np.array(
        [r.info if r.info is not None else [np.nan] * 4 for r in records], dtype=np.float64
    )
    mean = np.nanmean(info, axis=0) if np.isfinite(info).any() else np.zeros(4)
    std = np.nanstd(info, axis=0) if np.isfinite(info).any() else np.ones(4)
    std = np.where(np.isfinite(std) & (std > 0), std, 1.0)
    mean = np.where(np.isfinite(mean), mean, 0.0)
    return (info - mean) / std, mean, std


@dataclass
class Losses:
    """The paper's four terms of one step (Methods, eq. 8), with their names spelled out."""

    triplet: torch.Tensor  # L_t: reference clips, FMs vs non-FMs, margin 0.4
    closeness: torch.Tensor  # L_c: instances pulled toward the centre they are predicted in
    clip_ce: torch.Tensor  # L_c1: cross-entropy of the reference clips' FMs labels
    bag_ce: torch.Tensor  # L_c2: cross-entropy of the bags' normal/risk labels (+ Info)

    @property
    def total(self) -> torch.Tensor:
        return self.triplet + self.closeness + self.clip_ce + self.bag_ce

    def values(self) -> list[float]:
        return [self.total.item(), self.triplet.item(), self.closeness.item(),
                self.clip_ce.item(), self.bag_ce.item()]  # fmt: skip


LOG_COLUMNS = ("epoch", "phase", "loss", "triplet", "closeness", "clip_ce", "bag_ce", "lr",
               "seconds")  # fmt: skip


class _Sampler:
    """What one step sees: reference clips (half FMs, half non-FMs) and a bag of instances of
    one infant, drawn from the prepared data with the run's generator."""

    def __init__(self, data: _Prepared, cfg: TrainConfig, rng: np.random.Generator) -> None:
        self.data, self.cfg, self.rng = data, cfg, rng
        self.ref_fms = np.flatnonzero(data.ref_arr[:, 2] == 1)
        self.ref_non = np.flatnonzero(data.ref_arr[:, 2] == 0)
        self.half = cfg.ref_clips_per_step // 2 if cfg.use_reference else 0

    def reference(self) -> tuple[torch.Tensor, torch.Tensor]:
        idx = np.concatenate(
            [self.rng.choice(self.ref_fms, self.half), self.rng.choice(self.ref_non, self.half)]
        )
        rows = self.data.ref_arr[idx]
        x = np.stack([self.data.window(k, s) for k, s, _ in rows])
        return torch.from_numpy(x), torch.from_numpy(rows[:, 2])

    def bag(self, k: int) -> torch.Tensor:
        w = self.data.windows[k]
        n = min(len(w), self.cfg.instances_per_bag)
        take = sorted(self.rng.choice(len(w), n, replace=False))
        return torch.from_numpy(np.stack([self.data.window(k, w[i]) for i in take]))


def _optimiser(model: MAM, cfg: TrainConfig, steps_per_epoch: int):
    if cfg.optimizer == "sgd":  # the paper's choice
        opt = torch.optim.SGD(
            model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
    else:  # converges in far fewer epochs than the paper's 300; used for CPU-sized runs
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CyclicLR(
        opt,
        base_lr=cfg.lr,
        max_lr=cfg.max_lr,
        step_size_up=max(1, 2 * steps_per_epoch),
        mode="triangular2",
        cycle_momentum=False,
    )
    return opt, sched


def _step_losses(
    model: MAM,
    sampler: _Sampler,
    bags: tuple[int, int],
    info_z: np.ndarray,
    cfg: TrainConfig,
    pretrain: bool,
) -> Losses:
    """One step's forward pass: reference clips and the normal and risk bags go through the
    clip network together; the losses are the paper's."""
    zero = torch.zeros(())
    parts = []
    if sampler.half:
        x_ref, y_ref = sampler.reference()
        parts.append(x_ref)
    bag_x = [] if pretrain else [sampler.bag(k) for k in bags]
    parts += bag_x
    feats, logits = model.forward_clips(difference_tensor(torch.cat(parts)))
    n_ref = len(parts[0]) if sampler.half else 0
    triplet = clip_ce = closeness = bag_ce = zero
    if sampler.half:
        triplet = triplet_loss(feats[:n_ref], y_ref, cfg.triplet_margin)
        clip_ce = F.cross_entropy(logits[:n_ref], y_ref)
    if not pretrain:
        inst_feats, inst_logits = feats[n_ref:], logits[n_ref:]
        if sampler.half and cfg.use_closeness:
            fms_centre = feats[:n_ref][y_ref == 1].mean(0)
            non_centre = feats[:n_ref][y_ref == 0].mean(0)
            alpha = torch.softmax(inst_logits, 1)[:, 1]
            closeness = closeness_loss(inst_feats, alpha, fms_centre, non_centre)
        z, offset = [], 0
        for k, x in zip(bags, bag_x):
            bag_p, _ = model.forward_bag(inst_logits[offset : offset + len(x)].unsqueeze(0))
            offset += len(x)
            info = info_z[k]
            # Info dropout: the bag log-odds alone must stay meaningful (requests without data).
            use_info = np.isfinite(info).all() and sampler.rng.random() >= cfg.info_dropout
            info_logits = (
                model.forward_info(torch.tensor(info, dtype=torch.float32)[None])
                if use_info else None
            )  # fmt: skip
            z.append(model.normal_logit(bag_p, info_logits))
        bag_ce = F.binary_cross_entropy_with_logits(torch.cat(z), torch.tensor([1.0, 0.0]))
    return Losses(triplet, closeness, clip_ce, bag_ce)


def _check_groups(records: Sequence[TrainRecord], data: _Prepared, cfg: TrainConfig):
    from mam.training.fitting import InsufficientDataError  # fitting imports this module

    normal = [i for i, r in enumerate(records) if r.group == "normal"]
    risk = [i for i, r in enumerate(records) if r.group == "risk"]
    if not normal or not risk:
        raise InsufficientDataError(
            f"the training share holds {len(normal)} normal and {len(risk)} risk infants; "
            "training needs at least one of each group"
        )
    if cfg.pretrain_epochs and not cfg.use_reference:
        raise ValueError("pre-training the clip encoder needs the reference clips")
    labels = data.ref_arr[:, 2]
    n_fms, n_non = int((labels == 1).sum()), int((labels == 0).sum())
    if cfg.use_reference and (not n_fms or not n_non):
        raise InsufficientDataError(
            f"the FMs intervals give {n_fms} FMs and {n_non} non-FMs reference clips of 9.6 s; "
            "the reference branch needs both (annotate intervals of at least 9.6 s, or train "
            "with --no-reference)"
        )
    logger.info("training on %d normal + %d risk infants, %d FMs / %d non-FMs reference clips",
                len(normal), len(risk), n_fms, n_non)  # fmt: skip
    return normal, risk


def train(
    records: Sequence[TrainRecord],
    cfg: TrainConfig,
    log_csv: str | Path | None = None,
    progress: bool | None = None,
) -> tuple[MAM, dict]:
    """Train on ``records``; returns the model (eval mode) and the preprocessing metadata
    (normaliser, Info-branch statistics) that must be saved with it.

    Steps: the model's input of every record (``mam.pose.representation``), a normaliser fitted
    on it, windows and reference clips (``_Prepared``); then epochs of steps that each hold one
    normal and one risk bag (each infant seen once an epoch in the larger group), optionally
    after ``pretrain_epochs`` of reference clips alone."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)
    inputs = [r.model_input(cfg.representation) for r in records]
    normalizer = Normalizer.fit(inputs)
    data = _Prepared(inputs, records, normalizer, cfg)
    normal, risk = _check_groups(records, data, cfg)
    info_z, info_mean, info_std = _info_vectors(records)
    model = MAM(cfg.model)
    steps_per_epoch = max(len(normal), len(risk))
    opt, sched = _optimiser(model, cfg, steps_per_epoch)
    sampler = _Sampler(data, cfg, rng)
    total_epochs = cfg.pretrain_epochs + cfg.epochs
    if log_csv is not None:
        Path(log_csv).parent.mkdir(parents=True, exist_ok=True)
    log = open(log_csv, "w", newline="") if log_csv is not None else None  # noqa: SIM115
    writer = csv.writer(log) if log else None
    if writer:
        writer.writerow(LOG_COLUMNS)
    show = sys.stderr.isatty() if progress is None else progress
    bar = None
    if show:
        from tqdm import tqdm

        bar = tqdm(total=total_epochs * steps_per_epoch, desc="training", unit="step")
    try:
        for epoch in range(total_epochs):
            pretrain = epoch < cfg.pretrain_epochs
            model.train()
            t0 = time.perf_counter()
            sums = np.zeros(5)
            order_n = rng.permutation(np.resize(normal, steps_per_epoch))
            order_r = rng.permutation(np.resize(risk, steps_per_epoch))
            for kn, kr in zip(order_n, order_r):
                losses = _step_losses(model, sampler, (kn, kr), info_z, cfg, pretrain)
                opt.zero_grad()
                losses.total.backward()
                opt.step()
                sched.step()
                sums += losses.values()
                if bar:
                    bar.update()
            means = sums / steps_per_epoch
            phase = "pretrain" if pretrain else "joint"
            logger.info("epoch %d %s loss %.4f", epoch, phase, means[0])
            if writer:
                writer.writerow([epoch, phase, *np.round(means, 5), sched.get_last_lr()[0],
                                 round(time.perf_counter() - t0, 2)])  # fmt: skip
    finally:
        if bar:
            bar.close()
        if log:
            log.close()
    model.eval()
    return model, {
        "normalizer": normalizer,
        "info_mean": tuple(map(float, info_mean)),
        "info_std": tuple(map(float, info_std)),
    }
