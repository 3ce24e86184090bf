"""``fdseg serve``: a local web app and REST API on one process (needs ``pip install 'fdseg[serve]'``).

    from fdseg.serve import ServeConfig, create_app, serve
    serve(ServeConfig(), host="127.0.0.1", port=8765)       # blocks; Ctrl-C stops
    serve(ServeConfig(token=TOKEN), host="0.0.0.0", allowed_hosts=["*"])   # on a network: token required

``ServeConfig(token=...)``: every request but the page's shell needs ``Authorization: Bearer <token>``
(:mod:`fdseg.serve.auth`; ``fdseg serve`` sets one on any non-loopback address unless ``--no-auth``).
"""
from __future__ import annotations

from ..errors import MissingExtraError
from .engine import Engine, ServeConfig, Settings


def _need_extra() -> None:
    for mod, pkg in (("fastapi", "fastapi"), ("uvicorn", "uvicorn"), ("python_multipart", "python-multipart")):
        try:
            __import__(mod)
        except ImportError:
            raise MissingExtraError("fdseg serve", "serve", pkg) from None


def create_app(config: ServeConfig | None = None, allowed_hosts: list[str] | None = None):
    """The FastAPI app (see :mod:`fdseg.serve.app`)."""
    _need_extra()
    from .app import create_app as _create
    return _create(config, allowed_hosts)


def serve(config: ServeConfig | None = None, host: str = "127.0.0.1", port: int = 8765,
          allowed_hosts: list[str] | None = None, log_level: str = "info") -> None:
    """Run the app with uvicorn until interrupted."""
    _need_extra()
    import uvicorn
    uvicorn.run(create_app(config, allowed_hosts), host=host, port=port, log_level=log_level,
                timeout_graceful_shutdown=5)


__all__ = ["Engine", "ServeConfig", "Settings", "create_app", "serve"]
