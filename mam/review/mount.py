"""The review app inside another ASGI app (the screening service mounts it at ``/review``).

Requests under the prefix go to the review app with ``root_path`` extended as Starlette's
``Mount`` does (``path`` stays whole, so the app's own routing and URLs work under the prefix);
everything else goes on to the wrapped app. It is a middleware rather than a route because the
service's own middleware answers 401 to anything without an API key before routing: browsers
send no keys, so the review app, which has its own login, sessions and CSRF checks, must be
reached in front of it. Reviewers may still log in with the service's keys.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)


class MountedApp:
    """ASGI middleware sending ``prefix`` and below to ``mounted``.

    Args:
        app: the wrapped application (everything else).
        mounted: the application to mount.
        prefix: where, e.g. ``/review`` (no trailing slash).
    """

    def __init__(self, app, mounted, prefix: str = "/review") -> None:
        self.app, self.mounted, self.prefix = app, mounted, prefix.rstrip("/")

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            path = scope.get("path", "")
            if path == self.prefix or path.startswith(self.prefix + "/"):
                child = dict(scope)
                child["root_path"] = scope.get("root_path", "") + self.prefix
                return await self.mounted(child, receive, send)
        return await self.app(scope, receive, send)


def review_from_environment(key_hashes: frozenset[str] = frozenset()):
    """``(MountedApp, {"mounted": app, "prefix": "/review"})`` for ``add_asgi_middleware`` when
    ``MAM_REVIEW_DIR`` names a batch output folder (see :meth:`ReviewConfig.from_env`), else
    None. The service's API keys may log in (as passwords)."""
    from mam.review.config import ReviewConfig

    config = ReviewConfig.from_env(key_hashes)
    if config is None:
        return None
    from mam.review.app import create_app

    app = create_app(config)
    logger.info(
        "review app mounted at /review (%d recordings)", len(app.state.review.catalog.all())
    )
    return MountedApp, {"mounted": app, "prefix": "/review"}
