"""Re-score a scan output's history with another detector from the stored features: no image read, no CLIP run.

    python -m jobs.rescore --detector s3://models/detector-v2 --output s3://audit/scans --since 2026-11-01
    python -m jobs.rescore --detector ./detector-v2 --output ./scans --all
    ray job submit --address http://127.0.0.1:8265 --runtime-env cluster/runtime_env.yaml -- \\
        python -m jobs.rescore --detector s3://models/detector-v2 --output s3://audit/scans --since 2026-11-01 --actors 16

The scan keeps each scored object's head input in the ``features`` table (float16,
``detector_core.tables.features``). This job reads those vectors for the nights asked
(``--since``/``--until``, or ``--all``) on Ray Data: one task per stored data file, a
``Rescorer`` actor applying the new detector's head on CPU (``--gpu`` for GPU actors), each
writing its rows as the scan's ``scores`` schema into the ``challenger_scores`` table. That
table is keyed by the challenger's ``detector_id`` and never read by production answers:
``scores``/``flagged`` are the production detector's. The driver commits the run in one
Iceberg transaction that first removes the challenger's earlier rows of those nights, so a
run killed at any point leaves the table as it was, and a run again replaces, never doubles.

Refused in one line: a DNF detector (its features are never kept), a detector whose feature
spec differs from the stored vectors' (the differing field named; a ``jobs.scan --full`` with
it re-embeds), and an output without stored features.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from detector_core import schema as S
from detector_core.storage import s3_storage_options
from detector_core.tables import definitions as T
from jobs.common.errors import JobError, parse_date, run_main
from jobs.common.flags import CatalogOptions, RayOptions, StorageOptions, opt, parse_config
from jobs.common.outputs import config_dict, new_run_id, open_output, output_lease

READ_COLUMNS = (S.URI, S.ETAG, S.SIZE, S.FEATURE_ID, S.SCAN_ID, S.SCANNED_AT, S.VECTOR, S.SCAN_DATE, S.BUCKET)
FILE_RECORD = pa.schema([("path", pa.string()), ("rows", pa.int64())])
ID_FIELDS = ("clip_model", "pretrained", "feature_mode", "decode")  # what a CLIP feature id is made of, in its order


@dataclass
class RescoreConfig(CatalogOptions, RayOptions, StorageOptions):
    detector: str = opt("", "the challenger detector bundle (clip-mlp), local or s3://")
    output: str = opt("", "the scan output whose stored features to re-score (the --output of jobs.scan)")
    since: str = opt("", "only nights on or after this scan date, YYYY-MM-DD")
    until: str = opt("", "only nights on or before this scan date, YYYY-MM-DD")
    all: bool = opt(False, "every night the features table holds")
    actors: int = opt(1, "Rescorer actors (each holds the head; CPU unless --gpu)", within="[1, inf)")
    gpu: bool = opt(False, "run the Rescorer actors on GPUs (one each); the head is small: CPUs do tens of thousands of images a second")
    batch_rows: int = opt(65_536, "vectors a Rescorer scores at once", within="[1, inf)")
    wait: bool = opt(False, "if a scan holds the output's lease, wait for it instead of refusing")
    lease_ttl: float = opt(300.0, "seconds this job's lease on the output lasts without renewal", within="(0, inf)")


class Rescorer:
    """Ray Data actor: stored features data files -> the challenger's rows (the scan's ``scores`` schema), written as files."""

    def __init__(self, bundle_uri: str, output: str, rescore_id: str, feature_id: str, batch_rows: int,
                 storage_options: dict | None = None, gpu: bool = False):
        from detector_core.devices import select_device
        from detector_core.method.bundle import load_bundle

        self.bundle = load_bundle(bundle_uri, storage_options, device=select_device(gpu))
        self.output, self.rescore_id, self.feature_id = output, rescore_id, feature_id
        self.batch_rows, self.storage_options = batch_rows, storage_options

    def __call__(self, batch: pa.Table) -> pa.Table:
        import pyarrow.parquet as pq
        import torch
        from scipy.special import expit

        from detector_core.method.training import predict_logits
        from detector_core.storage import open_fs
        from detector_core.tables.catalog import data_file_path
        from detector_core.tables.features import decode
        from jobs.common.outputs import write_parquet

        b, records = self.bundle, []
        for path in batch["path"].to_pylist():
            fs, p = open_fs(path, self.storage_options)
            with fs.open(p, "rb") as f:
                rows = pq.read_table(f, columns=list(READ_COLUMNS))
            rows = rows.filter(pc.and_(pc.equal(rows[S.FEATURE_ID], self.feature_id), pc.is_valid(rows[S.VECTOR])))
            for start in range(0, rows.num_rows, self.batch_rows):
                part = rows.slice(start, self.batch_rows)
                x = torch.from_numpy(decode(part[S.VECTOR]))
                logits = predict_logits(b.model, x).double().cpu().numpy()
                n = part.num_rows
                cols = {f.name: pa.nulls(n, f.type) for f in T.SCORES_SCHEMA}
                cols.update({c: part[c] for c in (S.URI, S.ETAG, S.SIZE, S.FEATURE_ID, S.SCAN_DATE, S.BUCKET)})
                cols.update({S.LOGIT: pa.array(logits), S.SCORE: pa.array(expit(logits)), S.THRESHOLD: pa.array(np.full(n, b.threshold)),
                             S.FLAGGED: pa.array(logits >= b.threshold_logit),
                             S.FLAG_REASON: pa.array(np.where(logits >= b.threshold_logit, "score", None), pa.string()),
                             S.DETECTOR_ID: pa.array([b.detector_id] * n), S.DETECTOR_KIND: pa.array([b.kind] * n),
                             S.SCAN_ID: pa.array([self.rescore_id] * n), S.SCANNED_AT: part[S.SCANNED_AT]})
                table = pa.table(cols).cast(T.SCORES_SCHEMA)
                for key in table.group_by([S.SCAN_DATE, S.BUCKET]).aggregate([]).to_pylist():
                    one = table.filter(pc.and_(pc.equal(table[S.SCAN_DATE], key[S.SCAN_DATE]), pc.equal(table[S.BUCKET], key[S.BUCKET])))
                    out = data_file_path(self.output, T.CHALLENGER, key[S.SCAN_DATE].isoformat(), key[S.BUCKET], self.rescore_id)
                    write_parquet(one, out, self.storage_options)
                    records.append({"path": out, "rows": one.num_rows})
        return pa.Table.from_pylist(records, schema=FILE_RECORD)


def _spec_refusal(stored: list[str], spec) -> str:
    """'' when the stored vectors were made by ``spec``'s extractor, else one line naming the field that differs."""
    if spec.id in stored:
        return ""
    want = dict(zip(ID_FIELDS, spec.id.split("/") + ["pil"]))
    lines = []
    for fid in stored:
        have = dict(zip(ID_FIELDS, fid.split("/") + ["pil"]))
        diff = [f"{k} {have.get(k)!r} (stored) vs {want.get(k)!r} (detector)" for k in ID_FIELDS if have.get(k) != want.get(k)]
        lines.append(", ".join(diff) or fid)
    return (f"the stored features were made by another extractor: {'; '.join(lines)}; this detector cannot be re-scored from them "
            f"('python -m jobs.scan --full' with it re-embeds the images)")


def rescore(cfg: RescoreConfig) -> dict:
    import ray
    from pyiceberg.expressions import AlwaysTrue, And, EqualTo, GreaterThanOrEqual, In, LessThanOrEqual

    from detector_core.method.bundle import load_bundle
    from jobs.common.ray_setup import init_ray

    if not (cfg.detector and cfg.output):
        raise JobError("--detector (the challenger bundle) and --output (the scan output) are required")
    if not (cfg.all or cfg.since or cfg.until):
        raise JobError("say which nights: --since DATE [--until DATE], or --all")
    so = s3_storage_options(cfg.s3_endpoint or None)
    bundle = load_bundle(cfg.detector, so)
    if bundle.features.extractor != "clip":
        raise JobError(f"{cfg.detector} is a {bundle.kind} detector: its features (a noise map an image) are never kept, so it cannot "
                       "be re-scored; 'python -m jobs.scan --full' with it scores the images again")
    out = open_output(cfg.output, cfg.catalog, cfg.namespace, so)
    features = out.find_table(T.FEATURES)
    where = AlwaysTrue()
    if cfg.since:
        where = And(where, GreaterThanOrEqual(S.SCAN_DATE, parse_date(cfg.since, "--since")))
    if cfg.until:
        where = And(where, LessThanOrEqual(S.SCAN_DATE, parse_date(cfg.until, "--until")))
    tasks = list(features.scan(row_filter=where).plan_files()) if features is not None and features.current_snapshot() else []
    if not tasks:
        raise JobError(f"{cfg.output} holds no stored features for these nights (scanned with --no-keep-features, or before "
                       "features were kept): 'python -m jobs.scan --full' with this detector scores the images again")
    stored = sorted(set(out.read(T.FEATURES, where, selected_fields=(S.FEATURE_ID,))[S.FEATURE_ID].to_pylist()))
    refusal = _spec_refusal(stored, bundle.features)
    if refusal:
        raise JobError(refusal)
    nights = sorted({dt.date(1970, 1, 1) + dt.timedelta(days=t.file.partition[0]) for t in tasks})
    rescore_id = new_run_id("rescore")
    t0 = time.time()
    with output_lease(out, rescore_id, cfg.lease_ttl, cfg.wait) as lease:
        init_ray(cfg.ray_address or None)
        ds = ray.data.from_items([{"path": t.file.file_path} for t in tasks], override_num_blocks=len(tasks))
        ds = ds.map_batches(Rescorer, fn_constructor_kwargs=dict(bundle_uri=cfg.detector, output=out.uri, rescore_id=rescore_id,
                                                                 feature_id=bundle.features.id, batch_rows=cfg.batch_rows,
                                                                 storage_options=so, gpu=cfg.gpu),
                            batch_size=1, batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=cfg.actors),
                            num_gpus=1 if cfg.gpu else 0, num_cpus=0 if cfg.gpu else 1)
        records = ds.take_all()
        lease.check()
        paths = [r["path"] for r in records]
        rows = int(sum(r["rows"] for r in records))
        # One transaction: the challenger's earlier rows of these nights go, this run's come. A kill before it
        # leaves the table as it was; a second run replaces the first.
        table = out.table(T.CHALLENGER)
        props = {"detector.rescore-id": rescore_id, "detector.detector-id": bundle.detector_id}
        with table.transaction() as tx:
            tx.delete(And(EqualTo(S.DETECTOR_ID, bundle.detector_id), In(S.SCAN_DATE, [n.isoformat() for n in nights])),
                      snapshot_properties=props)
            if paths:
                tx.add_files(paths, snapshot_properties=props, check_duplicate_files=False)
    seconds = round(time.time() - t0, 2)
    result = {"rescore_id": rescore_id, "detector_id": bundle.detector_id, "feature_id": bundle.features.id,
              "nights": [n.isoformat() for n in nights], "files_read": len(tasks), "rows": rows, "seconds": seconds,
              "images_per_second": round(rows / seconds, 1) if seconds else None, "table": out.identifier(T.CHALLENGER),
              "config": config_dict(cfg)}
    print(f"re-scored {rows} stored vectors of {len(nights)} night(s) with {bundle.detector_id} in {seconds} s "
          f"-> {out.identifier(T.CHALLENGER)} (detector_id = '{bundle.detector_id}')")
    print(json.dumps({k: v for k, v in result.items() if k != "config"}), file=sys.stderr)
    return result


def main(argv=None) -> dict:
    return rescore(parse_config(RescoreConfig, argv, __doc__))


if __name__ == "__main__":
    run_main(main)
