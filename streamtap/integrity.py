"""Whether a store is whole: what ``verify`` checks besides the sum.

A sum of terms that matches the residual says nothing about arrays the sum does not read (neuron
activations, per-expert outputs, token text), about token coordinates that came back as fill values
(a lost chunk reads as -1 ids, not as an error), or about sequences that went missing. So before a
store is trusted: every array its creation listed (attribute ``arrays``) is present and decodes over
the committed tokens, no token coordinate is a fill value, static weights are finite, and the number
of sequences matches the committed count. Each problem names the array and the token range.
"""

from __future__ import annotations

from dataclasses import dataclass

import dask.array as da
import numpy as np
import xarray as xr

from .io.schema import COMMITTED_SEQUENCES, COMMITTED_TOKENS, COORD_DTYPES, VARIABLES


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a store: which array, what, and where (first and last token index)."""

    array: str
    what: str
    tokens: tuple[int, int] | None = None
    span: str = ""           # the same tokens by sequence and position, where those can be read

    def __str__(self) -> str:
        where = f" (tokens {self.tokens[0]}..{self.tokens[1]}{', ' + self.span if self.span else ''})" if self.tokens else ""
        return f"{self.array}: {self.what}{where}"


def located(ds: xr.Dataset, problems: list[Problem]) -> list[Problem]:
    """The problems with their token ranges told by sequence and position too, where ``seq`` and
    ``pos`` can be read."""
    try:
        seq, pos = np.asarray(ds["seq"].values), np.asarray(ds["pos"].values)
    except Exception:  # noqa: BLE001 - unreadable coordinates are themselves a problem in the list
        return problems
    out = []
    for p in problems:
        if p.tokens and p.array not in ("seq", "pos") and seq[p.tokens[0]] >= 0 and seq[p.tokens[1]] >= 0:
            a, b = p.tokens
            p = Problem(p.array, p.what, p.tokens, f"seq {int(seq[a])} pos {int(pos[a])} to seq {int(seq[b])} "
                                                   f"pos {int(pos[b])}")
        out.append(p)
    return out


def expected_arrays(ds: xr.Dataset) -> list[str]:
    """The arrays the store's creation listed (its ``arrays`` attribute)."""
    return list(ds.attrs.get("arrays", []))


def check(ds: xr.Dataset, *, read=None) -> list[Problem]:
    """Every problem found in ``ds`` (an opened store), in the order arrays were listed.

    ``read``: the per-token data arrays to decode block by block (by default every one; ``verify``
    leaves out those its sum reads anyway). Coordinates and static weights are always read.
    """
    unreadable = ds.attrs.get("unreadable", {})
    problems = [Problem(name, unreadable.get(name, "missing: the store lists it but it cannot be opened (its "
                                                   "metadata or directory is gone)"))
                for name in expected_arrays(ds) if name not in ds.variables]
    for name in COORD_DTYPES:
        if name in ds.variables:
            problems += _blocks(ds[name], fill=True)
    if "text" in ds.variables:
        problems += _blocks(ds["text"], fill=False)
    stored = [n for n in ds.data_vars if not (n in VARIABLES and VARIABLES[n].derived)]
    per_token = [n for n in stored if ds[n].dims[:1] == ("token",)]
    for name in (per_token if read is None else [n for n in read if n in per_token]):
        problems += _blocks(ds[name], fill=False)
    for name in stored:
        if "token" not in ds[name].dims:
            problems += _static(ds[name])
    problems += _counts(ds, problems)
    return problems


def _blocks(var: xr.DataArray, *, fill: bool) -> list[Problem]:
    """Decode ``var`` (block by block only where a whole pass fails): unreadable blocks, and either fill
    values (coordinates: -1) or non-finite values (terms), with the tokens they cover."""
    data = var.data if isinstance(var.data, da.Array) else da.from_array(np.asarray(var.data))
    name = str(var.name)
    if data.shape[0] == 0:
        return []

    def bad_rows(block: np.ndarray) -> np.ndarray:
        if fill:
            return block < 0
        if block.dtype.kind not in "fc":
            return np.zeros(block.shape[0], bool)
        return ~np.isfinite(block.reshape(block.shape[0], -1)).all(axis=1)

    flags = data.map_blocks(bad_rows, drop_axis=list(range(1, data.ndim)), dtype=bool)
    try:
        return _runs(name, np.asarray(flags.compute()), fill)
    except Exception:  # noqa: BLE001 - something could not be read: find which blocks, one at a time
        pass
    problems, start = [], 0
    for i, n in enumerate(data.chunks[0]):
        try:
            rows = np.asarray(flags.blocks[i].compute())
        except Exception as exc:  # noqa: BLE001 - undecodable or missing chunk data
            problems.append(Problem(name, f"cannot be read ({type(exc).__name__}: {exc})", (start, start + n - 1)))
        else:
            problems += [Problem(p.array, p.what, (p.tokens[0] + start, p.tokens[1] + start))
                         for p in _runs(name, rows, fill)]
        start += n
    return problems


def _runs(name: str, bad: np.ndarray, fill: bool) -> list[Problem]:
    """One problem per run of consecutive bad tokens."""
    if not bad.any():
        return []
    what = ("no value (the fill value: a chunk that was never written or was lost)" if fill
            else "non-finite values")
    idx = np.flatnonzero(bad)
    breaks = np.flatnonzero(np.diff(idx) > 1)
    starts = np.r_[idx[0], idx[breaks + 1]]
    ends = np.r_[idx[breaks], idx[-1]]
    return [Problem(name, what, (int(a), int(b))) for a, b in zip(starts, ends)]


def _static(var: xr.DataArray) -> list[Problem]:
    try:
        values = np.asarray(var.compute(scheduler="sync").values if hasattr(var, "compute") else var.values)
    except Exception as exc:  # noqa: BLE001
        return [Problem(str(var.name), f"cannot be read ({type(exc).__name__}: {exc})")]
    if values.dtype.kind in "fc" and not np.isfinite(values).all():
        return [Problem(str(var.name), f"{int((~np.isfinite(values)).sum())} non-finite values in a static weight")]
    return []


def _counts(ds: xr.Dataset, problems: list[Problem]) -> list[Problem]:
    """Tokens and sequences against the committed counts (when ``seq`` could be read whole)."""
    out = []
    whole = ds.sizes.get("token", 0) == int(ds.attrs.get(COMMITTED_TOKENS, -1))  # not a selection of tokens
    if '"positions": "all"' not in ds.attrs.get("selection", '"positions": "all"'):
        whole = False   # a positions= capture may store no token of a sequence it read
    if whole and "seq" in ds.variables and not any(p.array == "seq" for p in problems) and COMMITTED_SEQUENCES in ds.attrs:
        found = int(np.unique(np.asarray(ds["seq"].values)).size)
        want = int(ds.attrs[COMMITTED_SEQUENCES])
        if found != want:
            out.append(Problem("seq", f"{found:,} sequences have tokens, {want:,} are committed"))
    return out


__all__ = ["Problem", "check", "expected_arrays"]
