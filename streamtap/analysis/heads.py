"""What each head's pattern does, scored over the stored text: sinks and switched-off heads,
previous-token, duplicate-token and induction heads, and whether a head's W_QK map predicts its scores.

Every score is an average over the stored queries of attention mass on a set of keys defined by the
tokens alone (docs/analysis.md, "Heads"):

- **sink mass**: on the sink position (``sink``, the first token by default), over queries after it;
- **previous token**: on the key right before the query;
- **duplicate token**: on earlier keys with the query's own token id, over queries that have one;
- **induction**: on the keys right after an earlier occurrence of the query's token (A B ... A -> B),
  over queries that have one.

A head that parks its attention on a sink whose source message is small adds almost nothing at that
query: it is **off** there. ``off`` is the share of queries where the sink mass reaches ``off_mass``
and the sink's message is below ``off_norm`` times the head's typical (median) source message.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from ..attention import Attention, sequence_attention


def _masks(ids: np.ndarray, pos: np.ndarray):
    """(previous, duplicate, induction) key masks (query, key) of one sequence in position order."""
    earlier = pos[None, :] < pos[:, None]
    same = ids[:, None] == ids[None, :]
    previous = pos[None, :] == pos[:, None] - 1
    duplicate = same & earlier
    # the key right after an earlier occurrence of the query's token, itself no later than the query
    after = np.zeros_like(same)
    after[:, 1:] = duplicate[:, :-1]
    induction = after & (pos[None, :] <= pos[:, None])
    return previous, duplicate, induction


def head_scores(ds: xr.Dataset, *, seqs=None, layers=None, sink: int = 0, off_mass: float = 0.8,
                off_norm: float = 0.1, dtype=np.float64) -> xr.Dataset:
    """Every head's routing scores over the stored sequences: Dataset (layer, head).

    Parameters
    ----------
    ds : xarray.Dataset
        A store captured with ``patterns=True``.
    seqs : sequence of int, optional
        The sequences to score (default: all).
    layers : sequence of int, optional
        The layers to score (default: all).
    sink : int
        The sink's position in each sequence.
    off_mass, off_norm : float
        A head is off at a query where its mass on the sink reaches ``off_mass`` while the sink's
        source message is below ``off_norm`` times the head's median source message.
    dtype : numpy dtype

    Returns
    -------
    xarray.Dataset
        (layer, head): ``sink_mass``, ``sink_message`` (the sink's source-message norm over the
        head's median), ``off``, ``previous_token``, ``duplicate_token``, ``induction``, and the
        number of queries each average is over (``*_queries``, per layer and head alike).

    Raises
    ------
    PatternsMissingError
        The store was captured without patterns (``--patterns``).
    """
    att = Attention(ds, dtype)
    layer_ids = np.arange(ds.sizes["layer"]) if layers is None else np.atleast_1d(np.asarray(layers, int))
    where = {int(layer): i for i, layer in enumerate(layer_ids)}
    L, H = len(layer_ids), ds.sizes["head"]
    names = ("sink_mass", "sink_message", "off", "previous_token", "duplicate_token", "induction")
    sums = {n: np.zeros((L, H)) for n in names}
    counts = {n: np.zeros(L) for n in names}
    W_O = att.W_O
    for _, layer, one in sequence_attention(ds, seqs, layer_ids, dtype=dtype, att=att):
        i, hs = where[layer], one.heads
        first_block = hs[0] == 0                                          # counts are per layer: once
        A = one.pattern                                                   # (heads of the block, query, key)
        previous, duplicate, induction = _masks(one.ids, one.pos)
        for name, mask in (("previous_token", previous), ("duplicate_token", duplicate), ("induction", induction)):
            rows = mask.any(-1)
            sums[name][i, hs] += (A[:, rows] * mask[rows]).sum((-1, -2))
            counts[name][i] += rows.sum() if first_block else 0
        at_sink = np.flatnonzero(one.pos == sink)
        if at_sink.size == 0:
            continue
        j = int(at_sink[0])
        later = one.pos > sink
        mass = A[:, later, j]                                             # (head, queries after the sink)
        norms = np.linalg.norm(np.einsum("khe,hem->khm", one.v[:, att.kv[hs]], W_O[layer][hs], optimize=True),
                               axis=-1)
        rest = np.delete(norms, j, axis=0)
        typical = np.median(rest, axis=0) if rest.size else np.ones(len(hs))
        relative = norms[j] / np.where(typical > 0, typical, 1)           # (head,)
        sums["sink_mass"][i, hs] += mass.sum(-1)
        sums["off"][i, hs] += ((mass >= off_mass) & (relative < off_norm)[:, None]).sum(-1)
        sums["sink_message"][i, hs] += relative
        if first_block:
            counts["sink_mass"][i] += later.sum()
            counts["off"][i] += later.sum()
            counts["sink_message"][i] += 1
    data = {n: (("layer", "head"), sums[n] / np.maximum(counts[n], 1)[:, None]) for n in names}
    data.update({f"{n}_queries": (("layer",), counts[n].astype(np.int64)) for n in names})
    return xr.Dataset(data, coords={"layer": layer_ids, "head": np.arange(H)}, attrs={
        "sink": sink, "off_mass": off_mass, "off_norm": off_norm,
        "note": "mean attention mass over the stored queries on: the sink (sink_mass), the previous token, "
                "earlier copies of the query's token (duplicate_token), the tokens after earlier copies "
                "(induction); off: share of queries parked on a sink with a small message"})


def qk_agreement(ds: xr.Dataset, *, seqs=None, layers=None, dtype=np.float64) -> xr.Dataset:
    """Whether each head's position-free W_QK map predicts the scores it really computes on the stored
    text: Dataset (layer, head) of ``correlation`` (Pearson, over every visible (query, key) pair,
    the query itself and the first token left out) and ``pairs``.

    The map scores two tokens by their embeddings alone, ``scale * (attn_norm(e_i) W_Q) . (attn_norm(e_j) W_K)``
    (the attention's input norm, biases, q/k norms and clip kept; rotation and context left out); the
    real score is the one the head
    computed in context. A high correlation says the head routes by token identity; a low one that
    context or position decides.

    Parameters
    ----------
    ds : xarray.Dataset
        A store captured with ``patterns=True``.
    seqs, layers : sequence of int, optional
        Which (default: all).
    dtype : numpy dtype

    Returns
    -------
    xarray.Dataset
        (layer, head): ``correlation`` and ``pairs``.
    """
    from ._store import embedding_matrix, local

    att = Attention(ds, dtype)
    layer_ids = np.arange(ds.sizes["layer"]) if layers is None else np.atleast_1d(np.asarray(layers, int))
    where = {int(layer): i for i, layer in enumerate(layer_ids)}
    H = ds.sizes["head"]
    E = embedding_matrix(ds)
    stats = np.zeros((len(layer_ids), H, 6))          # n, sx, sy, sxx, syy, sxy per head
    for _, layer, one in sequence_attention(ds, seqs, layer_ids, dtype=dtype, att=att):
        rows = np.asarray(local(E.isel(vocab=one.ids)).values, dtype)  # this sequence's tokens' embeddings
        q, k, _ = att.qkv(layer, rows)
        hs = one.heads
        free = np.einsum("qhe,khe->hqk", q[:, hs], k[:, att.kv[hs]], optimize=True) * att.scale[layer]
        seen = np.isfinite(one.scores) & (one.pos[None, None, :] > 0) & (one.pos[None, :, None] != one.pos[None, None, :])
        for b, h in enumerate(hs):
            x, y = free[b][seen[b]], one.scores[b][seen[b]]
            stats[where[layer], h] += (x.size, x.sum(), y.sum(), (x * x).sum(), (y * y).sum(), (x * y).sum())
    n, sx, sy, sxx, syy, sxy = np.moveaxis(stats, -1, 0)
    cov = sxy / np.maximum(n, 1) - (sx / np.maximum(n, 1)) * (sy / np.maximum(n, 1))
    vx = sxx / np.maximum(n, 1) - (sx / np.maximum(n, 1)) ** 2
    vy = syy / np.maximum(n, 1) - (sy / np.maximum(n, 1)) ** 2
    corr = cov / np.sqrt(np.maximum(vx * vy, 1e-300))
    return xr.Dataset({"correlation": (("layer", "head"), np.where(n > 2, corr, np.nan)),
                       "pairs": (("layer", "head"), n.astype(np.int64))},
                      coords={"layer": layer_ids, "head": np.arange(H)},
                      attrs={"note": "Pearson correlation of the embedding-only W_QK score with the real score"})


__all__ = ["head_scores", "qk_agreement"]
