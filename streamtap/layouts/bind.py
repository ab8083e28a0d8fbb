"""A layout bound to one live model: the concrete module paths a capture taps, and the stream's events.

Binding turns a layout's relative paths into per-layer paths under the model (the ones nnsight
addresses), the ordered events that ``streamtap.stream`` replays, the norms whose per-token scale a
capture freezes, and the architecture's facts the store records. A path the model lacks is a
:class:`~streamtap.errors.LayoutError` naming it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import LayoutError
from ..stream import Embed, Event, StreamNorm, Write
from .norms import probe_norm
from .spec import INPUT, OUTPUT, Attn, InputOf, Layout, Mixer, Moe, Norm, Paths, Scale, config_multiplier


def resolve_path(root: torch.nn.Module, path: str):
    """The module at a dotted path (integers index module lists), or None."""
    module = root
    for part in path.split("."):
        module = module[int(part)] if part.lstrip("-").isdigit() else getattr(module, part, None)
        if module is None:
            return None
    return module


def stack_root(model: torch.nn.Module, layers: str | None = None) -> torch.nn.Module:
    """The module a layout's paths are relative to: the base model, or, where the blocks (``layers``;
    None: inference, which looks for them) are not there, the text stack inside it: a multimodal
    model's text tower (``language_model``, transformers' name for it, whose config holds the sizes),
    or the ``model`` of a causal LM whose ``base_model`` is itself (Mllama's text-only model). The
    stream of a vision-language model's text is that stack's stream."""
    base = model.base_model if hasattr(model, "base_model") else model
    inner = [getattr(base, "language_model", None)] + ([getattr(model, "model", None)] if base is model else [])
    for tower in inner:
        if (isinstance(tower, torch.nn.Module) and tower is not base and hasattr(tower, "config")
                and (layers is None or (resolve_path(base, layers) is None
                                        and resolve_path(tower, layers) is not None))):
            return tower
    return base


@dataclass
class BoundLayout:
    """A layout resolved against one model: tap paths, stream events, sizes, frozen-norm probes."""

    layout: Layout
    model: torch.nn.Module
    base_path: str
    n_layers: int
    n_heads: int
    d_head: int
    d_model: int
    taps: dict[str, tuple[str, str]] = field(default_factory=dict)   # key -> (module path, side)
    events: list[Event] = field(default_factory=list)                # the stream, in order
    norms: list[str] = field(default_factory=list)                   # module path of each norm
    clones: set[str] = field(default_factory=set)                    # tap keys to copy at capture
    flat: set[str] = field(default_factory=set)                      # tap keys whose tokens come flattened
    norm_probes: list[dict] = field(default_factory=list)            # gamma, beta, centring, eps per norm
    attn: Attn | None = None                                         # the block's attention step
    config: object = None                                            # the stack's config (a text tower's)
    out_scales: dict[str, float] = field(default_factory=dict)      # tap key -> a step's own output multiplier
    routed: dict[int, int] = field(default_factory=dict)             # layer -> top-k, where experts read router-weighted input
    out_biases: dict[str, str] = field(default_factory=dict)        # tap key -> a bias parameter added outside it

    @property
    def name(self) -> str:
        return self.layout.name

    @property
    def moe(self) -> bool:
        """Whether MLP terms are split per routed expert (no per-neuron terms then)."""
        return any(isinstance(e, Write) and e.experts for e in self.events)

    @property
    def mixer_layers(self) -> list[int]:
        """The layers a non-attention mixer writes at (hybrid models; empty otherwise)."""
        return [e.layer for e in self.events if isinstance(e, Write) and e.site == "mixer"]

    @property
    def attn_layers(self) -> list[int]:
        """The layers whose attention writes per-head terms."""
        return [e.layer for e in self.events if isinstance(e, Write) and e.site == "attn"]

    @property
    def mlp_layers(self) -> list[int]:
        """The layers an MLP (or mixture) writes at: every layer, except in models whose blocks hold
        one sublayer each (Nemotron-H) or none (pure state-space models)."""
        return [e.layer for e in self.events if isinstance(e, Write) and e.site == "mlp"]

    @property
    def d_mlp(self) -> int:
        dense = [layer for layer in self.mlp_layers if f"neuron_act.{layer}" in self.taps]
        if self.moe or not dense:
            return 0
        from .weights import in_out_weight

        return in_out_weight(self.module(self.taps[f"neuron_act.{dense[0]}"][0])).shape[0]

    def full(self, rel: str) -> str:
        rel = rel.replace("{last}", str(self.n_layers - 1))
        return f"{self.base_path}.{rel}" if self.base_path else rel

    def find(self, paths: Paths) -> str | None:
        """The full path of the first alternative that names a module in this model."""
        for rel in (paths,) if isinstance(paths, str) else paths:
            if resolve_path(self.model, self.full(rel)) is not None:
                return self.full(rel)
        return None

    def module(self, full_path: str) -> torch.nn.Module:
        return resolve_path(self.model, full_path)

    def block_path(self, layer: int, rel: str) -> str:
        """A path inside one block, relative to the base model (as layout paths are); a step path holding
        ``{layer}`` is relative to the base model itself, for models that keep each kind of sublayer in a
        module list of its own (XLM's ``attentions``, ``layer_norm1``, ``ffns``, ``layer_norm2``)."""
        if "{layer}" in rel:
            return rel.replace("{layer}", str(layer))
        return f"{self.layout.layers}.{layer}.{rel}"

    def block_full_path(self, layer: int) -> str:
        return self.full(f"{self.layout.layers}.{layer}")

    def in_block(self, layer: int, paths: Paths, what: str) -> str:
        """The full path of the first alternative that names a module in block ``layer``."""
        rels = (paths,) if isinstance(paths, str) else paths
        found = self.find(tuple(self.block_path(layer, p) for p in rels))
        if found is None:
            raise LayoutError(f"layout {self.name!r}: {type(self.model).__name__} has no module at "
                              f"{self.full(self.block_path(layer, rels[0]))!r} ({what}); see docs/layouts.md")
        return found

    def norm_labels(self) -> list[str]:
        prefix = self.full(self.layout.layers) + "."
        return [p.removeprefix(prefix).removeprefix(self.base_path + ".") for p in self.norms]

    # -- facts of the architecture (store attributes) ----------------------------------------------
    def positions(self) -> str:
        """How positions enter: "rotary", "learned", "alibi" or "none" (the layout's declaration)."""
        p = self.layout.positions
        return p(self.config) if callable(p) else p

    def max_positions(self) -> int | None:
        """The longest sequence the model takes, from the config fields the layout names."""
        for attr in self.layout.max_positions:
            value = getattr(self.config, attr, None)
            if isinstance(value, int) and value > 0:
                return value
        return None

    def final_softcap(self) -> float | None:
        """The soft-cap on the final logits (cap * tanh(logit / cap)), where the layout names one."""
        field_name = self.layout.final_softcap
        value = getattr(self.config, field_name, None) if field_name else None
        return float(value) if value else None

    def multiplier(self, which: str) -> float:
        """The layout's ``embed``, ``residual`` or ``logit`` multiplier on this model (1 where none)."""
        return self.layout.multiplier(which, self.config)

    def facts(self) -> dict:
        """The architecture's facts as store attributes; analyses read these, never the config."""
        causal = self.layout.causal
        out = {"positional": self.positions(), "causal": bool(causal(self.model.config) if callable(causal) else causal)}
        scales = {k: self.multiplier(k) for k in ("embed", "residual", "logit") if self.multiplier(k) != 1.0}
        if scales:  # informative: the stored terms and weights already include them
            out["multipliers"] = scales
        if self.layout.inferred:
            from .infer import declaration

            out.update(layout_inferred=True, layout_declaration=declaration(self.layout, self.config))
        cap = self.final_softcap()
        if cap:
            out["final_logit_softcap"] = cap
        limit = self.max_positions()
        if limit:
            out["max_positions"] = limit
        return out


def _one_vocabulary(layout: Layout, model: torch.nn.Module) -> None:
    """A store keeps W_E and W_U along one ``vocab`` axis: refuse a model whose input embedding has another
    number of rows than its unembedding (Mllama's 8 extra image-token rows) before anything is written."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    out = model.get_output_embeddings() if layout.unembed and hasattr(model, "get_output_embeddings") else None
    rows_in = getattr(getattr(emb, "weight", None), "shape", (None,))[0]
    rows_out = getattr(getattr(out, "weight", None), "shape", (None,))[0]
    if rows_in is not None and rows_out is not None and rows_in != rows_out:
        raise LayoutError(f"layout {layout.name!r}: {type(model).__name__}'s input embedding has {rows_in} rows and its "
                          f"unembedding {rows_out}, and a store keeps both along one vocabulary axis; tap a model "
                          "whose token tables agree")


def _fixed_probe(step: Scale, holder, d_model: int) -> dict:
    """A constant per-dimension scale as a norm's probe: gamma the vector, beta 0, no centring, and a frozen
    per-token scale of 1 (``fixed``), so every replay of the stream applies it as it applies a norm."""
    vector = step.vector(holder) if step.vector else holder
    gamma = torch.as_tensor(vector).detach().double().reshape(-1)
    if gamma.numel() != d_model:
        raise LayoutError(f"a stream scale at {step.path!r} has {gamma.numel()} entries, not d_model = {d_model}")
    return {"gamma": gamma.float(), "beta": torch.zeros(d_model), "center": False, "eps": 0.0, "fixed": True}


def bind(layout: Layout, model: torch.nn.Module, *, probe: bool = True) -> BoundLayout:
    """Resolve ``layout`` against ``model``: the paths a capture taps and the stream's events.

    Parameters
    ----------
    layout : Layout
    model : torch.nn.Module
        The live transformers model.
    probe : bool
        Read each norm's gamma, beta and eps off the module (a capture needs them). ``False`` binds a
        model without weights (built on the meta device) for planning: paths and sizes only.

    Returns
    -------
    BoundLayout

    Raises
    ------
    LayoutError
        When a module the layout names is missing; the message gives its full path.
    """
    base = stack_root(model, layout.layers)
    plain = model.base_model if hasattr(model, "base_model") else model
    config = model.config if base is plain else base.config   # a text tower's own config holds its sizes
    names = {id(m): n for n, m in model.named_modules()}
    base_path = names[id(base)]
    layers = resolve_path(base, layout.layers)
    if layers is None:
        full = f"{base_path}.{layout.layers}" if base_path else layout.layers
        raise LayoutError(f"layout {layout.name!r}: {type(model).__name__} has no module list at "
                          f"{full!r} (the blocks); see docs/layouts.md")
    _one_vocabulary(layout, model)
    d_model = config.hidden_size
    kinds = (layout.block, *(layout.blocks or {}).values())
    attn = next((step for steps in kinds for step in steps if isinstance(step, Attn)), None)
    if attn is None:  # a pure state-space model: no heads, every layer one mixer term
        n_heads = d_head = 0
    else:
        n_heads = int(config_multiplier(attn.heads, config)) if attn.heads else config.num_attention_heads
        d_head = ((getattr(config, attn.d_head) if attn.d_head else None)
                  or getattr(config, "head_dim", None) or d_model // n_heads)
    bound = BoundLayout(layout, model, base_path, len(layers), n_heads, d_head, d_model, config=config)

    def norm_index(full_path: str) -> int:
        bound.norms.append(full_path)
        return len(bound.norms) - 1

    def require(paths: Paths, what: str) -> str:
        found = bound.find(paths)
        if found is None:
            first = paths if isinstance(paths, str) else paths[0]
            raise LayoutError(f"layout {layout.name!r}: {type(model).__name__} has no module at "
                              f"{bound.full(first)!r} ({what}); see docs/layouts.md")
        return found

    taps, events, scaled = {}, [], {}   # scaled: stream norm index -> a multiplier on its output (Norm.scale)
    fixed: dict[int, Scale] = {}   # norm index -> the constant scale it stands for
    for var, paths in layout.embeds.items():  # alternatives name what a config may switch off (OPT's project_in)
        if isinstance(paths, InputOf):
            taps[var] = (require(paths.path, f"embedding term {var}"), INPUT)
        else:
            taps[var] = (require(paths, f"embedding term {var}"), OUTPUT)
        events.append(Embed(var))
    if layout.final_norm:
        require(layout.final_norm, "final norm")
    def norm_input(k: int, step: Norm, layer: int | None) -> tuple[str, str]:
        """Where norm k's input is read: at the norm, or as another module's output (``Norm.input_from``)."""
        if step.input_from is None:
            return bound.norms[k], INPUT
        rel = step.input_from if layer is None else bound.block_path(layer, step.input_from)
        return require(rel, "the module whose output a norm reads"), OUTPUT

    for step in layout.after_embeds:
        k = norm_index(require(step.path, "embedding norm"))
        taps[f"norm.{k}"] = norm_input(k, step, None)
        events.append(StreamNorm(k, -1))
    for layer in range(bound.n_layers):
        steps = layout.steps(config, layer, layers[layer])
        if steps is None:
            raise LayoutError(f"layout {layout.name!r}: block {layer} of {type(model).__name__} is of kind "
                              f"{layout.block_kind(config, layer, layers[layer])!r}, which the layout's blocks do "
                              f"not declare (it declares {sorted(layout.blocks)}); see docs/layouts.md")
        for step in steps:
            if isinstance(step, Scale):   # a norm whose frozen scale is 1 and whose gamma is the vector
                k = norm_index(require(bound.block_path(layer, step.path), "stream scale"))
                fixed[k] = step
                taps[f"norm.{k}"] = (bound.block_full_path(layer), INPUT)   # any per-token tensor: its scale is 1
                events.append(StreamNorm(k, layer))
                continue
            if isinstance(step, Norm):
                k = norm_index(require(bound.block_path(layer, step.path), "stream norm"))
                if step.scale is not None:
                    scaled[k] = config_multiplier(step.scale, config)
                taps[f"norm.{k}"] = norm_input(k, step, layer)
                events.append(StreamNorm(k, layer))
                continue
            through = None
            # a mixture's own norm (AX-K1's mlp.post_mlp_layernorm) is absent from its dense layers' MLP
            dense_here = isinstance(step, Moe) and step.dense is not None and not bound.find(bound.block_path(layer, step.experts))
            if step.through and not (dense_here and not bound.find(bound.block_path(layer, step.through))):
                through = norm_index(require(bound.block_path(layer, step.through), "sublayer norm"))
                taps[f"norm.{through}"] = (bound.norms[through], INPUT)
            if isinstance(step, Mixer):
                taps[f"mixer_out.{layer}"] = (require(bound.block_path(layer, step.term), "mixer term"), OUTPUT)
                bound.out_scales[f"mixer_out.{layer}"] = config_multiplier(step.out_scale, config)
                events.append(Write("mixer", layer, through))
            elif isinstance(step, Attn):
                bound.attn = bound.attn or step
                taps[f"z.{layer}"] = (require(bound.block_path(layer, step.proj), "attention output projection"), INPUT)
                bound.out_scales[f"z.{layer}"] = config_multiplier(step.out_scale, config)
                extra = bound.full(bound.block_path(layer, step.out_bias)) if step.out_bias else None
                if extra is not None and isinstance(bound.module(extra), torch.Tensor):
                    bound.out_biases[f"z.{layer}"] = extra
                events.append(Write("attn", layer, through))
            elif isinstance(step, Moe) and (step.dense is None or bound.find(bound.block_path(layer, step.experts))):
                # InputOf: the mixture's write is a module's input (AX-K1's sum before the mixture's own norm)
                at = step.term.path if isinstance(step.term, InputOf) else step.term
                taps[f"mlp_out.{layer}"] = (require(bound.block_path(layer, at), "MoE term"),
                                            INPUT if isinstance(step.term, InputOf) else OUTPUT)
                # experts on router-weighted input (Moe.router): their output rows and the router's scores
                taps[f"experts.{layer}"] = (require(bound.block_path(layer, step.experts), "experts"),
                                            OUTPUT if step.router else INPUT)
                if step.flat:
                    bound.flat.add(f"mlp_out.{layer}")
                if step.router:
                    taps[f"router.{layer}"] = (require(bound.block_path(layer, step.router), "router"), OUTPUT)
                    bound.routed[layer] = int(getattr(config, step.top_k))
                n_experts = int(bound.module(taps[f"experts.{layer}"][0]).num_experts)
                bound.out_scales[f"experts.{layer}"] = config_multiplier(step.routed_scale, config)
                if step.shared:
                    taps[f"shared.{layer}"] = (require(bound.block_path(layer, step.shared), "shared expert"), OUTPUT)
                if step.shared_gate:
                    taps[f"shared_gate.{layer}"] = (require(bound.block_path(layer, step.shared_gate),
                                                            "shared expert gate"), OUTPUT)
                events.append(Write("mlp", layer, through, experts=n_experts, shared=bool(step.shared)))
            else:
                mlp = step.dense if isinstance(step, Moe) else step
                taps[f"mlp_out.{layer}"] = (require(bound.block_path(layer, mlp.term), "MLP term"), OUTPUT)
                taps[f"neuron_act.{layer}"] = (require(bound.block_path(layer, mlp.down or mlp.term),
                                                       "MLP down projection"), INPUT)
                bound.out_scales[f"neuron_act.{layer}"] = config_multiplier(mlp.down_scale, config)
                if mlp.clone:
                    bound.clones.add(f"mlp_out.{layer}")
                if mlp.flat:
                    bound.flat.update({f"mlp_out.{layer}", f"neuron_act.{layer}"})
                events.append(Write("mlp", layer, through))
    paths, side = layout.resid_final
    taps["resid_final"] = (require(paths, "final residual"), side)
    bound.taps, bound.events = taps, events
    bound.norm_probes = [_fixed_probe(fixed[k], bound.module(p), d_model) if k in fixed else probe_norm(bound.module(p), d_model)
                         for k, p in enumerate(bound.norms)] if probe else []
    for k, factor in scaled.items() if probe else ():   # the stream is factor x the norm's output: gamma and beta carry it
        bound.norm_probes[k] = {**bound.norm_probes[k], "gamma": bound.norm_probes[k]["gamma"] * factor,
                                "beta": bound.norm_probes[k]["beta"] * factor}
    identity = [p for p, probe in zip(bound.norms, bound.norm_probes) if probe.get("identity")]
    if identity:   # a stream norm's frozen scale would divide by the token's rms, which an identity does not
        raise LayoutError(f"layout {layout.name!r}: the stream norm {identity[0]} of {type(model).__name__} is an "
                          "identity (it returns its input); drop it from the layout's Norm steps")
    return bound


__all__ = ["BoundLayout", "bind", "resolve_path"]
