"""LightningDataModule for HAM10000: validated load, lesion-level split, timm-configured transforms."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, WeightedRandomSampler

from lesionnet.classes import CLASS_NAMES
from lesionnet.data.image_dataset import LesionImageDataset
from lesionnet.data.metadata import embedded_sample_root, load_ham10000
from lesionnet.data.split import (
    SPLITS,
    assign_folds,
    check_fold_settings,
    check_splits_nonempty,
    fold_split,
    lesion_overlap,
    load_split,
    save_split,
    split_images_legacy,
    split_lesions,
)
from lesionnet.data.transforms import build_eval_transform, build_train_transform, resolve_data_config

log = logging.getLogger(__name__)

IMBALANCE_MODES: tuple[str, ...] = ("none", "loss", "sampler")
SPLIT_MODES: tuple[str, ...] = ("lesion", "legacy")


def class_weights(labels: Sequence[int], num_classes: int, power: float = 1.0) -> torch.Tensor:
    """Inverse-frequency weights ``(N / (K * n_c)) ** power``: 1 = fully balanced, 0.5 = square root, 0 = none."""
    counts = np.bincount(np.asarray(labels), minlength=num_classes).astype(float)
    missing = [CLASS_NAMES[i] if num_classes == len(CLASS_NAMES) else i for i in np.flatnonzero(counts == 0)]
    if missing:
        raise ValueError(f"No training images for class(es) {missing}; cannot weight them.")
    return torch.tensor((counts.sum() / (num_classes * counts)) ** power, dtype=torch.float32)


class HAM10000DataModule(L.LightningDataModule):
    """Reads a HAM10000-layout folder, splits it by lesion and serves train/val/test loaders.

    ``backbone`` names the timm model whose pretrained data config fixes input size, mean/std and
    interpolation; ``image_size``/``crop_pct`` override it (e.g. 96 px crops for CPU runs). ``folds``/``fold``
    make the run one fold of a cross-validation: the test split stays as without them, the train+val lesions are
    dealt into ``folds`` class-stratified folds and fold ``fold`` is this run's validation split.
    """

    def __init__(
        self,
        backbone: str,
        root: str | None = None,
        image_size: int | Sequence[int] | None = None,
        crop_pct: float | None = None,
        colour_constancy: Mapping[str, Any] | None = None,
        split: str = "lesion",
        split_fractions: Mapping[str, float] | None = None,
        split_seed: int = 42,
        split_file: str | None = None,
        folds: int | None = None,
        fold: int | None = None,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 2,
        pin_memory: bool = False,
        imbalance: str = "none",
        imbalance_power: float = 1.0,
        augment: Mapping[str, Any] | None = None,
        check_headers: bool = True,
    ) -> None:
        super().__init__()
        if imbalance not in IMBALANCE_MODES:
            raise ValueError(f"data.imbalance must be one of {list(IMBALANCE_MODES)}, got '{imbalance}'.")
        if split not in SPLIT_MODES:
            raise ValueError(f"data.split must be one of {list(SPLIT_MODES)}, got '{split}'.")
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {batch_size}.")
        check_fold_settings(folds, fold)
        if folds is not None and split == "legacy":
            raise ValueError(
                "data.folds needs lesion-level folds, but data.split=legacy splits by image (one lesion on both "
                "sides). Use data.split=lesion for cross-validation."
            )
        self.root = Path(root).expanduser() if root else embedded_sample_root()
        self.split = split
        self.split_fractions = dict(split_fractions or {"train": 0.7, "val": 0.15, "test": 0.15})
        self.split_seed = split_seed
        self.split_file = split_file
        self.folds = folds
        self.fold = fold
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.imbalance = imbalance
        self.imbalance_power = imbalance_power
        self.augment = dict(augment or {})
        self.check_headers = check_headers
        self.class_names = CLASS_NAMES
        self.data_config = resolve_data_config(
            backbone, image_size=image_size, crop_pct=crop_pct, colour_constancy=colour_constancy
        )
        self.table: pd.DataFrame | None = None
        self.datasets: dict[str, LesionImageDataset] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.table is not None:
            return
        if self.root == embedded_sample_root():
            log.info("data.root not set: using the embedded HAM10000 sample at %s", self.root)
        table = load_ham10000(self.root, check_headers=self.check_headers)
        legacy = self.split == "legacy"
        if self.split_file:
            table["split"] = load_split(table, self.split_file, allow_leak=legacy)
        elif legacy:
            table["split"] = split_images_legacy(table, seed=self.split_seed)
        else:
            table["split"] = split_lesions(table, self.split_fractions, seed=self.split_seed)
        if legacy:
            log.warning(
                "data.split=legacy: image-level split as in the seed project; %d test lesions also have images in "
                "train, so test figures are optimistic. Use it only to compare with the seed's table.",
                lesion_overlap(table, "train", "test"),
            )
        if self.folds is not None and self.fold is not None:  # both or neither (check_fold_settings)
            table["fold"] = assign_folds(table, table["split"], self.folds, seed=self.split_seed)
            table["split"] = fold_split(table["split"], table["fold"], self.fold)
            log.info(
                "Cross-validation: fold %d of %d is the validation split; the test split is the one without folds.",
                self.fold,
                self.folds,
            )
        required = (
            SPLITS if self.split_file or legacy else tuple(s for s in SPLITS if self.split_fractions.get(s, 0) > 0)
        )
        check_splits_nonempty(table, required)
        table["label"] = table["dx"].map({c: i for i, c in enumerate(self.class_names)})
        self.table = table
        train_tf = build_train_transform(self.data_config, **self.augment)
        eval_tf = build_eval_transform(self.data_config)
        for split in SPLITS:
            part = table[table["split"] == split]
            self.datasets[split] = LesionImageDataset(
                part["path"].tolist(), part["label"].tolist(), train_tf if split == "train" else eval_tf
            )
        log.info("Split (images): %s", {s: len(d) for s, d in self.datasets.items()})

    @property
    def loss_weights(self) -> torch.Tensor | None:
        """Class weights for the loss when ``imbalance == 'loss'``, else None."""
        if self.imbalance != "loss":
            return None
        return class_weights(self._train_labels(), len(self.class_names), self.imbalance_power)

    @property
    def class_prior(self) -> list[float]:
        """Training-split class frequencies (what logit adjustment offsets by, and what the checkpoint stores)."""
        counts = np.bincount(self._train_labels(), minlength=len(self.class_names)).astype(float)
        return (counts / counts.sum()).tolist()

    def _train_labels(self) -> list[int]:
        if "train" not in self.datasets:
            self.setup("fit")
        return self.datasets["train"].labels.tolist()

    def _loaded_table(self) -> pd.DataFrame:
        """The image table with its split column, read by :meth:`setup` on first use."""
        if self.table is None:
            self.setup()
        if self.table is None:
            raise RuntimeError("HAM10000DataModule.setup() did not load the image table.")
        return self.table

    def save_split(self, path: str | Path) -> Path:
        return save_split(self._loaded_table(), path)

    def split_summary(self) -> pd.DataFrame:
        """Images per class and split (rows: dx, columns: splits), for logs and reports."""
        table = self._loaded_table()
        return pd.crosstab(table["dx"], table["split"]).reindex(columns=list(SPLITS), fill_value=0)

    def _loader(self, split: str, train: bool) -> DataLoader[tuple[torch.Tensor, torch.Tensor]]:
        dataset = self.datasets[split]
        sampler = None
        if train and self.imbalance == "sampler":
            weights = class_weights(self._train_labels(), len(self.class_names), self.imbalance_power)
            # torch annotates weights as Sequence[float]; it takes a tensor (torch.as_tensor)
            sampler = WeightedRandomSampler(weights[dataset.labels].double(), num_samples=len(dataset))  # type: ignore[arg-type]
        return DataLoader(
            dataset,
            batch_size=self.batch_size if train else self.eval_batch_size,
            shuffle=train and sampler is None,
            sampler=sampler,
            drop_last=train and len(dataset) > self.batch_size,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader[tuple[torch.Tensor, torch.Tensor]]:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader[tuple[torch.Tensor, torch.Tensor]]:
        return self._loader("val", train=False)

    def test_dataloader(self) -> DataLoader[tuple[torch.Tensor, torch.Tensor]]:
        return self._loader("test", train=False)
