"""DICOM files for tests, written with pydicom (helpers, not tests).

``write_dicom_video`` wraps a video bit stream (an MP4 or MPEG-TS file, or a bare elementary
stream) in a Video Photographic Image object the way a PACS stores a recording: encapsulated
Pixel Data (an empty Basic Offset Table, then the stream in one or more fragments) under a video
transfer syntax. ``write_dicom_image`` writes a DICOM object without video. ``remux`` copies a
recording's video packets into another container (no re-encoding), so decoded frames are
bit-identical to the source's.
"""

from __future__ import annotations

from pathlib import Path

import av
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    ExplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    VideoPhotographicImageStorage,
    generate_uid,
)

H264_TS = "1.2.840.10008.1.2.4.102"  # MPEG-4 AVC/H.264 High Profile / Level 4.1
H264_FRAGMENTABLE_TS = "1.2.840.10008.1.2.4.102.1"
HEVC_TS = "1.2.840.10008.1.2.4.107"  # HEVC/H.265 Main Profile / Level 5.1
# Identifying attributes a real object carries: tests check none of them leaks anywhere.
PATIENT_NAME = "Doe^Jane^Baby"
PATIENT_ID = "MRN-0042-SECRET"
ACCESSION = "ACC-77-SECRET"


def remux(src: str | Path, dst: str | Path, fmt: str) -> Path:
    """Copy the video packets of ``src`` into a ``fmt`` container (``mp4``, ``mpegts``, ``h264``
    for a bare Annex B stream, ``hevc``)."""
    with av.open(str(src)) as i, av.open(str(dst), "w", format=fmt) as o:
        s = i.streams.video[0]
        out = o.add_stream_from_template(s)
        for packet in i.demux(s):
            if packet.dts is None:  # the flush packet
                continue
            packet.stream = out
            o.mux(packet)
    return Path(dst)


def _base(sop_class: str, transfer_syntax: str, study_uid: str, series_uid: str) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = transfer_syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID
    ds.AccessionNumber = ACCESSION
    ds.PatientBirthDate = "20260101"
    ds.Modality = "XC"
    return ds


def write_dicom_video(
    path: str | Path,
    stream: str | Path | bytes,
    transfer_syntax: str = H264_TS,
    *,
    fragments: int = 1,
    size: tuple[int, int] = (640, 360),
    frames: int = 300,
    fps: float | None = 25.0,
    study_uid: str | None = None,
    series_uid: str | None = None,
) -> Path:
    """A Video Photographic Image Storage object holding ``stream`` (a file or its bytes) in
    ``fragments`` fragments. ``fps`` is written as Frame Time and Cine Rate (None: neither)."""
    data = Path(stream).read_bytes() if not isinstance(stream, bytes) else stream
    ds = _base(VideoPhotographicImageStorage, transfer_syntax,
               study_uid or generate_uid(), series_uid or generate_uid())  # fmt: skip
    w, h = size
    ds.Rows, ds.Columns = h, w
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "YBR_PARTIAL_420"
    ds.PlanarConfiguration = 0
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.NumberOfFrames = frames
    if fps is not None:
        ds.FrameTime = f"{1000.0 / fps:.4f}"
        ds.CineRate = round(fps)
    ds.PixelData = encapsulate([data], fragments_per_frame=fragments, has_bot=True)
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.save_as(path, enforce_file_format=True)
    return Path(path)


def write_dicom_image(path: str | Path, pixel_data: bool = True) -> Path:
    """A DICOM object without video: an 8x8 secondary-capture still (uncompressed), or, with
    ``pixel_data=False``, one with no Pixel Data at all."""
    ds = _base(SecondaryCaptureImageStorage, ExplicitVRLittleEndian, generate_uid(),
               generate_uid())  # fmt: skip
    if pixel_data:
        ds.Rows = ds.Columns = 8
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 8
        ds.HighBit = 7
        ds.PixelRepresentation = 0
        ds.PixelData = bytes(64)
    ds.save_as(path, enforce_file_format=True)
    return Path(path)
