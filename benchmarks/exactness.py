"""The README's architectures table: measured decomposition error per layout and dtype.

    python benchmarks/exactness.py [--archs gpt2,llama] [--with-smollm2]

For every tiny architecture, on a padded batch (lengths 11, 6, 3), eager and SDPA attention,
seeds 0-2: the max over tokens of max|sum of terms - resid_final| / max|resid_final|, and the
bound streamtap.verify applies. With --with-smollm2 the real model is measured on the bundled
sample too.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import zarr

import streamtap as st
from streamtap.models import TINY_ARCHS, load_model, tiny_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _util import attention_implementations, padded_batch, run  # noqa: E402

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _error(model, ids, mask):
    store = zarr.storage.MemoryStore()
    with st.tap(model, store):
        run(model, ids, mask)
    ds = st.open(store)
    return st.verify(ds, raise_on_error=False).attrs["max_rel_error"], ds


def tiny_rows(archs=TINY_ARCHS):
    for arch in archs:
        cells = []
        for dtype in DTYPES:
            worst, ds = 0.0, None
            for attn in attention_implementations(arch):
                for seed in range(3):
                    model = tiny_model(arch, dtype=dtype, seed=seed, attn_implementation=attn)
                    ids, mask = padded_batch(model.config.vocab_size, [11, 6, 3], seed=seed + 1)
                    err, ds = _error(model, ids, mask)
                    worst = max(worst, err)
            cells.append(f"{worst:.1e} (≤ {st.tolerance(ds):.1e})")
        attn = "eager, sdpa" if len(attention_implementations(arch)) == 2 else "eager (no sdpa in transformers)"
        yield f"| {arch} | {ds.attrs['layout']} | {terms_per_layer(ds)} | {attn} | " + " | ".join(cells) + " |"


def terms_per_layer(ds) -> str:
    """What one layer contributes, read off the decomposition (layer 0)."""
    terms = st.decompose(ds)
    kinds = list(terms.kind.values[terms.layer.values == 0])
    names = {"head": "heads", "attn_bias": "attn bias", "mlp": "MLP", "expert": "experts",
             "shared_expert": "shared expert", "norm_beta": "norm betas"}
    parts = [f"{kinds.count(k)} {names.get(k, k)}" if kinds.count(k) > 1 else names.get(k, k)
             for k in dict.fromkeys(kinds)]
    return " + ".join(parts)


def smollm2_row():
    texts = [t for t in (Path(st.__file__).parent / "data" / "sample.txt").read_text().splitlines() if t.strip()]
    cells = []
    for dtype in ("float32", "bfloat16", "float16"):
        model, tok = load_model("smollm2", dtype=dtype)
        store = zarr.storage.MemoryStore()
        st.capture(model, texts, store, tokenizer=tok, batch_size=8)
        ds = st.open(store)
        err = st.verify(ds, raise_on_error=False).attrs["max_rel_error"]
        cells.append(f"{err:.1e} (≤ {st.tolerance(ds):.1e})")
    return f"| SmolLM2-135M (real, {ds.sizes['token']} tokens) | llama | {terms_per_layer(ds)} | sdpa | " + " | ".join(cells) + " |"


def arch_arguments(doc: str) -> argparse.ArgumentParser:
    """The options of an exactness table: which tiny architectures, and whether the real SmolLM2 too."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--archs", default=",".join(TINY_ARCHS),
                        help=f"comma-separated tiny architectures (default: all of {', '.join(TINY_ARCHS)})")
    parser.add_argument("--with-smollm2", action="store_true")
    return parser


def parse_archs(parser: argparse.ArgumentParser) -> tuple[argparse.Namespace, list[str]]:
    """The arguments and the architectures asked for; an unknown one is refused by name."""
    args = parser.parse_args()
    archs = args.archs.split(",") if args.archs else []
    unknown = sorted(set(archs) - set(TINY_ARCHS))
    if unknown:
        parser.error(f"--archs: unknown {', '.join(unknown)}; choose from {', '.join(TINY_ARCHS)}")
    return args, archs


def main() -> None:
    args, archs = parse_archs(arch_arguments(__doc__))
    print("| architecture | layout | terms per layer | attention | float32 | bfloat16 | float16 |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for row in tiny_rows(archs):
        print(row, flush=True)
    if args.with_smollm2:
        print(smollm2_row())


if __name__ == "__main__":
    main()
