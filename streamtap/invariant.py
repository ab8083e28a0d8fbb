"""The invariant, offline: the final residual as a sum of labelled terms, and its check.

    resid_final = embed (+ pos_embed) + sum_l sum_h z[l,h] @ W_O[l,h] + sum_l b_O[l] + sum_l mlp_out[l]

Everything here is lazy (dask) until asked for; ``verify`` computes the sum without materialising
the per-component array, so it runs over stores larger than memory.
"""

from __future__ import annotations

import dask.array as da
import numpy as np
import xarray as xr

from .dataset import with_token_dim
from .errors import DecompositionError, StreamtapError

# Tolerances on max |sum of terms - resid_final| / max |resid_final|, per token.
# float32 (and float64): DESIGN.md's 1e-5. In half precision the model itself rounds: each layer
# rounds its attention output projection and both residual additions, and the embedding is
# rounded once, so 3L+1 roundings of at most one unit roundoff u each enter the residual the
# model reports. The bound is that first-order worst case, (3L+1) * u. Measured (README,
# "Architectures"): bfloat16 7.2e-3 on 2-layer tiny models (bound 2.7e-2) and 5.9e-2 on
# 30-layer SmolLM2 (bound 0.36); float16 1.1e-3 (bound 3.4e-3) and 7.3e-3 (bound 4.5e-2).
FULL_PRECISION = {"float32": 1e-5, "float64": 1e-5}
UNIT_ROUNDOFF = {"bfloat16": 2.0 ** -8, "float16": 2.0 ** -11}


def tolerance(ds_or_dtype, n_layers: int | None = None) -> float:
    """The invariant's bound for a store (or for a dtype and a number of layers)."""
    if isinstance(ds_or_dtype, xr.Dataset):
        dtype, n_layers = ds_or_dtype.attrs["dtype"], ds_or_dtype.attrs["n_layers"]
    else:
        dtype = str(ds_or_dtype)
    dtype = dtype.removeprefix("torch.")
    if dtype in FULL_PRECISION:
        return FULL_PRECISION[dtype]
    if n_layers is None:
        raise ValueError(f"the {dtype} bound grows with depth; pass n_layers")
    return (3 * int(n_layers) + 1) * UNIT_ROUNDOFF[dtype]


def _component(label, kind, layer=-1, head=-1, neuron=-1):
    return label, kind, layer, head, neuron


def _token_chunks(ds: xr.Dataset):
    return ds["resid_final"].data.chunks[0] if isinstance(ds["resid_final"].data, da.Array) else (ds.sizes["token"],)


def _as_dask(x, dtype) -> da.Array:
    return x.astype(dtype) if isinstance(x, da.Array) else da.from_array(np.asarray(x, dtype=dtype))


def decompose(ds: xr.Dataset, *, neurons: bool = False, dtype=np.float32) -> xr.DataArray:
    """Every additive term of the final residual: a lazy DataArray (component, token, d_model).

    Components carry TransformerLens-style labels (``embed``, ``pos_embed``, ``L3H7``,
    ``L3_attn_bias``, ``L3_mlp``, or with ``neurons=True`` ``L3N1234`` and ``L3_mlp_bias``) and
    ``kind``/``layer``/``head``/``neuron`` coordinates. Its sum over ``component`` is
    ``ds.resid_final``.
    """
    ds, squeezed = with_token_dim(ds)
    if squeezed:
        return decompose(ds, neurons=neurons, dtype=dtype).isel(token=0)
    if neurons and "neuron_act" not in ds:
        raise StreamtapError("this store has no neuron activations; capture with neurons=True (--neurons)")
    n_tok, d_model = ds.sizes["token"], ds.sizes["d_model"]
    chunks = _token_chunks(ds)
    pieces: list[da.Array] = []
    labels: list[tuple] = []

    def per_token(name: str) -> da.Array:
        return _as_dask(ds[name].data, dtype).rechunk((chunks, d_model))[None]

    def broadcast(vector) -> da.Array:
        vec = _as_dask(vector, dtype)
        return da.broadcast_to(vec[None, None, :], (1, n_tok, d_model), chunks=((1,), chunks, (d_model,)))

    pieces.append(per_token("embed"))
    labels.append(_component("embed", "embed"))
    if "pos_embed" in ds:
        pieces.append(per_token("pos_embed"))
        labels.append(_component("pos_embed", "pos_embed"))
    messages = ds["messages"].data.astype(dtype)
    for layer in range(ds.sizes["layer"]):
        pieces.append(da.moveaxis(messages[:, layer], 1, 0))
        labels += [_component(f"L{layer}H{h}", "head", layer, h) for h in range(ds.sizes["head"])]
        pieces.append(broadcast(ds["attn_bias"].data[layer]))
        labels.append(_component(f"L{layer}_attn_bias", "attn_bias", layer))
        if neurons:
            out = ds["neuron_out"].data[:, layer].astype(dtype)
            pieces.append(da.moveaxis(out, 1, 0))
            labels += [_component(f"L{layer}N{n}", "neuron", layer, -1, n) for n in range(ds.sizes["neuron"])]
            pieces.append(broadcast(ds["mlp_bias"].data[layer]))
            labels.append(_component(f"L{layer}_mlp_bias", "mlp_bias", layer))
        else:
            pieces.append(_as_dask(ds["mlp_out"].data[:, layer], dtype).rechunk((chunks, d_model))[None])
            labels.append(_component(f"L{layer}_mlp", "mlp", layer))
    data = da.concatenate([p.rechunk({1: chunks}) for p in pieces], axis=0)
    label, kind, layer, head, neuron = (np.array(x) for x in zip(*labels))
    coords = {
        "component": label, "kind": ("component", kind), "layer": ("component", layer.astype(np.int32)),
        "head": ("component", head.astype(np.int32)), "neuron": ("component", neuron.astype(np.int32)),
    }
    coords.update({name: ds.coords[name] for name in ds["resid_final"].coords})
    return xr.DataArray(data, dims=("component", "token", "d_model"), coords=coords, name="terms",
                        attrs={"note": "sum over component equals resid_final"})


def sum_of_terms(ds: xr.Dataset, dtype=np.float32) -> xr.DataArray:
    """The sum of every term, computed without building the per-component array."""
    ds, squeezed = with_token_dim(ds)
    if squeezed:
        return sum_of_terms(ds, dtype).isel(token=0)
    z = _as_dask(ds["z"].data, dtype)
    W_O = np.asarray(ds["W_O"].values, dtype=dtype)
    total = z.map_blocks(lambda b: np.einsum("tlhd,lhdm->tm", b, W_O, optimize=True),
                         chunks=(z.chunks[0], (W_O.shape[-1],)), drop_axis=[2, 3], dtype=dtype)
    total = total + _as_dask(ds["embed"].data, dtype)
    if "pos_embed" in ds:
        total = total + _as_dask(ds["pos_embed"].data, dtype)
    total = total + _as_dask(ds["mlp_out"].data, dtype).sum(axis=1)
    total = total + _as_dask(ds["attn_bias"].data, dtype).sum(axis=0)[None, :]
    return xr.DataArray(total, dims=("token", "d_model"), coords=ds["resid_final"].coords)


def errors(ds: xr.Dataset, dtype=np.float32) -> xr.DataArray:
    """Per-token max |sum - resid_final| / max |resid_final|, with the absolute error as a coordinate."""
    resid = ds["resid_final"].astype(dtype)
    diff = abs(sum_of_terms(ds, dtype) - resid).max("d_model")
    scale = abs(resid).max("d_model")
    rel = diff / xr.where(scale > 0, scale, 1)
    return rel.assign_coords(abs_error=diff).rename("rel_error")


def verify(ds: xr.Dataset, *, tol: float | None = None, dtype=np.float32, raise_on_error: bool = True) -> xr.DataArray:
    """Check the invariant on every token: returns per-token relative errors (computed).

    Raises ``DecompositionError`` naming the worst tokens when any exceeds ``tol`` (by default the
    bound for the store's dtype, see ``streamtap.tolerance``).
    """
    tol = tolerance(ds) if tol is None else tol
    err = errors(ds, dtype).compute()
    # NaN (unwritten or damaged data) must fail, so compare with "not within" and never skip NaN
    err.attrs.update(tolerance=tol, max_rel_error=float(err.max(skipna=False)) if err.size else 0.0,
                     max_abs_error=float(err.abs_error.max(skipna=False)) if err.size else 0.0)
    bad = ~(err <= tol)
    if raise_on_error and bool(bad.any()):
        worst = err.sortby(err.fillna(np.inf), ascending=False).isel(token=slice(0, 5))
        spots = ", ".join(f"seq {int(s)} pos {int(p)}: {float(e):.3g}"
                          for s, p, e in zip(worst.seq.values, worst.pos.values, worst.values))
        raise DecompositionError(
            f"{int(bad.sum())} of {err.sizes['token']} tokens miss the invariant beyond {tol:g} "
            f"(relative to max |resid_final|); worst: {spots}. A term is missing or the store is damaged",
            errors=err,
        )
    return err
