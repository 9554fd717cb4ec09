"""skb records: one received frame's payload as a linear part plus frags (kernel side, no I/O).

Who owns what
-------------
The :class:`SkbStore` is kernel-private memory.  An skb is one received frame, seen
**payload only**: the L2..L4 headers were parsed by NAPI and TCP already and are not kept.
Its payload is, in order, an optional *linear part* (payload bytes the NIC placed in the
header slot - linear placement, tcp-data-split off or payload at or under hds-thresh - which
NAPI copies into the store's private byte arena, because the header slot is reused as soon as
the completion is released) followed by any number of *frags*, each a byte range of one
buffer of a :class:`~driver_proc.page_pool.BufferSpace` (kernel pages or, later, a zcrx area).

Each frag holds one page-pool reference on its buffer (taken over from the driver when the skb
is built, :meth:`BufferSpace.to_skb`).  :meth:`SkbStore.free` drops those references, which
recycles each buffer into its page pool when no other reference is left.

Layout (all numpy, grown by doubling)::

    per skb slot:  gen (of the next handle), hgen (of the live handle, or dead), seg_start,
                   seg_count, payload len
    segments:      src (space id, or LINEAR = -1), buf (buffer id, -1), flat (byte offset in
                   the source's flat span: buffer * buf_len + offset, or the arena offset), len
    linear arena:  uint8 bytes

An skb's segments are contiguous rows ``[seg_start, seg_start + seg_count)``: the linear part
first (if any), then the frags.  Segments and linear bytes are bump-allocated and compacted
(live records packed to the front) when the arena is full, so a steady stream costs O(1)
amortised per skb.

Handles are int64 ``(generation << 32) | slot``; a slot's generation changes every time it is
freed, so a stale or forged handle is detected (:class:`~shared.errors.InvariantBroken`:
handles never leave the kernel, so a bad one is our bug).  Handle 0 is never valid.

Every operation works on a batch with a fixed number of numpy calls; the common shapes
(one frag per skb; equal-length pieces) take the shortest paths.
"""

from __future__ import annotations

import weakref
from typing import NamedTuple

import numpy as np
from numpy.typing import ArrayLike, NDArray

from driver_proc.page_pool import KEY_MASK, KEY_SHIFT, BufferSpace, SpaceSet, _window, as_ids
from shared.errors import InvariantBroken, Misuse

__all__ = ["LINEAR", "Chunks", "SkbStore"]

#: Segment source of the linear part (the store's own byte arena).
LINEAR = -1
_SLOT_MASK = 0xFFFFFFFF
_GEN_LIMIT = 1 << 31
#: ``_hgen`` of a free slot: no handle's ``h >> 32`` can equal it.
_DEAD = -(1 << 40)
_EMPTY = np.empty(0, dtype=np.int64)
_EMPTY.flags.writeable = False


class Chunks(NamedTuple):
    """Where payload bytes live: chunk i is ``length[i]`` bytes of request item ``piece[i]``.

    ``src`` is the :attr:`BufferSpace.space_id` (or :data:`LINEAR`), ``buf`` the buffer id
    (-1 for linear), ``off`` the byte offset inside that buffer (for linear: inside the
    store's arena), ``flat`` the byte offset inside the source's flat span.  Chunks are in
    payload order, piece after piece.
    """

    piece: NDArray[np.int64]
    src: NDArray[np.int64]
    buf: NDArray[np.int64]
    off: NDArray[np.int64]
    flat: NDArray[np.int64]
    length: NDArray[np.int64]


def _excl_cumsum(a: NDArray[np.int64]) -> NDArray[np.int64]:
    out = np.cumsum(a)
    out -= a
    return out


def _per_skb(v: ArrayLike | None, n: int) -> NDArray[np.int64]:
    """``v`` as an (n,) int64 array: None -> zeros, a scalar -> filled, else checked."""
    if v is None:
        return np.zeros(n, dtype=np.int64)
    if isinstance(v, int | np.integer):
        return np.full(n, int(v), dtype=np.int64)
    a = as_ids(v)
    if len(a) != n:
        raise Misuse(f"expected {n} values, got {len(a)}")
    return a


class _FragSrc(NamedTuple):
    """Frag buffers of a batch resolved to segment fields: ``src`` (a space id, or one per
    frag), ``buf`` (buffer ids in their spaces) and the ``(space, ids)`` groups whose
    references the skbs take over."""

    src: int | NDArray[np.int64]
    buf: NDArray[np.int64]
    groups: list[tuple[BufferSpace, NDArray[np.int64]]]


def _frag_src(space: BufferSpace | SpaceSet, frag_bufs: ArrayLike) -> _FragSrc:
    """Check and resolve frag buffers: ids of ``space``, or keys of a :class:`SpaceSet`
    (a NAPI batch of a queue whose pool spans several spaces, e.g. zcrx areas)."""
    if isinstance(space, SpaceSet):
        if len(space) > 1:
            keys = space.check_keys(frag_bufs)
            return _FragSrc(space.sids[keys >> KEY_SHIFT], keys & KEY_MASK,
                            space.groups(keys))
        space = space.spaces[0]
    bufs = space.check_ids(frag_bufs)
    return _FragSrc(space.space_id, bufs, [(space, bufs)])


def _expand(starts: NDArray[np.int64], counts: NDArray[np.int64]) -> NDArray[np.int64]:
    """Concatenation of ``arange(starts[i], starts[i] + counts[i])`` (four numpy calls)."""
    ends = np.cumsum(counts)
    total = int(ends[-1]) if len(ends) else 0
    return np.repeat(starts - (ends - counts), counts) + np.arange(total, dtype=np.int64)


class SkbStore:
    """All skbs of the kernel: records, frag references and linear bytes.

    Args:
        capacity: initial skb slots.
        seg_capacity: initial segment rows (default ``2 * capacity``).
        linear_capacity: initial bytes of the linear arena.
    """

    def __init__(self, capacity: int = 1024, seg_capacity: int | None = None,
                 linear_capacity: int = 1 << 16) -> None:
        cap = max(16, int(capacity))
        self._cap = cap
        self._gen = np.ones(cap, dtype=np.int64)
        self._hgen = np.full(cap, _DEAD, dtype=np.int64)
        self._seg_start = np.zeros(cap, dtype=np.int64)
        self._seg_count = np.zeros(cap, dtype=np.int64)
        self._len = np.zeros(cap, dtype=np.int64)
        self._free_slots = np.arange(cap - 1, -1, -1, dtype=np.int64)
        self._nfree = cap
        self._scratch = np.empty(cap, dtype=np.int64)
        scap = max(32, int(seg_capacity or 2 * cap))
        self._s_src = np.zeros(scap, dtype=np.int64)
        self._s_buf = np.zeros(scap, dtype=np.int64)
        self._s_flat = np.zeros(scap, dtype=np.int64)
        self._s_len = np.zeros(scap, dtype=np.int64)
        self._s_tail = 0
        self._lin = np.zeros(max(4096, int(linear_capacity)), dtype=np.uint8)
        self._lin_tail = 0
        self._spaces: weakref.WeakValueDictionary[int, BufferSpace] = (
            weakref.WeakValueDictionary())
        self.in_flight = 0
        self.stats = {"added": 0, "freed": 0, "linear_bytes": 0, "seg_compactions": 0,
                      "lin_compactions": 0, "copy_bytes": 0, "copy_general": 0}
        #: bytes :meth:`copy_out` read, per source (a space id, or :data:`LINEAR`): the
        #: kernel's memory-traffic accounting classifies them by region kind
        self.copied_by_src: dict[int, int] = {}

    # -- slots -------------------------------------------------------------------------------

    def _alloc_slots(self, n: int) -> NDArray[np.int64]:
        if self._nfree < n:
            self._grow_slots(max(2 * self._cap, self._cap + n))
        top = self._nfree
        slots = self._free_slots[top - n:top][::-1].copy()
        self._nfree = top - n
        return slots

    def _grow_slots(self, new_cap: int) -> None:
        old = self._cap
        for name, fill in (("_gen", 1), ("_hgen", _DEAD), ("_seg_start", 0),
                           ("_seg_count", 0), ("_len", 0)):
            a = getattr(self, name)
            b = np.full(new_cap, fill, dtype=a.dtype)
            b[:old] = a
            setattr(self, name, b)
        fs = np.empty(new_cap, dtype=np.int64)
        top = self._nfree
        fs[:top] = self._free_slots[:top]
        # New slots go on top of the free stack, the lowest id on top (popped first).
        fs[top:top + new_cap - old] = np.arange(new_cap - 1, old - 1, -1)
        self._free_slots = fs
        self._nfree = top + new_cap - old
        self._scratch = np.empty(new_cap, dtype=np.int64)
        self._cap = new_cap

    def _slots(self, handles: ArrayLike) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
        """Validate handles; return ``(handles, slots)``.  Raises InvariantBroken."""
        h = as_ids(handles)
        slots = h & _SLOT_MASK
        try:
            hg = self._hgen[slots]
        except IndexError:
            raise InvariantBroken("skb handle out of range") from None
        if np.count_nonzero(hg != (h >> 32)):
            raise InvariantBroken("stale skb handle (already freed) or forged handle")
        return h, slots

    # -- arenas ------------------------------------------------------------------------------

    def _reserve_segs(self, n: int) -> int:
        if self._s_tail + n > len(self._s_src):
            self._compact_segs(n)
        base = self._s_tail
        self._s_tail += n
        return base

    def _compact_segs(self, extra: int) -> None:
        """Pack live skbs' segments to the front (grow if less than half would be free)."""
        self.stats["seg_compactions"] += 1
        live = np.flatnonzero(self._hgen != _DEAD)
        cnt = self._seg_count[live]
        total = int(cnt.sum())
        cap = len(self._s_src)
        if total + extra > cap // 2:
            cap = max(2 * cap, 2 * (total + extra))
        idx = _expand(self._seg_start[live], cnt) if total else _EMPTY
        for name in ("_s_src", "_s_buf", "_s_flat", "_s_len"):
            a = getattr(self, name)
            b = np.zeros(cap, dtype=np.int64)
            b[:total] = a[idx]
            setattr(self, name, b)
        self._seg_start[live] = _excl_cumsum(cnt)
        self._s_tail = total

    def _reserve_lin(self, n: int) -> int:
        if self._lin_tail + n > len(self._lin):
            self._compact_lin(n)
        base = self._lin_tail
        self._lin_tail += n
        return base

    def _compact_lin(self, extra: int) -> None:
        """Pack live linear bytes to the front of the arena (segments first)."""
        self.stats["lin_compactions"] += 1
        self._compact_segs(0)
        t = self._s_tail
        rows = np.flatnonzero(self._s_src[:t] == LINEAR)
        lens = self._s_len[rows]
        total = int(lens.sum())
        cap = len(self._lin)
        if total + extra > cap // 2:
            cap = max(2 * cap, 2 * (total + extra))
        new = np.zeros(cap, dtype=np.uint8)
        if total:
            new[:total] = self._lin[_expand(self._s_flat[rows], lens)]
        self._s_flat[rows] = _excl_cumsum(lens)
        self._lin = new
        self._lin_tail = total

    def _space(self, sid: int) -> BufferSpace:
        sp = self._spaces.get(sid)
        if sp is None or sp.closed:
            raise InvariantBroken(f"skb frag in buffer space #{sid}, which is gone")
        return sp

    def _source(self, src: int) -> NDArray[np.uint8]:
        return self._lin if src == LINEAR else self._space(src).flat

    # -- building ----------------------------------------------------------------------------

    def add_batch(self, n: int, *, space: BufferSpace | SpaceSet | None = None,
                  nr_frags: ArrayLike | None = None, frag_bufs: ArrayLike | None = None,
                  frag_lens: ArrayLike | None = None, frag_offs: ArrayLike | None = None,
                  lin_src: NDArray[np.uint8] | None = None, lin_row: ArrayLike | None = None,
                  lin_off: ArrayLike | None = None, lin_len: ArrayLike | None = None,
                  ) -> NDArray[np.int64]:
        """Build ``n`` skbs (one NAPI batch); return their handles.

        Frags: skb ``i`` gets the next ``nr_frags[i]`` entries of ``frag_bufs`` (buffer ids of
        ``space``, or keys of a :class:`SpaceSet`: frags of several spaces in one batch),
        ``frag_lens`` and ``frag_offs`` (default 0); a scalar ``nr_frags`` applies to every
        skb.  The skbs take over the caller's page-pool reference on each
        frag buffer (state IN_SKB).

        Linear part: ``lin_len[i]`` payload bytes copied from
        ``lin_src[lin_row[i], lin_off[i]:]`` (``lin_row`` defaults to ``i``; ``lin_src`` is
        2-D uint8, e.g. the header slots of the batch).  A payload is the linear part
        followed by the frags.

        Raises :class:`Misuse` on inconsistent arguments (nothing is built).
        """
        n = int(n)
        if n <= 0:
            return _EMPTY
        if lin_len is None and frag_offs is None and isinstance(nr_frags, int | np.integer) \
                and int(nr_frags) == 1:
            return self._add_one_frag(n, space, frag_bufs, frag_lens)
        nf = _per_skb(nr_frags, n)
        F = int(nf.sum())
        bufs = flens = foffs = _EMPTY
        fsrc: _FragSrc | None = None
        if F:
            if space is None or frag_bufs is None or frag_lens is None:
                raise Misuse("frags need a space, frag_bufs and frag_lens")
            fsrc = _frag_src(space, frag_bufs)
            bufs = fsrc.buf
            flens = as_ids(frag_lens)
            foffs = _per_skb(frag_offs, F)
            if len(bufs) != F or len(flens) != F:
                raise Misuse(f"{F} frags announced, {len(bufs)} buffers, {len(flens)} lengths")
            if int(flens.min()) <= 0 or int((foffs + flens).max()) > space.buf_len \
                    or int(foffs.min()) < 0:
                raise Misuse("frag outside its buffer, or empty")
        ll = _per_skb(lin_len, n)
        m = int(np.count_nonzero(ll)) if lin_len is not None else 0
        if m:
            if lin_src is None or lin_off is None or lin_src.ndim != 2:
                raise Misuse("a linear part needs lin_src (2-D) and lin_off")
            lo = _per_skb(lin_off, n)
            width = lin_src.shape[1]
            if int(ll.min()) < 0 or int(lo.min()) < 0 or int((lo + ll).max()) > width:
                raise Misuse("linear part outside its source row")
            rows = (np.arange(n, dtype=np.int64) if lin_row is None
                    else _per_skb(lin_row, n))
            if int(rows.min()) < 0 or int(rows.max()) >= lin_src.shape[0]:
                raise Misuse("linear source row out of range")
            has_lin = (ll > 0).astype(np.int64)
        else:
            has_lin = np.zeros(n, dtype=np.int64)

        slots = self._alloc_slots(n)
        try:
            if m:
                assert lin_src is not None
                # Linear bytes first: compacting the arena also compacts segments.
                sel = np.flatnonzero(ll) if m != n else np.arange(n, dtype=np.int64)
                lens = ll[sel]
                W = int(lens.max())
                lbase = self._reserve_lin(m * W)
                block = self._lin[lbase:lbase + m * W].reshape(m, W)
                r, o = rows[sel], lo[sel]
                o0 = int(o[0])
                if o0 + W <= width and bool((o == o0).all()):
                    if m == n and lin_row is None:
                        block[...] = lin_src[:n, o0:o0 + W]
                    else:
                        block[...] = lin_src[r, o0:o0 + W]
                else:
                    cols = np.minimum(o[:, None] + np.arange(W), width - 1)
                    block[...] = np.take_along_axis(lin_src[r], cols, axis=1)
                self.stats["linear_bytes"] += int(lens.sum())
            seg_count = nf + has_lin
            base = self._reserve_segs(int(seg_count.sum()))
            starts = _excl_cumsum(seg_count) + base
            payload = np.zeros(n, dtype=np.int64)
            if m:
                pos = starts[sel]
                self._s_src[pos] = LINEAR
                self._s_buf[pos] = -1
                self._s_flat[pos] = lbase + np.arange(m, dtype=np.int64) * W
                self._s_len[pos] = lens
                payload += ll
            if F:
                assert space is not None and fsrc is not None
                fpos = _expand(starts + has_lin, nf)
                self._s_src[fpos] = fsrc.src
                self._s_buf[fpos] = bufs
                self._s_flat[fpos] = bufs * space.buf_len + foffs
                self._s_len[fpos] = flens
                cs = np.zeros(F + 1, dtype=np.int64)
                np.cumsum(flens, out=cs[1:])
                end = np.cumsum(nf)
                payload += cs[end] - cs[end - nf]
        except BaseException:
            self._release_slots(slots)
            raise
        if fsrc is not None:
            for sp, b in fsrc.groups:
                self._spaces[sp.space_id] = sp
                sp.to_skb(b)
        return self._commit(slots, starts, seg_count, payload)

    def _add_one_frag(self, n: int, space: BufferSpace | SpaceSet | None,
                      frag_bufs: ArrayLike | None, frag_lens: ArrayLike | None
                      ) -> NDArray[np.int64]:
        """The NAPI fast path: every skb is one frag at the start of its buffer."""
        if space is None or frag_bufs is None or frag_lens is None:
            raise Misuse("frags need a space, frag_bufs and frag_lens")
        fsrc = _frag_src(space, frag_bufs)
        bufs = fsrc.buf
        flens = as_ids(frag_lens)
        if len(bufs) != n or len(flens) != n:
            raise Misuse(f"{n} frags announced, {len(bufs)} buffers, {len(flens)} lengths")
        if np.count_nonzero((flens - 1).view(np.uint64) >= space.buf_len):  # 1..buf_len
            raise Misuse("frag outside its buffer, or empty")
        slots = self._alloc_slots(n)
        base = self._reserve_segs(n)
        sl = slice(base, base + n)
        self._s_src[sl] = fsrc.src
        self._s_buf[sl] = bufs
        np.multiply(bufs, space.buf_len, out=self._s_flat[sl])
        self._s_len[sl] = flens
        for sp, b in fsrc.groups:
            self._spaces[sp.space_id] = sp
            sp.to_skb(b)
        return self._commit(slots, np.arange(base, base + n, dtype=np.int64), 1, flens)

    def _commit(self, slots: NDArray[np.int64], starts: NDArray[np.int64],
                seg_count: NDArray[np.int64] | int, payload: NDArray[np.int64]
                ) -> NDArray[np.int64]:
        n = len(slots)
        self._seg_start[slots] = starts
        self._seg_count[slots] = seg_count
        self._len[slots] = payload
        gen = self._gen[slots]
        self._hgen[slots] = gen
        self.in_flight += n
        self.stats["added"] += n
        gen <<= 32
        gen |= slots
        return gen

    def _release_slots(self, slots: NDArray[np.int64]) -> None:
        self._hgen[slots] = _DEAD
        # Next generation, 1 .. 2**31 - 1 (wrapping), so an old handle never matches again.
        self._gen[slots] = self._gen[slots] % (_GEN_LIMIT - 1) + 1
        n = len(slots)
        top = self._nfree
        self._free_slots[top:top + n] = slots[::-1]
        self._nfree = top + n

    # -- freeing -----------------------------------------------------------------------------

    def free(self, handles: ArrayLike) -> int:
        """Free skbs: drop each frag's page-pool reference (recycling buffers whose last
        reference went) and their linear bytes.  Returns the number freed.

        Raises :class:`InvariantBroken` (before changing anything) on a stale, forged or
        repeated handle.
        """
        _, slots = self._slots(handles)
        n = len(slots)
        if n == 0:
            return 0
        if n > 1:
            r = np.arange(n, dtype=np.int64)
            self._scratch[slots] = r
            if np.count_nonzero(self._scratch[slots] != r):
                raise InvariantBroken("skb handle freed twice in one call")
        cnt = self._seg_count[slots]
        if not np.count_nonzero(cnt != 1):
            segs = self._seg_start[slots]
        else:
            segs = _expand(self._seg_start[slots], cnt)
        self._release_slots(slots)
        self.in_flight -= n
        self.stats["freed"] += n
        if len(segs) == 0:
            return n
        src = self._s_src[segs]
        s0 = int(src[0])
        if s0 != LINEAR and not np.count_nonzero(src != s0):
            self._put(s0, self._s_buf[segs])
        else:
            for sid in np.unique(src).tolist():
                if sid != LINEAR:
                    self._put(sid, self._s_buf[segs[src == sid]])
        return n

    def _put(self, sid: int, bufs: NDArray[np.int64]) -> None:
        sp = self._spaces.get(sid)
        if sp is None:
            raise InvariantBroken(f"skb frag in buffer space #{sid}, which is gone")
        sp.put_ref(bufs)

    def live_handles(self) -> NDArray[np.int64]:
        """Handles of every live skb (teardown, diagnostics)."""
        live = np.flatnonzero(self._hgen != _DEAD)
        return (self._hgen[live] << 32) | live

    def refs_by_space(self) -> dict[int, int]:
        """Frag references held by live skbs, per space id (ledger cross-checks)."""
        live = np.flatnonzero(self._hgen != _DEAD)
        cnt = self._seg_count[live]
        if int(cnt.sum()) == 0:
            return {}
        src = self._s_src[_expand(self._seg_start[live], cnt)]
        ids, n = np.unique(src[src != LINEAR], return_counts=True)
        return {int(i): int(c) for i, c in zip(ids, n, strict=True)}

    # -- reading -----------------------------------------------------------------------------

    def payload_len(self, handles: ArrayLike) -> NDArray[np.int64]:
        """Payload bytes of each skb."""
        _, slots = self._slots(handles)
        return self._len[slots].copy()

    def _pieces(self, handles: ArrayLike, offsets: ArrayLike, lengths: ArrayLike
                ) -> tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.int64]]:
        _, slots = self._slots(handles)
        n = len(slots)
        off = _per_skb(offsets, n)
        ln = _per_skb(lengths, n)
        # 0 <= off <= payload and 0 <= len <= payload - off (negatives wrap when unsigned)
        size = self._len[slots]
        u = np.uint64
        if np.count_nonzero((off.view(u) > size.view(u)) | (ln.view(u) > (size - off).view(u))):
            raise Misuse("byte range outside the skb payload")
        return slots, off, ln

    def _chunks(self, slots: NDArray[np.int64], off: NDArray[np.int64], ln: NDArray[np.int64]
                ) -> tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.int64],
                           NDArray[np.int64]]:
        """``(piece, seg, start_in_seg, len)`` of every non-empty piece/segment overlap."""
        n = len(slots)
        cnt = self._seg_count[slots]
        if not np.count_nonzero(cnt != 1):
            piece = np.arange(n, dtype=np.int64)
            seg = self._seg_start[slots]
            if np.count_nonzero(ln) == n:
                return piece, seg, off, ln
            k = ln > 0
            return piece[k], seg[k], off[k], ln[k]
        seg = _expand(self._seg_start[slots], cnt)
        piece = np.repeat(np.arange(n, dtype=np.int64), cnt)
        sl = self._s_len[seg]
        cs0 = np.zeros(len(seg) + 1, dtype=np.int64)
        np.cumsum(sl, out=cs0[1:])
        first = np.cumsum(cnt) - cnt
        pos = cs0[:-1] - np.repeat(cs0[first], cnt)  # payload offset of each segment
        po = off[piece]
        lo = np.maximum(pos, po)
        hi = np.minimum(pos + sl, po + ln[piece])
        k = hi > lo
        return piece[k], seg[k], (lo - pos)[k], (hi - lo)[k]

    def resolve(self, handles: ArrayLike, offsets: ArrayLike, lengths: ArrayLike) -> Chunks:
        """Where payload bytes ``[offsets[i], offsets[i] + lengths[i])`` of skb
        ``handles[i]`` live, as :class:`Chunks` (one per piece/segment overlap, in order)."""
        slots, off, ln = self._pieces(handles, offsets, lengths)
        if len(slots) == 0:
            return Chunks(_EMPTY, _EMPTY, _EMPTY, _EMPTY, _EMPTY, _EMPTY)
        piece, seg, start, length = self._chunks(slots, off, ln)
        src, buf = self._s_src[seg], self._s_buf[seg]
        flat = self._s_flat[seg] + start
        inbuf = flat.copy()  # linear: the arena offset; frags: the offset in the buffer
        lo, hi = (int(src.min()), int(src.max())) if len(src) else (LINEAR, LINEAR)
        if lo == hi:  # one source (the common case): no sort, no masks
            if lo != LINEAR:
                inbuf -= buf * self._space(lo).buf_len
        else:
            for sid in np.unique(src).tolist():
                if sid != LINEAR:
                    k = src == sid
                    inbuf[k] -= buf[k] * self._space(sid).buf_len
        return Chunks(piece, src, buf, inbuf, flat, length.copy())

    def frags(self, handles: ArrayLike) -> Chunks:
        """Every segment of each skb's payload (linear part as ``src == LINEAR``)."""
        _, slots = self._slots(handles)
        return self.resolve(handles, 0, self._len[slots])

    def copy_out(self, handles: ArrayLike, offsets: ArrayLike, lengths: ArrayLike,
                 dst: NDArray[np.uint8]) -> int:
        """Copy payload bytes ``[offsets[i], offsets[i] + lengths[i])`` of each skb, in
        order, contiguously into the front of ``dst`` (contiguous 1-D uint8); return the
        byte count.

        The RECV copy path.  Equal-length pieces in one buffer space (full frames) take one
        ``take``; a differing first and last piece (a partly read head, a cut tail) two slice
        copies more; anything else one gather and one masked copy.  Raises :class:`Misuse`
        for a range outside a payload or a short ``dst``.
        """
        slots, off, ln = self._pieces(handles, offsets, lengths)
        total = int(ln.sum()) if len(ln) else 0
        if dst.dtype != np.uint8 or dst.ndim != 1 or dst.shape[0] < total \
                or not dst.flags.c_contiguous:
            raise Misuse(f"dst must be a contiguous 1-D uint8 array of >= {total} bytes")
        if total == 0:
            return 0
        _, seg, start, length = self._chunks(slots, off, ln)
        src = self._s_src[seg]
        flat = self._s_flat[seg] + start
        self._gather(src, flat, length, dst)
        self.stats["copy_bytes"] += total
        by = self.copied_by_src
        s0 = int(src[0])
        if not np.count_nonzero(src != s0):
            by[s0] = by.get(s0, 0) + total
        else:
            ids, inv = np.unique(src, return_inverse=True)
            for sid, n in zip(ids.tolist(), np.bincount(inv, weights=length).tolist(),
                              strict=True):
                by[sid] = by.get(sid, 0) + int(n)
        return total

    def _rows(self, sid: int, data: NDArray[np.uint8], flat: NDArray[np.int64], L: int,
              out: NDArray[np.uint8]) -> None:
        """``out[i] = data[flat[i]:flat[i] + L]`` for equal-length chunks."""
        sp = self._spaces.get(sid) if sid != LINEAR else None
        if sp is not None and sp.buf_len == L and not np.count_nonzero(flat % L):
            # Whole buffers: one take from the contiguous (count, buf_len) view, no temporary.
            np.take(sp.data, flat // L, axis=0, out=out, mode="clip")
        else:
            # A gather from a strided window (never np.take: it would copy the window).
            out[...] = _window(data, L)[flat]

    def _gather(self, src: NDArray[np.int64], flat: NDArray[np.int64],
                lens: NDArray[np.int64], dst: NDArray[np.uint8]) -> None:
        n = len(lens)
        s0 = int(src[0])
        one_src = not np.count_nonzero(src != s0)
        if one_src:
            data = self._source(s0)
            L = int(lens[0])
            if not np.count_nonzero(lens != L):
                self._rows(s0, data, flat, L, dst[:n * L].reshape(n, L))
                return
            if n > 2:
                L = int(lens[1])
                if not np.count_nonzero(lens[1:-1] != L):
                    a, z, mid = int(lens[0]), int(lens[-1]), n - 2
                    f0, f1 = int(flat[0]), int(flat[-1])
                    dst[:a] = data[f0:f0 + a]
                    self._rows(s0, data, flat[1:-1], L, dst[a:a + mid * L].reshape(mid, L))
                    p = a + mid * L
                    dst[p:p + z] = data[f1:f1 + z]
                    return
        # General: gather every chunk into a row of W bytes, then one masked copy.
        self.stats["copy_general"] += 1
        W = int(lens.max())
        block = np.empty((n, W), dtype=np.uint8)
        groups = [(s0, None)] if one_src else [
            (sid, np.flatnonzero(src == sid)) for sid in np.unique(src).tolist()]
        for sid, rows in groups:
            data = self._source(sid)
            f = flat if rows is None else flat[rows]
            r = np.arange(n) if rows is None else rows
            limit = data.shape[0] - W
            near_end = f > limit
            if near_end.any():
                # Chunks in the last W bytes of their source: short rows copied one by one.
                for i in np.flatnonzero(near_end).tolist():
                    ri, fi, li = int(r[i]), int(f[i]), int(lens[r[i]])
                    block[ri, :li] = data[fi:fi + li]
                keep = ~near_end
                r, f = r[keep], f[keep]
            if len(r):
                block[r] = _window(data, W)[f]
        mask = np.arange(W) < lens[:, None]
        total = int(lens.sum())
        dst[:total] = block[mask]
