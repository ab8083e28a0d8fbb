"""Vocabulary text and scans: token strings to ids, ids to text, and rows of logits reduced to top-k.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from ..errors import StreamtapError
from ._store import local

VOCAB_BLOCK_BYTES = 32 << 20   # logits (rows x vocab) held at once inside a task: bounds its memory


def topk_rows(x: np.ndarray, k: int, largest: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Indices and values of the k largest (or smallest) entries of each row, sorted."""
    k = min(k, x.shape[-1])
    y = x if largest else -x
    idx = np.argpartition(-y, k - 1, axis=-1)[..., :k]
    vals = np.take_along_axis(y, idx, -1)
    order = np.argsort(-vals, axis=-1, kind="stable")
    idx = np.take_along_axis(idx, order, -1)
    return idx, np.take_along_axis(x, idx, -1)


def vocab_rows_step(vocab: int) -> int:
    """How many rows of logits over ``vocab`` fit in ``VOCAB_BLOCK_BYTES`` (at 8 bytes each; at least one)."""
    return int(max(1, VOCAB_BLOCK_BYTES // (vocab * 8)))


def vocab_text(ds: xr.Dataset, ids, tokenizer=None) -> np.ndarray:
    """Text of vocabulary ids: from a tokenizer, else from the stored corpus.

    Parameters
    ----------
    ds : xarray.Dataset
        An opened store; without a tokenizer, its ``text`` coordinate gives the text of the ids
        that occur in it.
    ids : int or array of int
        Vocabulary ids, any shape.
    tokenizer : optional
        Decodes each id on its own.

    Returns
    -------
    numpy.ndarray
        Strings (object dtype) of the shape of ``ids``; ids that neither source knows read ``<id>``.
    """
    ids = np.asarray(ids, dtype=np.int64)
    flat = ids.reshape(-1)
    if tokenizer is not None:
        out = np.array([tokenizer.decode([int(i)]) for i in flat], dtype=object)
        return out.reshape(ids.shape)
    known = corpus_vocab(ds)
    out = np.array([known.get(int(i), f"<{int(i)}>") for i in flat], dtype=object)
    return out.reshape(ids.shape)


def corpus_vocab(ds: xr.Dataset) -> dict[int, str]:
    """id -> text for the ids that occur in the stored corpus (where it was captured with a tokenizer)."""
    if "text" not in ds.coords or "token" not in ds.dims or ds.sizes["token"] == 0:
        return {}
    ids = np.asarray(local(ds["token_id"]).values)
    uniq, first = np.unique(ids, return_index=True)
    texts = local(ds["text"].isel(token=first)).values
    return {int(i): str(t) for i, t in zip(uniq, texts)}


def token_ids(ds: xr.Dataset, words, tokenizer=None) -> list[int]:
    """Vocabulary ids of token strings (e.g. ``" Paris"``): exact single-token matches.

    Parameters
    ----------
    ds : xarray.Dataset
        An opened store; without a tokenizer, strings are looked up in the text of its stored
        tokens.
    words : sequence of str or int
        Token strings; ints pass through as ids.
    tokenizer : optional
        Encodes each string (without special tokens); it must give exactly one token.

    Returns
    -------
    list of int
        One id per word, in order.

    Raises
    ------
    StreamtapError
        A string that the tokenizer does not encode as exactly one token, or, without a
        tokenizer, that no stored token reads.
    """
    ids = []
    known = None
    for w in words:
        if isinstance(w, (int, np.integer)):
            ids.append(int(w))
            continue
        if tokenizer is not None:
            enc = tokenizer(w, add_special_tokens=False)["input_ids"]
            if len(enc) != 1:
                pieces = [tokenizer.decode([i]) for i in enc]
                raise StreamtapError(f"{w!r} is {len(enc)} tokens for this tokenizer, not one: it tokenizes as "
                                     f"{pieces} (ids {[int(i) for i in enc]}); give a single token (one of these, "
                                     "or its id)")
            ids.append(int(enc[0]))
            continue
        if known is None:
            known = {t: i for i, t in sorted(corpus_vocab(ds).items(), reverse=True)}
        if w not in known:
            raise StreamtapError(f"token {w!r} is not in the store's vocabulary text; pass a tokenizer or an id")
        ids.append(known[w])
    return ids


def target_ids(ds: xr.Dataset, which, n_tok: int, what: str):
    """A target given as an id, a token string, or one id per stored token -> (int | ndarray, per_token).

    Raises ``StreamtapError`` naming ``what`` when an array is not one id per stored token.
    """
    if which is None:
        return None, False
    if isinstance(which, str):
        return token_ids(ds, [which])[0], False
    if isinstance(which, xr.DataArray):
        which = which.values
    arr = np.asarray(which)
    if arr.ndim == 0:
        return int(arr), False
    if arr.shape != (n_tok,):
        raise StreamtapError(f"{what} must be one id or one id per stored token ({n_tok}), got shape {arr.shape}")
    return arr.astype(np.int64), True


def vocab_scan(rows: np.ndarray, W_U: np.ndarray, b_U, k: int, *, targets=None, bottom: bool = False,
               probs: bool = True, softcap: float | None = None) -> dict:
    """Logits of each row against the whole vocabulary, reduced to what the analyses keep.

    ``rows`` (R, d) are already what multiplies W_U (normed residuals, or folded directions).
    Returns top-k ids/logits (and probabilities of a softmax over the whole vocabulary), optionally
    bottom-k, and for ``targets`` (R,) their logit, probability and rank (0 = top). ``softcap``
    applies the model's final logit soft-capping (cap * tanh(logit / cap)). Works through the
    rows in slices of ``vocab_rows_step`` rows, so task memory stays bounded whatever the vocabulary.
    """
    R, V = rows.shape[0], W_U.shape[0]
    k = min(k, V)
    out = {"top_id": np.empty((R, k), np.int64), "top_logit": np.empty((R, k), rows.dtype)}
    if probs:
        out["top_prob"] = np.empty((R, k), rows.dtype)
    if bottom:
        out["bottom_id"] = np.empty((R, k), np.int64)
        out["bottom_logit"] = np.empty((R, k), rows.dtype)
    if targets is not None:
        for name in ("target_logit", "target_prob"):
            out[name] = np.empty(R, rows.dtype)
        out["target_rank"] = np.empty(R, np.int64)
    step = vocab_rows_step(V)
    for start in range(0, R, step):
        sl = slice(start, start + step)
        logits = rows[sl] @ W_U.T
        if b_U is not None:
            logits += b_U
        if softcap:
            logits = softcap * np.tanh(logits / softcap)
        idx, val = topk_rows(logits, k)
        out["top_id"][sl], out["top_logit"][sl] = idx, val
        if probs or targets is not None:
            mx = logits.max(-1, keepdims=True)
            lse = mx[:, 0] + np.log(np.exp(logits - mx).sum(-1))
        if probs:
            out["top_prob"][sl] = np.exp(val - lse[:, None])
        if bottom:
            idx, val = topk_rows(logits, k, largest=False)
            out["bottom_id"][sl], out["bottom_logit"][sl] = idx, val
        if targets is not None:
            t = np.asarray(targets[sl])
            tl = np.take_along_axis(logits, t[:, None], -1)[:, 0]
            out["target_logit"][sl] = tl
            out["target_prob"][sl] = np.exp(tl - lse)
            out["target_rank"][sl] = (logits > tl[:, None]).sum(-1)
    return out


def as_text(values) -> np.ndarray:
    """Token texts as a fixed-width unicode array, whatever string dtype they were read as (a store's
    ``text`` reads back as numpy's variable-width ``StringDType``, which does not cast to it directly)."""
    return np.asarray(values, dtype=object).astype(str)
