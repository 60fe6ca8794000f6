"""One settings module (``mam.settings``): every ``MAM_*`` variable declared and read there, the
service's settings built on it, one strict parser of the accepted keys, and configuration passed
as arguments rather than through the environment."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from mam.cli import main
from mam.cli.errors import HINTS
from mam.settings import (
    InvalidKeyHashesError,
    InvalidSettingError,
    MamSettings,
    current,
    parse_key_hashes,
)

ROOT = Path(__file__).resolve().parents[1]
DIGEST = "ab" * 32
# Environment access outside mam/settings.py, each with its reason beside it in the code.
ALLOWED = {
    ("mam/cli/serve.py", "env = dict(os.environ)"),  # copied for the service child process
    ("service/__init__.py", 'os.environ.setdefault("BENTOML_DO_NOT_TRACK"'),  # BentoML's
    ("service/bentoml_compat.py", 'os.environ["PROMETHEUS_MULTIPROC_DIR"]'),  # prometheus'
    ("service/metrics.py", 'os.environ.get("PROMETHEUS_MULTIPROC_DIR")'),
    ("service/middleware.py", 'os.environ.get("PROMETHEUS_MULTIPROC_DIR")'),
}
TEST_ONLY = {"MAM_REVIEW_SCREENSHOTS"}  # read by tests/test_review_browser.py, not by mam


def test_nothing_but_the_settings_module_reads_the_environment():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    out = subprocess.run(
        ["git", "grep", "--untracked", "-n", "-E", r"os\.environ|getenv", "--", "mam", "service"],
        cwd=ROOT, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert out.returncode in (0, 1), out.stderr
    lines = [x for x in out.stdout.splitlines() if x]
    assert any(x.startswith("mam/settings.py:") for x in lines)  # the grep does find reads
    stray = [
        x for x in lines
        if not x.startswith("mam/settings.py:")
        and not any(x.startswith(f + ":") and s in x for f, s in ALLOWED)
    ]  # fmt: skip
    assert not stray, "read MAM_* through mam.settings.current():\n" + "\n".join(stray)


def test_every_documented_variable_is_a_setting_and_every_setting_is_documented():
    from service.settings import Settings

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    named = set(re.findall(r"\bMAM_[A-Z0-9_]*[A-Z0-9]\b", readme)) - TEST_ONLY
    service = {"MAM_" + f.upper() for f in Settings.model_fields}
    assert named - service == set()  # a documented variable nothing reads
    assert service - named == set()  # a setting nobody can find
    # The service builds on the shared settings and declares none of them again.
    assert set(MamSettings.model_fields) <= set(Settings.model_fields)
    assert not set(Settings.__annotations__) & set(MamSettings.model_fields)
    assert all(f.description for f in MamSettings.model_fields.values())


def test_settings_follow_the_environment_and_name_a_malformed_variable(monkeypatch):
    monkeypatch.setenv("MAM_POSE_STRIDE", "3")
    monkeypatch.setenv("MAM_REVIEW_SECURE_COOKIE", "0")
    monkeypatch.setenv("MAM_REVIEW_BLIND", "")  # empty: unset
    s = current()
    assert (s.pose_stride, s.review_secure_cookie, s.review_blind) == (3, False, False)
    assert current() is s  # unchanged environment: the same (frozen) settings
    monkeypatch.setenv("MAM_POSE_STRIDE", "0")  # below 1: every frame, as before
    monkeypatch.setenv("MAM_REVIEW_SECURE_COOKIE", "maybe")  # neither: Secure when https
    assert (current().pose_stride, current().review_secure_cookie) == (1, None)
    monkeypatch.setenv("MAM_AUDIT_MAX_MB", "hunter2")
    with pytest.raises(InvalidSettingError) as e:
        current()
    assert "MAM_AUDIT_MAX_MB" in str(e.value) and "hunter2" not in str(e.value)
    assert e.value.code in HINTS and InvalidKeyHashesError.code in HINTS


def test_a_malformed_variable_is_a_typed_cli_error_not_a_traceback(monkeypatch, capsys):
    monkeypatch.setenv("MAM_GRPC_PORT", "eighty")
    with pytest.raises(SystemExit) as e:
        main(["serve", "--hash-key", "k"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "error [invalid_setting]" in err and "MAM_GRPC_PORT" in err and "fix: " in err


def test_key_digests_are_parsed_strictly_by_mam_review_and_the_service(
    monkeypatch, tmp_path, capsys
):
    from mam.cli.review import service_key_hashes
    from service.settings import Settings

    keys = tmp_path / "keys"
    keys.write_text(f"# the site's keys\n{DIGEST.upper()}\n")
    monkeypatch.setenv("MAM_API_KEY_HASHES", "cd" * 32)
    monkeypatch.setenv("MAM_API_KEY_HASHES_FILE", str(keys))
    both = {DIGEST, "cd" * 32}
    assert service_key_hashes() == Settings().key_hashes() == both
    # A key pasted where its digest belongs: refused by both, without echoing it.
    keys.write_text(f"{DIGEST}\nmy-secret-key\n")
    with pytest.raises(InvalidKeyHashesError) as e:
        Settings().key_hashes()
    assert "my-secret-key" not in str(e.value)
    assert main(["review", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "error [invalid_api_key_hashes]" in err and "my-secret-key" not in err
    # In the variable itself: the service refuses to start, the CLI stops.
    monkeypatch.setenv("MAM_API_KEY_HASHES", f"{DIGEST},0123")
    with pytest.raises(InvalidKeyHashesError):
        Settings()
    with pytest.raises(InvalidKeyHashesError):
        service_key_hashes()
    with pytest.raises(InvalidKeyHashesError):
        parse_key_hashes("zz" * 32, "test")


def test_the_batch_workers_thread_count_reaches_its_sessions_without_the_environment(
    monkeypatch,
):
    import mam.screening
    from mam.batch import runner
    from mam.pose.base import backend_class
    from mam.runtime.sessions import default_threads

    monkeypatch.delenv("MAM_RUNTIME_THREADS", raising=False)
    made = []
    monkeypatch.setattr(mam.screening, "create_backend", lambda name, **kw: made.append(kw))
    try:
        runner._init_worker(None, None, threads=3)
        screener = runner._SCREENER
        assert "MAM_RUNTIME_THREADS" not in os.environ
        assert screener.runtime.threads == 3  # the clip network's sessions
        assert screener.runtime.backend == screener.model_identity()["runtime"]
        screener.pose_estimator()
        if backend_class(screener.options.pose_backend).takes_threads:
            assert made == [{"threads": 3}]  # the pose networks' sessions
    finally:
        runner._SCREENER = None
    monkeypatch.setenv("MAM_RUNTIME_THREADS", "2")  # still the default where none is given
    assert default_threads() == 2 and default_threads(5) == 5


@pytest.mark.parametrize(
    ("env", "code"),
    [({"MAM_MAX_UPLOAD_MB": "-1"}, "invalid_setting"),
     ({"MAM_API_KEY_HASHES_FILE": "/nonexistent/keys"}, "invalid_api_key_hashes")],
)  # fmt: skip
def test_the_service_refuses_a_malformed_setting_before_it_starts(env, code):
    """The service's own settings fail as the CLI's do: a typed error and exit 2, no traceback
    from a worker, and the value itself never printed."""
    import sys

    clean = {k: v for k, v in os.environ.items() if not k.startswith("MAM_")}
    cmd = [sys.executable, "-m", "service.launch", "serve", "service.app:Screening"]
    p = subprocess.run(cmd, cwd=ROOT, env=clean | env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr[-2000:]
    assert f"error [{code}]" in p.stderr and "fix:" in p.stderr
    assert "Traceback" not in p.stderr
    if code == "invalid_setting":
        assert "input_value" not in p.stderr and "'-1'" not in p.stderr
