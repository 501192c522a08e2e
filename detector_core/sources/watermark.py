"""Invisible watermarks: the Stable Diffusion reference scripts' and the SDXL pipelines' DWT-DCT marks, as evidence.

``with_watermark`` reads them with ``invisible-watermark``'s decoder from the full-resolution pixels
(the scan's ``--watermarks``), as the number of bits that agree with each known pattern, never a bare yes or no; the mark declares a generated
image at ``watermark_threshold`` bits, where an unmarked image (each bit a fair coin) gets there
with probability at most 10⁻⁶ over the three patterns read. It costs a full-resolution
transform per pattern, so the scan reads it only when asked.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from detector_core.sources.provenance import DECLARED_GENERATED, Evidence

__all__ = ["WATERMARKS", "watermark_agreement", "watermark_threshold", "with_watermark"]

# The invisible watermarks of the Stable Diffusion reference code (imwatermark's DWT-DCT): name ->
# (bits, pixels given as BGR?). SDXL's diffusers watermarker passes RGB arrays to an encoder that
# expects BGR, so it is read as it was written; the SD 1/2 scripts convert to BGR first.
WATERMARKS = {
    "sdxl": ([int(b) for b in bin(0b101100111110110010010000011110111011000110011110)[2:]], False),
    "sd1": ([int(b) for b in np.unpackbits(np.frombuffer(b"StableDiffusionV1", np.uint8))], True),
    "sd2": ([int(b) for b in np.unpackbits(np.frombuffer(b"SDV2", np.uint8))], True),
}
WATERMARK_GENERATORS = {"sdxl": "Stable Diffusion XL", "sd1": "Stable Diffusion 1.x", "sd2": "Stable Diffusion 2.x"}
WATERMARK_FALSE_POSITIVE = 1e-6  # per unmarked image, over all patterns read (each gets a third)
WATERMARK_MIN_SIDE = 256  # imwatermark's smallest image


def watermark_threshold(n_bits: int, false_positive: float = WATERMARK_FALSE_POSITIVE, patterns: int = len(WATERMARKS)) -> int:
    """The fewest agreeing bits of ``n_bits`` that an unmarked image (each bit a fair coin) reaches with probability
    at most ``false_positive / patterns``: the binomial tail, so that reading every pattern stays within it."""
    from scipy.stats import binom

    return next(t for t in range(n_bits + 1) if binom.sf(t - 1, n_bits, 0.5) <= false_positive / patterns)


def watermark_agreement(rgb: np.ndarray) -> dict[str, tuple[int, int]]:
    """Pattern -> (bits that agree, bits) of each known watermark in ``rgb`` (H x W x 3 uint8, full resolution)."""
    from imwatermark import WatermarkDecoder

    out = {}
    for name, (bits, bgr) in WATERMARKS.items():
        pixels = np.ascontiguousarray(rgb[:, :, ::-1] if bgr else rgb)
        got = WatermarkDecoder("bits", len(bits)).decode(pixels, "dwtDct")
        out[name] = (int(sum(int(g) == b for g, b in zip(got, bits))), len(bits))
    return out


def with_watermark(evidence: Evidence, rgb: np.ndarray) -> Evidence:
    """``evidence`` plus what the invisible watermark decoder reads from the full-resolution pixels ``rgb``.

    The DWT-DCT mark is fragile (a JPEG re-encode erases most of it), so the best match is kept
    as a count of agreeing bits; it declares a generated image only at ``watermark_threshold``
    agreeing bits, and only where no stronger evidence (C2PA, XMP, chunks, EXIF) declared anything.
    Images under 256 px a side are not read (the decoder refuses them; ``watermark`` stays null).
    """
    if min(rgb.shape[:2]) < WATERMARK_MIN_SIDE:  # the decoder refuses them: too small to carry the mark
        return evidence
    try:
        found = watermark_agreement(rgb)
    except Exception as exc:  # noqa: BLE001 - the decoder's failure is recorded, never raised
        return replace(evidence, error="; ".join(filter(None, [evidence.error, f"watermark: {type(exc).__name__}: {exc}"])))
    name, (agree, n) = max(found.items(), key=lambda kv: (kv[1][0] - watermark_threshold(kv[1][1]), kv[1][0] / kv[1][1]))
    match = f"{name} {agree}/{n}"
    if evidence.declared is None and agree >= watermark_threshold(n):
        return Evidence(DECLARED_GENERATED, "watermark", f"{WATERMARK_GENERATORS[name]} (invisible watermark, {agree}/{n} bits)",
                        evidence.c2pa_state, evidence.error, match)
    return replace(evidence, watermark=match)
