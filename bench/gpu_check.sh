#!/usr/bin/env bash
# One-shot GPU check (bench/gpu_check.py): ViT-L-14 forward, decode-only rates (CPU paths per core, the GPU's
# hardware JPEG path, its distance from the CPU path), the forward variants (bf16 weights, torch.compile, CUDA graphs,
# batch sweep, score differences), the scan's stages with CPU and with GPU decoding, DNF, the SAM step.
# Everything fits one 600 s call only on a warm machine; with little device time left, run the new parts first:
#   bash bench/gpu_check.sh "$OUT" --skip vit,dnf,sam
# Writes OUT_DIR/gpu_check.json (default: $OUT on the device machine, else .). No network: the
# Python packages the GPU image lacks travel as wheels in .whl/ (cp312, manylinux x86-64; the device
# tool's README has the pip download line): open_clip_torch, ftfy, wcwidth, diffusers,
# importlib_metadata, mmh3 (detector_core.tables.state).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-.}}"
if ls .whl/*.whl >/dev/null 2>&1 && ! python3 -c "import open_clip, diffusers, mmh3" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
PYTHONUNBUFFERED=1 timeout 560 python3 -m bench.gpu_check --out "$out/gpu_check.json" "${@:2}"
