"""Helpers for the serve tests: a real uvicorn server on a free loopback port, in a thread."""
from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager
from typing import Iterator


@contextmanager
def running_server(app, log_level: str = "warning") -> Iterator[str]:
    """Serve ``app`` on 127.0.0.1:<free port> in a background thread; yields the base URL. ``log_level``
    "info" turns on uvicorn's access log (one line per request)."""
    import uvicorn
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=2))
    t = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    t.start()
    deadline = time.time() + 30
    while not server.started:
        if time.time() > deadline or not t.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        t.join(10)
        sock.close()


def error_of(r, status: int, *words: str) -> str:
    """A REST reply that must be an error: its status is ``status`` and its one-line ``error`` names every
    one of ``words``; returns that line."""
    assert r.status_code == status, (r.status_code, r.text)
    msg = r.json()["error"]
    for w in words:
        assert w in msg, (w, msg)
    return msg
