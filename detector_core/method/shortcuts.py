"""The shortcut report: how well the files' metadata alone predicts the label.

In D3 and most scraped sets, real images are JPEGs of many sizes and generated ones PNGs of
a few fixed sizes: a detector can score the container instead of the content, and no
metric on a test split drawn from the same set will show it. This report fits a small
classifier (gradient-boosted trees) on metadata only -- format, width, height, aspect, file
size, JPEG quality estimate, EXIF present, what the file declares about its origin (C2PA,
XMP, generator chunks: evidence in the file is a container feature too), which decoder made the pixels -- and gives its cross-validated ROC AUC for the
label, overall and per generator (that generator's images against all real ones). An AUC
near 0.5 means the metadata says nothing; at or above ``WARN_AUC`` the label is predictable
from the files and the report says so loudly. Training (``jobs.train``) and evaluation
(``jobs.evaluate``) write it into ``metrics.json``.
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa

from detector_core import schema as S

__all__ = ["METADATA_COLUMNS", "WARN_AUC", "metadata_matrix", "dataset_report", "sample_rows", "shortcut_report"]

WARN_AUC = 0.8
METADATA_COLUMNS = (S.FORMAT, S.WIDTH, S.HEIGHT, S.SIZE, S.JPEG_QUALITY, S.EXIF, S.DECLARED, S.DECODE_PATH)
# What a file declares about its origin (detector_core.sources.provenance) is a container feature too.
_DECLARED = {"declared_generated": 1.0, "declared_edited": 0.5, "declared_captured": -1.0}
_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")


def _column(table: pa.Table, name: str, fill) -> np.ndarray:
    if name not in table.column_names:  # a cache written before the column existed
        return np.full(table.num_rows, fill, dtype=float)
    values = table.column(name).to_pylist()
    return np.array([fill if v is None or v == -1 else v for v in values], dtype=float)


def metadata_matrix(table: pa.Table) -> tuple[np.ndarray, list[str]]:
    """(n, k) float features from the metadata columns, and their names."""
    fmt = table.column(S.FORMAT).to_pylist() if S.FORMAT in table.column_names else [None] * table.num_rows
    onehot = np.array([[1.0 if f == name else 0.0 for name in _FORMATS] + [0.0 if f in _FORMATS else 1.0] for f in fmt])
    w, h = _column(table, S.WIDTH, np.nan), _column(table, S.HEIGHT, np.nan)
    size = _column(table, S.SIZE, np.nan)
    quality = _column(table, S.JPEG_QUALITY, -1.0)
    exif = _column(table, S.EXIF, 0.0)
    declared = (np.array([_DECLARED.get(v, 0.0) for v in table.column(S.DECLARED).to_pylist()])
                if S.DECLARED in table.column_names else np.zeros(table.num_rows))
    # Which decoder made the pixels (nvjpeg on the GPU for baseline JPEGs, Pillow for the rest): a route by
    # format must not become what the detector learns, so the report asks whether it predicts the label.
    gpu_decoded = (np.array([1.0 if v == "nvjpeg" else 0.0 for v in table.column(S.DECODE_PATH).to_pylist()])
                   if S.DECODE_PATH in table.column_names else np.zeros(table.num_rows))
    with np.errstate(divide="ignore", invalid="ignore"):
        cols = [np.log2(w), np.log2(h), np.log2(w / h), np.log2(size + 1), quality, exif, declared, gpu_decoded]
    x = np.column_stack([onehot.reshape(table.num_rows, len(_FORMATS) + 1), *cols])
    names = [f"format={f}" for f in _FORMATS] + ["format=other", "log2_width", "log2_height", "log2_aspect", "log2_bytes",
                                                  "jpeg_quality", "exif", "declared", "decode_path=nvjpeg"]
    return np.nan_to_num(x, nan=-1.0, posinf=-1.0, neginf=-1.0), names


def _cv_auc(x: np.ndarray, y: np.ndarray, folds: int, seed: int) -> float | None:
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    per_class = np.bincount(y.astype(int), minlength=2)
    k = int(min(folds, per_class.min()))
    if k < 2:
        return None
    model = HistGradientBoostingClassifier(max_iter=100, max_depth=3, learning_rate=0.1, random_state=seed)
    proba = cross_val_predict(model, x, y, cv=StratifiedKFold(k, shuffle=True, random_state=seed), method="predict_proba")[:, 1]
    return float(roc_auc_score(y, proba))


def shortcut_report(table: pa.Table, folds: int = 5, seed: int = 0, max_rows: int = 200_000, warn_at: float = WARN_AUC) -> dict:
    """Cross-validated AUC of label-from-metadata, overall and per generator; ``warning`` set when any reaches ``warn_at``.

    ``table`` holds ``label`` (1 generated, 0 real), optionally ``generator``, and the metadata
    columns (rows that failed to decode should be left out). Above ``max_rows`` a seeded sample
    of that many rows is used.
    """
    if table.num_rows > max_rows:
        keep = np.sort(np.random.default_rng(seed).choice(table.num_rows, max_rows, replace=False))
        table = table.take(pa.array(keep))
    y = np.asarray(table.column(S.LABEL).to_numpy(zero_copy_only=False), dtype=int)
    x, names = metadata_matrix(table)
    report: dict = {"features": names, "rows": int(table.num_rows), "folds": folds, "warn_at": warn_at,
                    "auc": _cv_auc(x, y, folds, seed), "per_generator": {}}
    if S.GENERATOR in table.column_names:
        gens = np.array([g or "" for g in table.column(S.GENERATOR).to_pylist()], dtype=object)
        real = y == 0
        for g in sorted({str(v) for v in gens[y == 1]}):
            mask = real | ((y == 1) & (gens == g))
            report["per_generator"][g or "(none)"] = _cv_auc(x[mask], y[mask], folds, seed)
    scored = {"all": report["auc"], **report["per_generator"]}
    worst = max(((k, v) for k, v in scored.items() if v is not None and not math.isnan(v)), key=lambda kv: kv[1], default=None)
    report["warning"] = None
    if worst is not None and worst[1] >= warn_at:
        which = "" if worst[0] == "all" else f" (generator {worst[0]})"
        report["warning"] = (f"labels are predictable from the files' format and size (or other metadata: evidence, decode path){which}: AUC {worst[1]:.2f} from metadata "
                             "alone; this detector may learn the container, not the content")
    return report


def sample_rows(batches, total: int, max_rows: int = 200_000, seed: int = 0) -> pa.Table:
    """A seeded Bernoulli sample of about ``max_rows`` of ``total`` rows, from a stream of record batches.

    Memory stays about ``max_rows`` rows whatever ``total`` is (a feature cache of 10^7 images
    is read batch by batch, its metadata columns only).
    """
    keep = min(1.0, max_rows / max(total, 1))
    rng = np.random.default_rng(seed)
    parts, schema = [], None
    for b in batches:
        schema = b.schema
        parts.append(b if keep >= 1.0 else b.filter(pa.array(rng.random(b.num_rows) < keep)))
    if schema is None:
        raise ValueError("no rows to sample")
    return pa.Table.from_batches(parts, schema=schema)


def dataset_report(dataset, seed: int = 0, max_rows: int = 200_000) -> dict:
    """The report on a Parquet dataset of labelled rows (a feature cache): usable rows, metadata columns only, sampled."""
    import pyarrow.dataset as pads

    good = pads.field(S.ERROR_STAGE).is_null() if S.ERROR_STAGE in dataset.schema.names else None
    cols = [c for c in (S.LABEL, S.GENERATOR, *METADATA_COLUMNS) if c in dataset.schema.names]
    sample = sample_rows(dataset.to_batches(columns=cols, filter=good), dataset.count_rows(filter=good), max_rows, seed)
    return shortcut_report(sample, seed=seed, max_rows=max_rows)
