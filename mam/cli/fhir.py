"""``mam fhir``: send results' FHIR Bundles to a site's FHIR server through the durable outbox.

Examples:
    mam fhir push results/results.fhir.ndjson --base-url https://ehr.example/fhir \\
        --token-file /run/secrets/fhir-token
    mam fhir push results/ --base-url https://ehr.example/fhir --client-id mam \\
        --token-url https://ehr.example/oauth/token --client-secret-file /run/secrets/fhir
    mam fhir push --base-url https://ehr.example/fhir     # only what the outbox still holds
    mam fhir outbox status
    mam fhir outbox retry --all && mam fhir push --base-url https://ehr.example/fhir
    mam fhir outbox give-up RESULT_ID
    mam fhir definitions --format ndjson > definitions.ndjson   # to publish on the site's server

Every Bundle is kept in the outbox (``--outbox``, default ``MAM_FHIR_OUTBOX``, else beside
``MAM_AUDIT_FILE``, else ./fhir-outbox.sqlite) before it is sent, so nothing is lost to an outage:
what is not delivered within ``--wait`` seconds stays there for the next ``mam fhir push`` (or the
service's outbox on the same file). Output names result ids and counts only.
``mam fhir definitions`` prints the CodeSystem, StructureDefinition and NamingSystems behind the
results' local URLs (under ``canonical_base`` of MAM_FHIR_CODES_FILE; mam.fhir.definitions).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from mam.cli import options as O


def register(sub) -> None:
    s = sub.add_parser("fhir", help="push FHIR Bundles to a FHIR server through a durable outbox",
                       description="push results' FHIR Bundles to a site's FHIR server through "
                       "a durable outbox, and manage the outbox",
                       epilog=__doc__.split("\n", 1)[1],
                       formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    group = s.add_subparsers(
        dest="fhir_command", required=True, metavar="{push,outbox,definitions}"
    )

    p = group.add_parser("push", help="queue NDJSON Bundles (e.g. mam batch's "
                         "results.fhir.ndjson) and deliver the outbox")  # fmt: skip
    O.add_verbose(p)
    p.add_argument("input", type=Path, nargs="?", metavar="FILE.ndjson|DIR",
                   help="one Bundle per line, or a folder of *.ndjson files (a mam batch --out "
                        "folder); without it, only what the outbox holds is sent")  # fmt: skip
    p.add_argument("--base-url", default=O.setting("fhir_base_url"), metavar="URL",
                   help="the FHIR server's base (https; http only on loopback) "
                        "(default MAM_FHIR_BASE_URL)")  # fmt: skip
    _add_outbox(p)
    a = p.add_argument_group("authorization (a static token, or OAuth2 client credentials as in "
                             "SMART Backend Services)")  # fmt: skip
    a.add_argument("--token-file", type=Path, default=O.setting("fhir_token_file"),
                   metavar="FILE", help="a bearer token, read at every request "
                   "(default MAM_FHIR_TOKEN_FILE)")  # fmt: skip
    a.add_argument(
        "--client-id",
        default=O.setting("fhir_client_id"),
        help="OAuth2 client id (default MAM_FHIR_CLIENT_ID)",
    )
    a.add_argument(
        "--token-url",
        default=O.setting("fhir_token_url"),
        metavar="URL",
        help="OAuth2 token endpoint (default MAM_FHIR_TOKEN_URL)",
    )
    a.add_argument("--client-secret-file", type=Path, metavar="FILE",
                   default=O.setting("fhir_client_secret_file"),
                   help="client secret, sent as client_secret_basic "
                        "(default MAM_FHIR_CLIENT_SECRET_FILE)")  # fmt: skip
    a.add_argument("--private-key", type=Path, metavar="PEM",
                   default=O.setting("fhir_private_key_file"),
                   help="RSA or EC private key for private_key_jwt (RS384/ES384; needs "
                        "pyjwt[crypto]) (default MAM_FHIR_PRIVATE_KEY_FILE)")  # fmt: skip
    a.add_argument("--key-id", help="the key's kid in the client's JWKS")
    a.add_argument("--scope", default="system/*.write", help="scope asked for "
                   "(default system/*.write)")  # fmt: skip
    p.add_argument("--wait", type=float, default=120.0, metavar="SECONDS",
                   help="how long to keep retrying (with back-off) before leaving the rest in "
                        "the outbox (default 120)")  # fmt: skip
    p.add_argument(
        "--timeout", type=float, default=30.0, metavar="SECONDS", help="per request (default 30)"
    )
    _add_format(p)
    p.set_defaults(func=run_push)

    o = group.add_parser("outbox", help="show the outbox, retry or give up entries")
    O.add_verbose(o)
    _add_outbox(o)
    o.add_argument("action", choices=("status", "retry", "give-up"),
                   help="status: counts and each undelivered result id; retry: make given-up "
                        "entries pending again; give-up: stop sending a pending entry")  # fmt: skip
    o.add_argument("result_id", nargs="?", metavar="ID", help="a result id (retry, give-up)")
    o.add_argument("--all", action="store_true", help="retry every given-up entry")
    _add_format(o)
    o.set_defaults(func=run_outbox)

    d = group.add_parser("definitions", help="print the FHIR CodeSystem, StructureDefinition "
                         "and NamingSystems of the results' local URLs")  # fmt: skip
    d.add_argument("--format", choices=("json", "ndjson"), default="json",
                   help="json: a collection Bundle; ndjson: one resource per line")  # fmt: skip
    d.set_defaults(func=run_definitions)


def _add_outbox(p) -> None:
    p.add_argument("--outbox", type=Path, metavar="PATH",
                   help="the outbox file (default MAM_FHIR_OUTBOX, else fhir-outbox.sqlite "
                        "beside MAM_AUDIT_FILE, else in the current folder)")  # fmt: skip


def _add_format(p) -> None:
    p.add_argument("--format", choices=("text", "json"), default="text", help="output format")


def _bundles(path: Path):
    """(where, Bundle) of each line of the NDJSON file(s) ``path`` names."""
    from mam.errors import FileNotFoundInputError
    from mam.fhir.outbox import InvalidFhirBundleError

    if not path.exists():
        raise FileNotFoundInputError(f"{path} does not exist")
    files = sorted(path.rglob("*.ndjson")) if path.is_dir() else [path]
    if not files:
        raise InvalidFhirBundleError(f"{path} holds no *.ndjson file")
    for f in files:
        with open(f, encoding="utf-8") as lines:
            for n, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                try:
                    yield f"{f}:{n}", json.loads(line)
                except ValueError:
                    raise InvalidFhirBundleError(f"{f} line {n} is not JSON") from None


def has_subject(bundle: dict) -> bool:
    entries = bundle.get("entry") if isinstance(bundle, dict) else None
    return any("subject" in (e.get("resource") or {}) for e in entries or ())


def _print(args, data: dict, text: str) -> None:
    print(json.dumps(data, indent=2) if args.format == "json" else text)


def run_push(args: argparse.Namespace) -> int:
    from mam.fhir.outbox import (
        FhirClient,
        InvalidFhirBundleError,
        InvalidFhirUrlError,
        Outbox,
        make_auth,
        result_id_of,
    )

    if not args.base_url:
        raise InvalidFhirUrlError("no FHIR server: give --base-url (or set MAM_FHIR_BASE_URL)")
    auth = make_auth(token_file=args.token_file, client_id=args.client_id,
                     token_url=args.token_url, client_secret_file=args.client_secret_file,
                     private_key_file=args.private_key, key_id=args.key_id,
                     scope=args.scope)  # fmt: skip
    client = FhirClient(args.base_url, auth, timeout_s=args.timeout)
    outbox = Outbox(args.outbox)
    try:
        queued = {"queued": 0, "duplicate": 0, "correction": 0, "no_subject": 0}
        if args.input is not None:
            for where, bundle in _bundles(args.input):
                try:
                    result_id_of(bundle)
                    if not has_subject(bundle):  # as the service: no patient, nothing to send
                        queued["no_subject"] += 1
                        continue
                    queued[outbox.enqueue(bundle)] += 1
                except InvalidFhirBundleError as e:
                    raise InvalidFhirBundleError(f"{where}: {e}") from None
        if outbox.counts()["pending"]:
            client.check_auth()  # wrong credentials fail now, with their fix
        sent = {"ok": 0, "retry": 0, "given_up": 0}
        end = time.time() + max(args.wait, 0.0)
        first = max(end, time.time() + args.timeout)  # one pass at least, even with --wait 0
        while True:
            for k, v in outbox.deliver(client, deadline=first).items():
                sent[k] += v
            first, due = end, outbox.next_due()
            if due is None or due >= end:
                break
            time.sleep(max(0.0, due - time.time()))
        counts = outbox.counts()
    finally:
        client.close()
        outbox.close()
    data = {"outbox": str(outbox.path), "enqueued": queued, "delivered": sent["ok"],
            "failed_attempts": sent["retry"], "given_up_now": sent["given_up"],
            "counts": counts}  # fmt: skip
    text = (
        f"queued {queued['queued']}, corrections {queued['correction']}, already known "
        f"{queued['duplicate']}, without a subject (not sent) {queued['no_subject']}; "
        f"delivered {sent['ok']}; outbox: {counts['pending']} pending, "
        f"{counts['given_up']} given up, {counts['delivered']} delivered ({outbox.path})"
    )
    _print(args, data, text)
    if counts["pending"] or counts["given_up"]:
        print("not everything was delivered: see mam fhir outbox status; pending entries are "
              "sent by the next mam fhir push", file=sys.stderr)  # fmt: skip
        return 1
    return 0


def run_outbox(args: argparse.Namespace) -> int:
    from mam.cli.options import UsageError
    from mam.fhir.outbox import Outbox

    outbox = Outbox(args.outbox)
    try:
        if args.action == "status":
            counts = outbox.counts()
            waiting = outbox.entries("pending") + outbox.entries("given_up")
            data = {"outbox": str(outbox.path), "counts": counts, "entries": waiting}
            lines = [f"{outbox.path}: {counts['pending']} pending, {counts['given_up']} given "
                     f"up, {counts['delivered']} delivered"]  # fmt: skip
            for e in waiting:
                when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(e["next_at"]))
                what = (f"given up ({e['reason']})" if e["state"] == "given_up"
                        else "pending, after an earlier entry of its result"
                        if e["waits_for_earlier"] else f"pending, next try {when} UTC")  # fmt: skip
                lines.append(f"  {e['result_id']}  {what}; {e['attempts']} attempt(s), last "
                             f"status {e['last_status'] or e['last_error'] or '-'}"
                             f"{', a correction' if e['correction'] else ''}")  # fmt: skip
            _print(args, data, "\n".join(lines))
            return 0
        if args.action == "retry":
            if (args.result_id is None) == (not args.all):
                raise UsageError("retry takes one result ID or --all")
            n = outbox.retry(args.result_id)
            _print(args, {"retried": n}, f"{n} entr{'y' if n == 1 else 'ies'} pending again; "
                   "mam fhir push --base-url URL sends them")  # fmt: skip
            return 0
        if args.result_id is None or args.all:
            raise UsageError("give-up takes one result ID")
        done = outbox.give_up(args.result_id)
        _print(args, {"given_up": int(done)},
               "given up (kept; mam fhir outbox retry ID sends it again)" if done
               else "not pending: nothing to give up")  # fmt: skip
        return 0
    finally:
        outbox.close()


def run_definitions(args: argparse.Namespace) -> int:
    from mam.fhir import FhirCodes
    from mam.fhir.definitions import definitions, definitions_bundle

    codes = FhirCodes.from_env()  # the site's canonical_base
    if args.format == "ndjson":
        print("\n".join(json.dumps(r) for r in definitions(codes)))
    else:
        print(json.dumps(definitions_bundle(codes), indent=2))
    return 0
