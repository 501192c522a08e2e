"""Train the CVaR + AUC + SAM detector on Ray Train and ship a calibrated bundle.

Stage 1 (``--manifest``): embed the manifest once into a feature cache with
``jobs.embed`` (reused when the manifest and extractor settings are unchanged); or pass
``--features CACHE`` to train on an existing cache. ``--verdicts SCAN_OUT`` adds the images
reviewers judged on that scan output's review pages (``jobs.audit verdicts import``) to the
manifest as train-split rows: generated = 1, real = 0, unsure left out; ``--declared-labels
SCAN_OUT`` adds the images of that output whose files declared their origin (generated = 1,
captured = 0; ``detector_core.sources.provenance``), a verdict on the same image winning. Both are
recorded in the bundle's training config (``verdict_rows``, ``declared_rows``). Stage 2: a ``TorchTrainer`` with
``--workers`` workers (GPUs with ``--gpu``) trains the classifier on Ray Data shards of
the cache. ``--extractor clip`` (default): the paper's MLP on CLIP features, bundle kind
``clip-mlp``. ``--extractor dnf``: a ResNet (``--resnet``, ResNet-50 as in the DNF paper) on
Diffusion Noise Features of ``--unet`` (``--dnf-values reference``: the reference's 8-bit
feature), bundle kind ``dnf-resnet``; trained with the same loss options, SAM and distributed
step (``--recipe cvar-sam``) or as the DNF reference trains it (``--recipe dnf-reference``:
BCE, Adam, batch 64, flips, lr/10 on a validation-accuracy plateau; docs/method.md section 8).

Distributed semantics (docs/method.md section 5):

- The loss is non-decomposable, so every worker all-gathers the logits and labels of
  the global batch (autograd-aware) and computes the loss on it; DDP's gradient
  average then equals the single-process gradient for the same global batch, up to
  BatchNorm (below): exact with ``--sync-bn`` (``tests/test_distributed.py`` checks it
  against a single process).
- SAM: by default pass one all-reduces too, so every worker perturbs along the global
  gradient -- the single-process SAM step. ``--sam-unsynced-perturbation`` skips that
  sync (``no_sync``, one all-reduce fewer): each worker then perturbs along the gradient
  of its share of the *global* loss, which is not the SAM paper's m-sharpness (that uses
  each worker's own loss). Either way pass two is averaged, so the workers' weights stay
  identical (tested).
- BatchNorm uses per-worker batch statistics (ghost batch norm over each worker's
  ``batch_size / workers`` rows, broadcast from rank 0 for the running statistics), so N
  workers are not exactly one process with the whole batch; exact SyncBatchNorm costs an
  all-reduce per BN layer per pass and is CUDA-only in torch; ``--sync-bn`` turns it on
  for GPU runs.
- Dropout masks differ per rank (the generator is seeded with ``seed`` and the rank after
  the model is built; initial weights are the same everywhere).

The worker loop is ``jobs/training/worker.py``. Every epoch rank 0 evaluates on the validation split (AUC, AP, accuracy, TPR at 1 %
FPR), reports through Ray Train, rewrites ``OUT/history.jsonl`` and checkpoints model,
SAM/AdamW state, scheduler and epoch to ``--storage-path`` (local or S3). Ray Train keeps
two: the best by the selection metric (``CheckpointConfig(checkpoint_score_attribute)``;
validation AUC, accuracy for ``dnf-reference``; of equal scores, the later epoch) and the
latest. ``FailureConfig(max_failures)`` restarts failed workers from the latest
checkpoint; re-submitting the same ``--run-name`` and storage resumes. At the end the
best checkpoint's model becomes the bundle, its threshold calibrated to ``--target-fpr``
on the real images of the ``calib`` split (``--calib-fraction``: rows that neither trained
nor picked the epoch, so the achieved rate in ``metrics.json`` is not optimistic; scored in
Ray tasks, only logits reach the driver). The bundle's ``calibration`` records the reals it
used, the 95 % Clopper-Pearson interval on the rate they gave, and a warning (also on
stderr) when they are fewer than ``3 / --target-fpr``, the rule of three; ``OUT/detector/``, ``OUT/metrics.json`` (with the
shortcut report, ``detector_core.method.shortcuts``) and ``OUT/config.json`` are written.

    python -m jobs.train --manifest data/manifest.parquet --output out/run1
    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python -m jobs.train --manifest s3://bucket/d3/manifest.parquet --output s3://bucket/detectors/run1 \\
        --clip-model ViT-L-14 --pretrained s3://bucket/weights/vit-l-14-openai.bin --feature-mode image \\
        --workers 4 --gpu
    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python -m jobs.train --manifest s3://bucket/d3/manifest.parquet --output s3://bucket/detectors/dnf1 \\
        --extractor dnf --unet s3://bucket/weights/ddpm-bedroom-256 --recipe dnf-reference --epochs 1000 --workers 4 --gpu
"""

from __future__ import annotations

import hashlib
import sys
import time

import numpy as np
import torch

from detector_core import schema as S
from detector_core.method.bundle import DetectorBundle, save_bundle
from detector_core.method.cache import DATA, SUCCESS, cache_spec, labelled_arrays, read_marker
from detector_core.method.metrics import calibrate_threshold, calibration_record
from detector_core.method.model import NoiseResNet, build_classifier, load_backbone
from detector_core.method.shortcuts import dataset_report
from detector_core.method.training import predict_logits
from detector_core.storage import arrow_fs, join, s3_storage_options
from jobs.common.errors import JobError, require_weights, run_main
from jobs.common.flags import parse_config
from jobs.common.options import extractor_options
from jobs.common.outputs import config_dict, open_output, write_json, write_parquet
from jobs.common.ray_setup import init_ray
from jobs.training.config import TrainConfig
from jobs.training.worker import load_state, train_loop_per_worker


def _real_logits(model: torch.nn.Module, data_path: str, pa_fs, split: str) -> np.ndarray:
    """The model's logits on the real images of one split of the cache, scored in Ray tasks (only logits reach the driver)."""
    import ray.data
    from ray.data.expressions import col

    def score(batch: dict, model) -> dict:
        return {"logit": predict_logits(model, torch.from_numpy(batch["x"])).double().cpu().numpy()}

    ds = ray.data.read_parquet(data_path, filesystem=pa_fs).select_columns([S.FEATURES, S.LABEL, S.SPLIT, S.ERROR_STAGE])
    ds = ds.filter(expr=col(S.ERROR_STAGE).is_null() & (col(S.SPLIT) == split) & (col(S.LABEL) == 0))
    ds = ds.map_batches(labelled_arrays, batch_format="pyarrow").map_batches(score, fn_kwargs={"model": model}, batch_format="numpy")
    logits = [b["logit"] for b in ds.iter_batches(batch_size=None, batch_format="numpy")]
    return np.concatenate(logits) if logits else np.zeros(0)


def _shortcuts(dataset, seed: int) -> dict:
    """The shortcut report on the cache (detector_core.method.shortcuts); its warning goes to stderr too."""
    report = dataset_report(dataset, seed=seed)
    print(f"shortcut report: label from metadata alone, cross-validated AUC {report['auc']}; per generator {report['per_generator']}",
          flush=True)
    if report["warning"]:
        print(f"WARNING: {report['warning']}", file=sys.stderr, flush=True)
    return report


def _run_name(cfg: TrainConfig) -> str:
    return cfg.run_name or "train-" + hashlib.sha1(cfg.output.rstrip("/").encode()).hexdigest()[:10]


def _ray_storage(cfg: TrainConfig, so: dict | None) -> tuple[str, object]:
    uri = cfg.storage_path or join(cfg.output, "ray")
    fs, path = arrow_fs(uri, so)
    return path, fs


def run_training(cfg: TrainConfig) -> dict:
    """Both stages (or stage 2 alone with ``--features``); returns metrics.json's content."""
    import pyarrow.dataset as pads
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    so = s3_storage_options(cfg.s3_endpoint or None)
    if not cfg.output:
        raise JobError("--output is required")
    if bool(cfg.manifest) == bool(cfg.features):
        raise JobError("pass exactly one of --manifest (embed, then train) or --features (train on an existing cache)")
    if cfg.resnet_init:  # a missing or mismatched file fails here, before embedding, not in every worker
        try:
            load_backbone(NoiseResNet(cfg.resnet, (3, 32, 32)), cfg.resnet_init, so)
        except (OSError, ValueError, RuntimeError) as exc:
            raise JobError(str(exc))
    if (cfg.verdicts or cfg.declared_labels) and not cfg.manifest:
        raise JobError("--verdicts and --declared-labels add images to a manifest's rows: pass --manifest too (a cache has no images to add)")
    if cfg.manifest:  # before Ray starts: the paper's ViT-L-14 is the default, and its weights may be absent
        require_weights(cfg.feature_spec(), so)
    manifest, declared_counts = (_with_declared(cfg, so) if cfg.declared_labels else (cfg.manifest, None))
    manifest, verdict_counts = (_with_verdicts(cfg, so, manifest) if cfg.verdicts else (manifest, None))
    init_ray(cfg.ray_address or None)
    embed_summary = None
    cache = cfg.features
    if cfg.manifest:
        from jobs.training.embedding import EmbedConfig, run_embedding

        cache = join(cfg.output, "features")
        embed_cfg = EmbedConfig(
            manifest=manifest, output=cache, **extractor_options(cfg), batch_size=cfg.embed_batch_size,
            actors=cfg.embed_actors, gpu=cfg.gpu,
            val_fraction=cfg.val_fraction, calib_fraction=cfg.calib_fraction, s3_endpoint=cfg.s3_endpoint, ray_address=cfg.ray_address,
        )
        embed_summary = run_embedding(embed_cfg, so)
    marker = read_marker(cache, so)
    if marker is None:
        raise JobError(f"{cache} is not a finished feature cache (no {SUCCESS}); run jobs.embed first")
    spec = cache_spec(marker)
    if cfg.features:  # the cache decides the extractor settings the bundle records
        for k, v in spec.to_dict().items():
            if hasattr(cfg, k) and k != "image_size":
                setattr(cfg, k, v)
    elif spec != (wanted := cfg.feature_spec().resolved(so)):
        raise JobError(f"feature cache {cache} was made with {spec.id}, not {wanted.id}")
    model_config = cfg.model_config(spec)
    if cfg.recipe == "dnf-reference":
        if spec.extractor != "dnf":
            raise JobError("--recipe dnf-reference trains the DNF reference's classifier: it needs --extractor dnf")
        if set_by_recipe := cfg.apply_recipe():
            print(f"--recipe dnf-reference: {', '.join(set_by_recipe)}")
    if cfg.resnet_init and spec.extractor != "dnf":
        raise JobError("--resnet-init is for --extractor dnf (a ResNet on the noise feature)")

    pa_fs, data_path = arrow_fs(join(cache, DATA), so)
    dataset = pads.dataset(data_path, filesystem=pa_fs, format="parquet")
    good = pads.field(S.ERROR_STAGE).is_null()
    n_train = dataset.count_rows(filter=good & (pads.field(S.SPLIT) == S.SPLIT_TRAIN))
    val_labels = dataset.to_table(columns=[S.LABEL], filter=good & (pads.field(S.SPLIT) == S.SPLIT_VAL)).column(S.LABEL)
    n_val, n_val_gen = len(val_labels), int(np.asarray(val_labels).sum()) if len(val_labels) else 0
    if n_train < 2 * cfg.workers:
        raise JobError(f"only {n_train} training rows in {cache}; need at least {2 * cfg.workers}")
    if n_val == 0 or n_val_gen in (0, n_val):
        raise JobError(f"the validation split of {cache} needs real and generated images (has {n_val} rows, {n_val_gen} generated)")
    shortcuts = _shortcuts(dataset, cfg.seed)

    def split_ds(split: str):
        from ray.data.expressions import col

        ds = ray.data.read_parquet(data_path, filesystem=pa_fs).select_columns([S.FEATURES, S.LABEL, S.SPLIT, S.ERROR_STAGE])
        ds = ds.filter(expr=col(S.ERROR_STAGE).is_null() & (col(S.SPLIT) == split)).map_batches(labelled_arrays, batch_format="pyarrow")
        # A dataset carries its own DataContext into the workers that iterate it: without
        # this, rank 0's per-epoch read of the validation shard floods the job log with bars.
        ds.context.enable_progress_bars = False
        return ds

    rows_per_worker = n_train // cfg.workers
    local_batch = max(2, min(cfg.batch_size // cfg.workers, rows_per_worker))
    row_bytes = 4 * spec.dim
    if cfg.cache_shard and rows_per_worker * row_bytes > cfg.cache_shard_max_gb * 2**30:
        print(f"a worker's shard is {rows_per_worker * row_bytes / 2**30:.1f} GiB (> --cache-shard-max-gb {cfg.cache_shard_max_gb}): "
              f"streaming it every epoch instead of keeping it in memory")
        cfg.cache_shard = False
    storage_path, storage_fs = _ray_storage(cfg, so)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": config_dict(cfg), "model_config": model_config, "local_batch": local_batch, "output": cfg.output,
                           "storage_options": so, "val_on_device": n_val * row_bytes < 2**30},
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.gpu, resources_per_worker={"CPU": 1, **({"GPU": 1} if cfg.gpu else {})}),
        run_config=ray.train.RunConfig(
            name=_run_name(cfg), storage_path=storage_path, storage_filesystem=storage_fs,
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            # The best epoch's checkpoint (and, whatever its score, the latest, which resuming needs).
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1, checkpoint_score_attribute=cfg.select_metric,
                                                         checkpoint_score_order="max"),
        ),
        # Validation is read every epoch by rank 0: materialise it once (it is the small split).
        # One global shuffle before the split: caches keep manifest order (often one class
        # after the other), and contiguous shards would give each worker -- and its
        # per-worker BatchNorm statistics -- a skewed class mix. Later epochs reshuffle
        # each worker's in-memory shard.
        datasets={"train": split_ds(S.SPLIT_TRAIN).random_shuffle(seed=cfg.seed), "val": split_ds(S.SPLIT_VAL).materialize()},
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
    )
    started = time.time()
    try:
        result = trainer.fit()
    except Exception as exc:  # noqa: BLE001 - Ray wraps worker errors; surface the cause in one line
        cause = exc.__cause__ or exc
        raise JobError(f"training failed: {type(cause).__name__}: {str(cause).strip().splitlines()[-1] if str(cause).strip() else ''}",
                       code=1) from exc
    if result.checkpoint is None:
        raise JobError("training produced no checkpoint")
    state = load_state(result.checkpoint)  # the latest: the whole history
    # What Ray Train kept: the best by the selection metric, and the latest. Of equal scores the
    # later epoch, as Ray Train's own ranking does.
    kept = [(m[cfg.select_metric], m["epoch"], c) for c, m in (result.best_checkpoints or []) if cfg.select_metric in m]
    best = load_state(max(kept, key=lambda k: k[:2])[2]) if kept else state
    if "threshold_logit" not in best and "best" in best:  # a run resumed from checkpoints that carried their own best copy
        old = best["best"]
        best = {"model": old["model"], "epoch": old["epoch"], "history": [old["metrics"]], "threshold_logit": old["threshold_logit"]}
    model = build_classifier(model_config)
    model.load_state_dict(best["model"])
    bm = best["history"][-1]
    calib_real = _real_logits(model.eval(), data_path, pa_fs, S.SPLIT_CALIB)
    if calib_real.size:
        threshold_logit = calibrate_threshold(calib_real, cfg.target_fpr)
        calibration = calibration_record(calib_real, threshold_logit, cfg.target_fpr, S.SPLIT_CALIB)
    else:  # no calib rows (calib_fraction 0, or a manifest's own splits without one)
        threshold_logit = float(best["threshold_logit"])
        val_real = _real_logits(model.eval(), data_path, pa_fs, S.SPLIT_VAL)
        calibration = {**calibration_record(val_real, threshold_logit, cfg.target_fpr, S.SPLIT_VAL),
                       "note": "calibrated on the split that also picked the epoch: the achieved rate is optimistic"}
        print(f"WARNING: no {S.SPLIT_CALIB} split in {cache}: the threshold is calibrated on validation, which also picked "
              "the epoch (optimistic); use --calib-fraction or a calib split in the manifest", file=sys.stderr, flush=True)
    if calibration.get("warning"):
        print(f"WARNING: {calibration['warning']}; label more real images for that split, or train for a higher --target-fpr",
              file=sys.stderr, flush=True)
    bundle = DetectorBundle(
        model=model.eval(), features=spec, threshold_logit=threshold_logit, calibration=calibration,
        feature_compute=marker.get("feature_compute", {}),
        training_config={**config_dict(cfg), **({"verdict_rows": verdict_counts} if verdict_counts else {}),
                         **({"declared_rows": declared_counts} if declared_counts else {})},
        metrics={k: v for k, v in bm.items()},
    )
    save_bundle(bundle, join(cfg.output, "detector"), so)
    metrics = {
        **{k: bm[k] for k in bm if k.startswith("val_")},
        "threshold": bundle.threshold, "threshold_logit": threshold_logit, "target_fpr": cfg.target_fpr, "calibration": calibration,
        "best_epoch": best["epoch"], "epochs_run": len(state["history"]), "epochs": cfg.epochs,
        "train_rows": n_train, "detector_id": bundle.detector_id, "history": state["history"],
        "embedding": embed_summary, "train_seconds": round(time.time() - started, 2), "shortcuts": shortcuts,
        "verdict_rows": verdict_counts, "declared_rows": declared_counts,
    }
    write_json(join(cfg.output, "metrics.json"), metrics, so)
    write_json(join(cfg.output, "config.json"), config_dict(cfg), so)
    print(f"detector {bundle.detector_id}: best epoch {best['epoch']}, val AUC {bm['val_auc']:.4f}, "
          f"threshold {bundle.threshold:.4f} (FPR target {cfg.target_fpr}; achieved {calibration['achieved_fpr']:.4g} on "
          f"{calibration['n_real']} {calibration['split']} reals, 95 % interval {calibration['fpr_interval'][0]:.3g}-"
          f"{calibration['fpr_interval'][1]:.3g}) -> {join(cfg.output, 'detector')}")
    return metrics


def _with_declared(cfg: TrainConfig, so: dict | None) -> tuple[str, dict]:
    """The manifest plus the images of ``--declared-labels`` that declared their origin, in OUT/manifest_with_declared.parquet."""
    from detector_core import schema as S
    from detector_core.sources.manifest import ManifestError, read_manifest
    from detector_core.sources.provenance import declared_labels
    from detector_core.tables.verdicts import with_verdicts

    out = open_output(cfg.declared_labels, "", "", so)
    cols = (S.URI, S.DECLARED, S.C2PA_STATE, S.SCANNED_AT)
    if S.DECLARED not in out.table("scores").schema().column_names:
        raise JobError(f"{cfg.declared_labels} has no evidence columns (written before schema version 5): scan it again first")
    rows = out.read("scores", "declared IS NOT NULL", selected_fields=cols)
    try:
        manifest = read_manifest(cfg.manifest, so)
    except ManifestError as exc:
        raise JobError(str(exc))
    merged, counts = with_verdicts(manifest, declared_labels(rows), cfg.declared_in_validation)
    path = join(cfg.output, "manifest_with_declared.parquet")
    write_parquet(merged, path, so)
    print(f"--declared-labels {cfg.declared_labels}: {counts['verdict_rows']} images that declare their origin added "
          f"({counts['generated']} generated, {counts['real']} captured; {counts['relabelled']} relabelled) -> {path}")
    return path, counts


def _with_verdicts(cfg: TrainConfig, so: dict | None, manifest_path: str = "") -> tuple[str, dict]:
    """The manifest plus the reviewed images of ``--verdicts``, written to OUT/manifest_with_verdicts.parquet; (its path, counts)."""
    from detector_core.sources.manifest import ManifestError, read_manifest
    from detector_core.tables import definitions as T
    from detector_core.tables.verdicts import with_verdicts

    out = open_output(cfg.verdicts, "", "", so)
    table = out.find_table(T.VERDICTS)
    if table is None or table.current_snapshot() is None:
        raise JobError(f"no verdicts imported into {cfg.verdicts} (python -m jobs.audit verdicts import FILE --scan {cfg.verdicts})")
    try:
        manifest = read_manifest(manifest_path or cfg.manifest, so)
    except ManifestError as exc:
        raise JobError(str(exc))
    merged, counts = with_verdicts(manifest, out.read(T.VERDICTS), cfg.verdicts_in_validation)
    path = join(cfg.output, "manifest_with_verdicts.parquet")
    write_parquet(merged, path, so)
    print(f"--verdicts {cfg.verdicts}: {counts['verdict_rows']} reviewed images added ({counts['generated']} generated, "
          f"{counts['real']} real; {counts['relabelled']} relabelled, {counts['unsure_dropped']} unsure left out) -> {path}")
    return path, counts


def main(argv=None) -> dict:
    return run_training(parse_config(TrainConfig, argv, __doc__))


if __name__ == "__main__":
    run_main(main)
