"""The detector bundle: everything needed to use a trained detector, in one folder.

A bundle is a directory (local path or object-store URI) with two files:

- ``weights.safetensors``: the classifier's state dict (safetensors: no pickle to trust);
- ``detector.json``: format version, detector kind, the feature extractor that feeds it
  (``clip-mlp``: CLIP model name, pretrained tag/path and feature mode; ``dnf-resnet``: the
  diffusion UNet, timestep and input side), the classifier config (input width included),
  the decision threshold and how it was calibrated, the training config and metrics,
  creation time, and a content hash over the weights and the fields that change a score.

``detector.json`` is written last, so a reader that finds it finds whole weights; the
hash is checked on load, so weights overwritten under an older ``detector.json`` are
caught. Scores are ``sigmoid(logit)``; the decision is ``logit >= threshold_logit``
(made in logit space so that it stays exact where float probabilities saturate at 1).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from scipy.special import expit
from torch import nn

from detector_core.method.extractors import FAMILIES, FeatureSpec
from detector_core.method.model import build_classifier
from detector_core.storage import join, open_fs

__all__ = ["BUNDLE_KINDS", "FORMAT_VERSION", "BundleError", "DetectorBundle", "save_bundle", "load_bundle"]

FORMAT_VERSION = 1
# A bundle's kind names its family's detector (extractors.FAMILIES: "clip-mlp", "dnf-resnet").
BUNDLE_KINDS = {family.kind: name for name, family in FAMILIES.items()}  # bundle kind -> extractor
WEIGHTS_FILE = "weights.safetensors"
META_FILE = "detector.json"


class BundleError(RuntimeError):
    """A bundle that is missing, corrupt, or does not fit this code."""





@dataclass
class DetectorBundle:
    """A trained detector and its metadata.

    ``features`` is the extractor that feeds ``model`` (a resolved ``FeatureSpec``);
    ``threshold_logit`` is the calibrated decision boundary; ``calibration`` records how
    it was found (``target_fpr``, ``n_real``, ``achieved_fpr``, the split used).
    """

    model: nn.Module
    features: FeatureSpec
    threshold_logit: float = 0.0
    calibration: dict = field(default_factory=lambda: {"method": "default", "note": "probability 0.5"})
    training_config: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    # How the training features were computed beyond the spec (precision, JPEG decode, resize:
    # extractors.feature_compute); empty for bundles made before it was recorded.
    feature_compute: dict = field(default_factory=dict)
    created_at: str = ""
    content_hash: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.features, FeatureSpec):
            raise BundleError(f"features must be a FeatureSpec, got {type(self.features).__name__}")
        if self.features.extractor == "dnf" and not self.features.image_size:
            raise BundleError("a DNF bundle needs the UNet's image size (FeatureSpec.resolved())")
        if self.model.in_dim != self.features.dim:
            raise BundleError(f"classifier input width {self.model.in_dim} does not match {self.features.id} features ({self.features.dim})")

    @property
    def kind(self) -> str:
        return self.features.family.kind

    @property
    def clip_model(self) -> str:
        return self.features.clip_model

    @property
    def pretrained(self) -> str:
        return self.features.pretrained

    @property
    def feature_mode(self) -> str:
        return self.features.feature_mode

    @property
    def in_dim(self) -> int:
        return self.model.in_dim

    @property
    def threshold(self) -> float:
        """The decision threshold on the probability scale (for people; decide on logits)."""
        return float(expit(self.threshold_logit))

    @property
    def needs_captions(self) -> bool:
        return self.features.needs_captions

    @property
    def detector_id(self) -> str:
        """Short stable name of these exact weights and settings."""
        return f"{self.kind}-{self.content_hash[:12]}" if self.content_hash else f"{self.kind}-unsaved"

    def _identity(self) -> dict:
        # CLIP bundles hash exactly the fields they hashed before DNF existed, so their
        # detector ids -- and with them the scans' incremental state -- stay the same.
        spec = {k: v for k, v in self.features.to_dict().items() if k != "extractor"}
        return {"kind": self.kind, **spec, "model_config": self.model.config(), "threshold_logit": self.threshold_logit}

    def metadata(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            **self._identity(),
            "extractor": self.features.extractor,
            "feature_id": self.features.id,
            "in_dim": self.in_dim,
            "input_shape": list(self.features.shape),
            "threshold": self.threshold,
            "calibration": self.calibration,
            "training_config": self.training_config,
            "metrics": self.metrics,
            "feature_compute": self.feature_compute,
            "created_at": self.created_at,
            "content_hash": self.content_hash,
        }


def _hash(weights: bytes, identity: dict) -> str:
    h = hashlib.sha256(weights)
    h.update(json.dumps(identity, sort_keys=True).encode())
    return h.hexdigest()


def save_bundle(bundle: DetectorBundle, uri: str, storage_options: dict | None = None) -> str:
    """Write a bundle to a directory (local or object store); returns its content hash."""
    state = {k: v.detach().cpu().contiguous() for k, v in bundle.model.state_dict().items()}
    weights = save_safetensors(state)
    bundle.content_hash = _hash(weights, bundle._identity())
    bundle.created_at = bundle.created_at or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    fs, root = open_fs(uri, storage_options)
    fs.makedirs(root, exist_ok=True)
    meta = json.dumps(bundle.metadata(), indent=2, sort_keys=True, default=str).encode()
    for name, payload in ((WEIGHTS_FILE, weights), (META_FILE, meta)):
        target = join(root, name)
        tmp = f"{target}.tmp"
        with fs.open(tmp, "wb") as f:
            f.write(payload)
        fs.mv(tmp, target)
    return bundle.content_hash


def load_bundle(uri: str, storage_options: dict | None = None, device: torch.device | str = "cpu") -> DetectorBundle:
    """Read a bundle; the classifier comes back in eval mode on ``device``.

    Raises ``BundleError`` when the folder has no bundle, its format is newer than this
    code, the weights do not fit the recorded shapes, or the content hash disagrees.
    """
    fs, root = open_fs(uri, storage_options)
    meta_path, weights_path = join(root, META_FILE), join(root, WEIGHTS_FILE)
    if not fs.exists(meta_path):
        raise BundleError(f"no detector bundle at {uri} (missing {META_FILE}); pass the folder that train wrote as OUT/detector")
    try:
        meta = json.loads(fs.cat_file(meta_path))
    except json.JSONDecodeError as exc:
        raise BundleError(f"{uri}/{META_FILE} is not valid JSON: {exc}") from exc
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(f"bundle at {uri} has format version {version!r}; this code reads version {FORMAT_VERSION}")
    kind = meta.get("kind")
    extractor = BUNDLE_KINDS.get(kind)
    if extractor is None:
        raise BundleError(f"bundle at {uri} is of kind {kind!r}; this code loads {', '.join(BUNDLE_KINDS)}")
    try:
        cfg = meta["model_config"]
        spec = FeatureSpec.from_dict({**meta, "extractor": extractor})
        expected = spec.dim
        model = build_classifier(cfg)
    except (KeyError, ValueError, TypeError) as exc:
        raise BundleError(f"bundle at {uri} has incomplete or invalid metadata: {exc}") from exc
    if model.in_dim != expected:
        raise BundleError(f"bundle at {uri}: classifier input width {model.in_dim} does not match {spec.id} features ({expected})")
    if not fs.exists(weights_path):
        raise BundleError(f"bundle at {uri} has {META_FILE} but no {WEIGHTS_FILE}")
    weights = fs.cat_file(weights_path)
    try:
        state = load_safetensors(weights)
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise BundleError(f"{uri}/{WEIGHTS_FILE} is not a readable safetensors file: {exc}") from exc
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise BundleError(f"weights in {uri} do not fit the recorded classifier config {cfg}: {exc}") from exc
    bundle = DetectorBundle(
        model=model.to(device).eval(),
        features=spec,
        threshold_logit=float(meta["threshold_logit"]),
        calibration=meta.get("calibration", {}),
        training_config=meta.get("training_config", {}),
        metrics=meta.get("metrics", {}),
        feature_compute=meta.get("feature_compute", {}),
        created_at=meta.get("created_at", ""),
        content_hash=meta.get("content_hash", ""),
    )
    actual = _hash(weights, bundle._identity())
    if actual != bundle.content_hash:
        raise BundleError(f"bundle at {uri} fails its content hash (recorded {bundle.content_hash[:12]}, found {actual[:12]}): files were changed or mixed")
    return bundle
