"""What a layout declares, and how a declaration is bound to one live model.

A layout is data: module paths and which side of each module holds a term, plus the order in which
each block writes into the residual stream. ``Attn`` and ``Mlp`` steps write terms; a ``Norm``
step passes the whole stream through a norm (post-LN models), and ``through=`` passes one term
through a norm of its own (Gemma-2's post-sublayer norms). Norms are affine once their per-token
scale is frozen, so capture stores that scale and the decomposition stays exact.

Binding turns the paths into the concrete per-layer paths that nnsight caches, the ordered stream
of events that ``streamtap.decompose`` replays, and the static weights the store keeps.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable

import torch

INPUT, OUTPUT = "input", "output"
Paths = str | tuple[str, ...]   # alternatives: the first that names a module in this model is used


@dataclass(frozen=True)
class Attn:
    """Attention writes: ``proj``'s input is z (heads concatenated), its weight W_O, its bias b_O."""

    proj: str
    through: str | None = None


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

    def norm_labels(self) -> list[str]:
        prefix = self.full(self.layout.layers) + "."
        return [p.removeprefix(prefix).removeprefix(self.base_path + ".") for p in self.norms]

    def static_weights(self, neurons: bool) -> dict[str, tuple[tuple[str, ...], torch.Tensor]]:
        """The weights the store keeps once, with their dimension names."""
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
        unembed = self.model.get_output_embeddings() if self.layout.unembed and hasattr(self.model, "get_output_embeddings") else None
        if unembed is not None and final is not None:
            W_U = unembed.weight.detach()
            through = self.find(self.layout.unembed_through) if self.layout.unembed_through else None
            if through is not None:  # fold a linear map after the final norm into the unembedding
                W_U = (W_U.float() @ in_out_weight(self.module(through)).float().T).to(W_U.dtype)
            out["W_U"] = (("vocab", "d_model"), W_U)
            if getattr(unembed, "bias", None) is not None:
                out["unembed_bias"] = (("vocab",), unembed.bias.detach())
        return out

    def final_norm_info(self) -> dict:
        final = self.find(self.layout.final_norm) if self.layout.final_norm else None
        if final is None:
            return {}
        probe = probe_norm(self.module(final), self.d_model)
        return {"final_norm_kind": "layernorm" if probe["center"] else "rmsnorm", "final_norm_eps": probe["eps"]}


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
