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
  ``nic.dma_map`` (kernel regions by name; app memory, e.g. a zcrx area, by the kernel's
  descriptor of it, so an app cannot swap what a name points to in between).
  Addresses are IOVAs ``(map_id << 40) | offset`` (:func:`shared.abi.make_iova`).
  Anything else is an IOMMU fault.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from shared import abi
from shared.errors import Misuse
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
    "rx_missed",        # frames dropped for lack of buffers (nobuf=drop), Linux's rx_missed
    "rx_bad_frame",     # malformed frames (truncated, unknown headers)
    "rx_oversize",      # frames longer than the MTU allows
    "rx_queue_stopped", # frames for a stopped queue, dropped (pause off)
    "rx_frags",         # data buffers consumed
    "rx_irq",           # interrupts raised
    # HW-GRO (``rx-gro-hw``), the netdev qstats of the same names: completions that
    # coalesced two or more segments, their bytes, and the wire segments/bytes in them
    "rx_hw_gro_packets",
    "rx_hw_gro_bytes",
    "rx_hw_gro_wire_packets",
    "rx_hw_gro_wire_bytes",
    # The netdev's one TX queue counts in queue 0's row (shared.txring, nic_proc.tx):
    "tx_packets",       # frames the port's sink sent (the default sink discards them)
    "tx_bytes",         # their bytes (L2 header included, no FCS)
    "tx_dropped",       # frames the sink refused, or TX slots with an impossible length
)
#: The counters that belong to the TX queue (only queue 0's row uses them).
TX_COUNTERS = ("tx_packets", "tx_bytes", "tx_dropped")
QC = {name: i for i, name in enumerate(QUEUE_COUNTERS)}

#: Upper bounds the stats block is sized for.
MAX_NETDEVS = 8
MAX_QUEUES = 64
#: Largest pcap snapshot length a capture accepts (tcpdump's own maximum).
MAX_SNAPLEN = 262144


# -- netdev specs -------------------------------------------------------------------------
#
# The one grammar of a netdev, shared by the launcher (topology files, ``--netdev``,
# ``--queues``) and the NIC (``nic_proc --netdev``): a spec string
# ``NAME[:key=value,...]`` such as ``eth0:queues=4,mtu=9000``.  ``-`` may replace ``_`` in
# keys and ``ring`` means ``rx``.  The launcher parses it once into a NetdevSpec and hands
# the NIC the formatted string; the NIC parses it back to an equal NetdevSpec.

MIN_MTU = 576
MAX_MTU = 9216
MAX_RING = 4096
_NETDEV_NAME = re.compile(r"^[A-Za-z0-9_-]{1,15}$")
#: Boolean keys spelled with words other than on/off in a spec string.
_BOOL_WORDS = {"link": ("up", "down"), "pause": ("pause", "drop")}
#: Spellings of a key that stand for another (``nobuf=drop`` is ``pause=drop``).
_ALIASES = {"ring": "rx", "nobuf": "pause"}
#: What a netdev's wire can be plugged into: nothing but the emulator's own sources, or a
#: Linux TAP device in the run's peer network namespace (:mod:`nic_proc.port`).
PORT_KINDS = ("", "tap")
#: How the peer namespace learns the host's MAC: ARP / neighbour discovery answered by the
#: emulated kernel (the default), or a permanent neighbour entry the launcher writes.
NEIGH_KINDS = ("arp", "static")
#: Longest delay a port may add (seconds).
MAX_PORT_DELAY = 10.0
_DURATION = re.compile(r"^([0-9]*\.?[0-9]+)(us|ms|s)?$")
_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, None: 1e-3}


def parse_percent(text: str, key: str = "value") -> float:
    """``"1%"``, ``"0.5%"`` or a bare fraction ``"0.01"`` -> a probability in [0, 1]
    (:class:`Misuse`, EINVAL)."""
    t = text.strip()
    try:
        v = float(t[:-1]) / 100 if t.endswith("%") else float(t) if t else 0.0
    except ValueError:
        v = -1.0
    if not 0.0 <= v <= 1.0:
        raise Misuse(f"netdev spec: {key} must be a percentage like 1% or 0.5%, got {text!r}",
                     errno=22)
    return v


def parse_delay(text: str, key: str = "delay") -> float:
    """``"5ms"``, ``"200us"``, ``"0.1s"`` (a bare number is milliseconds) -> seconds."""
    t = text.strip()
    if not t:
        return 0.0
    m = _DURATION.match(t)
    v = float(m.group(1)) * _UNITS[m.group(2)] if m else -1.0
    if not 0.0 <= v <= MAX_PORT_DELAY:
        raise Misuse(f"netdev spec: {key} must be a duration like 5ms or 200us (at most "
                     f"{MAX_PORT_DELAY:g} s), got {text!r}", errno=22)
    return v


def is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def valid_buf_len(n: int) -> bool:
    """An ``rx_buf_len`` the NIC accepts: a power of two in [1024, 65536]."""
    return is_pow2(n) and 1024 <= n <= 65536


def _onoff(text: str, key: str) -> bool:
    on, off = _BOOL_WORDS.get(key, ("on", "off"))
    if text in (on, "on", "true", "1", "yes"):
        return True
    if text in (off, "off", "false", "0", "no"):
        return False
    raise Misuse(f"netdev spec: {key} must be {on} or {off}, got {text!r}")


@dataclass
class NetdevSpec:
    """The static description of one netdev: what the NIC creates it with.

    Defaults are the fields' defaults; :meth:`format` writes only what differs from
    them, so ``NetdevSpec.parse(spec.format()) == spec``.  ``addr``, ``addr6`` and ``mac``
    left empty take the traffic sources' defaults (:mod:`nic_proc.sources`).
    """

    name: str = "eth0"
    queues: int = 4
    max_queues: int = MAX_QUEUES
    rx: int = 512
    max_rx: int = MAX_RING
    mtu: int = 4096
    tcp_data_split: bool = True
    hds_thresh: int = 0
    hds_thresh_max: int = 1024
    rx_buf_len: int = 4096
    #: HW-GRO (``rx-gro-hw``, ``ethtool -K``): coalesce consecutive segments of a flow
    gro_hw: bool = False
    link: bool = True
    pause: bool = True
    addr: str = ""
    addr6: str = ""
    mac: str = ""
    port: str = ""
    neigh: str = "arp"
    loss: str = ""
    dup: str = ""
    reorder: str = ""
    delay: str = ""
    tx_loss: str = ""
    seed: int = 0

    @classmethod
    def option_types(cls) -> dict[str, type]:
        """Every option key (all fields but ``name``) -> its type (int, bool or str)."""
        kinds = {"int": int, "bool": bool, "str": str}
        return {f.name: kinds[str(f.type)] if not isinstance(f.type, type) else f.type
                for f in fields(cls) if f.name != "name"}

    @classmethod
    def parse(cls, text: str, **defaults: Any) -> NetdevSpec:
        """``NAME[:key=value,...]`` -> a validated spec (:class:`Misuse`, EINVAL).

        ``defaults`` replace the fields' defaults for the keys the text does not give
        (``zcrx up --queues N`` sets ``queues`` of every netdev that does not say).
        """
        name, _, rest = text.partition(":")
        types = cls.option_types()
        items: dict[str, Any] = {}
        for item in filter(None, (x.strip() for x in rest.split(","))):
            key, eq, val = item.partition("=")
            key = key.strip().replace("-", "_")
            key = _ALIASES.get(key, key)
            if not eq or key not in types:
                raise Misuse(f"netdev spec {text!r}: bad item {item!r}", errno=22)
            if types[key] is int:
                try:
                    items[key] = int(val, 0)
                except ValueError:
                    raise Misuse(f"netdev spec {text!r}: {key} needs an integer",
                                 errno=22) from None
            else:
                items[key] = val
        return cls.from_options(name, {**defaults, **items})

    @classmethod
    def from_options(cls, name: str, options: Mapping[str, Any]) -> NetdevSpec:
        """A validated spec from option values: ints, booleans (or their on/off words, as
        a spec string or a TOML file gives them) and strings."""
        types = cls.option_types()
        kw: dict[str, Any] = {}
        for key, v in options.items():
            key = _ALIASES.get(key.replace("-", "_"), key.replace("-", "_"))
            want = types.get(key)
            if want is None:
                raise Misuse(f"netdev {name}: unknown option {key!r}", errno=22)
            if want is bool and isinstance(v, str):
                v = _onoff(v, key)
            ok = isinstance(v, want) and (want is bool or not isinstance(v, bool))
            if not ok:
                raise Misuse(f"netdev {name}: {key} must be {want.__name__}, not {v!r}",
                             errno=22)
            kw[key] = v
        spec = cls(name=name, **kw)
        spec.validate()
        return spec

    def validate(self) -> None:
        """Range checks (:class:`Misuse`, EINVAL)."""
        if not _NETDEV_NAME.match(self.name):
            raise Misuse(f"bad netdev name {self.name!r} (1-15 of [A-Za-z0-9_-])", errno=22)
        if not 1 <= self.max_queues <= MAX_QUEUES or not 1 <= self.queues <= self.max_queues:
            raise Misuse(f"{self.name}: queues {self.queues} / max {self.max_queues} out of "
                         f"range (max {MAX_QUEUES})", errno=22)
        if not (is_pow2(self.max_rx) and self.max_rx <= MAX_RING and is_pow2(self.rx)
                and self.rx <= self.max_rx):
            raise Misuse(f"{self.name}: ring sizes must be powers of two <= {MAX_RING}",
                         errno=22)
        if not MIN_MTU <= self.mtu <= MAX_MTU:
            raise Misuse(f"{self.name}: mtu {self.mtu} not in [{MIN_MTU}, {MAX_MTU}]",
                         errno=22)
        if not 0 <= self.hds_thresh <= self.hds_thresh_max:
            raise Misuse(f"{self.name}: hds_thresh {self.hds_thresh} > {self.hds_thresh_max}",
                         errno=22)
        if not valid_buf_len(self.rx_buf_len):
            raise Misuse(f"{self.name}: rx_buf_len {self.rx_buf_len} is not a power of two "
                         f"in [1024, 65536]", errno=22)
        for key in ("addr", "addr6", "mac"):
            if "," in getattr(self, key):
                raise Misuse(f"{self.name}: {key} {getattr(self, key)!r} may not contain ','",
                             errno=22)
        if self.port not in PORT_KINDS:
            raise Misuse(f"{self.name}: port must be tap (or absent), got {self.port!r}",
                         errno=22)
        if self.neigh not in NEIGH_KINDS:
            raise Misuse(f"{self.name}: neigh must be arp or static, got {self.neigh!r}",
                         errno=22)
        impair = [k for k in ("loss", "dup", "reorder", "delay", "tx_loss")
                  if getattr(self, k)]
        if impair and not self.port:
            raise Misuse(f"{self.name}: {impair[0]} impairs a port; add port=tap", errno=22)
        for key in ("loss", "dup", "reorder", "tx_loss"):
            parse_percent(getattr(self, key), f"{self.name}: {key}")
        parse_delay(self.delay, f"{self.name}: delay")
        if not 0 <= self.seed < 1 << 63:
            raise Misuse(f"{self.name}: seed must be a non-negative integer", errno=22)

    @property
    def impairments(self) -> dict[str, float]:
        """The port's impairments as numbers: loss, dup, reorder, tx_loss (probabilities),
        delay (s)."""
        return {"loss": parse_percent(self.loss), "dup": parse_percent(self.dup),
                "reorder": parse_percent(self.reorder), "delay": parse_delay(self.delay),
                "tx_loss": parse_percent(self.tx_loss)}

    def options(self) -> dict[str, Any]:
        """The options that differ from the defaults, in field order (typed values)."""
        default = NetdevSpec()
        return {k: getattr(self, k) for k in self.option_types()
                if getattr(self, k) != getattr(default, k)}

    def format(self) -> str:
        """The spec string ``NAME[:key=value,...]`` (only options that differ from the
        defaults; booleans as on/off, ``link`` as up/down, ``pause`` as ``nobuf=drop``)."""
        items = []
        for k, v in self.options().items():
            if isinstance(v, bool):
                on, off = _BOOL_WORDS.get(k, ("on", "off"))
                v = on if v else off
            items.append(f"{'nobuf' if k == 'pause' else k}={v}")
        return self.name + (":" + ",".join(items) if items else "")

    def to_dict(self) -> dict[str, Any]:
        """``{"name": ..., **options()}``: plain data :meth:`from_options` reads back."""
        return {"name": self.name, **self.options()}


def tap_ifname(run_id: str, index: int) -> str:
    """The Linux name of netdev ``index``'s TAP device in run ``run_id``: ``zcrx<token>t<index>``
    with the run id's random token (so ``zcrx cleanup`` finds it by run id; 15 bytes at most,
    IFNAMSIZ)."""
    token = "".join(c for c in run_id.rpartition("-")[2] if c.isalnum())[:8] or "run"
    return f"zcrx{token}t{index}"[:15]


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
              optional={"fd": (int, -1), "dev": (int, 0), "ino": (int, 0)},
              reply=Schema.make({"map_id": int}),
              doc="Map a kernel- or app-owned region for DMA; returns the IOVA map id.  A "
                  "kernel region by ``name``; app memory by the caller's descriptor ``fd`` "
                  "(opened through /proc/<caller pid>/fd/<fd>, the pid from the "
                  "connection's credentials) whose inode must be ``dev``:``ino``.")
register_type("nic.dma_unmap", {"map_id": int}, optional={"more": (list, [])},
              doc="Remove a mapping (and those listed in more, in the same command: a "
                  "device's close); later DMA into it is an IOMMU fault.  With more, every "
                  "one is tried and the first failure is reported.")
register_type("nic.queue_start", {**_DEVQ, "map_id": int, "ring_size": int, "slot_size": int},
              optional={"unmap": (list, [])},
              doc="Start DMA into the queue whose region is mapped as map_id; first remove "
                  "the mappings listed in unmap (map ids: a restart's old page pool), each as "
                  "nic.dma_unmap would (one that cannot be removed is left as it is).")
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
register_type("nic.pcap", {**_DEV, "path": str},
              optional={"dst": (str, ""), "rewrite": (bool, False), "speed": (float, 0.0)},
              reply=Schema.make({"source": int, "frames": int, "flows": int}),
              doc="Replay a capture file the NIC reads (see nic_proc.pcap).")
register_type("nic.capture_start", {**_DEV, "path": str},
              optional={"queue": (int, -1), "count": (int, 0), "snaplen": (int, MAX_SNAPLEN)},
              reply=Schema.make({"capture": int}),
              doc="Write what the netdev takes off the wire to a pcap file (nic_proc.capture).")
register_type("nic.capture_status", {"capture": int}, reply=Schema.make(open=True),
              doc="Frames written by a capture and whether it is done.")
register_type("nic.capture_stop", {"capture": int}, reply=Schema.make(open=True),
              doc="Stop a capture and close its file.")
register_type("nic.tx_start", {**_DEV, "map_id": int, "ring_size": int, "slot_size": int},
              doc="Attach the netdev's TX ring (shared.txring), whose region is mapped as "
                  "map_id; the NIC drains it from now on.")
register_type("nic.tx_stop", _DEV, reply=Schema.make({"sent": int}),
              doc="Detach the TX ring (what it holds is sent first); acked once detached.")
register_type("nic.ctl_start", {**_DEV, "map_id": int, "ring_size": int, "slot_size": int},
              doc="Attach the netdev's control-frame ring (a shared.txring ring the NIC "
                  "produces): ARP and ICMPv6 frames for the host go there.")
register_type("nic.ctl_stop", _DEV, doc="Detach the control-frame ring.")
register_type("nic.sources", reply=Schema.make({"sources": list}),
              doc="Progress of every traffic source.")
register_type("nic.source_stop", {"source": int}, doc="Stop a traffic source.")

# -- events (one-way, PUSH/PULL) ---------------------------------------------------------

register_type("irq", _DEVQ, doc="NIC -> kernel: completions ready on an armed queue.")
register_type("nic.doorbell", _DEVQ, doc="kernel -> NIC: buffers posted on a waiting queue.")
register_type("nic.tx_doorbell", _DEV, doc="kernel -> NIC: frames queued on a TX ring whose "
              "consumer said it sleeps (need-wakeup).")

__all__ = ["MAX_MTU", "MAX_NETDEVS", "MAX_QUEUES", "MAX_RING", "MAX_SNAPLEN", "MIN_MTU",
           "NETDEV_FIELDS", "PAGE_SIZE", "QC", "QUEUE_COUNTERS", "TX_COUNTERS", "NetdevSpec",
           "QueueLayout", "hdr_slot_size",
           "is_pow2", "queue_region_object", "stats_block_bytes", "stats_block_shape",
           "valid_buf_len"]
__all__ += ["NEIGH_KINDS", "PORT_KINDS", "parse_delay", "parse_percent", "tap_ifname"]
