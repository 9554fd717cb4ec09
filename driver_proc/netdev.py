"""The NIC driver, kernel side: probe, RX queues, page pools, NAPI, skbs (no sockets here).

Who owns what
-------------
Per RX queue the driver creates, owns and finally unlinks two regions, both DMA-mapped for the
NIC with ``nic.dma_map`` (the contract is :mod:`shared.nicif`):

* the **queue region** ``/zcrx.<run>.kernel.<dev>.q<N>``: fill ring (the driver produces
  ``nic_rx_desc``), completion ring (the NIC produces ``nic_rx_cqe``) and header slots (the
  NIC writes, the driver reads until it releases the completion);
* the **page-pool region** ``/zcrx.<run>.kernel.<dev>.q<N>.pp<gen>``: the queue's kernel
  pages (:class:`~driver_proc.page_pool.BufferSpace`), a new generation per queue setup, so
  a restarted queue gets a fresh pool while skbs still hold buffers of the old one (delayed
  destruction: the old region is unlinked when its last buffer comes home).  A queue bound
  to a memory provider (a zcrx ifq, :meth:`NetDevice.mp_open_rxq`) uses the provider's
  spaces instead: a :class:`~driver_proc.page_pool.SpaceSet` (the ifq's areas, each its own
  DMA mapping), whose buffer keys the posted FIFO holds; a fill descriptor's IOVA is its
  space's mapping plus ``buffer * buf_len``.

The driver trusts nothing the NIC writes: the completion ring is read as an untrusted peer's
(tail clamped, faults counted), every completion is validated (header slot = ring index,
``hdr_len`` within the slot, exactly one placement flag, ``nr_frags`` consistent with
``data_len`` and with the buffers actually posted, the parsed headers agreeing with the split),
and frags are recovered from the driver's own FIFO of posted buffers, never from an address
or id the NIC reports.  A bad completion or a malformed frame is counted and dropped, its
buffers recycled.

NAPI (:meth:`NetDevice.napi_poll`) is one batch: peek up to ``budget`` completions, validate,
parse all headers in one :func:`shared.wire.parse_slots` call straight from the header slots,
build every skb in one :meth:`SkbStore.add_batch`, release the completions, repost buffers
with one ring push.  The result (:class:`NapiBatch`) is ready for
:meth:`driver_proc.tcp.SocketTable.ingest_batch`.

The NIC admin client is anything with ``call(type, body) -> dict`` (a
:class:`shared.control.ControlClient` in production, a fake in tests).  Events are the process
loop's business: :meth:`NetDevice.napi_poll` and :meth:`NetDevice.refill` *return* whether a
``nic.doorbell`` is due, and :meth:`NetDevice.napi_complete` arms the queue's interrupt.

Departure (documented): stopping a queue drains the completions the NIC already published and
hands them up like a poll (:meth:`NetDevice.queue_stop` returns them), instead of dropping
them, so a queue restart (ring resize, zcrx binding) loses no data.  Each ``nic.queue_start``
begins with both rings empty at counter 0; the driver re-initialises the ring words while the
queue is stopped.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import numpy as np
from numpy.typing import NDArray

from driver_proc.page_pool import (
    KEY_MASK,
    KEY_SHIFT,
    BufferSpace,
    IdFifo,
    KernelPagesProvider,
    MemoryProvider,
    PagePool,
    SpaceSet,
)
from driver_proc.skb import SkbStore
from driver_proc.tcp import FLOW_KEY_LEN, flow_keys
from shared import abi, nicif, wire
from shared.errors import InvariantBroken, Misuse, PeerMisbehaved, ZcrxError
from shared.msg import ControlError
from shared.ring import RingConsumer, RingProducer
from shared.shm import PAGE_SIZE, Region, region_name
from shared.txring import TxConsumer, TxLayout, TxProducer, tx_region_object, tx_slot_size

#: Slots of the control-frame ring (ARP / ICMPv6 from the NIC).
CTL_RING = 64
#: our end of a ring shared with the NIC (:meth:`NetDevice._ring_start`)
_End = TypeVar("_End", TxProducer, TxConsumer)

__all__ = [
    "QUEUE_STATS",
    "MpNetdev",
    "NapiBatch",
    "NetDevice",
    "NicAdmin",
]

#: Driver counters per RX queue (``status()["queues"][i]["stats"]``, ``ethtool -S`` rx-N.*).
QUEUE_STATS = (
    "rx_packets",        # wire frames handed up (a HW-GRO skb counts its segments)
    "rx_bytes",          # their wire bytes (L2 header included)
    "rx_dropped",        # frames dropped by the driver (the two causes below)
    "bad_completions",   # completions breaking the NIC contract
    "bad_frames",        # frames the NIC flagged or whose headers did not parse
    "napi_polls",        # napi_poll calls
    "completions",       # completions consumed
    "rx_split",          # frames with payload in data buffers
    "rx_linear",         # frames with payload in the header slot (copied to the skb)
    "rx_frags",          # data buffers consumed by completions
    "buffers_posted",    # descriptors posted on the fill ring
    "alloc_short",       # refills that got fewer buffers than the ring had room for
    "doorbells",         # refills that found the NIC waiting (a nic.doorbell is due)
    "irq_arms",          # napi_complete / start armed the interrupt
    "irq_rearm_races",   # work found right after arming (polled again at once)
    "ring_faults",       # impossible ring counters written by the NIC
    "stop_drained",      # completions drained while stopping the queue
    "stop_reclaimed",    # posted buffers taken back while stopping the queue
    "rx_hw_gro_packets",       # HW-GRO skbs handed up (NIC_CQE_F_GRO completions)
    "rx_hw_gro_wire_packets",  # the wire segments in them
)
(_RX_PACKETS, _RX_BYTES, _RX_DROPPED, _BAD_COMPLETIONS, _BAD_FRAMES, _NAPI_POLLS, _COMPLETIONS,
 _RX_SPLIT, _RX_LINEAR, _RX_FRAGS, _BUFFERS_POSTED, _ALLOC_SHORT, _DOORBELLS, _IRQ_ARMS,
 _IRQ_REARM_RACES, _RING_FAULTS, _STOP_DRAINED, _STOP_RECLAIMED, _RX_GRO_PACKETS,
 _RX_GRO_WIRE_PACKETS) = range(len(QUEUE_STATS))
assert QUEUE_STATS[_STOP_RECLAIMED] == "stop_reclaimed" and QUEUE_STATS[_IRQ_ARMS] == "irq_arms"
_EMPTY_I64 = np.empty(0, dtype=np.int64)
_EMPTY_I64.flags.writeable = False
_KEY_DTYPE = np.dtype(f"V{FLOW_KEY_LEN}")
_MAX_MAP_ID = (1 << (64 - abi.NIC_IOVA_SHIFT)) - 1
_F_PLACE = np.uint16(abi.NIC_CQE_F_SPLIT | abi.NIC_CQE_F_LINEAR)
_F_LINEAR = np.uint16(abi.NIC_CQE_F_LINEAR)
_F_GRO = np.uint16(abi.NIC_CQE_F_GRO)
#: most segments a HW-GRO completion may claim, and the longest frame it may describe
GRO_MAX_SEGS = 64
GRO_MAX_FRAME = 0xFFFF + 14
#: placement bits -> bad: neither or both of SPLIT and LINEAR
_BAD_PLACE = np.array([(f & abi.NIC_CQE_F_SPLIT != 0) == (f & abi.NIC_CQE_F_LINEAR != 0)
                       for f in range(4)], dtype=np.bool_)


def _background_thread() -> None:
    """Lower the calling thread (only: Linux keeps a nice value per thread) to nice 19, so
    work done off the setup path takes only CPU time nobody else wants."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except OSError:
        pass


class NicAdmin(Protocol):
    """The NIC's admin surface as the driver sees it (``ControlClient.call``, and
    ``ControlClient.call_many`` for commands pipelined in one round trip)."""

    def call(self, type: str, body: Mapping[str, Any] | None = None) -> dict[str, Any]: ...

    def call_many(self, requests: Sequence[tuple[str, Mapping[str, Any] | None]]
                  ) -> list[dict[str, Any] | ControlError]: ...


class MpNetdev(Protocol):
    """A netdev as a memory provider (io_uring zcrx) sees it: its identity, DMA mapping of the
    provider's own memory, and binding the provider to one RX queue (Linux's
    ``net_mp_open_rxq`` / ``net_mp_close_rxq``).  Everything else (queues, pools, the drained
    frames) stays the driver's."""

    name: str
    ifindex: int

    def dma_map(self, name: str, size: int, *, fd: int = -1) -> int: ...

    def dma_unmap(self, map_id: int) -> None: ...

    def mp_check_rxq(self, q: int, rx_page_size: int, *, claimed: bool = False) -> None: ...

    def mp_open_rxq(self, q: int, provider: MemoryProvider) -> None: ...

    def mp_close_rxq(self, q: int, provider: MemoryProvider) -> bool: ...


@dataclass
class NapiBatch:
    """One poll's frames, in completion order, ready for ``SocketTable.ingest_batch``.

    ``keys`` are flow keys (``V36``, remote = sender first), ``seq`` u32, ``payload_len``
    int64 (TCP payload, padding excluded), ``tcp_flags`` u8, ``handles`` int64 skb handles
    (the caller now owns them: TCP frees them or returns them).  ``completions`` is how many
    completions were consumed, ``dropped`` how many of them were dropped, ``posted`` the
    buffers reposted, ``doorbell`` whether the NIC waits for buffers (send ``nic.doorbell``).
    """

    queue: int
    keys: NDArray[np.void]
    seq: NDArray[np.uint32]
    payload_len: NDArray[np.int64]
    tcp_flags: NDArray[np.uint8]
    handles: NDArray[np.int64]
    completions: int = 0
    dropped: int = 0
    posted: int = 0
    doorbell: bool = False
    #: the segments' acknowledgment numbers (u32), for the transmit side
    ack_seq: NDArray[np.uint32] = field(default_factory=lambda: np.empty(0, np.uint32))
    #: the segments' windows (u16, unscaled), for the transmit side of connections that send
    window: NDArray[np.uint16] = field(default_factory=lambda: np.empty(0, np.uint16))
    #: the senders' MACs, ``(n, 6)`` uint8 (whom to answer)
    src_mac: NDArray[np.uint8] = field(default_factory=lambda: np.empty((0, 6), np.uint8))
    #: row -> TCP option bytes, for the SYNs of the batch only (MSS, window scale)
    syn_options: dict[int, bytes] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.handles)

    @classmethod
    def empty(cls, queue: int) -> NapiBatch:
        return cls(queue, np.empty(0, dtype=_KEY_DTYPE), np.empty(0, dtype=np.uint32),
                   _EMPTY_I64, np.empty(0, dtype=np.uint8), _EMPTY_I64)

    @classmethod
    def concat(cls, queue: int, batches: list[NapiBatch]) -> NapiBatch:
        """One batch holding every frame of ``batches`` in order (counters summed)."""
        if not batches:
            return cls.empty(queue)
        if len(batches) == 1:
            return batches[0]
        syn: dict[int, bytes] = {}
        base = 0
        for b in batches:
            syn.update((base + r, o) for r, o in b.syn_options.items())
            base += len(b)
        return cls(queue, np.concatenate([b.keys for b in batches]),
                   np.concatenate([b.seq for b in batches]),
                   np.concatenate([b.payload_len for b in batches]),
                   np.concatenate([b.tcp_flags for b in batches]),
                   np.concatenate([b.handles for b in batches]),
                   completions=sum(b.completions for b in batches),
                   dropped=sum(b.dropped for b in batches),
                   posted=sum(b.posted for b in batches),
                   doorbell=any(b.doorbell for b in batches),
                   ack_seq=np.concatenate([b.ack_seq for b in batches]),
                   window=np.concatenate([b.window for b in batches]),
                   src_mac=np.concatenate([b.src_mac for b in batches]),
                   syn_options=syn)


@dataclass
class _RxQueue:
    """One RX queue's kernel state; every member may be missing during setup/teardown."""

    index: int
    ring_size: int
    slot_size: int
    layout: nicif.QueueLayout
    region: Region | None = None
    map_id: int | None = None
    provider: MemoryProvider | None = None
    space: BufferSpace | None = None
    #: the spaces the pool draws from (posted FIFO entries are keys of this set)
    spaces: SpaceSet | None = None
    space_map_id: int | None = None
    own_space_map: bool = False
    own_space: bool = False
    pool: PagePool | None = None
    fill: RingProducer | None = None
    comp: RingConsumer | None = None
    slots: NDArray[np.uint8] | None = None
    posted: IdFifo = field(default_factory=lambda: IdFifo(1))
    desc: NDArray[np.void] = field(default_factory=lambda: np.zeros(0, abi.nic_rx_desc))
    expect: NDArray[np.int64] = field(default_factory=lambda: _EMPTY_I64)
    #: IOVA of buffer 0 of each space of ``spaces`` (each its own DMA mapping)
    iova_bases: NDArray[np.uint64] = field(
        default_factory=lambda: np.zeros(1, dtype=np.uint64))
    buf_len: int = 0
    started: bool = False
    #: DMA mappings to remove when the queue next starts (a restart's old page pool): the
    #: NIC removes them with the ``nic.queue_start`` that follows, one admin command
    unmap_at_start: list[int] = field(default_factory=list)

    @property
    def binding(self) -> str:
        kind = self.provider.kind if self.provider is not None else "pages"
        return "none" if kind == "pages" else kind


class NetDevice:
    """One netdev of the NIC, driven from the kernel.

    Args:
        info: the netdev dict from ``nic.probe`` (:data:`shared.nicif.NETDEV_FIELDS`).
        nic: the NIC admin client.
        run: the run id (region names).
        skbs: the kernel's skb store (shared by every netdev).
        owner: the region owner field (``kernel``).
        pp_buffers: kernel-page buffers per queue (default twice the ring size: a full
            ring plus as much again in skbs before the queue starves).
    """

    def __init__(self, info: Mapping[str, Any], nic: NicAdmin, run: str, *, skbs: SkbStore,
                 owner: str = "kernel", pp_buffers: int | None = None) -> None:
        try:
            self.name = str(info["name"])
            self.ifindex = int(info["ifindex"])
            self.mac = info.get("mac")
            self.n_queues = int(info["queues"])
            self.max_queues = int(info["max_queues"])
            self.ring_size = int(info["ring_size"])
            self.max_ring_size = int(info["max_ring_size"])
            self.mtu = int(info["mtu"])
            self.tcp_data_split = info.get("tcp_data_split")
            self.hds_thresh = int(info.get("hds_thresh", 0))
            self.hds_thresh_max = int(info.get("hds_thresh_max", 0))
            self.rx_buf_len = int(info["rx_buf_len"])
            self.link_up = bool(info.get("link_up", True))
            self.stats_index = info.get("stats_index")
        except (KeyError, TypeError, ValueError) as exc:
            raise PeerMisbehaved(f"bad netdev description from nic.probe: {exc!r}") from None
        if not (0 < self.n_queues <= self.max_queues <= nicif.MAX_QUEUES):
            raise PeerMisbehaved(f"{self.name}: bad queue counts {self.n_queues}/"
                                 f"{self.max_queues}")
        _check_ring_size(self.ring_size, self.max_ring_size, PeerMisbehaved)
        if self.rx_buf_len <= 0 or self.mtu < 68:
            raise PeerMisbehaved(f"{self.name}: bad rx_buf_len {self.rx_buf_len} or mtu")
        self.nic = nic
        self.run = run
        self.owner = owner
        self.skbs = skbs
        self.pp_buffers = pp_buffers
        self.queues: dict[int, _RxQueue] = {}
        #: the NAPI poll list: started queues whose interrupt fired and that a poll has not
        #: yet found idle (an ordered set; see :meth:`napi_schedule`, :meth:`napi_complete`)
        self.poll_list: dict[int, None] = {}
        self.stats = np.zeros((self.max_queues, len(QUEUE_STATS)), dtype=np.int64)
        #: pools of freed queues still waiting for buffers held by skbs or users
        self.dying: list[PagePool] = []
        #: frames drained from queues stopped by configuration changes; take_drained()
        self.drained: list[NapiBatch] = []
        #: queues whose memory provider was detached (restart without it) while buffers are
        #: still out: queue -> the dying pool.  The provider counts as attached until that
        #: pool is destroyed (status shows it, tcp-data-split stays locked, zcrx -EEXIST).
        self.mp_draining: dict[int, PagePool] = {}
        self.up = False
        self.nic_alive = True
        self._pp_gen = [0] * self.max_queues
        #: while :meth:`close` runs: the DMA unmaps gathered for one command at its end
        self._unmap_batch: list[int] | None = None
        #: one thread that gives new header slots their pages off the probe's path
        self._populator: Any = None
        self.addr = str(info.get("addr", ""))
        self.addr6 = str(info.get("addr6", ""))
        ring = info.get("tx_ring_size", self.ring_size)
        self.tx_ring_size = ring if isinstance(ring, int) and nicif.is_pow2(ring) \
            and ring <= nicif.MAX_RING else self.ring_size
        #: the TX ring (shared.txring) while the device is open; None otherwise
        self.tx: TxProducer | None = None
        self._tx_region: Region | None = None
        self._tx_map_id: int | None = None
        #: driver TX counters: frames queued on the TX ring, their bytes, frames dropped
        #: (ring full, too long, device down)
        self.tx_stats = {"tx_packets": 0, "tx_bytes": 0, "tx_dropped": 0, "tx_doorbells": 0,
                         "ctl_frames": 0}
        self._tx_doorbell = False
        #: the control-frame ring (ARP / ICMPv6 the NIC hands up), next to the TX ring
        self.ctl: TxConsumer | None = None
        self._ctl_region: Region | None = None
        self._ctl_map_id: int | None = None

    def __repr__(self) -> str:
        return f"NetDevice({self.name}, {self.n_queues} queues, ring {self.ring_size})"

    @property
    def slot_size(self) -> int:
        """Header slot bytes: a whole frame at this MTU (linear placement)."""
        return nicif.hdr_slot_size(wire.max_frame_len(self.mtu))

    # -- NIC calls ---------------------------------------------------------------------------

    def _call(self, type: str, body: Mapping[str, Any]) -> dict[str, Any]:
        return self.nic.call(type, body)

    def _dma_map(self, name: str, size: int, fd: int = -1) -> int:
        return self._dma_map_many([(name, size, fd)])[0]

    def _dma_map_many(self, regions: Sequence[tuple[str, int, int]]) -> list[int]:
        """Map ``(name, size, fd)`` regions in one pipelined batch of ``nic.dma_map``; their
        map ids.  All or nothing: if one fails, the others are unmapped again and the first
        error is raised."""
        reqs = []
        for name, size, fd in regions:
            body: dict[str, Any] = {"name": name, "size": int(size)}
            if fd >= 0:
                # app memory: the NIC maps the inode behind our descriptor, never a name
                st = os.fstat(fd)
                body.update(fd=fd, dev=st.st_dev, ino=st.st_ino)
            reqs.append(("nic.dma_map", body))
        ids: list[int] = []
        error: ZcrxError | None = None
        for reply in self.nic.call_many(reqs):
            map_id = None if isinstance(reply, ControlError) else reply.get("map_id")
            if isinstance(map_id, int) and 0 <= map_id <= _MAX_MAP_ID:
                ids.append(map_id)
            elif error is None:
                error = reply if isinstance(reply, ControlError) else PeerMisbehaved(
                    f"nic.dma_map answered map id {map_id!r}")
        if error is not None:
            if ids:
                self._dma_unmap_many(ids)
            raise error
        return ids

    def _dma_unmap(self, map_id: int) -> None:
        if not self.nic_alive:
            return
        if self._unmap_batch is not None:
            self._unmap_batch.append(map_id)
            return
        try:
            self._call("nic.dma_unmap", {"map_id": map_id})
        except ZcrxError:
            # Teardown goes on: the mapping dies with the NIC or is already gone.
            pass

    def dma_map(self, name: str, size: int, *, fd: int = -1) -> int:
        """Map region ``name`` (``size`` bytes) for the NIC's DMA; returns the map id (a memory
        provider maps its own memory, e.g. a zcrx area, with this).  ``fd``: this process's
        descriptor of app memory (the one ``mm_map`` checked): the NIC opens
        ``/proc/<our pid>/fd/<fd>`` and checks the inode, so the name is only a label."""
        return self._dma_map(name, size, fd)

    def dma_unmap(self, map_id: int) -> None:
        """Undo :meth:`dma_map` (best effort: nothing to do once the NIC is gone)."""
        self._dma_unmap(map_id)

    # -- device open/close -------------------------------------------------------------------

    def open(self) -> None:
        """Set up and start every queue and the TX ring (``ndo_open``).  The NIC commands of
        all queues go in two pipelined batches (maps, then starts), not three round trips
        a queue."""
        self.queues_setup([q for q in range(self.n_queues) if q not in self.queues])
        self.queues_start([q for q in range(self.n_queues) if not self.queues[q].started])
        if self.tx is None:
            self.tx_open()
        self.up = True

    def close(self, *, nic_alive: bool = True) -> list[NapiBatch]:
        """Stop and free every queue; return the frames drained on the way.

        ``nic_alive=False`` (surprise removal: the NIC process is gone) tears down without
        asking the NIC anything and drops what its rings still hold.
        """
        if not nic_alive:
            self.nic_alive = False
        out = []
        # Every queue and ring is stopped before its mapping goes, so the unmaps of the whole
        # device go to the NIC as one command at the end (``nic.dma_unmap`` ``more``), as an
        # IOMMU batches its invalidations, not one round trip each (three per queue).
        batch: list[int] = []
        self._unmap_batch = batch
        try:
            for q in sorted(self.queues):
                if self.queues[q].started:
                    out.append(self.queue_stop(q))
                self.queue_free(q)
            self.tx_close()
        finally:
            self._unmap_batch = None
            if batch:
                self._dma_unmap_many(batch)
            if self._populator is not None:  # each job closes its own descriptor
                self._populator.shutdown(wait=True)
                self._populator = None
        self.up = False
        return out

    def _dma_unmap_many(self, map_ids: list[int]) -> None:
        """Remove several mappings in one NIC command (best effort, as :meth:`_dma_unmap`)."""
        if not self.nic_alive:
            return
        try:
            self._call("nic.dma_unmap", {"map_id": map_ids[0], "more": map_ids[1:]})
        except ZcrxError:
            pass

    # -- TX ----------------------------------------------------------------------------------

    def tx_open(self) -> None:
        """Create the TX ring region, map it for the NIC and attach it (``nic.tx_start``);
        then the control-frame ring (``<dev>.rxctl``, ``nic.ctl_start``)."""
        layout = TxLayout(self.tx_ring_size, tx_slot_size(self.mtu))
        self._tx_region, self.tx, self._tx_map_id = self._ring_start(
            tx_region_object(self.name), layout, "nic.tx_start",
            lambda buf: TxProducer(buf, layout, init=True,
                                   max_frame=wire.max_frame_len(self.mtu)))
        ctl = TxLayout(CTL_RING, tx_slot_size(self.mtu))

        def consumer(buf: Any) -> TxConsumer:
            TxProducer(buf, ctl, init=True).detach()  # the NIC produces; we lay it out
            return TxConsumer(buf, ctl, untrusted=True)

        try:
            self._ctl_region, self.ctl, self._ctl_map_id = self._ring_start(
                f"{self.name}.rxctl", ctl, "nic.ctl_start", consumer)
        except BaseException:
            self.tx_close()
            raise

    def ctl_frames(self) -> list[bytes]:
        """ARP / ICMPv6 frames the NIC handed up since the last call (copies)."""
        ctl = self.ctl
        if ctl is None or not ctl.ready():
            return []
        out: list[bytes] = []
        while True:
            batch = ctl.peek(CTL_RING)
            if not ctl.held:
                break
            out.extend(batch.frames())
            ctl.release()
        self.tx_stats["ctl_frames"] += len(out)
        return out

    def _ring_start(self, obj: str, layout: TxLayout, start: str,
                    attach: Callable[[Any], _End]) -> tuple[Region, _End, int]:
        """A ring the NIC shares with us: its region ``obj`` (this kernel's), our end of it
        (``attach(buf)``), its DMA mapping, and the NIC told (``start``).  What was made is
        undone if a step fails."""
        region = Region.create(region_name(self.run, self.owner, obj), layout.size)
        end: _End | None = None
        map_id = None
        try:
            assert region.buf is not None
            end = attach(region.buf)
            map_id = self._dma_map(region.name, region.size)
            self._call(start, {"dev": self.name, "map_id": map_id,
                               "ring_size": layout.ring_size, "slot_size": layout.slot_size})
        except BaseException:
            self._ring_stop(None, end, map_id, region)
            raise
        return region, end, map_id

    def _ring_stop(self, stop: str | None, end: TxProducer | TxConsumer | None,
                   map_id: int | None, region: Region | None) -> None:
        """Undo :meth:`_ring_start`: tell the NIC (``stop``, if it is alive and the ring
        was started), unmap, detach our end, unlink the region."""
        if stop is not None and end is not None and self.nic_alive:
            try:
                self._call(stop, {"dev": self.name})
            except ZcrxError:
                pass
        if map_id is not None:
            self._dma_unmap(map_id)
        if end is not None:
            end.detach()
        if region is not None:
            region.close()

    def tx_close(self) -> None:
        """Detach the NIC from the TX and control rings (``nic.tx_stop``, ``nic.ctl_stop``),
        unmap and unlink them."""
        self._ring_stop("nic.tx_stop", self.tx, self._tx_map_id, self._tx_region)
        self.tx = self._tx_map_id = self._tx_region = None
        self._ring_stop("nic.ctl_stop", self.ctl, self._ctl_map_id, self._ctl_region)
        self.ctl = self._ctl_map_id = self._ctl_region = None

    def xmit(self, frames: list[bytes]) -> int:
        """Queue whole frames on the TX ring (``ndo_start_xmit`` for a batch); returns how
        many were queued.  The rest (ring full, too long, device closed) are counted
        ``tx_dropped``.  A doorbell is due (:meth:`take_tx_doorbell`) if the NIC sleeps."""
        if not frames:
            return 0
        tx = self.tx
        if tx is None:
            self.tx_stats["tx_dropped"] += len(frames)
            return 0
        before = tx.dropped
        n = tx.send(frames)
        self.tx_stats["tx_dropped"] += tx.dropped - before
        self.tx_stats["tx_packets"] += n
        self.tx_stats["tx_bytes"] += sum(len(f) for f in frames[:n]) if n == len(frames) \
            else 0
        if tx.doorbell_due():
            self.tx_stats["tx_doorbells"] += 1
            self._tx_doorbell = True
        return n

    def take_tx_doorbell(self) -> bool:
        """True once after :meth:`xmit` found the NIC asleep on the TX ring."""
        due, self._tx_doorbell = self._tx_doorbell, False
        return due

    # -- queue management (paired verbs: setup/free, start/stop) -----------------------------

    def _q(self, q: int) -> _RxQueue:
        rq = self.queues.get(q)
        if rq is None:
            raise Misuse(f"{self.name}: queue {q} is not set up", errno=errno.ENOENT)
        return rq

    def queue_setup(self, q: int, provider: MemoryProvider | None = None) -> None:
        """Allocate queue memory: the queue region and the page pool, both DMA-mapped.

        ``provider``: the memory provider of the new page pool (None: kernel pages in a new
        ``pp<gen>`` region).  Raises :class:`Misuse` (ERANGE) for a queue beyond the channel
        count, (EEXIST) if it is set up already; NIC refusals propagate after unwinding.
        """
        self.queues_setup([q], {q: provider})

    def queues_setup(self, qs: Sequence[int],
                     providers: Mapping[int, MemoryProvider | None] | None = None) -> None:
        """:meth:`queue_setup` of several queues (``providers``: per queue, default kernel
        pages), their DMA mappings in one pipelined batch.  All or nothing: on any failure
        every queue of the batch is unwound and the error propagates."""
        seen: set[int] = set()
        for q in qs:
            if not 0 <= q < self.n_queues:
                raise Misuse(f"{self.name}: no queue {q} ({self.n_queues} channels)",
                             errno=errno.ERANGE)
            if q in self.queues or q in seen:
                raise Misuse(f"{self.name}: queue {q} already set up", errno=errno.EEXIST)
            seen.add(q)
        layout = nicif.QueueLayout(self.ring_size, self.slot_size)
        rqs: list[_RxQueue] = []
        try:
            maps: list[tuple[str, int, int]] = []
            for q in qs:
                rq = _RxQueue(q, self.ring_size, self.slot_size, layout)
                rqs.append(rq)
                # The rings' pages now; the header slots' from a helper thread once the
                # batch is set up (_populate): the probe does not wait for 4 MiB a queue of
                # zero-filling, and the data path does not take a fault per slot (the NIC
                # writes one header per frame on any queue: 4096 first-store faults cost a
                # short 4 KiB bench 6 %).  A frame that comes first faults its slot in.
                rq.region = Region.create(
                    region_name(self.run, self.owner, nicif.queue_region_object(self.name, q)),
                    layout.size, allocate=layout.hdr_off, keep_fd=True)
                maps.append((rq.region.name, rq.region.size, -1))
                if self._pool_alloc(rq, (providers or {}).get(q)):
                    assert rq.space is not None
                    maps.append((rq.space.name, rq.space.region_size, -1))
            ids = iter(self._dma_map_many(maps))
            for rq in rqs:  # every id has its owner before anything else can fail
                rq.map_id = next(ids)
                if rq.space_map_id is None:
                    rq.space_map_id = next(ids)
                    rq.own_space_map = True
            for rq in rqs:
                self._pool_finish(rq)
        except BaseException:
            for rq in rqs:
                self._teardown(rq)
            raise
        for rq in rqs:
            rq.posted = IdFifo(rq.ring_size)
            rq.desc = np.zeros(rq.ring_size, dtype=abi.nic_rx_desc)
            rq.expect = np.arange(rq.ring_size, dtype=np.int64)
            self.queues[rq.index] = rq
        self._populate(rqs)

    def _populate(self, rqs: list[_RxQueue]) -> None:
        """Have the helper thread allocate the header slots of ``rqs`` (``fallocate``
        releases the GIL: it runs on the other core while this one goes on)."""
        jobs = []
        for rq in rqs:
            if rq.region is not None and rq.region.fd >= 0:
                off = rq.layout.hdr_off
                jobs.append(rq.region.allocate_later(off, rq.region.size - off))
        if not jobs:
            return
        if self._populator is None:
            from concurrent.futures import ThreadPoolExecutor

            self._populator = ThreadPoolExecutor(1, thread_name_prefix=f"{self.name}-pages",
                                                 initializer=_background_thread)
        for job in jobs:
            self._populator.submit(job)

    def _pool_setup(self, rq: _RxQueue, provider: MemoryProvider | None) -> None:
        """The queue's new page pool: on ``provider``'s memory, or (None) on kernel pages in
        a new ``pp<gen>`` region, DMA-mapped.  The caller unwinds a failure
        (:meth:`_teardown` or :meth:`_pool_free`)."""
        if self._pool_alloc(rq, provider):
            assert rq.space is not None
            rq.space_map_id = self._dma_map(rq.space.name, rq.space.region_size)
            rq.own_space_map = True
        self._pool_finish(rq)

    def _pool_alloc(self, rq: _RxQueue, provider: MemoryProvider | None) -> bool:
        """First half of :meth:`_pool_setup`: the pool's memory (kernel pages created now)
        and, when the provider has mapped its own, its map id.  True when the space still
        needs a DMA mapping of the driver's (``rq.space_map_id`` is then None)."""
        q = rq.index
        if provider is None:
            self._pp_gen[q] += 1
            count = self.pp_buffers or 2 * self.ring_size
            # The pool's pages are committed where the NIC first writes (tmpfs allocates
            # at that touch), not zero-filled here: a queue bound to a zcrx ifq right after
            # the probe never uses them, and at 64 queues of 1024 buffers the fill was
            # 256 MiB of zeroing in the probe.  A queue that stays on kernel pages pays one
            # page fault per buffer on its first pass round the ring instead.  /dev/shm
            # must have room for them now (ENOMEM otherwise).
            space = BufferSpace.create(
                region_name(self.run, self.owner, f"{self.name}.q{q}.pp{self._pp_gen[q]}"),
                count, self.rx_buf_len, touch=0)
            rq.space = space
            rq.own_space = True
            provider = KernelPagesProvider(space)
        rq.provider = provider
        rq.space = provider.space
        rq.spaces = provider.spaces
        rq.buf_len = rq.space.buf_len
        if provider.dma_map_id is None:
            return True
        if not 0 <= provider.dma_map_id <= _MAX_MAP_ID:
            raise Misuse(f"memory provider map id {provider.dma_map_id} out of range")
        rq.space_map_id = provider.dma_map_id
        return False

    def _pool_finish(self, rq: _RxQueue) -> None:
        """Second half of :meth:`_pool_setup`, once the space is mapped: the IOVAs of its
        spaces and the page pool itself."""
        assert rq.provider is not None
        self._map_spaces(rq)
        own = rq.own_space
        rq.pool = PagePool(rq.provider, name=f"{self.name}.q{rq.index}",
                           on_destroyed=lambda pool: self._pool_destroyed(pool, own))

    def _map_spaces(self, rq: _RxQueue) -> None:
        """The IOVA of buffer 0 of each space of the queue's set: the driver's own mapping
        for space 0 of kernel pages, the provider's for every space of a provider (a zcrx
        area is mapped at registration, an added one when it is added)."""
        assert rq.spaces is not None and rq.provider is not None
        bases = np.empty(len(rq.spaces), dtype=np.uint64)
        for i, sp in enumerate(rq.spaces.spaces):
            mid = rq.space_map_id if i == 0 else rq.provider.map_id(i)
            if mid is None or not 0 <= mid <= _MAX_MAP_ID:
                raise Misuse(f"{sp}: no DMA mapping for the NIC (map id {mid})")
            bases[i] = abi.make_iova(mid, sp.offset)
        rq.iova_bases = bases

    def queue_start(self, q: int) -> None:
        """Post buffers (the fill ring full), start the NIC queue, arm its interrupt."""
        self.queues_start([q])

    def queues_start(self, qs: Sequence[int]) -> None:
        """:meth:`queue_start` of several queues, their ``nic.queue_start`` commands in one
        pipelined batch.  A queue the NIC refuses takes its buffers back and stays stopped;
        the others start; then the first refusal is raised."""
        rqs = [self._q(q) for q in qs]
        for rq in rqs:
            if rq.started:
                raise Misuse(f"{self.name}: queue {rq.index} already started",
                             errno=errno.EBUSY)
        try:
            replies = self.nic.call_many([("nic.queue_start", self._start_body(rq))
                                          for rq in rqs])
        except BaseException:
            for rq in rqs:
                self._reclaim(rq)
            raise
        error: ControlError | None = None
        for rq, reply in zip(rqs, replies, strict=True):
            if isinstance(reply, ControlError):
                self._reclaim(rq)
                error = error or reply
                continue
            rq.started = True
            # Scheduled, not armed: the NIC may complete frames the moment it has started
            # the queue, before an interrupt could be armed here, so the first poll looks;
            # an idle queue then arms its interrupt and leaves the list (napi_complete).
            self.poll_list[rq.index] = None
        if error is not None:
            raise error

    def _start_body(self, rq: _RxQueue) -> dict[str, Any]:
        """Reset the stopped queue's rings, post its buffers: the ``nic.queue_start``
        command that hands them to the NIC."""
        q = rq.index
        assert rq.region is not None and rq.region.buf is not None and rq.map_id is not None
        buf = rq.region.buf
        # Both rings start empty at counter 0 (the queue is stopped: nobody else writes).
        RingProducer(buf, rq.layout.fill).init_words()
        RingProducer(buf, rq.layout.comp).init_words()
        rq.fill = RingProducer(buf, rq.layout.fill, untrusted=True)
        rq.comp = RingConsumer(buf, rq.layout.comp, untrusted=True)
        rq.slots = rq.layout.hdr_slots(buf)
        self._refill(rq)
        body: dict[str, Any] = {"dev": self.name, "queue": q, "map_id": rq.map_id,
                                "ring_size": rq.ring_size, "slot_size": rq.slot_size}
        if rq.unmap_at_start:
            # the NIC removes these first, whatever becomes of the start
            body["unmap"], rq.unmap_at_start = rq.unmap_at_start, []
        return body

    def queue_stop(self, q: int) -> NapiBatch:
        """Stop the NIC queue, drain its completions, take back every unused posted buffer.

        Returns the drained frames (hand them to TCP like a poll's).  With the NIC gone
        (``close(nic_alive=False)``) nothing is drained.
        """
        rq = self._q(q)
        if not rq.started:
            return NapiBatch.empty(q)
        if self.nic_alive:
            self._call("nic.queue_stop", {"dev": self.name, "queue": q})
        rq.started = False
        self.poll_list.pop(q, None)
        batches = []
        if self.nic_alive:
            # The NIC has stopped: the completion tail is final.  Bounded against a NIC that
            # keeps writing anyway.
            for _ in range(4):
                b = self._poll(rq, rq.ring_size, refill=False)
                if b.completions == 0:
                    break
                batches.append(b)
        drained = NapiBatch.concat(q, batches)
        self.stats[q, _STOP_DRAINED] += drained.completions
        self._reclaim(rq)
        return drained

    def _reclaim(self, rq: _RxQueue) -> None:
        ids = rq.posted.pop(len(rq.posted))
        if len(ids):
            assert rq.spaces is not None
            rq.spaces.put_ref(ids)
            self.stats[rq.index, _STOP_RECLAIMED] += len(ids)

    def queue_free(self, q: int) -> None:
        """Free queue memory: unmap and unlink the queue region, destroy the page pool (its
        region goes when the last in-flight buffer comes home)."""
        rq = self._q(q)
        if rq.started:
            raise Misuse(f"{self.name}: queue {q} is running; stop it first", errno=errno.EBUSY)
        del self.queues[q]
        self._teardown(rq)

    def _teardown(self, rq: _RxQueue) -> None:
        """Undo whatever part of a queue exists (setup failures land here too)."""
        for ring in (rq.fill, rq.comp):
            if ring is not None:
                ring.detach()
        rq.fill = rq.comp = None
        rq.slots = None
        if rq.map_id is not None:
            self._dma_unmap(rq.map_id)
            rq.map_id = None
        if rq.region is not None:
            rq.region.close()
            rq.region = None
        for map_id in rq.unmap_at_start:
            self._dma_unmap(map_id)
        rq.unmap_at_start = []
        self._pool_free(rq)

    def _pool_free(self, rq: _RxQueue, *, at_start: bool = False) -> None:
        """Unmap and destroy the queue's page pool (its region goes when the last in-flight
        buffer comes home); the queue's rings are left alone.  ``at_start``: the queue is
        stopped and starts again next: its pool's DMA mapping goes with that start
        (:attr:`_RxQueue.unmap_at_start`) instead of a NIC round trip of its own."""
        if rq.own_space_map and rq.space_map_id is not None:
            if at_start:
                rq.unmap_at_start.append(rq.space_map_id)
            else:
                self._dma_unmap(rq.space_map_id)
        rq.space_map_id = None
        rq.own_space_map = False
        if rq.pool is not None:
            self._reclaim(rq)
            if not rq.pool.destroy():
                self.dying.append(rq.pool)
                if rq.binding != "none":
                    self.mp_draining[rq.index] = rq.pool
            rq.pool = None
        elif rq.space is not None and rq.own_space:
            rq.space.close()
        rq.space = rq.spaces = None
        rq.own_space = False
        rq.provider = None

    def _pool_destroyed(self, pool: PagePool, own_space: bool) -> None:
        """The last buffer of a freed queue's pool came home: forget it, and unlink its
        region if the driver created it (kernel pages; a provider's space is its own)."""
        if pool in self.dying:
            self.dying.remove(pool)
        for q in [q for q, p in self.mp_draining.items() if p is pool]:
            del self.mp_draining[q]
        if own_space:
            pool.space.close()

    def release_dying(self) -> int:
        """Unlink the names of dying pools' kernel-page regions now (kernel exit path).

        The pages stay mapped for the skbs that still use them; only ``/dev/shm`` forgets
        the names, so nothing is left behind if the process ends first.  Returns how many
        names were removed.
        """
        n = 0
        for pool in self.dying:
            region = pool.space.region
            if isinstance(pool.provider, KernelPagesProvider) and region is not None \
                    and region.is_owner:
                region.unlink()
                n += 1
        return n

    def queue_restart(self, q: int, provider: MemoryProvider | None = None) -> NapiBatch:
        """Stop, swap the page pool for one on ``provider`` (None: kernel pages), start;
        return the drained frames.  If the new pool or the start fails the queue comes back
        with kernel pages and the error propagates (``netdev_rx_queue_restart`` semantics).

        The queue's rings (fill, completion, header slots) and their DMA mapping are kept
        across the restart and start again empty at counter 0 (:meth:`queue_start`): the NIC
        stops and starts the queue for real and takes its buffers from the new pool, but
        the ring memory is not given back to the allocator and taken again, which cost two
        NIC round trips and a fresh ring region per restart (64 of them to bind one server
        on 64 queues).  Ring size changes go through :meth:`queue_free` /
        :meth:`queue_setup`, which do make new rings.  The old pool's DMA mapping is removed
        by the NIC with the start (``nic.queue_start`` ``unmap``), not in a command of its
        own: the queue is stopped meanwhile, so nothing DMAs into it."""
        rq = self._q(q)
        drained = self.queue_stop(q) if rq.started else NapiBatch.empty(q)
        for ring in (rq.fill, rq.comp):
            if ring is not None:
                ring.detach()
        rq.fill = rq.comp = None
        self._pool_free(rq, at_start=True)
        try:
            self._pool_setup(rq, provider)
            self.queue_start(q)
        except BaseException:
            self._pool_free(rq, at_start=True)
            if provider is not None:
                self._pool_setup(rq, None)
                self.queue_start(q)
            else:
                self.queue_free(q)  # no pool to run on: the queue is gone, as before
            self.drained.append(drained)
            raise
        return drained

    def take_drained(self) -> list[NapiBatch]:
        """Frames drained by configuration changes (set_channels, set_rings); feed to TCP."""
        out, self.drained = self.drained, []
        return [b for b in out if len(b) or b.completions]

    # -- memory providers (net_mp_open_rxq / net_mp_close_rxq) ------------------------------

    def mp_check_rxq(self, q: int, rx_page_size: int, *, claimed: bool = False) -> None:
        """Raise what :meth:`mp_open_rxq` would refuse, in Linux's order, changing nothing.

        ``-ERANGE`` for a queue beyond the channel count; ``-EOPNOTSUPP`` for buffers of
        ``rx_page_size`` bytes other than ``PAGE_SIZE`` or the configured ``rx-buf-len`` (the
        driver cannot post them); ``-EINVAL`` without tcp-data-split or with hds-thresh > 0;
        ``-EEXIST`` when the queue has a memory provider, also one still draining (or
        ``claimed``: the caller's own earlier binding is not destroyed yet); ``-ENETDOWN``
        when the queue is not set up (device down).  A provider checks this before it
        commits anything (io_uring copies its results out only after binding).
        """
        if not 0 <= q < self.n_queues:
            raise Misuse(f"{self.name}: no rx queue {q}", errno=errno.ERANGE)
        if rx_page_size != PAGE_SIZE and rx_page_size != self.rx_buf_len:
            raise Misuse(f"{self.name}: rx-buf-len is {self.rx_buf_len}, not {rx_page_size}",
                         errno=errno.EOPNOTSUPP)
        if self.tcp_data_split not in (True, "on"):
            raise Misuse("tcp-data-split is disabled", errno=errno.EINVAL)
        if self.hds_thresh:
            raise Misuse("hds-thresh must be 0", errno=errno.EINVAL)
        if claimed or self.binding(q) != "none":
            raise Misuse(f"{self.name} queue {q} already has a memory provider",
                         errno=errno.EEXIST)
        if q not in self.queues or not self.up:
            raise Misuse(f"{self.name} is down", errno=errno.ENETDOWN)

    def mp_open_rxq(self, q: int, provider: MemoryProvider) -> None:
        """Bind ``provider`` to queue ``q`` (``net_mp_open_rxq``): the checks of
        :meth:`mp_check_rxq`, then a restart whose new page pool takes its buffers from the
        provider.  Frames drained by the restart go to :meth:`take_drained`.  If the restart
        fails the queue is back on kernel pages and the error propagates."""
        self.mp_check_rxq(q, provider.space.buf_len)
        self.drained.append(self.queue_restart(q, provider))

    def mp_close_rxq(self, q: int, provider: MemoryProvider) -> bool:
        """Unbind ``provider`` from queue ``q`` (``net_mp_close_rxq``): restart the queue on
        kernel pages; the provider's pool is destroyed once its buffers come home (until then
        :meth:`binding` still reports it).  Drained frames go to :meth:`take_drained`.

        Returns False, doing nothing, when the queue is not set up or runs another provider
        (Linux warns and leaves it); a failing restart raises (:class:`ZcrxError`)."""
        rq = self.queues.get(q)
        if rq is None or rq.provider is not provider:
            return False
        self.drained.append(self.queue_restart(q, None))
        return True

    # -- NAPI --------------------------------------------------------------------------------

    def napi_poll(self, q: int, budget: int = 256) -> NapiBatch:
        """Process up to ``budget`` completions of queue ``q`` and repost buffers.

        Fewer than ``budget`` completions may be returned while more are ready (a batch
        stops at the ring's wrap point); poll again, or call :meth:`napi_complete`, which
        reports work that is still there.  A stopped queue returns an empty batch.
        """
        rq = self.queues.get(q)
        if rq is None or not rq.started:
            return NapiBatch.empty(q)
        return self._poll(rq, budget, refill=True)

    def napi_pending(self, q: int) -> bool:
        """Whether :meth:`napi_poll` of ``q`` would find anything to do: a completion
        published (the raw tail differs from our head: one u32 load, validated by the poll
        itself) or buffers to post.  The kernel loop asks it only for the queues on
        :attr:`poll_list` (and a busy poll for every queue); a queue without either leaves
        the list through :meth:`napi_complete`, so an idle queue costs nothing until its
        next interrupt."""
        rq = self.queues.get(q)
        if rq is None or not rq.started or rq.comp is None:
            return False
        return rq.comp.shared_tail != rq.comp.head or len(rq.posted) < rq.ring_size

    def _poll(self, rq: _RxQueue, budget: int, *, refill: bool) -> NapiBatch:
        q = rq.index
        st = self.stats[q]
        st[_NAPI_POLLS] += 1
        comp, spaces = rq.comp, rq.spaces
        assert comp is not None and spaces is not None and rq.slots is not None
        faults = comp.faults
        view = comp.peek(max(0, budget))
        k = len(view)
        if comp.faults != faults:
            st[_RING_FAULTS] += comp.faults - faults
        if k == 0:
            batch = NapiBatch.empty(q)
            if refill:
                batch.posted, batch.doorbell = self._refill(rq)
            return batch
        start = comp.head & comp.mask
        c = view.copy()  # read the peer's entries once
        B = rq.buf_len
        hdr_len = c["hdr_len"].astype(np.int64)
        data_len = c["data_len"].astype(np.int64)
        nfr = c["nr_frags"].astype(np.int64)
        place = c["flags"] & _F_PLACE
        linear = place == _F_LINEAR
        # -- the NIC contract, per completion: the slot is the ring index and the headers
        # fit it; unless the NIC itself flags the frame (status != OK: it still reports the
        # buffers it consumed, e.g. on an IOMMU fault), exactly one placement flag and
        # exactly the buffers data_len needs (none for a linear frame, whose data_len is 0)
        bad = c["hdr_slot"] != rq.expect[start:start + k]
        bad |= hdr_len > rq.slot_size
        bad |= c["queue"] != q
        wrong = _BAD_PLACE[place]
        wrong |= nfr != (data_len + (B - 1)) // B
        wrong |= linear & (data_len != 0)
        wrong &= c["status"] == abi.NIC_STATUS_OK
        bad |= wrong
        # HW-GRO: a coalesced session of gso_segs segments, every one but the last
        # gso_size bytes long; every other completion leaves both fields 0.
        gro = (c["flags"] & _F_GRO) != 0
        gsegs = c["gso_segs"].astype(np.int64)
        n_gro = int(np.count_nonzero(gro))
        if n_gro:
            gsize = c["gso_size"].astype(np.int64)
            bad |= gro & (linear | (gsegs < 2) | (gsegs > GRO_MAX_SEGS) | (gsize < 1)
                          | (data_len <= (gsegs - 1) * gsize) | (data_len > gsegs * gsize))
            bad |= ~gro & ((gsegs != 0) | (gsize != 0))
            mtu: NDArray[np.int64] | int = np.where(gro, GRO_MAX_FRAME - 14, self.mtu)
        else:
            bad |= (gsegs != 0) | (c["gso_size"] != 0)
            mtu = self.mtu
        # Frags come from the posted FIFO in order; a claim beyond it consumes nothing (and
        # every later claim is beyond it too).
        cum = np.cumsum(nfr)
        F = int(cum[-1])
        if len(rq.posted) < F:
            over = cum > len(rq.posted)
            bad |= over & (nfr > 0)
            nfr = np.where(over, 0, nfr)
            cum = np.cumsum(nfr)
            F = int(cum[-1])
        bufs = rq.posted.pop(F)
        # -- headers, straight from the slots (a split frame's length is hdr + data)
        frame_len = hdr_len + data_len
        p = wire.parse_slots(rq.slots[start:start + k], frame_len, mtu,
                             in_slot=np.where(linear, frame_len, hdr_len))
        ok = (p["status"] | c["status"]) == 0
        plen = p["payload_len"].astype(np.int64)
        poff = p["payload_off"].astype(np.int64)
        # The NIC's payload offset is the parsed one; a split put exactly the headers in
        # the slot and at least the payload in the buffers (more: Ethernet padding).
        bad |= ok & ((c["payload_off"] != poff)
                     | (~linear & ((poff != hdr_len) | (plen > data_len))))
        good = ok & ~bad
        n_good = int(np.count_nonzero(good))
        all_good = n_good == k
        # -- frags: which consumed buffers go into skbs, with how many payload bytes
        nf_skb: NDArray[np.int64] | int = 0
        keep_bufs = keep_lens = _EMPTY_I64
        if F:
            if all_good and k == F and not np.count_nonzero(nfr != 1) \
                    and not np.count_nonzero(plen != data_len):
                nf_skb, keep_bufs, keep_lens = 1, bufs, plen
            else:
                owner = np.repeat(np.arange(k, dtype=np.int64), nfr)
                j = np.arange(F, dtype=np.int64) - np.repeat(cum - nfr, nfr)
                flen = np.clip(plen[owner] - j * B, 0, B)  # trims Ethernet padding
                keep = good[owner] & (flen > 0)
                if np.count_nonzero(keep) != F:
                    spaces.put_ref(bufs[~keep])
                keep_bufs, keep_lens = bufs[keep], flen[keep]
                counts = np.bincount(owner[keep], minlength=k)
                nf_skb = counts if all_good else counts[good]
        # -- skbs (linear payloads are copied out of the slots here, before the release)
        if n_good:
            if all_good:
                pg, lin, gplen, gpoff, gi = p, linear, plen, poff, None
            else:
                gi = np.flatnonzero(good)
                pg, lin, gplen, gpoff = p[gi], linear[gi], plen[gi], poff[gi]
            n_lin = int(np.count_nonzero(lin))
            if n_lin:
                handles = self.skbs.add_batch(
                    n_good, space=spaces, nr_frags=nf_skb, frag_bufs=keep_bufs,
                    frag_lens=keep_lens, lin_src=rq.slots[start:start + k], lin_row=gi,
                    lin_off=gpoff, lin_len=np.where(lin, gplen, 0))
            else:
                handles = self.skbs.add_batch(n_good, space=spaces, nr_frags=nf_skb,
                                              frag_bufs=keep_bufs, frag_lens=keep_lens)
            keys = flow_keys(pg["src_addr"], pg["sport"], pg["dst_addr"], pg["dport"])
            rows = start + (np.arange(k) if gi is None else gi)
            slots = rq.slots
            # p is this poll's own array: its fields can be handed out without copies.
            batch = NapiBatch(q, keys, pg["seq"], gplen, pg["tcp_flags"], handles,
                              ack_seq=pg["ack_seq"], window=pg["window"],
                              src_mac=slots[rows, 6:12])
            for row in np.flatnonzero(pg["tcp_flags"] & wire.TCP_SYN).tolist():
                o_lo = int(pg["l4_off"][row]) + wire.TCP_HLEN
                o_hi = int(pg["payload_off"][row])
                batch.syn_options[row] = slots[int(rows[row]), o_lo:o_hi].tobytes()
            if n_gro:
                # the wire's view: each segment had its own headers
                wire_pk = np.where(gro, gsegs, 1)
                wire_by = frame_len + (wire_pk - 1) * hdr_len
                sel = good & gro
                st[_RX_PACKETS] += int(wire_pk[good].sum())
                st[_RX_BYTES] += int(wire_by[good].sum())
                st[_RX_GRO_PACKETS] += int(np.count_nonzero(sel))
                st[_RX_GRO_WIRE_PACKETS] += int(gsegs[sel].sum())
            else:
                st[_RX_PACKETS] += n_good
                st[_RX_BYTES] += int(frame_len.sum() if gi is None else frame_len[gi].sum())
            st[_RX_LINEAR] += n_lin
            st[_RX_SPLIT] += n_good - n_lin
        else:
            batch = NapiBatch.empty(q)
        comp.release(k)
        batch.completions = k
        batch.dropped = k - n_good
        st[_COMPLETIONS] += k
        st[_RX_FRAGS] += F
        if n_good != k:
            n_bad = int(np.count_nonzero(bad))
            st[_RX_DROPPED] += k - n_good
            st[_BAD_COMPLETIONS] += n_bad
            st[_BAD_FRAMES] += k - n_good - n_bad
        if refill:
            batch.posted, batch.doorbell = self._refill(rq)
        return batch

    def _refill(self, rq: _RxQueue) -> tuple[int, bool]:
        """Top the fill ring up from the page pool; ``(posted, doorbell due)``."""
        pool, fill = rq.pool, rq.fill
        assert pool is not None and fill is not None
        want = rq.ring_size - len(rq.posted)
        if want <= 0:
            return 0, False
        st = self.stats[rq.index]
        ids = pool.alloc(want)
        m = len(ids)
        if m < want:
            st[_ALLOC_SHORT] += 1
        if m == 0:
            return 0, False
        d = rq.desc[:m]
        bases = rq.iova_bases
        if len(bases) != len(pool.spaces):  # the provider added a space (a zcrx area)
            self._map_spaces(rq)
            bases = rq.iova_bases
        if len(bases) == 1:
            iova = ids.astype(np.uint64)
            iova *= np.uint64(rq.buf_len)
            iova += bases[0]
            d["buf_id"] = ids
        else:
            # keys of several spaces (a zcrx ifq's areas): each space is its own mapping
            bid = ids & KEY_MASK
            iova = bid.astype(np.uint64)
            iova *= np.uint64(rq.buf_len)
            iova += bases[ids >> KEY_SHIFT]
            d["buf_id"] = bid
        d["iova"] = iova
        d["len"] = rq.buf_len
        faults = fill.faults
        pushed = fill.push(d)
        if fill.faults != faults:
            st[_RING_FAULTS] += fill.faults - faults
        if pushed < m:
            # Only a NIC scribbling over the fill ring's head gets here.
            pool.put_ref(ids[pushed:])
            ids = ids[:pushed]
        pool.post(ids)
        rq.posted.push(ids)
        st[_BUFFERS_POSTED] += pushed
        doorbell = pushed > 0 and fill.needs_wakeup()
        if doorbell:
            st[_DOORBELLS] += 1
        return pushed, doorbell

    def refill(self, q: int) -> tuple[int, bool]:
        """Repost buffers outside a poll (after skbs were freed into a starved pool).

        Returns ``(posted, doorbell due)``.  A stopped queue posts nothing.
        """
        rq = self.queues.get(q)
        if rq is None or not rq.started:
            return 0, False
        return self._refill(rq)

    def napi_schedule(self, q: int) -> bool:
        """Put started queue ``q`` on the poll list (its interrupt fired, or a re-armed
        queue raced with new completions).  Returns False for a queue that is not started.
        The list is insertion-ordered: queues are polled in the order they were scheduled."""
        rq = self.queues.get(q)
        if rq is None or not rq.started:
            return False
        self.poll_list[q] = None
        return True

    def napi_complete(self, q: int) -> bool:
        """Arm the interrupt (need-wakeup on the completion ring) and re-check.

        Returns True if completions are already there: the flag is taken back and the caller
        polls again instead of sleeping.
        """
        rq = self.queues.get(q)
        if rq is None or not rq.started or rq.comp is None:
            return False
        comp = rq.comp
        comp.set_need_wakeup()
        self.stats[q, _IRQ_ARMS] += 1
        if comp.ready():
            comp.clear_need_wakeup()
            self.stats[q, _IRQ_REARM_RACES] += 1
            return True
        return False

    # -- ethtool -----------------------------------------------------------------------------

    def _ethtool_call(self, request: Mapping[str, Any]) -> dict[str, Any]:
        req = dict(request)
        req["dev"] = self.name
        return self._call("nic.ethtool", {"dev": self.name, "request": req})

    def ethtool(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """Apply or answer an ethtool request dict (:mod:`launch.ethtool`); return the reply.

        ``channels-set`` and ``rings-set`` reconfigure the driver around the NIC's change
        (frames drained meanwhile: :meth:`take_drained`); ``stats-get`` adds the driver's
        per-queue counters; everything else is the NIC's.
        """
        cmd = request.get("cmd")
        if cmd == "channels-set":
            n = request.get("combined", request.get("rx"))
            if isinstance(n, bool) or not isinstance(n, int):
                return self._ethtool_call(request)  # nothing for the driver: the NIC answers
            return self.set_channels(n, request=request)
        if cmd == "rings-set":
            return self.set_rings(request=request)
        reply = self._ethtool_call(request)
        if cmd == "stats-get":
            reply = self._merge_stats(reply)
        return reply

    def _merge_stats(self, reply: dict[str, Any]) -> dict[str, Any]:
        mine = [(f"rx-{q}.drv_{name}", int(self.stats[q, i]))
                for q in range(self.n_queues) for i, name in enumerate(QUEUE_STATS)]
        stats = reply.get("stats", {})
        out = dict(reply)
        if isinstance(stats, Mapping):
            out["stats"] = {**stats, **dict(mine)}
        else:
            out["stats"] = [*list(stats), *[list(kv) for kv in mine]]
        return out

    def set_channels(self, n: int, *, request: Mapping[str, Any] | None = None
                     ) -> dict[str, Any]:
        """Change the number of RX queues (``ethtool -L DEV combined N``).

        Queues being removed are stopped and freed first (their frames go to
        :attr:`drained`); if the NIC refuses they are brought back.  New queues are set up
        and started after the NIC agreed (when the device is up).
        """
        if not 1 <= n <= self.max_queues:
            raise Misuse(f"{self.name}: {n} channels, max {self.max_queues}")
        req = dict(request) if request is not None else {"cmd": "channels-set",
                                                         "combined": n}
        old = self.n_queues
        removed = [q for q in range(n, old) if q in self.queues]
        bound = [q for q in removed
                 if self.queues[q].binding != "none" or q in self.mp_draining]
        if bound:
            # Linux: "requested channel counts are too low for existing memory provider
            # setting" (ethtool channels set checks dev_get_min_mp_channel_count).
            raise Misuse(f"{self.name}: queue {bound[0]} has a memory provider; cannot "
                         f"drop to {n} channels", errno.EINVAL)
        for q in removed:
            if self.queues[q].started:
                self.drained.append(self.queue_stop(q))
            self.queue_free(q)
        try:
            reply = self._ethtool_call(req)
        except BaseException:
            self.queues_setup(removed)
            self.queues_start(removed)
            raise
        self.n_queues = n
        if self.up:
            self.queues_setup(range(old, n))
            self.queues_start(range(old, n))
        return reply

    def set_rings(self, *, rx: int | None = None, rx_buf_len: int | None = None,
                  tcp_data_split: str | None = None, hds_thresh: int | None = None,
                  request: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Ring parameters (``ethtool -G``).

        A new ring size or buffer length needs new queue memory: every queue is stopped
        (frames to :attr:`drained`) and freed, the NIC applies the change (it refuses a ring
        size change under a started queue), and the queues come back with the new layout
        (or, if the NIC refused, the old one) and their memory providers.  HDS settings are
        the NIC's alone and are simply forwarded.

        Refused with EINVAL before anything happens: a ring size that is not a power of
        two or above the maximum, and turning tcp-data-split off or hds-thresh above 0
        while a queue has a memory provider (as Linux refuses).
        """
        req: dict[str, Any] = dict(request) if request is not None else {"cmd": "rings-set"}
        for key, val in (("rx", rx), ("rx_buf_len", rx_buf_len),
                         ("tcp_data_split", tcp_data_split), ("hds_thresh", hds_thresh)):
            if val is not None:
                req[key] = val
        new_rx = _opt_int(req, "rx")
        new_buf = _opt_int(req, "rx_buf_len")
        new_thresh = _opt_int(req, "hds_thresh")
        if new_rx is not None:
            _check_ring_size(new_rx, self.max_ring_size, Misuse)
        if new_buf is not None and new_buf < 0:
            raise Misuse(f"{self.name}: bad rx-buf-len {new_buf}")
        if self.mp_draining or any(rq.binding != "none" for rq in self.queues.values()):
            if req.get("tcp_data_split") == "off":
                raise Misuse("can't disable tcp-data-split while device has memory provider "
                             "enabled")
            if new_thresh not in (None, 0):
                raise Misuse("hds-thresh must stay 0 while device has memory provider enabled")
        relayout = ((new_rx is not None and new_rx != self.ring_size)
                    or (bool(new_buf) and new_buf != self.rx_buf_len))
        saved: list[tuple[int, MemoryProvider | None, bool]] = []
        if relayout:
            for q in sorted(self.queues):
                rq = self.queues[q]
                saved.append((q, rq.provider if rq.binding != "none" else None, rq.started))
                if rq.started:
                    self.drained.append(self.queue_stop(q))
                self.queue_free(q)
        try:
            reply = self._ethtool_call(req)
        except BaseException:
            self._bring_back(saved)
            raise
        if new_rx is not None:
            self.ring_size = new_rx
        if new_buf:
            self.rx_buf_len = new_buf
        if req.get("tcp_data_split") is not None:
            self.tcp_data_split = req["tcp_data_split"]
        if new_thresh is not None:
            self.hds_thresh = new_thresh
        self._bring_back(saved)
        return reply

    def _bring_back(self, saved: list[tuple[int, MemoryProvider | None, bool]]) -> None:
        self.queues_setup([q for q, _, _ in saved], {q: p for q, p, _ in saved})
        self.queues_start([q for q, _, started in saved if started])

    # -- introspection -----------------------------------------------------------------------

    def binding(self, q: int) -> str:
        """The memory provider attached to queue ``q`` ("none", "io-uring"): the live pool's,
        or, while a detached provider's pool drains, that provider's (netlink ``queue-get``
        keeps the ``io-uring`` attribute until then; ``status()`` shows it as ``provider``,
        while ``binding`` is the running pool's)."""
        rq = self.queues.get(q)
        kind = rq.binding if rq is not None else "none"
        if kind == "none" and q in self.mp_draining:
            kind = self.mp_draining[q].provider.kind
        return kind

    def queue_stats(self, q: int) -> dict[str, int]:
        """The driver's counters of queue ``q``."""
        return {name: int(self.stats[q, i]) for i, name in enumerate(QUEUE_STATS)}

    def status(self) -> dict[str, Any]:
        """Device and per-queue state (JSON-ready) for ``zcrx status`` / ``stats``."""
        queues = []
        for q in sorted(self.queues):
            rq = self.queues[q]
            pool = rq.pool
            queues.append({
                "queue": q,
                "started": rq.started,
                "ring_size": rq.ring_size,
                "slot_size": rq.slot_size,
                "rx_buf_len": rq.buf_len,
                "page_pool": pool.id if pool is not None else None,
                "buffers": rq.spaces.total if rq.spaces is not None else 0,
                "posted": len(rq.posted),
                "in_flight": pool.inflight - len(rq.posted) if pool is not None else 0,
                "binding": rq.binding,
                "provider": self.binding(q),
                "mp_draining": q in self.mp_draining,
                "ledger": _ledger_sum(rq.spaces),
                "stats": self.queue_stats(q),
            })
        return {"name": self.name, "ifindex": self.ifindex, "up": self.up,
                "queues": self.n_queues, "max_queues": self.max_queues,
                "ring_size": self.ring_size, "mtu": self.mtu, "rx_buf_len": self.rx_buf_len,
                "tcp_data_split": self.tcp_data_split, "hds_thresh": self.hds_thresh,
                "dying_pools": len(self.dying), "rx_queues": queues,
                "tx": {"ring_size": self.tx_ring_size if self.tx is not None else 0,
                       **self.tx_stats}}

    def check_ledger(self) -> None:
        """Verify every buffer of every live and dying pool (raises InvariantBroken).

        Beyond each space's own checks: posted buffers equal the queue's posted FIFO, and
        every page-pool reference is accounted for by a driver hold (DRIVER/POSTED), an skb
        frag or a user reference.
        """
        spaces: dict[int, BufferSpace] = {}
        posted: dict[int, int] = {}
        for rq in self.queues.values():
            if rq.spaces is not None:
                for sp in rq.spaces.spaces:
                    spaces[sp.space_id] = sp
                for sp, ids in rq.spaces.groups(rq.posted.peek_all()):
                    posted[sp.space_id] = posted.get(sp.space_id, 0) + len(ids)
        for pool in self.dying:
            for sp in pool.spaces.spaces:
                if not sp.closed:
                    spaces[sp.space_id] = sp
        skb_refs = self.skbs.refs_by_space()
        for sid, sp in spaces.items():
            led = sp.check_ledger()
            if led["posted"] != posted.get(sid, 0):
                raise InvariantBroken(f"{sp}: {led['posted']} POSTED buffers, posted FIFOs "
                                      f"hold {posted.get(sid, 0)}")
            refs = int(sp.pp_ref.sum())
            held = (led["driver"] + led["posted"] + skb_refs.get(sid, 0)
                    + int(sp.user_refs.sum()))
            if refs != held:
                raise InvariantBroken(f"{sp}: {refs} page-pool references, {held} holders")


def _ledger_sum(spaces: SpaceSet | None) -> dict[str, int]:
    """Buffers per state over every space of a queue's set (empty without one)."""
    if spaces is None:
        return {}
    if len(spaces) == 1:
        return spaces.spaces[0].ledger()
    total: dict[str, int] = {}
    for sp in spaces.spaces:
        for k, v in sp.ledger().items():
            total[k] = total.get(k, 0) + v
    return total


def _opt_int(req: Mapping[str, Any], key: str) -> int | None:
    """An optional integer field of an ethtool request (a peer's input: Misuse if bad)."""
    v = req.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise Misuse(f"ethtool request: {key} must be an integer, got {v!r}")
    return v


def _check_ring_size(n: int, max_n: int, exc: type[ZcrxError]) -> None:
    if n < 2 or n & (n - 1) or n > max_n:
        raise exc(f"ring size {n}: must be a power of two in [2, {max_n}]",
                  errno=errno.EINVAL)
