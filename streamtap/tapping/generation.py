"""Following ``model.generate`` inside a tap: which fed token belongs to which sequence, at which position.

``generate`` calls the model's forward once per step. The first call (the prefill) holds the whole,
possibly left-padded, prompt; every later call holds only the token(s) just chosen, with the KV cache
(``past_key_values``) standing in for everything before and an attention mask as long as the whole
sequence so far. Seen from the forward alone, a decode step looks like a batch of new one-token
sequences. The tap therefore follows the ``generate`` call itself:

- **Steps are recognised by wrapping ``generate``**, as an instance attribute for the block's duration
  (removed afterwards like the tap's ``forward``). Inside one ``generate`` call, the first forward is
  the prompt and every later forward continues the same batch rows. Looking at ``past_key_values`` or
  ``cache_position`` instead would be fragile: transformers 5 passes no ``cache_position``, drops an
  all-ones attention mask entirely (so an unpadded batch arrives with ``attention_mask=None``), and a
  cache alone cannot say which stored sequences it belongs to.
- **Sequence numbers** are handed out at the prompt (one per batch row, from the store's count of
  sequences, as for a plain forward) and kept for the rest of the call; **positions** continue from
  each row's count of real prompt tokens, so left padding is excluded: ``pos`` is the token's index
  among its sequence's real tokens, exactly as for a forward over the whole sequence.
- **Finished sequences.** After a row meets a stopping criterion (EOS, ``max_length``, a stop string,
  ``max_time``), transformers keeps feeding it (the EOS token once, then ``pad_token_id``), and its
  attention mask says 1 for those tokens (transformers 5.23 appends ones for every row at every
  step), so the mask cannot tell. The tap observes transformers' own stopping decision instead: it
  wraps the stopping criteria that ``generate`` builds (``_get_stopping_criteria``, also an instance
  attribute for the block's duration) and keeps ``unfinished = unfinished & ~done`` exactly as
  transformers' ``unfinished_sequences``. A row's fed token is captured only while the row is
  unfinished, so a finished sequence gets no extra tokens, and a forward in which every row is
  finished (transformers may run one extra step when it defers its stop check) is not traced at all.
- **The last generated token has no terms.** Terms of a token come from the forward that reads it,
  and ``generate`` never feeds its final choice back (nor the EOS that ended a sequence). A stored
  generated sequence is therefore ``prompt + generated[:-1]``; the last token's terms would need one
  more forward over it (``model(**batch)`` with the full sequence, inside a tap, captures them).

Supported: greedy decoding and sampling (``num_beams=1``), batched with left padding, the default
dynamic KV cache, and ``num_return_sequences > 1`` (each returned sequence is its own stored
sequence, its prompt stored with it). Refused with a :class:`~streamtap.errors.StreamtapError`
before the first forward: beam search (beams reorder the KV cache between steps, so a beam has no
fixed sequence of tokens), assisted / speculative decoding (candidates that are rejected would be
captured), and the rarer modes. Refused at the first forward: a ``generate`` that continues a
non-empty ``past_key_values`` (its earlier tokens belong to sequences the tap cannot identify), and a
compilable (static) cache, whose 4D attention mask hides which prompt tokens are padding.

Token order in the store: tokens are appended as they are computed, so a generated batch stores its
prompt tokens (row by row), then step 1's token of every unfinished row, then step 2's, and so on. A
sequence's tokens are no longer contiguous; ``seq`` and ``pos`` identify them, and
``ds.sortby(["seq", "pos"])`` puts every sequence back together (lazily: only the two small
coordinates are read to sort).
"""

from __future__ import annotations

import torch
from transformers import StoppingCriteriaList

from ..errors import InputError, StreamtapError

SUPPORTED_MODES = ("greedy_search", "sample")


def cache_length(past_key_values) -> int:
    """Tokens already held in a KV cache (0 for none or an empty one)."""
    if past_key_values is None:
        return 0
    get = getattr(past_key_values, "get_seq_length", None)
    if callable(get):
        return int(get())
    try:  # legacy tuple of (key, value) per layer
        return int(past_key_values[0][0].shape[-2])
    except (TypeError, IndexError, AttributeError):
        return 0


def given_cache(bound: dict):
    """The KV cache a forward was given, under either name (transformers renamed ``past_key_values`` to
    ``cache``; the old name still arrives, through ``**kwargs`` where the signature dropped it)."""
    for name in ("cache", "past_key_values"):
        if bound.get(name) is not None:
            return bound[name]
    extra = bound.get("kwargs")
    return extra.get("past_key_values", extra.get("cache")) if isinstance(extra, dict) else None


def refuse_cached_forward(past_key_values) -> None:
    """A plain forward (outside ``generate``) that continues a KV cache cannot be placed in the store."""
    if cache_length(past_key_values):
        raise InputError(
            "this forward continues a KV cache (past_key_values holds "
            f"{cache_length(past_key_values)} tokens), so streamtap cannot tell which sequences its tokens "
            "extend or at which positions. Inside a tap, decode with model.generate(...) (followed step by "
            "step), or run the forward over the whole sequence without past_key_values"
        )


class Generation:
    """The state of one ``generate`` call inside a tap (see the module docstring)."""

    def __init__(self, assistant_model=None):
        self.assistant_model = assistant_model
        self.followed = False           # generate built its stopping criteria through the tap
        self.max_length: int | None = None
        self.seq: torch.Tensor | None = None         # (batch,) int64 sequence number of each row
        self.length: torch.Tensor | None = None      # (batch,) real tokens fed so far per row
        self.unfinished: torch.Tensor | None = None  # (batch,) bool, transformers' unfinished_sequences
        self.width = 0                  # columns fed so far (prompt width, padding included, + steps)

    # -- hooks ---------------------------------------------------------------------------------
    def follow(self, generation_config, criteria):
        """Check the decoding mode and return ``criteria`` wrapped so that their verdicts are seen."""
        mode = generation_config.get_generation_mode(self.assistant_model)
        mode = getattr(mode, "value", str(mode))
        if mode not in SUPPORTED_MODES:
            if "beam" in mode:
                why = ("beams reorder the KV cache between steps, so a beam has no fixed sequence of "
                       "tokens to store. Generate with num_beams=1 (greedy or do_sample=True)")
            elif mode == "assisted_generation":
                why = ("candidate tokens are fed and then rejected, and their terms would be stored. "
                       "Generate without assistant_model / prompt_lookup_num_tokens / assistant_early_exit")
            else:
                why = "generate with num_beams=1, greedy or do_sample=True"
            raise StreamtapError(
                f"streamtap captures model.generate with greedy decoding or sampling only; this call uses "
                f"{mode}: {why}. Nothing was captured from it."
            )
        # the tap's forward is Python that drives an nnsight trace; torch.compile must not capture it
        generation_config.disable_compile = True
        self.max_length = generation_config.max_length
        self.followed = True
        return _ObservedCriteria(criteria, self)

    def observe(self, done: torch.Tensor) -> None:
        """transformers' ``unfinished_sequences &= ~stopping_criteria(...)``, mirrored."""
        if self.unfinished is not None:
            self.unfinished &= ~done.to(device="cpu", dtype=torch.bool)

    # -- forwards ------------------------------------------------------------------------------
    def check_forward(self, attention_mask) -> None:
        if not self.followed:
            raise StreamtapError(
                "model.generate ran a forward without building transformers' stopping criteria, so this "
                "model's generate is not transformers' decoding loop (custom_generate, an override) and "
                "streamtap cannot follow its steps. Capture the finished sequences with one forward instead"
            )
        if attention_mask is not None and attention_mask.dim() != 2:
            raise StreamtapError(
                f"generate handed the model a {attention_mask.dim()}D attention mask (a compilable cache such "
                "as cache_implementation='static' does), which hides which prompt tokens are padding; "
                "generate with the default dynamic cache inside a tap"
            )

    @property
    def started(self) -> bool:
        return self.seq is not None

    def check_prompt(self, past_key_values) -> None:
        if cache_length(past_key_values):
            raise InputError(
                f"model.generate continues a KV cache that already holds {cache_length(past_key_values)} "
                "tokens; streamtap cannot tell which stored sequences they belong to. Inside a tap, "
                "generate from the whole prompt (no past_key_values)"
            )

    def start(self, mask: torch.Tensor, first_seq: int) -> None:
        """The prompt (``mask``: its real tokens, host) was stored with rows numbered from ``first_seq``."""
        n_rows = mask.shape[0]
        self.seq = torch.arange(n_rows, dtype=torch.long) + int(first_seq)
        self.length = mask.sum(dim=1).to(torch.long)
        self.unfinished = torch.ones(n_rows, dtype=torch.bool)
        self.width = mask.shape[1]

    def step(self, shape, attention_mask) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A later forward: (real mask (batch, n), seq, pos of the real tokens)."""
        n_rows, n = int(shape[0]), int(shape[1])
        if n_rows != self.seq.shape[0]:
            raise StreamtapError(
                f"generate changed its batch from {self.seq.shape[0]} to {n_rows} rows between steps; "
                "streamtap follows a fixed batch only (greedy decoding or sampling)"
            )
        real = self.unfinished.unsqueeze(1).expand(n_rows, n).clone()
        if attention_mask is not None:
            real &= attention_mask[:, -n:].to(device="cpu", dtype=torch.bool)
        pos = (self.length.unsqueeze(1) + real.cumsum(dim=1) - 1)[real]
        seq = self.seq.unsqueeze(1).expand(n_rows, n)[real]
        self.length += real.sum(dim=1)
        self.width += n
        return real, seq, pos

    def remaining(self) -> int | None:
        """Most tokens this call can still capture (rows that stop early make it less)."""
        if self.max_length is None or self.unfinished is None:
            return None
        return int(self.unfinished.sum()) * max(0, self.max_length - 1 - self.width)


class _ObservedCriteria(StoppingCriteriaList):
    """transformers' stopping criteria, unchanged, with each verdict reported to the tap."""

    def __init__(self, criteria, generation: Generation):
        super().__init__(criteria)
        self._generation = generation

    def __call__(self, input_ids, scores, **kwargs):
        done = super().__call__(input_ids, scores, **kwargs)
        self._generation.observe(done)
        return done
