"""Command line of ``export``.

Usage::

    python -m export onnx                          # models/mam_demo.*.onnx + manifest
    python -m export onnx --weights models/mam_demo.json --out /tmp/onnx --opset 18
    python -m export tensorrt --opt-batch 64 --max-batch 128   # needs a GPU and tensorrt
    python -m export blazepose [--cache DIR]       # BlazePose tflite -> ONNX in MAM_POSE_CACHE
    python -m export pose-onnx --hrnet SITE.pth [--lifter models/lifter_infant.pt] --out DIR
    python -m export pose-tensorrt --onnx DIR/SITE.onnx --engine SITE.engine   # GPU only
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

DEFAULT_WEIGHTS = Path(__file__).resolve().parent.parent / "models" / "mam_demo.json"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m export", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    o = sub.add_parser("onnx", help="export the clip network, bag head and Info branch to ONNX")
    o.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS, help="NAME.json of weights")
    o.add_argument("--out", type=Path, default=None, help="output folder (default: beside them)")
    o.add_argument("--opset", type=int, default=None, help="ONNX opset (default 18)")
    o.add_argument(
        "--exporter",
        choices=["dynamo", "torchscript"],
        default="dynamo",
        help="torch.onnx exporter (dynamo by default; torchscript only to compare)",
    )
    o.add_argument("--no-parity", action="store_true", help="skip the ONNX Runtime parity check")
    t = sub.add_parser("tensorrt", help="build TensorRT engines from the exported ONNX files")
    t.add_argument(
        "--manifest",
        type=Path,
        default=DEFAULT_WEIGHTS.with_name("mam_demo.onnx.json"),
        help="NAME.onnx.json written by `python -m export onnx`",
    )
    t.add_argument("--cache", type=Path, default=None, help="engine cache folder")
    t.add_argument("--opt-batch", type=int, default=64, help="clip batch TensorRT tunes for")
    t.add_argument("--max-batch", type=int, default=64, help="largest clip batch")
    t.add_argument(
        "--precision", choices=["fp16", "fp32"], default="fp16", help="fp16 where supported"
    )
    t.add_argument("--force", action="store_true", help="rebuild even when cached")
    b = sub.add_parser(
        "blazepose", help="convert the mediapipe wheel's BlazePose networks to ONNX (pose cache)"
    )
    b.add_argument("--cache", type=Path, default=None, help="default: $MAM_POSE_CACHE")
    b.add_argument("--force", action="store_true", help="convert even when cached")
    b.add_argument("--no-verify", action="store_true", help="skip the comparison with TFLite")
    po = sub.add_parser("pose-onnx", help="HRNet and/or the VideoPose3D lifter -> ONNX + parity")
    po.add_argument("--hrnet", type=Path, help="a site's HRNet checkpoint (official key names)")
    po.add_argument("--lifter", type=Path, help="a lifter from `mam train-lifter`")
    po.add_argument("--out", type=Path, required=True, help="output folder")
    po.add_argument("--no-parity", action="store_true", help="skip the ONNX Runtime parity check")
    pt = sub.add_parser("pose-tensorrt", help="TensorRT engine of an exported HRNet (GPU)")
    pt.add_argument("--onnx", type=Path, required=True, help="NAME.onnx from `pose-onnx`")
    pt.add_argument("--engine", type=Path, required=True, help="engine file to write")
    pt.add_argument("--opt-frames", type=int, default=16, help="frame batch TensorRT tunes for")
    pt.add_argument("--max-frames", type=int, default=64, help="largest frame batch")
    pt.add_argument("--precision", choices=["fp16", "fp32"], default="fp16")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in ("export", "mam"):
        logging.getLogger(name).setLevel(logging.INFO)
    from mam.runtime import RuntimeUnavailable

    try:
        return _run(args)
    except RuntimeUnavailable as e:  # TensorRT commands without TensorRT or a GPU
        print(f"error [tensorrt_unavailable]: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    """Run one subcommand (the argparse subcommand name, not a runtime or backend name)."""
    match args.command:
        case "onnx":
            from export.onnx import DEFAULT_OPSET, export_onnx

            res = export_onnx(
                args.weights,
                args.out,
                opset=args.opset or DEFAULT_OPSET,
                exporter=args.exporter,
                parity=not args.no_parity,
            )
            print(json.dumps({"manifest": str(res.manifest), "parity_max_abs_diff": res.parity}))
            return 0
        case "pose-onnx":
            from export.pose_networks import export_hrnet, export_lifter

            if not (args.hrnet or args.lifter):
                print("error: give --hrnet and/or --lifter", file=sys.stderr)
                return 2
            done = {}
            if args.hrnet:
                done["hrnet"] = str(export_hrnet(args.hrnet, args.out, parity=not args.no_parity))
            if args.lifter:
                done["lifter"] = str(
                    export_lifter(args.lifter, args.out, parity=not args.no_parity)
                )
            print(json.dumps(done))
            return 0
        case "pose-tensorrt":
            from export.pose_networks import build_hrnet_engine

            built = build_hrnet_engine(
                args.onnx,
                args.engine,
                opt_frames=args.opt_frames,
                max_frames=args.max_frames,
                precision=args.precision,
            )
            print(json.dumps({"engine": str(args.engine), "precision": built}))
            return 0
        case "blazepose":
            from export.blazepose import export_blazepose

            print(
                json.dumps(export_blazepose(args.cache, args.force, not args.no_verify), indent=1)
            )
            return 0
        case _:  # "tensorrt": engines of the clip network
            from mam.runtime import build_engines

            engines = build_engines(
                args.manifest,
                cache_dir=args.cache,
                opt_batch=args.opt_batch,
                max_batch=args.max_batch,
                precision=args.precision,
                force=args.force,
            )
            print(json.dumps({k: str(v) for k, v in engines.items()}))
            return 0


if __name__ == "__main__":
    sys.exit(main())
