"""Acquisition-robust augmentation: what other dermatoscopes and cameras do to an image, as albumentations transforms
configured in the data config (issue 21, item 3)."""

from __future__ import annotations

from pathlib import Path

import albumentations as A
import lightning as L
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from lesionnet.data.datamodule import HAM10000DataModule
from lesionnet.data.transforms import build_train_transform, resolve_data_config
from lesionnet.data.vignette import DermatoscopeField
from tests.conftest import CONF
from tests.test_app import lesion_like

RECIPE = OmegaConf.to_container(OmegaConf.load(CONF / "experiment" / "cpu_lite0_acq.yaml"))


def recipe_augment() -> dict:
    return RECIPE["data"]["augment"]  # type: ignore[index]


def test_the_recipe_builds_every_acquisition_transform_in_order() -> None:
    config = resolve_data_config("lesionnet_baseline", image_size=[24, 32])
    names = [type(t).__name__ for t in build_train_transform(config, **recipe_augment()).transforms]
    acquisition = names[names.index("ColorJitter") + 1 : names.index("Normalize")]
    assert acquisition == ["RandomGamma", "DermatoscopeField", "Downscale", "OneOf", "ImageCompression"]


def test_an_augmented_batch_keeps_its_size_and_repeats_with_the_seed(ham_dir: Path) -> None:
    dm = HAM10000DataModule(
        "lesionnet_baseline",
        root=str(ham_dir),
        image_size=[24, 32],
        num_workers=0,
        batch_size=8,
        augment=recipe_augment(),
    )
    dm.setup("fit")

    def first_batch(seed: int) -> torch.Tensor:
        L.seed_everything(seed, verbose=False)
        return next(iter(dm.train_dataloader()))[0]

    batch = first_batch(5)
    assert batch.shape == (8, 3, 24, 32) and torch.isfinite(batch).all()
    assert torch.equal(batch, first_batch(5)) and not torch.equal(batch, first_batch(6))


@pytest.mark.parametrize(
    ("acquisition", "message"),
    [
        ({"hair": {"p": 0.5}}, "unknown entries"),
        ({"jpeg": {"p": 0.5, "qualty": [30, 90]}}, r"jpeg: unknown settings \['qualty'\]"),
        ({"field": {"p": 0.5, "radius_range": [0.9, 0.5]}}, "field.*radius_range"),
    ],
)
def test_bad_acquisition_settings_name_the_entry(acquisition: dict, message: str) -> None:
    config = resolve_data_config("lesionnet_baseline", image_size=32)
    with pytest.raises(ValueError, match=message):
        build_train_transform(config, acquisition=acquisition)


def test_the_dermatoscope_field_darkens_the_corners_and_keeps_the_centre() -> None:
    image = lesion_like(seed=2, size=(64, 48))
    field = A.Compose([DermatoscopeField(radius_range=(0.7, 0.7), outside_range=(0.0, 0.0), centre_shift=0, p=1)])
    field.set_random_seed(0)
    out = field(image=image)["image"]
    assert out.shape == image.shape and out.dtype == np.uint8
    assert out[:3, :3].max() == 0 and out[-3:, -3:].max() == 0  # corners black
    np.testing.assert_array_equal(out[20:28, 28:36], image[20:28, 28:36])  # centre untouched
