"""How the shipped demo weights are made and measured, end to end, from seeds.

    python recipes/demo_weights.py generate   # simulate + render + pose (hours on 2 cores)
    python recipes/demo_weights.py compare    # one model per pose representation, external set
    python recipes/demo_weights.py ship --representation image2d   # models/mam_demo + card
    python recipes/demo_weights.py recalibrate   # each kind's own calibration + card
    python recipes/demo_weights.py domain        # the domain check against shifted recordings
    python recipes/demo_weights.py card          # the card again, with the domain table

Data (``runs/demo_weights/``, never committed): simulated infants on real-motion backgrounds
(``mam.synth.backgrounds``, training pool) and on the simulator's own, as pose files and as
recordings rendered at 640x360 or 960x540 whose pose the default backend estimates; the external
set is another seed, the widened simulator ranges, real-motion backgrounds of four infants the
training never saw, rendered at 960x540 or 1280x720. Every figure is printed and written to
``runs/demo_weights/*.json``; the model card is generated from them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mam.screening import default_pose_backend  # noqa: E402

ROOT = Path("runs/demo_weights")
TRAIN = "640x360,960x540"
# name: (infants, seed, min_s, max_s, widened, backgrounds, pool, render sizes or None)
DATASETS: dict[str, tuple] = {
    "rendered_real": (80, 301, 45, 75, False, "real", "train", TRAIN),
    "poses_sim": (120, 311, 60, 120, False, "simulated", "train", None),
    "poses_sim_widened": (80, 312, 60, 120, True, "simulated", "train", None),
    "poses_real": (80, 313, 60, 120, False, "real", "train", None),
    "poses_real_widened": (80, 314, 60, 120, True, "real", "train", None),
}


def _pose_file_kinds(prefix: str, n: int, seed: int) -> dict[str, tuple]:
    """Pose-file sets of the four kinds the training's pose files have (simulated or real-motion
    backgrounds, default or widened ranges), ``n`` infants each, seeds ``seed`` to ``seed + 3``."""
    kinds = [("sim", "simulated", False), ("sim", "simulated", True), ("real", "real", False),
             ("real", "real", True)]  # fmt: skip
    return {
        f"{prefix}_{name}{'_widened' if w else ''}": (n, seed + i, 60, 120, w, bg, "train", None)
        for i, (name, bg, w) in enumerate(kinds)
    }


# In-domain test set: pose files of new seeds, the four kinds of the pose-file training sets;
# 200 infants, since with 80 the calibration error's 95% interval spanned 0.05-0.15.
TEST = _pose_file_kinds("test", 50, 341)
# Held out of training like the calibration share of ``fit``, and posed from video: the video
# kind's own calibration (``mam.training.calibration``, per source kind), at the training sizes,
# default and widened ranges, training-pool real-motion backgrounds (never the external pool).
CALIBRATION = {
    "calibration_real": (32, 305, 45, 75, False, "real", "train", TRAIN),
    "calibration_real_widened": (32, 306, 45, 75, True, "real", "train", TRAIN),
}
# Likewise for the pose-file kind: new seeds of the four pose-file training sets' kinds.
CALIBRATION_POSES = _pose_file_kinds("calibration_poses", 40, 315)
# 60 infants (rendering and posing each takes ~70 s of one core here): the calibration error on
# 60 is noisy (with perfect calibration it exceeds 0.05 in about a third of draws), so every
# figure comes with its bootstrap interval. A larger ``n`` keeps these 60 and adds to them.
EXTERNAL = {"external": (60, 901, 60, 60, True, "real", "external", "960x540,1280x720")}
REPRESENTATIONS = ("world3d", "image2d", "lifted")
EPOCHS = 12
KEYS = ("auc", "pr_auc", "median_kappa", "ece", "sensitivity", "specificity", "abstention_rate",
        "infants")  # fmt: skip


def _write(sets: dict) -> None:
    from mam.synth import SimParams, write_dataset
    from mam.synth.dataset import RenderSpec

    for name, (n, seed, lo, hi, widened, bg, pool, sizes) in sets.items():
        t = time.perf_counter()
        params = SimParams().widened() if widened else SimParams()
        render = RenderSpec.parse(sizes) if sizes else None
        write_dataset(ROOT / name, n, seed, (lo, hi), params, background=bg, pool=pool,
                      render=render, workers=2)  # fmt: skip
        print(f"{name}: {n} infants in {time.perf_counter() - t:.0f} s", flush=True)


def _records(names, backend: str):
    from mam.training.dataset import load_datasets

    return load_datasets([ROOT / n for n in names], pose_backend=backend)


def _config(representation: str, seed: int = 0):
    from mam.training.train import TrainConfig

    return TrainConfig.preset("compact", epochs=EPOCHS, representation=representation, seed=seed)


def _fit(records, representation: str, out: Path, version: str, summary: str):
    from mam.model.weights import save_weights
    from mam.training.fitting import fit

    t = time.perf_counter()
    model, meta = fit(records, _config(representation), name=out.name, version=version,
                      provenance={"summary": summary, "data": sorted(DATASETS),
                                  "recipe": "recipes/demo_weights.py", "infants": len(records)},
                      categories=[r.fms_category for r in records],
                      log_csv=out.with_suffix(".log.csv"))  # fmt: skip
    path = save_weights(model, meta, out)
    print(f"trained {out.name} ({representation}) in {time.perf_counter() - t:.0f} s", flush=True)
    return path


def _row(res: dict) -> dict:
    inside = res["in_domain"]
    return {
        **{k: res.get(k) for k in KEYS},
        **{f"in_domain_{k}": inside.get(k) for k in ("auc", "median_kappa", "ece")},
        "auc_ci": res.get("auc_ci"),
    }


def cmd_generate(args) -> int:
    _write(DATASETS | CALIBRATION | CALIBRATION_POSES | TEST | EXTERNAL)
    for backends in ([args.pose_backend], ["mediapipe"] if args.also_mediapipe else []):
        for b in backends:
            t = time.perf_counter()
            videos = [n for n, d in (DATASETS | CALIBRATION | EXTERNAL).items() if d[7]]
            _records(videos, b)
            print(f"pose ({b}) of the rendered sets in {time.perf_counter() - t:.0f} s")
    return 0


def cmd_compare(args) -> int:
    from mam.training.evaluate import evaluate

    train = _records(DATASETS, args.pose_backend)
    external = _records(EXTERNAL, args.pose_backend)
    out = {}
    for rep in args.representations:
        w = ROOT / "weights" / f"compare_{rep}.json"
        if not (args.reuse_trained and w.is_file()):
            w = _fit(train, rep, w.with_suffix(""), "compare", f"compare {rep}")
        res = evaluate(w, external)
        out[rep] = _row(res)
        print(rep, json.dumps(out[rep]), flush=True)
        (ROOT / "compare.json").write_text(json.dumps(out, indent=2) + "\n")  # after each
    return 0


def cmd_ship(args) -> int:

    summary = (
        "demo weights: simulated infants (mam synth) on real-motion and simulated "
        "backgrounds, through the pose model they ship with; not for clinical use"
    )
    compared = ROOT / "weights" / f"compare_{args.representation}.json"
    if args.reuse_compare and compared.is_file():
        # The comparison trained this very recipe (same data, seed and settings): ship that
        # model rather than spend another training run on the same result.
        from mam.model.weights import load_weights, save_weights

        model, meta = load_weights(compared)
        meta.name, meta.version = "mam_demo", args.version
        meta.provenance["summary"] = summary
        w = save_weights(model, meta, Path("models/mam_demo"))
        log = compared.with_suffix(".log.csv")
        Path("models/mam_demo.log.csv").write_text(log.read_text())
    else:
        train = _records(DATASETS, args.pose_backend)
        w = _fit(train, args.representation, Path("models/mam_demo"), args.version, summary)
    return _publish(w, args)


def cmd_recalibrate(args) -> int:
    """The shipped network and domain record, each source kind calibrated on its own: the
    CALIBRATION recordings (posed from video) and CALIBRATION_POSES (pose files), never trained
    on (``mam.training.fitting.recalibrate``)."""
    from mam.model.weights import load_weights, save_weights
    from mam.training.fitting import recalibrate

    model, meta = load_weights(Path(args.weights))
    for kind, sets in (("video", CALIBRATION), ("pose_file", CALIBRATION_POSES)):
        meta = recalibrate(model, meta, _records(sets, args.pose_backend), kind)
        meta.provenance["calibration"][f"{kind}_data"] = sorted(sets)
    meta.version = args.version
    w = save_weights(model, meta, Path("models/mam_demo"))
    return _publish(w, args)


def _publish(w: Path, args) -> int:
    """Export, evaluate (in-domain test, external set) and write the model card."""
    from export.onnx import export_onnx
    from mam.training.evaluate import evaluate, write_report

    export_onnx(w)
    evaluations = {
        "in-domain test (pose files)": evaluate(w, _records(TEST, args.pose_backend)),
        f"external, rendered, pose `{args.pose_backend}`": evaluate(
            w, _records(EXTERNAL, args.pose_backend)
        ),
    }
    if args.also_mediapipe:
        evaluations["external, rendered, pose `mediapipe`"] = evaluate(
            w, _records(EXTERNAL, "mediapipe")
        )
    for title, res in evaluations.items():
        print(title, json.dumps(_row(res)), flush=True)
        write_report(res, ROOT / "report", title.split(",")[0].split(" ")[0])
    (ROOT / "evaluations.json").write_text(json.dumps(evaluations, indent=1) + "\n")
    (ROOT / "ship.json").write_text(
        json.dumps({k: _row(v) for k, v in evaluations.items()}, indent=2) + "\n"
    )
    return _card(w)


def cmd_card(args) -> int:
    """The model card again from the last evaluations and comparison and domain runs (after
    ``domain``, which measures the weights that ``ship`` or ``recalibrate`` wrote)."""
    return _card(Path(args.weights))


def _card(w: Path) -> int:
    from mam.model.weights import load_meta
    from mam.training.model_card import render

    evaluations = json.loads((ROOT / "evaluations.json").read_text())
    compare = ROOT / "compare.json"
    domain = ROOT / "domain.json"
    meta, _, _ = load_meta(w)
    card = render(
        meta,
        evaluations,
        representations=json.loads(compare.read_text()) if compare.is_file() else None,
        domain=json.loads(domain.read_text()) if domain.is_file() else None,
    )
    Path("models/MODEL_CARD.md").write_text(card)
    return 0


def cmd_domain(args) -> int:
    """Share flagged out of domain per kind of recording, by each component and by both."""
    import numpy as np

    from mam.domain import kind_of
    from mam.gma import FMS_CATEGORIES
    from mam.pose.precomputed import validate_pose_array
    from mam.screening import Screener
    from mam.synth import shifted
    from mam.synth.motion import SimParams, simulate_infant

    sc = Screener(args.weights)
    rng = np.random.default_rng(args.seed)
    n, secs = args.n, 60.0
    cats = [FMS_CATEGORIES[i % 4] for i in range(n)]
    sets = {
        "in domain: mam synth pose files": [
            simulate_infant(rng, "s", c, secs, SimParams()).joints for c in cats
        ],
        "in domain: mam synth --widened": [
            simulate_infant(rng, "w", c, secs, SimParams().widened()).joints for c in cats
        ],
        "real motion alone, external infants": [
            shifted.real_only(rng, secs, "external") for _ in cats
        ],
        "real motion alone, training infants": [
            shifted.real_only(rng, secs, "train") for _ in cats
        ],
        "another camera view": [shifted.other_view(rng, c, secs) for c in cats],
        "heavy jitter": [shifted.jittered(rng, c, secs) for c in cats],
        "adult-sized skeleton": [shifted.adult_sized(rng, c, secs) for c in cats],
    }
    rows = {}
    for name, recs in sets.items():
        motion = emb = both = 0
        for j in recs:
            r = sc.screen_pose(validate_pose_array(j))
            d = r.domain
            motion += (d.motion_score or 0) > 1
            emb += (d.embedding_score or 0) > 1
            both += not d.in_domain
        rows[name] = {"motion": motion / n, "embedding": emb / n, "both": both / n}
        print(f"{name:40s} {json.dumps(rows[name])}", flush=True)
    videos = {
        "in domain: external rendered set": _records(EXTERNAL, args.pose_backend),
    }
    for name, recs in videos.items():
        flags = [sc.screen_pose(r.pose()).domain for r in recs]
        rows[name] = {
            "motion": float(np.mean([(d.motion_score or 0) > 1 for d in flags])),
            "embedding": float(np.mean([(d.embedding_score or 0) > 1 for d in flags])),
            "both": float(np.mean([not d.in_domain for d in flags])),
            "kind": kind_of(recs[0].source),
        }
        print(f"{name:40s} {json.dumps(rows[name])}", flush=True)
    (ROOT / "domain.json").write_text(json.dumps(rows, indent=2) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate")
    c = sub.add_parser("compare")
    c.add_argument("--representations", nargs="+", default=list(REPRESENTATIONS))
    c.add_argument(
        "--reuse-trained", action="store_true",
        help="evaluate the models a previous compare trained (same recipe) instead of training",
    )  # fmt: skip
    s = sub.add_parser("ship")
    s.add_argument("--representation", default="image2d")
    s.add_argument("--version", default="0.3.0")
    s.add_argument(
        "--reuse-compare", action="store_true",
        help="ship the compare run's model of this representation (same recipe)",
    )  # fmt: skip
    r = sub.add_parser("recalibrate")
    r.add_argument("--weights", default="models/mam_demo.json")
    r.add_argument("--version", default="0.3.1")
    k = sub.add_parser("card")
    k.add_argument("--weights", default="models/mam_demo.json")
    d = sub.add_parser("domain")
    d.add_argument("--weights", default="models/mam_demo.json")
    d.add_argument("--n", type=int, default=20)
    d.add_argument("--seed", type=int, default=2024)
    for p in (g, c, s, r, d):
        p.add_argument("--pose-backend", default=default_pose_backend())
    for p in (g, s, r):
        p.add_argument("--also-mediapipe", action="store_true",
                       help="also estimate the rendered sets' pose with mediapipe")  # fmt: skip
    args = ap.parse_args(argv)
    return {
        "generate": cmd_generate,
        "compare": cmd_compare,
        "ship": cmd_ship,
        "recalibrate": cmd_recalibrate,
        "domain": cmd_domain,
        "card": cmd_card,
    }[args.cmd](args)


if __name__ == "__main__":
    raise SystemExit(main())
