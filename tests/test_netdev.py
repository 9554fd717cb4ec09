"""The NIC driver against a fake NIC that keeps the shared/nicif contract byte for byte.

The fake NIC attaches the regions the driver maps, consumes posted descriptors in order,
"DMAs" payload into them by IOVA, writes headers (or whole frames) into header slots and
publishes completions; hooks let a test corrupt a completion or a slot.  No processes.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from driver_proc.netdev import NapiBatch, NetDevice
from driver_proc.page_pool import BufferSpace, MemoryProvider, PagePool
from driver_proc.skb import SkbStore
from driver_proc.tcp import SocketTable, flow_key
from shared import abi, nicif, pattern, wire
from shared.errors import InvariantBroken, Misuse, PeerMisbehaved
from shared.msg import ControlError
from shared.ring import RING_F_NEED_WAKEUP, RingConsumer, RingProducer
from shared.shm import Region, region_name
from shared.txring import TxConsumer, TxLayout

Mutate = Callable[[int, np.ndarray, np.ndarray], None]

INFO: dict[str, Any] = {
    "name": "eth0", "ifindex": 2, "mac": "02:00:00:00:00:01", "queues": 2, "max_queues": 4,
    "ring_size": 64, "max_ring_size": 1024, "mtu": 1500, "tcp_data_split": "on",
    "hds_thresh": 0, "hds_thresh_max": 1024, "rx_buf_len": 4096, "link_up": True,
    "stats_index": 0,
}
SENDER, LOCAL, SPORT, DPORT, ISN = "10.0.0.2", "10.0.0.1", 40000, 5201, 1000


# --------------------------------------------------------------------------------------------
# The fake NIC
# --------------------------------------------------------------------------------------------

class FakeQueue:
    def __init__(self, region: Region, layout: nicif.QueueLayout, q: int) -> None:
        assert region.buf is not None
        self.q = q
        self.layout = layout
        self.fill = RingConsumer(region.buf, layout.fill)
        self.comp = RingProducer(region.buf, layout.comp)
        self.slots = layout.hdr_slots(region.buf)
        self.words = np.frombuffer(region.buf, dtype=np.uint32, count=layout.comp.size // 4)
        self.completed = 0

    def comp_armed(self) -> bool:
        assert self.layout.comp.flags is not None
        return bool(self.words[self.layout.comp.flags // 4] & RING_F_NEED_WAKEUP)

    def disarm(self) -> None:
        assert self.layout.comp.flags is not None
        self.words[self.layout.comp.flags // 4] &= np.uint32(~RING_F_NEED_WAKEUP & 0xFFFFFFFF)

    def fill_waiting(self) -> bool:
        return bool(self.fill.flags & RING_F_NEED_WAKEUP)

    def close(self) -> None:
        self.fill.detach()
        self.comp.detach()
        self.slots = np.empty((0, 0), dtype=np.uint8)
        self.words = np.empty(0, dtype=np.uint32)


class FakeNic:
    """Implements the nic.* admin calls and the DMA/completion side of one netdev."""

    def __init__(self, info: dict[str, Any]) -> None:
        self.info = dict(info)
        self.maps: dict[int, Region] = {}
        self.next_map = 7
        self.queues: dict[int, FakeQueue] = {}
        self.calls: list[tuple[str, dict[str, Any]]] = []
        #: the size of each pipelined batch (``call_many``), in order
        self.batches: list[int] = []
        self.refuse: dict[str, int] = {}
        self.bad_map_reply = False
        self.irqs = 0
        #: queues whose interrupt fired, in order, until the harness takes them
        self.irq_queues: list[int] = []
        self.iommu_faults = 0
        #: the kernel's TX ring once nic.tx_start attached it, and what was drained from it
        self.tx: TxConsumer | None = None
        self.tx_map = 0
        self.transmitted: list[bytes] = []

    def tx_sent(self) -> list[bytes]:
        """Drain the TX ring (as the NIC's loop does); the frames drained by this call."""
        out: list[bytes] = []
        while self.tx is not None:
            batch = self.tx.peek(64)
            if not self.tx.held:
                break
            out.extend(batch.frames())
            self.tx.release()
        self.transmitted.extend(out)
        return out

    def call_many(self, requests: Any) -> list[dict[str, Any] | ControlError]:
        """The pipelined batch: handled one by one, in order, each failure in its place."""
        self.batches.append(len(requests))
        out: list[dict[str, Any] | ControlError] = []
        for type, body in requests:
            try:
                out.append(self.call(type, body))
            except ControlError as e:
                out.append(e)
        return out

    def call(self, type: str, body: Any = None) -> dict[str, Any]:
        body = dict(body or {})
        self.calls.append((type, body))
        key = body["request"]["cmd"] if type == "nic.ethtool" else type
        if key in self.refuse:
            raise ControlError(type, self.refuse[key], "refused by the fake NIC")
        if type == "nic.dma_map":
            if body.get("fd", -1) >= 0:  # app memory: the kernel's descriptor (this process)
                region = Region.open_proc_fd(os.getpid(), body["fd"], body["name"],
                                             inode=(body["dev"], body["ino"]))
            else:
                region = Region.attach(body["name"])
            assert body["size"] <= region.size
            if self.bad_map_reply:
                region.detach()
                return {"map_id": -5}
            self.next_map += 1
            self.maps[self.next_map] = region
            return {"map_id": self.next_map}
        if type == "nic.dma_unmap":
            for map_id in (body["map_id"], *body.get("more", [])):
                self.maps.pop(map_id).detach()
            return {}
        if type == "nic.queue_start":
            for map_id in body.get("unmap", []):  # removed first, as the NIC does
                self.maps.pop(map_id).detach()
            assert body["dev"] == self.info["name"] and body["queue"] not in self.queues
            layout = nicif.QueueLayout(body["ring_size"], body["slot_size"])
            self.queues[body["queue"]] = FakeQueue(self.maps[body["map_id"]], layout,
                                                   body["queue"])
            return {}
        if type == "nic.queue_stop":
            fq = self.queues.pop(body["queue"])
            fq.close()
            return {"completed": fq.completed}
        if type == "nic.tx_start":
            assert body["dev"] == self.info["name"] and self.tx is None
            self.tx = TxConsumer(self.maps[body["map_id"]].buf,
                                 TxLayout(body["ring_size"], body["slot_size"]))
            self.tx_map = body["map_id"]
            return {}
        if type in ("nic.ctl_start", "nic.ctl_stop"):
            return {}
        if type == "nic.tx_stop":
            assert self.tx is not None
            self.tx_sent()
            self.tx.detach()
            self.tx = None
            return {"sent": 0}
        if type == "nic.ethtool":
            req = body["request"]
            assert req["dev"] == body["dev"] == self.info["name"]
            cmd = req["cmd"]
            if cmd == "channels-set":
                n = req["combined"]
                if any(q >= n for q in self.queues):     # as nic_proc.device refuses
                    raise ControlError(type, errno.EBUSY, "stop queues first")
                self.info["queues"] = n
                return {}
            if cmd == "rings-set":
                if req.get("rx", self.info["ring_size"]) != self.info["ring_size"] \
                        and self.queues:
                    raise ControlError(type, errno.EBUSY, "stop every queue first")
                for k in ("rx", "rx_buf_len", "hds_thresh", "tcp_data_split"):
                    if k in req:
                        self.info["ring_size" if k == "rx" else k] = req[k]
                return {}
            if cmd == "stats-get":
                return {"stats": {"rx-0.rx_packets": 5}}
            if cmd == "rss-get":
                return {"context": req.get("context", 0), "indir": [0, 1] * 64}
            return {}
        raise AssertionError(f"unexpected call {type}")

    def close(self) -> None:
        for fq in self.queues.values():
            fq.close()
        self.queues.clear()
        for r in self.maps.values():
            r.detach()
        self.maps.clear()

    def _dma(self, iova: int, data: np.ndarray) -> bool:
        region = self.maps.get(abi.iova_map_id(iova))
        off = abi.iova_offset(iova)
        if region is None or region.buf is None or off + len(data) > region.size:
            self.iommu_faults += 1
            return False
        region.array(np.uint8)[off:off + len(data)] = data
        return True

    def deliver(self, q: int, frames: np.ndarray, flen: np.ndarray, *, split: bool = True,
                hds_thresh: int = 0, mutate: Mutate | None = None,
                mtu: int | None = None) -> int:
        """Place frames on queue q as the contract says; return how many went in.
        ``mtu``: the largest frame to split (default the netdev's; a HW-GRO session is
        longer)."""
        fq = self.queues[q]
        p = wire.parse_slots(frames, flen, mtu=mtu or self.info["mtu"], check_ip_csum=False)
        done = 0
        for i in range(len(flen)):
            if fq.comp.space() == 0:
                break
            n = int(flen[i])
            poff = int(p["payload_off"][i])
            frame = frames[i, :n]
            idx = fq.comp.tail & fq.comp.mask
            cqe = np.zeros(1, dtype=abi.nic_rx_cqe)
            if split and int(p["payload_len"][i]) > hds_thresh:
                data = frame[poff:]  # payload and any Ethernet padding
                avail = fq.fill.ready()
                if avail == 0:
                    fq.fill.set_need_wakeup()
                    break
                blen = int(fq.fill.peek(1)["len"][0])
                need = -(-len(data) // blen)
                if avail < need:
                    fq.fill.set_need_wakeup()
                    break
                fq.fill.clear_need_wakeup()
                descs = fq.fill.pop(need)
                pos = 0
                for d in descs:
                    m = min(int(d["len"]), len(data) - pos)
                    self._dma(int(d["iova"]), data[pos:pos + m])
                    pos += m
                fq.slots[idx, :poff] = frame[:poff]
                cqe["hdr_len"] = poff
                cqe["data_len"] = len(data)
                cqe["nr_frags"] = need
                cqe["flags"] = abi.NIC_CQE_F_SPLIT | abi.NIC_CQE_F_L4_OK
            else:
                fq.slots[idx, :n] = frame
                cqe["hdr_len"] = n
                cqe["flags"] = abi.NIC_CQE_F_LINEAR | abi.NIC_CQE_F_L4_OK
            cqe["hdr_slot"] = idx
            cqe["queue"] = q
            cqe["payload_off"] = poff
            if mutate is not None:
                mutate(i, cqe, fq.slots[idx])
            fq.comp.push(cqe)
            fq.completed += 1
            done += 1
            if fq.comp_armed():
                fq.disarm()
                self.irqs += 1
                self.irq_queues.append(q)
        return done

    def doorbell(self, q: int) -> None:
        self.queues[q].fill.clear_need_wakeup()


# --------------------------------------------------------------------------------------------
# Traffic
# --------------------------------------------------------------------------------------------

class Flow:
    """One TCP flow whose frames carry the pattern of its stream."""

    def __init__(self, src: str = SENDER, dst: str = LOCAL, sport: int = SPORT,
                 dport: int = DPORT, stream: int = 3, isn: int = ISN) -> None:
        self.spec = wire.FlowSpec.from_addresses([src], [dst], [sport], [dport], isn=[isn],
                                                 stream=[stream])
        self.key = flow_key(src, sport, dst, dport)
        self.stream, self.isn, self.offset = stream, isn, 0

    def frames(self, lens: list[int], flags: list[int] | int = wire.TCP_ACK
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Next frames of the stream: ``(frames, frame lengths, stream offsets)``."""
        lens_a = np.array(lens, dtype=np.int64)
        offs = self.offset + np.concatenate([[0], np.cumsum(lens_a)[:-1]]).astype(np.int64)
        out = np.zeros((len(lens), wire.FRAME6_HLEN + max(max(lens), 64)), dtype=np.uint8)
        flen = wire.build_frames(self.spec, out, np.zeros(len(lens), np.intp), offs, lens_a,
                                 flags)
        self.offset += int(lens_a.sum())
        return out, flen.astype(np.int64), offs

    def seq(self, offs: np.ndarray) -> list[int]:
        return [(self.isn + 1 + int(o)) & 0xFFFFFFFF for o in offs]


def payload_bytes(store: SkbStore, b: NapiBatch) -> np.ndarray:
    dst = np.empty(int(b.payload_len.sum()), dtype=np.uint8)
    store.copy_out(b.handles, 0, b.payload_len, dst)
    return dst


def poll_all(nd: NetDevice, q: int, budget: int = 256) -> NapiBatch:
    out: list[NapiBatch] = []
    while True:
        b = nd.napi_poll(q, budget)
        if b.completions == 0:
            return NapiBatch.concat(q, out)
        out.append(b)


def shm_exists(name: str) -> bool:
    return os.path.exists("/dev/shm" + name)


@pytest.fixture
def dev(run_id: str) -> Iterator[tuple[NetDevice, FakeNic, SkbStore]]:
    nic = FakeNic(INFO)
    store = SkbStore()
    nd = NetDevice(INFO, nic, run_id, skbs=store)
    try:
        yield nd, nic, store
    finally:
        nd.close()
        store.free(store.live_handles())
        nic.close()


def make_dev(run_id: str, **over: Any) -> tuple[NetDevice, FakeNic, SkbStore]:
    info = {**INFO, **over}
    nic = FakeNic(info)
    store = SkbStore()
    return NetDevice(info, nic, run_id, skbs=store), nic, store


def teardown(nd: NetDevice, nic: FakeNic, store: SkbStore) -> None:
    nd.close()
    store.free(store.live_handles())
    nic.close()


# --------------------------------------------------------------------------------------------
# Bring-up
# --------------------------------------------------------------------------------------------

def test_open_maps_regions_and_stocks_fill_rings(dev: tuple[NetDevice, FakeNic, SkbStore],
                                                 run_id: str) -> None:
    nd, nic, _ = dev
    nd.open()
    types = [t for t, _ in nic.calls]
    assert types == ["nic.dma_map"] * 4 + ["nic.queue_start"] * 2 + [
        "nic.dma_map", "nic.tx_start", "nic.dma_map", "nic.ctl_start"]
    # every queue's maps in one pipelined batch, every start in another
    assert nic.batches[:2] == [4, 2]
    assert nic.calls[6][1]["name"] == region_name(run_id, "kernel", "eth0.tx")
    qname = region_name(run_id, "kernel", "eth0.q0")
    ppname = region_name(run_id, "kernel", "eth0.q0.pp1")
    assert nic.calls[0][1]["name"] == qname and nic.calls[1][1]["name"] == ppname
    assert shm_exists(qname) and shm_exists(ppname)
    start = nic.calls[4][1]
    assert start == {"dev": "eth0", "queue": 0, "map_id": 8, "ring_size": 64,
                     "slot_size": nicif.hdr_slot_size(1514)}
    fq = nic.queues[0]
    assert fq.fill.ready() == 64
    desc = fq.fill.peek(64)
    assert {abi.iova_map_id(int(i)) for i in desc["iova"]} == {9}
    offs = [abi.iova_offset(int(i)) for i in desc["iova"]]
    assert offs == [4096 * b for b in desc["buf_id"].tolist()]
    assert len(set(desc["buf_id"].tolist())) == 64 and set(desc["len"].tolist()) == {4096}
    # started queues are scheduled for a first poll, not armed: an idle poll arms them
    assert not fq.comp_armed() and list(nd.poll_list) == [0, 1]
    assert nd.napi_complete(0) is False and fq.comp_armed()
    st = nd.status()
    assert [q["started"] for q in st["rx_queues"]] == [True, True]
    q0 = st["rx_queues"][0]
    assert q0["binding"] == "none" and q0["posted"] == 64 and q0["buffers"] == 128
    assert q0["ledger"]["posted"] == 64 and q0["ledger"]["free"] == 64
    nd.check_ledger()
    nd.close()
    assert not shm_exists(qname) and not shm_exists(ppname)
    [unmap] = [b for t, b in nic.calls[6:] if t == "nic.dma_unmap"]  # one command at close:
    assert len(unmap["more"]) + 1 == 6  # 2 per queue, TX, ctl
    assert nic.maps == {}


def test_probe_dict_is_validated(run_id: str) -> None:
    nic = FakeNic(INFO)
    for bad in ({"ring_size": 48}, {"queues": 9}, {"mtu": 10}, {"ring_size": "x"}):
        with pytest.raises(PeerMisbehaved):
            NetDevice({**INFO, **bad}, nic, run_id, skbs=SkbStore())
    info = dict(INFO)
    del info["rx_buf_len"]
    with pytest.raises(PeerMisbehaved):
        NetDevice(info, nic, run_id, skbs=SkbStore())


def test_header_slots_get_their_pages_off_the_setup_path(
        dev: tuple[NetDevice, FakeNic, SkbStore], run_id: str) -> None:
    """A queue region is created with only its rings' pages; a helper thread then gives
    the header slots theirs (so the NIC's first header store into each is no page fault),
    while the kernel-page pool keeps its pages for the NIC's first store (a queue bound to
    zcrx never touches it)."""
    nd, _, _ = dev
    nd.open()
    rq = nd.queues[0]
    assert rq.region is not None and rq.space is not None
    path = "/dev/shm" + rq.region.name
    deadline = time.monotonic() + 10
    while os.stat(path).st_blocks * 512 < rq.region.size:
        assert time.monotonic() < deadline, (os.stat(path).st_blocks * 512, rq.region.size)
        time.sleep(0.01)
    assert rq.region.fd == -1  # the helper took the descriptor and closed it
    assert os.stat("/dev/shm" + rq.space.name).st_blocks == 0


def test_batched_setup_is_all_or_nothing(dev: tuple[NetDevice, FakeNic, SkbStore],
                                         run_id: str) -> None:
    """One refused map in the pipelined batch of two queues' maps: the maps the NIC did
    make are removed again, no region is left, no queue is set up; the error is the NIC's."""
    nd, nic, _ = dev
    call, seen = nic.call, []

    def refuse_third_map(type: str, body: Any = None) -> dict[str, Any]:
        if type == "nic.dma_map":
            seen.append(body["name"])
            if len(seen) == 3:
                raise ControlError(type, errno.ENOMEM, "refused by the test")
        return call(type, body)

    nic.call = refuse_third_map  # type: ignore[method-assign]
    with pytest.raises(ControlError) as ei:
        nd.queues_setup([0, 1])
    assert ei.value.errno == errno.ENOMEM
    assert nd.queues == {} and nic.maps == {} and nic.batches == [4]
    assert not any(shm_exists(name) for name in seen)
    nic.call = call  # type: ignore[method-assign]
    nd.queues_setup([0, 1])
    assert sorted(nd.queues) == [0, 1] and len(nic.maps) == 4


def test_batched_start_refusal_stops_only_that_queue(
        dev: tuple[NetDevice, FakeNic, SkbStore]) -> None:
    """The NIC refuses one start of a pipelined batch: that queue takes its buffers back
    and stays stopped, the other starts, and the refusal is raised."""
    nd, nic, _ = dev
    call = nic.call

    def refuse_q1(type: str, body: Any = None) -> dict[str, Any]:
        if type == "nic.queue_start" and body["queue"] == 1:
            raise ControlError(type, errno.EIO, "refused by the test")
        return call(type, body)

    nd.queues_setup([0, 1])
    nic.call = refuse_q1  # type: ignore[method-assign]
    with pytest.raises(ControlError) as ei:
        nd.queues_start([0, 1])
    assert ei.value.errno == errno.EIO
    rx = nd.status()["rx_queues"]
    assert [q["started"] for q in rx] == [True, False]
    assert rx[0]["ledger"]["posted"] == 64 and rx[1]["ledger"]["posted"] == 0
    assert list(nd.poll_list) == [0] and list(nic.queues) == [0]
    nd.check_ledger()
    nic.call = call  # type: ignore[method-assign]
    nd.queues_start([1])
    assert nic.queues[1].fill.ready() == 64


def test_setup_failure_unwinds(dev: tuple[NetDevice, FakeNic, SkbStore], run_id: str) -> None:
    nd, nic, _ = dev
    nic.bad_map_reply = True
    with pytest.raises(PeerMisbehaved):
        nd.queue_setup(0)
    assert nd.queues == {} and not shm_exists(region_name(run_id, "kernel", "eth0.q0"))
    nic.bad_map_reply = False
    nic.refuse["nic.queue_start"] = errno.EIO
    nd.queue_setup(0)
    with pytest.raises(ControlError):
        nd.queue_start(0)
    assert nd.status()["rx_queues"][0]["ledger"]["posted"] == 0
    nd.check_ledger()
    del nic.refuse["nic.queue_start"]
    nd.queue_start(0)
    assert nic.queues[0].fill.ready() == 64
    with pytest.raises(Misuse) as ei:
        nd.queue_setup(0)
    assert ei.value.errno == errno.EEXIST
    with pytest.raises(Misuse) as ei:
        nd.queue_setup(2)
    assert ei.value.errno == errno.ERANGE
    with pytest.raises(Misuse) as ei:
        nd.queue_free(0)
    assert ei.value.errno == errno.EBUSY


# --------------------------------------------------------------------------------------------
# NAPI
# --------------------------------------------------------------------------------------------

def test_split_frames_give_flows_seqs_and_exact_bytes(
        dev: tuple[NetDevice, FakeNic, SkbStore]) -> None:
    nd, nic, store = dev
    nd.open()
    flow = Flow()
    frames, flen, offs = flow.frames([1460] * 64)
    assert nic.deliver(0, frames, flen) == 64
    assert nic.queues[0].fill.ready() == 0
    nd.check_ledger()
    b = nd.napi_poll(0, 256)
    assert b.completions == 64 and len(b) == 64 and b.dropped == 0
    assert all(k.tobytes() == flow.key for k in b.keys)
    assert b.seq.tolist() == flow.seq(offs)
    assert b.payload_len.tolist() == [1460] * 64
    assert set(b.tcp_flags.tolist()) == {wire.TCP_ACK}
    data = payload_bytes(store, b)
    assert len(data) == 64 * 1460 and pattern.verify(flow.stream, 0, data) == -1
    # Reposted from the pool at once: the ring is full again.
    assert b.posted == 64 and not b.doorbell
    assert nic.queues[0].fill.ready() == 64
    led = nd.status()["rx_queues"][0]["ledger"]
    assert led["in_skb"] == 64 and led["posted"] == 64 and sum(led.values()) == 128
    nd.check_ledger()
    s = nd.queue_stats(0)
    assert s["rx_packets"] == 64 and s["rx_split"] == 64 and s["rx_frags"] == 64
    assert s["rx_bytes"] == int(flen.sum()) and s["rx_dropped"] == 0
    store.free(b.handles)
    led = nd.status()["rx_queues"][0]["ledger"]
    assert led["in_skb"] == 0 and led["pool_cache"] == 64
    nd.check_ledger()
    # Second round uses recycled buffers.
    frames, flen, offs = flow.frames([1000] * 10)
    nic.deliver(0, frames, flen)
    b = nd.napi_poll(0)
    assert pattern.verify(flow.stream, 64 * 1460, payload_bytes(store, b)) == -1
    store.free(b.handles)
    nd.check_ledger()


def test_budget_and_ring_wrap(dev: tuple[NetDevice, FakeNic, SkbStore]) -> None:
    nd, nic, store = dev
    nd.open()
    flow = Flow()
    got = []
    for _ in range(5):  # 5 x 40 frames through a 64-entry ring: wraps several times
        frames, flen, _ = flow.frames([700] * 40)
        assert nic.deliver(1, frames, flen) == 40
        while True:
            b = nd.napi_poll(1, budget=16)
            if not b.completions:
                break
            assert b.completions <= 16
            got.append(payload_bytes(store, b))
            store.free(b.handles)
        nd.check_ledger()
    data = np.concatenate(got)
    assert len(data) == 200 * 700 and pattern.verify(flow.stream, 0, data) == -1


def test_multi_frag_frames_and_pieces_across_frags(run_id: str) -> None:
    nd, nic, store = make_dev(run_id, mtu=9000, rx_buf_len=2048)
    try:
        nd.open()
        flow = Flow()
        lens = [8948, 2048, 2049, 100, 8948]
        frames, flen, _offs = flow.frames(lens)
        assert nic.deliver(0, frames, flen) == 5
        b = nd.napi_poll(0)
        assert b.payload_len.tolist() == lens
        assert nd.queue_stats(0)["rx_frags"] == 5 + 1 + 2 + 1 + 5
        data = payload_bytes(store, b)
        assert pattern.verify(flow.stream, 0, data) == -1
        ch = store.frags(b.handles)
        assert ch.length.tolist() == [2048] * 4 + [756, 2048, 2048, 1, 100] + [2048] * 4 + [756]
        # Read it as TCP would: a head already partly consumed, cut at a budget.
        o = np.array([3000, 0, 0, 0, 0])
        n = np.array([8948 - 3000, 2048, 2049, 100, 4097])
        dst = np.empty(int(n.sum()), dtype=np.uint8)
        store.copy_out(b.handles, o, n, dst)
        assert pattern.verify(flow.stream, 3000, dst) == -1
        store.free(b.handles)
        nd.check_ledger()
    finally:
        teardown(nd, nic, store)


def test_linear_frames_copy_out_of_the_slots(run_id: str) -> None:
    nd, nic, store = make_dev(run_id, tcp_data_split="off")
    try:
        nd.open()
        flow = Flow()
        frames, flen, _offs = flow.frames([1460, 1, 0, 700, 1460])
        assert nic.deliver(0, frames, flen, split=False) == 5
        b = nd.napi_poll(0)
        assert b.payload_len.tolist() == [1460, 1, 0, 700, 1460]
        assert pattern.verify(flow.stream, 0, payload_bytes(store, b)) == -1
        s = nd.queue_stats(0)
        assert s["rx_linear"] == 5 and s["rx_frags"] == 0
        assert nic.queues[0].fill.ready() == 64 and b.posted == 0   # no buffer used
        # The slots get reused by the next frames; the skbs kept their own copy.
        frames2, flen2, _ = flow.frames([1460] * 64)
        nic.deliver(0, frames2, flen2, split=False)
        b2 = nd.napi_poll(0)
        assert pattern.verify(flow.stream, 0, payload_bytes(store, b)) == -1
        assert pattern.verify(flow.stream, 3621, payload_bytes(store, b2)) == -1
        store.free(np.concatenate([b.handles, b2.handles]))
        nd.check_ledger()
    finally:
        teardown(nd, nic, store)


def test_hds_threshold_mix_control_segments_and_padding(
        dev: tuple[NetDevice, FakeNic, SkbStore]) -> None:
    nd, nic, store = dev
    nd.open()
    flow = Flow()
    fl = [wire.TCP_SYN, wire.TCP_ACK, wire.TCP_ACK, wire.TCP_ACK | wire.TCP_PSH, wire.TCP_ACK,
          wire.TCP_ACK | wire.TCP_FIN]
    frames, flen, _ = flow.frames([0, 100, 300, 1, 1460, 0], fl)
    assert nic.deliver(0, frames, flen, hds_thresh=200) == 6
    b = nd.napi_poll(0)
    assert b.tcp_flags.tolist() == fl
    assert b.payload_len.tolist() == [0, 100, 300, 1, 1460, 0]
    s = nd.queue_stats(0)
    assert s["rx_linear"] == 4 and s["rx_split"] == 2
    assert pattern.verify(flow.stream, 0, payload_bytes(store, b)) == -1
    store.free(b.handles)
    # hds-thresh 0: tiny payloads are split too; the data buffer also got the Ethernet
    # padding (data_len 6 for 1 payload byte) and the skb is trimmed to the payload.
    frames, flen, _offs = flow.frames([1, 3, 0, 6])
    assert flen.tolist()[:2] == [60, 60]
    nic.deliver(0, frames, flen, hds_thresh=0)
    b = nd.napi_poll(0)
    assert b.payload_len.tolist() == [1, 3, 0, 6]
    assert store.frags(b.handles).length.tolist() == [1, 3, 6]
    assert pattern.verify(flow.stream, 1861, payload_bytes(store, b)) == -1
    store.free(b.handles)
    nd.check_ledger()
    assert nd.status()["rx_queues"][0]["ledger"]["in_skb"] == 0


def _ipv6_frames() -> tuple[Flow, np.ndarray, np.ndarray, np.ndarray]:
    flow = Flow("fd00::2", "fd00::1", stream=9)
    frames, flen, offs = flow.frames([1400, 1400, 10])
    return flow, frames, flen, offs


def test_ipv6_and_ipv4_in_one_batch(dev: tuple[NetDevice, FakeNic, SkbStore]) -> None:
    nd, nic, store = dev
    nd.open()
    f6, fr6, fl6, _ = _ipv6_frames()
    f4 = Flow(stream=4)
    fr4, fl4, _ = f4.frames([1000, 1000])
    nic.deliver(0, fr6[:2], fl6[:2])
    nic.deliver(0, fr4, fl4)
    nic.deliver(0, fr6[2:], fl6[2:])
    b = nd.napi_poll(0)
    keys = [k.tobytes() for k in b.keys]
    assert keys == [f6.key, f6.key, f4.key, f4.key, f6.key]
    d = payload_bytes(store, b)
    assert pattern.verify(9, 0, np.concatenate([d[:2800], d[4800:]])) == -1
    assert pattern.verify(4, 0, d[2800:4800]) == -1
    store.free(b.handles)


# --------------------------------------------------------------------------------------------
# A NIC that breaks the contract
# --------------------------------------------------------------------------------------------

def test_bad_completions_and_frames_are_counted_and_dropped(
        dev: tuple[NetDevice, FakeNic, SkbStore]) -> None:
    nd, nic, store = dev
    nd.open()
    flow = Flow()
    frames, flen, offs = flow.frames([1460] * 10)
    slot = nd.slot_size

    def corrupt(i: int, cqe: np.ndarray, row: np.ndarray) -> None:
        if i == 1:
            cqe["hdr_len"] = slot + 1                      # past the slot
        elif i == 2:
            cqe["data_len"] = 5000                         # needs 2 frags, says 1
        elif i == 3:
            cqe["hdr_slot"] = (int(cqe["hdr_slot"][0]) + 1) % 64
        elif i == 4:
            cqe["flags"] = abi.NIC_CQE_F_SPLIT | abi.NIC_CQE_F_LINEAR
        elif i == 5:
            cqe["status"] = abi.NIC_STATUS_TRUNCATED       # the NIC says it is bad
        elif i == 6:
            row[24] ^= 0xFF                                # IPv4 header checksum broken
        elif i == 7:
            cqe["queue"] = 1
        elif i == 8:
            cqe["payload_off"] = 40                        # disagrees with the headers
        elif i == 9:                                       # an IOMMU fault, as nic_proc
            cqe["flags"] = 0                               # reports it: the buffer it
            cqe["hdr_len"] = cqe["data_len"] = 0           # consumed is still announced
            cqe["status"] = 4

    assert nic.deliver(0, frames, flen, mutate=corrupt) == 10
    b = nd.napi_poll(0)
    assert b.completions == 10 and b.dropped == 9 and len(b) == 1
    assert b.seq.tolist() == flow.seq(offs[:1])
    assert pattern.verify(flow.stream, 0, payload_bytes(store, b)) == -1
    s = nd.queue_stats(0)
    assert s["bad_completions"] == 6 and s["bad_frames"] == 3 and s["rx_dropped"] == 9
    led = nd.status()["rx_queues"][0]["ledger"]
    assert led["in_skb"] == 1 and led["pool_cache"] == 0 and led["posted"] == 64
    nd.check_ledger()
    store.free(b.handles)
    nd.check_ledger()


def test_nr_frags_beyond_the_posted_buffers(dev: tuple[NetDevice, FakeNic, SkbStore]) -> None:
    nd, nic, store = dev
    nd.open()
    flow = Flow()
    frames, flen, _offs = flow.frames([1000] * 5)

    def claim(i: int, cqe: np.ndarray, row: np.ndarray) -> None:
        if i == 4:
            cqe["nr_frags"] = 1000
            cqe["data_len"] = 1000 * 4096

    nic.deliver(0, frames, flen, mutate=claim)
    b = nd.napi_poll(0)
    assert len(b) == 4 and pattern.verify(flow.stream, 0, payload_bytes(store, b)) == -1
    assert nd.queue_stats(0)["bad_completions"] == 1
    nd.check_ledger()
    store.free(b.handles)
    nd.queue_stop(0)
    led = nd.status()["rx_queues"][0]["ledger"]
    assert led["posted"] == 0 and led["in_skb"] == 0 and led["pool_cache"] + led["free"] == 128
    nd.check_ledger()


def test_scribbled_completion_tail_is_clamped(dev: tuple[NetDevice, FakeNic, SkbStore]) -> None:
    nd, nic, _store = dev
    nd.open()
    fq = nic.queues[0]
    assert nic.queues[0].layout.comp.tail % 4 == 0
    fq.words[fq.layout.comp.tail // 4] = 5000          # far ahead of anything published
    b = nd.napi_poll(0, budget=256)
    assert b.completions == 64 and len(b) == 0          # one ring's worth, all invalid
    s = nd.queue_stats(0)
    assert s["ring_faults"] >= 1 and s["bad_completions"] == 64
    nd.check_ledger()
    nd.queue_stop(0)
    nd.check_ledger()


# --------------------------------------------------------------------------------------------
# Interrupts and doorbells
# --------------------------------------------------------------------------------------------

def test_interrupt_arming(dev: tuple[NetDevice, FakeNic, SkbStore]) -> None:
    nd, nic, store = dev
    nd.open()
    flow = Flow()
    fr, fl, _ = flow.frames([100])
    nic.deliver(0, fr, fl)
    assert nic.irqs == 0 and 0 in nd.poll_list                # scheduled at start, unarmed
    assert nd.napi_complete(0) is True                         # work is there: poll again
    b0 = poll_all(nd, 0)
    assert nd.napi_complete(0) is False and nic.queues[0].comp_armed()
    fr, fl, _ = flow.frames([100])
    nic.deliver(0, fr, fl)
    assert nic.irqs == 1 and not nic.queues[0].comp_armed()   # the NIC disarms on irq
    fr, fl, _ = flow.frames([100])
    nic.deliver(0, fr, fl)
    assert nic.irqs == 1                                       # not armed: no irq
    assert nd.napi_complete(0) is True                         # work is there: poll again
    assert not nic.queues[0].comp_armed()
    b = poll_all(nd, 0)
    assert len(b) == 2
    assert nd.napi_complete(0) is False and nic.queues[0].comp_armed()
    fr, fl, _ = flow.frames([100])
    nic.deliver(0, fr, fl)
    assert nic.irqs == 2
    store.free(b.handles)
    store.free(b0.handles)
    assert nd.queue_stats(0)["irq_rearm_races"] == 2


def test_doorbell_after_starvation(run_id: str) -> None:
    nic = FakeNic(INFO)
    store = SkbStore()
    nd = NetDevice(INFO, nic, run_id, skbs=store, pp_buffers=64)
    try:
        nd.open()
        flow = Flow()
        fr, fl, _ = flow.frames([1000] * 64)
        assert nic.deliver(0, fr, fl) == 64
        b = nd.napi_poll(0)
        assert b.posted == 0 and nd.queue_stats(0)["alloc_short"] >= 1  # all 64 in skbs
        fr2, fl2, _ = flow.frames([1000] * 8)
        assert nic.deliver(0, fr2, fl2) == 0                            # no buffer: waits
        assert nic.queues[0].fill_waiting()
        store.free(b.handles[:16])
        posted, doorbell = nd.refill(0)
        assert posted == 16 and doorbell
        nic.doorbell(0)
        assert nic.deliver(0, fr2, fl2) == 8
        b2 = nd.napi_poll(0)
        assert pattern.verify(flow.stream, 64000, payload_bytes(store, b2)) == -1
        assert not b2.doorbell
        store.free(np.concatenate([b.handles[16:], b2.handles]))
        assert nd.queue_stats(0)["doorbells"] == 1
        nd.check_ledger()
    finally:
        teardown(nd, nic, store)


def test_napi_pending_skips_only_queues_with_nothing_to_do(run_id: str) -> None:
    """The kernel loop polls a queue only when a completion is published or buffers are
    missing from its ring; a garbage tail still counts as pending, so the poll (which
    validates it) sees it."""
    nic = FakeNic(INFO)
    store = SkbStore()
    nd = NetDevice(INFO, nic, run_id, skbs=store, pp_buffers=64)
    try:
        nd.open()
        assert not nd.napi_pending(0) and not nd.napi_pending(1)   # stocked, nothing done
        assert not nd.napi_pending(7)                             # no such queue
        flow = Flow()
        fr, fl, _ = flow.frames([1000] * 64)
        assert nic.deliver(0, fr, fl) == 64
        assert nd.napi_pending(0) and not nd.napi_pending(1)
        b = nd.napi_poll(0)
        assert b.completions == 64 and b.posted == 0              # every buffer is in skbs
        assert nd.napi_pending(0)                                 # ...so its ring is short
        store.free(b.handles)
        assert nd.napi_poll(0).posted == 64 and not nd.napi_pending(0)
        words = nic.queues[1].comp._words
        words[nic.queues[1].comp._t] = 12345                      # a NIC scribbling
        assert nd.napi_pending(1)
        nd.napi_poll(1)
        assert nd.queue_stats(1)["bad_completions"] + nd.queue_stats(1)["ring_faults"] > 0
        nd.check_ledger()
    finally:
        teardown(nd, nic, store)


# --------------------------------------------------------------------------------------------
# Stop, free, restart
# --------------------------------------------------------------------------------------------

def test_stop_drains_reclaims_and_pool_destruction_waits_for_skbs(
        dev: tuple[NetDevice, FakeNic, SkbStore], run_id: str) -> None:
    nd, nic, store = dev
    nd.open()
    flow = Flow()
    fr, fl, offs = flow.frames([1460] * 10)
    nic.deliver(0, fr, fl)
    drained = nd.queue_stop(0)
    assert len(drained) == 10 and drained.seq.tolist() == flow.seq(offs)
    assert pattern.verify(flow.stream, 0, payload_bytes(store, drained)) == -1
    led = nd.status()["rx_queues"][0]["ledger"]
    assert led["posted"] == 0 and led["in_skb"] == 10 and led["pool_cache"] == 54
    assert nd.queue_stats(0)["stop_reclaimed"] == 54
    nd.check_ledger()
    assert nd.napi_poll(0).completions == 0                   # stopped: nothing happens
    nd.queue_free(0)
    qname = region_name(run_id, "kernel", "eth0.q0")
    ppname = region_name(run_id, "kernel", "eth0.q0.pp1")
    assert not shm_exists(qname) and shm_exists(ppname)       # delayed destruction
    assert len(nd.dying) == 1
    nd.check_ledger()
    # The skbs still read fine from the old pool's pages.
    assert pattern.verify(flow.stream, 0, payload_bytes(store, drained)) == -1
    store.free(drained.handles[:5])
    assert shm_exists(ppname)
    store.free(drained.handles[5:])
    assert not shm_exists(ppname) and nd.dying == []


def test_release_dying_unlinks_names_but_keeps_pages(
        dev: tuple[NetDevice, FakeNic, SkbStore], run_id: str) -> None:
    nd, nic, store = dev
    nd.open()
    flow = Flow()
    fr, fl, _ = flow.frames([1460] * 3)
    nic.deliver(1, fr, fl)
    b = nd.napi_poll(1)
    nd.close()
    ppname = region_name(run_id, "kernel", "eth0.q1.pp1")
    assert shm_exists(ppname) and len(nd.dying) == 1
    assert nd.release_dying() == 1
    assert not any(n.startswith(f"zcrx.{run_id}.") for n in os.listdir("/dev/shm"))
    assert pattern.verify(flow.stream, 0, payload_bytes(store, b)) == -1
    store.free(b.handles)
    assert nd.dying == []


def test_restart_keeps_old_skbs_and_starts_a_new_pool(
        dev: tuple[NetDevice, FakeNic, SkbStore], run_id: str) -> None:
    nd, nic, store = dev
    nd.open()
    flow = Flow()
    fr, fl, _ = flow.frames([1460] * 5)
    nic.deliver(0, fr, fl)
    b1 = nd.napi_poll(0)
    fr, fl, _ = flow.frames([1460] * 3)
    nic.deliver(0, fr, fl)                                    # not polled: drained
    old_pool = nd.status()["rx_queues"][0]["page_pool"]
    drained = nd.queue_restart(0)
    assert len(drained) == 3
    st = nd.status()["rx_queues"][0]
    assert st["started"] and st["page_pool"] != old_pool and st["posted"] == 64
    assert shm_exists(region_name(run_id, "kernel", "eth0.q0.pp2"))
    assert nic.queues[0].fill.ready() == 64
    fr, fl, _ = flow.frames([1460] * 4)
    nic.deliver(0, fr, fl)
    b2 = nd.napi_poll(0)
    data = np.concatenate([payload_bytes(store, x) for x in (b1, drained, b2)])
    assert pattern.verify(flow.stream, 0, data) == -1
    nd.check_ledger()
    store.free(np.concatenate([b1.handles, drained.handles]))
    assert not shm_exists(region_name(run_id, "kernel", "eth0.q0.pp1"))
    store.free(b2.handles)
    nd.check_ledger()


def test_close_with_the_nic_gone(dev: tuple[NetDevice, FakeNic, SkbStore],
                                 run_id: str) -> None:
    nd, nic, store = dev
    nd.open()
    flow = Flow()
    fr, fl, _ = flow.frames([1460] * 6)
    nic.deliver(0, fr, fl)
    b = nd.napi_poll(0, budget=3)
    ncalls = len(nic.calls)
    out = nd.close(nic_alive=False)
    assert len(nic.calls) == ncalls                           # nothing asked of a dead NIC
    assert all(len(x) == 0 for x in out)
    nd.check_ledger()
    store.free(b.handles)
    assert not any(n.startswith(f"zcrx.{run_id}.") for n in os.listdir("/dev/shm"))


# --------------------------------------------------------------------------------------------
# ethtool
# --------------------------------------------------------------------------------------------

def test_set_channels_grows_shrinks_and_restores_on_refusal(
        dev: tuple[NetDevice, FakeNic, SkbStore], run_id: str) -> None:
    nd, nic, store = dev
    nd.open()
    assert nd.ethtool({"cmd": "channels-set", "dev": "eth0", "combined": 3}) == {}
    assert nic.info["queues"] == 3 and sorted(nd.queues) == [0, 1, 2]
    assert nd.queues[2].started and nic.queues[2].fill.ready() == 64
    flow = Flow()
    fr, fl, _offs = flow.frames([500] * 4)
    nic.deliver(2, fr, fl)
    # Refused shrink: queues 1 and 2 come back (their pending frames were drained first).
    nic.refuse["channels-set"] = errno.EINVAL
    with pytest.raises(ControlError):
        nd.set_channels(1)
    assert sorted(nd.queues) == [0, 1, 2] and all(q.started for q in nd.queues.values())
    drained = nd.take_drained()
    assert [len(x) for x in drained] == [4]
    assert pattern.verify(flow.stream, 0, payload_bytes(store, drained[0])) == -1
    del nic.refuse["channels-set"]
    nd.set_channels(1)
    assert sorted(nd.queues) == [0] and nd.n_queues == 1
    assert not shm_exists(region_name(run_id, "kernel", "eth0.q2"))
    assert nd.take_drained() == []
    store.free(drained[0].handles)
    with pytest.raises(Misuse):
        nd.set_channels(5)
    nd.check_ledger()


def test_set_rings_restarts_queues_for_ring_size_and_buffer_length(
        dev: tuple[NetDevice, FakeNic, SkbStore]) -> None:
    nd, nic, store = dev
    nd.open()
    flow = Flow()
    fr, fl, _ = flow.frames([1460] * 3)
    nic.deliver(0, fr, fl)
    nd.ethtool({"cmd": "rings-set", "dev": "eth0", "rx": 128})
    assert ("nic.ethtool", {"dev": "eth0", "request": {"cmd": "rings-set", "dev": "eth0",
                                                       "rx": 128}}) in nic.calls
    st = nd.status()["rx_queues"]
    assert [q["ring_size"] for q in st] == [128, 128] and st[0]["posted"] == 128
    assert nic.queues[0].layout.ring_size == 128
    (drained,) = nd.take_drained()
    assert pattern.verify(flow.stream, 0, payload_bytes(store, drained)) == -1
    store.free(drained.handles)
    pools = [q["page_pool"] for q in nd.status()["rx_queues"]]
    nd.set_rings(hds_thresh=100, tcp_data_split="on")         # the NIC's business only
    assert [q["page_pool"] for q in nd.status()["rx_queues"]] == pools
    assert nd.hds_thresh == 100
    nd.set_rings(rx_buf_len=2048)
    assert [q["rx_buf_len"] for q in nd.status()["rx_queues"]] == [2048, 2048]
    # A refused change brings the queues back as they were.
    nic.refuse["rings-set"] = errno.EINVAL
    with pytest.raises(ControlError):
        nd.set_rings(rx=256)
    st = nd.status()["rx_queues"]
    assert [(q["ring_size"], q["started"], q["posted"]) for q in st] == [(128, True, 128)] * 2
    del nic.refuse["rings-set"]
    fr, fl, _ = flow.frames([1460] * 2)
    nic.deliver(1, fr, fl)
    b = nd.napi_poll(1)
    assert pattern.verify(flow.stream, 3 * 1460, payload_bytes(store, b)) == -1
    store.free(b.handles)
    with pytest.raises(Misuse):
        nd.set_rings(rx=100)
    with pytest.raises(Misuse):
        nd.set_rings(rx=2048)
    for bad in ({"rx": "128"}, {"rx_buf_len": 1.5}, {"hds_thresh": True}):
        with pytest.raises(Misuse):
            nd.ethtool({"cmd": "rings-set", "dev": "eth0", **bad})
    assert all(q["started"] for q in nd.status()["rx_queues"])
    nd.check_ledger()


class AreaProvider(MemoryProvider):
    """Stand-in for the zcrx provider: another space, bound with queue_restart."""

    kind = "io-uring"

    def alloc(self, pool: PagePool, n: int) -> np.ndarray:
        return self.space.take_free(n)

    def release(self, pool: PagePool, ids: np.ndarray) -> None:
        self.space.put_free(ids)


def test_memory_provider_binding_via_restart(dev: tuple[NetDevice, FakeNic, SkbStore],
                                             run_id: str) -> None:
    nd, nic, store = dev
    nd.open()
    area = BufferSpace.create(region_name(run_id, "app1", "area0"), 256, 4096)
    try:
        prov = AreaProvider(area)
        nd.queue_restart(1, prov)
        st = nd.status()["rx_queues"][1]
        assert st["binding"] == "io-uring" and st["buffers"] == 256
        assert area.check_ledger()["posted"] == 64
        flow = Flow()
        fr, fl, _ = flow.frames([1460] * 4)
        nic.deliver(1, fr, fl)
        b = nd.napi_poll(1)
        assert set(store.frags(b.handles).src.tolist()) == {area.space_id}
        assert pattern.verify(flow.stream, 0, payload_bytes(store, b)) == -1
        with pytest.raises(Misuse) as ei:
            nd.set_rings(tcp_data_split="off")
        assert ei.value.errno == errno.EINVAL
        with pytest.raises(Misuse):
            nd.set_rings(hds_thresh=64)
        nd.queue_restart(1)                                   # unbind: back to pages
        assert nd.status()["rx_queues"][1]["binding"] == "none"
        assert len(nd.dying) == 1                             # 4 buffers still in skbs
        nd.check_ledger()
        store.free(b.handles)
        assert nd.dying == [] and area.check_ledger()["free"] == 256
    finally:
        area.close()


def test_mp_open_and_close_rxq(dev: tuple[NetDevice, FakeNic, SkbStore], run_id: str) -> None:
    """The memory-provider interface: Linux's checks and errnos, drained frames kept, a
    close by another provider ignored, the provider attached until its pool drained."""
    nd, nic, store = dev
    nd.open()
    area = BufferSpace.create(region_name(run_id, "app1", "area0"), 256, 4096)
    try:
        prov = AreaProvider(area)
        with pytest.raises(Misuse) as ei:
            nd.mp_open_rxq(2, prov)                           # 2 channels
        assert ei.value.errno == errno.ERANGE
        with pytest.raises(Misuse) as ei:
            nd.mp_check_rxq(1, 8192)                          # rx-buf-len is 4096
        assert ei.value.errno == errno.EOPNOTSUPP
        with pytest.raises(Misuse) as ei:
            nd.mp_check_rxq(1, 4096, claimed=True)
        assert ei.value.errno == errno.EEXIST
        flow = Flow()
        fr, fl, _ = flow.frames([1460] * 2)
        nic.deliver(1, fr, fl)                                # in the ring while binding
        nd.mp_open_rxq(1, prov)
        assert nd.binding(1) == "io-uring" and area.check_ledger()["posted"] == 64
        (drained,) = nd.take_drained()
        assert pattern.verify(flow.stream, 0, payload_bytes(store, drained)) == -1
        store.free(drained.handles)
        with pytest.raises(Misuse) as ei:
            nd.mp_open_rxq(1, AreaProvider(area))
        assert ei.value.errno == errno.EEXIST
        assert nd.mp_close_rxq(1, AreaProvider(area)) is False   # not this queue's provider
        assert nd.mp_close_rxq(0, prov) is False
        assert nd.binding(1) == "io-uring"
        fr, fl, _ = flow.frames([1460] * 3)
        nic.deliver(1, fr, fl)
        b = nd.napi_poll(1)
        assert nd.mp_close_rxq(1, prov) is True
        assert nd.status()["rx_queues"][1]["binding"] == "none"
        assert nd.binding(1) == "io-uring"                    # 3 niovs still in skbs
        with pytest.raises(Misuse) as ei:
            nd.mp_check_rxq(1, 4096)
        assert ei.value.errno == errno.EEXIST
        nd.check_ledger()
        store.free(b.handles)
        assert nd.binding(1) == "none" and area.check_ledger()["free"] == 256
        nd.mp_check_rxq(1, 4096)                              # bindable again
        nd.close()
        with pytest.raises(Misuse) as ei:
            nd.mp_check_rxq(1, 4096)
        assert ei.value.errno == errno.ENETDOWN
    finally:
        area.close()


def test_failed_binding_falls_back_to_kernel_pages(
        dev: tuple[NetDevice, FakeNic, SkbStore], run_id: str) -> None:
    nd, _nic, _store = dev
    nd.open()
    area = BufferSpace.create(region_name(run_id, "app1", "area0"), 16, 4096)
    try:
        prov = AreaProvider(area)
        prov.dma_map_id = -3                     # a provider with a broken mapping
        with pytest.raises(Misuse):
            nd.queue_restart(0, prov)
        st = nd.status()["rx_queues"][0]
        assert st["started"] and st["binding"] == "none" and st["posted"] == 64
        assert area.check_ledger()["free"] == 16 and area.pools == {}
        nd.check_ledger()
    finally:
        area.close()


def test_ethtool_pass_through_and_stats(dev: tuple[NetDevice, FakeNic, SkbStore]) -> None:
    nd, nic, _ = dev
    nd.open()
    r = nd.ethtool({"cmd": "rss-get", "dev": "eth0", "context": 0})
    assert r["indir"][:4] == [0, 1, 0, 1]
    assert nic.calls[-1] == ("nic.ethtool", {"dev": "eth0", "request": {
        "cmd": "rss-get", "dev": "eth0", "context": 0}})
    nd.napi_poll(0)
    s = nd.ethtool({"cmd": "stats-get", "dev": "eth0"})["stats"]
    assert s["rx-0.rx_packets"] == 5 and s["rx-0.drv_napi_polls"] == 1
    assert s["rx-1.drv_buffers_posted"] == 64


# --------------------------------------------------------------------------------------------
# Into TCP
# --------------------------------------------------------------------------------------------

def test_napi_batches_feed_the_socket_table(dev: tuple[NetDevice, FakeNic, SkbStore]) -> None:
    nd, nic, store = dev
    nd.open()
    table = SocketTable()
    table.listen(DPORT)
    flows = [Flow(stream=1), Flow("fd00::2", "fd00::1", stream=2)]
    for f in flows:
        fr, fl, _ = f.frames([0], wire.TCP_SYN)
        nic.deliver(0, fr, fl)
    sizes = [[1460, 1460, 900], [1400, 1400, 1400, 7]]
    for i in range(4):
        for f, sz in zip(flows, sizes, strict=True):
            if i < len(sz):
                fr, fl, _ = f.frames([sz[i]])
                nic.deliver(0, fr, fl)
    for f in flows:
        fr, fl, _ = f.frames([0], wire.TCP_ACK | wire.TCP_FIN)
        nic.deliver(0, fr, fl)
    b = poll_all(nd, 0, budget=5)
    res = table.ingest_batch(b.keys, b.seq, b.payload_len, b.tcp_flags, b.handles)
    store.free(res.freed)
    for f, sz in zip(flows, sizes, strict=True):
        sock = table.lookup(f.key)
        assert sock is not None and sock.rxq.nbytes == sum(sz) and sock.fin_reached
        pieces = sock.rxq.peek()
        dst = np.empty(pieces.nbytes, dtype=np.uint8)
        store.copy_out(pieces.handles, pieces.offsets, pieces.lengths, dst)
        assert pattern.verify(f.stream, 0, dst) == -1
        store.free(sock.rxq.consume(pieces.nbytes))
        assert sock.at_eof
    nd.check_ledger()
    for f in flows:
        sock = table.lookup(f.key)
        assert sock is not None
        store.free(table.close(sock))
    assert store.in_flight == 0


# --------------------------------------------------------------------------------------------
# Property: any frame sizes, placements, budgets and free orders keep bytes and the ledger
# --------------------------------------------------------------------------------------------

@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(sizes=st.lists(st.integers(0, 1460), min_size=1, max_size=80),
       buf_len=st.sampled_from([512, 4096]), hds=st.sampled_from([None, 0, 300]),
       data=st.data())
def test_random_traffic_keeps_bytes_and_ledger(run_id: str, sizes: list[int], buf_len: int,
                                               hds: int | None, data: st.DataObject) -> None:
    nd, nic, store = make_dev(run_id, ring_size=16, rx_buf_len=buf_len, queues=1)
    try:
        nd.open()
        flow = Flow()
        frames, flen, _ = flow.frames(sizes)
        sent = polled = 0
        held: list[NapiBatch] = []
        out: list[np.ndarray] = []
        while polled < len(sizes):
            if sent < len(sizes):
                k = data.draw(st.integers(1, 16))
                sent += nic.deliver(0, frames[sent:sent + k], flen[sent:sent + k],
                                    split=hds is not None, hds_thresh=hds or 0)
            b = nd.napi_poll(0, budget=data.draw(st.integers(1, 20)))
            polled += b.completions
            if len(b):
                out.append(payload_bytes(store, b))
                held.append(b)
            free_one = data.draw(st.booleans())
            if held and free_one:
                victim = held.pop(data.draw(st.integers(0, len(held) - 1)))
                store.free(victim.handles)
                nd.refill(0)
            if b.doorbell:
                nic.doorbell(0)
            nd.check_ledger()
        got = np.concatenate(out) if out else np.empty(0, np.uint8)
        assert len(got) == sum(sizes) and pattern.verify(flow.stream, 0, got) == -1
        for b in held:
            store.free(b.handles)
        led = nd.status()["rx_queues"][0]["ledger"]
        assert led["in_skb"] == 0 and sum(led.values()) == 32
        nd.check_ledger()
    finally:
        teardown(nd, nic, store)


def test_check_ledger_sees_a_lost_reference(dev: tuple[NetDevice, FakeNic, SkbStore]) -> None:
    nd, nic, store = dev
    nd.open()
    flow = Flow()
    fr, fl, _ = flow.frames([100, 100])
    nic.deliver(0, fr, fl)
    b = nd.napi_poll(0)
    sp = nd.queues[0].space
    assert sp is not None
    buf = int(store.frags(b.handles[:1]).buf[0])
    sp.pp_ref[buf] += 1                                      # a reference nobody holds
    with pytest.raises(InvariantBroken, match="holders"):
        nd.check_ledger()
    sp.pp_ref[buf] -= 1
    store.free(b.handles)
    nd.check_ledger()
