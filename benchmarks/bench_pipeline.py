"""The measurements behind the capture pipeline's choices (docs/pipeline.md), in one run.

    python benchmarks/bench_pipeline.py [--sections disk,codecs,chunks,shards,writers] [--batches 5]

- disk: the write bandwidth of the disk under the temp directory (fsync'd), and of the page cache.
- codecs: compression ratio and single-core encode speed of lossless codecs on real SmolLM2
  activations (z and MLP outputs of the bundled sample), in float32, bfloat16 and float16.
- chunks: throughput of appending 2,048-token batches to a Zarr array, by chunk size and codec.
- shards: the same appends into sharded arrays (fewer files, but a shard a batch ends in is
  rewritten by the next batch).
- writers: streamtap capturing a GPT-2-small-shaped model (8 x 256 tokens) into Zarr with the
  batch written on the model's thread (inline), by a writer thread, through zarr's async API on
  zarr's own event loop, and by a writer process fed through shared memory; plus the plain forward
  and the capture with writes switched off.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import multiprocessing as mp
import os
import queue
import platform
import shutil
import statistics
import sys
import tempfile
import time
from multiprocessing import shared_memory

import numpy as np
import torch
import zarr

HERE = os.path.dirname(os.path.abspath(__file__))


def _dir_files(path: str) -> int:
    return sum(len(files) for _, _, files in os.walk(path))


# -- disk -------------------------------------------------------------------------------------
def disk_bandwidth(directory: str, total: int = 2 << 30, block: int = 64 << 20) -> dict:
    """Sequential write bandwidth in bytes/s: buffered with an fsync at the end, and O_DIRECT."""
    import mmap

    buf = mmap.mmap(-1, block)  # page-aligned, as O_DIRECT wants
    buf.write(np.random.default_rng(0).integers(0, 255, block, dtype=np.uint8).tobytes())
    path = os.path.join(directory, "disk-probe.bin")
    out = {}
    for label, flags in (("buffered + fsync", 0), ("O_DIRECT", getattr(os, "O_DIRECT", 0))):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | flags)
        start = time.perf_counter()
        for _ in range(total // block):
            os.write(fd, buf)
        os.fsync(fd)
        out[label] = total / (time.perf_counter() - start)
        os.close(fd)
        os.remove(path)
    out["disk"] = max(out.values())
    return out


# -- codecs -----------------------------------------------------------------------------------
def real_activations() -> np.ndarray:
    import streamtap as st
    from streamtap.models import load_model

    model, tok = load_model("smollm2")
    texts = [t for t in open(os.path.join(HERE, "..", "streamtap", "data", "sample.txt"), encoding="utf-8").read().splitlines() if t.strip()]
    store = zarr.storage.MemoryStore()
    st.capture(model, texts, store, tokenizer=tok, batch_size=8, check=False)
    g = zarr.open_group(store, mode="r")
    return np.concatenate([g["z"][:].reshape(-1), g["mlp_out"][:].reshape(-1)])


def codecs(x32: np.ndarray, chunk: int = 4 << 20) -> list[dict]:
    import numcodecs
    from numcodecs import Blosc, Zstd

    numcodecs.blosc.set_nthreads(1)
    numcodecs.blosc.use_threads = False
    data = {"float32": x32, "bfloat16": torch.from_numpy(x32).bfloat16().view(torch.uint16).numpy(),
            "float16": x32.astype(np.float16)}
    candidates = {
        "none (memcpy)": None,
        "blosc lz4 shuffle": Blosc("lz4", 1, Blosc.SHUFFLE),
        "blosc zstd-1 shuffle": Blosc("zstd", 1, Blosc.SHUFFLE),
        "blosc zstd-1 shuffle 1 MiB blocks": Blosc("zstd", 1, Blosc.SHUFFLE, blocksize=1 << 20),
        "blosc zstd-1 bitshuffle": Blosc("zstd", 1, Blosc.BITSHUFFLE),
        "blosc zstd-3 shuffle 1 MiB blocks": Blosc("zstd", 3, Blosc.SHUFFLE, blocksize=1 << 20),
        "zstd-1 (no shuffle)": Zstd(1),
    }
    rows = []
    for dtype, arr in data.items():
        b = arr.view(np.uint8)
        chunks = [b[i:i + chunk] for i in range(0, len(b) - chunk + 1, chunk)][:8]
        nbytes = sum(len(c) for c in chunks)
        for name, codec in candidates.items():
            enc = (lambda c: bytes(c)) if codec is None else codec.encode
            best = float("inf")
            for _ in range(3):
                start = time.perf_counter()
                outs = [enc(c) for c in chunks]
                best = min(best, time.perf_counter() - start)
            rows.append({"dtype": dtype, "codec": name, "ratio": nbytes / sum(len(o) for o in outs),
                         "MB/s": nbytes / best / 1e6})
    return rows


# -- chunks and shards -----------------------------------------------------------------------------
def appends(directory: str, *, chunk_bytes: int, compressor, shard_bytes: int | None = None,
            width: int = 9216, batch_tokens: int = 2048, batches: int = 8, jitter: bool = True,
            direct: bool = True) -> dict:
    """Append ``batches`` batches of about ``batch_tokens`` float32 rows of ``width`` to one array.

    ``jitter`` varies batch lengths (padding removed) so that batch ends fall inside chunks, as in a
    real capture. Returns MB/s (uncompressed) and the number of files written.
    """
    rng = np.random.default_rng(0)
    data = rng.standard_normal((batch_tokens + 64, width), dtype=np.float32)
    tok = max(1, chunk_bytes // (width * 4))
    path = os.path.join(directory, f"a{chunk_bytes}-{shard_bytes}-{id(compressor)}.zarr")
    kwargs = {"chunks": (tok, width)}
    if shard_bytes:
        kwargs["shards"] = (tok * max(1, shard_bytes // chunk_bytes), width)
    cap = (batch_tokens + 64) * batches
    cap = -(-cap // kwargs.get("shards", kwargs["chunks"])[0]) * kwargs.get("shards", kwargs["chunks"])[0]
    from streamtap.io.direct import DirectLocalStore

    arr = zarr.create_array(DirectLocalStore(path) if direct else path, shape=(cap, width), dtype="float32",
                            compressors=compressor, fill_value=0, **kwargs)
    start, total, t0 = 0, 0, time.perf_counter()
    for i in range(batches):
        n = batch_tokens - (int(rng.integers(0, 64)) if jitter else 0)
        arr[start:start + n] = data[:n]
        start += n
        total += n * width * 4
    seconds = time.perf_counter() - t0
    out = {"MB/s": total / seconds / 1e6, "files": _dir_files(path), "MB": total / 1e6}
    shutil.rmtree(path)
    return out


# -- writer modes ----------------------------------------------------------------------------------
# The pipelines below stand in for streamtap.io.pipeline's in writer_modes(): each takes a job, writes
# (or drops) its arrays, and calls its ``release`` once they are no longer read, since the tap's buffer
# pool holds only queue_depth + 2 sets and waits for a set to come back before the next forward.
class AsyncPipeline:
    """Batches written through zarr's async API on zarr's own event loop, ``depth`` in flight."""

    mode = "async"

    def __init__(self, writer, depth: int = 1):
        from zarr.core.sync import _get_loop

        self.writer, self.depth = writer, depth
        self.loop = _get_loop()
        self.pending: collections.deque = collections.deque()
        self.next_token = writer.tokens
        self.sequences = writer.sequences

    def raise_pending(self):
        while self.pending and self.pending[0].done():
            self.pending.popleft().result()

    def submit(self, job) -> None:
        from streamtap.io.schema import COMMITTED_SEQUENCES, COMMITTED_TOKENS

        self.raise_pending()
        while len(self.pending) >= self.depth:
            self.pending.popleft().result()
        arrays = job.numpy()
        w = self.writer
        n = len(arrays["seq"])
        start, end = self.next_token, self.next_token + n
        self.next_token = end
        self.sequences += job.n_sequences
        if end > w.capacity:  # rare (capacity doubles): settle what is in flight, grow synchronously
            while self.pending:
                self.pending.popleft().result()
            w._grow(end)
        prev = self.pending[-1] if self.pending else None
        counts = {COMMITTED_TOKENS: end, COMMITTED_SEQUENCES: self.sequences}

        async def write():
            try:
                if prev is not None:
                    await asyncio.wrap_future(prev)
                await asyncio.gather(*[arr.async_array.setitem((slice(start, end),), arrays[name])
                                       for name, arr in w._arrays.items() if name in arrays])
            finally:
                if job.release is not None:
                    job.release()  # the arrays are the tap's buffers: back to its pool
            await w.group._async_group.update_attributes(counts)  # the commit, after every chunk
            w.tokens, w.sequences = end, counts[COMMITTED_SEQUENCES]

        self.pending.append(asyncio.run_coroutine_threadsafe(write(), self.loop))

    def busy(self):  # close() waits for everything, so nothing is left writing after it
        return False

    def close(self, exc=None):
        while self.pending:
            self.pending.popleft().result()


def _writer_process(target, direct_io, inbox, outbox):
    from streamtap.io.location import open_group
    from streamtap.io.schema import COMMITTED_SEQUENCES, COMMITTED_TOKENS
    from streamtap.io.writer import StoreWriter

    try:
        # the parent holds the store's lock; this writes under it, into the arrays the parent created
        w = StoreWriter(target, append=True, direct_io=direct_io)
        w.group = open_group(w.store, mode="r+")
        w._arrays = {name: arr for name, arr in w.group.arrays()
                     if arr.metadata.dimension_names and arr.metadata.dimension_names[0] == "token"}
        w.tokens = w.found_tokens = int(w.group.attrs[COMMITTED_TOKENS])
        w.sequences = w.found_sequences = int(w.group.attrs[COMMITTED_SEQUENCES])
        w.capacity = min(a.shape[0] for a in w._arrays.values())
        outbox.put(("ready",))
        while True:
            item = inbox.get()
            if item is None:
                w.close()
                outbox.put(("closed", w.tokens, w.sequences))
                return
            shm_name, layout, n_seq = item
            shm = shared_memory.SharedMemory(name=shm_name)
            arrays = {name: np.ndarray(shape, dtype=dtype, buffer=shm.buf, offset=off)
                      for name, (off, shape, dtype) in layout.items()}
            w.write(arrays, n_seq)
            del arrays
            shm.close()
            outbox.put(("done", shm_name))
    except BaseException as exc:  # noqa: BLE001
        outbox.put(("error", repr(exc)))


class ProcessPipeline:
    """A writer process fed through shared memory; the parent keeps at most ``depth`` batches queued."""

    mode = "process"

    def __init__(self, writer, depth: int = 1):
        ctx = mp.get_context("spawn")
        self.writer = writer
        self.inbox, self.outbox = ctx.Queue(maxsize=depth), ctx.Queue()
        from streamtap.io.direct import DirectLocalStore

        direct_io = isinstance(writer.store, DirectLocalStore)
        self.proc = ctx.Process(target=_writer_process, args=(str(writer.target), direct_io, self.inbox, self.outbox),
                                daemon=True)
        self.proc.start()
        self.live: dict[str, shared_memory.SharedMemory] = {}
        self._expect("ready")

    def _expect(self, what):
        msg = self.outbox.get()
        if msg[0] == "error":
            raise RuntimeError(f"writer process: {msg[1]}")
        if msg[0] != what and msg[0] == "done":
            self.live.pop(msg[1]).unlink()
            return self._expect(what)
        return msg

    def raise_pending(self):
        while not self.outbox.empty():
            msg = self.outbox.get()
            if msg[0] == "error":
                raise RuntimeError(f"writer process: {msg[1]}")
            if msg[0] == "done":
                self.live.pop(msg[1]).unlink()

    def submit(self, job) -> None:
        self.raise_pending()
        try:
            arrays = job.numpy()
            shm = self._share(arrays)
        finally:
            if job.release is not None:
                job.release()  # copied into shared memory: the tap's buffers go back to its pool
        while True:  # blocks when depth batches are queued, and fails if the writer process died
            try:
                self.inbox.put((shm.name, self._layout, job.n_sequences), timeout=1.0)
                break
            except queue.Full:
                if not self.proc.is_alive():
                    self.raise_pending()
                    raise RuntimeError("the writer process died") from None

    def _share(self, arrays: dict[str, np.ndarray]) -> shared_memory.SharedMemory:
        layout, off = {}, 0
        for name, a in arrays.items():
            layout[name] = (off, a.shape, a.dtype.str)
            off += -(-a.nbytes // 64) * 64
        shm = shared_memory.SharedMemory(create=True, size=max(off, 1))
        for name, a in arrays.items():
            o, shape, dtype = layout[name]
            np.ndarray(shape, dtype=dtype, buffer=shm.buf, offset=o)[...] = a
        self.live[shm.name] = shm
        self._layout = layout
        return shm

    def busy(self):  # close() waits for everything, so nothing is left writing after it
        return False

    def close(self, exc=None):
        self.inbox.put(None)
        msg = self._expect("closed")
        self.proc.join()
        for shm in self.live.values():
            shm.close()
            shm.unlink()
        self.writer.tokens, self.writer.sequences = msg[1], msg[2]


class NullPipeline:
    mode = "no write"

    def __init__(self, writer):
        self.writer = writer

    def raise_pending(self):
        pass

    def submit(self, job):
        try:
            job.numpy()
        finally:
            if job.release is not None:
                job.release()

    def busy(self):  # close() waits for everything, so nothing is left writing after it
        return False

    def close(self, exc=None):
        pass


def writer_modes(directory: str, batches: int, shape=(8, 256), quick: bool = False) -> list[dict]:
    import streamtap as st
    import streamtap.io.pipeline as pipeline_mod
    import streamtap.io.writer as writer_mod
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=12, n_head=12, n_embd=768)).eval()
    ids = torch.randint(0, model.config.vocab_size, shape)
    mask = torch.ones_like(ids)

    def forward():
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)

    def timed(loop_body, close):
        loop_body()  # warm-up (creates the store, starts the writer)
        times = []
        start = time.perf_counter()
        for _ in range(batches):
            t = time.perf_counter()
            loop_body()
            times.append(time.perf_counter() - t)
        close()
        total = time.perf_counter() - start
        return statistics.median(times), total / batches

    from zarr.codecs import BloscCodec

    rows = []
    med, mean = timed(forward, lambda: None)
    rows.append({"mode": "plain forward", "median": med, "mean": mean})
    # the tap's Recorder makes its pipeline with streamtap.io.pipeline.make_pipeline, and the writer
    # compresses with streamtap.io.writer.COMPRESSOR (when compress=True): both are swapped per variant
    original, original_codec = pipeline_mod.make_pipeline, writer_mod.COMPRESSOR
    kinds = {
        "no write (capture only)": lambda w, mode, dev, depth: NullPipeline(w),
        "inline": lambda w, mode, dev, depth: pipeline_mod.Pipeline(w),
        "thread": lambda w, mode, dev, depth: pipeline_mod.ThreadPipeline(w, depth),
        "zarr async API": lambda w, mode, dev, depth: AsyncPipeline(w, depth),
        "process": lambda w, mode, dev, depth: ProcessPipeline(w, depth),
    }
    codecs_ = {"zstd-1": original_codec, "lz4": BloscCodec(cname="lz4", clevel=1, shuffle="shuffle"), "none": None}
    variants = [("no write (capture only)", True, "zstd-1")]
    variants += [(kind, direct, codec) for direct in (False, True) for codec in ("zstd-1", "none")
                 for kind in ("inline", "thread", "zarr async API", "process")
                 if codec == "zstd-1" or kind in ("inline", "thread")]
    variants += [(kind, True, "lz4") for kind in ("inline", "thread")]
    if quick:  # O_DIRECT (the store's default) with zstd-1 and uncompressed only
        variants = [v for v in variants if v[1] and v[2] != "lz4"]
    for kind, direct, codec in variants:
        factory = kinds[kind]
        label = kind if kind.startswith("no write") else f"{kind}, {'O_DIRECT' if direct else 'page cache'}, {codec}"
        pipeline_mod.make_pipeline = factory
        writer_mod.COMPRESSOR = codecs_[codec] or original_codec
        path = os.path.join(directory, f"w-{len(rows)}.zarr")
        try:
            the_tap = st.tap(model, path, check=False, compress=codec != "none", direct_io=direct)
            the_tap.__enter__()
            try:
                med, mean = timed(forward, lambda: the_tap.__exit__(None, None, None))
            except BaseException as e:
                the_tap.__exit__(type(e), e, None)
                raise
        finally:
            pipeline_mod.make_pipeline, writer_mod.COMPRESSOR = original, original_codec
        row = {"mode": label, "median": med, "mean": mean}
        if label != "no write (capture only)":
            ds = st.open(path)
            assert ds.sizes["token"] == (batches + 1) * ids.numel(), (label, ds.sizes)
        shutil.rmtree(path, ignore_errors=True)
        rows.append(row)
    base = rows[0]["mean"]
    for r in rows:
        r["x plain"] = r["mean"] / base
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", default="disk,codecs,chunks,shards,writers")
    parser.add_argument("--batches", type=int, default=5)
    parser.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    parser.add_argument("--quick", action="store_true",
                        help="writers: only the O_DIRECT variants, zstd-1 and uncompressed (a third of the time)")
    args = parser.parse_args()
    sections = args.sections.split(",")
    directory = tempfile.mkdtemp(prefix="streamtap-pipeline-", dir=args.dir)
    load = os.getloadavg()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), zarr {zarr.__version__}, load average {load[0]:.2f} at start")
    try:
        if "disk" in sections:
            bw = disk_bandwidth(directory)
            print("\n## disk\n")
            for k, v in bw.items():
                if k != "disk":
                    print(f"- {k}: {v / 1e9:.2f} GB/s")
        if "codecs" in sections:
            rows = codecs(real_activations())
            print("\n## codecs (SmolLM2 z + mlp_out of the bundled sample, 4 MiB chunks, one core)\n")
            print("| dtype | codec | ratio | encode MB/s |\n| --- | --- | ---: | ---: |")
            for r in rows:
                print(f"| {r['dtype']} | {r['codec']} | {r['ratio']:.3f} | {r['MB/s']:,.0f} |")
        if "chunks" in sections:
            from zarr.codecs import BloscCodec

            zstd = BloscCodec(cname="zstd", clevel=1, shuffle="shuffle", blocksize=1 << 20)
            lz4 = BloscCodec(cname="lz4", clevel=1, shuffle="shuffle")
            print("\n## chunk size (appends of ~2,048 x 9,216 float32 rows, ends inside chunks)\n")
            print("| chunk | codec | page cache MB/s | O_DIRECT MB/s | files per GB |\n| ---: | --- | ---: | ---: | ---: |")
            for chunk in (256 << 10, 1 << 20, 4 << 20, 16 << 20, 64 << 20):
                for name, comp in (("zstd-1", zstd), ("lz4", lz4), ("none", None)):
                    b = appends(directory, chunk_bytes=chunk, compressor=comp, direct=False)
                    r = appends(directory, chunk_bytes=chunk, compressor=comp, direct=True)
                    print(f"| {chunk >> 10:,} KiB | {name} | {b['MB/s']:,.0f} | {r['MB/s']:,.0f} | "
                          f"{r['files'] / r['MB'] * 1000:,.0f} |")
        if "shards" in sections:
            from zarr.codecs import BloscCodec

            zstd = BloscCodec(cname="zstd", clevel=1, shuffle="shuffle", blocksize=1 << 20)
            print("\n## sharding (4 MiB chunks, zstd-1)\n")
            print("| shard | codec | O_DIRECT MB/s | files per GB |\n| ---: | --- | ---: | ---: |")
            for shard in (None, 16 << 20, 64 << 20, 256 << 20):
                for name, comp in (("zstd-1", zstd), ("none", None)):
                    r = appends(directory, chunk_bytes=4 << 20, compressor=comp, shard_bytes=shard)
                    label = "none" if shard is None else f"{shard >> 20} MiB"
                    print(f"| {label} | {name} | {r['MB/s']:,.0f} | {r['files'] / r['MB'] * 1000:,.0f} |")
        if "writers" in sections:
            rows = writer_modes(directory, args.batches, quick=args.quick)
            print(f"\n## writer modes (GPT-2-small shape, 8 x 256 tokens, {args.batches} batches after a warm-up, "
                  "mean includes draining at the end)\n")
            print("| mode | median s/batch | mean s/batch | x plain |\n| --- | ---: | ---: | ---: |")
            for r in rows:
                print(f"| {r['mode']} | {r['median']:.3f} | {r['mean']:.3f} | {r['x plain']:.3f} |")
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    print(f"\nload average at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    sys.exit(main())
