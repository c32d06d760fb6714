"""The inference core: load checkpoints, decode images, preprocess, predict (TTA, weighted ensembles).

Everything that turns a checkpoint and images into probabilities goes through here: evaluate.py, the app, export and
the benchmarks. ``tests/test_inference_core.py`` checks that nothing else calls ``torch.load`` on a checkpoint or runs
the prediction forward pass.

Modules: ``checkpoints`` (find and load), ``predictor`` (forward pass, TTA, :class:`Predictor`), ``explain`` (class
activation maps and Grad-CAM as heatmaps) and the ``decision`` package: what turns the outputs into an answer (the
ensemble combine, logit adjustment and temperature; the confidence gate and referral policy; the OOD detector; the
image check). Import those from their modules (``lesionnet.inference.decision.policy``, ...): this ``__init__`` only
re-exports the core.
"""

from lesionnet.data.decode import pil_to_rgb, read_rgb
from lesionnet.data.transforms import build_eval_transform, eval_crop_box
from lesionnet.inference.checkpoints import (
    CheckpointError,
    Member,
    checkpoint_specs,
    choose_device,
    load_member,
    load_members,
    resolve_checkpoints,
    same_classes,
)
from lesionnet.inference.predictor import (
    TTA_MODES,
    ForwardOutput,
    ImageOutput,
    Prediction,
    Predictor,
    forward,
    normalise_weights,
    tta_views,
)

__all__ = [
    "TTA_MODES",
    "CheckpointError",
    "ForwardOutput",
    "ImageOutput",
    "Member",
    "Prediction",
    "Predictor",
    "build_eval_transform",
    "checkpoint_specs",
    "choose_device",
    "eval_crop_box",
    "forward",
    "load_member",
    "load_members",
    "normalise_weights",
    "pil_to_rgb",
    "read_rgb",
    "resolve_checkpoints",
    "same_classes",
    "tta_views",
]
