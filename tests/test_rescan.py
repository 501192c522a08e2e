"""Real scans (local Ray) through the damage chain, a night scanned again, a decision flag added later, a symlink into the
output, and a PNG whose text passes Pillow's limits: every listed object once per night and detector in every answer.
(``tests/test_invariant.py``: the same invariant on hand-made units, without Ray.)
"""

from __future__ import annotations

import os
import struct
import zlib

import numpy as np
import pytest
from test_scan import _exactly_once, _images, _tables

from detector_core.demo import encode, make_image
from jobs import scan
from jobs.common.errors import JobError


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def declared_with_text_bomb(seed: int) -> bytes:
    """A PNG that declares itself generated (Automatic1111 ``parameters``) and carries a zTXt chunk inflating to 64 MB."""
    png = encode(make_image(np.random.default_rng(seed)))
    params = _chunk(b"tEXt", b"parameters\x00a cat\nSteps: 20, Sampler: Euler, Seed: 1, Model: sd_xl_base_1.0")
    bomb = _chunk(b"zTXt", b"comment\x00\x00" + zlib.compress(b"a" * (64 << 20), 9))
    return png[:33] + params + bomb + png[33:]


def test_chain_repair_then_lost_catalog_then_repair_then_scan_scores_the_lost_objects(ray_local, bundle_dir, tmp_path):
    from jobs.maintain import main as maintain

    bucket, out = tmp_path / "bucket", tmp_path / "out"
    uris = _images(bucket, 12, 3)
    args = ["--detector", str(bundle_dir), "--input", str(bucket), "--output", str(out), "--chunk-size", "4"]
    scan.main(args)
    lost = sorted(p for p in (out / "scores" / "data").rglob("*.parquet"))[0]
    lost.unlink()
    maintain(["repair", "--output", str(out)])
    (out / "catalog.db").unlink()
    maintain(["repair", "--output", str(out)])
    assert scan.main(args)["scored"] == 4  # the lost file's objects, and only those
    _exactly_once(out, uris)
    assert scan.main(args)["scored"] == 0


def test_a_night_scanned_again_with_a_flag_added_counts_each_object_once(ray_local, bundle_dir, tmp_path, capsys):
    from jobs.audit import main as audit

    bucket, out = tmp_path / "bucket", tmp_path / "out"
    uris = _images(bucket, 6, 4)
    (bucket / "declared.png").write_bytes(declared_with_text_bomb(5))
    uris.append(str(bucket / "declared.png"))
    args = ["--detector", str(bundle_dir), "--input", str(bucket), "--output", str(out), "--scan-date", "2026-11-23"]
    scan.main(args)
    t = _exactly_once(out, uris)
    assert str(bucket / "declared.png") in t["scores"]["uri"].to_pylist()  # scored, not an error row, despite Pillow's text limit
    capsys.readouterr()
    assert scan.main([*args, "--flag-declared"])["scored"] == 0
    said = capsys.readouterr().out
    assert "--flag-declared False -> True" in said and "--full" in said
    scan.main([*args, "--flag-declared", "--full"])  # applied to the night
    per_day = audit(["query", "per-day", "--scan", str(out)]).to_pylist()
    assert [(r["scored"], r["errors"]) for r in per_day] == [(7, 0)]
    flagged = audit(["query", "sql", "--scan", str(out), "--sql", "SELECT uri, flag_reason FROM flagged"]).to_pylist()
    assert {r["uri"]: r["flag_reason"] for r in flagged}.get(str(bucket / "declared.png")) in ("declared", "both")
    assert len({r["uri"] for r in flagged}) == len(flagged)
    assert _tables(out)["scores"].num_rows == 14  # the history keeps both scans' rows


def test_an_input_that_reaches_the_output_through_a_symlink_never_lists_it(ray_local, bundle_dir, tmp_path):
    bucket, out = tmp_path / "bucket", tmp_path / "out"
    uris = _images(bucket, 4, 6)
    args = ["--detector", str(bundle_dir), "--input", str(bucket), "--output", str(out)]
    scan.main(args)
    os.symlink(out, bucket / "link-to-output")
    summary = scan.main(args)
    assert summary["listed"] == 4
    _exactly_once(out, uris)
    os.symlink(out, tmp_path / "alias")
    with pytest.raises(JobError, match="is the output") as err:
        scan.main(["--detector", str(bundle_dir), "--input", str(tmp_path / "alias"), "--output", str(out)])
    assert "\n" not in str(err.value)
