"""streamtap: every head's message and every MLP's output as additive residual terms, in Zarr.

    with streamtap.tap(model, "run.zarr", tokenizer=tok):
        model(**batch)
    ds = streamtap.open("run.zarr")
    streamtap.verify(ds)
"""

__version__ = "0.1.0"

from .errors import (  # noqa: E402
    DecompositionError,
    InputError,
    NonFiniteError,
    StoreExistsError,
    StoreMismatchError,
    StreamtapError,
    UnsupportedArchitectureError,
)
from .capture import Tap, capture, tap  # noqa: E402
from .dataset import open  # noqa: E402,A001
from .decompose import decompose, verify, tolerance  # noqa: E402
from . import analysis, layouts  # noqa: E402

__all__ = [
    "__version__", "tap", "capture", "open", "decompose", "verify", "tolerance", "Tap",
    "analysis", "layouts",
    "StreamtapError", "DecompositionError", "InputError", "NonFiniteError", "StoreExistsError",
    "StoreMismatchError", "UnsupportedArchitectureError",
]
