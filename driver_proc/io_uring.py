"""io_uring in the emulated kernel: instances, SQE processing, requests, CQE posting.

One :class:`Ring` is one ``struct io_ring_ctx``.  :class:`IoUring` is the subsystem the
kernel process runs: it creates rings (``io_uring_setup``), serves ``io_uring_enter`` /
``io_uring_register`` / ``mmap`` of ring fds, and runs the requests armed on sockets when the
NAPI path reports readiness (:meth:`IoUring.on_socket_ready`, :meth:`IoUring.on_listener_ready`,
:meth:`IoUring.run`).  No zmq here: the syscall layer (:mod:`driver_proc.syscalls`) turns
messages into these calls, and replies to deferred ``io_uring_enter`` waits when
:meth:`IoUring.take_completed_waits` hands them back.

Shared memory, and who writes what (uapi-layouts.md §3-4, §6)
--------------------------------------------------------------
* **Rings region** ``/zcrx.<run>.kernel.t<tid>.ring<fd>.rings`` (kernel memory; the app maps it
  at ``IORING_OFF_SQ_RING`` and ``IORING_OFF_CQ_RING``: ``IORING_FEAT_SINGLE_MMAP``).  The
  ``struct io_rings`` header of Linux >= 6.6 (:func:`shared.abi.rings_layout`): SQ head (kernel)
  @0, SQ tail (app) @4, CQ head (app) @8, CQ tail (kernel) @12, masks/entries (kernel, written
  once), ``sq_dropped`` (kernel) @32, ``sq_flags`` (kernel) @36, ``cq_flags`` (app) @40,
  ``cq_overflow`` (kernel) @44, CQEs (kernel) @64, then the SQ index array (app) unless
  ``IORING_SETUP_NO_SQARRAY``.
* **SQE region** ``...ring<fd>.sqes`` (``IORING_OFF_SQES``): written by the app, read by the
  kernel, which copies each SQE before looking at it (``IORING_FEAT_SUBMIT_STABLE``).
* **Provided-buffer rings**: app memory (``ring_addr`` resolved through the task's mm, kept
  mapped while registered, like Linux pins the pages) or, with ``IOU_PBUF_RING_MMAP``, a kernel
  region ``...ring<fd>.pbuf<bgid>`` mapped at ``IORING_OFF_PBUF_RING | bgid << 16``.  The app
  writes the entries and the u16 tail; the kernel keeps the head privately.
* **Receive buffers** (``sqe.addr`` or provided buffers) are app memory: the kernel writes the
  received bytes there through :meth:`driver_proc.mm.Mm.resolve`.

Every counter the app writes (SQ tail, CQ head, buffer-ring tail) is read through an untrusted
ring side: the implied count is clamped to the ring size and the fault counted; every SQE is
validated field by field as Linux's ``io_init_req`` and the opcode's ``prep`` do, and a bad one
completes with ``-errno`` in its CQE (counted in ``stats.bad_sqes``).  Nothing an app writes
raises out of this module.

Semantics and departures
------------------------
* **Task work runs at once.**  Completions are posted from the kernel process as soon as the
  data is there; ``IORING_SETUP_DEFER_TASKRUN`` is validated (it needs ``SINGLE_ISSUER``) and
  remembered (zcrx registration requires it), but CQEs do not wait for ``io_uring_enter``.
  ``IORING_SQ_TASKRUN`` is therefore never set.
* **Waiting.**  ``io_uring_enter`` with ``IORING_ENTER_GETEVENTS`` and fewer than
  ``min_complete`` CQEs ready becomes a :class:`Wait`; it completes when enough CQEs are in the
  CQ, on its timeout (``-ETIME``), or when the ring is closed (``-EBADF``).  The timeout is a
  plain ``timeout_ms`` field instead of ``IORING_ENTER_EXT_ARG`` (which is refused).
* **CQ overflow.**  A CQE that does not fit goes to a bounded overflow list
  (:data:`OVERFLOW_LIMIT` x CQ size), ``IORING_SQ_CQ_OVERFLOW`` is set, and later CQEs queue
  behind it to keep the order; the list is flushed whenever room appears (every post, every
  ``io_uring_enter``, every :meth:`IoUring.poll`).  A CQE that does not fit in the list either
  is dropped and counted in ``cq_overflow``; the next waiting ``io_uring_enter`` then fails
  once with ``-EBADR``, as Linux does with ``IORING_FEAT_NODROP``.
* **Multishot and a full CQ** (Linux ``io_req_post_cqe`` failing): the chunk that cannot be
  posted with ``IORING_CQE_F_MORE`` becomes the request's final CQE (same result and buffer,
  without F_MORE), queued on the overflow list; nothing is lost and the app re-arms.
* **Opcodes.**  NOP (``IORING_NOP_INJECT_RESULT``, ``IORING_NOP_CQE32``), ACCEPT (single and
  ``IORING_ACCEPT_MULTISHOT``, ``IORING_ACCEPT_DONTWAIT``/``POLL_FIRST``, writes the peer's
  sockaddr when ``addr`` is given), RECV (into ``addr``/``len``, or ``IOSQE_BUFFER_SELECT``
  from a provided-buffer ring, and ``IORING_RECV_MULTISHOT``), CLOSE.  Other opcodes below
  ``IORING_OP_LAST`` complete with ``-EOPNOTSUPP`` (not emulated) unless another subsystem
  registered them (:meth:`IoUring.register_opcode`, e.g. RECV_ZC); opcodes at or past
  ``IORING_OP_LAST`` are ``-EINVAL``.
* **Not emulated, refused with -EINVAL:** ``IOSQE_IO_LINK``/``IO_HARDLINK``/``IO_DRAIN``,
  ``IORING_RECVSEND_BUNDLE``, incremental buffer rings (``IOU_PBUF_RING_INC``), MSG_* flags
  other than ``MSG_DONTWAIT``/``MSG_WAITALL``/``MSG_NOSIGNAL``/``MSG_CMSG_CLOEXEC``, setup
  flags ``NO_MMAP``, ``REGISTERED_FD_ONLY``, ``ATTACH_WQ``, ``SQE_MIXED``, ``SQ_REWIND``,
  ``HYBRID_IOPOLL``.  ``IOSQE_FIXED_FILE`` and direct descriptors find no registered file table
  (``-EBADF`` / ``-ENXIO``), exactly as on a ring that never registered files.
* ``IOSQE_CQE_SKIP_SUCCESS`` suppresses the successful final CQE of single-shot requests; it is
  ignored on multishot requests.
* A RECV multishot ``len`` caps each CQE's bytes (Linux >= 6.10 semantics); its total byte
  limit (``optlen``) is not emulated (``file_index`` must be 0).
* **SQPOLL.**  The kernel loop plays the SQ thread: :meth:`IoUring.poll` consumes new SQEs of
  every SQPOLL ring; after ``sq_thread_idle`` ms without work it sets
  ``IORING_SQ_NEED_WAKEUP`` (then re-checks the SQ) and stops polling that ring until an
  ``io_uring_enter`` with ``IORING_ENTER_SQ_WAKEUP``.
"""

from __future__ import annotations

import errno
import os
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import numpy as np
from numpy.typing import NDArray

from driver_proc.files import (
    AF_INET,
    AF_INET6,
    SOCK_CLOEXEC,
    SOCK_NONBLOCK,
    SocketFile,
    Sockets,
    Task,
)
from driver_proc.mm import PROT_READ, PROT_WRITE
from driver_proc.tcp import Listener, TcpReceiver
from shared import abi
from shared.errors import InvariantBroken, Misuse, ZcrxError
from shared.ring import U32, RingConsumer, RingLayout, RingProducer
from shared.shm import Region, region_name

__all__ = [
    "MSG_CMSG_CLOEXEC",
    "MSG_DONTWAIT",
    "MSG_NOSIGNAL",
    "MSG_WAITALL",
    "OVERFLOW_LIMIT",
    "BufRing",
    "IoUring",
    "OpDef",
    "Request",
    "Ring",
    "RingStats",
    "Sqe",
    "Wait",
]

MSG_DONTWAIT = 0x40
MSG_WAITALL = 0x100
MSG_NOSIGNAL = 0x4000
MSG_CMSG_CLOEXEC = 0x40000000
_RECV_MSG_FLAGS = MSG_DONTWAIT | MSG_WAITALL | MSG_NOSIGNAL | MSG_CMSG_CLOEXEC

#: The overflow list holds at most this many times the CQ size.
OVERFLOW_LIMIT = 2
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
            | abi.IORING_FEAT_SQPOLL_NONFIXED | abi.IORING_FEAT_CQE_SKIP)
ENTER_FLAGS = (abi.IORING_ENTER_GETEVENTS | abi.IORING_ENTER_SQ_WAKEUP
               | abi.IORING_ENTER_SQ_WAIT | abi.IORING_ENTER_NO_IOWAIT)
_ENTER_KNOWN = (ENTER_FLAGS | abi.IORING_ENTER_EXT_ARG | abi.IORING_ENTER_REGISTERED_RING
                | abi.IORING_ENTER_ABS_TIMER | abi.IORING_ENTER_EXT_ARG_REG)
_SQE_FLAGS_VALID = (1 << 7) - 1
_SQE_FLAGS_UNSUPPORTED = abi.IOSQE_IO_LINK | abi.IOSQE_IO_HARDLINK | abi.IOSQE_IO_DRAIN
_RECV_IOPRIO = (abi.IORING_RECVSEND_POLL_FIRST | abi.IORING_RECV_MULTISHOT
                | abi.IORING_RECVSEND_BUNDLE)
_ACCEPT_IOPRIO = (abi.IORING_ACCEPT_MULTISHOT | abi.IORING_ACCEPT_DONTWAIT
                  | abi.IORING_ACCEPT_POLL_FIRST)
_NOP_FLAGS = abi.IORING_NOP_INJECT_RESULT | abi.IORING_NOP_CQE32
_DEFAULT_SQ_IDLE_MS = 1000
_PEEK_FIRST = 64  # provided-buffer entries looked at first in one RECV pass

# struct io_rings words (u32 index = byte offset / 4), >= 6.6 layout (abi.rings_layout).
_W_SQ_MASK, _W_CQ_MASK, _W_SQ_ENTRIES, _W_CQ_ENTRIES = 4, 5, 6, 7
_W_SQ_DROPPED, _W_SQ_FLAGS, _W_CQ_OVERFLOW = 8, 9, 11

_EMPTY_I64 = np.empty(0, dtype=np.int64)


def _roundup_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


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


@dataclass(frozen=True)
class OpDef:
    """One opcode's table entry (Linux ``io_issue_defs``).

    ``prep(ring, sqe)`` validates the SQE and returns a :class:`Request` to issue, or None when
    it completed synchronously (it posted its CQE itself); it raises ``Misuse(errno)`` for a
    bad SQE.  ``ioprio``: the opcode reads ``sqe.ioprio`` (else it must be 0);
    ``buffer_select``: ``IOSQE_BUFFER_SELECT`` is allowed; ``iopoll``: allowed on an IOPOLL
    ring.
    """

    name: str
    prep: Callable[[Ring, Sqe], Request | None]
    ioprio: bool = False
    buffer_select: bool = False
    iopoll: bool = False


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
    """

    ring: Ring
    min_complete: int
    submitted: int
    deadline: float | None
    token: Any = None
    result: int | None = None


# --------------------------------------------------------------------------------------------
# Provided buffer rings
# --------------------------------------------------------------------------------------------


class BufRing:
    """A registered provided-buffer ring (``IORING_REGISTER_PBUF_RING``).

    ``bufs`` views the app-written ``io_uring_buf`` entries; the u16 tail sits in entry 0's
    ``resv`` (offset 14).  The head is kernel-private.  ``region`` is set when the kernel
    allocated the memory (``IOU_PBUF_RING_MMAP``) and is unlinked on unregister.
    """

    def __init__(self, bgid: int, entries: int, raw: NDArray[np.uint8],
                 region: Region | None = None, ring_addr: int = 0) -> None:
        self.bgid = bgid
        self.entries = entries
        self.mask = entries - 1
        self.raw = raw
        self.bufs = raw[:entries * abi.io_uring_buf.itemsize].view(abi.io_uring_buf)
        self._tail = raw[14:16].view("<u2")
        self.head = 0
        self.region = region
        self.ring_addr = ring_addr
        self.faults = 0

    def available(self) -> int:
        """Buffers published and not yet taken (clamped to the ring size)."""
        n = (int(self._tail[0]) - self.head) & 0xFFFF
        if n > self.entries:
            self.faults += 1
            n = self.entries
        return n

    def peek(self, k: int) -> tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.int64]]:
        """``(addrs, lens, bids)`` of the next ``k`` buffers (copies; nothing is taken)."""
        idx = (self.head + np.arange(k)) & self.mask
        e = self.bufs[idx]
        return (e["addr"].astype(np.int64), e["len"].astype(np.int64),
                e["bid"].astype(np.int64))

    def advance(self, k: int) -> None:
        """Take ``k`` buffers (kernel-private head)."""
        self.head = (self.head + k) & 0xFFFF

    def close(self) -> None:
        self.bufs = np.empty(0, dtype=abi.io_uring_buf)
        self.raw = np.empty(0, dtype=np.uint8)
        self._tail = np.zeros(1, dtype="<u2")
        if self.region is not None:
            self.region.close()
            self.region = None


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
            self.sock.waiters.append(self)
            self.armed = True

    def disarm(self) -> None:
        if self.armed:
            try:
                self.sock.waiters.remove(self)
            except ValueError:
                pass
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


class RecvRequest(Request):
    """IORING_OP_RECV: copy from the socket's receive queue into app memory."""

    def __init__(self, ring: Ring, sqe: Sqe, sock: SocketFile) -> None:
        super().__init__(ring, sqe, sock)
        self.addr = sqe.addr
        self.len = sqe.len
        self.msg_flags = sqe.op_flags
        self.multishot = bool(sqe.ioprio & abi.IORING_RECV_MULTISHOT)
        self.poll_first = bool(sqe.ioprio & abi.IORING_RECVSEND_POLL_FIRST)
        self.bufsel = bool(sqe.flags & abi.IOSQE_BUFFER_SELECT)
        self.bgid = sqe.buf_index
        self.nowait = bool(self.msg_flags & MSG_DONTWAIT) or sock.nonblock
        self.waitall = bool(self.msg_flags & MSG_WAITALL)

    def issue(self) -> None:
        self.ring.inflight.add(self)
        if self.poll_first:
            # Poll first: the poll fires at once if the socket is readable already.
            conn = self.sock.conn
            if conn is not None and (conn.rxq.nbytes or conn.end_status() is not None):
                self.attempt(issue=False)
            else:
                self.arm()
            return
        self.attempt(issue=True)

    def attempt(self, issue: bool) -> None:
        conn = self.sock.conn
        ring = self.ring
        if conn is None:
            self.complete(-errno.ENOTCONN)
            return
        if not self.bufsel and self.len == 0:
            self.complete(0)  # tcp_recvmsg with len 0 returns 0 at once
            return
        while not self.done:
            nbytes = conn.rxq.nbytes
            end = None if nbytes else conn.end_status()
            if nbytes == 0 and end is None and not issue:
                self.arm()
                return
            br = None
            if self.bufsel:
                br = ring.buf_rings.get(self.bgid)
                if br is None or br.available() == 0:
                    ring.stats.enobufs += 1
                    self.complete(-errno.ENOBUFS)
                    return
            if nbytes == 0:
                if end is None:
                    if self.nowait:
                        self.complete(-errno.EAGAIN)
                    else:
                        self.arm()
                    return
                if end < 0:
                    conn.take_error()
                self.complete(end)
                return
            if self.waitall:
                want = self.len
                if br is not None:
                    blen = int(br.peek(1)[1][0])
                    want = min(want, blen) if want else blen
                if nbytes < want and conn.end_status() is None:
                    self.arm()
                    return
            if br is None:
                self._recv_plain(conn, nbytes)
            else:
                self._recv_buffers(conn, nbytes, br)
            issue = False
            if not self.multishot:
                return

    def _recv_plain(self, conn: TcpReceiver, nbytes: int) -> None:
        """Single-shot RECV into ``addr``/``len``."""
        ring = self.ring
        n = min(self.len, nbytes)
        try:
            dst = ring.task.mm.resolve(self.addr, n, write=True)
        except Misuse as exc:
            ring.stats.efaults += 1
            self.complete(-(exc.errno or errno.EFAULT))
            return
        pieces = conn.rxq.peek(n)
        ring.uring.skbs.copy_out(pieces.handles, pieces.offsets, pieces.lengths, dst)
        ring.uring.sockets.free(conn.rxq.consume(n))
        ring.stats.recv_bytes += n
        ring.stats.recv_cqes += 1
        self.complete(n, abi.IORING_CQE_F_SOCK_NONEMPTY if conn.rxq.nbytes else 0)

    def _recv_buffers(self, conn: TcpReceiver, nbytes: int, br: BufRing) -> None:
        """One pass of buffer-select RECV: fill as many provided buffers as data and CQ room
        allow, with a few numpy operations per pass (one copy per buffer at most)."""
        ring = self.ring
        stats = ring.stats
        if self.multishot:
            room = ring.cq_room()
            k_max = min(br.available(), room + 1)
        else:
            room = 0
            k_max = 1
        # Look at as few ring entries as the data needs: start small, grow while short.
        k = min(k_max, _PEEK_FIRST)
        while True:
            addrs, lens, bids = br.peek(k)
            if self.len:
                np.minimum(lens, self.len, out=lens)
            if k >= k_max or int(lens.sum()) >= nbytes or not lens.all():
                break
            k = min(k_max, 4 * k)
        zero = np.flatnonzero(lens == 0)
        zero_at = int(zero[0]) if len(zero) else -1
        if zero_at >= 0:
            stats.zero_len_bufs += 1
            lens = lens[:zero_at]
        starts = np.cumsum(lens) - lens
        sizes = np.clip(nbytes - starts, 0, lens)
        k = int(np.count_nonzero(sizes))
        if k == 0:
            # The next buffer has length 0: Linux receives 0 bytes, which ends the request.
            self.complete(0)
            return
        sizes = sizes[:k]
        addrs = addrs[:k]
        total = int(starts[k - 1] + sizes[k - 1])
        good = self._copy_to_buffers(conn, total, addrs, sizes)
        if good < k:
            total = int(sizes[:good].sum())
        if good:
            ring.uring.sockets.free(conn.rxq.consume(total))
            br.advance(good)
        stats.recv_bytes += total
        stats.recv_cqes += good
        left = nbytes - np.cumsum(sizes[:good])
        flags = (abi.IORING_CQE_F_BUFFER | (bids[:good] << abi.IORING_CQE_BUFFER_SHIFT)
                 | np.where(left > 0, abi.IORING_CQE_F_SOCK_NONEMPTY, 0))
        res = sizes[:good]
        if good < k:
            # A buffer did not resolve: post what landed, then end with -EFAULT.
            stats.efaults += 1
            if self.multishot and good:
                ring.post_batch(self.user_data, res, flags | abi.IORING_CQE_F_MORE)
            elif good:
                self.complete(int(res[0]), int(flags[0]))
                return
            self.complete(-errno.EFAULT)
            return
        if not self.multishot:
            self.complete(int(res[0]), int(flags[0]))
            return
        n_more = min(good, room)
        if n_more:
            ring.post_batch(self.user_data, res[:n_more], flags[:n_more] | abi.IORING_CQE_F_MORE)
        if n_more < good:
            # No room for an F_MORE CQE: this chunk is the final one (Linux io_recv_finish).
            stats.mshot_terminated_cq_full += 1
            self.complete(int(res[n_more]), int(flags[n_more]))
        elif zero_at >= 0 and zero_at == good and conn.rxq.nbytes:
            self.complete(0)

    def _copy_to_buffers(self, conn: TcpReceiver, total: int, addrs: NDArray[np.int64],
                         sizes: NDArray[np.int64]) -> int:
        """Copy ``total`` stream bytes into the buffers; return how many buffers got theirs."""
        mm = self.ring.task.mm
        skbs = self.ring.uring.skbs
        k = len(addrs)
        pieces = conn.rxq.peek(total)
        if k == 1 or bool((addrs[1:] == addrs[:-1] + sizes[:-1]).all()):
            try:
                dst = mm.resolve(int(addrs[0]), total, write=True)
            except Misuse:
                pass
            else:
                skbs.copy_out(pieces.handles, pieces.offsets, pieces.lengths, dst)
                return k
        bounce = np.empty(total, dtype=np.uint8)
        skbs.copy_out(pieces.handles, pieces.offsets, pieces.lengths, bounce)
        pos = 0
        for i, (a, n) in enumerate(zip(addrs.tolist(), sizes.tolist(), strict=True)):
            try:
                dst = mm.resolve(a, n, write=True)
            except Misuse:
                return i
            dst[:] = bounce[pos:pos + n]
            pos += n
        return k


_SOCKADDR_IN = 16
_SOCKADDR_IN6 = 28


def _sockaddr(sf: SocketFile) -> bytes:
    """The peer address of a connected socket as ``struct sockaddr_in`` (16 bytes) or
    ``struct sockaddr_in6`` (28 bytes): family in host order, port and address in network
    order."""
    raw = sf.peer_addr or bytes(16)
    port = sf.peer_port.to_bytes(2, "big")
    if sf.domain == AF_INET:
        return AF_INET.to_bytes(2, "little") + port + raw[12:16] + bytes(8)
    return AF_INET6.to_bytes(2, "little") + port + bytes(4) + raw + bytes(4)


class AcceptRequest(Request):
    """IORING_OP_ACCEPT: take connections off a listener into new fds."""

    def __init__(self, ring: Ring, sqe: Sqe, sock: SocketFile) -> None:
        super().__init__(ring, sqe, sock)
        self.multishot = bool(sqe.ioprio & abi.IORING_ACCEPT_MULTISHOT)
        self.dontwait = bool(sqe.ioprio & abi.IORING_ACCEPT_DONTWAIT) or sock.nonblock
        self.poll_first = bool(sqe.ioprio & abi.IORING_ACCEPT_POLL_FIRST)
        self.addr = sqe.addr
        self.addrlen_ptr = sqe.off
        self.nonblock = bool(sqe.op_flags & SOCK_NONBLOCK)

    def issue(self) -> None:
        self.ring.inflight.add(self)
        if self.poll_first and not self.ring.uring.sockets.has_pending(self.sock):
            self.arm()
            return
        self.attempt(issue=True)

    def attempt(self, issue: bool) -> None:
        ring = self.ring
        sockets = ring.uring.sockets
        task = ring.task
        while not self.done:
            if not self.sock.is_listening:
                self.complete(-errno.EINVAL)
                return
            if not sockets.has_pending(self.sock):
                if self.dontwait and issue:
                    self.complete(-errno.EAGAIN)
                else:
                    self.arm()
                return
            if not task.can_install():
                self.complete(-errno.EMFILE)
                return
            lenview = None
            if self.addr:
                try:
                    lenview = task.mm.resolve(self.addrlen_ptr, 4, write=True)
                except Misuse:
                    ring.stats.efaults += 1
                    self.complete(-errno.EFAULT)
                    return
            new = sockets.accept(self.sock)
            if new is None:  # has_pending said yes; cannot happen
                raise InvariantBroken("listener lost its pending connection")
            new.nonblock = self.nonblock
            fd = task.install(new)
            ring.stats.accepts += 1
            if lenview is not None:
                sa = _sockaddr(new)
                want = int(lenview.view("<u4")[0])
                n = min(want, len(sa))
                try:
                    if n:
                        task.mm.resolve(self.addr, n, write=True)[:] = np.frombuffer(
                            sa[:n], dtype=np.uint8)
                    lenview.view("<u4")[0] = len(sa)
                except Misuse:
                    ring.stats.efaults += 1
                    self.complete(-errno.EFAULT)
                    return
            if not self.multishot:
                self.complete(fd)
                return
            if ring.cq_room() > 0:
                ring.post(self.user_data, fd, abi.IORING_CQE_F_MORE)
            else:
                ring.stats.mshot_terminated_cq_full += 1
                self.complete(fd)
                return
            issue = False


# --------------------------------------------------------------------------------------------
# Opcode preps
# --------------------------------------------------------------------------------------------


def _prep_nop(ring: Ring, sqe: Sqe) -> Request | None:
    nf = sqe.op_flags
    if nf & ~_NOP_FLAGS:
        raise Misuse(f"nop_flags {nf:#x}", errno.EINVAL)
    res = 0
    if nf & abi.IORING_NOP_INJECT_RESULT:
        res = sqe.len - (1 << 32) if sqe.len & 0x8000_0000 else sqe.len
    if nf & abi.IORING_NOP_CQE32:
        if not ring.flags & (abi.IORING_SETUP_CQE32 | abi.IORING_SETUP_CQE_MIXED):
            raise Misuse("IORING_NOP_CQE32 on a ring without big CQEs", errno.EINVAL)
        ring.post(sqe.user_data, res, 0, big=(sqe.off, sqe.addr))
        return None
    if not (res >= 0 and sqe.flags & abi.IOSQE_CQE_SKIP_SUCCESS):
        ring.post(sqe.user_data, res, 0)
    else:
        ring.stats.cqes_skipped += 1
    return None


def _prep_recv(ring: Ring, sqe: Sqe) -> Request | None:
    if sqe.file_index or sqe.off:
        raise Misuse("recv: file_index/addr2 must be 0", errno.EINVAL)
    if sqe.ioprio & ~_RECV_IOPRIO:
        raise Misuse(f"recv: ioprio {sqe.ioprio:#x}", errno.EINVAL)
    if sqe.ioprio & abi.IORING_RECVSEND_BUNDLE:
        raise Misuse("recv: IORING_RECVSEND_BUNDLE is not emulated", errno.EINVAL)
    if sqe.op_flags & ~_RECV_MSG_FLAGS:
        raise Misuse(f"recv: msg_flags {sqe.op_flags:#x} not emulated", errno.EINVAL)
    if sqe.ioprio & abi.IORING_RECV_MULTISHOT:
        if not sqe.flags & abi.IOSQE_BUFFER_SELECT:
            raise Misuse("recv multishot needs IOSQE_BUFFER_SELECT", errno.EINVAL)
        if sqe.op_flags & MSG_WAITALL:
            raise Misuse("recv multishot with MSG_WAITALL", errno.EINVAL)
    return RecvRequest(ring, sqe, ring.task.get_socket(sqe.fd))


def _prep_accept(ring: Ring, sqe: Sqe) -> Request | None:
    if sqe.len or sqe.buf_index:
        raise Misuse("accept: len/buf_index must be 0", errno.EINVAL)
    if sqe.ioprio & ~_ACCEPT_IOPRIO:
        raise Misuse(f"accept: ioprio {sqe.ioprio:#x}", errno.EINVAL)
    if sqe.op_flags & ~(SOCK_CLOEXEC | SOCK_NONBLOCK):
        raise Misuse(f"accept: flags {sqe.op_flags:#x}", errno.EINVAL)
    if sqe.file_index:
        if sqe.op_flags & SOCK_CLOEXEC:
            raise Misuse("accept: direct descriptor with SOCK_CLOEXEC", errno.EINVAL)
        if (sqe.ioprio & abi.IORING_ACCEPT_MULTISHOT
                and sqe.file_index != abi.IORING_FILE_INDEX_ALLOC):
            raise Misuse("accept multishot into a fixed slot", errno.EINVAL)
        raise Misuse("no registered file table", errno.ENXIO)
    return AcceptRequest(ring, sqe, ring.task.get_socket(sqe.fd))


def _prep_close(ring: Ring, sqe: Sqe) -> Request | None:
    if sqe.off or sqe.addr or sqe.len or sqe.op_flags or sqe.buf_index:
        raise Misuse("close: off/addr/len/rw_flags/buf_index must be 0", errno.EINVAL)
    if sqe.file_index:
        if sqe.fd:
            raise Misuse("close: both fd and file_index", errno.EINVAL)
        raise Misuse("no registered file table", errno.ENXIO)
    obj = ring.task.files.get(sqe.fd)
    if obj is None or isinstance(obj, Ring):
        raise Misuse(f"close: fd {sqe.fd}", errno.EBADF)
    ring.uring.close_fd(ring.task, sqe.fd)
    if not sqe.flags & abi.IOSQE_CQE_SKIP_SUCCESS:
        ring.post(sqe.user_data, 0, 0)
    else:
        ring.stats.cqes_skipped += 1
    return None


_NEEDS_FILE = {abi.IORING_OP_RECV, abi.IORING_OP_ACCEPT}


# --------------------------------------------------------------------------------------------
# The ring
# --------------------------------------------------------------------------------------------


class Ring:
    """One io_uring instance of one task (``struct io_ring_ctx``)."""

    def __init__(self, uring: IoUring, task: Task, fd: int, flags: int, sq_entries: int,
                 cq_entries: int, sq_idle_ms: int = _DEFAULT_SQ_IDLE_MS) -> None:
        self.uring = uring
        self.task = task
        self.fd = fd
        self.flags = flags
        self.sq_entries = sq_entries
        self.cq_entries = cq_entries
        self.stats = RingStats()
        self.closed = False
        self.disabled = bool(flags & abi.IORING_SETUP_R_DISABLED)
        self.mixed = bool(flags & abi.IORING_SETUP_CQE_MIXED)
        self.inflight: set[Request] = set()
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
        self.sq_idle = (sq_idle_ms or _DEFAULT_SQ_IDLE_MS) / 1000
        self.sq_last_active = time.monotonic()
        self.sq_sleeping = False
        self._sq_dropped = 0
        self._cq_overflow = 0

        sq_off, cq_off, size = abi.rings_layout(sq_entries, cq_entries, flags)
        self.sq_off, self.cq_off = sq_off, cq_off
        tag = f"t{task.tid}.ring{fd}"
        run = uring.run_id
        sqe_dtype = abi.io_uring_sqe128 if flags & abi.IORING_SETUP_SQE128 else abi.io_uring_sqe
        self.rings_region = Region.create(region_name(run, "kernel", f"{tag}.rings"), size)
        try:
            self.sqes_region = Region.create(region_name(run, "kernel", f"{tag}.sqes"),
                                             abi.sqes_size(sq_entries, flags))
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
        if op in _NEEDS_FILE or op in self.uring.file_ops:
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

    def post_big_batch(self, user_data: int, res: NDArray[np.int64], flags: NDArray[np.int64],
                       big0: NDArray[np.int64]) -> int:
        """Post 32-byte CQEs of one request (second half ``(big0[i], 0)``, e.g. a zcrx CQE's
        ``off``) straight into the CQ, in order, **never** into the overflow list (Linux
        ``io_defer_get_uncommited_cqe``).  On a CQE_MIXED ring each takes two slots and gets
        ``IORING_CQE_F_32``.  Returns how many were posted (the rest did not fit; 0 on a ring
        with 16-byte CQEs or while overflowed CQEs wait)."""
        if self.closed:
            return 0
        if self.overflow:
            self.flush_overflow()
            if self.overflow:
                return 0
        n = len(res)
        done = 0
        if self.mixed:
            while done < n and self._put_mixed_big(user_data, int(res[done]), int(flags[done]),
                                                   (int(big0[done]), 0)):
                done += 1
        elif self.cqe_dtype is abi.io_uring_cqe32:
            while done < n:
                view = self.cq.reserve(n - done)
                k = len(view)
                if k == 0:
                    break
                view["user_data"] = user_data
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
        return d


# --------------------------------------------------------------------------------------------
# The subsystem
# --------------------------------------------------------------------------------------------

RegisterHandler = Callable[["Ring | None", Task, int, list[bytes]], tuple[int, list[bytes]]]
"""``handler(ring, task, nr_args, blobs) -> (res, blobs written back)``; raise Misuse(errno).
``ring`` is None for the blind ``fd = -1`` register calls (IORING_REGISTER_QUERY)."""


class IoUring:
    """The io_uring subsystem of the kernel process."""

    def __init__(self, run: str, sockets: Sockets, skbs: Any = None) -> None:
        self.run_id = run
        self.sockets = sockets
        self.skbs = skbs if skbs is not None else sockets.skbs
        self.rings: list[Ring] = []
        self.completed_waits: list[Wait] = []
        self.opcodes: dict[int, OpDef] = {
            abi.IORING_OP_NOP: OpDef("NOP", _prep_nop, iopoll=True),
            abi.IORING_OP_RECV: OpDef("RECV", _prep_recv, ioprio=True, buffer_select=True),
            abi.IORING_OP_ACCEPT: OpDef("ACCEPT", _prep_accept, ioprio=True),
            abi.IORING_OP_CLOSE: OpDef("CLOSE", _prep_close),
        }
        #: opcodes registered by other subsystems that take a file in ``sqe.fd``
        self.file_ops: set[int] = set()
        self.register_ops: dict[int, RegisterHandler] = {
            abi.IORING_REGISTER_PBUF_RING: self._reg_pbuf_ring,
            abi.IORING_UNREGISTER_PBUF_RING: self._unreg_pbuf_ring,
            abi.IORING_REGISTER_PBUF_STATUS: self._reg_pbuf_status,
            abi.IORING_REGISTER_ENABLE_RINGS: self._reg_enable_rings,
        }
        #: register opcodes served without a ring (``fd == -1``)
        self.blind_register_ops: set[int] = set()
        #: other subsystems' periodic work, run by :meth:`poll` as ``hook(now) -> work done``
        #: (zcrx: requeued RECV_ZC requests, delayed ifq destruction)
        self.poll_hooks: list[Callable[[float], int]] = []

    # -- extension points ---------------------------------------------------------------------

    def register_opcode(self, opcode: int, opdef: OpDef, *, needs_file: bool = True) -> None:
        """Add an opcode (e.g. IORING_OP_RECV_ZC from the zcrx subsystem)."""
        self.opcodes[opcode] = opdef
        if needs_file:
            self.file_ops.add(opcode)

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
            del task.files[fd]
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
              timeout_ms: int = -1, token: Any = None) -> int | Wait:
        """``io_uring_enter``: submit, then maybe wait.

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
        ring = self.get_ring(task, fd)
        if ring.disabled:
            raise Misuse("ring is disabled (IORING_SETUP_R_DISABLED)", errno.EBADFD)
        now = time.monotonic()
        if ring.overflow:
            ring.flush_overflow()
        submitted = 0
        if ring.sqpoll:
            if flags & abi.IORING_ENTER_SQ_WAKEUP and ring.sq_sleeping:
                ring.sq_sleeping = False
                ring.clear_sq_flag(abi.IORING_SQ_NEED_WAKEUP)
            ring.sq_last_active = now
            self._sqpoll_one(ring, now)
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
        ring.stats.waits += 1
        deadline = None if timeout_ms < 0 else now + timeout_ms / 1000
        w = Wait(ring, min_complete, submitted, deadline, token)
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
                work += self._sqpoll_one(ring, now)
            if ring.overflow:
                work += ring.flush_overflow()
            if ring.waits:
                ring.check_waits()
                keep = []
                for w in ring.waits:
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

    def _sqpoll_one(self, ring: Ring, now: float) -> int:
        """One pass of the emulated SQ thread over ``ring``."""
        if ring.sq_sleeping or ring.disabled or ring.closed:
            return 0
        n = ring.sq_ready()
        if n:
            ring.sq_last_active = now
            return ring.submit(n)
        if now - ring.sq_last_active >= ring.sq_idle:
            ring.set_sq_flag(abi.IORING_SQ_NEED_WAKEUP)
            n = ring.sq_ready()  # re-check after publishing the flag
            if n:
                ring.clear_sq_flag(abi.IORING_SQ_NEED_WAKEUP)
                ring.sq_last_active = now
                return ring.submit(n)
            ring.sq_sleeping = True
        return 0

    def next_deadline(self) -> float | None:
        """The earliest wait deadline or SQPOLL idle point (for the loop's sleep)."""
        best: float | None = None
        for ring in self.rings:
            for w in ring.waits:
                if w.deadline is not None and (best is None or w.deadline < best):
                    best = w.deadline
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
        """``mmap(ring_fd, offset)``: the kernel region and the address in the task's mm."""
        obj = task.get(fd)
        if not isinstance(obj, Ring):
            raise Misuse(f"fd {fd} cannot be mapped", errno.ENODEV)
        if length <= 0 or offset < 0:
            raise Misuse(f"mmap length {length} offset {offset}", errno.EINVAL)
        region = obj.mmap_regions.get(offset)
        if region is None:
            raise Misuse(f"no io_uring region at offset {offset:#x}", errno.EINVAL)
        if length > region.size:
            raise Misuse(f"mmap of {length} bytes, region has {region.size}", errno.EINVAL)
        addr = task.mm.map(region.name, length, PROT_READ | PROT_WRITE, kernel=True)
        return region, addr

    # -- io_uring_register ------------------------------------------------------------------------

    def register(self, task: Task, fd: int, opcode: int, nr_args: int,
                 blobs: list[bytes]) -> tuple[int, list[bytes]]:
        """``io_uring_register``: dispatch to the opcode's handler."""
        if opcode & abi.IORING_REGISTER_USE_REGISTERED_RING:
            raise Misuse("registered ring fds are not emulated", errno.EINVAL)
        handler = self.register_ops.get(opcode)
        if fd == -1:
            if handler is None or opcode not in self.blind_register_ops:
                raise Misuse(f"register opcode {opcode} needs a ring", errno.EINVAL)
            return handler(None, task, nr_args, blobs)
        ring = self.get_ring(task, fd)
        if handler is None:
            raise Misuse(f"register opcode {opcode} not supported", errno.EINVAL)
        return handler(ring, task, nr_args, blobs)

    @staticmethod
    def _one_blob(nr_args: int, blobs: list[bytes], dtype: np.dtype[Any]) -> np.ndarray:
        if nr_args != 1:
            raise Misuse(f"nr_args {nr_args}, expected 1", errno.EINVAL)
        if not blobs or len(blobs[0]) != dtype.itemsize:
            raise Misuse(f"argument must be {dtype.itemsize} bytes", errno.EFAULT)
        return np.frombuffer(blobs[0], dtype=dtype).copy()

    def _reg_pbuf_ring(self, ring: Ring | None, task: Task, nr_args: int,
                       blobs: list[bytes]) -> tuple[int, list[bytes]]:
        assert ring is not None
        reg = self._one_blob(nr_args, blobs, abi.io_uring_buf_reg)
        flags = int(reg["flags"][0])
        entries = int(reg["ring_entries"][0])
        bgid = int(reg["bgid"][0])
        addr = int(reg["ring_addr"][0])
        if reg["resv"].any() or reg["min_left"][0]:
            raise Misuse("buf_reg reserved fields must be 0", errno.EINVAL)
        if flags & ~(abi.IOU_PBUF_RING_MMAP | abi.IOU_PBUF_RING_INC):
            raise Misuse(f"buf_reg flags {flags:#x}", errno.EINVAL)
        if flags & abi.IOU_PBUF_RING_INC:
            raise Misuse("incremental buffer rings are not emulated", errno.EINVAL)
        if entries <= 0 or entries & (entries - 1) or entries >= 65536:
            raise Misuse(f"ring_entries {entries}", errno.EINVAL)
        if bgid in ring.buf_rings:
            raise Misuse(f"buffer group {bgid} exists", errno.EEXIST)
        size = entries * abi.io_uring_buf.itemsize
        if flags & abi.IOU_PBUF_RING_MMAP:
            if addr:
                raise Misuse("ring_addr with IOU_PBUF_RING_MMAP", errno.EINVAL)
            name = region_name(self.run_id, "kernel", f"t{task.tid}.ring{ring.fd}.pbuf{bgid}")
            region = Region.create(name, size)
            br = BufRing(bgid, entries, region.array(np.uint8), region)
            ring.mmap_regions[abi.IORING_OFF_PBUF_RING
                              | (bgid << abi.IORING_OFF_PBUF_SHIFT)] = region
        else:
            if not addr:
                raise Misuse("ring_addr is 0", errno.EFAULT)
            if addr & (abi.PAGE_SIZE - 1):
                raise Misuse("ring_addr not page aligned", errno.EINVAL)
            raw = task.mm.resolve(addr, size, write=True)
            br = BufRing(bgid, entries, raw, None, addr)
        ring.buf_rings[bgid] = br
        return 0, [reg.tobytes()]

    def _unreg_pbuf_ring(self, ring: Ring | None, task: Task, nr_args: int,
                         blobs: list[bytes]) -> tuple[int, list[bytes]]:
        assert ring is not None
        reg = self._one_blob(nr_args, blobs, abi.io_uring_buf_reg)
        if reg["resv"].any() or reg["flags"][0]:
            raise Misuse("buf_reg reserved fields must be 0", errno.EINVAL)
        bgid = int(reg["bgid"][0])
        br = ring.buf_rings.pop(bgid, None)
        if br is None:
            raise Misuse(f"no buffer group {bgid}", errno.ENOENT)
        ring.mmap_regions.pop(abi.IORING_OFF_PBUF_RING | (bgid << abi.IORING_OFF_PBUF_SHIFT),
                              None)
        br.close()
        return 0, [reg.tobytes()]

    def _reg_pbuf_status(self, ring: Ring | None, task: Task, nr_args: int,
                         blobs: list[bytes]) -> tuple[int, list[bytes]]:
        assert ring is not None
        st = self._one_blob(nr_args, blobs, abi.io_uring_buf_status)
        if st["resv"].any():
            raise Misuse("buf_status.resv must be 0", errno.EINVAL)
        br = ring.buf_rings.get(int(st["buf_group"][0]))
        if br is None:
            raise Misuse("no such buffer group", errno.ENOENT)
        st["head"] = br.head
        return 0, [st.tobytes()]

    def _reg_enable_rings(self, ring: Ring | None, task: Task, nr_args: int,
                          blobs: list[bytes]) -> tuple[int, list[bytes]]:
        assert ring is not None
        if nr_args or blobs:
            raise Misuse("ENABLE_RINGS takes no argument", errno.EINVAL)
        if not ring.disabled:
            raise Misuse("ring is not disabled", errno.EBADFD)
        ring.disabled = False
        return 0, []

    # -- stats ----------------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        return {"rings": [r.stats_dict() for r in self.rings if not r.closed]}
