"""The access token of a server reachable from the network (``fdseg serve --host 0.0.0.0``).

* Every request except the page's static shell (``/``, ``/static/*``, ``/favicon.ico``: no data in
  them) must carry ``Authorization: Bearer <token>``; anything else gets 401 with a small JSON error
  and ``WWW-Authenticate: Bearer`` before the request body is read or anything else is done.
* The token is only ever read from that header: never from the query string, which uvicorn's access
  log prints, nor from a cookie (no cross-site request can carry a header, so no CSRF either).
* Tokens are compared with :func:`hmac.compare_digest`.

Plain ASGI, no imports from starlette, so that ``fdseg serve --token-file`` can be checked (and this
module tested) without the serve extra.
"""
from __future__ import annotations

import hmac
import json
import secrets
from pathlib import Path

from ..errors import InputError

PUBLIC_PATHS = ("/", "/favicon.ico")
PUBLIC_PREFIX = "/static/"


def new_token() -> str:
    """A fresh random token (43 URL-safe characters, 256 bits)."""
    return secrets.token_urlsafe(32)


def check_token(token: str, source: str = "token") -> str:
    """``token`` if it can travel in an HTTP header (printable ASCII, no spaces); else :class:`InputError`.
    The token itself never appears in the message."""
    if not token:
        raise InputError(source, "the access token is empty")
    if any(c.isspace() for c in token):
        raise InputError(source, "the access token must be one line without spaces")
    if not all(0x21 <= ord(c) <= 0x7E for c in token):
        raise InputError(source, "the access token must be printable ASCII (letters, digits and -._~+/=)")
    return token


def read_token_file(path: str | Path) -> str:
    """The token on the file's one line (whitespace around it stripped). A missing, unreadable or empty
    file -> :class:`InputError` naming the file (never quoting its content)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(path, "token file does not exist") from None
    except IsADirectoryError:
        raise InputError(path, "is a folder: --token-file wants a file holding the token on one line") from None
    except UnicodeDecodeError:
        raise InputError(path, "token file is not text: put the token on one line (printable ASCII)") from None
    except OSError as e:
        raise InputError(path, f"cannot read the token file ({e.strerror or type(e).__name__})") from None
    token = text.strip()
    if not token:
        raise InputError(path, "token file is empty: put the access token on its first line")
    return check_token(token, str(path))


def bearer(headers) -> bytes | None:
    """The token of an ``Authorization: Bearer <token>`` header among ASGI ``headers`` (None if absent)."""
    for k, v in headers or ():
        if k.lower() == b"authorization":
            scheme, _, rest = v.strip().partition(b" ")
            if scheme.lower() == b"bearer" and rest.strip():
                return rest.strip()
            return None
    return None


class TokenAuth:
    """ASGI middleware: every request but the page's static shell needs ``Authorization: Bearer <token>``."""

    def __init__(self, app, token: str):
        self.app = app
        self.token = check_token(token).encode("ascii")

    @staticmethod
    def public(path: str) -> bool:
        return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIX)

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket") or self.public(scope.get("path", "")):
            return await self.app(scope, receive, send)
        got = bearer(scope.get("headers"))
        if got is not None and hmac.compare_digest(got, self.token):
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":
            return await send({"type": "websocket.close", "code": 1008})
        if got is None:
            problem = ("this server needs its access token: send the header 'Authorization: Bearer TOKEN' "
                       "(the token was printed where fdseg serve was started, or is in its --token-file)")
            challenge = b'Bearer realm="fdseg"'
        else:
            problem = "access token not accepted"
            challenge = b'Bearer realm="fdseg", error="invalid_token"'
        body = json.dumps({"error": f"authorization: {problem}", "source": "authorization",
                           "problem": problem}).encode()
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"www-authenticate", challenge), (b"cache-control", b"no-store")]})
        await send({"type": "http.response.body", "body": body})
