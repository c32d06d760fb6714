"""Choose the default recipe by issue 21's rule, from evaluate.py's scores files (nothing typed by hand).

    python scripts/choose_recipe.py logs/train/runs/<run>=logs/eval/runs/<eval> ... [--baseline cpu_lite0_all]

Each argument pairs a train.py run folder with the evaluate.py folder that scored it (``'external=[derm7pt]'
posthoc_logit_adjustment=true``); the scored checkpoint must be the run's best one (sha256). Runs are grouped by their
recipe (``task_name``) and averaged over seeds. The rule (docs/RESULTS.md, written before the last seeds finished):

- eligible: seed-mean validation balanced accuracy (plain row) not below the baseline recipe's by more than
  ``--tolerance``;
- winner: the eligible recipe with the highest seed-mean external melanoma AUROC + external balanced accuracy (plain);
- shipped seed: the winner's run with the highest validation balanced accuracy + external AUROC + balanced accuracy.

The internal test split plays no part; its columns are printed for the record only.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

from lesionnet.contract.files import ContractError
from lesionnet.contract.provenance import file_sha256
from lesionnet.contract.scores import POSTHOC_LA, ScoresRow, read_scores, scores_for
from lesionnet.data.run_folder import RunFolder


@dataclass(frozen=True)
class ScoredRun:
    """One seed of one recipe: its plain row (internal and external) and its external post-hoc logit-adjusted row."""

    run: Path
    recipe: str
    seed: int
    plain: ScoresRow
    external_plain: ScoresRow
    external_adjusted: ScoresRow | None

    @property
    def val_balanced_accuracy(self) -> float:
        assert self.plain.validation is not None
        return self.plain.validation.balanced_accuracy

    @property
    def external_score(self) -> float:
        """External melanoma AUROC + external balanced accuracy (plain): what the rule ranks by."""
        return _auroc(self.external_plain) + _balanced(self.external_plain)


def _auroc(row: ScoresRow) -> float:
    if row.melanoma is None or row.melanoma.auroc is None:
        raise SystemExit("A scored row has no melanoma AUROC: score a set with melanomas (external=[derm7pt]).")
    return row.melanoma.auroc


def _balanced(row: ScoresRow) -> float:
    if row.balanced_accuracy is None:
        raise SystemExit("A scored row has no balanced accuracy: score a labelled set.")
    return row.balanced_accuracy


def _at_val_threshold(row: ScoresRow) -> tuple[float, float]:
    """Melanoma (sensitivity, specificity) at the threshold chosen on validation."""
    point = row.melanoma.val_threshold if row.melanoma is not None else None
    if point is None or point.sensitivity is None or point.specificity is None:
        raise SystemExit("A scored row has no melanoma validation threshold: evaluate with a validation split.")
    return point.sensitivity, point.specificity


def scored_run(pair: str, external: str) -> ScoredRun:
    """A ``run=eval`` pair read and checked: the scores must be of the run's best checkpoint."""
    run_path, sep, eval_path = pair.partition("=")
    if not sep:
        raise SystemExit(f"{pair!r}: give each run as <train run folder>=<evaluate.py folder>.")
    run = RunFolder(run_path)
    path = Path(eval_path) / "scores.json"
    scores = read_scores(path)
    best = [file_sha256(run.best_checkpoint())]
    try:  # the rows of exactly this checkpoint, unedited (their digests), without TTA
        plain_name, plain, _ = scores_for(scores, path, best, tta="none")
        adjusted_name: str | None = None
        if plain_name + POSTHOC_LA in (scores.scores or {}):
            adjusted_name, _, _ = scores_for(scores, path, best, tta="none", logit_adjusted=True)
    except ContractError as err:
        raise SystemExit(f"{err} (run {run.path})") from err
    sets = [ext for ext in scores.external if ext.name == external and ext.scores]
    if not sets:
        raise SystemExit(f"{path} has no labelled '{external}' set: evaluate with 'external=[{external}]'.")
    external_rows = sets[0].scores
    assert external_rows is not None
    external_adjusted = external_rows[adjusted_name] if adjusted_name is not None else None
    config = run.metrics().config
    return ScoredRun(
        run=run.path,
        recipe=str(config.get("task_name")),
        seed=int(config.get("seed", -1)),
        plain=plain,
        external_plain=external_rows[plain_name],
        external_adjusted=external_adjusted,
    )


def mean(values: list[float]) -> float:
    return statistics.fmean(values)


def recipe_table(by_recipe: dict[str, list[ScoredRun]], external: str) -> list[str]:
    lines = [
        f"| recipe (seeds) | val bal. acc | {external} mel AUROC | {external} bal. acc (+ post-hoc LA) | "
        f"{external} mel sens / spec at the val threshold | rule score | test bal. acc (record only) |",
        "|---|---|---|---|---|---|---|",
    ]
    for recipe, runs in sorted(by_recipe.items()):
        adjusted = [r.external_adjusted for r in runs if r.external_adjusted is not None]
        la = f" ({mean([_balanced(r) for r in adjusted]):.3f})" if len(adjusted) == len(runs) else ""
        operating = [_at_val_threshold(r.external_plain) for r in runs]
        seeds = ", ".join(str(r.seed) for r in runs)
        lines.append(
            f"| `{recipe}` ({seeds}) | {mean([r.val_balanced_accuracy for r in runs]):.3f} | "
            f"{mean([_auroc(r.external_plain) for r in runs]):.3f} | "
            f"{mean([_balanced(r.external_plain) for r in runs]):.3f}{la} | "
            f"{mean([o[0] for o in operating]):.3f} / {mean([o[1] for o in operating]):.3f} | "
            f"{mean([r.external_score for r in runs]):.3f} | {mean([_balanced(r.plain) for r in runs]):.3f} |"
        )
    return lines


def choose(by_recipe: dict[str, list[ScoredRun]], baseline: str, tolerance: float) -> tuple[str, ScoredRun]:
    """(winning recipe, its seed to ship) by the rule in the module doc."""
    if baseline not in by_recipe:
        raise SystemExit(f"No run of the baseline recipe '{baseline}' was given: pass one, or --baseline.")
    floor = mean([r.val_balanced_accuracy for r in by_recipe[baseline]]) - tolerance
    eligible = {k: v for k, v in by_recipe.items() if mean([r.val_balanced_accuracy for r in v]) >= floor}
    winner = max(eligible, key=lambda k: mean([r.external_score for r in eligible[k]]))
    shipped = max(eligible[winner], key=lambda r: r.val_balanced_accuracy + r.external_score)
    return winner, shipped


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pairs", nargs="+", help="<train run folder>=<evaluate.py folder>")
    parser.add_argument("--baseline", default="cpu_lite0_all", help="today's recipe: the validation floor")
    parser.add_argument("--tolerance", type=float, default=0.01)
    parser.add_argument("--external", default="derm7pt", help="the external development set's name")
    args = parser.parse_args(argv)
    by_recipe: dict[str, list[ScoredRun]] = {}
    for pair in args.pairs:
        scored = scored_run(pair, args.external)
        by_recipe.setdefault(scored.recipe, []).append(scored)
    for runs in by_recipe.values():
        runs.sort(key=lambda r: r.seed)
    print("\n".join(recipe_table(by_recipe, args.external)))
    winner, shipped = choose(by_recipe, args.baseline, args.tolerance)
    print(f"\nwinner: {winner} (seeds {[r.seed for r in by_recipe[winner]]}); ship: {shipped.run}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
