"""``truncation_map``: W_a X W_b is the Eckart-Young truncation of W_a W_b, checked against numpy's SVD of the
fused matrix itself, for every rank from one factorisation (``truncation_factors``)."""

import numpy as np

from streamtap.analysis.rank import truncation_factors, truncation_map


def test_truncation_map_gives_the_best_rank_r_approximation_at_every_rank():
    rng = np.random.default_rng(0)
    W_a, W_b = rng.standard_normal((48, 8)), rng.standard_normal((8, 40))
    u, s, vt = np.linalg.svd(W_a @ W_b)
    factors = truncation_factors(W_a, W_b)
    for r in range(1, 9):
        best = (u[:, :r] * s[:r]) @ vt[:r]
        for X in (truncation_map(W_a, W_b, r), truncation_map(W_a, W_b, r, factors)):
            assert np.allclose(W_a @ X @ W_b, best, rtol=0, atol=1e-10 * s[0])
    assert np.allclose(truncation_map(W_a, W_b, 8), np.eye(8), atol=1e-10)
