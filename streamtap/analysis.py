"""Offline analyses that need nothing but the store (which carries the weights they use)."""

from __future__ import annotations

import numpy as np
import xarray as xr

from .errors import StreamtapError
from .invariant import decompose


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
    return 1 / np.sqrt(var + eps)


def _through_final_norm(terms: xr.DataArray, ds: xr.Dataset, dtype) -> xr.DataArray:
    if ds.attrs["final_norm_kind"] == "layernorm":
        terms = terms - terms.mean("d_model")
    return terms * final_norm_scale(ds, dtype) * ds["final_norm_weight"].astype(dtype)


def direct_logit_attribution(ds: xr.Dataset, token_id, *, neurons: bool = False, dtype=np.float32) -> xr.DataArray:
    """Each component's direct contribution to the logit of ``token_id`` at every stored token.

    Terms pass through the final norm with its frozen per-token scale, then the unembedding; the
    norm's beta and the unembedding bias are components of their own, so the contributions sum to
    the model's logit.
    """
    if "W_U" not in ds:
        raise StreamtapError("this store has no unembedding (W_U); capture from a model with an LM head")
    terms = decompose(ds, neurons=neurons, dtype=dtype)
    normed = _through_final_norm(terms, ds, dtype)
    direction = ds["W_U"].isel(vocab=token_id).astype(dtype)
    contrib = xr.dot(normed, direction, dim="d_model")
    extras = []
    if "final_norm_bias" in ds:
        extras.append(("final_norm_bias", float(xr.dot(ds["final_norm_bias"].astype(dtype), direction))))
    if "unembed_bias" in ds:
        extras.append(("unembed_bias", float(ds["unembed_bias"].isel(vocab=token_id))))
    if extras:
        n_tok = ds.sizes["token"]
        extra = xr.DataArray(
            np.repeat(np.array([v for _, v in extras], dtype=dtype)[:, None], n_tok, axis=1),
            dims=("component", "token"),
            coords={"component": [k for k, _ in extras], "kind": ("component", [k for k, _ in extras]),
                    "layer": ("component", np.full(len(extras), -1, np.int32)),
                    "head": ("component", np.full(len(extras), -1, np.int32)),
                    "neuron": ("component", np.full(len(extras), -1, np.int32))},
        )
        contrib = xr.concat([contrib, extra.assign_coords({c: contrib.coords[c] for c in contrib.coords if c not in extra.coords and "component" not in contrib.coords[c].dims})], dim="component")
    return contrib.rename("logit_contribution")
