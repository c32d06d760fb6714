"""scripts/choose_recipe.py: issue 21's rule for the default recipe, on validation + the external set only."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT
from tests.test_ood import load_script

choose_recipe = load_script(REPO_ROOT / "scripts" / "choose_recipe.py")


@dataclass(frozen=True)
class Seed:
    """What the rule reads of a scored run: validation and the external set (the test split is not an input)."""

    run: Path
    val_balanced_accuracy: float
    external_score: float


def runs(*seeds: tuple[float, float]) -> list[Seed]:
    return [Seed(Path(f"run{i}"), val, ext) for i, (val, ext) in enumerate(seeds)]


def test_the_best_external_score_among_recipes_that_hold_validation_wins() -> None:
    by_recipe = {
        "today": runs((0.67, 1.27), (0.67, 1.28)),
        "better_outside": runs((0.665, 1.33), (0.665, 1.35)),  # within the 0.01 tolerance
        "best_inside": runs((0.70, 1.30), (0.70, 1.30)),  # validation only gates; the external set ranks
    }
    winner, shipped = choose_recipe.choose(by_recipe, "today", 0.01)
    assert winner == "better_outside" and shipped.run == Path("run1")


def test_a_recipe_that_loses_validation_is_not_eligible_however_it_does_outside() -> None:
    by_recipe = {"today": runs((0.70, 1.20)), "worse_inside": runs((0.68, 1.50))}
    assert choose_recipe.choose(by_recipe, "today", 0.01)[0] == "today"


def test_the_shipped_seed_is_the_best_by_validation_plus_external() -> None:
    by_recipe = {"today": runs((0.70, 1.20), (0.69, 1.30))}
    assert choose_recipe.choose(by_recipe, "today", 0.01)[1].run == Path("run1")


def test_without_the_baseline_recipe_the_error_names_the_flag() -> None:
    with pytest.raises(SystemExit, match="--baseline"):
        choose_recipe.choose({"other": runs((0.7, 1.2))}, "today", 0.01)


def test_a_pair_without_an_equals_sign_says_how_to_give_it() -> None:
    with pytest.raises(SystemExit, match="<train run folder>=<evaluate.py folder>"):
        choose_recipe.scored_run("logs/train/runs/x", "derm7pt")
