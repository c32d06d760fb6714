"""Question 1 of the app, "is this a dermatoscope image?": the logistic gate, its out-of-fold threshold, its file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lesionnet.contract.files import ContractError
from lesionnet.inference.decision.image_type import (
    ImageTypeGate,
    fit_image_type,
    fit_logistic,
    image_type_logits,
    logit,
    out_of_fold_logits,
)


def two_kinds(n_pos: int = 300, n_neg: int = 60, dim: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Positives and negatives whose feature directions differ (the gate reads L2-normalised features)."""
    rng = np.random.default_rng(seed)
    centre = np.zeros(dim)
    centre[0] = 3.0
    positives = rng.normal(size=(n_pos, dim)) + centre
    negatives = rng.normal(size=(n_neg, dim)) - centre
    return np.vstack([positives, negatives]), np.array([1] * n_pos + [0] * n_neg)


def test_the_logistic_gate_separates_two_kinds_and_scores_with_one_torch_function() -> None:
    x, y = two_kinds()
    weights, bias = fit_logistic(x, y, l2=1e-3)
    scores = logit(x, weights, bias)
    assert (scores[y == 1] > 0).mean() > 0.97 and (scores[y == 0] < 0).mean() > 0.97
    in_float32 = image_type_logits(
        torch.from_numpy(x).float(), torch.from_numpy(weights).float(), torch.tensor(bias, dtype=torch.float32)
    )
    np.testing.assert_allclose(in_float32.numpy(), scores, atol=1e-4)


def test_the_gate_needs_both_kinds_of_image() -> None:
    x, _ = two_kinds()
    with pytest.raises(ValueError, match="both dermatoscope images"):
        fit_logistic(x, np.ones(len(x)))


def test_the_threshold_lets_the_chosen_share_of_dermatoscope_images_through_out_of_fold() -> None:
    x, y = two_kinds(n_pos=400, n_neg=80, seed=1)
    groups = [str(k // 2) for k in range(len(y))]  # pairs of images share a group: a fold holds both
    gate = fit_image_type(x, y, groups, model_version="m", tta="none", pass_rate=0.95, l2=1e-2)
    oof = out_of_fold_logits(x, y, groups, l2=1e-2)
    assert np.mean(oof[y == 1] >= gate.threshold) == pytest.approx(0.95, abs=0.01)
    assert gate.fit["positives"] == 400 and gate.fit["negatives"] == 80
    new_x, new_y = two_kinds(n_pos=400, n_neg=80, seed=2)  # new images of both kinds
    assert (~gate.refuses(new_x[new_y == 1])).mean() > 0.9 and gate.refuses(new_x[new_y == 0]).mean() > 0.9


def test_a_gate_file_round_trips_and_is_refused_for_another_model_or_tta(tmp_path: Path) -> None:
    x, y = two_kinds()
    gate = fit_image_type(x, y, [str(k) for k in range(len(y))], model_version="lite0@abc", tta="none")
    path = gate.save(tmp_path / "image_type_gate.json")
    loaded = ImageTypeGate.load(path, "lite0@abc", "none")
    np.testing.assert_allclose(loaded.score(x), gate.score(x), atol=1e-5)  # weights stored as float32
    assert loaded.threshold == gate.threshold
    with pytest.raises(ContractError, match="fitted for model lite0@abc"):
        ImageTypeGate.load(path, "lite0@other", "none")
    with pytest.raises(ContractError, match="tta=none"):
        ImageTypeGate.load(path, "lite0@abc", "flips")
