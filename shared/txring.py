"""The TX ring: whole Ethernet frames the kernel wants sent, kernel -> NIC.

Per netdev one TX ring, in one region **created, owned and finally unlinked by the
kernel** at netdev bring-up, ``/zcrx.<run>.kernel.<dev>.tx`` (:func:`tx_region_object`),
DMA-mapped for the NIC with ``nic.dma_map`` and announced with ``nic.tx_start`` (like an
RX queue's ``nic.queue_start``); ``nic.tx_stop`` detaches the NIC before the kernel
unmaps and unlinks it.  Region layout (:class:`TxLayout`)::

    +--------------------+  0
    | head / tail / flags|  RingLayout.default: each word on its own cache line
    +--------------------+  192
    | slots              |  ring_size x slot_size (TX_SLOT dtype: u16 len, frame bytes)
    +--------------------+

SPSC: the kernel produces (:class:`TxProducer`), the NIC consumes
(:class:`TxConsumer`).  A slot holds one whole frame (Ethernet header on, no FCS):
``len`` (native u16) then ``len`` bytes; ``len`` is at most ``max_frame_len(mtu)``
(MTU + 14).  Both sides work on batches with numpy: the producer copies a batch of frames
in with one push, the consumer hands a batch out as ``(buf, offsets, lengths)`` views
(:class:`TxBatch`, shaped like ``nic_proc.sources.RawBatch``) and releases it once sent.

Doorbell (the RX fill ring's protocol, reversed): the NIC, about to block with its TX ring
empty, sets need-wakeup on it and re-checks; the kernel, after producing, sends the
``nic.tx_doorbell`` event (``{"dev": NAME}``) when it sees the flag and clears it.  A busy
ring sends no event.  A full ring drops what does not fit; the producer counts it
(``tx_dropped`` of the driver), as a driver whose TX ring is full returns NETDEV_TX_BUSY and
the qdisc ends up dropping.

The kernel is the NIC's driver, so the NIC trusts the ring words; it still checks every
``len`` against the slot (a bad length is counted ``tx_dropped`` and never read past the
slot).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from shared import wire
from shared.ring import RingConsumer, RingLayout, RingProducer
from shared.shm import page_align

__all__ = ["TX_LEN_BYTES", "TX_SLOT_ALIGN", "TxBatch", "TxConsumer", "TxLayout", "TxProducer",
           "tx_region_object", "tx_slot_dtype", "tx_slot_size"]

#: Slots are multiples of this (one cache line).
TX_SLOT_ALIGN = 64
#: Batches up to this many frames are stored frame by frame (see :meth:`TxProducer.send`):
#: a kernel pass usually transmits an ACK or two, never a per-packet loop's worth.
_FEW = 8
#: The length word in front of each frame.
TX_LEN_BYTES = 2


def tx_slot_size(mtu: int) -> int:
    """Slot bytes for a netdev of this MTU: the length word plus the largest frame."""
    need = TX_LEN_BYTES + wire.max_frame_len(mtu)
    return (need + TX_SLOT_ALIGN - 1) // TX_SLOT_ALIGN * TX_SLOT_ALIGN


def tx_slot_dtype(slot_size: int) -> np.dtype[Any]:
    """One slot: ``len`` (u16, native order) then the frame bytes."""
    return np.dtype([("len", "u2"), ("frame", "u1", (slot_size - TX_LEN_BYTES,))])


def tx_region_object(dev: str) -> str:
    """The ``<object>`` part of a TX ring region's name (``<dev>.tx``)."""
    return f"{dev}.tx"


@dataclass(frozen=True)
class TxLayout:
    """Where the TX ring's words and slots sit in its region."""

    ring_size: int
    slot_size: int

    @property
    def ring(self) -> RingLayout:
        return RingLayout.default(self.ring_size, tx_slot_dtype(self.slot_size), base=0)

    @property
    def max_frame(self) -> int:
        return self.slot_size - TX_LEN_BYTES

    @property
    def size(self) -> int:
        return page_align(self.ring.size)


@dataclass(eq=False)
class TxBatch:
    """Frames drained from the ring: ``buf[offsets[i] : offsets[i] + lengths[i]]``.

    ``buf`` is a view of the ring's slots: valid until :meth:`TxConsumer.release`.
    """

    buf: npt.NDArray[np.uint8]
    offsets: npt.NDArray[np.int64]
    lengths: npt.NDArray[np.int64]

    def __len__(self) -> int:
        return int(self.offsets.shape[0])

    def frames(self) -> list[bytes]:
        """Copies of the frames as bytes (tests, slow paths)."""
        return [self.buf[o:o + n].tobytes()
                for o, n in zip(self.offsets.tolist(), self.lengths.tolist(), strict=True)]


class TxProducer:
    """The kernel's end: copies frames into slots and publishes them."""

    def __init__(self, buf: Any, layout: TxLayout, *, init: bool = False,
                 max_frame: int | None = None) -> None:
        """``init``: zero the ring words (the region's creator, once, before ``nic.tx_start``);
        ``max_frame``: the longest frame sent (MTU + 14; default what a slot holds)."""
        self.layout = layout
        self.max_frame = layout.max_frame if max_frame is None else min(max_frame,
                                                                        layout.max_frame)
        if init:
            RingProducer(buf, layout.ring).init_words()
        self.ring = RingProducer(buf, layout.ring, untrusted=True)
        #: frames that did not fit (ring full) or were longer than a slot
        self.dropped = 0

    def send(self, frames: Sequence[bytes]) -> int:
        """Queue ``frames`` (each a whole frame); returns how many were queued.

        Frames longer than a slot are dropped (counted); when the ring is full the rest
        are dropped (counted).  One tail store per contiguous stretch publishes them."""
        n = len(frames)
        if n == 0:
            return 0
        lens = np.fromiter(map(len, frames), np.int64, n)
        fit = lens <= self.max_frame
        if not fit.all():
            self.dropped += int(np.count_nonzero(~fit))
            frames = [f for f, ok in zip(frames, fit.tolist(), strict=True) if ok]
            lens = lens[fit]
        k = len(frames)
        if k == 0:
            return 0
        # Straight into the slots (no staging copy of whole slots).  A few frames (the usual
        # ACK or two per pass) are stored slot by slot; a batch is joined once, then per
        # contiguous stretch of the ring one gather per distinct length (ACKs share one).
        flat = starts = None
        if k > _FEW:
            flat = np.frombuffer(b"".join(frames), np.uint8)
            starts = np.cumsum(lens) - lens
        done = 0
        while done < k:
            view = self.ring.reserve(k - done)
            m = int(view.shape[0])
            if m == 0:
                break
            ln = lens[done:done + m]
            view["len"] = ln
            body = view["frame"]
            if flat is None or starts is None:
                for i in range(m):
                    f = frames[done + i]
                    body[i, :len(f)] = np.frombuffer(f, np.uint8)
            else:
                st = starts[done:done + m]
                for w in np.unique(ln).tolist():
                    rows = np.flatnonzero(ln == w)
                    body[rows, :w] = flat[st[rows, None] + np.arange(w)]
            self.ring.submit(m)
            done += m
        self.dropped += k - done
        return done

    def doorbell_due(self) -> bool:
        """True once if the NIC sleeps on an empty ring (send ``nic.tx_doorbell``)."""
        if self.ring.needs_wakeup():
            self.ring.clear_need_wakeup()
            return True
        return False

    def detach(self) -> None:
        self.ring.detach()


class TxConsumer:
    """The NIC's end: hands out batches of frames, releases them once sent."""

    def __init__(self, buf: Any, layout: TxLayout, *, untrusted: bool = False) -> None:
        """``untrusted``: the producer may write anything (tail clamped, faults counted)."""
        self.layout = layout
        self.ring = RingConsumer(buf, layout.ring, untrusted=untrusted)
        self._held = 0
        #: slots whose length word exceeded the slot (skipped)
        self.bad = 0

    def peek(self, max_frames: int = 256) -> TxBatch:
        """Up to ``max_frames`` ready frames (contiguous: stops at the wrap).  Bad lengths
        are dropped from the batch and counted in :attr:`bad`.  Release with
        :meth:`release` before the next peek."""
        view = self.ring.peek(max_frames)
        n = int(view.shape[0])
        self._held = n
        slot = self.layout.slot_size
        flat = view.view(np.uint8).reshape(-1) if n else np.zeros(0, np.uint8)
        lengths = view["len"].astype(np.int64)
        offsets = np.arange(n, dtype=np.int64) * slot + TX_LEN_BYTES
        ok = lengths <= self.layout.max_frame
        if not ok.all():
            self.bad += int(np.count_nonzero(~ok))
            lengths, offsets = lengths[ok], offsets[ok]
        return TxBatch(flat, offsets, lengths)

    def release(self) -> None:
        """Give the slots of the last :meth:`peek` back to the kernel."""
        if self._held:
            self.ring.release(self._held)
            self._held = 0

    @property
    def held(self) -> int:
        """Slots of the last :meth:`peek` not yet released (bad ones included)."""
        return self._held

    def ready(self) -> int:
        return self.ring.ready()

    def arm(self) -> bool:
        """About to sleep: set need-wakeup, then re-check; True if frames wait (stay awake)."""
        self.ring.set_need_wakeup()
        if self.ring.ready():
            self.ring.clear_need_wakeup()
            return True
        return False

    def disarm(self) -> None:
        self.ring.clear_need_wakeup()

    def detach(self) -> None:
        self.ring.detach()
