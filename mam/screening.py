"""The one screening pipeline that the CLI, the service and the batch runner call.

video -> frames at 25 fps (``mam.video``) -> pose (``mam.pose``) -> gap filling and quality ->
instances (``mam.features``) -> clip network, bag head, Info branch (``mam.runtime``: ONNX Runtime,
TensorRT or PyTorch) -> fusion and calibration (here, numpy) -> result.
Each stage is timed; nothing of the recording is logged or kept.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from mam.domain import kind_of, motion_statistics, still
from mam.errors import VideoTooShortError
from mam.features import Instances, build_instances
from mam.model.card import is_demo
from mam.model.weights import ModelMeta, load_meta
from mam.pose import (
    PoseBackend,
    PoseSequence,
    assess_quality,
    check_trackable,
    create_backend,
    fill_gaps,
    load_pose_file,
)
from mam.pose.base import backend_class, default_pose_backend
from mam.pose.from_video import estimate_video_pose
from mam.pose.representation import model_input, raw_trunk_length
from mam.runtime import InferenceRuntime, create_runtime
from mam.runtime.sessions import default_threads
from mam.schemas import (
    Classification,
    Clip,
    DomainCheck,
    InfantData,
    ModelInfo,
    Quality,
    ScreeningResult,
)
from mam.shipped import models_dir
from mam.skeleton import FPS
from mam.video import VideoLimits

logger = logging.getLogger(__name__)

DEFAULT_WEIGHTS = models_dir() / "mam_demo.json"
TOP_CLIPS = 3
SPORADIC_DEFAULT = 1e-6  # without a fitted cut-off: one FMs clip is sporadic, none is absent
MIN_TRACKED_FOR_RESULT = 0.8
"""The quality gate: below this share of tracked frames a result is indeterminate (between
``mam.pose.quality``'s refusal at 50% and this, the pose is too patchy to trust)."""
NO_DOMAIN = (
    "these weights carry no record of the data they were trained on, so whether this "
    "recording resembles it cannot be checked"
)
STILL = "there is no movement to assess: the skeleton is the same in every frame"
_EPS = 1e-6  # as mam.model.network: P(normal) is clipped before taking log-odds


def default_weights() -> Path:
    """``MAM_WEIGHTS`` if set, else the shipped demo weights (``mam.shipped``)."""
    from mam.settings import current

    return current().weights or DEFAULT_WEIGHTS


@dataclass
class ScreeningOptions:
    """Knobs of one screening run; defaults follow the paper and DESIGN.md."""

    pose_backend: str = field(default_factory=default_pose_backend)
    limits: VideoLimits = field(default_factory=VideoLimits)
    max_side: int | None = 1280  # BlazePose works on 256 px crops; full 4K decode buys nothing
    max_gap_s: float = 0.5
    min_tracked_fraction: float = 0.5
    clip_step: int | None = None  # None: the step the model was trained with
    runtime: str | None = None  # None: MAM_RUNTIME, else auto (mam.runtime)
    device: str = "auto"
    precision: str = "fp32"
    # Abstain (classification 'indeterminate') where the model cannot speak for the input;
    # False (--no-abstain) keeps the model's label for research, still marked not to be used.
    abstain: bool = True
    # Parts of a recording (the backend's part_frames, mam.pose.base.PoseBackendBase) posed at
    # once, each in its own thread with its own backend; the joints are the same whatever the
    # number. None: one per CPU thread (``threads``, else MAM_RUNTIME_THREADS, else the usable
    # CPUs), each part's network on one thread, where the backend says parts are worth it
    # (parts_in_parallel: on ONNX Runtime's CPU route); 1 elsewhere.
    parallel_parts: int | None = None
    min_tracked_for_result: float = MIN_TRACKED_FOR_RESULT
    # CPU threads of the clip network's and the pose networks' ONNX Runtime sessions (a batch
    # worker's share of the CPUs); None: MAM_RUNTIME_THREADS, else the usable CPUs.
    threads: int | None = None


@dataclass
class ClipScores:
    """What the model says about one bag of instances."""

    fms_probability: np.ndarray  # [N]
    attention: np.ndarray  # [N]
    normal_probability: float
    used_info: bool
    embeddings: np.ndarray | None = None  # [N, D] clip representations (the domain check)
    # The source kind whose calibration made normal_probability (None: the overall one); its
    # risk threshold is the one that classifies it.
    calibrated_as: str | None = None


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    e = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def bag_log_odds(bag_probs: np.ndarray) -> np.ndarray:
    """The bag head's log-odds of normal ``[B]`` (P(normal) clipped to [1e-6, 1 - 1e-6])."""
    p = np.clip(np.asarray(bag_probs, np.float64)[:, 1], _EPS, 1 - _EPS)
    return np.log(p) - np.log1p(-p)


def info_log_odds(info_logits: np.ndarray) -> np.ndarray:
    """The Info branch's log-odds of normal ``[B]``."""
    info = np.asarray(info_logits, np.float64)
    return info[:, 1] - info[:, 0]


def normal_log_odds(bag_probs: np.ndarray, info_logits: np.ndarray | None = None) -> np.ndarray:
    """Log-odds of normal ``[B]``: the bag's plus, if given, the Info branch's (numpy twin of
    ``MAM.normal_logit``, the training objective's product of experts)."""
    z = bag_log_odds(bag_probs)
    return z if info_logits is None else z + info_log_odds(info_logits)


def fuse_normal_probability(
    bag_probs: np.ndarray, info_logits: np.ndarray | None, meta: ModelMeta,
    kind: str | None = None,
) -> np.ndarray:  # fmt: skip
    """Calibrated P(normal) ``[B]`` from the bag head and, if given, the Info branch: the one
    place where branches are fused and calibrated, whatever runtime produced them. Calibration
    (``meta.calibrated(kind)``: the source kind's own where the weights have one) weighs the two
    branches' log-odds; uncalibrated it is their sum."""
    if meta.config.fusion == "reference":
        bag = np.asarray(bag_probs, np.float64)
        if info_logits is None:
            return bag[:, 1]
        # NOTE: reference fusion, kept only for parity; caps outputs to [0.12, 0.88].
        return softmax(bag + softmax(np.asarray(info_logits, np.float64)))[:, 1]
    cal = meta.calibrated(kind)
    if info_logits is None:
        return cal.calibration_without_info.apply(bag_log_odds(bag_probs))
    return cal.calibration.apply(bag_log_odds(bag_probs), info_log_odds(info_logits))


def fms_category(frequency: float, thresholds: dict[str, float]) -> str:
    """Prechtl's category (``mam.gma``) from the FMs frequency: at or above each cut-off in turn
    (continuous, intermittent, sporadic), else absent. Weights from before the sporadic cut-off
    was fitted call any FMs clip sporadic."""
    for name in ("continuous", "intermittent"):
        if frequency >= thresholds[name]:
            return name
    return "sporadic" if frequency >= thresholds.get("sporadic", SPORADIC_DEFAULT) else "absent"


class ScreeningCancelled(Exception):
    """``Screener.screen_video`` stopped because its ``cancelled`` hook said so."""


class Screener:
    """Loads the model once; screens recordings, pose files or ready-made instances.

    Args:
        weights: ``NAME.json`` of the weights (default: ``default_weights()``).
        options: pipeline options.
    """

    def __init__(
        self,
        weights: str | Path | None = None,
        options: ScreeningOptions | None = None,
        runtime: InferenceRuntime | None = None,
    ):
        self.options = o = options or ScreeningOptions()
        self.weights_path = Path(weights) if weights else default_weights()
        self.meta, _, self.weights_sha256 = load_meta(self.weights_path)
        self.model_digest: str = self.meta.digest  # computed once: every result carries it
        # What runs the networks; its ``backend``, ``device`` and ``precision`` name it in results.
        self.runtime: InferenceRuntime = runtime or create_runtime(
            self.weights_path, o.runtime, device=o.device, precision=o.precision, threads=o.threads
        )
        self.threads = default_threads(o.threads)
        self._pose = threading.local()  # one pose backend per thread: they keep per-video state
        logger.info(
            "model %s %s (digest %s) on %s (%s, %s)",
            self.meta.name,
            self.meta.version,
            self.model_digest[:12],
            self.runtime.backend,
            self.runtime.device,
            self.runtime.precision,
        )

    # -- model ------------------------------------------------------------------------------------
    def score_instances(
        self, tensors: np.ndarray, infant: InfantData | None = None, kind: str | None = None
    ) -> ClipScores:
        """Instances ``[N, 240, 3, 17, 17]`` (already smoothed and normalised) -> scores."""
        embeddings, logits = self.runtime.clip(tensors)
        return self.score_logits(logits, infant, embeddings, kind)

    def score_logits(
        self, logits: np.ndarray, infant: InfantData | None = None,
        embeddings: np.ndarray | None = None, kind: str | None = None,
    ) -> ClipScores:  # fmt: skip
        """Clip logits ``[N, 2]`` (and the clip embeddings, for the domain check) -> scores:
        bag head, Info branch and fusion, calibrated for the source ``kind`` (``None``: bare
        instances, the overall calibration). Split from the clip network so that a service
        can run that network elsewhere (batched across requests) and finish here."""
        meta = self.meta
        bag, attention = self.runtime.bag(np.asarray(logits, np.float32)[None])
        info_logits = None
        if infant is not None and infant.complete:
            z = (np.asarray(infant.vector()) - meta.info_mean) / meta.info_std
            info_logits = self.runtime.info(np.asarray(z, np.float32)[None])
        p_normal = fuse_normal_probability(bag, info_logits, meta, kind)
        return ClipScores(
            fms_probability=softmax(logits)[:, 1].astype(float),
            attention=attention[0].astype(float),
            normal_probability=float(p_normal[0]),
            used_info=info_logits is not None,
            embeddings=None if embeddings is None else np.asarray(embeddings, np.float64),
            calibrated_as=kind if kind in meta.calibration_by_kind else None,
        )

    # -- pipeline ---------------------------------------------------------------------------------
    def pose_estimator(self) -> PoseBackend:
        """This thread's pose backend, made on first use and kept: making one can cost seconds
        (graphs, ONNX sessions, weight hashes, first-use conversion) and would otherwise be
        paid per recording. Backends reset their state at every ``estimate``."""
        if self.options.threads and backend_class(self.options.pose_backend).takes_threads:
            return self._thread_backend(threads=self.threads)
        return self._thread_backend()

    def _thread_backend(self, **kwargs) -> PoseBackend:
        backend = getattr(self._pose, "backend", None)
        if backend is None:
            backend = self._pose.backend = create_backend(self.options.pose_backend, **kwargs)
        return backend

    @cached_property
    def parallel_parts(self) -> int:
        """Parts of a recording posed at once (``ScreeningOptions.parallel_parts``, resolved)."""
        if self.options.parallel_parts is not None:
            return max(1, self.options.parallel_parts)
        parallel = backend_class(self.options.pose_backend).parts_in_parallel()
        return self.threads if parallel else 1

    def part_estimator(self) -> PoseBackend:
        """A pose-part thread's backend (kept like ``pose_estimator``'s), its network on its
        share of the CPU threads when the backend takes a thread count."""
        if not backend_class(self.options.pose_backend).takes_threads:
            return self._thread_backend()
        return self._thread_backend(threads=max(1, self.threads // self.parallel_parts))

    @cached_property
    def _parts_pool(self):
        """Threads that pose the parts of a recording, each keeping its own backend (made by
        ``part_estimator`` in that thread); None with one part."""
        if self.parallel_parts <= 1:
            return None
        from concurrent.futures import ThreadPoolExecutor

        return ThreadPoolExecutor(self.parallel_parts, "pose-part")

    def screen_video(
        self,
        path: str | Path,
        infant: InfantData | None = None,
        progress: Callable[[int, int], None] | None = None,
        cancelled: Callable[[], bool] | threading.Event | None = None,
    ) -> ScreeningResult:
        """Screen one recording: :meth:`pose_video`, then :meth:`screen_pose`."""
        seq, timings = self.pose_video(path, progress, cancelled)
        return self.screen_pose(seq, infant, timings=timings)

    def pose_video(
        self,
        path: str | Path,
        progress: Callable[[int, int], None] | None = None,
        cancelled: Callable[[], bool] | threading.Event | None = None,
    ) -> tuple[PoseSequence, dict[str, float]]:
        """A recording's pose as screening estimates it (in parts, on the parts executor), and
        the stage timings; for callers that keep the pose (``mam batch``). ``progress(done,
        total)`` is called per frame (from the pose threads). ``cancelled`` (a function or an
        event) is checked per frame; once true, posing stops with :class:`ScreeningCancelled`:
        a service stops a recording whose client has gone or whose time is up, and frees its
        threads for the next."""
        o = self.options
        is_set = getattr(cancelled, "is_set", cancelled)

        def per_frame(done: int, total: int) -> None:
            if is_set is not None and is_set():
                raise ScreeningCancelled("screening cancelled")
            if progress is not None:
                progress(done, total)

        seq, timings = estimate_video_pose(
            path, self.pose_estimator, o.limits, o.max_side,
            per_frame if progress is not None or is_set is not None else None,
            executor=self._parts_pool, part_backend=self.part_estimator,
            part_frames=backend_class(o.pose_backend).part_frames,
        )  # fmt: skip
        return seq, timings

    def screen_pose_file(self, path: str | Path, infant: InfantData | None = None):
        return self.screen_pose(load_pose_file(path), infant)

    def screen_pose(
        self,
        seq: PoseSequence,
        infant: InfantData | None = None,
        timings: dict[str, float] | None = None,
    ) -> ScreeningResult:
        timings = dict(timings or {})
        t = time.perf_counter()
        seq = fill_gaps(seq, self.options.max_gap_s)
        quality = assess_quality(seq)
        check_trackable(quality, self.options.min_tracked_fraction)
        need = self.meta.config.clip_frames
        if seq.num_frames < need:
            raise VideoTooShortError(
                f"recording has {seq.duration_s:.1f} s of pose; at least {need / FPS:.1f} s are "
                "needed"
            )
        x = model_input(seq, self.meta.representation)
        motion = motion_statistics(x, raw_trunk_length(seq.joints))
        gates = []
        if still(x):
            gates.append(STILL)
        if quality.tracked_fraction < self.options.min_tracked_for_result:
            gates.append(
                f"the infant was tracked in only {quality.tracked_fraction:.0%} of the frames "
                f"(at least {self.options.min_tracked_for_result:.0%} are needed for a result)"
            )
        inst = build_instances(
            x,
            self.meta.normalizer,
            step=self.options.clip_step or self.meta.clip_step,
            smoothing_window=self.meta.smoothing_window,
        )
        timings["features"] = time.perf_counter() - t
        t = time.perf_counter()
        kind = kind_of(seq.source)
        scores = self.score_instances(inst.tensors, infant, kind)
        timings["model"] = time.perf_counter() - t
        fields = self.summarize(scores, kind, motion, gates)
        return self._result(inst, scores, fields, seq, quality, infant, timings)

    def check_domain(
        self, s: ClipScores, kind: str, motion: np.ndarray | None = None,
        gates: Sequence[str] = (),
    ) -> tuple[DomainCheck, list[str]]:  # fmt: skip
        """The domain check of one bag and every reason the model cannot speak for it."""
        reasons = list(gates)
        d = self.meta.domain
        if d is None or s.embeddings is None:
            check = DomainCheck(in_domain=False, kind=kind, method="none")
            reasons.append(NO_DOMAIN if d is None else "no clip embeddings were computed")
            return check, reasons
        v = d.check(kind, s.embeddings, motion)
        finite = math.isfinite(v.score)
        check = DomainCheck(
            in_domain=v.in_domain,
            score=round(v.score, 3) if finite else None,
            motion_score=None if v.motion_score is None else round(v.motion_score, 3),
            embedding_score=round(v.embedding_score, 3) if finite else None,
            clip_scores=[round(c, 3) for c in v.clip_scores],
            kind=kind,
            method=d.method,
        )
        if not v.in_domain:
            reasons += v.reasons
        return check, reasons

    def summarize(
        self, s: ClipScores, kind: str = "instances", motion: np.ndarray | None = None,
        gates: Sequence[str] = (),
    ) -> dict:  # fmt: skip
        """The assessment fields every result shares (``mam.schemas.Assessment``): P(risk) and
        its classification, FMs frequency and its category, the domain check, and whether the
        numbers may be used. ``kind`` is the source (``mam.domain.kind_of``) or ``instances``
        for bare tensors, whose motion cannot be described (their embeddings are compared with
        every kind the weights know, the nearest counting)."""
        meta = self.meta
        threshold = meta.calibrated(s.calibrated_as).risk_threshold
        if kind == "instances" and meta.domain is not None and s.embeddings is not None:
            kind = min(meta.domain.kinds, key=lambda k: meta.domain.check(
                k, s.embeddings, None).score, default="instances")  # fmt: skip
        domain, reasons = self.check_domain(s, kind, motion, gates)
        freq = float(np.mean(s.fms_probability > meta.fms_clip_threshold))
        category = fms_category(freq, meta.fms_category_thresholds)
        p_risk = 1.0 - s.normal_probability
        model_label = "risk" if p_risk >= threshold else "normal"
        abstain = bool(reasons) and self.options.abstain
        return {
            "risk_probability": round(p_risk, 4),
            "normal_probability": round(s.normal_probability, 4),
            "classification": Classification(
                label="indeterminate" if abstain else model_label,
                threshold=threshold,
                model_label=model_label,
                reasons=reasons,
            ),
            "fms_frequency": round(freq, 4),
            "fms_category": "indeterminate" if abstain else category,
            "probabilities_usable": not reasons,
            "domain": domain,
        }

    def result_warnings(self, fields: dict, infant: InfantData | None) -> list[str]:
        """Warnings every result carries: why it is indeterminate (first), infant data."""
        c: Classification = fields["classification"]
        out = []
        if c.reasons:
            what = (
                "Result indeterminate" if c.label == "indeterminate"
                else "Abstention is off (research use): this result is not to be used"
            )  # fmt: skip
            out.append(f"{what}: " + "; ".join(c.reasons) + ". P(risk) and the FMs frequency "
                       "are shown for research only and must not be used.")  # fmt: skip
        small = self.meta.provenance.get("small_data")
        if small:  # trained with --accept-small-data (mam.training.fitting)
            out.append("These weights were trained below the documented minimum data sizes ("
                       + "; ".join(small) + "): their calibration and domain check are less "
                       "reliable than the documented figures.")  # fmt: skip
        return out + self.infant_warnings(infant)

    @staticmethod
    def instance_gates(tensors: np.ndarray) -> list[str]:
        """Reasons bare instance tensors cannot be assessed: positions relative to joint 0
        (``d[..., 0]``) that never change mean a still skeleton."""
        rel = np.asarray(tensors[..., 0], np.float64)  # [N, T, 3, V]
        return [STILL] if still(rel.transpose(0, 1, 3, 2).reshape(-1, rel.shape[-1], 3)) else []

    @staticmethod
    def infant_warnings(infant: InfantData | None) -> list[str]:
        if infant is None:
            return ["no infant data given: the main branch alone was used (MAM w/o info)"]
        return infant.warnings()

    def model_identity(self) -> dict:
        """Which model this screener runs, for ``GET /model``, metrics labels and audit lines:
        name, version, digest (``mam.model.weights``), the file's sha256, the runtime, whether
        these are the shipped demo weights (that file, or weights keeping its name, such as a
        recalibration of it: a network trained on simulated infants), and the provenance (what
        the weights were trained on; without the training data's content digests, which only an
        evaluation needs)."""
        meta = self.meta
        return {
            "name": meta.name,
            "version": meta.version,
            "digest": self.model_digest,
            "recorded_digest": meta.recorded_digest,
            "weights_sha256": self.weights_sha256,
            "demo": is_demo(self.weights_path, meta),
            "runtime": self.runtime.backend,
            "device": self.runtime.device,
            "precision": self.runtime.precision,
            "representation": meta.representation,
            "provenance": {k: v for k, v in meta.provenance.items() if k != "data_digests"},
        }

    def model_info(
        self, pose_backend: str, used_info: bool, calibrated_as: str | None = None
    ) -> ModelInfo:
        meta = self.meta
        cal = meta.calibrated(calibrated_as)
        return ModelInfo(
            name=meta.name,
            version=meta.version,
            digest=self.model_digest,
            weights_sha256=self.weights_sha256,
            provenance=meta.provenance.get("summary", "unknown"),
            runtime=self.runtime.backend,
            device=self.runtime.device,
            precision=self.runtime.precision,
            pose_backend=pose_backend,
            used_info_branch=used_info,
            calibration=(cal.calibration if used_info else cal.calibration_without_info).method,
        )

    def _result(self, inst: Instances, s: ClipScores, fields: dict, seq, quality, infant, timings):
        meta: ModelMeta = self.meta
        clips = [
            Clip(
                index=i,
                start_s=round(float(a), 2),
                end_s=round(float(b), 2),
                fms_probability=round(float(p), 4),
                attention_weight=round(float(w), 4),
            )
            for i, (a, b, p, w) in enumerate(
                zip(inst.start_s, inst.end_s, s.fms_probability, s.attention)
            )
        ]
        warnings = self.result_warnings(fields, infant) + list(quality.warnings)
        q = Quality(
            duration_s=round(seq.duration_s, 2),
            frames_total=quality.frames_total,
            frames_tracked=quality.frames_tracked,
            tracked_fraction=round(quality.tracked_fraction, 4),
            frames_interpolated=quality.frames_interpolated,
            longest_gap_s=round(quality.longest_gap_s, 2),
            mean_confidence=round(quality.mean_confidence, 4),
            clips_assessed=len(clips),
            warnings=list(quality.warnings),
        )
        return ScreeningResult(
            **fields,
            fms_category_thresholds=meta.fms_category_thresholds,
            clips=clips,
            top_fms_clips=sorted(clips, key=lambda c: -c.fms_probability)[:TOP_CLIPS],
            quality=q,
            infant=infant,
            model=self.model_info(seq.source, s.used_info, s.calibrated_as),
            timings_s={k: round(v, 3) for k, v in timings.items()},
            warnings=warnings,
        )
