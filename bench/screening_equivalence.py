"""Does a speed option change the screening answer? The judge of every speed candidate.

Screens each recording (the demo, and the rendered recordings of ``--set``) by the reference
path (``mam screen``'s default) and by a candidate, alternating which goes first so that load on a
shared machine hits both alike, and prints what a clinician would read differently:
classification agreement, |delta P(risk)|, |delta FMs frequency| (median and max), per-clip
P(FMs) agreement (the clip's side of 0.5, and |delta|), in-domain agreement, and the speed ratio
(reference wall seconds / candidate wall seconds, the pose and screening of every recording, in
this run). The bounds a candidate must meet before it may become the default: >= 97% same
classification, median |delta FMs frequency| <= 0.02, max <= 0.1, on a set large enough to mean it.

The external set: recordings the shipped weights never saw, both groups, several sizes,
real-motion backgrounds:

    mam synth --out runs/equiv --infants 24 --widened --backgrounds real --pool external \\
        --render 480x360,854x480,1280x720 --min-s 30 --max-s 60
    python bench/screening_equivalence.py --set runs/equiv --candidate stride2

Candidates (``--candidate NAME``; the default path reads none of their settings):
  reference   the reference path again: agreement 100%, speed ratio about 1 (a self-check)
  stride2     pose every 2nd frame, joints interpolated linearly back to 25 fps
              (``MAM_POSE_STRIDE=2``; fidgety movements are 1-4 Hz)
  stride3     every 3rd frame (``MAM_POSE_STRIDE=3``)
  decode640   decode at most 640 px on the long side instead of 1280 (``max_side``)
  int8static, int8mixed, int8dynamic, ov-bf16, ov-fp16, ov-fp32
              the landmark network quantised to int8 by ONNX Runtime (static: QDQ, calibrated
              on training-pool crops; mixed: its output heads left fp32; dynamic), or run by
              OpenVINO at bf16 / f16 / f32
              (``bench/landmark_variants.py``; ``pip install openvino`` for the ``ov-`` ones)
  reencode    not a speed option but the judge's noise floor: the reference path on the recording
              re-encoded once as a hospital export would be (libx264 CRF 23, preset medium,
              yuv420p, same size and frame rate)
  shift1      noise floor too: the reference path on the recording without its first frame
              (every clip window 40 ms later; the other frames losslessly re-encoded)
  The nuisance candidates write their copy to a temporary folder that is deleted after each
  recording; writing it is timed apart (``transform_s``), not in the speed ratio, which for them
  only compares decoding two encodings of one recording.

Figures, never assertions; ``--json`` writes them with one row per recording (no identifiers).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import fractions
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import av
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import landmark_variants  # noqa: E402

from mam.pose.stride import ENV_POSE_STRIDE  # noqa: E402
from mam.screening import Screener, ScreeningOptions  # noqa: E402
from mam.video import probe  # noqa: E402

DEMO = Path(__file__).resolve().parents[1] / "demo" / "infant_demo.mp4"
BOUNDS = {"classification_agreement": 0.97, "fms_frequency_median": 0.02, "fms_frequency_max": 0.1}


@dataclass(frozen=True)
class Candidate:
    help: str
    env: dict[str, str] = field(default_factory=dict)
    options: dict = field(default_factory=dict)
    landmark: str | None = None  # a bench/landmark_variants.py variant of the landmark network
    # A nuisance, not a speed option: the candidate screens a copy that rewrite(src, dst, **this)
    # wrote, with the reference path's settings (the judge's noise floor).
    rewrite: dict | None = None


CANDIDATES = {
    "reference": Candidate("the reference path again (self-check)"),
    "stride2": Candidate("pose every 2nd frame, interpolated", {ENV_POSE_STRIDE: "2"}),
    "stride3": Candidate("pose every 3rd frame, interpolated", {ENV_POSE_STRIDE: "3"}),
    "decode640": Candidate("decode at most 640 px", options={"max_side": 640}),
    **{v: Candidate(f"landmark network {v}", landmark=v) for v in landmark_variants.VARIANTS},
    "reencode": Candidate("the reference path on a libx264 CRF 23 re-encode (noise floor)",
                          rewrite={"options": {"crf": "23", "preset": "medium"}}),
    "shift1": Candidate("the reference path without the first frame (noise floor)",
                        rewrite={"options": {"qp": "0", "preset": "ultrafast"}, "skip": 1}),
}  # fmt: skip


def rewrite(src: Path, dst: Path, options: dict[str, str], skip: int = 0) -> None:
    """Write ``src``'s video stream to ``dst`` with libx264 ``options`` (``qp 0``: lossless, the
    decoded yuv420p pictures exactly), same size and frame rate, its first ``skip`` frames
    dropped; frames are renumbered from 0 at the source's average rate."""
    with av.open(str(src)) as inp, av.open(str(dst), "w") as out:
        stream = inp.streams.video[0]
        rate = stream.average_rate or fractions.Fraction(25)
        enc = out.add_stream("libx264", rate=rate, options=options)
        enc.width, enc.height = stream.codec_context.width, stream.codec_context.height
        enc.pix_fmt = "yuv420p"
        i = 0
        for k, frame in enumerate(inp.decode(stream)):
            if k < skip:
                continue
            if frame.format.name != "yuv420p":
                frame = frame.reformat(format="yuv420p")
            frame.pts, frame.time_base = i, 1 / fractions.Fraction(rate)
            out.mux(enc.encode(frame))
            i += 1
        out.mux(enc.encode(None))


def landmark_patch(variant: str | None):
    """While active, the ``onnx`` backends made run ``variant`` as their landmark network (the
    detector and everything else as the default); a no-op for ``None``."""
    if variant is None:
        return contextlib.nullcontext()
    from mam.pose.blazepose import convert, model

    original = model.ort_pose_network

    def network(path, device, threads=None, max_batch=None):
        if Path(path).name.startswith(convert.LANDMARK) and device == "cpu":
            net = landmark_variants.landmark_network(variant, threads, max_batch)
            print(f"  (a pose backend runs {variant}: {net.detail})", file=sys.stderr)
            return net
        return original(path, device, threads, max_batch)

    return mock.patch.object(model, "ort_pose_network", network)


def recordings(folder: Path | None, demo: bool, limit: int | None) -> list[tuple[Path, str]]:
    """``(path, group)``: the demo, then the set's videos (group from its ``infants.csv`` where
    it has one)."""
    out = [(DEMO, "demo")] if demo else []
    if folder is not None:
        groups = {}
        if (folder / "infants.csv").is_file():
            with open(folder / "infants.csv", newline="") as f:
                groups = {r["id"]: r.get("group", "") for r in csv.DictReader(f)}
        videos = sorted((folder / "videos").glob("*.mp4")) or sorted(folder.glob("*.mp4"))
        out += [(v, groups.get(v.stem.rsplit("_", 1)[0], groups.get(v.stem, "?"))) for v in
                videos[:limit]]  # fmt: skip
    return out


def summary(r) -> dict:
    return {
        "classification": r.classification.label,
        "risk_probability": r.risk_probability,
        "fms_frequency": r.fms_frequency,
        "in_domain": r.domain.in_domain,
        "clips": [c.fms_probability for c in r.clips],
    }


def compare(rows: list[dict]) -> dict:
    """The agreement figures over ``rows`` (each with ``reference`` and ``candidate``)."""
    ref = [r["reference"] for r in rows]
    cand = [r["candidate"] for r in rows]
    d_risk = np.abs([a["risk_probability"] - b["risk_probability"] for a, b in zip(ref, cand)])
    d_fms = np.abs([a["fms_frequency"] - b["fms_frequency"] for a, b in zip(ref, cand)])
    same_side, d_clip = [], []
    for a, b in zip(ref, cand):
        n = min(len(a["clips"]), len(b["clips"]))
        pa, pb = np.asarray(a["clips"][:n]), np.asarray(b["clips"][:n])
        same_side += list((pa > 0.5) == (pb > 0.5))
        d_clip += list(np.abs(pa - pb))
    out = {
        "recordings": len(rows),
        "classification_agreement": float(np.mean([a["classification"] == b["classification"]
                                                   for a, b in zip(ref, cand)])),
        "risk_probability_abs_delta": {"median": float(np.median(d_risk)),
                                       "max": float(np.max(d_risk))},
        "fms_frequency_abs_delta": {"median": float(np.median(d_fms)),
                                    "max": float(np.max(d_fms))},
        "clip_fms_agreement": float(np.mean(same_side)) if same_side else None,
        "clip_fms_abs_delta_median": float(np.median(d_clip)) if d_clip else None,
        "clips": len(same_side),
        "in_domain_agreement": float(np.mean([a["in_domain"] == b["in_domain"]
                                              for a, b in zip(ref, cand)])),
        "speed_ratio": sum(r["reference_s"] for r in rows) / sum(r["candidate_s"] for r in rows),
    }  # fmt: skip
    out["within_bounds"] = bool(
        out["classification_agreement"] >= BOUNDS["classification_agreement"]
        and out["fms_frequency_abs_delta"]["median"] <= BOUNDS["fms_frequency_median"]
        and out["fms_frequency_abs_delta"]["max"] <= BOUNDS["fms_frequency_max"]
    )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(f"  {k:<10} {c.help}" for k, c in CANDIDATES.items()),
    )  # fmt: skip
    ap.add_argument("--candidate", choices=sorted(CANDIDATES), default="stride2")
    ap.add_argument("--set", type=Path, help="a `mam synth --render` output folder")
    ap.add_argument("--limit", type=int, help="at most this many recordings of the set")
    ap.add_argument("--no-demo", action="store_true", help="leave the demo out")
    ap.add_argument("--json", type=Path, help="write the figures here")
    args = ap.parse_args(argv)
    cand = CANDIDATES[args.candidate]
    recs = recordings(args.set, not args.no_demo, args.limit)
    if not recs:
        ap.error("no recordings: give --set or leave the demo in")
    # The default path's settings must not leak into the reference: none of the candidates' set.
    for k in cand.env:
        os.environ.pop(k, None)
    screeners = {
        "reference": Screener(options=ScreeningOptions()),
        "candidate": Screener(options=ScreeningOptions(**cand.options)),
    }
    envs = {"reference": {}, "candidate": cand.env}
    if cand.landmark:
        landmark_variants.build(cand.landmark)  # built (and calibrated) before any timing
    patches = {"reference": None, "candidate": cand.landmark}
    print(f"candidate {args.candidate}: {cand.help}; {len(recs)} recordings, "
          f"{os.cpu_count()} CPUs, alternating order")  # fmt: skip
    rows = []
    for i, (path, group) in enumerate(recs):
        info = probe(path)
        row: dict = {"group": group, "size": f"{info.width}x{info.height}",
                     "seconds": round(info.duration_s, 1)}  # fmt: skip
        order = ("reference", "candidate") if i % 2 == 0 else ("candidate", "reference")
        with tempfile.TemporaryDirectory(prefix="mam-equiv-") as tmp:  # deleted, whatever happens
            inputs = {"reference": path, "candidate": path}
            if cand.rewrite is not None:
                inputs["candidate"] = Path(tmp) / "rewritten.mp4"
                t = time.perf_counter()
                rewrite(path, inputs["candidate"], **cand.rewrite)
                row["transform_s"] = time.perf_counter() - t  # not in the speed ratio
            for who in order:
                with mock.patch.dict(os.environ, envs[who]), landmark_patch(patches[who]):
                    t = time.perf_counter()
                    r = screeners[who].screen_video(inputs[who])
                    row[f"{who}_s"] = time.perf_counter() - t
                row[who] = summary(r)
        a, b = row["reference"], row["candidate"]
        print(f"{i:3d} {group:7s} {row['size']:>9s} {row['seconds']:5.0f} s  "
              f"{a['classification']:>13s}/{b['classification']:<13s} "
              f"FMs {a['fms_frequency']:.3f}/{b['fms_frequency']:.3f} "
              f"P(risk) {a['risk_probability']:.3f}/{b['risk_probability']:.3f}  "
              f"{row['reference_s']:5.1f}/{row['candidate_s']:5.1f} s", flush=True)  # fmt: skip
        rows.append(row)
    figures = compare(rows)
    figures["candidate"] = args.candidate
    figures["clips_per_recording"] = [len(r["reference"]["clips"]) for r in rows]
    if cand.rewrite is not None:
        figures["transform_s"] = sum(r["transform_s"] for r in rows)
    demo_rows = [r for r in rows if r["group"] == "demo"]
    if demo_rows:
        figures["demo"] = {
            k: (demo_rows[0]["reference"][k], demo_rows[0]["candidate"][k])
            for k in ("classification", "fms_frequency", "risk_probability")
        }
    set_rows = [r for r in rows if r["group"] != "demo"]
    if set_rows:
        figures["external_set"] = compare(set_rows)
    print(json.dumps(figures, indent=1))
    verdict = "within" if figures["within_bounds"] else "OUTSIDE"
    print(f"{args.candidate}: {verdict} the bounds on {len(rows)} recordings "
          f"(classification {figures['classification_agreement']:.1%}, median |dFMs| "
          f"{figures['fms_frequency_abs_delta']['median']:.3f}, max "
          f"{figures['fms_frequency_abs_delta']['max']:.3f}); speed "
          f"{figures['speed_ratio']:.2f}x; a small set proves nothing either way")  # fmt: skip
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "summary": figures,
                    "recordings": rows,
                    "median_s": statistics.median(r["reference_s"] for r in rows),
                },
                indent=1,
            )
            + "\n"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
