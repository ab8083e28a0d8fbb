"""Head scores (sinks, off heads, previous-token, duplicate-token, induction), the W_QK agreement and
the induction probe, against the model's own attention (eager, output_attentions=True), scores
recorded by an attention function of this test's own, and plain loops."""

import numpy as np
import pytest
import torch
import zarr
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask
from transformers.models.llama.modeling_llama import eager_attention_forward

import streamtap as st
from streamtap.models import tiny_model

from _analysis_util import model_source_messages

LENGTH, BATCH = 12, 3


@pytest.fixture(scope="module")
def probe():
    model = tiny_model("llama", num_key_value_heads=2)   # grouped-query attention
    p = st.induction_probe(model, zarr.storage.MemoryStore(), length=LENGTH, batch=BATCH, seed=3, prefix_id=1,
                           exclude=[1])
    ids = torch.as_tensor(p.input_ids)
    with torch.no_grad():
        out = model(input_ids=ids, output_attentions=True, attn_implementation="eager")
    attn = np.stack([a.double().numpy() for a in out.attentions], axis=1)        # (batch, layer, head, q, k)
    return model, p, st.open(p.store), attn, out.logits.double()


def _reference(ids, A, sink=0, off_mass=0.8, off_norm=0.1, msg_norms=None):
    """Scores of one sequence (ids (n,), A (head, q, k)) by plain loops over queries."""
    H, n = A.shape[0], len(ids)
    sums = {k: np.zeros(H) for k in ("previous_token", "duplicate_token", "induction", "sink_mass", "off")}
    counts = dict.fromkeys(sums, 0)
    typical = np.median(np.delete(msg_norms, sink, axis=0), axis=0)
    rel = msg_norms[sink] / typical
    for q in range(n):
        if q >= 1:
            sums["previous_token"] += A[:, q, q - 1]
            counts["previous_token"] += 1
        dup = [k for k in range(q) if ids[k] == ids[q]]
        if dup:
            sums["duplicate_token"] += A[:, q, dup].sum(-1)
            counts["duplicate_token"] += 1
            sums["induction"] += A[:, q, [k + 1 for k in dup]].sum(-1)
            counts["induction"] += 1
        if q > sink:
            sums["sink_mass"] += A[:, q, sink]
            sums["off"] += (A[:, q, sink] >= off_mass) & (rel < off_norm)
            counts["sink_mass"] += 1
            counts["off"] += 1
    return sums, counts, rel


def test_head_scores_match_loops_over_eager_attention(probe):
    model, p, ds, attn, _ = probe
    mask = torch.ones_like(torch.as_tensor(p.input_ids))
    norms = np.linalg.norm(model_source_messages(model, torch.as_tensor(p.input_ids), mask), axis=-1)
    norms = norms.reshape(BATCH, -1, *norms.shape[1:])                                 # (batch, pos, layer, head)
    # off_mass low enough that some queries count, so the off score is tested on non-zero values
    hs = st.analysis.head_scores(ds, off_mass=0.3, off_norm=10.0)
    L = ds.sizes["layer"]
    for layer in range(L):
        totals, counts, rels = {}, {}, []
        for b in range(BATCH):
            s, c, rel = _reference(p.input_ids[b], attn[b, layer], off_mass=0.3, off_norm=10.0,
                                   msg_norms=norms[b, :, layer])
            for k in s:
                totals[k] = totals.get(k, 0) + s[k]
                counts[k] = counts.get(k, 0) + c[k]
            rels.append(rel)
        for k in totals:
            np.testing.assert_allclose(hs[k].sel(layer=layer).values, totals[k] / counts[k], atol=1e-5, err_msg=k)
            assert int(hs[f"{k}_queries"].sel(layer=layer)) == counts[k]
        np.testing.assert_allclose(hs.sink_message.sel(layer=layer).values, np.mean(rels, axis=0), rtol=1e-4)
    assert hs.induction_queries.values[0] == BATCH * LENGTH          # every query of the second copy
    assert 0 < float(hs.off.max()) < 1


def test_induction_probe_tokens_and_loss(probe):
    model, p, ds, _, logits = probe
    ids = p.input_ids
    assert ids.shape == (BATCH, 1 + 2 * LENGTH) and (ids[:, 0] == 1).all()
    np.testing.assert_array_equal(ids[:, 1:1 + LENGTH], ids[:, 1 + LENGTH:])
    assert all(len(set(row[1:1 + LENGTH])) == LENGTH for row in ids) and 1 not in ids[:, 1:]
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                            torch.as_tensor(ids[:, 1:]).reshape(-1), reduction="none")
    nll = nll.reshape(BATCH, -1).numpy()
    np.testing.assert_allclose(p.loss_first, nll[:, 1:LENGTH].mean(), rtol=1e-9)   # targets 2..LENGTH
    np.testing.assert_allclose(p.loss_second, nll[:, LENGTH:].mean(), rtol=1e-9)
    np.testing.assert_allclose(p.loss_drop, p.loss_first - p.loss_second)
    assert ds.sizes["token"] == ids.size and ds.attrs["patterns"]
    np.testing.assert_array_equal(ds.token_id.values.reshape(BATCH, -1), ids)


def test_probe_refuses_what_it_cannot_draw():
    model = tiny_model("llama")
    with pytest.raises(st.InputError, match="distinct tokens"):
        st.induction_probe(model, zarr.storage.MemoryStore(), length=model.config.vocab_size + 1)
    with pytest.raises(st.InputError, match="repeats >= 2"):
        st.induction_probe(model, zarr.storage.MemoryStore(), repeats=1)


def test_qk_agreement_matches_recorded_scores():
    """The real scores come from an attention function of this test's own (q and k after rotary, the
    model's scaling); the embedding-only scores from the model's modules applied to its embeddings."""
    model = tiny_model("llama", num_key_value_heads=2)
    recorded = []

    def record(module, query, key, value, attention_mask, scaling, **kw):
        recorded.append((query.detach().double(), key.detach().double(), scaling))
        return eager_attention_forward(module, query, key, value, attention_mask, scaling, **kw)

    AttentionInterface.register("streamtap_test_record", record)
    AttentionMaskInterface.register("streamtap_test_record", eager_mask)     # the causal mask eager builds
    ids = torch.as_tensor(np.random.default_rng(0).integers(2, model.config.vocab_size, (2, 9)))
    store = zarr.storage.MemoryStore()
    with st.tap(model, store, patterns=True), torch.no_grad():
        model(input_ids=ids)
    model.set_attn_implementation("streamtap_test_record")
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        model.set_attn_implementation("eager")
        for interface in (AttentionInterface, AttentionMaskInterface):   # leave transformers as it was
            interface._global_mapping.pop("streamtap_test_record", None)
    agreement = st.analysis.qk_agreement(st.open(store))
    cfg = model.config
    H, group = cfg.num_attention_heads, cfg.num_attention_heads // cfg.num_key_value_heads
    n = ids.shape[1]
    for layer, (q, k, scaling) in enumerate(recorded):
        attn = model.model.layers[layer].self_attn
        with torch.no_grad():
            e = model.model.layers[layer].input_layernorm(model.model.embed_tokens(ids)).double()
            fq = (e @ attn.q_proj.weight.double().T).view(2, n, H, -1)
            fk = (e @ attn.k_proj.weight.double().T).view(2, n, cfg.num_key_value_heads, -1)
        xs, ys = [[] for _ in range(H)], [[] for _ in range(H)]
        for b in range(2):
            for h in range(H):
                real = (q[b, h] @ k[b, h // group].T * scaling).numpy()
                free = (fq[b, :, h] @ fk[b, :, h // group].T).numpy() * scaling
                for i in range(n):
                    for j in range(1, i):          # earlier keys, the first token and the query itself left out
                        xs[h].append(free[i, j])
                        ys[h].append(real[i, j])
        expected = [np.corrcoef(xs[h], ys[h])[0, 1] for h in range(H)]
        np.testing.assert_allclose(agreement.correlation.sel(layer=layer).values, expected, atol=1e-6,
                                   err_msg=f"layer {layer}")
        assert (agreement.pairs.sel(layer=layer).values == len(xs[0])).all()


def test_head_scores_need_patterns():
    model = tiny_model("llama")
    store = zarr.storage.MemoryStore()
    with st.tap(model, store), torch.no_grad():
        model(input_ids=torch.tensor([[3, 4, 5, 3, 4]]))
    with pytest.raises(st.errors.PatternsMissingError, match="--patterns"):
        st.analysis.head_scores(st.open(store))


def test_head_views_against_full_svd_of_model_weights():
    """The SVD of the full d_model x d_model maps built from the model's own modules, the vocabulary
    read through its own input norm; signs of singular pairs are free, so top and bottom may swap."""
    model = tiny_model("llama", num_key_value_heads=2)
    store = zarr.storage.MemoryStore()
    with st.tap(model, store), torch.no_grad():
        model(input_ids=torch.tensor([[3, 4, 5, 6]]))
    ds = st.open(store)
    views = st.analysis.head_views(ds, directions=2, k=5)
    cfg = model.config
    H, d_head = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    group = H // cfg.num_key_value_heads
    E = model.model.embed_tokens.weight.detach().double()
    with torch.no_grad():
        U = (model.lm_head.weight.double() * model.model.norm.weight.double()).numpy()
        for layer, block in enumerate(model.model.layers):
            read = block.input_layernorm(E.float()).double().numpy()
            a = block.self_attn
            for h in range(H):
                g = h // group
                Wq = a.q_proj.weight.double()[h * d_head:(h + 1) * d_head].numpy().T       # (d_model, d_head)
                Wk = a.k_proj.weight.double()[g * d_head:(g + 1) * d_head].numpy().T
                Wv = a.v_proj.weight.double()[g * d_head:(g + 1) * d_head].numpy().T
                Wo = a.o_proj.weight.double()[:, h * d_head:(h + 1) * d_head].numpy().T   # (d_head, d_model)
                v = views.sel(layer=layer, head=h)
                for name, (left, right), (lside, rside) in (("qk", (Wq, Wk.T), ("query", "key")),
                                                           ("ov", (Wv, Wo), ("source", "target"))):
                    u, s, wt = np.linalg.svd(left @ right)
                    np.testing.assert_allclose(v[f"{name}_singular"].values, s[:2], rtol=1e-4)
                    lproj = read @ u[:, :2]
                    rproj = (U if rside == "target" else read) @ wt[:2].T
                    for r in range(2):
                        top_l, bot_l = np.argsort(-lproj[:, r])[:5], np.argsort(lproj[:, r])[:5]
                        top_r, bot_r = np.argsort(-rproj[:, r])[:5], np.argsort(rproj[:, r])[:5]
                        got = [v[f"{side}{end}_id"].values[r].tolist() for side in (lside, rside)
                               for end in ("", "_bottom")]
                        ref = [top_l.tolist(), bot_l.tolist(), top_r.tolist(), bot_r.tolist()]
                        flipped = [bot_l.tolist(), top_l.tolist(), bot_r.tolist(), top_r.tolist()]
                        assert got in (ref, flipped), (layer, h, name, r)
    assert views.query_text.shape == views.query_id.shape


def test_long_sequences_go_a_head_at_a_time_with_the_same_results(probe, monkeypatch):
    """Patterns of a long sequence do not fit at once: with a budget below one head's pattern, every
    score and the second invariant come out the same, a head at a time."""
    import streamtap.attention as attention

    _, _, ds, _, _ = probe
    whole = st.analysis.head_scores(ds)
    errors = attention.output_errors(ds, 1)
    agreement = st.analysis.qk_agreement(ds)
    assert len(attention.head_blocks(ds.sizes["head"], 25, np.float64)) == 1
    monkeypatch.setattr(attention, "PATTERN_BYTES", 1)
    assert [list(b) for b in attention.head_blocks(4, 25, np.float64)] == [[0], [1], [2], [3]]
    xr_testing = pytest.importorskip("xarray.testing")
    xr_testing.assert_allclose(st.analysis.head_scores(ds), whole)
    xr_testing.assert_allclose(attention.output_errors(ds, 1), errors)
    xr_testing.assert_allclose(st.analysis.qk_agreement(ds), agreement)
