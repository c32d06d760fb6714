"""The DataModule: timm-driven sizes and normalisation, imbalance options, clear config errors."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.fabric.utilities.seed import pl_worker_init_function
from torch.utils.data import DataLoader, WeightedRandomSampler

from lesionnet.data.datamodule import HAM10000DataModule, class_weights
from lesionnet.data.image_dataset import LesionImageDataset
from lesionnet.data.metadata import DatasetError, embedded_sample_root
from lesionnet.data.transforms import build_eval_transform, resolve_data_config, to_hw


def _dm(root: Path, **kwargs) -> HAM10000DataModule:
    kwargs.setdefault("split_fractions", {"train": 0.6, "val": 0.2, "test": 0.2})
    kwargs.setdefault("num_workers", 0)
    return HAM10000DataModule(backbone=kwargs.pop("backbone", "lesionnet_baseline"), root=str(root), **kwargs)


def test_batches_have_the_backbone_input_size(ham_dir: Path) -> None:
    dm = _dm(ham_dir, batch_size=4, image_size=[24, 32])
    dm.setup("fit")
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()):
        images, labels = next(iter(loader))
        assert images.shape[1:] == (3, 24, 32) and images.dtype == torch.float32
        assert labels.dtype == torch.long and labels.max() < 7


def test_default_size_and_stats_come_from_timm_config(ham_dir: Path) -> None:
    dm = _dm(ham_dir, backbone="inception_v3.tv_in1k")
    assert dm.data_config["input_size"] == (3, 299, 299)
    assert dm.data_config["mean"] == (0.5, 0.5, 0.5)
    assert _dm(ham_dir, backbone="resnet18.a1_in1k").data_config["mean"] == pytest.approx((0.485, 0.456, 0.406))


def test_eval_transform_normalises_with_config_mean_std() -> None:
    cfg = resolve_data_config("resnet18.a1_in1k", image_size=16)
    image = np.full((30, 40, 3), 128, dtype=np.uint8)
    out = build_eval_transform(cfg)(image=image)["image"]
    expected = (128 / 255 - torch.tensor(cfg["mean"])) / torch.tensor(cfg["std"])
    assert out.shape == (3, 16, 16)
    torch.testing.assert_close(out.mean(dim=(1, 2)), expected, atol=1e-5, rtol=0)


def test_eval_transform_is_deterministic_centre_crop() -> None:
    cfg = resolve_data_config("lesionnet_baseline", image_size=[12, 16])
    image = np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    tf = build_eval_transform(cfg)
    assert torch.equal(tf(image=image)["image"], tf(image=image)["image"])


def test_eval_split_order_is_stable_and_train_is_shuffled(ham_dir: Path) -> None:
    dm = _dm(ham_dir, batch_size=8)
    dm.setup()
    assert dm.val_dataloader().sampler.__class__.__name__ == "SequentialSampler"
    assert dm.train_dataloader().sampler.__class__.__name__ == "RandomSampler"


def test_class_weights_balance_inverse_frequency() -> None:
    w = class_weights([0, 0, 0, 1], num_classes=2, power=1.0)
    torch.testing.assert_close(w, torch.tensor([4 / 6, 4 / 2]))
    torch.testing.assert_close(class_weights([0, 0, 0, 1], 2, power=0.0), torch.ones(2))
    with pytest.raises(ValueError, match="No training images for class"):
        class_weights([0, 0], num_classes=2)


def test_loss_mode_exposes_weights_sampler_mode_uses_weighted_sampler(ham_dir: Path) -> None:
    dm = _dm(ham_dir, imbalance="loss", imbalance_power=1.0)
    dm.setup()
    assert dm.loss_weights is not None and dm.loss_weights.shape == (7,)
    dm = _dm(ham_dir, imbalance="sampler")
    dm.setup()
    assert dm.loss_weights is None
    assert isinstance(dm.train_dataloader().sampler, WeightedRandomSampler)


def test_split_file_makes_runs_comparable(ham_dir: Path, tmp_path: Path) -> None:
    first = _dm(ham_dir, split_seed=1)
    path = first.save_split(tmp_path / "split.csv")
    second = _dm(ham_dir, split_seed=99, split_file=str(path))
    second.setup()
    assert second.table.set_index("image_id")["split"].equals(first.table.set_index("image_id")["split"])


def test_corrupt_image_stops_the_loader_with_its_path(ham_dir: Path) -> None:
    dm = _dm(ham_dir, batch_size=100)
    dm.setup()
    victim = Path(dm.datasets["val"].paths[0])
    victim.write_bytes(victim.read_bytes()[:200])
    with pytest.raises(DatasetError, match=victim.name):
        next(iter(dm.val_dataloader()))


def test_embedded_sample_is_the_default_root() -> None:
    dm = HAM10000DataModule(backbone="lesionnet_baseline", num_workers=0)
    assert dm.root == embedded_sample_root()
    dm.setup()
    assert len(dm.table) > 250 and set(dm.table["split"]) == {"train", "val", "test"}


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"imbalance": "oversample"}, ValueError, "data.imbalance must be one of"),
        ({"batch_size": 0}, ValueError, "batch_size must be >= 1"),
        ({"backbone": "no_such_net"}, ValueError, "Unknown timm model 'no_such_net'"),
        ({"image_size": [0, 10]}, ValueError, "image_size must be"),
        ({"crop_pct": 1.5}, ValueError, "crop_pct must be in"),
    ],
)
def test_bad_config_values_fail_at_construction(ham_dir: Path, kwargs: dict, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        _dm(ham_dir, **kwargs)


def test_to_hw_accepts_int_pair_and_timm_input_size() -> None:
    assert to_hw(96) == (96, 96) and to_hw([96, 128]) == (96, 128) and to_hw((3, 96, 128)) == (96, 128)


def test_augmentations_repeat_with_the_seed_and_change_with_it(ham_dir: Path) -> None:
    dm = _dm(ham_dir, batch_size=8, image_size=[24, 32])
    dm.setup("fit")

    def first_batch(seed: int) -> torch.Tensor:
        L.seed_everything(seed, verbose=False)
        return next(iter(dm.train_dataloader()))[0]

    assert torch.equal(first_batch(1), first_batch(1))
    assert not torch.equal(first_batch(1), first_batch(2))


def test_loader_workers_draw_different_augmentations_reproducibly(ham_dir: Path) -> None:
    """Forked workers inherit one albumentations generator state; without reseeding they would augment alike."""
    dm = _dm(ham_dir, image_size=[24, 32])
    dm.setup("fit")
    train = dm.datasets["train"]
    same_image = LesionImageDataset([train.paths[0]] * 4, [0] * 4, train.transform)

    def samples(seed: int) -> torch.Tensor:
        L.seed_everything(seed, workers=True, verbose=False)
        loader = DataLoader(same_image, batch_size=1, num_workers=2, worker_init_fn=pl_worker_init_function)
        return torch.cat([x for x, _ in loader])

    first, again = samples(3), samples(3)
    assert torch.equal(first, again)
    assert not torch.equal(first[0], first[1])  # sample 0 came from worker 0, sample 1 from worker 1
