"""Typed errors of the screening pipeline.

Every failure a user can cause (bad file, bad infant data, nothing to track) is a subclass of
:class:`MamError` with a stable machine-readable ``code``. The CLI prints ``code: message`` on one
line; the service maps codes to HTTP statuses in one table. Messages never contain health data
(no infant identifiers, no file contents); a path is named only where the user gave it.
"""

from __future__ import annotations


class MamError(Exception):
    """Base of every error the pipeline raises on purpose."""

    code: str = "mam_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class InputError(MamError):
    """The input cannot be screened; the caller must change it."""

    code = "invalid_input"


# --- files and video -----------------------------------------------------------------------------
class FileNotFoundInputError(InputError):
    code = "file_not_found"


class EmptyFileError(InputError):
    code = "empty_file"


class NotAVideoError(InputError):
    """The file is not a container FFmpeg can open, or holds no video stream (e.g. audio only)."""

    code = "not_a_video"


class UnsupportedCodecError(InputError):
    code = "unsupported_codec"


class CorruptVideoError(InputError):
    """Decoding failed part-way (truncated or damaged file)."""

    code = "corrupt_video"


class VideoTooShortError(InputError):
    """Shorter than one 240-frame (9.6 s) instance."""

    code = "video_too_short"


class VideoTooLongError(InputError):
    code = "video_too_long"


class ResolutionTooLargeError(InputError):
    code = "resolution_too_large"


# --- pose ----------------------------------------------------------------------------------------
class NoInfantDetectedError(InputError):
    """No person was found in any frame."""

    code = "no_infant_detected"


class InsufficientTrackingError(InputError):
    """A person was found, but in too few frames to screen reliably."""

    code = "insufficient_tracking"


class InvalidPoseError(InputError):
    """A precomputed pose array has the wrong shape, dtype or non-finite values."""

    code = "invalid_pose"


# --- tensors and infant data ---------------------------------------------------------------------
class InvalidTensorError(InputError):
    code = "invalid_tensor"


class InvalidInfantDataError(InputError):
    code = "invalid_infant_data"


# --- configuration -------------------------------------------------------------------------------
class ModelLoadError(MamError):
    """Weights or their metadata are missing, corrupt, or of an incompatible version."""

    code = "model_load_error"


class DependencyMissingError(MamError):
    """An optional dependency needed for this feature is not installed."""

    code = "dependency_missing"


# --- added with mam.video ------------------------------------------------------------------------
class FileTooLargeError(NotAVideoError):
    """Larger than the configured upload limit (a NotAVideoError, so existing handlers still
    catch it; its own code lets a service answer 413)."""

    code = "file_too_large"


# --- batch output folder and ledger (mam.batch) --------------------------------------------------
class OutputNotWritableError(InputError):
    """The output folder (or its ledger) cannot be created or written."""

    code = "output_not_writable"


class DiskFullError(InputError):
    """Too little free space under the output folder, before a run or while it writes."""

    code = "disk_full"


class CorruptLedgerError(InputError):
    """``ledger.sqlite`` is not a readable batch ledger (damaged, truncated, another file)."""

    code = "corrupt_ledger"


class AlteredResultError(InputError):
    """A result stored in the ledger no longer matches the digest written with it."""

    code = "altered_result"


class UnverifiedResultError(InputError):
    """Results in a ledger carry no digest (written before results were digested)."""

    code = "unverified_result"


class LedgerError(MamError):
    """The ledger failed for a reason of the machine (I/O error, locked too long)."""

    code = "ledger_error"
