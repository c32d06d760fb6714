"""The plain PyTorch arm's parts: the LightningModule's own network, optimizer, scheduler and loss, driven by a hand
loop (train step, eval pass), and the model alone on one repeated batch."""

from __future__ import annotations

from typing import Any

from .probes import Clock


def build_plain_parts(cfg: Any, datamodule: Any) -> dict[str, Any]:
    """The plain loop's model, optimizer, scheduler and loss settings, built exactly as the LightningModule does."""
    from hydra.utils import instantiate

    from lesionnet.training import build_model

    module = build_model(cfg, datamodule)
    parts = {
        "net": module.model,  # the timm nn.Module with the module's freezing and memory format
        "weight": module.class_weights,
        "label_smoothing": float(module.hparams.label_smoothing),
        "channels_last": bool(module.hparams.channels_last),
    }
    del module  # its torchmetrics are Lightning-side work
    if cfg.model.get("compile"):
        parts["net"].compile()  # in place, as LesionClassifier.configure_model does on the Trainer's side
    optimizer = instantiate(cfg.model.optimizer)(parts["net"])  # as LesionClassifier.configure_optimizers
    scheduler = instantiate(cfg.model.scheduler)(optimizer) if cfg.model.get("scheduler") else None
    if isinstance(scheduler, tuple):
        scheduler = scheduler[0]
    parts.update(optimizer=optimizer, scheduler=scheduler)
    return parts


def plain_train_step(parts: dict[str, Any], images: Any, targets: Any) -> float:
    import torch
    import torch.nn.functional as F

    if parts["channels_last"]:
        images = images.contiguous(memory_format=torch.channels_last)
    loss = F.cross_entropy(
        parts["net"](images), targets, weight=parts["weight"], label_smoothing=parts["label_smoothing"]
    )
    parts["optimizer"].zero_grad(set_to_none=True)
    loss.backward()
    parts["optimizer"].step()
    return loss.item()


def step_scheduler(scheduler: Any, epoch: int) -> None:
    from timm.scheduler.scheduler import Scheduler as TimmScheduler

    if isinstance(scheduler, TimmScheduler):
        scheduler.step(epoch=epoch)
    elif scheduler is not None:
        scheduler.step()


def plain_eval(parts: dict[str, Any], datamodule: Any, batches: int | None) -> tuple[int, float]:
    import torch
    import torch.nn.functional as F

    net = parts["net"]
    net.eval()
    probs, targets, loss_sum = [], [], 0.0
    with torch.no_grad():
        for i, (images, labels) in enumerate(datamodule.val_dataloader()):
            if batches is not None and i >= batches:
                break
            if parts["channels_last"]:
                images = images.contiguous(memory_format=torch.channels_last)
            logits = net(images)
            loss = F.cross_entropy(logits, labels, weight=parts["weight"], label_smoothing=parts["label_smoothing"])
            loss_sum += loss.item() * len(labels)
            probs.append(logits.softmax(dim=-1))
            targets.append(labels)
    probs_t, targets_t = torch.cat(probs), torch.cat(targets)
    accuracy = (probs_t.argmax(dim=1) == targets_t).float().mean().item()
    return len(targets_t), accuracy


def model_only_throughput(cfg: Any, datamodule: Any, warmup: int, steps: int) -> dict[str, Any]:
    """The plain train step on one real batch repeated: the model's speed with the data pipeline taken out."""
    import torch

    parts = build_plain_parts(cfg, datamodule)
    workers = datamodule.num_workers
    datamodule.num_workers = 0
    try:
        images, targets = next(iter(datamodule.train_dataloader()))
    finally:
        datamodule.num_workers = workers
    parts["net"].train()
    clock = Clock(warmup, steps)
    while not clock.done:
        plain_train_step(parts, images, targets)
        clock.step_end(int(images.shape[0]))
    return {**clock.result(), "threads": torch.get_num_threads()}
