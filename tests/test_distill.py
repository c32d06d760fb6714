"""Distillation: teachers predict the student's own augmented views; a teacher that saw the student's held-out
images is refused; the student's provenance carries its teachers' training and validation images."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir

from lesionnet.contract.provenance import ProvenanceError, file_sha256
from lesionnet.data.run_folder import RunFolder
from lesionnet.evaluation.runner import evaluate
from lesionnet.inference import load_member
from lesionnet.training import train
from tests.conftest import CONF, FAST, compose_train, make_ham_dir


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


def other_images(root: Path) -> Path:
    """A synthetic dataset of other pictures under other image and lesion ids than ``make_ham_dir``'s."""
    make_ham_dir(root, seed=1)
    metadata = pd.read_csv(root / "HAM10000_metadata.csv")
    for image_id in metadata["image_id"]:
        (root / "images" / f"{image_id}.jpg").rename(root / "images" / f"{image_id.replace('ISIC_', 'STU_')}.jpg")
    metadata["image_id"] = metadata["image_id"].str.replace("ISIC_", "STU_")
    metadata["lesion_id"] = metadata["lesion_id"].str.replace("HAM_", "STU_")
    metadata.to_csv(root / "HAM10000_metadata.csv", index=False)
    return root


def test_a_distilled_students_provenance_includes_its_teachers_training_images(
    trained_run: Path, tmp_path: Path
) -> None:
    student = tmp_path / "student"
    overrides = [f"data.root={other_images(tmp_path / 'other')}", f"paths.output_dir={student}", "test=false"]
    train(compose_train([*overrides, "trainer.max_epochs=1", *FAST, f"+model.distill={{teachers: [{trained_run}]}}"]))
    teacher = load_member(RunFolder(trained_run).best_checkpoint())
    record = load_member(RunFolder(student).best_checkpoint()).provenance
    assert teacher.provenance is not None and record is not None
    split = dict(zip(record.image_id, record.split, strict=True))
    taught = dict(zip(teacher.provenance.image_id, teacher.provenance.split, strict=True))
    assert {i: split.get(i) for i in taught} == taught and set(taught.values()) == {"train", "val"}
    own = pd.read_csv(student / "split.csv").query("split != 'test'")
    assert set(split) == set(taught) | set(own["image_id"]) and len(split) == len(record.image_id)
    assert record.counts == {s: n + (own["split"] == s).sum() for s, n in teacher.provenance.counts.items()}
    assert record.teachers == [
        {
            "sha256": file_sha256(teacher.path),
            "counts": teacher.provenance.counts,
            "table_sha256": teacher.provenance.table_sha256,
        }
    ]
    # evaluate.py refuses, for the student, an external set of its teacher's training images under new names
    trained = pd.read_csv(trained_run / "split.csv").query("split == 'train'").head(6)
    (tmp_path / "external").mkdir()
    for k, row in enumerate(trained.itertuples()):
        image = trained_run.parent / "ham" / "images" / f"{row.image_id}.jpg"
        (tmp_path / "external" / f"holiday_{k}.jpg").write_bytes(image.read_bytes())
    labels = pd.DataFrame({"image_id": [f"holiday_{k}" for k in range(len(trained))], "dx": trained["dx"]})
    labels.to_csv(tmp_path / "external.csv", index=False)
    overrides = [f"ckpt={student}", f"data.images={tmp_path / 'external'}", f"data.labels={tmp_path / 'external.csv'}"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("eval", overrides=[*overrides, f"paths.output_dir={tmp_path / 'eval'}", "data.num_workers=0"])
    with pytest.raises(ProvenanceError, match=r"was trained or validated on 6 image.*same file content: 6"):
        evaluate(cfg)
