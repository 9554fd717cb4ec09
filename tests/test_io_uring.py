"""io_uring in the kernel: setup, SQE validation, requests, CQE posting, teardown.

Everything runs in this process.  The kernel side is the real one (KernelContext with the
syscall handlers, the socket table, io_uring); the app side is app_proc.liburing reading the
same shared-memory rings, its syscalls handed straight to the handlers (``Direct``).  Socket
payload comes from a fake skb store that keeps each skb's bytes in a dict and implements the
two methods the io_uring layer uses (``copy_out``, ``free``).
"""

from __future__ import annotations

import errno
import os
import time
from typing import Any

import numpy as np
import pytest

from app_proc import liburing as L
from app_proc import syscall as S
from driver_proc.files import AF_INET, AF_INET6, SOCK_NONBLOCK, SOCK_STREAM
from driver_proc.syscalls import KernelContext, handlers
from driver_proc.tcp import ACK, FIN, RST, SYN, flow_key
from shared import abi, pattern
from shared.control import DEFER, Peer, PeerCred, Reply
from shared.errors import Misuse, ZcrxError
from shared.msg import REGISTRY, ControlError, Message, decode, encode
from shared.shm import list_run_segments

RW = L.PROT_READ | L.PROT_WRITE


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


class FakeSkbs:
    """An skb store holding each skb's payload in a dict (the two methods io_uring needs)."""

    def __init__(self) -> None:
        self.data: dict[int, np.ndarray] = {}
        self.next = 1
        self.freed = 0

    def add(self, payload: bytes) -> int:
        h = self.next
        self.next += 1
        self.data[h] = np.frombuffer(payload, dtype=np.uint8)
        return h

    def copy_out(self, handles, offsets, lengths, dst) -> None:
        pos = 0
        for h, o, n in zip(handles.tolist(), offsets.tolist(), lengths.tolist(), strict=True):
            dst[pos:pos + n] = self.data[h][o:o + n]
            pos += n
        assert pos == len(dst), (pos, len(dst))

    def free(self, handles) -> None:
        for h in np.asarray(handles).tolist():
            del self.data[h]  # a double free raises KeyError
            self.freed += 1


class Direct:
    """A syscall transport that calls the kernel handlers in this process."""

    def __init__(self, ctx: KernelContext, peer: bytes) -> None:
        self.ctx = ctx
        # what the OS would say about a unix connection from this process
        self.peer = Peer(peer, PeerCred(os.getpid(), os.geteuid(), os.getegid()))
        self.h = handlers(ctx)

    def request_many(self, requests, *, timeout_ms=None) -> list:
        out: list = []
        for type, body in requests:
            try:
                out.append(self.request(type, body))
            except ControlError as exc:
                out.append(exc)
        return out

    def request(self, type: str, body: Any = None, blobs=(), *, timeout_ms=None) -> Message:
        msg = decode(encode(type, 1, body, blobs))
        if type not in self.h:  # as a server answers a type it has no handler for
            raise ControlError(type, errno.ENOSYS, f"no handler for {type}")
        try:
            res = self.h[type](msg, self.peer)
        except ZcrxError as exc:
            raise ControlError(type, exc.errno or errno.EIO, str(exc)) from None
        if res is DEFER:
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                self.ctx.rings.poll()
                done = [w for w in self.ctx.rings.take_completed_waits() if w.token[1] is msg]
                if done:
                    if done[0].result < 0:
                        raise ControlError(type, -done[0].result, "wait failed")
                    res = {"res": done[0].result}
                    break
                time.sleep(0.001)
            else:
                raise AssertionError("deferred syscall never completed")
        if isinstance(res, Reply):
            out_body, out_blobs = dict(res.body), tuple(res.blobs)
        else:
            out_body, out_blobs = dict(res or {}), ()
        mtype = REGISTRY.get(type)
        if mtype is not None and mtype.reply is not None:
            out_body = mtype.reply.check(out_body, list(out_blobs))
        return Message("ok", 1, out_body, out_blobs)

    def close(self) -> None:
        pass


class Sender:
    """The remote end of one TCP flow: builds segments as skbs and feeds the socket table."""

    def __init__(self, ctx: KernelContext, skbs: FakeSkbs, sport: int, dport: int = 8000,
                 saddr: str = "10.0.0.2", daddr: str = "10.0.0.1", isn: int = 1000) -> None:
        self.ctx, self.skbs = ctx, skbs
        self.key = flow_key(saddr, sport, daddr, dport)
        self.isn = isn
        self.sent = 0
        self.saddr, self.sport = saddr, sport

    def _feed(self, seqs, lens, flags, payloads) -> None:
        handles = [self.skbs.add(p) for p in payloads]
        res = self.ctx.sockets.table.ingest_flow(self.key, np.array(seqs, dtype=np.uint32),
                                                 np.array(lens), np.array(flags, dtype=np.uint8),
                                                 np.array(handles, dtype=np.int64))
        self.ctx.sockets.free(res.freed)
        self.ctx.rings.run(res.sockets, res.listeners)

    def connect(self) -> None:
        self._feed([self.isn, self.isn + 1], [0, 0], [SYN, ACK], [b"", b""])

    def send(self, data: bytes, seg: int = 1000) -> None:
        seqs, lens, flags, payloads = [], [], [], []
        for off in range(0, len(data), seg):
            chunk = data[off:off + seg]
            seqs.append((self.isn + 1 + self.sent + off) & 0xFFFFFFFF)
            lens.append(len(chunk))
            flags.append(ACK)
            payloads.append(chunk)
        self.sent += len(data)
        self._feed(seqs, lens, flags, payloads)

    def fin(self) -> None:
        self._feed([self.isn + 1 + self.sent], [0], [FIN | ACK], [b""])

    def rst(self) -> None:
        self._feed([self.isn + 1 + self.sent], [0], [RST | ACK], [b""])


@pytest.fixture
def skbs() -> FakeSkbs:
    return FakeSkbs()


@pytest.fixture
def ctx(run_id, skbs):
    c = KernelContext.create(run_id, skbs)
    c.tasks.grants.grant(os.getpid())  # what a launcher grants a test app
    yield c
    from driver_proc.syscalls import task_exit
    for t in c.tasks:
        task_exit(c, t)
    assert not c.rings.rings
    assert skbs.data == {}, "skbs leaked"


@pytest.fixture
def app(ctx, run_id):
    k = S.Kernel(run=run_id, name="test", transport=Direct(ctx, b"peer-1"))
    k.attach()
    yield k
    k.close()


def task_of(ctx: KernelContext, app: S.Kernel):
    return ctx.tasks.by_tid(app.task)


def submit_nops(ring: L.Ring, user_datas) -> int:
    for ud in user_datas:
        sqe = L.io_uring_get_sqe(ring)
        L.io_uring_prep_nop(sqe)
        L.io_uring_sqe_set_data64(sqe, ud)
    return L.io_uring_submit(ring)


def reap(ring: L.Ring) -> list[tuple[int, int, int]]:
    """Every ready CQE as (user_data, res, flags), consumed."""
    out = []
    while True:
        v = L.peek_cqes(ring)
        if not len(v):
            return out
        out += list(zip(v["user_data"].tolist(), v["res"].tolist(), v["flags"].tolist(),
                        strict=True))
        L.io_uring_cq_advance(ring, len(v))


def params(flags: int = 0, **fields) -> bytes:
    p = np.zeros(1, dtype=abi.io_uring_params)
    p["flags"] = flags
    for k, v in fields.items():
        p[k] = v
    return p.tobytes()


# --------------------------------------------------------------------------------------------
# Setup
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("entries", "flags", "fields", "err"), [
    (0, 0, {}, errno.EINVAL),
    (abi.IORING_MAX_ENTRIES + 1, 0, {}, errno.EINVAL),
    (8, 1 << 25, {}, errno.EINVAL),  # unknown flag
    (8, abi.IORING_SETUP_NO_MMAP, {}, errno.EINVAL),  # known, not emulated
    (8, abi.IORING_SETUP_DEFER_TASKRUN, {}, errno.EINVAL),  # needs SINGLE_ISSUER
    (8, abi.IORING_SETUP_CQE32 | abi.IORING_SETUP_CQE_MIXED, {}, errno.EINVAL),
    (8, abi.IORING_SETUP_SQPOLL | abi.IORING_SETUP_COOP_TASKRUN, {}, errno.EINVAL),
    (8, abi.IORING_SETUP_SQ_AFF, {}, errno.EINVAL),  # without SQPOLL
    (8, abi.IORING_SETUP_TASKRUN_FLAG, {}, errno.EINVAL),
    (8, abi.IORING_SETUP_CQSIZE, {"cq_entries": 0}, errno.EINVAL),
    (8, abi.IORING_SETUP_CQSIZE, {"cq_entries": 4}, errno.EINVAL),  # < sq entries
    (8, abi.IORING_SETUP_CQSIZE, {"cq_entries": abi.IORING_MAX_CQ_ENTRIES + 1}, errno.EINVAL),
    (8, 0, {"resv": [0, 1, 0]}, errno.EINVAL),
])
def test_setup_rejects_like_linux(ctx, app, entries, flags, fields, err):
    task = task_of(ctx, app)
    with pytest.raises(Misuse) as ei:
        ctx.rings.setup(task, entries, params(flags, **fields))
    assert ei.value.errno == err
    assert not ctx.rings.rings and set(task.files) == set()


@pytest.mark.parametrize(("entries", "flags", "fields", "sq", "cq"), [
    (3, 0, {}, 4, 8),
    (8, 0, {}, 8, 16),
    (abi.IORING_MAX_ENTRIES + 5, abi.IORING_SETUP_CLAMP, {}, abi.IORING_MAX_ENTRIES,
     2 * abi.IORING_MAX_ENTRIES),
    (8, abi.IORING_SETUP_CQSIZE, {"cq_entries": 100}, 8, 128),
    (8, abi.IORING_SETUP_CQSIZE | abi.IORING_SETUP_CLAMP, {"cq_entries": 1 << 20}, 8,
     abi.IORING_MAX_CQ_ENTRIES),
])
def test_setup_sizes(ctx, app, entries, flags, fields, sq, cq):
    task = task_of(ctx, app)
    fd, out = ctx.rings.setup(task, entries, params(flags, **fields))
    p = np.frombuffer(out, dtype=abi.io_uring_params)[0]
    assert (int(p["sq_entries"]), int(p["cq_entries"])) == (sq, cq)
    assert fd == 3
    ctx.rings.close_fd(task, fd)


@pytest.mark.parametrize("flags", [
    0, abi.IORING_SETUP_CQE32, abi.IORING_SETUP_NO_SQARRAY,
    abi.IORING_SETUP_CQE32 | abi.IORING_SETUP_NO_SQARRAY | abi.IORING_SETUP_SQE128,
    abi.IORING_SETUP_SINGLE_ISSUER | abi.IORING_SETUP_DEFER_TASKRUN | abi.IORING_SETUP_CQE_MIXED,
])
def test_ring_offsets_match_rings_layout(ctx, app, flags):
    ring = L.io_uring_queue_init(8, flags, kernel=app)
    sq_off, cq_off, size = abi.rings_layout(ring.sq_entries, ring.cq_entries, flags)
    assert ring.sq_off == sq_off and ring.cq_off == cq_off
    assert ring.features & abi.IORING_FEAT_SINGLE_MMAP and ring.features & abi.IORING_FEAT_NODROP
    kring = ctx.rings.rings[0]
    assert kring.rings_region.size >= size
    assert ring.sq_ring_mask == ring.sq_entries - 1 and ring.sq_ring_entries == ring.sq_entries
    assert ring.cq_ring_mask == ring.cq_entries - 1
    assert ring.sqes.dtype.itemsize == (128 if flags & abi.IORING_SETUP_SQE128 else 64)
    assert ring.cqes.dtype.itemsize == (32 if flags & abi.IORING_SETUP_CQE32 else 16)
    # and the ring works
    assert submit_nops(ring, [7, 8]) == 2
    assert reap(ring) == [(7, 0, 0), (8, 0, 0)]
    L.io_uring_queue_exit(ring)


# --------------------------------------------------------------------------------------------
# NOP, validation
# --------------------------------------------------------------------------------------------


def test_nop_user_data_round_trips_and_inject_result(ctx, app):
    ring = L.io_uring_queue_init(8, kernel=app)
    big = (1 << 64) - 1
    sqe = L.io_uring_get_sqe(ring)
    L.io_uring_prep_nop(sqe)
    L.io_uring_sqe_set_data64(sqe, big)
    sqe = L.io_uring_get_sqe(ring)
    L.io_uring_prep_nop(sqe)
    sqe["nop_flags"] = abi.IORING_NOP_INJECT_RESULT
    sqe["len"] = 1234
    L.io_uring_sqe_set_data64(sqe, 2)
    sqe = L.io_uring_get_sqe(ring)
    L.io_uring_prep_nop(sqe)
    sqe["nop_flags"] = abi.IORING_NOP_INJECT_RESULT
    sqe["len"] = (-errno.EIO) & 0xFFFFFFFF
    L.io_uring_sqe_set_data64(sqe, 3)
    sqe = L.io_uring_get_sqe(ring)
    L.io_uring_prep_nop(sqe)
    sqe["nop_flags"] = abi.IORING_NOP_CQE32  # this ring has 16-byte CQEs only
    L.io_uring_sqe_set_data64(sqe, 4)
    assert L.io_uring_submit(ring) == 4
    assert reap(ring) == [(big, 0, 0), (2, 1234, 0), (3, -errno.EIO, 0), (4, -errno.EINVAL, 0)]
    L.io_uring_queue_exit(ring)


def test_nop_cqe32_fills_the_big_half(ctx, app):
    ring = L.io_uring_queue_init(4, abi.IORING_SETUP_CQE32, kernel=app)
    sqe = L.io_uring_get_sqe(ring)
    L.io_uring_prep_nop(sqe)
    sqe["nop_flags"] = abi.IORING_NOP_CQE32
    sqe["off"], sqe["addr"] = 0x1111, 0x2222
    L.io_uring_sqe_set_data64(sqe, 9)
    L.io_uring_submit(ring)
    cqe = L.io_uring_wait_cqe(ring)
    assert (int(cqe["user_data"]), int(cqe["res"])) == (9, 0)
    assert cqe["big_cqe"].tolist() == [0x1111, 0x2222]
    L.io_uring_cqe_seen(ring, cqe)
    L.io_uring_queue_exit(ring)


def test_bad_sqes_complete_with_errnos_and_are_counted(ctx, app):
    ring = L.io_uring_queue_init(16, abi.IORING_SETUP_SUBMIT_ALL, kernel=app)
    cases = []

    def add(ud, err, **fields):
        sqe = L.io_uring_get_sqe(ring)
        for k, v in fields.items():
            sqe[k] = v
        sqe["user_data"] = ud
        cases.append((ud, -err if err else 0, 0))

    add(1, errno.EINVAL, opcode=200)  # past IORING_OP_LAST
    add(2, errno.EOPNOTSUPP, opcode=abi.IORING_OP_READ)  # real opcode, not emulated
    add(3, errno.EINVAL, opcode=abi.IORING_OP_NOP, flags=1 << 7)
    add(4, errno.EINVAL, opcode=abi.IORING_OP_NOP, flags=abi.IOSQE_IO_LINK)
    add(5, errno.EINVAL, opcode=abi.IORING_OP_NOP, ioprio=1)  # NOP has no ioprio
    add(6, errno.EOPNOTSUPP, opcode=abi.IORING_OP_NOP, flags=abi.IOSQE_BUFFER_SELECT)
    add(7, errno.EINVAL, opcode=abi.IORING_OP_NOP, personality=3)
    add(8, errno.EBADF, opcode=abi.IORING_OP_RECV, fd=77, addr=0, len=10)
    add(9, errno.ENOTSOCK, opcode=abi.IORING_OP_RECV, fd=ring.fd, len=10)
    add(10, errno.EBADF, opcode=abi.IORING_OP_RECV, fd=ring.fd, flags=abi.IOSQE_FIXED_FILE)
    add(11, errno.EBADF, opcode=abi.IORING_OP_CLOSE, fd=ring.fd)  # close of a ring fd
    add(12, errno.EINVAL, opcode=abi.IORING_OP_NOP, nop_flags=1 << 3)
    add(13, 0, opcode=abi.IORING_OP_NOP)
    assert L.io_uring_submit(ring) == 13
    assert reap(ring) == cases
    assert ctx.rings.rings[0].stats.bad_sqes == 12
    L.io_uring_queue_exit(ring)


def test_submission_stops_at_the_first_failure_without_submit_all(ctx, app):
    ring = L.io_uring_queue_init(8, kernel=app)
    sqe = L.io_uring_get_sqe(ring)
    sqe["opcode"] = 250
    sqe["user_data"] = 1
    submit_nops_count = 2
    for ud in (2, 3):
        s = L.io_uring_get_sqe(ring)
        L.io_uring_prep_nop(s)
        s["user_data"] = ud
    assert L.io_uring_submit(ring) == 1  # the failed one counts, the rest stays queued
    assert reap(ring) == [(1, -errno.EINVAL, 0)]
    assert L.io_uring_sq_ready(ring) == submit_nops_count
    assert L.io_uring_submit(ring) == 2
    assert reap(ring) == [(2, 0, 0), (3, 0, 0)]
    L.io_uring_queue_exit(ring)


def test_cqe_skip_success(ctx, app):
    ring = L.io_uring_queue_init(8, kernel=app)
    for ud, skip in ((1, True), (2, False)):
        s = L.io_uring_get_sqe(ring)
        L.io_uring_prep_nop(s)
        s["user_data"] = ud
        if skip:
            L.io_uring_sqe_set_flags(s, abi.IOSQE_CQE_SKIP_SUCCESS)
    L.io_uring_submit(ring)
    assert reap(ring) == [(2, 0, 0)]
    L.io_uring_queue_exit(ring)


# --------------------------------------------------------------------------------------------
# Sockets, accept, recv
# --------------------------------------------------------------------------------------------


def test_socket_syscall_errnos(ctx, app):
    def err(fn, *a):
        with pytest.raises(ControlError) as ei:
            fn(*a)
        return ei.value.errno

    assert err(app.socket, 1, SOCK_STREAM, 0) == errno.EAFNOSUPPORT  # AF_UNIX
    assert err(app.socket, AF_INET, 3, 0) == errno.ESOCKTNOSUPPORT  # SOCK_RAW
    assert err(app.socket, AF_INET, 2, 6) == errno.EPROTONOSUPPORT  # UDP socket, TCP proto
    assert err(app.socket, AF_INET, 99, 0) == errno.EINVAL
    assert err(app.socket, AF_INET, SOCK_STREAM, 17) == errno.EPROTONOSUPPORT
    fd = app.socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0)
    assert fd == 3
    assert err(app.bind, fd, "::1", 8000) == errno.EAFNOSUPPORT
    assert err(app.bind, fd, "bogus", 8000) == errno.EINVAL
    app.bind(fd, "0.0.0.0", 8000)
    assert err(app.bind, fd, "0.0.0.0", 8001) == errno.EINVAL  # already bound
    fd2 = app.socket(AF_INET6, SOCK_STREAM, 0)
    assert err(app.bind, fd2, "::", 8000) == errno.EADDRINUSE
    fd3 = app.socket()
    app.listen(fd3, 5)  # autobind to an ephemeral port
    assert app.getsockname(fd3)[1] >= 32768
    assert err(app.getpeername, fd3) == errno.ENOTCONN
    assert err(app.close_fd, 99) == errno.EBADF
    assert err(app.getsockname, 99) == errno.EBADF
    for f in (fd, fd2, fd3):
        app.close_fd(f)
    assert err(app.close_fd, fd) == errno.EBADF


def test_getsockopt_napi_id_and_setrlimit_nofile(ctx, skbs, app):
    """SO_INCOMING_NAPI_ID is 0 until a NAPI context marks the socket (the driver's path is
    tested end to end in test_multiqueue); other options are -ENOPROTOOPT.  RLIMIT_NOFILE
    moves the -EMFILE point; above the hard limit is -EPERM."""
    from driver_proc.files import NOFILE_MAX

    def err(fn, *a):
        with pytest.raises(ControlError) as ei:
            fn(*a)
        return ei.value.errno

    lfd = app.listen_tcp(8000)
    assert app.incoming_napi_id(lfd) == 0
    assert err(app.getsockopt, lfd, 1, 15) == errno.ENOPROTOOPT  # SO_REUSEPORT: unknown
    assert err(app.getsockopt, lfd, 6, 56) == errno.ENOPROTOOPT  # not SOL_SOCKET
    assert err(app.incoming_napi_id, 99) == errno.EBADF
    conn = task_of(ctx, app).get_socket(lfd)
    assert conn.conn is None
    assert err(app.setrlimit_nofile, NOFILE_MAX + 1) == errno.EPERM
    assert err(app.setrlimit_nofile, 0) == errno.EINVAL
    app.setrlimit_nofile(lfd + 2)
    fd = app.socket()
    assert fd == lfd + 1
    assert err(app.socket) == errno.EMFILE
    app.setrlimit_nofile(1024)
    app.close_fd(app.socket())
    for f in (fd, lfd):
        app.close_fd(f)


def test_alloc_memories_pipelined_all_or_nothing(ctx, app):
    """Several memories entered in one pipelined round trip; a refusal of one unmaps and
    frees the others (the task's mm is as before, no descriptor is left)."""
    mm = task_of(ctx, app).mm
    before = len(mm.vmas())
    a, b = app.alloc_memories([(3 * 4096, "a"), (4096, "b")])
    assert len(mm.vmas()) == before + 2 and a.addr != b.addr and (a.length, b.length) == (
        3 * 4096, 4096)
    a.view[:] = 7
    assert mm.find(a.addr) is not None
    for m in (a, b):
        m.close()
    assert len(mm.vmas()) == before
    fds = set(os.listdir("/proc/self/fd"))
    request = app.transport.request

    def refuse_second(type, body=None, *a, **k):
        if type == "mm_map" and refuse_second.n == 1:
            raise ControlError(type, errno.ENOMEM, "refused by the test")
        refuse_second.n += type == "mm_map"
        return request(type, body, *a, **k)

    refuse_second.n = 0
    app.transport.request = refuse_second
    with pytest.raises(ControlError) as ei:
        app.alloc_memories([(4096, "a"), (4096, "b"), (4096, "c")])
    assert ei.value.errno == errno.ENOMEM
    assert len(mm.vmas()) == before and not app._memories
    assert set(os.listdir("/proc/self/fd")) <= fds
    app.transport.request = request


def test_accept_and_recv_copy_exact_bytes(ctx, skbs, app):
    ring = L.io_uring_queue_init(8, kernel=app)
    lfd = app.listen_tcp(8000)
    mem = app.alloc_memory(3 * 4096)
    sa_addr, len_addr, buf_addr = mem.addr, mem.addr + 64, mem.addr + 4096
    mem.at(len_addr, 4).view("<u4")[0] = 16
    sqe = L.io_uring_get_sqe(ring)
    L.io_uring_prep_accept(sqe, lfd, sa_addr, len_addr)
    L.io_uring_sqe_set_data64(sqe, 100)
    L.io_uring_submit(ring)
    assert reap(ring) == []  # waits for a connection
    peer = Sender(ctx, skbs, sport=40001)
    peer.connect()
    [(ud, cfd, flags)] = reap(ring)
    assert (ud, flags) == (100, 0) and cfd == lfd + 1
    sa = mem.at(sa_addr, 16).tobytes()
    assert sa[:2] == AF_INET.to_bytes(2, "little") and sa[2:4] == (40001).to_bytes(2, "big")
    assert sa[4:8] == bytes([10, 0, 0, 2])
    assert int(mem.at(len_addr, 4).view("<u4")[0]) == 16
    assert app.getpeername(cfd) == ("10.0.0.2", 40001)
    assert app.getsockname(cfd) == ("10.0.0.1", 8000)

    data = pattern.pattern_bytes(5, 0, 10_000)
    peer.send(data, seg=1448)
    got = b""
    while len(got) < len(data):
        sqe = L.io_uring_get_sqe(ring)
        L.io_uring_prep_recv(sqe, cfd, buf_addr, 4096)
        L.io_uring_sqe_set_data64(sqe, 200)
        L.io_uring_submit(ring)
        [(ud, res, flags)] = reap(ring)
        assert ud == 200 and res > 0
        more = len(got) + res < len(data)
        assert bool(flags & abi.IORING_CQE_F_SOCK_NONEMPTY) == more
        got += mem.at(buf_addr, res).tobytes()
    assert got == data
    # nothing queued: the next recv waits, and EOF completes it with 0
    sqe = L.io_uring_get_sqe(ring)
    L.io_uring_prep_recv(sqe, cfd, buf_addr, 4096)
    L.io_uring_sqe_set_data64(sqe, 201)
    L.io_uring_submit(ring)
    assert reap(ring) == []
    peer.fin()
    assert reap(ring) == [(201, 0, 0)]
    assert skbs.data == {}  # every consumed skb was freed
    L.io_uring_queue_exit(ring)


def test_recv_efault_keeps_the_data_queued(ctx, skbs, app):
    ring = L.io_uring_queue_init(8, kernel=app)
    lfd = app.listen_tcp(8000)
    ro = app.alloc_memory(4096, prot=L.PROT_READ)
    peer = Sender(ctx, skbs, sport=40002)
    peer.connect()
    sqe = L.io_uring_get_sqe(ring)
    L.io_uring_prep_accept(sqe, lfd)
    L.io_uring_submit(ring)
    [(_, cfd, _)] = reap(ring)
    peer.send(b"hello world")
    for ud, addr in ((1, ro.addr), (2, 0x1000), (3, ro.addr + 4090)):
        sqe = L.io_uring_get_sqe(ring)
        L.io_uring_prep_recv(sqe, cfd, addr, 11)
        L.io_uring_sqe_set_data64(sqe, ud)
    assert L.io_uring_submit(ring) == 3
    assert reap(ring) == [(1, -errno.EFAULT, 0), (2, -errno.EFAULT, 0),
                          (3, -errno.EFAULT, 0)]
    rw = app.alloc_memory(4096)
    sqe = L.io_uring_get_sqe(ring)
    L.io_uring_prep_recv(sqe, cfd, rw.addr, 100)
    L.io_uring_sqe_set_data64(sqe, 4)
    L.io_uring_submit(ring)
    assert reap(ring) == [(4, 11, 0)]
    assert rw.view[:11].tobytes() == b"hello world"
    assert ctx.rings.rings[0].stats.efaults == 3
    L.io_uring_queue_exit(ring)


def test_recv_after_reset_reads_data_then_econnreset(ctx, skbs, app):
    ring = L.io_uring_queue_init(8, kernel=app)
    lfd = app.listen_tcp(8000)
    mem = app.alloc_memory(4096)
    peer = Sender(ctx, skbs, sport=40003)
    peer.connect()
    sqe = L.io_uring_get_sqe(ring)
    L.io_uring_prep_accept(sqe, lfd)
    L.io_uring_submit(ring)
    [(_, cfd, _)] = reap(ring)
    peer.send(b"abc")
    peer.rst()
    for ud in (1, 2, 3):
        sqe = L.io_uring_get_sqe(ring)
        L.io_uring_prep_recv(sqe, cfd, mem.addr, 100)
        L.io_uring_sqe_set_data64(sqe, ud)
    L.io_uring_submit(ring)
    # data first, then the error once, then plain EOF (as Linux's sock_error)
    assert reap(ring) == [(1, 3, 0), (2, -errno.ECONNRESET, 0), (3, 0, 0)]
    L.io_uring_queue_exit(ring)


def test_recv_nonblocking_and_close_cancels(ctx, skbs, app):
    ring = L.io_uring_queue_init(8, kernel=app)
    lfd = app.listen_tcp(8000)
    mem = app.alloc_memory(4096)
    peer = Sender(ctx, skbs, sport=40004)
    peer.connect()
    sqe = L.io_uring_get_sqe(ring)
    L.io_uring_prep_accept(sqe, lfd, flags=SOCK_NONBLOCK)
    L.io_uring_submit(ring)
    [(_, nb_fd, _)] = reap(ring)
    sqe = L.io_uring_get_sqe(ring)
    L.io_uring_prep_recv(sqe, nb_fd, mem.addr, 100)
    L.io_uring_sqe_set_data64(sqe, 1)
    sqe = L.io_uring_get_sqe(ring)
    L.io_uring_prep_accept(sqe, lfd)  # armed: no connection pending
    L.io_uring_sqe_set_data64(sqe, 2)
    L.io_uring_submit(ring)
    assert reap(ring) == [(1, -errno.EAGAIN, 0)]
    sqe = L.io_uring_get_sqe(ring)
    L.io_uring_prep_close(sqe, lfd)
    L.io_uring_sqe_set_data64(sqe, 3)
    L.io_uring_submit(ring)
    assert reap(ring) == [(2, -errno.ECANCELED, 0), (3, 0, 0)]
    L.io_uring_queue_exit(ring)


def test_multishot_accept(ctx, skbs, app):
    ring = L.io_uring_queue_init(8, kernel=app)
    lfd = app.listen_tcp(8000)
    sqe = L.io_uring_get_sqe(ring)
    L.io_uring_prep_multishot_accept(sqe, lfd)
    L.io_uring_sqe_set_data64(sqe, 5)
    L.io_uring_submit(ring)
    Sender(ctx, skbs, sport=41000).connect()
    Sender(ctx, skbs, sport=41001, saddr="10.0.0.3").connect()
    Sender(ctx, skbs, sport=41002).connect()
    cqes = reap(ring)
    assert [(ud, fl) for ud, _, fl in cqes] == [(5, abi.IORING_CQE_F_MORE)] * 3
    fds = [res for _, res, _ in cqes]
    assert fds == [lfd + 1, lfd + 2, lfd + 3]
    assert app.getpeername(fds[1]) == ("10.0.0.3", 41001)
    app.close_fd(lfd)  # ends the multishot accept
    assert reap(ring) == [(5, -errno.ECANCELED, 0)]
    L.io_uring_queue_exit(ring)


# --------------------------------------------------------------------------------------------
# Provided buffers
# --------------------------------------------------------------------------------------------


def accepted(ctx, skbs, app, ring, sport=42000) -> tuple[Sender, int, int]:
    lfd = app.listen_tcp(8000)
    peer = Sender(ctx, skbs, sport=sport)
    peer.connect()
    sqe = L.io_uring_get_sqe(ring)
    L.io_uring_prep_accept(sqe, lfd)
    L.io_uring_submit(ring)
    [(_, cfd, _)] = reap(ring)
    return peer, lfd, cfd


def provide(app, ring, bgid: int, nbufs: int, size: int):
    br = L.io_uring_setup_buf_ring(ring, nbufs, bgid)
    mem = app.alloc_memory(nbufs * size)
    br.add(mem.addr + size * np.arange(nbufs), size, np.arange(nbufs))
    br.advance(nbufs)
    return br, mem


def arm_recv_multishot(ring, fd, bgid, ud, length=0):
    sqe = L.io_uring_get_sqe(ring)
    L.io_uring_prep_recv_multishot(sqe, fd, 0, length)
    L.io_uring_sqe_set_buf_group(sqe, bgid)
    L.io_uring_sqe_set_data64(sqe, ud)
    L.io_uring_submit(ring)


def gather(mem, size, cqes) -> bytes:
    out = b""
    for _, res, fl in cqes:
        assert fl & abi.IORING_CQE_F_BUFFER
        bid = fl >> abi.IORING_CQE_BUFFER_SHIFT
        out += mem.view[bid * size:bid * size + res].tobytes()
    return out


def test_multishot_recv_fills_provided_buffers_then_enobufs(ctx, skbs, app):
    ring = L.io_uring_queue_init(16, kernel=app)
    peer, _lfd, cfd = accepted(ctx, skbs, app, ring)
    br, mem = provide(app, ring, bgid=7, nbufs=8, size=1024)
    arm_recv_multishot(ring, cfd, 7, ud=77)
    assert reap(ring) == []
    first = pattern.pattern_bytes(1, 0, 5000)
    peer.send(first, seg=700)
    cqes = reap(ring)
    assert [res for _, res, _ in cqes] == [1024, 1024, 1024, 1024, 904]
    assert [fl >> 16 for _, _, fl in cqes] == [0, 1, 2, 3, 4]
    assert all(fl & abi.IORING_CQE_F_MORE for _, _, fl in cqes)
    assert [bool(fl & abi.IORING_CQE_F_SOCK_NONEMPTY) for _, _, fl in cqes] == [True] * 4 + [False]
    assert gather(mem, 1024, cqes) == first
    second = pattern.pattern_bytes(1, 5000, 4000)
    peer.send(second)
    cqes = reap(ring)
    # three buffers left: 3072 bytes delivered, then the request ends with -ENOBUFS
    assert [res for _, res, _ in cqes] == [1024, 1024, 1024, -errno.ENOBUFS]
    assert cqes[-1][2] == 0 and all(fl & abi.IORING_CQE_F_MORE for _, _, fl in cqes[:3])
    assert gather(mem, 1024, cqes[:3]) == second[:3072]
    # give the buffers back, re-arm: the rest is still queued in the socket
    br.add(mem.addr + 1024 * np.arange(8), 1024, np.arange(8))
    br.advance(8)
    arm_recv_multishot(ring, cfd, 7, ud=78)
    cqes = reap(ring)
    assert [(ud, res) for ud, res, _ in cqes] == [(78, 928)]
    assert gather(mem, 1024, cqes) == second[3072:]
    peer.fin()
    assert reap(ring) == [(78, 0, 0)]
    assert ctx.rings.rings[0].stats.enobufs == 1
    L.io_uring_queue_exit(ring)


def test_multishot_recv_copies_runs_of_adjacent_buffers_and_stops_at_a_bad_one(ctx, skbs, app):
    """Provided buffers of two allocations in mixed order (runs of adjacent ones are copied as
    one range each) and a read-only one: the buffers before it get their bytes, in order,
    then the request ends with -EFAULT."""
    ring = L.io_uring_queue_init(16, kernel=app)
    peer, _lfd, cfd = accepted(ctx, skbs, app, ring)
    size = 512
    a, b = app.alloc_memory(8 * size), app.alloc_memory(8 * size)
    ro = app.alloc_memory(4096, prot=L.PROT_READ)
    where = [(a, 0), (a, 1), (a, 2), (b, 0), (b, 1), (a, 5)]
    addrs = [m.addr + i * size for m, i in where] + [ro.addr, a.addr + 7 * size]
    br = L.io_uring_setup_buf_ring(ring, 8, 5)
    br.add(np.array(addrs, dtype=np.int64), size, np.arange(8))
    br.advance(8)
    arm_recv_multishot(ring, cfd, 5, ud=9)
    data = pattern.pattern_bytes(2, 0, 8 * size)
    peer.send(data)
    cqes = reap(ring)
    assert [res for _, res, _ in cqes] == [size] * 6 + [-errno.EFAULT]
    assert [fl >> abi.IORING_CQE_BUFFER_SHIFT for _, _, fl in cqes[:6]] == list(range(6))
    got = b"".join(m.view[i * size:(i + 1) * size].tobytes() for m, i in where)
    assert got == data[:6 * size]
    assert ctx.rings.rings[0].stats.efaults == 1
    L.io_uring_queue_exit(ring)


def test_buffer_select_single_shot_and_per_cqe_len(ctx, skbs, app):
    ring = L.io_uring_queue_init(16, kernel=app)
    peer, _lfd, cfd = accepted(ctx, skbs, app, ring)
    # no such group / empty group: -ENOBUFS at once
    sqe = L.io_uring_get_sqe(ring)
    L.io_uring_prep_recv(sqe, cfd, 0, 0)
    L.io_uring_sqe_set_buf_group(sqe, 3)
    L.io_uring_sqe_set_data64(sqe, 1)
    L.io_uring_submit(ring)
    assert reap(ring) == [(1, -errno.ENOBUFS, 0)]
    _br, mem = provide(app, ring, bgid=3, nbufs=4, size=512)
    data = bytes(range(256)) * 8
    peer.send(data)
    sqe = L.io_uring_get_sqe(ring)
    L.io_uring_prep_recv(sqe, cfd, 0, 100)  # len caps the buffer
    L.io_uring_sqe_set_buf_group(sqe, 3)
    L.io_uring_sqe_set_data64(sqe, 2)
    L.io_uring_submit(ring)
    [(ud, res, fl)] = reap(ring)
    assert (ud, res, fl >> 16) == (2, 100, 0)
    assert fl & abi.IORING_CQE_F_BUFFER and fl & abi.IORING_CQE_F_SOCK_NONEMPTY
    assert mem.view[:100].tobytes() == data[:100]
    arm_recv_multishot(ring, cfd, 3, ud=3, length=300)  # 300 bytes per CQE at most
    cqes = reap(ring)
    assert [res for _, res, _ in cqes] == [300, 300, 300, -errno.ENOBUFS]
    assert gather(mem, 512, cqes[:3]) == data[100:1000]
    L.io_uring_queue_exit(ring)


def test_buffer_ring_in_kernel_memory_and_bad_registrations(ctx, skbs, app):
    ring = L.io_uring_queue_init(8, kernel=app)
    br = L.io_uring_setup_buf_ring(ring, 4, 1, flags=abi.IOU_PBUF_RING_MMAP)
    pbuf_names = [n for n in list_run_segments(ctx.run) if "pbuf1" in n and ".kernel." in n]
    assert len(pbuf_names) == 1
    peer, _lfd, cfd = accepted(ctx, skbs, app, ring)
    mem = app.alloc_memory(4 * 256)
    br.add(mem.addr + 256 * np.arange(4), 256, [10, 11, 12, 13])
    br.advance(4)
    peer.send(b"x" * 600)
    arm_recv_multishot(ring, cfd, 1, ud=9)
    cqes = reap(ring)
    assert [(res, fl >> 16) for _, res, fl in cqes] == [(256, 10), (256, 11), (88, 12)]

    def reg_err(**fields):
        reg = np.zeros(1, dtype=abi.io_uring_buf_reg)
        for k, v in fields.items():
            reg[k] = v
        with pytest.raises(ControlError) as ei:
            L.io_uring_register(ring, abi.IORING_REGISTER_PBUF_RING, 1, [reg])
        return ei.value.errno

    assert reg_err(ring_entries=4, bgid=1, flags=abi.IOU_PBUF_RING_MMAP) == errno.EEXIST
    assert reg_err(ring_entries=3, bgid=2, flags=abi.IOU_PBUF_RING_MMAP) == errno.EINVAL
    assert reg_err(ring_entries=4, bgid=2) == errno.EFAULT  # ring_addr 0
    assert reg_err(ring_entries=4, bgid=2, ring_addr=mem.addr + 8) == errno.EINVAL
    assert reg_err(ring_entries=4, bgid=2, ring_addr=0x1000) == errno.EFAULT
    assert reg_err(ring_entries=4, bgid=2, flags=abi.IOU_PBUF_RING_INC) == errno.EINVAL
    assert reg_err(ring_entries=4, bgid=2, flags=abi.IOU_PBUF_RING_MMAP,
                   resv=[0, 0, 1, 0, 0]) == errno.EINVAL
    L.io_uring_queue_exit(ring)
    assert [n for n in list_run_segments(ctx.run) if ".kernel." in n] == []


# --------------------------------------------------------------------------------------------
# CQ overflow, multishot termination
# --------------------------------------------------------------------------------------------


def test_cq_overflow_list_keeps_order_and_flushes(ctx, app):
    ring = L.io_uring_queue_init(4, kernel=app)  # CQ of 8
    kring = ctx.rings.rings[0]
    for base in (0, 4, 8):
        assert submit_nops(ring, range(base + 1, base + 5)) == 4
    assert L.io_uring_cq_ready(ring) == 8
    assert ring.sq_flags & abi.IORING_SQ_CQ_OVERFLOW
    assert len(kring.overflow) == 4
    got = reap(ring)  # 8 in the CQ
    submit_nops(ring, [13])  # posting flushes the overflow list first: order is kept
    got += reap(ring)
    assert [ud for ud, _, _ in got][:8] == list(range(1, 9))
    ctx.rings.poll()
    got += reap(ring)
    assert [ud for ud, _, _ in got] == list(range(1, 14))
    assert not ring.sq_flags & abi.IORING_SQ_CQ_OVERFLOW
    assert kring.stats.cqes_overflowed == 4 and kring.stats.cqes_dropped == 0
    L.io_uring_queue_exit(ring)


def test_cqes_past_the_overflow_limit_are_dropped_and_reported(ctx, app):
    ring = L.io_uring_queue_init(4, kernel=app)  # CQ 8, overflow list of 16
    kring = ctx.rings.rings[0]
    for base in range(0, 28, 4):
        submit_nops(ring, range(base, base + 4))
    assert kring.stats.cqes_dropped == 28 - 8 - 16
    assert int(ring.koverflow[0]) == 4
    with pytest.raises(ControlError) as ei:
        L.io_uring_enter(ring, 0, 1, abi.IORING_ENTER_GETEVENTS)
    assert ei.value.errno == errno.EBADR
    got = []
    for _ in range(4):
        got += reap(ring)
        ctx.rings.poll()
    assert [ud for ud, _, _ in got] == list(range(24))  # the first 24, in order
    L.io_uring_queue_exit(ring)


def test_multishot_recv_ends_without_more_when_the_cq_is_full(ctx, skbs, app):
    ring = L.io_uring_queue_init(2, abi.IORING_SETUP_CQSIZE, _params_cq(4), kernel=app)
    peer, _lfd, cfd = accepted(ctx, skbs, app, ring)
    _br, mem = provide(app, ring, bgid=1, nbufs=16, size=100)
    arm_recv_multishot(ring, cfd, 1, ud=5)
    data = pattern.pattern_bytes(2, 0, 1000)
    peer.send(data)
    # 4 CQ slots: three F_MORE CQEs... (the accept CQE was reaped) then the 4th chunk is final
    cqes = reap(ring)
    assert [res for _, res, _ in cqes] == [100] * 5
    assert [bool(fl & abi.IORING_CQE_F_MORE) for _, _, fl in cqes] == [True] * 4 + [False]
    assert gather(mem, 100, cqes) == data[:500]
    kring = ctx.rings.rings[0]
    assert kring.stats.mshot_terminated_cq_full == 1
    # the rest is still in the socket for the next request
    arm_recv_multishot(ring, cfd, 1, ud=6)
    cqes = reap(ring)
    assert sum(res for _, res, _ in cqes if res > 0) >= 300
    L.io_uring_queue_exit(ring)


def _params_cq(cq: int) -> np.ndarray:
    p = np.zeros(1, dtype=abi.io_uring_params)
    p["cq_entries"] = cq
    return p


# --------------------------------------------------------------------------------------------
# Untrusted app writes
# --------------------------------------------------------------------------------------------


def test_sq_tail_garbage_is_clamped_and_counted(ctx, app):
    ring = L.io_uring_queue_init(4, kernel=app)
    kring = ctx.rings.rings[0]
    ring.ktail[0] = int(ring.khead[0]) + 1000  # way past the ring
    n = L.io_uring_enter(ring, 1000, 0, 0)
    assert 0 <= n <= 4
    assert kring.stats.sq_tail_faults >= 1
    reap(ring)
    # the app's array names an SQE that does not exist: dropped, counted
    ring.ktail[0] = int(ring.khead[0])
    ring.sqe_head = ring.sqe_tail = int(ring.khead[0])
    sqe = L.io_uring_get_sqe(ring)
    L.io_uring_prep_nop(sqe)
    array = ring.sq_off["array"]
    slot = (ring.sqe_tail - 1) & ring.sq_ring_mask
    ring.ring_mem[array:array + 4 * ring.sq_entries].view("<u4")[slot] = 99
    assert L.io_uring_submit(ring) == 0
    assert int(ring.kdropped[0]) == 1 and kring.stats.sq_dropped == 1
    ring.ring_mem[array:array + 4 * ring.sq_entries].view("<u4")[slot] = slot
    # a scribbled CQ head (far ahead of the tail) is counted and changes nothing
    words = ring.ring_mem[:64].view("<u4")
    words[ring.cq_off["head"] // 4] = int(words[ring.cq_off["tail"] // 4]) + 12345
    for base in (1, 5):
        submit_nops(ring, range(base, base + 4))  # fills the CQ (the cached head says room)
    submit_nops(ring, [9])  # needs the head: the scribble is seen, counted, not believed
    assert kring.stats.cq_head_faults >= 1
    assert [ud for ud, _, _ in reap(ring)] == list(range(1, 10))
    L.io_uring_queue_exit(ring)


# --------------------------------------------------------------------------------------------
# Waiting, SQPOLL, R_DISABLED
# --------------------------------------------------------------------------------------------


def test_enter_getevents_defers_until_enough_cqes_or_timeout(ctx, app):
    ring = L.io_uring_queue_init(8, kernel=app)
    task = task_of(ctx, app)
    w = ctx.rings.enter(task, ring.fd, 0, 2, abi.IORING_ENTER_GETEVENTS, 10_000, token="t1")
    assert not isinstance(w, int) and w.result is None
    submit_nops(ring, [1])
    assert ctx.rings.take_completed_waits() == []
    submit_nops(ring, [2])
    [done] = ctx.rings.take_completed_waits()
    assert done is w and w.result == 0
    reap(ring)
    w2 = ctx.rings.enter(task, ring.fd, 0, 1, abi.IORING_ENTER_GETEVENTS, 50, token="t2")
    ctx.rings.poll(time.monotonic() + 1)
    [done] = ctx.rings.take_completed_waits()
    assert done is w2 and w2.result == -errno.ETIME
    w3 = ctx.rings.enter(task, ring.fd, 0, 1, abi.IORING_ENTER_GETEVENTS, -1, token="t3")
    L.io_uring_queue_exit(ring)  # closing the ring fails the waiter
    [done] = ctx.rings.take_completed_waits()
    assert done is w3 and w3.result == -errno.EBADF
    with pytest.raises(Misuse) as ei:
        ctx.rings.enter(task, 99, 0, 0, 0)
    assert ei.value.errno == errno.EBADF
    fd = app.socket()
    with pytest.raises(Misuse) as ei:
        ctx.rings.enter(task, fd, 0, 0, 0)
    assert ei.value.errno == errno.EOPNOTSUPP
    with pytest.raises(Misuse) as ei:
        ctx.rings.enter(task, fd, 0, 0, abi.IORING_ENTER_EXT_ARG)
    assert ei.value.errno == errno.EINVAL


def test_min_wait_ends_a_batch_wait_with_what_is_ready(ctx, app):
    """IORING_FEAT_MIN_TIMEOUT (io_cqring_min_timer_wakeup): a wait for 8 CQEs with a batch
    wait ends at min_wait with the CQEs that are ready; with none ready it becomes a wait for
    any one CQE until the general timeout; with no general timeout it ends with -ETIME."""
    ring = L.io_uring_queue_init(16, kernel=app)
    task = task_of(ctx, app)
    assert int(ring.params["features"][0]) & abi.IORING_FEAT_MIN_TIMEOUT
    gev = abi.IORING_ENTER_GETEVENTS
    t0 = time.monotonic()
    w = ctx.rings.enter(task, ring.fd, 0, 8, gev, 10_000, token="a", min_wait_usec=2000)
    assert not isinstance(w, int)
    submit_nops(ring, [1, 2])
    assert ctx.rings.take_completed_waits() == []  # 2 of 8, the batch wait still runs
    ctx.rings.poll(t0 + 0.001)
    assert ctx.rings.take_completed_waits() == []
    ctx.rings.poll(t0 + 0.003)
    [done] = ctx.rings.take_completed_waits()
    assert done is w and w.result == 0 and ring.cq.ready() == 2
    reap(ring)
    # nothing ready at min_wait: from then on one CQE ends it, before the general timeout
    t0 = time.monotonic()
    w = ctx.rings.enter(task, ring.fd, 0, 8, gev, 10_000, token="b", min_wait_usec=1000)
    assert not isinstance(w, int)
    ctx.rings.poll(t0 + 0.002)
    assert ctx.rings.take_completed_waits() == [] and w.min_complete == 1
    submit_nops(ring, [3])
    [done] = ctx.rings.take_completed_waits()
    assert done is w and w.result == 0
    reap(ring)
    # no general timeout (or one not later than min_wait): -ETIME at min_wait, counted
    before = ctx.rings.rings[0].stats.wait_timeouts
    for timeout_ms in (-1, 1):
        t0 = time.monotonic()
        w = ctx.rings.enter(task, ring.fd, 0, 8, gev, timeout_ms, token="c",
                            min_wait_usec=1000)
        assert not isinstance(w, int)
        assert ctx.rings.next_deadline() is not None
        ctx.rings.poll(t0 + 0.0015)
        [done] = ctx.rings.take_completed_waits()
        assert done is w and w.result == -errno.ETIME
    assert ctx.rings.rings[0].stats.wait_timeouts == before + 2
    # enough CQEs before min_wait: the wait ends as any wait does
    w = ctx.rings.enter(task, ring.fd, 0, 2, gev, 10_000, token="d", min_wait_usec=10**6)
    submit_nops(ring, [4, 5])
    [done] = ctx.rings.take_completed_waits()
    assert done is w and w.result == 0
    reap(ring)
    with pytest.raises(Misuse) as ei:
        ctx.rings.enter(task, ring.fd, 0, 1, gev, 10, min_wait_usec=1 << 32)
    assert ei.value.errno == errno.EINVAL
    L.io_uring_queue_exit(ring)


def test_wait_cqes_min_timeout_returns_a_partial_batch(ctx, app):
    """liburing's io_uring_wait_cqes_min_timeout through the syscall layer: 3 CQEs of a
    wanted 64 come back after min_wait, not after the 10 s timeout; with none, -ETIME."""
    ring = L.io_uring_queue_init(16, kernel=app)
    submit_nops(ring, [7, 8, 9])
    t0 = time.monotonic()
    cqes = L.io_uring_wait_cqes_min_timeout(ring, 64, 10_000, 20_000)
    assert len(cqes) == 3 and time.monotonic() - t0 < 5
    reap(ring)
    with pytest.raises(ControlError) as ei:
        L.io_uring_wait_cqes_min_timeout(ring, 64, 50, 20_000)
    assert ei.value.errno == errno.ETIME
    L.io_uring_queue_exit(ring)


def test_sqpoll_consumes_without_syscalls_and_sleeps_with_need_wakeup(ctx, app):
    p = np.zeros(1, dtype=abi.io_uring_params)
    p["sq_thread_idle"] = 10
    ring = L.io_uring_queue_init(8, abi.IORING_SETUP_SQPOLL, p, kernel=app)
    kring = ctx.rings.rings[0]
    sqe = L.io_uring_get_sqe(ring)
    L.io_uring_prep_nop(sqe)
    sqe["user_data"] = 1
    L.io_uring_submit(ring)  # only publishes the tail
    assert reap(ring) == []
    now = time.monotonic()
    ctx.rings.poll(now)  # the "SQ thread" runs
    assert reap(ring) == [(1, 0, 0)]
    ctx.rings.poll(now + 1)  # idle past sq_thread_idle: needs a wakeup
    assert ring.sq_flags & abi.IORING_SQ_NEED_WAKEUP and kring.sq_sleeping
    sqe = L.io_uring_get_sqe(ring)
    L.io_uring_prep_nop(sqe)
    sqe["user_data"] = 2
    ctx.rings.poll(now + 2)
    assert reap(ring) == []  # asleep
    L.io_uring_submit(ring)  # sees NEED_WAKEUP: enters with SQ_WAKEUP
    assert reap(ring) == [(2, 0, 0)]
    assert not ring.sq_flags & abi.IORING_SQ_NEED_WAKEUP
    L.io_uring_queue_exit(ring)


def test_r_disabled_ring_needs_enable(ctx, app):
    ring = L.io_uring_queue_init(4, abi.IORING_SETUP_R_DISABLED, kernel=app)
    with pytest.raises(ControlError) as ei:
        submit_nops(ring, [1])
    assert ei.value.errno == errno.EBADFD
    assert L.io_uring_register(ring, abi.IORING_REGISTER_ENABLE_RINGS, 0) == (0, [])
    with pytest.raises(ControlError) as ei:
        L.io_uring_register(ring, abi.IORING_REGISTER_ENABLE_RINGS, 0)
    assert ei.value.errno == errno.EBADFD
    assert L.io_uring_submit(ring) == 1
    assert reap(ring) == [(1, 0, 0)]
    L.io_uring_queue_exit(ring)


# --------------------------------------------------------------------------------------------
# Teardown
# --------------------------------------------------------------------------------------------


def test_close_of_a_ring_unlinks_its_regions_and_drops_requests(ctx, skbs, app):
    ring = L.io_uring_queue_init(8, abi.IORING_SETUP_CQE32, kernel=app)
    kernel_names = [n for n in list_run_segments(ctx.run) if ".kernel." in n]
    assert {n.rsplit(".", 1)[1] for n in kernel_names} == {"rings", "sqes"}
    peer, _lfd, cfd = accepted(ctx, skbs, app, ring)
    provide(app, ring, bgid=0, nbufs=4, size=256)
    arm_recv_multishot(ring, cfd, 0, ud=1)
    kring = ctx.rings.rings[0]
    assert len(kring.inflight) == 1
    L.io_uring_queue_exit(ring)
    assert [n for n in list_run_segments(ctx.run) if ".kernel." in n] == []
    assert kring.closed and not kring.inflight
    peer.send(b"late data")  # the dropped request is off the socket: nothing runs
    sock = task_of(ctx, app).get_socket(cfd)
    assert not sock.waiters and sock.conn.rxq.nbytes == 9


def test_task_exit_closes_everything(ctx, skbs, run_id):
    k = S.Kernel(run=run_id, name="dying", transport=Direct(ctx, b"peer-2"))
    k.attach()
    ring = L.io_uring_queue_init(8, kernel=k)
    lfd = k.listen_tcp(8000)
    peer = Sender(ctx, skbs, sport=43000)
    peer.connect()
    peer.send(b"queued but never read")
    sqe = L.io_uring_get_sqe(ring)
    L.io_uring_prep_multishot_accept(sqe, lfd)
    L.io_uring_submit(ring)
    k.close()  # queue_exit, then bye: the kernel closes what is left (the sockets)
    assert len(ctx.tasks) == 0 and not ctx.rings.rings
    assert skbs.data == {}
    assert [n for n in list_run_segments(run_id)] == []
    assert ring.closed


def test_one_multishot_pass_fills_hundreds_of_buffers(ctx, skbs, app):
    ring = L.io_uring_queue_init(128, kernel=app)  # CQ of 256
    peer, _lfd, cfd = accepted(ctx, skbs, app, ring)
    br, mem = provide(app, ring, bgid=2, nbufs=256, size=64)
    data = pattern.pattern_bytes(9, 0, 200 * 64 + 10)
    peer.send(data, seg=1448)
    arm_recv_multishot(ring, cfd, 2, ud=1)
    cqes = reap(ring)
    assert len(cqes) == 201 and all(fl & abi.IORING_CQE_F_MORE for _, _, fl in cqes)
    assert [fl >> 16 for _, _, fl in cqes] == list(range(201))
    assert gather(mem, 64, cqes) == data
    # buffers come back out of order (not contiguous in memory): still exact bytes
    br.add(mem.addr + 64 * np.arange(0, 201, 2)[::-1], 64, np.arange(0, 201, 2)[::-1])
    br.advance(101)
    more = pattern.pattern_bytes(9, len(data), 64 * 160)  # 156 buffers available
    peer.send(more)
    cqes = reap(ring)
    n_more = [res for _, res, _ in cqes]
    assert n_more[-1] == -errno.ENOBUFS and sum(n_more[:-1]) == 64 * 156
    assert gather(mem, 64, cqes[:-1]) == more[:64 * 156]
    L.io_uring_queue_exit(ring)


def test_big_cqes_on_a_mixed_ring_skip_the_wrap(ctx, app):
    ring = L.io_uring_queue_init(4, abi.IORING_SETUP_CQE_MIXED, kernel=app)  # CQ of 8 slots
    assert ring.cqes.dtype.itemsize == 16
    submit_nops(ring, range(4))
    submit_nops(ring, range(4, 7))
    assert len(reap(ring)) == 7  # the tail is now at the last slot
    sqe = L.io_uring_get_sqe(ring)
    L.io_uring_prep_nop(sqe)
    sqe["nop_flags"] = abi.IORING_NOP_CQE32
    sqe["off"], sqe["addr"] = 0xAA, 0xBB
    sqe["user_data"] = 99
    L.io_uring_submit(ring)
    assert L.io_uring_cq_ready(ring) == 3
    filler = L.peek_cqes(ring)
    assert len(filler) == 1 and int(filler[0]["flags"]) == abi.IORING_CQE_F_SKIP
    L.io_uring_cq_advance(ring, 1)
    two = L.peek_cqes(ring)
    big = two[:2].view(abi.io_uring_cqe32)[0]
    assert int(big["user_data"]) == 99 and int(big["flags"]) & abi.IORING_CQE_F_32
    assert big["big_cqe"].tolist() == [0xAA, 0xBB]
    L.io_uring_cq_advance(ring, 2)
    L.io_uring_queue_exit(ring)


def test_accept_into_a_bad_sockaddr_keeps_the_connection(ctx, skbs, app):
    ring = L.io_uring_queue_init(8, kernel=app)
    lfd = app.listen_tcp(8000)
    Sender(ctx, skbs, sport=44000).connect()
    sqe = L.io_uring_get_sqe(ring)
    L.io_uring_prep_accept(sqe, lfd, 0x1000, 0x2000)  # nothing mapped there
    sqe["user_data"] = 1
    sqe = L.io_uring_get_sqe(ring)
    L.io_uring_prep_accept(sqe, lfd)
    sqe["user_data"] = 2
    L.io_uring_submit(ring)
    assert reap(ring) == [(1, -errno.EFAULT, 0), (2, lfd + 1, 0)]
    L.io_uring_queue_exit(ring)
