"""mam.video on real files written by PyAV: resampling by timestamps, rotation, codecs, bad input.

Every frame written here encodes its own index (``tests.media.index_frame``), so the tests check
*which* source frame the resampler delivered, not only how many.
"""

from __future__ import annotations

import bisect
import math
import struct
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from mam.errors import (
    CorruptVideoError,
    EmptyFileError,
    FileNotFoundInputError,
    FileTooLargeError,
    NotAVideoError,
    ResolutionTooLargeError,
    UnsupportedCodecError,
    VideoTooLongError,
    VideoTooShortError,
)
from mam.video import VideoInfo, VideoLimits, iter_frames, num_output_frames, probe
from tests.media import (
    index_frame,
    marker_corner,
    read_index,
    truncate,
    write_audio_only,
    write_video,
)

NTSC = Fraction(30000, 1001)


@pytest.fixture(scope="module")
def vid(tmp_path_factory):
    """Factory writing each named video once per module: ``vid(name, frames, fps, **kw)``."""
    root = tmp_path_factory.mktemp("videos")
    cache: dict[str, tuple[str, Path]] = {}

    def make(name: str, frames, fps=25, codec: str = "libx264", **kw) -> Path:
        recipe = repr((frames, fps, codec, sorted(kw.items())))
        if name not in cache:
            cache[name] = recipe, write_video(root / name, frames, fps, codec, **kw)
        assert cache[name][0] == recipe, f"{name} was already written with other settings"
        return cache[name][1]

    return make


def indices(path: Path, **kw) -> list[int]:
    return [read_index(f) for f in iter_frames(path, **kw)]


def expected_indices(n_out: int, src_fps: Fraction, out_fps: Fraction = Fraction(25)) -> list[int]:
    """Last source frame i with i / src_fps <= k / out_fps, in exact arithmetic."""
    return [math.floor(Fraction(k) / out_fps * src_fps) for k in range(n_out)]


def expected_from_file(path: Path, n_out: int) -> list[int]:
    """The same rule applied to the timestamps actually stored in the file (containers with
    millisecond clocks, like Matroska, round 29.97 fps timestamps)."""
    with av.open(str(path)) as c:
        stream = c.streams.video[0]
        pts = sorted(p.pts for p in c.demux(stream) if p.pts is not None)
        times = [(t - pts[0]) * stream.time_base for t in pts]
    return [bisect.bisect_right(times, Fraction(k, 25)) - 1 for k in range(n_out)]


# --- the media helpers themselves ----------------------------------------------------------------
def test_index_frames_round_trip_and_marker():
    for i in (0, 1, 37, 250, 1000, 2047):
        img = index_frame(i, 160, 120)
        assert read_index(img) == i
        assert marker_corner(img) == "top-left"
    assert marker_corner(np.rot90(index_frame(5), -1)) == "top-right"


# --- resampling by timestamps --------------------------------------------------------------------
def test_ntsc_input_resampled_to_exactly_25_fps(vid):
    path = vid("ntsc.mp4", 300, NTSC)  # 10.01 s
    info = probe(path)
    assert info.source_fps == pytest.approx(29.97003, abs=1e-4)
    assert info.duration_s == pytest.approx(10.01, abs=1e-6)
    assert info.num_frames_25fps == 250
    got = indices(path)
    assert len(got) == 250
    # 30 source frames per 25 outputs: exactly the frames shown at k / 25 s, so some are skipped.
    assert got == expected_indices(250, NTSC) == expected_from_file(path, 250)
    assert 6 not in got and len(set(got)) == 250


def test_25_fps_passes_through_one_to_one(vid):
    path = vid("f25.mp4", 250, 25)
    frames = list(iter_frames(path))
    assert len(frames) == probe(path).num_frames_25fps == 250
    assert [read_index(f) for f in frames] == list(range(250))
    f = frames[0]
    assert f.dtype == np.uint8 and f.shape == (120, 160, 3) and f.flags["C_CONTIGUOUS"]


def test_50_fps_halves(vid):
    path = vid("f50.mp4", 500, 50)
    assert indices(path) == list(range(0, 500, 2))


def test_low_fps_repeats_frames_as_independent_arrays(vid):
    path = vid("f10.mp4", 100, 10)  # 10 s at 10 fps -> each source frame held 2-3 outputs
    frames = list(iter_frames(path))
    assert [read_index(f) for f in frames] == expected_indices(250, Fraction(10))
    assert read_index(frames[0]) == read_index(frames[1]) == 0
    before = frames[1].copy()
    frames[0][:] = 0  # a caller drawing on one frame must not change the repeat
    assert np.array_equal(frames[1], before) and before.max() > 200


def test_variable_frame_rate(vid):
    # Phones record with irregular frame intervals (here 20-60 ms): resample by timestamps.
    rng = np.random.default_rng(7)
    times = np.cumsum(np.r_[0.0, rng.uniform(0.02, 0.06, 299)])
    path = vid("vfr.mp4", 300, 30, times_s=times.tolist())
    got = indices(path)
    assert len(got) == probe(path).num_frames_25fps > 250
    assert got == expected_from_file(path, len(got))
    assert got == [
        int(np.searchsorted(times, k / 25 + 1e-9, side="right")) - 1 for k in range(len(got))
    ]


def test_other_output_rate(vid):
    path = vid("f25.mp4", 250, 25)
    got = indices(path, fps=12.5)
    assert got == list(range(0, 250, 2))
    assert num_output_frames(probe(path).duration_s, 12.5) == 125


# --- rotation ------------------------------------------------------------------------------------
# Clockwise display rotation -> where the original top-left corner ends up, and how to undo it.
ROTATIONS = {
    0: ("top-left", 0),
    90: ("top-right", 1),
    180: ("bottom-right", 2),
    270: ("bottom-left", -1),
}


@pytest.mark.parametrize("rotation", [0, 90, 180, 270])
def test_rotation_metadata_is_applied(vid, rotation):
    path = vid(f"rot{rotation}.mp4", 250, 25, rotation=rotation)
    info = probe(path)
    assert info.rotation == rotation and not info.mirrored
    swapped = rotation in (90, 270)
    assert (info.width, info.height) == ((120, 160) if swapped else (160, 120))
    corner, undo = ROTATIONS[rotation]
    for k, frame in enumerate(iter_frames(path)):
        assert frame.shape == (info.height, info.width, 3)
        if k in (0, 1, 137):
            assert marker_corner(frame) == corner
            assert read_index(np.rot90(frame, undo)) == k  # whole picture turned, not only size


def test_mirrored_display_matrix(vid):
    path = vid("rot90_hflip.mp4", 250, 25, rotation=90, hflip=True)
    info = probe(path)
    assert (info.rotation, info.mirrored) == (90, True)
    assert (info.width, info.height) == (120, 160)
    frame = next(iter(iter_frames(path)))
    # 90 degrees clockwise, then mirrored left-right: a transpose.
    assert marker_corner(frame) == "top-left"
    assert read_index(frame.transpose(1, 0, 2)) == 0


# --- codecs and containers -----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("codec", "suffix", "decoder"),
    [
        ("libx264", ".mp4", "h264"),
        ("libx265", ".mkv", "hevc"),
        ("mpeg4", ".avi", "mpeg4"),
        ("libvpx-vp9", ".webm", "vp9"),
        ("mjpeg", ".avi", "mjpeg"),
        ("mjpeg", ".mov", "mjpeg"),
    ],
)
def test_codecs_and_containers_decode(vid, codec, suffix, decoder):
    # 240 frames at 25 fps = 9.6 s, exactly the shortest accepted video.
    path = vid(f"{decoder}{suffix}", 240, 25, codec)
    info = probe(path)
    assert info.codec == decoder
    assert info.duration_s == pytest.approx(9.6, abs=1e-3)
    assert (info.width, info.height) == (160, 120)
    assert indices(path) == list(range(240))


def test_missing_duration_is_found_by_scanning_packets(vid):
    # Streamed WebM (as browsers record it) has no duration in its header.
    path = vid("streamed.webm", 275, 25, "libvpx-vp9", seekable=False)
    info = probe(path)
    assert info.duration_s == pytest.approx(11.0, abs=1e-3)
    assert indices(path) == list(range(275))


@pytest.mark.parametrize("suffix", [".mkv", ".ts", ".mp4", ".avi"])
def test_late_start_counts_from_the_first_frame(vid, suffix):
    # Timestamps start at 2 s (a cut or broadcast recording); the 10.01 s of frames still
    # resample from the first frame, and the start offset is not mistaken for missing frames.
    path = vid(f"late{suffix}", 300, NTSC, start_s=2.0)
    info = probe(path)
    assert info.duration_s == pytest.approx(10.01, abs=0.05)
    got = indices(path)
    assert len(got) == info.num_frames_25fps >= 249
    assert got == expected_from_file(path, len(got))
    # the file's clock may round, but never by more than one source frame
    assert all(abs(a - b) <= 1 for a, b in zip(got, expected_indices(len(got), NTSC)))


def test_mp4_trimmed_by_edit_list_is_not_corrupt(vid, tmp_path):
    # Trimming on a phone rewrites the edit list and keeps every sample: 12 s of frames, 10 s
    # presented. The sample count must not be mistaken for the duration.
    data = bytearray(vid("bframes.mp4", 300, 25, options={"preset": "medium"}).read_bytes())
    elst = data.find(b"elst")
    mvhd = data.find(b"mvhd")
    assert elst > 0 and mvhd > 0 and data[elst + 4] == 0  # version 0: 32-bit fields
    timescale = struct.unpack(">I", data[mvhd + 16 : mvhd + 20])[0]
    data[elst + 12 : elst + 16] = struct.pack(">I", 10 * timescale)  # segment duration
    path = tmp_path / "trimmed.mp4"
    path.write_bytes(bytes(data))
    info = probe(path)
    assert info.duration_s == pytest.approx(10.0, abs=1e-3)
    assert indices(path) == list(range(250))


def test_non_square_pixels_are_made_square(vid):
    path = vid("sar2.mp4", 250, 25, sample_aspect_ratio=Fraction(2, 1))
    info = probe(path)
    assert (info.width, info.height) == (320, 120)
    frame = next(iter(iter_frames(path)))
    assert frame.shape == (120, 320, 3) and read_index(frame) == 0


# --- downscaling ---------------------------------------------------------------------------------
def test_max_side_downscales_keeping_aspect(vid):
    path = vid("big.mp4", 250, 25, size=(320, 240))
    frames = list(iter_frames(path, max_side=80))
    assert len(frames) == 250
    assert frames[0].shape == (60, 80, 3)
    assert [read_index(f) for f in frames[:50]] == list(range(50))
    # never upscales
    assert next(iter(iter_frames(path, max_side=1000))).shape == (240, 320, 3)


def test_max_side_applies_to_the_rotated_picture(vid):
    path = vid("rot90.mp4", 250, 25, rotation=90)
    frame = next(iter(iter_frames(path, max_side=80)))
    assert frame.shape == (80, 60, 3)
    assert marker_corner(frame) == "top-right"


# --- bad input -----------------------------------------------------------------------------------
def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundInputError) as e:
        probe(tmp_path / "nope.mp4")
    assert e.value.code == "file_not_found"
    with pytest.raises(FileNotFoundInputError):
        iter_frames(tmp_path / "nope.mp4")  # raised at the call, before the first frame


def test_directory_is_not_a_video(tmp_path):
    with pytest.raises(NotAVideoError):
        probe(tmp_path)


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.mp4"
    path.touch()
    with pytest.raises(EmptyFileError):
        probe(path)


def test_text_file_renamed_mp4(tmp_path):
    path = tmp_path / "notes.mp4"
    path.write_text("this is not a video\n" * 100)
    with pytest.raises(NotAVideoError) as e:
        probe(path)
    assert e.value.code == "not_a_video"


def test_audio_only_file(tmp_path):
    path = write_audio_only(tmp_path / "voice.mp4", duration_s=10.0)
    with pytest.raises(NotAVideoError, match="no video stream"):
        probe(path)


def test_still_image_is_not_a_video(tmp_path):
    path = tmp_path / "photo.png"
    av.VideoFrame.from_ndarray(index_frame(3), format="rgb24").save(str(path))
    with pytest.raises(NotAVideoError):
        probe(path)


def test_file_over_size_limit(vid):
    path = vid("f25.mp4", 250, 25)
    with pytest.raises(FileTooLargeError) as e:
        probe(path, VideoLimits(max_file_bytes=1000))
    assert isinstance(e.value, NotAVideoError) and e.value.code == "file_too_large"


def test_unknown_codec(vid, tmp_path):
    data = vid("hevc.mkv", 240, 25, "libx265").read_bytes()
    assert data.count(b"V_MPEGH/ISO/HEVC") == 1
    path = tmp_path / "unknown.mkv"
    path.write_bytes(data.replace(b"V_MPEGH/ISO/HEVC", b"V_XXXXX/XXX/XXXX"))
    with pytest.raises(UnsupportedCodecError):
        probe(path)


def test_truncated_mp4_without_index(vid, tmp_path):
    # FFmpeg's mp4 muxer writes the index (moov) last: a cut-off upload has none.
    path = truncate(vid("f25.mp4", 250, 25), 0.6, out=tmp_path / "cut.mp4")
    with pytest.raises(CorruptVideoError) as e:
        probe(path)
    assert e.value.code == "corrupt_video"


@pytest.mark.parametrize(
    ("name", "codec", "opts"),
    [
        ("faststart.mp4", "libx264", {"movflags": "faststart"}),
        ("trunc.mkv", "libx264", None),
        ("trunc.webm", "libvpx-vp9", None),
        ("trunc.avi", "mjpeg", None),
    ],
)
def test_truncated_file_fails_while_decoding(vid, tmp_path, name, codec, opts):
    full = vid(name, 300, 25, codec, container_options=opts)  # 12 s
    path = truncate(full, 0.5, out=tmp_path / name)
    info = probe(path)  # header intact: looks fine until decoded
    assert info.duration_s == pytest.approx(12.0, abs=0.05)
    with pytest.raises(CorruptVideoError):
        for _ in iter_frames(path):
            pass


def test_too_short(vid):
    path = vid("short.mp4", 225, 25)  # 9.0 s
    with pytest.raises(VideoTooShortError):
        probe(path)
    with pytest.raises(VideoTooShortError):
        iter_frames(path)
    assert probe(path, VideoLimits(min_duration_s=5)).duration_s == pytest.approx(9.0)


def test_too_long(vid):
    path = vid("f25.mp4", 250, 25)
    with pytest.raises(VideoTooLongError):
        probe(path, VideoLimits(max_duration_s=5.0, min_duration_s=1.0))


def test_too_long_found_while_scanning_packets(vid):
    path = vid("streamed.webm", 275, 25, "libvpx-vp9", seekable=False)
    with pytest.raises(VideoTooLongError):
        probe(path, VideoLimits(max_duration_s=5.0, min_duration_s=1.0))


def test_resolution_over_limit(vid):
    path = vid("f25.mp4", 250, 25)  # 160 x 120
    with pytest.raises(ResolutionTooLargeError):
        probe(path, VideoLimits(max_width=100))
    with pytest.raises(ResolutionTooLargeError):
        probe(path, VideoLimits(max_height=100))


def test_resolution_limit_applies_after_rotation(vid):
    limits = VideoLimits(max_width=150, max_height=200)
    upright = vid("f25.mp4", 250, 25)  # 160 x 120: too wide
    portrait = vid("rot90.mp4", 250, 25, rotation=90)  # displayed 120 x 160: fits
    with pytest.raises(ResolutionTooLargeError):
        probe(upright, limits)
    assert isinstance(probe(portrait, limits), VideoInfo)


# --- forged files: what the headers say is checked again as frames are decoded -----------------
@pytest.mark.parametrize("cut", [20, 200])
def test_mp4_cut_inside_its_index_is_corrupt_not_a_non_video(vid, tmp_path, cut):
    full = vid("faststart.mp4", 300, 25, "libx264", container_options={"movflags": "faststart"})
    data = full.read_bytes()
    path = tmp_path / "cut.mp4"
    path.write_bytes(data[: data.find(b"moov") + cut])  # the track list cut off
    with pytest.raises(CorruptVideoError):
        probe(path)


def test_two_frames_minutes_apart_are_not_posed_as_thousands(tmp_path):
    """A tiny file whose two frames declare 3 minutes: a gap no recording has."""
    path = write_video(tmp_path / "gap.mp4", 2, times_s=[0.0, 180.0])
    assert probe(path, VideoLimits()).duration_s > 170  # the headers look fine
    n = 0
    with pytest.raises(CorruptVideoError, match="no frame for"):
        for _ in iter_frames(path):
            n += 1
    assert n <= 2 * 25 + 1  # stopped at the gap, not after 4,500 copies


def test_a_gap_within_the_limit_is_held(tmp_path):
    times = [i / 25 for i in range(125)] + [5.0 + 1.5 + i / 25 for i in range(125)]
    path = write_video(tmp_path / "dropout.mp4", 250, times_s=times)
    assert sum(1 for _ in iter_frames(path)) == num_output_frames(probe(path).duration_s, 25)
    with pytest.raises(CorruptVideoError):
        list(iter_frames(path, VideoLimits(max_frame_gap_s=1.0)))


def test_every_frame_size_is_checked_not_only_the_first(tmp_path):
    """MPEG-TS concatenates: 10 s at 160 x 120, then frames of 640 x 480."""
    small = write_video(tmp_path / "a.ts", 250, size=(160, 120))
    large = write_video(tmp_path / "b.ts", 25, size=(640, 480))
    path = tmp_path / "both.ts"
    path.write_bytes(small.read_bytes() + large.read_bytes())
    limits = VideoLimits(max_width=320, max_height=320)
    assert probe(path, limits).width == 160  # the first frame passes
    with pytest.raises(ResolutionTooLargeError):
        for _ in iter_frames(path, limits):
            pass
