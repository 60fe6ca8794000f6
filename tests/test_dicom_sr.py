"""The DICOM Comprehensive SR of a result (``mam.dicom_sr``): read back with highdicom, checked
with DCMTK's ``dsrdump``, stored over DICOMweb STOW-RS to a real PACS (Debian's Orthanc with its
DICOMweb plugin, started here on loopback; installed with apt-get when missing, skipped with the
reason only where that is impossible), and written by ``mam screen`` and ``mam batch``."""

from __future__ import annotations

import io
import json
import logging
import shutil
import socket
import subprocess
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("highdicom")
import highdicom as hd  # noqa: E402
import httpx  # noqa: E402
from pydicom.sr.codedict import codes  # noqa: E402

from mam import DISCLAIMER  # noqa: E402
from mam.cli import main  # noqa: E402
from mam.dicom_sr import CODES, PRIVATE_SCHEME, build_sr, read_source, sr_bytes  # noqa: E402
from mam.pose.precomputed import validate_pose_array  # noqa: E402
from mam.screening import Screener  # noqa: E402
from mam.video import iter_frames  # noqa: E402
from tests.dicom_media import ACCESSION, PATIENT_ID, write_dicom_video  # noqa: E402
from tests.media import write_video  # noqa: E402
from tests.review_helpers import _apt_install  # noqa: E402
from tests.service_helpers import simulated  # noqa: E402

STUDY, SERIES = "1.2.826.0.1.3680043.8.498.2001", "1.2.826.0.1.3680043.8.498.2002"
REAL_STUDY, REAL_SERIES = "1.2.826.0.1.3680043.8.498.2003", "1.2.826.0.1.3680043.8.498.2004"
DEMO = "demo/infant_demo.mp4"
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


@pytest.fixture(scope="module")
def poses(tmp_path_factory) -> Path:
    _, joints, _ = simulated("sporadic", 3)
    path = tmp_path_factory.mktemp("sr") / "infant.npy"
    np.save(path, np.asarray(joints, np.float32))
    return path


@pytest.fixture(scope="module")
def results(poses):
    """A real result of the pipeline, as a usable risk result and as an indeterminate one (the
    shipped demo weights' answers are not for tests to fix: what differs is set)."""
    r = Screener().screen_pose(validate_pose_array(np.load(poses)), None)
    c = r.classification
    risk = r.model_copy(update={
        "classification": c.model_copy(update={"label": "risk", "model_label": "risk",
                                               "reasons": []}),
        "probabilities_usable": True, "risk_probability": 0.8123, "fms_category": "sporadic",
    })  # fmt: skip
    indeterminate = r.model_copy(update={
        "classification": c.model_copy(update={"label": "indeterminate",
                                               "reasons": ["out of the training domain"]}),
        "probabilities_usable": False, "fms_category": "indeterminate",
    })  # fmt: skip
    return {"risk": risk, "indeterminate": indeterminate}


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> Path:
    """A DICOM video object as a PACS holds one (a few bytes of stream: it is never decoded)."""
    d = tmp_path_factory.mktemp("video")
    return write_dicom_video(d / "IM0001", b"\x00\x00\x00\x01" * 64, frames=10,
                             study_uid=STUDY, series_uid=SERIES)  # fmt: skip


def items(doc, name=None):
    """Every content item of the SR document tree (depth first), or those named ``name``."""
    out, stack = [], list(doc.ContentSequence)
    while stack:
        it = stack.pop(0)
        out.append(it)
        stack[:0] = list(getattr(it, "ContentSequence", []))
    if name is None:
        return out
    return [it for it in out if it.ConceptNameCodeSequence[0].CodeMeaning == name]


def meaning(key: str) -> str:
    return CODES[key][1]


def num(item) -> float:
    return float(item.MeasuredValueSequence[0].NumericValue)


def test_the_sr_carries_the_result_its_model_and_the_disclaimer(results):
    r = results["risk"]
    doc = read(sr_bytes(r, "result-1"))
    assert isinstance(doc, hd.sr.ComprehensiveSR)
    report = doc.content
    assert report[0].ContentTemplateSequence[0].TemplateIdentifier == "1500"
    (p,) = items(doc, meaning("risk_probability"))
    assert num(p) == pytest.approx(r.risk_probability, abs=1e-4)
    (f,) = items(doc, meaning("fms_frequency"))
    assert num(f) == pytest.approx(r.fms_frequency, abs=1e-4)
    # One group per clip: P(FMs) and the clip's time range, in seconds.
    clips = items(doc, meaning("fms_probability"))
    assert [num(i) for i in clips] == pytest.approx([c.fms_probability for c in r.clips], abs=1e-4)
    starts, ends = items(doc, meaning("clip_start")), items(doc, meaning("clip_end"))
    assert [num(a) for a in starts] == pytest.approx([c.start_s for c in r.clips], abs=1e-3)
    assert [num(b) for b in ends] == pytest.approx([c.end_s for c in r.clips], abs=1e-3)
    assert ends[0].MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0].CodeValue == "s"
    (cls,) = items(doc, meaning("classification"))
    assert cls.ConceptCodeSequence[0].CodeValue == CODES["risk"][0]
    (disclaimer,) = items(doc, "Comment")
    assert disclaimer.TextValue == DISCLAIMER
    params = [i.TextValue for i in items(doc, "Algorithm Parameters")]
    assert f"model digest {r.model.digest}" in params
    assert {i.TextValue for i in items(doc, "Algorithm Version")} == {r.model.version}
    assert any(s.CodingSchemeDesignator == PRIVATE_SCHEME
               for s in doc.CodingSchemeIdentificationSequence)  # fmt: skip
    assert doc.PreliminaryFlag == "PRELIMINARY" and doc.VerificationFlag == "UNVERIFIED"
    # Without a source the SR opens its own study and names no evidence.
    assert "CurrentRequestedProcedureEvidenceSequence" not in doc
    assert doc.StudyInstanceUID != STUDY and doc.PatientID == ""
    again = read(sr_bytes(r, "result-1"))
    other = read(sr_bytes(r, "result-2"))
    assert again.SOPInstanceUID == doc.SOPInstanceUID != other.SOPInstanceUID


def test_an_indeterminate_result_gives_its_reason_and_no_numbers(results):
    r = results["indeterminate"]
    doc = build_sr(r, "result-3")
    assert not items(doc, meaning("risk_probability"))
    assert not items(doc, meaning("fms_probability"))
    (cls,) = items(doc, meaning("classification"))
    assert cls.ConceptCodeSequence[0].CodeValue == codes.SCT.Indeterminate.value
    assert [i.TextValue for i in items(doc, meaning("reason"))] == r.classification.reasons


def test_the_sr_joins_the_source_videos_study(results, video):
    source = read_source(video)
    doc = build_sr(results["risk"], "result-4", source)
    assert doc.StudyInstanceUID == STUDY and doc.SeriesInstanceUID != SERIES
    assert doc.PatientID == PATIENT_ID and doc.AccessionNumber == ACCESSION
    (ev,) = doc.CurrentRequestedProcedureEvidenceSequence
    assert (
        ev.StudyInstanceUID == STUDY and ev.ReferencedSeriesSequence[0].SeriesInstanceUID == SERIES
    )
    sop = ev.ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert sop.ReferencedSOPInstanceUID == source.sop_instance_uid
    refs = [i for i in items(doc) if i.ValueType == "IMAGE"]
    assert [i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for i in refs] == [
        source.sop_instance_uid]  # fmt: skip


def read(data: bytes):
    """The SR from its file's bytes, through highdicom's reader."""
    return hd.sr.srread(io.BytesIO(data))


def _dsrdump(path: Path) -> str:
    if shutil.which("dsrdump") is None:
        why = _apt_install("dcmtk")
        if shutil.which("dsrdump") is None:
            pytest.skip(f"no DCMTK dsrdump: {why or 'installed, but not on PATH'}")
    p = subprocess.run(["dsrdump", "+Pl", str(path)], capture_output=True, text=True,
                       timeout=60)  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert not [line for line in p.stderr.splitlines() if line.startswith(("W:", "E:", "F:"))]
    return p.stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    """Orthanc with its DICOMweb plugin on loopback ports; its REST root URL."""
    if shutil.which("Orthanc") is None or not DICOMWEB_PLUGIN.exists():
        why = _apt_install("orthanc", "orthanc-dicomweb")
        if shutil.which("Orthanc") is None or not DICOMWEB_PLUGIN.exists():
            pytest.skip(f"no Orthanc with DICOMweb: {why or 'installed, but not found'}")
    d = tmp_path_factory.mktemp("orthanc")
    http = _free_port()
    config = {
        "Name": "mam-test", "StorageDirectory": str(d / "db"), "IndexDirectory": str(d / "db"),
        "HttpPort": http, "DicomPort": _free_port(), "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False, "Plugins": [str(DICOMWEB_PLUGIN)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
    }  # fmt: skip
    (d / "orthanc.json").write_text(json.dumps(config))
    log = open(d / "log.txt", "wb")
    proc = subprocess.Popen(["Orthanc", str(d / "orthanc.json")], stdout=log, stderr=log)
    base = f"http://127.0.0.1:{http}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(base + "/system", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail("Orthanc did not start: " + (d / "log.txt").read_text()[-500:])
            time.sleep(0.2)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def stow(base: str, *files: bytes) -> dict:
    """STOW-RS: the files as one multipart/related request; the response (DICOM JSON)."""
    boundary = uuid.uuid4().hex
    dash = b"--" + boundary.encode()
    head = dash + b"\r\nContent-Type: application/dicom\r\n\r\n"
    body = b"".join(head + f + b"\r\n" for f in files) + dash + b"--\r\n"
    r = httpx.post(base + "/dicom-web/studies", content=body, timeout=30, headers={
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
        "Accept": "application/dicom+json",
    })  # fmt: skip
    assert r.status_code == 200, r.text
    return r.json()


def test_mam_screen_writes_an_sr_that_a_pacs_stores_and_dcmtk_reads(
    results, poses, video, orthanc, tmp_path, capsys
):
    # The CLI: binary output only to a file, never to stdout.
    assert main(["screen", "--pose", str(poses), "--format", "dicom-sr"]) == 2
    assert "--out" in capsys.readouterr().err
    out = tmp_path / "result.dcm"
    assert main(["screen", "--pose", str(poses), "--format", "dicom-sr", "--out", str(out),
                 "-q"]) == 0  # fmt: skip
    assert capsys.readouterr().out == ""
    cli = hd.sr.srread(out)
    assert items(cli, meaning("classification")) and cli.StudyInstanceUID != STUDY

    # The SR of the video's result, stored beside the video in the PACS over STOW-RS.
    sr = tmp_path / "video.dcm"
    sr.write_bytes(sr_bytes(results["risk"], "result-5", read_source(video)))
    sop = hd.sr.srread(sr).SOPInstanceUID
    stored = stow(orthanc, video.read_bytes(), sr.read_bytes())
    assert len(stored.get("00081199", {}).get("Value", [])) == 2, stored.keys()  # both stored
    assert not stored.get("00081198", {}).get("Value")  # none failed
    # QIDO-RS: one study, the video's series and the SR's.
    series = httpx.get(f"{orthanc}/dicom-web/studies/{STUDY}/series", timeout=10).json()
    modalities = sorted(s["00080060"]["Value"][0] for s in series)
    assert modalities == ["SR", "XC"]
    # Read back through Orthanc's REST API, then DCMTK and highdicom on what the PACS holds.
    found = httpx.post(f"{orthanc}/tools/find", timeout=10, json={
        "Level": "Instance", "Query": {"SOPInstanceUID": sop}}).json()  # fmt: skip
    assert len(found) == 1
    back = tmp_path / "back.dcm"
    back.write_bytes(httpx.get(f"{orthanc}/instances/{found[0]}/file", timeout=10).content)
    dump = _dsrdump(back)
    for text in ("Comprehensive SR Document", "Imaging Measurement Report",
                 meaning("risk_probability"), meaning("fms_probability"), "Algorithm Version",
                 f"model digest {results['risk'].model.digest}", DISCLAIMER):  # fmt: skip
        assert text in dump, text
    doc = hd.sr.srread(back)
    assert doc.StudyInstanceUID == STUDY and doc.AccessionNumber == ACCESSION
    evidence = doc.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert evidence.SeriesInstanceUID == SERIES
    assert evidence.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == read_source(
        video).sop_instance_uid  # fmt: skip
    groups = doc.content.get_image_measurement_groups()
    assert len(groups) == 1 + len(results["risk"].clips)


def test_mam_batch_writes_one_sr_per_result_named_by_its_result_id(poses, video, tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    shutil.copy(poses, src / "a.npy")
    shutil.copy(video, src / "IM0001")  # a stream that does not decode: fails, so no SR
    argv = ["batch", str(src), "--out", str(out), "--workers", "1", "-q", "--dicom-sr"]
    assert main(argv) == 0
    written = sorted((out / "sr").glob("*.dcm"))
    assert len(written) == 1
    bundle = json.loads((out / "results.fhir.ndjson").read_text().splitlines()[0])
    report = next(e["resource"] for e in bundle["entry"]
                  if e["resource"]["resourceType"] == "DiagnosticReport")  # fmt: skip
    assert written[0].stem in {i["value"] for i in report["identifier"]}
    doc = hd.sr.srread(written[0])
    assert [i.TextValue for i in items(doc, "Comment")] == [DISCLAIMER]


def test_batch_srs_are_written_with_the_outputs_and_only_when_their_result_changed(poses, tmp_path):
    """The SRs are one more output of the outputs writer's pass (``write_outputs``), resumable as
    the rest: a rerun leaves an SR of an unchanged result as it is (same inode, same mtime), a
    result changed in the ledger replaces its SR (a new file, by rename) with the new content."""
    from mam import batch
    from mam.batch.ledger import Ledger

    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    shutil.copy(poses, src / "a.npy")
    argv = ["batch", str(src), "--out", str(out), "--workers", "1", "-q", "--dicom-sr"]
    assert main(argv) == 0
    (sr,) = (out / "sr").glob("*.dcm")
    first = sr.stat()
    time.sleep(0.05)  # an mtime a rewrite would change, even on a coarse clock
    assert main(argv) == 0  # resumed: nothing screened, every output rebuilt
    again = sr.stat()
    assert (again.st_ino, again.st_mtime_ns) == (first.st_ino, first.st_mtime_ns)

    sr.unlink()  # the library's outputs writer alone writes it again, as it was
    batch.write_outputs(out, dicom_sr=True)
    rebuilt = sr.stat()
    assert rebuilt.st_size == first.st_size
    batch.write_outputs(out)  # without dicom_sr: no SR written, a current one left as it is
    assert sr.stat().st_ino == rebuilt.st_ino

    ledger = Ledger(out / "ledger.sqlite")
    try:
        (row,) = ledger.rows()
        result = json.loads(row["result"])
        result["warnings"] = [*result["warnings"], "changed after the first run"]
        ledger.finish(row["key"], row["sha256"], "pose", "done", result=json.dumps(result))
    finally:
        ledger.close()
    before = sr.stat()
    assert main(argv) == 0
    after = sr.stat()
    assert after.st_ino != before.st_ino  # replaced by rename, never written in place
    assert list((out / "sr").glob("*.dcm")) == [sr]  # the same result id: the same name
    warnings = [i.TextValue for i in items(hd.sr.srread(sr), meaning("warning"))]
    assert "changed after the first run" in warnings


def test_mam_screen_files_the_sr_of_a_dicom_video_in_its_study(orthanc, tmp_path, capsys, caplog):
    """End to end: a DICOM video of the demo (10 s) screened by the CLI, its SR stored with the
    video over STOW-RS; the PACS files both under one study, the SR pointing at the video."""
    frames = list(iter_frames(DEMO, end_s=10, max_side=320))
    mp4 = write_video(tmp_path / "clip.mp4", frames, fps=25, codec="libx264")
    dcm = write_dicom_video(tmp_path / "IM0002", mp4, size=frames[0].shape[1::-1],
                            frames=len(frames), study_uid=REAL_STUDY,
                            series_uid=REAL_SERIES)  # fmt: skip
    out = tmp_path / "sr.dcm"
    argv = ["screen", str(dcm), "--format", "dicom-sr", "--echo-dicom-uids", "--out", str(out)]
    with caplog.at_level(logging.DEBUG):
        assert main(argv + ["-q", "-v"]) == 0
    assert capsys.readouterr().out == ""
    for secret in (PATIENT_ID, ACCESSION, REAL_STUDY, REAL_SERIES):  # copied, never logged
        assert secret not in caplog.text
    stored = stow(orthanc, dcm.read_bytes(), out.read_bytes())
    assert len(stored["00081199"]["Value"]) == 2
    series = httpx.get(f"{orthanc}/dicom-web/studies/{REAL_STUDY}/series", timeout=10).json()
    assert sorted(s["00080060"]["Value"][0] for s in series) == ["SR", "XC"]
    sr_series = next(s["0020000E"]["Value"][0] for s in series if s["00080060"]["Value"] == ["SR"])
    instances = httpx.get(f"{orthanc}/dicom-web/studies/{REAL_STUDY}/series/{sr_series}/instances",
                          timeout=10).json()  # fmt: skip
    (sop,) = [i["00080018"]["Value"][0] for i in instances]
    # WADO-RS: the stored SR back as a multipart/related part.
    r = httpx.get(f"{orthanc}/dicom-web/studies/{REAL_STUDY}/series/{sr_series}/instances/{sop}",
                  headers={"Accept": 'multipart/related; type="application/dicom"'},
                  timeout=10)  # fmt: skip
    assert r.status_code == 200
    back = tmp_path / "back.dcm"
    back.write_bytes(_only_part(r))
    dump = _dsrdump(back)
    assert meaning("classification") in dump and DISCLAIMER in dump
    doc = hd.sr.srread(back)
    assert doc.StudyInstanceUID == REAL_STUDY and doc.PatientID == PATIENT_ID
    assert doc.AccessionNumber == ACCESSION
    ref = doc.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert ref.SeriesInstanceUID == REAL_SERIES
    assert (
        ref.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == read_source(dcm).sop_instance_uid
    )


def _only_part(response: httpx.Response) -> bytes:
    """The body of the single part of a multipart/related response."""
    boundary = response.headers["content-type"].split("boundary=")[1].split(";")[0].strip('"')
    parts = [p for p in response.content.split(b"--" + boundary.encode()) if p.strip(b"-\r\n")]
    assert len(parts) == 1
    body = parts[0].split(b"\r\n\r\n", 1)[1]
    return body[:-2] if body.endswith(b"\r\n") else body


def _result_ids(out: Path) -> set[str]:
    """The result ids of the current results: their FHIR Bundles' (one per line)."""
    ids = set()
    for line in (out / "results.fhir.ndjson").read_text().splitlines():
        report = next(e["resource"] for e in json.loads(line)["entry"]
                      if e["resource"]["resourceType"] == "DiagnosticReport")  # fmt: skip
        ids |= {i["value"] for i in report["identifier"] if "value" in i}
    return ids


def test_a_superseded_results_sr_leaves_the_sr_folder_and_is_never_stored(poses, tmp_path):
    """Screened again with other weights, a recording has a new result id: its old SR names a
    superseded result and is removed, so ``sr/`` (what ``mam dicom store OUT`` sends) holds the
    current results' SRs only. Files not named as the writer names its SRs are never touched, and
    the ledger rebuilds an old SR, the same bytes, when the old weights are current again."""
    from mam import batch
    from mam.dicom_stow import dicom_files
    from mam.screening import DEFAULT_WEIGHTS

    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    for name in ("a.npy", "b.npy"):
        shutil.copy(poses, src / name)
    argv = ["batch", str(src), "--out", str(out), "--workers", "1", "-q", "--dicom-sr"]
    assert main(argv) == 0
    first = {f.name: f.read_bytes() for f in (out / "sr").glob("*.dcm")}
    assert {n.removesuffix(".dcm") for n in first} == _result_ids(out) and len(first) == 2
    theirs = [out / "sr" / "site_copy.dcm", out / "sr" / "notes.txt"]
    for f in theirs:
        f.write_bytes(b"a file the site put here")

    # Other weights (the demo model with another threshold): every result superseded.
    meta = json.loads(DEFAULT_WEIGHTS.read_text())
    weights = tmp_path / "w" / "site.json"
    weights.parent.mkdir()
    shutil.copy(DEFAULT_WEIGHTS.parent / meta["weights_file"], weights.parent)
    weights.write_text(json.dumps(meta | {"risk_threshold": 0.9}))
    assert main([*argv, "--weights", str(weights)]) == 0
    current = {f"{i}.dcm" for i in _result_ids(out)}
    assert len(current) == 2 and not current & set(first)
    assert {f.name for f in (out / "sr").glob("*.dcm")} == current | {"site_copy.dcm"}
    assert all(f.read_bytes() == b"a file the site put here" for f in theirs)
    # What mam dicom store OUT sends: the current SRs (and the site's own file, as before).
    assert {f.name for f in dicom_files(out)} == current | {"site_copy.dcm"}
    (digest,) = {json.loads(x)["model"]["digest"] for x in open(out / "results.jsonl")}
    for name in current:  # the SRs of the other weights' results
        params = [i.TextValue for i in items(hd.sr.srread(out / "sr" / name),
                                             "Algorithm Parameters")]  # fmt: skip
        assert f"model digest {digest}" in params

    # Back to the demo weights, without --dicom-sr: the ledger's old results are current again,
    # so the other weights' SRs go; the outputs writer rebuilds the old ones as they were.
    assert main(argv[:-1]) == 0
    assert [f.name for f in (out / "sr").glob("*.dcm")] == ["site_copy.dcm"]
    batch.write_outputs(out, dicom_sr=True)
    assert {f.name: f.read_bytes() for f in (out / "sr").glob("*-*-*.dcm")} == first
    # Outputs written for some paths only (a shard writing a shared folder) keep the SRs of the
    # ledger's other current results.
    batch.write_outputs(out, paths=["a.npy"], dicom_sr=True)
    assert {f.name for f in (out / "sr").glob("*-*-*.dcm")} == set(first)


def _instances(base: str) -> list[str]:
    return httpx.get(f"{base}/instances", timeout=10).json()


def test_mam_dicom_store_files_a_batchs_srs_in_the_pacs_once(poses, orthanc, tmp_path, capsys):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    for name in ("a.npy", "b.npy"):
        shutil.copy(poses, src / name)
    assert main(["batch", str(src), "--out", str(out), "--workers", "1", "-q", "--dicom-sr"]) == 0
    srs = sorted((out / "sr").glob("*.dcm"))
    assert len(srs) == 2
    sops = {hd.sr.srread(f).SOPInstanceUID for f in srs}
    assert len(sops) == 2
    before = len(_instances(orthanc))
    base = f"{orthanc}/dicom-web"
    capsys.readouterr()
    assert main(["dicom", "store", str(out / "sr"), "--base-url", base, "--format", "json"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert first == {"files": 2, "stored": 2, "already_stored": 0}
    for sop in sops:  # read back through the PACS
        found = httpx.post(f"{orthanc}/tools/find", timeout=10, json={
            "Level": "Instance", "Query": {"SOPInstanceUID": sop}}).json()  # fmt: skip
        assert len(found) == 1
    assert len(_instances(orthanc)) == before + 2
    # Again, from the batch's OUT folder: the same instances, no duplicates.
    assert main(["dicom", "store", str(out), "--base-url", base]) == 0
    assert "of 2 file(s)" in capsys.readouterr().out
    assert len(_instances(orthanc)) == before + 2


def test_mam_dicom_store_refuses_plain_http_off_loopback_and_files_that_are_not_dicom(
    orthanc, tmp_path, capsys
):
    sr = tmp_path / "result.dcm"
    sr.write_bytes(b"not a DICOM file at all")
    argv = ["dicom", "store", str(sr), "--base-url"]
    assert main(argv + ["http://pacs.example/dicom-web"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error [insecure_dicomweb_url]") and "fix:" in err
    assert main(argv + [f"{orthanc}/dicom-web"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error [stow_refused]") and str(sr) in err and "fix:" in err
    assert "Traceback" not in err
    token = tmp_path / "token"
    token.write_text("")
    assert main(argv + [f"{orthanc}/dicom-web", "--token-file", str(token)]) == 2
    assert capsys.readouterr().err.startswith("error [invalid_dicomweb_auth]")


def test_stow_retries_outages_with_back_off_and_then_gives_up(results, tmp_path):
    from mam.dicom_stow import (
        InvalidDicomwebAuthError,
        StowClient,
        StowRefusedError,
        StowUnavailableError,
        auth_headers,
    )

    sr = tmp_path / "r.dcm"
    sr.write_bytes(sr_bytes(results["risk"], "result-6"))
    sop = read(sr.read_bytes()).SOPInstanceUID
    seen = []

    def pacs(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if len(seen) < 3:
            return httpx.Response(503)
        stored = {"00081199": {"vr": "SQ", "Value": [
            {"00081155": {"vr": "UI", "Value": [sop]}}]}}  # fmt: skip
        return httpx.Response(200, json=stored)

    token = tmp_path / "token"
    token.write_text("s3cret\n")
    with StowClient("https://pacs.example/dicom-web", token_file=token, backoff_s=0.01,
                    transport=httpx.MockTransport(pacs)) as client:  # fmt: skip
        (done,) = client.store_all([sr])
    assert done.status == "stored" and done.sop_instance_uid == sop and len(seen) == 3
    assert seen[0].url.path == "/dicom-web/studies"
    assert seen[0].headers["authorization"] == "Bearer s3cret"
    assert 'type="application/dicom"' in seen[0].headers["content-type"]
    assert sr.read_bytes() in seen[0].content
    # A PACS that refuses a duplicate SOP instance (0111H): already stored; any other reason
    # is a refusal naming the file.
    for reason, outcome in ((0x0111, "already stored"), (0xA700, None)):
        failed = {"00081198": {"vr": "SQ", "Value": [{
            "00081155": {"vr": "UI", "Value": [sop]},
            "00081197": {"vr": "US", "Value": [reason]}}]}}  # fmt: skip
        refusing = httpx.MockTransport(lambda request, f=failed: httpx.Response(409, json=f))
        with StowClient("https://pacs.example/dicom-web", transport=refusing) as client:
            if outcome:
                assert client.store(sr).status == outcome
            else:
                with pytest.raises(StowRefusedError, match="A700H") as e:
                    client.store(sr)
                assert str(sr) in str(e.value)
    pair = tmp_path / "basic"
    pair.write_text("mam:pw\n")
    assert auth_headers(basic_auth_file=pair) == {"Authorization": "Basic bWFtOnB3"}
    with pytest.raises(InvalidDicomwebAuthError):
        auth_headers(token_file=token, basic_auth_file=pair)
    down = httpx.MockTransport(lambda request: httpx.Response(502))
    with StowClient("https://pacs.example/dicom-web", attempts=2, backoff_s=0.01,
                    transport=down) as client, pytest.raises(StowUnavailableError):  # fmt: skip
        client.store(sr)
