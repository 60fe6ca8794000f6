"""Store DICOM files (the results' SRs) to a PACS over DICOMweb STOW-RS.

One file per ``POST {base}/studies`` (``multipart/related; type="application/dicom"``), so that a
refusal names its file and a retry resends only that file. Storing is idempotent: an SR's SOP
Instance UID is fixed by its result id, so a PACS files a second store of it as the same instance;
a PACS that refuses it as a duplicate (failure reason 0111H) counts as "already stored".
5xx answers, 429 and network failures are retried with back-off; a refusal (4xx, or the file in
the response's FailedSOPSequence) is not. The base URL must be https, or http on loopback.
Credentials come from files (a bearer token, or ``user:password`` for basic auth), never from
the command line; nothing here logs paths, UIDs or secrets.
"""

from __future__ import annotations

import logging
import random
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from mam.errors import InputError, MamError
from mam.remote import read_secret, require_https

log = logging.getLogger(__name__)

DICOM_JSON = "application/dicom+json"
FAILED_SOP_SEQUENCE = "00081198"
REFERENCED_SOP_SEQUENCE = "00081199"
FAILURE_REASON = "00081197"
REFERENCED_SOP_INSTANCE_UID = "00081155"
DUPLICATE_SOP_INSTANCE = 0x0111


class InvalidDicomwebUrlError(InputError):
    """The DICOMweb base URL is not an absolute http(s) URL."""

    code = "invalid_dicomweb_url"


class InsecureDicomwebUrlError(InvalidDicomwebUrlError):
    """Plain http to a host other than loopback: health data would cross the network in clear."""

    code = "insecure_dicomweb_url"


class InvalidDicomwebAuthError(InputError):
    """The credentials file is missing, empty or malformed, or both kinds were given."""

    code = "invalid_dicomweb_auth"


class DicomwebUnauthorizedError(InputError):
    """The PACS answered 401/403 to the credentials given."""

    code = "dicomweb_unauthorized"


class NothingToStoreError(InputError):
    """The path holds no .dcm file."""

    code = "nothing_to_store"


class StowRefusedError(InputError):
    """The PACS refused a file (an HTTP 4xx, or the file in the FailedSOPSequence)."""

    code = "stow_refused"


class StowUnavailableError(MamError):
    """The PACS did not answer, or answered 5xx, through every retry."""

    code = "stow_unavailable"


@dataclass(frozen=True)
class Stored:
    """One file's outcome: ``stored`` or ``already stored``."""

    path: Path
    sop_instance_uid: str | None
    status: str


def check_base_url(url: str | None) -> str:
    """``url`` without its trailing slash if it is https, or http on loopback."""
    return require_https(url or "", "DICOMweb base URL", InvalidDicomwebUrlError,
                         InsecureDicomwebUrlError)  # fmt: skip


def _secret(path: Path, what: str) -> str:
    return read_secret(path, what, InvalidDicomwebAuthError)


def auth_headers(token_file: Path | None = None, basic_auth_file: Path | None = None) -> dict:
    """The Authorization header from a bearer token file or a ``user:password`` file."""
    import base64

    if token_file and basic_auth_file:
        raise InvalidDicomwebAuthError("give a token file or a basic auth file, not both")
    if token_file:
        return {"Authorization": "Bearer " + _secret(token_file, "token")}
    if basic_auth_file:
        pair = _secret(basic_auth_file, "basic auth")
        if ":" not in pair:
            raise InvalidDicomwebAuthError(
                f"the basic auth file {basic_auth_file} must hold user:password on one line"
            )
        return {"Authorization": "Basic " + base64.b64encode(pair.encode()).decode()}
    return {}


def dicom_files(path: Path) -> list[Path]:
    """One .dcm file, or every .dcm in a folder (a ``mam batch --dicom-sr`` OUT or OUT/sr)."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        from mam.errors import FileNotFoundInputError

        raise FileNotFoundInputError(f"no such file or folder: {path}")
    files = sorted(path.glob("*.dcm")) or sorted((path / "sr").glob("*.dcm"))
    if not files:
        raise NothingToStoreError(f"no .dcm file in {path} (nor in its sr/ folder)")
    return files


def _sop_instance_uid(data: bytes) -> str | None:
    """The file's SOP Instance UID, or None where it is not readable DICOM (the PACS judges)."""
    import io

    import pydicom

    try:
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True,
                             specific_tags=["SOPInstanceUID"])  # fmt: skip
        return str(ds.SOPInstanceUID)
    except Exception:  # noqa: BLE001 - any unreadable file is for the PACS to refuse
        return None


def _seq(doc: dict, tag: str) -> list[dict]:
    return (doc.get(tag) or {}).get("Value") or []


def _value(item: dict, tag: str):
    values = (item.get(tag) or {}).get("Value") or [None]
    return values[0]


class StowClient:
    """A STOW-RS client for one DICOMweb base URL (e.g. Orthanc's ``http://host:8042/dicom-web``)."""

    def __init__(self, base_url: str, *, token_file: Path | None = None,
                 basic_auth_file: Path | None = None, timeout: float = 30.0, attempts: int = 4,
                 backoff_s: float = 1.0, transport=None) -> None:  # fmt: skip
        import httpx

        self.base = check_base_url(base_url)
        self._headers = auth_headers(token_file, basic_auth_file)
        self.attempts, self.backoff_s = max(1, attempts), backoff_s
        self._http = httpx.Client(timeout=timeout, transport=transport)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> StowClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def store_all(self, files: list[Path]) -> list[Stored]:
        """Store every file in order; the first refusal or outage stops with a typed error."""
        out = [self.store(f) for f in files]
        log.info("stored %d DICOM file(s) over STOW-RS (%d already there)",
                 len(out), sum(s.status != "stored" for s in out))  # fmt: skip
        return out

    def store(self, path: Path) -> Stored:
        try:
            data = Path(path).read_bytes()
        except OSError:
            from mam.errors import FileNotFoundInputError

            raise FileNotFoundInputError(f"cannot read {path}") from None
        sop = _sop_instance_uid(data)
        response = self._post(data, path)
        return Stored(Path(path), sop, self._outcome(response, path, sop))

    def _post(self, data: bytes, path: Path):
        import httpx

        boundary = uuid.uuid4().hex
        body = (f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + data
                + f"\r\n--{boundary}--\r\n".encode())  # fmt: skip
        headers = {
            **self._headers,
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Accept": DICOM_JSON,
        }
        why = ""
        for attempt in range(self.attempts):
            if attempt:
                delay = self.backoff_s * 2 ** (attempt - 1)
                time.sleep(delay * (0.5 + random.random() / 2))
            try:
                r = self._http.post(self.base + "/studies", content=body, headers=headers)
            except httpx.TransportError as e:  # timeouts included
                why = type(e).__name__
                log.info("STOW-RS attempt %d failed: %s", attempt + 1, why)
                continue
            if r.status_code >= 500 or r.status_code == 429:
                why = f"HTTP {r.status_code}"
                log.info("STOW-RS attempt %d failed: %s", attempt + 1, why)
                continue
            return r
        raise StowUnavailableError(
            f"the PACS at {self.base} did not store {path} after {self.attempts} attempts ({why})"
        )

    def _outcome(self, r, path: Path, sop: str | None) -> str:
        if r.status_code in (401, 403):
            raise DicomwebUnauthorizedError(
                f"the PACS refused the credentials (HTTP {r.status_code}) storing {path}"
            )
        try:
            doc = r.json() if r.content else {}
        except ValueError:
            doc = {}
        doc = doc if isinstance(doc, dict) else {}
        failed = _seq(doc, FAILED_SOP_SEQUENCE)
        reasons = {_value(f, FAILURE_REASON) for f in failed}
        if failed and reasons == {DUPLICATE_SOP_INSTANCE}:
            return "already stored"
        if r.status_code >= 400 or failed:
            detail = ", ".join(f"failure reason {x:04X}H" for x in sorted(reasons) if
                               isinstance(x, int)) or f"HTTP {r.status_code}"  # fmt: skip
            if sop is None:
                detail += "; it is not a readable DICOM file"
            raise StowRefusedError(f"the PACS refused {path} ({detail})")
        stored = {_value(i, REFERENCED_SOP_INSTANCE_UID)
                  for i in _seq(doc, REFERENCED_SOP_SEQUENCE)}  # fmt: skip
        if sop is not None and stored and sop not in stored:
            raise StowRefusedError(f"the PACS did not list {path} as stored (HTTP {r.status_code})")
        return "stored"


def store(path: Path, base_url: str, **kwargs) -> list[Stored]:
    """Store one .dcm file, or every .dcm in a folder, to the PACS at ``base_url``."""
    base = check_base_url(base_url)
    files = dicom_files(path)
    with StowClient(base, **kwargs) as client:
        return client.store_all(files)
