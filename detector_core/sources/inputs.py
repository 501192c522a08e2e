"""What a CLIP model's input is made of, computed where the image is: the CPU half of the preprocessing.

``ClipInput`` is open_clip's eval transform (resize the shorter side, centre crop; or squash)
written against Pillow alone, so that decode tasks never import torch or open_clip: on a
2-core machine each fresh decode worker spent ~8 s importing them for a transform that is
three Pillow calls (docs/scaling.md, "Small scans"). It is built in the driver from open_clip's
settings (``features.clip_input``) and travels to the tasks by value. ``tests/test_decode.py``
checks it against open_clip's own transform, pixel for pixel.

``decode`` names how a spec's images become pixels (docs/method.md section 12):

- ``pil`` (every bundle before it): Pillow on CPU workers, JPEGs DCT-downscaled (draft) to at
  least twice the input, Pillow's resize;
- ``nvjpeg``: baseline JPEGs decoded by the GPU's hardware JPEG engine in the scoring actor, every
  other file by Pillow at full resolution on the CPU; in both cases the same tensor resize and crop
  (``detector_core.sources.resize.resize_crop``), on whichever device holds the pixels.

Torch is imported only inside the functions that need it (``normalize`` on the accelerator, the
``nvjpeg`` fallback's tensor resize in ``resize``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from detector_core.sources.resize import crop_box, resize_crop_array, resized_size

__all__ = ["DECODE_BACKENDS", "ClipInput", "draft_size_for"]

DECODE_BACKENDS = ("pil", "nvjpeg")
_PIL_FILTERS = {"bicubic": 3, "bilinear": 2, "nearest": 0}  # PIL.Image.Resampling values
RESIZE_MODES = ("shortest", "squash")


def draft_size_for(prep, draft: bool = True) -> int | None:
    """The JPEG draft size a spec's images are decoded at: twice its input where its preprocessing allows it, else None (full)."""
    return 2 * prep.size if (draft and prep.draft_ok) else None


@dataclass(frozen=True)
class ClipInput:
    """The resize, crop and normalisation of a CLIP model's eval transform, and how its images are decoded.

    ``to_input`` (CPU workers): an RGB PIL image -> ``size x size x 3`` uint8. ``normalize`` (on the
    accelerator): a ``(n, H, W, 3)`` uint8 batch -> the normalised float ``(n, 3, H, W)`` batch.
    """

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"
    decode: str = "pil"
    dtype: str = "uint8"  # of what to_input returns (numpy dtype name)

    def __post_init__(self) -> None:
        if self.interpolation not in _PIL_FILTERS:
            raise ValueError(f"interpolation {self.interpolation!r} is not one of {tuple(_PIL_FILTERS)}")
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"open_clip resize mode {self.resize_mode!r} is not supported here (supported: {RESIZE_MODES})")
        if self.decode not in DECODE_BACKENDS:
            raise ValueError(f"decode backend must be one of {DECODE_BACKENDS}, got {self.decode!r}")

    @property
    def draft_ok(self) -> bool:
        """JPEG DCT downscaling to >= 2x the input barely moves CLIP features (bench/bench_draft.py); the
        hardware decoder has no such scale, so ``nvjpeg`` decodes every path at full resolution."""
        return self.decode == "pil"

    @property
    def resize(self) -> str:
        """The resize filter, as recorded with features (``feature_compute``)."""
        return self.interpolation if self.decode == "pil" else f"{self.interpolation}-antialias-tensor"

    def to_input(self, image) -> np.ndarray:
        if self.decode != "pil":
            return resize_crop_array(np.asarray(image.convert("RGB"), dtype=np.uint8), self)
        image = image.convert("RGB")
        w, h = resized_size(image.width, image.height, self.size, self.resize_mode)
        if (w, h) != image.size:
            image = image.resize((w, h), _PIL_FILTERS[self.interpolation])
        if self.resize_mode == "shortest":
            left, top = crop_box(w, h, self.size)
            image = image.crop((left, top, left + self.size, top + self.size))
        return np.asarray(image, dtype=np.uint8)

    def normalize(self, batch):
        import torch

        x = batch.permute(0, 3, 1, 2).float().div_(255.0)
        mean = torch.tensor(self.mean, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std
