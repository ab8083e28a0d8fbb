"""Capture cost side by side, one command, one run: plain forward, nnsight, TransformerLens, streamtap.

    python benchmarks/bench_capture.py [--batch 8] [--seq 256] [--batches 5] [--rounds 1] [--skip-smollm2]
                                       [--skip-memory] [--device cpu|cuda] [--dir DIR]
                                       [--malloc-mmap-threshold BYTES] [--torch-huge-pages]

For a GPT-2-small-shaped random model (12 layers, 12 heads, d_model 768) and for SmolLM2-135M, each
case runs in a fresh process (so that its peak RSS is its own) on the same random batch:

- the plain HF forward;
- nnsight 0.8 saving every layer's z (the output projection's input) and MLP output;
- TransformerLens 4.x ``TransformerBridge.run_with_cache`` filtered to ``hook_z`` and
  ``hook_mlp_out``, and with per-head results on (``hook_result`` and ``hook_mlp_out``);
- streamtap into Zarr (the default store), and with ``patterns=True`` (``streamtap-patterns``: the
  positional tables a pattern is recomputed from are stored too).

Every case runs under the same host settings: glibc's allocator and torch as they come, unless
``--malloc-mmap-threshold`` (``MALLOC_MMAP_THRESHOLD_``) or ``--torch-huge-pages``
(``THP_MEM_ALLOC_ENABLE=1``) set them in the environment of every child process, the plain forward's
included, so that a ratio to the plain forward measures the capture and not the allocator. streamtap
itself never changes either; they are host advice (docs/benchmarks.md, "Tuning the host").

Reported: median seconds per batch, the mean including the writer's drain at the end (what the
ratio to the plain forward uses for streamtap), peak RSS, bytes per token on disk and the compression
ratio of the per-token arrays, the time the model's thread spends on each batch's write, the
throughput of the background disk writes while they run, and the disk's write bandwidth measured in
the same run. The memory probe (``--skip-memory`` leaves it out) runs a 100k-token capture in one
process under the same settings and reads its peak RSS after a tenth of the tokens and at the end,
against the plain forward's settled peak in the same process: whether a long capture's memory stays
flat.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
CASES = ("plain", "nnsight", "tl", "tl-result", "streamtap", "streamtap-patterns", "streamtap-last", "streamtap-project",
         "streamtap-summarise", "streamtap-last-summarise", "streamtap-last-neurons", "streamtap-last-neurons-summarise",
         "streamtap-last-neurons-summarise-noq")
TAPS = tuple(c for c in CASES if c.startswith("streamtap"))  # write a store
# the selective cases (issue 24): only each sequence's last token; every component projected onto one
# logit direction (token id 1: the cost does not depend on which) and no d_model term
TAP_OPTIONS = {"streamtap-patterns": {"patterns": True}, "streamtap-last": {"positions": "last"},
               "streamtap-project": {"project": {"logit_1": 1}},
               # summaries (issue 24 item 3) of every head and MLP over every token, with and without the terms
               "streamtap-summarise": {"summarise": True},
               "streamtap-last-summarise": {"positions": "last", "summarise": True},
               # the neurons' own summaries: the same capture with and without them
               "streamtap-last-neurons": {"positions": "last", "neurons": True},
               "streamtap-last-neurons-summarise": {"positions": "last", "neurons": True, "summarise": True},
               # ... without the neurons' quantile sketch (the costly part)
               "streamtap-last-neurons-summarise-noq": {"positions": "last", "neurons": True,
                                                         "summarise": {"neuron_quantiles": False}}}
LABELS = {
    "plain": "plain HF forward",
    "nnsight": "nnsight: save z + MLP out (memory)",
    "tl": "TransformerLens run_with_cache: z + MLP out",
    "tl-result": "TransformerLens run_with_cache: per-head results + MLP out",
    "streamtap": "streamtap → Zarr",
    "streamtap-patterns": "streamtap → Zarr, patterns=True",
    "streamtap-last": "streamtap → Zarr, positions=\"last\"",
    "streamtap-project": "streamtap → Zarr, projections only (one logit direction)",
    "streamtap-summarise": "streamtap → Zarr, summarise=True",
    "streamtap-last-summarise": "streamtap → Zarr, positions=\"last\", summarise=True",
    "streamtap-last-neurons": "streamtap → Zarr, positions=\"last\", neurons=True",
    "streamtap-last-neurons-summarise": "streamtap → Zarr, positions=\"last\", neurons=True, summarise=True",
    "streamtap-last-neurons-summarise-noq": "streamtap → Zarr, positions=\"last\", neurons=True, "
                                            "summarise neuron_quantiles=off",
}
PLAIN_FORWARDS = 5  # before the memory probe's capture
# the host settings the flags control; unless a flag sets one, it is removed from the children's
# environment, so that "unset" means glibc's and torch's defaults whatever the calling shell exported
HOST_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "THP_MEM_ALLOC_ENABLE")
MMAP_THRESHOLD_MAX = 32 << 20  # glibc (64-bit) ignores a larger MALLOC_MMAP_THRESHOLD_
MODELS = {"gpt2": "GPT-2-small shape (random)", "smollm2": "SmolLM2-135M"}


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _load(name: str, device: str):
    import torch

    torch.manual_seed(0)
    if name == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        model = GPT2LMHeadModel(GPT2Config(n_layer=12, n_head=12, n_embd=768)).eval()
    else:
        from streamtap.models import load_model

        model, _ = load_model("smollm2")
    return model.to(device)


def _layer_paths(model) -> list[tuple[str, str]]:
    n = model.config.num_hidden_layers
    if model.config.model_type == "gpt2":
        return [(f"transformer.h.{l}.attn.c_proj", f"transformer.h.{l}.mlp") for l in range(n)]
    return [(f"model.layers.{l}.self_attn.o_proj", f"model.layers.{l}.mlp") for l in range(n)]


def _host_seen() -> dict[str, str | None]:
    """The host settings as this process got them (the parent checks every case got the same)."""
    return {k: os.environ.get(k) for k in HOST_VARIABLES}


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def random_batch(model, args):
    """(input ids, attention mask, device sync): the same random batch in every case and process."""
    import torch

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=g).to(args.device)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    return ids, torch.ones_like(ids), sync


def forward_step(model, ids, mask):
    """The plain forward of the batch, without gradients: what every case's ratio is taken to."""
    import torch

    def step():
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
    return step


def tap_steps(model, path: str, ids, mask, **options):
    """(tap, step, close): the plain forward under an open ``st.tap`` into ``path``; ``close`` drains its writer."""
    import streamtap as st

    the_tap = st.tap(model, path, check=False, **options)
    the_tap.__enter__()
    return the_tap, forward_step(model, ids, mask), lambda: the_tap.__exit__(None, None, None)


def time_steps(step, close, sync, batches: int) -> dict:
    """A warm-up step (for a tap, creating the store), then ``batches`` timed steps, then ``close``: the median
    step, the mean including ``close`` (a tap's final drain), every step's time, and the whole wall time."""
    first = time.perf_counter()
    step()
    sync()
    times = []
    start = time.perf_counter()
    for _ in range(batches):
        t = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t)
    close()
    end = time.perf_counter()
    return {"median": statistics.median(times), "mean": (end - start) / batches, "times": times,
            "wall_all": end - first}  # every batch, warm-up and final drain included


def _time_summaries(the_tap) -> dict | None:
    """Wrap a summarising tap's summary step and summary writes with timers (None: it keeps none)."""
    recorder = the_tap.recorder
    summariser = recorder.summariser
    if summariser is None:
        return None
    times = {"update": [], "write": []}

    def timed(fn, key):
        def run(*a, **k):
            start = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                times[key].append(time.perf_counter() - start)
        return run

    summariser.update = timed(summariser.update, "update")
    recorder.write_summaries = timed(recorder.write_summaries, "write")
    return times


def store_bytes(path: str) -> dict:
    """A store's per-token arrays, per committed token: on disk, raw, and raw by array."""
    import zarr

    group = zarr.open_group(path, mode="r")
    per_token = {n: a for n, a in group.arrays() if a.metadata.dimension_names[0] == "token"}
    tokens = int(group.attrs["committed_tokens"])
    return {"stored_tokens": tokens,
            "disk_per_token": sum(_dir_bytes(os.path.join(path, n)) for n in per_token) / tokens,
            "raw_per_token": sum(a.nbytes for a in per_token.values()) / tokens,
            "arrays": {n: a.nbytes / tokens for n, a in per_token.items()}}


def run_case(args) -> dict:
    """One case in this process (the host settings came in its environment); prints a JSON line."""
    import torch

    base_rss = _rss()
    model = _load(args.model, args.device)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    ids, mask, sync = random_batch(model, args)
    out: dict = {"case": args.case, "model": args.model, "model_bytes": model_bytes, "host": _host_seen()}
    close = lambda: None  # noqa: E731
    summary_times = None
    path = os.path.join(args.dir, f"{args.model}-{args.case}.zarr")

    if args.case == "plain":
        step = forward_step(model, ids, mask)
    elif args.case == "nnsight":
        import nnsight

        envoy = nnsight.NNsight(model)
        paths = _layer_paths(model)

        def step():
            with torch.no_grad():
                with envoy.trace(input_ids=ids, attention_mask=mask):
                    saved = nnsight.save([(envoy.get(o).input, envoy.get(m).output) for o, m in paths])
            assert len(saved) == len(paths) and saved[-1][1].shape[:2] == ids.shape
            return saved
    elif args.case in ("tl", "tl-result"):
        sys.path.insert(0, os.path.join(HERE, "..", "tests"))
        from _peers import tl_bridge

        result = args.case == "tl-result"
        bridge = tl_bridge(model, attn_result=result)
        del model
        import gc

        gc.collect()
        wanted = ("attn.hook_result" if result else "attn.hook_z", "hook_mlp_out")

        def keep(name: str) -> bool:
            return name.endswith(wanted)

        def step():
            with torch.no_grad():
                _, cache = bridge.run_with_cache(ids, attention_mask=mask, names_filter=keep, return_type=None)
            return cache
    else:
        the_tap, step, close = tap_steps(model, path, ids, mask, **TAP_OPTIONS.get(args.case, {}))
        summary_times = _time_summaries(the_tap)

    out.update(time_steps(step, close, sync, args.batches), peak_rss=_peak(), base_rss=base_rss,
               tokens=int(mask.sum()))
    if args.case in TAPS and summary_times is not None:
        # on the model's thread, per timed batch (the warm-up's first fold makes the state); the writes
        # of the summaries into the store (at close here; every summarise_every seconds in a long capture)
        out["summary_step"] = summary_times["update"][1:]
        out["summary_write"] = summary_times["write"]
    if args.case in TAPS:
        out.update(store_bytes(path))
        # per token the model read (a positions= capture stores fewer than it reads)
        out["disk_per_input_token"] = out["disk_per_token"] * out["stored_tokens"] / (int(mask.sum()) * (args.batches + 1))
        p = the_tap.pipeline
        out["writer"] = p.mode
        out["write_seconds"] = p.write_seconds  # the writer's side of the queue: encoding, handing to the disk
        out["written_bytes"] = p.written_bytes
        # the disk side (a DirectLocalStore): bytes written, and wall time with at least one write in flight
        stats = getattr(the_tap.writer.store, "stats", None)
        out["io_bytes"] = stats.bytes if stats is not None else 0
        out["io_seconds"] = stats.seconds if stats is not None else 0.0
        out["batch_terms_bytes"] = out["raw_per_token"] * int(mask.sum())
        shutil.rmtree(path, ignore_errors=True)
    print(json.dumps(out))
    return out


def run_memory(args) -> dict:
    """Peak RSS of a streamtap capture of ``args.tokens`` tokens into Zarr, read after every batch,
    against the plain forward's settled peak in the same process (same host settings: this process's
    environment)."""
    # every module the capture uses is imported before the baseline: their code is not captured data
    import nnsight  # noqa: F401
    import torch
    import zarr

    import streamtap as st
    import streamtap.tapping  # noqa: F401

    base_rss = _rss()
    model = _load(args.model, args.device)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=g).to(args.device)
    plain_peaks = []
    for _ in range(PLAIN_FORWARDS):  # glibc's heap grows over the first forwards: the settled peak is the baseline
        with torch.no_grad():
            model(input_ids=ids)
        plain_peaks.append(_peak())
    path = os.path.join(args.dir, f"mem-{args.tokens}.zarr")
    batches = -(-args.tokens // ids.numel())
    tenth = -(-batches // 10)  # a tenth of the tokens: 10x more must not raise the peak
    peaks = []
    with torch.no_grad(), st.tap(model, path, check=False) as the_tap:
        for _ in range(batches):
            model(input_ids=ids)
            peaks.append(_peak())
    group = zarr.open_group(path, mode="r")
    per_token = [n for n, a in group.arrays() if a.metadata.dimension_names[0] == "token"]
    raw = sum(group[n].nbytes for n in per_token) / int(group.attrs["committed_tokens"])
    out = {"tokens": the_tap.tokens, "tenth_tokens": tenth * ids.numel(), "peak_tenth": peaks[tenth - 1],
           "peak_rss": _peak(), "plain_peak": plain_peaks[-1], "plain_first_peak": plain_peaks[0],
           "base_rss": base_rss, "model_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
           "batch_terms_bytes": raw * ids.numel(), "writer": the_tap.pipeline.mode, "host": _host_seen()}
    shutil.rmtree(path, ignore_errors=True)
    print(json.dumps(out))
    return out


def host_environment(args) -> dict[str, str]:
    """The environment every case's process gets: this one's, with the host settings of the flags."""
    env = {k: v for k, v in os.environ.items() if k not in HOST_VARIABLES}
    if args.malloc_mmap_threshold is not None:
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
    if args.torch_huge_pages:
        env["THP_MEM_ALLOC_ENABLE"] = "1"
    return env


def describe_host(env: dict[str, str]) -> str:
    """The host settings of a run, as the table's header states them."""
    threshold = env.get("MALLOC_MMAP_THRESHOLD_")
    parts = [f"MALLOC_MMAP_THRESHOLD_={threshold}" if threshold is not None
             else "MALLOC_MMAP_THRESHOLD_ unset (glibc's dynamic mmap threshold)"]
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            thp = f.read().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        thp = "unknown"
    parts.append(("THP_MEM_ALLOC_ENABLE=1" if env.get("THP_MEM_ALLOC_ENABLE") else "THP_MEM_ALLOC_ENABLE unset")
                 + f" (kernel THP mode {thp})")
    if env.get("GLIBC_TUNABLES"):
        parts.append(f"GLIBC_TUNABLES={env['GLIBC_TUNABLES']} (inherited)")
    return ", ".join(parts)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def _child(argv: list[str], env: dict[str, str], script: str = __file__) -> dict:
    """One case in a fresh process of ``script`` (so that its peak RSS is its own): its JSON result line."""
    result = subprocess.run([sys.executable, os.path.abspath(script), *argv], capture_output=True, text=True,
                            env=env)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{result.stderr[-4000:]}")
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["host"] == {k: env.get(k) for k in HOST_VARIABLES}, (argv, out["host"])
    return out


def seconds_per_batch(r: dict, taps=TAPS) -> float:
    """A case's time per batch: for a tap the mean, which includes draining the writer at the end; else the median."""
    return r["mean"] if r["case"] in taps else r["median"]


def run_rounds(script: str, models: list[str], cases: list[str], rounds: int, common: list[str],
               env: dict[str, str]) -> dict[str, dict[str, list[dict]]]:
    """Every case of every model, each run in a fresh process of ``script``, ``rounds`` times with the cases
    taking turns, so that a drift of the machine's speed hits them alike: {model: {case: runs in order}}."""
    results: dict[str, dict[str, list[dict]]] = {}
    for model in models:
        runs = results.setdefault(model, {})
        for i in range(rounds):
            for case in cases:
                r = _child(["--case", case, "--model", model, *common], env, script)
                runs.setdefault(case, []).append(r)
                print(f"  {model:8s} {case:24s} round {i + 1}: median {r['median']:.3f} s  mean {r['mean']:.3f} s  "
                      f"peak RSS {r['peak_rss'] / 2**30:.2f} GiB", file=sys.stderr, flush=True)
    return results


def median_run(runs: list[dict], taps=TAPS) -> dict:
    """The round with the median time, which stands for the case."""
    return sorted(runs, key=lambda r: seconds_per_batch(r, taps))[(len(runs) - 1) // 2]


def machine_line(args, torch, load_start: float, load_end: float) -> str:
    """The machine, library versions, batch shape and load averages a table was measured under."""
    import nnsight
    import transformers
    import zarr

    dev = torch.cuda.get_device_name() if args.device == "cuda" else "no GPU, CPU only"
    return (f"Machine: {_cpu_model()}, {platform.machine()}, {os.cpu_count()} cores, "
            f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), transformers {transformers.__version__}, nnsight "
            f"{getattr(nnsight, '__version__', '?')}, zarr {zarr.__version__}, {dev}; batch {args.batch} x {args.seq} "
            f"tokens, median of {args.batches} batches after a warm-up; each case the median of {args.rounds} "
            f"round(s), the cases taking turns; load average {load_start:.2f} at start, {load_end:.2f} at end.")


def run_arguments(doc: str, cases) -> argparse.ArgumentParser:
    """The options of a side-by-side run: batch shape, device, directory, models, cases, rounds, host settings,
    and the hidden ones a child process gets its case by."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batches", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dir", default=None)
    parser.add_argument("--skip-smollm2", action="store_true")
    parser.add_argument("--cases", default=",".join(cases))
    parser.add_argument("--rounds", type=int, default=1, help="run the cases this many times, taking turns")
    parser.add_argument("--malloc-mmap-threshold", type=int, metavar="BYTES",
                        help="run every case with MALLOC_MMAP_THRESHOLD_=BYTES (default: unset, glibc's dynamic "
                             "threshold); e.g. 1048576 for a flat peak RSS in long captures (docs/benchmarks.md)")
    parser.add_argument("--torch-huge-pages", action="store_true",
                        help="run every case with THP_MEM_ALLOC_ENABLE=1 (torch's CPU tensors of 2 MiB and more "
                             "on transparent huge pages; the kernel's THP mode must be madvise or always)")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    return parser


def parse_run_arguments(parser: argparse.ArgumentParser, cases) -> argparse.Namespace:
    """The arguments, with a threshold glibc would ignore and an unknown case refused by name."""
    args = parser.parse_args()
    if args.malloc_mmap_threshold is not None and not 0 <= args.malloc_mmap_threshold <= MMAP_THRESHOLD_MAX:
        parser.error(f"--malloc-mmap-threshold must be between 0 and {MMAP_THRESHOLD_MAX} bytes "
                     "(glibc ignores a larger threshold)")
    unknown = sorted(set(args.cases.split(",")) - set(cases))
    if unknown:
        parser.error(f"--cases: unknown {', '.join(unknown)}; choose from {', '.join(cases)}")
    return args


def main() -> None:
    parser = run_arguments(__doc__, CASES)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--memory-tokens", type=int, default=100_000)
    parser.add_argument("--disk-limit", type=float, metavar="MB/s",
                        help="throttle writes to the disk under --dir to this rate (root; see disk_limit.py), "
                             "to measure the capture where the disk is the bottleneck")
    parser.add_argument("--tokens", type=int, help=argparse.SUPPRESS)
    args = parse_run_arguments(parser, CASES)
    if args.case:
        run_case(args)
        return
    if args.tokens:
        run_memory(args)
        return

    import torch

    sys.path.insert(0, HERE)
    from bench_pipeline import disk_bandwidth

    env = host_environment(args)  # the same for every case, the plain forward's included
    directory = tempfile.mkdtemp(prefix="streamtap-bench-", dir=args.dir)
    common = ["--batch", str(args.batch), "--seq", str(args.seq), "--batches", str(args.batches),
              "--device", args.device, "--dir", directory]
    load_start = os.getloadavg()[0]
    limit = None
    if args.disk_limit:
        from disk_limit import limit_writes

        limit = limit_writes(directory, int(args.disk_limit * 1e6))  # before the probe: it measures the limit
    try:
        disk_probe = disk_bandwidth(directory)
        # under a throttle only the O_DIRECT figure is limited (cgroup v1 does not throttle writeback)
        disk = disk_probe["O_DIRECT"] if limit else disk_probe["disk"]
        models = ["gpt2"] + ([] if args.skip_smollm2 else ["smollm2"])
        by_model = run_rounds(__file__, models, args.cases.split(","), args.rounds, common, env)
        results = [median_run(runs) for model in models for runs in by_model[model].values()]
        memory = None
        if not args.skip_memory:
            memory = _child(["--tokens", str(args.memory_tokens), "--model", "gpt2", *common], env)
        disk_after = disk_bandwidth(directory)["O_DIRECT" if limit else "disk"]
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    load_end = os.getloadavg()[0]

    print(machine_line(args, torch, load_start, load_end))
    print(f"Host settings, the same for every case: {describe_host(env)}.")
    print(f"Disk write bandwidth (sequential, same run): {disk_probe['buffered + fsync'] / 1e9:.2f} GB/s buffered "
          f"with fsync, {disk_probe['O_DIRECT'] / 1e9:.2f} GB/s O_DIRECT before the cases; "
          f"{disk_after / 1e9:.2f} GB/s (the better of the two) after them." + (f" Throttled: {limit}." if limit else "") + "\n")
    print("| model | case | s/batch | × plain | peak RSS | bytes per token read, on disk | compression | writer (encoding on the model's thread; disk writes overlapping the next forward) |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for model in models:
        rows = [r for r in results if r["model"] == model]
        plain = next((r for r in rows if r["case"] == "plain"), rows[0])
        for r in rows:
            # streamtap's time includes draining the writer at the end (mean over the batches)
            t = seconds_per_batch(r)
            disk_col = f"{r['disk_per_input_token']:,.0f}" if "disk_per_input_token" in r else ""
            ratio_col = f"{r['raw_per_token'] / r['disk_per_token']:.2f}x" if "disk_per_token" in r else ""
            writer = ""
            if "writer" in r:
                per_batch = r["write_seconds"] / (args.batches + 1)
                writer = f"{r['writer']}: {per_batch:.2f} s/batch encoding"
                if r.get("io_seconds"):
                    mbps = r["io_bytes"] / r["io_seconds"] / 1e6
                    writer += (f"; disk busy {r['io_seconds'] / (args.batches + 1):.2f} s/batch in the background "
                               f"at {mbps:,.0f} MB/s ({mbps / (disk / 1e6):.0%} of disk)")
                    # what the capture as a whole sustained: all its bytes over its whole wall time, from
                    # the warm-up's forward to the last write landing (the warm-up's writes run into the
                    # timed batches, so the timed mean alone would overstate the time per batch's bytes)
                    rate = r["io_bytes"] / r["wall_all"] / 1e6
                    # and in the steady state: a batch's bytes per median batch (the time between hand-overs)
                    steady = r["io_bytes"] / (args.batches + 1) / r["median"] / 1e6
                    writer += (f"; the capture writes {steady:,.0f} MB/s per batch ({steady / (disk / 1e6):.0%} of disk), "
                               f"{rate:,.0f} MB/s ({rate / (disk / 1e6):.0%}) over the whole run")
            print(f"| {MODELS[model]} | {LABELS[r['case']]} | {t:.3f} | {t / plain['median']:.2f} | "
                  f"{r['peak_rss'] / 2**30:.2f} GiB | {disk_col} | {ratio_col} | {writer} |")
    steps = [(model, r) for model in models for r in results if r["model"] == model and r.get("summary_step")]
    if steps:
        print("\nThe summary step on the model's thread (median of the timed batches of the median round) "
              "against the plain forward's median batch; the summaries' write into the store at close "
              "(every `summarise_every` = 300 s in a long capture):\n")
        print("| model | case | summary step s/batch | % of plain | summary write s | per 300 s |")
        print("| --- | --- | ---: | ---: | ---: | ---: |")
        for model, r in steps:
            plain = next((p for p in results if p["model"] == model and p["case"] == "plain"), None)
            t = statistics.median(r["summary_step"])
            pct = f"{t / plain['median']:.1%}" if plain else ""
            w = sum(r["summary_write"])
            print(f"| {MODELS[model]} | {LABELS[r['case']]} | {t:.3f} | {pct} | {w:.2f} | {w / 300:.1%} |")
    if memory is not None:
        m = memory
        mib = lambda b: f"{b / 2**20:,.0f} MiB"  # noqa: E731
        batches3 = 3 * m["batch_terms_bytes"]
        print(f"\nPeak RSS of a streamtap capture (GPT-2-small shape, {m['writer']} writer, the host settings above), "
              f"read after every batch: {m['tenth_tokens']:,} tokens {mib(m['peak_tenth'])}, {m['tokens']:,} tokens "
              f"{mib(m['peak_rss'])} (difference {(m['peak_rss'] - m['peak_tenth']) / 2**20:+,.0f} MiB). The plain "
              f"forward's peak in the same process, settled over {PLAIN_FORWARDS} forwards: {mib(m['plain_peak'])} "
              f"(first forward {mib(m['plain_first_peak'])}); model {mib(m['model_bytes'])}; one batch of captured "
              f"terms {mib(m['batch_terms_bytes'])}; the capture's peak above the plain forward's "
              f"{mib(m['peak_rss'] - m['plain_peak'])} vs 3 batches {mib(batches3)}; above the process before the "
              f"model {mib(m['peak_rss'] - m['base_rss'])} vs model + 3 batches {mib(m['model_bytes'] + batches3)}.")


if __name__ == "__main__":
    main()
