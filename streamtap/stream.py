"""The residual stream as a layout records it, and the one replay of it.

A capture writes the order in which terms entered the stream and norms acted on it (the store's
``stream`` attribute, built by ``streamtap.layouts.bind``). Everything that adds terms up replays
that order here and nowhere else: the attach-time self-check, ``decompose``, ``verify``, the
residual at any depth and the analyses' per-block fast paths. Nothing here knows an architecture.

Norms inside the stream are affine once their per-token scale ``s`` is frozen (docs/design.md,
"The invariant")::

    N_k(x) = gamma_k * (x - [mean x]) * s_k + beta_k

so a term that passes through a norm is carried through the same linear map and ``beta_k`` becomes a
term of its own. The maps work on numpy and dask arrays alike: a term is ``(..., token, d_model)``,
a scale ``(token, norm)``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence, Union

import numpy as np


# -- events -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Embed:
    """An embedding term (``var``: ``embed``, ``pos_embed``, ``token_type_embed``) enters the stream."""

    var: str
    layer: int = -1


@dataclass(frozen=True)
class Write:
    """A sublayer writes: ``site`` is ``"attn"`` (every head plus the output bias), ``"mlp"``, or
    ``"mixer"`` (a hybrid model's state-space, convolution or linear-attention layer: one term).

    ``norm``: the norm the term passes through before it joins the stream (post-sublayer norms),
    or None. ``experts``: the number of experts of a mixture (0 for a dense MLP); ``shared``: a
    gated shared expert writes too.
    """

    site: str
    layer: int
    norm: int | None = None
    experts: int = 0
    shared: bool = False


@dataclass(frozen=True)
class StreamNorm:
    """The whole stream passes through norm ``norm`` (post-LN blocks; ``layer`` -1: after the embeddings)."""

    norm: int
    layer: int


Event = Union[Embed, Write, StreamNorm]

BLOCK_TERMS = {"mlp": "mlp_out", "mixer": "mixer_out"}
"""The stored variable (token, layer, d_model) of each site that writes one term per layer."""


def to_json(events: Sequence[Event]) -> str:
    """The events as the store's ``stream`` attribute."""
    out = []
    for e in events:
        if isinstance(e, Embed):
            out.append({"op": "embed", "var": e.var})
        elif isinstance(e, StreamNorm):
            out.append({"op": "norm", "norm": e.norm, "layer": e.layer})
        else:
            item = {"op": e.site, "layer": e.layer, "norm": e.norm}
            if e.experts:
                item.update(experts=e.experts, shared=e.shared)
            out.append(item)
    return json.dumps(out)


def from_json(text: str) -> list[Event]:
    """The events of a store's ``stream`` attribute."""
    events: list[Event] = []
    for item in json.loads(text):
        op = item["op"]
        if op == "embed":
            events.append(Embed(item["var"]))
        elif op == "norm":
            events.append(StreamNorm(int(item["norm"]), int(item["layer"])))
        else:
            events.append(Write(op, int(item["layer"]), item.get("norm"), int(item.get("experts", 0)),
                                bool(item.get("shared", False))))
    return events


def stop_index(events: Sequence[Event], upto) -> int:
    """Index of the first event left out of the residual entering ``upto``.

    ``upto`` is a layer (the residual entering its first event, which may be a stream norm) or
    ``(layer, "attn" | "mlp")``; the MLP is entered right before it writes. None: every event.
    """
    if upto is None:
        return len(events)
    layer, site = (upto, "attn") if isinstance(upto, (int, np.integer)) else upto
    if site not in ("attn", "mlp"):
        raise ValueError(f"upto must be a layer or (layer, 'attn' | 'mlp'), got {upto!r}")
    for i, e in enumerate(events):
        if e.layer == layer and (site == "attn" or (isinstance(e, Write) and e.site == "mlp")):
            return i
    raise ValueError(f"this stream has no {site} at layer {layer}")


def entries(events: Sequence[Event]) -> dict[tuple[int, str], int]:
    """Where each depth begins: ``(layer, "attn" | "mlp")`` -> index of its first event."""
    out: dict[tuple[int, str], int] = {}
    for i, e in enumerate(events):
        if e.layer >= 0:
            out.setdefault((e.layer, "attn"), i)
            if isinstance(e, Write) and e.site == "mlp":
                out.setdefault((e.layer, "mlp"), i)
    return out


def is_plain(events: Sequence[Event]) -> bool:
    """Whether no norm acts inside the stream (every term reaches the end unchanged)."""
    return not any(isinstance(e, StreamNorm) or (isinstance(e, Write) and e.norm is not None) for e in events)


# -- frozen norms -------------------------------------------------------------------------------------
@dataclass
class FrozenNorms:
    """The stream's norms with their per-token scales frozen: ``gamma`` and ``beta`` (norm, d_model),
    ``center`` (norm,), ``scale`` (token, norm); numpy or dask."""

    gamma: np.ndarray
    beta: np.ndarray
    center: np.ndarray
    scale: object = None

    @classmethod
    def none(cls) -> "FrozenNorms":
        empty = np.zeros((0, 0))
        return cls(empty, empty, np.zeros(0, bool))

    def linear(self, k: int, x):
        """``x`` (..., token, d_model) through norm k's linear part (without beta)."""
        if self.center[k]:
            x = x - x.mean(axis=-1, keepdims=True)
        return x * self.scale[:, k][:, None] * self.gamma[k]

    def adjoint(self, k: int, w):
        """The transpose of :meth:`linear` for a direction ``w`` (token or 1, d_model): the direction
        that measures a term before the norm as ``w`` measures it after."""
        w = w * self.gamma[k] * self.scale[:, k][:, None]
        return w - w.mean(axis=-1, keepdims=True) if self.center[k] else w

    def has_beta(self, k: int) -> bool:
        return bool(np.any(np.asarray(self.beta[k]) != 0))


def norm_scale(x, center: bool, eps: float):
    """s = 1 / sqrt(var(x) + eps) over the last axis: what a norm multiplies by (numpy, dask)."""
    if center:
        x = x - x.mean(axis=-1, keepdims=True)
    return 1.0 / np.sqrt((x * x).mean(axis=-1) + eps)


def apply_norm(x, gamma, beta, center: bool, eps: float):
    """A norm, computed: gamma * (x - [mean x]) * s + beta, with its own scale s."""
    s = norm_scale(x, center, eps)[..., None]
    y = (x - x.mean(axis=-1, keepdims=True)) if center else x
    y = y * s * gamma
    return y if beta is None else y + beta


def fold_direction(u, gamma, center: bool):
    """w with s * (x . w) = the effect of a term x on ``u . N(x_total)`` (beta aside): gamma folded in,
    and for a centring norm the centring too ((x - mean x) . v = x . (v - mean v))."""
    w = u * gamma
    return w - w.mean(axis=-1, keepdims=True) if center else w


# -- the replay ---------------------------------------------------------------------------------------
@dataclass
class Piece:
    """Terms entering the stream together: ``labels[i]`` names ``data[i]``.

    ``data`` is (n, token, d_model), or (n, d_model) for constants (a bias) that are the same at
    every token. ``beta``: this piece is norm ``beta``'s beta (its data comes from the norms).
    """

    labels: list
    data: object = None
    constant: bool = False
    beta: int | None = None


Source = Callable[[Event], list[Piece]]


def _data(piece: Piece, norms: FrozenNorms, through: int | None):
    """A piece's data as it joins the stream: through a sublayer norm where it passes one."""
    data = norms.beta[piece.beta][None] if piece.beta is not None else piece.data
    if through is None:
        return data
    return norms.linear(through, data[:, None, :] if piece.constant else data)  # a constant varies by token now


class Sum:
    """Accumulates the running total only: (token, d_model)."""

    def __init__(self):
        self.total = None

    def add(self, piece: Piece, through: int | None, norms: FrozenNorms) -> None:
        data = _data(piece, norms, through)
        part = data[0] if data.shape[0] == 1 else data.sum(axis=0)
        self.total = part if self.total is None else self.total + part

    def norm(self, k: int, norms: FrozenNorms) -> None:
        self.total = norms.linear(k, self.total)


class Parts:
    """Keeps every piece apart (for ``decompose``); a stream norm maps each of them."""

    def __init__(self, broadcast: Callable):
        self.pieces: list[Piece] = []
        self._broadcast = broadcast  # a constant (n, d_model) -> (n, token, d_model)

    def add(self, piece: Piece, through: int | None, norms: FrozenNorms) -> None:
        data = _data(piece, norms, through)
        if piece.constant and through is None:
            data = self._broadcast(data)
        self.pieces.append(Piece(piece.labels, data))

    def norm(self, k: int, norms: FrozenNorms) -> None:
        self.pieces = [Piece(p.labels, norms.linear(k, p.data)) for p in self.pieces]


class Labels:
    """Collects the components' labels only, in the order ``decompose`` gives them."""

    def __init__(self):
        self.labels: list = []

    def add(self, piece: Piece, through: int | None, norms: FrozenNorms) -> None:
        self.labels.extend(piece.labels)

    def norm(self, k: int, norms: FrozenNorms) -> None:
        pass


def beta_label(norm_labels: Sequence[str], k: int, layer: int) -> tuple:
    name = f"{norm_labels[k]}_beta" if k < len(norm_labels) else f"norm{k}_beta"
    return name, "norm_beta", layer, -1, -1


def replay(events: Sequence[Event], norms: FrozenNorms, source: Source, acc, *, stop: int | None = None,
           norm_labels: Sequence[str] = (), on_enter: Callable | None = None):
    """Add the terms up in the order the model wrote them.

    ``source(event)`` gives the pieces an event writes; ``acc`` (:class:`Sum`, :class:`Parts` or
    :class:`Labels`) collects them. A term written through a norm is carried through it and the
    norm's beta added as a piece of its own; a stream norm maps everything so far and adds its beta.
    ``on_enter(layer, site, acc)`` is called before each layer's first event and before its MLP
    writes (the depths of :func:`entries`). Events from ``stop`` on are left out. Returns ``acc``.
    """
    starts: dict[int, list[tuple[int, str]]] = {}
    if on_enter is not None:
        for key, index in entries(events).items():
            starts.setdefault(index, []).append(key)
    end = len(events) if stop is None else stop
    for i, e in enumerate(events[:end]):
        for layer, site in starts.get(i, ()):
            on_enter(layer, site, acc)
        if isinstance(e, StreamNorm):
            acc.norm(e.norm, norms)
            k = e.norm
        else:
            through = e.norm if isinstance(e, Write) else None
            for piece in source(e):
                acc.add(piece, through, norms)
            k = through
        if k is not None and norms.has_beta(k):
            acc.add(Piece([beta_label(norm_labels, k, e.layer)], constant=True, beta=k), None, norms)
    return acc


def directions(events: Sequence[Event], norms: FrozenNorms, w, start: int | None = None
               ) -> Iterator[tuple[int, Event, object, object]]:
    """Walk the stream backwards carrying a direction ``w`` (token or 1, d_model) that measures the
    final residual (or, with ``start``, the residual entering event ``start``: ``stop_index``):
    yields ``(index, event, w_out, w_in)`` for the events before it.

    ``w_out`` measures what the event adds as the stream sees it (a norm's beta); ``w_in`` measures
    the event's own terms, through the adjoint of the norm they pass (so ``w_in . term`` is the
    term's contribution to ``w . resid_final``); None for a stream norm, which adjoins ``w`` for
    every earlier event.
    """
    for i in range((len(events) if start is None else start) - 1, -1, -1):
        e = events[i]
        if isinstance(e, StreamNorm):
            yield i, e, w, None
            w = norms.adjoint(e.norm, w)
        elif isinstance(e, Write) and e.norm is not None:
            yield i, e, w, norms.adjoint(e.norm, w)
        else:
            yield i, e, w, w


def carry(events: Sequence[Event], norms: FrozenNorms, index: int, x):
    """A term written by event ``index`` as it reaches the end of the stream (its own through-norm
    and every later stream norm applied, linear parts only)."""
    e = events[index]
    if isinstance(e, Write) and e.norm is not None:
        x = norms.linear(e.norm, x)
    for later in events[index + 1:]:
        if isinstance(later, StreamNorm):
            x = norms.linear(later.norm, x)
    return x


# -- a block of a store's arrays as the stream's pieces ---------------------------------------------------------
def block_norms(b: dict, center):
    """The stream's norms frozen at one block's scales (``center``: the store's ``norm_center``)."""
    if "norm_weight" not in b:
        return FrozenNorms.none()
    return FrozenNorms(b["norm_weight"], b["norm_bias"], center, b["norm_scale"])


def block_source(b: dict, dt):
    """What each event writes within one block, one summed term per event (for a running sum)."""
    def source(e):
        if isinstance(e, Embed):
            return [Piece([e.var], b[e.var].astype(dt, copy=False)[None])]
        if e.site == "attn":
            term = np.einsum("the,hem->tm", b["z"][:, e.layer].astype(dt, copy=False), b["W_O"][e.layer],
                             optimize=True) + b["attn_bias"][e.layer]
        else:
            term = b[BLOCK_TERMS[e.site]][:, e.layer].astype(dt, copy=False)
        return [Piece([e.site], term[None])]

    return source


def component_label(event: Event, *, head: int | None = None, neuron: int | None = None,
                    expert: int | None = None, part: str | None = None) -> tuple:
    """(label, kind, layer, head, neuron): the labels ``decompose`` gives its components."""
    if isinstance(event, Embed):
        return event.var, event.var, -1, -1, -1
    layer = event.layer
    if head is not None:
        return f"L{layer}H{head}", "head", layer, head, -1
    if neuron is not None:
        return f"L{layer}N{neuron}", "neuron", layer, -1, neuron
    if expert is not None:
        return f"L{layer}E{expert}", "expert", layer, -1, -1
    if part not in ("attn_bias", "mlp", "mlp_bias", "shared_expert", "mixer"):
        raise ValueError(f"no component {part!r} of a {event.site} write")
    return f"L{layer}_{part}", part, layer, -1, -1


__all__ = ["BLOCK_TERMS", "Embed", "Write", "StreamNorm", "Event", "FrozenNorms", "Piece", "Sum", "Parts", "Labels", "replay",
           "directions", "carry", "entries", "stop_index", "is_plain", "to_json", "from_json", "norm_scale",
           "apply_norm", "fold_direction", "component_label", "block_source", "block_norms"]
