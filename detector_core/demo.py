"""A small synthetic data set of "real" and "generated" images, made on the spot.

No real photographs or generator outputs can ship with the repository, so the demo
and the tests use images of two kinds that a detector can learn to tell apart:
"real" images are smooth random colour fields with soft blobs and sensor-like noise;
"generated" ones are drawn from the same process and then carry a periodic
checkerboard, the kind of pattern upsampling layers leave behind (two "generators"
with different periods). The period is a fraction of the image's short side, so
that the pattern survives resizing to the model's input (8 and 16 cells across:
the tiny test CLIP's 8-pixel patches at 64 px see it). Deterministic under a seed.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["DemoImage", "GENERATORS", "make_image", "make_dataset", "write_dataset"]

# name -> (checker cells across the short side, amplitude in 0..255)
GENERATORS = {"gen_checker8": (8, 40.0), "gen_checker16": (16, 40.0)}


@dataclass
class DemoImage:
    name: str
    label: int
    generator: str
    caption: str
    image: Image.Image


def _base(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    c0, c1 = rng.uniform(40, 215, size=(2, 3))
    angle = rng.uniform(0, 2 * np.pi)
    t = ((xx * np.cos(angle) + yy * np.sin(angle)) / max(h, w) + 1) / 2
    img = c0[None, None] * (1 - t[..., None]) + c1[None, None] * t[..., None]
    for _ in range(rng.integers(2, 6)):
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        r = rng.uniform(0.1, 0.35) * max(h, w)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
        img += blob[..., None] * rng.uniform(-70, 70, size=3)[None, None]
    img += rng.normal(0, 4.0, size=img.shape)
    return img


def make_image(rng: np.random.Generator, generator: str = "real", size: tuple[int, int] | None = None) -> Image.Image:
    """One RGB image of a kind: ``real`` or one of ``GENERATORS``."""
    h, w = size or (int(rng.integers(80, 160)), int(rng.integers(80, 160)))
    img = _base(rng, h, w)
    if generator != "real":
        cells, amplitude = GENERATORS[generator]
        period = min(h, w) / cells
        yy, xx = np.mgrid[0:h, 0:w]
        phase = (np.floor(yy / period * 2) + np.floor(xx / period * 2)) % 2
        img += (phase * 2.0 - 1.0)[..., None] * amplitude
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), mode="RGB")


def make_dataset(n_real: int, n_generated: int, seed: int = 0) -> list[DemoImage]:
    """``n_real`` real and ``n_generated`` generated images, generators alternating."""
    rng = np.random.default_rng(seed)
    out = []
    gens = list(GENERATORS)
    for i in range(n_real):
        out.append(DemoImage(f"real_{i:05d}", 0, "real", f"a photo of a scene, number {i}", make_image(rng, "real")))
    for i in range(n_generated):
        g = gens[i % len(gens)]
        out.append(DemoImage(f"{g}_{i:05d}", 1, g, f"a picture made from a prompt, number {i}", make_image(rng, g)))
    return out


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def write_dataset(root: str | Path, n_real: int, n_generated: int, seed: int = 0, fmt: str = "PNG") -> list[dict]:
    """Write ``real/…`` and ``generated/<generator>/…`` image files; returns manifest rows."""
    root = Path(root)
    rows = []
    ext = {"PNG": "png", "JPEG": "jpg"}[fmt]
    for item in make_dataset(n_real, n_generated, seed):
        sub = root / ("real" if item.label == 0 else f"generated/{item.generator}")
        sub.mkdir(parents=True, exist_ok=True)
        path = sub / f"{item.name}.{ext}"
        path.write_bytes(encode(item.image, fmt))
        rows.append({"uri": str(path), "label": item.label, "generator": item.generator, "caption": item.caption})
    return rows
