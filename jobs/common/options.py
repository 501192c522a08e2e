"""Flags that several jobs share, as dataclass pieces their configs are composed of.

A job's config inherits the pieces it needs (``class TrainConfig(ExtractorOptions,
StorageOptions, RayOptions)``), so a shared flag is declared once, with one help text and
one default; ``jobs.common.flags.parse_config`` shows each piece as its own group in ``--help``,
after the job's own flags. Jobs that call another job build that job's config from the
pieces they hold (``EmbedConfig(**extractor_options(cfg), ...)``).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from detector_core.method.dnf import DNF_VALUES
from detector_core.method.dnf import TEST_TINY as UNET_TEST_TINY
from detector_core.method.extractors import EXTRACTORS, FeatureSpec
from detector_core.method.features import FEATURE_MODES
from detector_core.sources.inputs import DECODE_BACKENDS
from jobs.common.flags import CatalogOptions, RayOptions, StorageOptions, opt

__all__ = ["CatalogOptions", "ExtractorOptions", "RayOptions", "StorageOptions", "extractor_options"]


@dataclass
class ExtractorOptions:
    """The feature extractor and how images are decoded for it."""

    extractor: str = opt("clip", "feature family: clip (CLIP embeddings + MLP) or dnf (Diffusion Noise Feature of a diffusion UNet + ResNet)", choices=EXTRACTORS)
    clip_model: str = opt("ViT-L-14", "open_clip model (the paper's: ViT-L-14; test-tiny: a random 64 px model for tests)")
    pretrained: str = opt("openai", "open_clip tag whose weights are in the local cache, a weights path or s3:// URI, or none (random: tests only); checked before any work")
    feature_mode: str = opt("image", "image or image+text (image+text needs a caption per row); fixed in the detector", choices=FEATURE_MODES)
    unet: str = opt(UNET_TEST_TINY, "--extractor dnf: diffusers UNet2DModel folder (local or s3://), or test-tiny (random; tests/demo)")
    timestep: int = opt(0, "--extractor dnf: timestep of the single UNet call (0: the first DDIM inversion step, as the reference)", within="[0, 999]")
    dnf_values: str = opt("reference", "--extractor dnf: reference (the DNF reference's feature bit for bit: bicubic float resize, noise clamped and quantised to 8 bits, JPEG sources' noise through a JPEG file) or raw (bilinear uint8 resize, float noise)", choices=DNF_VALUES)
    decode: str = opt("pil", "--extractor clip: how images become pixels; pil (Pillow on CPU workers, JPEG draft decoding) or nvjpeg (baseline JPEGs decoded in batches on the GPU's hardware JPEG engine inside the actor, other files by Pillow at full resolution, one tensor resize for both; needs --gpu); part of the detector's spec: its scans decode the same way", choices=DECODE_BACKENDS)
    jpeg_draft: bool = opt(True, "decode large JPEGs with DCT scaling to twice the model input (CLIP; 4.6-5.4x faster decode); --no-jpeg-draft decodes every image in full, the same function of the pixels for JPEGs and other formats (a set whose real images are JPEG and generated ones PNG); recorded, and scans of the detector decode the same way")

    def feature_spec(self) -> FeatureSpec:
        """The (unresolved) extractor spec these flags name."""
        return FeatureSpec(**{k: getattr(self, k) for k in SPEC_FIELDS})


SPEC_FIELDS = tuple(f.name for f in fields(ExtractorOptions) if f.name != "jpeg_draft")


def extractor_options(source) -> dict:
    """The ``ExtractorOptions`` fields of a config, or of a ``FeatureSpec`` (a bundle's), as keyword arguments."""
    return {f.name: getattr(source, f.name) for f in fields(ExtractorOptions) if hasattr(source, f.name)}
