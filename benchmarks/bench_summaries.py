"""Micro-benchmark of the summary step alone (``summarise=``): one batch of the GPT-2-small shape
(2,048 tokens, 12 layers of 12 heads and 3,072 neurons; ``--layers``, ``--heads``, ``--neurons``,
``--d-model`` set another) folded into the running state, without the model or the store. ``--seen N``
sets every neuron's kept top-k, before the timed batch, to an exact sample of the k largest of N
earlier tokens of the same distribution (the late batches of a corpus, where few components' top-k
still move); by default the timed batch is the second (all of them move).
``--hosts compiled,numpy`` times this tree's ways of folding on the CPU (numba's kernel, numpy's
passes, torch's operations), ``--settings`` (repeated) each summarise= setting, and ``--baseline REV``
the Summariser of a git revision, all in the same process, taking turns, so a loaded shared machine
moves them alike; medians of ``--repeats``.

    python benchmarks/bench_summaries.py --hosts compiled,numpy --seen 1000000 --repeats 5
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from streamtap.io.summaries import Settings  # noqa: E402


def _module_at(rev: str, name: str):
    """``streamtap/tapping/<name>.py`` as it was at git revision ``rev`` (None where it did not exist)."""
    shown = subprocess.run(["git", "show", f"{rev}:streamtap/tapping/{name}.py"], cwd=ROOT, capture_output=True,
                           text=True)
    if shown.returncode:
        return None
    spec = importlib.util.spec_from_loader(f"streamtap.tapping._{name}_baseline", loader=None)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "streamtap.tapping"
    exec(compile(shown.stdout, f"{rev}:{name}.py", "exec"), module.__dict__)
    return module


def summariser_class(rev: str | None):
    """This tree's Summariser, or the one at git revision ``rev`` with that revision's compiled fold."""
    if rev is None:
        from streamtap.tapping.summarise import Summariser

        return Summariser
    module = _module_at(rev, "summarise")
    if module is None:
        raise SystemExit(f"no streamtap/tapping/summarise.py at {rev}")
    kernel = _module_at(rev, "fold_kernel")
    if kernel is not None:
        module.fold_kernel = kernel
    return module.Summariser


def batch(T: int, L: int, H: int, dh: int, N: int, d: int, seed: int = 0):
    """One batch's terms as the recorder hands them over (8 rows of T/8 tokens, no padding)."""
    g = torch.Generator().manual_seed(seed)
    rows = 8
    out = {"z": torch.randn(T, L, H, dh, generator=g), "mlp_out": torch.randn(T, L, d, generator=g),
           "neuron_act": torch.nn.functional.gelu(torch.randn(T, L, N, generator=g) * 2),
           "resid_final": torch.randn(T, d, generator=g)}
    ids = torch.randint(0, 50257, (rows, T // rows), generator=g)
    mask = torch.ones(rows, T // rows, dtype=torch.bool)
    seq = torch.arange(rows).unsqueeze(1).expand_as(mask)[mask]
    pos = (mask.cumsum(dim=1) - 1)[mask]
    static = {"W_O": torch.randn(L, H, dh, d, generator=g) / dh ** 0.5}
    return out, ids, mask, seq, pos, static


def top_of_seen(n_seen: int, k: int, components: int, seed: int = 1) -> torch.Tensor:
    """(component, k) float64: the k largest of ``n_seen`` values gelu(2 z), z ~ N(0, 1), per component,
    sampled exactly (Renyi: the top uniform order statistics are products of U^(1/m))."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(components, k, generator=g, dtype=torch.float64)
    m = n_seen - torch.arange(k, dtype=torch.float64)
    v = torch.exp(torch.cumsum(torch.log(u) / m, dim=1))          # descending uniforms
    return torch.nn.functional.gelu(2 * torch.special.ndtri(v))


def time_one(cls, args, data, groups, host=None, settings="on") -> float:
    out, ids, mask, seq, pos, static = data
    if host is not None:
        cls.HOST = host
    bound = types.SimpleNamespace(n_layers=args.layers)
    s = cls(Settings.parse(settings), bound)
    s.prepare(static)
    sub = {k: v for k, v in out.items() if k in groups or k == "resid_final"}
    s.update(sub, ids, mask, seq, pos, 8)          # the state exists: what follows is a steady batch
    if args.seen and "neuron" in s.state:
        top = s.state["neuron"]["top_value"]
        top.copy_(top_of_seen(args.seen, top.shape[1], top.shape[0]))
    start = time.perf_counter()
    s.update(sub, ids, mask, seq + 8, pos, 8)
    return time.perf_counter() - start


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline", help="git revision whose Summariser to time alongside")
    p.add_argument("--hosts", default="compiled", help="comma-separated CPU folds of this tree: compiled,numpy,torch")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--neurons", type=int, default=3072)
    p.add_argument("--heads", type=int, default=12, help="heads a layer (SmolLM2-135M: --layers 30 --heads 9 "
                   "--neurons 1536 --d-model 576)")
    p.add_argument("--d-model", type=int, default=768)
    p.add_argument("--seen", type=int, default=0, help="tokens the kept top-k stand for (0: one batch)")
    p.add_argument("--groups", default="neuron_act", help="comma-separated terms: neuron_act,z,mlp_out")
    p.add_argument("--settings", action="append",
                   help="summarise= settings, e.g. neuron_quantiles=off; repeat it to time several in turn (default: on)")
    args = p.parse_args(argv)
    data = batch(args.tokens, args.layers, args.heads, 64, args.neurons, args.d_model)
    groups = set(args.groups.split(","))
    this = summariser_class(None)
    classes = {f"this tree, {h}" + ("" if how == "on" else f", {how}"): (this, h, how)
               for how in args.settings or ["on"] for h in args.hosts.split(",")}
    if args.baseline:
        classes = {f"baseline {args.baseline}": (summariser_class(args.baseline), None, "on"), **classes}
    for cls, host, how in classes.values():   # compile (numba) and touch everything once before timing
        time_one(cls, args, data, groups, host, how)
    times = {name: [] for name in classes}
    for _ in range(args.repeats):
        for name, (cls, host, how) in classes.items():
            times[name].append(time_one(cls, args, data, groups, host, how))
    print(f"summary step, {args.tokens} tokens x {args.layers} layers, groups {sorted(groups)}, seen {args.seen}, "
          f"torch threads {torch.get_num_threads()}, {args.repeats} repeats alternating")
    for name, ts in times.items():
        print(f"  {name:>40}: median {statistics.median(ts):.3f} s  (min {min(ts):.3f}, max {max(ts):.3f})")


if __name__ == "__main__":
    main()
