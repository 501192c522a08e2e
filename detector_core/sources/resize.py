"""The geometry of open_clip's eval resize and crop, and its tensor form shared by both ``nvjpeg`` paths.

``resized_size``/``crop_box`` are torchvision's rules as numbers (Pillow's path in ``inputs``
uses them); ``resize_crop`` is the same resize as one antialiased tensor resize plus a crop, on
whichever device holds the pixels: the GPU's decoded JPEGs (``device_decode``) and the CPU
fallback (``resize_crop_array``) go through it, so both are one function of the decoded pixels.
A leaf of this wing: torch and torchvision are imported inside the tensor functions, so decode
tasks that import ``inputs`` never load them.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

__all__ = ["Geometry", "crop_box", "resize_crop", "resize_crop_array", "resized_size"]


class Geometry(Protocol):
    """What the resize needs of a model input (``inputs.ClipInput`` has it)."""

    size: int
    resize_mode: str
    interpolation: str


def resized_size(width: int, height: int, size: int, mode: str = "shortest") -> tuple[int, int]:
    """(width, height) after open_clip's eval resize: the shorter side to ``size`` (torchvision's rule,
    the longer side truncated), or both sides (``squash``)."""
    if mode == "squash":
        return size, size
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    return (new_short, new_long) if width <= height else (new_long, new_short)


def crop_box(width: int, height: int, size: int) -> tuple[int, int]:
    """(left, top) of torchvision's centre crop of ``size`` from a ``width x height`` image."""
    return int(round((width - size) / 2.0)), int(round((height - size) / 2.0))


def resize_crop(x, inp: Geometry):
    """A ``(3, H, W)`` uint8 image -> the ``(size, size, 3)`` uint8 input: open_clip's eval resize (shorter side,
    or squash) as an antialiased tensor resize, then torchvision's centre crop; on the tensor's device."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    h, w = int(x.shape[-2]), int(x.shape[-1])
    new_w, new_h = resized_size(w, h, inp.size, inp.resize_mode)
    if (new_w, new_h) != (w, h):
        x = F.resize(x, [new_h, new_w], interpolation=InterpolationMode(inp.interpolation), antialias=True)
    if inp.resize_mode == "shortest":
        left, top = crop_box(new_w, new_h, inp.size)
        x = x[:, top : top + inp.size, left : left + inp.size]
    return x.permute(1, 2, 0)


def resize_crop_array(rgb: np.ndarray, inp: Geometry) -> np.ndarray:
    """``resize_crop`` of an ``H x W x 3`` uint8 array on the CPU: the CPU path of the ``nvjpeg`` backend."""
    import torch

    rgb = rgb if rgb.flags.writeable and rgb.flags.c_contiguous else np.array(rgb)  # Pillow's arrays are read-only views
    return resize_crop(torch.from_numpy(rgb).permute(2, 0, 1), inp).contiguous().numpy()
