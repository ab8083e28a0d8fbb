"""The standard induction probe: random tokens, repeated, captured through the tap with patterns.

A model that has learnt induction predicts the second copy of a random sequence from the first (A B
... A -> B), which no other mechanism can do on random tokens: its loss falls between the halves, and
``streamtap.analysis.head_scores`` on the store finds the heads that do it (docs/analysis.md, "Heads").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import InputError
from .tap import Tap
from ..options import CaptureOptions


@dataclass
class InductionProbe:
    """What ``induction_probe`` ran: the token ids, the per-token loss, and the loss of each copy.

    ``loss`` (batch, position) is the model's next-token loss at each position (NaN at the last one);
    ``loss_first`` is its mean over predictions inside the first copy, ``loss_second`` over
    predictions of the tokens of the later copies; their difference is the probe's loss drop.
    """

    store: object
    input_ids: np.ndarray
    loss: np.ndarray
    loss_first: float
    loss_second: float
    length: int
    prefix: int

    @property
    def loss_drop(self) -> float:
        return self.loss_first - self.loss_second


def induction_probe(model, store, *, length: int = 50, repeats: int = 2, batch: int = 4, seed: int = 0,
                    prefix_id: int | None = None, exclude=(), tokenizer=None, **options) -> InductionProbe:
    """Capture ``batch`` sequences of ``length`` distinct random tokens, each repeated ``repeats`` times.

    Tokens are drawn without replacement inside a sequence (so every duplicate is a copy, and the
    induction target is unambiguous), from the model's vocabulary less ``exclude`` and the
    tokenizer's special tokens. With ``prefix_id`` (default: the tokenizer's BOS token, if any) each
    sequence starts with it, as text does. The tap stores patterns (``patterns=True``) unless told
    otherwise.

    Parameters
    ----------
    model : transformers model
        In eval mode, with an LM head (the loss needs logits).
    store : str, os.PathLike or zarr store
        Where the capture goes, as for ``streamtap.tap``.
    length, repeats, batch, seed : int
        The probe's shape and random seed.
    prefix_id : int, optional
        A first token for every sequence.
    exclude : iterable of int
        Token ids never drawn.
    tokenizer : optional
        Labels the stored tokens and names the special tokens to leave out.
    **options
        Any option of ``streamtap.tap`` (``patterns`` defaults to True here).

    Returns
    -------
    InductionProbe
    """
    if length < 2 or repeats < 2 or batch < 1:
        raise InputError(f"the probe needs length >= 2, repeats >= 2 and batch >= 1; got length={length}, "
                         f"repeats={repeats}, batch={batch}")
    vocab = int(model.get_input_embeddings().weight.shape[0])
    banned = set(int(i) for i in exclude)
    if tokenizer is not None:
        banned |= set(int(i) for i in getattr(tokenizer, "all_special_ids", []))
        if prefix_id is None:
            prefix_id = getattr(tokenizer, "bos_token_id", None)
    allowed = np.setdiff1d(np.arange(vocab), np.fromiter(banned, int, len(banned)))
    if allowed.size < length:
        raise InputError(f"the probe draws {length} distinct tokens but only {allowed.size} are allowed: "
                         "lower length or exclude fewer ids")
    rng = np.random.default_rng(seed)
    rows = np.stack([rng.choice(allowed, size=length, replace=False) for _ in range(batch)])
    ids = np.tile(rows, (1, repeats))
    prefix = 0
    if prefix_id is not None:
        ids = np.concatenate([np.full((batch, 1), int(prefix_id)), ids], axis=1)
        prefix = 1
    options.setdefault("patterns", True)
    input_ids = torch.as_tensor(ids, dtype=torch.long, device=model.device)
    with Tap(model, store, CaptureOptions.from_kwargs(options), tokenizer=tokenizer), torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)).logits
    logp = torch.log_softmax(logits[:, :-1].double(), dim=-1)
    nll = -logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1).cpu().numpy()        # predicting token t+1 at t
    loss = np.concatenate([nll, np.full((batch, 1), np.nan)], axis=1)
    target = np.arange(1, ids.shape[1])                                             # the predicted position
    first = (target > prefix) & (target < prefix + length)                          # inside copy 1, not its start
    later = target >= prefix + length
    return InductionProbe(store=store, input_ids=ids, loss=loss, loss_first=float(nll[:, first].mean()),
                          loss_second=float(nll[:, later].mean()), length=length, prefix=prefix)


__all__ = ["InductionProbe", "induction_probe"]
