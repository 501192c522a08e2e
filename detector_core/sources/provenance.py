"""What a file says about where it came from: C2PA Content Credentials, IPTC/XMP DigitalSourceType, generator chunks and tags.

``read_evidence(data)`` reads the bytes a scan already holds and returns one ``Evidence``:
what was declared (``declared_generated``, ``declared_captured``, ``declared_edited`` or
none), its source (``c2pa``, ``xmp``, ``png_text``, ``exif``), the generator's name when the
file states one, the C2PA validation state, and a parse failure when there was one. It never
raises for what is in the file: a malformed manifest, an oversized XMP packet or PNG text
chunk, a compressed chunk that inflates without end are each recorded in ``error`` and the
rest is still read (the object is still scored). ``watermark.with_watermark`` adds what the
invisible watermark decoder reads from the full-resolution pixels (the scan's ``--watermarks``).

Only where metadata can be is searched (``_metadata``: a JPEG's segments before its first
scan, a PNG's chunks other than ``IDAT``; other formats whole), so a photo without evidence
costs a walk of its header, not a pass over its pixels.

- **C2PA** through ``c2pa-python`` (the CAI's c2pa-rs): only when that metadata holds a
  JUMBF box or a ``c2pa`` label (files without one cost nothing more).
  The active manifest's actions give the IPTC digital source type (``c2pa.created`` with
  ``trainedAlgorithmicMedia`` is a generated image) and the software agent; the claim
  generator names the tool otherwise. ``c2pa_state``: ``trusted`` (the signature validates
  and the signer chains to a trust anchor the caller passed, ``trust_pem``), ``untrusted``
  (valid, but no anchor given or none matches: its own state, since anyone can sign),
  ``invalid`` (the signature or a hash fails: the pixels were changed after signing), or
  ``unreadable``. Remote manifests and OCSP are never fetched (a scan must not call out).
- **XMP** ``Iptc4xmpExt:DigitalSourceType`` (and ``xmp:CreatorTool``), matched by a bounded
  regular expression over the packet, never an XML parser (no entity expansion); a packet
  over ``MAX_XMP_BYTES`` is not read.
- **PNG text chunks** (``tEXt``, ``zTXt``, ``iTXt``) walked chunk by chunk: Automatic1111 and
  Forge ``parameters``, ComfyUI ``prompt``/``workflow``, NovelAI (``Software`` NovelAI with a
  ``Comment``), InvokeAI ``invokeai_metadata``/``sd-metadata``/``dream``; compressed chunks
  inflate to at most ``MAX_TEXT_BYTES``.
- **EXIF** ``Software`` naming a known generator.

The strongest evidence wins: a C2PA manifest that is not invalid, then XMP, PNG text, EXIF; an
invalid manifest is reported (state ``invalid``) with what it claimed, below any other
evidence. Invisible watermarks are read by ``watermark``, only when the scan asks.
"""

from __future__ import annotations

import io
import json
import re
import zlib
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from detector_core import schema as S
from detector_core.sources.containers import PNG_SIGNATURE, MalformedJpeg, jpeg_segments, png_chunks

__all__ = ["DECLARED", "Evidence", "SOURCES", "declared_labels", "flag_decision", "read_evidence"]

DECLARED_GENERATED, DECLARED_CAPTURED, DECLARED_EDITED = "declared_generated", "declared_captured", "declared_edited"
DECLARED = (DECLARED_GENERATED, DECLARED_CAPTURED, DECLARED_EDITED)
SOURCES = ("c2pa", "xmp", "png_text", "exif", "watermark")
C2PA_STATES = ("trusted", "untrusted", "invalid", "unreadable")
MAX_XMP_BYTES = 4 << 20  # a real packet is KBs (a JPEG APP1 segment holds 64 KB)
MAX_TEXT_BYTES = 1 << 20  # of one PNG text chunk, inflated
MAX_TEXT_TOTAL = 4 << 20  # of all a file's PNG text chunks together, inflated: what one file may cost the reader
MAX_NAME = 120  # characters of a generator name kept

# IPTC NewsCodes digital source types (cv.iptc.org/newscodes/digitalsourcetype/), by what they declare.
SOURCE_TYPES = {
    "trainedAlgorithmicMedia": DECLARED_GENERATED, "algorithmicMedia": DECLARED_GENERATED,
    "compositeWithTrainedAlgorithmicMedia": DECLARED_EDITED, "compositeSynthetic": DECLARED_EDITED,
    "algorithmicallyEnhanced": DECLARED_EDITED, "compositeCapture": DECLARED_EDITED, "composite": DECLARED_EDITED,
    "digitalCapture": DECLARED_CAPTURED, "negativeFilm": DECLARED_CAPTURED, "positiveFilm": DECLARED_CAPTURED,
    "print": DECLARED_CAPTURED, "minorHumanEdits": DECLARED_CAPTURED,
}
# EXIF Software values that name a generator (lower case, matched as substrings).
GENERATOR_SOFTWARE = ("stable diffusion", "automatic1111", "comfyui", "novelai", "invokeai", "midjourney", "dall-e", "dall·e",
                      "firefly", "imagen", "ideogram", "leonardo.ai", "flux", "fooocus", "draw things", "diffusionbee")
_XMP_START, _XMP_END = b"<x:xmpmeta", b"</x:xmpmeta>"
_DST_RE = re.compile(rb"DigitalSourceType\s*(?:=\s*[\"']|>)\s*([^\"'<]{1,300})")
_TOOL_RE = re.compile(rb"CreatorTool\s*(?:=\s*[\"']|>)\s*([^\"'<]{1,300})")
_PNG_GENERATORS = {"parameters": "AUTOMATIC1111", "prompt": "ComfyUI", "workflow": "ComfyUI", "invokeai_metadata": "InvokeAI",
                   "sd-metadata": "InvokeAI", "dream": "InvokeAI"}


@dataclass(frozen=True)
class Evidence:
    """What one file declares about its origin (all None: nothing found); ``watermark``: the best match, e.g. ``sdxl 46/48``."""

    declared: str | None = None
    source: str | None = None
    generator: str | None = None
    c2pa_state: str | None = None
    error: str | None = None
    watermark: str | None = None


def _code(url_or_code: str) -> str:
    return url_or_code.strip().rstrip("/").rsplit("/", 1)[-1]


def _name(value) -> str | None:
    if isinstance(value, dict):
        value = value.get("name")
    text = str(value).strip() if value else ""
    return text[:MAX_NAME] or None


# -- C2PA -------------------------------------------------------------------------------------
def _c2pa_settings(trust_pem: str | None) -> dict:
    verify = {"remote_manifest_fetch": False, "ocsp_fetch": False, "verify_trust": bool(trust_pem)}
    settings = {"verify": verify}
    if trust_pem:
        settings["trust"] = {"trust_anchors": trust_pem}
    return settings


def _mime(data: bytes) -> str | None:
    if data[:3] == b"\xff\xd8\xff":
        return "image/jpeg"
    if data[:8] == PNG_SIGNATURE:
        return "image/png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if data[4:12] in (b"ftypavif", b"ftypheic", b"ftypheix", b"ftypmif1"):
        return "image/avif" if data[8:12] == b"avif" else "image/heic"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "image/tiff"
    return None


def _jpeg_header(data: bytes) -> bytes:
    """A JPEG's marker segments before its first scan (APPn: EXIF, XMP, the C2PA JUMBF boxes), without the image data."""
    parts = []
    try:
        for _, start, end in jpeg_segments(data):
            parts.append(data[start:end])
    except MalformedJpeg:  # what was walked before the break is still searched
        pass
    return b"".join(parts)


def _metadata(data: bytes) -> bytes:
    """Where a file's metadata can be: a JPEG's header segments, a PNG's chunks other than the pixels; the whole file otherwise.

    Searching a 1.5 MB photo whole costs ~1 ms per pattern; its header is a few KB.
    """
    if data[:3] == b"\xff\xd8\xff":
        return _jpeg_header(data)
    if data[:8] == PNG_SIGNATURE:
        return b"".join(data[pos:pos + 12 + length] for kind, pos, length in png_chunks(data) if kind != b"IDAT")
    return data


def _c2pa(data: bytes, trust_pem: str | None, meta: bytes | None = None) -> Evidence | None:
    meta = _metadata(data) if meta is None else meta
    if b"jumb" not in meta and b"c2pa" not in meta:  # no JUMBF box, no manifest label: nothing to ask c2pa-rs
        return None
    mime = _mime(data)
    if mime is None:
        return None
    import c2pa

    try:
        context = c2pa.Context(settings=c2pa.Settings.from_dict(_c2pa_settings(trust_pem)))
        with c2pa.Reader(mime, io.BytesIO(data), context=context) as reader:
            doc = json.loads(reader.json())
    except Exception as exc:  # noqa: BLE001 - c2pa-rs reports malformed JUMBF and friends as its own errors
        if "ManifestNotFound" in type(exc).__name__ or "ManifestNotFound" in str(exc):
            return None
        return Evidence(source="c2pa", c2pa_state="unreadable", error=f"c2pa: {type(exc).__name__}: {str(exc)[:200]}")
    manifest = (doc.get("manifests") or {}).get(doc.get("active_manifest") or "", {})
    state = {"Trusted": "trusted", "Valid": "untrusted", "Invalid": "invalid"}.get(doc.get("validation_state"), "unreadable")
    declared, agent = None, None
    for assertion in manifest.get("assertions") or []:
        if not str(assertion.get("label", "")).startswith("c2pa.actions"):
            continue
        for action in (assertion.get("data") or {}).get("actions") or []:
            found = SOURCE_TYPES.get(_code(str(action.get("digitalSourceType") or "")))
            # a created image's type wins over an edit's; among edits, the first that says anything
            if found and (declared is None or action.get("action") == "c2pa.created"):
                declared, agent = found, _name(action.get("softwareAgent")) or agent
    info = manifest.get("claim_generator_info") or []
    generator = agent or (_name(info[0]) if info else None) or _name(manifest.get("claim_generator"))
    problems = [s.get("code") for s in doc.get("validation_status") or [] if s.get("code") != "signingCredential.untrusted"]
    return Evidence(declared=declared, source="c2pa", generator=generator, c2pa_state=state,
                    error=f"c2pa: {', '.join(map(str, problems))[:200]}" if state == "invalid" and problems else None)


# -- XMP --------------------------------------------------------------------------------------
def _xmp(data: bytes) -> Evidence | None:
    start = data.find(_XMP_START)
    if start < 0:
        return None
    end = data.find(_XMP_END, start, start + MAX_XMP_BYTES)
    if end < 0:
        return Evidence(source="xmp", error=f"xmp: no packet end within {MAX_XMP_BYTES >> 20} MB; not read")
    packet = data[start:end]
    m = _DST_RE.search(packet)
    tool = _TOOL_RE.search(packet)
    generator = _name(tool.group(1).decode("utf-8", "replace")) if tool else None
    if not m:
        return None
    declared = SOURCE_TYPES.get(_code(m.group(1).decode("utf-8", "replace")))
    return Evidence(declared=declared, source="xmp", generator=generator) if declared else None


# -- PNG text ---------------------------------------------------------------------------------
def _png_chunks(data: bytes):
    """(keyword, text or None when refused, error) of each text chunk, walking the chunk list with bounds.

    At most ``MAX_TEXT_TOTAL`` bytes of text are kept for the whole file (thousands of chunks each
    under the per-chunk cap must not add up to gigabytes); the chunks after that are not read.
    """
    kept = 0
    for kind, pos, length in png_chunks(data):
        if kind not in (b"tEXt", b"zTXt", b"iTXt"):  # the pixels are never copied
            continue
        if kept >= MAX_TEXT_TOTAL:
            yield "", None, f"png_text: over {MAX_TEXT_TOTAL >> 20} MB of text in all; the chunks after are not read"
            return
        body = data[pos + 8:pos + 8 + length]
        if len(body) < length:
            return
        keyword, _, rest = body.partition(b"\x00")
        key = keyword[:79].decode("latin-1")
        try:
            if kind == b"tEXt":
                raw, compressed = rest, False
            elif kind == b"zTXt":
                raw, compressed = rest[1:], True
            else:  # iTXt: flag, method, language\0, translated keyword\0, text
                flag = rest[:1] == b"\x01"
                raw = rest[2:].split(b"\x00", 2)[-1]
                compressed = flag
            cap = min(MAX_TEXT_BYTES, MAX_TEXT_TOTAL - kept)
            if compressed:
                inflater = zlib.decompressobj()
                raw = inflater.decompress(raw, cap + 1)
            if len(raw) > cap:
                kept += cap
                size = f"{cap >> 20} MB" if cap % (1 << 20) == 0 else f"{cap >> 10} KB"
                yield key, raw[:cap], f"png_text: chunk {key!r} over {size}; read in part"
                continue
            kept += len(raw)
            yield key, raw, None
        except zlib.error as exc:
            yield key, None, f"png_text: chunk {key!r} does not inflate ({exc})"


def _png_text(data: bytes) -> tuple[Evidence | None, Evidence | None, str | None]:
    """(evidence from the generator keys, evidence from an XMP iTXt chunk, the first error)."""
    if data[:8] != PNG_SIGNATURE:
        return None, None, None
    found, xmp, error, texts = None, None, None, {}
    for key, text, err in _png_chunks(data):
        error = error or err
        if text is None:
            continue
        texts[key] = text
        if key == "XML:com.adobe.xmp":
            xmp = _xmp(text if text.startswith(_XMP_START) else text[text.find(_XMP_START):]) if _XMP_START in text else None
    generator = None
    for key, name in _PNG_GENERATORS.items():
        if key in texts:
            generator = name
            if key == "parameters":
                m = re.search(rb"Model:\s*([^,\n]{1,120})", texts[key])
                generator = f"AUTOMATIC1111 ({m.group(1).decode('utf-8', 'replace').strip()})" if m else name
            break
    software = texts.get("Software", b"").decode("utf-8", "replace").strip()
    if generator is None and software and any(g in software.lower() for g in GENERATOR_SOFTWARE):
        generator = software[:MAX_NAME]
    if generator:
        found = Evidence(declared=DECLARED_GENERATED, source="png_text", generator=generator)
    return found, xmp, error


# -- EXIF -------------------------------------------------------------------------------------
def _exif_software(data: bytes, meta: bytes) -> Evidence | None:
    if data[:3] != b"\xff\xd8\xff" or b"Exif\x00\x00" not in meta:
        return None
    head = meta.lower()
    if not any(g.encode() in head for g in GENERATOR_SOFTWARE):  # no generator's name anywhere: no need to parse the EXIF
        return None
    from PIL import Image

    try:
        software = str(Image.open(io.BytesIO(data)).getexif().get(0x0131) or "").strip()
    except Exception:  # noqa: BLE001 - a broken EXIF block is no evidence
        return None
    if software and any(g in software.lower() for g in GENERATOR_SOFTWARE):
        return Evidence(declared=DECLARED_GENERATED, source="exif", generator=software[:MAX_NAME])
    return None


def read_evidence(data: bytes, trust_pem: str | None = None) -> Evidence:
    """The strongest evidence ``data`` carries about its origin (``Evidence()`` when none); never raises for the file's content."""
    errors = []
    meta = _metadata(data)
    c2pa = _c2pa(data, trust_pem, meta)
    if c2pa is not None and c2pa.error:
        errors.append(c2pa.error)
    if c2pa is not None and c2pa.c2pa_state in ("trusted", "untrusted") and c2pa.declared:
        return c2pa
    png, png_xmp, png_error = _png_text(data)
    if png_error:
        errors.append(png_error)
    xmp = png_xmp or _xmp(meta)
    if xmp is not None and xmp.error:
        errors.append(xmp.error)
    for candidate in (xmp, png, _exif_software(data, meta)):
        if candidate is not None and candidate.declared:
            return Evidence(candidate.declared, candidate.source, candidate.generator,
                            c2pa.c2pa_state if c2pa is not None else None, "; ".join(errors) or None)
    if c2pa is not None:  # an invalid or unreadable manifest, or a valid one that declares nothing
        return Evidence(c2pa.declared, "c2pa", c2pa.generator, c2pa.c2pa_state, "; ".join(errors) or None)
    return Evidence(error="; ".join(errors) or None)


def declares_generated(declared, c2pa_state) -> np.ndarray:
    """Per row: the file declares itself generated, by evidence that was not shown broken (an invalid manifest is not)."""
    declared = np.asarray(declared, dtype=object)
    state = np.asarray(c2pa_state, dtype=object)
    return (declared == DECLARED_GENERATED) & ~np.isin(state, ["invalid", "unreadable"])


def flag_decision(by_score: np.ndarray, declared, c2pa_state, flag_declared: bool) -> tuple[np.ndarray, np.ndarray]:
    """(flagged, flag_reason) per row: by the score, or with ``flag_declared`` also by a declaration of a generated origin.

    ``flag_reason`` is ``score``, ``declared``, ``both`` or None (not flagged).
    """
    by_score = np.asarray(by_score, dtype=bool)
    by_declared = declares_generated(declared, c2pa_state) if flag_declared else np.zeros(by_score.shape, dtype=bool)
    reason = np.full(by_score.shape, None, dtype=object)
    reason[by_score] = "score"
    reason[by_declared] = "declared"
    reason[by_score & by_declared] = "both"
    return by_score | by_declared, reason


def declared_labels(rows: pa.Table) -> pa.Table:
    """Scores rows (``uri``, ``declared``, ``c2pa_state``, ``scanned_at``) as verdict-shaped rows for ``verdicts.with_verdicts``.

    Declared generated = ``generated``, declared captured = ``real``; edited images and
    declarations by an invalid or unreadable manifest are left out. The latest scan of an
    image decides.
    """
    keep = pc.and_(pc.is_in(rows[S.DECLARED], value_set=pa.array([DECLARED_GENERATED, DECLARED_CAPTURED])),
                   pc.invert(pc.fill_null(pc.is_in(rows[S.C2PA_STATE], value_set=pa.array(["invalid", "unreadable"])), False)))
    kept = rows.filter(pc.fill_null(keep, False))
    verdict = pc.if_else(pc.equal(kept[S.DECLARED], DECLARED_GENERATED), S.VERDICT_GENERATED, S.VERDICT_REAL)
    return pa.table({S.URI: kept[S.URI], S.VERDICT: verdict, S.REVIEWED_AT: kept[S.SCANNED_AT]})
