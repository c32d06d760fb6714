"""Fine-tuning policies that really freeze: no gradients, no optimizer state, no BatchNorm statistics.

The seed's Keras models "froze" layers whose BatchNorm still normalised with (and updated from) the
batch statistics of skin-lesion batches, silently drifting away from the ImageNet statistics the
frozen weights were trained with. Here every frozen part goes through ``timm.utils.freeze``, which
sets ``requires_grad=False`` and converts its BatchNorm layers to ``FrozenBatchNorm2d``: running
statistics become constant buffers used in training and evaluation alike, whatever Lightning's
train/eval switches do.
"""

from __future__ import annotations

from collections.abc import Iterable

from timm.utils import freeze
from torch import nn

POLICIES: tuple[str, ...] = ("all", "partial", "head")


def _under(name: str, prefix: str) -> bool:
    """True if parameter/module ``name`` is ``prefix`` or lies inside it (``features.2`` is not ``features.24``)."""
    return name == prefix or name.startswith(prefix + ".")


def classifier_parameter_names(model: nn.Module) -> set[str]:
    """Names of the parameters of the timm model's classifier (``get_classifier()``)."""
    # timm models define get_classifier; nn.Module's __getattr__ types any attribute as Tensor | Module
    classifier: nn.Module = model.get_classifier()  # type: ignore[operator]
    ids = {id(p) for p in classifier.parameters()}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def trainable_parameter_names(model: nn.Module, policy: str, unfreeze_from: str | None = None) -> set[str]:
    """Which parameters a policy trains: ``all``; ``head`` = classifier only; ``partial`` = from the cut on.

    The cut is the first parameter under module ``unfreeze_from``; it and every parameter registered
    after it (later blocks, final norm, classifier) train. Registration order is forward order in
    the timm CNNs used here.
    """
    if policy not in POLICIES:
        raise ValueError(f"Unknown fine-tuning policy '{policy}'; use one of {list(POLICIES)} (finetune=...).")
    names = [n for n, _ in model.named_parameters()]
    if policy == "all":
        return set(names)
    head = classifier_parameter_names(model)
    if policy == "head":
        return head
    if not unfreeze_from:
        raise ValueError("finetune=partial needs model.finetune.unfreeze_from (the first module to train).")
    cut = next((i for i, n in enumerate(names) if _under(n, unfreeze_from)), None)
    if cut is None:
        top = list(dict.fromkeys(n.rsplit(".", 2)[0] for n in names))
        raise ValueError(
            f"model.finetune.unfreeze_from='{unfreeze_from}' matches no parameter of {type(model).__name__}. "
            f"Module names look like: {top[:8]} ... {top[-4:]}"
        )
    return set(names[cut:]) | head


def _modules_to_freeze(model: nn.Module, trainable: set[str]) -> list[str]:
    """The largest submodules whose parameters are all frozen (so their BatchNorms are converted too)."""
    chosen: list[str] = []
    for name, module in model.named_modules():
        if not name or any(_under(name, c) for c in chosen):
            continue
        params = [f"{name}.{p}" for p, _ in module.named_parameters()]
        if params and not any(p in trainable for p in params):
            chosen.append(name)
    return chosen


def apply_finetune(model: nn.Module, policy: str = "all", unfreeze_from: str | None = None) -> list[str]:
    """Freeze ``model`` in place according to ``policy``; returns the names of the frozen submodules."""
    trainable = trainable_parameter_names(model, policy, unfreeze_from)
    if policy == "all":
        return []
    frozen = _modules_to_freeze(model, trainable)
    if frozen:
        freeze(model, frozen)
    # Parameters owned directly by a partly trainable module (rare in CNNs) are frozen individually.
    for name, param in model.named_parameters():
        if name not in trainable:
            param.requires_grad_(False)
    return frozen


def count_parameters(params: Iterable[nn.Parameter]) -> int:
    return sum(p.numel() for p in params)
