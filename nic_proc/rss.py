"""Receive-side scaling: the Toeplitz hash and RSS contexts, as ``ethtool -X`` configures them.

Pure logic, no I/O: the NIC process owns one :class:`RssConfig` (through
:class:`nic_proc.ntuple.Steering`) and asks it, a batch at a time, which queue each flow
goes to.

**Toeplitz hash** (``reference/uapi-layouts.md`` §9).  The input is in network byte order:
source address, destination address, then optionally source port and destination port
(IPv4: 8 or 12 bytes, IPv6: 32 or 36 bytes).  The key is 40 bytes.  For every input bit
``i`` (MSB of byte 0 first) that is 1, the 32-bit window of the key starting at key bit
``i`` is XORed into the result.  Because the window depends only on the bit's absolute
position, the contribution of a whole input byte depends only on its position and its
value, so :func:`toeplitz_table` precomputes a ``(n_bytes, 256)`` u32 table and a batch of
inputs hashes with one gather and one XOR-reduce (:meth:`Toeplitz.hash_bytes`).
:func:`toeplitz_hash_bits` is the bit-by-bit definition, kept as the independent reference
the tests compare against.

**Flows** (:class:`Flows`) are a batch of TCP 4-tuples as numpy arrays.  Addresses are
``u8 [N, 16]`` in network order; an IPv4 address occupies bytes 0-3 and bytes 4-15 are zero;
``is_v6`` tells the families apart, so one batch may mix them.

**RSS contexts** (:class:`RssContext`).  Context 0 always exists; ``ethtool -X DEV context
new`` creates more (ids 1, 2, ... lowest free first, as the kernel's id allocator does).
Each has a key, an indirection table (default 128 entries) and a hash function (only
``toeplitz`` is implemented).  The queue of a flow is ``indir[hash % len(indir)]``.  Table
fills follow ethtool (§9): ``equal N`` -> ``start + i % N``, ``weight W...`` -> ethtool's
weight walk (:func:`fill_weight`), ``default`` -> ``i % n_rx_queues`` and the table then
follows later channel-count changes (the kernel's "not user-configured" state).  A table
entry must be below the number of RX queues (``EINVAL``).

Departures: context 0 starts with the Microsoft verification key rather than random
bytes (Linux fills ``netdev_rss_key`` randomly at boot); a new context copies the key of
context 0 unless ``hkey`` is given (drivers differ).  Errors are :class:`SteeringError`
(a :class:`shared.errors.Misuse`) carrying the errno Linux would return.
"""

from __future__ import annotations

import copy
import errno
import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import numpy.typing as npt

from shared.errors import Misuse

__all__ = [
    "DEFAULT_INDIR_SIZE",
    "DEFAULT_RSS_KEY",
    "HASH_FUNCTIONS",
    "MAX_RSS_CONTEXTS",
    "RSS_KEY_SIZE",
    "Flows",
    "RssConfig",
    "RssContext",
    "SteeringError",
    "Toeplitz",
    "addr_bytes",
    "fill_default",
    "fill_equal",
    "fill_weight",
    "parse_key",
    "rss_input",
    "toeplitz_hash",
    "toeplitz_hash_bits",
    "toeplitz_table",
]

#: The key of the Microsoft RSS verification suite (also the 82599 datasheet's and DPDK's).
DEFAULT_RSS_KEY = bytes.fromhex(
    "6d5a56da255b0ec24167253d43a38fb0d0ca2bcbae7b30b477cb2da38030f20c6a42b73bbeac01fa"
)
RSS_KEY_SIZE = 40
DEFAULT_INDIR_SIZE = 128
#: Extra contexts a device offers besides context 0 (ids 1 .. MAX_RSS_CONTEXTS).
MAX_RSS_CONTEXTS = 32
#: The kernel's list of RSS hash function names (ETH_SS_RSS_HASH_FUNCS), in bit order.
HASH_FUNCTIONS = ("toeplitz", "xor", "crc32")
#: Hash functions this NIC implements.
SUPPORTED_HASH_FUNCTIONS = ("toeplitz",)

U8Array = npt.NDArray[np.uint8]
U32Array = npt.NDArray[np.uint32]
I32Array = npt.NDArray[np.int32]


class SteeringError(Misuse):
    """A steering request Linux would refuse; ``errno`` is what the syscall would return."""


# --------------------------------------------------------------------------------------------
# Toeplitz


def _key_int(key: bytes) -> int:
    return int.from_bytes(key, "big")


def toeplitz_table(key: bytes, n_bytes: int | None = None) -> U32Array:
    """Per-position, per-byte-value XOR contributions: ``table[p, v]`` is a u32.

    The hash of input ``x`` is the XOR over ``p`` of ``table[p, x[p]]``.  ``n_bytes``
    defaults to the longest input the key supports (``len(key) - 4``; 36 for 40 bytes).
    """
    max_bytes = len(key) - 4
    if n_bytes is None:
        n_bytes = max_bytes
    if n_bytes < 0 or n_bytes > max_bytes:
        raise SteeringError(f"a {len(key)}-byte key hashes at most {max_bytes} input bytes")
    k = _key_int(key)
    nbits = len(key) * 8
    # windows[p, b]: key bits (8p+b) .. (8p+b+31), for input bit b of byte p (b = 0 is MSB).
    windows = np.array(
        [[(k >> (nbits - 32 - (8 * p + b))) & 0xFFFFFFFF for b in range(8)]
         for p in range(n_bytes)],
        dtype=np.uint32,
    ).reshape(n_bytes, 8)
    values = np.arange(256, dtype=np.uint32)
    bits = ((values[:, None] >> (7 - np.arange(8, dtype=np.uint32))) & 1).astype(bool)
    # table[p, v] = XOR of windows[p, b] over the set bits b of v.
    contrib = np.where(bits[None, :, :], windows[:, None, :], np.uint32(0))
    return np.bitwise_xor.reduce(contrib, axis=2).astype(np.uint32)


def toeplitz_hash_bits(data: bytes, key: bytes = DEFAULT_RSS_KEY) -> int:
    """The Toeplitz hash by its definition, one bit at a time (slow; the reference)."""
    if len(data) + 4 > len(key):
        raise SteeringError(f"a {len(key)}-byte key hashes at most {len(key) - 4} input bytes")
    k = _key_int(key)
    nbits = len(key) * 8
    result = 0
    for i in range(len(data) * 8):
        if (data[i // 8] >> (7 - i % 8)) & 1:
            result ^= (k >> (nbits - 32 - i)) & 0xFFFFFFFF
    return result


class Toeplitz:
    """A vectorised Toeplitz hasher for one key (the table is built once)."""

    def __init__(self, key: bytes = DEFAULT_RSS_KEY) -> None:
        """Precompute the contribution table for ``key``."""
        self.key = bytes(key)
        self.table = toeplitz_table(self.key)

    def hash_bytes(self, data: npt.ArrayLike) -> U32Array:
        """Hash each row of ``data`` (``u8 [N, L]``, network order) to a u32."""
        arr = np.asarray(data, dtype=np.uint8)
        if arr.ndim != 2:
            raise ValueError("hash_bytes wants a 2-D u8 array [N, L]")
        n, length = arr.shape
        if length > self.table.shape[0]:
            raise SteeringError(
                f"a {len(self.key)}-byte key hashes at most {self.table.shape[0]} input bytes")
        if n == 0 or length == 0:
            return np.zeros(n, dtype=np.uint32)
        # One gather per byte position, XOR-accumulated: cheaper than a 2-D gather + reduce.
        out = self.table[0].take(arr[:, 0])
        for pos in range(1, length):
            out ^= self.table[pos].take(arr[:, pos])
        return out

    def hash_v4(self, src: npt.ArrayLike, dst: npt.ArrayLike, sport: npt.ArrayLike | None = None,
                dport: npt.ArrayLike | None = None) -> U32Array:
        """Hash IPv4 flows; addresses as ``u8 [N, 4]`` or integers, ports as u16 (optional)."""
        return self.hash_bytes(_pack(_addr_array(src, 4), _addr_array(dst, 4), sport, dport))

    def hash_v6(self, src: npt.ArrayLike, dst: npt.ArrayLike, sport: npt.ArrayLike | None = None,
                dport: npt.ArrayLike | None = None) -> U32Array:
        """Hash IPv6 flows; addresses as ``u8 [N, 16]``, ports as u16 (optional)."""
        return self.hash_bytes(_pack(_addr_array(src, 16), _addr_array(dst, 16), sport, dport))

    def hash_flows(self, flows: Flows, ports: bool = True) -> U32Array:
        """Hash a (possibly mixed-family) batch: 4-tuple, or addresses only if not ``ports``."""
        v6 = flows.is_v6
        n_v6 = int(np.count_nonzero(v6))
        if n_v6 in (0, len(flows)):  # one family: no gather/scatter needed
            width = 16 if n_v6 else 4
            return self.hash_bytes(_pack(flows.src[:, :width], flows.dst[:, :width],
                                         flows.sport if ports else None,
                                         flows.dport if ports else None))
        out = np.zeros(len(flows), dtype=np.uint32)
        for fam_mask, width in ((~v6, 4), (v6, 16)):
            idx = np.flatnonzero(fam_mask)
            if idx.size == 0:
                continue
            sp = flows.sport[idx] if ports else None
            dp = flows.dport[idx] if ports else None
            out[idx] = self.hash_bytes(
                _pack(flows.src[idx, :width], flows.dst[idx, :width], sp, dp))
        return out


def _pack(src: U8Array, dst: U8Array, sport: npt.ArrayLike | None,
          dport: npt.ArrayLike | None) -> U8Array:
    """Concatenate hash input columns in network order."""
    if (sport is None) != (dport is None):
        raise ValueError("give both ports or neither")
    cols = [src, dst]
    if sport is not None and dport is not None:
        n = src.shape[0]
        for p in (sport, dport):
            port = np.broadcast_to(np.asarray(p, dtype=np.uint16), (n,))
            cols.append(port.astype(">u2").view(np.uint8).reshape(n, 2))
    return np.ascontiguousarray(np.concatenate(cols, axis=1), dtype=np.uint8)


def _addr_array(addr: npt.ArrayLike, width: int) -> U8Array:
    """Addresses as ``u8 [N, width]``: accept that shape, or a 1-D array of integers."""
    arr = np.asarray(addr)
    if arr.ndim == 2:
        if arr.shape[1] != width:
            raise ValueError(f"addresses must be {width} bytes wide, got {arr.shape[1]}")
        return arr.astype(np.uint8, copy=False)
    if arr.ndim == 1 and width == 4:
        return arr.astype(">u4").view(np.uint8).reshape(-1, 4)
    if arr.ndim == 1 and arr.dtype == object:
        return np.array([list(int(a).to_bytes(width, "big")) for a in arr],
                        dtype=np.uint8).reshape(-1, width)
    raise ValueError(f"addresses must be u8 [N, {width}] (or integers for IPv4)")


def addr_bytes(addr: str | int | bytes | ipaddress.IPv4Address | ipaddress.IPv6Address,
               v6: bool | None = None) -> bytes:
    """An address as network-order bytes (4 or 16).  ``v6`` picks the family for ints."""
    if isinstance(addr, bytes):
        if len(addr) not in (4, 16):
            raise ValueError("an address is 4 or 16 bytes")
        return addr
    if isinstance(addr, int):
        return addr.to_bytes(16 if v6 else 4, "big")
    return ipaddress.ip_address(addr).packed


def rss_input(src: str | int | bytes, dst: str | int | bytes, sport: int | None = None,
              dport: int | None = None) -> bytes:
    """The Toeplitz input for one flow: src, dst, then (optionally) both ports, big-endian."""
    s = addr_bytes(src)
    d = addr_bytes(dst, v6=len(s) == 16)
    if len(s) != len(d):
        raise ValueError("source and destination are of different families")
    if (sport is None) != (dport is None):
        raise ValueError("give both ports or neither")
    data = s + d
    if sport is not None and dport is not None:
        data += sport.to_bytes(2, "big") + dport.to_bytes(2, "big")
    return data


def toeplitz_hash(src: str | int | bytes, dst: str | int | bytes, sport: int | None = None,
                  dport: int | None = None, key: bytes = DEFAULT_RSS_KEY) -> int:
    """Scalar convenience: the hash of one flow (IP-only when the ports are omitted)."""
    return toeplitz_hash_bits(rss_input(src, dst, sport, dport), key)


# --------------------------------------------------------------------------------------------
# Flows


@dataclass(frozen=True, eq=False)
class Flows:
    """A batch of TCP flows (4-tuples) as numpy arrays; IPv4 and IPv6 may be mixed.

    ``src``/``dst`` are ``u8 [N, 16]`` network-order addresses (IPv4 in bytes 0-3, the
    rest zero), ``sport``/``dport`` are ``u16 [N]``, ``is_v6`` is ``bool [N]``.
    """

    src: U8Array
    dst: U8Array
    sport: npt.NDArray[np.uint16]
    dport: npt.NDArray[np.uint16]
    is_v6: npt.NDArray[np.bool_]

    def __post_init__(self) -> None:
        """Normalise dtypes and check the shapes agree."""
        n = len(self.is_v6)
        for name in ("src", "dst"):
            a = np.ascontiguousarray(getattr(self, name), dtype=np.uint8)
            if a.shape != (n, 16):
                raise ValueError(f"{name} must be u8 [N, 16], got {a.shape}")
            object.__setattr__(self, name, a)
        for name in ("sport", "dport"):
            a = np.ascontiguousarray(getattr(self, name), dtype=np.uint16)
            if a.shape != (n,):
                raise ValueError(f"{name} must be u16 [N], got {a.shape}")
            object.__setattr__(self, name, a)
        object.__setattr__(self, "is_v6", np.ascontiguousarray(self.is_v6, dtype=bool))

    def __len__(self) -> int:
        """Number of flows."""
        return len(self.is_v6)

    @classmethod
    def v4(cls, src: npt.ArrayLike, dst: npt.ArrayLike, sport: npt.ArrayLike,
           dport: npt.ArrayLike) -> Flows:
        """IPv4 flows from ``u8 [N, 4]`` (or integer) addresses and u16 ports."""
        s = _addr_array(src, 4)
        d = _addr_array(dst, 4)
        n = s.shape[0]
        pad = np.zeros((n, 12), dtype=np.uint8)
        return cls(np.hstack([s, pad]), np.hstack([d, pad]),
                   np.broadcast_to(np.asarray(sport, dtype=np.uint16), (n,)),
                   np.broadcast_to(np.asarray(dport, dtype=np.uint16), (n,)),
                   np.zeros(n, dtype=bool))

    @classmethod
    def v6(cls, src: npt.ArrayLike, dst: npt.ArrayLike, sport: npt.ArrayLike,
           dport: npt.ArrayLike) -> Flows:
        """IPv6 flows from ``u8 [N, 16]`` addresses and u16 ports."""
        s = _addr_array(src, 16)
        d = _addr_array(dst, 16)
        n = s.shape[0]
        return cls(s, d, np.broadcast_to(np.asarray(sport, dtype=np.uint16), (n,)),
                   np.broadcast_to(np.asarray(dport, dtype=np.uint16), (n,)),
                   np.ones(n, dtype=bool))

    @classmethod
    def from_tuples(cls, tuples: Iterable[tuple[str | bytes | int, str | bytes | int, int, int]]
                    ) -> Flows:
        """Flows from ``(src, dst, sport, dport)`` tuples; addresses as text or bytes."""
        rows = list(tuples)
        n = len(rows)
        src = np.zeros((n, 16), dtype=np.uint8)
        dst = np.zeros((n, 16), dtype=np.uint8)
        v6 = np.zeros(n, dtype=bool)
        sport = np.zeros(n, dtype=np.uint16)
        dport = np.zeros(n, dtype=np.uint16)
        for i, (s, d, sp, dp) in enumerate(rows):
            sb = addr_bytes(s)
            db = addr_bytes(d, v6=len(sb) == 16)
            if len(sb) != len(db):
                raise ValueError(f"flow {i}: source and destination are of different families")
            src[i, :len(sb)] = np.frombuffer(sb, dtype=np.uint8)
            dst[i, :len(db)] = np.frombuffer(db, dtype=np.uint8)
            v6[i] = len(sb) == 16
            sport[i] = sp
            dport[i] = dp
        return cls(src, dst, sport, dport, v6)

    @classmethod
    def concat(cls, parts: Sequence[Flows]) -> Flows:
        """Join batches end to end."""
        if not parts:
            return cls.from_tuples([])
        return cls(np.concatenate([p.src for p in parts]), np.concatenate([p.dst for p in parts]),
                   np.concatenate([p.sport for p in parts]),
                   np.concatenate([p.dport for p in parts]),
                   np.concatenate([p.is_v6 for p in parts]))

    def take(self, idx: npt.ArrayLike) -> Flows:
        """The sub-batch at ``idx`` (indices or a boolean mask)."""
        i = np.asarray(idx)
        return Flows(self.src[i], self.dst[i], self.sport[i], self.dport[i], self.is_v6[i])

    @cached_property
    def match_words(self) -> npt.NDArray[np.uint64]:
        """The 4-tuple as five u64 words per flow, ``[5, N]``, for masked rule compares.

        Words 0-1: ``src`` bytes 0-7 and 8-15, words 2-3: ``dst`` likewise (native u64
        views), word 4: ``is_v6 << 32 | sport << 16 | dport``.
        """
        words = np.empty((5, len(self)), dtype=np.uint64)
        words[0:2] = self.src.view(np.uint64).T
        words[2:4] = self.dst.view(np.uint64).T
        words[4] = ((self.is_v6.astype(np.uint64) << np.uint64(32))
                    | (self.sport.astype(np.uint64) << np.uint64(16))
                    | self.dport.astype(np.uint64))
        return words


# --------------------------------------------------------------------------------------------
# Indirection table fills (ethtool's rules, reference §9)


def fill_default(size: int, n_rx_queues: int) -> I32Array:
    """The driver default: ``indir[i] = i % n_rx_queues``."""
    if n_rx_queues < 1:
        raise SteeringError("device has no RX queues", errno.EINVAL)
    return (np.arange(size) % n_rx_queues).astype(np.int32)


def fill_equal(size: int, n: int, start: int = 0) -> I32Array:
    """``equal N``: ``indir[i] = start + i % N`` (N >= 1)."""
    if n < 1:
        raise SteeringError("equal N needs N >= 1", errno.EINVAL)
    if start < 0:
        raise SteeringError("start must not be negative", errno.EINVAL)
    return (start + np.arange(size) % n).astype(np.int32)


def fill_weight(size: int, weights: Sequence[int], start: int = 0) -> I32Array:
    """``weight W0 W1 ...``: ethtool's walk, queue ``start + j`` gets about ``W[j]/ΣW``.

    Errors, worded as ethtool words them: ΣW == 0 -> "At least one weight must be
    non-zero"; ΣW > size -> "Total weight exceeds the size of the indirection table".
    """
    if any(w < 0 for w in weights):
        raise SteeringError("weights must not be negative", errno.EINVAL)
    if start < 0:
        raise SteeringError("start must not be negative", errno.EINVAL)
    total = sum(weights)
    if total == 0:
        raise SteeringError("At least one weight must be non-zero", errno.EINVAL)
    if total > size:
        raise SteeringError("Total weight exceeds the size of the indirection table",
                            errno.EINVAL)
    indir = np.empty(size, dtype=np.int32)
    j = -1
    partial = 0
    for i in range(size):
        while i >= size * partial // total:
            j += 1
            partial += weights[j]
        indir[i] = start + j
    return indir


def parse_key(key: bytes | str) -> bytes:
    """A key given as bytes, plain hex (``6d5a..``) or colon hex (``6d:5a:..``)."""
    if isinstance(key, bytes):
        return key
    try:
        return bytes.fromhex(key.replace(":", ""))
    except ValueError:
        raise SteeringError("Invalid RSS hash key format", errno.EINVAL) from None


# --------------------------------------------------------------------------------------------
# Contexts


@dataclass
class RssContext:
    """One RSS context: key, indirection table, hash function.

    ``user_configured`` is False while the table is the driver default; such a table is
    refilled when the number of RX queues changes, as Linux does for a device whose
    table was never set (``netif_is_rxfh_configured``).
    """

    context_id: int
    key: bytes
    indir: I32Array
    hfunc: str = "toeplitz"
    user_configured: bool = False
    hasher: Toeplitz = field(init=False, repr=False)

    def __post_init__(self) -> None:
        """Build the hasher for the key."""
        self.hasher = Toeplitz(self.key)

    def queues(self, hashes: npt.ArrayLike) -> I32Array:
        """The queue for each hash: ``indir[hash % size]``."""
        h = np.asarray(hashes, dtype=np.uint32)
        return self.indir[h % np.uint32(len(self.indir))]

    def to_dict(self, n_rx_queues: int) -> dict[str, object]:
        """The ``rss-get`` reply shape (see ``launch/ethtool.py``)."""
        return {
            "context": self.context_id,
            "n_rx_rings": n_rx_queues,
            "indir": [int(x) for x in self.indir],
            "hkey": self.key.hex(),
            "hfunc": self.hfunc,
        }


class RssConfig:
    """Context 0 plus the contexts made by ``context new``, and the vectorised lookup."""

    def __init__(self, n_rx_queues: int, indir_size: int = DEFAULT_INDIR_SIZE,
                 key: bytes | str = DEFAULT_RSS_KEY, max_contexts: int = MAX_RSS_CONTEXTS
                 ) -> None:
        """A device with ``n_rx_queues`` queues and a default context 0."""
        if n_rx_queues < 1:
            raise SteeringError("device has no RX queues", errno.EINVAL)
        if indir_size < 1:
            raise SteeringError("indirection table size must be positive", errno.EINVAL)
        key_b = parse_key(key)
        if len(key_b) != RSS_KEY_SIZE:
            raise SteeringError(f"RSS key must be {RSS_KEY_SIZE} bytes", errno.EINVAL)
        self.n_rx_queues = n_rx_queues
        self.indir_size = indir_size
        self.max_contexts = max_contexts
        self.contexts: dict[int, RssContext] = {
            0: RssContext(0, key_b, fill_default(indir_size, n_rx_queues))}
        #: Bumped on every successful change.
        self.generation = 0
        self._lookup: tuple[npt.NDArray[np.intp], I32Array] | None = None

    # -- queries ---------------------------------------------------------------------------

    def context(self, context_id: int) -> RssContext:
        """The context with this id, or ``ENOENT``."""
        ctx = self.contexts.get(context_id)
        if ctx is None:
            raise SteeringError(f"RSS context {context_id} does not exist", errno.ENOENT)
        return ctx

    def max_queue(self, context_id: int | None = None) -> int:
        """Highest queue an indirection table (one, or all) points at."""
        ctxs = self.contexts.values() if context_id is None else [self.context(context_id)]
        return max(int(c.indir.max()) for c in ctxs)

    def copy(self) -> RssConfig:
        """A deep copy (to try a change and keep it only if it validates)."""
        other = copy.copy(self)
        other.contexts = {
            cid: RssContext(c.context_id, c.key, c.indir.copy(), c.hfunc, c.user_configured)
            for cid, c in self.contexts.items()}
        other._lookup = None
        return other

    # -- changes ---------------------------------------------------------------------------

    def _changed(self) -> None:
        self.generation += 1
        self._lookup = None

    def _build(self, ctx: RssContext | None, *, key: bytes | str | None, hfunc: str | None,
               equal: int | None, weight: Sequence[int] | None, default: bool,
               start: int) -> tuple[bytes, str, I32Array, bool]:
        """Compute (key, hfunc, table, user_configured) for a set; raise before changing."""
        picked = (equal is not None) + (weight is not None) + bool(default)
        if picked > 1:
            raise SteeringError("equal, weight and default are mutually exclusive",
                                errno.EINVAL)
        if start and equal is None and weight is None:
            raise SteeringError("Start must be used with equal or weight options",
                                errno.EINVAL)
        base_key = ctx.key if ctx is not None else self.contexts[0].key
        new_key = base_key
        if key is not None:
            new_key = parse_key(key)
            if len(new_key) > RSS_KEY_SIZE:
                raise SteeringError(
                    f"Key is too long for device ({len(new_key)} > {RSS_KEY_SIZE})",
                    errno.EINVAL)
            if len(new_key) < RSS_KEY_SIZE:
                raise SteeringError(
                    f"Key is too short for device ({len(new_key)} < {RSS_KEY_SIZE})",
                    errno.EINVAL)
        new_hfunc = ctx.hfunc if ctx is not None else "toeplitz"
        if hfunc is not None:
            if hfunc not in HASH_FUNCTIONS:
                raise SteeringError(f"Unknown hash function: {hfunc}", errno.EINVAL)
            if hfunc not in SUPPORTED_HASH_FUNCTIONS:
                raise SteeringError(f"hash function {hfunc} is not supported by this device",
                                    errno.EOPNOTSUPP)
            new_hfunc = hfunc
        configured = ctx.user_configured if ctx is not None else False
        if equal is not None:
            table = fill_equal(self.indir_size, equal, start)
            configured = True
        elif weight is not None:
            table = fill_weight(self.indir_size, list(weight), start)
            configured = True
        elif default or ctx is None:
            table = fill_default(self.indir_size, self.n_rx_queues)
            configured = False
        else:
            table = ctx.indir.copy()
        bad = np.flatnonzero(table >= self.n_rx_queues)
        if bad.size:
            i = int(bad[0])
            raise SteeringError(
                f"indirection table entry {i} is queue {int(table[i])}, but the device has "
                f"{self.n_rx_queues} RX queues", errno.EINVAL)
        return new_key, new_hfunc, table, configured

    def set_rxfh(self, context_id: int = 0, *, key: bytes | str | None = None,
                 hfunc: str | None = None, equal: int | None = None,
                 weight: Sequence[int] | None = None, default: bool = False,
                 start: int = 0) -> None:
        """Change an existing context (``ethtool -X DEV [context N] ...``)."""
        ctx = self.context(context_id)
        new_key, new_hfunc, table, configured = self._build(
            ctx, key=key, hfunc=hfunc, equal=equal, weight=weight, default=default,
            start=start)
        if new_key != ctx.key:
            ctx.key = new_key
            ctx.hasher = Toeplitz(new_key)
        ctx.hfunc = new_hfunc
        ctx.indir = table
        ctx.user_configured = configured
        self._changed()

    def create_context(self, *, key: bytes | str | None = None, hfunc: str | None = None,
                       equal: int | None = None, weight: Sequence[int] | None = None,
                       start: int = 0) -> int:
        """``context new``: allocate the lowest free id >= 1 and return it (``EBUSY`` if full)."""
        new_key, new_hfunc, table, configured = self._build(
            None, key=key, hfunc=hfunc, equal=equal, weight=weight, default=False,
            start=start)
        cid = next((i for i in range(1, self.max_contexts + 1) if i not in self.contexts), None)
        if cid is None:
            raise SteeringError(f"all {self.max_contexts} RSS contexts are in use", errno.EBUSY)
        self.contexts[cid] = RssContext(cid, new_key, table, new_hfunc, configured)
        self._changed()
        return cid

    def delete_context(self, context_id: int) -> None:
        """``context N delete``: context 0 cannot be deleted (``EINVAL``)."""
        if context_id == 0:
            raise SteeringError("the default RSS context 0 cannot be deleted", errno.EINVAL)
        self.context(context_id)
        del self.contexts[context_id]
        self._changed()

    def set_n_rx_queues(self, n: int) -> None:
        """Follow a channel-count change; refuse it if a configured table points past it."""
        if n < 1:
            raise SteeringError("device needs at least one RX queue", errno.EINVAL)
        for ctx in self.contexts.values():
            if ctx.user_configured and int(ctx.indir.max()) >= n:
                raise SteeringError(
                    "requested channel count is too low for existing indirection table "
                    "settings", errno.EINVAL)
        if n == self.n_rx_queues:
            return
        self.n_rx_queues = n
        for ctx in self.contexts.values():
            if not ctx.user_configured:
                ctx.indir = fill_default(self.indir_size, n)
        self._changed()

    # -- the data path ---------------------------------------------------------------------

    def _tables(self) -> tuple[npt.NDArray[np.intp], I32Array]:
        if self._lookup is None:
            ids = sorted(self.contexts)
            slot = np.full(max(ids) + 1, -1, dtype=np.intp)
            slot[ids] = np.arange(len(ids))
            tables = np.stack([self.contexts[i].indir for i in ids]).astype(np.int32)
            self._lookup = (slot, tables)
        return self._lookup

    def queue_for(self, hashes: npt.ArrayLike, context_ids: npt.ArrayLike = 0) -> I32Array:
        """Vectorised ``indir_ctx[hash % size]``; ``context_ids`` broadcasts against hashes."""
        h = np.asarray(hashes, dtype=np.uint32)
        c = np.broadcast_to(np.asarray(context_ids, dtype=np.int64), h.shape)
        slot, tables = self._tables()
        if c.size and (c.min() < 0 or c.max() >= len(slot) or (slot[c] < 0).any()):
            missing = sorted({int(x) for x in np.unique(c) if x < 0 or x >= len(slot)
                              or slot[x] < 0})
            raise SteeringError(f"RSS context {missing[0]} does not exist", errno.ENOENT)
        return tables[slot[c], h % np.uint32(self.indir_size)]

    def hash(self, flows: Flows, context_ids: npt.ArrayLike = 0) -> U32Array:
        """Toeplitz hash of each flow's 4-tuple with the key of its context."""
        ids = np.asarray(context_ids, dtype=np.int64)
        if ids.ndim == 0:
            return self.context(int(ids)).hasher.hash_flows(flows)
        c = np.broadcast_to(ids, (len(flows),))
        out = np.zeros(len(flows), dtype=np.uint32)
        # Contexts usually share one key: hash once per distinct key, not per context.
        by_key: dict[bytes, list[int]] = {}
        for cid in np.unique(c):
            by_key.setdefault(self.context(int(cid)).key, []).append(int(cid))
        for cids in by_key.values():
            hasher = self.contexts[cids[0]].hasher
            if len(by_key) == 1:
                return hasher.hash_flows(flows)
            idx = np.flatnonzero(np.isin(c, cids))
            out[idx] = hasher.hash_flows(flows.take(idx))
        return out
