"""``mam``: screen a recording, simulate data, train, screen archives, serve.

Examples:
    mam screen demo/infant_demo.mp4
    mam screen --pose poses.npy --sex female --gestational-age-weeks 34 \\
        --birth-weight-g 2100 --corrected-age-weeks 12 --format json
    mam synth --out data/sim --infants 40 --seed 1
    mam synth demo --out demo/infant_demo.mp4
    mam dataset check data/sim
    mam train --data data/sim --out models/my_model --epochs 8
    mam evaluate --data data/sim_test --format json
    mam train-lifter --data poses.npz --out models/lifter.pt --minutes 6
    mam calibrate --data site/ --target-sensitivity 0.95 --out models/site_cal
    mam batch archive/ --out results/ --workers 4
    mam batch manifest.csv --out shard-0 --shard 0/4 && mam batch merge shard-* --out all
    mam batch archive/ --out results/ --service http://mam:3000 --workers 8
    mam serve --port 3000 --grpc-port 8001
    mam build --weights models/site.json && bentoml serve mam:latest
    mam review results/ --archive archive/ --port 8080

Errors print ``error [code]: message`` and a one-line ``fix:``, and exit with status 2 (bad input
or usage) or 1. One module per command group (``screen``, ``synth``, ``dataset``, ``train``,
``calibrate``, ``batch``, ``serve``, ``build``, ``review``); shared options in ``options``; the
fixes in ``errors``.
"""

from __future__ import annotations

import argparse
import logging
import sys

from mam import __version__
from mam.cli import (
    batch,
    build,
    calibrate,
    dataset,
    dicom,
    fhir,
    review,
    screen,
    serve,
    synth,
    train,
)
from mam.cli.errors import hint
from mam.cli.options import CommandParser, UsageError, given
from mam.errors import InputError, MamError

COMMANDS = (screen, synth, dataset, train, calibrate, batch, serve, build, review, fhir, dicom)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mam", description=__doc__.split("\n")[0])
    p.add_argument("--version", action="version", version=f"mam {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    sub = p.add_subparsers(dest="command", required=True, parser_class=CommandParser)
    for module in COMMANDS:
        module.register(sub)
    return p


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    for action in parser._actions:  # noqa: SLF001
        if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
            return action.choices[name]
    raise KeyError(name)


def parse(argv: list[str]) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    sp = _subparser(parser, args.command)
    sp = sp.verbs.get(getattr(args, "verb", None), sp)  # `mam batch merge`, `mam synth demo`
    args.given = given(sp, argv[argv.index(args.command) + 1 :])
    args.prog = sp.prog
    args.argv = argv
    args.verbose = getattr(args, "verbose", False)
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.func(args)
    except UsageError as e:
        print(f"{args.prog}: {e}", file=sys.stderr)
        return 2
    except MamError as e:
        print(f"error [{e.code}]: {e}\nfix: {hint(e.code)}", file=sys.stderr)
        return 2 if isinstance(e, InputError) else 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
