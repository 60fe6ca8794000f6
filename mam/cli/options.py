"""Options several commands share, declared once, and the check that refuses options a command
would ignore (an option given and silently dropped is a wrong result waiting to happen)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


class UsageError(Exception):
    """A combination of options that cannot do what it says; printed as ``mam CMD: message``."""


class CommandParser(argparse.ArgumentParser):
    """A command's parser that may also have verbs of its own: ``mam batch merge SHARD...`` is
    parsed by the verb's parser when the command's first argument (after ``-v``) is literally
    the verb, ``mam batch INPUT`` by the command's. (argparse cannot put subparsers beside an
    optional or free positional; a folder named like a verb is written ``./merge``.)"""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.verbs: dict[str, argparse.ArgumentParser] = {}

    def add_verb(self, name: str, **kwargs) -> argparse.ArgumentParser:
        """A parser for ``<command> <name> ...``; its namespace gets ``verb=name``."""
        p = argparse.ArgumentParser(prog=f"{self.prog} {name}", **kwargs)
        p.set_defaults(verb=name)
        self.verbs[name] = p
        return p

    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        first = next((a for a in args if a not in ("-v", "--verbose")), None)
        if first in self.verbs:
            args.remove(first)
            return self.verbs[first].parse_known_args(args, namespace)
        return super().parse_known_args(args, namespace)

    def format_help(self) -> str:
        text = super().format_help()
        if self.verbs:
            text += "\nalso:\n" + "".join(
                f"  {p.prog} ... ({p.description}; {p.prog} --help)\n" for p in self.verbs.values()
            )
        return text


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

    def registered(name: str) -> str:  # argparse also runs it on the default (the env value)
        if name not in available_backends():
            raise argparse.ArgumentTypeError(
                f"unknown pose backend {name!r} (from --pose-backend or MAM_POSE_BACKEND); "
                f"choose from {', '.join(available_backends())}"
            )
        return name

    names = "{" + ",".join(available_backends()) + "}"
    default = setting("pose_backend")
    p.add_argument("--pose-backend", type=registered, metavar=names, default=default,
                   help="pose estimator (default MAM_POSE_BACKEND or "
                        f"{default}); recorded in every result")  # fmt: skip


def add_infant(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sex", choices=["male", "female"], help="infant's sex")
    p.add_argument("--gestational-age-weeks", type=float, metavar="W", help="at birth")
    p.add_argument("--birth-weight-g", type=float, metavar="G", help="birth weight in grams")
    p.add_argument("--corrected-age-weeks", type=float, metavar="W", help="at recording")


FHIR_LINKAGE = ("fhir_subject", "fhir_encounter", "fhir_patient_identifier",
                "fhir_order_identifier", "accession_number")  # fmt: skip


def add_fhir_linkage(g) -> None:
    """The patient, encounter and order a FHIR result belongs to (``mam.fhir.FhirContext``):
    the caller's, checked, never logged."""
    g.add_argument("--fhir-subject", metavar="Patient/ID",
                   help="the patient of the result (a FHIR reference; never logged)")  # fmt: skip
    g.add_argument("--fhir-encounter", metavar="Encounter/ID", help="the encounter, likewise")
    g.add_argument("--fhir-patient-identifier", metavar="SYSTEM|VALUE",
                   help="the patient by identifier (e.g. an MRN): the subject becomes the "
                        "conditional reference Patient?identifier=SYSTEM|VALUE, which the FHIR "
                        "server resolves; not with --fhir-subject")  # fmt: skip
    g.add_argument("--fhir-order-identifier", metavar="SYSTEM|VALUE",
                   help="the order (ServiceRequest) the result answers: basedOn "
                        "ServiceRequest?identifier=SYSTEM|VALUE")  # fmt: skip
    g.add_argument("--accession-number", metavar="A",
                   help="the accession number: a report identifier of type ACSN (and the "
                        "order's, when no --fhir-order-identifier)")  # fmt: skip


def fhir_linkage(args: argparse.Namespace) -> dict:
    """``FhirContext`` keyword arguments from ``add_fhir_linkage``'s options."""
    return {
        "subject": args.fhir_subject,
        "encounter": args.fhir_encounter,
        "patient_identifier": args.fhir_patient_identifier,
        "order_identifier": args.fhir_order_identifier,
        "accession_number": args.accession_number,
    }


def add_data(p: argparse.ArgumentParser, what: str = "dataset folder(s)") -> None:
    p.add_argument("--data", type=Path, nargs="+", required=True,
                   help=f"{what}: infants.csv, fms_intervals.csv, poses or recordings")  # fmt: skip


TRAIN_OPTIONS = ("preset", "config", "epochs", "pretrain_epochs", "optimizer", "lr", "max_lr",
                 "ref_clips", "instances_per_bag", "no_closeness", "no_reference",
                 "calibration_fraction", "representation", "seed")  # fmt: skip


def add_train_options(p: argparse.ArgumentParser) -> None:
    """A named preset (``TrainConfig.preset``) and the options that override its fields; an
    option not given keeps the preset's value."""
    from mam.pose.representation import REPRESENTATIONS
    from mam.training.presets import MODEL_CONFIGS, PRESETS

    g = p.add_argument_group("training (defaults: the preset's; compact unless --preset)")
    g.add_argument("--preset", choices=list(PRESETS), default="compact",
                   help="compact: 8 epochs of AdamW on the compact network (minutes on a CPU); "
                        "paper: the paper's 300 epochs of SGD on its network")  # fmt: skip
    g.add_argument("--config", choices=list(MODEL_CONFIGS),
                   help="network size (default: the preset's)")  # fmt: skip
    g.add_argument("--epochs", type=int, help="epochs (compact 8, paper 300)")
    g.add_argument("--pretrain-epochs", type=int, help="clip encoder on ref clips (0)")
    g.add_argument("--optimizer", choices=["sgd", "adamw"], help="compact adamw, paper sgd")
    g.add_argument("--lr", type=float, help="CyclicLR base rate (compact 5e-4, paper 1e-3)")
    g.add_argument("--max-lr", type=float, help="CyclicLR peak rate (compact 3e-3, paper 1e-2)")
    g.add_argument("--ref-clips", type=int, help="reference clips per step (compact 16, paper 32)")
    g.add_argument("--instances-per-bag", type=int,
                   help="instances per bag per step (compact 8, paper 16)")  # fmt: skip
    g.add_argument("--no-closeness", action="store_true", help="ablation: no closeness loss")
    g.add_argument(
        "--representation",
        choices=REPRESENTATIONS,
        help="pose coordinates the model sees (image2d; mam.pose.representation)",
    )
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
    """``TrainConfig.preset(args.preset)`` with the options given on the command line."""
    from mam.training.train import TrainConfig

    fields = {
        "model": args.config,
        "epochs": args.epochs,
        "pretrain_epochs": args.pretrain_epochs,
        "optimizer": args.optimizer,
        "lr": args.lr,
        "max_lr": args.max_lr,
        "ref_clips_per_step": args.ref_clips,
        "instances_per_bag": args.instances_per_bag,
        "representation": args.representation,
    }
    return TrainConfig.preset(
        args.preset,
        **{k: v for k, v in fields.items() if v is not None},
        use_reference=not args.no_reference,
        use_closeness=not args.no_closeness and not args.no_reference,
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


def setting(name: str):
    """The setting ``name`` of ``mam.settings`` (its ``MAM_*`` variable) as an option's default.
    Parsers are built before a command's error handling starts, so a malformed variable is
    reported here as any typed error is, and the CLI exits 2 (as argparse does for options)."""
    from mam.settings import InvalidSettingError, current

    try:
        return getattr(current(), name)
    except InvalidSettingError as e:
        from mam.cli.errors import hint

        print(f"error [{e.code}]: {e}\nfix: {hint(e.code)}", file=sys.stderr)
        raise SystemExit(2) from None
