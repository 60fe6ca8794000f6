"""``mam review``: the clinicians' review and annotation web app over a batch output folder.

Examples:
    mam review results/ --add-user alice            # asks for alice's password
    mam review results/ --add-user carol --role senior
    mam review results/ --archive archive/ --blind  # model hidden until one's own verdict
    mam review results/ --archive archive/ --port 8080
    mam review results/ --export training/site_a    # no server: annotations -> training layout
    mam review results/ --study-report beginners    # an assistance study's report; exit
    MAM_REVIEW_DB=postgresql+psycopg://mam@db/mam mam review results/ --archive archive/
"""

from __future__ import annotations

import argparse
import getpass
import sys
from pathlib import Path

from mam.cli import options as O

SERVE_OPTIONS = ("port", "host")


def register(sub) -> None:
    s = sub.add_parser("review", help="review and annotate a batch's recordings in a browser",
                       description="the clinicians' review and annotation web app over a batch "
                       "output folder",
                       epilog=__doc__.split("\n", 1)[1],
                       formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    O.add_verbose(s)
    s.add_argument("dir", type=Path, help="a mam batch --out folder (its ledger.sqlite)")
    s.add_argument("--archive", type=Path, metavar="ROOT",
                   help="where the ledger's paths start: mam batch's INPUT folder (or the "
                        "manifest's folder); without it recordings cannot be played")  # fmt: skip
    s.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    s.add_argument("--host", default="127.0.0.1", help="bind address (default loopback)")
    s.add_argument("--db", metavar="URL", default=O.setting("review_db"),
                   help="review database URL, e.g. postgresql+psycopg://user@host/db "
                        "(default MAM_REVIEW_DB or DIR/review.sqlite)")  # fmt: skip
    s.add_argument("--users", type=Path, metavar="FILE",
                   default=O.setting("review_users"),
                   help="reviewers' user list "
                        "(default MAM_REVIEW_USERS or DIR/review_users)")  # fmt: skip
    s.add_argument("--export", type=Path, metavar="OUT",
                   help="write the finished reviews as a training folder (infants.csv, "
                        "fms_intervals.csv, poses as mam batch kept them, dataset.json) with "
                        "the agreement report; exit")  # fmt: skip
    s.add_argument("--study-report", metavar="STUDY",
                   help="print the report of assistance study STUDY (each assessor's accuracy, "
                        "sensitivity and specificity without and with the model's assistance, "
                        "against the signed-off verdicts) and exit")  # fmt: skip
    s.add_argument("--study-json", action="store_true",
                   help="with --study-report: print the report as JSON")  # fmt: skip
    s.add_argument("--add-user", metavar="NAME",
                   help="add or replace reviewer NAME (password from the terminal, or the first "
                        "line of stdin) and exit")  # fmt: skip
    s.add_argument("--role", metavar="ROLE",
                   help="with --add-user: assessor, senior (signs off) or admin (exports, "
                        "access log), comma-separated for several (default: the first "
                        "user senior,admin, later ones assessor; a replaced user keeps "
                        "theirs)")  # fmt: skip
    s.add_argument("--blind", action="store_true",
                   help="blind review: the model's result is hidden from each user until they "
                        "have marked their own review done (default MAM_REVIEW_BLIND)")  # fmt: skip
    s.set_defaults(func=run)


def service_key_hashes() -> frozenset[str]:
    """The service's accepted key digests (``MAM_API_KEY_HASHES``, ``MAM_API_KEY_HASHES_FILE``),
    which may also log in to the review app: parsed as the service parses them, so a malformed
    entry is an ``InvalidKeyHashesError`` here too."""
    from mam.settings import current

    return current().key_hashes()


def _password() -> str:
    if sys.stdin.isatty():
        first = getpass.getpass("password: ")
        if getpass.getpass("again: ") != first:
            raise O.UsageError("the two passwords differ")
        return first
    return sys.stdin.readline().rstrip("\r\n")


def run(args: argparse.Namespace) -> int:
    from mam.review.auth import UsersFileError, add_user, parse_roles, read_users_roles
    from mam.review.config import ReviewConfig
    from mam.settings import current

    env = current()  # MAM_REVIEW_SECURE_COOKIE, MAM_REVIEW_BLIND (--db, --users: defaults)
    config = ReviewConfig(out_dir=args.dir, archive_root=args.archive, db_url=args.db,
                          users_file=args.users, key_hashes=service_key_hashes(),
                          secure_cookie=env.review_secure_cookie,
                          blind=args.blind or env.review_blind)  # fmt: skip
    if args.add_user is not None:
        O.reject(args, ["archive", "port", "host", "db", "export"],
                 "--add-user only writes the users file")  # fmt: skip
        try:
            if args.role is not None:
                parse_roles(args.role)
            add_user(config.users_file, args.add_user, _password(), args.role)
        except UsersFileError as e:
            raise O.UsageError(str(e)) from None
        roles = ",".join(sorted(read_users_roles(config.users_file)[args.add_user][1]))
        print(f"reviewer {args.add_user} ({roles}) saved in {config.users_file}")
        return 0
    if args.role is not None:
        raise O.UsageError("--role goes with --add-user NAME")
    if not (args.dir / "ledger.sqlite").is_file():
        raise O.UsageError(f"no ledger.sqlite in {args.dir}: run mam batch INPUT --out DIR first")
    if args.archive is not None and not args.archive.is_dir():
        raise O.UsageError(f"--archive {args.archive} is not a folder")
    if args.study_json and args.study_report is None:
        raise O.UsageError("--study-json goes with --study-report STUDY")
    if args.study_report is not None:
        O.reject(args, [*SERVE_OPTIONS, "export"], "--study-report prints a report and exits")
        return _study_report(config, args.study_report, args.study_json)
    if args.export is not None:
        O.reject(args, SERVE_OPTIONS, "--export writes files and exits; nothing is served")
        return _export(config, args.export)
    return _serve(config, args.host, args.port)


def _export(config, out: Path) -> int:
    from mam.review.catalog import Catalog
    from mam.review.export import ExportError, export_annotations
    from mam.review.store import ReviewStore

    def progress(done: int, total: int) -> None:
        if total:
            print(f"\rexport: {done}/{total} recordings", end="", file=sys.stderr, flush=True)

    store = ReviewStore(config.database_url)
    try:
        s = export_annotations(Catalog(config.out_dir, config.archive_root), store, out, progress)
    except ExportError as e:
        raise O.UsageError(str(e)) from None
    finally:
        store.close()
    print(file=sys.stderr)
    a = s.agreement
    kappa = f"{a['median_kappa']:.2f}" if a.get("median_kappa") is not None else "n/a"
    groups = ", ".join(f"{n} {g}" for g, n in sorted(s.groups.items())) or "none"
    print(f"exported {s.exported} recordings ({groups}; {s.intervals} FMs intervals) to {out}; "
          f"{len(s.skipped)} left out (export.json says why); median per-video kappa with the "
          f"model {kappa}; {s.validated}")  # fmt: skip
    return 0


def _study_report(config, name: str, as_json: bool) -> int:
    import json

    from mam.review import study as S
    from mam.review.store import ReviewStore

    store = ReviewStore(config.database_url)
    try:
        rep = S.report(store, S.get_study(store, name))
    finally:
        store.close()
    print(json.dumps(rep, indent=2) if as_json else S.format_report(rep))
    return 0


def _serve(config, host: str, port: int) -> int:
    import uvicorn

    from mam.review.app import create_app

    app = create_app(config)
    review = app.state.review
    if not review.auth.configured:
        print("mam review: no reviewers yet, so nobody can log in; add one with "
              f"mam review {config.out_dir} --add-user NAME", file=sys.stderr)  # fmt: skip
    if config.blind:
        print("mam review: blind review: the model's result is shown to each user once they "
              "have marked their own review done", file=sys.stderr)  # fmt: skip
    if config.archive_root is None:
        print("mam review: no --archive given: recordings are listed but cannot be played",
              file=sys.stderr)  # fmt: skip
    n = len(review.catalog.all())
    print(f"mam review: {n} recordings on http://{host}:{port}/ (Ctrl-C to stop)",
          file=sys.stderr)  # fmt: skip
    # No access log: URLs hold only opaque ids, but a log of who opened what is still health
    # data; the audit trail in the database records every change.
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
    return 0
