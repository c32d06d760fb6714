"""HTTP layer: routes, upload limits, bounded concurrency and JSON errors (never a stack trace to the client).

Inference runs in a fixed thread pool (``workers``) and at most ``max_pending`` requests are admitted at once
(running or waiting); more get 503 with Retry-After. Memory stays bounded under load: a waiting request holds only
Starlette's spooled copy of its upload (at most 1 MB in memory, the rest in a temporary file) and is read and
decoded by the worker that takes it, so at most ``workers`` images are decoded at once. An upload that stalls (no
data for ``UploadLimits.body_timeout_s``) or is still incomplete ``UploadLimits.body_deadline_s`` after its headers is
answered 408 and its connection closed: uvicorn has only a keep-alive timeout (the header timeout and the
connection's own deadlines are in ``lesionnet.app.server``). Responses are typed (``schemas``) so /openapi.json
documents them; /docs is Swagger UI on assets served by the app (no CDN).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from importlib.resources import files
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, File, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lesionnet.app.content import DISCLAIMER
from lesionnet.app.ondevice import OnDevice
from lesionnet.app.schemas import ErrorResponse, HealthResponse, ModelCard, PredictResponse
from lesionnet.app.service import LesionService
from lesionnet.app.upload import (
    UploadError,
    UploadLimits,
    check_content_type,
    check_single_file,
    decode_image,
    guard_pillow,
)
from lesionnet.contract.on_device import on_device_policy_json

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"
MULTIPART_OVERHEAD = 64 * 1024  # form boundaries and headers around the file
# The page posts with fetch(), never with a form submission: form-action 'none'. 'wasm-unsafe-eval' lets the on-device
# mode compile onnxruntime-web's WebAssembly (served from /static/vendor/ort); it allows no JavaScript eval.
PAGE_CSP = (
    "default-src 'self'; img-src 'self' data: blob:; media-src 'self' blob:; style-src 'self'; "
    "script-src 'self' 'wasm-unsafe-eval'; connect-src 'self'; manifest-src 'self'; worker-src 'self'; "
    "object-src 'none'; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)
# The camera for this origin only (the page may capture in place later); every other powerful feature off
PERMISSIONS_POLICY = (
    "camera=(self), microphone=(), geolocation=(), payment=(), usb=(), serial=(), hid=(), midi=(), "
    "display-capture=(), accelerometer=(), gyroscope=(), magnetometer=()"
)
# Swagger UI's JS and CSS from the fastapi-offline wheel (the app extra), served from /docs/assets instead of a CDN
SWAGGER_ASSETS = Path(str(files("fastapi_offline") / "static"))
ERRORS = {
    400: "Bad request (e.g. an empty file)",
    408: "The upload stalled (no data for limits.body_timeout_s) or was not complete limits.body_deadline_s after "
    "the request's headers; the connection is closed",
    413: "File or image too large",
    415: "Not a JPEG, PNG or WebP upload",
    422: "Missing field, more than one 'file' part, or an undecodable, corrupt or too small image",
    500: "Unexpected server error (no details are given)",
    503: "Server busy; retry after the Retry-After seconds",
}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses=`` declaring the JSON error body for ``codes``."""
    return {code: {"model": ErrorResponse, "description": ERRORS[code]} for code in codes}


def swagger_page(title: str, openapi_url: str) -> tuple[str, str]:
    """(HTML, its CSP) of Swagger UI on the local assets; the inline start-up script is allowed by its hash.

    The page is the same for every request, so the hash is computed once; no 'unsafe-inline' is needed.
    """
    page = get_swagger_ui_html(
        openapi_url=openapi_url,
        title=f"{title} - API docs",
        swagger_js_url="/docs/assets/swagger-ui-bundle.js",
        swagger_css_url="/docs/assets/swagger-ui.css",
        swagger_favicon_url="/static/icon-192.png",
        swagger_ui_parameters={"validatorUrl": None},  # else the badge image is fetched from validator.swagger.io
    )
    html = bytes(page.body).decode()  # a Response's body is typed bytes | memoryview
    inline = re.findall(r"<script>(.*?)</script>", html, flags=re.DOTALL)
    hashes = " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(s.encode()).digest()).decode()}'" for s in inline)
    csp = (
        f"default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self' {hashes}; "
        "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
    )
    return html, csp


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(
        {"error": {"status": status, "code": code, "message": message}}, status_code=status, headers=headers
    )


class BodyLimit:
    """Refuse request bodies over ``max_bytes`` (by Content-Length up front, else while the body streams in) and
    uploads that stall or crawl: waiting more than ``timeout_s`` for the next piece of the body, or a body still
    incomplete ``deadline_s`` after the request reached the app (its headers), answers 408 and closes the connection,
    so a client that sends half a body, or trickles it a byte at a time, cannot hold it open (uvicorn has no body
    timeout). None: no such limit.

    The timeouts apply only until the body is complete: later ``receive()`` calls wait for a disconnect on purpose.
    """

    def __init__(
        self, app: ASGIApp, max_bytes: int, timeout_s: float | None = None, deadline_s: float | None = None
    ) -> None:
        self.app, self.max_bytes, self.timeout_s, self.deadline_s = app, max_bytes, timeout_s, deadline_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = UploadError(
            413, "file_too_large", f"The upload is larger than {(self.max_bytes - MULTIPART_OVERHEAD) // 2**20} MB."
        )
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await error_response(too_large.status, too_large.code, too_large.message)(scope, receive, send)
        received, body_done, stalled = 0, False, False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.deadline_s if self.deadline_s is not None else None

        async def limited() -> Message:
            nonlocal received, body_done, stalled
            if body_done:
                return await receive()
            wait, at_deadline = self.timeout_s, False  # None: no timeout
            if deadline is not None:
                left = max(0.0, deadline - loop.time())
                at_deadline = wait is None or left <= wait  # which limit a timeout here is
                wait = left if at_deadline else wait
            try:
                message = await asyncio.wait_for(receive(), wait)
            except TimeoutError:
                stalled = True
                if at_deadline:
                    raise UploadError(
                        408,
                        "upload_too_slow",
                        f"The upload was too slow: the photo did not arrive in full within {self.deadline_s:g} "
                        "seconds. Check the connection and send it again.",
                    ) from None
                raise UploadError(
                    408,
                    "upload_timeout",
                    f"The upload stalled: nothing arrived for {self.timeout_s:g} seconds. Check the connection and "
                    "send the photo again.",
                ) from None
            body_done = message["type"] != "http.request" or not message.get("more_body", False)
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise too_large
            return message

        async def closing(message: Message) -> None:
            """After a stalled upload the rest of its body never comes: close instead of keeping the connection."""
            if stalled and message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        await self.app(scope, limited, closing)


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


def install_error_handlers(app: FastAPI) -> None:
    """Every error becomes ``{error: {status, code, message}}``; nothing internal reaches the client."""

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
        hint = (
            " Send the image as multipart/form-data in a field named 'file'."
            if request.url.path.endswith("/predict")
            else ""
        )
        return error_response(422, "invalid_request", f"Missing or invalid: {', '.join(fields) or 'request'}.{hint}")

    @app.exception_handler(Exception)
    async def internal_error(_: Request, exc: Exception) -> JSONResponse:
        log.exception("Unhandled error")
        return error_response(500, "internal_error", "Something went wrong on the server; please try again.")


def install_security_headers(app: FastAPI) -> None:
    """nosniff, no referrer and the permissions policy everywhere, no caching of answers, the page's CSP (/docs sets
    its own, with its script's hash)."""

    @app.middleware("http")
    async def headers(request: Request, call_next: Any) -> Any:
        response = await call_next(request)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "no-referrer")  # the page's URL never leaves with a request
        response.headers.setdefault("Permissions-Policy", PERMISSIONS_POLICY)
        if request.url.path.startswith("/api/"):
            response.headers["Cache-Control"] = "no-store"  # answers about someone's skin are not cached
        elif not request.url.path.startswith("/openapi"):
            response.headers.setdefault("Content-Security-Policy", PAGE_CSP)
        if request.url.path == "/healthz":  # a liveness probe read from a cache would say nothing about now
            response.headers["Cache-Control"] = "no-store"
        return response


def install_api_routes(
    app: FastAPI, service: LesionService, limits: UploadLimits, executor: ThreadPoolExecutor, admission: Admission
) -> None:
    """/healthz, /api/v1/model and /api/v1/predict (bounded admission; decoding and analysis in the executor)."""

    @app.get(
        "/healthz",
        tags=["service"],
        summary="Liveness and the model version",
        response_model=HealthResponse,
        responses=error_responses(500),
    )
    async def healthz() -> dict[str, Any]:
        return {
            "status": "ok",
            "model_version": service.predictor.version,
            "demo_model": service.demo_model,
            "in_flight": admission.count,
        }

    @app.get(
        "/api/v1/model",
        tags=["model"],
        summary="Model card: data, metrics with CIs, intended use, limits",
        response_model=ModelCard,
        response_model_exclude_unset=True,
        responses=error_responses(500),
    )
    async def model_card() -> dict[str, Any]:
        return service.model_card()

    @app.post(
        "/api/v1/predict",
        tags=["model"],
        summary="Classify one lesion photo",
        description="Upload a JPEG, PNG or WebP photo (multipart field 'file', at most "
        f"{limits.max_bytes // 2**20} MB). Answers 'ok' with the top class, 'unsure' (no label) or "
        "'rejected' (not a lesion photo). Errors are JSON: {error: {status, code, message}}.",
        response_model=PredictResponse,
        response_model_exclude_unset=True,  # keys the service left out stay out
        responses=error_responses(400, 408, 413, 415, 422, 500, 503),
    )
    async def predict(
        request: Request, file: Annotated[UploadFile, File(description="The photo")]
    ) -> dict[str, Any] | JSONResponse:
        check_single_file((await request.form()).getlist("file"))  # the form FastAPI parsed (cached): no re-read
        check_content_type(file.content_type)
        if not admission.enter():
            return error_response(
                503, "busy", "The server is busy; try again in a few seconds.", headers={"Retry-After": "2"}
            )
        try:  # a queued upload stays in its spooled file (<= 1 MB in memory); the worker that takes it reads it
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(
                executor, lambda: service.analyse(decode_image(file.file.read(limits.max_bytes + 1), limits))
            )
        finally:
            admission.leave()


def install_on_device_routes(
    app: FastAPI, on_device: OnDevice, limits: UploadLimits, executor: ThreadPoolExecutor
) -> None:
    """The on-device mode's policy and model file. Outside /api/ on purpose: the service worker keeps them (and the
    runtime in /static/vendor) so the page answers offline after the first visit; neither holds anything personal."""

    @app.get("/on-device/policy.json", include_in_schema=False)
    async def on_device_policy() -> JSONResponse:
        return JSONResponse(on_device_policy_json(on_device.policy(limits)), headers={"Cache-Control": "no-cache"})

    @app.get("/on-device/{name}", include_in_schema=False)
    async def on_device_model(name: str) -> FileResponse:
        if on_device.unavailable is not None or name != on_device.model_name:
            raise StarletteHTTPException(404, "No such on-device model (a new one may be served: reload the page).")
        # exported at the first request (seconds to a minute), in the worker pool so the server keeps answering
        path = await asyncio.get_running_loop().run_in_executor(executor, on_device.model_file)
        return FileResponse(  # the name changes with the model and the gate: cache it for good
            path,
            media_type="application/octet-stream",
            headers={"Cache-Control": "public, max-age=31536000, immutable"},
        )


def install_page_routes(app: FastAPI) -> None:
    """The phone page, its PWA files and Swagger UI, all served by the app itself (no CDN)."""
    docs_html, docs_csp = swagger_page(app.title, app.openapi_url or "/openapi.json")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return HTMLResponse(docs_html, headers={"Content-Security-Policy": docs_csp})

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/manifest.webmanifest", include_in_schema=False)
    async def manifest() -> FileResponse:
        return FileResponse(STATIC / "manifest.webmanifest", media_type="application/manifest+json")

    @app.get("/sw.js", include_in_schema=False)
    async def service_worker() -> FileResponse:  # served from / so that its scope is the whole app
        return FileResponse(STATIC / "sw.js", media_type="text/javascript", headers={"Cache-Control": "no-cache"})

    app.mount("/docs/assets", StaticFiles(directory=SWAGGER_ASSETS), name="docs-assets")
    app.mount("/static", StaticFiles(directory=STATIC), name="static")


def build_api(
    service: LesionService,
    limits: UploadLimits | None = None,
    workers: int = 1,
    max_pending: int = 256,
    on_device: OnDevice | None = None,
) -> FastAPI:
    """The FastAPI app around a loaded ``service`` (``on_device``: default, exported models in a temporary folder)."""
    limits = limits or UploadLimits()
    guard_pillow(limits)
    executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lesionnet-infer")
    admission = Admission(max_pending)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> Any:
        yield
        executor.shutdown(wait=False, cancel_futures=True)

    ModelCard.model_validate(service.model_card())  # a malformed scores.json fails here, not at every request
    app = FastAPI(
        title="LesionNet",
        version=service.predictor.version,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        description=f"Classifies a photo of a skin lesion into 7 HAM10000 classes, with a referral flag, an "
        f"'unsure' answer and a Grad-CAM heatmap. {DISCLAIMER}",
    )
    app.add_middleware(
        BodyLimit,
        max_bytes=limits.max_bytes + MULTIPART_OVERHEAD,
        timeout_s=limits.body_timeout_s,
        deadline_s=limits.body_deadline_s,
    )
    app.state.service, app.state.admission = service, admission
    install_error_handlers(app)
    install_security_headers(app)
    install_api_routes(app, service, limits, executor, admission)
    install_on_device_routes(app, on_device or OnDevice(service), limits, executor)
    install_page_routes(app)
    return app
