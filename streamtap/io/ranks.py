"""Data-parallel capture: which part of a corpus and which store belong to this process.

Each rank of a ``torch.distributed`` job writes its own store, ``<store>/rank-00003.zarr``, so no two
processes ever write the same file and no coordination is needed beyond the rank number; its
share of a corpus is a contiguous slice. ``streamtap.open(<store>)`` reads the rank stores back as
one, in rank order, with sequence numbers offset so that the result is the store a single process
would have written for the same corpus.
"""

from __future__ import annotations

import os
import posixpath
import re
from pathlib import Path

from ..errors import StreamtapError

RANK_PATTERN = "rank-{:05d}.zarr"


def process_rank() -> tuple[int, int]:
    """(rank, world size) of an initialised torch.distributed job; (0, 1) otherwise."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def rank_store(store, rank: int, world: int):
    """The store this rank writes: the store itself for one process, a rank store below it for several."""
    if world <= 1:
        return store
    if not isinstance(store, (str, os.PathLike)):
        raise StreamtapError("a data-parallel capture writes one store per rank below a directory; "
                             "give a path or a URL, not a store object")
    if isinstance(store, str) and "://" in store:  # s3://bucket/run.zarr/rank-00001.zarr
        return posixpath.join(store, RANK_PATTERN.format(rank))
    return os.path.join(os.fspath(store), RANK_PATTERN.format(rank))


def shard_start(n: int, rank: int, world: int) -> int:
    """Where this rank's contiguous slice of ``n`` items begins."""
    per, extra = divmod(n, world)
    return rank * per + min(rank, extra)


def shard(items: list, rank: int, world: int) -> list:
    """This rank's contiguous slice; concatenated in rank order the slices give back ``items``."""
    per, extra = divmod(len(items), world)
    start = shard_start(len(items), rank, world)
    return items[start:start + per + (1 if rank < extra else 0)]


def rank_stores(store, storage_options: dict | None = None) -> list[str] | None:
    """The rank stores of a data-parallel capture at ``store``, in rank order, or None if it is not one."""
    if not isinstance(store, (str, os.PathLike)):
        return None
    if isinstance(store, str) and "://" in store:
        return _remote_rank_stores(store, storage_options)
    root = Path(store)
    if not root.is_dir() or (root / "zarr.json").exists():
        return None
    found = sorted(p for p in root.glob("rank-*.zarr") if p.is_dir())
    return [str(p) for p in found] or None


def _remote_rank_stores(url: str, storage_options: dict | None) -> list[str] | None:
    """:func:`rank_stores` for a URL, listed through fsspec (object storage has no directories to test)."""
    from fsspec.core import url_to_fs

    from .location import fs_options

    fs, root = url_to_fs(url, **fs_options(url, storage_options))
    root = root.rstrip("/")
    if fs.exists(f"{root}/zarr.json"):
        return None
    try:
        names = fs.ls(root, detail=False, refresh=True)
    except FileNotFoundError:
        return None
    found = sorted(n.rstrip("/") for n in names if re.fullmatch(r"rank-\d+\.zarr", posixpath.basename(n.rstrip("/"))))
    return [fs.unstrip_protocol(n) for n in found] or None
