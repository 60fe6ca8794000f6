"""Who may review: a local user list with hashed passwords, or the screening service's API keys.

* Users file (``DIR/review_users`` unless ``--users``/``MAM_REVIEW_USERS`` says otherwise): one
  ``name:roles:scrypt$N$r$p$salt$hash`` line per reviewer, written by ``mam review DIR
  --add-user NAME [--role ROLE]``. scrypt (RFC 7914, Python's ``hashlib``) with a random 16-byte
  salt per user.
* Roles (:data:`ROLES`): every user reviews as an assessor; ``senior`` also sees every
  assessor's review of a recording and signs off the final verdict (and amends it, with a
  reason); ``admin`` also exports, reads the access log and sets blind review for the worklist.
  Lines without roles (files written before roles existed): a lone user is ``senior,admin``
  (someone must be able to sign off and export), several are assessors; the next
  ``--add-user`` writes those roles out. A service key logs in as an assessor.
* Service keys: the SHA-256 digests the service accepts (``MAM_API_KEY_HASHES``); a reviewer
  logs in with a name and a key as the password and is recorded as ``name~key-<digest[:8]>``
  (the name is self-declared, the key says who vouched for it).
* Sessions: a random 256-bit token in an ``HttpOnly; SameSite=Strict`` cookie; the store keeps
  its SHA-256 only, with the session's CSRF token.
* Failed logins are throttled per client address and name (:class:`Throttle`), never per name
  alone: wrong passwords from one machine slow that machine down and cannot lock a colleague
  out of their own name.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import secrets
import time
from pathlib import Path

from mam.audit import key_digest
from mam.files import write_atomic

USERS_FILE = "review_users"
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
_SCRYPT = (2**14, 8, 1)  # N, r, p: about 16 MiB and tens of ms per check
MIN_PASSWORD = 8
FREE_FAILURES = 3  # failures from one client for one name before the backoff starts
MAX_DELAY_S = 60.0


ROLES = ("assessor", "senior", "admin")
FIRST_USER_ROLES = ("senior", "admin")


class UsersFileError(ValueError):
    pass


def parse_roles(text: str) -> frozenset[str]:
    """``"senior,admin"`` -> the roles; :class:`UsersFileError` for an unknown one."""
    roles = frozenset(r.strip() for r in text.split(",") if r.strip())
    bad = sorted(roles - set(ROLES))
    if bad or not roles:
        raise UsersFileError(f"a role is one of {', '.join(ROLES)} (comma-separated for several)")
    return roles


def hash_password(password: str, salt: bytes | None = None) -> str:
    n, r, p = _SCRYPT
    salt = salt or os.urandom(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, dklen=32)
    b64 = base64.b64encode
    return f"scrypt${n}${r}${p}${b64(salt).decode()}${b64(digest).decode()}"


def verify_password(password: str, encoded: str) -> bool:
    try:
        algo, n, r, p, salt, digest = encoded.split("$")
        if algo != "scrypt":
            return False
        got = hashlib.scrypt(password.encode(), salt=base64.b64decode(salt), n=int(n),
                             r=int(r), p=int(p), dklen=32)  # fmt: skip
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, base64.b64decode(digest))


def read_users_roles(path: Path | None) -> dict[str, tuple[str, frozenset[str]]]:
    """``{name: (encoded hash, roles)}``; an absent file is no users."""
    if path is None or not path.is_file():
        return {}
    users: dict[str, tuple[str, frozenset[str] | None]] = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, rest = line.partition(":")
        roles = None
        if sep and not rest.startswith("scrypt$"):
            text, _, rest = rest.partition(":")
            try:
                roles = parse_roles(text)
            except UsersFileError:
                raise UsersFileError(f"{path.name} line {n}: unknown role") from None
        if not sep or not NAME.match(name) or not rest.startswith("scrypt$"):
            raise UsersFileError(f"{path.name} line {n}: expected name:roles:scrypt$...")
        users[name] = (rest, roles)
    legacy = frozenset(FIRST_USER_ROLES) if len(users) == 1 else frozenset({"assessor"})
    return {k: (h, r if r is not None else legacy) for k, (h, r) in users.items()}


def read_users(path: Path | None) -> dict[str, str]:
    """``{name: encoded hash}``; an absent file is no users."""
    return {k: h for k, (h, _) in read_users_roles(path).items()}


def add_user(path: Path, name: str, password: str, roles: str | None = None) -> None:
    """Add or replace ``name`` in the users file (written atomically, mode 0600). ``roles``
    (``"senior,admin"``): None keeps a user's roles, and makes a new user an assessor, or
    ``senior,admin`` when they are the first."""
    if not NAME.match(name):
        raise UsersFileError("a reviewer name is 1-64 letters, digits, '.', '_', '@' or '-'")
    if len(password) < MIN_PASSWORD:
        raise UsersFileError(f"the password needs at least {MIN_PASSWORD} characters")
    users = read_users_roles(path)
    if roles is not None:
        new_roles = parse_roles(roles)
    elif name in users:
        new_roles = users[name][1]
    else:
        new_roles = frozenset(FIRST_USER_ROLES if not users else ("assessor",))
    users[name] = (hash_password(password), new_roles)
    text = "# mam review users: name:roles:scrypt hash (mam review DIR --add-user NAME --role R)\n"
    text += "".join(
        f"{k}:{','.join(r for r in ROLES if r in rs)}:{h}\n" for k, (h, rs) in sorted(users.items())
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, text.encode())
    os.chmod(path, 0o600)


class Authenticator:
    """Checks a name and a password (or a service key); :class:`Throttle` slows the failures.

    Args:
        users_file: the local user list (re-read when it changes, so added users can log in
            without a restart).
        key_hashes: SHA-256 hex digests of accepted service keys.
    """

    def __init__(self, users_file: Path | None, key_hashes: frozenset[str] = frozenset()):
        self.users_file = users_file
        self.key_hashes = frozenset(h.lower() for h in key_hashes)
        self._users: dict[str, str] = {}
        self._roles: dict[str, frozenset[str]] = {}
        self._stamp: tuple | None = None
        # A fixed hash to check against for unknown names, so timing does not tell names apart.
        self._dummy = hash_password(secrets.token_hex(8))

    def users(self) -> dict[str, str]:
        f = self.users_file
        stamp = None
        if f is not None and f.is_file():
            st = f.stat()
            stamp = (st.st_mtime_ns, st.st_size)
        if stamp != self._stamp:
            both = read_users_roles(f)
            self._users = {k: h for k, (h, _) in both.items()}
            self._roles = {k: r for k, (_, r) in both.items()}
            self._stamp = stamp
        return self._users

    def roles(self, reviewer: str) -> frozenset[str]:
        """The reviewer's roles, as the users file says now (a service key: assessor; a name no
        longer in the file: none, so a removed user keeps no senior or admin rights)."""
        self.users()
        if "~key-" in reviewer:
            return frozenset({"assessor"})
        return self._roles.get(reviewer, frozenset())

    @property
    def configured(self) -> bool:
        return bool(self.users()) or bool(self.key_hashes)

    def known(self, name: str) -> bool:
        """Whether ``name`` is in the users file (the access log names only known users: a
        password typed into the name field must not be kept)."""
        return (name or "").strip() in self.users()

    def check(self, name: str, password: str) -> str | None:
        """The reviewer id for a good login, else None."""
        name = (name or "").strip()
        if not NAME.match(name) or not password or len(password) > 1024:
            return None
        encoded = self.users().get(name)
        ok = verify_password(password, encoded or self._dummy)
        if ok and encoded is not None:
            return name
        digest = key_digest(password)
        if any([hmac.compare_digest(digest, h) for h in self.key_hashes]):
            return f"{name}~key-{digest[:8]}"
        return None


class Throttle:
    """Exponential backoff on failed logins per (client address, name), kept in the review
    store so a restart does not reset it.

    The first :data:`FREE_FAILURES` failures cost nothing (typos); after that each attempt from
    that client for that name must wait 1, 2, 4 ... s (at most :data:`MAX_DELAY_S`) after the
    previous failure. A good login clears the count. The name itself is never locked: the right
    password from another client works at once.

    Args:
        store: a :class:`mam.review.store.ReviewStore`.
    """

    def __init__(self, store) -> None:
        self.store = store
        self.clock = time.time

    @staticmethod
    def _key(name: str) -> str:
        return hashlib.sha256((name or "").strip().encode()).hexdigest()

    @staticmethod
    def delay_after(failures: int) -> float:
        if failures < FREE_FAILURES:
            return 0.0
        return min(MAX_DELAY_S, 2.0 ** (failures - FREE_FAILURES))

    def wait_s(self, client: str, name: str) -> float:
        """Seconds this client must still wait before trying ``name`` again (0: go ahead)."""
        failures, last = self.store.login_failures(client, self._key(name))
        return max(0.0, last + self.delay_after(failures) - self.clock()) if failures else 0.0

    def failed(self, client: str, name: str) -> None:
        self.store.add_login_failure(client, self._key(name), self.clock())

    def succeeded(self, client: str, name: str) -> None:
        self.store.clear_login_failures(client, self._key(name))


def new_token() -> tuple[str, str]:
    """``(token for the cookie, its SHA-256 for the store)``."""
    token = secrets.token_urlsafe(32)
    return token, hashlib.sha256(token.encode()).hexdigest()


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def same(a: str | None, b: str | None) -> bool:
    return bool(a) and bool(b) and hmac.compare_digest(a.encode(), b.encode())
