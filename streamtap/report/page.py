"""A self-contained HTML report of a store: figures (embedded as PNG) and the numbers behind them.

    streamtap report run.zarr --out report/            # report/index.html, report/data/*.csv
    write_report("run.zarr", "report/", token=-1, words=[" France", " Paris"])

Sections: the store and its exactness; direct logit attribution of one token's prediction to heads
and MLPs; the logit lens at that token; token-to-token relevance and promotion maps of the heads
whose maps vary most; effective ranks of fused and factored attention matrices; message norms and
near-empty heads; the residual as an accumulating prediction. Per-token statistics are computed over
the first ``sample`` tokens, so the cost of a report is bounded by ``sample``, not by the size of the
store. A section whose inputs the store lacks (attention weights, say) says so.
The page needs nothing outside itself: no scripts or styles are fetched; the CSV files next to it
repeat the tables for other tools.
"""

from __future__ import annotations

import base64
import html
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import xarray as xr

from .. import __version__
from ..analysis import (accumulation_pca, direct_logit_attribution, effective_rank, empty_message_summary,
                        empty_messages, logit_lens, promotion, relevance, vocab_text)
from ..analysis._store import MissingWeightsError, is_rotary
from ..analysis._vocab import corpus_vocab, token_ids
from ..analysis.circuits import ROTARY_NOTE
from ..analysis.empty import NEAR_EMPTY, token_frequencies
from ..dataset import open as open_store
from ..errors import InputError
from ..invariant import verify
from . import figures as F

STYLE = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1180px;color:#1b1b1b;padding:0 1rem}
h1{font-size:1.6rem;margin-bottom:.2rem}h2{font-size:1.2rem;margin-top:2.2rem;border-bottom:1px solid #ddd;padding-bottom:.2rem}
table{border-collapse:collapse;margin:.6rem 0;font-size:12.5px}td,th{border:1px solid #ddd;padding:2px 7px;text-align:right}
th{background:#f4f4f4}td.l,th.l{text-align:left}img{max-width:100%;height:auto;display:block;margin:.6rem 0}
.note{color:#555;font-size:12.5px}.missing{background:#fff6e5;border:1px solid #f0c36d;padding:.5rem .8rem}
code{background:#f4f4f4;padding:0 3px}details{margin:.4rem 0}
"""

CHECK = """
window.__errors = [];
window.addEventListener("error", function (e) { window.__errors.push(String(e.message || e.type)); }, true);
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  var broken = imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0); });
  document.body.setAttribute("data-images", String(imgs.length));
  document.body.setAttribute("data-broken", broken.map(function (i) { return i.alt; }).join("|"));
  document.body.setAttribute("data-errors", window.__errors.join("|"));
  document.body.setAttribute("data-rendered", broken.length || window.__errors.length ? "error" : "ok");
});
"""


class _Page:
    """The report being written: its HTML parts in order, and the CSV tables written beside it."""

    def __init__(self, out: Path):
        self.parts: list[str] = []
        self.out = out
        self.figures = 0
        self.tables: list[str] = []

    def add(self, s: str) -> None:
        self.parts.append(s)

    def h2(self, title: str, anchor: str) -> None:
        self.add(f'<h2 id="{anchor}">{html.escape(title)}</h2>')

    def p(self, text: str, cls: str = "") -> None:
        self.add(f'<p class="{cls}">{html.escape(text)}</p>' if cls else f"<p>{html.escape(text)}</p>")

    def missing(self, why: str) -> None:
        self.add(f'<p class="missing">Not available for this store: {html.escape(why)}</p>')

    def figure(self, fig, alt: str) -> None:
        overflow = F.overflowing_text(fig)  # shown on the page (and checked by its browser test)
        data = base64.b64encode(F.png_bytes(fig)).decode()
        self.figures += 1
        self.add(f'<img alt="{html.escape(alt)}" data-overflow="{html.escape("|".join(overflow))}" '
                 f'src="data:image/png;base64,{data}">')

    def table(self, rows: list[dict], name: str, caption: str = "", left=()) -> None:
        """An HTML table, and the same rows as data/<name>.csv."""
        if not rows:
            return
        cols = list(rows[0])
        head = "".join(f'<th class="{"l" if c in left else ""}">{html.escape(str(c))}</th>' for c in cols)
        body = "".join("<tr>" + "".join(f'<td class="{"l" if c in left else ""}">{html.escape(_fmt(r[c]))}</td>'
                                         for c in cols) + "</tr>" for r in rows)
        cap = f"<caption class='note'>{html.escape(caption)}</caption>" if caption else ""
        self.add(f"<table>{cap}<tr>{head}</tr>{body}</table>")
        self.tables.append(name)
        import csv

        (self.out / "data").mkdir(exist_ok=True)
        with open(self.out / "data" / f"{name}.csv", "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=cols)
            w.writeheader()
            w.writerows(rows)


def _fmt(v) -> str:
    """A table cell: floats to four significant digits."""
    if isinstance(v, (float, np.floating)):
        return f"{v:.4g}"
    return str(v)


def _q(s: str) -> str:
    """Token text quoted, so that leading spaces and escapes show."""
    return repr(str(s))


def write_report(store, out_dir, *, token: int | None = None, target=None, words=None, k: int = 10,
                 sample: int = 4096, tokenizer=None, heads: int = 6, storage_options: dict | None = None) -> Path:
    """Write the HTML report of a store: ``out_dir/index.html`` and ``out_dir/data/*.csv``.

    The page is self-contained (figures embedded as PNG, nothing fetched). It is built beside
    ``out_dir`` and moved into place when finished, so a failed report leaves nothing and a reader
    never sees half a report. Sections whose weights the store lacks say so instead of failing.

    Parameters
    ----------
    store : str, os.PathLike, zarr store or xarray.Dataset
        What ``streamtap.open`` accepts, or an already opened store.
    out_dir : str or os.PathLike
        The directory to write to (created if needed).
    token : int, optional
        The store row to attribute and read the logit lens at (default: the last; negative
        values count from the end).
    target : int or str, optional
        A vocabulary id, or one token's text (resolved with the tokenizer, else among the stored
        tokens); default: the model's top-1 prediction at that token.
    words : sequence of int or str, optional
        The tokens of the relevance and promotion maps (default: the six most frequent tokens of
        the sample).
    k : int
        How many top tokens the logit lens keeps.
    sample : int
        How many tokens, from the first, the per-token statistics use (the accumulation section
        uses at most the first 1024 of them).
    tokenizer : optional
        Gives token texts and resolves ``words``; by default the store's model's tokenizer where it
        can be loaded offline (:func:`store_tokenizer`), else the text of the stored tokens.
    heads : int
        How many heads the relevance and promotion maps show.
    storage_options : dict, optional
        For a URL (``s3://...``): options of its fsspec filesystem.

    Returns
    -------
    pathlib.Path
        The path of ``index.html``.

    Raises
    ------
    InputError
        The store holds no tokens, ``token`` is out of range, or ``out_dir`` is something else than
        a report.
    StreamtapError
        A ``target`` or ``words`` string that does not resolve to one token.
    """
    started = time.perf_counter()
    ds = store if isinstance(store, xr.Dataset) else open_store(store, storage_options=storage_options)
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "index.html").exists())):
        raise InputError(f"{out} exists and is not a streamtap report (no index.html); a report replaces only "
                         "an earlier report. Choose another --out or remove it yourself")
    n_tok = ds.sizes["token"]
    if n_tok == 0:
        raise InputError("the store holds no tokens; nothing to report")
    if token is not None and not -n_tok <= token < n_tok:
        raise InputError(f"token {token} is out of range: the store holds {n_tok:,} tokens, rows 0..{n_tok - 1} "
                         f"(or -{n_tok}..-1 from the end)")
    if tokenizer is None:
        tokenizer = store_tokenizer(ds)
    text = (lambda ids: vocab_text(ds, ids, tokenizer))  # noqa: E731
    sub = ds.isel(token=slice(0, min(sample, n_tok)))
    row = (n_tok - 1) if token is None else (token % n_tok)
    one = ds.isel(token=[row])
    # everything is written into a folder beside the target and moved into place at the end: a
    # failed report leaves nothing behind, a finished one replaces the previous one whole
    out.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        path = _build(ds, building, store, sub, one, row, target, words, tokenizer, heads, k, text, started)
        _replace(building, out)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    return out / path.name


def store_tokenizer(ds: xr.Dataset):
    """The tokenizer of the model that made the store, where it can be loaded without the network
    (the embedded default once converted, a local model directory or the Hugging Face cache); else
    None, and token texts come from the stored corpus."""
    name = ds.attrs.get("model_name") or ""
    try:
        from transformers import AutoTokenizer

        from ..models.smollm2 import SMOLLM2_NAMES, cached_smollm2_dir

        if name.lower() in SMOLLM2_NAMES:
            directory = cached_smollm2_dir()
            return AutoTokenizer.from_pretrained(str(directory)) if directory is not None else None
        if not name or ":" in name:  # tiny:ARCH and the like: no tokenizer of their own on disk
            return None
        return AutoTokenizer.from_pretrained(name, local_files_only=True)
    except Exception:  # noqa: BLE001 - no tokenizer to be had offline: the stored text serves
        return None


def _replace(built: Path, out: Path) -> None:
    """Put the finished report in place of ``out`` (an earlier report is removed only now)."""
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(built, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(built, out)


def _build(ds, out: Path, store, sub, one, row, target, words, tokenizer, heads, k, text, started) -> Path:
    page = _Page(out)

    _summary(page, ds, sub, store)
    target_id = _attribution(page, ds, one, row, target, text, k, tokenizer)
    _lens(page, one, row, target_id, text, k)
    _maps(page, ds, sub, words, tokenizer, heads)
    _ranks(page, ds)
    _empty(page, sub)
    _accumulation(page, sub.isel(token=slice(0, min(1024, sub.sizes["token"]))), text)

    title = f"streamtap report: {ds.attrs.get('model_name', '?')}"
    toc = "".join(f'<li><a href="#{a}">{t}</a></li>' for a, t in (
        ("store", "Store"), ("attribution", "Direct logit attribution"), ("lens", "Logit lens"),
        ("maps", "Relevance and promotion"), ("ranks", "Effective ranks"), ("empty", "Empty messages"),
        ("accumulation", "Accumulating prediction")))
    doc = (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
           f"<meta name='viewport' content='width=device-width,initial-scale=1'><style>{STYLE}</style>"
           f"<script>{CHECK}</script></head><body><h1>{html.escape(title)}</h1>"
           f"<p class='note'>Written by streamtap {__version__} in {time.perf_counter() - started:.1f} s from "
           f"{html.escape(str(store) if not isinstance(store, xr.Dataset) else 'a dataset')}. Tables are also in "
           f"<code>data/</code> as CSV.</p><ul>{toc}</ul>{''.join(page.parts)}</body></html>")
    path = out / "index.html"
    path.write_text(doc, encoding="utf-8")
    return path


# -- sections ----------------------------------------------------------------------------------------
def _summary(page: _Page, ds, sub, store) -> None:
    """The store's facts, and its decomposition error over the sample."""
    a = ds.attrs
    page.h2("Store", "store")
    err = verify(sub, raise_on_error=False)
    rows = [{"property": k, "value": v} for k, v in (
        ("model", a.get("model_name", "?")), ("layout", a.get("layout", "?")), ("dtype", a.get("dtype", "?")),
        ("tokens", f"{ds.sizes['token']:,}"), ("sequences", f"{len(np.unique(ds.seq.values)):,}"),
        ("layers", ds.sizes["layer"]), ("heads", ds.sizes["head"]), ("d_head", ds.sizes["d_head"]),
        ("d_model", ds.sizes["d_model"]), ("vocabulary", ds.sizes.get("vocab", "none")),
        ("tied embeddings", bool(a.get("tied_embeddings", False))),
        ("positions", "rotary" if is_rotary(ds) else ("learned" if "pos_embed" in ds else "none stored")),
        ("attention weights (W_Q, W_K, W_V)", "stored" if all(n in ds for n in ("W_Q", "W_K", "W_V")) else "not stored"),
        ("what else acts on q, k, v", "; ".join(a.get("attn_notes", [])) or "nothing noted"),
        (f"max decomposition error (first {sub.sizes['token']:,} tokens)",
         f"{err.attrs['max_rel_error']:.2g} relative (tolerance {err.attrs['tolerance']:g})"))]
    page.table(rows, "store", left=("property", "value"))


def _attribution(page: _Page, ds, one, row, target, text, k, tokenizer=None) -> int | None:
    """Direct logit attribution at one token; returns the target id it used (None without W_U)."""
    page.h2("Direct logit attribution", "attribution")
    if "W_U" not in ds:
        page.missing("the store has no unembedding (W_U)")
        return None
    final = logit_lens(one, k=1, sites=()).isel(token=0, depth=-1).compute()
    if target is None:
        target_id = int(final.top_id.values[0])
    else:
        target_id = token_ids(ds, [target], tokenizer)[0] if isinstance(target, str) else int(target)
    contrib = direct_logit_attribution(one, target_id).isel(token=0).compute()
    model = logit_lens(one, k=1, sites=(), target=target_id).isel(token=0, depth=-1).compute()
    where = _where(one)
    tgt = _q(text([target_id])[0])
    page.p(f"Token {where}: the direct contribution of every component to the logit of {tgt} "
           f"(id {target_id}), through the final norm with this token's frozen scale. Their sum is "
           f"{float(contrib.sum()):.4f}; the model's logit is {float(model.target_logit):.4f} "
           f"(probability {float(model.target_prob):.3f}, rank {int(model.target_rank)}).")
    if "softcap" in contrib.attrs:
        page.p(f"The model soft-caps its logits (cap {contrib.attrs['softcap']:g}); the contributions add up to the "
               "logit before the cap.", "note")
    page.figure(F.contribution_heatmap(contrib, title=f"direct contributions to {tgt} at {where}"),
                "contribution heatmap")
    order = np.argsort(-np.abs(contrib.values))[:20]
    page.table([{"component": str(contrib.component.values[i]), "kind": str(contrib.kind.values[i]),
                 "contribution": float(contrib.values[i])} for i in order], "attribution_top",
               caption="the 20 largest contributions in absolute value", left=("component", "kind"))
    by_kind = contrib.groupby("kind").sum()
    page.table([{"kind": str(kd), "total": float(v)} for kd, v in zip(by_kind.kind.values, by_kind.values)],
               "attribution_by_kind", caption="totals by kind", left=("kind",))
    return target_id


def _where(one) -> str:
    """A token as the page names it: its seq, pos and text."""
    t = one.isel(token=0)
    s = f"seq {int(t.seq)}, pos {int(t.pos)}"
    if "text" in t.coords:
        s += f" ({_q(t.text.values)})"
    return s


def _lens(page: _Page, one, row, target_id, text, k) -> None:
    """The logit lens at one token, following the attribution's target."""
    page.h2("Logit lens", "lens")
    if "W_U" not in one:
        page.missing("the store has no unembedding (W_U)")
        return
    lens = logit_lens(one, k=k, target=target_id).isel(token=0).compute()
    page.p(f"The residual entering every layer, and the final residual, read through the final norm "
           f"(each with its own scale) and the unembedding, at {_where(one)}.")
    page.figure(F.logit_lens_table(lens, text, k=min(k, 6), title=f"logit lens at {_where(one)}"), "logit lens table")
    ids = lens.top_id.values
    words = text(ids)
    rows = []
    for d in range(lens.sizes["depth"]):
        r = {"depth": str(lens.depth.values[d])}
        for j in range(min(k, 5)):
            r[f"top {j + 1}"] = f"{_q(words[d, j])} {lens.top_prob.values[d, j]:.3f}"
        if target_id is not None:
            r["target prob"] = float(lens.target_prob.values[d])
            r["target rank"] = int(lens.target_rank.values[d])
        rows.append(r)
    page.table(rows, "logit_lens", left=tuple(rows[0]) if rows else ())


def _default_words(ds, sub, n=6) -> list[int]:
    """The ``n`` most frequent token ids of the sample."""
    counts = token_frequencies(sub).values
    return [int(i) for i in np.argsort(-counts, kind="stable")[:n] if counts[i] > 0]


def _maps(page: _Page, ds, sub, words, tokenizer, heads) -> None:
    """Relevance and promotion maps of the heads whose maps vary most, with their raw values."""
    page.h2("Relevance and promotion", "maps")
    try:
        ids = token_ids(ds, words, tokenizer) if words else _default_words(ds, sub)
        rel = relevance(ds, ids, tokenizer=tokenizer)
        pro = promotion(ds, ids, tokenizer=tokenizer)
    except MissingWeightsError as exc:
        page.missing(str(exc))
        return
    names = ", ".join(_q(t) for t in rel.query_text.values)
    page.p(f"For the tokens {names}: relevance E W_QK E^T (how much a query token attends to a key token, "
           f"shown as the softmax over these keys of the scaled score) and promotion E W_OV W_U^T (how far "
           f"above a typical token a source token's message raises each target, in standard deviations "
           f"over the vocabulary), for the {heads} heads whose maps vary most.")
    if is_rotary(ds):
        page.p(ROTARY_NOTE[0].upper() + ROTARY_NOTE[1:] + ".", "note")
    chosen = F.pick_heads(rel, heads)
    page.figure(F.token_maps(rel, chosen, which="normalized", title="relevance: query x key (softmax over keys)"),
                "relevance maps")
    chosen_p = F.pick_heads(pro, heads, which="normalized")
    page.figure(F.token_maps(pro, chosen_p, which="normalized",
                             title="promotion: source x target (z-score over the vocabulary)"), "promotion maps")
    for name, maps, hs in (("relevance", rel, chosen), ("promotion", pro, chosen_p)):
        rows_dim, cols_dim = maps["raw"].dims[2:]
        rows = []
        for l, h in hs:
            m = maps.sel(layer=l, head=h)
            for i, rt in enumerate(m[f"{rows_dim}_text"].values):
                r = {"head": f"L{l}H{h}", rows_dim: _q(rt)}
                for j, ct in enumerate(m[f"{cols_dim}_text"].values):
                    r[_q(ct)] = float(m["raw"].values[i, j])
                rows.append(r)
        page.add("<details><summary>raw values: " + name + "</summary>")
        page.table(rows, f"{name}_raw", left=("head", rows_dim))
        page.add("</details>")


def _ranks(page: _Page, ds) -> None:
    """Effective ranks per layer, means over heads."""
    page.h2("Effective ranks", "ranks")
    try:
        er = effective_rank(ds)
    except MissingWeightsError as exc:
        page.missing(str(exc))
        return
    page.p("Effective rank of each head's factors (W_Q, W_K, W_V, W_O: d_model x d_head) and fused matrices "
           "(W_QK = W_Q W_K^T, W_OV = W_V W_O: d_model x d_model, rank at most d_head), as exp(entropy) of the "
           "normalised singular values; the table adds the rank holding 99% of the energy and the error left by "
           "a rank-8 truncation of the fused matrices.")
    page.figure(F.effective_rank_bars(er), "effective rank bars")
    rows = []
    r8 = min(8, er.sizes["rank"])
    for l in er.layer.values:
        e = er.sel(layer=l)
        r = {"layer": int(l)}
        for m in er.matrix.values:
            r[f"{m} entropy"] = float(e.erank_entropy.sel(matrix=m).mean())
        for m in ("W_QK", "W_OV"):
            r[f"{m} 99% energy"] = float(e.erank_energy.sel(matrix=m).mean())
            r[f"{m} rank-{r8} error"] = float(e.truncation_error.sel(matrix=m, rank=r8).mean())
        rows.append(r)
    page.table(rows, "effective_rank", caption="means over heads")


def _empty(page: _Page, sub) -> None:
    """Source-message norms over the sample, first tokens apart, and the heads most often near-empty."""
    page.h2("Empty messages", "empty")
    threshold = NEAR_EMPTY
    try:
        em = empty_messages(sub).compute()
    except (MissingWeightsError, ValueError) as exc:
        page.missing(str(exc))
        return
    summary = empty_message_summary(em, threshold=threshold)
    freq = _q_list(sub, em.attrs["frequent_ids"][:5])
    page.p(f"What each token sends through each head if read (its source message), over {em.sizes['token']:,} "
           f"tokens: the norm relative to the head's typical message (the geometric mean over tokens not first "
           f"in their sequence), near-empty below {threshold:g}; cosines are with the mean embedding direction "
           f"of the sample's most frequent tokens ({freq}, ...), of its rarest, and of random tokens (the "
           f"control). First tokens are shown apart.")
    page.figure(F.message_norm_distribution(em, threshold=threshold), "message norm distribution")
    flat = summary.stack(h=("layer", "head"))
    order = np.argsort(-flat.fraction_empty.values, kind="stable")[:15]
    rows = [{"head": f"L{int(flat.layer.values[i])}H{int(flat['head'].values[i])}",
             "share near-empty": float(flat.fraction_empty.values[i]),
             "first token relative norm": float(flat.first_relative_norm.values[i]),
             "cos frequent (empty)": float(flat.cos_frequent_empty.values[i]),
             "cos rare (empty)": float(flat.cos_rare_empty.values[i]),
             "cos random (empty)": float(flat.cos_random_empty.values[i])} for i in order]
    page.table(rows, "empty_heads", caption="the 15 heads most often near-empty (first tokens left out)",
               left=("head",))


def _q_list(ds, ids) -> str:
    """Quoted texts of ids, from the stored corpus."""
    known = corpus_vocab(ds)
    return ", ".join(_q(known.get(int(i), f"<{int(i)}>")) for i in ids)


def _accumulation(page: _Page, sub, text) -> None:
    """PCA over depth of the sample's residuals, and how often PC1 names the model's prediction."""
    page.h2("The residual as an accumulating prediction", "accumulation")
    if "W_U" not in sub:
        page.missing("the store has no unembedding (W_U)")
        return
    acc = accumulation_pca(sub).compute()
    evr = acc.explained_variance_ratio.values
    page.p(f"PCA of each token's residual across depth (entering every layer, then final), over "
           f"{acc.sizes['token']:,} tokens: the first component explains {np.mean(evr[:, 0]):.1%} of the variance "
           f"on average (median {np.median(evr[:, 0]):.1%}); read through the final norm and the unembedding, "
           f"its top token is the model's own top-1 prediction for {acc.agrees.values.mean():.1%} of tokens "
           f"(median rank of the model's prediction in it: {np.median(acc.final_rank_in_pc1.values):.0f}).")
    rows = []
    for i in range(min(12, acc.sizes["token"])):
        t = acc.isel(token=i)
        rows.append({"seq": int(t.seq), "pos": int(t.pos),
                     "token": _q(t.text.values) if "text" in t.coords else int(t.token_id),
                     "PC1 share": float(t.explained_variance_ratio.values[0]),
                     "PC1 top token": _q(text([int(t.pc1_top_id.values[0])])[0]),
                     "model top-1": _q(text([int(t.final_top_id)])[0]), "agree": bool(t.agrees)})
    page.table(rows, "accumulation", caption="the first tokens", left=("token", "PC1 top token", "model top-1"))
