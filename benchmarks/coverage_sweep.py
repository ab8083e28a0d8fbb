"""Coverage sweep: every causal-LM and masked-LM model type of the installed transformers, tapped tiny.

    python benchmarks/coverage_sweep.py                        # everything, into benchmarks/results/
    python benchmarks/coverage_sweep.py --resume --jobs 2      # only the types the JSON does not hold yet
    python benchmarks/coverage_sweep.py --types llama,bert     # re-check a few; the rest of the JSON stays

Which types: ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` (built with ``AutoModelForCausalLM``) and
``MODEL_FOR_MASKED_LM_MAPPING_NAMES`` (``AutoModelForMaskedLM``); a type in both is checked as both
(``causal:bert``, ``masked:bert``).

How a tiny model is made, offline, from ``AutoConfig.for_model(model_type)``'s defaults (then every
sub-config, e.g. ``text_config``, the same way), by field name:

- widths: ``hidden_size``/``d_model``/``n_embd``/``embed_dim``/``dim`` and every other ``*hidden_size``
  64; ``intermediate_size``/``ffn_dim``/``n_inner``/``d_ff`` and every other ``*intermediate_size`` 128
  (expert widths 32); ``head_dim`` 16 (where the config has one); ``rotary_dim`` 8; ``embedding_size`` 64 where it
  differed from the hidden size (keeps a projection), else the hidden size;
- heads: ``num_attention_heads``/``n_head``/``num_heads`` 4; key/value heads 2 where the model groups
  queries (fewer kv heads than heads), 1 where it had 1, else 4;
- depth: 2 layers, or where the config lists a per-layer pattern (any list or string as long as the
  depth: ``layer_types``, ``hybrid_override_pattern``, ...) the shortest prefix (at least 2) that holds
  every kind of layer, and each such list cut to it;
- vocabulary 256, max positions 128; experts 4, 2 per token, shared experts 1, routing groups 1 (also
  where the defaults leave these counts, or the key/value heads, unset);
- consistency: a Mamba-2 mixer's head width is (expansion x width) / heads; a ``*hidden_size`` that is a
  whole multiple of the width keeps that multiple (Zamba's attention over [stream, embeddings]), and
  ``attention_head_dim`` spans it; where a type's defaults describe no real checkpoint (a hybrid
  without attention layers, an unset layer pattern: bamba, granitemoehybrid, lfm2_moe) the real
  checkpoints' pattern, shortened (``_CHECKPOINT_PATTERN``); if the model still cannot be built, 4,
  8 and 12 layers are tried (patterns set by period and offset, Zamba's shared block used twice);
- heterogeneous configs (``per_layer_config``, {layer: fields}): its layers are kinds of layer for the
  depth rule, kept for the kept layers, each field scaled keeping its ratio to the global value;
  per-layer width lists (Gemma-3n's ``intermediate_size``) scaled element by element; second
  vocabularies (``vocab_size_*``, ``*_vocab``) 256, ``hidden_size_*`` 64; a ``num_*layers`` count equal
  to the depth stays equal to it; where a type's defaults do not build or run, ``_DEFAULT_FIXES``;
- every other integer field named ``*_size``/``*_dim`` above 64 becomes 64 (state sizes, lora ranks),
  every other ``num_*``/``n_*`` above 4 becomes 4 (except token ids and labels);
- weights: the library's own initialisation with ``initializer_range`` 0.2, then biases drawn at
  random and every parameter the initialisation left constant (norm weights, zero gates and layer
  scales) perturbed by 0.2 noise, so that a dropped or doubled term is as large as the others;
- float32, eval mode, eager attention.

Ground truth, independent of the tap: forward pre-hooks of the sweep's own on every layer (the
residual entering each layer after the first; a model's ``output_hidden_states`` is not that everywhere:
Mamba's hold each layer's output) and on the final norm (the last norm
module the base model runs outside its layer list, found by running it); where the base model runs
no such norm (post-LN encoders), the last layer's output.

Each type lands in one class: ``exact-heads`` (every layer's attention split into heads),
``exact-block`` (some layer writes one block-level mixer term), ``refused`` (streamtap raised one of
its errors when the tap opened; the reason is the error, summarised), ``not-tiny`` (the tiny model
could not be built or run: why), ``WRONG`` (tapped without error but the terms do not sum to the
ground truth within 1e-5 of max|resid| per token in float32, or verify fails on the store),
``crashed`` (streamtap raised something that is not one of its errors, or the check hung or died).
Each check runs in a worker process with a per-type timeout; a hang or crash costs that type only.
Results: benchmarks/results/coverage.json (one entry per type, written after each) and the table in
docs/coverage.md (regenerated from the whole JSON after every run).
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import subprocess
import sys
import threading
import time
import traceback
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "coverage.json"
DOC = ROOT / "docs" / "coverage.md"
HEADS = ("causal", "masked")
CLASSES = ("exact-heads", "exact-block", "refused", "not-tiny", "WRONG", "crashed")
EXACT = 1e-5
SEQ_LEN, BATCH = 9, 2

# -- the tiny config -----------------------------------------------------------------------------------
WIDTH, FFN, EXPERT_FFN, HEAD_DIM, HEADS_N, VOCAB, POSITIONS = 64, 128, 32, 16, 4, 256, 128
_WIDTH_NAMES = {"hidden_size", "d_model", "n_embd", "embed_dim", "dim", "model_dim", "hidden_dim", "d_embed", "width"}
_FFN_NAMES = {"intermediate_size", "ffn_dim", "n_inner", "d_ff", "ffn_hidden_size", "d_inner", "inner_dim",
              "decoder_ffn_dim", "encoder_ffn_dim", "ffn_inner_hidden_size"}
_HEAD_NAMES = {"num_attention_heads", "n_head", "num_heads", "n_heads", "encoder_attention_heads",
               "decoder_attention_heads", "attention_heads"}
_KV_NAMES = {"num_key_value_heads", "num_kv_heads", "n_kv_heads", "multi_query_group_num", "kv_heads",
             "num_kv_groups"}
_LAYER_NAMES = {"num_hidden_layers", "n_layer", "num_layers", "n_layers", "encoder_layers", "decoder_layers"}
_POSITION_NAMES = {"max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "n_ctx",
                   "max_sequence_length", "max_seq_length"}
_EXPERT_NAMES = {"num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts", "num_experts_total"}
_TOPK_NAMES = {"num_experts_per_tok", "moe_top_k", "top_k", "num_selected_experts", "moe_topk", "num_experts_per_token",
               "moe_k"}
_SHARED_NAMES = {"n_shared_experts", "num_shared_experts", "moe_num_shared_experts"}
# (heads, head width, expansion) of a Mamba-2 mixer: heads * head width must equal expansion * width
_MAMBA_HEADS = (("mamba_n_heads", "mamba_d_head", "mamba_expand"), ("n_mamba_heads", "mamba_headdim", "mamba_expand"),
                ("num_heads", "head_dim", "expand"))
# where a type's defaults describe no model a checkpoint has (a hybrid without attention layers, a
# pattern left unset), the pattern of the real checkpoints, shortened
_CHECKPOINT_PATTERN = {
    "bamba": {"attn_layer_indices": [1]},
    "granitemoehybrid": {"layer_types": ["linear_attention", "full_attention"]},
    "lfm2_moe": {"layer_types": ["conv", "full_attention"], "num_dense_layers": 1},
}
# where a type's own defaults do not build or run (the checkpoints all set these): the fields to give
_DEFAULT_FIXES = {
    "blt": {"use_cache": False},
    # their defaults leave out the rotary parameters their attention reads (per kind of layer; on attn_config)
    "cohere_compass_text": {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 10000.0}}},
    "dbrx": {"attn_config": {"rope_theta": 10000.0, "clip_qkv": 8.0}},   # and DBRX clamps q, k, v to 8   # its cache reads num_hidden_layers, which its (nested) config does not have
    # an assistant has no per-layer inputs (its config's validation requires 0; the text defaults are 256)
    "gemma4_assistant": {"text_config": {"hidden_size_per_layer_input": 0, "vocab_size_per_layer_input": 0}},
}
_KEEP = {"vocab_size", "pad_token_id", "bos_token_id", "eos_token_id", "sep_token_id", "cls_token_id",
         "mask_token_id", "unk_token_id", "num_labels", "decoder_start_token_id", "type_vocab_size",
         "patch_size", "conv_kernel", "kernel_size", "num_channels", "image_size"}


_SPECIAL = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}


def _per_layer(defaults: dict, depth: int) -> dict:
    """Fields that list something per layer (a list or string exactly ``depth`` long)."""
    return {k: v for k, v in defaults.items()
            if isinstance(v, (list, str)) and len(v) == depth and depth > 1 and k not in ("model_type",)}


def _kept_depth(per_layer: dict, depth: int) -> int:
    """The shortest prefix (at least 2 layers) in which every kind of layer of the pattern appears."""
    if not per_layer:
        return min(2, depth)
    rows = [tuple(json.dumps(v[i]) for v in per_layer.values()) for i in range(depth)]
    kinds = set(rows)
    for n in range(2, depth + 1):
        if set(rows[:n]) == kinds:
            return n
    return depth


def tiny_overrides(defaults: dict, depth: int | None = None) -> dict:
    """The fields to change in one (sub-)config's defaults, by name (module docstring); ``depth``
    overrides the number of layers the pattern rule picks."""
    out: dict = {}
    heads = next((defaults[k] for k in sorted(_HEAD_NAMES) if isinstance(defaults.get(k), int)), None)
    width = next((defaults[k] for k in sorted(_WIDTH_NAMES) if isinstance(defaults.get(k), int)), None)
    for key, value in defaults.items():
        if key.endswith("_token_id") or key.endswith("_token_ids"):
            ids = value if isinstance(value, list) else [value]
            if any(isinstance(i, int) and i >= VOCAB for i in ids):
                small = [_SPECIAL.get(key, 3) if isinstance(i, int) and i >= VOCAB else i for i in ids]
                out[key] = small if isinstance(value, list) else small[0]
            continue
        if key == "head_dim" and value is None and heads:
            out[key] = HEAD_DIM   # derived from the width elsewhere; some configs need it set
            continue
        if key in ("rotary_dim", "rotary_emb_dim") and isinstance(value, int):
            out[key] = HEAD_DIM // 2   # rotates part of each (now 16-wide) head
            continue
        if value is None and heads:   # unset counts some models need (a MoE's experts, kv heads)
            unset = {**dict.fromkeys(_EXPERT_NAMES, 4), **dict.fromkeys(_TOPK_NAMES, 2),
                     **dict.fromkeys(_SHARED_NAMES, 1), **dict.fromkeys(_KV_NAMES, HEADS_N)}
            if key in unset:
                out[key] = unset[key]
            continue
        if not isinstance(value, int) or isinstance(value, bool) or key in _KEEP:
            continue
        if key in _WIDTH_NAMES:
            out[key] = WIDTH
        elif key.endswith("hidden_size") and value > WIDTH:   # a whole multiple of the width keeps its ratio (Zamba)
            out[key] = WIDTH * (value // width if width and value % width == 0 and value // width <= 4 else 1)
        elif key == "embedding_size":
            out[key] = WIDTH // 2 if width and value != width else WIDTH
        elif "expert" in key and ("intermediate" in key or "ffn" in key):
            out[key] = EXPERT_FFN
        elif key in _FFN_NAMES or key.endswith("intermediate_size"):
            out[key] = FFN
        elif key == "head_dim" or key.endswith("head_dim") and value > HEAD_DIM:
            out[key] = HEAD_DIM
        elif key in _HEAD_NAMES:
            out[key] = HEADS_N
        elif key in _KV_NAMES:
            out[key] = 1 if value == 1 else 2 if heads and value < heads else HEADS_N
        elif key in _POSITION_NAMES:
            out[key] = min(value, POSITIONS) if value > 0 else value
        elif key in _EXPERT_NAMES:
            out[key] = min(value, 4)
        elif key in _TOPK_NAMES:
            out[key] = min(value, 2)
        elif key in _SHARED_NAMES:
            out[key] = min(value, 1)
        elif key in ("n_group", "topk_group", "num_expert_group"):
            out[key] = 1
        elif key in _LAYER_NAMES:
            continue
        elif (key.startswith("vocab_size") or key.endswith("_vocab")) and value > VOCAB:
            # a second table (Gemma-3n's per-layer inputs, BLT's hashed byte groups)
            out[key] = VOCAB
        elif key.startswith("hidden_size_") and value > WIDTH:   # a width by another name (hidden_size_per_layer_input)
            out[key] = WIDTH
        elif (key.endswith("_size") or key.endswith("_dim") or key.endswith("_rank")) and value > WIDTH:
            out[key] = WIDTH
        elif key == "mamba_d_ssm":
            out[key] = 2 * WIDTH   # Falcon-H1's mixer width, in place of expansion x width
        elif (key.startswith("num_") or key.startswith("n_") or key.endswith("_n_heads")) and value > 4:
            out[key] = 4
    # in a fixed order (a set's order changes with the process's hash seed), and every depth field the
    # same (BART's decoder-only causal LM sizes its cache by num_hidden_layers, its blocks by decoder_layers)
    depth_keys = [k for k in sorted(_LAYER_NAMES) if isinstance(defaults.get(k), int)]
    if depth_keys:
        depth_key = depth_keys[0]
        per_layer = _per_layer(defaults, defaults[depth_key])
        # a heterogeneous config's layer overrides are kinds of layer too
        overrides = {int(i): f for i, f in (defaults.get("per_layer_config") or {}).items()}
        kinds = {**per_layer, " per_layer_config": [overrides.get(i) for i in range(defaults[depth_key])]} \
            if overrides else per_layer
        n = _kept_depth(kinds, defaults[depth_key]) if depth is None else min(depth, defaults[depth_key])
        out.update(dict.fromkeys(depth_keys, n))
        # a layer count that was the whole depth stays the whole depth (Gemma-4's assistant shares every layer's cache)
        out.update({k: n for k, v in defaults.items() if k not in depth_keys and "layers" in k and k.startswith("num_")
                    and isinstance(v, int) and not isinstance(v, bool) and v == defaults[depth_key]})
        out.update({k: v[:n] for k, v in per_layer.items()})
        for key in [k for k, v in per_layer.items() if k in _FFN_NAMES or k.endswith("intermediate_size")]:
            # a width per layer (Gemma-3n's intermediate_size list): each scaled as a single one would be
            out[key] = [FFN if isinstance(v, int) and not isinstance(v, bool) and v > FFN else v for v in out[key]]
    if isinstance(defaults.get("per_layer_config"), dict) and depth_keys:
        out["per_layer_config"] = _tiny_per_layer(defaults, out, out[depth_keys[0]])
    if isinstance(defaults.get("attention_head_dim"), int) and "attention_hidden_size" in out and heads:
        out["attention_head_dim"] = out["attention_hidden_size"] // HEADS_N   # Zamba: the heads span that width
    for n_heads, d_head, expand in _MAMBA_HEADS:
        if all(isinstance(defaults.get(k), int) for k in (n_heads, d_head, expand)) and width:
            size = {**defaults, **out}
            inner = size.get("mamba_d_ssm") or size[expand] * WIDTH
            out[d_head] = max(1, inner // size[n_heads])
    if "vocab_size" in defaults:
        out["vocab_size"] = VOCAB
    if "initializer_range" in defaults:
        out["initializer_range"] = 0.2
    for key in ("attention_dropout", "hidden_dropout", "dropout", "attn_pdrop", "resid_pdrop", "embd_pdrop",
                "hidden_dropout_prob", "attention_probs_dropout_prob"):
        if isinstance(defaults.get(key), float):
            out[key] = 0.0
    return out


def _tiny_per_layer(defaults: dict, out: dict, depth: int) -> dict:
    """A heterogeneous config's ``per_layer_config`` ({layer index: fields that differ there}) for the
    kept layers: each field scaled as the global one was, keeping its ratio to the global value where
    one divides the other (Gemma-4's global layers with twice the head width stay twice as wide)."""
    kept = {}
    for index, fields in defaults["per_layer_config"].items():
        if int(index) >= depth:
            continue
        tiny = tiny_overrides({k: v for k, v in {**defaults, **fields}.items() if k != "per_layer_config"})
        entry = {}
        for key, value in fields.items():
            base, small = defaults.get(key), out.get(key, defaults.get(key))
            if (isinstance(value, int) and not isinstance(value, bool) and isinstance(base, int) and base > 0
                    and isinstance(small, int) and value != base):
                if value % base == 0 and value // base <= 4:
                    entry[key] = small * (value // base)
                    continue
                if base % value == 0 and small % (base // value) == 0:
                    entry[key] = small // (base // value)
                    continue
            entry[key] = tiny.get(key, value)
        kept[index] = entry
    return kept


def tiny_config(model_type: str, depth: int | None = None):
    """``AutoConfig.for_model(model_type)`` scaled down by name, sub-configs included; and what changed."""
    from transformers import AutoConfig, PretrainedConfig

    fixes = _DEFAULT_FIXES.get(model_type, {})
    base = AutoConfig.for_model(model_type, **fixes)
    changed: dict = dict(fixes)
    kwargs = {**fixes, **tiny_overrides(base.to_dict(), depth)}
    pattern = _CHECKPOINT_PATTERN.get(model_type, {})
    if pattern and depth is None:
        kwargs.update(pattern)
        kinds = pattern.get("layer_types")
        for key in _LAYER_NAMES & set(kwargs) if kinds else ():
            kwargs[key] = len(kinds)
    for key in base.to_dict():
        sub = base.__dict__.get(key)   # not getattr: a heterogeneous config refuses reads of per-layer fields
        if isinstance(sub, PretrainedConfig):
            sub_kwargs = tiny_overrides(sub.to_dict(), depth)
            kwargs[key] = {**sub.to_dict(), **sub_kwargs}
            changed[key] = sub_kwargs
    changed.update({k: v for k, v in kwargs.items() if k not in changed})
    config = AutoConfig.for_model(model_type, **kwargs)
    return config, changed


def perturb(model, seed: int = 0) -> None:
    """Random biases, and every parameter the initialisation left constant made random around its value."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.is_floating_point() or p.numel() == 0:
                continue
            noise = 0.2 * torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype)
            if name.endswith("bias") or bool((p == p.flatten()[0]).all()):
                p.add_(noise)


def build(model_type: str, head: str, dtype, depth: int | None = None):
    """The tiny model (eval, eager attention) of a type, with its config changes."""
    import torch
    import transformers

    config, changed = tiny_config(model_type, depth)
    auto = transformers.AutoModelForCausalLM if head == "causal" else transformers.AutoModelForMaskedLM
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = auto.from_config(config, attn_implementation="eager", dtype=torch.float32)
    perturb(model)
    return model.to(dtype).eval(), changed


# -- ground truth --------------------------------------------------------------------------------------
def _layer_list(base, depth: int | None = None):
    """The ModuleList of blocks: the one holding the most parameters, among those ``depth`` long (the text
    config's layer count) where any is: a multimodal model's vision or audio encoder may hold more."""
    import torch

    lists = [(sum(p.numel() for p in m.parameters()), name, m) for name, m in base.named_modules()
             if isinstance(m, torch.nn.ModuleList) and len(m) > 0]
    deep = [x for x in lists if len(x[2]) == depth]
    return max(deep or lists, key=lambda x: x[0])[1:] if lists else (None, None)


def _parallel_lists(base, list_name, layers) -> list:
    """The module lists beside the layer list that hold one sublayer per layer each (XLM keeps
    ``attentions``, ``layer_norm1``, ``ffns``, ``layer_norm2`` side by side): one layer is then an
    element of each; the list itself where it has no such siblings."""
    import torch

    parent = base.get_submodule(list_name.rsplit(".", 1)[0]) if "." in list_name else base
    return [m for m in parent.children() if isinstance(m, torch.nn.ModuleList) and len(m) == len(layers)] or [layers]


def ground_truth(model, ids, mask):
    """Run the model once with the sweep's own hooks: (final residual, hidden_states, logits, how).

    The final norm is the last module named like a norm that the base model runs outside its layer
    list and after its last layer; its input is the final residual. With none, the last layer's output.
    """
    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    from _util import run_hooked

    base = model.base_model
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    list_name, layers = _layer_list(base, getattr(text, "num_hidden_layers", None))
    order, captured, handles = [], {}, []
    lists = _parallel_lists(base, list_name, layers) if layers is not None else []
    inside = {id(m) for group in lists for m in group.modules()}
    for name, module in base.named_modules():
        if id(module) in inside or module is base:
            continue
        if "norm" in type(module).__name__.lower() or "norm" in name.rsplit(".", 1)[-1].lower():
            def pre(mod, args, kwargs, name=name):
                x = args[0] if args else next(iter(kwargs.values()), None)
                if isinstance(x, torch.Tensor):
                    order.append(name)
                    captured[name] = x.detach().clone()
            handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
    entering = {}
    if layers is not None:   # a layer's input is what the first of its parallel sublayers to run reads
        for i, layer in ((i, group[i]) for group in lists for i in range(len(layers))):
            def enter(mod, args, kwargs, i=i):
                x = args[0] if args else kwargs.get("hidden_states", next(iter(kwargs.values()), None))
                if isinstance(x, torch.Tensor) and i not in entering:
                    entering[i] = x.detach().clone()
            handles.append(layer.register_forward_pre_hook(enter, with_kwargs=True))

        def last(mod, args, output):   # the last layer's output: what the last of its sublayers to run returns
            out = output[0] if isinstance(output, (tuple, list)) else output
            order.append("<last layer>")
            captured["<last layer>"] = out.detach().clone()
        handles.extend(group[-1].register_forward_hook(last) for group in lists)
    out = run_hooked(model, handles, input_ids=ids, attention_mask=mask, output_hidden_states=True)
    if "<last layer>" not in order:
        raise RuntimeError("could not find the model's layer list")
    after = order[len(order) - 1 - order[::-1].index("<last layer>") + 1:]
    norms = [n for n in after if n != "<last layer>"]
    key = norms[-1] if norms else "<last layer>"
    how = f"input of {key}" if norms else "output of the last layer (no final norm)"
    hidden = [entering.get(i) for i in range(len(layers))] + [captured[key]]
    return captured[key], (hidden if all(h is not None for h in hidden) else None), out.logits, how


# -- one check -------------------------------------------------------------------------------------------
def _rel_error(total, resid) -> float:
    """max over tokens of max|total - resid| / max|resid|, in float64."""
    import numpy as np

    total, resid = np.asarray(total, dtype=np.float64), np.asarray(resid, dtype=np.float64)
    scale = np.abs(resid).max(axis=-1)
    return float((np.abs(total - resid).max(axis=-1) / np.maximum(scale, 1e-30)).max())


def _summarise(error: BaseException) -> str:
    text = " ".join(str(error).split())
    if text.startswith("streamtap has no layout for model_type"):
        return "no layout"
    return f"{type(error).__name__}: {text[:400]}"


def _tap(model, ids, mask):
    """Tap one forward into memory; the opened store."""
    import torch
    import zarr

    import streamtap as st

    store = zarr.storage.MemoryStore()
    with st.tap(model, store):
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
    return st.open(store)


def _compare(ds, resid, hidden) -> tuple[float, float, str]:
    """Error of the terms against the ground truth: (final residual, worst intermediate layer, note)."""
    import dask
    import numpy as np

    import streamtap as st

    seq, pos = np.asarray(ds.seq.values), np.asarray(ds.pos.values)
    final = st.decompose(ds).sum("component").values
    err = _rel_error(final, resid.float().numpy()[seq, pos])
    n_layers = int(ds.attrs.get("n_layers", 0))
    inter, note = 0.0, ""
    if hidden is not None and len(hidden) == n_layers + 1:
        # every depth's decompose(upto=layer) from one replay, computed together: each term once, not once a depth
        from streamtap.invariant import decompositions

        layers = range(1, n_layers)
        totals = dask.compute(*[d.sum("component").data for d in decompositions(ds, list(layers))])
        for layer, total in zip(layers, totals):
            inter = max(inter, _rel_error(total, hidden[layer].float().numpy()[seq, pos]))
    else:
        note = f"hidden_states has {0 if hidden is None else len(hidden)} entries for {n_layers} layers; only the final residual checked"
    return err, inter, note


DEPTHS = (None, 4, 8, 12)


def _run_tiny(model_type: str, head: str, depth):
    """Build the tiny model and run it once with the ground-truth hooks."""
    import torch

    model, changed = build(model_type, head, torch.float32, depth)
    vocab = model.get_input_embeddings().weight.shape[0]
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, min(vocab, VOCAB), (BATCH, SEQ_LEN), generator=g)
    mask = torch.ones_like(ids)
    truth = ground_truth(model, ids, mask)
    if not torch.isfinite(truth[2]).all() or not torch.isfinite(truth[0]).all():
        raise RuntimeError("the tiny model's outputs are not finite")
    return model, ids, mask, truth, changed


def check(key: str, half: bool = True) -> dict:
    """Classify one ``head:model_type`` (module docstring); ``half`` also measures bfloat16. Never raises."""
    import torch

    import streamtap as st
    from streamtap import StreamtapError

    head, model_type = key.split(":", 1)
    result = {"key": key, "type": model_type, "head": head}
    start = time.time()
    failures = []
    for depth in DEPTHS:   # the pattern rule first; then deeper, for patterns set by period/offset fields
        try:
            model, ids, mask, (resid, hidden, logits, how), changed = _run_tiny(model_type, head, depth)
            break
        except Exception as exc:  # noqa: BLE001 - any failure to build or run the model is the finding
            failures.append(f"{type(exc).__name__}: {' '.join(str(exc).split())[:400]}")
    else:
        result.update({"class": "not-tiny", "reason": failures[0]})
        return result
    result["config"] = {k: v for k, v in changed.items() if not isinstance(v, dict) or len(json.dumps(v)) < 400}
    result["ground_truth"] = how
    try:
        ds = _tap(model, ids, mask)
    except StreamtapError as exc:
        result.update({"class": "refused", "reason": _summarise(exc)})
        return result
    except Exception as exc:  # noqa: BLE001
        result.update({"class": "crashed", "reason": f"the tap raised {_summarise(exc)}",
                       "traceback": traceback.format_exc()[-2000:]})
        return result
    result["layout"] = ds.attrs.get("layout")
    try:
        verified = st.verify(ds, raise_on_error=False).attrs["max_rel_error"]
        err, inter, note = _compare(ds, resid, hidden)
    except Exception as exc:  # noqa: BLE001
        result.update({"class": "WRONG", "reason": f"decompose/verify failed on a tapped store: {_summarise(exc)}"})
        return result
    result.update({"verify_error": float(verified), "float32_error": err, "layer_error": inter})
    if note:
        result["note"] = note
    if max(err, inter, float(verified)) > EXACT:
        result.update({"class": "WRONG", "reason": (
            f"tapped without error, but terms vs ground truth: final {err:.1e}, layers {inter:.1e}, "
            f"verify {float(verified):.1e} (bound {EXACT:.0e})")})
        return result
    kinds = st.decompose(ds)
    per_layer = {}
    for kind, layer in zip(kinds.kind.values, kinds.layer.values):
        per_layer.setdefault(int(layer), set()).add(str(kind))
    heads_everywhere = all("head" in k for layer, k in per_layer.items() if layer >= 0)
    result["class"] = "exact-heads" if heads_everywhere else "exact-block"
    if not half:
        result["seconds"] = round(time.time() - start, 1)
        return result
    try:
        model = model.to(torch.bfloat16)
        resid_h, _, _, _ = ground_truth(model, ids, mask)
        ds_h = _tap(model, ids, mask)
        seq, pos = ds_h.seq.values, ds_h.pos.values
        result["half_error"] = _rel_error(st.decompose(ds_h).sum("component").values, resid_h.float().numpy()[seq, pos])
        result["half_tolerance"] = float(st.tolerance(ds_h))
    except Exception as exc:  # noqa: BLE001
        result["half_error_note"] = f"bfloat16 not measured: {_summarise(exc)}"
    result["seconds"] = round(time.time() - start, 1)
    return result


def load(path: Path = RESULTS) -> dict:
    """The recorded results (empty before the first run)."""
    return json.loads(path.read_text()) if path.exists() else {}


# -- the pool of workers -----------------------------------------------------------------------------------
def all_keys() -> list[str]:
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_MASKED_LM_MAPPING_NAMES)

    return ([f"causal:{t}" for t in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES]
            + [f"masked:{t}" for t in MODEL_FOR_MASKED_LM_MAPPING_NAMES])


READY, STARTUP = "ready", 600


def worker(half: bool = True) -> None:
    """Read keys on stdin, one per line; answer each with one JSON line on stdout."""
    import warnings

    warnings.simplefilter("ignore")
    import torch  # noqa: F401 - the imports every check needs, before the first key's clock starts
    import transformers  # noqa: F401

    import streamtap  # noqa: F401

    out = sys.stdout
    sys.stdout = sys.stderr   # model code that prints must not corrupt the answers
    out.write(READY + "\n")
    out.flush()
    for line in sys.stdin:
        result = check(line.strip(), half)
        out.write(json.dumps(result) + "\n")
        out.flush()


class Worker:
    """One worker process; ``ask`` gives a key's result or a crashed/hung result, restarting as needed."""

    def __init__(self, half: bool = True):
        self.proc, self.half = None, half

    def _start(self):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        flags = ["--worker"] if self.half else ["--worker", "--no-half"]
        self.proc = subprocess.Popen([sys.executable, __file__, *flags], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
        self.answers = queue.Queue()
        proc = self.proc

        def read():
            for line in proc.stdout:
                self.answers.put(line)
            self.answers.put(None)
        threading.Thread(target=read, daemon=True).start()
        try:   # a loaded machine may take minutes to import torch: that is not the first type's time
            self.started = self.answers.get(timeout=STARTUP) == READY + "\n"
        except queue.Empty:
            self.started = False

    def ask(self, key: str, timeout: float) -> dict:
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        if not self.started:
            self.close()
            return {"key": key, "class": "crashed", "reason": f"the worker did not start within {STARTUP} s"}
        self.proc.stdin.write(key + "\n")
        self.proc.stdin.flush()
        try:
            line = self.answers.get(timeout=timeout)
        except queue.Empty:
            self.close()
            return {"key": key, "class": "crashed", "reason": f"no answer within {timeout:.0f} s (hung); killed"}
        if line is None:
            code = self.proc.wait()
            self.proc = None
            return {"key": key, "class": "crashed", "reason": f"the worker process died (exit code {code})"}
        return json.loads(line)

    def close(self):
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


def sweep(keys: list[str], results: dict, *, jobs: int, timeout: float, save, half: bool = True) -> None:
    """Check ``keys`` on ``jobs`` worker processes (each checks many types in turn), into ``results``."""
    todo: queue.Queue = queue.Queue()
    for key in keys:
        todo.put(key)
    lock = threading.Lock()

    def run():
        w = Worker(half)
        try:
            while True:
                try:
                    key = todo.get_nowait()
                except queue.Empty:
                    return
                result = w.ask(key, timeout)
                result.setdefault("type", key.split(":", 1)[1])
                result.setdefault("head", key.split(":", 1)[0])
                with lock:
                    results[key] = result
                    save()
                    print(f"{key:40s} {result['class']:12s} {result.get('reason', '')[:90]}", flush=True)
        finally:
            w.close()
    threads = [threading.Thread(target=run) for _ in range(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


# -- the table -----------------------------------------------------------------------------------------------
def _cell(x) -> str:
    return "" if x is None else f"{x:.1e}"


# What an engineer found when looking into a causal type the tap refuses without naming a structure (the tap's
# own message then says only that no layout file or inferred layout fits): shown beside the sweep's reason.
DIAGNOSED = {
    "blt": "byte-latent: a local encoder, a global transformer and a local decoder joined by cross-attention, "
           "not one residual stream",
    "cpmant": "CPM blocks nested inside a block wrapper with their own norms: inference cannot read the tree; "
              "no family file yet",
    "gemma3n_text": "AltUp keeps several residual streams, predicted and corrected per layer with per-token "
                    "weights: no single stream adds up",
    "inkling_text": "short-convolution and gated-delta mixers with block-attention residuals: no family file yet",
    "inkling2_text": "short-convolution and gated-delta mixers with block-attention residuals: no family file yet",
    "lara_mini": "block-attention residuals (a layer reads a learned mix of earlier blocks' outputs): no family "
                 "file yet",
    "lfm3": "convolution mixers in a module tree inference cannot read: no family file yet",
    "jetmoe": "a mixture of attention heads with per-expert output projections (no fixed per-head W_O) and MLP "
              "experts without a linear down projection",
    "mllama": "its input embedding has more rows than its unembedding (image tokens); a store keeps one "
              "vocabulary axis",
    "moshi": "its input embedding has 257 rows and its unembedding 256; a store keeps one vocabulary axis",
    "rwkv": "RWKV time- and channel-mixing (recurrent, no attention): a mixer family file is not written yet",
    "xlnet": "two-stream attention (content and query streams) with relative positions and memory",
    "zaya": "CCA attention (convolutions on q/k, delayed values) and an affine residual scaling with a bias",
}

MEANINGS = {
    "exact-heads": "exact, every attention layer split into per-head terms",
    "exact-block": "exact, some layer writes one block-level mixer term",
    "refused": "the tap refused with a streamtap error (reason summarised)",
    "not-tiny": "no tiny model could be built or run from the config (why)",
    "WRONG": "tapped without error, but the terms miss the ground truth",
    "crashed": "streamtap raised a non-streamtap error, or the check hung or died",
}


def table(results: dict) -> str:
    """docs/coverage.md from the whole JSON."""
    import transformers

    counts = {c: sum(r["class"] == c for r in results.values()) for c in CLASSES}
    by_head = {h: {c: sum(r["class"] == c and r["head"] == h for r in results.values()) for c in CLASSES}
               for h in ("causal", "masked")}
    lines = [
        "# Coverage: every causal-LM and masked-LM type of transformers, tapped tiny",
        "",
        f"Generated by `benchmarks/coverage_sweep.py` (transformers {transformers.__version__}, "
        f"{date.today().isoformat()}); the raw results are in `benchmarks/results/coverage.json`.",
        "How each tiny model is built, what the ground truth is and what each class means: the module "
        "docstring of `benchmarks/coverage_sweep.py`, summarised here.",
        "",
        "- Tiny models come from `AutoConfig.for_model(model_type)` scaled down by field name: widths 64, "
        "MLP 128 (experts 32), 4 heads (2 key/value heads where the model groups queries), head_dim 16, "
        "vocabulary 256, 128 positions, 4 experts (2 per token), 2 layers or the shortest prefix of a "
        "per-layer pattern holding every kind of layer; other `*_size`/`*_dim` fields above 64 become 64 and "
        "`num_*` fields above 4 become 4; unset expert/top-k/kv counts are filled, Mamba-2 head widths kept "
        "consistent, and hybrids whose defaults have no attention layer get their checkpoints' pattern. Random weights (biases and constant parameters perturbed), "
        "float32, eval, eager attention.",
        "- Ground truth is the model's own, read by forward pre-hooks of the sweep's own: the input of every "
        "layer for the residual entering it, and the input of the final norm (found by running the model: the last "
        "norm the base model runs after its last layer), or the last layer's output where there is none.",
        "- float32 error: max over tokens of max|sum of terms - ground truth| / max|ground truth| (bound "
        "1e-5). bfloat16 error: the same in bfloat16, against `st.tolerance` for the store.",
        "",
        "Re-run (cheap to repeat; workers restart after a crash or a hang):",
        "",
        "```",
        "python benchmarks/coverage_sweep.py --jobs 2                 # everything",
        "python benchmarks/coverage_sweep.py --resume                  # what the JSON lacks",
        "python benchmarks/coverage_sweep.py --types llama,masked:bert # re-check some, keep the rest",
        "python benchmarks/coverage_sweep.py --classes not-tiny,crashed # re-check those classes",
        "python benchmarks/coverage_sweep.py --table                   # rewrite this page from the JSON",
        "python benchmarks/coverage_sweep.py --no-half --jobs 2        # float32 only (about half the time)",
        "```",
        "",
        "| class | causal LM | masked LM | all | meaning |",
        "| --- | ---: | ---: | ---: | --- |",
        *(f"| {c} | {by_head['causal'][c]} | {by_head['masked'][c]} | {counts[c]} | {MEANINGS[c]} |" for c in CLASSES),
        f"| total | {sum(by_head['causal'].values())} | {sum(by_head['masked'].values())} | {len(results)} | |",
        "",
        "| type | head | class | float32 error | bfloat16 error (≤ tolerance) | reason / layout |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    order = {c: i for i, c in enumerate(("WRONG", "crashed", "exact-heads", "exact-block", "refused", "not-tiny"))}
    for key, r in sorted(results.items(), key=lambda kv: (order[kv[1]["class"]], kv[1]["type"], kv[1]["head"])):
        f32 = _cell(max(r.get("float32_error", 0), r.get("layer_error", 0))) if "float32_error" in r else ""
        half = f"{_cell(r['half_error'])} (≤ {_cell(r['half_tolerance'])})" if "half_error" in r else ""
        why = r.get("reason") or f"layout {r.get('layout')}"
        if r["class"] == "refused" and r["head"] == "causal" and r["type"] in DIAGNOSED:
            why = f"{why}; diagnosed: {DIAGNOSED[r['type']]}"
        why = why.replace("|", "\\|")
        lines.append(f"| {r['type']} | {r['head']} | {r['class']} | {f32} | {half} | {why} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--types", default="", help="comma-separated model types (or head:type) to check; "
                        "the JSON keeps every other type's result")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes (default 1)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per type before it counts as hung")
    parser.add_argument("--resume", action="store_true", help="skip the types the JSON already holds")
    parser.add_argument("--classes", default="", help="re-check only the types the JSON puts in these "
                        "classes (comma-separated, e.g. not-tiny,crashed)")
    parser.add_argument("--table", action="store_true", help="only rewrite docs/coverage.md from the JSON")
    parser.add_argument("--results", default=str(RESULTS))
    parser.add_argument("--doc", default=str(DOC))
    parser.add_argument("--no-half", action="store_true", help="skip the bfloat16 measurement (faster)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(not args.no_half)
    path = Path(args.results)
    results = load(path)
    keys = all_keys()
    if args.types:
        wanted = [t.strip() for t in args.types.split(",") if t.strip()]
        picked = [k for k in keys if k in wanted or k.split(":", 1)[1] in wanted]
        unknown = [t for t in wanted if not any(k == t or k.split(":", 1)[1] == t for k in keys)]
        if unknown:
            parser.error(f"--types: not a causal-LM or masked-LM model type of this transformers: {', '.join(unknown)}")
        keys = picked
    if args.resume:
        keys = [k for k in keys if k not in results]
    if args.classes:
        wanted_classes = set(args.classes.split(","))
        keys = [k for k in keys if k in results and results[k]["class"] in wanted_classes]
    known = set(all_keys())
    results = {k: v for k, v in results.items() if k in known}

    def save():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(dict(sorted(results.items())), indent=1) + "\n")
        tmp.replace(path)
    if not args.table:
        sweep(keys, results, jobs=max(1, args.jobs), timeout=args.timeout, save=save, half=not args.no_half)
    Path(args.doc).write_text(table(results))
    counts = {c: sum(r["class"] == c for r in results.values()) for c in CLASSES}
    print(" ".join(f"{c}={n}" for c, n in counts.items()), f"total={len(results)}")


if __name__ == "__main__":
    main()
