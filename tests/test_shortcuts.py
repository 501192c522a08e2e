"""The shortcut report: label predicted from the files' metadata alone, and the metadata it reads.

The metadata goes through the same decode as training (``decode_image``), from real encoded
bytes: JPEG quality is checked against the quality the encoder was given, EXIF against a file
written with one. The report must flag a set whose generated images are all 512x512 PNGs and
whose real ones are JPEGs of varied sizes, and must not flag a set where both classes share
formats, sizes and qualities.
"""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from detector_core import schema as S
from detector_core.method.shortcuts import WARN_AUC, sample_rows, shortcut_report
from detector_core.sources.images import decode_image


def _smooth(rng, w: int, h: int) -> Image.Image:
    """A cheap natural-ish picture: a colour gradient plus noise."""
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 // max(w, 1), yy * 255 // max(h, 1), (xx + yy) * 255 // max(w + h, 1)], axis=-1)
    noise = rng.integers(0, 40, size=(h, w, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("quality", [5, 15, 30, 50, 75, 90, 97])
def test_jpeg_quality_is_estimated_from_the_files_tables(quality):
    data = _encode(_smooth(np.random.default_rng(0), 96, 64), "JPEG", quality=quality)
    assert abs(decode_image(data).jpeg_quality - quality) <= 1


def test_png_has_no_quality_and_exif_is_seen():
    im = _smooth(np.random.default_rng(1), 64, 64)
    assert decode_image(_encode(im, "PNG")).jpeg_quality is None
    exif = Image.Exif()
    exif[0x010F] = "Camera Maker"  # Make
    assert decode_image(_encode(im, "JPEG", exif=exif.tobytes())).exif is True
    assert decode_image(_encode(im, "JPEG")).exif is False


def _table(files: list[tuple[bytes, int, str]]) -> pa.Table:
    rows = []
    for data, label, gen in files:
        d = decode_image(data)
        rows.append({S.LABEL: label, S.GENERATOR: gen, S.FORMAT: d.format, S.WIDTH: d.width, S.HEIGHT: d.height,
                     S.SIZE: len(data), S.JPEG_QUALITY: d.jpeg_quality, S.EXIF: d.exif})
    return pa.Table.from_pylist(rows)


def test_a_set_whose_classes_differ_in_container_is_flagged():
    rng = np.random.default_rng(2)
    files = []
    for i in range(40):  # generated: 512x512 PNG, two generators
        files.append((_encode(_smooth(rng, 512, 512), "PNG"), 1, "sd14" if i % 2 else "sdxl"))
    for _ in range(40):  # real: JPEGs of varied sizes and qualities
        w, h = int(rng.integers(200, 900)), int(rng.integers(200, 900))
        files.append((_encode(_smooth(rng, w, h), "JPEG", quality=int(rng.integers(60, 96))), 0, "real"))
    report = shortcut_report(_table(files))
    assert report["auc"] >= 0.95 and all(v >= 0.95 for v in report["per_generator"].values())
    assert set(report["per_generator"]) == {"sd14", "sdxl"}
    assert report["warning"] and "labels are predictable from the files' format and size" in report["warning"]


def test_a_set_whose_classes_share_containers_is_not_flagged():
    rng = np.random.default_rng(3)
    files = []
    for i in range(80):  # both classes drawn from the same formats, sizes and qualities
        w, h = int(rng.integers(200, 600)), int(rng.integers(200, 600))
        im = _smooth(rng, w, h)
        data = _encode(im, "JPEG", quality=int(rng.integers(60, 96))) if rng.random() < 0.5 else _encode(im, "PNG")
        files.append((data, i % 2, "sd14" if i % 2 else "real"))
    report = shortcut_report(_table(files))
    assert 0.25 <= report["auc"] <= 0.75 and report["auc"] < WARN_AUC
    assert report["warning"] is None


def test_sample_keeps_about_max_rows_and_both_classes():
    t = pa.table({S.LABEL: np.arange(100_000) % 2})
    s = sample_rows(t.to_batches(max_chunksize=7_000), t.num_rows, max_rows=5_000, seed=0)
    assert 4_500 < s.num_rows < 5_500 and set(s.column(S.LABEL).to_pylist()) == {0, 1}
    assert sample_rows(t.to_batches(), t.num_rows, max_rows=10**6).num_rows == 100_000
