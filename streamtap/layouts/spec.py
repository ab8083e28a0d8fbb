"""What a layout declares: module paths, which side of each module holds a term, and the order in
which each block writes into the residual stream.

A layout is data. ``Attn`` and ``Mlp`` steps write terms; a ``Norm`` step passes the whole stream
through a norm (post-LN models), and ``through=`` passes one term through a norm of its own
(Gemma-2's post-sublayer norms). Norms are affine once their per-token scale is frozen, so capture
stores that scale and the decomposition stays exact (docs/design.md). Writing one: docs/layouts.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

POSITIONS = ("rotary", "learned", "alibi", "none")
ROTARY_STYLES = ("half", "interleaved", "halves", "interleaved_from_half", "interleaved_repeated")

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
    - ``qk_norm``: norms applied to queries and keys after the projection.
    - ``notes``: anything else the attention does to q, k or v: a string is always noted; a pair
      (config field, text) is noted where the config sets the field, ``{}`` standing for its value.

    What the attention pattern is made of (``patterns=True`` captures recompute it offline):

    - ``module``: the attention module (default: the parent of ``q``/``qkv``).
    - ``rotary``: how queries and keys are rotated where the layout's positions are rotary:
      ``"half"`` (the two halves of the rotated dims, Llama's ``rotate_half``) or ``"interleaved"``
      (pairs of neighbouring dims, GPT-J) or ``"halves"`` (the two halves turned by one table of half
      the width, GPT-OSS's ``_apply_rotary_emb``) or ``"interleaved_from_half"`` (neighbouring pairs
      turned by the first half of full-width tables, each entry repeated twice: Ernie-4.5) or
      ``"interleaved_repeated"`` (neighbouring pairs turned by full-width tables that already hold
      each pair's angle twice: Cohere's ``repeat_interleave``); ``rotary_order``: ``"cos_sin"`` or
      ``"sin_cos"``, the order of the ``position_embeddings`` pair the attention module receives.
    - ``window``: ``(config, attention module) -> int | None``, the sliding window of a layer (a
      key is seen while the query is fewer than that many positions after it).
    - ``rotates``: ``(config, attention module) -> bool``, whether a layer rotates its queries and
      keys (no-rope layers: SmolLM3's ``no_rope_layers``); default: every layer of a rotary model.
    - ``softcap``: the config field of a soft-cap on the scores, cap * tanh(score / cap).
    - ``clip``: the config field of a clamp of q, k and v to [-c, c] (OLMo's ``clip_qkv``).
    - ``alibi``: the keyword of the block's input that carries the ALiBi biases (BLOOM, Falcon).
    - ``sinks``: the attention module's attribute of learned per-head sink logits (GPT-OSS): one more
      column in the softmax's denominator that no value is read from; the store keeps them.
    - ``d_head``: the config field of each head's value width where it is not the query/key width
      (multi-head latent attention: ``v_head_dim``); z and W_O are per head of that width.
    - ``out_scale``: a multiplier the block applies to this attention's output outside the tapped
      modules (Falcon-H1's ``attention_out_multiplier``): a config field or a function of the config;
      W_O and b_O carry it (with the layout's ``residual_scale``).
    - ``heads``: where the number of heads is not ``config.num_attention_heads``: a config field or a
      function of the config (Laguna's per-layer counts, when every layer has the same).
    - ``out_bias``: a bias parameter the block adds to this attention's output outside ``proj`` (a path
      relative to the block: GPT-NeoX-Japanese's ``attention.dense_bias``, which only its last layer
      has); b_O carries it where the parameter exists.
    - ``no_patterns``: why this attention's pattern cannot be recomputed from a store (a capture with
      ``patterns=True`` is refused up front with this reason).
    - ``unsupported``: ``config -> reason or None``, what the offline attention cannot recompute for
      this model (``pattern_support`` refuses ``patterns=True`` with that reason).
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
    module: str | None = None
    rotary: str = "half"
    rotary_order: str = "cos_sin"
    window: Callable | None = None
    rotates: Callable | None = None
    softcap: str | None = None
    clip: str | None = None
    alibi: str | None = None
    sinks: str | None = None
    d_head: str | None = None
    heads: str | Callable | None = None
    no_patterns: str | None = None
    out_scale: str | Callable | None = None
    out_bias: str | None = None
    unsupported: Callable[[object], str | None] | None = None   # config -> why patterns cannot be recomputed

    def __post_init__(self):
        if self.split not in SPLITS:
            raise ValueError(f"Attn(split={self.split!r}): expected one of {SPLITS}")
        if self.qkv and self.q:
            raise ValueError("Attn: give either qkv= or q=/k=/v=, not both")
        if self.rotary not in ROTARY_STYLES:
            raise ValueError(f"Attn(rotary={self.rotary!r}): expected one of {ROTARY_STYLES}")
        if self.rotary_order not in ("cos_sin", "sin_cos"):
            raise ValueError(f"Attn(rotary_order={self.rotary_order!r}): expected 'cos_sin' or 'sin_cos'")

    @property
    def module_path(self) -> str:
        return self.module or (self.qkv or self.q or self.proj).rsplit(".", 1)[0]


def sliding_window(config, attention) -> int | None:
    """The attention module's own ``sliding_window`` where it keeps one (per layer: Qwen2, Gemma-2),
    else the config's (Mistral applies it to every layer)."""
    if hasattr(attention, "sliding_window"):
        return attention.sliding_window
    return getattr(config, "sliding_window", None)


@dataclass(frozen=True)
class Reciprocal:
    """A multiplier that is one over a config field (Granite divides its logits by ``logits_scaling``)."""

    field: str

    def __call__(self, config) -> float | None:
        value = getattr(config, self.field, None)
        return None if value is None else 1.0 / float(value)


def uses_rope(config, attention) -> bool:
    """The attention module's own ``use_rope`` flag where it keeps one (no-rope layers: SmolLM3,
    Llama-4), else True."""
    return bool(getattr(attention, "use_rope", True))


def projections(prefix: str, q: str = "q_proj", k: str = "k_proj", v: str = "v_proj") -> dict[str, str]:
    """``Attn`` fields for separate query, key and value projections under one attention module."""
    return {"q": f"{prefix}.{q}", "k": f"{prefix}.{k}", "v": f"{prefix}.{v}"}


@dataclass(frozen=True)
class Mlp:
    """The MLP writes ``term``'s output; ``down``'s input holds the neuron activations.

    ``clone`` copies the output at capture, for models that add into it in place afterwards
    (Falcon's ``mlp_output += attention_output``). ``flat``: the MLP sees the batch's tokens
    flattened into one axis, (batch x position, d) (OPT). ``down_scale``: a multiplier the MLP applies
    after ``down`` inside ``term`` (Falcon-H1's ``mlp_multipliers[1]``): the term already holds it, so
    only W_out and b_out, which per-neuron terms are made of, carry it.

    What the MLP's neurons read (stored with ``neurons=True`` for the exact MLP input edges of
    attribution graphs): ``up`` and ``gate`` are its input projections (``gate`` only for gated
    MLPs, act(gate) * up), or ``gate_up`` one projection whose output is [gate | up] (Phi-3's
    ``gate_up_proj``, ModernBERT's ``Wi``); ``norm`` the norm it reads the stream through (the first
    alternative present in the block; omit where it reads the stream itself: post-LN blocks, OLMo-2).
    It reads the stream after the layer's attention has written, or, where ``parallel`` is True or
    names a config field that is set, the layer's input (GPT-J, Phi, Falcon, GPT-NeoX's and
    StableLM's parallel residual). ``act``: the config field naming the activation (recorded, for the
    docs of a neuron node).
    """

    term: str
    down: str | None = None
    through: str | None = None
    clone: bool = False
    flat: bool = False
    down_scale: str | Callable | None = None
    up: str | None = None
    gate: str | None = None
    gate_up: str | None = None
    norm: Paths | None = None
    parallel: str | bool | None = None
    act: str | None = None

    def __post_init__(self):
        if self.gate_up and (self.up or self.gate):
            raise ValueError("Mlp: give either gate_up= or up=/gate=, not both")

    @property
    def reads(self) -> bool:
        """Whether the layout declares what the neurons read (``up`` or ``gate_up``)."""
        return bool(self.up or self.gate_up)

    def is_parallel(self, config) -> bool:
        """Whether the MLP reads the layer's input rather than the stream after the attention wrote."""
        return self.parallel is True or (isinstance(self.parallel, str) and bool(getattr(config, self.parallel, False)))


@dataclass(frozen=True)
class Moe:
    """A mixture of experts writes ``term``'s output, split into one term per routed expert.

    ``experts`` is called as ``experts(x, top_k_index, top_k_weights)`` (the transformers 5 fused
    experts); calling it again once per routing slot, with that slot's index and weight alone, gives
    each routed expert's weighted output from the model's own code. ``shared`` is an always-on
    expert (DeepSeek's ``shared_experts``), its output scaled by sigmoid(``shared_gate``(x)) where a
    gate is named (Qwen2-MoE). ``dense``: the MLP of the layers that have no ``experts`` module
    (DeepSeek's ``first_k_dense_replace``, Qwen3-MoE's ``mlp_only_layers``); each layer resolves to
    whichever of the two it has, and its term is the dense MLP's output. ``routed_scale``: a multiplier
    the mixture applies to the routed experts' sum outside ``experts`` (Laguna's
    ``moe_routed_scaling_factor``, MiniMax-M3's ``routed_scaling_factor``): a config field or a function of
    the config; each stored share carries it. ``term=InputOf(path)``: the write is that module's input, where
    the mixture passes its sum through a norm of its own before returning it (AX-K1's
    ``mlp.post_mlp_layernorm``, declared as ``through``).

    ``router``: where the experts run on router-weighted copies of the input instead (Llama-4: every
    expert reads x times its score, zero where the token is not routed to it) and return one block of
    rows per expert, ``router`` is the module whose first output holds the (token, expert) scores: each
    token's ``top_k`` (a config field) highest-scoring experts' rows of the experts' output are its terms.
    ``flat``: ``term``'s output has the batch's tokens flattened into one axis (Llama-4's mixture).
    """

    term: str | InputOf
    experts: str
    shared: str | None = None
    shared_gate: str | None = None
    through: str | None = None
    dense: Mlp | None = None
    routed_scale: str | Callable | None = None
    router: str | None = None
    top_k: str = "num_experts_per_tok"
    flat: bool = False


@dataclass(frozen=True)
class Mixer:
    """A sequence mixer that is not attention (a state-space, convolution or linear-attention layer)
    writes ``term``'s output as one term: it has no heads a store could split it into.

    ``norm``: the norm the mixer reads the stream through (recorded for readers of the layout; the
    term is the mixer's output either way). ``through``: a norm of its own the term passes before it
    joins the stream. ``out_scale``: a multiplier the block applies to the term outside ``term``
    (Falcon-H1's ``ssm_out_multiplier``): a config field or a function of the config; the stored term
    carries it (with the layout's ``residual_scale``).
    """

    term: str
    norm: Paths | None = None
    through: str | None = None
    out_scale: str | Callable | None = None


@dataclass(frozen=True)
class Norm:
    """The whole residual stream passes through this norm (post-LN blocks, embedding norms).

    ``scale``: a multiplier on the norm's output before it becomes the stream, outside the module
    (MiniMax's ``*_alpha_factor``): a config field or a function of the config; the frozen norm's
    gamma and beta carry it.

    ``input_from``: a module whose **output** is this norm's input, read there instead of at the norm,
    where the norm's module runs more than once per forward (NanoChat applies its final ``norm`` to the
    embeddings too, so ``Norm("norm", input_from="embed_tokens")`` reads that call's input).
    """

    path: str
    scale: str | Callable | None = None
    input_from: str | None = None


@dataclass(frozen=True)
class Scale:
    """The whole residual stream is multiplied by a constant per-dimension vector (Doge's
    ``input_residual * residual``): every earlier term is scaled with it, as by a norm whose frozen
    per-token scale is 1 (the replay carries it as one: gamma the vector, no centring, no beta).

    ``path`` (relative to the block) names the parameter or module holding it; ``vector`` maps that to
    the (d_model,) vector (default: the parameter itself). A gate ``b * term + g * residual`` (Ergo's
    ``ErgoResidualGate``) is ``Scale(g / b)``, the term's write, then ``Scale(b)``.
    """

    path: str
    vector: Callable[[object], object] | None = None


@dataclass(frozen=True)
class InputOf:
    """An embedding term read at a module's **input** (``Layout.embeds``): the whole sum of embeddings where
    part of it is no module's output (CTRL adds a sinusoidal buffer indexed in its forward)."""

    path: str


@dataclass(frozen=True)
class Layout:
    """Where each additive term of the residual stream lives in one architecture family.

    Paths are relative to ``model.base_model``; block steps are relative to one block of
    ``layers``; ``{last}`` in a path stands for the last block's index.

    Hybrid models (attention at some depths, a ``Mixer`` at others) declare ``blocks``, the steps of
    each kind of block, and ``block_kind(config, layer, block module) -> key of blocks``, read from
    the config's per-layer list or the module tree; ``block`` is then the attention kind's steps.
    """

    name: str
    model_types: tuple[str, ...]
    embeds: dict[str, Paths | InputOf]   # stored variable name -> module whose output enters the stream
    layers: str
    block: tuple[Attn | Mlp | Moe | Mixer | Norm | Scale, ...]
    resid_final: tuple[Paths, str]       # where the final residual is read, and from which side
    final_norm: Paths | None = None      # the norm before the unembedding (offline attribution)
    after_embeds: tuple[Norm, ...] = ()
    unembed_through: Paths | None = None  # a linear map between the final norm and the unembedding
    unembed: bool = True                  # False where the head is not linear (masked-LM heads)
    when: Callable[[object], bool] | None = None   # a config predicate, for families with variants
    notes: str = ""
    # facts of the architecture the store records (docs/layouts.md): analyses read them, never the config
    positions: str | Callable[[object], str] = "rotary"   # "rotary", "learned", "alibi" or "none"
    final_softcap: str | None = None     # the config field of a soft-cap on the final logits, if any
    max_positions: tuple[str, ...] = ("max_position_embeddings", "n_positions")   # config fields, first set wins
    causal: bool | Callable[[object], bool] = True   # False for bidirectional encoders, or a config predicate
    blocks: dict[str, tuple[Attn | Mlp | Moe | Mixer | Norm, ...]] | None = None   # hybrid models: steps per kind
    block_kind: Callable[[object, int, object], str] | None = None   # (config, layer, block) -> key of blocks
    # multipliers the model applies outside every module a layout taps (Granite, Cohere, muP): a config
    # field or a function of the config. The store keeps terms as they are added to the stream: the
    # embedding and MLP terms are multiplied at capture, W_O, b_O, W_out, b_out and W_E carry the factor,
    # and W_U (with its bias) carries the logit scale, so decompose, verify and DLA stay exact as they are.
    embed_scale: str | Callable[[object], float] | None = None      # on the token embedding term
    residual_scale: str | Callable[[object], float] | None = None   # on every attention and MLP write
    logit_scale: str | Callable[[object], float] | None = None      # on the logits
    inferred: bool = False               # read off the module tree (layouts/infer.py), not a family file

    def __post_init__(self):
        if (self.blocks is None) != (self.block_kind is None):
            raise ValueError(f"Layout {self.name!r}: blocks and block_kind are declared together")
        if isinstance(self.positions, str) and self.positions not in POSITIONS:
            raise ValueError(f"Layout(positions={self.positions!r}): expected one of {POSITIONS} or a config predicate")

    def steps(self, config, layer: int, block) -> tuple | None:
        """The steps of block ``layer``: ``block``, or in a hybrid model those of its kind (None: a
        kind ``blocks`` does not declare)."""
        if self.block_kind is None:
            return self.block
        return self.blocks.get(self.block_kind(config, layer, block))

    def describe(self) -> str:
        return f"{self.name} ({', '.join(self.model_types)})"

    def multiplier(self, which: str, config) -> float:
        """The ``embed``, ``residual`` or ``logit`` multiplier this layout declares, on ``config`` (1 if none)."""
        return config_multiplier(getattr(self, f"{which}_scale"), config)


def config_multiplier(spec: str | Callable | None, config) -> float:
    """A declared multiplier's value on ``config``: a config field, a function of the config, or 1 where
    none is declared or the field is unset."""
    if spec is None:
        return 1.0
    value = spec(config) if callable(spec) else getattr(config, spec, None)
    return 1.0 if value is None else float(value)


__all__ = ["INPUT", "OUTPUT", "SPLITS", "POSITIONS", "ROTARY_STYLES", "Paths", "Attn", "InputOf", "Mlp", "Mixer", "Moe", "Norm", "Scale", "Layout",
           "Reciprocal", "config_multiplier", "projections", "sliding_window", "uses_rope"]
