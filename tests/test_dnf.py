"""The DNF detector family: the feature is the UNet's noise estimate, and DNF bundles train, scan and ensemble through the same jobs."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from safetensors.torch import save as save_safetensors

from detector_core.demo import encode, make_image
from detector_core.method import dnf
from detector_core.method.bundle import BundleError, DetectorBundle, load_bundle, save_bundle
from detector_core.method.cache import features_matrix, read_features
from detector_core.method.dnf import DnfExtractor, UnetNotFoundError, load_unet, unet_config
from detector_core.method.extractors import FeatureSpec
from detector_core.method.model import DetectorMLP, NoiseResNet, load_backbone
from detector_core.sources.images import decode_image
from detector_core.tables.catalog import read_table
from jobs import evaluate, scan, train
from jobs.common.errors import JobError
from jobs.scanning.decoding import load_images
from jobs.scanning.pipeline import Embedder

TINY = FeatureSpec(extractor="dnf", unet="test-tiny").resolved()


def _direct_unet():
    """The test-tiny UNet built here from its shipped config, not through detector_core.method.dnf."""
    from diffusers import UNet2DModel

    cfg = json.loads((Path(dnf.__file__).with_name("unet_configs") / "test-tiny.json").read_text())
    torch.manual_seed(0)
    return UNet2DModel(**{k: v for k, v in cfg.items() if not k.startswith("_")}).eval()


def _direct_dnf(images: list[Image.Image], timestep: int = 0) -> torch.Tensor:
    """Resize to 32x32 (bilinear, squashed), scale to [-1, 1], one UNet call: the reference's recipe."""
    x = np.stack([np.asarray(im.convert("RGB").resize((32, 32), Image.Resampling.BILINEAR), dtype=np.float64) for im in images])
    x = torch.tensor(x / 127.5 - 1.0, dtype=torch.float32).permute(0, 3, 1, 2)
    with torch.no_grad():
        return _direct_unet()(x, torch.full((len(images),), timestep)).sample.flatten(1)


def test_dnf_raw_values_equal_a_direct_unet_call_and_keep_float_values():
    rng = np.random.default_rng(0)
    images = [make_image(rng, size=(50, 70)), make_image(rng, "gen_checker8", size=(96, 64))]
    ex = DnfExtractor("test-tiny", values="raw")
    pixels = torch.from_numpy(np.stack([ex.prep.to_input(im) for im in images]))
    got = ex.extract(pixels)
    want = _direct_dnf(images)
    assert got.shape == (2, 3 * 32 * 32) and TINY.shape == (3, 32, 32)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert got.min() < 0 or got.max() > 1  # no clamping to [0, 1] as a PNG round trip would do
    later = DnfExtractor("test-tiny", timestep=500, values="raw").extract(pixels)
    torch.testing.assert_close(later, _direct_dnf(images, timestep=500), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(later, got)


def _reference_dnf(paths: list[Path], out_dir: Path, timestep: int = 0) -> torch.Tensor:
    """The DNF reference's steps, written out here: read_image -> float -> Resize bicubic -> /255*2-1 -> UNet ->
    torchvision.utils.save_image to a file named like the source -> read back as its classifier's ImageFolder +
    ToTensor does."""
    from torchvision import transforms
    from torchvision.io import read_image
    from torchvision.utils import save_image

    resize = transforms.Resize((32, 32), interpolation=transforms.InterpolationMode.BICUBIC)
    xs = []
    for p in paths:
        x = read_image(str(p)).float()
        x = torch.cat([x] * 3) if x.shape[0] == 1 else x[:3]
        xs.append((resize(x) / 255.0) * 2.0 - 1.0)
    with torch.no_grad():
        et = _direct_unet()(torch.stack(xs), torch.ones(len(xs)) * timestep).sample
    out = []
    for p, item in zip(paths, et):
        saved = out_dir / p.name
        save_image(item, str(saved))
        out.append(transforms.ToTensor()(Image.open(saved).convert("RGB")))
    return torch.stack(out).flatten(1)


def test_dnf_reference_values_equal_the_reference_bit_for_bit(tmp_path):
    rng = np.random.default_rng(3)
    src = tmp_path / "src"
    src.mkdir()
    (tmp_path / "saved").mkdir()
    images = [make_image(rng, size=(50, 70)), make_image(rng, "gen_checker8", size=(96, 64)),
              make_image(rng, size=(33, 41)), make_image(rng, "gen_checker8", size=(64, 64)).convert("L")]
    paths = []
    for i, (im, ext) in enumerate(zip(images, ["png", "png", "jpg", "jpg"])):
        paths.append(src / f"im{i}.{ext}")
        im.save(paths[-1], quality=90) if ext == "jpg" else im.save(paths[-1])
    want = _reference_dnf(paths, tmp_path / "saved")
    ex = DnfExtractor("test-tiny")
    assert ex.values == "reference" and ex.precision == "fp32"
    decoded = [decode_image(p.read_bytes()) for p in paths]
    pixels = torch.from_numpy(np.stack([ex.prep.to_input(d.image) for d in decoded]))
    assert pixels.dtype == torch.float32
    got = ex.extract(pixels, jpeg=np.array([d.format == "JPEG" for d in decoded]))
    assert torch.equal(got, want)
    # The pipeline's own stages (decode on CPU workers, the Embedder actor) pass each row's format on.
    batch = load_images({"uri": np.array([str(p) for p in paths], dtype=object), "error_stage": np.full(4, None, dtype=object)}, [TINY])
    table = Embedder(TINY)(batch)
    assert torch.equal(torch.tensor(features_matrix(table["features"])), want)
    assert got.min() >= 0 and got.max() <= 1 and torch.equal(torch.round(got * 255) / 255, got)
    # Each step matters: no JPEG round trip for the JPEG sources, or the raw float feature, differs.
    assert not torch.equal(ex.extract(pixels, jpeg=np.zeros(4, dtype=bool))[2:], want[2:])
    raw = DnfExtractor("test-tiny", values="raw")
    assert raw.prep.dtype == "uint8" and FeatureSpec(extractor="dnf", unet="test-tiny", dnf_values="raw").resolved().id == "dnf/test-tiny/t0/32"
    assert TINY.id == "dnf/test-tiny/t0/32/q8" and FeatureSpec.from_dict({"extractor": "dnf", "unet": "test-tiny"}).dnf_values == "raw"


def test_unet_loads_from_a_folder_a_pipeline_folder_and_s3(tmp_path, s3_bucket):
    import s3fs

    unet = load_unet("test-tiny")
    unet.save_pretrained(tmp_path / "unet")
    shutil.copytree(tmp_path / "unet", tmp_path / "pipeline" / "unet")
    fs = s3fs.S3FileSystem()
    fs.put(str(tmp_path / "pipeline") + "/", f"{s3_bucket}/weights/pipeline/", recursive=True)
    x = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8))
    want = DnfExtractor("test-tiny").extract(x)
    for ref in (str(tmp_path / "unet"), str(tmp_path / "pipeline"), f"{s3_bucket}/weights/pipeline"):
        assert unet_config(ref)["sample_size"] == 32
        ex = DnfExtractor(ref)
        torch.testing.assert_close(ex.extract(x), want, rtol=0, atol=0)
    with pytest.raises(UnetNotFoundError, match="no such folder"):
        DnfExtractor(str(tmp_path / "missing"))
    with pytest.raises(UnetNotFoundError, match="huggingface-cli download"):
        FeatureSpec(extractor="dnf", unet="google/ddpm-bedroom-256").resolved()
    (tmp_path / "empty").mkdir()
    with pytest.raises(UnetNotFoundError, match="no config.json"):
        DnfExtractor(str(tmp_path / "empty"))


def test_dnf_bundle_round_trip_and_clip_ids_unchanged(tmp_path):
    torch.manual_seed(0)
    model = NoiseResNet("resnet18", TINY.shape).eval()
    b = DetectorBundle(model=model, features=TINY, threshold_logit=0.3)
    save_bundle(b, str(tmp_path / "dnf"))
    back = load_bundle(str(tmp_path / "dnf"))
    assert back.kind == "dnf-resnet" and back.detector_id.startswith("dnf-resnet-") and back.features == TINY
    x = torch.randn(4, TINY.dim)
    torch.testing.assert_close(back.model(x), model(x), rtol=0, atol=0)
    meta = json.loads((tmp_path / "dnf" / "detector.json").read_text())
    assert (meta["unet"], meta["timestep"], meta["image_size"], meta["input_shape"]) == ("test-tiny", 0, 32, [3, 32, 32])
    assert meta["model_config"] == {"arch": "resnet18", "in_shape": [3, 32, 32]}
    with pytest.raises(BundleError, match="does not match"):
        DetectorBundle(model=NoiseResNet("resnet18", (3, 16, 16)), features=TINY)

    # A CLIP bundle's id is the hash of exactly what it hashed before DNF existed.
    torch.manual_seed(0)
    mlp = DetectorMLP(64).eval()
    clip = DetectorBundle(model=mlp, features=FeatureSpec(clip_model="test-tiny", feature_mode="image"), threshold_logit=0.5)
    h = hashlib.sha256(save_safetensors({k: v.contiguous() for k, v in mlp.state_dict().items()}))
    h.update(json.dumps({"kind": "clip-mlp", "clip_model": "test-tiny", "pretrained": "none", "feature_mode": "image",
                         "model_config": mlp.config(), "threshold_logit": 0.5}, sort_keys=True).encode())
    assert save_bundle(clip, str(tmp_path / "clip")) == h.hexdigest()


def test_resnet_starts_from_a_torchvision_state_dict(tmp_path, demo_manifest, capsys):
    import torchvision

    torch.manual_seed(0)
    src = torchvision.models.resnet18(num_classes=1000)
    torch.save(src.state_dict(), tmp_path / "resnet18.pth")
    model = NoiseResNet("resnet18", TINY.shape)
    assert sorted(load_backbone(model, str(tmp_path / "resnet18.pth"))) == ["fc.bias", "fc.weight"]
    torch.testing.assert_close(model.net.conv1.weight, src.conv1.weight, rtol=0, atol=0)
    torch.testing.assert_close(model.net.layer4[1].bn2.running_var, src.layer4[1].bn2.running_var, rtol=0, atol=0)
    assert model.net.fc.out_features == 1
    with pytest.raises(ValueError, match="does not fit resnet50"):
        load_backbone(NoiseResNet("resnet50", TINY.shape), str(tmp_path / "resnet18.pth"))
    # The job refuses a missing file before it embeds or trains anything.
    with pytest.raises(JobError, match="--resnet-init"):
        train.main(["--manifest", str(demo_manifest), "--output", str(tmp_path / "out"), "--extractor", "dnf",
                    "--resnet-init", str(tmp_path / "nope.pth")])
    assert not (tmp_path / "out").exists()
    with pytest.raises(FileNotFoundError, match="--resnet-init"):
        load_backbone(model, str(tmp_path / "nope.pth"))


def _scores(out) -> dict:
    t = read_table(str(out), "scores")
    return {(u, d): z for u, d, z in zip(t["uri"].to_pylist(), t["detector_id"].to_pylist(), t["logit"].to_pylist())}


def test_dnf_trains_scans_and_ensembles_with_clip(ray_local, demo_manifest, tmp_path):
    out = tmp_path / "dnf"
    metrics = train.main(["--manifest", str(demo_manifest), "--output", str(out), "--extractor", "dnf", "--unet", "test-tiny",
                          "--resnet", "resnet18", "--epochs", "6", "--batch-size", "32", "--lr", "1e-3", "--embed-batch-size", "128"])
    assert metrics["val_auc"] > 0.6, metrics["history"]  # the tiny random UNet's noise still carries the checkerboards
    bundle = load_bundle(str(out / "detector"))
    assert bundle.kind == "dnf-resnet" and bundle.features == TINY and bundle.training_config["resnet"] == "resnet18"

    # The cache holds the reference's DNF of each image through Ray Data. Not bit for bit here:
    # the UNet ran on batches of 128 and the mirror on 5, and the CPU convolutions round
    # differently with the batch size -- the reference itself gives 1 value in 15,360 one
    # level apart between batch 1 and batch 5 -- so a few values may sit one level apart.
    cached = read_features(str(out / "features"), ["uri", "features"])[:5]
    (tmp_path / "saved").mkdir()
    want = _reference_dnf([Path(u) for u in cached["uri"].to_pylist()], tmp_path / "saved")
    levels = (torch.tensor(features_matrix(cached["features"])) - want).abs() * 255
    assert levels.max() < 1.001 and (levels > 0).float().mean() < 1e-3

    # The reference's recipe on the same cache, on two workers: Adam, BCE, batch 64, flips,
    # lr cut tenfold on a validation-accuracy plateau (rank 0 decides, every worker follows).
    ref = train.main(["--features", str(out / "features"), "--output", str(tmp_path / "dnf-ref"), "--recipe", "dnf-reference",
                      "--resnet", "resnet18", "--epochs", "4", "--patience", "1", "--workers", "2"])
    tc = load_bundle(str(tmp_path / "dnf-ref" / "detector")).training_config
    assert (tc["recipe"], tc["lr"], tc["batch_size"], tc["loss"], tc["sam"], tc["weight_decay"]) == ("dnf-reference", 1e-4, 64, "erm", False, 0.0)
    history = ref["history"]
    assert history[0]["lr"] == 1e-4
    # The reference's EarlyStopping(patience=1, delta=-0.001), a fresh one with delta -0.002 after each cut, stop below 1e-6.
    best, margin, lr, stopped = None, 0.001, 1e-4, False
    for i, h in enumerate(history):
        assert h["lr"] == pytest.approx(lr, rel=1e-12), (i, history)
        if best is None or h["val_accuracy"] > best + margin:
            best = h["val_accuracy"]
        else:
            lr, best, margin = lr / 10, None, 0.002
            stopped = lr < 1e-6
    assert len(history) == 4 or stopped, history
    # Ray Train's CheckpointConfig kept the best epoch by validation accuracy; of equal ones, the later.
    acc = [h["val_accuracy"] for h in history]
    assert ref["best_epoch"] == max(i for i, a in enumerate(acc) if a == max(acc))

    # jobs.evaluate takes the DNF bundle as it takes a CLIP one: on the validation split it
    # reproduces the AUC that training measured on the same images -- up to the one-level
    # differences above: evaluate embeds the ~120 validation images in other batches than the
    # cache did, a value one level apart moves a logit a little, and a logit that crosses
    # another reorders one of the ~60 x 60 real/generated pairs (seen: 0.79186 against 0.79159,
    # one pair of 3,685). A detector read wrongly (another model, other features) is off by far
    # more than four pairs.
    result = evaluate.main(["--detector", str(out / "detector"), "--manifest", str(demo_manifest), "--output", str(tmp_path / "eval"),
                            "--split", "val"])
    assert result["detector_kind"] == "dnf-resnet"
    clean = result["conditions"]["clean"]["all"]
    pairs = clean["n_real"] * clean["n_generated"]
    assert clean["auc"] == pytest.approx(metrics["val_auc"], abs=4 / pairs + 1e-9)

    # Scan a folder with a CLIP bundle, then ensemble the DNF bundle into the same output.
    rng = np.random.default_rng(3)
    folder = tmp_path / "bucket"
    folder.mkdir()
    for i in range(8):  # PNGs and JPEGs: the reference round-trips a JPEG source's noise through a JPEG file
        fmt = "JPEG" if i % 4 == 1 else "PNG"
        (folder / f"img_{i}.{'jpg' if fmt == 'JPEG' else 'png'}").write_bytes(encode(make_image(rng, "real" if i % 2 else "gen_checker8"), fmt))
    (folder / "broken.jpg").write_bytes(b"not an image")
    torch.manual_seed(0)
    clip_dir = tmp_path / "clip-detector"
    save_bundle(DetectorBundle(model=DetectorMLP(64).eval(), features=FeatureSpec(clip_model="test-tiny")), str(clip_dir))
    clip_id = load_bundle(str(clip_dir)).detector_id

    base = ["--input", str(folder), "--batch-size", "4"]
    scan.main(["--detector", str(clip_dir), "--output", str(tmp_path / "scan-both"), *base])
    # Ensemble over an output the CLIP detector already scanned: only the DNF detector has work;
    # every object then has one row per detector.
    summary = scan.main(["--detector", str(clip_dir), "--ensemble", str(out / "detector"), "--output", str(tmp_path / "scan-both"), *base])
    per = {d["detector_id"]: d for d in summary["detectors"]}
    assert per[clip_id]["scored"] == 0 and per[clip_id]["skipped"] == 9
    assert (per[bundle.detector_id]["scored"], per[bundle.detector_id]["errors"]) == (8, 1)
    rows = read_table(str(tmp_path / "scan-both"), "scores")
    dnf_rows = rows.filter(pc.equal(rows["detector_id"], bundle.detector_id))
    clip_rows = rows.filter(pc.equal(rows["detector_id"], clip_id))
    assert rows.num_rows == 16 and dnf_rows.num_rows == clip_rows.num_rows == 8
    files = sorted((tmp_path / "scan-both" / "scores").rglob("*.parquet"))
    assert len(files) == 2 and pq.read_schema(files[0]) == pq.read_schema(files[1])  # one file schema for both kinds
    assert "detector_kind" in pq.read_schema(files[0]).names
    assert set(dnf_rows["detector_kind"].to_pylist()) == {"dnf-resnet"} and set(clip_rows["detector_kind"].to_pylist()) == {"clip-mlp"}
    assert set(dnf_rows["feature_id"].to_pylist()) == {"dnf/test-tiny/t0/32/q8"}
    errors = read_table(str(tmp_path / "scan-both"), "errors")
    assert sorted(errors["detector_kind"].to_pylist()) == ["clip-mlp", "dnf-resnet"]
    assert set(errors["uri"].to_pylist()) == {str(folder / "broken.jpg")}

    # DNF scan scores = the reference's DNF + the ResNet, computed directly (up to the one-level
    # differences of a different batch size, above).
    uris = sorted(dnf_rows["uri"].to_pylist())
    (tmp_path / "saved-scan").mkdir()
    with torch.no_grad():
        direct = bundle.model(_reference_dnf([Path(u) for u in uris], tmp_path / "saved-scan")).double().numpy()
    got = dict(zip(dnf_rows["uri"].to_pylist(), dnf_rows["logit"].to_pylist()))
    np.testing.assert_allclose([got[u] for u in uris], direct, rtol=1e-3, atol=1e-3)
    both = _scores(tmp_path / "scan-both")

    # A fresh ensemble scan decodes once and records both; a re-run adds nothing.
    fresh = scan.main(["--detector", str(clip_dir), "--ensemble", str(out / "detector"), "--output", str(tmp_path / "scan-fresh"), *base])
    assert (fresh["scored"], fresh["errors"]) == (16, 2)
    fresh_scores = _scores(tmp_path / "scan-fresh")
    assert fresh_scores.keys() == both.keys()
    for key, z in both.items():  # a detector's score does not depend on the detectors beside it
        assert fresh_scores[key] == pytest.approx(z, rel=1e-6, abs=1e-6), key
    again = scan.main(["--detector", str(clip_dir), "--ensemble", str(out / "detector"), "--output", str(tmp_path / "scan-fresh"), *base])
    assert (again["scored"], again["errors"], again["skipped"]) == (0, 0, 9)
    runs = [json.loads(p.read_text()) for p in (tmp_path / "scan-fresh" / "runs").glob("*.json")]
    assert len(runs) == 2 and all(len(r["detectors"]) == 2 for r in runs)
    scores = read_table(str(tmp_path / "scan-fresh"), "scores")
    flagged = read_table(str(tmp_path / "scan-fresh"), "flagged")
    assert flagged.num_rows == pc.sum(scores["flagged"]).as_py()
