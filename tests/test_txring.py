"""The TX seam: the kernel's TX ring (shared.txring) drained by the NIC into a TxSink.

In-process: a kernel-owned region with a :class:`TxProducer`, a :class:`Nic` that maps and
attaches it (``tx_start``), frames byte-checked at the sink, the netdev counters, the
doorbell flag, and a source that is also a sink taking over the netdev's transmit side.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator

import numpy as np
import pytest

from nic_proc.device import Nic
from nic_proc.sources import RawSource, WireInfo
from nic_proc.tx import DiscardSink, TxSink
from shared.errors import Misuse
from shared.nicif import QC, NetdevSpec
from shared.shm import Region, region_name
from shared.txring import TxBatch, TxLayout, TxProducer, tx_region_object, tx_slot_size


class Recorder:
    """A sink keeping copies of what it is given; refuses past ``room`` frames."""

    def __init__(self, room: int = 1 << 30) -> None:
        self.frames: list[bytes] = []
        self.room = room

    def transmit(self, batch: TxBatch) -> int:
        take = min(len(batch), self.room - len(self.frames))
        self.frames.extend(batch.frames()[:take])
        return take


class PortSource(RawSource):
    """A source that is also a sink (what a TAP port is)."""

    kind = "port"

    def __init__(self, source_id: int, info: WireInfo) -> None:
        super().__init__(source_id, info, [])
        self.sent: list[bytes] = []

    def transmit(self, batch: TxBatch) -> int:
        self.sent.extend(batch.frames())
        return len(batch)


@pytest.fixture
def ring(run_id: str) -> Iterator[tuple[Nic, TxProducer, Region]]:
    nic = Nic([NetdevSpec("eth0", queues=1, rx=16, mtu=1500)])
    layout = TxLayout(8, tx_slot_size(1500))
    region = Region.create(region_name(run_id, "kernel", tx_region_object("eth0")), layout.size)
    assert region.buf is not None
    prod = TxProducer(region.buf, layout, init=True, max_frame=1514)
    mid = nic.dma_map(region.name, layout.size)
    nic.tx_start("eth0", mid, layout.ring_size, layout.slot_size)
    yield nic, prod, region
    nic.close()
    prod.detach()
    region.close()


def _frame(i: int, n: int) -> bytes:
    return bytes((i + k) & 0xFF for k in range(n))


def stat(nic: Nic, name: str) -> int:
    return int(nic.dev("eth0").stats[0, QC[name]])


def test_frames_reach_the_sink_byte_exact_and_are_counted(
        ring: tuple[Nic, TxProducer, Region]) -> None:
    nic, prod, _ = ring
    rec = Recorder()
    nic.dev("eth0").tx_sink = rec
    frames = [_frame(i, 60 + 97 * i) for i in range(13)]  # more than the ring: wraps
    assert prod.send(frames[:8]) == 8
    assert prod.send(frames[8:]) == 0 and prod.dropped == 5  # ring full: dropped, counted
    assert nic.step()
    assert prod.send(frames[8:]) == 5
    assert nic.step()
    assert rec.frames == frames
    assert stat(nic, "tx_packets") == 13
    assert stat(nic, "tx_bytes") == sum(len(f) for f in frames)
    assert stat(nic, "tx_dropped") == 0
    stats = dict(nic.ethtool("eth0", {"cmd": "stats-get"})["stats"])
    assert stats["tx_packets"] == 13 and "rx-0.tx_packets" not in stats


def test_small_and_large_batches_cross_the_wrap_byte_exact(run_id: str) -> None:
    """A few frames are stored one by one, a batch by a gather per length: both paths, across
    the ring's wrap, deliver every frame intact and in order."""
    nic = Nic([NetdevSpec("eth0", queues=1, rx=16, mtu=1500)])
    layout = TxLayout(32, tx_slot_size(1500))
    region = Region.create(region_name(run_id, "kernel", tx_region_object("eth0")), layout.size)
    try:
        assert region.buf is not None
        prod = TxProducer(region.buf, layout, init=True, max_frame=1514)
        nic.tx_start("eth0", nic.dma_map(region.name, layout.size), 32, layout.slot_size)
        rec = Recorder()
        nic.dev("eth0").tx_sink = rec
        sent: list[bytes] = []
        i = 0
        for k in (3, 20, 7, 5, 30, 2, 8, 9):  # the wrap falls inside batches of both kinds
            frames = [_frame(i + j, 60 + (37 * (i + j)) % 1400) for j in range(k)]
            i += k
            assert prod.send(frames) == k
            sent += frames
            assert nic.step()
        assert rec.frames == sent and prod.dropped == 0
        assert stat(nic, "tx_bytes") == sum(map(len, sent))
        nic.close()
        prod.detach()
    finally:
        region.close()


def test_a_refusing_sink_counts_tx_dropped_and_a_long_frame_never_enters(
        ring: tuple[Nic, TxProducer, Region]) -> None:
    nic, prod, _ = ring
    rec = Recorder(room=2)
    nic.dev("eth0").tx_sink = rec
    assert prod.send([_frame(0, 60), b"x" * 1515, _frame(1, 60), _frame(2, 60)]) == 3
    assert prod.dropped == 1  # 1515 > MTU + 14
    nic.step()
    assert len(rec.frames) == 2
    assert stat(nic, "tx_packets") == 2 and stat(nic, "tx_dropped") == 1


def test_a_bad_length_in_a_slot_is_dropped_not_read_past_the_slot(
        ring: tuple[Nic, TxProducer, Region]) -> None:
    nic, prod, _ = ring
    rec = Recorder()
    nic.dev("eth0").tx_sink = rec
    prod.send([_frame(0, 60), _frame(1, 61)])
    prod.ring.ring["len"][0] = 65535  # a scribbled length
    nic.step()
    assert rec.frames == [_frame(1, 61)]
    assert stat(nic, "tx_dropped") == 1 and stat(nic, "tx_packets") == 1


def test_doorbell_only_when_the_nic_sleeps(ring: tuple[Nic, TxProducer, Region]) -> None:
    nic, prod, _ = ring
    prod.send([_frame(0, 60)])
    assert not prod.doorbell_due()  # the NIC is awake: no event
    assert nic.tx_arm()  # frames wait: the NIC stays awake
    nic.step()
    assert not nic.tx_arm()  # empty: need-wakeup set
    prod.send([_frame(1, 60)])
    assert prod.doorbell_due() and not prod.doorbell_due()  # once
    nic.tx_doorbell("eth0")
    assert nic.step() and stat(nic, "tx_packets") == 2


def test_a_source_that_is_a_sink_becomes_the_port_until_stopped(
        ring: tuple[Nic, TxProducer, Region]) -> None:
    nic, prod, _ = ring
    d = nic.dev("eth0")
    assert isinstance(d.tx_sink, DiscardSink)
    src = nic.add_source(lambda sid: PortSource(sid, d.info))
    assert isinstance(src, TxSink) and d.tx_sink is src
    with pytest.raises(Misuse) as e:
        nic.add_source(lambda sid: PortSource(sid, d.info))
    assert e.value.errno == errno.EBUSY
    prod.send([_frame(3, 70)])
    nic.step()
    assert isinstance(src, PortSource) and src.sent == [_frame(3, 70)]
    nic.source_stop(src.id)
    assert isinstance(d.tx_sink, DiscardSink)


def test_tx_start_validates_and_the_map_stays_busy(
        ring: tuple[Nic, TxProducer, Region]) -> None:
    nic, _, region = ring
    d = nic.dev("eth0")
    with pytest.raises(Misuse) as e:
        nic.tx_start("eth0", d.tx_map_id, 8, tx_slot_size(1500))
    assert e.value.errno == errno.EBUSY
    with pytest.raises(Misuse) as e:
        nic.dma_unmap(d.tx_map_id)
    assert e.value.errno == errno.EBUSY
    nic.tx_stop("eth0")
    mid = nic.dma_map(region.name, region.size)
    for args in ((6, tx_slot_size(1500)), (8, 64), (1 << 20, tx_slot_size(1500))):
        with pytest.raises(Misuse) as e:
            nic.tx_start("eth0", mid, *args)
        assert e.value.errno == errno.EINVAL
    assert np.all(d.stats[1:, QC["tx_packets"]] == 0)
