"""The architectures page's "Patterns" table: attention recomputed from a store against the model's own.

    python benchmarks/pattern_exactness.py [--archs gpt2,llama] [--seeds 3] [--no-variants] [--with-smollm2]

For every tiny architecture, and for variants that switch on what the defaults leave off (sliding
windows, a second rope group, a q/k clip, q/k norms, a strong soft-cap), each dtype, seeds 0..N-1,
a padded batch (lengths 11, 6, 3; right padding, and left padding for decoders), eager attention:

- pattern: max |st.analysis.attention(ds, row) - output_attentions| over every row, layer, head,
  query and key (absolute, on probabilities), the model's probabilities in the capture's dtype;
- second invariant: max over tokens, layers and heads of streamtap.attention.output_errors (each
  head's stored output against sum_j A[i,j] v_j, relative to the magnitude rounding acts on:
  streamtap.attention.output_scale, docs/design.md "The second invariant's tolerance").

The bound in parentheses is the invariant's, st.tolerance (1e-5 in float32, (3L+1)u in half
precision). With --with-smollm2 the real model's patterns on the bundled sample (captured with SDPA,
as it loads) are compared with a separately loaded eager copy, sequence by sequence.

float16 stores are read with their derived ``head_output`` dropped (``ds.drop_vars("head_output")``):
``st.analysis.attention`` on a float16 store otherwise fails inside dask (a library bug, recorded as a
strict xfail in tests/integration/test_patterns.py); the pattern does not read that variable.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
import zarr

import streamtap as st
import streamtap.attention
from streamtap.models import load_model, tiny_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _util import padded_batch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from exactness import arch_arguments, parse_archs  # noqa: E402

DTYPES = ("float32", "bfloat16", "float16")
ENCODERS = {"bert", "roberta"}
VARIANTS = [  # (label, arch, config overrides)
    ("mistral, sliding_window=3", "mistral", {"sliding_window": 3}),
    ("qwen2, sliding_window=3 on layer 1", "qwen2", {"use_sliding_window": True, "sliding_window": 3,
                                                      "max_window_layers": 1}),
    ("mixtral, sliding_window=3", "mixtral", {"sliding_window": 3}),
    ("gpt_neo, window_size=2", "gpt_neo", {"window_size": 2}),
    ("gemma2, sliding_window=3", "gemma2", {"sliding_window": 3}),
    ("gemma2, attn_logit_softcapping=1", "gemma2", {"attn_logit_softcapping": 1.0}),
    ("gemma3, local + global layers, sliding_window=3", "gemma3",
     {"layer_types": ["sliding_attention", "full_attention"], "sliding_window": 3}),
    ("olmo, clip_qkv=0.5", "olmo", {"clip_qkv": 0.5}),
    ("stablelm, qk_layernorm", "stablelm", {"qk_layernorm": True}),
    ("phi, qk_layernorm", "phi", {"qk_layernorm": True}),
]


def made_of(ds) -> str:
    """What the store says a pattern is made of (its layout's attributes)."""
    a = ds.attrs
    parts = []
    if "rotary_cos" in ds:
        width, d_head = ds.sizes["rotary_dim"], a["d_head"]
        width = 2 * width if a.get("rotary_style") == "interleaved" else width
        ropes = ds.sizes["rope"]
        parts.append(f"rotary {a.get('rotary_style')} {width}/{d_head}" + (f", {ropes} ropes" if ropes > 1 else ""))
    elif "alibi" in ds:
        parts.append("ALiBi")
    elif "pos_embed" in ds:
        parts.append("learned positions")
    windows = [w for w in a.get("attn_window") or [] if w]
    if windows:
        parts.append("window " + "/".join(str(w) if w else "-" for w in a["attn_window"]))
    if a.get("attn_softcap"):
        parts.append(f"soft-cap {a['attn_softcap']:g}")
    if a.get("qkv_clip"):
        parts.append(f"clip {a['qkv_clip']:g}")
    if "q_norm_weight" in ds:
        parts.append(f"q/k {a['qk_norm_kind']} ({a['qk_norm_scope']})")
    if "kv_head" in ds.dims and ds.sizes["kv_head"] != ds.sizes["head"]:
        parts.append(f"{ds.sizes['head']}q/{ds.sizes['kv_head']}kv heads")
    if not a.get("causal", True):
        parts.append("bidirectional")
    return ", ".join(parts)


def measure(arch: str, overrides: dict, dtype: str, seed: int):
    """(max pattern error, max second-invariant error, bound, store) over the padding sides."""
    pattern, output, ds = 0.0, 0.0, None
    for side in ("right",) if arch in ENCODERS else ("right", "left"):
        model = tiny_model(arch, dtype=dtype, seed=seed, **overrides)  # fresh: a tapped model records attentions twice
        ids, mask = padded_batch(model.config.vocab_size, [11, 6, 3], seed=seed + 1, side=side)
        store = zarr.storage.MemoryStore()
        with st.tap(model, store, patterns=True), torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, output_attentions=True)
        ds = st.open(store)
        view = ds.drop_vars("head_output") if dtype == "float16" else ds
        for row in range(ids.shape[0]):
            real = mask[row].bool()
            ref = torch.stack([a[row] for a in out.attentions]).float()[:, :, real][:, :, :, real].double().numpy()
            pattern = max(pattern, float(np.abs(st.analysis.attention(view, row).values - ref).max()))
            output = max(output, float(streamtap.attention.output_errors(ds, row).max()))
    return pattern, output, st.tolerance(ds), ds


def row(label: str, arch: str, overrides: dict, seeds: int) -> str:
    patterns, outputs, ds32 = [], [], None
    for dtype in DTYPES:
        worst_p = worst_o = 0.0
        for seed in range(seeds):
            p, o, bound, ds = measure(arch, overrides, dtype, seed)
            worst_p, worst_o = max(worst_p, p), max(worst_o, o)
            ds32 = ds32 or ds
        patterns.append(cell(worst_p, bound))
        outputs.append(cell(worst_o, bound))
    return f"| {label} | {made_of(ds32)} | " + " | ".join(patterns + outputs) + " |"


def cell(value: float, bound: float) -> str:
    return f"{value:.1e} (≤ {bound:.1e})" + ("" if value <= bound else " **over**")


def smollm2_row() -> str:
    texts = [t for t in (Path(st.__file__).parent / "data" / "sample.txt").read_text().splitlines() if t.strip()]
    patterns, outputs, n_tokens = [], [], 0
    for dtype in DTYPES:
        model, tok = load_model("smollm2", dtype=dtype)
        store = zarr.storage.MemoryStore()
        st.capture(model, texts, store, tokenizer=tok, batch_size=8, patterns=True)
        del model
        eager, _ = load_model("smollm2", dtype=dtype, attn_implementation="eager")
        ds = st.open(store)
        view = ds.drop_vars("head_output") if dtype == "float16" else ds
        worst_p = worst_o = 0.0
        for seq in np.unique(ds.seq.values):
            A = st.analysis.attention(view, int(seq))
            with torch.no_grad():
                out = eager(input_ids=torch.tensor([A.query_token_id.values.tolist()]), output_attentions=True)
            ref = torch.stack([a[0] for a in out.attentions]).float().double().numpy()
            worst_p = max(worst_p, float(np.abs(A.values - ref).max()))
            worst_o = max(worst_o, float(streamtap.attention.output_errors(ds, int(seq)).max()))
        n_tokens = ds.sizes["token"]
        patterns.append(cell(worst_p, st.tolerance(ds)))
        outputs.append(cell(worst_o, st.tolerance(ds)))
    return (f"| SmolLM2-135M (real, {n_tokens} tokens, captured with SDPA) | rotary half 64/64, 9q/3kv heads | "
            + " | ".join(patterns + outputs) + " |")


def main() -> None:
    parser = arch_arguments(__doc__)
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 of the weights and the batch")
    parser.add_argument("--no-variants", action="store_true", help="leave out the variants (sliding windows, ...)")
    args, archs = parse_archs(parser)
    print("| architecture | pattern made of | pattern float32 | pattern bfloat16 | pattern float16 "
          "| second invariant float32 | second invariant bfloat16 | second invariant float16 |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for arch in archs:
        print(row(arch, arch, {}, args.seeds), flush=True)
    if not args.no_variants:
        for label, arch, overrides in VARIANTS:
            print(row(label, arch, overrides, args.seeds), flush=True)
    if args.with_smollm2:
        print(smollm2_row(), flush=True)


if __name__ == "__main__":
    main()
