"""``mam build``: a bento that serves exactly the given weights.

The weights go into BentoML's model store as ``NAME:VERSION`` (with their digest and card) and
``bentoml build`` makes the bento from ``bentofile.yaml`` with that entry as its served model
(``service/packaging.py``); ``bentoml serve mam:<tag>`` and ``bentoml containerize mam:<tag>``
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
    sys.path.insert(0, str(root))
    from mam.screening import default_weights
    from service.packaging import BENTOFILE, build_bento

    weights = (args.weights or default_weights()).resolve()
    model, bento = build_bento(weights, args.card, (args.bentofile or BENTOFILE).resolve())
    md = model.info.metadata
    print(f"model store: {model.tag} (digest {md['digest']}"
          + (", DEMO weights" if md.get("demo") else "") + ")")  # fmt: skip
    print(f"bento: {bento.tag}")
    print(f"serve: bentoml serve {bento.tag}")
    print(f"image: bentoml containerize {bento.tag}")
    return 0
