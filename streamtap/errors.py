"""Errors a researcher can act on: each message names the problem and the fix."""


class StreamtapError(Exception):
    """Base class of every error streamtap raises on purpose."""


class OptionError(StreamtapError, ValueError):
    """An option of a capture (or of an analysis) has a value it cannot take; the message names the
    option and what it accepts. A ``ValueError`` too, which is what callers of bad arguments catch."""


class LayoutError(StreamtapError):
    """A layout does not fit the model it is bound to: a module it names is missing or misbehaves."""


class UnsupportedArchitectureError(StreamtapError):
    """The model's architecture has no layout, so streamtap cannot know where its terms live."""


class StoreExistsError(StreamtapError):
    """A store already exists at the target and neither append nor overwrite was asked for."""


class StoreMismatchError(StreamtapError):
    """An append would mix a different model, layout, dtype or schema into an existing store."""


class InputError(StreamtapError):
    """The batch or text handed to a capture cannot be captured as it is."""


class NonFiniteError(StreamtapError):
    """The model produced NaN or inf; the batch is refused so the store stays clean."""


class DecompositionError(StreamtapError):
    """The stored terms do not sum to the stored residual within the tolerance."""

    def __init__(self, message: str, errors=None):
        super().__init__(message)
        self.errors = errors


class PatternsMissingError(StreamtapError):
    """Attention patterns were asked of a store captured without ``patterns=True`` (``--patterns``)."""


class StoreAccessError(StreamtapError):
    """A store's location cannot be reached or read (credentials, endpoint, permissions, damaged
    metadata); the message names the location and the settings to check."""


class StoreDamagedError(DecompositionError):
    """Part of a store cannot be read, or holds fill values where a capture wrote tokens; ``problems``
    names each array and token range (a ``DecompositionError``: the store cannot be trusted)."""

    def __init__(self, message: str, errors=None, problems=()):
        super().__init__(message, errors)
        self.problems = list(problems)


class StoreLockedError(StreamtapError):
    """Another writer holds the store's lock; two writers would interleave their batches."""


class StoreFullError(StreamtapError, OSError):
    """The disk (or bucket quota) filled up during a capture; what was committed before stays valid.

    An ``OSError`` too (errno ENOSPC), because that is what callers of a full disk already catch.
    """


class InferredLayoutWarning(UserWarning):
    """streamtap inferred the layout of a model type it has no family file for, and the attach-time
    self-check proved it exact on the live model; the warning says which layout was used."""
