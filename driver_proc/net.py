"""The network opcodes (Linux ``io_uring/net.c``): RECV, SEND, SHUTDOWN and ACCEPT, their
preps, sockaddr.

:func:`prep_recv` and :func:`prep_accept` validate an SQE as the opcode's prep does in Linux
and return the request to issue (:class:`RecvRequest`, :class:`AcceptRequest`; both are
:class:`driver_proc.io_uring.Request`, armed on their socket file's wait queue until the NAPI
path reports readiness).  :mod:`driver_proc.opdef` puts them in the opcode table.

Shared memory, and who writes what
----------------------------------
* **Receive buffers** (``sqe.addr``/``len``, or provided buffers taken from a
  :class:`driver_proc.kbuf.BufRing`) are app memory: the kernel writes the received bytes
  there through :meth:`driver_proc.mm.Mm.resolve` (an address that does not resolve is
  ``-EFAULT``).  The payload is copied out of the socket's skbs (``IoUring.skbs.copy_out``)
  and the consumed skbs freed.
* ACCEPT writes the peer's sockaddr and its length at the app's ``addr``/``addr2`` pointers.
* CQEs go through the ring (:meth:`driver_proc.io_uring.Ring.post`, ``post_batch``).

Semantics and departures
------------------------
* **RECV** copies into ``addr``/``len``, or with ``IOSQE_BUFFER_SELECT`` into buffers of a
  provided-buffer ring (one CQE per buffer, ``IORING_CQE_F_BUFFER`` with the buffer id,
  ``IORING_CQE_F_SOCK_NONEMPTY`` while data is left), and with ``IORING_RECV_MULTISHOT``
  keeps going (``IORING_CQE_F_MORE``) until an error, EOF or a full CQ ends it.  No provided
  buffer is ``-ENOBUFS``; a provided buffer of length 0 receives 0 bytes, which ends the
  request, as in Linux.
* A RECV multishot ``len`` caps each CQE's bytes (Linux >= 6.10 semantics); its total byte
  limit (``optlen``) is not emulated (``file_index`` must be 0).
* **ACCEPT**: single and ``IORING_ACCEPT_MULTISHOT``, ``IORING_ACCEPT_DONTWAIT`` /
  ``POLL_FIRST``; writes the peer's sockaddr when ``addr`` is given.  Accepting into a direct
  descriptor (``file_index``) finds no registered file table: ``-ENXIO``.
* **Multishot and a full CQ** (Linux ``io_req_post_cqe`` failing): the chunk that cannot be
  posted with ``IORING_CQE_F_MORE`` becomes the request's final CQE (same result and buffer,
  without F_MORE), queued on the overflow list; nothing is lost and the app re-arms.
* **SEND** copies ``len`` bytes from ``addr`` (through the task's mm: ``-EFAULT`` when they
  do not resolve) onto the connection's send queue, which the kernel's TCP transmits
  (:mod:`driver_proc.tcp_output`).  As io_uring's ``io_send`` on a stream socket: the request
  completes with what the queue took (a short count when it had room for part), waits for
  room when it took nothing, and with ``MSG_WAITALL`` waits until every byte is queued;
  ``MSG_DONTWAIT`` (or a non-blocking socket) completes with ``-EAGAIN`` instead of waiting.
  Errors: ``-EPIPE`` on a socket that is not connected or whose connection is closed,
  the pending socket error first (``-ECONNRESET`` after the peer's RST, ``-ETIMEDOUT``
  after the retransmissions ran out); bytes already queued are reported instead.  A
  destination address (``addr2``), ``IORING_RECVSEND_BUNDLE``, provided buffers and
  ``MSG_*`` flags other than ``MSG_DONTWAIT``/``MSG_WAITALL``/``MSG_NOSIGNAL``/``MSG_MORE``
  are ``-EINVAL``; ``MSG_MORE`` changes nothing (no corking or Nagle here).
* **SHUTDOWN** (``len`` = how) on a connected socket: SHUT_WR queues a FIN behind the data,
  SHUT_RD makes reads end with 0 after the queued data; not connected: ``-ENOTCONN``.
* **Not emulated, refused with -EINVAL:** ``IORING_RECVSEND_BUNDLE``, MSG_* flags other than
  ``MSG_DONTWAIT``/``MSG_WAITALL``/``MSG_NOSIGNAL``/``MSG_CMSG_CLOEXEC``.
"""

from __future__ import annotations

import errno

import numpy as np
from numpy.typing import NDArray

from driver_proc.files import AF_INET, AF_INET6, SOCK_CLOEXEC, SOCK_NONBLOCK, SocketFile
from driver_proc.io_uring import Request, Ring, Sqe
from driver_proc.kbuf import BufRing
from driver_proc.tcp import TcpReceiver
from shared import abi
from shared.errors import InvariantBroken, Misuse

__all__ = [
    "MSG_CMSG_CLOEXEC",
    "MSG_DONTWAIT",
    "MSG_MORE",
    "MSG_NOSIGNAL",
    "MSG_WAITALL",
    "AcceptRequest",
    "RecvRequest",
    "SendRequest",
    "prep_accept",
    "prep_recv",
    "prep_send",
    "prep_shutdown",
]

MSG_DONTWAIT = 0x40
MSG_WAITALL = 0x100
MSG_NOSIGNAL = 0x4000
MSG_CMSG_CLOEXEC = 0x40000000
_RECV_MSG_FLAGS = MSG_DONTWAIT | MSG_WAITALL | MSG_NOSIGNAL | MSG_CMSG_CLOEXEC
_RECV_IOPRIO = (abi.IORING_RECVSEND_POLL_FIRST | abi.IORING_RECV_MULTISHOT
                | abi.IORING_RECVSEND_BUNDLE)
_ACCEPT_IOPRIO = (abi.IORING_ACCEPT_MULTISHOT | abi.IORING_ACCEPT_DONTWAIT
                  | abi.IORING_ACCEPT_POLL_FIRST)
_PEEK_FIRST = 64  # provided-buffer entries looked at first in one RECV pass


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
        """Copy ``total`` stream bytes into the buffers; return how many buffers got theirs.

        Buffers that follow each other in memory (a ring of one allocation usually is) form
        runs, each resolved and copied as one range; only a run that does not resolve whole
        (it crosses a mapping's end) is walked buffer by buffer, to find the first one that
        does not resolve."""
        mm = self.ring.task.mm
        skbs = self.ring.uring.skbs
        k = len(addrs)
        pieces = conn.rxq.peek(total)
        brk = np.flatnonzero(addrs[1:] != addrs[:-1] + sizes[:-1]) + 1
        if not len(brk):
            try:
                dst = mm.resolve(int(addrs[0]), total, write=True)
            except Misuse:
                pass
            else:
                skbs.copy_out(pieces.handles, pieces.offsets, pieces.lengths, dst)
                return k
        bounce = np.empty(total, dtype=np.uint8)
        skbs.copy_out(pieces.handles, pieces.offsets, pieces.lengths, bounce)
        ends = np.cumsum(sizes)
        starts = [0, *brk.tolist()]
        for s, e in zip(starts, [*brk.tolist(), k], strict=True):
            lo, hi = int(ends[s] - sizes[s]), int(ends[e - 1])
            try:
                mm.resolve(int(addrs[s]), hi - lo, write=True)[:] = bounce[lo:hi]
                continue
            except Misuse:
                pass
            for i in range(s, e):  # the run crosses a mapping's end: which buffer fails
                lo, hi = int(ends[i] - sizes[i]), int(ends[i])
                try:
                    dst = mm.resolve(int(addrs[i]), hi - lo, write=True)
                except Misuse:
                    return i
                dst[:] = bounce[lo:hi]
        return k



def prep_recv(ring: Ring, sqe: Sqe) -> Request | None:
    """The RECV prep: check the SQE, find the socket, build the request."""
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



MSG_MORE = 0x8000
_SEND_MSG_FLAGS = MSG_DONTWAIT | MSG_WAITALL | MSG_NOSIGNAL | MSG_MORE


class SendRequest(Request):
    """IORING_OP_SEND: copy from app memory onto the connection's send queue
    (:class:`driver_proc.files.Transmit`; the kernel's TCP transmits it)."""

    def __init__(self, ring: Ring, sqe: Sqe, sock: SocketFile) -> None:
        super().__init__(ring, sqe, sock)
        self.addr = sqe.addr
        self.len = sqe.len
        self.msg_flags = sqe.op_flags
        self.nowait = bool(self.msg_flags & MSG_DONTWAIT) or sock.nonblock
        self.waitall = bool(self.msg_flags & MSG_WAITALL)
        self.done_io = 0  # bytes queued by earlier attempts (io_uring's sr->done_io)

    def attempt(self, issue: bool) -> None:
        ring = self.ring
        conn = self.sock.conn
        tx = ring.uring.sockets.tx
        if conn is None or tx is None:
            # not connected (tcp_sendmsg: sk_stream_wait_connect), or no write side
            self.complete(-errno.EPIPE if tx is not None else -errno.EOPNOTSUPP)
            return
        if self.len == 0:
            self.complete(0)
            return
        err = tx.send_error(conn)
        if err is not None:
            self.complete(self.done_io or err)
            return
        left = self.len - self.done_io
        n = min(left, tx.send_space(conn))
        if n <= 0:
            if self.nowait:
                self.complete(self.done_io or -errno.EAGAIN)
            else:
                self.arm()  # woken when ACKs free the send queue
            return
        try:
            src = ring.task.mm.resolve(self.addr + self.done_io, n, write=False)
        except Misuse as exc:
            ring.stats.efaults += 1
            self.complete(self.done_io or -(exc.errno or errno.EFAULT))
            return
        tx.send(conn, src.tobytes())
        self.done_io += n
        ring.stats.send_bytes += n
        if self.done_io < self.len and self.waitall and not self.nowait:
            self.arm()  # MSG_WAITALL: the rest as the queue drains
            return
        self.complete(self.done_io)


def prep_send(ring: Ring, sqe: Sqe) -> Request | None:
    """The SEND prep (``io_sendmsg_prep`` for IORING_OP_SEND): check the SQE, find the
    socket, build the request."""
    if sqe.file_index or sqe.off or sqe.buf_index:
        raise Misuse("send: file_index/addr2/buf_index must be 0", errno.EINVAL)
    if sqe.ioprio & ~abi.IORING_RECVSEND_POLL_FIRST:
        raise Misuse(f"send: ioprio {sqe.ioprio:#x} not emulated", errno.EINVAL)
    if sqe.op_flags & ~_SEND_MSG_FLAGS:
        raise Misuse(f"send: msg_flags {sqe.op_flags:#x} not emulated", errno.EINVAL)
    return SendRequest(ring, sqe, ring.task.get_socket(sqe.fd))


def prep_shutdown(ring: Ring, sqe: Sqe) -> Request | None:
    """IORING_OP_SHUTDOWN (``io_shutdown_prep``, ``io_shutdown``): ``len`` is ``how``;
    completes at once (:meth:`driver_proc.files.Sockets.shutdown`)."""
    if sqe.off or sqe.addr or sqe.op_flags or sqe.buf_index or sqe.file_index:
        raise Misuse("shutdown: off/addr/rw_flags/buf_index/splice_fd_in must be 0",
                     errno.EINVAL)
    ring.uring.sockets.shutdown(ring.task.get_socket(sqe.fd), sqe.len)
    if not sqe.flags & abi.IOSQE_CQE_SKIP_SUCCESS:
        ring.post(sqe.user_data, 0, 0)
    else:
        ring.stats.cqes_skipped += 1
    return None


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


def prep_accept(ring: Ring, sqe: Sqe) -> Request | None:
    """The ACCEPT prep: check the SQE, find the listening socket, build the request."""
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
