"""What a layout declares, and how a declaration is bound to one live model.

A layout is data: module paths and which side of each module holds a term, plus the order in which
each block writes into the residual stream. ``Attn`` and ``Mlp`` steps write terms; a ``Norm``
step passes the whole stream through a norm (post-LN models), and ``through=`` passes one term
through a norm of its own (Gemma-2's post-sublayer norms). Norms are affine once their per-token
scale is frozen, so capture stores that scale and the decomposition stays exact.

Binding turns the paths into the concrete per-layer paths that nnsight caches, the ordered stream
of events that ``streamtap.decompose`` replays, and the static weights the store keeps (including
the query, key and value weights that ``Attn`` locates, for the offline analyses of patterns).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable

import torch

INPUT, OUTPUT = "input", "output"
Paths = str | tuple[str, ...]   # alternatives: the first that names a module in this model is used


SPLITS = ("concat", "per_group")
"""How a fused query/key/value projection lays out its outputs (see ``Attn``)."""


@dataclass(frozen=True)
class Attn:
    """Attention writes: ``proj``'s input is z (heads concatenated), its weight W_O, its bias b_O.

    The other fields say where the queries, keys and values come from, so that the store carries
    W_Q, W_K, W_V (and their biases) for the offline analyses of patterns and messages:

    - ``q``, ``k``, ``v``: separate projections (``projections(prefix)`` fills them in), or
    - ``qkv``: one fused projection, laid out as ``split`` says: ``"concat"`` is
      [all query heads | all key heads | all value heads] (GPT-2's ``c_attn``, Phi-3's ``qkv_proj``);
      ``"per_group"`` is [kv head, (its query heads..., key, value), d_head], which without grouped
      queries is [head, (q, k, v), d_head] (GPT-NeoX, BLOOM, Falcon, GPT-BigCode). The number of
      key/value heads is read off the projection's width, (n_heads + 2 n_kv) d_head.
    - ``norm``: the norm the attention reads the stream through (pre-norm blocks); omit where the
      attention reads the stream itself (post-LN blocks, OLMo-2).
    - ``scale``: what the model multiplies q.k by: a number, the name of an attribute of the attention
      module (the parent of ``q``/``qkv``), or a function of that module.
    - ``qk_norm``: norms applied to queries and keys after the projection (noted in the store).
    - ``notes``: anything else the attention does to q, k or v: a string is always noted; a pair
      (config field, text) is noted where the config sets the field, ``{}`` standing for its value.
    """

    proj: str
    through: str | None = None
    q: str | None = None
    k: str | None = None
    v: str | None = None
    qkv: str | None = None
    split: str = "concat"
    norm: Paths | None = None
    scale: float | str | Callable | None = "scaling"
    qk_norm: tuple[Paths, Paths] | None = None
    notes: tuple[str | tuple[str, str], ...] = ()

    def __post_init__(self):
        if self.split not in SPLITS:
            raise ValueError(f"Attn(split={self.split!r}): expected one of {SPLITS}")
        if self.qkv and self.q:
            raise ValueError("Attn: give either qkv= or q=/k=/v=, not both")


def projections(prefix: str, q: str = "q_proj", k: str = "k_proj", v: str = "v_proj") -> dict[str, str]:
    """``Attn`` fields for separate query, key and value projections under one attention module."""
    return {"q": f"{prefix}.{q}", "k": f"{prefix}.{k}", "v": f"{prefix}.{v}"}


@dataclass(frozen=True)
class Mlp:
    """The MLP writes ``term``'s output; ``down``'s input holds the neuron activations.

    ``clone`` copies the output at capture, for models that add into it in place afterwards
    (Falcon's ``mlp_output += attention_output``).
    """

    term: str
    down: str | None = None
    through: str | None = None
    clone: bool = False


@dataclass(frozen=True)
class Moe:
    """A mixture of experts writes ``term``'s output, split into one term per routed expert.

    ``experts`` is called as ``experts(x, top_k_index, top_k_weights)`` (the transformers 5 fused
    experts); calling it again once per routing slot, with that slot's index and weight alone, gives
    each routed expert's weighted output from the model's own code. ``shared`` is an always-on
    expert whose output is scaled by sigmoid(``shared_gate``(x)) (Qwen2-MoE).
    """

    term: str
    experts: str
    shared: str | None = None
    shared_gate: str | None = None
    through: str | None = None


@dataclass(frozen=True)
class Norm:
    """The whole residual stream passes through this norm (post-LN blocks, embedding norms)."""

    path: str


@dataclass(frozen=True)
class Layout:
    """Where each additive term of the residual stream lives in one architecture family.

    Paths are relative to ``model.base_model``; block steps are relative to one block of
    ``layers``; ``{last}`` in a path stands for the last block's index.
    """

    name: str
    model_types: tuple[str, ...]
    embeds: dict[str, Paths]             # stored variable name -> module whose output enters the stream
    layers: str
    block: tuple[Attn | Mlp | Moe | Norm, ...]
    resid_final: tuple[Paths, str]       # where the final residual is read, and from which side
    final_norm: Paths | None = None      # the norm before the unembedding (offline attribution)
    after_embeds: tuple[Norm, ...] = ()
    unembed_through: Paths | None = None  # a linear map between the final norm and the unembedding
    unembed: bool = True                  # False where the head is not linear (masked-LM heads)
    when: Callable[[object], bool] | None = None   # a config predicate, for families with variants
    notes: str = ""

    def describe(self) -> str:
        return f"{self.name} ({', '.join(self.model_types)})"


def _resolve(root: torch.nn.Module, path: str):
    module = root
    for part in path.split("."):
        module = module[int(part)] if part.lstrip("-").isdigit() else getattr(module, part, None)
        if module is None:
            return None
    return module


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


def _augmented(module: torch.nn.Module) -> tuple[torch.Tensor, bool]:
    """(in + 1, out): the (in, out) weight with the bias (zeros where none) as a last row; has it a bias."""
    w = in_out_weight(module)
    return torch.cat([w, _bias(module, w.shape[1], w)[None]]), getattr(module, "bias", None) is not None


def _split_qkv(aug: torch.Tensor, split: str, n_heads: int, d_head: int, name: str):
    """q (rows, n_heads, d_head), k and v (rows, n_kv, d_head) from a fused projection's columns."""
    rows, width = aug.shape
    n_kv, odd = divmod(width // d_head - n_heads, 2)
    if width % d_head or odd or n_kv < 1 or n_heads % n_kv:
        raise ValueError(f"layout {name!r}: a fused query/key/value projection {width} wide is not "
                         f"(n_heads + 2 n_kv) x d_head with n_heads={n_heads}, d_head={d_head}")
    if split == "concat":
        q, k, v = aug.split([n_heads * d_head, n_kv * d_head, n_kv * d_head], dim=1)
        return q.reshape(rows, n_heads, d_head), k.reshape(rows, n_kv, d_head), v.reshape(rows, n_kv, d_head)
    group = n_heads // n_kv
    g = aug.reshape(rows, n_kv, group + 2, d_head)
    return g[:, :, :group].reshape(rows, n_heads, d_head), g[:, :, group], g[:, :, group + 1]


def _bare(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A leaf module's own forward, without hooks or an instance-level wrapper (nnsight's)."""
    return type(module).forward(module, x)


def norm_eps(norm: torch.nn.Module, probe: torch.nn.Module | None = None, d_model: int = 0) -> float:
    """The norm's epsilon: its attribute, or, for norms that hard-code it (OLMo), measured.

    With u of mean 0 and variance 1, N(c u) - beta = gamma u c / sqrt(c^2 + eps); the ratio r of the
    outputs at c = 1 and a small c gives eps = c^2 (1 - r^2) / (r^2 c^2 - 1), whatever gamma is.
    """
    for attr in ("eps", "variance_epsilon", "epsilon"):
        value = getattr(norm, attr, None)
        if isinstance(value, float):
            return value
    if probe is None:
        raise AttributeError(f"cannot find the epsilon of {type(norm).__name__}")
    u = torch.ones(d_model, dtype=torch.float64)
    u[1::2] = -1.0
    c = 1e-3
    with torch.no_grad():
        beta = probe(torch.zeros(1, d_model, dtype=torch.float64))[0].double()
        big = probe(u[None])[0].double() - beta
        small = probe(c * u[None])[0].double() - beta
    keep = small.abs() > 0
    r2 = float(((big[keep] / small[keep]) ** 2).median())
    return c * c * (1 - r2) / (r2 * c * c - 1)


def probe_norm(norm: torch.nn.Module, d_model: int) -> dict:
    """gamma, beta and whether it centres, read off the norm by probing a float32 copy.

    Every norm here computes gamma * (x - [mean x]) * s + beta with s = 1/sqrt(var + eps); what
    differs is how gamma is parametrised (w, 1 + w in Gemma, none in OLMo) and whether the mean is
    removed. Probing finds both without knowing the class: N(0) = beta; a constant input vanishes
    under centring; an alternating +-1 input has mean 0 and variance 1 under either kind.
    """
    probe = copy.deepcopy(norm).double().eval()
    for module in probe.modules():  # the copy must run bare: no user hooks, no nnsight controller
        module._forward_hooks.clear()
        module._forward_pre_hooks.clear()
        module.__dict__.pop("forward", None)
        module.__dict__.pop("__nnsight__", None)
    eps = norm_eps(norm, probe, d_model)
    with torch.no_grad():
        beta = probe(torch.zeros(1, d_model, dtype=torch.float64))[0].double()
        const = probe(torch.ones(1, d_model, dtype=torch.float64))[0].double()
        u = torch.ones(d_model, dtype=torch.float64)
        u[1::2] = -1.0
        if d_model % 2:
            u[-1] = 0.0
        var = float((u ** 2).mean())
        y = probe(u[None])[0].double()
        center = bool(torch.allclose(const, beta, atol=1e-6))
        scale = 1.0 / (var + eps) ** 0.5
        gamma = torch.where(u != 0, (y - beta) / (u * scale), torch.ones_like(u))
    return {"gamma": gamma.float(), "beta": beta.float(), "center": center, "eps": eps}


@dataclass
class BoundLayout:
    """A layout resolved against one model: nnsight paths, stream events, sizes, static weights."""

    layout: Layout
    model: torch.nn.Module
    base_path: str
    n_layers: int
    n_heads: int
    d_head: int
    d_model: int
    d_mlp: int
    taps: dict[str, tuple[str, str]] = field(default_factory=dict)   # key -> (module path, side)
    events: list[dict] = field(default_factory=list)                 # the stream, in order
    norms: list[str] = field(default_factory=list)                   # module path of each norm
    clones: set[str] = field(default_factory=set)                    # tap keys to copy at capture
    norm_probes: list[dict] = field(default_factory=list)            # gamma, beta, centring, eps per norm
    moe: bool = False                                                # MLP terms split per expert
    attn: Attn | None = None                                         # the block's attention step
    _cache: dict = field(default_factory=dict, repr=False)           # attention-norm probes, W_E vs W_U

    @property
    def name(self) -> str:
        return self.layout.name

    def full(self, rel: str) -> str:
        rel = rel.replace("{last}", str(self.n_layers - 1))
        return f"{self.base_path}.{rel}" if self.base_path else rel

    def find(self, paths: Paths) -> str | None:
        """The full path of the first alternative that names a module in this model."""
        for rel in (paths,) if isinstance(paths, str) else paths:
            if _resolve(self.model, self.full(rel)) is not None:
                return self.full(rel)
        return None

    def module(self, full_path: str) -> torch.nn.Module:
        return _resolve(self.model, full_path)

    def block_path(self, layer: int, rel: str) -> str:
        """A path inside one block, relative to the base model (as layout paths are)."""
        return f"{self.layout.layers}.{layer}.{rel}"

    def in_block(self, layer: int, paths: Paths, what: str) -> str:
        """The full path of the first alternative that names a module in block ``layer``."""
        rels = (paths,) if isinstance(paths, str) else paths
        found = self.find(tuple(self.block_path(layer, p) for p in rels))
        if found is None:
            raise AttributeError(f"layout {self.name!r}: no module at {paths!r} ({what}) in block {layer} "
                                 f"of {type(self.model).__name__}")
        return found

    def norm_labels(self) -> list[str]:
        prefix = self.full(self.layout.layers) + "."
        return [p.removeprefix(prefix).removeprefix(self.base_path + ".") for p in self.norms]

    def static_weights(self, neurons: bool, attention: bool = True) -> dict[str, tuple[tuple[str, ...], torch.Tensor]]:
        """The weights the store keeps once, with their dimension names.

        ``attention`` adds what the analyses of patterns need (``attention_weights`` and the token
        embedding ``W_E``); the decomposition itself needs only W_O and the biases.
        """
        L, H, dh, d = self.n_layers, self.n_heads, self.d_head, self.d_model
        W_O, b_O, W_out, b_out = [], [], [], []
        for layer in range(L):
            o = self.module(self.taps[f"z.{layer}"][0])
            w = in_out_weight(o)
            W_O.append(w.reshape(H, dh, d))
            b_O.append(_bias(o, d, w))
            if self.moe:  # fused experts have no single down projection; their bias is part of each term
                b_out.append(torch.zeros(d, dtype=w.dtype, device=w.device))
                continue
            down = self.module(self.taps[f"neuron_act.{layer}"][0])
            wd = in_out_weight(down)
            b_out.append(_bias(down, d, wd))
            if neurons:
                W_out.append(wd)
        out = {
            "W_O": (("layer", "head", "d_head", "d_model"), torch.stack(W_O)),
            "attn_bias": (("layer", "d_model"), torch.stack(b_O)),
            "mlp_bias": (("layer", "d_model"), torch.stack(b_out)),
        }
        if neurons:
            out["W_out"] = (("layer", "neuron", "d_model"), torch.stack(W_out))
        if self.norms:
            probes = self.norm_probes
            out["norm_weight"] = (("norm", "d_model"), torch.stack([p["gamma"] for p in probes]))
            out["norm_bias"] = (("norm", "d_model"), torch.stack([p["beta"] for p in probes]))
            out["norm_center"] = (("norm",), torch.tensor([p["center"] for p in probes]))
        final = self.find(self.layout.final_norm) if self.layout.final_norm else None
        if final is not None:
            probe = probe_norm(self.module(final), d)
            out["final_norm_weight"] = (("d_model",), probe["gamma"])
            if bool(probe["beta"].abs().max() > 0):
                out["final_norm_bias"] = (("d_model",), probe["beta"])
        unembedding = self._unembedding() if final is not None else None
        if unembedding is not None:
            W_U, unembed_bias = unembedding
            out["W_U"] = (("vocab", "d_model"), W_U)
            if unembed_bias is not None:
                out["unembed_bias"] = (("vocab",), unembed_bias)
        if attention:
            out.update(self.attention_weights())
            if not self.embedding_is_unembedding():
                W_E = self.token_embedding()
                if W_E is not None:
                    out["W_E"] = (("vocab", "d_model"), W_E)
        return out

    def _unembedding(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """W_U (vocab, d_model), with a linear map after the final norm folded in, and its bias."""
        unembed = self.model.get_output_embeddings() if self.layout.unembed and hasattr(self.model, "get_output_embeddings") else None
        if unembed is None:
            return None
        W_U = unembed.weight.detach()
        through = self.find(self.layout.unembed_through) if self.layout.unembed_through else None
        if through is not None:  # fold a linear map after the final norm into the unembedding
            W_U = (W_U.float() @ in_out_weight(self.module(through)).float().T).to(W_U.dtype)
        bias = getattr(unembed, "bias", None)
        return W_U, None if bias is None else bias.detach()

    # -- what the analyses of patterns and messages need -------------------------------------------
    def token_embedding(self, rows: int = 8192) -> torch.Tensor | None:
        """W_E (vocab, d_model): each token's embedding term as it enters the stream.

        The input embedding's output passed through the ``embed`` module where that is another one
        (OPT's ``project_in``, BLOOM's embedding LayerNorm), and scaled where the embedding module
        scales (Gemma); a plain ``nn.Embedding`` is its weight, read without a copy.
        """
        emb = self.model.get_input_embeddings() if hasattr(self.model, "get_input_embeddings") else None
        entry_path = self.find(self.layout.embeds["embed"]) if "embed" in self.layout.embeds else None
        if emb is None or entry_path is None:
            return None
        entry = self.module(entry_path)
        if entry is emb and type(emb) is torch.nn.Embedding:
            return emb.weight.detach()
        blocks = []
        with torch.no_grad():
            for start in range(0, emb.num_embeddings, rows):
                x = _bare(emb, torch.arange(start, min(start + rows, emb.num_embeddings), device=emb.weight.device))
                blocks.append(x if entry is emb else _bare(entry, x))
        return torch.cat(blocks)

    def embedding_is_unembedding(self) -> bool:
        """Whether W_E equals the stored W_U bit for bit (tied, unscaled): then W_E is not stored twice."""
        if "tied" not in self._cache:
            tied = False
            if self.layout.final_norm and self.find(self.layout.final_norm) is not None:
                unembedding = self._unembedding()
                W_E = self.token_embedding() if unembedding is not None else None
                tied = W_E is not None and W_E.shape == unembedding[0].shape and bool(torch.equal(W_E, unembedding[0]))
            self._cache["tied"] = tied
        return self._cache["tied"]

    def _has_qkv(self) -> bool:
        return self.attn is not None and bool(self.attn.q or self.attn.qkv)

    def attn_norm_probes(self) -> list[dict]:
        """gamma, beta, centring and eps of each layer's attention input norm (empty where none)."""
        if "attn_norms" not in self._cache:
            step = self.attn
            paths = ([self.in_block(layer, step.norm, "attention input norm") for layer in range(self.n_layers)]
                     if self._has_qkv() and step.norm else [])
            self._cache["attn_norms"] = [probe_norm(self.module(p), self.d_model) for p in paths]
        return self._cache["attn_norms"]

    def _qkv(self, layer: int) -> dict[str, tuple[torch.Tensor, bool]]:
        """Per name Q, K, V: (heads, d_model + 1, d_head), the bias as the last row; has it a bias."""
        step, dh = self.attn, self.d_head
        if step.qkv:
            aug, biased = _augmented(self.module(self.in_block(layer, step.qkv, "query/key/value projection")))
            parts = dict(zip("QKV", ((p, biased) for p in _split_qkv(aug, step.split, self.n_heads, dh, self.name))))
        else:
            parts = {}
            for name, rel in zip("QKV", (step.q, step.k, step.v)):
                aug, biased = _augmented(self.module(self.in_block(layer, rel, f"{name.lower()} projection")))
                parts[name] = (aug.reshape(aug.shape[0], -1, dh), biased)
        # on the host, layer by layer: the store wants them there, and a GPU is spared the stacked copy
        return {name: (p.permute(1, 0, 2).cpu(), biased) for name, (p, biased) in parts.items()}

    def _score_scale(self, layer: int) -> float | None:
        scale = self.attn.scale
        if scale is None or isinstance(scale, (int, float)):
            return scale
        attn = self.module(self.in_block(layer, (self.attn.qkv or self.attn.q).rsplit(".", 1)[0], "attention module"))
        value = scale(attn) if callable(scale) else getattr(attn, scale, None)
        return None if value is None else float(value)

    def attention_weights(self) -> dict[str, tuple[tuple[str, ...], torch.Tensor]]:
        """W_Q (layer, head, d_model, d_head), W_K and W_V (layer, kv_head, d_model, d_head), their biases
        where the model has them, the attention's input norm and its score scale, per layer.

        q = attn_norm(x) @ W_Q + b_Q is the model's query for head h before any position encoding
        (rotary, ALiBi) and before the extras ``attention_info`` notes (q/k norms, clipping); the
        score is ``attn_scale`` * q . k.
        """
        if not self._has_qkv():
            return {}
        per_layer = [self._qkv(layer) for layer in range(self.n_layers)]
        out = {}
        for name, heads in (("Q", "head"), ("K", "kv_head"), ("V", "kv_head")):
            aug = torch.stack([layer[name][0] for layer in per_layer])         # (layer, heads, d_model + 1, d_head)
            out[f"W_{name}"] = (("layer", heads, "d_model", "d_head"), aug[:, :, :-1].contiguous())
            if any(layer[name][1] for layer in per_layer):
                out[f"b_{name}"] = (("layer", heads, "d_head"), aug[:, :, -1].contiguous())
        probes = self.attn_norm_probes()
        if probes:
            out["attn_norm_weight"] = (("layer", "d_model"), torch.stack([p["gamma"] for p in probes]))
            if any(bool(p["beta"].abs().max() > 0) for p in probes):
                out["attn_norm_bias"] = (("layer", "d_model"), torch.stack([p["beta"] for p in probes]))
        scales = [self._score_scale(layer) for layer in range(self.n_layers)]
        if all(s is not None for s in scales):
            out["attn_scale"] = (("layer",), torch.tensor(scales, dtype=torch.float32))
        return out

    def attention_info(self) -> dict:
        """Store attributes for the attention weights: input-norm kind and eps, notes, W_E's alias."""
        info = {"W_E_alias": "W_U"} if self.embedding_is_unembedding() else {}
        if not self._has_qkv():
            return info
        probes = self.attn_norm_probes()
        if probes:
            info["attn_norm_kind"] = "layernorm" if probes[0]["center"] else "rmsnorm"
            info["attn_norm_eps"] = probes[0]["eps"]
        notes, step = [], self.attn
        qk = [self.find(tuple(self.block_path(0, p) for p in ((r,) if isinstance(r, str) else r)))
              for r in step.qk_norm or ()]
        if qk and all(qk):
            names = " and ".join(p.rsplit(".", 2)[-2] + "." + p.rsplit(".", 1)[-1] for p in qk)
            notes.append(f"queries and keys pass through norms of their own ({names}) after the projection and "
                         "before positions are applied; W_Q, W_K and the fused W_QK leave them out")
        for note in step.notes:
            if isinstance(note, str):
                notes.append(note)
            elif getattr(self.model.config, note[0], None):
                notes.append(note[1].format(getattr(self.model.config, note[0])))
        if notes:
            info["attn_notes"] = notes
        return info

    def store_attrs(self) -> dict:
        """The store attributes the layout contributes: the final norm's kind and eps, and
        ``attention_info`` (the capture merges this dict into the store's attributes)."""
        info = self.attention_info()
        final = self.find(self.layout.final_norm) if self.layout.final_norm else None
        if final is None:
            return info
        probe = probe_norm(self.module(final), self.d_model)
        return {"final_norm_kind": "layernorm" if probe["center"] else "rmsnorm", "final_norm_eps": probe["eps"], **info}


def bind(layout: Layout, model: torch.nn.Module) -> BoundLayout:
    config = model.config
    base = model.base_model if hasattr(model, "base_model") else model
    names = {id(m): n for n, m in model.named_modules()}
    base_path = names[id(base)]
    n_heads = config.num_attention_heads
    d_model = config.hidden_size
    d_head = getattr(config, "head_dim", None) or d_model // n_heads
    n_layers = len(_resolve(base, layout.layers))
    bound = BoundLayout(layout, model, base_path, n_layers, n_heads, d_head, d_model, d_mlp=0)

    def norm_index(full_path: str) -> int:
        bound.norms.append(full_path)
        return len(bound.norms) - 1

    def require(paths: Paths, what: str) -> str:
        found = bound.find(paths)
        if found is None:
            raise AttributeError(f"layout {layout.name!r}: no module at {paths!r} ({what}) in {type(model).__name__}")
        return found

    taps, events = {}, []
    for var, paths in layout.embeds.items():
        found = bound.find(paths)
        if found is not None:  # an optional embedding the config switched off (e.g. OPT's project_in)
            taps[var] = (found, OUTPUT)
            events.append({"op": "embed", "var": var})
    for step in layout.after_embeds:
        k = norm_index(require(step.path, "embedding norm"))
        taps[f"norm.{k}"] = (bound.norms[k], INPUT)
        events.append({"op": "norm", "norm": k, "layer": -1})
    for layer in range(n_layers):
        for step in layout.block:
            if isinstance(step, Norm):
                k = norm_index(require(bound.block_path(layer, step.path), "stream norm"))
                taps[f"norm.{k}"] = (bound.norms[k], INPUT)
                events.append({"op": "norm", "norm": k, "layer": layer})
                continue
            through = None
            if step.through:
                through = norm_index(require(bound.block_path(layer, step.through), "sublayer norm"))
                taps[f"norm.{through}"] = (bound.norms[through], INPUT)
            if isinstance(step, Attn):
                bound.attn = step
                taps[f"z.{layer}"] = (require(bound.block_path(layer, step.proj), "attention output projection"), INPUT)
                events.append({"op": "attn", "layer": layer, "norm": through})
            elif isinstance(step, Moe):
                taps[f"mlp_out.{layer}"] = (require(bound.block_path(layer, step.term), "MoE term"), OUTPUT)
                taps[f"experts.{layer}"] = (require(bound.block_path(layer, step.experts), "experts"), INPUT)
                event = {"op": "mlp", "layer": layer, "norm": through,
                         "experts": int(bound.module(taps[f"experts.{layer}"][0]).num_experts), "shared": False}
                if step.shared:
                    taps[f"shared.{layer}"] = (require(bound.block_path(layer, step.shared), "shared expert"), OUTPUT)
                    taps[f"shared_gate.{layer}"] = (require(bound.block_path(layer, step.shared_gate), "shared expert gate"), OUTPUT)
                    event["shared"] = True
                events.append(event)
            else:
                taps[f"mlp_out.{layer}"] = (require(bound.block_path(layer, step.term), "MLP term"), OUTPUT)
                taps[f"neuron_act.{layer}"] = (require(bound.block_path(layer, step.down or step.term), "MLP down projection"), INPUT)
                if step.clone:
                    bound.clones.add(f"mlp_out.{layer}")
                events.append({"op": "mlp", "layer": layer, "norm": through})
    paths, side = layout.resid_final
    taps["resid_final"] = (require(paths, "final residual"), side)
    bound.taps, bound.events = taps, events
    bound.moe = any("experts" in e for e in events)
    bound.d_mlp = 0 if bound.moe else in_out_weight(bound.module(taps["neuron_act.0"][0])).shape[0]
    bound.norm_probes = [probe_norm(bound.module(p), d_model) for p in bound.norms]
    return bound
