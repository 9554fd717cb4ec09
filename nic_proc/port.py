"""A real port: the netdev's wire plugged into a Linux TAP device (``--netdev eth0:port=tap``).

The NIC process opens ``/dev/net/tun`` (IFF_TAP | IFF_NO_PI, non-blocking) as
:func:`shared.nicif.tap_ifname` of the run and the netdev; the launcher moves that device
into the run's peer network namespace and gives it the peer's addresses
(:mod:`launch.port`), so a Linux program there (``nc``, ``ping``) talks to the emulated
host through it.  The device is not persistent: it disappears with the NIC's file
descriptor, so a NIC that dies leaves no device behind.

:class:`TapPort` is both ends of the port:

* a :class:`~nic_proc.sources.Source`: frames the Linux side sends are read from the fd,
  impaired (:class:`Impairment`) and offered to the NIC as a
  :class:`~nic_proc.sources.RawBatch` (the generic MAC path: parse, steering, header
  split, DMA, as for any raw frame);
* a :class:`nic_proc.tx.TxSink`: the frames the host transmits (the kernel's TX ring,
  drained by the NIC) are written to the fd.  Adding the port makes it the netdev's sink.

Reading is one ``read(2)`` per frame (a TAP device has no batch read; the rest of the path
works on the batch).  Pause (``nobuf=pause``, the default): frames the NIC did not take
(their queue has no buffers) stay here and are offered again; while
:data:`MAX_PENDING` of them wait the port stops reading the TAP, so its queue in Linux
fills and Linux drops there (the peer's ``ip -s link`` counts them as TX drops, the
emulated NIC sees nothing).  Drop (``nobuf=drop``): the NIC takes every frame and drops
those without a buffer (``rx_missed``), as a real NIC does; the port keeps reading.

Ownership: the port owns its fd and the frames it holds (Python bytes); it touches no
shared memory.  Counters (``port_*``) are plain ints, reported by ``ethtool -S``.
"""

from __future__ import annotations

import collections
import errno
import fcntl
import os
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from nic_proc.dma import Frames
from nic_proc.sources import Blocked, RawBatch, Source, WireInfo
from nic_proc.tx import TxSink
from shared import wire
from shared.errors import Misuse
from shared.nicif import MAX_MTU

__all__ = ["MAX_PENDING", "PORT_COUNTERS", "Impairment", "TapPort", "TxSink", "open_tap"]

#: ioctl and flags of ``<linux/if_tun.h>``.
TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
#: Frames read from the TAP per poll at most.
READ_BATCH = 256
#: Frames held for paused queues before the port stops reading the TAP.
MAX_PENDING = 1024
#: Largest frame read (the TAP's MTU is the netdev's, so frames never come near this).
READ_SIZE = 65536

#: The port's counters, in ``ethtool -S`` order.
PORT_COUNTERS = (
    "port_rx_frames",     # frames read from the TAP
    "port_rx_bytes",      # their bytes
    "port_rx_lost",       # dropped by the loss impairment
    "port_rx_dup",        # extra copies made by the dup impairment
    "port_rx_reordered",  # frames held back behind a later one by the reorder impairment
    "port_rx_delayed",    # frames held by the delay impairment
    "port_rx_offered",    # frames handed to the NIC (taken or dropped there)
    "port_pending_full",  # polls that did not read because MAX_PENDING frames wait
    "port_tx_frames",     # frames written to the TAP
    "port_tx_bytes",      # their bytes
    "port_tx_dropped",    # writes the TAP refused (device down in Linux): ends the batch
    "port_tx_lost",       # frames the host sent that the tx_loss impairment dropped
    "port_tx_lost_data",  # of those, TCP segments its sender must retransmit (data, SYN, FIN)
)


def open_tap(ifname: str) -> int:
    """Create TAP device ``ifname`` (IFF_TAP | IFF_NO_PI) and return its non-blocking fd.

    :class:`Misuse` EPERM without root (CAP_NET_ADMIN), ENODEV without ``/dev/net/tun``,
    EBUSY if the name is taken."""
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise Misuse(f"port=tap: cannot open /dev/net/tun: {e.strerror}"
                     + (" (run as root)" if e.errno in (errno.EACCES, errno.EPERM) else ""),
                     e.errno or errno.ENODEV) from None
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", ifname.encode(), IFF_TAP | IFF_NO_PI))
    except OSError as e:
        os.close(fd)
        raise Misuse(f"port=tap: cannot create TAP device {ifname}: {e.strerror}"
                     + (" (run as root)" if e.errno == errno.EPERM else ""),
                     e.errno or errno.EIO) from None
    return fd


@dataclass
class Impairment:
    """Seeded impairments of what the port carries.  ``loss``, ``dup``, ``reorder`` and
    ``delay`` act on what it receives (the frames the Linux side sends towards the emulated
    host); ``tx_loss`` drops frames the host transmits (its ACKs, what its apps send) from
    a second generator, so adding it leaves the receive side's draws unchanged.

    ``loss``, ``dup`` and ``reorder`` are per-frame probabilities, drawn in one numpy call
    per read batch from ``numpy.random.default_rng(seed)``, so a seeded run impairs the
    same frames of the same input.  A reordered frame is held back and delivered after
    the next frame that is not (so it arrives one place late, or later if its followers
    are reordered too, or on the next poll that reads nothing).  ``delay`` (seconds) holds
    every frame that long (FIFO: a fixed delay does not reorder).  A lost frame is neither
    duplicated nor reordered.
    """

    loss: float = 0.0
    dup: float = 0.0
    reorder: float = 0.0
    delay: float = 0.0
    tx_loss: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.seed)
        self.tx_rng = np.random.default_rng([self.seed, 1])

    @property
    def active(self) -> bool:
        return bool(self.loss or self.dup or self.reorder)


def _retransmittable(frames: list[bytes]) -> int:
    """How many of ``frames`` are TCP segments their sender must send again: payload, SYN or
    FIN (a lost pure ACK is covered by the next one)."""
    lens = np.fromiter(map(len, frames), np.int64, len(frames))
    p = wire.parse_frames(b"".join(frames), np.cumsum(lens) - lens, lens, MAX_MTU,
                          check_ip_csum=False)
    ok = p["status"] == 0
    data = (p["payload_len"] > 0) | ((p["tcp_flags"] & (wire.TCP_SYN | wire.TCP_FIN)) != 0)
    return int(np.count_nonzero(ok & data))


class TapPort(Source):
    """A TAP device as the netdev's wire (see the module docstring)."""

    kind = "port"

    def __init__(self, source_id: int, info: WireInfo, fd: int, *, ifname: str = "",
                 impair: Impairment | None = None, batch: int = 64,
                 clock: Callable[[], float] | None = None, owns_fd: bool = True) -> None:
        """Drive the open TAP ``fd`` (any non-blocking fd whose reads and writes are whole
        frames: a TAP, or a SOCK_SEQPACKET socket in tests)."""
        super().__init__(source_id, info)
        self.fd = fd
        self.ifname = ifname
        self.impair = impair or Impairment()
        self.batch = batch
        self.owns_fd = owns_fd
        self.clock = clock or time.monotonic
        self.counters = dict.fromkeys(PORT_COUNTERS, 0)
        #: frames ready for the NIC, oldest first (untaken frames of a paused queue first)
        self.ready: collections.deque[bytes] = collections.deque()
        #: (release time, frame) held by the delay impairment, oldest first
        self.delayed: collections.deque[tuple[float, bytes]] = collections.deque()
        #: frames the reorder impairment holds until a later frame went ahead
        self.held: list[bytes] = []
        self._last: list[bytes] | None = None

    # -- Source ----------------------------------------------------------------------

    @property
    def done(self) -> bool:
        return self.stopped

    @property
    def pending(self) -> bool:
        """True while frames wait here for the NIC or a timer (the loop must not block)."""
        return bool(self.ready or self.delayed)

    @property
    def full(self) -> bool:
        """True while :data:`MAX_PENDING` frames wait: the port does not read the TAP."""
        return len(self.ready) + len(self.delayed) + len(self.held) >= MAX_PENDING

    def fileno(self) -> int:
        """The fd the loop may block on for new frames (-1 once closed)."""
        return -1 if self.stopped else self.fd

    def _read(self, limit: int) -> list[bytes]:
        out: list[bytes] = []
        read = os.read
        fd = self.fd
        try:
            for _ in range(limit):
                out.append(read(fd, READ_SIZE))
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as e:  # the device went away (EBADFD/EIO): nothing more to read
            if e.errno not in (errno.EAGAIN,):
                self.stopped = True
        return out

    def _impair(self, frames: list[bytes], now: float) -> None:
        c = self.counters
        imp = self.impair
        out: list[bytes]
        if imp.active:
            u = imp.rng.random((len(frames), 3))
            lost = u[:, 0] < imp.loss
            dup = ~lost & (u[:, 1] < imp.dup)
            reo = ~lost & (u[:, 2] < imp.reorder)
            c["port_rx_lost"] += int(np.count_nonzero(lost))
            c["port_rx_dup"] += int(np.count_nonzero(dup))
            c["port_rx_reordered"] += int(np.count_nonzero(reo))
            out = []
            held = self.held
            for f, lo, du, re in zip(frames, lost.tolist(), dup.tolist(), reo.tolist(),
                                     strict=True):
                if lo:
                    continue
                if re:
                    held.append(f)
                    if du:
                        held.append(f)
                    continue
                out.append(f)
                if du:
                    out.append(f)
                if held:
                    out.extend(held)
                    held.clear()
        else:
            out = frames
        if imp.delay > 0:
            c["port_rx_delayed"] += len(out)
            t = now + imp.delay
            self.delayed.extend((t, f) for f in out)
        else:
            self.ready.extend(out)

    def _release(self, now: float) -> None:
        d = self.delayed
        while d and d[0][0] <= now:
            self.ready.append(d.popleft()[1])

    def poll(self, blocked: Blocked | None = None, now: float | None = None) -> RawBatch | None:
        if self.stopped:
            return None
        t = self.clock() if now is None else now
        backlog = len(self.ready) + len(self.delayed) + len(self.held)
        if backlog < MAX_PENDING:
            got = self._read(min(READ_BATCH, MAX_PENDING - backlog))
            if got:
                self.counters["port_rx_frames"] += len(got)
                self.counters["port_rx_bytes"] += sum(map(len, got))
                self._impair(got, t)
            elif self.held:  # the wire went quiet: nothing will pass the held frames
                self.ready.extend(self.held)
                self.held.clear()
        else:
            self.counters["port_pending_full"] += 1
        if self.delayed:
            self._release(t)
        if not self.ready:
            return None
        k = min(self.batch, len(self.ready))
        take = [self.ready.popleft() for _ in range(k)]
        self._last = take
        lengths = np.fromiter(map(len, take), np.int64, k)
        offsets = np.zeros(k, np.int64)
        np.cumsum(lengths[:-1], out=offsets[1:])
        return RawBatch(np.frombuffer(b"".join(take), np.uint8), offsets, lengths)

    def commit(self, batch: Frames | RawBatch, consumed: npt.NDArray[np.bool_]) -> None:
        take, self._last = self._last, None
        if take is None:
            return
        took = int(np.count_nonzero(consumed))
        self.counters["port_rx_offered"] += took
        self.frames_sent += took
        if took == len(take):
            self.bytes_sent += sum(map(len, take))
            return
        keep = [f for f, c in zip(take, consumed.tolist(), strict=True) if not c]
        self.bytes_sent += sum(len(f) for f, c in zip(take, consumed.tolist(), strict=True)
                               if c)
        self.ready.extendleft(reversed(keep))  # untaken frames go first next time, in order

    # -- TxSink ----------------------------------------------------------------------

    def transmit(self, frames: Any) -> int:
        """Write the frames to the TAP, in order; returns how many went out (a prefix).

        ``frames`` is a batch with ``buf`` / ``offsets`` / ``lengths`` (the NIC's TX batch,
        a :class:`~nic_proc.sources.RawBatch`; views valid during the call only, written at
        once) or a list of bytes.  The first write the TAP refuses (``EIO`` while the peer
        keeps the device down) ends the batch and is counted ``port_tx_dropped``; the NIC
        counts the frames not sent as ``tx_dropped`` and never offers them again.
        """
        c = self.counters
        if isinstance(frames, list | tuple):
            seq: Sequence[Any] = frames
        else:
            buf = np.ascontiguousarray(frames.buf, np.uint8).reshape(-1).data
            seq = [buf[o:o + n] for o, n in
                   zip(frames.offsets.tolist(), frames.lengths.tolist(), strict=True)]
        sent = 0
        nbytes = 0
        write = os.write
        fd = self.fd
        p = self.impair.tx_loss
        lost = (self.impair.tx_rng.random(len(seq)) < p).tolist() if p else None
        gone: list[bytes] = []
        for i, f in enumerate(seq):
            if self.stopped:
                break
            if lost is not None and lost[i]:
                gone.append(bytes(f))  # left the NIC, never reached Linux
                sent += 1
                continue
            try:
                nbytes += write(fd, f)
            except OSError:
                c["port_tx_dropped"] += 1
                break
            sent += 1
            c["port_tx_frames"] += 1
        c["port_tx_bytes"] += nbytes
        if gone:
            c["port_tx_lost"] += len(gone)
            c["port_tx_lost_data"] += _retransmittable(gone)
        return sent

    # -- reporting -------------------------------------------------------------------

    def stats(self) -> list[list[Any]]:
        """``[name, value]`` rows for ``ethtool -S``."""
        return [[k, v] for k, v in self.counters.items()]

    def progress(self) -> dict[str, Any]:
        out = super().progress()
        imp = self.impair
        out.update({"ifname": self.ifname, "pending": len(self.ready) + len(self.held),
                    "delayed": len(self.delayed), "counters": dict(self.counters),
                    "impair": {"loss": imp.loss, "dup": imp.dup, "reorder": imp.reorder,
                               "delay": imp.delay, "tx_loss": imp.tx_loss,
                               "seed": imp.seed}})
        return out

    def close(self) -> None:
        if not self.stopped or self.fd >= 0:
            super().close()
            if self.owns_fd and self.fd >= 0:
                os.close(self.fd)
            self.fd = -1
