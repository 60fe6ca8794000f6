"""DICOM video objects read as the recordings they carry, for :mod:`mam.video`.

Hospital archives (PACS) keep recordings as DICOM objects of the video storage classes (Video
Photographic, Endoscopic, Microscopic Image Storage; multi-frame ultrasound) whose Pixel Data
encapsulates one MPEG bit stream under a video transfer syntax (DICOM PS3.5 8.2.5-8.2.11,
Annex A.4): MPEG-2, MPEG-4 AVC/H.264 or HEVC/H.265. The current standard puts H.264 and HEVC in
an MPEG-2 Transport Stream or an MP4 container; older objects (and some vendors) hold the bare
elementary stream. FFmpeg recognises each by its content, so this module only has to present
the stream as a file:

* ``pydicom`` parses the header with the Pixel Data deferred (never loaded), reading only the
  attributes named in ``_TAGS``; the encapsulated fragments are located by their item headers.
* :class:`FragmentReader` is a read-only, seekable file over the fragments' byte ranges in the
  DICOM file itself, in order. PyAV reads it as it would the original MP4 or TS, so rotation,
  25-fps resampling, truncation checks and typed errors are exactly those of :mod:`mam.video`.
  Nothing is copied: no temporary file, no buffer the size of the recording.
* A bare elementary stream has no timestamps: its frame rate comes from the DICOM Frame Time,
  Cine Rate or Recommended Display Frame Rate (FFmpeg would otherwise assume 25 fps).

A DICOM object without a video stream (a still image, a multi-frame image in a non-video
transfer syntax, a report) raises :class:`DicomWithoutVideoError` (``dicom_without_video``).

Identifying attributes (names, ids, dates, UIDs) are never logged, put in error messages or
copied anywhere: messages name only the transfer syntax and storage class. ``read_uids`` returns
the study and series instance UIDs only for a caller that asks to echo them (e.g. into a FHIR
``ImagingStudy`` reference). pydicom's own warnings and log records, which may quote values
and name files, are silenced (``_quiet_pydicom``).
"""

from __future__ import annotations

import io
import logging
import os
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

from mam.errors import CorruptVideoError, DependencyMissingError, InputError

__all__ = [
    "DicomUids",
    "DicomVideo",
    "DicomWithoutVideoError",
    "FragmentReader",
    "VIDEO_TRANSFER_SYNTAXES",
    "is_dicom",
    "locate",
    "open_container",
    "read_uids",
]

PREAMBLE = 128
MAGIC = b"DICM"

# Transfer syntax UID -> (name, codec family of a bare elementary stream, FFmpeg raw demuxer).
# Fragmentable variants (".1") may split the stream over many fragments; the others use one.
_H264 = ("h264", "h264")
_HEVC = ("hevc", "hevc")
_MPEG2 = ("mpeg2", "mpegvideo")
VIDEO_TRANSFER_SYNTAXES: dict[str, tuple[str, tuple[str, str]]] = {
    "1.2.840.10008.1.2.4.100": ("MPEG2 Main Profile / Main Level", _MPEG2),
    "1.2.840.10008.1.2.4.100.1": ("Fragmentable MPEG2 Main Profile / Main Level", _MPEG2),
    "1.2.840.10008.1.2.4.101": ("MPEG2 Main Profile / High Level", _MPEG2),
    "1.2.840.10008.1.2.4.101.1": ("Fragmentable MPEG2 Main Profile / High Level", _MPEG2),
    "1.2.840.10008.1.2.4.102": ("MPEG-4 AVC/H.264 High Profile / Level 4.1", _H264),
    "1.2.840.10008.1.2.4.102.1": ("Fragmentable MPEG-4 AVC/H.264 High Profile / Level 4.1", _H264),
    "1.2.840.10008.1.2.4.103": ("MPEG-4 AVC/H.264 BD-compatible High Profile / Level 4.1", _H264),
    "1.2.840.10008.1.2.4.103.1": ("Fragmentable MPEG-4 AVC/H.264 BD-compatible", _H264),
    "1.2.840.10008.1.2.4.104": ("MPEG-4 AVC/H.264 High Profile / Level 4.2 For 2D Video", _H264),
    "1.2.840.10008.1.2.4.104.1": ("Fragmentable MPEG-4 AVC/H.264 Level 4.2 For 2D Video", _H264),
    "1.2.840.10008.1.2.4.105": ("MPEG-4 AVC/H.264 High Profile / Level 4.2 For 3D Video", _H264),
    "1.2.840.10008.1.2.4.105.1": ("Fragmentable MPEG-4 AVC/H.264 Level 4.2 For 3D Video", _H264),
    "1.2.840.10008.1.2.4.106": ("MPEG-4 AVC/H.264 Stereo High Profile / Level 4.2", _H264),
    "1.2.840.10008.1.2.4.106.1": ("Fragmentable MPEG-4 AVC/H.264 Stereo High Profile", _H264),
    "1.2.840.10008.1.2.4.107": ("HEVC/H.265 Main Profile / Level 5.1", _HEVC),
    "1.2.840.10008.1.2.4.108": ("HEVC/H.265 Main 10 Profile / Level 5.1", _HEVC),
}

# The only attributes parsed; everything else in the header is skipped unread.
_TAGS = (
    "SOPClassUID",
    "NumberOfFrames",
    "FrameTime",
    "CineRate",
    "RecommendedDisplayFrameRate",
    "PixelData",
)
_UID_TAGS = ("StudyInstanceUID", "SeriesInstanceUID")
_ITEM, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE0DD


class DicomWithoutVideoError(InputError):
    """A DICOM object that holds no video stream (a still, a multi-frame image in a non-video
    transfer syntax, a report, no Pixel Data at all)."""

    code = "dicom_without_video"


def is_dicom(path: str | os.PathLike) -> bool:
    """True for a DICOM Part 10 file: ``DICM`` after the 128-byte preamble."""
    try:
        with open(path, "rb") as f:
            f.seek(PREAMBLE)
            return f.read(4) == MAGIC
    except OSError:
        return False


@dataclass(frozen=True)
class DicomVideo:
    """Where a DICOM object's video stream lies: ``segments`` are ``(offset, length)`` byte
    ranges of the file, the fragments' values in order."""

    transfer_syntax: str  # the UID
    name: str  # the transfer syntax's name, safe to print
    segments: tuple[tuple[int, int], ...]
    frame_rate: float | None  # from Frame Time / Cine Rate, for bare elementary streams
    raw_format: str  # FFmpeg's demuxer for a bare elementary stream of this transfer syntax

    @property
    def size(self) -> int:
        return sum(n for _, n in self.segments)


@dataclass(frozen=True)
class DicomUids:
    """The identifiers a caller may ask to have echoed (never logged)."""

    study_instance_uid: str | None
    series_instance_uid: str | None


class _DropAll(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return False


def _quiet_pydicom() -> None:
    """pydicom logs what it finds odd with the file's name and, at times, attribute values;
    nothing of a DICOM file may reach this service's logs, so its logger says nothing here."""
    lg = logging.getLogger("pydicom")
    if not any(isinstance(f, _DropAll) for f in lg.filters):
        lg.addFilter(_DropAll())


def _pydicom():
    try:
        import pydicom
    except ImportError as e:  # a base dependency; only a broken install gets here
        raise DependencyMissingError(
            "reading DICOM video needs pydicom: pip install 'pydicom>=3'"
        ) from e
    _quiet_pydicom()
    return pydicom


_PIXEL_DATA_TAGS = (b"\xe0\x7f\x10\x00", b"\x7f\xe0\x00\x10")  # (7FE0,0010), LE and BE


def _has_pixel_data_tag(path: Path, chunk: int = 1 << 20) -> bool:
    """Whether the file holds a Pixel Data tag at all (pydicom drops an element it cannot
    finish, as in a truncated file); read in chunks, only on that error path."""
    tail = b""
    with open(path, "rb") as f:
        while block := f.read(chunk):
            data = tail + block
            if any(t in data for t in _PIXEL_DATA_TAGS):
                return True
            tail = data[-3:]
    return False


def _read_header(path: Path, tags: tuple[str, ...]):
    pydicom = _pydicom()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom's warnings may quote attribute values
            return pydicom.dcmread(path, defer_size=1024, specific_tags=list(tags))
    except Exception as e:  # noqa: BLE001 - pydicom raises many kinds; none is the caller's
        raise CorruptVideoError(
            f"{path}: a DICOM file whose header cannot be read (truncated or damaged?): "
            f"{type(e).__name__}"
        ) from None


def _frame_rate(ds) -> float | None:
    """Frames per second from Frame Time (ms), Cine Rate or Recommended Display Frame Rate."""
    for name, to_fps in (
        ("FrameTime", lambda v: 1000.0 / v),
        ("CineRate", float),
        ("RecommendedDisplayFrameRate", float),
    ):
        try:
            value = float(ds.get(name)) if ds.get(name) not in (None, "") else None
        except (TypeError, ValueError):
            value = None
        if value is not None and value > 0:
            fps = to_fps(value)
            if 0.1 <= fps <= 1000:
                return fps
    return None


def _fragments(path: Path, value_offset: int, little_endian: bool) -> list[tuple[int, int]]:
    """Byte ranges of the encapsulated fragments after the Basic Offset Table item."""
    e = "<" if little_endian else ">"
    segments: list[tuple[int, int]] = []
    size = path.stat().st_size
    with open(path, "rb") as f:
        f.seek(value_offset)
        pos = value_offset
        first = True
        while True:
            head = f.read(8)
            if len(head) < 8:
                raise CorruptVideoError(
                    f"{path}: the DICOM Pixel Data ends before its sequence delimiter "
                    "(truncated file?)"
                )
            group, elem, length = struct.unpack(f"{e}HHL", head)
            tag = group << 16 | elem
            pos += 8
            if tag == _SEQUENCE_END:
                break
            if tag != _ITEM or length == 0xFFFFFFFF:
                raise CorruptVideoError(f"{path}: malformed encapsulated DICOM Pixel Data")
            if pos + length > size:
                raise CorruptVideoError(
                    f"{path}: a DICOM Pixel Data fragment runs past the end of the file "
                    "(truncated file?)"
                )
            if not first and length:  # the first item is the Basic Offset Table
                segments.append((pos, length))
            first = False
            f.seek(length, io.SEEK_CUR)
            pos += length
    return segments


def locate(path: str | os.PathLike) -> DicomVideo:
    """Find the video stream of a DICOM file, or raise the typed error that says why not."""
    p = Path(os.fspath(path))
    ds = _read_header(p, _TAGS)
    meta = getattr(ds, "file_meta", None)
    ts = str(getattr(meta, "TransferSyntaxUID", "") or "")
    sop = ds.get("SOPClassUID")
    kind = getattr(sop, "name", None) or "an unknown storage class"
    if not ts:
        raise CorruptVideoError(
            f"{p}: a DICOM file without its file meta information (no transfer syntax): "
            "damaged, or not a DICOM Part 10 file"
        )
    if ts not in VIDEO_TRANSFER_SYNTAXES:
        from pydicom.uid import UID

        ts_name = UID(ts).name
        raise DicomWithoutVideoError(
            f"{p}: a DICOM object ({kind}) whose transfer syntax ({ts_name}) is not a video "
            "one; only MPEG-2, MPEG-4 AVC/H.264 and HEVC/H.265 encapsulated video is screened"
        )
    name, (_, raw_format) = VIDEO_TRANSFER_SYNTAXES[ts]
    elem = ds.get_item("PixelData", keep_deferred=True) if "PixelData" in ds else None
    if elem is None:
        if _has_pixel_data_tag(p):
            raise CorruptVideoError(
                f"{p}: the {name} Pixel Data of this DICOM object cannot be read "
                "(truncated or damaged file?)"
            )
        raise DicomWithoutVideoError(f"{p}: a DICOM object ({kind}) without Pixel Data")
    tell = getattr(elem, "value_tell", None)
    if tell is None or getattr(elem, "length", 0) != 0xFFFFFFFF:
        raise CorruptVideoError(
            f"{p}: {name} Pixel Data must be encapsulated (undefined length); it is not"
        )
    little = getattr(elem, "is_little_endian", True)
    segments = _fragments(p, tell, little)
    if not segments or sum(n for _, n in segments) == 0:
        raise DicomWithoutVideoError(f"{p}: a DICOM object ({kind}) with empty {name} Pixel Data")
    return DicomVideo(ts, name, tuple(segments), _frame_rate(ds), raw_format)


def read_uids(path: str | os.PathLike) -> DicomUids | None:
    """Study and series instance UIDs of a DICOM file (None for any other file), for a caller
    that asked to echo them. Never logged."""
    p = Path(os.fspath(path))
    if not is_dicom(p):
        return None
    ds = _read_header(p, _UID_TAGS)

    def uid(name: str) -> str | None:
        v = ds.get(name)
        return str(v).strip() or None if v is not None else None

    return DicomUids(uid("StudyInstanceUID"), uid("SeriesInstanceUID"))


class FragmentReader(io.RawIOBase):
    """Read-only, seekable file over byte ranges of another file, concatenated in order.

    Args:
        path: the file that holds the ranges.
        segments: ``(offset, length)`` pairs.
    """

    def __init__(self, path: str | os.PathLike, segments: tuple[tuple[int, int], ...]) -> None:
        super().__init__()
        self._f = open(path, "rb")  # noqa: SIM115 - closed by close(), which PyAV calls
        self._segments = segments
        starts, total = [], 0
        for _, n in segments:
            starts.append(total)
            total += n
        self._starts, self._size, self._pos = starts, total, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        done = 0
        while done < len(view) and self._pos < self._size:
            i = self._segment(self._pos)
            offset, length = self._segments[i]
            within = self._pos - self._starts[i]
            n = min(len(view) - done, length - within)
            self._f.seek(offset + within)
            got = self._f.readinto(view[done : done + n])
            if not got:
                break
            done += got
            self._pos += got
        return done

    def _segment(self, pos: int) -> int:
        import bisect

        return bisect.bisect_right(self._starts, pos) - 1

    def close(self) -> None:
        if not self.closed:
            self._f.close()
        super().close()


def _raw_kind(head: bytes) -> bool:
    """True when the stream is a bare elementary stream (no container to give timestamps)."""
    if head[4:8] in (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip"):
        return False  # MP4
    if head[:1] == b"\x47":
        return False  # MPEG-TS
    if head.startswith(b"\x00\x00\x01\xba"):
        return False  # MPEG-PS
    return head.startswith((b"\x00\x00\x00\x01", b"\x00\x00\x01"))


def _stream_rate(path: Path, video: DicomVideo) -> float | None:
    """The frame rate a bare stream declares itself (H.264/HEVC VUI timing), if any."""
    import av

    try:  # PyAV closes the reader with the container
        with av.open(FragmentReader(path, video.segments), format=video.raw_format,
                     metadata_errors="replace") as c:  # fmt: skip
            rate = c.streams.video[0].codec_context.framerate if c.streams.video else None
    except (av.FFmpegError, OSError):
        return None
    return float(rate) if rate is not None and rate > 0 else None


def open_container(path: str | os.PathLike):
    """The video stream of a DICOM file as a PyAV input container (``mam.video`` calls it for
    files that start like DICOM). Raises ``DicomWithoutVideoError``, ``CorruptVideoError``.

    A bare elementary stream's frame rate is the one its own timing information declares (DICOM
    PS3.5 8.2: the bit stream's characteristics prevail), else the DICOM Frame Time, Cine Rate or
    Recommended Display Frame Rate, else FFmpeg's default of 25 fps."""
    import av

    p = Path(os.fspath(path))
    video = locate(p)
    reader = FragmentReader(p, video.segments)
    kwargs: dict = {}
    if _raw_kind(reader.read(16)):
        kwargs["format"] = video.raw_format
        rate = _stream_rate(p, video) or video.frame_rate
        if rate is not None:
            kwargs["options"] = {"framerate": f"{rate:.6g}"}
    reader.seek(0)
    try:
        return av.open(reader, metadata_errors="replace", **kwargs)
    except (av.FFmpegError, OSError) as e:
        reader.close()
        raise CorruptVideoError(
            f"{p}: the {video.name} stream in this DICOM object cannot be read "
            f"(damaged or truncated?): {e}"
        ) from e
