"""Read any recording FFmpeg can decode as upright RGB frames at exactly 25 fps.

The model was trained on poses sampled at 25 fps (paper, Methods); cohorts were filmed at 25 and
29.97 fps and phones film at whatever rate they like, so every video is resampled here, by
timestamps, before pose estimation. Output frame ``k`` is the picture on screen at ``t = k / fps``:
the last source frame whose presentation time (first frame = 0 s) is ``<= t``. Frames are streamed
one at a time, so memory does not grow with the length of the video.

Rules chosen here (see also ``VideoInfo`` and ``iter_frames``):

* Orientation: the display matrix that FFmpeg attaches to decoded frames (from mp4/mov ``tkhd``,
  mkv projection, or H.264/HEVC orientation SEI) is read from the first frame and applied exactly
  as the ``ffmpeg`` CLI autorotates (the same transpose / flip choice), so a phone's portrait
  recording comes out portrait. ``VideoInfo.rotation`` is the clockwise angle, like the legacy mp4
  ``rotate`` tag; odd angles are snapped to the nearest right angle with a warning.
* Non-square pixels (sample aspect ratio != 1) are resampled to square pixels, since joint angles
  in a stretched image are wrong.
* Duration: from the first decoded frame to the declared end of the video stream, because
  files may start late (MPEG-TS, cut Matroska, mp4 edit lists). The end comes from, in order: the
  stream's start plus its duration (for AVI the larger of that and ``frames / rate``, because
  FFmpeg derives the former from an index it rebuilds after truncation; mp4 keeps the stream
  duration, which honours edit lists that trim a recording), or plus ``frames / rate``; the
  Matroska per-track ``DURATION`` tag; the container duration; else (streamed WebM as browsers
  record it, raw streams) the packets are demuxed, without decoding, to find the last timestamp.
* Truncation: FFmpeg often stops silently at the end of a cut-off file. If the decoded frames end
  more than ``min(1 s, 5 % of the declared duration)`` before the declared duration,
  ``CorruptVideoError`` is raised; a smaller shortfall (muxer rounding, a dropped last frame) is
  padded by holding the last frame, so ``iter_frames`` always yields ``VideoInfo.num_frames_25fps``
  frames (at 25 fps).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from av.sidedata.sidedata import Type as _SideDataType
from av.video.reformatter import VideoReformatter

from mam import dicom_video
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
from mam.skeleton import FPS

logger = logging.getLogger(__name__)

__all__ = ["VideoInfo", "VideoLimits", "iter_frames", "num_output_frames", "probe"]

_AV_TIME_BASE = 1_000_000
_EPS_FRAMES = 1e-6  # absorbs float error in duration * fps when the product is an integer

# Demuxers that open things which are not recordings (stills, ANSI art): a photo uploaded by
# mistake should say "not a video", not "too short".
_NOT_RECORDING_FORMATS = {"image2", "tty", "lavfi"}


@dataclass(frozen=True)
class VideoLimits:
    """What the pipeline accepts; checked before any decoding so bad uploads fail fast."""

    max_duration_s: float = 15 * 60  # paper's videos are 2-11 minutes
    max_width: int = 3840
    max_height: int = 3840
    min_duration_s: float = 9.6  # one 240-frame instance at 25 fps
    max_file_bytes: int = 4 * 1024**3
    # Checked as frames are decoded, where a forged file differs from its headers: a gap
    # between two frames (a 5 KB file of two frames 14 minutes apart would otherwise be posed
    # as 21,000 copies of one picture), and every frame's size, not only the first's.
    max_frame_gap_s: float = 2.0
    max_source_fps: float = 240.0  # decoded frames per declared second, at most


@dataclass(frozen=True)
class VideoInfo:
    """What ``probe`` learnt. Sizes are display sizes: after rotation and square-pixel scaling."""

    width: int
    height: int
    source_fps: float  # average frame rate of the source; 0.0 if FFmpeg cannot tell
    duration_s: float  # declared duration (see module docstring for the sources, in order)
    codec: str  # FFmpeg decoder name, e.g. "h264", "hevc", "mpeg4", "vp9", "mjpeg"
    container: str  # FFmpeg demuxer name, e.g. "mov,mp4,m4a,3gp,3g2,mj2", "matroska,webm"
    rotation: int  # clockwise degrees applied for display: 0, 90, 180 or 270
    # The display matrix also mirrors the picture (applied, as ffmpeg does): left and right of
    # the infant are swapped relative to the raw stored image.
    mirrored: bool = False

    @property
    def num_frames_25fps(self) -> int:
        """Frames ``iter_frames`` yields at 25 fps: every ``k`` with ``k / 25 < duration_s``."""
        return num_output_frames(self.duration_s, FPS)


def num_output_frames(duration_s: float, fps: float) -> int:
    """Output frames for a duration: ``floor(duration_s * fps)``, robust to float error."""
    return max(0, math.floor(duration_s * float(fps) + _EPS_FRAMES))


# --- orientation ---------------------------------------------------------------------------------
# Pixel operations named as the FFmpeg filters the ffmpeg CLI inserts for a display matrix.
_OPS = {
    "none": lambda a: a,
    "clock": lambda a: np.rot90(a, -1),  # transpose=clock
    "cclock": lambda a: np.rot90(a, 1),  # transpose=cclock
    "transpose": lambda a: a.transpose(1, 0, 2),  # transpose=cclock_flip
    "antitranspose": lambda a: np.rot90(a, -1)[::-1],  # transpose=clock_flip
    "hflip": lambda a: a[:, ::-1],
    "vflip": lambda a: a[::-1],
    "rot180": lambda a: a[::-1, ::-1],  # hflip + vflip
}
_SWAPS_AXES = {"clock", "cclock", "transpose", "antitranspose"}
_MIRRORS = {"transpose", "antitranspose", "hflip", "vflip"}


def _orientation(frame: av.VideoFrame) -> tuple[str, int]:
    """(pixel op, clockwise degrees) for a frame's display matrix, as ``ffmpeg`` autorotates."""
    sd = frame.side_data.get(_SideDataType.DISPLAYMATRIX)
    if sd is None:
        return "none", 0
    m = np.frombuffer(bytes(sd), dtype=np.int32)
    if m.size < 9:
        logger.warning("ignoring a malformed display matrix (%d values)", m.size)
        return "none", 0
    a, b, c, d = (float(v) / 65536.0 for v in (m[0], m[1], m[3], m[4]))
    sx, sy = math.hypot(a, c), math.hypot(b, d)
    if sx == 0.0 or sy == 0.0:
        logger.warning("ignoring a degenerate display matrix")
        return "none", 0
    ccw = -math.degrees(math.atan2(b / sy, a / sx))  # av_display_rotation_get()
    theta = -float(round(ccw))  # fftools get_rotation(): clockwise, in [0, 360)
    theta -= 360.0 * math.floor(theta / 360.0 + 0.9 / 360.0)
    snapped = int(90 * round(theta / 90.0)) % 360
    if abs(theta - 90 * round(theta / 90.0)) > 1.0:
        logger.warning("rotation of %.1f degrees snapped to %d", theta, snapped)
    if snapped == 90:
        op = "transpose" if m[3] > 0 else "clock"
    elif snapped == 180:
        op = {(True, True): "rot180", (True, False): "hflip", (False, True): "vflip"}.get(
            (bool(m[0] < 0), bool(m[4] < 0)), "none"
        )
    elif snapped == 270:
        op = "antitranspose" if m[3] < 0 else "cclock"
    else:
        op = "vflip" if m[4] < 0 else "none"
    return op, snapped


# --- opening and probing -------------------------------------------------------------------------
@dataclass(frozen=True)
class _Plan:
    """What ``iter_frames`` needs beyond ``VideoInfo`` to decode exactly as probed."""

    stream_index: int
    op: str  # key of _OPS: the pixel operation that makes frames upright
    declared_s: float


def _looks_like_video_container(path: Path) -> bool:
    """True if the file starts like an mp4/mov, mkv/webm, avi or MPEG-PS file."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError:
        return False
    mp4_box = head[4:8] in (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip")
    avi = head.startswith(b"RIFF") and head[8:12] == b"AVI "
    mkv_or_mpeg_ps = head.startswith((b"\x1a\x45\xdf\xa3", b"\x00\x00\x01\xba"))
    return mp4_box or avi or mkv_or_mpeg_ps


def _open(path: Path) -> av.container.InputContainer:
    """Open with FFmpeg, turning its errors into typed ones."""
    if dicom_video.is_dicom(path):  # a DICOM video object: the stream in its Pixel Data
        return dicom_video.open_container(path)
    try:
        return av.open(str(path), metadata_errors="replace")
    except (av.FFmpegError, OSError) as e:
        if _looks_like_video_container(path):
            # e.g. an mp4 cut off before its index (moov), or an mkv cut off before its cues.
            raise CorruptVideoError(
                f"{path}: looks like a video container but FFmpeg cannot read it "
                f"(truncated or damaged file?): {e}"
            ) from e
        raise NotAVideoError(f"{path}: not a video file FFmpeg can open: {e}") from e


def _video_stream(container: av.container.InputContainer, path: Path) -> av.VideoStream:
    """First real video stream; cover art (attached pictures) does not count."""
    fmt = container.format.name
    if fmt in _NOT_RECORDING_FORMATS or fmt.endswith("_pipe"):
        raise NotAVideoError(f"{path}: a still image or text ({fmt}), not a video recording")
    for stream in container.streams.video:
        if not stream.disposition & av.stream.Disposition.attached_pic:
            return stream
    kinds = sorted({s.type for s in container.streams}) or ["nothing"]
    if "audio" not in kinds and _looks_like_video_container(path):
        # e.g. an mp4 whose index (moov) was cut off inside its track list
        raise CorruptVideoError(
            f"{path}: looks like a video container but holds no readable video stream "
            f"(truncated or damaged file?; holds {', '.join(kinds)})"
        )
    raise NotAVideoError(f"{path}: no video stream (holds {', '.join(kinds)})")


def _fraction_s(value: int | None, time_base: Fraction | None) -> float | None:
    if value is None or time_base is None or value <= 0:
        return None
    return float(value * time_base)


def _parse_hms(text: str) -> float | None:
    """Matroska's ``DURATION`` tag, ``HH:MM:SS.nnnnnnnnn``."""
    try:
        h, m, s = text.strip().split(":")
        value = int(h) * 3600 + int(m) * 60 + float(s)
    except ValueError:
        return None
    return value if value > 0 else None


def _rate(stream: av.VideoStream) -> Fraction | None:
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate is not None and rate > 0:
            return Fraction(rate)
    return None


def _scan_end(path: Path, stream_index: int, limits: VideoLimits) -> float:
    """End time from packet timestamps, demuxing without decoding (no duration in the header).

    Opens the file again so the caller's container stays where it is.
    """
    first: int | None = None
    end: int | None = None
    count = 0
    try:
        with _open(path) as container:
            stream = container.streams[stream_index]
            tb = stream.time_base or Fraction(1, _AV_TIME_BASE)
            rate = _rate(stream)
            start = stream.start_time or 0
            too_long = limits.max_duration_s / tb
            for packet in container.demux(stream):
                if packet.size == 0:  # the flush packet demux() yields at the end
                    continue
                count += 1
                ts = packet.pts if packet.pts is not None else packet.dts
                if ts is None:
                    continue
                first = ts if first is None else min(first, ts)
                end = max(end if end is not None else ts, ts + max(packet.duration or 0, 0))
                if end - first > too_long:  # stop reading a huge file as soon as we know
                    raise VideoTooLongError(
                        f"{path}: longer than the {limits.max_duration_s:g} s limit"
                    )
    except av.FFmpegError as e:
        raise CorruptVideoError(f"{path}: reading packets failed: {e}") from e
    if count == 0:
        raise CorruptVideoError(f"{path}: the video stream holds no frames")
    if end is not None:
        return float(end * tb)
    if rate is not None:
        return float(start * tb + count / rate)
    raise CorruptVideoError(f"{path}: neither a duration nor timestamps to derive one from")


def _declared_end(
    container: av.container.InputContainer,
    stream: av.VideoStream,
    limits: VideoLimits,
    path: Path,
) -> tuple[float, str]:
    """Declared end time of the video in seconds (on the stream's clock) and its source.

    An end time rather than a length because files may start late (MPEG-TS, Matroska or mp4
    edit lists with a start offset): the caller subtracts the first frame's time.
    """
    tb = stream.time_base or Fraction(1, _AV_TIME_BASE)
    start_s = float((stream.start_time or 0) * tb)
    stream_s = _fraction_s(stream.duration, tb)
    rate = _rate(stream)
    frames_s = float(stream.frames / rate) if stream.frames > 0 and rate is not None else None
    if container.format.name == "avi" and stream_s is not None and frames_s is not None:
        # AVI's header frame count survives truncation; the duration FFmpeg derives from a
        # rebuilt index does not. (Not for mp4: an edit list that trims a phone video keeps
        # every sample in the frame count, and there the stream duration is right.)
        return start_s + max(stream_s, frames_s), "stream (avi header)"
    if stream_s is not None:
        return start_s + stream_s, "stream"
    if frames_s is not None:
        return start_s + frames_s, "frame count"
    tag = next((v for k, v in stream.metadata.items() if k.upper() == "DURATION"), None)
    tag_s = _parse_hms(tag) if tag else None
    if tag_s is not None:  # Matroska writes the track's end timestamp
        return tag_s, "track tag"
    if container.duration is not None and container.duration > 0:
        duration_s = container.duration / _AV_TIME_BASE
        if container.format.name.startswith("matroska"):  # segment duration is an end time
            return duration_s, "container"
        return (container.start_time or 0) / _AV_TIME_BASE + duration_s, "container"
    return _scan_end(path, stream.index, limits), "packet scan"


def _first_frame(
    container: av.container.InputContainer, stream: av.VideoStream, path: Path
) -> av.VideoFrame:
    """Decode the first frame: proves the decoder works and carries the display matrix."""
    try:
        for frame in container.decode(stream):
            return frame
    except (av.error.DecoderNotFoundError, av.error.PatchWelcomeError) as e:
        raise UnsupportedCodecError(f"{path}: FFmpeg cannot decode this video: {e}") from e
    except av.FFmpegError as e:
        raise CorruptVideoError(f"{path}: decoding the first frame failed: {e}") from e
    raise CorruptVideoError(f"{path}: the video stream holds no decodable frames")


def _display_size(frame: av.VideoFrame, stream: av.VideoStream) -> tuple[int, int]:
    """Pre-rotation size with square pixels (sample aspect ratio applied to the width)."""
    w, h = frame.width, frame.height
    sar = stream.sample_aspect_ratio
    if sar is not None and sar > 0 and sar != 1:
        w = max(1, round(w * sar))
    return w, h


def _check_resolution(w: int, h: int, limits: VideoLimits, path: Path) -> None:
    if w > limits.max_width or h > limits.max_height:
        raise ResolutionTooLargeError(
            f"{path}: {w}x{h} exceeds the {limits.max_width}x{limits.max_height} limit"
        )


def _probe(path: str | os.PathLike, limits: VideoLimits) -> tuple[VideoInfo, _Plan]:
    p = Path(os.fspath(path))
    if not p.exists():
        raise FileNotFoundInputError(f"{p}: no such file")
    if not p.is_file():
        raise NotAVideoError(f"{p}: not a regular file")
    size = p.stat().st_size
    if size == 0:
        raise EmptyFileError(f"{p}: the file is empty")
    if size > limits.max_file_bytes:
        raise FileTooLargeError(f"{p}: {size} bytes exceeds the {limits.max_file_bytes} byte limit")

    with _open(p) as container:
        stream = _video_stream(container, p)
        if stream.codec_context is None:
            raise UnsupportedCodecError(f"{p}: FFmpeg has no decoder for this video codec")
        codec = stream.codec_context.name
        # Before decoding anything: a coded size that fits in no orientation is too large.
        cw, ch = stream.codec_context.width, stream.codec_context.height
        mw, mh = limits.max_width, limits.max_height
        if not ((cw <= mw and ch <= mh) or (ch <= mw and cw <= mh)):
            _check_resolution(cw, ch, limits, p)

        frame = _first_frame(container, stream, p)
        tb = stream.time_base or Fraction(1, _AV_TIME_BASE)
        first_s = float((frame.pts if frame.pts is not None else stream.start_time or 0) * tb)
        end_s, source = _declared_end(container, stream, limits, p)
        duration_s = end_s - first_s
        if duration_s > limits.max_duration_s:
            raise VideoTooLongError(
                f"{p}: {duration_s:.1f} s is longer than the {limits.max_duration_s:g} s limit"
            )
        if duration_s < limits.min_duration_s:
            raise VideoTooShortError(
                f"{p}: {duration_s:.2f} s is shorter than the {limits.min_duration_s:g} s needed"
            )

        op, rotation = _orientation(frame)
        sw, sh = _display_size(frame, stream)
        w, h = (sh, sw) if op in _SWAPS_AXES else (sw, sh)
        _check_resolution(w, h, limits, p)

        rate = _rate(stream)
        info = VideoInfo(
            width=w,
            height=h,
            source_fps=float(rate) if rate is not None else 0.0,
            duration_s=duration_s,
            codec=codec,
            container=container.format.name,
            rotation=rotation,
            mirrored=op in _MIRRORS,
        )
        plan = _Plan(stream.index, op, duration_s)
    logger.debug(
        "probed %s: %dx%d %s in %s, %.3f fps, %.3f s (%s), rotation %d%s",
        p.name,
        w,
        h,
        codec,
        info.container,
        info.source_fps,
        duration_s,
        source,
        rotation,
        " mirrored" if info.mirrored else "",
    )
    return info, plan


def probe(path: str | os.PathLike, limits: VideoLimits = VideoLimits()) -> VideoInfo:
    """Check a recording before any real work and describe it.

    Reads the headers and decodes only the first frame (to prove the codec decodes and to read
    the display matrix). Raises the typed ``InputError`` for every problem a user can fix.
    """
    return _probe(path, limits)[0]


# --- decoding ------------------------------------------------------------------------------------
def _target_size(w: int, h: int, max_side: int | None) -> tuple[int, int]:
    """Downscale (never upscale) so that max(w, h) <= max_side, keeping the aspect ratio."""
    if max_side is None or max(w, h) <= max_side:
        return w, h
    scale = max_side / max(w, h)
    return max(1, min(max_side, round(w * scale))), max(1, min(max_side, round(h * scale)))


def iter_frames(
    path: str | os.PathLike,
    limits: VideoLimits = VideoLimits(),
    fps: float = FPS,
    max_side: int | None = None,
    start_s: float = 0.0,
    end_s: float | None = None,
    threads: int = 0,
) -> Iterator[np.ndarray]:
    """Yield upright RGB ``uint8 [H, W, 3]`` frames at exactly ``fps``.

    ``probe`` runs first (here, not at the first ``next``), so input errors surface at the call.
    Yields ``num_output_frames(info.duration_s, fps)`` frames; frame ``k`` is the last source frame
    with presentation time ``<= k / fps`` (first frame = 0 s). ``max_side`` downscales in
    FFmpeg's swscale so that ``max(H, W) <= max_side``. ``start_s``/``end_s`` yield only frames
    ``round(start_s * fps) .. round(end_s * fps) - 1`` of that same stream, seeking to the start
    instead of decoding from the beginning (a review clip near the end of a long recording).
    ``threads``: decoder threads (0: FFmpeg's choice, frame and slice threads over the CPUs; 1
    where the caller already runs one decoder per core, which saves the threads' overhead).
    Decoding errors raise ``CorruptVideoError``; so does a video that ends clearly before its
    declared duration.
    """
    rate = Fraction(fps).limit_denominator(1_000_000)
    if not rate > 0:
        raise ValueError(f"fps must be positive, got {fps}")
    if max_side is not None and max_side < 1:
        raise ValueError(f"max_side must be >= 1, got {max_side}")
    k0 = round(start_s * rate)
    k1 = None if end_s is None else round(end_s * rate)
    if k0 < 0 or (k1 is not None and k1 <= k0):
        raise ValueError(f"need 0 <= start_s < end_s, got {start_s}..{end_s}")
    if threads < 0:
        raise ValueError(f"threads must be >= 0, got {threads}")
    info, plan = _probe(path, limits)
    return _frames(Path(os.fspath(path)), info, plan, rate, max_side, k0, k1, threads, limits)


def _frames(
    path: Path, info: VideoInfo, plan: _Plan, rate: Fraction, max_side: int | None,
    k0: int = 0, k1: int | None = None, threads: int = 0, limits: VideoLimits = VideoLimits(),
) -> Iterator[np.ndarray]:  # fmt: skip
    n_out = num_output_frames(plan.declared_s, rate)
    if k1 is not None:
        n_out = min(n_out, k1)
    out_w, out_h = _target_size(info.width, info.height, max_side)
    # swscale works on the stored (pre-rotation) picture; rotation is a cheap numpy view after.
    scale_w, scale_h = (out_h, out_w) if plan.op in _SWAPS_AXES else (out_w, out_h)
    orient = _OPS[plan.op]
    reformatter = VideoReformatter()

    def to_rgb(frame: av.VideoFrame) -> np.ndarray:
        rgb = reformatter.reformat(frame, width=scale_w, height=scale_h, format="rgb24")
        return np.ascontiguousarray(orient(rgb.to_ndarray()))

    k = k0
    prev: av.VideoFrame | None = None
    prev_ticks = 0
    prev_end = Fraction(0)
    warned_order = False
    with _open(path) as container:
        stream = container.streams[plan.stream_index]
        stream.codec_context.thread_type = "AUTO"
        stream.codec_context.thread_count = threads
        tb = stream.time_base or Fraction(1, _AV_TIME_BASE)
        nominal = round(1 / (info.source_fps * tb)) if info.source_fps > 0 else 0
        pts0: int | None = None
        size: tuple[int, int] | None = None
        decoded = 0
        max_decoded = math.ceil(max(plan.declared_s, 1.0) * limits.max_source_fps) + 10
        max_gap = limits.max_frame_gap_s / tb
        try:
            if k0:  # time 0 is the first frame's timestamp; then seek to the keyframe before
                first = next(container.decode(stream), None)
                pts0 = (first.pts or 0) if first is not None else 0
                target = pts0 + math.floor(Fraction(k0) / rate / tb)
                container.seek(target, stream=stream, backward=True, any_frame=False)
            for frame in container.decode(stream):
                if (frame.width, frame.height) != size:  # a stream may change size midway
                    size = (frame.width, frame.height)
                    sw, sh = _display_size(frame, stream)
                    _check_resolution(*((sh, sw) if plan.op in _SWAPS_AXES else (sw, sh)),
                                      limits, path)  # fmt: skip
                decoded += 1
                if decoded > max_decoded:
                    raise CorruptVideoError(
                        f"{path}: more than {max_decoded} frames in {plan.declared_s:.1f} s "
                        "(a damaged or forged file?)"
                    )
                if pts0 is None:
                    pts0 = frame.pts if frame.pts is not None else 0
                if frame.pts is not None:
                    ticks = frame.pts - pts0
                elif prev is None:  # no timestamps at all (a bare elementary stream): 0 s
                    ticks = 0
                else:  # no timestamp: one frame after the previous one
                    ticks = prev_ticks + (prev.duration or nominal)
                if prev is not None and ticks - prev_ticks > max_gap:
                    raise CorruptVideoError(
                        f"{path}: no frame for {float((ticks - prev_ticks) * tb):.1f} s after "
                        f"{float(prev_ticks * tb):.1f} s (more than "
                        f"{limits.max_frame_gap_s:g} s; a damaged or forged file?)"
                    )
                if prev is not None and ticks <= prev_ticks and not warned_order:
                    logger.warning(
                        "%s: non-increasing frame timestamps; later frame wins", path.name
                    )
                    warned_order = True
                # Outputs strictly before this frame's time show the previous frame:
                # k / rate < ticks * tb  <=>  k * rate.den * tb.den < ticks * tb.num * rate.num
                limit = ticks * tb.numerator * rate.numerator
                while (
                    k < n_out and prev is not None and k * rate.denominator * tb.denominator < limit
                ):
                    yield to_rgb(prev)  # again for each repeat: callers may modify arrays
                    k += 1
                if k >= n_out:
                    break
                prev, prev_ticks = frame, ticks
                prev_end = (ticks + ((frame.duration or 0) or nominal)) * tb
        except av.FFmpegError as e:
            raise CorruptVideoError(
                f"{path}: decoding failed after {k} of {n_out} output frames: {e}"
            ) from e

    if k >= n_out:
        return
    if prev is None:
        raise CorruptVideoError(f"{path}: no frames could be decoded")
    shortfall = plan.declared_s - float(prev_end)
    tolerance = min(1.0, 0.05 * plan.declared_s)
    if shortfall > tolerance:
        raise CorruptVideoError(
            f"{path}: frames end at {float(prev_end):.2f} s but the file declares "
            f"{plan.declared_s:.2f} s (truncated or damaged file?)"
        )
    if n_out - k > 0:
        logger.debug("%s: holding the last frame for %d output frames", path.name, n_out - k)
    while k < n_out:
        yield to_rgb(prev)
        k += 1
