"""Diffusion Noise Feature (DNF): the noise a pretrained pixel-space diffusion UNet estimates for an image.

Zhang & Xu, "Diffusion Noise Feature: Accurate and Fast Generated Image Detection"
(docs/method.md section 8): the image, resized to the UNet's side (256 for
the DDPM/DDIM LSUN-Bedroom UNet) with bilinear interpolation and scaled to [-1, 1], goes once
through the UNet at the first timestep of the DDIM inversion schedule (``t = 0``); the
estimated noise ``eps_theta(x, t)`` -- an image-shaped tensor -- is the feature a ResNet
classifies. Two value modes (``DNF_VALUES``):

- ``reference`` (default): the reference code's feature, bit for bit on the same UNet and
  decoded pixels: bicubic (antialiased) resize of the float image, ``x / 255 * 2 - 1``, the
  UNet call, then what ``torchvision.utils.save_image`` does to the noise -- ``* 255 + 0.5``,
  clamp to [0, 255], truncate to 8 bits (no min-max scaling) -- and, for a JPEG source, the
  JPEG file it writes (PIL's defaults, quality 75) read back; the classifier sees ``/ 255``,
  in [0, 1], as the reference's ``ToTensor`` gives it.
- ``raw``: bilinear resize of the uint8 image, the float noise estimate unclamped (what this
  tool did before; its feature ids are unchanged).

``unet`` is a diffusers ``UNet2DModel`` folder (``config.json`` + weights, or a pipeline
folder with a ``unet/`` subfolder), local or on an object store (fetched once into a local
cache), or ``test-tiny``: a 32 px random UNet shipped with the package for tests and the
demo (seeded, so every process builds the same weights). Nothing is downloaded: a model id
that is not a folder is an error that says what to pass. The UNet runs in fp32 for
``reference`` values; for ``raw`` under bf16 autocast on CUDA.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from detector_core.devices import resolve_precision
from detector_core.storage import fetch_cached, is_remote, join, open_fs

__all__ = ["DNF_VALUES", "TEST_TINY", "DnfExtractor", "DnfPreprocess", "UnetNotFoundError", "bf16_allowed", "load_unet", "quantize_noise", "unet_config"]

TEST_TINY = "test-tiny"
DNF_VALUES = ("reference", "raw")
SAVE_FORMAT_JPEG_QUALITY = 75  # PIL's default, what save_image writes a .jpg with
_CONFIG_DIR = Path(__file__).with_name("unet_configs")
CONFIG_FILE = "config.json"


class UnetNotFoundError(RuntimeError):
    """The diffusion UNet was asked for but cannot be loaded here."""


def _not_found(ref: str, why: str) -> UnetNotFoundError:
    return UnetNotFoundError(
        f"--unet {ref!r}: {why}. Pass a diffusers UNet2DModel folder (config.json + diffusion_pytorch_model.safetensors, "
        f"or a pipeline folder with unet/), local or s3://…, e.g. google/ddpm-bedroom-256 downloaded where there is network "
        f"(`huggingface-cli download google/ddpm-bedroom-256 --local-dir DIR`); or 'test-tiny' for the random test UNet."
    )


def _config_path(path: str, sub: str) -> str:
    return join(path, sub, CONFIG_FILE) if sub else join(path, CONFIG_FILE)


def _model_dir(ref: str, storage_options: dict | None) -> tuple[object, str, str]:
    """(filesystem, path of ``ref``, subfolder holding config.json: '' or 'unet') of a UNet folder."""
    fs, path = open_fs(ref, storage_options)
    for sub in ("", "unet"):
        if fs.exists(_config_path(path, sub)):
            return fs, path, sub
    if fs.exists(path):
        raise _not_found(ref, f"no {CONFIG_FILE} there or in its unet/ subfolder")
    raise _not_found(ref, "no such folder")


def unet_config(ref: str, storage_options: dict | None = None) -> dict:
    """The UNet's architecture config (sample size, channels ...), read without loading weights."""
    if ref == TEST_TINY:
        return json.loads((_CONFIG_DIR / "test-tiny.json").read_text())
    fs, path, sub = _model_dir(ref, storage_options)
    return json.loads(fs.cat_file(_config_path(path, sub)))


def load_unet(ref: str, device: torch.device | str = "cpu", storage_options: dict | None = None,
              cache_dir: str | None = None, seed: int = 0):
    """A frozen ``UNet2DModel`` in eval mode on ``device``."""
    from diffusers import UNet2DModel

    if ref == TEST_TINY:
        cfg = {k: v for k, v in unet_config(ref).items() if not k.startswith("_")}
        with torch.random.fork_rng(devices=[]):  # the same random UNet in every process
            torch.manual_seed(seed)
            model = UNet2DModel(**cfg)
    else:
        _, path, sub = _model_dir(ref, storage_options)
        local = fetch_cached(ref, "unet", storage_options, cache_dir) if is_remote(ref) else path
        try:
            # low_cpu_mem_usage=False: the default wants `accelerate` and warns without it.
            model = UNet2DModel.from_pretrained(local, subfolder=sub or None, local_files_only=True, low_cpu_mem_usage=False)
        except (OSError, ValueError) as exc:  # diffusers reports missing/corrupt weight files as OSError
            raise _not_found(ref, f"could not load the weights ({exc})") from exc
    return model.to(device).eval().requires_grad_(False)


class DnfPreprocess:
    """The DNF input transform cut where the image leaves the CPU, like ``inputs.ClipInput``.

    ``to_input`` (CPU workers) takes a decoded RGB PIL image. ``raw``: resized to ``size x
    size`` bilinear (squashed, not cropped) -> ``H x W x 3`` uint8. ``reference``: the
    reference's ``Resize((size, size), bicubic)`` on the float ``3 x H x W`` tensor
    (antialiased, torchvision's default), unclamped -> ``H x W x 3`` float32 (four times the
    bytes; values may leave [0, 255] as bicubic overshoots). ``normalize`` (on the device):
    ``(n, H, W, 3)`` -> float ``(n, 3, H, W)`` in [-1, 1], with the reference's operations in
    its order for ``reference``, so the result is the same bits.
    """

    draft_ok = False  # the noise estimate lives in the high frequencies that DCT downscaling changes

    def __init__(self, size: int, values: str = "reference") -> None:
        if values not in DNF_VALUES:
            raise ValueError(f"DNF values must be one of {DNF_VALUES}, got {values!r}")
        self.size = int(size)
        self.values = values
        self.resize = "bicubic-antialias-float" if values == "reference" else "bilinear"
        self.dtype = "float32" if values == "reference" else "uint8"  # of what to_input returns

    def to_input(self, image) -> np.ndarray:
        from PIL import Image

        if self.values == "raw":
            return np.asarray(image.convert("RGB").resize((self.size, self.size), Image.Resampling.BILINEAR), dtype=np.uint8)
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms.functional import resize

        x = torch.from_numpy(np.array(image.convert("RGB"), dtype=np.uint8)).permute(2, 0, 1).float()
        x = resize(x, [self.size, self.size], interpolation=InterpolationMode.BICUBIC, antialias=True)
        return x.permute(1, 2, 0).numpy()

    def normalize(self, batch: torch.Tensor) -> torch.Tensor:
        x = batch.permute(0, 3, 1, 2).float()
        if self.values == "raw":
            return x.div_(127.5).sub_(1.0)
        return (x / 255.0) * 2.0 - 1.0


def bf16_allowed(values: str) -> bool:
    """Whether ``auto`` precision may run the UNet in bf16: not for ``reference`` values, whose bits come from an fp32 UNet."""
    return values == "raw"


def quantize_noise(noise: torch.Tensor, jpeg: np.ndarray | None = None) -> torch.Tensor:
    """What the reference's classifier reads of a noise estimate ``(n, 3, S, S)``: float32 in [0, 1], on the CPU.

    ``torchvision.utils.save_image``'s arithmetic (``* 255 + 0.5``, clamp, truncate to
    uint8); rows where ``jpeg`` is true go through the JPEG file it would write for a
    ``.jpg`` source (PIL defaults) and are read back; then ``ToTensor``'s ``/ 255``.
    """
    q = noise.float().mul(255).add_(0.5).clamp_(0, 255).to("cpu", torch.uint8)
    if jpeg is not None and np.any(jpeg):
        import io

        from PIL import Image

        hwc = q.permute(0, 2, 3, 1).numpy()
        for i in np.flatnonzero(jpeg):
            buf = io.BytesIO()
            Image.fromarray(hwc[i]).save(buf, format="JPEG", quality=SAVE_FORMAT_JPEG_QUALITY)
            buf.seek(0)
            q[i] = torch.from_numpy(np.array(Image.open(buf).convert("RGB"), dtype=np.uint8)).permute(2, 0, 1)
    return q.float().div(255)


class DnfExtractor:
    """A frozen diffusion UNet on one device, giving DNF features.

    Args:
        unet: UNet folder (local or object store), ``test-tiny``, or a ``UNet2DModel`` built by the caller.
        device: where the UNet runs; passed in, never guessed here.
        timestep: the diffusion timestep of the single UNet call (0: the first step of
            DDIM inversion, as in the reference).
        precision: ``auto`` (fp32 for ``reference`` values, whose bits need it; for ``raw`` bf16
            autocast on CUDA, fp32 elsewhere), ``fp32``, ``bf16`` or ``fp16``.
        values: ``reference`` (the reference's 8-bit feature) or ``raw`` (float noise), module docstring.
        storage_options / cache_dir: for object-store UNets.
        seed: RNG seed of the ``test-tiny`` random initialisation.
    """

    def __init__(self, unet, device: torch.device | str = "cpu", timestep: int = 0, precision: str = "auto",
                 storage_options: dict | None = None, cache_dir: str | None = None, seed: int = 0, values: str = "reference") -> None:
        self.device = torch.device(device)
        self.timestep = int(timestep)
        if isinstance(unet, str):
            self.unet = load_unet(unet, self.device, storage_options, cache_dir, seed)
        else:
            self.unet = unet.to(self.device).eval().requires_grad_(False)
        self.image_size = int(self.unet.config.sample_size)
        self.channels = int(self.unet.config.out_channels)
        if self.channels != 3:  # FeatureSpec.shape, bundles and the ResNet all take a 3-channel noise estimate
            raise ValueError(f"UNet {unet if isinstance(unet, str) else type(unet).__name__} predicts {self.channels} channels; "
                             f"DNF takes an RGB noise estimate (out_channels 3), e.g. the DDPM/DDIM pixel-space UNets")
        self.precision = resolve_precision(precision, self.device.type, bf16=bf16_allowed(values))
        self.prep = DnfPreprocess(self.image_size, values)
        self.values = values

    @property
    def dim(self) -> int:
        return self.channels * self.image_size * self.image_size

    @torch.inference_mode()
    def noise(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] ``(n, 3, S, S)`` -> estimated noise ``(n, 3, S, S)``, float32."""
        x = x.to(self.device, non_blocking=True)
        t = torch.full((x.shape[0],), self.timestep, dtype=torch.long, device=self.device)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        with torch.autocast(device_type=self.device.type, dtype=dtype, enabled=dtype is not None):
            return self.unet(x, t).sample.float()

    def extract(self, pixels: torch.Tensor, captions=None, jpeg: np.ndarray | None = None) -> torch.Tensor:
        """``(n, S, S, 3)`` batch of ``prep.to_input`` arrays -> flattened DNF features ``(n, 3*S*S)``.

        ``jpeg``: which rows came from JPEG files (``reference`` round-trips their noise through
        a JPEG file, as the reference's saved copies are; ignored for ``raw``).
        """
        noise = self.noise(self.prep.normalize(pixels.to(self.device, non_blocking=True)))
        if self.values == "reference":
            return quantize_noise(noise, jpeg).flatten(1)
        return noise.flatten(1)
