"""A corpus in one call: texts (or token-id lists) batched, padded, tapped, resumable.

``capture`` pads each batch itself (on the tokenizer's padding side) and feeds it to the model
inside a tap, so its store is exactly what a ``with st.tap(...)`` loop over the same batches would
write. Under ``torch.distributed`` each rank captures a contiguous slice into a store of its own
(``streamtap.io.ranks``). ``resume=True`` skips the sequences a store already committed.
"""

from __future__ import annotations

import sys
from typing import Iterable, Sequence

import numpy as np
import torch

from ..errors import InputError, option_advice
from ..io.ranks import process_rank, rank_store, shard, shard_start
from ..io.writer import committed_sequences
from ..options import CorpusOptions
from .sinks import unwrap
from .tap import Tap


def batches(items: Sequence, size: int) -> Iterable[Sequence]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def token_rows(texts: Sequence, tokenizer, limit: int | None, truncate: bool, vocab: int | None,
               first: int = 0, step: int = 1024) -> list[np.ndarray]:
    """Every document as an array of token ids, checked before anything is captured: an empty one,
    one longer than ``limit`` (unless ``truncate``) or an id outside the vocabulary is an
    :class:`InputError` that names the document (``error.index``: its position in the caller's corpus,
    ``texts[0]`` being ``first``). Tokenized ``step`` documents at a time into int32 arrays, so a
    large corpus costs about four bytes per token."""
    rows: list[np.ndarray] = []
    for start in range(0, len(texts), step):
        part = texts[start:start + step]
        if isinstance(part[0], str):
            part = tokenizer(list(part), add_special_tokens=True)["input_ids"]
        for j, row in enumerate(part):
            row = np.asarray(row, dtype=np.int64).reshape(-1)
            i = first + start + j
            problem = None
            if row.size == 0:
                problem = f"text {i} has no tokens after tokenization; remove it"
            elif limit is not None and row.size > limit and not truncate:
                problem = (f"text {i} has {row.size} tokens, more than the limit of {limit}; pass "
                           f"{option_advice('truncate')} to cut it, or a larger max_length if the model allows")
            elif vocab is not None and (row.min() < 0 or row.max() >= vocab):
                bad = int(row[(row < 0) | (row >= vocab)][0])
                problem = (f"text {i} holds token id {bad}, outside the model's vocabulary of {vocab} ids "
                           f"(0..{vocab - 1}); give ids of this model's tokenizer")
            if problem is not None:
                error = InputError(problem + ". Nothing was captured")
                error.index = i
                raise error
            rows.append(row[:limit].astype(np.int32 if (vocab or 0) < 2 ** 31 else np.int64))
    return rows


def pad(rows: Sequence[np.ndarray], tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of one batch of token-id arrays, padded on the tokenizer's side."""
    width = max(len(r) for r in rows)
    pad_id = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
    pad_id = 0 if pad_id is None else pad_id
    left = tokenizer is not None and getattr(tokenizer, "padding_side", "right") == "left"
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        sl = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, sl] = torch.from_numpy(np.asarray(row, dtype=np.int64))
        mask[i, sl] = 1
    return ids, mask


def _summarise_again(the_tap: Tap, mine: list, tokenizer, limit, options: CorpusOptions) -> None:
    """A resumed capture first summarises the committed sequences its store's summaries do not cover
    (a crash came between a commit and the next summary write): run through the model again and
    summarised as the sequences they are, written nowhere else, so the summaries cover the store."""
    import zarr

    from ..io import summaries

    done = committed_sequences(the_tap.writer.store) if options.summarise is not None else 0
    if not done:   # nothing committed (or no store yet): nothing to summarise again
        return
    root = zarr.open_group(the_tap.writer.store, mode="r", zarr_format=3)
    gaps = summaries.uncovered(summaries.meta_of(root.attrs), done)
    if not gaps:
        return
    rows = token_rows([mine[i] for i in gaps], tokenizer, limit, options.truncate, the_tap.vocab_size)
    the_tap.summarise_again(gaps, rows, options.batch_size, tokenizer)


def capture_corpus(model, texts, store, options: CorpusOptions, tokenizer=None) -> Tap:
    """See :func:`streamtap.capture`."""
    texts = list(texts)
    if not texts:
        raise InputError("no texts to capture: give at least one non-empty text")
    strings = isinstance(texts[0], str)
    if strings and tokenizer is None:
        raise InputError("texts are strings but no tokenizer was given; pass tokenizer= or token ids")
    empty = [i for i, t in enumerate(texts) if len(t) == 0]
    if empty:
        error = InputError(f"texts at indices {empty[:10]} are empty; remove them before capturing")
        error.index = empty[0]
        raise error
    rank, world = process_rank()
    offset = shard_start(len(texts), rank, world)
    texts = mine = shard(texts, rank, world)  # each rank of a data-parallel job captures its own slice
    tap_options = options.tap_options().replace(progress=False)  # the corpus has a bar of its own
    target = rank_store(store, rank, world)
    if options.resume:  # where there is no store yet, a resumed capture starts one (the command line refuses)
        done = committed_sequences(target, options.storage_options)
        texts, tap_options = texts[done:], tap_options.replace(append=True)
        if not texts:  # finished before: nothing to add; the tap still tidies what a dead writer left
            finished = Tap(model, store, tap_options.replace(check=False), tokenizer=tokenizer,
                           created_by="streamtap.capture", fill_summaries=False)
            with finished:
                pass
            return finished
    module, _ = unwrap(model)
    the_tap = Tap(model, store, tap_options, tokenizer=tokenizer, created_by="streamtap.capture", fill_summaries=False)
    limit = the_tap.max_positions
    if options.max_length is not None:
        limit = min(limit, options.max_length) if limit else options.max_length
    # every document is checked before the first batch is committed
    rows = token_rows(texts, tokenizer, limit, options.truncate, the_tap.vocab_size,
                      first=offset + len(mine) - len(texts))
    _check_space(the_tap, target, rows, options)
    device = next(module.parameters()).device
    bar = _progress(options.progress, len(texts))
    done_tokens = 0  # tokens of this call (the tap's count includes what an appended store already had)
    try:
        with the_tap, torch.no_grad():
            if options.resume:  # under the lock now: a writer still committing before cannot have moved on since
                skip = committed_sequences(the_tap.writer.store, storage_options=None) - (len(mine) - len(texts))
                rows = rows[skip:]
                _summarise_again(the_tap, mine, tokenizer, limit, options)
                if bar is not None:
                    bar.total = len(rows)
            for chunk in batches(rows, options.batch_size):
                ids, mask = pad(chunk, tokenizer)
                module(input_ids=ids.to(device), attention_mask=mask.to(device))
                if bar is not None:
                    done_tokens += int(mask.sum())
                    bar.update(len(chunk))
                    bar.set_postfix_str(f"{done_tokens:,} tok, "
                                        f"{done_tokens / max(bar.format_dict['elapsed'], 1e-9):,.0f} tok/s")
    except KeyboardInterrupt:
        if bar is not None:
            bar.close()
            bar = None
        print(f"\nstreamtap: interrupted; the store is consistent with {the_tap.writer.sequences:,} sequences "
              f"committed. Resume with streamtap.capture(..., resume=True), or run the same `streamtap capture` "
              f"command again with --resume added (same --text, --model and --out).",
              file=sys.stderr, flush=True)
        raise
    finally:  # an error message must not land in the middle of a half-drawn bar
        if bar is not None:
            bar.close()
    return the_tap


def _check_space(the_tap: Tap, target, rows: Sequence[np.ndarray], options: CorpusOptions) -> None:
    """The planned store's size (``streamtap.plan``'s bytes per stored token, the weights unless appending),
    printed with the progress bar, and refused when a local target's free space cannot hold it. A selection
    is sized as ``st.plan`` sizes it (a one-sequence capture with the same options) and ``positions=last:K``
    counts the tokens it keeps of these very rows; a mask or callable is counted as every token (an upper
    bound: which tokens it keeps is known only from the batches)."""
    from ..io.location import is_local_path
    from ..planning import (bytes_per_token, check_free_space, compute_dtype, measured_variables, per_token_variables,
                            size, weight_bytes)

    opts = options.tap_options()
    variables = (measured_variables(the_tap.module, opts, tokenizer=the_tap.tokenizer) if opts.selective
                 else per_token_variables(the_tap.bound, opts, compute_dtype(the_tap.module)))
    per_token = bytes_per_token(variables)
    tokens = sum(len(r) for r in rows)
    kept = options.positions
    stored = sum(min(kept[1], len(r)) for r in rows) if isinstance(kept, tuple) else tokens
    weights = 0 if options.append or options.resume else weight_bytes(the_tap.module)
    need = stored * per_token + weights
    if options.progress:
        share = f" ({stored:,} stored)" if stored != tokens else ""
        print(f"streamtap: plan: {tokens:,} tokens{share} x {per_token:,} bytes/token + at most {size(weights)} of "
              f"weights = {size(need)} (uncompressed)", file=sys.stderr, flush=True)
    if is_local_path(target):
        check_free_space(target, need, options)


def _progress(enabled: bool, total: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="seq", desc="capture")


__all__ = ["capture_corpus", "token_rows", "pad", "batches"]
