"""Image perturbations for robustness evaluation: JPEG re-compression, resizing, blur, cropping.

A perturbation is written ``kind:value`` (``jpeg:75``, ``resize:0.5``, ``blur:2``,
``crop:0.6``); a command line lists several values per kind (``jpeg:95,75,50``) and
``parse_perturbations`` expands them. Each is applied to the decoded RGB image before the
model's resize and crop, to real and generated images alike (docs/method.md section 7). Only
``crop`` draws random numbers; its generator is seeded from the perturbation seed and the
object's URI, so a re-run (or another worker) perturbs every image the same way.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

KINDS = ("jpeg", "resize", "blur", "crop")


@dataclass(frozen=True)
class Perturbation:
    """One perturbation: ``kind`` with its ``value`` (JPEG quality, scale, blur sigma, crop fraction)."""

    kind: str
    value: float

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown perturbation {self.kind!r}; one of {', '.join(KINDS)}")
        ok = {
            "jpeg": 1 <= self.value <= 100 and float(self.value).is_integer(),
            "resize": 0 < self.value <= 4,
            "blur": 0 < self.value <= 50,
            "crop": 0 < self.value <= 1,
        }[self.kind]
        if not ok:
            raise ValueError(f"{self.kind}:{self.value:g} is out of range (jpeg: quality 1-100; resize: scale in (0, 4]; "
                             "blur: sigma in (0, 50]; crop: fraction of each side in (0, 1])")

    @property
    def name(self) -> str:
        return f"{self.kind}:{self.value:g}"

    def apply(self, image: Image.Image, uri: str = "", seed: int = 0) -> Image.Image:
        """The perturbed copy of an RGB image."""
        image = image.convert("RGB")
        if self.kind == "jpeg":
            buf = io.BytesIO()
            image.save(buf, format="JPEG", quality=int(self.value))
            buf.seek(0)
            out = Image.open(buf)
            out.load()
            return out.convert("RGB")
        if self.kind == "resize":
            w, h = image.size
            size = (max(1, round(w * self.value)), max(1, round(h * self.value)))
            return image.resize(size, Image.Resampling.BICUBIC)
        if self.kind == "blur":
            return image.filter(ImageFilter.GaussianBlur(radius=self.value))
        # crop: a window of value x each side at a position drawn per (seed, uri)
        w, h = image.size
        cw, ch = max(1, round(w * self.value)), max(1, round(h * self.value))
        digest = hashlib.sha256(f"{seed}|{uri}".encode()).digest()
        rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
        left = int(rng.integers(0, w - cw + 1))
        top = int(rng.integers(0, h - ch + 1))
        return image.crop((left, top, left + cw, top + ch))


def parse_perturbation(spec: str) -> Perturbation:
    """``kind:value`` -> Perturbation."""
    kind, sep, value = spec.partition(":")
    if not sep:
        raise ValueError(f"perturbation {spec!r} is not kind:value (e.g. jpeg:75, resize:0.5, blur:2, crop:0.6)")
    try:
        return Perturbation(kind.strip(), float(value))
    except ValueError as exc:
        if "could not convert" in str(exc):
            raise ValueError(f"perturbation {spec!r}: {value!r} is not a number") from None
        raise


def parse_perturbations(specs: list[str] | str) -> list[Perturbation]:
    """``["jpeg:95,75", "blur:1"]`` (or the same space-separated) -> one Perturbation per value."""
    if isinstance(specs, str):
        specs = specs.split()
    out = []
    for spec in specs:
        kind, sep, values = spec.partition(":")
        if not sep:
            raise ValueError(f"perturbation {spec!r} is not kind:value[,value…]")
        out.extend(parse_perturbation(f"{kind}:{v}") for v in values.split(",") if v.strip())
    return out
