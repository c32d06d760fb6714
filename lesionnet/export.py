"""Export a checkpoint for serving without PyTorch/Lightning: ONNX (or TorchScript) plus its preprocessing.

``lesionnet export ckpt=... [format=onnx|torchscript] [out=...]`` (lesionnet/conf/export.yaml). The file carries the
preprocessing (input size, mean/std, interpolation, crop_pct, class names) in its metadata (ONNX metadata_props /
TorchScript extra files) and in a JSON sidecar, so a runtime can reproduce ``build_eval_transform``. The exported
graph outputs logits. At export the outputs are compared with PyTorch's on real images; a mismatch above ``atol``
stops with an error instead of writing a model that silently disagrees.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lesionnet.data.transforms import to_hw
from lesionnet.inference import Member, Predictor, forward, read_rgb

log = logging.getLogger(__name__)
SAMPLE_IMAGES = Path(__file__).parent / "data" / "sample" / "images"
FORMATS: dict[str, str] = {"onnx": ".onnx", "torchscript": ".pt"}


class ExportError(RuntimeError):
    """The export cannot be trusted (parity failed) or cannot be made; the message says which."""


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
        "output": "logits; apply softmax",
    }


def sample_batch(member: Member, paths: Sequence[str | Path] | None = None, n: int = 4) -> torch.Tensor:
    """Preprocessed real images for the parity check (the embedded HAM10000 sample by default)."""
    paths = list(paths) if paths else sorted(SAMPLE_IMAGES.glob("*.jpg"))[:n]
    return Predictor([member]).preprocess(0, [read_rgb(p) for p in paths]).cpu()


def _network(member: Member) -> torch.nn.Module:
    return member.model.model.eval().cpu()  # the timm backbone: logits from a normalised NCHW batch


def export_onnx(member: Member, out: Path, opset: int = 18) -> Path:
    import onnx

    h, w = to_hw(member.data_config["input_size"])
    # torch.export-based exporter (PyTorch's default since 2.9, needs onnxscript); the batch size stays dynamic.
    torch.onnx.export(
        _network(member),
        (torch.zeros(1, 3, h, w),),
        str(out),
        input_names=["image"],
        output_names=["logits"],
        dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},),
        opset_version=opset,
        dynamo=True,
        verbose=False,
        external_data=False,
    )
    model = onnx.load(str(out))
    meta = preprocessing_metadata(member)
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


def run_exported(path: Path, images: torch.Tensor) -> np.ndarray:
    """Logits of the exported file (onnxruntime, or TorchScript) for a preprocessed batch."""
    if path.suffix == ".onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return session.run(["logits"], {"image": images.numpy().astype(np.float32)})[0]
    with torch.no_grad():
        return torch.jit.load(str(path)).eval()(images).numpy()


def parity(member: Member, path: Path, images: torch.Tensor, atol: float = 1e-4) -> dict[str, float]:
    """Largest differences of logits and probabilities between PyTorch and the exported file; raises above atol."""
    with torch.inference_mode():
        expected = forward(member, images.to(next(member.model.parameters()).device)).logits.cpu().numpy()
    got = run_exported(path, images)
    diff = {
        "max_abs_logit_diff": float(np.abs(got - expected).max()),
        "max_abs_prob_diff": float(np.abs(_softmax(got) - _softmax(expected)).max()),
        "n_images": len(images),
    }
    if max(diff["max_abs_logit_diff"], diff["max_abs_prob_diff"]) > atol:
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
) -> dict[str, Any]:
    """Write the model, check parity, write the sidecar; returns the sidecar's content."""
    if fmt not in FORMATS:
        raise ValueError(f"Unknown format '{fmt}'; use one of {sorted(FORMATS)}.")
    out = Path(out) if out else member.path.with_suffix(FORMATS[fmt])
    out.parent.mkdir(parents=True, exist_ok=True)
    path = export_onnx(member, out, opset) if fmt == "onnx" else export_torchscript(member, out)
    check = parity(member, path, sample_batch(member, parity_images), atol)
    sidecar = {
        **preprocessing_metadata(member),
        "format": fmt,
        "file": path.name,
        "checkpoint": str(member.path),
        "opset": opset if fmt == "onnx" else None,
        "parity": {**check, "atol": atol},
    }
    path.with_suffix(".json").write_text(json.dumps(sidecar, indent=2))
    log.info("Exported %s -> %s (parity: %s)", member.path, path, check)
    return sidecar


if __name__ == "__main__":  # ``python -m lesionnet.export``: the Hydra app is ``lesionnet export`` (lesionnet.cli)
    from lesionnet.cli.export import main

    main()
