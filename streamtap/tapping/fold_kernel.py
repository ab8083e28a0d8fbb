"""The CPU fold of one batch into the summaries' state, compiled with numba where it is installed.

A summary touches every activation of every neuron of every token (75 M values in a 2,048-token GPT-2
batch), so a pass per statistic (the numpy fold, ``streamtap.tapping.summarise``'s fallback) costs a good
share of the forward. Here components are walked in blocks of ``BLOCK`` and tokens in tiles of ``TILE``:
a tile is read from memory once, by the vectorised statistics, and then, from cache, takes its sketch
buckets (a vectorised logarithm, checked against the exact bucket edges where it lands within its
error of one), its histogram increments (each component's histogram rows stay in cache for the tile)
and, only where some value beats a component's k-th kept one, the top-k update with the token's
context. Column ranges run on threads (the kernel releases the GIL). Results are the numpy twin's
(``streamtap.io.summaries``): the same buckets exactly (:func:`streamtap.io.summaries.bucket_edges`),
float64 sums, Chan's merge. Measurements: docs/benchmarks.md, "Summaries".

``pip install numba`` (the ``fast`` extra) enables it; without numba the fold is numpy's.
"""

from __future__ import annotations

import functools
import math
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..io import summaries as S

with warnings.catch_warnings():   # numba imports scipy, which adds global warning filters: the host's stay
    try:
        import numba
    except ImportError:   # the optional extra: the numpy fold stands in
        numba = None

AVAILABLE = numba is not None
BLOCK = 128
"""Components a block: the used buckets of their histogram rows (a few KiB each) stay in a core's L2."""
TILE = 256
"""Tokens a tile: a tile of a block (128 KiB in float32) is read from memory once."""
LN_ERROR = 1e-10
"""A bound on the vectorised ln|x|'s error (the series' remainder 2 t^13 / 13 < 2e-11, rounding 1e-13):
a value within ``LN_ERROR / ln gamma + 1e-9`` buckets of an edge is bucketed by the exact edges."""


def _jit(function):
    """numba's compiled ``function``, cached on disk where numba finds a writable place (else compiled
    once per process); the plain function where numba is missing."""
    if not AVAILABLE:
        return function
    options = dict(nogil=True, boundscheck=False, error_model="numpy")
    try:
        return numba.njit(cache=True, **options)(function)
    except RuntimeError:   # "no locator available": a read-only install and no user cache directory
        return numba.njit(**options)(function)


@_jit
def _stats(x, t0, tb, b0, cb, first, s1, s2, lo, hi, kmin, hits, rows_hit):
    """Sums (shifted by each component's first token), min and max of a tile; ``hits[i, c]`` is 1 where
    the value beats component c's k-th kept value, ``rows_hit[i]`` > 0 where some value of row i does."""
    for i in range(tb):
        row = x[t0 + i, b0:b0 + cb]
        hit_row = hits[i]
        hit = 0
        for c in range(cb):
            v = np.float64(row[c])
            y = v - first[c]     # sum(y^2) - sum(y)^2/T stays exact enough with the shift
            s1[c] += y
            s2[c] += y * y
            lo[c] = min(lo[c], v)
            hi[c] = max(hi[c], v)
            b = v > kmin[c]
            hit_row[c] = b
            hit |= b
        rows_hit[i] = hit


@_jit
def _buckets(bits, t0, tb, b0, cb, n, ln_low, inv_ln_gamma, margin, index):
    """Each value's bucket into ``index`` (tile row, component) from its float32 bits: ln|x| as
    exponent ln 2 + the atanh series of the mantissa (vectorised), then ``ceil((ln|x| - ln low) /
    ln gamma)``. Returns how many landed within ``margin`` of an edge (for :func:`_exact`)."""
    unsure = 0
    for i in range(tb):
        rb = bits[t0 + i, b0:b0 + cb]
        out = index[i]
        for c in range(cb):
            r = rb[c]
            u = r & 0x7FFFFFFF
            e = np.float64((u >> 23) - 127)
            m = 1.0 + np.float64(u & 0x7FFFFF) * (1.0 / 8388608.0)
            big = m > 1.4142135623730951
            m = m * 0.5 if big else m
            e = e + 1.0 if big else e
            t = (m - 1.0) / (m + 1.0)     # |t| < 0.172: ln m = 2 atanh t, to t^11 within 2e-11
            t2 = t * t
            p = 1.0 / 11.0
            p = p * t2 + 1.0 / 9.0
            p = p * t2 + 1.0 / 7.0
            p = p * t2 + 1.0 / 5.0
            p = p * t2 + 1.0 / 3.0
            p = p * t2 + 1.0
            q = (e * 0.6931471805599453 + 2.0 * t * p - ln_low) * inv_ln_gamma
            qc = np.ceil(q)
            unsure += (qc - q < margin) | (q - qc + 1.0 < margin)
            j = np.int64(min(max(qc, 0.0), np.float64(n)))
            out[c] = n - j if r < 0 else n + j
    return unsure


@_jit
def _exact(x, t0, tb, b0, cb, n, edges, index):
    """Move each bucket in ``index`` that the edges disagree with to the bucket they give."""
    for i in range(tb):
        row = x[t0 + i, b0:b0 + cb]
        out = index[i]
        for c in range(cb):
            v = np.float64(row[c])
            mag = abs(v)
            j = abs(np.int64(out[c]) - n)
            if (j < n and mag >= edges[j + 1]) or mag < edges[j]:
                while j < n and mag >= edges[j + 1]:
                    j += 1
                while j > 0 and mag < edges[j]:
                    j -= 1
                out[c] = n - j if v < 0 else n + j


@_jit
def _scatter(hist, row0, cb, tb, index):
    """Histogram increments, component by component (its row stays in L1 for the tile)."""
    for c in range(cb):
        h = hist[row0 + c]
        for i in range(tb):
            h[index[i, c]] += 1


@_jit
def _top(x, t0, tb, b0, row0, hits, rows_hit, kmin, kslot, top_value, seq, pos, windows, top_seq, top_pos,
         top_window):
    """Where ``hits`` says a value beat the k-th kept one (read 8 components a word: early in a corpus
    many do, later few), it takes that slot if it still does, with its token's sequence, position and
    window; the kept k are a set in no order."""
    k = top_value.shape[1]
    for i in range(tb):
        if not rows_hit[i]:
            continue
        row = x[t0 + i, b0:]
        words = hits[i].view(np.uint64)
        t = t0 + i
        for w in range(words.shape[0]):
            if words[w] == 0:
                continue
            for c in range(8 * w, 8 * w + 8):
                v = np.float64(row[c]) if hits[i, c] else -np.inf
                if v > kmin[c]:   # the k-th kept may have risen since the tile's statistics
                    r, s = row0 + c, kslot[c]
                    top_value[r, s] = v
                    top_seq[r, s] = seq[t]
                    top_pos[r, s] = pos[t]
                    top_window[r, s, :] = windows[t]
                    m = 0
                    for q in range(1, k):
                        if top_value[r, q] < top_value[r, m]:
                            m = q
                    kmin[c], kslot[c] = top_value[r, m], m


@_jit
def _columns(x, bits, exact_bits, c0, c1, at, ln_low, inv_ln_gamma, margin, edges, n, count, mean, m2, vmin, vmax,
             hist, top_value, seq, pos, windows, top_seq, top_pos, top_window):
    """Fold columns ``c0 .. c1`` of ``x`` (token, component) into state rows ``at + c0 ..``.
    ``exact_bits``: ``bits`` are ``x``'s own float32 bits (else a rounded copy's: every bucket is
    checked against the edges)."""
    T = x.shape[0]
    k = top_value.shape[1]
    sketch = hist.shape[1] > 0   # none: neurons without neuron_quantiles
    s1, s2 = np.empty(BLOCK), np.empty(BLOCK)
    lo, hi, first = np.empty(BLOCK), np.empty(BLOCK), np.empty(BLOCK)
    kmin, kslot = np.empty(BLOCK), np.empty(BLOCK, np.int64)
    hits = np.zeros((TILE, BLOCK), np.uint8)   # BLOCK a multiple of 8: each row is whole words
    rows_hit = np.empty(TILE, np.uint8)
    index = np.empty((TILE, BLOCK), np.int32)
    for b0 in range(c0, c1, BLOCK):
        cb = min(BLOCK, c1 - b0)
        row0 = at + b0
        hits[:, cb:] = 0   # past a last, partial block: never hit
        for c in range(cb):
            f = np.float64(x[0, b0 + c])
            first[c], s1[c], s2[c], lo[c], hi[c] = f, 0.0, 0.0, f, f
            m = 0
            for q in range(1, k):
                if top_value[row0 + c, q] < top_value[row0 + c, m]:
                    m = q
            kmin[c], kslot[c] = top_value[row0 + c, m], m
        for t0 in range(0, T, TILE):
            tb = min(TILE, T - t0)
            _stats(x, t0, tb, b0, cb, first, s1, s2, lo, hi, kmin, hits, rows_hit)
            if sketch:
                unsure = _buckets(bits, t0, tb, b0, cb, n, ln_low, inv_ln_gamma, margin, index)
                if unsure or not exact_bits:
                    _exact(x, t0, tb, b0, cb, n, edges, index)
                _scatter(hist, row0, cb, tb, index)
            _top(x, t0, tb, b0, row0, hits, rows_hit, kmin, kslot, top_value, seq, pos, windows, top_seq, top_pos,
                 top_window)
        for c in range(cb):   # Chan's merge of the batch into the kept statistics
            r = row0 + c
            mean_b = first[c] + s1[c] / T
            m2_b = max(s2[c] - s1[c] * s1[c] / T, 0.0)
            na = np.float64(count[r])
            nn = na + T
            delta = mean_b - mean[r]
            mean[r] += delta * (T / nn)
            m2[r] += m2_b + delta * delta * (na * T / nn)
            count[r] += T
            vmin[r] = min(vmin[r], lo[c])
            vmax[r] = max(vmax[r], hi[c])


@functools.lru_cache(maxsize=8)
def _edges(settings: S.Settings) -> np.ndarray:
    return np.append(S.bucket_edges(settings), np.inf)   # + inf: no bucket past the last


def usable(settings: S.Settings) -> bool:
    """numba is installed and the settings' lowest magnitude is a normal float32 (the logarithm reads
    the float32 exponent; anything below ``low`` is bucket 0 whatever it reads there)."""
    return AVAILABLE and settings.low >= float(np.finfo(np.float32).tiny)


def fold(x: np.ndarray, state: dict[str, np.ndarray], at: int, settings: S.Settings, threads: int,
         context: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    """Fold ``x`` (token, component), float32 or float64, C-contiguous, into rows ``at ..`` of the numpy
    views of a group's ``state``; ``context``: each token's sequence, position and window (token, 2w + 1),
    int64, which a kept top-k slot the token takes records. ``threads`` split the components."""
    T, C = x.shape
    if T == 0 or C == 0:
        return
    if x.dtype == np.float32:
        bits, exact_bits = x.view(np.int32), True
    elif not state["hist"].shape[1]:   # no sketch: the bits are not read
        bits, exact_bits = np.empty((0, 0), np.int32), True
    else:   # a float64's rounded bits only guess its bucket: the edges decide every one
        big = np.finfo(np.float32).max
        bits, exact_bits = np.clip(x, -big, big).astype(np.float32).view(np.int32), False
    inv_ln_gamma = 1.0 / math.log(settings.gamma)
    args = (at, math.log(settings.low), inv_ln_gamma, LN_ERROR * inv_ln_gamma + 1e-9, _edges(settings), settings.n_side,
            *(state[k] for k in ("count", "mean", "m2", "min", "max", "hist", "top_value")), *context,
            *(state[k] for k in ("top_seq", "top_pos", "top_window")))
    parts = max(1, min(threads, -(-C // BLOCK)))
    step = -(-C // parts // BLOCK) * BLOCK
    if parts == 1:
        _columns(x, bits, exact_bits, 0, C, *args)
    else:
        with ThreadPoolExecutor(parts) as pool:
            for done in [pool.submit(_columns, x, bits, exact_bits, c, min(c + step, C), *args)
                         for c in range(0, C, step)]:
                done.result()


__all__ = ["AVAILABLE", "fold", "usable"]
