"""The tap copies each term out as the model produces it and keeps no activation alive longer than
the model does (streamtap.term_sinks): what keeps a long capture's memory at the plain forward's."""

import pytest
from torch.multiprocessing.reductions import StorageWeakRef

import streamtap as st
from streamtap.models import tiny_model

from _util import padded_batch, run


def _blocks(model):
    return model.transformer.h if hasattr(model, "transformer") else model.model.layers


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("lengths", [[7, 7], [7, 3]], ids=["full", "padded"])
def test_an_mlp_output_is_freed_when_the_model_frees_it(arch, lengths, tmp_path):
    model = tiny_model(arch)
    blocks = _blocks(model)
    outputs, alive_at_next_layer = {}, {}

    def keep_a_weak_ref(layer):
        def hook(module, args, output):
            outputs[layer] = StorageWeakRef(output.untyped_storage())  # a detached view shares it
        return hook

    def look_back(layer):
        def hook(module, args):
            alive_at_next_layer[layer - 1] = not outputs[layer - 1].expired()
        return hook

    handles = [blocks[l].mlp.register_forward_hook(keep_a_weak_ref(l)) for l in range(len(blocks))]
    handles += [blocks[l].register_forward_pre_hook(look_back(l)) for l in range(1, len(blocks))]
    ids, mask = padded_batch(model.config.vocab_size, lengths, seed=3)
    try:
        run(model, ids, mask)  # the plain forward frees each MLP output once it is added to the residual
        assert alive_at_next_layer and not any(alive_at_next_layer.values())
        alive_at_next_layer.clear()
        with st.tap(model, tmp_path / "s.zarr", check=False) as t:
            run(model, ids, mask)
        assert t.tokens == sum(lengths)
        assert alive_at_next_layer and not any(alive_at_next_layer.values()), alive_at_next_layer
    finally:
        for h in handles:
            h.remove()
    ds = st.open(tmp_path / "s.zarr")
    assert ds.sizes["token"] == sum(lengths)
    st.testing.assert_terms_sum_to_residual(ds)


def test_lossy_casts_are_made_in_buffers_taken_after_the_forward(tmp_path):
    model = tiny_model("gpt2")
    ids, mask = padded_batch(model.config.vocab_size, [6, 4], seed=4)
    with st.tap(model, tmp_path / "s.zarr", store_dtype="float16", check=False) as t:
        for _ in range(3):
            run(model, ids, mask)
        t.writer.wait()
        early = [s.buffers for s in list(t.recorder.pool.free.queue)]
        late = [s.buffers for s in list(t.recorder.late_pool.free.queue)]
    assert early and all("z.stored" not in b and "z" in b for b in early)
    assert late and all("z.stored" in b and "resid_final.stored" not in b for b in late)
    ds = st.open(tmp_path / "s.zarr")  # every stored token decomposes as well as the capture measured
    assert float(st.verify(ds, raise_on_error=False).max()) <= ds.attrs["lossy_max_rel_error"] * (1 + 1e-6)
