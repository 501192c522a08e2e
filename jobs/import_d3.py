"""Import ELSA D3 shards into a training manifest plus image files.

D3 (docs/method.md section 7) stores, per record, four generated images as bytes
columns ``image_gen0..3`` (each a struct with ``bytes`` or raw bytes) made by the models
named in ``model_gen0..3`` from ``positive_prompt``, and the real LAION image only by
``url`` with its caption in ``original_prompt``. This writes the generated images to
``OUT/generated/<model>/<id>_<k>.<ext>`` and a manifest ``OUT/manifest.parquet`` with
``uri, label, caption, generator`` (real rows: label 0, caption = original_prompt;
generated rows: label 1, caption = positive_prompt). Real images must already be
mirrored (nothing is downloaded): ``--real-map`` is a Parquet/CSV of ``url, uri``; a
``url`` that is already a local path or an object-store URI is used as it is; other
records' real images are left out and counted.

    python -m jobs.import_d3 --shards 's3://data/d3/train-*.parquet' --output s3://data/d3-import --real-map s3://data/laion-mirror.parquet
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from detector_core import schema as S
from detector_core.sources.manifest import read_manifest
from detector_core.storage import arrow_fs, is_remote, join, open_fs, s3_storage_options
from jobs.common.errors import JobError, run_main
from jobs.common.flags import StorageOptions, opt, parse_config
from jobs.common.outputs import write_json

N_GEN = 4


@dataclass
class ImportConfig(StorageOptions):
    shards: str = opt("", "D3 Parquet shard(s): a file, a folder, or a glob")
    output: str = opt("", "folder for generated/ images, manifest.parquet and import.json")
    real_map: str = opt("", "Parquet/CSV with url,uri: where each real image's URL is mirrored")


def _image_bytes(value) -> bytes | None:
    if value is None:
        return None
    if isinstance(value, dict):
        return value.get("bytes")
    return bytes(value)


def _ext(data: bytes) -> str:
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return "bin"


def run_import(cfg: ImportConfig) -> dict:
    so = s3_storage_options(cfg.s3_endpoint or None)
    fs, pattern = open_fs(cfg.shards, so)
    files = sorted(fs.glob(pattern)) if any(c in pattern for c in "*?[") else (
        sorted(f for f in fs.find(pattern) if f.endswith(".parquet")) if fs.isdir(pattern) else [pattern])
    if not files:
        raise JobError(f"no D3 shards at {cfg.shards}")
    mirror = {}
    if cfg.real_map:
        m = read_manifest(cfg.real_map, so)
        if "url" not in m.column_names:
            raise JobError(f"--real-map {cfg.real_map} needs url and uri columns")
        mirror = dict(zip(m.column("url").to_pylist(), m.column(S.URI).to_pylist()))
    out_fs, _ = open_fs(cfg.output, so)
    rows = {S.URI: [], S.LABEL: [], S.CAPTION: [], S.GENERATOR: []}
    counts = {"records": 0, "generated": 0, "real": 0, "real_not_mirrored": 0, "generated_missing": 0}
    pa_fs, _ = arrow_fs(cfg.shards, so)
    for f in files:
        table = pq.read_table(f, filesystem=pa_fs)
        for rec in table.to_pylist():
            counts["records"] += 1
            rid = str(rec.get("id") or hashlib.sha1(str(rec.get("url")).encode()).hexdigest()[:16])
            url = rec.get("url")
            real = mirror.get(url) or (url if url and (is_remote(url) and not url.startswith("http") or url.startswith("/")) else None)
            if real:
                rows[S.URI].append(real)
                rows[S.LABEL].append(0)
                rows[S.CAPTION].append(rec.get("original_prompt"))
                rows[S.GENERATOR].append("real")
                counts["real"] += 1
            else:
                counts["real_not_mirrored"] += 1
            for k in range(N_GEN):
                data = _image_bytes(rec.get(f"image_gen{k}"))
                if not data:
                    counts["generated_missing"] += 1
                    continue
                model = str(rec.get(f"model_gen{k}") or f"gen{k}").replace("/", "_")
                uri = join(cfg.output, "generated", model, f"{rid}_{k}.{_ext(data)}")
                path = open_fs(uri, so)[1]
                out_fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
                out_fs.pipe_file(path, data)
                rows[S.URI].append(uri)
                rows[S.LABEL].append(1)
                rows[S.CAPTION].append(rec.get("positive_prompt"))
                rows[S.GENERATOR].append(model)
                counts["generated"] += 1
    manifest = pa.table({S.URI: pa.array(rows[S.URI], pa.string()), S.LABEL: pa.array(rows[S.LABEL], pa.int8()),
                         S.CAPTION: pa.array(rows[S.CAPTION], pa.string()), S.GENERATOR: pa.array(rows[S.GENERATOR], pa.string())})
    with out_fs.open(open_fs(join(cfg.output, "manifest.parquet"), so)[1], "wb") as fh:
        pq.write_table(manifest, fh)
    write_json(join(cfg.output, "import.json"), {**counts, "shards": files}, so)
    print(f"imported {counts['records']} D3 records: {counts['generated']} generated, {counts['real']} real, "
          f"{counts['real_not_mirrored']} real images not mirrored -> {join(cfg.output, 'manifest.parquet')}")
    return counts


def main(argv=None) -> dict:
    cfg = parse_config(ImportConfig, argv, __doc__)
    if not cfg.shards or not cfg.output:
        raise JobError("--shards and --output are required")
    return run_import(cfg)


if __name__ == "__main__":
    run_main(main)
