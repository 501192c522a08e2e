"""Column names of every table the product reads or writes, in one place, with their meaning.

Manifests (training / evaluation input), feature caches, and the scan's ``scores``,
``flagged`` and ``errors`` tables all name their columns from here; ``TYPES`` is each
column's one Arrow type (feature caches, scan tables, pipeline batches all take it from
here); ``COLUMN_DOCS`` is the documentation that the README's schema section repeats.
"""

from __future__ import annotations

import pyarrow as pa

# Manifest (input) columns.
URI = "uri"
LABEL = "label"
CAPTION = "caption"
GENERATOR = "generator"
SPLIT = "split"

# Per-object facts gathered while reading.
SIZE = "size"
ETAG = "etag"
WIDTH = "width"
HEIGHT = "height"
FORMAT = "format"
JPEG_QUALITY = "jpeg_quality"
EXIF = "exif"
DECODE_PATH = "decode_path"  # which decoder made a row's pixels: pil (CPU) or nvjpeg (GPU); feature caches only

# Feature cache.
FEATURES = "features"
FEATURE_ID = "feature_id"
# Columns renamed since: old name -> current. Tables written before schema version 4 say clip_id
# (it held DNF ids too); catalog.ScanOutput renames it in place (Iceberg schema evolution: the
# field keeps its id, old files are read through the name mapping), readers rename what they get.
RENAMED = {"clip_id": FEATURE_ID}

# Errors (any stage).
ERROR_STAGE = "error_stage"
ERROR_TYPE = "error_type"
ERROR_MESSAGE = "error_message"

# Scan results.
SCORE = "score"
LOGIT = "logit"
THRESHOLD = "threshold"
FLAGGED = "flagged"
DETECTOR_ID = "detector_id"
DETECTOR_KIND = "detector_kind"
SCAN_ID = "scan_id"
SCANNED_AT = "scanned_at"

# Provenance evidence the file carries about itself (detector_core.sources.provenance; schema version 5).
DECLARED = "declared"
EVIDENCE_SOURCE = "evidence_source"
DECLARED_GENERATOR = "declared_generator"
C2PA_STATE = "c2pa_state"
EVIDENCE_ERROR = "evidence_error"
WATERMARK = "watermark"
FLAG_REASON = "flag_reason"

# The features table (schema version 5 outputs gain it when a scan opens them).
VECTOR = "vector"
EVIDENCE_COLUMNS = (DECLARED, EVIDENCE_SOURCE, DECLARED_GENERATOR, C2PA_STATE, EVIDENCE_ERROR, WATERMARK)

# Reviewers' verdicts (the verdicts table; jobs.audit verdicts import).
VERDICT = "verdict"
NOTE = "note"
REVIEWER = "reviewer"
REVIEWED_AT = "reviewed_at"
REVIEW_DATE = "review_date"
IMPORTED_AT = "imported_at"
VERDICT_GENERATED, VERDICT_REAL, VERDICT_UNSURE = "generated", "real", "unsure"
VERDICTS = (VERDICT_GENERATED, VERDICT_REAL, VERDICT_UNSURE)

# The precision sample (jobs.report draws it; query precision estimates from it).
STRATUM = "stratum"
STRATUM_LOW = "stratum_low"
STRATUM_HIGH = "stratum_high"
STRATUM_FLAGGED = "stratum_flagged"
NIGHT_FLAGGED = "night_flagged"
SAMPLE_SIZE = "sample_size"
SAMPLE_ORDER = "sample_order"
SAMPLE_SEED = "sample_seed"
DRAWN_AT = "drawn_at"

# Partition columns of the scan tables (stored columns of the Iceberg tables; identity partitions).
SCAN_DATE = "scan_date"
BUCKET = "bucket"

SPLIT_TRAIN = "train"
SPLIT_VAL = "val"
SPLIT_TEST = "test"
SPLIT_CALIB = "calib"  # held out of model selection: the threshold is calibrated on it

# Every column's type, wherever it is stored (``features`` is a FixedSizeList whose width is the extractor's).
TYPES = {
    URI: pa.string(), LABEL: pa.int8(), CAPTION: pa.string(), GENERATOR: pa.string(), SPLIT: pa.string(),
    SIZE: pa.int64(), ETAG: pa.string(), WIDTH: pa.int32(), HEIGHT: pa.int32(), FORMAT: pa.string(),
    JPEG_QUALITY: pa.int16(), EXIF: pa.bool_(), DECODE_PATH: pa.string(), FEATURE_ID: pa.string(),
    ERROR_STAGE: pa.string(), ERROR_TYPE: pa.string(), ERROR_MESSAGE: pa.string(),
    SCORE: pa.float64(), LOGIT: pa.float64(), THRESHOLD: pa.float64(), FLAGGED: pa.bool_(),
    DETECTOR_ID: pa.string(), DETECTOR_KIND: pa.string(), SCAN_ID: pa.string(), SCANNED_AT: pa.timestamp("us", tz="UTC"),
    SCAN_DATE: pa.date32(), BUCKET: pa.string(),
    DECLARED: pa.string(), EVIDENCE_SOURCE: pa.string(), DECLARED_GENERATOR: pa.string(), C2PA_STATE: pa.string(),
    EVIDENCE_ERROR: pa.string(), WATERMARK: pa.string(), FLAG_REASON: pa.string(), VECTOR: pa.binary(),
    VERDICT: pa.string(), NOTE: pa.string(), REVIEWER: pa.string(), REVIEWED_AT: pa.timestamp("us", tz="UTC"),
    REVIEW_DATE: pa.date32(), IMPORTED_AT: pa.timestamp("us", tz="UTC"),
    STRATUM: pa.int16(), STRATUM_LOW: pa.float64(), STRATUM_HIGH: pa.float64(), STRATUM_FLAGGED: pa.int64(),
    NIGHT_FLAGGED: pa.int64(), SAMPLE_SIZE: pa.int32(), SAMPLE_ORDER: pa.int32(), SAMPLE_SEED: pa.int64(),
    DRAWN_AT: pa.timestamp("us", tz="UTC"),
}

# What every input (prefix listing, manifest, S3 Inventory) becomes: one row per listed object; a row the
# listing could not use carries error_type/error_message and becomes an ``errors`` row (error_stage = list).
LIST_SCHEMA = pa.schema([
    (URI, TYPES[URI]), (ETAG, TYPES[ETAG]), (SIZE, TYPES[SIZE]), (ERROR_TYPE, TYPES[ERROR_TYPE]), (ERROR_MESSAGE, TYPES[ERROR_MESSAGE]),
])

COLUMN_DOCS = {
    VECTOR: "the exact input of the detector head for this object (the features table): little-endian float16, the feature "
            "extractor's width (image part, then caption part where the detector uses captions); numpy.frombuffer(v, '<f2')",
    URI: "object URI (s3://bucket/key, gs://…, or a local path)",
    LABEL: "1 = generated, 0 = real",
    CAPTION: "caption or prompt of the image (needed by image+text detectors)",
    GENERATOR: "which generator made the image ('real' for real images)",
    SPLIT: "train / val / calib / test; assigned from a hash of the uri when the manifest has none (val picks the epoch, calib sets the threshold)",
    SIZE: "object size in bytes",
    ETAG: "object ETag (S3/GCS), or mtime:<seconds> for local files; with size, what tells a changed object",
    WIDTH: "image width in pixels, as stored",
    HEIGHT: "image height in pixels, as stored",
    FORMAT: "image format as detected from the bytes (JPEG, PNG, …)",
    JPEG_QUALITY: "JPEG quality estimated from the file's luminance quantisation table (1-100; null for other formats)",
    EXIF: "the file carries an EXIF block",
    FEATURES: "feature vector (float32): CLIP image or image+text embedding, or the flattened DNF noise estimate",
    FEATURE_ID: "feature extractor that made the features (before schema version 4: clip_id): 'model/pretrained/mode' for CLIP, 'dnf/<unet>/t<step>/<size>[/q8]' for DNF (q8: the reference's 8-bit values)",
    ERROR_STAGE: "where the object failed: list (no usable uri or size in the input, not a regular file), read (I/O, over --max-bytes), decode (bytes are no usable image), embed",
    ERROR_TYPE: "error kind, e.g. not_an_image, truncated, too_large, or the exception name",
    ERROR_MESSAGE: "human-readable cause",
    SCORE: "probability that the image is generated, sigmoid(logit)",
    LOGIT: "the detector's raw output",
    THRESHOLD: "decision threshold on the score scale, from the detector bundle",
    FLAGGED: "score >= threshold (decided on the logit scale)",
    DETECTOR_ID: "detector bundle id (kind + content hash)",
    DETECTOR_KIND: "detector family: clip-mlp (CLIP features + MLP) or dnf-resnet (diffusion noise feature + ResNet); null in schema-1 files",
    SCAN_ID: "the scan run that wrote the row",
    SCANNED_AT: "when the row was written (UTC)",
    SCAN_DATE: "partition: the UTC date the scan started (a DATE)",
    BUCKET: "partition: the object's bucket (s3://BUCKET/…, gs://BUCKET/…), 'local' for local paths",
    DECLARED: "what the file declares about its origin: declared_generated, declared_captured, declared_edited, or null (nothing found)",
    EVIDENCE_SOURCE: "where the declaration was found: c2pa, xmp, png_text, exif (or watermark); null when nothing was found",
    DECLARED_GENERATOR: "the generator or tool the evidence names, when it names one",
    C2PA_STATE: "C2PA manifest: trusted (signature valid, signer chains to --c2pa-trust), untrusted (valid, no trusted anchor), invalid (pixels or manifest changed after signing), unreadable; null without a manifest",
    EVIDENCE_ERROR: "why evidence in the file could not be read (malformed, over a bound); the object is scored all the same",
    WATERMARK: "the best invisible-watermark match, pattern and agreeing bits (sdxl 46/48: it declares at 41 of 48, sd1 at 98/136, sd2 at 30/32); null unless the scan ran with --watermarks",
    FLAG_REASON: "why the row is flagged: score (at or above the threshold), declared (declared generated, --flag-declared), both; null when not flagged",
    VERDICT: "a reviewer's verdict on the image: generated, real or unsure",
    NOTE: "the reviewer's free-text note (may be empty)",
    REVIEWER: "who gave the verdict",
    REVIEWED_AT: "when the reviewer gave it (UTC, from the review page)",
    REVIEW_DATE: "partition of the verdicts table: the UTC date of reviewed_at",
    IMPORTED_AT: "when jobs.audit verdicts import added the row (UTC)",
    STRATUM: "precision sample: the score band (0 = highest scores) of the night's flagged rows the row was drawn from",
    STRATUM_LOW: "precision sample: the lowest score in the row's stratum",
    STRATUM_HIGH: "precision sample: the highest score in the row's stratum",
    STRATUM_FLAGGED: "precision sample: the night's flagged rows in the stratum (N_h, the stratum's weight is N_h / N)",
    NIGHT_FLAGGED: "precision sample: the night's flagged rows of the detector when the sample was drawn (N)",
    SAMPLE_SIZE: "precision sample: rows drawn for the night and detector (n)",
    SAMPLE_ORDER: "precision sample: the row's place in the fixed, seeded review order (1 = first)",
    SAMPLE_SEED: "precision sample: the seed the night's draw used (from the date, the detector and --sample-seed)",
    DRAWN_AT: "precision sample: when jobs.report drew it (UTC)",
}
