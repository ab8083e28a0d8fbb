"""The report's attention-patterns section: each head's sink, previous-token and induction scores as
layer x head grids and tables, and the query x key heatmaps of the heads worth seeing (stores captured
with patterns; the section says what is missing otherwise)."""

from __future__ import annotations

import numpy as np

from ..analysis import attention, head_scores
from ..attention import sequence_tokens
from ..errors import PatternsMissingError
from . import figures as F
from ._sections import _Page, _q, _top_heads

SCORE_TOKENS = 1024     # the longest sequence head scores are computed over in a report
HEATMAP_QUERIES = 40    # the heatmaps show at most this many queries, up to the attributed token


def _score_sequences(ds, sub, row, n: int) -> list[int]:
    """Up to ``n`` sequences for the head scores: the attributed token's first, then the sample's in order,
    each at most SCORE_TOKENS long (a pattern is tokens x tokens per head)."""
    seqs, counts = np.unique(np.asarray(ds["seq"].values), return_counts=True)
    length = dict(zip(seqs.tolist(), counts.tolist()))
    order = [int(ds["seq"].values[row])] + [int(q) for q in dict.fromkeys(np.asarray(sub["seq"].values).tolist())]
    out: list[int] = []
    for q in order:
        if q not in out and length[q] <= SCORE_TOKENS:
            out.append(q)
        if len(out) == n:
            break
    return out


def _patterns(page: _Page, ds, sub, row, contrib, target_id, text, n_seqs: int) -> None:
    """Head scores (sinks, off heads, previous-token, induction) as layer x head grids, and the attention
    heatmaps of the heads that matter for the prediction and of the strongest head of each kind."""
    page.h2("Attention patterns", "patterns")
    if not ds.attrs.get("patterns"):
        page.missing("this store was captured without patterns: capture with --patterns (patterns=True) to see "
                     "attention heatmaps and each head's sink, previous-token and induction scores")
        return
    seqs = _score_sequences(ds, sub, row, n_seqs)
    if not seqs:
        page.missing(f"every stored sequence is longer than {SCORE_TOKENS:,} tokens, too long to score in a report; "
                     "use streamtap.analysis.head_scores(ds, seqs=...) directly")
        return
    try:
        scores = head_scores(ds, seqs=seqs)
    except PatternsMissingError as exc:
        page.missing(str(exc))
        return
    n_tokens = int(np.isin(np.asarray(ds["seq"].values), seqs).sum())
    page.p(f"Every head's attention, recomputed from the store over {len(seqs)} sequence{'s' if len(seqs) > 1 else ''} "
           f"({', '.join(map(str, seqs))}; {n_tokens:,} tokens; the attributed token's first), scored as the mean "
           f"share of attention a query puts on the first token (sink mass), on the token just before it "
           f"(previous token) and on the tokens that followed earlier copies of itself (induction: A B ... A reads "
           f"B). A cross marks heads that are off: at half their queries or more they park at least "
           f"{scores.attrs['off_mass']:.0%} of their attention on the sink while its source message is below "
           f"{scores.attrs['off_norm']:g} times the head's typical one, so they add almost nothing there.")
    if int(scores.induction_queries.max()) == 0:
        page.p("No token repeats in these sequences, so there is nothing to score induction on: "
               "streamtap.induction_probe(model, store) captures a repeated random sequence for it.", "note")
    page.figure(F.head_score_grid(scores), "head score grid")
    ranked = {}
    for name in ("sink_mass", "off", "previous_token", "induction", "duplicate_token"):
        flat = scores[name].stack(h=("layer", "head"))
        order = np.argsort(-flat.values, kind="stable")[:5]
        ranked[name] = [(int(flat.layer.values[i]), int(flat["head"].values[i]), float(flat.values[i])) for i in order]
    page.table([{"rank": r + 1, **{F.SCORE_NAMES[name]: f"L{layer}H{h} {v:.2f}"
                                   for name, ((layer, h, v)) in ((nm, ranked[nm][r]) for nm in ranked)}}
                for r in range(min(5, len(ranked["sink_mass"])))], "head_scores_top",
               caption="the five strongest heads of each score", left=tuple(F.SCORE_NAMES[n] for n in ranked))
    page.csv([{"layer": int(layer), "head": int(h), **{name: float(scores[name].sel(layer=layer, head=h))
                                                       for name in F.SCORE_NAMES}}
              for layer in scores.layer.values for h in scores["head"].values], "head_scores")
    _heatmaps(page, ds, row, contrib, target_id, text, scores, ranked)


def _heatmaps(page: _Page, ds, row, contrib, target_id, text, scores, ranked) -> None:
    """Query x key heatmaps over the attributed token's passage of the heads worth seeing, each with why."""
    notes: dict[tuple[int, int], list[str]] = {}
    if contrib is not None:
        tgt = _q(text([target_id])[0])
        for layer, h, v in _top_heads(contrib, 3):
            notes.setdefault((layer, h), []).append(f"DLA {v:+.2f} to {tgt}")
    for name, label in (("previous_token", "previous token"), ("induction", "induction"), ("sink_mass", "sink")):
        if int(scores[f"{name}_queries"].max()) == 0:
            continue
        layer, h, v = ranked[name][0]
        extra = f", off {float(scores.off.sel(layer=layer, head=h)):.0%}" if name == "sink_mass" else ""
        notes.setdefault((layer, h), []).append(f"top {label} {v:.2f}{extra}")
    if not notes:
        return
    seq = int(ds["seq"].values[row])
    rows = sequence_tokens(ds, seq)
    at = int(np.flatnonzero(rows == row)[0])
    queries = np.arange(max(0, at + 1 - HEATMAP_QUERIES), at + 1)
    keys = queries if queries[0] == 0 else np.concatenate([[0], queries])
    heads = list(notes)
    att = attention(ds, seq, layers=sorted({layer for layer, _ in heads}), heads=sorted({h for _, h in heads}))
    att = att.isel(query=queries, key=keys).compute()    # every chosen layer x head: one replay of the sequence
    cropped = (f"; the last {len(queries)} queries up to the attributed token, with the first token kept as a key "
               f"(a white line marks the gap)" if queries[0] > 0 else "")
    why = (["the three heads with the largest direct contribution to the prediction (DLA)"] if contrib is not None else [])
    why += [f"the strongest {label} head by the scores above" for name, label in
            (("previous_token", "previous-token"), ("induction", "induction"), ("sink_mass", "sink"))
            if int(scores[f"{name}_queries"].max()) > 0]
    page.p(f"Attention patterns over sequence {seq} up to the attributed token{cropped}: {', '.join(why)} (each "
           f"panel's title says why its head is shown). Row i is what query i reads; each row sums to 1. The "
           f"probabilities are in data/attention_patterns.csv.")
    page.figure(F.attention_heatmap(att, heads, notes={k: "; ".join(v) for k, v in notes.items()},
                                    title=f"attention patterns, sequence {seq} (grey: keys the query cannot see)"),
                "attention heatmaps")
    values = {(layer, h): att.sel(layer=layer, head=h).values for layer, h in heads}
    qt = att["query_text"].values if "query_text" in att.coords else att["query_token_id"].values
    kt = att["key_text"].values if "key_text" in att.coords else att["key_token_id"].values
    page.csv([{"head": f"L{layer}H{h}", "why": "; ".join(notes[(layer, h)]), "query pos": int(att.query_pos.values[i]),
               "query": str(qt[i]), "key pos": int(att.key_pos.values[j]), "key": str(kt[j]),
               "probability": float(values[(layer, h)][i, j])}
              for layer, h in heads for i in range(att.sizes["query"]) for j in range(att.sizes["key"])
              if values[(layer, h)][i, j] > 0], "attention_patterns")
