"""A map-style dataset over image paths and labels; a corrupt image stops training with its path."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from lesionnet.data.decode import read_rgb


class LesionImageDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """(image tensor, class index) pairs; ``transform`` is an albumentations pipeline.

    Albumentations draws from its own generators, which ``seed_everything`` does not reach (an unseeded
    ``A.Compose`` starts from OS entropy). So each sample reseeds the pipeline from torch's RNG: torch seeds it per
    loader worker from the main process, and checkpoints carry it, so augmentations repeat with the seed, differ
    between workers and survive a resume. Costs ~0.1 ms per sample.
    """

    def __init__(self, paths: Sequence[str], labels: Sequence[int], transform: Callable[..., dict[str, Any]]) -> None:
        if len(paths) != len(labels):
            raise ValueError(f"{len(paths)} paths but {len(labels)} labels.")
        self.paths = list(paths)
        self.labels = torch.as_tensor(list(labels), dtype=torch.long)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if hasattr(self.transform, "set_random_seed"):
            self.transform.set_random_seed(int(torch.randint(2**32 - 1, ()).item()))
        image = self.transform(image=read_rgb(self.paths[index]))["image"]
        return image, self.labels[index]
