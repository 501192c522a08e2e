"""Choosing the torch device a model runs on, and refusing a GPU that is asked for but unusable.

A job run with ``--gpu`` used to fall back to the CPU silently when CUDA did not work (a
torch build for a newer CUDA than the node's driver, a CPU-only torch, no device visible),
and then ran a night's scan a hundred times slower. ``select_device(gpu=True)`` either
returns a CUDA device on which a kernel has actually run, or raises ``DeviceError`` saying
which of those it is. Callers (actors, training workers) pass the result on; the library
never picks a device on its own.
"""

from __future__ import annotations

import os
import warnings

import torch

PRECISIONS = ("fp32", "bf16", "fp16", "bf16-weights")  # bf16/fp16: autocast over fp32 weights; bf16-weights: the weights cast


def resolve_precision(precision: str, device_type: str, bf16: bool = True) -> str:
    """An extractor's compute precision: ``auto`` is bf16 autocast on CUDA (where ``bf16`` is allowed), fp32 elsewhere.

    Extractors and ``extractors.feature_compute`` (what caches and bundles record) both call
    this, so the precision recorded is the one used.
    """
    if precision == "auto":
        return "bf16" if (device_type == "cuda" and bf16) else "fp32"
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be auto or one of {PRECISIONS}, got {precision!r}")
    return precision


class DeviceError(RuntimeError):
    """A GPU was asked for and CUDA cannot be used here."""


def cuda_unusable_reason() -> str | None:
    """Why CUDA cannot run a kernel in this process, or None when it can."""
    built = torch.version.cuda
    if not built:
        return f"this torch ({torch.__version__}) is built without CUDA; install a CUDA build of torch"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        available = torch.cuda.is_available()
    if not available:
        said = " ".join("; ".join(str(w.message) for w in caught).split())[:300]
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible is not None and not visible.strip():
            return "no GPU is visible to this process (CUDA_VISIBLE_DEVICES is empty: it was not given a GPU)"
        driver = _nvidia_driver()
        if driver is None:
            return "this machine has no NVIDIA driver (/proc/driver/nvidia/version is absent): no GPU here"
        return (f"torch {torch.__version__} is built for CUDA {built} and cannot use this machine's GPU with driver {driver}"
                + (f": {said}" if said else " (a driver older than that CUDA needs, or no device)"))
    try:
        x = torch.ones(8, device="cuda")
        torch.cuda.synchronize()
        if float((x + x).sum().item()) != 16.0:
            return "a test kernel on the GPU returned a wrong result"
    except RuntimeError as e:  # e.g. "no kernel image is available for execution on the device"
        return f"a test kernel failed on {torch.cuda.get_device_name(0)}: {' '.join(str(e).split())[:300]}"
    return None


def select_device(gpu: bool) -> torch.device:
    """``cuda`` (checked to work) when ``gpu``, else ``cpu``; raises ``DeviceError`` rather than fall back."""
    if not gpu:
        return torch.device("cpu")
    reason = cuda_unusable_reason()
    if reason:
        raise DeviceError(f"--gpu was given but CUDA is not usable: {reason}. Fix the image/driver, or run without --gpu")
    return torch.device("cuda", torch.cuda.current_device())


def _nvidia_driver() -> str | None:
    """The NVIDIA kernel driver's version line, or None where there is none (Linux)."""
    try:
        with open("/proc/driver/nvidia/version") as f:
            first = f.readline()
    except OSError:
        return None
    words = first.split()
    return next((w for w in words if w[:1].isdigit() and "." in w), first.strip()[:80])
