"""Shared fixtures: a tiny synthetic dataset in HAM10000's published layout, made fresh per test."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a hub miss must fail at once, never hang or download
if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest-xdist runs one worker per core: one torch/OpenMP thread each (inherited by the subprocesses the tests
    # start), or two workers' thread pools fight over the same cores and both crawl.
    os.environ.setdefault("OMP_NUM_THREADS", "1")

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from PIL import Image

from lesionnet.classes import CLASS_NAMES

REPO_ROOT = Path(__file__).resolve().parents[1]
REAL_DATA = REPO_ROOT.parent / "shared" / "data"
CONF = REPO_ROOT / "lesionnet" / "conf"
# Seconds-long training runs on the synthetic dataset: tiny inputs, no workers, a split every class reaches.
FAST = [
    "data.image_size=[24,32]",
    "data.num_workers=0",
    "data.batch_size=8",
    "data.split_fractions={train:0.6,val:0.2,test:0.2}",
    "logger=csv",
]


def compose_train(overrides: list[str], hydra: bool = False) -> DictConfig:
    """The train.py config with ``overrides``, as Hydra composes it for the command line (``hydra``: with the
    ``hydra`` node, e.g. to inspect the launcher)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=hydra)


def write_image(path: Path, rng: np.random.Generator, size: tuple[int, int] = (40, 30), smooth: bool = False) -> None:
    """A random RGB JPEG of ``size`` (width, height): pixel noise, or (``smooth``) a random blurred blob picture
    whose perceptual hash survives resizing, as a photo's does."""
    if smooth:
        coarse = rng.integers(0, 256, size=(12, 16, 3), dtype=np.uint8)
        pixels = np.asarray(Image.fromarray(coarse).resize(size, Image.Resampling.BICUBIC))
    else:
        pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=90)


def make_ham_dir(
    root: Path,
    lesions_per_class: int = 6,
    images_per_lesion: tuple[int, ...] = (1, 2, 3),
    folders: tuple[str, ...] = ("images",),
    seed: int = 0,
    smooth: bool = False,
    image_size: tuple[int, int] = (40, 30),
) -> Path:
    """Write HAM10000_metadata.csv and random images; lesions cycle through ``images_per_lesion`` images each."""
    rng = np.random.default_rng(seed)
    for folder in folders:
        (root / folder).mkdir(parents=True, exist_ok=True)
    rows, n = [], 0
    for c, dx in enumerate(CLASS_NAMES):
        for k in range(lesions_per_class):
            lesion = f"HAM_{c:02d}{k:05d}"
            for _ in range(images_per_lesion[k % len(images_per_lesion)]):
                image_id = f"ISIC_{n:07d}"
                write_image(root / folders[n % len(folders)] / f"{image_id}.jpg", rng, image_size, smooth)
                rows.append(
                    {
                        "lesion_id": lesion,
                        "image_id": image_id,
                        "dx": dx,
                        "dx_type": "histo",
                        "age": float(30 + n % 50),
                        "sex": ("male", "female")[n % 2],
                        "localization": "back",
                    }
                )
                n += 1
    pd.DataFrame(rows).to_csv(root / "HAM10000_metadata.csv", index=False)
    return root


@pytest.fixture
def ham_dir(tmp_path: Path) -> Path:
    """A valid tiny dataset: 7 classes x 6 lesions x 1-3 images (84 images), 40x30 px."""
    return make_ham_dir(tmp_path / "ham")


@pytest.fixture
def make_ham(tmp_path: Path) -> Callable[..., Path]:
    """Factory for variants of the synthetic dataset (folder layout, lesion counts)."""
    counter = iter(range(1000))

    def factory(**kwargs: object) -> Path:
        return make_ham_dir(tmp_path / f"ham{next(counter)}", **kwargs)

    return factory


@pytest.fixture(autouse=True)
def _rank_zero_after_each_test():
    """Trainers built under faked SLURM/DDP variables set Lightning's process-wide rank; later tests run as rank 0."""
    from lightning_utilities.core.rank_zero import rank_zero_only

    yield
    rank_zero_only.rank = 0


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One 1-epoch baseline run on the synthetic dataset, shared by the app, evaluate and export tests (read-only)."""
    from lesionnet.training import train

    base = tmp_path_factory.mktemp("trained_run")
    out = base / "run"
    train(
        compose_train(
            [f"data.root={make_ham_dir(base / 'ham')}", f"paths.output_dir={out}", "trainer.max_epochs=1", *FAST]
        )
    )
    return out


@pytest.fixture(scope="session")
def trained_run_cc(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """As ``trained_run``, with Shades of Gray colour constancy as the model's first layer."""
    from lesionnet.training import train

    base = tmp_path_factory.mktemp("trained_run_cc")
    out = base / "run"
    overrides = [f"data.root={make_ham_dir(base / 'ham')}", f"paths.output_dir={out}", "trainer.max_epochs=1"]
    train(compose_train([*overrides, *FAST, "data.colour_constancy={method:shades_of_gray,power:6}"]))
    return out


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless Chromium for the browser tests (tests/test_app_browser.py skips the module without it)."""
    from tests.test_app_browser import CHROMIUM, CHROMIUM_ARGS, sync_api

    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Long modules first: pytest-xdist (``--dist loadscope``) hands whole modules to the workers in collection order,
    and a long module picked up last keeps one worker busy while the other idles. Modules with more tests marked
    slow, then more tests, come first (a stable sort: each module's own order is kept)."""
    slow: dict[str, int] = {}
    count: dict[str, int] = {}
    for item in items:
        module = item.nodeid.split("::")[0]
        count[module] = count.get(module, 0) + 1
        slow[module] = slow.get(module, 0) + (item.get_closest_marker("slow") is not None)
    items.sort(key=lambda item: (-slow[item.nodeid.split("::")[0]], -count[item.nodeid.split("::")[0]]))
