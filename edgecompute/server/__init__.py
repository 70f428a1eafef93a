"""The HTTP and WebSocket gateway over the in-process scheduler (``pip install "edgecompute[server]"``).

::

    from edgecompute.server import build_app, ServerSettings
    app = build_app(ServerSettings.from_config(config))      # an ASGI app; run it with uvicorn

or ``edgecompute serve --config edgecompute.toml``. See docs/server.md.
"""

from __future__ import annotations

from ._app import build_app, serve
from ._auth import ApiKey, hash_key, new_key
from ._settings import ServerSettings

__all__ = ["ApiKey", "ServerSettings", "build_app", "hash_key", "new_key", "serve"]
