"""Byte-pattern verification for the sample programs: is every received byte the one sent?

The NIC's generator sends :mod:`shared.pattern` streams (stream id = the TCP source port), so a
receiver can check each byte from its stream offset alone.  These helpers do that for a batch of
zcrx chunks read in place (a fixed number of numpy operations per batch) or for one copied
buffer.  They live beside the sample programs, not in :mod:`app_proc.liburing`, as liburing
keeps its verify mode in ``examples/``: the library hands out chunks, the program checks them.

Nothing here writes to the memory it checks: areas stay the kernel's and the NIC's to write.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

from app_proc import liburing as L
from shared import pattern
from shared.errors import Misuse

__all__ = [
    "first_bad_offset",
    "zcrx_hash_runs",
    "zcrx_return_verified",
    "zcrx_runs",
    "zcrx_stream_offsets",
    "zcrx_verify",
]

#: Chunks of one width verified by gathers of this many bytes each (the received rows and
#: the pattern rows both stay in a core's cache; 16 MiB gathers ran 3-5x slower than 256 KiB
#: ones), and the fewest chunks worth a gather.
_GATHER_BYTES = 256 << 10
_GATHER_MIN = 4
#: Chunks longer than this are compared in place, one ``memcmp`` per pattern period, not
#: gathered (HW-GRO sessions of 64 KiB: 8.6 GB/s in place against 6 in gathers, 1 in 16 MiB).
_GATHER_MAX_WIDTH = 16 << 10
#: Runs shorter than this on average are hashed from one staged copy (one gather, one hash
#: update) instead of one update each: below it the Python call per run costs more than the
#: copy of a few cache-resident bytes.  (64-byte segments each in their own buffer: 1 run
#: per chunk; MSS-sized chunks of MTU 1500 are long enough to stay in place.)
_STAGE_MAX_RUN = 512


def first_bad_offset(stream: int, offset: int, data: Any) -> int | None:
    """The stream offset of the first byte of ``data`` (stream ``stream`` from ``offset``) that
    differs from the pattern, or None when every byte is right."""
    bad = pattern.verify(stream, offset, data)
    return offset + bad if bad >= 0 else None


def zcrx_stream_offsets(keys: NDArray[Any], length: NDArray[np.int64],
                        positions: dict[int, int]) -> NDArray[np.int64]:
    """Stream offset of each chunk: chunks of one key (connection) follow each other in CQ
    order from ``positions[key]``; ``positions`` is advanced past the batch.  A fixed number
    of numpy operations (plus one dict update per key)."""
    n = len(keys)
    if n == 0:
        return np.empty(0, dtype=np.int64)
    first_key = int(keys[0])
    if bool((keys == first_key).all()):
        start = positions.get(first_key, 0)
        ends = np.cumsum(length)
        positions[first_key] = start + int(ends[-1])
        return start + ends - length
    uniq, inv = np.unique(keys, return_inverse=True)
    order = np.argsort(inv, kind="stable")
    inv_s = inv[order]
    lens_s = length[order]
    ends = np.cumsum(lens_s)
    excl = ends - lens_s
    first = np.searchsorted(inv_s, np.arange(len(uniq)))
    base = np.array([positions.get(int(k), 0) for k in uniq.tolist()], dtype=np.int64)
    out = np.empty(n, dtype=np.int64)
    out[order] = base[inv_s] + excl - excl[first][inv_s]
    totals = np.add.reduceat(lens_s, first)
    for k, b, t in zip(uniq.tolist(), base.tolist(), totals.tolist(), strict=True):
        positions[int(k)] = b + t
    return out


def zcrx_runs(start: NDArray[np.int64], length: NDArray[np.int64],
              keys: NDArray[Any] | None = None,
              stream_off: NDArray[np.int64] | None = None) -> NDArray[np.intp]:
    """Indices where a run begins: a run is consecutive chunks lying back to back in the area
    (and, when given, of one key with consecutive stream offsets), so it can be read as one
    slice.  Chunks landing in consecutive buffers make long runs: one hash update, one compare.
    """
    n = len(start)
    if n == 0:
        return np.empty(0, dtype=np.intp)
    brk = np.empty(n, dtype=bool)
    brk[0] = True
    np.not_equal(start[1:], start[:-1] + length[:-1], out=brk[1:])
    if keys is not None:
        brk[1:] |= keys[1:] != keys[:-1]
    if stream_off is not None:
        brk[1:] |= stream_off[1:] != stream_off[:-1] + length[:-1]
    return np.flatnonzero(brk)


def zcrx_hash_runs(update: Any, area: NDArray[np.uint8], start: NDArray[np.int64],
                   length: NDArray[np.int64], heads: NDArray[np.intp],
                   ends: NDArray[np.intp]) -> int:
    """Feed runs of chunks to ``update`` (e.g. a ``hashlib`` object's), in order: run ``i`` is
    chunks ``heads[i]..ends[i]`` (inclusive), lying back to back in ``area``
    (:func:`zcrx_runs`).  The digest is that of the runs' bytes concatenated in order.

    Long runs are passed in place, one update each.  When the runs are short on average
    (:data:`_STAGE_MAX_RUN`) they are staged first: gathered into one private scratch array
    (a fixed number of numpy operations) and hashed with one update, since a Python call per
    64-byte chunk costs more than copying it.  The area is only read.  Returns the bytes
    staged (0 when hashed in place), for the caller's memory-traffic counters.
    """
    nr = len(heads)
    if nr == 0:
        return 0
    r0 = start[heads]
    r1 = start[ends] + length[ends]
    rl = r1 - r0
    total = int(rl.sum())
    if nr == 1 or total >= _STAGE_MAX_RUN * nr:
        for a, b in zip(r0.tolist(), r1.tolist(), strict=True):
            update(area[a:b])
        return 0
    w = int(rl[0])
    if not np.count_nonzero(rl != w):
        win = np.lib.stride_tricks.as_strided(area, shape=(len(area) - w + 1, w),
                                              strides=(1, 1), writeable=False)
        staged = win[r0]  # (runs, w), C-contiguous: one copy
    else:
        staged = area[np.repeat(r0 - (np.cumsum(rl) - rl), rl) + np.arange(total)]
    update(staged)
    return total


def zcrx_verify(area: NDArray[np.uint8], start: NDArray[np.int64], length: NDArray[np.int64],
                stream: NDArray[np.int64], stream_off: NDArray[np.int64]) -> NDArray[np.int64]:
    """Check chunks in place against :mod:`shared.pattern`: chunk ``i`` is ``length[i]`` bytes
    at area offset ``start[i]``, carrying stream ``stream[i]`` from ``stream_off[i]``.

    Returns per chunk the index of its first wrong byte, or -1.  Runs of back-to-back chunks
    are compared as one slice (:func:`zcrx_runs`); scattered chunks of one width are compared
    in gathers of :data:`_GATHER_BYTES`, and longer ones (over :data:`_GATHER_MAX_WIDTH`)
    in place.  Nothing is written to the area.
    """
    n = len(start)
    bad = np.full(n, -1, dtype=np.int64)
    if n == 0:
        return bad
    heads = zcrx_runs(start, length, stream, stream_off)
    counts = np.diff(np.append(heads, n))
    singles = heads[counts == 1]
    rest: list[int] = heads[counts > 1].tolist()
    if len(singles) >= _GATHER_MIN:
        widths = length[singles]
        for w in np.unique(widths).tolist():
            sel = singles[widths == w]
            if len(sel) < _GATHER_MIN or w > _GATHER_MAX_WIDTH or w > len(area):
                rest += sel.tolist()
                continue
            win = np.lib.stride_tricks.as_strided(area, shape=(len(area) - w + 1, w),
                                                  strides=(1, 1), writeable=False)
            words = w % 8 == 0  # compare 8 bytes at a time; bytes only for bad rows
            per = max(1, _GATHER_BYTES // w)
            for b in range(0, len(sel), per):
                s = sel[b:b + per]
                got = win[start[s]]  # (rows, w) copies, C-contiguous
                want = pattern.rows(stream[s], stream_off[s], w)
                if words:
                    rows = np.flatnonzero(
                        (got.view(np.uint64) != want.view(np.uint64)).any(axis=1))
                    if len(rows):
                        bad[s[rows]] = (got[rows] != want[rows]).argmax(axis=1)
                    continue
                neq = got != want
                rows = np.flatnonzero(neq.any(axis=1))
                if len(rows):
                    bad[s[rows]] = neq[rows].argmax(axis=1)
    else:
        rest += singles.tolist()
    if rest:
        run_end = dict(zip(heads.tolist(), (heads + counts).tolist(), strict=True))
        ends = start + length
        for h in rest:
            i, stop = h, run_end[h]
            while i < stop:
                s0 = int(start[i])
                r = pattern.verify(int(stream[i]), int(stream_off[i]), area[s0:int(ends[stop - 1])])
                if r < 0:
                    break
                pos = s0 + r
                k = i + int(np.searchsorted(ends[i:stop], pos, side="right"))
                bad[k] = pos - int(start[k])
                i = k + 1
    return bad


def zcrx_return_verified(ifq: L.ZcrxIfq, cqes: np.ndarray,
                         select: NDArray[np.bool_] | None = None, *,
                         streams: dict[int, int],
                         positions: dict[int, int] | None = None) -> L.ZcrxBatch:
    """:func:`~app_proc.liburing.io_uring_zcrx_return_cqes` with the check in between: find
    the data CQEs (:func:`~app_proc.liburing.zcrx_batch`), verify them in place (``streams``
    maps a CQE's ``user_data`` to its pattern stream id and ``positions`` holds each
    connection's next stream offset, advanced here), then return one RQE per data CQE with
    one tail store.  ``batch.stream_off`` and ``batch.bad`` say what the check found.

    The caller still releases the CQEs and handles non-data CQEs.
    """
    batch = L.zcrx_batch(ifq, cqes, select)
    if positions is None:
        raise Misuse("verification needs positions (next stream offset per user_data)")
    keys = cqes["user_data"][batch.index]
    batch.stream_off = zcrx_stream_offsets(keys, batch.length, positions)
    ids = np.array([streams[int(k)] for k in keys.tolist()], dtype=np.int64)
    batch.bad = zcrx_verify(ifq.area_view, batch.start, batch.length, ids, batch.stream_off)
    batch.returned = L.io_uring_zcrx_return(ifq, batch.off, batch.length)
    return batch
