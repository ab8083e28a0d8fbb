"""An offline word-level tokenizer for the tiny random models (``--model tiny:ARCH``).

The tiny models exist to exercise the whole command line in seconds without the hub; they need a
tokenizer that turns text into ids below their small vocabulary. Words beyond it map to ``[UNK]``.
"""

from __future__ import annotations

from typing import Iterable

SPECIALS = ("[PAD]", "[UNK]")


def word_level_tokenizer(texts: Iterable[str], vocab_size: int):
    """A ``PreTrainedTokenizerFast`` over the words of ``texts`` (first seen first), with a pad token.

    Parameters
    ----------
    texts : iterable of str
        The texts whose words (as the ``Whitespace`` pre-tokenizer splits them: runs of word
        characters, runs of punctuation) make the vocabulary, in order of first appearance.
    vocab_size : int
        The model's vocabulary size: ids stay below it, and words beyond it map to ``[UNK]``.

    Returns
    -------
    transformers.PreTrainedTokenizerFast
        ``[PAD]`` is id 0 (the pad token), ``[UNK]`` id 1, the words from id 2.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    split = pre_tokenizers.Whitespace()
    vocab = {token: i for i, token in enumerate(SPECIALS)}
    for text in texts:
        for word, _ in split.pre_tokenize_str(text):
            if len(vocab) >= vocab_size:
                break
            vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = split
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")
