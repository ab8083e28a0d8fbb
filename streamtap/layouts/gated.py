"""Blocks that scale the residual stream itself by a learned per-dimension vector.

Doge multiplies the residual by ``input_residual`` before adding the attention's output and by
``post_attention_residual`` before adding the MLP's: each is a ``Scale`` step, which carries every earlier
term through the constant map as the replay carries terms through a frozen norm. Its attention adds a
dynamic mask computed from the values (``dt_proj``, ``A``) to the scores, so its patterns are not recomputed.

Ergo's ``ErgoResidualGate`` returns ``b * term + g * residual`` with ``b = sigmoid(w)`` and
``g = sqrt(1 + b) * exp(-softplus(w) / 2)`` per dimension, the term having passed its post-sublayer norm:
``Scale(g / b)``, the write, then ``Scale(b)`` (b > 0). Its first layers are dense (``up``, relu^2,
``down``), the rest experts with a per-expert norm inside the fused experts and an always-on shared expert.
"""

import torch

from .spec import INPUT, Attn, Layout, Mlp, Moe, Scale, projections, sliding_window


def _branch(gate) -> torch.Tensor:
    """Ergo's gate on the sublayer's term, b = sigmoid(w)."""
    return gate.weight.detach().double().sigmoid()


def _residual_over_branch(gate) -> torch.Tensor:
    """Ergo's gate on the residual over its gate on the term, g / b."""
    w = gate.weight.detach().double()
    b = w.sigmoid()
    return torch.sqrt(1.0 + b) * torch.exp(-0.5 * torch.nn.functional.softplus(w)) / b


_DYNAMIC_MASK = ("Doge adds a dynamic mask computed from each token's values (dt_proj, A, keep_window_size) to the "
                 "scores, which the offline attention does not model")
_ERGO_ROPE = ("Ergo's rotary tables are per layer kind and may be absent (no rotation) on its full-attention layers, "
              "which also multiply queries and keys by sqrt(global_attention_scale); the offline attention models "
              "neither")
_NAMES = dict(embeds={"embed": "embed_tokens"}, layers="layers", resid_final=("norm", INPUT), final_norm="norm")

LAYOUTS = [
    Layout(
        name="doge",
        model_types=("doge",),
        when=lambda config: not getattr(config, "is_moe", False),
        **_NAMES,
        block=(Scale("input_residual"),
               Attn("self_attn.o_proj", norm="input_layernorm", **projections("self_attn"),
                    qk_norm=("self_attn.q_norm", "self_attn.k_norm"), no_patterns=_DYNAMIC_MASK),
               Scale("post_attention_residual"),
               Mlp("mlp", down="mlp.down_proj")),
    ),
    Layout(
        name="ergo",
        model_types=("ergo",),
        **_NAMES,
        block=(Scale("attention_residual_gate", vector=_residual_over_branch),
               Attn("self_attn.o_proj", qkv="self_attn.qkv_proj", split="concat", through="post_attention_layernorm",
                    norm="input_layernorm", qk_norm=("self_attn.q_norm", "self_attn.k_norm"), window=sliding_window,
                    no_patterns=_ERGO_ROPE),
               Scale("attention_residual_gate", vector=_branch),
               Scale("feedforward_residual_gate", vector=_residual_over_branch),
               Moe("mlp", experts="mlp.experts", shared="mlp.shared_experts", through="post_feedforward_layernorm",
                   dense=Mlp("mlp", down="mlp.down_proj")),
               Scale("feedforward_residual_gate", vector=_branch)),
    ),
]
