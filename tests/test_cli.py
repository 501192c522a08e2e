"""Every job's command line: numbers are checked against declared intervals before any work starts.

A job given ``--target-fpr 1.5`` used to embed, train and retry for minutes before dying in an
actor; now every int and float flag of every job config declares the interval it must lie in
(``opt(..., within="(0, 1)")``), and ``parse_config`` refuses a value outside it with one
``ERROR:`` line. These tests find the configs by walking ``jobs/``, so a new flag without an
interval fails here.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import pkgutil
import subprocess
import sys
import typing
from pathlib import Path

import pytest

import jobs
from jobs.common.errors import JobError
from jobs.common.flags import in_interval, parse_config, parse_interval

ROOT = Path(__file__).resolve().parents[1]


def _configs():
    for m in pkgutil.walk_packages(jobs.__path__, "jobs."):  # the verbs and their parts (jobs.scanning.config, ...)
        mod = importlib.import_module(m.name)
        for v in vars(mod).values():
            if isinstance(v, type) and dataclasses.is_dataclass(v) and v.__module__ == mod.__name__ and v.__name__.endswith("Config"):
                yield v


def _numeric_fields(cls):
    hints = typing.get_type_hints(cls)
    return [f for f in dataclasses.fields(cls) if hints[f.name] in (int, float)]


def test_every_number_flag_declares_an_interval_its_default_lies_in():
    seen = 0
    for cls in _configs():
        for f in _numeric_fields(cls):
            seen += 1
            assert "within" in f.metadata, f"{cls.__name__}.{f.name}: a number flag needs within='[low, high]'"
            d = f.default
            assert (isinstance(d, float) and math.isnan(d)) or in_interval(d, f.metadata["within"]), f"{cls.__name__}.{f.name}={d}"
    assert seen > 50


@pytest.mark.parametrize(("value", "interval", "inside"), [
    (0, "[0, 1]", True), (0, "(0, 1]", False), (1, "[0, 1)", False), (1, "[0, 1]", True), (0.5, "(0, 1)", True),
    (1e9, "[1, inf)", True), (0, "[1, inf)", False), (-1, "[-1, inf)", True), (float("nan"), "[0, 1]", False),
    (float("inf"), "[1, inf)", False),
])
def test_interval_membership(value, interval, inside):
    assert in_interval(value, interval) is inside


def test_malformed_interval_is_refused():
    for bad in ("0, 1", "[0; 1]", "[0, x)", "[]"):
        with pytest.raises(ValueError):
            parse_interval(bad)


def _outside(f) -> list:
    """Values just outside a field's interval, on each finite side."""
    low, high, low_in, high_in = parse_interval(f.metadata["within"])
    step = 1 if isinstance(f.default, int) else 0.5
    values = []
    if math.isfinite(low):
        values.append(low - step if low_in else low)
    if math.isfinite(high):
        values.append(high + step if high_in else high)
    return [type(f.default)(v) if isinstance(f.default, int) else v for v in values]


def test_every_number_flag_refuses_a_value_outside_its_interval(capsys):
    refused = 0
    for cls in _configs():
        for f in _numeric_fields(cls):
            flag = "--" + f.name.replace("_", "-")
            for v in _outside(f):
                with pytest.raises(JobError) as e:
                    parse_config(cls, [flag, str(v)])
                assert e.value.code == 2
                assert str(e.value) == f"{flag} must be in {f.metadata['within']}, got {v}", e.value
                refused += 1
            inside = f.default if not (isinstance(f.default, float) and math.isnan(f.default)) else 0.5
            assert getattr(parse_config(cls, [flag, str(inside)]), f.name) == inside
    assert refused > 50


def test_train_with_an_impossible_fpr_ends_at_once_with_one_line(tmp_path):
    """The issue's case, as a user runs it: no embedding, no Ray, nothing written."""
    res = subprocess.run([sys.executable, "-m", "jobs.train", "--manifest", str(tmp_path / "m.parquet"), "--output", str(tmp_path / "out"),
                          "--target-fpr", "1.5"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1] == "ERROR: --target-fpr must be in (0, 1), got 1.5"
    assert not (tmp_path / "out").exists()


def test_gpu_asked_for_where_cuda_is_unusable_is_an_error_never_the_cpu():
    """This machine has no usable CUDA (CI, this workstation): ``--gpu`` must raise, naming why, not fall back."""
    import torch

    from detector_core.devices import DeviceError, cuda_unusable_reason, select_device
    from jobs.scanning.pipeline import Scorer

    assert select_device(False) == torch.device("cpu")
    reason = cuda_unusable_reason()
    if reason is None:
        pytest.skip("CUDA works here: select_device(True) is the GPU")
    with pytest.raises(DeviceError, match="--gpu was given but CUDA is not usable") as e:
        select_device(True)
    assert reason in str(e.value)
    with pytest.raises(DeviceError):  # the scan's actor refuses at start, before loading any model
        Scorer(["/nonexistent/bundle"], scan_id="s", gpu=True)


def test_training_defaults_to_the_papers_clip_and_says_what_to_pass_when_its_weights_are_absent(tmp_path):
    """No silent random CLIP: the default is ViT-L-14/openai, and without its weights the job ends before any work."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from jobs.train import TrainConfig

    cfg = parse_config(TrainConfig, [])
    assert (cfg.clip_model, cfg.pretrained) == ("ViT-L-14", "openai")
    from detector_core.method.features import _cached_tag_weights

    if _cached_tag_weights("ViT-L-14", "openai", None):
        pytest.skip("the ViT-L-14 openai weights are cached on this machine")
    pq.write_table(pa.table({"uri": ["a.png", "b.png"], "label": [0, 1]}), tmp_path / "m.parquet")
    for job in ("jobs.train", "jobs.embed"):
        res = subprocess.run([sys.executable, "-m", job, "--manifest", str(tmp_path / "m.parquet"), "--output", str(tmp_path / job)],
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
        last = res.stderr.strip().splitlines()[-1]
        assert res.returncode == 2 and last.startswith("ERROR: the 'openai' weights of ViT-L-14 are not in the local open_clip cache"), last
        assert "--pretrained" in last and "test-tiny" in last and "starting a private local Ray" not in res.stderr


def test_a_dead_actor_is_reported_by_what_killed_it(ray_local):
    """A Ray actor whose constructor raised (e.g. a Scorer whose weights are missing): the job's last line names that error."""
    import ray

    from detector_core.method.features import WeightsNotFoundError
    from jobs.common.errors import _cause

    @ray.remote(num_cpus=0)
    class Broken:
        def __init__(self):
            raise WeightsNotFoundError("--pretrained s3://bucket/weights.bin does not exist")

        def ping(self):
            return 1

    with pytest.raises(Exception) as info:
        ray.get(Broken.remote().ping.remote(), timeout=120)
    assert "ActorDiedError" in type(info.value).__name__ or "RayActorError" in type(info.value).__name__
    assert _cause(info.value) == "WeightsNotFoundError: --pretrained s3://bucket/weights.bin does not exist"


def test_a_scan_whose_bundle_weights_are_missing_is_refused_before_ray(tmp_path, capsys):
    from detector_core.method.bundle import DetectorBundle, save_bundle
    from detector_core.method.extractors import FeatureSpec
    from detector_core.method.model import DetectorMLP
    from jobs import scan

    missing = tmp_path / "vit.bin"
    save_bundle(DetectorBundle(model=DetectorMLP(64).eval(), features=FeatureSpec(clip_model="test-tiny", pretrained=str(missing))),
                str(tmp_path / "det"))
    (tmp_path / "in").mkdir()
    with pytest.raises(JobError) as e:
        scan.main(["--detector", str(tmp_path / "det"), "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out")])
    assert str(missing) in str(e.value), e.value
    assert not (tmp_path / "out").exists()
