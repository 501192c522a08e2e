"""The embedding stage that ``jobs.embed``, ``jobs.train``, ``jobs.evaluate`` and ``jobs.ablation`` run.

``EmbedConfig`` and ``run_embedding(cfg)``: a labelled manifest, embedded once into a Parquet
feature cache in the format ``detector_core.method.cache`` describes. Jobs call it with a config
object (not an argv list), and none of them imports another job for it: this module is the
shared wiring, ``jobs/embed.py`` the command line. What it does is ``jobs/embed.py``'s docstring.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from detector_core import schema as S
from detector_core.method.cache import DATA, ERRORS, SUCCESS, cache_key, read_marker
from detector_core.method.dnf import UnetNotFoundError
from detector_core.method.extractors import FeatureSpec, feature_compute, preprocess_for
from detector_core.sources.manifest import ManifestError, read_manifest, validate_manifest
from detector_core.storage import arrow_fs, join, open_fs, s3_storage_options
from jobs.common.errors import JobError, require_weights
from jobs.common.flags import opt
from jobs.common.options import ExtractorOptions, RayOptions, StorageOptions
from jobs.common.outputs import config_dict, write_json
from jobs.common.ray_setup import init_ray


@dataclass
class EmbedConfig(RayOptions, StorageOptions, ExtractorOptions):
    manifest: str = opt("", "labelled manifest: .parquet/.csv with uri,label[,caption,generator,split], or a real/ + generated/ tree")
    output: str = opt("", "feature cache folder (local path or s3://…)")
    batch_size: int = opt(64, "images per embedding batch", within="[1, inf)")
    actors: int = opt(1, "number of CLIP actors (one GPU each with --gpu)", within="[1, inf)")
    gpu: bool = opt(False, "run CLIP actors on GPUs (num_gpus=1 each)")
    val_fraction: float = opt(0.2, "fraction of rows without a split that go to validation (by uri hash)", within="[0, 1)")
    calib_fraction: float = opt(0.1, "fraction of rows without a split that go to the calibration split (by uri hash): the threshold is set on it, not on validation", within="[0, 1)")
    perturb: str = opt("", "embed perturbed images: one kind:value of detector_core.method.perturb (jpeg:75, resize:0.5, blur:2, crop:0.6); for jobs.evaluate")
    perturb_seed: int = opt(0, "seed of random perturbations (crop positions)", within="[0, inf)")

    def spec(self, storage_options: dict | None = None) -> FeatureSpec:
        """The resolved extractor spec (DNF: the input size read from the UNet's config)."""
        return self.feature_spec().resolved(storage_options)


def run_embedding(cfg: EmbedConfig, storage_options: dict | None = None) -> dict:
    """Embed (or reuse) the feature cache; returns the cache's summary."""
    so = storage_options if storage_options is not None else s3_storage_options(cfg.s3_endpoint or None)
    try:
        vm = validate_manifest(read_manifest(cfg.manifest, so), val_fraction=cfg.val_fraction, calib_fraction=cfg.calib_fraction)
    except ManifestError as exc:
        raise JobError(str(exc))
    table = vm.table
    try:
        spec = cfg.spec(so)
    except UnetNotFoundError as exc:
        raise JobError(str(exc))
    if spec.needs_captions:
        missing = table.column(S.CAPTION).null_count
        if missing:
            raise JobError(f"--feature-mode image+text needs a caption for every image; {missing} of {table.num_rows} rows have none")
    key = cache_key(table, spec, cfg.perturb, cfg.perturb_seed, cfg.jpeg_draft)
    marker = read_marker(cfg.output, so)
    if marker and marker.get("key") == key:
        print(f"feature cache {cfg.output} is up to date (key {key[:12]}); not embedding again")
        return {**marker, "reused": True}

    require_weights(spec, so)
    import ray

    from jobs.scanning.decoding import load_images
    from jobs.scanning.pipeline import Embedder, check_decode

    try:
        check_decode([spec], cfg.gpu)
    except ValueError as exc:
        raise JobError(str(exc))

    init_ray(cfg.ray_address or None)
    fs, root = open_fs(cfg.output, so)
    data_dir = join(cfg.output, DATA)
    if fs.exists(join(root, DATA)):
        fs.rm(join(root, DATA), recursive=True)  # a stale or half-written cache
    start = time.time()
    rows_per_block = max(1, min(1024, -(-table.num_rows // 64)))
    blocks = [table.slice(i, rows_per_block) for i in range(0, table.num_rows, rows_per_block)]
    ds = ray.data.from_arrow(blocks)
    ds = ds.map_batches(
        load_images,
        # The evidence columns go into the cache: the shortcut report counts them as container features.
        fn_kwargs=dict(preps=[preprocess_for(spec)], storage_options=so, draft=cfg.jpeg_draft, perturbation=cfg.perturb, perturb_seed=cfg.perturb_seed,
                       evidence=True),
        batch_size=cfg.batch_size,
        batch_format="numpy",
    )
    ds = ds.map_batches(
        Embedder,
        fn_constructor_kwargs=dict(spec=spec, storage_options=so, gpu=cfg.gpu),
        batch_size=cfg.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=cfg.actors),
        num_gpus=1 if cfg.gpu else 0,
    )
    pa_fs, data_path = arrow_fs(data_dir, so)
    ds.write_parquet(data_path, filesystem=pa_fs)
    elapsed = time.time() - start

    written = pads.dataset(data_path, filesystem=pa_fs, format="parquet")
    failed = written.to_table(columns=[S.URI, S.ERROR_STAGE, S.ERROR_TYPE, S.ERROR_MESSAGE], filter=pads.field(S.ERROR_STAGE).is_valid())
    manifest_bad = vm.bad.append_column(S.ERROR_STAGE, pa.array(["manifest"] * vm.bad.num_rows, pa.string())).select(
        [S.URI, S.ERROR_STAGE, S.ERROR_TYPE, S.ERROR_MESSAGE]
    )
    errors = pa.concat_tables([manifest_bad, failed])
    with fs.open(join(root, ERRORS), "wb") as f:
        pq.write_table(errors, f)
    n_ok = written.count_rows(filter=pads.field(S.ERROR_STAGE).is_null())
    by_reason = {}
    for stage, kind in zip(errors.column(S.ERROR_STAGE).to_pylist(), errors.column(S.ERROR_TYPE).to_pylist()):
        by_reason[f"{stage}:{kind}"] = by_reason.get(f"{stage}:{kind}", 0) + 1
    summary = {
        "key": key,
        "manifest": cfg.manifest,
        **spec.to_dict(),
        "feature_id": spec.id,
        "feature_dim": spec.dim,
        "feature_shape": list(spec.shape),
        # Precision, decode and resize of these features: bundles trained on them carry it, scans compare with it.
        "feature_compute": feature_compute(spec, cfg.gpu, draft=cfg.jpeg_draft and not cfg.perturb),
        "rows_in_manifest": table.num_rows + vm.bad.num_rows,
        "embedded": n_ok,
        "errors": errors.num_rows,
        "errors_by_reason": by_reason,
        "seconds": round(elapsed, 2),
        "images_per_second": round(table.num_rows / elapsed, 2) if elapsed > 0 else None,
        "config": config_dict(cfg),
    }
    write_json(join(cfg.output, SUCCESS), summary, so)
    print(f"embedded {n_ok} images into {cfg.output} in {elapsed:.1f} s; {errors.num_rows} unusable rows {by_reason or ''}")
    return {**summary, "reused": False}

