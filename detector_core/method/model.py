"""The classifiers: the paper's MLP on frozen CLIP features, and a ResNet on DNF features.

"Robust Diffusion Model-Generated Image Detection with CLIP" puts three blocks of
``Linear(d, d) -> BatchNorm1d(d) -> LeakyReLU(0.01) -> Dropout(0.335)`` on top of the
(concatenated) CLIP embedding and ends in ``Linear(d, 1)``: one logit, where a positive
logit means "generated" (label 1). Linear layers use Kaiming-uniform init (fan_in,
relu) as the reference code does. See docs/method.md section 2.

``NoiseResNet`` is the DNF detector's classifier (docs/method.md section 8): a torchvision ResNet
(50 in the paper; 18/34 by flag) with a one-logit head, on the image-shaped noise feature.
Both take the flattened ``(n, d)`` feature rows that caches and scans carry, so the
training step, SAM and the distributed loop are the same for both; ``build_classifier``
rebuilds either from its saved ``config()``.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["DetectorMLP", "NoiseResNet", "RESNETS", "build_classifier", "load_backbone"]

RESNETS = ("resnet18", "resnet34", "resnet50")


class DetectorMLP(nn.Module):
    """Three (by default) Linear-BN-LeakyReLU-Dropout blocks and a one-logit head.

    Args:
        in_dim: width of the feature vector (1536 for ViT-L/14 image+text).
        hidden_dim: width of the hidden blocks; the paper keeps it equal to ``in_dim``.
        depth: number of hidden blocks (3 in the paper).
        dropout: dropout probability after each block (0.335 in the paper).
        negative_slope: LeakyReLU slope (0.01 in the paper).
    """

    predict_batch_size = 8192  # rows per eval batch (features are small)

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int | None = None,
        depth: int = 3,
        dropout: float = 0.335,
        negative_slope: float = 0.01,
    ) -> None:
        super().__init__()
        if in_dim <= 0:
            raise ValueError(f"in_dim must be positive, got {in_dim}")
        if depth < 1:
            raise ValueError(f"depth must be at least 1, got {depth}")
        hidden_dim = in_dim if hidden_dim is None else hidden_dim
        self.in_dim = in_dim
        self.hidden_dim = hidden_dim
        self.depth = depth
        self.dropout = dropout
        self.negative_slope = negative_slope
        blocks: list[nn.Module] = []
        width = in_dim
        for _ in range(depth):
            blocks += [
                nn.Linear(width, hidden_dim),
                nn.BatchNorm1d(hidden_dim),
                nn.LeakyReLU(negative_slope),
                nn.Dropout(dropout),
            ]
            width = hidden_dim
        self.body = nn.Sequential(*blocks)
        self.head = nn.Linear(width, 1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.kaiming_uniform_(module.weight, mode="fan_in", nonlinearity="relu")
                nn.init.zeros_(module.bias)

    def config(self) -> dict:
        """The constructor arguments, for saving next to the weights."""
        return {
            "in_dim": self.in_dim,
            "hidden_dim": self.hidden_dim,
            "depth": self.depth,
            "dropout": self.dropout,
            "negative_slope": self.negative_slope,
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map features ``(n, in_dim)`` to logits ``(n,)``."""
        if x.ndim != 2 or x.shape[1] != self.in_dim:
            raise ValueError(f"expected features of shape (n, {self.in_dim}), got {tuple(x.shape)}")
        return self.head(self.body(x)).squeeze(-1)


class NoiseResNet(nn.Module):
    """A torchvision ResNet with a one-logit head, on ``(n, C*H*W)`` or ``(n, C, H, W)`` features.

    Args:
        arch: ``resnet50`` (the DNF paper's), ``resnet34`` or ``resnet18``.
        in_shape: ``(C, H, W)`` of one feature (``(3, 256, 256)`` for the bedroom UNet).

    Random initialisation (torchvision's), as the DNF reference's ResNet-50 (from scratch since
    its commit 139c073); ``load_backbone`` loads other starting weights from a file.
    """

    predict_batch_size = 128

    def __init__(self, arch: str = "resnet50", in_shape: tuple[int, int, int] | list[int] = (3, 256, 256)) -> None:
        super().__init__()
        import torchvision

        if arch not in RESNETS:
            raise ValueError(f"arch must be one of {RESNETS}, got {arch!r}")
        self.arch = arch
        self.in_shape = tuple(int(s) for s in in_shape)
        if len(self.in_shape) != 3:
            raise ValueError(f"in_shape must be (C, H, W), got {self.in_shape}")
        self.in_dim = self.in_shape[0] * self.in_shape[1] * self.in_shape[2]
        net = getattr(torchvision.models, arch)(weights=None, num_classes=1)
        if self.in_shape[0] != 3:
            net.conv1 = nn.Conv2d(self.in_shape[0], 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.net = net

    def config(self) -> dict:
        return {"arch": self.arch, "in_shape": list(self.in_shape)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map features ``(n, C*H*W)`` (or ``(n, C, H, W)``) to logits ``(n,)``."""
        if x.ndim == 2:
            if x.shape[1] != self.in_dim:
                raise ValueError(f"expected features of width {self.in_dim} ({self.in_shape}), got {tuple(x.shape)}")
            x = x.view(x.shape[0], *self.in_shape)
        elif tuple(x.shape[1:]) != self.in_shape:
            raise ValueError(f"expected features of shape (n, {self.in_shape}), got {tuple(x.shape)}")
        return self.net(x).squeeze(-1)


def load_backbone(model: NoiseResNet, path: str, storage_options: dict | None = None) -> list[str]:
    """Initialise a ``NoiseResNet`` from a torchvision ResNet state dict file (local or object store).

    E.g. ``resnet50-11ad3fa6.pth`` (torchvision's ImageNet weights, downloaded where there is
    network). Every layer but the classification head must match; the head stays new (one
    logit). Returns the names of the keys that were left at their initial values.
    """
    from detector_core.storage import fetch_cached, is_remote

    try:
        local = fetch_cached(path, "resnet-weights", storage_options) if is_remote(path) else path
        state = torch.load(local, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"--resnet-init {path}: no such file; pass a torchvision {model.arch} state dict (.pth)") from None
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    state = {k.removeprefix("module."): v for k, v in state.items() if not k.removeprefix("module.").startswith("fc.")}
    own = model.net.state_dict()
    wrong = sorted({k for k in own if not k.startswith("fc.")} ^ set(state))
    wrong += [k for k in state if k in own and state[k].shape != own[k].shape]
    if wrong:
        raise ValueError(f"--resnet-init {path} does not fit {model.arch}: {len(wrong)} keys differ, e.g. {wrong[:3]}")
    missing, _ = model.net.load_state_dict(state, strict=False)
    return list(missing)


def build_classifier(config: dict) -> nn.Module:
    """The classifier a saved ``config()`` describes: ``NoiseResNet`` when it names an ``arch``, else ``DetectorMLP``."""
    if "arch" in config:
        return NoiseResNet(**config)
    return DetectorMLP(**config)
