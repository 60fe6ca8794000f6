"""The paper's pose route as a backend (``hrnet-videopose3d``): HRNet 2D -> VideoPose3D lifter.

Gao, Yao et al. (2023, Methods) fine-tuned HRNet on 5 annotated frames from each of 298 infant
videos and used it as the 2D kernel of VideoPose3D, giving the 17 Human3.6M joints per frame at
25 fps. Per recording this backend:

1. crops each frame to a person box and resizes it to HRNet's 192x256 (3:4) input. Supine infants
   fill most of the frame, so by default the box is the **whole frame, letterboxed** (black bars)
   to 3:4 around its centre; ``box_fn(frame_index, frame) -> (x, y, w, h)`` supplies a detector's
   box instead (widened to 3:4 about its centre);
2. runs HRNet batched over frames, decodes the heatmaps (argmax + quarter-pixel shift) and maps the
   17 COCO keypoints to the 17 Human3.6M joints (``mam.pose.paper.videopose3d.COCO_TO_H36M``);
3. marks frames whose mean joint confidence (heatmap maximum) is below ``min_confidence`` as
   untracked, interpolates their 2D from the tracked frames so the lifter sees a continuous
   sequence, lifts the whole sequence (edge-padded, 243-frame receptive field), and returns NaN for
   the untracked frames so that ``mam.pose.quality`` reports and fills the gaps as for any backend.

Weights. No infant HRNet weights were published; a site provides its fine-tuned checkpoint
(``hrnet_weights=`` or ``MAM_HRNET_WEIGHTS``, any HRNet width and depth in the official key layout,
see ``mam.pose.paper.hrnet.checkpoint_filter_fn``). Without one the backend refuses to start
(:class:`SiteWeightsRequiredError`): random or adult-only weights are never run silently. The
lifter defaults to the shipped ``models/lifter_infant.pt`` (``mam.shipped``), trained here on real
infant motion (``mam.pose.paper.lifter_train``; its sidecar records data, split and held-out MPJPE).

Runtimes (``runtime=``, each network through ``mam.runtime.networks``): ``onnxruntime`` exports
both networks once to ONNX (``mam.runtime.onnx_export``) in a cache folder keyed by the weights'
sha256 (``MAM_POSE_CACHE``, default ``~/.cache/mam/pose``), checks ONNX Runtime
against PyTorch on export, and afterwards needs no PyTorch; ``pytorch`` runs them eagerly (CUDA when
available); ``tensorrt`` builds an HRNet engine with a frame-batch profile through
``mam.runtime.build_engine`` (GPU only; the lifter, about a GFLOP per thousand frames, stays on
ONNX Runtime). ``auto`` is ``onnxruntime`` when it can be had, else ``pytorch``.
"""

from __future__ import annotations

import json
import logging
import pickle
import time
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Literal, Self

import numpy as np

from mam.errors import DependencyMissingError, ModelLoadError
from mam.model.weights import sha256_of
from mam.pose.base import (
    PoseBackendBase,
    PoseSequence,
    check_frame,
    iter_chunks,
    ort_pose_network,
    pose_cache_dir,
    register_backend,
)
from mam.runtime.networks import Network
from mam.runtime.onnx_export import cached_onnx
from mam.settings import current
from mam.shipped import models_dir
from mam.skeleton import FPS, NUM_JOINTS

logger = logging.getLogger(__name__)

NAME = "hrnet-videopose3d"
ENV_HRNET_WEIGHTS = "MAM_HRNET_WEIGHTS"
DEFAULT_LIFTER = models_dir() / "lifter_infant.pt"
INPUT_H, INPUT_W = 256, 192  # HRNet-W32 256x192 (mam.pose.paper.hrnet.INPUT_SIZE, without torch)
STRIDE = 4

Runtime = Literal["auto", "onnxruntime", "pytorch", "tensorrt"]
BoxFn = Callable[[int, np.ndarray], tuple[float, float, float, float]]


class SiteWeightsRequiredError(ModelLoadError):
    """The paper's pose route needs HRNet weights fine-tuned by the site (none are published)."""


# -- boxes and crops ------------------------------------------------------------------------------
def letterbox_box(width: int, height: int) -> tuple[float, float, float, float]:
    """The whole frame grown to HRNet's 3:4 aspect about its centre: ``(x, y, w, h)``."""
    return fit_aspect((0.0, 0.0, float(width), float(height)))


def fit_aspect(box: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
    """Grow a box ``(x, y, w, h)`` to width:height = 192:256 about its centre (never shrink)."""
    x, y, w, h = (float(v) for v in box)
    if w <= 0 or h <= 0:
        raise ValueError(f"box must have a positive size, got {box}")
    cx, cy = x + w / 2, y + h / 2
    aspect = INPUT_W / INPUT_H
    if w / h > aspect:
        h = w / aspect
    else:
        w = h * aspect
    return cx - w / 2, cy - h / 2, w, h


def crop(frame: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray:
    """The 3:4 ``box`` of ``frame`` resized to 192x256 (black outside the frame)."""
    import cv2

    x, y, w, _ = box
    s = INPUT_W / w
    M = np.array([[s, 0.0, -x * s], [0.0, s, -y * s]], np.float64)
    return cv2.warpAffine(frame, M, (INPUT_W, INPUT_H), flags=cv2.INTER_LINEAR, borderValue=0)


def interpolate_missing(x: np.ndarray, tracked: np.ndarray) -> np.ndarray:
    """Fill untracked frames ``[T, ...]`` linearly from tracked ones (edges: nearest)."""
    if tracked.all() or not tracked.any():
        return x
    t = np.arange(len(x))
    flat = x.reshape(len(x), -1).copy()
    for k in range(flat.shape[1]):
        flat[~tracked, k] = np.interp(t[~tracked], t[tracked], flat[tracked, k])
    return flat.reshape(x.shape)


# -- networks: loading ---------------------------------------------------------------------------
def hrnet_config_from_state(state: dict) -> dict:
    """Width, joints and depth of an HRNet state dict (official key layout), so that W32, W48 and
    smaller site models load without a config file."""
    w = state["final_layer.weight"]
    modules = []
    for s in (2, 3, 4):
        idx = {int(k.split(".")[1]) for k in state if k.startswith(f"stage{s}.")}
        if not idx:
            raise ModelLoadError(f"HRNet checkpoint has no stage{s} parameters")
        modules.append(max(idx) + 1)
    blocks = {int(k.split(".")[4]) for k in state if k.startswith("stage2.0.branches.0.")}
    return {
        "width": int(w.shape[1]),
        "num_joints": int(w.shape[0]),
        "stage_modules": modules,
        "stage_blocks": max(blocks) + 1,
        "final_conv_kernel": int(w.shape[-1]),
    }


def load_hrnet(weights: Path):
    """``PoseHighResolutionNet`` in eval mode from a site checkpoint (official key layout)."""
    try:
        import torch

        from mam.pose.paper.hrnet import PoseHighResolutionNet, checkpoint_filter_fn
    except ImportError as e:
        raise DependencyMissingError(
            "loading HRNet weights needs PyTorch (pip install 'mam[train]'); once exported to "
            "ONNX (see MAM_POSE_CACHE) it runs on ONNX Runtime alone"
        ) from e
    try:
        raw = torch.load(weights, map_location="cpu", weights_only=True)
        state = checkpoint_filter_fn(raw)
        cfg = hrnet_config_from_state(state)
        model = PoseHighResolutionNet(**cfg)
        model.load_state_dict(checkpoint_filter_fn(state, model), strict=True)
    except (RuntimeError, KeyError, ValueError, OSError, EOFError, pickle.UnpicklingError,
            zipfile.BadZipFile) as e:  # fmt: skip
        raise ModelLoadError(f"HRNet weights {weights.name} do not load: {e}") from e
    if cfg["num_joints"] != 17:
        raise ModelLoadError(f"HRNet weights have {cfg['num_joints']} keypoints, need 17 (COCO)")
    return model.eval(), cfg


def _torch_network(model, device: str, output: str):
    """A torch module as a ``mam.runtime.networks.TorchNetwork`` (``auto``: CUDA if present)."""
    from mam.runtime.networks import TorchNetwork

    net = TorchNetwork(model.eval(), outputs=[output], device=device)
    model.to(net.device)
    return net


def load_lifter_network(
    lifter_path: Path = DEFAULT_LIFTER,
    runtime: str = "auto",
    device: str = "auto",
    threads: int | None = None,
    cache_dir: Path | None = None,
    receptive_field: int | None = None,
    weights_sha256: str | None = None,
) -> Network:
    """The VideoPose3D lifter as one network, ``keypoints_2d`` ``[N, T + rf - 1, 17, 2]`` ->
    ``joints_3d`` ``[N, T, 17, 3]``:
    ONNX Runtime from a cached, parity-checked export where it can be had, else PyTorch. Shared
    by this backend and the ``lifted`` pose representation (``mam.pose.representation``)."""
    if receptive_field is None:
        receptive_field = int(json.loads(lifter_path.with_suffix(".json").read_text())
                              ["receptive_field"])  # fmt: skip

    def build():
        from mam.pose.paper.lifter_train import load_lifter

        model, meta = load_lifter(lifter_path)
        return model, meta["config"]

    rf = receptive_field
    if runtime in ("auto", "onnxruntime", "tensorrt"):
        try:
            path, _ = cached_onnx(
                "lifter", lifter_path, build, ((1, rf + 40, NUM_JOINTS, 2),
                                               (2, rf + 7, NUM_JOINTS, 2)),
                input_name="keypoints_2d", output_name="joints_3d",
                dynamic_axes={0: "N", 1: "T"}, cache_dir=cache_dir or pose_cache_dir(),
                weights_sha256=weights_sha256,
            )  # fmt: skip
            return ort_pose_network(path, "cpu", threads)
        except (DependencyMissingError, ImportError) as e:
            if runtime == "onnxruntime":
                raise
            logger.warning("lifter ONNX route unavailable (%s); using PyTorch", e)
    try:
        model, _ = build()
    except ImportError as e:
        raise DependencyMissingError("the lifter needs PyTorch or an ONNX export") from e
    return _torch_network(model, device, "joints_3d")


# -- the backend ----------------------------------------------------------------------------------
@register_backend(NAME)
class HRNetVideoPose3DBackend(PoseBackendBase):
    """HRNet 2D keypoints + VideoPose3D lifting (the paper's route); see the module docstring.

    Args:
        hrnet_weights: the site's fine-tuned HRNet checkpoint (default: ``MAM_HRNET_WEIGHTS``).
        lifter_weights: a lifter saved by ``mam.pose.paper.lifter_train`` (default:
            ``MAM_LIFTER_WEIGHTS`` or the shipped ``models/lifter_infant.pt``).
        runtime: ``auto``, ``onnxruntime``, ``pytorch`` or ``tensorrt`` (HRNet only; GPU);
            default ``MAM_POSE_RUNTIME``, else ``auto``.
        device: ``auto``, ``cpu`` or ``cuda``; default ``MAM_POSE_DEVICE``, else ``auto``.
        batch_size: frames per HRNet call.
        box_fn: ``box_fn(frame_index, frame) -> (x, y, w, h)`` person box in pixels; default: the
            whole frame letterboxed to 3:4.
        min_confidence: frames whose mean joint confidence is below it count as untracked.
        threads: ONNX Runtime intra-op threads (default: its own choice).
        cache_dir: where ONNX exports and TensorRT engines are cached (``MAM_POSE_CACHE``).
    """

    name = NAME
    takes_threads = True
    runtimes = ("auto", "onnxruntime", "pytorch", "tensorrt")
    devices = ("auto", "cpu", "cuda")

    def __init__(
        self,
        hrnet_weights: str | Path | None = None,
        lifter_weights: str | Path | None = None,
        *,
        runtime: Runtime | None = None,
        device: Literal["auto", "cpu", "cuda"] | None = None,
        batch_size: int = 16,
        box_fn: BoxFn | None = None,
        min_confidence: float = 0.2,
        threads: int | None = None,
        cache_dir: str | Path | None = None,
    ) -> None:
        runtime, device = self.resolve_runtime(runtime, device)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0.0 <= min_confidence <= 1.0:
            raise ValueError(f"min_confidence must be in [0, 1], got {min_confidence}")
        env = current()
        hrnet = hrnet_weights or env.hrnet_weights
        if not hrnet:
            raise SiteWeightsRequiredError(
                f"the '{NAME}' pose backend needs HRNet weights fine-tuned on the site's own "
                f"annotated infant frames (the paper used 5 frames from each of 298 videos); none "
                f"are published. Give hrnet_weights= or set {ENV_HRNET_WEIGHTS} to the checkpoint "
                "(official pose_hrnet key layout), or use the 'mediapipe' backend"
            )
        self.hrnet_path = Path(hrnet)
        lifter = lifter_weights or env.lifter_weights or DEFAULT_LIFTER
        self.lifter_path = Path(lifter)
        for what, p in (("HRNet", self.hrnet_path), ("lifter", self.lifter_path)):
            if not p.is_file():
                raise ModelLoadError(f"{what} weights not found: {p}")
        lifter_meta_path = self.lifter_path.with_suffix(".json")
        if not lifter_meta_path.is_file():
            raise ModelLoadError(f"lifter sidecar not found: {lifter_meta_path}")
        self.lifter_meta = json.loads(lifter_meta_path.read_text())
        self.receptive_field = int(self.lifter_meta["receptive_field"])
        self.box_fn, self.batch_size = box_fn, batch_size
        self.min_confidence = min_confidence
        self.cache = Path(cache_dir) if cache_dir is not None else pose_cache_dir()
        # Hashed once: the cache keys and the recorded config both need them (HRNet is ~110 MB).
        self._sha = {"hrnet": sha256_of(self.hrnet_path), "lifter": sha256_of(self.lifter_path)}
        self._hrnet = self._load_hrnet(runtime, device, threads)
        self._lifter = self._load_lifter(runtime, device, threads)
        self.config = {
            "hrnet_weights_sha256": self._sha["hrnet"],
            "hrnet": self._hrnet_config,
            "lifter": self.lifter_meta.get("name", self.lifter_path.stem),
            "lifter_weights_sha256": self._sha["lifter"],
            "receptive_field": self.receptive_field,
            "runtime": {"hrnet": self._hrnet.runtime, "lifter": self._lifter.runtime},
            "box": "callback" if box_fn else "whole frame letterboxed to 3:4",
            "min_confidence": min_confidence,
            "batch_size": batch_size,
        }
        logger.info("%s: HRNet on %s %s, lifter on %s", NAME, self._hrnet.runtime,
                    self._hrnet.detail, self._lifter.runtime)  # fmt: skip

    # --- loading ---------------------------------------------------------------------------------
    def _hrnet_onnx(self) -> tuple[Path, dict]:
        return cached_onnx(
            "hrnet", self.hrnet_path, lambda: load_hrnet(self.hrnet_path),
            ((2, 3, INPUT_H, INPUT_W), (3, 3, INPUT_H, INPUT_W)),
            input_name="images", output_name="heatmaps", dynamic_axes={0: "N"},
            cache_dir=self.cache, weights_sha256=self._sha["hrnet"],
        )  # fmt: skip

    def _load_hrnet(self, runtime: str, device: str, threads: int | None) -> Network:
        reasons = []
        if runtime == "tensorrt":
            try:
                net = self._tensorrt_hrnet()
                self._hrnet_config = net.detail.pop("config")
                return net
            except Exception as e:  # noqa: BLE001 - reported, then the next runtime is tried
                reasons.append(f"tensorrt: {e}")
                logger.warning("TensorRT HRNet unavailable (%s); trying ONNX Runtime", e)
        if runtime in ("auto", "onnxruntime", "tensorrt"):
            try:
                path, info = self._hrnet_onnx()
                self._hrnet_config = info["config"]
                net = ort_pose_network(path, device, threads)
                net.detail["fallbacks"] = reasons
                return net
            except (DependencyMissingError, ImportError) as e:
                if runtime == "onnxruntime":
                    raise
                reasons.append(f"onnxruntime: {e}")
                logger.warning("ONNX route unavailable (%s); running HRNet in PyTorch", e)
        model, self._hrnet_config = load_hrnet(self.hrnet_path)
        net = _torch_network(model, device, "heatmaps")
        net.detail["fallbacks"] = reasons
        return net

    def _tensorrt_hrnet(self) -> Network:
        from mam.runtime.networks import TensorRTNetwork

        TensorRTNetwork.require_cuda()  # before an export that only this route would need
        onnx_path, info = self._hrnet_onnx()
        net = TensorRTNetwork.from_onnx(
            onnx_path, "hrnet", input_name="images", input_shape=["N", 3, INPUT_H, INPUT_W],
            profile=(1, self.batch_size, max(self.batch_size, 64)), precision="fp16",
            cache_dir=self.cache, onnx_sha256=info["onnx_sha256"],
        )  # fmt: skip
        net.detail["config"] = info["config"]
        return net

    def _load_lifter(self, runtime: str, device: str, threads: int | None) -> Network:
        return load_lifter_network(self.lifter_path, runtime, device, threads, self.cache,
                                   self.receptive_field, self._sha["lifter"])  # fmt: skip

    # --- lifecycle -------------------------------------------------------------------------------
    def close(self) -> None:
        """Nothing to release beyond the sessions, which go with the object; idempotent."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # --- inference -------------------------------------------------------------------------------
    def keypoints_2d(
        self, frames: Iterable[np.ndarray], progress: Callable[[int], None] | None = None
    ) -> tuple[np.ndarray, np.ndarray, tuple[int, int] | None]:
        """COCO keypoints in image pixels ``[T, 17, 2]``, heatmap maxima ``[T, 17]``, image size."""
        from mam.pose.paper.hrnet import decode_heatmaps, normalize_images

        points, scores = [], []
        size: tuple[int, int] | None = None
        done = 0
        for chunk in iter_chunks(frames, self.batch_size):
            boxes, crops = [], []
            for k, frame in enumerate(chunk):
                frame = check_frame(frame, size)
                size = size or (frame.shape[1], frame.shape[0])
                if self.box_fn is None:
                    box = letterbox_box(*size)
                else:
                    box = fit_aspect(self.box_fn(done + k, frame))
                boxes.append(box)
                crops.append(crop(frame, box))
            heat = self._hrnet(normalize_images(np.stack(crops)))["heatmaps"]
            xy, maxval = decode_heatmaps(heat)
            b = np.array(boxes, np.float32)  # [n, 4] x, y, w, h
            scale = (b[:, 2] / (heat.shape[-1] * 1.0))[:, None, None]  # image px per heatmap px
            points.append(xy * scale + b[:, None, :2])
            scores.append(np.clip(maxval, 0.0, 1.0))
            done += len(chunk)
            if progress is not None:
                progress(done)
        if not points:
            return np.zeros((0, 17, 2), np.float32), np.zeros((0, 17), np.float32), size
        return np.concatenate(points), np.concatenate(scores), size

    def estimate(
        self, frames: Iterable[np.ndarray], progress: Callable[[int], None] | None = None
    ) -> PoseSequence:
        """Pose of the infant through ``frames`` (RGB uint8 ``[H, W, 3]``, 25 fps, in order)."""
        from mam.pose.paper.videopose3d import (
            coco_to_h36m,
            coco_to_h36m_confidence,
            normalize_2d,
            normalize_screen_coordinates,
            pad_edges,
        )

        start = time.perf_counter()
        coco, scores, size = self.keypoints_2d(frames, progress)
        T = len(coco)
        image_joints = coco_to_h36m(coco)
        confidence = coco_to_h36m_confidence(scores)
        tracked = confidence.mean(axis=1) >= self.min_confidence
        joints = np.full((T, NUM_JOINTS, 3), np.nan, np.float32)
        if tracked.any():
            screen = normalize_screen_coordinates(interpolate_missing(image_joints, tracked), *size)
            padded = pad_edges(normalize_2d(screen), self.receptive_field)[None]
            lifted = self._lifter(padded)["joints_3d"][0]
            joints[tracked] = (lifted - lifted[:, :1])[tracked]
        confidence[~tracked] = 0.0
        elapsed = time.perf_counter() - start
        logger.info("%s: %d of %d frames tracked (%.1f frames/s)", NAME, int(tracked.sum()), T,
                    T / elapsed if elapsed > 0 else float("nan"))  # fmt: skip
        units = self.lifter_meta.get("output", {}).get("units", "lifter units")
        return PoseSequence(
            joints=joints,
            confidence=confidence,
            fps=FPS,
            source=NAME,
            meta={
                "image_joints": image_joints,
                "image_size": (int(size[0]), int(size[1])) if size else None,
                "axes": f"x right, y down, z away from the camera; {units}; pelvis-relative",
                "config": dict(self.config),
            },
        )
