"""The paper's ablation on one feature cache: ERM, CVaR, CVaR+AUC, CVaR+AUC+SAM, image-only vs image+text.

    python -m jobs.ablation --manifest d3.parquet --output ABL --clip-model ViT-L-14 --pretrained openai --gpu
    python -m jobs.ablation --features CACHE --output ABL          # an image+text feature cache from jobs.embed
    ray job submit --address http://HEAD:8265 --runtime-env cluster/runtime_env.yaml -- \\
        python -m jobs.ablation --manifest s3://data/d3.parquet --output s3://evals/ablation --clip-model ViT-L-14 --gpu

Embeds the manifest once in image+text mode (``jobs.embed``; image-only arms use the image
half of the same features, so every arm sees the same images), then trains one detector
per arm with ``detector_core.method.training.fit`` (the same one-batch update as ``jobs.train``)
as parallel Ray tasks, one GPU each with ``--gpu``, and scores each on the held-out split
(``test`` rows when the manifest has them, else ``val``). Writes ``ablation.md`` (the
table, also printed) and ``ablation.json``. With no captions in the manifest, the
image+text arm is left out and the table says so.

In ELSA D3 the caption source differs by class (real: the LAION caption; generated: the
prompt), so an image+text detector can learn the caption source rather than the image;
the table shows the image-only arm next to it for that reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from detector_core import schema as S
from detector_core.method.cache import SUCCESS, features_matrix, read_features, read_marker
from detector_core.method.training import OptimConfig
from detector_core.storage import join, open_fs, s3_storage_options
from jobs.common.errors import JobError, run_main
from jobs.common.flags import RayOptions, StorageOptions, opt, parse_config
from jobs.common.outputs import config_dict, write_json
from jobs.common.ray_setup import init_ray
from jobs.training.embedding import EmbedConfig, run_embedding

# arm -> (loss, SAM, features); the order is the table's.
ARMS = {
    "ERM": ("erm", False, "image"),
    "CVaR": ("cvar", False, "image"),
    "CVaR+AUC": ("cvar_auc", False, "image"),
    "CVaR+AUC+SAM": ("cvar_auc", True, "image"),
    "CVaR+AUC+SAM (image+text)": ("cvar_auc", True, "image+text"),
}
CAPTION_NOTE = ("Caption source differs by class in ELSA D3 (real: original caption; generated: the prompt): an image+text "
                "detector can learn the caption source instead of the image. Compare it with the image-only arm above it.")


@dataclass
class AblationConfig(RayOptions, StorageOptions):
    manifest: str = opt("", "labelled manifest with captions (uri, label, caption[, generator, split])")
    features: str = opt("", "an existing image+text feature cache (jobs.embed --feature-mode image+text) instead of --manifest")
    output: str = opt("", "folder for ablation.md, ablation.json and the feature cache (local or s3://)")
    clip_model: str = opt("ViT-L-14", "open_clip model (the paper's: ViT-L-14; test-tiny: a random 64 px model for tests)")
    pretrained: str = opt("openai", "open_clip tag whose weights are in the local cache, a weights path or s3:// URI, or none (random: tests only); checked before any work")
    arms: str = opt(",".join(ARMS), "arms to run, comma-separated, from: " + "; ".join(ARMS))
    epochs: int = opt(32, "training epochs per arm", within="[1, inf)")
    batch_size: int = opt(2048, "training batch size per arm", within="[1, inf)")
    lr: float = opt(1e-3, "AdamW learning rate", within="(0, inf)")
    seed: int = opt(0, "training seed (the same for every arm)", within="[0, inf)")
    embed_batch_size: int = opt(64, "images per embedding batch", within="[1, inf)")
    gpu: bool = opt(False, "one GPU per arm (and for the CLIP actors)")


def _train_arm(name: str, optim: OptimConfig, x_train, y_train, x_eval, y_eval, seed: int, use_gpu: bool) -> dict:
    """One arm: fit on the training features, score the held-out ones (runs in a Ray task)."""
    import torch

    from detector_core.devices import select_device
    from detector_core.method.metrics import average_precision, roc_auc, tpr_at_fpr
    from detector_core.method.model import DetectorMLP
    from detector_core.method.training import fit, predict_logits

    device = select_device(use_gpu)  # --gpu where CUDA does not work fails, never runs on the CPU
    torch.manual_seed(seed)
    model = DetectorMLP(x_train.shape[1]).to(device)
    fit(model, torch.from_numpy(x_train).to(device), torch.from_numpy(y_train).to(device), optim, seed=seed)
    with torch.inference_mode():
        scores = predict_logits(model, torch.from_numpy(x_eval).to(device)).double().cpu().numpy()
    return {"arm": name, "loss": optim.loss, "sam": optim.sam, "auc": roc_auc(y_eval, scores), "ap": average_precision(y_eval, scores),
            "tpr_at_fpr_0.01": tpr_at_fpr(y_eval, scores, 0.01), "n_train": int(len(y_train)), "n_eval": int(len(y_eval))}


def markdown(rows: list[dict], eval_split: str, skipped: list[str]) -> str:
    lines = [f"Held-out split: `{eval_split}`.\n", "| arm | loss | SAM | features | AUC | AP | TPR@1%FPR |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        cells = ["–" if r[k] is None or math.isnan(r[k]) else f"{r[k]:.4f}" for k in ("auc", "ap", "tpr_at_fpr_0.01")]
        lines.append(f"| {r['arm']} | {r['loss']} | {'yes' if r['sam'] else 'no'} | {r['features']} | " + " | ".join(cells) + " |")
    for s in skipped:
        lines.append(f"| {s} | | | | not run: the manifest has no captions | | |")
    if any(r["features"] == "image+text" for r in rows):
        lines.append(f"\n{CAPTION_NOTE}")
    return "\n".join(lines) + "\n"


def run_ablation(cfg: AblationConfig) -> dict:
    import ray

    so = s3_storage_options(cfg.s3_endpoint or None)
    if not cfg.output or not (cfg.manifest or cfg.features):
        raise JobError("--output and --manifest (or --features) are required")
    arms = [a.strip() for a in cfg.arms.split(",") if a.strip()]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise JobError(f"unknown arms {unknown}; choose from: {'; '.join(ARMS)}")
    cache = cfg.features
    if not cache:
        from detector_core.sources.manifest import read_manifest

        has_captions = S.CAPTION in read_manifest(cfg.manifest, so).column_names
        mode = "image+text" if has_captions else "image"
        cache = join(cfg.output, "features")
        run_embedding(EmbedConfig(manifest=cfg.manifest, output=cache, clip_model=cfg.clip_model, pretrained=cfg.pretrained,
                                  feature_mode=mode, batch_size=cfg.embed_batch_size, gpu=cfg.gpu, s3_endpoint=cfg.s3_endpoint,
                                  ray_address=cfg.ray_address), so)
    marker = read_marker(cache, so)
    if marker is None:
        raise JobError(f"{cache} is not a finished feature cache (no {SUCCESS})")
    mode, dim = marker["feature_mode"], marker["feature_dim"]
    image_dim = dim // 2 if mode == "image+text" else dim  # image+text features are [image | text], equal halves
    t = read_features(cache, [S.FEATURES, S.LABEL, S.SPLIT], so)
    splits = set(t[S.SPLIT].to_pylist())
    eval_split = S.SPLIT_TEST if S.SPLIT_TEST in splits else S.SPLIT_VAL
    x = features_matrix(t[S.FEATURES])
    y = t[S.LABEL].to_numpy().astype(np.float32)
    is_eval = np.array([s == eval_split for s in t[S.SPLIT].to_pylist()])
    is_train = np.array([s == S.SPLIT_TRAIN for s in t[S.SPLIT].to_pylist()])
    if len(set(y[is_eval])) < 2 or len(set(y[is_train])) < 2:
        raise JobError(f"the {eval_split} and train splits of {cache} each need real and generated images")

    skipped = [a for a in arms if ARMS[a][2] == "image+text" and mode != "image+text"]
    arms = [a for a in arms if a not in skipped]
    base = OptimConfig(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr)
    init_ray(cfg.ray_address or None)
    task = ray.remote(_train_arm).options(num_gpus=1 if cfg.gpu else 0, num_cpus=1, max_retries=2)
    refs = {}
    for a in arms:
        loss, sam, feats = ARMS[a]
        cols = slice(0, image_dim) if feats == "image" else slice(0, dim)
        refs[a] = task.remote(a, replace(base, loss=loss, sam=sam), np.ascontiguousarray(x[is_train][:, cols]), y[is_train],
                              np.ascontiguousarray(x[is_eval][:, cols]), y[is_eval], cfg.seed, cfg.gpu)
    rows = []
    for a in arms:
        r = ray.get(refs[a])
        r["features"] = ARMS[a][2]
        rows.append(r)
        print(f"arm {a}: AUC {r['auc']:.4f}, AP {r['ap']:.4f}, TPR@1%FPR {r['tpr_at_fpr_0.01']:.4f}")
    table = markdown(rows, eval_split, skipped)
    result = {"arms": rows, "skipped": skipped, "eval_split": eval_split, "feature_cache": cache, "clip_model": marker["clip_model"],
              "pretrained": marker["pretrained"], "config": config_dict(cfg)}
    write_json(join(cfg.output, "ablation.json"), result, so)
    ofs, opath = open_fs(join(cfg.output, "ablation.md"), so)
    with ofs.open(opath, "w") as f:
        f.write(f"# Ablation ({marker['clip_model']}/{marker['pretrained']})\n\n{table}")
    print(table)
    return result


def main(argv=None) -> dict:
    return run_ablation(parse_config(AblationConfig, argv, __doc__))


if __name__ == "__main__":
    run_main(main)
