"""``mam synth``: simulated infants with known truth, as pose files or rendered recordings;
``mam synth demo``: the demo recording."""

from __future__ import annotations

import argparse
from pathlib import Path

from mam.cli import options as O


def register(sub) -> None:
    s = sub.add_parser("synth", help="write a simulated training set (ground truth known)")
    O.add_verbose(s)
    s.add_argument("--out", type=Path, required=True, help="output folder")
    s.add_argument("--infants", type=int, required=True, help="number of infants")
    s.add_argument("--seed", type=int, default=0, help="random seed")
    s.add_argument("--min-s", type=float, default=60.0, help="shortest recording, seconds")
    s.add_argument("--max-s", type=float, default=120.0, help="longest recording, seconds")
    s.add_argument("--widened", action="store_true", help="wider simulator ranges (external set)")
    s.add_argument("--backgrounds", choices=["simulated", "real"], default="simulated",
                   help="movement background: the simulator's rest pose, or real infant motion "
                        "(shipped, mam/synth/data) with the simulated movement on top")  # fmt: skip
    s.add_argument(
        "--pool",
        choices=["train", "external"],
        default="train",
        help="real-motion pool (external: infants the shipped weights never saw)",
    )
    s.add_argument(
        "--render",
        metavar="WxH[,WxH...]",
        help="write recordings rendered at these sizes instead of pose files",
    )
    s.add_argument("--crf", type=int, default=28, help="H.264 quality of --render (lower: better)")
    s.add_argument("--workers", type=int, default=1, help="rendering processes")
    s.set_defaults(func=run)

    # Defaults None: render_demo's (mam.synth.demo), the recording README and tests screen.
    d = s.add_verb("demo", description="render the demo recording from real infant motion")
    O.add_verbose(d)
    d.add_argument("--out", type=Path, default=Path("demo/infant_demo.mp4"),
                   help="recording to write (default demo/infant_demo.mp4)")  # fmt: skip
    d.add_argument("--data", type=Path, help="mam_demo_poses.npz (default: the shipped motion)")
    d.add_argument("--group", help="the motion's bag (default: the one continuous bag)")
    d.add_argument("--seconds", type=float, help="length (default 60)")
    d.add_argument("--seed", type=int, help="camera placement and appearance (default 1)")
    d.add_argument("--crf", type=int, help="H.264 quality, lower is better (default 28)")
    d.add_argument("--width", type=int, help="default 1280")
    d.add_argument("--height", type=int, help="default 720")
    d.add_argument("--rotation", type=float, default=0.0, help="0, 90, 180 or 270")
    d.set_defaults(func=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    from mam.synth.demo import DEMO_SIZE, render_demo

    res = render_demo(args.out, data=args.data, group=args.group, seconds=args.seconds,
                      seed=args.seed, crf=args.crf, width=args.width, height=args.height,
                      rotation=args.rotation)  # fmt: skip
    w, h = args.width or DEMO_SIZE[0], args.height or DEMO_SIZE[1]
    mb = args.out.stat().st_size / 1e6
    print(f"{args.out}: {res.frames} frames {w}x{h}, {mb:.2f} MB, rendered at "
          f"{res.fps:.1f} fps")  # fmt: skip
    return 0


def run(args: argparse.Namespace) -> int:
    from mam.synth import SimParams, write_dataset
    from mam.synth.dataset import RenderSpec

    if args.backgrounds != "real":
        O.reject(args, ["pool"], "only with --backgrounds real")
    if not args.render:
        O.reject(args, ["crf", "workers"], "only with --render")
    try:
        render = RenderSpec.parse(args.render, args.crf) if args.render else None
    except ValueError as e:
        raise O.UsageError(str(e)) from None
    params = SimParams().widened() if args.widened else SimParams()
    out = write_dataset(args.out, args.infants, args.seed, (args.min_s, args.max_s), params,
                        background=args.backgrounds, pool=args.pool, render=render,
                        workers=args.workers)  # fmt: skip
    what = "recordings" if render else "pose files"
    print(f"wrote {args.infants} simulated infants ({what}) to {out} (simulation, not physiology)")
    return 0
