"""The NIC's IOMMU: the table of regions the driver DMA-mapped for the device.

The NIC may read or write only inside a region the kernel mapped for it with
``nic.dma_map`` (DESIGN §5.3, §9 "DMA is a copy ... the IOMMU is that mapping
table").  A mapping attaches the named shm region (the region stays owned by its
creator: the kernel for queue rings and page pools, an app for its area; the NIC
only attaches and detaches, never unlinks); app memory (a zcrx area, a sealed memfd)
is attached through the kernel's descriptor of it (``/proc/<kernel pid>/fd/<n>``, the
inode checked), never by name and records how many bytes of it the
device may touch.  Device addresses are IOVAs ``(map_id << 40) | offset``
(:func:`shared.abi.make_iova`).

:meth:`Iommu.translate` checks a whole batch of descriptors at once: one lookup
into a dense ``size`` table indexed by map id, one compare.  A descriptor whose
map id is unknown, or whose buffer ``[offset, offset + len)`` does not lie inside
its mapping, is an **IOMMU fault**: the caller drops the frame and counts it; no
byte is written.  The whole posted buffer is checked, not only the bytes a frame
happens to use, so a bad descriptor faults deterministically.

Map ids are handed out in increasing order (1, 2, 3, ...; 0 is never valid, so a
zeroed descriptor always faults) and are not reused until the id space wraps,
so a stale descriptor naming an unmapped region keeps faulting instead of
landing in whatever was mapped next.

Pure bookkeeping plus attach/detach; no process or socket here.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from shared import abi
from shared.errors import Misuse
from shared.shm import Region

__all__ = ["MAX_MAPPINGS", "Iommu", "Mapping"]

#: Most mappings alive at once (device limit; ENOSPC beyond).
MAX_MAPPINGS = 4096
#: Largest map id handed out before ids wrap (the IOVA format allows 2**24 - 1).
_MAX_MAP_ID = (1 << 20) - 1
_OFF_MASK = np.uint64((1 << abi.NIC_IOVA_SHIFT) - 1)
_SHIFT = np.uint64(abi.NIC_IOVA_SHIFT)
#: Window views cached per mapping (one per distinct copy length).
_WINDOW_CACHE = 32


@dataclass(eq=False)
class Mapping:
    """One DMA mapping: an attached region and the byte range the device may touch."""

    map_id: int
    name: str
    size: int
    region: Region
    #: ``uint8`` view of the first ``size`` bytes of the region.
    view: npt.NDArray[np.uint8]
    _windows: dict[int, npt.NDArray[np.uint8]] = field(default_factory=dict)

    @property
    def buf(self) -> object:
        """The mapped buffer (for building ring views over a queue region)."""
        return self.region.buf

    def window(self, width: int) -> npt.NDArray[np.uint8]:
        """A ``(size - width + 1, width)`` view whose row ``o`` is bytes ``[o, o + width)``.

        Rows overlap (strides ``(1, 1)``); assigning ``win[offsets] = rows`` writes each
        row at its byte offset in one numpy call, whatever the offsets' alignment.
        The caller keeps the written rows disjoint.
        """
        win = self._windows.get(width)
        if win is None:
            if not 0 < width <= self.size:
                raise Misuse(f"window of {width} bytes on a {self.size}-byte mapping")
            win = np.ndarray((self.size - width + 1, width), np.uint8, self.view, 0, (1, 1))
            if len(self._windows) >= _WINDOW_CACHE:
                self._windows.clear()
            self._windows[width] = win
        return win

    def release(self) -> None:
        """Drop our views and detach the region (the creator still owns it)."""
        self.retire()
        self.region.detach()

    def retire(self) -> None:
        """Drop our views; the region stays attached until :meth:`release`."""
        self._windows.clear()
        self.view = np.empty(0, np.uint8)


class Iommu:
    """Map id -> mapping, with a dense size table for vectorised translation."""

    def __init__(self) -> None:
        self._maps: dict[int, Mapping] = {}
        # _size[id] = bytes mapped, -1 when id is not mapped.  Grows by doubling.
        self._size = np.full(64, -1, dtype=np.int64)
        self._next_id = 1
        #: Descriptors that failed translation, over the device's life.
        self.faults = 0
        #: Unmapped, their regions not yet detached (:meth:`reap`).
        self.retired: list[Mapping] = []

    # -- map / unmap ---------------------------------------------------------------------

    def dma_map(self, name: str, size: int, *, holder: int = 0, fd: int = -1,
                inode: tuple[int, int] | None = None) -> int:
        """Attach shm region ``name`` and let the device touch its first ``size`` bytes.

        With ``fd >= 0`` the memory is the file process ``holder`` (the kernel, as the OS
        named the connection) holds at that descriptor, opened through
        ``/proc/<holder>/fd/<fd>`` and checked to be ``inode`` (``(st_dev, st_ino)``):
        app memory (a zcrx area) is mapped as the inode the kernel checked and pinned,
        never by a name the app could point elsewhere meanwhile; ``name`` is then a label.

        Returns the map id for :func:`shared.abi.make_iova`.  Raises :class:`Misuse`:
        ENOENT if the region (or descriptor) does not exist, EINVAL if ``size`` is not
        positive, does not fit an IOVA offset or exceeds the region, or the descriptor is
        not that inode, EPERM for a descriptor of an unknown holder, ENOSPC when the table
        is full.
        """
        if not isinstance(size, int) or size <= 0 or size > int(_OFF_MASK) + 1:
            raise Misuse(f"dma_map {name}: bad size {size}", errno.EINVAL)
        if len(self._maps) >= MAX_MAPPINGS:
            raise Misuse(f"dma_map {name}: {MAX_MAPPINGS} mappings already", errno.ENOSPC)
        if fd >= 0:
            if holder <= 0:
                raise Misuse(f"dma_map {name}: whose descriptor {fd}?", errno.EPERM)
            region = Region.open_proc_fd(holder, fd, name, inode=inode)
        else:
            region = Region.attach(name)  # Misuse(ENOENT) when missing
        if size > region.size:
            region.detach()
            raise Misuse(f"dma_map {name}: {size} bytes asked, region has {region.size}",
                         errno.EINVAL)
        map_id = self._alloc_id()
        view = region.array(np.uint8, 0, size)
        self._maps[map_id] = Mapping(map_id, name, size, region, view)
        if map_id >= len(self._size):
            grown = np.full(max(2 * len(self._size), map_id + 1), -1, dtype=np.int64)
            grown[: len(self._size)] = self._size
            self._size = grown
        self._size[map_id] = size
        return map_id

    def _alloc_id(self) -> int:
        for _ in range(_MAX_MAP_ID):
            cand = self._next_id
            self._next_id = cand + 1 if cand < _MAX_MAP_ID else 1
            if cand not in self._maps:
                return cand
        raise Misuse("no free DMA map id", errno.ENOSPC)  # pragma: no cover (MAX_MAPPINGS)

    def dma_unmap(self, map_id: int) -> None:
        """Forget mapping ``map_id``; ENOENT if it is not mapped.

        Later descriptors naming it fault at once.  Its region is detached by the next
        :meth:`reap` (the NIC's loop calls it once it has answered): a ``munmap`` here costs
        about a millisecond (the process's other threads' TLBs are shot down), which the
        command that unmapped need not wait for.  The caller makes sure no started queue
        still lives in it (the NIC refuses that with EBUSY before calling here).
        """
        m = self._maps.pop(map_id, None)
        if m is None:
            raise Misuse(f"dma_unmap: map id {map_id} is not mapped", errno.ENOENT)
        self._size[map_id] = -1
        m.retire()
        self.retired.append(m)

    def reap(self) -> int:
        """Detach the regions of unmapped mappings; how many."""
        out, self.retired = self.retired, []
        for m in out:
            m.release()
        return len(out)

    def unmap_all(self) -> None:
        """Detach every mapping (device shutdown)."""
        for map_id in list(self._maps):
            self.dma_unmap(map_id)
        self.reap()

    # -- lookups -------------------------------------------------------------------------

    def get(self, map_id: int) -> Mapping:
        """The mapping ``map_id``; :class:`Misuse` (ENOENT) if there is none."""
        m = self._maps.get(map_id)
        if m is None:
            raise Misuse(f"map id {map_id} is not mapped", errno.ENOENT)
        return m

    def lookup(self, map_id: int) -> Mapping | None:
        """The mapping ``map_id`` or None (no exception: for the data path)."""
        return self._maps.get(map_id)

    def __contains__(self, map_id: object) -> bool:
        return map_id in self._maps

    def __len__(self) -> int:
        return len(self._maps)

    def mappings(self) -> list[Mapping]:
        """Every live mapping, by id."""
        return [self._maps[k] for k in sorted(self._maps)]

    def translate(self, iova: npt.ArrayLike, length: npt.ArrayLike
                  ) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.int64], npt.NDArray[np.bool_]]:
        """Translate a batch of device addresses: ``(map_ids, offsets, ok)``.

        ``ok[i]`` is True when ``[offset, offset + length[i])`` lies inside mapping
        ``map_ids[i]``; every other entry is an IOMMU fault, added to :attr:`faults`.
        Where ``ok`` is False the map id and offset must not be used.
        """
        a = np.asarray(iova, dtype=np.uint64)
        mid = (a >> _SHIFT).astype(np.intp)
        off = (a & _OFF_MASK).astype(np.int64)
        end = off + np.asarray(length, dtype=np.int64)
        cap = len(self._size)
        if mid.size and int(mid.max()) >= cap:
            inside = mid < cap
            ok = inside & (end <= self._size[np.where(inside, mid, 0)])
        else:
            ok = end <= self._size[mid]
        bad = ok.size - int(np.count_nonzero(ok))
        if bad:
            self.faults += bad
        return mid, off, ok

    def check(self, map_id: int, off: int, length: int) -> bool:
        """Scalar form of :meth:`translate` (no fault is counted)."""
        m = self._maps.get(map_id)
        return m is not None and off >= 0 and length >= 0 and off + length <= m.size
