"""The on-device mode end to end: the served model exported with its OOD gate, run by onnxruntime-web in headless
Chromium (static/ondevice.js), against what the server itself answers (issue 11, item 4).

Skipped without Chromium / Playwright (as tests/test_app_browser.py) or without the runtime files that
scripts/setup.sh copies from the pinned npm package into lesionnet/app/static/vendor/ort.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from lesionnet.app.ondevice import RUNTIME_FILES, VENDOR, OnDevice
from tests.test_app_browser import TIMEOUT_MS, serving, sync_api, watched_page

if not all((VENDOR / name).is_file() for name in RUNTIME_FILES.values()):
    pytest.skip(
        "onnxruntime-web is not installed in static/vendor/ort (bash scripts/setup.sh)", allow_module_level=True
    )

from lesionnet.app.api import build_api
from lesionnet.app.build import build_app
from lesionnet.data.decode import read_rgb
from tests.test_app import compose_serve, lesion_like, patterns

# Runs the page's own module on data handed over from Python: identical tensors, or image files as blobs
RUN_TENSORS = """async ({data, dims}) => {
  const od = await (await import("/static/ondevice.js")).load();
  return await od.run(new Float32Array(data), dims);
}"""
ANALYSE_FILES = """async (files) => {
  const od = await (await import("/static/ondevice.js")).load();
  const answers = [];
  for (const f of files) {
    const bytes = Uint8Array.from(atob(f.data), (c) => c.charCodeAt(0));
    answers.push(await od.analyse(new Blob([bytes], {type: f.type})));
  }
  return answers;
}"""
CACHED_URLS = """async () => {
  const urls = [];
  for (const name of await caches.keys()) {
    for (const request of await (await caches.open(name)).keys()) urls.push(new URL(request.url).pathname);
  }
  return urls;
}"""


def served(trained_run: Path, base: Path, *overrides: str) -> Iterator[tuple[str, Any]]:
    """The app the CLI serves, behind uvicorn for the module (an app is served once: its workers stop with it)."""
    cfg = compose_serve(
        [
            f"ckpt={trained_run}",
            f"paths.output_dir={base / 'serve'}",
            f"unsure.cache_dir={base / 'gates'}",
            f"on_device.cache_dir={base / 'on_device'}",
            "device=cpu",
            *overrides,
        ]
    )
    app = build_app(cfg)
    with serving(app) as url:
        yield url, app.state.service


def image_type_gate_file(trained_run: Path, folder: Path) -> Path:
    """An image-type gate for the run's model, fitted on the stage statistics of lesion-like and pattern pictures (a
    stand-in for dermoscopy vs other photos: what matters here is that page and server compute the same score)."""
    from lesionnet.inference import Predictor, load_members
    from lesionnet.inference.decision.image_type import fit_image_type

    predictor = Predictor(load_members(str(trained_run), device="cpu"))
    images = [lesion_like(seed=s) for s in range(12)] + list(patterns().values())
    stats = predictor.predict_arrays(images).stage_stats
    labels = [1] * 12 + [0] * (len(images) - 12)
    gate = fit_image_type(stats, labels, [str(k) for k in range(len(images))], predictor.version, "none", folds=3)
    return gate.save(folder / "image_type_gate.json")


@pytest.fixture(scope="module")
def ood_server(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Any]]:
    """The served app with both questions on: the familiarity (OOD) gate fitted on the run's validation split and an
    image-type gate."""
    base = tmp_path_factory.mktemp("on_device_ood")
    gate = image_type_gate_file(trained_run, base)
    yield from served(trained_run, base, "ood.enabled=true", f"image_type.gate_file={gate}")


@pytest.fixture(scope="module")
def plain_server(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Any]]:
    """The served app with its fitted confidence gate and no OOD gate: on the synthetic run's noise-trained features
    the OOD gate refuses every lesion-like picture, which would leave no top class to compare."""
    yield from served(trained_run, tmp_path_factory.mktemp("on_device_plain"))


def open_page(browser: sync_api.Browser, url: str) -> tuple[sync_api.BrowserContext, sync_api.Page, list[str]]:
    """A fresh context at the page, recording console errors (CSP violations included) and every predict request."""
    context = browser.new_context()
    page, errors = watched_page(context)
    # onnxruntime's WebAssembly start-up writes its warnings (e.g. "Unknown CPU vendor") to stderr: not errors
    page.on("console", lambda m: errors.remove(m.text) if "[W:onnxruntime" in m.text and m.text in errors else None)
    page.set_default_timeout(4 * TIMEOUT_MS)  # the first model request exports it (seconds)
    page.on("request", lambda r: errors.append(f"upload: {r.url}") if "/api/v1/predict" in r.url else None)
    page.goto(url + "/")
    return context, page, errors


def test_identical_tensors_give_the_servers_probabilities_energy_ood_and_image_type_scores_in_the_browser(
    ood_server: tuple[str, Any], browser: sync_api.Browser
) -> None:
    url, service = ood_server
    images = [lesion_like(seed=s, size=(60 + 7 * s, 45 + 5 * s)) for s in range(12)]
    images += list(patterns().values())[:4]
    tensors = service.predictor.preprocess(0, images).cpu().numpy()
    expected = service.predictor.predict_arrays(images)  # the same preprocessing, the server's forward pass
    context, page, errors = open_page(browser, url)
    got = page.evaluate(RUN_TENSORS, {"data": tensors.ravel().tolist(), "dims": list(tensors.shape)})
    context.close()
    assert not errors, errors
    probs = np.asarray(got["probs"])
    assert probs.shape == expected.probs.shape
    assert np.abs(probs - expected.probs).max() < 1e-4
    assert np.abs(np.asarray(got["negEnergy"]) - expected.neg_energy).max() < 1e-4
    ood = service.ood.score(expected.features)
    np.testing.assert_allclose(np.asarray(got["oodScore"]), ood, rtol=1e-4, atol=1e-4)
    assert ((np.asarray(got["oodScore"]) > service.ood.threshold) == service.ood.refuses(expected.features)).all()
    image_type = service.image_type.score(expected.stage_stats)
    np.testing.assert_allclose(np.asarray(got["imageTypeScore"]), image_type, atol=1e-3)
    assert (
        (np.asarray(got["imageTypeScore"]) < service.image_type.threshold)
        == (image_type < service.image_type.threshold)
    ).all()


def test_a_colour_constancy_model_gives_the_servers_probabilities_in_the_browser(
    trained_run_cc: Path, browser: sync_api.Browser, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Shades of Gray runs inside the exported graph: the page feeds it the same tensors as for any model."""
    for url, service in served(trained_run_cc, tmp_path_factory.mktemp("on_device_cc")):
        assert service.predictor.members[0].data_config["colour_constancy"]["method"] == "shades_of_gray"
        images = [lesion_like(seed=s, size=(60 + 7 * s, 45 + 5 * s)) for s in range(8)]
        tensors = service.predictor.preprocess(0, images).cpu().numpy()
        expected = service.predictor.predict_arrays(images)
        context, page, errors = open_page(browser, url)
        got = page.evaluate(RUN_TENSORS, {"data": tensors.ravel().tolist(), "dims": list(tensors.shape)})
        context.close()
        assert not errors, errors
        assert np.abs(np.asarray(got["probs"]) - expected.probs).max() < 1e-4


def image_files(folder: Path) -> list[Path]:
    """Lesion-like pictures of many sizes (each resize path: up, down, non-integer, exact 2x), as PNG and JPEG, and the
    patterns the image check refuses."""
    folder.mkdir()
    sizes = [(60, 45), (96, 72), (128, 96), (200, 150), (257, 190), (300, 225), (64, 48), (150, 200), (90, 120)]
    files = []
    for k in range(36):
        path = folder / f"lesion_{k}.{'png' if k % 2 else 'jpg'}"
        Image.fromarray(lesion_like(seed=100 + k, size=sizes[k % len(sizes)])).save(path, quality=92)
        files.append(path)
    for name, pixels in patterns().items():
        Image.fromarray(pixels).save(folder / f"{name}.png")
        files.append(folder / f"{name}.png")
    return files


def summary(answer: dict[str, Any]) -> tuple[str, str | None, tuple[str, ...]]:
    """What must agree: the status (ok / unsure / rejected), the most likely class and the refusal reasons."""
    top = answer["probabilities"][0]["code"] if answer["probabilities"] else None
    return answer["status"], top, tuple(answer["image_check"]["reasons"])


def analysed_in_the_browser(browser: sync_api.Browser, url: str, files: list[Path]) -> list[dict[str, Any]]:
    """The page's on-device answers for image files (read from their bytes, as a picked file), with no console error."""
    payload = [
        {"data": base64.b64encode(p.read_bytes()).decode(), "type": "image/png" if p.suffix == ".png" else "image/jpeg"}
        for p in files
    ]
    context, page, errors = open_page(browser, url)
    got = page.evaluate(ANALYSE_FILES, payload)
    context.close()
    assert not errors, errors
    return got


def test_from_image_files_the_browser_gives_the_servers_top_class_and_refusals(
    plain_server: tuple[str, Any], browser: sync_api.Browser, tmp_path: Path
) -> None:
    url, service = plain_server
    files = image_files(tmp_path / "images")
    expected = [service.analyse(read_rgb(p)) for p in files]
    got = analysed_in_the_browser(browser, url, files)
    same = [summary(g) == summary(e) for g, e in zip(got, expected, strict=True)]
    disagree = [
        (p.name, summary(g), summary(e)) for p, g, e, ok in zip(files, got, expected, same, strict=True) if not ok
    ]
    assert sum(same) / len(same) >= 0.98, disagree
    statuses = {e["status"] for e in expected}
    assert "rejected" in statuses and statuses & {"ok", "unsure"}, statuses  # both refusals and answers compared
    for g, e in zip(got, expected, strict=True):  # the same answer, field by field, where both answered
        if summary(g) == summary(e) and e["status"] != "rejected":
            assert g["urgency"]["level"] == e["urgency"]["level"] and g["message"] == e["message"]
            assert g["confidence"]["threshold"] == e["confidence"]["threshold"]
            assert g["on_device"] is True and g["model_version"] == e["model_version"]


def test_the_page_analyses_on_the_device_without_uploading_and_again_offline(
    plain_server: tuple[str, Any], browser: sync_api.Browser, tmp_path: Path
) -> None:
    url = plain_server[0]
    photo = tmp_path / "spot.jpg"
    Image.fromarray(lesion_like(seed=7)).save(photo, quality=92)
    expect = sync_api.expect
    context, page, errors = open_page(browser, url)
    box = page.locator("#on-device")
    expect(box).to_be_enabled()
    box.check()
    expect(page.locator("#on-device-note")).to_contain_text("never leaves it", timeout=4 * TIMEOUT_MS)
    page.locator("#file").set_input_files(str(photo))
    page.locator("#submit").click()
    expect(page.locator("#result")).to_be_visible()
    expect(page.locator("#urgency")).not_to_be_empty()
    cached = page.evaluate(CACHED_URLS)
    for needed in (
        "/on-device/policy.json",
        "/static/ondevice.js",
        *(f"/static/vendor/ort/{n}" for n in RUNTIME_FILES.values()),
    ):
        assert needed in cached, (needed, cached)
    assert any(u.startswith("/on-device/model-") and u.endswith(".onnx") for u in cached), cached

    assert not errors, errors
    context.set_offline(True)  # the server is unreachable: page, policy, runtime and model from the cache
    page.reload()
    assert page.evaluate("fetch('/healthz').then(() => 'online', () => 'offline')") == "offline"
    expect(box).to_be_checked()  # the choice is remembered
    expect(page.locator("#on-device-note")).to_contain_text("never leaves it", timeout=4 * TIMEOUT_MS)
    page.locator("#file").set_input_files(str(photo))
    page.locator("#submit").click()
    expect(page.locator("#result")).to_be_visible()
    expect(page.locator("#status")).to_have_text("")
    context.close()
    # offline, only what needs the server fails to load (the model card, the /healthz probe above)
    assert all(e.startswith("Failed to load resource: net::ERR_") for e in errors), errors


def test_without_the_runtime_the_option_is_off_and_says_why(
    plain_server: tuple[str, Any], browser: sync_api.Browser
) -> None:
    service = plain_server[1]
    app = build_api(service, on_device=OnDevice(service, vendor=VENDOR / "missing"))
    with serving(app) as url:
        context, page, errors = open_page(browser, url)
        sync_api.expect(page.locator("#on-device-note")).to_contain_text("runtime is not installed")
        sync_api.expect(page.locator("#on-device")).to_be_disabled()
        context.close()
    assert not errors, errors


def test_with_both_questions_the_browser_refuses_flags_and_refers_as_the_server_does(
    ood_server: tuple[str, Any], browser: sync_api.Browser, tmp_path: Path
) -> None:
    """Question 1 (image type: the only refusal by the model) and question 2 (familiarity: flag, refer) on the page
    give the server's verdicts, status, message and urgency for the same files."""
    url, service = ood_server
    files = image_files(tmp_path / "images")
    expected = [service.analyse(read_rgb(p)) for p in files]
    got = analysed_in_the_browser(browser, url, files)

    def verdicts(answer: dict[str, Any]) -> tuple[Any, ...]:
        image_type, familiarity = answer["image_type"], answer["familiarity"]
        return (
            answer["status"],
            answer["message"],
            answer["urgency"]["level"],
            image_type and image_type["dermoscopy"],
            familiarity and familiarity["familiar"],
        )

    same = [verdicts(g) == verdicts(e) for g, e in zip(got, expected, strict=True)]
    assert sum(same) / len(same) >= 0.95, [
        (p.name, verdicts(g), verdicts(e)) for p, g, e in zip(files, got, expected, strict=True)
    ]
    assert {e["image_type"]["dermoscopy"] for e in expected if e["image_type"]} == {True, False}  # both verdicts seen
