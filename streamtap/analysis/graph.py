"""Attribution graphs from a store: a logit (or any direction) explained, node by node, through exact edges.

The graph starts at one number, the target's logit at one position (or a logit difference, or the
residual read along any direction), and walks backwards through the three exact edge kinds of
``streamtap.analysis.edges``, with every attention pattern, every norm's scale and (for a neuron) its
activation's gain frozen at the values the model used:

- the **root** reads the final residual: its inputs are the direct contributions of every term there
  (``direct_logit_attribution`` for one token) and the final norm's and unembedding's biases;
- a **head** node (head h of layer l at position i) has a value, its output measured by the direction
  its parents carry; its inputs are its OV edges, (upstream term c at source j), each the term's share
  of that value through the pattern, the attention's input norm, W_V and W_O, plus the norm's beta and
  the value bias. Its QK edges (why it read its strongest source) are attached to it: the score's
  query-term x key-term pairs and marginals, which sum to the pre-softmax score (they explain the frozen
  pattern, not the value, so they are not among its inputs);
- an **MLP** node's inputs are its neurons (``neurons=True`` stores; a leaf otherwise) and its bias;
- a **neuron** node's inputs are its MLP input edges scaled by the neuron's frozen gain (act / up for
  a gated MLP, whose gate is frozen like a pattern; act / pre-activation otherwise): exact, because the
  neuron's output is that gain times a pre-activation that is linear in the terms.

A node's direction measures what it writes before any norm its term passes: where the stream has norms
inside it (post-LN blocks, post-sublayer norms), the direction its parent measures the residual by is
carried back, with every norm frozen at the token's scale, through the norms between the node's write and
the parent's read (``SequenceEdges.carry_back``, the stream's one backward walk), so its share stays exact;
the norms' betas are leaves. A node reached from several parents is one node: the directions its parents
carry add up, so its value is the sum of its outgoing edges. Each expanded node keeps its strongest inputs and one explicit
``rest`` input, so **its inputs sum to its value** (to float rounding). Embeddings, biases, norm betas,
``rest`` and nodes at the depth limit are leaves.
"""

from __future__ import annotations

import heapq
import json
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import xarray as xr

from ..attention import require_patterns
from ..errors import StreamtapError
from .edges import SequenceEdges
from ._store import final_norm, local, require, static
from ._vocab import token_ids, vocab_text

EXPANDABLE = ("head", "mlp", "neuron")
NEURONPEDIA_SCHEMA = ("hijohnnylin/neuronpedia apps/webapp/app/api/graph/graph-schema.json, schema version 1.0.0 "
                      "(commit 3c068b764d66fb500b2073b6887ab93ed02011ec, 2026-04-21)")


@dataclass
class _Node:
    node_id: str
    kind: str
    label: str
    layer: int
    head: int
    neuron: int
    position: int
    hop: int
    w: np.ndarray | None = None       # the direction measuring this node's output (expandable nodes)
    value: float = 0.0
    expanded: bool = False


@dataclass
class AttributionGraph:
    """An attribution graph: ``nodes`` and ``edges`` tables (pandas), ``qk`` (the QK edges attached to head
    nodes) and ``attrs`` (target, position, settings, the model's value of the root).

    ``edges`` rows are (source, target, weight, kind): ``weight`` is the source's contribution to the
    target's value; for every expanded node the weights of its incoming edges sum to its ``value``.
    """

    nodes: pd.DataFrame
    edges: pd.DataFrame
    qk: pd.DataFrame
    attrs: dict = field(default_factory=dict)
    prompt_tokens: list = field(default_factory=list)

    def inputs(self, node_id: str) -> pd.DataFrame:
        """The node's inputs, strongest first: (source, weight, kind) and the source's label and position."""
        rows = self.edges[self.edges.target == node_id].merge(
            self.nodes[["node_id", "label", "position", "kind"]].rename(columns={"node_id": "source", "kind": "source_kind"}),
            on="source", how="left")
        return rows.reindex(rows.weight.abs().sort_values(ascending=False).index)

    def to_xarray(self) -> xr.Dataset:
        """The tables as one labelled Dataset: (node) variables and (edge) variables."""
        nodes = self.nodes.set_index("node_id").to_xarray().rename(node_id="node")
        edges = self.edges.rename(columns={"kind": "edge_kind"}).rename_axis("edge").to_xarray()
        return xr.merge([nodes, edges]).assign_attrs(**{k: v for k, v in self.attrs.items()
                                                        if isinstance(v, (int, float, str))})

    def to_json(self, slug: str = "streamtap-graph") -> dict:
        """The graph in the attribution-graph JSON format Neuronpedia and circuit-tracer's frontend read
        (schema: ``NEURONPEDIA_SCHEMA``): nodes with ``node_id``, ``feature``, ``layer``, ``ctx_idx``,
        ``feature_type``, ``jsNodeId``, ``clerp``, ``activation``; ``links`` (source, target, weight); heads
        carry ``qk_tracing_results``; QK contributors that are not nodes are listed in ``qk_only_nodes``."""
        n_layers = int(self.attrs["n_layers"])
        types = {"embed": "embedding", "logit": "logit", "head": "attention head", "mlp": "mlp", "neuron": "mlp neuron",
                 "rest": "pruned rest"}

        def node_json(r) -> dict:
            layer = "E" if r.kind in ("embed", "pos_embed", "token_type_embed") else (n_layers if r.kind == "logit" else int(r.layer))
            feature = int(r.head) if r.kind == "head" else (int(r.neuron) if r.kind == "neuron" else None)
            out = {"node_id": r.node_id, "feature": feature, "layer": layer, "ctx_idx": int(r.position),
                   "feature_type": types.get(r.kind, r.kind), "jsNodeId": f"{r.node_id}-0", "clerp": r.label,
                   "activation": float(r.value), "influence": None}
            return out

        nodes = [node_json(r) for r in self.nodes.itertuples()]
        known = set(self.nodes.node_id)
        qk_only: dict = {}
        by_head: dict = {}
        for r in self.qk.itertuples():
            res = by_head.setdefault(r.head_node, {"pair_wise_contributors": [], "top_q_marginal_contributors": [],
                                                   "top_k_marginal_contributors": []})
            if r.part == "pair":
                res["pair_wise_contributors"].append([r.query_node, r.key_node, float(r.value)])
            elif r.part == "query":
                res["top_q_marginal_contributors"].append([r.query_node, float(r.value)])
            else:
                res["top_k_marginal_contributors"].append([r.key_node, float(r.value)])
            for node_id, label, pos in ((r.query_node, r.query_term, r.query_pos), (r.key_node, r.key_term, r.key_pos)):
                if isinstance(node_id, str) and node_id not in known and node_id not in qk_only:
                    qk_only[node_id] = {"node_id": node_id, "feature": None, "layer": "qk", "ctx_idx": int(pos),
                                        "feature_type": "qk term", "jsNodeId": f"{node_id}-0", "clerp": str(label)}
        for node in nodes:
            if node["node_id"] in by_head:
                node["qk_tracing_results"] = by_head[node["node_id"]]
        links = [{"source": r.source, "target": r.target, "weight": float(r.weight)} for r in self.edges.itertuples()]
        meta = {"slug": slug, "scan": str(self.attrs.get("model_name", "unknown")),
                "prompt_tokens": [str(t) for t in self.prompt_tokens], "prompt": "".join(str(t) for t in self.prompt_tokens),
                "info": {"description": f"streamtap exact attribution graph of {self.attrs['target_label']} at position "
                                        f"{self.attrs['position']} (sequence {self.attrs['seq']}); patterns, norm scales "
                                        "and neuron gains frozen; every expanded node's inputs sum to its value",
                         "generator": {"name": "streamtap", "version": str(self.attrs.get("streamtap_version", "")),
                                       "url": "docs/analysis.md#attribution-graphs"},
                         "source_urls": [f"schema: {NEURONPEDIA_SCHEMA}"]},
                "pruning_settings": {"max_inputs": int(self.attrs["max_inputs"]), "min_share": float(self.attrs["min_share"]),
                                     "depth": int(self.attrs["depth"])}}
        out = {"metadata": meta, "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both"},
               "nodes": nodes, "links": links}
        if qk_only:
            out["qk_only_nodes"] = qk_only
        return out

    def save_json(self, path, slug: str = "streamtap-graph") -> None:
        with open(path, "w") as f:
            json.dump(self.to_json(slug), f)


def _target_id(ds: xr.Dataset, target, tokenizer) -> int:
    if target is None:
        return None
    return token_ids(ds, [target], tokenizer)[0]


def attribution_graph(ds: xr.Dataset, seq: int, target=None, *, position: int = -1, foil=None, direction=None,
                      depth: int = 3, max_inputs: int = 8, min_share: float = 0.01, qk: bool = True,
                      qk_top: int = 5, tokenizer=None, dtype=np.float32) -> AttributionGraph:
    """The attribution graph of one number at one position of a stored sequence, expanded through exact edges.

    The root is the logit of ``target`` (minus that of ``foil``) at ``position``, or the final residual
    read along ``direction``; see the module docstring for the nodes and edges. Exact: each expanded node's
    inputs (strongest ``max_inputs`` plus one ``rest``) sum to its value, the root's value is the model's
    logit, and every edge is a term's exact share under frozen patterns, norm scales and neuron gains.

    Parameters
    ----------
    ds : xarray.Dataset
        A store captured with ``patterns=True`` (``neurons=True`` too, to expand MLPs into neurons).
    seq : int
        The stored sequence.
    target, foil : str or int, optional
        Token (a string that is exactly one token, or an id); ``foil``: explain the difference.
    position : int
        The position whose prediction is explained (negative: from the end).
    direction : array (d_model,), optional
        Instead of a logit: the final residual at ``position`` read along this direction (no final norm).
    depth : int
        How many edges away from the root nodes are still expanded.
    max_inputs, min_share : int, float
        Pruning: an expanded node keeps at most ``max_inputs`` inputs, each at least ``min_share`` of the
        sum of its inputs' magnitudes; the others are summed into its ``rest`` input.
    qk : bool, qk_top : int
        Attach to each expanded head the QK edges of its strongest source (top ``qk_top`` pairs and marginals).
    tokenizer : optional
        Resolves ``target`` strings (else the store's own token texts do).
    dtype : numpy dtype

    Returns
    -------
    AttributionGraph

    Raises
    ------
    PatternsMissingError
        The store has no patterns (capture with ``--patterns``).
    StreamtapError
        A target that is not one token (the message shows how it tokenizes), a position or sequence out of
        range, no target and no direction (a store without an unembedding, e.g. BERT's, needs ``direction``).
    """
    require_patterns(ds)
    if (target is None) == (direction is None):
        raise StreamtapError("give a target token (target=' Paris', optionally foil=...) or a direction, not both")
    ctx = SequenceEdges(ds, seq, dtype=dtype, cache=1)
    p = ctx.position(position)
    L, H = ds.sizes["layer"], ds.sizes["head"]
    neurons = "W_in" in ds and "neuron_act" in ds and "W_out" in ds
    g = _Builder(ctx, ds, max_inputs, min_share, depth, neurons, qk, qk_top, dtype)

    # the root: the final residual at p along the folded target direction
    labels, kinds, t = ctx.terms(L, "final")
    if direction is not None:
        u = np.asarray(direction, dtype)
        w, consts, label = u, [], "direction"
        s = 1.0
    else:
        require(ds, "W_U")
        t_id, f_id = _target_id(ds, target, tokenizer), _target_id(ds, foil, tokenizer)
        V = ds.sizes["vocab"]
        for which, i in (("target", t_id), ("foil", f_id)):
            if i is not None and not 0 <= i < V:
                raise StreamtapError(f"{which} id {i} is outside the vocabulary (0..{V - 1})")
        U = np.asarray(local(ds["W_U"].isel(vocab=[t_id] + ([f_id] if f_id is not None else []))).values, dtype)
        u = U[0] - U[1] if f_id is not None else U[0]
        consts = []
        if "final_norm_kind" in ds.attrs:
            fn = final_norm(ds, dtype)
            s = float(fn.scale(np.asarray(local(ctx.sub["resid_final"].isel(token=p)).values, dtype)))
            w = s * fn.fold(u)
            if fn.beta is not None:
                consts.append(("final_norm_bias", float(u @ fn.beta)))
        else:   # post-LN: the stream's last norm is inside it, and the unembedding reads the residual itself
            s, w = 1.0, u
        if "unembed_bias" in ds:
            b_U = static(ds, "unembed_bias", dtype)
            consts.append(("unembed_bias", float(b_U[t_id] - (b_U[f_id] if f_id is not None else 0.0))))
        names = vocab_text(ds, [t_id] + ([f_id] if f_id is not None else []), tokenizer)
        label = f"logit[{names[0]!r}]" + (f" - logit[{names[1]!r}]" if f_id is not None else "")
    root = g.node("logit", label, L, -1, -1, p, 0)
    weights = np.concatenate([t[:, p] @ w, [v for _, v in consts]])
    root.value = float(weights.sum())

    end = ctx.reader(L, "final")

    def make(k):
        if k >= len(labels):
            return g.leaf(consts[k - len(labels)][0], "bias", p, 1), None, "direct"
        node = g.term_node(labels[k], kinds[k], p, 1)
        return node, g.raw(node, w, end), "direct"

    g.connect(root, weights, make)
    g.run()
    text = ctx.text if ctx.text is not None else [str(i) for i in ctx.ids]
    attrs = {"seq": ctx.seq, "position": p, "target_label": label, "depth": depth, "max_inputs": max_inputs,
             "min_share": min_share, "n_layers": L, "n_heads": H, "value": root.value, "final_norm_scale": s,
             "model_name": ds.attrs.get("model_name", ""), "streamtap_version": ds.attrs.get("streamtap_version", ""),
             "note": "every expanded node's inputs sum to its value; patterns, norm scales and neuron gains frozen"}
    return g.result(attrs, list(text))


class _Builder:
    """Nodes and edges as they are found; expands nodes from the end of the stream backwards."""

    def __init__(self, ctx: SequenceEdges, ds, max_inputs, min_share, depth, neurons, qk, qk_top, dtype):
        self.ctx, self.ds, self.dtype = ctx, ds, dtype
        self.max_inputs, self.min_share, self.depth = max_inputs, min_share, depth
        self.neurons, self.qk, self.qk_top = neurons, qk, qk_top
        self.nodes: dict[str, _Node] = {}
        self.edges: list[tuple] = []
        self.qk_rows: list[tuple] = []
        self.queue: list = []
        self.queued: set = set()
        self.att = ctx.att

    # -- nodes -----------------------------------------------------------------------------------------
    def node(self, kind, label, layer, head, neuron, position, hop) -> _Node:
        node_id = f"{label}@{position}"
        node = self.nodes.get(node_id)
        if node is None:
            node = self.nodes[node_id] = _Node(node_id, kind, label, int(layer), int(head), int(neuron), int(position), hop)
        node.hop = min(node.hop, hop)
        return node

    def leaf(self, label, kind, position, hop) -> _Node:
        return self.node(kind, label, -1, -1, -1, position, hop)

    def term_node(self, label: str, kind: str, position: int, hop: int) -> _Node:
        """The node of a decompose component (``L3H2``, ``L3_mlp``, ``embed``, a bias) at a position."""
        if kind == "head":
            layer, head = label[1:].split("H")
            return self.node("head", label, int(layer), int(head), -1, position, hop)
        if kind == "mlp":
            return self.node("mlp", label, int(label[1:].split("_")[0]), -1, -1, position, hop)
        return self.node(kind, label, -1, -1, -1, position, hop)

    def raw(self, node: _Node, w: np.ndarray, reader: int) -> np.ndarray | None:
        """The direction on what an expandable ``node`` writes (before any norm its term passes) that
        measures its share of the residual read at stream event ``reader`` as ``w`` measures that residual
        (``SequenceEdges.carry_back``); None for a leaf."""
        if node.kind not in EXPANDABLE:
            return None
        return self.ctx.carry_back(w, node.position, reader, "attn" if node.kind == "head" else "mlp", node.layer)

    @staticmethod
    def order(node: _Node) -> tuple:
        """Later in the stream first: a neuron after its MLP, an MLP after its layer's heads."""
        rank = {"head": 0, "mlp": 2, "neuron": 1}[node.kind]
        return (-node.layer, -rank, node.node_id)

    # -- edges -----------------------------------------------------------------------------------------
    def connect(self, target: _Node, weights: np.ndarray, make) -> None:
        """Keep the strongest of ``target``'s inputs (``weights``; ``make(k)`` -> (node, direction or None, kind)
        builds input k's node only when it is kept), sum the others into a ``rest`` leaf, and pass each kept
        expandable input the direction its weight was measured by."""
        target.expanded = True
        weights = np.asarray(weights, np.float64)
        if weights.size == 0:
            return
        total = np.abs(weights).sum()
        order = np.argsort(-np.abs(weights), kind="stable")[:self.max_inputs]
        keep = [k for k in order if weights[k] != 0 and abs(weights[k]) >= self.min_share * total]
        for k in keep:
            node, w, kind = make(int(k))
            self.edges.append((node.node_id, target.node_id, float(weights[k]), kind))
            node.value += float(weights[k])
            if node.kind in EXPANDABLE and w is not None:
                node.w = w if node.w is None else node.w + w
                if node.hop < self.depth and node.node_id not in self.queued:
                    self.queued.add(node.node_id)
                    heapq.heappush(self.queue, (self.order(node), node.node_id))
        if len(keep) < weights.size:
            rest = float(weights.sum() - weights[keep].sum())
            leaf = self.leaf(f"rest:{target.label}", "rest", target.position, target.hop + 1)
            leaf.value += rest
            self.edges.append((leaf.node_id, target.node_id, rest, "rest"))

    def run(self) -> None:
        while self.queue:
            _, node_id = heapq.heappop(self.queue)
            node = self.nodes[node_id]
            if node.expanded:
                continue
            {"head": self.expand_head, "mlp": self.expand_mlp, "neuron": self.expand_neuron}[node.kind](node)

    # -- expansions ----------------------------------------------------------------------------------------
    def _fold(self, v: np.ndarray, gamma, center: bool) -> np.ndarray:
        w = v * gamma
        return w - w.mean() if center else w

    def expand_head(self, node: _Node) -> None:
        ctx, att = self.ctx, self.att
        l, h, i = node.layer, node.head, node.position
        labels, kinds, a, s = ctx.attn_input(l)
        A = ctx.pattern(l, h)[i]
        kv = att.kv[h]
        vo = att.W_V[l, kv] @ (att.W_O[l, h] @ node.w)                         # (d_model,): W_V W_O w
        contrib = (a @ vo) * A[None]                                            # (C, source)
        child = vo if att.norm is None else self._fold(vo, att.norm[0][l], att.norm[2])
        C, n = contrib.shape
        weights = contrib.ravel()
        bias = None
        if att.b["V"] is not None:
            bias = float(A.sum() * (att.b["V"][l, kv] @ (att.W_O[l, h] @ node.w)))
            weights = np.append(weights, bias)

        reader = ctx.reader(l, "attn")

        def make(k):
            if k == C * n:
                return self.leaf(f"L{l}H{h}_b_V", "value_bias", i, node.hop + 1), None, "ov"
            c, j = divmod(k, n)
            term = self.term_node(labels[c], kinds[c], j, node.hop + 1)
            return term, self.raw(term, child * (A[j] * s[j]), reader), "ov"

        self.connect(node, weights, make)
        if self.qk:
            self.attach_qk(node, int(np.argmax(np.abs(contrib.sum(0)))))

    def attach_qk(self, node: _Node, j: int) -> None:
        ql, _, kl, _, matrix, alibi, score = self.ctx.qk(node.layer, node.head, node.position, j)
        i, k = node.position, self.qk_top
        qid = [f"{x}@{i}" for x in ql]
        kid = [f"{x}@{j}" for x in kl]
        head_id = node.node_id
        flat = np.argsort(-np.abs(matrix), axis=None)[:k]
        for f in flat:
            a, b = np.unravel_index(f, matrix.shape)
            self.qk_rows.append((head_id, "pair", qid[a], ql[a], i, kid[b], kl[b], j, float(matrix[a, b]), score))
        bq, bk = matrix.sum(1), matrix.sum(0)
        for a in np.argsort(-np.abs(bq))[:k]:
            self.qk_rows.append((head_id, "query", qid[a], ql[a], i, None, None, j, float(bq[a]), score))
        for b in np.argsort(-np.abs(bk))[:k]:
            self.qk_rows.append((head_id, "key", None, None, i, kid[b], kl[b], j, float(bk[b]), score))
        if alibi:
            self.qk_rows.append((head_id, "alibi", None, "alibi", i, None, "alibi", j, float(alibi), score))

    def expand_mlp(self, node: _Node) -> None:
        l, i = node.layer, node.position
        if not self.neurons:
            node.expanded = True          # a leaf: without neurons=True the MLP is one term
            return
        act = self._act(l, i)
        W_out = self.ctx._static("W_out", l)                                     # (neuron, d_model)
        g = W_out @ node.w
        contrib = act * g
        weights = contrib
        bias = self.ctx._static("mlp_bias", l) @ node.w if "mlp_bias" in self.ds else 0.0
        if bias:
            weights = np.append(weights, bias)

        def make(k):
            if k == contrib.size:
                return self.leaf(f"L{l}_mlp_bias", "bias", i, node.hop + 1), None, "neuron"
            return self.node("neuron", f"L{l}N{k}", l, -1, k, i, node.hop + 1), node.w, "neuron"

        self.connect(node, weights, make)

    def _act(self, l: int, i: int) -> np.ndarray:
        if "act" not in self.ctx._statics:   # the sequence's activations, read once (token, layer, neuron)
            self.ctx._statics["act"] = np.asarray(local(self.ctx.sub["neuron_act"]).values, self.dtype)
        return self.ctx._statics["act"][i, l]

    def expand_neuron(self, node: _Node) -> None:
        ctx = self.ctx
        l, n, i = node.layer, node.neuron, node.position
        g = float(ctx._static("W_out", l)[n] @ node.w)                           # the neuron's output along w, per unit act
        out = ctx.mlp(l, i, [n])
        up = out["in"][:, 0]
        pre = up.sum()
        act = float(self._act(l, i)[n])
        gain = act / pre if pre != 0 else 0.0                                    # act(gate) for a gated MLP, act/pre else
        contrib = up * gain * g
        labels, kinds, _, s = ctx.mlp_input(l)
        W_in = ctx._static("W_in", l)[:, n]
        if "mlp_norm_weight" in self.ds:
            gamma = ctx._static("mlp_norm_weight", l)
            child = self._fold(W_in, gamma, self.ds.attrs["mlp_norm_kind"] == "layernorm")
        else:
            child = W_in
        reader = ctx.reader(l, self.ds.attrs.get("mlp_reads", "mlp"))

        def make(c):
            label, kind = out["labels"][c], out["kinds"][c]
            if kind in ("norm_beta", "mlp_in_bias"):
                return self.leaf(label, kind, i, node.hop + 1), None, "mlp_in"
            term = self.term_node(label, kind, i, node.hop + 1)
            return term, self.raw(term, child * (gain * g * s[i]), reader), "mlp_in"

        self.connect(node, contrib, make)

    # -- the result --------------------------------------------------------------------------------------
    def result(self, attrs: dict, prompt_tokens: list) -> AttributionGraph:
        used = {e[0] for e in self.edges} | {e[1] for e in self.edges}
        text = prompt_tokens
        rows = []
        for nd in self.nodes.values():
            if nd.node_id not in used:
                continue
            rows.append({"node_id": nd.node_id, "kind": nd.kind, "label": nd.label, "layer": nd.layer, "head": nd.head,
                         "neuron": nd.neuron, "position": nd.position, "token": text[nd.position], "value": nd.value,
                         "expanded": nd.expanded and nd.kind in EXPANDABLE + ("logit",), "hop": nd.hop})
        nodes = pd.DataFrame(rows)
        edges = pd.DataFrame(self.edges, columns=["source", "target", "weight", "kind"])
        qk = pd.DataFrame(self.qk_rows, columns=["head_node", "part", "query_node", "query_term", "query_pos",
                                                 "key_node", "key_term", "key_pos", "value", "score"])
        return AttributionGraph(nodes, edges, qk, attrs, prompt_tokens)


__all__ = ["AttributionGraph", "attribution_graph", "NEURONPEDIA_SCHEMA"]
