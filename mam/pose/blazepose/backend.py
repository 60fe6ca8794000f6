"""The ``onnx`` pose backend: BlazePose in ONNX, sparse detection, batched landmark crops.

Same networks and outputs as the ``mediapipe`` backend (``mam.pose.mediapipe_backend``; the
mapping to the 17 Human3.6M joints and the left/right swap repair come from
``mam.pose.mapping``), organised for throughput (DESIGN.md, "Pose: the offline default and the
GPU route"): a supine infant barely travels across the frame, so

* the detector runs sparsely: when there is no track, when the landmark network's presence flag
  drops below ``min_tracking_confidence``, and every ``detect_every`` frames as a check that the
  track still holds the person (re-seeded when the detection's crop disagrees);
* the crop of a whole batch of frames comes from the track: the ROI that the previous frames'
  auxiliary landmarks give (MediaPipe's tracking ROI), smoothed exponentially over frames;
* the landmark network runs on ``batch_size`` crops at a time (ONNX Runtime; TensorRT with a
  frame-batch profile on GPU). A frame whose own landmark ROI has drifted from the crop it was
  run on (centre, size or angle beyond ``DRIFT``) is run again from that frame on with a fresh crop,
  so fast motion costs a re-run, never a wrong crop;
* frames are decoded in their own thread (the frame iterator is drained into a bounded queue), so
  decoding overlaps inference (PyAV, OpenCV and ONNX Runtime release the GIL).

Landmarks are smoothed over time with MediaPipe's own filters (``smooth_landmarks``, on by
default as in the ``mediapipe`` backend; ``mam.pose.blazepose.smoothing``). ``meta`` carries the
same keys as the ``mediapipe`` backend plus ``stats`` (detections, crops run, re-runs).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Literal, Self

import numpy as np

from mam.pose.base import PoseBackendBase, PoseSequence, check_frame, register_backend
from mam.pose.blazepose.landmarks import NUM_POSE, LandmarkBatch
from mam.pose.blazepose.roi import roi_from_alignment_points
from mam.pose.blazepose.smoothing import smooth_sequence
from mam.pose.mapping import NUM_LANDMARKS, landmarks_to_sequence
from mam.pose.stride import Strided, upsample

logger = logging.getLogger(__name__)

NAME = "onnx"
# A crop is re-made when the frame's own landmark ROI moved by more than this fraction of the
# crop side, changed size by more than this ratio, or turned by more than this angle.
DRIFT = {"centre": 0.08, "size": 1.15, "angle": np.deg2rad(12.0)}
_END = object()


class _Prefetch:
    """Pull frames from an iterator in a daemon thread into a bounded queue."""

    def __init__(self, frames: Iterable[np.ndarray], depth: int) -> None:
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._it = iter(frames)
        self._thread = threading.Thread(target=self._run, name="pose-decode", daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            for frame in self._it:
                if not self._put(frame):
                    return
        except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer's thread
            self._put(("error", exc))
            return
        self._put(_END)

    def __iter__(self) -> Iterator[np.ndarray]:
        while True:
            item = self._q.get()
            if item is _END:
                return
            if isinstance(item, tuple) and len(item) == 2 and item[0] == "error":
                raise item[1]
            yield item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def _roi_from_landmarks(lm: LandmarkBatch, i: int, width: int, height: int) -> np.ndarray:
    aux = lm.image[i, NUM_POSE : NUM_POSE + 2, :2]
    return roi_from_alignment_points(aux[0], aux[1], width, height)[0]


def _drifted(roi: np.ndarray, used: np.ndarray, width: int, height: int) -> bool:
    side = used[2] * width
    shift = np.hypot((roi[0] - used[0]) * width, (roi[1] - used[1]) * height)
    ratio = roi[2] / used[2]
    turn = abs((roi[4] - used[4] + np.pi) % (2 * np.pi) - np.pi)
    return bool(
        shift > DRIFT["centre"] * side
        or not 1 / DRIFT["size"] < ratio < DRIFT["size"]
        or turn > DRIFT["angle"]
    )


class _RoiTrack:
    """Exponentially smoothed ROI (centre, side, angle as a unit vector)."""

    def __init__(self, alpha: float) -> None:
        self.alpha = alpha
        self.state: np.ndarray | None = None  # x, y, w, h, cos, sin

    def reset(self, roi: np.ndarray | None) -> None:
        self.state = None if roi is None else self._vec(roi)

    @staticmethod
    def _vec(roi: np.ndarray) -> np.ndarray:
        return np.array([*roi[:4], np.cos(roi[4]), np.sin(roi[4])])

    def update(self, roi: np.ndarray) -> None:
        v = self._vec(roi)
        self.state = v if self.state is None else (1 - self.alpha) * self.state + self.alpha * v

    @property
    def roi(self) -> np.ndarray | None:
        if self.state is None:
            return None
        s = self.state
        return np.array([*s[:4], np.arctan2(s[5], s[4])])


@register_backend(NAME)
class OnnxPoseBackend(PoseBackendBase):
    """BlazePose (full) in ONNX with sparse detection and batched, tracked crops.

    Args:
        min_detection_confidence: detector score needed to start a track.
        min_tracking_confidence: presence flag needed to keep a track (below it: detect again).
        batch_size: frames per landmark-network call.
        detect_every: frames between check detections while tracking (0: only when lost).
        roi_smoothing: weight of the newest frame in the exponentially smoothed crop track.
        runtime: ``onnxruntime``, ``tensorrt`` or ``pytorch`` (``torch_graph``: the same
            converted networks in PyTorch, fp16 on CUDA, for GPU machines without TensorRT);
            device ``cpu`` or ``cuda``; by default ``MAM_POSE_RUNTIME`` / ``MAM_POSE_DEVICE``,
            else ONNX Runtime on the CPU.
        threads: ONNX Runtime intra-op threads (``None``: ``MAM_RUNTIME_THREADS``, else every
            CPU this process may use). NOTE: once 1, to leave a core to the decode thread; on
            2 cores 2 threads pose 69 frames/s against 52 with 1 and the same joints
            (``bench/cpu_path.py``). ``mam batch`` gives each worker its share of the CPUs.
        smooth_landmarks: MediaPipe's temporal landmark filters (as the mediapipe backend).
        repair_swaps: relabel arms / legs whose left-right labels disagree with the face's.
        prefetch: frames decoded ahead in the decode thread (0: decode inline).
        cache: folder of the converted networks (default ``MAM_POSE_CACHE``).
    """

    # Pose every Nth frame only (mam.pose.stride, set per recording by mam.pose.from_video under
    # MAM_POSE_STRIDE): an opt-in speed candidate, 1 (every frame) by default.
    frame_stride: int = 1

    name = NAME
    # NOTE: a recording's pose through this backend is defined as posed in parts of 30 s, each
    # tracked from a warm-up before its start (mam.pose.from_video): the parts can then run in
    # parallel threads where a caller has the cores, with the same joints either way.
    part_frames = 750
    takes_threads = True
    runtimes = ("onnxruntime", "tensorrt", "pytorch")
    devices = ("cpu", "cuda")

    def __init__(
        self,
        min_detection_confidence: float = 0.5,
        min_tracking_confidence: float = 0.5,
        batch_size: int = 4,
        detect_every: int = 50,
        roi_smoothing: float = 0.5,
        runtime: Literal["onnxruntime", "tensorrt", "pytorch"] | None = None,
        device: Literal["cpu", "cuda"] | None = None,
        threads: int | None = None,
        smooth_landmarks: bool = True,
        repair_swaps: bool = True,
        prefetch: int = 32,
        cache: str | Path | None = None,
    ) -> None:
        runtime, device = self.resolve_runtime(runtime, device)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if detect_every < 0:
            raise ValueError(f"detect_every must be >= 0, got {detect_every}")
        if not 0.0 < roi_smoothing <= 1.0:
            raise ValueError(f"roi_smoothing must be in (0, 1], got {roi_smoothing}")
        if prefetch < 0:
            raise ValueError(f"prefetch must be >= 0, got {prefetch}")
        from mam.pose.blazepose.model import BlazePoseOnnx  # onnxruntime, converted networks

        self.model = BlazePoseOnnx(
            min_detection_confidence=min_detection_confidence,
            min_presence_confidence=min_tracking_confidence,
            runtime=runtime,
            device=device,
            threads=threads,
            max_batch=batch_size,
            cache=Path(cache) if cache is not None else None,
        )
        self.batch_size = batch_size
        self.detect_every = detect_every
        self.roi_smoothing = roi_smoothing
        self.repair_swaps = repair_swaps
        self.smooth_landmarks = smooth_landmarks
        self.prefetch = prefetch
        self.config = {
            "model": "pose_landmark_full",
            "min_detection_confidence": min_detection_confidence,
            "min_tracking_confidence": min_tracking_confidence,
            "batch_size": batch_size,
            "detect_every": detect_every,
            "roi_smoothing": roi_smoothing,
            "smooth_landmarks": smooth_landmarks,
            **self.model.details,
        }

    # --- lifecycle -------------------------------------------------------------------------------
    def close(self) -> None:
        """Nothing to release beyond the sessions, which go with the object; idempotent."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # --- inference -------------------------------------------------------------------------------
    def estimate(
        self, frames: Iterable[np.ndarray], progress: Callable[[int], None] | None = None
    ) -> PoseSequence:
        """Track the person through ``frames`` (RGB uint8 ``[H, W, 3]``, 25 fps, in order)."""
        strided = None
        if self.frame_stride > 1:  # opt-in (mam.pose.stride): the default never comes here
            frames = strided = Strided(frames, self.frame_stride)
        source = _Prefetch(frames, self.prefetch) if self.prefetch else None
        stream = iter(source) if source is not None else iter(frames)
        image: list[np.ndarray] = []  # [33, 4] normalised x, y, z, visibility
        world: list[np.ndarray] = []
        self._stats = {"detections": 0, "landmark_runs": 0, "reruns": 0}
        self.model.seconds = dict.fromkeys(self.model.seconds, 0.0)
        self._track = _RoiTrack(self.roi_smoothing)
        self._since_detect = 0
        size: tuple[int, int] | None = None
        start = time.perf_counter()
        try:
            chunk: list[np.ndarray] = []
            for frame in stream:
                frame = check_frame(frame, size)
                size = size or (frame.shape[1], frame.shape[0])
                chunk.append(frame)
                if len(chunk) == self.batch_size:
                    self._process(chunk, size, image, world, progress)
                    chunk = []
            if chunk:
                self._process(chunk, size, image, world, progress)
        finally:
            if source is not None:
                source.close()
        if strided is not None and image:  # raw landmarks back to every frame, then smoothed
            n, s = strided.seen, self.frame_stride
            image = list(upsample(np.stack(image), s, n))
            world = list(upsample(np.stack(world), s, n))
        return self._to_sequence(image, world, size, time.perf_counter() - start)

    def _detect_roi(self, frame: np.ndarray, size: tuple[int, int]) -> np.ndarray | None:
        self._stats["detections"] += 1
        self._since_detect = 0
        dets = self.model.detect(frame)
        if not dets:
            return None
        return self.model.roi_from_detection(dets[0], *size)

    def _process(self, chunk, size, image, world, progress) -> None:
        """Landmarks for a run of frames; frames that lose the person or drift are re-run."""
        width, height = size
        missing = np.full((NUM_LANDMARKS, 4), np.nan)
        i = 0
        while i < len(chunk):
            roi = self._track.roi
            fresh = False
            if self.detect_every and self._since_detect >= self.detect_every and roi is not None:
                found = self._detect_roi(chunk[i], size)
                if found is not None and _drifted(found, roi, width, height):
                    self._track.reset(found)
                    roi = found
            if roi is None:
                roi = self._detect_roi(chunk[i], size)
                if roi is None:  # nobody here: this frame is missing, try the next one
                    image.append(missing)
                    world.append(missing)
                    self._done(progress, len(image))
                    i += 1
                    continue
                self._track.reset(roi)
                fresh = True
            rest = chunk[i:]
            lm = self.model.landmarks(rest, np.repeat(roi[None], len(rest), axis=0))
            self._stats["landmark_runs"] += len(rest)
            for j in range(len(rest)):
                if lm.flag[j] < self.model.min_presence_confidence:
                    self._track.reset(None)  # lost: detect on this frame
                    if j == 0 and fresh:  # even a fresh detection's crop holds nobody
                        image.append(missing)
                        world.append(missing)
                        self._done(progress, len(image))
                        i += 1
                    break
                own = _roi_from_landmarks(lm, j, width, height)
                if j > 0 and _drifted(own, roi, width, height):
                    self._track.reset(own)  # re-run from here with the crop this frame gives
                    break
                self._track.update(own)
                image.append(
                    np.concatenate([lm.image[j, :NUM_POSE], lm.visibility[j, :NUM_POSE, None]], 1)
                )
                world.append(
                    np.concatenate([lm.world[j, :NUM_POSE], lm.visibility[j, :NUM_POSE, None]], 1)
                )
                self._since_detect += 1
                self._done(progress, len(image))
                i += 1
            else:
                continue
            if i < len(chunk):
                self._stats["reruns"] += 1

    @staticmethod
    def _done(progress, n: int) -> None:
        if progress is not None:
            progress(n)

    def _to_sequence(self, image, world, size, elapsed: float) -> PoseSequence:
        if image and self.smooth_landmarks:
            img, wld = smooth_sequence(np.stack(image), np.stack(world), size)
            image, world = list(img), list(wld)
        stats = dict(self._stats, seconds={k: round(v, 3) for k, v in self.model.seconds.items()})
        logger.info(
            "%d detections, %d landmark crops, %d re-runs",
            stats["detections"], stats["landmark_runs"], stats["reruns"],
        )  # fmt: skip
        return landmarks_to_sequence(
            image, world, size, source=NAME, config=self.config,
            repair_swaps=self.repair_swaps, elapsed=elapsed, meta={"stats": stats},
        )  # fmt: skip
