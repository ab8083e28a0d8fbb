"""The ``plan`` command: what a capture would cost (bytes, disk and forward time) before it runs, and what
would bring it under a time or size budget."""

from __future__ import annotations

import click

import streamtap as st

from ..models.smollm2 import DEFAULT_MODEL
from ..options import CaptureOptions
from ._common import _load, _options_from, _rows, cli, device_option, dtype_option

_UNITS = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12, "p": 1e15}
_SECONDS = {"": 1, "s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400}


def _amount(table: dict, what: str):
    """A click callback reading ``12``, ``1.5T``, ``24h``: a number and a unit from ``table``."""
    def parse(ctx, param, value):
        if value is None:
            return None
        text = value.strip().lower().removesuffix("b" if what == "bytes" else "\0")
        number = text.rstrip("abcdefghijklmnopqrstuvwxyz")
        try:
            return float(number) * table[text[len(number):]]
        except (KeyError, ValueError):
            raise click.BadParameter(f"{value!r}: expected {what}, a number with an optional unit "
                                     f"({', '.join(u for u in table if u)})", ctx=ctx, param=param) from None
    return parse


# what a plan has no use for: how a capture writes, not what it stores
_NOT_PLANNED = ("append", "overwrite", "break_lock", "writer", "compress", "storage_options", "check")


@cli.command()
@click.option("--model", "model_id", default=None, metavar="ID_OR_DIR",
              help="A model to load and time on --device (as capture's --model).  [default: the embedded one]")
@click.option("--config", "config", default=None, metavar="ID_OR_JSON",
              help="Plan a model without loading it: a config.json, a directory with one, or a known id "
                   "(llama-3-8b, meta-llama/Meta-Llama-3-8B, meta-llama/Llama-3.1-8B).")
@click.option("--tokens", type=click.IntRange(min=1), required=True, help="Tokens to capture.")
@click.option("--out", default=".", show_default=True, help="Where the store would go (the disk is measured there).")
@click.option("--disk-bandwidth", default=None, callback=_amount(_UNITS, "bytes per second"),
              help="The disk's write bandwidth, e.g. 2G (bytes/s).  [default: measured, 256 MiB under --out]")
@click.option("--device-flops", default="400T", show_default=True, callback=_amount(_UNITS, "FLOP/s"),
              help="With --config: the device's sustained FLOP/s the forward rate is assumed from.")
@click.option("--budget-time", default=None, callback=_amount(_SECONDS, "a duration"),
              help="Time budget, e.g. 3600, 90m, 24h, 2d: what would bring the capture under it.")
@click.option("--budget-size", default=None, callback=_amount(_UNITS, "bytes"),
              help="Size budget, e.g. 500G, 2T: what would bring the store under it.")
@click.option("--batch", "batch_size", type=click.IntRange(min=1), default=8, show_default=True,
              help="Sequences per timed forward (with --model).")
@click.option("--seq", "seq_len", type=click.IntRange(min=1), default=256, show_default=True,
              help="Tokens per sequence of the timed forwards (with --model).")
@dtype_option
@device_option
@_options_from(CaptureOptions, skip=_NOT_PLANNED)
def plan(model_id, config, tokens, out, disk_bandwidth, device_flops, budget_time, budget_size, batch_size, seq_len,
         dtype, device, **flags):
    """Plan a capture: bytes per token and in total, disk and forward time, which bounds it.

    The bytes come from the store's schema for the model's layout and the options; the forward rate
    from a few timed batches on --device, or with --config from --device-flops (stated in the output).
    """
    if model_id and config:
        raise click.UsageError("give --model (load and time it) or --config (plan it unloaded), not both")
    flags = {k: v for k, v in flags.items() if v is not None and v != ()}  # unset: the option's default
    tok = None
    if config:
        target = config
    else:
        target, tok = _load(model_id or DEFAULT_MODEL, dtype, device, False, ["plan"])
    result = st.plan(target, tokens, target=out, disk_bandwidth=disk_bandwidth, device_flops=device_flops,
                     budget_time=budget_time, budget_size=budget_size, batch_size=batch_size, seq_len=seq_len,
                     tokenizer=tok, **flags)
    _rows(result.rows())
