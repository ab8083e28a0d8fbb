"""Stop-gap until stores carry the attention weights: read W_Q, W_K, W_V and W_E from a model.

Items 5-6 of the analyses (fused W_QK / W_OV, effective ranks) need the query, key and value weights
and the token embedding. Stores made before streamtap keeps them can be completed with

    ds = ds.assign(attention_weights(model))

This reads the two module families streamtap's layouts know today (Llama-style q_proj/k_proj/v_proj
under ``self_attn``, GPT-2's ``attn.c_attn`` holding q, k and v side by side) and is used by the
examples and tests only; the store itself will carry these arrays with the same names and dims.
"""

from __future__ import annotations

import numpy as np
import torch
import xarray as xr


def _in_out(module) -> torch.Tensor:
    """(in_features, out_features), for nn.Linear (out, in) and GPT-2's Conv1D (in, out)."""
    if isinstance(module, torch.nn.Linear):
        return module.weight.detach().T
    return module.weight.detach()


def attention_weights(model, *, input_norm: bool = False) -> dict[str, xr.DataArray]:
    """W_Q (layer, head, d_model, d_head), W_K/W_V (layer, kv_head, d_model, d_head), W_E (vocab, d_model).

    With ``input_norm`` also ``attn_norm_weight`` (layer, d_model) and ``attn_norm_bias`` where present.
    """
    cfg = model.config
    n_heads, d_model = cfg.num_attention_heads, cfg.hidden_size
    d_head = getattr(cfg, "head_dim", None) or d_model // n_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
    base = model.base_model
    blocks = base.layers if hasattr(base, "layers") else base.h
    Q, K, V, G, B = [], [], [], [], []
    for block in blocks:
        attn = block.self_attn if hasattr(block, "self_attn") else block.attn
        if hasattr(attn, "q_proj"):
            q, k, v = (_in_out(getattr(attn, f"{n}_proj")) for n in "qkv")
        else:  # one projection holding q, k and v side by side
            q, k, v = _in_out(attn.c_attn).split(d_model, dim=1)
        Q.append(q.reshape(d_model, n_heads, d_head).permute(1, 0, 2))
        K.append(k.reshape(d_model, n_kv, d_head).permute(1, 0, 2))
        V.append(v.reshape(d_model, n_kv, d_head).permute(1, 0, 2))
        norm = block.input_layernorm if hasattr(block, "input_layernorm") else block.ln_1
        G.append(norm.weight.detach())
        if getattr(norm, "bias", None) is not None:
            B.append(norm.bias.detach())
    f = lambda t: np.asarray(torch.stack(t).float().numpy())  # noqa: E731
    out = {
        "W_Q": xr.DataArray(f(Q), dims=("layer", "head", "d_model", "d_head")),
        "W_K": xr.DataArray(f(K), dims=("layer", "kv_head", "d_model", "d_head")),
        "W_V": xr.DataArray(f(V), dims=("layer", "kv_head", "d_model", "d_head")),
        "W_E": xr.DataArray(model.get_input_embeddings().weight.detach().float().numpy(), dims=("vocab", "d_model")),
    }
    if input_norm:
        out["attn_norm_weight"] = xr.DataArray(f(G), dims=("layer", "d_model"))
        if B:
            out["attn_norm_bias"] = xr.DataArray(f(B), dims=("layer", "d_model"))
    return out
