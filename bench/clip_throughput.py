"""Clips per second of the MAM clip network: PyTorch eager vs ONNX Runtime (and, on a GPU,
PyTorch CUDA fp32/fp16, ONNX Runtime CUDA and TensorRT fp32/fp16), in one run.

Networks: ``reference`` (``MAMConfig.reference()``: the authors' configuration, temporal conv
applied twice, 2 shared layers; random weights, speed does not depend on them) and ``demo`` (the
shipped compact weights). Each is exported as ``python -m export onnx`` does it (dynamo, encoders
written out by ``export.onnx.for_export``) into a temporary folder.
Every figure warms up, synchronises before reading the clock, runs under
``torch.inference_mode()`` and is printed with its batch size and threads; the last column is
each runtime's speed over PyTorch eager on the same device. Figures, never assertions.

    python bench/clip_throughput.py                          # CPU: eager vs ORT CPU
    python bench/clip_throughput.py --device cuda            # + GPU rows that are available
    python bench/clip_throughput.py --models reference --batches 1 8 32 64 --seconds 3
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from export.onnx import ClipNetwork, export_graph, for_export, graph_specs  # noqa: E402
from mam.model.config import MAMConfig  # noqa: E402
from mam.model.network import MAM  # noqa: E402
from mam.model.weights import load_weights  # noqa: E402

DEMO_WEIGHTS = ROOT / "models" / "mam_demo.json"


def clip_flops(model: MAM) -> float:
    """FLOPs (2 x multiply-adds) of one clip by torch's FLOP counter, on the export form.

    NOTE: counted on ``nn.TransformerEncoder`` in eval the Transformer is invisible (its fused
    fast-path kernel is not counted) and the reference configuration reads 0.7 GFLOP; with the
    encoders written out it is about 1.55 GFLOP, of which the temporal convolutions are 0.66.
    """
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, model.cfg.clip_frames, 3, model.cfg.num_joints, model.cfg.num_joints)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        for_export(model).forward_clips(x)
    return float(fc.get_total_flops())


def timed(fn: Callable[[], object], n: int, seconds: float, sync: Callable[[], None]) -> float:
    """Clips per second of ``fn`` (one call = ``n`` clips): 2 warm-up calls, then rounds of
    calls until ``seconds`` have passed (at least 3 rounds); the median round rate."""
    for _ in range(2):
        fn()
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    one = max(time.perf_counter() - t0, 1e-6)
    per_round = max(1, int(0.25 / one))  # rounds of about 0.25 s
    rates, start = [], time.perf_counter()
    while len(rates) < 3 or time.perf_counter() - start < seconds:
        t = time.perf_counter()
        for _ in range(per_round):
            fn()
        sync()
        rates.append(n * per_round / (time.perf_counter() - t))
    return statistics.median(rates)


def _nosync() -> None:
    return None


def ort_session(path: Path, threads: int, providers: list):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), so, providers=providers)


def cpu_rows(model, onnx_path, plain_path, batches, threads, seconds, rng) -> list[tuple]:
    sess = ort_session(onnx_path, threads, ["CPUExecutionProvider"])
    plain = ort_session(plain_path, threads, ["CPUExecutionProvider"]) if plain_path else None
    rows = []
    for n in batches:
        x = rng.standard_normal((n, *model.input_shape)).astype(np.float32)
        xt = torch.from_numpy(x)
        with torch.inference_mode():
            eager = timed(lambda xt=xt: model(xt), n, seconds, _nosync)
        ort_cps = timed(lambda x=x: sess.run(None, {"instances": x}), n, seconds, _nosync)
        rows.append((n, "pytorch eager cpu fp32", eager, 1.0))
        rows.append((n, "onnxruntime cpu fp32", ort_cps, ort_cps / eager))
        if plain is not None:
            cps = timed(lambda x=x: plain.run(None, {"instances": x}), n, seconds, _nosync)
            rows.append((n, "  same, plain torch export", cps, cps / eager))
    return rows


def cuda_rows(model, onnx_path, batches, seconds, rng, tmp: Path) -> list[tuple]:
    """GPU rows; each runtime that is missing prints why instead of a figure. Inputs are
    already on the device, as in a server that batches on the GPU."""
    rows: list[tuple] = []
    if not torch.cuda.is_available():
        print("# cuda: no CUDA device visible to torch; GPU rows skipped")
        return rows
    dev = torch.device("cuda")
    sync = torch.cuda.synchronize
    gpu = {
        "fp32": ClipNetwork(model.inner).to(dev).eval(),
        "fp16": ClipNetwork(MAM(model.inner.cfg)).to(dev).eval(),
    }
    gpu["fp16"].load_state_dict(gpu["fp32"].state_dict())
    gpu["fp16"].half()
    import onnxruntime as ort

    has_ort_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    if not has_ort_cuda:
        print("# onnxruntime cuda: this onnxruntime has no CUDA provider (onnxruntime-gpu)")
    else:
        sess = ort_session(onnx_path, 1, ["CUDAExecutionProvider"])
    trt_engines = {}
    try:
        import tensorrt  # noqa: F401

        from mam.runtime import TensorRTEngine, build_engine

        for prec in ("fp32", "fp16"):
            path = tmp / f"{onnx_path.stem}.{prec}.engine"
            built = build_engine(
                onnx_path,
                path,
                input_name="instances",
                input_shape=["N", *model.input_shape],
                profile=(1, max(batches), max(batches)),
                precision=prec,
            )
            trt_engines[built] = TensorRTEngine(path)
    except ImportError as e:
        print(f"# tensorrt: not available ({e}); TensorRT rows skipped")
    for n in batches:
        x = torch.from_numpy(rng.standard_normal((n, *model.input_shape)).astype(np.float32))
        x32 = x.to(dev)
        x16 = x32.half()
        with torch.inference_mode():
            eager = timed(lambda x32=x32: gpu["fp32"](x32), n, seconds, sync)
            half = timed(lambda x16=x16: gpu["fp16"](x16), n, seconds, sync)
        rows.append((n, "pytorch eager cuda fp32", eager, 1.0))
        rows.append((n, "pytorch eager cuda fp16", half, half / eager))
        if has_ort_cuda:
            io = sess.io_binding()
            xv = ort.OrtValue.ortvalue_from_numpy(x.numpy(), "cuda", 0)
            io.bind_ortvalue_input("instances", xv)
            for o in ("clip_features", "clip_logits"):
                io.bind_output(o, "cuda")

            def run_ort(io=io):
                sess.run_with_iobinding(io)

            cps = timed(run_ort, n, seconds, sync)
            rows.append((n, "onnxruntime cuda fp32", cps, cps / eager))
        for prec, eng in trt_engines.items():
            cps = timed(lambda eng=eng, x32=x32: eng(instances=x32), n, seconds, sync)
            rows.append((n, f"tensorrt {prec}", cps, cps / eager))
    return rows


class Net(torch.nn.Module):
    """The clip network of ``inner`` with its input shape, for the bench."""

    def __init__(self, inner: MAM) -> None:
        super().__init__()
        self.inner = inner
        c = inner.cfg
        self.input_shape = (c.clip_frames, c.in_channels, c.num_joints, c.num_joints)

    def forward(self, x):
        return self.inner.forward_clips(x)


def build(name: str) -> Net:
    if name == "reference":
        torch.manual_seed(0)
        return Net(MAM(MAMConfig.reference()).eval())
    if name == "demo":
        return Net(load_weights(DEMO_WEIGHTS)[0])
    raise SystemExit(f"unknown model {name!r}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cuda adds GPU rows")
    ap.add_argument("--models", nargs="+", default=["reference", "demo"], help="reference, demo")
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32, 64], help="clips/call")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: all)")
    ap.add_argument("--seconds", type=float, default=2.0, help="timed seconds per figure")
    ap.add_argument("--skip-cpu", action="store_true", help="GPU rows only (with --device cuda)")
    ap.add_argument(
        "--plain-graph",
        action="store_true",
        help="also time ORT on the plain export (nn.TransformerEncoder as torch exports it)",
    )
    args = ap.parse_args()

    import onnxruntime as ort

    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"threads {threads} (torch intra-op {torch.get_num_threads()}, ORT intra-op {threads}, "
        f"inter-op 1); torch {torch.__version__}, onnxruntime {ort.__version__}"
    )
    if args.device == "cuda" and torch.cuda.is_available():
        print(f"# GPU {torch.cuda.get_device_name(0)}")
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            net = build(name)
            spec = next(s for s in graph_specs(net.inner) if s.role == "clip")
            onnx_path = export_graph(
                for_export(net.inner), spec, Path(tmp) / f"{name}.clip.onnx", opset=18,
                exporter="dynamo",
            )  # fmt: skip
            plain_path = None
            if args.plain_graph:
                plain_path = export_graph(
                    net.inner, spec, Path(tmp) / f"{name}.plain.onnx", opset=18, exporter="dynamo"
                )
            gflop = clip_flops(net.inner) / 1e9
            params = sum(p.numel() for p in net.parameters())
            print(f"\n## {name}: {params:,} parameters, {gflop:.2f} GFLOP per clip")
            print(f"{'batch':>5}  {'runtime':<26} {'clips/s':>10}  {'vs eager':>8}")
            rows = [] if args.skip_cpu else cpu_rows(net, onnx_path, plain_path, args.batches,
                                                     threads, args.seconds, rng)  # fmt: skip
            if args.device == "cuda":
                rows += cuda_rows(net, onnx_path, args.batches, args.seconds, rng, Path(tmp))
            for n, runtime, cps, ratio in sorted(rows, key=lambda r: r[0]):
                print(f"{n:>5}  {runtime:<26} {cps:>10.1f}  {ratio:>7.2f}x")


if __name__ == "__main__":
    main()
