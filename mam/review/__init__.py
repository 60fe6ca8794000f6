"""The clinicians' review and annotation app (``mam review DIR``; ``pip install -e '.[review]'``).

Two uses the MAM paper (Gao, Yao et al., Nat. Commun. 2023) points at and no open GMA tool
served: a beginner reviewing the clips MAM rates most likely to show fidgety movements first
(Fig. 4b: +11% accuracy), and a site annotating its own FMs intervals and categories to train
weights for its population (the export is exactly the training layout ``mam train`` reads).

* :mod:`mam.review.app`: the Starlette app (worklist, recording page, export, login), served by
  ``mam review`` or mounted by the screening service at ``/review`` (:mod:`mam.review.mount`);
* :mod:`mam.review.catalog`: the batch ledger's recordings and the archive root;
* :mod:`mam.review.store`: annotations, audit trail and sessions in SQLite or PostgreSQL;
* :mod:`mam.review.auth`: reviewers (scrypt-hashed user list, or the service's keys);
* :mod:`mam.review.pose`: the pose the model saw, again, for the overlay and the export;
* :mod:`mam.review.export`, :mod:`mam.review.agreement`: the training layout and the kappa
  report.

Importing the package imports none of its dependencies (the service imports
:mod:`mam.review.mount` whether or not a review folder is configured).
"""

from __future__ import annotations

__all__ = ["ReviewConfig", "create_app"]


def __getattr__(name: str):
    if name == "ReviewConfig":
        from mam.review.config import ReviewConfig

        return ReviewConfig
    raise AttributeError(name)


def create_app(config):
    """The review app (an ASGI app); see :func:`mam.review.app.create_app`."""
    from mam.review.app import create_app as _create

    return _create(config)
