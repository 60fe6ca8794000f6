"""Options several commands share, declared once, and the check that refuses options a command
would ignore (an option given and silently dropped is a wrong result waiting to happen)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path


class UsageError(Exception):
    """A combination of options that cannot do what it says; printed as ``mam CMD: message``."""


def add_verbose(p: argparse.ArgumentParser) -> None:
    # SUPPRESS: a subcommand's own -v must not reset the one given before the subcommand.
    p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                   help="log progress to stderr")  # fmt: skip


def add_quiet(p: argparse.ArgumentParser) -> None:
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")


def add_weights(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", type=Path, help="weights NAME.json (default: MAM_WEIGHTS or demo)")


def add_pose_backend(p: argparse.ArgumentParser) -> None:
    """--pose-backend: the registered names, MAM_POSE_BACKEND as default."""
    from mam.pose import available_backends  # registers the backends, imports none of them
    from mam.screening import default_pose_backend

    def registered(name: str) -> str:  # argparse also runs it on the default (the env value)
        if name not in available_backends():
            raise argparse.ArgumentTypeError(
                f"unknown pose backend {name!r} (from --pose-backend or MAM_POSE_BACKEND); "
                f"choose from {', '.join(available_backends())}"
            )
        return name

    names = "{" + ",".join(available_backends()) + "}"
    p.add_argument("--pose-backend", type=registered, metavar=names,
                   default=default_pose_backend(),
                   help="pose estimator (default MAM_POSE_BACKEND or "
                        f"{default_pose_backend()}); recorded in every result")  # fmt: skip


def add_infant(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sex", choices=["male", "female"], help="infant's sex")
    p.add_argument("--gestational-age-weeks", type=float, metavar="W", help="at birth")
    p.add_argument("--birth-weight-g", type=float, metavar="G", help="birth weight in grams")
    p.add_argument("--corrected-age-weeks", type=float, metavar="W", help="at recording")


def add_data(p: argparse.ArgumentParser, what: str = "dataset folder(s)") -> None:
    p.add_argument("--data", type=Path, nargs="+", required=True,
                   help=f"{what}: infants.csv, fms_intervals.csv, poses or recordings")  # fmt: skip


TRAIN_OPTIONS = ("config", "epochs", "pretrain_epochs", "optimizer", "lr", "max_lr", "ref_clips",
                 "instances_per_bag", "no_closeness", "no_reference", "calibration_fraction",
                 "representation", "seed")  # fmt: skip


def add_train_options(p: argparse.ArgumentParser) -> None:
    from mam.pose.representation import REPRESENTATIONS

    g = p.add_argument_group("training")
    g.add_argument("--config", choices=["compact", "paper", "reference"], default="compact")
    g.add_argument("--epochs", type=int, default=8, help="epochs (paper: 300)")
    g.add_argument("--pretrain-epochs", type=int, default=0, help="clip encoder on ref clips")
    g.add_argument("--optimizer", choices=["sgd", "adamw"], default="adamw", help="paper: sgd")
    g.add_argument("--lr", type=float, default=5e-4, help="CyclicLR base rate")
    g.add_argument("--max-lr", type=float, default=3e-3, help="CyclicLR peak rate")
    g.add_argument("--ref-clips", type=int, default=16, help="reference clips per step")
    g.add_argument("--instances-per-bag", type=int, default=8, help="instances per bag per step")
    g.add_argument("--no-closeness", action="store_true", help="ablation: no closeness loss")
    g.add_argument("--representation", choices=REPRESENTATIONS, default="image2d",
                   help="pose coordinates the model sees (mam.pose.representation)")  # fmt: skip
    add_split_options(g)


def add_split_options(g) -> None:
    """The options that decide what training does with the data (``mam dataset check`` shows
    it with the same ones)."""
    g.add_argument("--no-reference", action="store_true",
                   help="no Ref Branch (ablation; off anyway without FMs intervals)")  # fmt: skip
    g.add_argument("--calibration-fraction", type=float, default=0.2,
                   help="share of infants held out to calibrate P(risk)")  # fmt: skip
    g.add_argument("--seed", type=int, default=0, help="random seed (also of the split)")


def add_accept_small_data(p) -> None:
    p.add_argument("--accept-small-data", action="store_true",
                   help="train below the documented minimum sizes (README); the weights record "
                        "it and every result carries a warning")  # fmt: skip


def train_config(args: argparse.Namespace):
    from mam.model.config import MAMConfig
    from mam.training.train import TrainConfig, compact_model_config

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


def given(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """Destinations of the options of ``parser`` that appear in ``argv`` (not defaults)."""
    out = set()
    for action in parser._actions:  # noqa: SLF001 - argparse has no public list of actions
        for opt in action.option_strings:
            if any(tok == opt or tok.startswith(opt + "=") for tok in argv):
                out.add(action.dest)
    return out


def reject(args: argparse.Namespace, dests, because: str) -> None:
    """``UsageError`` when any option in ``dests`` was given: ``because`` says why it would be
    ignored."""
    hit = [d for d in dests if d in args.given]
    if hit:
        names = ", ".join("--" + d.replace("_", "-") for d in hit)
        raise UsageError(f"{names}: {because}")


def env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default
