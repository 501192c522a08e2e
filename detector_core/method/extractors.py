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

from detector_core.devices import resolve_precision
from detector_core.method.dnf import DNF_VALUES, DnfExtractor, DnfPreprocess, bf16_allowed, unet_config
from detector_core.method.dnf import TEST_TINY as UNET_TEST_TINY
from detector_core.method.features import FEATURE_MODES, FORWARDS, ClipEncoder, check_weights, clip_input, feature_dim
from detector_core.sources.inputs import DECODE_BACKENDS, draft_size_for

__all__ = ["EXTRACTORS", "FAMILIES", "FeatureSpec", "ClipFeatures", "build_extractor", "check_available", "draft_size_for", "feature_compute", "preprocess_for"]

class _Clip:
    """The CLIP family: frozen open_clip embeddings (docs/method.md section 1)."""

    keys = ("clip_model", "pretrained", "feature_mode", "decode")
    kind = "clip-mlp"  # the bundle kind of its detectors

    @staticmethod
    def bf16_allowed(spec: "FeatureSpec") -> bool:
        return True

    @staticmethod
    def check(spec: "FeatureSpec") -> None:
        if spec.feature_mode not in FEATURE_MODES:
            raise ValueError(f"feature mode must be one of {FEATURE_MODES}, got {spec.feature_mode!r}")
        if spec.decode not in DECODE_BACKENDS:
            raise ValueError(f"decode backend must be one of {DECODE_BACKENDS}, got {spec.decode!r}")

    @staticmethod
    def id(spec: "FeatureSpec") -> str:  # pil decoding keeps the id it had before the field
        return f"{spec.clip_model}/{spec.pretrained}/{spec.feature_mode}" + ("" if spec.decode == "pil" else f"/{spec.decode}")

    @staticmethod
    def cache_prefix(spec: "FeatureSpec") -> str:  # the pre-DNF string, so old caches stay valid
        return f"{spec.clip_model}|{spec.pretrained}|{spec.feature_mode}|" + ("" if spec.decode == "pil" else f"decode={spec.decode}|")

    @staticmethod
    def shape(spec: "FeatureSpec") -> tuple[int, ...]:
        return (feature_dim(spec.clip_model, spec.feature_mode),)

    @staticmethod
    def resolved(spec: "FeatureSpec", storage_options: dict | None) -> "FeatureSpec":
        return spec

    @staticmethod
    def preprocess(spec: "FeatureSpec"):
        return clip_input(spec.clip_model, spec.pretrained, spec.decode)

    @staticmethod
    def build(spec: "FeatureSpec", device, precision: str, storage_options: dict | None, **forward):
        return ClipFeatures(spec, device, precision, storage_options, **forward)

    @staticmethod
    def check_available(spec: "FeatureSpec", storage_options: dict | None) -> None:
        check_weights(spec.clip_model, spec.pretrained, storage_options=storage_options)


class _Dnf:
    """The DNF family: a diffusion UNet's noise estimate (docs/method.md section 8)."""

    keys = ("unet", "timestep", "image_size", "dnf_values")
    kind = "dnf-resnet"

    @staticmethod
    def bf16_allowed(spec: "FeatureSpec") -> bool:
        return bf16_allowed(spec.dnf_values)

    @staticmethod
    def check(spec: "FeatureSpec") -> None:
        if spec.dnf_values not in DNF_VALUES:
            raise ValueError(f"DNF values must be one of {DNF_VALUES}, got {spec.dnf_values!r}")

    @staticmethod
    def id(spec: "FeatureSpec") -> str:  # raw keeps its pre-reference id: the incremental state and old tables key on it
        return f"dnf/{spec.unet}/t{spec.timestep}/{spec.image_size}" + ("" if spec.dnf_values == "raw" else "/q8")

    @staticmethod
    def cache_prefix(spec: "FeatureSpec") -> str:
        return f"dnf|{spec.unet}|t={spec.timestep}|{spec.image_size}|" + ("" if spec.dnf_values == "raw" else "values=reference|")

    @staticmethod
    def shape(spec: "FeatureSpec") -> tuple[int, ...]:
        if not spec.image_size:
            raise ValueError("DNF spec has no image_size; call resolved() first")
        return (3, spec.image_size, spec.image_size)

    @staticmethod
    def resolved(spec: "FeatureSpec", storage_options: dict | None) -> "FeatureSpec":
        if spec.image_size:
            return spec
        return replace(spec, image_size=int(unet_config(spec.unet, storage_options)["sample_size"]))

    @staticmethod
    def preprocess(spec: "FeatureSpec"):
        return DnfPreprocess(spec.resolved().image_size, spec.dnf_values)

    @staticmethod
    def build(spec: "FeatureSpec", device, precision: str, storage_options: dict | None, **forward):
        if forward:
            raise ValueError(f"the DNF extractor runs only its own precision (no {sorted(forward)})")
        ex = DnfExtractor(spec.unet, device=device, timestep=spec.timestep, precision=precision, storage_options=storage_options,
                          values=spec.dnf_values)
        if spec.image_size and spec.image_size != ex.image_size:
            raise ValueError(f"spec says image size {spec.image_size} but UNet {spec.unet} has sample size {ex.image_size}")
        return ex

    @staticmethod
    def check_available(spec: "FeatureSpec", storage_options: dict | None) -> None:
        unet_config(spec.unet, storage_options)


# The extractor families, by the name ``--extractor`` and every record use. A new family is a
# class with these members and a ``FeatureSpec`` field per key, registered here.
FAMILIES = {"clip": _Clip, "dnf": _Dnf}
EXTRACTORS = tuple(FAMILIES)


@dataclass(frozen=True)
class FeatureSpec:
    """An extractor and its settings.

    ``clip``: ``clip_model``, ``pretrained`` (tag, path, URI or ``none``), ``feature_mode``,
    ``decode`` (``pil``: Pillow on CPU workers, as every bundle before the field; ``nvjpeg``:
    baseline JPEGs on the GPU's hardware decoder, the rest by Pillow, one tensor resize for both;
    ``detector_core.sources.inputs``).
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
    decode: str = "pil"

    def __post_init__(self) -> None:
        if self.extractor not in FAMILIES:
            raise ValueError(f"extractor must be one of {EXTRACTORS}, got {self.extractor!r}")
        # Other families' fields mean nothing here: keep them at their defaults, so that two
        # specs of one extractor are equal (and hash alike) whatever a job config carried in them.
        mine = self.family.keys
        for f in fields(self):
            if f.name != "extractor" and f.name not in mine and getattr(self, f.name) != f.default:
                object.__setattr__(self, f.name, f.default)
        self.family.check(self)

    @property
    def family(self):
        return FAMILIES[self.extractor]

    @classmethod
    def from_dict(cls, d: dict) -> "FeatureSpec":
        """From a cache marker or bundle metadata (records older than DNF have no ``extractor``: CLIP)."""
        extractor = d.get("extractor", "clip")
        kwargs = {k: d[k] for k in FAMILIES[extractor].keys if k in d} if extractor in FAMILIES else {}
        if extractor == "dnf":
            kwargs.setdefault("dnf_values", "raw")  # DNF records from before the reference mode hold float noise
        return cls(extractor=extractor, **kwargs)

    def to_dict(self) -> dict:
        d = {"extractor": self.extractor, **{k: getattr(self, k) for k in self.family.keys}}
        if d.get("dnf_values") == "raw":  # as records from before the field: raw bundles keep their content hash
            del d["dnf_values"]
        if d.get("decode") == "pil":  # likewise: bundles and caches from before GPU decoding keep theirs
            del d["decode"]
        return d

    def resolved(self, storage_options: dict | None = None) -> "FeatureSpec":
        """The spec with what must be read from the model filled in (DNF: ``image_size`` from the UNet's config)."""
        return self.family.resolved(self, storage_options)

    @property
    def id(self) -> str:
        """Short name of the extractor and settings, stored with every feature row and score."""
        return self.family.id(self)

    @property
    def needs_captions(self) -> bool:
        return self.extractor == "clip" and self.feature_mode == "image+text"

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of one feature: ``(d,)`` for CLIP, ``(3, S, S)`` for DNF (resolved specs)."""
        return self.family.shape(self)

    @property
    def dim(self) -> int:
        return math.prod(self.shape)

    def cache_prefix(self) -> str:
        """What of the spec enters a feature cache key."""
        return self.family.cache_prefix(self)


def check_available(spec: FeatureSpec, storage_options: dict | None = None) -> None:
    """Fail now, with what to pass, when a spec's model weights are not where its extractor will look.

    Raises ``features.WeightsNotFoundError`` (CLIP) or ``dnf.UnetNotFoundError`` (DNF); loads no model.
    Jobs call it before they start Ray work, so a missing file is one line, not a dead actor.
    """
    spec.family.check_available(spec, storage_options)


@functools.lru_cache(maxsize=8)
def preprocess_for(spec: FeatureSpec):
    """The CPU half of the spec's preprocessing (``to_input``, ``dtype``, ``size``, ``draft_ok``, ``resize``)."""
    return spec.family.preprocess(spec)


def feature_compute(spec: FeatureSpec, gpu: bool, draft: bool = True, forward: str = "autocast") -> dict:
    """How a spec's features are computed, beyond the spec: precision, JPEG decode, resize filter.

    Recorded in feature caches and bundles; a scan compares its own with the bundle's
    (``jobs.scan``): a different decode is refused, a different precision warned about and
    recorded. ``gpu``: the extractors run on CUDA (bf16 autocast, except DNF reference values: fp32)
    rather than the CPU (fp32).
    """
    prep = preprocess_for(spec)
    precision = resolve_precision("auto", "cuda" if gpu else "cpu", bf16=spec.family.bf16_allowed(spec))
    if gpu and spec.extractor == "clip" and FORWARDS[forward][0] != "auto":
        precision = FORWARDS[forward][0]
    return {"precision": precision, "jpeg_draft_size": draft_size_for(prep, draft) or 0, "resize": prep.resize}


class ClipFeatures:
    """``ClipEncoder`` behind the extractor interface: uint8 crops (+ captions) -> features."""

    def __init__(self, spec: FeatureSpec, device, precision: str = "auto", storage_options: dict | None = None, **forward) -> None:
        self.spec = spec
        self.encoder = ClipEncoder(spec.clip_model, spec.pretrained, device=device, precision=precision, storage_options=storage_options,
                                   **forward)
        self.prep = preprocess_for(spec)
        self.dim = spec.dim

    def extract(self, pixels: torch.Tensor, captions=None, jpeg=None) -> torch.Tensor:
        pixels = pixels.to(self.encoder.device, non_blocking=True)
        return self.encoder.encode(self.prep.normalize(pixels), captions, self.spec.feature_mode)


def build_extractor(spec: FeatureSpec, device: torch.device | str = "cpu", precision: str = "auto",
                    storage_options: dict | None = None, **forward):
    """The extractor of a spec on ``device``: ``ClipFeatures`` or ``DnfExtractor``; ``forward``: CLIP's
    ``compile_mode`` and ``static_batch`` (``features.ClipEncoder``)."""
    return spec.family.build(spec, device, precision, storage_options, **forward)
