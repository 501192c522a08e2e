"""``ReportConfig``: every flag of ``python -m jobs.report``, with its help text."""

from __future__ import annotations

from dataclasses import dataclass

from detector_core.tables.sampling import DEFAULT_STRATA, sample_size
from jobs.common.flags import CatalogOptions, StorageOptions, opt


@dataclass
class ReportConfig(CatalogOptions, StorageOptions):
    scan: str = opt("", "scan output prefix (the --output of jobs.scan), local or s3://")
    date: str = opt("last", "scan date to report, YYYY-MM-DD, or 'last' for the newest committed one")
    out: str = opt("report.html", "the page to write (local or s3://); its thumbnails go to <name>_files/ beside it")
    detector_id: str = opt("", "only this detector id (default: every detector that scanned that date)")
    max_cards: int = opt(20_000, "flagged images in the queue, highest scores first; the page counts the rest", within="[0, inf)")
    band: float = opt(0.05, "near-threshold band: scores within this distance of the threshold (score scale)", within="[0, 1]")
    max_band: int = opt(200, "rows of the near-threshold band in the queue (closest first)", within="[0, inf)")
    precision_sample: int = opt(sample_size(), "rows of each night's flagged images (per detector) in the precision sample, drawn once "
                                "and kept in the precision_sample table; the default gives a 95 % interval of about ±5 points; "
                                "0 = draw none", within="[0, inf)")
    sample_strata: int = opt(DEFAULT_STRATA, "score bands the precision sample is stratified by (equal counts of flagged rows)", within="[1, 100]")
    sample_seed: int = opt(0, "seed of the precision sample, with the date and detector (change it only to draw a new sample)", within="[0, inf)")
    reviewers: int = opt(1, "reviewers who split the queue: the page links each one's deterministic share (#shard=k/N)", within="[1, 1000]")
    page_size: int = opt(60, "cards per page of the queue", within="[1, 1000]")
    thumb_size: int = opt(160, "thumbnail edge in pixels", within="[1, inf)")
    preview_size: int = opt(640, "edge of the larger view (v / Enter) in pixels; 0 = the thumbnail only", within="[0, inf)")
    max_pixels: int = opt(64_000_000, "objects with more pixels than this get no thumbnail (decompression bombs)", within="[1, inf)")
    threads: int = opt(16, "concurrent object reads and writes for the thumbnails", within="[1, inf)")
