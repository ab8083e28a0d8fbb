"""Decomposition at any depth: the residual entering a layer's attention or MLP as a sum of earlier terms.

    terms = residual_terms(ds, 3, "mlp")      # (component, token, d_model): what was written before L3's MLP
    x = residual(ds, 3, "attn")               # (token, d_model): the residual entering L3's attention
    stack = residual_stream(ds)               # (token, depth, d_model): entering every layer, then final

``site`` is ``"attn"`` (the residual entering the layer, before its attention) or ``"mlp"`` (after
the layer's attention has written, before its MLP reads). ``layer = n_layers`` is the final residual.
Both are replays of the store's stream (``streamtap.stream``), exact on every architecture.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from ..invariant import decompose, stream_events
from ..stream import Sum, block_norms, block_source, entries, replay
from ._blocks import (float_dtype, norm_center, single_token, stream_inputs, token_coords,
                      tokens_map)

SITES = ("attn", "mlp")


def _check(ds: xr.Dataset, layer: int, site: str) -> int:
    """``layer`` as an index in 0..n_layers (negative counts from the final residual); ``ValueError`` otherwise."""
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

    ``streamtap.decompose`` with ``upto`` that depth: every term written before it, labelled as
    decompose labels them, so their sum is that residual.

    Parameters
    ----------
    ds : xarray.Dataset
        An opened store (``streamtap.open``) or a selection of its tokens; a single token
        (``ds.isel(token=i)``) gives results without the ``token`` dim.
    layer : int
        0..n_layers; ``n_layers`` (or -1) is the final residual, other negative values count back
        from it.
    site : str
        ``"attn"``: the residual entering the layer, before its attention; ``"mlp"``: after the
        layer's attention has written, before its MLP reads.
    neurons : bool
        Split each MLP into its neurons (needs a store captured with ``neurons=True``).
    dtype : numpy dtype
        What the terms are computed in.

    Returns
    -------
    xarray.DataArray
        Lazy (component, token, d_model) with decompose's labels and ``kind``/``layer``/``head``/
        ``neuron`` coordinates. Attributes ``depth`` (``L3_mlp_in``, ..., ``final``) and ``note``.

    Raises
    ------
    ValueError
        ``site`` is not ``"attn"`` or ``"mlp"``, or ``layer`` is out of range.
    """
    layer = _check(ds, layer, site)
    final = layer == ds.sizes["layer"]
    terms = decompose(ds, neurons=neurons, dtype=dtype, upto=None if final else (layer, site))
    where = "final" if final else f"L{layer}_{site}_in"
    return terms.assign_attrs(note=f"sum over component equals the residual at {where}", depth=where)


@single_token
def residual(ds: xr.Dataset, layer: int, site: str = "attn", *, dtype=np.float32) -> xr.DataArray:
    """The residual entering ``layer``'s ``site`` (token, d_model), lazily.

    A replay of the store's stream up to that depth (exact on every architecture); at
    ``layer = n_layers`` it is the stored ``resid_final``.

    Parameters
    ----------
    ds : xarray.Dataset
        An opened store or a selection of its tokens; a single token gives results without the
        ``token`` dim.
    layer : int
        0..n_layers; ``n_layers`` (or -1) is the final residual.
    site : str
        ``"attn"`` (before the layer's attention) or ``"mlp"`` (before its MLP).
    dtype : numpy dtype
        A float dtype the residual is computed in.

    Returns
    -------
    xarray.DataArray
        ``residual`` (token, d_model) with the store's per-token coordinates.

    Raises
    ------
    ValueError
        ``site`` is not ``"attn"`` or ``"mlp"``, or ``layer`` is out of range.
    """
    layer = _check(ds, layer, site)
    if layer == ds.sizes["layer"]:
        return ds["resid_final"].astype(dtype).rename("residual").assign_attrs(depth="final")
    return residual_stream(ds, depths=[(layer, site)], dtype=dtype).isel(depth=0, drop=True)


def depth_list(n_layers: int, sites=("attn",), final: bool = True) -> list[tuple[int, str]]:
    """The (layer, site) depths in stream order, ``(n_layers, "final")`` last when ``final``."""
    for s in sites:
        if s not in SITES:
            raise ValueError(f"sites must be among {SITES}, got {s!r}")
    out = [(layer, s) for layer in range(n_layers) for s in SITES if s in sites]
    if final:
        out.append((n_layers, "final"))
    return out


def depth_coords(depths: list[tuple[int, str]]) -> dict:
    """The ``depth`` coordinate (``L3_attn_in``, ..., ``final``) with ``depth_layer`` and ``depth_site``."""
    labels = ["final" if s == "final" else f"L{l}_{s}_in" for l, s in depths]
    return {"depth": labels, "depth_layer": ("depth", np.array([l for l, _ in depths], np.int32)),
            "depth_site": ("depth", np.array([s for _, s in depths]))}


@single_token
def residual_stream(ds: xr.Dataset, *, sites=("attn",), final: bool = True, depths=None,
                    dtype=np.float32) -> xr.DataArray:
    """The residual at successive depths: (token, depth, d_model), lazily, one pass over the store.

    Each token chunk replays the stream once and records the running sum where each depth is
    entered, so all depths cost one pass; the ``final`` depth is the stored ``resid_final`` (equal
    to the sum within the invariant's tolerance).

    Parameters
    ----------
    ds : xarray.Dataset
        An opened store or a selection of its tokens; a single token gives results without the
        ``token`` dim.
    sites : tuple of str
        ``("attn",)``: the residual entering every layer; ``("attn", "mlp")`` adds the residual
        between each layer's attention and MLP.
    final : bool
        End with the final residual.
    depths : sequence of (int, str), optional
        Explicit (layer, site) depths instead of ``sites`` and ``final``; a layer of n_layers is
        the final residual.
    dtype : numpy dtype
        A float dtype the residuals are computed in.

    Returns
    -------
    xarray.DataArray
        ``residual`` (token, depth, d_model); ``depth`` labels read ``L3_attn_in``, ``L3_mlp_in``,
        ``final``, with ``depth_layer`` and ``depth_site`` coordinates and the store's per-token
        ones. By default n_layers + 1 depths. Attribute ``note``.

    Raises
    ------
    ValueError
        No depths asked for, or a site or layer out of range.
    """
    dtype = float_dtype(dtype)
    n_layers, d_model = ds.sizes["layer"], ds.sizes["d_model"]
    depths = list(depths) if depths is not None else depth_list(n_layers, sites, final)
    if not depths:
        raise ValueError("no depths asked for")
    depths = [(n_layers, "final") if layer == n_layers else (layer, site) for layer, site in depths]
    for layer, site in depths:
        if site != "final":
            _check(ds, layer, site)
    inputs, statics = stream_inputs(ds, dtype)
    data = tokens_map(_stream_block, ("token", "depth", "d_model"), {"depth": len(depths), "d_model": d_model},
                      inputs, statics, dtype=dtype, events=stream_events(ds), depths=depths,
                      center=norm_center(ds), dt=dtype)
    out = xr.DataArray(data, dims=("token", "depth", "d_model"), coords={**depth_coords(depths), **token_coords(ds)})
    return out.rename("residual").assign_attrs(note="residual stream at each depth; final is resid_final")


def _stream_block(b: dict, *, events, depths, center, dt) -> np.ndarray:
    """One token chunk: the residual at each depth, replaying the stream only as far as the last one."""
    out = np.empty((b["resid_final"].shape[0], len(depths), b["resid_final"].shape[-1]), dt)
    where = {depth: i for i, depth in enumerate(depths)}

    def on_enter(layer, site, acc):
        if (layer, site) in where:
            out[:, where[(layer, site)]] = acc.total

    stop = max((entries(events)[d] for d in depths if d[1] != "final"), default=-1) + 1
    replay(events, block_norms(b, center), block_source(b, dt), Sum(), on_enter=on_enter, stop=stop)
    for i, (_, site) in enumerate(depths):
        if site == "final":  # the stored one; equals the sum within the invariant
            out[:, i] = b["resid_final"].astype(dt, copy=False)
    return out
