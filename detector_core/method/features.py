"""Frozen CLIP features: the detector's input (docs/method.md section 1).

``ClipEncoder`` wraps an open_clip model built from a model name and a ``pretrained``
that is one of: an open_clip tag (``openai``, ``laion2b_s32b_b82k``, ...), a local
checkpoint file, an object-store URI (``s3://``, ``gs://``; fetched once into a local
cache), or ``none`` for a random initialisation (seeded, so that every process builds
the same weights). Image and caption embeddings are *not* L2-normalised, as in the
reference; captions are tokenised to CLIP's 77-token context (cut, not 77 characters).
On CUDA the forward runs under bf16 autocast and returns float32.

The package ships a tiny random config, ``test-tiny`` (64 px, 64-d), registered with
open_clip on import, so that tests and the demo run without any weights. A missing or
unreachable weight file is an error that says what to pass; there is no fallback.
"""

from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch.overrides import TorchFunctionMode

from detector_core.devices import resolve_precision
from detector_core.sources.inputs import ClipInput
from detector_core.storage import fetch_cached, is_remote

__all__ = [
    "FEATURE_MODES",
    "TEST_TINY",
    "FORWARDS",
    "ClipEncoder",
    "WeightsNotFoundError",
    "build_preprocess",
    "check_weights",
    "clip_input",
    "feature_dim",
    "preprocess_config",
]

FEATURE_MODES = ("image", "image+text")
TEST_TINY = "test-tiny"
NO_WEIGHTS = ("", "none", "random")
_CONFIG_DIR = Path(__file__).with_name("model_configs")


@functools.cache
def _open_clip():
    """open_clip, imported on first use with this package's model configs registered.

    Not at module import: open_clip pulls in torchvision and torch._dynamo (~2 s of CPU), and
    every fresh Ray worker that unpickles a function of a module importing this one (a
    cache reader, a decode task) would pay it without building a model.
    """
    import open_clip

    open_clip.add_model_config(_CONFIG_DIR)
    return open_clip


class WeightsNotFoundError(RuntimeError):
    """CLIP weights were asked for but cannot be loaded here."""


class _WeightsLoadedNext(TorchFunctionMode):
    """Build a model whose every weight a checkpoint sets next, without drawing its random initialisation.

    The random draws (``torch.nn.init``'s initialisers, which every module's ``reset_parameters`` and
    open_clip's ``init_parameters`` use, and ``Tensor.normal_``/``uniform_``) fill with NaN instead: a
    memset rather than a draw, and a weight the checkpoint did not set is then found by ``_check_loaded``
    instead of left quietly random. A torch function mode, so it holds for this thread only.
    """

    _DRAWS = frozenset({torch.Tensor.normal_, torch.Tensor.uniform_, *(getattr(torch.nn.init, name) for name in (
        "uniform_", "normal_", "trunc_normal_", "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_",
        "orthogonal_", "sparse_"))})

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self._DRAWS:
            tensor = args[0] if args else kwargs["tensor"]
            with torch.no_grad():
                return tensor.fill_(float("nan"))
        return func(*args, **kwargs)


def _check_loaded(model: torch.nn.Module, what: str) -> None:
    """Refuse a model with a weight its checkpoint did not set (still NaN from ``_WeightsLoadedNext``)."""
    unset = [name for name, t in model.state_dict().items() if t.is_floating_point() and bool(torch.isnan(t).any())]
    if unset:
        raise WeightsNotFoundError(f"the weights of {what} leave {len(unset)} tensors unset ({', '.join(unset[:5])}"
                                   f"{', …' if len(unset) > 5 else ''}): pass the checkpoint of this architecture")



def _is_no_weights(pretrained: str | None) -> bool:
    return pretrained is None or str(pretrained).strip().lower() in NO_WEIGHTS


def _model_config(model_name: str) -> dict:
    cfg = _open_clip().get_model_config(model_name)
    if cfg is None:
        raise ValueError(f"unknown CLIP model {model_name!r}; known: {', '.join(_open_clip().list_models())}")
    return cfg


def feature_dim(model_name: str, mode: str) -> int:
    """Width of the feature vector a model gives in a feature mode."""
    if mode not in FEATURE_MODES:
        raise ValueError(f"feature mode must be one of {FEATURE_MODES}, got {mode!r}")
    embed = int(_model_config(model_name)["embed_dim"])
    return embed if mode == "image" else 2 * embed


def preprocess_config(model_name: str, pretrained: str | None) -> dict:
    """open_clip's eval preprocessing settings for a model and weights, without building it."""
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    cfg = asdict(PreprocessCfg())
    if not _is_no_weights(pretrained):
        tag_cfg = _open_clip().get_pretrained_cfg(model_name, str(pretrained))
        if tag_cfg:
            cfg = merge_preprocess_dict(cfg, tag_cfg)
    cfg = merge_preprocess_dict(cfg, _model_config(model_name).get("preprocess_cfg", {}))
    cfg["size"] = _model_config(model_name)["vision_cfg"]["image_size"]
    return cfg


def build_preprocess(model_name: str, pretrained: str | None) -> Callable:
    """The PIL -> normalised tensor transform that CPU workers apply before embedding."""
    from open_clip.transform import PreprocessCfg, image_transform_v2

    return image_transform_v2(PreprocessCfg(**preprocess_config(model_name, pretrained)), is_train=False)


def clip_input(model_name: str, pretrained: str | None, decode: str = "pil") -> ClipInput:
    """open_clip's eval transform for a model and weights as a ``ClipInput``: the torch-free CPU half
    (resize, crop) that decode tasks run, and the normalisation the accelerator runs.

    open_clip's own transform is built and read back (its steps, size and filter), so that a model
    whose transform ``ClipInput`` does not implement is refused here, not preprocessed differently.
    """
    cfg = preprocess_config(model_name, pretrained)
    full = build_preprocess(model_name, pretrained)
    names = [type(t).__name__ for t in full.transforms]
    size = cfg["size"]
    if isinstance(size, (tuple, list)):
        if len(set(size)) != 1:
            raise ValueError(f"{model_name}: non-square input {size} is not supported")
        size = size[0]
    expected = {"shortest": ["Resize", "CenterCrop"], "squash": ["Resize"]}.get(cfg.get("resize_mode", "shortest"))
    if expected is None or [n for n in names if n not in ("MaybeConvertMode", "MaybeToTensor", "ToTensor", "Normalize")] != expected:
        raise ValueError(f"unexpected open_clip eval transform {names} (resize mode {cfg.get('resize_mode')!r}) for {model_name}")
    interpolation = str(getattr(getattr(full.transforms[0], "interpolation", None), "value", cfg.get("interpolation", "bicubic")))
    return ClipInput(size=int(size), mean=tuple(float(v) for v in cfg["mean"]), std=tuple(float(v) for v in cfg["std"]),
                     interpolation=interpolation, resize_mode=cfg.get("resize_mode", "shortest"), decode=decode)


def _fetch_remote(uri: str, cache_dir: str | None, storage_options: dict | None) -> str:
    """Copy an object-store checkpoint to a local cache once; returns the local path."""
    try:
        return fetch_cached(uri, "clip-weights", storage_options, cache_dir)
    except FileNotFoundError:
        raise WeightsNotFoundError(f"CLIP weights not found at {uri}; pass --pretrained with an existing checkpoint URI or local path") from None


def _resolve_pretrained(model_name: str, pretrained: str | None, cache_dir: str | None, storage_options: dict | None) -> str | None:
    if _is_no_weights(pretrained):
        return None
    pretrained = str(pretrained)
    if is_remote(pretrained):
        return _fetch_remote(pretrained, cache_dir, storage_options)
    if _open_clip().get_pretrained_cfg(model_name, pretrained):
        return pretrained
    if os.path.isfile(pretrained):
        return pretrained
    tags = _open_clip().list_pretrained_tags_by_model(model_name)
    raise WeightsNotFoundError(
        f"--pretrained {pretrained!r} is neither an existing checkpoint file nor an open_clip tag for {model_name} "
        f"(tags: {', '.join(tags) or 'none'}). Pass a local path or s3:// URI of the weights, a tag whose weights are "
        f"in the open_clip cache, or 'none' for random weights (tests only)."
    )


def _cached_tag_weights(model_name: str, tag: str, cache_dir: str | None) -> str | None:
    """The local file of an open_clip tag's weights, or None when they are not in the cache (never downloads)."""
    cfg = _open_clip().get_pretrained_cfg(model_name, tag)
    if cfg.get("file"):
        return cfg["file"] if os.path.isfile(cfg["file"]) else None
    if cfg.get("hf_hub"):
        from huggingface_hub import try_to_load_from_cache

        repo, filename = os.path.split(cfg["hf_hub"])
        names = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        if filename.endswith(".bin"):
            names = [filename[:-4] + ".safetensors", filename]
        for name in names:
            hit = try_to_load_from_cache(repo, name, cache_dir=cache_dir)
            if isinstance(hit, str) and os.path.isfile(hit):
                return hit
    if cfg.get("url"):
        path = os.path.join(cache_dir or os.path.expanduser("~/.cache/clip"), os.path.basename(cfg["url"]))
        if os.path.isfile(path):
            return path
    return None


def check_weights(model_name: str, pretrained: str | None, cache_dir: str | None = None, storage_options: dict | None = None) -> None:
    """Fail now, with what to pass, when a job's CLIP weights are not where it will look (no download, no model built).

    Jobs call this before they start anything (``jobs.train``, ``jobs.embed``): an open_clip tag
    must be in the local cache, a path must exist, an object-store URI must exist.
    """
    _model_config(model_name)
    if _is_no_weights(pretrained):
        return
    pretrained = str(pretrained)
    advice = ("download them into this machine's open_clip cache where there is network (python -c \"import open_clip; open_clip.create_model("
              f"'{model_name}', pretrained='{pretrained}')\") or pass --pretrained with the weights file's path or s3:// URI; "
              "--clip-model test-tiny --pretrained none is the random model for tests")
    if is_remote(pretrained):
        from detector_core.storage import open_fs

        fs, path = open_fs(pretrained, storage_options)
        if not fs.exists(path):
            raise WeightsNotFoundError(f"--pretrained {pretrained} does not exist")
        return
    if _open_clip().get_pretrained_cfg(model_name, pretrained):
        if _cached_tag_weights(model_name, pretrained, cache_dir) is None:
            raise WeightsNotFoundError(f"the {pretrained!r} weights of {model_name} are not in the local open_clip cache and "
                                       f"nothing is downloaded at run time: {advice}")
        return
    _resolve_pretrained(model_name, pretrained, cache_dir, storage_options)  # a file, or the error that lists the tags


# How the image tower runs on a GPU (``jobs.scan --forward``): (precision, torch.compile mode). ``autocast`` is what every
# bundle so far was trained with; the others trade bits for speed (bench/gpu_check.py measures both, docs/scaling.md).
FORWARDS = {
    "autocast": ("auto", ""),  # bf16 autocast over fp32 weights on CUDA, fp32 on CPU
    "bf16": ("bf16-weights", ""),  # weights cast to bf16: no autocast, under which nn.MultiheadAttention never takes its fused path
    "bf16-compile": ("bf16-weights", "default"),  # + torch.compile of the image tower at a static batch
    "bf16-graphs": ("bf16-weights", "reduce-overhead"),  # + CUDA graphs (torch.compile's reduce-overhead mode)
}


class ClipEncoder:
    """A frozen open_clip model on one device, giving detector features.

    Args:
        model_name: open_clip architecture, e.g. ``ViT-L-14`` (the paper's) or ``test-tiny``.
        pretrained: open_clip tag, local checkpoint path, object-store URI, or ``none``.
        device: where the model runs; passed in, never guessed here.
        precision: ``auto`` (bf16 autocast on CUDA, fp32 elsewhere), ``fp32``, ``bf16`` or ``fp16`` (autocast), or
            ``bf16-weights`` (the model cast to bf16, inputs too; no autocast).
        compile_mode: ``""`` (eager), or a ``torch.compile`` mode for the image tower (``default``,
            ``reduce-overhead``: CUDA graphs, ``max-autotune``); batches are then padded to ``static_batch``
            so that one graph serves every call.
        cache_dir: where tag downloads and object-store weights are cached.
        storage_options: fsspec options for object-store weights (endpoint, credentials).
        seed: RNG seed for a random initialisation (``pretrained='none'``).
    """

    def __init__(
        self,
        model_name: str,
        pretrained: str | None,
        device: torch.device | str = "cpu",
        precision: str = "auto",
        cache_dir: str | None = None,
        storage_options: dict | None = None,
        seed: int = 0,
        compile_mode: str = "",
        static_batch: int = 0,
    ) -> None:
        self.model_name = model_name
        self.pretrained = "none" if _is_no_weights(pretrained) else str(pretrained)
        self.device = torch.device(device)
        _model_config(model_name)
        checkpoint = _resolve_pretrained(model_name, pretrained, cache_dir, storage_options)
        # A random CLIP must be the same in the trainer and in every scan worker. A model whose weights are loaded
        # next is built without its random initialisation (a second of CPU for ViT-B-32 in every Scorer's start).
        with torch.random.fork_rng(devices=[]), (_WeightsLoadedNext() if checkpoint is not None else contextlib.nullcontext()):
            torch.manual_seed(seed)
            try:
                model, _, preprocess = _open_clip().create_model_and_transforms(
                    model_name, pretrained=checkpoint, device=self.device, cache_dir=cache_dir
                )
            except RuntimeError as exc:
                if "download" in str(exc).lower():
                    raise WeightsNotFoundError(
                        f"could not fetch the {self.pretrained!r} weights of {model_name} (no network here?): {exc}. "
                        f"Download them where there is network and pass --pretrained /path/to/checkpoint (or s3://...)."
                    ) from exc
                raise
        if checkpoint is not None:
            _check_loaded(model, f"{model_name} from {self.pretrained}")
        self.model = model.eval().requires_grad_(False)
        self.preprocess = preprocess
        self.tokenizer = _open_clip().get_tokenizer(model_name)
        self.embed_dim = int(_model_config(model_name)["embed_dim"])
        self.image_size = preprocess_config(model_name, self.pretrained)["size"]
        self.precision = resolve_precision(precision, self.device.type)
        if self.precision == "bf16-weights":
            self.model = self.model.to(torch.bfloat16)
        self._encode_image = self.model.encode_image
        if compile_mode:
            self._encode_image = torch.compile(self.model.encode_image, mode=None if compile_mode == "default" else compile_mode,
                                               dynamic=False)
        self.static_batch = int(static_batch) if compile_mode else 0

    def _autocast(self):
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        return torch.autocast(device_type=self.device.type, dtype=dtype, enabled=dtype is not None)

    def feature_dim(self, mode: str) -> int:
        return feature_dim(self.model_name, mode)

    @torch.inference_mode()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Preprocessed images ``(n, 3, H, W)`` -> float32 embeddings ``(n, embed_dim)``."""
        pixels = pixels.to(self.device, non_blocking=True)
        if self.precision == "bf16-weights":
            pixels = pixels.to(torch.bfloat16)
        n, step = pixels.shape[0], self.static_batch
        with self._autocast():
            if not step:
                return self._encode_image(pixels).float()
            out = []
            for i in range(0, n, step):  # every call at the compiled batch: a short one is padded
                part = pixels[i : i + step]
                if part.shape[0] < step:
                    part = torch.cat([part, part.new_zeros((step - part.shape[0], *part.shape[1:]))])
                out.append(self._encode_image(part).float()[: min(step, n - i)])
            return torch.cat(out) if out else pixels.new_zeros((0, self.embed_dim), dtype=torch.float32)

    @torch.inference_mode()
    def encode_texts(self, captions: Sequence[str]) -> torch.Tensor:
        """Captions -> float32 embeddings; each is cut to CLIP's 77-token context."""
        if any(c is None for c in captions):
            raise ValueError("a caption is missing (None); image+text features need a caption for every image")
        tokens = self.tokenizer(list(captions)).to(self.device, non_blocking=True)
        with self._autocast():
            return self.model.encode_text(tokens).float()

    def encode(self, pixels: torch.Tensor, captions: Sequence[str] | None, mode: str) -> torch.Tensor:
        """Detector features for a batch in a feature mode (``image`` or ``image+text``)."""
        if mode not in FEATURE_MODES:
            raise ValueError(f"feature mode must be one of {FEATURE_MODES}, got {mode!r}")
        image = self.encode_images(pixels)
        if mode == "image":
            return image
        if captions is None:
            raise ValueError("this detector uses image+text features and needs a caption per image; none were given")
        if len(captions) != image.shape[0]:
            raise ValueError(f"{len(captions)} captions for {image.shape[0]} images")
        return torch.cat([image, self.encode_texts(captions)], dim=1)
