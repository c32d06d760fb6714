"""What the app tells a person (is the referral rule checked? what was the model trained on? a demo?) and how it
holds up on a phone and a network: HTTPS, stalled connections, security headers, 16-bit PNGs, two file parts."""

from __future__ import annotations

import datetime
import importlib.util
import io
import ipaddress
import json
import os
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import httpx
import numpy as np
import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image

from lesionnet.app import content, server
from lesionnet.app import service as service_module
from lesionnet.app.api import build_api
from lesionnet.app.build import build_app
from lesionnet.app.ondevice import RUNTIME_FILES, VENDOR
from lesionnet.app.schemas import ErrorResponse, HealthResponse, ModelCard, PredictResponse
from lesionnet.app.server import server_options
from lesionnet.app.service import DEMO_MAX_TRAIN_IMAGES, LesionService, demo_reason, member_training
from lesionnet.app.upload import UploadLimits, decode_image
from lesionnet.contract.files import ContractError
from lesionnet.contract.on_device import ON_DEVICE_VERSION, read_on_device_policy
from lesionnet.contract.scores import BootstrapRecord, read_scores, write_scores
from lesionnet.data.metadata import embedded_sample_images
from lesionnet.data.run_folder import RunFolder
from lesionnet.inference import load_member, resolve_checkpoints
from tests.conftest import REPO_ROOT
from tests.test_app import compose_serve, jpeg, lesion_like, scores_file, stub_service  # noqa: F401 (a fixture)

MAKE_CA = REPO_ROOT / "scripts" / "make_local_ca.sh"
TIMEOUT_S = 1.0  # header and body timeouts of the servers started here
MARGIN_S = 3.0  # a loaded 2-core machine may be this late


@pytest.fixture(scope="module")
def run(trained_run: Path) -> Path:
    return trained_run


@pytest.fixture(scope="module")
def full_scores(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """test_app's scores.json plus what evaluate.py also writes: the bootstrap unit and the ECE before scaling."""
    document = read_scores(request.getfixturevalue("scores_file"))
    document.bootstrap = BootstrapRecord(
        unit="lesions", n_units=80, resamples=1000, description="bootstrap over 80 lesions"
    )
    (row,) = (document.scores or {}).values()
    row.ece = 0.12
    return write_scores(document, tmp_path_factory.mktemp("eval") / "scores.json")  # digests as evaluate.py writes them


def serve_cfg(run: Path, tmp: Path, *overrides: str) -> object:
    return compose_serve(
        [
            f"ckpt={run}",
            f"paths.output_dir={tmp}",
            "device=cpu",
            "unsure.threshold=0.0",
            "gradcam=false",
            f"limits.header_timeout_s={TIMEOUT_S}",
            f"limits.body_timeout_s={TIMEOUT_S}",
            *overrides,
        ]
    )


@pytest.fixture(scope="module")
def client(run: Path, full_scores: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    cfg = serve_cfg(run, tmp_path_factory.mktemp("serve"), f"scores={full_scores}")
    with TestClient(build_app(cfg), raise_server_exceptions=False) as c:
        yield c


@contextmanager
def serving(app: object, options: dict) -> Iterator[int]:
    """``app`` behind a real uvicorn with ``server_options`` (less host and port) on a free port of 127.0.0.1."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    config = {k: v for k, v in options.items() if k not in ("host", "port")}
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", **config))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


# ----------------------------------------------------------------------------- 2a: is the referral rule checked?


def test_the_answer_says_the_referral_rule_was_checked_and_on_what(client: TestClient) -> None:
    r = client.post("/api/v1/predict", files={"file": ("l.jpg", jpeg(lesion_like()), "image/jpeg")})
    body = PredictResponse.model_validate(r.json())
    check = body.referral_check
    assert check.validated and (check.n_images, check.melanomas, check.melanoma_sensitivity) == (100, 20, 0.93)
    assert check.message == (
        "The 'see a dermatologist' rule was checked on 100 held-out images: it caught at least 93% of the 20 "
        "melanomas there."
    )
    assert client.get("/api/v1/model").json()["referral_check"] == r.json()["referral_check"]


def test_at_least_never_rounds_up_and_gives_the_count_when_there_is_one() -> None:
    """165 of 174 melanomas is 94.8%: "at least 95%" would claim more than was measured."""
    message = content.referral_checked(1520, 174, 0.9482758620689655, in_sample=False)  # as scores.json keeps it
    assert message.endswith("it caught at least 165 of the 174 melanomas there.")
    assert content.referral_checked(1520, None, 0.9482758620689655, in_sample=False).endswith("at least 94% there.")


def test_without_a_validated_threshold_the_answer_says_not_checked(run: Path) -> None:
    service = stub_service(run, [0.02, 0.02, 0.6, 0.1, 0.02, 0.2, 0.04])
    body = service.analyse(lesion_like())
    assert body["referral_check"]["validated"] is False
    assert body["referral_check"]["message"] == content.REFERRAL_NOT_CHECKED
    assert service.analyse(np.zeros((300, 400, 3), np.uint8))["referral_check"] == body["referral_check"]


def test_a_rule_checked_only_on_its_own_validation_images_says_so(client: TestClient) -> None:
    service: LesionService = client.app.state.service
    assert service.evaluated is not None
    in_sample = replace(service, evaluated=service.evaluated.model_copy(update={"in_sample": True}))
    check = in_sample.referral_check()
    assert check["validated"] and check["in_sample"]
    assert "only checked on the 100 validation images it was tuned on" in check["message"]
    assert "may catch fewer on new images" in check["message"]


# ----------------------------------------------------------------------------- 2b: the model card from the run


def test_model_card_training_data_comes_from_the_checkpoint_and_its_run(client: TestClient, run: Path) -> None:
    card = ModelCard.model_validate(client.get("/api/v1/model").json())
    (member,) = card.training_data.members
    checkpoint = load_member(resolve_checkpoints(str(run))[0])
    splits = checkpoint.provenance.split
    assert member.images == {**RunFolder(run).metrics().split_images, "train": splits.count("train")}
    assert list(member.images) == ["train", "val", "test"]
    assert member.lesions == {
        s: len({lesion for lesion, sp in zip(checkpoint.provenance.lesion_id, splits, strict=True) if sp == s})
        for s in ("train", "val")
    }
    assert member.sources == ["checkpoint provenance", "run metrics.json"]
    assert member.data_root == "ham" and not member.embedded_sample  # the folder's name, not its server path
    assert (member.split.method, member.split.seed) == ("lesion", 42)
    assert member.split.fractions == {"train": 0.6, "val": 0.2, "test": 0.2}
    assert card.training_data.summary == (
        f"Trained on {member.images['train']} images ({member.images['val']} more for validation, "
        f"{member.images['test']} held out for testing) from the data folder 'ham'. Split by lesion (seed 42; 60% "
        "training / 20% validation / 20% test): no lesion has images in more than one of training, validation and "
        "test."
    )
    assert "10,015" in card.training_data.dataset


def test_model_card_test_figures_come_from_scores_json(client: TestClient) -> None:
    card = ModelCard.model_validate(client.get("/api/v1/model").json())
    metrics = card.metrics
    assert (metrics.set, metrics.in_sample, metrics.n_images, metrics.tta) == ("test", False, 100, "none")
    assert metrics.bootstrap.unit == "lesions" and metrics.bootstrap.resamples == 1000
    assert list(metrics.provenance.values()) == ["checked"]
    assert (metrics.temperature, metrics.ece, metrics.ece_after_temperature) == (1.5, 0.12, 0.03)
    for figure in (
        "On the 100 images of the test split of a run: accuracy 71.0% (95% CI 68.0%-74.0%), balanced accuracy",
        "55.0% (95% CI 50.0%-60.0%)",
        "Intervals: bootstrap over 80 lesions.",
        "caught 93% of the melanomas",
        "temperature of 1.50",
        "after it is 3.0%",
        "None of the scored images was used in training or validation",
    ):
        assert figure in card.performance, figure
    assert card.metrics_note is None


def test_the_model_card_gives_the_melanoma_target_and_how_many_were_caught(client: TestClient) -> None:
    """A percentage of 8 melanomas is not a rate to quote alone: the target the threshold was set for, and the count."""
    service: LesionService = client.app.state.service
    assert service.scores is not None and service.scores.melanoma is not None and service.evaluated is not None
    row, threshold = service.scores, service.scores.melanoma.val_threshold
    assert threshold is not None
    eight = row.model_copy(
        update={
            "melanoma": row.melanoma.model_copy(
                update={"val_threshold": threshold.model_copy(update={"sensitivity": 7 / 8})}
            ),
            "per_class": {**row.per_class, "mel": row.per_class["mel"].model_copy(update={"support": 8})},
            "ci95": {**row.ci95, "mel_sensitivity": (0.47, 1.0)},
        }
    )
    performance = content.performance_summary(eight, service.evaluated, ["checked"])
    assert (
        "The melanoma threshold of the referral rule was set on validation images to catch 95% of melanomas; on these "
        "images it caught 7 of the 8 melanomas (88%; 95% CI 47%-100%) and did not flag 60% of the other lesions."
    ) in performance
    # 93% of 20 is no whole number of melanomas (a made-up row): the share only
    assert (
        "to catch 95% of melanomas; on these images it caught 93% of the melanomas and"
        in (service.model_card()["performance"])
    )


def test_an_in_sample_model_card_never_calls_the_scored_images_unseen(client: TestClient) -> None:
    service: LesionService = client.app.state.service
    assert service.evaluated is not None
    held_out = service.model_card()["performance"]
    assert "None of the scored images was used in training or validation (checked by content)." in held_out
    in_sample = replace(service, evaluated=service.evaluated.model_copy(update={"in_sample": True}))
    performance = in_sample.model_card()["performance"]
    assert "used in training or validation" not in performance and "unseen" not in performance
    assert "validation images the model and its thresholds were chosen on (not trained on)" in performance
    assert "None of them was used in training (checked by content), but they are not new to the model" in performance


def test_without_scores_the_model_card_says_not_evaluated(run: Path) -> None:
    card = ModelCard.model_validate(stub_service(run, np.full(7, 1 / 7)).model_card())
    assert card.metrics is None and card.performance == card.metrics_note == content.NOT_EVALUATED


def test_a_copied_checkpoint_without_provenance_has_unknown_training_data(run: Path, tmp_path: Path) -> None:
    checkpoint = load_member(resolve_checkpoints(str(run))[0])
    copied = replace(checkpoint, provenance=None, run=None)
    record = member_training(copied)
    assert (record["images"], record["split"], record["demo_reason"]) == ({}, None, None)
    assert content.training_sentence(record["images"], None, False, None) == content.TRAINING_UNKNOWN


# ----------------------------------------------------------------------------- 2c: the demo model


def test_demo_model_is_flagged_in_health_card_and_answers(client: TestClient) -> None:
    """The test run trained on ~50 synthetic images: a demo by the image count."""
    health = HealthResponse.model_validate(client.get("/healthz").json())
    card = ModelCard.model_validate(client.get("/api/v1/model").json())
    answer = client.post("/api/v1/predict", files={"file": ("l.jpg", jpeg(lesion_like()), "image/jpeg")}).json()
    assert health.demo_model and card.training_data.demo_model and answer["demo_model"]
    train = card.training_data.members[0].images["train"]
    assert card.training_data.members[0].demo_reason == content.demo_few_images(train)
    assert card.training_data.demo_notice.startswith("Demo model - not trained on the full data.")
    assert f"only {train} images" in card.training_data.demo_notice


def test_demo_rule_data_root_or_few_training_images() -> None:
    assert demo_reason(embedded_sample=True, train_images=7000) == content.DEMO_SAMPLE_ROOT
    assert demo_reason(False, DEMO_MAX_TRAIN_IMAGES - 1) == content.demo_few_images(DEMO_MAX_TRAIN_IMAGES - 1)
    assert demo_reason(False, DEMO_MAX_TRAIN_IMAGES) is None  # the full split trains on ~7,000
    assert demo_reason(False, None) is None  # unknown: the card says so instead


def test_a_run_on_the_embedded_sample_is_a_demo_by_its_data_root(
    run: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    member = load_member(resolve_checkpoints(str(run))[0])
    data_root = Path(RunFolder(run).metrics().data_root)
    monkeypatch.setattr(service_module, "embedded_sample_root", lambda: data_root)  # as if trained on the sample
    record = member_training(replace(member, provenance=None))
    assert record["embedded_sample"] and record["demo_reason"] == content.DEMO_SAMPLE_ROOT
    assert content.SAMPLE_FOLDER in content.training_sentence(record["images"], "ham", True, None)


# ----------------------------------------------------------------------------- 5a: HTTPS


@pytest.mark.skipif(shutil.which("openssl") is None or shutil.which("bash") is None, reason="needs openssl and bash")
def test_https_with_a_certificate_from_the_local_ca_script(run: Path, tmp_path: Path) -> None:
    tls = tmp_path / "tls"
    made = subprocess.run(
        ["bash", str(MAKE_CA), "-o", str(tls), "127.0.0.1", "localhost"], capture_output=True, text=True, timeout=60
    )
    assert made.returncode == 0, made.stderr
    assert "Install the CA" in made.stdout and (tls / "ca.key").stat().st_mode & 0o077 == 0
    cfg = serve_cfg(run, tmp_path, f"ssl_certfile={tls / 'server.crt'}", f"ssl_keyfile={tls / 'server.key'}")
    with serving(build_app(cfg), server_options(cfg)) as port:
        trusted = ssl.create_default_context(cafile=str(tls / "ca.crt"))
        for host in ("127.0.0.1", "localhost"):
            r = httpx.get(f"https://{host}:{port}/healthz", verify=trusted, timeout=10)
            assert r.status_code == 200 and r.json()["status"] == "ok"
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            httpx.get(f"https://127.0.0.1:{port}/healthz", verify=ssl.create_default_context(), timeout=10)


def signed_by(tls: Path, san: str) -> bool:
    """Whether a server certificate for ``san`` signed with the local CA's key verifies against that CA."""
    leaf = tls / "leaf"
    leaf.mkdir(exist_ok=True)
    (leaf / "ext").write_text(f"basicConstraints=critical,CA:FALSE\nsubjectAltName={san}\n")
    key, csr, crt, ext = (str(leaf / name) for name in ("key", "csr", "crt", "ext"))
    ca, ca_key = str(tls / "ca.crt"), str(tls / "ca.key")
    new_key = ["openssl", "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    sign = ["openssl", "x509", "-req", "-sha256", "-days", "2", "-CAcreateserial", "-CA", ca, "-CAkey", ca_key]
    for command in (
        [*new_key, "-subj", "/CN=leaf", "-keyout", key, "-out", csr],
        [*sign, "-extfile", ext, "-in", csr, "-out", crt],
    ):
        made = subprocess.run(command, capture_output=True, text=True, timeout=60)
        assert made.returncode == 0, made.stderr
    verify = ["openssl", "verify", "-CAfile", ca, crt]
    checked = subprocess.run(verify, capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0 or "subtree violation" in checked.stdout + checked.stderr, checked
    return checked.returncode == 0


@pytest.mark.skipif(shutil.which("openssl") is None or shutil.which("bash") is None, reason="needs openssl and bash")
def test_a_local_ca_signs_only_the_kinds_of_name_it_was_made_for(tmp_path: Path) -> None:
    """A CA for IP addresses only cannot sign a DNS name (any site's), and one for names only cannot sign an IP: a
    kind of name without a constraint would be unconstrained."""
    for names, good, foreign in (
        (["192.168.1.20"], ["IP:192.168.1.20"], ["DNS:example.com", "IP:8.8.8.8"]),
        (["lesionnet.local"], ["DNS:lesionnet.local"], ["DNS:example.com", "IP:192.168.1.20"]),
    ):
        tls = tmp_path / names[0]
        made = subprocess.run(
            ["bash", str(MAKE_CA), "-o", str(tls), *names], capture_output=True, text=True, timeout=60
        )
        assert made.returncode == 0, made.stderr
        shown = ["openssl", "x509", "-in", str(tls / "ca.crt"), "-noout", "-text"]
        text = subprocess.run(shown, capture_output=True, text=True, timeout=60, check=True).stdout
        assert "X509v3 Name Constraints: critical" in text
        assert ("DNS:invalid" in text) == (names == ["192.168.1.20"]), text  # only the reserved .invalid names
        assert ("Excluded:" in text and "IP:0.0.0.0/0.0.0.0" in text) == (names == ["lesionnet.local"]), text
        assert [san for san in good + foreign if signed_by(tls, san)] == good
    # a CA made before the constraints were complete is not reused
    (tmp_path / "192.168.1.20" / "ca.constraints").unlink()
    again = subprocess.run(
        ["bash", str(MAKE_CA), "-o", str(tmp_path / "192.168.1.20"), "192.168.1.20"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert again.returncode == 1 and "older version of this script" in again.stderr


def test_tls_settings_are_checked_before_serving(run: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="both ssl_certfile= .* and ssl_keyfile="):
        server_options(serve_cfg(run, tmp_path, f"ssl_certfile={tmp_path}/server.crt"))
    with pytest.raises(FileNotFoundError, match="server.crt"):
        server_options(serve_cfg(run, tmp_path, f"ssl_certfile={tmp_path}/server.crt", f"ssl_keyfile={tmp_path}/k"))


# ----------------------------------------------------------------------------- 5b: stalled connections close


def read_until_closed(sock: socket.socket, limit_s: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and how long that took (fails after limit_s)."""
    start, data = time.monotonic(), b""
    sock.settimeout(limit_s)
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except TimeoutError:
        pytest.fail(f"the server still held the connection after {limit_s} s (got {data[:80]!r})")
    except ConnectionResetError:
        pass
    return data, time.monotonic() - start


MULTIPART_HEAD = (
    b'--b\r\nContent-Disposition: form-data; name="file"; filename="x.jpg"\r\nContent-Type: image/jpeg\r\n\r\n'
)
STALLS = {
    "nothing sent": b"",
    "half the headers": b"POST /api/v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-da",
    "half the body": b"POST /api/v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
    b"Content-Length: 5000\r\n\r\n" + MULTIPART_HEAD + b"\xff\xd8\xff",
}


def test_stalled_connections_are_closed_after_the_timeouts(run: Path, tmp_path: Path) -> None:
    cfg = serve_cfg(run, tmp_path)
    with serving(build_app(cfg), server_options(cfg)) as port:
        for stall, sent in STALLS.items():
            with socket.create_connection(("127.0.0.1", port)) as sock:
                sock.sendall(sent)
                answer, seconds = read_until_closed(sock, TIMEOUT_S + MARGIN_S)
            assert TIMEOUT_S * 0.9 <= seconds <= TIMEOUT_S + MARGIN_S, (stall, seconds)
            assert answer.startswith(b"HTTP/1.1 408 ") == (stall != "nothing sent"), (stall, answer[:80])
            if stall == "half the body":  # the app's JSON error, and the connection is not kept
                assert b'"code":"upload_timeout"' in answer and b"connection: close" in answer.lower()
        # A body nobody reads (refused by its Content-Length) and trickled on: closed, not held by each byte
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(b"POST /api/v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: 900000000\r\n\r\nxx")
            start, closed = time.monotonic(), False
            while not closed and time.monotonic() - start < TIMEOUT_S + MARGIN_S:
                time.sleep(0.2)
                try:
                    sock.sendall(b"x")
                except OSError:
                    closed = True
            assert closed, "a trickled body that nobody reads held the connection open"
        # Ordinary requests are untouched: a keep-alive connection answers twice
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            first = http.post("/api/v1/predict", files={"file": ("l.jpg", jpeg(lesion_like()), "image/jpeg")})
            again = http.get("/healthz")
            assert first.status_code == 200 and again.status_code == 200
            assert first.json()["status"] == "ok" and again.headers.get("connection") != "close"


def test_without_a_body_timeout_a_streamed_body_is_still_size_limited(client: TestClient) -> None:
    """limits.body_timeout_s=null turns the timeout off, not the size limit of a body without Content-Length."""
    app = build_api(client.app.state.service, UploadLimits(max_bytes=2**20, body_timeout_s=None))
    chunks = iter([MULTIPART_HEAD, *[b"\0" * 100_000] * 13, b"\r\n--b--\r\n"])  # 1.3 MB, sent chunked
    with TestClient(app) as streamed:
        r = streamed.post(
            "/api/v1/predict", content=chunks, headers={"content-type": "multipart/form-data; boundary=b"}
        )
    assert r.status_code == 413 and r.json()["error"]["code"] == "file_too_large"
    assert r.json()["error"]["message"].startswith("The upload is larger")  # BodyLimit's, not the decoder's


# ----------------------------------------------------------------------------- issue 22, item 5: red-team hardening

DEADLINE_S = 2.0  # limits.body_deadline_s of the servers started here (the header and body timeouts: TIMEOUT_S)
UPLOAD_HEAD = (
    b"POST /api/v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
    b"Content-Length: 5000\r\n\r\n" + MULTIPART_HEAD
)


def hardened(client: TestClient, run: Path, tmp: Path, *overrides: str) -> tuple[FastAPI, dict]:
    """The served model's app and ``server_options`` with the short header, body and whole-body limits used here."""
    limits = UploadLimits(body_timeout_s=TIMEOUT_S, body_deadline_s=DEADLINE_S)
    cfg = serve_cfg(run, tmp, f"limits.body_deadline_s={DEADLINE_S}", *overrides)
    return build_api(client.app.state.service, limits), server_options(cfg)


def self_signed(folder: Path) -> tuple[Path, Path]:
    """A throw-away certificate for 127.0.0.1 and its key (PEM files)."""
    x509 = pytest.importorskip("cryptography.x509", reason="needs the cryptography package")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "LesionNet test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .sign(key, hashes.SHA256())
    )
    certfile, keyfile = folder / "server.crt", folder / "server.key"
    certfile.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    keyfile.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return certfile, keyfile


def closed_within(sock: socket.socket, start: float, limit_s: float) -> tuple[bytes, float]:
    """What the server sends on ``sock`` until it closes the TCP connection, and when that was (seconds after
    ``start``); fails when it is still open ``limit_s`` after ``start``."""
    data = b""
    while True:
        sock.settimeout(max(0.01, start + limit_s - time.monotonic()))
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            pytest.fail(f"the server still held the connection {limit_s} s after it opened (got {data[:80]!r})")
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            return data, time.monotonic() - start
        data += chunk


def json_error(answer: bytes) -> dict:
    """The ``error`` of a raw HTTP answer with the app's JSON error body (checked against its schema)."""
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"content-type: application/json" in head.lower(), head
    return ErrorResponse.model_validate_json(body).error.model_dump()


@pytest.mark.skipif(not hasattr(ssl, "create_default_context"), reason="no ssl module")
def test_a_tls_connection_that_sends_no_client_hello_is_closed_after_the_header_timeout(
    client: TestClient, run: Path, tmp_path: Path
) -> None:
    """asyncio waits 60 s for a ClientHello by default, and 30 s for the client's close_notify after a close: both are
    bounded by the header timeout."""
    certfile, keyfile = self_signed(tmp_path)
    app, options = hardened(client, run, tmp_path, f"ssl_certfile={certfile}", f"ssl_keyfile={keyfile}")
    with serving(app, options) as port:
        start = time.monotonic()
        silent = [socket.create_connection(("127.0.0.1", port)) for _ in range(4)]
        for sock in silent:
            with sock:
                answer, seconds = closed_within(sock, start, TIMEOUT_S + MARGIN_S)
            assert answer == b"" and seconds >= TIMEOUT_S * 0.9, (answer, seconds)
        # A handshake, then nothing: closed at the header timeout, and the socket freed without the client's reply
        insecure = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        insecure.check_hostname, insecure.verify_mode = False, ssl.CERT_NONE
        start = time.monotonic()
        with insecure.wrap_socket(socket.create_connection(("127.0.0.1", port)), server_hostname="127.0.0.1") as tls:
            raw = socket.socket(fileno=os.dup(tls.fileno()))  # the TCP stream under TLS: ends when the server closes
            with raw:
                _, seconds = closed_within(raw, start, 2 * TIMEOUT_S + MARGIN_S)
        assert seconds >= TIMEOUT_S * 0.9, seconds
        # an ordinary HTTPS request is untouched
        r = httpx.get(f"https://127.0.0.1:{port}/healthz", verify=insecure, timeout=10)
        assert r.status_code == 200 and r.json()["status"] == "ok"


def stalling(port: int, sent: bytes, drip: bytes = b"", every: float = 0.0, **more: object) -> dict:
    """A client that sends ``sent`` at once, then ``drip`` a byte every ``every`` seconds (driven by :func:`turn`)."""
    sock = socket.create_connection(("127.0.0.1", port))
    start = time.monotonic()
    sock.sendall(sent)
    sock.setblocking(False)
    state = {"sock": sock, "start": start, "drip": drip, "every": every, "next": start + every, "answer": b""}
    return {**state, "closed": None, **more}


def turn(client: dict) -> None:
    """One turn of a stalling client: read what the server sent (or its close), then drip the next byte if due."""
    now = time.monotonic()
    try:
        chunk = client["sock"].recv(65536)
    except BlockingIOError:
        chunk = None
    except OSError:  # reset by the server
        chunk = b""
    if chunk == b"":
        client["closed"] = now - client["start"]
        return
    client["answer"] += chunk or b""
    if client["drip"] and now >= client["next"]:
        try:
            client["sock"].send(client["drip"][:1])
        except OSError:  # closed by the server: its answer is read on the next turn
            client["drip"] = b""
        else:
            client["drip"], client["next"] = client["drip"][1:], now + client["every"]


def drive(clients: list[dict], limit_s: float) -> None:
    """Turn every client until the server closed them all, or ``limit_s`` after the first opened."""
    try:
        while any(c["closed"] is None for c in clients) and time.monotonic() - clients[0]["start"] < limit_s:
            time.sleep(0.05)
            for client in (c for c in clients if c["closed"] is None):
                turn(client)
    finally:
        for client in clients:
            client["sock"].close()


def test_a_body_trickled_byte_by_byte_is_answered_408_at_the_body_deadline(
    client: TestClient, run: Path, tmp_path: Path
) -> None:
    """One byte every 0.3 s never trips the 1 s stall timeout; the whole body's deadline ends it, in the JSON shape."""
    app, options = hardened(client, run, tmp_path)
    with serving(app, options) as port:
        trickled = stalling(port, UPLOAD_HEAD, b"\0" * 1000, 0.3)
        drive([trickled], DEADLINE_S + MARGIN_S)
    answer, seconds = trickled["answer"], trickled["closed"]
    assert seconds is not None, f"a trickled body held the connection {DEADLINE_S + MARGIN_S} s"
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
    assert b"connection: close" in answer.lower()
    error = json_error(answer)
    assert (error["status"], error["code"]) == (408, "upload_too_slow")
    assert f"within {DEADLINE_S:g} seconds" in error["message"]
    assert DEADLINE_S * 0.9 <= seconds <= DEADLINE_S + MARGIN_S, seconds


# (name, bytes sent at once, bytes dripped one at a time, seconds between drips, deadline after the connection opens)
STALLED = [
    ("nothing sent", b"", b"", 0.0, TIMEOUT_S),
    ("half the headers", STALLS["half the headers"], b"", 0.0, TIMEOUT_S),
    ("headers dripped", b"P", b"OST /api/v1/predict HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 200, 0.1, TIMEOUT_S),
    ("half the body", UPLOAD_HEAD + b"\xff\xd8\xff", b"", 0.0, TIMEOUT_S),
    ("body trickled", UPLOAD_HEAD, b"\0" * 1000, 0.3, DEADLINE_S),
]


def test_many_stalled_connections_are_each_closed_at_their_own_deadline(
    client: TestClient, run: Path, tmp_path: Path
) -> None:
    """Several connections of each kind of stall at once: each is closed within its deadline (counted from the
    connection's opening, not extended by the bytes it drips) plus a margin, with a 408 where a request began."""
    app, options = hardened(client, run, tmp_path)
    limit = max(deadline for *_, deadline in STALLED) + MARGIN_S
    with serving(app, options) as port:
        clients = [
            stalling(port, sent, drip, every, name=name, deadline=deadline)
            for name, sent, drip, every, deadline in STALLED * 3
        ]
        drive(clients, limit)
    for c in clients:
        assert c["closed"] is not None, f"{c['name']}: still open {limit} s after it opened"
        assert c["deadline"] * 0.9 <= c["closed"] <= c["deadline"] + MARGIN_S, (c["name"], c["closed"])
        assert c["answer"].startswith(b"HTTP/1.1 408 ") == (c["name"] != "nothing sent"), (c["name"], c["answer"])


def test_the_connection_closes_at_the_body_deadline_even_when_the_app_never_answers(run: Path, tmp_path: Path) -> None:
    """The protocol's own deadline, a moment after the app's: an app that reads but never answers cannot hold a
    trickled body's connection either."""

    async def silent(scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            return await send({"type": "lifespan.shutdown.complete"})
        while (await receive())["type"] != "http.disconnect":
            pass

    options = server_options(serve_cfg(run, tmp_path, f"limits.body_deadline_s={DEADLINE_S}"))
    limit = DEADLINE_S + server.BACKSTOP_S + MARGIN_S
    with serving(silent, options) as port:
        trickled = stalling(port, UPLOAD_HEAD, b"\0" * 1000, 0.3)
        drive([trickled], limit)
    closed = trickled["closed"]
    assert closed is not None, "a trickled body held the connection although the app never answered"
    assert DEADLINE_S <= closed <= limit and trickled["answer"] == b"", trickled


def test_errors_the_server_answers_itself_have_the_apps_json_shape(
    client: TestClient, run: Path, tmp_path: Path
) -> None:
    """h11's 400 for a malformed request and the header timeout's 408 come from uvicorn, not the app: same body."""
    app, options = hardened(client, run, tmp_path)
    with serving(app, options) as port:
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(b"POST /api/v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n")
            answer, _ = closed_within(sock, time.monotonic(), MARGIN_S)
        assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
        assert json_error(answer) == {"status": 400, "code": "bad_request", "message": server.BAD_REQUEST_TEXT}
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(STALLS["half the headers"])
            answer, _ = closed_within(sock, time.monotonic(), TIMEOUT_S + MARGIN_S)
        assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
        assert json_error(answer) == {"status": 408, "code": "header_timeout", "message": server.HEADER_TIMEOUT_TEXT}
        assert b"x-content-type-options: nosniff" in answer.lower()


def test_healthz_is_never_cached(client: TestClient) -> None:
    assert client.get("/healthz").headers["cache-control"] == "no-store"


# ----------------------------------------------------------------------------- 5c: security headers


def test_security_headers_on_the_page_the_api_and_the_docs(client: TestClient) -> None:
    for path in ("/", "/api/v1/model", "/docs", "/static/app.js", "/nope"):
        headers = client.get(path).headers
        assert headers["referrer-policy"] == "no-referrer", path
        policy = dict(item.split("=", 1) for item in headers["permissions-policy"].split(", "))
        assert policy.pop("camera") == "(self)", path
        assert {"microphone", "geolocation", "payment", "usb"} <= set(policy)
        assert set(policy.values()) == {"()"}, path  # everything else is off
    csp = {
        d.split(" ", 1)[0]: d.split(" ", 1)[1] for d in client.get("/").headers["content-security-policy"].split("; ")
    }
    assert (csp["base-uri"], csp["form-action"], csp["object-src"]) == ("'none'", "'none'", "'none'")
    assert csp["frame-ancestors"] == "'none'"
    # the on-device mode compiles onnxruntime-web's WebAssembly: 'wasm-unsafe-eval' in script-src, nothing else unsafe
    assert csp["script-src"] == "'self' 'wasm-unsafe-eval'"
    assert "unsafe" not in " ".join(v for k, v in csp.items() if k != "script-src")
    page = (REPO_ROOT / "lesionnet" / "app" / "static" / "index.html").read_text()
    assert "action=" not in page and "method=" not in page  # the page posts with fetch(): form-action 'none' holds


def test_the_on_device_policy_is_the_servers_own_rule_in_its_schema(client: TestClient) -> None:
    """/on-device/policy.json, read by its reader: the thresholds, temperature and classes the server answers with."""
    response = client.get("/on-device/policy.json")
    policy = read_on_device_policy(response.text, "/on-device/policy.json")
    service = client.app.state.service
    assert policy.schema_version == ON_DEVICE_VERSION and policy.model_version == service.predictor.version
    assert policy.limits.min_side > 0 and policy.limits.max_pixels > 0
    runtime = all((VENDOR / name).is_file() for name in RUNTIME_FILES.values()) and importlib.util.find_spec("onnx")
    assert policy.available == bool(runtime)
    if not policy.available:  # the runtime files are not installed: only the reason is served
        assert policy.reason and policy.confidence is None
        return
    assert policy.confidence is not None and policy.referral is not None and policy.classes is not None
    assert (policy.confidence.method, policy.confidence.threshold) == (service.gate.method, service.gate.threshold)
    assert policy.referral.temperature == service.referral.temperature
    assert policy.referral.melanoma_threshold == service.referral.melanoma_threshold
    assert [c.code for c in policy.classes] == service.predictor.class_names
    assert policy.preprocessing is not None and policy.preprocessing.class_names == service.predictor.class_names


@pytest.mark.parametrize(
    "change, message",
    [
        (
            {"schema_version": 1},
            rf"/p.json is an on-device policy of schema version 1; this LesionNet reads version {ON_DEVICE_VERSION}",
        ),
        ({"available": True, "reason": None}, r"(?s)/p.json is not a valid on-device policy.*needs \['model_url'"),
        ({"limits": {"min_side": "small", "max_pixels": 1}}, r"(?s)not a valid on-device policy.*min_side"),
    ],
)
def test_an_on_device_policy_of_another_version_or_a_bad_value_is_refused(change: dict, message: str) -> None:
    served = {
        "schema_version": ON_DEVICE_VERSION,
        "available": False,
        "reason": "Analysing on this device is not available: it is switched off.",
        "model_version": "m@1",
        "demo_model": False,
        "disclaimer": "Not a diagnosis.",
        "limits": {"min_side": 64, "max_pixels": 10_000_000},
    }
    assert read_on_device_policy(json.dumps(served), "/p.json").reason == served["reason"]
    with pytest.raises(ContractError, match=message + r".*Restart the server"):
        read_on_device_policy({**served, **change}, "/p.json")


# ----------------------------------------------------------------------------- 5d, 5e: 16-bit PNGs, two files


def test_a_16_bit_greyscale_png_is_decoded_to_its_grey_level_not_to_white(client: TestClient) -> None:
    grey = np.asarray(Image.fromarray(lesion_like(3)).convert("L"))  # mid-grey skin, a darker blob
    buf = io.BytesIO()
    Image.fromarray(grey.astype(np.uint16) * 257).save(buf, format="PNG")
    png = buf.getvalue()
    assert Image.open(io.BytesIO(png)).mode == "I;16"
    decoded = decode_image(png, UploadLimits())
    assert np.array_equal(decoded, np.repeat(grey[..., None], 3, axis=2))
    body = client.post("/api/v1/predict", files={"file": ("grey16.png", png, "image/png")}).json()
    assert body["status"] != "rejected" and body["image_check"]["passed"], body["image_check"]
    assert body["image_check"]["stats"]["brightness"] == pytest.approx(grey.mean(), abs=1)


def test_more_than_one_file_part_is_refused(client: TestClient) -> None:
    photo = jpeg(lesion_like())
    r = client.post(
        "/api/v1/predict", files=[("file", ("a.jpg", photo, "image/jpeg")), ("file", ("b.jpg", photo, "image/jpeg"))]
    )
    assert r.status_code == 422 and r.json()["error"]["code"] == "too_many_files"
    assert "one photo per request" in r.json()["error"]["message"]
    assert client.post("/api/v1/predict", files={"file": ("a.jpg", photo, "image/jpeg")}).status_code == 200


# ----------------------------------------------------------------------------- the page


@pytest.mark.browser
def test_the_page_shows_the_demo_banner_and_whether_the_rule_was_checked(
    client: TestClient, full_scores: Path, run: Path, tmp_path: Path
) -> None:
    chromium = Path("/usr/bin/chromium")
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed")
    if not chromium.is_file():
        pytest.skip("no Chromium at /usr/bin/chromium (scripts/install_browser.sh)")
    cfg = serve_cfg(run, tmp_path, f"scores={full_scores}")
    sample = embedded_sample_images() / "ISIC_0024372.jpg"
    with serving(build_app(cfg), server_options(cfg)) as port, sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(chromium), args=["--headless", "--no-sandbox"])
        page = browser.new_page(viewport={"width": 390, "height": 844})
        errors: list[str] = []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.goto(f"http://127.0.0.1:{port}/")
        card = client.get("/api/v1/model").json()
        banner = page.locator("#demo-banner")
        sync_api.expect(banner).to_be_visible()
        sync_api.expect(banner).to_have_text(card["training_data"]["demo_notice"])
        sync_api.expect(page.locator("#card")).to_contain_text(card["training_data"]["summary"])
        sync_api.expect(page.locator("#card")).to_contain_text(card["performance"])
        page.locator("#file").set_input_files(str(sample))
        with page.expect_response("**/api/v1/predict") as response:
            page.locator("#submit").click()
        check = page.locator("#referral-check")
        sync_api.expect(check).to_be_visible()
        sync_api.expect(check).to_have_text(response.value.json()["referral_check"]["message"])
        browser.close()
    assert not errors, f"browser errors: {errors}"
