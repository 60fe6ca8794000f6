"""DICOM video in (mam.dicom_video through mam.video): files built with pydicom from a cut of the
demo recording decode to the same frames and screen to the same result as the MP4 they came
from; a DICOM object without video is a typed error; identifying attributes never leak."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

pytest.importorskip("pydicom")

from mam.cli import main  # noqa: E402
from mam.cli.errors import HINTS  # noqa: E402
from mam.dicom_video import (  # noqa: E402
    DicomWithoutVideoError,
    FragmentReader,
    is_dicom,
    locate,
    read_uids,
)
from mam.errors import CorruptVideoError  # noqa: E402
from mam.screening import Screener  # noqa: E402
from mam.video import iter_frames, probe  # noqa: E402
from tests.dicom_media import (  # noqa: E402
    ACCESSION,
    H264_FRAGMENTABLE_TS,
    H264_TS,
    HEVC_TS,
    PATIENT_ID,
    PATIENT_NAME,
    remux,
    write_dicom_image,
    write_dicom_video,
)
from tests.media import write_video  # noqa: E402

DEMO = "demo/infant_demo.mp4"
STUDY, SERIES = "1.2.826.0.1.3680043.8.498.1001", "1.2.826.0.1.3680043.8.498.1002"
SECRETS = (PATIENT_NAME, PATIENT_ID, ACCESSION, STUDY, SERIES, "Doe")


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """A 12 s cut of the demo (640x360, H.264 in MP4), its HEVC twin, and DICOM objects that
    carry each the ways a PACS does: the MP4 itself, the stream remuxed into MPEG-TS (the current
    standard's two containers), and the bare elementary stream of older objects."""
    d = tmp_path_factory.mktemp("dicom")
    frames = list(iter_frames(DEMO, end_s=12, max_side=640))
    mp4 = write_video(d / "clip.mp4", frames, fps=25, codec="libx264")
    hevc = write_video(d / "clip_hevc.mp4", frames, fps=25, codec="libx265")
    kw = {"study_uid": STUDY, "series_uid": SERIES}
    out = {
        "mp4": mp4,
        "hevc_mp4": hevc,
        "h264_ts": write_dicom_video(d / "h264_ts.dcm", remux(mp4, d / "c.ts", "mpegts"), **kw),
        "h264_mp4": write_dicom_video(
            d / "h264_mp4.dcm", mp4, H264_FRAGMENTABLE_TS, fragments=3, **kw
        ),  # fmt: skip
        "h264_raw": write_dicom_video(d / "h264_raw", remux(mp4, d / "c.h264", "h264"), **kw),
        "hevc_ts": write_dicom_video(
            d / "hevc_ts.dcm", remux(hevc, d / "h.ts", "mpegts"), HEVC_TS, **kw
        ),  # fmt: skip
    }
    return out


def frames_of(path) -> list[np.ndarray]:
    return list(iter_frames(path))


@pytest.mark.parametrize(
    "name, source",
    [("h264_ts", "mp4"), ("h264_mp4", "mp4"), ("h264_raw", "mp4"), ("hevc_ts", "hevc_mp4")],
)
def test_dicom_video_decodes_to_the_frames_of_its_source(media, name, source):
    dcm, src = media[name], media[source]
    assert is_dicom(dcm) and not is_dicom(src)
    info, ref = probe(dcm), probe(src)
    assert (info.width, info.height, info.duration_s, info.source_fps, info.codec) == (
        ref.width, ref.height, ref.duration_s, ref.source_fps, ref.codec)  # fmt: skip
    got, want = frames_of(dcm), frames_of(src)
    assert len(got) == len(want) == info.num_frames_25fps == 300
    assert all(np.array_equal(a, b) for a, b in zip(got, want))


@pytest.fixture(scope="module")
def screened(media):
    """The same Screener on the MP4 (once for the module)."""
    screener = Screener()
    return screener, screener.screen_video(media["mp4"]).model_dump(exclude={"timings_s"})


@pytest.mark.parametrize("name", ["h264_ts", "h264_mp4"])
def test_h264_and_mpeg4_encapsulated_files_screen_identically_to_the_mp4(media, screened, name):
    screener, want = screened
    got = screener.screen_video(media[name]).model_dump(exclude={"timings_s"})
    assert got == want
    assert len(got["clips"]) >= 1 and got["quality"]["frames_total"] == 300


def test_rotation_inside_a_dicom_mp4_is_honoured(tmp_path):
    mp4 = write_video(tmp_path / "r.mp4", 250, fps=25, rotation=90)
    dcm = write_dicom_video(tmp_path / "r.dcm", mp4, size=(160, 120), frames=250)
    info = probe(dcm)
    assert info.rotation == 90 and (info.width, info.height) == (120, 160)
    assert all(np.array_equal(a, b) for a, b in zip(frames_of(dcm), frames_of(mp4)))


def test_a_bare_stream_takes_its_frame_rate_from_itself_or_from_dicom(tmp_path):
    """30 fps, no container: the stream's own timing, else the DICOM Frame Time, never 25."""
    mp4 = write_video(tmp_path / "c30.mp4", 360, fps=30)
    raw = remux(mp4, tmp_path / "c30.h264", "h264")
    want = frames_of(mp4)
    for fps in (30.0, None):
        dcm = write_dicom_video(tmp_path / f"r{fps}.dcm", raw, size=(160, 120), frames=360,
                                fps=fps)  # fmt: skip
        info = probe(dcm)
        assert info.source_fps == 30.0 and info.duration_s == pytest.approx(12.0)
        got = frames_of(dcm)
        assert len(got) == len(want) and all(np.array_equal(a, b) for a, b in zip(got, want))


def test_a_bare_stream_without_timestamps_starts_at_its_first_frame(media):
    """mam.video's rule for frames without timestamps: the first is at 0 s, not one frame late
    (a bare H.264 file at 25 fps, the rate FFmpeg assumes for it)."""
    got, want = frames_of(media["mp4"].with_name("c.h264")), frames_of(media["mp4"])
    assert len(got) == len(want) and all(np.array_equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("case", ["still", "no_pixel_data", "video_syntax_without_pixels"])
def test_a_dicom_object_without_video_is_a_typed_error(tmp_path, case, caplog):
    p = tmp_path / "obj.dcm"
    if case == "still":
        write_dicom_image(p)
    elif case == "no_pixel_data":
        write_dicom_image(p, pixel_data=False)
    else:  # a video transfer syntax, but nothing in Pixel Data's place
        write_dicom_image(p, pixel_data=False)
        import pydicom

        ds = pydicom.dcmread(p)
        ds.file_meta.TransferSyntaxUID = H264_TS
        ds.save_as(p, enforce_file_format=True)
    with caplog.at_level(logging.DEBUG):
        with pytest.raises(DicomWithoutVideoError) as e:
            probe(p)
    assert e.value.code == "dicom_without_video" and "dicom_without_video" in HINTS
    for secret in SECRETS:
        assert secret not in str(e.value) and secret not in caplog.text


def test_damaged_dicom_files_are_corrupt_not_crashes(media, tmp_path):
    data = media["h264_ts"].read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(data[: len(data) // 2])  # fragment runs past the end of the file
    with pytest.raises(CorruptVideoError):
        probe(cut)
    garbage = tmp_path / "garbage.dcm"
    garbage.write_bytes(b"\0" * 128 + b"DICM" + b"\xff" * 64)
    with pytest.raises(CorruptVideoError):
        probe(garbage)


def test_pixel_data_is_never_loaded_and_fragments_read_as_one_file(media):
    v = locate(media["h264_mp4"])
    assert len(v.segments) == 3 and v.frame_rate == pytest.approx(25.0)
    want = media["mp4"].read_bytes()
    assert v.size in (len(want), len(want) + 1)  # fragments are padded to an even length
    with FragmentReader(media["h264_mp4"], v.segments) as f:
        assert f.read()[: len(want)] == want
        f.seek(len(want) - 10)
        assert f.read(10) == want[-10:]
        f.seek(-5, 2)
        assert len(f.read(100)) == 5


def test_uids_only_for_a_caller_that_asks_and_nothing_identifying_in_logs(media, caplog):
    assert read_uids(media["mp4"]) is None
    uids = read_uids(media["h264_ts"])
    assert (uids.study_instance_uid, uids.series_instance_uid) == (STUDY, SERIES)
    with caplog.at_level(logging.DEBUG):
        list(iter_frames(media["h264_ts"], end_s=1))
    for secret in SECRETS:
        assert secret not in caplog.text


def test_mam_screen_reads_dicom_and_echoes_uids_only_when_asked(media, capsys):
    dcm = str(media["h264_ts"])
    argv = ["screen", dcm, "--format", "fhir", "-q", "--fhir-subject", "Patient/p1"]
    assert main(argv + ["--echo-dicom-uids"]) == 0
    echoed = capsys.readouterr().out
    bundle = json.loads(echoed)
    assert bundle["resourceType"] == "Bundle" and STUDY in echoed and SERIES in echoed
    report = next(e["resource"] for e in bundle["entry"]
                  if e["resource"]["resourceType"] == "DiagnosticReport")  # fmt: skip
    assert report["subject"] == {"reference": "Patient/p1"}
    assert main(["screen", dcm, "--format", "json", "-q"]) == 0
    plain = capsys.readouterr().out
    for secret in SECRETS:
        assert secret not in plain
    assert main(["screen", dcm, "--echo-dicom-uids"]) == 2  # only with --format fhir
    assert "only with --format fhir" in capsys.readouterr().err


def test_mam_screen_names_the_problem_of_a_dicom_without_video(tmp_path, capsys):
    p = write_dicom_image(tmp_path / "IM0001")
    assert main(["screen", str(p)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("error [dicom_without_video]: ")
    assert err[1] == "fix: " + HINTS["dicom_without_video"]
    assert not any(s in "\n".join(err) for s in SECRETS)
