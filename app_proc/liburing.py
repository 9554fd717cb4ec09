"""The application side of io_uring, shaped like liburing.

A liburing user finds the familiar names: :func:`io_uring_queue_init` makes a :class:`Ring`
(``struct io_uring``), :func:`io_uring_get_sqe` + ``io_uring_prep_*`` fill SQEs,
:func:`io_uring_submit` / :func:`io_uring_submit_and_wait` publish them,
:func:`io_uring_wait_cqe` / :func:`io_uring_peek_cqe` / :func:`io_uring_cqe_seen` read
completions, ``io_uring_*buf_ring*`` manage provided-buffer rings.  Python-flavoured batch
helpers sit beside them: :func:`peek_cqes` returns a numpy view of every ready CQE and
:func:`io_uring_cq_advance` releases them in one store; :meth:`BufRing.add` publishes many
buffers with a few numpy operations.

The kernel is another process (``driver_proc``).  Syscalls go through the syscall gate
(:class:`app_proc.syscall.Kernel`: the process-wide :func:`~app_proc.syscall.default_kernel`,
or the ``kernel=`` a call is given); data never does: the SQ/CQ rings and SQEs are kernel
regions this process attaches after the ``mmap`` syscall names them, and receive buffers are
this process's own memory (:class:`~app_proc.syscall.Memory`).

Who owns what in shared memory
------------------------------
* **Kernel regions** (rings, SQEs, ``IOU_PBUF_RING_MMAP`` buffer rings): created and unlinked by
  the kernel; this process attaches and detaches them.  In the rings region the app writes the
  SQ tail, the SQ index array and the CQ head (and ``cq_flags``); the kernel writes everything
  else.  The app writes SQEs; the kernel copies them at submission.
* **App memory** (receive buffers, provided-buffer rings): sealed memfds made and closed by the
  syscall gate (:meth:`~app_proc.syscall.Kernel.alloc_memory`): nothing can shrink them under
  the kernel, which keeps a buffer ring mapped (it refuses to pin unsealed memory,
  ``-EFAULT``).  The kernel writes received bytes into buffers it was given; the app writes
  buffer-ring entries and the ring's u16 tail.

Zero-copy receive (zcrx): :func:`io_uring_register_ifq` registers an interface queue
(``IORING_REGISTER_ZCRX_IFQ`` with the uapi structs in app memory) and returns a
:class:`ZcrxIfq`: the area (app memory the NIC DMA-writes into), the refill queue (a
:class:`~shared.ring.RingProducer` at the offsets the kernel reported, in app or kernel
memory) and the ``zcrx_id`` for :func:`io_uring_prep_recv_zc`.  A batch of RECV_ZC CQEs is
handled with a fixed number of numpy operations: :func:`zcrx_batch` (where each chunk lies in
the area), :func:`io_uring_zcrx_return` (one RQE per chunk, one store of the RQ tail; a full RQ
is flushed with ``ZCRX_CTRL_FLUSH_RQ``), or both in :func:`io_uring_zcrx_return_cqes`.
Payload is read in place, never copied by this library; checking it against the sent pattern
is the program's business (:mod:`app_proc.verify`).  See the zcrx section below for who owns
which memory.

Clients read every ring offset from ``io_uring_params`` (``sq_off``/``cq_off``) as liburing
does; nothing here hard-codes the kernel's layout.  CQ reads go through a
:class:`~shared.ring.RingConsumer` built from those offsets.

Errors: a failing syscall raises :class:`~shared.msg.ControlError` whose ``errno`` is Linux's,
a kernel that is gone :class:`~shared.errors.PeerGone` (see :mod:`app_proc.syscall`).  While
the kernel's pid is watched, a pure CQ wait in flight gives up after a short slack instead of
the full reply timeout.
"""

from __future__ import annotations

import errno
import time
from collections.abc import Iterable
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from app_proc.syscall import Kernel, Memory, default_kernel
from shared import abi
from shared.errors import Misuse, PeerMisbehaved, RingFull
from shared.msg import ControlError
from shared.ring import Backoff, RingConsumer, RingLayout, RingProducer
from shared.shm import PAGE_SIZE, Region, page_align
from shared.syscalls import AF_INET, AF_INET6, IPPROTO_TCP, PROT_READ, PROT_WRITE, SOCK_STREAM

__all__ = [
    "AF_INET",
    "AF_INET6",
    "IPPROTO_TCP",
    "PROT_READ",
    "PROT_WRITE",
    "SOCK_STREAM",
    "ZCRX_RING_FLAGS",
    "BufRing",
    "Ring",
    "ZcrxBatch",
    "ZcrxIfq",
    "cqe_bid",
    "if_nametoindex",
    "io_uring_buf_ring_add",
    "io_uring_buf_ring_advance",
    "io_uring_buf_ring_mask",
    "io_uring_cq_advance",
    "io_uring_cq_ready",
    "io_uring_cqe_seen",
    "io_uring_enter",
    "io_uring_free_buf_ring",
    "io_uring_get_sqe",
    "io_uring_peek_cqe",
    "io_uring_prep_accept",
    "io_uring_prep_close",
    "io_uring_prep_multishot_accept",
    "io_uring_prep_nop",
    "io_uring_prep_recv",
    "io_uring_prep_recv_multishot",
    "io_uring_prep_recv_zc",
    "io_uring_prep_rw",
    "io_uring_prep_send",
    "io_uring_prep_shutdown",
    "io_uring_query_zcrx",
    "io_uring_query_zcrx_event",
    "io_uring_queue_exit",
    "io_uring_queue_init",
    "io_uring_register",
    "io_uring_register_ifq",
    "io_uring_register_napi",
    "io_uring_register_zcrx_ctrl",
    "io_uring_setup_buf_ring",
    "io_uring_sq_ready",
    "io_uring_sq_space_left",
    "io_uring_sqe_set_buf_group",
    "io_uring_sqe_set_data64",
    "io_uring_sqe_set_flags",
    "io_uring_submit",
    "io_uring_submit_and_wait",
    "io_uring_unregister_napi",
    "io_uring_wait_cqe",
    "io_uring_wait_cqes",
    "io_uring_wait_cqes_min_timeout",
    "io_uring_zcrx_add_area",
    "io_uring_zcrx_arm_event",
    "io_uring_zcrx_copy_stats",
    "io_uring_zcrx_events",
    "io_uring_zcrx_flush_rq",
    "io_uring_zcrx_return",
    "io_uring_zcrx_return_cqes",
    "io_uring_zcrx_rq_queued",
    "peek_cqes",
    "zcrx_area_reg",
    "zcrx_batch",
    "zcrx_event_desc",
    "zcrx_ifq_reg",
    "zcrx_region_desc",
    "zcrx_rq_region_size",
]

#: Longest single wait the kernel is asked for; longer waits loop (the control client has a
#: reply timeout, and a timed-out client loses its identity, hence its task).
WAIT_CHUNK_MS = 1000
_SLACK_MS = 5000
#: Reply slack of a pure wait while the kernel's pidfd is watched (its death is seen at once).
_WATCHED_SLACK_MS = 250


# --------------------------------------------------------------------------------------------
# The ring
# --------------------------------------------------------------------------------------------


def _u32(buf: NDArray[np.uint8], off: int) -> NDArray[np.uint32]:
    return buf[off:off + 4].view("<u4")


class Ring:
    """``struct io_uring``: the app's view of one io_uring instance.

    ``k*`` attributes are numpy views of words shared with the kernel (``khead``, ``ktail``,
    ``kflags``...); ``sqe_head``/``sqe_tail`` are the private cursors of SQEs handed out and
    not yet submitted, as in liburing.
    """

    def __init__(self, kernel: Kernel, fd: int, params: np.ndarray) -> None:
        self.kernel = kernel
        self.fd = fd
        self.params = params
        p = params[0]
        self.flags = int(p["flags"])
        self.features = int(p["features"])
        self.sq_entries = int(p["sq_entries"])
        self.cq_entries = int(p["cq_entries"])
        sq_off = {n: int(p["sq_off"][n]) for n in abi.io_sqring_offsets.names or ()}
        cq_off = {n: int(p["cq_off"][n]) for n in abi.io_cqring_offsets.names or ()}
        self.sq_off, self.cq_off = sq_off, cq_off
        self.sqe_dtype = (abi.io_uring_sqe128 if self.flags & abi.IORING_SETUP_SQE128
                          else abi.io_uring_sqe)
        self.cqe_dtype = (abi.io_uring_cqe32 if self.flags & abi.IORING_SETUP_CQE32
                          else abi.io_uring_cqe)
        self._regions: dict[str, Region] = {}
        self._maps: list[tuple[int, int]] = []
        self.closed = False
        # Ring sizes exactly as liburing's io_uring_mmap computes them.
        no_array = bool(self.flags & abi.IORING_SETUP_NO_SQARRAY)
        cq_size = cq_off["cqes"] + self.cq_entries * self.cqe_dtype.itemsize
        sq_size = (cq_size if no_array
                   else sq_off["array"] + self.sq_entries * 4)
        if self.features & abi.IORING_FEAT_SINGLE_MMAP:
            sq_size = cq_size = max(sq_size, cq_size)
        # The rings' mmaps go in one pipelined round trip.
        single = bool(self.features & abi.IORING_FEAT_SINGLE_MMAP)
        bufs = self._map_many([(abi.IORING_OFF_SQ_RING, sq_size)]
                              + ([] if single else [(abi.IORING_OFF_CQ_RING, cq_size)])
                              + [(abi.IORING_OFF_SQES,
                                  self.sq_entries * self.sqe_dtype.itemsize)])
        sq_buf, sqe_buf = bufs[0], bufs[-1]
        cq_buf = sq_buf if single else bufs[1]
        #: the rings region as bytes (SQ and CQ words, CQEs, SQ array)
        self.ring_mem = sq_buf
        # SQ (the app produces): shared words and entries.
        self.khead = _u32(sq_buf, sq_off["head"])
        self.ktail = _u32(sq_buf, sq_off["tail"])
        self.kflags = _u32(sq_buf, sq_off["flags"])
        self.kdropped = _u32(sq_buf, sq_off["dropped"])
        self.sq_ring_mask = int(_u32(sq_buf, sq_off["ring_mask"])[0])
        self.sq_ring_entries = int(_u32(sq_buf, sq_off["ring_entries"])[0])
        self.sqes = sqe_buf[:self.sq_entries * self.sqe_dtype.itemsize].view(self.sqe_dtype)
        self._sqe_bytes = sqe_buf[:self.sq_entries * self.sqe_dtype.itemsize].reshape(
            self.sq_entries, self.sqe_dtype.itemsize)
        if not no_array:
            array = sq_buf[sq_off["array"]:sq_off["array"] + 4 * self.sq_entries].view("<u4")
            array[:] = np.arange(self.sq_entries, dtype=np.uint32)  # identity, as liburing
        self.sqe_head = int(self.ktail[0])
        self.sqe_tail = self.sqe_head
        # CQ (the app consumes): a ring consumer at the reported offsets.
        self.cq_layout = RingLayout(self.cq_entries, self.cqe_dtype, head=cq_off["head"],
                                    tail=cq_off["tail"], entries=cq_off["cqes"])
        self.cq = RingConsumer(cq_buf, self.cq_layout)
        self.cq_ring_mask = int(_u32(cq_buf, cq_off["ring_mask"])[0])
        self.koverflow = _u32(cq_buf, cq_off["overflow"])
        self.cqes = self.cq.ring
        self.buf_rings: dict[int, BufRing] = {}
        #: zcrx interface queues registered on this ring (they live as long as it does)
        self.zcrx_ifqs: list[ZcrxIfq] = []
        #: the page of app memory the ifq registrations of this ring pass their
        #: ``io_uring_zcrx_area_reg`` / ``io_uring_region_desc`` in (made by the first, owned
        #: by it; the kernel copies them in and writes back during each call)
        self.zcrx_params: Memory | None = None
        #: the kernel's ``io_uring_query_zcrx`` answer (None: not answered), asked by the
        #: first registration that wants it
        self.zcrx_query: np.ndarray | None = None
        self.zcrx_queried = False

    def _map(self, offset: int, length: int) -> NDArray[np.uint8]:
        return self._map_many([(offset, length)])[0]

    def _map_many(self, maps: list[tuple[int, int]]) -> list[NDArray[np.uint8]]:
        """``mmap`` of this ring's fd at each ``(offset, length)``, pipelined; the first
        refusal is raised once the others are recorded (queue exit unmaps them)."""
        replies = self.kernel.syscall_many([
            ("mmap", {"fd": self.fd, "offset": off, "length": length})
            for off, length in maps])
        out: list[NDArray[np.uint8]] = []
        error: ControlError | None = None
        for (_, length), reply in zip(maps, replies, strict=True):
            if isinstance(reply, ControlError):
                error = error or reply
                continue
            name, addr = str(reply.body["name"]), int(reply.body["addr"])
            self._maps.append((addr, length))
            region = self._regions.get(name)
            if region is None:
                region = self._regions[name] = Region.attach(name)
            out.append(region.array(np.uint8))
        if error is not None:
            raise error
        return out

    def __repr__(self) -> str:
        return f"<Ring fd={self.fd} sq={self.sq_entries} cq={self.cq_entries}>"

    @property
    def sq_flags(self) -> int:
        return int(self.kflags[0])

    def queue_exit(self) -> None:
        """:func:`io_uring_queue_exit` of this ring (what :meth:`app_proc.syscall.Kernel.close`
        calls for every ring still open)."""
        io_uring_queue_exit(self)

    def _detach(self) -> None:
        """Drop every view and region mapping (no syscall)."""
        if self.closed:
            return
        self.closed = True
        self.cq.detach()
        empty = np.empty(0, dtype=np.uint8)
        self.khead = self.ktail = self.kflags = self.kdropped = self.koverflow = \
            empty.view("<u4")
        self.sqes = np.empty(0, dtype=self.sqe_dtype)
        self.ring_mem = empty
        self._sqe_bytes = np.empty((0, 64), dtype=np.uint8)
        self.cqes = np.empty(0, dtype=self.cqe_dtype)
        for ifq in self.zcrx_ifqs:
            ifq._detach()
        for region in self._regions.values():
            region.detach()
        self._regions.clear()
        self.kernel._rings.discard(self)


# -- setup / teardown --------------------------------------------------------------------------


def io_uring_queue_init(entries: int, flags: int = 0, params: np.ndarray | None = None, *,
                        kernel: Kernel | None = None) -> Ring:
    """Create a ring with ``entries`` SQEs (``io_uring_setup`` + mmap of rings and SQEs).

    ``params`` is an ``io_uring_params`` record (array of 1) for CQSIZE, sq_thread_idle...;
    its ``flags`` are ORed with ``flags``.  Raises ``ControlError`` with the setup errno.
    """
    k = kernel if kernel is not None else default_kernel()
    k.attach()
    p = np.zeros(1, dtype=abi.io_uring_params) if params is None else params.copy()
    p["flags"] = int(p["flags"][0]) | flags
    reply = k.syscall("io_uring_setup", {"entries": entries}, [p.tobytes()])
    fd = int(reply.body["res"])
    out = np.frombuffer(reply.blobs[0], dtype=abi.io_uring_params).copy()
    try:
        ring = Ring(k, fd, out)
    except BaseException:
        k.close_fd(fd)
        raise
    k._rings.add(ring)
    return ring


def io_uring_queue_exit(ring: Ring) -> None:
    """Unmap the ring's regions, free its buffer rings, close its fd (the kernel unlinks)."""
    if ring.closed:
        return
    k = ring.kernel
    try:
        for br in list(ring.buf_rings.values()):
            io_uring_free_buf_ring(ring, br)
        for ifq in ring.zcrx_ifqs:
            ifq._detach()  # drop the RQ views before its mapping goes
        for addr, length in ring._maps:
            k.mm_unmap(addr, length)
        ring._maps.clear()
        k.close_fd(ring.fd)  # the kernel scrubs and tears the ifqs down with the ring
        for ifq in ring.zcrx_ifqs:
            ifq._free_memory()
    finally:
        ring._detach()


# -- raw syscalls ------------------------------------------------------------------------------


def io_uring_enter(ring: Ring, to_submit: int, min_complete: int, flags: int,
                   timeout_ms: int = -1, min_wait_usec: int = 0) -> int:
    """The ``io_uring_enter`` syscall (``timeout_ms`` < 0: no limit; -ETIME when it runs out).

    ``min_wait_usec`` is ``io_uring_getevents_arg.min_wait_usec`` (``IORING_FEAT_MIN_TIMEOUT``):
    a wait for ``min_complete`` CQEs ends after that long if any CQE is ready.
    """
    wait = timeout_ms if timeout_ms >= 0 else None
    client_timeout = None
    if flags & abi.IORING_ENTER_GETEVENTS and min_complete:
        # the kernel answers a wait when it ends; allow it the connection's own timeout more
        slack = _SLACK_MS
        if to_submit == 0 and wait is not None and ring.kernel.watched:
            # A pure wait on a watched kernel: a short slack, then -ETIME if the kernel is
            # alive (the caller waits again) or PeerGone at once if it died (DESIGN §6).
            slack = _WATCHED_SLACK_MS
        client_timeout = (wait if wait is not None else 10 ** 9) + min(slack,
                                                                        ring.kernel.timeout_ms)
    body = {"fd": ring.fd, "to_submit": to_submit, "min_complete": min_complete,
            "flags": flags, "timeout_ms": timeout_ms}
    if min_wait_usec:
        body["min_wait_usec"] = min_wait_usec
    return int(ring.kernel.syscall("io_uring_enter", body, timeout_ms=client_timeout,
                                   idempotent=to_submit == 0).body["res"])


def io_uring_register(ring: Ring | None, opcode: int, nr_args: int,
                      args: Iterable[bytes | np.ndarray] = (), *,
                      kernel: Kernel | None = None) -> tuple[int, list[bytes]]:
    """The ``io_uring_register`` syscall: ``args`` are uapi structs (bytes or numpy records),
    the reply carries them written back.  ``ring=None`` is ``fd = -1`` (blind opcodes)."""
    k = ring.kernel if ring is not None else (kernel or default_kernel())
    blobs = [a.tobytes() if isinstance(a, np.ndarray) else bytes(a) for a in args]
    reply = k.syscall("io_uring_register", {"fd": -1 if ring is None else ring.fd,
                                            "opcode": opcode, "nr_args": nr_args}, blobs)
    return int(reply.body["res"]), list(reply.blobs)


def io_uring_register_napi(ring: Ring, napi: np.ndarray) -> int:
    """``IORING_REGISTER_NAPI`` with one ``abi.io_uring_napi`` record (``napi``): busy polling
    for ``busy_poll_to`` us before a GETEVENTS wait sleeps, or an ``IO_URING_NAPI_STATIC_*``
    edit.  The kernel's previous settings are written back into ``napi``.  Returns 0; a
    refusal raises ``ControlError`` with Linux's errno."""
    res, blobs = io_uring_register(ring, abi.IORING_REGISTER_NAPI, 1, [napi])
    if blobs and len(blobs[0]) == abi.io_uring_napi.itemsize:
        napi.reshape(-1)[:1] = np.frombuffer(blobs[0], dtype=abi.io_uring_napi)
    return res


def io_uring_unregister_napi(ring: Ring, napi: np.ndarray | None = None) -> int:
    """``IORING_UNREGISTER_NAPI``: busy polling off; the previous settings are written back
    into ``napi`` when given.  Returns 0 (refusals raise ``ControlError``)."""
    res, blobs = io_uring_register(ring, abi.IORING_UNREGISTER_NAPI, 1,
                                   [] if napi is None else [napi])
    if napi is not None and blobs and len(blobs[0]) == abi.io_uring_napi.itemsize:
        napi.reshape(-1)[:1] = np.frombuffer(blobs[0], dtype=abi.io_uring_napi)
    return res


# -- submission --------------------------------------------------------------------------------


def io_uring_sq_ready(ring: Ring) -> int:
    """SQEs handed out and not yet seen by the kernel (liburing counts against khead)."""
    return (ring.sqe_tail - int(ring.khead[0])) & 0xFFFFFFFF


def io_uring_sq_space_left(ring: Ring) -> int:
    return ring.sq_entries - io_uring_sq_ready(ring)


def io_uring_get_sqe(ring: Ring) -> np.void | None:
    """The next free SQE, zeroed, or None when the SQ is full.

    The returned record is a view into the shared SQE array: assign fields on it
    (``sqe["fd"] = 3``) or use the ``io_uring_prep_*`` helpers.
    """
    if io_uring_sq_ready(ring) >= ring.sq_entries:
        return None
    idx = ring.sqe_tail & ring.sq_ring_mask
    ring.sqe_tail = (ring.sqe_tail + 1) & 0xFFFFFFFF
    ring._sqe_bytes[idx] = 0
    sqe: np.void = ring.sqes[idx]
    return sqe


def _flush_sq(ring: Ring) -> int:
    """Publish the SQEs handed out since the last flush (one store of the SQ tail)."""
    n = (ring.sqe_tail - ring.sqe_head) & 0xFFFFFFFF
    if n:
        ring.sqe_head = ring.sqe_tail
        ring.ktail[0] = ring.sqe_tail  # after the SQE stores (x86-64 TSO)
    return n


def io_uring_submit(ring: Ring) -> int:
    """Publish the prepared SQEs and tell the kernel; returns how many it took."""
    return io_uring_submit_and_wait(ring, 0)


def io_uring_submit_and_wait(ring: Ring, wait_nr: int, timeout_ms: int = -1) -> int:
    """Publish, submit, and wait until ``wait_nr`` CQEs are ready."""
    flushed = _flush_sq(ring)
    if ring.flags & abi.IORING_SETUP_SQPOLL:
        flags = 0
        if ring.sq_flags & abi.IORING_SQ_NEED_WAKEUP:
            flags |= abi.IORING_ENTER_SQ_WAKEUP
        if wait_nr:
            flags |= abi.IORING_ENTER_GETEVENTS
        if flags:
            io_uring_enter(ring, flushed, wait_nr, flags, timeout_ms)
        return flushed
    pending = (ring.sqe_tail - int(ring.khead[0])) & 0xFFFFFFFF
    if not pending and not wait_nr:
        return 0
    flags = abi.IORING_ENTER_GETEVENTS if wait_nr else 0
    return io_uring_enter(ring, pending, wait_nr, flags, timeout_ms)


# -- prep helpers ------------------------------------------------------------------------------


def io_uring_prep_rw(op: int, sqe: np.void, fd: int, addr: int, length: int,
                     offset: int) -> None:
    """The generic prep every ``io_uring_prep_*`` builds on."""
    sqe["opcode"] = op
    sqe["fd"] = fd
    sqe["off"] = offset
    sqe["addr"] = addr
    sqe["len"] = length


def io_uring_prep_nop(sqe: np.void) -> None:
    io_uring_prep_rw(abi.IORING_OP_NOP, sqe, -1, 0, 0, 0)


def io_uring_prep_accept(sqe: np.void, fd: int, addr: int = 0, addrlen: int = 0,
                         flags: int = 0) -> None:
    """ACCEPT: ``addr``/``addrlen`` are user addresses of a sockaddr and a u32 (or 0)."""
    io_uring_prep_rw(abi.IORING_OP_ACCEPT, sqe, fd, addr, 0, addrlen)
    sqe["accept_flags"] = flags


def io_uring_prep_multishot_accept(sqe: np.void, fd: int, addr: int = 0, addrlen: int = 0,
                                   flags: int = 0) -> None:
    io_uring_prep_accept(sqe, fd, addr, addrlen, flags)
    sqe["ioprio"] = int(sqe["ioprio"]) | abi.IORING_ACCEPT_MULTISHOT


def io_uring_prep_recv(sqe: np.void, fd: int, buf: int, length: int, flags: int = 0) -> None:
    """RECV into ``buf`` (a user address), or from a buffer group with IOSQE_BUFFER_SELECT."""
    io_uring_prep_rw(abi.IORING_OP_RECV, sqe, fd, buf, length, 0)
    sqe["msg_flags"] = flags


def io_uring_prep_recv_multishot(sqe: np.void, fd: int, buf: int = 0, length: int = 0,
                                 flags: int = 0) -> None:
    """Multishot RECV (needs a buffer group: :func:`io_uring_sqe_set_buf_group`)."""
    io_uring_prep_recv(sqe, fd, buf, length, flags)
    sqe["ioprio"] = int(sqe["ioprio"]) | abi.IORING_RECV_MULTISHOT


def io_uring_prep_send(sqe: np.void, sockfd: int, buf: int, length: int,
                       flags: int = 0) -> None:
    """SEND ``length`` bytes at ``buf`` (a user address) on a connected socket; ``flags`` are
    MSG_* (``MSG_WAITALL``: complete only once every byte is queued)."""
    io_uring_prep_rw(abi.IORING_OP_SEND, sqe, sockfd, buf, length, 0)
    sqe["msg_flags"] = flags


def io_uring_prep_shutdown(sqe: np.void, fd: int, how: int) -> None:
    """SHUTDOWN a connected socket: ``how`` is SHUT_RD (0), SHUT_WR (1) or SHUT_RDWR (2)."""
    io_uring_prep_rw(abi.IORING_OP_SHUTDOWN, sqe, fd, 0, how, 0)


def io_uring_prep_close(sqe: np.void, fd: int) -> None:
    io_uring_prep_rw(abi.IORING_OP_CLOSE, sqe, fd, 0, 0, 0)


def io_uring_sqe_set_data64(sqe: np.void, data: int) -> None:
    sqe["user_data"] = data


def io_uring_sqe_set_flags(sqe: np.void, flags: int) -> None:
    sqe["flags"] = flags


def io_uring_sqe_set_buf_group(sqe: np.void, bgid: int) -> None:
    """Select buffers from group ``bgid`` (sets IOSQE_BUFFER_SELECT too)."""
    sqe["buf_group"] = bgid
    sqe["flags"] = int(sqe["flags"]) | abi.IOSQE_BUFFER_SELECT


# -- completion --------------------------------------------------------------------------------


def io_uring_cq_ready(ring: Ring) -> int:
    """CQEs posted and not yet consumed."""
    return ring.cq.ready()


def peek_cqes(ring: Ring, max_n: int | None = None) -> np.ndarray:
    """A view of the ready CQEs (up to ``max_n``; stops at the ring's wrap point).

    The entries stay valid until :func:`io_uring_cq_advance`; copy what must outlive that.
    When the CQ is empty but the kernel holds overflowed CQEs (``IORING_SQ_CQ_OVERFLOW``),
    asks it to flush them first, as liburing's peek does.
    """
    n = ring.cq_entries if max_n is None else max_n
    v = ring.cq.peek(n)
    if not len(v) and ring.sq_flags & abi.IORING_SQ_CQ_OVERFLOW:
        io_uring_enter(ring, 0, 0, abi.IORING_ENTER_GETEVENTS)
        v = ring.cq.peek(n)
    return v


def io_uring_cq_advance(ring: Ring, n: int) -> None:
    """Give ``n`` consumed CQEs back to the kernel (one store of the CQ head)."""
    if n:
        ring.cq.release(n)


def io_uring_cqe_seen(ring: Ring, cqe: object = None) -> None:
    io_uring_cq_advance(ring, 1)


def io_uring_peek_cqe(ring: Ring) -> np.void | None:
    """The oldest ready CQE (a view), or None."""
    v = peek_cqes(ring, 1)
    return v[0] if len(v) else None


def io_uring_wait_cqes(ring: Ring, wait_nr: int = 1, timeout_ms: int | None = None
                       ) -> np.ndarray:
    """Wait until ``wait_nr`` CQEs are ready, return :func:`peek_cqes` (all that are ready).

    Spins, then yields (:class:`~shared.ring.Backoff`) while watching the CQ tail, then
    sleeps in the kernel with ``io_uring_enter(GETEVENTS)``.  Raises ``ControlError(ETIME)``
    when ``timeout_ms`` passes first.
    """
    return io_uring_wait_cqes_min_timeout(ring, wait_nr, timeout_ms, 0)


def io_uring_wait_cqes_min_timeout(ring: Ring, wait_nr: int, timeout_ms: int | None,
                                   min_wait_usec: int) -> np.ndarray:
    """:func:`io_uring_wait_cqes` as a batch wait (liburing's ``_min_timeout`` variant,
    ``IORING_FEAT_MIN_TIMEOUT``): wait for ``wait_nr`` CQEs, but once ``min_wait_usec`` has
    passed since the call, any ready CQE ends the wait.

    A server with many queues and little traffic on each wakes once per batch instead of
    once per CQE.  The spin before the kernel wait applies the same rule to the CQ tail it
    watches, so a batch that is ready after ``min_wait_usec`` costs no round trip.
    """
    t0 = time.monotonic()
    deadline = None if timeout_ms is None else t0 + timeout_ms / 1000
    min_end = t0 + min_wait_usec / 1e6 if min_wait_usec else None
    backoff = Backoff(spin=64, yields=32)
    while True:
        ready = ring.cq.ready()
        if ready >= wait_nr:
            return peek_cqes(ring)
        if ring.sq_flags & abi.IORING_SQ_CQ_OVERFLOW:
            io_uring_enter(ring, 0, 0, abi.IORING_ENTER_GETEVENTS)  # flush the overflow
            continue
        now = time.monotonic() if min_end is not None else 0.0
        if min_end is not None and ready and now >= min_end:
            return peek_cqes(ring)
        if not backoff.sleeping:
            backoff.idle()
            continue
        chunk = WAIT_CHUNK_MS
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ControlError("io_uring_enter", errno.ETIME, "wait timed out")
            chunk = min(chunk, max(1, int(left * 1000)))
        nr, usec = wait_nr, 0
        if min_end is not None:
            usec = int((min_end - now) * 1e6)
            if usec <= 0:  # the batch wait is over: any one CQE ends it
                nr, usec = 1, 0
        try:
            io_uring_enter(ring, 0, nr, abi.IORING_ENTER_GETEVENTS, chunk, usec)
        except ControlError as exc:
            if exc.errno != errno.ETIME:
                raise
        if min_end is not None and ring.cq.ready():
            return peek_cqes(ring)


def io_uring_wait_cqe(ring: Ring, timeout_ms: int | None = None) -> np.void:
    """Wait for one CQE and return it (a view; call :func:`io_uring_cqe_seen` after use)."""
    return io_uring_wait_cqes(ring, 1, timeout_ms)[0]


def cqe_bid(flags: int | NDArray[Any]) -> Any:
    """The buffer id of a CQE with IORING_CQE_F_BUFFER (``flags >> 16``)."""
    return flags >> abi.IORING_CQE_BUFFER_SHIFT


# --------------------------------------------------------------------------------------------
# Provided buffer rings
# --------------------------------------------------------------------------------------------


def io_uring_buf_ring_mask(entries: int) -> int:
    return entries - 1


class BufRing:
    """``struct io_uring_buf_ring``: entries the app fills, a u16 tail in entry 0.

    ``tail`` is the private cursor; :meth:`add` writes entries past it without publishing and
    :meth:`advance` publishes (one store of the shared tail).
    """

    def __init__(self, ring: Ring, bgid: int, entries: int, raw: NDArray[np.uint8],
                 mem: Memory | None, kernel_mapped: tuple[int, int] | None) -> None:
        self.ring = ring
        self.bgid = bgid
        self.entries = entries
        self.mask = entries - 1
        self.bufs = raw[:entries * abi.io_uring_buf.itemsize].view(abi.io_uring_buf)
        self._ktail = raw[14:16].view("<u2")
        self.tail = int(self._ktail[0])
        self.mem = mem
        self.kernel_mapped = kernel_mapped
        self._region: Region | None = None

    def add(self, addrs: ArrayLike, lens: ArrayLike, bids: ArrayLike, offset: int = 0) -> int:
        """Write buffers at ``tail + offset ...`` (not yet visible); returns how many."""
        a = np.atleast_1d(np.asarray(addrs))
        n = len(a)
        if n > self.entries:
            raise Misuse(f"{n} buffers do not fit a ring of {self.entries}")
        idx = (self.tail + offset + np.arange(n)) & self.mask
        self.bufs["addr"][idx] = a
        self.bufs["len"][idx] = lens
        self.bufs["bid"][idx] = bids
        return n

    def advance(self, count: int) -> None:
        """Publish ``count`` added buffers to the kernel."""
        self.tail = (self.tail + count) & 0xFFFF
        self._ktail[0] = self.tail  # after the entry stores (TSO)

    def _detach(self) -> None:
        self.bufs = np.empty(0, dtype=abi.io_uring_buf)
        self._ktail = np.zeros(1, dtype="<u2")
        if self._region is not None:
            self._region.detach()
            self._region = None


def io_uring_buf_ring_add(br: BufRing, addr: int, length: int, bid: int, mask: int,
                          buf_offset: int) -> None:
    """liburing's single-buffer add (``mask`` is ignored: the ring knows its size)."""
    br.add([addr], [length], [bid], buf_offset)


def io_uring_buf_ring_advance(br: BufRing, count: int) -> None:
    br.advance(count)


def io_uring_setup_buf_ring(ring: Ring, nentries: int, bgid: int, flags: int = 0) -> BufRing:
    """Allocate and register a provided-buffer ring for group ``bgid``.

    Without ``IOU_PBUF_RING_MMAP`` the ring lives in app memory; with it, the kernel allocates
    it and this process maps it at ``IORING_OFF_PBUF_RING | bgid << 16``.
    """
    k = ring.kernel
    reg = np.zeros(1, dtype=abi.io_uring_buf_reg)
    reg["ring_entries"] = nentries
    reg["bgid"] = bgid
    reg["flags"] = flags
    size = max(PAGE_SIZE, nentries * abi.io_uring_buf.itemsize)
    mem = None
    if not flags & abi.IOU_PBUF_RING_MMAP:
        mem = k.alloc_memory(size, tag=f"pbuf{bgid}.")
        reg["ring_addr"] = mem.addr
    try:
        io_uring_register(ring, abi.IORING_REGISTER_PBUF_RING, 1, [reg])
    except BaseException:
        if mem is not None:
            mem.close()
        raise
    if mem is not None:
        br = BufRing(ring, bgid, nentries, mem.view, mem, None)
    else:
        offset = abi.IORING_OFF_PBUF_RING | (bgid << abi.IORING_OFF_PBUF_SHIFT)
        name, addr = k.mmap(ring.fd, offset, nentries * abi.io_uring_buf.itemsize)
        region = Region.attach(name)
        br = BufRing(ring, bgid, nentries, region.array(np.uint8), None,
                     (addr, nentries * abi.io_uring_buf.itemsize))
        br._region = region
    ring.buf_rings[bgid] = br
    return br


def io_uring_free_buf_ring(ring: Ring, br: BufRing) -> None:
    """Unregister the group and free its ring memory."""
    k = ring.kernel
    ring.buf_rings.pop(br.bgid, None)
    reg = np.zeros(1, dtype=abi.io_uring_buf_reg)
    reg["bgid"] = br.bgid
    try:
        io_uring_register(ring, abi.IORING_UNREGISTER_PBUF_RING, 1, [reg])
        if br.kernel_mapped is not None:
            k.mm_unmap(*br.kernel_mapped)
    finally:
        br._detach()
        if br.mem is not None:
            br.mem.close()


# --------------------------------------------------------------------------------------------
# Zero-copy receive (zcrx): interface queues, RECV_ZC, the refill queue
# --------------------------------------------------------------------------------------------
#
# Who owns what (zcrx-kernel.md §1-§2, DESIGN §2):
# * the **area** (``io_uring_zcrx_area_reg.addr``) is app memory (a memfd sealed against
#   shrinking, ``memfd:zcrx.<run>.app<task>.zcrx_area<N>``), made, mapped into the mm by
#   descriptor and finally closed here.  After registration the kernel and
#   the NIC write payload into it; a chunk named by a RECV_ZC CQE is lent to the app, which
#   reads it IN PLACE (numpy views, never a copy) until it returns it with an RQE;
# * the **refill queue** is app memory (``-r 0``: ``region_desc.flags =
#   IORING_MEM_REGION_TYPE_USER``) or a kernel region mapped with ``mmap(ring_fd,
#   region.mmap_offset)`` (``-r 1``).  Either way the app writes RQEs and the RQ *tail*; the
#   kernel writes the RQ *head*.  Offsets come from the registration reply, never constants;
# * the **parameter page** (``zcrx_param<N>``) is app memory holding the ``area_reg`` (48 B)
#   and ``region_desc`` (64 B) that ``ifq_reg.area_ptr`` / ``region_ptr`` point to: the kernel
#   reads them there through the mm and writes back ``rq_area_token`` and ``mmap_offset``.
#
# An ifq has no unregister: it lives as long as its ring.  :func:`io_uring_queue_exit` closes
# the ring (the kernel scrubs every buffer the app still holds), then frees the memory above.

#: Ring setup flags zcrx needs (DEFER_TASKRUN requires SINGLE_ISSUER; 32-byte CQEs).
ZCRX_RING_FLAGS = (abi.IORING_SETUP_SINGLE_ISSUER | abi.IORING_SETUP_DEFER_TASKRUN
                   | abi.IORING_SETUP_CQE32)
_AREA_LOW = (1 << abi.IORING_ZCRX_AREA_SHIFT) - 1
_PARAM_AREA_OFF = 0  # io_uring_zcrx_area_reg in the parameter page
_PARAM_REGION_OFF = 64  # io_uring_region_desc in the parameter page
_PARAM_EVENT_OFF = 128  # zcrx_event_desc in the parameter page (7.2)
_PARAM_ADD_AREA_OFF = 256  # io_uring_zcrx_area_reg of ZCRX_CTRL_ADD_AREA (7.3)
_STATS_ALIGN = 8  # zcrx_stats alignment when the kernel's query does not say
_RQE = abi.io_uring_zcrx_rqe
#: How long a return waits for room in a full RQ (after a flush) before RingFull.
RQ_FULL_TIMEOUT_S = 5.0


def if_nametoindex(kernel: Kernel, name: str) -> int:
    """The ifindex of netdev ``name`` (``if_nametoindex(3)``: the ``SIOCGIFINDEX`` ioctl).

    Raises ``Misuse(ENODEV)`` when there is no such device.
    """
    try:
        return int(kernel.syscall("if_nametoindex", {"name": name}).body["ifindex"])
    except ControlError as exc:
        if exc.errno == errno.ENODEV:
            raise Misuse(f"no such device {name!r}", errno.ENODEV) from None
        raise


def io_uring_query_zcrx(kernel: Kernel | None = None) -> np.ndarray | None:
    """``IORING_REGISTER_QUERY`` (fd -1) of ``IO_URING_QUERY_ZCRX``: an ``io_uring_query_zcrx``
    record (array of 1), or None when the kernel does not answer the query (as liburing falls
    back to a page-sized RQ header).

    The uapi shape: blob 0 is the 40-byte ``io_uring_query_hdr`` whose ``query_data`` is the
    user address of the 40-byte payload, in a scratch page of app memory; the kernel writes the
    payload there and ``result`` in the header it sends back.
    """
    return _query(kernel, abi.IO_URING_QUERY_ZCRX, abi.io_uring_query_zcrx)


def io_uring_query_zcrx_event(kernel: Kernel | None = None) -> np.ndarray | None:
    """Query op 3 (``IO_URING_QUERY_ZCRX_NOTIF``, Linux 7.2): an ``io_uring_query_zcrx_event``
    record (supported event types, ``zcrx_stats`` size and offset alignment), or None on a
    kernel without events."""
    return _query(kernel, abi.IO_URING_QUERY_ZCRX_NOTIF, abi.io_uring_query_zcrx_event)


def _query(kernel: Kernel | None, op: int, dtype: np.dtype[Any], *,
           scratch: Memory | None = None) -> np.ndarray | None:
    """One ``IORING_REGISTER_QUERY`` of ``op``: its payload record, or None if unanswered.
    The payload lands in ``scratch`` (app memory the caller keeps) or a page made for it."""
    k = kernel if kernel is not None else default_kernel()
    k.attach()
    mem = scratch if scratch is not None else k.alloc_memory(PAGE_SIZE, tag="query")
    try:
        size = dtype.itemsize
        hdr = np.zeros(1, dtype=abi.io_uring_query_hdr)
        hdr["query_data"] = mem.addr
        hdr["query_op"] = op
        hdr["size"] = size
        try:
            _, blobs = io_uring_register(None, abi.IORING_REGISTER_QUERY, 0, [hdr], kernel=k)
        except ControlError as exc:
            if exc.errno in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                return None
            raise
        if blobs and len(blobs[0]) == hdr.itemsize:
            hdr = np.frombuffer(blobs[0], dtype=abi.io_uring_query_hdr).copy()
        if int(hdr["result"][0]) < 0:
            return None
        return mem.view[:size].view(dtype).copy()
    finally:
        if scratch is None:
            mem.close()


def zcrx_rq_region_size(rq_entries: int, hdr_size: int | None = None,
                        hdr_alignment: int | None = None) -> int:
    """Bytes of an RQ region for ``rq_entries`` RQEs, page aligned.

    ``ALIGN(rq_hdr_size, rq_hdr_alignment) + 16 * rq_entries`` with the figures of
    :func:`io_uring_query_zcrx`; without them one page is kept for the header, as liburing's
    examples do.  ``rq_entries`` is first rounded up to a power of two, as the kernel will.
    """
    if rq_entries <= 0:
        raise Misuse(f"rq_entries {rq_entries}")
    entries = 1 << (rq_entries - 1).bit_length()
    if hdr_size is None or hdr_alignment is None or hdr_alignment <= 0:
        hdr = PAGE_SIZE
    else:
        hdr = -(-hdr_size // hdr_alignment) * hdr_alignment
    return page_align(hdr + entries * _RQE.itemsize)


def zcrx_area_reg(addr: int, length: int, flags: int = 0) -> np.ndarray:
    """An ``io_uring_zcrx_area_reg`` record (array of 1): user memory at ``addr``."""
    rec = np.zeros(1, dtype=abi.io_uring_zcrx_area_reg)
    rec["addr"] = addr
    rec["len"] = length
    rec["flags"] = flags
    return rec


def zcrx_region_desc(size: int, user_addr: int = 0) -> np.ndarray:
    """An ``io_uring_region_desc`` for the RQ: user memory at ``user_addr``
    (``IORING_MEM_REGION_TYPE_USER``), or kernel memory when ``user_addr`` is 0."""
    rec = np.zeros(1, dtype=abi.io_uring_region_desc)
    rec["size"] = size
    if user_addr:
        rec["user_addr"] = user_addr
        rec["flags"] = abi.IORING_MEM_REGION_TYPE_USER
    return rec


def zcrx_ifq_reg(if_idx: int, if_rxq: int, rq_entries: int, area_ptr: int, region_ptr: int,
                 flags: int = 0, rx_buf_len: int = 0) -> np.ndarray:
    """An ``io_uring_zcrx_ifq_reg`` record (array of 1); outputs and reserved fields are 0."""
    rec = np.zeros(1, dtype=abi.io_uring_zcrx_ifq_reg)
    rec["if_idx"] = if_idx
    rec["if_rxq"] = if_rxq
    rec["rq_entries"] = rq_entries
    rec["flags"] = flags
    rec["area_ptr"] = area_ptr
    rec["region_ptr"] = region_ptr
    rec["rx_buf_len"] = rx_buf_len
    return rec


def zcrx_event_desc(user_data: int, type_mask: int, stats_offset: int | None = None
                    ) -> np.ndarray:
    """A ``zcrx_event_desc`` record (array of 1, Linux 7.2): event CQEs carry ``user_data``;
    ``type_mask`` has bit ``1 << ZCRX_EVENT_*`` per type wanted; ``stats_offset`` (an offset
    into the RQ region, past the RQEs) asks for ``zcrx_stats`` there."""
    rec = np.zeros(1, dtype=abi.zcrx_event_desc)
    rec["user_data"] = user_data
    rec["type_mask"] = type_mask
    if stats_offset is not None:
        rec["flags"] = abi.ZCRX_EVENT_DESC_FLAG_STATS
        rec["stats_offset"] = stats_offset
    return rec


class ZcrxIfq:
    """A registered zcrx interface queue, as the app sees it.

    ``zcrx_id`` goes into RECV_ZC SQEs; ``area_view`` is the area as ``uint8`` (byte ``i`` is
    user address ``area_addr + i``); ``rq`` is a :class:`~shared.ring.RingProducer` over the
    refill queue at the offsets the kernel reported (``offsets``); ``area_token`` is the
    ``rq_area_token`` the kernel wrote back (``area_id << 48``).  Several areas (Linux 7.3,
    :func:`io_uring_zcrx_add_area`) are slices of one app mapping reserved at registration
    (``area_reserve``): ``area_view`` covers the whole reservation, area ``i`` is bytes
    ``area_bases[i]:area_bases[i] + area_lens[i]`` of it, so a chunk of any area is read in
    place through the one view (:func:`zcrx_batch` turns its offset into a view offset);
    ``area_len`` is the bytes registered over every area.  Counters: ``rqes_returned``
    (RQEs published), ``rq_full`` (returns that found the RQ full), ``rq_flushes``
    (``ZCRX_CTRL_FLUSH_RQ`` calls).
    """

    def __init__(self, ring: Ring, reg: np.ndarray, *, area: Memory, own_area: bool,
                 area_token: int, params: Memory, rq_buf: NDArray[np.uint8], rq_size: int,
                 rq_mem: Memory | None, area_len: int | None = None,
                 own_params: bool = True) -> None:
        r = reg[0]
        self.ring = ring
        self.kernel = ring.kernel
        self.reg = reg
        self.zcrx_id = int(r["zcrx_id"])
        self.if_idx = int(r["if_idx"])
        self.if_rxq = int(r["if_rxq"])
        self.flags = int(r["flags"])
        self.rx_buf_len = int(r["rx_buf_len"])
        self.rq_entries = int(r["rq_entries"])
        self.offsets = {n: int(r["offsets"][n]) for n in ("head", "tail", "rqes")}
        self.area = area
        self.own_area = own_area
        self.area_addr = area.addr
        self.area_len = area.length if area_len is None else area_len
        self.area_token = area_token
        self.area_id = area_token >> abi.IORING_ZCRX_AREA_SHIFT
        self.area_view: NDArray[np.uint8] = area.view
        #: per area id: where the area starts in ``area_view`` and its length
        self.area_bases: list[int] = [0]
        self.area_lens: list[int] = [self.area_len]
        self.params = params
        self.own_params = own_params
        self.rq_mem = rq_mem
        self.rq_user = rq_mem is not None
        self.rq_size = rq_size
        entries, off = self.rq_entries, self.offsets
        if (entries <= 0 or entries & (entries - 1)
                or off["rqes"] + entries * _RQE.itemsize > rq_size
                or max(off["head"], off["tail"]) + 4 > rq_size):
            raise PeerMisbehaved(f"zcrx RQ layout {off} x {entries} does not fit {rq_size} B")
        layout = RingLayout(entries, _RQE, head=off["head"], tail=off["tail"],
                            entries=off["rqes"])
        self.rq = RingProducer(rq_buf, layout)
        #: events (7.2): the user_data of event CQEs (None: no events asked for), the offset
        #: of ``zcrx_stats`` in the RQ region (None: no stats)
        self.event_user_data: int | None = None
        self.stats_off: int | None = None
        self._rq_buf = rq_buf
        self.rqes_returned = 0
        self.rq_full = 0
        self.rq_flushes = 0
        self._flush_ok = True
        self._detached = False

    def __repr__(self) -> str:
        where = "user" if self.rq_user else "kernel"
        return (f"<ZcrxIfq id={self.zcrx_id} if={self.if_idx}/{self.if_rxq} "
                f"area={self.area_len} rq={self.rq_entries} ({where})>")

    @property
    def nodev(self) -> bool:
        return bool(self.flags & abi.ZCRX_REG_NODEV)

    def data(self, start: int, length: int) -> NDArray[np.uint8]:
        """The ``length`` bytes at area offset ``start`` (a view: read in place)."""
        return self.area_view[start:start + length]

    def stats(self) -> dict[str, int]:
        return {"rqes_returned": self.rqes_returned, "rq_full": self.rq_full,
                "rq_flushes": self.rq_flushes}

    def _detach(self) -> None:
        """Drop the RQ views (no syscall); the ring detaches the regions."""
        if self._detached:
            return
        self._detached = True
        self.rq.detach()

    def _free_memory(self) -> None:
        """Unmap and unlink the app memory this ifq allocated (after the ring is closed)."""
        self._detach()
        self.area_view = np.empty(0, dtype=np.uint8)
        mems = ([self.params] if self.own_params else []) + [self.rq_mem] + (
            [self.area] if self.own_area else [])
        for mem in mems:
            if mem is not None:
                mem.close()


def io_uring_register_ifq(ring: Ring, if_idx: int = 0, if_rxq: int = 0, *,
                          rq_entries: int = 4096, area_size: int = 64 << 20,
                          area: Memory | Region | None = None, rq_kernel: bool = False,
                          flags: int = 0, rx_buf_len: int = 0,
                          query: np.ndarray | bool | None = True, events: int = 0,
                          event_user_data: int = 0, stats: bool = False,
                          area_reserve: int = 0) -> ZcrxIfq:
    """Register a zcrx interface queue on ``ring`` (``IORING_REGISTER_ZCRX_IFQ``).

    Allocates the area (``area_size`` bytes of app memory, unless ``area`` is given: a
    :class:`Memory` stays the caller's; a memfd :class:`Region` not yet in the mm, e.g. made
    ahead by a helper thread with ``Kernel.new_memory``, becomes the ifq's, freed with it or
    at once if the registration fails), the RQ
    (app memory, or kernel memory mapped at ``region.mmap_offset`` with ``rq_kernel``) and the
    parameter page holding ``area_reg`` and ``region_desc``, then sends the 96-byte
    ``io_uring_zcrx_ifq_reg`` (nr_args 1) whose ``area_ptr``/``region_ptr`` point into that
    page.  ``flags`` are ``ZCRX_REG_*`` (``ZCRX_REG_NODEV``: ``if_idx``/``if_rxq`` must be 0).
    ``query``: True asks :func:`io_uring_query_zcrx` for the RQ header size, a record uses it,
    False/None keeps a page for the header.  ``events`` (a mask of ``1 << ZCRX_EVENT_*``,
    Linux 7.2) asks for event CQEs with ``event_user_data`` on this ring; ``stats`` places
    ``zcrx_stats`` in the RQ region after the RQEs (sized by :func:`io_uring_query_zcrx_event`)
    for :func:`io_uring_zcrx_copy_stats`.  ``area_reserve`` (> ``area_size``, no ``area``)
    maps that many bytes and registers only the first ``area_size``: the rest is for
    :func:`io_uring_zcrx_add_area`.  Raises ``ControlError`` with Linux's errno (EPERM,
    EINVAL, EFAULT, ENODEV, EEXIST, ERANGE...); nothing is left allocated then.
    """
    k = ring.kernel
    if not ring.flags & abi.IORING_SETUP_CQE32:
        raise Misuse("zcrx needs a ring set up with IORING_SETUP_CQE32 (CQE_MIXED is not "
                     "parsed by this library)")
    allocated: list[Memory] = []
    params = ring.zcrx_params
    own_params = params is None  # one parameter page per ring, not one per ifq
    try:
        if params is None:
            params = k.alloc_memory(PAGE_SIZE, tag="zcrx_param")
            allocated.append(params)
        if query is True:
            if not ring.zcrx_queried:  # the kernel's answer: asked once per ring, in the
                ring.zcrx_query = _query(k, abi.IO_URING_QUERY_ZCRX,  # parameter page
                                         abi.io_uring_query_zcrx, scratch=params)
                ring.zcrx_queried = True
            q = ring.zcrx_query
        else:
            q = query if query is not None and query is not False else None
        if isinstance(q, np.ndarray):
            hdr_size, hdr_align = int(q["rq_hdr_size"][0]), int(q["rq_hdr_alignment"][0])
            rq_size = zcrx_rq_region_size(rq_entries, hdr_size, hdr_align)
        else:
            hdr_size, hdr_align = PAGE_SIZE, PAGE_SIZE
            rq_size = zcrx_rq_region_size(rq_entries)
        ev: np.ndarray | None = None
        if events or stats:
            stats_off = None
            if stats:
                eq = io_uring_query_zcrx_event(k)
                ssize = int(eq["stats_size"][0]) if eq is not None else abi.zcrx_stats.itemsize
                salign = int(eq["stats_off_alignment"][0]) if eq is not None else _STATS_ALIGN
                rqes_end = (-(-hdr_size // hdr_align) * hdr_align
                            + (1 << (rq_entries - 1).bit_length()) * _RQE.itemsize)
                stats_off = -(-rqes_end // salign) * salign
                rq_size = max(rq_size, page_align(stats_off + ssize))
            ev = zcrx_event_desc(event_user_data, events, stats_off)
        own_area = not isinstance(area, Memory)
        # The area and the RQ are entered into the mm in one round trip.
        wanted: list[tuple[int, str] | Region] = (
            [(max(area_size, area_reserve), "zcrx_area")] if area is None else
            [area] if isinstance(area, Region) else [])
        if not rq_kernel:
            wanted.append((rq_size, "zcrx_rq"))
        mems = k.alloc_memories(wanted)
        allocated += mems
        if not isinstance(area, Memory):
            area = mems[0]
        area_len = min(area_size, area.length) if own_area else area.length
        rq_mem = None if rq_kernel else mems[-1]
        pv = params.view
        area_reg = zcrx_area_reg(area.addr, area_len)
        region = zcrx_region_desc(rq_size, rq_mem.addr if rq_mem is not None else 0)
        pv[_PARAM_AREA_OFF:_PARAM_AREA_OFF + area_reg.itemsize] = area_reg.view(np.uint8)
        pv[_PARAM_REGION_OFF:_PARAM_REGION_OFF + region.itemsize] = region.view(np.uint8)
        reg = zcrx_ifq_reg(if_idx, if_rxq, rq_entries, params.addr + _PARAM_AREA_OFF,
                           params.addr + _PARAM_REGION_OFF, flags, rx_buf_len)
        if ev is not None:
            pv[_PARAM_EVENT_OFF:_PARAM_EVENT_OFF + ev.itemsize] = ev.view(np.uint8)
            reg["event_desc"] = params.addr + _PARAM_EVENT_OFF
        _, blobs = io_uring_register(ring, abi.IORING_REGISTER_ZCRX_IFQ, 1, [reg])
    except BaseException:
        for mem in reversed(allocated):
            mem.close()
        if isinstance(area, Region):
            area.close()  # given to us, entered or not: ours to free
        raise
    # Registered: from here on the ifq lives as long as the ring; memory is freed with it.
    if not blobs or len(blobs[0]) != reg.itemsize:
        raise PeerMisbehaved("IORING_REGISTER_ZCRX_IFQ reply carries no ifq_reg")
    out = np.frombuffer(blobs[0], dtype=abi.io_uring_zcrx_ifq_reg).copy()
    area_out = pv[_PARAM_AREA_OFF:_PARAM_AREA_OFF + area_reg.itemsize].view(
        abi.io_uring_zcrx_area_reg)
    region_out = pv[_PARAM_REGION_OFF:_PARAM_REGION_OFF + region.itemsize].view(
        abi.io_uring_region_desc)
    token = int(area_out["rq_area_token"][0])
    if rq_mem is not None:
        rq_buf = rq_mem.view
    else:
        rq_buf = ring._map(int(region_out["mmap_offset"][0]), rq_size)
    ifq = ZcrxIfq(ring, out, area=area, own_area=own_area, area_token=token, params=params,
                  rq_buf=rq_buf, rq_size=rq_size, rq_mem=rq_mem, area_len=area_len,
                  own_params=own_params)
    ring.zcrx_params = params
    if ev is not None:
        ifq.event_user_data = event_user_data if events else None
        ifq.stats_off = int(ev["stats_offset"][0]) if stats else None
    ring.zcrx_ifqs.append(ifq)
    return ifq


def io_uring_register_zcrx_ctrl(ring: Ring, ctrl: np.ndarray) -> tuple[int, np.ndarray]:
    """``IORING_REGISTER_ZCRX_CTRL`` (nr_args 0, blob 0 = the 72-byte ``zcrx_ctrl``).

    Returns ``(res, ctrl written back)`` (``export_zcrx_fd`` for EXPORT).
    """
    res, blobs = io_uring_register(ring, abi.IORING_REGISTER_ZCRX_CTRL, 0, [ctrl])
    if blobs and len(blobs[0]) == abi.zcrx_ctrl.itemsize:
        return res, np.frombuffer(blobs[0], dtype=abi.zcrx_ctrl).copy()
    return res, ctrl.copy()


def io_uring_zcrx_flush_rq(ifq: ZcrxIfq) -> int:
    """``ZCRX_CTRL_FLUSH_RQ``: make the kernel consume the RQ now (NODEV mode needs it; a full
    RQ uses it).  Returns the syscall result."""
    ctrl = np.zeros(1, dtype=abi.zcrx_ctrl)
    ctrl["zcrx_id"] = ifq.zcrx_id
    ctrl["op"] = abi.ZCRX_CTRL_FLUSH_RQ
    res, _ = io_uring_register_zcrx_ctrl(ifq.ring, ctrl)
    ifq.rq_flushes += 1
    return res


def io_uring_zcrx_arm_event(ifq: ZcrxIfq, event_type: int) -> int:
    """``ZCRX_CTRL_ARM_EVENT`` (Linux 7.2): let event ``event_type`` fire again after it fired
    (``-EINVAL`` as ``ControlError`` if it has not).  Returns the syscall result."""
    ctrl = np.zeros(1, dtype=abi.zcrx_ctrl)
    ctrl["zcrx_id"] = ifq.zcrx_id
    ctrl["op"] = abi.ZCRX_CTRL_ARM_EVENT
    ctrl["arm_event_type"] = event_type
    res, _ = io_uring_register_zcrx_ctrl(ifq.ring, ctrl)
    return res


def io_uring_zcrx_add_area(ifq: ZcrxIfq, length: int) -> int:
    """``ZCRX_CTRL_ADD_AREA`` (Linux 7.3): register the next ``length`` bytes of the area
    reservation (see :func:`io_uring_register_ifq`'s ``area_reserve``) as one more area of
    ``ifq``.  Returns the new area id (the token the kernel wrote back, ``>> 48``).  Raises
    ``Misuse`` when the reservation has no ``length`` bytes left (nothing is sent),
    ``ControlError`` with the kernel's errno (``-EINVAL`` past ``ZCRX_MAX_AREAS`` or before
    7.3's ``-EOPNOTSUPP``...)."""
    base = ifq.area_bases[-1] + ifq.area_lens[-1]
    if length <= 0 or length % PAGE_SIZE or base + length > len(ifq.area_view):
        raise Misuse(f"no {length} bytes left in the zcrx area reservation "
                     f"({len(ifq.area_view) - base} of {len(ifq.area_view)})")
    pv = ifq.params.view
    reg = zcrx_area_reg(ifq.area_addr + base, length)
    end = _PARAM_ADD_AREA_OFF + reg.itemsize
    pv[_PARAM_ADD_AREA_OFF:end] = reg.view(np.uint8)
    ctrl = np.zeros(1, dtype=abi.zcrx_ctrl)
    ctrl["zcrx_id"] = ifq.zcrx_id
    ctrl["op"] = abi.ZCRX_CTRL_ADD_AREA
    ctrl["add_area_ptr"] = ifq.params.addr + _PARAM_ADD_AREA_OFF
    io_uring_register_zcrx_ctrl(ifq.ring, ctrl)
    token = int(pv[_PARAM_ADD_AREA_OFF:end].view(abi.io_uring_zcrx_area_reg)["rq_area_token"][0])
    area_id = token >> abi.IORING_ZCRX_AREA_SHIFT
    if area_id != len(ifq.area_bases):
        raise PeerMisbehaved(f"ZCRX_CTRL_ADD_AREA wrote back token {token:#x}; "
                             f"area {len(ifq.area_bases)} expected")
    ifq.area_bases.append(base)
    ifq.area_lens.append(length)
    ifq.area_len += length
    return area_id


def io_uring_zcrx_events(ifq: ZcrxIfq, cqes: np.ndarray) -> NDArray[np.int32]:
    """The event types among a CQE view (``user_data`` = the ifq's event user_data,
    ``flags`` 0; ``res`` is the ``ZCRX_EVENT_*`` type), in CQ order."""
    if ifq.event_user_data is None or not len(cqes):
        return np.empty(0, dtype=np.int32)
    m = (cqes["user_data"] == ifq.event_user_data) & (cqes["flags"] == 0)
    out: NDArray[np.int32] = cqes["res"][m].astype(np.int32)
    return out


def io_uring_zcrx_copy_stats(ifq: ZcrxIfq) -> tuple[int, int] | None:
    """``(copy_count, copy_bytes)`` the kernel keeps in the RQ region (Linux 7.2), or None
    when the ifq was registered without stats."""
    if ifq.stats_off is None or ifq._detached:
        return None
    s = ifq._rq_buf[ifq.stats_off:ifq.stats_off + abi.zcrx_stats.itemsize].view(abi.zcrx_stats)
    return int(s["copy_count"][0]), int(s["copy_bytes"][0])


def io_uring_prep_recv_zc(sqe: np.void, fd: int, length: int, zcrx_id: int,
                          flags: int = 0) -> None:
    """RECV_ZC on socket ``fd``: multishot (mandatory), ``length`` = byte budget (0: none),
    ``zcrx_ifq_idx`` = ``zcrx_id``; ``flags`` are extra ``sqe.ioprio`` bits (POLL_FIRST).
    Every other field stays 0, as the kernel requires."""
    io_uring_prep_rw(abi.IORING_OP_RECV_ZC, sqe, fd, 0, length, 0)
    sqe["ioprio"] = abi.IORING_RECV_MULTISHOT | flags
    sqe["zcrx_ifq_idx"] = zcrx_id


def io_uring_zcrx_rq_queued(ifq: ZcrxIfq) -> int:
    """RQEs published and not yet consumed by the kernel (``rq_tail - *khead``)."""
    return ifq.rq.nentries - ifq.rq.space()


class ZcrxBatch:
    """The data CQEs of one CQE view, as arrays (one element per CQE, in CQ order).

    ``index``: positions in the view; ``off``: the CQE's ``off`` (area token | byte offset);
    ``start``/``length``: where the chunk lies in the area (int64); ``stream_off``: per-chunk
    stream offsets when assigned (:func:`app_proc.verify.zcrx_stream_offsets`); ``bad``: per
    chunk the index of the first byte that failed verification, or -1 (when verified);
    ``returned``: RQEs pushed.
    """

    __slots__ = ("bad", "index", "length", "off", "returned", "start", "stream_off")

    def __init__(self, index: NDArray[np.intp], off: NDArray[np.uint64],
                 start: NDArray[np.int64], length: NDArray[np.int64]) -> None:
        self.index = index
        self.off = off
        self.start = start
        self.length = length
        self.stream_off: NDArray[np.int64] | None = None
        self.bad: NDArray[np.int64] | None = None
        self.returned = 0

    def __len__(self) -> int:
        return len(self.index)

    @property
    def nbytes(self) -> int:
        return int(self.length.sum()) if len(self.length) else 0


def zcrx_batch(ifq: ZcrxIfq, cqes: np.ndarray, select: NDArray[np.bool_] | None = None
               ) -> ZcrxBatch:
    """The data chunks of a CQE view: CQEs with ``res > 0`` (and ``select``, e.g. "this is a
    RECV_ZC of mine").  A chunk outside the area or of another area is the kernel's bug:
    ``PeerMisbehaved``.  With several areas ``start`` is the chunk's offset in
    ``ifq.area_view`` (its area's base added).  About ten numpy operations, whatever the
    batch size."""
    res = cqes["res"]
    m = res > 0
    if select is not None:
        m &= select
    idx = np.flatnonzero(m)
    off = cqes["zcrx_off"][idx]
    length = res[idx].astype(np.int64)
    start = (off & np.uint64(_AREA_LOW)).astype(np.int64)
    if len(idx) and len(ifq.area_bases) > 1:
        aid = (off >> np.uint64(abi.IORING_ZCRX_AREA_SHIFT)).astype(np.int64)
        wrong = aid >= len(ifq.area_bases)
        aid[wrong] = 0
        wrong |= start + length > np.asarray(ifq.area_lens, dtype=np.int64)[aid]
        if wrong.any():
            i = int(np.argmax(wrong))
            raise PeerMisbehaved(f"zcrx CQE off {int(off[i]):#x} len {int(length[i])} is not "
                                 f"in any of the {len(ifq.area_bases)} areas")
        start += np.asarray(ifq.area_bases, dtype=np.int64)[aid]
    elif len(idx):
        wrong = ((off >> np.uint64(abi.IORING_ZCRX_AREA_SHIFT)) != ifq.area_id) \
            | (start + length > ifq.area_len)
        if wrong.any():
            i = int(np.argmax(wrong))
            raise PeerMisbehaved(f"zcrx CQE off {int(off[i]):#x} len {int(length[i])} is not "
                                 f"in area {ifq.area_id} ({ifq.area_len} B)")
    return ZcrxBatch(idx, off, start, length)


def io_uring_zcrx_return(ifq: ZcrxIfq, off: NDArray[np.uint64], length: ArrayLike,
                         timeout: float = RQ_FULL_TIMEOUT_S) -> int:
    """Give chunks back: one RQE ``{off, len, __pad = 0}`` per chunk, published with one store
    of the RQ tail (liburing's ``io_uring_zcrx_rq`` semantics).

    When the RQ is full (``rq_tail - *khead == rq_entries``) the rest waits: first a
    ``ZCRX_CTRL_FLUSH_RQ`` (the kernel consumes the RQ now), then, while the kernel frees no
    room, back off until ``timeout`` seconds have passed: ``RingFull``.  Returns ``len(off)``.
    """
    n = len(off)
    if n == 0:
        return 0
    rqes = np.zeros(n, dtype=_RQE)
    rqes["off"] = off
    rqes["len"] = length
    done = ifq.rq.push(rqes)
    if done < n:
        _return_full(ifq, rqes, done, timeout)
    ifq.rqes_returned += n
    return n


def _return_full(ifq: ZcrxIfq, rqes: np.ndarray, done: int, timeout: float) -> None:
    """The slow path of :func:`io_uring_zcrx_return`: flush, then wait for room."""
    ifq.rq_full += 1
    n = len(rqes)
    deadline = time.monotonic() + timeout
    backoff = Backoff(spin=16, yields=16, max_sleep=0.002)
    while done < n:
        if ifq._flush_ok:
            try:
                io_uring_zcrx_flush_rq(ifq)
            except ControlError as exc:
                if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
                ifq._flush_ok = False  # an older kernel: wait for the lazy refill instead
        more = ifq.rq.push(rqes[done:])
        done += more
        if more:
            backoff.reset()
            continue
        if time.monotonic() > deadline:
            raise RingFull(f"zcrx RQ of {ifq.rq_entries} stayed full for {timeout:.1f} s "
                           f"({n - done} RQEs not returned)")
        backoff.idle()


def io_uring_zcrx_return_cqes(ifq: ZcrxIfq, cqes: np.ndarray,
                              select: NDArray[np.bool_] | None = None) -> ZcrxBatch:
    """The whole app side of one CQE batch, vectorised: find the data CQEs
    (:func:`zcrx_batch`), then return one RQE per data CQE with one tail store.  (A program
    that checks the bytes in between uses :func:`app_proc.verify.zcrx_return_verified`.)

    The caller still releases the CQEs (:func:`io_uring_cq_advance`) and handles non-data
    CQEs.  Read the data (``ifq.data``) before calling this: a returned chunk is the
    kernel's again.
    """
    batch = zcrx_batch(ifq, cqes, select)
    batch.returned = io_uring_zcrx_return(ifq, batch.off, batch.length)
    return batch
