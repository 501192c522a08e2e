"""Optimiser, schedule and the one-batch update of the paper, free of any runtime.

Two recipes (``RECIPES``): ``cvar-sam``, the paper's (CVaR + AUC loss, SAM over AdamW, cosine
schedule); and ``dnf-reference``, the DNF reference's classifier training (BCE, Adam, no
SAM, horizontal flips, ``PlateauStop``: the learning rate cut tenfold when validation
accuracy stops improving, training over when it would fall below 1e-6).

``training_step`` is the whole update for one batch (one or two passes, depending on
SAM) and is what both the single-process loop here and the Ray Train worker loop in
``jobs/train.py`` call: the distributed job only supplies a ``gather`` that turns the
local logits and labels into the global batch's, and a ``first_pass_context`` (DDP's
``no_sync``) when pass one should skip the gradient all-reduce. ``fit`` is a small
single-process trainer on in-memory features, used by tests, benchmarks and the demo.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass
from typing import Callable, ContextManager

import numpy as np
import torch
from torch import nn

from detector_core.method.losses import detector_loss
from detector_core.method.sam import SAM, bn_stats_frozen

__all__ = ["RECIPES", "RECIPE_OPTIM", "OptimConfig", "PlateauStop", "all_gather_batch", "batch_loss", "build_optimizer", "build_scheduler",
           "random_hflip", "training_step", "predict_logits", "fit"]

RECIPES = ("cvar-sam", "dnf-reference")
# What each recipe sets of OptimConfig (cvar-sam: its defaults). dnf-reference: the reference's
# Trainer -- BCEWithLogits, Adam(lr 1e-4, betas (0.9, 0.999)), no weight decay, batch 64.
RECIPE_OPTIM = {"cvar-sam": {}, "dnf-reference": {"loss": "erm", "sam": False, "optimizer": "adam", "lr": 1e-4, "weight_decay": 0.0, "batch_size": 64}}


@dataclass
class OptimConfig:
    """Loss and optimiser hyperparameters; defaults are the paper's (docs/method.md sections 3-4)."""

    loss: str = "cvar_auc"
    alpha: float = 0.8
    gamma: float = 0.1  # the reference's documented run (docs/method.md section 3)
    eta: float = 0.6
    p: float = 2.0
    sam: bool = True
    rho: float = 0.05
    adaptive: bool = False
    lr: float = 1e-3
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.999
    epochs: int = 32
    batch_size: int = 2048
    eta_min: float = 1e-5
    optimizer: str = "adamw"  # or "adam" (the DNF reference's: weight decay as L2 in the gradient, 0 there)

    def to_dict(self) -> dict:
        return asdict(self)


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW (or Adam, ``cfg.optimizer``), wrapped in SAM when ``cfg.sam``."""
    if cfg.optimizer not in ("adamw", "adam"):
        raise ValueError(f"optimizer must be adamw or adam, got {cfg.optimizer!r}")
    base = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)
    if cfg.sam:
        return SAM(model.parameters(), base, rho=cfg.rho, adaptive=cfg.adaptive, **kwargs)
    return base(model.parameters(), **kwargs)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig) -> torch.optim.lr_scheduler.LRScheduler:
    """Cosine annealing stepped once per epoch, ``T_max = epochs / 4`` as in the reference."""
    t_max = max(1, math.ceil(cfg.epochs / 4))
    # Attach to SAM's base optimiser (same param groups): that is the one whose
    # step() runs, so the scheduler's step-order bookkeeping sees it.
    base = getattr(optimizer, "base_optimizer", optimizer)
    return torch.optim.lr_scheduler.CosineAnnealingLR(base, T_max=t_max, eta_min=cfg.eta_min)


class PlateauStop:
    """The DNF reference's early stopping, which also schedules the learning rate.

    Its ``EarlyStopping(patience, delta=-0.001)`` on validation accuracy: an epoch counts as
    an improvement when it beats the best by more than ``margin``; after ``patience``
    epochs without one the learning rate is divided by 10 and a fresh stopper starts with
    twice the margin (``delta=-0.002``) and no best; once the divided rate is below
    ``min_lr`` training is over. (torch's ``ReduceLROnPlateau`` differs: it keeps the best
    across reductions, counts ``patience + 1`` bad epochs and never stops.)
    """

    def __init__(self, patience: int = 5, margin: float = 0.001, min_lr: float = 1e-6) -> None:
        self.patience, self.margin, self.min_lr = int(patience), float(margin), float(min_lr)
        self.best: float | None = None
        self.bad = 0
        self.done = False

    def step(self, score: float, lr: float) -> tuple[float, bool]:
        """After an epoch with validation ``score`` at learning rate ``lr``: (next lr, stop training)."""
        if self.best is None or score > self.best + self.margin:
            self.best, self.bad = score, 0
            return lr, False
        self.bad += 1
        if self.bad < self.patience:
            return lr, False
        lr = lr / 10.0
        if lr < self.min_lr:
            self.done = True
            return lr, True
        self.best, self.bad, self.margin = None, 0, 0.002
        return lr, False

    def state_dict(self) -> dict:
        return {"patience": self.patience, "margin": self.margin, "min_lr": self.min_lr, "best": self.best, "bad": self.bad, "done": self.done}

    def load_state_dict(self, state: dict) -> None:
        self.__dict__.update(state)


def random_hflip(x: torch.Tensor, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Flip each image-shaped feature ``(n, C*H*W)`` left-right with probability 1/2 (a new tensor).

    ``RandomHorizontalFlip`` of the reference's classifier, applied to the feature (its image).
    """
    flip = (torch.rand(x.shape[0], generator=generator) < 0.5).to(x.device)
    images = x.view(x.shape[0], *shape)
    return torch.where(flip.view(-1, *([1] * len(shape))), images.flip(-1), images).reshape(x.shape)


def _identity_gather(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return logits, labels


def all_gather_batch(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch's logits (autograd-aware) and labels, in rank order.

    Uses the default process group (set up by whoever launched the workers); every
    worker must pass tensors of the same size. The backward of
    ``torch.distributed.nn.functional.all_gather`` sums each slice's gradient over
    workers, which is what ``training_step`` relies on.
    """
    import warnings

    import torch.distributed as dist
    from torch.distributed.nn.functional import all_gather

    with warnings.catch_warnings():
        # Deprecated in favour of a private API (_functional_collectives); still the
        # public autograd-aware all-gather in this torch.
        warnings.simplefilter("ignore", FutureWarning)
        parts = all_gather(logits)
    label_parts = [torch.empty_like(labels) for _ in range(dist.get_world_size())]
    dist.all_gather(label_parts, labels)
    return torch.cat(parts), torch.cat(label_parts)


def batch_loss(
    model: nn.Module,
    features: torch.Tensor,
    labels: torch.Tensor,
    cfg: OptimConfig,
    gather: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] = _identity_gather,
) -> torch.Tensor:
    """The training loss of the (global) batch at the model's current weights."""
    all_logits, all_labels = gather(model(features), labels)
    return detector_loss(all_logits, all_labels, kind=cfg.loss, alpha=cfg.alpha, gamma=cfg.gamma, eta=cfg.eta, p=cfg.p)


def training_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    features: torch.Tensor,
    labels: torch.Tensor,
    cfg: OptimConfig,
    gather: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] = _identity_gather,
    first_pass_context: Callable[[], ContextManager] = contextlib.nullcontext,
) -> torch.Tensor:
    """One update on a batch; returns the (detached) loss of the first pass.

    ``gather`` maps local ``(logits, labels)`` to the global batch's. It must be an
    autograd-aware all-gather whose backward *sums* the gradient over workers into
    each local part (``torch.distributed.nn.functional.all_gather`` does): with every
    worker computing the same global loss, and DDP then averaging parameter gradients
    over workers, the result is exactly the single-process gradient of the global
    batch (tested in tests/test_train.py). Single-process: the identity.
    """

    optimizer.zero_grad(set_to_none=True)
    if isinstance(optimizer, SAM):
        with first_pass_context():
            loss = batch_loss(model, features, labels, cfg, gather)
            loss.backward()
        optimizer.first_step(zero_grad=True)
        with bn_stats_frozen(model):
            batch_loss(model, features, labels, cfg, gather).backward()
        optimizer.second_step(zero_grad=True)
    else:
        loss = batch_loss(model, features, labels, cfg, gather)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return loss.detach()


@torch.no_grad()
def predict_logits(model: nn.Module, features: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
    """Eval-mode logits for a feature matrix, batched; each batch moves to the model's device.

    ``batch_size`` defaults to the model's ``predict_batch_size`` (large for the MLP, small
    for the ResNet on image-shaped features).
    """
    batch_size = batch_size or getattr(model, "predict_batch_size", 8192)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        out = [model(features[i : i + batch_size].to(device, non_blocking=True)) for i in range(0, features.shape[0], batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(out) if out else features.new_zeros(0)


def fit(
    model: nn.Module,
    features: torch.Tensor,
    labels: torch.Tensor,
    cfg: OptimConfig,
    seed: int = 0,
    on_epoch: Callable[[int, float], None] | None = None,
) -> nn.Module:
    """Single-process training on in-memory features (same step as the Ray job)."""
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg)
    model.train()
    n = features.shape[0]
    for epoch in range(cfg.epochs):
        order = torch.randperm(n, generator=generator)
        losses = []
        for start in range(0, n, cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            if idx.numel() < 2:
                continue  # BatchNorm cannot normalise a batch of one
            x = features[idx].to(device, non_blocking=True)
            y = labels[idx].to(device, non_blocking=True)
            losses.append(training_step(model, optimizer, x, y, cfg))
        scheduler.step()
        if on_epoch is not None and losses:
            on_epoch(epoch, float(torch.stack(losses).mean()))
    return model


def as_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().cpu().numpy()
