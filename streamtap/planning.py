"""Plan a capture before it starts: bytes per token and in total, disk and forward time, which bounds it.

The bytes come from the store's schema (``streamtap.io.schema``) applied to a bound layout and the
capture's options: the variables a capture would write, each variable's per-token dims sized from the
layout, and the dtype each is stored in. A capture of the same model and options writes exactly these
arrays (``tests/integration/test_plan.py``), and ``st.capture`` checks the free space with the same numbers.
New capture options (a selection of layers, heads or positions) feed in through :func:`dim_sizes` and
:func:`per_token_variables`, which is all a plan knows about them.
"""

from __future__ import annotations

import math
import mmap
import os
import shutil
import time
from dataclasses import dataclass, field

from .errors import InputError, StoreFullError
from .io.schema import COORD_DTYPES, VariableSpec, dims_of, is_exact_always, itemsize
from .options import CaptureOptions, CorpusOptions

DEFAULT_DEVICE_FLOPS = 4.0e14   # an H100's bfloat16 dense peak (~989 TFLOP/s) at ~40% utilisation
COORD_BYTES = sum(itemsize(d) for d in COORD_DTYPES.values())   # seq, pos, token_id per token (text extra)
FLOATS = ("float32", "float16", "bfloat16", "float64")


# -- bytes from the schema ----------------------------------------------------------------------------
def _rotary_dim(model) -> int:
    """Twice the rotary embedding's frequencies (its ``inv_freq`` buffers, one per kind of layer where
    there are several, of one width in every model streamtap knows), found without its class."""
    widths = [2 * int(b.shape[-1]) for name, b in model.named_buffers() if name.endswith("inv_freq")]
    return max(widths, default=0)


def dim_sizes(bound, options: CaptureOptions) -> dict[str, int]:
    """The size of every schema dim for a capture of ``bound`` with ``options``."""
    from .layouts import Weights

    config = bound.config
    sizes = {"layer": bound.n_layers, "head": bound.n_heads, "d_head": bound.d_head, "d_model": bound.d_model,
             "norm": len(bound.norms), "slot": int(getattr(config, "num_experts_per_tok", 0) or 0)}
    if options.neurons:
        sizes["neuron"] = bound.d_mlp
    if options.patterns and bound.positions() == "rotary":
        sizes["rope"] = len(set(Weights(bound).rotary_groups()))
        sizes["rotary_dim"] = _rotary_dim(bound.model)
    return sizes


def per_token_names(bound, options: CaptureOptions) -> list[str]:
    """The per-token variables a capture of ``bound`` with ``options`` writes, in the store's order."""
    names = [var for var in bound.layout.embeds if var in bound.taps]
    if bound.attn_layers:
        names.append("z")
    names.append("mlp_out")
    if bound.mixer_layers:
        names.append("mixer_out")
    if options.neurons:
        names.append("neuron_act")
    if bound.moe:
        names += ["expert_out", "expert_index"]
        if any(key.startswith("shared.") for key in bound.taps):
            names.append("shared_expert_out")
    if bound.norms:
        names.append("norm_scale")
    if options.patterns:
        names += {"rotary": ["rotary_cos", "rotary_sin"], "alibi": ["alibi"]}.get(bound.positions(), [])
    return names + ["resid_final"]


def _dtype(name: str, compute: str, store_dtype: str | None) -> str:
    """What ``name`` is stored as: frozen scales in float32, indices as int32, lossy terms in store_dtype."""
    if name == "norm_scale":
        return "float32"
    if name == "expert_index":
        return "int32"
    if store_dtype and store_dtype != compute and not is_exact_always(name):
        return store_dtype
    return compute


def per_token_variables(bound, options: CaptureOptions, compute_dtype: str) -> dict[str, VariableSpec]:
    """Each per-token variable's shape after ``token`` and stored dtype, from the schema's dims."""
    sizes = dim_sizes(bound, options)
    return {name: VariableSpec(tuple(sizes[d] for d in dims_of(name)), _dtype(name, compute_dtype, options.store_dtype))
            for name in per_token_names(bound, options)}


def measured_variables(module, options: CaptureOptions, length: int = 8, tokenizer=None) -> dict[str, VariableSpec]:
    """The per-token arrays a capture of ``module`` with ``options`` writes, read off a real capture of one
    ``length``-token sequence into a Zarr ``MemoryStore`` (exact for any selection or projection: the same
    code makes them)."""
    import dataclasses

    import torch
    import zarr

    from .io.schema import STORED_DTYPE
    from .tapping import tap

    store = zarr.storage.MemoryStore()
    probe = {f.name: getattr(options, f.name) for f in dataclasses.fields(options)}
    probe["summarise"] = None                     # summaries live in a group of their own, not per token
    if isinstance(probe["positions"], tuple):     # ("last", k), as the options keep it
        probe["positions"] = f"last:{probe['positions'][1]}"
    elif not isinstance(probe["positions"], str):  # a mask or callable: a stored token's bytes are the same
        probe["positions"] = "all"
    vocab = module.get_input_embeddings().num_embeddings
    ids = torch.randint(1, vocab, (1, length), generator=torch.Generator().manual_seed(0))
    with tap(module, store, tokenizer=tokenizer, **probe), torch.no_grad():
        module(input_ids=ids.to(next(module.parameters()).device))
    out = {}
    for name, array in zarr.open_group(store, mode="r").arrays():
        dims = array.metadata.dimension_names or ()
        if dims[:1] == ("token",) and name not in COORD_DTYPES and name != "text":
            out[name] = VariableSpec(tuple(array.shape[1:]), str(array.attrs.get(STORED_DTYPE, array.dtype)))
    return out


def stored_share(options: CaptureOptions, seq_len: int) -> tuple[float, str]:
    """The share of the tokens a capture stores with ``options.positions``, for sequences of ``seq_len``
    tokens, and how it was found (a mask's or a callable's share cannot be known before the tokens are)."""
    rule = options.positions
    if isinstance(rule, tuple):
        return min(rule[1], seq_len) / seq_len, f"positions last:{rule[1]} of sequences of {seq_len} tokens"
    if isinstance(rule, str):
        return 1.0, "every token"
    return 1.0, "every token assumed (a mask or callable's share is known only from the tokens)"


def variable_bytes(variables: dict[str, VariableSpec]) -> dict[str, int]:
    return {name: math.prod(v.tail) * itemsize(v.dtype) for name, v in variables.items()}


def bytes_per_token(variables: dict[str, VariableSpec]) -> int:
    """Uncompressed bytes one token adds to a store: every per-token array and the coordinates (the
    optional token text not counted)."""
    return sum(variable_bytes(variables).values()) + COORD_BYTES


def weight_bytes(model) -> int:
    """An upper bound on the weights a store keeps once: all of the model's parameters."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def compute_dtype(model) -> str:
    return str(next(model.parameters()).dtype).removeprefix("torch.")


# -- the machine ---------------------------------------------------------------------------------------
def existing_parent(path) -> str:
    """The nearest directory of ``path`` that exists (where the store would be made)."""
    path = os.path.abspath(os.fspath(path))
    while not os.path.isdir(path):
        path = os.path.dirname(path)
    return path


def measure_disk(directory, size: int = 256 << 20, block: int = 16 << 20) -> float:
    """Sequential write bandwidth in bytes/s of the disk under ``directory``: ``size`` bytes written with
    O_DIRECT where the filesystem allows it (as a capture writes), else through the cache, then fsync'd."""
    buf = mmap.mmap(-1, block)      # page-aligned, as O_DIRECT wants
    buf.write(os.urandom(block))
    path = os.path.join(existing_parent(directory), f".streamtap-disk-probe-{os.getpid()}")
    fd = None
    for flags in (getattr(os, "O_DIRECT", 0), 0):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | flags)
            start = time.perf_counter()
            for _ in range(max(1, size // block)):
                os.write(fd, buf)
            os.fsync(fd)
            return max(1, size // block) * block / (time.perf_counter() - start)
        except OSError:
            if flags == 0:
                raise
        finally:
            if fd is not None:
                os.close(fd)
                fd = None
            if os.path.exists(path):
                os.remove(path)
    raise AssertionError("unreachable")  # pragma: no cover


def forward_throughput(model, batch_size: int = 8, seq_len: int = 256, batches: int = 3) -> float:
    """Tokens/s of the plain forward on the model's device: ``batches`` random batches after a warm-up."""
    import torch

    device = next(model.parameters()).device
    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.randint(0, vocab, (batch_size, seq_len), generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        model(input_ids=ids)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(batches):
            model(input_ids=ids)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return batches * batch_size * seq_len / (time.perf_counter() - start)


# -- the plan ------------------------------------------------------------------------------------------
@dataclass
class Plan:
    """A capture's cost before it starts; ``rows()`` is what ``streamtap plan`` prints."""

    model: str
    tokens: int
    variables: dict[str, VariableSpec]
    weights: int                        # bytes, at most, of the weights stored once
    disk_bandwidth: float               # bytes/s
    disk_source: str
    forward_rate: float                 # tokens/s
    forward_source: str
    sizes: dict[str, int] = field(default_factory=dict)
    budget_time: float | None = None    # seconds
    budget_size: float | None = None    # bytes
    share: float = 1.0                  # of the tokens, those the capture stores (positions=)
    share_source: str = "every token"

    @property
    def bytes_per_token(self) -> int:
        """Bytes one *stored* token adds to the store."""
        return bytes_per_token(self.variables)

    @property
    def stored_tokens(self) -> int:
        return math.ceil(self.tokens * self.share)

    @property
    def total_bytes(self) -> int:
        return self.stored_tokens * self.bytes_per_token + self.weights

    @property
    def disk_seconds(self) -> float:
        return self.total_bytes / self.disk_bandwidth

    @property
    def forward_seconds(self) -> float:
        return self.tokens / self.forward_rate

    @property
    def bound(self) -> str:
        """``disk`` or ``forward``: the writer runs beside the forward, so the slower of the two sets the pace."""
        return "disk" if self.disk_seconds > self.forward_seconds else "forward"

    @property
    def seconds(self) -> float:
        return max(self.disk_seconds, self.forward_seconds)

    def allowed_bytes_per_token(self) -> float | None:
        """The most bytes per token that meet both budgets (None without one)."""
        limits = []
        if self.budget_size is not None:
            limits.append((self.budget_size - self.weights) / self.stored_tokens)
        if self.budget_time is not None:
            limits.append((self.budget_time * self.disk_bandwidth - self.weights) / self.stored_tokens)
        return min(limits) if limits else None

    def suggestions(self) -> list[str]:
        """What would bring the capture under its budgets, each sized from the schema."""
        allowed = self.allowed_bytes_per_token()
        if allowed is None or allowed >= self.bytes_per_token:
            return []
        out = []
        if self.budget_time is not None and self.forward_seconds > self.budget_time:
            out.append(f"the forward alone takes {_duration(self.forward_seconds)} > the time budget "
                       f"{_duration(self.budget_time)}: no selection helps; capture fewer tokens "
                       f"(at most {int(self.budget_time * self.forward_rate):,})")
        if allowed <= COORD_BYTES:
            return out + [f"nothing fits: the budgets leave {max(allowed, 0):.0f} bytes/token"]
        per = variable_bytes(self.variables)
        terms = {n: b for n, b in per.items() if not is_exact_always(n) and self.variables[n].dtype in FLOATS}
        fixed = self.bytes_per_token - sum(terms.values())
        dtype = next(iter(self.variables[n].dtype for n in terms), None)
        if dtype == "float32":
            half = fixed + sum(terms.values()) // 2
            out.append(f"store_dtype='bfloat16' (--store-dtype bfloat16): {half:,} bytes/token"
                       + ("" if half <= allowed else " (not enough alone)"))
        layered = sum(b for n, b in terms.items() if "layer" in dims_of(n))
        if layered:
            n_layers = self.sizes.get("layer", 1)
            keep = int((allowed - (self.bytes_per_token - layered)) // (layered / n_layers))
            if keep >= 1:
                out.append(f"a selection of {min(keep, n_layers)} of {n_layers} layers (layers=[...], the rest summed "
                           f"into one `rest` term): {self.bytes_per_token - layered + layered * keep // n_layers:,} "
                           "bytes/token")
        components = sum(math.prod(self.variables[n].tail[:-1]) for n in terms)
        directions = int((allowed - fixed) // (components * 4))
        if directions >= 1:
            out.append(f"projections only (project={{...}}): up to {directions:,} directions, {components:,} "
                       f"components x 4 bytes each + {fixed:,} bytes/token of exact variables")
        keep_share = allowed / self.bytes_per_token
        out.append(f"a selection of positions keeping {keep_share:.1%} of the tokens (positions=...)")
        return out

    def rows(self) -> list[tuple[str, str]]:
        per = variable_bytes(self.variables)
        rows = [("model", self.model),
                ("tokens", f"{self.tokens:,}" + ("" if self.share == 1.0 else
                                                  f", {self.stored_tokens:,} stored ({self.share_source})")),
                ("bytes/token", f"{self.bytes_per_token:,}  (" + ", ".join(f"{n} {b:,}" for n, b in per.items())
                 + f", coordinates {COORD_BYTES})"),
                ("store", f"{size(self.total_bytes)}  ({size(self.stored_tokens * self.bytes_per_token)} per-token arrays "
                          f"+ at most {size(self.weights)} of weights, uncompressed)"),
                ("disk", f"{self.disk_bandwidth / 1e9:.2f} GB/s ({self.disk_source}) -> "
                         f"{_duration(self.disk_seconds)}"),
                ("forward", f"{self.forward_rate:,.0f} tokens/s ({self.forward_source}) -> "
                            f"{_duration(self.forward_seconds)}"),
                ("bound", f"{self.bound} ({self.disk_seconds / self.forward_seconds:.2f}x disk/forward); "
                          f"capture takes at least {_duration(self.seconds)}")]
        budgets = []
        if self.budget_time is not None:
            budgets.append(f"time {_duration(self.budget_time)}")
        if self.budget_size is not None:
            budgets.append(f"size {size(self.budget_size)}")
        if budgets:
            ideas = self.suggestions()
            rows.append(("budget", ", ".join(budgets) + (": met" if not ideas else ": exceeded")))
            rows += [("to fit", idea) for idea in ideas]
        return rows


def size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def _bound_layout(module, *, probe: bool):
    from .layouts import bind, layout_candidates

    return bind(layout_candidates(module)[0], module, probe=probe)


def plan(model, tokens: int, *, target=".", disk_bandwidth: float | None = None, forward_rate: float | None = None,
         device_flops: float = DEFAULT_DEVICE_FLOPS, budget_time: float | None = None,
         budget_size: float | None = None, batch_size: int = 8, seq_len: int = 256, tokenizer=None,
         **options) -> Plan:
    """The plan of capturing ``tokens`` tokens of ``model`` with capture ``options`` (any of
    :class:`~streamtap.CaptureOptions`, by name).

    ``model``: a loaded model (its forward is timed on its device over a few ``batch_size`` x ``seq_len``
    batches), or a config id or ``config.json`` path (:func:`streamtap.models.planned.planned_config`) built
    on the meta device, whose forward rate is assumed: ``device_flops`` / (2 x parameters) tokens/s.
    ``disk_bandwidth`` (bytes/s) is measured under ``target`` unless given. A selection is sized from a real
    capture of one short sequence with the same options (``tokenizer`` resolves ``project`` token strings).
    """
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
        raise InputError(f"tokens={tokens!r}: give the number of tokens to capture, a positive integer")
    opts = CaptureOptions.from_kwargs(options)
    if isinstance(model, (str, os.PathLike)):
        from .models.planned import meta_model, planned_config

        if opts.selective:
            raise InputError("planning a selection (layers, heads, terms, positions or project) needs the model "
                             "loaded: the plan captures one short sequence with the same options to size the store; "
                             "pass the model (--model) instead of its config")
        module, name = meta_model(planned_config(os.fspath(model))), os.fspath(model)
        bound = _bound_layout(module, probe=False)
        n_params = sum(p.numel() for p in module.parameters())
        dtype = str(module.config.dtype or "float32").removeprefix("torch.")
        if forward_rate is None:
            forward_rate = device_flops / (2 * n_params)
            forward_source = (f"assumed: 2 x {n_params / 1e9:.2f}e9 parameters FLOPs/token at "
                              f"{device_flops / 1e12:.0f} TFLOP/s, attention's share ignored")
        else:
            forward_source = "given"
        weights = n_params * itemsize(dtype)
    else:
        from .tapping.sinks import unwrap

        module, _ = unwrap(model)
        name = getattr(module.config, "_name_or_path", "") or type(module).__name__
        bound = _bound_layout(module, probe=False)
        dtype = compute_dtype(module)
        if forward_rate is None:
            forward_rate = forward_throughput(module, batch_size, seq_len)
            forward_source = f"timed: 3 forwards of {batch_size} x {seq_len} on {next(module.parameters()).device}"
        else:
            forward_source = "given"
        weights = weight_bytes(module)
    if disk_bandwidth is None:
        disk_bandwidth, disk_source = measure_disk(target), f"measured: 256 MiB written to {existing_parent(target)}"
    else:
        disk_source = "given"
    variables = (measured_variables(module, opts, tokenizer=tokenizer) if opts.selective
                 else per_token_variables(bound, opts, dtype))
    share, share_source = stored_share(opts, seq_len)
    return Plan(name, tokens, variables, weights, float(disk_bandwidth), disk_source,
                float(forward_rate), forward_source, sizes=dim_sizes(bound, opts), budget_time=budget_time,
                budget_size=budget_size, share=share, share_source=share_source)



# -- the capture's own check ---------------------------------------------------------------------------
def check_free_space(target, need: int, options: CorpusOptions) -> None:
    """Refuse a capture whose planned store cannot fit in the free space under a local ``target``."""
    free = shutil.disk_usage(existing_parent(target)).free
    if need > free and not options.ignore_free_space:
        raise StoreFullError(
            f"the planned store needs {size(need)} ({need:,} bytes, uncompressed) but {existing_parent(target)} has "
            f"{size(free)} ({free:,} bytes) free; nothing was written. Free space, choose another location (--out), "
            "capture fewer tokens, or start anyway with ignore_free_space=True (--ignore-free-space): a capture "
            "that fills the disk stops cleanly and can be resumed")


__all__ = ["Plan", "plan", "per_token_variables", "measured_variables", "stored_share", "per_token_names", "dim_sizes", "bytes_per_token",
           "measure_disk", "forward_throughput", "check_free_space"]
