"""What every command shares: the group that turns streamtap's errors into one line and exit code 2, the
options several commands take (model, dtype, device, storage options, an options class's fields), loading a
model, and the aligned ``key  value`` output."""

from __future__ import annotations

import json

import click

import streamtap as st

from ..errors import StreamtapError, command_line_wording
from ..io.location import access_error
from ..models.smollm2 import DEFAULT_MODEL
from ..options import option_fields

DTYPES = ("float32", "bfloat16", "float16")
TINY = "tiny:"


# -- plumbing --------------------------------------------------------------------------------------
class _Cli(click.Group):
    """A group that turns any StreamtapError into one line on stderr and exit code 2, and Ctrl-C
    into exit code 130 (as shells expect of an interrupted command).

    streamtap's errors are written for the person at the terminal; a traceback would bury them.
    """

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except StreamtapError as exc:
            click.echo(f"error: {command_line_wording(str(exc))}", err=True)  # the flag to type, not the keyword
            ctx.exit(2)
        except KeyboardInterrupt:
            ctx.exit(130)
        except Exception as exc:  # a storage library's "cannot reach" (S3 credentials, endpoint): one line too
            if access_error(exc) is None:
                raise
            click.echo(f"error: cannot reach the store ({type(access_error(exc)).__name__}: {access_error(exc)}). "
                       "Check the credentials (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY or AWS_PROFILE) and the "
                       "endpoint (--storage-option endpoint_url=... or AWS_ENDPOINT_URL)", err=True)
            ctx.exit(2)


def _load(model_id: str, dtype: str, device: str | None, trust_remote_code: bool, texts: list[str]):
    """(model, tokenizer) on ``device``: a tiny random model for ``tiny:ARCH``, else models.load_model."""
    import torch

    from .. import models

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if model_id.startswith(TINY):
        from ..models.tokenizer import word_level_tokenizer

        model = models.tiny_model(model_id[len(TINY):], dtype=dtype)
        tok = word_level_tokenizer(texts, model.config.vocab_size)
    else:
        model, tok = models.load_model(model_id, dtype=dtype, trust_remote_code=trust_remote_code)
    try:
        model = model.to(device)
    except (RuntimeError, ValueError, AssertionError) as exc:  # torch without CUDA raises AssertionError
        raise click.BadParameter(f"cannot run the model on {device!r}: {exc}", param_hint="--device") from None
    return model, tok


def _rows(pairs: list[tuple[str, object]], indent: str = "") -> None:
    """Aligned ``key  value`` lines: easy to read, easy to grep."""
    width = max(len(k) for k, _ in pairs)
    for key, value in pairs:
        click.echo(f"{indent}{key:<{width}}  {value}")


model_option = click.option(
    "--model", "model_id", default=DEFAULT_MODEL, show_default=True, metavar="ID_OR_DIR",
    help="A name streamtap.models knows, a Hugging Face id already on disk, or a model directory.")
dtype_option = click.option("--dtype", type=click.Choice(DTYPES), default="float32", show_default=True,
                            help="Precision the model runs (and the store keeps) in.")
device_option = click.option("--device", default=None,
                             help="Where the model runs, e.g. cpu, cuda, cuda:1.  [default: cuda if available]")


def _storage_options(ctx, param, values) -> dict:
    """``KEY=VALUE`` pairs; a VALUE that is JSON (true, 3, {"a": 1}) is read as JSON, else as text."""
    options = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected KEY=VALUE, got {item!r}", ctx=ctx, param=param)
        try:
            options[key] = json.loads(value)
        except ValueError:
            options[key] = value
    return options


storage_option = click.option(
    "--storage-option", "storage_options", multiple=True, metavar="KEY=VALUE", callback=_storage_options,
    help="For an s3://... (any fsspec URL) store: an option of its filesystem, e.g. "
         "endpoint_url=http://127.0.0.1:9000; repeatable. s3fs also reads AWS_ENDPOINT_URL and the AWS_* "
         "credentials.")


# -- commands ----------------------------------------------------------------------------------------
@click.group(cls=_Cli, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(st.__version__, prog_name="streamtap")
def cli():
    """Record every attention head's message and MLP output as residual-stream terms in Zarr."""


def _options_from(cls, skip=()):
    """The click options of an options class's fields (flags and help texts come from its metadata)."""
    decorators = []
    for f in option_fields(cls):
        flag, help_text, choices = f.metadata["flag"], f.metadata["help"], f.metadata["choices"]
        if flag == "" or f.name in skip:
            continue  # not on the command line
        if f.name == "storage_options":
            decorators.append(storage_option)
        elif flag and "/" in flag:
            decorators.append(click.option(flag, f.name, default=None, help=help_text))
        elif flag and flag.startswith("--no-"):
            decorators.append(click.option(flag, f.name, flag_value=False, default=True,
                                           help=f.metadata.get("flag_help") or help_text))
        elif f.metadata.get("parse"):   # text the option reads itself (lists, position rules, name=text)
            decorators.append(click.option(flag, f.name, type=str, default=None, multiple=f.name == "project",
                                           help=help_text))
        elif f.type == "bool":
            decorators.append(click.option(flag or "--" + f.name.replace("_", "-"), f.name, is_flag=True,
                                           help=help_text))
        elif choices:
            decorators.append(click.option(flag or "--" + f.name.replace("_", "-"), f.name, type=click.Choice(choices),
                                           default=f.default, show_default=f.default is not None, help=help_text))
        else:
            decorators.append(click.option(flag or "--" + f.name.replace("_", "-"), f.name,
                                           type=click.IntRange(min=1), default=f.default,
                                           show_default=f.default is not None, help=help_text))

    def apply(fn):
        for decorator in reversed(decorators):
            fn = decorator(fn)
        return fn

    return apply


def _tokenizer(tokenizer_id):
    """A tokenizer by id or directory (``smollm2``: the bundled one), or None."""
    if not tokenizer_id:
        return None
    from transformers import AutoTokenizer

    from ..models.smollm2 import smollm2_dir

    return AutoTokenizer.from_pretrained(str(smollm2_dir()) if tokenizer_id == DEFAULT_MODEL else tokenizer_id,
                                         trust_remote_code=False)
