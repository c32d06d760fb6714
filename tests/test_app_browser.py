"""The web page end to end: the real server (uvicorn) on a tiny checkpoint, driven by headless Chromium.

Needs Debian's Chromium at /usr/bin/chromium (or $LESIONNET_CHROMIUM) and Playwright for Python; skipped when either
is missing (``apt-get install -y chromium`` and ``pip install playwright``; no ``playwright install``).
"""

from __future__ import annotations

import base64
import io
import os
import re
import socket
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, features

pytestmark = pytest.mark.browser

CHROMIUM = Path(os.environ.get("LESIONNET_CHROMIUM", "/usr/bin/chromium"))
if not CHROMIUM.is_file():
    pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install -y chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed (pip install playwright)")

import uvicorn  # noqa: E402

from lesionnet.app.build import build_app  # noqa: E402
from lesionnet.app.upload import UploadError, UploadLimits, decode_image  # noqa: E402
from lesionnet.data.metadata import embedded_sample_images  # noqa: E402
from tests.test_app import compose_serve  # noqa: E402

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SAMPLE = embedded_sample_images() / "ISIC_0024372.jpg"
TIMEOUT_MS = 15_000


@contextmanager
def serving(app: object) -> Iterator[str]:
    """``app`` behind a real uvicorn on 127.0.0.1 (a free port); yields its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))  # uvicorn serves this socket, so there is no race for the port
    uv = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not uv.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            pytest.fail("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        uv.should_exit = True
        thread.join(timeout=10)
        sock.close()


@pytest.fixture(scope="module")
def server(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The app the CLI serves, on a 1-epoch checkpoint, behind a real uvicorn on 127.0.0.1 (a free port)."""
    base = tmp_path_factory.mktemp("browser")
    # unsure.threshold=0: a 1-epoch model is never confident, and the page should show a full "ok" answer
    cfg = compose_serve(
        [
            f"ckpt={trained_run}",
            f"paths.output_dir={base / 'serve'}",
            f"on_device.cache_dir={base / 'on_device'}",
            "device=cpu",
            "unsure.threshold=0.0",
        ]
    )
    with serving(build_app(cfg)) as url:
        yield url


def watched_page(context: sync_api.BrowserContext) -> tuple[sync_api.Page, list[str]]:
    """A new page and the list its console errors and uncaught exceptions (CSP violations included) go to."""
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    return page, errors


@pytest.fixture
def page(browser: sync_api.Browser, server: str) -> Iterator[sync_api.Page]:
    """A phone-sized page at /, failing the test on any console error or uncaught exception (CSP included)."""
    context = browser.new_context(
        viewport={"width": 390, "height": 844}, device_scale_factor=1, is_mobile=True, has_touch=True
    )
    page, errors = watched_page(context)
    page.goto(server + "/")
    yield page
    context.close()
    assert not errors, f"browser errors: {errors}"


def expect_notice(page: sync_api.Page) -> None:
    notice = page.locator("header .notice[role=note]")
    sync_api.expect(notice).to_be_visible()
    sync_api.expect(notice).to_contain_text("This is not a diagnosis")
    sync_api.expect(page.locator("footer .notice")).to_contain_text("Not a diagnosis")


def test_keyboard_user_uploads_a_photo_and_sees_classes_heatmap_and_urgency(page: sync_api.Page) -> None:
    expect = sync_api.expect
    expect_notice(page)
    expect(page.locator("#card")).not_to_have_text("Loading...")  # the model card loaded from /api/v1/model
    # Both pickers are labelled file inputs; the (visually hidden) inputs take the focus and their label shows it
    for name, input_id in (("Take a photo", "camera"), ("Choose a file", "file")):
        expect(page.get_by_label(name, exact=True)).to_have_attribute("id", input_id)
        expect(page.locator(f"#{input_id}")).to_have_attribute("aria-describedby", "photo-hint")
    expect(page.locator("#submit")).to_be_disabled()
    order = []
    for _ in range(4):  # skip link, camera, file, (submit is disabled) ...
        page.keyboard.press("Tab")
        order.append(page.evaluate("document.activeElement.id || document.activeElement.className"))
    assert order[:3] == ["skip", "camera", "file"], order
    ring = "id => getComputedStyle(document.querySelector(`label[for=${id}]`)).outlineStyle"
    for focused, other in (("camera", "file"), ("file", "camera")):  # the focus ring is on the focused one's label
        page.locator(f"#{focused}").focus()
        assert page.evaluate(ring, focused) == "solid", f"focusing #{focused} shows no ring on its label"
        assert page.evaluate(ring, other) == "none", f"focusing #{focused} rings the label of #{other}"
    # Open the file chooser from the keyboard (Space on the focused input) and pick a real HAM10000 image
    # (Chromium on a loaded machine sometimes drops the first key press before the page is settled: refocus, retry)
    for attempt in range(3):
        page.locator("#file").focus()
        try:
            with page.expect_file_chooser(timeout=5_000) as chooser:
                page.keyboard.press("Space")
            break
        except sync_api.TimeoutError:
            if attempt == 2:
                raise
    chooser.value.set_files(str(SAMPLE))
    expect(page.locator("#preview-box")).to_be_visible()
    expect(page.locator("#preview-name")).to_have_text(SAMPLE.name)
    expect(page.locator("#submit")).to_be_enabled()
    page.keyboard.press("Tab")  # the next stop after the file input is now the enabled submit button
    assert page.evaluate("document.activeElement.id") == "submit"
    with page.expect_response("**/api/v1/predict") as response:
        page.keyboard.press("Enter")
    assert response.value.status == 200
    body = response.value.json()
    assert body["status"] == "ok"

    result = page.locator("#result")
    expect(result).to_be_visible()
    expect(result).to_be_focused()  # screen readers and keyboard users land on the answer
    # Urgency: the server's message, coloured by level
    urgency = page.locator("#urgency")
    expect(urgency).to_have_text(body["urgency"]["message"])
    expect(urgency).to_have_class(re.compile(rf"\burgency {body['urgency']['level']}\b"))
    assert body["urgency"]["level"] in {"see_dermatologist", "routine"}
    expect(page.locator("#message")).to_have_text(body["message"])
    # Top classes: three bars, in order, widths = percentages, each with an accessible label
    expect(page.locator("#bars-title")).to_be_visible()
    items = page.locator("#bars > li")
    expect(items).to_have_count(3)
    for k, cls in enumerate(body["probabilities"][:3]):
        pct = round(cls["probability"] * 100)
        item = items.nth(k)
        expect(item.locator("strong")).to_have_text(f"{cls['name']}: {pct}%")
        expect(item.locator(".small")).to_have_text(cls["description"])
        bar = item.locator(".bar")
        expect(bar).to_have_attribute("aria-label", f"{cls['name']} {pct} percent")
        expect(bar).to_have_class(re.compile("malignant") if cls["malignant"] else re.compile(r"^bar$"))
        expect(bar.locator("span")).to_have_attribute("style", f"width: {pct}%;")
        bar_w, fill_w = bar.bounding_box()["width"], bar.locator("span").bounding_box()["width"]
        assert fill_w == pytest.approx(bar_w * pct / 100, abs=2)
    # The heatmap: the answer's grid coloured over the model's view of the photo, drawn by the page on a canvas
    cam = page.locator("#cam")
    expect(cam).to_be_visible()
    page.wait_for_function("document.getElementById('cam').width > 0")
    width, height, coloured = cam.evaluate(
        """c => { const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                  let red = 0; for (let i = 0; i < d.length; i += 4) if (d[i] > 200 && d[i + 2] < 80) red++;
                  return [c.width, c.height, red]; }"""
    )
    assert max(width, height) == 256 and coloured > 0  # the hottest cells are drawn red over the photo
    assert "Heatmap" in cam.get_attribute("aria-label")
    expect(page.locator("#cam-box figcaption")).to_contain_text("not where a disease is")
    expect(page.locator("#version")).to_contain_text(body["model_version"])
    expect(page.locator("#version")).to_contain_text("not a diagnosis")
    expect_notice(page)  # still on screen with the answer
    expect(page.locator("#status")).to_have_text("")


def test_a_blank_image_is_refused_on_the_page_without_classes_or_heatmap(page: sync_api.Page, tmp_path: Path) -> None:
    blank = tmp_path / "blank.png"
    Image.fromarray(np.full((300, 400, 3), (200, 150, 120), np.uint8)).save(blank)
    page.locator("#file").set_input_files(str(blank))
    with page.expect_response("**/api/v1/predict") as response:
        page.locator("#submit").click()
    assert response.value.json()["status"] == "rejected"
    sync_api.expect(page.locator("#result")).to_be_visible()
    sync_api.expect(page.locator("#urgency")).to_have_class(re.compile(r"\bunknown\b"))
    sync_api.expect(page.locator("#urgency")).to_have_text(response.value.json()["message"])
    sync_api.expect(page.locator("#reasons > li")).not_to_have_count(0)  # why the photo was refused
    sync_api.expect(page.locator("#bars > li")).to_have_count(0)
    sync_api.expect(page.locator("#cam-box")).to_be_hidden()
    expect_notice(page)


def test_wrong_file_type_is_explained_without_a_request(page: sync_api.Page, tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("not a photo")
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url) if "/api/v1/predict" in r.url else None)
    page.locator("#file").set_input_files(str(text))
    status = page.locator("#status")
    sync_api.expect(status).to_contain_text("JPEG, PNG or WebP")
    sync_api.expect(status).to_have_class("error")
    sync_api.expect(page.locator("#submit")).to_be_disabled()
    assert not requests


def test_api_docs_render_and_run_with_every_other_host_blocked(browser: sync_api.Browser, server: str) -> None:
    """/docs needs nothing from a CDN: requests to any other origin are aborted, and no CSP violation is logged."""
    context = browser.new_context()
    foreign: list[str] = []

    def same_origin_only(route: sync_api.Route) -> None:
        if route.request.url.startswith(server + "/"):
            route.continue_()
        else:
            foreign.append(route.request.url)
            route.abort()

    context.route("**/*", same_origin_only)
    page, errors = watched_page(context)
    page.goto(server + "/docs")
    expect = sync_api.expect
    paths = page.locator(".opblock-summary-path")
    expect(paths).to_have_count(3)
    assert sorted(paths.all_inner_texts()) == ["/api/v1/model", "/api/v1/predict", "/healthz"]
    expect(page.locator("section.models")).to_contain_text("PredictResponse")
    expect(page.locator("section.models")).to_contain_text("ErrorResponse")
    page.locator(".opblock-summary-path", has_text="/healthz").click()  # run an operation from the page
    page.get_by_role("button", name="Try it out").click()
    with page.expect_response("**/healthz") as response:
        page.get_by_role("button", name="Execute").click()
    assert response.value.status == 200
    expect(page.locator(".live-responses-table tbody .response-col_status").first).to_have_text("200")
    context.close()
    assert not foreign, f"requests to other hosts: {foreign}"
    assert not errors, f"browser errors: {errors}"


# ----------------------------------------------------------------------------- issue 22, item 5: red-team hardening

IMAGE_SIZE = "b64 => imageSize(Uint8Array.from(atob(b64), (c) => c.charCodeAt(0)))"  # app.js's header reader


def png_without_pixels(width: int, height: int) -> bytes:
    """A PNG's signature, IHDR (``width`` x ``height``, RGB) and a few compressed bytes: its size without its pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


def encoded(size: tuple[int, int], fmt: str, mode: str = "RGB", **options: object) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, (200, 120, 90, 255)[: len(mode)]).save(buf, format=fmt, **options)
    return buf.getvalue()


def test_a_photo_with_too_many_pixels_is_refused_before_it_is_decoded(page: sync_api.Page, tmp_path: Path) -> None:
    """A 20000 x 20000 PNG takes seconds to decode (and the preview would decode it): its header says it is too large,
    and the page refuses it with the server's message without decoding or sending anything."""
    huge = tmp_path / "huge.png"
    huge.write_bytes(png_without_pixels(20_000, 20_000))
    with pytest.raises(UploadError) as server_says:
        decode_image(huge.read_bytes(), UploadLimits())  # the served limits (serve.yaml's max_pixels)
    assert server_says.value.code == "too_many_pixels"
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url) if "/api/v1/predict" in r.url else None)
    page.locator("#file").set_input_files(str(huge))
    status = page.locator("#status")
    sync_api.expect(status).to_have_text(server_says.value.message)
    sync_api.expect(status).to_have_class("error")
    sync_api.expect(page.locator("#submit")).to_be_disabled()
    sync_api.expect(page.locator("#preview-box")).to_be_hidden()
    assert page.locator("#preview").get_attribute("src") is None  # never handed to the <img> to decode
    assert not requests
    # an ordinary photo is still taken
    page.locator("#file").set_input_files(str(SAMPLE))
    sync_api.expect(page.locator("#preview-box")).to_be_visible()
    sync_api.expect(page.locator("#submit")).to_be_enabled()


def test_the_page_reads_the_size_of_png_jpeg_and_webp_files_from_their_headers(page: sync_api.Page) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: the stored (unrotated) size is what is counted
    jpeg_extras = {"exif": exif, "icc_profile": b"\0" * 70_000}  # APP1 and two APP2 segments before the frame header
    files = {
        "png": (encoded((37, 23), "PNG"), (37, 23)),
        "png header only": (png_without_pixels(20_000, 20_000), (20_000, 20_000)),
        "jpeg with exif and a large profile": (encoded((3001, 7), "JPEG", **jpeg_extras), (3001, 7)),
        "progressive jpeg": (encoded((37, 23), "JPEG", progressive=True), (37, 23)),
    }
    if features.check("webp"):
        files |= {
            "webp (VP8)": (encoded((3001, 7), "WEBP", quality=80), (3001, 7)),
            "webp lossless (VP8L)": (encoded((3001, 7), "WEBP", lossless=True), (3001, 7)),
            "webp with alpha (VP8X)": (encoded((37, 23), "WEBP", mode="RGBA", quality=80), (37, 23)),
        }
    for name, (data, (width, height)) in files.items():
        size = page.evaluate(IMAGE_SIZE, base64.b64encode(data).decode())
        assert size == {"width": width, "height": height}, name
    for not_a_header in (b"not an image", encoded((37, 23), "JPEG")[:12], b"\x89PNG\r\n\x1a\n"):
        assert page.evaluate(IMAGE_SIZE, base64.b64encode(not_a_header).decode()) is None, not_a_header


def test_offline_the_demo_banner_and_model_card_show_at_load(browser: sync_api.Browser, server: str) -> None:
    """Offline (the on-device mode) the page comes from the service worker and /api/v1/model cannot load: the demo
    banner and the last model card still show at once, not only after the first analysis."""
    context = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    page, errors = watched_page(context)
    page.goto(server + "/")
    card = page.request.get(server + "/api/v1/model").json()
    training = card["training_data"]
    assert training["demo_model"], "the test checkpoint (a few synthetic images) is a demo model"
    sync_api.expect(page.locator("#card")).to_contain_text(training["summary"])
    for _ in range(100):  # the page's files are cached once the service worker controls it (polled by evaluate:
        if page.evaluate("navigator.serviceWorker.controller !== null"):  # wait_for_function evals, which CSP refuses)
            break
        page.wait_for_timeout(100)
    else:
        pytest.fail("The service worker did not take control of the page within 10 s.")
    context.set_offline(True)
    page.reload()
    assert page.evaluate("fetch('/api/v1/model').then(() => 'online', () => 'offline')") == "offline"
    banner = page.locator("#demo-banner")
    sync_api.expect(banner).to_be_visible()
    sync_api.expect(banner).to_have_text(training["demo_notice"])
    sync_api.expect(page.locator("#card")).to_contain_text(training["summary"])
    sync_api.expect(page.locator("#card")).to_contain_text("model card from your last visit")
    sync_api.expect(page.locator("#result")).to_be_hidden()  # nothing was analysed
    context.close()
    assert all(e.startswith("Failed to load resource: net::ERR_") for e in errors), errors


def fulfil_with(body: dict[str, Any]) -> Callable[[sync_api.Route], None]:
    """A route handler answering every request with ``body`` as JSON."""
    return lambda route: route.fulfill(json=body)


def test_the_page_shows_the_two_questions_and_a_not_dermoscopy_refusal_in_plain_words(
    page: sync_api.Page, tmp_path: Path
) -> None:
    """The server's answer with both verdicts (routed: this test's model has no image-type gate): the page says each
    question's answer, and a refusal as not dermoscopy shows the words about dermatoscopes and doctors."""
    from lesionnet.app import content

    photo = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 400, 3), dtype=np.uint8)).save(photo)
    answers = {
        "flagged": {
            "status": "unsure",
            "message": content.MESSAGES["unfamiliar"],
            "image_type": {"dermoscopy": True, "score": 2.0, "threshold": 0.2, "source": "s"},
            "familiarity": {
                "familiar": False,
                "method": "mahalanobis",
                "score": 9.0,
                "threshold": 5.0,
                "percentile": 1.0,
                "source": "s",
            },
            "urgency": {
                "refer": True,
                "reasons": ["unfamiliar"],
                "level": "see_dermatologist",
                "message": content.MESSAGES["unfamiliar"],
            },
        },
        "refused": {
            "status": "rejected",
            "message": content.MESSAGES["not_dermoscopy"],
            "image_type": {"dermoscopy": False, "score": -3.0, "threshold": 0.2, "source": "s"},
            "familiarity": None,
            "urgency": {
                "refer": None,
                "reasons": [content.NOT_DERMOSCOPY_REASON],
                "level": "unknown",
                "message": content.MESSAGES["not_dermoscopy"],
            },
        },
    }
    common = {
        "model_version": "m@1",
        "demo_model": False,
        "disclaimer": "Not a diagnosis.",
        "top_class": None,
        "probabilities": [],
        "referral_check": {"message": "checked"},
        "confidence": None,
        "heatmap": None,
        "image_check": {"passed": True, "reasons": [], "stats": {}},
    }
    for name, answer in answers.items():
        page.route("**/api/v1/predict", fulfil_with({**common, **answer}))
        page.locator("#file").set_input_files(str(photo))
        page.locator("#submit").click()
        sync_api.expect(page.locator("#result")).to_be_visible()
        sync_api.expect(page.locator("#urgency")).to_have_text(answer["message"])
        questions = page.locator("#questions")
        if name == "flagged":
            sync_api.expect(questions).to_have_text(
                "Dermatoscope image: yes. Like the lesions the model learnt from: no, so it is sent to a doctor."
            )
            sync_api.expect(page.locator("#urgency")).to_have_class(re.compile(r"\bsee_dermatologist\b"))
        else:
            sync_api.expect(questions).to_have_text("Dermatoscope image: no.")
            sync_api.expect(page.locator("#urgency")).to_contain_text("dermatoscope")
        page.unroute("**/api/v1/predict")
