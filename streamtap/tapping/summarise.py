"""Summaries while capturing (``summarise=``): running statistics, a quantile sketch and top-k contexts.

Per batch, on the captured tensors where they are (the GPU on a GPU): every real token of the
forward counts, stored or not (``positions=`` selects what is stored, not what is summarised);
padding never does. Each group is one (token, component) matrix per layer at most. On the CPU it is
folded in one compiled pass (``fold_kernel``, where numba is installed); elsewhere, and on the CPU
without numba, in blocks of components that stay in cache: float64 sums for Chan's merge, the sketch's
buckets by one ``bucketize`` on exact edges and one ``scatter_add_`` on a device (a logarithm's passes
and ``numpy.add.at`` on the CPU), one ``topk`` over the batch merged with the kept ``top_k`` where it
can change it. Memory is the state alone, flat in the number of tokens. The
numpy twin of every step is ``streamtap.io.summaries``.
"""

from __future__ import annotations

import math
import types

import numpy as np
import torch

from ..io import summaries as S
from ..io.schema import dims_of
from . import fold_kernel


def _host(t: torch.Tensor) -> np.ndarray:
    """A tensor as numpy on the host, floats widened where numpy lacks the dtype (bfloat16) exactly."""
    t = t.detach()
    return (t.float() if t.dtype == torch.bfloat16 else t).cpu().numpy()


def _np_log(x, out):
    with np.errstate(divide="ignore"):   # log(0) = -inf is wanted (bucket 0); a local error state, no filter
        return np.log(x, out=out)


_NUMPY = types.SimpleNamespace(copy=lambda dst, src: np.copyto(dst, src), mul=np.multiply, sub=np.subtract,
                                amin=np.amin, amax=np.amax)
"""The block's statistics on the CPU: numpy's ufuncs run on the calling thread (no parallel region per call)."""
_TORCH = types.SimpleNamespace(copy=lambda dst, src: dst.copy_(src), mul=torch.mul, sub=torch.sub, amin=torch.amin,
                               amax=torch.amax)
"""The same where the tensors live on a device (a GPU)."""


class Summariser:
    """The running summaries of one tap, by group, as torch tensors on the model's device."""

    def __init__(self, settings: S.Settings, bound):
        self.settings, self.bound = settings, bound
        self.state: dict[str, dict[str, torch.Tensor]] = {}
        self.components: dict[str, dict[str, list]] = {}
        self._factor = None
        self._attention = None   # (Attention, the store's static weights as a Dataset) where patterns are captured
        g = settings.gamma   # bucket j of |x| = ceil(log(|x| / low) / log g), computed as ceil(log|x| * scale - shift)
        self._buckets = (settings.n_side, settings.n_buckets, 1.0 / math.log(g), math.log(settings.low) / math.log(g))
        self._scratch: dict[tuple, torch.Tensor] = {}
        self.sequences = 0
        self.tokens = 0
        self._batch_tokens = 0
        # inside model.generate with patterns: every token's terms so far, host-side (bounded by the call's
        # prompts and generation length), so a decoding step's query can see the keys its KV cache holds
        self._history: dict[str, list] | None = None

    # -- set-up ----------------------------------------------------------------------------------------
    def prepare(self, static: dict[str, torch.Tensor], attrs: dict | None = None) -> None:
        """Each head's factor F of W_O W_O^T = F F^T (the output norm |z W_O| is |z F|: a d_head-wide
        matmul, not the d_model-wide output, and one fused norm, not a product and a sum); with
        ``attrs`` (the store's attributes, where patterns are captured) the store's own recomputation of
        the patterns (``streamtap.attention``), so the sink mass is the one ``st.analysis.attention`` gives."""
        if self._factor is None and "W_O" in static:
            w = static["W_O"].detach().cpu().double()   # on the host: not every device has float64
            e, v = torch.linalg.eigh(torch.einsum("lhdm,lhem->lhde", w, w))   # symmetric, positive semi-definite
            self._factor = (v * e.clamp_min(0).sqrt().unsqueeze(-2)).float()
        if self._attention is None and attrs is not None and attrs.get("patterns"):
            import xarray as xr

            from ..attention import Attention

            weights = xr.Dataset({n: (dims_of(n), _host(t)) for n, t in static.items()}, attrs=attrs)
            self._attention = (Attention(weights), weights)

    def _group(self, name: str, n: int, device, labels) -> dict[str, torch.Tensor]:
        """A group's state, made on first use with the component labels ``labels()`` gives (built once:
        a list per neuron is milliseconds a batch). Its histogram counts in int32 (half the memory and
        the traffic of the scattered increments: 136 MiB, not 272, for GPT-2's neurons) while fewer than
        2^31 tokens have been folded since the last write, then in int64, the stored type."""
        if name not in self.state:
            st = S.empty_state(n, self.settings, name)
            st["hist"] = st["hist"].astype(np.int32)
            self.state[name] = {k: torch.from_numpy(v).to(device) for k, v in st.items()}
            self.components[name] = labels()
        g = self.state[name]
        if g["hist"].dtype == torch.int32 and self.tokens + self._batch_tokens > self.INT32_TOKENS:
            g["hist"] = g["hist"].long()
        return g

    INT32_TOKENS = 2 ** 31 - 1
    """Tokens folded since the last write up to which a bucket's count fits int32."""

    # -- a batch ---------------------------------------------------------------------------------------
    def update(self, out: dict[str, torch.Tensor], input_ids: torch.Tensor, mask: torch.Tensor, seq: torch.Tensor,
               pos: torch.Tensor, n_sequences: int, projection: torch.Tensor | None = None,
               projection_labels=None, whole: bool = True) -> None:
        """Fold one forward's real tokens (``out``: every token, before any selection) into the state.
        ``whole``: each row is a whole sequence (a plain forward, not a decoding step): only then is the
        sink mass, which needs every key a query sees, computed."""
        ref = out["resid_final"]
        device, T = ref.device, ref.shape[0]
        self._batch_tokens = T
        w = self.settings.window
        ids = torch.where(mask, input_ids, torch.full_like(input_ids, -1))
        windows = torch.nn.functional.pad(ids, (w, w), value=-1).unfold(1, 2 * w + 1, 1)[mask]   # (T, 2w+1)
        ctx = (seq.to(device), pos.to(device).long(), windows.to(device))
        L = self.bound.n_layers
        if "z" in out and self._factor is not None:
            z = out["z"]
            H = z.shape[2]
            g = self._group("head", L * H, device, lambda: {"layer": [l for l in range(L) for _ in range(H)],
                                                           "index": [h for _ in range(L) for h in range(H)]})
            self._fold(g, self._head_norms(z), 0, ctx)
            if self._attention is not None and (whole or self._history is not None):
                g = self._group("sink", L * H, device, lambda: self.components["head"])
                sink = (self._sink_mass(out, ids[mask], ctx) if whole and self._history is None
                        else self._generated_sink_mass(out, ids[mask], ctx, whole))
                self._fold(g, torch.from_numpy(sink).to(device), 0, ctx)
        for var, name in (("mlp_out", "mlp"), ("mixer_out", "mixer")):
            if var in out:
                g = self._group(name, L, device, lambda: {"layer": list(range(L)), "index": [-1] * L})
                self._fold(g, torch.linalg.vector_norm(out[var].float(), dim=-1), 0, ctx)
        if "neuron_act" in out:
            act = out["neuron_act"]
            N = act.shape[2]
            g = self._group("neuron", L * N, device, lambda: {"layer": [l for l in range(L) for _ in range(N)],
                                                             "index": [n for _ in range(L) for n in range(N)]})
            self._fold(g, act.reshape(T, L * N), 0, ctx)   # a view: _fold reads it block by block
        if projection is not None:
            comps, dirs = projection_labels
            C, D = len(comps), len(dirs)
            g = self._group("projection", C * D, device,
                            lambda: {"layer": [int(c[2]) for c in comps for _ in range(D)],
                                     "index": [j for _ in range(C) for j in range(D)],
                                     "label": [f"{c[0]}:{d}" for c in comps for d in dirs]})
            self._fold(g, projection.to(device).reshape(T, C * D), 0, ctx)
        self.sequences += n_sequences
        self.tokens += T

    def _head_norms(self, z: torch.Tensor) -> torch.Tensor:
        """(token, layer * head) float32: each head's output norm |z W_O| = |z F|, one batched matmul over
        the heads for a chunk of tokens at a time: the chunk's head-major copy and its product stay in
        cache (on the CPU half the time of one matmul over the batch; docs/benchmarks.md, "Summaries"),
        and the scratch is bounded on a device."""
        T, L, H, dh = z.shape
        if self._factor.device != z.device:
            self._factor = self._factor.to(z.device)
        factor = self._factor.reshape(L * H, dh, dh)
        values = self.HEAD_VALUES if z.device.type == "cpu" else self.DEVICE_BLOCK_VALUES
        step = max(1, values // (L * H * dh))
        heads = z.reshape(T, L * H, dh)
        norms = torch.empty(T, L * H, dtype=torch.float32, device=z.device)
        for t0 in range(0, T, step):
            part = heads[t0:t0 + step].float().transpose(0, 1)                   # (LH, tokens, dh)
            norms[t0:t0 + step] = torch.linalg.vector_norm(torch.bmm(part, factor), dim=-1).t()
        return norms

    HEAD_VALUES = 1 << 21
    """z values per chunk of the heads' norms on the CPU (8 MiB in float32: 121 tokens of SmolLM2's 270
    heads, 227 of GPT-2's 144): from 32 to 256 tokens a chunk the time is the same, 2,048 at once twice it."""

    def _batch(self, per_token: dict[str, np.ndarray], seq: np.ndarray, pos: np.ndarray, token_ids: np.ndarray):
        """Host terms of some tokens with their coordinates and the store's weights: a store's Dataset."""
        import xarray as xr

        weights = self._attention[1]
        coords = {"seq": ("token", seq), "pos": ("token", pos), "token_id": ("token", token_ids)}
        return xr.Dataset({n: (("token", *dims_of(n)), a) for n, a in per_token.items()}, coords=coords,
                          attrs=weights.attrs).merge(weights, combine_attrs="override")

    def follow_generation(self, following: bool) -> None:
        """A ``model.generate`` call starts (True: keep its tokens' terms) or ends (False: let them go)."""
        self._history = {} if following else None

    def _generated_sink_mass(self, out: dict[str, torch.Tensor], token_ids: torch.Tensor, ctx,
                             whole: bool) -> np.ndarray:
        """Inside ``generate``: the prompt's sink mass as a plain forward's, and a decoding step's (its
        forward holds only the new tokens, the KV cache standing in for the rest) from the terms of the
        sequence so far, kept since the prompt: the residual of each of its tokens replayed, the keys
        recomputed, and the new query's pattern over them, exactly as ``st.analysis.attention`` computes
        that query's row from a store of the whole sequence."""
        from ..attention import rotary_tables, sequence_residuals, sequence_tokens

        seq, pos, _ = ctx
        step = {n: np.array(_host(t)) for n, t in out.items()}   # copies: the terms' buffers are reused
        step.update(seq=seq.cpu().numpy(), pos=pos.cpu().numpy(), token_id=token_ids.cpu().numpy())
        for n, a in step.items():
            self._history.setdefault(n, []).append(a)
        if whole:
            return self._sink_mass(out, token_ids, ctx)
        att = self._attention[0]
        H, L = att.n_heads, self.bound.n_layers
        have = {n: np.concatenate(parts) for n, parts in self._history.items()}
        self._history = {n: [a] for n, a in have.items()}
        coords = {n: have.pop(n) for n in ("seq", "pos", "token_id")}
        history = self._batch(have, coords["seq"], coords["pos"], coords["token_id"])
        heads, sink = np.arange(H), np.empty((len(step["seq"]), L * H))
        for t, (s, at) in enumerate(zip(step["seq"], step["pos"])):
            sub = history.isel(token=sequence_tokens(history, int(s)))   # in position order
            resid = sequence_residuals(sub, np.arange(L))
            p = np.asarray(sub["pos"].values)
            i = int(np.searchsorted(p, at))                              # the step's query among them
            alibi = np.asarray(sub["alibi"].values, np.float64) if "alibi" in sub else None
            for layer in range(L):
                cos, sin = rotary_tables(sub, att.groups[layer])
                q, k, _ = att.qkv(layer, resid[:, layer], cos, sin)
                scores = att.scores(layer, heads, q[i:i + 1], k, p[i:i + 1], p, alibi)
                sink[t, layer * H:(layer + 1) * H] = att.softmax(scores, att.sink_logits(layer, heads))[:, 0, 0]
        return sink

    def _sink_mass(self, out: dict[str, torch.Tensor], token_ids: torch.Tensor, ctx) -> np.ndarray:
        """(token, layer * head) float64: the probability each head's query puts on its sequence's first
        real token, from the patterns recomputed as ``st.analysis.attention`` recomputes them from a store
        (the batch's terms and the store's weights, in float64)."""
        from ..attention import sequence_attention, sequence_tokens

        att = self._attention[0]
        seq, pos, _ = ctx
        batch = self._batch({n: _host(t) for n, t in out.items()}, seq.cpu().numpy(), pos.cpu().numpy(),
                            token_ids.cpu().numpy())
        H = att.n_heads
        sink = np.empty((batch.sizes["token"], batch.sizes["layer"] * H))
        rows = None
        for s, layer, one in sequence_attention(batch, att=att):
            if rows is None or rows[0] != s:
                rows = (s, sequence_tokens(batch, s))
            sink[rows[1][:, None], layer * H + one.heads[None, :]] = one.pattern[:, :, 0].T
        return sink

    def _fold(self, g: dict[str, torch.Tensor], x: torch.Tensor, at: int, ctx) -> None:
        """Rows ``at .. at + x.shape[1]`` of a group take one batch ``x`` (token, component), any strides
        and float dtype, as the capture hands it over (no transposed or widened copy of the whole).

        The components are folded in blocks of about ``BLOCK_VALUES`` values: one copy of a block out of
        ``x`` is the only pass over main memory; the block's float64 copy, its sketch index and its
        histogram rows then stay in cache while every statistic is taken from them. On the CPU the
        block's arithmetic is numpy's, which runs on the calling thread: torch's would open an OpenMP
        parallel region per operation, a few microseconds each on an idle machine but a scheduler time
        slice each (milliseconds) on a loaded one. Results do not depend on the block size (each
        component's statistics use its own tokens only)."""
        T, C = x.shape
        if x.device.type == "cpu" and self.HOST == "compiled" and fold_kernel.usable(self.settings):
            return self._fold_compiled(g, x, at, ctx)
        values = self.BLOCK_VALUES if x.device.type == "cpu" else self.DEVICE_BLOCK_VALUES
        block = max(1, values // max(T, 1))
        self._pending, self._pending_rows = [], 0
        self._pending_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        # sized once here, so that growing it never drops the rows gathered (see _fold_block)
        self._buffer("pending", (max(1, self.TOP_VALUES // max(T, 1)) + block, T), self._pending_dtype, x.device)
        for c0 in range(0, C, block):
            self._fold_block(g, x[:, c0:c0 + block], at + c0, ctx)
        self._flush_top(g, ctx, T)

    def _fold_compiled(self, g: dict[str, torch.Tensor], x: torch.Tensor, at: int, ctx) -> None:
        """:meth:`_fold` in one compiled pass per block of components (``fold_kernel``), on as many
        threads as torch's own; a kept top-k slot a token takes gets its context there too."""
        state = {k: v.numpy() for k, v in g.items()}
        context = tuple(np.ascontiguousarray(c.numpy(), np.int64) for c in ctx)
        T, C = x.shape
        chunk = C if x.dtype in (torch.float32, torch.float64) else max(1, self.DEVICE_BLOCK_VALUES // max(T, 1))
        for c0 in range(0, C, chunk):   # a narrower float (bfloat16) is widened a chunk at a time
            part = x[:, c0:c0 + chunk]
            part = part if part.dtype in (torch.float32, torch.float64) else part.float()
            fold_kernel.fold(np.ascontiguousarray(part.numpy()), state, at + c0, self.settings,
                             torch.get_num_threads(), context)

    BLOCK_VALUES = 1 << 18
    """Values per block on the CPU: the block's float32 copy is 1 MiB (a core's L2), its float64 copy and
    index stay in the shared L3 while they are reused; smaller blocks pay more per-call overhead."""
    HOST = "compiled"
    """How CPU tensors are folded: ``"compiled"``, numba's one-pass kernel (``fold_kernel``) where numba
    is installed (else numpy's); ``"numpy"``, a pass per step; ``"torch"``, the torch operations a GPU's
    tensors take (the suite runs every path on the CPU, so each is tested where no GPU is)."""
    DEVICE_BLOCK_VALUES = 1 << 22
    """Values per block elsewhere (a GPU): large enough that kernel launches do not dominate, small enough
    that the scratch (float32 and float64 copies, the index) stays a bounded ~100 MiB."""

    def _buffer(self, name: str, shape: tuple[int, int], dtype: torch.dtype, device) -> torch.Tensor:
        """A reused scratch matrix (allocated once per tap, grown when a larger block comes)."""
        n = shape[0] * shape[1]
        buf = self._scratch.get((name, dtype))
        if buf is None or buf.numel() < n or buf.device != device:
            buf = self._scratch[name, dtype] = torch.empty(n, dtype=dtype, device=device)
        return buf[:n].view(shape)

    def _fold_block(self, g: dict[str, torch.Tensor], x: torch.Tensor, at: int, ctx) -> None:
        """One block of :meth:`_fold`: (token, component), every statistic of components ``at ..``.

        count, mean, m2 (Chan), min, max: float64 sums over each component's tokens shifted by its first
        token (the shift keeps sum(y^2) - sum(y)^2/T exact enough); the sketch's histogram; top-k work is
        spent only on the components where some token beats the k-th value kept (all of them early on,
        few once a corpus has been seen)."""
        T, C = x.shape
        cols = slice(at, at + C)
        cpu = x.device.type == "cpu" and self.HOST != "torch"
        xb = self._buffer("x", (T, C), torch.float64 if x.dtype == torch.float64 else torch.float32, x.device)
        if cpu and x.dtype != torch.bfloat16:
            np.copyto(xb.numpy(), x.numpy())        # the one read of x (widened here where it is narrower)
        else:
            xb.copy_(x)
        y = self._buffer("y", (T, C), torch.float64, x.device)
        xp, xv, yv = (_NUMPY, xb.numpy(), y.numpy()) if cpu else (_TORCH, xb, y)
        xp.copy(yv, xv)
        if g["hist"].shape[1]:   # a sketch (none for neurons without neuron_quantiles: no index scratch either)
            rows = g["hist"][cols]   # (C, bucket): a view, rows of a contiguous matrix
            if cpu:
                j = self._buffer("index", (T, C), torch.float64, x.device).numpy()
                flat = self._buffer("flat", (T, C), torch.int64, x.device).numpy()
                self._index(yv, j)
                np.copyto(flat, j, casting="unsafe")
                h = rows.numpy().reshape(-1)
                np.add.at(h, flat.reshape(-1), h.dtype.type(1))   # in place, in cache; a 1 of the counts' type
            else:   # each bucket in one kernel, exactly: the signed edges at or below the value
                j = self._buffer("bucket", (T, C), torch.int64, x.device)
                torch.bucketize(xb, self._signed_edges(xb.dtype, x.device), right=True, out=j)
                rows.scatter_add_(1, j.t(), torch.ones((), dtype=rows.dtype, device=x.device).expand(C, T))
        first = yv[0].copy() if cpu else y[0].clone()
        xp.sub(yv, first, out=yv)
        s1 = yv.sum(0)
        s2 = xp.mul(yv, yv, out=yv).sum(0)
        low, high = xp.amin(xv, 0), xp.amax(xv, 0)
        if cpu:
            first, s1, s2, low, high = (torch.from_numpy(np.asarray(v)) for v in (first, s1, s2, low, high))
        low, high = low.double(), high.double()
        mean_b, m2_b = first + s1 / T, (s2 - s1 * s1 / T).clamp_min_(0)
        na = g["count"][cols].double()
        n = na + T
        delta = mean_b - g["mean"][cols]
        g["mean"][cols] += delta * (T / n)
        g["m2"][cols] += m2_b + delta * delta * (na * T / n)
        g["count"][cols] += T
        g["min"][cols] = torch.minimum(g["min"][cols], low)
        g["max"][cols] = torch.maximum(g["max"][cols], high)
        # top-k: only the components where the batch holds a value above the k-th kept
        some = (high > g["top_value"][cols].amin(dim=1)).nonzero().squeeze(1)
        if some.numel():   # gathered over blocks: one _top per TOP_VALUES values, not one per block
            r, m = self._pending_rows, some.numel()
            pend = self._buffer("pending", (r + m, T), xb.dtype, x.device)[r:]   # within the size _fold gave it
            if cpu:
                np.copyto(pend.numpy(), xb.numpy()[:, some.numpy()].T)
            else:
                pend.copy_(xb[:, some].t())
            self._pending.append(some + at)
            self._pending_rows += m
            if self._pending_rows * T >= self.TOP_VALUES:
                self._flush_top(g, ctx, T)

    TOP_VALUES = 1 << 22
    """Values gathered for one top-k merge (16 MiB in float32): few merges per batch, bounded memory."""

    def _flush_top(self, g: dict[str, torch.Tensor], ctx, T: int) -> None:
        """Merge the gathered components' batch values into their kept top-k, all in one :meth:`_top`."""
        if self._pending:
            dtype = self._pending_dtype
            x = self._scratch["pending", dtype][:self._pending_rows * T].view(self._pending_rows, T)
            self._top(g, x, torch.cat(self._pending), ctx)
        self._pending, self._pending_rows = [], 0

    def _index(self, y: np.ndarray, j: np.ndarray) -> None:
        """Into ``j``: each value's flat histogram index (component * bucket + bucket) as float64, from
        ``y`` (token, component) float64 (so the bucket is :func:`streamtap.io.summaries.bucket_index`'s,
        not moved by float32 rounding at its edges): numpy's element-wise passes, 15 times faster on a CPU
        than a binary search per value (``searchsorted`` on the signed edges, a device's way)."""
        n_side, B, scale, shift = self._buckets
        np.abs(y, out=j)
        _np_log(j, out=j)                       # |x| = 0: -inf, clipped to bucket 0 below
        np.multiply(j, scale, out=j)
        np.subtract(j, shift, out=j)
        np.ceil(j, out=j)
        np.clip(j, 0, n_side, out=j)            # |x| <= low (and 0): 0
        np.copysign(j, y, out=j)
        j += np.arange(n_side, n_side + y.shape[1] * B, B, dtype=np.float64)

    def _signed_edges(self, dtype: torch.dtype, device) -> torch.Tensor:
        """:func:`streamtap.io.summaries.signed_edges` for values of ``dtype``, on ``device`` (made once)."""
        key = ("edges", dtype, str(device))
        if key not in self._scratch:
            edges = S.signed_edges(self.settings, np.float64 if dtype == torch.float64 else np.float32)
            self._scratch[key] = torch.from_numpy(edges).to(device)
        return self._scratch[key]

    def _top(self, g: dict[str, torch.Tensor], x: torch.Tensor, rows: torch.Tensor, ctx) -> None:
        """Merge the batch's best of ``x`` (component, token) into the kept top-k of the group's
        components ``rows``. The kept k are a set in no order (``summaries()`` sorts them on read): a
        batch value that makes the cut takes the slot of a kept one that leaves, and only those slots
        are written, so a component whose top-k barely moves costs next to nothing."""
        k = self.settings.top_k
        vals, idx = torch.topk(x, min(k, x.shape[1]), dim=1, sorted=False)   # (c, kb)
        values = torch.cat([g["top_value"][rows], vals.double()], dim=1)      # (c, k + kb)
        pick = torch.topk(values, k, dim=1, sorted=False).indices
        chosen = torch.zeros(values.shape, dtype=torch.bool, device=x.device).scatter_(1, pick, True)
        leave = (~chosen[:, :k]).nonzero()   # (m, 2): row, slot of each kept value that goes
        come = chosen[:, k:].nonzero()       # (m, 2): row, column of each batch value that comes; as many per row
        if not len(leave):
            return
        at, slot = rows[leave[:, 0]], leave[:, 1]
        token = idx[come[:, 0], come[:, 1]]
        g["top_value"][at, slot] = vals[come[:, 0], come[:, 1]].double()
        seq, pos, windows = ctx
        g["top_seq"][at, slot] = seq[token]
        g["top_pos"][at, slot] = pos[token]
        g["top_window"][at, slot] = windows[token].long()

    def reset(self) -> None:
        """Forget what was folded in (after it was written into the store): the next write adds only
        what comes after."""
        self.state, self.sequences, self.tokens = {}, 0, 0

    # -- the end ---------------------------------------------------------------------------------------
    def result(self) -> tuple[dict, dict[str, dict[str, np.ndarray]]]:
        """(meta, {group: numpy state}) for :func:`streamtap.io.summaries.write`."""
        states = {g: {k: v.cpu().numpy().astype(np.int64, copy=False) if k == "hist" else v.cpu().numpy()
                      for k, v in st.items()} for g, st in self.state.items()}
        groups = [g for g in S.GROUPS if g in states]
        meta = {"settings": self.settings.as_dict(), "groups": groups,
                "components": {g: {k: list(v) for k, v in self.components[g].items()} for g in groups}}
        return meta, {g: states[g] for g in groups}


__all__ = ["Summariser"]
