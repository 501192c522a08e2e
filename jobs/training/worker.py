"""The Ray Train worker of ``jobs.train``: the epoch loop around ``detector_core.method.training.training_step``.

Each worker builds the classifier (same initial weights everywhere, its own dropout and
flip streams), wraps it in DDP, resumes from Ray Train's checkpoint when there is one, and
trains on its shard of the cache (kept in memory after the first epoch). Rank 0 evaluates
on the validation split every epoch, keeps the best model so far, checkpoints, and for
``--recipe dnf-reference`` decides the next learning rate and the stop, which it broadcasts.
``jobs/train.py`` says what the distributed step means.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import tempfile
import time
import uuid

import numpy as np
import torch

from detector_core.devices import select_device
from detector_core.method.metrics import calibrate_threshold, summarize
from detector_core.method.model import build_classifier, load_backbone
from detector_core.method.training import (
    PlateauStop,
    all_gather_batch,
    build_optimizer,
    build_scheduler,
    predict_logits,
    random_hflip,
    training_step,
)
from detector_core.storage import join, open_fs
from jobs.training.config import TrainConfig

__all__ = ["load_state", "train_loop_per_worker"]


def _save_state(state: dict) -> "object":
    import ray.train

    d = tempfile.mkdtemp(prefix="ckpt-")
    torch.save(state, os.path.join(d, "state.pt"))
    return ray.train.Checkpoint.from_directory(d)


def load_state(checkpoint) -> dict:
    with checkpoint.as_directory() as d:
        return torch.load(os.path.join(d, "state.pt"), map_location="cpu", weights_only=True)


def _load_split(it, device) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*((b["x"], b["y"]) for b in it.iter_torch_batches(batch_size=1024, device=device)))
    return torch.cat(xs), torch.cat(ys)


def _evaluate(model: torch.nn.Module, val: tuple[torch.Tensor, torch.Tensor], target_fpr: float) -> tuple[dict, float]:
    z = predict_logits(model, val[0]).cpu().numpy().astype(np.float64)
    y = val[1].cpu().numpy().astype(np.int64)
    m = summarize(y, z, threshold=0.0)  # logit 0 = probability 0.5
    real = z[y == 0]
    threshold = calibrate_threshold(real, target_fpr) if real.size else float("inf")
    at = summarize(y, z, threshold=threshold)
    metrics = {
        "val_auc": m["auc"], "val_ap": m["ap"], "val_accuracy": m["accuracy"],
        "val_tpr_at_fpr_0.01": m["tpr_at_fpr_0.01"], "val_tpr_at_fpr_0.001": m["tpr_at_fpr_0.001"],
        "val_accuracy_at_threshold": at["accuracy"], "val_real_accuracy": at["real_accuracy"],
        "val_generated_accuracy": at["generated_accuracy"], "val_n": m["n"], "val_n_real": m["n_real"],
    }
    return metrics, threshold


def _train_epoch(step, augment, shard, cache, local_batch: int, cfg, epoch: int, rank: int, device):
    """One epoch of ``step(x, y)`` over the worker's shard: (losses, rows seen, the in-memory shard or None).

    First epoch: stream the shard from Ray Data and keep it (``--cache-shard``): features are
    small (6 KB a row at width 1536), so later epochs reshuffle in memory instead of paying for
    a new streaming execution every epoch.
    """
    losses, seen = [], 0
    if cache is None:
        xs, ys = [], []
        for batch in shard.iter_torch_batches(
            batch_size=local_batch, drop_last=True, local_shuffle_buffer_size=4 * local_batch,
            local_shuffle_seed=cfg.seed + epoch, device=device,
        ):
            losses.append(step(augment(batch["x"]), batch["y"]))
            seen += batch["x"].shape[0]
            if cfg.cache_shard:
                xs.append(batch["x"])
                ys.append(batch["y"])
        return losses, seen, (torch.cat(xs), torch.cat(ys)) if (cfg.cache_shard and xs) else None
    order = torch.randperm(cache[0].shape[0], generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch * 31 + rank))
    for i in range(0, order.numel() - local_batch + 1, local_batch):
        idx = order[i : i + local_batch].to(cache[0].device)
        losses.append(step(augment(cache[0][idx]), cache[1][idx]))
        seen += idx.numel()
    return losses, seen, cache


def train_loop_per_worker(config: dict) -> None:
    """Ray Train worker: the epoch loop around ``detector_core.method.training.training_step``."""
    import ray.data
    import ray.train
    import ray.train.torch


    cfg = TrainConfig(**config["cfg"])
    # Per-batch progress bars from inside the workers drown the epoch lines in the job log.
    ray.data.DataContext.get_current().enable_progress_bars = False
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if cfg.gpu:
        select_device(True)  # raises DeviceError naming the cause where the worker's GPU is unusable
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.seed)
    model = build_classifier(config["model_config"])
    reference = cfg.recipe == "dnf-reference"
    if reference:  # the reference's Trainer: torch.nn.init.normal_(fc.weight, 0.0, init_gain=0.02)
        torch.nn.init.normal_(model.net.fc.weight, 0.0, 0.02)
    if cfg.resnet_init and cfg.extractor == "dnf":  # every rank loads it; DDP would broadcast rank 0's anyway
        load_backbone(model, cfg.resnet_init, config["storage_options"])
    if cfg.sync_bn and world > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ddp = ray.train.torch.prepare_model(model)
    raw = getattr(ddp, "module", ddp)
    # Same initial weights on every rank (seed above, and DDP broadcasts rank 0's), but each
    # rank's own dropout masks: with one seed all workers would draw identical masks for
    # their different examples.
    torch.manual_seed(cfg.seed * 1_000_003 + rank)
    optim_cfg = cfg.optim()
    optimizer = build_optimizer(raw, optim_cfg)
    # dnf-reference: the lr is cut by validation accuracy (PlateauStop, decided on rank 0), not a fixed schedule.
    scheduler = PlateauStop(cfg.patience) if reference else build_scheduler(optimizer, optim_cfg)
    flip_shape = tuple(config["model_config"]["in_shape"]) if reference else None
    start_epoch, history = 0, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        state = load_state(checkpoint)
        raw.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, history = state["epoch"] + 1, state["history"]
        if rank == 0:
            print(f"resuming from the checkpoint of epoch {state['epoch']}")
    gather = all_gather_batch if world > 1 else (lambda z, y: (z, y))
    first_pass = ddp.no_sync if (world > 1 and cfg.sam_unsynced_perturbation) else contextlib.nullcontext
    shard = ray.train.get_dataset_shard("train")
    session = uuid.uuid4().hex[:8]  # tells the epochs of a resumed run from the first attempt's
    local_batch = config["local_batch"]
    so = config["storage_options"]
    cache: tuple[torch.Tensor, torch.Tensor] | None = None
    val: tuple[torch.Tensor, torch.Tensor] | None = None
    for epoch in range(start_epoch, cfg.epochs):
        if getattr(scheduler, "done", False):
            break  # resumed after the plateau stop's last epoch
        ddp.train()
        started = time.time()
        lr = optimizer.param_groups[0]["lr"]
        flips = torch.Generator().manual_seed(cfg.seed * 7919 + epoch * 31 + rank)  # each rank and epoch its own flips
        augment = functools.partial(random_hflip, shape=flip_shape, generator=flips) if flip_shape else (lambda x: x)

        step = functools.partial(training_step, ddp, optimizer, cfg=optim_cfg, gather=gather, first_pass_context=first_pass)
        losses, seen, cache = _train_epoch(step, augment, shard, cache, local_batch, cfg, epoch, rank, device)
        if not reference:
            scheduler.step()
        metrics = {
            "epoch": epoch,
            "session": session,
            "train_loss": float(torch.stack(losses).mean()) if losses else float("nan"),
            "train_examples_per_s": seen * world / max(time.time() - started, 1e-9),
            "lr": lr,
        }
        ckpt = None
        decision = torch.tensor([lr, 0.0], dtype=torch.float64, device=device)  # (next lr, stop): rank 0 decides for dnf-reference
        if rank == 0:
            if val is None:  # rank 0 keeps the validation split in memory (on the device when it is small)
                val = _load_split(ray.train.get_dataset_shard("val"), device if config["val_on_device"] else "cpu")
            val_metrics, threshold = _evaluate(raw, val, cfg.target_fpr)
            metrics.update(val_metrics)
            history.append(metrics)
            if reference:
                next_lr, stop = scheduler.step(val_metrics["val_accuracy"], lr)
                decision = torch.tensor([next_lr, float(stop)], dtype=torch.float64, device=device)
                for group in optimizer.param_groups:
                    group["lr"] = next_lr
            # Every epoch's checkpoint carries its own weights and threshold; Ray Train keeps the best
            # one by the selection metric (TrainConfig.select_metric, CheckpointConfig in jobs.train) and the latest, for resuming.
            ckpt = _save_state({
                "model": raw.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "epoch": epoch, "history": history, "threshold_logit": threshold,
            })
            _write_history(config["output"], history, so)
            print(json.dumps({k: round(v, 5) if isinstance(v, float) else v for k, v in metrics.items()}))
        if reference and world > 1:
            import torch.distributed as dist

            dist.broadcast(decision, src=0)
            for group in optimizer.param_groups:
                group["lr"] = float(decision[0])
            scheduler.done = bool(decision[1])
        # The local copy goes once it is in storage: a ResNet-50 checkpoint (weights and AdamW
        # moments) is ~280 MB, and one per epoch would fill the worker's /tmp.
        ray.train.report(metrics, checkpoint=ckpt, delete_local_checkpoint_after_upload=ckpt is not None)
        if epoch == cfg.fail_after_epoch and checkpoint is None and rank == 0:
            raise RuntimeError(f"simulated worker failure after epoch {epoch} (--fail-after-epoch)")
        if reference and bool(decision[1]):
            if rank == 0:
                print(f"early stop after epoch {epoch}: validation accuracy stalled at the last learning rate")
            break


def _write_history(output: str, history: list[dict], so: dict | None) -> None:
    fs, path = open_fs(join(output, "history.jsonl"), so)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(path, "wb") as f:
        f.write("".join(json.dumps(h, default=float) + "\n" for h in history).encode())
