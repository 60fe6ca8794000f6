"""What a deployed model says about itself (``GET /model``, ``mam build``): its identity, what it
is for and what it was trained on, from the weights' metadata and the model card beside them.

A card belongs to weights when it is ``NAME.card.md`` beside ``NAME.json``, or a
``MODEL_CARD.md`` in the same folder whose title names them (``# Model card: `NAME` ...``, as
``mam evaluate --model-card`` writes it): a folder's card never speaks for other weights.
"""

from __future__ import annotations

import re
from pathlib import Path

from mam.model.weights import ModelMeta

CARD_SUFFIX = ".card.md"
FOLDER_CARD = "MODEL_CARD.md"
_TITLE = re.compile(r"^# Model card: `([^`]+)`")


def is_demo(weights: str | Path, meta: ModelMeta) -> bool:
    """The shipped demo weights (that file, or weights keeping its name, such as a
    recalibration of it: a network trained on simulated infants); as
    ``Screener.model_identity``'s ``demo``."""
    from mam.screening import DEFAULT_WEIGHTS

    js = Path(weights).with_suffix(".json")
    return js.resolve() == DEFAULT_WEIGHTS.resolve() or meta.name == DEFAULT_WEIGHTS.stem


def card_path(weights: str | Path) -> Path:
    """Where the card of ``weights`` goes: ``NAME.card.md`` beside ``NAME.json``."""
    js = Path(weights).with_suffix(".json")
    return js.with_name(js.stem + CARD_SUFFIX)


def find_card(weights: str | Path, name: str | None = None) -> Path | None:
    """The model card of ``weights`` (module docstring), or None. ``name``: the model's name
    (default: the file's stem)."""
    js = Path(weights).with_suffix(".json")
    own = card_path(js)
    if own.is_file():
        return own
    folder = js.parent / FOLDER_CARD
    if folder.is_file():
        with open(folder, encoding="utf-8", errors="replace") as f:
            m = _TITLE.match(f.readline())
        if m and m.group(1) in {name or js.stem, js.stem}:
            return folder
    return None


def card_section(text: str, title: str) -> str | None:
    """The text of the card's ``## title`` section (up to the next ``##``), or None."""
    out: list[str] | None = None
    for line in text.splitlines():
        if line.startswith("## "):
            if out is not None:
                break
            if line[3:].strip().lower() == title.lower():
                out = []
        elif out is not None:
            out.append(line)
    if out is None:
        return None
    return "\n".join(out).strip() or None


def training_data(meta: ModelMeta) -> dict:
    """What the weights were trained on, as their provenance declares it: simulated infants,
    recordings or both, how many, the named sets, and the source kinds the domain check
    describes (recordings of other kinds are answered indeterminate)."""
    from mam.training.model_card import declared_data

    prov = meta.provenance or {}
    declared, counts = declared_data(prov)
    domain = prov.get("domain") if isinstance(prov.get("domain"), dict) else {}
    return {
        "declared": declared,
        "simulated": (counts or {}).get("simulated"),
        "recordings": (counts or {}).get("recordings"),
        "infants": prov.get("infants"),
        "sets": prov.get("data"),
        "kinds_described": sorted(meta.domain.kinds) if meta.domain is not None else [],
        "kinds": domain.get("coverage"),
    }


def intended_use(meta: ModelMeta, card_text: str | None) -> dict:
    """``{"text", "source"}``: the card's Intended use section where there is a card, else
    what the provenance implies (simulated infants: demonstration only)."""
    from mam.training.model_card import DEMO_USE, SITE_USE, declared_data

    if card_text:
        text = card_section(card_text, "Intended use")
        if text:
            return {"text": text, "source": "model card"}
    kind, _ = declared_data(meta.provenance or {})
    if kind == "simulated":
        return {"text": DEMO_USE, "source": "provenance"}
    summary = (meta.provenance or {}).get("summary")
    said = f"{summary}. " if summary else ""
    return {"text": f"{said}Not stated (no model card beside the weights). {SITE_USE}",
            "source": "provenance"}  # fmt: skip


def model_document(identity: dict, card_text: str | None, meta: ModelMeta) -> dict:
    """The body of ``GET /model``: ``Screener.model_identity()`` (name, version, digest,
    provenance without data digests, demo, runtime) with the intended use, the training data
    and whether a model card came with the weights."""
    return {
        **identity,
        "intended_use": intended_use(meta, card_text),
        "training_data": training_data(meta),
        "model_card": card_text is not None,
    }
