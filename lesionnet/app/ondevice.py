"""The on-device mode: the page runs the served model in the browser (onnxruntime-web), so the photo never leaves it.

The server hands the page two things, both made from the very objects it answers with:

* ``/on-device/model-<key>.onnx``: the served checkpoint exported by ``lesionnet.export`` with the fitted OOD gate in
  the graph (outputs: probabilities, the energy score, the top class's CAM grid, the familiarity (OOD) score and the
  image-type score), exported at the first
  request and cached on disk under a key of the model version and the gate's arrays, so a refitted gate or another
  checkpoint gets a new file name (the service worker keeps model files by name);
* ``/on-device/policy.json`` (:meth:`OnDevice.policy`, its schema ``lesionnet.contract.on_device.OnDevicePolicy``):
  the preprocessing, the image check's parameters, thresholds and
  rules (``image_check.check_spec``), the confidence gate, the OOD threshold and validation scores, the referral rule
  with its reasons, the temperature, the class names and the messages: the page compares and fills in, it types no
  number or sentence of its own.

It is offered for one model without test-time augmentation (the graph runs one view), a bilinear or bicubic
preprocessing (what ``static/ondevice.js`` resizes like OpenCV) and a Mahalanobis OOD gate (kNN does not fit in a
graph); and only when the runtime files are installed (``scripts/setup.sh`` copies them from the pinned npm package
into ``static/vendor/ort``). Otherwise the policy says why, and the page hides the option and shows that reason.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import tempfile
import threading
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from lesionnet.app import content
from lesionnet.app.service import LesionService
from lesionnet.app.upload import UploadLimits
from lesionnet.classes import MALIGNANT
from lesionnet.contract.on_device import ON_DEVICE_VERSION, OnDevicePolicy
from lesionnet.inference.decision.image_check import check_spec

log = logging.getLogger(__name__)
VENDOR = Path(__file__).parent / "static" / "vendor" / "ort"
VENDOR_URL = "/static/vendor/ort"
# onnxruntime-web's WebAssembly build as one ES module (its Emscripten glue included) and its .wasm binary
RUNTIME_FILES: dict[str, str] = {"module": "ort.wasm.bundle.min.mjs", "wasm": "ort-wasm-simd-threaded.wasm"}
INTERPOLATIONS: tuple[str, ...] = ("bilinear", "bicubic")  # the resizes static/ondevice.js implements (as OpenCV)
OOD_METHODS: tuple[str, ...] = ("mahalanobis", "mahalanobis_class")


@dataclass
class OnDevice:
    """What the page needs to answer on the phone; ``cache_dir`` keeps exported models (None: a temporary folder)."""

    service: LesionService
    cache_dir: Path | None = None
    enabled: bool = True
    vendor: Path = VENDOR
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @cached_property
    def unavailable(self) -> str | None:
        """Why the on-device mode cannot be offered for this server, in words for the page; None when it can."""
        predictor, ood = self.service.predictor, self.service.ood
        interpolation = predictor.members[0].data_config.get("interpolation", "bilinear")
        missing = [name for name in RUNTIME_FILES.values() if not (self.vendor / name).is_file()]
        reasons = [
            (not self.enabled, "it is switched off on this server (on_device.enabled=false)"),
            (len(predictor.members) > 1, "this server runs an ensemble of models"),
            (predictor.tta != "none", f"this server averages test-time views (tta={predictor.tta})"),
            (predictor.logit_adjustment is not None, "this server applies a post-hoc logit adjustment"),
            (interpolation not in INTERPOLATIONS, f"the model's {interpolation} resizing is not implemented"),
            (ood is not None and ood.method not in OOD_METHODS, f"the {ood and ood.method} OOD gate has no graph"),
            (importlib.util.find_spec("onnx") is None, "the ONNX exporter is not installed (pip install -e .[app])"),
            (bool(missing), "the in-browser runtime is not installed on this server (scripts/setup.sh copies it)"),
        ]
        found = [text for failed, text in reasons if failed]
        return f"Analysing on this device is not available: {found[0]}." if found else None

    @cached_property
    def key(self) -> str:
        """Identity of the exported file: the model version, the OOD gate's arrays and threshold, this format."""
        digest = hashlib.sha256(f"{self.service.predictor.version}|{ON_DEVICE_VERSION}".encode())
        ood = self.service.ood
        if ood is not None and ood.detector.means is not None:
            digest.update(np.ascontiguousarray(ood.detector.means, dtype="<f4").tobytes())
            digest.update(np.ascontiguousarray(ood.detector.precision, dtype="<f4").tobytes())
            digest.update(repr(ood.threshold).encode())
        image_type = self.service.image_type
        if image_type is not None:  # the threshold is the page's; the weights are in the graph
            digest.update(np.ascontiguousarray(image_type.weights, dtype="<f4").tobytes())
            digest.update(repr(image_type.bias).encode())
        return digest.hexdigest()[:16]

    @property
    def model_name(self) -> str:
        return f"model-{self.key}.onnx"

    @cached_property
    def folder(self) -> Path:
        folder = Path(self.cache_dir) if self.cache_dir else Path(tempfile.mkdtemp(prefix="lesionnet-on-device-"))
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def model_file(self) -> Path:
        """The exported model, exported (and its parity checked) at the first call; later calls and starts reuse it."""
        from lesionnet.export import export

        path = self.folder / self.model_name
        with self._lock:
            if not path.is_file():
                with tempfile.TemporaryDirectory(dir=self.folder) as tmp:
                    member = self.service.predictor.members[0]
                    sidecar = export(
                        member,
                        "onnx",
                        Path(tmp) / "model.onnx",
                        ood=self.service.ood,
                        image_type=self.service.image_type,
                    )
                    (Path(tmp) / "model.json").replace(path.with_suffix(".json"))
                    os.replace(Path(tmp) / "model.onnx", path)  # atomic: another server never reads half a file
                log.info("On-device model exported to %s (parity: %s)", path, sidecar["parity"])
        return path

    def policy(self, limits: UploadLimits) -> OnDevicePolicy:
        """Everything the page applies on the device, from the server's own objects (``/on-device/policy.json``;
        ``limits``: the upload limits the page checks a photo against, as the server does)."""
        s = self.service
        base = {
            "available": self.unavailable is None,
            "reason": self.unavailable,
            "model_version": s.predictor.version,
            "demo_model": s.demo_model,
            "disclaimer": content.DISCLAIMER,
            "limits": {"min_side": limits.min_side, "max_pixels": limits.max_pixels},
        }
        if self.unavailable is not None:
            return OnDevicePolicy.model_validate(base)
        from lesionnet.export import preprocessing_metadata

        member, referral, ood = s.predictor.members[0], s.referral, s.ood
        return OnDevicePolicy.model_validate(
            {
                **base,
                "model_url": f"/on-device/{self.model_name}",
                "runtime": {kind: f"{VENDOR_URL}/{name}" for kind, name in RUNTIME_FILES.items()},
                "preprocessing": preprocessing_metadata(member),
                # the graph's CAM grid exists for average-pool + linear heads; other heads need Grad-CAM (a backward
                # pass)
                "heatmap": s.use_cam,
                "classes": s.class_info(),
                "image_check": check_spec(s.check),
                "confidence": {"method": s.gate.method, "threshold": s.gate.threshold, "source": s.gate.source},
                "image_type": None
                if s.image_type is None
                else {"threshold": s.image_type.threshold, "source": s.image_type.source},
                "familiarity": None
                if ood is None
                else {
                    "method": ood.method,
                    "threshold": ood.threshold,
                    "source": ood.source,
                    "validation_scores": sorted(float(v) for v in ood.validation_scores),  # for the percentile
                },
                "referral": {
                    "malignant_threshold": referral.malignant_threshold,
                    "melanoma_threshold": referral.melanoma_threshold,
                    "target_sensitivity": referral.target_sensitivity,
                    "temperature": referral.temperature,
                    "display_scale": list(referral.display_scale) if referral.display_scale is not None else None,
                    "display_bias": list(referral.display_bias) if referral.display_bias is not None else None,
                    "source": referral.source,
                    "malignant_classes": sorted(MALIGNANT),
                    "reasons": {  # the server's sentences, with "{p}" where the probability goes (2 decimals)
                        "melanoma": referral.melanoma_reason("{p}")
                        if referral.melanoma_threshold is not None
                        else None,
                        "malignant": referral.malignant_reason("{p}"),
                    },
                },
                "referral_check": s.referral_check(),
                "messages": {
                    **content.MESSAGES,
                    "not_dermoscopy_reason": content.NOT_DERMOSCOPY_REASON,
                    "unfamiliar_reason": content.unfamiliar_reason(ood.quantile if ood is not None else 0.95),
                    "unsure_reason": content.unsure_reason("{score}", s.gate.threshold, s.gate.source),
                    "most_likely": content.MOST_LIKELY,
                    "decided": content.DECIDED,
                },
            }
        )
