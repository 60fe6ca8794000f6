"""Pose backends on the same 720p frames, in the same run: frames/s, ratio and landmark parity.

Decodes the demo recording once (25 fps, 1280 x 720), then times the ``mediapipe`` backend
(MediaPipe's own graph, tracking mode) and the ``onnx`` backend (``mam.pose.blazepose``:
converted networks, numpy pre/post-processing, sparse detection, batched crops) on exactly those
frames, alternating rounds so that load from other processes hits both alike; frames/s is the
median round. Parity, on the same frames:

* tracking: the 17 mapped joints of both backends (pixels; world metres, pelvis-relative). This
  includes MediaPipe's landmark smoothing and its own crop track, which the onnx backend does not
  copy, so it is an upper bound of the pipeline difference;
* static: MediaPipe ``static_image_mode=True`` vs ``BlazePoseOnnx.process_image`` on every
  ``--static-every``-th frame, all 33 landmarks: the parity of the ported pipeline itself.

    python bench/pose_backends.py                         # 250 frames, 3 rounds
    python bench/pose_backends.py --frames 500 --threads 1 --batch-size 4
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np

from mam.pose.blazepose.backend import OnnxPoseBackend
from mam.pose.blazepose.model import BlazePoseOnnx
from mam.pose.mediapipe_backend import (
    MediaPipePoseBackend,
    _import_mediapipe_pose,
    _landmarks_array,
    install_native_log_filter,
)
from mam.video import iter_frames

DEMO = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "demo")


def static_parity(frames: list[np.ndarray], model: BlazePoseOnnx) -> dict:
    """Mean pixel / world error of all 33 landmarks, MediaPipe static mode vs the ONNX port."""
    mp_pose = _import_mediapipe_pose()
    px, world, vis, missed = [], [], [], 0
    install_native_log_filter()  # MediaPipe's native log lines stay out of stderr
    with mp_pose.Pose(static_image_mode=True) as pose:
        for frame in frames:
            ref = pose.process(frame)
            got = model.process_image(frame)
            if ref.pose_landmarks is None or got is None:
                missed += int((ref.pose_landmarks is None) != (got is None))
                continue
            h, w = frame.shape[:2]
            a = _landmarks_array(ref.pose_landmarks)
            b = _landmarks_array(ref.pose_world_landmarks)
            px.append(np.hypot((a[:, 0] - got.image[:, 0]) * w, (a[:, 1] - got.image[:, 1]) * h))
            world.append(np.linalg.norm(b[:, :3] - got.world[:, :3], axis=1))
            vis.append(np.abs(a[:, 3] - got.image[:, 3]))
    px_all = np.concatenate(px) if px else np.array([np.nan])
    return {
        "frames": len(frames),
        "disagree_on_detection": missed,
        "mean_px": float(px_all.mean()),
        "p95_px": float(np.percentile(px_all, 95)),
        "mean_world_m": float(np.concatenate(world).mean()) if world else float("nan"),
        "mean_visibility_diff": float(np.concatenate(vis).mean()) if vis else float("nan"),
    }


def tracking_parity(ref, got) -> dict:
    both = (ref.confidence > 0).any(1) & (got.confidence > 0).any(1)
    px = np.linalg.norm(ref.meta["image_joints"][both] - got.meta["image_joints"][both], axis=-1)
    world = np.linalg.norm(ref.joints[both] - got.joints[both], axis=-1)
    return {
        "frames_both_tracked": int(both.sum()),
        "frames_tracked": {"mediapipe": int((ref.confidence > 0).any(1).sum()),
                           "onnx": int((got.confidence > 0).any(1).sum())},
        "mean_px": float(px.mean()),
        "median_px": float(np.median(px)),
        "mean_world_m": float(world.mean()),
    }  # fmt: skip


def end_to_end(args, onnx: OnnxPoseBackend) -> dict:
    """Decode + pose, one pass each: MediaPipe, the onnx backend decoding inline, and decoding
    in its own thread (``prefetch``), to show what overlapping decode and inference gives."""

    def frames():
        return (f for _, f in zip(range(args.frames), iter_frames(args.video, max_side=1280)))

    out = {}
    runs = (
        ("mediapipe", MediaPipePoseBackend(), None),
        ("onnx_inline_decode", onnx, 0),
        ("onnx_decode_thread", onnx, 32),
    )
    for name, backend, prefetch in runs:
        if prefetch is not None:
            backend.prefetch = prefetch
        t0 = time.perf_counter()
        seq = backend.estimate(frames())
        out[name] = round(seq.num_frames / (time.perf_counter() - t0), 1)
    onnx.prefetch = 0
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--video", default=os.path.join(DEMO, "infant_demo.mp4"))
    ap.add_argument("--frames", type=int, default=250, help="frames from the start (25 fps)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    ap.add_argument("--detect-every", type=int, default=50)
    ap.add_argument("--static-every", type=int, default=10)
    ap.add_argument(
        "--no-decode", action="store_true", help="skip the end-to-end runs that decode too"
    )
    args = ap.parse_args(argv)

    frames = [f for _, f in zip(range(args.frames), iter_frames(args.video, max_side=1280))]
    h, w = frames[0].shape[:2]
    onnx = OnnxPoseBackend(
        batch_size=args.batch_size,
        threads=args.threads,
        detect_every=args.detect_every,
        prefetch=0,  # frames are in memory: time pose only, as for mediapipe
    )
    mp = MediaPipePoseBackend()
    warm = frames[: 2 * args.batch_size]
    onnx.estimate(warm)
    mp.estimate(warm)
    times: dict[str, list[float]] = {"mediapipe": [], "onnx": []}
    results = {}
    for _ in range(args.rounds):
        for name, backend in (("mediapipe", mp), ("onnx", onnx)):
            t0 = time.perf_counter()
            results[name] = backend.estimate(frames)
            times[name].append(time.perf_counter() - t0)
    mp.close()
    fps = {k: len(frames) / statistics.median(v) for k, v in times.items()}
    report = {
        "video": os.path.basename(args.video),
        "frames": len(frames),
        "size": [w, h],
        "cpus": len(os.sched_getaffinity(0)),
        "onnx_config": {k: onnx.config[k] for k in ("batch_size", "detect_every",
                                                     "intra_op_threads", "providers")},
        "fps": {k: round(v, 1) for k, v in fps.items()},
        "ratio_onnx_vs_mediapipe": round(fps["onnx"] / fps["mediapipe"], 2),
        "per_round_s": {k: [round(t, 2) for t in v] for k, v in times.items()},
        "onnx_stats": results["onnx"].meta["stats"],
        "parity_tracking": tracking_parity(results["mediapipe"], results["onnx"]),
        "parity_static": static_parity(frames[:: args.static_every], onnx.model),
    }  # fmt: skip
    if not args.no_decode:
        report["end_to_end_fps"] = end_to_end(args, onnx)
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
