"""A site's weights packaged the BentoML way: an entry in BentoML's model store, and a bento that
serves exactly that entry (``mam build``).

The store entry ``NAME:VERSION`` holds what serving needs and nothing else: ``NAME.json`` (with
its tensors' and model digests recorded, so that the digest is the same without the ``.pt``),
its ONNX export (``NAME.onnx.json`` and the networks it names) and its model card
(``NAME.card.md``); the digest and the card are the entry's metadata and labels. The bento names
the entry under the alias ``SERVED_ALIAS``; the service asks the model store for that alias at
start-up (``packaged_weights``), which BentoML resolves to the entry the bento was built with,
in ``bentoml serve mam:<tag>`` (the local model store) as in the container (the bento's own).
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path

from mam.errors import InputError, ModelLoadError
from mam.settings import current

logger = logging.getLogger(__name__)

SERVED_ALIAS = "mam-served-weights"  # the bento's name for the weights it serves
REPO = Path(__file__).resolve().parent.parent
BENTOFILE = REPO / "bentofile.yaml"
# The shipped demo files stay out of a site's bento: it serves its own weights and card only.
DEMO_FILES = ("models/mam_demo*", "models/MODEL_CARD.md")


class ModelVersionTakenError(InputError):
    """The model store already holds these weights' ``name:version`` with another digest."""

    code = "model_version_taken"


class InvalidModelNameError(InputError):
    """The weights' name or version is not a valid BentoML tag part."""

    code = "invalid_model_name"


def packaged_weights() -> Path | None:
    """``NAME.json`` of the store entry the bento being served names (``SERVED_ALIAS``), or None
    when the service runs from a checkout (``mam serve``, ``bentoml serve service.app:...``)."""
    try:
        import bentoml
        from bentoml.exceptions import BentoMLException
    except ImportError:
        return None
    try:
        model = bentoml.models.get(SERVED_ALIAS)
    except (BentoMLException, ValueError, OSError):  # NotFound; an unusable model store
        return None
    name = (model.info.metadata or {}).get("weights")
    path = Path(model.path) / str(name)
    if not name or not path.is_file():
        raise ModelLoadError(f"model store entry {model.tag} holds no weights file {name!r}")
    return path


def served_weights(configured: Path) -> Path:
    """The weights the service loads: those of the bento being served (``packaged_weights``),
    unless ``MAM_WEIGHTS`` names others (an operator's explicit choice, logged); else
    ``configured`` (``MAM_WEIGHTS`` or the demo weights)."""
    packaged = packaged_weights()
    if packaged is None:
        return configured
    if current().weights is not None:
        logger.warning("MAM_WEIGHTS overrides the weights this bento was built with")
        return configured
    return packaged


def _tag_part(value: str, what: str) -> str:
    from bentoml._internal.tag import validate_tag_str

    try:
        validate_tag_str(value.lower())
    except ValueError as e:
        raise InvalidModelNameError(f"the weights' {what} {value!r} is not usable in a model tag "
                                    f"({e})") from None  # fmt: skip
    return value.lower()


def store_weights(weights: str | Path, card: str | Path | None = None):
    """Put ``weights`` (``NAME.json``, with a current ONNX export beside it) and their card into
    BentoML's model store as ``NAME:VERSION``; returns the store's ``Model``. The same weights
    again reuse their entry; other weights under a taken ``NAME:VERSION`` are refused."""
    import bentoml
    from bentoml.exceptions import NotFound

    from mam.model.card import card_path, find_card, is_demo
    from mam.model.weights import load_meta
    from mam.runtime.base import RuntimeUnavailable, load_manifest, manifest_path

    js = Path(weights).with_suffix(".json")
    meta, _, _ = load_meta(js)
    try:
        manifest, folder = load_manifest(js)
    except RuntimeUnavailable as e:
        raise ModelLoadError(f"{e} (the service runs the ONNX export of the weights)") from None
    tag = f"{_tag_part(meta.name, 'name')}:{_tag_part(meta.version, 'version')}"
    digest = meta.digest
    try:
        existing = bentoml.models.get(tag)
    except NotFound:
        existing = None
    if existing is not None:
        if existing.info.metadata.get("digest") == digest:
            logger.info("model store: %s already holds these weights", tag)
            return existing
        raise ModelVersionTakenError(
            f"the model store already holds {tag} with another digest "
            f"({str(existing.info.metadata.get('digest'))[:12]}, these are {digest[:12]}); "
            "give the weights a new version"
        )
    card = Path(card) if card is not None else find_card(js, meta.name)
    card_text = card.read_text(encoding="utf-8") if card is not None else None
    demo = is_demo(js, meta)
    d = json.loads(js.read_text())
    d["tensors_sha256"], d["model_digest"] = meta.tensors_sha256, digest
    labels = {"owner": "mam", "kind": "mam-weights", "stage": "demo-weights" if demo
              else "site-weights", "digest": digest[:63]}  # fmt: skip
    metadata = {
        "name": meta.name,
        "version": meta.version,
        "digest": digest,
        "weights": js.name,
        "weights_sha256": d.get("weights_sha256"),
        "demo": demo,
        "provenance_summary": str(meta.provenance.get("summary", "")),
        "card": card_text or "",
    }
    with bentoml.models.create(tag, labels=labels, metadata=metadata) as model:
        out = Path(model.path)
        (out / js.name).write_text(json.dumps(d, indent=2) + "\n")
        shutil.copy2(manifest_path(js), out / manifest_path(js).name)
        for net in manifest["networks"].values():
            shutil.copy2(folder / net["file"], out / net["file"])
        if card_text is not None:
            card_path(out / js.name).write_text(card_text, encoding="utf-8")
    logger.info("model store: saved %s (digest %s)", tag, digest[:12])
    return bentoml.models.get(tag)


def build_bento(weights: str | Path, card: str | Path | None = None,
                bentofile: str | Path = BENTOFILE):  # fmt: skip
    """``store_weights`` then ``bentoml build`` of ``bentofile`` with the entry as the served
    model and its digest in the bento's labels; returns ``(model, bento)``."""
    import bentoml
    import yaml

    model = store_weights(weights, card)
    md = model.info.metadata
    config = yaml.safe_load(Path(bentofile).read_text())
    config["models"] = [{"tag": str(model.tag), "alias": SERVED_ALIAS}]
    config["labels"] = {**(config.get("labels") or {}),
                        "stage": "demo-weights" if md.get("demo") else "site-weights",
                        "model": model.tag.name, "model_version": model.tag.version,
                        "model_digest": str(md["digest"])[:63]}  # fmt: skip
    config["exclude"] = [*(config.get("exclude") or []), *DEMO_FILES]
    with tempfile.TemporaryDirectory(prefix="mam-build-") as tmp:
        path = Path(tmp) / "bentofile.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        bento = bentoml.bentos.build_bentofile(str(path), build_ctx=str(REPO))
    return model, bento


def main(argv: list[str] | None = None) -> int:
    """``python -m service.packaging WEIGHTS [--card F] [--bentofile F]``: what ``mam build`` runs
    (``mam`` never imports ``service``). Its last line of output is JSON: the tags, or the error
    (code, message) for ``mam build`` to report as its own."""
    import argparse
    import sys

    from mam.errors import InputError, MamError

    p = argparse.ArgumentParser(prog="python -m service.packaging")
    p.add_argument("weights", type=Path)
    p.add_argument("--card", type=Path)
    p.add_argument("--bentofile", type=Path, default=BENTOFILE)
    p.add_argument("-v", "--verbose", action="store_true")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO if a.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")  # fmt: skip
    try:
        model, bento = build_bento(a.weights, a.card, a.bentofile)
    except MamError as e:
        print(json.dumps({"error": {"code": e.code, "message": str(e),
                                    "input": isinstance(e, InputError)}}))  # fmt: skip
        return 2 if isinstance(e, InputError) else 1
    md = model.info.metadata
    sys.stdout.flush()
    print(json.dumps({"model": str(model.tag), "digest": md["digest"],
                      "demo": bool(md.get("demo")), "bento": str(bento.tag)}))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
