"""Peer check against TransformerLens 4.x (``TransformerBridge``, raw weights) on every tiny architecture.

Where TransformerLens's per-head results are right, streamtap's messages equal them within 1e-5
relative (max |difference| / max |TransformerLens|) on the real tokens of a right-padded batch of
unequal lengths. Where TransformerLens is wrong or crashes, a test shows streamtap exact on the same
weights against the Hugging Face model itself (plain torch hooks), and records what TransformerLens
did. Measured numbers are in ``docs/peers.md``; run with ``-s`` to see them printed.

What TransformerLens 4.3.0 does with each entry of ``TINY_ARCHS`` (found by trying):

- ``hook_result`` (``set_use_attn_result(True)``) works and matches: gpt2, gpt_bigcode, llama,
  llama-bias, mistral, qwen2, qwen3, gemma, stablelm, stablelm-parallel, olmo, bloom,
  bloom-post-ln-residual, gpt_neox, gpt_neox-sequential, phi, falcon, gemma2, gemma3, olmo2, mixtral,
  qwen2_moe.
  On gemma2, gemma3 and olmo2 the results are the raw ``z @ W_O`` *before* the
  post-attention norm, so they are not what the heads add to the residual stream (they miss the
  post-norm output by whole units; ``test_post_sublayer_norm_*``).
- ``set_use_attn_result(True)`` raises ``NotImplementedError`` (plain ``AttentionBridge``): gpt_neo,
  gptj, opt, opt-post-ln, bert, roberta. TransformerLens's own fallback,
  ``ActivationCache.compute_head_results()`` (cached ``hook_z`` times ``W_O``), works and matches.
  On opt-post-ln, ``run_with_cache`` with every hook cached crashes (``ValueError`` inside
  ``OPTAttention``: an OPT hook conversion leaves layer 1's input flattened to 2-D); caching only
  ``hook_z`` works.
- ``boot_transformers`` raises ``ValueError`` (no TransformerLens architecture for the model type):
  phimoe, dots1, hunyuan_v1_moe.
- ``boot_transformers`` crashes: falcon-new (Falcon ``new_decoder_architecture`` with 2 key/value
  heads: ``RuntimeError`` from ``torch.split`` of the fused QKV weight, which TransformerLens splits
  as if there were one key/value head).
- ``ActivationCache.decompose_resid`` is wrong on bloom-post-ln-residual (its terms do not sum to
  the residual: the residual BLOOM carries there is the layer norm's output, not the stream),
  crashes on opt with ``project_in`` (``hook_embed`` is the 32-wide embedding before
  ``project_in``, ``hook_pos_embed`` is 64 wide: ``RuntimeError`` from ``torch.stack``), and on the
  post-LN bert and roberta sums raw sublayer outputs that the later norms rescale (it does not sum
  to the final residual). On plain bloom it is right: TransformerLens 4.3 hooks the inner
  ``dense`` outputs, not the modules that add the residual.

Every architecture of ``TINY_ARCHS`` gets the per-head parity check except the one that crashes at
boot, which gets a check of streamtap against the Hugging Face model instead; none is skipped.
"""

from __future__ import annotations

import fnmatch
import functools
import types

import numpy as np
import pytest
import torch
import zarr

import streamtap as st
from streamtap.models import TINY_ARCHS, tiny_model

from _peers import tl_available, tl_bridge, tl_run_with_cache, tl_stack_head_results
from _util import padded_batch, run

pytestmark = pytest.mark.skipif(not tl_available(), reason="transformer-lens is a test dependency")

TOL = 1e-5
LENGTHS = [10, 6, 3]  # right-padded, unequal lengths

# TransformerLens fires hook_result for these (set_use_attn_result(True) works).
HOOK_RESULT = (
    "gpt2", "gpt_bigcode", "llama", "llama-bias", "mistral", "qwen2", "qwen3", "gemma", "stablelm",
    "stablelm-parallel", "olmo", "bloom", "bloom-post-ln-residual", "gpt_neox", "gpt_neox-sequential",
    "phi", "falcon", "gemma2", "gemma3", "olmo2", "mixtral", "qwen2_moe",
)
# set_use_attn_result(True) raises NotImplementedError; per-head results come from hook_z @ W_O.
HOOK_Z_ONLY = ("gpt_neo", "gptj", "opt", "opt-post-ln", "bert", "roberta")
# TransformerBridge.boot_transformers raises (documented exception type).
BOOT_CRASH = {"falcon-new": RuntimeError,
              # no TransformerLens architecture for these model types ("Could not determine supported architecture")
              "phimoe": ValueError, "dots1": ValueError, "hunyuan_v1_moe": ValueError}
# Sublayer outputs pass through a norm before they enter the stream.
POST_SUBLAYER_NORM = ("gemma2", "gemma3", "olmo2")
# The stream itself passes through later norms (post-LN).
POST_LN = ("opt-post-ln", "bert", "roberta")

# Every tiny architecture TransformerLens can boot gets the parity check, including any added to
# TINY_ARCHS after this list was written (it then uses whichever hook TransformerLens offers).
PARITY = tuple(arch for arch in TINY_ARCHS if arch not in BOOT_CRASH)

# Hugging Face module paths (plain torch hooks) for the checks against the model itself.
O_PROJ = {  # output projection of attention (an nn.Linear): its input is z, its weight.T is W_O
    "gemma2": "model.layers.{l}.self_attn.o_proj",
    "gemma3": "model.layers.{l}.self_attn.o_proj",
    "olmo2": "model.layers.{l}.self_attn.o_proj",
    "bloom": "transformer.h.{l}.self_attention.dense",
    "bloom-post-ln-residual": "transformer.h.{l}.self_attention.dense",
    "opt": "model.decoder.layers.{l}.self_attn.out_proj",
    "opt-post-ln": "model.decoder.layers.{l}.self_attn.out_proj",
    "bert": "bert.encoder.layer.{l}.attention.output.dense",
    "roberta": "roberta.encoder.layer.{l}.attention.output.dense",
    "falcon-new": "transformer.h.{l}.self_attention.dense",
    **{arch: "model.layers.{l}.self_attn.o_proj" for arch in ("phimoe", "dots1", "hunyuan_v1_moe")},
}
RESID_FINAL_INPUT_OF = {  # the module whose input is the final residual
    "bloom": "transformer.ln_f",
    "bloom-post-ln-residual": "transformer.ln_f",
    "opt": "model.decoder.final_layer_norm",
    "falcon-new": "transformer.ln_f",
    "phimoe": "model.norm", "dots1": "model.norm", "hunyuan_v1_moe": "model.norm",
}
POST_ATTN_NORM = "model.layers.{l}.post_attention_layernorm"  # gemma2, gemma3, olmo2


# -- helpers ---------------------------------------------------------------------------------------
def rel(ours, theirs) -> float:
    """max |ours - theirs| / max |theirs|."""
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


def note(record_property, **numbers) -> None:
    """Put measured numbers into the test report (junit properties) and stdout (``-s``)."""
    for key, value in numbers.items():
        record_property(key, value)
    print(" ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in numbers.items()))


def attempt(fn):
    """``(value, None)`` or ``(None, exception)``: what TransformerLens did, without failing here."""
    try:
        return fn(), None
    except Exception as exc:  # noqa: BLE001 - recording TransformerLens's failure is the point
        return None, exc


def hf_io(model, ids, mask, *, inputs=(), outputs=()):
    """One plain forward with torch hooks: ``{path: first input}``, ``{path: output}``, float64 numpy."""
    got_in, got_out, handles = {}, {}, []

    def first(x):
        return (x[0] if isinstance(x, (tuple, list)) else x).detach().to(torch.float64).numpy()

    for path in inputs:
        handles.append(model.get_submodule(path).register_forward_pre_hook(
            lambda _m, args, path=path: got_in.__setitem__(path, first(args))))
    for path in outputs:
        handles.append(model.get_submodule(path).register_forward_hook(
            lambda _m, _a, out, path=path: got_out.__setitem__(path, first(out))))
    try:
        run(model, ids, mask)
    finally:
        for handle in handles:
            handle.remove()
    return got_in, got_out


def hf_messages(model, arch, ids, mask) -> np.ndarray:
    """Ground truth from the HF model: each head's slice of the output projection's input times its
    rows of W_O, (token, layer, head, d_model) over real tokens."""
    cfg = model.config
    n_layers = cfg.num_hidden_layers
    paths = [O_PROJ[arch].format(l=l) for l in range(n_layers)]
    z, _ = hf_io(model, ids, mask, inputs=paths)
    real = mask.bool().numpy()
    out = []
    for path in paths:
        linear = model.get_submodule(path)
        w_o = linear.weight.detach().to(torch.float64).numpy().T  # (n_heads * d_head, d_model)
        n_heads = cfg.num_attention_heads
        zz = z[path][real].reshape(-1, n_heads, w_o.shape[0] // n_heads)
        out.append(np.einsum("thd,hdm->thm", zz, w_o.reshape(n_heads, -1, w_o.shape[1])))
    return np.stack(out, axis=1)


def layer_sum(terms, patterns) -> np.ndarray:
    """Sum of the decomposition's components whose labels match any of the glob ``patterns``."""
    labels = [str(c) for c in terms.component.values]
    chosen = [c for c in labels if any(fnmatch.fnmatchcase(c, p) for p in patterns)]
    assert chosen, patterns
    return terms.sel(component=chosen).values.astype(np.float64).sum(axis=0)


class Captured(types.SimpleNamespace):
    """One architecture's tiny model, batch and streamtap dataset; ``terms`` built on first use."""

    @functools.cached_property
    def terms(self):
        return st.decompose(self.ds, dtype=np.float64)


@pytest.fixture(scope="module")
def captured():
    """``captured(arch)``: the tiny model, the batch and streamtap's dataset (in a zarr MemoryStore:
    faster than disk here), made once per module."""
    memo: dict[str, Captured] = {}

    def get(arch: str) -> Captured:
        if arch not in memo:
            model = tiny_model(arch)
            ids, mask = padded_batch(model.config.vocab_size, LENGTHS, seed=11)
            store = zarr.storage.MemoryStore()
            with st.tap(model, store):
                run(model, ids, mask)
            ds = st.open(store)
            memo[arch] = Captured(arch=arch, model=model, ids=ids, mask=mask, real=mask.bool().numpy(),
                                  ds=ds, n_layers=model.config.num_hidden_layers)
        return memo[arch]

    return get


@pytest.fixture(scope="module")
def tl_heads(captured):
    """``tl_heads(arch)``: ``(hook used, exception set_use_attn_result raised or None, per-head results
    over real tokens (token, layer, head, d_model))``, once per module.

    ``hook_result`` where TransformerLens can fire it; otherwise its own fallback,
    ``compute_head_results()`` on cached ``hook_z`` (z times the bridge's ``W_O``).
    """
    memo: dict[str, tuple] = {}

    def get(arch: str) -> tuple:
        if arch not in memo:
            c = captured(arch)
            bridge = tl_bridge(c.model, attn_result=False)
            _, refused = attempt(lambda: bridge.set_use_attn_result(True))
            if refused is not None:
                bridge.set_use_attn_result(False)
            hook = "hook_z" if refused is not None else "hook_result"
            names = [f"blocks.{l}.attn.{hook}" for l in range(c.n_layers)]
            _, cache = tl_run_with_cache(c.model, c.ids, c.mask, names_filter=names, bridge=bridge)
            memo[arch] = (hook, refused, tl_stack_head_results(cache)[c.real])
        return memo[arch]

    return get


def assert_decomposition_exact(c) -> float:
    """streamtap's components sum to its resid_final within TOL relative; returns the error."""
    err = rel(c.terms.sum("component").values, c.ds.resid_final.values.astype(np.float64))
    assert err <= TOL, err
    return err


def attn_components(c, layer: int, norm: str | None = None) -> np.ndarray:
    """Sum of streamtap's attention components of one layer (heads, bias, the norm's beta if any)."""
    patterns = [f"L{layer}H*", f"L{layer}_attn_bias"]
    if norm:
        patterns.append(f"{layer}.{norm}_beta")
    return layer_sum(c.terms, patterns)


# -- 1. per-head parity where TransformerLens has per-head results ---------------------------------
@pytest.mark.parametrize("arch", PARITY)
def test_messages_equal_transformerlens(arch, captured, tl_heads, record_property):
    """``ds.head_output`` == TransformerLens's per-head results, real tokens of a right-padded batch.

    ``hook_result`` where TransformerLens 4.3 fires it; where ``set_use_attn_result`` refuses
    (``NotImplementedError``: GPT-Neo, GPT-J, OPT, BERT, RoBERTa) its own fallback,
    ``compute_head_results()`` (cached ``hook_z`` @ ``W_O``).
    """
    hook, refused, theirs = tl_heads(arch)
    if arch in HOOK_RESULT:
        assert refused is None, refused
    if refused is not None:  # a later TransformerLens may support hook_result on the others
        assert isinstance(refused, NotImplementedError), refused
    c = captured(arch)
    ours = c.ds.head_output.values
    assert ours.shape == theirs.shape
    err = rel(ours, theirs)
    dec_err = assert_decomposition_exact(c)  # and the terms sum to the residual they were taken from
    note(record_property, arch=arch, tl=hook, hook_result_refused=type(refused).__name__, rel_diff=err,
         streamtap_decomposition=dec_err)
    assert err <= TOL


# -- 2. crashes at boot: streamtap exact against the HF model itself -------------------------------
@pytest.mark.parametrize("arch", sorted(BOOT_CRASH))
def test_boot_crash_streamtap_exact(arch, captured, record_property):
    c = captured(arch)
    msg_err = rel(c.ds.head_output.values, hf_messages(c.model, arch, c.ids, c.mask))
    final = RESID_FINAL_INPUT_OF[arch]
    hf_in, _ = hf_io(c.model, c.ids, c.mask, inputs=[final])
    resid_err = rel(c.ds.resid_final.values, hf_in[final][c.real])
    dec_err = assert_decomposition_exact(c)

    bridge, crash = attempt(lambda: tl_bridge(c.model))
    if crash is None:  # fixed upstream: then it must agree like any other architecture
        names = [f"blocks.{l}.attn.hook_result" for l in range(c.n_layers)]
        _, cache = tl_run_with_cache(c.model, c.ids, c.mask, names_filter=names, bridge=bridge)
        assert rel(c.ds.head_output.values, tl_stack_head_results(cache)[c.real]) <= TOL
    else:
        assert isinstance(crash, BOOT_CRASH[arch]), crash
    note(record_property, arch=arch, tl_boot=type(crash).__name__ if crash else "ok",
         tl_error=str(crash).splitlines()[0] if crash else "", streamtap_messages_vs_hf=msg_err,
         streamtap_resid_final_vs_hf=resid_err, streamtap_decomposition=dec_err)
    assert msg_err <= TOL and resid_err <= TOL


# -- 3. post-sublayer norms (Gemma-2/3, OLMo-2): TL's per-head results are not what enters the stream
@pytest.mark.parametrize("arch", POST_SUBLAYER_NORM)
def test_post_sublayer_norm_transformerlens_misses_streamtap_exact(arch, captured, record_property):
    """What a layer's attention adds to the stream is post_attention_layernorm(Σ_h z_h W_O_h + b_O).

    TransformerLens's per-head results (summed over heads, plus b_O) are the norm's *input*, so they
    miss what enters the stream. There is no norm on the stream itself in these models, so
    streamtap's ``L{l}H*`` + ``L{l}_attn_bias`` (+ the norm's beta, if it had one) components, which
    are each head's contribution as it arrives in the final residual, must sum to the norm's output.
    """
    c = captured(arch)
    norms = [POST_ATTN_NORM.format(l=l) for l in range(c.n_layers)]
    _, post = hf_io(c.model, c.ids, c.mask, outputs=norms)
    _, cache = tl_run_with_cache(c.model, c.ids, c.mask, attn_result=True)
    results = tl_stack_head_results(cache)[c.real]  # (token, layer, head, d_model), raw z @ W_O
    for l, norm in enumerate(norms):
        want = post[norm][c.real]
        bias = c.model.get_submodule(O_PROJ[arch].format(l=l)).bias
        tl_sum = results[:, l].sum(axis=1) + (0.0 if bias is None else bias.detach().double().numpy())
        tl_miss = float(np.abs(tl_sum - want).max())
        # TransformerLens's layer-level attn_out is hooked after the norm (ln1_post) and is right
        tl_attn_out = rel(cache[f"blocks.{l}.hook_attn_out"].detach().double().numpy()[c.real], want)
        ours = rel(attn_components(c, l, "post_attention_layernorm"), want)
        note(record_property, arch=arch, layer=l, tl_heads_miss_abs=tl_miss,
             tl_heads_miss_rel=tl_miss / float(np.abs(want).max()), tl_attn_out_rel=tl_attn_out,
             streamtap_rel=ours)
        assert tl_miss > 0.1, tl_miss  # documented: per-head results are pre-norm
        assert ours <= TOL, ours
    assert_decomposition_exact(c)


# -- 4. BLOOM: sublayers add the residual inside their forward -------------------------------------
@pytest.mark.parametrize("arch", ["bloom", "bloom-post-ln-residual"])
def test_bloom_decompose_resid(arch, captured, record_property):
    """TransformerLens's ``decompose_resid`` on BLOOM, and streamtap exact on the same weights.

    BloomAttention / BloomMLP return ``residual + term``, so a hook on the module's output holds the
    residual too. TransformerLens 4.3 points ``hook_attn_out`` / ``hook_mlp_out`` at the inner
    ``dense`` / ``dense_4h_to_h`` outputs, which makes ``decompose_resid`` right on plain BLOOM; with
    ``apply_residual_connection_post_layernorm`` the residual is the input norm's output, the stream is
    not ``embed + Σ outputs``, and ``decompose_resid`` misses the residual by more than its size.
    Recorded, not asserted, so that a fixed TransformerLens still passes.
    """
    c = captured(arch)
    dense = [O_PROJ[arch].format(l=l) for l in range(c.n_layers)]
    modules = [f"transformer.h.{l}.self_attention" for l in range(c.n_layers)]
    final = RESID_FINAL_INPUT_OF[arch]
    hf_in, hf_out = hf_io(c.model, c.ids, c.mask, inputs=[final, *dense], outputs=dense + modules)
    resid_final = hf_in[final][c.real]

    _, cache = tl_run_with_cache(c.model, c.ids, c.mask)
    tl_sum = cache.decompose_resid().detach().double().numpy().sum(axis=0)[c.real]
    tl_miss = float(np.abs(tl_sum - resid_final).max())
    tl_attn_out = max(rel(cache[f"blocks.{l}.hook_attn_out"].detach().numpy()[c.real], hf_out[d][c.real])
                      for l, d in enumerate(dense))
    # what a hook on the attention module's own output holds: dense + residual
    module_out_vs_dense = max(rel(hf_out[m][c.real], hf_out[d][c.real]) for m, d in zip(modules, dense))

    dec_err = assert_decomposition_exact(c)
    resid_err = rel(c.ds.resid_final.values, resid_final)
    msg_err = rel(c.ds.head_output.values, hf_messages(c.model, arch, c.ids, c.mask))
    # no norm on the stream in plain BLOOM: a layer's attention components sum to its dense output
    layer_err = (max(rel(attn_components(c, l), hf_out[d][c.real]) for l, d in enumerate(dense))
                 if arch == "bloom" else float("nan"))
    note(record_property, arch=arch, tl_decompose_resid_miss_abs=tl_miss,
         tl_decompose_resid_miss_rel=tl_miss / float(np.abs(resid_final).max()),
         tl_attn_out_vs_dense_rel=tl_attn_out, module_output_vs_dense_rel=module_out_vs_dense,
         streamtap_decomposition=dec_err, streamtap_resid_final_vs_hf=resid_err,
         streamtap_messages_vs_hf=msg_err, streamtap_layer_attn_vs_dense=layer_err)
    assert resid_err <= TOL and msg_err <= TOL
    assert module_out_vs_dense > 0.1  # the module output really does carry the residual
    if arch == "bloom":
        assert layer_err <= TOL, layer_err


# -- 5. OPT with project_in (word_embed_proj_dim 32 != hidden_size 64) -----------------------------
def test_opt_project_in(captured, tl_heads, record_property):
    """TransformerLens's per-head results are right on OPT (via hook_z), but ``decompose_resid``
    crashes: ``hook_embed`` is the 32-wide embedding before ``project_in`` and ``hook_pos_embed`` is 64
    wide. streamtap's ``embed`` is the projected embedding, and everything is exact."""
    arch = "opt"
    c = captured(arch)
    assert c.model.config.word_embed_proj_dim != c.model.config.hidden_size
    final = RESID_FINAL_INPUT_OF[arch]
    embeds = ["model.decoder.project_in", "model.decoder.embed_positions"]
    hf_in, hf_out = hf_io(c.model, c.ids, c.mask, inputs=[final], outputs=embeds)
    embed_err = rel(c.ds.embed.values, hf_out["model.decoder.project_in"][c.real])
    pos_err = rel(c.ds.pos_embed.values, hf_out["model.decoder.embed_positions"][c.real])
    resid_err = rel(c.ds.resid_final.values, hf_in[final][c.real])
    msg_err = rel(c.ds.head_output.values, hf_messages(c.model, arch, c.ids, c.mask))
    dec_err = assert_decomposition_exact(c)
    _, _, tl_results = tl_heads(arch)
    tl_heads_err = rel(c.ds.head_output.values, tl_results)

    _, cache = tl_run_with_cache(c.model, c.ids, c.mask)
    embed_width = int(cache["hook_embed"].shape[-1])
    comps, crash = attempt(lambda: cache.decompose_resid())
    if crash is None:  # fixed upstream: record how close it is
        tl_miss = rel(comps.detach().double().numpy().sum(axis=0)[c.real], hf_in[final][c.real])
    else:
        assert isinstance(crash, RuntimeError), crash
        tl_miss = float("nan")
    note(record_property, arch=arch, tl_hook_embed_width=embed_width,
         tl_decompose_resid=type(crash).__name__ if crash else "ok",
         tl_error=str(crash).splitlines()[0] if crash else "", tl_decompose_resid_rel=tl_miss,
         tl_heads_vs_streamtap=tl_heads_err, streamtap_embed_vs_project_in=embed_err,
         streamtap_pos_embed_vs_hf=pos_err, streamtap_messages_vs_hf=msg_err,
         streamtap_resid_final_vs_hf=resid_err, streamtap_decomposition=dec_err)
    assert max(embed_err, pos_err, resid_err, msg_err, tl_heads_err) <= TOL


# -- 6. post-LN models: raw per-head results are comparable, residual contributions are not --------
@pytest.mark.parametrize("arch", POST_LN)
def test_post_ln(arch, captured, tl_heads, record_property):
    """On post-LN models the stream passes through every later norm, so what a head adds to the final
    residual (streamtap's ``L{l}H{h}`` in ``st.decompose``, through the frozen norms) is not its raw
    result. The raw results are comparable and equal (``ds.head_output``); TransformerLens's
    ``decompose_resid`` (raw sublayer outputs) does not sum to the final residual. On opt-post-ln,
    ``run_with_cache`` with every hook crashes in TransformerLens 4.3 (``ValueError``)."""
    c = captured(arch)
    _, _, raw = tl_heads(arch)
    raw_err = rel(c.ds.head_output.values, raw)
    arrival = np.stack([np.stack([c.terms.sel(component=f"L{l}H{h}").values for h in range(raw.shape[2])],
                                 axis=1) for l in range(c.n_layers)], axis=1)
    raw_vs_arrival = float(np.abs(raw - arrival).max())
    dec_err = assert_decomposition_exact(c)

    run_all, crash = attempt(lambda: tl_run_with_cache(c.model, c.ids, c.mask))
    if crash is None:
        comps = run_all[1].decompose_resid().detach().double().numpy().sum(axis=0)[c.real]
        tl_miss = float(np.abs(comps - c.ds.resid_final.values).max())
    else:
        assert arch == "opt-post-ln" and isinstance(crash, ValueError), crash
        tl_miss = float("nan")
    note(record_property, arch=arch, tl_raw_heads_vs_messages=raw_err,
         raw_vs_arrival_abs=raw_vs_arrival, tl_run_with_cache_all=type(crash).__name__ if crash else "ok",
         tl_decompose_resid_miss_abs=tl_miss, streamtap_decomposition=dec_err)
    assert raw_err <= TOL
    assert raw_vs_arrival > 0.1  # the later norms change each head's contribution
