"""Keep a scan output's tables bounded and whole: expire, compact, remove orphans; check for and repair damage.

    python -m jobs.maintain --output ./scans                                   # expire, compact, remove orphans
    python -m jobs.maintain check --output s3://audit/scans --catalog detector # missing files, lost tables (exit 1 if any)
    python -m jobs.maintain repair --output ./scans                            # register lost tables, drop missing files
    ray job submit --address http://127.0.0.1:8265 --runtime-env cluster/runtime_env.yaml -- \\
        python -m jobs.maintain --output s3://audit/scans --catalog detector

Every scan expires snapshots at its end (the cheap, metadata-only part); this job does the
rest on its own schedule (the nightly CronJob runs it after the scan and the report):

- ``expire``: snapshots past ``--keep-days`` (finished scans) and ``--keep-unit-hours``
  (a unit's intermediate snapshots), never one a recent ``runs`` row pins;
- ``compact``: each finished night's small data files into few large ones;
- ``orphans``: files no live snapshot references, older than ``--orphan-age-hours``.

It is safe beside a running scan: expiry and compaction are optimistic Iceberg commits tried
again when the scan's commit wins; orphans are removed, and a killed scan's half-committed
units finished, only while this job holds the output's lease (a running scan's workers write
files that no intent names yet), orphans only past ``--orphan-age-hours`` (at least
``MIN_ORPHAN_AGE_HOURS``) and only in the tables' ``data/``/``metadata/`` folders. ``check``
names every damage that blocks a scan or hides an object; ``repair`` holds the lease
(``--wait`` for it): it registers the tables of a lost or emptied catalog again from the
newest metadata of their recorded lineage, replaces stale tables, sets unfinishable intents
aside (their units rolled forward), removes referenced files that are missing from the
tables, rebuilds the damaged ``flagged`` partitions from ``scores``, and drops the ``state``
so that the next scan scores the lost objects again. What each run did is saved as
``OUT/_maintenance/<id>.json`` with its resolved config. Nothing here needs Ray.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import sys
import time
from dataclasses import dataclass

from detector_core.storage import join, s3_storage_options
from detector_core.tables import maintenance as M
from detector_core.tables.catalog import CatalogError, ScanOutput
from detector_core.tables.lease import Lease, LeaseHeldError
from jobs.common.errors import JobError, run_main
from jobs.common.flags import CatalogOptions, RetentionOptions, StorageOptions, opt, parse_config
from jobs.common.outputs import config_dict, new_run_id, output_lease, write_json

STEPS = ("expire", "compact", "orphans")
# A unit's data files are written before its intent names them. The longest unit measured is minutes
# (docs/scaling.md); a day is far above it, and orphans are removed under the lease besides.
MIN_ORPHAN_AGE_HOURS = 24.0


@dataclass
class MaintainConfig(RetentionOptions, CatalogOptions, StorageOptions):
    output: str = opt("", "the scan output to maintain (the --output of jobs.scan), local or s3://")
    steps: str = opt(",".join(STEPS), "comma-separated steps to run: " + ", ".join(STEPS))
    orphan_age_hours: float = opt(72.0, "remove unreferenced files only when older than this; at least "
                                  f"{MIN_ORPHAN_AGE_HOURS:g} (far above a commit unit's duration)", within=f"[{MIN_ORPHAN_AGE_HOURS:g}, inf)")
    compact_min_files: int = opt(4, "rewrite a finished night's partition once it holds this many data files", within="[2, inf)")
    dry_run: bool = opt(False, "list the orphan files instead of deleting them (the other steps run as usual)")
    wait: bool = opt(False, "repair: if a scan holds the output's lease, wait for it instead of refusing")
    lease_ttl: float = opt(300.0, "seconds this job's lease on the output lasts without renewal", within="(0, inf)")


def _open(cfg: MaintainConfig, lost_ok: bool = False) -> ScanOutput:
    if not cfg.output:
        raise JobError("--output (the scan output) is required")
    try:
        return ScanOutput.open(cfg.output, cfg.catalog, cfg.namespace, s3_storage_options(cfg.s3_endpoint or None), create=False,
                               lost_ok=lost_ok)
    except CatalogError as exc:
        raise JobError(str(exc))


def _record(out: ScanOutput, cfg: MaintainConfig, kind: str, result: dict) -> dict:
    run_id = new_run_id(kind)
    result = {"id": run_id, "kind": kind, "output": cfg.output, "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(), **result,
              "config": config_dict(cfg)}
    write_json(join(cfg.output, "_maintenance", f"{run_id}.json"), result, out.storage_options)
    return result


def _count(by_table: dict) -> str:
    return ", ".join(f"{k} {v if isinstance(v, int) else len(v)}" for k, v in by_table.items() if v) or "none"


@contextlib.contextmanager
def _lease_if_free(out: ScanOutput, cfg: MaintainConfig):
    """The output's lease (renewed) for the block, or None when a scan holds it."""
    lease = Lease(out.fs, out.root, new_run_id("maintain"), cfg.lease_ttl)
    try:
        lease.acquire()
    except LeaseHeldError:
        yield None
        return
    lease.start_renewing()
    try:
        yield lease
    finally:
        lease.release()


def maintain(cfg: MaintainConfig) -> dict:
    steps = [s.strip() for s in cfg.steps.split(",") if s.strip()]
    unknown = sorted(set(steps) - set(STEPS))
    if unknown:
        raise JobError(f"--steps: unknown {', '.join(unknown)}; choose from {', '.join(STEPS)}")
    out = _open(cfg)
    out.ensure_tables()  # today's table properties and docs on tables an older version made
    t0 = time.time()
    result: dict = {"steps": steps}
    # The lease is held for the steps a running scan could be hurt by (finishing its units, removing
    # files it has written and not yet named); expiry and compaction are optimistic commits beside it.
    with _lease_if_free(out, cfg) as held:
        result["recovered_units"] = len(out.recover(before_each=lambda step: held.check())) if held else None
        if not held:
            print("a scan holds the lease: its pending commit units are left to it")
    if "expire" in steps:
        result["expired_snapshots"] = M.expire(out, cfg.keep_days, cfg.keep_unit_hours)
        print(f"expired snapshots: {_count(result['expired_snapshots'])}")
    if "compact" in steps:
        result["compacted_files"] = M.compact(out, min_files=cfg.compact_min_files)
        print(f"compacted data files: {_count(result['compacted_files'])}")
    if "orphans" in steps:
        with _lease_if_free(out, cfg) as held:
            if held:
                removed = M.remove_orphans(out, cfg.orphan_age_hours * 3600, dry_run=cfg.dry_run)
                print(f"{'orphan files (dry run, kept)' if cfg.dry_run else 'removed orphan files'}: {_count(removed)}")
            else:  # a running scan's workers write files that no intent names yet: only the lease knows it runs
                removed = None
                print("orphan files: none removed while a scan holds the lease (the next run removes them)")
        result["orphan_files"] = removed
    result["seconds"] = round(time.time() - t0, 2)
    return _record(out, cfg, "maintain", result)


_KINDS = {  # what each kind of damage that check finds is, in words (repair mends every one)
    "data": "data file(s) referenced and missing", "manifests": "manifest file(s) referenced and missing",
    "metadata": "metadata file(s) referenced and missing", "lineage": "table in the catalog is not the output's own",
    "intents": "pending commit intent(s) that cannot be finished", "flagged": "partition(s) whose flagged rows are not scores' flagged rows",
}


def run_check(cfg: MaintainConfig) -> dict:
    out = _open(cfg)
    problems = M.check(out)
    found = []
    for name, kinds in problems.items():
        for kind, items in kinds.items():
            if name == "_repair":
                print(f"a repair was cut short ({items[0]}): run 'python -m jobs.maintain repair' again to finish it")
                found.append("a repair was cut short")
                continue
            where = "" if name.startswith("_") else f"{out.identifier(name)}: "
            print(f"{where}{len(items)} {_KINDS.get(kind, kind)}, e.g. {items[0]}")
            found.append(f"{where}{len(items)} {_KINDS.get(kind, kind)} (e.g. {items[0]})")
    if problems:
        raise JobError(f"{cfg.output}: {'; '.join(found)}; 'python -m jobs.maintain repair --output {cfg.output}' mends it "
                       "(lost objects are scored again)", code=1)
    print(f"{cfg.output}: every file the tables' live snapshots reference is there, the tables are the output's own, no intent "
          "is stuck, and flagged is the flagged rows of scores")
    return {"problems": {}}


def run_repair(cfg: MaintainConfig) -> dict:
    out = _open(cfg, lost_ok=True)
    with output_lease(out, new_run_id("repair"), cfg.lease_ttl, cfg.wait):
        try:
            done = M.repair(out)
        except CatalogError as exc:
            raise JobError(str(exc))
    if done["registered"]:
        print(f"registered again from the newest metadata of their own lineage: {', '.join(done['registered'])}")
    for name, why in done["stale"].items():
        print(f"{out.identifier(name)}: the catalog held another table ({why}); replaced by the output's own")
    for intent in done["intents_set_aside"]:
        print(f"commit intent set aside, its unit rolled forward: {intent}")
    if done["flagged_partitions"]:
        print(f"flagged rebuilt from scores in {', '.join(done['flagged_partitions'])}")
    for name, paths in done["removed"].items():
        print(f"{out.identifier(name)}: removed {len(paths)} missing data file(s)")
    if done["state_reset"]:
        print("state dropped: the next scan rebuilds it from history and scores the lost objects again")
    for name, paths in done["unrepairable"].items():
        print(f"{out.identifier(name)}: {len(paths)} manifest or metadata file(s) missing; not repairable here "
              f"(e.g. {paths[0]})", file=sys.stderr)
    if not (done["registered"] or done["removed"] or done["state_reset"] or done["unrepairable"] or done["stale"]
            or done["intents_set_aside"] or done["flagged_partitions"]):
        print(f"{cfg.output}: nothing to repair")
    return _record(out, cfg, "repair", done)


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["check"], ["repair"]):
        cmd, rest = argv[0], argv[1:]
        cfg = parse_config(MaintainConfig, rest, __doc__)
        return run_check(cfg) if cmd == "check" else run_repair(cfg)
    return maintain(parse_config(MaintainConfig, argv, __doc__))


if __name__ == "__main__":
    run_main(main)
