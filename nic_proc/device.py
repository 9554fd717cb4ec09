"""The emulated NIC as one object: netdevs, RX queues, IOMMU, steering, traffic sources.

:class:`Nic` is everything the NIC process knows, as plain state; it does no
socket I/O of its own (the wire gateway's sockets aside).  :mod:`nic_proc.main`
feeds it admin requests and doorbells and calls :meth:`Nic.step` to move
traffic; tests drive it directly.

Ownership
---------
The NIC owns its device state and one shared-memory region, the **stats block**
(``nicif.stats_block_shape()`` int64, written only by the NIC, read by anyone).
Every other region it touches belongs to someone else and is reached through the
IOMMU (:mod:`nic_proc.iommu`): queue regions and page pools are the kernel's,
areas the apps'.  The NIC writes into them and never unlinks them.

Netdevs
-------
A netdev is described by a spec string ``NAME[:key=value,...]`` (:class:`shared.nicif.NetdevSpec`),
e.g. ``eth0:queues=4,mtu=9000``.  Keys (defaults in brackets): ``queues`` [4],
``max_queues`` [64], ``rx`` ring size [512], ``max_rx`` [4096], ``mtu`` [4096],
``tcp_data_split`` on|off [on], ``hds_thresh`` [0], ``hds_thresh_max`` [1024],
``rx_buf_len`` [4096], ``gro_hw`` on|off [off] (HW-GRO, ``ethtool -K DEV rx-gro-hw``:
:meth:`nic_proc.dma.DmaQueue.place`), ``link`` up|down [up], ``nobuf`` pause|drop [pause] (also
spelled ``pause`` on|off), ``addr``, ``addr6``, ``mac`` (defaults in
:mod:`nic_proc.sources`), ``port`` [none] or ``tap`` (:mod:`nic_proc.port`) with its
``neigh`` arp|static [arp], ``loss``, ``dup``, ``reorder``, ``tx_loss`` (``1%``),
``delay`` (``5ms``) and ``seed`` [0].  ``-`` may replace ``_``.

RX queue ``q`` of a netdev is *started* by ``nic.queue_start`` (the kernel has laid
out and mapped its region) and *stopped* by ``nic.queue_stop``; only a started queue
receives DMA.  With pause on (the default), ``queue_stop`` marks the queue waiting, as a
starved one is (counted in ``rx_pause``): its flows are held back until ``queue_start``, so
a queue restart (binding or unbinding a memory provider, ring changes) loses nothing, since
the emulated senders never retransmit.  A queue never started since the device came up
drops (``rx_queue_stopped``).  A real NIC drops
them and the sender's TCP recovers; a real TCP peer (a later issue) will see drops in drop
mode.  With pause off, or for a queue past the channel count, they are dropped
(``rx_queue_stopped``).

Pause
-----
With pause on (default), a queue that runs out of posted buffers or completion
slots holds back the flows steered to it: the sources offer those flows' frames
again once the kernel rings the doorbell.  Flows of other queues keep going: the
emulated link has one pause class per queue (real 802.3x pauses the whole port;
per-queue pausing keeps one stalled app from stalling everyone).  With pause off
(``nobuf=drop``) the frames are dropped and counted (``rx_missed``), as a real NIC
does; a real TCP sender (a TAP port, :mod:`nic_proc.port`) retransmits them.

Counters
--------
Per queue, in the stats block row ``[netdev.stats_index, queue]``.  Frames that
never reach a queue (unparsable, oversize, an ntuple ``drop`` rule) are counted in
queue 0's row (a real NIC counts them per port).
"""

from __future__ import annotations

import errno
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from nic_proc.capture import Capture
from nic_proc.dma import (
    MAX_COALESCE_FRAMES,
    MAX_COALESCE_USECS,
    Coalesce,
    DmaQueue,
    Frames,
    HdsConfig,
    Index,
)
from nic_proc.iommu import Iommu
from nic_proc.iommu import Mapping as DmaMapping
from nic_proc.ntuple import Steering
from nic_proc.pcap import PcapSource
from nic_proc.port import Impairment, TapPort
from nic_proc.rss import Flows
from nic_proc.sources import Generator, RawBatch, Source, WireGateway, WireInfo, parse_raw
from nic_proc.tx import DiscardSink, TxSink
from shared import wire
from shared.errors import Misuse
from shared.nicif import (
    HDR_SLOT_ALIGN,
    MAX_MTU,
    MAX_NETDEVS,
    MAX_QUEUES,
    MAX_RING,
    MAX_SNAPLEN,
    MIN_MTU,
    QC,
    QUEUE_COUNTERS,
    TX_COUNTERS,
    NetdevSpec,
    QueueLayout,
    hdr_slot_size,
    is_pow2,
    stats_block_shape,
    valid_buf_len,
)
from shared.txring import TxConsumer, TxLayout, TxProducer, tx_slot_size

__all__ = ["MAX_MTU", "MIN_MTU", "Netdev", "NetdevSpec", "Nic", "NicQueue"]

_STEER_CACHE = 4096
#: Finished traffic sources ``nic.sources`` still lists; older ones are forgotten.
DONE_SOURCES_KEPT = 16


def _mac_bytes(text: str, default: bytes) -> bytes:
    if not text:
        return default
    try:
        b = bytes.fromhex(text.replace(":", ""))
    except ValueError:
        b = b""
    if len(b) != 6:
        raise Misuse(f"bad MAC address {text!r}")
    return b


@dataclass(eq=False)
class NicQueue:
    """One RX queue of a netdev: stopped (``dma is None``) or started."""

    index: int
    map_id: int = 0
    ring_size: int = 0
    slot_size: int = 0
    dma: DmaQueue | None = None

    @property
    def started(self) -> bool:
        return self.dma is not None


@dataclass(eq=False)
class Netdev:
    """A netdev: configuration, steering, queues and its rows of the stats block."""

    spec: NetdevSpec
    index: int
    stats: npt.NDArray[np.int64]  # (MAX_QUEUES, len(QUEUE_COUNTERS)) view
    info: WireInfo = field(init=False)
    hds: HdsConfig = field(init=False)
    #: interrupt coalescing (``ethtool -c/-C``), read by every started queue per batch
    coal: Coalesce = field(init=False)
    steering: Steering = field(init=False)
    queues: list[NicQueue] = field(init=False)
    #: waiting[q]: queue q is paused for lack of buffers; waiting[-1] stays False so a
    #: steering result of -1 (drop) indexes it harmlessly.
    waiting: npt.NDArray[np.bool_] = field(init=False)
    tx_ring: int = field(init=False)
    #: open ``zcrx capture`` writers (nic_proc.capture); empty when nothing captures
    captures: list[Capture] = field(init=False, default_factory=list)
    #: the TAP port the wire is plugged into (``port=tap``), once the NIC opened it
    port: TapPort | None = field(init=False, default=None)
    #: the kernel's TX ring once ``nic.tx_start`` attached it (shared.txring)
    tx: TxConsumer | None = field(init=False, default=None)
    tx_map_id: int = field(init=False, default=0)
    #: where transmitted frames go (nic_proc.tx): the default discards, a port sends
    tx_sink: TxSink = field(init=False, default_factory=DiscardSink)
    #: the source that is the sink (a port), or None for the default
    tx_sink_source: int | None = field(init=False, default=None)
    #: the kernel's control-frame ring (ARP, ICMPv6 to the host), once ``nic.ctl_start``
    ctl: TxProducer | None = field(init=False, default=None)
    ctl_map_id: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        s = self.spec
        default = WireInfo(s.name, self.index, s.mtu)
        self.info = WireInfo(s.name, self.index, s.mtu, s.addr or default.addr,
                             s.addr6 or default.addr6, _mac_bytes(s.mac, default.mac))
        self.hds = HdsConfig(s.tcp_data_split, s.hds_thresh, s.gro_hw)
        self.coal = Coalesce()
        self.steering = Steering(s.queues)
        self.queues = [NicQueue(q) for q in range(s.max_queues)]
        self.waiting = np.zeros(s.max_queues + 1, dtype=bool)
        self.tx_ring = s.rx

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def n_queues(self) -> int:
        return self.steering.n_rx_queues

    @property
    def max_frame(self) -> int:
        return wire.max_frame_len(self.spec.mtu)

    @property
    def min_slot_size(self) -> int:
        return hdr_slot_size(self.max_frame)

    def started(self) -> list[NicQueue]:
        return [q for q in self.queues if q.dma is not None]

    def probe(self) -> dict[str, Any]:
        """The ``nic.probe`` description (``nicif.NETDEV_FIELDS`` plus addresses)."""
        s = self.spec
        return {"name": s.name, "ifindex": self.index + 2, "mac": self.info.mac.hex(":"),
                "queues": self.n_queues, "max_queues": s.max_queues, "ring_size": s.rx,
                "max_ring_size": s.max_rx, "tx_ring_size": self.tx_ring, "mtu": s.mtu,
                "tcp_data_split": self.hds.tcp_data_split,
                "hds_thresh": self.hds.hds_thresh, "hds_thresh_max": s.hds_thresh_max,
                "rx_buf_len": s.rx_buf_len, "gro_hw": self.hds.gro_hw, "link_up": s.link,
                "stats_index": self.index,
                "min_slot_size": self.min_slot_size, "pause": s.pause,
                "addr": self.info.addr, "addr6": self.info.addr6,
                "started": [q.index for q in self.started()],
                "tx_slot_size": tx_slot_size(s.mtu),
                "port": ({"kind": "tap", "ifname": self.port.ifname}
                         if self.port is not None else None)}


class Nic:
    """The device (see the module docstring).  Not thread-safe: one loop drives it."""

    def __init__(self, specs: Sequence[NetdevSpec] = (), stats: npt.NDArray[np.int64] | None = None,
                 *, iommu: Iommu | None = None, clock: Callable[[], float] = time.monotonic
                 ) -> None:
        """Netdevs from ``specs`` (default one ``eth0``); ``stats`` is the stats block."""
        specs = list(specs) or [NetdevSpec()]
        if len(specs) > MAX_NETDEVS:
            raise Misuse(f"at most {MAX_NETDEVS} netdevs")
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise Misuse(f"duplicate netdev names in {names}")
        if stats is None:
            stats = np.zeros(stats_block_shape(), np.int64)
        if stats.shape != stats_block_shape():
            raise Misuse(f"stats block must be {stats_block_shape()}, got {stats.shape}")
        self.stats = stats
        self.iommu = iommu if iommu is not None else Iommu()
        self.clock = clock
        self.netdevs: dict[str, Netdev] = {}
        for i, s in enumerate(specs):
            s.validate()
            self.netdevs[s.name] = Netdev(s, i, stats[i])
        self.sources: dict[int, Source] = {}
        self._next_source = 1
        self._steer_cache: dict[tuple[str, Hashable], tuple[int, npt.NDArray[np.int32],
                                                            npt.NDArray[np.uint32]]] = {}
        #: (dev, queue) interrupts to raise, drained by the loop
        self.pending_irqs: list[tuple[str, int]] = []
        #: queues holding coalesced completions (a running rx-usecs timer), checked by
        #: :meth:`take_irqs`; a queue without pending completions is never visited
        self.irq_timers: dict[tuple[str, int], DmaQueue] = {}
        self._rr = 0
        self._next_capture = 0

    # -- lookups -------------------------------------------------------------------------

    def dev(self, name: str) -> Netdev:
        """The netdev called ``name``; :class:`Misuse` (ENODEV) if there is none."""
        d = self.netdevs.get(name)
        if d is None:
            raise Misuse(f"no netdev {name!r}", errno.ENODEV)
        return d

    def _queue(self, dev: Netdev, queue: int) -> NicQueue:
        if not 0 <= queue < dev.n_queues:
            raise Misuse(f"{dev.name}: queue {queue} out of range (the device has "
                         f"{dev.n_queues} queues)", errno.ERANGE)
        return dev.queues[queue]

    # -- admin ---------------------------------------------------------------------------

    def probe(self) -> list[dict[str, Any]]:
        """Every netdev's description, in stats-index order."""
        return [d.probe() for d in self.netdevs.values()]

    def dma_map(self, name: str, size: int, *, holder: int = 0, fd: int = -1,
                inode: tuple[int, int] | None = None) -> int:
        """Map region ``name``, or descriptor ``fd`` of process ``holder``, for DMA (see
        :meth:`Iommu.dma_map`)."""
        return self.iommu.dma_map(name, size, holder=holder, fd=fd, inode=inode)

    def dma_unmap(self, map_id: int) -> None:
        """Unmap; EBUSY while a started queue lives in it, ENOENT if unknown."""
        for d in self.netdevs.values():
            for q in d.started():
                if q.map_id == map_id:
                    raise Misuse(f"map id {map_id} holds {d.name} queue {q.index}, which is "
                                 f"started", errno.EBUSY)
            if d.tx is not None and d.tx_map_id == map_id:
                raise Misuse(f"map id {map_id} holds {d.name}'s TX ring", errno.EBUSY)
            if d.ctl is not None and d.ctl_map_id == map_id:
                raise Misuse(f"map id {map_id} holds {d.name}'s control ring", errno.EBUSY)
        self.iommu.dma_unmap(map_id)

    def _ring_mapping(self, d: Netdev, where: str, ring: str, slots: str, ring_size: int,
                      slot_size: int, align: int, need: int, map_id: int,
                      layout_of: Callable[[int, int], Any]) -> tuple[DmaMapping, Any]:
        """Check a ring the driver asks the device to use (a power-of-two ``ring_size`` up to
        the device's maximum, ``slots`` of a multiple of ``align`` >= ``need`` bytes, its
        ``layout_of(ring_size, slot_size)`` inside mapping ``map_id``); returns the mapping and
        the layout (EINVAL, ENOENT)."""
        if not is_pow2(ring_size) or ring_size > d.spec.max_rx:
            raise Misuse(f"{d.name}: {ring} size {ring_size} is not a power of two <= "
                         f"{d.spec.max_rx}")
        if slot_size % align or slot_size < need:
            raise Misuse(f"{d.name}: {slots} of {slot_size} bytes; need a multiple of "
                         f"{align} >= {need} for MTU {d.spec.mtu}")
        m = self.iommu.get(map_id)
        layout = layout_of(ring_size, slot_size)
        if layout.size > m.size:
            raise Misuse(f"{where}: layout needs {layout.size} bytes, mapping {map_id} has "
                         f"{m.size}")
        return m, layout

    def queue_start(self, dev: str, queue: int, map_id: int, ring_size: int,
                    slot_size: int) -> None:
        """Start DMA into a queue whose region (``QueueLayout(ring_size, slot_size)``) is
        mapped as ``map_id``.  EBUSY if started, ERANGE for a bad queue, ENOENT for an
        unknown map, EINVAL for sizes the device or the mapping cannot take."""
        d = self.dev(dev)
        q = self._queue(d, queue)
        if q.started:
            raise Misuse(f"{dev} queue {queue} is already started", errno.EBUSY)
        m, layout = self._ring_mapping(d, f"{dev} queue {queue}", "ring", "header slots",
                                       ring_size, slot_size, HDR_SLOT_ALIGN, d.min_slot_size,
                                       map_id, QueueLayout)
        q.dma = DmaQueue(m.view, layout, self.iommu, queue=queue, config=d.hds,
                         stats=d.stats[queue], clock=time.monotonic_ns,
                         coalesce=d.coal)
        q.map_id, q.ring_size, q.slot_size = map_id, ring_size, slot_size
        d.waiting[queue] = False

    def queue_stop(self, dev: str, queue: int) -> int:
        """Quiesce a queue; returns the completions it wrote since it started (0 if stopped).

        The loop is single-threaded, so when this returns no DMA into the queue is in
        progress and none can follow: the views into its memory are gone.
        """
        d = self.dev(dev)
        if not 0 <= queue < len(d.queues):
            raise Misuse(f"{dev}: queue {queue} out of range", errno.ERANGE)
        q = d.queues[queue]
        if q.dma is None:
            return 0
        done = q.dma.completed
        self.irq_timers.pop((dev, queue), None)
        q.dma.detach()
        q.dma = None
        q.map_id = 0
        # With pause on a stopped queue holds its flows back like a starved one (the sources
        # stop offering them, nothing is lost) until queue_start; a queue that channels-set
        # then removes is cleared there.
        d.waiting[queue] = d.spec.pause
        if d.spec.pause:
            self._count(d, queue, "rx_pause", 1)
        return done

    # -- TX queue ------------------------------------------------------------------------

    def tx_start(self, dev: str, map_id: int, ring_size: int, slot_size: int) -> None:
        """Attach the netdev's TX ring (``TxLayout(ring_size, slot_size)`` in the region
        mapped as ``map_id``).  EBUSY if attached, EINVAL for sizes the device or the
        mapping cannot take, ENOENT for an unknown map."""
        d = self.dev(dev)
        if d.tx is not None:
            raise Misuse(f"{dev}: TX ring already attached", errno.EBUSY)
        m, layout = self._ring_mapping(d, f"{dev} TX", "TX ring", "TX slots", ring_size,
                                       slot_size, 64, tx_slot_size(d.spec.mtu), map_id, TxLayout)
        d.tx = TxConsumer(m.view, layout)
        d.tx_map_id = map_id

    def tx_stop(self, dev: str) -> int:
        """Detach the TX ring, after sending what it still holds; returns tx_packets."""
        d = self.dev(dev)
        if d.tx is not None:
            self.tx_poll_dev(d)
            d.tx.detach()
            d.tx = None
            d.tx_map_id = 0
        return int(d.stats[0, QC["tx_packets"]])

    def ctl_start(self, dev: str, map_id: int, ring_size: int, slot_size: int) -> None:
        """Attach the control-frame ring: ARP and ICMPv6 frames off the wire go to the kernel
        there (the TCP path only knows TCP).  Same checks and errnos as :meth:`tx_start`."""
        d = self.dev(dev)
        if d.ctl is not None:
            raise Misuse(f"{dev}: control ring already attached", errno.EBUSY)
        if not is_pow2(ring_size) or ring_size > MAX_RING:
            raise Misuse(f"{dev}: control ring size {ring_size} is not a power of two")
        if slot_size % 64 or slot_size < tx_slot_size(d.spec.mtu):
            raise Misuse(f"{dev}: control slots of {slot_size} bytes are too small")
        m = self.iommu.get(map_id)
        layout = TxLayout(ring_size, slot_size)
        if layout.size > m.size:
            raise Misuse(f"{dev}: control ring needs {layout.size} bytes, mapping {map_id} "
                         f"has {m.size}")
        d.ctl = TxProducer(m.view, layout, max_frame=d.max_frame)
        d.ctl_map_id = map_id

    def ctl_stop(self, dev: str) -> None:
        d = self.dev(dev)
        if d.ctl is not None:
            d.ctl.detach()
            d.ctl = None
            d.ctl_map_id = 0

    def tx_doorbell(self, dev: str) -> None:
        """The kernel queued frames while we slept: nothing to do but poll (the loop does)."""
        d = self.netdevs.get(dev)
        if d is not None and d.tx is not None:
            d.tx.disarm()

    def tx_poll_dev(self, d: Netdev, budget: int = 256) -> int:
        """Drain up to ``budget`` frames of ``d``'s TX ring into its sink; frames handled."""
        tx = d.tx
        if tx is None or not tx.ready():  # the common case: one load of the tail
            return 0
        done = 0
        while done < budget:
            bad0 = tx.bad
            batch = tx.peek(budget - done)
            held = tx.held
            if held == 0:
                break
            n = len(batch)
            sent = d.tx_sink.transmit(batch) if n and d.spec.link else 0
            sent = max(0, min(int(sent), n))
            row = d.stats[0]
            row[QC["tx_packets"]] += sent
            row[QC["tx_bytes"]] += int(batch.lengths[:sent].sum())
            row[QC["tx_dropped"]] += (n - sent) + (tx.bad - bad0)
            tx.release()
            done += held
        return done

    def tx_poll(self) -> bool:
        """Drain every attached TX ring once; True if any frame was handled."""
        work = False
        for d in self.netdevs.values():
            if d.tx is not None and self.tx_poll_dev(d):
                work = True
        return work

    def tx_arm(self) -> bool:
        """About to block: set need-wakeup on every TX ring; True if one has frames."""
        ready = False
        for d in self.netdevs.values():
            if d.tx is not None and d.tx.arm():
                ready = True
        return ready

    def tx_disarm(self) -> None:
        """Awake again: clear need-wakeup on every TX ring (no doorbells while we poll)."""
        for d in self.netdevs.values():
            if d.tx is not None:
                d.tx.disarm()

    def set_link(self, dev: str, up: bool) -> None:
        """Carrier on/off.  With the link down no source of the netdev sends."""
        self.dev(dev).spec.link = bool(up)

    def doorbell(self, dev: str, queue: int) -> bool:
        """The kernel posted buffers on a waiting queue; True if it can go on now."""
        d = self.netdevs.get(dev)
        if d is None or not 0 <= queue < len(d.queues):
            return False
        q = d.queues[queue]
        if q.dma is None:
            return False
        ok = q.dma.try_resume()
        d.waiting[queue] = q.dma.waiting
        return ok

    # -- ethtool -------------------------------------------------------------------------

    def ethtool(self, dev: str, request: Mapping[str, Any]) -> dict[str, Any]:
        """Apply or answer one ``launch.ethtool`` request dict (errors carry the errno)."""
        d = self.dev(dev)
        rdev = request.get("dev", dev)
        if rdev != dev:
            raise Misuse(f"request for {rdev!r} sent to {dev!r}")
        cmd = request.get("cmd")
        if cmd == "channels-get":
            return {"rx_max": 0, "tx_max": 0, "other_max": 0, "combined_max": d.spec.max_queues,
                    "rx_count": 0, "tx_count": 0, "other_count": 0,
                    "combined_count": d.n_queues}
        if cmd == "channels-set":
            self._set_channels(d, request)
            return {}
        if cmd == "rings-get":
            return self._rings(d)
        if cmd == "rings-set":
            self._set_rings(d, request)
            return {}
        if cmd == "stats-get":
            return {"stats": self.stats_list(d)}
        if cmd == "coalesce-get":
            c = d.coal
            return {"rx_usecs": c.rx_usecs, "rx_frames": c.rx_frames,
                    "adaptive_rx": c.adaptive_rx}
        if cmd == "coalesce-set":
            self._set_coalesce(d, request)
            return {}
        if cmd == "features-get":
            return {"features": self._features(d)}
        if cmd == "features-set":
            self._set_features(d, request)
            return {}
        if cmd in ("rss-get", "rss-set", "ntuple-get", "ntuple-add", "ntuple-delete"):
            return d.steering.handle(request)
        raise Misuse(f"ethtool {cmd!r} is not supported", errno.EOPNOTSUPP)

    def _set_channels(self, d: Netdev, req: Mapping[str, Any]) -> None:
        for k in ("rx", "tx", "other"):
            if req.get(k):
                raise Misuse(f"{d.name} has combined channels only ({k} must be 0)")
        n = req.get("combined")
        if n is None:
            return
        if not isinstance(n, int) or not 1 <= n <= d.spec.max_queues:
            raise Misuse(f"combined {n} not in [1, {d.spec.max_queues}]")
        busy = [q.index for q in d.started() if q.index >= n]
        if busy:
            raise Misuse(f"{d.name}: stop queue {busy[0]} before reducing channels to {n}",
                         errno.EBUSY)
        d.steering.set_n_rx_queues(n)
        d.spec.queues = n
        d.waiting[n:-1] = False  # queues gone: none of their flows waits for them

    def _features(self, d: Netdev) -> list[list[Any]]:
        """``ethtool -k``: ``[name, on, fixed]`` for the receive-side features, in the
        order ethtool prints them; only ``rx-gro-hw`` can change."""
        return [["rx-checksumming", True, True],
                ["scatter-gather", False, True],
                ["tcp-segmentation-offload", False, True],
                ["generic-receive-offload", False, True],
                ["large-receive-offload", False, True],
                ["ntuple-filters", True, True],
                ["receive-hashing", True, True],
                ["rx-gro-hw", d.hds.gro_hw, False]]

    def _set_features(self, d: Netdev, req: Mapping[str, Any]) -> None:
        """``ethtool -K``: ``rx-gro-hw`` on|off; a fixed feature may only be "set" to the
        value it has (EOPNOTSUPP otherwise), an unknown one is EINVAL.  Nothing changes
        unless the whole request can be applied."""
        want = req.get("features")
        if not isinstance(want, Mapping) or not want:
            raise Misuse(f"{d.name}: no features to set")
        have = {name: (on, fixed) for name, on, fixed in self._features(d)}
        for name, on in want.items():
            if name not in have:
                raise Misuse(f"{d.name}: unknown feature {name!r}")
            if not isinstance(on, bool):
                raise Misuse(f"{d.name}: {name} must be on or off")
            cur, fixed = have[name]
            if fixed and on != cur:
                raise Misuse(f"{d.name}: {name} is fixed {'on' if cur else 'off'}; "
                             "Could not change any device features", errno.EOPNOTSUPP)
        if "rx-gro-hw" in want:
            d.hds.gro_hw = bool(want["rx-gro-hw"])

    def _set_coalesce(self, d: Netdev, req: Mapping[str, Any]) -> None:
        """``ethtool -C``: rx-usecs, rx-frames, adaptive-rx; anything else EOPNOTSUPP."""
        for k in req:
            if k not in ("cmd", "dev", "rx_usecs", "rx_frames", "adaptive_rx"):
                raise Misuse(f"{d.name}: {k.replace('_', '-')} is not supported",
                             errno.EOPNOTSUPP)
        c = d.coal
        usecs = req.get("rx_usecs", c.rx_usecs)
        frames = req.get("rx_frames", c.rx_frames)
        adaptive = req.get("adaptive_rx", c.adaptive_rx)
        if isinstance(usecs, bool) or not isinstance(usecs, int) \
                or not 0 <= usecs <= MAX_COALESCE_USECS:
            raise Misuse(f"{d.name}: rx-usecs {usecs} not in [0, {MAX_COALESCE_USECS}]")
        if isinstance(frames, bool) or not isinstance(frames, int) \
                or not 0 <= frames <= MAX_COALESCE_FRAMES:
            raise Misuse(f"{d.name}: rx-frames {frames} not in [0, {MAX_COALESCE_FRAMES}]")
        if not isinstance(adaptive, bool):
            raise Misuse(f"{d.name}: adaptive-rx {adaptive!r}")
        c.rx_usecs, c.rx_frames, c.adaptive_rx = usecs, frames, adaptive

    def _rings(self, d: Netdev) -> dict[str, Any]:
        s = d.spec
        return {"rx_max": s.max_rx, "rx_mini_max": 0, "rx_jumbo_max": 0, "tx_max": s.max_rx,
                "tx_push_buf_len_max": 0, "hds_thresh_max": s.hds_thresh_max,
                "rx": s.rx, "rx_mini": 0, "rx_jumbo": 0, "tx": d.tx_ring,
                "rx_buf_len": s.rx_buf_len, "cqe_size": None, "tx_push": None, "rx_push": None,
                "tx_push_buf_len": None,
                "tcp_data_split": "on" if d.hds.tcp_data_split else "off",
                "hds_thresh": d.hds.hds_thresh}

    def _set_rings(self, d: Netdev, req: Mapping[str, Any]) -> None:
        s = d.spec
        for k in ("cqe_size", "tx_push", "rx_push", "tx_push_buf_len"):
            if k in req:
                raise Misuse(f"{d.name}: {k.replace('_', '-')} is not supported",
                             errno.EOPNOTSUPP)
        for k in ("rx_mini", "rx_jumbo"):
            if req.get(k):
                raise Misuse(f"{d.name}: {k.replace('_', '-')} ring not supported (max 0)")
        rx = req.get("rx", s.rx)
        tx = req.get("tx", d.tx_ring)
        for k, v in (("rx", rx), ("tx", tx)):
            if not isinstance(v, int) or not is_pow2(v) or v > s.max_rx:
                raise Misuse(f"{d.name}: {k} {v} is not a power of two <= {s.max_rx}")
        buf_len = req.get("rx_buf_len", s.rx_buf_len)
        if not isinstance(buf_len, int) or not valid_buf_len(buf_len):
            raise Misuse(f"{d.name}: rx-buf-len {buf_len} not a power of two in [1024, 65536]")
        thresh = req.get("hds_thresh", d.hds.hds_thresh)
        if not isinstance(thresh, int) or not 0 <= thresh <= s.hds_thresh_max:
            raise Misuse(f"{d.name}: hds-thresh {thresh} not in [0, {s.hds_thresh_max}]")
        tds = req.get("tcp_data_split")
        if tds not in (None, "on", "off", "auto"):
            raise Misuse(f"{d.name}: tcp-data-split {tds!r}")
        if rx != s.rx and d.started():
            raise Misuse(f"{d.name}: stop every queue before changing the rx ring size",
                         errno.EBUSY)
        s.rx, d.tx_ring, s.rx_buf_len = rx, tx, buf_len
        d.hds.hds_thresh = s.hds_thresh = thresh
        if tds is not None:
            d.hds.tcp_data_split = s.tcp_data_split = tds != "off"

    def stats_list(self, d: Netdev) -> list[list[Any]]:
        """``ethtool -S``: device totals, then ``rx-N.<name>`` per queue in use."""
        n = d.n_queues
        rows = d.stats[:n]
        tot = rows.sum(axis=0)
        out: list[list[Any]] = [[name, int(tot[i])] for i, name in enumerate(QUEUE_COUNTERS)]
        for q in range(n):
            out.extend([f"rx-{q}.{name.removeprefix('rx_')}", int(rows[q, i])]
                       for i, name in enumerate(QUEUE_COUNTERS) if name not in TX_COUNTERS)
        if d.port is not None:
            out.extend(d.port.stats())
        return out

    # -- sources -------------------------------------------------------------------------

    def add_source(self, make: Callable[[int], Source]) -> Source:
        """Register the source ``make(id)`` builds (it may raise :class:`Misuse`).

        Finished sources stay listed (``nic.sources``) until :data:`DONE_SOURCES_KEPT` newer
        ones finished: each holds its flows and frame buffers, and a long run that keeps
        starting traffic (``zcrx soak``) must not grow without bound."""
        done = [i for i, s in self.sources.items() if s.done]
        for old in done[:max(0, len(done) - DONE_SOURCES_KEPT + 1)]:
            self.source_stop(old)
        sid = self._next_source
        src = make(sid)
        self._next_source += 1
        if isinstance(src, TxSink):
            d = self.dev(src.dev)
            if d.tx_sink_source is not None:
                src.close()
                raise Misuse(f"{d.name} already has a port (source {d.tx_sink_source})",
                             errno.EBUSY)
            d.tx_sink, d.tx_sink_source = src, sid
        self.sources[sid] = src
        return src

    def add_traffic(self, dev: str, spec: Mapping[str, Any]) -> int:
        """Start a :class:`~nic_proc.sources.Generator` on ``dev``; returns its id."""
        d = self.dev(dev)
        return self.add_source(lambda sid: Generator(sid, d.info, spec, clock=self.clock)).id

    def add_wire(self, dev: str, port: int, host: str = "127.0.0.1") -> tuple[int, int]:
        """Start a :class:`~nic_proc.sources.WireGateway`; returns (id, listening port)."""
        d = self.dev(dev)
        src = self.add_source(lambda sid: WireGateway(sid, d.info, port, host))
        assert isinstance(src, WireGateway)
        return src.id, src.port

    def add_port(self, dev: str, fd: int, ifname: str = "") -> TapPort:
        """Plug ``dev``'s wire into the open TAP ``fd`` (:mod:`nic_proc.port`): a source that
        lives as long as the device, with the spec's impairments.  EBUSY if it has one."""
        d = self.dev(dev)
        if d.port is not None:
            raise Misuse(f"{dev} already has a port ({d.port.ifname})", errno.EBUSY)
        imp = Impairment(**d.spec.impairments, seed=d.spec.seed)
        src = self.add_source(lambda sid: TapPort(sid, d.info, fd, ifname=ifname, impair=imp,
                                                  clock=self.clock))
        assert isinstance(src, TapPort)
        d.port = src
        return src

    def add_pcap(self, dev: str, request: Mapping[str, Any]) -> PcapSource:
        """Start a :class:`~nic_proc.pcap.PcapSource` replaying the file the request names."""
        d = self.dev(dev)
        src = self.add_source(lambda sid: PcapSource(
            sid, d.info, request["path"], dst=request.get("dst") or None,
            rewrite=bool(request.get("rewrite", False)), speed=float(request.get("speed", 0))))
        assert isinstance(src, PcapSource)
        return src

    def capture_start(self, dev: str, path: str, *, queue: int = -1, count: int = 0,
                      snaplen: int = MAX_SNAPLEN) -> int:
        """Write what ``dev`` (queue ``queue``, -1 all) takes off the wire to ``path``."""
        d = self.dev(dev)
        if queue >= d.n_queues or queue < -1:
            raise Misuse(f"{dev} has no queue {queue}", errno.EINVAL)
        self._next_capture += 1
        cap = Capture(self._next_capture, dev, path, queue=queue, count=count, snaplen=snaplen)
        d.captures.append(cap)
        return cap.id

    def _find_capture(self, cap_id: int) -> tuple[Netdev, Capture]:
        for d in self.netdevs.values():
            for c in d.captures:
                if c.id == cap_id:
                    return d, c
        raise Misuse(f"no capture {cap_id}", errno.ENOENT)

    def capture_status(self, cap_id: int) -> dict[str, Any]:
        return self._find_capture(cap_id)[1].status()

    def capture_stop(self, cap_id: int) -> dict[str, Any]:
        """Close a capture's file and forget it; its last status."""
        d, c = self._find_capture(cap_id)
        c.close()
        d.captures.remove(c)
        return c.status()

    def source_stop(self, source: int) -> None:
        """Stop and forget a source (ENOENT if unknown)."""
        src = self.sources.pop(source, None)
        if src is None:
            raise Misuse(f"no traffic source {source}", errno.ENOENT)
        src.close()
        d = self.netdevs.get(src.dev)
        if d is not None and d.tx_sink_source == source:
            d.tx_sink, d.tx_sink_source = DiscardSink(), None
        if d is not None and d.port is src:
            d.port = None
        self._steer_cache.clear()

    def sources_progress(self) -> list[dict[str, Any]]:
        return [s.progress() for s in self.sources.values()]

    # -- data path -----------------------------------------------------------------------

    def _steer(self, d: Netdev, flows: Flows, key: Hashable | None
               ) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.uint32]]:
        """(queue, rss hash) per flow of the table, cached per key and steering generation."""
        gen = d.steering.generation
        if key is not None:
            hit = self._steer_cache.get((d.name, key))
            if hit is not None and hit[0] == gen:
                return hit[1], hit[2]
        res = d.steering.steer(flows)
        if key is not None:
            if len(self._steer_cache) >= _STEER_CACHE:
                self._steer_cache.clear()
            self._steer_cache[(d.name, key)] = (gen, res.queue, res.hash)
        return res.queue, res.hash

    def blocked_fn(self, d: Netdev) -> Callable[[Flows, Hashable | None], npt.NDArray[np.bool_]]:
        """The ``blocked`` callback sources get: flows whose queue waits for buffers."""
        def blocked(flows: Flows, key: Hashable | None) -> npt.NDArray[np.bool_]:
            q, _ = self._steer(d, flows, key)
            return d.waiting[q]
        return blocked

    def _count(self, d: Netdev, queue: int, name: str, k: int) -> None:
        if k:
            d.stats[queue if 0 <= queue < MAX_QUEUES else 0, QC[name]] += k

    def rx(self, d: Netdev, frames: Frames) -> npt.NDArray[np.bool_]:
        """Steer and place a batch on netdev ``d``; True for every frame taken off the wire.

        Taken = placed, or dropped (oversize, drop rule, stopped queue, pause off, or
        an error completion).  Frames of a paused queue are not taken.
        """
        n = len(frames)
        consumed = np.zeros(n, dtype=bool)
        if n == 0:
            return consumed
        qf, hf = self._steer(d, frames.flows, frames.flows_key)
        u = frames.uniform
        longest = u[2] if u is not None else int(frames.frame_len.max())
        groups: list[tuple[int, Index]]
        h: npt.NDArray[np.uint32]
        if len(frames.flows) == 1 and longest <= d.max_frame:
            # One flow (a connection, a one-flow generator): one queue, one hash.
            groups = [(int(qf[0]), slice(0, n))]
            h = np.broadcast_to(hf[0], (n,))
        else:
            q = qf[frames.flow]
            h = hf[frames.flow]
            if longest > d.max_frame:
                over = frames.frame_len > d.max_frame
                consumed |= over
                self._count(d, 0, "rx_oversize", int(np.count_nonzero(over)))
                self._count(d, 0, "rx_dropped", int(np.count_nonzero(over)))
                q = np.where(over, -2, q)
            lo, hi = int(q.min()), int(q.max())
            if lo == hi:
                groups = [(lo, slice(0, n))]
            else:
                groups = [(v, np.flatnonzero(q == v)) for v in np.unique(q).tolist()]
        for qi, rows in groups:
            if qi == -2:
                continue
            cnt = rows.stop - rows.start if isinstance(rows, slice) else int(rows.shape[0])
            if qi < 0:  # ntuple rule "action -1"
                consumed[rows] = True
                self._count(d, 0, "rx_dropped", cnt)
                continue
            nq = d.queues[qi] if qi < d.n_queues else None
            if nq is None or nq.dma is None:
                if d.waiting[qi]:  # stopped under pause (queue_stop): held back, not lost
                    continue
                consumed[rows] = True
                self._count(d, qi, "rx_queue_stopped", cnt)
                self._count(d, qi, "rx_dropped", cnt)
                continue
            dq = nq.dma
            if dq.waiting:
                continue
            res = dq.place(frames, rows, h[0] if h.strides == (0,) else h[rows])
            if res.consumed:
                consumed[_head(rows, res.consumed)] = True
            if res.irq:
                self.pending_irqs.append((d.name, qi))
            elif dq.irq_pending:
                self.irq_timers[(d.name, qi)] = dq
            if res.starved:
                if d.spec.pause:
                    self._count(d, qi, "rx_pause", 1)
                    dq.arm_doorbell()
                    d.waiting[qi] = dq.waiting
                else:
                    rest = _tail(rows, res.consumed)
                    consumed[rest] = True
                    k = cnt - res.consumed
                    self._count(d, qi, "rx_missed", k)
                    self._count(d, qi, "rx_dropped", k)
        if d.captures:
            for cap in d.captures:
                cap.record(frames, consumed, qf[frames.flow])
        return consumed

    def rx_raw(self, d: Netdev, raw: RawBatch) -> npt.NDArray[np.bool_]:
        """The generic path: parse raw frames, drop and count bad ones, steer and place the rest."""
        ctl = _ctl_frames(raw)
        if ctl is not None:
            self._to_host(d, raw, ctl)
            keep = np.flatnonzero(~ctl)
            consumed = np.ones(len(raw), dtype=bool)
            if len(keep):
                consumed[keep] = self.rx_raw(d, RawBatch(raw.buf, raw.offsets[keep],
                                                         raw.lengths[keep]))
            return consumed
        frames, good, status = parse_raw(raw, d.spec.mtu)
        consumed = np.ones(len(raw), dtype=bool)
        nbad = len(raw) - int(good.shape[0])
        if nbad:
            over = int(np.count_nonzero(status == wire.FrameStatus.OVERSIZE))
            self._count(d, 0, "rx_oversize", over)
            self._count(d, 0, "rx_bad_frame", nbad - over)
            self._count(d, 0, "rx_dropped", nbad)
        if len(frames):
            consumed[good] = self.rx(d, frames)
        return consumed

    def _to_host(self, d: Netdev, raw: RawBatch, ctl: npt.NDArray[np.bool_]) -> None:
        """ARP / ICMPv6 frames: onto the kernel's control ring (counted on queue 0, where a
        real NIC hashes them), with an interrupt; dropped without a ring."""
        rows = np.flatnonzero(ctl).tolist()
        frames = [raw.buf[raw.offsets[r]:raw.offsets[r] + raw.lengths[r]].tobytes()
                  for r in rows]
        sent = d.ctl.send(frames) if d.ctl is not None else 0
        self._count(d, 0, "rx_packets", sent)
        self._count(d, 0, "rx_bytes", sum(len(f) for f in frames[:sent]))
        self._count(d, 0, "rx_dropped", len(frames) - sent)
        if sent:
            self.pending_irqs.append((d.name, 0))

    def _recheck(self) -> None:
        """Periodic re-check of waiting queues (covers a lost or raced doorbell)."""
        for d in self.netdevs.values():
            if d.waiting.any():
                for qi in np.flatnonzero(d.waiting).tolist():
                    if qi >= d.n_queues:  # removed by channels-set: nothing to wait for
                        d.waiting[qi] = False
                        continue
                    dq = d.queues[qi].dma
                    if dq is not None and dq.try_resume():  # a stopped queue keeps waiting
                        d.waiting[qi] = False

    def step(self, now: float | None = None) -> bool:
        """Drain the TX rings, give every active source one batch; True if any frame was
        sent or taken off the wire."""
        self._recheck()
        t = self.clock() if now is None else now
        work = self.tx_poll()
        srcs = list(self.sources.values())
        if not srcs:
            return work
        self._rr = (self._rr + 1) % len(srcs)
        for src in srcs[self._rr:] + srcs[:self._rr]:
            if src.done:
                continue
            d = self.netdevs[src.dev]
            if not d.spec.link:
                continue
            src.gro_room = d.spec.rx_buf_len if d.hds.gro_hw else 0
            batch = src.poll(self.blocked_fn(d), t)
            if batch is None:
                continue
            consumed = self.rx_raw(d, batch) if isinstance(batch, RawBatch) else self.rx(d, batch)
            src.commit(batch, consumed)
            if consumed.any():
                work = True
        return work

    @property
    def active(self) -> bool:
        """True while some source could still send (the loop should not block long)."""
        return any(not s.done and self.netdevs[s.dev].spec.link
                   and (not isinstance(s, TapPort) or s.pending)
                   for s in self.sources.values())

    def port_fds(self) -> list[int]:
        """The fds of the TAP ports: the loop blocks on them when nothing else is to do
        (an idle port is not :attr:`active`; a frame arriving wakes the loop)."""
        return [d.port.fileno() for d in self.netdevs.values()
                if d.port is not None and d.port.fileno() >= 0 and not d.port.full]

    @property
    def starved(self) -> bool:
        """True while some queue waits for posted buffers (paused, doorbell armed): the
        loop's next useful work comes with the kernel's doorbell, which wakes its poll, so
        spinning for it only takes the CPU from the kernel that would post them."""
        return any(bool(d.waiting.any()) for d in self.netdevs.values())

    def take_irqs(self) -> list[tuple[str, int]]:
        """The interrupts raised since the last call, each (dev, queue) once; coalescing
        timers that expired fire here."""
        if self.irq_timers:
            for key, dq in list(self.irq_timers.items()):
                if dq.irq_due():
                    self.pending_irqs.append(key)
                if not dq.irq_pending:
                    del self.irq_timers[key]
        out = list(dict.fromkeys(self.pending_irqs))
        self.pending_irqs.clear()
        return out

    def close(self) -> None:
        """Stop every source and queue and drop every mapping (device shutdown)."""
        for sid in list(self.sources):
            self.source_stop(sid)
        for d in self.netdevs.values():
            for cap in d.captures:
                cap.close()
            d.captures.clear()
        for d in self.netdevs.values():
            for q in d.started():
                self.queue_stop(d.name, q.index)
            if d.tx is not None:
                self.tx_stop(d.name)
            self.ctl_stop(d.name)
        self.iommu.unmap_all()


def _head(rows: Index, k: int) -> Index:
    return slice(rows.start, rows.start + k) if isinstance(rows, slice) else rows[:k]


def _tail(rows: Index, k: int) -> Index:
    return slice(rows.start + k, rows.stop) if isinstance(rows, slice) else rows[k:]


def _ctl_frames(raw: RawBatch) -> npt.NDArray[np.bool_] | None:
    """Which raw frames are ARP or ICMPv6 (without extension headers), for the host's
    control path; None when there are none (the common case, one vectorised check)."""
    n = len(raw)
    if n == 0:
        return None
    buf = np.asarray(raw.buf, np.uint8).reshape(-1)
    off = raw.offsets
    ok = (raw.lengths >= 14) & (off + 14 <= buf.shape[0])
    at = np.where(ok, off, 0)
    et = buf[at + 12].astype(np.int64) << 8 | buf[at + 13]
    nh = buf[np.minimum(at + 20, buf.shape[0] - 1)]
    ctl = ok & ((et == 0x0806) | ((et == 0x86DD) & (raw.lengths >= 54) & (nh == 58)))
    return ctl if ctl.any() else None
