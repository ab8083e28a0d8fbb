"""The stream's one replay (streamtap.stream), against sums and norms computed by hand on random terms.

Three kinds of stream: a plain pre-norm one (every term reaches the end unchanged), one whose sublayers
write through norms of their own (Gemma-2, OLMo-2: ``Write(..., norm=k)``) and a post-LN one (the whole
stream passes a norm after each sublayer: ``StreamNorm``), plus one that mixes the two. A frozen norm is
``N_k(x) = gamma_k * (x - [mean x]) * s_k + beta_k`` with the per-token scale ``s_k`` given (docs/design.md,
"The invariant"); the hand computations below apply exactly that, in float64.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from streamtap.stream import (Embed, FrozenNorms, Labels, Parts, Piece, StreamNorm, Sum, Write, carry, directions,
                              entries, from_json, is_plain, replay, stop_index, to_json)

T, D, H, LAYERS = 5, 8, 3, 2
KINDS = ["plain", "sublayer", "post_ln", "mixed"]
RTOL = 1e-12


def _events(kind: str) -> list:
    events = [Embed("embed"), Embed("pos_embed")]
    if kind == "post_ln":
        events.append(StreamNorm(0, -1))
    for layer in range(LAYERS):
        if kind == "plain":
            events += [Write("attn", layer), Write("mlp", layer)]
        elif kind == "sublayer":
            events += [Write("attn", layer, norm=2 * layer), Write("mlp", layer, norm=2 * layer + 1)]
        elif kind == "post_ln":
            events += [Write("attn", layer), StreamNorm(1 + 2 * layer, layer),
                       Write("mlp", layer), StreamNorm(2 + 2 * layer, layer)]
        else:  # mixed: the attention writes through a norm of its own, the MLP's write is followed by a stream norm
            events += [Write("attn", layer, norm=2 * layer), Write("mlp", layer), StreamNorm(2 * layer + 1, layer)]
    return events


def _n_norms(events) -> int:
    used = [e.norm for e in events if isinstance(e, StreamNorm) or (isinstance(e, Write) and e.norm is not None)]
    return max(used) + 1 if used else 0


class Stream:
    """Random terms for every event of a stream, its frozen norms, and the hand computations."""

    def __init__(self, kind: str, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.events = _events(kind)
        k = _n_norms(self.events)
        self.k = k
        if k:
            # beta is non-zero for even norms and exactly zero for odd ones (no *_beta piece then);
            # centring (LayerNorm) and not (RMSNorm) alternate too
            self.norms = FrozenNorms(
                gamma=rng.normal(size=(k, D)),
                beta=np.stack([rng.normal(size=D) if i % 2 == 0 else np.zeros(D) for i in range(k)]),
                center=np.array([i % 3 != 1 for i in range(k)]),
                scale=rng.uniform(0.2, 2.0, size=(T, k)),
            )
        else:
            self.norms = FrozenNorms.none()
        self.norm_labels = [f"n{i}" for i in range(k)]
        self.pieces = {}
        for e in self.events:
            if isinstance(e, Embed):
                self.pieces[e] = [Piece([e.var], rng.normal(size=(1, T, D)))]
            elif isinstance(e, Write) and e.site == "attn":
                self.pieces[e] = [Piece([f"L{e.layer}H{h}" for h in range(H)], rng.normal(size=(H, T, D))),
                                  Piece([f"L{e.layer}_attn_bias"], rng.normal(size=(1, D)), constant=True)]
            elif isinstance(e, Write):
                self.pieces[e] = [Piece([f"L{e.layer}_mlp"], rng.normal(size=(1, T, D))),
                                  Piece([f"L{e.layer}_mlp_bias"], rng.normal(size=(1, D)), constant=True)]

    def source(self, e):
        return self.pieces[e]

    # -- by hand ----------------------------------------------------------------------------------
    def norm_linear(self, k: int, x: np.ndarray) -> np.ndarray:
        """gamma_k * (x - [mean x]) * s_k, with the frozen per-token scale, for x (token, d_model)."""
        n = self.norms
        y = x - x.mean(axis=-1, keepdims=True) if n.center[k] else x
        return y * n.scale[:, k][:, None] * n.gamma[k]

    def norm(self, k: int, x: np.ndarray) -> np.ndarray:
        return self.norm_linear(k, x) + self.norms.beta[k]

    def written(self, e) -> np.ndarray:
        """What an event's terms add up to, before any norm: (token, d_model)."""
        total = np.zeros((T, D))
        for p in self.pieces[e]:
            total = total + (p.data.sum(axis=0)[None, :] if p.constant else p.data.sum(axis=0))
        return total

    def total(self, stop: int | None = None) -> np.ndarray:
        """The residual after events[:stop], step by step as the model computes it."""
        x = np.zeros((T, D))
        for e in self.events[:stop]:
            if isinstance(e, StreamNorm):
                x = self.norm(e.norm, x)
            elif isinstance(e, Write) and e.norm is not None:
                x = x + self.norm(e.norm, self.written(e))
            else:
                x = x + self.written(e)
        return x

    def norm_of(self, e) -> int | None:
        if isinstance(e, StreamNorm):
            return e.norm
        return e.norm if isinstance(e, Write) else None

    def has_beta(self, k: int | None) -> bool:
        return k is not None and k % 2 == 0


def _broadcast(data):
    return np.broadcast_to(data[:, None, :], (data.shape[0], T, D))


def _close(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    assert np.abs(a - b).max() <= RTOL * max(np.abs(b).max(), 1.0), np.abs(a - b).max()


# -- the recipe ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_events_round_trip_through_json(kind):
    events = _events(kind) + [Write("mlp", LAYERS, experts=4, shared=True), Write("mlp", LAYERS + 1, experts=8)]
    text = to_json(events)
    assert isinstance(json.loads(text), list) and all("op" in item for item in json.loads(text))
    assert from_json(text) == events
    assert to_json(from_json(text)) == text


def test_only_a_stream_without_norms_is_plain():
    assert is_plain(_events("plain"))
    assert not any(is_plain(_events(kind)) for kind in ("sublayer", "post_ln", "mixed"))


def test_stop_index_and_entries_find_each_depth():
    events = _events("post_ln")
    at = {e: i for i, e in enumerate(events)}
    assert entries(events) == {(0, "attn"): at[Write("attn", 0)], (0, "mlp"): at[Write("mlp", 0)],
                               (1, "attn"): at[Write("attn", 1)], (1, "mlp"): at[Write("mlp", 1)]}
    assert stop_index(events, None) == len(events)
    assert stop_index(events, 0) == stop_index(events, (0, "attn")) == at[Write("attn", 0)]
    assert stop_index(events, np.int64(1)) == at[Write("attn", 1)]
    assert stop_index(events, (1, "mlp")) == at[Write("mlp", 1)]
    with pytest.raises(ValueError, match="no attn at layer 9"):
        stop_index(events, 9)
    with pytest.raises(ValueError, match="upto must be a layer"):
        stop_index(events, (0, "norm"))


# -- the replay -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_sum_equals_the_hand_sum(kind):
    s = Stream(kind)
    got = replay(s.events, s.norms, s.source, Sum()).total
    _close(got, s.total())
    if kind == "plain":  # nothing acts on the stream: the plain sum of every term
        _close(got, sum(s.written(e) for e in s.events))


@pytest.mark.parametrize("kind", KINDS)
def test_a_replay_stopped_at_a_depth_is_the_residual_entering_it(kind):
    s = Stream(kind, seed=1)
    seen = {}

    def on_enter(layer, site, acc):
        seen[(layer, site)] = acc.total.copy()

    replay(s.events, s.norms, s.source, Sum(), on_enter=on_enter)
    assert sorted(seen) == sorted(entries(s.events))
    for (layer, site), snapshot in seen.items():
        stop = stop_index(s.events, (layer, site))
        want = s.total(stop)
        _close(replay(s.events, s.norms, s.source, Sum(), stop=stop).total, want)
        _close(snapshot, want)


@pytest.mark.parametrize("kind", KINDS)
def test_parts_sum_to_the_total_and_carry_the_expected_labels(kind):
    s = Stream(kind, seed=2)
    parts = replay(s.events, s.norms, s.source, Parts(_broadcast), norm_labels=s.norm_labels)
    assert all(np.shape(p.data) == (len(p.labels), T, D) for p in parts.pieces)
    _close(sum(np.asarray(p.data).sum(axis=0) for p in parts.pieces), s.total())

    want = []
    for e in s.events:
        if not isinstance(e, StreamNorm):
            want += [label for p in s.pieces[e] for label in p.labels]
        k = s.norm_of(e)
        if s.has_beta(k):
            want.append((f"n{k}_beta", "norm_beta", e.layer, -1, -1))
    got = [label for p in parts.pieces for label in p.labels]
    assert got == want
    labels = replay(s.events, s.norms, s.source, Labels(), norm_labels=s.norm_labels).labels
    assert labels == want
    betas = {label[0] for label in got if isinstance(label, tuple)}
    assert betas == {f"n{k}_beta" for k in range(s.k) if k % 2 == 0}  # beta == 0: no piece at all
    if kind == "plain":
        assert not betas


@pytest.mark.parametrize("kind", KINDS)
def test_each_piece_is_its_terms_carried_to_the_end(kind):
    # a piece of Parts is its own terms through every norm after it, by hand
    s = Stream(kind, seed=3)
    parts = replay(s.events, s.norms, s.source, Parts(_broadcast), norm_labels=s.norm_labels)
    heads = {label: np.asarray(p.data)[i] for p in parts.pieces for i, label in enumerate(p.labels)}
    for index, e in enumerate(s.events):
        if not isinstance(e, Write) or e.site != "attn":
            continue
        x = s.pieces[e][0].data[1]  # head 1's term
        if e.norm is not None:
            x = s.norm_linear(e.norm, x)
        for later in s.events[index + 1:]:
            if isinstance(later, StreamNorm):
                x = s.norm_linear(later.norm, x)
        _close(heads[f"L{e.layer}H1"], x)


# -- walking back: directions and carry -------------------------------------------------------------------
@pytest.mark.parametrize("w_rows", [1, T], ids=["one-direction", "per-token"])
@pytest.mark.parametrize("kind", KINDS)
def test_directions_measure_each_term_as_the_final_residual_sees_it(kind, w_rows):
    s = Stream(kind, seed=4)
    w = np.random.default_rng(5).normal(size=(w_rows, D))
    total = replay(s.events, s.norms, s.source, Sum()).total
    want = (w * total).sum(axis=-1)                       # (token,): w . resid_final

    got = np.zeros(T)
    visited = []
    for index, e, w_out, w_in in directions(s.events, s.norms, w):
        visited.append(index)
        assert e is s.events[index]
        if isinstance(e, StreamNorm):
            assert w_in is None
        else:
            for p in s.pieces[e]:
                data = p.data.sum(axis=0)                 # (d_model,) for a constant, else (token, d_model)
                got = got + (data * w_in).sum(axis=-1)
            if not (isinstance(e, Write) and e.norm is not None):
                assert w_in is w_out                      # nothing between the term and the stream
        k = s.norm_of(e)
        if s.has_beta(k):
            got = got + (s.norms.beta[k] * w_out).sum(axis=-1)
    assert visited == list(range(len(s.events)))[::-1]
    _close(got, want)


@pytest.mark.parametrize("kind", KINDS)
def test_carry_applies_the_later_norms_and_is_the_adjoint_of_directions(kind):
    s = Stream(kind, seed=6)
    rng = np.random.default_rng(7)
    w = rng.normal(size=(1, D))
    w_in = {index: w_i for index, _, _, w_i in directions(s.events, s.norms, w)}
    for index, e in enumerate(s.events):
        if isinstance(e, StreamNorm):
            continue
        x = rng.normal(size=(T, D))
        want = s.norm_linear(e.norm, x) if isinstance(e, Write) and e.norm is not None else x
        for later in s.events[index + 1:]:
            if isinstance(later, StreamNorm):
                want = s.norm_linear(later.norm, want)
        carried = carry(s.events, s.norms, index, x)
        _close(carried, want)
        # what reaches the end, measured by w, is the term measured by its w_in
        _close((w * carried).sum(axis=-1), (w_in[index] * x).sum(axis=-1))
