"""``python -m service.launch serve ...``: ``bentoml serve`` with the patches that must act before
BentoML loads the service (``service.bentoml_compat.install_private_prometheus_dir``: BentoML
prepares the metrics folder before it imports ``service.app``). ``mam serve`` and
``service.process.serve_command`` start the service through here."""

from __future__ import annotations

import sys


def main() -> None:
    from bentoml_cli.cli import cli

    from service import bentoml_compat as compat

    if "serve" in sys.argv[1:2]:
        check_settings()
    compat.install_private_prometheus_dir()
    cli()


def check_settings() -> None:
    """Read the settings before BentoML starts anything, so that a malformed ``MAM_*`` variable
    is the CLI's typed error and exit 2 rather than a traceback from inside a worker."""
    from mam.cli.errors import hint
    from mam.errors import MamError
    from service.settings import get_settings

    try:
        get_settings().key_hashes()
    except MamError as e:
        print(f"error [{e.code}]: {e}\nfix: {hint(e.code)}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
