"""The report's section on a capture's summaries (``summarise=``): each head's top contexts, those of the
few neurons with the largest activations, and every component's statistics as CSV. Kept apart from
``page.py``: it only adds to the page it is handed."""

from __future__ import annotations

import numpy as np

from ..errors import StreamtapError

ANCHOR, TITLE = "summaries", "Top contexts"
CONTEXTS = 3      # top contexts shown per head and per neuron
NEURONS = 8       # neurons shown: those with the largest activation seen


def section(page, ds, tokenizer=None) -> None:
    """Add the section to ``page`` (a ``report.page._Page``); a store without summaries says so."""
    from ..analysis.summaries import context_text, summaries

    page.h2(TITLE, ANCHOR)
    try:
        res = summaries(ds, q=(0.5, 0.99), text=False)
    except StreamtapError as exc:
        page.missing(str(exc))
        return
    first = next(iter(res.values()))
    page.p(f"Kept while capturing over every real token the model saw ({first.attrs['tokens']:,} tokens in "
           f"{first.attrs['sequences']:,} of the store's {first.attrs['committed_sequences']:,} sequences), stored "
           f"or not, with a quantile sketch ({first.attrs['sketch']}). A context is the text around the top "
           "token, which is in brackets. Every component's statistics are in data/summary_stats_*.csv.")
    if "head" in res:
        _contexts(page, res["head"], context_text(res["head"], ds, tokenizer), "summary_heads",
                  f"each head's top {CONTEXTS} contexts by the norm of its output")
    if "neuron" in res:
        picks = np.argsort(-np.nan_to_num(res["neuron"]["max"].values, nan=-np.inf), kind="stable")[:NEURONS]
        some = res["neuron"].isel(component=picks)
        _contexts(page, some, context_text(some, ds, tokenizer), "summary_neurons",
                  f"the top {CONTEXTS} contexts of the {len(picks)} neurons with the largest activation seen")
    for group, r in res.items():
        quantile = r["quantile"].values if "quantile" in r else np.full((r.sizes["component"], 2), np.nan)
        page.csv([{"component": str(r.component.values[c]), "count": int(r["count"].values[c]),
                   "mean": float(r["mean"].values[c]), "std": float(r["std"].values[c]),
                   "min": float(r["min"].values[c]), "max": float(r["max"].values[c]),
                   "median": float(quantile[c, 0]), "q99": float(quantile[c, 1])}
                  for c in range(r.sizes["component"])], f"summary_stats_{group}")


def _contexts(page, r, text, name: str, caption: str) -> None:
    rows = [{"component": str(r.component.values[c]), "rank": k + 1, "value": float(r.top_value.values[c, k]),
             "seq": int(r.top_seq.values[c, k]), "pos": int(r.top_pos.values[c, k]), "context": str(text.values[c, k])}
            for c in range(r.sizes["component"]) for k in range(min(CONTEXTS, r.sizes["rank"]))
            if r.top_seq.values[c, k] >= 0]
    page.table(rows, name, caption=caption, left=("component", "context"))


__all__ = ["section", "ANCHOR", "TITLE"]
