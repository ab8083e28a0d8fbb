"""Summaries while capturing (``summarise=``): running statistics, a quantile sketch and top-k contexts.

Per batch, on the captured tensors where they are (the GPU on a GPU): every real token of the
forward counts, stored or not (``positions=`` selects what is stored, not what is summarised);
padding never does. Each group is one (token, component) matrix per layer at most, reduced with
whole-tensor operations: float64 sums for Chan's merge, one ``index_add_`` (``bincount`` on the
CPU) for the sketch, one ``topk`` over the batch merged with the kept ``top_k``. Memory is the state
alone, flat in the number of tokens. The numpy twin of every step is ``streamtap.io.summaries``.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..io import summaries as S
from ..io.schema import dims_of


def _host(t: torch.Tensor) -> np.ndarray:
    """A tensor as numpy on the host, floats widened where numpy lacks the dtype (bfloat16) exactly."""
    t = t.detach()
    return (t.float() if t.dtype == torch.bfloat16 else t).cpu().numpy()


class Summariser:
    """The running summaries of one tap, by group, as torch tensors on the model's device."""

    def __init__(self, settings: S.Settings, bound):
        self.settings, self.bound = settings, bound
        self.state: dict[str, dict[str, torch.Tensor]] = {}
        self.components: dict[str, dict[str, list]] = {}
        self._gram = None
        self._attention = None   # (Attention, the store's static weights as a Dataset) where patterns are captured
        g = settings.gamma   # bucket j of |x| = ceil(log(|x| / low) / log g), computed as ceil(log|x| * scale - shift)
        self._buckets = (settings.n_side, settings.n_buckets, 1.0 / math.log(g), math.log(settings.low) / math.log(g))
        self.sequences = 0
        self.tokens = 0

    # -- set-up ----------------------------------------------------------------------------------------
    def prepare(self, static: dict[str, torch.Tensor], attrs: dict | None = None) -> None:
        """Each head's W_O W_O^T (the output norm is sqrt(z G z), without the d_model-wide output); with
        ``attrs`` (the store's attributes, where patterns are captured) the store's own recomputation of
        the patterns (``streamtap.attention``), so the sink mass is the one ``st.analysis.attention`` gives."""
        if self._gram is None and "W_O" in static:
            w = static["W_O"].float()
            self._gram = torch.einsum("lhdm,lhem->lhde", w, w)
        if self._attention is None and attrs is not None and attrs.get("patterns"):
            import xarray as xr

            from ..attention import Attention

            weights = xr.Dataset({n: (dims_of(n), _host(t)) for n, t in static.items()}, attrs=attrs)
            self._attention = (Attention(weights), weights)

    def _group(self, name: str, n: int, device, labels: dict[str, list]) -> dict[str, torch.Tensor]:
        if name not in self.state:
            st = S.empty_state(n, self.settings)
            self.state[name] = {k: torch.from_numpy(v).to(device) for k, v in st.items()}
            self.components[name] = labels
        return self.state[name]

    # -- a batch ---------------------------------------------------------------------------------------
    def update(self, out: dict[str, torch.Tensor], input_ids: torch.Tensor, mask: torch.Tensor, seq: torch.Tensor,
               pos: torch.Tensor, n_sequences: int, projection: torch.Tensor | None = None,
               projection_labels=None, whole: bool = True) -> None:
        """Fold one forward's real tokens (``out``: every token, before any selection) into the state.
        ``whole``: each row is a whole sequence (a plain forward, not a decoding step): only then is the
        sink mass, which needs every key a query sees, computed."""
        ref = out["resid_final"]
        device, T = ref.device, ref.shape[0]
        w = self.settings.window
        ids = torch.where(mask, input_ids, torch.full_like(input_ids, -1))
        windows = torch.nn.functional.pad(ids, (w, w), value=-1).unfold(1, 2 * w + 1, 1)[mask]   # (T, 2w+1)
        ctx = (seq.to(device), pos.to(device).long(), windows.to(device))
        L = self.bound.n_layers
        if "z" in out and self._gram is not None:
            z = out["z"]
            H, dh = z.shape[2], z.shape[3]
            g = self._group("head", L * H, device, {"layer": [l for l in range(L) for _ in range(H)],
                                                   "index": [h for _ in range(L) for h in range(H)]})
            if self._gram.device != device:
                self._gram = self._gram.to(device)
            zf = z.float().reshape(T, L * H, dh).transpose(0, 1)                       # (LH, T, dh)
            sq = torch.bmm(zf, self._gram.reshape(L * H, dh, dh)).mul_(zf).sum(dim=-1)   # one matmul for all heads
            self._fold(g, sq.t_().clamp_min_(0).sqrt_(), 0, ctx)
            if self._attention is not None and whole:
                g = self._group("sink", L * H, device, self.components["head"])
                self._fold(g, torch.from_numpy(self._sink_mass(out, ids[mask], ctx)).to(device), 0, ctx)
        for var, name in (("mlp_out", "mlp"), ("mixer_out", "mixer")):
            if var in out:
                g = self._group(name, L, device, {"layer": list(range(L)), "index": [-1] * L})
                self._fold(g, torch.linalg.vector_norm(out[var].float(), dim=-1), 0, ctx)
        if "neuron_act" in out:
            act = out["neuron_act"]
            N = act.shape[2]
            g = self._group("neuron", L * N, device, {"layer": [l for l in range(L) for _ in range(N)],
                                                     "index": [n for _ in range(L) for n in range(N)]})
            for layer in range(L):
                self._fold(g, act[:, layer].float(), layer * N, ctx)
        if projection is not None:
            comps, dirs = projection_labels
            C, D = len(comps), len(dirs)
            g = self._group("projection", C * D, device,
                            {"layer": [int(c[2]) for c in comps for _ in range(D)],
                             "index": [j for _ in range(C) for j in range(D)],
                             "label": [f"{c[0]}:{d}" for c in comps for d in dirs]})
            self._fold(g, projection.to(device).reshape(T, C * D).float(), 0, ctx)
        self.sequences += n_sequences
        self.tokens += T

    def _sink_mass(self, out: dict[str, torch.Tensor], token_ids: torch.Tensor, ctx) -> np.ndarray:
        """(token, layer * head) float64: the probability each head's query puts on its sequence's first
        real token, from the patterns recomputed as ``st.analysis.attention`` recomputes them from a store
        (the batch's terms and the store's weights, in float64)."""
        import xarray as xr

        from ..attention import sequence_attention, sequence_tokens

        att, weights = self._attention
        seq, pos, _ = ctx
        per_token = {n: (("token", *dims_of(n)), _host(t)) for n, t in out.items()}
        coords = {"seq": ("token", seq.cpu().numpy()), "pos": ("token", pos.cpu().numpy()),
                  "token_id": ("token", token_ids.cpu().numpy())}
        batch = xr.Dataset(per_token, coords=coords, attrs=weights.attrs).merge(weights, combine_attrs="override")
        H = att.n_heads
        sink = np.empty((batch.sizes["token"], batch.sizes["layer"] * H))
        rows = None
        for s, layer, one in sequence_attention(batch, att=att):
            if rows is None or rows[0] != s:
                rows = (s, sequence_tokens(batch, s))
            sink[rows[1][:, None], layer * H + one.heads[None, :]] = one.pattern[:, :, 0].T
        return sink

    def _fold(self, g: dict[str, torch.Tensor], x: torch.Tensor, at: int, ctx) -> None:
        """Columns ``at .. at + x.shape[1]`` of a group take one batch ``x`` (token, component)."""
        T, C = x.shape
        cols = slice(at, at + C)
        # count, mean, m2 (Chan), min, max
        var_b, mean_b = torch.var_mean(x.double(), dim=0, correction=0)   # one fused float64 pass
        m2_b = var_b.mul_(T)
        na = g["count"][cols].double()
        n = na + T
        delta = mean_b - g["mean"][cols]
        g["mean"][cols] += delta * (T / n)
        g["m2"][cols] += m2_b + delta * delta * (na * T / n)
        g["count"][cols] += T
        g["min"][cols] = torch.minimum(g["min"][cols], x.amin(dim=0).double())
        g["max"][cols] = torch.maximum(g["max"][cols], x.amax(dim=0).double())
        # the sketch: one flat index per (component, bucket)
        n_side, B, scale, shift = self._buckets
        j = torch.log(x.abs()).mul_(scale).sub_(shift).ceil_().clamp_(0, n_side)   # |x| <= low (and 0): bucket 0
        bucket = torch.where(x < 0, -j, j).add_(n_side).long()
        flat = bucket.add_(torch.arange(C, device=x.device) * B).reshape(-1)
        hist = g["hist"][cols].reshape(-1)   # a view: rows of a contiguous matrix
        if x.device.type == "cpu":
            hist += torch.bincount(flat, minlength=C * B)
        else:
            hist.index_add_(0, flat, torch.ones_like(flat))
        # top-k: the batch's best, merged with those kept
        seq, pos, windows = ctx
        k = self.settings.top_k
        kb = min(k, T)
        vals, idx = torch.topk(x, kb, dim=0)                                  # (kb, C)
        values = torch.cat([g["top_value"][cols], vals.t().double()], dim=1)  # (C, k + kb)
        best, pick = torch.topk(values, k, dim=1)
        g["top_value"][cols] = best
        for name, new in (("top_seq", seq[idx].t()), ("top_pos", pos[idx].t())):
            g[name][cols] = torch.gather(torch.cat([g[name][cols], new], dim=1), 1, pick)
        win = torch.cat([g["top_window"][cols], windows[idx].transpose(0, 1).long()], dim=1)   # (C, k+kb, W)
        g["top_window"][cols] = torch.gather(win, 1, pick.unsqueeze(-1).expand(-1, -1, win.shape[-1]))

    def reset(self) -> None:
        """Forget what was folded in (after it was written into the store): the next write adds only
        what comes after."""
        self.state, self.sequences, self.tokens = {}, 0, 0

    # -- the end ---------------------------------------------------------------------------------------
    def result(self) -> tuple[dict, dict[str, dict[str, np.ndarray]]]:
        """(meta, {group: numpy state}) for :func:`streamtap.io.summaries.write`."""
        states = {g: {k: v.cpu().numpy() for k, v in st.items()} for g, st in self.state.items()}
        groups = [g for g in S.GROUPS if g in states]
        meta = {"settings": self.settings.as_dict(), "groups": groups,
                "components": {g: {k: list(v) for k, v in self.components[g].items()} for g in groups}}
        return meta, {g: states[g] for g in groups}


__all__ = ["Summariser"]
