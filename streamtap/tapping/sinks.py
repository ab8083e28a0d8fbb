"""nnsight, and nothing else that touches it: each term copied out of the forward the moment the
model produces it.

nnsight's cache keeps every value it records until the trace ends, so a forward that cached every
layer's z and MLP output would hold a whole batch of terms on top of the model's own activations
(docs/benchmarks.md, "Memory"). So a sink is an nnsight cache (registered on the trace's mediator the way ``tracer.cache()`` is,
fed by the interleaver's observer route after any intervention) that writes each routed value's
real tokens into its slot of the batch's buffer and keeps no reference: the activation is freed
when the model frees it, as in a plain forward. A value the model later changes in place is copied
before it changes. Values a term needs whole (a mixture-of-experts layer's routing inputs, a
self-check's block inputs) are kept as nnsight's cache keeps them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from nnsight.intervention.cache import Cache, CacheView

from ..errors import LayoutError

# where a value comes from: (nnsight module path, "inputs" or "output"), nnsight's slot names
Where = tuple[str, str]


def unwrap(model) -> tuple[torch.nn.Module, Any]:
    """(the torch module, the nnsight envoy if one was given)."""
    from nnsight.intervention.envoy import Envoy

    if isinstance(model, Envoy):
        return model._module, model
    if isinstance(model, torch.nn.Module):
        return model, None
    raise TypeError(f"expected a transformers model or an nnsight envoy, got {type(model).__name__}")


def envoy_for(module: torch.nn.Module):
    """An nnsight envoy over ``module`` (its controller becomes the module's forward)."""
    import warnings

    import nnsight

    with warnings.catch_warnings():
        # BERT-style blocks have a child named ``output``; nnsight renames its envoy and says so,
        # which matters to attribute navigation only, and the tap addresses modules by path
        warnings.filterwarnings("ignore", message=".*has a submodule named 'output'")
        return nnsight.NNsight(module)


def location(path: str, side: str) -> Where:
    """A layout tap's (path below the model, "input" or "output") as nnsight names it."""
    return (f"model.{path}" if path else "model", "inputs" if side == "input" else "output")


@dataclass(frozen=True)
class Route:
    """Where one module value goes: variable ``var``, at ``layer`` along its second axis (None: a
    variable without one), with its last axis split into ``tail`` (z: heads x d_head), after
    ``transform`` (a norm's input becomes its frozen scale). ``flat``: the module sees the batch's
    tokens flattened into one axis (the layout says so)."""

    var: str
    layer: int | None = None
    layers: int = 0
    tail: tuple[int, ...] | None = None
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None
    flat: bool = False
    pick: Callable[[Any], torch.Tensor] | None = None   # the tensor of the value, where not its first
    finite: bool = False   # which real tokens hold non-finite values, also those a cut leaves out (on the CPU)


def first_tensor(value: Any, slot: str) -> torch.Tensor:
    """The tensor a route reads: a module's first input, or the first element of a tuple output."""
    if slot == "inputs":
        args, kwargs = value
        value = args[0] if args else next(iter(kwargs.values()))
    if isinstance(value, (tuple, list)):
        value = value[0]
    return value


def argument(module: torch.nn.Module, value: Any, name: str):
    """A module input's argument ``name`` (keyword or positional), from nnsight's (args, kwargs)."""
    import inspect

    args, kwargs = value
    if name in kwargs:
        return kwargs[name]
    params = [p for p in inspect.signature(type(module).forward).parameters if p != "self"]
    return args[params.index(name)]


def token_rows(value: torch.Tensor, mask: torch.Tensor, flat: bool = False) -> torch.Tensor:
    """``value`` as (batch x position, ...) rows in the mask's order."""
    if flat:
        return value.reshape(mask.numel(), *value.shape[1:])
    if value.dim() == mask.dim() and value.shape != mask.shape and value.shape[0] == mask.shape[1]:
        value = value.unsqueeze(0)   # a (position, d) table of positions, without a batch axis (Pegasus, Marian)
    if value.shape[0] != mask.shape[0]:  # position embeddings broadcast over the batch
        value = value.expand(mask.shape[0], *value.shape[1:])
    return value.reshape(mask.numel(), *value.shape[2:])


def kept_mask(mask: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The (batch, seq) mask of the real tokens that ``keep`` (a boolean per real token, in mask order) keeps."""
    kept = torch.zeros_like(mask)
    kept[mask] = keep
    return kept


class TermSlots:
    """One forward's destinations: the routed values' real tokens, written into buffers that
    ``make(name, shape, dtype, device)`` hands out (the batch's reused host buffers on the CPU).

    ``keep`` (a boolean per real token, in mask order): only those tokens are written, gathered on the
    value's device before anything is copied, so a capture that stores a few tokens copies only them;
    ``mask`` is then the real tokens that are kept. ``nonfinite``: for a cut batch on the CPU, which real
    tokens (kept or not) a ``finite`` route found non-finite, or None."""

    def __init__(self, routes: dict[Where, list[Route]], mask: torch.Tensor,
                 make: Callable[[str, tuple[int, ...], torch.dtype, torch.device], torch.Tensor],
                 keep: torch.Tensor | None = None):
        self.routes, self.make, self.keep, self.real = routes, make, keep, mask
        self.mask = mask = mask if keep is None else kept_mask(mask, keep)
        flat = mask.reshape(-1)
        self.n = int(flat.sum())
        self._index = None if self.n == flat.numel() else flat.nonzero().squeeze(1)
        self._index_on: dict[torch.device, torch.Tensor] = {}
        self.nonfinite: torch.Tensor | None = None
        self._terms: dict[str, torch.Tensor] = {}
        self._filled: dict[str, set[int | None]] = {}
        # variables only some layers write (a hybrid model's z and mixer_out): the rest are zero terms
        covered: dict[str, set[int | None]] = {}
        for route in (r for rs in routes.values() for r in rs if r.layer is not None):
            covered.setdefault(route.var, set()).add(route.layer)
        self._partial = {r.var for rs in routes.values() for r in rs
                         if r.layer is not None and len(covered[r.var]) < r.layers}

    def put(self, where: Where, value: Any) -> None:
        first = None
        for route in self.routes[where]:
            if route.pick is not None:
                tensor = route.pick(value).detach()
            else:
                first = first_tensor(value, where[1]).detach() if first is None else first
                tensor = first
            self._write(route, token_rows(tensor, self.mask, route.flat), where)

    def _real(self, rows: torch.Tensor, into: torch.Tensor | None) -> torch.Tensor:
        if self._index is None:
            return rows if into is None else into.copy_(rows)
        if rows.device not in self._index_on:
            self._index_on[rows.device] = self._index.to(rows.device, non_blocking=True)
        index = self._index_on[rows.device]
        return rows.index_select(0, index) if into is None else torch.index_select(rows, 0, index, out=into)

    def _write(self, route: Route, rows: torch.Tensor, where: Where) -> None:
        filled = self._filled.setdefault(route.var, set())
        if route.layer in filled:
            raise LayoutError(f"{where[0]} ({where[1]}) ran twice in one forward, so {route.var} "
                                 f"{'' if route.layer is None else f'of layer {route.layer} '}has two values; "
                                 "the layout must name a module that runs once per layer (docs/layouts.md)")
        filled.add(route.layer)
        if route.finite and self.keep is not None and rows.device.type == "cpu":
            bad = ~torch.isfinite(rows.reshape(rows.shape[0], -1)).all(dim=1)[self.real.reshape(-1)]
            self.nonfinite = bad if bool(bad.any()) else None
        if route.transform is not None:
            rows = route.transform(self._real(rows, None))
        item = tuple(rows.shape[1:]) if route.tail is None else route.tail
        shape = (self.n, *item) if route.layer is None else (self.n, route.layers, *item)
        dst = self._terms.get(route.var)
        if dst is None:
            dst = self._terms[route.var] = self.make(route.var, shape, rows.dtype, rows.device)
            if route.var in self._partial:
                dst.zero_()
        into = dst if route.layer is None else dst[:, route.layer]
        if route.tail is not None:
            into = into.view(self.n, *rows.shape[1:])
        if route.transform is not None:
            into.copy_(rows)
        else:
            self._real(rows, into)

    def terms(self) -> dict[str, torch.Tensor]:
        """Every routed variable, after the forward; a module that never ran is an error, not a gap."""
        expected: dict[str, set[int | None]] = {}
        for routes in self.routes.values():
            for route in routes:
                expected.setdefault(route.var, set()).add(route.layer)
        for var, layers in expected.items():
            missing = layers - self._filled.get(var, set())
            if missing:
                where = sorted(w for w, rs in self.routes.items() for r in rs if r.var == var and r.layer in missing)
                raise LayoutError(f"the forward never reached {where[:3]}, so {var} has no value there; "
                                     "a module the layout names is not called by this model (docs/layouts.md)")
        return self._terms


class _SinkingCache(Cache):
    """nnsight's cache, except that routed values go to :class:`TermSlots` instead of its entries."""

    def __init__(self, envoy, keep: set[Where], slots: TermSlots):
        super().__init__(envoy, modules=sorted({path for path, _ in keep}), device=None,
                         include_output=True, include_inputs=True)
        self._keep, self._slots = keep, slots

    def subscriptions(self) -> dict[str, Where]:
        wanted = self._keep | set(self._slots.routes)
        return {f"{path}.{'output' if slot == 'output' else 'input'}": (path, slot) for path, slot in wanted}

    def observe_selected(self, selected: Where, value: Any) -> None:
        if selected in self._slots.routes:
            self._slots.put(selected, value)
        if selected in self._keep:
            if selected[1] == "output" and isinstance(value, torch.Tensor):
                value = value.clone()   # kept as produced: Llama-4 adds its routed experts into its shared expert's output
            super().observe_selected(selected, value)


class KeptValues:
    """The values kept whole, read as nnsight's cache reads: ``kept[path].inputs`` / ``.output``."""

    def __init__(self, view: CacheView):
        self._view = view

    def __getitem__(self, path: str):
        return self._view[path]

    def clear(self) -> None:
        """Let the kept activations go once the batch's terms are made from them."""
        self._view = None


def sink(envoy, keep: set[Where], slots: TermSlots) -> CacheView:
    """Route this trace's values to ``slots`` and keep ``keep``; call it inside the trace, before any
    model value is read, as ``tracer.cache()`` is called. Returns the (saved) view of the kept values,
    which :class:`KeptValues` wraps once the trace is over."""
    import nnsight
    from nnsight.intervention.interleaver import Mediator

    mediator = Mediator.current("streamtap's term sinks")
    cache = _SinkingCache(envoy, keep, slots)
    mediator.caches.append(cache)
    return nnsight.save(CacheView(cache, None))


def trace(envoy, args, kwargs, slots: TermSlots, keep: set[Where]):
    """One forward of ``envoy`` through an nnsight trace whose sinks fill ``slots``.

    Returns (the model's output, the values kept whole as :class:`KeptValues`).
    """
    with envoy.trace(*args, **kwargs):
        kept = sink(envoy, keep, slots)
        output = envoy.output.save()
    return output, KeptValues(kept)
