"""streamtap: every head's output and every MLP's output as additive residual terms, in Zarr.

    with streamtap.tap(model, "run.zarr", tokenizer=tok):
        model(**batch)
    ds = streamtap.open("run.zarr")
    streamtap.verify(ds)

Names are imported on first use, because the pytest plugin loads this package in every pytest run of
an environment that has streamtap installed and torch, xarray and dask cost seconds to import.
Importing streamtap changes nothing in the process: no environment variable, allocator setting or
warning filter.
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "tap": "tapping", "capture": "tapping", "Tap": "tapping", "induction_probe": "tapping",
    "open": "dataset", "plan": "planning",
    "effects": "tapping.effects", "Ablate": "tapping.effects", "DropSources": "tapping.effects",
    "RankReduce": "tapping.effects",
    "decompose": "invariant", "verify": "invariant", "tolerance": "invariant",
    "CaptureOptions": "options", "CorpusOptions": "options",
    "StreamtapError": "errors", "DecompositionError": "errors", "InputError": "errors", "OptionError": "errors",
    "NonFiniteError": "errors", "StoreExistsError": "errors", "StoreDamagedError": "errors", "StoreAccessError": "errors", "StoreMismatchError": "errors", "LayoutError": "errors",
    "UnsupportedArchitectureError": "errors", "StoreLockedError": "errors", "StoreFullError": "errors",
}
# no submodule shares a name with an exported function: importing a submodule rebinds the package
# attribute of its name, which would shadow the function
_SUBMODULES = {"analysis", "layouts", "models", "testing", "tapping", "dataset", "invariant", "io", "errors",
               "options", "stream", "report"}
_ALIASES = {"remote": "tapping.remote"}

__all__ = ["__version__", *_EXPORTS, "analysis", "layouts", "models", "testing", "remote", "report"]


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    elif name in _SUBMODULES:
        value = import_module(f".{name}", __name__)
    elif name in _ALIASES:
        value = import_module(f".{_ALIASES[name]}", __name__)
    else:
        raise AttributeError(f"module 'streamtap' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted(__all__)
