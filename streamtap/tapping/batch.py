"""One forward's terms -> one store batch: where each term goes, what is made after the forward, checks.

The sinks (``streamtap.tapping.sinks``) copy each term the layout names into a set of reused host
buffers while the model runs. After the forward the :class:`Recorder` completes the batch (each
routed expert's share of a mixture, a lossy cast), checks it (non-finite values are refused with
their positions), labels its tokens (``seq``, ``pos``, ``token_id``, text) and hands it to the
writer's pipeline. The first batch also fixes the store's spec: variables, static weights,
attributes and the identity an append must match.
"""

from __future__ import annotations

import dataclasses
import json
import time

import numpy as np
import torch

from .. import __version__
from ..errors import NonFiniteError, StreamtapError
from ..io.buffers import BufferPool, BufferSet, CudaStager
from ..io import pipeline as io_pipeline
from ..io.pipeline import Job, Pipeline, to_numpy
from ..io.schema import LOSSY_DTYPES, SCHEMA_VERSION, StoreSpec, VariableSpec, fingerprint, is_exact_always
from ..io.writer import StoreWriter
from ..layouts import BoundLayout, Weights
from ..options import CaptureOptions
from ..stream import to_json
from ..layouts import INPUT
from .sinks import KeptValues, Route, TermSlots, Where, argument, first_tensor, kept_mask, location

EXPERT_KEYS = ("experts", "shared", "shared_gate", "router")   # taps a mixture's terms are made from after the forward


def lossy_dtype(name: str | None, compute: torch.dtype) -> torch.dtype | None:
    """The dtype a lossy store keeps terms in, or None when ``name`` asks for the model's own (exact)."""
    if name is None or name == str(compute).removeprefix("torch."):
        return None
    if name not in LOSSY_DTYPES:
        raise StreamtapError(f"store_dtype must be one of {LOSSY_DTYPES} (or the model's own dtype), got {name!r}")
    if compute.itemsize <= 2:
        raise StreamtapError(f"the model computes in {str(compute).removeprefix('torch.')}; storing it as {name} "
                             "would save no space and lose precision. Leave store_dtype unset")
    return getattr(torch, name)


def describe_config(config) -> str:
    """The model config as JSON text for the store's attributes."""
    import json

    try:
        return config.to_json_string(use_diff=False)
    except Exception:  # configs with non-JSON members still get a readable record
        return json.dumps({k: repr(v) for k, v in vars(config).items()})


def _multiply(factor: float):
    """A route transform storing a term as the stream receives it (a layout multiplier), or None for 1."""
    return None if factor == 1.0 else (lambda x: x * factor)


class Recorder:
    """Per tap: the routes of the terms, the buffer pools, the store spec, and each batch's hand-over."""

    def __init__(self, bound: BoundLayout, options: CaptureOptions, *, module: torch.nn.Module, writer: StoreWriter,
                 tokenizer=None, model_name: str, created_by: str, scales_reduced: bool = False):
        self.bound, self.options, self.module, self.writer = bound, options, module, writer
        self.tokenizer, self.model_name, self.created_by = tokenizer, model_name, created_by
        self.scales_reduced = scales_reduced  # norm inputs arrive as their frozen scales (remote execution)
        self.store_dtype = lossy_dtype(options.store_dtype, next(module.parameters()).dtype)
        self.routes = self._term_routes()
        self.selection = None
        if options.selective:   # checked here, when the tap opens: before anything is written
            from .select import Selection

            self.selection = Selection(options, bound, tokenizer)
        self.summariser = None
        if options.summarise is not None:
            from .summarise import Summariser

            self.summariser = Summariser(options.summarise, bound)
        self.keep: set[Where] = {location(*tap) for key, tap in bound.taps.items() if key.split(".")[0] in EXPERT_KEYS}
        self.pipeline: Pipeline | None = None
        self.spec: StoreSpec | None = None
        self._static: dict[str, torch.Tensor] | None = None  # the store's weights, until written
        # inspection hooks (tests, benchmarks): the host buffers the sinks copy each forward's terms into,
        # those of what is made after it (lossy casts), and the GPU staging
        self.pool: BufferPool | None = None
        self.late_pool: BufferPool | None = None
        self.stager: CudaStager | None = None
        self._next_sequence = 0
        self._text_cache: dict[int, str] = {}
        self._summarised: list[list[int]] = []   # the sequence ranges summarised since the last write
        self._summary_written = time.monotonic()
        self.replaying: torch.Tensor | None = None   # set: the next forward is only summarised, as these sequences

    # -- routes ---------------------------------------------------------------------------------------
    def _term_routes(self) -> dict[Where, list[Route]]:
        """Which module value (path, side) fills which variable and layer of a batch."""
        b = self.bound
        routes: dict[Where, list[Route]] = {}

        def add(key: str, route: Route) -> None:
            routes.setdefault(location(*b.taps[key]), []).append(route)

        L = b.n_layers
        embed_scale, residual_scale = _multiply(b.multiplier("embed")), _multiply(b.multiplier("residual"))
        for var in b.layout.embeds:
            if var in b.taps:
                add(var, Route(var, transform=embed_scale if var == "embed" else None))
        for layer in range(L):  # a hybrid model's mixer layers have no z, its attention layers no mixer_out,
            if f"z.{layer}" in b.taps:  # and where a block holds one sublayer (Nemotron-H) some have no MLP
                add(f"z.{layer}", Route("z", layer, L, tail=(b.n_heads, b.d_head)))
            if f"mixer_out.{layer}" in b.taps:
                add(f"mixer_out.{layer}", Route("mixer_out", layer, L, transform=_multiply(
                    b.multiplier("residual") * b.out_scales.get(f"mixer_out.{layer}", 1.0))))
            if f"mlp_out.{layer}" in b.taps:
                add(f"mlp_out.{layer}", Route("mlp_out", layer, L, flat=f"mlp_out.{layer}" in b.flat,
                                              transform=residual_scale))
            if self.options.neurons and f"neuron_act.{layer}" in b.taps:
                add(f"neuron_act.{layer}", Route("neuron_act", layer, L, flat=f"neuron_act.{layer}" in b.flat))
        for k in range(len(b.norms)):
            add(f"norm.{k}", Route("norm_scale", k, len(b.norms), transform=lambda x, k=k: self._frozen_scale(x, k)))
        add("resid_final", Route("resid_final", finite=True))
        if self.options.patterns:
            for where, route in self._pattern_routes():
                routes.setdefault(where, []).append(route)
        return routes

    def _pattern_routes(self) -> list[tuple[Where, Route]]:
        """What a pattern needs besides the stream: the rotary tables each group of layers received
        (the attention module's ``position_embeddings``), or the ALiBi biases the blocks received."""
        b = self.bound
        out = []
        if b.positions() == "rotary":
            groups = Weights(b).rotary_groups()
            first = {g: groups.index(g) for g in sorted(set(groups))}
            cos_at = 0 if b.attn.rotary_order == "cos_sin" else 1
            for g, layer in first.items():
                path = b.in_block(layer, b.attn.module_path, "attention module")
                module = b.module(path)
                for var, at in (("rotary_cos", cos_at), ("rotary_sin", 1 - cos_at)):
                    pick = (lambda value, module=module, at=at:
                            argument(module, value, "position_embeddings")[at])
                    out.append((location(path, INPUT), Route(var, g, len(first), pick=pick)))
        elif b.positions() == "alibi":
            path = b.block_full_path(0)
            module, heads, where = b.module(path), b.n_heads, location(path, INPUT)

            def pick(value, module=module, name=b.attn.alibi):
                # (batch x heads, 1, keys): a decoding step's keys are the cached tokens, then its own. A
                # key's bias is its head's slope times the key's position among the sequence's real tokens,
                # the same in a step as in one forward over the whole sequence: each token stores its own
                alibi = argument(module, value, name)
                new = first_tensor(value, where[1]).shape[1]   # this forward's tokens: the last keys
                return alibi[..., alibi.shape[-1] - new:].reshape(-1, heads, new).transpose(1, 2)
            out.append((where, Route("alibi", pick=pick)))
        return out

    def _frozen_scale(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """s = 1/sqrt(var(x) + eps) of norm k, in float32 as the norms compute it."""
        if self.scales_reduced:
            return x.float()
        probe = self.bound.norm_probes[k]
        if probe.get("fixed"):   # a constant scale of the stream (layouts' Scale): gamma holds it, s is 1
            return torch.ones(x.shape[:-1], dtype=torch.float32, device=x.device)
        x = x.float()
        if probe["center"]:
            x = x - x.mean(dim=-1, keepdim=True)
        return torch.rsqrt((x * x).mean(dim=-1) + probe["eps"])

    # -- a forward's destinations -----------------------------------------------------------------------
    def acquire(self) -> BufferSet:
        """The buffer set the next forward's terms go into (waits while the writer is behind)."""
        if self.pool is None:
            self.pool = BufferPool(sets=self.options.queue_depth + 2, shed=True)
        if self.spec is None and self._static is None:
            # built between forwards: beside the first batch's output and terms it would be the peak
            self._static = Weights(self.bound).static(self.options.neurons)
        return self.pool.acquire()

    def slots(self, mask: torch.Tensor, buffers: BufferSet | None, input_ids: torch.Tensor | None = None) -> TermSlots:
        """The next forward's destinations. With ``input_ids`` (host), a ``positions=`` selection whose
        tokens are known from the ids is cut in the hooks, so only the stored tokens' terms are copied."""
        def make(name, shape, dtype, device):
            if buffers is not None and device.type == "cpu":
                return buffers.take(name, shape, dtype)
            return torch.empty(shape, dtype=dtype, device=device)  # on a GPU: staged to the host later

        return TermSlots(self.routes, mask, make, None if input_ids is None else self._stored_tokens(input_ids, mask))

    def _stored_tokens(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | None:
        """The real tokens a batch stores, where nothing reads the others (None: keep every token).
        A summary covers every token the model saw, so a summarising capture sees them all."""
        if self.selection is None or self.summariser is not None:
            return None
        return self.selection.keep_tokens(input_ids, mask)

    def terms(self, kept: KeptValues, slots: TermSlots, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """The batch's real tokens (those ``slots`` kept) of every stored per-token variable, in the store's order."""
        sunk = slots.terms()
        b = self.bound
        out = {var: sunk[var] for var in b.layout.embeds if var in sunk}
        for var in ("z", "mlp_out", "mixer_out", "neuron_act"):
            if var in sunk:
                out[var] = sunk[var]
        if b.moe:   # computed over every real token, as a full store has them (a matmul's rounding depends on
            experts = self._expert_terms(kept, mask)   # its rows), then cut to the tokens the hooks kept
            if slots.keep is not None:
                experts = {name: t[slots.keep.to(t.device)] for name, t in experts.items()}
            out.update(experts)
            self._add_outer_shared(out)
        for var in ("norm_scale", "rotary_cos", "rotary_sin", "alibi"):
            if var in sunk:
                out[var] = sunk[var]
        out["resid_final"] = sunk["resid_final"]
        return out

    def _add_outer_shared(self, out: dict[str, torch.Tensor]) -> None:
        """A shared expert the block runs beside its mixture (Granite-MoE's ``shared_mlp``) writes with
        it: ``mlp_out`` is the layer's whole MLP write, as it is where the mixture holds its shared expert."""
        b = self.bound
        for layer in range(b.n_layers):
            shared, experts = b.taps.get(f"shared.{layer}"), b.taps.get(f"experts.{layer}")
            mixture = experts[0].rsplit(".", 1)[0] if experts is not None else None   # the experts' parent module
            if shared is not None and mixture is not None and not shared[0].startswith(mixture + "."):
                out["mlp_out"][:, layer] += out["shared_expert_out"][:, layer].to(out["mlp_out"].dtype)

    def _expert_terms(self, kept: KeptValues, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each routed expert's weighted output (and the shared expert's), for the real tokens.

        The experts module runs again once per routing slot with only that slot's index and
        weight, which is the model's own expert code producing exactly that slot's share.
        """
        b = self.bound
        per_slot, index, shared = {}, {}, {}
        real = mask.reshape(-1)
        for layer in range(b.n_layers):
            if f"experts.{layer}" not in b.taps:
                continue   # a dense layer of a mixture (its term is mlp_out): zeros below, never read
            path = b.taps[f"experts.{layer}"][0]
            if layer in b.routed:
                per_slot[layer], top_index = self._routed_rows(kept, layer, path, real)
            else:
                (x, top_index, top_weights), _ = kept[location(path, "input")[0]].inputs
                real = real.to(x.device)
                x, top_index, top_weights = x[real], top_index[real], top_weights[real]
                experts = b.module(path)
                with torch.no_grad():
                    per_slot[layer] = torch.stack([experts(x, top_index[:, j:j + 1], top_weights[:, j:j + 1])
                                                   for j in range(top_index.shape[1])], dim=1)
            routed = b.out_scales.get(f"experts.{layer}", 1.0)   # a factor the mixture applies outside its experts
            if routed != 1.0:
                per_slot[layer] = per_slot[layer] * routed
            index[layer] = top_index.to(torch.int32)
            if f"shared.{layer}" in b.taps:
                out = kept[location(b.taps[f"shared.{layer}"][0], "output")[0]].output
                shared[layer] = out = out.reshape(-1, out.shape[-1])[real]
                if f"shared_gate.{layer}" in b.taps:
                    gate = kept[location(b.taps[f"shared_gate.{layer}"][0], "output")[0]].output
                    shared[layer] = torch.sigmoid(gate.reshape(-1, gate.shape[-1])[real]) * out

        def stacked(values: dict) -> torch.Tensor:
            like = next(iter(values.values()))
            return torch.stack([values.get(layer, torch.zeros_like(like)) for layer in range(b.n_layers)], dim=1)

        # a residual multiplier (Granite-MoE) scales the whole write: each share as the stream receives it
        scale = _multiply(b.multiplier("residual")) or (lambda x: x)
        terms = {"expert_out": scale(stacked(per_slot)), "expert_index": stacked(index)}
        if shared:
            terms["shared_expert_out"] = scale(stacked(shared))
        return terms

    def _routed_rows(self, kept: KeptValues, layer: int, path: str, real: torch.Tensor):
        """(token, slot, d_model) terms and (token, slot) expert indices of experts that ran on
        router-weighted input (``Moe.router``): their output holds one block of rows per expert (zero
        input, zero row, where a token is not routed), and each token's terms are the rows of its
        ``top_k`` highest-scoring experts, the ones the router routed it to."""
        rows = first_tensor(kept[location(path, "output")[0]].output, "output")
        scores = first_tensor(kept[location(self.bound.taps[f"router.{layer}"][0], "output")[0]].output, "output")
        real = real.to(rows.device)
        scores = scores.reshape(-1, scores.shape[-1])[real]
        rows = rows.reshape(scores.shape[-1], -1, rows.shape[-1])[:, real].transpose(0, 1)   # (token, expert, d)
        top_index = scores.topk(self.bound.routed[layer], dim=1).indices
        return rows.gather(1, top_index[..., None].expand(-1, -1, rows.shape[-1])), top_index

    # -- the hand-over ---------------------------------------------------------------------------------
    def record(self, kept: KeptValues, slots: TermSlots, buffers: BufferSet, input_ids: torch.Tensor,
               mask: torch.Tensor, *, seq: torch.Tensor | None = None, pos: torch.Tensor | None = None,
               n_sequences: int | None = None, logits: torch.Tensor | None = None) -> int:
        """Turn one forward's terms into a batch and hand it to the writer (``input_ids``, ``mask``: host).

        By default every row opens a new sequence (a plain forward). A ``generate`` step passes the
        ``seq`` and ``pos`` of its real tokens (host tensors in mask order) and ``n_sequences=0``.
        Returns the sequence number the batch's first row got. On the model's thread only what must
        be: the per-expert terms, a lossy cast, and on a GPU the launch of the copy to pinned host
        memory; encoding and chunk writes happen in the writer.
        """
        held = slots.mask   # the real tokens the terms hold: the stored ones where the hooks cut the batch
        out = self.terms(kept, slots, mask)
        kept.clear()  # the writer needs only the terms: the kept activations go now
        device = out["resid_final"].device
        on_gpu = device.type == "cuda"
        if not on_gpu:  # a GPU batch is checked by the writer, once it is on the host: no sync here
            self._check_finite(out, mask, held, slots.nonfinite)
        keep = slots.keep
        every = out   # every real token's terms: what a summary covers, whatever is stored
        if self.summariser is not None and self.spec is None:
            self.summariser.prepare(self._static, {**self._store_attrs(), "patterns": True}
                                   if self.options.patterns else None)
        if self.selection is not None:
            cut = None if keep is not None else self.selection.keep_tokens(input_ids, mask)   # None: cut already
            keep = keep if cut is None else cut
            if self.spec is None:
                self._static = self.selection.static(self._static)
            out = self.selection.apply(out, cut, None if logits is None else logits.reshape(-1, logits.shape[-1])[
                held.reshape(-1).to(logits.device)], every_token=self.summariser is not None)
        if self.store_dtype is not None:
            late = self._late_buffers(buffers) if device.type == "cpu" else None
            out = self._lossy(out, check=not on_gpu, buffers=late)
        if self.spec is None:
            self._start(out, device)
        n_seq = mask.shape[0] if n_sequences is None else n_sequences
        first = self._next_sequence
        whole = seq is None   # a plain forward: each row one whole sequence (not a decoding step)
        replay = self.replaying
        if replay is not None:   # committed sequences no summary covers: summarised again, written nowhere
            seq = replay.unsqueeze(1).expand_as(mask)[mask]
        if seq is None:
            seq = torch.arange(mask.shape[0]).unsqueeze(1).expand_as(mask)[mask] + first
        if pos is None:
            pos = (mask.cumsum(dim=1) - 1)[mask]
        if self.summariser is not None:
            projection = getattr(self.selection, "all_projections", None)
            self.summariser.update(every, input_ids, mask, seq, pos, n_seq,
                                   None if projection is None else projection["projection"],
                                   None if projection is None else (self.selection.projection_labels(),
                                                                    self.selection.direction_names),
                                   whole=whole)
            if replay is not None:
                self._summarised.extend([int(r), int(r) + 1] for r in replay)
            else:
                self._summarised.append([first, first + n_seq])
        del every
        if replay is not None:
            buffers.release()
            return int(replay[0])
        coords = {"seq": seq.numpy().astype("int64"), "pos": pos.numpy().astype("int32"),
                  "token_id": input_ids[mask].numpy().astype("int64")}
        if keep is not None:
            coords = {name: c[keep.numpy()] for name, c in coords.items()}
        if self.spec.with_text:
            coords["text"] = self._texts(coords["token_id"])
        if on_gpu:
            if self.stager is None:
                self.stager = CudaStager(device, sets=self.options.queue_depth + 2)
            host, event, release = self.stager.stage(out)
            stored = mask if keep is None else kept_mask(mask, keep)
            job = Job(host, n_seq, ready=event, release=lambda: (release(), buffers.release()), extra=coords,
                      check=lambda arrays, mask=mask: self._check_host(arrays, mask, stored))
        else:
            job = Job(out, n_seq, extra=coords, release=buffers.release)
        del out
        buffers.handed = True
        self.pipeline.submit(job)  # blocks while the writer is queue_depth batches behind; releases the buffers
        self._next_sequence += n_seq
        if self.summariser is not None and time.monotonic() - self._summary_written >= self.options.summarise_every:
            self.writer.wait()   # every batch summarised is committed now: the summaries describe the store
            self.pipeline.raise_pending()
            self.write_summaries(self.writer.group)
        return first

    def _start(self, out: dict[str, torch.Tensor], device: torch.device) -> None:
        """The first batch: create (or open) the store and start the writer's pipeline."""
        spec = self._make_spec(out)
        self.writer.prepare(spec)
        if self.summariser is not None:
            self._check_summaries()
        # the weights are in the store now; kept, their per-head copies would sit in memory all along
        self.spec, self._static = dataclasses.replace(spec, static={}), None
        self._next_sequence = self.writer.sequences
        mode = io_pipeline.choose_mode(self.options.writer, device)
        self.pipeline = io_pipeline.make_pipeline(self.writer, mode, device, self.options.queue_depth)

    def _check_summaries(self) -> None:
        """Refuse, before the first batch is written, to append summaries kept with other settings."""
        from ..errors import OptionError
        from ..io.summaries import meta_of

        meta = meta_of(self.writer.group.attrs)
        mine = self.summariser.settings.as_dict()
        if meta is not None and meta["settings"] != mine:
            raise OptionError(f"the store's summaries were kept with summarise={meta['settings']}, this capture's are "
                              f"{mine}; an append must summarise with the same settings (summarise=...)")

    def _late_buffers(self, buffers: BufferSet) -> BufferSet:
        """Buffers for what is made after the forward, from a pool of their own, taken only now, when
        the previous batch's writes have usually landed (so a lossy cast costs one set, not two).
        Released with ``buffers``."""
        if self.late_pool is None:
            self.late_pool = BufferPool(sets=self.options.queue_depth + 2, shed=True)
        buffers.after = self.late_pool.acquire()
        return buffers.after

    def _lossy(self, out: dict[str, torch.Tensor], check: bool, buffers: BufferSet | None) -> dict[str, torch.Tensor]:
        """Cast the terms to the lossy store dtype; the reference and the scales stay exact."""
        cast = {}
        for name, t in out.items():
            if is_exact_always(name) or not t.is_floating_point():
                cast[name] = t
                continue
            shape = tuple(t.shape)
            dst = (buffers.take(f"{name}.stored", shape, self.store_dtype) if buffers is not None
                   else torch.empty(shape, dtype=self.store_dtype, device=t.device))
            cast[name] = dst.copy_(t)
            if check and not bool(torch.isfinite(cast[name]).all()):
                raise StreamtapError(self._range_message(name, t))
        return cast

    def _range_message(self, name: str, t: torch.Tensor | None) -> str:
        dtype = str(self.store_dtype).removeprefix("torch.")
        held = f"values up to {float(t.abs().max()):.4g}" if t is not None else "values"
        return (f"{name} holds {held} beyond what {dtype} can store (max {torch.finfo(self.store_dtype).max:.4g}); "
                "the batch was not written. Store in bfloat16 (the range of float32) or in the model's "
                "dtype (store_dtype=None)")

    def _check_host(self, arrays: dict, mask: torch.Tensor, stored: torch.Tensor) -> None:
        """The writer's check of a GPU batch, on its host copy of the ``stored`` tokens (the same errors as
        on the CPU)."""
        out = {name: a for name, a in arrays.items() if isinstance(a, torch.Tensor)}
        self._check_finite(out, mask, stored)
        if self.store_dtype is not None:
            for name, t in out.items():
                if not is_exact_always(name) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    raise StreamtapError(self._range_message(name, None))

    def _texts(self, ids) -> np.ndarray:
        cache = self._text_cache
        missing = sorted({int(i) for i in ids} - cache.keys())
        if missing:
            for i, text in zip(missing, self.tokenizer.batch_decode([[i] for i in missing])):
                cache[i] = text
        return np.array([cache.get(int(i), "") for i in ids], dtype=object)

    @staticmethod
    def _check_finite(out: dict[str, torch.Tensor], mask: torch.Tensor, held: torch.Tensor | None = None,
                      unheld: torch.Tensor | None = None) -> None:
        """Refuse a batch with a non-finite value, naming its rows, positions and first layer. ``held``: the
        real tokens ``out`` holds (default all); ``unheld``: which real tokens' final residual the hooks found
        non-finite before a cut, so a bad token that is not stored is refused as when every token is copied."""
        if unheld is None and bool(torch.isfinite(out["resid_final"]).all()):
            return
        mask = mask.cpu()
        held = mask if held is None else held.cpu()
        token_rows = torch.arange(mask.shape[0]).unsqueeze(1).expand_as(mask)
        token_positions = mask.cumsum(dim=1) - 1
        where = []
        for name, t in out.items():
            rows, positions = token_rows[held], token_positions[held]
            if name == "resid_final" and unheld is not None:   # every real token's, checked before the cut
                bad, t, rows, positions = unheld, None, token_rows[mask], token_positions[mask]
            else:
                bad = ~torch.isfinite(t.reshape(t.shape[0], -1)).all(dim=1).cpu()
            if bad.any():
                first = bad.nonzero().flatten()[:5].tolist()
                spots = ", ".join(f"row {int(rows[i])} pos {int(positions[i])}" for i in first)
                detail = ""
                if t is not None and t.dim() >= 3:  # per-layer terms: name the first layer that went bad
                    per_layer = ~torch.isfinite(t.reshape(t.shape[0], t.shape[1], -1)).all(dim=2)
                    detail = f", first at layer {int(per_layer.any(dim=0).nonzero()[0])}"
                where.append(f"{name}: {int(bad.sum())} tokens ({spots}{detail})")
        raise NonFiniteError(
            "the model produced non-finite activations; the batch was not written. " + "; ".join(where)
            + ". Check the inputs and the dtype (float16 overflows are common; try bfloat16 or float32)"
        )

    def _make_spec(self, out: dict[str, torch.Tensor]) -> StoreSpec:
        b = self.bound
        variables = {name: VariableSpec(tuple(t.shape[1:]), str(t.dtype).removeprefix("torch."))
                     for name, t in out.items()}
        static = {name: (to_numpy(t), str(t.dtype).removeprefix("torch.")) for name, t in self._static.items()}
        # the compute dtype, even in a lossy store: the coarser of the stream's and the weights' (a bfloat16 model
        # may keep a float32 stream, Ergo's gates, while its sublayers round their terms to bfloat16)
        weights = next(self.module.parameters()).dtype
        stream = out["resid_final"].dtype if "resid_final" in out else weights
        coarse = max((stream, weights), key=lambda d: torch.finfo(d).eps if d.is_floating_point else 0.0)
        dtype = str(coarse).removeprefix("torch.")
        identity = {
            "schema_version": SCHEMA_VERSION,
            "layout": b.name,
            "model_type": self.module.config.model_type,
            "dtype": dtype,
            "neurons": self.options.neurons,
            "patterns": self.options.patterns,
            "weights_fingerprint": fingerprint(static),
            "store_dtype": None if self.store_dtype is None else str(self.store_dtype).removeprefix("torch."),
        }
        attrs = {"streamtap_version": __version__, "model_name": self.model_name,
                 "model_config": describe_config(self.module.config), "created_by": self.created_by,
                 **self._store_attrs()}
        if self.selection is not None:
            identity.update(self.selection.attrs())    # an append must select the same terms and tokens
            if "projection" in out:
                attrs.update(projection_components=json.dumps(self.selection.projection_labels()),
                             projection_directions=json.dumps(self.selection.direction_names))
        return StoreSpec(variables, static, attrs, with_text=self.tokenizer is not None, identity=identity)

    def _store_attrs(self) -> dict:
        """The attributes that say how the store's terms and weights are read (shapes, the stream, the
        layout's facts), as the store records them; the patterns' recomputation reads these."""
        b = self.bound
        return {"n_layers": b.n_layers, "n_heads": b.n_heads, "d_head": b.d_head, "d_model": b.d_model,
                "stream": to_json(b.events), "norm_labels": b.norm_labels(),
                "tied_embeddings": bool(getattr(self.module.config, "tie_word_embeddings", False)),
                **b.facts(), **Weights(b).attrs(self.options.neurons)}

    def write_summaries(self, root=None) -> None:
        """Merge what was summarised since the last write into the store's summaries (every
        ``summarise_every`` seconds once the batches are committed, and when the tap closes, after its
        last commit; under its lock). ``root``: the writer's own group while it commits (its commits
        rewrite the root's attributes from it), else the store is opened here.

        Written only when every sequence summarised is committed; otherwise (a batch was summarised but
        never committed: a writer error) they are dropped with a warning, and the store's summaries keep
        covering the ranges they covered (``summaries(ds)`` reports the coverage; a resume summarises
        the rest again)."""
        s = self.summariser
        if s is None or s.tokens == 0:
            return
        from ..io import summaries

        ranges = summaries.join_ranges(self._summarised)
        if ranges and ranges[-1][1] > self.writer.sequences:
            import warnings

            warnings.warn(f"streamtap: this tap summarised sequences up to {ranges[-1][1]} but only "
                          f"{self.writer.sequences} are committed; those summaries were not written (the store's "
                          "summaries cover fewer sequences than it holds; a resume summarises them again)",
                          RuntimeWarning, stacklevel=3)
            return
        import zarr

        meta, states = s.result()
        if root is None:
            root = zarr.open_group(self.writer.store, mode="r+", zarr_format=3)
        summaries.write(root, states, meta, sequences=s.sequences, tokens=s.tokens, ranges=ranges)
        s.reset()
        self._summarised, self._summary_written = [], time.monotonic()

    def close(self) -> None:
        """Let go of the free buffer sets: a finished tap the caller still holds must not keep them."""
        for pool in (self.pool, self.late_pool, self.stager and self.stager.pool):
            if pool is not None:
                pool.clear()


__all__ = ["Recorder", "lossy_dtype", "describe_config"]
