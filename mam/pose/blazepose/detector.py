"""BlazePose person detector around the ONNX network: letterbox, SSD anchors, decoding, NMS.

A numpy port of what MediaPipe's ``pose_detection_cpu`` graph does around
``pose_detection.tflite`` (mediapipe 0.10.21, Apache-2.0; ``SsdAnchorsCalculator``,
``TensorsToDetectionsCalculator``, ``NonMaxSuppressionCalculator`` weighted,
``DetectionLetterboxRemovalCalculator``), with the same options:

* input: the whole frame letterboxed (aspect kept, zero border) to 224 x 224, values in [-1, 1];
* 2254 anchors: 5 layers, strides 8, 16, 32, 32, 32 (the three stride-32 layers share one 7 x 7
  grid), two anchors per cell (aspect 1 plus the interpolated one), fixed size 1, offset 0.5;
* boxes ``(x, y, w, h)`` and 4 keypoints ``(x, y)`` in pixels of 224 relative to the anchor centre;
  score = sigmoid of the logit clipped to +-100;
* weighted NMS (IoU > 0.3 merged, coordinates averaged by score, the top score kept).

Keypoint 0 is the mid-hip centre and keypoint 1 encodes body size and rotation; they make the
landmark crop (``mam.pose.blazepose.roi``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mam.pose.blazepose._cv import cv2_module

INPUT_SIZE = 224
STRIDES = (8, 16, 32, 32, 32)
MIN_SCALE, MAX_SCALE = 0.1484375, 0.75
NUM_KEYPOINTS = 4
SCORE_CLIP = 100.0
NMS_IOU = 0.3


def ssd_anchors(
    input_size: int = INPUT_SIZE, strides: tuple[int, ...] = STRIDES, anchors_per_layer: int = 2
) -> np.ndarray:
    """Anchor centres ``[2254, 2]`` (x, y in [0, 1]) in the network's output order.

    NOTE: consecutive layers with the same stride share a grid and their anchors are interleaved
    per cell (MediaPipe's ``SsdAnchorsCalculator``); with ``fixed_anchor_size`` only the centres
    matter. The scales (``MIN_SCALE``/``MAX_SCALE``) only set anchor sizes, which are fixed to 1.
    """
    centres = []
    layer = 0
    while layer < len(strides):
        same = layer
        while same < len(strides) and strides[same] == strides[layer]:
            same += 1
        per_cell = anchors_per_layer * (same - layer)
        size = int(np.ceil(input_size / strides[layer]))
        ys, xs = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
        cell = np.stack([(xs + 0.5) / size, (ys + 0.5) / size], axis=-1).reshape(-1, 2)
        centres.append(np.repeat(cell, per_cell, axis=0))
        layer = same
    return np.concatenate(centres).astype(np.float64)


ANCHORS = ssd_anchors()


@dataclass(frozen=True)
class Letterbox:
    """How a frame was fitted into the square input: the affine (input pixels -> frame pixels)
    and the padding as fractions of the padded square ``(left, top, right, bottom)``."""

    matrix: np.ndarray  # [2, 3], dst (input) -> src (frame), for cv2.WARP_INVERSE_MAP
    padding: tuple[float, float, float, float]


def letterbox(width: int, height: int, size: int = INPUT_SIZE) -> Letterbox:
    """The whole frame, padded to a square around its centre (MediaPipe's keep_aspect_ratio)."""
    side = float(max(width, height))
    pad_x = (side - width) / 2 / side
    pad_y = (side - height) / 2 / side
    s = side / size
    x0 = width / 2 - side / 2
    y0 = height / 2 - side / 2
    matrix = np.array([[s, 0.0, x0], [0.0, s, y0]])
    return Letterbox(matrix, (pad_x, pad_y, pad_x, pad_y))


def preprocess(frame: np.ndarray, box: Letterbox, out: np.ndarray | None = None) -> np.ndarray:
    """RGB uint8 frame -> ``[224, 224, 3]`` float32 in [-1, 1] (warp on uint8, then scale, as
    MediaPipe's OpenCV converter does; the zero border becomes -1)."""
    cv2 = cv2_module()
    crop = cv2.warpAffine(
        frame,
        box.matrix,
        (INPUT_SIZE, INPUT_SIZE),
        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=0,
    )
    if out is None:
        out = np.empty((INPUT_SIZE, INPUT_SIZE, 3), np.float32)
    np.multiply(crop, 2.0 / 255.0, out=out, casting="unsafe")
    out -= 1.0
    return out


@dataclass(frozen=True)
class Detection:
    """One person: score, box ``(xmin, ymin, xmax, ymax)`` and ``keypoints [4, 2]``, all
    normalised to the frame (x by width, y by height)."""

    score: float
    box: np.ndarray
    keypoints: np.ndarray


def decode(
    boxes: np.ndarray, scores: np.ndarray, min_score: float, size: int = INPUT_SIZE
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Raw outputs of one image (``[2254, 12]``, ``[2254, 1]``) -> scores ``[K]``, boxes
    ``[K, 4]`` (xmin, ymin, xmax, ymax) and keypoints ``[K, 4, 2]`` of the anchors above
    ``min_score``, in letterboxed [0, 1] coordinates."""
    logits = np.clip(scores[:, 0].astype(np.float64), -SCORE_CLIP, SCORE_CLIP)
    prob = 1.0 / (1.0 + np.exp(-logits))
    keep = np.flatnonzero(prob >= min_score)
    raw = boxes[keep].astype(np.float64) / size
    anchor = ANCHORS[keep]
    centre = raw[:, 0:2] + anchor
    half = raw[:, 2:4] / 2
    box = np.concatenate([centre - half, centre + half], axis=1)
    kps = raw[:, 4 : 4 + 2 * NUM_KEYPOINTS].reshape(-1, NUM_KEYPOINTS, 2) + anchor[:, None]
    return prob[keep], box, kps


def _iou(box: np.ndarray, others: np.ndarray) -> np.ndarray:
    lo = np.maximum(box[:2], others[:, :2])
    hi = np.minimum(box[2:], others[:, 2:])
    inter = np.prod(np.clip(hi - lo, 0, None), axis=1)
    area = np.prod(box[2:] - box[:2])
    areas = np.prod(others[:, 2:] - others[:, :2], axis=1)
    union = area + areas - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def weighted_nms(
    scores: np.ndarray, boxes: np.ndarray, keypoints: np.ndarray, iou: float = NMS_IOU
) -> list[tuple[float, np.ndarray, np.ndarray]]:
    """MediaPipe's WEIGHTED non-max suppression: each cluster (IoU above ``iou`` with its best
    member) becomes one detection whose box and keypoints are the score-weighted means."""
    order = np.argsort(-scores, kind="stable")
    out = []
    while order.size:
        top = order[0]
        overlap = _iou(boxes[top], boxes[order]) > iou
        members = order[overlap]
        w = scores[members][:, None]
        box = (boxes[members] * w).sum(0) / w.sum()
        kps = (keypoints[members] * w[:, :, None]).sum(0) / w.sum()
        out.append((float(scores[top]), box, kps))
        order = order[~overlap]
    return out


def remove_letterbox(box: np.ndarray, kps: np.ndarray, padding) -> tuple[np.ndarray, np.ndarray]:
    left, top, right, bottom = padding
    scale = np.array([1 - left - right, 1 - top - bottom])
    shift = np.array([left, top])
    box = np.concatenate([(box[:2] - shift) / scale, (box[2:] - shift) / scale])
    return box, (kps - shift) / scale


def detections_from_outputs(
    boxes: np.ndarray, scores: np.ndarray, padding, min_score: float
) -> list[Detection]:
    """Network outputs of one image -> detections in frame coordinates, best first."""
    s, b, k = decode(boxes, scores, min_score)
    result = []
    for score, box, kps in weighted_nms(s, b, k):
        box, kps = remove_letterbox(box, kps, padding)
        result.append(Detection(score, box, kps))
    return result
