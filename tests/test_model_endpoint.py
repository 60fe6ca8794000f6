"""What a served model says about itself: the model card beside the weights, the intended use and
training data of ``GET /model``, and ``mam serve``'s start-up line (the endpoint itself is tested
in-process in test_service.py and served in test_service_server.py and test_build.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from mam.model.card import card_section, find_card, is_demo, model_document
from mam.model.weights import load_meta, record_digest
from mam.screening import DEFAULT_WEIGHTS, Screener

SITE_CARD = """# Model card: `{name}` {version}

**Decision support only, not a diagnosis.**

## Intended use
Screening of term infants at the test site, reviewed by its GMA assessors.

## Model
A copy of the demo network.
"""


def site_copy(out: Path, name: str = "site_model", version: str = "1.0.0",
              threshold_shift: float = -0.05, card: bool = True) -> Path:  # fmt: skip
    """A site's weights: the demo network under another name and version, with other risk
    thresholds (so another digest), its ONNX export beside it and, with ``card``, its card."""
    src = DEFAULT_WEIGHTS.parent
    out.mkdir(parents=True, exist_ok=True)
    d = json.loads(DEFAULT_WEIGHTS.read_text())
    d["name"], d["version"] = name, version
    for cal in [d, *d.get("calibration_by_kind", {}).values()]:
        cal["risk_threshold"] = round(float(cal["risk_threshold"]) + threshold_shift, 6)
    d["provenance"] = {**d["provenance"], "summary": "a site's weights (a test copy)"}
    shutil.copy2(src / d["weights_file"], out / f"{name}.pt")
    d["weights_file"] = f"{name}.pt"
    js = out / f"{name}.json"
    js.write_text(json.dumps(d, indent=2))
    record_digest(js)  # as `mam train` records it
    manifest = json.loads((src / f"{DEFAULT_WEIGHTS.stem}.onnx.json").read_text())
    manifest["name"], manifest["weights"] = name, js.name
    for net in manifest["networks"].values():
        shutil.copy2(src / net["file"], out / net["file"])
    (out / f"{name}.onnx.json").write_text(json.dumps(manifest, indent=2))
    if card:
        (out / f"{name}.card.md").write_text(SITE_CARD.format(name=name, version=version))
    return js


def test_a_card_speaks_only_for_its_own_weights(tmp_path):
    js = site_copy(tmp_path / "a", card=False)
    assert find_card(js) is None
    folder = js.parent / "MODEL_CARD.md"
    folder.write_text(SITE_CARD.format(name="other_model", version="2"))
    assert find_card(js) is None  # a folder's card about other weights
    folder.write_text(SITE_CARD.format(name="site_model", version="1.0.0"))
    assert find_card(js) == folder
    own = js.with_name("site_model.card.md")
    own.write_text(SITE_CARD.format(name="site_model", version="1.0.0"))
    assert find_card(js) == own  # NAME.card.md first
    assert find_card(DEFAULT_WEIGHTS) == DEFAULT_WEIGHTS.parent / "MODEL_CARD.md"


def test_card_section_reads_up_to_the_next_heading():
    text = SITE_CARD.format(name="x", version="1")
    assert card_section(text, "intended use") == (
        "Screening of term infants at the test site, reviewed by its GMA assessors."
    )
    assert card_section(text, "Model") == "A copy of the demo network."
    assert card_section(text, "Evaluation") is None


def test_document_of_site_weights_with_and_without_a_card(tmp_path):
    js = site_copy(tmp_path / "site")
    sc = Screener(js)
    meta = load_meta(js)[0]
    doc = model_document(sc.model_identity(), find_card(js).read_text(), meta)
    demo = Screener().model_digest
    assert doc["digest"] == meta.digest != demo  # another threshold: another model
    assert (doc["name"], doc["version"], doc["demo"]) == ("site_model", "1.0.0", False)
    assert doc["intended_use"] == {
        "text": "Screening of term infants at the test site, reviewed by its GMA assessors.",
        "source": "model card",
    }
    assert doc["training_data"]["kinds_described"] == sorted(meta.domain.kinds)
    bare = model_document(sc.model_identity(), None, meta)
    assert bare["model_card"] is False and bare["intended_use"]["source"] == "provenance"
    assert "Not stated" in bare["intended_use"]["text"]
    assert json.loads(json.dumps(doc)) == doc  # served as JSON as it is


def test_demo_weights_are_recognised_also_renamed_copies_keep_it_only_by_name(tmp_path):
    assert is_demo(DEFAULT_WEIGHTS, load_meta(DEFAULT_WEIGHTS)[0])
    js = site_copy(tmp_path / "s")
    assert not is_demo(js, load_meta(js)[0])
    recal = site_copy(tmp_path / "r", name=DEFAULT_WEIGHTS.stem)
    assert is_demo(recal, load_meta(recal)[0])  # a recalibration of the demo network


def test_mam_serve_says_loudly_when_it_serves_the_demo_weights(tmp_path, capsys):
    from mam.cli.serve import announce_model

    announce_model(DEFAULT_WEIGHTS)
    err = capsys.readouterr().err
    assert "DEMO weights" in err and "NOT FOR CLINICAL USE" in err and "mam build" in err
    js = site_copy(tmp_path / "s")
    announce_model(js)
    err = capsys.readouterr().err
    assert "DEMO" not in err and "site_model 1.0.0" in err
    assert load_meta(js)[0].digest[:12] in err
