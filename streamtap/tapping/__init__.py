"""Tapping: tap an unmodified model and write every forward's terms to a store.

:func:`tap` wraps inference code a researcher already has; :func:`capture` runs a corpus. Both take
the options of :class:`~streamtap.options.CaptureOptions` as keyword arguments (``capture`` also
:class:`~streamtap.options.CorpusOptions`'), validated before anything is touched.
"""

from __future__ import annotations

from ..options import CaptureOptions, CorpusOptions, describe
from .corpus import capture_corpus
from .probes import InductionProbe, induction_probe
from .tap import Tap


def tap(model, store, *, tokenizer=None, **options) -> Tap:
    """Wrap existing inference code: each forward of ``model`` inside the block is captured.

    ``model.generate(...)`` inside the block is followed step by step (greedy decoding or sampling,
    KV cache on, batched with left padding): the prompt, then each newly fed token, is stored at its
    sequence's ``seq`` and ``pos``. One writer per store: entering the block takes the store's lock,
    and a second tap or capture on the same store raises ``StoreLockedError`` naming the holder.
    A writer error is raised at the next forward or when the block ends; leaving the block writes
    and commits every batch handed over.

    Parameters
    ----------
    model : transformers model or nnsight envoy
        In eval mode; it is not modified (after the block, the module tree is exactly as before).
    store : str, os.PathLike or zarr store
        A directory, a URL (``s3://bucket/run.zarr``, through fsspec and s3fs) or a zarr store object
        (``zarr.storage.MemoryStore()``).
    tokenizer : optional
        With one, each token's text is stored too.
    **options
        Any option of :class:`~streamtap.options.CaptureOptions`:

{options}

    Returns
    -------
    Tap
        A context manager; ``tokens`` and ``sequences`` say what it committed.
    """
    return Tap(model, store, CaptureOptions.from_kwargs(options), tokenizer=tokenizer)


def capture(model, texts, store, *, tokenizer=None, **options) -> Tap:
    """Capture a corpus in one call: strings (with a tokenizer) or lists of token ids.

    Under torch.distributed each rank captures a contiguous slice into its own store below
    ``store``; ``streamtap.open(store)`` reads them back as one. ``resume=True`` continues an
    interrupted capture of the same corpus (after a full disk, a SIGKILL or Ctrl-C): the sequences
    the store committed are skipped, none is duplicated or missing.

    Parameters
    ----------
    model : transformers model or nnsight envoy
        In eval mode.
    texts : iterable of str or of lists of int
        One document per item; strings need ``tokenizer``.
    store : str, os.PathLike or zarr store
        As for :func:`tap`.
    tokenizer : optional
        Tokenizes strings (its padding side is kept) and labels tokens with their text.
    **options
        Any option of :class:`~streamtap.options.CaptureOptions` (see :func:`tap`) and of
        :class:`~streamtap.options.CorpusOptions`:

{corpus_options}

    Returns
    -------
    Tap
        The finished tap; ``tokens`` and ``sequences`` say what was committed.
    """
    return capture_corpus(model, texts, store, CorpusOptions.from_kwargs(options), tokenizer=tokenizer)


def _indent(text: str, by: str = "        ") -> str:
    return "\n".join(by + line for line in text.splitlines())


tap.__doc__ = tap.__doc__.format(options=_indent(describe(CaptureOptions)))
capture.__doc__ = capture.__doc__.format(
    corpus_options=_indent(describe(CorpusOptions, skip={n for n in CaptureOptions.__dataclass_fields__})))

__all__ = ["tap", "capture", "Tap", "induction_probe", "InductionProbe"]
