"""The NIC device (nic_proc.device) and the NIC process (python -m nic_proc).

The first half drives :class:`Nic` in-process: admin operations and their errnos,
ethtool, steering to queues, pause on/off, stopped queues, the raw-frame path.  The
second half starts the real process and plays the kernel over the control plane and
shared memory: map regions, start queues, post buffers, run a generator and a wire
gateway, verify every payload byte, stop, and check the process leaves nothing behind.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest

from nic_proc.device import Nic
from nic_proc.sources import RawSource
from shared import abi, pattern, wire
from shared.control import ControlClient, EventReceiver, EventSender, ipc_endpoint
from shared.errors import Misuse, Timeout
from shared.msg import ControlError
from shared.nicif import QC, NetdevSpec, QueueLayout, stats_block_shape
from shared.ring import RingConsumer, RingProducer
from shared.shm import Region, list_run_segments, region_name

BUF = 4096


class Area:
    """An app's area, split into BUF-byte buffers."""

    def __init__(self, run_id: str, nbufs: int, map_fn: Any) -> None:
        self.region = Region.create(region_name(run_id, "app1", "area0"), nbufs * BUF)
        self.map_id = map_fn(self.region.name, self.region.size)
        self.view = self.region.array()
        self.free = deque(range(nbufs))


class KQueue:
    """The kernel side of one RX queue: region, fill producer, completion consumer."""

    def __init__(self, run_id: str, dev: str, q: int, ring: int, slot: int, area: Area,
                 map_fn: Any) -> None:
        self.q = q
        self.layout = QueueLayout(ring, slot)
        self.region = Region.create(region_name(run_id, "kernel", f"{dev}.q{q}"),
                                    self.layout.size)
        self.map_id = map_fn(self.region.name, self.layout.size)
        self.fill = RingProducer(self.region.buf, self.layout.fill)
        self.comp = RingConsumer(self.region.buf, self.layout.comp)
        self.slots = self.layout.hdr_slots(self.region.buf)
        self.area = area
        self.posted: deque[int] = deque()
        self.completions = 0

    def post(self) -> int:
        k = min(self.fill.space(), len(self.area.free))
        if k == 0:
            return 0
        ids = np.array([self.area.free.popleft() for _ in range(k)])
        d = np.zeros(k, abi.nic_rx_desc)
        d["iova"] = (np.uint64(self.area.map_id) << np.uint64(40)) + ids.astype(np.uint64) * BUF
        d["len"] = BUF
        d["buf_id"] = ids
        self.fill.push(d)
        self.posted.extend(ids.tolist())
        return k

    def reap(self) -> list[tuple[np.void, bytes]]:
        out = []
        for e in self.comp.pop(self.comp.nentries):
            self.completions += 1
            bufs = [self.posted.popleft() for _ in range(int(e["nr_frags"]))]
            slot = self.slots[int(e["hdr_slot"])]
            frame = slot[: int(e["hdr_len"])].tobytes()
            if e["flags"] & abi.NIC_CQE_F_SPLIT:
                rem = int(e["data_len"])
                for b in bufs:
                    take = min(BUF, rem)
                    frame += self.area.view[b * BUF:b * BUF + take].tobytes()
                    rem -= take
            self.area.free.extend(bufs)
            out.append((e, frame))
        return out

    def close(self) -> None:
        self.fill.detach()
        self.comp.detach()
        self.slots = np.empty((0, 0), np.uint8)
        self.region.close()


class Streams:
    """TCP receive in miniature: per (sport, dport) in-order bytes, SYN/FIN/RST seen."""

    def __init__(self, mtu: int = 4096) -> None:
        self.mtu = mtu
        self.isn: dict[tuple[int, int], int] = {}
        self.data: dict[tuple[int, int], bytearray] = {}
        self.fin: set[tuple[int, int]] = set()
        self.queue: dict[tuple[int, int], int] = {}

    def take(self, q: int, got: list[tuple[np.void, bytes]]) -> None:
        frames = [f for e, f in got if int(e["status"]) == 0]
        if not frames:
            return
        lens = [len(f) for f in frames]
        res = wire.parse_frames(b"".join(frames), np.cumsum([0, *lens])[:-1], lens, self.mtu)
        assert (res["status"] == 0).all()
        for r, f in zip(res, frames, strict=True):
            key = (int(r["sport"]), int(r["dport"]))
            assert self.queue.setdefault(key, q) == q, "a flow moved between queues"
            flags, seq = int(r["tcp_flags"]), int(r["seq"])
            if flags & wire.TCP_SYN:
                assert key not in self.isn
                self.isn[key] = seq
                self.data[key] = bytearray()
                continue
            data = self.data[key]
            assert seq == (self.isn[key] + 1 + len(data)) % 2**32
            po, pl = int(r["payload_off"]), int(r["payload_len"])
            data += f[po:po + pl]
            if flags & (wire.TCP_FIN | wire.TCP_RST):
                self.fin.add(key)


# ------------------------------------------------------------------ the device, in process


NicFixture = tuple[Nic, list[Any]]


@pytest.fixture
def nic(run_id: str) -> Iterator[NicFixture]:
    n = Nic([NetdevSpec.parse("eth0:queues=2,rx=16")])
    regions: list[Any] = []
    yield n, regions
    n.close()
    for r in regions:
        r.close()


def setup_queues(n: Nic, run_id: str, regions: list[Any], queues: list[int],
                 nbufs: int = 96) -> tuple[Area, dict[int, KQueue]]:
    d = n.dev("eth0")
    area = Area(run_id, nbufs, n.dma_map)
    regions.append(area.region)
    qs = {}
    for q in queues:
        kq = KQueue(run_id, "eth0", q, d.spec.rx, d.min_slot_size, area, n.dma_map)
        regions.insert(0, kq)
        n.queue_start("eth0", q, kq.map_id, d.spec.rx, d.min_slot_size)
        qs[q] = kq
    return area, qs


def pump(n: Nic, qs: dict[int, KQueue], streams: Streams, until: Any, post: Any = None,
         limit: int = 20_000) -> None:
    for _ in range(limit):
        for q, kq in qs.items():
            if post is None or post(q):
                kq.post()
            n.step()
            streams.take(q, kq.reap())
        if until():
            return
    raise AssertionError("traffic did not finish")


def stat(n: Nic, q: int, name: str) -> int:
    return int(n.dev("eth0").stats[q, QC[name]])


def test_queue_start_validates_and_dma_unmap_refuses_a_started_queue(
        nic: NicFixture, run_id: str) -> None:
    n, regions = nic
    d = n.dev("eth0")
    lay = QueueLayout(16, d.min_slot_size)
    r = Region.create(region_name(run_id, "kernel", "eth0.q0"), lay.size)
    regions.append(r)
    mid = n.dma_map(r.name, lay.size)
    small = n.dma_map(r.name, lay.size - 4096)
    cases = [
        (("eth9", 0, mid, 16, lay.slot_size), errno.ENODEV),
        (("eth0", 2, mid, 16, lay.slot_size), errno.ERANGE),  # only 2 queues
        (("eth0", 0, mid, 24, lay.slot_size), errno.EINVAL),  # not a power of two
        (("eth0", 0, mid, 8192, lay.slot_size), errno.EINVAL),  # over max_rx
        (("eth0", 0, mid, 16, 128), errno.EINVAL),  # slot cannot hold a frame
        (("eth0", 0, small, 16, lay.slot_size), errno.EINVAL),  # mapping too small
        (("eth0", 0, 99, 16, lay.slot_size), errno.ENOENT),
    ]
    for args, want in cases:
        with pytest.raises(Misuse) as ei:
            n.queue_start(*args)
        assert ei.value.errno == want, args
    n.queue_start("eth0", 0, mid, 16, lay.slot_size)
    with pytest.raises(Misuse) as ei:
        n.queue_start("eth0", 0, mid, 16, lay.slot_size)
    assert ei.value.errno == errno.EBUSY
    with pytest.raises(Misuse) as ei:
        n.dma_unmap(mid)
    assert ei.value.errno == errno.EBUSY
    assert n.probe()[0]["started"] == [0]
    assert n.queue_stop("eth0", 0) == 0
    assert n.queue_stop("eth0", 0) == 0  # idempotent
    n.dma_unmap(mid)


def test_ethtool_channels_rings_and_stats(nic: NicFixture, run_id: str) -> None:
    n, regions = nic
    ch = n.ethtool("eth0", {"cmd": "channels-get", "dev": "eth0"})
    assert (ch["combined_count"], ch["combined_max"], ch["rx_max"]) == (2, 64, 0)
    rings = n.ethtool("eth0", {"cmd": "rings-get"})
    assert (rings["rx"], rings["rx_max"], rings["tcp_data_split"], rings["hds_thresh"]) == (
        16, 4096, "on", 0)
    _, _qs = setup_queues(n, run_id, regions, [0, 1])
    with pytest.raises(Misuse) as ei:  # queue 1 is started
        n.ethtool("eth0", {"cmd": "channels-set", "combined": 1})
    assert ei.value.errno == errno.EBUSY
    with pytest.raises(Misuse) as ei:  # ring size change with started queues
        n.ethtool("eth0", {"cmd": "rings-set", "rx": 64})
    assert ei.value.errno == errno.EBUSY
    for bad, want in (({"hds_thresh": 5000}, errno.EINVAL), ({"rx_buf_len": 3000}, errno.EINVAL),
                      ({"cqe_size": 64}, errno.EOPNOTSUPP), ({"rx_jumbo": 8}, errno.EINVAL)):
        with pytest.raises(Misuse) as ei:
            n.ethtool("eth0", {"cmd": "rings-set", **bad})
        assert ei.value.errno == want
    n.ethtool("eth0", {"cmd": "rings-set", "hds_thresh": 64, "rx_buf_len": 8192})
    assert n.probe()[0]["hds_thresh"] == 64 and n.probe()[0]["rx_buf_len"] == 8192
    n.queue_stop("eth0", 1)
    n.ethtool("eth0", {"cmd": "channels-set", "combined": 1})
    assert n.dev("eth0").n_queues == 1
    with pytest.raises(Misuse) as ei:
        n.ethtool("eth0", {"cmd": "channels-set", "rx": 2})
    assert ei.value.errno == errno.EINVAL
    stats = dict(n.ethtool("eth0", {"cmd": "stats-get"})["stats"])
    assert "rx_packets" in stats and "rx-0.hds_split" in stats and "rx-1.packets" not in stats
    with pytest.raises(Misuse) as ei:
        n.ethtool("eth0", {"cmd": "bogus"})
    assert ei.value.errno == errno.EOPNOTSUPP


def test_rss_spreads_flows_and_every_byte_arrives(nic: NicFixture, run_id: str) -> None:
    n, regions = nic
    _, qs = setup_queues(n, run_id, regions, [0, 1])
    sid = n.add_traffic("eth0", {"dport": 9000, "flows": 8, "bytes": 30_000, "batch": 32})
    st = Streams()
    pump(n, qs, st, lambda: len(st.fin) == 8)
    assert n.sources[sid].done
    assert {q for q in st.queue.values()} == {0, 1}
    for (sp, _), data in st.data.items():
        assert len(data) == 30_000 and pattern.verify(sp, 0, data) == -1
    total = sum(kq.completions for kq in qs.values())
    assert total == stat(n, 0, "rx_packets") + stat(n, 1, "rx_packets")
    assert sum(stat(n, q, "rx_dropped") for q in (0, 1)) == 0


def test_ntuple_rule_steers_and_a_starved_queue_pauses_only_its_flows(
        nic: NicFixture, run_id: str) -> None:
    n, regions = nic
    _, qs = setup_queues(n, run_id, regions, [0, 1])
    # every flow to queue 0, except the first one to queue 1
    n.ethtool("eth0", {"cmd": "rss-set", "context": 0, "equal": 1})
    sport0 = 20000 + 1024 * 1
    n.ethtool("eth0", {"cmd": "ntuple-add", "flow_type": "tcp4", "src_port": sport0,
                       "action": 1})
    n.add_traffic("eth0", {"dport": 9000, "flows": 3, "bytes": 100_000})  # > 16 buffers
    st = Streams()
    starve_1 = [True]
    # queue 1 gets no buffers after its first fill: its flow pauses, the others finish
    pump(n, qs, st, lambda: len(st.fin) == 2, post=lambda q: q == 0 or not starve_1[0]
         or qs[1].completions == 0)
    assert (sport0, 9000) not in st.fin and st.queue[(sport0, 9000)] == 1
    assert n.dev("eth0").waiting[1] and qs[1].fill.needs_wakeup()
    assert stat(n, 1, "rx_pause") >= 1 and stat(n, 1, "rx_dropped") == 0
    starve_1[0] = False
    qs[1].post()
    assert n.doorbell("eth0", 1) is True  # what the kernel's nic.doorbell does
    assert not qs[1].fill.needs_wakeup()
    pump(n, qs, st, lambda: len(st.fin) == 3)
    for (sp, _), data in st.data.items():
        assert len(data) == 100_000 and pattern.verify(sp, 0, data) == -1


@pytest.mark.parametrize("mtu", [1500, 9000])
def test_mtus_and_a_second_netdev(run_id: str, mtu: int) -> None:
    n = Nic([NetdevSpec.parse("eth0:queues=1,rx=16"),
             NetdevSpec.parse(f"eth1:queues=1,rx=16,mtu={mtu},hds-thresh=200")])
    regions: list[Any] = []
    try:
        d = n.dev("eth1")
        assert d.min_slot_size == -(-(mtu + 14) // 64) * 64
        assert [p["name"] for p in n.probe()] == ["eth0", "eth1"]
        assert n.probe()[1]["stats_index"] == 1 and n.probe()[1]["addr"] == "10.0.1.1"
        area = Area(run_id, 64, n.dma_map)
        regions.append(area.region)
        kq = KQueue(run_id, "eth1", 0, 16, d.min_slot_size, area, n.dma_map)
        regions.insert(0, kq)
        n.queue_start("eth1", 0, kq.map_id, 16, d.min_slot_size)
        n.add_traffic("eth1", {"dport": 80, "flows": 2, "bytes": 60_000})
        n.add_traffic("eth1", {"dport": 81, "bytes": 3000, "payload": 150})  # linear (<= 200)
        st = Streams(mtu)
        pump(n, {0: kq}, st, lambda: len(st.fin) == 3)
        for (sp, _), data in st.data.items():
            assert pattern.verify(sp, 0, data) == -1
        assert sorted(len(v) for v in st.data.values()) == [3000, 60_000, 60_000]
        full, last = divmod(60_000, wire.mss(4, mtu))
        split = 2 * (full + (last > 200))  # a last segment at or under hds-thresh is linear
        assert int(n.stats[1, 0, QC["rx_hds_split"]]) == split
        assert int(n.stats[0].sum()) == 0  # eth0 saw nothing
    finally:
        n.close()
        for r in regions:
            r.close()


def test_netdev_spec_syntax() -> None:
    s = NetdevSpec.parse("eth2:queues=8,max-queues=16,rx=1024,mtu=9000,tcp-data-split=off,"
                         "hds_thresh=10,link=down,pause=off,addr=192.168.5.1")
    assert (s.name, s.queues, s.max_queues, s.rx, s.mtu) == ("eth2", 8, 16, 1024, 9000)
    assert (s.tcp_data_split, s.hds_thresh, s.link, s.pause) == (False, 10, False, False)
    n = Nic([s])
    assert n.probe()[0]["addr"] == "192.168.5.1" and n.probe()[0]["link_up"] is False
    for bad in ("eth0:queues=0", "eth0:queues=65", "eth0:rx=500", "eth0:mtu=100",
                "eth0:colour=red", "eth0:queues", "bad.name", "eth0:link=sideways",
                "eth0:hds-thresh=2000", "eth0:rx_buf_len=1000"):
        with pytest.raises(Misuse):
            NetdevSpec.parse(bad)
    with pytest.raises(Misuse):
        Nic([NetdevSpec(), NetdevSpec()])  # duplicate names


def test_pause_off_drops_and_counts(run_id: str) -> None:
    n = Nic([NetdevSpec.parse("eth0:queues=1,rx=16,pause=off")])
    regions: list[Any] = []
    try:
        _, qs = setup_queues(n, run_id, regions, [0])
        qs[0].post()
        n.add_traffic("eth0", {"dport": 9000, "bytes": 200_000, "syn": False, "fin": False})
        while not all(s.done for s in n.sources.values()):
            n.step()
        got = qs[0].reap()
        assert len(got) == 16  # the posted buffers were filled, the rest dropped
        assert stat(n, 0, "rx_missed") == stat(n, 0, "rx_dropped") > 0
        assert stat(n, 0, "rx_missed") + 16 == -(-200_000 // 4056)
        assert stat(n, 0, "rx_pause") == 0
    finally:
        n.close()
        for r in regions:
            r.close()


def test_stopped_queue_drops_with_pause_off(run_id: str) -> None:
    n = Nic([NetdevSpec.parse("eth0:queues=2,rx=16,pause=off")])
    try:
        n.add_traffic("eth0", {"dport": 9000, "flows": 4, "bytes": 4056})
        while n.step():
            pass
        assert stat(n, 0, "rx_queue_stopped") + stat(n, 1, "rx_queue_stopped") == 4 * 3
        assert stat(n, 0, "rx_pause") + stat(n, 1, "rx_pause") == 0
    finally:
        n.close()


def test_stopped_queue_holds_flows_back_until_it_starts(nic: NicFixture, run_id: str) -> None:
    """Pause on: frames for a stopped queue (a queue restart: stop, then start) wait, and
    arrive once the queue is started and posted; nothing is dropped, and the NIC counts the
    queue as waiting (it need not spin meanwhile)."""
    n, regions = nic
    _, qs = setup_queues(n, run_id, regions, [0, 1])
    for q in (0, 1):
        n.queue_stop("eth0", q)
    assert n.starved
    n.add_traffic("eth0", {"dport": 9000, "flows": 4, "bytes": 4056})
    for _ in range(5):
        n.step()
    assert stat(n, 0, "rx_queue_stopped") + stat(n, 1, "rx_queue_stopped") == 0
    assert stat(n, 0, "rx_pause") + stat(n, 1, "rx_pause") > 0
    assert not all(s.done for s in n.sources.values())
    d = n.dev("eth0")
    for q, kq in qs.items():  # the restart's second half
        n.queue_start("eth0", q, kq.map_id, d.spec.rx, d.min_slot_size)
    for _ in range(20):
        for kq in qs.values():
            kq.post()
        n.step()
        if all(s.done for s in n.sources.values()):
            break
    got = [f for kq in qs.values() for _, f in kq.reap()]
    assert len(got) == 4 * 3  # SYN, one data segment, FIN per flow
    assert stat(n, 0, "rx_dropped") + stat(n, 1, "rx_dropped") == 0


def test_raw_frames_are_parsed(nic: NicFixture, run_id: str) -> None:
    n, regions = nic
    _, qs = setup_queues(n, run_id, regions, [0, 1])
    ok = [wire.FlowSpec.from_addresses(["10.0.0.9"], ["10.0.0.1"], [1234], [80])]
    buf = np.zeros((2, 200), np.uint8)
    ln = wire.build_frames(ok[0], buf, [0, 0], [0, 100], [100, 50])
    good = [buf[i, :ln[i]].tobytes() for i in range(2)]
    n.add_source(lambda sid: RawSource(sid, n.dev("eth0").info,
                                       [good[0], b"\x01" * 20, good[1] + bytes(5000)]))
    for kq in qs.values():
        kq.post()
    n.step()
    got = [f for kq in qs.values() for _, f in kq.reap()]
    assert got == [good[0]]  # the second good frame is oversize once padded
    assert stat(n, 0, "rx_bad_frame") == 1 and stat(n, 0, "rx_oversize") == 1


# --------------------------------------------------------------------------- the process


class NicRun:
    """A running ``python -m nic_proc`` and the kernel's sockets to it."""

    def __init__(self, run_id: str, rundir: Path, *netdevs: str) -> None:
        self.run_id = run_id
        self.rundir = rundir
        self.irqs = EventReceiver(ipc_endpoint(rundir, "kernel-events"))
        self.log = open(rundir / "nic.log", "wb")  # noqa: SIM115
        args = [sys.executable, "-m", "nic_proc", "--run", run_id, "--rundir", str(rundir)]
        for nd in netdevs:
            args += ["--netdev", nd]
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT)
        self.cli = ControlClient(ipc_endpoint(rundir, "nic"), timeout_ms=500)
        self.bell = EventSender(ipc_endpoint(rundir, "nic-events"))
        deadline = time.monotonic() + 30
        while True:
            assert self.proc.poll() is None, self.logtext()
            try:
                self.cli.ping()
                break
            except Timeout:
                assert time.monotonic() < deadline, "NIC did not come up"

    def call(self, t: str, **body: Any) -> dict[str, Any]:
        return self.cli.call(t, body, timeout_ms=5000)

    def map(self, name: str, size: int) -> int:
        return int(self.call("nic.dma_map", name=name, size=size)["map_id"])

    def logtext(self) -> str:
        return (self.rundir / "nic.log").read_text(errors="replace")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(10)
        finally:
            self.close()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.cli.close()
        self.bell.close()
        self.irqs.close()
        self.log.close()


@pytest.fixture
def nicrun(run_id: str, tmp_path: Path) -> Iterator[Callable[..., NicRun]]:
    runs: list[NicRun] = []

    def start(*netdevs: str) -> NicRun:
        r = NicRun(run_id, tmp_path, *netdevs)
        runs.append(r)
        return r

    yield start
    for r in runs:
        r.close()


@pytest.mark.timeout(90)
def test_process_generator_end_to_end(nicrun: Callable[..., NicRun], run_id: str) -> None:
    nr = nicrun("eth0:queues=2,rx=64,mtu=4096")
    regions: list[Any] = []
    try:
        probe = nr.call("nic.probe")
        dev = probe["netdevs"][0]
        assert (dev["name"], dev["queues"], dev["ring_size"], dev["mtu"]) == ("eth0", 2, 64, 4096)
        assert dev["tcp_data_split"] is True and dev["hds_thresh"] == 0 and dev["link_up"]
        assert probe["stats_region"] == region_name(run_id, "nic", "stats")
        stats_reg = Region.attach(probe["stats_region"])
        stats = stats_reg.array(np.int64, 0, int(np.prod(stats_block_shape()))).reshape(
            stats_block_shape())
        area = Area(run_id, 192, nr.map)
        regions.append(area.region)
        qs = {}
        for q in (0, 1):
            kq = KQueue(run_id, "eth0", q, 64, dev["min_slot_size"], area, nr.map)
            regions.insert(0, kq)
            nr.call("nic.queue_start", dev="eth0", queue=q, map_id=kq.map_id, ring_size=64,
                    slot_size=dev["min_slot_size"])
            qs[q] = kq
        qs[0].comp.set_need_wakeup()  # arm queue 0's interrupt
        for kq in qs.values():
            kq.post()
        flows, nbytes = 6, 150_000
        sid = nr.call("nic.traffic", dev="eth0",
                      spec={"dport": 9000, "flows": flows, "bytes": nbytes})["source"]
        st = Streams()
        irq = nr.irqs.recv(timeout_ms=10_000)
        assert irq is not None and irq.type == "irq" and irq.body == {"dev": "eth0", "queue": 0}
        deadline = time.monotonic() + 60
        while len(st.fin) < flows:
            assert time.monotonic() < deadline, nr.logtext()
            idle = True
            for q, kq in qs.items():
                got = kq.reap()
                if got:
                    idle = False
                    st.take(q, got)
                if kq.post() and kq.fill.needs_wakeup():
                    nr.bell.send("nic.doorbell", {"dev": "eth0", "queue": q})
            if idle:
                time.sleep(0.001)
        for (sp, _), data in st.data.items():
            assert len(data) == nbytes and pattern.verify(sp, 0, data) == -1
        prog = nr.call("nic.sources")["sources"]
        assert prog[0]["source"] == sid and prog[0]["done"] and prog[0]["bytes"] == flows * nbytes
        # counters: shm block == ethtool -S == what the kernel saw
        for q, kq in qs.items():
            assert int(stats[0, q, QC["rx_packets"]]) == kq.completions
        es = dict(nr.call("nic.ethtool", dev="eth0", request={"cmd": "stats-get"})["stats"])
        assert es["rx_packets"] == sum(kq.completions for kq in qs.values())
        assert es["rx_dropped"] == 0 and es["rx_irq"] >= 1
        for q, kq in qs.items():
            assert nr.call("nic.queue_stop", dev="eth0", queue=q)["completed"] == kq.completions
            nr.call("nic.dma_unmap", map_id=kq.map_id)
        nr.call("nic.dma_unmap", map_id=area.map_id)
        del stats
        stats_reg.detach()
        assert nr.stop() == 0
        assert list_run_segments(run_id) == sorted(
            [r.region.name for r in regions[:2]] + [area.region.name])
    finally:
        for r in regions:
            r.close()


@pytest.mark.timeout(60)
def test_process_wire_gateway_and_errors(nicrun: Callable[..., NicRun], run_id: str) -> None:
    nr = nicrun("eth0:queues=1,rx=32")
    regions: list[Any] = []
    try:
        dev = nr.call("nic.probe")["netdevs"][0]
        area = Area(run_id, 64, nr.map)
        regions.append(area.region)
        kq = KQueue(run_id, "eth0", 0, 32, dev["min_slot_size"], area, nr.map)
        regions.insert(0, kq)
        for body, want in (
            ({"dev": "eth1", "queue": 0, "map_id": kq.map_id}, errno.ENODEV),
            ({"dev": "eth0", "queue": 0, "map_id": 999}, errno.ENOENT),
            ({"dev": "eth0", "queue": 5, "map_id": kq.map_id}, errno.ERANGE),
        ):
            with pytest.raises(ControlError) as ei:
                nr.call("nic.queue_start", ring_size=32, slot_size=dev["min_slot_size"], **body)
            assert ei.value.errno == want
        with pytest.raises(ControlError) as ei:
            nr.call("nic.ethtool", dev="eth0", request={"cmd": "ntuple-delete"})  # no loc
        assert ei.value.errno == errno.EINVAL
        with pytest.raises(ControlError) as ei:
            nr.call("nic.dma_map", name=region_name(run_id, "app1", "nope"), size=4096)
        assert ei.value.errno == errno.ENOENT
        with pytest.raises(ControlError) as ei:
            nr.call("nic.queue_start", dev="eth0", queue=0, map_id=kq.map_id, ring_size=32,
                    slot_size=dev["min_slot_size"], unmap=["x"])
        assert ei.value.errno == errno.EINVAL
        # a restart's old page pool: unmapped by the start itself, one command
        old_pool = Region.create(region_name(run_id, "kernel", "oldpp"), 4096)
        regions.append(old_pool)
        old_id = nr.call("nic.dma_map", name=old_pool.name, size=4096)["map_id"]
        nr.call("nic.queue_start", dev="eth0", queue=0, map_id=kq.map_id, ring_size=32,
                slot_size=dev["min_slot_size"], unmap=[old_id])
        with pytest.raises(ControlError) as ei:
            nr.call("nic.dma_unmap", map_id=old_id)
        assert ei.value.errno == errno.ENOENT
        # a device's close: several unmaps in one command; each is tried, the first
        # failure reported
        ids = [nr.call("nic.dma_map", name=old_pool.name, size=4096)["map_id"]
               for _ in range(3)]
        with pytest.raises(ControlError) as ei:
            nr.call("nic.dma_unmap", map_id=ids[0], more=["x"])
        assert ei.value.errno == errno.EINVAL
        with pytest.raises(ControlError) as ei:
            nr.call("nic.dma_unmap", map_id=ids[0], more=[old_id, ids[1]])
        assert ei.value.errno == errno.ENOENT  # old_id is gone; ids[0] and ids[1] went
        nr.call("nic.dma_unmap", map_id=ids[2], more=[])
        for map_id in ids:
            with pytest.raises(ControlError) as ei:
                nr.call("nic.dma_unmap", map_id=map_id)
            assert ei.value.errno == errno.ENOENT
        kq.post()
        reply = nr.call("nic.wire", dev="eth0", port=0)
        port = reply["port"]
        payload = os.urandom(64 * 1024)
        with socket.create_connection(("127.0.0.1", port)) as s:
            cport = s.getsockname()[1]
            s.sendall(payload)
        st = Streams()
        deadline = time.monotonic() + 30
        while (cport, port) not in st.fin:
            assert time.monotonic() < deadline, nr.logtext()
            got = kq.reap()
            st.take(0, got)
            if kq.post() and kq.fill.needs_wakeup():
                nr.bell.send("nic.doorbell", {"dev": "eth0", "queue": 0})
            if not got:
                time.sleep(0.001)
        assert bytes(st.data[(cport, port)]) == payload
        prog = nr.call("nic.sources")["sources"][0]
        assert prog["kind"] == "wire" and prog["port"] == port and prog["bytes"] == len(payload)
        nr.call("nic.source_stop", source=reply["source"])
        with pytest.raises(ControlError) as ei:
            nr.call("nic.source_stop", source=reply["source"])
        assert ei.value.errno == errno.ENOENT
        # stopping the process with the queue still started and mapped: it cleans up itself
        assert nr.stop() == 0
        assert region_name(run_id, "nic", "stats") not in list_run_segments(run_id)
    finally:
        for r in regions:
            r.close()


@pytest.mark.timeout(60)
def test_process_exits_when_its_parent_dies(run_id: str, tmp_path: Path) -> None:
    launcher = subprocess.Popen(
        [sys.executable, "-c",
         "import subprocess, sys\n"
         "p = subprocess.Popen([sys.executable, '-m', 'nic_proc', '--run', sys.argv[1],"
         " '--rundir', sys.argv[2]])\n"
         "print(p.pid, flush=True)\n"
         "sys.stdin.read()\n", run_id, str(tmp_path)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert launcher.stdout is not None
        pid = int(launcher.stdout.readline())
        cli = ControlClient(ipc_endpoint(tmp_path, "nic"), timeout_ms=500)
        deadline = time.monotonic() + 30
        while True:
            try:
                cli.ping()
                break
            except Timeout:
                assert time.monotonic() < deadline
        cli.close()
        assert list_run_segments(run_id) == [region_name(run_id, "nic", "stats")]
        launcher.kill()
        launcher.wait(5)
        deadline = time.monotonic() + 10
        while psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < deadline, "the NIC outlived its parent"
            time.sleep(0.02)
        deadline = time.monotonic() + 5
        while list_run_segments(run_id):
            assert time.monotonic() < deadline, "the NIC left its stats region"
            time.sleep(0.02)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait(5)
