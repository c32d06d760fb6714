"""Export a checkpoint for serving without PyTorch/Lightning: ONNX (or TorchScript) plus its preprocessing.

``lesionnet export ckpt=... [format=onnx|torchscript] [out=...] [ood_gate=...]`` (lesionnet/conf/export.yaml). The
file carries the preprocessing (input size, mean/std, interpolation, crop_pct, class names) in its metadata (ONNX
metadata_props / TorchScript extra files) and in a JSON sidecar, so a runtime can reproduce ``build_eval_transform``.

The TorchScript file outputs logits. The ONNX graph (:class:`OnDeviceGraph`, what the page's on-device mode runs in
the browser) outputs, from one forward pass, ``logits``, ``probs`` (softmax), ``neg_energy`` (logsumexp of the
logits, the energy gate's score), ``cam_grid`` (the top class's activation map, ReLU'd and scaled to [0, 1] as the
app's heatmap; only for global-average-pool + linear heads) and, given the app's fitted OOD gate, ``ood_score``
(computed by ``lesionnet.inference.decision.ood.mahalanobis_scores`` from the gate's stored means and precision;
question 2 of the app, "is this lesion familiar?") and, given the image-type gate, ``image_type_score``
(``lesionnet.inference.decision.image_type.image_type_logits``; question 1, "is this a dermatoscope image?"), so a
runtime only compares them with thresholds. At export every output is compared with PyTorch's on real images; a
mismatch above ``atol`` stops with an error instead of writing a model that silently disagrees.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from lesionnet.contract.on_device import ExportSidecar, write_export_sidecar
from lesionnet.data.metadata import embedded_sample_images
from lesionnet.data.transforms import to_hw
from lesionnet.inference import Member, Predictor, forward, read_rgb
from lesionnet.inference.decision.image_type import ImageTypeGate, image_type_logits
from lesionnet.inference.decision.ood import OodDetector, OodGate, mahalanobis_scores
from lesionnet.inference.predictor import class_activation_maps, has_linear_gap_head

log = logging.getLogger(__name__)
FORMATS: dict[str, str] = {"onnx": ".onnx", "torchscript": ".pt"}


class ExportError(RuntimeError):
    """The export cannot be trusted (parity failed) or cannot be made; the message says which."""


OUTPUTS: dict[str, str] = {
    "logits": "(N, K) class scores",
    "probs": "(N, K) softmax of the logits",
    "neg_energy": "(N,) logsumexp of the logits (the energy confidence score; higher = more familiar)",
    "cam_grid": "(N, h, w) class activation map of the top class, ReLU, scaled to [0, 1] (GAP + linear heads)",
    "ood_score": "(N,) the familiarity (OOD) score of the pooled features (higher = less like a validation lesion)",
    "image_type_score": "(N,) the image-type gate's logit of the stage statistics (higher = more like dermoscopy)",
}


class OnDeviceGraph(torch.nn.Module):
    """One member's forward pass and everything the app derives from it, as one exportable module."""

    ood_means: torch.Tensor  # buffers, registered in __init__ when a detector is given
    ood_precision: torch.Tensor
    image_type_weights: torch.Tensor  # buffers, registered when an image-type gate is given
    image_type_bias: torch.Tensor

    def __init__(
        self, member: Member, detector: OodDetector | None = None, image_type: ImageTypeGate | None = None
    ) -> None:
        super().__init__()
        self.member = member
        self.network = member.model  # registered, so its parameters are the graph's
        self.cam = has_linear_gap_head(member)
        self.ood = detector is not None
        if detector is not None:
            if detector.method not in ("mahalanobis", "mahalanobis_class"):
                raise ExportError(
                    f"The OOD method '{detector.method}' cannot go into the graph (kNN needs every reference "
                    "feature); fit the gate with ood.method=mahalanobis_class."
                )
            means, precision = cast(np.ndarray, detector.means), cast(np.ndarray, detector.precision)  # Mahalanobis
            self.register_buffer("ood_means", torch.from_numpy(means.astype(np.float32)))
            self.register_buffer("ood_precision", torch.from_numpy(precision.astype(np.float32)))
        self.image_type = image_type is not None
        if image_type is not None:
            if not hasattr(member.model.model, "forward_intermediates"):
                raise ExportError(f"{member.name} has no stages to give the image-type gate its statistics.")
            self.register_buffer("image_type_weights", torch.from_numpy(image_type.weights.astype(np.float32)))
            self.register_buffer("image_type_bias", torch.tensor(image_type.bias, dtype=torch.float32))

    @property
    def output_names(self) -> list[str]:
        present = {"cam_grid": self.cam, "ood_score": self.ood, "image_type_score": self.image_type}
        return [n for n in OUTPUTS if present.get(n, True)]

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = forward(self.member, image)
        logits = out.logits.float()
        probs = logits.softmax(dim=-1)
        outputs = [logits, probs, torch.logsumexp(logits, dim=-1)]
        if self.cam:
            maps = class_activation_maps(self.member, out.feature_map)
            top = probs.argmax(dim=1)
            index = top[:, None, None, None].expand(-1, 1, maps.shape[2], maps.shape[3])
            positive = maps.gather(1, index).squeeze(1).clamp_min(0.0)
            outputs.append(positive / positive.amax(dim=(1, 2), keepdim=True).clamp_min(1e-30))
        if self.ood:
            outputs.append(mahalanobis_scores(out.features.float(), self.ood_means, self.ood_precision))
        if self.image_type:
            stage_stats = cast(torch.Tensor, out.stage_stats)  # checked in __init__
            outputs.append(image_type_logits(stage_stats, self.image_type_weights, self.image_type_bias))
        return tuple(outputs)


def preprocessing_metadata(member: Member) -> dict[str, Any]:
    """Everything a non-Python runtime needs to feed the exported graph and read its output."""
    cfg = member.data_config
    h, w = to_hw(cfg["input_size"])
    return {
        "lesionnet_format": 1,
        "model_name": member.name,
        "backbone": member.model.hparams.backbone,
        "class_names": member.class_names,
        "input_name": "image",
        "output_name": "logits",
        "layout": "NCHW",
        "input_size": [3, h, w],
        "mean": list(cfg["mean"]),
        "std": list(cfg["std"]),
        "interpolation": cfg.get("interpolation", "bilinear"),
        "crop_pct": float(cfg.get("crop_pct", 1.0)),
        "resize": "shorter side to floor(size / crop_pct) then centre crop (square inputs); both sides to "
        "floor(size / crop_pct) then centre crop (non-square)",
        "pixel_scale": "RGB uint8 / 255, then (x - mean) / std",
        "colour_constancy": cfg.get("colour_constancy"),  # applied inside the graph: feed it as above
        "output": "logits; apply softmax",
    }


def sample_batch(member: Member, paths: Sequence[str | Path] | None = None, n: int = 4) -> torch.Tensor:
    """Preprocessed real images for the parity check (the embedded HAM10000 sample by default)."""
    paths = list(paths) if paths else sorted(embedded_sample_images().glob("*.jpg"))[:n]
    return Predictor([member]).preprocess(0, [read_rgb(p) for p in paths]).cpu()


def _network(member: Member) -> torch.nn.Module:
    # logits from a normalised NCHW batch: the colour constancy layer (identity if none) and the timm backbone
    return torch.nn.Sequential(member.model.colour_constancy, member.model.model).eval().cpu()


def export_onnx(
    member: Member, out: Path, opset: int = 18, ood: OodGate | None = None, image_type: ImageTypeGate | None = None
) -> Path:
    import onnx

    h, w = to_hw(member.data_config["input_size"])
    graph = OnDeviceGraph(member, ood.detector if ood is not None else None, image_type).eval().cpu()
    # torch.export-based exporter (PyTorch's default since 2.9, needs onnxscript); the batch size stays dynamic (an
    # example batch of 1 would be specialised: torch.export treats sizes 0 and 1 as constants).
    torch.onnx.export(
        graph,
        (torch.zeros(2, 3, h, w),),
        str(out),
        input_names=["image"],
        output_names=graph.output_names,
        dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},),
        opset_version=opset,
        dynamo=True,
        verbose=False,
        external_data=False,
    )
    model = onnx.load(str(out))
    meta = {**preprocessing_metadata(member), "outputs": {n: OUTPUTS[n] for n in graph.output_names}}
    if ood is not None:
        meta["ood_gate"] = {"method": ood.method, "model_version": ood.model_version, "source": ood.source}
    if image_type is not None:
        meta["image_type_gate"] = {"model_version": image_type.model_version, "source": image_type.source}
    for key, value in meta.items():
        model.metadata_props.add(key=key, value=json.dumps(value))
    model.doc_string = f"LesionNet {member.name}: dermatoscopic lesion classifier. Not a diagnosis."
    onnx.checker.check_model(model)
    onnx.save(model, str(out))
    return out


def export_torchscript(member: Member, out: Path) -> Path:
    h, w = to_hw(member.data_config["input_size"])
    with torch.no_grad():
        traced = torch.jit.trace(_network(member), torch.zeros(1, 3, h, w))
    torch.jit.save(traced, str(out), _extra_files={"lesionnet.json": json.dumps(preprocessing_metadata(member))})
    return out


def run_exported(path: Path, images: torch.Tensor) -> dict[str, np.ndarray]:
    """The outputs of the exported file (onnxruntime: all of them; TorchScript: logits) for a preprocessed batch."""
    if path.suffix == ".onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        return dict(zip(names, session.run(names, {"image": images.numpy().astype(np.float32)}), strict=True))
    with torch.no_grad():
        return {"logits": torch.jit.load(str(path)).eval()(images).numpy()}


def reference_outputs(
    member: Member, images: torch.Tensor, ood: OodGate | None = None, image_type: ImageTypeGate | None = None
) -> dict[str, np.ndarray]:
    """What the app computes for a preprocessed batch, by its own code: the inference core's forward pass and class
    activation maps, the heatmap's scaling (``unit_grid``) and the OOD gate's score (float64)."""
    from lesionnet.inference.explain import unit_grid  # Grad-CAM's module: the app extra, as onnx

    with torch.inference_mode():
        out = forward(member, images.to(next(member.model.parameters()).device))
        logits = out.logits.double().cpu()
        result = {
            "logits": logits.numpy(),
            "probs": logits.softmax(dim=-1).numpy(),
            "neg_energy": torch.logsumexp(logits, dim=-1).numpy(),
        }
        if has_linear_gap_head(member):
            maps = class_activation_maps(member, out.feature_map).double().cpu().numpy()
            top = result["probs"].argmax(axis=1)
            result["cam_grid"] = np.asarray([unit_grid(maps[n, k]) for n, k in enumerate(top)])
        if ood is not None:
            result["ood_score"] = ood.score(out.features.double().cpu().numpy())
        if image_type is not None:
            result["image_type_score"] = image_type.score(cast(torch.Tensor, out.stage_stats).double().cpu().numpy())
    return result


def parity(
    member: Member,
    path: Path,
    images: torch.Tensor,
    atol: float = 1e-4,
    ood: OodGate | None = None,
    image_type: ImageTypeGate | None = None,
) -> dict[str, float]:
    """Largest differences between the app's own computation and the exported file, per output; raises above atol
    (the heatmap grid, which the app rounds to 3 decimals, within 1e-3; the OOD score relative to its size)."""
    expected, got = reference_outputs(member, images, ood, image_type), run_exported(path, images)
    diff: dict[str, float] = {
        "max_abs_logit_diff": float(np.abs(got["logits"] - expected["logits"]).max()),
        "max_abs_prob_diff": float(np.abs(_softmax(got["logits"]) - expected["probs"]).max()),
    }
    limits = {"max_abs_logit_diff": atol, "max_abs_prob_diff": atol}
    if "probs" in got:
        diff["max_abs_prob_output_diff"] = float(np.abs(got["probs"] - expected["probs"]).max())
        diff["max_abs_neg_energy_diff"] = float(np.abs(got["neg_energy"] - expected["neg_energy"]).max())
        limits |= {"max_abs_prob_output_diff": atol, "max_abs_neg_energy_diff": atol}
    if "cam_grid" in got:
        diff["max_abs_cam_grid_diff"] = float(np.abs(got["cam_grid"] - expected["cam_grid"]).max())
        limits["max_abs_cam_grid_diff"] = 1e-3 + atol
    if "ood_score" in got:
        scale = np.maximum(np.abs(expected["ood_score"]), 1.0)
        diff["max_rel_ood_score_diff"] = float((np.abs(got["ood_score"] - expected["ood_score"]) / scale).max())
        limits["max_rel_ood_score_diff"] = atol
    if "image_type_score" in got:
        diff["max_abs_image_type_score_diff"] = float(
            np.abs(got["image_type_score"] - expected["image_type_score"]).max()
        )
        limits["max_abs_image_type_score_diff"] = atol * 10  # a logit of O(10) in float32 against float64
    diff["n_images"] = len(images)
    if any(diff[k] > limit for k, limit in limits.items()):
        raise ExportError(f"{path} disagrees with PyTorch beyond {atol}: {diff}. Do not use it; try another opset.")
    return diff


def _softmax(x: np.ndarray) -> np.ndarray:
    z = np.exp(x - x.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def export(
    member: Member,
    fmt: str = "onnx",
    out: Path | None = None,
    opset: int = 18,
    atol: float = 1e-4,
    parity_images: Sequence[str | Path] | None = None,
    ood: OodGate | None = None,
    image_type: ImageTypeGate | None = None,
) -> dict[str, Any]:
    """Write the model, check parity, write the sidecar (``lesionnet.contract.on_device.ExportSidecar``); returns the
    sidecar's content. ``ood``: the app's fitted OOD gate, whose score the ONNX graph then outputs (``ood_score``)."""
    if fmt not in FORMATS:
        raise ValueError(f"Unknown format '{fmt}'; use one of {sorted(FORMATS)}.")
    if (ood is not None or image_type is not None) and fmt != "onnx":
        raise ExportError("The gates' scores go into the ONNX graph only: use format=onnx.")
    out = Path(out) if out else member.path.with_suffix(FORMATS[fmt])
    out.parent.mkdir(parents=True, exist_ok=True)
    path = export_onnx(member, out, opset, ood, image_type) if fmt == "onnx" else export_torchscript(member, out)
    check = parity(member, path, sample_batch(member, parity_images), atol, ood, image_type)
    sidecar = ExportSidecar.model_validate(
        {
            **preprocessing_metadata(member),
            "outputs": OnDeviceGraph(member, ood.detector if ood else None, image_type).output_names
            if fmt == "onnx"
            else ["logits"],
            "format": fmt,
            "file": path.name,
            "checkpoint": str(member.path),
            "opset": opset if fmt == "onnx" else None,
            "parity": {**check, "atol": atol},
        }
    )
    write_export_sidecar(sidecar, path.with_suffix(".json"))
    log.info("Exported %s -> %s (parity: %s)", member.path, path, check)
    return sidecar.model_dump(mode="json")
