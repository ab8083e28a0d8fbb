"""Layouts read off the module tree of a model type no family file covers, accepted only when proven.

A transformers model whose ``model_type`` no layout names is still, most often, a stack of blocks
that each add an attention output and an MLP output to the stream. :func:`candidates` reads the
module tree (module types and weight shapes first, names as hints) and the config's sizes and
proposes the few layouts that could describe it, most likely first: pre-norm blocks (parallel
attention and MLP add up the same way), post-sublayer norms, post-LN blocks, with and without the
multipliers the config declares. None of them is trusted: the tap runs the attach-time self-check
on each, in order, and uses the first that adds up exactly on the live model (``Tap._prove``);
when none does, the error names the closest one and where it failed. A family file always wins
over inference, and ``check=False`` is refused for an inferred layout.

The self-check proves the terms, the final residual and the logits, not where the queries and keys
come from, so an inferred layout does not offer attention patterns (``pattern_support``).
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Iterator

import torch

from .bind import stack_root
from .spec import INPUT, Attn, Layout, Mlp, Moe, Norm, Reciprocal, sliding_window

# names are hints that order candidates; module types and weight shapes decide what a module is
_OUT_NAMES = ("o_proj", "out_proj", "dense", "c_proj", "wo", "o", "out", "proj", "output", "attn_out")
_DOWN_NAMES = ("down_proj", "c_proj", "fc2", "dense_4h_to_h", "fc_out", "w2", "wo", "out_proj", "proj_out",
               "output", "dense")
_SEPARATE = (("q_proj", "k_proj", "v_proj"), ("query", "key", "value"), ("q", "k", "v"), ("wq", "wk", "wv"),
             ("query_proj", "key_proj", "value_proj"))
_PER_GROUP = ("query_key_value",)       # the GPT-NeoX / Falcon / BLOOM convention; other fused ones concatenate
_QK_NORMS = (("q_norm", "k_norm"), ("q_layernorm", "k_layernorm"), ("query_norm", "key_norm"))
_MLP_HINTS = ("mlp", "feed_forward", "ffn", "ffw", "feedforward", "moe")
_ATTN_HINTS = ("attn", "attention")
_POST_MLP = ("post_feedforward", "post_mlp", "post_ffn", "ffn_post", "post_ff")
_POST_ATTN = ("post_attention", "post_attn", "post_self_attn")
_EMBED_NORMS = ("embed", "emb")
_SHARED = ("shared_experts", "shared_expert", "shared_mlp")
_SHARED_GATES = ("shared_expert_gate",)

# multipliers models apply outside their modules: (which, config field, the ways models apply it)
MULTIPLIERS = (
    ("embed", "embedding_multiplier", ("embedding_multiplier",)),   # Granite, HyperCLOVA X
    ("residual", "residual_multiplier", ("residual_multiplier",)),  # Granite, HyperCLOVA X
    # Granite divides its logits by logits_scaling, HyperCLOVA X multiplies them: the self-check decides
    ("logit", "logits_scaling", (Reciprocal("logits_scaling"), "logits_scaling")),
    ("logit", "logit_scale", ("logit_scale",)),                     # Cohere: logits * logit_scale
)


def _in_out(module: torch.nn.Module) -> tuple[int, int] | None:
    """(in, out) features of a linear map (``nn.Linear`` or GPT-2's ``Conv1D``), else None."""
    if isinstance(module, torch.nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D":
        return tuple(module.weight.shape)
    return None


def _is_norm(module: torch.nn.Module) -> bool:
    name = type(module).__name__.lower()
    return "norm" in name and not isinstance(module, (torch.nn.ModuleList, torch.nn.ModuleDict)) \
        and not any(_in_out(m) for m in module.modules())


def _rank(name: str, hints: tuple[str, ...]) -> int:
    last = name.rsplit(".", 1)[-1]
    return hints.index(last) if last in hints else len(hints)


def _sizes(config) -> dict | None:
    try:
        n_heads, d_model = int(config.num_attention_heads), int(config.hidden_size)
        n_layers = int(config.num_hidden_layers)
    except (AttributeError, TypeError):
        return None
    d_head = getattr(config, "head_dim", None) or d_model // n_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_heads
    return dict(n_heads=n_heads, d_model=d_model, n_layers=n_layers, d_head=int(d_head), n_kv=int(n_kv))


def _blocks(base: torch.nn.Module, n_layers: int) -> str | None:
    """The shallowest module list of ``n_layers`` entries under the base model: the blocks."""
    lists = [(name.count("."), name) for name, m in base.named_modules()
             if isinstance(m, torch.nn.ModuleList) and len(m) == n_layers and name]
    return min(lists)[1] if lists else None


def _attention(block: torch.nn.Module, s: dict) -> dict | None:
    """The attention's output projection, queries/keys/values and q/k norms inside one block."""
    width = s["n_heads"] * s["d_head"]
    outs = []
    for name, m in block.named_modules():
        shape = _in_out(m)
        parent = name.rsplit(".", 1)[0] if "." in name else ""
        if shape != (width, s["d_model"]) or not parent:
            continue
        owner = block.get_submodule(parent)
        if any(h in parent.lower() or h in type(owner).__name__.lower() for h in _ATTN_HINTS):
            outs.append(name)
    if not outs:
        return None
    proj = min(outs, key=lambda n: (n.count("."), _rank(n, _OUT_NAMES)))
    prefix = proj.rsplit(".", 1)[0]
    attn = block.get_submodule(prefix)
    found = {"proj": proj}
    children = dict(attn.named_children())
    for q, k, v in _SEPARATE:
        if all(_in_out(children.get(n)) if n in children else None for n in (q, k, v)):
            found.update(q=f"{prefix}.{q}", k=f"{prefix}.{k}", v=f"{prefix}.{v}")
            break
    else:
        for name, m in children.items():
            shape = _in_out(m)
            if shape and shape[0] == s["d_model"] and shape[1] % s["d_head"] == 0:
                extra = shape[1] // s["d_head"] - s["n_heads"]
                if extra >= 2 and extra % 2 == 0 and s["n_heads"] % (extra // 2) == 0:
                    found.update(qkv=f"{prefix}.{name}", split="per_group" if name in _PER_GROUP else "concat")
                    break
    for qn, kn in _QK_NORMS:
        if qn in children and kn in children:
            found["qk_norm"] = (f"{prefix}.{qn}", f"{prefix}.{kn}")
            break
    return found


def _mlp(block: torch.nn.Module, s: dict, attn_prefix: str) -> Mlp | Moe | None:
    """The block's MLP (or mixture of experts) and its down projection."""
    for name, m in block.named_children():
        if name == attn_prefix.split(".")[0]:
            continue
        if not (any(h in name.lower() for h in _MLP_HINTS) or "mlp" in type(m).__name__.lower()):
            continue
        experts = getattr(m, "experts", None)
        if experts is not None and hasattr(experts, "num_experts"):
            # an always-on shared expert beside the routed ones (DeepSeek's shared_experts), gated where
            # the block has a gate for it (Qwen2-MoE's shared_expert_gate)
            shared = next((n for n in _SHARED if isinstance(getattr(m, n, None), torch.nn.Module)), None)
            gate = next((n for n in _SHARED_GATES if isinstance(getattr(m, n, None), torch.nn.Module)), None)
            return Moe(name, experts=f"{name}.experts", shared=shared and f"{name}.{shared}",
                       shared_gate=shared and gate and f"{name}.{gate}")
        downs = [n for n, sub in m.named_modules() if (_in_out(sub) or (0, 0))[1] == s["d_model"] and n]
        if downs:
            return Mlp(name, down=f"{name}.{min(downs, key=lambda n: (_rank(n, _DOWN_NAMES), n.count('.')))}")
    # no MLP module: the block holds its linear maps itself (OPT, BioGPT, XGLM's fc1/fc2), and the one
    # that maps to d_model writes the MLP term
    downs = [name for name, m in block.named_children()
             if name != attn_prefix.split(".")[0] and (_in_out(m) or (0, 0))[1] == s["d_model"]]
    if downs:
        down = min(downs, key=lambda n: _rank(n, _DOWN_NAMES))
        return Mlp(down, down=down)
    return None


def _layers_mlp(blocks: torch.nn.ModuleList, s: dict, attn_prefix: str) -> Mlp | Moe | None:
    """The MLP step of every block: the first block's, or where some blocks hold a mixture of experts and
    others a dense MLP (DeepSeek's first dense layers, MoE every few layers), a mixture whose ``dense``
    is the dense blocks' MLP (each layer binds to whichever it has)."""
    found = [_mlp(block, s, attn_prefix) for block in blocks]
    moe = next((m for m in found if isinstance(m, Moe)), None)
    dense = next((m for m in found if isinstance(m, Mlp)), None)
    if moe is None or dense is None:
        return found[0]
    return dataclasses.replace(moe, dense=dense)


def _block_variants(block: torch.nn.Module, attn: dict, mlp) -> Iterator[tuple]:
    """Where the block's norms sit, most likely first: pre-norm (sequential or parallel: the stream
    sees the same writes), sandwich / post-sublayer norms, post-LN."""
    norms = [name for name, m in block.named_children() if _is_norm(m)]
    post_attn = [n for n in norms if any(h in n for h in _POST_ATTN)]
    post_mlp = [n for n in norms if any(h in n for h in _POST_MLP)]
    inputs = [n for n in norms if n not in post_attn + post_mlp]
    attn_norm = inputs[0] if inputs else None
    yield (Attn(**attn, norm=attn_norm, window=sliding_window), mlp)
    # sandwich pairs named as such first (Gemma-2's post_attention_layernorm, GLM-4's post_self_attn_layernorm),
    # then any other pair of the block's later norms (HyperCLOVA X's post_norm1, post_norm2)
    named = [(a, m) for a in post_attn for m in post_mlp]
    others = [(a, m) for a in norms for m in norms
              if a != m and attn_norm not in (a, m) and (a, m) not in named] if len(norms) >= 3 else []
    for through_attn, through_mlp in named + others:
        yield (Attn(**attn, norm=attn_norm, through=through_attn, window=sliding_window),
               dataclasses.replace(mlp, through=through_mlp))
    if len(norms) == 2:
        yield (Attn(**attn, window=sliding_window), Norm(norms[0]), mlp, Norm(norms[1]))


def _embeddings(model, base: torch.nn.Module, d_model: int) -> tuple[dict, bool, list[str]] | None:
    """(embeds, learned positions?, embedding norms) read off the base model's children."""
    names = {id(m): n for n, m in base.named_modules()}
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is None or id(emb) not in names or not names[id(emb)]:
        return None
    embeds = {"embed": names[id(emb)]}
    learned = False
    for name, m in base.named_children():
        kind = type(m).__name__.lower()
        # an additive position term: a learned table, or a sinusoidal module (XGLM); rotary ones act inside attention
        if m is not emb and ((isinstance(m, torch.nn.Embedding) and m.embedding_dim == d_model)
                             or ("positional" in kind and "rotary" not in kind)):
            embeds["pos_embed"], learned = name, True
            break
    children = list(base.named_children())
    first_list = next((i for i, (_, m) in enumerate(children) if isinstance(m, torch.nn.ModuleList)), len(children))
    embed_norms = [n for n, m in children[:first_list] if _is_norm(m) and any(h in n for h in _EMBED_NORMS)]
    return embeds, learned, embed_norms


def _final_norm(base: torch.nn.Module, layers: str) -> str | None:
    children = list(base.named_children())
    after = False
    for name, m in children:
        if name == layers.split(".")[0]:
            after = True
        elif after and _is_norm(m):
            return name
    return None


def candidates(model) -> list[Layout]:
    """The layouts that could describe ``model``, most likely first; empty where its structure is
    not a stack of attention + MLP blocks streamtap can read (every one still has to be proven)."""
    base = stack_root(model)   # a multimodal model's text tower, where it has one
    config = getattr(base, "config", None) if base is not getattr(model, "base_model", model) else \
        getattr(model, "config", None)
    s = _sizes(config) if config is not None else None
    if s is None:
        return []
    layers = _blocks(base, s["n_layers"])
    found = _embeddings(model, base, s["d_model"])
    if layers is None or found is None:
        return []
    block = base.get_submodule(layers)[0]
    attn = _attention(block, s)
    if attn is None:
        return []
    if getattr(config, "attn_logit_softcapping", None):   # scores soft-capped (Gemma-2's convention)
        attn["softcap"] = "attn_logit_softcapping"
    mlp = _layers_mlp(base.get_submodule(layers), s, attn["proj"])
    final = _final_norm(base, layers)
    if mlp is None or final is None:
        return []
    embeds, learned, embed_norms = found
    positions = "learned" if learned else (
        "rotary" if any("rotary" in type(m).__name__.lower() for m in model.modules()) else "none")
    options = [[(f"{which}_scale", way) for way in ways] for which, field, ways in MULTIPLIERS
               if getattr(config, field, None) not in (None, 1, 1.0)]
    scalings = [dict(choice) for choice in itertools.product(*options) if len({k for k, _ in choice}) == len(choice)]
    scalings = [s for s in scalings if s] + [{}]
    after = [(Norm(embed_norms[0]),), ()] if embed_norms else [()]
    # a soft-cap on the final logits (Gemma-2's convention), which the self-check applies to the logits it replays
    softcap = "final_logit_softcapping" if getattr(config, "final_logit_softcapping", None) else None
    model_type = getattr(model.config, "model_type", None) or type(model).__name__
    out = []
    for variant in _block_variants(block, attn, mlp):
        for scales in scalings:
            for after_embeds in after:
                out.append(Layout(
                    name=f"inferred:{model_type}", model_types=(model_type,), embeds=embeds, layers=layers,
                    block=variant, resid_final=(final, INPUT), final_norm=final, after_embeds=after_embeds,
                    positions=positions, inferred=True, final_softcap=softcap, **scales,
                ))
    return out


# -- the declaration, as text (store attribute, warning, docs) -----------------------------------------
def _source(value) -> str:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        parts = []
        for f in dataclasses.fields(value):
            v = getattr(value, f.name)
            if f.name in ("inferred",) or (f.default is not dataclasses.MISSING and v == f.default):
                continue
            if f.name in ("proj", "term", "path") and f.default is dataclasses.MISSING:
                parts.append(_source(v))
            else:
                parts.append(f"{f.name}={_source(v)}")
        return f"{type(value).__name__}({', '.join(parts)})"
    if isinstance(value, tuple):
        return "(" + ", ".join(_source(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k!r}: {_source(v)}" for k, v in value.items()) + "}"
    if callable(value) and hasattr(value, "__name__"):
        return value.__name__
    return repr(value)


def declaration(layout: Layout, config=None) -> str:
    """The layout as the Python declaration a family file would hold (with the multipliers' values
    on ``config`` noted), so a user can read what was inferred and copy it into a file of their own."""
    text = _source(layout)
    if config is not None:
        values = {w: layout.multiplier(w, config) for w in ("embed", "residual", "logit")}
        noted = ", ".join(f"{w} x{v:g}" for w, v in values.items() if v != 1.0)
        if noted:
            text += f"  # multipliers on this config: {noted}"
    return text


__all__ = ["candidates", "declaration", "attention_readings", "MULTIPLIERS"]


def attention_readings(attn: Attn, positions: str) -> list[Attn]:
    """The readings of an inferred attention the self-check tries to prove, most likely first: a
    fused projection's two layouts and, where positions are rotary, the rotation styles and the
    order of the (cos, sin) pair. Each is used only once the patterns it gives equal the model's."""
    splits = (attn.split, *(s for s in ("concat", "per_group") if s != attn.split)) if attn.qkv else (attn.split,)
    styles = ("half", "interleaved", "interleaved_repeated") if positions == "rotary" else (attn.rotary,)
    orders = ("cos_sin", "sin_cos") if positions == "rotary" else (attn.rotary_order,)
    return [dataclasses.replace(attn, split=split, rotary=style, rotary_order=order)
            for split in splits for style in styles for order in orders]
