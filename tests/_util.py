"""Small shared builders for the tests: padded batches of token ids, store locks, the report's store."""

from __future__ import annotations

import torch


def padded_batch(vocab: int, lengths: list[int], *, seed: int = 0, side: str = "right"):
    """Random token ids padded to the longest length, with the matching attention mask."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros((len(lengths), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        cols = slice(width - n, width) if side == "left" else slice(0, n)
        ids[row, cols] = torch.randint(1, vocab, (n,), generator=g)
        mask[row, cols] = 1
    return ids, mask


def run(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask)


def run_hooked(model, handles, **inputs):
    """The model's forward on ``inputs`` without gradients; every hook in ``handles`` is removed afterwards,
    also when the forward fails, so that no later forward runs a test's hooks."""
    try:
        with torch.no_grad():
            return model(**inputs)
    finally:
        for handle in handles:
            handle.remove()


def attention_implementations(arch: str) -> tuple[str, ...]:
    """eager, plus sdpa where transformers implements it for the architecture."""
    from streamtap.models import tiny_model

    try:
        tiny_model(arch, attn_implementation="sdpa")
    except ValueError:  # transformers: "... does not support ... scaled_dot_product_attention yet"
        return ("eager",)
    return ("eager", "sdpa")


def lock_holder(path) -> dict | None:
    """The writer record in a local store's lock (None when nobody holds it), read as a writer reads it."""
    import zarr.storage

    from streamtap.io.lock import StoreLock

    return StoreLock(zarr.storage.LocalStore(str(path)), str(path)).read()


def plant_lock(path, record: dict) -> None:
    """Leave a lock in a local store as a writer elsewhere (another host, a killed process) would."""
    import json
    import os

    from streamtap.io.lock import LOCK_KEY, RECORD

    target = os.path.join(path, LOCK_KEY)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with open(target, "w") as f:
        json.dump({"zarr_format": 3, "node_type": "group", "attributes": {RECORD: record}}, f)


def lock_exists(path) -> bool:
    import os

    from streamtap.io.lock import LOCK_NAME

    return os.path.exists(os.path.join(path, LOCK_NAME))


REPORT_TEXTS = ["the king and the queen of england", "paris is the capital of france",
                "london is in england and the king"]


def report_store(path, *, patterns: bool = False):
    """A store of REPORT_TEXTS from a tiny Llama with tied embeddings and a word-level tokenizer (what the
    report tests render), with attention patterns or without; returns (path, model)."""
    import streamtap as st
    from streamtap.models import tiny_model
    from streamtap.models.tokenizer import word_level_tokenizer

    model = tiny_model("llama", tie_word_embeddings=True)
    tok = word_level_tokenizer(REPORT_TEXTS, model.config.vocab_size)
    st.capture(model, REPORT_TEXTS, path, tokenizer=tok, patterns=patterns)
    return path, model
