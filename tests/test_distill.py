"""Distillation: teachers predict the student's own augmented views; a teacher that saw the student's held-out
images is refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from lesionnet.data.run_folder import RunFolder
from lesionnet.training import train
from tests.conftest import FAST, compose_train, make_ham_dir


def test_student_trains_with_a_teacher_of_the_same_split(trained_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "student"
    train(
        compose_train(
            [
                f"data.root={make_ham_dir(tmp_path / 'ham')}",  # the same synthetic images and split as the teacher's
                f"paths.output_dir={out}",
                "trainer.max_epochs=1",
                "test=false",
                *FAST,
                f"+model.distill={{teachers: [{trained_run}], weight: 0.5, temperature: 2.0}}",
            ]
        )
    )
    metrics = RunFolder(out).metrics()
    assert metrics.config["model"]["distill"]["teachers"] == [str(trained_run)]
    assert metrics.val["val/loss"] > 0


def test_a_teacher_trained_on_the_students_held_out_images_is_refused(trained_run: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="trained on .* of the student's validation/test images"):
        train(
            compose_train(
                [
                    f"data.root={make_ham_dir(tmp_path / 'ham')}",
                    "data.split_seed=7",  # another split of the same images
                    f"paths.output_dir={tmp_path / 'student'}",
                    "trainer.max_epochs=1",
                    "test=false",
                    *FAST,
                    f"+model.distill={{teachers: [{trained_run}]}}",
                ]
            )
        )
