"""The io_uring instance (Linux ``io_uring/io_uring.c``): SQ consumption, CQ posting, overflow.

One :class:`Ring` is one ``struct io_ring_ctx``: it consumes SQEs (``io_submit_sqes``),
checks each against the opcode table and its prep (``io_init_req``), posts CQEs into the CQ
or onto the overflow list, and completes the ``io_uring_enter`` calls waiting on it
(:class:`Wait`; newer Linux keeps ``io_cqring_wait`` in ``io_uring/wait.c``).  A
:class:`Request` is one in-flight ``struct io_kiocb`` armed on a socket; the opcodes that make
them live in their own modules (:mod:`driver_proc.net`, ...), the table in
:mod:`driver_proc.opdef`.  The syscall half of ``io_uring.c`` (``io_uring_setup``,
``io_uring_enter``, release) is :class:`driver_proc.setup.IoUring`, which owns the rings.

Shared memory, and who writes what (uapi-layouts.md §3-4)
--------------------------------------------------------
* **Rings region** ``/zcrx.<run>.kernel.t<tid>.ring<fd>.rings`` (kernel memory; the app maps it
  at ``IORING_OFF_SQ_RING`` and ``IORING_OFF_CQ_RING``: ``IORING_FEAT_SINGLE_MMAP``).  The
  ``struct io_rings`` header of Linux >= 6.6 (:func:`shared.abi.rings_layout`): SQ head (kernel)
  @0, SQ tail (app) @4, CQ head (app) @8, CQ tail (kernel) @12, masks/entries (kernel, written
  once), ``sq_dropped`` (kernel) @32, ``sq_flags`` (kernel) @36, ``cq_flags`` (app) @40,
  ``cq_overflow`` (kernel) @44, CQEs (kernel) @64, then the SQ index array (app) unless
  ``IORING_SETUP_NO_SQARRAY``.
* **SQE region** ``...ring<fd>.sqes`` (``IORING_OFF_SQES``): written by the app, read by the
  kernel, which copies each SQE before looking at it (``IORING_FEAT_SUBMIT_STABLE``).
* Both are created by :class:`Ring` and unlinked when it closes, with every other region in
  ``Ring.mmap_regions`` (buffer rings, zcrx refill queues).

Every counter the app writes (SQ tail, CQ head) is read through an untrusted ring side: the
implied count is clamped to the ring size and the fault counted; every SQE is validated field
by field as Linux's ``io_init_req`` and the opcode's ``prep`` do, and a bad one completes with
``-errno`` in its CQE (counted in ``stats.bad_sqes``).  Nothing an app writes raises out of
this module.

Semantics and departures
------------------------
* **Task work runs at once.**  Completions are posted from the kernel process as soon as the
  data is there; ``IORING_SETUP_DEFER_TASKRUN`` is validated (it needs ``SINGLE_ISSUER``) and
  remembered (zcrx registration requires it), but CQEs do not wait for ``io_uring_enter``.
  ``IORING_SQ_TASKRUN`` is therefore never set.
* **Waiting.**  A :class:`Wait` completes when enough CQEs are in the CQ (checked on every
  post), on its timeout (``-ETIME``, by :meth:`driver_proc.setup.IoUring.poll`), or when the
  ring is closed (``-EBADF``).
* **CQ overflow.**  A CQE that does not fit goes to a bounded overflow list
  (:data:`OVERFLOW_LIMIT` x CQ size), ``IORING_SQ_CQ_OVERFLOW`` is set, and later CQEs queue
  behind it to keep the order; the list is flushed whenever room appears (every post, every
  ``io_uring_enter``, every :meth:`driver_proc.setup.IoUring.poll`).  A CQE that does not fit
  in the list either is dropped and counted in ``cq_overflow``; the next waiting
  ``io_uring_enter`` then fails once with ``-EBADR``, as Linux does with
  ``IORING_FEAT_NODROP``.
* Big CQEs of one request (zcrx's RECV_ZC) are posted by :meth:`Ring.post_big_batch` straight
  into the CQ and never overflow (Linux ``io_defer_get_uncommited_cqe``).
* ``IOSQE_CQE_SKIP_SUCCESS`` suppresses the successful final CQE of single-shot requests; it is
  ignored on multishot requests.
* **Not emulated, refused with -EINVAL:** ``IOSQE_IO_LINK``/``IO_HARDLINK``/``IO_DRAIN``.
  ``IOSQE_FIXED_FILE`` finds no registered file table (``-EBADF``) and a nonzero
  ``personality`` no registered personality (``-EINVAL``), exactly as on a ring that never
  registered any.
"""

from __future__ import annotations

import errno
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
from numpy.typing import NDArray

from driver_proc.files import SocketFile, Task
from driver_proc.kbuf import BufRing
from driver_proc.sqpoll import DEFAULT_SQ_IDLE_MS
from shared import abi
from shared.errors import Misuse, ZcrxError
from shared.ring import U32, RingConsumer, RingLayout, RingProducer
from shared.shm import Region, region_name

if TYPE_CHECKING:
    # Only for annotations: setup.py builds the rings and imports this module.
    from driver_proc.setup import IoUring

__all__ = [
    "OVERFLOW_LIMIT",
    "Request",
    "Ring",
    "RingStats",
    "Sqe",
    "Wait",
]

#: The overflow list holds at most this many times the CQ size.
OVERFLOW_LIMIT = 2
_SQE_FLAGS_VALID = (1 << 7) - 1
_SQE_FLAGS_UNSUPPORTED = abi.IOSQE_IO_LINK | abi.IOSQE_IO_HARDLINK | abi.IOSQE_IO_DRAIN

# struct io_rings words (u32 index = byte offset / 4), >= 6.6 layout (abi.rings_layout).
_W_SQ_MASK, _W_CQ_MASK, _W_SQ_ENTRIES, _W_CQ_ENTRIES = 4, 5, 6, 7
_W_SQ_DROPPED, _W_SQ_FLAGS, _W_CQ_OVERFLOW = 8, 9, 11


# --------------------------------------------------------------------------------------------
# SQEs
# --------------------------------------------------------------------------------------------


class Sqe(NamedTuple):
    """The fields of one SQE as Python ints (a stable copy: IORING_FEAT_SUBMIT_STABLE)."""

    opcode: int
    flags: int
    ioprio: int
    fd: int
    off: int
    addr: int
    len: int
    op_flags: int  # the u32 union at 28: msg_flags, accept_flags, nop_flags, ...
    user_data: int
    buf_index: int  # also buf_group
    personality: int
    file_index: int  # the u32 union at 44
    addr3: int
    pad2: int


_SQE_COLUMNS = ("opcode", "flags", "ioprio", "fd", "off", "addr", "len", "msg_flags",
                "user_data", "buf_index", "personality", "file_index", "addr3", "attr_type_mask")


def _sqes_from_batch(batch: np.ndarray) -> list[Sqe]:
    cols = [batch[name].tolist() for name in _SQE_COLUMNS]
    return [Sqe._make(t) for t in zip(*cols, strict=True)]

# --------------------------------------------------------------------------------------------
# Stats, waits
# --------------------------------------------------------------------------------------------


@dataclass
class RingStats:
    """Per-ring counters (plain ints; copied into ``stats`` replies)."""

    sqes_submitted: int = 0   #: SQEs consumed (including those that failed)
    bad_sqes: int = 0         #: SQEs completed with a validation error
    sq_dropped: int = 0       #: SQ array entries with an index >= sq_entries
    sq_tail_faults: int = 0   #: impossible SQ tail values written by the app
    cq_head_faults: int = 0   #: impossible CQ head values written by the app
    buf_ring_faults: int = 0  #: impossible buffer-ring tails written by the app
    cqes_posted: int = 0      #: CQEs written into the CQ (including flushed overflow)
    cqes_overflowed: int = 0  #: CQEs that went through the overflow list
    cqes_dropped: int = 0     #: CQEs lost because the overflow list was full too
    cqes_skipped: int = 0     #: successful CQEs suppressed by IOSQE_CQE_SKIP_SUCCESS
    mshot_terminated_cq_full: int = 0  #: multishot requests ended because the CQ was full
    recv_bytes: int = 0       #: bytes copied to the app by RECV
    send_bytes: int = 0       #: bytes SEND queued on sockets
    recv_cqes: int = 0
    accepts: int = 0
    enobufs: int = 0          #: RECVs that found no provided buffer
    efaults: int = 0          #: user addresses that did not resolve
    zero_len_bufs: int = 0    #: provided buffers of length 0 met (ends the request, as Linux)
    waits: int = 0            #: io_uring_enter calls that had to wait
    wait_timeouts: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(eq=False)
class Wait:
    """A deferred ``io_uring_enter`` waiting for ``min_complete`` CQEs.

    ``token`` is whatever the syscall layer needs to answer later (peer and request).
    ``result`` is set when done: the value the syscall returns (>= 0, or -errno).

    ``min_deadline`` is the end of the batch wait (``io_uring_getevents_arg.min_wait_usec``,
    ``IORING_FEAT_MIN_TIMEOUT``): then the wait ends if any CQE is ready, or if there is no
    later general deadline (``-ETIME`` with none ready); otherwise any one CQE ends it from
    then on (Linux ``io_cqring_min_timer_wakeup``).
    """

    ring: Ring
    min_complete: int
    submitted: int
    deadline: float | None
    token: Any = None
    result: int | None = None
    min_deadline: float | None = None


# --------------------------------------------------------------------------------------------
# Requests
# --------------------------------------------------------------------------------------------


class Request:
    """An in-flight request (``struct io_kiocb``) that may wait on a socket.

    Subclasses implement :meth:`attempt`.  A request is *armed* while on its socket's wait
    queue; :meth:`complete` posts the final CQE (no ``IORING_CQE_F_MORE``) and retires it.
    """

    multishot = False

    def __init__(self, ring: Ring, sqe: Sqe, sock: SocketFile) -> None:
        self.ring = ring
        self.user_data = sqe.user_data
        self.sqe_flags = sqe.flags
        self.sock = sock
        self.armed = False
        self.done = False

    def issue(self) -> None:
        """First attempt, right after submission."""
        self.ring.inflight.add(self)
        self.attempt(issue=True)

    def attempt(self, issue: bool) -> None:
        raise NotImplementedError

    def wake(self) -> None:
        """The socket reported readiness: try again (part of the Waiter protocol)."""
        if not self.done:
            self.attempt(issue=False)

    def arm(self) -> None:
        if not self.armed and not self.done:
            self.sock.waiters[self] = None
            self.armed = True

    def disarm(self) -> None:
        if self.armed:
            self.sock.waiters.pop(self, None)
            self.armed = False

    def complete(self, res: int, cflags: int = 0) -> None:
        """Post the final CQE and retire the request."""
        if self.done:
            return
        self.done = True
        self.disarm()
        self.ring.inflight.discard(self)
        if res >= 0 and self.sqe_flags & abi.IOSQE_CQE_SKIP_SUCCESS and not self.multishot:
            self.ring.stats.cqes_skipped += 1
            return
        self.ring.post(self.user_data, res, cflags)

    def cancel(self, res: int) -> None:
        """Complete with ``res`` (socket closed under the request)."""
        self.complete(res)

    def drop(self) -> None:
        """Retire without a CQE (the ring itself is going away)."""
        self.done = True
        self.disarm()


# --------------------------------------------------------------------------------------------
# The ring
# --------------------------------------------------------------------------------------------


class Inflight(set["Request"]):
    """A ring's requests in flight, counting every one ever added (``adds``): who keeps a
    view derived from the set knows from ``adds`` whether a request joined since."""

    def __init__(self) -> None:
        super().__init__()
        self.adds = 0

    def add(self, req: Request) -> None:
        self.adds += 1
        super().add(req)


class Ring:
    """One io_uring instance of one task (``struct io_ring_ctx``)."""

    def __init__(self, uring: IoUring, task: Task, fd: int, flags: int, sq_entries: int,
                 cq_entries: int, sq_idle_ms: int = DEFAULT_SQ_IDLE_MS) -> None:
        self.uring = uring
        self.task = task
        self.fd = fd
        self.flags = flags
        self.sq_entries = sq_entries
        self.cq_entries = cq_entries
        self.stats = RingStats()
        self.closed = False
        #: IORING_REGISTER_NAPI settings (:class:`driver_proc.napi.RingNapi`); None: never set
        self.napi: Any = None
        self.disabled = bool(flags & abi.IORING_SETUP_R_DISABLED)
        self.mixed = bool(flags & abi.IORING_SETUP_CQE_MIXED)
        self.inflight = Inflight()
        #: driver_proc.zcrx's view of this ring's RECV_ZC requests that may hold data
        #: (``RecvZcRequest._may_fold``)
        self.zcrx_fold: Any = None
        self.buf_rings: dict[int, BufRing] = {}
        self.waits: list[Wait] = []
        self.overflow: deque[tuple[int, int, int, tuple[int, int] | None]] = deque()
        self.overflow_limit = OVERFLOW_LIMIT * cq_entries
        self.cq_dropped_unreported = False
        #: Kernel regions the app may mmap, by mmap offset (zcrx adds its RQ regions here).
        self.mmap_regions: dict[int, Region] = {}
        #: Called with the ring during close, after requests are cancelled (zcrx scrub...).
        self.teardown_hooks: list[Callable[[Ring], None]] = []
        #: Other subsystems' per-ring state (e.g. ``extra["zcrx"]``).
        self.extra: dict[str, Any] = {}
        # SQPOLL emulation
        self.sqpoll = bool(flags & abi.IORING_SETUP_SQPOLL)
        self.sq_idle = (sq_idle_ms or DEFAULT_SQ_IDLE_MS) / 1000
        self.sq_last_active = time.monotonic()
        self.sq_sleeping = False
        self._sq_dropped = 0
        self._cq_overflow = 0

        sq_off, cq_off, size = abi.rings_layout(sq_entries, cq_entries, flags)
        self.sq_off, self.cq_off = sq_off, cq_off
        tag = f"t{task.tid}.ring{fd}"
        run = uring.run_id
        sqe_dtype = abi.io_uring_sqe128 if flags & abi.IORING_SETUP_SQE128 else abi.io_uring_sqe
        self.rings_region = Region.create(region_name(run, "kernel", f"{tag}.rings"), size,
                                          uid=task.uid)
        try:
            self.sqes_region = Region.create(region_name(run, "kernel", f"{tag}.sqes"),
                                             abi.sqes_size(sq_entries, flags), uid=task.uid)
        except BaseException:
            self.rings_region.close()
            raise
        rbuf = self.rings_region.buf
        sbuf = self.sqes_region.buf
        assert rbuf is not None and sbuf is not None
        self.words = np.frombuffer(rbuf, dtype="<u4", count=16)
        self.words[_W_SQ_MASK] = sq_entries - 1
        self.words[_W_CQ_MASK] = cq_entries - 1
        self.words[_W_SQ_ENTRIES] = sq_entries
        self.words[_W_CQ_ENTRIES] = cq_entries
        self.sqes = np.frombuffer(sbuf, dtype=sqe_dtype, count=sq_entries)
        self.no_sqarray = bool(flags & abi.IORING_SETUP_NO_SQARRAY)
        if self.no_sqarray:
            sq_layout = RingLayout(sq_entries, sqe_dtype, head=sq_off["head"],
                                   tail=sq_off["tail"], entries=0)
            self.sq = RingConsumer(rbuf, sq_layout, entries_buf=sbuf, untrusted=True)
        else:
            sq_layout = RingLayout(sq_entries, np.dtype("<u4"), head=sq_off["head"],
                                   tail=sq_off["tail"], entries=sq_off["array"])
            self.sq = RingConsumer(rbuf, sq_layout, untrusted=True)
        cqe_dtype = abi.io_uring_cqe32 if flags & abi.IORING_SETUP_CQE32 else abi.io_uring_cqe
        self.cqe_dtype = cqe_dtype
        cq_layout = RingLayout(cq_entries, cqe_dtype, head=cq_off["head"], tail=cq_off["tail"],
                               entries=cq_off["cqes"])
        self.cq = RingProducer(rbuf, cq_layout, untrusted=True)
        self.mmap_regions[abi.IORING_OFF_SQ_RING] = self.rings_region
        self.mmap_regions[abi.IORING_OFF_CQ_RING] = self.rings_region
        self.mmap_regions[abi.IORING_OFF_SQES] = self.sqes_region

    def __repr__(self) -> str:
        return (f"<Ring t{self.task.tid} fd={self.fd} sq={self.sq_entries} cq={self.cq_entries}"
                f" flags={self.flags:#x} inflight={len(self.inflight)}>")

    # -- submission ------------------------------------------------------------------------

    def sq_ready(self) -> int:
        """SQEs the app published and the kernel has not consumed (clamped)."""
        n = self.sq.ready()
        self._sync_faults()
        return n

    def submit(self, to_submit: int) -> int:
        """Consume up to ``to_submit`` SQEs (Linux ``io_submit_sqes``); return how many.

        An SQ array entry naming no SQE is dropped (``sq_dropped``) and ends this call; an SQE
        failing validation completes with its errno and, without ``IORING_SETUP_SUBMIT_ALL``,
        also ends the call (it counts as submitted).
        """
        if to_submit <= 0 or self.closed:
            return 0
        left = min(to_submit, self.sq.ready())
        self._sync_faults()
        done = 0
        while left > 0 and not self.closed:
            view = self.sq.peek(left)
            k = len(view)
            if k == 0:
                break
            if self.no_sqarray:
                batch = view.copy()
                stop = k
            else:
                idx = view.astype(np.int64)
                bad = np.flatnonzero(idx >= self.sq_entries)
                stop = int(bad[0]) if len(bad) else k
                batch = self.sqes[idx[:stop]]  # a copy: SUBMIT_STABLE
            n, stopped = self._submit_batch(batch)
            done += n
            if self.closed:
                break
            self.sq.release(n)
            left -= n
            if stopped:
                break
            if stop < k:
                # An SQ array entry naming no SQE: consumed, counted, and the call ends.
                self.sq.release(1)
                self._sq_dropped = (self._sq_dropped + 1) & U32
                self.words[_W_SQ_DROPPED] = self._sq_dropped
                self.stats.sq_dropped += 1
                break
        self.stats.sqes_submitted += done
        return done

    def _submit_batch(self, batch: np.ndarray) -> tuple[int, bool]:
        """Issue each SQE; return (how many were consumed, stopped early on an error)."""
        submit_all = bool(self.flags & abi.IORING_SETUP_SUBMIT_ALL)
        n = 0
        for sqe in _sqes_from_batch(batch):
            n += 1
            ok = self._submit_one(sqe)
            if self.closed:
                return n, True
            if not ok and not submit_all:
                return n, True
        return n, False

    def _submit_one(self, sqe: Sqe) -> bool:
        try:
            req = self._init_req(sqe)
        except ZcrxError as exc:
            self.stats.bad_sqes += 1
            e = exc.errno if exc.errno is not None else errno.EINVAL
            self.post(sqe.user_data, -e, 0)
            return False
        if req is not None:
            req.issue()
        return True

    def _init_req(self, sqe: Sqe) -> Request | None:
        """Linux ``io_init_req`` + the opcode's prep."""
        op = sqe.opcode
        if op >= abi.IORING_OP_LAST:
            raise Misuse(f"opcode {op}", errno.EINVAL)
        if sqe.flags & ~_SQE_FLAGS_VALID:
            raise Misuse(f"sqe flags {sqe.flags:#x}", errno.EINVAL)
        if sqe.flags & _SQE_FLAGS_UNSUPPORTED:
            raise Misuse("links and drain are not emulated", errno.EINVAL)
        d = self.uring.opcodes.get(op)
        if d is None:
            raise Misuse(f"opcode {op} not emulated", errno.EOPNOTSUPP)
        if sqe.flags & abi.IOSQE_BUFFER_SELECT and not d.buffer_select:
            raise Misuse(f"{d.name}: IOSQE_BUFFER_SELECT", errno.EOPNOTSUPP)
        if not d.ioprio and sqe.ioprio:
            raise Misuse(f"{d.name}: ioprio must be 0", errno.EINVAL)
        if not d.iopoll and self.flags & abi.IORING_SETUP_IOPOLL:
            raise Misuse(f"{d.name} on an IOPOLL ring", errno.EINVAL)
        if sqe.personality:
            raise Misuse(f"personality {sqe.personality} not registered", errno.EINVAL)
        if d.needs_file:
            if sqe.flags & abi.IOSQE_FIXED_FILE:
                raise Misuse("no registered files", errno.EBADF)
            self.task.get(sqe.fd)
        elif sqe.flags & abi.IOSQE_FIXED_FILE and op != abi.IORING_OP_NOP:
            raise Misuse("no registered files", errno.EBADF)
        return d.prep(self, sqe)

    # -- completion -------------------------------------------------------------------------

    def _sync_faults(self) -> None:
        self.stats.sq_tail_faults = self.sq.faults
        self.stats.cq_head_faults = self.cq.faults

    def cq_space(self) -> int:
        """Free CQ slots (re-reading the app's head, clamped)."""
        n = self.cq.space()
        self.stats.cq_head_faults = self.cq.faults
        return n

    def cq_ready(self) -> int:
        """CQEs in the CQ the app has not consumed yet."""
        return self.cq_entries - self.cq_space()

    def cq_room(self) -> int:
        """How many CQEs can go straight into the CQ now (0 while the overflow list is busy)."""
        if self.overflow:
            self.flush_overflow()
            if self.overflow:
                return 0
        return self.cq_space()

    def _write_slot(self, slot: np.ndarray, user_data: int, res: int, flags: int,
                    big: tuple[int, int] | None) -> None:
        slot["user_data"] = user_data
        slot["res"] = res
        slot["flags"] = flags
        if self.cqe_dtype is abi.io_uring_cqe32:
            slot["big_cqe"] = big if big is not None else (0, 0)

    def _put(self, user_data: int, res: int, flags: int, big: tuple[int, int] | None) -> bool:
        """Write one CQE into the CQ if it fits; False if not."""
        if big is not None and self.mixed:
            return self._put_mixed_big(user_data, res, flags, big)
        view = self.cq.reserve(1)
        if len(view) == 0:
            return False
        self._write_slot(view[0:1], user_data, res, flags, big)
        self.cq.submit(1)
        return True

    def _put_mixed_big(self, user_data: int, res: int, flags: int,
                       big: tuple[int, int]) -> bool:
        """A 32-byte CQE on a CQE_MIXED ring: two slots, with an F_SKIP filler at the wrap."""
        pos = self.cq.tail & (self.cq_entries - 1)
        need = 2 + (1 if pos == self.cq_entries - 1 else 0)
        if self.cq.space() < need:
            return False
        if need == 3:
            self._write_slot(self.cq.reserve(1)[0:1], 0, 0, abi.IORING_CQE_F_SKIP, None)
            self.cq.submit(1)
        view = self.cq.reserve(2)
        raw = view.view(abi.io_uring_cqe32)  # two 16-byte slots seen as one 32-byte CQE
        raw["user_data"] = user_data
        raw["res"] = res
        raw["flags"] = flags | abi.IORING_CQE_F_32
        raw["big_cqe"] = big
        self.cq.submit(2)
        return True

    def post(self, user_data: int, res: int, flags: int,
             big: tuple[int, int] | None = None) -> bool:
        """Post one CQE; overflow (or drop) if the CQ is full.  True if it went to the CQ."""
        if self.closed:
            return False
        if self.overflow:
            self.flush_overflow()
        if not self.overflow and self._put(user_data, res, flags, big):
            self.stats.cqes_posted += 1
            if self.waits:
                self.check_waits()
            return True
        self._overflow(user_data, res, flags, big)
        return False

    def post_batch(self, user_data: int, res: NDArray[np.int64],
                   flags: NDArray[np.int64]) -> None:
        """Post ``len(res)`` 16-byte CQEs of one request in order (the caller checked
        :meth:`cq_room`; whatever does not fit goes to the overflow list)."""
        n = len(res)
        done = 0
        if not self.overflow and not self.closed:
            while done < n:
                view = self.cq.reserve(n - done)
                k = len(view)
                if k == 0:
                    break
                view["user_data"] = user_data
                view["res"] = res[done:done + k]
                view["flags"] = flags[done:done + k]
                if self.cqe_dtype is abi.io_uring_cqe32:
                    view["big_cqe"] = 0
                self.cq.submit(k)
                done += k
            self.stats.cqes_posted += done
        for i in range(done, n):
            self._overflow(user_data, int(res[i]), int(flags[i]), None)
        if self.waits:
            self.check_waits()

    def post_big_batch(self, user_data: int | NDArray[np.uint64], res: NDArray[np.int64],
                       flags: NDArray[np.int64], big0: NDArray[np.int64]) -> int:
        """Post 32-byte CQEs of one request (second half ``(big0[i], 0)``, e.g. a zcrx CQE's
        ``off``) straight into the CQ, in order, **never** into the overflow list (Linux
        ``io_defer_get_uncommited_cqe``).  On a CQE_MIXED ring each takes two slots and gets
        ``IORING_CQE_F_32``.  ``user_data`` is one request's, or one per CQE (the CQEs of
        several requests' turns, in the order they would have been posted one by one).
        Returns how many were posted (the rest did not fit; 0 on a ring with 16-byte CQEs or
        while overflowed CQEs wait)."""
        ud: Any = user_data
        one = isinstance(ud, int)
        if self.closed:
            return 0
        if self.overflow:
            self.flush_overflow()
            if self.overflow:
                return 0
        n = len(res)
        done = 0
        if self.mixed:
            while done < n and self._put_mixed_big(
                    ud if one else int(ud[done]),
                    int(res[done]), int(flags[done]), (int(big0[done]), 0)):
                done += 1
        elif self.cqe_dtype is abi.io_uring_cqe32:
            while done < n:
                view = self.cq.reserve(n - done)
                k = len(view)
                if k == 0:
                    break
                view["user_data"] = ud if one else ud[done:done + k]
                view["res"] = res[done:done + k]
                view["flags"] = flags[done:done + k]
                view["zcrx_off"] = big0[done:done + k]
                view["zcrx_pad"] = 0
                self.cq.submit(k)
                done += k
        if done:
            self.stats.cqes_posted += done
            if self.waits:
                self.check_waits()
        return done

    def _overflow(self, user_data: int, res: int, flags: int,
                  big: tuple[int, int] | None) -> None:
        if self.closed:
            return
        if len(self.overflow) >= self.overflow_limit:
            self.stats.cqes_dropped += 1
            self._cq_overflow = (self._cq_overflow + 1) & U32
            self.words[_W_CQ_OVERFLOW] = self._cq_overflow
            self.cq_dropped_unreported = True
            return
        self.overflow.append((user_data, res, flags, big))
        self.stats.cqes_overflowed += 1
        self.words[_W_SQ_FLAGS] |= abi.IORING_SQ_CQ_OVERFLOW

    def flush_overflow(self) -> int:
        """Move overflowed CQEs into the CQ while there is room; return how many moved."""
        moved = 0
        ov = self.overflow
        while ov:
            ud, res, flags, big = ov[0]
            if not self._put(ud, res, flags, big):
                break
            ov.popleft()
            moved += 1
        if moved:
            self.stats.cqes_posted += moved
        if not ov:
            self.words[_W_SQ_FLAGS] &= ~abi.IORING_SQ_CQ_OVERFLOW & U32
        if moved and self.waits:
            self.check_waits()
        return moved

    def check_waits(self) -> None:
        """Complete the waits whose CQE count is reached."""
        if not self.waits:
            return
        ready = self.cq_ready()
        keep = []
        for w in self.waits:
            if ready >= w.min_complete:
                w.result = w.submitted
                self.uring.completed_waits.append(w)
            else:
                keep.append(w)
        self.waits = keep

    # -- SQ flags -----------------------------------------------------------------------------

    def set_sq_flag(self, bit: int) -> None:
        self.words[_W_SQ_FLAGS] |= bit

    def clear_sq_flag(self, bit: int) -> None:
        self.words[_W_SQ_FLAGS] &= ~bit & U32

    @property
    def sq_flags(self) -> int:
        return int(self.words[_W_SQ_FLAGS])

    # -- teardown -----------------------------------------------------------------------------

    def close(self) -> None:
        """Tear down: cancel requests, fail waits, run hooks, unlink the regions.  Idempotent."""
        if self.closed:
            return
        for req in list(self.inflight):
            req.drop()
        self.inflight.clear()
        self.closed = True
        for w in self.waits:
            w.result = -errno.EBADF
            self.uring.completed_waits.append(w)
        self.waits = []
        for hook in self.teardown_hooks:
            hook(self)
        for br in self.buf_rings.values():
            br.close()
        self.buf_rings.clear()
        self.overflow.clear()
        self.sq.detach()
        self.cq.detach()
        self.words = np.zeros(16, dtype="<u4")
        self.sqes = np.empty(0, dtype=self.sqes.dtype)
        seen: set[int] = set()
        for region in [self.rings_region, self.sqes_region, *self.mmap_regions.values()]:
            if id(region) not in seen and region.is_owner:
                seen.add(id(region))
                region.close()
        self.mmap_regions.clear()

    def stats_dict(self) -> dict[str, Any]:
        self._sync_faults()
        d: dict[str, Any] = self.stats.as_dict()
        d.update(fd=self.fd, task=self.task.tid, flags=self.flags, sq_entries=self.sq_entries,
                 cq_entries=self.cq_entries, inflight=len(self.inflight),
                 overflow=len(self.overflow), buf_rings=sorted(self.buf_rings))
        for br in self.buf_rings.values():
            d["buf_ring_faults"] += br.faults
        if self.napi is not None:  # only rings that used IORING_REGISTER_NAPI
            n = self.napi
            d["napi"] = {"track_mode": n.track_mode, "busy_poll_to": n.busy_poll_to,
                         "prefer_busy_poll": n.prefer_busy_poll, "ids": sorted(n.ids),
                         "busy_polls": n.busy_polls, "busy_poll_hits": n.busy_poll_hits}
        return d
