"""``python -m service.launch serve ...``: ``bentoml serve`` with the patches that must act before
BentoML loads the service (``service.bentoml_compat.install_private_prometheus_dir``: BentoML
prepares the metrics folder before it imports ``service.app``). ``mam serve`` and
``service.process.serve_command`` start the service through here."""

from __future__ import annotations


def main() -> None:
    from bentoml_cli.cli import cli

    from service import bentoml_compat as compat

    compat.install_private_prometheus_dir()
    cli()


if __name__ == "__main__":
    main()
