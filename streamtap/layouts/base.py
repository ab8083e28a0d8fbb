"""What a layout declares, and how a declaration is bound to one live model.

A layout is data, not code: module paths relative to the model's base (``model.base_model``) and
which side of each module (its input or its output) holds a term. Binding turns the paths into the
concrete per-layer paths that nnsight caches, and reads the static weights the store keeps, so that
offline analysis never needs the model again.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

INPUT, OUTPUT = "input", "output"


@dataclass(frozen=True)
class Layout:
    """Where each additive term of the residual stream lives in one architecture family.

    Paths are relative to ``model.base_model`` (the decoder stack without the LM head), and
    ``attn_out``, ``mlp`` and ``mlp_down`` are relative to one block of ``layers``.
    """

    name: str
    model_types: tuple[str, ...]
    embed: str                   # output: the token embedding entering the stream
    layers: str                  # the ModuleList of blocks
    attn_out: str                # input: z, all heads concatenated; its weight is W_O
    mlp: str                     # output: the MLP's whole term
    mlp_down: str                # input: neuron activations; its weight is W_out
    final_norm: str              # input: the final residual; its weights go to offline analysis
    final_norm_kind: str         # "layernorm" (centred, with beta) or "rmsnorm"
    pos_embed: str | None = None  # output: learned position embedding, where the model has one
    notes: str = ""

    def describe(self) -> str:
        return f"{self.name} ({', '.join(self.model_types)})"


def _resolve(root: torch.nn.Module, path: str) -> torch.nn.Module:
    module = root
    for part in path.split("."):
        module = module[int(part)] if part.isdigit() else getattr(module, part)
    return module


def in_out_weight(module: torch.nn.Module) -> torch.Tensor:
    """The weight as (in_features, out_features), whatever convention the module stores it in.

    ``nn.Linear`` keeps (out, in); GPT-2's ``Conv1D`` keeps (in, out). Telling them apart by the
    module's own type keeps architecture names out of this decision.
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


@dataclass
class BoundLayout:
    """A layout resolved against one model: nnsight paths per term, sizes, and static weights."""

    layout: Layout
    model: torch.nn.Module
    base_path: str
    n_layers: int
    n_heads: int
    d_head: int
    d_model: int
    d_mlp: int
    taps: dict[str, tuple[str, str]] = field(default_factory=dict)   # key -> (module path, side)

    @property
    def name(self) -> str:
        return self.layout.name

    def module(self, rel: str) -> torch.nn.Module:
        return _resolve(self.model, self._full(rel)) if rel else self.model

    def _full(self, rel: str) -> str:
        return f"{self.base_path}.{rel}" if self.base_path else rel

    def block_path(self, layer: int, rel: str) -> str:
        return self._full(f"{self.layout.layers}.{layer}.{rel}")

    def static_weights(self, neurons: bool) -> dict[str, tuple[tuple[str, ...], torch.Tensor]]:
        """The weights the store keeps once, with their dimension names."""
        L, H, dh, d = self.n_layers, self.n_heads, self.d_head, self.d_model
        W_O, b_O, W_out, b_out = [], [], [], []
        for layer in range(L):
            o = _resolve(self.model, self.block_path(layer, self.layout.attn_out))
            w = in_out_weight(o)
            W_O.append(w.reshape(H, dh, d))
            b_O.append(_bias(o, d, w))
            down = _resolve(self.model, self.block_path(layer, self.layout.mlp_down))
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
        norm = self.module(self.layout.final_norm)
        weight = getattr(norm, "weight", None)
        out["final_norm_weight"] = (("d_model",), weight.detach() if weight is not None else torch.ones(d))
        if getattr(norm, "bias", None) is not None:
            out["final_norm_bias"] = (("d_model",), norm.bias.detach())
        unembed = self.model.get_output_embeddings() if hasattr(self.model, "get_output_embeddings") else None
        if unembed is not None:
            out["W_U"] = (("vocab", "d_model"), unembed.weight.detach())
            if getattr(unembed, "bias", None) is not None:
                out["unembed_bias"] = (("vocab",), unembed.bias.detach())
        return out

    def final_norm_eps(self) -> float:
        norm = self.module(self.layout.final_norm)
        for attr in ("eps", "variance_epsilon", "epsilon"):
            if hasattr(norm, attr):
                return float(getattr(norm, attr))
        raise AttributeError(f"cannot find the epsilon of {type(norm).__name__}")


def bind(layout: Layout, model: torch.nn.Module) -> BoundLayout:
    config = model.config
    base = model.base_model if hasattr(model, "base_model") else model
    names = {id(m): n for n, m in model.named_modules()}
    base_path = names[id(base)]
    n_heads = config.num_attention_heads
    d_model = config.hidden_size
    d_head = getattr(config, "head_dim", None) or d_model // n_heads
    blocks = _resolve(base, layout.layers)
    down = _resolve(blocks[0], layout.mlp_down)
    d_mlp = in_out_weight(down).shape[0]
    bound = BoundLayout(layout, model, base_path, len(blocks), n_heads, d_head, d_model, d_mlp)
    full = bound._full
    taps = {"embed": (full(layout.embed), OUTPUT), "resid_final": (full(layout.final_norm), INPUT)}
    if layout.pos_embed:
        taps["pos_embed"] = (full(layout.pos_embed), OUTPUT)
    for layer in range(bound.n_layers):
        taps[f"z.{layer}"] = (bound.block_path(layer, layout.attn_out), INPUT)
        taps[f"mlp_out.{layer}"] = (bound.block_path(layer, layout.mlp), OUTPUT)
        taps[f"neuron_act.{layer}"] = (bound.block_path(layer, layout.mlp_down), INPUT)
    bound.taps = taps
    return bound
