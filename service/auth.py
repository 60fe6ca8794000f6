"""API keys: clients send ``Authorization: Bearer <key>`` (or ``x-api-key``) over REST or as
gRPC metadata; the service holds only SHA-256 digests of the keys it accepts."""

from __future__ import annotations

import hmac
from collections.abc import Mapping

from mam.audit import key_digest


def key_from_headers(headers: Mapping[str, str]) -> str | None:
    """``headers`` with lower-case names."""
    auth = headers.get("authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip() or None
    return headers.get("x-api-key") or None


class KeyCheck:
    def __init__(self, key_hashes: frozenset[str], disabled: bool) -> None:
        self.key_hashes, self.disabled = key_hashes, disabled

    def allows(self, headers: Mapping[str, str]) -> bool:
        if self.disabled:
            return True
        key = key_from_headers(headers)
        if not key:
            return False
        digest = key_digest(key)
        # Compare with every hash, so timing says nothing about which one (if any) matched.
        return any([hmac.compare_digest(digest, h) for h in self.key_hashes])
