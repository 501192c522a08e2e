"""The precision sample: a seeded random sample of a night's flagged rows, stratified by score band, in a fixed order.

Reviewers who work down a queue sorted by score judge the easiest flags first, so the
share of confirmed images among whatever they reviewed (the *convenience* figure) says
little about the threshold. ``draw_sample`` takes the night's flagged rows of one detector,
cuts them into ``strata`` equal-count score bands (0 = the highest scores), draws from each
band in proportion to its size (largest remainders, so the sizes add up to ``n``) without
replacement, and shuffles the drawn rows into one review order; everything comes from one
seed (``night_seed``: the date, the detector and a user seed), so the same night always
gives the same sample. A prefix of that order is itself close to a stratified sample, so
a sample reviewed only partly still estimates without bias (``query precision`` weights
each band's confirmed share by ``N_h / N``). ``sample_size`` is the ``n`` for a 95 %
interval of ± ``margin`` at the worst case p = 0.5: 385 for ±5 points.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pyarrow as pa

from detector_core import schema as S
from detector_core.method.metrics import Z95

__all__ = ["DEFAULT_MARGIN", "DEFAULT_STRATA", "draw_sample", "night_seed", "sample_size"]

DEFAULT_MARGIN = 0.05
DEFAULT_STRATA = 4


def sample_size(margin: float = DEFAULT_MARGIN, z: float = Z95) -> int:
    """Reviewed rows a 95 % interval of ± ``margin`` needs at p = 0.5 (the widest): ceil(z² / (4 margin²))."""
    if not 0 < margin < 0.5:
        raise ValueError(f"margin must be in (0, 0.5), got {margin}")
    return math.ceil(z * z / (4 * margin * margin))


def night_seed(scan_date: str, detector_id: str, seed: int = 0) -> int:
    """The seed of one night's draw for one detector (a non-negative int64)."""
    digest = hashlib.sha256(f"{scan_date}|{detector_id}|{seed}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def _allocate(sizes: np.ndarray, n: int) -> np.ndarray:
    """``n`` split over strata of ``sizes`` in proportion (largest remainders), never more than a stratum holds."""
    quota = n * sizes / sizes.sum()
    take = np.floor(quota).astype(np.int64)
    for h in np.argsort(-(quota - take), kind="stable")[: n - int(take.sum())]:
        take[h] += 1
    return np.minimum(take, sizes)


def draw_sample(flagged: pa.Table, n: int, strata: int, seed: int) -> pa.Table:
    """The sample of ``flagged`` (one night and detector: ``uri``, ``scan_id``, ``score`` and any other columns).

    Returns the drawn rows with ``stratum``, ``stratum_low``/``stratum_high`` (its score
    band), ``stratum_flagged`` (N_h), ``night_flagged`` (N), ``sample_size`` (n) and
    ``sample_order`` (1 = first to review), in that order. All rows when ``n >= N``.
    """
    N = flagged.num_rows
    if N == 0 or n <= 0:
        out = flagged.schema.empty_table()
        for name in (S.STRATUM, S.STRATUM_LOW, S.STRATUM_HIGH, S.STRATUM_FLAGGED, S.NIGHT_FLAGGED, S.SAMPLE_SIZE, S.SAMPLE_ORDER):
            out = out.append_column(name, pa.array([], S.TYPES[name]))
        return out
    ranked = flagged.sort_by([(S.SCORE, "descending"), (S.URI, "ascending"), (S.SCAN_ID, "ascending")])
    k = max(1, min(strata, N))
    stratum = (np.arange(N) * k) // N  # equal-count bands by rank: ties in score cannot make a band empty
    sizes = np.bincount(stratum, minlength=k)
    take = _allocate(sizes, min(n, N))
    rng = np.random.default_rng(seed)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    picked = np.concatenate([starts[h] + rng.choice(sizes[h], size=take[h], replace=False) for h in range(k)])
    order = rng.permutation(picked.size)
    rows = picked[order]
    scores = ranked[S.SCORE].to_numpy()
    low = np.array([scores[starts[h] + sizes[h] - 1] for h in range(k)])
    high = np.array([scores[starts[h]] for h in range(k)])
    st = stratum[rows]
    out = ranked.take(pa.array(rows))
    extra = {S.STRATUM: st, S.STRATUM_LOW: low[st], S.STRATUM_HIGH: high[st], S.STRATUM_FLAGGED: sizes[st],
             S.NIGHT_FLAGGED: np.full(rows.size, N), S.SAMPLE_SIZE: np.full(rows.size, rows.size),
             S.SAMPLE_ORDER: np.arange(1, rows.size + 1)}
    for name, values in extra.items():
        out = out.append_column(name, pa.array(values).cast(S.TYPES[name]))
    return out
