"""A self-contained HTML report of a store: figures (embedded as PNG) and the numbers behind them.

    streamtap report run.zarr --out report/            # report/index.html, report/data/*.csv
    write_report("run.zarr", "report/", token=-1, words=[" France", " Paris"])

Sections: the store and its exactness; direct logit attribution of one token's prediction to heads
and MLPs; the logit lens at that token and over its passage; attention patterns (each head's sink,
previous-token and induction scores, and heatmaps of the heads that matter for the prediction and
the strongest of each kind; stores captured with patterns only); token-to-token relevance and
promotion maps of the heads that contribute most to the prediction; effective ranks of fused and
factored attention matrices; source-message norms and near-empty heads; the residual-PCA scree with
the first tokens apart; the residual as an accumulating prediction. Defaults are picked to be
informative, and the page says why: the attributed token is the last one of the store whose
predicted next token is a word, the maps' words are that prediction and the content words of its
passage. Per-token statistics are computed over the first ``sample`` tokens, patterns over a few
sequences, so the cost of a report is bounded by ``sample``, not by the size of the store. A section
whose inputs the store lacks (attention weights, patterns) says so.
The page needs nothing outside itself: no scripts or styles are fetched; the CSV files next to it
repeat the tables for other tools.
"""

from __future__ import annotations

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
                        empty_messages, logit_lens, promotion, relevance, residual_stream, vocab_text)
from ..analysis._store import MissingWeightsError, is_rotary
from ..analysis._vocab import corpus_vocab, token_ids
from .summaries import ANCHOR as SUMMARY_ANCHOR, TITLE as SUMMARY_TITLE, section as summary_section
from ..analysis.circuits import ROTARY_NOTE
from ..analysis.empty import NEAR_EMPTY, token_frequencies
from ..attention import sequence_tokens
from ..dataset import open as open_store
from ..errors import InputError
from ..invariant import verify
from . import figures as F
from ._sections import CHECK, STYLE, _Page, _q, _top_heads
from .page_patterns import _patterns


def write_report(store, out_dir, *, token: int | None = None, target=None, words=None, k: int = 10,
                 sample: int = 4096, tokenizer=None, heads: int = 6, pattern_sequences: int = 4,
                 storage_options: dict | None = None) -> Path:
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
        The store row to attribute and read the logit lens at (negative values count from the
        end). Default: in the store's last sequence, the last token whose predicted next token is
        a word (not punctuation, whitespace, a special token or a common function word), else the
        last token.
    target : int or str, optional
        A vocabulary id, or one token's text (resolved with the tokenizer, else among the stored
        tokens); default: the model's top-1 prediction at that token.
    words : sequence of int or str, optional
        The tokens of the relevance and promotion maps (default: the attributed prediction and the
        content words of its passage nearest the attributed token, up to six; punctuation,
        whitespace, common function words and the passage's first token are left out).
    k : int
        How many top tokens the logit lens keeps.
    sample : int
        How many tokens, from the first, the per-token statistics use (the accumulation section
        uses at most the first 1024 of them).
    tokenizer : optional
        Gives token texts and resolves ``words``; by default the store's model's tokenizer where it
        can be loaded offline (:func:`store_tokenizer`), else the text of the stored tokens.
    heads : int
        How many heads the relevance and promotion maps show (those with the largest direct
        contribution to the attributed prediction).
    pattern_sequences : int
        Over how many stored sequences (of at most 1,024 tokens; the attributed token's first)
        the head scores are computed, on a store captured with patterns.
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
    if token is None:
        row, why_token = _default_token(ds, text)
    else:
        row, why_token = token % n_tok, "the token asked for"
    one = ds.isel(token=[row])
    # everything is written into a folder beside the target and moved into place at the end: a
    # failed report leaves nothing behind, a finished one replaces the previous one whole
    out.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        path = _build(ds, building, store, sub, one, row, why_token, target, words, tokenizer, heads, k, text,
                      pattern_sequences, started)
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


def _build(ds, out: Path, store, sub, one, row, why_token, target, words, tokenizer, heads, k, text,
           pattern_sequences, started) -> Path:
    page = _Page(out)
    first_1024 = sub.isel(token=slice(0, min(1024, sub.sizes["token"])))

    _summary(page, ds, sub, store)
    target_id, contrib = _attribution(page, ds, one, row, why_token, target, text, k, tokenizer)
    _lens(page, ds, one, row, target_id, text, k)
    _patterns(page, ds, sub, row, contrib, target_id, text, pattern_sequences)
    _maps(page, ds, sub, row, words, tokenizer, heads, contrib, target_id, text)
    _ranks(page, ds)
    _empty(page, sub)
    _scree(page, first_1024)
    _accumulation(page, first_1024, text)
    if "summaries" in ds.attrs:
        summary_section(page, ds, tokenizer)

    title = f"streamtap report: {ds.attrs.get('model_name', '?')}"
    toc = "".join(f'<li><a href="#{a}">{t}</a></li>' for a, t in (
        ("store", "Store"), ("attribution", "Direct logit attribution"), ("lens", "Logit lens"),
        ("patterns", "Attention patterns"), ("maps", "Relevance and promotion"), ("ranks", "Effective ranks"),
        ("empty", "Empty messages"), ("scree", "Residual PCA"), ("accumulation", "Accumulating prediction"))
        + (((SUMMARY_ANCHOR, SUMMARY_TITLE),) if "summaries" in ds.attrs else ()))
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


def _attribution(page: _Page, ds, one, row, why_token, target, text, k, tokenizer=None):
    """Direct logit attribution at one token; returns the target id it used and the contributions
    (both None without W_U)."""
    page.h2("Direct logit attribution", "attribution")
    page.p(f"The attributed token, read by the logit lens and the attention heatmaps below too: store row "
           f"{row:,}, {_where(one)}, {why_token}.", "note")
    if "W_U" not in ds:
        page.missing("the store has no unembedding (W_U)")
        return None, None
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
    return target_id, contrib


def _where(one) -> str:
    """A token as the page names it: its seq, pos and text."""
    t = one.isel(token=0)
    s = f"seq {int(t.seq)}, pos {int(t.pos)}"
    if "text" in t.coords:
        s += f" ({_q(t.text.values)})"
    return s


def _lens(page: _Page, ds, one, row, target_id, text, k) -> None:
    """The logit lens at one token, following the attribution's target, then over its passage."""
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
    _lens_grid(page, ds, row, target_id, text)


LENS_POSITIONS = 14   # the passage the logit-lens grid shows: this many tokens up to the attributed one


def _lens_grid(page: _Page, ds, row, target_id, text) -> None:
    """The logit lens over the passage that ends at the attributed token: positions x depths."""
    rows = sequence_tokens(ds, int(ds["seq"].values[row]))
    ids = np.asarray(ds["token_id"].values[rows])
    at = int(np.flatnonzero(rows == row)[0])
    # each position is scored against the token that follows it in the passage; the attributed token,
    # where it is the last of its sequence, against the attribution's target
    targets = np.append(ids[1:], target_id if target_id is not None else ids[-1])
    lo = max(0, at + 1 - LENS_POSITIONS)
    shown, targets = rows[lo:at + 1], targets[lo:at + 1]
    lens = logit_lens(ds.isel(token=shown), k=1, target=targets).compute()
    page.p(f"The same read-out over the passage that ends at the attributed token ({len(shown)} tokens): each "
           f"column a position, each row a depth (the final residual at the top), each cell the top token there. "
           f"The colour is the probability of the token that really comes next in the passage (at the attributed "
           f"token, where nothing follows, the attributed target), written above the columns; bold cells already "
           f"rank it first. The numbers are in data/logit_lens_grid.csv.")
    page.figure(F.logit_lens_grid(lens, text, targets=targets, color="target", max_positions=LENS_POSITIONS,
                                  title="logit lens over the passage (colour: probability of the next token; "
                                        "bold: it is already the top token)"), "logit lens grid")
    tops, nexts = text(lens.top_id.values[:, :, 0]), text(targets)
    inputs = lens["text"].values if "text" in lens.coords else lens["token_id"].values
    page.csv([{"pos": int(lens.pos.values[t]), "token": str(inputs[t]), "next": str(nexts[t]),
               "depth": str(lens.depth.values[d]), "top": str(tops[t, d]),
               "top prob": float(lens.top_prob.values[t, d, 0]), "next prob": float(lens.target_prob.values[t, d]),
               "next rank": int(lens.target_rank.values[t, d])}
              for t in range(lens.sizes["token"]) for d in range(lens.sizes["depth"])], "logit_lens_grid")


# common English function words: never a default word of the maps, nor a prediction worth attributing
FUNCTION_WORDS = frozenset("""a an the of and or but nor to in on at by for with from into onto as is are was were be
been being am it its it's this that these those there here he she they we you i me him her them us my his their our
your not no so than then if do does did has have had will would can could shall should may might must""".split())


def _is_content(text: str) -> bool:
    """A token worth showing by default: two letters or digits at least, not a special token, not a function
    word."""
    t = str(text).strip()
    if sum(c.isalnum() for c in t) < 2:                 # punctuation, whitespace, byte pieces, single digits
        return False
    if (t[0], t[-1]) in (("<", ">"), ("[", "]")):      # <|im_end|>, <s>, [CLS], <123> (an unknown id)
        return False
    return t.lower() not in FUNCTION_WORDS


def _default_token(ds, text) -> tuple[int, str]:
    """The store row attributed by default, and why: in the last sequence, the last token whose predicted
    next token is a word (the model's top-1 at the last token of a text is often a full stop or a new line,
    the least telling prediction there is)."""
    last = ds.sizes["token"] - 1
    fallback = (last, "the last stored token")
    if "W_U" not in ds:
        return fallback
    rows = sequence_tokens(ds, int(ds["seq"].values[last]))[-64:]
    top = logit_lens(ds.isel(token=rows), k=1, sites=()).top_id.isel(depth=-1, k=0).values
    pos = np.asarray(ds["pos"].values[rows])
    for r, word, p in reversed(list(zip(rows, text(top), pos))):
        if p > 0 and _is_content(word):
            return int(r), (f"chosen as the last token of the store's last sequence whose predicted next token is a word "
                            f"({_q(word)}; not punctuation, whitespace, a special token or a function word)")
    return last, "the last stored token (no token of the last sequence predicts a word)"


def _default_words(ds, sub, row, target_id, text, n: int = 6) -> tuple[list[int], str]:
    """The maps' default tokens, and why: the attributed prediction, then the content words of its passage
    nearest the attributed token (backwards, then forwards), first token of the passage left out."""
    rows = sequence_tokens(ds, int(ds["seq"].values[row]))
    at = int(np.flatnonzero(rows == row)[0])
    order = list(rows[at::-1]) + list(rows[at + 1:])
    ids = np.asarray(ds["token_id"].values[order])
    pos = np.asarray(ds["pos"].values[order])
    candidates = ([target_id] if target_id is not None else []) + [int(i) for i, p in zip(ids, pos) if p > 0]
    words = text(np.asarray(candidates, np.int64)) if candidates else []
    chosen: list[int] = []
    for i, w in zip(candidates, words):
        if i not in chosen and _is_content(w):
            chosen.append(int(i))
        if len(chosen) == n:
            break
    why = ("the attributed prediction and the content words of its passage nearest the attributed token "
           "(punctuation, whitespace, function words and the passage's first token left out)")
    if len(chosen) < 3:  # a passage of punctuation and function words: the sample's commonest content words
        counts = token_frequencies(sub).values
        common = [int(i) for i in np.argsort(-counts, kind="stable")[:200] if counts[i] > 0]
        for i, w in zip(common, text(np.asarray(common, np.int64)) if common else []):
            if i not in chosen and _is_content(w):
                chosen.append(i)
            if len(chosen) == n:
                break
        why += ", completed by the sample's most frequent content words"
        if len(chosen) < 2:  # no token text to tell content words by (a store captured without a tokenizer)
            chosen = common[:n]
            why = "the sample's most frequent tokens: without token text, content words cannot be told apart"
    return chosen, why


def _maps(page: _Page, ds, sub, row, words, tokenizer, heads, contrib, target_id, text) -> None:
    """Relevance and promotion maps of the heads that contribute most to the prediction, with their raw values."""
    page.h2("Relevance and promotion", "maps")
    if words:
        ids, why_words = token_ids(ds, words, tokenizer), "the tokens asked for"
    else:
        ids, why_words = _default_words(ds, sub, row, target_id, text)
    top = _top_heads(contrib, heads) if contrib is not None else []
    layers = sorted({layer for layer, _, _ in top}) or None
    try:
        rel = relevance(ds, ids, tokenizer=tokenizer, layers=layers)
        pro = promotion(ds, ids, tokenizer=tokenizer, layers=layers)
    except MissingWeightsError as exc:
        page.missing(str(exc))
        return
    names = ", ".join(_q(t) for t in rel.query_text.values)
    if top:
        tgt = _q(text([target_id])[0])
        which = (f"for the {len(top)} heads with the largest direct contribution (in absolute value) to the logit of "
                 f"{tgt} at the attributed token, the heads that matter for this prediction: "
                 + ", ".join(f"L{layer}H{h} ({v:+.2f})" for layer, h, v in top))
    else:
        which = f"for the {heads} heads whose maps vary most (no attribution without W_U)"
    page.p(f"For the tokens {names} ({why_words}): relevance E W_QK E^T (how much a query token attends to a key "
           f"token, shown as the softmax over these keys of the scaled score) and promotion E W_OV W_U^T (how far "
           f"above a typical token a source token's message raises each target, in standard deviations "
           f"over the vocabulary), {which}.")
    if is_rotary(ds):
        page.p(ROTARY_NOTE[0].upper() + ROTARY_NOTE[1:] + ".", "note")
    chosen = [(layer, h) for layer, h, _ in top] or F.pick_heads(rel, heads)
    page.figure(F.token_maps(rel, chosen, which="normalized", title="relevance: query x key (softmax over keys)"),
                "relevance maps")
    chosen_p = chosen if top else F.pick_heads(pro, heads, which="normalized")
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


def _scree(page: _Page, part) -> None:
    """The residual-PCA scree at a few depths, the first tokens (and any other massive residual) apart."""
    page.h2("Residual PCA", "scree")
    L = part.sizes["layer"]
    depths = sorted({(max(1, L // 4), "attn"), (max(1, L // 2), "attn"), (max(1, 3 * L // 4), "attn"), (L, "final")})
    pca = F.residual_pca(residual_stream(part, depths=depths))
    page.p(f"PCA of the residual over {pca.attrs['tokens']:,} tokens pooled across sequences, at four depths (the "
           f"residual entering layers a quarter, half and three quarters of the way, and the final residual), each "
           f"centred on its mean: once with every token, once with the first token of each sequence left out "
           f"({pca.attrs['first_tokens']} of them; their residual is far larger than the rest's and a pooled PCA "
           f"spends its first component on them), and once also without later tokens whose residual norm exceeds "
           f"{pca.attrs['massive']:g} times the median (the dotted line, where there are any).")
    page.figure(F.residual_pca_scree(pca), "residual pca scree")
    texts = part["text"].values if "text" in part.coords else part["token_id"].values
    rows = []
    for d in pca.depth.values:
        one = pca.sel(depth=d)
        evr = one.explained_variance_ratio
        top = int(one.rest_max_token) if np.isfinite(float(one.rest_max_token)) else -1
        rows.append({"depth": str(d), "first tokens' share of variance": float(one.first_share),
                     "first-token norm / median": float(one.first_norm_ratio),
                     "PC1 (all)": float(evr.sel(group="all", pc=1)), "PC1 (first left out)": float(evr.sel(group="rest", pc=1)),
                     "PC1 (massive left out)": float(evr.sel(group="typical", pc=1)),
                     "largest later token": (f"{_q(texts[top])} (seq {int(part.seq.values[top])}, pos "
                                             f"{int(part.pos.values[top])}) {float(one.rest_max_norm_ratio):.1f}x median"
                                             if top >= 0 else "none")})
    page.table(rows, "residual_pca", caption="explained variance ratio of the first component, and the tokens apart",
               left=("depth", "largest later token"))


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
