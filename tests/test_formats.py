"""One registry of output formats (``mam.formats``) behind ``mam screen --format``, the service's
``?format=`` / ``Accept`` negotiation and batch; one module of presentation helpers
(``mam.presentation``); and ``mam`` standing on its own: nothing in it imports ``service``."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import pytest

from mam import formats
from mam.cli import main, parse
from mam.presentation import mmss, mmss_tenths, probability

REPO = Path(__file__).resolve().parent.parent
TOY = "toy-csv"


def _toy_line(result) -> str:
    return f"{result.classification.label},{result.risk_probability:.4f},{len(result.clips)}"


@pytest.fixture
def toy():
    """A format added the way the README shows: one registry entry."""
    fmt = formats.register(
        formats.OutputFormat(TOY, "text/csv", lambda r, ctx: _toy_line(r), help="a toy line")
    )
    try:
        yield fmt
    finally:
        formats.unregister(TOY)


@pytest.fixture(scope="module")
def pose_file(tmp_path_factory) -> Path:
    from mam.synth.motion import simulate_infant

    sim = simulate_infant(np.random.default_rng(3), "f3", "absent", 40.0)
    path = tmp_path_factory.mktemp("formats") / "pose.npy"
    np.save(path, np.nan_to_num(sim.clean_joints).astype(np.float32))
    return path


@pytest.fixture(scope="module")
def result_json(pose_file) -> str:
    from mam.screening import Screener

    return Screener().screen_pose_file(pose_file).model_dump_json()


def test_the_documented_formats_are_registered():
    assert formats.names()[:4] == ["text", "json", "fhir", "dicom-sr"]
    assert [f.name for f in formats.formats() if f.binary] == ["dicom-sr"]
    assert formats.get("fhir").media_type == "application/fhir+json"
    assert formats.get("dicom-sr").media_type == "application/dicom"
    # The tensor route's result has no text or SR rendering: never offered for it.
    assert {f.name for f in formats.formats("instances")} == {"json", "fhir"}
    with pytest.raises(ValueError, match="already registered"):
        formats.register(formats.OutputFormat("json", "application/json", formats.text))


def test_a_registered_format_is_offered_by_mam_screen(toy, pose_file, result_json, capsys):
    from mam.schemas import ScreeningResult

    assert parse(["screen", "--pose", str(pose_file), "--format", TOY]).format == TOY
    with pytest.raises(SystemExit):
        parse(["screen", "--help"])
    assert TOY in capsys.readouterr().out
    assert main(["screen", "--pose", str(pose_file), "--format", TOY]) == 0
    want = _toy_line(ScreeningResult.model_validate_json(result_json))
    assert capsys.readouterr().out == want + "\n"
    # Options a format does not read are refused with it, as for the built-in ones.
    argv = ["screen", "--pose", str(pose_file), "--format", TOY, "--fhir-subject", "Patient/1"]
    assert main(argv) == 2
    assert "only with --format fhir" in capsys.readouterr().err
    formats.unregister(TOY)
    with pytest.raises(SystemExit):
        parse(["screen", "--pose", str(pose_file), "--format", TOY])


def test_the_service_negotiates_from_the_registry(toy, result_json, prometheus_dir, monkeypatch):
    """The service's middleware in front of an app that answers a result as JSON, as BentoML
    does: ``?format=NAME`` or the format's media type in Accept gives that format."""
    from starlette.testclient import TestClient

    # The service's metrics are made once per process, where this points (as the other
    # in-process services of the session expect).
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(prometheus_dir))

    from mam.schemas import ScreeningResult
    from service.middleware import ServiceMiddleware

    body = result_json.encode()

    async def app(scope, receive, send):
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})  # fmt: skip
        await send({"type": "http.response.body", "body": body})

    client = TestClient(ServiceMiddleware(app, frozenset(), True, 2**20))
    files = {"pose": ("p.npy", b"x", "application/octet-stream")}

    def post(**kw):
        return client.post("/screen_pose", files=files, **kw)

    want = _toy_line(ScreeningResult.model_validate_json(result_json))
    for how in ({"params": {"format": TOY}}, {"headers": {"Accept": "text/csv"}},
                {"headers": {"Accept": "application/json;q=0.5, text/csv"}}):  # fmt: skip
        r = post(**how)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv"), how
        assert r.text == want
    for how in ({}, {"params": {"format": "json"}, "headers": {"Accept": "text/csv"}},
                {"params": {"format": "nonesuch"}},
                {"headers": {"Accept": "application/json, text/csv, */*"}}):  # fmt: skip
        r = post(**how)
        assert r.headers["content-type"] == "application/json", how
        assert json.loads(r.text) == json.loads(result_json)
    fhir = post(headers={"Accept": "application/fhir+json"})
    assert fhir.headers["content-type"] == "application/fhir+json"
    assert fhir.json()["resourceType"] == "Bundle"
    sr = post(params={"format": "dicom-sr"})  # a binary format: bytes as they are
    assert sr.headers["content-type"] == "application/dicom" and sr.content[128:132] == b"DICM"
    text = post(params={"format": "text"})
    assert text.headers["content-type"].startswith("text/plain")
    assert text.text == formats.text(ScreeningResult.model_validate_json(result_json))


def test_negotiation_rules():
    def pick(query=None, accept=None, kind="screening"):
        return formats.negotiate(query, accept, kind).name

    assert pick() == "json" and pick(accept="*/*") == "json"
    assert pick("FHIR") == "fhir" and pick("fhir", "application/json") == "fhir"
    assert pick(accept="application/fhir+json") == "fhir"
    assert pick(accept="application/fhir+json;q=0.2, application/json") == "json"
    assert pick(accept="application/fhir+json;q=0") == "json"
    assert pick("text", kind="instances") == "json"  # not offered for the tensor route
    assert pick(accept="application/dicom") == "dicom-sr"


def test_presentation_helpers():
    assert [probability(x) for x in (0.0, 0.0004, 0.0005, 0.5, 0.9995, 0.9996, 1.0)] == [
        "<0.001", "<0.001", "0.001", "0.500", ">0.999", ">0.999", ">0.999"]  # fmt: skip
    assert probability(None) == ""
    assert (mmss(0), mmss(59.99), mmss(60), mmss(3599.2), mmss(3600)) == (
        "00:00", "00:59", "01:00", "59:59", "1:00:00")  # fmt: skip
    assert (mmss(9.6, up=True), mmss(10.0, up=True), mmss(-3)) == ("00:10", "00:10", "00:00")
    assert mmss_tenths(65.25) == "01:05.2"


def test_the_text_format_shows_probabilities_through_the_presentation_helper(result_json):
    from mam.schemas import ScreeningResult

    r = ScreeningResult.model_validate_json(result_json)
    tiny = r.model_copy(update={"risk_probability": 0.0001})
    out = formats.get("text").render(tiny, formats.RenderContext("r"))
    assert "P(risk):           <0.001" in out and "0.000" not in out.split("\n")[1]


def test_nothing_under_mam_imports_service():
    """``service`` depends on ``mam``, never the reverse (``mam serve`` / ``mam build`` start the
    service by module name in another process)."""
    found = []
    for path in sorted((REPO / "mam").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            elif isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "import_module":
                names = [a.value for a in node.args if isinstance(a, ast.Constant)]
            found += [f"{path.relative_to(REPO)}: {n}" for n in names
                      if n == "service" or str(n).startswith("service.")]  # fmt: skip
    assert not found, found


def test_mam_serve_hash_key_needs_no_service(capsys):
    from mam.audit import key_digest

    assert main(["serve", "--hash-key", "s3cret"]) == 0
    assert capsys.readouterr().out.strip() == key_digest("s3cret") != "s3cret"
