"""Capture (the tap): tap an unmodified model through nnsight and turn each forward into one store batch.

The tap replaces nothing the model computes. Inside the ``with`` block the root module's forward is
routed through an nnsight trace whose sinks copy each term the layout names out of the forward as
the model produces it (``streamtap.term_sinks``); after the block, every attribute nnsight or streamtap put on the module tree is removed, so
the model is exactly the object it was before. ``model.generate`` inside the block is followed step
by step (its ``generate`` and stopping criteria are routed through the tap for the block's duration
too); ``streamtap.generation`` says how each step's tokens get their ``seq`` and ``pos``.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import sys
import warnings
from typing import Any, Iterable, Sequence

import torch

from . import __version__
from .errors import DecompositionError, InputError, NonFiniteError, StreamtapError
from .layouts import BoundLayout, bind, layout_for
from .generation import Generation, given_cache, refuse_cached_forward
from .ranks import process_rank, rank_store, shard
from .store import committed_sequences
from .store import (LOSSY_DTYPES, LOSSY_ERROR_TOKENS, SCHEMA_VERSION, StoreSpec, StoreWriter, VariableSpec,
                    describe_config, fingerprint)
from .term_sinks import KeptValues, Route, TermSlots, Where, location, sink
from .writer import DEFAULT_DEPTH, BufferPool, BufferSet, CudaStager, bound_allocator, Job, Pipeline, choose_mode, make_pipeline

# stored exactly even in a lossy store: the reference the lossy terms are measured against, the
# frozen norm scales every term through a norm is multiplied by, and integer indices
EXACT_ALWAYS = ("resid_final", "norm_scale", "expert_index")


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
            for key in ("forward", "__nnsight__", "generate", "_get_stopping_criteria"):
                if key in before:
                    module.__dict__[key] = before[key]


def _term_buffer(buffers: BufferSet | None, name: str, shape: tuple[int, ...], dtype: torch.dtype,
                 device: torch.device) -> torch.Tensor:
    """Where a batch's term is written: the reused host buffer on the CPU, a new tensor on a device
    (a GPU batch reaches the host through :class:`~streamtap.writer.CudaStager`'s pinned buffers)."""
    if buffers is not None and device.type == "cpu":
        return buffers.take(name, shape, dtype)
    return torch.empty(shape, dtype=dtype, device=device)


class Tap:
    """Context manager: every forward of the model inside the block is appended to the store.

    Use ``streamtap.tap(...)`` to make one. ``tokens`` and ``sequences`` count what this tap
    committed; ``store_tokens`` is the store's total, which differs on append.
    """

    def __init__(self, model, store, *, tokenizer=None, neurons: bool = False, append: bool = False,
                 overwrite: bool = False, model_name: str | None = None, check: bool = True,
                 how: str = "streamtap.tap", materialize: bool = False, store_dtype=None,
                 writer: str = "auto", queue_depth: int = DEFAULT_DEPTH, progress: bool = False,
                 compress: bool | None = None, break_lock: bool = False, storage_options: dict | None = None):
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
        self.rank, self.world = process_rank()
        self.materialize = bool(materialize)
        self.store_dtype = self._lossy_dtype(store_dtype)
        choose_mode(writer, torch.device("cpu"))  # refuse an unknown mode before anything is touched
        if queue_depth < 1:
            raise ValueError(f"queue_depth must be at least 1, got {queue_depth}")
        self.writer_mode, self.queue_depth, self.compress = writer, queue_depth, compress
        self.writer = StoreWriter(rank_store(store, self.rank, self.world), append=append, overwrite=overwrite,
                                  storage_options=storage_options)
        self.break_lock = break_lock
        self.pipeline: Pipeline | None = None
        self._stager: CudaStager | None = None
        self._pool: BufferPool | None = None  # host buffers the sinks copy each forward's terms into
        self._late_pool: BufferPool | None = None  # host buffers of what is made after it (messages, lossy casts)
        self._next_sequence = 0
        self._W_O = None
        self.max_positions = _max_positions(self.module.config)
        self._signature = inspect.signature(type(self.module).forward)
        # each per-token term is copied out the moment its module produces it (streamtap.term_sinks);
        # only what a term needs whole (mixture-of-experts routing) is kept until the forward ends
        self._routes = self._term_routes()
        self._keep = self._kept_values()
        self._inside = False
        self._snapshot = None
        self._spec: StoreSpec | None = None
        self._static: dict | None = None  # the store's weights, from before the first forward until written
        self._text_cache: dict[int, str] = {}
        self.check = check
        self.progress = progress
        self._bar = None
        self._generation = None  # the state of the model.generate call running in the block, if any

    # -- context -------------------------------------------------------------------------------
    def __enter__(self) -> "Tap":
        import nnsight

        bound_allocator()  # flat peak RSS or heap reuse, by machine (streamtap.writer.mmap_threshold); may raise
        self.writer.lock(self.break_lock)  # one writer per store: a second one fails here, before any work
        self._snapshot = _ModuleTreeSnapshot(self.module)
        with warnings.catch_warnings():
            # BERT-style blocks have a child named ``output``; nnsight renames its envoy and says so,
            # which matters to attribute navigation only, and the tap addresses modules by path
            warnings.filterwarnings("ignore", message=".*has a submodule named 'output'")
            self.envoy = self._given_envoy if self._given_envoy is not None else nnsight.NNsight(self.module)
        # nnsight's controller is the root's forward now; the tap sits in front of it for the block
        self._controller = self.module.__dict__["forward"]
        self.module.__dict__["forward"] = self._forward
        self._follow_generate()
        if self.check:
            try:
                self_check(self)
            except BaseException:
                self._snapshot.restore()
                self.writer.unlock()
                raise
        if self.progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(unit="tok", desc="tap", dynamic_ncols=True)
        return self

    def _follow_generate(self) -> None:
        """Route the model's ``generate`` (and the stopping criteria it builds) through the tap.

        Both are instance attributes for the block's duration and are removed with the tap's
        ``forward``; ``streamtap.generation`` explains how the steps are followed.
        """
        generate = getattr(self.module, "generate", None)
        criteria = getattr(self.module, "_get_stopping_criteria", None)
        if not callable(generate) or not callable(criteria):
            return  # not a generative transformers model (or a version without the hook): forwards only
        self._original_generate, self._original_criteria = generate, criteria
        self.module.__dict__["generate"] = self._generate
        self.module.__dict__["_get_stopping_criteria"] = self._stopping_criteria

    def _generate(self, *args, **kwargs):
        if self._generation is not None:
            raise StreamtapError("model.generate was called inside its own generate; streamtap follows one at a time")
        try:
            bound = inspect.signature(self._original_generate).bind_partial(*args, **kwargs).arguments
        except TypeError:
            bound = kwargs
        self._generation = Generation(assistant_model=bound.get("assistant_model"))
        try:
            return self._original_generate(*args, **kwargs)
        finally:
            self._generation = None
            if self._bar is not None:  # the call is done: what it could still add is nothing
                self._bar.total = self._bar.n
                self._bar.refresh()

    def _stopping_criteria(self, *args, **kwargs):
        criteria = self._original_criteria(*args, **kwargs)
        if self._generation is None:
            return criteria
        config = kwargs["generation_config"] if "generation_config" in kwargs else args[0]
        return self._generation.follow(config, criteria)

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        released = False
        try:
            try:
                if self.pipeline is not None:
                    self.pipeline.close(exc)  # drains: every batch handed over is committed
            finally:
                # a writer thread that a second Ctrl-C stopped waiting for may still commit: it keeps
                # the store (and its lock: a stale lock is taken over by the next writer on this host)
                released = self.pipeline is None or not self.pipeline.busy()
                if released:
                    self.writer.close()
            if self.store_dtype is not None and exc is None and self.writer.tokens > self.writer.found_tokens:
                self._measure_lossy_error()
        finally:
            try:
                if released:
                    self.writer.unlock()
            finally:
                self._snapshot.restore()
                self.envoy = None
                for pool in (self._pool, self._late_pool, self._stager and self._stager.pool):
                    if pool is not None:
                        pool.clear()

    def _lossy_dtype(self, store_dtype) -> torch.dtype | None:
        if store_dtype is None:
            return None
        name = str(store_dtype).removeprefix("torch.")
        compute = next(self.module.parameters()).dtype
        if name == str(compute).removeprefix("torch."):
            return None  # the compute dtype: exact, nothing lossy about it
        if name not in LOSSY_DTYPES:
            raise StreamtapError(f"store_dtype must be one of {LOSSY_DTYPES} (or the model's own dtype), got {name!r}")
        if compute.itemsize <= 2:
            raise StreamtapError(f"the model computes in {str(compute).removeprefix('torch.')}; storing it as {name} "
                                 "would save no space and lose precision. Leave store_dtype unset")
        return getattr(torch, name)

    def _measure_lossy_error(self) -> None:
        """Decompose the first and last tokens this tap stored, in their stored (lossy) precision,
        against the exactly stored final residual; the result goes into the store's attributes."""
        from .dataset import open as open_store
        from .invariant import verify

        ds = open_store(self.writer.target, storage_options=self.writer.storage_options)
        start, end = self.writer.found_tokens, self.writer.tokens
        n = LOSSY_ERROR_TOKENS
        picks = sorted({*range(start, min(end, start + n)), *range(max(start, end - n), end)})
        err = verify(ds.isel(token=picks), raise_on_error=False)
        attrs = self.writer.group.attrs
        rel, abs_ = float(err.attrs["max_rel_error"]), float(err.attrs["max_abs_error"])
        self.writer.group.update_attributes({  # one write (attrs.update writes once per key)
            "lossy_max_rel_error": max(rel, float(attrs.get("lossy_max_rel_error", 0.0))),
            "lossy_max_abs_error": max(abs_, float(attrs.get("lossy_max_abs_error", 0.0))),
            "lossy_error_tokens": int(attrs.get("lossy_error_tokens", 0)) + len(picks),
        })

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
        if self.pipeline is not None:
            self.pipeline.raise_pending()  # a writer error surfaces here, before more compute is spent
        if self._generation is not None:
            return self._generation_step(args, kwargs)
        input_ids, mask = self._inputs(args, kwargs)
        output, _ = self._capture(args, kwargs, input_ids, mask)
        self._advance(int(mask.sum()))
        return output

    def _generation_step(self, args, kwargs):
        """One forward of ``model.generate``: the prompt opens sequences, later steps extend them."""
        gen = self._generation
        bound = self._signature.bind_partial(self.module, *args, **kwargs).arguments
        gen.check_forward(bound.get("attention_mask"))
        if not gen.started:
            gen.check_prompt(given_cache(bound))
            input_ids, mask = self._inputs(args, kwargs, prompt=True)
            output, first = self._capture(args, kwargs, input_ids, mask)
            gen.start(mask, first_seq=first)
            self._advance(int(mask.sum()), gen.remaining())
            return output
        input_ids = bound["input_ids"]
        real, seq, pos = gen.step(input_ids.shape, bound.get("attention_mask"))
        if not bool(real.any()):  # every sequence has finished: nothing to capture, nothing to trace
            return self._controller(*args, **kwargs)
        output, _ = self._capture(args, kwargs, input_ids.cpu(), real, seq=seq, pos=pos, n_sequences=0)
        self._advance(int(real.sum()), gen.remaining())
        return output

    def _advance(self, n_tokens: int, remaining: int | None = None) -> None:
        """Move the progress bar; inside ``generate`` its total is what the call can still add (ETA)."""
        bar = self._bar
        if bar is None:
            return
        # outside generate the count is open-ended (no ETA); inside, the total is what the call
        # can still add at most (rows that stop early shrink it), which gives tqdm its ETA
        bar.total = None if remaining is None else bar.n + n_tokens + remaining
        bar.update(n_tokens)

    def _term_routes(self) -> dict[Where, list[Route]]:
        """Which module value (path, side) fills which variable and layer of a batch."""
        b = self.bound
        routes: dict[Where, list[Route]] = {}

        def add(key: str, route: Route) -> None:
            routes.setdefault(location(*b.taps[key]), []).append(route)

        L = b.n_layers
        for var in b.layout.embeds:
            if var in b.taps:
                add(var, Route(var))
        for layer in range(L):
            add(f"z.{layer}", Route("z", layer, L, tail=(b.n_heads, b.d_head)))
            add(f"mlp_out.{layer}", Route("mlp_out", layer, L))
            if self.neurons:
                add(f"neuron_act.{layer}", Route("neuron_act", layer, L))
        for k in range(len(b.norms)):
            add(f"norm.{k}", Route("norm_scale", k, len(b.norms), transform=lambda x, k=k: self._frozen_scale(x, k)))
        add("resid_final", Route("resid_final"))
        return routes

    def _kept_values(self) -> set[Where]:
        """The values a term is made from after the forward: a mixture-of-experts layer's routing."""
        return {location(*tap) for key, tap in self.bound.taps.items()
                if key.split(".")[0] in ("experts", "shared", "shared_gate")}

    def _slots(self, mask: torch.Tensor, buffers: BufferSet | None) -> TermSlots:
        return TermSlots(self._routes, mask, lambda name, shape, dtype, device: _term_buffer(buffers, name, shape, dtype, device))

    def _traced(self, args, kwargs, slots: TermSlots, keep: set[Where]):
        """One forward through nnsight: (model output, the values kept whole); ``slots`` is filled."""
        self._inside = True
        try:
            with self.envoy.trace(*args, **kwargs):
                kept = sink(self.envoy, keep, slots)
                output = self.envoy.output.save()
        finally:
            self._inside = False
        return output, KeptValues(kept)

    def _capture(self, args, kwargs, input_ids: torch.Tensor, mask: torch.Tensor, **where) -> tuple[Any, int]:
        """One forward whose terms go straight into a set of reused buffers, then to the writer.
        Returns (model output, the sequence number the batch's first row got)."""
        if self._pool is None:
            self._pool = BufferPool(sets=self.queue_depth + 2, shed=True)
        if self._spec is None and self._static is None:
            # built now, between forwards: building them beside the first batch's output and terms
            # (GPT-2 shape: 393 MiB of logits, a 162 MiB set) made that hand-over the capture's peak
            self._static = self.bound.static_weights(self.neurons)
        buffers = self._pool.acquire()
        try:
            slots = self._slots(mask, buffers)
            output, kept = self._traced(args, kwargs, slots, self._keep)
            return output, self._record(kept, slots, buffers, input_ids, mask, **where)
        except BaseException:
            if not buffers.handed:
                buffers.release()
            raise

    def _inputs(self, args, kwargs, *, prompt: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, real-token mask) on the host; refuses what cannot be placed in the store.

        ``prompt``: the first forward of a ``generate`` call, where a row may have no real token yet
        (prefill in chunks: a left-padded row's first chunk can be all padding).
        """
        bound = self._signature.bind_partial(self.module, *args, **kwargs).arguments
        input_ids, mask, embeds = (bound.get(k) for k in ("input_ids", "attention_mask", "inputs_embeds"))
        reference = input_ids if input_ids is not None else embeds
        if reference is None:
            raise InputError("the forward got neither input_ids nor inputs_embeds; nothing to capture")
        if self._generation is None:
            refuse_cached_forward(given_cache(bound))
        shape = tuple(reference.shape[:2])
        if len(shape) < 2 or 0 in shape:
            raise InputError(f"empty batch (shape {tuple(reference.shape)}): give at least one token per sequence")
        if self.max_positions is not None and shape[1] > self.max_positions:
            raise InputError(
                f"sequence length {shape[1]} exceeds the model's {self.max_positions} positions; "
                "shorten the input or truncate it (streamtap.capture(..., truncate=True), --truncate)"
            )
        if input_ids is None:
            raise InputError(
                "the forward got inputs_embeds instead of input_ids; streamtap reads the embedding term "
                "from the model's embedding module, which inputs_embeds bypasses. Pass input_ids"
            )
        # on the host before the forward is launched: on a GPU, later copies of these would wait for it
        if mask is None:
            mask = torch.ones(shape, dtype=torch.long)
        input_ids, mask = input_ids.cpu(), mask.cpu().to(torch.bool)
        empty = (~mask.any(dim=1)).nonzero().flatten().tolist()
        if empty and not prompt:
            raise InputError(f"batch rows {empty} have no real tokens (attention_mask all zero); drop them")
        return input_ids, mask

    # -- one batch ------------------------------------------------------------------------------
    def _terms(self, kept: KeptValues, slots: TermSlots, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """The batch's real tokens of every stored per-token variable, in the store's order.

        The sinks wrote them during the forward (into the reused host buffers when the model runs
        on the CPU, into new tensors on its device otherwise); per-expert terms are made now.
        """
        sunk = slots.terms()
        b = self.bound
        out = {var: sunk[var] for var in b.layout.embeds if var in sunk}
        for var in ("z", "mlp_out", "neuron_act"):
            if var in sunk:
                out[var] = sunk[var]
        if b.moe:
            out.update(self._expert_terms(kept, mask))
        if "norm_scale" in sunk:
            out["norm_scale"] = sunk["norm_scale"]
        out["resid_final"] = sunk["resid_final"]
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

    def _record(self, kept: KeptValues, slots: TermSlots, buffers: BufferSet, input_ids: torch.Tensor,
                mask: torch.Tensor, *, seq: torch.Tensor | None = None, pos: torch.Tensor | None = None,
                n_sequences: int | None = None) -> int:
        """Turn one forward's terms into a batch and hand it to the writer (``input_ids``, ``mask``: host).

        By default every row opens a new sequence (a plain forward). A ``generate`` step passes the
        ``seq`` and ``pos`` of its real tokens (host tensors in mask order) and ``n_sequences=0``.
        Returns the sequence number the batch's first row got by default.

        On the model's thread only what must be: the per-expert terms, the optional messages and
        lossy cast, and on a GPU the launch of the asynchronous copy to pinned host memory.
        Compression and chunk writes happen in the writer.
        """
        out = self._terms(kept, slots, mask)
        kept.clear()  # the writer needs only the terms: the kept activations go now
        return self._hand_over(out, buffers, input_ids, mask, seq, pos, n_sequences)

    def _hand_over(self, out, buffers, input_ids, mask, seq, pos, n_sequences) -> int:
        device = out["resid_final"].device
        on_gpu = device.type == "cuda"
        if not on_gpu:  # a GPU batch is checked by the writer, once it is on the host: no sync here
            self._check_finite(out, mask)
        late = self._late_buffers(buffers) if device.type == "cpu" else None  # host buffers serve the CPU only
        if self.materialize:
            out["messages"] = self._messages(out["z"], late)
        if self.store_dtype is not None:
            out = self._lossy(out, check=not on_gpu, buffers=late)
        if self._spec is None:
            spec = self._make_spec(out)
            mode = choose_mode(self.writer_mode, device)
            self.writer.compress = self.compress  # None: by dtype (store.COMPRESSED_BY_DEFAULT)
            self.writer.prepare(spec)
            # the weights are in the store now; kept, their per-head copies would sit in memory for
            # the whole capture (GPT-2 shape: 108 MiB; with neurons, 216 MiB)
            self._spec, self._static = dataclasses.replace(spec, static={}), None
            self._next_sequence = self.writer.sequences
            self.pipeline = make_pipeline(self.writer, mode, device, self.queue_depth)
        n_seq = mask.shape[0] if n_sequences is None else n_sequences
        first = self._next_sequence
        if seq is None:
            seq = torch.arange(mask.shape[0]).unsqueeze(1).expand_as(mask)[mask] + first
        if pos is None:
            pos = (mask.cumsum(dim=1) - 1)[mask]
        coords = {
            "seq": seq.numpy().astype("int64"),
            "pos": pos.numpy().astype("int32"),
            "token_id": input_ids[mask].numpy().astype("int64"),
        }
        if self._spec.with_text:
            coords["text"] = self._texts(coords["token_id"])
        if on_gpu:
            if self._stager is None:
                self._stager = CudaStager(device, sets=self.queue_depth + 2)
            host, event, release = self._stager.stage(out)
            job = Job(host, n_seq, ready=event, release=lambda: (release(), buffers.release()), extra=coords,
                      check=lambda arrays, mask=mask: self._check_host(arrays, mask))
        else:
            job = Job(out, n_seq, extra=coords, release=buffers.release)
        del out
        buffers.handed = True
        self.pipeline.submit(job)  # blocks while the writer is queue_depth batches behind; releases the buffers
        self._next_sequence += n_seq
        return first

    def _late_buffers(self, buffers: BufferSet) -> BufferSet | None:
        """Buffers for what is made after the forward, from a pool of their own, taken only now.

        The sinks' set is taken before the forward, while the previous batch's set is still being
        written, so a tap briefly holds two of them (the idle one is shed once its writes land, see
        ``BufferPool``); what is made after the forward waits for a set here instead, by which time
        the previous batch's writes have usually landed, so materialized
        messages (GPT-2 shape: 906 MB a batch) take one set, not two: peak 3,202 MiB, against
        4,116 MiB with the messages in the sinks' sets (2,968 MiB before the sinks, which held one
        set). Released with ``buffers``.
        """
        if not (self.materialize or self.store_dtype is not None):
            return None
        if self._late_pool is None:
            self._late_pool = BufferPool(sets=self.queue_depth + 2, shed=True)
        buffers.after = self._late_pool.acquire()
        return buffers.after

    def _messages(self, z: torch.Tensor, buffers: BufferSet | None) -> torch.Tensor:
        """Materialized messages, z @ W_O per head (float32 sums, stored in z's dtype).

        One batched product per layer written straight into its slot of the (reused) buffer: a
        single einsum into a new array took 2.7x as long here, most of it faulting in the array.
        """
        if self._W_O is None or self._W_O.device != z.device:
            W_O = self.bound.static_weights(neurons=False, attention=False)["W_O"][1]
            self._W_O = W_O.detach().to(z.device, torch.float32)
        W = self._W_O
        shape = (z.shape[0], *W.shape[:2], W.shape[-1])  # token, layer, head, d_model
        dst = _term_buffer(buffers, "messages", shape, z.dtype, z.device)
        for layer in range(W.shape[0]):
            by_head = z[:, layer].transpose(0, 1)  # head, token, d_head
            if z.dtype == torch.float32:
                torch.bmm(by_head, W[layer], out=dst[:, layer].transpose(0, 1))
            else:
                dst[:, layer] = torch.bmm(by_head.float(), W[layer]).transpose(0, 1)
        return dst

    def _lossy(self, out: dict[str, torch.Tensor], check: bool, buffers: BufferSet | None) -> dict[str, torch.Tensor]:
        """Cast the terms to the lossy store dtype; the final residual (the reference) stays exact."""
        cast = {}
        for name, t in out.items():
            if name in EXACT_ALWAYS or not t.is_floating_point():
                cast[name] = t
                continue
            cast[name] = _term_buffer(buffers, f"{name}.stored", tuple(t.shape), self.store_dtype, t.device).copy_(t)
            if check and not bool(torch.isfinite(cast[name]).all()):
                raise StreamtapError(self._range_message(name, t))
        return cast

    def _range_message(self, name: str, t: torch.Tensor | None) -> str:
        dtype = str(self.store_dtype).removeprefix("torch.")
        held = f"values up to {float(t.abs().max()):.4g}" if t is not None else "values"
        return (f"{name} holds {held} beyond what {dtype} can store (max {torch.finfo(self.store_dtype).max:.4g}); "
                "the batch was not written. Store in bfloat16 (the range of float32) or in the model's "
                "dtype (store_dtype=None)")

    def _check_host(self, arrays: dict, mask: torch.Tensor) -> None:
        """The writer's check of a GPU batch, on its host copy (the same errors as on the CPU)."""
        out = {name: a for name, a in arrays.items() if isinstance(a, torch.Tensor)}
        self._check_finite(out, mask)
        if self.store_dtype is not None:
            for name, t in out.items():
                if name not in EXACT_ALWAYS and t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    raise StreamtapError(self._range_message(name, None))

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
                "shared_expert_out": ("layer", "d_model"), "messages": ("layer", "head", "d_model")}
        variables = {name: VariableSpec(dims.get(name, ("d_model",)), tuple(t.shape[1:]), t.dtype)
                     for name, t in out.items()}
        static = self._static  # built by _capture before the first forward, the only way here
        dtype = str(out["resid_final"].dtype).removeprefix("torch.")  # the compute dtype, even in a lossy store
        identity = {
            "schema_version": SCHEMA_VERSION,
            "layout": b.name,
            "model_type": self.module.config.model_type,
            "dtype": dtype,
            "neurons": self.neurons,
            "weights_fingerprint": fingerprint(static),
            "materialized": self.materialize,
            "store_dtype": None if self.store_dtype is None else str(self.store_dtype).removeprefix("torch."),
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
            **b.store_attrs(),
        }
        return StoreSpec(variables, static, attrs, with_text=self.tokenizer is not None, identity=identity)


def tap(model, store, *, tokenizer=None, neurons: bool = False, append: bool = False,
        overwrite: bool = False, model_name: str | None = None, check: bool = True,
        materialize: bool = False, store_dtype=None, writer: str = "auto",
        queue_depth: int = DEFAULT_DEPTH, progress: bool = False, compress: bool | None = None,
        break_lock: bool = False, storage_options: dict | None = None) -> Tap:
    """Wrap existing inference code: each forward of ``model`` inside the block is captured.

    ``model.generate(...)`` inside the block is followed step by step (greedy decoding or sampling,
    KV cache on, batched with left padding): the prompt, then each newly fed token, is stored at its
    sequence's ``seq`` and ``pos`` (see ``streamtap.generation``). ``progress=True`` shows a bar of
    tokens captured and tokens/s, with an ETA while a ``generate`` call runs.

    ``store`` is a path, a URL (``s3://bucket/run.zarr`` through fsspec and s3fs; ``storage_options``
    such as ``{"endpoint_url": ...}`` go to the filesystem, and s3fs reads ``AWS_ENDPOINT_URL`` and
    the usual AWS variables) or a zarr store (``zarr.storage.MemoryStore()`` keeps it in memory).

    One writer per store: entering the block takes the store's lock (the key ``streamtap.lock``,
    created exclusively, also on S3), and a second tap or capture on the same store raises
    ``StoreLockedError`` naming the holder. A lock left by a writer that died on this host is taken
    over with a warning; one from another host only with ``break_lock=True``.
    ``check`` runs the invariant layer by layer on a short probe when the block opens, so a layout
    that no longer matches the model fails in milliseconds rather than after hours of capture.

    ``materialize=True`` also stores every head's message (token, layer, head, d_model), which
    ``streamtap.open`` then reads instead of deriving: ``n_heads`` times the bytes of ``z``, for
    readers that want messages without the arithmetic. ``store_dtype="float16"`` (or
    ``"bfloat16"``) stores a float32 model's terms in half precision: lossy, so the final residual is
    kept exact and the decomposition error this costs is measured at the end of the block and
    written into the store's attributes (``lossy_max_rel_error``, shown by ``streamtap info``).

    ``writer`` is ``"auto"``, ``"thread"`` or ``"inline"`` (see ``streamtap.writer``): a background
    writer behind a queue of ``queue_depth`` batches, or writing on the model's thread. ``"auto"``
    takes the thread on a GPU or where torch leaves CPU cores free. A writer error is raised at the
    next forward or when the block ends; leaving the block writes and commits every batch handed over.
    ``compress``: ``True`` stores the per-token arrays Blosc-zstd-1-compressed, ``False`` raw; by
    default only bfloat16 terms are compressed (1.27x), since float32 and float16 activations shrink
    only 1.08x and encoding them would cost the forward 10-15% on a fast CPU (docs/pipeline.md).
    """
    return Tap(model, store, tokenizer=tokenizer, neurons=neurons, append=append,
               overwrite=overwrite, model_name=model_name, check=check, materialize=materialize,
               store_dtype=store_dtype, writer=writer, queue_depth=queue_depth, progress=progress,
               compress=compress, break_lock=break_lock, storage_options=storage_options)


def _batches(items: Sequence, size: int) -> Iterable[Sequence]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def capture(model, texts, store, *, tokenizer=None, batch_size: int = 8, max_length: int | None = None,
            truncate: bool = False, neurons: bool = False, append: bool = False, overwrite: bool = False,
            model_name: str | None = None, progress: bool = False, check: bool = True,
            materialize: bool = False, store_dtype=None, writer: str = "auto",
            resume: bool = False, queue_depth: int = DEFAULT_DEPTH, compress: bool | None = None,
            break_lock: bool = False, storage_options: dict | None = None) -> Tap:
    """Capture a corpus in one call: strings (with a tokenizer) or lists of token ids.

    Under torch.distributed each rank captures a contiguous slice into its own store below
    ``store``; ``streamtap.open(store)`` reads them back as one (see ``streamtap.ranks``).

    ``resume=True`` continues an interrupted capture of the same corpus: the sequences the store
    already committed are skipped, so none is duplicated or missing (it implies ``append``). After a
    full disk (``StoreFullError``), a SIGKILL or Ctrl-C, the same call with ``resume=True`` completes it.
    The other options are :func:`tap`'s (``store`` may be an ``s3://`` URL; ``break_lock`` and
    ``storage_options`` as there).

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
    rank, world = process_rank()
    texts = mine = shard(texts, rank, world)  # each rank of a data-parallel job captures its own slice
    if resume:
        done_sequences = committed_sequences(rank_store(store, rank, world), storage_options)
        texts, append = texts[done_sequences:], True
        if not texts:  # finished before: nothing to add, and the returned tap says so (0 tokens)
            return Tap(model, store, tokenizer=tokenizer, neurons=neurons, append=True, check=False,
                       model_name=model_name, how="streamtap.capture", storage_options=storage_options)
    module, _ = _unwrap(model)
    limit = _max_positions(module.config)
    if max_length is not None:
        limit = min(limit, max_length) if limit else max_length
    device = next(module.parameters()).device
    the_tap = Tap(model, store, tokenizer=tokenizer, neurons=neurons, append=append, overwrite=overwrite,
                  model_name=model_name, check=check, how="streamtap.capture", materialize=materialize,
                  store_dtype=store_dtype, writer=writer, queue_depth=queue_depth, compress=compress,
                  break_lock=break_lock, storage_options=storage_options)
    bar = _progress(progress, len(texts))
    done = 0  # tokens of this call (the tap's count includes what an appended store already had)
    try:
        with the_tap, torch.no_grad():
            if resume:  # under the lock now: a writer that was still committing before cannot have moved on since
                texts = mine[committed_sequences(the_tap.writer.store, storage_options=None):]
                if bar is not None:
                    bar.total = len(texts)
            for chunk in _batches(texts, batch_size):
                ids, mask = _encode(chunk, tokenizer, limit, truncate)
                module(input_ids=ids.to(device), attention_mask=mask.to(device))
                if bar is not None:
                    done += int(mask.sum())
                    bar.update(len(chunk))
                    bar.set_postfix_str(f"{done:,} tok, {done / max(bar.format_dict['elapsed'], 1e-9):,.0f} tok/s")
    except KeyboardInterrupt:
        if bar is not None:
            bar.close()
            bar = None
        print(f"\nstreamtap: interrupted; the store is consistent with {the_tap.writer.sequences:,} sequences "
              f"committed. Resume with streamtap.capture(..., resume=True), or run the same `streamtap capture` "
              f"command again with --resume added (same --text, --model and --out).",
              file=sys.stderr, flush=True)
        raise
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
        slots = the_tap._slots(mask.bool(), None)
        _, kept = the_tap._traced((), {"input_ids": ids, "attention_mask": mask}, slots,
                                  the_tap._keep | {(p, "inputs") for p in blocks})
        terms = {k: v.double() for k, v in the_tap._terms(kept, slots, mask.bool()).items()}
        entering = [kept[p].input[0].double() for p in blocks]
    if not bool(torch.isfinite(terms["resid_final"]).all()):
        # a broken model, not a broken layout: the first real batch reports where it goes non-finite
        warnings.warn("the model produced non-finite values on the self-check probe; layout check skipped")
        return float("nan")
    static = b.static_weights(neurons=False, attention=False)
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
