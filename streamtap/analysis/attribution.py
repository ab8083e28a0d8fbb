"""Direct logit attribution: each component's contribution to a token's logit (or a logit difference).

The final norm is affine once its per-token scale s is frozen: N(x) = gamma (x - mean x) s + beta,
with s a function of resid_final alone (recomputed exactly from the store). So the logit of token v,

    logit_v = N(resid_final) . W_U[v] + b_U[v] = sum_c s (x_c - mean x_c) . (gamma * W_U[v]) + beta . W_U[v] + b_U[v],

is a sum over the components x_c of decompose, plus two constants that are components of their own
(``final_norm_bias``, ``unembed_bias``). The contributions sum to the model's logit exactly.

On pre-norm decoders the direction gamma * W_U[v] (centred for a LayerNorm) is folded into W_O once,
so a head's contribution is z . (W_O w): one pass over the stored z, no message is materialised, and a
store of a million tokens is attributed at close to the disk's read rate.
"""

from __future__ import annotations

import dask.array as da
import numpy as np
import xarray as xr

from ..errors import StreamtapError
from ._common import (component_coords, local, float_dtype, fold_direction, logit_softcap, norm_params, norm_scale_np, per_token,
                      prenorm_components, prenorm_exact, require, single_token, static, static_dask, token_coords,
                      token_ids, tokens_map, as_static_dask)


def final_norm_scale(ds: xr.Dataset, dtype=np.float32) -> xr.DataArray:
    """The final norm's per-token scale s, frozen: N(x) = gamma * (x - mean(x)) * s + beta.

    It is a function of resid_final alone, so it is recomputed from the store exactly.
    """
    resid = ds["resid_final"].astype(dtype)
    eps = float(ds.attrs["final_norm_eps"])
    if ds.attrs["final_norm_kind"] == "layernorm":
        var = ((resid - resid.mean("d_model")) ** 2).mean("d_model")
    else:
        var = (resid ** 2).mean("d_model")
    return (1 / np.sqrt(var + eps)).rename("final_norm_scale")


def _ids(ds: xr.Dataset, which, n_tok: int, what: str):
    """A target given as an id, a token string, or one id per stored token -> (int | ndarray, per_token)."""
    if which is None:
        return None, False
    if isinstance(which, str):
        return token_ids(ds, [which])[0], False
    if isinstance(which, xr.DataArray):
        which = which.values
    arr = np.asarray(which)
    if arr.ndim == 0:
        return int(arr), False
    if arr.shape != (n_tok,):
        raise StreamtapError(f"{what} must be one id or one id per stored token ({n_tok}), got shape {arr.shape}")
    return arr.astype(np.int64), True


@single_token
def direct_logit_attribution(ds: xr.Dataset, token_id, *, foil=None, neurons: bool = False,
                             dtype=np.float32) -> xr.DataArray:
    """Each component's direct contribution to the logit of ``token_id`` at every stored token.

    ``token_id`` is a vocabulary id (or a token string the store can resolve, or one id per stored
    token); with ``foil`` the contributions are to ``logit[token_id] - logit[foil]``. Returns a lazy
    DataArray (component, token): decompose's components (``embed``, ``L3H7``, ``L3_attn_bias``,
    ``L3_mlp`` or with ``neurons=True`` ``L3N1234`` and ``L3_mlp_bias``), then ``final_norm_bias`` and
    ``unembed_bias`` where the model has them. The sum over component is the model's logit (difference).
    """
    require(ds, "W_U")
    dtype = float_dtype(dtype)
    n_tok = ds.sizes["token"]
    target, per_tok_t = _ids(ds, token_id, n_tok, "token_id")
    foil_id, per_tok_f = _ids(ds, foil, n_tok, "foil")
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
    if prenorm_exact(ds):
        out = _fast(ds, U, b_U, t_idx, f_idx, per_tok, neurons, dtype)
    else:
        out = _generic(ds, U, b_U, t_idx, f_idx, per_tok, neurons, dtype)
    return out.rename("logit_contribution").assign_attrs(attrs)


def _describe(ids) -> str:
    arr = np.asarray(ids)
    return str(int(arr)) if arr.ndim == 0 else "per token"


def _extras(ds: xr.Dataset) -> list[tuple]:
    out = []
    if "final_norm_bias" in ds:
        out.append(("final_norm_bias", "final_norm_bias", -1, -1, -1))
    if "unembed_bias" in ds:
        out.append(("unembed_bias", "unembed_bias", -1, -1, -1))
    return out


def _fast(ds, U, b_U, t_idx, f_idx, per_tok, neurons, dtype) -> xr.DataArray:
    labels = prenorm_components(ds, neurons) + _extras(ds)
    inputs = {n: per_token(ds, n) for n in ("embed", "pos_embed", "z", "resid_final") if n in ds}
    inputs["neuron_act" if neurons else "mlp_out"] = per_token(ds, "neuron_act" if neurons else "mlp_out")
    statics = {"W_O": static_dask(ds, "W_O", dtype), "attn_bias": static_dask(ds, "attn_bias", dtype),
               "U": as_static_dask(U, ("row", "d_model"))}
    if neurons:
        statics["W_out"] = static_dask(ds, "W_out", dtype)
        statics["mlp_bias"] = static_dask(ds, "mlp_bias", dtype)
    if per_tok:
        chunks = inputs["resid_final"].chunks[0]
        n_tok = ds.sizes["token"]
        for name, idx in (("t_idx", t_idx), ("f_idx", f_idx)):
            if idx is not None:
                idx = np.broadcast_to(idx, (n_tok,)).astype(np.int64)
                inputs[name] = xr.DataArray(da.from_array(idx, chunks=(chunks,)), dims=("token",))
    p = norm_params(ds, dtype)
    data = tokens_map(_dla_block, ("token", "component"), {"component": len(labels)}, inputs, statics,
                      dtype=dtype, p=p, b_U=b_U, t_idx=None if per_tok else int(t_idx),
                      f_idx=None if (per_tok or f_idx is None) else int(f_idx),
                      has_foil=f_idx is not None, dt=dtype)
    coords = {**component_coords(labels), **token_coords(ds)}
    return xr.DataArray(data, dims=("token", "component"), coords=coords).transpose("component", "token")


def _columns(n_layers: int, n_heads: int, base: int, mlp_width: int, mlp_bias: bool):
    """Column of each term in a block's output: per layer heads, attention bias, MLP (or neurons + bias)."""
    per_layer = n_heads + 1 + mlp_width + int(mlp_bias)
    start = base + per_layer * np.arange(n_layers)
    heads = (start[:, None] + np.arange(n_heads)).reshape(-1)
    attn_bias = start + n_heads
    mlp = (start[:, None] + n_heads + 1 + np.arange(mlp_width)).reshape(-1)
    return heads, attn_bias, mlp, (start + per_layer - 1) if mlp_bias else None, base + per_layer * n_layers


def _dla_block(b: dict, *, p, b_U, t_idx, f_idx, has_foil, dt) -> np.ndarray:
    resid = b["resid_final"].astype(dt, copy=False)
    z, W_O, b_O = b["z"].astype(dt, copy=False), b["W_O"], b["attn_bias"]
    T, L, H, E = z.shape
    s = norm_scale_np(resid, p["center"], p["eps"]).astype(dt, copy=False)
    U = b["U"]
    if "t_idx" in b:  # one direction per token
        ti, fi = b["t_idx"], b.get("f_idx")
    else:
        ti = np.array([t_idx])
        fi = np.array([f_idx]) if has_foil else None
    u = U[ti] - U[fi] if fi is not None else U[ti]              # (T or 1, d)
    w = fold_direction(u, p)                                     # direct-effect direction, norm folded in
    single = w.shape[0] == 1
    neurons = "neuron_act" in b
    embeds = [b["embed"]] + ([b["pos_embed"]] if "pos_embed" in b else [])
    mlp_width = b["neuron_act"].shape[2] if neurons else 1
    heads_c, bias_c, mlp_c, mlp_bias_c, n_terms = _columns(L, H, len(embeds), mlp_width, neurons)
    n_extra = int(p["beta"] is not None) + int(b_U is not None)
    out = np.empty((T, n_terms + n_extra), dt)
    if single:
        w0 = w[0]
        for i, x in enumerate(embeds):
            out[:, i] = x.astype(dt, copy=False) @ w0
        vz = np.einsum("lhem,m->lhe", W_O, w0).reshape(L * H, E)
        out[:, heads_c] = np.einsum("tke,ke->tk", z.reshape(T, L * H, E), vz)
        out[:, bias_c] = b_O @ w0
        if neurons:
            per_neuron = np.einsum("lnm,m->ln", b["W_out"], w0).reshape(-1)
            out[:, mlp_c] = b["neuron_act"].astype(dt, copy=False).reshape(T, -1) * per_neuron
            out[:, mlp_bias_c] = b["mlp_bias"] @ w0
        else:
            out[:, mlp_c] = (b["mlp_out"].astype(dt, copy=False).reshape(T * L, -1) @ w0).reshape(T, L)
    else:
        for i, x in enumerate(embeds):
            out[:, i] = np.einsum("td,td->t", x.astype(dt, copy=False), w)
        for layer in range(L):
            out[:, heads_c[layer * H:(layer + 1) * H]] = np.einsum("the,hem,tm->th", z[:, layer], W_O[layer], w,
                                                                     optimize=True)
        out[:, bias_c] = w @ b_O.T
        if neurons:
            act = b["neuron_act"].astype(dt, copy=False)
            out[:, mlp_c] = (act * np.einsum("lnm,tm->tln", b["W_out"], w, optimize=True)).reshape(T, -1)
            out[:, mlp_bias_c] = w @ b["mlp_bias"].T
        else:
            out[:, mlp_c] = np.einsum("tlm,tm->tl", b["mlp_out"].astype(dt, copy=False), w)
    out[:, :n_terms] *= s[:, None]
    col = n_terms
    if p["beta"] is not None:
        out[:, col] = u @ p["beta"]
        col += 1
    if b_U is not None:
        out[:, col] = b_U[ti] - b_U[fi] if fi is not None else b_U[ti]
    return out


def _generic(ds, U, b_U, t_idx, f_idx, per_tok, neurons, dtype) -> xr.DataArray:
    """Through decompose itself: exact for any term model the core supports."""
    from ..invariant import decompose

    terms = decompose(ds, neurons=neurons, dtype=dtype)
    p = norm_params(ds, dtype)
    n_tok = ds.sizes["token"]
    ti = np.broadcast_to(t_idx, (n_tok,)) if per_tok else t_idx
    fi = (np.broadcast_to(f_idx, (n_tok,)) if per_tok else f_idx) if f_idx is not None else None
    u = U[ti] - U[fi] if fi is not None else U[ti]
    w = fold_direction(u, p)
    w = xr.DataArray(w, dims=("token", "d_model") if per_tok else ("d_model",))
    scale = final_norm_scale(ds, dtype)
    contrib = xr.dot(terms, w, dim="d_model") * scale
    extras = []
    if p["beta"] is not None:
        extras.append(("final_norm_bias", np.broadcast_to(u @ p["beta"], (n_tok,))))
    if b_U is not None:
        bias = b_U[ti] - b_U[fi] if fi is not None else b_U[ti]
        extras.append(("unembed_bias", np.broadcast_to(bias, (n_tok,))))
    if extras:
        labels = [(k, k, -1, -1, -1) for k, _ in extras]
        extra = xr.DataArray(np.stack([v for _, v in extras]).astype(dtype), dims=("component", "token"),
                             coords={**component_coords(labels), **token_coords(ds)})
        contrib = xr.concat([contrib, extra], dim="component", coords="minimal", compat="override")
    return contrib.transpose("component", "token")
