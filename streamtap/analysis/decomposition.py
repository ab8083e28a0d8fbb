"""Decomposition at any depth: the residual entering a layer's attention or MLP as a sum of earlier terms.

    terms = residual_terms(ds, 3, "mlp")      # (component, token, d_model): what was written before L3's MLP
    x = residual(ds, 3, "attn")               # (token, d_model): the residual entering L3's attention
    stack = residual_stream(ds)               # (token, depth, d_model): entering every layer, then final

``site`` is ``"attn"`` (the residual entering the layer, before its attention) or ``"mlp"`` (after
the layer's attention has written, before its MLP reads). ``layer = n_layers`` is the final residual.
For pre-norm decoders the residual entering layer l is exactly the embedding plus every head, bias
and MLP term of layers below l; ``streamtap.decompose(ds, upto=(layer, site))`` generalises this to
other term models when the core provides it, and is used whenever it exists.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from ._common import (decompose_has_upto, float_dtype, per_token, prenorm_exact, single_token, static_dask,
                      token_coords, tokens_map)

SITES = ("attn", "mlp")


def _check(ds: xr.Dataset, layer: int, site: str) -> int:
    n_layers = ds.sizes["layer"]
    if site not in SITES:
        raise ValueError(f"site must be one of {SITES}, got {site!r}")
    layer = int(layer)
    if layer < 0:
        layer += n_layers + 1
    if not 0 <= layer <= n_layers:
        raise ValueError(f"layer must be in 0..{n_layers} ({n_layers} is the final residual), got {layer}")
    return layer


@single_token
def residual_terms(ds: xr.Dataset, layer: int, site: str = "attn", *, neurons: bool = False,
                   dtype=np.float32) -> xr.DataArray:
    """The terms whose sum is the residual entering ``layer``'s ``site``: (component, token, d_model).

    Lazy; components keep decompose's labels and ``kind``/``layer``/``head``/``neuron`` coordinates.
    """
    from ..invariant import decompose

    layer = _check(ds, layer, site)
    n_layers = ds.sizes["layer"]
    if layer == n_layers:
        terms = decompose(ds, neurons=neurons, dtype=dtype)
    elif decompose_has_upto():
        terms = decompose(ds, upto=(layer, site), neurons=neurons, dtype=dtype)
    else:
        terms = decompose(ds, neurons=neurons, dtype=dtype)
        kind, lay = terms.kind.values, terms.layer.values
        keep = (lay < layer) & (lay >= 0)
        keep |= np.isin(kind, ("embed", "pos_embed"))
        if site == "mlp":
            keep |= (lay == layer) & np.isin(kind, ("head", "attn_bias"))
        terms = terms.isel(component=np.flatnonzero(keep))
    where = "final" if layer == n_layers else f"L{layer}_{site}_in"
    return terms.assign_attrs(note=f"sum over component equals the residual at {where}", depth=where)


@single_token
def residual(ds: xr.Dataset, layer: int, site: str = "attn", *, dtype=np.float32) -> xr.DataArray:
    """The residual entering ``layer``'s ``site`` (token, d_model), lazily."""
    layer = _check(ds, layer, site)
    if layer == ds.sizes["layer"]:
        return ds["resid_final"].astype(dtype).rename("residual").assign_attrs(depth="final")
    return residual_stream(ds, depths=[(layer, site)], dtype=dtype).isel(depth=0, drop=True)


def depth_list(n_layers: int, sites=("attn",), final: bool = True) -> list[tuple[int, str]]:
    for s in sites:
        if s not in SITES:
            raise ValueError(f"sites must be among {SITES}, got {s!r}")
    out = [(layer, s) for layer in range(n_layers) for s in SITES if s in sites]
    if final:
        out.append((n_layers, "final"))
    return out


def depth_coords(depths: list[tuple[int, str]]) -> dict:
    labels = ["final" if s == "final" else f"L{l}_{s}_in" for l, s in depths]
    return {"depth": labels, "depth_layer": ("depth", np.array([l for l, _ in depths], np.int32)),
            "depth_site": ("depth", np.array([s for _, s in depths]))}


@single_token
def residual_stream(ds: xr.Dataset, *, sites=("attn",), final: bool = True, depths=None,
                    dtype=np.float32) -> xr.DataArray:
    """The residual at successive depths: (token, depth, d_model), lazily, one pass over the store.

    By default the residual entering every layer and then the final one (n_layers + 1 depths);
    ``sites=("attn", "mlp")`` adds the residual between each layer's attention and MLP. ``depth``
    labels read ``L3_attn_in``, ``L3_mlp_in``, ``final``.
    """
    dtype = float_dtype(dtype)
    n_layers, d_model = ds.sizes["layer"], ds.sizes["d_model"]
    depths = list(depths) if depths is not None else depth_list(n_layers, sites, final)
    if not depths:
        raise ValueError("no depths asked for")
    for layer, site in depths:
        if site != "final":
            _check(ds, layer, site)
    coords = {**depth_coords(depths), **token_coords(ds)}
    if prenorm_exact(ds):
        inputs = {n: per_token(ds, n) for n in ("embed", "pos_embed", "z", "mlp_out", "resid_final") if n in ds}
        statics = {"W_O": static_dask(ds, "W_O", dtype), "attn_bias": static_dask(ds, "attn_bias", dtype)}
        data = tokens_map(_stream_block, ("token", "depth", "d_model"), {"depth": len(depths), "d_model": d_model},
                          inputs, statics, dtype=dtype, depths=depths, dt=dtype)
        out = xr.DataArray(data, dims=("token", "depth", "d_model"), coords=coords)
    else:
        parts = []
        for layer, site in depths:
            if site == "final" or layer == n_layers:
                parts.append(ds["resid_final"].astype(dtype))
            else:
                parts.append(residual_terms(ds, layer, site, dtype=dtype).sum("component"))
        out = xr.concat([p.drop_vars([c for c in p.coords if c not in token_coords(ds)]) for p in parts],
                        dim="depth").transpose("token", "depth", "d_model").assign_coords(coords)
    return out.rename("residual").assign_attrs(note="residual stream at each depth; final is resid_final")


def layer_writes(b: dict, dt) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(base, attention writes, MLP writes) of one block: (T, d), (T, L, d), (T, L, d).

    Attention writes are every head's message plus the layer's output bias.
    """
    base = b["embed"].astype(dt, copy=False)
    if "pos_embed" in b:
        base = base + b["pos_embed"].astype(dt, copy=False)
    attn = np.einsum("tlhe,lhem->tlm", b["z"].astype(dt, copy=False), b["W_O"].astype(dt, copy=False), optimize=True)
    attn += b["attn_bias"].astype(dt, copy=False)[None]
    return base, attn, b["mlp_out"].astype(dt, copy=False)


def _stream_block(b: dict, *, depths, dt) -> np.ndarray:
    base, attn, mlp = layer_writes(b, dt)
    n_tok, n_layers, d = attn.shape
    # pre[l] = residual entering layer l; pre[L] = everything
    pre = np.empty((n_tok, n_layers + 1, d), dt)
    pre[:, 0] = base
    np.cumsum(attn + mlp, axis=1, out=pre[:, 1:])
    pre[:, 1:] += base[:, None]
    out = np.empty((n_tok, len(depths), d), dt)
    for i, (layer, site) in enumerate(depths):
        if site == "final":
            out[:, i] = b["resid_final"].astype(dt, copy=False)  # the stored one; equals pre[:, L] within the invariant
        elif site == "attn":
            out[:, i] = pre[:, layer]
        else:
            out[:, i] = pre[:, layer] + attn[:, layer]
    return out
