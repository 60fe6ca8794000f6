"""``mam build``: a bento that serves exactly the given weights.

The weights go into BentoML's model store as ``NAME:VERSION`` (with their digest and card) and
``bentoml build`` makes the bento from ``bentofile.yaml`` with that entry as its served model
(``service/packaging.py``, run as ``python -m service.packaging`` in a child process: ``mam``
never imports ``service``); ``bentoml serve mam:<tag>`` and ``bentoml containerize mam:<tag>``
then serve those weights, with their card, and ``GET /model`` names their digest.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mam.cli import options as O


def register(sub) -> None:
    s = sub.add_parser("build", help="package weights into a bento (BentoML model store + build)")
    O.add_verbose(s)
    O.add_weights(s)
    s.add_argument("--card", type=Path, metavar="FILE",
                   help="the weights' model card (default: NAME.card.md beside NAME.json, or a "
                   "MODEL_CARD.md there whose title names the weights)")  # fmt: skip
    s.add_argument("--bentofile", type=Path, metavar="FILE",
                   help="the build options (default: bentofile.yaml; the GPU image: "
                   "k8s/image/bentofile.gpu.yaml)")  # fmt: skip
    s.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    root = Path(__file__).resolve().parents[2]
    if not (root / "service" / "packaging.py").is_file():
        raise O.UsageError("the service/ folder is not beside mam/ (run from a checkout)")
    for flag, path in (("--card", args.card), ("--bentofile", args.bentofile)):
        if path is not None and not path.is_file():
            raise O.UsageError(f"{flag} {path}: no such file")
    from mam.screening import default_weights

    weights = (args.weights or default_weights()).resolve()
    out = package(root, weights, args.card, args.bentofile, args.verbose)
    print(f"model store: {out['model']} (digest {out['digest']}"
          + (", DEMO weights" if out["demo"] else "") + ")")  # fmt: skip
    print(f"bento: {out['bento']}")
    print(f"serve: bentoml serve {out['bento']}")
    print(f"image: bentoml containerize {out['bento']}")
    return 0


def package(root: Path, weights: Path, card: Path | None, bentofile: Path | None,
            verbose: bool = False) -> dict:  # fmt: skip
    """Run the service's packaging (``python -m service.packaging``) in a child process, named
    by module: ``mam`` never imports ``service``. Returns its summary (the tags); its error is
    raised here as the same ``MamError`` code."""
    import json
    import subprocess

    from mam.errors import InputError, MamError

    cmd = [sys.executable, "-m", "service.packaging", str(weights)]
    cmd += ["--card", str(card.resolve())] if card is not None else []
    cmd += ["--bentofile", str(bentofile.resolve())] if bentofile is not None else []
    cmd += ["--verbose"] if verbose else []
    r = subprocess.run(cmd, cwd=root, stdout=subprocess.PIPE, text=True)
    lines = r.stdout.splitlines()
    for line in lines[:-1]:  # whatever BentoML printed on the way
        print(line)
    try:
        out = json.loads(lines[-1]) if lines else {}
    except ValueError:
        out = {}
    if "error" in out:
        e = out["error"]
        err = (InputError if e.get("input") else MamError)(str(e.get("message", "")))
        err.code = str(e.get("code", err.code))
        raise err
    if r.returncode != 0 or "bento" not in out:
        raise MamError(f"the bento could not be built (python -m service.packaging exited "
                       f"with {r.returncode}; its messages are above)")  # fmt: skip
    return out
