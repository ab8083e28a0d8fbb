"""What patterns cost, side by side: the designs for keeping attention patterns, measured in one run.

    python benchmarks/bench_patterns.py [--batch 8] [--seq 256] [--batches 5] [--rounds 1] [--skip-smollm2]
                                        [--cases ...] [--device cpu|cuda] [--dir DIR]
                                        [--malloc-mmap-threshold BYTES] [--torch-huge-pages]

For a GPT-2-small-shaped random model (12 layers, 12 heads, d_model 768) and for SmolLM2-135M
(the models of bench_capture.py), each case runs in a fresh process on the same random batch:

- ``plain``: the plain HF forward (SDPA, as the models load);
- ``eager-attentions``: the forward with eager attention and ``output_attentions=True``, what storing
  dense patterns would have to compute (every layer's (batch, head, query, key) probabilities);
- ``streamtap``: ``st.tap`` into Zarr, the default store;
- ``streamtap-patterns``: ``st.tap(..., patterns=True)``, the chosen design (only the positional tables
  the model used are stored; q, k and the patterns are recomputed offline from the stream);
- ``nnsight-qk``: nnsight 0.8 saving every layer's query and key projections to memory (``q_proj`` and
  ``k_proj`` outputs; GPT-2's fused ``c_attn`` output, which holds v as well), what storing q and k
  would cost to take out of the model.

Reported: median seconds per batch (for the streamtap cases the mean including the writer's final
drain), the ratio to the plain forward, peak RSS, and each design's bytes per token: the chosen
design's is measured (the per-token arrays of the patterns store minus the default store's, raw and
on disk); storing q and k is L (H + n_kv) d_head itemsize; dense patterns L H seq_len itemsize for
this batch's sequence length (a causal model's lower triangle averages half of it).
The host flags are bench_capture.py's (set in every case's environment, the plain forward's included).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench_capture import (  # noqa: E402
    HOST_VARIABLES, MMAP_THRESHOLD_MAX, MODELS, _cpu_model, _dir_bytes, _host_seen, _layer_paths, _load, _peak,
    describe_host, host_environment)

CASES = ("plain", "eager-attentions", "streamtap", "streamtap-patterns", "nnsight-qk")
LABELS = {
    "plain": "plain HF forward (SDPA)",
    "eager-attentions": "eager forward, output_attentions=True (dense patterns computed)",
    "streamtap": "streamtap → Zarr (default)",
    "streamtap-patterns": "streamtap → Zarr, patterns=True (chosen)",
    "nnsight-qk": "nnsight: save every layer's q and k (memory)",
}
TAPS = ("streamtap", "streamtap-patterns")


def _load_eager(name: str, device: str):
    """The model of ``_load`` with eager attention (the same seed, so the same weights for GPT-2)."""
    import torch

    torch.manual_seed(0)
    if name == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        model = GPT2LMHeadModel(GPT2Config(n_layer=12, n_head=12, n_embd=768, attn_implementation="eager")).eval()
    else:
        from streamtap.models import load_model

        model, _ = load_model("smollm2", attn_implementation="eager")
    assert model.config._attn_implementation == "eager"
    return model.to(device)


def _qk_paths(model) -> list[str]:
    n = model.config.num_hidden_layers
    if model.config.model_type == "gpt2":
        return [f"transformer.h.{l}.attn.c_attn" for l in range(n)]
    return [p for l in range(n) for p in (f"model.layers.{l}.self_attn.q_proj", f"model.layers.{l}.self_attn.k_proj")]


def shape(model) -> dict:
    c = model.config
    heads = c.num_attention_heads
    d_head = getattr(c, "head_dim", None) or c.hidden_size // heads
    return {"layers": c.num_hidden_layers, "heads": heads, "kv_heads": getattr(c, "num_key_value_heads", None) or heads,
            "d_head": d_head, "itemsize": next(model.parameters()).element_size()}


def run_case(args) -> dict:
    """One case in this process; prints a JSON line."""
    import torch

    model = _load_eager(args.model, args.device) if args.case == "eager-attentions" else _load(args.model, args.device)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=g).to(args.device)
    mask = torch.ones_like(ids)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    out: dict = {"case": args.case, "model": args.model, "host": _host_seen(), "shape": shape(model)}
    close = lambda: None  # noqa: E731
    path = os.path.join(args.dir, f"{args.model}-{args.case}.zarr")

    if args.case == "plain":
        def step():
            with torch.no_grad():
                model(input_ids=ids, attention_mask=mask)
    elif args.case == "eager-attentions":
        def step():
            with torch.no_grad():
                result = model(input_ids=ids, attention_mask=mask, output_attentions=True)
            assert len(result.attentions) == model.config.num_hidden_layers
            assert result.attentions[-1].shape == (args.batch, model.config.num_attention_heads, args.seq, args.seq)
            return result
    elif args.case == "nnsight-qk":
        import nnsight

        envoy = nnsight.NNsight(model)
        paths = _qk_paths(model)
        assert _layer_paths(model)  # the same models as bench_capture's

        def step():
            with torch.no_grad():
                with envoy.trace(input_ids=ids, attention_mask=mask):
                    saved = nnsight.save([envoy.get(p).output for p in paths])
            assert len(saved) == len(paths) and saved[-1].shape[:2] == ids.shape
            return saved
    else:
        import streamtap as st

        the_tap = st.tap(model, path, check=False, patterns=args.case == "streamtap-patterns")
        the_tap.__enter__()

        def step():
            with torch.no_grad():
                model(input_ids=ids, attention_mask=mask)

        def close():
            the_tap.__exit__(None, None, None)

    step()  # warm-up (and, for streamtap, creating the store)
    sync()
    times = []
    start = time.perf_counter()
    for _ in range(args.batches):
        t = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t)
    close()
    total = time.perf_counter() - start
    out.update(median=statistics.median(times), mean=total / args.batches, times=times, peak_rss=_peak(),
               tokens=int(mask.sum()))
    if args.case in TAPS:
        import zarr

        group = zarr.open_group(path, mode="r")
        tokens = int(group.attrs["committed_tokens"])
        per_token = {n: a for n, a in group.arrays() if a.metadata.dimension_names[0] == "token"}
        out["disk_per_token"] = sum(_dir_bytes(os.path.join(path, n)) for n in per_token) / tokens
        out["raw_per_token"] = sum(a.nbytes for a in per_token.values()) / tokens
        out["arrays"] = {n: a.nbytes / tokens for n, a in per_token.items()}
        shutil.rmtree(path, ignore_errors=True)
    print(json.dumps(out))
    return out


def _child(argv: list[str], env: dict[str, str]) -> dict:
    result = subprocess.run([sys.executable, os.path.abspath(__file__), *argv], capture_output=True, text=True,
                            env=env)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{result.stderr[-4000:]}")
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["host"] == {k: env.get(k) for k in HOST_VARIABLES}, (argv, out["host"])
    return out


def design_bytes(r: dict, rows: dict, seq: int) -> str:
    """The bytes per token of the design a case stands for."""
    s = r["shape"]
    if r["case"] == "eager-attentions":
        dense = s["layers"] * s["heads"] * seq * s["itemsize"]
        return f"dense patterns {dense:,} (analytic, L·H·{seq}·{s['itemsize']}; causal half {dense // 2:,})"
    if r["case"] == "nnsight-qk":
        qk = s["layers"] * (s["heads"] + s["kv_heads"]) * s["d_head"] * s["itemsize"]
        return f"q and k {qk:,} (analytic, L·(H + n_kv)·d_head·{s['itemsize']})"
    if r["case"] == "streamtap":
        return f"store {r['raw_per_token']:,.0f} raw, {r['disk_per_token']:,.0f} on disk"
    if r["case"] == "streamtap-patterns":
        base = rows.get("streamtap")
        if base is None:
            return f"store {r['raw_per_token']:,.0f} raw"
        extra = sorted(set(r["arrays"]) - set(base["arrays"]))
        raw, disk = r["raw_per_token"] - base["raw_per_token"], r["disk_per_token"] - base["disk_per_token"]
        return f"patterns add {raw:,.0f} raw, {disk:,.0f} on disk ({', '.join(extra) or 'no array'})"
    return ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batches", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dir", default=None)
    parser.add_argument("--skip-smollm2", action="store_true")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--rounds", type=int, default=1, help="run the cases this many times, taking turns")
    parser.add_argument("--malloc-mmap-threshold", type=int, metavar="BYTES",
                        help="run every case with MALLOC_MMAP_THRESHOLD_=BYTES (see bench_capture.py)")
    parser.add_argument("--torch-huge-pages", action="store_true",
                        help="run every case with THP_MEM_ALLOC_ENABLE=1 (see bench_capture.py)")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.malloc_mmap_threshold is not None and not 0 <= args.malloc_mmap_threshold <= MMAP_THRESHOLD_MAX:
        parser.error(f"--malloc-mmap-threshold must be between 0 and {MMAP_THRESHOLD_MAX} bytes")
    unknown = sorted(set(args.cases.split(",")) - set(CASES))
    if unknown:
        parser.error(f"--cases: unknown {', '.join(unknown)}; choose from {', '.join(CASES)}")
    if args.case:
        run_case(args)
        return

    import torch

    env = host_environment(args)
    directory = tempfile.mkdtemp(prefix="streamtap-bench-patterns-", dir=args.dir)
    common = ["--batch", str(args.batch), "--seq", str(args.seq), "--batches", str(args.batches),
              "--device", args.device, "--dir", directory]
    load_start = os.getloadavg()[0]
    models = ["gpt2"] + ([] if args.skip_smollm2 else ["smollm2"])
    results: dict[str, dict[str, dict]] = {}
    all_rounds: dict[tuple[str, str], list[float]] = {}
    try:
        for model in models:
            rounds: dict[str, list[dict]] = {}
            for i in range(args.rounds):  # the cases take turns, so a drift of the machine's speed hits them alike
                for case in args.cases.split(","):
                    r = _child(["--case", case, "--model", model, *common], env)
                    rounds.setdefault(case, []).append(r)
                    print(f"  {model:8s} {case:20s} round {i + 1}: median {r['median']:.3f} s  mean {r['mean']:.3f} s  "
                          f"peak RSS {r['peak_rss'] / 2**30:.2f} GiB", file=sys.stderr, flush=True)
            results[model] = {}
            for case, runs in rounds.items():  # the round with the median time stands for the case
                key = (lambda r: r["mean"]) if case in TAPS else (lambda r: r["median"])
                all_rounds[(model, case)] = [key(r) for r in runs]
                runs.sort(key=key)
                results[model][case] = runs[(len(runs) - 1) // 2]
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    load_end = os.getloadavg()[0]

    import nnsight
    import transformers
    import zarr

    dev = torch.cuda.get_device_name() if args.device == "cuda" else "no GPU, CPU only"
    print(f"Machine: {_cpu_model()}, {platform.machine()}, {os.cpu_count()} cores, "
          f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), transformers {transformers.__version__}, nnsight "
          f"{getattr(nnsight, '__version__', '?')}, zarr {zarr.__version__}, {dev}; batch {args.batch} x {args.seq} "
          f"tokens, median of {args.batches} batches after a warm-up; each case the median of {args.rounds} round(s), "
          f"the cases taking turns; load average {load_start:.2f} at start, {load_end:.2f} at end.")
    print(f"Host settings, the same for every case: {describe_host(env)}.\n")
    print("| model | case | s/batch | × plain | peak RSS | bytes per token of the design |")
    print("| --- | --- | ---: | ---: | ---: | --- |")
    for model in models:
        rows = results[model]
        plain = rows.get("plain")
        for case, r in rows.items():
            t = r["mean"] if case in TAPS else r["median"]
            ratio = f"{t / plain['median']:.2f}" if plain else ""
            print(f"| {MODELS[model]} | {LABELS[case]} | {t:.3f} | {ratio} | {r['peak_rss'] / 2**30:.2f} GiB | "
                  f"{design_bytes(r, rows, args.seq)} |")
    if args.rounds > 1:
        print("\nRound by round (s/batch): " + "; ".join(
            f"{MODELS[m]} {c} " + " / ".join(f"{t:.3f}" for t in ts) for (m, c), ts in all_rounds.items()))


if __name__ == "__main__":
    main()
