"""The nightly scan: score every image under a prefix (or in a manifest) with a detector.

    python -m jobs.scan --detector OUT/detector --input ./images --output ./scans      # local: SQLite catalog in ./scans
    ray job submit --address http://127.0.0.1:8265 --runtime-env cluster/runtime_env.yaml -- \\
        python -m jobs.scan --detector s3://models/detector --input s3://uploads/ --output s3://audit/scans \\
        --catalog detector --gpu --actors 1-16
    ray job submit --address http://127.0.0.1:8265 --runtime-env cluster/runtime_env.yaml -- \\
        python -m jobs.scan --detector s3://models/clip-detector --ensemble s3://models/dnf-detector \\
        --input s3://uploads/ --output s3://audit/scans --catalog detector --gpu --actors 8

The plan runs on the cluster (``jobs.scanning.planning``): the input (a prefix, a manifest or an S3
Inventory report) is listed by Ray tasks and anti-joined per ``uri_bucket`` partition with the
``state`` table; the driver gets counts and work-file paths only. An input whose listed and
state rows stay within ``--driver-plan-max`` is planned (and the state refreshed) in the driver
by the same functions, without the cluster's fixed start-up. Then one Ray Data stream:
work files -> read bytes + decode + crop (CPU tasks, ``load_images``) ->
features + classifier (``Scorer`` actors, GPUs in production; models built once per actor,
``--actors 1-16`` lets the pool grow into GPUs as they appear) -> ``write_results`` (CPU
tasks that write the rows as Parquet data files of the Iceberg tables and return only the
files' paths and counts). The driver consumes that stream of file records, never result
rows, and commits every ``--chunk-size`` rows' files as one Iceberg snapshot per table
(``detector_core.tables.catalog``): the commit unit, while the stream keeps flowing.

Either detector kind (``clip-mlp``, ``dnf-resnet``) goes through the same code;
``--ensemble`` runs more bundles in the same pass (each object read and decoded once, each
extractor run once, one row per object and detector). Every listed object ends as exactly
one row per detector in ``scores`` or ``errors``; ``flagged`` is the subset of ``scores``
at or above the bundle's threshold.

Exact state: a scan holds a lease on the output (``detector_core.tables.lease``; a second scan
refuses naming the holder, or waits with ``--wait``; a dead holder's lease expires after
``--lease-ttl``). What is committed is settled: a scan plans only objects that no committed
row of the same detector settles (same etag and size; read and list failures are retried;
the ``state`` table is caught up with every commit before planning), so a
scan killed at any moment is continued by the next run, whatever its input, and nothing
half-written is ever visible: uncommitted data files are unreferenced, and a unit whose
four table commits were cut short is finished from its intent before the next scan
plans. The run summary is ``runs`` rows in the catalog and ``OUT/runs/<scan_id>.json``. A
scan starts (after finishing any killed unit) and ends by expiring the snapshots nobody
needs any more (``--keep-days``, ``--keep-unit-hours``; ``detector_core.tables.maintenance``), so
the tables' metadata stays the same size night after night; ``jobs.maintain`` does the rest
(compaction, orphan files).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import sys
import time

from detector_core.method.bundle import BundleError, DetectorBundle, load_bundle
from detector_core.method.extractors import feature_compute
from detector_core.sources.listing import is_manifest
from detector_core.storage import folder_prefix, is_remote, join, open_fs, s3_storage_options
from detector_core.tables import definitions as T
from detector_core.tables import maintenance
from detector_core.tables.catalog import CatalogError, ScanOutput
from detector_core.tables.lease import Lease, LeaseLostError
from jobs.common.errors import JobError, require_weights, run_main
from jobs.common.flags import parse_config
from jobs.common.outputs import config_dict, new_run_id, output_lease, write_json
from jobs.common.ray_setup import check_connection, init_ray
from jobs.scanning import planning, stream
from jobs.scanning.config import DECISION_FLAGS, ScanConfig
from jobs.scanning.pipeline import check_decode, feature_drafts, feature_specs, trained_draft
from jobs.scanning.planning import PlanError, remove_plan
from jobs.scanning.refresh import refresh_state


def validate(cfg: ScanConfig) -> None:
    """Refuse bad settings before anything is listed, leased or started."""
    if not (cfg.detector and cfg.input and cfg.output):
        raise JobError("--detector, --input and --output are required")
    # Numbers are checked against their fields' intervals by parse_config.
    try:
        stream.parse_actors(cfg.actors)
    except ValueError as exc:
        raise JobError(str(exc))
    if cfg.scan_date:
        try:
            dt.date.fromisoformat(cfg.scan_date)
        except ValueError:
            raise JobError(f"--scan-date {cfg.scan_date!r} is not a date (YYYY-MM-DD)")
    listed_prefix = not (is_manifest(cfg.input) or cfg.input.rstrip("/").endswith("manifest.json"))  # files name their objects
    if listed_prefix and (folder_prefix(cfg.input).startswith(folder_prefix(cfg.output))
                          or (not is_remote(cfg.input) and not is_remote(cfg.output)  # through a symlink
                              and folder_prefix(os.path.realpath(cfg.input)).startswith(folder_prefix(os.path.realpath(cfg.output))))):
        raise JobError(f"--input {cfg.input} is the output {cfg.output} or inside it: the scan would score its own tables; "
                       "write them elsewhere (an output inside the input is fine: it is left out of the listing)")
    if cfg.forward != "autocast" and not cfg.gpu:
        raise JobError(f"--forward {cfg.forward} is a GPU setting (bf16 weights, compiled graphs): pass --gpu, or leave --forward autocast")
    if cfg.kill_at and (cfg.kill_at.count(":") != 1 or not cfg.kill_at.split(":")[1].isdigit()):
        raise JobError(f"--kill-at {cfg.kill_at!r}: STEP:UNIT")


# -- the run ---------------------------------------------------------------------------------
def _kill_hook(cfg: ScanConfig, lease: Lease):
    step_at, _, unit_at = cfg.kill_at.partition(":")
    state = {"unit": 0}

    def before_each(step: str) -> None:
        lease.check()
        if cfg.kill_at and step == step_at and state["unit"] == int(unit_at):
            os.kill(os.getpid(), signal.SIGKILL)
    return before_each, state


def _expire(out: ScanOutput, cfg: ScanConfig) -> dict:
    """The cheap part of maintenance (metadata-only commits that keep the snapshot count, and so every
    commit's cost, bounded; compaction and orphans are jobs.maintain's); a failure warns, never fails the scan."""
    try:
        return maintenance.expire(out, cfg.keep_days, cfg.keep_unit_hours)
    except Exception as exc:  # noqa: BLE001 - the scan's work must not fail for its clean-up
        print(f"warning: expiring old snapshots failed ({type(exc).__name__}: {exc}); jobs.maintain will do it",
              file=sys.stderr, flush=True)
        return {"error": f"{type(exc).__name__}: {exc}"}


def _run_row(base: dict, b: DetectorBundle, unit: int, status: str, counts: dict, extra: dict | None = None) -> dict:
    now = dt.datetime.now(dt.timezone.utc).isoformat()
    return {**base, "unit": unit, "status": status, "detector_id": b.detector_id, "detector_kind": b.kind, "feature_id": b.features.id,
            "scored": counts.get("scores", 0), "flagged": counts.get("flagged", 0), "errors": counts.get("errors", 0),
            "committed_at": now, **(extra or {})}


def _check_feature_compute(bundles: list[DetectorBundle], gpu: bool, forward: str = "autocast") -> None:
    """Features computed as each detector's training computed them: another decode or resize is refused,
    another precision (bf16 on GPUs, fp32 on CPUs) warned about; the run summary records both sides."""
    for b in bundles:
        trained = b.feature_compute
        if not trained:  # bundles from before it was recorded
            continue
        ours = feature_compute(b.features, gpu, draft=trained_draft(b), forward=forward)
        for key in ("jpeg_draft_size", "resize"):
            if key in trained and trained[key] != ours[key]:
                raise JobError(f"detector {b.detector_id} was trained on features computed with {key} {trained[key]!r}, and this scan "
                               f"would compute them with {ours[key]!r}: its scores would not mean what its threshold says; retrain it "
                               "with this version, or scan with the version that trained it")
        if trained.get("precision") and trained["precision"] != ours["precision"]:
            print(f"WARNING: detector {b.detector_id} was trained on {trained['precision']} features and this scan computes "
                  f"{ours['precision']} ({'--gpu' if gpu else 'no --gpu'}): scores may shift slightly near the threshold "
                  "(recorded in the run summary)", file=sys.stderr, flush=True)


def _trust_pem(cfg: ScanConfig, so: dict | None) -> str | None:
    """The C2PA trust anchors of ``--c2pa-trust`` (public certificates, so they may travel in task arguments), after
    checking that the evidence flags go together and their libraries are here."""
    if cfg.watermarks and not cfg.evidence:
        raise JobError("--watermarks needs the evidence readers: drop --no-evidence")
    if cfg.watermarks:  # else every row would record the import error: one line now instead
        try:
            import imwatermark  # noqa: F401
        except ImportError as exc:
            raise JobError(f"--watermarks needs the invisible-watermark decoder ({exc}): pip install 'diffusion-detector[watermark]'")
    if not cfg.c2pa_trust:
        return None
    if not cfg.evidence:
        raise JobError("--c2pa-trust needs the evidence readers: drop --no-evidence")
    fs, path = open_fs(cfg.c2pa_trust, so)
    try:
        text = fs.cat_file(path).decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise JobError(f"--c2pa-trust {cfg.c2pa_trust}: cannot read it ({type(exc).__name__}: {exc})")
    if "-----BEGIN CERTIFICATE-----" not in text:
        raise JobError(f"--c2pa-trust {cfg.c2pa_trust} holds no PEM certificate (-----BEGIN CERTIFICATE-----)")
    return text


def run_scan(cfg: ScanConfig) -> dict:
    validate(cfg)
    check_connection(cfg.ray_address or None)
    so = s3_storage_options(cfg.s3_endpoint or None)
    uris = [cfg.detector] + [u.strip() for u in cfg.ensemble.split(",") if u.strip()]
    try:
        bundles = [load_bundle(u, so) for u in uris]
    except BundleError as exc:
        raise JobError(str(exc))
    for spec in feature_specs(bundles):  # a missing CLIP or UNet file: one line now, not a dead actor
        require_weights(spec, so)
    ids = [b.detector_id for b in bundles]
    if len(set(ids)) != len(ids):
        raise JobError(f"the same detector is given twice ({', '.join(ids)}); each bundle may appear once")
    needing = [b.detector_id for b in bundles if b.needs_captions]
    if needing and not cfg.captions:
        raise JobError(f"detector {', '.join(needing)} uses image+text features and needs captions; pass --captions with a uri,caption manifest")
    _check_feature_compute(bundles, cfg.gpu, cfg.forward)
    trust_pem = _trust_pem(cfg, so)
    try:
        feature_drafts(bundles)
        check_decode(feature_specs(bundles), cfg.gpu)
    except ValueError as exc:
        raise JobError(str(exc))
    scan_date = cfg.scan_date or dt.datetime.now(dt.timezone.utc).date().isoformat()
    try:
        out = ScanOutput.open(cfg.output, cfg.catalog, cfg.namespace, so)
    except CatalogError as exc:
        raise JobError(str(exc))
    scan_id = new_run_id("scan")
    with output_lease(out, scan_id, cfg.lease_ttl, cfg.wait) as lease:
        try:
            return _scan_under_lease(cfg, so, uris, bundles, scan_date, out, scan_id, lease, trust_pem)
        except LeaseLostError as exc:
            raise JobError(f"{exc}; nothing of this scan's uncommitted work is visible, run it again")


def _changed_decisions(out: ScanOutput, cfg) -> str:
    """One line when a flag that changes decisions (``DECISION_FLAGS``) differs from the output's last finished scan, else ''.

    The plan skips unchanged objects, so the new setting reaches only objects scored from now on.
    """
    from detector_core.tables.views import read_runs

    runs = read_runs(out).to_pylist()
    if not runs:
        return ""
    last = max(runs, key=lambda r: r["finished_at"])
    try:
        before = json.loads(out.read("runs", f"scan_id = '{last['scan_id']}'", selected_fields=("config",))["config"][0].as_py() or "{}")
    except (ValueError, IndexError):
        return ""
    now = config_dict(cfg)
    diff = [f"--{k.replace('_', '-')} {before.get(k)!r} -> {now.get(k)!r}" for k in DECISION_FLAGS if k in before and before[k] != now.get(k)]
    if not diff:
        return ""
    return (f"note: {', '.join(diff)} since the last scan ({last['scan_id']}): only objects scored from now on get it; the unchanged "
            f"objects keep their rows. To apply it to a night, scan it again with --full --scan-date YYYY-MM-DD")


def _scan_under_lease(cfg, so, uris, bundles, scan_date, out: ScanOutput, scan_id: str, lease: Lease, trust_pem: str | None = None) -> dict:
    import ray

    started = time.time()
    started_at = dt.datetime.now(dt.timezone.utc).isoformat()
    before_each, unit_state = _kill_hook(cfg, lease)
    recovered = out.recover(before_each=lambda step: lease.check())
    if recovered:
        print(f"finished {len(recovered)} commit unit(s) a killed scan left half committed")
    init_ray(cfg.ray_address or None)
    remove_plan(out)  # work files of killed scans (the lease says none is running)
    # Catch the state up with everything committed (a killed scan's units; a deleted state is rebuilt).
    state_before = refresh_state(out, so, cfg.state_compact_at, cfg.plan, cfg.driver_plan_max)
    lease.check()
    # Last night's unit snapshots go before this night's commits start, not after them: each
    # commit rewrites metadata holding every snapshot, so carrying last night's through this
    # night would make every unit cost as much as two nights' (bench/bench_tables.py).
    expired = {"start": _expire(out, cfg)}
    ids = [b.detector_id for b in bundles]
    try:
        work_files, plan_counts = planning.plan(out, cfg.input, ids, scan_id, cfg.full, cfg.captions, so, cfg.list_fan_out, cfg.plan,
                                                cfg.driver_plan_max)
    except PlanError as exc:
        raise JobError(str(exc))
    counts = {"listed": plan_counts["listed"], "skipped": plan_counts["listed"] - plan_counts["work"],
              "skipped_by_detector": plan_counts["skipped"]}
    print(f"plan: {plan_counts['listed']} listed ({plan_counts['input_kind']}), {plan_counts['work']} to score, "
          f"{plan_counts['duplicates']} duplicate uris, {plan_counts['list_errors']} unusable rows ({plan_counts['plan_seconds']} s, "
          f"in the {plan_counts['planned_in']})")
    if plan_counts.get("output_left_out"):
        print(f"the output {cfg.output} lies inside the input: its own files are left out of the listing")
    changed = _changed_decisions(out, cfg) if counts["skipped"] else ""
    if changed:
        print(changed)
    base = {"scan_id": scan_id, "scan_date": scan_date, "input": cfg.input, "listed": None, "skipped": None, "model_loads": None,
            "seconds": None, "started_at": started_at, "config": json.dumps(config_dict(cfg)), "schema_version": T.SCHEMA_VERSION}
    totals = {b.detector_id: {t: 0 for t in T.TABLES} for b in bundles}
    units, commit_seconds, driver_rows, files = 0, [], 0, 0
    model_loads = 0
    if work_files:
        ctx = ray.data.DataContext.get_current()
        saved_wait = ctx.wait_for_min_actors_s  # the driver's context outlives this scan (notebooks, tests): restore it
        ctx.wait_for_min_actors_s = int(max(1, cfg.resource_timeout))
        counter = stream.load_counter()
        flow = stream.build_stream(cfg, work_files, plan_counts["work"], uris, bundles, out, scan_id, scan_date, so, counter,
                                   trust_pem=trust_pem, planned_in=plan_counts["planned_in"])

        def commit(files_by_table: dict[str, list[str]], counts: dict[str, dict[str, int]]) -> None:
            nonlocal units
            t0 = time.time()
            rows = [_run_row(base, b, units, "unit", counts[b.detector_id]) for b in bundles]
            out.commit_unit({"scan_id": scan_id, "unit": units, "files": files_by_table, "runs": rows}, before_each=before_each)
            commit_seconds.append(time.time() - t0)
            for d, c in counts.items():
                for t in T.TABLES:
                    totals[d][t] += c[t]
            units += 1
            unit_state["unit"] = units
            print(f"unit {units}: {sum(c['scores'] for c in counts.values())} scored, "
                  f"{sum(c['errors'] for c in counts.values())} errors committed ({commit_seconds[-1]:.2f} s)", flush=True)

        try:
            driver_rows, files = stream.commit_records(flow, cfg.chunk_size, ids, commit)
        except ray.exceptions.GetTimeoutError:
            raise JobError(stream.resource_message(cfg))
        finally:
            ctx.wait_for_min_actors_s = saved_wait
        model_loads = ray.get(counter.pop.remote(scan_id))
    lease.check()
    state_after = refresh_state(out, so, cfg.state_compact_at, cfg.plan, cfg.driver_plan_max) if units else {"history_files": 0}
    remove_plan(out)
    elapsed = time.time() - started
    n_read = counts["listed"] - counts["skipped"]
    summary_base = {**base, "listed": counts["listed"], "skipped": counts["skipped"], "model_loads": model_loads, "seconds": round(elapsed, 2)}
    final = [_run_row(summary_base, b, -1, "completed", totals[b.detector_id], {"skipped": counts["skipped_by_detector"][b.detector_id]})
             for b in bundles]
    snaps = out.commit_unit({"scan_id": scan_id, "unit": -1, "files": {}, "runs": final}, before_each=lambda step: lease.check())
    expired["end"] = _expire(out, cfg)
    summary = {
        "scan_id": scan_id, "detector": cfg.detector, "detector_id": bundles[0].detector_id, "detector_kind": bundles[0].kind,
        "feature_id": bundles[0].features.id, "threshold": bundles[0].threshold, "input": cfg.input, "output": cfg.output,
        "catalog": out.catalog_spec or "sqlite (OUT/catalog.db)", "namespace": out.namespace, "scan_date": scan_date,
        "listed": counts["listed"], "skipped": counts["skipped"],
        "scored": sum(t["scores"] for t in totals.values()), "flagged": sum(t["flagged"] for t in totals.values()),
        "errors": sum(t["errors"] for t in totals.values()), "seconds": round(elapsed, 2),
        "images_per_second": round(n_read / elapsed, 2) if elapsed > 0 else None,  # objects read per second
        "commit_units": units, "commit_seconds": [round(s, 3) for s in commit_seconds], "model_loads": model_loads,
        "driver_rows_received": driver_rows, "data_files": files, "recovered_units": len(recovered), "plan": plan_counts,
        "state_refresh": {"before": state_before, "after": state_after},
        "snapshot_ids": snaps, "expired_snapshots": expired,
        "detectors": [{"detector": u, "detector_id": b.detector_id, "detector_kind": b.kind, "feature_id": b.features.id,
                       "threshold": b.threshold, "feature_compute": {"trained": b.feature_compute or None,
                                                                     "scanned": feature_compute(b.features, cfg.gpu, draft=trained_draft(b),
                                                                                          forward=cfg.forward)},
                       "skipped": counts["skipped_by_detector"][b.detector_id],
                       "scored": totals[b.detector_id]["scores"], "flagged": totals[b.detector_id]["flagged"],
                       "errors": totals[b.detector_id]["errors"]} for u, b in zip(uris, bundles)],
        "started_at": started_at, "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(),
        "schema_version": T.SCHEMA_VERSION, "config": config_dict(cfg),
    }
    write_json(join(cfg.output, "runs", f"{scan_id}.json"), summary, so)
    print(f"scan {scan_id}: listed {summary['listed']}, skipped {summary['skipped']} (unchanged), scored {summary['scored']}, "
          f"flagged {summary['flagged']}, errors {summary['errors']} in {elapsed:.1f} s ({units} commit units, {model_loads} model loads)")
    if len(bundles) > 1:
        for d in summary["detectors"]:
            print(f"  {d['detector_id']} ({d['detector_kind']}): skipped {d['skipped']}, scored {d['scored']}, "
                  f"flagged {d['flagged']}, errors {d['errors']}")
    print(f"  tables {', '.join(out.identifier(t) for t in T.ALL_TABLES)} under {cfg.output}")
    return summary


def main(argv=None) -> dict:
    return run_scan(parse_config(ScanConfig, argv, __doc__))


if __name__ == "__main__":
    run_main(main)
