"""The ``nvjpeg`` decode backend's tensor half: JPEG bytes -> model input on the accelerator, in batches.

``decode_inputs`` takes the bytes of the files that ``jpeg_header.route`` sent to the GPU and
returns the ``size x size x 3`` uint8 inputs: torchvision's batched ``decode_jpeg`` (on CUDA,
nvJPEG's hardware engine; on CPU, libjpeg-turbo, which is what the tests run), the EXIF
orientation applied as Pillow's ``exif_transpose`` does, then ``resize_crop``. The files that
the router sent to the CPU are decoded by Pillow there and go through the same ``resize_crop``
(``resize.resize_crop_array``, on the CPU), so that both paths are one function of the decoded pixels
(docs/method.md section 12). A file the GPU decoder refuses is reported, not guessed: the
caller decodes it on the CPU path instead.
"""

from __future__ import annotations

import warnings

import torch

from detector_core.sources.inputs import ClipInput
from detector_core.sources.resize import resize_crop

__all__ = ["decode_inputs", "orient"]


def orient(x: torch.Tensor, orientation: int) -> torch.Tensor:
    """A ``(3, H, W)`` image turned as Pillow's ``exif_transpose`` turns one with this EXIF orientation."""
    if orientation == 2:
        return x.flip(-1)
    if orientation == 3:
        return x.flip(-1).flip(-2)
    if orientation == 4:
        return x.flip(-2)
    if orientation == 5:
        return x.transpose(-1, -2)
    if orientation == 6:
        return torch.rot90(x, -1, (-2, -1))
    if orientation == 7:
        return torch.rot90(x, 2, (-2, -1)).transpose(-1, -2)
    if orientation == 8:
        return torch.rot90(x, 1, (-2, -1))
    return x


def _decode(tensors: list[torch.Tensor], device: torch.device) -> list:
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision 0.29 marks its image decoders deprecated (for TorchCodec)
        return decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device)


def decode_inputs(datas: list[bytes], orientations: list[int], inp: ClipInput, device: torch.device | str
                  ) -> tuple[torch.Tensor, list[str | None]]:
    """JPEG bytes -> ``(n, size, size, 3)`` uint8 inputs on ``device`` and, per file, None or why it failed.

    One batched decode call; when it fails (one bad file fails the whole CUDA batch), each file is
    decoded alone so that only the bad ones are reported. A failed file's row is zeros.
    """
    device = torch.device(device)
    out = torch.zeros((len(datas), inp.size, inp.size, 3), dtype=torch.uint8, device=device)
    errors: list[str | None] = [None] * len(datas)
    if not datas:
        return out, errors
    tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
    try:
        images = _decode(tensors, device)
    except RuntimeError:
        images = []
        for i, t in enumerate(tensors):
            try:
                images.append(_decode([t], device)[0])
            except RuntimeError as exc:
                images.append(None)
                errors[i] = f"{type(exc).__name__}: {exc}"[:300]
    for i, (im, o) in enumerate(zip(images, orientations)):
        if im is not None:
            out[i] = resize_crop(orient(im, int(o)), inp)
    return out, errors
