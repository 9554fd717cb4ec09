"""The application side of zcrx: uapi encoding of the registration, RQ math, the server.

Three layers:

* pure: struct bytes at the uapi offsets, RQ region sizing, the vectorised CQE batch
  (offsets, stream offsets, runs, in-place verification) and RQE returns over a refill queue
  whose kernel side is a :class:`~shared.ring.RingConsumer` in the test;
* the syscall boundary: the app's registration through the real control plane and the real
  emulated mm of an in-process kernel thread (``test_liburing.KernelThread``), with the zcrx
  register opcodes answered by a stand-in that reads the structs where the uapi puts them;
* end to end, when ``driver_proc.zcrx`` exists: NODEV registration + RECV_ZC through the real
  kernel handlers, and the zcrx server receiving verified streams.
"""

from __future__ import annotations

import errno
import importlib.util
import json
import struct
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from test_liburing import KernelThread, tcp_stream

from app_proc import copy_server, server, zcrx_server
from app_proc import liburing as L
from app_proc import syscall as S
from app_proc import verify as V
from shared import abi, pattern
from shared.errors import Misuse, PeerMisbehaved, RingFull
from shared.msg import ControlError, Message
from shared.ring import RingConsumer, RingLayout
from shared.shm import PAGE_SIZE, Region, list_run_segments, region_name

pytestmark = pytest.mark.timeout(60)

HAVE_KERNEL_ZCRX = importlib.util.find_spec("driver_proc.zcrx") is not None
RQE = abi.io_uring_zcrx_rqe

# --------------------------------------------------------------------------------------------
# Pure: encoding
# --------------------------------------------------------------------------------------------


def test_ifq_reg_area_reg_region_desc_bytes_sit_at_uapi_offsets():
    reg = L.zcrx_ifq_reg(7, 3, 4096, 0x7F0000001000, 0x7F0000001040, abi.ZCRX_REG_NODEV,
                         8192).tobytes()
    assert len(reg) == 96
    assert struct.unpack_from("<IIII", reg, 0) == (7, 3, 4096, abi.ZCRX_REG_NODEV)
    assert struct.unpack_from("<QQ", reg, 16) == (0x7F0000001000, 0x7F0000001040)
    assert reg[32:64] == bytes(32)  # offsets: kernel output
    assert struct.unpack_from("<II", reg, 64) == (0, 8192)  # zcrx_id (out, 0 in), rx_buf_len
    assert reg[72:96] == bytes(24)

    area = L.zcrx_area_reg(0x7F0000200000, 1 << 20).tobytes()
    assert len(area) == 48
    assert struct.unpack_from("<QQQII", area, 0) == (0x7F0000200000, 1 << 20, 0, 0, 0)
    assert area[32:] == bytes(16)

    user = L.zcrx_region_desc(8192, 0x7F0000300000).tobytes()
    assert len(user) == 64
    assert struct.unpack_from("<QQIIQ", user, 0) == (0x7F0000300000, 8192,
                                                     abi.IORING_MEM_REGION_TYPE_USER, 0, 0)
    assert user[32:] == bytes(32)
    kern = L.zcrx_region_desc(8192).tobytes()
    assert struct.unpack_from("<QQIIQ", kern, 0) == (0, 8192, 0, 0, 0)


def test_prep_recv_zc_fills_only_what_the_kernel_reads():
    sqes = np.zeros(1, dtype=abi.io_uring_sqe)  # io_uring_get_sqe hands out zeroed slots
    L.io_uring_prep_recv_zc(sqes[0], 12, 65536, 5, abi.IORING_RECVSEND_POLL_FIRST)
    L.io_uring_sqe_set_data64(sqes[0], 0xDEADBEEF)
    b = sqes.tobytes()
    assert b[0] == abi.IORING_OP_RECV_ZC == 58
    assert struct.unpack_from("<H", b, 2)[0] == (abi.IORING_RECV_MULTISHOT
                                                 | abi.IORING_RECVSEND_POLL_FIRST)
    assert struct.unpack_from("<i", b, 4)[0] == 12
    assert struct.unpack_from("<I", b, 24)[0] == 65536
    assert struct.unpack_from("<Q", b, 32)[0] == 0xDEADBEEF
    assert struct.unpack_from("<I", b, 44)[0] == 5  # zcrx_ifq_idx
    zero = bytearray(b)
    for off, n in ((0, 1), (2, 2), (4, 4), (24, 4), (32, 8), (44, 4)):
        zero[off:off + n] = bytes(n)
    assert bytes(zero) == bytes(64)  # addr, addr2, addr3, msg_flags, flags... all 0


@pytest.mark.parametrize(("entries", "hdr", "align", "size"), [
    (8192, 8, 64, 135168),      # 6.18+: 64 + 131072, page aligned
    (8192, None, None, 135168),  # no query: a page for the header + 131072
    (4095, 8, 64, 69632),       # rounded up to 4096 entries: 64 + 65536, page aligned
    (128, 8, 64, 4096),
    (128, 128, 64, 4096),
    (256, 128, 64, 8192),       # 128 + 4096 spills into a second page
])
def test_rq_region_size(entries, hdr, align, size):
    got = L.zcrx_rq_region_size(entries, hdr, align)
    assert got == size and got % PAGE_SIZE == 0
    e = 1 << (entries - 1).bit_length()
    first = PAGE_SIZE if hdr is None else -(-hdr // align) * align
    assert got >= first + 16 * e


# --------------------------------------------------------------------------------------------
# Pure: the RQ and the CQE batch, against a refill queue whose kernel side is the test's
# --------------------------------------------------------------------------------------------

AREA_ADDR = 0x7F00_0040_0000


class FakeKernel:
    """The two syscalls the RQ code may make: ZCRX_CTRL flushes (``on_flush`` acts)."""

    def __init__(self, on_flush=None) -> None:
        self.on_flush = on_flush
        self.ctrl: list[tuple[int, bytes]] = []

    def syscall(self, type: str, body: dict[str, Any] | None = None, blobs=(), **kw):
        assert type == "io_uring_register" and body is not None
        assert body["opcode"] == abi.IORING_REGISTER_ZCRX_CTRL
        blobs = list(blobs)
        self.ctrl.append((body["nr_args"], blobs[0]))
        if self.on_flush is not None:
            self.on_flush()
        return SimpleNamespace(body={"res": 0}, blobs=blobs)


def make_ifq(rq_entries: int = 8, area_len: int = 1 << 20, area_id: int = 0, on_flush=None):
    reg = L.zcrx_ifq_reg(0, 0, rq_entries, 0, 0)
    reg["zcrx_id"] = 3
    reg["offsets"]["head"], reg["offsets"]["tail"], reg["offsets"]["rqes"] = 0, 4, 64
    area = SimpleNamespace(addr=AREA_ADDR, length=area_len,
                           view=np.zeros(area_len, dtype=np.uint8))
    kernel = FakeKernel(on_flush)
    ring = SimpleNamespace(kernel=kernel, fd=9, zcrx_ifqs=[])
    rq_size = L.zcrx_rq_region_size(rq_entries, 8, 64)
    buf = np.zeros(rq_size, dtype=np.uint8)
    ifq = L.ZcrxIfq(ring, reg, area=area, own_area=False, area_token=abi.area_token(area_id),
                    params=None, rq_buf=buf, rq_size=rq_size, rq_mem=None)
    kside = RingConsumer(buf, RingLayout(rq_entries, RQE, head=0, tail=4, entries=64),
                         untrusted=True)
    return ifq, kside, buf


def cqe_batch(rows: list[tuple[int, int, int, int]]) -> np.ndarray:
    """CQE32 records from ``(user_data, res, flags, off)``."""
    c = np.zeros(len(rows), dtype=abi.io_uring_cqe32)
    for i, (ud, res, fl, off) in enumerate(rows):
        c[i]["user_data"], c[i]["res"], c[i]["flags"], c[i]["zcrx_off"] = ud, res, fl, off
    return c


def test_batch_takes_data_cqes_and_splits_token_and_offset():
    ifq, _, _ = make_ifq(area_id=0)
    more = abi.IORING_CQE_F_MORE
    c = cqe_batch([
        (0x0502, 4096, more, 0x3000),      # data
        (0x0501, 7, more, 0),              # an accept: not selected
        (0x0502, 100, more, 0x10000 + 17),  # data at a mid-buffer offset
        (0x0502, 0, 0, 0),                 # final: no data
        (0x0602, -errno.ENOSPC, 0, 0),     # final error
        (0x0602, 4096, more, 0xFF000),     # data, last buffer of the area
    ])
    b = L.zcrx_batch(ifq, c, (c["user_data"] & 0xFF) == 2)
    assert b.index.tolist() == [0, 2, 5]
    assert b.start.tolist() == [0x3000, 0x10011, 0xFF000]
    assert b.length.tolist() == [4096, 100, 4096]
    assert b.off.tolist() == [0x3000, 0x10011, 0xFF000] and b.nbytes == 8292


def test_batch_masks_the_area_token():
    ifq, _, _ = make_ifq(area_id=1)
    token = abi.area_token(1)
    c = cqe_batch([(2, 4096, abi.IORING_CQE_F_MORE, token | 0x5000)])
    b = L.zcrx_batch(ifq, c)
    assert b.start.tolist() == [0x5000] and b.off.tolist() == [token | 0x5000]


@pytest.mark.parametrize("off,res", [
    (abi.area_token(1) | 0x1000, 4096),  # another area
    ((1 << 20) - 4095, 4096),            # runs past the end of the area
])
def test_batch_refuses_chunks_outside_the_area(off, res):
    ifq, _, _ = make_ifq(area_len=1 << 20)
    with pytest.raises(PeerMisbehaved):
        L.zcrx_batch(ifq, cqe_batch([(2, res, abi.IORING_CQE_F_MORE, off)]))


def test_return_is_one_rqe_per_chunk_and_one_tail_store():
    ifq, kside, buf = make_ifq(rq_entries=8)
    stores: list[int] = []
    submit = ifq.rq.submit
    ifq.rq.submit = lambda k: (stores.append(k), submit(k))[1]
    off = np.array([0x3000, 0x10011, 0xFF000], dtype=np.uint64)
    assert L.io_uring_zcrx_return(ifq, off, np.array([4096, 100, 4096])) == 3
    assert stores == [3]  # one publish for the whole batch
    assert struct.unpack_from("<I", buf, 4)[0] == 3  # the tail word at the reported offset
    assert L.io_uring_zcrx_rq_queued(ifq) == 3
    got = kside.pop(8)
    assert got["off"].tolist() == off.tolist()
    assert got["len"].tolist() == [4096, 100, 4096]
    assert got["__pad"].tolist() == [0, 0, 0]
    assert L.io_uring_zcrx_rq_queued(ifq) == 0 and ifq.rqes_returned == 3 and ifq.rq_full == 0


def test_return_wraps_the_ring_and_clears_stale_pad():
    ifq, kside, buf = make_ifq(rq_entries=8)
    rqes = buf[64:64 + 8 * 16].view(RQE)
    rqes["__pad"] = 0xFFFF  # garbage left in the slots
    L.io_uring_zcrx_return(ifq, np.arange(6, dtype=np.uint64) * 4096, np.full(6, 4096))
    assert len(kside.pop(8)) == 6
    off = np.array([10, 11, 12, 13], dtype=np.uint64) * 4096
    L.io_uring_zcrx_return(ifq, off, np.full(4, 4096))
    assert struct.unpack_from("<I", buf, 4)[0] == 10
    assert rqes["off"][[6, 7, 0, 1]].tolist() == off.tolist()
    assert rqes["__pad"][[6, 7, 0, 1]].tolist() == [0, 0, 0, 0]
    assert kside.pop(8)["off"].tolist() == off.tolist()


def test_full_rq_is_flushed_then_the_rest_published():
    holder: dict[str, Any] = {}
    seen: list[int] = []

    def flush() -> None:  # the kernel consumes every queued RQE
        seen.extend(holder["k"].pop(64)["off"].tolist())

    ifq, kside, _ = make_ifq(rq_entries=8, on_flush=flush)
    holder["k"] = kside
    L.io_uring_zcrx_return(ifq, np.arange(8, dtype=np.uint64) * 4096, np.full(8, 4096))
    assert L.io_uring_zcrx_rq_queued(ifq) == 8  # full
    L.io_uring_zcrx_return(ifq, np.arange(8, 13, dtype=np.uint64) * 4096, np.full(5, 4096))
    assert ifq.rq_full == 1 and ifq.rq_flushes == 1
    nr_args, ctrl = ifq.kernel.ctrl[0]
    assert nr_args == 0 and len(ctrl) == 72
    assert struct.unpack_from("<II", ctrl, 0) == (3, abi.ZCRX_CTRL_FLUSH_RQ)
    assert ctrl[8:] == bytes(64)
    seen.extend(kside.pop(64)["off"].tolist())
    assert seen == [i * 4096 for i in range(13)]  # every chunk once, in order


def test_full_rq_waits_for_the_lazy_refill_when_flush_is_refused():
    holder: dict[str, Any] = {}

    def refused_but_refilled() -> None:
        holder["k"].pop(3)  # the page pool took three meanwhile
        raise ControlError("io_uring_register", errno.EINVAL, "no ZCRX_CTRL")

    ifq, kside, _ = make_ifq(rq_entries=8, on_flush=refused_but_refilled)
    holder["k"] = kside
    L.io_uring_zcrx_return(ifq, np.arange(8, dtype=np.uint64), np.ones(8))
    L.io_uring_zcrx_return(ifq, np.arange(8, 11, dtype=np.uint64), np.ones(3))
    assert ifq._flush_ok is False and ifq.rq_full == 1
    assert kside.pop(64)["off"].tolist() == list(range(3, 11))


def test_full_rq_that_never_drains_is_ringfull():
    def refused() -> None:
        raise ControlError("io_uring_register", errno.EOPNOTSUPP, "no")

    ifq, _, _ = make_ifq(rq_entries=4, on_flush=refused)
    L.io_uring_zcrx_return(ifq, np.arange(4, dtype=np.uint64), np.ones(4))
    with pytest.raises(RingFull) as ei:
        L.io_uring_zcrx_return(ifq, np.arange(2, dtype=np.uint64), np.ones(2), timeout=0.05)
    assert ei.value.errno == errno.ENOSPC


def test_stream_offsets_follow_each_connection_in_cq_order():
    pos = {5: 1000, 6: 0}
    keys = np.array([5, 6, 5, 5, 6, 7], dtype=np.uint64)
    lens = np.array([10, 20, 30, 40, 50, 60], dtype=np.int64)
    so = V.zcrx_stream_offsets(keys, lens, pos)
    assert so.tolist() == [1000, 0, 1010, 1040, 20, 0]
    assert pos == {5: 1080, 6: 70, 7: 60}
    so = V.zcrx_stream_offsets(np.array([6, 6], dtype=np.uint64), np.array([5, 5]), pos)
    assert so.tolist() == [70, 75] and pos[6] == 80


def test_runs_join_back_to_back_chunks_of_one_stream():
    start = np.array([0, 4096, 8192, 20000, 24096, 30000, 34096], dtype=np.int64)
    length = np.array([4096, 4096, 4096, 4096, 100, 4096, 4096], dtype=np.int64)
    keys = np.array([1, 1, 1, 1, 1, 1, 2])
    so = np.array([0, 4096, 8192, 12288, 16384, 99, 0])
    assert V.zcrx_runs(start, length).tolist() == [0, 3, 5]
    assert V.zcrx_runs(start, length, keys, so).tolist() == [0, 3, 5, 6]


def test_hash_runs_equals_one_update_per_chunk_staged_or_in_place():
    import hashlib

    area = np.random.default_rng(3).integers(0, 256, 1 << 20, dtype=np.uint8)
    before = area.copy()
    cases = [
        (np.arange(50, dtype=np.int64) * 4096, np.full(50, 64, np.int64)),      # staged, 1 width
        (np.arange(9, dtype=np.int64) * 8192 + 7, np.arange(1, 10, dtype=np.int64) * 33),
        (np.arange(20, dtype=np.int64) * 4096, np.full(20, 1448, np.int64)),    # in place
        (np.array([0, 64, 4096, 4160, 9000], dtype=np.int64), np.full(5, 64, np.int64)),
    ]
    for start, length in cases:
        heads = V.zcrx_runs(start, length)
        ends = np.append(heads[1:], len(start)) - 1
        got = hashlib.sha256()
        staged = V.zcrx_hash_runs(got.update, area, start, length, heads, ends)
        want = hashlib.sha256()
        for s, n in zip(start.tolist(), length.tolist(), strict=True):
            want.update(area[s:s + n])
        assert got.hexdigest() == want.hexdigest()
        assert staged in (0, int(length.sum()))
    assert V.zcrx_hash_runs(hashlib.sha256().update, area, *cases[0], heads[:0], heads[:0]) == 0
    assert np.array_equal(area, before)  # read only


def _place(area: np.ndarray, chunks: list[tuple[int, int, int, int]]) -> tuple[np.ndarray, ...]:
    """Write pattern chunks ``(start, length, stream, stream_off)`` into ``area``."""
    for s, n, sid, so in chunks:
        pattern.fill(sid, so, area[s:s + n])
    cols = list(zip(*chunks, strict=True))
    return tuple(np.array(c, dtype=np.int64) for c in cols)


def test_verify_in_place_finds_the_first_bad_byte_of_each_chunk():
    area = np.zeros(1 << 20, dtype=np.uint8)
    rng = np.random.default_rng(1)
    slots = rng.permutation(200)[:40] * 4096
    chunks = [(int(s), 4096, 21000, 4096 * i) for i, s in enumerate(slots[:30])]  # scattered
    chunks += [(900 * 1024 + 4096 * i, 4096, 21001, 4096 * i) for i in range(6)]  # one run
    chunks += [(int(slots[30]), 1000, 21002, 5), (int(slots[31]), 3000, 21002, 1005)]
    start, length, stream, so = _place(area, chunks)
    before = area.copy()
    assert V.zcrx_verify(area, start, length, stream, so).tolist() == [-1] * len(chunks)
    assert np.array_equal(area, before)  # read only
    area[start[3] + 17] ^= 1          # a scattered 4 KiB chunk (gather path)
    area[start[32] + 5] ^= 0x80       # inside the run
    area[start[34] + 4095] ^= 1       # the last byte of the run
    area[start[36] + 999] ^= 1        # an odd-sized chunk
    bad = V.zcrx_verify(area, start, length, stream, so)
    expect = [-1] * len(chunks)
    expect[3], expect[32], expect[34], expect[36] = 17, 5, 4095, 999
    assert bad.tolist() == expect
    wrong_stream = stream.copy()
    wrong_stream[0] = 21001
    assert V.zcrx_verify(area, start[:1], length[:1], wrong_stream[:1], so[:1])[0] >= 0


@pytest.mark.parametrize("width", [64, 1448, 4096, 16 << 10, (16 << 10) + 8, 65160])
def test_verify_scattered_chunks_of_every_size_against_chunk_by_chunk(width: int) -> None:
    """Scattered chunks of one width, from 64-byte segments to 64 KiB HW-GRO sessions, several
    gathers' worth (or compared in place when wide): the first bad byte of each chunk is
    where a chunk-by-chunk check finds it, and the area is only read."""
    n = max(V._GATHER_MIN, 2 * V._GATHER_BYTES // width + 3)
    stride = width + 24  # never back to back: every chunk is a run of its own
    area = np.zeros(n * stride + 64, dtype=np.uint8)
    chunks = [(i * stride + 8, width, 31000 + i % 3, width * (i // 3)) for i in range(n)]
    start, length, stream, so = _place(area, chunks)
    assert V.zcrx_verify(area, start, length, stream, so).tolist() == [-1] * n
    rng = np.random.default_rng(width)
    hit = sorted({0, n - 1, *rng.integers(0, n, 3).tolist()})
    for i in hit:
        area[start[i] + int(rng.integers(0, width))] ^= 0x10
    before = area.copy()
    want = [pattern.verify(int(stream[i]), int(so[i]), area[start[i]:start[i] + width])
            for i in range(n)]
    assert [i for i, b in enumerate(want) if b >= 0] == hit
    assert V.zcrx_verify(area, start, length, stream, so).tolist() == want
    assert np.array_equal(area, before)


def test_return_cqes_verifies_then_returns_every_data_cqe():
    ifq, kside, _ = make_ifq(rq_entries=16)
    area = ifq.area_view
    more = abi.IORING_CQE_F_MORE
    rows = []
    for i, s in enumerate([0x2000, 0x3000, 0x9000]):
        pattern.fill(40001, 4096 * i, area[s:s + 4096])
        rows.append(((9 << 8) | 2, 4096, more, s))
    pattern.fill(40002, 0, area[0x20000:0x20000 + 512])
    rows.insert(1, ((10 << 8) | 2, 512, more, 0x20000))
    rows.append(((9 << 8) | 1, 11, more, 0))  # not data
    c = cqe_batch(rows)
    area[0x3000 + 9] ^= 0xFF
    pos = {(9 << 8) | 2: 0, (10 << 8) | 2: 0}
    streams = {(9 << 8) | 2: 40001, (10 << 8) | 2: 40002}
    b = V.zcrx_return_verified(ifq, c, (c["user_data"] & 0xFF) == 2, streams=streams,
                               positions=pos)
    assert b.returned == 4 and b.stream_off.tolist() == [0, 0, 4096, 8192]
    assert b.bad.tolist() == [-1, -1, 9, -1]
    assert pos == {(9 << 8) | 2: 12288, (10 << 8) | 2: 512}
    assert kside.pop(16)["off"].tolist() == [0x2000, 0x20000, 0x3000, 0x9000]
    with pytest.raises(Misuse):
        V.zcrx_return_verified(ifq, c, streams=streams)


def test_return_cqes_returns_every_data_cqe_unread():
    ifq, kside, _ = make_ifq(rq_entries=16)
    more = abi.IORING_CQE_F_MORE
    c = cqe_batch([((9 << 8) | 2, 4096, more, 0x2000), ((9 << 8) | 1, 11, more, 0),
                   ((10 << 8) | 2, 512, more, 0x20000), ((9 << 8) | 2, 0, 0, 0)])
    b = L.io_uring_zcrx_return_cqes(ifq, c, (c["user_data"] & 0xFF) == 2)
    assert b.returned == 2 and b.index.tolist() == [0, 2]
    assert b.stream_off is None and b.bad is None  # checking is the program's (app_proc.verify)
    assert kside.pop(16)["off"].tolist() == [0x2000, 0x20000]


# --------------------------------------------------------------------------------------------
# The syscall boundary: a stand-in for the kernel's zcrx opcodes in a real kernel thread
# --------------------------------------------------------------------------------------------


class StandIn:
    """Answers IORING_REGISTER_ZCRX_IFQ / ZCRX_CTRL / QUERY as the uapi says the kernel does,
    from the kernel thread: reads the structs through the task's mm where the pointers say,
    writes the outputs back, and keeps the RQ as the kernel sees it."""

    def __init__(self, kt: KernelThread, query: bool = False) -> None:
        self.kt = kt
        self.calls: list[dict[str, Any]] = []
        self.rq: RingConsumer | None = None
        self.fail: int | None = None
        self.ctrl: list[bytes] = []
        ops = [(abi.IORING_REGISTER_ZCRX_IFQ, self.ifq, False),
               (abi.IORING_REGISTER_ZCRX_CTRL, self.zctrl, False)]
        if query:
            ops.append((abi.IORING_REGISTER_QUERY, self.query, True))
        kt.call(lambda ctx: [ctx.rings.register_register_op(op, fn, blind=blind)
                             for op, fn, blind in ops])

    def ifq(self, ring, task, nr_args, blobs):
        if self.fail is not None:
            raise Misuse("refused", self.fail)
        reg = np.frombuffer(blobs[0], dtype=abi.io_uring_zcrx_ifq_reg).copy()
        area = task.mm.resolve(int(reg["area_ptr"][0]), 48, write=True)
        rdesc = task.mm.resolve(int(reg["region_ptr"][0]), 64, write=True)
        self.calls.append({"nr_args": nr_args, "nblobs": len(blobs), "reg": bytes(blobs[0]),
                           "area": area.tobytes(), "region": rdesc.tobytes()})
        r = rdesc.view(abi.io_uring_region_desc)
        entries = 1 << (int(reg["rq_entries"][0]) - 1).bit_length()
        size = int(r["size"][0])
        if int(r["flags"][0]) & abi.IORING_MEM_REGION_TYPE_USER:
            buf = task.mm.resolve(int(r["user_addr"][0]), size, write=True)
        else:
            offset = abi.zcrx_region_mmap_offset(5)
            region = Region.create(region_name(self.kt.ctx.run, "kernel",
                                               f"t{task.tid}.ring{ring.fd}.zcrx5"), size)
            ring.mmap_regions[offset] = region
            r["mmap_offset"] = offset
            buf = region.array(np.uint8)
        area.view(abi.io_uring_zcrx_area_reg)["rq_area_token"] = abi.area_token(0)
        out = reg.copy()
        out["rq_entries"] = entries
        out["offsets"]["head"], out["offsets"]["tail"], out["offsets"]["rqes"] = 0, 4, 64
        out["zcrx_id"] = 5
        self.rq = RingConsumer(buf, RingLayout(entries, RQE, head=0, tail=4, entries=64),
                               untrusted=True)
        return 0, [out.tobytes()]

    def zctrl(self, ring, task, nr_args, blobs):
        self.ctrl.append(bytes(blobs[0]))
        assert self.rq is not None
        self.rq.pop(self.rq.nentries)
        return 0, [bytes(blobs[0])]

    def query(self, ring, task, nr_args, blobs):
        hdr = np.frombuffer(blobs[0], dtype=abi.io_uring_query_hdr).copy()
        q = np.zeros(1, dtype=abi.io_uring_query_zcrx)
        q["register_flags"] = abi.ZCRX_REG_NODEV
        old = (7, 2)  # the stand-in answers as a 7.2 kernel (its RQ header is 0 / 4 / 64)
        q["nr_ctrl_opcodes"] = abi.zcrx_nr_ctrl_opcodes(old)
        q["rq_hdr_size"] = abi.zcrx_rq_hdr_size(old)
        q["rq_hdr_alignment"] = abi.ZCRX_RQ_HDR_ALIGNMENT
        dst = task.mm.resolve(int(hdr["query_data"][0]), int(hdr["size"][0]), write=True)
        dst[:] = q.view(np.uint8)[:len(dst)]
        hdr["result"] = 0
        return 0, [hdr.tobytes()]


@pytest.fixture
def kt(run_id, tmp_path):
    k = KernelThread(run_id, tmp_path)
    yield k
    k.close()


@pytest.fixture
def app(kt, run_id, tmp_path):
    k = S.Kernel(tmp_path, run=run_id, name="zcrx-test")
    yield k
    k.close()


@pytest.mark.parametrize("rq_kernel", [False, True], ids=["rq-user", "rq-kernel"])
def test_register_ifq_passes_the_uapi_structs_through_app_memory(kt, app, run_id, rq_kernel):
    si = StandIn(kt)
    ring = L.io_uring_queue_init(8, L.ZCRX_RING_FLAGS, kernel=app)
    ifq = L.io_uring_register_ifq(ring, 3, 1, rq_entries=100, area_size=1 << 20,
                                  rq_kernel=rq_kernel, query=False)
    (call,) = si.calls
    assert call["nr_args"] == 1 and call["nblobs"] == 1
    reg = call["reg"]
    assert len(reg) == 96 and struct.unpack_from("<IIII", reg, 0) == (3, 1, 100, 0)
    area_ptr, region_ptr = struct.unpack_from("<QQ", reg, 16)
    assert (area_ptr, region_ptr) == (ifq.params.addr, ifq.params.addr + 64)
    assert reg[32:96] == bytes(64)
    assert struct.unpack_from("<QQQII", call["area"], 0) == (ifq.area_addr, 1 << 20, 0, 0, 0)
    rq_size = L.zcrx_rq_region_size(128)
    assert rq_size == 8192
    region = struct.unpack_from("<QQIIQ", call["region"], 0)
    if rq_kernel:
        assert region == (0, rq_size, 0, 0, 0) and ifq.rq_mem is None
    else:
        assert region == (ifq.rq_mem.addr, rq_size, abi.IORING_MEM_REGION_TYPE_USER, 0, 0)
    assert (ifq.zcrx_id, ifq.rq_entries, ifq.area_token) == (5, 128, 0)
    assert ifq.offsets == {"head": 0, "tail": 4, "rqes": 64}
    assert ring.zcrx_ifqs == [ifq]
    # The RQ the app writes is the one the kernel reads.
    L.io_uring_zcrx_return(ifq, np.array([0x1000, 0x3000 | 17], dtype=np.uint64), [4096, 9])
    got = kt.call(lambda ctx: si.rq.pop(8))
    assert got["off"].tolist() == [0x1000, 0x3011] and got["len"].tolist() == [4096, 9]
    assert got["__pad"].tolist() == [0, 0]
    # And the area is the app's: what the kernel side writes through the mm, the app sees.
    kt.call(lambda ctx: ctx.tasks.by_tid(app.task).mm.resolve(ifq.area_addr + 8192, 4, True)
            .__setitem__(slice(None), [1, 2, 3, 4]))
    assert ifq.data(8192, 4).tolist() == [1, 2, 3, 4]
    assert L.io_uring_zcrx_flush_rq(ifq) == 0
    assert struct.unpack_from("<II", si.ctrl[0], 0) == (5, abi.ZCRX_CTRL_FLUSH_RQ)
    L.io_uring_queue_exit(ring)
    assert list_run_segments(run_id) == []
    assert kt.call(lambda ctx: len(ctx.tasks.by_tid(app.task).mm)) == 0


def test_register_ifq_failure_leaves_nothing_allocated(kt, app, run_id):
    si = StandIn(kt)
    si.fail = errno.EEXIST
    ring = L.io_uring_queue_init(8, L.ZCRX_RING_FLAGS, kernel=app)
    before = list_run_segments(run_id)
    with pytest.raises(ControlError) as ei:
        L.io_uring_register_ifq(ring, 3, 1, rq_entries=64, area_size=1 << 20, query=False)
    assert ei.value.errno == errno.EEXIST
    assert list_run_segments(run_id) == before and ring.zcrx_ifqs == []
    with pytest.raises(Misuse):
        L.io_uring_register_ifq(L.io_uring_queue_init(8, kernel=app), query=False)  # no CQE32
    L.io_uring_queue_exit(ring)


def test_query_sizes_the_rq_region_and_its_absence_falls_back(kt, app):
    def no_query(ctx):
        ctx.rings.register_ops.pop(abi.IORING_REGISTER_QUERY, None)
        ctx.rings.blind_register_ops.discard(abi.IORING_REGISTER_QUERY)

    kt.call(no_query)
    assert L.io_uring_query_zcrx(app) is None  # EINVAL: an older kernel, no query
    ring = L.io_uring_queue_init(8, L.ZCRX_RING_FLAGS, kernel=app)
    StandIn(kt)
    ifq = L.io_uring_register_ifq(ring, 0, 0, rq_entries=256, area_size=1 << 16)
    assert ifq.rq_size == 8192  # a page for the header + 4096 of RQEs
    si = StandIn(kt, query=True)
    q = L.io_uring_query_zcrx(app)
    assert int(q["rq_hdr_size"][0]) == 8 and int(q["rq_hdr_alignment"][0]) == 64
    assert int(q["register_flags"][0]) == abi.ZCRX_REG_NODEV
    # a ring asks once (the answer is the kernel's), so the kernel with the query gets its own
    ring2 = L.io_uring_queue_init(8, L.ZCRX_RING_FLAGS, kernel=app)
    ifq = L.io_uring_register_ifq(ring2, 0, 0, rq_entries=256, area_size=1 << 16)
    assert struct.unpack_from("<Q", si.calls[0]["region"], 8)[0] == 8192 == ifq.rq_size
    ifq = L.io_uring_register_ifq(ring2, 0, 0, rq_entries=128, area_size=1 << 16)
    assert ifq.rq_size == 4096  # 64 + 2048: one page
    L.io_uring_queue_exit(ring2)
    L.io_uring_queue_exit(ring)


# --------------------------------------------------------------------------------------------
# The server: options
# --------------------------------------------------------------------------------------------


def test_server_options_follow_the_liburing_example():
    o, _ = zcrx_server.parse_args(["-q", "1"])
    assert (o.port, o.ifname, o.rxq, o.area_size, o.cq_entries, o.rq_entries) == \
        (8000, "eth0", 1, 64 << 20, 8192, 8192)
    assert not o.rq_kernel and not o.verify and o.stream_id is None and o.size == 0
    o, _ = zcrx_server.parse_args(["--nodev", "-r", "1", "-S", "16M", "-s", "1G", "-v",
                                   "--stream-id", "7", "-R", "4096", "-n", "2"])
    assert o.nodev and o.rq_kernel and o.area_size == 16 << 20 and o.size == 1 << 30
    assert (o.stream_id, o.rq_entries, o.connections) == (7, 4096, 2)
    assert (o.wait_nr, o.min_wait) == (1, 0)
    o, _ = zcrx_server.parse_args(["-q", "1", "--wait-nr", "64", "--min-wait", "500"])
    assert (o.wait_nr, o.min_wait) == (64, 500)
    for bad in (["-i", "eth0"], ["--nodev", "-q", "2"], ["-q", "0", "-R", "1000"],
                ["-q", "0", "-r", "2"], ["-q", "0", "--stream-id", "x"],
                ["-q", "1", "--wait-nr", "8"], ["-q", "1", "--wait-nr", "0"],
                ["-q", "1", "--min-wait", "-1"]):
        with pytest.raises(SystemExit):
            zcrx_server.parse_args(bad)


def test_find_ifq_stats_picks_this_ifq():
    ifq = {"ifq": 4, "task": 2, "area": {"addr": 0x7F0000400000, "len": 1 << 20},
           "counters": {"copy_count": 7, "copy_bytes": 700, "zc_cqes": 3, "zc_bytes": 12288}}
    other = {"ifq": 3, "task": 2, "area": {"addr": 0x7F0000100000},
             "counters": {"copy_count": 5, "copy_bytes": 500}}
    body = {"zcrx": {"ifqs": [other, ifq]}}
    got = zcrx_server.find_ifq_stats(body, 2, 0x7F0000400000)
    assert got is not None and (got["count"], got["bytes"], got["zc_bytes"]) == (7, 700, 12288)
    assert zcrx_server.find_ifq_stats(body, 9, 0x7F0000400000) is None
    assert zcrx_server.find_ifq_stats({"io_uring": {}}, 2, 0) is None


# --------------------------------------------------------------------------------------------
# End to end through the kernel's own zcrx (once driver_proc.zcrx exists)
# --------------------------------------------------------------------------------------------

needs_kernel = pytest.mark.skipif(not HAVE_KERNEL_ZCRX, reason="driver_proc.zcrx not there yet")


def _run_server(kt: KernelThread, app: S.Kernel, argv: list[str]):
    result: dict[str, Any] = {}

    def go() -> None:
        try:
            result["code"] = zcrx_server.main(argv, kernel=app)
        except BaseException as exc:  # surfaced by the test
            result["exc"] = exc

    t = threading.Thread(target=go, name="zcrx_server")
    t.start()
    kt.wait_for(lambda ctx: t.is_alive() is False or any(
        sf.is_listening for task in ctx.tasks for sf in task.files.values()
        if hasattr(sf, "is_listening")))
    return t, result


@needs_kernel
@pytest.mark.parametrize("rq_kernel", [False, True], ids=["rq-user", "rq-kernel"])
def test_nodev_recv_zc_through_the_kernel_with_returns_and_flushes(kt, app, rq_kernel):
    """liburing's "2x area with returns and flushes": 16 niovs carry 200 kB only because
    every chunk goes back through the RQ (and NODEV needs FLUSH_RQ to consume it)."""
    ring = L.io_uring_queue_init(16, L.ZCRX_RING_FLAGS, kernel=app)
    ifq = L.io_uring_register_ifq(ring, flags=abi.ZCRX_REG_NODEV, rq_entries=16,
                                  area_size=16 * 4096, rq_kernel=rq_kernel)
    assert ifq.nodev and ifq.rq_user is not rq_kernel and ifq.area_len == 65536
    lfd = app.listen_tcp(8000)
    sqe = L.io_uring_get_sqe(ring)
    L.io_uring_prep_accept(sqe, lfd)
    L.io_uring_sqe_set_data64(sqe, 1)
    L.io_uring_submit(ring)
    data = pattern.pattern_bytes(32000, 0, 200_000)
    tcp_stream(kt, 32000, data)
    cqe = L.io_uring_wait_cqe(ring, timeout_ms=10_000)
    fd = int(cqe["res"])
    assert int(cqe["user_data"]) == 1 and fd >= 0
    L.io_uring_cqe_seen(ring)

    def arm() -> None:
        sqe = L.io_uring_get_sqe(ring)
        L.io_uring_prep_recv_zc(sqe, fd, 0, ifq.zcrx_id)
        L.io_uring_sqe_set_data64(sqe, 2)
        L.io_uring_submit(ring)

    arm()
    pos: dict[int, int] = {}
    finals: list[int] = []
    got = hashlib_sha256()
    while True:
        cqes = L.io_uring_wait_cqes(ring, 1, timeout_ms=10_000)
        b = zcrx_read(ifq, cqes, got)
        b2 = V.zcrx_return_verified(ifq, cqes, streams={2: 32000}, positions=pos)
        assert b2.bad.tolist() == [-1] * len(b2) and len(b2) == len(b)
        ends = cqes["res"][(cqes["flags"] & abi.IORING_CQE_F_MORE) == 0].tolist()
        L.io_uring_cq_advance(ring, len(cqes))
        L.io_uring_zcrx_flush_rq(ifq)
        if not ends:
            continue
        finals += ends
        if ends[-1] == 0:
            break
        assert ends[-1] in (-errno.ENOMEM, -errno.ENOSPC)  # out of niovs: flushed, re-arm
        arm()
    assert pos == {2: 200_000} and got.digest() == hashlib_sha256(data).digest()
    assert ifq.rqes_returned >= 200_000 // 4096 > 16  # each of the 16 niovs went round
    counters = kt.call(lambda ctx: dict(ctx.zcrx.ifqs[0].counters))
    assert counters["copy_bytes"] == 200_000 and counters["zc_bytes"] == 0
    assert counters["rq_returned"] == counters["copy_count"] == ifq.rqes_returned
    kt.call(lambda ctx: ctx.zcrx.check_ledger())
    # What the server reports as copy fallback is this, found in the kernel's stats.
    fb = zcrx_server.find_ifq_stats({"zcrx": kt.call(lambda ctx: ctx.zcrx.stats())},
                                    app.task, ifq.area_addr)
    assert fb is not None and (fb["count"], fb["bytes"]) == (counters["copy_count"], 200_000)
    L.io_uring_queue_exit(ring)
    assert kt.call(lambda ctx: len(ctx.zcrx.ifqs)) == 0  # NODEV: nothing left to drain


def hashlib_sha256(data: bytes = b""):
    import hashlib

    return hashlib.sha256(data)


def zcrx_read(ifq: L.ZcrxIfq, cqes: np.ndarray, h) -> L.ZcrxBatch:
    b = L.zcrx_batch(ifq, cqes)
    for s, n in zip(b.start.tolist(), b.length.tolist(), strict=True):
        h.update(ifq.data(s, n))
    return b


@needs_kernel
@pytest.mark.parametrize("rq", ["0", "1"], ids=["rq-user", "rq-kernel"])
def test_nodev_server_receives_and_verifies_two_connections(kt, app, tmp_path, rq):
    summary = tmp_path / "s.json"
    sizes = {31001: 300_000, 31002: 70_001}
    t, result = _run_server(kt, app, ["--nodev", "-v", "-n", "2", "-S", "256K", "-R", "32",
                                      "-C", "256", "-r", rq, "--json", str(summary),
                                      "--seconds", "30", "--quiet"])
    for sport, size in sizes.items():
        tcp_stream(kt, sport, pattern.pattern_bytes(sport, 0, size))
    t.join(30)
    assert not t.is_alive() and result == {"code": 0}, result
    s = json.loads(summary.read_text())
    assert s["ok"] and s["errors"] == [] and s["zcrx"]["nodev"]
    assert s["zcrx"]["rq_memory"] == ("kernel" if rq == "1" else "user")
    by_stream = {c["stream"]: c for c in s["connections"]}
    for sport, size in sizes.items():
        c = by_stream[sport]
        assert c["bytes"] == size and c["bad_offset"] is None and c["checks"]["complete"]
        assert c["sha256"] == pattern.expected_sha256(sport, size)
    assert s["app"]["read_bytes"] == sum(sizes.values()) and s["app"]["copy_bytes"] == 0
    assert s["zcrx"]["rqes_returned"] == s["app"]["data_cqes"]
    assert s["zcrx"]["rq_flushes"] > 0  # NODEV: the server flushes; 64 niovs carried 370 kB
    assert kt.call(lambda ctx: ctx.zcrx.retired["copy_bytes"]) == sum(sizes.values())


@needs_kernel
def test_server_writes_each_connection_to_its_own_file_with_o(kt, app, tmp_path):
    """-o FILE with -n 2: FILE.1 and FILE.2, in accept order, each its stream byte exact."""
    out = tmp_path / "got.bin"
    t, result = _run_server(kt, app, ["--nodev", "-n", "2", "-S", "256K", "-R", "32",
                                      "-o", str(out), "--seconds", "30", "--quiet"])
    sizes = {31011: 150_001, 31012: 40_000}
    for sport, size in sizes.items():
        tcp_stream(kt, sport, pattern.pattern_bytes(sport, 0, size))
    t.join(30)
    assert not t.is_alive() and result == {"code": 0}, result
    for n, (sport, size) in enumerate(sizes.items(), start=1):
        assert Path(f"{out}.{n}").read_bytes() == pattern.pattern_bytes(sport, 0, size)
    assert not out.exists()


def test_o_policy_one_stream_on_stdout_else_one_file_per_connection():
    for mod in (zcrx_server, copy_server):
        base = ["-q", "1"] if mod is zcrx_server else []
        o, _ = mod.parse_args([*base, "-o", "-", "-n", "1"])
        assert o.output == "-"
        o, _ = mod.parse_args([*base, "-o", "f.bin"])
        assert o.output == "f.bin"
        for bad in (["-o", "-"], ["-o", "-", "-n", "2"], ["-o", "-", "-n", "1", "--json", "-"]):
            with pytest.raises(SystemExit):
                mod.parse_args([*base, *bad])
    assert server.output_path("f.bin", 1, single=True) == "f.bin"
    assert server.output_path("f.bin", 2, single=False) == "f.bin.2"
    assert server.output_path("f{n}.bin", 3, single=False) == "f3.bin"


@needs_kernel
def test_server_reports_corruption_and_short_streams(kt, app, tmp_path):
    summary = tmp_path / "s.json"
    t, result = _run_server(kt, app, ["--nodev", "-v", "-s", "50000", "-n", "2", "--json",
                                      str(summary), "--seconds", "30", "--quiet"])
    good = bytearray(pattern.pattern_bytes(33000, 0, 50_000))
    good[40_000] ^= 0xFF
    tcp_stream(kt, 33000, bytes(good))  # one flipped byte
    tcp_stream(kt, 33001, pattern.pattern_bytes(33001, 0, 20_000))  # short
    t.join(30)
    assert result == {"code": server.EXIT_CHECK_FAILED}
    s = json.loads(summary.read_text())
    by_stream = {c["stream"]: c for c in s["connections"]}
    assert by_stream[33000]["bad_offset"] == 40_000
    assert by_stream[33000]["checks"] == {"error": True, "complete": True, "verify": False,
                                          "size": True}
    assert by_stream[33001]["checks"] == {"error": True, "complete": True, "verify": True,
                                          "size": False}
    assert not s["ok"]


@needs_kernel
def test_server_exits_with_a_clear_error_when_the_kernel_goes(kt, run_id, tmp_path, capsys):
    k = S.Kernel(tmp_path, run=run_id, name="zcrx-test", timeout_ms=300)
    try:
        t, result = _run_server(kt, k, ["--nodev", "-n", "1", "--seconds", "30"])
        kt.close()  # the kernel process dies
        t.join(30)
        assert not t.is_alive() and result == {"code": server.EXIT_SETUP_FAILED}
        assert "kernel gone" in capsys.readouterr().err
    finally:
        k.close()


@needs_kernel
def test_nodev_server_prints_zcrx_events_with_e(kt, app, tmp_path, capsys):
    """``-E`` (Linux 7.2+): the COPY event of the NODEV copy fallback is printed, once."""
    t, result = _run_server(kt, app, ["--nodev", "-E", "-n", "1", "-S", "256K", "-R", "32",
                                      "-C", "256", "--seconds", "30"])
    tcp_stream(kt, 31001, pattern.pattern_bytes(31001, 0, 100_000))
    t.join(30)
    assert not t.is_alive() and result == {"code": 0}, result
    out = capsys.readouterr().out
    assert out.count("zcrx event COPY") == 1 and "copy stats:" in out
    assert kt.call(lambda ctx: ctx.zcrx.retired["events"]) == 1


class _AcceptKernel:
    """Syscalls of an accepting server, answered in memory and counted."""

    def __init__(self) -> None:
        self.batches: list[list[tuple[str, dict]]] = []
        self.closed: list[int] = []

    def syscall_many(self, calls):
        self.batches.append(list(calls))
        out = []
        for type_, body in calls:
            if type_ == "getpeername":
                out.append(Message("ok", 1, {"addr": "10.0.0.2", "port": 40000 + body["fd"]}))
            else:
                out.append(Message("ok", 1, {"res": 0, "value": 8200 + body["fd"]}))
        return out

    def close_fd(self, fd: int) -> None:
        self.closed.append(fd)


class _Acceptor(server.AcceptingServer):
    def __init__(self, k, connections: int, extra: bool) -> None:
        opts = SimpleNamespace(connections=connections, stream_id=None, quiet=True)
        super().__init__(k, opts)
        self.lfd = 3
        self.extra = extra
        self.opened: list[tuple[int, tuple[str, int], int, list]] = []
        self.arms = 0

    def accept_calls(self, fd):
        return [("getsockopt", {"fd": fd})] if self.extra else []

    def open_conn(self, fd, peer, stream, info=()):
        self.opened.append((fd, peer, stream, list(info)))

    def arm_accept(self) -> None:
        self.arms += 1


@pytest.mark.parametrize("extra", [False, True])
def test_a_batch_of_accepts_costs_one_round_trip(extra: bool) -> None:
    """Accept CQEs of one batch: every new connection's getpeername (and the server's own
    calls, e.g. SO_INCOMING_NAPI_ID) in one pipelined round trip, connections opened in CQ
    order, a failed accept reported, the multishot accept re-armed once it ends."""
    k = _AcceptKernel()
    srv = _Acceptor(k, 0, extra)
    more = abi.IORING_CQE_F_MORE
    srv.on_accepts([(7, more), (-errno.EMFILE, more), (8, more), (9, 0)])
    assert len(k.batches) == 1
    assert [t for t, _ in k.batches[0]] == (["getpeername", "getsockopt"] * 3 if extra
                                            else ["getpeername"] * 3)
    assert [(fd, peer, stream) for fd, peer, stream, _ in srv.opened] == [
        (7, ("10.0.0.2", 40007), 40007), (8, ("10.0.0.2", 40008), 40008),
        (9, ("10.0.0.2", 40009), 40009)]
    assert [info for *_, info in srv.opened] == ([[{"res": 0, "value": 8207}],
                                                  [{"res": 0, "value": 8208}],
                                                  [{"res": 0, "value": 8209}]]
                                                 if extra else [[], [], []])
    assert srv.errors == ["accept: EMFILE"] and srv.accepted == 3 and srv.arms == 1
    # -n 4: the fourth connection closes the listener, nothing is re-armed
    srv.opts.connections = 4
    srv.on_accepts([(10, 0), (-errno.ECANCELED, 0)])
    assert k.closed == [3] and srv.lfd == -1 and srv.arms == 1 and srv.accepted == 4
    assert srv.errors == ["accept: EMFILE"]
