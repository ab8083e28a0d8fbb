"""The invariant, offline: the final residual as a sum of labelled terms, and its check.

    resid_final = embed (+ pos_embed) + sum_l sum_h z[l,h] @ W_O[l,h] + sum_l b_O[l] + sum_l mlp_out[l]

with norms inside the stream carried through their frozen maps (docs/design.md). The terms are
added up by the one replay of ``streamtap.stream`` over the store's recorded events. Everything here
is lazy (dask) until asked for; ``verify`` computes the sum without materialising the per-component
array, so it runs over stores larger than memory.
"""

from __future__ import annotations

import dask.array as da
import numpy as np
import xarray as xr

from .dataset import with_token_dim
from .errors import DecompositionError, StoreDamagedError, StreamtapError
from .stream import (BLOCK_TERMS, Embed, FrozenNorms, Parts, Piece, Sum, component_label, entries, from_json, replay,
                     stop_index)

# Tolerances on max |sum of terms - resid_final| / max |resid_final|, per token.
# float32 (and float64): 1e-5. In half precision the model itself rounds: each layer rounds its
# attention output projection and both residual additions, and the embedding is rounded once, so
# 3L+1 roundings of at most one unit roundoff u each enter the residual the model reports. The bound
# is that first-order worst case, (3L+1) * u; measured errors per architecture: docs/architectures.md.
FULL_PRECISION = {"float32": 1e-5, "float64": 1e-5}
UNIT_ROUNDOFF = {"bfloat16": 2.0 ** -8, "float16": 2.0 ** -11}


def tolerance(ds_or_dtype, n_layers: int | None = None) -> float:
    """The invariant's bound for a store, or for a dtype and a number of layers.

    Parameters
    ----------
    ds_or_dtype : xarray.Dataset or str
        An opened store (its ``dtype`` and ``n_layers`` attributes are used), or a dtype name.
    n_layers : int, optional
        The depth, needed for half precision, whose bound grows with it.

    Returns
    -------
    float
        1e-5 in float32 and float64; (3 n_layers + 1) times the unit roundoff in half precision.
    """
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


def relative_error(total: np.ndarray, reference: np.ndarray, seen_scale: np.ndarray | None = None):
    """(max over tokens of |total - reference| / scale, scale): scale is each token's largest magnitude
    so far (``seen_scale``, then this comparison), since rounding error is bounded relative to the
    largest partial sum, not to the current one (the residual can shrink by cancellation)."""
    magnitude = np.maximum(np.abs(reference).max(-1), np.abs(total).max(-1))
    scale = magnitude if seen_scale is None else np.maximum(seen_scale, magnitude)
    err = float((np.abs(total - reference).max(-1) / np.maximum(scale, 1e-30)).max())
    return err, scale


def token_errors(total: xr.DataArray, resid: xr.DataArray) -> xr.DataArray:
    """Per-token max |total - resid| / max |resid|, with the absolute error as the ``abs_error`` coordinate."""
    diff = abs(total - resid).max("d_model")
    scale = abs(resid).max("d_model")
    rel = diff / xr.where(scale > 0, scale, 1)
    return rel.assign_coords(abs_error=diff).rename("rel_error")


# -- the store's stream ----------------------------------------------------------------------------
def _token_chunks(ds: xr.Dataset):
    return ds["resid_final"].data.chunks[0] if isinstance(ds["resid_final"].data, da.Array) else (ds.sizes["token"],)


def _as_dask(x, dtype) -> da.Array:
    return x.astype(dtype) if isinstance(x, da.Array) else da.from_array(np.asarray(x, dtype=dtype))


def stream_events(ds: xr.Dataset) -> list:
    """The order in which terms entered the stream and norms acted on it (written at capture)."""
    return from_json(ds.attrs["stream"])


def store_norms(ds: xr.Dataset, dtype=np.float32) -> FrozenNorms:
    """The store's norms inside the stream, frozen at its per-token scales (lazily)."""
    if "norm_weight" not in ds:
        return FrozenNorms.none()
    return FrozenNorms(gamma=np.asarray(ds["norm_weight"].values, dtype=dtype),
                       beta=np.asarray(ds["norm_bias"].values, dtype=dtype),
                       center=np.asarray(ds["norm_center"].values, dtype=bool),
                       scale=_as_dask(ds["norm_scale"].data, dtype))


def _source(ds: xr.Dataset, dtype, *, per_component: bool, neurons: bool = False):
    """What each event of a store writes: every component apart, or one summed term per event.

    In a selective store only the components it kept write (``streamtap.selection.covered``);
    the stored layers and heads are found by their coordinates, and the rest is added by the caller.
    """
    from .selection import covered, selection_of

    d_model = ds.sizes["d_model"]
    chunks = _token_chunks(ds)
    sel = selection_of(ds.attrs)
    layers = None if sel is None else sel["layers"]
    heads = list(range(ds.sizes["head"])) if sel is None or sel["heads"] is None else sel["heads"]
    kinds = None if sel is None else sel["terms"]

    def kept(e, kind) -> bool:
        return sel is None or covered(("", kind, e.layer, -1, -1), layers, None, kinds)

    def at(layer: int) -> int:
        return layer if layers is None else layers.index(layer)

    def per_token(data) -> da.Array:
        return _as_dask(data, dtype).rechunk((chunks, d_model))

    outputs = attn = None   # a pure state-space store has no heads (no event reads them)
    if per_component and "head_output" in ds:
        outputs = ds["head_output"].data.astype(dtype)
    elif not per_component and "z" in ds:
        z = _as_dask(ds["z"].data, dtype)
        W_O = np.asarray(ds["W_O"].values, dtype=dtype)
        attn = z.map_blocks(lambda b: np.einsum("tlhd,lhdm->tlm", b, W_O, optimize=True),
                            chunks=(z.chunks[0], (W_O.shape[0],), (d_model,)), drop_axis=[3], dtype=dtype)
        attn = attn + np.asarray(ds["attn_bias"].values, dtype=dtype)[None]
    attn_bias = np.asarray(ds["attn_bias"].values, dtype=dtype)
    mlp_bias = np.asarray(ds["mlp_bias"].values, dtype=dtype)

    def source(e) -> list[Piece]:
        if isinstance(e, Embed):
            if sel is not None and "embed" not in kinds:
                return []
            return [Piece([component_label(e)], per_token(ds[e.var].data)[None])]
        if not kept(e, "attn_bias" if e.site == "attn" else "mlp"):
            return []
        layer = at(e.layer)
        if not per_component:
            term = attn[:, layer] if e.site == "attn" else _as_dask(ds[BLOCK_TERMS[e.site]].data[:, layer], dtype)
            return [Piece([e.site], term[None])]
        if e.site == "attn":
            labels = [component_label(e, head=h) for h in heads]
            return [Piece(labels, da.moveaxis(outputs[:, layer], 1, 0)),
                    Piece([component_label(e, part="attn_bias")], attn_bias[layer][None], constant=True)]
        if e.site == "mixer":
            return [Piece([component_label(e, part="mixer")], per_token(ds["mixer_out"].data[:, layer])[None])]
        if e.experts:
            pieces = [Piece([component_label(e, expert=x) for x in range(e.experts)],
                            _dense_experts(ds, layer, e.experts, dtype))]
            if e.shared:
                pieces.append(Piece([component_label(e, part="shared_expert")],
                                    per_token(ds["shared_expert_out"].data[:, layer])[None]))
            return pieces
        if neurons:
            labels = [component_label(e, neuron=n) for n in range(ds.sizes["neuron"])]
            return [Piece(labels, da.moveaxis(ds["neuron_out"].data[:, layer].astype(dtype), 1, 0)),
                    Piece([component_label(e, part="mlp_bias")], mlp_bias[layer][None], constant=True)]
        return [Piece([component_label(e, part="mlp")], per_token(ds["mlp_out"].data[:, layer])[None])]

    return source


def _add_rest(ds: xr.Dataset, acc, norms: FrozenNorms, dtype):
    """A selective store's ``rest`` joins last, right before the final norm (no norm acts on it here)."""
    if "rest" in ds:
        from .selection import REST

        rest = _as_dask(ds["rest"].data, dtype).rechunk((_token_chunks(ds), ds.sizes["d_model"]))
        acc.add(Piece([REST], rest[None]), None, norms)
    return acc


def _refuse_partial(ds: xr.Dataset, what: str, option: str) -> None:
    """Refuse what a selective store cannot answer, naming the capture option that left it out."""
    from .selection import selection_of

    sel = selection_of(ds.attrs)
    if sel is not None and sel.get("rest"):
        raise StreamtapError(f"{what} needs terms this selective store left out (captured with layers={sel['layers']}, "
                             f"heads={sel['heads']}, terms={sel['terms']}; they are summed in its rest term). "
                             f"Capture again without {option}")


def decompose(ds: xr.Dataset, *, neurons: bool = False, upto=None, dtype=np.float32) -> xr.DataArray:
    """Every additive term of the residual: a lazy DataArray (component, token, d_model).

    Parameters
    ----------
    ds : xarray.Dataset
        An opened store (``streamtap.open``), or any selection of its tokens.
    neurons : bool
        Split each MLP into one term per neuron (``L3N1234``) plus ``L3_mlp_bias``; needs a store
        captured with ``neurons=True``.
    upto : int or (int, str), optional
        Decompose the residual entering a layer's attention (``upto=l``) or its MLP
        (``upto=(l, "mlp")``) instead of the final residual, as the sum of the terms written before it.
    dtype : numpy dtype
        What the terms are computed in.

    Returns
    -------
    xarray.DataArray
        (component, token, d_model); its sum over ``component`` is ``ds.resid_final`` (or the residual
        at ``upto``). Terms that passed through a norm are shown as they arrived, through the norm's
        frozen per-token scale, and each such norm's beta is a component of its own. Components carry
        TransformerLens-style labels (``embed``, ``pos_embed``, ``L3H7``, ``L3_attn_bias``, ``L3_mlp``)
        and ``kind``/``layer``/``head``/``neuron`` coordinates.
    """
    ds, squeezed = with_token_dim(ds)
    if squeezed:
        return decompose(ds, neurons=neurons, upto=upto, dtype=dtype).isel(token=0)
    return decompositions(ds, [upto], neurons=neurons, dtype=dtype)[0]


def decompositions(ds: xr.Dataset, uptos, *, neurons: bool = False, dtype=np.float32) -> list[xr.DataArray]:
    """``[decompose(ds, upto=u, ...) for u in uptos]`` from one replay of the stream: each is the same lazy
    array (the same pieces, concatenated in the same order), and the terms they share are the same dask
    arrays, so computing several depths together computes each term once instead of once per depth."""
    if neurons and "neuron_act" not in ds:
        raise StreamtapError("this store has no neuron activations; capture with neurons=True (--neurons)")
    for upto in uptos:
        if upto is not None:
            _refuse_partial(ds, f"decompose(upto={upto!r}) (the residual at a depth)", "layers/heads/terms")
    if neurons:
        _refuse_partial(ds, "decompose(neurons=True)", "layers/heads/terms")
    if "resid_final" not in ds:
        raise StreamtapError("this store holds projections only (project=...), no d_model terms; read "
                             "ds.projection, or capture again with terms=... to store vectors")
    events = stream_events(ds)
    try:
        stops = [stop_index(events, upto) for upto in uptos]
    except ValueError as exc:
        raise StreamtapError(str(exc)) from None
    n_tok, d_model = ds.sizes["token"], ds.sizes["d_model"]
    chunks = _token_chunks(ds)

    def broadcast(vectors) -> da.Array:
        vec = _as_dask(vectors, dtype)
        return da.broadcast_to(vec[:, None, :], (vec.shape[0], n_tok, d_model),
                               chunks=((vec.shape[0],), chunks, (d_model,)))

    starts, snapshots = entries(events), {}   # snapshots: stop index -> the pieces written before it

    def on_enter(layer, site, acc):
        snapshots[starts[(layer, site)]] = list(acc.pieces)

    norms = store_norms(ds, dtype)
    acc = replay(events, norms, _source(ds, dtype, per_component=True, neurons=neurons), Parts(broadcast),
                 stop=max(stops), norm_labels=ds.attrs.get("norm_labels", ()), on_enter=on_enter)
    snapshots[max(stops)] = list(acc.pieces)
    final = _add_rest(ds, acc, norms, dtype).pieces
    out = []
    for upto, stop in zip(uptos, stops):
        pieces = final if upto is None else snapshots[stop]
        data = da.concatenate([p.data.rechunk({1: chunks}) for p in pieces], axis=0)
        coords = component_coords([label for p in pieces for label in p.labels])
        coords.update({name: ds.coords[name] for name in ds["resid_final"].coords})
        target = "resid_final" if upto is None else f"residual entering {upto}"
        out.append(xr.DataArray(data, dims=("component", "token", "d_model"), coords=coords, name="terms",
                                attrs={"note": f"sum over component equals {target}"}))
    return out


def component_coords(labels: list[tuple]) -> dict:
    """``component`` labels with their ``kind``, ``layer``, ``head`` and ``neuron`` coordinates."""
    label, kind, layer, head, neuron = (np.array(x) for x in zip(*labels))
    return {"component": label, "kind": ("component", kind), "layer": ("component", layer.astype(np.int32)),
            "head": ("component", head.astype(np.int32)), "neuron": ("component", neuron.astype(np.int32))}


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
    norms = store_norms(ds, dtype)
    acc = _add_rest(ds, replay(stream_events(ds), norms, _source(ds, dtype, per_component=False), Sum()), norms, dtype)
    return xr.DataArray(acc.total, dims=("token", "d_model"), coords=ds["resid_final"].coords)


def errors(ds: xr.Dataset, dtype=np.float32) -> xr.DataArray:
    """Per-token max |sum - resid_final| / max |resid_final|, with the absolute error as a coordinate."""
    return token_errors(sum_of_terms(ds, dtype), ds["resid_final"].astype(dtype))


def summed_arrays(ds: xr.Dataset) -> list[str]:
    """The per-token arrays the sum of terms reads (the embeddings, z, MLP outputs, frozen scales, the
    reference); ``verify`` decodes every other one separately (``streamtap.integrity``)."""
    from .stream import Embed

    events = stream_events(ds)
    from .selection import selection_of

    sel = selection_of(ds.attrs)
    kinds = ("embed", "z", "mlp_out") if sel is None else sel["terms"]
    names = [e.var for e in events if isinstance(e, Embed) and "embed" in kinds]
    names += [n for n in ("z", "mlp_out") if n in kinds and n in ds] + ["resid_final"] + (["rest"] if "rest" in ds else [])
    names += ["mixer_out"] if "mixer_out" in ds else []
    return names + (["norm_scale"] if "norm_weight" in ds else [])


def _errors_by_block(ds: xr.Dataset, dtype):
    """Per-token errors computed one token block at a time where needed, so that a damaged chunk is
    reported with the tokens it holds instead of ending the whole check with a decoding traceback.
    Returns (errors, problems); an unreadable block's errors are NaN."""
    from .integrity import Problem

    lazy = errors(ds.reset_coords(drop=True), dtype)  # the coordinates are read (and checked) apart
    if not isinstance(lazy.data, da.Array):
        return lazy.compute(), []
    try:  # one graph for the healthy case: parallel, and runs as it is on a dask.distributed cluster
        return lazy.compute(), []
    except Exception:  # noqa: BLE001 - something could not be read: find which blocks, one at a time
        pass
    values, absolute, damaged, start = [], [], [], 0
    for n in lazy.data.chunks[0]:
        block = lazy.isel(token=slice(start, start + n))
        try:
            block = block.compute()
        except Exception as exc:  # undecodable or missing chunk data: name the array(s) that fail
            for name in summed_arrays(ds):
                try:
                    ds[name].isel(token=slice(start, start + n)).compute()
                except Exception as why:  # noqa: BLE001
                    damaged.append(Problem(name, f"cannot be read ({type(why).__name__}: {why})",
                                           (start, start + n - 1)))
            if not any(p.tokens == (start, start + n - 1) for p in damaged):
                damaged.append(Problem("terms", f"cannot be summed ({type(exc).__name__}: {exc})",
                                       (start, start + n - 1)))
            values.append(np.full(n, np.nan, dtype))
            absolute.append(np.full(n, np.nan, dtype))
        else:
            values.append(block.values)
            absolute.append(block.abs_error.values)
        start += n
    err = xr.DataArray(np.concatenate(values), dims="token", name="rel_error")
    err = err.assign_coords(abs_error=("token", np.concatenate(absolute)))
    return err, damaged


def verify(ds, *, tol: float | None = None, dtype=np.float32, raise_on_error: bool = True) -> xr.DataArray:
    """Check that a store is whole and that its terms sum to its final residual on every token.

    The sum is replayed through the store's stream without materialising the per-component array,
    one token chunk at a time, so it runs over stores larger than memory. Besides the sum, every
    array the store lists must be there and decode over the committed tokens, no token coordinate
    may be a fill value, static weights must be finite and every committed sequence must have tokens
    (``streamtap.integrity``); each problem is reported by array and token range.

    Parameters
    ----------
    ds : xarray.Dataset or path
        An opened store (``streamtap.open``), a selection of its tokens, or a store's location.
    tol : float, optional
        The bound on max |sum of terms - resid_final| / max |resid_final| per token; by default the
        store's own (``streamtap.tolerance``).
    dtype : numpy dtype
        What the terms are summed in.
    raise_on_error : bool
        Raise when the store is damaged or a token misses the bound (else only return the errors).

    Returns
    -------
    xarray.DataArray
        Per-token relative errors (computed; NaN where unreadable), with ``abs_error`` as a coordinate
        and ``tolerance``, ``max_rel_error``, ``max_abs_error`` and ``problems`` (the damage found, as
        text) as attributes.

    Raises
    ------
    StoreDamagedError
        Naming each damaged or missing array and its token range (a ``DecompositionError``).
    DecompositionError
        Naming the worst tokens beyond the tolerance (a NaN error always fails).
    """
    from .integrity import Problem, check, located

    if not isinstance(ds, xr.Dataset):
        from .dataset import open as open_store

        ds = open_store(ds)
    tol = tolerance(ds) if tol is None else tol
    summed = summed_arrays(ds)
    problems = check(ds, read=[n for n in ds.data_vars if n not in summed])
    n_tok = ds.sizes.get("token", 0)
    if "resid_final" not in ds and "projection" in ds:   # projections only: they must sum to their totals
        return _verify_projections(ds, tol, dtype, raise_on_error, problems)
    if n_tok == 0:  # an empty store holds no term to miss (dask refuses empty reductions)
        err = xr.DataArray(np.zeros(0, dtype), dims="token", name="rel_error").assign_coords(abs_error=("token", np.zeros(0, dtype)))
    elif any(n not in ds.data_vars for n in summed):
        err = xr.DataArray(np.full(n_tok, np.nan, dtype), dims="token", name="rel_error").assign_coords(
            abs_error=("token", np.full(n_tok, np.nan, dtype)))
        problems.append(Problem("terms", "cannot be summed: "
                                + ", ".join(n for n in summed if n not in ds.data_vars) + " missing"))
    else:
        err, damaged = _errors_by_block(ds, dtype)
        problems += damaged
    problems = located(ds, problems)
    err = _label(err, ds)
    # NaN (unwritten or damaged data) must fail, so compare with "not within" and never skip NaN
    err.attrs.update(tolerance=tol, max_rel_error=float(err.max(skipna=False)) if err.size else 0.0,
                     max_abs_error=float(err.abs_error.max(skipna=False)) if err.size else 0.0,
                     problems=[str(p) for p in problems])
    if raise_on_error and problems:
        raise StoreDamagedError(
            f"the store is damaged: {'; '.join(str(p) for p in problems[:8])}"
            + (f"; and {len(problems) - 8} more" if len(problems) > 8 else "")
            + ". Recapture the tokens concerned or restore the files from a copy; `streamtap info` describes the store",
            errors=err, problems=problems)
    if raise_on_error and bool((~(err <= tol)).any()):
        raise DecompositionError(misses(err), errors=err)
    if ds.attrs.get("patterns") and n_tok and not problems:
        outputs = output_check(ds)
        err.attrs["max_output_error"] = float(outputs.max()) if outputs.size else 0.0
        if bool((~(outputs <= tol)).any()):
            err.attrs["output_misses"] = output_misses(outputs, tol)
            if raise_on_error:
                raise DecompositionError(err.attrs["output_misses"], errors=err)
    return err


def _verify_projections(ds: xr.Dataset, tol: float, dtype, raise_on_error: bool, problems) -> xr.DataArray:
    """A projections-only store: per token, max over directions of |sum over components - total| relative
    to that direction's sum over components of |contribution| (the total is computed at capture from the
    final residual itself). The summands' magnitude, not |total|: a rounding u of each contribution moves
    the sum by at most u times it however much the sum cancels (a probe nearly orthogonal to the final
    residual has a total near 0), as the residual invariant measures a sum against the magnitude of the
    vector it adds up to rather than against one cancelled coordinate."""
    total = ds["projection_total"].astype(dtype)
    parts = ds["projection"].astype(dtype)
    summed = parts.sum("component")
    diff = abs(summed - total)
    scale = abs(parts).sum("component")
    rel = (diff / xr.where(scale > 0, scale, 1)).max("direction").compute()
    diff = diff.max("direction")
    err = _label(rel.rename("rel_error").assign_coords(abs_error=diff.compute()).reset_coords(
        [c for c in rel.coords if c not in ("abs_error",)], drop=True), ds)
    err.attrs.update(tolerance=tol, max_rel_error=float(err.max(skipna=False)) if err.size else 0.0,
                     max_abs_error=float(err.abs_error.max(skipna=False)) if err.size else 0.0,
                     problems=[str(p) for p in problems])
    if raise_on_error and bool((~(err <= tol)).any()):
        raise DecompositionError(misses(err), errors=err)
    return err


def output_check(ds: xr.Dataset) -> xr.DataArray:
    """The second invariant on every stored sequence: each head's output at each token against the
    sum over sources of its attention times their values, recomputed (``streamtap.attention``).
    Returns (token, layer, head) errors relative to the magnitude the model's rounding acts on
    (``streamtap.attention.output_scale``), sequence by sequence: the residual invariant's tolerance
    bounds them (docs/design.md, "The second invariant's tolerance")."""
    from .attention import output_errors

    seqs = np.unique(np.asarray(ds["seq"].values))
    parts = [output_errors(ds, int(s)) for s in seqs]
    return xr.concat(parts, dim="token")


def output_misses(outputs: xr.DataArray, tol: float) -> str:
    """What ``verify`` says of head outputs that miss the second invariant."""
    bad = ~(outputs <= tol)
    flat = outputs.stack(at=("token", "layer", "head"))
    worst = flat.isel(at=np.argsort(-np.nan_to_num(flat.values, nan=np.inf))[:5])
    spots = ", ".join(f"seq {int(s)} pos {int(p)} L{int(l)}H{int(h)}: {float(e):.3g}"
                      for s, p, l, h, e in zip(worst.seq.values, worst.pos.values, worst.layer.values,
                                               worst["head"].values, worst.values))
    return (f"{int(bad.sum())} head outputs (of {outputs.size}) differ from the sum over sources of attention "
            f"times value beyond {tol:g}; worst: {spots}. The patterns the store implies are not the model's")


def misses(err: xr.DataArray) -> str:
    """What ``verify`` says of errors beyond their tolerance: how many tokens, and the worst five."""
    tol = err.attrs["tolerance"]
    bad = ~(err <= tol)
    worst = err.sortby(err.fillna(np.inf), ascending=False).isel(token=slice(0, 5))
    spots = ", ".join(f"seq {int(s)} pos {int(p)}: {float(e):.3g}"
                      for s, p, e in zip(worst.seq.values, worst.pos.values, worst.values))
    return (f"{int(bad.sum())} of {err.sizes['token']} tokens miss the invariant beyond {tol:g} "
            f"(relative to max |resid_final|); worst: {spots}. A term is missing or the store is damaged")


def _label(err: xr.DataArray, ds: xr.Dataset) -> xr.DataArray:
    """The errors with the store's token coordinates where they can be read (-1 where they cannot)."""
    coords = {}
    for name in ("seq", "pos", "token_id"):
        if name in ds.variables and "seq" not in err.coords:
            try:
                coords[name] = ("token", np.asarray(ds[name].values))
            except Exception:  # noqa: BLE001 - a damaged coordinate: reported by the integrity check
                coords[name] = ("token", np.full(err.sizes["token"], -1, np.int64))
    return err.assign_coords(coords) if coords else err

