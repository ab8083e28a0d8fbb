"""MLP neurons as key-value memories: what activates a neuron (keys) and what it writes (values).

An MLP's output is sum_n act_n W_out[n] (+ bias): neuron n is a key (the inputs that activate it)
and a value (the vector W_out[n] it adds, scaled by its activation). The keys are read from the
stored activations: the stored tokens that activate the neuron most, found out of core with a
top-k over the token axis. The values are read through the final norm's gamma and the unembedding:
the vocabulary tokens W_out[n] promotes and suppresses directly.
"""

from __future__ import annotations

import re

import dask
import dask.array as da
import numpy as np
import xarray as xr

from ..errors import StreamtapError
from ._store import final_norm, local, require, static
from ._vocab import as_text, vocab_scan


def _parse(neurons) -> tuple[np.ndarray, np.ndarray]:
    """(layers, neuron indices) of ``(layer, index)`` pairs or ``"L3N12"`` labels; ``StreamtapError`` otherwise."""
    layers, idx = [], []
    for item in neurons:
        if isinstance(item, str):
            m = re.fullmatch(r"L(\d+)N(\d+)", item)
            if not m:
                raise StreamtapError(f"neuron labels read L<layer>N<index>, got {item!r}")
            item = (int(m.group(1)), int(m.group(2)))
        layers.append(int(item[0]))
        idx.append(int(item[1]))
    return np.array(layers), np.array(idx)


def neuron_memories(ds: xr.Dataset, neurons, *, k: int = 10, context: int = 6, dtype=np.float32) -> xr.Dataset:
    """Keys and values of chosen MLP neurons, computed.

    Keys: the stored tokens with the largest activation, found with an out-of-core top-k over the
    token axis. Values: the vocabulary tokens that W_out[n] raises and lowers most directly, per
    unit activation, through the final norm's gamma (and its centring for a LayerNorm).

    Parameters
    ----------
    ds : xarray.Dataset
        An opened store captured with ``neurons=True``, or a selection of its tokens.
    neurons : sequence of (int, int) or str
        ``[(layer, index), ...]`` or ``["L3N12", ...]``.
    k : int
        How many top tokens (at most the number of stored tokens) and how many promoted and
        suppressed vocabulary tokens to keep.
    context : int
        How many tokens of text, ending at each top token and within its sequence, ``top_context``
        shows (0: none).
    dtype : numpy dtype
        What activations and logits are computed in.

    Returns
    -------
    xarray.Dataset
        Keys over (sel, rank), largest activation first: ``top_activation``, ``top_token`` (the
        store row), ``top_token_id``, ``top_seq``, ``top_pos``, and where the store has text
        ``top_text`` and ``top_context``. Values over (sel, vocab_rank): ``promoted_id``/
        ``promoted_logit`` and ``suppressed_id``/``suppressed_logit``. ``sel`` carries ``label``,
        ``layer`` and ``neuron``. Attribute ``note``.

    Raises
    ------
    MissingWeightsError
        The store has no ``neuron_act``, ``W_out`` or ``W_U``.
    StreamtapError
        No neurons, or a label that does not read ``L<layer>N<index>``.
    """
    require(ds, "neuron_act", "W_out", "W_U")
    layers, idx = _parse(neurons)
    if layers.size == 0:
        raise StreamtapError("no neurons given")
    n_tok = ds.sizes["token"]
    k_tok = min(int(k), n_tok)
    act = ds["neuron_act"].isel(layer=xr.DataArray(layers, dims="sel"), neuron=xr.DataArray(idx, dims="sel"))
    data = act.transpose("token", "sel").data
    data = data if isinstance(data, da.Array) else da.from_array(np.asarray(data))
    data = data.astype(dtype)
    top_val, top_idx = dask.compute(da.topk(data, k_tok, axis=0), da.argtopk(data, k_tok, axis=0))
    top_val, top_idx = top_val.T, top_idx.T                                       # (sel, rank), largest first
    flat = top_idx.reshape(-1)
    info = {c: np.asarray(local(ds[c].isel(token=flat)).values).reshape(top_idx.shape)
            for c in ("token_id", "seq", "pos", "text") if c in ds.coords}
    out = {"top_activation": (("sel", "rank"), top_val), "top_token": (("sel", "rank"), top_idx)}
    for c, v in info.items():
        out[f"top_{c}"] = (("sel", "rank"), as_text(v) if c == "text" else v)
    if "text" in ds.coords and context > 0:
        out["top_context"] = (("sel", "rank"), _contexts(ds, top_idx, context))
    # values: what W_out[n] writes, read through the final norm and the unembedding
    W_out = np.asarray(local(ds["W_out"].isel(layer=xr.DataArray(layers, dims="sel"),
                                              neuron=xr.DataArray(idx, dims="sel"))).values, dtype)
    rows = final_norm(ds, dtype).fold(W_out)
    res = vocab_scan(rows, static(ds, "W_U", dtype), None, k, bottom=True, probs=False)
    out.update({"promoted_id": (("sel", "vocab_rank"), res["top_id"]),
                "promoted_logit": (("sel", "vocab_rank"), res["top_logit"]),
                "suppressed_id": (("sel", "vocab_rank"), res["bottom_id"]),
                "suppressed_logit": (("sel", "vocab_rank"), res["bottom_logit"])})
    coords = {"label": ("sel", [f"L{l}N{n}" for l, n in zip(layers, idx)]), "layer": ("sel", layers),
              "neuron": ("sel", idx), "rank": np.arange(k_tok), "vocab_rank": np.arange(res["top_id"].shape[1])}
    return xr.Dataset(out, coords=coords, attrs={
        "note": "keys: stored tokens with the largest activation; values: direct logit effect of W_out[n]"})


def _contexts(ds: xr.Dataset, top_idx: np.ndarray, n: int) -> np.ndarray:
    """The text of up to ``n`` tokens ending at each store row of ``top_idx``, cut at its sequence's start."""
    flat = top_idx.reshape(-1)
    raw = flat[:, None] + np.arange(-n + 1, 1)[None]
    window = raw.clip(0, ds.sizes["token"] - 1)
    uniq, inv = np.unique(window, return_inverse=True)
    text = as_text(local(ds["text"].isel(token=uniq)).values)[inv].reshape(window.shape)
    seq = np.asarray(local(ds["seq"].isel(token=uniq)).values)[inv].reshape(window.shape)
    same = (seq == seq[:, -1:]) & (raw >= 0)
    out = ["".join(t for t, keep in zip(row, ok) if keep) for row, ok in zip(text, same)]
    return np.array(out, dtype=str).reshape(top_idx.shape)
