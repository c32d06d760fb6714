"""Config -> loaded service -> FastAPI app (:func:`build_app`), in one place: tests build the app the CLI serves."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import replace
from functools import cached_property
from pathlib import Path
from typing import Any

import pandas as pd
from fastapi import FastAPI
from omegaconf import DictConfig

from lesionnet.app.api import build_api
from lesionnet.app.ondevice import OnDevice
from lesionnet.app.service import LesionService
from lesionnet.app.shipped import with_shipped_model
from lesionnet.app.upload import UploadLimits
from lesionnet.contract.files import ContractError
from lesionnet.contract.scores import read_scores, scores_for
from lesionnet.data.run_folder import RunFolder
from lesionnet.inference import Prediction, Predictor, load_members
from lesionnet.inference.decision.image_type import ImageTypeGate
from lesionnet.inference.decision.ood import OodGate, fit_ood
from lesionnet.inference.decision.policy import DEFAULT_MSP_THRESHOLD, ConfidenceGate, ReferralPolicy, fit_gate

log = logging.getLogger(__name__)


def gate_fit_inputs(
    predictor: Predictor,
    method: str,
    quantile: float,
    max_images: int | None,
    data_root: str | Path,
    paths: Sequence[str | Path],
) -> dict[str, Any]:
    """Everything a fitted threshold depends on: the weights (the version hashes the checkpoints), TTA, the score,
    the quantile and the images (resolved paths and sizes, so a moved or replaced data set refits)."""
    digest = hashlib.sha256()
    for p in paths:
        resolved = Path(p).resolve()
        digest.update(f"{resolved}\t{resolved.stat().st_size}\n".encode())
    return {
        "model_version": predictor.version,
        "tta": predictor.tta,
        "method": method,
        "quantile": float(quantile),
        "max_images": max_images,
        "data_root": str(Path(data_root).resolve()),
        "n_images": len(paths),
        "images_sha256": digest.hexdigest(),
    }


def gate_cache_file(cache_dir: str | Path, fitted_on: dict[str, Any]) -> Path:
    """``<cache_dir>/<hash of the fit inputs>.json``: one file per distinct fit, stable across starts."""
    key = hashlib.sha256(json.dumps(fitted_on, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cache_dir) / f"{key}.json"


def _load_cached(path: Path, predictor: Predictor, fitted_on: dict[str, Any]) -> ConfidenceGate | None:
    """The cached gate when it matches ``fitted_on`` exactly; a missing, unreadable or other file means refit."""
    if not path.is_file():
        log.info("No cached confidence gate at %s: fitting one.", path)
        return None
    try:
        gate = ConfidenceGate.load(path, predictor.version, fitted_on)
    except ContractError as err:  # another model or fit, another version, unreadable: all refitted
        log.warning("Ignoring the cached confidence gate %s (%s): refitting it.", path, err)
        return None
    log.info(
        "Confidence gate loaded from cache %s: %s < %.4f (%s); delete the file to refit.",
        path,
        gate.method,
        gate.threshold,
        gate.source,
    )
    return gate


class ValidationPass:
    """The served run's validation split, predicted at most once per start: the confidence gate and the OOD gate are
    both fitted on it, so when neither is cached one forward pass over it serves both fits. Nothing is read or
    predicted until a gate needs it (a configured or cached gate needs neither)."""

    def __init__(self, cfg: DictConfig, predictor: Predictor) -> None:
        self.predictor = predictor
        self.data_root_override = cfg.unsure.data_root
        self.run: RunFolder | None = next((m.run for m in predictor.members if m.run is not None), None)

    def _run(self) -> RunFolder:
        if self.run is None:
            raise ContractError("No loaded checkpoint comes from a train.py run folder: no validation split to fit on.")
        return self.run

    @cached_property
    def root(self) -> Path:
        return Path(self._run().data_root(self.data_root_override))

    @cached_property
    def table(self) -> pd.DataFrame:
        return self._run().split_table("val", self.root)

    @cached_property
    def prediction(self) -> Prediction:
        return self.predictor.predict_paths(self.table["path"].tolist(), desc="validation (gates)")


def build_gate(cfg: DictConfig, predictor: Predictor, validation: ValidationPass | None = None) -> ConfidenceGate:
    """The "unsure" threshold: configured, loaded from unsure.gate_file, fitted on the run's validation split (or
    taken from the cache of an earlier identical fit), or the unvalidated default."""
    u = cfg.unsure
    if u.threshold is not None:
        return ConfidenceGate(u.method, float(u.threshold), "configured (unsure.threshold)", predictor.version)
    if u.gate_file:
        gate = ConfidenceGate.load(Path(u.gate_file), predictor.version)
        log.info(
            "Confidence gate loaded from unsure.gate_file %s: %s < %.4f (%s).",
            u.gate_file,
            gate.method,
            gate.threshold,
            gate.source,
        )
        return gate
    validation = validation or ValidationPass(cfg, predictor)
    if u.fit_on_val and validation.run is not None:
        root = validation.root
        paths = validation.table["path"].tolist()[: u.max_images]
        fitted_on = gate_fit_inputs(predictor, u.method, u.quantile, u.max_images, root, paths)
        if u.cache_dir:
            gate_file = gate_cache_file(u.cache_dir, fitted_on)
            cached = _load_cached(gate_file, predictor, fitted_on)
            if cached is not None:
                return cached
        else:  # no cache: fit at every start, keep a record in the run's output folder
            gate_file = Path(cfg.paths.output_dir) / "confidence_gate.json"
        start = time.perf_counter()
        prediction = validation.prediction.rows(len(paths))
        gate = replace(
            fit_gate(predictor, paths, method=u.method, quantile=u.quantile, prediction=prediction),
            fitted_on=fitted_on,
        )
        log.info(
            "Confidence gate fitted in %.1f s and written to %s", time.perf_counter() - start, gate.save(gate_file)
        )
        return gate
    log.warning(
        "No validation split to fit the 'unsure' threshold on: using max softmax < %.2f (not validated).",
        DEFAULT_MSP_THRESHOLD,
    )
    return ConfidenceGate("msp", DEFAULT_MSP_THRESHOLD, "default (not validated)", predictor.version)


def build_ood_gate(cfg: DictConfig, predictor: Predictor, validation: ValidationPass | None = None) -> OodGate | None:
    """The feature-space "not a dermatoscope image" gate: from ood.gate_file, or fitted on the run's whole validation
    split (cached like the confidence gate; a capped set gives a too-low threshold, see
    lesionnet.inference.decision.ood)."""
    o = cfg.ood
    if not o.enabled:
        return None
    if o.gate_file:
        return OodGate.load(o.gate_file, predictor.version, predictor.tta)
    validation = validation or ValidationPass(cfg, predictor)
    if validation.run is None:
        log.warning("No run folder with a validation split: the feature-space OOD gate is off (give ood.gate_file).")
        return None
    root, table = validation.root, validation.table
    fitted_on = {
        **gate_fit_inputs(predictor, o.method, o.quantile, None, root, table["path"].tolist()),
        "kind": "ood",
    }
    gate_file = gate_cache_file(cfg.unsure.cache_dir or Path(cfg.paths.output_dir), fitted_on)
    if gate_file.is_file():
        try:
            gate = OodGate.load(gate_file, predictor.version, predictor.tta)
            log.info("OOD gate loaded from cache %s (%s > %.4f).", gate_file, gate.method, gate.threshold)
            return gate
        except ContractError as err:
            log.warning("Ignoring the cached OOD gate %s (%s): refitting it.", gate_file, err)
    start = time.perf_counter()
    gate = fit_ood(
        predictor,
        table["path"].tolist(),
        o.method,
        groups=table["lesion_id"].tolist(),
        labels=table["dx"].tolist(),
        quantile=o.quantile,
        prediction=validation.prediction,
    )
    log.info("OOD gate fitted in %.1f s and written to %s", time.perf_counter() - start, gate.save(gate_file))
    return gate


def build_image_type_gate(cfg: DictConfig, predictor: Predictor) -> ImageTypeGate | None:
    """Question 1, "is this a dermatoscope image?": from image_type.gate_file (fitted with negatives the app does not
    have: bench/image_type_eval.py --gate-out); without one the app cannot tell an ordinary photo from dermoscopy."""
    gate_file = (cfg.get("image_type") or {}).get("gate_file")
    if not gate_file:
        log.warning(
            "No image-type gate (image_type.gate_file): ordinary photos are not told apart from dermatoscope images. "
            "Fit one with bench/image_type_eval.py --run <run> --gate-out <folder>."
        )
        return None
    gate = ImageTypeGate.load(gate_file, predictor.version, predictor.tta)
    log.info("Image-type gate loaded from %s (logit < %.3f refused; %s).", gate_file, gate.threshold, gate.source)
    return gate


def build_service(cfg: DictConfig) -> LesionService:
    """Load the checkpoints (the shipped model when no ckpt is given); with a scores.json, serve exactly what it
    evaluated (same checkpoints, TTA, weights)."""
    cfg = with_shipped_model(cfg)
    members = load_members(cfg.ckpt, device=cfg.device)
    tta, weights, scores, evaluated = cfg.tta, None, None, None
    adjusted = bool(cfg.get("logit_adjustment"))
    if adjusted and not cfg.scores:
        raise ContractError(
            "logit_adjustment=true serves the post-hoc logit adjustment evaluate.py fitted on validation: pass its "
            "scores.json (scores=...), written with posthoc_logit_adjustment=true."
        )
    if cfg.scores:
        document = read_scores(cfg.scores)
        tta = tta or document.tta
        _, scores, weights = scores_for(document, cfg.scores, [m.sha256 for m in members], tta, adjusted)
        evaluated = document
    tta = tta or "none"
    adjustment = scores.logit_adjustment if adjusted and scores is not None else None
    predictor = Predictor(members, tta=tta, weights=weights, logit_adjustment=adjustment)
    referral = ReferralPolicy.from_scores(scores, cfg.referral.malignant_threshold)
    log.info("Serving %s (tta=%s); referral: %s", predictor.version, tta, referral.source)
    validation = ValidationPass(cfg, predictor)  # one pass over the validation split for both gates, if any
    return LesionService(
        predictor,
        referral=referral,
        gate=build_gate(cfg, predictor, validation),
        ood=build_ood_gate(cfg, predictor, validation),
        image_type=build_image_type_gate(cfg, predictor),
        gradcam=cfg.gradcam,
        scores=scores,
        evaluated=evaluated,
    )


def upload_limits(cfg: DictConfig) -> UploadLimits:
    """What an upload (or a photo given to ``lesionnet predict``) may be: serve.yaml's ``limits``."""
    return UploadLimits(
        max_bytes=int(cfg.limits.max_upload_mb * 2**20),
        max_pixels=int(cfg.limits.max_pixels),
        min_side=int(cfg.limits.min_side),
        body_timeout_s=cfg.limits.body_timeout_s,
        body_deadline_s=cfg.limits.get("body_deadline_s"),
    )


def build_app(cfg: DictConfig) -> FastAPI:
    limits = upload_limits(cfg)
    service = build_service(cfg)
    on_device = cfg.get("on_device") or {}
    cache_dir = on_device.get("cache_dir") or Path(cfg.paths.output_dir) / "on_device"
    return build_api(
        service,
        limits,
        workers=cfg.limits.workers,
        max_pending=cfg.limits.max_pending,
        on_device=OnDevice(service, Path(cache_dir), enabled=bool(on_device.get("enabled", True))),
    )
