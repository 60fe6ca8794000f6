"""``mam dataset check DIR [DIR ...]``: every problem of training data folders at once, and what
``mam train`` will do with them, before any pose is estimated."""

from __future__ import annotations

import argparse
from pathlib import Path

from mam.cli import options as O


def register(sub) -> None:
    s = sub.add_parser("dataset", help="check training data folders before training")
    group = s.add_subparsers(dest="dataset_command", required=True, metavar="{check}")
    c = group.add_parser(
        "check",
        help="list every error of infants.csv / fms_intervals.csv and what training will do",
    )
    O.add_verbose(c)
    c.add_argument("folders", type=Path, nargs="+", metavar="DIR", help="dataset folder(s)")
    O.add_split_options(c)
    O.add_accept_small_data(c)
    c.set_defaults(func=run_check)


def run_check(args: argparse.Namespace) -> int:
    from mam.training.dataset import check_dataset, check_trainable

    report = check_dataset(args.folders, args.calibration_fraction, args.seed,
                           not args.no_reference)  # fmt: skip
    for line in report.lines():
        print(line)
    report.raise_for_errors()
    check_trainable(report.plan, args.accept_small_data)
    print(f"ok: mam train can use these {report.plan.infants} infants")
    return 0
