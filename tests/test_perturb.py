"""Robustness perturbations: deterministic under a seed, and they really change the pixels."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from detector_core.demo import make_image
from detector_core.method.perturb import Perturbation, parse_perturbation, parse_perturbations


@pytest.fixture
def image():
    return make_image(np.random.default_rng(0), "gen_checker8", size=(120, 96))


def _arr(im):
    return np.asarray(im.convert("RGB"), dtype=np.int16)


@pytest.mark.parametrize("spec", ["jpeg:95", "jpeg:50", "resize:0.5", "blur:1", "blur:2", "crop:0.6"])
def test_each_perturbation_changes_the_pixels_and_repeats_exactly(image, spec):
    p = parse_perturbation(spec)
    a, b = p.apply(image, "s3://b/x.png", seed=1), p.apply(image, "s3://b/x.png", seed=1)
    assert np.array_equal(_arr(a), _arr(b))  # deterministic
    if a.size == image.size:
        assert np.abs(_arr(a) - _arr(image)).mean() > 0.1
    else:
        assert a.size != image.size


def test_geometry_and_strength(image):
    w, h = image.size
    assert parse_perturbation("resize:0.5").apply(image).size == (round(w * 0.5), round(h * 0.5))
    assert parse_perturbation("crop:0.6").apply(image, "u").size == (round(w * 0.6), round(h * 0.6))
    diff = {q: np.abs(_arr(parse_perturbation(f"jpeg:{q}").apply(image)) - _arr(image)).mean() for q in (95, 50)}
    assert diff[50] > diff[95]  # lower quality, larger change
    blur = {s: np.abs(_arr(parse_perturbation(f"blur:{s}").apply(image)) - _arr(image)).mean() for s in (1, 2)}
    assert blur[2] > blur[1]


def test_crop_position_depends_on_seed_and_uri_only():
    im = Image.fromarray(np.arange(100 * 100 * 3, dtype=np.uint32).reshape(100, 100, 3).astype(np.uint8))
    p = parse_perturbation("crop:0.5")
    crops = {(s, u): _arr(p.apply(im, u, s)).tobytes() for s in (0, 1, 2) for u in ("a", "b")}
    assert crops[(0, "a")] == _arr(p.apply(im, "a", 0)).tobytes()
    assert len(set(crops.values())) > 3  # different seeds / uris pick different windows


def test_parsing_expands_lists_and_refuses_nonsense():
    got = parse_perturbations(["jpeg:95,75,50", "resize:0.5", "blur:1,2", "crop:0.6"])
    assert [p.name for p in got] == ["jpeg:95", "jpeg:75", "jpeg:50", "resize:0.5", "blur:1", "blur:2", "crop:0.6"]
    assert parse_perturbations("jpeg:75 blur:2") == [Perturbation("jpeg", 75), Perturbation("blur", 2)]
    for bad in ("jpeg", "jpeg:101", "jpeg:7.5", "resize:0", "crop:1.5", "noise:1", "blur:x"):
        with pytest.raises(ValueError):
            parse_perturbations([bad])
