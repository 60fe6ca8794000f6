"""The paper's pose networks -> ONNX (+ TensorRT on a GPU machine), with a parity check.

* ``NAME.onnx`` for HRNet: ``images`` ``[N, 3, 256, 192]`` (ImageNet-normalised RGB) ->
  ``heatmaps`` ``[N, 17, 64, 48]``; N (frames) is dynamic.
* ``NAME.onnx`` for the VideoPose3D lifter: ``keypoints_2d`` ``[N, T, 17, 2]`` (H36M order,
  after ``mam.pose.paper.videopose3d.normalize_2d``: root-relative, divided by the sequence's RMS
  joint-to-root distance) -> ``joints_3d`` ``[N, T - receptive_field + 1, 17, 3]``; N and T are
  dynamic.

Each export gets ``NAME.onnx.json``: the weights' sha256 (a stale export is detectable), the network
config, the IO names and shapes, the opset and the ONNX Runtime vs PyTorch parity on two input
shapes. The export and parity functions are ``mam.runtime.onnx_export``'s, the same the backend
uses for its cache, so a graph exported here and one exported on first use are made the same way.
Layout after ``export/onnx.py`` (timm ``timm/utils/onnx.py``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

from mam.files import write_atomic
from mam.model.weights import sha256_of
from mam.pose.paper.backend import INPUT_H, INPUT_W, load_hrnet
from mam.pose.paper.lifter_train import load_lifter
from mam.runtime.onnx_export import (
    ONNX_OPSET,
    PARITY_ATOL,
    PARITY_RTOL,
    ort_parity,
    torch_to_onnx,
)
from mam.skeleton import NUM_JOINTS

logger = logging.getLogger(__name__)

HRNET_PARITY_BATCHES = (1, 3)


def _write_manifest(path: Path, weights: Path, config: dict, io: dict, worst: float,
                    shapes: list) -> Path:  # fmt: skip
    import onnx
    import onnxruntime

    manifest = {
        "weights": weights.name,
        "weights_sha256": sha256_of(weights),
        "onnx": path.name,
        "onnx_sha256": sha256_of(path),
        "config": config,
        "opset": ONNX_OPSET,
        "exporter": f"torch.onnx TorchScript exporter (torch {torch.__version__.split('+')[0]})",
        "onnx_version": onnx.__version__,
        **io,
        "parity": {
            "against": f"torch eager vs onnxruntime {onnxruntime.__version__} CPU",
            "input_shapes": shapes,
            "tolerance": f"{PARITY_ATOL} + {PARITY_RTOL} * max|torch|",
            "worst_vs_tolerance": float(f"{worst:.1e}"),
        },
    }
    mpath = path.with_name(path.name + ".json")
    write_atomic(mpath, (json.dumps(manifest, indent=2) + "\n").encode())
    return mpath


def export_hrnet(weights: str | Path, out_dir: str | Path, *, parity: bool = True) -> Path:
    """A site's HRNet checkpoint (official key layout) -> ``out_dir/<stem>.onnx`` + manifest."""
    weights = Path(weights)
    model, config = load_hrnet(weights)
    path = Path(out_dir) / f"{weights.stem}.onnx"
    rng = np.random.default_rng(0)
    shapes = [[n, 3, INPUT_H, INPUT_W] for n in HRNET_PARITY_BATCHES]
    examples = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    # NOTE: the example has N > 1 so that no exporter specialises the frame axis to 1
    torch_to_onnx(model, examples[-1], path, input_name="images", output_name="heatmaps",
                dynamic_axes={0: "N"})  # fmt: skip
    worst = ort_parity(model, path, examples) if parity else float("nan")
    h, w = INPUT_H // 4, INPUT_W // 4
    io = {
        "inputs": [{"name": "images", "shape": ["N", 3, INPUT_H, INPUT_W], "dtype": "float32"}],
        "outputs": [
            {"name": "heatmaps", "shape": ["N", config["num_joints"], h, w], "dtype": "float32"}
        ],  # fmt: skip
        "preprocessing": "RGB / 255, ImageNet mean (0.485, 0.456, 0.406) and std "
        "(0.229, 0.224, 0.225); a 3:4 box resized to 192x256",
    }
    _write_manifest(path, weights, config, io, worst, shapes)
    logger.info("exported HRNet to %s (parity %.2g of tolerance)", path, worst)
    return path


def export_lifter(weights: str | Path, out_dir: str | Path, *, parity: bool = True) -> Path:
    """A lifter saved by ``mam.pose.paper.lifter_train`` -> ``out_dir/<stem>.onnx`` + manifest."""
    weights = Path(weights)
    model, meta = load_lifter(weights)
    rf = model.receptive_field()
    path = Path(out_dir) / f"{weights.stem}.onnx"
    shapes = [[2, rf + 16, NUM_JOINTS, 2], [1, rf + 99, NUM_JOINTS, 2]]
    rng = np.random.default_rng(0)
    examples = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    torch_to_onnx(model, examples[0], path, input_name="keypoints_2d", output_name="joints_3d",
                dynamic_axes={0: "N", 1: "T"})  # fmt: skip
    worst = ort_parity(model, path, examples) if parity else float("nan")
    io = {
        "inputs": [{"name": "keypoints_2d", "shape": ["N", "T", NUM_JOINTS, 2]}],
        "outputs": [{"name": "joints_3d", "shape": ["N", f"T-{rf - 1}", NUM_JOINTS, 3]}],
        "receptive_field": rf,
        "preprocessing": "COCO -> H36M (mam.pose.paper.videopose3d.coco_to_h36m), then "
        "mam.pose.paper.videopose3d.normalize_2d (root-relative, divided by the sequence's RMS "
        "joint-to-root distance: not VideoPose3D's screen coordinates), then edge padding of "
        "(receptive_field - 1) / 2 frames",
        "input_units": meta.get("input", {}),
        "output_units": meta.get("output", {}),
    }
    _write_manifest(path, weights, meta["config"], io, worst, shapes)
    logger.info("exported lifter to %s (parity %.2g of tolerance)", path, worst)
    return path


def build_hrnet_engine(
    onnx_path: str | Path,
    engine_path: str | Path,
    *,
    opt_frames: int = 16,
    max_frames: int = 64,
    precision: str = "fp16",
) -> str:
    """TensorRT engine of an exported HRNet with a frame-batch profile ``(1, opt, max)``, built on
    the GPU that will run it (``mam.runtime.build_engine``; ``RuntimeUnavailable`` without
    TensorRT). Returns the precision built."""
    from mam.runtime import build_engine

    if not 1 <= opt_frames <= max_frames:
        raise ValueError("need 1 <= opt_frames <= max_frames")
    return build_engine(Path(onnx_path), Path(engine_path), input_name="images",
                        input_shape=["N", 3, INPUT_H, INPUT_W],
                        profile=(1, opt_frames, max_frames), precision=precision)  # fmt: skip
