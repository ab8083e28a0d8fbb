"""Capture (the tap): tap an unmodified model through nnsight and turn each forward into one store batch.

The tap replaces nothing the model computes. Inside the ``with`` block the root module's forward is
routed through an nnsight trace whose cache holds the inputs and outputs of the modules the layout
names; after the block, every attribute nnsight or streamtap put on the module tree is removed, so
the model is exactly the object it was before.
"""

from __future__ import annotations

import inspect
import json
import warnings
from typing import Any, Iterable, Sequence

import torch

from . import __version__
from .errors import DecompositionError, InputError, NonFiniteError, StreamtapError
from .layouts import BoundLayout, bind, layout_for
from .store import SCHEMA_VERSION, StoreSpec, StoreWriter, VariableSpec, describe_config, fingerprint, to_numpy


def _unwrap(model) -> tuple[torch.nn.Module, Any]:
    """(the torch module, the nnsight envoy if one was given)."""
    from nnsight.intervention.envoy import Envoy

    if isinstance(model, Envoy):
        return model._module, model
    if isinstance(model, torch.nn.Module):
        return model, None
    raise TypeError(f"expected a transformers model or an nnsight envoy, got {type(model).__name__}")


def _max_positions(config) -> int | None:
    for attr in ("max_position_embeddings", "n_positions"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


class _ModuleTreeSnapshot:
    """Instance attributes of every module, so the tap can leave the tree exactly as it found it."""

    def __init__(self, root: torch.nn.Module):
        self.saved = [(m, dict(m.__dict__)) for m in root.modules()]

    def restore(self) -> None:
        for module, before in self.saved:
            for key in [k for k in module.__dict__ if k not in before]:
                del module.__dict__[key]
            for key in ("forward", "__nnsight__"):
                if key in before:
                    module.__dict__[key] = before[key]


class Tap:
    """Context manager: every forward of the model inside the block is appended to the store.

    Use ``streamtap.tap(...)`` to make one. ``tokens`` and ``sequences`` count what this tap
    committed; ``store_tokens`` is the store's total, which differs on append.
    """

    def __init__(self, model, store, *, tokenizer=None, neurons: bool = False, append: bool = False,
                 overwrite: bool = False, model_name: str | None = None, check: bool = True,
                 how: str = "streamtap.tap"):
        self.module, self._given_envoy = _unwrap(model)
        if self.module.training:
            raise StreamtapError(
                "the model is in training mode (dropout would make the captured terms random); "
                "call model.eval() before tapping it"
            )
        self.bound: BoundLayout = bind(layout_for(self.module), self.module)
        if neurons and self.bound.moe:
            raise StreamtapError(
                "per-neuron capture is not available for mixture-of-experts layers (their experts are "
                "fused); per-expert terms are stored instead. Capture without neurons=True (--neurons)"
            )
        self.tokenizer = tokenizer
        self.neurons = neurons
        self.model_name = model_name or getattr(self.module.config, "_name_or_path", "") or type(self.module).__name__
        self.how = how
        self.writer = StoreWriter(store, append=append, overwrite=overwrite)
        self.max_positions = _max_positions(self.module.config)
        self._signature = inspect.signature(type(self.module).forward)
        self._paths = sorted({f"model.{path}" if path else "model" for path, _ in self.bound.taps.values()})
        self._clone_keys = sorted(self.bound.clones, key=lambda k: int(k.split(".")[1]))
        self._clone_paths = [self.bound.taps[k][0] for k in self._clone_keys]
        self._inside = False
        self._snapshot = None
        self._spec: StoreSpec | None = None
        self._text_cache: dict[int, str] = {}
        self.check = check

    # -- context -------------------------------------------------------------------------------
    def __enter__(self) -> "Tap":
        import nnsight

        self._snapshot = _ModuleTreeSnapshot(self.module)
        with warnings.catch_warnings():
            # BERT-style blocks have a child named ``output``; nnsight renames its envoy and says so,
            # which matters to attribute navigation only, and the tap addresses modules by path
            warnings.filterwarnings("ignore", message=".*has a submodule named 'output'")
            self.envoy = self._given_envoy if self._given_envoy is not None else nnsight.NNsight(self.module)
        # nnsight's controller is the root's forward now; the tap sits in front of it for the block
        self._controller = self.module.__dict__["forward"]
        self.module.__dict__["forward"] = self._forward
        if self.check:
            try:
                self_check(self)
            except BaseException:
                self._snapshot.restore()
                raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.writer.close()
        finally:
            self._snapshot.restore()
            self.envoy = None

    @property
    def tokens(self) -> int:
        return self.writer.tokens - self.writer.found_tokens

    @property
    def sequences(self) -> int:
        return self.writer.sequences - self.writer.found_sequences

    @property
    def store_tokens(self) -> int:
        return self.writer.tokens

    # -- the forward the block's code calls ----------------------------------------------------------
    def _forward(self, *args, **kwargs):
        if self._inside:  # nnsight's own call of the module inside the trace: run it as it was
            return self._controller(*args, **kwargs)
        input_ids, mask = self._inputs(args, kwargs)
        output, cache, clones = self._traced(args, kwargs, self._paths)
        self._record(cache, clones, input_ids, mask)
        return output

    def _traced(self, args, kwargs, paths):
        """One forward through nnsight: (model output, cache of the named modules, copied outputs)."""
        import nnsight

        self._inside = True
        try:
            with self.envoy.trace(*args, **kwargs) as tracer:
                cache = tracer.cache(modules=paths, include_inputs=True, device=None)
                # outputs the model later changes in place are copied the moment they exist
                copies = nnsight.save([self.envoy.get(path).output.clone() for path in self._clone_paths])
                output = self.envoy.output.save()
        finally:
            self._inside = False
        return output, cache, dict(zip(self._clone_keys, copies))

    def _inputs(self, args, kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        bound = self._signature.bind_partial(self.module, *args, **kwargs).arguments
        input_ids, mask, embeds = (bound.get(k) for k in ("input_ids", "attention_mask", "inputs_embeds"))
        reference = input_ids if input_ids is not None else embeds
        if reference is None:
            raise InputError("the forward got neither input_ids nor inputs_embeds; nothing to capture")
        shape = tuple(reference.shape[:2])
        if len(shape) < 2 or 0 in shape:
            raise InputError(f"empty batch (shape {tuple(reference.shape)}): give at least one token per sequence")
        if self.max_positions is not None and shape[1] > self.max_positions:
            raise InputError(
                f"sequence length {shape[1]} exceeds the model's {self.max_positions} positions; "
                "shorten the input or truncate it (streamtap.capture(..., truncate=True), --truncate)"
            )
        if input_ids is None:
            input_ids = torch.full(shape, -1, dtype=torch.long)
        if mask is None:
            mask = torch.ones(shape, dtype=torch.long)
        mask = mask.to(torch.bool)
        empty = (~mask.any(dim=1)).nonzero().flatten().tolist()
        if empty:
            raise InputError(f"batch rows {empty} have no real tokens (attention_mask all zero); drop them")
        return input_ids, mask

    # -- one batch ------------------------------------------------------------------------------
    def _terms(self, cache, clones: dict, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """The batch's real tokens of every stored per-token variable, still on the model's device."""
        b = self.bound
        mask_dev = None

        def real(key: str) -> torch.Tensor:
            nonlocal mask_dev
            if key in clones:
                value = clones[key]
            else:
                path, side = b.taps[key]
                view = cache[f"model.{path}" if path else "model"]
                value = view.input if side == "input" else view.output
            if isinstance(value, tuple):
                value = value[0]
            if value.shape[:2] != mask.shape and value.shape[0] == mask.numel():
                value = value.reshape(*mask.shape, *value.shape[1:])  # blocks that flatten tokens (OPT's MLP)
            elif value.shape[0] != mask.shape[0]:  # position embeddings broadcast over the batch
                value = value.expand(mask.shape[0], *value.shape[1:])
            if mask_dev is None:
                mask_dev = mask.to(value.device)
            return value[mask_dev]

        L, H, dh = b.n_layers, b.n_heads, b.d_head
        out = {var: real(var) for var in b.layout.embeds if var in b.taps}
        out["z"] = torch.stack([real(f"z.{l}").reshape(-1, H, dh) for l in range(L)], dim=1)
        out["mlp_out"] = torch.stack([real(f"mlp_out.{l}") for l in range(L)], dim=1)
        if self.neurons:
            out["neuron_act"] = torch.stack([real(f"neuron_act.{l}") for l in range(L)], dim=1)
        if b.moe:
            out.update(self._expert_terms(cache, mask))
        if b.norms:
            out["norm_scale"] = torch.stack([self._frozen_scale(real(f"norm.{k}"), k) for k in range(len(b.norms))], dim=1)
        out["resid_final"] = real("resid_final")
        return out

    def _expert_terms(self, cache, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each routed expert's weighted output (and the shared expert's), for the real tokens.

        The experts module runs again once per routing slot with only that slot's index and
        weight, which is the model's own expert code producing exactly that slot's share.
        """
        b = self.bound
        slots, index, shared = [], [], []
        for layer in range(b.n_layers):
            path = b.taps[f"experts.{layer}"][0]
            (x, top_index, top_weights), _ = cache[f"model.{path}"].inputs
            real = mask.reshape(-1).to(x.device)
            x, top_index, top_weights = x[real], top_index[real], top_weights[real]
            experts = b.module(path)
            with torch.no_grad():
                slots.append(torch.stack([experts(x, top_index[:, j:j + 1], top_weights[:, j:j + 1])
                                          for j in range(top_index.shape[1])], dim=1))
            index.append(top_index.to(torch.int32))
            if f"shared.{layer}" in b.taps:
                out = cache[f"model.{b.taps[f'shared.{layer}'][0]}"].output
                gate = cache[f"model.{b.taps[f'shared_gate.{layer}'][0]}"].output
                out, gate = out.reshape(-1, out.shape[-1])[real], gate.reshape(-1, gate.shape[-1])[real]
                shared.append(torch.sigmoid(gate) * out)
        terms = {"expert_out": torch.stack(slots, dim=1), "expert_index": torch.stack(index, dim=1)}
        if shared:
            terms["shared_expert_out"] = torch.stack(shared, dim=1)
        return terms

    def _frozen_scale(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """s = 1/sqrt(var(x) + eps) of norm k, in float32 as the norms compute it."""
        probe = self.bound.norm_probes[k]
        x = x.float()
        if probe["center"]:
            x = x - x.mean(dim=-1, keepdim=True)
        return torch.rsqrt((x * x).mean(dim=-1) + probe["eps"])

    def _record(self, cache, clones: dict, input_ids: torch.Tensor, mask: torch.Tensor) -> None:
        out = self._terms(cache, clones, mask)
        self._check_finite(out, mask)
        if self._spec is None:
            self._spec = self._make_spec(out)
            self.writer.prepare(self._spec)
        n_seq = mask.shape[0]
        rows = torch.arange(n_seq).unsqueeze(1).expand_as(mask)[mask.cpu()]
        positions = (mask.cumsum(dim=1) - 1)[mask].cpu()
        ids = input_ids.cpu()[mask.cpu()]
        batch = {name: to_numpy(t) for name, t in out.items()}
        batch["seq"] = (rows + self.writer.sequences).numpy().astype("int64")
        batch["pos"] = positions.numpy().astype("int32")
        batch["token_id"] = ids.numpy().astype("int64")
        if self._spec.with_text:
            batch["text"] = self._texts(batch["token_id"])
        self.writer.write(batch, n_seq)

    def _texts(self, ids):
        import numpy as np

        cache = self._text_cache
        missing = sorted({int(i) for i in ids} - cache.keys())
        if missing:
            for i, text in zip(missing, self.tokenizer.batch_decode([[i] for i in missing])):
                cache[i] = text
        return np.array([cache.get(int(i), "") for i in ids], dtype=object)

    def _check_finite(self, out: dict[str, torch.Tensor], mask: torch.Tensor) -> None:
        if bool(torch.isfinite(out["resid_final"]).all()):
            return
        rows = torch.arange(mask.shape[0]).unsqueeze(1).expand_as(mask)[mask.cpu()]
        positions = (mask.cumsum(dim=1) - 1)[mask].cpu()
        where = []
        for name, t in out.items():
            bad = ~torch.isfinite(t.reshape(t.shape[0], -1)).all(dim=1).cpu()
            if bad.any():
                first = bad.nonzero().flatten()[:5].tolist()
                spots = ", ".join(f"row {int(rows[i])} pos {int(positions[i])}" for i in first)
                detail = ""
                if t.dim() >= 3:  # per-layer terms: name the first layer that went bad
                    per_layer = ~torch.isfinite(t.reshape(t.shape[0], t.shape[1], -1)).all(dim=2)
                    detail = f", first at layer {int(per_layer.any(dim=0).nonzero()[0])}"
                where.append(f"{name}: {int(bad.sum())} tokens ({spots}{detail})")
        raise NonFiniteError(
            "the model produced non-finite activations; the batch was not written. " + "; ".join(where)
            + ". Check the inputs and the dtype (float16 overflows are common; try bfloat16 or float32)"
        )

    def _make_spec(self, out: dict[str, torch.Tensor]) -> StoreSpec:
        b = self.bound
        dims = {"z": ("layer", "head", "d_head"), "mlp_out": ("layer", "d_model"),
                "neuron_act": ("layer", "neuron"), "norm_scale": ("norm",),
                "expert_out": ("layer", "slot", "d_model"), "expert_index": ("layer", "slot"),
                "shared_expert_out": ("layer", "d_model")}
        variables = {name: VariableSpec(dims.get(name, ("d_model",)), tuple(t.shape[1:]), t.dtype)
                     for name, t in out.items()}
        static = b.static_weights(self.neurons)
        dtype = str(out["z"].dtype).removeprefix("torch.")
        identity = {
            "schema_version": SCHEMA_VERSION,
            "layout": b.name,
            "model_type": self.module.config.model_type,
            "dtype": dtype,
            "neurons": self.neurons,
            "weights_fingerprint": fingerprint(static),
        }
        attrs = {
            "streamtap_version": __version__,
            "model_name": self.model_name,
            "model_config": describe_config(self.module.config),
            "n_layers": b.n_layers, "n_heads": b.n_heads, "d_head": b.d_head, "d_model": b.d_model,
            "stream": json.dumps(b.events),
            "norm_labels": b.norm_labels(),
            "tied_embeddings": bool(getattr(self.module.config, "tie_word_embeddings", False)),
            "created_by": self.how,
            **b.final_norm_info(),
        }
        return StoreSpec(variables, static, attrs, with_text=self.tokenizer is not None, identity=identity)


def tap(model, store, *, tokenizer=None, neurons: bool = False, append: bool = False,
        overwrite: bool = False, model_name: str | None = None, check: bool = True) -> Tap:
    """Wrap existing inference code: each forward of ``model`` inside the block is captured.

    ``store`` is a path or a zarr store (``zarr.storage.MemoryStore()`` keeps it in memory).
    ``check`` runs the invariant layer by layer on a short probe when the block opens, so a layout
    that no longer matches the model fails in milliseconds rather than after hours of capture.
    """
    return Tap(model, store, tokenizer=tokenizer, neurons=neurons, append=append,
               overwrite=overwrite, model_name=model_name, check=check)


def _batches(items: Sequence, size: int) -> Iterable[Sequence]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def capture(model, texts, store, *, tokenizer=None, batch_size: int = 8, max_length: int | None = None,
            truncate: bool = False, neurons: bool = False, append: bool = False, overwrite: bool = False,
            model_name: str | None = None, progress: bool = False, check: bool = True) -> Tap:
    """Capture a corpus in one call: strings (with a tokenizer) or lists of token ids.

    Returns the finished tap, whose ``tokens`` and ``sequences`` say what was committed.
    """
    texts = list(texts)
    if not texts:
        raise InputError("no texts to capture: give at least one non-empty text")
    if batch_size < 1:
        raise InputError(f"batch_size must be at least 1, got {batch_size}")
    strings = isinstance(texts[0], str)
    if strings and tokenizer is None:
        raise InputError("texts are strings but no tokenizer was given; pass tokenizer= or token ids")
    empty = [i for i, t in enumerate(texts) if len(t) == 0]
    if empty:
        raise InputError(f"texts at indices {empty[:10]} are empty; remove them before capturing")
    module, _ = _unwrap(model)
    limit = _max_positions(module.config)
    if max_length is not None:
        limit = min(limit, max_length) if limit else max_length
    device = next(module.parameters()).device
    the_tap = Tap(model, store, tokenizer=tokenizer, neurons=neurons, append=append, overwrite=overwrite,
                  model_name=model_name, check=check, how="streamtap.capture")
    bar = _progress(progress, len(texts))
    done = 0  # tokens of this call (the tap's count includes what an appended store already had)
    try:
        with the_tap, torch.no_grad():
            for chunk in _batches(texts, batch_size):
                ids, mask = _encode(chunk, tokenizer, limit, truncate)
                module(input_ids=ids.to(device), attention_mask=mask.to(device))
                if bar is not None:
                    done += int(mask.sum())
                    bar.update(len(chunk))
                    bar.set_postfix_str(f"{done:,} tok, {done / max(bar.format_dict['elapsed'], 1e-9):,.0f} tok/s")
    finally:  # an error message must not land in the middle of a half-drawn bar
        if bar is not None:
            bar.close()
    return the_tap


def _progress(enabled: bool, total: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="seq", desc="capture")


def _encode(chunk, tokenizer, limit: int | None, truncate: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(chunk[0], str):
        enc = tokenizer(list(chunk), add_special_tokens=True)
        rows = enc["input_ids"]
    else:
        rows = [list(map(int, r)) for r in chunk]
    for i, row in enumerate(rows):
        if len(row) == 0:
            raise InputError(f"text {i} of this batch has no tokens after tokenization; remove it")
        if limit is not None and len(row) > limit:
            if not truncate:
                raise InputError(
                    f"a sequence has {len(row)} tokens, more than the limit of {limit}; pass "
                    "truncate=True (--truncate) to cut it, or a larger max_length if the model allows"
                )
            rows[i] = row[:limit]
    width = max(len(r) for r in rows)
    pad = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
    pad = 0 if pad is None else pad
    left = tokenizer is not None and getattr(tokenizer, "padding_side", "right") == "left"
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        sl = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, sl] = torch.tensor(row, dtype=torch.long)
        mask[i, sl] = 1
    return ids, mask


def self_check(the_tap: Tap, n_tokens: int = 8) -> float:
    """Replay the layout's stream on a short probe and compare it with each block's real input.

    Returns the largest relative error. Raises DecompositionError naming the first layer whose
    terms do not add up to the residual entering the next one (or to the final residual).
    """
    from .invariant import tolerance

    b = the_tap.bound
    vocab = int(getattr(the_tap.module.config, "vocab_size", 2) or 2)
    n = min(n_tokens, the_tap.max_positions or n_tokens)
    device = next(the_tap.module.parameters()).device
    ids = (torch.arange(n, device=device) % max(vocab - 1, 1) + 1)[None]
    mask = torch.ones_like(ids)
    blocks = [f"model.{b.full(f'{b.layout.layers}.{l}')}" for l in range(b.n_layers)]
    with torch.no_grad():
        _, cache, clones = the_tap._traced((), {"input_ids": ids, "attention_mask": mask},
                                           sorted(set(the_tap._paths) | set(blocks)))
        terms = {k: v.double() for k, v in the_tap._terms(cache, clones, mask.bool()).items()}
        entering = [cache[p].input[0].double() for p in blocks]
    if not bool(torch.isfinite(terms["resid_final"]).all()):
        # a broken model, not a broken layout: the first real batch reports where it goes non-finite
        warnings.warn("the model produced non-finite values on the self-check probe; layout check skipped")
        return float("nan")
    static = b.static_weights(neurons=False)
    W_O = static["W_O"][1].double().to(device)
    b_O = static["attn_bias"][1].double().to(device)
    probes = b.norm_probes
    model_dtype = str(next(the_tap.module.parameters()).dtype).removeprefix("torch.")

    def norm(k, x):
        p = probes[k]
        if p["center"]:
            x = x - x.mean(-1, keepdim=True)
        return x * terms["norm_scale"][:, k, None] * p["gamma"].double().to(device) + p["beta"].double().to(device)

    # rounding error is bounded relative to the largest partial sum so far, not to the current one
    # (the residual can shrink by cancellation), so each token's scale is the running max
    seen_scale = None

    def compare(total, reference, where, layer):
        nonlocal seen_scale
        magnitude = torch.maximum(reference.abs().amax(-1), total.abs().amax(-1))
        seen_scale = magnitude if seen_scale is None else torch.maximum(seen_scale, magnitude)
        err = float(((total - reference).abs().amax(-1) / seen_scale.clamp_min(1e-30)).max())
        bound = tolerance(model_dtype, n_layers=max(layer, 1))
        if not err <= bound:
            raise DecompositionError(
                f"layout {b.name!r} does not fit this {type(the_tap.module).__name__}: {where} "
                f"(relative error {err:.3g}, bound {bound:.1g}). A module the layout names may have moved "
                "or a term may be missing; see docs/layouts.md. check=False skips this probe."
            )
        return err

    total, worst, seen = None, 0.0, set()
    for event in b.events:
        layer = event.get("layer", -1)
        if layer >= 0 and layer not in seen:
            seen.add(layer)
            before = "the embedding terms" if layer == 0 else f"the terms written up to layer {layer - 1}"
            worst = max(worst, compare(total, entering[layer], f"{before} do not add up to the residual "
                                       f"entering layer {layer}", layer))
        op = event["op"]
        if op == "norm":
            total = norm(event["norm"], total)
            continue
        if op == "embed":
            term = terms[event["var"]]
        elif op == "attn":
            term = torch.einsum("thd,hdm->tm", terms["z"][:, layer], W_O[layer]) + b_O[layer]
        else:
            term = terms["mlp_out"][:, layer]
        if op in ("attn", "mlp") and event["norm"] is not None:
            term = norm(event["norm"], term)
        total = term if total is None else total + term
    worst = max(worst, compare(total, terms["resid_final"], f"the terms of layer {b.n_layers - 1} and before "
                               "do not add up to the final residual", b.n_layers))
    return worst


__all__ = ["Tap", "tap", "capture", "self_check"]
