"""The commands that write and read stores: capture a corpus, verify and describe a store, the demo the README
opens with, and the HTML report."""

from __future__ import annotations

import os
import time
from importlib import resources

import click
import numpy as np

import streamtap as st

from ..io.location import fs_options, is_url, open_group
from ..io.ranks import rank_stores
from ..io.schema import COMMITTED_SEQUENCES, COMMITTED_TOKENS
from ..io.writer import check_target
from ..options import CorpusOptions
from ._common import (
    _load,
    _options_from,
    _rows,
    _tokenizer,
    cli,
    device_option,
    dtype_option,
    model_option,
    storage_option,
)

PROMPT = "The capital of France is"
TARGET = " Paris"


def _sample_path() -> str:
    """The bundled sample text, so capture and demo need nothing but the package."""
    return str(resources.files("streamtap") / "data" / "sample.txt")


def _read_texts(path: str) -> tuple[list[str], list[int]]:
    """(documents, the line number of each): one document per line; blank lines are skipped because a
    capture refuses empty texts. The file must be UTF-8 text; anything else is refused naming the line."""
    texts, lines, offset = [], [], 0
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise st.InputError(
                    f"{path} is not UTF-8 text: line {number}, byte {offset + exc.start} (0x{raw[exc.start]:02x}) "
                    "cannot be decoded. --text takes UTF-8 text, one document per line; convert the file "
                    "(e.g. iconv -f latin1 -t utf-8) or give another") from None
            if "\x00" in line:
                raise st.InputError(f"{path} holds a NUL byte on line {number}: it looks like a binary file. "
                                    "--text takes UTF-8 text, one document per line")
            offset += len(raw)
            line = line.rstrip("\r\n")
            if line.strip():
                texts.append(line)
                lines.append(number)
    if not texts:
        raise st.InputError(f"{path} has no non-blank lines; give one document per line")
    return texts, lines


def _line_of(error: st.InputError, lines: list[int], path: str) -> st.InputError:
    """A capture's error about text i, told as the line of the file it came from."""
    index = getattr(error, "index", None)
    if index is None or not 0 <= index < len(lines):
        return error
    return st.InputError(str(error).replace(f"text {index} ", f"line {lines[index]} of {path} ", 1))


def _committed(store, options: dict | None = None) -> tuple[int, int]:
    """(tokens, sequences) committed in a store, or (0, 0) when there is none yet.

    Read from the store rather than the tap, so that an append reports what it added.
    """
    try:
        attrs = open_group(store, mode="r", storage_options=options).attrs
    except Exception:  # no store (yet): nothing committed
        return 0, 0
    return int(attrs.get(COMMITTED_TOKENS, 0)), int(attrs.get(COMMITTED_SEQUENCES, 0))


def _disk_bytes(path: str, options: dict | None = None) -> int:
    """Bytes on disk (or in the bucket): the sum of file sizes under a store (or the file's size)."""
    if is_url(path):
        from fsspec.core import url_to_fs

        fs, root = url_to_fs(path, **fs_options(path, options))
        return int(fs.du(root))
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(path) for name in names)


def _stored_bytes(store, options: dict | None = None) -> int:
    """Uncompressed bytes of the stored arrays (committed tokens only, derived terms excluded)."""
    ranks = rank_stores(store, options)
    if ranks:
        return sum(_stored_bytes(rank, options) for rank in ranks)
    group = open_group(store, mode="r", storage_options=options)
    committed = int(group.attrs.get(COMMITTED_TOKENS, 0))
    return sum(_data_bytes(arr, committed) for _, arr in group.arrays())


def _data_bytes(arr, committed: int) -> int:
    """Uncompressed bytes of what an array holds: the committed tokens' rows of a per-token array (never
    capacity beyond them, nor the unused rows of a partly filled chunk), all of a static one."""
    dims = arr.metadata.dimension_names or ()
    if not (dims and dims[0] == "token"):
        return arr.nbytes
    return min(committed, arr.shape[0]) * (arr.nbytes // arr.shape[0] if arr.shape[0] else 0)


def _chunk_bytes(arr) -> int:
    """Bytes the array's chunks take in the store (its metadata document left out)."""
    from zarr.core.sync import sync

    metadata = sync(arr.store_path.store.getsize(f"{arr.path}/zarr.json"))
    return arr.nbytes_stored() - metadata


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def _q(text: str) -> str:
    """Quote token text so its leading space shows (" Paris")."""
    return '"' + text.replace('"', '\\"') + '"'


def _verdict(err) -> str:
    """ok when the terms sum to the residual and, on a patterns store, the head outputs equal their
    recomputed attention times values (the second invariant)."""
    ok = err.attrs["max_rel_error"] <= err.attrs["tolerance"] and "output_misses" not in err.attrs
    return "ok" if ok else "FAIL"


@cli.command()
@model_option
@click.option("--text", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Text file, one document per line.  [default: the bundled sample]")
@click.option("--out", required=True, help="The Zarr store to write, e.g. run.zarr or s3://bucket/run.zarr.")
@dtype_option
@device_option
@_options_from(CorpusOptions)
@click.option("--trust-remote-code", is_flag=True, help="Let transformers run the model repository's code.")
def capture(model_id, text, out, dtype, device, trust_remote_code, **flags):
    """Capture a text file (one document per line) into a store.

    The batch path for a corpus, with a progress bar; the tokens/s it prints is what to compare
    across models, dtypes, devices and batch sizes. --out may be a directory or an s3:// URL.
    """
    flags = {k: v for k, v in flags.items() if v is not None and v != ()}  # unset: the option's default
    options = CorpusOptions(**flags, model_name=model_id, progress=True)  # every option checked before any work
    storage_options = options.storage_options
    # everything about --out and --text that would stop the capture, before the model loads
    check_target(out, append=options.append, overwrite=options.overwrite, resume=options.resume,
                 break_lock=options.break_lock, storage_options=storage_options)
    path = text or _sample_path()
    texts, lines = _read_texts(path)
    model, tok = _load(model_id, dtype, device, trust_remote_code, texts)
    before_tokens, before_seqs = _committed(out, storage_options) if (options.append or options.resume) else (0, 0)
    start = time.perf_counter()
    try:
        st.capture(model, texts, out, tokenizer=tok, **vars(options))
    except st.InputError as error:
        raise _line_of(error, lines, path) from None
    seconds = time.perf_counter() - start
    total_tokens, total_seqs = _committed(out, storage_options)
    tokens, seqs = total_tokens - before_tokens, total_seqs - before_seqs
    store = str(out) if not before_tokens else f"{out}  (now {total_tokens:,} tokens in {total_seqs:,} sequences)"
    _rows([("tokens", f"{tokens:,}"), ("sequences", f"{seqs:,}"), ("seconds", f"{seconds:.2f}"),
           ("tokens/s", f"{tokens / seconds:,.0f}"), ("store", store)])


@cli.command()
@click.argument("store")
@click.option("--tol", type=float, default=None,
              help="Relative tolerance.  [default: the bound for the store's dtype]")
@storage_option
@click.pass_context
def verify(ctx, store, tol, storage_options):
    """Check that the stored terms sum to the final residual.

    Every token is checked. Exit 0 when they sum within the tolerance, 1 when not (a term is
    missing or the store is damaged), so scripts and CI can gate on a store before anyone
    analyses it.
    """
    ds = st.open(store, storage_options=storage_options)
    err = st.verify(ds, tol=tol, raise_on_error=False)
    problems = err.attrs["problems"]
    _rows([("tokens", f"{ds.sizes['token']:,}"), ("max rel error", f"{err.attrs['max_rel_error']:.3g}"),
           ("max abs error", f"{err.attrs['max_abs_error']:.3g}"), ("tolerance", f"{err.attrs['tolerance']:g}"),
           *([("max output error", f"{err.attrs['max_output_error']:.3g}")] if "max_output_error" in err.attrs else []),
           ("invariant", _verdict(err)), ("store", "whole" if not problems else f"DAMAGED ({_count(len(problems), 'problem')})")])
    if problems:
        for problem in problems:
            click.echo(f"  damaged: {problem}")
        click.echo(f"error: the store is damaged ({_count(len(problems), 'problem')}, listed above); recapture the tokens "
                   "concerned or restore the files from a copy", err=True)
        ctx.exit(1)
    if _verdict(err) != "ok":
        from ..invariant import misses

        click.echo(f"error: {err.attrs.get('output_misses') or misses(err)}", err=True)
        ctx.exit(1)


@cli.command()
@click.argument("store")
@storage_option
def info(store, storage_options):
    """Describe a store: model, shape, size, exactness.

    One screen that answers "what is in this store and can I trust it" without opening Python:
    what model made it, how big it is on disk and uncompressed, and whether it still decomposes
    exactly.
    """
    ds = st.open(store, storage_options=storage_options)
    a = ds.attrs
    disk, raw = _disk_bytes(str(store), storage_options), _stored_bytes(store, storage_options)
    err = st.verify(ds, raise_on_error=False)
    problems = err.attrs["problems"]
    _rows([
        ("store", store),
        ("model", a.get("model_name", "?")),
        ("layout", f"{a.get('layout')}  (model_type {a.get('model_type')}"
                   + (", inferred from the module tree and verified exact at attach time)" if a.get("layout_inferred")
                      else ")")),
        *([("declaration", a["layout_declaration"])] if a.get("layout_inferred") else []),
        ("dtype", a.get("dtype")),
        ("layers", a.get("n_layers")),
        ("heads", a.get("n_heads")),
        ("d_head", a.get("d_head")),
        ("d_model", a.get("d_model")),
        ("neurons", "yes" if a.get("neurons") else "no"),
        ("tokens", f"{int(a[COMMITTED_TOKENS]):,}"),
        ("sequences", f"{int(a[COMMITTED_SEQUENCES]):,}"),
        ("on disk", _size(disk)),
        ("data", f"{_size(raw)} over the committed tokens"),
        ("compression", _compression(store, storage_options)),
        ("stored as", _stored_as(a)),
        ("max error", f"{err.attrs['max_rel_error']:.3g} relative, {err.attrs['max_abs_error']:.3g} absolute "
                      f"(tolerance {err.attrs['tolerance']:g}: {_verdict(err)})"),
        ("schema", f"{a.get('schema_version')}  (written by streamtap {a.get('streamtap_version')}, "
                   f"this is {st.__version__})"),
        ("created by", a.get("created_by", "?")),
        ("integrity", "whole" if not problems else f"DAMAGED, {_count(len(problems), 'problem')}:"),
    ])
    for problem in problems:
        click.echo(f"  damaged: {problem}")


def _compression(store, options: dict | None = None) -> str:
    """What the codecs do, per kind of array: ``raw`` where none is applied, else the ratio of the
    uncompressed bytes of the committed tokens (all of a static weight) to the bytes their chunks take
    in the store. A chunk's unused rows are counted on neither side: they would make a small store
    look hundreds of times compressed."""
    ranks = rank_stores(store, options)
    group = open_group(ranks[0] if ranks else store, mode="r", storage_options=options)
    committed = int(group.attrs.get(COMMITTED_TOKENS, 0))
    kinds: dict[str, list[int]] = {"per-token arrays": [0, 0], "static weights": [0, 0]}
    raw_kinds = set()
    for name, arr in group.arrays():
        dims = arr.metadata.dimension_names or ()
        kind = "per-token arrays" if dims and dims[0] == "token" and name not in ("seq", "pos", "token_id", "text") \
            else "static weights" if not (dims and dims[0] == "token") else None
        if kind is None:
            continue
        if not arr.compressors:
            raw_kinds.add(kind)
            continue
        kinds[kind][0] += _data_bytes(arr, committed)
        kinds[kind][1] += _chunk_bytes(arr)
    parts = []
    for kind, (decoded, stored) in kinds.items():
        if kind in raw_kinds and not stored:
            parts.append(f"{kind} raw")
        elif stored:
            parts.append(f"{kind} Blosc zstd-1, {decoded / stored:.2f}x" + (" (some raw)" if kind in raw_kinds else ""))
    return "; ".join(parts) or "n/a"


def _stored_as(attrs) -> str:
    """The stored precision, and for a lossy store the decomposition error its capture measured."""
    lossy = attrs.get("store_dtype")
    if not lossy:
        return f"{attrs.get('dtype')}, the model's own (exact)"
    if "lossy_max_rel_error" not in attrs:
        return f"{lossy} (lossy; its error was not measured: the capture did not finish)"
    return (f"{lossy} (lossy): measured decomposition error {float(attrs['lossy_max_rel_error']):.3g} relative, "
            f"{float(attrs['lossy_max_abs_error']):.3g} absolute over {int(attrs['lossy_error_tokens']):,} tokens")


@cli.command()
@model_option
@click.option("--out", default=os.path.join("out", "demo.zarr"), show_default=True, type=click.Path(),
              help="Where the demo's store goes.")
@click.option("--overwrite/--no-overwrite", default=True, show_default=True,
              help="Replace the store a previous demo left there.")
@dtype_option
@device_option
def demo(model_id, out, overwrite, dtype, device):
    """Run it first: capture, verify, attribute " Paris".

    Captures the bundled sample with the embedded default model, verifies it, then taps "The capital
    of France is" and attributes the " Paris" logit to heads and MLPs. It shows in a minute that the
    capture is fast, that the terms sum to the residual exactly, and what the terms are good for.
    """
    import torch

    check_target(out, overwrite=overwrite)  # never replaces anything but a streamtap store
    sample, _ = _read_texts(_sample_path())
    start = time.perf_counter()
    model, tok = _load(model_id, dtype, device, False, sample + [PROMPT])
    loaded = time.perf_counter() - start
    cfg = model.config
    click.echo(f"streamtap demo: {model_id}  ({cfg.model_type}, {dtype}, {cfg.num_hidden_layers} layers x "
               f"{getattr(cfg, 'num_attention_heads', 0)} heads, d_model {cfg.hidden_size}; on {model.device.type}, "
               f"loaded in {loaded:.1f} s)")

    start = time.perf_counter()
    # truncate only ever cuts to the model's positions: nothing for the default, the tiny models have 64
    tap = st.capture(model, sample, out, tokenizer=tok, truncate=True, overwrite=overwrite, model_name=model_id,
                     progress=True)
    seconds = time.perf_counter() - start
    sample_tokens = tap.tokens

    # the prompt goes through the model as ordinary inference code would call it, tapped: the
    # logits printed below are the model's own, from the very forward whose terms are stored
    enc = tok(PROMPT, return_tensors="pt").to(model.device)
    with st.tap(model, out, tokenizer=tok, append=True, model_name=model_id), torch.no_grad():
        logits = model(**enc).logits[0, -1].float()

    ds = st.open(out)
    err = st.verify(ds, raise_on_error=False)
    disk, raw = _disk_bytes(out), _stored_bytes(out)
    click.echo(f"\ncapture  bundled sample -> {out}")
    _rows([
        ("tokens captured", f"{sample_tokens:,} in {len(sample)} sequences"),
        ("time", f"{seconds:.1f} s  ({sample_tokens / seconds:,.0f} tokens/s)"),
        ("store on disk", f"{_size(disk)}  (uncompressed {_size(raw)}, {raw / disk:.1f}x)"),
        ("max decomposition error", f"{err.attrs['max_rel_error']:.2g} relative, {err.attrs['max_abs_error']:.2g} "
                                    f"absolute over {ds.sizes['token']:,} tokens (tolerance "
                                    f"{err.attrs['tolerance']:g}): {_verdict(err)}"),
    ], indent="  ")

    last = ds.sizes["token"] - 1  # the prompt is the store's last sequence, its last token the last row
    target = tok(TARGET, add_special_tokens=False)["input_ids"][0]
    probs = logits.softmax(-1)
    top = int(probs.argmax())
    contrib = st.analysis.direct_logit_attribution(ds.isel(token=[last]), target).isel(token=0).compute()
    total, model_logit = float(contrib.sum("component")), float(logits[target])
    close = abs(total - model_logit) <= 1e-4 * abs(model_logit) + 1e-4
    click.echo(f"\nprompt   {_q(PROMPT)}  (appended as sequence {int(ds.seq.values[last])}, "
               f"{int(enc['input_ids'].shape[1])} tokens)")
    _rows([
        ("top-1 next token", f"{_q(tok.decode([top]))}  p = {float(probs[top]):.3f}"),
        (f"{_q(TARGET)} logit", f"model {model_logit:.4f}, sum of {contrib.sizes['component']} direct "
                              f"contributions {total:.4f}  (diff {abs(total - model_logit):.1g}): "
                              f"{'ok' if close else 'FAIL'}"),
    ], indent="  ")
    click.echo(f"\n  direct contributions to the {_q(TARGET)} logit at the prompt's last token")
    _top_table(contrib, {"head": 10, "mlp": 5})
    if _verdict(err) != "ok" or not close:
        raise click.exceptions.Exit(1)


def _top_table(contrib, wanted: dict[str, int]) -> None:
    """Largest contributions per kind, side by side: the heads and MLPs that write the answer."""
    kinds, labels, values = contrib.kind.values, contrib.component.values, contrib.values
    columns = []
    for kind, n in wanted.items():
        idx = np.flatnonzero(kinds == kind)
        idx = idx[np.argsort(-values[idx], kind="stable")][:n]
        columns.append([f"{labels[i]:<8} {values[i]:+7.3f}" for i in idx])
    header = "  ".join(f"{f'top {n} {kind}s' if kind == 'head' else f'top {n} {kind.upper()} terms':<16}"
                       for kind, n in wanted.items())
    click.echo("  " + header.rstrip())
    for row in range(max(len(c) for c in columns)):
        click.echo("  " + "  ".join(f"{c[row] if row < len(c) else '':<16}" for c in columns).rstrip())


@cli.command()
@click.argument("store")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Directory for index.html and data/.")
@click.option("--token", type=int, default=None,
              help="Store row to attribute (negative counts from the end).  [default: in the last sequence, the last "
                   "token whose predicted next token is a word]")
@click.option("--target", default=None, help="Token id or token text to attribute.  [default: the model's top-1 there]")
@click.option("--words", default=None,
              help='Comma-separated tokens for the relevance maps, e.g. " France, Paris".  [default: the attributed '
                   "prediction and the content words of its passage]")
@click.option("--sample", type=click.IntRange(min=1), default=4096, show_default=True,
              help="Tokens (from the first) the per-token statistics use.")
@click.option("--tokenizer", "tokenizer_id", default=None, metavar="ID_OR_DIR",
              help="Tokenizer for vocabulary text (e.g. smollm2).  [default: text stored with the corpus]")
@storage_option
def report(store, out, token, target, words, sample, tokenizer_id, storage_options):
    """Write a self-contained HTML report of a store: figures and the numbers behind them.

    Attribution of one prediction to heads and MLPs, the logit lens at it and over its passage, attention
    patterns and head scores (stores captured with --patterns), relevance and promotion maps, effective
    ranks, source-message norms, the residual-PCA scree and the accumulating prediction, from the store alone.
    """
    from ..report import write_report

    tok = _tokenizer(tokenizer_id)
    if target is not None and target.lstrip("-").isdigit():
        target = int(target)
    start = time.perf_counter()
    path = write_report(store, out, token=token, target=target, words=words.split(",") if words else None,
                        sample=sample, tokenizer=tok, storage_options=storage_options)
    _rows([("report", str(path)), ("seconds", f"{time.perf_counter() - start:.1f}")])
