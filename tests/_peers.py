"""Peer implementations used as independent references in the tests.

``tl_head_results`` computes each attention head's result (``z[l, h] @ W_O[l, h]``, without the
output bias ``b_O``) with TransformerLens 4.x (``TransformerBridge``), for the same weights and
input as a given Hugging Face model: from the bridge's ``blocks.{l}.attn.hook_result``
(``source="hook_result"``, needs ``set_use_attn_result(True)``, which TransformerLens 4.3 refuses
with ``NotImplementedError`` for architectures whose attention is a plain ``AttentionBridge``:
GPT-Neo, GPT-J, OPT, BERT, RoBERTa), or from TransformerLens's own fallback
``ActivationCache.compute_head_results()``, i.e. the cached ``hook_z`` times the bridge's ``W_O``
(``source="hook_z"``, works for those too). ``tl_run_with_cache`` gives the bridge and the whole
``ActivationCache`` for checks beyond per-head results (``decompose_resid``, ``hook_attn_out``).

None of it touches the Hugging Face hub: the bridge is booted from a deep copy of the model that is
already in memory, with a tiny offline tokenizer (the bridge only needs one to exist; the inputs
are token ids).

The bridge runs in its default mode (raw Hugging Face weights, no ``enable_compatibility_mode``):
compatibility mode folds layer norms, centres the writing weights and folds the value biases into
``b_O``, each of which changes what a single head's result is. In raw mode ``z`` includes the value
bias, exactly as the output projection sees it.
"""
from __future__ import annotations

import copy
import warnings
from typing import Any

import numpy as np

__all__ = [
    "tl_available", "tl_bridge", "tl_head_results", "tl_run_with_cache", "tl_stack_head_results",
]


def tl_available() -> bool:
    """True when TransformerLens 4.x (with ``TransformerBridge``) can be imported."""
    try:
        from transformer_lens.model_bridge import TransformerBridge  # noqa: F401
    except Exception:
        return False
    return True


def _offline_tokenizer(vocab_size: int) -> Any:
    """A word-level fast tokenizer over ``vocab_size`` dummy tokens, built without any download.

    It deliberately has no BOS token: with one, TransformerLens's ``get_tokenizer_with_bos``
    re-loads the tokenizer by name through ``AutoTokenizer.from_pretrained`` (a hub call).
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(vocab_size)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="t0", pad_token="t0", eos_token="t0"
    )


def tl_bridge(hf_model: Any, *, attn_result: bool = True) -> Any:
    """Boot a ``TransformerBridge`` around a deep copy of ``hf_model``; per-head results on by default.

    The copy matters: the bridge replaces the wrapped model's submodules and switches it to eager
    attention in place. With ``attn_result=True`` this raises TransformerLens's
    ``NotImplementedError`` for architectures whose bridge cannot fire ``hook_result``.
    """
    import torch
    from transformer_lens.model_bridge import TransformerBridge

    model = copy.deepcopy(hf_model).eval()
    # Freshly built models have ``config.architectures = None``; name the class explicitly so the
    # adapter lookup does not depend on the model_type fallback table.
    model.config.architectures = [type(hf_model).__name__]
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    vocab_size = int(getattr(model.config, "vocab_size", 0) or 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bridge = TransformerBridge.boot_transformers(
            f"streamtap-peer/{type(hf_model).__name__}",  # only used for alias lookup; no hub
            hf_model=model,
            tokenizer=_offline_tokenizer(vocab_size),
            device=str(device),
        )
        if attn_result:
            bridge.set_use_attn_result(True)
    bridge.eval()
    return bridge


def tl_run_with_cache(
    hf_model: Any,
    input_ids: Any,
    attention_mask: Any = None,
    *,
    names_filter: Any = None,
    attn_result: bool = False,
    bridge: Any = None,
) -> tuple[Any, Any]:
    """``(bridge, cache)``: TransformerLens's ``run_with_cache`` on the same weights and inputs.

    ``names_filter`` is passed through (``None`` caches every hook); ``bridge`` reuses one booted by
    :func:`tl_bridge` instead of booting a new one (with ``attn_result`` as asked).
    """
    import torch

    if bridge is None:
        bridge = tl_bridge(hf_model, attn_result=attn_result)
    device = next(bridge.original_model.parameters()).device
    ids = torch.as_tensor(np.asarray(input_ids), dtype=torch.long, device=device)
    if ids.ndim == 1:
        ids = ids[None]
    kwargs: dict[str, Any] = {}
    if attention_mask is not None:
        mask = torch.as_tensor(np.asarray(attention_mask), dtype=torch.long, device=device)
        kwargs["attention_mask"] = mask.reshape(ids.shape)
    with torch.no_grad():
        _, cache = bridge.run_with_cache(ids, names_filter=names_filter, return_type=None, **kwargs)
    return bridge, cache


def tl_stack_head_results(cache: Any) -> np.ndarray:
    """Per-head results from a TransformerLens cache, (batch, pos, layer, head, d_model), float64.

    Layers whose ``hook_result`` is not in the cache are filled by TransformerLens's own
    ``compute_head_results`` (cached ``hook_z`` times ``blocks[l].attn.W_O``).
    """
    import torch

    n_layers = int(cache.model.cfg.n_layers)
    names = [f"blocks.{layer}.attn.hook_result" for layer in range(n_layers)]
    if any(name not in cache.cache_dict for name in names):
        with torch.no_grad():
            cache.compute_head_results()
    per_layer = [cache[name].detach().to("cpu", torch.float64) for name in names]
    return torch.stack(per_layer, dim=2).numpy()


def tl_head_results(
    hf_model: Any, input_ids: Any, attention_mask: Any = None, *, source: str = "hook_result"
) -> np.ndarray:
    """Per-head attention results from TransformerLens, shape (batch, pos, layer, head, d_model).

    With ``source="hook_result"`` (default) each entry is TransformerLens's
    ``blocks.{l}.attn.hook_result`` (``z @ W_O[h]``, excluding ``b_O``); with ``source="hook_z"``
    it is ``compute_head_results()`` on a cache of ``blocks.{l}.attn.hook_z`` only (the same
    quantity, for bridges that cannot fire ``hook_result``). Computed on the same weights and
    inputs as ``hf_model``; float64. Positions where ``attention_mask`` is 0 hold whatever the model
    computes there and should not be compared.
    """
    if source not in ("hook_result", "hook_z"):
        raise ValueError(f"source must be 'hook_result' or 'hook_z', not {source!r}")
    bridge = tl_bridge(hf_model, attn_result=source == "hook_result")
    n_layers = int(bridge.cfg.n_layers)
    hook = "hook_result" if source == "hook_result" else "hook_z"
    names = [f"blocks.{layer}.attn.{hook}" for layer in range(n_layers)]
    _, cache = tl_run_with_cache(hf_model, input_ids, attention_mask, names_filter=names, bridge=bridge)
    return tl_stack_head_results(cache)
