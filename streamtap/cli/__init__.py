"""The command line: capture a corpus, check a store, describe it, and the demo the README opens with.

    streamtap demo                               # the embedded default model, end to end
    streamtap capture --text docs.txt --out run.zarr     # --resume after a crash, Ctrl-C or full disk
    streamtap verify run.zarr
    streamtap info run.zarr
    streamtap info s3://bucket/run.zarr --storage-option endpoint_url=http://127.0.0.1:9000
    streamtap graph run.zarr --seq 0 --target " Paris" --out graph/   # graph.py
    streamtap plan --config llama-3-8b --tokens 1000000000           # plan.py

Every streamtap error is printed as ``error: <message>`` with exit code 2 (the messages name the
fix); a store that misses the invariant makes ``verify`` exit 1. ``--model tiny:ARCH`` loads a tiny
random model with a word-level tokenizer over the input text, so the whole CLI runs offline in seconds.
"""

from __future__ import annotations

from . import graph, plan, stores  # noqa: F401  (each registers its commands on the group)
from ._common import cli

__all__ = ["cli", "main"]


def main(argv=None):
    """Console entry point (``streamtap`` in pyproject.toml)."""
    return cli.main(args=argv, prog_name="streamtap")
