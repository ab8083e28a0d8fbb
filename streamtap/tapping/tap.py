"""The tap: every forward of an unmodified model inside the block becomes one store batch.

The tap replaces nothing the model computes. Inside the ``with`` block the root module's forward is
routed through an nnsight trace whose sinks copy each term the layout names out of the forward as
the model produces it (``streamtap.tapping.sinks``); after the block, every attribute nnsight or
streamtap put on the module tree is removed, so the model is exactly the object it was before.
``model.generate`` inside the block is followed step by step (``streamtap.tapping.generation``).
Entering a tap changes nothing else in the process: no environment variable, allocator setting or
warning filter.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from ..errors import InputError, StreamtapError
from ..io.ranks import process_rank, rank_store
from ..io.writer import StoreWriter
from ..layouts import BoundLayout, bind, layout_for
from ..options import CaptureOptions
from .batch import Recorder
from .generation import Generation, given_cache, refuse_cached_forward
from .sinks import TermSlots, Where, envoy_for, location, trace, unwrap

LOSSY_ERROR_TOKENS = 2048   # tokens of each end of a lossy store the capture measures its error on


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


class NnsightForward:
    """How a tap runs a forward: through an nnsight trace on the live model (the default)."""

    reduces_norms = False   # norm inputs arrive whole; the recorder freezes their scales

    def __init__(self, tap: "Tap"):
        self.tap = tap

    def __call__(self, args, kwargs, slots: TermSlots, keep: set[Where]):
        return self.tap.traced(args, kwargs, slots, keep)


class Tap:
    """Context manager: every forward of the model inside the block is appended to the store.

    Made by :func:`streamtap.tap` (or :func:`streamtap.capture`). ``tokens`` and ``sequences`` count
    what this tap committed; ``store_tokens`` is the store's total, which differs on append.
    """

    def __init__(self, model, store, options: CaptureOptions | None = None, *, tokenizer=None,
                 created_by: str = "streamtap.tap", forward=None):
        self.options = options = options if options is not None else CaptureOptions()
        self.module, self._given_envoy = unwrap(model)
        if self.module.training:
            raise StreamtapError(
                "the model is in training mode (dropout would make the captured terms random); "
                "call model.eval() before tapping it"
            )
        self.bound: BoundLayout = bind(layout_for(self.module), self.module)
        if options.patterns:
            from ..layouts import pattern_support

            problem = pattern_support(self.bound)
            if problem:
                raise StreamtapError(f"patterns=True (--patterns) is not available for this {type(self.module).__name__}: "
                                     f"{problem}. Capture without it; the terms and their decomposition are unaffected")
        if options.neurons and self.bound.moe:
            raise StreamtapError(
                "per-neuron capture is not available for mixture-of-experts layers (their experts are "
                "fused); per-expert terms are stored instead. Capture without neurons=True (--neurons)"
            )
        if options.neurons and not self.bound.mlp_layers:
            raise StreamtapError(
                f"per-neuron capture is not available for this {type(self.module).__name__}: none of its layers "
                "has an MLP (every layer is a state-space mixer). Capture without neurons=True (--neurons)"
            )
        self.tokenizer = tokenizer
        self.rank, self.world = process_rank()
        self.writer = StoreWriter(rank_store(store, self.rank, self.world), append=options.append,
                                  overwrite=options.overwrite, storage_options=options.storage_options,
                                  compress=options.compress, direct_io=options.direct_io)
        self._forward_impl = forward if forward is not None else NnsightForward(self)
        model_name = (options.model_name or getattr(self.module.config, "_name_or_path", "")
                      or type(self.module).__name__)
        self.recorder = Recorder(self.bound, options, module=self.module, writer=self.writer, tokenizer=tokenizer,
                                 model_name=model_name, created_by=created_by,
                                 scales_reduced=self._forward_impl.reduces_norms)
        self.max_positions = self.bound.max_positions()
        embedding = self.module.get_input_embeddings() if hasattr(self.module, "get_input_embeddings") else None
        self.vocab_size = getattr(embedding, "num_embeddings", None)
        self._signature = inspect.signature(type(self.module).forward)
        self._inside = False
        self._snapshot = None
        self.envoy = None
        self._bar = None
        self._generation = None  # the state of the model.generate call running in the block, if any

    # -- context -------------------------------------------------------------------------------
    def __enter__(self) -> "Tap":
        self.writer.lock(self.options.break_lock)  # one writer per store: a second one fails here, before any work
        self._snapshot = _ModuleTreeSnapshot(self.module)
        self.envoy = self._given_envoy if self._given_envoy is not None else envoy_for(self.module)
        # nnsight's controller is the root's forward now; the tap sits in front of it for the block
        self._controller = self.module.__dict__["forward"]
        self.module.__dict__["forward"] = self._forward
        self._follow_generate()
        if self.options.check:
            from .self_check import self_check

            try:
                self_check(self)
            except BaseException:
                self._snapshot.restore()
                self.writer.unlock()
                raise
        if self.options.progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(unit="tok", desc="tap", dynamic_ncols=True)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        released = False
        pipeline = self.recorder.pipeline
        try:
            try:
                if pipeline is not None:
                    pipeline.close(exc)  # drains: every batch handed over is committed
            finally:
                # a writer thread that a second Ctrl-C stopped waiting for may still commit: it keeps
                # the store (and its lock: a stale lock is taken over by the next writer on this host)
                released = pipeline is None or not pipeline.busy()
                if released:
                    self.writer.close()
            if self.recorder.store_dtype is not None and exc is None and self.writer.tokens > self.writer.found_tokens:
                self._measure_lossy_error()
        finally:
            try:
                if released:
                    self.writer.unlock()
            finally:
                self._snapshot.restore()
                self.envoy = None
                self.recorder.close()

    def _follow_generate(self) -> None:
        """Route the model's ``generate`` (and the stopping criteria it builds) through the tap.

        Both are instance attributes for the block's duration and are removed with the tap's
        ``forward``; ``streamtap.tapping.generation`` explains how the steps are followed.
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

    def _measure_lossy_error(self) -> None:
        """Decompose the first and last tokens this tap stored, in their stored (lossy) precision,
        against the exactly stored final residual; the result goes into the store's attributes."""
        from ..dataset import open as open_store
        from ..invariant import verify

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
    def pipeline(self):
        """The writer pipeline (``mode``, ``wait_seconds``...), from the first batch on; None before."""
        return self.recorder.pipeline

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
        if self.recorder.pipeline is not None:
            self.recorder.pipeline.raise_pending()  # a writer error surfaces here, before more compute is spent
        if self._generation is not None:
            return self._generation_step(args, kwargs)
        input_ids, mask = self._inputs(args, kwargs)
        output, _ = self.capture_forward(args, kwargs, input_ids, mask)
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
            output, first = self.capture_forward(args, kwargs, input_ids, mask)
            gen.start(mask, first_seq=first)
            self._advance(int(mask.sum()), gen.remaining())
            return output
        input_ids = bound["input_ids"]
        real, seq, pos = gen.step(input_ids.shape, bound.get("attention_mask"))
        if not bool(real.any()):  # every sequence has finished: nothing to capture, nothing to trace
            return self._controller(*args, **kwargs)
        output, _ = self.capture_forward(args, kwargs, input_ids.cpu(), real, seq=seq, pos=pos, n_sequences=0)
        self._advance(int(real.sum()), gen.remaining())
        return output

    def _advance(self, n_tokens: int, remaining: int | None = None) -> None:
        """Move the progress bar; inside ``generate`` its total is what the call can still add (ETA)."""
        bar = self._bar
        if bar is None:
            return
        bar.total = None if remaining is None else bar.n + n_tokens + remaining
        bar.update(n_tokens)

    def traced(self, args, kwargs, slots: TermSlots, keep: set[Where]):
        """One forward through nnsight: (model output, the values kept whole); ``slots`` is filled."""
        self._inside = True
        try:
            return trace(self.envoy, args, kwargs, slots, keep)
        finally:
            self._inside = False

    def capture_forward(self, args, kwargs, input_ids: torch.Tensor, mask: torch.Tensor, **where) -> tuple[Any, int]:
        """One forward whose terms go straight into a set of reused buffers, then to the writer.

        Returns (model output, the sequence number the batch's first row got).
        """
        recorder = self.recorder
        buffers = recorder.acquire()
        try:
            slots = recorder.slots(mask, buffers)
            output, kept = self._forward_impl(args, kwargs, slots, recorder.keep)
            return output, recorder.record(kept, slots, buffers, input_ids, mask, **where)
        except BaseException:
            if not buffers.handed:
                buffers.release()
            raise

    def probe(self, input_ids: torch.Tensor, entering: list[str]):
        """One unpadded forward over ``input_ids`` (nothing is stored): its terms, the input of each
        module in ``entering`` (full paths under the model) and the model's logits (None for a model
        without them): what the self-check compares."""
        mask = torch.ones_like(input_ids)
        recorder = self.recorder
        keep = recorder.keep | {location(p, "input") for p in entering}
        with torch.no_grad():
            slots = recorder.slots(mask.bool(), None)
            output, kept = self.traced((), {"input_ids": input_ids, "attention_mask": mask}, slots, keep)
            terms = recorder.terms(kept, slots, mask.bool())
            inputs = [kept[location(p, "input")[0]].input[0] for p in entering]
        logits = getattr(output, "logits", None)
        return terms, inputs, None if logits is None else logits.reshape(-1, logits.shape[-1])

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
        real = input_ids[mask]
        if self.vocab_size is not None and real.numel() and (int(real.min()) < 0 or int(real.max()) >= self.vocab_size):
            bad = real[(real < 0) | (real >= self.vocab_size)]
            row = int(((input_ids < 0) | (input_ids >= self.vocab_size)).logical_and(mask).any(dim=1).nonzero()[0])
            raise InputError(f"batch row {row} holds token id {int(bad[0])}, outside the model's vocabulary of "
                             f"{self.vocab_size} ids (0..{self.vocab_size - 1}); give ids of this model's tokenizer")
        empty = (~mask.any(dim=1)).nonzero().flatten().tolist()
        if empty and not prompt:
            raise InputError(f"batch rows {empty} have no real tokens (attention_mask all zero); drop them")
        return input_ids, mask


__all__ = ["Tap", "NnsightForward"]
