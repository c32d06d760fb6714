"""Config -> loaded service -> FastAPI app; kept out of ``__main__`` so tests build the same app the CLI serves."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from lesionnet.app.api import create_app
from lesionnet.app.policy import DEFAULT_MSP_THRESHOLD, ConfidenceGate, ReferralPolicy, fit_gate, read_scores
from lesionnet.app.predictor import Predictor
from lesionnet.app.service import LesionService
from lesionnet.app.upload import UploadLimits
from lesionnet.evaluation.datasets import run_split_table

log = logging.getLogger(__name__)


def _scores_tta(path: str | None) -> str | None:
    return json.loads(Path(path).read_text()).get("tta") if path and Path(path).is_file() else None


def build_gate(cfg: DictConfig, predictor: Predictor) -> ConfidenceGate:
    """The "unsure" threshold: configured, loaded, fitted on the run's validation split, or the unvalidated default."""
    u = cfg.unsure
    if u.threshold is not None:
        return ConfidenceGate(u.method, float(u.threshold), "configured (unsure.threshold)", predictor.version)
    gate_file = Path(u.gate_file) if u.gate_file else Path(cfg.paths.output_dir) / "confidence_gate.json"
    if gate_file.is_file():
        return ConfidenceGate.load(gate_file, predictor.version)
    run = next((m.run_dir for m in predictor.members if m.run_dir is not None), None)
    if u.fit_on_val and run is not None:
        root = u.data_root or json.loads((run / "metrics.json").read_text())["data_root"]
        paths = run_split_table(run, root, "val")["path"].tolist()[: u.max_images]
        gate = fit_gate(predictor, paths, method=u.method, quantile=u.quantile)
        log.info("Confidence gate written to %s", gate.save(gate_file))
        return gate
    log.warning("No validation split to fit the 'unsure' threshold on: using max softmax < %.2f (not validated).",
                DEFAULT_MSP_THRESHOLD)
    return ConfidenceGate("msp", DEFAULT_MSP_THRESHOLD, "default (not validated)", predictor.version)


def build_service(cfg: DictConfig) -> LesionService:
    ckpt = OmegaConf.to_container(cfg.ckpt) if not isinstance(cfg.ckpt, str) else cfg.ckpt
    tta = cfg.tta or _scores_tta(cfg.scores) or "none"
    predictor = Predictor.from_checkpoints(ckpt, device=cfg.device, tta=tta)
    scores, evaluated = None, None
    if cfg.scores:
        _, scores, evaluated = read_scores(cfg.scores, [m.name for m in predictor.members])
    referral = ReferralPolicy.from_scores(scores, cfg.referral.malignant_threshold)
    log.info("Serving %s (tta=%s); referral: %s", predictor.version, tta, referral.source)
    return LesionService(predictor, referral=referral, gate=build_gate(cfg, predictor), gradcam=cfg.gradcam,
                         scores=scores, evaluated=evaluated)


def build_app(cfg: DictConfig) -> object:
    limits = UploadLimits(max_bytes=int(cfg.limits.max_upload_mb * 2**20), max_pixels=int(cfg.limits.max_pixels),
                          min_side=int(cfg.limits.min_side))
    return create_app(build_service(cfg), limits, workers=cfg.limits.workers, max_pending=cfg.limits.max_pending)

