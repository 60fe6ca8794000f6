"""Command line of ``export``.

Usage::

    python -m export onnx                          # models/mam_demo.*.onnx + manifest
    python -m export onnx --weights models/mam_demo.json --out /tmp/onnx --opset 18
    python -m export tensorrt --opt-batch 64 --max-batch 128   # needs a GPU and tensorrt
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
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in ("export", "mam"):
        logging.getLogger(name).setLevel(logging.INFO)
    if args.command == "onnx":
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
    from mam.runtime import RuntimeUnavailable, build_engines

    try:
        engines = build_engines(
            args.manifest,
            cache_dir=args.cache,
            opt_batch=args.opt_batch,
            max_batch=args.max_batch,
            precision=args.precision,
            force=args.force,
        )
    except RuntimeUnavailable as e:
        print(f"error [tensorrt_unavailable]: {e}", file=sys.stderr)
        return 2
    print(json.dumps({k: str(v) for k, v in engines.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
