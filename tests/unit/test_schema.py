"""The store's schema (streamtap.io.schema): dims of every variable, chunk sizes, the weights' fingerprint
and the dtypes on disk; no torch, no model."""

import math

import numpy as np
import pytest

from streamtap.io import schema
from streamtap.io.schema import (CHUNK_TARGET_BYTES, VARIABLES, StoreSpec, VariableSpec, dims_of, fill_value,
                                 fingerprint, per_token_names, static_chunks, storage_dtype)

# what a capture writes per token (docs/design.md, "The store"); derived ones are st.open's
WRITTEN_PER_TOKEN = ("embed", "pos_embed", "token_type_embed", "z", "mlp_out", "neuron_act", "norm_scale",
                     "expert_out", "expert_index", "shared_expert_out", "resid_final", "rotary_cos", "rotary_sin",
                     "alibi", "mixer_out")


def test_every_per_token_variable_a_capture_writes_has_dims():
    written = {n for n, v in VARIABLES.items() if v.per_token and not v.derived} - set(schema.SELECTIVE_PER_TOKEN)
    assert written == set(WRITTEN_PER_TOKEN)   # a default capture's schema; selective ones add rest/projections
    assert set(schema.SELECTIVE_PER_TOKEN) == {"rest", "projection", "projection_total", "projection_top_id"}
    assert set(per_token_names()) == written | {"head_output", "neuron_out"} | set(schema.SELECTIVE_PER_TOKEN)
    for name in WRITTEN_PER_TOKEN:
        dims = dims_of(name)
        assert dims and all(isinstance(d, str) and d for d in dims), name
        assert "token" not in dims, name  # dims after token
    assert dims_of("z") == ("layer", "head", "d_head")
    assert dims_of("norm_scale") == ("norm",)
    assert dims_of("some_new_embedding") == ("d_model",)  # a layout may name an embedding of its own
    # the reference, the frozen scales and integer indices are never stored lossy
    assert {n for n in VARIABLES if schema.is_exact_always(n)} == {"norm_scale", "expert_index", "resid_final",
                                                                 "rotary_cos", "rotary_sin", "alibi",
                                                                 "projection_total", "projection_top_id"}


def test_every_static_variable_has_dims_and_is_not_per_token():
    for name, var in VARIABLES.items():
        if not var.per_token:
            assert var.dims and not var.derived and "token" not in var.dims, name


def _spec(**variables):
    return StoreSpec({name: VariableSpec(tuple(tail), dtype) for name, (tail, dtype) in variables.items()},
                     static={}, attrs={}, with_text=False)


def test_chunk_tokens_stay_between_16_and_4096_and_near_4_mib_in_between():
    assert CHUNK_TARGET_BYTES == 4 << 20
    # a narrow store: 2 bytes a token would mean two million tokens a chunk
    assert _spec(resid_final=((1,), "float16")).chunk_tokens() == 4096
    # a huge token (16 MiB of z): never fewer than 16 tokens a chunk
    assert _spec(z=((1 << 22,), "float32")).chunk_tokens() == 16
    # 64 KiB a token: 4 MiB / 64 KiB = 64 tokens
    assert _spec(z=((4, 16, 256), "float32"), resid_final=((1024,), "float32")).chunk_tokens() == 64
    # SmolLM2's z in bfloat16: 30 * 9 * 64 * 2 = 34,560 bytes; 4 MiB of them is 121.4, the nearest power of two 128
    spec = _spec(z=((30, 9, 64), "bfloat16"), resid_final=((576,), "float32"))
    assert spec.chunk_tokens() == 128
    assert spec.chunks("z") == (128, 30, 9, 64) and spec.chunks("resid_final") == (128, 576)
    for width in (1, 3, 100, 1000, 12_345, 100_000, 1 << 20, 1 << 24):
        n = _spec(x=((width,), "float32")).chunk_tokens()
        assert 16 <= n <= 4096 and n & (n - 1) == 0, (width, n)
        if 16 < n < 4096:  # a power of two within a factor sqrt(2) of the target
            assert CHUNK_TARGET_BYTES / math.sqrt(2) <= n * width * 4 <= CHUNK_TARGET_BYTES * math.sqrt(2), width


def test_static_chunks_keep_small_weights_whole_and_split_big_ones_by_rows():
    small = np.zeros((4, 8, 16), np.float32)
    assert static_chunks(small) == small.shape
    big = np.zeros((49_152, 576), np.float32)  # SmolLM2's W_U: 108 MiB
    rows = static_chunks(big)
    assert rows[1:] == (576,) and rows[0] * 576 * 4 <= CHUNK_TARGET_BYTES and rows[0] == CHUNK_TARGET_BYTES // (576 * 4)


def test_fingerprint_changes_when_W_O_changes():
    rng = np.random.default_rng(0)
    static = {"W_O": (rng.normal(size=(2, 4, 8, 32)).astype(np.float32), "float32"),
              "attn_bias": (rng.normal(size=(2, 32)).astype(np.float32), "float32"),
              "mlp_bias": (rng.normal(size=(2, 32)).astype(np.float32), "float32")}
    first = fingerprint(static)
    assert len(first) == 32 and int(first, 16) >= 0
    same = {name: (data.copy(), dtype) for name, (data, dtype) in static.items()}
    assert fingerprint(same) == first
    fortran = dict(static, W_O=(np.asfortranarray(static["W_O"][0]), "float32"))  # same values, other layout
    assert fingerprint(fortran) == first
    changed = static["W_O"][0].copy()
    changed[1, 2, 3, 4] += 1e-3
    assert fingerprint(dict(static, W_O=(changed, "float32"))) != first
    assert fingerprint({k: v for k, v in static.items() if k != "mlp_bias"}) != first


def test_storage_dtypes():
    assert storage_dtype("bfloat16") == np.dtype("uint16")  # numpy has no bfloat16: its bits
    assert storage_dtype("float16") == np.float16 and storage_dtype("float32") == np.float32
    assert schema.itemsize("bfloat16") == 2 and schema.itemsize("float32") == 4
    assert schema.LOSSY_DTYPES == ("float16", "bfloat16")


@pytest.mark.parametrize("dtype, want", [("float32", "nan"), ("float16", "nan"), ("uint16", 0), ("int64", 0)])
def test_unwritten_capacity_never_reads_as_a_plausible_float(dtype, want):
    value = fill_value(np.dtype(dtype))
    assert (np.isnan(value) if want == "nan" else value == want)
