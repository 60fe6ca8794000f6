"""The rules for talking to a site's servers (a FHIR server, a PACS over DICOMweb), in one place:
results are health data, so a base URL must be https except on loopback, and secrets are read
from files (mounted secrets), never taken from a command line."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from urllib.parse import urlsplit


def is_loopback(url_or_host: str) -> bool:
    """Whether a host (or a URL's host) is this machine: ``localhost`` or a literal loopback
    address. Names are not resolved, since a name can point anywhere."""
    try:  # a bare address, IPv6 ones included (``::1``)
        return ipaddress.ip_address(url_or_host.strip("[]")).is_loopback
    except ValueError:
        pass
    host = urlsplit(url_or_host if "//" in url_or_host else "//" + url_or_host).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def require_https(url: str, what: str, invalid: type[Exception], insecure: type[Exception]) -> str:
    """``url`` without its trailing slash if it is https, or http on loopback; ``invalid`` for
    what is not an absolute http(s) URL, ``insecure`` for plain http elsewhere."""
    parts = urlsplit(url or "")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise invalid(f"the {what} must be an absolute https:// URL")
    if parts.scheme == "http" and not is_loopback(parts.hostname):
        raise insecure(f"the {what} is plain http:// to a host other than loopback: use https://")
    return url.rstrip("/")


def read_secret(path: str | Path, what: str, error: type[Exception]) -> str:
    """A secret file's content, stripped; ``error`` when it cannot be read or is empty."""
    try:
        value = Path(path).read_text().strip()
    except OSError:
        raise error(f"cannot read the {what} file {path}") from None
    if not value:
        raise error(f"the {what} file {path} is empty")
    return value
