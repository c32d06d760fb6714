"""Fine-tuning policies: the seed's cut points, and frozen parts that are truly frozen in Lightning training."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import timm
import torch
from torch.utils.data import DataLoader, TensorDataset

import lesionnet  # noqa: F401
from lesionnet.finetune import apply_finetune, trainable_parameter_names
from lesionnet.module import LesionClassifier

SEED_CUTS = [  # (timm model, cut module from lesionnet/conf/model, first trainable parameter, last frozen parameter)
    ("vgg16", "features.24", "features.24.weight", "features.21.bias"),
    ("inception_v3", "Mixed_7b", "Mixed_7b.branch1x1.conv.weight", "Mixed_7a.branch7x7x3_4.bn.bias"),
    ("inception_resnet_v2", "repeat_2", "repeat_2.0.branch0.conv.weight", "mixed_7a.branch2.2.bn.bias"),
    (
        "densenet201",
        "features.denseblock4",
        "features.denseblock4.denselayer1.norm1.weight",
        "features.transition3.conv.weight",
    ),
]


@pytest.mark.parametrize("name, cut, first_trainable, last_frozen", SEED_CUTS, ids=[c[0] for c in SEED_CUTS])
def test_partial_policy_trains_from_the_seed_cut_point(
    name: str, cut: str, first_trainable: str, last_frozen: str
) -> None:
    model = timm.create_model(name, pretrained=False, num_classes=7)
    trainable = trainable_parameter_names(model, "partial", cut)
    names = [n for n, _ in model.named_parameters()]
    assert names[names.index(first_trainable) - 1] == last_frozen
    assert first_trainable in trainable and last_frozen not in trainable
    assert set(names[names.index(first_trainable) :]) == trainable  # everything after the cut, head included


def test_cut_prefix_matches_whole_module_names_only() -> None:
    model = timm.create_model("vgg16", pretrained=False, num_classes=7)
    assert "features.24.weight" not in trainable_parameter_names(model, "partial", "features.28")
    assert "features.2.weight" not in trainable_parameter_names(model, "partial", "features.24")


def test_head_policy_trains_only_the_classifier() -> None:
    model = timm.create_model("densenet201", pretrained=False, num_classes=7)
    assert trainable_parameter_names(model, "head") == {"classifier.weight", "classifier.bias"}


def test_unknown_cut_and_policy_are_clear_errors() -> None:
    model = timm.create_model("lesionnet_baseline_bn", num_classes=7)
    with pytest.raises(ValueError, match="unfreeze_from='blocks.9' matches no parameter"):
        apply_finetune(model, "partial", "blocks.9")
    with pytest.raises(ValueError, match="Unknown fine-tuning policy 'some'"):
        apply_finetune(model, "some")
    with pytest.raises(ValueError, match="needs model.finetune.unfreeze_from"):
        apply_finetune(model, "partial")


def _bn_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items() if "running_" in k}


def _fit_a_few_steps(model: L.LightningModule, size: int) -> None:
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(24, 3, size, size) * 2 + 1, torch.arange(24) % 7)
    trainer = L.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=1,
    )
    trainer.fit(model, DataLoader(data, batch_size=8), DataLoader(data, batch_size=8))


CASES = [  # (backbone, cut, input size): one plain-BN net, one BatchNormAct net (timm), one of the seed's nets
    ("lesionnet_baseline_bn", "features.2", 32),
    ("tf_efficientnet_lite0", "blocks.5", 32),
    ("densenet201", "features.denseblock4", 32),
]


@pytest.mark.parametrize("backbone, cut, size", CASES, ids=[c[0] for c in CASES])
def test_frozen_part_is_bit_identical_after_training_and_validation(backbone: str, cut: str, size: int) -> None:
    model = LesionClassifier(backbone=backbone, finetune={"policy": "partial", "unfreeze_from": cut})
    frozen_names = set(model.frozen_modules)
    assert frozen_names, "partial policy froze nothing"
    before = copy.deepcopy(model.model.state_dict())
    _fit_a_few_steps(model, size)
    after = model.model.state_dict()
    frozen_keys = [k for k in before if any(k.startswith(f + ".") for f in frozen_names)]
    trainable_bn = [k for k in before if "running_mean" in k and k not in frozen_keys]
    assert any("running_mean" in k for k in frozen_keys)  # there are frozen BatchNorms to check
    for key in frozen_keys:  # weights, BN affine params and BN running stats
        assert torch.equal(before[key], after[key]), f"frozen {key} changed"
    assert trainable_bn and all(not torch.equal(before[k], after[k]) for k in trainable_bn)
    assert all(
        not torch.equal(before[k], after[k])
        for k in before
        if k.startswith("classifier.weight") or k.startswith("head.fc.weight")
    )


@pytest.mark.parametrize("backbone", ["lesionnet_baseline_bn", "tf_efficientnet_lite0"])
def test_frozen_features_are_the_same_in_train_and_eval_mode(backbone: str) -> None:
    model = LesionClassifier(backbone=backbone, finetune={"policy": "head"})
    x = torch.randn(4, 3, 32, 32)
    model.train()
    with torch.no_grad():
        train_out = model.model.forward_features(x)
    model.eval()
    with torch.no_grad():
        eval_out = model.model.forward_features(x)
    assert torch.equal(train_out, eval_out)
    # every BatchNorm became a frozen (buffer-only) one
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.model.modules())


def test_naive_requires_grad_freezing_would_fail_the_check() -> None:
    """Control: the seed's pitfall (frozen weights, live BatchNorm) is what the test above detects."""
    model = LesionClassifier(backbone="lesionnet_baseline_bn")
    for p in model.model.features[:2].parameters():
        p.requires_grad_(False)
    before = _bn_state(model.model.features[:2])
    _fit_a_few_steps(model, 32)
    after = _bn_state(model.model.features[:2])
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_frozen_parameters_get_no_gradient_and_no_optimizer_slot() -> None:
    model = LesionClassifier(
        backbone="tf_efficientnet_lite0", finetune={"policy": "partial", "unfreeze_from": "blocks.5"}
    )
    model.model(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer = model.configure_optimizers()
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    for name, p in model.model.named_parameters():
        trainable = name.startswith(("blocks.5", "blocks.6", "conv_head", "bn2", "classifier"))
        assert p.requires_grad == trainable, name
        assert (id(p) in in_optimizer) == trainable, name
        assert (p.grad is not None) == trainable, name
