"""What loading models shares: its errors (each says what to install or pass) and dtype handling."""

from __future__ import annotations

from ..errors import StreamtapError

DTYPES = ("float32", "bfloat16", "float16")   # the precisions streamtap runs and stores models in


class ModelLoadError(StreamtapError, OSError):
    """A model could not be loaded or the default model could not be fetched or converted.

    An ``OSError`` too, because that is what ``from_pretrained`` raises for a missing model and what
    callers already catch.
    """


class MissingDependencyError(StreamtapError, ImportError):
    """An optional package that this step needs is not installed; the message says what to install."""


class UnknownModelError(StreamtapError, ValueError):
    """A name streamtap does not know (a tiny architecture, a dtype); the message lists the known ones."""


def resolve_dtype(dtype):
    """A ``torch.dtype`` from a name or a dtype; only the three precisions streamtap stores.

    Parameters
    ----------
    dtype : str or torch.dtype
        ``"float32"``, ``"bfloat16"``, ``"float16"`` (a ``"torch."`` prefix is allowed) or the
        matching ``torch.dtype``.

    Returns
    -------
    torch.dtype

    Raises
    ------
    UnknownModelError
        Any other dtype.
    """
    import torch

    if isinstance(dtype, torch.dtype):
        if str(dtype).removeprefix("torch.") in DTYPES:
            return dtype
    elif isinstance(dtype, str) and dtype.removeprefix("torch.") in DTYPES:
        return getattr(torch, dtype.removeprefix("torch."))
    raise UnknownModelError(f"unsupported dtype {dtype!r}; use one of {', '.join(DTYPES)} or a torch dtype")


def dtype_kwarg() -> str:
    """``from_pretrained``'s precision argument: ``dtype`` since transformers 4.56, ``torch_dtype`` before."""
    import transformers
    from packaging.version import Version

    return "dtype" if Version(transformers.__version__).release >= (4, 56) else "torch_dtype"
