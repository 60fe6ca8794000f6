"""``mam``: screen a recording, simulate data, train.

Examples:
    mam screen demo/infant_demo.mp4
    mam screen --pose poses.npy --sex female --gestational-age-weeks 34 \\
        --birth-weight-g 2100 --corrected-age-weeks 12 --format json
    mam synth --out data/sim --infants 40 --seed 1
    mam train --data data/sim --out models/my_model --epochs 8
    mam evaluate --data data/sim_test --format json
    mam batch archive/ --out results/ --workers 4
    mam batch manifest.csv --out shard-0 --shard 0/4 && mam batch merge shard-* --out all
    mam batch archive/ --out results/ --service http://mam:3000 --workers 8
    mam serve --port 3000 --grpc-port 8001

Errors print one line, ``error [code]: message``, and exit with status 2 (bad input) or 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from mam import DISCLAIMER, __version__
from mam.errors import InputError, MamError
from mam.pose.representation import REPRESENTATIONS


def _screen(args: argparse.Namespace) -> int:
    from mam.schemas import InfantData
    from mam.screening import Screener, ScreeningOptions

    infant = InfantData.parse(
        sex=args.sex,
        gestational_age_weeks=args.gestational_age_weeks,
        birth_weight_g=args.birth_weight_g,
        corrected_age_weeks=args.corrected_age_weeks,
    )
    if (args.video is None) == (args.pose is None):
        raise SystemExit("mam screen: give exactly one of VIDEO or --pose POSE.npy")
    screener = Screener(
        args.weights,
        ScreeningOptions(pose_backend=args.pose_backend, abstain=not args.no_abstain),
    )
    if args.pose is not None:
        result = screener.screen_pose_file(args.pose, infant)
    else:
        progress = None
        bar = None
        if sys.stderr.isatty() and not args.quiet:
            from tqdm import tqdm

            bar = tqdm(desc="pose", unit="frame")

            def progress(done: int, total: int) -> None:
                bar.total = total
                bar.n = done
                bar.refresh()

        try:
            result = screener.screen_video(args.video, infant, progress)
        finally:
            if bar is not None:
                bar.close()
    if args.format == "json":
        print(result.model_dump_json(indent=2))
    else:
        print(_text(result))
    return 0


def _p(x: float) -> str:
    """Three decimals, without printing a tiny probability as if it were zero."""
    return "<0.001" if x < 0.0005 else ">0.999" if x > 0.9995 else f"{x:.3f}"


def _text(r) -> str:
    c, d = r.classification, r.domain
    unusable = "" if r.probabilities_usable else "   [not to be used: see the warning]"
    if c.label == "indeterminate":
        head = "Classification:    INDETERMINATE (the model cannot speak for this recording)"
    else:
        head = (f"Classification:    {c.label.upper()} (P(risk) = {_p(r.risk_probability)}, "
                f"threshold {c.threshold:.2f})")  # fmt: skip
    score = "not scored" if d.score is None else f"score {d.score:.2f}, threshold {d.threshold:.2f}"
    lines = [
        head,
        f"P(risk):           {_p(r.risk_probability)} (model alone: {c.model_label}){unusable}",
        f"FMs frequency:     {r.fms_frequency:.2f} of {len(r.clips)} clips ({r.fms_category})"
        + unusable,
        f"Training domain:   {'in domain' if d.in_domain else 'OUT OF DOMAIN'} ({score})",
        f"Tracking quality:  {r.quality.tracked_fraction:.0%} of {r.quality.duration_s:.0f} s "
        f"tracked, longest gap {r.quality.longest_gap_s:.1f} s",
        "Top FMs clips:     "
        + ", ".join(
            f"{c.start_s:.1f}-{c.end_s:.1f} s (P={c.fms_probability:.2f})" for c in r.top_fms_clips
        ),
        f"Model:             {r.model.name} {r.model.version} ({r.model.provenance}); "
        f"{r.model.runtime}/{r.model.device}; pose {r.model.pose_backend}",
    ]
    lines += [f"Warning:           {w}" for w in r.warnings]
    lines.append(DISCLAIMER)
    return "\n".join(lines)


def _synth(args: argparse.Namespace) -> int:
    from mam.synth import SimParams, write_dataset
    from mam.synth.dataset import RenderSpec

    params = SimParams().widened() if args.widened else SimParams()
    render = RenderSpec.parse(args.render, args.crf) if args.render else None
    out = write_dataset(args.out, args.infants, args.seed, (args.min_s, args.max_s), params,
                        background=args.backgrounds, pool=args.pool, render=render,
                        workers=args.workers or 1)  # fmt: skip
    what = "recordings" if render else "pose files"
    print(f"wrote {args.infants} simulated infants ({what}) to {out} (simulation, not physiology)")
    return 0


def _train_config(args: argparse.Namespace):
    from mam.model.config import MAMConfig
    from mam.train import TrainConfig, compact_model_config

    model_cfg = {
        "compact": compact_model_config,
        "paper": MAMConfig.paper,
        "reference": MAMConfig.reference,
    }[args.config]()
    return TrainConfig(
        model=model_cfg,
        epochs=args.epochs,
        pretrain_epochs=args.pretrain_epochs,
        optimizer=args.optimizer,
        lr=args.lr,
        max_lr=args.max_lr,
        ref_clips_per_step=args.ref_clips,
        instances_per_bag=args.instances_per_bag,
        use_reference=not args.no_reference,
        use_closeness=not args.no_closeness and not args.no_reference,
        representation=args.representation,
        seed=args.seed,
    )


def _train(args: argparse.Namespace) -> int:
    from mam.fitting import fit
    from mam.model.weights import save_weights

    cfg = _train_config(args)
    records = _load_all(args.data, args.pose_backend)
    out = Path(args.out)
    model, meta = fit(
        records,
        cfg,
        name=out.name,
        version=args.version,
        provenance={
            "summary": args.provenance,
            "data": [str(d) for d in args.data],
            "infants": len(records),
        },  # fmt: skip
        categories=[r.fms_category for r in records],
        calibration_fraction=args.calibration_fraction,
        log_csv=out.with_suffix(".log.csv"),
    )
    print(f"wrote {save_weights(model, meta, out)}")
    return 0


def _load_all(folders: list[Path], pose_backend: str) -> list:
    """Records of one or more dataset folders (ids must differ across them)."""
    from mam.dataset import DatasetError, load_dataset

    records = [r for d in folders for r in load_dataset(d, pose_backend=pose_backend)]
    ids = [r.infant_id for r in records]
    if len(set(ids)) != len(ids):
        raise DatasetError("the same infant id appears in more than one dataset folder")
    return records


def _evaluate(args: argparse.Namespace) -> int:
    from mam.evaluate import cross_validate, evaluate, markdown_table, write_report

    records = _load_all(args.data, args.pose_backend)
    use_info = not args.without_info
    if args.folds:
        res = cross_validate(
            records, _train_config(args), args.folds, use_info, args.calibration_fraction
        )
    else:
        res = evaluate(args.weights, records, use_info)
    if args.external:
        from mam.fitting import fit
        from mam.model.weights import save_weights

        weights = args.weights
        if args.folds:  # the external set is scored by a model trained on all the data
            import tempfile

            model, meta = fit(records, _train_config(args), name="all", version="eval",
                              provenance={}, categories=[r.fms_category for r in records],
                              calibration_fraction=args.calibration_fraction)  # fmt: skip
            weights = save_weights(model, meta, Path(tempfile.mkdtemp()) / "all")
        res["external"] = evaluate(weights, _load_all([args.external], args.pose_backend),
                                   use_info)  # fmt: skip
    if args.model_card:
        from mam.model.weights import load_meta
        from mam.model_card import render
        from mam.screening import default_weights

        meta, _, _ = load_meta(args.weights or default_weights())
        data = ", ".join(f"`{d}`" for d in args.data)
        cols = {("cross-validation" if args.folds else data): res}
        if "external" in res:
            cols[f"external `{args.external}`"] = res["external"]
        args.model_card.write_text(render(meta, cols))
    if args.out:
        write_report(res, args.out)
        if "external" in res:
            write_report(res["external"], args.out, "external")
    if args.format == "json":
        print(json.dumps(res, indent=2))
    elif args.format == "markdown":
        print(markdown_table(res), end="")
    else:
        for k, v in res.items():
            if not isinstance(v, (dict, list)):
                print(f"{k:<48}{round(v, 4) if isinstance(v, float) else v}")
    return 0


def _batch(args: argparse.Namespace) -> int:
    from mam.batch import check_output_dir, run_batch

    check_output_dir(args.out)  # fail fast, before any work or progress bar
    bar = None
    progress = None
    if sys.stderr.isatty() and not args.quiet:
        from tqdm import tqdm

        bar = tqdm(desc="batch", unit="rec")

        def progress(done: int, failed: int, total: int) -> None:
            bar.total = total
            bar.n = done
            bar.set_postfix(failed=failed, refresh=False)
            bar.refresh()

    elif not args.quiet:
        t0 = time.monotonic()
        last = [0.0]

        def progress(done: int, failed: int, total: int) -> None:
            now = time.monotonic()
            if done < total and now - last[0] < 10:
                return
            last[0] = now
            rate = done / max(now - t0, 1e-9)
            eta = (total - done) / rate if rate else 0.0
            print(f"batch: {done}/{total} screened, {failed} failed, {rate * 60:.1f}/min, "
                  f"ETA {eta:.0f} s", file=sys.stderr)  # fmt: skip

    service = None
    if args.service:
        from mam.service_client import ServiceClient

        service = ServiceClient(args.service)
    try:
        s = run_batch(args.input, args.out, args.workers, args.retry_failed, args.weights,
                      args.pose_backend, progress, shard=args.shard,
                      service=service, clips=args.clips)  # fmt: skip
    except ConnectionError as e:
        raise SystemExit(f"mam batch: {e}") from None
    finally:
        if bar is not None:
            bar.close()
        if service is not None:
            service.close()
    print(f"{s.recordings} recordings: {s.done} done, {s.failed} failed "
          f"({s.screened} screened now, {s.skipped} from the ledger, {s.duplicates} duplicates); "
          f"results in {args.out}")  # fmt: skip
    return 0


def _serve(args: argparse.Namespace) -> int:
    """Start the BentoML service (REST on --port, KServe v2 gRPC on --grpc-port)."""
    import os

    root = Path(__file__).resolve().parent.parent
    if not (root / "service" / "app.py").is_file():
        raise SystemExit("mam serve: the service/ folder is not beside mam/ (run from a checkout)")
    sys.path.insert(0, str(root))
    from service.process import REPO, private_task_store, serve_command
    from service.settings import hash_key

    if args.hash_key is not None:
        print(hash_key(args.hash_key))
        return 0

    env = dict(os.environ)
    env["MAM_GRPC_PORT"] = str(args.grpc_port)
    if args.weights:
        env["MAM_WEIGHTS"] = str(args.weights.resolve())
    env["MAM_POSE_BACKEND"] = args.pose_backend
    if args.no_auth:
        env["MAM_AUTH_DISABLED"] = "1"
        print("mam serve: API-key authentication is OFF (--no-auth); local use only",
              file=sys.stderr)  # fmt: skip
    env.setdefault("BENTOML_RESULT_STORE", private_task_store())
    import subprocess

    return subprocess.call(serve_command(args.port, args.host), env=env, cwd=REPO)


def _batch_merge(args: argparse.Namespace) -> int:
    from mam.batch import merge_shards

    s = merge_shards(args.shards, args.out)
    print(f"{len(args.shards)} shards merged: {s.recordings} recordings, {s.done} done, "
          f"{s.failed} failed; results in {args.out}")  # fmt: skip
    return 0


def _shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError("expected I/N, e.g. 0/4") from None
    if not (n >= 1 and 0 <= i < n):
        raise argparse.ArgumentTypeError("expected I/N with 0 <= I < N")
    return i, n


def _merge_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mam batch merge", description="join the outputs of sharded batch runs"
    )
    p.add_argument("shards", nargs="+", type=Path, help="shard output folders")
    p.add_argument("--out", type=Path, required=True, help="merged output folder")
    p.set_defaults(func=_batch_merge, verbose=False)
    return p


def _add_train_options(s: argparse.ArgumentParser) -> None:
    s.add_argument("--config", choices=["compact", "paper", "reference"], default="compact")
    s.add_argument("--epochs", type=int, default=8, help="epochs (paper: 300)")
    s.add_argument("--pretrain-epochs", type=int, default=0, help="clip encoder on ref clips")
    s.add_argument("--optimizer", choices=["sgd", "adamw"], default="adamw", help="paper: sgd")
    s.add_argument("--lr", type=float, default=5e-4, help="CyclicLR base rate")
    s.add_argument("--max-lr", type=float, default=3e-3, help="CyclicLR peak rate")
    s.add_argument("--ref-clips", type=int, default=16, help="reference clips per step")
    s.add_argument("--instances-per-bag", type=int, default=8, help="instances per bag per step")
    s.add_argument("--no-closeness", action="store_true", help="ablation: no closeness loss")
    s.add_argument("--no-reference", action="store_true", help="ablation: no Ref Branch")
    s.add_argument("--calibration-fraction", type=float, default=0.2,
                   help="share of infants held out to calibrate P(risk)")  # fmt: skip
    s.add_argument("--representation", choices=REPRESENTATIONS, default="image2d",
                   help="pose coordinates the model sees (mam.pose.representation)")  # fmt: skip
    s.add_argument("--seed", type=int, default=0, help="random seed")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mam", description=__doc__.split("\n")[0])
    p.add_argument("--version", action="version", version=f"mam {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("screen", help="screen one recording (or a precomputed pose file)")
    s.add_argument("video", nargs="?", type=Path, help="recording (mp4/mov/avi/mkv...)")
    s.add_argument("--pose", type=Path, help="precomputed 3D pose .npy [T, 17, 3] at 25 fps")
    s.add_argument("--sex", choices=["male", "female"], help="infant's sex")
    s.add_argument("--gestational-age-weeks", type=float, metavar="W", help="at birth")
    s.add_argument("--birth-weight-g", type=float, metavar="G", help="birth weight in grams")
    s.add_argument("--corrected-age-weeks", type=float, metavar="W", help="at recording")
    s.add_argument("--format", choices=["text", "json"], default="text", help="output format")
    s.add_argument("--weights", type=Path, help="weights NAME.json (default: MAM_WEIGHTS or demo)")
    _add_pose_backend(s)
    s.add_argument("--no-abstain", action="store_true",
                   help="research use: keep the model's label when the recording is out of its "
                        "training domain (still marked not to be used)")  # fmt: skip
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=_screen)

    s = sub.add_parser("synth", help="write a simulated training set (ground truth known)")
    s.add_argument("--out", type=Path, required=True, help="output folder")
    s.add_argument("--infants", type=int, required=True, help="number of infants")
    s.add_argument("--seed", type=int, default=0, help="random seed")
    s.add_argument("--min-s", type=float, default=60.0, help="shortest recording, seconds")
    s.add_argument("--max-s", type=float, default=120.0, help="longest recording, seconds")
    s.add_argument("--widened", action="store_true", help="wider simulator ranges (external set)")
    s.add_argument("--backgrounds", choices=["simulated", "real"], default="simulated",
                   help="movement background: the simulator's rest pose, or real infant motion "
                        "(../shared/data) with the simulated movement on top")  # fmt: skip
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
    s.set_defaults(func=_synth)

    s = sub.add_parser("train", help="train + calibrate MAM on a dataset folder")
    s.add_argument("--data", type=Path, nargs="+", required=True, help="dataset folder(s)")
    s.add_argument("--out", type=Path, required=True, help="output weights path (no suffix)")
    _add_pose_backend(s)
    _add_train_options(s)
    s.add_argument("--version", default="0.1.0", help="model version to record")
    s.add_argument("--provenance", default="trained by mam train", help="one-line provenance")
    s.set_defaults(func=_train)
    s = sub.add_parser("evaluate", help="metrics on a labelled dataset (or k-fold CV)")
    s.add_argument("--data", type=Path, nargs="+", required=True,
                   help="dataset folder(s) (infants.csv ...)")  # fmt: skip
    s.add_argument("--weights", type=Path, help="weights NAME.json (default: the shipped ones)")
    s.add_argument("--folds", type=int, default=0, help="k-fold CV, training each fold (paper 5)")
    s.add_argument("--external", type=Path, help="a separate labelled set to evaluate too")
    s.add_argument("--without-info", action="store_true", help="ablation: MAM w/o info")
    s.add_argument("--out", type=Path, help="write JSON, Markdown and PNG plots here")
    s.add_argument("--model-card", type=Path, help="write a MODEL_CARD.md for --weights")
    s.add_argument("--format", choices=["text", "json", "markdown"], default="text")
    _add_pose_backend(s)
    _add_train_options(s)
    s.set_defaults(func=_evaluate)

    s = sub.add_parser("batch", help="screen an archive (folder or manifest CSV), resumably")
    s.add_argument("input", type=Path, help="folder of recordings / .npy poses, or manifest .csv")
    s.add_argument("--out", type=Path, required=True, help="output folder (ledger, results)")
    s.add_argument("--workers", type=int, default=None, help="worker processes (default: cores)")
    s.add_argument("--retry-failed", action="store_true", help="screen failed recordings again")
    s.add_argument("--weights", type=Path, help="weights NAME.json (default: MAM_WEIGHTS or demo)")
    _add_pose_backend(s)
    s.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    s.add_argument("--clips", action="store_true",
                   help="also cut the top FMs clips, skeleton drawn (~6 s a clip)")  # fmt: skip
    s.add_argument("--shard", type=_shard, metavar="I/N",
                   help="screen only rows I, I+N, ... (one Indexed Job pod each)")  # fmt: skip
    s.add_argument("--service", metavar="URL",
                   help="screen through a running service (API key from MAM_API_KEY); "
                        "--workers requests at a time")  # fmt: skip
    s.set_defaults(func=_batch)

    sub.add_parser(
        "train-lifter",
        add_help=False,
        help="train the VideoPose3D lifter on 3D motion seen through random cameras "
        "(`mam train-lifter --help`)",
    )

    s = sub.add_parser("serve", help="start the screening service (REST + KServe v2 gRPC)")
    s.add_argument("--port", type=int, default=3000, help="REST port (default 3000)")
    s.add_argument("--host", default="127.0.0.1", help="REST bind address (default loopback)")
    s.add_argument("--grpc-port", type=int, default=_env_int("MAM_GRPC_PORT", 8001),
                   help="KServe v2 gRPC port (default MAM_GRPC_PORT or 8001; 0: off)")  # fmt: skip
    s.add_argument("--weights", type=Path, help="weights NAME.json (default: MAM_WEIGHTS or demo)")
    _add_pose_backend(s)
    s.add_argument("--no-auth", action="store_true", help="no API keys (local development)")
    s.add_argument("--hash-key", metavar="KEY", help="print the MAM_API_KEY_HASHES entry for KEY")
    s.set_defaults(func=_serve)
    return p


def _add_pose_backend(s: argparse.ArgumentParser) -> None:
    """One definition of --pose-backend: the registered names, MAM_POSE_BACKEND as default."""
    import os

    from mam.pose import available_backends  # registers the backends, imports none of them

    def registered(name: str) -> str:  # argparse also runs it on the default (the env value)
        if name not in available_backends():
            raise argparse.ArgumentTypeError(
                f"unknown pose backend {name!r} (from --pose-backend or MAM_POSE_BACKEND); "
                f"choose from {', '.join(available_backends())}"
            )
        return name

    names = "{" + ",".join(available_backends()) + "}"
    s.add_argument("--pose-backend", type=registered, metavar=names,
                   default=os.environ.get("MAM_POSE_BACKEND") or "mediapipe",
                   help="pose estimator (default MAM_POSE_BACKEND or mediapipe); "
                        "recorded in every result")  # fmt: skip


def _env_int(name: str, default: int) -> int:
    import os

    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "train-lifter" in argv and all(
        a in ("-v", "--verbose") for a in argv[: argv.index("train-lifter")]
    ):
        from mam.pose.lifter_train import main as train_lifter  # its own parser

        return train_lifter(argv[argv.index("train-lifter") + 1 :])
    if argv[:2] == ["batch", "merge"]:  # `mam batch merge SHARD... --out DIR`
        args = _merge_parser().parse_args(argv[2:])
    else:
        args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.func(args)
    except InputError as e:
        print(f"error [{e.code}]: {e}", file=sys.stderr)
        return 2
    except MamError as e:
        print(f"error [{e.code}]: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
