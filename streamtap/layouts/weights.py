"""The static weights a store keeps once, read off the bound model.

W_O and the biases define the terms (the decomposition needs nothing else); W_Q, W_K, W_V, the
attention's input norm and score scale, W_E and W_U serve the offline analyses of patterns and
messages. Each is returned in the schema's layout (``streamtap.io.schema.VARIABLES`` gives the dims).
"""

from __future__ import annotations

import torch

from ..errors import LayoutError
from .bind import BoundLayout
from .norms import bare_forward, probe_norm
from .spec import InputOf, Mlp


def in_out_weight(module: torch.nn.Module) -> torch.Tensor:
    """The weight as (in_features, out_features), whatever convention the module stores it in.

    ``nn.Linear`` (and subclasses such as Falcon's) keeps (out, in); GPT-2's ``Conv1D`` keeps
    (in, out). Telling them apart by the module's own type keeps architecture names out of this.
    """
    if isinstance(module, torch.nn.Linear):
        return module.weight.detach().T
    if type(module).__name__ == "Conv1D":
        return module.weight.detach()
    raise TypeError(f"cannot read an (in, out) weight from {type(module).__name__}")


def _bias(module: torch.nn.Module, width: int, like: torch.Tensor) -> torch.Tensor:
    bias = getattr(module, "bias", None)
    if bias is None:
        return torch.zeros(width, dtype=like.dtype, device=like.device)
    return bias.detach()


def _scaled(t: torch.Tensor, factor: float) -> torch.Tensor:
    """``t`` times a layout multiplier (itself where the factor is 1): the weight as its term enters the stream."""
    return t if factor == 1.0 else t * factor


def _augmented(module: torch.nn.Module) -> tuple[torch.Tensor, bool]:
    """(in + 1, out): the (in, out) weight with the bias (zeros where none) as a last row; has it a bias."""
    w = in_out_weight(module)
    return torch.cat([w, _bias(module, w.shape[1], w)[None]]), getattr(module, "bias", None) is not None


def _split_qkv(aug: torch.Tensor, split: str, n_heads: int, d_head: int, name: str):
    """q (rows, n_heads, d_head), k and v (rows, n_kv, d_head) from a fused projection's columns."""
    rows, width = aug.shape
    n_kv, odd = divmod(width // d_head - n_heads, 2)
    if width % d_head or odd or n_kv < 1 or n_heads % n_kv:
        raise LayoutError(f"layout {name!r}: a fused query/key/value projection {width} wide is not "
                         f"(n_heads + 2 n_kv) x d_head with n_heads={n_heads}, d_head={d_head}")
    if split == "concat":
        q, k, v = aug.split([n_heads * d_head, n_kv * d_head, n_kv * d_head], dim=1)
        return q.reshape(rows, n_heads, d_head), k.reshape(rows, n_kv, d_head), v.reshape(rows, n_kv, d_head)
    group = n_heads // n_kv
    g = aug.reshape(rows, n_kv, group + 2, d_head)
    return g[:, :, :group].reshape(rows, n_heads, d_head), g[:, :, group], g[:, :, group + 1]


def _probe_qk_norm(norm: torch.nn.Module, d_head: int) -> tuple[str, list[dict]]:
    """(scope, probes) of a query or key norm: one norm over each head's values, a list of norms one
    per head, or one norm over the heads' concatenated values."""
    per_head = getattr(norm, "norms", None)
    if isinstance(per_head, torch.nn.ModuleList):
        return "head", [probe_norm(m, d_head) for m in per_head]
    weight = getattr(norm, "weight", None)
    width = weight.numel() if weight is not None else d_head
    probe = probe_norm(norm, width)
    return ("head", [probe]) if width == d_head else ("all", [probe])


class Weights:
    """The weights of one bound layout (probes and the tied-embedding test are computed once)."""

    def __init__(self, bound: BoundLayout):
        self.bound = bound
        self._cache: dict = {}

    def output_projections(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W_O (layer, head, d_head, d_model) and the attention output bias (layer, d_model)."""
        b = self.bound
        W_O, b_O = [], []
        for layer in range(b.n_layers):
            tap = b.taps.get(f"z.{layer}")
            if tap is None:  # a hybrid model's mixer layer: its z is stored as zeros, so zeros here
                continue
            o = b.module(tap[0])
            w = in_out_weight(o)
            own = b.out_scales.get(f"z.{layer}", 1.0)   # the block's own multiplier on this attention (Falcon-H1)
            W_O.append((layer, _scaled(w.reshape(b.n_heads, b.d_head, b.d_model), own)))
            bias = _bias(o, b.d_model, w)
            if f"z.{layer}" in b.out_biases:   # added by the block outside the projection (GPT-NeoX-Japanese)
                bias = bias + b.module(b.out_biases[f"z.{layer}"]).detach().to(bias.dtype)
            b_O.append((layer, _scaled(bias, own)))
        if not W_O:  # a pure state-space model: no heads
            like = next(b.model.parameters())
            return (like.new_zeros(b.n_layers, 0, 0, b.d_model).detach(),
                    like.new_zeros(b.n_layers, b.d_model).detach())
        like_w, like_b = W_O[0][1], b_O[0][1]
        full_w, full_b = dict(W_O), dict(b_O)
        scale = b.multiplier("residual")
        return (_scaled(torch.stack([full_w.get(i, torch.zeros_like(like_w)) for i in range(b.n_layers)]), scale),
                _scaled(torch.stack([full_b.get(i, torch.zeros_like(like_b)) for i in range(b.n_layers)]), scale))

    def static(self, neurons: bool) -> dict[str, torch.Tensor]:
        """Every weight the store keeps once, by schema name."""
        b = self.bound
        d = b.d_model
        W_O, b_O = self.output_projections()
        out = {"W_O": W_O, "attn_bias": b_O}
        W_out, b_out = [], []
        for layer in range(b.n_layers):
            # fused experts have no single down projection (their bias is part of each term); a layer
            # without an MLP (Nemotron-H, pure state-space models) writes a zero MLP term
            if b.moe or f"neuron_act.{layer}" not in b.taps:
                b_out.append(torch.zeros(d, dtype=W_O.dtype, device=W_O.device))
                W_out.append(None)
                continue
            down = b.module(b.taps[f"neuron_act.{layer}"][0])
            scale = b.multiplier("residual") * b.out_scales.get(f"neuron_act.{layer}", 1.0)
            wd = _scaled(in_out_weight(down), scale)
            b_out.append(_scaled(_bias(down, d, wd), scale))
            W_out.append(wd)
        out["mlp_bias"] = torch.stack(b_out)
        if neurons and b.d_mlp:
            like = next(w for w in W_out if w is not None)
            out["W_out"] = torch.stack([torch.zeros_like(like) if w is None else w for w in W_out])
            out.update(self.mlp_inputs()[0])
        if b.norms:
            probes = b.norm_probes
            out["norm_weight"] = torch.stack([p["gamma"] for p in probes])
            out["norm_bias"] = torch.stack([p["beta"] for p in probes])
            out["norm_center"] = torch.tensor([p["center"] for p in probes])
        final = self.final_norm()
        if final is not None:
            out["final_norm_weight"] = final["gamma"]
            if bool(final["beta"].abs().max() > 0):
                out["final_norm_bias"] = final["beta"]
            unembedding = self.unembedding()
            if unembedding is not None:
                out["W_U"], unembed_bias = unembedding
                if unembed_bias is not None:
                    out["unembed_bias"] = unembed_bias
        out.update(self.attention_weights())
        out.update(self.qk_norms()[0])
        if not self.embedding_is_unembedding():
            W_E = self.token_embedding()
            if W_E is not None:
                out["W_E"] = W_E
        return out

    def final_norm(self) -> dict | None:
        """gamma, beta, centring and eps of the norm before the unembedding (None where the layout has none)."""
        if "final" not in self._cache:
            b = self.bound
            path = b.find(b.layout.final_norm) if b.layout.final_norm else None
            self._cache["final"] = probe_norm(b.module(path), b.d_model) if path is not None else None
        return self._cache["final"]

    def unembedding(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """W_U (vocab, d_model), with a linear map after the final norm folded in, and its bias."""
        b = self.bound
        model = b.model
        unembed = model.get_output_embeddings() if b.layout.unembed and hasattr(model, "get_output_embeddings") else None
        if unembed is None:
            return None
        W_U = unembed.weight.detach()
        through = b.find(b.layout.unembed_through) if b.layout.unembed_through else None
        if through is not None:  # fold a linear map after the final norm into the unembedding
            W_U = (W_U.float() @ in_out_weight(b.module(through)).float().T).to(W_U.dtype)
        bias = getattr(unembed, "bias", None)
        scale = b.multiplier("logit")
        return _scaled(W_U, scale), None if bias is None else _scaled(bias.detach(), scale)

    # -- what the analyses of patterns and messages need -------------------------------------------
    def token_embedding(self, rows: int = 8192) -> torch.Tensor | None:
        """W_E (vocab, d_model): each token's embedding term as it enters the stream.

        The input embedding's output passed through the ``embed`` module where that is another one
        (OPT's ``project_in``, BLOOM's embedding LayerNorm), and scaled where the embedding module
        scales (Gemma); a plain ``nn.Embedding`` is its weight, read without a copy.
        """
        b = self.bound
        emb = b.model.get_input_embeddings() if hasattr(b.model, "get_input_embeddings") else None
        entry = b.layout.embeds.get("embed")
        entry_path = b.find(entry) if entry is not None and not isinstance(entry, InputOf) else None
        if emb is None or entry_path is None:
            return None
        entry = b.module(entry_path)
        if entry is not emb and any(m is emb for m in entry.modules()):
            return None   # the term is a whole embeddings module's output (RoC-BERT): positions and all, not per token
        if entry is emb and type(emb) is torch.nn.Embedding:
            return _scaled(emb.weight.detach(), b.multiplier("embed"))
        blocks = []
        with torch.no_grad():
            for start in range(0, emb.num_embeddings, rows):
                x = bare_forward(emb, torch.arange(start, min(start + rows, emb.num_embeddings), device=emb.weight.device))
                blocks.append(x if entry is emb else bare_forward(entry, x))
        return _scaled(torch.cat(blocks), b.multiplier("embed"))

    def embedding_is_unembedding(self) -> bool:
        """Whether W_E equals the stored W_U bit for bit (tied, unscaled): then W_E is not stored twice."""
        if "tied" not in self._cache:
            tied = False
            if self.final_norm() is not None:
                unembedding = self.unembedding()
                W_E = self.token_embedding() if unembedding is not None else None
                tied = W_E is not None and W_E.shape == unembedding[0].shape and bool(torch.equal(W_E, unembedding[0]))
            self._cache["tied"] = tied
        return self._cache["tied"]

    def _has_qkv(self) -> bool:
        """Whether the store keeps the attention's query/key/value side: not for hybrid models, whose
        mixer layers have none (their patterns are refused: ``layouts.pattern_support``)."""
        attn = self.bound.attn
        return attn is not None and bool(attn.q or attn.qkv) and not self.bound.mixer_layers

    def attn_norm_probes(self) -> list[dict]:
        """gamma, beta, centring and eps of each layer's attention input norm (empty where none)."""
        if "attn_norms" not in self._cache:
            b, step = self.bound, self.bound.attn
            paths = ([b.in_block(layer, step.norm, "attention input norm") for layer in range(b.n_layers)]
                     if self._has_qkv() and step.norm else [])
            self._cache["attn_norms"] = [probe_norm(b.module(p), b.d_model) for p in paths]
        return self._cache["attn_norms"]

    def _qkv(self, layer: int) -> dict[str, tuple[torch.Tensor, bool]]:
        """Per name Q, K, V: (heads, d_model + 1, d_head), the bias as the last row; has it a bias."""
        b = self.bound
        step, dh = b.attn, b.d_head
        if step.qkv:
            aug, biased = _augmented(b.module(b.in_block(layer, step.qkv, "query/key/value projection")))
            parts = dict(zip("QKV", ((p, biased) for p in _split_qkv(aug, step.split, b.n_heads, dh, b.name))))
        else:
            parts = {}
            for name, rel in zip("QKV", (step.q, step.k, step.v)):
                aug, biased = _augmented(b.module(b.in_block(layer, rel, f"{name.lower()} projection")))
                parts[name] = (aug.reshape(aug.shape[0], -1, dh), biased)
        # on the host, layer by layer: the store wants them there, and a GPU is spared the stacked copy
        return {name: (p.permute(1, 0, 2).cpu(), biased) for name, (p, biased) in parts.items()}

    def _score_scale(self, layer: int) -> float | None:
        b = self.bound
        scale = b.attn.scale
        if scale is None or isinstance(scale, (int, float)):
            return scale
        attn = b.module(b.in_block(layer, (b.attn.qkv or b.attn.q).rsplit(".", 1)[0], "attention module"))
        value = scale(attn) if callable(scale) else getattr(attn, scale, None)
        return None if value is None else float(value)

    def attention_weights(self) -> dict[str, torch.Tensor]:
        """W_Q (layer, head, d_model, d_head), W_K and W_V (layer, kv_head, d_model, d_head), their biases
        where the model has them, the attention's input norm and its score scale, per layer.

        q = attn_norm(x) @ W_Q + b_Q is the model's query for head h before any position encoding
        (rotary, ALiBi) and before the extras ``attention_info`` notes (q/k norms, clipping); the
        score is ``attn_scale`` * q . k.
        """
        if not self._has_qkv():
            return {}
        per_layer = [self._qkv(layer) for layer in range(self.bound.n_layers)]
        out = {}
        for name in "QKV":
            aug = torch.stack([layer[name][0] for layer in per_layer])         # (layer, heads, d_model + 1, d_head)
            out[f"W_{name}"] = aug[:, :, :-1].contiguous()
            if any(layer[name][1] for layer in per_layer):
                out[f"b_{name}"] = aug[:, :, -1].contiguous()
        probes = self.attn_norm_probes()
        if probes:
            out["attn_norm_weight"] = torch.stack([p["gamma"] for p in probes])
            if any(bool(p["beta"].abs().max() > 0) for p in probes):
                out["attn_norm_bias"] = torch.stack([p["beta"] for p in probes])
        scales = [self._score_scale(layer) for layer in range(self.bound.n_layers)]
        if all(s is not None for s in scales):
            out["attn_scale"] = torch.tensor(scales, dtype=torch.float32)
        if self.bound.attn.sinks:   # learned sink logits: part of every pattern's denominator
            out["attn_sinks"] = torch.stack([getattr(self.attention_module(layer), self.bound.attn.sinks).detach().cpu()
                                             for layer in range(self.bound.n_layers)])
        return out

    def attention_info(self) -> dict:
        """Store attributes for the attention weights: input-norm kind and eps, notes, W_E's alias."""
        info = {"W_E_alias": "W_U"} if self.embedding_is_unembedding() else {}
        if not self._has_qkv():
            return info
        probes = self.attn_norm_probes()
        if probes:   # identities (ModernBERT's first layer) are listed; the kind is the other layers'
            real = [p for p in probes if not p.get("identity")] or probes
            info["attn_norm_kind"] = "layernorm" if real[0]["center"] else "rmsnorm"
            info["attn_norm_eps"] = real[0]["eps"]
            identity = [layer for layer, p in enumerate(probes) if p.get("identity")]
            if identity:
                info["attn_norm_identity"] = identity
        b = self.bound
        notes, step = [], b.attn
        qk = [b.find(tuple(b.block_path(0, p) for p in ((r,) if isinstance(r, str) else r)))
              for r in step.qk_norm or ()]
        if qk and all(qk):
            names = " and ".join(p.rsplit(".", 2)[-2] + "." + p.rsplit(".", 1)[-1] for p in qk)
            notes.append(f"queries and keys pass through norms of their own ({names}) after the projection and "
                         "before positions are applied; W_Q, W_K and the fused W_QK leave them out")
        for note in step.notes:
            if isinstance(note, str):
                notes.append(note)
            elif getattr(b.config, note[0], None):
                notes.append(note[1].format(getattr(b.config, note[0])))
        if notes:
            info["attn_notes"] = notes
        return info

    # -- what the attention pattern is made of -----------------------------------------------------
    def attention_module(self, layer: int) -> torch.nn.Module:
        b = self.bound
        return b.module(b.in_block(layer, b.attn.module_path, "attention module"))

    def qk_norms(self) -> tuple[dict[str, torch.Tensor], dict]:
        """The query and key norms (``qk_norm``) as static weights and their attributes.

        Each is probed like every norm: gamma and beta as (layer, width) with width the queries' (or
        keys') full width, heads concatenated; ``qk_norm_scope`` says whether the statistics are
        taken over each head's d_head values (``"head"``; a norm shared by the heads has its gamma
        repeated, one of its own per head has its own) or over the whole width (``"all"``, OLMo-2).
        """
        b = self.bound
        if not self._has_qkv() or not b.attn.qk_norm:
            return {}, {}
        out, info = {}, {}
        for side, rel in zip("qk", b.attn.qk_norm):
            rels = (rel,) if isinstance(rel, str) else rel
            gammas, betas = [], []
            for layer in range(b.n_layers):
                path = b.find(tuple(b.block_path(layer, p) for p in rels))
                if path is None:
                    return {}, {}  # the config switched them off (StableLM's qk_layernorm=False)
                scope, probes = _probe_qk_norm(b.module(path), b.d_head)
                gammas.append(torch.cat([p["gamma"] for p in probes]))
                betas.append(torch.cat([p["beta"] for p in probes]))
                info = {"qk_norm_scope": scope, "qk_norm_kind": "layernorm" if probes[0]["center"] else "rmsnorm",
                        "qk_norm_eps": probes[0]["eps"]}
            out[f"{side}_norm_weight"] = torch.stack(gammas)
            if any(bool(x.abs().max() > 0) for x in betas):
                out[f"{side}_norm_bias"] = torch.stack(betas)
        return out, info

    def pattern_attrs(self) -> dict:
        """The attention's facts a pattern is recomputed from, as store attributes."""
        b = self.bound
        if not self._has_qkv():
            return {}
        config, step = b.config, b.attn
        windows = [step.window(config, self.attention_module(layer)) if step.window else None
                   for layer in range(b.n_layers)]
        info = {"attn_window": [int(w) if w else None for w in windows], "rotary_groups": self.rotary_groups()}
        for key, field_name in (("attn_softcap", step.softcap), ("qkv_clip", step.clip)):
            value = getattr(config, field_name, None) if field_name else None
            if value:
                info[key] = float(value)
        if b.positions() == "rotary":
            info.update(rotary_style=step.rotary, rotary_order=step.rotary_order)
            if step.rotates:   # no-rope layers read the same tables but do not turn q and k
                info["rotary_layers"] = [bool(step.rotates(config, self.attention_module(layer)))
                                         for layer in range(b.n_layers)]
        return info

    def rotary_groups(self) -> list[int]:
        """Per layer, which of the rotary tables it uses: one per ``config.layer_types`` kind (Gemma-3
        rotates local and global layers differently), else one for every layer."""
        types = getattr(self.bound.config, "layer_types", None)
        if not types or self.bound.positions() != "rotary":
            return [0] * self.bound.n_layers
        kinds = sorted(set(types))
        return [kinds.index(t) for t in types[:self.bound.n_layers]]

    # -- what each MLP neuron reads (attribution graphs' MLP input edges) ------------------------------
    def mlp_step(self) -> Mlp | None:
        """The block's dense MLP step where it declares its input projections (None: MoE, hybrid, undeclared)."""
        b = self.bound
        if b.moe or b.mixer_layers:
            return None
        step = next((s for s in b.layout.block if isinstance(s, Mlp)), None)
        return step if step is not None and step.reads else None

    def mlp_inputs(self) -> tuple[dict[str, torch.Tensor], dict]:
        """W_in (layer, d_model, neuron) and b_in, W_gate and b_gate for gated MLPs, the norm the MLP reads
        the stream through (``mlp_norm_weight``/``mlp_norm_bias``), and their attributes: what a neuron's
        pre-activation is made of, pre = mlp_norm(x) @ W_in + b_in. Empty where the layout does not
        declare them (``Mlp.up``, ``Mlp.gate_up``)."""
        if "mlp_inputs" in self._cache:
            return self._cache["mlp_inputs"]
        b, step = self.bound, self.mlp_step()
        if step is None:
            self._cache["mlp_inputs"] = ({}, {})
            return self._cache["mlp_inputs"]
        parallel, norm = step.is_parallel(b.config), step.norm
        out, info = {}, {"mlp_reads": "attn" if parallel else "mlp"}
        for name, rel in (("in", step.up), ("gate", step.gate), ("gate_up", step.gate_up)):
            if rel is None:
                continue
            weights, biases, biased = [], [], False
            for layer in range(b.n_layers):
                aug, has = _augmented(b.module(b.in_block(layer, rel, f"MLP {name} projection")))
                weights.append(aug[:-1].cpu())
                biases.append(aug[-1].cpu())
                biased |= has
            W, bias = torch.stack(weights), torch.stack(biases)
            # a fused projection's output is [gate | up]: its two halves are W_gate and W_in
            parts = {name: (W, bias)} if name != "gate_up" else dict(zip(("gate", "in"), zip(W.chunk(2, -1), bias.chunk(2, -1))))
            for part, (w, bb) in parts.items():
                out[f"W_{part}"] = w.contiguous()
                if biased:
                    out[f"b_{part}"] = bb.contiguous()
        if norm:
            probes = [probe_norm(b.module(b.in_block(layer, norm, "MLP input norm")), b.d_model)
                      for layer in range(b.n_layers)]
            out["mlp_norm_weight"] = torch.stack([p["gamma"] for p in probes])
            if any(bool(p["beta"].abs().max() > 0) for p in probes):
                out["mlp_norm_bias"] = torch.stack([p["beta"] for p in probes])
            info.update(mlp_norm_kind="layernorm" if probes[0]["center"] else "rmsnorm", mlp_norm_eps=probes[0]["eps"])
        act = getattr(b.config, step.act, None) if step.act else None
        if act:
            info["mlp_act"] = str(act)
        self._cache["mlp_inputs"] = (out, info)
        return out, info

    def attrs(self, neurons: bool = False) -> dict:
        """The store attributes the weights contribute: the final norm's kind and eps, and
        :meth:`attention_info` (and, with ``neurons``, what the MLP's neurons read)."""
        info = {**self.attention_info(), **self.pattern_attrs(), **self.qk_norms()[1]}
        if neurons:
            info.update(self.mlp_inputs()[1])
        probe = self.final_norm()
        if probe is None:
            return info
        return {"final_norm_kind": "layernorm" if probe["center"] else "rmsnorm", "final_norm_eps": probe["eps"], **info}




def projection_columns(bound: BoundLayout, layer: int, which: str, index: int) -> tuple[str, slice]:
    """Where one head's queries (``which="q"``, query head ``index``) or values (``"v"``, kv head
    ``index``) sit in a live forward: (the projection's full module path, the column slice of its
    output). Fused projections follow the layout's ``split`` exactly as ``_split_qkv`` reads their
    weights, so an intervention on these columns is an intervention on those weights' outputs."""
    step, d = bound.attn, bound.d_head
    if step is None or not (step.q or step.qkv):
        raise LayoutError(f"layout {bound.name!r} does not locate the attention's queries and values")
    if not step.qkv:
        return bound.in_block(layer, step.q if which == "q" else step.v, f"{which} projection"), slice(index * d, (index + 1) * d)
    path = bound.in_block(layer, step.qkv, "query/key/value projection")
    width = in_out_weight(bound.module(path)).shape[1]
    n_kv = (width // d - bound.n_heads) // 2
    if step.split == "concat":
        start = index if which == "q" else bound.n_heads + n_kv + index
    else:
        group = bound.n_heads // n_kv
        start = (index // group) * (group + 2) + index % group if which == "q" else index * (group + 2) + group + 1
    return path, slice(start * d, (start + 1) * d)


__all__ = ["Weights", "in_out_weight", "projection_columns"]
