"""The io_uring subsystem and its syscalls: ``io_uring_setup`` and ``io_uring_enter`` (the syscall
half of Linux ``io_uring/io_uring.c``), with ``mmap`` and ``io_uring_register`` plugged in.

:class:`IoUring` is what the kernel process runs: it creates rings (``io_uring_setup``),
serves ``io_uring_enter``, ``mmap`` of ring fds (:mod:`driver_proc.memmap`) and
``io_uring_register`` (:mod:`driver_proc.register`), tears rings down when their fd is closed
or their task dies (Linux's release of the ring file), and runs the requests armed on sockets
when the NAPI path reports readiness (:meth:`IoUring.on_socket_ready`,
:meth:`IoUring.on_listener_ready`, :meth:`IoUring.run`) and io_uring's periodic work
(:meth:`IoUring.poll`: SQPOLL passes from :mod:`driver_proc.sqpoll`, overflow flushes, wait
timeouts).  It owns the tables other subsystems extend: opcodes (:mod:`driver_proc.opdef`,
:meth:`IoUring.register_opcode`), register opcodes (:meth:`IoUring.register_register_op`) and
poll hooks.  No zmq here: the syscall layer (:mod:`driver_proc.syscalls`) turns messages into
these calls, and replies to deferred ``io_uring_enter`` waits when
:meth:`IoUring.take_completed_waits` hands them back.  The name follows liburing's
``src/setup.c``; the ring itself (``struct io_ring_ctx``) is :mod:`driver_proc.io_uring`.

Shared memory: the regions of a ring are created by :class:`driver_proc.io_uring.Ring` (see
that module for who writes what); ``io_uring_setup`` writes the ring's offsets back into the
app's ``io_uring_params`` (a reply blob, not shared memory).

Semantics and departures
------------------------
* **Setup flags not emulated, refused with -EINVAL:** ``NO_MMAP``, ``REGISTERED_FD_ONLY``,
  ``ATTACH_WQ``, ``SQE_MIXED``, ``SQ_REWIND``, ``HYBRID_IOPOLL``.  ``params.features``
  reports :data:`FEATURES`.
* **Waiting.**  ``io_uring_enter`` with ``IORING_ENTER_GETEVENTS`` and fewer than
  ``min_complete`` CQEs ready becomes a :class:`driver_proc.io_uring.Wait`, answered later
  (see :mod:`driver_proc.io_uring`).  The timeout is a plain ``timeout_ms`` field and the
  batch wait a ``min_wait_usec`` field (``io_uring_getevents_arg``'s, 6.12's
  ``IORING_FEAT_MIN_TIMEOUT``) instead of ``IORING_ENTER_EXT_ARG``; ``EXT_ARG``,
  ``EXT_ARG_REG``, ``ABS_TIMER`` and registered ring fds (``IORING_ENTER_REGISTERED_RING``)
  are refused with -EINVAL.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any

import numpy as np

from driver_proc.files import SocketFile, Sockets, Task
from driver_proc.io_uring import Ring, Wait
from driver_proc.kbuf import register_pbuf_ring, register_pbuf_status, unregister_pbuf_ring
from driver_proc.memmap import io_uring_mmap
from driver_proc.napi import busy_poll, register_napi, unregister_napi
from driver_proc.opdef import OpDef, io_issue_defs
from driver_proc.register import RegisterHandler, enable_rings, io_uring_register
from driver_proc.sqpoll import sq_thread_enter, sq_thread_pass
from driver_proc.tcp import Listener, TcpReceiver
from shared import abi
from shared.errors import Misuse
from shared.shm import Region

__all__ = [
    "ENTER_FLAGS",
    "FEATURES",
    "SETUP_FLAGS",
    "IoUring",
]


#: IORING_SETUP_* flags accepted by io_uring_setup.
SETUP_FLAGS = (
    abi.IORING_SETUP_IOPOLL | abi.IORING_SETUP_SQPOLL | abi.IORING_SETUP_SQ_AFF
    | abi.IORING_SETUP_CQSIZE | abi.IORING_SETUP_CLAMP | abi.IORING_SETUP_R_DISABLED
    | abi.IORING_SETUP_SUBMIT_ALL | abi.IORING_SETUP_COOP_TASKRUN
    | abi.IORING_SETUP_TASKRUN_FLAG | abi.IORING_SETUP_SQE128 | abi.IORING_SETUP_CQE32
    | abi.IORING_SETUP_SINGLE_ISSUER | abi.IORING_SETUP_DEFER_TASKRUN
    | abi.IORING_SETUP_NO_SQARRAY | abi.IORING_SETUP_CQE_MIXED
)
#: Known to Linux (uapi) but not emulated: -EINVAL.
_SETUP_KNOWN = (SETUP_FLAGS | abi.IORING_SETUP_ATTACH_WQ | abi.IORING_SETUP_NO_MMAP
                | abi.IORING_SETUP_REGISTERED_FD_ONLY | abi.IORING_SETUP_HYBRID_IOPOLL
                | abi.IORING_SETUP_SQE_MIXED | abi.IORING_SETUP_SQ_REWIND)
#: params.features we honour.
FEATURES = (abi.IORING_FEAT_SINGLE_MMAP | abi.IORING_FEAT_NODROP
            | abi.IORING_FEAT_SUBMIT_STABLE | abi.IORING_FEAT_FAST_POLL
            | abi.IORING_FEAT_SQPOLL_NONFIXED | abi.IORING_FEAT_CQE_SKIP
            | abi.IORING_FEAT_MIN_TIMEOUT)
ENTER_FLAGS = (abi.IORING_ENTER_GETEVENTS | abi.IORING_ENTER_SQ_WAKEUP
               | abi.IORING_ENTER_SQ_WAIT | abi.IORING_ENTER_NO_IOWAIT)
_ENTER_KNOWN = (ENTER_FLAGS | abi.IORING_ENTER_EXT_ARG | abi.IORING_ENTER_REGISTERED_RING
                | abi.IORING_ENTER_ABS_TIMER | abi.IORING_ENTER_EXT_ARG_REG)


def _roundup_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


class IoUring:
    """The io_uring subsystem of the kernel process."""

    def __init__(self, run: str, sockets: Sockets, skbs: Any = None) -> None:
        self.run_id = run
        self.sockets = sockets
        self.skbs = skbs if skbs is not None else sockets.skbs
        self.rings: list[Ring] = []
        self.completed_waits: list[Wait] = []
        self.opcodes: dict[int, OpDef] = io_issue_defs()
        self.register_ops: dict[int, RegisterHandler] = {
            abi.IORING_REGISTER_PBUF_RING: register_pbuf_ring,
            abi.IORING_UNREGISTER_PBUF_RING: unregister_pbuf_ring,
            abi.IORING_REGISTER_PBUF_STATUS: register_pbuf_status,
            abi.IORING_REGISTER_ENABLE_RINGS: enable_rings,
            abi.IORING_REGISTER_NAPI: register_napi,
            abi.IORING_UNREGISTER_NAPI: unregister_napi,
        }
        #: register opcodes served without a ring (``fd == -1``)
        self.blind_register_ops: set[int] = set()
        #: other subsystems' periodic work, run by :meth:`poll` as ``hook(now) -> work done``
        #: (zcrx: requeued RECV_ZC requests, delayed ifq destruction)
        self.poll_hooks: list[Callable[[float], int]] = []
        #: one NAPI pass of the kernel (segments delivered, woken requests run; returns the
        #: completions handled), used by NAPI busy polling (:mod:`driver_proc.napi`)
        self.napi_poll: Callable[[], int] | None = None

    # -- extension points ---------------------------------------------------------------------

    def register_opcode(self, opcode: int, opdef: OpDef, *, needs_file: bool = True) -> None:
        """Add an opcode (e.g. IORING_OP_RECV_ZC from the zcrx subsystem); ``needs_file``
        says whether ``sqe.fd`` must name an open file (it sets ``opdef.needs_file``)."""
        self.opcodes[opcode] = replace(opdef, needs_file=needs_file)

    def register_register_op(self, opcode: int, handler: RegisterHandler, *,
                             blind: bool = False) -> None:
        """Add an ``io_uring_register`` opcode (ZCRX_IFQ, ZCRX_CTRL, QUERY...)."""
        self.register_ops[opcode] = handler
        if blind:
            self.blind_register_ops.add(opcode)

    # -- io_uring_setup -----------------------------------------------------------------------

    def setup(self, task: Task, entries: int, params: bytes) -> tuple[int, bytes]:
        """``io_uring_setup(entries, params)``: return ``(fd, params written back)``."""
        if len(params) != abi.io_uring_params.itemsize:
            raise Misuse("params must be a 120-byte io_uring_params", errno.EFAULT)
        p = np.frombuffer(params, dtype=abi.io_uring_params).copy()
        flags = int(p["flags"][0])
        if p["resv"].any():
            raise Misuse("params.resv must be 0", errno.EINVAL)
        if flags & ~_SETUP_KNOWN:
            raise Misuse(f"unknown setup flags {flags & ~_SETUP_KNOWN:#x}", errno.EINVAL)
        if flags & ~SETUP_FLAGS:
            raise Misuse(f"setup flags {flags & ~SETUP_FLAGS:#x} not emulated", errno.EINVAL)
        sqpoll = flags & abi.IORING_SETUP_SQPOLL
        if sqpoll and flags & (abi.IORING_SETUP_COOP_TASKRUN | abi.IORING_SETUP_TASKRUN_FLAG
                               | abi.IORING_SETUP_DEFER_TASKRUN):
            raise Misuse("SQPOLL with task-run flags", errno.EINVAL)
        if flags & abi.IORING_SETUP_SQ_AFF:
            if not sqpoll:
                raise Misuse("SQ_AFF without SQPOLL", errno.EINVAL)
            if int(p["sq_thread_cpu"][0]) >= (os.cpu_count() or 1):
                raise Misuse("sq_thread_cpu out of range", errno.EINVAL)
        if flags & abi.IORING_SETUP_TASKRUN_FLAG and not flags & (
                abi.IORING_SETUP_COOP_TASKRUN | abi.IORING_SETUP_DEFER_TASKRUN):
            raise Misuse("TASKRUN_FLAG needs COOP_TASKRUN or DEFER_TASKRUN", errno.EINVAL)
        if flags & abi.IORING_SETUP_DEFER_TASKRUN and not flags & abi.IORING_SETUP_SINGLE_ISSUER:
            raise Misuse("DEFER_TASKRUN needs SINGLE_ISSUER", errno.EINVAL)
        if flags & abi.IORING_SETUP_CQE32 and flags & abi.IORING_SETUP_CQE_MIXED:
            raise Misuse("CQE32 and CQE_MIXED together", errno.EINVAL)
        if entries <= 0:
            raise Misuse("entries must be > 0", errno.EINVAL)
        if entries > abi.IORING_MAX_ENTRIES:
            if not flags & abi.IORING_SETUP_CLAMP:
                raise Misuse(f"entries {entries} > {abi.IORING_MAX_ENTRIES}", errno.EINVAL)
            entries = abi.IORING_MAX_ENTRIES
        sq_entries = _roundup_pow2(entries)
        if flags & abi.IORING_SETUP_CQSIZE:
            want = int(p["cq_entries"][0])
            if want == 0:
                raise Misuse("CQSIZE with cq_entries 0", errno.EINVAL)
            if want > abi.IORING_MAX_CQ_ENTRIES:
                if not flags & abi.IORING_SETUP_CLAMP:
                    raise Misuse(f"cq_entries {want} > {abi.IORING_MAX_CQ_ENTRIES}",
                                 errno.EINVAL)
                want = abi.IORING_MAX_CQ_ENTRIES
            cq_entries = _roundup_pow2(want)
            if cq_entries < sq_entries:
                raise Misuse("cq_entries < sq_entries", errno.EINVAL)
        else:
            cq_entries = 2 * sq_entries
        if flags & abi.IORING_SETUP_CQE_MIXED and cq_entries < 2:
            raise Misuse("CQE_MIXED needs 2 CQ entries", errno.EINVAL)
        if not task.can_install():
            raise Misuse("too many open files", errno.EMFILE)
        fd = task.install(None)
        try:
            ring = Ring(self, task, fd, flags, sq_entries, cq_entries,
                        sq_idle_ms=int(p["sq_thread_idle"][0]))
        except BaseException:
            task.remove(fd)
            raise
        task.files[fd] = ring
        self.rings.append(ring)
        sq_off, cq_off, _ = abi.rings_layout(sq_entries, cq_entries, flags)
        p["sq_entries"] = sq_entries
        p["cq_entries"] = cq_entries
        p["features"] = FEATURES
        for name, value in sq_off.items():
            p["sq_off"][name] = value
        for name, value in cq_off.items():
            p["cq_off"][name] = value
        return fd, p.tobytes()

    def get_ring(self, task: Task, fd: int) -> Ring:
        """The ring at ``fd``: ``-EBADF`` if no file, ``-EOPNOTSUPP`` if not a ring (Linux)."""
        obj = task.get(fd)
        if not isinstance(obj, Ring):
            raise Misuse(f"fd {fd} is not an io_uring", errno.EOPNOTSUPP)
        return obj

    # -- io_uring_enter -----------------------------------------------------------------------

    def enter(self, task: Task, fd: int, to_submit: int, min_complete: int, flags: int,
              timeout_ms: int = -1, token: Any = None, min_wait_usec: int = 0) -> int | Wait:
        """``io_uring_enter``: submit, then maybe wait.

        ``min_wait_usec`` > 0 makes the wait a batch wait (:class:`Wait`'s ``min_deadline``):
        after that long, any ready CQE ends it even when fewer than ``min_complete``.

        Returns the syscall's result (SQEs submitted, or 0), or a :class:`Wait` when the
        caller must answer later (then :meth:`take_completed_waits` returns it with
        ``result`` set).  Raises ``Misuse(errno)`` for a failing call.
        """
        if flags & ~_ENTER_KNOWN:
            raise Misuse(f"enter flags {flags:#x}", errno.EINVAL)
        if flags & ~ENTER_FLAGS:
            raise Misuse("EXT_ARG / registered rings are not emulated", errno.EINVAL)
        if to_submit < 0 or min_complete < 0:
            raise Misuse("negative count", errno.EINVAL)
        if not 0 <= min_wait_usec <= 0xFFFFFFFF:
            raise Misuse("min_wait_usec is a u32", errno.EINVAL)
        ring = self.get_ring(task, fd)
        if ring.disabled:
            raise Misuse("ring is disabled (IORING_SETUP_R_DISABLED)", errno.EBADFD)
        now = time.monotonic()
        if ring.overflow:
            ring.flush_overflow()
        submitted = 0
        if ring.sqpoll:
            sq_thread_enter(ring, flags, now)
            submitted = to_submit
        elif to_submit:
            submitted = ring.submit(to_submit)
            if submitted != to_submit:
                return submitted
        if not flags & abi.IORING_ENTER_GETEVENTS:
            return submitted
        if ring.cq_dropped_unreported and not submitted:
            ring.cq_dropped_unreported = False
            raise Misuse("CQEs were dropped", errno.EBADR)
        min_complete = min(min_complete, ring.cq_entries)
        if ring.cq_ready() >= min_complete:
            return submitted
        if timeout_ms == 0:
            if submitted:
                return submitted
            raise Misuse("timed out", errno.ETIME)
        if ring.napi is not None and busy_poll(self, ring, min_complete):
            return submitted
        ring.stats.waits += 1
        deadline = None if timeout_ms < 0 else now + timeout_ms / 1000
        w = Wait(ring, min_complete, submitted, deadline, token)
        if min_wait_usec:
            w.min_deadline = now + min_wait_usec / 1e6
        ring.waits.append(w)
        return w

    def take_completed_waits(self) -> list[Wait]:
        """Waits that finished since the last call (their ``result`` is set)."""
        out, self.completed_waits = self.completed_waits, []
        return out

    # -- the loop's hooks ---------------------------------------------------------------------

    def on_socket_ready(self, conn: TcpReceiver) -> None:
        """Data, EOF or an error may have reached ``conn``: run the requests armed on it."""
        sf = self.sockets.file_of_conn(conn)
        if sf is not None and sf.waiters:
            self.sockets.wake(sf)

    def on_listener_ready(self, lst: Listener) -> None:
        """``lst``'s accept queue grew: run the ACCEPTs armed on it."""
        sf = self.sockets.file_of_listener(lst)
        if sf is not None and sf.waiters:
            self.sockets.wake(sf)

    def run(self, sockets: Iterable[TcpReceiver] = (),
            listeners: Iterable[Listener] = ()) -> None:
        """Both hooks for one ingest result (``BatchResult.sockets`` / ``.listeners``)."""
        for lst in listeners:
            self.on_listener_ready(lst)
        for conn in sockets:
            self.on_socket_ready(conn)

    def poll(self, now: float | None = None) -> int:
        """Periodic work: SQPOLL rings, overflow flushes, wait timeouts.  Returns work done."""
        now = time.monotonic() if now is None else now
        work = 0
        for ring in self.rings:
            if ring.closed:
                continue
            if ring.sqpoll:
                work += sq_thread_pass(ring, now)
            if ring.overflow:
                work += ring.flush_overflow()
            if ring.waits:
                ring.check_waits()
                keep = []
                for w in ring.waits:
                    if (w.min_deadline is not None and now >= w.min_deadline
                            and self._min_wait_over(w, now)):
                        self.completed_waits.append(w)
                        continue
                    if w.deadline is not None and now >= w.deadline:
                        w.result = w.submitted if w.submitted else -errno.ETIME
                        ring.stats.wait_timeouts += 1
                        self.completed_waits.append(w)
                    else:
                        keep.append(w)
                ring.waits = keep
        for hook in self.poll_hooks:
            work += hook(now)
        return work

    @staticmethod
    def _min_wait_over(w: Wait, now: float) -> bool:
        """``w``'s batch wait ran out: True when it ends now (its ``result`` set), else it has
        become a wait for any one CQE until its general deadline (Linux
        ``io_cqring_min_timer_wakeup``: no later deadline, or a CQE ready, ends it)."""
        ring = w.ring
        w.min_deadline = None
        if ring.cq_ready():
            w.result = w.submitted
            return True
        if w.deadline is None or w.deadline <= now:
            w.result = w.submitted if w.submitted else -errno.ETIME
            ring.stats.wait_timeouts += 1
            return True
        w.min_complete = 1
        return False

    def next_deadline(self) -> float | None:
        """The earliest wait deadline or SQPOLL idle point (for the loop's sleep)."""
        best: float | None = None
        for ring in self.rings:
            for w in ring.waits:
                if w.deadline is not None and (best is None or w.deadline < best):
                    best = w.deadline
                if w.min_deadline is not None and (best is None or w.min_deadline < best):
                    best = w.min_deadline
            if ring.sqpoll and not ring.sq_sleeping:
                t = ring.sq_last_active + ring.sq_idle
                if best is None or t < best:
                    best = t
        return best

    # -- close --------------------------------------------------------------------------------

    def close_ring(self, ring: Ring) -> None:
        """Tear a ring down (its fd was closed or its task died)."""
        ring.close()
        if ring in self.rings:
            self.rings.remove(ring)

    def close_fd(self, task: Task, fd: int) -> None:
        """``close(fd)`` for any file: rings are torn down, sockets released."""
        obj = task.remove(fd)
        if isinstance(obj, Ring):
            self.close_ring(obj)
        elif isinstance(obj, SocketFile):
            self.sockets.close(obj)
        elif hasattr(obj, "close"):
            obj.close()

    # -- mmap -----------------------------------------------------------------------------------

    def mmap(self, task: Task, fd: int, offset: int, length: int) -> tuple[Region, int]:
        """``mmap(ring_fd, offset)``: the kernel region and the address in the task's mm
        (:func:`driver_proc.memmap.io_uring_mmap`)."""
        return io_uring_mmap(task, fd, offset, length)

    # -- io_uring_register ------------------------------------------------------------------------

    def register(self, task: Task, fd: int, opcode: int, nr_args: int,
                 blobs: list[bytes]) -> tuple[int, list[bytes]]:
        """``io_uring_register``: dispatch to the opcode's handler
        (:func:`driver_proc.register.io_uring_register`)."""
        return io_uring_register(self, task, fd, opcode, nr_args, blobs)

    # -- stats ----------------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        return {"rings": [r.stats_dict() for r in self.rings if not r.closed]}
