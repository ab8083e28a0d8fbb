"""Models too big for one machine: the forward runs remotely (nnsight on NDIF), the store is written here.

    import streamtap as st
    from nnsight import LanguageModel

    model = LanguageModel("meta-llama/Llama-3.1-70B")     # here: the module tree, no weights needed
    plan = st.remote.plan(model)                           # what to save, in the order the forward reaches it
    with model.trace(batch["input_ids"], remote=True):
        saved = st.remote.save_terms(model, plan)         # runs on the server: z, MLP outputs, norm scales
    st.remote.write_store(model, saved, "run.zarr", input_ids=batch["input_ids"])

The reduction happens on the server: it sends back what the factored store keeps (each attention's
``z``, the input of its output projection, ``n_heads`` times smaller than the per-head messages; each
MLP's output; the embedding terms; the final residual) and, for norms inside the stream, only the
frozen per-token scale instead of the norm's input. :func:`write_store` then builds exactly the store
a local ``st.tap`` would have written for the same forward (tested: ``remote="local"`` runs the
serialized trace here). See docs/remote.md.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

from ..errors import InputError, StreamtapError, UnsupportedArchitectureError
from ..layouts import Layout, bind, layout_for
from ..options import CaptureOptions
from .sinks import location, unwrap
from .tap import Tap


def plan(model, *, neurons: bool = False) -> list[dict]:
    """What a remote trace saves for a store, in the order the forward reaches it.

    nnsight requires module values to be read in execution order. The order comes from a two-token
    dry run of ``model`` here (on the meta device when the weights are not loaded, as nnsight's
    ``LanguageModel`` keeps them before a local dispatch); where that fails, the layout's order is kept.

    Parameters
    ----------
    model : transformers model or nnsight envoy
    neurons : bool
        Also save each MLP's neuron activations.

    Returns
    -------
    list of dict
        ``key``, ``path``, ``side`` per value (``center`` and ``eps`` for a norm whose scale is reduced
        on the server, ``clone`` for an output the model changes in place later), plain data that
        travels with a remote request.

    Raises
    ------
    StreamtapError
        For mixture-of-experts models, whose per-expert terms need the experts re-run locally.
    """
    module, _ = unwrap(model)
    bound = bind(_layout(module, prove=True), module)
    if bound.moe:
        raise StreamtapError("mixture-of-experts layers are captured by re-running each expert here, which a "
                             "remote forward cannot do; capture MoE models with st.tap on a machine that holds them")
    entries = []
    for key, (path, side) in bound.taps.items():
        if key.startswith("neuron_act.") and not neurons:
            continue
        entry = {"key": key, "path": path, "side": side}
        if key.startswith("norm."):
            probe = bound.norm_probes[int(key.split(".")[1])]
            entry.update(center=bool(probe["center"]), eps=float(probe["eps"]), fixed=bool(probe.get("fixed")))
        if key in bound.clones:
            entry["clone"] = True
        entries.append(entry)
    order = _call_order(module)
    if order:
        rank = {event: i for i, event in reversed(list(enumerate(order)))}  # first occurrence
        entries.sort(key=lambda e: rank.get((e["path"], e["side"]), len(rank)))
    return entries


_PROVEN: "weakref.WeakKeyDictionary[torch.nn.Module, Layout]" = weakref.WeakKeyDictionary()


def _layout(module: torch.nn.Module, *, prove: bool) -> Layout:
    """The model's family layout; for a model type without one, the inferred layout the attach-time
    self-check proves here, on the loaded weights (``plan`` proves it once, ``write_store`` reuses it).

    Inference is never trusted unproven: where the weights are not here (on the meta device) or
    ``plan`` did not prove it first, this refuses, naming why and the fix.
    """
    try:
        return layout_for(module)
    except UnsupportedArchitectureError:
        pass
    if module in _PROVEN:
        return _PROVEN[module]
    model_type = getattr(module.config, "model_type", None)
    if not prove:
        raise UnsupportedArchitectureError(
            f"streamtap has no layout file for model_type {model_type!r}; an inferred layout is written only after "
            "st.remote.plan(model) proved it on this model here. Call st.remote.plan(model) first, with the "
            "weights loaded")
    if any(p.device.type == "meta" for p in module.parameters()):
        raise UnsupportedArchitectureError(
            f"streamtap has no layout file for model_type {model_type!r}, and an inferred layout is used only once "
            "the attach-time self-check proves it exact on the live model, which needs the weights here (this "
            "module tree is on the meta device). Load the weights here before st.remote.plan(model) (write_store "
            "needs them anyway), or write a family layout (docs/layouts.md) and register it with "
            "streamtap.layouts.register(...)")
    import zarr

    with Tap(module, zarr.storage.MemoryStore(), created_by="streamtap.remote.plan") as probe:   # proves it (or refuses, naming why)
        _PROVEN[module] = probe.bound.layout
    return _PROVEN[module]


def _call_order(module: torch.nn.Module) -> list[tuple[str, str]] | None:
    """(module path, "input" | "output") in the order a forward reaches them, or None if the dry run fails."""
    events: list[tuple[str, str]] = []
    hooks = []
    for name, sub in module.named_modules():
        hooks.append(sub.register_forward_pre_hook(lambda m, a, n=name: events.append((n, "input"))))
        hooks.append(sub.register_forward_hook(lambda m, a, o, n=name: events.append((n, "output"))))
    try:
        device = next(module.parameters()).device
        with torch.no_grad():
            module(input_ids=torch.ones((1, 2), dtype=torch.long, device=device))
    except Exception:  # noqa: BLE001 - some models cannot run on the meta device: keep the layout's order
        return None
    finally:
        for hook in hooks:
            hook.remove()
    return events


def save_terms(model, plan: list[dict]) -> dict[str, Any]:
    """Inside ``model.trace(...)`` (``remote=True`` or not): save the plan's values.

    Runs where the model runs. It uses nothing but torch and nnsight, so NDIF can execute it, and it
    reduces there: norm inputs become their frozen scales (one float per token), tuple outputs their
    first element.

    Parameters
    ----------
    model : nnsight envoy
        The model being traced.
    plan : list of dict
        What :func:`plan` returned.

    Returns
    -------
    dict
        The saved values by key, for :func:`write_store`.
    """
    import nnsight

    saved = {}
    for entry in plan:
        node = model.get(entry["path"]) if entry["path"] else model
        value = node.input if entry["side"] == "input" else node.output
        if isinstance(value, tuple):
            value = value[0]
        if entry.get("fixed"):   # a constant scale of the stream (layouts' Scale): gamma holds it, s is 1
            value = torch.ones(value.shape[:-1], dtype=torch.float32, device=value.device)
        elif "eps" in entry:  # a norm inside the stream: its frozen per-token scale, as a tap computes it
            x = value.float()
            if entry["center"]:
                x = x - x.mean(dim=-1, keepdim=True)
            value = torch.rsqrt((x * x).mean(dim=-1) + entry["eps"])
        elif entry.get("clone"):
            value = value.clone()  # the model changes this output in place later in the forward
        saved[entry["key"]] = value
    return nnsight.save(saved)  # the dict comes back to the caller's frame as ``saved = ...`` names it


class SavedForward:
    """A tap's forward fed with values saved elsewhere (by :func:`save_terms`): it hands them to the
    sinks instead of running the model; norm inputs arrive already reduced to their scales."""

    reduces_norms = True

    def __init__(self, saved: dict[str, Any]):
        self.saved = saved
        self.bound = None  # the tap's bound layout, set once the tap is made

    def __call__(self, args, kwargs, slots, keep):
        kept: dict[str, _Saved] = {}
        for key, (path, side) in self.bound.taps.items():
            if key not in self.saved:
                continue
            value = torch.as_tensor(self.saved[key])
            where = location(path, side)
            setattr(kept.setdefault(where[0], _Saved()), side, value)
            if where in slots.routes:
                slots.put(where, ((value,), {}) if side == "input" else value)
        return None, kept


class _Saved:
    """One module's saved values, read as a tap's kept values are (``.input``, ``.output``)."""

    def __init__(self):
        self.input = self.output = None


def write_store(model, saved: dict[str, Any], store, *, input_ids, attention_mask=None, tokenizer=None,
                **options) -> Tap:
    """Write one batch of values saved by :func:`save_terms` to ``store``, as a local tap would have.

    Parameters
    ----------
    model : transformers model or nnsight envoy
        Provides the static weights the store keeps (output projections, biases, norm weights,
        embeddings, unembedding), so those must be loaded here, even where the forward was remote.
    saved : dict
        What :func:`save_terms` returned.
    store : str, os.PathLike or zarr store
        As for :func:`streamtap.tap`.
    input_ids, attention_mask : tensors
        The batch the trace ran on (padding is dropped, as in a tap).
    tokenizer : optional
        Stores each token's text too.
    **options
        Options of :class:`~streamtap.options.CaptureOptions` (``append``, ``overwrite``,
        ``model_name``, ``neurons``, ``store_dtype``, ``storage_options``...). Call once per batch
        with ``append=True`` after the first.

    Returns
    -------
    Tap
        The closed tap (``tokens``, ``sequences``).
    """
    opts = CaptureOptions.from_kwargs({**options, "check": False})
    if opts.patterns:
        raise InputError("patterns=True is not available for remote forwards: save_terms does not bring back the "
                         "positional tables each attention received. Capture patterns with st.tap or st.capture "
                         "on a machine that runs the model, or write this store without patterns")
    forward = SavedForward(saved)
    module, _ = unwrap(model)
    layout = _layout(module, prove=False)
    the_tap = Tap(model, store, opts, tokenizer=tokenizer, created_by="streamtap.remote.write_store", forward=forward,
                  proven=layout if layout.inferred else None)
    forward.bound = the_tap.bound
    input_ids = torch.as_tensor(input_ids).cpu()
    mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else torch.as_tensor(attention_mask).cpu().bool()
    if input_ids.dim() != 2 or mask.shape != input_ids.shape:
        raise InputError(f"input_ids must be (batch, tokens) with an attention_mask of the same shape, got "
                         f"{tuple(input_ids.shape)} and {tuple(mask.shape)}")
    missing = [key for key, (path, side) in the_tap.bound.taps.items()
               if key not in saved and (opts.neurons or not key.startswith("neuron_act."))]
    if missing:
        raise InputError(f"saved values lack {missing[:5]}: save them with st.remote.save_terms(model, "
                         f"st.remote.plan(model{', neurons=True' if opts.neurons else ''}))")
    with the_tap, torch.no_grad():
        the_tap.capture_forward((), {}, input_ids, mask)
    return the_tap


__all__ = ["plan", "save_terms", "write_store"]
