"""Where a store is: a local directory, a URL opened through fsspec (``s3://bucket/run.zarr``), or a
zarr store object; and whether something is already there.

Readers in this process also wait here for a writer in the same process (read your own writes).
"""

from __future__ import annotations

import contextlib
import os
import weakref

import zarr
from zarr.core.sync import sync

from ..errors import StoreAccessError, StreamtapError
from .schema import COMMITTED_TOKENS, INCOMPLETE

LOCK_NAME = "streamtap.lock"   # the writer lock's node at the store's root (streamtap.io.lock)


def is_url(target) -> bool:
    """A store named by URL (``s3://bucket/run.zarr``, ``gs://``, ``memory://``...): opened through fsspec."""
    return isinstance(target, str) and "://" in target


def is_local_path(target) -> bool:
    """A local directory (a path, not a URL and not a zarr store object)."""
    return isinstance(target, (str, os.PathLike)) and not is_url(target)


def describe(target) -> str:
    """How messages name a store."""
    return os.fspath(target) if isinstance(target, (str, os.PathLike)) else repr(target)


def fs_options(url: str, storage_options: dict | None = None) -> dict:
    """The fsspec options for a store URL: the caller's, with directory-listing caches off on object
    storage (another process, a writer or a resume, changes the store behind a cached listing)."""
    options = dict(storage_options or {})
    if url.split("://", 1)[0] in ("s3", "s3a", "gs", "gcs"):
        options.setdefault("use_listings_cache", False)
    return options


def resolve(target, storage_options: dict | None = None):
    """What zarr opens for ``target``: a URL becomes an fsspec store (``storage_options`` go to its
    filesystem, e.g. ``{"endpoint_url": ...}``; s3fs also reads ``AWS_ENDPOINT_URL`` and the usual AWS
    variables); a local path and a zarr store object are returned as they are."""
    if not is_url(target):
        if storage_options:
            raise StreamtapError(f"storage_options apply to URLs such as s3://bucket/run.zarr, not to {target!r}")
        if is_local_path(target):
            wait_for_local_writes(target)
        return target
    from zarr.storage import FsspecStore

    try:
        return FsspecStore.from_url(target, storage_options=fs_options(target, storage_options))
    except ImportError as exc:
        raise StreamtapError(f"cannot open {target}: {exc} (for s3:// install s3fs: pip install s3fs)") from None


def entries(store) -> list[str]:
    """The names at the root of a zarr store object (empty when there is nothing there yet)."""
    async def listing():
        return [key async for key in store.list_dir("")]

    try:
        return sync(listing())
    except FileNotFoundError:
        return []


def store_exists(target, storage_options: dict | None = None) -> bool:
    """Whether anything but a writer's lock is at ``target``."""
    if is_local_path(target):
        if os.path.isdir(target):
            return any(name != LOCK_NAME for name in os.listdir(target))
        return os.path.exists(target)
    return any(name != LOCK_NAME for name in entries(resolve(target, storage_options)))


def open_group(target, mode: str = "r", storage_options: dict | None = None) -> zarr.Group:
    return zarr.open_group(resolve(target, storage_options), mode=mode, zarr_format=3)


def is_streamtap_store(target, storage_options: dict | None = None, *, or_incomplete: bool = False) -> bool:
    """Whether ``target`` holds a streamtap store (``or_incomplete``: or one whose creation never finished)."""
    try:
        attrs = open_group(target, mode="r", storage_options=storage_options).attrs
    except Exception:  # not a zarr group at all
        return False
    return COMMITTED_TOKENS in attrs or (or_incomplete and attrs.get(INCOMPLETE) is True)


# exceptions of the object-storage stack that mean "cannot reach or may not read", by class name, so
# that botocore and aiohttp need not be importable (they are optional, through s3fs)
_ACCESS_ERRORS = ("NoCredentialsError", "PartialCredentialsError", "EndpointConnectionError",
                  "ConnectTimeoutError", "ReadTimeoutError", "ClientConnectorError", "ServerTimeoutError",
                  "InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "NoSuchBucket")


def access_error(exc: BaseException) -> BaseException | None:
    """The error in ``exc``'s chain that means the store cannot be reached or read, if any."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if type(exc).__name__ in _ACCESS_ERRORS or isinstance(exc, PermissionError):
            return exc
        if type(exc).__name__ == "ClientError":  # botocore: the code says which
            code = getattr(exc, "response", {}).get("Error", {}).get("Code", "")
            if code in _ACCESS_ERRORS or code in ("403", "404", "NoSuchBucket"):
                return exc
        exc = exc.__cause__ or exc.__context__
    return None


@contextlib.contextmanager
def reaching(target):
    """Turn "cannot reach or read ``target``" (no credentials, an unreachable endpoint, a refused
    permission) into one :class:`~streamtap.errors.StoreAccessError` that names the location and the
    settings to check, instead of a storage library's traceback."""
    try:
        yield
    except StreamtapError:
        raise
    except Exception as exc:
        cause = access_error(exc)
        if cause is None:
            raise
        what = f"{type(cause).__name__}: {str(cause).strip() or 'no detail'}"
        if is_url(target):
            fix = ("Check the credentials (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE), the "
                   "endpoint (--storage-option endpoint_url=... or AWS_ENDPOINT_URL for S3-compatible storage) "
                   "and that the bucket exists")
        else:
            fix = "Check the permissions of that directory, or choose another location"
        raise StoreAccessError(f"cannot reach {describe(target)} ({what}). {fix}") from None


# -- read your own writes -------------------------------------------------------------------------------
_writing: "weakref.WeakValueDictionary[str, object]" = weakref.WeakValueDictionary()


def register_writer(path, writer) -> None:
    """Note that ``writer`` (with a ``wait()`` method) writes the local store at ``path`` in this process."""
    _writing[os.path.realpath(os.fspath(path))] = writer


def wait_for_local_writes(path) -> None:
    """A store this process is writing is brought up to date before it is read.

    A capture's last batch is committed shortly after the forward returns (a writer thread's queue,
    the background disk writes); another process sees the store at its previous commit until then
    (always consistent), and this one waits for it.
    """
    writer = _writing.get(os.path.realpath(os.fspath(path)))
    if writer is not None:
        writer.wait()


__all__ = ["LOCK_NAME", "is_url", "is_local_path", "describe", "fs_options", "resolve", "entries", "store_exists",
           "open_group", "is_streamtap_store", "register_writer", "wait_for_local_writes"]
