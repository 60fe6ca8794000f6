"""``mam dicom``: store results' DICOM SRs to a PACS over DICOMweb STOW-RS.

Examples:
    mam dicom store result.dcm --base-url https://pacs.example/dicom-web \\
        --token-file /run/secrets/pacs-token
    mam dicom store results/ --base-url https://pacs.example/dicom-web    # mam batch --dicom-sr
    mam dicom store results/sr/ --base-url http://127.0.0.1:8042/dicom-web --format json

A folder stores every .dcm in it, or in its sr/ folder (where ``mam batch --dicom-sr`` writes one
SR per result). Storing again is harmless: an SR's SOP Instance UID is fixed by its result id, so
the PACS keeps one instance. Outages (5xx, timeouts) are retried with back-off; a refusal stops
with the file named. Output gives counts only.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mam.cli import options as O


def register(sub) -> None:
    s = sub.add_parser("dicom", help="store DICOM SRs to a PACS over DICOMweb STOW-RS",
                       description="store results' DICOM Structured Reports to a PACS over "
                       "DICOMweb STOW-RS", epilog=__doc__.split("\n", 1)[1],
                       formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    group = s.add_subparsers(dest="dicom_command", required=True, metavar="{store}")
    p = group.add_parser("store", help="store one SR, or every .dcm of a folder (a mam batch "
                         "--dicom-sr OUT, or its sr/ folder)")  # fmt: skip
    O.add_verbose(p)
    p.add_argument("input", type=Path, metavar="FILE.dcm|DIR")
    p.add_argument("--base-url", default=O.setting("dicomweb_base_url"), metavar="URL",
                   help="the PACS's DICOMweb root, the part before /studies (https; http only "
                        "on loopback) (default MAM_DICOMWEB_BASE_URL)")  # fmt: skip
    a = p.add_argument_group("authorization (from files, never on the command line)")
    a.add_argument(
        "--token-file",
        type=Path,
        default=O.setting("dicomweb_token_file"),
        metavar="FILE",
        help="a bearer token (default MAM_DICOMWEB_TOKEN_FILE)",
    )
    a.add_argument("--basic-auth-file", type=Path, metavar="FILE",
                   default=O.setting("dicomweb_basic_auth_file"),
                   help="user:password on one line, for HTTP basic auth "
                        "(default MAM_DICOMWEB_BASIC_AUTH_FILE)")  # fmt: skip
    p.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS",
                   help="per request (default 30)")  # fmt: skip
    p.add_argument(
        "--attempts",
        type=int,
        default=4,
        help="tries per file on 5xx or timeouts, with back-off (default 4)",
    )
    p.add_argument("--format", choices=("text", "json"), default="text", help="output format")
    p.set_defaults(func=run_store)


def run_store(args: argparse.Namespace) -> int:
    from mam.dicom_stow import InvalidDicomwebUrlError, store

    if not args.base_url:
        raise InvalidDicomwebUrlError("no PACS: give --base-url (or set MAM_DICOMWEB_BASE_URL)")
    done = store(args.input, args.base_url, token_file=args.token_file,
                 basic_auth_file=args.basic_auth_file, timeout=args.timeout,
                 attempts=args.attempts)  # fmt: skip
    counts = {"stored": sum(d.status == "stored" for d in done),
              "already_stored": sum(d.status == "already stored" for d in done)}  # fmt: skip
    if args.format == "json":
        print(json.dumps({"files": len(done), **counts}))
    else:
        print(f"stored {counts['stored']} of {len(done)} file(s) to the PACS"
              + (f" ({counts['already_stored']} already there)" if counts["already_stored"]
                 else ""), file=sys.stdout)  # fmt: skip
    return 0
