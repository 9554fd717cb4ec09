"""The verifiable byte pattern carried by every generated TCP stream.

The byte at stream offset ``o`` of stream ``s`` is a pure function of ``(s, o)``::

    byte(s, o) = BASE[(o + phase(s)) % PERIOD]

so a receiver that knows only a chunk's stream offset can check it, wherever the
chunk landed (zero-copy niov, copy-fallback buffer, linear header part).

* ``PERIOD`` is the prime 65521: it never lines up with 4 KiB buffers, pages or
  any power-of-two ring, so a chunk put at the wrong offset (off by a buffer, a
  page, a ring lap) does not match by accident.
* ``BASE`` is a fixed pseudo-random byte table made with splitmix64 from a fixed
  seed in plain integer arithmetic, so it is the same on every machine and numpy
  version (no dependence on numpy's random streams).
* ``phase(s) = (s mod PERIOD) * PHASE_MULT mod PERIOD``: a linear map, so the
  first ``PERIOD`` stream ids all get distinct phases, and at the same offset two
  of them agree only byte-by-byte by chance (about 1 in 256).  Stream ids are
  non-negative integers; ``s`` and ``s + PERIOD`` are the same stream as far as
  the pattern goes.  Stream ``s`` at offset ``o`` equals stream ``s'`` at offset
  ``o + (s - s') * PHASE_MULT`` (mod ``PERIOD``): a chunk of another stream
  passes only if it also sits at exactly that offset shift.

Speed: ``fill`` and ``verify`` are one slice copy / one ``memcmp`` of a doubled
table (``_EXT``, two periods back to back, so any window of up to ``PERIOD``
bytes is contiguous); longer chunks repeat the same window once per period.
:func:`rows` / :func:`rows_at` gather a whole batch of windows with one fancy
index on a sliding-window view, for the frame builder.
"""

from __future__ import annotations

import hashlib

import numpy as np
import numpy.typing as npt

__all__ = [
    "BASE",
    "PERIOD",
    "PHASE_MULT",
    "SEED",
    "expected_sha256",
    "fill",
    "fill_rows",
    "pattern_bytes",
    "phase",
    "phases",
    "rows",
    "rows_at",
    "verify",
]

#: Length of the pattern's period (a prime, the largest below 2**16).
PERIOD: int = 65521
#: Multiplier of the stream-id -> phase map (about PERIOD / golden ratio, coprime to PERIOD).
PHASE_MULT: int = 40499
#: Seed of the base table.  Changing it changes every stream; it is part of the ABI.
SEED: int = 0x7A637278  # "zcrx"


def _make_base() -> npt.NDArray[np.uint8]:
    """splitmix64 over ``SEED + i``, top byte of each output (vectorised, wraps mod 2**64)."""
    with np.errstate(over="ignore"):
        i = np.arange(1, PERIOD + 1, dtype=np.uint64)
        z = i * np.uint64(0x9E3779B97F4A7C15) + np.uint64(SEED)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(56)).astype(np.uint8)


#: One period of the pattern, read-only.
BASE: npt.NDArray[np.uint8] = _make_base()
BASE.flags.writeable = False

# Two periods back to back: _EXT[p : p + n] is the pattern for any p < PERIOD, n <= PERIOD.
_EXT: npt.NDArray[np.uint8] = np.concatenate([BASE, BASE])
_EXT.flags.writeable = False
# _WIN[p, :n] == _EXT[p : p + n]: a (PERIOD, PERIOD) strided view, no memory of its own.
_WIN: npt.NDArray[np.uint8] = np.lib.stride_tricks.sliding_window_view(_EXT, PERIOD)[:PERIOD]
# Three periods: _WIN2[p, :n] is the pattern at p % PERIOD for any p < 2 * PERIOD, n <= PERIOD.
_EXT3: npt.NDArray[np.uint8] = np.concatenate([BASE, BASE, BASE])
_EXT3.flags.writeable = False
_WIN2: npt.NDArray[np.uint8] = np.lib.stride_tricks.sliding_window_view(_EXT3, PERIOD)[: 2 * PERIOD]


def phase(stream: int) -> int:
    """Where stream ``stream`` starts in :data:`BASE` (its byte 0 is ``BASE[phase(stream)]``)."""
    return (int(stream) % PERIOD) * PHASE_MULT % PERIOD


def phases(streams: npt.ArrayLike) -> npt.NDArray[np.int64]:
    """:func:`phase` of an array of non-negative stream ids, as int64."""
    s = np.asarray(streams, dtype=np.int64) % PERIOD
    return s * PHASE_MULT % PERIOD


def _as_u8(data: npt.ArrayLike | bytes | bytearray | memoryview) -> npt.NDArray[np.uint8]:
    """View (never copy when avoidable) ``data`` as a flat uint8 array."""
    if isinstance(data, np.ndarray):
        if data.dtype != np.uint8:
            data = data.view(np.uint8) if data.flags.c_contiguous else data.astype(np.uint8)
        return data.reshape(-1)
    if isinstance(data, bytes | bytearray | memoryview):
        return np.frombuffer(data, dtype=np.uint8)
    return np.asarray(data, dtype=np.uint8).reshape(-1)


def fill(stream: int, offset: int, out: npt.NDArray[np.uint8] | bytearray | memoryview) -> None:
    """Write the pattern of ``stream`` from stream offset ``offset`` into all of ``out``.

    ``out`` is a writable 1-D uint8 array (any length, strided is fine), a
    ``bytearray`` or a writable ``memoryview``.  One slice copy per ``PERIOD`` bytes.
    """
    dst = out if isinstance(out, np.ndarray) else np.frombuffer(out, dtype=np.uint8)
    n = dst.shape[0]
    start = (int(offset) + phase(stream)) % PERIOD
    if n <= PERIOD:
        dst[:] = _EXT[start : start + n]
        return
    # Byte k and byte k + PERIOD are equal, so every block of PERIOD bytes is the same window.
    win = _EXT[start : start + PERIOD]
    for k in range(0, n, PERIOD):
        m = min(PERIOD, n - k)
        dst[k : k + m] = win[:m]


def pattern_bytes(stream: int, offset: int, length: int) -> bytes:
    """The ``length`` pattern bytes of ``stream`` from ``offset``, as ``bytes`` (tests, tools)."""
    buf = np.empty(int(length), dtype=np.uint8)
    fill(stream, offset, buf)
    return buf.tobytes()


def verify(stream: int, offset: int, data: npt.ArrayLike | bytes | bytearray | memoryview) -> int:
    """Check ``data`` against the pattern of ``stream`` at stream offset ``offset``.

    Returns -1 when every byte matches, else the index (in ``data``) of the first
    byte that does not.  The all-good path is one ``memcmp`` per ``PERIOD`` bytes;
    the index is searched for only after a mismatch.
    """
    d = _as_u8(data)
    n = d.shape[0]
    start = (int(offset) + phase(stream)) % PERIOD
    win = _EXT[start : start + PERIOD]
    for k in range(0, n, PERIOD):
        m = min(PERIOD, n - k)
        chunk = d[k : k + m]
        ref = win[:m]
        if chunk.tobytes() != ref.tobytes():
            return k + int(np.argmax(chunk != ref))
    return -1


def rows(streams: npt.ArrayLike, offsets: npt.ArrayLike, width: int) -> npt.NDArray[np.uint8]:
    """A new ``(n, width)`` array: row ``i`` is the pattern of ``streams[i]`` from ``offsets[i]``.

    ``streams`` and ``offsets`` are 1-D (or scalars, broadcast); ``0 <= width <=
    PERIOD``.  One fancy-index gather over a sliding-window view: no per-row
    Python work.  Offsets are non-negative integers (int64 or uint64).
    """
    if not 0 <= width <= PERIOD:
        raise ValueError(f"row width {width} not in [0, {PERIOD}]")
    off = np.asarray(offsets)
    if off.dtype == np.uint64:
        off = (off % np.uint64(PERIOD)).astype(np.int64)
    else:
        off = off.astype(np.int64, copy=False) % PERIOD
    starts = (off + phases(streams)) % PERIOD
    return _WIN[np.atleast_1d(starts), :width]


def rows_at(pos: npt.NDArray[np.integer], width: int) -> npt.NDArray[np.uint8]:
    """Like :func:`rows` with precomputed positions ``pos = (offset + phase(s)) % PERIOD``.

    ``pos`` may also be in ``[0, 2 * PERIOD)`` (the sum before the ``%``); the hot
    path of the frame builder keeps per-flow phases and skips two operations.
    """
    if not 0 <= width <= PERIOD:
        raise ValueError(f"row width {width} not in [0, {PERIOD}]")
    return _WIN2[pos, :width]


def fill_rows(streams: npt.ArrayLike, offsets: npt.ArrayLike, out: npt.NDArray[np.uint8]) -> None:
    """Fill row ``i`` of the 2-D view ``out`` with the pattern of ``streams[i]`` at ``offsets[i]``.

    ``out.shape[1]`` must be at most ``PERIOD``.  Equivalent to calling
    :func:`fill` per row, in two numpy operations.
    """
    out[...] = rows(streams, offsets, out.shape[1])


def expected_sha256(stream: int, total_len: int, *, offset: int = 0, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of ``total_len`` pattern bytes of ``stream`` from ``offset``.

    Streams the pattern through one reusable ``chunk``-byte buffer, so any length
    costs constant memory.  For end-to-end summaries ("app received exactly the
    stream"), compared with the SHA-256 the receiver computed over what it read.
    """
    h = hashlib.sha256()
    buf = np.empty(max(1, min(int(chunk), int(total_len))), dtype=np.uint8)
    pos = 0
    while pos < total_len:
        m = min(buf.shape[0], total_len - pos)
        view = buf[:m]
        fill(stream, offset + pos, view)
        h.update(view.data)
        pos += m
    return h.hexdigest()
