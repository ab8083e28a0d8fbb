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

import json
import os
import shutil
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench_capture import (  # noqa: E402
    MODELS, _host_seen, _layer_paths, _load, _peak, describe_host, forward_step, host_environment, machine_line,
    median_run, parse_run_arguments, random_batch, run_arguments, run_rounds, seconds_per_batch, store_bytes,
    tap_steps, time_steps)

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
    ids, mask, sync = random_batch(model, args)
    out: dict = {"case": args.case, "model": args.model, "host": _host_seen(), "shape": shape(model)}
    close = lambda: None  # noqa: E731
    path = os.path.join(args.dir, f"{args.model}-{args.case}.zarr")

    if args.case == "plain":
        step = forward_step(model, ids, mask)
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
        _, step, close = tap_steps(model, path, ids, mask, patterns=args.case == "streamtap-patterns")

    out.update(time_steps(step, close, sync, args.batches), peak_rss=_peak(), tokens=int(mask.sum()))
    if args.case in TAPS:
        out.update(store_bytes(path))
        shutil.rmtree(path, ignore_errors=True)
    print(json.dumps(out))
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
    args = parse_run_arguments(run_arguments(__doc__, CASES), CASES)
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
    try:
        by_model = run_rounds(__file__, models, args.cases.split(","), args.rounds, common, env)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    load_end = os.getloadavg()[0]
    results = {model: {case: median_run(runs, TAPS) for case, runs in cases.items()} for model, cases in by_model.items()}

    print(machine_line(args, torch, load_start, load_end))
    print(f"Host settings, the same for every case: {describe_host(env)}.\n")
    print("| model | case | s/batch | × plain | peak RSS | bytes per token of the design |")
    print("| --- | --- | ---: | ---: | ---: | --- |")
    for model in models:
        rows = results[model]
        plain = rows.get("plain")
        for case, r in rows.items():
            t = seconds_per_batch(r, TAPS)
            ratio = f"{t / plain['median']:.2f}" if plain else ""
            print(f"| {MODELS[model]} | {LABELS[case]} | {t:.3f} | {ratio} | {r['peak_rss'] / 2**30:.2f} GiB | "
                  f"{design_bytes(r, rows, args.seq)} |")
    if args.rounds > 1:
        print("\nRound by round (s/batch): " + "; ".join(
            f"{MODELS[m]} {c} " + " / ".join(f"{seconds_per_batch(r, TAPS):.3f}" for r in runs)
            for m, cases in by_model.items() for c, runs in cases.items()))


if __name__ == "__main__":
    main()
