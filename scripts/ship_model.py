"""Write the model that ships in the repository (``models/lite0-ham10000``, served by ``lesionnet serve`` with no ckpt).

    python scripts/ship_model.py --run logs/train/runs/<run> [--out models/lite0-ham10000]

Steps, each a command of the project (printed as it runs):
1. the run's best checkpoint in float16 with its provenance bound again (``half_precision_checkpoint``), its
   split.csv and metrics.json beside it (a run folder, so the model card knows its training data);
2. ``evaluate.py`` on that very file: the internal test split and Derm7pt (``external=[derm7pt]``) -> scores.json;
3. ``bench/image_type_eval.py``: the three gates fitted for that file (confidence, familiarity, image type), chosen on
   validation and the "choose" halves -> gates/, and its figures -> gates/image_type_eval.json;
4. MODEL_CARD.md from scores.json and those figures (nothing typed by hand).
The folder must stay under 25 MB (checked at the end).
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd

from lesionnet.contract.scores import read_scores
from lesionnet.data.metadata import embedded_sample_root
from lesionnet.data.run_folder import RunFolder
from lesionnet.inference.checkpoints import half_precision_checkpoint

MAX_BYTES = 25 * 2**20


def run(command: list[str]) -> None:
    print("+", shlex.join(command), flush=True)
    subprocess.run(command, check=True)


def interval(figure: float | None, ci: tuple[float | None, float | None] | None, fmt: str = ".1%") -> str:
    """'81.1% (95% CI 78.7-83.5%)' from a figure and its scores.json interval."""
    if figure is None:
        return "n/a"
    if ci is None or ci[0] is None or ci[1] is None:
        return f"{figure:{fmt}}"
    return f"{figure:{fmt}} (95% CI {ci[0]:{fmt}}-{ci[1]:{fmt}})"


def model_card(folder: Path, source_run: Path, gates: dict) -> str:
    scores = read_scores(folder / "scores.json")
    row = scores.final_scores
    metrics = RunFolder(folder).metrics()
    lines = [
        "# LesionNet shipped model: EfficientNet-Lite0, HAM10000",
        "",
        "Research software, not a medical device: it does not give a diagnosis.",
        "",
        f"- Weights: `checkpoints/model.ckpt`, float16 copy of `{source_run}` (recipe "
        f"`{metrics.config.get('experiment_name') or metrics.config.get('task_name')}`), written by "
        "`scripts/ship_model.py`.",
        f"- Training data: HAM10000 (Tschandl et al. 2018), split by lesion: {json.dumps(metrics.split_images)} images "
        "(`split.csv`).",
        "- Licence: HAM10000 is CC BY-NC 4.0, so these weights are for **non-commercial use** only; cite the dataset.",
        "",
        f"## Figures (`scores.json`, evaluate.py on `{scores.evaluated}`, {scores.n_images} images)",
        "",
        "| set | accuracy | balanced accuracy | melanoma AUROC | melanoma sensitivity / specificity at the val "
        "threshold |",
        "|---|---|---|---|---|",
    ]
    sets = [("internal test split (lesion bootstrap)", row)]
    sets += [(f"{ext.name} (image bootstrap)", ext.scores[scores.final]) for ext in scores.external if ext.scores]
    for name, figures in sets:
        assert figures is not None
        at = figures.at_val_threshold
        auroc = figures.melanoma.auroc if figures.melanoma is not None else None
        operating = f"{at.sensitivity:.3f} / {at.specificity:.3f}" if at and at.sensitivity is not None else "n/a"
        lines.append(
            f"| {name} | {interval(figures.accuracy, figures.ci95.get('accuracy'))} | "
            f"{interval(figures.balanced_accuracy, figures.ci95.get('balanced_accuracy'))} | "
            f"{interval(auroc, figures.ci95.get('mel_auroc'), '.3f')} | {operating} |"
        )
    q1 = gates["question1"]["report"]
    q2 = gates["question2"]["report"]
    lines += [
        "",
        "## The app's two questions (`gates/`, `bench/image_type_eval.py`; report halves, Wilson 95% intervals)",
        "",
        "| question 1: is this a dermatoscope image? | share |",
        "|---|---|",
        *[f"| {name} | {fmt(r)} |" for name, r in q1.items()],
        "",
        f"Question 2 (familiarity flag at the {gates['question2']['chosen_quantile']} quantile of validation):",
        "",
        "| set | answered with a class | flagged | unsure | refused | melanomas sent to a doctor |",
        "|---|---|---|---|---|---|",
        *[
            f"| {name} | {fmt(r['answered'])} | {fmt(r['flagged'])} | {fmt(r['unsure'])} | {fmt(r['refused'])} | "
            f"{fmt(r['melanomas_sent_to_doctor']) if r['melanomas_sent_to_doctor'] else '-'} |"
            for name, r in q2.items()
        ],
    ]
    return "\n".join(lines) + "\n"


def fmt(r: dict) -> str:
    return f"{r['k']}/{r['n']} ({r['share']:.1%}; {r['wilson95'][0]:.1%}-{r['wilson95'][1]:.1%})"


def sample_test_predictions(out: Path, eval_dir: Path) -> Path:
    """evaluate.py's rows for the test-split images that the embedded sample also holds: a clean clone (no data)
    checks that the app answers them as evaluate.py scored them (tests/test_shipped.py)."""
    sample = {p.stem for p in (embedded_sample_root() / "images").glob("*.jpg")}
    test = set(RunFolder(out).split_ids("test"))
    (predictions,) = eval_dir.glob("predictions_*.csv")
    table = pd.read_csv(predictions)
    rows = table[table["image"].isin(sample & test)].sort_values("image").head(5)
    if rows.empty:
        raise SystemExit("No test-split image of this run is in the embedded sample: the clean-clone check has none.")
    path = out / "test_sample_predictions.csv"
    rows.to_csv(path, index=False)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path("models/lite0-ham10000"))
    parser.add_argument("--data-root", type=Path, default=Path("../shared/data/ham10000_200x150"))
    args = parser.parse_args(argv)
    source = RunFolder(args.run)
    out = args.out
    half_precision_checkpoint(source.best_checkpoint(), out / "checkpoints" / "model.ckpt")
    for name in ("split.csv", "metrics.json"):
        shutil.copyfile(source.path / name, out / name)
    python = sys.executable
    eval_dir = Path("logs/eval/runs") / f"shipped_{out.name}"
    run(
        [
            python,
            "evaluate.py",
            f"ckpt={out}",
            "external=[derm7pt]",
            f"data.root={args.data_root}",
            f"hydra.run.dir={eval_dir}",
        ]
    )
    shutil.copyfile(eval_dir / "scores.json", out / "scores.json")
    run(
        [
            python,
            "bench/image_type_eval.py",
            "--run",
            str(out),
            "--scores",
            str(out / "scores.json"),
            "--data-root",
            str(args.data_root),
            "--json",
            str(out / "gates" / "image_type_eval.json"),
            "--gate-out",
            str(out / "gates"),
            "--cache",
            str(eval_dir / "features.npz"),
        ]
    )
    gates = json.loads((out / "gates" / "image_type_eval.json").read_text())
    sample_test_predictions(out, eval_dir)
    (out / "MODEL_CARD.md").write_text(model_card(out, args.run, gates))
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"{out}: {size / 2**20:.1f} MB")
    if size > MAX_BYTES:
        raise SystemExit(f"{out} holds {size / 2**20:.1f} MB, more than {MAX_BYTES / 2**20:.0f} MB.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
