"""Tiny random models of every architecture streamtap supports, built from ``transformers`` configs.

Every layout must be checked against the real ``transformers`` modelling code, offline and in
seconds, so these are the library's own classes with tiny configs.
"""

from __future__ import annotations

from .base import UnknownModelError, resolve_dtype

TINY_ARCHS = (
    "gpt2", "gpt_neo", "gpt_bigcode", "llama", "llama-bias", "mistral", "qwen2", "qwen3", "gemma",
    "stablelm", "stablelm-parallel", "olmo", "opt", "bloom", "bloom-post-ln-residual", "gptj",
    "gpt_neox", "gpt_neox-sequential", "phi", "falcon", "falcon-new", "gemma2", "gemma3", "olmo2",
    "opt-post-ln", "bert", "roberta", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "gpt_oss", "deepseek_v2",
    "deepseek_v3", "granite", "cohere", "cohere2", "phi3", "starcoder2", "smollm3", "phimoe", "ernie4_5_moe",
    "glm4_moe", "dots1", "hunyuan_v1_moe", "flex_olmo", "granitemoe",
)
"""Architectures :func:`tiny_model` builds; each maps to one layout streamtap supports."""


def tiny_model(arch: str, *, dtype="float32", seed: int = 0, attn_implementation: str = "eager",
               **config_overrides):
    """A tiny randomly initialised model of architecture ``arch`` (eval mode), for tests.

    Why: every layout must be checked against the real ``transformers`` modelling code, offline and
    in seconds, so these are the library's own classes with tiny configs (2 layers, d_model 64,
    4 heads of 16, vocabulary 128, 64 positions; the Llama family with 2 key/value heads, i.e.
    grouped-query attention). A causal LM, except ``bert`` and ``roberta`` (masked LMs).

    The weights are deliberately not the library's default initialisation: ``initializer_range`` is
    0.2 (default 0.02) so that every term is of a size that an error would show in, every bias is
    filled with random values (default init zeroes them, and a zero bias cannot catch a bias term
    that is dropped or counted twice), and norm weights are ``1 + 0.2 * noise`` (default ones) for the
    same reason. Weights are made in float32 with a private generator seeded by ``seed`` (the global
    torch RNG is left untouched) and then cast to ``dtype``, so the same seed gives the same model,
    rounded, in every precision.

    Parameters
    ----------
    arch : str
        One of :data:`TINY_ARCHS`.
    dtype : str or torch.dtype
        ``"float32"``, ``"bfloat16"`` or ``"float16"`` (or the ``torch.dtype``).
    seed : int
        Seeds the weights; the same seed gives the same model.
    attn_implementation : str
        Passed to ``from_config`` (``"eager"``, ``"sdpa"``, ...).
    **config_overrides
        Any field of the architecture's config, e.g. ``num_hidden_layers=4``.

    Returns
    -------
    transformers.PreTrainedModel
        In eval mode, in ``dtype``.

    Raises
    ------
    UnknownModelError
        An ``arch`` not in :data:`TINY_ARCHS`, or an unsupported ``dtype``.
    """
    if arch not in _TINY_CONFIGS:
        raise UnknownModelError(f"unknown tiny architecture {arch!r}; known: {', '.join(TINY_ARCHS)}")
    from transformers import AutoModelForCausalLM

    import torch

    torch_dtype = resolve_dtype(dtype)

    config_cls, fields, *auto = _TINY_CONFIGS[arch]()
    fields = {**fields, "initializer_range": 0.2, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
              **config_overrides}
    config = config_cls(**fields)
    auto_cls = auto[0] if auto else AutoModelForCausalLM
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = auto_cls.from_config(config, attn_implementation=attn_implementation)
        generator = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.rsplit(".", 1)[-1] == "bias":
                    param.copy_(0.2 * torch.randn(param.shape, generator=generator))
            for module in model.modules():  # LayerNorm, LlamaRMSNorm, Qwen2RMSNorm, ...
                weight = getattr(module, "weight", None)
                if "norm" in type(module).__name__.lower() and isinstance(weight, torch.nn.Parameter):
                    weight.copy_(1.0 + 0.2 * torch.randn(weight.shape, generator=generator))
    return model.to(torch_dtype).eval()


# -- tiny configs ----------------------------------------------------------------------------------
def _gpt2():
    from transformers import GPT2Config

    return GPT2Config, dict(vocab_size=128, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


def _llama_fields(**extra):
    """The Llama family's tiny config fields (grouped-query attention, 2 kv heads)."""
    return dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, **extra)


def _llama():
    from transformers import LlamaConfig

    return LlamaConfig, _llama_fields()


def _llama_bias():
    from transformers import LlamaConfig

    return LlamaConfig, _llama_fields(attention_bias=True, mlp_bias=True)


def _mistral():
    from transformers import MistralConfig

    return MistralConfig, _llama_fields(sliding_window=None)


def _qwen2():
    from transformers import Qwen2Config

    return Qwen2Config, _llama_fields(use_sliding_window=False)


def _named(config_name: str, **fields):
    """A config maker for ``transformers.<config_name>``, looked up when the model is built."""
    import transformers

    return lambda: (getattr(transformers, config_name), fields)


def _masked_lm(config_name: str, **fields):
    """As ``_named``, built with ``AutoModelForMaskedLM``."""
    import transformers

    return lambda: (getattr(transformers, config_name), fields, transformers.AutoModelForMaskedLM)


_MHA = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=64)
_GQA = {**_MHA, "num_key_value_heads": 2}

_TINY_CONFIGS = {
    "gpt2": _gpt2, "llama": _llama, "llama-bias": _llama_bias, "mistral": _mistral, "qwen2": _qwen2,
    "gpt_neo": _named("GPTNeoConfig", vocab_size=128, hidden_size=64, num_layers=2, num_heads=4,
                      intermediate_size=128, max_position_embeddings=64,
                      attention_types=[[["global", "local"], 1]], window_size=4),
    "gpt_bigcode": _named("GPTBigCodeConfig", vocab_size=128, n_embd=64, n_layer=2, n_head=4,
                          n_positions=64, multi_query=True),
    "qwen3": _named("Qwen3Config", **_GQA, head_dim=16),
    "gemma": _named("GemmaConfig", **{**_GQA, "num_key_value_heads": 1}, head_dim=32),
    "stablelm": _named("StableLmConfig", **_GQA),
    "stablelm-parallel": _named("StableLmConfig", **_GQA, use_parallel_residual=True),
    "olmo": _named("OlmoConfig", **_MHA),
    "opt": _named("OPTConfig", vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  ffn_dim=128, max_position_embeddings=64, word_embed_proj_dim=32, do_layer_norm_before=True),
    "opt-post-ln": _named("OPTConfig", vocab_size=128, hidden_size=64, num_hidden_layers=2,
                          num_attention_heads=4, ffn_dim=128, max_position_embeddings=64,
                          word_embed_proj_dim=32, do_layer_norm_before=False),
    "bloom": _named("BloomConfig", vocab_size=128, hidden_size=64, n_layer=2, n_head=4),
    "bloom-post-ln-residual": _named("BloomConfig", vocab_size=128, hidden_size=64, n_layer=2, n_head=4,
                                     apply_residual_connection_post_layernorm=True),
    "gptj": _named("GPTJConfig", vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64, rotary_dim=8),
    "gpt_neox": _named("GPTNeoXConfig", **_MHA, use_parallel_residual=True),
    "gpt_neox-sequential": _named("GPTNeoXConfig", **_MHA, use_parallel_residual=False),
    "phi": _named("PhiConfig", **_MHA),
    "falcon": _named("FalconConfig", vocab_size=128, hidden_size=64, num_hidden_layers=2,
                     num_attention_heads=4, new_decoder_architecture=False, parallel_attn=True, bias=True),
    "falcon-new": _named("FalconConfig", vocab_size=128, hidden_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_kv_heads=2, new_decoder_architecture=True),
    "gemma2": _named("Gemma2Config", **_GQA, head_dim=16),
    "gemma3": _named("Gemma3TextConfig", **_GQA, head_dim=16),
    "olmo2": _named("Olmo2Config", **_MHA),
    "bert": _masked_lm("BertConfig", **_MHA),
    "roberta": _masked_lm("RobertaConfig", **{**_MHA, "max_position_embeddings": 72}),
    "mixtral": _named("MixtralConfig", **_GQA, num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": _named("Qwen2MoeConfig", **_GQA, num_experts=4, num_experts_per_tok=2,
                        moe_intermediate_size=32, shared_expert_intermediate_size=64),
    # layer 0 dense (mlp_only_layers): a mixture whose block differs by layer
    "qwen3_moe": _named("Qwen3MoeConfig", **_GQA, head_dim=16, num_experts=4, num_experts_per_tok=2,
                        moe_intermediate_size=32, mlp_only_layers=[0]),
    "olmoe": _named("OlmoeConfig", **_GQA, num_experts=4, num_experts_per_tok=2),
    # one sliding and one full layer, learned sinks, biased experts
    "gpt_oss": _named("GptOssConfig", **_GQA, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
                      sliding_window=4, layer_types=["sliding_attention", "full_attention"]),
    # multi-head latent attention; layer 0 dense (first_k_dense_replace), shared + routed experts after
    "deepseek_v2": _named("DeepseekV2Config", **_MHA, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8,
                          qk_nope_head_dim=8, v_head_dim=12, n_routed_experts=4, num_experts_per_tok=2,
                          n_shared_experts=1, moe_intermediate_size=32, first_k_dense_replace=1),
    "deepseek_v3": _named("DeepseekV3Config", **_MHA, num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8,
                          qk_nope_head_dim=8, v_head_dim=12, n_routed_experts=4, num_experts_per_tok=2,
                          n_shared_experts=1, moe_intermediate_size=32, first_k_dense_replace=1,
                          n_group=2, topk_group=1),
    "granite": _named("GraniteConfig", **_GQA, embedding_multiplier=3.0, residual_multiplier=0.5,
                      attention_multiplier=0.1, logits_scaling=4.0),
    "cohere": _named("CohereConfig", **_GQA, logit_scale=0.25),
    "cohere2": _named("Cohere2Config", **_GQA, logit_scale=0.25, sliding_window=4,
                      layer_types=["sliding_attention", "sliding_attention"]),
    "phi3": _named("Phi3Config", **_GQA),
    "starcoder2": _named("Starcoder2Config", **_GQA, sliding_window=None),
    # layer 1 is a no-rope layer (no_rope_layers: 1 rotates, 0 does not)
    "smollm3": _named("SmolLM3Config", **_GQA, head_dim=16, no_rope_layers=[1, 0]),
    "phimoe": _named("PhimoeConfig", **_GQA, num_local_experts=4, num_experts_per_tok=2),
    # layer 0 dense, shared + routed experts after; interleaved rotary from full-width tables
    "ernie4_5_moe": _named("Ernie4_5_MoeConfig", **_GQA, moe_num_experts=4, moe_k=2, moe_intermediate_size=32,
                           moe_num_shared_experts=1, moe_layer_start_index=1),
    # partial rotary (half the head), q/k norms, layer 0 dense
    "glm4_moe": _named("Glm4MoeConfig", **_GQA, head_dim=16, n_routed_experts=4, num_experts_per_tok=2,
                       n_shared_experts=1, moe_intermediate_size=32, first_k_dense_replace=1, use_qk_norm=True),
    "dots1": _named("Dots1Config", **_GQA, head_dim=16, n_routed_experts=4, num_experts_per_tok=2,
                    n_shared_experts=1, moe_intermediate_size=32, first_k_dense_replace=1),
    "hunyuan_v1_moe": _named("HunYuanMoEV1Config", **_GQA, head_dim=16, num_experts=4, moe_topk=2),
    "flex_olmo": _named("FlexOlmoConfig", **_GQA, num_experts=4, num_experts_per_tok=2),
    # Granite's multipliers on a mixture: every routed expert's share is scaled as it is written
    "granitemoe": _named("GraniteMoeConfig", **_GQA, embedding_multiplier=3.0, residual_multiplier=0.5,
                         attention_multiplier=0.1, logits_scaling=4.0, num_local_experts=4, num_experts_per_tok=2),
}
assert set(_TINY_CONFIGS) == set(TINY_ARCHS)


__all__ = ["TINY_ARCHS", "tiny_model"]
