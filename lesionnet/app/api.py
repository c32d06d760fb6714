"""HTTP layer: routes, upload limits, bounded concurrency and JSON errors (never a stack trace to the client).

Inference runs in a fixed thread pool (``workers``) and at most ``max_pending`` requests are admitted at once
(running or waiting); more get 503 with Retry-After, so memory stays bounded under load.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, File, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lesionnet.app.content import DISCLAIMER
from lesionnet.app.service import LesionService
from lesionnet.app.upload import UploadError, UploadLimits, check_content_type, decode_image, guard_pillow

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"
MULTIPART_OVERHEAD = 64 * 1024  # form boundaries and headers around the file
PAGE_CSP = ("default-src 'self'; img-src 'self' data: blob:; media-src 'self' blob:; style-src 'self'; "
            "script-src 'self'; connect-src 'self'; manifest-src 'self'; worker-src 'self'; frame-ancestors 'none'")


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"status": status, "code": code, "message": message}}, status_code=status,
                        headers=headers)


class BodyLimit:
    """Refuse request bodies over ``max_bytes``: by Content-Length up front, else while the body streams in."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = UploadError(413, "file_too_large",
                                f"The upload is larger than {(self.max_bytes - MULTIPART_OVERHEAD) // 2**20} MB.")
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await error_response(too_large.status, too_large.code, too_large.message)(scope, receive, send)
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise too_large
            return message

        await self.app(scope, limited, send)


class Admission:
    """A non-blocking counter of requests in flight: admit up to ``limit``, refuse the rest at once."""

    def __init__(self, limit: int) -> None:
        self.limit, self.count, self._lock = limit, 0, threading.Lock()

    def enter(self) -> bool:
        with self._lock:
            if self.count >= self.limit:
                return False
            self.count += 1
            return True

    def leave(self) -> None:
        with self._lock:
            self.count -= 1


def create_app(service: LesionService, limits: UploadLimits | None = None, workers: int = 1,
               max_pending: int = 4) -> FastAPI:
    """The FastAPI app around a loaded ``service``."""
    limits = limits or UploadLimits()
    guard_pillow(limits)
    executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lesionnet-infer")
    admission = Admission(max_pending)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> Any:
        yield
        executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(
        title="LesionNet", version=service.predictor.version, lifespan=lifespan,
        description=f"Classifies a photo of a skin lesion into 7 HAM10000 classes, with a referral flag, an "
                    f"'unsure' answer and a Grad-CAM heatmap. {DISCLAIMER}",
    )
    app.add_middleware(BodyLimit, max_bytes=limits.max_bytes + MULTIPART_OVERHEAD)
    app.state.service, app.state.admission = service, admission

    @app.exception_handler(UploadError)
    async def upload_error(_: Request, exc: UploadError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        if isinstance(exc.__cause__, UploadError):  # raised by BodyLimit while FastAPI parsed the form
            return await upload_error(_, exc.__cause__)
        codes = {404: "not_found", 405: "method_not_allowed", 400: "bad_request"}
        return error_response(exc.status_code, codes.get(exc.status_code, "http_error"), str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        fields = sorted({".".join(str(p) for p in e.get("loc", ())[1:]) for e in exc.errors()})
        hint = " Send the image as multipart/form-data in a field named 'file'." \
            if request.url.path.endswith("/predict") else ""
        return error_response(422, "invalid_request", f"Missing or invalid: {', '.join(fields) or 'request'}.{hint}")

    @app.exception_handler(Exception)
    async def internal_error(_: Request, exc: Exception) -> JSONResponse:
        log.exception("Unhandled error")
        return error_response(500, "internal_error", "Something went wrong on the server; please try again.")

    @app.middleware("http")
    async def headers(request: Request, call_next: Any) -> Any:
        response = await call_next(request)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        if request.url.path.startswith("/api/"):
            response.headers["Cache-Control"] = "no-store"  # answers about someone's skin are not cached
        elif not request.url.path.startswith(("/docs", "/redoc", "/openapi")):
            response.headers.setdefault("Content-Security-Policy", PAGE_CSP)
        return response

    @app.get("/healthz", tags=["service"], summary="Liveness and the model version")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "model_version": service.predictor.version, "in_flight": admission.count}

    @app.get("/api/v1/model", tags=["model"], summary="Model card: data, metrics with CIs, intended use, limits")
    async def model_card() -> dict[str, Any]:
        return service.model_card()

    @app.post(
        "/api/v1/predict", tags=["model"], summary="Classify one lesion photo",
        description="Upload a JPEG, PNG or WebP photo (multipart field 'file', at most "
                    f"{limits.max_bytes // 2**20} MB). Answers 'ok' with the top class, 'unsure' (no label) or "
                    "'rejected' (not a lesion photo). Errors are JSON: {error: {status, code, message}}.",
        responses={400: {"description": "Empty file"}, 413: {"description": "File or image too large"},
                   415: {"description": "Not a JPEG, PNG or WebP upload"},
                   422: {"description": "Undecodable, corrupt or too small image"},
                   503: {"description": "Server busy; retry after the Retry-After seconds"}},
    )
    async def predict(file: Annotated[UploadFile, File(description="The photo")]) -> dict[str, Any]:
        check_content_type(file.content_type)
        data = await file.read(limits.max_bytes + 1)
        if not admission.enter():
            return error_response(503, "busy", "The server is busy; try again in a few seconds.",
                                  headers={"Retry-After": "2"})
        try:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(executor, lambda: service.analyse(decode_image(data, limits)))
        finally:
            admission.leave()

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/manifest.webmanifest", include_in_schema=False)
    async def manifest() -> FileResponse:
        return FileResponse(STATIC / "manifest.webmanifest", media_type="application/manifest+json")

    @app.get("/sw.js", include_in_schema=False)
    async def service_worker() -> FileResponse:  # served from / so that its scope is the whole app
        return FileResponse(STATIC / "sw.js", media_type="text/javascript", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app
