"""OpenCV, imported on first use (it arrives with mediapipe; importing it costs ~0.2 s)."""

from __future__ import annotations

from functools import cache

from mam.errors import DependencyMissingError


@cache
def cv2_module():
    try:
        import cv2
    except ImportError as exc:
        raise DependencyMissingError(
            "the onnx pose backend warps crops with OpenCV: pip install opencv-python-headless "
            "(mediapipe 0.10.21 brings opencv-contrib-python)"
        ) from exc
    return cv2
