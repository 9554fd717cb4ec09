"""Page pools, memory providers and the per-buffer ledger (kernel side, no I/O).

Who owns what
-------------
A :class:`BufferSpace` is one span of ``count`` equal buffers of ``buf_len`` bytes:
buffer ``i`` is bytes ``[i * buf_len, (i + 1) * buf_len)`` of the span.  A space is a
queue's kernel pages, a region ``/zcrx.<run>.kernel.<dev>.q<N>.pp<gen>`` that the kernel
creates (:meth:`BufferSpace.create`), DMA-maps for the NIC and unlinks when its pool is
gone, or a zcrx area: the app's memory split into niovs, attached by
:mod:`driver_proc.zcrx`, DMA-mapped by the io_uring memory provider.

The **kernel is the single authority** over every buffer of a space: its state, its page-pool
reference count (``pp_ref``), its user reference count (``user_refs``) and its owning pool
(``pp``) live in numpy arrays of the space, written only by this module (on behalf of the
driver, the skb store and zcrx, which call its helpers and never store into the arrays).  The
NIC only ever sees buffers the driver posted; the app only ever sees buffers handed to it with
a user reference.

Buffer states (:class:`BufState`), one per buffer, always::

    FREE        on the space's freelist; no pool, pp_ref 0, user_refs 0
    POOL_CACHE  in a page pool's alloc cache; pp set, pp_ref 0
    DRIVER      allocated by the driver, about to be posted (inside one NAPI call)
    POSTED      lent to the NIC: on the fill ring or taken by the NIC, not completed
    IN_SKB      referenced by skbs only (pp_ref >= 1, user_refs 0)
    USER        held by the user (user_refs >= 1; an skb may still hold it too; a buffer
                in the refill queue not yet consumed by the kernel is still USER)

Transitions::

    FREE --provider.alloc--> POOL_CACHE --pool.alloc--> DRIVER --pool.post--> POSTED
    POSTED --space.to_skb--> IN_SKB --space.get_user--> USER
    FREE --space.take_free + space.lend_free--> USER (zcrx copy fallback, no pool)
    any ref-holding state --space.put_ref / put_user (last ref)--> pool.recycle:
        POOL_CACHE (pool alive) or FREE (pool destroying, no pool, or the pool is gone)
    POOL_CACHE --pool.destroy--> FREE

:meth:`BufferSpace.ledger` counts buffers per state (the counts always sum to ``count``) and
:meth:`BufferSpace.check_ledger` verifies everything the states imply (refcounts, pool
ownership, freelist contents, pool caches and in-flight counters) and raises
:class:`~shared.errors.InvariantBroken` on any disagreement.

Memory providers
----------------
A :class:`PagePool` gets its buffers from a :class:`MemoryProvider` (Linux's
``memory_provider_ops``): ``alloc(pool, n)`` hands up to ``n`` buffers to the pool and
``release(pool, ids)`` takes buffers back when the pool lets them go.  The
:class:`KernelPagesProvider` hands out the space's freelist.  The io_uring zcrx provider
(:class:`driver_proc.zcrx.ZcrxProvider`) plugs in the same way: its ``alloc`` first consumes
the refill queue (each valid RQE drops a user reference with :meth:`BufferSpace.put_user`,
which recycles buffers whose last reference went straight into the pool's cache), then takes
from the area freelist; an empty freelist returns fewer buffers (the queue starves, as in
Linux).  The memory provider ops mirrored: ``alloc`` (``alloc_netmems``), ``release``
(``release_netmem``), ``init`` and ``destroy``; what ``nl_fill`` reports is
:attr:`MemoryProvider.kind` (status output).  A provider is bound to and unbound from a queue
by the netdev (:meth:`driver_proc.netdev.NetDevice.mp_open_rxq` / ``mp_close_rxq``).

Delayed destruction
-------------------
:meth:`PagePool.destroy` returns the cache to the provider at once; buffers still in flight
(in skbs, with the user, posted) come home later through ``recycle``, which then releases them
to the provider.  The pool is *destroyed* when its in-flight count reaches 0; ``destroy``
returns False until then and ``on_destroyed`` fires at that moment.

Several spaces per pool
-----------------------
A pool draws from the :class:`SpaceSet` of its provider: one space for kernel pages, every
area of a zcrx ifq (Linux 7.3 adds areas while the queue runs, and its page pool walks them
all).  The pool, its cache and the driver name buffers by *keys* ``(index << 32) | id``;
each space keeps its own ledger indexed by its own ids, and a key batch is split by space
(:meth:`SpaceSet.groups`) with one numpy pass per space present.  Space 0's keys are its
ids, so a one-space pool is exactly as before.

All operations take numpy id arrays and run a fixed number of numpy calls per batch (per
space named).
"""

from __future__ import annotations

import enum
import itertools
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from shared.errors import InvariantBroken, Misuse
from shared.shm import Region

__all__ = [
    "KEY_MASK",
    "KEY_SHIFT",
    "N_STATES",
    "BufState",
    "BufferSpace",
    "IdFifo",
    "KernelPagesProvider",
    "MemoryProvider",
    "PagePool",
    "SpaceSet",
    "as_ids",
]


class BufState(enum.IntEnum):
    """Where one buffer is (see the module docstring)."""

    FREE = 0
    POOL_CACHE = 1
    DRIVER = 2
    POSTED = 3
    IN_SKB = 4
    USER = 5


N_STATES = len(BufState)
_STATE_NAMES = tuple(s.name.lower() for s in BufState)
_FREE = np.uint8(BufState.FREE)
_CACHE = np.uint8(BufState.POOL_CACHE)
_DRIVER = np.uint8(BufState.DRIVER)
_POSTED = np.uint8(BufState.POSTED)
_IN_SKB = np.uint8(BufState.IN_SKB)
_USER = np.uint8(BufState.USER)
_NO_POOL = -1

_EMPTY = np.empty(0, dtype=np.int64)
_EMPTY.flags.writeable = False
_space_ids = itertools.count(1)
_pool_ids = itertools.count(1)

#: A buffer key names buffer ``key & KEY_MASK`` of space ``key >> KEY_SHIFT`` of a
#: :class:`SpaceSet`; the keys of space 0 are its buffer ids.
KEY_SHIFT = 32
KEY_MASK = (1 << KEY_SHIFT) - 1


def as_ids(ids: ArrayLike) -> NDArray[np.int64]:
    """``ids`` as a 1-D int64 array (no copy when it already is one)."""
    a = np.asarray(ids)
    if a.dtype != np.int64 or a.ndim != 1:
        a = np.atleast_1d(a).reshape(-1).astype(np.int64)
    return a


# --------------------------------------------------------------------------------------------
# A FIFO of buffer ids
# --------------------------------------------------------------------------------------------

class IdFifo:
    """A bounded FIFO of int64 ids on a numpy ring; push and pop are two slice copies."""

    __slots__ = ("_a", "_head", "_n", "cap")

    def __init__(self, capacity: int) -> None:
        self.cap = max(1, int(capacity))
        self._a = np.empty(self.cap, dtype=np.int64)
        self._head = 0
        self._n = 0

    def __len__(self) -> int:
        return self._n

    def push(self, ids: NDArray[np.int64]) -> None:
        """Append all of ``ids``; raise :class:`InvariantBroken` if they do not fit."""
        n = len(ids)
        if n == 0:
            return
        if self._n + n > self.cap:
            raise InvariantBroken(f"id fifo overflow: {self._n} + {n} > {self.cap}")
        t = (self._head + self._n) % self.cap
        first = min(n, self.cap - t)
        self._a[t:t + first] = ids[:first]
        if first < n:
            self._a[:n - first] = ids[first:]
        self._n += n

    def pop(self, n: int) -> NDArray[np.int64]:
        """Remove and return (a copy of) the oldest ``min(n, len)`` ids."""
        n = min(n, self._n)
        if n <= 0:
            return _EMPTY
        h = self._head
        first = min(n, self.cap - h)
        if first == n:
            out = self._a[h:h + n].copy()
        else:
            out = np.concatenate((self._a[h:], self._a[:n - first]))
        self._head = (h + n) % self.cap
        self._n -= n
        return out

    def peek_all(self) -> NDArray[np.int64]:
        """A copy of every id, oldest first (diagnostics and ledger checks)."""
        h, n = self._head, self._n
        first = min(n, self.cap - h)
        return np.concatenate((self._a[h:h + first], self._a[:n - first]))

    def grow(self, capacity: int) -> None:
        """Raise the capacity to ``capacity`` (never shrinks), keeping the ids in order."""
        if capacity <= self.cap:
            return
        a = np.empty(capacity, dtype=np.int64)
        a[:self._n] = self.peek_all()
        self._a, self._head, self.cap = a, 0, int(capacity)


# --------------------------------------------------------------------------------------------
# The buffer space: per-buffer state arrays, freelist, data views
# --------------------------------------------------------------------------------------------

class BufferSpace:
    """``count`` buffers of ``buf_len`` bytes and the kernel's per-buffer ledger.

    Args:
        buf: writable buffer holding the buffers (an mmap, a numpy array, a bytearray), from
            byte ``offset``; ``count * buf_len`` bytes are used.
        count: number of buffers.
        buf_len: bytes per buffer.
        name: shm name of the region the buffers live in (what ``nic.dma_map`` maps).
        region_size: bytes of that region (the mapping size), default the span's size.
        offset: byte offset of buffer 0 inside ``buf`` and inside the DMA mapping.
        region: the :class:`Region` this space created and owns (closed by :meth:`close`).

    Attributes ``state`` (u8), ``pp_ref`` (i32), ``user_refs`` (i32) and ``pp`` (i32 pool id,
    -1 for none) are indexed by buffer id and written only through this class and
    :class:`PagePool`; everybody else (the driver, the skb store, zcrx) reads them at most
    and moves buffers with the paired helpers below, each one numpy batch:

    * :meth:`take_free` / :meth:`put_free`: off and back onto the freelist;
    * :meth:`get_user` / :meth:`put_user`: one page-pool plus one user reference per id
      (a CQE hands a buffer over; an RQE gives it back);
    * :meth:`lend_free` / :meth:`put_user`: a buffer fresh off the freelist goes straight
      to the user (the copy fallback);
    * :meth:`to_skb` / :meth:`put_ref`: the driver's reference becomes an skb's, and is
      dropped when the skb is freed; :meth:`scrub` revokes every user reference.

    ``flat`` is the span as one uint8 array, ``data`` as ``(count, buf_len)``.
    """

    def __init__(self, buf: Any, count: int, buf_len: int, *, name: str = "",
                 region_size: int | None = None, offset: int = 0,
                 region: Region | None = None) -> None:
        if count <= 0 or buf_len <= 0:
            raise Misuse(f"bad buffer space: {count} buffers of {buf_len} bytes")
        self.space_id = next(_space_ids)
        self.count = int(count)
        self.buf_len = int(buf_len)
        self.name = name
        self.offset = int(offset)
        self.region = region
        self.region_size = int(region_size if region_size is not None
                               else self.offset + self.count * self.buf_len)
        self.flat: NDArray[np.uint8] = np.frombuffer(
            buf, dtype=np.uint8, count=self.count * self.buf_len, offset=self.offset)
        self.data: NDArray[np.uint8] = self.flat.reshape(self.count, self.buf_len)
        self.state = np.zeros(self.count, dtype=np.uint8)
        self.pp_ref = np.zeros(self.count, dtype=np.int32)
        self.user_refs = np.zeros(self.count, dtype=np.int32)
        self.pp = np.full(self.count, _NO_POOL, dtype=np.int32)
        # Freelist: a LIFO stack whose top is the end; popped slices are reversed so a fresh
        # space hands out 0, 1, 2, ... (contiguous buffers).
        self._free = np.arange(self.count - 1, -1, -1, dtype=np.int64)
        self.free_count = self.count
        self.pools: dict[int, PagePool] = {}
        self._scratch = np.empty(self.count, dtype=np.int64)
        self._windows: dict[int, NDArray[np.uint8]] = {}
        self.closed = False
        #: returns of user references the space ignored (no reference held)
        self.bad_user_returns = 0
        #: this space's place in its :class:`SpaceSet` (a zcrx area's id; 0 for a lone space)
        self.index = 0

    @classmethod
    def create(cls, name: str, count: int, buf_len: int, *,
               touch: int | None = None) -> BufferSpace:
        """Create (and own) a kernel region ``name`` holding ``count`` buffers.

        ``touch``: how many buffers (from the start) get their pages now (default all);
        the rest get theirs on first use, as a page pool allocates pages on demand."""
        size = count * buf_len
        region = Region.create(name, size, allocate=None if touch is None
                               else max(0, min(touch, count)) * buf_len)
        assert region.buf is not None
        try:
            return cls(region.buf, count, buf_len, name=name, region_size=region.size,
                       region=region)
        except BaseException:
            region.close()
            raise

    def close(self) -> None:
        """Drop the data views and close (unlink) the region if this space owns one."""
        if self.closed:
            return
        self.closed = True
        self._windows.clear()
        empty = np.empty(0, dtype=np.uint8)
        self.flat = empty
        self.data = empty.reshape(0, self.buf_len)
        if self.region is not None:
            self.region.close()

    def __repr__(self) -> str:
        return (f"BufferSpace(#{self.space_id} {self.name!r}, {self.count} x {self.buf_len}, "
                f"free={self.free_count})")

    # -- views -------------------------------------------------------------------------------

    def window(self, width: int) -> NDArray[np.uint8]:
        """``win[s] == flat[s:s + width]``: a strided view with no memory of its own.

        Rows exist for ``s <= count * buf_len - width``; ``win[starts]`` gathers many
        equal-length byte ranges with one fancy index (never ``np.take``, which would first
        copy the whole window).
        """
        w = self._windows.get(width)
        if w is None:
            w = _window(self.flat, width)
            if len(self._windows) > 16:
                self._windows.clear()
            self._windows[width] = w
        return w

    # -- freelist ----------------------------------------------------------------------------

    def take_free(self, n: int) -> NDArray[np.int64]:
        """Pop up to ``n`` buffers off the freelist (they stay FREE until the caller moves
        them; :class:`PagePool` binds them at once)."""
        n = min(int(n), self.free_count)
        if n <= 0:
            return _EMPTY
        top = self.free_count
        ids = self._free[top - n:top][::-1].copy()
        self.free_count = top - n
        return ids

    def put_free(self, ids: NDArray[np.int64]) -> None:
        """Return buffers to the freelist: state FREE, no pool, no references."""
        n = len(ids)
        if n == 0:
            return
        if self.free_count + n > self.count:
            raise InvariantBroken(f"{self}: freelist overflow")
        top = self.free_count
        self._free[top:top + n] = ids[::-1]
        self.free_count = top + n
        self.state[ids] = _FREE
        self.pp[ids] = _NO_POOL
        self.pp_ref[ids] = 0
        self.user_refs[ids] = 0

    # -- references --------------------------------------------------------------------------

    def _unique(self, ids: NDArray[np.int64]) -> bool:
        """True when ``ids`` has no duplicates (three numpy calls)."""
        n = len(ids)
        if n < 2:
            return True
        r = np.arange(n, dtype=np.int64)
        self._scratch[ids] = r
        return not np.count_nonzero(self._scratch[ids] != r)

    def _drop(self, counts: NDArray[np.int32], ids: NDArray[np.int64]
              ) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
        """Decrement ``counts`` once per occurrence in ``ids``.

        Returns ``(zero, live)``: the distinct ids now at zero and those still above.  A
        count that would go negative raises :class:`InvariantBroken` before anything changes.
        """
        if self._unique(ids):
            left = counts[ids]
            left -= 1
            if np.count_nonzero(left < 0):
                raise InvariantBroken(f"{self}: reference dropped below zero")
            counts[ids] = left
            if not np.count_nonzero(left):
                return ids, _EMPTY
            z = left == 0
            return ids[z], ids[~z]
        u, cnt = np.unique(ids, return_counts=True)
        left = counts[u] - cnt
        if int(left.min()) < 0:
            raise InvariantBroken(f"{self}: reference dropped below zero")
        counts[u] = left
        z = left == 0
        return u[z], u[~z]

    def check_ids(self, ids: ArrayLike) -> NDArray[np.int64]:
        """``ids`` as int64, or :class:`Misuse` if any is outside ``[0, count)``."""
        a = as_ids(ids)
        if np.count_nonzero(a.view(np.uint64) >= self.count):  # negative ids wrap: caught
            raise Misuse(f"{self}: buffer id out of range")
        return a

    def to_skb(self, ids: NDArray[np.int64]) -> None:
        """The driver's reference on these completed buffers now belongs to an skb."""
        self.state[ids] = _IN_SKB

    def put_ref(self, ids: NDArray[np.int64]) -> int:
        """Drop one page-pool reference per id (an skb freed, a posted buffer reclaimed, a
        dropped frame); buffers whose last reference went are recycled to their pool (or the
        freelist).  Duplicates drop several references.  Returns how many were recycled."""
        if len(ids) == 0:
            return 0
        zero, live = self._drop(self.pp_ref, ids)
        if len(live):
            # Still referenced (the user's hold, or another skb): the user's hold wins.
            self.state[live] = np.where(self.user_refs[live] > 0, _USER, _IN_SKB)
        self._recycle(zero)
        return len(zero)

    def get_user(self, ids: ArrayLike) -> None:
        """Lend buffers to the user: one pp_ref and one user_ref each (per occurrence)."""
        a = self.check_ids(ids)
        if len(a) == 0:
            return
        if int(self.pp_ref[a].min()) <= 0:
            raise InvariantBroken(f"{self}: get_user on a buffer nobody holds")
        if self._unique(a):
            self.pp_ref[a] += 1
            self.user_refs[a] += 1
        else:
            np.add.at(self.pp_ref, a, 1)
            np.add.at(self.user_refs, a, 1)
        self.state[a] = _USER

    def lend_free(self, ids: NDArray[np.int64]) -> None:
        """Hand buffers taken off the freelist (:meth:`take_free`) straight to the user,
        outside any pool (zcrx's copy fallback): USER with one page-pool reference
        (Linux's ``page_pool_fragment_netmem(niov, 1)``) and one user reference each.  The
        user gives them back with :meth:`put_user`; the last reference sends them to the
        freelist (no pool owns them).  ``ids`` must be distinct."""
        if len(ids) == 0:
            return
        if np.count_nonzero(self.state[ids] != _FREE):
            raise InvariantBroken(f"{self}: lend_free of a buffer that is not FREE")
        self.state[ids] = _USER
        self.pp_ref[ids] = 1
        self.user_refs[ids] = 1

    def put_user(self, ids: ArrayLike) -> int:
        """The user returns buffers (one reference per occurrence; the refill path).

        Ids out of range or without a user reference are ignored and counted in
        :attr:`bad_user_returns` (Linux ignores them silently).  Returns how many returns
        were accepted.
        """
        a = as_ids(ids)
        if len(a) == 0:
            return 0
        inr = (a >= 0) & (a < self.count)
        if not inr.all():
            self.bad_user_returns += int(np.count_nonzero(~inr))
            a = a[inr]
        if not self._unique(a):
            # Several returns of one buffer: accept at most user_refs of them.
            u, cnt = np.unique(a, return_counts=True)
            take = np.minimum(cnt, self.user_refs[u])
            self.bad_user_returns += int((cnt - take).sum())
            a = np.repeat(u, take)
        else:
            ok = self.user_refs[a] > 0
            if not ok.all():
                self.bad_user_returns += int(np.count_nonzero(~ok))
                a = a[ok]
        if len(a) == 0:
            return 0
        self._drop(self.user_refs, a)
        zero, live = self._drop(self.pp_ref, a)
        if len(live):
            self.state[live] = np.where(self.user_refs[live] > 0, _USER, _IN_SKB)
        self._recycle(zero)
        return len(a)

    def scrub(self) -> int:
        """Revoke every user reference (a dying user); returns the references dropped."""
        held = np.flatnonzero(self.user_refs > 0)
        if len(held) == 0:
            return 0
        refs = self.user_refs[held].copy()
        self.user_refs[held] = 0
        self.pp_ref[held] -= refs
        zero = held[self.pp_ref[held] == 0]
        live = held[self.pp_ref[held] > 0]
        self.state[live] = _IN_SKB
        self._recycle(zero)
        return int(refs.sum())

    def _recycle(self, ids: NDArray[np.int64]) -> None:
        """Route buffers whose last reference dropped to their pool, or the freelist."""
        if len(ids) == 0:
            return
        owners = self.pp[ids]
        p0 = int(owners[0])
        if not np.count_nonzero(owners != p0):
            pool = self.pools.get(p0)
            if pool is None:
                self.put_free(ids)
            else:
                pool.recycle(ids, self)
            return
        for pid in np.unique(owners).tolist():
            sub = ids[owners == pid]
            pool = self.pools.get(pid)
            if pool is None:
                self.put_free(sub)
            else:
                pool.recycle(sub, self)

    # -- ledger ------------------------------------------------------------------------------

    def ledger(self) -> dict[str, int]:
        """Buffers per state (:class:`BufState` names, lowercase); always sums to count."""
        c = np.bincount(self.state, minlength=N_STATES)
        return {name: int(c[i]) for i, name in enumerate(_STATE_NAMES)}

    def check_ledger(self) -> dict[str, int]:
        """Verify every invariant of the states; return the ledger or raise InvariantBroken."""
        led = self.ledger()
        problems: list[str] = []
        if sum(led.values()) != self.count:
            problems.append(f"ledger sums to {sum(led.values())}, not {self.count}")
        st, ref, ur, pp = self.state, self.pp_ref, self.user_refs, self.pp
        if int(st.max(initial=0)) >= N_STATES:
            problems.append("unknown state value")
        free = st == _FREE
        if (ref[free] != 0).any() or (ur[free] != 0).any() or (pp[free] != _NO_POOL).any():
            problems.append("a FREE buffer holds a reference or a pool")
        fl = self._free[:self.free_count]
        if self.free_count != led["free"] or not free[fl].all() or len(np.unique(fl)) != len(fl):
            problems.append(f"freelist ({self.free_count}) disagrees with FREE ({led['free']})")
        cache = st == _CACHE
        if (ref[cache] != 0).any() or (ur[cache] != 0).any():
            problems.append("a POOL_CACHE buffer holds a reference")
        drv = (st == _DRIVER) | (st == _POSTED)
        if (ref[drv] != 1).any() or (ur[drv] != 0).any():
            problems.append("a DRIVER/POSTED buffer has pp_ref != 1 or a user reference")
        skb = st == _IN_SKB
        if (ref[skb] < 1).any() or (ur[skb] != 0).any():
            problems.append("an IN_SKB buffer without a page-pool reference, or user-held")
        usr = st == _USER
        if (ur[usr] < 1).any() or (ref[usr] < ur[usr]).any():
            problems.append("a USER buffer without a user reference, or pp_ref < user_refs")
        owned = ~free
        known = np.isin(pp, np.array(list(self.pools) or [_NO_POOL - 1], dtype=np.int32))
        if (owned & ~known & (st != _USER) & (st != _IN_SKB)).any():
            problems.append("a cached or posted buffer belongs to no live pool")
        for pid, pool in self.pools.items():
            mine = pp == pid
            n_cache = int(np.count_nonzero(mine & cache))
            cached = pool.cache.peek_all()
            n_fly = int(np.count_nonzero(mine & ~cache))
            if len(pool.spaces) > 1:
                # a pool over several spaces: its cache holds keys of all of them, its
                # in-flight count covers all of them
                cached = cached[(cached >> KEY_SHIFT) == self.index] & KEY_MASK
                for sp in pool.spaces.spaces:
                    if sp is not self and not sp.closed:
                        n_fly += int(np.count_nonzero((sp.pp == pid) & (sp.state != _CACHE)))
            if n_cache != len(cached):
                problems.append(f"pool {pid}: cache holds {len(cached)}, "
                                f"ledger says {n_cache}")
            elif n_cache and not cache[cached].all():
                problems.append(f"pool {pid}: cache lists a buffer not in POOL_CACHE")
            if n_fly != pool.inflight:
                problems.append(f"pool {pid}: inflight {pool.inflight}, ledger says {n_fly}")
        if problems:
            raise InvariantBroken(f"{self}: " + "; ".join(problems))
        return led


def _window(flat: NDArray[np.uint8], width: int) -> NDArray[np.uint8]:
    """Rows ``flat[s:s + width]`` for every start ``s`` (a strided view, no copy)."""
    size = flat.shape[0]
    rows = max(0, size - width + 1)
    return np.ndarray((rows, width), np.uint8, flat, 0, (1, 1))


# --------------------------------------------------------------------------------------------
# A set of spaces: what one page pool draws from
# --------------------------------------------------------------------------------------------

class SpaceSet:
    """The buffer spaces one page pool draws from, by index: a queue's kernel pages (one
    space) or a zcrx ifq's areas (index = area id, Linux 7.3 can add areas while the queue
    runs).  Every space has the same ``buf_len``.

    A buffer of the set is named by a *key*, ``(index << KEY_SHIFT) | buffer id``; space 0's
    keys are its buffer ids, so a one-space set costs nothing extra.  The pool's cache, the
    netdev's posted FIFO and a NAPI batch's frags are keys; each space's ledger arrays stay
    indexed by its own buffer ids, and :meth:`groups` splits a key batch by space (one
    numpy pass per space present, never per buffer).  ``sids`` (the spaces' ids, ascending:
    spaces are added in creation order) and ``counts`` are arrays for vectorised checks.
    """

    __slots__ = ("buf_len", "counts", "sids", "spaces", "total")

    def __init__(self, spaces: list[BufferSpace] | tuple[BufferSpace, ...] = ()) -> None:
        self.spaces: list[BufferSpace] = []
        self.sids = np.empty(0, dtype=np.int64)
        self.counts = np.empty(0, dtype=np.int64)
        self.total = 0
        self.buf_len = 0
        for sp in spaces:
            self.add(sp)

    def __len__(self) -> int:
        return len(self.spaces)

    def __repr__(self) -> str:
        return f"SpaceSet({len(self.spaces)} spaces, {self.total} x {self.buf_len})"

    def add(self, space: BufferSpace) -> int:
        """Append ``space`` (its :attr:`BufferSpace.index` becomes its place); returns it."""
        if self.spaces and space.buf_len != self.buf_len:
            raise Misuse(f"{space}: buffers of {space.buf_len} bytes in a set of "
                         f"{self.buf_len}")
        if len(self.sids) and space.space_id <= int(self.sids[-1]):
            raise InvariantBroken(f"{space}: added out of creation order")
        index = len(self.spaces)
        space.index = index
        self.spaces.append(space)
        self.sids = np.append(self.sids, space.space_id)
        self.counts = np.append(self.counts, space.count)
        self.total += space.count
        self.buf_len = space.buf_len
        return index

    @staticmethod
    def keys(space: BufferSpace, ids: NDArray[np.int64]) -> NDArray[np.int64]:
        """The keys of buffers ``ids`` of ``space``."""
        return ids | (space.index << KEY_SHIFT) if space.index else ids

    def groups(self, keys: NDArray[np.int64]) -> list[tuple[BufferSpace, NDArray[np.int64]]]:
        """``keys`` split by space: ``[(space, its buffer ids)]`` in index order, each in
        the keys' order (a single space: no copy)."""
        if len(self.spaces) == 1:
            return [(self.spaces[0], keys)]
        if not len(keys):
            return []
        idx = keys >> KEY_SHIFT
        i0 = int(idx[0])
        if not np.count_nonzero(idx != i0):
            return [(self.spaces[i0], keys & KEY_MASK if i0 else keys)]
        return [(self.spaces[i], keys[idx == i] & KEY_MASK) for i in np.unique(idx).tolist()]

    def check_keys(self, keys: ArrayLike) -> NDArray[np.int64]:
        """``keys`` as int64, or :class:`Misuse` if any names no buffer of the set."""
        a = as_ids(keys)
        if len(self.spaces) == 1:
            return self.spaces[0].check_ids(a)
        idx = a >> KEY_SHIFT
        bad = idx.view(np.uint64) >= len(self.spaces)
        bad |= (a & KEY_MASK) >= self.counts[np.minimum(idx, len(self.spaces) - 1)]
        if np.count_nonzero(bad):
            raise Misuse(f"{self}: buffer key out of range")
        return a

    def user_refs(self, keys: NDArray[np.int64]) -> NDArray[np.int32]:
        """The ``user_refs`` of every key's buffer, in the keys' order."""
        if len(self.spaces) == 1:
            return self.spaces[0].user_refs[keys]
        out = np.empty(len(keys), dtype=np.int32)
        idx = keys >> KEY_SHIFT
        for i in np.unique(idx).tolist():
            sel = idx == i
            out[sel] = self.spaces[i].user_refs[keys[sel] & KEY_MASK]
        return out

    def find(self, src: NDArray[np.int64], buf: NDArray[np.int64]
             ) -> tuple[NDArray[np.bool_], NDArray[np.int64]]:
        """Which of the buffers ``buf`` of spaces ``src`` (space ids) belong to the set, and
        their keys (meaningless where they do not)."""
        sids = self.sids
        if len(sids) == 1:
            return src == sids[0], buf
        i = np.minimum(np.searchsorted(sids, src), len(sids) - 1)
        return sids[i] == src, buf | (i << KEY_SHIFT)

    def put_ref(self, keys: NDArray[np.int64]) -> int:
        """:meth:`BufferSpace.put_ref` of every key's buffer; returns how many recycled."""
        return sum(sp.put_ref(ids) for sp, ids in self.groups(keys))

    def free_count(self) -> int:
        """Free buffers over every space."""
        return sum(sp.free_count for sp in self.spaces)

    def take_free(self, n: int) -> NDArray[np.int64]:
        """Up to ``n`` free buffers walking the spaces in order (Linux 7.3's slow path and
        ``io_alloc_fallback_niov`` walk a zcrx ifq's areas so), as keys."""
        first = self.spaces[0].take_free(n)
        if len(first) == n or len(self.spaces) == 1:
            return first
        parts = [first]
        n -= len(first)
        for sp in self.spaces[1:]:
            if n <= 0:
                break
            ids = sp.take_free(n)
            if len(ids):
                parts.append(self.keys(sp, ids))
                n -= len(ids)
        return np.concatenate(parts)

    def put_free(self, keys: NDArray[np.int64]) -> None:
        """:meth:`BufferSpace.put_free` of every key's buffer."""
        for sp, ids in self.groups(keys):
            sp.put_free(ids)


# --------------------------------------------------------------------------------------------
# Memory providers
# --------------------------------------------------------------------------------------------

class MemoryProvider(ABC):
    """Where a page pool's buffers come from (Linux's ``memory_provider_ops``).

    ``kind`` names the provider in status output ("pages", "io-uring").  ``space`` is the
    first (often the only) space; ``spaces`` the :class:`SpaceSet` the pool draws from (a
    provider may add spaces while pools run: :meth:`PagePool.attach`).  Buffers travel as
    keys of that set.  :meth:`map_id` is the IOVA map id of space ``index`` when the provider
    mapped it itself (a zcrx area is mapped at registration); ``None`` means the driver maps
    the space for the NIC (a one-space provider only).
    """

    kind: str = "pages"
    dma_map_id: int | None = None

    def __init__(self, space: BufferSpace, spaces: SpaceSet | None = None) -> None:
        self.space = space
        self.spaces = spaces if spaces is not None else SpaceSet([space])

    def map_id(self, index: int) -> int | None:
        """The DMA map id of space ``index`` (:attr:`dma_map_id` for space 0)."""
        return self.dma_map_id if index == 0 else None

    @abstractmethod
    def alloc(self, pool: PagePool, n: int) -> NDArray[np.int64]:
        """Hand up to ``n`` buffers to ``pool`` (return their keys, still FREE; the pool
        binds them).  May instead recycle buffers into ``pool``'s cache as a side effect (the
        zcrx refill queue does), and should then return only ``n - len(pool.cache)`` more;
        returns fewer, even none, when memory is short."""

    @abstractmethod
    def release(self, pool: PagePool, ids: NDArray[np.int64]) -> None:
        """Take buffers (keys) back from ``pool`` (no references left): they become FREE."""

    def init(self, pool: PagePool) -> None:  # noqa: B027 - optional hook
        """A pool starts using this provider."""

    def destroy(self, pool: PagePool) -> None:  # noqa: B027 - optional hook
        """``pool`` is fully destroyed (every buffer came home)."""


class KernelPagesProvider(MemoryProvider):
    """Ordinary kernel pages: the space's freelist (a queue without a memory provider)."""

    kind = "pages"

    def alloc(self, pool: PagePool, n: int) -> NDArray[np.int64]:
        return self.space.take_free(n)

    def release(self, pool: PagePool, ids: NDArray[np.int64]) -> None:
        self.space.put_free(ids)


# --------------------------------------------------------------------------------------------
# The page pool
# --------------------------------------------------------------------------------------------

class PagePool:
    """One RX queue's buffer pool: an alloc cache in front of a memory provider.

    Args:
        provider: where buffers come from; its ``spaces`` hold them.
        on_destroyed: called once, with the pool, when destruction completes.
        name: for diagnostics (e.g. ``"eth0.q1"``).

    Buffers are keys of :attr:`spaces` (:class:`SpaceSet`; a one-space pool's keys are its
    buffer ids).  ``inflight`` counts this pool's buffers outside its cache (DRIVER, POSTED,
    IN_SKB, USER) over every space.  Key batches are int64 arrays; nothing loops per buffer.
    """

    def __init__(self, provider: MemoryProvider, *,
                 on_destroyed: Callable[[PagePool], None] | None = None,
                 name: str = "") -> None:
        self.id = next(_pool_ids)
        self.provider = provider
        self.space = provider.space
        self.spaces = provider.spaces
        self.name = name
        self.cache = IdFifo(self.spaces.total)
        self.inflight = 0
        self.destroying = False
        self.destroyed = False
        self.on_destroyed = on_destroyed
        #: allocation calls that got fewer buffers than asked for
        self.alloc_short = 0
        for sp in self.spaces.spaces:
            sp.pools[self.id] = self
        provider.init(self)

    def __repr__(self) -> str:
        return (f"PagePool(#{self.id} {self.name}, {self.provider.kind}, cache={len(self.cache)},"
                f" inflight={self.inflight}{', destroying' if self.destroying else ''})")

    def attach(self, space: BufferSpace) -> None:
        """``space`` joined the provider's set (a zcrx area added while the queue runs): the
        pool may now hold its buffers."""
        if not self.destroyed:
            space.pools[self.id] = self
            self.cache.grow(self.spaces.total)

    def alloc(self, n: int) -> NDArray[np.int64]:
        """Up to ``n`` buffers (keys) for the driver (state DRIVER, pp_ref 1): from the
        cache, then the provider.  May return fewer (memory short); never more."""
        if self.destroying:
            raise Misuse(f"{self}: alloc from a pool being destroyed")
        if n <= 0:
            return _EMPTY
        ids = self.cache.pop(n)
        if len(ids) < n:
            fresh = self.provider.alloc(self, n - len(ids))
            if len(fresh):
                for sp, b in self.spaces.groups(fresh):
                    sp.pp[b] = self.id
            # The provider may have recycled buffers into our cache meanwhile (refill queue).
            more = self.cache.pop(n - len(ids) - len(fresh))
            parts = [p for p in (ids, more, fresh) if len(p)]
            ids = parts[0] if len(parts) == 1 else (np.concatenate(parts) if parts else _EMPTY)
            if len(ids) < n:
                self.alloc_short += 1
        if len(ids):
            for sp, b in self.spaces.groups(ids):
                sp.state[b] = _DRIVER
                sp.pp_ref[b] = 1
            self.inflight += len(ids)
        return ids

    def post(self, ids: NDArray[np.int64]) -> None:
        """The driver put these DRIVER buffers (keys) on the NIC's fill ring."""
        for sp, b in self.spaces.groups(ids):
            sp.state[b] = _POSTED

    def put_ref(self, ids: NDArray[np.int64]) -> int:
        """Drop one page-pool reference per key (:meth:`BufferSpace.put_ref`)."""
        return self.spaces.put_ref(ids)

    def recycle(self, ids: NDArray[np.int64], space: BufferSpace | None = None) -> None:
        """Take back buffers ``ids`` of ``space`` (default the first) whose last reference
        dropped: into the cache, or to the provider when the pool is being destroyed (which
        may complete the destruction)."""
        n = len(ids)
        if n == 0:
            return
        sp = self.space if space is None else space
        self.inflight -= n
        if self.inflight < 0:
            raise InvariantBroken(f"{self}: more buffers recycled than were in flight")
        keys = SpaceSet.keys(sp, ids)
        if self.destroying:
            self.provider.release(self, keys)
            if self.inflight == 0:
                self._finish()
            return
        sp.state[ids] = _CACHE
        self.cache.push(keys)

    def destroy(self) -> bool:
        """Start destruction: the cache goes back to the provider now; in-flight buffers
        when they come home.  True when the pool is already fully destroyed."""
        if not self.destroying:
            self.destroying = True
            cached = self.cache.pop(len(self.cache))
            if len(cached):
                self.provider.release(self, cached)
            if self.inflight == 0:
                self._finish()
        return self.destroyed

    def _finish(self) -> None:
        self.destroyed = True
        for sp in self.spaces.spaces:
            sp.pools.pop(self.id, None)
        self.provider.destroy(self)
        if self.on_destroyed is not None:
            cb, self.on_destroyed = self.on_destroyed, None
            cb(self)

    def ledger(self) -> dict[str, int]:
        """The ledger of the pool's first space (see :meth:`BufferSpace.ledger`)."""
        return self.space.ledger()

    def check_ledger(self) -> dict[str, int]:
        """Verify the pool's spaces' ledgers (see :meth:`BufferSpace.check_ledger`); returns
        the first one's."""
        led = self.space.check_ledger()
        for sp in self.spaces.spaces[1:]:
            if not sp.closed:
                sp.check_ledger()
        return led
