"""The page's image files: a thumbnail and a larger view per object, named by a hash of its uri, each written whole.

Also ``shard_hash``, the number the page divides reviewers' shares by (the same hash family).
"""

from __future__ import annotations

import hashlib
import io
import posixpath
from concurrent.futures import ThreadPoolExecutor

from detector_core.sources.images import decode_image
from detector_core.storage import open_fs, write_atomic
from jobs.reporting.config import ReportConfig


def asset_name(uri: str) -> str:
    """The file name of an object's thumbnail and larger view (a hash of the uri: any uri, one safe name)."""
    return hashlib.sha1(uri.encode()).hexdigest()[:24] + ".jpg"


def shard_hash(uri: str) -> int:
    """The 32-bit number the page divides reviewers' shares by (``hash % N``): one image, one reviewer."""
    return int(hashlib.sha1(uri.encode()).hexdigest()[24:32], 16)


def _jpeg(im, size: int) -> bytes:
    im = im.copy()
    im.thumbnail((size, size))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=80)
    return buf.getvalue()


def thumbnails(uri: str, sizes: tuple[int, ...], storage_options: dict | None, max_pixels: int) -> list[bytes]:
    """JPEGs of the object at each edge of ``sizes`` (one read, one decode), or raise with the reason."""
    fs, path = open_fs(uri, storage_options)
    decoded = decode_image(fs.cat_file(path), max_pixels=max_pixels, draft_size=2 * max(sizes))
    return [_jpeg(decoded.image, s) for s in sizes]


def assets_folder(out: str) -> tuple[str, str]:
    """(the folder beside the page that holds its thumbnails, its name relative to the page)."""
    base, name = posixpath.split(out.rstrip("/"))
    stem = name.rsplit(".", 1)[0] if "." in name else name
    rel = f"{stem}_files"
    return (posixpath.join(base, rel) if base else rel), rel


def write_thumbnails(uris: list[str], cfg: ReportConfig, so: dict | None) -> dict[str, str]:
    """Thumbnails (and larger views) of ``uris`` in the page's folder; returns uri -> why it has none, for the failures.

    Files already there (a re-run of the same page) are kept, not made again.
    """
    folder, _ = assets_folder(cfg.out)
    fs, root = open_fs(folder, so)
    kinds = [("t", cfg.thumb_size)] + ([("p", cfg.preview_size)] if cfg.preview_size else [])
    for k, _ in kinds:
        fs.makedirs(f"{root}/{k}", exist_ok=True)
    try:
        have = {p.rsplit("/", 1)[-1] for p in fs.ls(f"{root}/t", detail=False)}
    except FileNotFoundError:
        have = set()
    todo = [u for u in dict.fromkeys(uris) if asset_name(u) not in have]

    def one(u: str) -> str | None:
        try:
            images = thumbnails(u, tuple(s for _, s in kinds), so, cfg.max_pixels)
        except Exception as exc:  # noqa: BLE001 - shown on the card; the page still renders
            return getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"
        # Each file whole or absent (a killed report leaves no half thumbnail that a re-run would keep),
        # the thumbnail last: its presence means "done".
        for (k, _), data in zip(reversed(kinds), reversed(images)):
            write_atomic(fs, f"{root}/{k}/{asset_name(u)}", data, sync=False)
        return None

    with ThreadPoolExecutor(max(1, cfg.threads)) as pool:
        return {u: why for u, why in zip(todo, pool.map(one, todo)) if why}
