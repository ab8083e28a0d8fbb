"""Loading models: the embedded default (SmolLM2-135M-Instruct), any local or hub model, tiny test models.

    model, tok = load_model()                      # SmolLM2-135M-Instruct, converted once, then cached
    model, tok = load_model("path/to/model_dir")   # or a Hugging Face id already on disk
    model = tiny_model("llama")                    # a random 2-layer model for tests, built offline

``smollm2`` fetches and converts the default once (``smollm2_dir``); ``tiny`` holds the tiny configs.
"""

from __future__ import annotations

import os

from ..errors import StreamtapError
from .base import MissingDependencyError, ModelLoadError, UnknownModelError, dtype_kwarg, resolve_dtype
from .smollm2 import DEFAULT_MODEL, SMOLLM2_NAMES, smollm2_dir
from .tiny import TINY_ARCHS, tiny_model

__all__ = [
    "DEFAULT_MODEL", "TINY_ARCHS", "load_model", "smollm2_dir", "tiny_model",
    "ModelLoadError", "MissingDependencyError", "UnknownModelError",
]

# -- public API ------------------------------------------------------------------------------------
def load_model(name_or_dir: str = DEFAULT_MODEL, dtype="float32", *, trust_remote_code: bool = False,
               attn_implementation: str | None = None):
    """``(model, tokenizer)`` for a name streamtap knows, a model directory, or a Hugging Face id.

    Anything but the default goes to ``AutoModelForCausalLM`` / ``AutoTokenizer.from_pretrained``
    unchanged, so a local directory or a hub id already in the local Hugging Face cache works as it
    would in the user's own code.

    Parameters
    ----------
    name_or_dir : str or os.PathLike
        ``"smollm2"`` (the default; also ``"smollm2-135m-instruct"``, in any case) is
        SmolLM2-135M-Instruct from the cached conversion of :func:`smollm2_dir` (made on first
        use); anything else is a model directory or a hub id.
    dtype : str or torch.dtype
        ``"float32"``, ``"bfloat16"``, ``"float16"`` or a ``torch.dtype``: the precision the model
        runs in, which is also the precision a capture stores.
    trust_remote_code : bool
        Passed only when asked for, because it runs code from the model repository.
    attn_implementation : str, optional
        ``"eager"``, ``"sdpa"``, ...: passed through when given; the terms are the same either way
        (eager is slower).

    Returns
    -------
    model : transformers.PreTrainedModel
        In eval mode (dropout off: captures must be of the model's inference).
    tokenizer : transformers tokenizer
        A tokenizer without a pad token gets its eos token as pad token, because batching needs one
        and streamtap drops padding anyway; its ``padding_side`` is left as the tokenizer has it.

    Raises
    ------
    ModelLoadError
        The model or tokenizer cannot be found or read (``from_pretrained`` raised ``OSError``), or
        the default cannot be fetched or converted.
    UnknownModelError
        An unsupported ``dtype``.
    MissingDependencyError
        Converting the default model needs the ``gguf`` package and it is not installed.
    """
    torch_dtype = resolve_dtype(dtype)
    if isinstance(name_or_dir, os.PathLike):
        name_or_dir = os.fspath(name_or_dir)
    source = str(smollm2_dir()) if name_or_dir.lower() in SMOLLM2_NAMES else name_or_dir
    local = os.path.isdir(source)
    if local:
        _check_model_dir(source)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    # always explicit: code from a model repository runs only when the caller asked for it
    kwargs = {dtype_kwarg(): torch_dtype, "trust_remote_code": bool(trust_remote_code)}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    offline = not local and not hub_reachable()
    if offline:  # the local cache only: an unreachable hub would be retried for a minute first
        kwargs["local_files_only"] = True
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=bool(trust_remote_code),
                                                  local_files_only=offline)
    except (OSError, ValueError) as exc:
        if isinstance(exc, StreamtapError):
            raise
        where = ("the Hugging Face hub cannot be reached, and it is not in the local cache" if offline
                 else "and not a Hugging Face id that is in the local cache or reachable")
        raise ModelLoadError(
            f"could not load model {name_or_dir!r}: it is not {DEFAULT_MODEL!r}, not a model directory, "
            f"{where} ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    model.eval()
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _check_model_dir(path: str) -> None:
    """A directory given as a model must be one ``save_pretrained`` wrote: a config with a model_type."""
    import json

    config = os.path.join(path, "config.json")
    if not os.path.isfile(config):
        raise ModelLoadError(f"{path} is a directory but not a model directory: it has no config.json. Give the "
                             "directory that save_pretrained (or a hub download) made: config.json, weights, tokenizer")
    try:
        with open(config, encoding="utf-8") as f:
            model_type = json.load(f).get("model_type")
    except (OSError, ValueError, AttributeError) as exc:
        raise ModelLoadError(f"{config} cannot be read as a model config ({type(exc).__name__}: {exc})") from None
    if not model_type:
        raise ModelLoadError(f"{config} has no model_type, so transformers cannot tell which model it describes; "
                             "give the directory of a transformers model")


def hub_reachable(timeout: float = 2.0) -> bool:
    """Whether the Hugging Face hub can be reached now (False at once under ``HF_HUB_OFFLINE``)."""
    import socket
    from urllib.parse import urlparse

    from ..options import Settings

    settings = Settings.from_environ()
    if settings.hub_offline:
        return False
    endpoint = urlparse(settings.hub_endpoint)
    try:
        with socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=timeout):
            return True
    except OSError:
        return False
