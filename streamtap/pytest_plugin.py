"""pytest plugin: verify stored captures as test items, and fixtures for tiny models and stores.

Registered through the ``pytest11`` entry point, so it is active wherever streamtap is installed; its
fixtures are prefixed ``streamtap_`` so that they never shadow a project's own, and loading it changes
nothing in the process (no environment variable, allocator setting or warning filter).

``pytest --streamtap-verify run.zarr`` (repeatable) turns every stored sequence into its own test
item, ``run.zarr::seq[3]``, that checks the invariant on that sequence's tokens with the store's
tolerance, and on a store captured with patterns the second invariant (each head's output is its
pattern times its values) too. A damaged or incomplete capture then fails exactly where it is damaged, in the form CI
and editors already understand (``-k``, ``-x``, ``--lf``, ``--collect-only``, ``--junitxml``).

How the items get into the run, and why this way
------------------------------------------------
The stores are added as children of the :class:`pytest.Session` by a wrapper around
``pytest_make_collect_report``: when pytest asks the session for its top-level collectors, the
wrapper appends one :class:`StoreCollector` per store to the session's report. pytest then expands
them through its own ``genitems`` -- ``pytest_collectstart``, ``pytest_collectreport`` and
``pytest_itemcollected`` fire as for any file, ``pytest_collection_modifyitems`` (``-k``, ``-m``,
``--deselect``, ``--lf``) sees the items, and they count as collected, so a directory without tests
runs them and exits 0 instead of 5.

Two alternatives were rejected. Creating items in ``pytest_collection_modifyitems`` bypasses the
collection hooks, so ``--collect-only`` and reporters see half a tree and ``-k`` only works if the
hook happens to run before the keyword plugin. Collecting the store as a directory
(``pytest_collect_directory``) only works when pytest's walk reaches it: pytest drops a path argument
that lies under another one, and then skips it if it is under a ``norecursedirs`` entry (``.*``,
``build``) or ``--ignore``, so a store in ``.runs/`` would silently never be checked. The session
route depends on none of that. The one thing it does not give is selecting a sequence by giving
its node id as a positional argument (``pytest run.zarr::seq[3]``); use ``-k``, ``--deselect`` or
``--lf``. Registered stores are kept out of pytest's own directory walk (``pytest_ignore_collect``)
so their chunk trees are not scanned for test files.

Errors are computed per token chunk of the store and cached on the store's collector, so N items
over one chunk read it once, and ``-k`` selecting one sequence reads only the chunks that hold it.
"""

from __future__ import annotations

import itertools
import numbers
import os
from pathlib import Path
from typing import Any, Iterator

import pytest

# Heavy modules (xarray, zarr, torch) are imported inside the hooks: this plugin is loaded into every
# pytest run in the environment, most of which never touch a store.

STORES = pytest.StashKey[list[tuple[str, Path]]]()
SHOWN = 10  # worst positions listed in a failing item's report


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("streamtap", "streamtap stores")
    group.addoption(
        "--streamtap-verify", action="append", default=[], metavar="PATH", dest="streamtap_verify",
        help="check that the terms in this streamtap store sum to the final residual, one test item "
             "per stored sequence (PATH::seq[N]); may be given several times",
    )


def pytest_configure(config: pytest.Config) -> None:
    """Check the named stores before anything runs: a typo should stop the run, not pass it."""
    stores: list[tuple[str, Path]] = []
    for raw in config.getoption("streamtap_verify") or []:
        # absolute but not symlink-resolved, the way pytest spells the paths it walks and relates
        path = Path(os.path.abspath(Path(config.invocation_params.dir, raw)))
        problem = _store_problem(path)
        if problem:
            raise pytest.UsageError(f"--streamtap-verify {raw}: {problem}")
        if all(path != known for _, known in stores):
            stores.append((raw, path))
    config.stash[STORES] = stores


def _store_problem(path: Path) -> str | None:
    if not path.exists():
        return "no such file or directory"
    if not path.is_dir():
        return "not a directory; a streamtap store is a Zarr directory (made by streamtap.tap/capture)"
    from .dataset import open as open_store
    from .errors import StreamtapError

    try:
        open_store(str(path))
    except StreamtapError as exc:
        return str(exc)
    except Exception as exc:  # a Zarr array, or a group streamtap cannot read, is as unusable as none
        return f"not a streamtap store ({type(exc).__name__}: {exc}); give the store's top directory"
    return None


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector: pytest.Collector):
    """Hang the stores under the session, so pytest collects them whatever the path arguments are."""
    report = yield
    if isinstance(collector, pytest.Session) and report.passed:
        for label, path in collector.config.stash.get(STORES, []):
            report.result.append(StoreCollector.from_parent(collector, store_path=path, label=label))
    return report


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """Keep pytest's walk out of stores it already checks: their chunk trees hold no tests."""
    if any(collection_path == path for _, path in config.stash.get(STORES, [])):
        return True
    return None


def _node_path(session: pytest.Session, path: Path, label: str) -> str:
    """The store's part of the node ids: rootdir-relative like test files, else as it was given."""
    try:
        return path.relative_to(session.config.rootpath).as_posix()
    except ValueError:
        return Path(label).as_posix()


class StoreCollector(pytest.Collector):
    """One streamtap store; its children are one item per stored sequence."""

    def __init__(self, *, store_path: Path, label: str, parent, **kw: Any) -> None:
        node_path = _node_path(parent.session, store_path, label)
        super().__init__(name=node_path, parent=parent, path=store_path, nodeid=node_path, **kw)
        self.label = label
        self._ds = None
        self._tol: float | None = None
        self._rel = self._abs = self._done = None
        self._bounds: list[int] = []

    @property
    def dataset(self):
        if self._ds is None:
            from .dataset import open as open_store

            self._ds = open_store(self.path)
        return self._ds

    @property
    def tolerance(self) -> float:
        if self._tol is None:
            from .invariant import tolerance

            self._tol = tolerance(self.dataset)
        return self._tol

    def collect(self) -> Iterator[pytest.Item]:
        import numpy as np

        yield WholeStoreItem.from_parent(self, name="store")
        try:
            seqs = np.asarray(self.dataset["seq"].values)
        except Exception:  # noqa: BLE001 - an unreadable seq chunk: the store item reports it
            return
        real = np.flatnonzero(seqs >= 0)  # fill values (-1) belong to no sequence: the store item names them
        order = real[np.argsort(seqs[real], kind="stable")]
        values, starts = np.unique(seqs[order], return_index=True)
        ends = [*starts[1:], order.size]
        for value, start, end in zip(values, starts, ends):
            yield SequenceItem.from_parent(self, name=f"seq[{int(value)}]", seq=int(value),
                                           tokens=order[start:end], **_item_id(self, int(value)))

    def errors_at(self, tokens):
        """(relative, absolute) errors of these token indices, computing only the chunks not yet done;
        a chunk that cannot be read gives NaN (and the store item says why)."""
        import numpy as np

        from .testing import relative_errors

        ds = self.dataset
        if self._rel is None:
            n = ds.sizes["token"]
            chunks = ds["resid_final"].chunks[0] if ds["resid_final"].chunks else (n,)
            self._bounds = [0, *itertools.accumulate(chunks)]
            self._rel, self._abs = np.full(n, np.nan), np.full(n, np.nan)
            self._done = np.zeros(len(chunks), dtype=bool)
        needed = np.unique(np.searchsorted(self._bounds, tokens, side="right") - 1)
        todo = [int(c) for c in needed if not self._done[c]]
        # contiguous runs of missing chunks become one computation each
        for _, run in itertools.groupby(enumerate(todo), key=lambda t: t[1] - t[0]):
            run = [c for _, c in run]
            lo, hi = self._bounds[run[0]], self._bounds[run[-1] + 1]
            try:
                err = relative_errors(ds.isel(token=slice(lo, hi)))
            except Exception:  # noqa: BLE001 - damaged data: NaN, which fails, and the store item names it
                pass
            else:
                self._rel[lo:hi] = err.values
                self._abs[lo:hi] = err["abs_error"].values
            self._done[run] = True
        return self._rel[tokens], self._abs[tokens]


class StoreDamaged(Exception):
    """The store is not whole; carries the problems the report lists."""


class WholeStoreItem(pytest.Item):
    """The store as a whole (``run.zarr::store``): every listed array there and readable, no token
    coordinate a fill value, static weights finite, every committed sequence present."""

    def runtest(self) -> None:
        from .integrity import check

        problems = check(self.parent.dataset)
        if problems:
            raise StoreDamaged(problems)

    def repr_failure(self, excinfo, style=None):
        if not isinstance(excinfo.value, StoreDamaged):
            return super().repr_failure(excinfo, style=style)
        problems = excinfo.value.args[0]
        lines = [f"streamtap store {self.parent.label} is damaged ({len(problems)} problem"
                 f"{'' if len(problems) == 1 else 's'}):"]
        lines += [f"  {problem}" for problem in problems]
        lines.append("Recapture the tokens concerned or restore the files from a copy.")
        return "\n".join(lines)

    def reportinfo(self):
        return self.path, None, self.name


def _item_id(parent: pytest.Collector, seq: int) -> dict:
    """The node id pytest itself would give an item named ``seq[N]``.

    pytest 9 keeps ids structured (path, names, params) and compares them structurally; ``--lf`` and
    ``--nf`` parse the ids they saved into that form, where ``seq[3]`` is name ``seq`` with params
    ``3``. An id derived from the name alone prints the same but never matches, so it is built as
    parametrized tests build theirs. pytest 8's string ids need nothing.
    """
    parent_id = getattr(parent, "id", None)
    if parent_id is None or not hasattr(parent_id, "with_params"):
        return {}
    return {"nodeid": parent_id.child("seq").with_params(str(seq))}


class SequenceMismatch(Exception):
    """A sequence's terms miss its stored residual; carries what the report shows."""

    def __init__(self, rows: list[tuple], n_bad: int, n_tokens: int, tol: float, dtype: str):
        super().__init__(f"{n_bad} of {n_tokens} tokens exceed tolerance {tol:g}")
        self.rows, self.n_bad, self.n_tokens, self.tol, self.dtype = rows, n_bad, n_tokens, tol, dtype


class OutputMismatch(Exception):
    """A sequence's head outputs miss the second invariant; carries what the report shows."""

    def __init__(self, rows: list[tuple], n_bad: int, n_total: int, tol: float):
        super().__init__(f"{n_bad} of {n_total} head outputs exceed tolerance {tol:g}")
        self.rows, self.n_bad, self.n_total, self.tol = rows, n_bad, n_total, tol


class SequenceItem(pytest.Item):
    """The invariant on one stored sequence: every token's terms sum to its resid_final; on a store
    with patterns, also every head's output equals its pattern times its values (the second invariant)."""

    def __init__(self, *, seq: int, tokens, **kw: Any) -> None:
        super().__init__(**kw)
        self.seq = seq
        self.tokens = tokens

    def runtest(self) -> None:
        import numpy as np

        from .testing import misses, worst_first

        store: StoreCollector = self.parent
        tol = store.tolerance
        rel, abs_err = store.errors_at(self.tokens)
        bad = misses(rel, tol)
        ds = store.dataset
        if not bad.any():
            if ds.attrs.get("patterns"):
                self._check_outputs(ds, tol)
            return
        picked = [i for i in worst_first(rel) if bad[i]][:SHOWN]
        index = self.tokens[picked]
        pos = np.asarray(ds["pos"].isel(token=index).values)
        ids = np.asarray(ds["token_id"].isel(token=index).values)
        text = np.asarray(ds["text"].isel(token=index).values) if "text" in ds.variables else None
        rows = [(int(pos[k]), int(ids[k]), None if text is None else str(text[k]), float(rel[i]), float(abs_err[i]))
                for k, i in enumerate(picked)]
        raise SequenceMismatch(rows, int(bad.sum()), len(rel), tol, str(ds.attrs.get("dtype", "?")))

    def _check_outputs(self, ds, tol: float) -> None:
        """The second invariant on this sequence: each head's output is its pattern times its values."""
        import numpy as np

        from .attention import output_errors

        err = output_errors(ds, self.seq)
        values = np.asarray(err.values)
        bad = ~(values <= tol)
        if bad.any():
            order = np.argsort(-np.nan_to_num(values, nan=np.inf).reshape(-1), kind="stable")[:SHOWN]
            t, layer, head = np.unravel_index(order, values.shape)
            pos = np.asarray(err["pos"].values)
            rows = [(int(pos[a]), int(b), int(c), float(values[a, b, c])) for a, b, c in zip(t, layer, head)
                    if bad[a, b, c]]
            raise OutputMismatch(rows, int(bad.sum()), int(values.size), tol)

    def repr_failure(self, excinfo, style=None):
        if isinstance(excinfo.value, OutputMismatch):
            e = excinfo.value
            lines = [f"streamtap store {self.parent.label}, seq {self.seq}: {e.n_bad} of {e.n_total} head outputs "
                     "miss the second invariant",
                     "  head output at i = sum_j A[i, j] * v_j (its pattern times the values, in the head's value "
                     "space)", f"  tolerance {e.tol:g} (relative to the magnitude rounding acts on, sum_j A[i, j] |v_j| plus the "
                     "values' spread weighted by the scores' magnitudes: docs/design.md)",
                     "    {:>6}  {:>5}  {:>4}  {:>11}".format("pos", "layer", "head", "rel_error")]
            lines += [f"    {pos:>6}  {layer:>5}  {head:>4}  {err:>11.3e}" for pos, layer, head, err in e.rows]
            lines.append("The pattern recomputed from the store differs from what the head wrote: a positional "
                         "table, a mask or a q/k transform the layout does not record, or a damaged store.")
            return "\n".join(lines)
        if not isinstance(excinfo.value, SequenceMismatch):
            return super().repr_failure(excinfo, style=style)
        e = excinfo.value
        with_text = any(r[2] is not None for r in e.rows)
        lines = [
            f"streamtap store {self.parent.label}, seq {self.seq}: {e.n_bad} of {e.n_tokens} tokens "
            f"miss the invariant",
            "  resid_final = embed (+ pos_embed) + sum of head messages + attention biases + MLP outputs",
            f"  tolerance {e.tol:g} for {e.dtype} (max |sum of terms - resid_final| / max |resid_final|, per token)",
            f"  worst {len(e.rows)}:" if e.n_bad > len(e.rows) else "  tokens:",
            "    {:>6}  {:>9}  {:>11}  {:>11}".format("pos", "token_id", "rel_error", "abs_error")
            + ("  text" if with_text else ""),
        ]
        for pos, tid, text, rel, ab in e.rows:
            lines.append(f"    {pos:>6}  {tid:>9}  {rel:>11.3e}  {ab:>11.3e}" + (f"  {text!r}" if with_text else ""))
        nan = any(r[3] != r[3] for r in e.rows)
        lines.append("A term is missing or counted twice, or the store is damaged"
                     + ("; NaN means non-finite values were stored." if nan else "."))
        return "\n".join(lines)

    def reportinfo(self):
        # the third part is a "domain" that terminal output appends to the path, with dots turned
        # into "::" as for Python names; the sequence name alone keeps "run.zarr" intact
        return self.path, None, self.name


# -- fixtures ---------------------------------------------------------------------------------------
@pytest.fixture
def streamtap_tiny_model_factory():
    """``streamtap.models.tiny_model`` itself, for tests that need several models or other settings."""
    from .models import tiny_model

    return tiny_model


@pytest.fixture
def streamtap_tiny_model(request, streamtap_tiny_model_factory):
    """A tiny random model; parametrize indirectly with an architecture name (default ``"llama"``).

    ``@pytest.mark.parametrize("streamtap_tiny_model", ["gpt2", "llama"], indirect=True)``; a dict
    param, ``{"arch": "qwen2", "dtype": "bfloat16"}``, passes the rest to ``tiny_model``. A fresh
    model per test, because a test that taps or edits it must not leak into the next.
    """
    param = getattr(request, "param", "llama")
    if isinstance(param, dict):
        param = dict(param)
        return streamtap_tiny_model_factory(param.pop("arch", "llama"), **param)
    return streamtap_tiny_model_factory(param)


@pytest.fixture
def streamtap_store(tmp_path):
    """Factory: ``streamtap_store(model, inputs, **tap_kwargs)`` captures into a fresh store and opens it.

    ``inputs`` is what a test naturally has: token-id lists or strings (captured with
    ``streamtap.capture``, which pads and batches; ``batch_size=`` and the like go there), or one batch
    or a list of batches -- ``input_ids`` tensors or dicts of model keyword arguments -- run under
    ``streamtap.tap`` exactly as given, padding included. ``store=`` picks the target (a path or a
    zarr store); by default each call gets its own directory under ``tmp_path``.
    """
    counter = itertools.count()

    def make(model, inputs, *, store=None, **tap_kwargs):
        import torch

        from . import capture, open as open_store, tap

        target = store if store is not None else tmp_path / f"streamtap-{next(counter)}.zarr"
        if isinstance(inputs, (torch.Tensor, dict)):
            inputs = [inputs]
        inputs = list(inputs)
        if inputs and (isinstance(inputs[0], str) or _is_token_list(inputs[0])):
            capture(model, inputs, target, **tap_kwargs)
        else:
            with tap(model, target, **tap_kwargs), torch.no_grad():
                for batch in inputs:
                    if isinstance(batch, torch.Tensor):
                        model(input_ids=batch if batch.dim() == 2 else batch[None])
                    else:
                        model(**batch)
        return open_store(target)

    return make


def _is_token_list(item) -> bool:
    return isinstance(item, (list, tuple)) and all(isinstance(t, numbers.Integral) for t in item)


__all__ = ["StoreCollector", "SequenceItem", "SequenceMismatch", "WholeStoreItem"]
