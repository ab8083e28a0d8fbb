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
import warnings
from typing import Any

import numpy as np
import torch

from ..errors import InferredLayoutWarning, InputError, LayoutError, StreamtapError, UnsupportedArchitectureError
from ..io.ranks import process_rank, rank_store
from ..io.writer import StoreWriter
from ..layouts import GUIDE, BoundLayout, bind, layout_candidates
from ..options import CaptureOptions
from .batch import Recorder
from .generation import Generation, given_cache, refuse_cached_forward
from .sinks import TermSlots, Where, envoy_for, location, trace, unwrap

LOSSY_ERROR_TOKENS = 2048   # tokens of each end of a lossy store the capture measures its error on


# The instance attributes a tap puts on modules: nnsight's controller and its state on every module it
# traces, and the tap's own routing of the root's forward and generate. Nothing else is the tap's.
TAP_ATTRIBUTES = ("forward", "__nnsight__", "generate", "_get_stopping_criteria")


class _ModuleTreeSnapshot:
    """The tap's attributes on every module as they were, so the tap can take back exactly what it put on.

    Only those are restored (or removed): state the model creates itself inside the block stays, as it
    would have without the tap. Transformers, for one, installs forward hooks lazily on the first
    forward that asks for attentions or hidden states and marks that in an attribute; removing the
    mark but not the hooks would make every later forward record each layer twice.
    """

    def __init__(self, root: torch.nn.Module):
        self.saved = [(m, {k: m.__dict__[k] for k in TAP_ATTRIBUTES if k in m.__dict__}) for m in root.modules()]

    def restore(self) -> None:
        for module, before in self.saved:
            for key in TAP_ATTRIBUTES:
                if key in before:
                    module.__dict__[key] = before[key]
                else:
                    module.__dict__.pop(key, None)


def _closest(module, failures: list) -> str:
    """Why no inferred layout was accepted: the candidate that added up furthest, where it stopped
    adding up and by how much (the relative error), and where to go from there."""
    model_type = module.config.model_type
    measured = [(b, e) for b, e in failures if getattr(e, "layer", None) is not None]
    head = (f"streamtap has no layout file for model_type {model_type!r} ({type(module).__name__}) and none of the "
            f"{len(failures)} layouts inferred from its module tree adds up exactly on the live model")
    tail = (f". Write a family layout declaring what this model adds to the stream (see {GUIDE}, "
            "\"Inferred layouts\") and register it with streamtap.layouts.register(...)")
    if not measured:
        reasons = "; ".join(f"{type(e).__name__}: {e}" if e is not None else "the probe was not finite"
                            for _, e in failures[:2])
        return f"{head} ({reasons}){tail}"
    bound, exc = max(measured, key=lambda be: (be[1].layer, -be[1].rel_error))
    from ..layouts.infer import declaration

    block = ("the logits (the final norm and unembedding)" if exc.layer > bound.n_layers else
             "the embeddings" if exc.layer == 0 else f"block {exc.layer - 1} (its attention and MLP writes)")
    return (f"{head}. The closest, {declaration(bound.layout)}, first fails at {block}: {exc.where} "
            f"(relative error {exc.rel_error:.3g}, bound {exc.bound:.1g}), so something there adds to the stream "
            f"that the layout does not declare (a scale, a norm, a term){tail}")


def _real_rows(x: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """(real token, ...) of a (batch, position, ...) value, or of one that comes flattened (OPT)."""
    if x.dim() >= 2 and tuple(x.shape[:2]) == tuple(real.shape):
        return x[real.to(x.device)]
    return x.reshape(-1, *x.shape[2:] if x.dim() > 2 else x.shape[1:])[real.reshape(-1).to(x.device)]


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
                 created_by: str = "streamtap.tap", forward=None, proven=None, fill_summaries: bool = True):
        self.options = options = options if options is not None else CaptureOptions()
        self.module, self._given_envoy = unwrap(model)
        if self.module.training:
            raise StreamtapError(
                "the model is in training mode (dropout would make the captured terms random); "
                "call model.eval() before tapping it"
            )
        # ``proven``: an inferred layout a self-check already proved on this very model (st.remote.plan)
        self._candidates = self._bind_candidates([proven] if proven is not None else layout_candidates(self.module))
        self.bound: BoundLayout = self._candidates[0]
        self.inferred = self.bound.layout.inferred and proven is None
        if self.inferred and not options.check:
            raise UnsupportedArchitectureError(
                f"check=False (--no-check) is refused for this {type(self.module).__name__}: streamtap has no layout "
                f"file for model_type {self.module.config.model_type!r}, and an inferred layout is used only once the "
                "attach-time self-check proves it exact. Drop check=False, or write a family layout (docs/layouts.md)"
            )
        # an inferred layout's patterns wait for the self-check, which proves its queries and keys or refuses
        self._check_options(self.bound, patterns=not self.inferred)
        self.tokenizer = tokenizer
        self.rank, self.world = process_rank()
        self.writer = StoreWriter(rank_store(store, self.rank, self.world), append=options.append,
                                  overwrite=options.overwrite, storage_options=options.storage_options,
                                  compress=options.compress, direct_io=options.direct_io)
        self._forward_impl = forward if forward is not None else NnsightForward(self)
        model_name = (options.model_name or getattr(self.module.config, "_name_or_path", "")
                      or type(self.module).__name__)
        self._recorder_args = dict(module=self.module, writer=self.writer, tokenizer=tokenizer,
                                   model_name=model_name, created_by=created_by,
                                   scales_reduced=self._forward_impl.reduces_norms)
        self._use(self.bound)
        embedding = self.module.get_input_embeddings() if hasattr(self.module, "get_input_embeddings") else None
        self.vocab_size = getattr(embedding, "num_embeddings", None)
        self._signature = inspect.signature(type(self.module).forward)
        self._inside = False
        self._snapshot = None
        self._tapped: dict[str, torch.nn.Module] = {}
        self.envoy = None
        self._bar = None
        self._generation = None  # the state of the model.generate call running in the block, if any
        # an append first summarises the committed sequences its store's summaries miss, from the stored token
        # ids (``streamtap.capture`` turns it off: a resume runs its own texts again, which works for any positions)
        self._fill_summaries = fill_summaries

    # -- the layout ------------------------------------------------------------------------------
    def _bind_candidates(self, layouts: list) -> list[BoundLayout]:
        """The candidate layouts bound to the model; a family layout's bind error is raised as it is,
        inferred candidates that do not bind are dropped (inference proposes, binding and the
        self-check dispose)."""
        if not layouts[0].inferred:
            return [bind(layouts[0], self.module)]
        bound, errors = [], []
        for layout in layouts:
            try:
                bound.append(bind(layout, self.module))
            except (LayoutError, AttributeError, TypeError, ValueError) as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
        if not bound:
            raise UnsupportedArchitectureError(
                f"streamtap has no layout for model_type {self.module.config.model_type!r}, and none of the "
                f"{len(layouts)} layouts inferred from its module tree binds to it ({errors[0]}). Write a family "
                "layout (see docs/layouts.md) and register it with streamtap.layouts.register(...)")
        return bound

    def _check_options(self, bound: BoundLayout, patterns: bool = True) -> None:
        """Refuse the options this layout cannot serve, before anything is written."""
        if self.options.patterns and patterns:
            from ..layouts import pattern_support

            problem = pattern_support(bound)
            if problem:
                raise StreamtapError(f"patterns=True (--patterns) is not available for this {type(self.module).__name__}: "
                                     f"{problem}. Capture without it; the terms and their decomposition are unaffected")
        if self.options.neurons and bound.moe:
            raise StreamtapError(
                "per-neuron capture is not available for mixture-of-experts layers (their experts are "
                "fused); per-expert terms are stored instead. Capture without neurons=True (--neurons)"
            )
        if self.options.neurons and not bound.mlp_layers:
            raise StreamtapError(
                f"per-neuron capture is not available for this {type(self.module).__name__}: none of its layers "
                "has an MLP (every layer is a state-space mixer). Capture without neurons=True (--neurons)"
            )

    def _use(self, bound: BoundLayout) -> None:
        """Capture with ``bound`` from now on (the recorder's routes follow the layout)."""
        self.bound = bound
        self.recorder = Recorder(bound, self.options, **self._recorder_args)
        self.max_positions = bound.max_positions()

    def _prove(self) -> None:
        """Use the first inferred layout the self-check proves exact on the live model and say so once;
        refuse the model, naming the closest candidate and where it failed, when none is proven."""
        from .self_check import prove_attention, self_check

        failures = []
        for bound in self._candidates:
            self._use(bound)
            try:
                worst = self_check(self)
            except (StreamtapError, RuntimeError, ValueError, KeyError, IndexError, TypeError) as exc:
                failures.append((bound, exc))
                continue
            if worst != worst:  # nan: the probe was not finite, so nothing was proven
                failures.append((bound, None))
                continue
            bound, proof = prove_attention(self)
            self._use(bound)
            self._check_options(bound)
            from ..layouts.infer import declaration

            attention = (f"queries and keys proven (patterns equal the model's within {proof:.2g})"
                         if isinstance(proof, float) else f"W_Q, W_K and W_V not stored: {proof}")
            warnings.warn(InferredLayoutWarning(
                f"streamtap has no layout file for model_type {self.module.config.model_type!r}; it inferred this "
                f"layout from the module tree and the self-check verified it exact on the live model (largest "
                f"relative error {worst:.2g}; {attention}): {declaration(bound.layout, self.module.config)}"),
                stacklevel=3)
            return
        raise UnsupportedArchitectureError(_closest(self.module, failures))

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
                self._prove() if self.inferred else self_check(self)
            except BaseException:
                self._snapshot.restore()
                self.writer.unlock()
                raise
        self._tapped = self._tapped_modules()
        if self._fill_summaries and self.options.append and self.options.summarise is not None:
            import sys

            try:
                self._fill_from_store()
            except BaseException:
                self.__exit__(*sys.exc_info())
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
            if released:
                self.recorder.write_summaries()
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

    def _fill_from_store(self) -> None:
        """Summarise the committed sequences no summary of the store covers (a crash came between a commit
        and the next summary write), rerunning each from the token ids the store holds, so that the
        appended store's summaries cover every sequence once, as one capture's do. A store that keeps only
        some positions does not hold them: refused, naming the resume that runs the texts again."""
        import zarr

        from ..dataset import open as open_store
        from ..io import summaries
        from ..io.writer import committed_sequences
        from ..selection import selection_of

        done = committed_sequences(self.writer.store)
        if not done:
            return
        root = zarr.open_group(self.writer.store, mode="r", zarr_format=3)
        gaps = summaries.uncovered(summaries.meta_of(root.attrs), done)
        if not gaps:
            return
        kept = (selection_of(dict(root.attrs)) or {}).get("positions", "all")
        if kept != "all":
            raise InputError(
                f"the store's summaries miss {len(gaps)} of its {done} committed sequences (a capture stopped between "
                f"a commit and its summary write), and it keeps positions={kept!r} only, so their token ids are not "
                "all stored to summarise them again. Resume with streamtap.capture(model, texts, store, resume=True, "
                "summarise=...) over the same texts (it runs them again), or append without summarise=. Nothing was "
                "written")
        ds = open_store(self.writer.store)
        seqs, pos, ids = (ds[n].values for n in ("seq", "pos", "token_id"))
        at = np.isin(seqs, gaps).nonzero()[0]            # the gaps' tokens, by sequence then position: one sort
        at = at[np.lexsort((pos[at], seqs[at]))]
        starts = np.flatnonzero(np.r_[True, seqs[at][1:] != seqs[at][:-1]])
        by_seq = dict(zip(seqs[at][starts].tolist(), np.split(ids[at], starts[1:])))
        rows = [by_seq[s] for s in gaps]
        self.summarise_again(gaps, rows, batch_size=8)

    def summarise_again(self, gaps: list[int], rows: list, batch_size: int, tokenizer=None) -> None:
        """Run sequences ``gaps`` (their token ids ``rows``) through the tapped model, summarised as the
        committed sequences they are and written nowhere else."""
        from .corpus import batches, pad

        recorder, at = self.recorder, 0
        device = next(self.module.parameters()).device
        try:
            with torch.no_grad():
                for chunk in batches(rows, batch_size):
                    recorder.replaying = torch.tensor(gaps[at:at + len(chunk)])
                    at += len(chunk)
                    ids, mask = pad(chunk, tokenizer)
                    self.module(input_ids=ids.to(device), attention_mask=mask.to(device))
        finally:
            recorder.replaying = None

    def _tapped_modules(self) -> dict[str, torch.nn.Module]:
        """Every module the layout taps, by path, as the self-check saw them."""
        return {path: self.bound.module(path) for path, _ in self.bound.taps.values()}

    def _check_tree(self) -> None:
        """Refuse a forward after a module the tap reads was replaced inside the block: the terms
        would come from modules the self-check never proved (a hook that changes an output instead
        is caught by ``verify``, which finds the terms no longer add up)."""
        for path, module in self._tapped.items():
            if self.bound.module(path) is not module:
                raise LayoutError(
                    f"{path} was replaced after the tap opened (it is a {type(self.bound.module(path)).__name__} now); "
                    "the tap reads the modules its attach-time self-check proved. Modify the model before opening "
                    "the tap, then open a new one")

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
        if self.options.positions != "all":
            raise StreamtapError("positions= selects tokens of plain forwards; inside model.generate every step is one "
                                 "token per sequence. Capture generate with positions='all' (the default)")
        self._generation = Generation(assistant_model=bound.get("assistant_model"))
        summariser = self.recorder.summariser
        if summariser is not None:   # a decoding step's sink mass needs the keys of the sequence so far
            summariser.follow_generation(True)
        try:
            return self._original_generate(*args, **kwargs)
        finally:
            self._generation = None
            if summariser is not None:
                summariser.follow_generation(False)
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
        self._check_tree()
        input_ids, mask = self._inputs(args, kwargs)
        output, _ = self.capture_forward(args, kwargs, input_ids, mask)
        self._advance(int(mask.sum()))
        return output

    def _generation_step(self, args, kwargs):
        """One forward of ``model.generate``: the prompt opens sequences, later steps extend them."""
        gen = self._generation
        self._check_tree()
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
            slots = recorder.slots(mask, buffers, input_ids)   # a positions= selection is cut in the hooks
            output, kept = self._forward_impl(args, kwargs, slots, recorder.keep)
            # the logits only where a top-k projection reads them: their real rows are a (tokens x vocab) copy
            logits = getattr(output, "logits", None) if recorder.selection is not None \
                and recorder.selection.reads_logits else None
            return output, recorder.record(kept, slots, buffers, input_ids, mask, logits=logits, **where)
        except BaseException:
            if not buffers.handed:
                buffers.release()
            raise

    def probe(self, input_ids: torch.Tensor, entering: list[str], mask: torch.Tensor | None = None):
        """One forward over ``input_ids`` with attention mask ``mask`` (default: no padding; nothing is
        stored): its terms, the input of each module in ``entering`` (full paths under the model) and
        the model's logits (None for a model without them), each for the real tokens only, in the
        store's order: what the self-check compares."""
        mask = torch.ones_like(input_ids) if mask is None else mask
        real = mask.bool()
        recorder = self.recorder
        keep = recorder.keep | {location(p, "input") for p in entering}
        with torch.no_grad():
            slots = recorder.slots(real, None)
            output, kept = self.traced((), {"input_ids": input_ids, "attention_mask": mask}, slots, keep)
            terms = recorder.terms(kept, slots, real)
            inputs = [_real_rows(kept[location(p, "input")[0]].input, real) for p in entering]
        logits = getattr(output, "logits", None)
        return terms, inputs, None if logits is None else _real_rows(logits, real)

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
