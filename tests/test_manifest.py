"""Manifest validation in column operations against a row-by-row oracle, on hostile tables."""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pytest

from detector_core import schema as S
from detector_core.sources.manifest import ManifestError, validate_manifest


def _oracle(rows: list[dict], val_fraction: float, calib_fraction: float, require_labels: bool = True):
    """What validation means, one row at a time: (good rows, [(uri, error_type)])."""
    good, bad, seen = [], [], set()
    for r in rows:
        u, lab = r.get("uri"), r.get("label")
        reason = None
        if u is None or str(u).strip() == "":
            reason = "missing_uri"
        elif str(u) in seen:
            reason = "duplicate_uri"
        elif require_labels:
            try:
                f = float(lab)
                if f not in (0.0, 1.0):
                    raise ValueError
            except (TypeError, ValueError):
                reason = "bad_label"
        if reason:
            bad.append((None if u is None else str(u), reason))
            continue
        seen.add(str(u))
        y = int(float(lab)) if require_labels else -1
        split = r.get("split")
        if split in (None, ""):
            h = int.from_bytes(hashlib.sha1(str(u).encode()).digest()[:8], "big") / 2**64
            split = S.SPLIT_VAL if h < val_fraction else S.SPLIT_CALIB if h < val_fraction + calib_fraction else S.SPLIT_TRAIN
        gen = r.get("generator")
        good.append({"uri": str(u), "label": y, "caption": r.get("caption"),
                     "generator": str(gen) if gen is not None else ("real" if y == 0 else "unknown"), "split": str(split).lower()})
    return good, bad


@pytest.mark.parametrize("label_kind", ["string", "float", "int"])
def test_validation_equals_the_row_by_row_oracle(label_kind):
    rng = np.random.default_rng(7)
    n = 3000
    uris = [None if rng.random() < 0.03 else ("  " if rng.random() < 0.02 else f"s3://b/img_{int(rng.integers(0, 1800))}.png")
            for _ in range(n)]
    if label_kind == "string":
        pool = ["0", "1", " 1 ", "1.0", "1e0", "2", "-1", "x", "", None, "nan", "0.5"]
    elif label_kind == "float":
        pool = [0.0, 1.0, 1.0, 0.0, 0.5, 2.0, None, float("nan"), -0.0]
    else:
        pool = [0, 1, 1, 0, 2, -1, None]
    labels = [pool[int(i)] for i in rng.integers(0, len(pool), n)]
    splits = [[None, "", "TRAIN", "val", "test"][int(i)] for i in rng.integers(0, 5, n)]
    gens = [[None, "sd15", "real"][int(i)] for i in rng.integers(0, 3, n)]
    caps = [None if rng.random() < 0.5 else f"a photo {i}" for i in range(n)]
    rows = [{"uri": u, "label": y, "split": s, "generator": g, "caption": c} for u, y, s, g, c in zip(uris, labels, splits, gens, caps)]
    table = pa.Table.from_pylist(rows)
    got = validate_manifest(table, val_fraction=0.2, calib_fraction=0.1)
    want_good, want_bad = _oracle(rows, 0.2, 0.1)
    assert got.table.to_pylist() == want_good
    assert list(zip(got.bad[S.URI].to_pylist(), got.bad[S.ERROR_TYPE].to_pylist())) == want_bad
    assert {t for _, t in want_bad} == {"missing_uri", "duplicate_uri", "bad_label"}  # every path was taken
    labels_said = [m for m, t in zip(got.bad[S.ERROR_MESSAGE].to_pylist(), got.bad[S.ERROR_TYPE].to_pylist()) if t == "bad_label"]
    assert all(m.startswith("label ") and m.endswith("is not 0 (real) or 1 (generated)") for m in labels_said)


def test_a_bad_label_before_a_good_row_of_the_same_uri_does_not_make_it_a_duplicate():
    rows = [{"uri": "a", "label": "7"}, {"uri": "a", "label": "1"}, {"uri": "a", "label": "0"}, {"uri": "b", "label": "0"}]
    got = validate_manifest(pa.Table.from_pylist(rows, schema=pa.schema([("uri", pa.string()), ("label", pa.string())])))
    assert got.table["uri"].to_pylist() == ["a", "b"] and got.table["label"].to_pylist() == [1, 0]
    assert got.bad[S.ERROR_TYPE].to_pylist() == ["bad_label", "duplicate_uri"]
    assert got.bad[S.ERROR_MESSAGE].to_pylist()[0] == "label '7' is not 0 (real) or 1 (generated)"


def test_unlabelled_and_empty_manifests():
    rows = pa.table({"uri": ["x", "x", None, "y"]})
    got = validate_manifest(rows, require_labels=False)
    assert got.table["uri"].to_pylist() == ["x", "y"] and got.table["generator"].to_pylist() == ["unknown", "unknown"]
    with pytest.raises(ManifestError, match="no generated"):
        validate_manifest(pa.table({"uri": pa.array([], pa.string()), "label": pa.array([], pa.int64())}))
