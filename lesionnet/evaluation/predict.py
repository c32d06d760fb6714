"""Softmax probabilities of one model over a list of images, with its own preprocessing and optional TTA."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from lesionnet.data.dataset import LesionImageDataset
from lesionnet.data.transforms import build_eval_transform
from lesionnet.module import LesionClassifier

# Dermoscopy has no canonical orientation, so flips and 90-degree turns keep the label.
TTA_MODES: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], ...]] = {
    "none": (lambda x: x,),
    "flips": (lambda x: x, lambda x: x.flip(3), lambda x: x.flip(2), lambda x: x.flip(2, 3)),
    "d4": (
        lambda x: x, lambda x: x.flip(3), lambda x: x.flip(2), lambda x: x.flip(2, 3),
        lambda x: x.transpose(2, 3), lambda x: x.transpose(2, 3).flip(3),
        lambda x: x.transpose(2, 3).flip(2), lambda x: x.transpose(2, 3).flip(2, 3),
    ),
}


def tta_views(images: torch.Tensor, mode: str) -> list[torch.Tensor]:
    """The test-time views of a batch (NCHW): ``none``, ``flips`` (4) or ``d4`` (8: flips and transposes)."""
    if mode not in TTA_MODES:
        raise ValueError(f"Unknown tta '{mode}'; use one of {list(TTA_MODES)}.")
    return [view(images) for view in TTA_MODES[mode]]


@torch.inference_mode()
def predict_probs(
    model: LesionClassifier,
    paths: Sequence[str],
    tta: str = "none",
    batch_size: int = 64,
    num_workers: int = 0,
    desc: str = "predict",
) -> np.ndarray:
    """(N, K) softmax probabilities, averaged over TTA views, preprocessed as the model was trained."""
    device = next(model.parameters()).device
    dataset = LesionImageDataset(paths, [0] * len(paths), build_eval_transform(model.hparams.data_config))
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
    model.eval()
    out = []
    for images, _ in tqdm(loader, desc=desc, unit="batch", leave=False):
        images = images.to(device)
        views = tta_views(images, tta)
        out.append(torch.stack([model(v).softmax(dim=-1) for v in views]).mean(0).float().cpu())
    return torch.cat(out).numpy().astype(np.float64)
