"""BlazePose in ONNX with our own pre/post-processing: single images and batches of crops.

The two networks are the mediapipe wheel's, converted by ``mam.pose.blazepose.convert``; the
code around them ports MediaPipe's graphs (``detector``, ``roi``, ``landmarks``).
:meth:`BlazePoseOnnx.process_image` is MediaPipe's ``static_image_mode=True`` (detect, crop,
landmarks) and is what the parity check compares; the video backend (``backend``) reuses the
pieces with sparse detection and batched crops.

Runners (``mam.runtime.networks``): ONNX Runtime (CPU, or CUDA where onnxruntime-gpu is
installed), TensorRT engines built from the same ONNX files with a frame-batch profile
``(1, opt, max)`` (cached by ``engine_cache_key``; skipped where TensorRT is not installed) and
PyTorch (``torch_graph``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from mam.pose.base import ort_pose_network
from mam.pose.blazepose import convert, detector
from mam.pose.blazepose.landmarks import NUM_POSE, LandmarkBatch, decode_landmarks
from mam.pose.blazepose.roi import CROP_SIZE, crop, roi_from_alignment_points

logger = logging.getLogger(__name__)

Runtime = Literal["onnxruntime", "tensorrt", "pytorch"]


def _tensorrt_network(path: Path, max_batch: int, precision: str):
    """The landmark network as a TensorRT engine with a frame-batch profile
    ``(1, max_batch, max_batch)``, built on first use and cached."""
    from mam.runtime.networks import TensorRTNetwork

    shape = [1, CROP_SIZE, CROP_SIZE, 3]  # NHWC, as converted; axis 0 is the frame batch
    return TensorRTNetwork.from_onnx(path, path.name.split(".")[0], input_name="input",
                                     input_shape=shape, profile=(1, max_batch, max_batch),
                                     precision=precision)  # fmt: skip


@dataclass
class ImagePose:
    """Landmarks of one image (MediaPipe's ``pose_landmarks`` / ``pose_world_landmarks``):
    ``image [33, 4]`` (x, y normalised, z, visibility), ``world [33, 4]`` (metres, visibility),
    the ``roi`` used and the detection score."""

    image: np.ndarray
    world: np.ndarray
    roi: np.ndarray
    score: float
    flag: float
    auxiliary: np.ndarray  # [2, 2] normalised alignment points for the next frame's ROI


class BlazePoseOnnx:
    """The two BlazePose networks on ONNX Runtime (or TensorRT) and the numpy graph around them.

    Args:
        min_detection_confidence: detector score needed (MediaPipe's option of the same name).
        min_presence_confidence: pose-presence flag needed to accept landmarks (MediaPipe's
            ``min_tracking_confidence``, which sets that threshold).
        runtime: ``onnxruntime`` or ``tensorrt`` (landmark network; the detector, run sparsely,
            stays on ONNX Runtime).
        device: ``cpu`` or ``cuda`` for ONNX Runtime.
        threads: ONNX Runtime intra-op threads (default: the CPUs this process may use).
        max_batch: crops per landmark-network call (TensorRT: the profile's opt and max).
        cache: folder of the converted ONNX files (default ``MAM_POSE_CACHE``).
    """

    def __init__(
        self,
        *,
        min_detection_confidence: float = 0.5,
        min_presence_confidence: float = 0.5,
        runtime: Runtime = "onnxruntime",
        device: Literal["cpu", "cuda"] = "cpu",
        threads: int | None = None,
        max_batch: int = 8,
        precision: Literal["fp32", "fp16"] = "fp16",
        cache: Path | None = None,
    ) -> None:
        for label, value in (
            ("min_detection_confidence", min_detection_confidence),
            ("min_presence_confidence", min_presence_confidence),
        ):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{label} must be in [0, 1], got {value}")
        if runtime not in ("onnxruntime", "tensorrt", "pytorch"):
            raise ValueError(
                f"runtime must be 'onnxruntime', 'tensorrt' or 'pytorch', got {runtime!r}"
            )
        if device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.min_detection_confidence = min_detection_confidence
        self.min_presence_confidence = min_presence_confidence
        self.max_batch = max_batch
        models = convert.ensure_all(cache)
        from mam.runtime.sessions import default_threads

        n_threads = default_threads(threads)  # MAM_RUNTIME_THREADS, else the usable CPUs
        det, lmk = models[convert.DETECTOR].onnx_path, models[convert.LANDMARK].onnx_path
        if runtime == "pytorch":  # the lent GPU machines' route: torch with CUDA, fp16
            from mam.pose.blazepose.torch_graph import torch_network

            self.detector = torch_network(det, device)
            self.landmarker = torch_network(lmk, device, precision, max_batch=max_batch)
        else:
            self.detector = ort_pose_network(det, device, n_threads)
            self.landmarker = (
                _tensorrt_network(lmk, max_batch, precision) if runtime == "tensorrt"
                else ort_pose_network(lmk, device, n_threads, max_batch)
            )  # fmt: skip
        self.details = {
            "runtime": runtime,
            "providers": list(self.landmarker.providers),
            "intra_op_threads": n_threads,
            "max_batch": max_batch,
            "converter": convert.CONVERTER_VERSION,
            "tflite_sha256": {k: m.tflite_sha256[:16] for k, m in models.items()},
        }
        self._det_input = np.empty((1, detector.INPUT_SIZE, detector.INPUT_SIZE, 3), np.float32)
        # Busy seconds by step, for the CPU-path bench (bench/cpu_path.py); reset by the caller.
        self.seconds = dict.fromkeys(("detector", "crop", "landmark_network", "decode_landmarks"),
                                     0.0)  # fmt: skip

    # --- detection -------------------------------------------------------------------------------
    def detect(self, frame: np.ndarray) -> list[detector.Detection]:
        """Person detections in an RGB uint8 frame, best first."""
        t = time.perf_counter()
        height, width = frame.shape[:2]
        box = detector.letterbox(width, height)
        detector.preprocess(frame, box, out=self._det_input[0])
        out = self.detector(self._det_input)
        dets = detector.detections_from_outputs(
            out["boxes"][0], out["scores"][0], box.padding, self.min_detection_confidence
        )
        self.seconds["detector"] += time.perf_counter() - t
        return dets

    @staticmethod
    def roi_from_detection(det: detector.Detection, width: int, height: int) -> np.ndarray:
        return roi_from_alignment_points(det.keypoints[0], det.keypoints[1], width, height)[0]

    # --- landmarks -------------------------------------------------------------------------------
    def landmarks(self, frames: list[np.ndarray], rois: np.ndarray) -> LandmarkBatch:
        """Landmarks of ``frames[i]`` inside ``rois[i]`` (``[N, 5]``), run in batches."""
        t0 = time.perf_counter()
        n = len(frames)
        batch = np.empty((n, CROP_SIZE, CROP_SIZE, 3), np.float32)
        for i, (frame, roi) in enumerate(zip(frames, rois)):
            crop(frame, roi, out=batch[i])
        t1 = time.perf_counter()
        cat = self.landmarker(batch)  # in chunks of max_batch crops
        t2 = time.perf_counter()
        lm = decode_landmarks(
            cat["landmarks"], cat["world_landmarks"], cat["pose_flag"], cat["heatmap"], rois
        )
        s = self.seconds
        s["crop"] += t1 - t0
        s["landmark_network"] += t2 - t1
        s["decode_landmarks"] += time.perf_counter() - t2
        return lm

    def process_image(self, frame: np.ndarray) -> ImagePose | None:
        """MediaPipe's static-image mode: detect, crop around the best person, landmarks.
        ``None`` when nobody is detected or the presence flag is below the threshold."""
        height, width = frame.shape[:2]
        dets = self.detect(frame)
        if not dets:
            return None
        roi = self.roi_from_detection(dets[0], width, height)
        lm = self.landmarks([frame], roi[None])
        if lm.flag[0] < self.min_presence_confidence:
            return None
        return ImagePose(
            image=np.concatenate([lm.image[0, :NUM_POSE], lm.visibility[0, :NUM_POSE, None]], 1),
            world=np.concatenate([lm.world[0, :NUM_POSE], lm.visibility[0, :NUM_POSE, None]], 1),
            roi=roi,
            score=dets[0].score,
            flag=float(lm.flag[0]),
            auxiliary=lm.image[0, NUM_POSE : NUM_POSE + 2, :2],
        )
