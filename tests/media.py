"""Real small video files for tests, written with PyAV (helpers, not tests).

Frames made by ``index_frame`` carry their own index as an 11-bit code of large black/white cells,
so a test can read back which source frame a decoder or resampler delivered even after lossy
compression and downscaling (``read_index``). The top-left cell is a red marker, so a test can
see where the original top-left corner ended up after rotation (``marker_corner``).

Layout of an index frame (4 rows x 6 columns of cells): row 0 = [red marker, bits 0-4],
row 1 = bits 5-10, rows 2-3 = dark grey background with a green square that moves with the index.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

GRID_COLS = 6
GRID_ROWS = 4
INDEX_BITS = 11  # cells 1..11 of the first two rows; indices up to 2047
MARKER_RGB = (255, 0, 0)
_BACKGROUND = 40
_VFR_CLOCK = 90_000  # mp4/MPEG clock for variable-frame-rate timestamps

# Encoder defaults that keep the index cells clean at tiny sizes and run fast.
_DEFAULT_OPTIONS: dict[str, dict[str, str]] = {
    "libx264": {"preset": "ultrafast", "crf": "18"},
    "libx265": {"preset": "ultrafast", "crf": "18", "x265-params": "log-level=error"},
    "libvpx-vp9": {"deadline": "realtime", "cpu-used": "8", "crf": "20", "b": "0"},
    "mpeg4": {"qscale": "3"},
    "mjpeg": {"qscale": "3"},
}
_DEFAULT_PIX_FMT = {"mjpeg": "yuvj420p"}
_CONTAINER_BY_SUFFIX = {
    ".mkv": "matroska",
    ".webm": "webm",
    ".avi": "avi",
    ".mov": "mov",
    ".ts": "mpegts",
}


def _cell_bounds(row: int, col: int, w: int, h: int) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1) of a grid cell in a w x h frame."""
    return (
        row * h // GRID_ROWS,
        (row + 1) * h // GRID_ROWS,
        col * w // GRID_COLS,
        (col + 1) * w // GRID_COLS,
    )


def _bit_cell(bit: int) -> tuple[int, int]:
    cell = bit + 1  # cell 0 is the marker
    return cell // GRID_COLS, cell % GRID_COLS


def index_frame(i: int, w: int = 160, h: int = 120) -> np.ndarray:
    """RGB uint8 ``[h, w, 3]`` frame that encodes ``i`` (0 <= i < 2048) robustly."""
    if not 0 <= i < 2**INDEX_BITS:
        raise ValueError(f"index {i} does not fit in {INDEX_BITS} bits")
    img = np.full((h, w, 3), _BACKGROUND, np.uint8)
    y0, y1, x0, x1 = _cell_bounds(0, 0, w, h)
    img[y0:y1, x0:x1] = MARKER_RGB
    for bit in range(INDEX_BITS):
        y0, y1, x0, x1 = _cell_bounds(*_bit_cell(bit), w, h)
        img[y0:y1, x0:x1] = 255 if (i >> bit) & 1 else 0
    # A moving square in the lower half: real motion for codecs and motion-based consumers.
    side = max(2, h // 6)
    top = h // 2 + (h // 2 - side) // 2
    span = max(1, w - side)
    left = (i * 7) % (2 * span)
    left = left if left < span else 2 * span - left
    img[top : top + side, left : left + side] = (0, 200, 0)
    return img


def read_index(img: np.ndarray) -> int:
    """Index encoded by ``index_frame`` in an upright RGB frame of any size."""
    h, w = img.shape[:2]
    grey = img.astype(np.float32).mean(axis=2)
    value = 0
    for bit in range(INDEX_BITS):
        y0, y1, x0, x1 = _cell_bounds(*_bit_cell(bit), w, h)
        dy, dx = max(1, (y1 - y0) // 4), max(1, (x1 - x0) // 4)
        if grey[y0 + dy : y1 - dy, x0 + dx : x1 - dx].mean() > 127:
            value |= 1 << bit
    return value


def marker_corner(img: np.ndarray) -> str:
    """Corner ("top-left", "top-right", "bottom-left", "bottom-right") holding the red marker."""
    h, w = img.shape[:2]
    ch, cw = max(1, h // 12), max(1, w // 12)
    corners = {
        "top-left": img[:ch, :cw],
        "top-right": img[:ch, -cw:],
        "bottom-left": img[-ch:, :cw],
        "bottom-right": img[-ch:, -cw:],
    }

    def redness(patch: np.ndarray) -> float:
        p = patch.astype(np.float32)
        return float((p[..., 0] - (p[..., 1] + p[..., 2]) / 2).mean())

    return max(corners, key=lambda k: redness(corners[k]))


def moving_square_frames(n: int, w: int = 160, h: int = 120) -> Iterator[np.ndarray]:
    """``n`` index frames (``index_frame(i, w, h)`` for i in 0..n-1)."""
    for i in range(n):
        yield index_frame(i, w, h)


def _as_rate(fps: float | Fraction) -> Fraction:
    return Fraction(fps).limit_denominator(1_000_000)


class _NonSeekable:
    """File wrapper without ``seek``: muxers cannot go back to write the duration, as when a
    browser's MediaRecorder streams a WebM."""

    def __init__(self, f) -> None:
        self._f = f

    def write(self, data: bytes) -> int:
        return self._f.write(data)


def write_video(
    path: str | Path,
    frames: Iterable[np.ndarray] | Callable[[int], np.ndarray] | int,
    fps: float | Fraction = 25,
    codec: str = "libx264",
    *,
    n_frames: int | None = None,
    size: tuple[int, int] = (160, 120),
    rotation: int = 0,
    hflip: bool = False,
    pix_fmt: str | None = None,
    options: dict[str, str] | None = None,
    container_options: dict[str, str] | None = None,
    sample_aspect_ratio: Fraction | None = None,
    seekable: bool = True,
    start_s: float = 0.0,
    times_s: Sequence[float] | None = None,
) -> Path:
    """Encode frames to ``path``; the container follows the suffix (.mp4 .mov .mkv .webm .avi .ts).

    ``frames`` is an iterable of RGB uint8 ``[H, W, 3]`` arrays, a callable ``i -> frame`` (then
    ``n_frames`` is required), or an int ``n``: ``n`` index frames of ``size`` (w, h).
    ``fps`` is a float or, for NTSC rates, a Fraction such as ``Fraction(30000, 1001)``.
    ``rotation`` is the clockwise display rotation (0/90/180/270, like the legacy mp4 ``rotate``
    tag), written as a real display matrix; ``hflip`` adds a mirror after it.
    ``seekable=False`` writes through a non-seekable handle, so mkv/webm end up without a
    duration. ``start_s`` delays the first frame's timestamp, as in broadcast or cut recordings.
    ``times_s`` gives each frame's presentation time (variable frame rate, 1/90000 s clock; then
    ``fps`` is only the nominal rate). Returns the path.
    """
    path = Path(path)
    if isinstance(frames, int):
        n_frames, w, h = frames, size[0], size[1]
        frames = moving_square_frames(n_frames, w, h)
    elif callable(frames):
        if n_frames is None:
            raise ValueError("n_frames is required when frames is a callable")
        make = frames
        frames = (make(i) for i in range(n_frames))
    frames = iter(frames)
    try:
        first = next(frames)
    except StopIteration:
        raise ValueError("no frames to write") from None
    h, w = first.shape[:2]

    fmt = _CONTAINER_BY_SUFFIX.get(path.suffix.lower())
    opts = dict(_DEFAULT_OPTIONS.get(codec, {}))
    opts.update(options or {})
    with open(path, "wb") as raw:
        target = raw if seekable else _NonSeekable(raw)
        with av.open(target, "w", format=fmt or "mp4", options=container_options or {}) as out:
            stream = out.add_stream(codec, rate=_as_rate(fps), options=opts)
            stream.width, stream.height = w, h
            stream.pix_fmt = pix_fmt or _DEFAULT_PIX_FMT.get(codec, "yuv420p")
            if sample_aspect_ratio is not None:
                stream.codec_context.sample_aspect_ratio = Fraction(sample_aspect_ratio)
            if rotation % 360 or hflip:
                # PyAV takes counter-clockwise degrees; ours are clockwise like the rotate tag.
                stream.set_display_rotation(-(rotation % 360), hflip=hflip)
            if times_s is not None:
                stream.codec_context.time_base = stream.time_base = Fraction(1, _VFR_CLOCK)
            start_pts = round(start_s * _as_rate(fps))
            for i, img in enumerate(_chain(first, frames)):
                frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")
                if times_s is not None:
                    frame.pts = round((start_s + times_s[i]) * _VFR_CLOCK)
                    frame.time_base = Fraction(1, _VFR_CLOCK)
                elif start_pts:
                    frame.pts, frame.time_base = start_pts + i, 1 / _as_rate(fps)
                for packet in stream.encode(frame):
                    out.mux(packet)
            for packet in stream.encode():
                out.mux(packet)
    return path


def _chain(first: np.ndarray, rest: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
    yield first
    yield from rest


def write_audio_only(path: str | Path, duration_s: float = 10.0, rate: int = 16_000) -> Path:
    """A file with one AAC audio stream and no video (mp4/m4a/mkv by suffix)."""
    path = Path(path)
    fmt = _CONTAINER_BY_SUFFIX.get(path.suffix.lower(), "mp4")
    with av.open(str(path), "w", format=fmt) as out:
        stream = out.add_stream("aac", rate=rate, layout="mono")
        block = 1024
        n_blocks = math.ceil(duration_s * rate / block)
        t = np.arange(block, dtype=np.float32) / rate
        for b in range(n_blocks):
            samples = 0.1 * np.sin(2 * np.pi * 440 * (t + b * block / rate), dtype=np.float32)
            frame = av.AudioFrame.from_ndarray(samples[None, :], format="fltp", layout="mono")
            frame.sample_rate = rate
            frame.pts = b * block
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def truncate(path: str | Path, fraction: float, out: str | Path | None = None) -> Path:
    """Keep the first ``fraction`` of the bytes, in place or in ``out``; returns that path."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    path = Path(path)
    data = path.read_bytes()
    target = Path(out) if out is not None else path
    target.write_bytes(data[: int(len(data) * fraction)])
    return target
