"""Reduced-precision variants of the BlazePose landmark network, for the screening-equivalence
bench (``bench/screening_equivalence.py``): the ``onnx`` pose backend runs them in place of the
converted fp32 network, nothing else changed. The default path never reads this module.

    int8dynamic   ONNX Runtime dynamic quantisation (int8 weights, activations quantised per call)
    int8static    ONNX Runtime static quantisation (QDQ, int8 weights per channel, uint8
                  activations calibrated on crops of recordings from the *training* pool, never
                  the evaluated set)
    int8mixed     int8static with the last 40 nodes of the graph (the output heads and the
                  heatmap's upsampling path) left in fp32
    ov-bf16       OpenVINO on the CPU, inference precision bf16 (``pip install openvino``)
    ov-fp16       OpenVINO on the CPU, inference precision f16
    ov-fp32       OpenVINO on the CPU at full precision (its own kernels, not ONNX Runtime's)

Built files go to ``--work`` (default ``MAM_POSE_CACHE``/candidates) and are reused.

    python bench/landmark_variants.py int8static   # build it and time it against fp32
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mam.pose.base import pose_cache_dir  # noqa: E402
from mam.pose.blazepose import convert  # noqa: E402
from mam.pose.blazepose.roi import CROP_SIZE  # noqa: E402
from mam.runtime.networks import Network, OrtNetwork  # noqa: E402

VARIANTS = ("int8dynamic", "int8static", "int8mixed", "ov-bf16", "ov-fp16", "ov-fp32")
FP32_TAIL = 40  # int8mixed: the graph's last nodes (output heads, heatmap upsampling) stay fp32
CALIBRATION_CROPS = 256


def work_dir(work: Path | None = None) -> Path:
    d = Path(work).resolve() if work else pose_cache_dir() / "candidates"
    d.mkdir(parents=True, exist_ok=True)
    return d


def source_model() -> Path:
    """The converted fp32 landmark network that the ``onnx`` backend runs."""
    return convert.ensure_all(None)[convert.LANDMARK].onnx_path


def calibration_crops(work: Path, n: int = CALIBRATION_CROPS) -> np.ndarray:
    """``[n, 256, 256, 3]`` float32 crops, as the backend feeds them, from two short recordings
    rendered from the training pool (seed 99), posed by the reference path. Cached."""
    cache = work / f"calibration_{n}.npy"
    if cache.is_file():
        return np.load(cache)
    from unittest import mock

    from mam.pose.blazepose.backend import OnnxPoseBackend
    from mam.video import iter_frames

    folder = Path(tempfile.mkdtemp(prefix="mam-calib-"))
    subprocess.run(
        [sys.executable, "-m", "mam", "synth", "--out", str(folder), "--infants", "2", "--seed",
         "99", "--min-s", "12", "--max-s", "12", "--backgrounds", "real", "--pool", "train",
         "--render", "854x480,1280x720"],
        check=True, capture_output=True,
    )  # fmt: skip
    seen: list[np.ndarray] = []
    backend = OnnxPoseBackend(prefetch=0)
    run = backend.model.landmarker.run

    def record(inputs, batch=None):
        seen.append(np.array(next(iter(inputs.values()))))
        return run(inputs, batch)

    with mock.patch.object(backend.model.landmarker, "run", record):
        for video in sorted((folder / "videos").glob("*.mp4")):
            backend.estimate(iter_frames(video))
    crops = np.concatenate(seen)
    pick = np.random.default_rng(0).choice(len(crops), size=min(n, len(crops)), replace=False)
    crops = crops[np.sort(pick)].astype(np.float32)
    np.save(cache, crops)
    return crops


def _preprocessed(src: Path, work: Path) -> Path:
    """ONNX Runtime's recommended pre-processing (shape inference, graph optimisation)."""
    out = work / f"{src.stem}.pre.onnx"
    if not out.is_file():
        from contextlib import chdir

        from onnxruntime.quantization.shape_inference import quant_pre_process

        with tempfile.TemporaryDirectory() as tmp, chdir(tmp):  # it may write temporaries to "."
            quant_pre_process(str(src), str(out), skip_symbolic_shape=True)
    return out


def build(name: str, work: Path | None = None) -> Path:
    """The ONNX file of variant ``name`` (the fp32 file for the OpenVINO variants)."""
    work = work_dir(work)
    src = source_model()
    if name.startswith("ov-"):
        return src
    out = work / f"{src.stem}.{name}.onnx"
    if out.is_file():
        return out
    from onnxruntime import quantization as q

    pre = _preprocessed(src, work)
    if name == "int8dynamic":
        q.quantize_dynamic(str(pre), str(out), weight_type=q.QuantType.QInt8, per_channel=True)
    elif name in ("int8static", "int8mixed"):
        crops = calibration_crops(work)
        exclude = []
        if name == "int8mixed":
            import onnx

            exclude = [n.name for n in onnx.load(str(pre)).graph.node][-FP32_TAIL:]

        class Reader(q.CalibrationDataReader):
            def __init__(self) -> None:
                self.it = iter(crops[:, None])

            def get_next(self):
                x = next(self.it, None)
                return None if x is None else {"input": x}

        q.quantize_static(
            str(pre), str(out), Reader(), quant_format=q.QuantFormat.QDQ, per_channel=True,
            activation_type=q.QuantType.QUInt8, weight_type=q.QuantType.QInt8,
            calibrate_method=q.CalibrationMethod.MinMax, nodes_to_exclude=exclude,
        )  # fmt: skip
    else:
        raise ValueError(f"unknown variant {name!r}; one of {', '.join(VARIANTS)}")
    return out


class OpenVinoNetwork(Network):
    """An ONNX file compiled by OpenVINO for the CPU at an inference precision (bf16, f16)."""

    def __init__(self, path: Path, precision: str, threads: int | None, max_batch: int | None):
        try:
            import openvino as ov
        except ImportError as exc:
            raise SystemExit("the ov- variants need OpenVINO: pip install openvino") from exc
        core = ov.Core()
        config = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        model = core.read_model(str(path))
        model.reshape({model.inputs[0]: [-1, CROP_SIZE, CROP_SIZE, 3]})
        self.compiled = core.compile_model(model, "CPU", config)
        self.request = self.compiled.create_infer_request()
        super().__init__([i.get_any_name() for i in model.inputs], max_batch, "openvino")
        self.outputs = [o.get_any_name() for o in model.outputs]  # the compiled model's order
        self.providers = [f"OpenVINO CPU {precision}"]
        self.detail = {"providers": self.providers, "onnx": path.name}

    def _run(self, inputs):
        res = self.request.infer(inputs)
        return {
            n: np.array(res[o], np.float32) for n, o in zip(self.outputs, self.compiled.outputs)
        }


def landmark_network(name: str, threads: int | None, max_batch: int | None,
                     work: Path | None = None) -> Network:  # fmt: skip
    """Variant ``name`` as the backend's landmark runner (same inputs and output names)."""
    path = build(name, work)
    if name.startswith("ov-"):
        precision = {"ov-bf16": "bf16", "ov-fp16": "f16", "ov-fp32": "f32"}[name]
        return OpenVinoNetwork(path, precision, threads,
                               max_batch)  # fmt: skip
    return OrtNetwork(path, device="cpu", threads=threads, max_batch=max_batch)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("variant", choices=VARIANTS)
    ap.add_argument("--work", type=Path)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    work = work_dir(args.work)
    crops = calibration_crops(work)[:64]
    ref = OrtNetwork(source_model(), device="cpu", threads=args.threads, max_batch=4)
    cand = landmark_network(args.variant, args.threads, 4, work)
    a, b = ref(crops), cand(crops)
    px = np.abs(a["landmarks"] - b["landmarks"]).reshape(len(crops), -1, 5)[..., :2]
    times = {"fp32": [], args.variant: []}
    for _ in range(args.rounds):  # alternating, batches of 4 as the backend runs them
        for label, net in (("fp32", ref), (args.variant, cand)):
            t = time.perf_counter()
            net(crops)
            times[label].append(time.perf_counter() - t)
    ms = {k: 1e3 * float(np.median(v)) / len(crops) for k, v in times.items()}
    print(f"{args.variant}: {ms[args.variant]:.2f} ms/crop vs fp32 {ms['fp32']:.2f} "
          f"({ms['fp32'] / ms[args.variant]:.2f}x); landmarks {px.mean():.2f} px apart on the "
          f"{CROP_SIZE} px crop (max {px.max():.1f}), pose flag max |d| "
          f"{np.abs(a['pose_flag'] - b['pose_flag']).max():.3f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
