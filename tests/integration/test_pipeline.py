"""The capture pipeline in a tap: background writer, back-pressure, errors, order, host buffers, O_DIRECT,
lossy stores. (The pools and background writes alone: tests/unit; peak memory and what the library
leaves of the host: tests/slow.)"""

import os
import threading
import time

import numpy as np
import pytest
import torch
import zarr

import streamtap as st
from streamtap.io import pipeline as writer_mod
from streamtap.models import tiny_model
from streamtap.io.direct import DirectLocalStore
from streamtap.io.writer import StoreWriter

from _util import padded_batch, run

LENGTHS = [[9, 4, 7], [3, 8], [6, 6, 2, 5], [1], [8, 3]]


def _batches(model, seed=0):
    return [padded_batch(model.config.vocab_size, lengths, seed=seed + i) for i, lengths in enumerate(LENGTHS)]


def _arrays(path):
    g = zarr.open_group(path, mode="r")
    return {name: arr[:] for name, arr in g.arrays()}, dict(g.attrs)


def _slow(seconds):
    """StoreWriter.write, slowed down: a store that cannot keep up with the model."""
    original = StoreWriter.write

    def write(writer, batch, n_sequences, attrs=None, done=None):
        write.calls += 1
        time.sleep(seconds)
        return original(writer, batch, n_sequences, attrs, done)

    write.calls, write.seconds = 0, seconds
    return write


def _fail(done, exc):
    """What a write that fails before the store got the batch does: hand its arrays back (``done``), raise."""
    if done is not None:
        done()
    raise exc


def test_background_writer_gives_the_same_store_as_writing_inline(tmp_path):
    model = tiny_model("llama")
    batches = _batches(model)
    stores = {}
    for mode, depth in (("inline", 1), ("thread", 1), ("thread", 3)):
        path = tmp_path / f"{mode}{depth}.zarr"
        with st.tap(model, path, neurons=True, writer=mode, queue_depth=depth) as tap:
            for ids, mask in batches:
                run(model, ids, mask)
        assert tap.pipeline.mode == mode
        assert tap.tokens == sum(map(sum, LENGTHS)) and tap.sequences == sum(map(len, LENGTHS))
        stores[(mode, depth)] = _arrays(path)
    (ref, ref_attrs), *others = stores.values()
    for arrays, attrs in others:
        assert arrays.keys() == ref.keys()
        for name in ref:
            np.testing.assert_array_equal(arrays[name], ref[name], err_msg=name)
        assert attrs == ref_attrs
    assert list(ref["seq"]) == [i for i, n in enumerate(sum(LENGTHS, [])) for _ in range(n)]
    st.verify(st.open(tmp_path / "thread3.zarr"))


def test_a_slow_store_makes_the_model_wait_instead_of_buffering(tmp_path, monkeypatch):
    model = tiny_model("gpt2")
    batches = _batches(model) * 2
    slow = _slow(0.3)
    monkeypatch.setattr(StoreWriter, "write", slow)
    alive, peak = [0], [0]
    lock = threading.Lock()
    original_submit = writer_mod.ThreadPipeline.submit

    def counting_submit(self, job):  # count batches handed over and not yet written
        with lock:
            alive[0] += 1
            peak[0] = max(peak[0], alive[0])
        before = job.release

        def release():
            if before is not None:
                before()
            with lock:
                alive[0] -= 1
        job.release = release
        return original_submit(self, job)

    monkeypatch.setattr(writer_mod.ThreadPipeline, "submit", counting_submit)
    start = time.perf_counter()
    with st.tap(model, tmp_path / "s.zarr", writer="thread", queue_depth=1) as tap:
        for ids, mask in batches:
            run(model, ids, mask)
        in_block = time.perf_counter() - start
    # the queue holds one batch, the writer one, the producer one: never more than three alive
    # (an unbounded queue would hold all ten: the forwards take ~30 ms, a write 300 ms)
    assert peak[0] <= 3
    # the model waited for the store: the block lasted as long as the writes, not as the forwards
    assert tap.pipeline.wait_seconds > 0
    assert in_block >= slow.seconds * (len(batches) - 2)
    assert slow.calls == len(batches)
    assert st.open(tmp_path / "s.zarr").sizes["token"] == 2 * sum(map(sum, LENGTHS))


def test_a_writer_error_is_raised_at_the_next_forward_and_earlier_batches_stay_committed(tmp_path, monkeypatch):
    model = tiny_model("gpt2")
    batches = _batches(model)
    original = StoreWriter.write
    calls = []
    seen = threading.Event()

    def failing(writer, batch, n_sequences, attrs=None, done=None):
        calls.append(len(batch["seq"]))
        if len(calls) == 2:
            seen.set()
            _fail(done, OSError(28, "No space left on device"))
        return original(writer, batch, n_sequences, attrs, done)

    monkeypatch.setattr(StoreWriter, "write", failing)
    with pytest.raises(OSError, match="No space left") as info:
        with st.tap(model, tmp_path / "s.zarr", writer="thread") as tap:
            run(model, *batches[0])
            run(model, *batches[1])
            assert seen.wait(10)
            time.sleep(0.05)  # the writer has stored the error
            run(model, *batches[2])  # raises here, before this batch is computed
    assert any("background writer" in note for note in info.value.__notes__)
    assert len(calls) == 2  # nothing after the failed batch reached the store
    ds = st.open(tmp_path / "s.zarr")
    assert ds.sizes["token"] == sum(LENGTHS[0]) and tap.tokens == sum(LENGTHS[0])
    st.verify(ds)


def test_a_writer_error_is_raised_at_block_exit_and_never_lost(tmp_path, monkeypatch):
    model = tiny_model("gpt2")

    def failing(writer, batch, n_sequences, attrs=None, done=None):
        _fail(done, OSError(5, "Input/output error"))

    monkeypatch.setattr(StoreWriter, "write", failing)
    with pytest.raises(OSError, match="Input/output"):
        with st.tap(model, tmp_path / "s.zarr", writer="thread"):
            run(model, *_batches(model)[0])
    # an error in the user's code wins, and carries the writer's as a note
    with pytest.raises(KeyError) as info:
        with st.tap(model, tmp_path / "t.zarr", writer="thread"):
            run(model, *_batches(model)[0])
            raise KeyError("user code")
    assert any("Input/output error" in note for note in info.value.__notes__)


def test_an_exception_in_the_block_still_commits_every_batch_handed_over(tmp_path, monkeypatch):
    model = tiny_model("llama")
    monkeypatch.setattr(StoreWriter, "write", _slow(0.1))
    batches = _batches(model)
    with pytest.raises(RuntimeError, match="user code"):
        with st.tap(model, tmp_path / "s.zarr", writer="thread", queue_depth=4):
            for ids, mask in batches:
                run(model, ids, mask)
            raise RuntimeError("user code failed while batches were still queued")
    ds = st.open(tmp_path / "s.zarr")
    assert ds.sizes["token"] == sum(map(sum, LENGTHS))
    st.verify(ds)


def test_an_unknown_writer_mode_is_refused_by_the_tap():
    # how auto picks a mode is tests/unit/test_choose_mode.py
    with pytest.raises(st.OptionError, match="option writer='process': expected one of auto, thread, inline"):
        st.tap(tiny_model("gpt2"), zarr.storage.MemoryStore(), writer="process")



def test_lossy_float16_store_keeps_the_reference_exact_and_records_its_error(tmp_path):
    model = tiny_model("llama")
    path = tmp_path / "half.zarr"
    with st.tap(model, path, store_dtype="float16", neurons=True) as tap:
        for ids, mask in _batches(model):
            run(model, ids, mask)
    g = zarr.open_group(path, mode="r")
    assert g["z"].dtype == np.float16 and g["mlp_out"].dtype == np.float16 and g["neuron_act"].dtype == np.float16
    assert g["resid_final"].dtype == np.float32
    attrs = dict(g.attrs)
    assert attrs["dtype"] == "float32" and attrs["store_dtype"] == "float16"
    assert attrs["lossy_error_tokens"] == tap.tokens
    ds = st.open(path)
    err = st.verify(ds, raise_on_error=False)
    # what the capture measured is what a decomposition of the stored terms gives
    assert attrs["lossy_max_rel_error"] == pytest.approx(float(err.attrs["max_rel_error"]), rel=1e-6)
    assert 1e-5 < attrs["lossy_max_rel_error"] < 1e-2
    # an exact capture cannot be appended to it, nor the other way round
    with pytest.raises(st.StoreMismatchError, match="store_dtype"):
        with st.tap(model, path, append=True):
            run(model, *_batches(model)[0])
    with pytest.raises(st.OptionError, match="option store_dtype='int8': expected float16 or bfloat16"):
        st.tap(model, tmp_path / "x.zarr", store_dtype="int8")
    with pytest.raises(st.StreamtapError, match="would save no space"):
        st.tap(tiny_model("llama", dtype="bfloat16"), tmp_path / "y.zarr", store_dtype="float16")


def test_lossy_float16_refuses_values_beyond_its_range(tmp_path):
    model = tiny_model("gpt2")
    with torch.no_grad():
        model.transformer.h[0].mlp.c_proj.bias += 1e6  # an MLP output float16 cannot hold
    with pytest.raises(st.StreamtapError, match="beyond what float16 can store"):
        with st.tap(model, tmp_path / "s.zarr", store_dtype="float16", check=False):
            run(model, *_batches(model)[0])
    assert not os.path.exists(tmp_path / "s.zarr")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_capture_through_pinned_buffers_equals_cpu_capture(tmp_path):
    model = tiny_model("llama")
    batches = _batches(model)
    with st.tap(model, tmp_path / "cpu.zarr", writer="inline"):
        for ids, mask in batches:
            run(model, ids, mask)
    gpu = tiny_model("llama").cuda()
    with st.tap(gpu, tmp_path / "gpu.zarr") as tap:
        for ids, mask in batches:
            run(gpu, ids.cuda(), mask.cuda())
    assert tap.pipeline.mode == "thread" and tap.recorder.stager is not None
    cpu_arrays, _ = _arrays(tmp_path / "cpu.zarr")
    gpu_arrays, _ = _arrays(tmp_path / "gpu.zarr")
    for name in ("seq", "pos", "token_id"):
        np.testing.assert_array_equal(gpu_arrays[name], cpu_arrays[name])
    np.testing.assert_allclose(gpu_arrays["resid_final"], cpu_arrays["resid_final"], rtol=1e-4, atol=1e-4)
    st.verify(st.open(tmp_path / "gpu.zarr"))


def _wide_model():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)  # z is 64 KiB a token: 64-token chunks of 4 MiB, written with O_DIRECT
    return GPT2LMHeadModel(GPT2Config(n_layer=4, n_head=16, n_embd=4096 // 4, vocab_size=256, n_positions=64)).eval()


def test_direct_io_store_equals_a_page_cache_store_and_leaves_no_partial_files(tmp_path, monkeypatch):
    from streamtap.io import direct as store_mod

    model = _wide_model()
    ids = torch.randint(1, 256, (3, 50), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 40:] = 0
    calls = []
    original = store_mod.put_direct

    def counting(path, data):
        calls.append(len(data))
        return original(path, data)

    monkeypatch.setattr(store_mod, "put_direct", counting)
    for name, direct in (("direct", "1"), ("cache", "0")):
        monkeypatch.setenv("STREAMTAP_DIRECT_IO", direct)
        with st.tap(model, tmp_path / f"{name}.zarr", check=False) as tap:
            run(model, ids, mask)
            run(model, ids[:2], mask[:2])
        assert tap.tokens == 140 + 90
    assert calls and min(calls) >= store_mod.DIRECT_MIN_BYTES  # the big chunks went the direct way
    direct, _ = _arrays(tmp_path / "direct.zarr")
    cached, _ = _arrays(tmp_path / "cache.zarr")
    for name in cached:
        np.testing.assert_array_equal(direct[name], cached[name], err_msg=name)
    leftovers = [f for _, _, files in os.walk(tmp_path) for f in files if f.endswith(".partial")]
    assert not leftovers
    st.verify(st.open(tmp_path / "direct.zarr"))


def test_a_filesystem_without_o_direct_falls_back_to_ordinary_writes(tmp_path, monkeypatch):
    import errno

    from streamtap.io import direct as store_mod

    refused, buffered = [], []
    original_buffered = store_mod.put_buffered

    def refuse(path, data):
        refused.append(len(data))
        raise OSError(errno.EINVAL, "Invalid argument")

    def counting_buffered(path, data):
        buffered.append(len(data))
        return original_buffered(path, data)

    monkeypatch.setattr(store_mod, "put_direct", refuse)
    monkeypatch.setattr(store_mod, "put_buffered", counting_buffered)
    model = _wide_model()
    ids = torch.randint(1, 256, (2, 40), generator=torch.Generator().manual_seed(1))
    with st.tap(model, tmp_path / "s.zarr", check=False) as tap:
        run(model, ids, torch.ones_like(ids))
        tap.writer.wait()
        assert refused  # the store tried O_DIRECT for its big files once, and was refused
        tried, big_before = len(refused), sum(n >= store_mod.DIRECT_MIN_BYTES for n in buffered)
        run(model, ids, torch.ones_like(ids))
        tap.writer.wait()
    # from then on this store writes through the page cache: the next batch's big chunks never try
    # O_DIRECT again, and they did land (buffered)
    assert len(refused) == tried
    assert sum(n >= store_mod.DIRECT_MIN_BYTES for n in buffered) > big_before
    assert tap.tokens == 160
    leftovers = [f for _, _, files in os.walk(tmp_path) for f in files if f.endswith(".partial")]
    assert not leftovers
    st.verify(st.open(tmp_path / "s.zarr"))


def test_the_forward_returns_before_its_chunks_reach_the_disk_and_reads_wait_for_them(tmp_path, monkeypatch):
    """On a local store the model's thread only encodes; the disk write overlaps the next forward."""
    from streamtap.io import direct as store_mod

    landed, release, hold = [], threading.Event(), threading.Event()
    original = store_mod.put_direct

    def slow_disk(path, data):
        if hold.is_set():
            release.wait(10)
            landed.append(path.name)
        return original(path, data)

    monkeypatch.setattr(store_mod, "put_direct", slow_disk)
    model = _wide_model()
    ids = torch.randint(1, 256, (2, 40), generator=torch.Generator().manual_seed(2))
    path = tmp_path / "s.zarr"
    with st.tap(model, path, check=False, writer="inline") as tap:
        run(model, ids, torch.ones_like(ids))  # creates the store (its weights are written at once)
        assert st.open(path).sizes["token"] == 80
        hold.set()
        run(model, ids, torch.ones_like(ids))  # returns although no chunk file could be written yet
        assert not landed
        on_disk = zarr.open_group(str(path), mode="r").attrs["committed_tokens"]
        assert on_disk == 80  # the commit waits for its chunks: other readers see the previous batch
        threading.Timer(0.3, release.set).start()
        assert st.open(path).sizes["token"] == 160  # this process reads its own writes
        assert landed
    assert tap.tokens == 160
    st.verify(st.open(path))


def test_batches_reuse_a_bounded_set_of_host_buffers(tmp_path):
    model = tiny_model("gpt2")
    seen = []
    with st.tap(model, tmp_path / "s.zarr", writer="inline") as tap:
        for length in (6, 5, 6):  # the same capacity serves a shorter batch
            ids, mask = padded_batch(model.config.vocab_size, [length, 3])
            run(model, ids, mask)
            tap.writer.wait()  # the set comes back once the disk has the batch's chunks
            (buffers,) = list(tap.recorder.pool.free.queue)
            seen.append(buffers.buffers["z"].data_ptr())
    assert tap.recorder.pool.created == 1 and len(set(seen)) == 1
    assert tap.recorder.pool.free.empty()  # a finished tap that the caller still holds keeps no buffers alive
    st.verify(st.open(tmp_path / "s.zarr"))


def test_host_buffers_come_back_only_when_the_disk_has_their_chunks(tmp_path, monkeypatch):
    """Uncompressed chunks go to the disk straight from the batch's host buffers: the next batch
    must not be stacked into them while they are still being written."""
    model = tiny_model("gpt2")
    batches = _batches(model)
    gate = threading.Event()
    original = DirectLocalStore.write_file

    def held(store, key, value):
        if "/c/" in key and threading.current_thread().name.startswith("streamtap-io"):
            gate.wait(10)  # a batch's chunks (written in the background), not the weights at creation
        return original(store, key, value)

    monkeypatch.setattr(DirectLocalStore, "write_file", held)
    with st.tap(model, tmp_path / "s.zarr", writer="inline", compress=False) as tap:
        run(model, *batches[0])
        assert tap.recorder.pool.free.empty()  # its chunks are still being written from it
        threading.Timer(0.2, gate.set).start()
        acquire, sets_at_acquire = tap.recorder.pool.acquire, []
        tap.recorder.pool.acquire = lambda: (_taken := acquire(), sets_at_acquire.append(tap.recorder.pool.created))[0]
        run(model, *batches[1])  # stacked into a second set meanwhile
        assert sets_at_acquire == [2]
        tap.writer.wait()
        # the first set came back while the second was still in use, so its memory went back
        assert tap.recorder.pool.created == 1 and tap.recorder.pool.free.qsize() == 1
        run(model, *batches[2])
        assert tap.recorder.pool.created == 1  # the second set reused
    ds = st.open(tmp_path / "s.zarr")
    assert ds.sizes["token"] == sum(map(sum, LENGTHS[:3]))
    st.verify(ds)


@pytest.mark.parametrize("neurons", [False, True])
def test_the_weights_written_into_the_store_are_not_held_for_the_rest_of_the_capture(tmp_path, monkeypatch, neurons):
    # the per-head (and per-neuron) weight arrays are copies of the model's; held by the tap they
    # would sit beside every batch (GPT-2 shape: 108 MiB of heads, more with neurons)
    from torch.multiprocessing.reductions import StorageWeakRef

    from streamtap.layouts import Weights

    model = tiny_model("gpt2")
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    copies = []
    original = Weights.static

    def static_weights(self, *args, **kwargs):
        weights = original(self, *args, **kwargs)
        copies.extend(StorageWeakRef(t.untyped_storage()) for t in weights.values()
                      if t.untyped_storage().data_ptr() not in params)
        return weights

    monkeypatch.setattr(Weights, "static", static_weights)
    (ids, mask), *rest = _batches(model)[:3]
    with st.tap(model, tmp_path / "s.zarr", neurons=neurons, writer="inline"):
        run(model, ids, mask)
        assert copies, "the layout's weights include per-head copies (the case this guards)"
        assert all(ref.expired() for ref in copies), "the tap still holds the weights it wrote into the store"
        for ids, mask in rest:
            run(model, ids, mask)
    ds = st.open(tmp_path / "s.zarr")
    assert "W_O" in ds and (not neurons or "W_out" in ds)
    st.testing.assert_terms_sum_to_residual(ds)


