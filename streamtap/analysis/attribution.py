"""Direct logit attribution: each component's contribution to a token's logit (or a logit difference).

The final norm is affine once its per-token scale s is frozen: N(x) = gamma (x - mean x) s + beta,
with s a function of resid_final alone (recomputed exactly from the store). So the logit of token v,

    logit_v = N(resid_final) . W_U[v] + b_U[v] = sum_c s (x_c - mean x_c) . (gamma * W_U[v]) + beta . W_U[v] + b_U[v],

is a sum over the components x_c of decompose, plus two constants that are components of their own
(``final_norm_bias``, ``unembed_bias``). The contributions sum to the model's logit exactly.

The direction gamma * W_U[v] (centred for a LayerNorm) is carried backwards through the stream
(``streamtap.stream.directions``: through every norm inside the stream by its frozen adjoint), so a
head's contribution is z . (W_O w): one pass over the stored z, no message is materialised. Where no
norm acts inside the stream and one target is asked for, w is the same for every token and is folded
into W_O once per block.
"""

from __future__ import annotations

import dask.array as da
import numpy as np
import xarray as xr

from ..errors import StreamtapError
from ..invariant import component_coords, stream_events, store_norms
from ..stream import Embed, Labels, Piece, StreamNorm, block_norms, component_label, directions, replay
from ._blocks import (as_static_dask, float_dtype, norm_center, per_token, single_token, static_dask,
                      stream_inputs, token_coords, tokens_map)
from ._store import final_norm, local, logit_softcap, require, static
from ._vocab import target_ids


def final_norm_scale(ds: xr.Dataset, dtype=np.float32) -> xr.DataArray:
    """The final norm's per-token scale s, frozen: N(x) = gamma * (x - mean(x)) * s + beta.

    s = 1 / sqrt(var + eps) is a function of ``resid_final`` alone (the mean is subtracted only for
    a LayerNorm), so it is recomputed from the store exactly rather than stored.

    Parameters
    ----------
    ds : xarray.Dataset
        An opened store, or a selection of its tokens.
    dtype : numpy dtype
        What the scale is computed in.

    Returns
    -------
    xarray.DataArray
        ``final_norm_scale`` over ``token``, lazy where the store is.
    """
    resid = ds["resid_final"].astype(dtype)
    eps = float(ds.attrs["final_norm_eps"])
    if ds.attrs["final_norm_kind"] == "layernorm":
        var = ((resid - resid.mean("d_model")) ** 2).mean("d_model")
    else:
        var = (resid ** 2).mean("d_model")
    return (1 / np.sqrt(var + eps)).rename("final_norm_scale")


@single_token
def direct_logit_attribution(ds: xr.Dataset, token_id, *, foil=None, neurons: bool = False,
                             dtype=np.float32) -> xr.DataArray:
    """Each component's direct contribution to the logit of ``token_id`` at every stored token.

    Exact, not approximate: with the final norm's per-token scale frozen (``final_norm_scale``) the
    logit is linear in the residual terms, so the contributions sum to the model's logit. The
    target direction is carried backwards through the stream's norms and dotted with the stored
    ``z``, so no per-head message is materialised; one pass over the store's token chunks.

    Parameters
    ----------
    ds : xarray.Dataset
        An opened store (``streamtap.open``) or a selection of its tokens; a single token
        (``ds.isel(token=i)``) gives results without the ``token`` dim.
    token_id : int, str or array
        A vocabulary id, a token string the store can resolve (``token_ids``), or one id per
        stored token.
    foil : int, str or array, optional
        With a foil the contributions are to ``logit[token_id] - logit[foil]``.
    neurons : bool
        Split each MLP into its neurons (``L3N1234``) and ``L3_mlp_bias``; needs a store captured
        with ``neurons=True``.
    dtype : numpy dtype
        A float dtype the contributions are computed in.

    Returns
    -------
    xarray.DataArray
        ``logit_contribution``, lazy (component, token): decompose's components (with its
        ``kind``/``layer``/``head``/``neuron`` coordinates), then ``final_norm_bias`` and
        ``unembed_bias`` where the model has them; the store's per-token coordinates. The sum over
        component is the model's logit (difference), before any final soft-capping. Attributes
        ``target``, ``foil``, ``note`` and, for a soft-capping model, ``softcap``.

    Raises
    ------
    MissingWeightsError
        The store has no ``W_U`` (or, with ``neurons=True``, no ``neuron_act`` or ``W_out``).
    StreamtapError
        An id outside the vocabulary, a per-token array of the wrong length, or a token string
        that does not resolve to one token.
    """
    from ..invariant import _refuse_partial

    _refuse_partial(ds, "direct_logit_attribution over stored vectors (per head, per layer)",
                    "layers/heads/terms, or capture with project={...}: its projections hold the same "
                    "attribution with the left-out terms as one exact rest component")
    if "resid_final" not in ds and "projection" in ds:
        raise StreamtapError("this store holds projections only: its ds.projection is the attribution "
                             "(component x direction per token); capture with terms=... to attribute offline")
    require(ds, "W_U")
    dtype = float_dtype(dtype)
    n_tok = ds.sizes["token"]
    target, per_tok_t = target_ids(ds, token_id, n_tok, "token_id")
    foil_id, per_tok_f = target_ids(ds, foil, n_tok, "foil")
    if neurons:
        require(ds, "neuron_act", "W_out")
    per_tok = per_tok_t or per_tok_f
    # the directions table: the distinct rows of W_U involved, and per token which rows to use
    wanted = [np.atleast_1d(target)] + ([np.atleast_1d(foil_id)] if foil_id is not None else [])
    uniq = np.unique(np.concatenate(wanted))
    if uniq.size and (uniq.min() < 0 or uniq.max() >= ds.sizes["vocab"]):
        raise StreamtapError(f"token ids must be in 0..{ds.sizes['vocab'] - 1}")
    U = np.asarray(local(ds["W_U"].isel(vocab=uniq)).values, dtype=dtype)
    b_U = static(ds, "unembed_bias", dtype)[uniq] if "unembed_bias" in ds else None
    t_idx = np.searchsorted(uniq, target)
    f_idx = np.searchsorted(uniq, foil_id) if foil_id is not None else None
    attrs = {"target": _describe(target), "foil": _describe(foil_id) if foil_id is not None else "none",
             "note": "sum over component equals the model's logit"
                     + (" difference (target - foil)" if foil_id is not None else "")}
    cap = logit_softcap(ds)
    if cap:
        attrs["softcap"] = cap
        attrs["note"] += (f" before the model's final soft-capping (it reports cap * tanh(logit / cap), "
                          f"cap = {cap:g}; attribution is of the linear logit it caps)")
    events = stream_events(ds)
    labels = replay(events, store_norms(ds), lambda e: _pieces(ds, e, neurons), Labels(),
                    norm_labels=ds.attrs.get("norm_labels", ())).labels + _extras(ds)
    inputs, statics = stream_inputs(ds, dtype, mlp="neuron_act" if neurons else "mlp_out")
    for name in ("expert_out", "expert_index", "shared_expert_out"):
        if name in ds:
            inputs[name] = per_token(ds, name)
    statics["U"] = as_static_dask(U, ("row", "d_model"))
    if neurons:
        statics["W_out"] = static_dask(ds, "W_out", dtype)
    if per_tok:
        chunks = inputs["resid_final"].chunks[0]
        for name, idx in (("t_idx", t_idx), ("f_idx", f_idx)):
            if idx is not None:
                idx = np.broadcast_to(idx, (n_tok,)).astype(np.int64)
                inputs[name] = xr.DataArray(da.from_array(idx, chunks=(chunks,)), dims=("token",))
    data = tokens_map(_dla_block, ("token", "component"), {"component": len(labels)}, inputs, statics,
                      dtype=dtype, events=events, center=norm_center(ds), p=final_norm(ds, dtype), b_U=b_U,
                      t_idx=None if per_tok else int(t_idx), f_idx=None if (per_tok or f_idx is None) else int(f_idx),
                      has_foil=f_idx is not None, dt=dtype)
    coords = {**component_coords(labels), **token_coords(ds)}
    out = xr.DataArray(data, dims=("token", "component"), coords=coords).transpose("component", "token")
    return out.rename("logit_contribution").assign_attrs(attrs)


def _pieces(ds: xr.Dataset, e, neurons: bool):
    """The labels each event writes (data aside), in decompose's order."""
    if isinstance(e, Embed):
        return [Piece([component_label(e)])]
    if e.site == "attn":
        return [Piece([component_label(e, head=h) for h in range(ds.sizes["head"])]),
                Piece([component_label(e, part="attn_bias")])]
    if e.site == "mixer":
        return [Piece([component_label(e, part="mixer")])]
    if e.experts:
        pieces = [Piece([component_label(e, expert=x) for x in range(e.experts)])]
        return pieces + ([Piece([component_label(e, part="shared_expert")])] if e.shared else [])
    if neurons:
        return [Piece([component_label(e, neuron=n) for n in range(ds.sizes["neuron"])]),
                Piece([component_label(e, part="mlp_bias")])]
    return [Piece([component_label(e, part="mlp")])]


def _describe(ids) -> str:
    """The target as the result's attributes show it: the id, or ``"per token"``."""
    arr = np.asarray(ids)
    return str(int(arr)) if arr.ndim == 0 else "per token"


def _extras(ds: xr.Dataset) -> list[tuple]:
    """The labels of the constant components after decompose's: the final norm's and the unembedding's bias."""
    out = []
    if "final_norm_bias" in ds:
        out.append(("final_norm_bias", "final_norm_bias", -1, -1, -1))
    if "unembed_bias" in ds:
        out.append(("unembed_bias", "unembed_bias", -1, -1, -1))
    return out


def _dot(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """x (T, d) . w (T or 1, d) -> (T,)."""
    return x @ w[0] if w.shape[0] == 1 else np.einsum("td,td->t", x, w)


def _dot_constant(c: np.ndarray, w: np.ndarray, T: int) -> np.ndarray:
    """A constant c (d,) added at every one of T tokens, dotted with w (T or 1, d): (T,), without
    materialising the constant T times."""
    return np.broadcast_to(w @ c, (T,))


def _dla_block(b: dict, *, events, center, p, b_U, t_idx, f_idx, has_foil, dt) -> np.ndarray:
    """One token chunk: (token, component) contributions, in the order of the component labels."""
    resid = b["resid_final"].astype(dt, copy=False)
    T = resid.shape[0]
    s = p.scale(resid).astype(dt, copy=False)
    U = b["U"]
    if "t_idx" in b:  # one direction per token
        ti, fi = b["t_idx"], b.get("f_idx")
    else:
        ti = np.array([t_idx])
        fi = np.array([f_idx]) if has_foil else None
    u = U[ti] - U[fi] if fi is not None else U[ti]              # (T or 1, d)
    norms = block_norms(b, center)
    columns = []                                                  # per event, walking backwards
    for _, e, w_out, w_in in directions(events, norms, p.fold(u)):
        cols = []
        if isinstance(e, StreamNorm):
            if norms.has_beta(e.norm):
                cols.append(_dot_constant(norms.beta[e.norm], w_out, T)[:, None])
        elif isinstance(e, Embed):
            cols.append(_dot(b[e.var].astype(dt, copy=False), w_in)[:, None])
        elif e.site == "attn":
            z, W_O = b["z"][:, e.layer].astype(dt, copy=False), b["W_O"][e.layer]
            if w_in.shape[0] == 1:  # one direction for every token: fold it into W_O once
                cols.append(np.einsum("the,he->th", z, np.einsum("hem,m->he", W_O, w_in[0])))
            else:
                cols.append(np.einsum("the,hem,tm->th", z, W_O, w_in, optimize=True))
            cols.append(_dot_constant(b["attn_bias"][e.layer], w_in, T)[:, None])
        elif e.site == "mixer":
            cols.append(_dot(b["mixer_out"][:, e.layer].astype(dt, copy=False), w_in)[:, None])
        elif e.experts:
            out, index = b["expert_out"][:, e.layer].astype(dt, copy=False), b["expert_index"][:, e.layer]
            per_expert = np.zeros((T, e.experts), dt)
            for slot in range(out.shape[1]):
                np.add.at(per_expert, (np.arange(T), index[:, slot]), _dot(out[:, slot], w_in))
            cols.append(per_expert)
            if e.shared:
                cols.append(_dot(b["shared_expert_out"][:, e.layer].astype(dt, copy=False), w_in)[:, None])
        elif "neuron_act" in b:
            act, W_out = b["neuron_act"][:, e.layer].astype(dt, copy=False), b["W_out"][e.layer]
            per_neuron = W_out @ w_in[0] if w_in.shape[0] == 1 else np.einsum("nm,tm->tn", W_out, w_in)
            cols.append(act * per_neuron)
            cols.append(_dot_constant(b["mlp_bias"][e.layer], w_in, T)[:, None])
        else:
            cols.append(_dot(b["mlp_out"][:, e.layer].astype(dt, copy=False), w_in)[:, None])
        if not isinstance(e, StreamNorm) and getattr(e, "norm", None) is not None and norms.has_beta(e.norm):
            cols.append(_dot_constant(norms.beta[e.norm], w_out, T)[:, None])
        columns.append(np.concatenate(cols, axis=1) if cols else np.empty((T, 0), dt))
    terms = np.concatenate(columns[::-1], axis=1) * s[:, None]
    extras = []
    if p.beta is not None:
        extras.append(np.broadcast_to(u @ p.beta, (T,)))
    if b_U is not None:
        extras.append(np.broadcast_to(b_U[ti] - b_U[fi] if fi is not None else b_U[ti], (T,)))
    if extras:
        terms = np.concatenate([terms, np.stack(extras, axis=1).astype(dt)], axis=1)
    return terms.astype(dt, copy=False)


__all__ = ["direct_logit_attribution", "final_norm_scale"]
