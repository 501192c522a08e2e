"""Evaluate a detector the way the field reports it: overall and per generator, clean and perturbed, on unseen generators.

    python -m jobs.evaluate --detector OUT/detector --manifest test.parquet --output EVAL
    python -m jobs.evaluate --detector OUT/detector --manifest test.parquet --output EVAL \\
        --perturb jpeg:95,75,50 resize:0.5 blur:1,2 crop:0.6
    python -m jobs.evaluate --holdout-generator sdxl --manifest d3.parquet --output EVAL_SDXL \\
        --clip-model ViT-L-14 --pretrained openai --train-args "--epochs 32 --workers 4 --gpu"
    ray job submit --address http://HEAD:8265 --runtime-env cluster/runtime_env.yaml -- \\
        python -m jobs.evaluate --detector s3://models/detector --manifest s3://data/test.parquet --output s3://evals/run1 --gpu

Images go through the same Ray Data read -> decode -> extractor path as training and the
scan (``jobs.embed``; one feature cache per condition under ``OUTPUT/features/``, reused
when unchanged), then the bundle's classifier scores them; either bundle kind (CLIP + MLP,
DNF + ResNet). For every condition (``clean`` and each
``--perturb`` value, applied to real and generated images alike) and every group (``all``
and each generator: its images against all real images) it reports ROC AUC, average
precision, accuracy at the bundle's threshold and at 0.5, real and generated accuracy, and
TPR at 1 % and 0.1 % FPR. Writes ``metrics.json`` (with the ROC curves), ``metrics.md``
(the table, also printed), ``roc.png`` (ROC per generator) and ``scores.png`` (score
histograms of real vs generated). ``--holdout-generator X`` first trains a detector with
``jobs.train`` on everything but X's images, then evaluates it on X's images and the real
images it did not train on: the unseen-generator row of a generalisation table.
"""

from __future__ import annotations

import math
import shlex
import sys
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from scipy.special import expit

from detector_core import schema as S
from detector_core.method.bundle import BundleError, DetectorBundle, load_bundle
from detector_core.method.cache import features_matrix, read_features
from detector_core.method.metrics import summarize
from detector_core.method.perturb import parse_perturbations
from detector_core.method.training import predict_logits
from detector_core.sources.manifest import ManifestError, read_manifest, validate_manifest
from detector_core.storage import arrow_fs, join, open_fs, s3_storage_options
from jobs.common.errors import JobError, run_main
from jobs.common.flags import RayOptions, StorageOptions, opt, parse_config
from jobs.common.options import extractor_options
from jobs.common.outputs import config_dict, write_json, write_parquet
from jobs.scanning.pipeline import trained_draft
from jobs.training.embedding import EmbedConfig, run_embedding

CLEAN = "clean"
METRIC_COLUMNS = [("auc", "AUC"), ("ap", "AP"), ("accuracy", "acc@thr"), ("accuracy_at_0.5", "acc@0.5"),
                  ("real_accuracy", "real acc"), ("generated_accuracy", "gen acc"), ("tpr_at_fpr_0.01", "TPR@1%FPR"),
                  ("tpr_at_fpr_0.001", "TPR@0.1%FPR")]


@dataclass
class EvaluateConfig(RayOptions, StorageOptions):
    detector: str = opt("", "detector bundle (local or s3://); not needed with --holdout-generator")
    manifest: str = opt("", "labelled manifest (uri, label[, generator, caption, split]) or a real/ + generated/<generator>/ tree")
    output: str = opt("", "folder for metrics.json, metrics.md, roc.png, scores.png and the feature caches (local or s3://)")
    split: str = opt("", "evaluate only rows of these splits, comma-separated (e.g. test); default: every row")
    perturb: tuple[str, ...] = opt((), "perturbations to re-score with, kind:v1,v2 each: jpeg:95,75,50 resize:0.5 blur:1,2 crop:0.6", nargs="*")
    perturb_seed: int = opt(0, "seed of random perturbations (crop positions)", within="[0, inf)")
    holdout_generator: str = opt("", "train without this generator's images (jobs.train), then evaluate on them")
    clip_model: str = opt("ViT-L-14", "--holdout-generator: open_clip model (the paper's: ViT-L-14; test-tiny: a random 64 px model for tests)")
    pretrained: str = opt("openai", "--holdout-generator: open_clip tag whose weights are in the local cache, a weights path or s3:// URI, or none (random: tests only); checked before any work")
    feature_mode: str = opt("image", "--holdout-generator: image or image+text")
    train_args: str = opt("", "--holdout-generator: more jobs.train flags, one string (e.g. \"--epochs 32 --workers 4 --gpu\"; a DNF detector: \"--extractor dnf --unet DIR\")")
    batch_size: int = opt(64, "images per embedding batch", within="[1, inf)")
    actors: int = opt(1, "feature-extractor actors (one GPU each with --gpu)", within="[1, inf)")
    gpu: bool = opt(False, "run the feature-extractor actors on GPUs")


def group_metrics(labels: np.ndarray, scores: np.ndarray, generators: np.ndarray, threshold: float) -> dict[str, dict]:
    """Metrics for ``all`` and for each generator (its generated images against every real image)."""
    out = {"all": _metrics(labels, scores, threshold)}
    real = labels == 0
    for g in sorted({str(x) for x in generators[labels == 1]}):
        sel = real | ((labels == 1) & (generators == g))
        out[g] = _metrics(labels[sel], scores[sel], threshold)
    return out


def _metrics(labels, scores, threshold) -> dict:
    m = summarize(labels, scores, threshold)
    m["accuracy_at_0.5"] = summarize(labels, scores, 0.5)["accuracy"]
    return m


def roc_curves(labels: np.ndarray, scores: np.ndarray, generators: np.ndarray) -> dict[str, dict]:
    from sklearn.metrics import roc_curve

    curves = {}
    real = labels == 0
    groups = {"all": labels == 1, **{g: (labels == 1) & (generators == g) for g in sorted({str(x) for x in generators[labels == 1]})}}
    for g, pos in groups.items():
        sel = real | pos
        if real.any() and pos.any():
            fpr, tpr, thr = roc_curve(labels[sel], scores[sel])
            curves[g] = {"fpr": fpr.round(6).tolist(), "tpr": tpr.round(6).tolist()}
    return curves


def markdown_table(conditions: dict[str, dict[str, dict]]) -> str:
    head = "| condition | group | n real | n generated | " + " | ".join(t for _, t in METRIC_COLUMNS) + " |"
    lines = [head, "|" + " --- |" * (4 + len(METRIC_COLUMNS))]
    for cond, groups in conditions.items():
        for g, m in groups.items():
            cells = ["–" if m.get(k) is None or (isinstance(m.get(k), float) and math.isnan(m[k])) else f"{m[k]:.4f}" for k, _ in METRIC_COLUMNS]
            lines.append(f"| {cond} | {g} | {m['n_real']} | {m['n_generated']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _plots(output: str, curves: dict, labels: np.ndarray, scores: np.ndarray, threshold: float, title: str, so) -> list[str]:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for g, c in curves.items():
        ax.plot(c["fpr"], c["tpr"], label=g, lw=2 if g == "all" else 1.2)
    ax.plot([0, 1], [0, 1], ls=":", c="grey", lw=1)
    ax.set(xlabel="false-positive rate (real flagged)", ylabel="true-positive rate (generated flagged)", title=f"ROC, {title}",
           xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right", fontsize=8)
    figs = [("roc.png", fig)]
    fig2, ax2 = plt.subplots(figsize=(6.5, 3.5))
    bins = np.linspace(0, 1, 51)
    ax2.hist(scores[labels == 0], bins=bins, alpha=0.6, label="real", color="#4c78a8")
    ax2.hist(scores[labels == 1], bins=bins, alpha=0.6, label="generated", color="#e45756")
    ax2.axvline(threshold, color="black", ls="--", lw=1, label=f"threshold {threshold:.3f}")
    ax2.set(xlabel="score", ylabel="images", title=f"Scores, {title}")
    ax2.legend(fontsize=8)
    figs.append(("scores.png", fig2))
    for name, f in figs:
        buf = io.BytesIO()
        f.tight_layout()
        f.savefig(buf, format="png", dpi=110)
        plt.close(f)
        fs, path = open_fs(join(output, name), so)
        with fs.open(path, "wb") as fh:
            fh.write(buf.getvalue())
        written.append(join(output, name))
    return written


def score_cache(bundle: DetectorBundle, cache: str, so) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(labels, scores, generators, rows) of a feature cache under the bundle."""
    t = read_features(cache, [S.URI, S.LABEL, S.GENERATOR, S.FEATURES], so)
    feats = torch.tensor(features_matrix(t[S.FEATURES]))  # a copy: Arrow's buffers are read-only
    if feats.shape[1] != bundle.in_dim:
        raise JobError(f"features of {cache} are {feats.shape[1]}-d; detector {bundle.detector_id} takes {bundle.in_dim}-d")
    with torch.inference_mode():
        logits = predict_logits(bundle.model, feats).double().numpy()
    scores = expit(logits)
    labels = t[S.LABEL].to_numpy().astype(np.int64)
    gens = np.array(["generated" if g is None else str(g) for g in t[S.GENERATOR].to_pylist()], dtype=object)
    gens[labels == 0] = "real"
    return labels, scores, gens, t.num_rows


def _holdout(cfg: EvaluateConfig, so) -> tuple[str, str]:
    """Train without the held-out generator; returns (detector, evaluation manifest)."""
    from jobs import train

    try:
        vm = validate_manifest(read_manifest(cfg.manifest, so))
    except ManifestError as exc:
        raise JobError(str(exc))
    t = vm.table
    gens = set(t[S.GENERATOR].to_pylist())
    x = cfg.holdout_generator
    if x not in gens or x == "real":
        raise JobError(f"--holdout-generator {x!r} is not a generator of {cfg.manifest} (generators: {', '.join(sorted(g for g in gens if g and g != 'real'))})")
    is_x = pc.fill_null(pc.equal(t[S.GENERATOR], x), False)
    train_rows = t.filter(pc.invert(is_x))
    held_real = pc.and_(pc.equal(t[S.LABEL], 0), pc.is_in(t[S.SPLIT], value_set=pa.array([S.SPLIT_VAL, S.SPLIT_TEST])))
    eval_rows = t.filter(pc.or_(is_x, held_real))
    root = join(cfg.output, "holdout")
    write_parquet(train_rows, join(root, "train_manifest.parquet"), so)
    write_parquet(eval_rows, join(root, "eval_manifest.parquet"), so)
    print(f"holdout {x}: training on {train_rows.num_rows} rows without it; evaluating on {eval_rows.num_rows} rows "
          f"({int(pc.sum(is_x).as_py() or 0)} of {x}, the rest real images outside the training split)")
    # --train-args is the user's own flags for the training run: parsed as jobs.train parses them, then the
    # run is a call with the config object.
    tcfg = parse_config(train.TrainConfig, shlex.split(cfg.train_args), train.__doc__)
    for name in ("clip_model", "pretrained", "feature_mode", "s3_endpoint"):
        setattr(tcfg, name, getattr(cfg, name))
    tcfg.manifest, tcfg.output = join(root, "train_manifest.parquet"), join(root, "train")
    train.run_training(tcfg)
    return join(root, "train", "detector"), join(root, "eval_manifest.parquet")


def _shortcuts(cache: str, so: dict | None) -> dict:
    """How well the evaluation set's metadata alone predicts its labels (detector_core.method.shortcuts); warned on stderr."""
    import pyarrow.dataset as pads

    from detector_core.method.shortcuts import dataset_report

    pa_fs, path = arrow_fs(join(cache, "data"), so)
    report = dataset_report(pads.dataset(path, filesystem=pa_fs, format="parquet"))
    if report["warning"]:
        print(f"WARNING: {report['warning']}", file=sys.stderr, flush=True)
    return report


def run_evaluation(cfg: EvaluateConfig) -> dict:
    so = s3_storage_options(cfg.s3_endpoint or None)
    if not (cfg.manifest and cfg.output) or not (cfg.detector or cfg.holdout_generator):
        raise JobError("--manifest, --output and --detector (or --holdout-generator) are required")
    try:
        perturbations = parse_perturbations(list(cfg.perturb))
    except ValueError as exc:
        raise JobError(str(exc))
    detector, manifest = cfg.detector, cfg.manifest
    if cfg.holdout_generator:
        detector, manifest = _holdout(cfg, so)
    try:
        bundle = load_bundle(detector, so)
    except BundleError as exc:
        raise JobError(str(exc))
    if cfg.split:
        try:
            # Rows without a split are assigned as the detector's training assigned them.
            tc = bundle.training_config or {}
            vm = validate_manifest(read_manifest(manifest, so), val_fraction=tc.get("val_fraction", 0.2),
                                   calib_fraction=tc.get("calib_fraction", 0.0))
        except ManifestError as exc:
            raise JobError(str(exc))
        rows = vm.table.filter(pc.is_in(vm.table[S.SPLIT], value_set=pa.array(cfg.split.split(","))))
        if rows.num_rows == 0:
            raise JobError(f"no rows of split {cfg.split} in {manifest}")
        manifest = join(cfg.output, "eval_manifest.parquet")
        write_parquet(rows, manifest, so)

    conditions, curves, n_scored, hist = {}, {}, {}, None
    for p in [None, *perturbations]:
        name = CLEAN if p is None else p.name
        cache = join(cfg.output, "features", name.replace(":", "-"))
        run_embedding(EmbedConfig(
            manifest=manifest, output=cache, **extractor_options(bundle.features), batch_size=cfg.batch_size, actors=cfg.actors, gpu=cfg.gpu,
            jpeg_draft=trained_draft(bundle),
            perturb="" if p is None else p.name, perturb_seed=cfg.perturb_seed, s3_endpoint=cfg.s3_endpoint,
            ray_address=cfg.ray_address), so)
        labels, scores, gens, n = score_cache(bundle, cache, so)
        conditions[name] = group_metrics(labels, scores, gens, bundle.threshold)
        n_scored[name] = n
        if p is None:
            curves = roc_curves(labels, scores, gens)
            hist = (labels, scores)
            shortcuts = _shortcuts(cache, so)
    table = markdown_table(conditions)
    title = bundle.detector_id + (f", unseen {cfg.holdout_generator}" if cfg.holdout_generator else "")
    pictures = _plots(cfg.output, curves, hist[0], hist[1], bundle.threshold, title, so)
    result = {
        "detector": detector, "detector_id": bundle.detector_id, "detector_kind": bundle.kind, "feature_id": bundle.features.id,
        "threshold": bundle.threshold, "manifest": manifest, "holdout_generator": cfg.holdout_generator or None,
        "images": n_scored, "conditions": conditions, "roc": curves, "pictures": pictures, "config": config_dict(cfg),
        "shortcuts": shortcuts,
    }
    write_json(join(cfg.output, "metrics.json"), result, so)
    fs, path = open_fs(join(cfg.output, "metrics.md"), so)
    with fs.open(path, "w") as f:
        f.write(f"# Evaluation of {bundle.detector_id}\n\n{table}")
    print(table)
    print(f"metrics: {join(cfg.output, 'metrics.json')}  table: {join(cfg.output, 'metrics.md')}  pictures: {', '.join(pictures)}")
    return result


def main(argv=None) -> dict:
    return run_evaluation(parse_config(EvaluateConfig, argv, __doc__))


if __name__ == "__main__":
    run_main(main)
