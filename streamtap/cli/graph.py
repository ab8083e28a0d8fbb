"""The ``graph`` command: an exact attribution graph of one prediction, as a page and Neuronpedia JSON."""

from __future__ import annotations

import time

import click

import streamtap as st

from ._common import _rows, _tokenizer, cli, storage_option


@cli.command()
@click.argument("store")
@click.option("--seq", type=int, required=True, help="The stored sequence.")
@click.option("--target", required=True, help="Token text (exactly one token) or id whose logit is explained.")
@click.option("--foil", default=None, help="Explain logit[target] - logit[foil].")
@click.option("--position", type=int, default=-1, show_default=True, help="Position in the sequence (negative: from its end).")
@click.option("--depth", type=click.IntRange(min=1), default=3, show_default=True, help="Edges from the root still expanded.")
@click.option("--max-inputs", type=click.IntRange(min=1), default=8, show_default=True,
              help="Inputs kept per node; the others are summed into its rest input.")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Directory for graph.html, graph.json (Neuronpedia format) and the CSV tables.")
@click.option("--tokenizer", "tokenizer_id", default=None, metavar="ID_OR_DIR",
              help="Tokenizer for the target (e.g. smollm2).  [default: text stored with the corpus]")
@storage_option
def graph(store, seq, target, foil, position, depth, max_inputs, out, tokenizer_id, storage_options):
    """Write an exact attribution graph of one prediction: an interactive page (click a node for its inputs)
    and its Neuronpedia-format JSON. Needs a store captured with --patterns (and --neurons for MLP neurons)."""
    from ..analysis import attribution_graph
    from ..report.graph_page import write_graph

    tok = _tokenizer(tokenizer_id)
    target, foil = (int(t) if t is not None and t.lstrip("-").isdigit() else t for t in (target, foil))
    start = time.perf_counter()
    g = attribution_graph(st.open(store, storage_options=storage_options), seq, target, foil=foil, position=position,
                          depth=depth, max_inputs=max_inputs, tokenizer=tok)
    path = write_graph(g, out)
    _rows([("graph", str(path)), ("nodes", len(g.nodes)), ("edges", len(g.edges)), ("value", f"{g.attrs['value']:.6g}"),
           ("seconds", f"{time.perf_counter() - start:.1f}")])
