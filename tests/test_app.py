"""The web app: every endpoint, every bad input, the refusals, the referral rule and Grad-CAM, on a tiny checkpoint."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import matplotlib.cbook
import numpy as np
import pytest
import timm
from fastapi.testclient import TestClient
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from PIL import Image

from lesionnet.app import build, content
from lesionnet.app.api import build_api
from lesionnet.app.build import build_app, build_service
from lesionnet.app.schemas import ErrorResponse, HealthResponse, ModelCard, PredictResponse
from lesionnet.app.service import LesionService
from lesionnet.app.upload import UploadLimits, decode_image
from lesionnet.classes import CLASS_NAMES
from lesionnet.contract.files import ContractError
from lesionnet.contract.scores import (
    EnsembleRecord,
    ScoredModel,
    ScoresFile,
    ScoresRow,
    read_scores,
    write_scores,
)
from lesionnet.data.metadata import embedded_sample_images
from lesionnet.data.run_folder import RunFolder
from lesionnet.inference import (
    Prediction,
    Predictor,
    eval_crop_box,
    load_member,
    resolve_checkpoints,
)
from lesionnet.inference.decision.image_check import check_image
from lesionnet.inference.decision.policy import ConfidenceGate, ReferralPolicy, fit_gate
from lesionnet.inference.explain import find_target_layer
from tests.test_train import CONF

SAMPLE_IMAGES = embedded_sample_images()


def jpeg(pixels: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def lesion_like(seed: int = 0, size: tuple[int, int] = (200, 150)) -> np.ndarray:
    """Skin-toned textured background with a darker brown blob: passes the image check like a real photo."""
    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[:h, :w]
    blob = np.exp(-(((x - w / 2) / (w / 5)) ** 2 + ((y - h / 2) / (h / 4)) ** 2))[..., None]
    skin, brown = np.array([215, 160, 140]), np.array([110, 60, 45])
    img = skin * (1 - blob) + brown * blob + rng.normal(0, 10, (h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def patterns() -> dict[str, np.ndarray]:
    y, x = np.mgrid[:300, :400]
    two = lambda mask: np.where(mask[..., None], [230, 180, 160], [90, 50, 40]).astype(np.uint8)  # noqa: E731
    return {
        "solid": np.full((300, 400, 3), (200, 150, 120), np.uint8),
        "black": np.zeros((300, 400, 3), np.uint8),
        "white": np.full((300, 400, 3), 255, np.uint8),
        "stripes": two((x // 8) % 2 == 0),
        "wide_stripes": two((x // 30) % 2 == 0),
        "checkerboard": two((x // 20 + y // 20) % 2 == 0),
        "fine_checkerboard": two((x // 3 + y // 3) % 2 == 0),
        "noise": np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8),
        "neon": np.dstack([np.full((300, 400), 255), (x * 255 // 400), np.zeros((300, 400))]).astype(np.uint8),
    }


@pytest.fixture(scope="module")
def run(trained_run: Path) -> Path:
    return trained_run


@pytest.fixture(scope="module")
def scores_file(run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A scores.json of the served checkpoint, written by the contract's writer, with known thresholds."""
    member = load_member(resolve_checkpoints(str(run))[0])
    name = member.name
    s = {
        "n": 100,
        "accuracy": 0.71,
        "balanced_accuracy": 0.55,
        "macro_auroc": 0.88,
        "macro_f1": 0.5,
        "log_loss": 0.9,
        "ece": 0.08,
        "confusion_matrix": [],
        "ci95": {"accuracy": [0.68, 0.74], "balanced_accuracy": [0.5, 0.6]},
        "melanoma": {
            "argmax": {"sensitivity": 0.4, "specificity": 0.95, "threshold": None},
            "auroc": 0.8,
            "val_threshold": {"target_sensitivity": 0.95, "sensitivity": 0.93, "specificity": 0.6, "threshold": 0.05},
        },
        "temperature": 1.5,
        "ece_after_temperature": 0.03,
        "per_class": {"mel": {"precision": 0.5, "recall": 0.4, "f1": 0.44, "auroc": 0.8, "support": 20}},
    }
    path = tmp_path_factory.mktemp("eval") / "scores.json"
    document = ScoresFile(
        evaluated="test split of a run",
        set="test",
        n_images=100,
        tta="none",
        scores={name: s},
        final=name,
        models=[ScoredModel(**member.describe(), provenance="checked")],
    )
    return write_scores(document, path)


def compose_serve(overrides: list[str]) -> DictConfig:
    """The serve config; the feature-space OOD gate is off unless a test sets ood.*: fitted on the synthetic noise
    images of these runs, it (rightly) refuses the lesion-like test pictures. tests/test_ood.py covers it."""
    defaults = [] if any(o.startswith("ood.") for o in overrides) else ["ood.enabled=false"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("serve", overrides=[*defaults, *overrides])


@pytest.fixture(scope="module")
def client(run: Path, scores_file: Path, tmp_path_factory: pytest.TempPathFactory) -> TestClient:
    out = tmp_path_factory.mktemp("serve")
    cfg = compose_serve(
        [
            f"ckpt={run}",
            f"scores={scores_file}",
            f"paths.output_dir={out}",
            "device=cpu",
            "unsure.threshold=0.0",
            "limits.max_upload_mb=1",
            "limits.max_pixels=1000000",
        ]
    )
    with TestClient(build_app(cfg), raise_server_exceptions=False) as c:
        yield c


def post(client: TestClient, data: bytes, content_type: str = "image/jpeg", name: str = "x.jpg") -> dict:
    r = client.post("/api/v1/predict", files={"file": (name, data, content_type)})
    return {"http": r.status_code, **r.json()}


# ----------------------------------------------------------------------------- endpoints


def test_health_model_card_and_docs(client: TestClient) -> None:
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and "@" in health["model_version"]
    card = client.get("/api/v1/model").json()
    assert card["model"]["version"] == health["model_version"]
    assert card["metrics"]["accuracy_ci95"] == [0.68, 0.74] and card["metrics"]["n_images"] == 100
    assert "not a diagnosis" in card["not_a_diagnosis"] and card["limitations"] and card["intended_use"]
    assert card["referral"]["melanoma_threshold"] == 0.05 and card["referral"]["temperature"] == 1.5
    assert [c["code"] for c in card["classes"]] == ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
    assert client.get("/docs").status_code == 200
    assert "/api/v1/predict" in client.get("/openapi.json").json()["paths"]


def test_docs_are_served_from_this_origin_without_a_cdn(client: TestClient) -> None:
    page = client.get("/docs")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "http://" not in page.text and "https://" not in page.text
    urls = re.findall(r'(?:src|href)="([^"]*)"', page.text)
    assert {"/docs/assets/swagger-ui-bundle.js", "/docs/assets/swagger-ui.css"} <= set(urls)
    for url in urls:
        assert url.startswith("/") and not url.startswith("//"), url
        assert client.get(url).status_code == 200, url
    assert "SwaggerUIBundle" in client.get("/docs/assets/swagger-ui-bundle.js").text
    csp = page.headers["content-security-policy"]  # the inline start-up script is allowed by its hash only
    assert "script-src 'self' 'sha256-" in csp and "unsafe" not in csp and "connect-src 'self'" in csp
    assert '"validatorUrl": null' in page.text  # Swagger UI's default badge would load from validator.swagger.io
    assert client.get("/redoc").status_code == 404


def test_predict_answers_with_classes_urgency_version_and_heatmap(client: TestClient) -> None:
    r = client.post("/api/v1/predict", files={"file": ("l.jpg", jpeg(lesion_like()), "image/jpeg")})
    assert r.status_code == 200 and r.headers["cache-control"] == "no-store"
    body = r.json()
    assert body["status"] == "ok" and body["image_check"]["passed"]
    probs = body["probabilities"]
    assert len(probs) == 7 and abs(sum(p["probability"] for p in probs) - 1) < 1e-3
    assert all(p["name"] and p["description"] for p in probs)
    assert body["top_class"] == probs[0] and probs[0]["probability"] == max(p["probability"] for p in probs)
    assert body["model_version"] == client.get("/healthz").json()["model_version"]
    assert body["urgency"]["level"] in {"see_dermatologist", "routine"} and "not a diagnosis" in body["disclaimer"]
    heatmap = body["heatmap"]  # the baseline CNN's dense head: Grad-CAM, sent as a small grid
    assert heatmap["method"] == "gradcam" and heatmap["layer"] == "model.features"
    grid = np.asarray(heatmap["grid"])
    assert grid.ndim == 2 and max(grid.shape) <= 16 and grid.min() >= 0 and grid.max() == pytest.approx(1.0)
    assert heatmap["class_code"] == body["top_class"]["code"] and all(0 <= v <= 1 for v in heatmap["crop_box"])


def test_openapi_documents_the_answer_and_the_error_body(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    schemas = spec["components"]["schemas"]
    answer = {
        "status",
        "message",
        "top_class",
        "probabilities",
        "urgency",
        "confidence",
        "image_check",
        "heatmap",
        "image_type",
        "familiarity",
        "model_version",
        "demo_model",
        "disclaimer",
        "referral_check",
    }
    assert set(schemas["PredictResponse"]["properties"]) == set(schemas["PredictResponse"]["required"]) == answer
    assert schemas["PredictResponse"]["properties"]["status"]["enum"] == ["ok", "unsure", "rejected"]
    assert {"code", "name", "description", "malignant", "probability"} <= set(schemas["ClassProbability"]["required"])
    assert {"refer", "level", "message", "reasons"} == set(schemas["Urgency"]["required"])
    assert {"method", "grid", "crop_box", "class_code", "layer"} <= set(schemas["Heatmap"]["required"])
    assert schemas["ErrorResponse"]["properties"]["error"]["$ref"] == "#/components/schemas/ErrorDetail"
    assert (
        set(schemas["ErrorDetail"]["properties"])
        == set(schemas["ErrorDetail"]["required"])
        == {"status", "code", "message"}
    )
    assert "HTTPValidationError" not in schemas  # 422 is our error body too, not FastAPI's default

    def ref(responses: dict, code: str) -> str:
        return responses[code]["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[-1]

    predict = spec["paths"]["/api/v1/predict"]["post"]["responses"]
    assert ref(predict, "200") == "PredictResponse"
    assert {code: ref(predict, code) for code in ("400", "413", "415", "422", "500", "503")} == dict.fromkeys(
        ("400", "413", "415", "422", "500", "503"), "ErrorResponse"
    )
    assert ref(spec["paths"]["/healthz"]["get"]["responses"], "200") == "HealthResponse"
    assert ref(spec["paths"]["/api/v1/model"]["get"]["responses"], "200") == "ModelCard"


@pytest.mark.parametrize("image", ["lesion", "solid"])  # an "ok" answer with Grad-CAM and a "rejected" one
def test_answers_validate_against_their_schemas_and_are_what_the_service_built(client: TestClient, image: str) -> None:
    data = jpeg(lesion_like() if image == "lesion" else patterns()["solid"])
    r = client.post("/api/v1/predict", files={"file": ("l.jpg", data, "image/jpeg")})
    body = r.json()
    PredictResponse.model_validate(body)
    service: LesionService = client.app.state.service
    built = json.loads(json.dumps(service.analyse(decode_image(data, UploadLimits()))))
    assert body == built and list(body) == list(built)  # no key added, lost or reordered by the response model
    assert list(body["urgency"]) == list(built["urgency"])  # a refusal's urgency has no referral details
    assert body["status"] == ("ok" if image == "lesion" else "rejected")
    card = client.get("/api/v1/model").json()
    ModelCard.model_validate(card)
    assert card == json.loads(json.dumps(service.model_card()))
    HealthResponse.model_validate(client.get("/healthz").json())
    empty = client.post("/api/v1/predict", files={"file": ("l.jpg", b"", "image/jpeg")})
    assert ErrorResponse.model_validate(empty.json()).error.status == empty.status_code == 400


def test_png_and_webp_are_accepted(client: TestClient) -> None:
    for fmt, ctype in (("PNG", "image/png"), ("WEBP", "image/webp")):
        buf = io.BytesIO()
        Image.fromarray(lesion_like(1)).save(buf, format=fmt)
        assert post(client, buf.getvalue(), ctype)["status"] == "ok"


# ----------------------------------------------------------------------------- bad input


def truncated_jpeg() -> bytes:
    data = jpeg(lesion_like())
    return data[: len(data) // 2]


@pytest.mark.parametrize(
    ("data", "ctype", "status", "code"),
    [
        (b"", "image/jpeg", 400, "empty_file"),
        (b"%PDF-1.4 not an image at all" * 10, "image/jpeg", 422, "not_an_image"),
        ("truncated", "image/jpeg", 422, "corrupt_image"),
        ("small", "image/jpeg", 422, "image_too_small"),
        ("lesion", "text/plain", 415, "unsupported_media_type"),
        ("lesion", "application/octet-stream", 415, "unsupported_media_type"),
        ("gif", "image/gif", 415, "unsupported_media_type"),
        ("gif", "image/jpeg", 422, "not_an_image"),  # a GIF declared as JPEG is still refused by its bytes
    ],
)
def test_bad_uploads_get_clear_json_errors(
    client: TestClient, data: bytes | str, ctype: str, status: int, code: str
) -> None:
    if data == "truncated":
        data = truncated_jpeg()
    elif data == "small":
        data = jpeg(lesion_like(size=(20, 16)))
    elif data == "lesion":
        data = jpeg(lesion_like())
    elif data == "gif":
        buf = io.BytesIO()
        Image.fromarray(lesion_like()).save(buf, format="GIF")
        data = buf.getvalue()
    body = post(client, data, ctype)
    assert (body["http"], body["error"]["code"]) == (status, code)
    assert body["error"]["message"] and "Traceback" not in json.dumps(body)


@pytest.mark.filterwarnings("error::PIL.Image.DecompressionBombWarning")  # as guard_pillow sets it in the server
@pytest.mark.parametrize("side", [1100, 1500])  # Pillow's warning zone (1-2x the limit) and its error zone (> 2x)
def test_decompression_bombs_are_refused_before_decoding(client: TestClient, side: int) -> None:
    buf = io.BytesIO()
    Image.new("RGB", (side, side), (200, 150, 120)).save(buf, format="PNG")  # a few KB, 1.2-2.25 Mpx
    body = post(client, buf.getvalue(), "image/png", "bomb.png")
    assert (body["http"], body["error"]["code"]) == (413, "too_many_pixels")


def test_oversized_files_are_refused_by_length_and_while_streaming(client: TestClient) -> None:
    big = np.random.default_rng(0).integers(0, 256, 1_200_000, dtype=np.uint8).tobytes()
    body = post(client, big)
    assert (body["http"], body["error"]["code"]) == (413, "file_too_large")
    boundary = "lesionnetboundary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="x.jpg"\r\n'
        "Content-Type: image/jpeg\r\n\r\n"
    ).encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    chunks = iter([head, *[big[i : i + 100_000] for i in range(0, len(big), 100_000)], tail])
    r = client.post(
        "/api/v1/predict", content=chunks, headers={"content-type": f"multipart/form-data; boundary={boundary}"}
    )
    assert r.status_code == 413 and r.json()["error"]["code"] == "file_too_large"


def test_malformed_requests_and_unknown_routes_are_json(client: TestClient) -> None:
    r = client.post("/api/v1/predict", data={"other": "x"})
    assert r.status_code == 422 and "'file'" in r.json()["error"]["message"]
    assert client.get("/api/v1/predict").json()["error"]["code"] == "method_not_allowed"
    assert client.get("/nope").json()["error"]["code"] == "not_found"


def test_internal_errors_and_overload_never_leak_a_trace(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    service: LesionService = client.app.state.service
    monkeypatch.setattr(service, "analyse", lambda image: 1 / 0)
    r = client.post("/api/v1/predict", files={"file": ("l.jpg", jpeg(lesion_like()), "image/jpeg")})
    assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error" and "ZeroDivision" not in r.text
    admission = client.app.state.admission
    monkeypatch.setattr(admission, "count", admission.limit)
    r = client.post("/api/v1/predict", files={"file": ("l.jpg", jpeg(lesion_like()), "image/jpeg")})
    assert r.status_code == 503 and r.headers["retry-after"] == "2"


def test_200_concurrent_uploads_all_answer_with_at_most_workers_analysing_at_once(run: Path) -> None:
    """The default queue takes 200 uploads at once; they wait as spooled files and run in the ``workers`` threads."""
    service = stub_service(run, [0.02, 0.02, 0.6, 0.1, 0.02, 0.2, 0.04])
    analyse, lock, seen = service.analyse, threading.Lock(), {"now": 0, "max": 0, "threads": set()}

    def tracked(image: np.ndarray) -> dict:
        with lock:
            seen["now"] += 1
            seen["max"] = max(seen["max"], seen["now"])
            seen["threads"].add(threading.current_thread().name)
        try:
            time.sleep(0.002)
            return analyse(image)
        finally:
            with lock:
                seen["now"] -= 1

    service.analyse = tracked
    app = build_api(service, workers=2)  # the default max_pending
    images = [jpeg(lesion_like(seed)) for seed in range(8)]

    async def fire() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await asyncio.gather(
                *[
                    client.post("/api/v1/predict", files={"file": (f"{i}.jpg", images[i % 8], "image/jpeg")})
                    for i in range(200)
                ]
            )

    answers = asyncio.run(fire())
    assert [r.status_code for r in answers] == [200] * 200
    assert {r.json()["status"] for r in answers} == {"ok"}
    assert seen["max"] <= 2 and all(name.startswith("lesionnet-infer") for name in seen["threads"])
    assert app.state.admission.count == 0


# ----------------------------------------------------------------------------- refusing when unsure


@pytest.mark.parametrize("name", sorted(patterns()))
def test_blank_synthetic_and_noise_images_are_rejected(client: TestClient, name: str) -> None:
    body = post(client, jpeg(patterns()[name]))
    assert (body["http"], body["status"], body["top_class"], body["probabilities"]) == (200, "rejected", None, [])
    assert body["urgency"]["refer"] is None and body["image_check"]["reasons"]
    assert body["message"].startswith("This does not look like")


def test_every_embedded_real_lesion_passes_the_image_check() -> None:
    refused = [
        p.name
        for p in sorted(SAMPLE_IMAGES.glob("*.jpg"))
        if not check_image(np.asarray(Image.open(p).convert("RGB"))).passed
    ]
    assert refused == []


def test_a_natural_photo_passes_the_image_check_and_needs_the_confidence_gate(run: Path) -> None:
    """Known limit: the statistics check is no lesion detector; a portrait is left to the model's confidence."""
    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        photo = np.asarray(Image.open(f).convert("RGB"))
    assert check_image(photo).passed
    service = stub_service(run, [0.02, 0.02, 0.35, 0.25, 0.02, 0.3, 0.04], gate=ConfidenceGate("msp", 0.4))
    body = service.analyse(photo)
    assert body["status"] == "unsure" and body["top_class"] is None and body["urgency"]["refer"] is True


def stub_service(
    run: Path, probs: np.ndarray, gate: ConfidenceGate | None = None, referral: ReferralPolicy | None = None
) -> LesionService:
    """The real service with the model's output replaced by ``probs`` (a 1-epoch model is not confident)."""
    cfg = compose_serve(
        [f"ckpt={run}", "device=cpu", "unsure.threshold=0.4", "gradcam=false", "paths.output_dir=unused"]
    )
    service = build_service(cfg)
    service.gate = gate or service.gate
    service.referral = referral or service.referral
    probs = np.asarray(probs, dtype=np.float64)
    service.predictor.predict_arrays = lambda images, cams=False: Prediction(
        probs=probs[None],
        member_probs=probs[None, None],
        neg_energy=np.zeros(1),
        features=np.zeros((1, 1)),
        stage_stats=np.zeros((1, 1)),
    )
    return service


def onehot(code: str, p: float, rest: str = "nv") -> np.ndarray:
    names = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
    probs = np.zeros(7)
    probs[names.index(code)] = p
    probs[names.index(rest)] += 1 - p
    return probs


def test_low_confidence_is_unsure_and_never_reassures(run: Path) -> None:
    flat = stub_service(run, np.full(7, 1 / 7)).analyse(lesion_like())
    assert flat["status"] == "unsure" and flat["top_class"] is None and len(flat["probabilities"]) == 7
    assert flat["urgency"]["level"] == "see_dermatologist"  # 3/7 malignant mass >= 0.3: still refer
    benign_unsure = stub_service(run, [0.02, 0.02, 0.35, 0.25, 0.02, 0.3, 0.04]).analyse(lesion_like())
    assert benign_unsure["status"] == "unsure"  # an unsure answer sends to a doctor, whatever the classes say
    assert (benign_unsure["urgency"]["refer"], benign_unsure["urgency"]["level"]) == (True, "see_dermatologist")
    assert benign_unsure["message"] == benign_unsure["urgency"]["message"] == content.MESSAGES["unsure"]
    assert any("confidence" in reason for reason in benign_unsure["urgency"]["reasons"])


def test_with_a_temperature_the_reasons_do_not_call_the_raw_score_a_probability() -> None:
    """The page shows calibrated percentages (temperature) beside the rule's raw score: "Melanoma 98%" next to
    "Melanoma probability 0.85" read as a contradiction, so the reason names the raw score as such."""
    probs = onehot("mel", 0.85)
    calibrated = ReferralPolicy(melanoma_threshold=0.04, target_sensitivity=0.95, temperature=0.5)
    reasons = calibrated.assess(probs, CLASS_NAMES)["reasons"]
    assert reasons[0].startswith("Melanoma raw score (before the calibration of the percentages) 0.85 is at or above")
    assert "The raw score (before the calibration of the percentages) of a skin cancer" in reasons[1]
    plain = ReferralPolicy(melanoma_threshold=0.04, target_sensitivity=0.95).assess(probs, CLASS_NAMES)["reasons"]
    assert plain[0].startswith("Melanoma probability 0.85 is at or above 0.04")


@pytest.mark.parametrize(
    ("probs", "refer", "why"),
    [
        (onehot("nv", 0.97), False, None),
        (onehot("mel", 0.06), True, "Melanoma probability"),  # validated melanoma threshold 0.05, malignant sum low
        (onehot("bcc", 0.31), True, "skin cancer or pre-cancer"),  # malignant rule
        (onehot("akiec", 0.29), False, None),
    ],
)
def test_urgency_flag(run: Path, probs: np.ndarray, refer: bool, why: str | None) -> None:
    policy = ReferralPolicy(malignant_threshold=0.3, melanoma_threshold=0.05, target_sensitivity=0.95)
    body = stub_service(run, probs, gate=ConfidenceGate("msp", 0.0), referral=policy).analyse(lesion_like())
    assert body["status"] == "ok" and body["urgency"]["refer"] is refer
    assert body["urgency"]["level"] == ("see_dermatologist" if refer else "routine")
    assert (why is None) == (not body["urgency"]["reasons"])
    assert why is None or why in body["urgency"]["reasons"][0]


def test_default_referral_without_scores_is_the_malignant_rule_and_says_unvalidated() -> None:
    policy = ReferralPolicy.from_scores(None)
    assert policy.melanoma_threshold is None and "not validated" in policy.source
    assert policy.assess(onehot("mel", 0.3), ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"])["refer"]
    assert np.allclose(ReferralPolicy(temperature=2.0).calibrate(np.array([0.8, 0.2])), [2 / 3, 1 / 3])


HAM_PRIOR = np.array([327, 514, 1099, 115, 1113, 6705, 142]) / 10015  # HAM10000's class frequencies


def logit_adjusted_row() -> ScoresRow:
    """A ``+posthoc-la`` row as evaluate.py writes it (tau 1): decisions on softmax(log p - log prior), shown
    probabilities with the adjustment taken back out (scale 1/T, bias log prior / T, T = 1.25), and their figures."""
    temperature = 1.25
    return ScoresRow.model_validate(
        {
            "n": 1520,
            "accuracy": 0.66,
            "balanced_accuracy": 0.62,
            "macro_f1": 0.5,
            "macro_auroc": 0.9,
            "log_loss": 0.895,
            "ece": 0.12,
            "classwise_ece": 0.074,
            "brier": 0.47,
            "confusion_matrix": [],
            "per_class": {"mel": {"precision": 0.5, "recall": 0.6, "f1": 0.55, "auroc": 0.85, "support": 174}},
            "temperature": 0.45,
            "ece_after_temperature": 0.127,
            "logit_adjustment": {"tau": 1.0, "prior": HAM_PRIOR.tolist(), "of": "m"},
            "display": {
                "method": "prior-undo+temperature",
                "scale": [1 / temperature] * 7,
                "bias": (np.log(HAM_PRIOR) / temperature).tolist(),
                "validation_log_loss": {"temperature": 0.9, "prior-undo+temperature": 0.68},
            },
            "displayed": {"ece": 0.043, "classwise_ece": 0.0398, "log_loss": 0.676, "brier": 0.341},
        }
    )


def test_a_logit_adjusted_model_decides_with_its_adjusted_scores_and_shows_probabilities_of_the_class_mix(
    run: Path,
) -> None:
    """The answer names the class the adjusted scores decide (balanced accuracy: here a dermatofibroma, rare), and
    the referral rule compares the adjusted scores; the percentages shown are those of the class mix, where the common
    nevus is more probable. The model card reports the per-class calibration of what is shown."""
    row = logit_adjusted_row()
    policy = ReferralPolicy.from_scores(row, malignant_threshold=0.3)
    assert (policy.display_method, policy.temperature) == ("prior-undo+temperature", 0.45)
    adjusted = np.array([0.05, 0.05, 0.05, 0.45, 0.05, 0.30, 0.05])  # akiec bcc bkl df mel nv vasc
    shown = policy.calibrate(adjusted)
    expected = adjusted ** (1 / 1.25) * HAM_PRIOR ** (1 / 1.25)
    np.testing.assert_allclose(shown, expected / expected.sum())
    assert shown.argmax() == CLASS_NAMES.index("nv") and adjusted.argmax() == CLASS_NAMES.index("df")

    service = stub_service(run, adjusted, gate=ConfidenceGate("msp", 0.0), referral=policy)
    body = service.analyse(lesion_like())
    assert body["status"] == "ok" and body["top_class"]["code"] == "df"  # the decision is unchanged
    assert body["top_class"]["probability"] == pytest.approx(shown[CLASS_NAMES.index("df")], abs=1e-4)
    assert body["probabilities"][0]["code"] == "nv"  # the shown percentages, highest first
    assert body["message"] == content.DECIDED.format(name=content.plain_name("df"))
    assert body["urgency"]["malignant_probability"] == pytest.approx(0.15)  # the rule reads the adjusted scores
    assert "raw score (before the calibration" in policy.malignant_reason("0.15")
    PredictResponse.model_validate(body)

    service.scores = row
    service.evaluated = ScoresFile(
        evaluated="test split of a run", set="test", n_images=1520, tta="none", models=[], scores={"m": row}
    )
    card = service.model_card()
    ModelCard.model_validate(card)
    metrics = card["metrics"]
    figures = (metrics["ece"], metrics["classwise_ece"], metrics["brier"], metrics["log_loss"])
    assert figures == (0.12, 0.074, 0.47, 0.895)
    assert metrics["shown_calibration"] == {
        "method": "prior-undo+temperature",
        "ece": 0.043,
        "classwise_ece": 0.0398,
        "log_loss": 0.676,
        "brier": 0.341,
    }
    assert "4.0% per diagnosis" in card["performance"] and "logit adjustment taken back out" in card["performance"]
    assert card["referral"]["display_method"] == "prior-undo+temperature"


def test_gate_is_fitted_on_validation_images_and_stored(run: Path, tmp_path: Path) -> None:
    cfg = compose_serve(
        [
            f"ckpt={run}",
            "device=cpu",
            "gradcam=false",
            f"paths.output_dir={tmp_path}",
            "unsure.quantile=0.2",
            "unsure.cache_dir=null",
        ]
    )  # no cache: the record is in output_dir
    service = build_service(cfg)
    gate_file = tmp_path / "confidence_gate.json"
    assert gate_file.is_file() and "quantile of" in service.gate.source
    val = RunFolder(run).split_table("val")["path"].tolist()
    expected = fit_gate(service.predictor, val, quantile=0.2)
    assert service.gate.threshold == pytest.approx(expected.threshold)
    assert service.gate.fit["n_images"] == len(val)
    ModelCard.model_validate(service.model_card())  # no scores.json, a fitted gate
    explicit = compose_serve([f"ckpt={run}", "device=cpu", "gradcam=false", f"unsure.gate_file={gate_file}"])
    assert build_service(explicit).gate == service.gate  # an explicit gate file is used as it is
    stored = json.loads(gate_file.read_text())
    gate_file.write_text(json.dumps({**stored, "model_version": "other@123"}))
    with pytest.raises(ContractError, match="fitted for model other@123.*Delete the file"):
        build_service(explicit)


def test_a_confidence_gate_file_written_before_versioning_is_refused_with_the_fix(tmp_path: Path) -> None:
    gate = ConfidenceGate("energy", 1.5, "5% quantile of 9 validation images", "m@1", {"n_images": 9}, {"tta": "none"})
    path = gate.save(tmp_path / "gate.json")
    assert json.loads(path.read_text())["schema_version"] == 1 and ConfidenceGate.load(path, "m@1") == gate
    unversioned = {k: v for k, v in json.loads(path.read_text()).items() if k != "schema_version"}
    path.write_text(json.dumps(unversioned))  # what this app wrote before the file had a version
    where = re.escape(str(path))
    with pytest.raises(ContractError, match=rf"{where} .*written before files were versioned.*Delete the file"):
        ConfidenceGate.load(path, "m@1")


def test_a_confidence_gate_file_of_another_version_or_method_is_refused_and_a_cached_one_refitted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = ConfidenceGate("msp", 0.3, "s", "m@1", fitted_on={"tta": "none"}).save(tmp_path / "gate.json")
    document = json.loads(path.read_text())
    path.write_text(json.dumps({**document, "schema_version": 2}))
    with pytest.raises(ContractError, match=r"schema version 2 \(written by another LesionNet release\)"):
        ConfidenceGate.load(path, "m@1")
    path.write_text(json.dumps({**document, "method": "entropy"}))
    with pytest.raises(ContractError, match=rf"(?s){re.escape(str(path))} is not a valid confidence gate file.*method"):
        ConfidenceGate.load(path, "m@1")
    predictor = type("Stub", (), {"version": "m@1"})()
    with caplog.at_level(logging.WARNING, logger="lesionnet.app.build"):
        assert build._load_cached(path, predictor, {"tta": "none"}) is None  # the app refits it and writes it anew
    assert "refitting it" in caplog.text


def count_fits(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The quantile of every fit_gate call that build_gate makes."""
    calls: list[float] = []

    def counted(*args: object, **kwargs: object) -> ConfidenceGate:
        calls.append(kwargs["quantile"])
        return fit_gate(*args, **kwargs)

    monkeypatch.setattr(build, "fit_gate", counted)
    return calls


def test_gate_is_fitted_once_per_model_and_settings_then_loaded_from_the_cache(
    run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    calls = count_fits(monkeypatch)
    cache = tmp_path / "gates"

    def start(n: int, *overrides: str) -> ConfidenceGate:  # each start has a fresh output folder, as under Hydra
        return build_service(
            compose_serve(
                [
                    f"ckpt={run}",
                    "device=cpu",
                    "gradcam=false",
                    f"unsure.cache_dir={cache}",
                    f"paths.output_dir={tmp_path / f'start{n}'}",
                    *overrides,
                ]
            )
        ).gate

    with caplog.at_level(logging.INFO, logger="lesionnet.app.build"):
        first = start(1)
        assert calls == [0.05] and "fitted" in caplog.text and len(list(cache.glob("*.json"))) == 1
        caplog.clear()
        assert start(2) == first and calls == [0.05]  # same model and settings: no refit
        assert "loaded from cache" in caplog.text
    other = start(3, "unsure.quantile=0.2")  # another quantile is another fit, kept beside the first
    assert calls == [0.05, 0.2] and other.fit["quantile"] == 0.2 and len(list(cache.glob("*.json"))) == 2
    assert start(4, "unsure.quantile=0.2") == other and start(5, "unsure.max_images=5").fit["n_images"] == 5
    assert calls == [0.05, 0.2, 0.05]
    assert not list(tmp_path.glob("start*/confidence_gate.json"))


def test_both_gates_fitted_at_one_start_share_one_pass_over_the_validation_split(
    run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A first start fits the confidence gate and the OOD gate on the same validation images: the model runs over
    them once, not once per gate; a second start loads both from the cache and runs nothing."""
    passes: list[int] = []
    real_paths, real_arrays = Predictor.predict_paths, Predictor.predict_arrays

    def counted_paths(self: Predictor, paths: list, *args: object, **kwargs: object) -> object:
        passes.append(len(paths))
        return real_paths(self, paths, *args, **kwargs)

    def counted_arrays(self: Predictor, images: list, *args: object, **kwargs: object) -> object:
        passes.append(len(images))
        return real_arrays(self, images, *args, **kwargs)

    monkeypatch.setattr(Predictor, "predict_paths", counted_paths)
    monkeypatch.setattr(Predictor, "predict_arrays", counted_arrays)
    overrides = [f"ckpt={run}", "device=cpu", "gradcam=false", "ood.enabled=true", f"unsure.cache_dir={tmp_path}"]
    service = build_service(compose_serve([*overrides, f"paths.output_dir={tmp_path / 'start1'}"]))
    n_val = len(RunFolder(run).split_table("val"))
    assert passes == [n_val]
    assert service.gate.fit["n_images"] == n_val and service.ood is not None and service.ood.n_images == n_val
    assert len(list(tmp_path.glob("*.json"))) == 2  # both gates cached
    again = build_service(compose_serve([*overrides, f"paths.output_dir={tmp_path / 'start2'}"]))
    assert passes == [n_val] and again.gate == service.gate and again.ood.threshold == service.ood.threshold


def test_a_stale_or_broken_cached_gate_is_refitted_not_used(
    run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    calls = count_fits(monkeypatch)
    cfg = compose_serve(
        [
            f"ckpt={run}",
            "device=cpu",
            "gradcam=false",
            f"unsure.cache_dir={tmp_path}",
            f"paths.output_dir={tmp_path / 'out'}",
        ]
    )
    gate = build_service(cfg).gate
    (cached,) = tmp_path.glob("*.json")
    stored = json.loads(cached.read_text())
    assert stored["fitted_on"]["model_version"] == gate.model_version and stored["fitted_on"]["quantile"] == 0.05
    for broken in (
        {**stored, "threshold": 0.99, "fitted_on": {**stored["fitted_on"], "n_images": 1}},
        {**stored, "threshold": 0.99, "model_version": "other@123"},
        "{not json",
    ):
        cached.write_text(broken if isinstance(broken, str) else json.dumps(broken))
        assert build_service(cfg).gate == gate  # refitted (same data, same threshold) and rewritten
        assert json.loads(cached.read_text()) == stored
    assert len(calls) == 4
    assert "fitted with other n_images than now" in caplog.text and "fitted for model other@123" in caplog.text


def test_scores_for_other_checkpoints_are_refused(run: Path, scores_file: Path, tmp_path: Path) -> None:
    serve = [f"ckpt={run}", "unsure.threshold=0", "device=cpu", "gradcam=false"]
    document = read_scores(scores_file)
    # same file names and model names, another checkpoint's content, as evaluate.py wrote it
    other_model = document.models[0].model_copy(update={"sha256": "0" * 64})
    other = write_scores(document.model_copy(update={"models": [other_model]}), tmp_path / "other.json")
    with pytest.raises(ContractError, match="does not score the served checkpoint"):
        build_service(compose_serve([*serve, f"scores={other}"]))
    edited = tmp_path / "edited.json"  # the served checkpoint's file, its sha256 edited by hand to another's
    raw = json.loads(scores_file.read_text())
    edited.write_text(json.dumps({**raw, "models": [{**raw["models"][0], "sha256": "0" * 64}]}))
    with pytest.raises(ContractError, match=r"checkpoint sha256 \(models\[0\]\.sha256\) changed since"):
        build_service(compose_serve([*serve, f"scores={edited}"]))
    with pytest.raises(ContractError, match="tta=none, the server runs tta=flips"):
        build_service(compose_serve([*serve, f"scores={scores_file}", "tta=flips"]))
    unversioned = tmp_path / "unversioned.json"  # written before the contract existed
    unversioned.write_text(json.dumps({"scores": {"someone-else": {}}}))
    with pytest.raises(ContractError, match="schema version None"):
        build_service(compose_serve([*serve, f"scores={unversioned}"]))


@pytest.fixture(scope="module")
def ensemble_scores(scores_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """test_app's scores.json as if evaluate.py had also scored an ensemble of the served checkpoint and another."""
    document = read_scores(scores_file)
    assert document.scores is not None and document.final is not None
    other = document.models[0].model_copy(update={"name": "other", "file": "other.ckpt", "sha256": "1" * 64})
    document.models.append(other)
    document.ensemble = EnsembleRecord(mode="fit", members=[document.final, "other"], weights=[0.25, 0.75])
    row = document.scores[document.final]
    document.scores |= {"other": row.model_copy(deep=True), "ensemble": row.model_copy(deep=True)}
    return write_scores(document, tmp_path_factory.mktemp("ensemble") / "scores.json")


def _final_row(document: dict) -> dict:
    return document["scores"][document["final"]]


@pytest.mark.parametrize(
    ("edit", "named"),
    [
        (lambda d: d["ensemble"].update(weights=[0.5, 0.5]), r"ensemble weights \(ensemble\.weights\) changed"),
        (lambda d: d.update(tta="flips"), r"wrote: tta changed"),  # the server would run flips with none's threshold
        (
            lambda d: _final_row(d)["melanoma"]["val_threshold"].update(threshold=0.99),
            r"melanoma threshold \(scores\.[^.]+\.melanoma\.val_threshold\.threshold\) changed",
        ),
        (lambda d: _final_row(d).update(temperature=1.0), r"temperature \(scores\.[^.]+\.temperature\) changed"),
    ],
    ids=["ensemble-weights", "tta", "melanoma-threshold", "temperature"],
)
def test_an_edited_scores_file_is_refused_naming_the_field(
    run: Path, ensemble_scores: Path, tmp_path: Path, edit: Callable[[dict], object], named: str
) -> None:
    serve = [f"ckpt={run}", "unsure.threshold=0", "device=cpu", "gradcam=false", f"paths.output_dir={tmp_path}"]
    assert build_service(compose_serve([*serve, f"scores={ensemble_scores}"])).scores is not None  # as written
    document = json.loads(ensemble_scores.read_text())
    edit(document)
    edited = tmp_path / "scores.json"
    edited.write_text(json.dumps(document, indent=2))
    with pytest.raises(ContractError, match=rf"(?s){named}.*not a signature.*Run evaluate\.py"):
        build_service(compose_serve([*serve, f"scores={edited}"]))


def test_a_scores_file_written_before_row_digests_is_refused_with_the_fix(
    run: Path, scores_file: Path, tmp_path: Path
) -> None:
    document = json.loads(scores_file.read_text())
    for row in document["scores"].values():
        del row["digest"]
    old = tmp_path / "scores.json"
    old.write_text(json.dumps({**document, "schema_version": 2}))
    assert read_scores(old).schema_version == 2  # still read (reports, tables), not served
    serve = [f"ckpt={run}", "unsure.threshold=0", "device=cpu", "gradcam=false", f"scores={old}"]
    with pytest.raises(ContractError, match=r"schema version 2, written before each row carried a digest.*evaluate"):
        build_service(compose_serve(serve))


# ----------------------------------------------------------------------------- Grad-CAM layer and crop


@pytest.mark.parametrize(
    ("backbone", "size", "layer"),
    [
        ("lesionnet_baseline", (3, 64, 64), "features"),
        ("tf_efficientnet_lite0", (3, 64, 64), "bn2"),  # conv_head + BN + ReLU6
    ],
)
def test_gradcam_layer_is_the_last_feature_map(backbone: str, size: tuple[int, int, int], layer: str) -> None:
    model = timm.create_model(backbone, pretrained=False, num_classes=7).eval()
    name, _ = find_target_layer(model, size)
    assert name == layer


def test_crop_box_follows_the_eval_transform() -> None:
    assert eval_crop_box({"input_size": (3, 224, 224), "crop_pct": 0.875}, 400, 300) == pytest.approx(
        (200 - 224 / (256 / 300) / 2, 300 * (1 - 0.875) / 2, 200 + 224 / (256 / 300) / 2, 300 - 300 * 0.125 / 2),
        abs=1.0,
    )
    assert eval_crop_box({"input_size": (3, 24, 32), "crop_pct": 1.0}, 40, 30) == pytest.approx((0, 0, 40, 30))


# ----------------------------------------------------------------------------- web page


def test_page_manifest_and_service_worker_are_served(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and "not a diagnosis" in page.text.lower()
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for asset in ("/static/app.js", "/static/app.css", "/static/icon-192.png", "/static/icon-512.png"):
        assert client.get(asset).status_code == 200, asset
    manifest = client.get("/manifest.webmanifest")
    assert manifest.headers["content-type"].startswith("application/manifest+json")
    assert {"192x192", "512x512"} <= {i["sizes"] for i in manifest.json()["icons"]}
    sw = client.get("/sw.js")
    assert sw.status_code == 200 and "javascript" in sw.headers["content-type"] and "fetch" in sw.text
    assert "http://" not in page.text and "https://" not in page.text  # no CDN


def test_a_picture_the_image_type_gate_calls_not_dermoscopy_is_refused_with_the_dermatoscope_explanation(
    run: Path,
) -> None:
    """Question 1 is the only refusal by the model: no classes, and words that say what the app can read."""
    from lesionnet.inference.decision.image_type import ImageTypeGate

    service = stub_service(run, onehot("nv", 0.9))  # the stub's stage statistics: one zero: the logit is the bias
    service.image_type = ImageTypeGate(weights=np.zeros(1), bias=-2.0, threshold=0.0, model_version="m", tta="none")
    refused = service.analyse(lesion_like())
    assert refused["status"] == "rejected" and refused["probabilities"] == [] and refused["familiarity"] is None
    assert refused["image_type"] == {"dermoscopy": False, "score": -2.0, "threshold": 0.0, "source": ""}
    assert refused["message"] == content.MESSAGES["not_dermoscopy"] and "dermatoscope" in refused["message"]
    assert "doctor" in refused["message"] and refused["urgency"]["reasons"] == [content.NOT_DERMOSCOPY_REASON]
    service.image_type = ImageTypeGate(weights=np.zeros(1), bias=2.0, threshold=0.0, model_version="m", tta="none")
    answered = service.analyse(lesion_like())
    assert answered["status"] == "ok" and answered["image_type"]["dermoscopy"] is True
    assert answered["top_class"]["code"] == "nv"


def test_the_melanoma_reason_names_the_validation_target_not_a_measured_catch_rate() -> None:
    """Validation held few melanomas (8 in a sample run): the reason gives the target the threshold was set for, and
    never claims it "caught 95% of melanomas in validation"."""
    policy = ReferralPolicy(melanoma_threshold=0.05, target_sensitivity=0.95)
    reason = policy.melanoma_reason("0.36")
    assert "set on validation images to catch 95% of melanomas" in reason and "caught" not in reason
