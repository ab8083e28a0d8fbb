"""Summaries kept while capturing: their state, the quantile sketch, merging, and where they live in a store.

A capture with ``summarise=`` keeps, per component of each group (``head``: each head's output norm,
``sink``: each head's attention sink mass, the probability its query puts on the sequence's first real
token, where patterns are captured, ``mlp``: each MLP output's norm, ``neuron``: each neuron's activation, ``projection``: each component's
contribution onto each projected direction), over every real token the model saw:

* ``count``, ``mean``, ``m2`` (the sum of squared deviations, so ``var = m2 / count``), ``min``, ``max``,
  in float64, merged with Chan's parallel formula;
* ``hist``: a log-bucket quantile sketch (DDSketch's mapping, relative accuracy ``alpha``), merged by
  adding counts; none (zero buckets) for neurons with ``neuron_quantiles=False``, the costly part of
  summarising every neuron;
* ``top_value``/``top_seq``/``top_pos``/``top_window``: the ``top_k`` largest values with their
  sequence, position and the token ids of ``window`` tokens either side (-1 outside the sequence).

Everything here is numpy and zarr: the read side and rank merges need no torch. The capture side
(``streamtap.tapping.summarise``) computes the same state with torch on the captured tensors.

The store keeps the state in a sub-group ``summaries-<n>``; the root attribute ``summaries`` (JSON:
the settings, the group's name, the sequences and tokens summarised) names the current one and is
written last, in one update, so a crash while a new group is written leaves the previous summaries
current (an orphaned group is removed by the next write).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np

from ..errors import OptionError
from .schema import SUMMARY_GROUP, SUMMARY_STATS

GROUPS = ("head", "sink", "mlp", "mixer", "neuron", "projection")
"""The groups of components summarised, in the order they are stored."""

STATS = tuple(SUMMARY_STATS)
SUMMARY_ATTR = "summaries"
GROUP_PREFIX = SUMMARY_GROUP.format(n="")

DEFAULTS = {"top_k": 16, "window": 8, "alpha": 0.02, "low": 1e-4, "high": 1e4, "neuron_quantiles": True}
"""``top_k`` contexts per component, ``window`` token ids either side, the sketch's relative accuracy
``alpha`` on magnitudes in ``[low, high]``; ``neuron_quantiles``: whether neurons get a sketch too (it is
most of the cost of summarising every neuron: docs/analysis.md, "Cost")."""
_FLOATS = ("alpha", "low", "high")
_SWITCHES = {"on": True, "true": True, "yes": True, "1": True, "off": False, "false": False, "no": False, "0": False}

ROUNDING = 4e-6
"""What rounding at a bucket edge may add to ``alpha`` in the documented guarantee. The capture now computes the
bucket from a float64 copy (so it is :func:`bucket_index`'s); the slack stays for summaries written by captures
that computed log|x| in float32 (within about two ulps of the true log for |log x| < 16)."""


@dataclass(frozen=True)
class Settings:
    """How a capture summarises; checked once, when the options are built."""

    top_k: int = DEFAULTS["top_k"]
    window: int = DEFAULTS["window"]
    alpha: float = DEFAULTS["alpha"]
    low: float = DEFAULTS["low"]
    high: float = DEFAULTS["high"]
    neuron_quantiles: bool = DEFAULTS["neuron_quantiles"]

    @classmethod
    def parse(cls, value) -> "Settings | None":
        """``None``/``False``: off; ``True``: the defaults; a dict (or ``"top_k=8,window=4"``, ``"on"`` on the
        command line) overrides them. Raises :class:`OptionError` naming what is wrong."""
        if value is None or value is False:
            return None
        if isinstance(value, Settings):
            return value
        if value is True:
            return cls()
        if isinstance(value, str):
            text = value.strip()
            if text.lower() in ("default", "") or _SWITCHES.get(text.lower()) is True:
                return cls()
            pairs = {}
            for item in text.split(","):
                name, eq, number = item.strip().partition("=")
                if not eq:
                    raise OptionError(f"option summarise={value!r}: {item!r} is not name=value (e.g. --summarise "
                                      "top_k=16,window=8,alpha=0.02, or --summarise on)")
                name = name.strip()
                if name == "neuron_quantiles":
                    if number.strip().lower() not in _SWITCHES:
                        raise OptionError(f"option summarise: {item!r} needs on or off")
                    pairs[name] = _SWITCHES[number.strip().lower()]
                    continue
                try:
                    pairs[name] = float(number) if name in _FLOATS else int(number)
                except ValueError:
                    raise OptionError(f"option summarise: {item!r} needs a number") from None
            value = pairs
        if not isinstance(value, dict):
            raise OptionError(f"option summarise={value!r}: expected True, False or a dict such as "
                              "{'top_k': 16, 'window': 8, 'alpha': 0.02}")
        unknown = [k for k in value if k not in DEFAULTS]
        if unknown:
            raise OptionError(f"option summarise: unknown setting {unknown[0]!r}; expected some of "
                              f"{', '.join(DEFAULTS)}")
        out = cls(**value)
        for name in ("top_k", "window"):
            v = getattr(out, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < (1 if name == "top_k" else 0):
                raise OptionError(f"option summarise: {name}={v!r} must be an integer "
                                  f"{'>= 1' if name == 'top_k' else '>= 0'}")
        if not isinstance(out.neuron_quantiles, (bool, np.bool_)):
            raise OptionError(f"option summarise: neuron_quantiles={out.neuron_quantiles!r} must be True or False")
        if not 0 < out.alpha < 0.5:
            raise OptionError(f"option summarise: alpha={out.alpha!r} must be between 0 and 0.5 (the sketch's "
                              "relative accuracy, e.g. 0.02)")
        if not 0 < out.low < out.high or not math.isfinite(out.high):
            raise OptionError(f"option summarise: low={out.low!r}, high={out.high!r} must satisfy 0 < low < high")
        return out

    @property
    def gamma(self) -> float:
        return (1 + self.alpha) / (1 - self.alpha)

    @property
    def n_side(self) -> int:
        """Buckets on each side of zero."""
        return int(math.ceil(math.log(self.high / self.low) / math.log(self.gamma)))

    @property
    def n_buckets(self) -> int:
        return 2 * self.n_side + 1

    def buckets(self, group: str) -> int:
        """The sketch's buckets for a group's components: none for neurons without ``neuron_quantiles``."""
        return 0 if group == "neuron" and not self.neuron_quantiles else self.n_buckets

    def as_dict(self) -> dict:
        """The settings as a store records them (``neuron_quantiles`` only where off, so the summaries of
        stores written before it existed compare equal to the defaults')."""
        out = {"top_k": int(self.top_k), "window": int(self.window), "alpha": float(self.alpha),
               "low": float(self.low), "high": float(self.high)}
        return out if self.neuron_quantiles else {**out, "neuron_quantiles": False}


def bucket_values(settings: Settings) -> np.ndarray:
    """Each bucket's representative value: ``-rep(n) .. -rep(1), 0, rep(1) .. rep(n)`` where bucket ``j``
    holds magnitudes in ``(low g^(j-1), low g^j]`` and ``rep(j) = low 2 g^j / (g + 1)`` is within ``alpha``
    of all of them; the zero bucket holds ``|x| <= low``."""
    g, n = settings.gamma, settings.n_side
    rep = settings.low * 2 * g ** np.arange(1, n + 1, dtype=np.float64) / (g + 1)
    return np.concatenate([-rep[::-1], [0.0], rep])


def bucket_index(x: np.ndarray, settings: Settings) -> np.ndarray:
    """The bucket of each value (numpy, float64: the reference the capture's float32 torch version follows)."""
    n = settings.n_side
    mag = np.abs(np.asarray(x, np.float64))
    with np.errstate(divide="ignore"):
        j = np.ceil(np.log(mag / settings.low) / math.log(settings.gamma))
    j = np.clip(np.nan_to_num(j, neginf=0), 0, n).astype(np.int64)
    return n + np.sign(x).astype(np.int64) * j


def bucket_edges(settings: Settings) -> np.ndarray:
    """``edges[j]`` (j = 0 .. n_side, float64): the smallest magnitude whose bucket is ``j`` or more on
    its side of zero, so ``|x|``'s bucket is the number of edges ``<= |x|`` less one, exactly
    :func:`bucket_index`'s (found by bisection on float64 bit patterns; the mapping is monotone in |x|)."""
    n = settings.n_side
    want = np.arange(n + 1)
    lo, hi = np.zeros(n + 1, np.int64), np.full(n + 1, np.float64(np.inf).view(np.int64))
    for _ in range(64):   # smallest bit pattern (a non-negative float64's order) whose bucket is >= want
        mid = lo + (hi - lo) // 2
        ge = bucket_index(mid.view(np.float64), settings) - n >= want
        hi, lo = np.where(ge, mid, hi), np.where(ge, lo, mid + 1)
    return lo.view(np.float64)


def signed_edges(settings: Settings, dtype) -> np.ndarray:
    """(2 n_side,) increasing boundaries in ``dtype`` (float32 or float64) such that the number of them at
    or below any value x of that dtype is :func:`bucket_index` (x): one ``searchsorted(side="right")`` (a
    device's ``torch.bucketize(right=True)``) gives every bucket exactly, with no logarithm. The positive
    side holds the smallest value of ``dtype`` reaching each edge; the negative side the next value above
    each negated one (a negative x leaves an edge's bucket exactly when it is above its negation)."""
    dtype = np.dtype(dtype)
    edges = bucket_edges(settings)[1:]
    up = edges.astype(dtype)
    up = np.where(up.astype(np.float64) < edges, np.nextafter(up, dtype.type(np.inf)), up)
    return np.concatenate([np.nextafter(-up[::-1], dtype.type(np.inf)), up])


def quantiles(hist: np.ndarray, vmin: np.ndarray, vmax: np.ndarray, q, settings: Settings) -> np.ndarray:
    """(component, q) quantile estimates from the sketch: the representative of the bucket holding the
    order statistic ``floor(q (n - 1))`` (numpy's ``method="lower"``), clamped into ``[min, max]``; the
    first and last order statistics are the exact ``min`` and ``max``.

    Guarantee: within ``alpha + 4e-6`` relative of that order statistic where its magnitude lies in
    ``[low, high]``; within ``low`` absolute where it is smaller; beyond ``high`` only the clamp to the
    exact ``max``/``min`` holds. NaN where a component saw no value."""
    q = np.atleast_1d(np.asarray(q, np.float64))
    if ((q < 0) | (q > 1)).any():
        raise ValueError(f"quantiles must lie in [0, 1], got {q.tolist()}")
    hist = np.asarray(hist)
    n = hist.sum(axis=1)
    cum = np.cumsum(hist, axis=1)
    rank = np.floor(q[None, :] * np.maximum(n - 1, 0)[:, None])          # (C, Q)
    at = np.stack([(cum > rank[:, [i]]).argmax(axis=1) for i in range(len(q))], axis=1)
    est = bucket_values(settings)[at]
    lo, hi = np.asarray(vmin, np.float64)[:, None], np.asarray(vmax, np.float64)[:, None]
    est = np.clip(est, lo, hi)
    est = np.where(rank == 0, lo, np.where(rank >= (n - 1)[:, None], hi, est))   # the ends are kept exactly
    est[n == 0] = np.nan
    return est


# -- the state ---------------------------------------------------------------------------------------
def empty_state(n: int, settings: Settings, group: str = "") -> dict[str, np.ndarray]:
    """The state of ``n`` components of ``group`` that have seen nothing."""
    k, w = settings.top_k, 2 * settings.window + 1
    return {"count": np.zeros(n, np.int64), "mean": np.zeros(n), "m2": np.zeros(n), "min": np.full(n, np.inf),
            "max": np.full(n, -np.inf), "hist": np.zeros((n, settings.buckets(group)), np.int64),
            "top_value": np.full((n, k), -np.inf), "top_seq": np.full((n, k), -1, np.int64),
            "top_pos": np.full((n, k), -1, np.int64), "top_window": np.full((n, k, w), -1, np.int64)}


def merge(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The state of both token sets (Chan's formula for mean and m2; counts added; top-k of the union)."""
    na, nb = a["count"].astype(np.float64), b["count"].astype(np.float64)
    n = na + nb
    safe = np.where(n > 0, n, 1)
    delta = b["mean"] - a["mean"]
    out = {"count": a["count"] + b["count"], "mean": a["mean"] + delta * nb / safe,
           "m2": a["m2"] + b["m2"] + delta * delta * na * nb / safe,
           "min": np.minimum(a["min"], b["min"]), "max": np.maximum(a["max"], b["max"]), "hist": a["hist"] + b["hist"]}
    k = a["top_value"].shape[1]
    values = np.concatenate([a["top_value"], b["top_value"]], axis=1)
    order = np.argsort(-values, axis=1, kind="stable")[:, :k]
    for name in ("top_value", "top_seq", "top_pos"):
        out[name] = np.take_along_axis(np.concatenate([a[name], b[name]], axis=1), order, 1)
    both = np.concatenate([a["top_window"], b["top_window"]], axis=1)
    out["top_window"] = np.take_along_axis(both, order[:, :, None], 1)
    return out


def shift_sequences(state: dict[str, np.ndarray], offset: int) -> dict[str, np.ndarray]:
    """The state with its sequence numbers moved by ``offset`` (a rank store's place in the whole)."""
    seq = state["top_seq"]
    return {**state, "top_seq": np.where(seq >= 0, seq + offset, seq)}


# -- in a store --------------------------------------------------------------------------------------
def meta_of(attrs) -> dict | None:
    """The ``summaries`` attribute of a store's root, parsed; None where it has none."""
    text = attrs.get(SUMMARY_ATTR)
    return None if text is None else json.loads(text)


def read(group, meta: dict | None = None) -> tuple[dict | None, dict[str, dict[str, np.ndarray]]]:
    """(meta, {group: state}) of a store's current summaries (a zarr root group); (None, {}) if none."""
    meta = meta_of(group.attrs) if meta is None else meta
    if meta is None:
        return None, {}
    sub = group[meta["group"]]
    return meta, {g: {s: np.asarray(sub[f"{g}_{s}"][...]) for s in STATS} for g in meta["groups"]}


def labels_of(meta: dict, g: str) -> dict[str, np.ndarray]:
    """A group's component coordinates as stored: ``layer``, ``index`` (head, neuron or direction) and
    ``label``."""
    return {k: np.asarray(v) for k, v in meta["components"][g].items()}


def join_ranges(ranges) -> list[list[int]]:
    """Half-open ``[start, stop)`` sequence ranges, sorted, with touching or overlapping ones joined."""
    out: list[list[int]] = []
    for a, b in sorted((int(a), int(b)) for a, b in ranges if b > a):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return out


def covered(meta: dict) -> list[list[int]]:
    """The sequence ranges a store's summaries cover (those written before ranges were recorded covered
    the store's first ``sequences``)."""
    return join_ranges(meta.get("ranges", [[0, meta["sequences"]]]))


def uncovered(meta: dict | None, committed: int) -> list[int]:
    """The committed sequences (``0 .. committed - 1``) that a store's summaries do not cover."""
    mask = np.ones(int(committed), bool)
    for a, b in covered(meta) if meta is not None else []:
        mask[a:b] = False
    return np.flatnonzero(mask).tolist()


def write(root, states: dict[str, dict[str, np.ndarray]], meta: dict, *, sequences: int, tokens: int,
          ranges) -> dict:
    """Merge ``states`` into the store's current summaries and make the result current.

    The new state is written whole into a fresh sub-group first; the root attribute that names it is
    written last, in one update; only then is the previous group removed (and any group a crash left
    behind between those steps). ``meta``: this capture's settings and component labels; an existing
    summary with other settings or components is refused. ``ranges``: the sequences ``states`` cover
    (``[start, stop)`` pairs), recorded joined with the store's so a
    resume can summarise exactly the committed sequences no summary covers. Returns the meta now current.
    """
    from zarr.codecs import BloscCodec

    old_meta, old = read(root)
    if old_meta is not None:
        differ = [k for k in ("settings", "groups", "components") if old_meta[k] != meta[k]]
        if differ:
            raise OptionError(f"the store's summaries were kept with other {' and '.join(differ)}; an append "
                              "must summarise with the same settings (summarise=...) and selection")
        states = {g: merge(old[g], states[g]) for g in meta["groups"]}
        sequences += old_meta["sequences"]
        tokens += old_meta["tokens"]
    ranges = join_ranges(list(ranges) + (covered(old_meta) if old_meta is not None else []))
    number = 1 + max([int(n[len(GROUP_PREFIX):]) for n, _ in root.groups() if n.startswith(GROUP_PREFIX)
                      and n[len(GROUP_PREFIX):].isdigit()] or [0])
    name = f"{GROUP_PREFIX}{number}"
    sub = root.create_group(name)
    codec = BloscCodec(cname="zstd", clevel=1, shuffle="shuffle")
    for g, state in states.items():
        for stat in STATS:
            data = np.ascontiguousarray(state[stat])
            dims = [f"summary_{g}", *SUMMARY_STATS[stat][0]]
            arr = sub.create_array(f"{g}_{stat}", shape=data.shape, dtype=data.dtype, chunks=data.shape or None,
                                   dimension_names=dims, compressors=codec)
            arr[...] = data
    new = {**meta, "group": name, "sequences": int(sequences), "tokens": int(tokens), "ranges": ranges}
    root.update_attributes({SUMMARY_ATTR: json.dumps(new)})
    for other, _ in list(root.groups()):
        if other.startswith(GROUP_PREFIX) and other != name:
            _remove(root, other)
    return new


def _remove(root, name: str) -> None:
    from zarr.core.sync import sync

    store = root.store
    sync(store.delete_dir(f"{root.path}/{name}".strip("/")))


__all__ = ["GROUPS", "STATS", "DEFAULTS", "ROUNDING", "Settings", "bucket_values", "bucket_index", "bucket_edges",
           "signed_edges", "quantiles",
           "empty_state", "merge", "shift_sequences", "meta_of", "read", "labels_of", "write", "SUMMARY_ATTR",
           "join_ranges", "covered", "uncovered"]
