"""The per-map writer lock: one JSON file ``<map>/.writer.lock`` naming its holder.

Only :class:`WriterLock` decides who may write a map; the file operations it needs (an
atomic create, a remove that spares a lock which replaced the stale one) are
:class:`~saliency_cache.location.Location` primitives, atomic on local disks and
best-effort on object stores.
"""

from __future__ import annotations

import json
import os
import socket
import uuid
import weakref
from typing import Any

from saliency_cache.errors import WriterLockedError
from saliency_cache.location import Location
from saliency_cache.names import now_utc

LOCK_NAME = ".writer.lock"


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError included: the process exists
        return True
    return True


def _parse(raw: bytes) -> dict[str, Any]:
    try:
        d = json.loads(raw.decode("utf-8"))
        return d if isinstance(d, dict) else {}
    except (UnicodeDecodeError, ValueError):
        return {}


class WriterLock:
    """An exclusive writer lock for one map: a JSON file ``{pid, host, token, started}``.

    Local stores create it atomically (hard link of a complete temp file, falling back to
    ``O_CREAT | O_EXCL``). A lock whose process is dead on this host is stale and taken over;
    a lock from another host is only taken with ``force_unlock``. On fsspec stores the lock
    is a best-effort check-then-write of the same key (object stores have no atomic create).
    """

    def __init__(self, loc: Location, prefix: str, info: dict[str, Any]) -> None:
        self._loc, self._prefix, self.info = loc, prefix, info
        self._released = False
        self._finalizer = weakref.finalize(
            self, WriterLock._release_static, loc, prefix, info["token"], info["pid"]
        )

    @property
    def key(self) -> str:
        return f"{self._prefix}/{LOCK_NAME}"

    @staticmethod
    def read(loc: Location, prefix: str) -> dict[str, Any] | None:
        """The lock's content, ``{}`` if unreadable, or None if there is no lock."""
        raw = loc.get(f"{prefix}/{LOCK_NAME}")
        return None if raw is None else _parse(raw)

    @classmethod
    def acquire(cls, loc: Location, prefix: str, what: str, force_unlock: bool) -> WriterLock:
        """Take the lock of the map at ``prefix`` (``what`` names it in errors).

        Raises:
            WriterLockedError: a live writer holds it, or (without ``force_unlock``) a writer
                on another host or an unreadable lock file.
        """
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "token": uuid.uuid4().hex,
            "started": now_utc(),
        }
        data = json.dumps(info).encode("utf-8")
        for _ in range(5):
            holder = cls.read(loc, prefix)
            if holder is not None:
                cls._refuse_or_break(loc, prefix, holder, what, force_unlock)
                continue
            if loc.create_exclusive(f"{prefix}/{LOCK_NAME}", data):
                return cls(loc, prefix, info)
        raise WriterLockedError(
            f"could not take the writer lock of {what} (another writer races for it)"
        )

    @staticmethod
    def _refuse_or_break(loc: Location, prefix: str, holder: dict, what: str, force: bool) -> None:
        pid, host, started = holder.get("pid"), holder.get("host"), holder.get("started")
        here = socket.gethostname()
        if not holder:
            state = "unreadable"
        elif host == here and isinstance(pid, int):
            state = "alive" if _pid_alive(pid) else "dead"
        else:
            state = "elsewhere"
        if state == "alive":
            raise WriterLockedError(
                f"{what} is being written by pid {pid} on {host} since {started}"
            )
        if state != "dead" and not force:
            desc = (
                f"pid {pid} on host {host} since {started}" if holder else "an unreadable lock file"
            )
            raise WriterLockedError(
                f"{what} is locked by {desc}; if that writer is gone, pass force_unlock=True"
            )
        # Remove the stale lock, without removing a fresh one that replaced it meanwhile.
        loc.remove_if(f"{prefix}/{LOCK_NAME}", lambda raw: _parse(raw) == holder)

    @staticmethod
    def _release_static(loc: Location, prefix: str, token: str, pid: int) -> None:
        if os.getpid() != pid:
            return  # a forked child exiting must not release its parent's lock
        try:
            holder = WriterLock.read(loc, prefix)
            if holder and holder.get("token") == token:
                loc.delete(f"{prefix}/{LOCK_NAME}")
        except OSError:
            pass  # the directory was removed, or the store is unreachable at exit

    def release(self) -> None:
        """Give the lock back (once; later calls do nothing)."""
        if not self._released:
            self._released = True
            self._finalizer()

    def forget(self) -> None:
        """Drop the lock without touching storage (its directory is about to be deleted)."""
        self._released = True
        self._finalizer.detach()
