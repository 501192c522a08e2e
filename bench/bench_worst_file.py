"""What the worst file within ``--max-bytes`` costs a decode worker: peak memory of the evidence reader and the decode.

    python -m bench.bench_worst_file --max-mb 64 --out bench/results/bench_worst_file-cpu2-2026-12-07.json

Each case is a PNG of ``--max-mb`` MB built to cost the most: many text chunks just under the
per-chunk cap (``tEXt``), many small ``zTXt`` chunks that each inflate to the per-chunk cap,
one ``zTXt`` of ~4 MB that inflates to 4 GiB, and a plain image of the same size for comparison;
each declares itself generated (an Automatic1111 ``parameters`` chunk first), so the evidence
must still be read and the pixels still scored. Each file is written here, then read by a fresh
process doing what a decode task does per object (its bytes, ``read_evidence``, then
``decode_image`` at the CLIP draft size): the figures are that process's peak RSS
(``ru_maxrss``) before it reads the bytes, after, and after evidence + decode, and whether the
object decoded (a row of ``scores``) and declared.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import struct
import subprocess
import sys
import tempfile
import zlib

from jobs.common.outputs import write_json

CASES = ("plain", "text_chunks", "ztxt_many", "ztxt_one")

CHILD = r"""
import json, resource, struct, sys, zlib, time
import numpy as np
from detector_core.sources.images import decode_image
from detector_core.sources.provenance import read_evidence

def rss(): return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
path = sys.argv[1]
r0 = rss()
with open(path, "rb") as f:  # as a decode task holds an object: its bytes, read whole
    data = f.read()
r1 = rss()
t0 = time.perf_counter()
ev = read_evidence(data)
t1 = time.perf_counter()
try:
    im = decode_image(data, draft_size=448)
    decoded, err = True, None
except Exception as exc:
    decoded, err = False, f"{type(exc).__name__}: {str(exc)[:120]}"
t2 = time.perf_counter()
print(json.dumps({"file_bytes": len(data), "rss_start": r0, "rss_with_bytes": r1, "rss_peak": rss(),
                  "evidence_s": round(t1 - t0, 3), "decode_s": round(t2 - t1, 3), "decoded": decoded, "decode_error": err,
                  "declared": ev.declared, "evidence_error": ev.error}))
"""


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def build(case: str, max_bytes: int) -> bytes:
    """A PNG of about ``max_bytes`` bytes for ``case`` (see the module docstring)."""
    import io

    import numpy as np
    from PIL import Image

    from detector_core.sources.provenance import MAX_TEXT_BYTES

    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (512, 512, 3), dtype=np.uint8)).save(buf, "PNG")
    png = buf.getvalue()
    head, tail = png[:33], png[33:]
    params = _chunk(b"tEXt", b"parameters\x00a cat\nSteps: 20, Sampler: Euler, Seed: 1, Model: sd_xl_base_1.0")
    room = max_bytes - len(png) - len(params)
    parts = [head, params]
    if case == "plain":
        parts.append(_chunk(b"tEXt", b"pad\x00" + b"p" * (room - 16)))
    elif case == "text_chunks":  # distinct keywords: a reader that keeps each chunk's text keeps them all
        body = b"t" * (MAX_TEXT_BYTES - 32)
        n = room // (len(body) + 32)
        parts.extend(_chunk(b"tEXt", b"k%d\x00" % i + body) for i in range(n))
    elif case == "ztxt_many":
        packed = zlib.compress(b"z" * MAX_TEXT_BYTES, 9)
        n = room // (len(packed) + 32)
        parts.extend(_chunk(b"zTXt", b"k%d\x00\x00" % i + packed) for i in range(n))
    elif case == "ztxt_one":  # 4 GiB of text in ~4 MB, then padding
        deflate = zlib.compressobj(9)
        zeros = b"\0" * (1 << 20)
        body = b"".join(deflate.compress(zeros) for _ in range(4096)) + deflate.flush()
        parts.append(_chunk(b"zTXt", b"k\x00\x00" + body))
        parts.append(_chunk(b"tEXt", b"pad\x00" + b"p" * max(0, room - len(body) - 32)))
    else:
        raise ValueError(case)
    return b"".join(parts) + tail


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-mb", type=int, default=64, help="file size, MB (the scan's --max-bytes default is 64 MiB)")
    ap.add_argument("--out", default="", help="write the results as JSON here")
    args = ap.parse_args(argv)
    rows = []
    folder = tempfile.mkdtemp(prefix="bench-worst-")
    for case in CASES:
        path = os.path.join(folder, f"{case}.png")
        with open(path, "wb") as f:
            f.write(build(case, args.max_mb << 20))
        done = subprocess.run([sys.executable, "-c", CHILD, path], capture_output=True, text=True, check=True)
        os.remove(path)
        row = {"case": case, **json.loads(done.stdout.strip().splitlines()[-1])}
        row["peak_over_bytes_mb"] = round((row["rss_peak"] - row["rss_with_bytes"]) / 2**20, 1)
        row["peak_mb"] = round(row["rss_peak"] / 2**20, 1)
        rows.append(row)
        print(f"{case:12s} file {row['file_bytes'] / 2**20:6.1f} MB  peak RSS {row['peak_mb']:7.1f} MB "
              f"(+{row['peak_over_bytes_mb']:6.1f} MB over holding the bytes)  decoded={row['decoded']}  declared={row['declared']}  "
              f"evidence {row['evidence_s']} s, decode {row['decode_s']} s")
    result = {"machine": platform.processor() or platform.machine(), "python": sys.version.split()[0], "max_mb": args.max_mb,
              "cases": rows}
    if args.out:
        write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
