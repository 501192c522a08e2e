"""Feature extractors behind one interface: what turns a decoded image into a classifier's input.

Two families (docs/method.md sections 1 and 8):

- ``clip``: frozen CLIP embeddings (image, or image+text) -- the paper's MLP classifies them;
- ``dnf``: the Diffusion Noise Feature of a pixel-space diffusion UNet -- a ResNet classifies it.

``FeatureSpec`` names an extractor and its settings; it is recorded in every feature cache
and detector bundle, and is all a scan worker needs to rebuild the same extractor. Both
families split their preprocessing the same way: ``preprocess_for(spec).to_input`` on CPU
workers (a ``size x size x 3`` array of ``prep.dtype`` is what travels: uint8, or float32 for
DNF's reference values), and ``build_extractor(spec, device).extract(batch, captions, jpeg)``
on the accelerator, returning ``(n, dim)`` float32
features (DNF's image-shaped feature flattened; ``spec.shape`` gives it back its shape).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, fields, replace

import torch

from detector_core.dnf import DNF_VALUES, DnfExtractor, DnfPreprocess, unet_config
from detector_core.dnf import TEST_TINY as UNET_TEST_TINY
from detector_core.features import FEATURE_MODES, ClipEncoder, SplitPreprocess, feature_dim

__all__ = ["EXTRACTORS", "FeatureSpec", "ClipFeatures", "build_extractor", "draft_size_for", "feature_compute", "preprocess_for"]

EXTRACTORS = ("clip", "dnf")
_CLIP_KEYS = ("clip_model", "pretrained", "feature_mode")
_DNF_KEYS = ("unet", "timestep", "image_size", "dnf_values")


@dataclass(frozen=True)
class FeatureSpec:
    """An extractor and its settings.

    ``clip``: ``clip_model``, ``pretrained`` (tag, path, URI or ``none``), ``feature_mode``.
    ``dnf``: ``unet`` (folder, URI or ``test-tiny``), ``timestep``, ``image_size`` (the
    UNet's side; 0 until ``resolved``), ``dnf_values`` (``reference``: the reference's 8-bit
    feature; ``raw``: the float noise, what records without the field hold).
    """

    extractor: str = "clip"
    clip_model: str = "test-tiny"
    pretrained: str = "none"
    feature_mode: str = "image"
    unet: str = UNET_TEST_TINY
    timestep: int = 0
    image_size: int = 0
    dnf_values: str = "reference"

    def __post_init__(self) -> None:
        if self.extractor not in EXTRACTORS:
            raise ValueError(f"extractor must be one of {EXTRACTORS}, got {self.extractor!r}")
        # The other family's fields mean nothing here: keep them at their defaults, so that two
        # specs of one extractor are equal (and hash alike) whatever a job config carried in them.
        other = _DNF_KEYS if self.extractor == "clip" else _CLIP_KEYS
        for f in fields(self):
            if f.name in other and getattr(self, f.name) != f.default:
                object.__setattr__(self, f.name, f.default)
        if self.extractor == "clip" and self.feature_mode not in FEATURE_MODES:
            raise ValueError(f"feature mode must be one of {FEATURE_MODES}, got {self.feature_mode!r}")
        if self.dnf_values not in DNF_VALUES:
            raise ValueError(f"DNF values must be one of {DNF_VALUES}, got {self.dnf_values!r}")

    @classmethod
    def from_dict(cls, d: dict) -> "FeatureSpec":
        """From a cache marker or bundle metadata (records older than DNF have no ``extractor``: CLIP)."""
        extractor = d.get("extractor", "clip")
        keys = _CLIP_KEYS if extractor == "clip" else _DNF_KEYS
        kwargs = {k: d[k] for k in keys if k in d}
        if extractor == "dnf":
            kwargs.setdefault("dnf_values", "raw")  # DNF records from before the reference mode hold float noise
        return cls(extractor=extractor, **kwargs)

    def to_dict(self) -> dict:
        keys = _CLIP_KEYS if self.extractor == "clip" else _DNF_KEYS
        d = {"extractor": self.extractor, **{k: getattr(self, k) for k in keys}}
        if d.get("dnf_values") == "raw":  # as records from before the field: raw bundles keep their content hash
            del d["dnf_values"]
        return d

    def resolved(self, storage_options: dict | None = None) -> "FeatureSpec":
        """The spec with ``image_size`` read from the UNet's config (DNF); CLIP specs unchanged."""
        if self.extractor == "dnf" and not self.image_size:
            return replace(self, image_size=int(unet_config(self.unet, storage_options)["sample_size"]))
        return self

    @property
    def id(self) -> str:
        """Short name of the extractor and settings, stored with every feature row and score."""
        if self.extractor == "clip":
            return f"{self.clip_model}/{self.pretrained}/{self.feature_mode}"
        # raw keeps its pre-reference id: the incremental state and old tables key on it.
        return f"dnf/{self.unet}/t{self.timestep}/{self.image_size}" + ("" if self.dnf_values == "raw" else "/q8")

    @property
    def needs_captions(self) -> bool:
        return self.extractor == "clip" and self.feature_mode == "image+text"

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of one feature: ``(d,)`` for CLIP, ``(3, S, S)`` for DNF (resolved specs)."""
        if self.extractor == "clip":
            return (feature_dim(self.clip_model, self.feature_mode),)
        if not self.image_size:
            raise ValueError("DNF spec has no image_size; call resolved() first")
        return (3, self.image_size, self.image_size)

    @property
    def dim(self) -> int:
        return math.prod(self.shape)

    def cache_prefix(self) -> str:
        """What of the spec enters a feature cache key (CLIP's string is the pre-DNF one, so old caches stay valid)."""
        if self.extractor == "clip":
            return f"{self.clip_model}|{self.pretrained}|{self.feature_mode}|"
        return f"dnf|{self.unet}|t={self.timestep}|{self.image_size}|" + ("" if self.dnf_values == "raw" else "values=reference|")


@functools.lru_cache(maxsize=8)
def preprocess_for(spec: FeatureSpec):
    """The CPU half of the spec's preprocessing (``to_uint8``, ``size``, ``draft_ok``, ``resize``)."""
    if spec.extractor == "clip":
        return SplitPreprocess(spec.clip_model, spec.pretrained)
    return DnfPreprocess(spec.resolved().image_size, spec.dnf_values)


def draft_size_for(prep, draft: bool = True) -> int | None:
    """The JPEG draft size a spec's images are decoded at: twice its input where its preprocessing allows it, else None (full)."""
    return 2 * prep.size if (draft and prep.draft_ok) else None


def feature_compute(spec: FeatureSpec, gpu: bool, draft: bool = True) -> dict:
    """How a spec's features are computed, beyond the spec: precision, JPEG decode, resize filter.

    Recorded in feature caches and bundles; a scan compares its own with the bundle's
    (``jobs.scan``): a different decode is refused, a different precision warned about and
    recorded. ``gpu``: the extractors run on CUDA (bf16 autocast, except DNF reference values: fp32)
    rather than the CPU (fp32).
    """
    prep = preprocess_for(spec)
    bf16 = gpu and not (spec.extractor == "dnf" and spec.dnf_values == "reference")  # DnfExtractor's "auto"
    return {"precision": "bf16" if bf16 else "fp32", "jpeg_draft_size": draft_size_for(prep, draft) or 0, "resize": prep.resize}


class ClipFeatures:
    """``ClipEncoder`` behind the extractor interface: uint8 crops (+ captions) -> features."""

    def __init__(self, spec: FeatureSpec, device, precision: str = "auto", storage_options: dict | None = None) -> None:
        self.spec = spec
        self.encoder = ClipEncoder(spec.clip_model, spec.pretrained, device=device, precision=precision, storage_options=storage_options)
        self.prep = preprocess_for(spec)
        self.dim = spec.dim

    def extract(self, pixels: torch.Tensor, captions=None, jpeg=None) -> torch.Tensor:
        pixels = pixels.to(self.encoder.device, non_blocking=True)
        return self.encoder.encode(self.prep.normalize(pixels), captions, self.spec.feature_mode)


def build_extractor(spec: FeatureSpec, device: torch.device | str = "cpu", precision: str = "auto",
                    storage_options: dict | None = None):
    """The extractor of a spec on ``device``: ``ClipFeatures`` or ``DnfExtractor``."""
    if spec.extractor == "clip":
        return ClipFeatures(spec, device, precision, storage_options)
    ex = DnfExtractor(spec.unet, device=device, timestep=spec.timestep, precision=precision, storage_options=storage_options,
                      values=spec.dnf_values)
    if spec.image_size and spec.image_size != ex.image_size:
        raise ValueError(f"spec says image size {spec.image_size} but UNet {spec.unet} has sample size {ex.image_size}")
    return ex
