"""Architecture knowledge, one small declarative file per family.

Adding a model is adding a file: declare a ``LAYOUT = Layout(...)`` in a module here and list the
module in ``_FAMILIES``. Nothing outside this package branches on an architecture's name.
"""

from __future__ import annotations

from importlib import import_module

from ..errors import UnsupportedArchitectureError
from .base import INPUT, OUTPUT, BoundLayout, Layout, bind, in_out_weight

_FAMILIES = ("gpt2", "llama")

GUIDE = "docs/layouts.md"

LAYOUTS: dict[str, Layout] = {}
for _family in _FAMILIES:
    _layout = import_module(f"{__name__}.{_family}").LAYOUT
    LAYOUTS[_layout.name] = _layout


def supported_model_types() -> list[str]:
    return sorted(t for layout in LAYOUTS.values() for t in layout.model_types)


def register(layout: Layout) -> Layout:
    """Add a layout at run time (for a family outside this package)."""
    LAYOUTS[layout.name] = layout
    return layout


def layout_for(model) -> Layout:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for layout in LAYOUTS.values():
        if model_type in layout.model_types:
            return layout
    raise UnsupportedArchitectureError(
        f"streamtap has no layout for model_type {model_type!r} ({type(model).__name__}). "
        f"Supported model types: {', '.join(supported_model_types())}. "
        f"To add one, write a few-line Layout declaring where its terms live (see {GUIDE}) "
        "and register it with streamtap.layouts.register(...)."
    )


__all__ = ["INPUT", "OUTPUT", "BoundLayout", "Layout", "LAYOUTS", "bind", "in_out_weight",
           "layout_for", "register", "supported_model_types"]
