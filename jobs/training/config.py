"""``TrainConfig``: every flag of ``jobs.train``, and what the job derives from them.

Its own module so that the Ray Train workers (``jobs.training.worker``) rebuild the config from
the dict they are sent without importing the job that submitted them; ``jobs/train.py``
parses it, runs it, and says what the flags mean together.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from detector_core.method.extractors import FeatureSpec
from detector_core.method.losses import LOSS_KINDS
from detector_core.method.model import RESNETS
from detector_core.method.training import RECIPE_OPTIM, RECIPES, OptimConfig
from jobs.common.flags import opt
from jobs.common.options import ExtractorOptions, RayOptions, StorageOptions

__all__ = ["TrainConfig"]


@dataclass
class TrainConfig(RayOptions, StorageOptions, ExtractorOptions):
    manifest: str = opt("", "labelled manifest (.parquet/.csv or a real/ + generated/ tree); embeds it first")
    features: str = opt("", "existing feature cache from jobs.embed (replaces --manifest)")
    verdicts: str = opt("", "a scan output whose reviewers' verdicts (jobs.audit verdicts import) add labelled rows to --manifest: the latest verdict on each image, generated = 1, real = 0 (a confirmed false positive becomes a real example), unsure dropped")
    declared_labels: str = opt("", "a scan output whose files declared their origin (C2PA, XMP, generator chunks; not by an invalid manifest) add labelled rows to --manifest: declared generated = 1, declared captured = 0; a reviewer's verdict (--verdicts) on the same image wins")
    declared_in_validation: bool = opt(False, "with --declared-labels: declared rows may fall into the validation and calibration splits by uri hash (default: all to train)")
    verdicts_in_validation: bool = opt(False, "with --verdicts: reviewed rows may fall into the validation and calibration splits by uri hash, as unsplit rows do (default: all to train)")
    output: str = opt("", "output folder: detector/, metrics.json, config.json, history.jsonl (local or s3://)")
    resnet: str = opt("resnet50", "--extractor dnf: classifier on the noise feature", choices=RESNETS)
    resnet_init: str = opt("", "--extractor dnf: torchvision state dict (.pth, local or s3://) to start the ResNet from, e.g. ImageNet weights; default random, as the DNF reference (from scratch since its commit 139c073)")
    recipe: str = opt("cvar-sam", "cvar-sam (the paper's: the loss, SAM and AdamW flags below, cosine schedule, best epoch by validation AUC) or dnf-reference (--extractor dnf; the DNF reference's classifier training: BCE, Adam, lr 1e-4, batch 64, no weight decay, horizontal flips, fc init N(0, 0.02), lr/10 when validation accuracy stalls for --patience epochs, stop below 1e-6, best epoch by validation accuracy; flags left at their defaults take the recipe's values)", choices=RECIPES)
    patience: int = opt(5, "--recipe dnf-reference: epochs without a validation-accuracy gain before the lr drops tenfold", within="[1, inf)")
    loss: str = opt("cvar_auc", "training loss: erm, cvar or cvar_auc (the paper's)", choices=LOSS_KINDS)
    sam: bool = opt(True, "optimise with SAM over AdamW (--no-sam: plain AdamW)")
    sam_unsynced_perturbation: bool = opt(False, "SAM pass one without gradient sync: each worker perturbs along its own share of the global loss's gradient (not m-sharpness, which uses each worker's own loss); default: the global perturbation")
    rho: float = opt(0.05, "SAM neighbourhood radius", within="[0, inf)")
    adaptive: bool = opt(False, "adaptive SAM (ASAM: the perturbation scaled by each weight's magnitude)")
    alpha: float = opt(0.8, "CVaR level", within="(0, 1]")
    gamma: float = opt(0.1, "weight of CVaR against the AUC loss (0.1: the reference's documented run, whose `alpha=0.1` argument is passed on as gamma; tune it)", within="[0, 1]")
    eta: float = opt(0.6, "AUC hinge margin", within="[0, inf)")
    lr: float = opt(1e-3, "AdamW learning rate", within="(0, inf)")
    weight_decay: float = opt(0.01, "AdamW weight decay", within="[0, inf)")
    beta1: float = opt(0.9, "Adam(W) first-moment decay", within="[0, 1)")
    beta2: float = opt(0.999, "Adam(W) second-moment decay", within="[0, 1)")
    eta_min: float = opt(1e-5, "floor of the cosine learning-rate schedule", within="[0, inf)")
    p: float = opt(2.0, "exponent of the pairwise AUC hinge (the paper's squared hinge: 2)", within="[1, inf)")
    epochs: int = opt(32, "epochs", within="[1, inf)")
    batch_size: int = opt(2048, "global batch size (split over workers)", within="[1, inf)")
    dropout: float = opt(0.335, "MLP dropout (--extractor clip)", within="[0, 1)")
    workers: int = opt(1, "Ray Train workers", within="[1, inf)")
    gpu: bool = opt(False, "one GPU per worker")
    sync_bn: bool = opt(False, "SyncBatchNorm across workers (CUDA only)")
    target_fpr: float = opt(0.01, "false-positive rate on the calib split's real images that the threshold is calibrated to", within="(0, 1)")
    val_fraction: float = opt(0.2, "fraction of rows without a split that go to validation (picks the best epoch)", within="(0, 1)")
    calib_fraction: float = opt(0.1, "fraction of rows without a split that go to calibration (sets the threshold; 0: calibrate on validation, optimistic)", within="[0, 1)")
    seed: int = opt(0, "random seed", within="[0, inf)")
    run_name: str = opt("", "Ray Train run name; the same name and storage resume (default: from --output)")
    storage_path: str = opt("", "Ray Train storage for checkpoints (default: OUTPUT/ray)")
    max_failures: int = opt(2, "worker failures to recover from (from the last checkpoint; -1: no limit)", within="[-1, inf)")
    cache_shard: bool = opt(True, "keep each worker's shard in memory after the first epoch (--no-cache-shard: stream every epoch)")
    cache_shard_max_gb: float = opt(8.0, "stream every epoch instead when a worker's shard is larger than this (DNF features are 768 KiB a row at 256 px)", within="(0, inf)")
    embed_batch_size: int = opt(64, "images per embedding batch (stage 1)", within="[1, inf)")
    embed_actors: int = opt(1, "feature-extractor actors for stage 1", within="[1, inf)")
    fail_after_epoch: int = opt(-1, "testing: make rank 0 crash once right after checkpointing this epoch", within="[-1, inf)")

    def optim(self) -> OptimConfig:
        """The optimiser settings: every ``OptimConfig`` field from the flag of the same name, the optimiser from the recipe."""
        given = {f.name: getattr(self, f.name) for f in fields(OptimConfig) if hasattr(self, f.name)}
        return OptimConfig(**given, optimizer=RECIPE_OPTIM[self.recipe].get("optimizer", "adamw"))

    def apply_recipe(self) -> list[str]:
        """Give the recipe's values to the fields still at their defaults; returns what it set."""
        defaults = TrainConfig()
        changed = []
        for k, v in RECIPE_OPTIM[self.recipe].items():
            if hasattr(self, k) and getattr(self, k) == getattr(defaults, k) != v:
                setattr(self, k, v)
                changed.append(f"--{k.replace('_', '-')} {v}")
        return changed

    @property
    def select_metric(self) -> str:
        """The validation metric that picks the best epoch (and, for dnf-reference, drives the lr)."""
        return "val_accuracy" if self.recipe == "dnf-reference" else "val_auc"

    def model_config(self, spec: FeatureSpec) -> dict:
        """The classifier for a (resolved) feature spec, as ``build_classifier`` takes it."""
        if spec.extractor == "dnf":
            return {"arch": self.resnet, "in_shape": list(spec.shape)}
        return {"in_dim": spec.dim, "dropout": self.dropout}
