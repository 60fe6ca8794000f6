"""A small FHIR R4 server on loopback for tests: stores resources in memory and runs transaction
Bundles as a FHIR server does (all or nothing; conditional create with ``ifNoneExist``;
conditional update ``PUT Type?search``; ``urn:uuid`` fullUrls rewritten to the ids it assigns;
conditional references stored as written, as many servers do), with searches by
``identifier=system|value`` and ``_tag=system|code``, in transactions and as ``GET Type?...`` or
``POST Type/_search``. It can require bearer
tokens, which it issues itself at ``/token`` (OAuth2 client credentials, client_secret_basic),
answer given statuses instead (an outage, a rejection) and be stopped and started again on the
same port with its data (a restart of the server).

``MedplumServer`` is a real, independent FHIR server: Medplum's FHIR router (npm
``@medplum/fhir-router``, with its in-memory repository) behind a few lines of Node
(``fhir_server_medplum.mjs``), installed with npm into a cache folder on first use; the tests
that need it skip with the reason when Node or npm is missing. ``FhirTestServer`` stays for what
a real server cannot be told to do: answer 503 or 422 on demand, issue OAuth2 tokens."""

from __future__ import annotations

import base64
import copy
import http.server
import itertools
import json
import os
import shutil
import subprocess
import threading
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

MEDPLUM_VERSION = "5.2.13"
MEDPLUM_PACKAGES = ("fhir-router", "core", "definitions")


class FhirTestServer:
    def __init__(self, client_id: str | None = None, client_secret: str | None = None,
                 public_key=None) -> None:  # fmt: skip
        self.store: dict[str, dict[str, dict]] = {}  # type -> id -> resource
        self.versions: dict[tuple[str, str], int] = {}
        self.transactions = 0  # transactions that were run (committed)
        self.requests = 0  # every POST to the base
        self.token_requests = 0
        self.searches = 0
        self.statuses: list[int] = []  # answered in turn instead of running the transaction
        self.client = (client_id, client_secret)
        self.public_key = public_key  # for private_key_jwt (SMART Backend Services)
        self.tokens: set[str] = set()
        self.require_token = client_id is not None
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self.port = 0
        self.httpd = None
        self.start()

    # -- life ------------------------------------------------------------------------------------
    def start(self) -> None:
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                if self.path.endswith("/_search"):  # a search by POST: a form in the body
                    path = f"{self.path.removesuffix('/_search')}?{body.decode()}"
                    status, answer = server.get(path, dict(self.headers))
                else:
                    status, answer = server.handle(self.path, dict(self.headers), body)
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("content-type", "application/fhir+json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):  # noqa: N802 - http.server's name
                status, answer = server.get(self.path, dict(self.headers))
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("content-type", "application/fhir+json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        http.server.ThreadingHTTPServer.allow_reuse_address = True
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()
            self.httpd = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/fhir"

    @property
    def token_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/token"

    def count(self, kind: str) -> int:
        return len(self.store.get(kind, {}))

    def find(self, kind: str, query: str) -> list[dict]:
        return [self.store[kind][i] for i in self._search(kind, query)]

    def add(self, resource: dict) -> str:
        """Store ``resource`` as it is (e.g. a Patient registered by the EHR); its new id."""
        with self._lock:
            rid = f"{next(self._ids)}"
            self.store.setdefault(resource["resourceType"], {})[rid] = {**resource, "id": rid}
            return rid

    def get(self, path: str, headers: dict) -> tuple[int, dict]:
        """A search, ``GET /fhir/Type?identifier=...`` (``_count`` ignored)."""
        url = urlsplit(path)
        kind = url.path.removeprefix("/fhir/")
        query = "&".join(f"{k}={v}" for k, v in parse_qsl(url.query) if k != "_count")
        headers = {k.lower(): v for k, v in headers.items()}
        with self._lock:
            self.searches += 1
            if refused := self._refusal(headers):
                return refused
            found = self.find(kind, query)
        return 200, {"resourceType": "Bundle", "type": "searchset", "total": len(found),
                     "entry": [{"resource": r, "search": {"mode": "match"}}
                               for r in found]}  # fmt: skip

    def _refusal(self, headers: dict) -> tuple[int, dict] | None:
        """401 without a valid token (when one is required), else the next status it was told to
        answer, else None. Called with the lock held."""
        if self.require_token:
            auth = headers.get("authorization", "")
            if not auth.startswith("Bearer ") or auth[7:] not in self.tokens:
                return 401, _outcome("login", "no valid bearer token")
        if self.statuses:
            status = self.statuses.pop(0)
            return status, _outcome("transient" if status >= 500 else "invalid", "told to")
        return None

    # -- requests --------------------------------------------------------------------------------
    def handle(self, path: str, headers: dict, body: bytes) -> tuple[int, dict]:
        headers = {k.lower(): v for k, v in headers.items()}
        if path == "/token":
            return self._token(headers, body)
        with self._lock:
            self.requests += 1
            if refused := self._refusal(headers):
                return refused
            try:
                bundle = json.loads(body)
                assert bundle["resourceType"] == "Bundle" and bundle["type"] == "transaction"
            except (ValueError, KeyError, AssertionError):
                return 400, _outcome("invalid", "not a transaction Bundle")
            return self._transaction(bundle)

    def _token(self, headers: dict, body: bytes) -> tuple[int, dict]:
        self.token_requests += 1
        form = dict(parse_qsl(body.decode()))
        if form.get("grant_type") != "client_credentials":
            return 400, {"error": "unsupported_grant_type"}
        if "client_assertion" in form:
            import jwt

            try:
                claims = jwt.decode(
                    form["client_assertion"], self.public_key,
                    algorithms=["RS384", "ES384"], audience=self.token_url,
                )  # fmt: skip
            except jwt.PyJWTError:
                return 401, {"error": "invalid_client"}
            ok = form.get("client_assertion_type", "").endswith("jwt-bearer")
            ok = ok and claims["iss"] == claims["sub"] == self.client[0] and claims.get("jti")
            if not ok:
                return 401, {"error": "invalid_client"}
        else:
            auth = headers.get("authorization", "")
            try:
                cid, secret = base64.b64decode(auth.removeprefix("Basic ")).decode().split(":", 1)
            except ValueError:
                return 401, {"error": "invalid_client"}
            if (cid, secret) != self.client:
                return 401, {"error": "invalid_client"}
        token = f"tok-{next(self._ids)}"
        self.tokens.add(token)
        return 200, {"access_token": token, "token_type": "bearer", "expires_in": 300,
                     "scope": form.get("scope", "")}  # fmt: skip

    def _search(self, kind: str, query: str) -> list[str]:
        params = parse_qsl(query)
        out = []
        for rid, res in self.store.get(kind, {}).items():
            ok = True
            for name, value in params:
                system, _, code = value.partition("|")
                if name == "identifier":
                    pairs = [(i.get("system"), i.get("value")) for i in res.get("identifier", [])]
                elif name == "_tag":
                    pairs = [(t.get("system"), t.get("code")) for t in res["meta"].get("tag", [])]
                else:
                    raise ValueError(f"search parameter {name} not supported")
                ok = ok and (system, code) in pairs
            if ok:
                out.append(rid)
        return out

    def _transaction(self, bundle: dict) -> tuple[int, dict]:
        plan = []  # (kind, id, resource, status, write)
        refs: dict[str, str] = {}
        for entry in bundle.get("entry", []):
            res, req = copy.deepcopy(entry["resource"]), entry["request"]
            kind = res["resourceType"]
            if req["method"] == "POST":
                found = self._search(kind, req["ifNoneExist"]) if req.get("ifNoneExist") else []
                if len(found) > 1:
                    return 412, _outcome("duplicate", "more than one match")
                rid, status, write = (found[0], "200 OK", False) if found else (
                    f"{next(self._ids)}", "201 Created", True)  # fmt: skip
            elif req["method"] == "PUT":
                url = urlsplit(req["url"])
                if url.path != kind:
                    return 400, _outcome("invalid", "PUT to another type")
                if url.query:
                    found = self._search(kind, url.query)
                    if len(found) > 1:
                        return 412, _outcome("duplicate", "more than one match")
                    rid = found[0] if found else f"{next(self._ids)}"
                    status = "200 OK" if found else "201 Created"
                else:
                    return 400, _outcome("not-supported", "only conditional updates")
                write = True
            else:
                return 400, _outcome("not-supported", req["method"])
            refs[entry["fullUrl"]] = f"{kind}/{rid}"
            plan.append((kind, rid, res, status, write))
        out = []
        for kind, rid, res, status, write in plan:
            res = _rewrite(res, refs)
            res["id"] = rid
            key = (kind, rid)
            if write:
                old = self.store.get(kind, {}).get(rid)
                changed = old is None or {k: v for k, v in old.items() if k != "meta"} != {
                    k: v for k, v in res.items() if k != "meta"}  # fmt: skip
                if changed:
                    self.versions[key] = self.versions.get(key, 0) + 1
                    res.setdefault("meta", {})["versionId"] = str(self.versions[key])
                    self.store.setdefault(kind, {})[rid] = res
            out.append({"response": {"status": status, "location": f"{kind}/{rid}"}})
        self.transactions += 1
        return 200, {"resourceType": "Bundle", "type": "transaction-response", "entry": out}


def _rewrite(value, refs: dict[str, str]):
    if isinstance(value, dict):
        return {k: (refs.get(v, v) if k == "reference" and isinstance(v, str) else
                    _rewrite(v, refs)) for k, v in value.items()}  # fmt: skip
    if isinstance(value, list):
        return [_rewrite(v, refs) for v in value]
    return value


def _outcome(code: str, text: str) -> dict:
    return {"resourceType": "OperationOutcome",
            "issue": [{"severity": "error", "code": code, "diagnostics": text}]}  # fmt: skip


# -- a real FHIR server: Medplum's router on Node ------------------------------------------------
def medplum_dir() -> Path | str:
    """The folder holding Medplum's npm packages (installed there on first use), or why not."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        return "Node.js and npm are not installed"
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    folder = cache / "mam-tests" / f"medplum-{MEDPLUM_VERSION}"
    if not (folder / "node_modules" / "@medplum" / "fhir-router").is_dir():
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "package.json").write_text('{"private": true, "type": "module"}')
        pkgs = [f"@medplum/{p}@{MEDPLUM_VERSION}" for p in MEDPLUM_PACKAGES]
        r = subprocess.run(["npm", "install", "--no-audit", "--no-fund", *pkgs], cwd=folder,
                           capture_output=True, text=True, timeout=600)  # fmt: skip
        if r.returncode != 0:
            return f"npm install of Medplum's FHIR router failed: {r.stderr.strip()[-300:]}"
    shutil.copy(Path(__file__).with_name("fhir_server_medplum.mjs"), folder / "server.mjs")
    return folder


class MedplumServer:
    """Medplum's FHIR server on loopback, in memory (its data go when it stops)."""

    def __init__(self, folder: Path, port: int) -> None:
        self.folder, self.port, self.proc = folder, port, None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/fhir"

    def start(self) -> MedplumServer:
        major = int(subprocess.run(["node", "--version"], capture_output=True,
                                   text=True).stdout.strip().lstrip("v").split(".")[0])  # fmt: skip
        flags = ["--experimental-websocket"] if major < 22 else []  # Medplum's core needs it
        self.proc = subprocess.Popen(["node", *flags, "server.mjs", str(self.port)],
                                     cwd=self.folder, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)  # fmt: skip
        seen = []
        for line in self.proc.stdout:  # warnings may come first
            if line.startswith("listening"):
                return self
            seen.append(line)
        self.stop()
        raise RuntimeError(f"the Medplum FHIR server did not start: {''.join(seen)[-300:]}")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None

    def search(self, kind: str, query: str = "") -> list[dict]:
        import httpx

        r = httpx.get(f"{self.url}/{kind}?_count=1000&{query}", timeout=30)
        r.raise_for_status()
        return [e["resource"] for e in r.json().get("entry", [])]

    def count(self, kind: str) -> int:
        return len(self.search(kind))


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
