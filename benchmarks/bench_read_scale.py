"""Read at scale: offline DLA, per-component statistics and top-k tokens, residual-stream decomposition
and verify over a 10^6-token full store and a 10^7-token projected one, in-process and on a two-worker
dask.distributed LocalCluster, with peak memory, tokens/s and the disk's read bandwidth.

    python benchmarks/bench_read_scale.py --dir /tmp/scale --tokens 1000000
    python benchmarks/bench_read_scale.py --dir /tmp/scale --tokens 10000000 --projected
    python benchmarks/bench_read_scale.py --store existing.zarr          # any store

The store is built by capturing 64 x 64 tokens of a tiny Llama for real (``--projected``: with
``project=`` onto two logit directions, so it keeps scalars per component instead of d_model terms), then tiling those tokens with
zarr directly into the store's own arrays (sequence numbers continued, the commit attributes set), so
every token is a real capture's and the invariant holds on all of them. Each case runs in a fresh
process (its peak RSS is its own; the cluster's workers report theirs) after the store's files are
dropped from the page cache (posix_fadvise DONTNEED), so each reads from the disk.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

CASES = ("dla", "stats", "topk", "decompose", "verify")
PROJECTED_CASES = ("dla", "stats", "topk", "verify")
PROJECT = {"logit5": 5, "logit2": 2}   # two token directions of the tiny model's vocabulary
TOP_K = 16
BASE_SEQS, SEQ_LEN = 64, 64    # the tiny model takes 64 positions


def build(path: str, tokens: int, projected: bool = False) -> None:
    import torch
    import zarr

    import streamtap as st
    from streamtap.io.schema import COMMITTED_SEQUENCES, COMMITTED_TOKENS
    from streamtap.models import tiny_model

    model = tiny_model("llama")
    ids = torch.randint(0, model.config.vocab_size, (BASE_SEQS, SEQ_LEN), generator=torch.Generator().manual_seed(0))
    options = {"project": PROJECT} if projected else {}
    st.capture(model, ids.tolist(), path, batch_size=8, overwrite=True, **options)
    group = zarr.open_group(path, mode="r+")
    base = BASE_SEQS * SEQ_LEN
    for name, array in group.arrays():
        dims = array.metadata.dimension_names or ()
        if not dims or dims[0] != "token":
            continue
        first = array[:base]
        block = array.chunks[0]
        array.resize((tokens, *array.shape[1:]))
        for start in range(0, tokens, block):           # one chunk in memory at a time
            stop = min(start + block, tokens)
            rows = np.arange(start, stop)
            data = first[rows % base]
            if name == "seq":
                data = data + (rows // base) * BASE_SEQS
            array[start:stop] = data
    group.attrs.update({COMMITTED_TOKENS: tokens, COMMITTED_SEQUENCES: tokens // SEQ_LEN})


def store_files(path: str) -> list[str]:
    return [os.path.join(d, f) for d, _, files in os.walk(path) for f in files]


def drop_cache(path: str) -> None:
    """Evict the store's pages so the next read comes from the disk (clean pages; no root needed)."""
    for name in store_files(path):
        fd = os.open(name, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


def read_bandwidth(path: str) -> tuple[float, int]:
    drop_cache(path)
    total, start = 0, time.perf_counter()
    for name in store_files(path):
        with open(name, "rb") as f:
            while chunk := f.read(16 << 20):
                total += len(chunk)
    return total / (time.perf_counter() - start), total


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _contributions(ds):
    """Each component's contribution to one logit direction per token, lazily: stored (a projected store)
    or computed from the terms (direct logit attribution of a full store)."""
    import streamtap as st

    if "projection" in ds:
        return ds.projection.isel(direction=0)
    return st.analysis.direct_logit_attribution(ds, 5, foil=2)


def _work(ds, case: str):
    """A reduction over every token, as a corpus study ends: its memory is the analysis's own."""
    import dask.array as da
    import streamtap as st

    if case == "dla":
        return _contributions(ds).mean("token")
    if case == "stats":         # per component: mean, standard deviation, min and max over the corpus
        c = _contributions(ds)
        return [c.mean("token"), c.std("token"), c.min("token"), c.max("token")]
    if case == "topk":          # per component: the TOP_K tokens it contributes most to
        c = _contributions(ds).transpose("token", ...)
        return da.topk(c.data, TOP_K, axis=0)
    if case == "decompose":
        return (st.decompose(ds) ** 2).sum("d_model").mean("token")
    if "projection" in ds:      # projections only: they must sum to their totals (st.verify computes it)
        return st.verify(ds, raise_on_error=False).attrs["max_rel_error"]
    return st.invariant.errors(ds).max()


def run_case(path: str, case: str, cluster: bool) -> dict:
    import dask

    import streamtap as st

    drop_cache(path)
    ds = st.open(path)
    read = sum(ds[n].nbytes for n in ds.data_vars if ds[n].dims[:1] == ("token",) and n not in ("head_output",))
    start = time.perf_counter()
    if cluster:
        import distributed

        with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                      silence_logs=50) as lc, distributed.Client(lc) as client:
            start = time.perf_counter()
            value = dask.compute(_work(ds, case))[0]
            seconds = time.perf_counter() - start
            workers = client.run(lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        peak = max(workers.values())
    else:
        value = dask.compute(_work(ds, case), scheduler="threads")[0]
        seconds, peak = time.perf_counter() - start, 0.0
    value = np.max([np.max(np.asarray(v)) for v in (value if isinstance(value, list) else [value])])
    tokens = ds.sizes["token"]
    return {"case": case, "where": "LocalCluster (2 workers)" if cluster else "in-process (threads)",
            "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds, "client_mib": _rss_mib(),
            "worker_mib": peak, "store_gb_s": read / seconds / 1e9, "value": float(value)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default="/tmp/streamtap-read-scale")
    parser.add_argument("--tokens", type=int, default=1_000_000)
    parser.add_argument("--store", default=None, help="Read this store instead of building one.")
    parser.add_argument("--cases", default=None, help=f"default: {','.join(CASES)} ({','.join(PROJECTED_CASES)} "
                        "for a projected store)")
    parser.add_argument("--projected", action="store_true", help="Build a store of projections only (project=).")
    parser.add_argument("--skip-cluster", action="store_true")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--cluster", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    path = args.store or os.path.join(args.dir, f"{'projected' if args.projected else 'full'}-{args.tokens}.zarr")
    if args.case:   # a child: one case, one JSON line
        print(json.dumps(run_case(path, args.case, args.cluster)))
        return
    if args.store is None and not os.path.exists(path):
        start = time.perf_counter()
        build(path, args.tokens, args.projected)
        print(f"built {path}: {args.tokens:,} tokens in {time.perf_counter() - start:.0f} s")
    bandwidth, size = read_bandwidth(path)
    print(f"store {path}: {size / 2**30:.2f} GiB on disk; sequential read {bandwidth / 1e9:.2f} GB/s "
          "(page cache dropped)")
    print("| analysis | where | tokens | s | tokens/s | store GB/s | peak RSS client / worker (MiB) |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    import zarr

    projected = "projection" in zarr.open_group(path, mode="r")
    for case in (args.cases or ",".join(PROJECTED_CASES if projected else CASES)).split(","):
        for cluster in (False,) if args.skip_cluster else (False, True):
            argv = [sys.executable, __file__, "--case", case, "--store", path] + (["--cluster"] if cluster else [])
            out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            r = json.loads(out)
            worker = f"{r['worker_mib']:.0f}" if cluster else "-"
            print(f"| {r['case']} | {r['where']} | {r['tokens']:,} | {r['seconds']:.1f} | {r['tokens_per_s']:,.0f} | "
                  f"{r['store_gb_s']:.2f} | {r['client_mib']:.0f} / {worker} |", flush=True)


if __name__ == "__main__":
    main()
