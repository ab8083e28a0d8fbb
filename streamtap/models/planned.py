"""Configs of models that are planned for, not loaded: a ``config.json``, or a known id offline.

``streamtap plan --config`` builds such a model on the meta device (no weights, no memory) so that the
layout binds and the store's shapes follow; nothing here is downloaded.
"""

from __future__ import annotations

import json
import os

# the published configs of models people plan corpus-scale captures of (values as released)
KNOWN_CONFIGS: dict[str, dict] = {
    "llama-3-8b": {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "vocab_size": 128256, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "hidden_act": "silu", "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    },
}
KNOWN_CONFIGS["meta-llama/Meta-Llama-3-8B"] = KNOWN_CONFIGS["llama-3-8b"]
KNOWN_CONFIGS["meta-llama/Llama-3.1-8B"] = {**KNOWN_CONFIGS["llama-3-8b"], "max_position_embeddings": 131072}


def planned_config(name_or_path: str):
    """A transformers config from a known id, a ``config.json`` or a directory holding one.

    Raises ``InputError`` naming the known ids when it is none of these.
    """
    from transformers import AutoConfig

    from ..errors import InputError

    if name_or_path in KNOWN_CONFIGS:
        values = dict(KNOWN_CONFIGS[name_or_path])
    else:
        path = os.path.join(name_or_path, "config.json") if os.path.isdir(name_or_path) else name_or_path
        if not os.path.isfile(path):
            raise InputError(f"--config {name_or_path!r} is neither a config.json (or a directory with one) nor a "
                             f"known id ({', '.join(sorted(KNOWN_CONFIGS))})")
        with open(path, encoding="utf-8") as f:
            values = json.load(f)
    model_type = values.pop("model_type", None)
    if not model_type:
        raise InputError(f"the config {name_or_path!r} names no model_type; give the model's own config.json")
    return AutoConfig.for_model(model_type, **values)


def meta_model(config):
    """The model of ``config`` on the meta device: every module and shape, no weights."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return model.eval()


__all__ = ["KNOWN_CONFIGS", "planned_config", "meta_model"]
