"""What a scan reads: the objects to look at, their bytes, their pixels, and what the files say of themselves.

Listings (``listing``: prefixes split for fan-out; ``manifest``; ``inventory``: S3 Inventory
reports), all as ``schema.LIST_SCHEMA`` rows; safe decoding with typed errors (``images``); a
model's input computed on CPU workers without torch (``inputs``, ``resize``); the GPU's
hardware JPEG path (``jpeg_header`` routes by header, ``device_decode`` decodes in batches);
the JPEG/PNG structure walkers (``containers``); provenance evidence (``provenance``: C2PA,
XMP, generator chunks, EXIF; ``watermark``: invisible watermarks).

May import: the root leaves (``schema``, ``storage``, ``devices``) and this wing. This is the
lowest wing: nothing here imports ``method`` or ``tables``. A new input source (another
listing format, another store) goes here, and yields ``LIST_SCHEMA`` rows.
"""
