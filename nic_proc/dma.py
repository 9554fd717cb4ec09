"""Receive DMA of one NIC RX queue: header/data split, placement, completions (pure logic).

:class:`DmaQueue` is the device side of one RX queue whose memory the kernel laid
out with :class:`shared.nicif.QueueLayout` and DMA-mapped for the NIC:

* the **fill ring** (kernel -> NIC, ``nic_rx_desc``): posted data buffers.  The NIC
  is its consumer; it reads descriptors and advances ``head`` once per batch;
* the **completion ring** (NIC -> kernel, ``nic_rx_cqe``): one completion per frame.
  The NIC is its producer; it advances ``tail`` once per batch;
* the **header slots**: the NIC writes the headers (or the whole frame) of the
  completion with ring index ``i`` into slot ``i & mask`` before publishing it;
  the slot is the kernel's to read until it releases that completion.

The queue region and every data buffer belong to the kernel (or the app whose area
backs them); the NIC only writes into them, through :class:`nic_proc.iommu.Iommu`
translations, and never reads back what it wrote.

Placement of a batch (:meth:`DmaQueue.place`), in order, for frame ``i``:

* **split** when tcp-data-split is on and ``pay_len > hds_thresh``: the L2..L4
  headers (``hdr_len = payload_off`` bytes) go to the header slot; the payload goes
  to the next posted buffers in posting order, each filled to ``min(desc.len,
  remaining)`` (``nr_frags`` buffers).  Only the TCP payload goes to the buffers
  (``data_len = pay_len``): Ethernet padding of a tiny frame is not written;
* **linear** otherwise (split off, or payload at or under the threshold): the whole
  frame (``frame_len`` bytes, Ethernet padding written as zeros) goes to the header
  slot; no buffer is used.

Every frame that reaches the queue takes exactly one completion slot and no frame
uses a buffer without one, so the completion ring never overflows (nicif contract).
The batch stops at the first frame for which there is no completion slot or not
enough posted buffers: the caller pauses the source (802.3x, lossless) or drops
the rest (pause off); nothing after the stop point is touched.

Errors that still produce a completion (so the kernel recovers every buffer from
its FIFO of posted descriptors, as drivers recycle the buffers of errored
descriptors):

* **IOMMU fault**: a buffer the frame would use lies outside every mapping.  The
  frame is dropped, nothing is written, and its completion has ``flags = 0``,
  ``hdr_len = data_len = 0``, ``nr_frags`` = the buffers it consumed, ``status =``
  :data:`NIC_STATUS_DMA_FAULT`.  Counted in ``rx_iommu_fault`` and ``rx_dropped``.
* **cannot fit**: a frame longer than a header slot, or whose payload needs more
  buffers than the ring holds: ``status = NIC_STATUS_TRUNCATED``, ``nr_frags = 0``,
  nothing written.  Counted in ``rx_dropped``.

Speed: a batch costs a fixed number of numpy calls, not one per frame.  Payload
copies are grouped by (mapping, column, length): each group is one fancy-index
assignment ``window[offsets] = payload[rows, col:col + L]`` through a
``(size - L + 1, L)`` sliding-window view of the mapping (rows may start at any
byte offset).  Header copies are one assignment per header length.  Descriptors
of unequal length (a kernel that broke the "one rx_buf_len per queue" rule) take a
per-frame slow path, correct but slower.

Interrupts and doorbells (nicif contract): after publishing completions, if the
completion ring's need-wakeup flag is set the NIC clears it and raises one
interrupt (``PlaceResult.irq``).  Starved of buffers, the NIC sets need-wakeup on
the fill ring and re-checks it (:meth:`DmaQueue.arm_doorbell`); the kernel rings
``nic.doorbell`` after posting when it sees the flag, and the NIC clears the flag
once it can go on (:meth:`DmaQueue.try_resume`).

Interrupt coalescing (``ethtool -c/-C``, :class:`Coalesce`, owned by the netdev and read on
every batch): completions written while the flag is armed are *pending*; the interrupt
fires (flag cleared, ``rx_irq`` counted) once ``rx-frames`` of them are pending or
``rx-usecs`` have passed since the first one, whichever comes first.  ``rx-usecs 0``
fires at once (no coalescing, the default); ``rx-frames 0`` leaves only the timer.  A
timer that expires with no new frame fires from :meth:`DmaQueue.irq_due`, which the
NIC's loop calls for queues with pending completions only (an idle queue costs nothing).
``adaptive-rx on``: every :data:`ADAPTIVE_WINDOW_NS` the queue measures its completion
rate and picks the first row of :data:`ADAPTIVE_PROFILES` whose rate bound it is under,
like Linux's DIM profiles: a slow queue interrupts at once (latency), a busy one waits
for a batch (fewer wake-ups of the kernel).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from nic_proc.iommu import Iommu
from nic_proc.rss import Flows
from shared import abi
from shared.nicif import QC, QUEUE_COUNTERS, QueueLayout
from shared.ring import RING_F_NEED_WAKEUP, U32, RingConsumer, RingProducer

__all__ = [
    "NIC_STATUS_DMA_FAULT",
    "DmaQueue",
    "Frames",
    "HdsConfig",
    "Index",
    "PlaceResult",
]

#: Completion status of a frame dropped for an IOMMU fault.  Proposed for
#: ``shared.abi`` (``NIC_STATUS_*``); kept here until the ABI carries it.
NIC_STATUS_DMA_FAULT = abi.NIC_STATUS_DMA_FAULT

Index = slice | npt.NDArray[np.intp]
I64 = npt.NDArray[np.int64]

_F_SPLIT = abi.NIC_CQE_F_SPLIT | abi.NIC_CQE_F_L4_OK
_F_LINEAR = abi.NIC_CQE_F_LINEAR | abi.NIC_CQE_F_L4_OK
_C_PACKETS = QC["rx_packets"]
_C_BYTES = QC["rx_bytes"]
_C_DROPPED = QC["rx_dropped"]
_C_SPLIT = QC["rx_hds_split"]
_C_LINEAR = QC["rx_hds_linear"]
_C_FAULT = QC["rx_iommu_fault"]
_C_FRAGS = QC["rx_frags"]
_C_IRQ = QC["rx_irq"]
_C_GRO_PKTS = QC["rx_hw_gro_packets"]
_C_GRO_BYTES = QC["rx_hw_gro_bytes"]
_C_GRO_WIRE_PKTS = QC["rx_hw_gro_wire_packets"]
_C_GRO_WIRE_BYTES = QC["rx_hw_gro_wire_bytes"]
_F_GRO = _F_SPLIT | abi.NIC_CQE_F_GRO
#: HW-GRO: most segments one session coalesces (Linux's GRO stops at 64 as well)
GRO_MAX_SEGS = 64
_GRO_MAX_IP_LEN = 0xFFFF
_TCP_ACK = 0x10
#: HW-GRO: stretches of coalescable frames one placement call takes before the rest of the
#: batch goes the plain way
_GRO_PASSES = 4
_TCP_PSH = 0x08
_TCP_HLEN = 20
# Header bytes that may differ between segments of one session (relative to the TCP header:
# sequence number, flags (checked on their own), checksum; IP: lengths, id, checksum).
_GRO_TCP_FREE = np.zeros(256, bool)
_GRO_TCP_FREE[[4, 5, 6, 7, 13, 16, 17]] = True
_GRO_V4_FREE = np.zeros(256, bool)
_GRO_V4_FREE[[16, 17, 18, 19, 24, 25]] = True
_GRO_V6_FREE = np.zeros(256, bool)
_GRO_V6_FREE[[18, 19]] = True
_IOVA_SHIFT = np.uint64(abi.NIC_IOVA_SHIFT)
_IOVA_MASK = np.uint64((1 << abi.NIC_IOVA_SHIFT) - 1)


@dataclass(eq=False)
class Frames:
    """A batch of received frames, as the wire hands them to the MAC.

    Row ``i`` describes frame ``i``: its L2..L4 headers are ``hdr[i, :hdr_len[i]]``
    (``hdr_len`` is the payload offset), its TCP payload ``pay[i, :pay_len[i]]``;
    ``frame_len[i] >= hdr_len + pay_len`` (the excess is Ethernet padding, zeros).
    Keeping headers and payload as two 2-D arrays lets a generator hand over
    payload rows that were never glued to their headers, and lets DMA copy a whole
    batch of equal-length payloads with one assignment.

    Steering input: ``flows`` is a table of 4-tuples and ``flow[i]`` the row of
    frame ``i`` in it; ``flows_key`` (hashable, or None) names the table so the
    NIC can cache its steering decision per table until the configuration changes.
    """

    hdr: npt.NDArray[np.uint8]
    hdr_len: I64
    pay: npt.NDArray[np.uint8]
    pay_len: I64
    frame_len: I64
    flow: npt.NDArray[np.intp]
    flows: Flows
    flows_key: Hashable | None = None
    #: ``(hdr_len, pay_len, frame_len)`` when every frame has that shape (a hint
    #: builders set; it lets DMA skip per-frame work), else None.
    uniform: tuple[int, int, int] | None = None

    def __len__(self) -> int:
        return int(self.hdr_len.shape[0])

    def frame_bytes(self, i: int) -> bytes:
        """The bytes of frame ``i`` as they were on the wire (tests, tools)."""
        h, p, f = int(self.hdr_len[i]), int(self.pay_len[i]), int(self.frame_len[i])
        return (self.hdr[i, :h].tobytes() + self.pay[i, :p].tobytes()
                + bytes(max(0, f - h - p)))


@dataclass
class HdsConfig:
    """The header/data-split and HW-GRO settings a queue places with (owned by its netdev)."""

    tcp_data_split: bool = True
    hds_thresh: int = 0
    #: ``rx-gro-hw`` (``ethtool -K``): coalesce segments of a flow (:meth:`DmaQueue.place`)
    gro_hw: bool = False


#: adaptive-rx: (completions per second below which the row applies, rx-usecs, rx-frames)
ADAPTIVE_PROFILES: tuple[tuple[float, int, int], ...] = (
    (50_000.0, 0, 1),
    (250_000.0, 16, 32),
    (float("inf"), 64, 128),
)
#: adaptive-rx: length of one rate measurement window (1 ms)
ADAPTIVE_WINDOW_NS = 1_000_000
#: the largest rx-usecs / rx-frames ``ethtool -C`` accepts
MAX_COALESCE_USECS = 1_000_000
MAX_COALESCE_FRAMES = 65_536


@dataclass
class Coalesce:
    """A netdev's interrupt coalescing settings (``ethtool -C``), shared by its queues."""

    rx_usecs: int = 0
    rx_frames: int = 1
    adaptive_rx: bool = False


class PlaceResult(NamedTuple):
    """What :meth:`DmaQueue.place` did with the first frames of its request."""

    consumed: int  #: frames taken off the wire (each got a completion)
    placed: int  #: of those, frames delivered with status OK
    starved: bool  #: stopped early: no completion slot or not enough buffers
    irq: bool  #: the kernel had armed the interrupt: send one ``irq`` event


_NOTHING = PlaceResult(0, 0, False, False)


def _nrows(rows: Index) -> int:
    if isinstance(rows, slice):
        return max(0, rows.stop - rows.start)
    return int(rows.shape[0])


def _head(rows: Index, n: int) -> Index:
    if isinstance(rows, slice):
        return slice(rows.start, rows.start + n)
    return rows[:n]


def _tail(rows: Index, k: int) -> Index:
    if isinstance(rows, slice):
        return slice(rows.start + k, rows.stop)
    return rows[k:]


def _contig(pos: npt.NDArray[np.intp]) -> Index:
    """An increasing index array as a slice when it has no gaps."""
    k = pos.shape[0]
    if k and int(pos[-1]) - int(pos[0]) + 1 == k:
        return slice(int(pos[0]), int(pos[0]) + k)
    return pos


def _compose(base: Index, pos: Index) -> Index:
    """``base[pos]`` for index-likes, staying a slice where possible."""
    if isinstance(base, slice):
        if isinstance(pos, slice):
            return slice(base.start + pos.start, base.start + pos.stop)
        return pos + base.start
    sub = base[pos]
    return sub if isinstance(pos, slice) else _contig(sub)


class DmaQueue:
    """The NIC side of one started RX queue (see the module docstring)."""

    def __init__(self, buf: Any, layout: QueueLayout, iommu: Iommu, *, queue: int = 0,
                 config: HdsConfig | None = None, stats: npt.NDArray[np.int64] | None = None,
                 clock: Callable[[], int] = time.monotonic_ns,
                 coalesce: Coalesce | None = None) -> None:
        """Attach to the queue memory ``buf`` (the mapped queue region) laid out as ``layout``.

        ``stats`` is this queue's row of the NIC stats block (``QUEUE_COUNTERS``
        order), written only by the NIC.  ``config`` is read on every batch, so the
        netdev may change it between batches; so is ``coalesce``.
        """
        self.layout = layout
        self.coalesce = coalesce if coalesce is not None else Coalesce()
        #: completions written since the interrupt was armed, not yet signalled
        self.irq_pending = 0
        self._irq_first = 0  # clock() of the first pending completion
        # adaptive-rx: the profile in use and the current measurement window
        self._adaptive = (ADAPTIVE_PROFILES[0][1], ADAPTIVE_PROFILES[0][2])
        self._rate_t0 = 0
        self._rate_n = 0
        self.iommu = iommu
        self.queue = queue
        self.config = config if config is not None else HdsConfig()
        self.stats = stats if stats is not None else np.zeros(len(QUEUE_COUNTERS), np.int64)
        self.clock = clock
        # The kernel is another process: clamp and count impossible indices, never raise.
        self.fill = RingConsumer(buf, layout.fill, untrusted=True)
        self.comp = RingProducer(buf, layout.comp, untrusted=True)
        self.slots: npt.NDArray[np.uint8] = layout.hdr_slots(buf)
        assert layout.comp.flags is not None and layout.fill.flags is not None
        self._comp_flags: npt.NDArray[np.uint32] = np.frombuffer(
            buf, np.uint32, 1, layout.comp.flags)
        #: completions written since the queue started
        self.completed = 0
        #: True while starved and waiting for a doorbell
        self.waiting = False
        #: posted buffers the next frame needs (valid while waiting)
        self.need_bufs = 0
        self._slot_mask = layout.ring_size - 1
        # Buffer length of the last uniform descriptor batch (0: none seen yet).
        self._bsz = 0
        self._arange = np.arange(layout.ring_size, dtype=np.int64)
        self._cq_buf = np.zeros(layout.ring_size, abi.nic_rx_cqe)
        self._cq_key: tuple[int, int, int, int, bool, int] | None = None
        #: HW-GRO: (ethertype + IP version/IHL bytes, header length) -> (TCP header
        #: offset, mask of the header bytes that must be equal within a session)
        self._gro_cols: dict[tuple[bytes, int], tuple[int, npt.NDArray[np.uint8] | None]] = {}
        self._gro_buf = np.zeros((0, 8), np.uint8)
        self._gro_steps: dict[int, npt.NDArray[np.uint32]] = {}
        self._gro_chunk_cache: dict[tuple[int, int, int], tuple[
            npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64],
            npt.NDArray[np.int64]]] = {}

    def detach(self) -> None:
        """Drop every view into the queue memory: no DMA into it can follow."""
        self.fill.detach()
        self.comp.detach()
        self.slots = np.empty((0, 0), np.uint8)
        self._comp_flags = np.zeros(1, np.uint32)

    # -- doorbell / interrupt flag protocol ------------------------------------------------

    def _can_resume(self) -> bool:
        return self.fill.ready() >= self.need_bufs and self.comp.space() >= 1

    def arm_doorbell(self) -> bool:
        """Starved: set need-wakeup on the fill ring, then re-check it.

        Returns True (flag cleared again, not waiting) if what the next frame needs
        arrived in between, else False: the queue waits for ``nic.doorbell``.
        """
        self.fill.set_need_wakeup()
        if self._can_resume():
            self.fill.clear_need_wakeup()
            self.waiting = False
            return True
        self.waiting = True
        return False

    def try_resume(self) -> bool:
        """On a doorbell (or a periodic re-check): True if the queue can go on.

        Clears the fill ring's need-wakeup flag when it resumes, so a busy kernel
        stops ringing.
        """
        if not self.waiting:
            return True
        if self._can_resume():
            self.waiting = False
            self.fill.clear_need_wakeup()
            return True
        return False

    def moderation(self) -> tuple[int, int]:
        """The (rx-usecs, rx-frames) in force: the netdev's, or adaptive-rx's choice."""
        c = self.coalesce
        if c.adaptive_rx:
            return self._adaptive
        return c.rx_usecs, c.rx_frames

    def _measure(self, n: int, now: int) -> None:
        """adaptive-rx: count ``n`` completions; at the end of a window pick a profile."""
        self._rate_n += n
        dt = now - self._rate_t0
        if dt < ADAPTIVE_WINDOW_NS:
            return
        rate = self._rate_n * 1e9 / dt if self._rate_t0 else 0.0
        for bound, usecs, frames in ADAPTIVE_PROFILES:
            if rate < bound:
                self._adaptive = (usecs, frames)
                break
        self._rate_t0, self._rate_n = now, 0

    def _fire(self) -> bool:
        w = self._comp_flags
        w[0] = int(w[0]) & ~RING_F_NEED_WAKEUP & U32
        self.stats[_C_IRQ] += 1
        self.irq_pending = 0
        return True

    def _take_irq(self, n: int = 1) -> bool:
        """After publishing ``n`` completions: True if the interrupt fires now."""
        c = self.coalesce
        if c.adaptive_rx:
            self._measure(n, self.clock())
        if not int(self._comp_flags[0]) & RING_F_NEED_WAKEUP:
            self.irq_pending = 0  # not armed: the kernel is polling
            return False
        usecs, frames = self.moderation()
        if usecs == 0:
            return self._fire()
        if n <= 0 and not self.irq_pending:
            return False
        now = self.clock()
        if not self.irq_pending:
            self._irq_first = now
        self.irq_pending += n
        if (frames and self.irq_pending >= frames) or now - self._irq_first >= usecs * 1000:
            return self._fire()
        return False

    def irq_due(self, now: int | None = None) -> bool:
        """The coalescing timer: True (interrupt fired) if completions are pending, the
        interrupt is still armed and rx-usecs have passed since the first of them.  Pending
        completions the kernel already consumed (it woke for another reason and polled)
        are forgotten, not signalled."""
        if not self.irq_pending:
            return False
        if not int(self._comp_flags[0]) & RING_F_NEED_WAKEUP \
                or self.comp.space() == self.comp.nentries:
            self.irq_pending = 0  # the kernel took the flag back or already polled them all
            return False
        usecs, _ = self.moderation()
        t = self.clock() if now is None else now
        if t - self._irq_first >= usecs * 1000:
            return self._fire()
        return False

    # -- placement -------------------------------------------------------------------------

    def _descs(self) -> np.ndarray:
        """Every posted descriptor, oldest first (a view unless the ring wraps)."""
        fill = self.fill
        avail = fill.ready()
        start = fill.head & fill.mask
        if start + avail <= fill.nentries:
            return fill.ring[start:start + avail]
        return np.concatenate((fill.ring[start:], fill.ring[:start + avail - fill.nentries]))

    def place(self, frames: Frames, rows: Index | None = None,
              rss_hash: npt.ArrayLike = 0) -> PlaceResult:
        """DMA ``frames[rows]`` (in order) into the queue; see the module docstring.

        ``rows`` defaults to every frame; ``rss_hash`` is per requested row or a
        scalar.  Publishes the completion tail and releases the fill ring once.
        Returns how many of the requested frames were consumed (a prefix).
        """
        if rows is None:
            rows = slice(0, len(frames))
        if self.config.gro_hw:
            return self._place_gro_all(frames, rows, rss_hash)
        return self._place_frames(frames, rows, rss_hash)

    def _place_frames(self, frames: Frames, rows: Index, rss_hash: npt.ArrayLike
                      ) -> PlaceResult:
        """:meth:`place` without HW-GRO: one completion per frame."""
        if frames.uniform is not None:
            done = 0
            placed = 0
            irq = False
            for _ in range(2):  # a second pass when the batch crossed the ring's wrap point
                res = self._place_uniform(frames, rows, rss_hash, frames.uniform)
                if res is None:
                    break
                done += res.consumed
                placed += res.placed
                irq |= res.irq
                if res.starved or res.consumed == _nrows(rows):
                    return PlaceResult(done, placed, res.starved, irq)
                rows = _tail(rows, res.consumed)
                h = np.asarray(rss_hash)
                rss_hash = h if h.ndim == 0 else h[res.consumed:]
            if done:
                res = self._place(frames, rows, rss_hash)
                return PlaceResult(done + res.consumed, placed + res.placed, res.starved,
                                   irq | res.irq)
        return self._place(frames, rows, rss_hash)

    # -- HW-GRO ------------------------------------------------------------------------------

    def _place_gro_all(self, frames: Frames, rows: Index, rss_hash: npt.ArrayLike
                       ) -> PlaceResult:
        """HW-GRO placement of ``frames[rows]``: :meth:`_place_gro` takes the stretches of
        frames it can coalesce, the plain path the frames it cannot (no payload, not
        split, several buffers), one completion each.  A batch that mixes them too often
        goes the plain way after :data:`_GRO_PASSES` stretches."""
        done = placed = 0
        irq = False
        n_all = _nrows(rows)
        for i in range(_GRO_PASSES + 1):
            res = self._place_gro(frames, rows, rss_hash) if i < _GRO_PASSES else n_all - done
            if isinstance(res, int):
                res = self._place_frames(frames, _head(rows, res), rss_hash)
            done += res.consumed
            placed += res.placed
            irq |= res.irq
            if res.starved or done == n_all:
                return PlaceResult(done, placed, res.starved, irq)
            if res.consumed == 0:  # the wrap point left no room, nothing starved
                break
            rows = _tail(rows, res.consumed)
            h = np.asarray(rss_hash)
            rss_hash = h if h.ndim == 0 else h[res.consumed:]
        return PlaceResult(done, placed, False, irq)

    def _gro_sessions(self, frames: Frames, r: Index, hl: I64, pl: I64, bsz: int
                      ) -> tuple[npt.NDArray[np.intp], I64 | int] | None:
        """The HW-GRO sessions of ``frames[r]``: the row of each session's first frame and
        the frames' TCP header offset (one int when every frame has the same headers
        layout); None when no two frames coalesce.

        A frame joins the session of the frame before it when both are TCP over IPv4
        (no options, not a fragment) or IPv6 (no extension header) with only ACK (and
        PSH) set and a payload, their headers are equal byte for byte except the IP
        length, id and checksum and the TCP sequence number, flags and checksum (so one
        flow, the same ACK, window and options, as ``tcp_gro_receive`` requires), its
        sequence number follows the previous payload, the previous frame had no PSH,
        and its payload is no longer than the previous one, which was not a short one
        that ended a session.  A session holds at most :data:`GRO_MAX_SEGS` frames and
        one data buffer (``bsz`` bytes) of payload.  Sessions are runs of consecutive
        frames of the queue: frames of flows interleaved frame by frame do not coalesce
        (a NIC keeps several sessions open; this one keeps one).
        """
        H = frames.hdr[r]
        n = H.shape[0]
        uni = frames.uniform
        h0 = int(hl[0])
        l4: I64 | int
        if H.shape[1] >= h0 and (uni is not None or int(hl.min()) == int(hl.max())):
            l4 = self._gro_layout(H[0], h0)[0]
            join = self._gro_join_uniform(H, h0, pl)
        else:
            full = np.zeros(n, bool)
            l4 = self._gro_join_general(H, hl, pl, full)
            join = full[1:]
        if not join.any():
            return None
        if uni is not None:
            per = max(1, min(GRO_MAX_SEGS, min(bsz, _GRO_MAX_IP_LEN - (h0 - 14)) // uni[1]))
            if join.all():
                return np.arange(0, n, per), l4
            run0 = np.flatnonzero(np.concatenate(([True], ~join)))
            run_len = np.diff(run0, append=n)
            # a run of L frames makes ceil(L / per) sessions
            k = -(-run_len // per)
            first = np.repeat(run0, k) + (np.arange(int(k.sum())) - np.repeat(np.cumsum(k) - k, k)
                                          ) * per
            return first, l4
        if n > 2:  # a short segment joined at i-1 ended its session
            join[1:] &= ~(join[:-1] & (pl[1:-1] < pl[:-2]))
        start = np.concatenate(([True], ~join))
        run0 = np.flatnonzero(start)
        run_id = np.cumsum(start) - 1
        first_pl = pl[run0]
        cap = np.minimum(bsz, _GRO_MAX_IP_LEN - (hl[run0] - 14))
        per_run = np.clip(np.minimum(cap // np.maximum(first_pl, 1), GRO_MAX_SEGS), 1, None)
        pos = np.arange(n) - run0[run_id]
        return np.flatnonzero(start | (pos % per_run[run_id] == 0)), l4

    def _gro_layout(self, h0: npt.NDArray[np.uint8], hl: int
                    ) -> tuple[int, npt.NDArray[np.uint8] | None]:
        """For headers shaped like ``h0`` (``hl`` bytes): the TCP header offset and the
        mask of the bytes frames of one session share, padded to whole 64-bit words: 0
        where segments of a session differ (IP length, id and checksum, TCP sequence
        number, PSH, checksum), else the bits to compare.  The shared bytes include
        what makes a frame a candidate (ethertype, IP version and header length, no
        fragment bits, protocol TCP, TCP header length, flags but PSH), so a run of
        frames equal under the mask are all candidates when its first one is.  None
        when frames shaped like ``h0`` are not candidates."""
        key = (h0[12:15].tobytes(), hl)
        got = self._gro_cols.get(key)
        if got is not None:
            return got
        et = int(h0[12]) << 8 | int(h0[13])
        vihl = int(h0[14])
        out: tuple[int, npt.NDArray[np.uint8] | None]
        if et == 0x0800 and vihl == 0x45:
            l4, free = 34, _GRO_V4_FREE
        elif et == 0x86DD and vihl >> 4 == 6:
            l4, free = 54, _GRO_V6_FREE
        else:
            l4, free = 34, None
        if free is None or hl < l4 + _TCP_HLEN:
            out = (l4, None)
        else:
            cols = np.arange(hl)
            keep = ~free[:hl] & ~_GRO_TCP_FREE[np.clip(cols - l4, 0, 255)]
            mask = np.zeros(-(-hl // 8) * 8, np.uint8)
            mask[:hl] = np.where(keep, 0xFF, 0)
            mask[l4 + 13] = 0xFF & ~_TCP_PSH
            if l4 == 34:
                mask[20] = 0x3F  # fragment offset and MF, not DF
            out = (l4, mask)
        self._gro_cols[key] = out
        return out

    def _gro_headers(self, H: npt.NDArray[np.uint8], hl: int, l4: int, width: int
                     ) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint32]]:
        """The first ``hl`` header bytes of every frame, copied into a contiguous scratch of
        ``width`` bytes a row (whole 64-bit words, zero padded; frame rows may lie far
        apart), and the frames' TCP sequence numbers."""
        n = H.shape[0]
        buf = self._gro_buf
        if buf.shape[0] < n or buf.shape[1] != width:
            buf = self._gro_buf = np.zeros((max(n, 512), width), np.uint8)
        hc = buf[:n]
        hc[:, :hl] = H[:, :hl]
        return hc, hc[:, l4 + 4:l4 + 8].view(">u4")[:, 0].astype(np.uint32)

    def _gro_join_uniform(self, H: npt.NDArray[np.uint8], hl: int, pl: I64 | int
                          ) -> npt.NDArray[np.bool_]:
        """:meth:`_gro_sessions` for frames of one header length: ``join[1:]``.  The
        headers are copied once into a contiguous, word-padded array (frame rows may lie
        far apart) and compared under the layout's mask a 64-bit word at a time; the
        candidate checks run on the first frame of each run of equal frames only."""
        l4, mask = self._gro_layout(H[0], hl)
        n = H.shape[0]
        if mask is None:
            return np.zeros(n - 1, bool)
        hc, seq = self._gro_headers(H, hl, l4, mask.shape[0])
        psh = (hc[:, l4 + 13] & _TCP_PSH) != 0
        hc &= mask
        words = hc.view(np.uint64)
        join = ~(words[1:] != words[:-1]).any(axis=1)
        join &= ~psh[:-1]
        if isinstance(pl, int):  # one payload length (> 0, the caller checked)
            join &= (seq[1:] - seq[:-1]) == pl
        else:
            join &= (seq[1:] - seq[:-1]) == pl[:-1]
            join &= pl[1:] <= pl[:-1]
            join &= pl[1:] > 0
        # candidates: a run of equal frames is when its first frame is; the mask keeps
        # every byte the checks read, so they run on the masked copy of the run starts
        starts = np.concatenate(([0], np.flatnonzero(~join) + 1))
        hs = hc[starts]
        cand = (hs[:, 12] == hc[0, 12]) & (hs[:, 13] == hc[0, 13]) & (hs[:, 14] == hc[0, 14])
        cand &= hs[:, l4 + 13] == _TCP_ACK
        cand &= (hs[:, l4 + 12] >> 4) == (hl - l4) // 4
        if l4 == 34:
            cand &= (hs[:, 20] == 0) & (hs[:, 21] == 0) & (hs[:, 23] == 6)
        else:
            cand &= hs[:, 20] == 6
        if not isinstance(pl, int):
            cand &= pl[starts] > 0
        if not cand.all():
            join &= cand[np.cumsum(~join)]
        return join

    @staticmethod
    def _gro_join_general(H: npt.NDArray[np.uint8], hl: I64, pl: I64,
                          join: npt.NDArray[np.bool_]) -> I64:
        """:meth:`_gro_sessions` for a batch of mixed header layouts: fills ``join``,
        returns each frame's TCP header offset."""
        n = H.shape[0]
        et = H[:, 12:14].view(">u2")[:, 0]
        vihl = H[:, 14]
        v4 = (et == 0x0800) & (vihl == 0x45)
        v6 = (et == 0x86DD) & ((vihl >> 4) == 6)
        l4 = np.where(v4, 34, 54).astype(np.intp)
        if n < 2:
            return l4.astype(np.int64)
        proto = np.where(v4, H[:, 23], H[:, 20])
        frag = (H[:, 20:22].view(">u2")[:, 0] & 0x3FFF) != 0
        ok = (v4 & ~frag | v6) & (proto == 6) & (pl > 0)
        need = int(l4.max()) + _TCP_HLEN
        if H.shape[1] < need:  # a header array only as wide as IPv4 headers: pad it
            H = np.pad(H, ((0, 0), (0, need - H.shape[1])))
        th = np.take_along_axis(H, l4[:, None] + np.arange(_TCP_HLEN), axis=1)
        flags = th[:, 13]
        ok &= (flags & ~np.uint8(_TCP_PSH)) == _TCP_ACK
        ok &= hl == l4 + (th[:, 12] >> 4).astype(np.int64) * 4
        w = int(hl.max())
        cols = np.arange(w)
        delta = cols[None, :] - l4[1:, None]
        must = (cols[None, :] < hl[1:, None]) & ~_GRO_TCP_FREE[np.clip(delta, 0, 255)]
        must &= ~np.where(v4[1:, None], _GRO_V4_FREE[:w], _GRO_V6_FREE[:w])
        same = ~((H[1:, :w] != H[:-1, :w]) & must).any(axis=1)
        seq = th[:, 4:8].copy().view(">u4")[:, 0].astype(np.int64)
        follows = seq[1:] == (seq[:-1] + pl[:-1]) & 0xFFFFFFFF
        join[1:] = (ok[1:] & ok[:-1] & same & follows & (hl[1:] == hl[:-1])
                    & ((flags[:-1] & _TCP_PSH) == 0) & (pl[1:] <= pl[:-1]))
        return l4.astype(np.int64)

    def _place_gro(self, frames: Frames, rows: Index, rss_hash: npt.ArrayLike
                   ) -> PlaceResult | int:
        """HW-GRO placement of a prefix of ``frames[rows]``: every session (see
        :meth:`_gro_sessions`) takes one completion and one data buffer, its payloads back
        to back from the buffer's start; the header slot gets the first segment's headers
        with the IP length covering the session (IPv4 checksum recomputed) and the last
        segment's PSH.  Sessions of one segment are plain split completions.

        Returns how many leading frames to place the plain way instead (an int) when the
        first frame cannot be coalesced (not split, headers past a slot, payload past a
        buffer), when no two frames of the stretch coalesce, or for the whole batch when
        the posted buffers differ in length.
        """
        n_req = _nrows(rows)
        cfg = self.config
        if n_req < 2 or not cfg.tcp_data_split:
            return n_req
        uni = frames.uniform
        hl_all: I64 = frames.hdr_len[rows]
        pl_all: I64 = frames.pay_len[rows]
        comp, fill = self.comp, self.fill
        avail = fill.ready()
        if avail == 0:
            return n_req  # the plain path places what needs no buffer, or starves
        start = fill.head & fill.mask
        bsz = int(fill.ring[start]["len"])
        if uni is not None:
            if uni[1] <= cfg.hds_thresh or uni[0] > self.slots.shape[1] or uni[1] > bsz:
                return n_req
        else:
            bad = (pl_all <= cfg.hds_thresh) | (hl_all > self.slots.shape[1]) | (pl_all > bsz)
            if bad.any():
                k = int(np.argmax(bad))
                if k == 0:  # the leading frames the plain way, up to the next candidate
                    return int(np.argmin(bad)) if not bad.all() else n_req
                if k < 2:
                    return k
                n_req = k
                rows = _head(rows, k)
                hl_all, pl_all = hl_all[:k], pl_all[:k]
        self.need_bufs = 0
        room = min(avail, fill.nentries - start, n_req)
        d = fill.ring[start:start + room]
        if bsz <= 0:
            return n_req
        if uni is not None:
            got = self._place_gro_run(frames, rows, rss_hash, uni, bsz, d, avail, room)
            if got is not None:
                return got
        dlen = d["len"]
        if int(dlen.min()) != bsz or int(dlen.max()) != bsz:
            return n_req
        plan = self._gro_sessions(frames, rows, hl_all, pl_all, bsz)
        if plan is None:
            return n_req
        first, l4 = plan
        ns = first.shape[0]
        cfree = comp.nentries - comp.pending()
        if cfree < ns:
            cfree = comp.space()
        m = min(ns, cfree, room)
        if m == 0:  # no completion slot (room >= 1 whenever a buffer is posted)
            return PlaceResult(0, 0, True, False)
        n = int(first[m]) if m < ns else n_req
        # Stopped by the completion ring or the posted buffers: starved.  Stopped by the
        # fill ring's wrap point (or the batch's own length) only: not starved.
        starved = m < ns and m in (cfree, avail)
        if m < ns and m == avail:
            self.need_bufs = 1
        r = _head(rows, n)
        first = first[:m]
        segs = np.diff(first, append=n)
        idx = self._arange[:n] if n <= self._arange.shape[0] else np.arange(n)
        sid = np.repeat(idx[:m], segs)
        if uni is not None:
            p0 = uni[1]
            total = segs * p0
            intra = (idx - first[sid]) * p0
            fl_sum = n * uni[2]
            pl: I64 | int = p0
        else:
            pl = pl_all[:n]
            csum = np.cumsum(pl)
            before = csum - pl
            base = before[first]
            total = np.diff(base, append=int(csum[-1]))
            intra = before - base[sid]
        # IOMMU: one buffer per session
        mid, off, ok = self.iommu.translate(d["iova"][:m], dlen[:m])
        fault: npt.NDArray[np.bool_] | None = None
        if ok.all():
            lens: I64 = np.broadcast_to(np.int64(pl), (n,)) if isinstance(pl, int) else pl
            self._copy_payload(frames, r, idx, 0, lens, mid[sid], off[sid] + intra)
        else:
            fault = ~ok
            rows_ok = np.flatnonzero(ok[sid])
            if rows_ok.shape[0]:
                s_ok = sid[rows_ok]
                pl_ok = np.broadcast_to(pl, (n,))[rows_ok]
                self._copy_payload(frames, r, rows_ok, 0, pl_ok, mid[s_ok],
                                   off[s_ok] + intra[rows_ok])
        # header slots: the first segment's headers, then the session's lengths and PSH
        s0 = comp.tail & self._slot_mask
        slot_no = (self._arange[:m] + comp.tail) & self._slot_mask
        slot_rows: Index = slice(s0, s0 + m) if s0 + m <= self.slots.shape[0] else slot_no
        fhl = hl_all[first]
        ok_s = slice(0, m) if fault is None else _contig(np.flatnonzero(ok))
        self._copy_headers(frames, _compose(r, _contig(first)), slot_rows, ok_s, fhl)
        multi = segs > 1
        if fault is not None:
            multi &= ok
        n_multi = int(np.count_nonzero(multi))
        if n_multi:
            sel: Index = slice(0, m) if n_multi == m else np.flatnonzero(multi)
            l4s = l4 if isinstance(l4, int) else l4[first][sel]
            self._gro_fix_headers(frames, r, slot_no[sel], (first + segs - 1)[sel],
                                  fhl[sel], l4s, total[sel])
        cq = np.zeros(m, dtype=abi.nic_rx_cqe)
        cq["hdr_slot"] = slot_no
        cq["hdr_len"] = fhl
        cq["data_len"] = total
        cq["nr_frags"] = 1
        cq["queue"] = self.queue
        h = np.asarray(rss_hash)
        cq["rss_hash"] = h if h.ndim == 0 else h[:n][first]
        cq["payload_off"] = fhl
        cq["tstamp_ns"] = self.clock()
        if n_multi == m:
            cq["flags"] = _F_GRO
            cq["gso_segs"] = segs
            cq["gso_size"] = pl if uni is not None else pl_all[first]
        else:
            cq["flags"] = np.where(multi, _F_GRO, _F_SPLIT)
            cq["gso_segs"] = np.where(multi, segs, 0)
            cq["gso_size"] = np.where(multi, pl_all[first], 0)
        n_fault_frames = 0
        if uni is None:
            fl: I64 = frames.frame_len[r]
            fl_sum = int(fl.sum())
        bytes_ok = fl_sum
        if fault is not None:
            sub = cq[fault]
            for name in ("flags", "hdr_len", "data_len", "gso_segs", "gso_size"):
                sub[name] = 0
            sub["status"] = NIC_STATUS_DMA_FAULT
            cq[fault] = sub
            bad_rows = fault[sid]
            n_fault_frames = int(np.count_nonzero(bad_rows))
            bytes_ok -= int(frames.frame_len[r][bad_rows].sum())
        comp.push(cq)
        fill.release(m)
        self.completed += m
        placed = n - n_fault_frames
        st = self.stats
        st[_C_PACKETS] += placed
        st[_C_BYTES] += bytes_ok
        st[_C_SPLIT] += placed
        st[_C_FRAGS] += m
        if n_multi:
            st[_C_GRO_PKTS] += n_multi
            tm = total if n_multi == m else total[multi]
            hm = fhl if n_multi == m else fhl[multi]
            sm = segs if n_multi == m else segs[multi]
            st[_C_GRO_BYTES] += int(tm.sum() + hm.sum())
            st[_C_GRO_WIRE_PKTS] += int(sm.sum())
            if uni is not None:
                st[_C_GRO_WIRE_BYTES] += int(sm.sum()) * uni[2]
            else:
                st[_C_GRO_WIRE_BYTES] += int(frames.frame_len[r][multi[sid]].sum())
        if fault is not None:
            st[_C_DROPPED] += n_fault_frames
            st[_C_FAULT] += n_fault_frames
        return PlaceResult(n, placed, starved, self._take_irq(m))

    def _place_gro_run(self, frames: Frames, rows: Index, rss_hash: npt.ArrayLike,
                       shape: tuple[int, int, int], bsz: int, d: np.ndarray, avail: int,
                       room: int) -> PlaceResult | None:
        """The steady state of :meth:`_place_gro` in a fixed number of numpy calls: frames
        of one shape that form one run (one flow, in order, no PSH but on the last), and
        buffers in one mapping, so the sessions are chunks of ``per`` frames.  None when
        that does not hold (the general path takes over, with identical results)."""
        hl, p0, fl = shape
        n_req = _nrows(rows)
        H = frames.hdr[rows]
        l4, mask = self._gro_layout(H[0], hl)
        if mask is None or H.shape[1] < hl or not self._gro_one_run(H, hl, p0, l4, mask):
            return None
        per = max(1, min(GRO_MAX_SEGS, min(bsz, _GRO_MAX_IP_LEN - (hl - 14)) // p0))
        if per == 1:
            return None
        comp = self.comp
        ns = -(-n_req // per)
        cfree = comp.nentries - comp.pending()
        if cfree < ns:
            cfree = comp.space()
        m = min(ns, cfree, room)
        if m == 0:
            return PlaceResult(0, 0, True, False)
        dm = d[:m]
        dlen = dm["len"]
        if int(dlen.min()) != bsz or int(dlen.max()) != bsz:
            return None
        mid, off, ok = self.iommu.translate(dm["iova"], dlen)
        m0 = int(mid[0])
        if not ok.all() or int(mid.max()) != m0 or int(mid.min()) != m0:
            return None
        n = min(n_req, m * per)
        starved = m < ns and m in (cfree, avail)
        if m < ns and m == avail:
            self.need_bufs = 1
        r = _head(rows, n)
        sid, intra, first, segs = self._gro_chunks(n, per, p0)
        self.iommu.get(m0).window(p0)[off[sid] + intra] = frames.pay[r, :p0]
        s0 = comp.tail & self._slot_mask
        slot_no = (self._arange[:m] + comp.tail) & self._slot_mask
        slot_rows: Index = slice(s0, s0 + m) if s0 + m <= self.slots.shape[0] else slot_no
        self.slots[slot_rows, :hl] = frames.hdr[_compose(r, first), :hl]
        total = segs * p0
        k = m if segs[-1] > 1 else m - 1  # a last session of one frame is a plain frame
        if k:
            self._gro_fix_headers(frames, r, slot_no[:k], (first + segs - 1)[:k],
                                  np.full(k, hl, np.int64), l4, total[:k])
        cq = np.zeros(m, abi.nic_rx_cqe)
        cq["hdr_slot"] = slot_no
        cq["hdr_len"] = hl
        cq["payload_off"] = hl
        cq["data_len"] = total
        cq["nr_frags"] = 1
        cq["queue"] = self.queue
        h = np.asarray(rss_hash)
        cq["rss_hash"] = h if h.ndim == 0 else h[:n:per]
        cq["tstamp_ns"] = self.clock()
        cq["flags"] = _F_GRO
        cq["gso_segs"] = segs
        cq["gso_size"] = p0
        if k < m:
            cq[-1]["flags"] = _F_SPLIT
            cq[-1]["gso_segs"] = 0
            cq[-1]["gso_size"] = 0
        comp.push(cq)
        self.fill.release(m)
        self.completed += m
        st = self.stats
        st[_C_PACKETS] += n
        st[_C_BYTES] += n * fl
        st[_C_SPLIT] += n
        st[_C_FRAGS] += m
        if k:
            wire_n = n - (m - k)
            st[_C_GRO_PKTS] += k
            st[_C_GRO_BYTES] += k * hl + wire_n * p0
            st[_C_GRO_WIRE_PKTS] += wire_n
            st[_C_GRO_WIRE_BYTES] += wire_n * fl
        return PlaceResult(n, n, starved, self._take_irq(m))

    def _gro_one_run(self, H: npt.NDArray[np.uint8], hl: int, p0: int, l4: int,
                     mask: npt.NDArray[np.uint8]) -> bool:
        """True when the frames ``H`` (headers of ``hl`` bytes, payloads of ``p0``) are one
        run: the first a candidate, every one equal to it under ``mask``, the sequence
        numbers ``p0`` apart, no PSH before the last."""
        n = H.shape[0]
        hc, seq = self._gro_headers(H, hl, l4, mask.shape[0])
        steps = self._gro_steps.get(p0)
        if steps is None or steps.shape[0] < n:
            steps = self._gro_steps[p0] = (np.arange(max(n, 512), dtype=np.int64) * p0
                                           ).astype(np.uint32)
        seq -= seq[0]
        if not np.array_equal(seq, steps[:n]):
            return False
        if (hc[:-1, l4 + 13] & _TCP_PSH).any():
            return False
        hc &= mask
        h0 = hc[0]
        if h0[l4 + 13] != _TCP_ACK or h0[l4 + 12] >> 4 != (hl - l4) // 4 or (
                l4 == 34 and (h0[20] or h0[21] or h0[23] != 6)) or (l4 == 54 and h0[20] != 6):
            return False
        words = hc.view(np.uint64)
        return bool((words == words[0]).all())

    def _gro_chunks(self, n: int, per: int, p0: int
                    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64],
                               npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        """Sessions of ``per`` frames of ``p0`` bytes over ``n`` frames: each frame's
        session, its offset in the session's buffer, each session's first frame and
        segment count (cached: the steady state asks the same every batch)."""
        key = (n, per, p0)
        got = self._gro_chunk_cache.get(key)
        if got is None:
            idx = np.arange(n, dtype=np.int64)
            m = -(-n // per)
            segs = np.full(m, per, np.int64)
            segs[-1] = n - (m - 1) * per
            got = (idx // per, (idx % per) * p0, idx[::per], segs)
            if len(self._gro_chunk_cache) >= 64:
                self._gro_chunk_cache.clear()
            self._gro_chunk_cache[key] = got
        return got

    def _gro_fix_headers(self, frames: Frames, r: Index, slot_no: npt.NDArray[np.int64],
                         last: npt.NDArray[np.intp], hl: I64, l4: I64 | int, total: I64
                         ) -> None:
        """The header slots of coalesced sessions: IP length over the whole session, the
        IPv4 header checksum recomputed, the last segment's PSH (``tcp_gro_complete``'s
        and the NIC's fix-ups)."""
        slots = self.slots
        lrows = _compose(r, last)
        if isinstance(l4, int):
            v4: npt.NDArray[np.bool_] | bool = l4 == 34
            ip_len = hl - (14 if v4 else 54) + total
            col: I64 | int = 16 if v4 else 18
            last_flags = frames.hdr[lrows, l4 + 13]
        else:
            v4 = l4 == 34
            ip_len = np.where(v4, hl - 14 + total, hl - 54 + total)
            col = np.where(v4, 16, 18)
            last_flags = frames.hdr[lrows, l4 + 13]
        slots[slot_no, col] = ip_len >> 8
        slots[slot_no, col + 1] = ip_len & 0xFF
        slots[slot_no, l4 + 13] |= last_flags & np.uint8(_TCP_PSH)
        s4 = slot_no if v4 is True else (slot_no[v4] if v4 is not False else None)
        if s4 is not None and s4.shape[0]:
            slots[s4, 24] = 0
            slots[s4, 25] = 0
            sm = slots[s4, 14:34].view(">u2").sum(axis=1, dtype=np.int64)
            sm = (sm & 0xFFFF) + (sm >> 16)
            sm = (sm & 0xFFFF) + (sm >> 16)
            c = ~sm & 0xFFFF
            slots[s4, 24] = c >> 8
            slots[s4, 25] = c & 0xFF

    def _place_uniform(self, frames: Frames, rows: Index, rss_hash: npt.ArrayLike,
                       shape: tuple[int, int, int]) -> PlaceResult | None:
        """The steady-state case in a fixed, small number of numpy calls.

        Every frame has one shape, the posted buffers have one length and sit in one
        mapping, and the buffers used do not cross the fill ring's wrap point.
        Returns None whenever that does not hold (the general path takes over, with
        identical results), else the result for a prefix of ``rows``.
        """
        n_req = _nrows(rows)
        if n_req == 0:
            return _NOTHING
        hl, pl, fl = shape
        comp = self.comp
        cfree = comp.nentries - comp.pending()
        if cfree < n_req:
            cfree = comp.space()
        n = min(n_req, cfree)
        self.need_bufs = 0
        if n == 0:
            return PlaceResult(0, 0, True, False)
        cfg = self.config
        split = cfg.tcp_data_split and pl > cfg.hds_thresh
        slot_w = self.slots.shape[1]
        if (hl if split else fl) > slot_w:
            return None
        nf = 0
        nfrag = 0
        wrapped = False
        off: I64 | None = None
        mapping = None
        fill = self.fill
        if split:
            avail = (fill.cached_tail - fill.head) & U32
            if avail < n:
                avail = fill.ready()
            if avail == 0:
                self.need_bufs = -(-pl // self._bsz) if self._bsz else 1
                return PlaceResult(0, 0, True, False)
            start = fill.head & fill.mask
            bsz = int(fill.ring[start]["len"])
            if bsz <= 0:
                return None
            nf = -(-pl // bsz)
            if nf > fill.nentries:
                return None
            if avail < n * nf:
                avail = fill.ready()
            by_bufs = avail // nf
            by_room = (fill.nentries - start) // nf
            k = min(n, by_bufs, by_room)
            if k == 0:
                if by_bufs:
                    return None  # the next frame's buffers straddle the wrap point
                self.need_bufs = nf
                return PlaceResult(0, 0, True, False)
            if k < n and k == by_bufs:
                self.need_bufs = nf
            wrapped = k == by_room < min(n, by_bufs)
            n = k
            nfrag = n * nf
            d = fill.ring[start:start + nfrag]
            if (d["len"] != bsz).any():
                return None
            # One mapping for all: the lowest and highest IOVA share the map id bits.
            iova = d["iova"]
            lo, hi = int(iova.min()), int(iova.max())
            m0 = lo >> abi.NIC_IOVA_SHIFT
            mapping = self.iommu.lookup(m0)
            base = m0 << abi.NIC_IOVA_SHIFT
            if (mapping is None or hi >> abi.NIC_IOVA_SHIFT != m0
                    or hi - base + bsz > mapping.size):
                return None
            off = iova.astype(np.int64)
            if base:
                off -= base
            self._bsz = bsz
        r = _head(rows, n)
        pay = frames.pay
        if split:
            assert off is not None and mapping is not None
            if nf == 1:
                mapping.window(pl)[off] = pay[r, :pl]
            else:
                for j in range(nf):
                    ln = min(bsz, pl - j * bsz)
                    mapping.window(ln)[off[j::nf]] = pay[r, j * bsz:j * bsz + ln]
        s0 = comp.tail & self._slot_mask
        slot_no = (self._arange[:n] + comp.tail) & self._slot_mask
        srows: Index = slice(s0, s0 + n) if s0 + n <= self.slots.shape[0] else slot_no
        slots = self.slots
        if split:
            slots[srows, :hl] = frames.hdr[r, :hl]
        else:
            slots[srows, :hl] = frames.hdr[r, :hl]
            if pl:
                slots[srows, hl:hl + pl] = pay[r, :pl]
            if fl > hl + pl:
                slots[srows, hl + pl:fl] = 0
        # Completions: a per-queue buffer pre-filled with the fields this shape fixes.
        h = np.asarray(rss_hash)
        key = (hl, pl, fl, nf, split, int(h) if h.ndim == 0 else -1)
        cq = self._cq_buf[:n]
        if key != self._cq_key:
            self._cq_key = key
            tmpl = np.zeros(1, abi.nic_rx_cqe)
            tmpl["hdr_len"] = hl if split else fl
            tmpl["flags"] = _F_SPLIT if split else _F_LINEAR
            tmpl["data_len"] = pl if split else 0
            tmpl["nr_frags"] = nf
            tmpl["queue"] = self.queue
            tmpl["payload_off"] = hl
            tmpl["rss_hash"] = h if h.ndim == 0 else 0
            self._cq_buf[:] = tmpl
        if h.ndim:
            cq["rss_hash"] = h[:n]
        cq["hdr_slot"] = slot_no
        cq["tstamp_ns"] = self.clock()
        comp.push(cq)
        if nfrag:
            fill.release(nfrag)
        self.completed += n
        st = self.stats
        st[_C_PACKETS] += n
        st[_C_BYTES] += n * fl
        st[_C_SPLIT if split else _C_LINEAR] += n
        st[_C_FRAGS] += nfrag
        return PlaceResult(n, n, n < n_req and not wrapped, self._take_irq(n))

    def _place(self, frames: Frames, rows: Index, rss_hash: npt.ArrayLike) -> PlaceResult:
        """The general path: any mix of frame shapes, buffer lengths and mappings."""
        n_req = _nrows(rows)
        if n_req == 0:
            return _NOTHING
        comp = self.comp
        cfree = comp.nentries - comp.pending()
        if cfree < n_req:
            cfree = comp.space()
        n = min(n_req, cfree)
        self.need_bufs = 0
        if n == 0:
            return PlaceResult(0, 0, True, False)
        r = _head(rows, n)
        hl: I64 = frames.hdr_len[r]
        pl: I64 = frames.pay_len[r]
        fl: I64 = frames.frame_len[r]
        cfg = self.config
        split = pl > cfg.hds_thresh if cfg.tcp_data_split else np.zeros(n, dtype=bool)
        slot_w = self.slots.shape[1]
        drop: npt.NDArray[np.bool_] | None = None
        if int(fl.max()) > slot_w:
            drop = np.where(split, hl > slot_w, fl > slot_w)
        d = self._descs()
        avail = d.shape[0]
        dlen = d["len"]
        uniform = True
        bsz = self._bsz
        if avail:
            bsz = int(dlen.min())
            uniform = bsz > 0 and bsz == int(dlen.max())
            if uniform:
                self._bsz = bsz
        ring_n = self.fill.nentries
        if uniform:
            nf: I64
            if bsz:
                nf = np.where(split, (pl + (bsz - 1)) // bsz, 0)
                huge = nf > ring_n
                if huge.any():
                    drop = huge if drop is None else drop | huge
            else:  # nothing posted yet and no buffer size seen: a split frame needs >= 1
                nf = split.astype(np.int64)
            if drop is not None:
                nf = np.where(drop, 0, nf)
            cum = np.cumsum(nf)
            if int(cum[-1]) > avail:
                k = int(np.searchsorted(cum, avail, side="right"))
                self.need_bufs = int(nf[k])
                n = k
            if n == 0:
                return PlaceResult(0, 0, True, False)
            if n < len(pl):
                r = _head(r, n)
                hl, pl, fl, split, nf, cum = hl[:n], pl[:n], fl[:n], split[:n], nf[:n], cum[:n]
                if drop is not None:
                    drop = drop[:n]
            nfrag = int(cum[-1])
            frag_row: npt.NDArray[np.intp]
            frag_col: I64 | int
            if nfrag == 0:
                frag_row = np.empty(0, np.intp)
                frag_col, frag_len = 0, np.empty(0, np.int64)
            elif int(nf.max()) == 1:
                frag_row = np.flatnonzero(nf)
                frag_col, frag_len = 0, pl[frag_row]
            else:
                frag_row = np.repeat(np.arange(n), nf)
                frag_col = (np.arange(nfrag) - np.repeat(cum - nf, nf)) * bsz
                frag_len = np.minimum(bsz, pl[frag_row] - frag_col)
        else:
            out = self._plan_slow(pl, split, drop, dlen, avail)
            n, nf, drop, frag_row, frag_col, frag_len = out
            if n == 0:
                return PlaceResult(0, 0, True, False)
            if n < len(pl):
                r = _head(r, n)
                hl, pl, fl, split = hl[:n], pl[:n], fl[:n], split[:n]
            nfrag = int(frag_row.shape[0])
        starved = n < n_req

        # IOMMU: translate every buffer this batch consumes.
        fault: npt.NDArray[np.bool_] | None = None
        if nfrag:
            mid, off, ok = self.iommu.translate(d["iova"][:nfrag], dlen[:nfrag])
            if not ok.all():
                fault = np.zeros(n, dtype=bool)
                fault[frag_row[~ok]] = True
                keep = ~fault[frag_row]
                frag_row, mid, off, frag_len = frag_row[keep], mid[keep], off[keep], frag_len[keep]
                if not isinstance(frag_col, int):
                    frag_col = frag_col[keep]
            if frag_row.shape[0]:
                self._copy_payload(frames, r, frag_row, frag_col, frag_len, mid, off)

        # Header slots: the slot of the completion at ring index t is t & mask.
        s0 = comp.tail & self._slot_mask
        slot_no = (np.arange(comp.tail, comp.tail + n, dtype=np.int64) & self._slot_mask)
        slot_rows: Index = slice(s0, s0 + n) if s0 + n <= self.slots.shape[0] else slot_no
        bad = drop if fault is None else (fault if drop is None else drop | fault)
        ok_split = split if bad is None else split & ~bad
        ok_lin = ~split if bad is None else ~split & ~bad
        n_split = int(np.count_nonzero(ok_split))
        n_lin = int(np.count_nonzero(ok_lin))
        if n_split:
            pos = slice(0, n) if n_split == n else _contig(np.flatnonzero(ok_split))
            self._copy_headers(frames, r, slot_rows, pos, hl)
        if n_lin:
            self._copy_linear(frames, r, slot_rows, np.flatnonzero(ok_lin), hl, pl, fl)

        cq = np.zeros(n, dtype=abi.nic_rx_cqe)
        cq["hdr_slot"] = slot_no
        cq["hdr_len"] = np.where(split, hl, fl)
        cq["flags"] = np.where(split, _F_SPLIT, _F_LINEAR)
        cq["data_len"] = np.where(split, pl, 0)
        cq["nr_frags"] = nf
        cq["queue"] = self.queue
        h = np.asarray(rss_hash)
        cq["rss_hash"] = h if h.ndim == 0 else h[:n]
        cq["payload_off"] = hl
        cq["tstamp_ns"] = self.clock()
        n_drop = n_fault = 0
        bytes_ok = int(fl.sum())
        if drop is not None and drop.any():
            n_drop = int(np.count_nonzero(drop))
            bytes_ok -= int(fl[drop].sum())
            sub = cq[drop]
            sub["flags"] = 0
            sub["hdr_len"] = 0
            sub["data_len"] = 0
            sub["nr_frags"] = 0
            sub["status"] = abi.NIC_STATUS_TRUNCATED
            cq[drop] = sub
        if fault is not None:
            n_fault = int(np.count_nonzero(fault))
            bytes_ok -= int(fl[fault].sum())
            sub = cq[fault]
            sub["flags"] = 0
            sub["hdr_len"] = 0
            sub["data_len"] = 0
            sub["status"] = NIC_STATUS_DMA_FAULT
            cq[fault] = sub
        # Data and headers are written; publish the completions (tail last), then
        # hand the consumed descriptors back (head).
        comp.push(cq)
        self.fill.release(nfrag)
        self.completed += n
        placed = n_split + n_lin
        st = self.stats
        st[_C_PACKETS] += placed
        st[_C_BYTES] += bytes_ok
        st[_C_SPLIT] += n_split
        st[_C_LINEAR] += n_lin
        st[_C_FRAGS] += nfrag
        if n_drop or n_fault:
            st[_C_DROPPED] += n_drop + n_fault
            st[_C_FAULT] += n_fault
        return PlaceResult(n, placed, starved, self._take_irq(n))

    def _plan_slow(self, pl: I64, split: npt.NDArray[np.bool_],
                   drop: npt.NDArray[np.bool_] | None, dlen: npt.NDArray[np.uint32], avail: int
                   ) -> tuple[int, I64, npt.NDArray[np.bool_] | None, npt.NDArray[np.intp],
                              I64, I64]:
        """Buffers of unequal length: walk the descriptors frame by frame."""
        n = pl.shape[0]
        ring_n = self.fill.nentries
        nf = np.zeros(n, np.int64)
        rows: list[int] = []
        cols: list[int] = []
        lens: list[int] = []
        lengths = dlen.tolist()
        dr = np.zeros(n, bool) if drop is None else drop.copy()
        j = 0
        stop = n
        for i in range(n):
            if dr[i] or not split[i]:
                continue
            rem = int(pl[i])
            start, col = j, 0
            fr: list[tuple[int, int]] = []
            while rem > 0 and j < avail and j - start < ring_n:
                take = min(lengths[j], rem)
                fr.append((col, take))
                col += take
                rem -= take
                j += 1
            if rem > 0:
                j = start
                if len(fr) >= ring_n:  # more buffers than the ring can ever hold
                    dr[i] = True
                    continue
                self.need_bufs = len(fr) + 1
                stop = i
                break
            nf[i] = len(fr)
            for c, ln in fr:
                rows.append(i)
                cols.append(c)
                lens.append(ln)
        return (stop, nf[:stop], dr[:stop] if dr.any() else None, np.array(rows, np.intp),
                np.array(cols, np.int64), np.array(lens, np.int64))

    def _copy_payload(self, frames: Frames, r: Index, frag_row: npt.NDArray[np.intp],
                      frag_col: I64 | int, frag_len: I64, mid: npt.NDArray[np.intp],
                      off: I64) -> None:
        """One window assignment per (mapping, payload column, length) group."""
        pay = frames.pay
        if int(frag_len.min()) == 0:  # zero-length descriptors: frags with nothing to copy
            nz = frag_len > 0
            frag_row, frag_len, mid, off = frag_row[nz], frag_len[nz], mid[nz], off[nz]
            if not isinstance(frag_col, int):
                frag_col = frag_col[nz]
            if frag_len.shape[0] == 0:
                return
        cols = np.asarray(frag_col)
        one = (int(frag_len.min()) == int(frag_len.max()) and int(mid.min()) == int(mid.max())
               and (cols.ndim == 0 or int(cols.min()) == int(cols.max())))
        if one:
            c = int(cols) if cols.ndim == 0 else int(cols[0])
            length = int(frag_len[0])
            win = self.iommu.get(int(mid[0])).window(length)
            win[off] = pay[_compose(r, _contig(frag_row)), c:c + length]
            return
        cols = np.broadcast_to(cols, frag_len.shape)
        key = (mid.astype(np.int64) << 32) | (cols << 16) | frag_len
        uk, inv = np.unique(key, return_inverse=True)
        for g, k in enumerate(uk.tolist()):
            sel = np.flatnonzero(inv == g)
            m, c, length = k >> 32, (k >> 16) & 0xFFFF, k & 0xFFFF
            win = self.iommu.get(m).window(length)
            win[off[sel]] = pay[_compose(r, _contig(frag_row[sel])), c:c + length]

    def _copy_headers(self, frames: Frames, r: Index, slot_rows: Index, pos: Index,
                      hl: I64) -> None:
        """Split frames: the L2..L4 headers into their header slots."""
        h = hl[pos]
        lo, hi = int(h.min()), int(h.max())
        if lo == hi:
            self.slots[_compose(slot_rows, pos), :lo] = frames.hdr[_compose(r, pos), :lo]
            return
        p = np.arange(hl.shape[0])[pos]
        for v in np.unique(h).tolist():
            q = _contig(p[h == v])
            self.slots[_compose(slot_rows, q), :v] = frames.hdr[_compose(r, q), :v]

    def _copy_linear(self, frames: Frames, r: Index, slot_rows: Index,
                     pos: npt.NDArray[np.intp], hl: I64, pl: I64, fl: I64) -> None:
        """Linear frames: headers, payload and padding into the header slot."""
        h, p, f = hl[pos], pl[pos], fl[pos]
        key = (h << 40) | (p << 20) | f
        if int(key.min()) == int(key.max()):
            groups = [(int(key[0]), _contig(pos))]
        else:
            uk, inv = np.unique(key, return_inverse=True)
            groups = [(k, _contig(pos[inv == g])) for g, k in enumerate(uk.tolist())]
        slots = self.slots
        for k, q in groups:
            hv, pv, fv = k >> 40, (k >> 20) & 0xFFFFF, k & 0xFFFFF
            srows = _compose(slot_rows, q)
            frows = _compose(r, q)
            slots[srows, :hv] = frames.hdr[frows, :hv]
            if pv:
                slots[srows, hv:hv + pv] = frames.pay[frows, :pv]
            if fv > hv + pv:
                slots[srows, hv + pv:fv] = 0
