"""One writer per store: a lock inside the store, created exclusively, removed when the writer closes.

The lock is the node ``streamtap.lock`` at the store's root: an empty Zarr group whose attributes name
the writer (host, pid, the process's start, when the capture began, a random token), so that zarr,
xarray and any other reader see a well-formed hierarchy while a capture runs. Its ``zarr.json`` is
created with an
exclusive create, which every store streamtap writes to supports atomically: ``O_EXCL``-style on a
local directory (zarr's ``LocalStore.set_if_not_exists``), a conditional PUT (``If-None-Match: *``)
on S3 and S3-compatible object storage through s3fs, and a compare under zarr's own lock in memory.
So two writers that start at the same moment cannot both win, on a laptop or on a bucket.

A lock whose writer is gone is taken over, with a warning, when that is certain: same host, and the
process it names no longer runs (SIGKILL, OOM killer, power loss of a container). A lock from another
host cannot be checked from here and is only taken over with ``break_lock=True`` (``--break-lock``).
A writer re-reads the lock before each batch, so one whose lock was broken stops instead of
interleaving its batches with the new writer's.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
import warnings

from zarr.abc.store import Store
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from .. import __version__
from ..errors import StoreLockedError, option_advice
from .location import LOCK_NAME

LOCK_KEY = f"{LOCK_NAME}/zarr.json"   # the lock group's metadata document, created exclusively
RECORD = "streamtap_lock"              # the attribute holding the writer's record


def _proc_start(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid apart; else None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rfind(b")") + 2:].split()  # after the command name, which may hold spaces
    return int(fields[19]) if fields[0] != b"Z" else -1  # -1: a zombie, i.e. dead


def process_alive(pid: int, proc_start: int | None = None) -> bool:
    """Whether ``pid`` runs on this host and is the same process that was started at ``proc_start``."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        pass
    start = _proc_start(pid)
    if start == -1:
        return False
    return proc_start is None or start is None or start == proc_start


def _describe(holder: dict) -> str:
    started = holder.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else "?"
    return f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')!r}, since {when}"


class StoreLock:
    """The single-writer lock of one store (a zarr ``Store``); ``where`` names it in messages."""

    def __init__(self, store: Store, where: str):
        self.store = store
        self.where = where
        self.token: str | None = None

    # -- raw access ------------------------------------------------------------------------------
    def read(self) -> dict | None:
        """The holder's record, or None when nobody holds the lock."""
        buf = sync(self.store.get(LOCK_KEY, prototype=default_buffer_prototype()))
        if buf is None:
            return None
        try:
            holder = json.loads(buf.to_bytes().decode("utf-8")).get("attributes", {}).get(RECORD)
        except (UnicodeDecodeError, ValueError, AttributeError):
            holder = None
        return holder if isinstance(holder, dict) else {"token": None, "unreadable": True}

    def _create(self, record: dict) -> bool:
        """Exclusive create; True when this call made the key."""
        data = json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {RECORD: record}}).encode()
        fs = getattr(self.store, "fs", None)
        if fs is not None and hasattr(fs, "_pipe_file"):  # an FsspecStore: conditional PUT on S3
            try:
                sync(fs._pipe_file(f"{self.store.path.rstrip('/')}/{LOCK_KEY}", data, mode="create"))
            except FileExistsError:
                return False
            except (TypeError, NotImplementedError, ValueError):  # a filesystem without exclusive create
                sync(self.store.set_if_not_exists(LOCK_KEY, default_buffer_prototype().buffer.from_bytes(data)))
        else:
            sync(self.store.set_if_not_exists(LOCK_KEY, default_buffer_prototype().buffer.from_bytes(data)))
        holder = self.read()  # set_if_not_exists does not say whether it wrote: the token does
        return holder is not None and holder.get("token") == record["token"]

    # -- the protocol ----------------------------------------------------------------------------
    def acquire(self, break_lock: bool = False) -> None:
        """Take the lock or raise StoreLockedError naming the holder and the fix."""
        record = {
            "host": socket.gethostname(), "pid": os.getpid(), "proc_start": _proc_start(os.getpid()),
            "started": time.time(), "token": uuid.uuid4().hex, "streamtap_version": __version__,
        }
        for _ in range(3):  # a takeover races at most a couple of other writers doing the same
            if self._create(record):
                self.token = record["token"]
                return
            holder = self.read()
            if holder is None:
                continue  # released in between: try again
            reason = self._takeover_reason(holder, break_lock)
            if reason is None:
                raise StoreLockedError(self._locked_message(holder))
            if self.read() != holder:  # changed while we looked: look again
                continue
            warnings.warn(f"streamtap: taking over the lock of {self.where}: {reason}", stacklevel=3)
            self._delete()
        holder = self.read() or {}
        raise StoreLockedError(self._locked_message(holder))

    def check_free(self, break_lock: bool = False) -> None:
        """Raise StoreLockedError now if a live writer holds the lock (the check ``acquire`` would make)."""
        holder = self.read()
        if holder is not None and self._takeover_reason(holder, break_lock) is None:
            raise StoreLockedError(self._locked_message(holder))

    def _takeover_reason(self, holder: dict, break_lock: bool) -> str | None:
        if holder.get("unreadable"):
            return "its lock key is not a streamtap lock record" if break_lock else None
        same_host = holder.get("host") == socket.gethostname()
        pid = holder.get("pid")
        if same_host and isinstance(pid, int) and not process_alive(pid, holder.get("proc_start")):
            return f"the writer that held it ({_describe(holder)}) no longer runs; its last committed batch is intact"
        if break_lock:
            return f"break_lock=True (it was held by {_describe(holder)})"
        return None

    def _locked_message(self, holder: dict) -> str:
        same_host = holder.get("host") == socket.gethostname()
        if same_host:
            fix = ("wait for it to finish or stop it (Ctrl-C leaves the store consistent), then resume with "
                   f"{option_advice('resume')}")
        else:
            fix = ("streamtap cannot check a process on another host: if that writer is gone, pass "
                   f"{option_advice('break_lock')} to take the lock over")
        return (f"{self.where} is being written by another streamtap writer ({_describe(holder)}); a second "
                f"writer would interleave its batches with it. {fix[0].upper() + fix[1:]}. The lock is the "
                f"node {LOCK_NAME!r} in the store")

    def check(self) -> None:
        """Raise StoreLockedError when the lock is no longer this writer's (someone broke it)."""
        if self.token is None:
            return
        holder = self.read()
        if holder is None or holder.get("token") != self.token:
            self.token = None
            who = f"now held by {_describe(holder)}" if holder else "removed by someone else"
            raise StoreLockedError(
                f"the lock of {self.where} was broken ({who}); this writer stopped before writing more, so "
                "no batch is interleaved. What it committed before stays in the store")

    def release(self) -> None:
        """Remove the lock if it is still this writer's."""
        if self.token is None:
            return
        token, self.token = self.token, None
        holder = self.read()
        if holder is not None and holder.get("token") == token:
            self._delete()

    def _delete(self) -> None:
        sync(self.store.delete_dir(LOCK_NAME))  # the group's one key (and its directory, on a disk)


__all__ = ["LOCK_KEY", "LOCK_NAME", "StoreLock", "process_alive"]
