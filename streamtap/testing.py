"""Test-suite assertions about streamtap stores.

``streamtap.verify`` is for people: it raises ``DecompositionError``, which a test runner shows as an
unexpected error in the code under test rather than as a check that failed. The helpers here raise
``AssertionError`` instead, with a message that names the worst sequences and positions, so a test
that captures something and asserts the invariant reads and fails like any other assertion.

They also differ from ``verify`` in two deliberate ways. Sums are taken in float64, so the check
measures the store and the model, not the checker's own rounding (which matters for the per-neuron
sum, thousands of terms per token). And a token whose error is NaN fails: NaN compares false with
every tolerance, so ``error > tol`` alone would let a store full of NaN pass.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import xarray as xr

from .dataset import open as _open_store
from .invariant import decompose, errors, token_errors, tolerance

__all__ = ["assert_terms_sum_to_residual"]

WHAT = "max |sum of terms - resid_final| / max |resid_final| per token"
SHOWN = 5  # worst tokens named in a message: enough to see a pattern, few enough to read


def assert_terms_sum_to_residual(ds_or_path, *, tol: float | None = None, neurons: bool = False,
                                 seq: int | Iterable[int] | None = None) -> xr.DataArray:
    """Assert the invariant on every stored token (or on the tokens of ``seq``).

    The terms of ``streamtap.decompose``, summed in float64, must equal ``resid_final`` within the
    tolerance at every token; a NaN error fails.

    Parameters
    ----------
    ds_or_path : xarray.Dataset, str, os.PathLike or zarr store
        What the test has at hand: an open Dataset, a path, or a zarr store.
    tol : float, optional
        Defaults to the store's own bound for its dtype (``streamtap.tolerance``); a test should
        only pass a tighter one, never loosen it to get green.
    neurons : bool
        Sum the per-neuron decomposition too, because it is built from other stored arrays
        (``neuron_act``, ``W_out``, ``mlp_bias``) than the per-MLP one and can be wrong while the
        latter is right.
    seq : int or iterable of int, optional
        Check only the tokens of these sequences.

    Returns
    -------
    xarray.DataArray
        The per-token relative errors (float64, coordinates ``seq``, ``pos``, ``abs_error``), so a
        test can make further claims about them; attributes ``tolerance``, ``max_rel_error`` and
        ``max_abs_error``.

    Raises
    ------
    AssertionError
        A token misses the tolerance (the message names the worst sequences and positions), the
        store holds no committed tokens, or a sequence in ``seq`` is not stored.
    """
    ds = ds_or_path if isinstance(ds_or_path, xr.Dataset) else _open_store(ds_or_path)
    if seq is not None:
        ds = select_sequences(ds, seq)
    if ds.sizes.get("token", 0) == 0:
        raise AssertionError("the store holds no committed tokens, so there is nothing to check; "
                             "was anything captured into it?")
    tol = tolerance(ds) if tol is None else float(tol)
    err = relative_errors(ds)
    problems = [msg for msg in (describe_misses(err, tol, "terms"),) if msg]
    if neurons:
        problems += [msg for msg in (describe_misses(neuron_relative_errors(ds), tol, "per-neuron terms"),) if msg]
    if problems:
        raise AssertionError("\n".join(problems))
    err.attrs.update(tolerance=tol, max_rel_error=float(err.max()), max_abs_error=float(err.abs_error.max()))
    return err


# -- pieces shared with the pytest plugin ---------------------------------------------------------
def select_sequences(ds: xr.Dataset, seq: int | Iterable[int]) -> xr.Dataset:
    """The tokens of the given sequences; asking for one the store lacks fails the assertion.

    A test that names a sequence expects it to have been captured, so a missing one is a failed
    expectation about the store, not a usage error.
    """
    wanted = np.asarray([seq] if isinstance(seq, (int, np.integer)) else list(seq), dtype=np.int64)
    stored = np.asarray(ds["seq"].values)
    missing = sorted(set(wanted.tolist()) - set(np.unique(stored).tolist()))
    if missing:
        have = np.unique(stored)
        span = f"sequences {have.min()}..{have.max()} ({have.size} in all)" if have.size else "no sequences"
        raise AssertionError(f"the store has no tokens for seq {missing}; it holds {span}")
    return ds.isel(token=np.flatnonzero(np.isin(stored, wanted)))


def relative_errors(ds: xr.Dataset) -> xr.DataArray:
    """Per-token errors of the per-head/per-MLP sum, computed in float64 (``streamtap.invariant.errors``)."""
    return errors(ds, dtype=np.float64).compute()


def neuron_relative_errors(ds: xr.Dataset) -> xr.DataArray:
    """Per-token errors of the per-neuron decomposition's sum, measured the way ``errors`` measures."""
    total = decompose(ds, neurons=True, dtype=np.float64).sum("component")
    return token_errors(total, ds["resid_final"].astype(np.float64)).compute()


def misses(rel: np.ndarray, tol: float) -> np.ndarray:
    """Tokens beyond the tolerance, NaN included (a NaN error is never within any bound)."""
    return ~(np.asarray(rel) <= tol)


def worst_first(rel: np.ndarray) -> np.ndarray:
    """Indices from the worst error down, NaN ahead of every number."""
    key = np.where(np.isnan(rel), np.inf, rel)
    return np.argsort(-key, kind="stable")


def describe_misses(err: xr.DataArray, tol: float, what: str) -> str | None:
    """One readable paragraph about the tokens that miss, or None when none does."""
    rel = np.asarray(err.values, dtype=np.float64)
    bad = misses(rel, tol)
    if not bad.any():
        return None
    seqs = np.asarray(err["seq"].values)
    pos = np.asarray(err["pos"].values)
    abs_err = np.asarray(err["abs_error"].values, dtype=np.float64)
    order = [i for i in worst_first(rel) if bad[i]]
    bad_seqs = np.unique(seqs[bad])
    seq_list = ", ".join(str(s) for s in bad_seqs[:10]) + (", ..." if bad_seqs.size > 10 else "")
    spots = "; ".join(f"seq {seqs[i]} pos {pos[i]}: rel {rel[i]:.3g} (abs {abs_err[i]:.3g})"
                      for i in order[:SHOWN])
    n_nan = int(np.isnan(rel).sum())
    nan_note = f" ({n_nan} of them NaN: non-finite values in the store)" if n_nan else ""
    return (f"{what} do not sum to resid_final: {int(bad.sum())} of {rel.size} tokens{nan_note} in "
            f"{bad_seqs.size} sequence(s) [{seq_list}] exceed tolerance {tol:g} ({WHAT}); "
            f"worst: {spots}. A term is missing or counted twice, or the store is damaged")
