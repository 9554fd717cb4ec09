"""The C heap of a role process: keep large numpy temporaries off ``mmap``.

Every role works on batches: a NAPI poll, a RECV_ZC pass, a verify gather or a frame
batch allocates numpy temporaries of a few hundred KiB (512 frames of 1514 bytes is
775 KiB).  glibc serves an allocation above its mmap threshold (128 KiB at start, then
adjusted to the largest block freed) with a fresh ``mmap`` and returns it with ``munmap``
on free, and trims the heap top above 128 KiB, so every batch took one page fault per
4 KiB it touched.  In this emulator's VM a minor fault costs microseconds:
``app_proc.verify.zcrx_verify`` of 320 chunks of 1448 bytes took 625 us with the
default heap and 152 us with the settings below (92764 minor faults per second of it).

:func:`tune` raises the mmap threshold to :data:`MMAP_THRESHOLD` and the trim threshold
to :data:`TRIM_THRESHOLD` (``mallopt``), so temporaries up to 4 MiB reuse heap pages
and at most 16 MiB of free heap stays mapped.  It changes no result, only where freed
memory waits; each role calls it once at start (NIC, kernel, every sample app).  On a
libc without ``mallopt`` (not glibc) it does nothing.
"""

from __future__ import annotations

import ctypes

__all__ = ["MMAP_THRESHOLD", "TRIM_THRESHOLD", "tune"]

#: Allocations up to this size come from the heap (glibc M_MMAP_THRESHOLD).
MMAP_THRESHOLD = 4 << 20
#: Free heap kept mapped before trimming (glibc M_TRIM_THRESHOLD).
TRIM_THRESHOLD = 16 << 20
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

_done = False


def tune() -> bool:
    """Apply the heap settings to this process once; True if the libc took them."""
    global _done
    if _done:
        return True
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own libc, no library search
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    ok = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    _done = ok
    return ok
