"""``ScanConfig``: every flag of ``python -m jobs.scan``, with its help text (the scan's one typed config).

Its own module so that the scan's helpers (``stream``, ``planning``) can name it without
importing the job: the job imports them.
"""

from __future__ import annotations

from dataclasses import dataclass

from detector_core.method.features import FORWARDS
from detector_core.sources.images import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS
from jobs.common.flags import RayOptions, RetentionOptions, StorageOptions, opt
from jobs.scanning.planning import DRIVER_PLAN_MAX, PLAN_WHERE

# Flags that change what a scan decides or records about an object: a later scan that changes one
# says that the objects it skips as unchanged keep their earlier rows (jobs.scan).
DECISION_FLAGS = ("flag_declared", "evidence", "watermarks", "c2pa_trust")


@dataclass
class ScanConfig(RetentionOptions, RayOptions, StorageOptions):
    detector: str = opt("", "detector bundle folder (local or s3://), as written by jobs.train to OUT/detector; either kind (clip-mlp, dnf-resnet)")
    ensemble: str = opt("", "more detector bundles to run in the same pass, comma-separated (e.g. a DNF bundle next to a CLIP one): one row per object and detector")
    input: str = opt("", "what to scan: a prefix (s3://bucket/prefix, gs://…, a local folder), a .parquet/.csv manifest with a uri column (optional etag, size), or an S3 Inventory report: its manifest.json, that file's folder, or a glob of them (s3://inv/src/cfg/*/manifest.json: the newest of each)")
    output: str = opt("", "where the tables go: Iceberg tables OUT/scores, OUT/flagged, OUT/errors, OUT/runs (local or s3://)")
    catalog: str = opt("", "Iceberg catalog of the tables: empty = SQLite OUT/catalog.db (local outputs only); sqlite:///…, postgresql://user@host/db, https://rest, glue, or a pyiceberg catalog name (credentials in its config, never here)")
    namespace: str = opt("", "catalog namespace of this output's tables (default: as recorded in OUT/_catalog.json, else 'detector'); one per output in a shared catalog")
    full: bool = opt(False, "score everything again, not only new or changed objects")
    scan_date: str = opt("", "scan_date partition to write, YYYY-MM-DD (default: today, UTC); for backfills and re-runs of a missed night")
    captions: str = opt("", "manifest with uri,caption for detectors that use image+text features")
    batch_size: int = opt(64, "images per model batch", within="[1, inf)")
    actors: str = opt("1", "Scorer actors: a number, or a range MIN-MAX (e.g. 1-16) that grows into GPUs as they appear and shrinks when idle")
    gpu: bool = opt(False, "run the Scorer actors on GPUs (one each)")
    forward: str = opt("autocast", "how the Scorer runs a CLIP image tower on GPUs: autocast (bf16 autocast over fp32 weights: what detectors are trained with), bf16 (weights cast to bf16, fused attention), bf16-compile (+ torch.compile at a static --batch-size), bf16-graphs (+ CUDA graphs); the precision is recorded in the run summary and a difference from training warned about (docs/scaling.md gives the measured speed and score differences)", choices=tuple(FORWARDS))
    cpus_per_actor: float = opt(0.0, "CPUs reserved per Scorer actor, its torch threads (0 = 1 with --gpu, else half the cluster's CPUs shared by the actors, so decoding has the rest)", within="[0, inf)")
    chunk_size: int = opt(50_000, "result rows per commit unit (objects x detectors): each unit is one Iceberg snapshot per table", within="[1, inf)")
    max_pixels: int = opt(DEFAULT_MAX_PIXELS, "refuse images with more pixels than this (decompression bombs)", within="[1, inf)")
    max_bytes: int = opt(DEFAULT_MAX_BYTES, "refuse objects larger than this many bytes (never read past it)", within="[1, inf)")
    state_compact_at: int = opt(8, "files per state partition at which a refresh merges them into one (compaction)", within="[1, inf)")
    plan: str = opt("auto", "where the plan (listing, anti-join with the state) and the state's refresh run: auto (in this process while the listed objects plus the state rows they touch stay within --driver-plan-max, on the cluster above), driver (always here: small inputs, debugging), cluster (always in Ray tasks)", choices=PLAN_WHERE)
    driver_plan_max: int = opt(DRIVER_PLAN_MAX, "--plan auto: rows (listed objects + state rows of their partitions) up to which the plan runs in this process; also what it may hold here (~0.85 KB a row)", within="[0, inf)")
    list_fan_out: int = opt(64, "listing units a prefix is split into (its first levels of common prefixes), listed by parallel tasks", within="[1, inf)")
    resource_timeout: float = opt(900.0, "seconds to wait for the first Scorer actor to be placed before failing with the missing resource", within="(0, inf)")
    lease_ttl: float = opt(300.0, "seconds a scan's lease on the output lasts without renewal (a dead scan blocks the output this long)", within="(0, inf)")
    wait: bool = opt(False, "if another scan holds the output's lease, wait for it instead of refusing")
    evidence: bool = opt(True, "read what each file declares about its origin (C2PA, IPTC/XMP DigitalSourceType, generator PNG chunks, EXIF Software) into the evidence columns, from the bytes already read (--no-evidence: not)")
    c2pa_trust: str = opt("", "PEM file of C2PA trust anchors (local or s3://): a manifest whose signer chains to one reads as trusted; none given, a valid manifest reads as untrusted")
    watermarks: bool = opt(False, "also read the Stable Diffusion / SDXL invisible watermark (DWT-DCT, invisible-watermark's decoder): a full-resolution decode and transform per image, ~0.1 s per megapixel per pattern on one core (docs/scaling.md)")
    keep_features: bool = opt(True, "keep each scored object's feature vector (the CLIP-family head's input, float16, ~1.5 KB for "
                              "768 values) in the features table, committed with its scores, to re-score, compare and train without "
                              "reading the image again (--no-keep-features: not; DNF features are never kept: a noise map an image)")
    flag_declared: bool = opt(False, "flag files that declare themselves generated (not by an invalid manifest) whatever their score; flag_reason says declared, score or both")
    crash_actor_once: str = opt("", "testing: the first Scorer batch kills its actor process if this marker file does not exist yet")
    kill_at: str = opt("", "testing: STEP:UNIT kills the driver with SIGKILL before commit step STEP (intent, errors, scores, flagged, runs, done) of unit UNIT")
