"""The FastAPI app: the REST API under /v1 and the single-page web app at /.

Every asset the page needs is served from ``fdseg/serve/static`` (no CDN, no web
fonts) and the pages carry a Content-Security-Policy that forbids loading anything
from elsewhere, so the app works on a machine with no internet. FastAPI's Swagger
UI fetches its JavaScript from a CDN, so it is switched off; the OpenAPI spec is
served at /openapi.json.

With ``ServeConfig(token=...)`` (``fdseg serve`` on a network address) every request but the page's
static shell needs ``Authorization: Bearer <token>`` (:mod:`fdseg.serve.auth`).
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware

from .. import __version__
from ..errors import FdsegError, InputError
from .auth import TokenAuth, check_token
from .engine import MASK_FORMATS, Busy, Engine, NotFound, ServeConfig, Settings, check_types, options
from .uploads import TextFields, Upload, UploadError, display_name

STATIC = Path(__file__).with_name("static")
CSP = ("default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
       "connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'")
LOOPBACK_HOSTS = ["127.0.0.1", "localhost", "::1"]


class BodyTooLarge(FdsegError):
    pass


class BodyLimit:
    """ASGI middleware: refuse request bodies over ``limit`` bytes (by Content-Length, and while reading)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.limit:
            resp = _error(413, "request", f"request body is {int(length):,} bytes, over this server's limit of "
                                          f"{self.limit:,} bytes")
            return await resp(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    raise BodyTooLarge(f"request body is over this server's limit of {self.limit:,} bytes")
            return msg
        return await self.app(scope, limited, send)


def _error(status: int, source: str | None, problem: str) -> JSONResponse:
    msg = f"{source}: {problem}" if source else problem
    return JSONResponse({"error": msg, "source": source, "problem": problem}, status_code=status)


def _flag(text: dict[str, str], name: str, default: bool) -> bool:
    v = text.get(name, "").strip().lower()
    if v == "":
        return default
    if v not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
        raise UploadError(name, f"must be true or false, got {v!r}")
    return v in ("1", "true", "yes", "on")


def _multipart_doc(fields: dict[str, tuple[str, str]], required: list[str]) -> dict:
    """openapi_extra for an endpoint that reads its multipart body itself."""
    props = {}
    for name, (kind, desc) in fields.items():
        if kind == "files":
            props[name] = {"type": "array", "items": {"type": "string", "format": "binary"}, "description": desc}
        elif kind == "strings":
            props[name] = {"type": "array", "items": {"type": "string"}, "description": desc}
        elif kind == "file":
            props[name] = {"type": "string", "format": "binary", "description": desc}
        else:
            props[name] = {"type": kind, "description": desc}
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {
        "schema": {"type": "object", "properties": props, "required": required}}}}}


_SETTINGS_DOC = {
    "method": ("string", "matching method (GET /v1/options lists them); default fm"),
    "backbone": ("string", "feature backbone; default efficientnet_lite0"),
    "refine": ("string", "refinement (region proposer) or 'none'"),
    "threshold": ("number", "margin threshold, 0 = argmax"),
    "size": ("integer", "network input size, default 256"),
    "resize": ("string", "resize | aspect | tile | auto; empty = the preset's"),
    "preset": ("string", "accurate (default) | fast | paper: named settings (GET /v1/options lists them)"),
}
_OUTPUT_DOC = {
    "mask_format": ("string", "png (base64 PNG, 0/255) | rle (COCO uncompressed, column-major) | none"),
    "overlay": ("boolean", "also return the mask drawn on the query as base64 JPEG"),
}
_KEEP_DOC = {"keep": ("boolean", "keep the mask, score map and overlay for results.zip (default true; false "
                                  "saves the encoding time)")}
_SUPPORT_DOC = {"support": ("files", "support images, 1..5, repeat the field"),
                "mask": ("files", "one defect mask per support, same order and size (non-zero = defect)"),
                "type": ("strings", "optional defect type name per support, repeat the field: one per support in "
                                   "the same order, or none. Two or more distinct names fit a multi-type "
                                   "inspector: each result then adds types, type, defects, verdicts, areas, "
                                   "fractions and labels (label map: 0 = good, k = types[k-1]), the response a "
                                   "legend, and the overlay is coloured by type")}
_QUERY_DOC = {"query": ("files", "query images, repeat the field")}
_NORMAL_DOC = {"normal": ("files", "optional defect-free (OK) images of the same product, repeat the field: "
                                   "their cells join the background, which lowers false alarms")}


def _document_bearer(app: FastAPI) -> None:
    """Declare the bearer token in /openapi.json (every operation needs it)."""
    base = app.openapi

    def openapi():
        spec = base()
        spec.setdefault("components", {}).setdefault("securitySchemes", {})["bearer"] = {
            "type": "http", "scheme": "bearer",
            "description": "the access token printed where fdseg serve was started (or its --token-file)"}
        spec["security"] = [{"bearer": []}]
        return spec
    app.openapi = openapi


def create_app(config: ServeConfig | None = None, allowed_hosts: list[str] | None = None) -> FastAPI:
    """The app; ``allowed_hosts`` (Host header check against DNS rebinding) defaults to loopback names."""
    config = config or ServeConfig()
    engine = Engine(config)
    app = FastAPI(title="fdseg", version=__version__, docs_url=None, redoc_url=None,
                  description="Few-shot industrial defect segmentation: fit on 1-5 support images with masks, "
                              "segment query images.")
    app.state.engine = engine
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts or LOOPBACK_HOSTS)
    app.add_middleware(BodyLimit, limit=config.max_request_bytes)
    if config.token is not None:     # outside the body limit and the routes: nothing is read or done first
        app.add_middleware(TokenAuth, token=check_token(config.token, "ServeConfig.token"))
        _document_bearer(app)

    @app.middleware("http")
    async def security_headers(request: Request, call_next):
        resp = await call_next(request)
        resp.headers.setdefault("Content-Security-Policy", CSP)
        resp.headers.setdefault("X-Content-Type-Options", "nosniff")
        resp.headers.setdefault("Referrer-Policy", "no-referrer")
        return resp

    @app.exception_handler(UploadError)
    async def _upload_error(request, e: UploadError):
        return _error(e.status, e.source, e.problem)

    @app.exception_handler(InputError)
    async def _input_error(request, e: InputError):
        return _error(400, e.source, e.problem)

    @app.exception_handler(NotFound)
    async def _not_found(request, e: NotFound):
        return _error(404, None, str(e))

    @app.exception_handler(Busy)
    async def _busy(request, e: Busy):
        r = _error(503, None, str(e))
        r.headers["Retry-After"] = "5"
        return r

    @app.exception_handler(BodyTooLarge)
    async def _too_large(request, e: BodyTooLarge):
        return _error(413, "request", str(e))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, e: StarletteHTTPException):
        return _error(e.status_code, None, str(e.detail))

    # -- reading a multipart request ---------------------------------------------------------
    async def read_form(request: Request, max_files: int,
                        allowed: tuple[str, ...] = ("support", "mask", "query", "normal")
                        ) -> tuple[dict[str, list[Upload]], TextFields]:
        ctype = request.headers.get("content-type", "")
        if not ctype.lower().startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
            raise UploadError("request", f"expected a multipart/form-data body (curl -F ...), got "
                                         f"{ctype or 'no Content-Type'!r}", status=415)
        try:
            form = await request.form(max_files=max_files, max_fields=64, max_part_size=64 << 10)
        except StarletteHTTPException as e:
            raise UploadError("request", f"malformed multipart body: {e.detail}") from None
        files: dict[str, list[Upload]] = {}
        text = TextFields()
        try:
            for key, value in form.multi_items():
                if isinstance(value, str):
                    if key in allowed:
                        raise UploadError(key, "expected a file upload (curl -F 'field=@file.png'), got a text value")
                    text.add(key, value)
                    continue
                n = len(files.get(key, [])) + 1
                role = f"{key} {n}"
                if value.size is not None and value.size > config.max_file_bytes:
                    raise UploadError(f"{role} ({display_name(value.filename, role)})",
                                      f"file is {value.size:,} bytes, over this server's limit of "
                                      f"{config.max_file_bytes:,} bytes per file", status=413)
                data = await value.read(config.max_file_bytes + 1)
                if len(data) > config.max_file_bytes:
                    raise UploadError(f"{role} ({display_name(value.filename, role)})",
                                      f"file is over this server's limit of {config.max_file_bytes:,} bytes per file",
                                      status=413)
                files.setdefault(key, []).append(Upload(data, display_name(value.filename, role), role))
        finally:
            await form.close()
        unknown = set(files) - set(allowed)
        if unknown:
            raise UploadError(sorted(unknown)[0], f"unexpected file field (this endpoint takes {', '.join(allowed)})")
        return files, text

    def support_pairs(files: dict[str, list[Upload]]) -> list[tuple[Upload, Upload]]:
        sups, masks = files.get("support", []), files.get("mask", [])
        if not sups:
            raise UploadError("support", "send at least one support image (field 'support') and its mask "
                                         "(field 'mask')")
        if len(sups) != len(masks):
            raise UploadError("mask", f"need one mask per support image, got {len(sups)} support images and "
                                      f"{len(masks)} masks")
        if len(sups) > config.max_supports:
            raise UploadError("support", f"{len(sups)} supports sent, this server takes at most "
                                         f"{config.max_supports}")
        return list(zip(sups, masks))

    def output_opts(text: dict[str, str]) -> tuple[str, bool]:
        fmt = text.get("mask_format", "png").strip().lower() or "png"
        if fmt not in MASK_FORMATS:
            raise UploadError("mask_format", f"must be one of {', '.join(MASK_FORMATS)}, got {fmt!r}")
        return fmt, _flag(text, "overlay", False)

    max_all = 2 * config.max_supports + config.max_queries + config.max_normals

    # -- the page ------------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    # -- API -----------------------------------------------------------------------------------
    @app.get("/v1/health", tags=["service"], summary="liveness: version, sessions, queue")
    async def health():
        return {"status": "ok", "version": __version__, "sessions": engine.n_sessions,
                "pending": engine.pending, "workers": config.workers}

    @app.get("/v1/options", tags=["service"], summary="methods, backbones and refinements installed; limits")
    async def get_options():
        opts = options(config.weights)
        return {**opts, "defaults": asdict(config.defaults),
                "limits": {"max_request_bytes": config.max_request_bytes, "max_file_bytes": config.max_file_bytes,
                           "max_pixels": config.max_pixels, "max_supports": config.max_supports,
                           "max_normals": config.max_normals,
                           "max_queries": config.max_queries},
                "saving": config.sessions_dir is not None}

    @app.post("/v1/segment", tags=["segment"], summary="fit on the supports and segment the queries in one call",
              openapi_extra=_multipart_doc({**_SUPPORT_DOC, **_NORMAL_DOC, **_QUERY_DOC, **_SETTINGS_DOC, **_OUTPUT_DOC},
                                           ["support", "mask", "query"]))
    async def segment_once(request: Request):
        files, text = await read_form(request, max_all)
        settings = Settings.parse(text, config.defaults)
        fmt, want_overlay = output_opts(text)
        pairs = support_pairs(files)
        types = check_types(text.getall("type"), len(pairs))
        queries = files.get("query", [])
        if not queries:
            raise UploadError("query", "send at least one query image (field 'query')")

        def work():
            session = engine.fit(settings, pairs, files.get("normal", []), types)
            return session, engine.segment(session, queries, mask_format=fmt, want_overlay=want_overlay)
        session, results = await engine.run(work)
        return {"settings": asdict(settings), **session.type_info(), "results": results}

    @app.post("/v1/sessions", tags=["sessions"], status_code=201,
              summary="fit the supports once; returns a session id to segment queries against",
              openapi_extra=_multipart_doc({**_SUPPORT_DOC, **_NORMAL_DOC, **_SETTINGS_DOC}, ["support", "mask"]))
    async def create_session(request: Request):
        files, text = await read_form(request, 2 * config.max_supports + config.max_normals)
        settings = Settings.parse(text, config.defaults)
        pairs = support_pairs(files)
        types = check_types(text.getall("type"), len(pairs))
        session = await engine.run(engine.fit, settings, pairs, files.get("normal", []), types)
        engine.add(session)
        return session.info()

    @app.get("/v1/sessions/{sid}", tags=["sessions"], summary="a live session's settings and supports")
    async def get_session(sid: str):
        return engine.get(sid).info()

    @app.delete("/v1/sessions/{sid}", tags=["sessions"], summary="forget a live session")
    async def delete_session(sid: str):
        engine.drop(sid)
        return {"deleted": sid}

    @app.post("/v1/sessions/{sid}/segment", tags=["sessions"],
              summary="segment queries against a fitted session (fit once, predict many)",
              openapi_extra=_multipart_doc({**_QUERY_DOC, **_OUTPUT_DOC, **_KEEP_DOC}, ["query"]))
    async def session_segment(sid: str, request: Request):
        session = engine.get(sid)
        files, text = await read_form(request, config.max_queries)
        if files.get("support") or files.get("mask") or files.get("normal"):
            raise UploadError("support", "this session is already fitted: send only 'query' files "
                                         "(create a new session for other supports)")
        fmt, want_overlay = output_opts(text)
        keep = _flag(text, "keep", True)
        results = await engine.run(engine.segment, session, files.get("query", []), mask_format=fmt,
                                   want_overlay=want_overlay, store=keep)
        return {"session": sid, **session.type_info(), "results": results}

    @app.get("/v1/sessions/{sid}/results.zip", tags=["sessions"],
             summary="all masks, score maps, overlays, summary.csv/json and report.html segmented in this session")
    async def session_zip(sid: str):
        session = engine.get(sid)
        data = await engine.run(engine.results_zip, session)
        return Response(data, media_type="application/zip",
                        headers={"Content-Disposition": f'attachment; filename="fdseg-{sid}.zip"'})

    @app.get("/v1/sessions/{sid}/supports/{k}/{what}", tags=["sessions"],
             summary="a support's image or mask (what = image | mask)")
    async def support_file(sid: str, k: int, what: str):
        session = engine.get(sid)
        if not 1 <= k <= len(session.supports) or what not in ("image", "mask"):
            raise NotFound(f"session {sid} has no support {k} {what}")
        s = session.supports[k - 1]
        if what == "mask":
            return Response(s["mask_png"], media_type="image/png")
        media = {"jpg": "image/jpeg", "png": "image/png", "bmp": "image/bmp", "tif": "image/tiff",
                 "webp": "image/webp"}.get(s["ext"], "application/octet-stream")
        return Response(s["image"], media_type=media)

    @app.post("/v1/sessions/{sid}/save", tags=["saved sessions"],
              summary="write the supports, masks and settings to the server's sessions folder")
    async def save_session(sid: str, request: Request):
        session = engine.get(sid)
        title = ""
        if request.headers.get("content-type", "").lower().startswith(("multipart/", "application/x-www")):
            _, text = await read_form(request, 0)
            title = display_name(text.get("title", ""), "")[:100]
        return await engine.run(engine.save, session, title)

    # -- inspector files ---------------------------------------------------------------------------
    @app.get("/v1/sessions/{sid}/inspector", tags=["inspector files"],
             summary="download the session's fit as an inspector file (fdseg.load / fdseg segment --inspector "
                     "read it); with the support images when the session has them",
             responses={200: {"content": {"application/octet-stream": {}}}})
    async def session_inspector(sid: str):
        session = engine.get(sid)
        f, size = await engine.run(engine.inspector_file, session)

        def chunks():
            with f:
                while block := f.read(1 << 20):
                    yield block
        return StreamingResponse(chunks(), media_type="application/octet-stream", headers={
            "Content-Length": str(size),
            "Content-Disposition": f'attachment; filename="{session.inspector_filename}"'})

    @app.post("/v1/inspectors", tags=["inspector files"], status_code=201,
              summary="open an inspector file (.fdseg): returns a new live session, fitted, ready to segment",
              openapi_extra=_multipart_doc({"inspector": ("file", "one inspector file (fdseg fit --out FILE, "
                                                                  "or GET /v1/sessions/{sid}/inspector)")},
                                           ["inspector"]))
    async def open_inspector(request: Request):
        files, _ = await read_form(request, 2, allowed=("inspector",))     # 2: a second one gets the clear message
        ups = files.get("inspector", [])
        if len(ups) != 1:
            raise UploadError("inspector", "send one inspector file (field 'inspector', e.g. curl -F "
                                           "inspector=@line3.fdseg)")
        session = await engine.run(engine.open_upload, ups[0])
        engine.add(session)
        return session.info()

    @app.get("/v1/inspectors", tags=["inspector files"],
             summary="the sessions this server loaded from inspector files at start (fdseg serve --inspector)")
    async def list_inspectors():
        return {"inspectors": [s.info() for s in engine.pinned()]}

    @app.get("/v1/saved", tags=["saved sessions"], summary="sessions saved on this server")
    async def list_saved():
        return {"saved": engine.list_saved()}

    @app.post("/v1/saved/{sid}/open", tags=["saved sessions"], status_code=201,
              summary="refit a saved session; returns a new live session")
    async def open_saved(sid: str):
        settings, pairs, types = engine.load_saved(sid)
        session = await engine.run(engine.fit, settings, pairs, None, types)
        engine.add(session)
        return {**session.info(), "opened_from": sid}

    @app.post("/v1/convert", tags=["service"], summary="any image the server reads -> PNG (for browsers that "
              "cannot show TIFF or 16-bit images)", openapi_extra=_multipart_doc({"image": ("file", "an image")},
                                                                                 ["image"]))
    async def convert(request: Request):
        files, _ = await read_form(request, 1, allowed=("image",))
        if not files.get("image"):
            raise UploadError("image", "send one image file (field 'image')")
        data = await engine.run(engine.to_png, files["image"][0])
        return Response(data, media_type="image/png")

    return app
