"""What the provenance readers cost a scan: per object against the decode, with and without evidence; the watermark per megapixel.

    python -m bench.bench_provenance --photos 60 --out bench/results/bench_provenance-cpu2-2026-12-06.json

Photos are noisy 2048x1536 JPEGs (q90, ~1.5 MB) with a camera's EXIF block and no evidence;
the evidence cases are the same photos signed with C2PA (``c2pa.Builder``, a test CA made
here), with an XMP DigitalSourceType packet, and PNGs with an Automatic1111 ``parameters``
chunk. For each: the median time of ``detector_core.sources.provenance.read_evidence`` per object
(one core), next to the scan's decode of the same bytes (``decode_image`` with the CLIP
path's draft size, 448, and in full). The watermark decoder (``with_watermark``: the three
SD/SDXL patterns) is timed at 1, 4 and 12 megapixels. ``make_test_ca`` and ``sign`` are
also what ``tests/test_provenance.py`` signs with.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import os
import platform
import statistics
import time

import numpy as np

from jobs.common.outputs import write_json

IPTC = "http://cv.iptc.org/newscodes/digitalsourcetype/"


def make_test_ca() -> tuple[str, str, str]:
    """A test root CA and a C2PA signer certificate under it, made with ``cryptography``: (root PEM, signer chain PEM, key PEM)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    def name(cn):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn), x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Test Org")])

    def usage(sign: bool):
        return x509.KeyUsage(digital_signature=sign, content_commitment=False, key_encipherment=False, data_encipherment=False,
                             key_agreement=False, key_cert_sign=not sign, crl_sign=not sign, encipher_only=False, decipher_only=False)

    now = dt.datetime.now(dt.timezone.utc)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())

    def cert(subject, public, is_ca):
        b = (x509.CertificateBuilder().subject_name(subject).issuer_name(name("Test Root CA")).public_key(public)
             .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(days=1))
             .not_valid_after(now + dt.timedelta(days=30))
             .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
             .add_extension(usage(not is_ca), critical=True)
             .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False))
        if not is_ca:  # what C2PA asks of a signer: digitalSignature, an EKU, the issuer's key id
            b = (b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False)
                 .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False))
        return b.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()

    root = cert(name("Test Root CA"), ca_key.public_key(), True)
    leaf = cert(name("Test Signer"), key.public_key(), False)
    pem_key = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode()
    return root, leaf + root, pem_key


def sign(ca: tuple[str, str, str], data: bytes, mime: str, source_type: str, agent: str = "DiffuGen 2") -> bytes:
    """``data`` with a C2PA manifest signed by ``ca``'s signer: one ``c2pa.created`` action of IPTC ``source_type``."""
    import c2pa

    _, chain, key = ca
    manifest = {"claim_generator_info": [{"name": "TestTool", "version": "1.0"}], "title": "x",
                "assertions": [{"label": "c2pa.actions", "data": {"actions": [
                    {"action": "c2pa.created", "digitalSourceType": IPTC + source_type, "softwareAgent": {"name": agent}}]}}]}
    signer = c2pa.Signer.from_info(c2pa.C2paSignerInfo(c2pa.C2paSigningAlg.ES256, chain.encode(), key.encode(), None))
    out = io.BytesIO()
    with c2pa.Builder(json.dumps(manifest)) as builder:
        builder.sign(signer, mime, io.BytesIO(data), out)
    return out.getvalue()


def _photos(n: int, seed: int = 0) -> list[np.ndarray]:
    from detector_core.demo import make_image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        im = np.asarray(make_image(rng, size=(1536, 2048)), dtype=np.float64)
        out.append(np.clip(im + rng.normal(0, 18, im.shape), 0, 255).astype(np.uint8))
    return out


def _median_ms(fn, items, repeat: int = 1) -> float:
    times = []
    for x in items:
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn(x)
            times.append((time.perf_counter() - t0) * 1000)
    return round(statistics.median(times), 3)


def main(argv=None) -> dict:
    from PIL import Image, PngImagePlugin

    from detector_core.sources.images import decode_image
    from detector_core.sources.provenance import read_evidence
    from detector_core.sources.watermark import with_watermark

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--photos", type=int, default=60, help="photos per case")
    ap.add_argument("--out", default="", help="write the results as JSON here")
    args = ap.parse_args(argv)
    pixels = _photos(max(4, args.photos // 4))
    exif = Image.Exif()
    exif[0x010F], exif[0x0110], exif[0x0131] = "Camera Maker", "Model 7", "Camera Firmware 2.1"

    def jpeg(px, **kw) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(px).save(buf, "JPEG", quality=90, **kw)
        return buf.getvalue()

    plain = [jpeg(pixels[i % len(pixels)], exif=exif) for i in range(args.photos)]
    ca = make_test_ca()
    signed = [sign(ca, b, "image/jpeg", "trainedAlgorithmicMedia") for b in plain[: max(4, args.photos // 4)]]
    xmp_packet = (f'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
                  f'<rdf:Description xmlns:Iptc4xmpExt="http://iptc.org/std/Iptc4xmpExt/2008-02-29/" '
                  f'Iptc4xmpExt:DigitalSourceType="{IPTC}trainedAlgorithmicMedia"/></rdf:RDF></x:xmpmeta>').encode()
    xmp = [jpeg(pixels[i % len(pixels)], xmp=xmp_packet) for i in range(max(4, args.photos // 4))]
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a photo\nSteps: 30, Sampler: DPM++ 2M, Model: sdxl_base")
    pngs = []
    for px in pixels[:4]:
        buf = io.BytesIO()
        Image.fromarray(px).save(buf, "PNG", pnginfo=info)
        pngs.append(buf.getvalue())
    root = ca[0]
    res = {"bench": "bench_provenance", "date": dt.date.today().isoformat(), "machine": f"{platform.machine()} {os.cpu_count()} cpus",
           "photo": "2048x1536 JPEG q90, camera EXIF", "photo_kb": round(statistics.mean(map(len, plain)) / 1e3, 1), "cases": {}}
    for case, items in (("no evidence (JPEG photo)", plain), ("C2PA signed, trusted", signed), ("C2PA signed, no trust list", signed),
                        ("XMP DigitalSourceType", xmp), ("PNG A1111 chunk", pngs)):
        trust = root if case.endswith("trusted") else None
        evidence_ms = _median_ms(lambda b: read_evidence(b, trust), items)
        draft_ms = _median_ms(lambda b: decode_image(b, draft_size=448), items)
        full_ms = _median_ms(lambda b: decode_image(b), items[:4])
        res["cases"][case] = {"objects": len(items), "evidence_ms": evidence_ms, "decode_draft448_ms": draft_ms, "decode_full_ms": full_ms,
                              "evidence_over_draft_decode": round(evidence_ms / draft_ms, 4),
                              "declared": read_evidence(items[0], trust).declared}
    wm = {}
    for mp, (h, w) in ((1, (864, 1152)), (4, (1728, 2304)), (12, (3000, 4000))):
        px = np.ascontiguousarray(np.resize(pixels[0], (h, w, 3)))
        wm[f"{mp}MP"] = _median_ms(lambda p: with_watermark(read_evidence(b""), p), [px], repeat=3)
    res["watermark_ms"] = wm
    res["watermark_ms_per_megapixel"] = round(wm["12MP"] / 12, 1)
    print(json.dumps(res, indent=1))
    if args.out:
        write_json(args.out, res)
    return res


if __name__ == "__main__":
    main()
