"""Capture throughput, side by side in one run: plain forward vs streamtap into memory and into Zarr.

    python benchmarks/bench_capture.py [--batches 5] [--skip-smollm2]

Reports tokens/s, the ratio to the plain forward (lower is better; the target is <= 1.5x into
Zarr), and bytes per token on disk. Timings are medians over ``--batches`` batches after a warm-up.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import tempfile
import time

import torch
import zarr

import streamtap as st


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def _median_seconds(fn, batches: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(batches):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench(name: str, model, ids: torch.Tensor, mask: torch.Tensor, batches: int) -> list[dict]:
    tokens = int(mask.sum())

    def plain():
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)

    rows = [{"case": "plain forward", "s": _median_seconds(plain, batches)}]

    memory = zarr.storage.MemoryStore()
    with st.tap(model, memory):
        rows.append({"case": "streamtap -> memory (zarr MemoryStore)", "s": _median_seconds(plain, batches)})

    tmp = tempfile.mkdtemp(prefix="streamtap-bench-")
    path = os.path.join(tmp, "run.zarr")
    with st.tap(model, path) as tap:
        rows.append({"case": "streamtap -> Zarr on disk (factored)", "s": _median_seconds(plain, batches)})
    group = zarr.open_group(path, mode="r")
    per_token = [name for name, arr in group.arrays() if arr.metadata.dimension_names[0] == "token"]
    rows[-1]["bytes_per_token"] = sum(_dir_bytes(os.path.join(path, n)) for n in per_token) / tap.tokens
    rows[-1]["raw_bytes_per_token"] = sum(group[n].nbytes for n in per_token) / tap.tokens
    shutil.rmtree(tmp)

    base = rows[0]["s"]
    for row in rows:
        row.update(model=name, tokens_per_s=tokens / row["s"], ratio=row["s"] / base)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=5)
    parser.add_argument("--skip-smollm2", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)

    from transformers import GPT2Config, GPT2LMHeadModel

    results = []
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=12, n_head=12, n_embd=768)).eval()
    ids = torch.randint(0, gpt2.config.vocab_size, (8, 128))
    results += bench("GPT-2-small shape (random), 8x128", gpt2, ids, torch.ones_like(ids), args.batches)
    del gpt2
    if not args.skip_smollm2:
        from streamtap.models import load_model

        model, tok = load_model("smollm2")
        ids = torch.randint(0, model.config.vocab_size, (8, 128))
        results += bench("SmolLM2-135M, 8x128", model, ids, torch.ones_like(ids), args.batches)

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, device cpu")
    print(f"| model | case | median s/batch | tokens/s | x plain | bytes/token on disk |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for r in results:
        disk = f"{r['bytes_per_token']:,.0f} (raw {r['raw_bytes_per_token']:,.0f})" if "bytes_per_token" in r else ""
        print(f"| {r['model']} | {r['case']} | {r['s']:.3f} | {r['tokens_per_s']:,.0f} | {r['ratio']:.2f} | {disk} |")


if __name__ == "__main__":
    main()
