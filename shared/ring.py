"""The one single-producer / single-consumer ring used for every ring in zcrx-emu.

Every ring in the system is an instance of this module: the NIC's RX descriptor
and completion rings, the io_uring SQ and CQ, the zcrx refill queue (RQ), the
benchmark rings.  A ring is three 32-bit words and an entry array, laid at
offsets inside one or two buffers (normally mmapped shm regions):

* ``head``  - written only by the consumer: entries ``< head`` are free again.
* ``tail``  - written only by the producer: entries ``< tail`` are published.
* ``flags`` - optional; bit 0 is *need wakeup* (the consumer is about to sleep).
* ``entries`` - ``nentries`` elements of any numpy dtype; ``nentries`` is a power
  of two and the slot of counter ``c`` is ``c & (nentries - 1)``.

Head and tail are free-running u32 counters, never reduced modulo the size.
``tail - head`` (mod 2**32) is the number of published, unconsumed entries; the
ring is full when it equals ``nentries``.  The offsets are a parameter
(:class:`RingLayout`), so the emulator's own rings keep head, tail and flags on
separate 64-byte lines (:meth:`RingLayout.default`), while uapi rings sit exactly
where Linux reports them: the zcrx RQ on 6.18+ has head 0, tail 4, rqes 64; the
io_uring CQ has head 8, tail 12, cqes 64 (see :mod:`shared.abi`).  Clients take
offsets from what the kernel reports, never from constants.

Memory ordering
---------------
The producer writes entries, then publishes ``tail`` with one aligned 4-byte
store; the consumer loads ``tail``, then reads entries, then publishes ``head``
with one aligned store.  Python has no barriers: this relies on x86-64 total
store order (stores become visible in program order, loads are not reordered
with older loads) and on the aligned stores being single instructions.  It is
not correct on weakly ordered CPUs (arm64, POWER) without release/acquire
fences, which Python cannot express; the emulator targets x86-64 only.

Each side keeps a private copy of its own counter (``tail`` for the producer,
``head`` for the consumer) and a *cached* copy of the other side's counter; it
re-reads the shared word only when the cache says full (producer) or empty
(consumer), so a steady stream costs one shared load per batch, not per entry.

Untrusted peers
---------------
The kernel must survive anything an application writes.  With
``untrusted=True`` a side validates every load of the peer's counter: the
number of entries it implies is clamped to ``[0, nentries]`` (as Linux's
``io_zcrx_rqring_entries`` clamps ``tail - cached_head`` to the ring size), and
each impossible value is counted in :attr:`faults`.  A side never re-reads its
*own* counter from shared memory (Linux keeps ``cached_rq_head`` private for the
same reason), so a peer scribbling over it cannot move us; :meth:`check_own`
notices and counts such scribbles, and the next publish overwrites them.
Entries from an untrusted producer must still be validated by the caller.

Batches
-------
All operations are batch operations over numpy views.  :meth:`RingProducer.reserve`
and :meth:`RingConsumer.peek` return a *contiguous* view, which stops at the
wrap point of the array (call again for the rest); :meth:`RingProducer.push`
and :meth:`RingConsumer.pop` copy whole arrays and handle the wrap themselves.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from shared.errors import InvariantBroken

U32 = 0xFFFFFFFF
RING_F_NEED_WAKEUP = 1 << 0
CACHE_LINE = 64


def _is_pow2(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


@dataclass(frozen=True)
class RingLayout:
    """Where a ring's words and entries sit, as byte offsets.

    ``head``, ``tail`` and ``flags`` are offsets into the control buffer;
    ``entries`` is an offset into the entries buffer (the same buffer unless the
    ring is built with a separate one, as the io_uring SQE array is).
    ``flags`` is ``None`` for rings without a flags word (the zcrx RQ).
    """

    nentries: int
    dtype: np.dtype[Any]
    head: int
    tail: int
    entries: int
    flags: int | None = None

    def __post_init__(self) -> None:
        if not _is_pow2(self.nentries):
            raise ValueError(f"ring size {self.nentries} is not a power of two")
        for name in ("head", "tail", "flags"):
            off = getattr(self, name)
            if off is not None and (off < 0 or off % 4):
                raise ValueError(f"ring {name} offset {off} is not 4-byte aligned")
        object.__setattr__(self, "dtype", np.dtype(self.dtype))

    @classmethod
    def default(cls, nentries: int, dtype: Any, base: int = 0) -> RingLayout:
        """The emulator's own layout: head, tail, flags each on its own cache line."""
        return cls(nentries, np.dtype(dtype), head=base, tail=base + CACHE_LINE,
                   flags=base + 2 * CACHE_LINE, entries=base + 3 * CACHE_LINE)

    @property
    def entries_bytes(self) -> int:
        return self.nentries * self.dtype.itemsize

    @property
    def size(self) -> int:
        """Bytes needed when words and entries share one buffer."""
        words = max(o for o in (self.head, self.tail, self.flags or 0)) + 4
        return max(words, self.entries + self.entries_bytes)


class _RingSide:
    """State shared by both ends: views of the words and the entry array."""

    def __init__(self, buf: Any, layout: RingLayout, *, entries_buf: Any = None,
                 untrusted: bool = False) -> None:
        self.layout = layout
        self.nentries = layout.nentries
        self.mask = layout.nentries - 1
        self.untrusted = untrusted
        #: number of impossible values seen in the peer's counter or our own word
        self.faults = 0
        mv = memoryview(buf).cast("B")
        if layout.size > len(mv) and entries_buf is None:
            raise ValueError(f"buffer of {len(mv)} bytes too small for ring of {layout.size}")
        self._words = mv.cast("I")
        self._h = layout.head // 4
        self._t = layout.tail // 4
        self._f = None if layout.flags is None else layout.flags // 4
        ebuf = buf if entries_buf is None else entries_buf
        self.ring: np.ndarray = np.frombuffer(ebuf, dtype=layout.dtype, count=layout.nentries,
                                              offset=layout.entries)

    def _fault(self, what: str) -> None:
        """An impossible peer counter: counted if the peer is untrusted, else a bug."""
        if not self.untrusted:
            raise InvariantBroken(f"ring index out of range: {what}")
        self.faults += 1

    # The shared words, for tests and diagnostics.
    @property
    def shared_head(self) -> int:
        return int(self._words[self._h])

    @property
    def shared_tail(self) -> int:
        return int(self._words[self._t])

    @property
    def flags(self) -> int:
        return 0 if self._f is None else int(self._words[self._f])

    def init_words(self) -> None:
        """Zero head, tail and flags.  Only the ring's creator calls this, once."""
        self._words[self._h] = 0
        self._words[self._t] = 0
        if self._f is not None:
            self._words[self._f] = 0

    def detach(self) -> None:
        """Drop this side's views into the buffer so its mmap can be closed."""
        self._words.release()
        self.ring = np.empty(0, dtype=self.layout.dtype)


class RingProducer(_RingSide):
    """The writing end.  Owns ``tail``; reads ``head`` (validated if untrusted)."""

    def __init__(self, buf: Any, layout: RingLayout, *, entries_buf: Any = None,
                 untrusted: bool = False) -> None:
        super().__init__(buf, layout, entries_buf=entries_buf, untrusted=untrusted)
        self.tail = int(self._words[self._t])
        self.cached_head = int(self._words[self._h])
        if (self.tail - self.cached_head) & U32 > self.nentries:
            # Attaching to a ring whose words make no sense: trust only our tail.
            self._fault(f"head {self.cached_head} vs tail {self.tail} at attach")
            self.cached_head = self.tail

    def _refresh(self) -> int:
        head = int(self._words[self._h])
        used = (self.tail - head) & U32
        if used > self.nentries:
            # Head ahead of tail, or further back than the ring: impossible.
            self._fault(f"head {head} vs tail {self.tail}")
            return self.nentries - ((self.tail - self.cached_head) & U32)
        self.cached_head = head
        return self.nentries - used

    def space(self) -> int:
        """Free slots, re-reading the consumer's head."""
        return self._refresh()

    def pending(self) -> int:
        """Published entries the consumer has not released yet (by the cached head)."""
        return (self.tail - self.cached_head) & U32

    def reserve(self, n: int) -> np.ndarray:
        """A writable contiguous view of up to ``n`` free slots at the tail.

        The view may be shorter than ``n``: it stops at the end of the array (the
        wrap point) and at the number of free slots.  Nothing is visible to the
        consumer until :meth:`submit`.
        """
        # Hot path (one call per batch): plain comparisons, no min() or attribute churn.
        tail = self.tail
        nent = self.nentries
        free = nent - ((tail - self.cached_head) & U32)
        if free < n:
            free = self._refresh()
        start = tail & self.mask
        end = start + (n if n < free else free)
        return self.ring[start:end if end < nent else nent]

    def submit(self, k: int) -> None:
        """Publish ``k`` entries written into the last :meth:`reserve` view."""
        # Entries were stored before this point; the tail store comes last (TSO).
        self.tail = (self.tail + k) & U32
        self._words[self._t] = self.tail

    def push(self, values: np.ndarray) -> int:
        """Copy as many of ``values`` as fit, handling the wrap; publish once.

        Returns how many entries were pushed (0 when full).
        """
        n = len(values)
        free = self.nentries - ((self.tail - self.cached_head) & U32)
        if free < n:
            free = self._refresh()
        n = min(n, free)
        if n == 0:
            return 0
        start = self.tail & self.mask
        first = min(n, self.nentries - start)
        self.ring[start:start + first] = values[:first]
        if first < n:
            self.ring[:n - first] = values[first:n]
        self.submit(n)
        return n

    def needs_wakeup(self) -> bool:
        """True when the consumer said it is going to sleep (set the wake-up)."""
        return self._f is not None and bool(self._words[self._f] & RING_F_NEED_WAKEUP)

    def clear_need_wakeup(self) -> None:
        """Consume the consumer's wake-up request (we are about to send the wake-up).

        Used where the producer delivers the wake-up itself, as a NIC clears an
        armed interrupt when it raises it; the consumer re-arms before sleeping.
        """
        if self._f is not None:
            self._words[self._f] = self._words[self._f] & ~RING_F_NEED_WAKEUP & U32

    def check_own(self) -> bool:
        """True if the shared tail still holds what we published; counts a fault if not."""
        if int(self._words[self._t]) != self.tail:
            self.faults += 1
            self._words[self._t] = self.tail
            return False
        return True


class RingConsumer(_RingSide):
    """The reading end.  Owns ``head``; reads ``tail`` (clamped if untrusted)."""

    def __init__(self, buf: Any, layout: RingLayout, *, entries_buf: Any = None,
                 untrusted: bool = False) -> None:
        super().__init__(buf, layout, entries_buf=entries_buf, untrusted=untrusted)
        self.head = int(self._words[self._h])
        self.cached_tail = self.head
        self._refresh()

    def _refresh(self) -> int:
        tail = int(self._words[self._t])
        avail = (tail - self.head) & U32
        if avail > self.nentries:
            # Tail far ahead or behind head: clamp to one ring's worth, as Linux does
            # for the refill queue.  The entries themselves are validated by the caller.
            self._fault(f"tail {tail} vs head {self.head}")
            avail = self.nentries
        self.cached_tail = (self.head + avail) & U32
        return avail

    def ready(self) -> int:
        """Published entries not yet released, re-reading the producer's tail."""
        return self._refresh()

    def peek(self, n: int) -> np.ndarray:
        """A read-only-by-convention contiguous view of up to ``n`` ready entries.

        Stops at the wrap point of the array.  The entries stay owned by the ring
        until :meth:`release`; after that the producer may overwrite them.
        """
        head = self.head
        nent = self.nentries
        avail = (self.cached_tail - head) & U32
        if avail < n:
            avail = self._refresh()
        start = head & self.mask
        end = start + (n if n < avail else avail)
        return self.ring[start:end if end < nent else nent]

    def release(self, k: int) -> None:
        """Give ``k`` consumed entries back to the producer."""
        # Entries were read before this point; the head store comes last.
        self.head = (self.head + k) & U32
        self._words[self._h] = self.head

    def pop(self, n: int) -> np.ndarray:
        """Copy out and release up to ``n`` ready entries, handling the wrap."""
        avail = (self.cached_tail - self.head) & U32
        if avail < n:
            avail = self._refresh()
        n = min(n, avail)
        start = self.head & self.mask
        first = min(n, self.nentries - start)
        if first == n:
            out = self.ring[start:start + n].copy()
        else:
            out = np.concatenate((self.ring[start:], self.ring[:n - first]))
        self.release(n)
        return out

    def set_need_wakeup(self) -> None:
        """Say we are about to sleep.  Re-check :meth:`ready` after setting it."""
        if self._f is not None:
            self._words[self._f] = self._words[self._f] | RING_F_NEED_WAKEUP

    def clear_need_wakeup(self) -> None:
        if self._f is not None:
            self._words[self._f] = self._words[self._f] & ~RING_F_NEED_WAKEUP & U32

    def check_own(self) -> bool:
        """True if the shared head still holds what we published; counts a fault if not.

        A producer that moves our head (e.g. an app writing the RQ head) cannot
        make us re-consume or skip entries, because we never load our own word;
        this only notices and repairs the scribble.
        """
        if int(self._words[self._h]) != self.head:
            self.faults += 1
            self._words[self._h] = self.head
            return False
        return True


class Backoff:
    """Busy-poll briefly, then yield, then sleep (DESIGN §7).

    Three processes on two cores collapse under pure spinning, so a waiter that
    finds nothing spins ``spin`` times, yields the CPU ``yields`` times, then
    sleeps with a doubling interval capped at ``max_sleep``.  Call :meth:`idle`
    after each empty poll and :meth:`reset` after useful work.
    """

    __slots__ = ("_n", "_sleep", "max_sleep", "min_sleep", "spin", "yields")

    def __init__(self, spin: int = 64, yields: int = 64, min_sleep: float = 20e-6,
                 max_sleep: float = 1e-3) -> None:
        self.spin = spin
        self.yields = yields
        self.min_sleep = min_sleep
        self.max_sleep = max_sleep
        self._n = 0
        self._sleep = min_sleep

    def reset(self) -> None:
        self._n = 0
        self._sleep = self.min_sleep

    @property
    def sleeping(self) -> bool:
        """True once the waiter has moved past spinning and yielding."""
        return self._n >= self.spin + self.yields

    def idle(self) -> None:
        n = self._n
        self._n = n + 1
        if n < self.spin:
            return
        if n < self.spin + self.yields:
            os.sched_yield()
            return
        time.sleep(self._sleep)
        self._sleep = min(self._sleep * 2, self.max_sleep)
