"""Attribution-graph benchmark: time and peak memory of ``st.analysis.attribution_graph`` on SmolLM2.

    python benchmarks/bench_graph.py                          # 256 tokens, depth 3, plus the scaling table
    python benchmarks/bench_graph.py --lengths 256 --depths 3 # one point

What it does: captures one sequence of the bundled sample text (the first ``max(lengths)`` tokens,
``patterns=True, neurons=True``) with SmolLM2-135M-Instruct into a temporary store, then for each
(length, depth) builds the graph of the model's top-1 next token at the sequence's last position in a
fresh process (a store of the first ``length`` tokens of the same text, captured once per length), and
reports the wall time of the graph alone, its size, and the process's peak resident memory (VmHWM,
which includes Python, numpy and the store's reader: the target is < 1 minute and < 2 GiB for 256
tokens at depth 3 on a 2-core machine). Results are printed as a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, sys, time
import numpy as np
import streamtap as st
path, depth, target = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
ds = st.open(path)
t = time.perf_counter()
g = st.analysis.attribution_graph(ds, 0, target, depth=depth, max_inputs=8)
wall = time.perf_counter() - t
hwm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))
print(json.dumps({"wall": wall, "nodes": len(g.nodes), "edges": len(g.edges), "value": g.attrs["value"], "hwm": hwm,
                  "expanded": int(g.nodes.expanded.sum())}))
"""


def capture(tokens: int, path: Path) -> int:
    """Store the first ``tokens`` tokens of the bundled sample; returns the model's top-1 next token."""
    import torch

    import streamtap as st
    from streamtap.models import load_model

    model, tok = load_model()
    text = (Path(st.__file__).parent / "data" / "sample.txt").read_text()
    ids = tok(text, return_tensors="pt")["input_ids"][:, :tokens]
    with st.tap(model, str(path), tokenizer=tok, patterns=True, neurons=True, overwrite=True), torch.no_grad():
        out = model(input_ids=ids)
    return int(out.logits[0, -1].argmax())


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", default="64,128,256")
    ap.add_argument("--depths", default="1,2,3,4")
    ap.add_argument("--at", type=int, default=256, help="the length the depth scaling is measured at")
    args = ap.parse_args(argv)
    lengths = [int(x) for x in args.lengths.split(",")]
    depths = [int(x) for x in args.depths.split(",")]
    points = [(n, 3) for n in lengths] + [(args.at, d) for d in depths if d != 3]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        targets = {}
        for n in sorted({n for n, _ in points}):
            t = time.perf_counter()
            targets[n] = capture(n, Path(tmp) / f"s{n}.zarr")
            print(f"captured {n} tokens in {time.perf_counter() - t:.1f} s", file=sys.stderr)
        for n, d in points:
            run = subprocess.run([sys.executable, "-c", CHILD, str(Path(tmp) / f"s{n}.zarr"), str(d), str(targets[n])],
                                 capture_output=True, text=True, check=True)
            r = json.loads(run.stdout.strip().splitlines()[-1])
            rows.append((n, d, r))
            print(f"{n} tokens, depth {d}: {r['wall']:.1f} s, {r['nodes']} nodes, peak {r['hwm'] / 2**30:.2f} GiB",
                  file=sys.stderr)
    print("| tokens | depth | graph wall | nodes (expanded) | edges | peak RSS |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for n, d, r in rows:
        print(f"| {n} | {d} | {r['wall']:.1f} s | {r['nodes']} ({r['expanded']}) | {r['edges']} | {r['hwm'] / 2**30:.2f} GiB |")


if __name__ == "__main__":
    main()
