"""Out-of-core analysis benchmark: direct logit attribution and verify over a synthetic million-token store.

    python benchmarks/bench_analysis.py                      # 1,000,000 tokens, GPT-2-small shape, bfloat16
    python benchmarks/bench_analysis.py --tokens 50000 --dtype float32 --dir /tmp/b

What it does, in one run:

1. Makes a factored store with GPT-2-small dimensions (12 layers x 12 heads of 64, d_model 768,
   vocabulary 50,257). The first batch is a real capture of a randomly initialised GPT-2-small, which
   fixes the schema, the static weights and the attributes exactly as a capture writes them; the rest
   is appended through the store's own writer (chunks first, committed count last) with synthetic
   per-token data: z, embeddings and MLP outputs drawn at random (a pool of random rows, reordered
   and sign-flipped per batch), and resid_final set to the sum of the terms, so the store satisfies
   the invariant. A million bfloat16 tokens take ~32 GB on disk.
2. Measures the disk's sequential read bandwidth on the store's own files, cold (the files' pages are
   dropped from the page cache with posix_fadvise first), one reader and two.
3. In a fresh process each, cold again: ``st.analysis.direct_logit_attribution`` for every token
   (written to a Zarr store next to the input, so the result never has to fit in memory), then
   ``st.verify``. Each reports wall time, tokens/s, bytes read from the disk (/proc/self/io) and its
   peak resident memory (VmHWM), which must stay under 2 GiB.

The store and the result are deleted at the end unless --keep is given.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time

GIB = 1 << 30
LIMIT_BYTES = 2 * GIB


# -- the store -------------------------------------------------------------------------------------
def make_store(path: str, n_tokens: int, dtype: str, seq_len: int, batch: int, seed: int = 0) -> dict:
    import numpy as np
    import torch
    import zarr
    from transformers import GPT2Config, GPT2LMHeadModel

    import streamtap as st
    from streamtap.io.pipeline import to_numpy
    from streamtap.io.schema import IDENTITY, StoreSpec, VariableSpec
    from streamtap.io.writer import StoreWriter

    torch_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[dtype]
    cfg = GPT2Config(n_layer=12, n_head=12, n_embd=768, vocab_size=50257, n_positions=1024)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(cfg).to(torch_dtype).eval()
    started = time.perf_counter()
    first = torch.randint(0, cfg.vocab_size, (1, seq_len)).tolist()
    st.capture(model, first, path, batch_size=1, model_name="gpt2-small-shape (random)")
    del model
    ds = st.open(path)
    W_O = torch.from_numpy(np.asarray(ds["W_O"].values, np.float32)).reshape(-1, cfg.n_embd)
    bias = torch.from_numpy(np.asarray(ds["attn_bias"].values, np.float32)).sum(0)
    names = ("embed", "pos_embed", "z", "mlp_out", "resid_final")
    stored = dict(zarr.open_group(path, mode="r").attrs)
    # an append's spec: the variables the batches carry, and the identity the store was created with
    # (an append that does not match it is refused)
    spec = StoreSpec(variables={n: VariableSpec(tuple(ds[n].shape[1:]), dtype) for n in names}, static={}, attrs={},
                     with_text=False, identity={k: stored.get(k) for k in IDENTITY})
    writer = StoreWriter(path, append=True)
    writer.lock()
    writer.prepare(spec)
    g = torch.Generator().manual_seed(seed + 1)
    L, H, E, D = cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head, cfg.n_embd
    # a pool of random rows, drawn once; every batch takes them in a new random order with random
    # signs, so no two chunks hold the same data while the sum of the terms (linear in each row)
    # needs one matrix product for the whole run instead of one per batch
    pool = batch
    z_pool = torch.randn(pool, L, H, E, generator=g).to(torch_dtype)
    msg_pool = z_pool.float().reshape(pool, -1) @ W_O
    mlp_pool = (0.5 * torch.randn(pool, L, D, generator=g)).to(torch_dtype)
    mlp_sum = mlp_pool.float().sum(1)
    embed_pool = (0.1 * torch.randn(pool, D, generator=g)).to(torch_dtype)
    pos_table = (0.02 * torch.randn(seq_len, D, generator=g)).to(torch_dtype)
    done = seq_len
    seqs = batch // seq_len
    while done < n_tokens:
        n_seq = min(seqs, -(-(n_tokens - done) // seq_len))
        rows = n_seq * seq_len
        pz, pm, pe = (torch.randperm(pool, generator=g)[:rows] for _ in range(3))
        sz, sm, se = (torch.randint(0, 2, (rows,), generator=g) * 2 - 1 for _ in range(3))
        z = z_pool[pz] * sz.to(torch_dtype)[:, None, None, None]
        mlp = mlp_pool[pm] * sm.to(torch_dtype)[:, None, None]
        embed = embed_pool[pe] * se.to(torch_dtype)[:, None]
        pos = pos_table.repeat(n_seq, 1)
        resid = (se[:, None] * embed_pool[pe].float() + pos.float() + sz[:, None] * msg_pool[pz] + bias
                 + sm[:, None] * mlp_sum[pm])
        out = {"embed": embed, "pos_embed": pos, "z": z, "mlp_out": mlp, "resid_final": resid.to(torch_dtype)}
        batch_np = {n: to_numpy(t) for n, t in out.items()}
        batch_np["seq"] = np.repeat(np.arange(writer.sequences, writer.sequences + n_seq), seq_len).astype("int64")
        batch_np["pos"] = np.tile(np.arange(seq_len, dtype="int32"), n_seq)
        batch_np["token_id"] = torch.randint(0, cfg.vocab_size, (rows,), generator=g).numpy().astype("int64")
        writer.write(batch_np, n_seq)
        done += rows
        print(f"\r  store: {done:,} / {n_tokens:,} tokens", end="", file=sys.stderr, flush=True)
    writer.close()
    writer.unlock()
    print(file=sys.stderr)
    return {"tokens": int(writer.tokens), "seconds": time.perf_counter() - started}


# -- page cache and disk -----------------------------------------------------------------------------
def files_under(path: str) -> list[str]:
    return sorted(os.path.join(r, n) for r, _, ns in os.walk(path) for n in ns)


def drop_cache(path: str) -> None:
    """Evict the files' pages from the page cache, so the next read comes from the disk."""
    for f in files_under(path):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fdatasync(fd) if os.access(f, os.W_OK) else None
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_bandwidth(path: str, budget: int, threads: int) -> dict:
    """Sequential read of the store's chunk files (largest arrays first), cold, up to ``budget`` bytes."""
    files = [f for f in files_under(os.path.join(path, "z")) if os.path.getsize(f) > 0]
    chosen, total = [], 0
    for f in files:
        if total >= budget:
            break
        chosen.append(f)
        total += os.path.getsize(f)
    drop_cache(path)
    parts = [chosen[i::threads] for i in range(threads)]
    done = [0] * threads

    def reader(i):
        buf = bytearray(16 << 20)
        for f in parts[i]:
            with open(f, "rb", buffering=0) as fh:
                while True:
                    n = fh.readinto(buf)
                    if not n:
                        break
                    done[i] += n

    start = time.perf_counter()
    ts = [threading.Thread(target=reader, args=(i,)) for i in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    seconds = time.perf_counter() - start
    return {"bytes": sum(done), "seconds": seconds, "bytes_per_s": sum(done) / seconds, "threads": threads}


# -- one analysis in a fresh process ------------------------------------------------------------------
CHILD = r"""
import json, os, sys, time
import numpy as np
import streamtap as st

def io_read():
    with open("/proc/self/io") as f:
        return dict(l.split(": ") for l in f.read().splitlines()).get("read_bytes", "0")

job, path, out, chunk, target = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
before = int(io_read())
start = time.perf_counter()
ds = st.open(path, chunks={"token": chunk})
result = {"tokens": ds.sizes["token"]}
if job == "dla":
    dla = st.analysis.direct_logit_attribution(ds, target)
    dla.to_dataset().to_zarr(out, mode="w", consolidated=False)
    check = ds.isel(token=slice(0, 2048))
    import xarray as xr
    back = xr.open_zarr(out, consolidated=False)["logit_contribution"].isel(token=slice(0, 2048)).sum("component").values
    # the model's logit, from resid_final through the final norm and W_U, for the first chunk
    resid = np.asarray(check["resid_final"].values, np.float64)
    g = np.asarray(ds["final_norm_weight"].values, np.float64)
    b = np.asarray(ds["final_norm_bias"].values, np.float64) if "final_norm_bias" in ds else 0.0
    c = resid - resid.mean(-1, keepdims=True)
    normed = c / np.sqrt((c ** 2).mean(-1, keepdims=True) + ds.attrs["final_norm_eps"]) * g + b
    logit = normed @ np.asarray(ds["W_U"].isel(vocab=target).values, np.float64)
    result["components"] = int(dla.sizes["component"])
    result["max_abs_diff_vs_logit_first_chunk"] = float(np.abs(back - logit).max())
    result["max_abs_logit_first_chunk"] = float(np.abs(logit).max())
else:
    err = st.verify(ds)
    result["max_rel_error"] = err.attrs["max_rel_error"]
    result["tolerance"] = err.attrs["tolerance"]
result["seconds"] = time.perf_counter() - start
result["read_bytes"] = int(io_read()) - before
# VmHWM, not getrusage: ru_maxrss carries the forking parent's peak across exec
with open("/proc/self/status") as f:
    result["peak_rss"] = int([l for l in f if l.startswith("VmHWM:")][0].split()[1]) * 1024
print("RESULT " + json.dumps(result))
"""


def run_child(job: str, path: str, out: str, chunk: int, target: int) -> dict:
    drop_cache(path)
    load = os.getloadavg()[0]
    proc = subprocess.run([sys.executable, "-c", CHILD, job, path, out, str(chunk), str(target)],
                          capture_output=True, text=True)
    if proc.returncode:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"{job} failed (exit {proc.returncode})")
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1]
    # the 1-minute load average before and after: other work on the machine shows up here
    return {**json.loads(line[len("RESULT "):]), "load": (load, os.getloadavg()[0])}


def store_bytes(path: str, names=("embed", "pos_embed", "z", "mlp_out", "resid_final")) -> int:
    return sum(os.path.getsize(f) for n in names for f in files_under(os.path.join(path, n)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=1_000_000)
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    ap.add_argument("--chunk", type=int, default=2048, help="tokens per dask block")
    ap.add_argument("--dir", default=None, help="where the store goes (default: a temporary directory)")
    ap.add_argument("--keep", action="store_true", help="keep the store and the result")
    ap.add_argument("--target", type=int, default=6342, help="vocabulary id to attribute")
    ap.add_argument("--bandwidth-bytes", type=int, default=4 * GIB, help="bytes read to measure the disk")
    args = ap.parse_args(argv)

    root = args.dir or tempfile.mkdtemp(prefix="streamtap-bench-")
    os.makedirs(root, exist_ok=True)
    path, out = os.path.join(root, "synthetic.zarr"), os.path.join(root, "dla.zarr")
    try:
        import psutil
        import torch

        print(f"machine: {platform.machine()}, {os.cpu_count()} cores, "
              f"{psutil.virtual_memory().total / GIB:.0f} GiB memory, torch {torch.__version__} "
              f"({torch.get_num_threads()} threads), python {platform.python_version()}")
        made = make_store(path, args.tokens, args.dtype, seq_len=1024, batch=8192)
        on_disk = store_bytes(path)
        print(f"store: {made['tokens']:,} tokens, GPT-2-small shape, {args.dtype}, factored; "
              f"{on_disk / GIB:.2f} GiB of per-token arrays on disk ({on_disk / made['tokens']:,.0f} B/token); "
              f"made in {made['seconds']:.0f} s")
        bw = [read_bandwidth(path, args.bandwidth_bytes, t) for t in (1, 2)]
        best = max(b["bytes_per_s"] for b in bw)
        for b in bw:
            print(f"disk read (cold, {b['threads']} reader{'s' if b['threads'] > 1 else ''}): "
                  f"{b['bytes_per_s'] / 2**20:,.0f} MiB/s over {b['bytes'] / GIB:.2f} GiB")
        rows = []
        for job in ("dla", "verify"):
            r = run_child(job, path, out, args.chunk, args.target)
            rate = on_disk / r["seconds"]
            rows.append((job, r, rate))
            extra = (f"{r['components']} components; sum vs logit (first chunk) max |diff| "
                     f"{r['max_abs_diff_vs_logit_first_chunk']:.2g} of max |logit| {r['max_abs_logit_first_chunk']:.2g}"
                     if job == "dla" else f"max rel error {r['max_rel_error']:.2g} (tolerance {r['tolerance']:.2g})")
            ok = "ok" if r["peak_rss"] < LIMIT_BYTES else "OVER 2 GiB"
            print(f"{job:>6}: {r['seconds']:7.1f} s  {r['tokens'] / r['seconds']:>10,.0f} tokens/s  "
                  f"{rate / 2**20:7,.0f} MiB/s of store ({rate / best:.0%} of disk read)  "
                  f"read from disk {r['read_bytes'] / GIB:.1f} GiB  peak RSS {r['peak_rss'] / GIB:.2f} GiB ({ok}); {extra}; "
                  f"load average {r['load'][0]:.1f} before, {r['load'][1]:.1f} after")
        return 0 if all(r["peak_rss"] < LIMIT_BYTES for _, r, _ in rows) else 1
    finally:
        if not args.keep:
            shutil.rmtree(root if args.dir is None else path, ignore_errors=True)
            if args.dir is not None:
                shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
