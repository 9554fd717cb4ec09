"""The NIC <-> kernel contract: queue memory layout, admin messages, counters.

This is the emulated equivalent of a NIC's programming model (its descriptor
formats live in :mod:`shared.abi` as ``nic_rx_desc`` / ``nic_rx_cqe``).

Queue memory (one region per RX queue, created and owned by the kernel,
``/zcrx.<run>.kernel.<dev>.q<N>``, DMA-mapped for the NIC)::

    +--------------------+  0
    | fill ring          |  kernel -> NIC: data buffers (nic_rx_desc), RingLayout.default
    +--------------------+  QueueLayout.comp.head
    | completion ring    |  NIC -> kernel: one nic_rx_cqe per frame
    +--------------------+  QueueLayout.hdr_off (page aligned)
    | header slots       |  ring_size x hdr_slot_size, written by the NIC:
    |                    |  the slot of a completion is its ring index (tail & mask)
    +--------------------+

Rules both sides keep:

* The kernel posts data buffers on the fill ring; all posted buffers of a queue
  have the same length (``rx_buf_len``).  The NIC consumes them strictly in
  order; a completion with ``nr_frags = f`` used exactly the next ``f`` posted
  buffers, filling each to ``min(len, remaining)``.  The kernel therefore
  recovers every frag from its own FIFO of posted buffers and the completion's
  ``data_len``; it never trusts an address the NIC reports.
* The NIC writes the frame's headers (or the whole frame, for linear
  placement) into header slot ``comp.tail & mask`` before it publishes the
  completion.  The slot is the kernel's to read until it releases that
  completion (advances the completion ring's head); the kernel copies out what
  it keeps.
* The completion ring is as large as the fill ring, and a frame needs a
  completion slot before it may use any buffer, so the completion ring never
  overflows.
* Interrupts: the kernel arms a queue's interrupt by setting need-wakeup on the
  completion ring (then re-checks it); the NIC, after publishing completions,
  sends one ``irq`` event if the flag is set and clears it.  Doorbell: the NIC,
  out of buffers, sets need-wakeup on the fill ring; the kernel, after posting,
  sends ``nic.doorbell`` if it sees the flag.
* DMA: the NIC may read or write only inside regions mapped with
  ``nic.dma_map``.  Addresses are IOVAs ``(map_id << 40) | offset``
  (:func:`shared.abi.make_iova`).  Anything else is an IOMMU fault.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shared import abi
from shared.msg import Schema, register_type
from shared.ring import RingLayout
from shared.shm import PAGE_SIZE, page_align

# -- queue memory -----------------------------------------------------------------------

#: Header slots are multiples of this (one cache line).
HDR_SLOT_ALIGN = 64


def hdr_slot_size(max_frame: int) -> int:
    """Header slot size for a device whose largest frame is ``max_frame`` bytes.

    A slot must hold a whole frame, because linear placement (tcp-data-split off,
    or payload at or under hds-thresh) puts the whole frame there.
    """
    return (max_frame + HDR_SLOT_ALIGN - 1) // HDR_SLOT_ALIGN * HDR_SLOT_ALIGN


@dataclass(frozen=True)
class QueueLayout:
    """Where the fill ring, completion ring and header slots sit in a queue region."""

    ring_size: int
    slot_size: int

    @property
    def fill(self) -> RingLayout:
        return RingLayout.default(self.ring_size, abi.nic_rx_desc, base=0)

    @property
    def comp(self) -> RingLayout:
        fill = self.fill
        base = (fill.size + HDR_SLOT_ALIGN - 1) // HDR_SLOT_ALIGN * HDR_SLOT_ALIGN
        return RingLayout.default(self.ring_size, abi.nic_rx_cqe, base=base)

    @property
    def hdr_off(self) -> int:
        return page_align(self.comp.size)

    @property
    def size(self) -> int:
        return page_align(self.hdr_off + self.ring_size * self.slot_size)

    def hdr_slots(self, buf: object) -> np.ndarray:
        """The header slots as a ``(ring_size, slot_size)`` uint8 view of ``buf``."""
        flat: np.ndarray = np.frombuffer(
            buf, dtype=np.uint8, count=self.ring_size * self.slot_size,  # type: ignore[call-overload]
            offset=self.hdr_off)
        return flat.reshape(self.ring_size, self.slot_size)


def queue_region_object(dev: str, queue: int) -> str:
    """The ``<object>`` part of a queue region's name."""
    return f"{dev}.q{queue}"


# -- counters ---------------------------------------------------------------------------

#: Per-queue NIC counters, in stats-block order (ethtool -S names, per queue ``rx-N.name``).
QUEUE_COUNTERS = (
    "rx_packets",       # frames completed to the queue
    "rx_bytes",         # bytes of those frames (L2 header included)
    "rx_dropped",       # frames dropped for any reason below
    "rx_hds_split",     # frames placed header/data split
    "rx_hds_linear",    # frames placed linear in the header slot
    "rx_iommu_fault",   # DMA outside a mapped region (frame dropped)
    "rx_pause",         # times the queue paused its source for lack of buffers
    "rx_no_buffer",     # frames dropped for lack of buffers (pause off)
    "rx_bad_frame",     # malformed frames (truncated, unknown headers)
    "rx_oversize",      # frames longer than the MTU allows
    "rx_queue_stopped", # frames for a stopped queue (dropped)
    "rx_frags",         # data buffers consumed
    "rx_irq",           # interrupts raised
)
QC = {name: i for i, name in enumerate(QUEUE_COUNTERS)}

#: Upper bounds the stats block is sized for.
MAX_NETDEVS = 8
MAX_QUEUES = 64


def stats_block_shape() -> tuple[int, int, int]:
    """``(netdev, queue, counter)``: the NIC's int64 stats region (``nic.stats``)."""
    return (MAX_NETDEVS, MAX_QUEUES, len(QUEUE_COUNTERS))


def stats_block_bytes() -> int:
    d, q, c = stats_block_shape()
    return page_align(d * q * c * 8)


# -- admin messages (kernel -> NIC, NIC serves) ------------------------------------------
#
# The driver is the NIC's only admin client, except for traffic sources, which
# the launcher configures directly (the wire is outside the host).

_DEV = {"dev": str}
_DEVQ = {"dev": str, "queue": int}

NETDEV_FIELDS = ("name", "ifindex", "mac", "queues", "max_queues", "ring_size",
                 "max_ring_size", "mtu", "tcp_data_split", "hds_thresh", "hds_thresh_max",
                 "rx_buf_len", "link_up", "stats_index")

register_type("nic.probe", reply=Schema.make({"netdevs": list, "stats_region": str}),
              doc="Describe every netdev: dicts with NETDEV_FIELDS.")
register_type("nic.dma_map", {"name": str, "size": int},
              reply=Schema.make({"map_id": int}),
              doc="Map a kernel- or app-owned region for DMA; returns the IOVA map id.")
register_type("nic.dma_unmap", {"map_id": int},
              doc="Remove a mapping; later DMA into it is an IOMMU fault.")
register_type("nic.queue_start", {**_DEVQ, "map_id": int, "ring_size": int, "slot_size": int},
              doc="Start DMA into the queue whose region is mapped as map_id.")
register_type("nic.queue_stop", _DEVQ,
              reply=Schema.make({"completed": int}),
              doc="Quiesce the queue: no more DMA or completions; acked once stopped.")
register_type("nic.ethtool", {**_DEV, "request": dict}, reply=Schema.make(open=True),
              doc="An ethtool request dict (launch.ethtool) the NIC applies or answers.")
register_type("nic.link", {**_DEV, "up": bool}, doc="Set carrier.")
register_type("nic.traffic", {**_DEV, "spec": dict}, reply=Schema.make({"source": int}),
              doc="Start a generator source (see nic_proc.sources).")
register_type("nic.wire", {**_DEV, "port": int}, optional={"host": (str, "127.0.0.1")},
              reply=Schema.make({"source": int, "port": int}),
              doc="Start a wire gateway: a real TCP listener whose connections become flows.")
register_type("nic.sources", reply=Schema.make({"sources": list}),
              doc="Progress of every traffic source.")
register_type("nic.source_stop", {"source": int}, doc="Stop a traffic source.")

# -- events (one-way, PUSH/PULL) ---------------------------------------------------------

register_type("irq", _DEVQ, doc="NIC -> kernel: completions ready on an armed queue.")
register_type("nic.doorbell", _DEVQ, doc="kernel -> NIC: buffers posted on a waiting queue.")

__all__ = ["MAX_NETDEVS", "MAX_QUEUES", "NETDEV_FIELDS", "PAGE_SIZE", "QC", "QUEUE_COUNTERS",
           "QueueLayout", "hdr_slot_size", "queue_region_object", "stats_block_bytes",
           "stats_block_shape"]
