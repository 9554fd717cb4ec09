"""Watching peer processes die: pidfds (Linux >= 5.3), polled in the roles' zmq loops.

DESIGN §6: death is noticed at once through a pidfd on every peer process, not by
timeouts.  A pidfd becomes readable when its process exits (including SIGKILL), so it
goes straight into a role's ``zmq.Poller`` (which accepts raw fds) next to its sockets,
and a zero-timeout :func:`select.poll` checks it between batches while the loop is busy.

Who watches whom:

* the kernel watches the NIC (its pid comes from the ``hello`` reply of the NIC's admin
  server) and every attached app task (the ``attach`` syscall carries the pid);
* the NIC watches the kernel (the kernel's ``hello`` carries its pid);
* an app's liburing watches the kernel (the ``hello`` reply of the kernel's server).

This module owns no shared memory: only the pidfds it opens, closed by :meth:`close`.
"""

from __future__ import annotations

import os
import select
from collections.abc import Hashable, Iterator
from typing import Generic, TypeVar

__all__ = ["PidWatch", "Watchlist", "parent_pid", "pidfd_open", "proc_stat", "process_exists"]

K = TypeVar("K", bound=Hashable)


def pidfd_open(pid: int) -> int | None:
    """A pidfd for ``pid``, or None when the process no longer exists (ESRCH).

    Other failures (no pidfd support, out of fds) raise :class:`OSError`.
    """
    try:
        return os.pidfd_open(pid)
    except ProcessLookupError:
        return None


def proc_stat(pid: int) -> tuple[bytes, int] | None:
    """``(state, parent pid)`` of ``pid`` from ``/proc/<pid>/stat`` (the fields after the
    command name, which may itself hold spaces and parentheses), or None when it is gone or
    unreadable."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return fields[0], int(fields[1])
    except (OSError, IndexError, ValueError):
        return None


def process_exists(pid: int) -> bool:
    """True if ``pid`` names a live process (a zombie counts as gone)."""
    st = proc_stat(pid)
    return st is not None and st[0] not in (b"Z", b"X")


def parent_pid(pid: int) -> int:
    """The parent of ``pid`` as /proc says (0 when it is gone or unreadable)."""
    st = proc_stat(pid)
    return 0 if st is None else st[1]


class PidWatch:
    """One pidfd on one process.  ``dead`` turns True when the process has exited.

    A pid that is already gone at construction is dead from the start (its fd is -1).
    """

    def __init__(self, pid: int) -> None:
        if pid <= 0:
            raise ValueError(f"bad pid {pid}")
        self.pid = pid
        fd = pidfd_open(pid)
        self.fd: int = -1 if fd is None else fd
        self._dead = fd is None
        self._poll = select.poll()
        if fd is not None:
            self._poll.register(fd, select.POLLIN)

    @property
    def dead(self) -> bool:
        """Has the process exited?  One zero-timeout poll of the pidfd (about a µs)."""
        if not self._dead and self.fd >= 0 and self._poll.poll(0):
            self._dead = True
        return self._dead

    def close(self) -> None:
        """Close the pidfd (idempotent)."""
        if self.fd >= 0:
            try:
                self._poll.unregister(self.fd)
            except KeyError:
                pass
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> PidWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"PidWatch({self.pid}{', dead' if self._dead else ''})"


class Watchlist(Generic[K]):
    """Several watched processes, each under a key (a role name, a task id, ...).

    ``fds()`` are for a ``zmq.Poller``; :meth:`reap` returns (and forgets) the keys whose
    process died, checking every pidfd with one :func:`select.poll` call.
    """

    def __init__(self) -> None:
        self._watches: dict[K, PidWatch] = {}
        self._by_fd: dict[int, K] = {}
        self._poll = select.poll()
        self._dead_at_add: list[K] = []

    def __len__(self) -> int:
        return len(self._watches)

    def __contains__(self, key: object) -> bool:
        return key in self._watches

    def __iter__(self) -> Iterator[K]:
        return iter(list(self._watches))

    def pid(self, key: K) -> int:
        return self._watches[key].pid

    def get(self, key: K) -> PidWatch | None:
        """The watch under ``key`` (None if none): its ``dead`` is one zero-timeout poll."""
        return self._watches.get(key)

    def add(self, key: K, pid: int) -> int:
        """Watch ``pid`` under ``key`` (replacing an older watch); returns the fd (-1 when
        the process is already gone: the next :meth:`reap` reports it)."""
        self.discard(key)
        w = PidWatch(pid)
        self._watches[key] = w
        if w.fd >= 0:
            self._by_fd[w.fd] = key
            self._poll.register(w.fd, select.POLLIN)
        else:
            self._dead_at_add.append(key)
        return w.fd

    def discard(self, key: K) -> int:
        """Stop watching ``key``; returns the closed fd (-1 if none) so a poller can forget it.
        The caller must unregister that fd from any poller *before* the fd number is reused,
        i.e. before opening another one: do it right after this call."""
        w = self._watches.pop(key, None)
        if w is None:
            return -1
        fd = w.fd
        if fd >= 0:
            self._by_fd.pop(fd, None)
            self._poll.unregister(fd)
        w.close()
        return fd

    def fds(self) -> list[int]:
        return list(self._by_fd)

    def reap(self) -> list[K]:
        """Keys whose process has exited since the last call; they are no longer watched
        (their pidfds stay open until :meth:`discard` so the caller can unregister them)."""
        dead = [k for k in self._dead_at_add if k in self._watches]
        self._dead_at_add = []
        if self._by_fd:
            for fd, _ev in self._poll.poll(0):
                key = self._by_fd.get(fd)
                if key is not None and key not in dead:
                    dead.append(key)
        return dead

    def close(self) -> None:
        for key in list(self._watches):
            self.discard(key)
