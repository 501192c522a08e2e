"""Sharpness-Aware Minimisation (Foret et al., 2021) around any base optimiser.

One SAM step is two passes (docs/method.md section 4):

1. forward + backward at ``w``; ``first_step()`` moves to ``w + e`` with
   ``e = rho * g / ||g||`` (``adaptive=True``: ASAM, ``e_i = rho * w_i^2 g_i / ||w g||``);
2. forward + backward at ``w + e``; ``second_step()`` restores ``w`` and lets the base
   optimiser (AdamW in the paper) step with the gradient from pass two.

BatchNorm running statistics must move in pass one only: wrap pass two in
``bn_stats_frozen(model)`` (or call ``disable_running_stats`` / ``enable_running_stats``).
The gradient norm stays on the device (no host sync). ``state_dict()`` carries the
base optimiser's state (AdamW moments, step counts), so a checkpoint resumes exactly.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

__all__ = ["SAM", "disable_running_stats", "enable_running_stats", "bn_stats_frozen"]


class SAM(torch.optim.Optimizer):
    """SAM wrapper; ``base_optimizer_cls(**kwargs)`` does the actual update.

    Args:
        params: parameters or parameter groups, as for any optimiser.
        base_optimizer_cls: e.g. ``torch.optim.AdamW``.
        rho: neighbourhood radius (0.05 in the paper); ``rho=0`` is the base optimiser.
        adaptive: scale the perturbation by ``w^2`` (ASAM).
        **kwargs: passed to the base optimiser (lr, betas, weight_decay, ...).
    """

    def __init__(self, params, base_optimizer_cls, rho: float = 0.05, adaptive: bool = False, **kwargs) -> None:
        if rho < 0.0:
            raise ValueError(f"rho must be non-negative, got {rho}")
        defaults = dict(rho=rho, adaptive=adaptive, **kwargs)
        super().__init__(params, defaults)
        self.base_optimizer = base_optimizer_cls(self.param_groups, **kwargs)
        # One list of groups shared by both: an LR scheduler wrapped around SAM then
        # drives the base optimiser too.
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)
        self._anchor: dict[torch.Tensor, torch.Tensor] = {}

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Climb to ``w + e`` along the current gradient; remembers ``w``."""
        grad_norm = self._grad_norm()
        for group in self.param_groups:
            scale = group["rho"] / (grad_norm + 1e-12)
            for p in group["params"]:
                if p.grad is None:
                    continue
                self._anchor[p] = p.detach().clone()
                e_w = (torch.pow(p, 2) if group["adaptive"] else 1.0) * p.grad * scale.to(p)
                p.add_(e_w)
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Return to ``w`` and apply the base optimiser with the gradient at ``w + e``."""
        for group in self.param_groups:
            for p in group["params"]:
                anchor = self._anchor.pop(p, None)
                if anchor is not None:
                    p.copy_(anchor)
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()

    def step(self, closure=None):
        """Both passes with a closure that does forward + backward and returns the loss.

        The closure is called once at ``w + e`` with grad enabled; the first pass's
        gradient must already be in ``.grad``. Prefer calling the two steps explicitly,
        which also lets the caller freeze BatchNorm statistics for pass two.
        """
        if closure is None:
            raise RuntimeError("SAM.step needs a closure; or call first_step() and second_step()")
        self.first_step(zero_grad=True)
        with torch.enable_grad():
            loss = closure()
        self.second_step()
        return loss

    def _grad_norm(self) -> torch.Tensor:
        norms = []
        device = None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                device = device or p.grad.device
                g = p.grad * (torch.abs(p) if group["adaptive"] else 1.0)
                norms.append(g.norm(p=2).to(device))
        if not norms:
            return torch.zeros(())
        return torch.stack(norms).norm(p=2)

    def state_dict(self) -> dict:
        if self._anchor:
            raise RuntimeError("SAM state saved between first_step and second_step; save after second_step")
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.base_optimizer.load_state_dict(state_dict)
        # load_state_dict rebuilds the base optimiser's group list; share it again.
        self.param_groups = self.base_optimizer.param_groups


def _batchnorms(model: nn.Module) -> Iterator[nn.modules.batchnorm._BatchNorm]:
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            yield module


def disable_running_stats(model: nn.Module) -> None:
    """Stop BatchNorm running statistics from moving (SAM's second pass).

    Momentum goes to 0 and the batch counter is remembered, so the statistics are
    bit-for-bit unchanged by the pass; ``enable_running_stats`` restores both.
    """
    for bn in _batchnorms(model):
        if hasattr(bn, "_sam_saved"):
            continue
        counter = bn.num_batches_tracked.clone() if bn.num_batches_tracked is not None else None
        bn._sam_saved = (bn.momentum, counter)
        bn.momentum = 0.0


def enable_running_stats(model: nn.Module) -> None:
    """Undo ``disable_running_stats``."""
    for bn in _batchnorms(model):
        saved = getattr(bn, "_sam_saved", None)
        if saved is None:
            continue
        momentum, counter = saved
        bn.momentum = momentum
        if counter is not None:
            bn.num_batches_tracked.copy_(counter)
        del bn._sam_saved


@contextlib.contextmanager
def bn_stats_frozen(model: nn.Module) -> Iterator[None]:
    """Context manager form of disable/enable_running_stats."""
    disable_running_stats(model)
    try:
        yield
    finally:
        enable_running_stats(model)
