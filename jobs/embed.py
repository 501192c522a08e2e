"""Stage 1 of training: embed a labelled manifest once into a Parquet feature cache.

Either feature family (``--extractor``): frozen CLIP embeddings (``clip``, the default) or
the Diffusion Noise Feature of a diffusion UNet (``dnf``; a row holds the flattened
``3 x S x S`` float32 noise estimate -- 768 KiB per image at the bedroom UNet's 256 px).

Reads the manifest (Parquet/CSV or a ``real/`` + ``generated/<gen>/`` tree), validates it
(bad rows are counted with reasons; a manifest without both classes is refused up
front), then runs the shared Ray Data pipeline (``jobs.scanning.pipeline``: read + decode on CPU
tasks, CLIP on GPU actors) and writes a feature cache in the format ``detector_core.method.cache``
describes (``data/``, ``errors.parquet``, and ``_SUCCESS.json`` last). A re-run whose cache
key (manifest + extractor settings + decode) matches the finished cache embeds nothing.

    python -m jobs.embed --manifest s3://bucket/manifest.parquet --output s3://bucket/features/run1
    python -m jobs.embed --manifest ... --output ... --extractor dnf --unet s3://bucket/weights/ddpm-bedroom-256
    ray job submit --working-dir . -- python -m jobs.embed --manifest ... --output ... --gpu --actors 4
"""

from __future__ import annotations

from jobs.common.errors import JobError, run_main
from jobs.common.flags import parse_config
from jobs.training.embedding import EmbedConfig, run_embedding


def main(argv=None) -> dict:
    cfg = parse_config(EmbedConfig, argv, __doc__)
    if not cfg.manifest or not cfg.output:
        raise JobError("--manifest and --output are required")
    return run_embedding(cfg)


if __name__ == "__main__":
    run_main(main)
