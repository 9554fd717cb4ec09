"""Receive-side TCP for the emulated kernel: sockets, reassembly, receive queues (no I/O).

This module is the kernel's TCP socket layer as pure logic, in the h11 style: nothing here
touches shared memory, rings or zmq.  The NAPI loop hands it batches of segment *descriptors*
and gets back what to deliver and what to free; the io_uring layer reads from the socket's
receive queue.  Every piece of state is plain Python or numpy, so the whole layer is tested
without processes.

Theory of operation
-------------------
*Zero copy means references, never bytes.*  A received segment is described by its sequence
number (u32), payload length, TCP flags and an opaque int64 ``handle`` that the driver uses to
find its skb (linear header part and/or frags in data buffers).  Reassembly works on byte ranges
of those handles: the receive queue holds *pieces* ``(handle, offset_in_segment, length)``, i.e.
"bytes ``[offset, offset+length)`` of the payload of skb ``handle``".  The driver resolves a
piece against the skb's buffers.  Payload offset 0 is the first payload byte of the segment
(the byte at sequence number ``seq``, or ``seq + 1`` for a SYN).

*Sequence numbers* are u32 on the wire.  Internally every position is unwrapped to a 64-bit
stream position (the 32-bit value nearest to ``rcv_nxt``, i.e. RFC 1982 serial arithmetic),
so wrap-around at 2**32 needs no special case anywhere.

*Fast path.*  When a whole batch is exactly in order from ``rcv_nxt`` (``seq[0] == rcv_nxt``
and ``seq[i+1] == seq[i] + len[i]`` mod 2**32), carries only ACK among SYN/FIN/RST/ACK and
the connection is SYN_RECV or ESTABLISHED with no FIN seen, it is accepted with a handful of
numpy calls and no per-segment Python.  Anything else (out of order, duplicates, overlaps,
SYN/FIN/RST, bad lengths) goes through the per-segment slow path, rare on a healthy flow.

*Out-of-order queue.*  Segments that start beyond ``rcv_nxt`` are held in a sorted queue of
disjoint byte ranges, bounded by ``ooo_limit`` segments.  A new segment is trimmed at its head
against the range before it and at its tail against the range after it; ranges it covers
entirely are dropped (as Linux's ``tcp_data_queue_ofo`` does).  When the queue is full, the
range farthest from ``rcv_nxt`` (the new one or the last held one) is dropped and counted in
``ooo_dropped``.  When ``rcv_nxt`` advances, held ranges are delivered in order, trimmed at the
head if the in-order data already covered part of them, or freed if it covered all.

Handle ownership (the contract with the driver)
-----------------------------------------------
Every handle passed to :meth:`TcpReceiver.ingest` (or to the :class:`SocketTable` ingest
methods) becomes owned by this layer and is handed back **exactly once**, in one of these ways:

1. in ``freed`` of an ingest result: the segment contributed no byte to the stream (whole
   duplicate, bad sequence, no socket, pure ACK, SYN to a full backlog, after RST, dropped from
   the out-of-order queue, ...).  The driver frees the skb at once.  ``freed`` may contain
   handles passed in *earlier* calls (an out-of-order segment later made redundant or purged);
2. by :meth:`RxQueue.consume`: once the reader has consumed every byte of a handle's piece, the
   handle is returned and the driver frees the skb (buffers handed to the user in place keep
   their own user reference, exactly as Linux frees an skb whose frags the user holds);
3. by :meth:`TcpReceiver.close`, :meth:`SocketTable.close` or :meth:`SocketTable.close_listener`:
   every handle still queued (receive queue or out-of-order queue) is returned.

A handle contributes **at most one piece** (one contiguous range of its payload) to a receive
queue, and while that piece is not fully consumed the handle is not released: a partially
consumed piece stays at the head of the queue with its offset advanced.  Handles must be unique
among those currently owned; reusing a live handle is the caller's bug.

States
------
``SYN_RECV``    created by a SYN (with its ISN); data may already be queued (see SYN+data);
``ESTABLISHED`` the first acceptable segment with ACK arrived (stands in for the handshake ACK);
``CLOSE_WAIT``  the FIN was reached in order (every byte before it arrived): EOF after the
                queued data;
``CLOSED``      reset by RST, or closed locally.

Decisions and departures from Linux (receive side only; see also DESIGN.md §9)
-----------------------------------------------------------------------------
* Nothing is sent from here: what the host transmits (SYN-ACK, ACKs, the advertised window,
  FIN, RST) is decided by :mod:`driver_proc.tcp_output` from this layer's state after each
  batch.  No congestion control.  ``rcv_wnd`` (default 2**30,
  Linux's largest scaled window) only bounds what counts as "future": a segment starting
  ``rcv_wnd`` or more beyond ``rcv_nxt`` is ``bad_seq`` and dropped.  The ACK number is not
  checked; every segment except a SYN or RST must carry the ACK flag (``no_ack`` otherwise),
  as Linux requires.
* SYN + data is **accepted** (as TCP Fast Open with a valid cookie would): the payload starts at
  ISN + 1.  Linux without TFO drops it and relies on the sender retransmitting after the
  SYN-ACK; the emulated senders ignore the SYN-ACK, so dropping would silently lose the
  bytes.  A SYN whose sequence number is not the ISN, or SYN with FIN or RST, is ``bad_syn``.
  A SYN carrying ACK reaching a listener is ``bad_syn`` (Linux answers with RST).
* The backlog bounds connections that are not yet accepted (SYN_RECV plus the accept queue); a
  SYN beyond it is dropped and counted in ``listen_overflow`` (Linux's ListenDrops).  With no
  retransmitting sender the flow's later segments then count as ``no_socket``.
* Segments for no socket and no listener are freed and counted in ``no_socket`` (Linux sends
  a RST).
* FIN consumes one sequence number.  EOF is reported only once every byte before the FIN has
  arrived (``rcv_nxt`` reached it).  Bytes at or beyond the FIN are ``data_after_fin`` and
  dropped, including out-of-order bytes already held when the FIN arrives.  A second FIN at a
  different position is ``bad_fin`` and ignored (its data still counts).
* RST is accepted when its sequence number lies in ``[rcv_nxt, rcv_nxt + rcv_wnd)`` (RFC 793;
  Linux's RFC 5961 exact-match check answers in-window RSTs with a challenge ACK, which needs a
  sender that listens).  On RST the out-of-order queue is purged (those handles are freed), the
  state becomes CLOSED and the socket leaves the lookup table.  Data already in order in the
  receive queue stays readable, then the reader gets ``-ECONNRESET`` (Linux's ``tcp_recvmsg``
  and ``io_zcrx_recv`` also drain queued data before reporting ``sk_err``).  A RST after the
  FIN was reached leaves EOF as the read result (Linux: SOCK_DONE is checked before sk_err).
* Addresses are 16-byte ``bytes`` (IPv6, IPv4 as IPv4-mapped ``::ffff:a.b.c.d``), so one table
  serves both families and a wildcard listener is dual-stack (IPv6 socket without V6ONLY).
* A reused 4-tuple after RST starts a new connection (the reset socket was unhashed); segments of
  the same batch that follow an accepted RST are freed as ``after_close``.
"""

from __future__ import annotations

import bisect
import dataclasses
import enum
import errno
import ipaddress
from collections import deque
from dataclasses import asdict, dataclass
from typing import Final, NamedTuple

import numpy as np
from numpy.typing import ArrayLike, NDArray

from driver_proc.sock_reuseport import ReuseportGroup, flow_hash
from shared.bpf import ETH_P_IP, ETH_P_IPV6, Program, SkbInfo
from shared.errors import InvariantBroken, Misuse

__all__ = [
    "ACK",
    "FIN",
    "FLOW_KEY_DTYPE",
    "FLOW_KEY_LEN",
    "MAX_SEGMENT_LEN",
    "PSH",
    "RST",
    "SYN",
    "BatchResult",
    "IngestResult",
    "Listener",
    "Pieces",
    "RxQueue",
    "SocketTable",
    "TableStats",
    "TcpReceiver",
    "TcpState",
    "TcpStats",
    "flow_key",
    "flow_keys",
    "group_by_flow",
    "ip_bytes",
    "split_flow_key",
]

# TCP header flag bits (byte 13 of the TCP header), as on the wire.
FIN: Final = 0x01
SYN: Final = 0x02
RST: Final = 0x04
PSH: Final = 0x08
ACK: Final = 0x10
_CTRL: Final = SYN | FIN | RST | ACK

SEQ_MOD: Final = 1 << 32
_SEQ_MASK: Final = SEQ_MOD - 1
_SEQ_HALF: Final = 1 << 31
_LEN_BITS: Final = 24
#: Largest payload one segment descriptor may carry (a GRO/BIG TCP skb is far below this).
MAX_SEGMENT_LEN: Final = (1 << _LEN_BITS) - 1
DEFAULT_RCV_WND: Final = 1 << 30
DEFAULT_OOO_LIMIT: Final = 1024
DEFAULT_BACKLOG: Final = 128

#: Flow key layout: src addr (16 B), src port (u16 BE), dst addr (16 B), dst port (u16 BE).
FLOW_KEY_DTYPE: Final = np.dtype(
    [("saddr", "V16"), ("sport", ">u2"), ("daddr", "V16"), ("dport", ">u2")]
)
FLOW_KEY_LEN: Final = FLOW_KEY_DTYPE.itemsize  # 36
_V4_MAPPED_PREFIX: Final = bytes(10) + b"\xff\xff"

_I64 = np.int64
_EMPTY_I64: Final = np.empty(0, dtype=np.int64)
_EMPTY_I64.flags.writeable = False


def _i64(values: list[int]) -> NDArray[np.int64]:
    return np.array(values, dtype=np.int64) if values else _EMPTY_I64


# --------------------------------------------------------------------------------------------
# Addresses and flow keys
# --------------------------------------------------------------------------------------------

def ip_bytes(addr: str | bytes | int | ipaddress.IPv4Address | ipaddress.IPv6Address) -> bytes:
    """Normalise an IPv4 or IPv6 address to the 16-byte form used in flow keys.

    Args:
        addr: a textual address, 4 or 16 raw bytes, an int (below 2**32 means IPv4, as in
            :func:`ipaddress.ip_address`) or an :mod:`ipaddress` object.

    Returns:
        16 bytes; IPv4 addresses become IPv4-mapped IPv6 (``::ffff:a.b.c.d``).

    Raises:
        Misuse: the value is not an address.
    """
    try:
        if isinstance(addr, bytes):
            if len(addr) == 16:
                return addr
            if len(addr) == 4:
                return _V4_MAPPED_PREFIX + addr
            raise ValueError(f"{len(addr)}-byte address")
        ip = addr if isinstance(addr, ipaddress.IPv4Address | ipaddress.IPv6Address) else (
            ipaddress.ip_address(addr))
    except ValueError as exc:
        raise Misuse(f"bad IP address {addr!r}: {exc}") from None
    if ip.version == 4:
        return _V4_MAPPED_PREFIX + ip.packed
    return ip.packed


def _ip_object(raw: bytes) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    if raw[:12] == _V4_MAPPED_PREFIX:
        return ipaddress.IPv4Address(raw[12:])
    return ipaddress.IPv6Address(raw)


def flow_key(
    saddr: str | bytes | int | ipaddress.IPv4Address | ipaddress.IPv6Address,
    sport: int,
    daddr: str | bytes | int | ipaddress.IPv4Address | ipaddress.IPv6Address,
    dport: int,
) -> bytes:
    """Build the 36-byte key of one connection as seen by the receiver.

    ``saddr:sport`` is the remote peer (the sender), ``daddr:dport`` the local socket.  The key
    is plain ``bytes`` (hashable, the socket table's dict key) laid out as
    :data:`FLOW_KEY_DTYPE`, so it equals one element of a :func:`flow_keys` array.

    Raises:
        Misuse: a bad address or a port outside 0..65535.
    """
    for port in (sport, dport):
        if not 0 <= port <= 0xFFFF:
            raise Misuse(f"bad port {port}")
    return ip_bytes(saddr) + sport.to_bytes(2, "big") + ip_bytes(daddr) + dport.to_bytes(2, "big")


def split_flow_key(
    key: bytes,
) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int,
           ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    """Decode a flow key into ``(saddr, sport, daddr, dport)`` (IPv4-mapped shown as IPv4)."""
    if len(key) != FLOW_KEY_LEN:
        raise Misuse(f"flow key must be {FLOW_KEY_LEN} bytes, got {len(key)}")
    return (_ip_object(key[0:16]), int.from_bytes(key[16:18], "big"),
            _ip_object(key[18:34]), int.from_bytes(key[34:36], "big"))


def _addr_rows(addrs: ArrayLike) -> NDArray[np.uint8]:
    a = np.asarray(addrs, dtype=np.uint8)
    if a.ndim != 2 or a.shape[1] not in (4, 16):
        raise Misuse(f"addresses must be an (n, 4) or (n, 16) uint8 array, got {a.shape}")
    if a.shape[1] == 16:
        return np.ascontiguousarray(a)
    out = np.zeros((a.shape[0], 16), dtype=np.uint8)
    out[:, 10:12] = 0xFF
    out[:, 12:] = a
    return out


def flow_keys(saddr: ArrayLike, sport: ArrayLike, daddr: ArrayLike,
              dport: ArrayLike) -> NDArray[np.void]:
    """Build the flow keys of a batch of parsed headers, vectorised.

    Args:
        saddr: remote (source) addresses, ``(n, 4)`` IPv4 or ``(n, 16)`` IPv6 uint8 rows
            (IPv4 rows become IPv4-mapped).
        sport: remote ports, length n.
        daddr: local (destination) addresses, like ``saddr``.
        dport: local ports, length n.

    Returns:
        A length-n array of dtype ``V36``; ``keys[i].tobytes()`` equals the :func:`flow_key`
        of segment i, and the array can be passed to :func:`group_by_flow`.
    """
    s = _addr_rows(saddr)
    d = _addr_rows(daddr)
    n = s.shape[0]
    out = np.empty(n, dtype=FLOW_KEY_DTYPE)
    out["saddr"] = s.view("V16")[:, 0]
    out["sport"] = np.asarray(sport)
    out["daddr"] = d.view("V16")[:, 0]
    out["dport"] = np.asarray(dport)
    return out.view(np.dtype(f"V{FLOW_KEY_LEN}"))


def _all_equal(keys: NDArray[np.generic]) -> bool:
    """Every element equals the first.  Raw ``V36`` keys are compared as 32-bit words
    (numpy compares void scalars byte string by byte string: ~3x slower)."""
    if keys.dtype.kind == "V" and keys.dtype.fields is None and keys.flags.c_contiguous \
            and keys.dtype.itemsize % 4 == 0:
        w = keys.view(np.uint32).reshape(len(keys), -1)
        return not np.count_nonzero(w != w[0])
    return bool(np.all(keys == keys[0]))


def group_by_flow(keys: NDArray[np.generic]) -> tuple[NDArray[np.intp], NDArray[np.intp]]:
    """Group a NAPI batch by flow so that each flow is ingested with one call.

    Args:
        keys: one key per segment, any sortable dtype with equality (the ``V36`` array of
            :func:`flow_keys`, or a flow id/hash array).

    Returns:
        ``(order, bounds)``: ``order`` is a stable permutation of the batch that brings each
        flow's segments together **in arrival order**; group g is
        ``order[bounds[g]:bounds[g + 1]]``.  A batch of a single flow (the common case) costs
        one comparison and no sort.
    """
    n = len(keys)
    if n == 0:
        return np.empty(0, dtype=np.intp), np.zeros(1, dtype=np.intp)
    if _all_equal(keys):
        return np.arange(n, dtype=np.intp), np.array([0, n], dtype=np.intp)
    order = np.argsort(keys, kind="stable")
    sk = keys[order]
    cut = np.flatnonzero(sk[1:] != sk[:-1]) + 1
    bounds = np.concatenate(([0], cut, [n])).astype(np.intp)
    return order.astype(np.intp, copy=False), bounds


# --------------------------------------------------------------------------------------------
# Pieces and the receive queue
# --------------------------------------------------------------------------------------------

class Pieces(NamedTuple):
    """Stream bytes by reference: piece i is bytes ``[offsets[i], offsets[i] + lengths[i])``
    of the payload of segment ``handles[i]``.  All three arrays are int64 and equally long."""

    handles: NDArray[np.int64]
    offsets: NDArray[np.int64]
    lengths: NDArray[np.int64]

    @property
    def nbytes(self) -> int:
        """Total bytes the pieces reference."""
        return int(self.lengths.sum())

    @property
    def npieces(self) -> int:
        """Number of pieces."""
        return len(self.handles)

    @staticmethod
    def empty() -> Pieces:
        """Return zero pieces."""
        return Pieces(_EMPTY_I64, _EMPTY_I64, _EMPTY_I64)


class RxQueue:
    """The socket receive queue: in-order stream bytes held as pieces (references).

    The producer is the TCP layer (:meth:`append`); the reader (io_uring recvzc, a copying
    recv) looks at the head with :meth:`peek`, hands the bytes on, then calls :meth:`consume`
    with the number of bytes it used and frees the handles that call returns.  Storage is a
    compacting numpy array with a running byte position per piece, so peek and consume are
    O(log n) numpy calls whatever the queue length.
    """

    __slots__ = ("_end", "_h", "_head", "_len", "_off", "_read", "_tail", "_total")

    #: appends to any receive queue so far: bytes only ever become readable through
    #: :meth:`append`, so a reader's view "which queues hold data" stays true (or turns
    #: false as they are read) while this does not move
    appends = 0

    def __init__(self, capacity: int = 64) -> None:
        """Create an empty queue with room for ``capacity`` pieces (it grows as needed)."""
        cap = max(4, capacity)
        self._h = np.empty(cap, dtype=np.int64)
        self._off = np.empty(cap, dtype=np.int64)
        self._len = np.empty(cap, dtype=np.int64)
        self._end = np.empty(cap, dtype=np.int64)  # stream position just past each piece
        self._head = 0
        self._tail = 0
        self._read = 0   # stream bytes consumed so far
        self._total = 0  # stream bytes appended so far

    @property
    def nbytes(self) -> int:
        """Bytes readable now (``rx_queue_bytes``)."""
        return self._total - self._read

    @property
    def npieces(self) -> int:
        """Pieces queued, counting a partially consumed head piece."""
        return self._tail - self._head

    @property
    def bytes_consumed(self) -> int:
        """Stream bytes consumed since the queue was created."""
        return self._read

    def __len__(self) -> int:
        return self._tail - self._head

    def _reserve(self, n: int) -> None:
        cap = len(self._h)
        if self._tail + n <= cap:
            return
        live = self._tail - self._head
        if live + n <= cap // 2:  # compact in place; at least half the array stays free
            for a in (self._h, self._off, self._len, self._end):
                a[:live] = a[self._head:self._tail]
        else:
            new_cap = max(2 * cap, 2 * (live + n))
            for name in ("_h", "_off", "_len", "_end"):
                old = getattr(self, name)
                new = np.empty(new_cap, dtype=np.int64)
                new[:live] = old[self._head:self._tail]
                setattr(self, name, new)
        self._head, self._tail = 0, live

    def append(self, pieces: Pieces) -> None:
        """Queue in-order pieces at the tail (TCP layer only; lengths must be > 0)."""
        RxQueue.appends += 1
        n = len(pieces.handles)
        if n == 0:
            return
        self._reserve(n)
        t = self._tail
        self._h[t:t + n] = pieces.handles
        self._off[t:t + n] = pieces.offsets
        self._len[t:t + n] = pieces.lengths
        ends = self._end[t:t + n]
        np.cumsum(pieces.lengths, out=ends)
        ends += self._total
        self._total = int(ends[-1])
        self._tail = t + n

    def peek(self, max_bytes: int | None = None) -> Pieces:
        """Return copies of the head pieces covering up to ``max_bytes`` readable bytes.

        The first piece starts at the first unconsumed byte (its offset is advanced past any
        partially consumed part) and the last one is cut at the byte limit, so the lengths sum
        to ``min(max_bytes, nbytes)``.  Nothing is consumed.

        Args:
            max_bytes: byte budget; ``None`` means everything queued.
        """
        if max_bytes is not None and max_bytes < 0:
            raise Misuse(f"negative peek budget {max_bytes}")
        h, t = self._head, self._tail
        if h == t or max_bytes == 0:
            return Pieces.empty()
        if max_bytes is None or max_bytes >= self.nbytes:
            k = t - h
            limit = self._total
        else:
            limit = self._read + max_bytes
            k = int(np.searchsorted(self._end[h:t], limit, side="left")) + 1
        got = self._head_pieces(k)
        over = int(self._end[h + k - 1]) - limit
        if over > 0:
            got.lengths[-1] -= over
        return got

    def _head_pieces(self, k: int) -> Pieces:
        """Copies of the first ``k`` (>= 1) queued pieces, the first one advanced past what
        was already read."""
        h = self._head
        hs = self._h[h:h + k].copy()
        offs = self._off[h:h + k].copy()
        lens = self._len[h:h + k].copy()
        skip = self._read - (int(self._end[h]) - int(self._len[h]))
        offs[0] += skip
        lens[0] -= skip
        return Pieces(hs, offs, lens)

    def peek_head(self, n: int) -> Pieces:
        """The first ``n`` pieces :meth:`peek` would return with no byte budget (all of them
        when fewer are queued), without copying the rest: a reader that walks at most ``n``
        skbs (RECV_ZC's turn) pays for ``n``, not for the whole queue."""
        k = min(n, self._tail - self._head)
        if k <= 0:
            return Pieces.empty()
        return self._head_pieces(k)

    def consume(self, nbytes: int) -> NDArray[np.int64]:
        """Mark the first ``nbytes`` readable bytes as read.

        Returns:
            The handles whose piece is now fully consumed, in stream order; the caller now
            owns them (frees the skbs).  A piece consumed only in part stays queued.

        Raises:
            Misuse: ``nbytes`` is negative or more than :attr:`nbytes`.
        """
        if nbytes < 0 or nbytes > self.nbytes:
            raise Misuse(f"consume({nbytes}) with {self.nbytes} bytes queued")
        if nbytes == 0:
            return _EMPTY_I64
        self._read += nbytes
        h, t = self._head, self._tail
        j = int(np.searchsorted(self._end[h:t], self._read, side="right"))
        self._head = h + j
        return self._h[h:h + j].copy()

    def handles(self) -> NDArray[np.int64]:
        """Return (a copy of) the handles queued, head first."""
        return self._h[self._head:self._tail].copy()

    def drain(self) -> NDArray[np.int64]:
        """Drop everything queued; return every handle still referenced (for close)."""
        out = self._h[self._head:self._tail].copy()
        self._head = self._tail = 0
        self._read = self._total
        return out


# --------------------------------------------------------------------------------------------
# One connection
# --------------------------------------------------------------------------------------------

class TcpState(enum.Enum):
    """Receive-side connection states (see the module docstring)."""

    SYN_RECV = "SYN_RECV"
    ESTABLISHED = "ESTABLISHED"
    CLOSE_WAIT = "CLOSE_WAIT"
    CLOSED = "CLOSED"

    def __repr__(self) -> str:
        return self.value


@dataclass(slots=True)
class TcpStats:
    """Per-connection counters (plain ints; the driver copies them into its stats block)."""

    segs: int = 0                   #: segment descriptors ingested
    bytes_delivered: int = 0        #: stream bytes appended to the receive queue
    fast_batches: int = 0           #: batches taken by the vectorised in-order path
    slow_batches: int = 0           #: batches that needed the per-segment path
    dup_segs: int = 0               #: segments whose payload was entirely already received
    dup_bytes: int = 0              #: payload bytes of those segments
    overlap_trimmed_bytes: int = 0  #: bytes cut from segments that still contributed
    ooo_segs: int = 0               #: segments held in the out-of-order queue
    ooo_dropped: int = 0            #: segments dropped because the out-of-order queue was full
    bad_seq: int = 0                #: starts rcv_wnd or more beyond rcv_nxt
    bad_len: int = 0                #: negative or > MAX_SEGMENT_LEN payload length
    bad_syn: int = 0                #: SYN not at the ISN, or SYN with FIN/RST
    bad_fin: int = 0                #: FIN at a different position than the first one
    bad_rst: int = 0                #: RST outside [rcv_nxt, rcv_nxt + rcv_wnd)
    no_ack: int = 0                 #: non-SYN, non-RST segment without ACK
    data_after_fin: int = 0         #: payload bytes at or beyond the FIN (dropped)
    after_close: int = 0            #: segments that arrived after RST/close
    resets: int = 0                 #: RSTs accepted

    def as_dict(self) -> dict[str, int]:
        """Return the counters by name."""
        return asdict(self)


@dataclass(frozen=True, slots=True)
class IngestResult:
    """What one ingest produced.

    Attributes:
        pieces: in-order pieces appended to the socket's receive queue by this call (already
            queued; returned so the caller can wake readers or trace; the arrays may alias
            the caller's input arrays).  Their handles are released later by
            :meth:`RxQueue.consume`, never by the caller.
        freed: handles the caller must free now (see the module's ownership contract).
    """

    pieces: Pieces
    freed: NDArray[np.int64]


class TcpReceiver:
    """Receive side of one TCP connection: reassembly into an :class:`RxQueue`.

    Created from the connection's SYN (the :class:`SocketTable` does that), in SYN_RECV with
    ``rcv_nxt = isn + 1``.  Not thread-safe; one owner (the driver's NAPI context).
    """

    def __init__(self, isn: int, *, key: bytes | None = None,
                 ooo_limit: int = DEFAULT_OOO_LIMIT, rcv_wnd: int = DEFAULT_RCV_WND) -> None:
        """Start a connection whose SYN carried sequence number ``isn``.

        Args:
            isn: the peer's initial sequence number (u32).
            key: the flow key, if the socket is in a table.
            ooo_limit: most segments held out of order (>= 1).
            rcv_wnd: how far beyond ``rcv_nxt`` a segment may start (1 .. 2**31).

        Raises:
            Misuse: an argument is out of range.
        """
        if not 0 <= isn <= _SEQ_MASK:
            raise Misuse(f"isn {isn} is not a u32")
        if ooo_limit < 1:
            raise Misuse(f"ooo_limit must be >= 1, got {ooo_limit}")
        if not 1 <= rcv_wnd <= _SEQ_HALF:
            raise Misuse(f"rcv_wnd must be in 1..2**31, got {rcv_wnd}")
        self.key = key
        self.isn = isn
        self.ooo_limit = ooo_limit
        self.rcv_wnd = rcv_wnd
        self.state = TcpState.SYN_RECV
        self.stats = TcpStats()
        self.rxq = RxQueue()
        self.error: int | None = None   # positive errno (sk_err), e.g. ECONNRESET
        self.fin_reached = False        # every byte up to the FIN arrived (SOCK_DONE)
        self.was_established = False    # reached ESTABLISHED at least once
        self._rcv_shutdown = False      # RCV_SHUTDOWN set by an accepted RST (tcp_done)
        self.listener: Listener | None = None  # set by the table until accepted
        self.napi_id = 0                # NAPI id of the queue the last skb came from (driver)
        self._isn64 = isn
        self._rcv_nxt = isn + 1          # unwrapped 64-bit stream position
        self._fin_seq: int | None = None  # unwrapped position of the FIN, once seen
        # Out-of-order queue: disjoint ranges [start, end) sorted by start, in parallel lists;
        # base = unwrapped position of payload byte 0 of the segment (offset = start - base).
        self._ooo_start: list[int] = []
        self._ooo_end: list[int] = []
        self._ooo_h: list[int] = []
        self._ooo_base: list[int] = []

    def __repr__(self) -> str:
        return (f"<TcpReceiver {self.state!r} rcv_nxt={self.rcv_nxt} queued={self.rxq.nbytes}"
                f" ooo={len(self._ooo_start)}>")

    # ---- status ----------------------------------------------------------------------------

    @property
    def rcv_nxt(self) -> int:
        """Next expected sequence number (u32)."""
        return self._rcv_nxt & _SEQ_MASK

    @property
    def fin_seq(self) -> int | None:
        """Sequence number (u32) of the FIN, once a FIN was seen (possibly out of order)."""
        return None if self._fin_seq is None else self._fin_seq & _SEQ_MASK

    @property
    def ooo_count(self) -> int:
        """Segments held in the out-of-order queue."""
        return len(self._ooo_start)

    @property
    def ooo_bytes(self) -> int:
        """Bytes held in the out-of-order queue."""
        return sum(self._ooo_end) - sum(self._ooo_start)

    @property
    def at_eof(self) -> bool:
        """True when the FIN was reached and every queued byte has been consumed."""
        return self.fin_reached and self.rxq.nbytes == 0

    def end_status(self) -> int | None:
        """Return what a read that finds the receive queue empty reports, in Linux's order.

        Returns:
            ``0`` after the FIN was reached (EOF); ``-errno`` while a socket error is pending
            (``-ECONNRESET`` after a RST); ``0`` once the error has been taken; ``-ENOTCONN``
            after a local close; ``None`` when the reader must wait for more data.  Data still
            queued is always read first: callers check :attr:`RxQueue.nbytes` before this.
        """
        if self.fin_reached:
            return 0
        if self.error is not None:
            return -self.error
        if self._rcv_shutdown:
            return 0
        if self.state is TcpState.CLOSED:
            return -errno.ENOTCONN
        return None

    def shutdown_read(self) -> None:
        """``shutdown(SHUT_RD)``: reads return what is queued, then 0 (RCV_SHUTDOWN)."""
        self._rcv_shutdown = True

    def take_error(self) -> int | None:
        """Return and clear the pending socket error (``sock_error``: reported once)."""
        err, self.error = self.error, None
        return err

    def held_handles(self) -> NDArray[np.int64]:
        """Handles this connection owns now (receive queue and out-of-order queue)."""
        return np.concatenate((self.rxq.handles(), _i64(self._ooo_h)))

    # ---- ingest ----------------------------------------------------------------------------

    def ingest(self, seqs: ArrayLike, lens: ArrayLike, flags: ArrayLike,
               handles: ArrayLike) -> IngestResult:
        """Take a batch of this connection's segments, in arrival order.

        Args:
            seqs: sequence numbers (u32; any integer dtype, taken mod 2**32).
            lens: payload lengths in bytes.
            flags: TCP flag bytes (:data:`SYN`, :data:`FIN`, :data:`RST`, :data:`ACK`, ...).
            handles: int64 skb handles, unique among live handles.

        Returns:
            The pieces appended to :attr:`rxq` and the handles to free now.  Every handle
            passed in is, after this call, either in ``freed`` (now or in a later call), or
            queued (released by :meth:`RxQueue.consume` or :meth:`close`).

        Raises:
            Misuse: the arrays are not one-dimensional and equally long.
        """
        s = np.asarray(seqs)
        ln = np.asarray(lens)
        f = np.asarray(flags)
        h = np.asarray(handles)
        n = len(h)
        if not (s.ndim == ln.ndim == f.ndim == h.ndim == 1
                and len(s) == len(ln) == len(f) == n):
            raise Misuse("seqs, lens, flags and handles must be 1-D arrays of equal length")
        if n == 0:
            return IngestResult(Pieces.empty(), _EMPTY_I64)
        self.stats.segs += n
        s = s.astype(np.uint32, copy=False)  # mod 2**32 for wider integer types
        ln = ln.astype(np.int64, copy=False)
        h = h.astype(np.int64, copy=False)
        if ((self.state is TcpState.ESTABLISHED or self.state is TcpState.SYN_RECV)
                and self._fin_seq is None
                and int(s[0]) == (self._rcv_nxt & _SEQ_MASK)
                and bool(((f & _CTRL) == ACK).all())
                and (n == 1 or bool((s[1:] == s[:-1] + ln[:-1].astype(np.uint32)).all()))
                and not bool((ln >> _LEN_BITS).any())):  # 0 <= len < 2**_LEN_BITS
            return self._fast(ln, h)
        self.stats.slow_batches += 1
        dh: list[int] = []
        doff: list[int] = []
        dlen: list[int] = []
        freed: list[int] = []
        for seq, length, flg, hd in zip(s.tolist(), ln.tolist(), f.tolist(), h.tolist(),
                                        strict=True):
            self._segment(seq, length, flg, hd, dh, doff, dlen, freed)
        pieces = Pieces(_i64(dh), _i64(doff), _i64(dlen))
        self.rxq.append(pieces)
        self.stats.bytes_delivered += sum(dlen)
        return IngestResult(pieces, _i64(freed))

    def _fast(self, ln: NDArray[np.int64], h: NDArray[np.int64]) -> IngestResult:
        """Accept a batch known to be exactly in order from rcv_nxt (vectorised)."""
        st = self.stats
        st.fast_batches += 1
        self.state = TcpState.ESTABLISHED  # every segment carries ACK
        self.was_established = True
        total = int(ln.sum())
        self._rcv_nxt += total
        nz = ln > 0
        if bool(nz.all()):
            pieces = Pieces(h, np.zeros(len(h), dtype=np.int64), ln)
            freed = _EMPTY_I64
        else:
            freed = h[~nz]
            hk = h[nz]
            pieces = Pieces(hk, np.zeros(len(hk), dtype=np.int64), ln[nz])
        self.rxq.append(pieces)
        st.bytes_delivered += total
        if self._ooo_start and self._ooo_start[0] <= self._rcv_nxt:
            dh: list[int] = []
            doff: list[int] = []
            dlen: list[int] = []
            fl: list[int] = []
            self._drain_ooo(dh, doff, dlen, fl)
            more = Pieces(_i64(dh), _i64(doff), _i64(dlen))
            self.rxq.append(more)
            st.bytes_delivered += sum(dlen)
            pieces = Pieces(*(np.concatenate((a, b)) for a, b in zip(pieces, more, strict=True)))
            freed = np.concatenate((freed, _i64(fl)))
        return IngestResult(pieces, freed)

    def _segment(self, seq: int, length: int, flg: int, hd: int, dh: list[int],
                 doff: list[int], dlen: list[int], freed: list[int]) -> None:
        """Handle one segment on the slow path (appends to the output lists)."""
        st = self.stats
        if self.state is TcpState.CLOSED:
            st.after_close += 1
            freed.append(hd)
            return
        if length < 0 or length > MAX_SEGMENT_LEN:
            st.bad_len += 1
            freed.append(hd)
            return
        d = (seq - self._rcv_nxt) & _SEQ_MASK
        if d >= _SEQ_HALF:
            d -= SEQ_MOD
        start = self._rcv_nxt + d  # unwrapped position of seq
        freed_before = len(freed)
        freed.append(hd)  # assume dropped; popped below if the segment contributes
        if flg & RST:
            if 0 <= d < self.rcv_wnd:
                self._reset(freed)
            else:
                st.bad_rst += 1
            return
        if flg & SYN:
            if start != self._isn64 or flg & FIN:
                st.bad_syn += 1
                return
            start += 1  # the SYN occupies the ISN; payload follows it
        elif not flg & ACK:
            st.no_ack += 1
            return
        if start - self._rcv_nxt >= self.rcv_wnd:
            st.bad_seq += 1
            return
        if flg & ACK and self.state is TcpState.SYN_RECV:
            self.state = TcpState.ESTABLISHED
            self.was_established = True
        a, b = start, start + length
        if flg & FIN:
            self._note_fin(b, freed)
        fin = self._fin_seq
        if fin is not None and b > fin:
            keep = max(a, fin)
            st.data_after_fin += b - keep
            b = keep
        contributed = False
        if a < b:
            nxt = self._rcv_nxt
            if a < nxt:
                old = min(b, nxt) - a
                if a + old >= b:
                    st.dup_segs += 1
                    st.dup_bytes += b - a
                    b = a
                else:
                    st.overlap_trimmed_bytes += old
                    a = nxt
            if a < b:
                if a == nxt:
                    dh.append(hd)
                    doff.append(a - start)
                    dlen.append(b - a)
                    self._rcv_nxt = b
                    contributed = True
                    self._drain_ooo(dh, doff, dlen, freed)
                else:
                    contributed = self._hold(a, b, hd, start, freed)
        if contributed:
            # the handle now lives in a queue: take back the provisional release
            if freed[freed_before] != hd:
                raise InvariantBroken("provisional release of a segment handle lost")
            del freed[freed_before]
        self._check_fin()

    def _note_fin(self, fin_at: int, freed: list[int]) -> None:
        st = self.stats
        if self._fin_seq is None:
            if fin_at < self._rcv_nxt:
                st.bad_fin += 1  # bytes beyond it were already delivered in order
                return
            self._fin_seq = fin_at
            self._trim_ooo_after(fin_at, freed)
        elif fin_at != self._fin_seq:
            st.bad_fin += 1

    def _trim_ooo_after(self, fin: int, freed: list[int]) -> None:
        """Drop out-of-order bytes at or beyond the FIN."""
        starts, ends = self._ooo_start, self._ooo_end
        while starts and ends[-1] > fin:
            if starts[-1] >= fin:
                self.stats.data_after_fin += ends[-1] - starts[-1]
                freed.append(self._ooo_h[-1])
                for lst in (starts, ends, self._ooo_h, self._ooo_base):
                    lst.pop()
            else:
                self.stats.data_after_fin += ends[-1] - fin
                ends[-1] = fin

    def _check_fin(self) -> None:
        if (self._fin_seq is not None and not self.fin_reached
                and self._rcv_nxt == self._fin_seq):
            self._rcv_nxt += 1  # the FIN consumes one sequence number
            self.fin_reached = True
            if self.state is not TcpState.CLOSED:
                self.state = TcpState.CLOSE_WAIT

    def _drain_ooo(self, dh: list[int], doff: list[int], dlen: list[int],
                   freed: list[int]) -> None:
        """Deliver held ranges that rcv_nxt has reached; free those it overtook."""
        starts, ends, hs, bases = self._ooo_start, self._ooo_end, self._ooo_h, self._ooo_base
        k = 0
        nxt = self._rcv_nxt
        st = self.stats
        while k < len(starts) and starts[k] <= nxt:
            s, e = starts[k], ends[k]
            if e <= nxt:
                st.overlap_trimmed_bytes += e - s
                freed.append(hs[k])
            else:
                if s < nxt:
                    st.overlap_trimmed_bytes += nxt - s
                    s = nxt
                dh.append(hs[k])
                doff.append(s - bases[k])
                dlen.append(e - s)
                nxt = e
            k += 1
        if k:
            for lst in (starts, ends, hs, bases):
                del lst[:k]
            self._rcv_nxt = nxt

    def _hold(self, a: int, b: int, hd: int, base: int, freed: list[int]) -> bool:
        """Insert [a, b) of segment ``hd`` into the out-of-order queue.

        Returns:
            True if (part of) the segment is now held; False if it was dropped.
        """
        st = self.stats
        starts, ends, hs, bases = self._ooo_start, self._ooo_end, self._ooo_h, self._ooo_base
        i = bisect.bisect_right(starts, a)  # starts[:i] <= a < starts[i:]
        if i and ends[i - 1] > a:  # head overlaps the range before
            old = min(ends[i - 1], b) - a
            if a + old >= b:
                st.dup_segs += 1
                st.dup_bytes += b - a
                return False
            st.overlap_trimmed_bytes += old
            a = ends[i - 1]
        j = i
        while j < len(starts) and ends[j] <= b:
            j += 1  # ranges i..j-1 lie inside [a, b)
        if j < len(starts) and starts[j] <= a:  # inside the range after (adjacent at a)
            st.dup_segs += 1
            st.dup_bytes += b - a
            return False
        if j > i:  # the new segment covers them: drop the old ones (Linux does the same)
            st.overlap_trimmed_bytes += sum(ends[i:j]) - sum(starts[i:j])
            freed.extend(hs[i:j])
            for lst in (starts, ends, hs, bases):
                del lst[i:j]
        if len(starts) >= self.ooo_limit:
            st.ooo_dropped += 1
            if i >= len(starts):  # the new range is the farthest: drop it
                return False
            freed.append(hs[-1])  # else make room by dropping the farthest held range
            for lst in (starts, ends, hs, bases):
                lst.pop()
        if i < len(starts) and starts[i] < b:  # tail overlaps the range after
            st.overlap_trimmed_bytes += b - starts[i]
            b = starts[i]
        starts.insert(i, a)
        ends.insert(i, b)
        hs.insert(i, hd)
        bases.insert(i, base)
        st.ooo_segs += 1
        return True

    def _reset(self, freed: list[int]) -> None:
        """Apply an accepted RST: purge the out-of-order queue, close, set the error."""
        self.stats.resets += 1
        freed.extend(self._ooo_h)
        for lst in (self._ooo_start, self._ooo_end, self._ooo_h, self._ooo_base):
            lst.clear()
        if not self.fin_reached:
            self.error = errno.ECONNRESET
        self._rcv_shutdown = True
        self.state = TcpState.CLOSED

    def close(self) -> NDArray[np.int64]:
        """Close locally: return every handle still held; later segments are freed.

        Returns:
            The handles of the receive queue and the out-of-order queue (caller frees them).
        """
        out = np.concatenate((self.rxq.drain(), _i64(self._ooo_h)))
        for lst in (self._ooo_start, self._ooo_end, self._ooo_h, self._ooo_base):
            lst.clear()
        self.state = TcpState.CLOSED
        return out


# --------------------------------------------------------------------------------------------
# Listeners and the socket table
# --------------------------------------------------------------------------------------------

class Listener:
    """A listening socket: pending connections and the accept queue."""

    def __init__(self, addr: bytes | None, port: int, backlog: int) -> None:
        """Create a listener on ``addr`` (16 bytes, or None for any address) and ``port``."""
        self.addr = addr
        self.port = port
        self.backlog = backlog
        self.closed = False
        #: the SO_REUSEPORT group this listener belongs to (None without SO_REUSEPORT)
        self.reuse: ReuseportGroup[Listener] | None = None
        self._pending: dict[bytes, TcpReceiver] = {}  # SYN_RECV, keyed by flow
        self._ready: deque[TcpReceiver] = deque()     # established, not yet accepted

    def __repr__(self) -> str:
        where = "*" if self.addr is None else str(_ip_object(self.addr))
        return (f"<Listener {where}:{self.port} backlog={self.backlog}"
                f" pending={len(self._pending)} ready={len(self._ready)}>")

    @property
    def accept_queue_len(self) -> int:
        """Connections ready to be accepted."""
        return len(self._ready)

    @property
    def pending_len(self) -> int:
        """Connections still in SYN_RECV."""
        return len(self._pending)

    def accept(self) -> TcpReceiver | None:
        """Pop the oldest ready connection, or return None (the caller waits: -EAGAIN)."""
        if not self._ready:
            return None
        sock = self._ready.popleft()
        sock.listener = None
        return sock


@dataclass(slots=True)
class TableStats:
    """Socket-table counters."""

    no_socket: int = 0        #: segments for no connection and no listener (Linux: RST)
    listen_overflow: int = 0  #: SYNs dropped because the backlog was full
    bad_syn: int = 0          #: SYN+ACK/FIN/RST reaching a listener
    connections: int = 0      #: connections created from a SYN
    reuseport_by_prog: int = 0       #: SYNs a reuseport group's BPF program placed
    reuseport_prog_fallback: int = 0  #: ... whose program returned an index past the group
    reuseport_by_hash: int = 0       #: SYNs a group without a program placed by hash

    def as_dict(self) -> dict[str, int]:
        """Return the counters by name."""
        return asdict(self)


@dataclass(slots=True)
class BatchResult:
    """What a table ingest produced.

    Attributes:
        freed: handles the caller frees now (same contract as :class:`IngestResult`).
        sockets: connections whose receive queue or end status may have changed (wake their
            readers); each appears once per call.
        listeners: listeners whose accept queue grew (wake their acceptors).
    """

    freed: NDArray[np.int64]
    sockets: list[TcpReceiver]
    listeners: list[Listener]


class SocketTable:
    """Listeners by (address, port) and connections by 4-tuple flow key."""

    def __init__(self, *, ooo_limit: int = DEFAULT_OOO_LIMIT,
                 rcv_wnd: int = DEFAULT_RCV_WND) -> None:
        """Create an empty table; new connections get ``ooo_limit`` and ``rcv_wnd``."""
        self.ooo_limit = ooo_limit
        self.rcv_wnd = rcv_wnd
        self.stats = TableStats()
        self._listeners: dict[tuple[bytes | None, int], Listener] = {}
        #: SO_REUSEPORT listeners: one group per (address, port), Linux's sock_reuseport
        self._reuse: dict[tuple[bytes | None, int], ReuseportGroup[Listener]] = {}
        self._conns: dict[bytes, TcpReceiver] = {}

    def __len__(self) -> int:
        return len(self._conns)

    # ---- control plane ---------------------------------------------------------------------

    def listen(self, port: int,
               addr: str | bytes | int | ipaddress.IPv4Address | ipaddress.IPv6Address | None
               = None, backlog: int = DEFAULT_BACKLOG, *, reuseport: bool = False,
               uid: int | None = None, prog: Program | None = None) -> Listener:
        """Bind and listen (``socket`` + ``bind`` + ``listen``).

        Args:
            port: local port, 1..65535.
            addr: local address; ``None``, ``0.0.0.0`` or ``::`` listen on every address
                (dual-stack).
            backlog: most connections not yet accepted (>= 1).
            reuseport: SO_REUSEPORT: join (at the end) the group of listeners on the same
                address and port owned by ``uid``, or start one.
            prog: a program attached before listen; it becomes the group's only when this
                listener starts the group (Linux drops a joining socket's own group).

        Raises:
            Misuse: bad port/backlog (EINVAL) or the address and port are taken (EADDRINUSE).
        """
        if not 1 <= port <= 0xFFFF:
            raise Misuse(f"bad port {port}")
        if backlog < 1:
            raise Misuse(f"bad backlog {backlog}")
        raw = None if addr is None else ip_bytes(addr)
        if raw in (bytes(16), _V4_MAPPED_PREFIX + bytes(4)):
            raw = None
        group = self._reuse.get((raw, port))
        if (raw, port) in self._listeners or (group is not None and (
                not reuseport or group.uid != uid)):
            raise Misuse(f"port {port} already in use", errno=errno.EADDRINUSE)
        lst = Listener(raw, port, backlog)
        if reuseport:
            if group is None:
                group = self._reuse[(raw, port)] = ReuseportGroup(uid, prog=prog)
            group.add(lst)
            lst.reuse = group
        else:
            self._listeners[(raw, port)] = lst
        return lst

    def lookup(self, key: bytes) -> TcpReceiver | None:
        """Return the connection of a flow key, if any."""
        return self._conns.get(key)

    def find_listener(self, key: bytes, skb: SkbInfo | None = None) -> Listener | None:
        """Return the listener a SYN with this flow key reaches (exact address first).

        A reuseport group picks one member per SYN (:meth:`ReuseportGroup.select`); ``skb``
        is what its program may read (the SYN's queue, CPU, payload length...)."""
        port = int.from_bytes(key[34:36], "big")
        for where in ((key[18:34], port), (None, port)):
            lst = self._listeners.get(where)
            if lst is not None:
                return lst
            group = self._reuse.get(where)
            if group is not None:
                info = skb if skb is not None else SkbInfo()
                proto = ETH_P_IP if key[18:30] == _V4_MAPPED_PREFIX else ETH_P_IPV6
                if info.protocol != proto:
                    info = dataclasses.replace(info, protocol=proto)
                lst, how = group.select(flow_hash(key), info)
                setattr(self.stats, f"reuseport_{how}",
                        getattr(self.stats, f"reuseport_{how}") + 1)
                return lst
        return None

    def reuseport_group(self, lst: Listener) -> ReuseportGroup[Listener] | None:
        """The SO_REUSEPORT group of a listener (None without SO_REUSEPORT)."""
        return lst.reuse

    def close(self, sock: TcpReceiver) -> NDArray[np.int64]:
        """Close a connection (accepted or not); return the handles it still held."""
        if sock.key is not None and self._conns.get(sock.key) is sock:
            del self._conns[sock.key]
        lst = sock.listener
        if lst is not None:
            if sock.key is not None and lst._pending.get(sock.key) is sock:
                del lst._pending[sock.key]
            if sock in lst._ready:
                lst._ready.remove(sock)
            sock.listener = None
        return sock.close()

    def unhash(self, sock: TcpReceiver) -> None:
        """Take a connection that died (``tcp_done``: given up by the transmit side) out of
        the lookup; the app still holds it (its queued data stays readable) until close."""
        if sock.key is not None and self._conns.get(sock.key) is sock:
            del self._conns[sock.key]

    def close_listener(self, lst: Listener) -> NDArray[np.int64]:
        """Stop listening; close connections never accepted; return the handles they held."""
        if self._listeners.get((lst.addr, lst.port)) is lst:
            del self._listeners[(lst.addr, lst.port)]
        if lst.reuse is not None:  # reuseport_detach_sock: the last member takes its index
            if lst.reuse.detach(lst) and self._reuse.get((lst.addr, lst.port)) is lst.reuse:
                del self._reuse[(lst.addr, lst.port)]
            lst.reuse = None
        lst.closed = True
        out = [self.close(s) for s in [*lst._pending.values(), *lst._ready]]
        return np.concatenate(out) if out else _EMPTY_I64

    # ---- data plane ------------------------------------------------------------------------

    def ingest_batch(self, keys: NDArray[np.void], seqs: ArrayLike, lens: ArrayLike,
                     flags: ArrayLike, handles: ArrayLike,
                     rx: SkbInfo | None = None) -> BatchResult:
        """Ingest a NAPI batch of several flows: group by flow, one ingest per flow.

        Args:
            keys: flow keys (``V36``, see :func:`flow_keys`), one per segment.
            seqs, lens, flags, handles: as in :meth:`TcpReceiver.ingest`.
            rx: where the batch was received (queue, ifindex, CPU), for a reuseport
                group's program; read only for a SYN that reaches a group.

        Returns:
            The merged result; per flow, segments are processed in arrival order.
        """
        s, ln, f, h = (np.asarray(a) for a in (seqs, lens, flags, handles))
        if keys.dtype.kind != "V" or keys.dtype.itemsize != FLOW_KEY_LEN:
            raise Misuse(f"keys must be V{FLOW_KEY_LEN} flow keys, got {keys.dtype}")
        if not len(keys) == len(s) == len(ln) == len(f) == len(h):
            raise Misuse("keys, seqs, lens, flags and handles must be equally long")
        order, bounds = group_by_flow(keys)
        if len(bounds) == 2:
            return self.ingest_flow(keys[0].tobytes(), s, ln, f, h, rx)
        freed: list[NDArray[np.int64]] = []
        socks: dict[int, TcpReceiver] = {}
        lsts: dict[int, Listener] = {}
        for g in range(len(bounds) - 1):
            idx = order[bounds[g]:bounds[g + 1]]
            r = self.ingest_flow(keys[idx[0]].tobytes(), s[idx], ln[idx], f[idx], h[idx], rx)
            freed.append(r.freed)
            socks.update((id(x), x) for x in r.sockets)
            lsts.update((id(x), x) for x in r.listeners)
        return BatchResult(np.concatenate(freed), list(socks.values()), list(lsts.values()))

    def ingest_flow(self, key: bytes, seqs: ArrayLike, lens: ArrayLike, flags: ArrayLike,
                    handles: ArrayLike, rx: SkbInfo | None = None) -> BatchResult:
        """Ingest segments of one flow (in arrival order).

        An existing connection takes them all.  Otherwise the first acceptable SYN to a
        listener creates a connection (SYN_RECV, counted against the backlog) that takes the
        SYN and everything after it; segments before it count as ``no_socket``.
        """
        s = np.asarray(seqs)
        ln = np.asarray(lens)
        f = np.asarray(flags)
        h = np.asarray(handles).astype(np.int64, copy=False)
        sock = self._conns.get(key)
        if sock is not None:
            return self._feed(sock, s, ln, f, h, [])
        pre: list[NDArray[np.int64]] = []
        pos = 0
        for i in np.flatnonzero(f & SYN).tolist():
            syn = None if rx is None else dataclasses.replace(rx, length=int(ln[i]))
            lst = self.find_listener(key, syn)
            if lst is None:
                break
            self.stats.no_socket += i - pos
            pre.append(h[pos:i])
            pos = i + 1
            flg = int(f[i])
            if flg & (ACK | FIN | RST):
                self.stats.bad_syn += 1
                pre.append(h[i:i + 1])
                continue
            if len(lst._pending) + len(lst._ready) >= lst.backlog:
                self.stats.listen_overflow += 1
                pre.append(h[i:i + 1])
                continue
            sock = TcpReceiver(int(s[i]) & _SEQ_MASK, key=key, ooo_limit=self.ooo_limit,
                               rcv_wnd=self.rcv_wnd)
            sock.listener = lst
            lst._pending[key] = sock
            self._conns[key] = sock
            self.stats.connections += 1
            return self._feed(sock, s[i:], ln[i:], f[i:], h[i:], pre)
        self.stats.no_socket += len(h) - pos
        pre.append(h[pos:])
        return BatchResult(np.concatenate(pre), [], [])

    def _feed(self, sock: TcpReceiver, s: NDArray[np.generic], ln: NDArray[np.generic],
              f: NDArray[np.generic], h: NDArray[np.int64],
              pre: list[NDArray[np.int64]]) -> BatchResult:
        was_pending = sock.state is TcpState.SYN_RECV
        res = sock.ingest(s, ln, f, h)
        freed = [*pre, res.freed]
        listeners: list[Listener] = []
        lst = sock.listener
        if was_pending and lst is not None and sock.key is not None:
            if sock.was_established:
                del lst._pending[sock.key]
                lst._ready.append(sock)
                listeners.append(lst)
            elif sock.state is TcpState.CLOSED:  # reset before the handshake completed
                freed.append(self.close(sock))
                return BatchResult(np.concatenate(freed), [], [])
        if sock.state is TcpState.CLOSED and sock.key is not None \
                and self._conns.get(sock.key) is sock:
            del self._conns[sock.key]  # unhashed: the app still holds it until close()
        return BatchResult(np.concatenate(freed), [sock], listeners)
