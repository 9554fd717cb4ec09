"""Pcap out: what a netdev took off the wire, written before DMA (``zcrx capture``).

Owned by the NIC process.  A :class:`Capture` is attached to one netdev (``Netdev.captures``,
empty when nothing captures, so capture costs one truth test per batch when off).  The NIC
loop hands it each batch after steering with the frames it took off the wire (placed, or
dropped by a rule, a stopped queue or a missing buffer; frames a paused queue left on the
wire are offered again later and recorded then), and the queue each was steered to.  It
writes classic pcap (link type Ethernet, nanosecond timestamps, the wall clock of the
batch) to a file the launcher named: ``tcpdump -r`` and Wireshark read it, and the file
is flushed after every batch so a reader can follow it live (``zcrx capture -w -``).

Frames the MAC could not parse (bad Ethernet, IP or TCP headers) are dropped before
steering and are not recorded.
"""

from __future__ import annotations

import errno
import struct
import time
from typing import IO, Any

import numpy as np
import numpy.typing as npt

from nic_proc.dma import Frames
from shared.errors import Misuse
from shared.nicif import MAX_SNAPLEN

__all__ = ["MAX_SNAPLEN", "Capture"]

_PCAP_NS_MAGIC = 0xA1B23C4D
_DLT_EN10MB = 1
_REC = struct.Struct("<IIII")


def _records(frames: Frames, rows: npt.NDArray[np.intp], snap: int, sec: int, nsec: int
             ) -> tuple[bytes, int]:
    """Pcap records (16-byte header + captured bytes) of ``rows`` of ``frames``, built for
    the whole batch at once; returns them and the frames' total wire length.

    Each frame is laid out in a row of a zeroed matrix (headers, then payload at its header
    length, then the zero padding up to ``frame_len``), its record header in front; the
    bytes each record keeps are then taken out in row order with one boolean mask."""
    h = frames.hdr_len[rows]
    p = frames.pay_len[rows]
    f = frames.frame_len[rows]
    cut = np.minimum(f, snap)
    n = rows.shape[0]
    width = int(cut.max())
    m = np.zeros((n, _REC.size + width), np.uint8)
    hw = min(frames.hdr.shape[1], width)
    cols = np.arange(hw)
    hdr = frames.hdr[rows, :hw]
    body = m[:, _REC.size:]
    body[:, :hw] = np.where(cols < np.minimum(h, cut)[:, None], hdr, 0)
    pw = frames.pay.shape[1]
    if pw and int(p.max()) > 0:
        j = np.arange(pw)
        dst = h[:, None] + j                            # where payload byte j lands
        keep = (j < p[:, None]) & (dst < cut[:, None])  # a real byte, inside the snap
        r, c = np.nonzero(keep)
        body[r, dst[r, c]] = frames.pay[rows[r], c]
    rec = np.zeros(n, np.dtype([("sec", "<u4"), ("nsec", "<u4"), ("incl", "<u4"),
                                ("orig", "<u4")]))
    rec["sec"], rec["nsec"], rec["incl"], rec["orig"] = sec, nsec, cut, f
    m[:, :_REC.size] = rec.view(np.uint8).reshape(n, _REC.size)
    keep_cols = np.arange(m.shape[1]) < (_REC.size + cut)[:, None]
    return m[keep_cols].tobytes(), int(f.sum())


class Capture:
    """One capture: frames of netdev ``dev`` (queue ``queue``, or all for -1) into ``path``."""

    def __init__(self, cap_id: int, dev: str, path: str, *, queue: int = -1, count: int = 0,
                 snaplen: int = MAX_SNAPLEN) -> None:
        """Open ``path`` for writing (:class:`Misuse` with the errno if it cannot)."""
        if not 0 < snaplen <= MAX_SNAPLEN:
            raise Misuse(f"snaplen {snaplen}: must be in 1..{MAX_SNAPLEN}", errno.EINVAL)
        if count < 0:
            raise Misuse(f"count {count}: must be >= 0", errno.EINVAL)
        self.id = cap_id
        self.dev = dev
        self.path = path
        self.queue = queue
        self.count = count
        self.snaplen = snaplen
        self.frames = 0
        self.bytes = 0
        try:
            self.f: IO[bytes] | None = open(path, "wb")  # noqa: SIM115 (closed in close)
        except OSError as e:
            raise Misuse(f"capture: cannot write {path}: {e.strerror}",
                         e.errno or errno.EINVAL) from None
        self.f.write(struct.pack("<IHHiIII", _PCAP_NS_MAGIC, 2, 4, 0, 0, snaplen,
                                 _DLT_EN10MB))
        self.f.flush()

    @property
    def done(self) -> bool:
        return self.f is None or (self.count > 0 and self.frames >= self.count)

    def record(self, frames: Frames, taken: npt.NDArray[np.bool_],
               queue_of: npt.NDArray[np.int32] | None) -> None:
        """Write the frames of ``frames`` that were ``taken`` (and on the queue, if one)."""
        if self.done:
            return
        sel = taken if self.queue < 0 or queue_of is None else taken & (queue_of == self.queue)
        rows = np.flatnonzero(sel)
        if self.count:
            rows = rows[: self.count - self.frames]
        if rows.shape[0] == 0:
            return
        ns = time.time_ns()
        sec, nsec = divmod(ns, 1_000_000_000)
        blob, wire = _records(frames, rows, self.snaplen, sec, nsec)
        self.bytes += wire
        self.frames += int(rows.shape[0])
        assert self.f is not None
        try:
            self.f.write(blob)
            self.f.flush()
        except OSError:
            self.close()  # the reader went away or the disk is full: stop, keep receiving

    def status(self) -> dict[str, Any]:
        return {"capture": self.id, "dev": self.dev, "queue": self.queue, "path": self.path,
                "frames": self.frames, "bytes": self.bytes, "done": self.done}

    def close(self) -> None:
        """Close the file (idempotent)."""
        if self.f is not None:
            try:
                self.f.close()
            except OSError:
                pass
            self.f = None
