"""NIC receive DMA (nic_proc.dma) and the IOMMU table (nic_proc.iommu), without processes.

The test plays the kernel: it creates a queue region laid out with QueueLayout and an
area, maps both for the NIC, posts buffers on the fill ring and reads completions, and
rebuilds every frame from the header slot and the posted buffers (the kernel's FIFO of
posted descriptors), exactly as the driver will.  Frames are compared byte for byte with
what was put on the wire.
"""

from __future__ import annotations

import dataclasses
import errno
from collections import deque
from collections.abc import Iterator

import numpy as np
import pytest

from nic_proc.dma import (
    ADAPTIVE_PROFILES,
    ADAPTIVE_WINDOW_NS,
    NIC_STATUS_DMA_FAULT,
    Coalesce,
    DmaQueue,
    Frames,
    HdsConfig,
)
from nic_proc.iommu import Iommu
from nic_proc.sources import FrameBuilder
from shared import abi, pattern, wire
from shared.errors import Misuse
from shared.nicif import QC, QUEUE_COUNTERS, QueueLayout, hdr_slot_size
from shared.ring import RingConsumer, RingProducer
from shared.shm import Region, region_name

SPORT, DPORT, ISN = 5000, 9000, 0xFFFFF000  # the ISN makes seq wrap within a few frames
F_SPLIT = abi.NIC_CQE_F_SPLIT | abi.NIC_CQE_F_L4_OK
F_LINEAR = abi.NIC_CQE_F_LINEAR | abi.NIC_CQE_F_L4_OK


def c(stats: np.ndarray, name: str) -> int:
    return int(stats[QC[name]])


class Kernel:
    """The kernel side of one queue: regions, mappings, fill producer, completion consumer."""

    def __init__(self, run_id: str, *, ring: int = 16, mtu: int = 4096, nbufs: int = 64,
                 buf_len: int = 4096, split: bool = True, thresh: int = 0,
                 slot: int | None = None) -> None:
        self.mtu = mtu
        self.buf_len = buf_len
        self.layout = QueueLayout(ring, slot or hdr_slot_size(wire.max_frame_len(mtu)))
        self.qreg = Region.create(region_name(run_id, "kernel", "eth0.q0"), self.layout.size)
        self.area = Region.create(region_name(run_id, "app1", "area0"), nbufs * buf_len)
        self.iommu = Iommu()
        self.qmap = self.iommu.dma_map(self.qreg.name, self.layout.size)
        self.amap = self.iommu.dma_map(self.area.name, self.area.size)
        self.fill = RingProducer(self.qreg.buf, self.layout.fill)
        self.comp = RingConsumer(self.qreg.buf, self.layout.comp)
        self.slots = self.layout.hdr_slots(self.qreg.buf)
        self.av = self.area.array()
        self.cfg = HdsConfig(split, thresh)
        self.stats = np.zeros(len(QUEUE_COUNTERS), np.int64)
        self.dq = DmaQueue(self.iommu.get(self.qmap).view, self.layout, self.iommu, queue=3,
                           config=self.cfg, stats=self.stats)
        self.free = deque(range(nbufs))
        self.posted: deque[tuple[int, int, int]] = deque()  # (map id, offset, len)

    def post(self, k: int, *, length: int | None = None) -> int:
        """Post up to k free buffers of the area; returns how many."""
        k = min(k, len(self.free), self.fill.space())
        if k == 0:
            return 0
        ids = [self.free.popleft() for _ in range(k)]
        ln = self.buf_len if length is None else length
        return self.post_raw([(self.amap, i * self.buf_len, ln) for i in ids])

    def post_raw(self, bufs: list[tuple[int, int, int]]) -> int:
        d = np.zeros(len(bufs), abi.nic_rx_desc)
        d["iova"] = [abi.make_iova(m, o) for m, o, _ in bufs]
        d["len"] = [ln for _, _, ln in bufs]
        d["buf_id"] = np.arange(len(bufs))
        n = self.fill.push(d)
        self.posted.extend(bufs[:n])
        return n

    def reap(self) -> list[tuple[np.void, bytes]]:
        """Pop every completion; rebuild (cqe, frame bytes) the way the driver does."""
        out = []
        for e in self.comp.pop(self.comp.nentries):
            frags = [self.posted.popleft() for _ in range(int(e["nr_frags"]))]
            slot = self.slots[int(e["hdr_slot"])]
            if e["flags"] & abi.NIC_CQE_F_SPLIT:
                data = bytearray()
                rem = int(e["data_len"])
                for m, off, ln in frags:
                    assert m == self.amap
                    take = min(ln, rem)
                    data += self.av[off:off + take].tobytes()
                    rem -= take
                assert rem == 0
                frame = slot[: int(e["hdr_len"])].tobytes() + bytes(data)
            else:
                frame = slot[: int(e["hdr_len"])].tobytes()
            for m, off, _ in frags:
                if m == self.amap:
                    self.free.append(off // self.buf_len)
            out.append((e, frame))
        return out

    def close(self) -> None:
        self.dq.detach()
        self.iommu.unmap_all()
        self.qreg.close()
        self.area.close()


@pytest.fixture
def kern(request: pytest.FixtureRequest, run_id: str) -> Iterator[Kernel]:
    k = Kernel(run_id, **getattr(request, "param", {}))
    yield k
    k.close()


def builder(mtu: int = 4096, batch: int = 64, family: int = 4) -> FrameBuilder:
    src, dst = ("10.0.0.2", "10.0.0.1") if family == 4 else ("fd00::2", "fd00::1")
    fs = wire.FlowSpec.from_addresses([src], [dst], [SPORT], [DPORT], isn=[ISN], stream=[SPORT])
    return FrameBuilder(fs, batch, wire.mss(family, mtu))


def frames_of(b: FrameBuilder, lengths: list[int], start: int = 0,
              flags: list[int] | None = None) -> Frames:
    ln = np.array(lengths, np.int64)
    off = start + np.concatenate(([0], np.cumsum(ln)[:-1])).astype(np.int64)
    fl = np.array(flags if flags is not None else [wire.TCP_ACK] * len(ln))
    return b.build(np.zeros(len(ln), np.intp), off, ln, fl)


def expect(fr: Frames, cfg: HdsConfig | None = None) -> list[bytes]:
    """What the kernel must rebuild: the wire frame; split frames without Ethernet padding
    (only the TCP payload goes to data buffers)."""
    cfg = cfg or HdsConfig()
    out = []
    for i in range(len(fr)):
        f = fr.frame_bytes(i)
        hl, pl = int(fr.hdr_len[i]), int(fr.pay_len[i])
        out.append(f[:hl + pl] if cfg.tcp_data_split and pl > cfg.hds_thresh else f)
    return out


# -------------------------------------------------------------------------------- placement


def test_split_puts_headers_in_slots_and_payload_in_buffers(kern: Kernel) -> None:
    b = builder()
    fr = frames_of(b, [1000] * 4)
    assert fr.uniform == (54, 1000, 1054)
    kern.post(8)
    res = kern.dq.place(fr, None, 0xDEADBEEF)
    assert res == (4, 4, False, False)
    got = kern.reap()
    assert [f for _, f in got] == expect(fr)
    for i, (e, _) in enumerate(got):
        assert int(e["hdr_slot"]) == i  # the slot is the completion's ring index
        assert int(e["flags"]) == F_SPLIT
        assert (int(e["hdr_len"]), int(e["payload_off"]), int(e["data_len"])) == (54, 54, 1000)
        assert (int(e["nr_frags"]), int(e["queue"]), int(e["status"])) == (1, 3, 0)
        assert int(e["rss_hash"]) == 0xDEADBEEF and int(e["tstamp_ns"]) > 0
    # payload lands at the start of each posted buffer, in posting order
    assert pattern.verify(SPORT, 1000, kern.av[4096:5000]) == -1
    st = kern.stats
    assert (c(st, "rx_packets"), c(st, "rx_bytes"), c(st, "rx_hds_split")) == (4, 4 * 1054, 4)
    assert (c(st, "rx_frags"), c(st, "rx_hds_linear"), c(st, "rx_dropped")) == (4, 0, 0)
    assert kern.fill.space() == 16 - 4  # 4 posted buffers still owned by the NIC
    assert kern.dq.completed == 4


@pytest.mark.parametrize("kern", [{"thresh": 100}], indirect=True)
def test_hds_threshold_linear_at_and_below_split_above(kern: Kernel) -> None:
    b = builder()
    fr = frames_of(b, [99, 100, 101, 0, 1, 100])
    kern.post(8)
    assert kern.dq.place(fr).consumed == 6
    got = kern.reap()
    assert [f for _, f in got] == expect(fr, kern.cfg)
    flags = [int(e["flags"]) for e, _ in got]
    assert flags == [F_LINEAR, F_LINEAR, F_SPLIT, F_LINEAR, F_LINEAR, F_LINEAR]
    e = got[1][0]  # linear: the whole frame in the slot, no data buffer
    assert (int(e["hdr_len"]), int(e["data_len"]), int(e["nr_frags"])) == (154, 0, 0)
    assert int(e["payload_off"]) == 54
    pad = got[3][0]  # 0-byte payload: 54-byte frame padded to 60 (zeros)
    assert int(pad["hdr_len"]) == 60 and got[3][1][54:] == bytes(6)
    assert c(kern.stats, "rx_hds_linear") == 5 and c(kern.stats, "rx_hds_split") == 1
    assert c(kern.stats, "rx_frags") == 1


@pytest.mark.parametrize("kern", [{"split": False}], indirect=True)
def test_split_off_places_every_frame_linear(kern: Kernel) -> None:
    b = builder()
    fr = frames_of(b, [3000, 4056])
    kern.post(4)
    assert kern.dq.place(fr).consumed == 2
    got = kern.reap()
    assert [f for _, f in got] == expect(fr, kern.cfg)
    assert [int(e["flags"]) for e, _ in got] == [F_LINEAR, F_LINEAR]
    assert [int(e["hdr_len"]) for e, _ in got] == [3054, 4110]
    assert kern.fill.space() == 16 - 4  # no buffer was consumed
    assert kern.dq.fill.head == 0


@pytest.mark.parametrize("kern", [{"mtu": 9000, "ring": 16}], indirect=True)
def test_payload_larger_than_a_buffer_spans_frags(kern: Kernel) -> None:
    b = builder(mtu=9000)
    fr = frames_of(b, [8960, 8960, 8960])  # 4096 + 4096 + 768 each
    kern.post(16)
    res = kern.dq.place(fr)
    assert res.consumed == 3
    got = kern.reap()
    assert [f for _, f in got] == expect(fr)
    assert [int(e["nr_frags"]) for e, _ in got] == [3, 3, 3]
    assert c(kern.stats, "rx_frags") == 9
    # the third frag of frame 0 holds 768 bytes, the rest of that buffer is untouched
    assert kern.av[2 * 4096 + 768:3 * 4096].max() == 0


@pytest.mark.parametrize("kern", [{"mtu": 9000, "ring": 16, "buf_len": 2048}], indirect=True)
def test_mixed_batch_syn_data_fin_multi_frag(kern: Kernel) -> None:
    b = builder(mtu=9000)
    lens = [0, 2048, 5000, 1, 8960, 2049, 0]
    flags = [wire.TCP_SYN] + [wire.TCP_ACK] * 5 + [wire.TCP_FIN | wire.TCP_ACK]
    fr = frames_of(b, lens, flags=flags)
    assert fr.uniform is None
    kern.post(16)
    assert kern.dq.place(fr).consumed == 7
    got = kern.reap()
    assert [f for _, f in got] == expect(fr)
    assert [int(e["nr_frags"]) for e, _ in got] == [0, 1, 3, 1, 5, 2, 0]
    parsed = wire.parse_frames(b"".join(f for _, f in got),
                               np.cumsum([0] + [len(f) for _, f in got])[:-1],
                               [len(f) for _, f in got], 9000)
    assert (parsed["status"] == 0).all()
    seq = parsed["seq"].astype(np.int64)
    assert seq[0] == ISN and seq[-1] == (ISN + 1 + sum(lens)) % 2**32


def test_out_of_buffers_stops_then_resumes_without_loss(kern: Kernel) -> None:
    b = builder()
    fr = frames_of(b, [1500] * 10)
    kern.post(4)
    res = kern.dq.place(fr)
    assert res.consumed == 4 and res.starved
    assert kern.dq.need_bufs == 1
    # doorbell protocol: NIC sets need-wakeup on the fill ring and re-checks
    assert kern.dq.arm_doorbell() is False and kern.dq.waiting
    assert kern.fill.needs_wakeup()
    assert kern.dq.try_resume() is False
    first = kern.reap()
    kern.post(10)
    assert kern.fill.needs_wakeup()  # the kernel would ring nic.doorbell now
    assert kern.dq.try_resume() is True
    assert not kern.fill.needs_wakeup() and not kern.dq.waiting
    res = kern.dq.place(fr, slice(4, 10))
    assert res == (6, 6, False, False)
    got = first + kern.reap()
    assert [f for _, f in got] == expect(fr)
    stream = b"".join(f[54:] for _, f in got)
    assert pattern.verify(SPORT, 0, stream) == -1 and len(stream) == 15000


def test_arm_doorbell_rechecks_after_setting_the_flag(kern: Kernel) -> None:
    fr = frames_of(builder(), [100] * 3)
    assert kern.dq.place(fr).starved
    kern.post(2)  # buffers arrive between the failed attempt and arming
    assert kern.dq.arm_doorbell() is True
    assert not kern.fill.needs_wakeup() and not kern.dq.waiting


@pytest.mark.parametrize("kern", [{"ring": 8, "thresh": 200}], indirect=True)
def test_completion_ring_full_stops_the_batch(kern: Kernel) -> None:
    fr = frames_of(builder(), [50] * 12)  # linear: no buffers needed, completions are the limit
    res = kern.dq.place(fr)
    assert res.consumed == 8 and res.starved and kern.dq.need_bufs == 0
    assert kern.dq.arm_doorbell() is False
    got = kern.comp.pop(3)
    assert len(got) == 3
    assert kern.dq.try_resume() is True
    res = kern.dq.place(fr, slice(8, 12))
    assert res.consumed == 3 and res.starved
    frames = [kern.slots[int(e["hdr_slot"])][: int(e["hdr_len"])].tobytes()
              for e in kern.comp.pop(8)]
    assert frames[-3:] == expect(fr, kern.cfg)[8:11]


def test_iommu_fault_drops_the_frame_and_writes_nothing(kern: Kernel) -> None:
    kern.av[:] = 0xAA
    fr = frames_of(builder(), [1000] * 4)
    kern.post(1)
    kern.post_raw([(77, 0, 4096)])  # unknown map id
    kern.post_raw([(kern.amap, kern.area.size - 100, 4096)])  # runs past the area's end
    kern.post(1)
    before = kern.av.copy()
    assert kern.dq.place(fr, None, 5) == (4, 2, False, False)
    assert kern.iommu.faults == 2
    got = kern.reap()
    st = [int(e["status"]) for e, _ in got]
    assert st == [0, NIC_STATUS_DMA_FAULT, NIC_STATUS_DMA_FAULT, 0]
    for e, f in got[1:3]:
        assert (int(e["flags"]), int(e["hdr_len"]), int(e["data_len"])) == (0, 0, 0)
        assert int(e["nr_frags"]) == 1 and f == b""  # the buffer comes back to the kernel
    assert got[0][1] == expect(fr)[0] and got[3][1] == expect(fr)[3]
    changed = np.flatnonzero(kern.av != before)
    assert changed.min() >= 0 and changed.max() < 4096 + 4096  # only the two good buffers
    assert (kern.av[kern.area.size - 100:] == 0xAA).all()
    assert c(kern.stats, "rx_iommu_fault") == 2 and c(kern.stats, "rx_dropped") == 2
    assert c(kern.stats, "rx_packets") == 2 and c(kern.stats, "rx_frags") == 4


def test_unmapped_region_faults(kern: Kernel) -> None:
    fr = frames_of(builder(), [1000, 1000])
    kern.post(2)
    kern.iommu.dma_unmap(kern.amap)
    assert kern.dq.place(fr) == (2, 0, False, False)
    assert [int(e["status"]) for e, _ in kern.reap()] == [NIC_STATUS_DMA_FAULT] * 2


@pytest.mark.parametrize("kern", [{"mtu": 9000, "ring": 16}], indirect=True)
def test_unequal_buffer_lengths_fill_each_to_min_len_remaining(kern: Kernel) -> None:
    fr = frames_of(builder(mtu=9000), [3000, 5000, 100])
    bufs = [(kern.amap, i * 4096, ln) for i, ln in enumerate([1000, 2500, 4096, 512, 3000])]
    kern.post_raw(bufs)
    res = kern.dq.place(fr)
    assert res.consumed == 2 and res.starved  # frame 3 needs a 6th buffer
    kern.post_raw([(kern.amap, 10 * 4096, 4096)])
    assert kern.dq.place(fr, slice(2, 3)).consumed == 1
    got = kern.reap()
    assert [f for _, f in got] == expect(fr)
    assert [int(e["nr_frags"]) for e, _ in got] == [2, 3, 1]
    assert pattern.verify(SPORT, 1000, kern.av[4096:4096 + 2000]) == -1
    assert kern.av[4096 + 2000:4096 + 2500].max() == 0  # 2nd buffer filled to 2000 only


def test_hostile_kernel_input_is_survived(kern: Kernel) -> None:
    fr = frames_of(builder(), [1000, 1000, 10])
    # zero-length descriptors are consumed as empty frags, the rest still lands right
    kern.post_raw([(kern.amap, 0, 0), (kern.amap, 4096, 600), (kern.amap, 8192, 0),
                   (kern.amap, 12288, 4096), (kern.amap, 16384, 4096), (kern.amap, 20480, 64)])
    assert kern.dq.place(fr).consumed == 3
    got = kern.reap()
    assert [f for _, f in got] == expect(fr)
    assert [int(e["nr_frags"]) for e, _ in got] == [4, 1, 1]  # 0 + 600 + 0 + 400 bytes
    # a scribbled fill tail is clamped to one ring's worth and counted, never raised
    fill_tail = kern.layout.fill.tail // 4
    words = kern.qreg.array(np.uint32)
    words[fill_tail] = (int(words[fill_tail]) + 100_000) & 0xFFFFFFFF
    res = kern.dq.place(frames_of(builder(), [100] * 4))
    assert res.consumed <= 4 and kern.dq.fill.faults >= 1


def test_interrupt_raised_only_when_armed(kern: Kernel) -> None:
    kern.post(8)
    fr = frames_of(builder(), [100, 100])
    assert kern.dq.place(fr).irq is False
    kern.comp.set_need_wakeup()  # the kernel arms the interrupt before sleeping
    assert kern.dq.place(fr).irq is True
    assert kern.comp.flags & 1 == 0  # the NIC cleared it
    assert kern.dq.place(fr).irq is False
    assert c(kern.stats, "rx_irq") == 1


def test_coalescing_fires_on_rx_frames_or_rx_usecs(kern: Kernel) -> None:
    now = [1_000_000_000]
    kern.dq.clock = lambda: now[0]
    kern.dq.coalesce = Coalesce(rx_usecs=100, rx_frames=3)
    kern.post(16)
    one = frames_of(builder(), [100])
    kern.comp.set_need_wakeup()
    assert kern.dq.place(one).irq is False  # 1 pending
    assert kern.dq.place(one).irq is False  # 2 pending
    assert kern.dq.irq_pending == 2 and kern.dq.irq_due() is False
    assert kern.dq.place(one).irq is True  # rx-frames reached
    assert kern.comp.flags & 1 == 0 and kern.dq.irq_pending == 0
    # the timer: one completion, then rx-usecs pass without another frame
    kern.comp.set_need_wakeup()
    assert kern.dq.place(one).irq is False
    now[0] += 99_000
    assert kern.dq.irq_due() is False
    now[0] += 1_000
    assert kern.dq.irq_due() is True and kern.comp.flags & 1 == 0
    assert c(kern.stats, "rx_irq") == 2
    # completions the kernel polled by itself meanwhile are not signalled
    kern.comp.set_need_wakeup()
    assert kern.dq.place(one).irq is False
    kern.reap()
    now[0] += 1_000_000
    assert kern.dq.irq_due() is False and kern.comp.flags & 1 == 1
    assert c(kern.stats, "rx_irq") == 2


def test_coalescing_rx_usecs_zero_fires_at_once_and_unarmed_counts_nothing(kern: Kernel
                                                                           ) -> None:
    kern.dq.coalesce = Coalesce(rx_usecs=0, rx_frames=64)
    kern.post(8)
    one = frames_of(builder(), [100])
    assert kern.dq.place(one).irq is False and kern.dq.irq_pending == 0
    kern.comp.set_need_wakeup()
    assert kern.dq.place(one).irq is True


def test_adaptive_rx_picks_a_profile_by_rate(kern: Kernel) -> None:
    now = [1_000_000_000]
    kern.dq.clock = lambda: now[0]
    kern.dq.coalesce = Coalesce(rx_usecs=0, rx_frames=1, adaptive_rx=True)

    def burst(batches: int) -> None:
        for _ in range(batches):
            kern.post(8)
            assert kern.dq.place(frames_of(builder(), [100] * 8)).consumed == 8
            kern.reap()

    assert kern.dq.moderation() == ADAPTIVE_PROFILES[0][1:]
    burst(1)  # opens the first window
    burst(10)
    now[0] += ADAPTIVE_WINDOW_NS
    burst(1)  # 88 completions in 1 ms: 88k/s
    assert kern.dq.moderation() == ADAPTIVE_PROFILES[1][1:]
    burst(40)
    now[0] += ADAPTIVE_WINDOW_NS
    burst(1)  # 328k/s
    assert kern.dq.moderation() == ADAPTIVE_PROFILES[2][1:]
    now[0] += ADAPTIVE_WINDOW_NS
    burst(1)  # 8k/s: back to interrupting at once
    assert kern.dq.moderation() == ADAPTIVE_PROFILES[0][1:]
    kern.dq.coalesce.adaptive_rx = False  # off: the netdev's own settings again
    assert kern.dq.moderation() == (0, 1)


@pytest.mark.parametrize("kern", [{"mtu": 9000, "ring": 16}], indirect=True)
def test_long_stream_wraps_rings_and_seq(kern: Kernel) -> None:
    b = builder(mtu=9000)
    lens = [8960] * 7 + [4096] * 9 + [100, 8000, 4096, 1] * 3
    frames = [frames_of(b, lens[i:i + 5], start=sum(lens[:i])) for i in range(0, len(lens), 5)]
    want = [x for fr in frames for x in expect(fr)]
    got = []
    for fr in frames:
        pos = 0
        while pos < len(fr):
            kern.post(16)
            res = kern.dq.place(fr, slice(pos, len(fr)))
            pos += res.consumed
            got += kern.reap()
    assert [f for _, f in got] == want
    assert kern.dq.fill.head > 16 and kern.comp.head > 16  # both rings wrapped


@pytest.mark.parametrize("kern", [{"mtu": 9000, "ring": 32, "nbufs": 128}], indirect=True)
def test_uniform_fast_path_matches_general_path(kern: Kernel, run_id: str) -> None:
    other = Kernel(run_id + "b", mtu=9000, ring=32, nbufs=128)
    try:
        b = builder(mtu=9000, batch=32)
        for seg, n in ((8960, 10), (4096, 12), (300, 12)):
            fr = frames_of(b, [seg] * n, start=seg * 1000)
            assert fr.uniform is not None
            slow = dataclasses.replace(fr, uniform=None)
            for k, f in ((kern, fr), (other, slow)):
                k.post(32)
                assert k.dq.place(f, slice(0, n), 9).consumed == n
            a, z = kern.reap(), other.reap()
            assert [x[1] for x in a] == [x[1] for x in z] == expect(fr)
            ca = np.array([x[0] for x in a], abi.nic_rx_cqe)
            cz = np.array([x[0] for x in z], abi.nic_rx_cqe)
            ca["tstamp_ns"] = cz["tstamp_ns"] = 0
            assert ca.tobytes() == cz.tobytes()
        assert (kern.stats == other.stats).all()
    finally:
        other.close()


@pytest.mark.parametrize("kern", [{"slot": 128, "thresh": 500}], indirect=True)
def test_frame_longer_than_a_header_slot_is_dropped_with_an_error_completion(
        kern: Kernel) -> None:
    fr = frames_of(builder(), [20, 400, 1000])
    kern.post(4)
    assert kern.dq.place(fr) == (3, 2, False, False)
    got = kern.reap()
    assert int(got[1][0]["status"]) == abi.NIC_STATUS_TRUNCATED
    assert got[0][1] == expect(fr, kern.cfg)[0] and got[2][1] == expect(fr, kern.cfg)[2]
    assert c(kern.stats, "rx_dropped") == 1


def test_ipv6_frames(kern: Kernel) -> None:
    b = builder(family=6)
    fr = frames_of(b, [4016, 10])
    kern.post(4)
    assert kern.dq.place(fr).consumed == 2
    got = kern.reap()
    assert [f for _, f in got] == expect(fr)
    assert int(got[0][0]["hdr_len"]) == 74 and int(got[0][0]["payload_off"]) == 74


# -------------------------------------------------------------------------------- IOMMU


def test_iommu_map_translate_unmap(run_id: str) -> None:
    io = Iommu()
    with Region.create(region_name(run_id, "kernel", "a"), 8192) as a, \
            Region.create(region_name(run_id, "app1", "b"), 4096) as b:
        ma = io.dma_map(a.name, 8192)
        mb = io.dma_map(b.name, 1000)  # only part of the region is mapped
        assert (ma, mb) == (1, 2) and len(io) == 2
        iova = [abi.make_iova(ma, 0), abi.make_iova(ma, 4096), abi.make_iova(mb, 0),
                abi.make_iova(mb, 900), abi.make_iova(9, 0), abi.make_iova(0, 0),
                abi.make_iova(1 << 23, 0)]
        mid, off, ok = io.translate(np.array(iova, np.uint64), [4096, 4096, 1000, 101, 1, 1, 1])
        assert ok.tolist() == [True, True, True, False, False, False, False]
        assert mid[:3].tolist() == [ma, ma, mb] and off[:3].tolist() == [0, 4096, 0]
        assert io.faults == 4
        m = io.get(mb)
        io.dma_unmap(mb)
        # faults at once; the region is detached by the next reap (after the NIC answered)
        assert not io.translate(np.array(iova[2:3], np.uint64), [1])[2][0]
        assert io.retired == [m] and m.region.buf is not None and len(m.view) == 0
        assert io.reap() == 1 and io.retired == [] and m.region.buf is None
        with pytest.raises(Misuse) as ei:
            io.dma_unmap(mb)
        assert ei.value.errno == errno.ENOENT
        assert io.dma_map(b.name, 4096) == 3  # ids are not reused at once
        io.unmap_all()
        assert len(io) == 0


def test_iommu_rejects_bad_maps(run_id: str) -> None:
    io = Iommu()
    with pytest.raises(Misuse) as ei:
        io.dma_map(region_name(run_id, "kernel", "missing"), 4096)
    assert ei.value.errno == errno.ENOENT
    with Region.create(region_name(run_id, "kernel", "a"), 4096) as a:
        for size in (0, -1, 8192):
            with pytest.raises(Misuse) as ei:
                io.dma_map(a.name, size)
            assert ei.value.errno == errno.EINVAL
    assert len(io) == 0


def test_window_writes_rows_at_any_byte_offset(run_id: str) -> None:
    io = Iommu()
    with Region.create(region_name(run_id, "kernel", "a"), 4096) as a:
        m = io.get(io.dma_map(a.name, 4096))
        win = m.window(100)
        win[np.array([3, 1000, 3996])] = np.arange(300, dtype=np.uint8).reshape(3, 100)
        v = a.array()
        assert v[3:103].tolist() == list(range(100))
        assert v[3996:4096].tolist() == [x % 256 for x in range(200, 300)]
        io.unmap_all()
