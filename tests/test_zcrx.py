"""zcrx in the kernel: registration, the refill queue, the memory provider, RECV_ZC, teardown.

The kernel is the real one (:class:`driver_proc.kernel.Kernel`, with zcrx installed) over a
fake NIC that keeps the NIC contract byte for byte (``test_netdev.FakeNic``), running its
syscall loop in a thread of this process behind a real ControlServer.  The app side is
``app_proc.liburing`` for rings, memory and sockets, but every zcrx struct is built raw from
``shared.abi`` dtypes (as liburing's own tests do, to abuse the ABI on purpose).  Socket traffic
is injected in the kernel thread: linear skbs straight into the socket table (NODEV tests, any
TCP socket) or real frames DMA'd by the fake NIC into posted buffers (hardware queues).

The harness here is shared with ``test_conformance.py``.
"""

from __future__ import annotations

import errno
import os
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import test_netdev as tn  # FakeNic, INFO, Flow (tests/ is on sys.path under pytest)

from app_proc import liburing as L
from app_proc import syscall as S
from driver_proc.kernel import Kernel
from driver_proc.tcp import ACK, FIN, RST, SYN, flow_key
from driver_proc.zcrx import IFQ_COUNTERS
from shared import abi, pattern, wire
from shared.control import ControlServer, ipc_endpoint
from shared.errors import Misuse
from shared.msg import ControlError
from shared.ring import RingLayout, RingProducer
from shared.shm import PAGE_SIZE, Region, list_run_segments

pytestmark = pytest.mark.timeout(60)

PAGE = PAGE_SIZE
ZC_FLAGS = (abi.IORING_SETUP_DEFER_TASKRUN | abi.IORING_SETUP_SINGLE_ISSUER
            | abi.IORING_SETUP_CQE32 | abi.IORING_SETUP_SUBMIT_ALL)
RQ_ENTRIES = 128
AREA_PAGES = 132
AREA_SZ = AREA_PAGES * PAGE
LOW48 = (1 << 48) - 1
F_MORE = abi.IORING_CQE_F_MORE
UD_ACCEPT = 0xACC
UD_RECV = 0x2EC
LOCAL, REMOTE = "10.0.0.1", "10.0.0.2"


# --------------------------------------------------------------------------------------------
# The kernel in a thread
# --------------------------------------------------------------------------------------------

class ZNic(tn.FakeNic):
    """The fake NIC of test_netdev plus ``nic.probe`` (the kernel probes it at start)."""

    def call(self, type: str, body: Any = None) -> dict[str, Any]:
        if type == "nic.probe":
            self.calls.append((type, {}))
            return {"netdevs": [dict(self.info)], "stats_region": ""}
        return super().call(type, body)


class KernelThread:
    """A real Kernel (fake NIC, zcrx installed) serving syscalls in a thread.

    :meth:`call` runs a function in the kernel thread (the only thread touching kernel state);
    traffic helpers build TCP flows there.
    """

    def __init__(self, run_id: str, rundir: Any, *,
                 kernel: tuple[int, int] = abi.LINUX_VERSION, **info: Any) -> None:
        self.nic = ZNic({**tn.INFO, **info})
        self.kernel = Kernel(run_id, str(rundir), self.nic, kernel=kernel)
        self.kernel.grant_cap(os.getpid())  # the launcher's CAP_NET_ADMIN grant
        self.kernel.probe()
        self.endpoint = ipc_endpoint(rundir, "kernel")
        self.seq: dict[int, int] = {}
        self._cmds: queue.Queue[tuple[Callable[[Kernel], Any], Future[Any]]] = queue.Queue()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self.error: BaseException | None = None
        self._t = threading.Thread(target=self._main, name="kernel", daemon=True)
        self._t.start()
        assert self._ready.wait(10)

    def _main(self) -> None:
        k = self.kernel
        server = ControlServer(self.endpoint, k.handlers(), role="kernel")
        k.attach_server(server)
        self._ready.set()
        try:
            while not self._stop.is_set():
                server.poll_once(1)
                server.process_pending()
                irqs, self.nic.irq_queues = self.nic.irq_queues, []
                for q in irqs:  # the NIC's interrupts put the queues on the poll list
                    k.irq(self.nic.info["name"], q)
                k.poll()
                while True:
                    try:
                        fn, fut = self._cmds.get_nowait()
                    except queue.Empty:
                        break
                    try:
                        fut.set_result(fn(k))
                    except BaseException as exc:
                        fut.set_exception(exc)
        except BaseException as exc:
            self.error = exc
        finally:
            try:
                k.shutdown()
            finally:
                server.close()

    def call(self, fn: Callable[[Kernel], Any]) -> Any:
        fut: Future[Any] = Future()
        self._cmds.put((fn, fut))
        return fut.result(timeout=20)

    def wait_for(self, cond: Callable[[Kernel], bool], timeout: float = 10) -> None:
        ev = threading.Event()
        for _ in range(int(timeout / 0.002)):
            if self.call(cond):
                return
            ev.wait(0.002)
        raise AssertionError("condition never held")

    def close(self) -> None:
        self._stop.set()
        self._t.join(20)
        assert not self._t.is_alive()
        self.nic.close()
        if self.error is not None:
            raise self.error

    # -- state helpers (run in the kernel thread) ----------------------------------------------

    def ifq(self, serial: int | None = None) -> Any:
        def get(k: Kernel) -> Any:
            ifqs = k.zcrx.ifqs
            return ifqs[-1] if serial is None else next(i for i in ifqs if i.serial == serial)
        return self.call(get)

    def counters(self, serial: int | None = None) -> dict[str, int]:
        def get(k: Kernel) -> dict[str, int]:
            ifqs = k.zcrx.ifqs
            ifq = ifqs[-1] if serial is None else next(i for i in ifqs if i.serial == serial)
            return dict(ifq.counters)
        return self.call(get)

    def ledger(self, serial: int | None = None) -> dict[str, int]:
        def get(k: Kernel) -> dict[str, int]:
            k.zcrx.check_ledger()
            for dev in k.netdevs.values():
                dev.check_ledger()
            ifqs = k.zcrx.ifqs
            ifq = ifqs[-1] if serial is None else next(i for i in ifqs if i.serial == serial)
            return ifq.ledger()
        return self.call(get)

    # -- TCP flows as linear skbs (any socket; what NODEV sees) --------------------------------

    def _feed(self, k: Kernel, sport: int, dport: int, seqs: list[int], lens: list[int],
              flags: list[int], payloads: list[bytes]) -> None:
        n = len(lens)
        width = max([1, *lens])
        rows = np.zeros((n, width), dtype=np.uint8)
        for i, p in enumerate(payloads):
            rows[i, :len(p)] = np.frombuffer(p, dtype=np.uint8)
        handles = k.skbs.add_batch(n, lin_src=rows, lin_off=0, lin_len=np.array(lens))
        key = flow_key(REMOTE, sport, LOCAL, dport)
        res = k.table.ingest_flow(key, np.array(seqs, dtype=np.uint32), np.array(lens),
                                  np.array(flags, dtype=np.uint8), handles)
        if len(res.freed):
            k.skbs.free(res.freed)
        k.ctx.rings.run(res.sockets, res.listeners)

    def connect(self, sport: int, dport: int = 8000, isn: int = 1000) -> None:
        self.seq[sport] = isn + 1
        self.call(lambda k: self._feed(k, sport, dport, [isn, isn + 1], [0, 0], [SYN, ACK],
                                       [b"", b""]))

    def send(self, sport: int, data: bytes, dport: int = 8000, seg: int = PAGE) -> None:
        """``data`` as in-order segments of ``seg`` bytes, in one NAPI-like batch."""
        start = self.seq[sport]
        offs = list(range(0, len(data), seg))
        self.seq[sport] = start + len(data)
        self.call(lambda k: self._feed(
            k, sport, dport, [(start + o) & 0xFFFFFFFF for o in offs],
            [len(data[o:o + seg]) for o in offs], [ACK] * len(offs),
            [data[o:o + seg] for o in offs]))

    def fin(self, sport: int, dport: int = 8000) -> None:
        s = self.seq[sport]
        self.call(lambda k: self._feed(k, sport, dport, [s], [0], [FIN | ACK], [b""]))

    def rst(self, sport: int, dport: int = 8000) -> None:
        s = self.seq[sport]
        self.call(lambda k: self._feed(k, sport, dport, [s], [0], [RST], [b""]))

    # -- frames through the fake NIC (hardware queues) -------------------------------------------

    def deliver(self, q: int, frames: np.ndarray, flen: np.ndarray) -> int:
        """DMA frames into queue ``q``; returns how many the NIC took (the rest wait: pause)."""
        return int(self.call(lambda k: self.nic.deliver(q, frames, flen)))


def kernel_fixture(run_id: str, tmp_path: Any,
                   kernel: tuple[int, int] = abi.LINUX_VERSION) -> Iterator[KernelThread]:
    """Body of the ``kt`` fixture (shared with test_conformance): a kernel acting as Linux
    ``kernel``."""
    k = KernelThread(run_id, tmp_path, kernel=kernel)
    yield k
    k.close()
    assert k.kernel.skbs.in_flight == 0


def app_fixture(run_id: str, tmp_path: Any) -> Iterator[S.Kernel]:
    """Body of the ``app`` fixture: an attached app (CAP_NET_ADMIN) closed at the end."""
    a = S.Kernel(tmp_path, run=run_id, name="zcrx-test")
    a.attach()
    yield a
    a.close()


#: The RQ header each emulated release reports: (head, tail, rqes), rq_hdr_size.
RQ_LAYOUTS = {(7, 1): ((0, 4, 64), 8), (7, 2): ((0, 4, 64), 8), (7, 3): ((0, 64, 128), 128)}
#: Releases a version-sensitive case runs on (``kt`` parametrized indirectly).
VERSIONS = pytest.mark.parametrize("kt", abi.KERNEL_VERSIONS, indirect=True,
                                   ids=[abi.kernel_version_name(v) for v in abi.KERNEL_VERSIONS])


def task_of(k: Kernel, app: S.Kernel) -> Any:
    """The kernel's task of ``app`` (run in the kernel thread)."""
    assert app.task is not None
    task = k.ctx.tasks.by_tid(app.task)
    assert task is not None
    return task


# --------------------------------------------------------------------------------------------
# Raw zcrx structs on the app side
# --------------------------------------------------------------------------------------------

def rq_size(entries: int) -> int:
    """liburing's get_rq_size: ALIGN(hdr, align) + entries * 16, page aligned."""
    hdr = (abi.ZCRX_RQ_HDR_SIZE + abi.ZCRX_RQ_HDR_ALIGNMENT - 1) & ~(abi.ZCRX_RQ_HDR_ALIGNMENT
                                                                   - 1)
    return (hdr + entries * 16 + PAGE - 1) // PAGE * PAGE


@dataclass
class Bundle:
    """The default registration (conformance "DEF"): area, RQ memory, param structs in one
    page of app memory (area_reg at +0, region_desc at +64) and the ifq_reg blob."""

    app: S.Kernel
    area: S.Memory
    rq: S.Memory | None
    params: S.Memory
    reg: np.ndarray
    area_reg: np.ndarray = field(init=False)
    rd: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.area_reg = self.params.view[0:48].view(abi.io_uring_zcrx_area_reg)
        self.rd = self.params.view[64:128].view(abi.io_uring_region_desc)

    @classmethod
    def make(cls, app: S.Kernel, *, rq_entries: int = RQ_ENTRIES, area_pages: int = AREA_PAGES,
             kernel_rq: bool = False, nodev: bool = True, if_idx: int = 0, if_rxq: int = 0,
             rq_mem_entries: int | None = None, named: bool = False) -> Bundle:
        """``named``: the area is a named shm segment (never pinnable) instead of a memfd."""
        area = app.alloc_memory(area_pages * PAGE, tag="area", named=named)
        size = rq_size(rq_mem_entries or rq_entries)
        rq = None if kernel_rq else app.alloc_memory(size, tag="rq")
        params = app.alloc_memory(PAGE, tag="params")
        reg = np.zeros(1, dtype=abi.io_uring_zcrx_ifq_reg)
        b = cls(app, area, rq, params, reg)
        b.area_reg["addr"] = area.addr
        b.area_reg["len"] = area_pages * PAGE
        b.rd["size"] = size
        if rq is not None:
            b.rd["user_addr"] = rq.addr
            b.rd["flags"] = abi.IORING_MEM_REGION_TYPE_USER
        reg["if_idx"] = if_idx
        reg["if_rxq"] = if_rxq
        reg["rq_entries"] = rq_entries
        reg["flags"] = abi.ZCRX_REG_NODEV if nodev else 0
        reg["area_ptr"] = params.addr
        reg["region_ptr"] = params.addr + 64
        return b

    def close(self) -> None:
        for m in (self.area, self.rq, self.params):
            if m is not None:
                m.close()


def register_raw(ring: L.Ring, reg: np.ndarray, nr_args: int = 1) -> np.ndarray:
    """IORING_REGISTER_ZCRX_IFQ with exactly these bytes; the written-back ifq_reg."""
    _, blobs = L.io_uring_register(ring, abi.IORING_REGISTER_ZCRX_IFQ, nr_args, [reg])
    assert len(blobs) == 1 and len(blobs[0]) == 96
    return np.frombuffer(blobs[0], dtype=abi.io_uring_zcrx_ifq_reg).copy()


def reg_errno(ring: L.Ring, reg: np.ndarray, nr_args: int = 1) -> int:
    """The errno a registration fails with (0 if it succeeded)."""
    try:
        register_raw(ring, reg, nr_args)
    except ControlError as exc:
        return exc.errno or -1
    return 0


def ctrl(ring: L.Ring, zcrx_id: int, op: int = abi.ZCRX_CTRL_FLUSH_RQ, nr_args: int = 0,
         **fields: Any) -> np.ndarray:
    c = np.zeros(1, dtype=abi.zcrx_ctrl)
    c["zcrx_id"] = zcrx_id
    c["op"] = op
    for k, v in fields.items():
        c[k] = v
    _, blobs = L.io_uring_register(ring, abi.IORING_REGISTER_ZCRX_CTRL, nr_args, [c])
    return np.frombuffer(blobs[0], dtype=abi.zcrx_ctrl).copy()


def ctrl_errno(ring: L.Ring, zcrx_id: int, op: int = abi.ZCRX_CTRL_FLUSH_RQ, nr_args: int = 0,
               **fields: Any) -> int:
    try:
        ctrl(ring, zcrx_id, op, nr_args, **fields)
    except ControlError as exc:
        return exc.errno or -1
    return 0


class Zq:
    """A registered zcrx as the app sees it: id, RQ (at the reported offsets), area bytes."""

    def __init__(self, ring: L.Ring, b: Bundle, out: np.ndarray) -> None:
        self.ring, self.b, self.out = ring, b, out
        self.id = int(out["zcrx_id"][0])
        self.entries = int(out["rq_entries"][0])
        off = out["offsets"][0]
        self.head_off, self.tail_off, self.rqes_off = (int(off["head"]), int(off["tail"]),
                                                      int(off["rqes"]))
        self.token = int(b.area_reg["rq_area_token"][0])
        self._region: Region | None = None
        self._map: tuple[int, int] | None = None
        if b.rq is not None:
            mem = b.rq.view
        else:
            size = int(b.rd["size"][0])
            name, addr = ring.kernel.mmap(ring.fd, int(b.rd["mmap_offset"][0]), size)
            self._map = (addr, size)
            self._region = Region.attach(name)
            mem = self._region.array(np.uint8)
        self.mem = mem
        self.words = mem[:self.rqes_off].view("<u4")  # the RQ header, wherever it puts them
        self.rqes = mem[self.rqes_off:self.rqes_off + 16 * self.entries].view(
            abi.io_uring_zcrx_rqe)
        self.rq = RingProducer(mem, RingLayout(self.entries, abi.io_uring_zcrx_rqe,
                                               head=self.head_off, tail=self.tail_off,
                                               entries=self.rqes_off))

    @property
    def khead(self) -> int:
        return int(self.words[self.head_off // 4])

    @property
    def ktail(self) -> int:
        return int(self.words[self.tail_off // 4])

    def area_bytes(self, off: int, n: int) -> bytes:
        return self.b.area.view[off & LOW48:(off & LOW48) + n].tobytes()

    def give_back(self, offs: list[int] | np.ndarray, lens: Any = 1, pad: int = 0) -> int:
        """Write one RQE per offset (token ORed in) and publish the tail; returns how many."""
        offs = np.asarray(offs, dtype=np.uint64)
        e = np.zeros(len(offs), dtype=abi.io_uring_zcrx_rqe)
        e["off"] = (offs & np.uint64(LOW48)) | np.uint64(self.token)
        e["len"] = lens
        e["__pad"] = pad
        return self.rq.push(e)

    def raw_rqes(self, offs: list[int], pad: int = 0) -> None:
        """RQEs with exactly these ``off`` values (no masking), then the tail."""
        e = np.zeros(len(offs), dtype=abi.io_uring_zcrx_rqe)
        e["off"] = np.array(offs, dtype=np.uint64)
        e["len"] = 1
        e["__pad"] = pad
        assert self.rq.push(e) == len(offs)

    def flush(self) -> None:
        ctrl(self.ring, self.id)

    def queued(self) -> int:
        return (self.rq.tail - self.khead) & 0xFFFFFFFF

    def close(self) -> None:
        self.rq.detach()
        self.rqes = np.empty(0, dtype=abi.io_uring_zcrx_rqe)
        self.mem = self.words = np.empty(0, dtype=np.uint8)
        if self._region is not None:
            self._region.detach()
        if self._map is not None and not self.ring.kernel.closed:
            self.ring.kernel.mm_unmap(*self._map)


def zring(app: S.Kernel, entries: int = 128, flags: int = ZC_FLAGS,
          cq_entries: int | None = None) -> L.Ring:
    p = None
    if cq_entries is not None:
        p = np.zeros(1, dtype=abi.io_uring_params)
        p["cq_entries"] = cq_entries
        flags |= abi.IORING_SETUP_CQSIZE
    return L.io_uring_queue_init(entries, flags, p, kernel=app)


def setup_zcrx(app: S.Kernel, ring: L.Ring | None = None, **kw: Any) -> Zq:
    ring = ring if ring is not None else zring(app)
    b = Bundle.make(app, **kw)
    return Zq(ring, b, register_raw(ring, b.reg))


# -- SQEs and CQEs -----------------------------------------------------------------------------

def submit_recvzc(ring: L.Ring, fd: int, zcrx_id: int, length: int = 0, ud: int = UD_RECV,
                  ioprio: int = abi.IORING_RECV_MULTISHOT, **fields: Any) -> None:
    sqe = L.io_uring_get_sqe(ring)
    assert sqe is not None
    sqe["opcode"] = abi.IORING_OP_RECV_ZC
    sqe["fd"] = fd
    sqe["len"] = length
    sqe["ioprio"] = ioprio
    sqe["zcrx_ifq_idx"] = zcrx_id
    sqe["user_data"] = ud
    for k, v in fields.items():
        sqe[k] = v
    L.io_uring_submit(ring)


@dataclass
class Cqe:
    ud: int
    res: int
    flags: int
    off: int


def reap(ring: L.Ring) -> list[Cqe]:
    """Every CQE ready now (copied, then released)."""
    v = L.peek_cqes(ring)
    out = []
    while len(v):
        big = "zcrx_off" in (v.dtype.names or ())
        out += [Cqe(int(c["user_data"]), int(c["res"]), int(c["flags"]),
                    int(c["zcrx_off"]) if big else 0) for c in v]
        L.io_uring_cq_advance(ring, len(v))
        v = L.peek_cqes(ring)
    return out


def wait_cqes(ring: L.Ring, n: int = 1, timeout_ms: int = 10_000) -> list[Cqe]:
    """Wait for at least ``n`` CQEs, return every one ready."""
    L.io_uring_wait_cqes(ring, n, timeout_ms)
    return reap(ring)


def until_final(ring: L.Ring, ud: int = UD_RECV, timeout_ms: int = 10_000,
                on_data: Callable[[Cqe], None] | None = None) -> tuple[list[Cqe], Cqe]:
    """Collect ``ud``'s CQEs until its final one (no F_MORE)."""
    data: list[Cqe] = []
    while True:
        for c in wait_cqes(ring, 1, timeout_ms):
            assert c.ud == ud, c
            if not c.flags & F_MORE:
                return data, c
            data.append(c)
            if on_data is not None:
                on_data(c)


def accept_conn(kt: KernelThread, app: S.Kernel, ring: L.Ring, sport: int = 40000,
                port: int = 8000, lfd: int | None = None) -> tuple[int, int]:
    """Listen (unless ``lfd``), ACCEPT through ``ring``, connect a flow: ``(lfd, fd)``."""
    if lfd is None:
        lfd = app.listen_tcp(port)
    sqe = L.io_uring_get_sqe(ring)
    assert sqe is not None
    L.io_uring_prep_accept(sqe, lfd)
    sqe["user_data"] = UD_ACCEPT
    L.io_uring_submit(ring)
    kt.connect(sport, port)
    [c] = wait_cqes(ring)
    assert c.ud == UD_ACCEPT and c.res > 0, c
    return lfd, c.res


def stream(sport: int, off: int, n: int) -> bytes:
    return pattern.pattern_bytes(sport, off, n)


def check_data(zq: Zq, cqes: list[Cqe], sport: int, start: int = 0) -> int:
    """The bytes of ``cqes`` read in place equal the flow's stream from ``start``."""
    pos = start
    for c in cqes:
        assert c.res > 0 and c.flags & F_MORE
        assert zq.area_bytes(c.off, c.res) == stream(sport, pos, c.res), (pos, c)
        pos += c.res
    return pos - start


# --------------------------------------------------------------------------------------------
# Registration and query
# --------------------------------------------------------------------------------------------

def query(app: S.Kernel, op: int = abi.IO_URING_QUERY_ZCRX, size: int = 40) -> tuple[int, bytes]:
    mem = app.alloc_memory(PAGE, tag="q")
    try:
        hdr = np.zeros(1, dtype=abi.io_uring_query_hdr)
        hdr["query_data"] = mem.addr
        hdr["query_op"] = op
        hdr["size"] = size
        _, blobs = L.io_uring_register(None, abi.IORING_REGISTER_QUERY, 0, [hdr], kernel=app)
        out = np.frombuffer(blobs[0], dtype=abi.io_uring_query_hdr)
        return int(out["result"][0]), mem.view[:int(out["size"][0])].tobytes()
    finally:
        mem.close()


@VERSIONS
def test_query_reports_nodev_import_and_rq_header(kt: KernelThread, app: S.Kernel) -> None:
    v = kt.kernel.zcrx.kernel
    res, data = query(app)
    assert res == 0 and len(data) == 40
    q = np.frombuffer(data, dtype=abi.io_uring_query_zcrx)[0]
    assert int(q["register_flags"]) == abi.ZCRX_REG_NODEV | abi.ZCRX_REG_IMPORT
    assert int(q["area_flags"]) == 0                      # dmabuf is not emulated
    assert int(q["nr_ctrl_opcodes"]) == {(7, 1): 2, (7, 2): 3, (7, 3): 4}[v]
    events = abi.ZCRX_FEATURE_EVENT if v >= (7, 2) else 0
    assert int(q["features"]) == abi.ZCRX_FEATURE_RX_PAGE_SIZE | events
    assert (int(q["rq_hdr_size"]), int(q["rq_hdr_alignment"])) == (RQ_LAYOUTS[v][1], 64)
    res, data = query(app, abi.IO_URING_QUERY_ZCRX_NOTIF, 48)
    if v >= (7, 2):
        ev = np.frombuffer(data, dtype=abi.io_uring_query_zcrx_event)[0]
        assert res == 0 and (int(ev["event_flags"]), int(ev["stats_size"]),
                             int(ev["stats_off_alignment"])) == (3, 16, 8)
    else:
        assert res == -errno.EOPNOTSUPP                   # no query op 3 before 7.2
    res, data = query(app, abi.IO_URING_QUERY_SCQ, 16)
    assert res == 0 and np.frombuffer(data, dtype="<u8").tolist() == [64, 64]
    assert query(app, abi.IO_URING_QUERY_OPCODES)[0] == -errno.EOPNOTSUPP
    assert query(app, 7)[0] == -errno.EOPNOTSUPP
    assert query(app, abi.IO_URING_QUERY_ZCRX, 0)[0] == -errno.EINVAL
    res, data = query(app, abi.IO_URING_QUERY_ZCRX, 8)    # a short buffer gets a prefix
    assert res == 0 and len(data) == 8
    hdr = np.zeros(1, dtype=abi.io_uring_query_hdr)
    hdr["query_op"] = abi.IO_URING_QUERY_ZCRX
    hdr["size"] = 40
    hdr["query_data"] = 0x1000                             # unmapped: -EFAULT
    with pytest.raises(ControlError) as ei:
        L.io_uring_register(None, abi.IORING_REGISTER_QUERY, 0, [hdr], kernel=app)
    assert ei.value.errno == errno.EFAULT
    with pytest.raises(ControlError) as ei:
        L.io_uring_register(None, abi.IORING_REGISTER_QUERY, 1, [hdr], kernel=app)
    assert ei.value.errno == errno.EINVAL


def test_query_chain_follows_next_entry(kt: KernelThread, app: S.Kernel) -> None:
    mem = app.alloc_memory(PAGE, tag="q")
    h2 = mem.view[256:296].view(abi.io_uring_query_hdr)
    h2["query_op"] = abi.IO_URING_QUERY_SCQ
    h2["size"] = 16
    h2["query_data"] = mem.addr + 512
    hdr = np.zeros(1, dtype=abi.io_uring_query_hdr)
    hdr["query_op"] = abi.IO_URING_QUERY_ZCRX
    hdr["size"] = 40
    hdr["query_data"] = mem.addr
    hdr["next_entry"] = mem.addr + 256
    L.io_uring_register(None, abi.IORING_REGISTER_QUERY, 0, [hdr], kernel=app)
    assert int(h2["result"][0]) == 0 and int(h2["size"][0]) == 16
    assert mem.view[512:528].view("<u8").tolist() == [64, 64]
    assert int(mem.view[24:28].view("<u4")[0]) == 128      # rq_hdr_size of the first entry
    mem.close()


@VERSIONS
def test_register_nodev_writes_back_and_zeroes_the_rq_header(kt: KernelThread,
                                                            app: S.Kernel) -> None:
    layout = RQ_LAYOUTS[kt.kernel.zcrx.kernel][0]
    ring = zring(app)
    b = Bundle.make(app, rq_entries=100)
    assert b.rq is not None
    b.rq.view[:layout[2]] = 0xAB                           # garbage in the whole header
    out = register_raw(ring, b.reg)
    assert int(out["rq_entries"][0]) == 128 and int(out["zcrx_id"][0]) == 0
    off = out["offsets"][0]
    assert (int(off["head"]), int(off["tail"]), int(off["rqes"])) == layout
    assert int(out["rx_buf_len"][0]) == PAGE
    assert int(b.area_reg["rq_area_token"][0]) == 0
    assert int(b.rd["mmap_offset"][0]) == 0
    for word in layout[:2]:                                # head and tail zeroed
        assert b.rq.view[word:word + 4].tolist() == [0] * 4
    st = kt.call(lambda k: k.zcrx.stats())
    [ifq] = st["ifqs"]
    assert ifq["mode"] == "nodev" and ifq["area"]["niovs"] == AREA_PAGES
    assert ifq["ledger"] == {"free": AREA_PAGES, "pool_cache": 0, "driver": 0, "posted": 0,
                             "in_skb": 0, "user": 0}
    assert set(ifq["counters"]) == {*IFQ_COUNTERS, "rq_invalid"}
    L.io_uring_queue_exit(ring)
    assert kt.call(lambda k: (len(k.zcrx.ifqs), k.zcrx.counters["destroyed"])) == (0, 1)
    b.close()


def test_kernel_rq_region_is_mapped_at_its_offset_and_unlinked(kt: KernelThread,
                                                               app: S.Kernel,
                                                               run_id: str) -> None:
    ring = zring(app)
    zq = setup_zcrx(app, ring, kernel_rq=True)
    zq2 = setup_zcrx(app, ring, kernel_rq=True)
    assert (zq.id, zq2.id) == (0, 1)
    assert int(zq.b.rd["mmap_offset"][0]) == abi.IORING_MAP_OFF_ZCRX_REGION
    assert int(zq2.b.rd["mmap_offset"][0]) == abi.IORING_MAP_OFF_ZCRX_REGION + (1 << 16)
    rq_names = [n for n in list_run_segments(run_id) if n.endswith(".rq")]
    assert len(rq_names) == 2
    # the app's RQ view is the kernel's: returns written there are consumed by a flush
    zq.raw_rqes([0, 4096])
    zq.flush()
    assert zq.khead == 2 and kt.counters(kt.ifq().serial - 1)["rq_consumed"] == 2
    for z in (zq, zq2):
        z.close()
    L.io_uring_queue_exit(ring)
    assert [n for n in list_run_segments(run_id) if n.endswith(".rq")] == []
    zq.b.close()
    zq2.b.close()


# --------------------------------------------------------------------------------------------
# RECV_ZC in NODEV mode (copy fallback from any TCP socket)
# --------------------------------------------------------------------------------------------

def test_nodev_recv_copies_pages_and_flush_recycles(kt: KernelThread, app: S.Kernel) -> None:
    ring = zring(app)
    zq = setup_zcrx(app, ring)
    _, fd = accept_conn(kt, app, ring)
    submit_recvzc(ring, fd, zq.id)
    assert reap(ring) == []                                    # armed, nothing yet
    data = stream(40000, 0, 10 * PAGE + 100)
    kt.send(40000, data, seg=3000)                             # linear skbs of 3000 bytes
    got: list[Cqe] = []
    while sum(c.res for c in got) < len(data):
        got += wait_cqes(ring)
    assert all(c.flags == F_MORE and c.ud == UD_RECV for c in got)
    assert check_data(zq, got, 40000) == len(data)
    # one niov per skb chunk, CQE at the niov start (copy fallback)
    assert all(c.off % PAGE == 0 and c.res <= PAGE for c in got)
    assert len({c.off for c in got}) == len(got) == -(-len(data) // 3000)
    led = kt.ledger()
    assert led["user"] == len(got) and led["free"] == AREA_PAGES - len(got)
    c = kt.counters()
    assert (c["copy_count"], c["copy_bytes"], c["zc_cqes"]) == (len(got), len(data), 0)
    assert zq.give_back([x.off for x in got]) == len(got)
    assert kt.ledger()["user"] == len(got)                 # NODEV: only a flush consumes
    zq.flush()
    assert kt.ledger() == {"free": AREA_PAGES, "pool_cache": 0, "driver": 0, "posted": 0,
                           "in_skb": 0, "user": 0}
    c = kt.counters()
    assert (c["rq_consumed"], c["rq_returned"], c["flushes"]) == (len(got), len(got), 1)
    traffic = kt.call(lambda k: k.zcrx.memory_traffic())
    assert traffic["written"]["zcrx_area"] == len(data)
    assert traffic["read"]["linear"] >= len(data)
    assert traffic["zcrx_copy_read"] == {"linear": len(data), "kernel_pages": 0}
    kt.fin(40000)
    _, final = until_final(ring)
    assert (final.res, final.flags) == (0, 0)
    zq.close()
    L.io_uring_queue_exit(ring)
    zq.b.close()


def test_recv_len_budget_ends_with_zero_and_leaves_the_rest(kt: KernelThread,
                                                           app: S.Kernel) -> None:
    ring = zring(app)
    zq = setup_zcrx(app, ring)
    _, fd = accept_conn(kt, app, ring)
    kt.send(40000, stream(40000, 0, 3 * PAGE))
    submit_recvzc(ring, fd, zq.id, length=PAGE + 10)
    data, final = until_final(ring)
    assert [c.res for c in data] == [PAGE, 10] and (final.res, final.flags) == (0, 0)
    assert check_data(zq, data, 40000) == PAGE + 10
    submit_recvzc(ring, fd, zq.id, length=0, ud=2)          # the rest, then EOF
    kt.fin(40000)
    data, final = until_final(ring, ud=2)
    assert check_data(zq, data, 40000, PAGE + 10) == 2 * PAGE - 10
    assert data[0].res == PAGE - 10 and final.res == 0
    zq.close()
    L.io_uring_queue_exit(ring)
    zq.b.close()


def test_cqe_mixed_ring_posts_32_byte_cqes_with_f_32(kt: KernelThread, app: S.Kernel) -> None:
    flags = ZC_FLAGS & ~abi.IORING_SETUP_CQE32 | abi.IORING_SETUP_CQE_MIXED
    ring = zring(app, 16, flags)
    zq = setup_zcrx(app, ring)
    kring = ring
    _, fd = accept_conn(kt, app, kring)
    submit_recvzc(ring, fd, zq.id)
    kt.send(40000, stream(40000, 0, 3 * PAGE))
    L.io_uring_wait_cqes(ring, 2)
    v = L.peek_cqes(ring, 2).copy()                      # 16-byte slots: head + extra half
    assert int(v[0]["flags"]) == F_MORE | abi.IORING_CQE_F_32 and int(v[0]["res"]) == PAGE
    assert int(v[1]["user_data"]) == 0                   # the second half: zcrx_cqe.off = 0
    L.io_uring_cq_advance(ring, 2)
    zq.close()
    L.io_uring_queue_exit(ring)
    zq.b.close()


def test_enospc_ends_the_request_and_a_rearm_continues(kt: KernelThread, app: S.Kernel) -> None:
    ring = zring(app, 4, cq_entries=8)
    zq = setup_zcrx(app, ring)
    _, fd = accept_conn(kt, app, ring)
    submit_recvzc(ring, fd, zq.id)
    kt.send(40000, stream(40000, 0, 20 * PAGE))           # 20 CQEs' worth, 8 fit
    kt.wait_for(lambda k: k.zcrx.ifqs[-1].counters["zc_cqes"]
                + k.zcrx.ifqs[-1].counters["copy_count"] == 8)
    assert kt.counters()["recv_enospc"] == 0                  # armed: waits for the next event
    kt.send(40000, stream(40000, 20 * PAGE, PAGE))             # the next skb: no room at all
    kt.wait_for(lambda k: k.zcrx.ifqs[-1].counters["recv_enospc"] == 1)
    got = reap(ring)
    data = [c for c in got if c.flags & F_MORE]
    assert len(data) == 8 and check_data(zq, data, 40000) == 8 * PAGE
    [final] = [c for c in got if not c.flags & F_MORE]
    assert final.res == -errno.ENOSPC
    # nothing was lost: each re-arm continues at the next unread byte (8 CQEs per arm here,
    # then -ENOSPC at once: the new request is not armed yet, so it goes on and finds no room)
    pos, ud = 8 * PAGE, 2
    while pos < 21 * PAGE:
        submit_recvzc(ring, fd, zq.id, ud=ud)
        new = wait_cqes(ring)
        while new[-1].flags & F_MORE and pos + sum(c.res for c in new) < 21 * PAGE:
            new += wait_cqes(ring)
        data = [c for c in new if c.flags & F_MORE]
        assert all(c.ud == ud for c in new)
        pos += check_data(zq, data, 40000, pos)
        if not new[-1].flags & F_MORE:
            assert new[-1].res == -errno.ENOSPC and len(data) == 8
        ud += 1
    assert pos == 21 * PAGE and kt.ledger()["user"] == 21
    assert kt.counters()["recv_enospc"] == 2   # 8 then -ENOSPC, 8 then -ENOSPC, 5 (armed)
    zq.close()
    L.io_uring_queue_exit(ring)
    zq.b.close()


def test_a_pass_yields_after_20_skbs(kt: KernelThread, app: S.Kernel) -> None:
    ring = zring(app, 64, cq_entries=256)
    zq = setup_zcrx(app, ring)
    _, fd = accept_conn(kt, app, ring)
    submit_recvzc(ring, fd, zq.id)
    kt.send(40000, stream(40000, 0, 50 * 1000), seg=1000)  # 50 skbs
    got: list[Cqe] = []
    while sum(c.res for c in got) < 50_000:
        got += wait_cqes(ring)
    assert check_data(zq, got, 40000) == 50_000
    assert kt.counters()["recv_requeues"] == 2               # 20 + 20 + 10
    zq.close()
    L.io_uring_queue_exit(ring)
    zq.b.close()


def test_requests_take_turns_of_20_skbs(kt: KernelThread, app: S.Kernel) -> None:
    ring = zring(app, 64, cq_entries=512)
    zq = setup_zcrx(app, ring)
    lfd, fa = accept_conn(kt, app, ring, sport=40000)
    _, fb = accept_conn(kt, app, ring, sport=40001, lfd=lfd)
    kt.send(40000, stream(40000, 0, 50 * 1000), seg=1000)
    kt.send(40001, stream(40001, 0, 50 * 1000), seg=1000)
    for fd, ud in ((fa, 0xA), (fb, 0xB)):                   # one submission, two requests
        sqe = L.io_uring_get_sqe(ring)
        assert sqe is not None
        sqe["opcode"] = abi.IORING_OP_RECV_ZC
        sqe["fd"] = fd
        sqe["ioprio"] = abi.IORING_RECV_MULTISHOT
        sqe["zcrx_ifq_idx"] = zq.id
        sqe["user_data"] = ud
    L.io_uring_submit(ring)
    got: list[Cqe] = []
    while len(got) < 100:
        got += wait_cqes(ring)
    order = [c.ud for c in got]
    runs = [(order[0], 1)]
    for ud in order[1:]:
        runs[-1:] = [(ud, runs[-1][1] + 1)] if ud == runs[-1][0] else [runs[-1], (ud, 1)]
    assert runs == [(0xA, 20), (0xB, 20)] * 2 + [(0xA, 10), (0xB, 10)]
    assert check_data(zq, [c for c in got if c.ud == 0xA], 40000) == 50_000
    assert check_data(zq, [c for c in got if c.ud == 0xB], 40001) == 50_000
    assert kt.counters()["recv_requeues"] == 4
    zq.close()
    L.io_uring_queue_exit(ring)
    zq.b.close()


def test_socket_reset_ends_with_econnreset_after_the_data(kt: KernelThread,
                                                         app: S.Kernel) -> None:
    ring = zring(app)
    zq = setup_zcrx(app, ring)
    _, fd = accept_conn(kt, app, ring)
    kt.send(40000, stream(40000, 0, 5000))
    kt.rst(40000)
    submit_recvzc(ring, fd, zq.id)
    data, final = until_final(ring)
    assert check_data(zq, data, 40000) == 5000 and final.res == -errno.ECONNRESET
    zq.close()
    L.io_uring_queue_exit(ring)
    zq.b.close()


def test_niov_of_another_ifq_is_efault(kt: KernelThread, app: S.Kernel) -> None:
    """A socket whose skbs hold niovs of ifq A, read through ifq B: -EFAULT."""
    ring = zring(app)
    za = setup_zcrx(app, ring, nodev=False, if_idx=2, if_rxq=1)
    zb = setup_zcrx(app, ring)
    lfd = app.listen_tcp(tn.DPORT)
    flow = tn.Flow()
    sqe = L.io_uring_get_sqe(ring)
    assert sqe is not None
    L.io_uring_prep_accept(sqe, lfd)
    L.io_uring_submit(ring)
    fr, fl, _ = flow.frames([0], wire.TCP_SYN)
    kt.deliver(1, fr, fl)
    fr, fl, _ = flow.frames([1000, 1000])
    kt.deliver(1, fr, fl)
    [acc] = wait_cqes(ring)
    kt.wait_for(lambda k: k.zcrx.ifqs[0].ledger()["in_skb"] == 2)
    submit_recvzc(ring, acc.res, zb.id)
    data, final = until_final(ring)
    assert data == [] and final.res == -errno.EFAULT
    assert kt.counters(kt.ifq().serial)["recv_efault"] == 1
    submit_recvzc(ring, acc.res, za.id, ud=3)                 # its own ifq: zero copy
    got = wait_cqes(ring, 2)
    assert [c.res for c in got] == [1000, 1000] and check_data(za, got, flow.stream) == 2000
    for z in (za, zb):
        z.close()
    L.io_uring_queue_exit(ring)
    za.b.close()
    zb.b.close()


# --------------------------------------------------------------------------------------------
# Hardware queues: binding, zero copy, refill through the RQ, teardown
# --------------------------------------------------------------------------------------------

def hw_flow_conn(kt: KernelThread, app: S.Kernel, ring: L.Ring, q: int = 1,
                 flow: tn.Flow | None = None) -> tuple[tn.Flow, int]:
    """A connection arriving on hardware queue ``q`` (frames through the fake NIC)."""
    flow = flow or tn.Flow()
    lfd = app.listen_tcp(tn.DPORT)
    sqe = L.io_uring_get_sqe(ring)
    assert sqe is not None
    L.io_uring_prep_accept(sqe, lfd)
    sqe["user_data"] = UD_ACCEPT
    L.io_uring_submit(ring)
    fr, fl, _ = flow.frames([0], wire.TCP_SYN)
    assert kt.deliver(q, fr, fl) == 1
    fr, fl, _ = flow.frames([0], wire.TCP_ACK)            # the handshake's ACK
    assert kt.deliver(q, fr, fl) == 1
    [c] = wait_cqes(ring)
    assert c.ud == UD_ACCEPT and c.res > 0
    return flow, c.res


def test_hw_binding_zero_copy_and_lazy_refill(kt: KernelThread, app: S.Kernel) -> None:
    ring = zring(app)
    zq = setup_zcrx(app, ring, nodev=False, if_idx=2, if_rxq=1)
    st = kt.call(lambda k: k.netdevs["eth0"].status()["rx_queues"][1])
    assert st["binding"] == "io-uring" and st["provider"] == "io-uring"
    assert st["buffers"] == AREA_PAGES and st["posted"] == 64
    status = app.syscall("status").body                       # what `zcrx status` shows
    q1 = status["netdevs"][0]["rx_queues"][1]
    assert q1["binding"] == "io-uring" and status["netdevs"][0]["rx_queues"][0]["binding"] \
        == "none"
    [z] = status["zcrx"]
    assert (z["mode"], z["dev"], z["queue"], z["state"]) == ("queue", "eth0", 1, "live")
    assert kt.ledger() == {"free": AREA_PAGES - 64, "pool_cache": 0, "driver": 0,
                           "posted": 64, "in_skb": 0, "user": 0}
    maps = [i for i, (t, _) in enumerate(kt.nic.calls) if t == "nic.dma_map"]
    assert kt.nic.calls[maps[-1]][1]["name"] == zq.b.area.name  # the area, then the restart:
    after = kt.nic.calls[maps[-1] + 1:]  # a real stop and start of the queue, its rings kept,
    assert [t for t, _ in after] == ["nic.queue_stop", "nic.queue_start"]
    assert len(after[1][1]["unmap"]) == 1  # the old kernel-page pool unmapped with the start
    flow, fd = hw_flow_conn(kt, app, ring)
    submit_recvzc(ring, fd, zq.id)
    got: list[Cqe] = []
    total = 0

    def take(new: list[Cqe]) -> None:
        nonlocal total
        total += check_data(zq, new, flow.stream, total)   # read in place, then give back
        got.extend(new)
        assert zq.give_back([c.off for c in new], [c.res for c in new]) == len(new)

    for rnd in range(3):                                  # 3 x 60 frames through 64 buffers
        fr, fl, _ = flow.frames([1460] * 60)
        sent = 0
        while sent < 60:
            sent += kt.deliver(1, fr[sent:], fl[sent:])
            take(wait_cqes(ring))
        while total < (rnd + 1) * 60 * 1460:
            take(wait_cqes(ring))
    assert total == 180 * 1460
    # zero copy: the CQE points at the niov the NIC wrote, offset 0 in the buffer
    assert all(c.off % PAGE == 0 and c.res == 1460 for c in got)
    c = kt.counters()
    assert c["zc_cqes"] == 180 and c["copy_count"] == 0
    assert c["alloc_from_rq"] > 0 and c["rq_returned"] == c["rq_consumed"]
    assert kt.call(lambda k: k.zcrx.memory_traffic()["zero_copy"]) == 180 * 1460
    led = kt.ledger()
    assert sum(led.values()) == AREA_PAGES and led["in_skb"] == 0
    zq.close()
    L.io_uring_queue_exit(ring)
    kt.wait_for(lambda k: k.zcrx.ifqs == [] and k.zcrx.bound == {})
    st = kt.call(lambda k: k.netdevs["eth0"].status()["rx_queues"][1])
    assert st["binding"] == "none" and st["posted"] == 64
    assert [b for t, b in kt.nic.calls if t == "nic.dma_unmap"]
    zq.b.close()


def test_hw_starvation_counts_alloc_fail_and_pauses(kt: KernelThread, app: S.Kernel) -> None:
    ring = zring(app)
    zq = setup_zcrx(app, ring, nodev=False, if_idx=2, if_rxq=1, area_pages=80)
    flow, fd = hw_flow_conn(kt, app, ring)
    submit_recvzc(ring, fd, zq.id)
    fr, fl, _ = flow.frames([1460] * 100)
    sent = kt.deliver(1, fr, fl)                          # the 64 posted buffers
    got: list[Cqe] = []
    while sum(c.res for c in got) < sent * 1460:
        got += wait_cqes(ring)
    sent += kt.deliver(1, fr[sent:], fl[sent:])           # the 16 refilled from the freelist
    while sum(c.res for c in got) < sent * 1460:
        got += wait_cqes(ring)
    assert sent == 80 and kt.deliver(1, fr[sent:], fl[sent:]) == 0   # starved: paused
    assert check_data(zq, got, flow.stream) == 80 * 1460
    c = kt.counters()
    assert c["alloc_fail"] > 0 and c["alloc_from_rq"] == 0
    assert kt.ledger() == {"free": 0, "pool_cache": 0, "driver": 0, "posted": 0,
                           "in_skb": 0, "user": 80}
    zq.give_back([x.off for x in got[:30]])                # returns unblock the queue
    kt.call(lambda k: k.netdevs["eth0"].refill(1))
    assert kt.deliver(1, fr[sent:], fl[sent:]) == 20
    more: list[Cqe] = []
    while len(more) < 20:
        more += wait_cqes(ring)
    assert check_data(zq, more, flow.stream, 80 * 1460) == 20 * 1460
    assert {c.off for c in more} <= {c.off for c in got[:30]}   # the returned niovs
    zq.close()
    L.io_uring_queue_exit(ring)
    zq.b.close()


def test_hw_unsteered_flow_is_copied_from_kernel_pages(kt: KernelThread, app: S.Kernel) -> None:
    ring = zring(app)
    zq = setup_zcrx(app, ring, nodev=False, if_idx=2, if_rxq=1)
    flow, fd = hw_flow_conn(kt, app, ring, q=0)             # lands on queue 0: kernel pages
    submit_recvzc(ring, fd, zq.id)
    fr, fl, _ = flow.frames([1460, 1460, 100])
    kt.deliver(0, fr, fl)
    got = wait_cqes(ring, 3)
    assert [c.res for c in got] == [1460, 1460, 100]
    assert check_data(zq, got, flow.stream) == 3020
    c = kt.counters()
    assert (c["copy_count"], c["zc_cqes"]) == (3, 0)
    assert kt.call(lambda k: k.zcrx.copy_read["kernel_pages"]) == 3020
    led = kt.ledger()
    assert led["user"] == 3 and led["posted"] == 64        # copies come from the freelist
    zq.close()
    L.io_uring_queue_exit(ring)
    zq.b.close()


def test_hw_teardown_waits_for_skbs_then_unmaps(kt: KernelThread, app: S.Kernel) -> None:
    ring = zring(app)
    zq = setup_zcrx(app, ring, nodev=False, if_idx=2, if_rxq=1)
    flow, fd = hw_flow_conn(kt, app, ring)
    fr, fl, _ = flow.frames([1000] * 3)
    kt.deliver(1, fr, fl)                                   # in the socket, never read
    kt.wait_for(lambda k: k.zcrx.ifqs[-1].ledger()["in_skb"] == 3)
    area_name = zq.b.area.name
    zq.close()
    L.io_uring_queue_exit(ring)
    st = kt.call(lambda k: (k.zcrx.ifqs[-1].state, k.netdevs["eth0"].status()["rx_queues"][1]))
    assert st[0] == "closing"
    assert st[1]["binding"] == "none" and st[1]["provider"] == "io-uring" \
        and st[1]["mp_draining"]
    # re-binding while draining: -EEXIST; tcp-data-split stays locked
    ring2 = zring(app)
    b2 = Bundle.make(app, nodev=False, if_idx=2, if_rxq=1)
    assert reg_errno(ring2, b2.reg) == errno.EEXIST
    with pytest.raises(ControlError) as ei:
        app.syscall("ethtool", {"dev": "eth0", "request": {"cmd": "rings-set",
                                                           "tcp_data_split": "off"}})
    assert ei.value.errno == errno.EINVAL
    assert not [b for t, b in kt.nic.calls if t == "nic.dma_unmap"
                and b["map_id"] == zq_map_id(kt, area_name)]
    app.close_fd(fd)                                        # the skbs go: drain completes
    kt.wait_for(lambda k: not k.zcrx.ifqs)
    assert [b for t, b in kt.nic.calls if t == "nic.dma_unmap"
            and b["map_id"] == zq_map_id(kt, area_name)]
    zq2 = Zq(ring2, b2, register_raw(ring2, b2.reg))
    assert kt.call(lambda k: k.netdevs["eth0"].status()["rx_queues"][1]["binding"]) \
        == "io-uring"
    zq2.close()
    L.io_uring_queue_exit(ring2)
    zq.b.close()
    b2.close()


def zq_map_id(kt: KernelThread, name: str) -> int:
    maps = [t for t in kt.nic.calls if t[0] == "nic.dma_map" and t[1]["name"] == name]
    assert len(maps) == 1
    # FakeNic hands out ids in call order starting at 8
    order = [t for t in kt.nic.calls if t[0] == "nic.dma_map"]
    return 8 + order.index(maps[0])


# --------------------------------------------------------------------------------------------
# Refill-queue validation at the provider (hardware refill skips bad entries)
# --------------------------------------------------------------------------------------------

def test_hw_refill_skips_bad_rqes_and_counts_each_reason(kt: KernelThread,
                                                         app: S.Kernel) -> None:
    ring = zring(app)
    zq = setup_zcrx(app, ring, nodev=False, if_idx=2, if_rxq=1, area_pages=64)
    flow, fd = hw_flow_conn(kt, app, ring)
    submit_recvzc(ring, fd, zq.id)
    fr, fl, _ = flow.frames([500] * 64)
    assert kt.deliver(1, fr, fl) == 64
    got: list[Cqe] = []
    while len(got) < 64:
        got += wait_cqes(ring)
    offs = [c.off for c in got]
    # bad area, bad pad, out of range, no reference, then 4 good ones, then a double return
    zq.raw_rqes([1 << 48])
    zq.raw_rqes([0], pad=1)
    zq.raw_rqes([64 * PAGE])
    zq.give_back(offs[:4])
    zq.give_back(offs[:1])
    kt.call(lambda k: k.netdevs["eth0"].refill(1))
    c = kt.counters()
    assert (c["rq_invalid_area"], c["rq_invalid_pad"], c["rq_invalid_range"]) == (1, 1, 1)
    assert c["rq_invalid_noref"] == 1 and c["rq_returned"] == 4 and c["rq_consumed"] == 8
    assert kt.call(lambda k: k.netdevs["eth0"].status()["rx_queues"][1]["posted"]) == 4
    assert zq.khead == 8
    led = kt.ledger()
    assert led["user"] == 60 and led["posted"] == 4
    zq.close()
    L.io_uring_queue_exit(ring)
    zq.b.close()


# --------------------------------------------------------------------------------------------
# Export / import
# --------------------------------------------------------------------------------------------

def test_export_import_shares_area_and_rq_between_rings(kt: KernelThread,
                                                        app: S.Kernel) -> None:
    r1, r2 = zring(app), zring(app)
    zq = setup_zcrx(app, r1)
    box = int(ctrl(r1, zq.id, abi.ZCRX_CTRL_EXPORT)["export_zcrx_fd"][0])
    assert box > 0
    imp = np.zeros(1, dtype=abi.io_uring_zcrx_ifq_reg)
    imp["flags"] = abi.ZCRX_REG_IMPORT
    imp["if_idx"] = box
    out = register_raw(r2, imp)
    assert int(out["zcrx_id"][0]) == 0 and int(out["offsets"]["rqes"][0]) == 128
    L.io_uring_queue_exit(r1)                               # the box and r2 keep it alive
    assert kt.call(lambda k: [i.state for i in k.zcrx.ifqs]) == ["live"]
    _, fd = accept_conn(kt, app, r2)
    submit_recvzc(r2, fd, 0)
    kt.send(40000, stream(40000, 0, 2 * PAGE))
    got = wait_cqes(r2, 2)
    assert check_data(zq, got, 40000) == 2 * PAGE
    app.close_fd(box)
    assert kt.call(lambda k: [i.state for i in k.zcrx.ifqs]) == ["live"]
    zq.close()
    L.io_uring_queue_exit(r2)
    assert kt.call(lambda k: k.zcrx.ifqs) == []
    zq.b.close()


# --------------------------------------------------------------------------------------------
# Large buffers, stats, process exit
# --------------------------------------------------------------------------------------------

def test_hw_large_rx_buf_len_needs_the_netdev_size(kt: KernelThread, app: S.Kernel) -> None:
    ring = zring(app)
    b = Bundle.make(app, nodev=False, if_idx=2, if_rxq=1, area_pages=64)
    b.reg["rx_buf_len"] = 2 * PAGE
    assert reg_errno(ring, b.reg) == errno.EOPNOTSUPP            # eth0 posts 4 KiB buffers
    app.syscall("ethtool", {"dev": "eth0", "request": {"cmd": "rings-set",
                                                       "rx_buf_len": 2 * PAGE}})
    b.area_reg["len"] = 63 * PAGE                                 # not a multiple of 8 KiB
    assert reg_errno(ring, b.reg) == errno.ERANGE
    b.area_reg["len"] = 64 * PAGE
    out = register_raw(ring, b.reg)
    assert int(out["rx_buf_len"][0]) == 2 * PAGE
    zq = Zq(ring, b, out)
    assert kt.call(lambda k: (k.zcrx.ifqs[-1].area.count, k.zcrx.ifqs[-1].area.niov_shift)) \
        == (32, 13)
    flow, fd = hw_flow_conn(kt, app, ring)
    submit_recvzc(ring, fd, zq.id, 1460 + 500)
    fr, fl, _ = flow.frames([1460, 1460])
    kt.deliver(1, fr, fl)
    data, final = until_final(ring)
    assert [c.res for c in data] == [1460, 500] and final.res == 0
    assert all(c.off % (2 * PAGE) == 0 for c in data)            # niov index * 8 KiB
    assert check_data(zq, data, flow.stream) == 1960
    # a return anywhere inside the 8 KiB niov names it (the low bits are ignored)
    zq.give_back([data[0].off + PAGE + 5, data[1].off])
    zq.flush()
    c = kt.counters()
    assert c["rq_returned"] == 2 and c["rq_invalid_range"] == 0
    assert kt.ledger()["in_skb"] == 1                             # 2nd frame: 960 unread


def test_stats_syscall_carries_ifqs_ledger_and_traffic(kt: KernelThread, app: S.Kernel) -> None:
    ring = zring(app)
    zq = setup_zcrx(app, ring)
    _, fd = accept_conn(kt, app, ring)
    submit_recvzc(ring, fd, zq.id)
    kt.send(40000, stream(40000, 0, 2 * PAGE))
    wait_cqes(ring, 2)
    st = app.syscall("stats").body
    z = st["zcrx"]
    [ifq] = z["ifqs"]
    assert ifq["counters"]["copy_bytes"] == 2 * PAGE and ifq["ledger"]["user"] == 2
    assert z["ledger"]["total"]["user"] == 2 and z["ledger"]["niovs"] == AREA_PAGES
    assert st["memory_traffic"]["written"]["zcrx_area"] == 2 * PAGE
    assert st["memory_traffic"]["zero_copy"] == 0


def test_process_exit_tears_down_like_a_ring_close(kt: KernelThread, tmp_path: Any,
                                                   run_id: str) -> None:
    other = S.Kernel(tmp_path, run=run_id, name="dies")
    other.attach()
    ring = zring(other)
    zq = setup_zcrx(other, ring, nodev=False, if_idx=2, if_rxq=1, kernel_rq=True)
    flow, fd = hw_flow_conn(kt, other, ring)
    submit_recvzc(ring, fd, zq.id)
    fr, fl, _ = flow.frames([1000] * 4)
    kt.deliver(1, fr, fl)
    assert len(wait_cqes(ring, 4)) == 4                         # held by the user
    zq.close()
    other.syscall("bye")                                         # the process goes away
    kt.wait_for(lambda k: not k.zcrx.ifqs)
    assert kt.call(lambda k: k.zcrx.retired["scrubbed_refs"]) == 4
    st = kt.call(lambda k: k.netdevs["eth0"].status()["rx_queues"][1])
    assert st["binding"] == "none" and st["started"]
    assert [n for n in list_run_segments(run_id) if n.endswith(".rq")] == []
    other.task = None                                            # already gone: no more calls
    for r in list(other._rings):
        r._detach()
    other.close()


def _acks(kt: KernelThread) -> list[Any]:
    """The TCP segments the kernel transmitted since the last call (parsed by dpkt)."""
    import dpkt

    frames = kt.call(lambda k: kt.nic.tx_sent())
    return [dpkt.ethernet.Ethernet(f).data.data for f in frames]


def test_hw_window_closes_while_the_app_holds_niovs_and_reopens(kt: KernelThread,
                                                                 app: S.Kernel) -> None:
    ring = zring(app)
    zq = setup_zcrx(app, ring, nodev=False, if_idx=2, if_rxq=1)
    flow, fd = hw_flow_conn(kt, app, ring)
    [synack] = _acks(kt)
    assert synack.flags == wire.TCP_SYN | wire.TCP_ACK and synack.ack == (flow.isn + 1)
    submit_recvzc(ring, fd, zq.id)
    held: list[Cqe] = []
    pending = flow.frames([1460] * 10)
    stalls = 0
    while stalls < 50:  # the app holds every buffer it gets: the queue runs dry
        n = kt.deliver(1, pending[0], pending[1])
        if n:
            stalls = 0
            pending = (pending[0][n:], pending[1][n:], pending[2][n:])
            if not len(pending[1]):
                pending = flow.frames([1460] * 10)
            held.extend(wait_cqes(ring))
        else:
            stalls += 1
            kt.call(lambda k: k.arm_interrupts())  # let the kernel refill what it can
    assert kt.ledger()["user"] == AREA_PAGES
    held.extend(reap(ring))
    got = sum(c.res for c in held)
    assert len(held) == AREA_PAGES and got == AREA_PAGES * 1460
    acks = _acks(kt)
    last = acks[-1]
    assert last.ack == (flow.isn + 1 + got) & 0xFFFFFFFF
    assert last.win == 0  # the window closed: every niov is the app's
    mib = kt.call(lambda k: dict(k.output.mib))
    assert mib["TcpExtTCPToZeroWindowAdv"] >= 1
    # the app returns its buffers: a window update, same ACK, an open window
    back = held[:64]  # (the RQ has fewer entries than the area has niovs)
    assert zq.give_back([c.off for c in back], [c.res for c in back]) == len(back)
    # the kernel takes them back when it refills (the loop does so before it sleeps)
    kt.wait_for(lambda k: not k.arm_interrupts() and k.output.mib["TcpExtTCPWindowUpdates"] >= 1)
    upd = _acks(kt)[-1]
    assert upd.ack == last.ack and upd.win > 0 and upd.flags == wire.TCP_ACK
    zq.close()
    L.io_uring_queue_exit(ring)
    kt.wait_for(lambda k: k.zcrx.ifqs == [])
    zq.b.close()


def test_if_nametoindex_asks_for_one_device(kt: KernelThread, app: S.Kernel) -> None:
    """if_nametoindex(3) is one small syscall (SIOCGIFINDEX), not the whole status."""
    assert L.if_nametoindex(app, "eth0") == 2
    with pytest.raises(Misuse) as ei:
        L.if_nametoindex(app, "eth9")
    assert ei.value.errno == errno.ENODEV
