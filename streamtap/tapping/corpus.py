"""A corpus in one call: texts (or token-id lists) batched, padded, tapped, resumable.

``capture`` pads each batch itself (on the tokenizer's padding side) and feeds it to the model
inside a tap, so its store is exactly what a ``with st.tap(...)`` loop over the same batches would
write. Under ``torch.distributed`` each rank captures a contiguous slice into a store of its own
(``streamtap.io.ranks``). ``resume=True`` skips the sequences a store already committed.
"""

from __future__ import annotations

import sys
from typing import Iterable, Sequence

import torch

from ..errors import InputError
from ..io.ranks import process_rank, rank_store, shard
from ..io.writer import committed_sequences
from ..options import CorpusOptions
from .sinks import unwrap
from .tap import Tap


def batches(items: Sequence, size: int) -> Iterable[Sequence]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def encode(chunk, tokenizer, limit: int | None, truncate: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of one batch of texts or token-id lists, padded on the tokenizer's side."""
    if isinstance(chunk[0], str):
        rows = tokenizer(list(chunk), add_special_tokens=True)["input_ids"]
    else:
        rows = [list(map(int, r)) for r in chunk]
    for i, row in enumerate(rows):
        if len(row) == 0:
            raise InputError(f"text {i} of this batch has no tokens after tokenization; remove it")
        if limit is not None and len(row) > limit:
            if not truncate:
                raise InputError(
                    f"a sequence has {len(row)} tokens, more than the limit of {limit}; pass "
                    "truncate=True (--truncate) to cut it, or a larger max_length if the model allows"
                )
            rows[i] = row[:limit]
    width = max(len(r) for r in rows)
    pad = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
    pad = 0 if pad is None else pad
    left = tokenizer is not None and getattr(tokenizer, "padding_side", "right") == "left"
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        sl = slice(width - len(row), width) if left else slice(0, len(row))
        ids[i, sl] = torch.tensor(row, dtype=torch.long)
        mask[i, sl] = 1
    return ids, mask


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
        raise InputError(f"texts at indices {empty[:10]} are empty; remove them before capturing")
    rank, world = process_rank()
    texts = mine = shard(texts, rank, world)  # each rank of a data-parallel job captures its own slice
    tap_options = options.tap_options().replace(progress=False)  # the corpus has a bar of its own
    if options.resume:
        done = committed_sequences(rank_store(store, rank, world), options.storage_options)
        texts, tap_options = texts[done:], tap_options.replace(append=True)
        if not texts:  # finished before: nothing to add, and the returned tap says so (0 tokens)
            return Tap(model, store, tap_options.replace(check=False), tokenizer=tokenizer,
                       created_by="streamtap.capture")
    module, _ = unwrap(model)
    the_tap = Tap(model, store, tap_options, tokenizer=tokenizer, created_by="streamtap.capture")
    limit = the_tap.max_positions
    if options.max_length is not None:
        limit = min(limit, options.max_length) if limit else options.max_length
    device = next(module.parameters()).device
    bar = _progress(options.progress, len(texts))
    done_tokens = 0  # tokens of this call (the tap's count includes what an appended store already had)
    try:
        with the_tap, torch.no_grad():
            if options.resume:  # under the lock now: a writer still committing before cannot have moved on since
                texts = mine[committed_sequences(the_tap.writer.store, storage_options=None):]
                if bar is not None:
                    bar.total = len(texts)
            for chunk in batches(texts, options.batch_size):
                ids, mask = encode(chunk, tokenizer, limit, options.truncate)
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


def _progress(enabled: bool, total: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="seq", desc="capture")


__all__ = ["capture_corpus", "encode", "batches"]
