"""Every option of a capture in one place, validated once; and the environment, read in one place.

``st.tap``, ``st.capture``, ``streamtap capture`` and ``st.remote.write_store`` all build a
:class:`CaptureOptions` (``st.capture`` a :class:`CorpusOptions`) from their keyword arguments, and
the command line's flags and help texts are made from the same fields. A bad option raises
:class:`OptionError`, which names the option and what it accepts, before anything is touched.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .errors import OptionError

WRITER_MODES = ("auto", "thread", "inline")
STORE_DTYPES = ("float32", "float16", "bfloat16")
_OFF = ("0", "false", "no", "off")


@dataclass(frozen=True)
class Settings:
    """What streamtap reads from the environment, and nothing else does.

    ``STREAMTAP_CACHE``: where the embedded default model is converted to (default
    ``$XDG_CACHE_HOME/streamtap``, i.e. ``~/.cache/streamtap``). ``STREAMTAP_DIRECT_IO=0``: write chunk
    files through the page cache instead of with O_DIRECT (the default of ``direct_io``). Hugging Face's own
    ``HF_HUB_OFFLINE`` and ``HF_ENDPOINT`` are read here too, so that a model id not on disk fails at once
    when the hub cannot be reached.
    """

    cache_dir: Path
    direct_io: bool
    hub_offline: bool = False
    hub_endpoint: str = "https://huggingface.co"

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> "Settings":
        env = os.environ if environ is None else environ
        explicit = env.get("STREAMTAP_CACHE")
        if explicit:
            cache = Path(explicit).expanduser()
        else:
            xdg = env.get("XDG_CACHE_HOME")
            cache = (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "streamtap"
        return cls(cache_dir=cache, direct_io=env.get("STREAMTAP_DIRECT_IO", "1").lower() not in _OFF,
                   hub_offline=env.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"),
                   hub_endpoint=env.get("HF_ENDPOINT") or "https://huggingface.co")


def _opt(default, help: str, *, flag: str | None = None, choices=None, factory=None, flag_help: str | None = None,
         parse: str | None = None):
    """A field with its CLI flag; ``flag_help`` is the flag's own help where the flag negates the option;
    ``parse``: the flag takes text that the option itself reads (a list, a position rule)."""
    meta = {"help": help, "flag": flag, "choices": choices, "flag_help": flag_help, "parse": parse}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class CaptureOptions:
    """The options of a capture (``st.tap``; ``st.capture`` adds :class:`CorpusOptions`' four)."""

    neurons: bool = _opt(False, "Also store each MLP neuron's activation and W_out (much larger).")
    patterns: bool = _opt(False, "Also store what every head's attention pattern is recomputed from offline (the "
                                 "rotary or ALiBi tables the model used; a few hundred bytes per token).")
    append: bool = _opt(False, "Add to an existing store (same model, dtype and options).")
    overwrite: bool = _opt(False, "Replace an existing store (only a streamtap store is ever removed).")
    model_name: str | None = _opt(None, "The name recorded in the store (default: the model's own).", flag="")
    check: bool = _opt(True, "Run the attach-time self-check of the layout (an 8-token probe).",
                       flag="--no-check", flag_help="Skip the attach-time self-check of the layout (an 8-token probe).")
    store_dtype: str | None = _opt(None, "Store a float32 model's terms in float16 or bfloat16 (lossy; the final "
                                         "residual stays exact and the error is measured).",
                                   choices=("float16", "bfloat16"))
    writer: str = _opt("auto", "Write batches from a background thread (thread), on the model's thread "
                               "(inline), or pick by device and spare cores (auto).", choices=WRITER_MODES)
    queue_depth: int = _opt(1, "Batches that may wait for the writer (memory: queue_depth + 2 batches).", flag="")
    progress: bool = _opt(False, "Show a progress bar of tokens captured.", flag="")
    compress: bool | None = _opt(None, "Blosc zstd-1 for the per-token arrays (True), raw (False); by default "
                                       "only bfloat16 terms are compressed.", flag="--compress/--no-compress")
    break_lock: bool = _opt(False, "Take over the store's writer lock even if another host holds it "
                                   "(only when that writer is gone).")
    storage_options: Mapping[str, Any] | None = _opt(None, "Options of the filesystem of an s3:// (fsspec) "
                                                           "store, e.g. {'endpoint_url': ...}.",
                                                     flag="--storage-option")
    layers: tuple | None = _opt(None, "Store only these layers' terms (e.g. 0,5,11; default all); what is left out is "
                                      "summed into the per-token rest term.", flag="--layers", parse="ints")
    heads: tuple | None = _opt(None, "Store only these heads of the stored layers (e.g. 0,3; default all); the others "
                                     "go into rest.", flag="--heads", parse="ints")
    terms: tuple | None = _opt(None, "Which kinds of term to store as vectors, of embed, z, mlp_out, neurons "
                                     "(default: all the other options ask for; none with project).",
                               flag="--terms", parse="names")
    positions: Any = _opt("all", "Which tokens to store: all, last, last:K (the last K of each sequence), a boolean "
                                 "mask (batch, seq) or a callable on the token ids returning one; the others are "
                                 "not stored.", flag="--positions", parse="positions")
    project: Mapping[str, Any] | None = _opt(None, "Store each term's contribution onto named directions instead of "
                                                   "(or besides) its vector: a token string (its logit, through the "
                                                   "final norm), a token id, a d_model vector (a probe), or unembed_top=K.",
                                             flag="--project", parse="project")
    summarise: Any = _opt(None, "Keep running statistics (count, mean, variance, min, max, a quantile sketch) and the "
                                "top-k contexts of every head's output norm, MLP output norm, neuron activation "
                                "(neurons), projected contribution (project) and attention sink mass (patterns) "
                                "over every real token, stored or not: True, or settings such as top_k=16,window=8,alpha=0.02 "
                                "(neuron_quantiles=off: no sketch for neurons, most of their cost).",
                          flag="--summarise", parse="summarise")
    summarise_every: float = _opt(300.0, "Seconds between writes of the summaries into the store while capturing "
                                         "(and at the end): a crash loses at most that much of them, which a resume "
                                         "summarises again; 0 writes them after every batch.",
                                  flag="--summarise-every", parse="seconds")
    direct_io: bool = _opt(None, "Write chunk files of a local store with O_DIRECT (default: on, unless "
                                 "STREAMTAP_DIRECT_IO=0).", flag="",
                           factory=lambda: Settings.from_environ().direct_io)

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type in ("bool",) and not isinstance(value, bool):
                raise OptionError(f"option {f.name}={value!r}: expected True or False")
            if f.type == "bool | None" and value is not None and not isinstance(value, bool):
                raise OptionError(f"option {f.name}={value!r}: expected True, False or None")
            if f.type == "int" and (isinstance(value, bool) or not isinstance(value, int)):
                raise OptionError(f"option {f.name}={value!r}: expected an integer")
        if self.append and self.overwrite:
            raise OptionError("options append=True and overwrite=True exclude each other (--append / "
                              "--overwrite); pick one")
        if self.writer not in WRITER_MODES:
            raise OptionError(f"option writer={self.writer!r}: expected one of {', '.join(WRITER_MODES)}")
        if self.queue_depth < 1:
            raise OptionError(f"option queue_depth={self.queue_depth}: must be at least 1")
        if self.store_dtype is not None:
            name = str(self.store_dtype).removeprefix("torch.")
            if name not in STORE_DTYPES:
                raise OptionError(f"option store_dtype={self.store_dtype!r}: expected float16 or bfloat16 "
                                  "(or the model's own dtype, which is the default)")
            object.__setattr__(self, "store_dtype", name)
        if self.storage_options is not None and not isinstance(self.storage_options, Mapping):
            raise OptionError(f"option storage_options: expected a dict of filesystem options, got "
                              f"{type(self.storage_options).__name__}")
        if self.model_name is not None and not isinstance(self.model_name, str):
            raise OptionError(f"option model_name={self.model_name!r}: expected a string")
        self._check_selection()
        from .io.summaries import Settings as SummarySettings

        object.__setattr__(self, "summarise", SummarySettings.parse(self.summarise))
        try:
            every = float(self.summarise_every)
        except (TypeError, ValueError):
            every = -1.0
        if not every >= 0 or isinstance(self.summarise_every, bool):
            raise OptionError(f"option summarise_every={self.summarise_every!r}: expected seconds >= 0 (e.g. 300; "
                              "0 writes the summaries after every batch)")
        object.__setattr__(self, "summarise_every", every)

    def _check_selection(self) -> None:
        """The selection options in their normal form (what the model allows is checked by the tap)."""
        for name in ("layers", "heads"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, str):
                value = [v for v in value.replace(" ", "").split(",") if v]
            if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
                value = [value]
            try:
                value = tuple(sorted({int(v) for v in value}))
            except (TypeError, ValueError):
                raise OptionError(f"option {name}={getattr(self, name)!r}: expected indices, e.g. {name}=(0, 3) "
                                  f"or --{name} 0,3") from None
            if not value:
                raise OptionError(f"option {name}=(): an empty selection stores nothing; leave {name} unset "
                                  "to store all of them")
            object.__setattr__(self, name, value)
        if self.terms is not None:
            terms = self.terms.replace(" ", "").split(",") if isinstance(self.terms, str) else self.terms
            terms = tuple(t for t in terms if t)
            unknown = [t for t in terms if t not in TERM_KINDS]
            if unknown:
                raise OptionError(f"option terms: unknown kind {unknown[0]!r}; expected some of "
                                  f"{', '.join(TERM_KINDS)}")
            if not terms and not self.project:
                raise OptionError("option terms=() with no project: an empty selection stores nothing; name "
                                  f"kinds of term ({', '.join(TERM_KINDS)}) or directions to project onto")
            if "neurons" in terms and not self.neurons:
                object.__setattr__(self, "neurons", True)
            object.__setattr__(self, "terms", tuple(t for t in TERM_KINDS if t in terms))
        object.__setattr__(self, "positions", _positions(self.positions))
        if self.project is not None:
            object.__setattr__(self, "project", _project(self.project))
        if self.patterns and self.selects_terms:
            raise OptionError("patterns=True (--patterns) needs every head's terms; it cannot be combined with "
                              "layers, heads, terms or project")

    @property
    def selects_terms(self) -> bool:
        """Whether some term is left out of the stored vectors (then a per-token ``rest`` is stored)."""
        return self.layers is not None or self.heads is not None or self.terms is not None or self.project is not None

    @property
    def selective(self) -> bool:
        """Whether this capture stores less than a default one (terms, tokens or only projections)."""
        return self.selects_terms or self.positions != "all"

    @classmethod
    def from_kwargs(cls, kwargs: Mapping[str, Any]) -> "CaptureOptions":
        """Build from keyword arguments; an unknown name is an :class:`OptionError` that suggests the
        closest known one."""
        known = [f.name for f in fields(cls)]
        for name in kwargs:
            if name not in known:
                close = difflib.get_close_matches(name, known, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise OptionError(f"unknown option {name!r}{hint} Options: {', '.join(known)}")
        return cls(**kwargs)

    def replace(self, **changes) -> "CaptureOptions":
        from dataclasses import replace

        return replace(self, **changes)

    def tap_options(self) -> "CaptureOptions":
        """Just the options of a tap (a :class:`CorpusOptions` without its corpus fields)."""
        names = {f.name for f in fields(CaptureOptions)}
        return CaptureOptions(**{n: getattr(self, n) for n in names})


@dataclass(frozen=True)
class CorpusOptions(CaptureOptions):
    """The options of ``st.capture`` over a corpus: a tap's, and how the corpus is batched."""

    batch_size: int = _opt(8, "Sequences per forward.")
    max_length: int | None = _opt(None, "Longest sequence in tokens (default: the model's positions).")
    truncate: bool = _opt(False, "Cut longer documents to max_length instead of refusing them.")
    resume: bool = _opt(False, "Continue an interrupted capture of the same corpus into the same store: the "
                               "sequences it committed are skipped, none is duplicated or missing.")
    ignore_free_space: bool = _opt(False, "Start even when the free space under the store cannot hold the "
                                          "planned store (its uncompressed size from streamtap.plan).")

    def __post_init__(self):
        super().__post_init__()
        if self.batch_size < 1:
            raise OptionError(f"option batch_size={self.batch_size}: must be at least 1")
        if self.max_length is not None and (isinstance(self.max_length, bool) or not isinstance(self.max_length, int)
                                            or self.max_length < 1):
            raise OptionError(f"option max_length={self.max_length!r}: must be a positive integer or None")
        for other in ("append", "overwrite"):
            if self.resume and getattr(self, other):
                raise OptionError(f"options resume=True and {other}=True exclude each other (--resume / "
                                  f"--{other}): resume continues the store as it is; pick one")


TERM_KINDS = ("embed", "z", "mlp_out", "neurons")
"""What ``terms=`` picks from: the embedding terms, the heads' z, the MLP outputs, the neuron activations."""


def _positions(value):
    """``"all"``, ``("last", k)``, a boolean mask (kept as given) or a callable."""
    if callable(value):
        return value
    if isinstance(value, str):
        text = value.strip()
        if text == "all":
            return "all"
        if text == "last":
            return ("last", 1)
        head, _, k = text.partition(":")
        if head == "last" and k.isdigit() and int(k) >= 1:
            return ("last", int(k))
        raise OptionError(f"option positions={value!r}: expected all, last, last:K (K >= 1), a boolean mask or a "
                          "callable on the token ids")
    if isinstance(value, tuple) and len(value) == 2 and value[0] == "last":
        if isinstance(value[1], int) and not isinstance(value[1], bool) and value[1] >= 1:
            return value
        raise OptionError(f"option positions={value!r}: the last K tokens need K >= 1")
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        if str(value.dtype).removeprefix("torch.") != "bool" or len(value.shape) != 2:
            raise OptionError(f"option positions: a mask must be boolean (batch, seq), got {value.dtype} of "
                              f"shape {tuple(value.shape)}")
        return value
    raise OptionError(f"option positions={value!r}: expected all, last, last:K, a boolean mask or a callable")


def _project(value) -> dict:
    """Named directions: a token string, a d_model vector, or ``unembed_top`` with its K."""
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):   # the CLI's name=text
        pairs = {}
        for item in value:
            name, eq, text = item.partition("=")
            if not eq or not name:
                raise OptionError(f"option project: {item!r} is not name=text (e.g. --project paris=' Paris')")
            pairs[name] = int(text) if name == "unembed_top" and text.isdigit() else text
        value = pairs
    if not isinstance(value, Mapping) or not value:
        raise OptionError(f"option project={value!r}: expected a non-empty dict of name -> token string, vector "
                          "or (for unembed_top) K")
    out = {}
    for name, what in value.items():
        if not isinstance(name, str) or not name:
            raise OptionError(f"option project: direction names must be non-empty strings, got {name!r}")
        if name == "unembed_top":
            if isinstance(what, bool) or not isinstance(what, int) or what < 1:
                raise OptionError(f"option project: unembed_top={what!r} must be a positive integer K")
        elif isinstance(what, (int, np.integer)) and not isinstance(what, bool):
            what = int(what)   # a token id
        elif not isinstance(what, str):
            vec = np.asarray(what.detach().cpu() if hasattr(what, "detach") else what, dtype=np.float64)
            if vec.ndim != 1:
                raise OptionError(f"option project: direction {name!r} must be one d_model vector, got shape "
                                  f"{vec.shape}")
            what = vec
        out[name] = what
    return out


def option_fields(cls=CorpusOptions) -> list:
    """The dataclass fields of an options class, with their help texts (``field.metadata``)."""
    return list(fields(cls))


def describe(cls, skip=()) -> str:
    """A numpydoc list of an options class's fields and their help texts, for docstrings."""
    lines = []
    for f in fields(cls):
        if f.name not in skip:
            default = "from the environment" if f.default is MISSING else repr(f.default)
            lines += [f"{f.name} : {f.type}, default {default}", f"    {f.metadata['help']}"]
    return "\n".join(lines)


def _attributes(cls, skip=()) -> str:
    body = "\n".join("    " + line for line in describe(cls, skip).splitlines())
    return "\n\n    Attributes\n    ----------\n" + body + "\n"


CaptureOptions.__doc__ += _attributes(CaptureOptions)
CorpusOptions.__doc__ += _attributes(CorpusOptions, skip={f.name for f in fields(CaptureOptions)})

__all__ = ["CaptureOptions", "CorpusOptions", "Settings", "OptionError", "WRITER_MODES", "option_fields"]
