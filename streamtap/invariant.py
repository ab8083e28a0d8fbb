"""The invariant, offline: the final residual as a sum of labelled terms, and its check.

    resid_final = embed (+ pos_embed) + sum_l sum_h z[l,h] @ W_O[l,h] + sum_l b_O[l] + sum_l mlp_out[l]

Everything here is lazy (dask) until asked for; ``verify`` computes the sum without materialising
the per-component array, so it runs over stores larger than memory.
"""

from __future__ import annotations

import json

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


def stream_events(ds: xr.Dataset) -> list[dict]:
    """The order in which terms entered the stream and norms acted on it (written at capture)."""
    return json.loads(ds.attrs["stream"])


def _stop_index(events: list[dict], upto) -> int:
    """Index of the first event not included when decomposing the residual entering ``upto``."""
    if upto is None:
        return len(events)
    layer, part = (upto, "attn") if isinstance(upto, (int, np.integer)) else upto
    if part not in ("attn", "mlp"):
        raise StreamtapError(f"upto must be a layer or (layer, 'attn' | 'mlp'), got {upto!r}")
    # a layer is entered before its first event (which may be a stream norm); its MLP is entered
    # right before the MLP writes, after any norm the stream passed through since the attention
    for i, event in enumerate(events):
        if event.get("layer") == layer and (part == "attn" or event["op"] == "mlp"):
            return i
    raise StreamtapError(f"this store has no {part} at layer {layer}")


class _Norms:
    """Frozen norms as affine maps: x -> gamma * (x - [mean x]) * s, with beta a term of its own."""

    def __init__(self, ds: xr.Dataset, dtype):
        self.ds, self.dtype = ds, dtype
        if "norm_weight" in ds:
            self.gamma = np.asarray(ds["norm_weight"].values, dtype=dtype)
            self.beta = np.asarray(ds["norm_bias"].values, dtype=dtype)
            self.center = np.asarray(ds["norm_center"].values, dtype=bool)
            self.scale = _as_dask(ds["norm_scale"].data, dtype)

    def apply(self, k: int, x: da.Array) -> da.Array:
        """Map x of shape (..., token, d_model) through norm k without its beta."""
        if self.center[k]:
            x = x - x.mean(axis=-1, keepdims=True)
        return x * self.scale[:, k][:, None] * self.gamma[k]

    def has_beta(self, k: int) -> bool:
        return bool(np.any(self.beta[k] != 0))

    def label(self, k: int) -> str:
        return f"{self.ds.attrs['norm_labels'][k]}_beta"


def decompose(ds: xr.Dataset, *, neurons: bool = False, upto=None, dtype=np.float32) -> xr.DataArray:
    """Every additive term of the residual: a lazy DataArray (component, token, d_model).

    By default the final residual (its sum over ``component`` is ``ds.resid_final``); with
    ``upto=layer`` or ``upto=(layer, "mlp")`` the residual entering that layer's attention or MLP,
    as the sum of the terms written before it. Terms that passed through a norm (post-LN blocks,
    post-sublayer norms) are shown as they arrived, through the norm's frozen per-token scale, and
    each such norm's beta is a component of its own.

    Components carry TransformerLens-style labels (``embed``, ``pos_embed``, ``L3H7``,
    ``L3_attn_bias``, ``L3_mlp``, or with ``neurons=True`` ``L3N1234`` and ``L3_mlp_bias``) and
    ``kind``/``layer``/``head``/``neuron`` coordinates.
    """
    ds, squeezed = with_token_dim(ds)
    if squeezed:
        return decompose(ds, neurons=neurons, upto=upto, dtype=dtype).isel(token=0)
    if neurons and "neuron_act" not in ds:
        raise StreamtapError("this store has no neuron activations; capture with neurons=True (--neurons)")
    events = stream_events(ds)
    events = events[:_stop_index(events, upto)]
    n_tok, d_model = ds.sizes["token"], ds.sizes["d_model"]
    chunks = _token_chunks(ds)
    norms = _Norms(ds, dtype)
    pieces: list[da.Array] = []
    labels: list[tuple] = []

    def per_token(data) -> da.Array:
        return _as_dask(data, dtype).rechunk((chunks, d_model))[None]

    def broadcast(vector) -> da.Array:
        vec = _as_dask(vector, dtype)
        return da.broadcast_to(vec[None, None, :], (1, n_tok, d_model), chunks=((1,), chunks, (d_model,)))

    def add_beta(k: int, layer: int) -> None:
        if norms.has_beta(k):
            pieces.append(broadcast(norms.beta[k]))
            labels.append(_component(norms.label(k), "norm_beta", layer))

    def write(new_pieces, new_labels, through, layer) -> None:
        if through is not None:
            new_pieces = [norms.apply(through, p) for p in new_pieces]
        pieces.extend(new_pieces)
        labels.extend(new_labels)
        if through is not None:
            add_beta(through, layer)

    messages = ds["messages"].data.astype(dtype)
    for event in events:
        op, layer = event["op"], event.get("layer", -1)
        if op == "embed":
            write([per_token(ds[event["var"]].data)], [_component(event["var"], event["var"])], None, -1)
        elif op == "attn":
            heads = [_component(f"L{layer}H{h}", "head", layer, h) for h in range(ds.sizes["head"])]
            write([da.moveaxis(messages[:, layer], 1, 0), broadcast(ds["attn_bias"].data[layer])],
                  heads + [_component(f"L{layer}_attn_bias", "attn_bias", layer)], event["norm"], layer)
        elif op == "mlp" and "experts" in event:
            n_experts = event["experts"]
            per_expert = _dense_experts(ds, layer, n_experts, dtype)
            names = [_component(f"L{layer}E{e}", "expert", layer) for e in range(n_experts)]
            new = [per_expert]
            if event.get("shared"):
                new.append(per_token(ds["shared_expert_out"].data[:, layer]))
                names.append(_component(f"L{layer}_shared_expert", "shared_expert", layer))
            write(new, names, event["norm"], layer)
        elif op == "mlp" and neurons:
            out = da.moveaxis(ds["neuron_out"].data[:, layer].astype(dtype), 1, 0)
            names = [_component(f"L{layer}N{n}", "neuron", layer, -1, n) for n in range(ds.sizes["neuron"])]
            write([out, broadcast(ds["mlp_bias"].data[layer])],
                  names + [_component(f"L{layer}_mlp_bias", "mlp_bias", layer)], event["norm"], layer)
        elif op == "mlp":
            write([per_token(ds["mlp_out"].data[:, layer])], [_component(f"L{layer}_mlp", "mlp", layer)],
                  event["norm"], layer)
        elif op == "norm":
            pieces = [norms.apply(event["norm"], p) for p in pieces]
            add_beta(event["norm"], layer)
    data = da.concatenate([p.rechunk({1: chunks}) for p in pieces], axis=0)
    label, kind, layer, head, neuron = (np.array(x) for x in zip(*labels))
    coords = {
        "component": label, "kind": ("component", kind), "layer": ("component", layer.astype(np.int32)),
        "head": ("component", head.astype(np.int32)), "neuron": ("component", neuron.astype(np.int32)),
    }
    coords.update({name: ds.coords[name] for name in ds["resid_final"].coords})
    target = "resid_final" if upto is None else f"residual entering {upto}"
    return xr.DataArray(data, dims=("component", "token", "d_model"), coords=coords, name="terms",
                        attrs={"note": f"sum over component equals {target}"})


def _dense_experts(ds: xr.Dataset, layer: int, n_experts: int, dtype) -> da.Array:
    """(expert, token, d_model): each expert's weighted output, zero where it was not routed to."""
    out = _as_dask(ds["expert_out"].data[:, layer], dtype)            # (token, slot, d_model)
    index = ds["expert_index"].data[:, layer]                          # (token, slot)
    index = index if isinstance(index, da.Array) else da.from_array(np.asarray(index))
    index = index.rechunk((out.chunks[0], out.chunks[1]))

    def scatter(block, idx):
        dense = np.zeros((n_experts, block.shape[0], block.shape[2]), dtype=dtype)
        for slot in range(block.shape[1]):
            np.add.at(dense, (idx[:, slot], np.arange(block.shape[0])), block[:, slot])
        return dense

    return da.map_blocks(scatter, out, index, new_axis=0, drop_axis=[1],
                         chunks=((n_experts,), out.chunks[0], out.chunks[2]), dtype=dtype)


def sum_of_terms(ds: xr.Dataset, dtype=np.float32) -> xr.DataArray:
    """The sum of every term, replayed through the stream without the per-component array."""
    ds, squeezed = with_token_dim(ds)
    if squeezed:
        return sum_of_terms(ds, dtype).isel(token=0)
    z = _as_dask(ds["z"].data, dtype)
    W_O = np.asarray(ds["W_O"].values, dtype=dtype)
    d_model = W_O.shape[-1]
    attn = z.map_blocks(lambda b: np.einsum("tlhd,lhdm->tlm", b, W_O, optimize=True),
                        chunks=(z.chunks[0], (W_O.shape[0],), (d_model,)), drop_axis=[3], dtype=dtype)
    attn = attn + np.asarray(ds["attn_bias"].values, dtype=dtype)[None]
    mlp = _as_dask(ds["mlp_out"].data, dtype)
    norms = _Norms(ds, dtype)
    total = None

    def through(x, k):
        return x if k is None else norms.apply(k, x) + norms.beta[k]

    for event in stream_events(ds):
        op = event["op"]
        if op == "embed":
            term = _as_dask(ds[event["var"]].data, dtype)
        elif op in ("attn", "mlp"):
            term = through((attn if op == "attn" else mlp)[:, event["layer"]], event["norm"])
        else:
            total = norms.apply(event["norm"], total) + norms.beta[event["norm"]]
            continue
        total = term if total is None else total + term
    return xr.DataArray(total, dims=("token", "d_model"), coords=ds["resid_final"].coords)


def errors(ds: xr.Dataset, dtype=np.float32) -> xr.DataArray:
    """Per-token max |sum - resid_final| / max |resid_final|, with the absolute error as a coordinate."""
    resid = ds["resid_final"].astype(dtype)
    diff = abs(sum_of_terms(ds, dtype) - resid).max("d_model")
    scale = abs(resid).max("d_model")
    rel = diff / xr.where(scale > 0, scale, 1)
    return rel.assign_coords(abs_error=diff).rename("rel_error")


def _errors_by_block(ds: xr.Dataset, dtype) -> xr.DataArray:
    """Per-token errors computed one token block at a time, so that a damaged chunk is reported with
    the tokens it holds instead of ending the whole check with a decoding traceback."""
    lazy = errors(ds, dtype)
    if not isinstance(lazy.data, da.Array):
        return lazy.compute()
    try:  # one graph for the healthy case: parallel, and runs as it is on a dask.distributed cluster
        return lazy.compute()
    except Exception:  # noqa: BLE001 - something could not be read: find which blocks, one at a time
        pass
    values, absolute, damaged, start = [], [], [], 0
    for n in lazy.data.chunks[0]:
        block = lazy.isel(token=slice(start, start + n))
        try:
            block = block.compute()
        except Exception as exc:  # undecodable or missing chunk data
            seq, pos = ds.seq.values, ds.pos.values
            damaged.append(f"tokens {start}..{start + n - 1} (seq {int(seq[start])} pos {int(pos[start])} to "
                           f"seq {int(seq[start + n - 1])} pos {int(pos[start + n - 1])}): {type(exc).__name__}: {exc}")
            values.append(np.full(n, np.nan, dtype))
            absolute.append(np.full(n, np.nan, dtype))
        else:
            values.append(block.values)
            absolute.append(block.abs_error.values)
        start += n
    err = xr.DataArray(np.concatenate(values), dims="token", coords=ds["resid_final"].coords, name="rel_error")
    err = err.assign_coords(abs_error=("token", np.concatenate(absolute))).compute()
    if damaged:
        raise DecompositionError("damaged data in the store, the check could not read " + "; ".join(damaged)
                                 + ". Recapture those sequences (or restore the chunk files)", errors=err)
    return err


def verify(ds: xr.Dataset, *, tol: float | None = None, dtype=np.float32, raise_on_error: bool = True) -> xr.DataArray:
    """Check the invariant on every token: returns per-token relative errors (computed).

    Raises ``DecompositionError`` naming the worst tokens when any exceeds ``tol`` (by default the
    bound for the store's dtype, see ``streamtap.tolerance``).
    """
    tol = tolerance(ds) if tol is None else tol
    if ds.sizes.get("token", 1) == 0:  # an empty store holds no term to miss (dask refuses empty reductions)
        err = xr.DataArray(np.zeros(0, dtype), dims="token", name="rel_error").assign_coords(abs_error=("token", np.zeros(0, dtype)))
    else:
        err = _errors_by_block(ds, dtype)
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
