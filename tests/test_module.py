"""LesionClassifier: loss options, metrics, optimizer/scheduler from plain config."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from timm.scheduler.scheduler import Scheduler

from lesionnet.module import LesionClassifier, build_metrics

SCHED = {
    "_target_": "timm.scheduler.create_scheduler_v2",
    "_partial_": True,
    "sched": "cosine",
    "num_epochs": 10,
    "warmup_epochs": 0,
    "min_lr": 0.0,
}


def test_hyperparameters_are_plain_data() -> None:
    model = LesionClassifier(class_weights=torch.ones(7), data_config={"input_size": (3, 64, 64)})
    allowed = (str, int, float, bool, type(None), list, dict)

    def check(value: object) -> None:
        assert isinstance(value, allowed), type(value)
        if isinstance(value, dict):
            for v in value.values():
                check(v)
        elif isinstance(value, list):
            for v in value:
                check(v)

    check(dict(model.hparams))


def test_class_weights_change_the_loss() -> None:
    torch.manual_seed(0)
    batch = (torch.randn(8, 3, 64, 64), torch.tensor([0, 0, 0, 0, 0, 0, 4, 4]))
    plain_model = LesionClassifier()
    weighted = LesionClassifier(class_weights=[1, 1, 1, 1, 10, 1, 1])
    weighted.load_state_dict(plain_model.state_dict())
    plain_model.eval(), weighted.eval()
    logits = plain_model(batch[0])
    expected = torch.nn.functional.cross_entropy(logits, batch[1], weight=torch.tensor([1.0, 1, 1, 1, 10, 1, 1]))
    plain_model.log = weighted.log = lambda *a, **k: None  # not attached to a Trainer
    assert weighted._shared_step(batch, "val").item() == pytest.approx(expected.item(), rel=1e-5)
    assert plain_model._shared_step(batch, "val").item() != pytest.approx(expected.item(), rel=1e-3)


def test_wrong_number_of_class_weights_is_rejected() -> None:
    with pytest.raises(ValueError, match="3 class weights for 7 classes"):
        LesionClassifier(class_weights=[1, 2, 3])


def test_timm_scheduler_is_stepped_by_epoch() -> None:
    model = LesionClassifier(scheduler=SCHED)
    conf = model.configure_optimizers()
    optimizer, scheduler = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    assert isinstance(scheduler, Scheduler)
    lr0 = optimizer.param_groups[0]["lr"]
    scheduler.step(epoch=5)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(lr0 / 2, rel=1e-6)  # cosine midpoint


def test_optimizer_skips_frozen_parameters() -> None:
    model = LesionClassifier()
    for p in model.model.features.parameters():
        p.requires_grad_(False)
    optimizer = model.configure_optimizers()
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert not any(id(p) in in_optimizer for p in model.model.features.parameters())
    assert all(id(p) in in_optimizer for p in model.model.classifier.parameters())


def test_metrics_match_hand_computed_values() -> None:
    metrics = build_metrics(["a", "b", "c"], "val")
    probs = torch.tensor([[0.8, 0.1, 0.1], [0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.1, 0.2, 0.7]])
    targets = torch.tensor([0, 1, 1, 2])
    out = metrics(probs, targets)
    assert out["val/acc"].item() == pytest.approx(3 / 4)
    assert out["val/balanced_acc"].item() == pytest.approx((1 + 0.5 + 1) / 3)
    assert out["val/recall_b"].item() == pytest.approx(0.5)


def test_training_metrics_do_not_keep_the_autograd_graph() -> None:
    """AUROC stores every step's probabilities until the epoch ends; with a graph attached, each step's activations
    would stay in memory with them (RSS grew ~17 MB per step on EfficientNet-Lite0)."""
    model = LesionClassifier()
    model.log = lambda *a, **k: None  # not attached to a Trainer
    for _ in range(2):
        model.training_step((torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 2, 3])), 0).backward()
    stored = [getattr(m, name) for m in model.train_metrics.values() for name in m._defaults]
    tensors = [t for s in stored for t in (s if isinstance(s, list) else [s])]
    assert any(t.dim() == 2 for t in tensors)  # the probabilities AUROC keeps are among them
    assert not any(t.requires_grad or t.grad_fn is not None for t in tensors)


def test_logit_adjusted_loss_trains_on_shifted_logits_and_predicts_with_plain_ones() -> None:
    torch.manual_seed(0)
    prior = [0.03, 0.05, 0.11, 0.01, 0.11, 0.67, 0.02]
    images, targets = torch.randn(8, 3, 64, 64), torch.tensor([0, 1, 2, 3, 4, 5, 6, 5])
    model = LesionClassifier(logit_adjust_tau=1.0, class_prior=prior).eval()
    with torch.no_grad():
        logits = model(images)
        loss = model._shared_step((images, targets), "val")
    shifted = torch.nn.functional.cross_entropy(logits + torch.tensor(prior).log(), targets)
    assert loss.item() == pytest.approx(shifted.item(), rel=1e-6)
    assert loss.item() != pytest.approx(torch.nn.functional.cross_entropy(logits, targets).item(), rel=1e-3)
    assert model.hparams.class_prior == prior and model.hparams.logit_adjust_tau == 1.0  # stored in checkpoints


def test_logit_adjustment_refuses_a_missing_prior_and_double_balancing() -> None:
    with pytest.raises(ValueError, match="needs class_prior"):
        LesionClassifier(logit_adjust_tau=1.0)
    with pytest.raises(ValueError, match="correct the imbalance twice"):
        LesionClassifier(logit_adjust_tau=1.0, class_prior=[1 / 7] * 7, class_weights=[1.0] * 7)


def test_mixup_trains_on_soft_targets() -> None:
    torch.manual_seed(0)
    batch = (torch.randn(8, 3, 64, 64), torch.tensor([0, 1, 2, 3, 4, 5, 6, 5]))
    model = LesionClassifier(mixup={"mixup_alpha": 0.4, "cutmix_alpha": 0.0, "prob": 1.0}, label_smoothing=0.1)
    model.eval()  # no dropout: the two passes must see the same network
    np.random.seed(1)  # timm's Mixup draws lambda from numpy's global RNG (seed_everything seeds it in training)
    images, soft = model.mixup_fn(batch[0].clone(), batch[1])  # it mixes in place
    expected = torch.nn.functional.cross_entropy(model(images), soft)
    assert soft.shape == (8, 7) and (soft.max(dim=1).values < 0.96).all()  # mixed and smoothed, not one-hot
    np.random.seed(1)
    assert model._shared_step((batch[0].clone(), batch[1]), "train").item() == pytest.approx(expected.item(), rel=1e-5)
    plain = torch.nn.functional.cross_entropy(model(batch[0]), batch[1], label_smoothing=0.1)
    assert model._shared_step(batch, "val").item() == pytest.approx(plain.item(), rel=1e-5)  # no mixing outside train


def test_distillation_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="needs teachers"):
        LesionClassifier(distill={"weight": 0.5})
    with pytest.raises(ValueError, match=r"weight must be in \(0, 1\]"):
        LesionClassifier(distill={"teachers": ["a.ckpt"], "weight": 2})
