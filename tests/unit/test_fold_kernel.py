"""The compiled CPU fold of summaries (``streamtap.tapping.fold_kernel``) against numpy: every bucket
exactly ``bucket_index``'s (values on and next to every edge), statistics and top-k as numpy computes
them over all the batches, whatever the threads. A device's buckets (the signed edges at or below a
value) are ``bucket_index``'s too."""

import numpy as np
import pytest
import torch

from streamtap.io.summaries import Settings, bucket_edges, bucket_index, empty_state, signed_edges
from streamtap.tapping import fold_kernel

SETTINGS = [Settings(), Settings(alpha=0.001), Settings(alpha=0.3, low=1e-2, high=10.0),
            Settings(alpha=1e-5, low=0.5, high=2.0)]


def test_numba_is_installed_where_the_suite_runs():
    assert fold_kernel.AVAILABLE, "numba is part of the test extra: the compiled fold must be tested"


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: f"alpha={s.alpha}")
def test_bucket_edges_are_where_bucket_index_steps(settings):
    edges, n = bucket_edges(settings), settings.n_side
    assert edges[0] == 0 and (np.diff(edges) > 0).all()
    assert (bucket_index(edges, settings) - n == np.arange(n + 1)).all()
    assert (bucket_index(np.nextafter(edges[1:], 0), settings) - n == np.arange(n)).all()


def _context(first: int, n: int, window: int):
    """Tokens ``first .. first + n`` of a corpus as their own sequence numbers (position: the token's
    row in its batch), each window the token numbers either side."""
    t = np.arange(first, first + n)
    return t, t - first, t[:, None] + np.arange(-window, window + 1)


def _near_every_edge(settings, dtype):
    """Each edge in ``dtype`` and its three neighbours either side, both signs, and the odd ones."""
    base = bucket_edges(settings)[1:].astype(dtype)
    values = [base]
    for direction in (np.inf, 0):
        v = base
        for _ in range(3):
            v = np.nextafter(v, dtype(direction))
            values.append(v)
    v = np.concatenate(values)
    odd = np.array([0.0, -0.0, np.inf, -np.inf, 1e-40, 3e38, -3e38], dtype)
    return np.concatenate([v, -v, odd])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: f"alpha={s.alpha}")
def test_the_signed_edges_at_or_below_a_value_count_to_its_bucket(settings, dtype):
    """How a device buckets (``torch.bucketize`` on the signed edges), and numpy's twin of it."""
    x = _near_every_edge(settings, dtype)
    edges = signed_edges(settings, dtype)
    assert edges.dtype == dtype and len(edges) == 2 * settings.n_side and (np.diff(edges) > 0).all()
    expect = bucket_index(x.astype(np.float64), settings)
    np.testing.assert_array_equal(np.searchsorted(edges, x, side="right"), expect)
    got = torch.bucketize(torch.from_numpy(x), torch.from_numpy(edges), right=True)
    np.testing.assert_array_equal(got.numpy(), expect)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: f"alpha={s.alpha}")
def test_every_value_lands_in_bucket_index_s_bucket(settings, dtype):
    x = _near_every_edge(settings, dtype)
    x = np.concatenate([x, np.zeros((-len(x)) % 7, dtype)]).reshape(-1, 7)
    state = empty_state(7, settings)
    fold_kernel.fold(np.ascontiguousarray(x), state, 0, settings, 2, _context(0, len(x), settings.window))
    expect = np.stack([np.bincount(bucket_index(x[:, c].astype(np.float64), settings), minlength=settings.n_buckets)
                       for c in range(7)])
    np.testing.assert_array_equal(state["hist"], expect)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_statistics_and_top_k_over_batches_equal_numpy_whatever_the_threads(dtype):
    rng = np.random.default_rng(0)
    settings = Settings(top_k=5)
    C = 3 * fold_kernel.BLOCK + 17                  # blocks split over threads, one partial
    x = (rng.standard_normal((3 * fold_kernel.TILE + 40, C)) * np.exp(rng.uniform(-8, 8, C))).astype(dtype)
    x[:, 5] = np.arange(len(x))                     # rising: every token takes a slot of the top-k
    x[:, 6] = 0.0
    cuts = [0, 7, 300, len(x)]                      # batches of a few tokens and of several tiles
    states = []
    for threads in (1, 2, 3):
        state = empty_state(C, settings)
        for a, b in zip(cuts, cuts[1:]):
            fold_kernel.fold(np.ascontiguousarray(x[a:b]), state, 0, settings, threads, _context(a, b - a, settings.window))
        states.append(state)
    for other in states[1:]:
        for name in states[0]:
            np.testing.assert_array_equal(other[name], states[0][name], err_msg=name)
    state, x64 = states[0], x.astype(np.float64)
    assert (state["count"] == len(x)).all()
    scale = np.abs(x64).max(0)     # a sum's rounding is relative to its terms, not to a mean near 0
    assert (np.abs(state["mean"] - x64.mean(0)) <= 1e-13 * scale).all()
    assert (np.abs(state["m2"] / len(x) - x64.var(0)) <= 1e-12 * scale ** 2).all()
    np.testing.assert_array_equal(state["min"], x64.min(0))
    np.testing.assert_array_equal(state["max"], x64.max(0))
    np.testing.assert_array_equal(np.sort(state["top_value"], axis=1)[:, ::-1], -np.sort(-x64, axis=0)[:5].T)
    # each kept slot holds the context of a token that has its value: sequence (the token's number),
    # position (its row in its batch) and window
    token = state["top_seq"]
    np.testing.assert_array_equal(x64[token, np.arange(C)[:, None]], state["top_value"])
    start = np.array(cuts)[np.searchsorted(cuts, token, side="right") - 1]
    np.testing.assert_array_equal(state["top_pos"], token - start)
    np.testing.assert_array_equal(state["top_window"], token[:, :, None] + np.arange(-settings.window, settings.window + 1))
    assert set(token[5]) == set(range(len(x) - 5, len(x)))   # the rising column: the last 5 tokens
    np.testing.assert_array_equal(state["hist"].sum(1), len(x))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_without_a_sketch_every_other_statistic_is_the_same(dtype):
    """A state with no buckets (neurons with ``neuron_quantiles=False``) skips the sketch only."""
    rng = np.random.default_rng(1)
    settings = Settings(top_k=4)
    x = (rng.standard_normal((fold_kernel.TILE + 9, fold_kernel.BLOCK + 3)) * 3).astype(dtype)
    with_sketch = empty_state(x.shape[1], settings, "neuron")
    without_settings = Settings(top_k=4, neuron_quantiles=False)
    without = empty_state(x.shape[1], without_settings, "neuron")
    assert without["hist"].shape == (x.shape[1], 0)
    for a, b in ((0, 100), (100, len(x))):
        for state, how in ((with_sketch, settings), (without, without_settings)):
            fold_kernel.fold(np.ascontiguousarray(x[a:b]), state, 0, how, 2, _context(a, b - a, settings.window))
    for name in with_sketch:
        if name != "hist":
            np.testing.assert_array_equal(without[name], with_sketch[name], err_msg=name)


def test_settings_below_float32_range_take_the_numpy_fold():
    assert fold_kernel.usable(Settings())
    assert not fold_kernel.usable(Settings(low=1e-40, high=1.0))


def test_without_a_writable_cache_the_kernel_compiles_in_process(monkeypatch):
    """numba refuses cache=True where it finds no writable cache directory (a read-only install): the
    kernel then compiles once per process instead of failing to import."""
    real = fold_kernel.numba.njit

    def njit(cache=False, **options):
        if cache:
            raise RuntimeError("cannot cache function 'f': no locator available for file 'f.py'")
        return real(**options)

    monkeypatch.setattr(fold_kernel.numba, "njit", njit)

    def double(x):
        return 2 * x

    assert fold_kernel._jit(double)(21) == 42
