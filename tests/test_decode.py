"""Decoding for the model: the torch-free CPU transform against open_clip's, the JPEG header router, and the nvjpeg backend.

The GPU path's code runs here on the CPU: torchvision's batched ``decode_jpeg`` with
``device="cpu"`` (libjpeg-turbo) stands in for nvJPEG, so routing, orientation, the tensor
resize and the fill-in of a batch are tested; what only a GPU can show (nvJPEG's pixels, its
speed) is ``bench/gpu_check.sh``'s.
"""

from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from detector_core import schema as S
from detector_core.method.extractors import FeatureSpec, preprocess_for
from detector_core.method.features import build_preprocess, clip_input
from detector_core.sources.images import decode_image
from detector_core.sources.jpeg_header import read_header, route

MAX_PIXELS = 1 << 26


def _photo(rng, w=320, h=240) -> Image.Image:
    base = rng.integers(0, 255, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(base).resize((w, h), Image.BICUBIC)).astype(np.int16)
    return Image.fromarray(np.clip(smooth + rng.integers(-8, 9, (h, w, 3)), 0, 255).astype(np.uint8))


def _jpeg(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", **kw)
    return buf.getvalue()


def _with_orientation(im: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _jpeg(im, quality=90, exif=exif.tobytes())


# -- the CPU transform --------------------------------------------------------------------------
@pytest.mark.parametrize("model", ["test-tiny", "ViT-B-32"])
def test_clip_input_equals_open_clips_transform_pixel_for_pixel(model):
    rng = np.random.default_rng(0)
    prep, full = clip_input(model, "none"), build_preprocess(model, "none")
    for w, h in ((640, 480), (333, 517), (prep.size, prep.size), (prep.size + 1, prep.size), (50, 300), (3000, 2000), (31, 17)):
        im = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        want = im
        for t in full.transforms[:-2]:  # up to ToTensor: Resize, CenterCrop, MaybeConvertMode
            want = t(want)
        np.testing.assert_array_equal(prep.to_input(im), np.asarray(want))
    x = np.stack([prep.to_input(Image.fromarray(rng.integers(0, 255, (90, 120, 3), dtype=np.uint8))) for _ in range(2)])
    import torch

    want = torch.stack([full.transforms[-1](torch.from_numpy(a).permute(2, 0, 1).float() / 255.0) for a in x])
    torch.testing.assert_close(prep.normalize(torch.from_numpy(x)), want)


def test_decode_tasks_import_neither_torch_nor_open_clip():
    """What a CPU decode task runs (load_images with the driver's preps) in a fresh interpreter: no torch, no open_clip."""
    code = ("import pickle, sys, numpy as np; from jobs.scanning.decoding import load_images; prep = pickle.loads(sys.stdin.buffer.read()); "
            "out = load_images({'uri': np.array([sys.argv[1]], dtype=object)}, preps=[prep]); "
            "assert out['pixels'].shape == (1, prep.size, prep.size, 3) and out['error_stage'][0] is None, out; "
            "print(sorted(m for m in ('torch', 'open_clip', 'torchvision') if m in sys.modules))")
    import pickle
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".jpg") as f:
        f.write(_jpeg(_photo(np.random.default_rng(1))))
        f.flush()
        res = subprocess.run([sys.executable, "-c", code, f.name], input=pickle.dumps(clip_input("ViT-B-32", "none")),
                             capture_output=True, check=True)
    assert res.stdout.decode().strip() == "[]", res.stderr.decode()[-2000:]


# -- routing ------------------------------------------------------------------------------------
def test_router_sends_baseline_ycbcr_jpegs_to_the_gpu_and_everything_else_to_the_cpu():
    rng = np.random.default_rng(2)
    im = _photo(rng)
    for sub in (0, 1, 2):  # 4:4:4, 4:2:2, 4:2:0
        h = read_header(_jpeg(im, quality=90, subsampling=sub))
        assert (h.process, h.components, route(h, MAX_PIXELS)) == ("baseline", 3, "nvjpeg")
    assert route(read_header(_jpeg(im, progressive=True)), MAX_PIXELS) == "pil"
    cmyk = read_header(_jpeg(im.convert("CMYK")))
    assert (cmyk.components, route(cmyk, MAX_PIXELS)) == (4, "pil")
    gray = read_header(_jpeg(im.convert("L")))
    assert (gray.components, route(gray, MAX_PIXELS)) == (1, "pil")
    buf = io.BytesIO()
    im.save(buf, "PNG")
    assert read_header(buf.getvalue()) is None and route(None, MAX_PIXELS) == "pil"
    baseline = _jpeg(im, quality=90, subsampling=2)
    assert route(read_header(baseline[: len(baseline) // 2]), MAX_PIXELS) == "pil"  # truncated: no end marker
    assert route(read_header(baseline + b"\0" * 7), MAX_PIXELS) == "nvjpeg"  # zero padding after the end marker
    assert route(read_header(baseline), im.width * im.height - 1) == "pil"  # over --max-pixels: the CPU path refuses it
    # 4:1:1 (luma 4x1), written by hand into the frame header: the hardware decoder does not take it.
    sof = baseline.index(b"\xff\xc0")
    patched = bytearray(baseline)
    patched[sof + 11] = 0x41
    h = read_header(bytes(patched))
    assert h.sampling[0] == (4, 1) and route(h, MAX_PIXELS) == "pil"
    # The header's metadata is what the CPU decode records.
    d = decode_image(baseline)
    h = read_header(baseline)
    from detector_core.sources.images import quality_from_table_sum

    assert (h.width, h.height, quality_from_table_sum(h.luma_table_sum), h.exif) == (d.width, d.height, d.jpeg_quality, d.exif) == \
        (320, 240, 90, False)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_gpu_path_on_cpu_equals_the_backends_cpu_path_for_every_exif_orientation(orientation):
    """The nvjpeg backend's two paths are one function of the pixels: decode_inputs (the GPU's code, run on the CPU)
    gives exactly what the CPU fallback (Pillow, exif_transpose, the same tensor resize) gives."""
    from detector_core.sources.device_decode import decode_inputs

    data = _with_orientation(_photo(np.random.default_rng(orientation), 300, 200), orientation)
    h = read_header(data)
    assert h.orientation == orientation and h.exif and route(h, MAX_PIXELS) == "nvjpeg"
    prep = clip_input("ViT-B-32", "none", decode="nvjpeg")
    gpu, failed = decode_inputs([data], [h.orientation], prep, "cpu")
    cpu = prep.to_input(decode_image(data).image)
    assert failed == [None]
    np.testing.assert_array_equal(gpu[0].numpy(), cpu)
    # ... and the pil backend's draft-free input is close to it (another resize filter: not equal, not far).
    pil = clip_input("ViT-B-32", "none").to_input(decode_image(data).image)
    assert np.abs(pil.astype(int) - cpu.astype(int)).mean() < 3


def test_load_images_routes_by_header_and_the_embedder_fills_the_gpu_rows(tmp_path):
    import torch

    from jobs.scanning.decoding import ENCODED, PIXELS, load_images
    from jobs.scanning.pipeline import Embedder

    rng = np.random.default_rng(5)
    files = {"base.jpg": _jpeg(_photo(rng), quality=85), "turned.jpg": _with_orientation(_photo(rng, 200, 300), 6),
             "prog.jpg": _jpeg(_photo(rng), progressive=True), "cmyk.jpg": _jpeg(_photo(rng).convert("CMYK"))}
    buf = io.BytesIO()
    _photo(rng).save(buf, "PNG")
    files["img.png"] = buf.getvalue()
    files["bad.jpg"] = b"\xff\xd8\xff\xe0 not a jpeg"
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    uris = np.array([str(tmp_path / n) for n in files], dtype=object)
    spec = FeatureSpec(clip_model="test-tiny", decode="nvjpeg")
    batch = load_images({S.URI: uris}, preps=[preprocess_for(spec)], evidence=True)
    assert list(batch[S.DECODE_PATH]) == ["nvjpeg", "nvjpeg", "pil", "pil", "pil", None]
    assert [e is not None for e in batch[ENCODED]] == [True, True, False, False, False, False]
    assert batch[S.ERROR_STAGE][-1] == "decode" and not batch[PIXELS][:2].any()
    cpu = load_images({S.URI: uris}, specs=[FeatureSpec(clip_model="test-tiny")])  # the pil backend: what the CPU records
    for col in (S.WIDTH, S.HEIGHT, S.FORMAT, S.JPEG_QUALITY, S.EXIF):
        assert list(batch[col]) == list(cpu[col]), col
    with pytest.raises(RuntimeError, match="no CUDA device"):
        Embedder(spec, device=torch.device("cpu"))
    emb = Embedder(spec, device=torch.device("cpu"), cpu_decode_ok=True)
    feats, ok = emb.extract(dict(batch))
    assert list(ok) == [True] * 5 + [False]
    # The same features as the backend's CPU path applied to every file.
    pixels = np.stack([preprocess_for(spec).to_input(decode_image(files[n]).image) for n in list(files)[:5]])
    torch.testing.assert_close(feats, emb.extractor.extract(torch.from_numpy(pixels)))


# -- the spec ---------------------------------------------------------------------------------------
def test_decode_backend_is_part_of_the_spec_and_old_records_keep_their_ids():
    pil, gpu = FeatureSpec(clip_model="test-tiny"), FeatureSpec(clip_model="test-tiny", decode="nvjpeg")
    assert "decode" not in pil.to_dict() and pil.id == "test-tiny/none/image"
    assert gpu.to_dict()["decode"] == "nvjpeg" and gpu.id == "test-tiny/none/image/nvjpeg"
    assert FeatureSpec.from_dict(gpu.to_dict()) == gpu and FeatureSpec.from_dict(pil.to_dict()) == pil != gpu
    assert gpu.cache_prefix() != pil.cache_prefix()
    assert FeatureSpec(extractor="dnf", decode="nvjpeg").decode == "pil"  # a CLIP setting: DNF decodes on CPU workers
    with pytest.raises(ValueError, match="decode backend"):
        FeatureSpec(decode="dali")
    from jobs.scanning.pipeline import check_decode

    check_decode([gpu], gpu=True)
    with pytest.raises(ValueError, match="needs a GPU"):
        check_decode([gpu], gpu=False)
    with pytest.raises(ValueError, match="different backends"):
        check_decode([pil, gpu], gpu=True)


def test_a_scan_of_a_gpu_decode_detector_without_a_gpu_fails_in_one_line(tmp_path, bundle_dir):
    import torch

    from detector_core.method.bundle import DetectorBundle, save_bundle
    from detector_core.method.model import DetectorMLP
    from jobs import scan
    from jobs.common.errors import JobError

    torch.manual_seed(0)
    path = tmp_path / "gpu-detector"
    save_bundle(DetectorBundle(model=DetectorMLP(64).eval(), features=FeatureSpec(clip_model="test-tiny", decode="nvjpeg")), str(path))
    (tmp_path / "in").mkdir()
    with pytest.raises(JobError, match="needs a GPU") as e:
        scan.main(["--detector", str(path), "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out")])
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()
    with pytest.raises(JobError, match="different backends"):
        scan.main(["--detector", str(path), "--ensemble", str(bundle_dir), "--input", str(tmp_path / "in"), "--output",
                   str(tmp_path / "out"), "--gpu"])


def test_shortcut_report_sees_a_decode_path_that_predicts_the_label():
    from detector_core.method.shortcuts import metadata_matrix, shortcut_report

    n = 200
    label = np.array([0, 1] * (n // 2), dtype=np.int8)
    t = pa.table({S.LABEL: label, S.FORMAT: ["JPEG"] * n, S.WIDTH: [512] * n, S.HEIGHT: [512] * n, S.SIZE: [1000] * n,
                  S.DECODE_PATH: ["nvjpeg" if y == 0 else "pil" for y in label]})
    x, names = metadata_matrix(t)
    assert "decode_path=nvjpeg" in names and list(x[:, names.index("decode_path=nvjpeg")][:2]) == [1.0, 0.0]
    report = shortcut_report(t)
    assert report["auc"] > 0.95 and report["warning"]
