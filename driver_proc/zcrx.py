"""io_uring zero-copy receive (zcrx) in the emulated kernel: ifqs, areas, the refill queue,
the io_uring memory provider, ``IORING_OP_RECV_ZC`` and teardown (Linux ``io_uring/zcrx.c``).

:class:`Zcrx` is the subsystem the kernel process runs.  It plugs into
:class:`driver_proc.setup.IoUring` through its extension points: the RECV_ZC opcode, the
``IORING_REGISTER_ZCRX_IFQ`` / ``ZCRX_CTRL`` / ``QUERY`` register opcodes, a teardown hook per
ring and a poll hook (requeued requests, delayed destruction).  No I/O here: the NIC is reached
only through the netdev's memory-provider interface (:class:`driver_proc.netdev.MpNetdev`:
``dma_map``/``dma_unmap`` of the area, ``mp_check_rxq``, ``mp_open_rxq``/``mp_close_rxq``); the
netdev's queues, pools and drained frames are the driver's.

Linux functions mirrored
------------------------
* registration: ``io_register_zcrx_ifq`` (:meth:`Zcrx._reg_ifq`), ``io_allocate_rbuf_ring``
  (:meth:`Zcrx._create_rq`), ``io_zcrx_create_area`` / ``io_import_area``
  (:meth:`Zcrx._create_area`), ``net_mp_open_rxq`` / ``net_mp_close_rxq`` (the netdev's
  ``mp_open_rxq`` / ``mp_close_rxq``, called by :meth:`Zcrx._bind` / :meth:`Zcrx._terminate`);
* the memory provider ``io_uring_pp_zc_ops`` (:class:`ZcrxProvider`): ``alloc_netmems``
  (``alloc``: ``io_zcrx_ring_refill`` = :meth:`Ifq.consume_rq`, then the area freelists),
  ``release_netmem`` (``release``), ``init`` / ``destroy``;
* RECV_ZC: ``io_recvzc`` (:meth:`RecvZcRequest.attempt`), ``io_zcrx_tcp_recvmsg`` /
  ``tcp_read_sock`` (:meth:`RecvZcRequest._pass`), ``io_zcrx_recv_skb`` /
  ``io_zcrx_recv_frag`` (:meth:`RecvZcRequest._recv_skb`), ``io_zcrx_copy_chunk``
  (:meth:`RecvZcRequest._copy_chunk`), ``io_zcrx_queue_cqe`` (:meth:`RecvZcRequest._queue_cqe`),
  each once per batch of chunks, never per frag;
* control and teardown: ``io_zcrx_ctrl`` (``FLUSH_RQ`` = :meth:`Ifq.flush`, ``EXPORT``,
  ``ARM_EVENT`` = :meth:`Ifq.arm_event`, ``ADD_AREA`` = :meth:`Zcrx._add_area`),
  ``io_zcrx_scrub`` (:meth:`BufferSpace.scrub`), ``io_close_queue`` (:meth:`Zcrx._terminate`).

Who owns what in shared memory
------------------------------
* **Area** (``io_uring_zcrx_area_reg.addr/len``): app memory, a region ``/zcrx.<run>.app<N>.*``
  the app created and entered into its mm.  The kernel *pins* it by attaching the region itself
  (:class:`ZcrxArea`), splits it into niovs (a :class:`~driver_proc.page_pool.BufferSpace` of
  ``rx_buf_len`` buffers starting at the area's offset inside the region) and, for a hardware
  queue, asks the NIC to DMA-map the whole region (``nic.dma_map``).  The NIC writes payload
  only into niovs the driver posted; the app reads niovs only while it holds a user reference
  (a CQE handed it over); the kernel writes copy-fallback data into niovs it took from the
  freelist.  Every niov's state and refcounts live in the space's arrays (the kernel is the
  authority), written only by :mod:`driver_proc.page_pool`; this module moves niovs only
  through its paired helpers: ``take_free``/``put_free`` (area freelist), ``lend_free`` (a
  copy-fallback niov to the user), ``get_user``/``put_user`` (a CQE hands a niov over, an RQE
  returns it), ``scrub`` (teardown).
* **Refill queue** (RQ): ``struct io_uring {u32 head, tail}`` then 16-byte RQEs at the offsets
  written back (head 0, tail 4, rqes 64 up to Linux 7.2; head 0, tail 64, rqes 128 on 7.3,
  whose ``struct zcrx_rq_hdr`` gives each its own cache line).  Either app memory
  (``IORING_MEM_REGION_TYPE_USER``, resolved through the mm and kept pinned) or a kernel region
  ``/zcrx.<run>.kernel.t<tid>.zcrx<serial>.rq`` the app maps with ``mmap(ring_fd,
  IORING_MAP_OFF_ZCRX_REGION + (zcrx_id << 16))``.  The app writes RQEs and the tail; the kernel
  writes only the head.  The kernel reads the RQ as an untrusted peer's ring
  (:class:`~shared.ring.RingConsumer`, ``untrusted=True``): ``tail - cached head`` is clamped to
  ``rq_entries``, its own head is never re-read (a scribbled head is counted and overwritten),
  and every RQE is validated; nothing an app writes raises out of this module.
* **CQEs**: 32-byte (CQE32, or ``IORING_CQE_F_32`` on a CQE_MIXED ring), written into the
  ring's CQ by :meth:`driver_proc.io_uring.Ring.post_big_batch`, never through the overflow
  list.

Buffer ledger
-------------
Every niov is in exactly one :class:`~driver_proc.page_pool.BufState`: ``free`` (area
freelist), ``pool_cache``, ``driver``/``posted`` (lent to the NIC), ``in_skb`` (referenced by
skbs only), ``user`` (user_refs > 0, which includes niovs whose RQE is written but not yet
consumed).  :meth:`Ifq.ledger` / :meth:`Ifq.check_ledger` expose and verify it (the counts sum
to the niov count; page-pool references equal driver holds + skb frags + user references);
:meth:`Zcrx.stats` includes them for ``zcrx stats --ledger``.

Semantics (zcrx-kernel.md §1-6, §10; conformance.md §5)
-------------------------------------------------------
* **Registration** (``IORING_REGISTER_ZCRX_IFQ``, nr_args 1): the 96-byte ``ifq_reg`` travels as
  blob 0 and comes back written in the reply; ``area_ptr`` and ``region_ptr`` are user addresses
  read and written back through the task's mm, so unmapped or read-only parameter structs give
  ``-EFAULT`` exactly as on Linux, and a failed write-back undoes the whole registration.
  Checks in Linux's order: ``-EPERM`` without CAP_NET_ADMIN; ring without DEFER_TASKRUN or
  without CQE32/CQE_MIXED ``-EINVAL``; reserved fields, input ``zcrx_id``, unknown flags,
  ``if_rxq == -1``, ``rq_entries == 0`` ``-EINVAL``; ``rq_entries > 32768`` ``-EINVAL`` unless
  the ring has SETUP_CLAMP (clamped), then rounded up to a power of two; region descriptor
  (``id``/``mmap_offset``/``__resv``/unknown flags ``-EINVAL``; then user memory at 0 or
  kernel memory with a ``user_addr`` ``-EFAULT``, as ``io_create_region``; ``size`` 0 or
  unaligned ``-EINVAL``; user memory unmapped or read-only ``-EFAULT``; too small for the
  release's ``rqes + 16 * entries`` ``-EINVAL``); area (unknown flags, input token,
  ``__resv2``, ``dmabuf_fd`` without DMABUF ``-EINVAL``; ``len`` 0 or > 1 GiB ``-EFAULT``;
  unaligned ``-EINVAL``; unmapped/read-only ``-EFAULT``); event desc (7.2+: unreadable
  ``-EFAULT``; unknown types/flags, ``stats_offset`` without FLAG_STATS, ``__resv2``
  ``-EINVAL``; ``stats_offset`` unaligned ``-EINVAL``, over the RQEs or past the region
  ``-ERANGE``).  Several ifqs per ring get distinct ids, the smallest free one first.
* **NODEV** (``ZCRX_REG_NODEV``, Linux 7.1): ``if_idx``/``if_rxq`` must be 0, no device, no
  DMA, no page pool; RECV_ZC copies every byte of ANY TCP socket into free niovs; the RQ is
  consumed only by ``ZCRX_CTRL_FLUSH_RQ``.
* **Hardware queue**: unknown ``if_idx`` ``-ENODEV``; ``if_rxq >= queues`` ``-ERANGE``;
  tcp-data-split not on, or hds-thresh > 0, ``-EINVAL``; a queue with a memory provider (also
  one still draining from an earlier binding) ``-EEXIST``.  Binding DMA-maps the area, builds
  a :class:`ZcrxProvider` and calls :meth:`NetDevice.queue_restart` (the NIC quiesces, old
  buffers come back, the new pool posts niovs, the queue restarts).  ``zcrx status`` shows the
  queue's provider as ``io-uring``.
* **Memory provider** (:class:`ZcrxProvider`): ``alloc`` consumes the RQ first, lazily (only
  when the pool is short) and at most as many RQEs as buffers are needed; each valid RQE drops
  one user reference (a return without one is ignored and counted), and a niov whose last
  reference went is recycled into the pool's cache; then it takes from the area freelists,
  walked in order (every area of the ifq: Linux 7.3's slow path; the pool names niovs by keys
  ``area id << 32 | niov`` of the ifq's :class:`~driver_proc.page_pool.SpaceSet`, and each
  area added while the queue runs joins its pools at once); with
  neither the pool gets fewer buffers and the queue starves (the NIC pauses or drops).  On
  Linux 7.3 the refill walks past malformed RQEs until it has the buffers wanted, at most
  :data:`REFILL_CAP` RQEs per :data:`PP_ALLOC_CACHE_REFILL` buffers, and a run of RQEs naming
  one niov drops its references at once, a run longer than ``user_refs`` being ignored whole
  (:meth:`Ifq._coalesce`).
* **Events** (Linux 7.2, ``ifq_reg.event_desc`` -> ``zcrx_event_desc``): ALLOC_FAIL (an
  allocation got no buffer at all) and COPY (the copy fallback ran) post one 16-byte CQE each
  on the registering ring, then stay off until ``ZCRX_CTRL_ARM_EVENT`` (:meth:`Ifq.event`);
  with ``ZCRX_EVENT_DESC_FLAG_STATS`` the kernel keeps ``zcrx_stats`` (copy fallback niovs and
  bytes, as ``copy_count``/``copy_bytes``) at ``stats_offset`` in the RQ region.  An import
  with an event desc is ``-EINVAL``; a 7.1 kernel refuses a non-zero ``event_desc`` (its
  ``__resv[0]``) with ``-EINVAL``.
* **RQE parsing**: area id (``off >> 48``) must name an area of the ifq (0 unless areas were
  added, 7.3), ``__pad`` 0, niov index ``(off & ~AREA_MASK) >> niov_shift`` below that
  area's niov count; ``len`` and the low bits are
  ignored.  Rejections are counted per reason (``rq_invalid_area/pad/range/noref``).  The
  refill path skips a bad entry and goes on; ``FLUSH_RQ`` (up to ``rq_entries`` per call, one
  numpy pass where Linux takes batches of 32) stops after the first malformed entry
  (consumed, dropped), leaving later ones for the next flush (conformance E34); returns
  without a reference do not stop it.
* **RECV_ZC** (multishot mandatory): per pass over the socket's receive queue (at most 20 skbs,
  then the request is requeued at the back of the line, for fairness; when no other request
  could take a turn in between, up to :data:`PASSES_PER_BATCH` such passes run back to back as
  one numpy batch, which gives the same CQE stream and counts the same requeues; the first pass
  at submission never folds, since later SQEs of the same submission come first on Linux) a
  frag that is a niov of this ifq's
  area is handed over in place (CQE ``off = token | niov * buf_len + frag offset``, ``res`` =
  bytes, ``F_MORE``; one pp reference and one user reference taken; the skb's own reference
  drops when the skb is freed as the receive queue is consumed); linear data and kernel-page
  frags are
  copied into niovs from the area freelist, at most ``PAGE_SIZE`` per niov, CQE at the niov
  start (``copy_count``/``copy_bytes``); a niov of another ifq is ``-EFAULT``.  The final CQE
  has no F_MORE: 0 on EOF or when the ``len`` budget is used up, ``-ENOSPC`` when the CQ has no
  room (checked before posting; RECV_ZC never uses the overflow list), ``-ENOMEM`` when no niov
  is free for a copy, the socket error (``-ECONNRESET``), ``-ENOTCONN`` on a socket that was
  never connected.  An error ends the request only when a pass delivered nothing (Linux's
  ``tcp_read_sock`` returns the bytes read, if any).  No data is not an error: the request
  stays armed on the socket.
* **Control** (``IORING_REGISTER_ZCRX_CTRL``, nr_args 0, blob 0 = 72-byte ``zcrx_ctrl``, or
  8 bytes: the user address of one, read and written back through the mm):
  ``__resv`` non-zero ``-EFAULT`` (the kernel quirk noted in conformance E38), unknown id
  ``-ENXIO``, an op the release does not have (``nr_ctrl_opcodes``) ``-EOPNOTSUPP``;
  FLUSH_RQ (its ``__resv`` must be 0, ``-EINVAL``);
  EXPORT (payload must be 0, ``-EINVAL``) installs a ``[zcrx]`` box fd (:class:`ZcrxBox`) that
  keeps the ifq alive (pointer form: a copy-out that faults releases the box and the fd,
  ``-EFAULT``); ARM_EVENT (7.2, :meth:`Ifq.arm_event`); ``ZCRX_REG_IMPORT`` with ``if_idx``
  = that fd (every other field and ``event_desc`` 0,
  ``-EINVAL``; not a box ``-EBADF``) gives another ring its own id for the same ifq (area and
  RQ are shared; user space serialises RQ writes).
* **Query** (``IORING_REGISTER_QUERY``, fd -1, nr_args 0): blob 0 is the ``io_uring_query_hdr``
  (written back in the reply); ``query_data`` and ``next_entry`` are user addresses (mm).
  ``IO_URING_QUERY_ZCRX`` reports register flags IMPORT|NODEV, area flags 0 (dmabuf is not
  emulated), and per release ``nr_ctrl_opcodes`` (7.1: 2, 7.2: 3, 7.3: 4), features
  (RX_PAGE_SIZE, 7.2+: EVENT), RQ header (8 bytes up to 7.2, 128 on 7.3) aligned to 64;
  query op 3 (7.2+) the event types, ``zcrx_stats`` size 16 and offset alignment 8;
  ``IO_URING_QUERY_SCQ`` reports the rings header; other ops answer ``result = -EOPNOTSUPP``.
* **Teardown** (ring close or process death, same path; no unregister): the ring's requests are
  cancelled by the ring; when an ifq's last user (ring or box) goes: **scrub** (every user
  reference revoked, that many pp references dropped), restart the queue without the provider
  (the NIC stops DMA into the area; drained frames go to TCP), then **delayed destruction**:
  while a niov is still in an skb the provider's pool stays alive, the queue still counts as
  bound (re-binding gives ``-EEXIST``, tcp-data-split stays locked) and :meth:`Zcrx.reap` (run
  every kernel loop) waits; then the area is DMA-unmapped and detached and a kernel-owned RQ
  region unlinked.

Departures and choices (also in the report of this issue)
---------------------------------------------------------
* Top-level syscall arguments travel by value as blobs, so only the nested structs (area,
  region, query data) can be unmapped or read-only; a wrong-sized blob is the emulated bad
  pointer (``-EFAULT``).
* ``rx_buf_len``: 0 means ``PAGE_SIZE`` (written back); otherwise a power of two
  ``>= PAGE_SIZE`` (``-EINVAL``); NODEV accepts only ``PAGE_SIZE`` (``-EOPNOTSUPP``); on a
  hardware queue a larger size must equal the netdev's configured ``rx-buf-len`` (``ethtool -G
  DEV rx-buf-len N``; else ``-EOPNOTSUPP``, the driver cannot post it) and the area's address
  (its offset in the region) and length must be multiples of it (``-ERANGE``: Linux's "memory
  not contiguous at that size").
* dmabuf areas are not emulated: ``IORING_ZCRX_AREA_DMABUF`` gives ``-EINVAL`` with NODEV (no
  device, as Linux) and ``-EOPNOTSUPP`` on a hardware queue.
* Every emulated netdev has a DMA parent and queue-management ops; XDP programs and AF_XDP
  sockets do not exist, so their ``-EEXIST``/``-EBUSY`` cannot happen.  A queue that is not set
  up (device down) gives ``-ENETDOWN``.  RECV_ZC on a socket that is not TCP gives
  ``-EPROTONOSUPPORT`` (checked at issue, as Linux's ``sock->sk->sk_protocol`` test).
* The provider's ``alloc`` takes the RQ first and tops up from the freelist in the same call
  (Linux takes the slow path only when the RQ gave nothing).
* ``copy_count`` counts niovs (CQEs) filled by the copy fallback; ``copy_bytes`` their bytes.
* A pass that delivered data and then hit a limit (no free niov, CQ full): on a request issued
  by a readiness event the poll stays armed and the socket's next event issues again (Linux's
  ``io_poll_check_events`` issues once per wakeup); a request not yet armed (just submitted)
  goes straight on, as Linux's arming finds the socket readable and re-issues; with the peer's
  FIN already in it is requeued (Linux requeues while ``SOCK_DONE`` is set).  The next pass
  that delivers nothing ends the request with the errno.
* ``IO_URING_QUERY_OPCODES`` is not emulated (``result = -EOPNOTSUPP``).
* ``zcrx_ctrl.__resv`` non-zero is ``-EFAULT`` (the kernel's quirk), the FLUSH_RQ and EXPORT
  payloads' reserved words ``-EINVAL``.
* An skb store without ``resolve`` (test doubles) is read as all-linear: everything is copied.
"""

from __future__ import annotations

import errno
import itertools
import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
from numpy.typing import NDArray

from driver_proc.files import SocketFile, Task
from driver_proc.io_uring import Request, Ring, Sqe
from driver_proc.netdev import MpNetdev
from driver_proc.opdef import OpDef
from driver_proc.page_pool import (
    KEY_MASK,
    KEY_SHIFT,
    BufferSpace,
    MemoryProvider,
    PagePool,
    SpaceSet,
)
from driver_proc.setup import IoUring
from driver_proc.skb import LINEAR
from driver_proc.tcp import Pieces, RxQueue, TcpReceiver
from shared import abi
from shared.errors import InvariantBroken, Misuse, ZcrxError
from shared.ring import RingConsumer, RingLayout
from shared.shm import PAGE_SIZE, Region, region_name

__all__ = [
    "FLUSH_BATCH",
    "IFQ_COUNTERS",
    "MAX_AREA_LEN",
    "PASSES_PER_BATCH",
    "PP_ALLOC_CACHE_REFILL",
    "REFILL_CAP",
    "REQUEUE_ROUNDS",
    "SKBS_PER_PASS",
    "Ifq",
    "RecvZcRequest",
    "Zcrx",
    "ZcrxArea",
    "ZcrxBox",
    "ZcrxProvider",
]

log = logging.getLogger("kernel.zcrx")

#: skbs one RECV_ZC pass walks before it yields (IO_SKBS_PER_CALL_LIMIT).
SKBS_PER_PASS = abi.IO_SKBS_PER_CALL_LIMIT
#: Passes of SKBS_PER_PASS skbs one RECV_ZC batch may fold together when no other request
#: waits for its turn (see :meth:`RecvZcRequest._pass`).
#: 64 passes (1280 skbs) cover a whole NAPI poll (budget 1024): a busy flow's skbs are
#: walked in one numpy batch instead of two or more (each pass costs ~25 numpy calls).
PASSES_PER_BATCH = 64
#: Rounds of requeued RECV_ZC passes one :meth:`Zcrx.poll` runs at most.
REQUEUE_ROUNDS = 64
#: RQEs one FLUSH_RQ batch consumes.
FLUSH_BATCH = 32
#: RQEs one refill call consumes at most on Linux 7.3 (``ZCRX_REFILL_CAP``: 256 at 4 KiB).
REFILL_CAP = min(64 * max(PAGE_SIZE // 1024, 1), 1024)
#: Buffers one Linux page-pool refill asks its provider for (``PP_ALLOC_CACHE_REFILL``); a
#: batched :meth:`ZcrxProvider.alloc` of ``n`` stands for ``ceil(n / 64)`` such calls.
PP_ALLOC_CACHE_REFILL = 64
#: Largest area (io_validate_user_buf_range's arbitrary limit).
MAX_AREA_LEN = 1 << 30
#: Copy fallback fills at most this much of a niov.
COPY_CHUNK = PAGE_SIZE

#: Per-ifq counters (``Zcrx.stats()["ifqs"][i]["counters"]``).
IFQ_COUNTERS = (
    "rq_consumed",          # RQEs consumed (head advanced past them), valid or not
    "rq_returned",          # user references returned by valid RQEs
    "rq_invalid_area",      # RQE area id names no area of the ifq
    "rq_invalid_pad",       # RQE __pad != 0
    "rq_invalid_range",     # niov index >= niov count
    "rq_invalid_noref",     # return of a niov without a user reference (ignored)
    "rq_head_tampered",     # the app wrote the kernel-owned RQ head (overwritten)
    "rq_tail_faults",       # impossible RQ tail values (tail - head clamped to rq_entries)
    "alloc_calls",          # page-pool allocations that reached the provider
    "alloc_from_rq",        # buffers those got by recycling through the RQ
    "alloc_from_freelist",  # buffers those took from the area freelists
    "alloc_fail",           # allocations that came back short (the queue starves)
    "flushes",              # ZCRX_CTRL_FLUSH_RQ calls
    "zc_cqes",              # CQEs handing a niov over in place
    "zc_bytes",
    "copy_count",           # niovs filled by the copy fallback (one CQE each)
    "copy_bytes",
    "recv_requests",        # RECV_ZC requests issued against this ifq
    "recv_requeues",        # passes that yielded after SKBS_PER_PASS skbs
    "recv_enomem",          # requests ended with -ENOMEM (no free niov for a copy)
    "recv_enospc",          # ... with -ENOSPC (CQ full)
    "recv_efault",          # ... with -EFAULT (a niov of another ifq)
    "scrubbed_refs",        # user references revoked at teardown
    "events",               # event CQEs posted (7.2)
    "rq_runs_ignored",      # runs of same-niov RQEs longer than user_refs, ignored (7.3)
    "refill_capped",        # refill calls that stopped at ZCRX_REFILL_CAP RQEs (7.3)
)

_U32 = 0xFFFFFFFF
_LOW48 = (1 << abi.IORING_ZCRX_AREA_SHIFT) - 1
_RQE_DTYPE = abi.io_uring_zcrx_rqe
#: ``Ifq._parse_rqes`` kinds: an RQE's first fault (0: valid)
_RQE_BAD_AREA, _RQE_BAD_PAD, _RQE_BAD_RANGE = 1, 2, 3
_EMPTY = np.empty(0, dtype=np.int64)
_EMPTY.flags.writeable = False
_REG_FLAGS = abi.ZCRX_REG_IMPORT | abi.ZCRX_REG_NODEV
_RECVZC_IOPRIO = abi.IORING_RECVSEND_POLL_FIRST | abi.IORING_RECV_MULTISHOT
_IFQ_RING_FLAGS = abi.IORING_SETUP_CQE32 | abi.IORING_SETUP_CQE_MIXED
_QUERY_CHAIN_LIMIT = 64
_serial = itertools.count(1)


def _misuse(msg: str, err: int) -> Misuse:
    return Misuse(msg, err)


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _rq_layout(entries: int, kernel: tuple[int, int]) -> RingLayout:
    head, tail, rqes, _ = abi.zcrx_rq_layout(entries, kernel)
    return RingLayout(entries, _RQE_DTYPE, head=head, tail=tail, entries=rqes)


def _offsets(reg: np.ndarray, kernel: tuple[int, int]) -> None:
    """Write ``io_uring_zcrx_offsets`` (the layout of release ``kernel``) into ``reg``."""
    head, tail, rqes, _ = abi.zcrx_rq_layout(1, kernel)
    off = reg["offsets"]  # a view into reg
    off["head"] = head
    off["tail"] = tail
    off["rqes"] = rqes
    off["__resv2"] = 0
    off["__resv"] = 0


def _read_user(task: Task, addr: int, dtype: np.dtype[Any]) -> np.ndarray:
    """``copy_from_user`` of one struct (a copy); ``-EFAULT`` when unreadable."""
    raw = task.mm.resolve(addr, dtype.itemsize, write=False)
    return raw.view(dtype).copy()


def _writable(task: Task, addr: int, dtype: np.dtype[Any]) -> NDArray[np.uint8]:
    """The user bytes a struct will be written back to; ``-EFAULT`` when not writable."""
    return task.mm.resolve(addr, dtype.itemsize, write=True)


# --------------------------------------------------------------------------------------------
# Area, provider, box
# --------------------------------------------------------------------------------------------


@dataclass(eq=False)
class ZcrxArea:
    """A registered area: the app region the kernel attached (pinned) and its niovs.

    ``space`` owns the attachment (closing it detaches the region); ``map_id`` is the NIC's
    DMA mapping of the whole region (hardware queues only).
    """

    space: BufferSpace
    addr: int
    length: int
    niov_shift: int
    region: Region
    map_id: int | None = None

    @property
    def buf_len(self) -> int:
        return self.space.buf_len

    @property
    def count(self) -> int:
        return self.space.count


class ZcrxProvider(MemoryProvider):
    """The io_uring memory provider of a hardware-bound ifq (``io_uring_pp_zc_ops``).

    Pools built on it hand out the niovs of every area of the ifq (its :class:`SpaceSet`,
    shared: an area added later joins the running pools, :meth:`attach`), as keys ``area id
    << 32 | niov``: first recycled through the refill queue, then from the area freelists
    walked in order (Linux 7.3's slow path).  Each area is its own DMA mapping
    (:meth:`map_id`).  ``pools`` are the live page pools using it (a relayout of the queue
    creates a new one while the old one drains); the ifq's delayed destruction ends when none
    is left.
    """

    kind = "io-uring"

    def __init__(self, ifq: Ifq) -> None:
        super().__init__(ifq.area.space, ifq.spaces)
        self.ifq = ifq
        self.dma_map_id = ifq.area.map_id
        self.pools: set[PagePool] = set()

    def map_id(self, index: int) -> int | None:
        return self.ifq.areas[index].map_id

    def attach(self, space: BufferSpace) -> None:
        """An area was added to the ifq: every pool may now draw from it."""
        for pool in self.pools:
            pool.attach(space)

    def alloc(self, pool: PagePool, n: int) -> NDArray[np.int64]:
        ifq = self.ifq
        st = ifq.counters
        st["alloc_calls"] += 1
        if n <= 0:
            return _EMPTY
        got = 0
        if ifq.state == "live":
            before = len(pool.cache)
            ifq.consume_rq(n, flush=False)
            got = min(len(pool.cache) - before, n)
            st["alloc_from_rq"] += got
        fresh = self.spaces.take_free(n - got)
        st["alloc_from_freelist"] += len(fresh)
        if got + len(fresh) < n:
            st["alloc_fail"] += 1
            if not got and not len(fresh) and ifq.event_mask:
                ifq.event(abi.ZCRX_EVENT_ALLOC_FAIL)  # nothing at all: the queue starves
        return fresh

    def release(self, pool: PagePool, ids: NDArray[np.int64]) -> None:
        self.spaces.put_free(ids)

    def init(self, pool: PagePool) -> None:
        self.pools.add(pool)

    def destroy(self, pool: PagePool) -> None:
        self.pools.discard(pool)


class ZcrxBox:
    """An exported ifq (``ZCRX_CTRL_EXPORT``): the ``[zcrx]`` file that keeps it alive and can
    be imported into another ring (``ZCRX_REG_IMPORT``).  Closing the fd drops its hold."""

    def __init__(self, zcrx: Zcrx, ifq: Ifq) -> None:
        self.zcrx = zcrx
        self.ifq: Ifq | None = ifq
        ifq.users.add(self)

    def __repr__(self) -> str:
        return f"<ZcrxBox {self.ifq!r}>"

    def close(self) -> None:
        ifq, self.ifq = self.ifq, None
        if ifq is not None:
            self.zcrx._drop_user(ifq, self)


# --------------------------------------------------------------------------------------------
# The ifq
# --------------------------------------------------------------------------------------------


@dataclass(eq=False)
class Ifq:
    """One zcrx interface queue (``struct io_zcrx_ifq``).

    ``users`` are the rings that have an id for it and the boxes that export it; when the last
    one goes the ifq terminates.  ``state``: ``live``, ``closing`` (scrubbed and unbound,
    waiting for niovs in skbs), ``dead``.
    """

    serial: int
    task: Task
    area: ZcrxArea
    rq_entries: int
    rq_mem: NDArray[np.uint8] | None
    rq_region: Region | None
    dev: MpNetdev | None = None  # the netdev of a hardware queue (None: NODEV)
    rxq: int = 0
    provider: ZcrxProvider | None = None
    state: str = "live"
    users: set[object] = field(default_factory=set)
    counters: Counter[str] = field(default_factory=Counter)
    rq: RingConsumer | None = None
    #: the Linux release the kernel acts as (RQ layout, refill behaviour)
    kernel: tuple[int, int] = abi.LINUX_VERSION
    #: events (7.2): ``zcrx_event_desc.user_data`` and ``type_mask``, the types that fired
    #: and are not re-armed, the ring that registered the ifq (None once it closed), the
    #: ``zcrx_stats`` in the RQ region (the kernel writes it, the app reads it)
    event_user_data: int = 0
    event_mask: int = 0
    events_fired: int = 0
    event_ring: Ring | None = None
    stats: np.ndarray | None = None
    #: every area by area id (``area`` first; more with ZCRX_CTRL_ADD_AREA, 7.3) and their
    #: niovs as one :class:`SpaceSet` (keys ``area id << 32 | niov``; ``spaces.counts`` the
    #: niovs per area)
    areas: list[ZcrxArea] = field(default_factory=list)
    spaces: SpaceSet = field(default_factory=SpaceSet)

    def __post_init__(self) -> None:
        if not self.areas:
            self.areas.append(self.area)
            self.spaces.add(self.area.space)
        if self.rq_mem is not None:
            layout = _rq_layout(self.rq_entries, self.kernel)
            for word in (layout.head, layout.tail):  # zeroed by the kernel at registration
                self.rq_mem[word:word + 4] = 0
            self.rq = RingConsumer(self.rq_mem, layout, untrusted=True)
        for name in IFQ_COUNTERS:
            self.counters[name] = 0

    def __repr__(self) -> str:
        where = "nodev" if self.dev is None else f"{self.dev.name}.q{self.rxq}"
        return (f"<Ifq #{self.serial} {where} {self.state} niovs={self.niovs}"
                f"x{self.area.buf_len} rq={self.rq_entries}>")

    @property
    def nodev(self) -> bool:
        return self.dev is None

    @property
    def space(self) -> BufferSpace:
        """The first area's niovs."""
        return self.area.space

    @property
    def niovs(self) -> int:
        """niovs over every area."""
        return self.spaces.total

    @property
    def free_count(self) -> int:
        """Free niovs over every area (what the copy fallback can take)."""
        return self.spaces.free_count()

    def add_area(self, area: ZcrxArea) -> int:
        """Append an area (``ZCRX_CTRL_ADD_AREA``, already DMA-mapped on a hardware queue):
        its niovs join the set, and the queue's running page pools draw from it at once.
        Returns its area id."""
        self.areas.append(area)
        aid = self.spaces.add(area.space)
        if self.provider is not None:
            self.provider.attach(area.space)
        return aid

    # -- the refill queue ---------------------------------------------------------------------

    def consume_rq(self, limit: int, *, flush: bool) -> tuple[int, bool]:
        """Consume up to ``limit`` RQEs (``io_zcrx_ring_refill`` / one FLUSH_RQ batch).

        Valid entries return one user reference each to the niov's area
        (:meth:`BufferSpace.put_user`, which recycles niovs whose last reference went: into
        their pool's cache, or the area freelist for copy-fallback niovs); malformed ones are
        consumed and counted.  With ``flush`` the batch stops right after the first malformed
        entry.  Returns ``(consumed, stopped)``.
        """
        rq = self.rq
        if rq is None or limit <= 0:
            return 0, False
        st = self.counters
        if not rq.check_own():
            st["rq_head_tampered"] += 1
        f0 = rq.faults
        ready = rq.ready()  # the tail, read once per call
        if rq.faults != f0:
            st["rq_tail_faults"] += rq.faults - f0
        n = min(ready, limit)
        if n <= 0:
            return 0, False
        coalesce = not flush and self.kernel >= (7, 3)
        kind, keys = self._parse_rqes(self._read_rqes(rq, 0, n))
        nbad = int(np.count_nonzero(kind))
        stopped = False
        if nbad and coalesce:
            # 7.3: Linux's refill runs once per PP_ALLOC_CACHE_REFILL buffers the pool needs
            # and walks RQEs until it has them or ZCRX_REFILL_CAP RQEs were consumed: RQEs
            # that give no buffer (malformed ones) do not count against ``limit``; read on
            # past them (rare), parsing only the entries not parsed yet
            cap = REFILL_CAP * -(-limit // PP_ALLOC_CACHE_REFILL)
            window = min(ready, cap)
            if window > n:
                k2, g2 = self._parse_rqes(self._read_rqes(rq, n, window - n))
                kind, keys = np.concatenate((kind, k2)), np.concatenate((keys, g2))
                good = np.cumsum(kind == 0)
                k = int(np.searchsorted(good, limit))  # the RQE that gave the last buffer
                n = min(k + 1, window)
                if k >= window and window == cap:
                    st["refill_capped"] += 1
                kind, keys = kind[:n], keys[:n]
                nbad = int(np.count_nonzero(kind))
        elif nbad and flush:
            stopped = True
            n = int(np.argmax(kind != 0)) + 1
            kind, keys = kind[:n], keys[:n]
            nbad = 1
        if nbad:
            c = np.bincount(kind, minlength=4)
            st["rq_invalid_area"] += int(c[_RQE_BAD_AREA])
            st["rq_invalid_pad"] += int(c[_RQE_BAD_PAD])
            st["rq_invalid_range"] += int(c[_RQE_BAD_RANGE])
            keys = keys[kind == 0]
        self._put_user(keys, coalesce)
        rq.release(n)
        st["rq_consumed"] += n
        return n, stopped

    @staticmethod
    def _read_rqes(rq: RingConsumer, skip: int, n: int) -> np.ndarray:
        """A private copy of ``n`` RQEs from ``skip`` past the head (the peer's entries are
        read once)."""
        start = (rq.head + skip) & rq.mask
        first = min(n, rq.nentries - start)
        if first == n:
            return rq.ring[start:start + n].copy()
        return np.concatenate((rq.ring[start:], rq.ring[:n - first]))

    def _parse_rqes(self, ents: np.ndarray) -> tuple[NDArray[np.uint8], NDArray[np.int64]]:
        """``io_parse_rqe`` over a batch: ``(kind, key)``; ``kind`` is 0 for a valid RQE,
        else its first fault (``_RQE_BAD_AREA``: no such area, ``_RQE_BAD_PAD``: ``__pad``
        set, ``_RQE_BAD_RANGE``: niov index past its area); ``key`` names the niov in
        :attr:`spaces` (``area id << 32 | niov``)."""
        off = ents["off"]
        nareas = len(self.areas)
        aid = off >> np.uint64(abi.IORING_ZCRX_AREA_SHIFT)
        idx = ((off & np.uint64(_LOW48)) >> np.uint64(self.area.niov_shift)).astype(np.int64)
        if nareas == 1:
            area_bad = aid != 0
            range_bad = idx >= self.area.count
            keys = idx
        else:
            area_bad = aid >= nareas
            a = np.minimum(aid, nareas - 1).astype(np.int64)
            range_bad = idx >= self.spaces.counts[a]
            keys = idx | (a << KEY_SHIFT)
        kind = np.where(range_bad, _RQE_BAD_RANGE, 0).astype(np.uint8)
        kind[ents["__pad"] != 0] = _RQE_BAD_PAD
        kind[area_bad] = _RQE_BAD_AREA
        return kind, keys

    def _put_user(self, keys: NDArray[np.int64], coalesce: bool) -> None:
        """The valid returns (keys of :attr:`spaces`): coalesced on 7.3 (:meth:`_coalesce`),
        then one :meth:`BufferSpace.put_user` per area named."""
        if not len(keys):
            return
        if coalesce and len(keys) > 1:
            ok = self._coalesce(keys)
            if ok is not None:
                keys = keys[ok]
        st = self.counters
        for sp, ids in self.spaces.groups(keys):
            # every id is in range: a return put_user did not accept had no reference
            accepted = sp.put_user(ids)
            st["rq_returned"] += accepted
            st["rq_invalid_noref"] += len(ids) - accepted

    def _coalesce(self, keys: NDArray[np.int64]) -> NDArray[np.bool_] | None:
        """Linux 7.3's refill: a run of consecutive RQEs naming one niov (malformed entries
        in between are skipped, they do not end it) drops its references in one step, and a
        run longer than the niov's ``user_refs`` is ignored whole (counted in
        ``rq_runs_ignored``; its RQEs in ``rq_invalid_noref``).  Returns which entries to
        apply (None: all)."""
        new_run = keys[1:] != keys[:-1]
        if new_run.all():
            # no run longer than one RQE: one return per RQE while references last, which
            # is what BufferSpace.put_user does by itself
            return None
        starts = np.flatnonzero(np.concatenate(([True], new_run)))
        lens = np.diff(np.append(starts, len(keys)))
        niov = keys[starts]
        refs = self.spaces.user_refs(niov).astype(np.int64)
        ok = lens <= refs
        _, inv, cnt = np.unique(niov, return_inverse=True, return_counts=True)
        multi = np.flatnonzero(cnt[inv] > 1)
        if len(multi):
            # a niov in several runs (rare): each run sees the references earlier ones left;
            # a loop over those runs only
            left: dict[int, int] = {}
            for i in multi.tolist():
                v, ln = int(niov[i]), int(lens[i])
                rem = left.get(v, int(refs[i]))
                ok[i] = ln <= rem
                left[v] = rem - ln if ok[i] else rem
        if ok.all():
            return None
        st = self.counters
        st["rq_runs_ignored"] += int(np.count_nonzero(~ok))
        st["rq_invalid_noref"] += int(lens[~ok].sum())
        return np.repeat(ok, lens)

    def flush(self) -> int:
        """``ZCRX_CTRL_FLUSH_RQ``: consume up to ``rq_entries`` RQEs, stopping right after a
        malformed entry.  Linux walks the RQ in batches of :data:`FLUSH_BATCH` under its lock;
        the entries consumed and their effects are the same as one pass over all of them, so
        the emulator does one numpy pass (256 passes of 32 cost ~1 us per RQE in Python).
        A faulty RQ tail is clamped and counted once per flush.  Returns entries consumed."""
        self.counters["flushes"] += 1
        n, _ = self.consume_rq(self.rq_entries, flush=True)
        return n

    # -- events (Linux 7.2) ---------------------------------------------------------------

    def event(self, etype: int) -> bool:
        """Post event ``etype`` (``ZCRX_EVENT_*``) if it is wanted and not fired since the
        last arm: a plain 16-byte CQE on the registering ring (``user_data`` of the event
        desc, ``res`` = the type, ``flags`` 0; the upper half of a CQE32 slot zeroed).  Linux
        queues it as task work of that ring; the emulated kernel posts it at once.  True if
        posted."""
        bit = 1 << etype
        ring = self.event_ring
        if not self.event_mask & bit or self.events_fired & bit or ring is None:
            return False
        self.events_fired |= bit
        self.counters["events"] += 1
        ring.post(self.event_user_data, etype, 0)
        return True

    def arm_event(self, etype: int, resv: bool) -> None:
        """``ZCRX_CTRL_ARM_EVENT``: let a fired event type fire again (``-EINVAL`` for an
        unknown type, reserved words, or a type that has not fired)."""
        if etype >= abi.ZCRX_EVENT_TYPE_LAST or resv:
            raise _misuse(f"arm event type {etype}", errno.EINVAL)
        if not self.events_fired & (1 << etype):
            raise _misuse(f"event type {etype} has not fired", errno.EINVAL)
        self.events_fired &= ~(1 << etype)

    def count_copies(self, n: int, nbytes: int) -> None:
        """The copy fallback filled ``n`` niovs with ``nbytes``: stats and the COPY event."""
        if self.stats is not None:
            self.stats["copy_count"] += n
            self.stats["copy_bytes"] += nbytes
        if self.event_mask:
            self.event(abi.ZCRX_EVENT_COPY)

    # -- ledger -------------------------------------------------------------------------------

    def ledger(self) -> dict[str, int]:
        """niovs per state over every area (sums to :attr:`niovs`)."""
        if len(self.areas) == 1:
            return self.space.ledger()
        total: Counter[str] = Counter()
        for a in self.areas:
            total.update(a.space.ledger())
        return dict(total)

    def area_ledgers(self) -> list[dict[str, Any]]:
        """Per area: its id, niov count and ledger (``zcrx stats --ledger``)."""
        return [{"area_id": i, "niovs": a.count, "ledger": a.space.ledger()}
                for i, a in enumerate(self.areas)]

    def check_ledger(self, skb_refs: Mapping[int, int] | None = None) -> dict[str, int]:
        """Verify every area's ledger (:meth:`BufferSpace.check_ledger`) and that every
        page-pool reference has a holder: the driver (DRIVER/POSTED), an skb frag
        (``skb_refs`` per space id, when given) or a user reference.  Raises InvariantBroken.
        Returns the ledger over every area."""
        total: Counter[str] = Counter()
        for a in self.areas:
            sp = a.space
            led = sp.check_ledger()
            if skb_refs is not None:
                refs = int(sp.pp_ref.sum())
                held = (led["driver"] + led["posted"] + skb_refs.get(sp.space_id, 0)
                        + int(sp.user_refs.sum()))
                if refs != held:
                    raise InvariantBroken(f"{self}: {refs} page-pool references in {sp}, "
                                          f"{held} holders")
            if self.nodev and (led["pool_cache"] or led["driver"] or led["posted"]):
                raise InvariantBroken(f"{self}: a NODEV area has niovs in a page pool")
            total.update(led)
        return dict(total)

    # -- introspection ------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        return {
            "ifq": self.serial,
            "task": self.task.tid,
            "state": self.state,
            "mode": "nodev" if self.nodev else "queue",
            "dev": None if self.dev is None else self.dev.name,
            "ifindex": 0 if self.dev is None else self.dev.ifindex,
            "queue": None if self.dev is None else self.rxq,
            "rq_entries": self.rq_entries,
            "rq_memory": "kernel" if self.rq_region is not None else "user",
            "area": {"addr": self.area.addr, "len": self.area.length,
                     "niovs": self.area.count, "buf_len": self.area.buf_len,
                     "region": self.area.region.name},
            "areas": len(self.areas),
            "niovs": self.niovs,
            "users": len(self.users),
            "pools": 0 if self.provider is None else len(self.provider.pools),
        }

    def stats_dict(self) -> dict[str, Any]:
        d = self.status()
        d["counters"] = dict(self.counters)
        d["counters"]["rq_invalid"] = sum(self.counters[k] for k in (
            "rq_invalid_area", "rq_invalid_pad", "rq_invalid_range", "rq_invalid_noref"))
        d["ledger"] = self.ledger() if self.state != "dead" else {}
        d["area_ledgers"] = self.area_ledgers() if self.state != "dead" else []
        return d


# --------------------------------------------------------------------------------------------
# RECV_ZC
# --------------------------------------------------------------------------------------------


class RecvZcRequest(Request):
    """``IORING_OP_RECV_ZC``: hand a TCP socket's data to the user as niovs of one ifq."""

    multishot = True

    def __init__(self, ring: Ring, sqe: Sqe, sock: SocketFile, zcrx: Zcrx, ifq: Ifq) -> None:
        super().__init__(ring, sqe, sock)
        self.zcrx = zcrx
        self.ifq = ifq
        self.limit = sqe.len          # 0: unlimited
        self.left = sqe.len           # bytes still allowed when limited
        self.poll_first = bool(sqe.ioprio & abi.IORING_RECVSEND_POLL_FIRST)
        self.requeued = False
        #: armed on the socket at least once (Linux: the apoll handler is installed)
        self.polled = False

    def arm(self) -> None:
        self.polled = True
        super().arm()

    def issue(self) -> None:
        self.ring.inflight.add(self)
        self.ifq.counters["recv_requests"] += 1
        conn = self.sock.conn
        if self.poll_first and conn is not None and not (
                conn.rxq.nbytes or conn.end_status() is not None):
            self.arm()  # POLL_FIRST: no attempt until the socket reports readiness
            return
        self.attempt(issue=True)

    def _end(self, res: int) -> None:
        st = self.ifq.counters
        if res == -errno.ENOMEM:
            st["recv_enomem"] += 1
        elif res == -errno.ENOSPC:
            st["recv_enospc"] += 1
        elif res == -errno.EFAULT:
            st["recv_efault"] += 1
        self.complete(res)

    def attempt(self, issue: bool) -> None:
        self.requeued = False
        if self.done:
            return
        if self.ifq.state != "live":
            self.complete(-errno.ECANCELED)
            return
        conn = self.sock.conn
        if conn is None:
            self.complete(-errno.ENOTCONN)  # never connected (or a listener): TCP_CLOSE
            return
        while not self.done:
            if conn.rxq.nbytes == 0:
                end = conn.end_status()
                if end is None:
                    self.arm()  # -EAGAIN is not terminal: wait for readiness
                    return
                if end < 0:
                    conn.take_error()
                self.complete(end)
                return
            got, err, cut = self._pass(conn, fold=not issue and self._may_fold())
            issue = False
            if got == 0:
                self._end(-(err or errno.EIO))
                return
            if self.limit and self.left == 0:
                self.complete(0)  # the len budget is used up
                return
            if cut or (err is not None and conn.fin_reached):
                self.zcrx._requeue_req(self)
                return
            if err is not None and self.polled:
                # Issued by a readiness event: the poll stays armed and the next event
                # issues again (Linux io_poll_check_events, one issue per wakeup).
                self.arm()
                return
            # Otherwise Linux arms the poll now, finds the socket readable and issues again.

    def _may_fold(self) -> bool:
        """True when no other request would take a turn between consecutive passes: nothing
        is requeued and no other RECV_ZC of this ring has data waiting.

        The ring keeps the list of its RECV_ZC requests that may hold data, made from the
        in-flight set when a request joined or any receive queue was appended to since
        (``Inflight.adds``, ``RxQueue.appends``); until then data only leaves queues and
        requests only leave the ring, so a request found without data is dropped from the
        list for good.  Each check costs what it drops, not the number of requests in
        flight (thousands of connections on one ring made the scan quadratic)."""
        if self.zcrx._requeued:
            return False
        ring = self.ring
        key = (ring.inflight.adds, RxQueue.appends)
        view = ring.zcrx_fold
        if view is None or view[0] != key:
            view = ring.zcrx_fold = (key, [r for r in ring.inflight
                                           if isinstance(r, RecvZcRequest)])
        cands: list[RecvZcRequest] = view[1]
        keep: list[RecvZcRequest] = []
        other = False
        for i, r in enumerate(cands):
            c = r.sock.conn
            if r.done or c is None or not c.rxq.nbytes:
                continue  # no data now, so none before the key moves
            keep.append(r)
            if r is not self:
                other = True
                keep.extend(cands[i + 1:])
                break
        cands[:] = keep
        return not other

    def _pass(self, conn: TcpReceiver, fold: bool = False) -> tuple[int, int | None, bool]:
        """One ``tcp_read_sock`` walk (``io_zcrx_tcp_recvmsg``): ``(bytes delivered, errno
        that stopped it or None, stopped only by the skb limit)``.  ``fold``: run up to
        :data:`PASSES_PER_BATCH` passes back to back (nobody else would take a turn between).

        The whole walk is one numpy batch, in Linux's steps: :meth:`_recv_skb` (every chunk
        of the walked skbs, a niov of another ifq ending it with ``-EFAULT`` as
        ``io_zcrx_recv_frag`` does), :func:`_split_cqes` (one CQE per niov frag, one per
        :data:`COPY_CHUNK` of copied bytes), :meth:`_cqes_that_fit` (CQ room, free niovs),
        :meth:`_copy_chunk` (``io_zcrx_copy_chunk``), :meth:`_queue_cqe`
        (``io_zcrx_queue_cqe``); then the receive queue is consumed past what was delivered.
        """
        ifq = self.ifq
        rxq = conn.rxq
        # With no other request waiting for its turn, consecutive passes (each yielding
        # after SKBS_PER_PASS skbs) would run back to back: do up to PASSES_PER_BATCH of
        # them in one batch; the CQE stream is the same, the requeues are still counted.
        most = SKBS_PER_PASS * (PASSES_PER_BATCH if fold else 1)
        # (unlimited: one piece past the turn tells whether the turn ends by yielding)
        pieces = (rxq.peek(min(rxq.nbytes, self.left)) if self.limit
                  else rxq.peek_head(most + 1))
        cut = pieces.npieces > most
        if cut:
            pieces = Pieces(pieces.handles[:most], pieces.offsets[:most],
                            pieces.lengths[:most])
        fr, err = self._recv_skb(pieces)
        if err is not None:
            cut = False
        cq = _split_cqes(fr)
        total = len(cq.idx)
        m, limit_err = self._cqes_that_fit(cq)
        if m < total:
            err = limit_err
            cut = False
        if m == 0:
            return 0, err, False
        if m < total:
            cq = cq.head(m)
        # a niov frag's CQE points into its area: token | niov * buf_len + frag offset
        offs = _cqe_offsets(ifq.spaces, fr.key[cq.idx], fr.boff[cq.idx])
        ids, cp = self._copy_chunk(pieces, fr, cq, offs)
        posted, n_copy, zc_bytes = self._queue_cqe(fr, cq, offs, ids, cp)
        if posted < m:
            err = errno.ENOSPC
            cut = False
        delivered = int(cq.len[:posted].sum())
        if delivered:
            self.zcrx.sockets.free(rxq.consume(delivered))
        st = ifq.counters
        n_zc = posted - n_copy
        if n_zc:
            st["zc_cqes"] += n_zc
            st["zc_bytes"] += zc_bytes
        if n_copy:
            st["copy_count"] += n_copy
            st["copy_bytes"] += delivered - zc_bytes
            if ifq.stats is not None or ifq.event_mask:
                ifq.count_copies(n_copy, delivered - zc_bytes)
        if self.limit:
            self.left -= delivered
        if posted:
            # every SKBS_PER_PASS skbs walked, one pass ended by yielding (requeue)
            walked = int(fr.piece[cq.idx[posted - 1]]) + 1
            st["recv_requeues"] += (walked - 1) // SKBS_PER_PASS + (1 if cut else 0)
        return delivered, err, cut

    def _recv_skb(self, pieces: Pieces) -> tuple[_Frags, int | None]:
        """``io_zcrx_recv_skb`` over every walked skb: the chunks of ``pieces`` in stream
        order, each a frag in a niov of one of this ifq's areas (handed over in place) or
        data to copy (linear data, kernel-page frags).  ``io_zcrx_recv_frag`` refuses a niov
        of another ifq's area: the walk ends before the first one, with ``EFAULT``."""
        z = self.zcrx
        piece, src, buf, boff, ln, skb_off = z._chunks(pieces)
        zc, key = self.ifq.spaces.find(src, buf)
        all_zc = bool(zc.all())
        err: int | None = None
        if not all_zc:
            foreign = z._foreign_ids(self.ifq)
            if len(foreign):
                fo = np.isin(src, foreign)
                if fo.any():
                    f = int(np.argmax(fo))
                    piece, src, key, boff, ln, skb_off = (
                        a[:f] for a in (piece, src, key, boff, ln, skb_off))
                    zc = zc[:f]
                    err = errno.EFAULT
                    all_zc = bool(zc.all())
        return _Frags(piece, src, key, boff, ln, skb_off, zc, all_zc), err

    def _cqes_that_fit(self, cq: _Cqes) -> tuple[int, int]:
        """How many of the planned CQEs can go out: the CQ's room (``io_zcrx_queue_cqe``
        fails without it: ``ENOSPC``; RECV_ZC never overflows) and, for copies, the free
        niovs (``io_zcrx_copy_chunk`` fails without one: ``ENOMEM``).  Returns ``(count,
        errno if count falls short)``; Linux takes the niov before it queues the CQE, so no
        niov wins over no room."""
        ring = self.ring
        total = len(cq.idx)
        room = ring.cq_room()
        if ring.mixed:
            room //= 2  # a 32-byte CQE takes two slots
        m = min(total, room)
        m_mem = total
        if not cq.all_zc:
            # the first CQE whose copy finds the freelist empty
            ifq = self.ifq
            free = ifq.free_count
            m_mem = int(np.searchsorted(np.cumsum(cq.copy), free,
                                        side="right"))
            m = min(m, m_mem)
        return m, errno.ENOMEM if m == m_mem else errno.ENOSPC

    def _copy_chunk(self, pieces: Pieces, fr: _Frags, cq: _Cqes, offs: NDArray[np.int64]
                    ) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
        """``io_zcrx_copy_chunk`` for every copy CQE of the batch: a niov off the area
        freelists each (``io_alloc_fallback_niov`` walks the areas in order;
        :meth:`_cqes_that_fit` made sure there are enough), the chunk's bytes copied to its
        start (one copy per area), the CQE's offset pointed at it (``offs``, updated in
        place).  Returns ``(niov keys, indices of the copy CQEs)``; the niovs stay off the
        freelists, unowned, until :meth:`_queue_cqe` settles them."""
        if cq.all_zc:
            return _EMPTY, _EMPTY
        cp = np.flatnonzero(cq.copy)
        if not len(cp):
            return _EMPTY, cp
        ci = cq.idx[cp]
        h = pieces.handles[fr.piece[ci]]
        o = fr.skb_off[ci] + cq.j[cp] * COPY_CHUNK
        spaces = self.ifq.spaces
        keys = spaces.take_free(len(cp))
        if len(keys) != len(cp):
            raise InvariantBroken(f"{self.ifq}: freelists shrank under a RECV_ZC pass")
        pos = 0
        for space, ids in spaces.groups(keys):  # taken area after area: one run each
            k = len(ids)
            sl = slice(pos, pos + k)
            self.zcrx._copy_into(space, ids, h[sl], o[sl], cq.len[cp[sl]], fr.src[ci[sl]])
            pos += k
        offs[cp] = _cqe_offsets(spaces, keys, 0)
        return keys, cp

    def _queue_cqe(self, fr: _Frags, cq: _Cqes, offs: NDArray[np.int64],
                   ids: NDArray[np.int64], cp: NDArray[np.int64]) -> tuple[int, int, int]:
        """``io_zcrx_queue_cqe`` for the batch: post the CQEs (``F_MORE``, ``off`` = area
        token | offset, ``res`` = bytes) in one go, then settle the references of what went
        out.  A niov frag gains one page-pool reference (``io_zcrx_recv_frag``'s
        ``page_pool_ref_netmem``) and one user reference (``io_zcrx_get_niov_uref``)
        (:meth:`BufferSpace.get_user`); a copy niov is lent to the user
        (:meth:`BufferSpace.lend_free`); a copy niov whose CQE did not fit goes back to its
        area's freelist (``io_zcrx_return_niov``).  ``ids`` are keys of the ifq's
        :attr:`Ifq.spaces`; every step is one numpy batch per area named.  Returns ``(CQEs
        posted, of them copies, zero-copy bytes)``."""
        ifq = self.ifq
        spaces = ifq.spaces
        m = len(cq.idx)
        res = cq.len.astype(np.int64, copy=False)
        flags = np.full(m, abi.IORING_CQE_F_MORE, dtype=np.int64)
        posted = self.ring.post_big_batch(self.user_data, res, flags, offs)
        n_copy = 0
        if len(cp):
            n_copy = int(np.searchsorted(cp, posted))
            if n_copy < len(ids):
                spaces.put_free(ids[n_copy:])  # the CQE never went out: back to its area
            for space, b in spaces.groups(ids[:n_copy]):
                space.lend_free(b)
        n_zc = posted - n_copy
        if not n_zc:
            return posted, n_copy, 0
        if not n_copy:
            zc_keys = fr.key[cq.idx[:posted]]
            zc_bytes = int(res[:posted].sum())
        else:
            zc_post = ~cq.copy[:posted]
            zc_keys = fr.key[cq.idx[:posted][zc_post]]
            zc_bytes = int(res[:posted][zc_post].sum())
        for space, b in spaces.groups(zc_keys):
            space.get_user(b)
        return posted, n_copy, zc_bytes


def _own_areas(reqs: Sequence[RecvZcRequest], mem: NDArray[np.int64], src: NDArray[np.int64]
               ) -> tuple[list[Ifq], NDArray[np.int64], NDArray[np.int64], NDArray[np.int64],
                          NDArray[np.bool_]]:
    """For chunks of the requests ``reqs`` (chunk ``i`` belongs to ``reqs[mem[i]]`` and lies
    in the space ``src[i]``): the requests' distinct ifqs, each chunk's ifq index, the
    area index and table row of its space among those ifqs' areas, and whether the chunk
    is a niov of its own request's ifq (``io_zcrx_recv_frag`` hands those over in place)."""
    ifq_ix: dict[int, int] = {}
    ifqs: list[Ifq] = []
    for req in reqs:
        if id(req.ifq) not in ifq_ix:
            ifq_ix[id(req.ifq)] = len(ifqs)
            ifqs.append(req.ifq)
    m_ifq = np.fromiter((ifq_ix[id(r.ifq)] for r in reqs), dtype=np.int64, count=len(reqs))
    sids = np.concatenate([q.spaces.sids for q in ifqs])
    nsp = [len(q.spaces) for q in ifqs]
    owner = np.repeat(np.arange(len(ifqs), dtype=np.int64), nsp)
    area = np.concatenate([np.arange(c, dtype=np.int64) for c in nsp])
    order = np.argsort(sids, kind="stable")
    at = order[np.minimum(np.searchsorted(sids[order], src), len(sids) - 1)]
    c_ifq = m_ifq[mem]
    return ifqs, c_ifq, area, at, (sids[at] == src) & (owner[at] == c_ifq)


def _get_user_refs(ifqs: list[Ifq], key: NDArray[np.int64], c_ifq: NDArray[np.int64]) -> None:
    """The user references a batch of zero-copy CQEs takes (``io_zcrx_recv_frag``): niov
    ``key[i]`` of ifq ``ifqs[c_ifq[i]]`` gains one, through that ifq's spaces."""
    if len(ifqs) == 1:
        for space, b in ifqs[0].spaces.groups(key):
            space.get_user(b)
        return
    by = np.argsort(c_ifq, kind="stable")
    ends = np.cumsum(np.bincount(c_ifq, minlength=len(ifqs))).tolist()
    start = 0
    for q, end in zip(ifqs, ends, strict=True):
        if end > start:
            for space, b in q.spaces.groups(key[by[start:end]]):
                space.get_user(b)
        start = end


def _cqe_offsets(spaces: SpaceSet, keys: NDArray[np.int64], within: NDArray[np.int64] | int
                 ) -> NDArray[np.int64]:
    """The CQE ``off`` of niovs ``keys``: area token (``area id << 48``) | niov * buf_len +
    ``within``."""
    if len(spaces) == 1:
        out = keys * spaces.buf_len
        out += within
        return out
    out = (keys & KEY_MASK) * spaces.buf_len
    out += within
    out |= (keys >> KEY_SHIFT) << abi.IORING_ZCRX_AREA_SHIFT
    return out


class _Frags(NamedTuple):
    """The chunks one RECV_ZC pass walked, in stream order (arrays of one length):
    ``piece`` (index into the pass's pieces), ``src`` (space id of the memory holding it;
    ``LINEAR`` for skb linear data), ``key`` (the niov's key in the ifq's
    :class:`SpaceSet` where ``zc``, else meaningless), ``boff`` (offset in the buffer),
    ``ln`` (bytes), ``skb_off`` (offset in the skb's payload), ``zc`` (a niov of one of this
    ifq's areas: handed over in place); ``all_zc`` when every chunk is."""

    piece: NDArray[np.int64]
    src: NDArray[np.int64]
    key: NDArray[np.int64]
    boff: NDArray[np.int64]
    ln: NDArray[np.int64]
    skb_off: NDArray[np.int64]
    zc: NDArray[np.bool_]
    all_zc: bool


class _Cqes(NamedTuple):
    """The CQEs one pass plans, in order: ``idx`` (the chunk of :class:`_Frags`), ``len``
    (bytes), ``copy`` (through the copy fallback), ``j`` (which :data:`COPY_CHUNK` of its
    chunk); ``all_zc`` when none is a copy."""

    idx: NDArray[np.int64]
    len: NDArray[np.int64]
    copy: NDArray[np.bool_]
    j: NDArray[np.int64]
    all_zc: bool

    def head(self, m: int) -> _Cqes:
        """The first ``m`` CQEs."""
        return _Cqes(self.idx[:m], self.len[:m], self.copy[:m], self.j[:m], self.all_zc)


def _split_cqes(fr: _Frags) -> _Cqes:
    """One CQE per niov frag, one per :data:`COPY_CHUNK` bytes of a chunk to copy (the loop
    of ``io_zcrx_copy_chunk``), in stream order."""
    ln = fr.ln
    if fr.all_zc:
        n = len(ln)
        return _Cqes(np.arange(n, dtype=np.int64), ln, np.zeros(n, dtype=bool),
                     np.zeros(n, dtype=np.int64), True)
    ncq = np.where(fr.zc, 1, (ln + COPY_CHUNK - 1) // COPY_CHUNK)
    c_idx = np.repeat(np.arange(len(ln), dtype=np.int64), ncq)
    c_j = np.arange(len(c_idx), dtype=np.int64) - np.repeat(np.cumsum(ncq) - ncq, ncq)
    c_copy = ~fr.zc[c_idx]
    c_len = np.where(c_copy, np.minimum(COPY_CHUNK, ln[c_idx] - c_j * COPY_CHUNK), ln[c_idx])
    return _Cqes(c_idx, c_len, c_copy, c_j, False)


# --------------------------------------------------------------------------------------------
# The subsystem
# --------------------------------------------------------------------------------------------


class Zcrx:
    """The zcrx subsystem of the kernel process.

    Args:
        uring: the io_uring subsystem it extends (opcodes, register ops, hooks).
        netdevs: the kernel's netdevs by name (looked up by ifindex at registration).
        skbs: the skb store (defaults to ``uring.skbs``); ``resolve`` tells niov frags from
            copies; a store without it is treated as all-linear (every byte copied).
    """

    def __init__(self, uring: IoUring, *, netdevs: Mapping[str, MpNetdev] | None = None,
                 skbs: Any = None, kernel: tuple[int, int] = abi.LINUX_VERSION) -> None:
        if kernel not in abi.KERNEL_VERSIONS:
            raise ValueError(f"kernel {kernel} is not one of {abi.KERNEL_VERSIONS}")
        #: the Linux release this kernel behaves as (``driver_proc --kernel``)
        self.kernel = kernel
        self.uring = uring
        self.sockets = uring.sockets
        self.skbs = skbs if skbs is not None else uring.skbs
        self.netdevs: Mapping[str, MpNetdev] = netdevs if netdevs is not None else {}
        self.ifqs: list[Ifq] = []
        #: hardware queues bound (or still draining): (ifindex, queue) -> ifq
        self.bound: dict[tuple[int, int], Ifq] = {}
        #: live area space ids -> ifq (a niov of another one in a socket is -EFAULT)
        self._areas: dict[int, Ifq] = {}
        #: every area space id ever registered (memory-traffic classification)
        self._area_ids_seen: set[int] = set()
        self._requeued: list[RecvZcRequest] = []
        #: take a round's plain RECV_ZC turns as one numpy batch (:meth:`_turns`); False
        #: takes every turn by itself (the reference the batch is tested against)
        self.batch_rounds = True
        #: turns taken batched so far, and whole rounds taken several at once by
        #: :meth:`_rounds` (diagnostics and tests)
        self.batched_turns = 0
        self.batched_rounds = 0
        #: counters of ifqs already destroyed, summed
        self.retired: Counter[str] = Counter()
        self.counters: Counter[str] = Counter()
        #: bytes the kernel copied for zcrx, by source kind
        self.copy_read: Counter[str] = Counter()
        uring.register_opcode(abi.IORING_OP_RECV_ZC,
                              OpDef("RECV_ZC", self._prep_recvzc, ioprio=True),
                              needs_file=False)
        uring.register_register_op(abi.IORING_REGISTER_ZCRX_IFQ, self._reg_ifq)
        uring.register_register_op(abi.IORING_REGISTER_ZCRX_CTRL, self._reg_ctrl)
        uring.register_register_op(abi.IORING_REGISTER_QUERY, self._reg_query, blind=True)
        uring.poll_hooks.append(self.poll)

    # -- lookups ------------------------------------------------------------------------------

    def _dev_by_index(self, ifindex: int) -> MpNetdev:
        for dev in self.netdevs.values():
            if dev.ifindex == ifindex:
                return dev
        raise _misuse(f"no netdev with ifindex {ifindex}", errno.ENODEV)

    def ring_ifqs(self, ring: Ring) -> dict[int, Ifq]:
        """The ring's zcrx ids -> ifqs (``ctx->zcrx_ctxs``)."""
        table: dict[int, Ifq] = ring.extra.setdefault("zcrx", {})
        return table

    def _foreign_ids(self, ifq: Ifq) -> NDArray[np.int64]:
        """Space ids of the areas of other ifqs than ``ifq``."""
        if len(self._areas) <= len(ifq.areas):
            return _EMPTY
        return np.fromiter((i for i, q in self._areas.items() if q is not ifq),
                           dtype=np.int64)

    def _alloc_id(self, ring: Ring) -> int:
        table = self.ring_ifqs(ring)
        zid = 0
        while zid in table:
            zid += 1
        try:
            abi.zcrx_region_mmap_offset(zid)
        except ValueError:
            raise _misuse("too many zcrx instances on this ring", errno.ENOSPC) from None
        return zid

    # -- IORING_REGISTER_ZCRX_IFQ -------------------------------------------------------------

    def _reg_ifq(self, ring: Ring | None, task: Task, nr_args: int,
                 blobs: list[bytes]) -> tuple[int, list[bytes]]:
        assert ring is not None
        if nr_args != 1:
            raise _misuse(f"ZCRX_IFQ nr_args {nr_args}, must be 1", errno.EINVAL)
        dt = abi.io_uring_zcrx_ifq_reg
        if not blobs or len(blobs[0]) != dt.itemsize:
            raise _misuse(f"ifq_reg must be {dt.itemsize} bytes", errno.EFAULT)
        if not task.cap_net_admin:
            raise _misuse("zcrx registration needs CAP_NET_ADMIN", errno.EPERM)
        if not ring.flags & abi.IORING_SETUP_DEFER_TASKRUN:
            raise _misuse("zcrx needs IORING_SETUP_DEFER_TASKRUN", errno.EINVAL)
        if not ring.flags & _IFQ_RING_FLAGS:
            raise _misuse("zcrx needs IORING_SETUP_CQE32 or CQE_MIXED", errno.EINVAL)
        reg = np.frombuffer(blobs[0], dtype=dt).copy()
        if reg["__resv"].any() or int(reg["zcrx_id"][0]):
            raise _misuse("ifq_reg reserved fields and zcrx_id must be 0", errno.EINVAL)
        if self.kernel < (7, 2) and int(reg["event_desc"][0]):
            raise _misuse("ifq_reg __resv[0] (event_desc since 7.2) must be 0", errno.EINVAL)
        flags = int(reg["flags"][0])
        if flags & abi.ZCRX_REG_IMPORT:
            return self._import(ring, task, reg)
        rd = _read_user(task, int(reg["region_ptr"][0]), abi.io_uring_region_desc)
        if_idx, if_rxq = int(reg["if_idx"][0]), int(reg["if_rxq"][0])
        entries = int(reg["rq_entries"][0])
        if if_rxq == _U32 or entries == 0 or flags & ~_REG_FLAGS:
            raise _misuse("bad if_rxq, rq_entries or flags", errno.EINVAL)
        if entries > abi.IO_RQ_MAX_ENTRIES:
            if not ring.flags & abi.IORING_SETUP_CLAMP:
                raise _misuse(f"rq_entries {entries} > {abi.IO_RQ_MAX_ENTRIES}", errno.EINVAL)
            entries = abi.IO_RQ_MAX_ENTRIES
        entries = 1 << (entries - 1).bit_length()
        nodev = bool(flags & abi.ZCRX_REG_NODEV)
        rbl = int(reg["rx_buf_len"][0])
        if rbl and (not _is_pow2(rbl) or rbl < PAGE_SIZE):
            raise _misuse(f"rx_buf_len {rbl}", errno.EINVAL)
        if nodev and rbl not in (0, PAGE_SIZE):
            raise _misuse("NODEV supports only page-sized buffers", errno.EOPNOTSUPP)
        buf_len = rbl or PAGE_SIZE
        area_ptr = int(reg["area_ptr"][0])
        area_reg = _read_user(task, area_ptr, abi.io_uring_zcrx_area_reg)
        ev = self._read_event_desc(task, int(reg["event_desc"][0]))
        dev = None
        if nodev:
            if if_idx or if_rxq:
                raise _misuse("NODEV with if_idx/if_rxq", errno.EINVAL)
        else:
            dev = self._dev_by_index(if_idx)
        zid = self._alloc_id(ring)
        serial = next(_serial)
        rq_mem, rq_region = self._create_rq(ring, task, rd, entries, serial)
        area: ZcrxArea | None = None
        try:
            stats = self._event_stats(ev, rq_mem, entries)
            area = self._create_area(task, area_reg, buf_len, nodev)
            if dev is not None:
                self._check_bindable(dev, if_rxq, buf_len)
            # Linux copies the results out last and unwinds everything if that faults: the
            # write-back targets are checked before anything becomes visible.
            rd_out = _writable(task, int(reg["region_ptr"][0]), abi.io_uring_region_desc)
            area_out = _writable(task, area_ptr, abi.io_uring_zcrx_area_reg)
            ifq = Ifq(serial, task, area, entries, rq_mem, rq_region, dev=dev, rxq=if_rxq,
                      kernel=self.kernel)
            if ev is not None:
                ifq.event_user_data = int(ev["user_data"][0])
                ifq.event_mask = int(ev["type_mask"][0])
                ifq.stats = stats
                if ifq.event_mask:
                    ifq.event_ring = ring
            if dev is not None:
                self._bind(ifq)
        except BaseException:
            if rq_region is not None:
                rq_region.close()
            if area is not None:
                self._release_area(area, dev)
            raise
        # -- commit
        self.ifqs.append(ifq)
        self._areas[area.space.space_id] = ifq
        self._area_ids_seen.add(area.space.space_id)
        table = self.ring_ifqs(ring)
        table[zid] = ifq
        ifq.users.add(ring)
        self._hook(ring)
        if rq_region is not None:
            off = abi.zcrx_region_mmap_offset(zid)
            ring.mmap_regions[off] = rq_region
            rd["mmap_offset"] = off
        area_reg["rq_area_token"] = abi.area_token(0)
        rd_out[:] = rd.view(np.uint8)
        area_out[:] = area_reg.view(np.uint8)
        reg["rq_entries"] = entries
        reg["zcrx_id"] = zid
        reg["rx_buf_len"] = buf_len
        _offsets(reg, self.kernel)
        self.counters["registered"] += 1
        return 0, [reg.tobytes()]

    def _read_event_desc(self, task: Task, ptr: int) -> np.ndarray | None:
        """Read and check ``zcrx_event_desc`` (Linux 7.2; ``event_desc`` 0: none)."""
        if not ptr:
            return None
        ev = _read_user(task, ptr, abi.zcrx_event_desc)
        types = (1 << abi.ZCRX_EVENT_TYPE_LAST) - 1
        eflags = int(ev["flags"][0])
        if int(ev["type_mask"][0]) & ~types or eflags & ~abi.ZCRX_EVENT_DESC_FLAG_STATS:
            raise _misuse("event_desc: unknown event types or flags", errno.EINVAL)
        if not eflags & abi.ZCRX_EVENT_DESC_FLAG_STATS and int(ev["stats_offset"][0]):
            raise _misuse("event_desc: stats_offset without FLAG_STATS", errno.EINVAL)
        if ev["__resv2"].any():
            raise _misuse("event_desc: __resv2 must be 0", errno.EINVAL)
        return ev

    def _event_stats(self, ev: np.ndarray | None, rq_mem: NDArray[np.uint8], entries: int
                     ) -> np.ndarray | None:
        """The ``zcrx_stats`` the event desc places in the RQ region (zeroed), or None.

        ``stats_offset`` must be 8-byte aligned (``-EINVAL``), past the RQEs and inside the
        region (``-ERANGE``)."""
        if ev is None or not int(ev["flags"][0]) & abi.ZCRX_EVENT_DESC_FLAG_STATS:
            return None
        off = int(ev["stats_offset"][0])
        dt = abi.zcrx_stats
        if off % 8:
            raise _misuse(f"stats_offset {off} is not 8-byte aligned", errno.EINVAL)
        used = abi.zcrx_rq_layout(entries, self.kernel)[3]
        if off < used or off + dt.itemsize > len(rq_mem):
            raise _misuse(f"stats_offset {off} outside [{used}, {len(rq_mem)})", errno.ERANGE)
        stats = rq_mem[off:off + dt.itemsize].view(dt)
        stats[:] = 0
        return stats

    def _create_rq(self, ring: Ring, task: Task, rd: np.ndarray, entries: int, serial: int
                   ) -> tuple[NDArray[np.uint8], Region | None]:
        """The RQ memory (``io_allocate_rbuf_ring`` over ``io_create_region``)."""
        size = int(rd["size"][0])
        rflags = int(rd["flags"][0])
        user_addr = int(rd["user_addr"][0])
        if (rd["__resv"].any() or int(rd["id"][0]) or int(rd["mmap_offset"][0])
                or rflags & ~abi.IORING_MEM_REGION_TYPE_USER):
            raise _misuse("region_desc reserved fields, id, mmap_offset or flags", errno.EINVAL)
        # io_create_region: the memory kind and the address must agree, before size checks
        if bool(rflags & abi.IORING_MEM_REGION_TYPE_USER) != bool(user_addr):
            raise _misuse("user region at address 0, or kernel region with an address",
                          errno.EFAULT)
        if size == 0 or (user_addr | size) & (PAGE_SIZE - 1):
            raise _misuse(f"region size {size} / address {user_addr:#x}", errno.EINVAL)
        need = abi.zcrx_rq_layout(entries, self.kernel)[3]
        too_small = _misuse(f"RQ of {entries} entries needs {need} bytes, region has {size}",
                            errno.EINVAL)
        if rflags & abi.IORING_MEM_REGION_TYPE_USER:
            mem = task.mm.pin(user_addr, size, write=True)  # pinned while the ifq lives
            if need > size:
                raise too_small
            return mem, None
        if need > size:
            raise too_small
        region = Region.create(
            region_name(self.uring.run_id, "kernel", f"t{task.tid}.zcrx{serial}.rq"), size,
            uid=task.uid)  # the task's memory: its uid's, 0600
        assert region.buf is not None
        return np.frombuffer(region.buf, dtype=np.uint8), region

    def _create_area(self, task: Task, a: np.ndarray, buf_len: int, nodev: bool) -> ZcrxArea:
        """Validate, pin and split the area (``io_zcrx_create_area`` + ``io_import_area``)."""
        aflags = int(a["flags"][0])
        if aflags & ~abi.IORING_ZCRX_AREA_DMABUF or int(a["rq_area_token"][0]) \
                or a["__resv2"].any():
            raise _misuse("area flags, rq_area_token or __resv2", errno.EINVAL)
        if aflags & abi.IORING_ZCRX_AREA_DMABUF:
            if nodev:
                raise _misuse("dmabuf areas need a device", errno.EINVAL)
            raise _misuse("dmabuf areas are not emulated", errno.EOPNOTSUPP)
        if int(a["dmabuf_fd"][0]):
            raise _misuse("dmabuf_fd without IORING_ZCRX_AREA_DMABUF", errno.EINVAL)
        addr, length = int(a["addr"][0]), int(a["len"][0])
        if length == 0 or length > MAX_AREA_LEN:
            raise _misuse(f"area length {length}", errno.EFAULT)
        if (addr | length) & (PAGE_SIZE - 1):
            raise _misuse("area address/length not page aligned", errno.EINVAL)
        task.mm.resolve(addr, length, write=True)  # pin_user_pages(FOLL_WRITE): -EFAULT
        vma = task.mm.find(addr)
        if vma is None:
            raise InvariantBroken("resolved area has no mapping")
        offset = vma.offset + (addr - vma.start)
        if buf_len > PAGE_SIZE and (offset % buf_len or length % buf_len):
            raise _misuse(f"area not contiguous at {buf_len}-byte buffers", errno.ERANGE)
        try:
            region = task.mm.pin_region(vma)  # the inode mm_map checked, not the name
        except Misuse:
            raise _misuse(f"area region {vma.name} is gone or unsealed", errno.EFAULT) \
                from None
        try:
            if offset + length > region.size:
                raise _misuse(f"area past the end of {vma.name}", errno.EFAULT)
            assert region.buf is not None
            space = BufferSpace(region.buf, length // buf_len, buf_len, name=vma.name,
                                region_size=region.size, offset=offset, region=region)
        except BaseException:
            region.close()
            raise
        return ZcrxArea(space, addr, length, buf_len.bit_length() - 1, region)

    def _release_area(self, area: ZcrxArea, dev: MpNetdev | None) -> None:
        if area.map_id is not None and dev is not None:
            dev.dma_unmap(area.map_id)
            area.map_id = None
        area.space.close()

    # -- queue binding (net_mp_open_rxq / net_mp_close_rxq) -----------------------------------

    def _check_bindable(self, dev: MpNetdev, q: int, buf_len: int) -> None:
        """What binding ``q`` would refuse (:meth:`NetDevice.mp_check_rxq`), before anything
        is committed; an ifq of ours still being destroyed on that queue counts as bound."""
        dev.mp_check_rxq(q, buf_len, claimed=(dev.ifindex, q) in self.bound)

    def _bind(self, ifq: Ifq) -> None:
        """DMA-map the area and open the queue with a new :class:`ZcrxProvider`."""
        dev, area = ifq.dev, ifq.area
        assert dev is not None
        area.map_id = dev.dma_map(area.region.name, area.region.size, fd=area.region.fd)
        prov = ZcrxProvider(ifq)
        dev.mp_open_rxq(ifq.rxq, prov)  # on failure the queue is back on pages
        ifq.provider = prov
        self.bound[(dev.ifindex, ifq.rxq)] = ifq

    # -- import / export -----------------------------------------------------------------------

    def _import(self, ring: Ring, task: Task, reg: np.ndarray) -> tuple[int, list[bytes]]:
        if (int(reg["if_rxq"][0]) or int(reg["rq_entries"][0]) or int(reg["area_ptr"][0])
                or int(reg["region_ptr"][0]) or int(reg["flags"][0]) != abi.ZCRX_REG_IMPORT
                or int(reg["rx_buf_len"][0]) or int(reg["event_desc"][0])):
            raise _misuse("IMPORT takes only if_idx (the zcrx fd)", errno.EINVAL)
        fd = int(reg["if_idx"][0])
        box = task.files.get(fd if fd < 1 << 31 else fd - (1 << 32))
        if not isinstance(box, ZcrxBox) or box.ifq is None:
            raise _misuse(f"fd {fd} is not an exported zcrx", errno.EBADF)
        ifq = box.ifq
        zid = self._alloc_id(ring)
        self.ring_ifqs(ring)[zid] = ifq
        ifq.users.add(ring)
        self._hook(ring)
        if ifq.rq_region is not None:
            ring.mmap_regions[abi.zcrx_region_mmap_offset(zid)] = ifq.rq_region
        reg["zcrx_id"] = zid
        _offsets(reg, self.kernel)
        self.counters["imported"] += 1
        return 0, [reg.tobytes()]

    def _add_area(self, task: Task, ifq: Ifq, ctrl: np.ndarray) -> None:
        """``ZCRX_CTRL_ADD_AREA`` (Linux 7.3): register one more area of ``ifq``'s buffer size.

        ``zc_area.area_ptr`` points to an ``io_uring_zcrx_area_reg`` (unreadable ``-EFAULT``;
        ``__resv`` or an input token ``-EINVAL``).  As Linux, the token (``area_id << 48``) is
        written back before the area is made (an append cannot be undone; unwritable
        ``-EFAULT``, nothing made); then the area is checked, pinned and split as at
        registration (:meth:`_create_area`) and, on a hardware queue, DMA-mapped.  At most
        ``ZCRX_MAX_AREAS`` areas (``-EINVAL``).  The new niovs serve the copy fallback and,
        on a hardware queue, the queue's page pool at once (:meth:`Ifq.add_area`); they come
        back through the RQ like any other."""
        if ctrl["add_area_resv"].any():
            raise _misuse("zc_area.__resv must be 0", errno.EINVAL)
        ptr = int(ctrl["add_area_ptr"][0])
        a = _read_user(task, ptr, abi.io_uring_zcrx_area_reg)
        if int(a["rq_area_token"][0]):
            raise _misuse("area rq_area_token must be 0", errno.EINVAL)
        area_id = len(ifq.areas)
        if area_id >= abi.ZCRX_MAX_AREAS:
            raise _misuse(f"an ifq has at most {abi.ZCRX_MAX_AREAS} areas", errno.EINVAL)
        if ifq.state != "live":
            raise _misuse(f"{ifq} is going away", errno.ENXIO)
        out = a.copy()
        out["rq_area_token"] = abi.area_token(area_id)
        _writable(task, ptr, abi.io_uring_zcrx_area_reg)[:] = out.view(np.uint8)
        area = self._create_area(task, a, ifq.area.buf_len, ifq.nodev)
        try:
            if ifq.dev is not None:
                area.map_id = ifq.dev.dma_map(area.region.name, area.region.size,
                                              fd=area.region.fd)
        except BaseException:
            self._release_area(area, ifq.dev)
            raise
        ifq.add_area(area)
        self._areas[area.space.space_id] = ifq
        self._area_ids_seen.add(area.space.space_id)
        self.counters["areas_added"] += 1

    def _export(self, ring: Ring, task: Task, ifq: Ifq, ctrl: np.ndarray,
                uptr: int | None = None) -> None:
        """``ZCRX_CTRL_EXPORT``: a ``[zcrx]`` file holding the ifq, its fd written into
        ``ctrl``.  With the pointer form the struct is copied out to ``uptr`` after the fd
        was made; if that faults the file is released and the fd given back (no fd
        installed, no extra hold) and the call is ``-EFAULT``, as ``zcrx_export``."""
        if int(ctrl["export_zcrx_fd"][0]) or ctrl["export_resv1"].any():
            raise _misuse("zc_export must be zero", errno.EINVAL)
        if not task.can_install():
            raise _misuse("too many open files", errno.EMFILE)
        box = ZcrxBox(self, ifq)
        fd = task.install(box)
        ctrl["export_zcrx_fd"] = fd
        if uptr is not None:
            try:
                _writable(task, uptr, abi.zcrx_ctrl)[:] = ctrl.view(np.uint8)
            except Misuse:
                task.remove(fd)
                box.close()
                raise
        self.counters["exported"] += 1

    # -- IORING_REGISTER_ZCRX_CTRL ------------------------------------------------------------

    def _reg_ctrl(self, ring: Ring | None, task: Task, nr_args: int,
                  blobs: list[bytes]) -> tuple[int, list[bytes]]:
        assert ring is not None
        if nr_args != 0:
            raise _misuse("ZCRX_CTRL nr_args must be 0", errno.EINVAL)
        dt = abi.zcrx_ctrl
        uptr: int | None = None
        if blobs and len(blobs[0]) == 8:
            # the pointer form: blob 0 is the user address of the struct, read and (EXPORT)
            # written back through the task's mm, as Linux's copy_from_user/copy_to_user
            uptr = int.from_bytes(blobs[0], "little")
            ctrl = _read_user(task, uptr, dt)
        elif not blobs or len(blobs[0]) != dt.itemsize:
            raise _misuse(f"zcrx_ctrl must be {dt.itemsize} bytes", errno.EFAULT)
        else:
            ctrl = np.frombuffer(blobs[0], dtype=dt).copy()
        if ctrl["__resv"].any():
            raise _misuse("zcrx_ctrl.__resv must be 0", errno.EFAULT)  # kernel quirk
        ifq = self.ring_ifqs(ring).get(int(ctrl["zcrx_id"][0]))
        if ifq is None:
            raise _misuse(f"no zcrx {int(ctrl['zcrx_id'][0])} on this ring", errno.ENXIO)
        op = int(ctrl["op"][0])
        if op >= abi.zcrx_nr_ctrl_opcodes(self.kernel):
            raise _misuse(f"zcrx ctrl op {op} (Linux {self.kernel_name})", errno.EOPNOTSUPP)
        if op == abi.ZCRX_CTRL_FLUSH_RQ:
            if ctrl["flush_rq_resv"].any():
                raise _misuse("zc_flush.__resv must be 0", errno.EINVAL)
            ifq.flush()
        elif op == abi.ZCRX_CTRL_EXPORT:
            self._export(ring, task, ifq, ctrl, uptr)
        elif op == abi.ZCRX_CTRL_ARM_EVENT:
            ifq.arm_event(int(ctrl["arm_event_type"][0]), bool(ctrl["arm_event_resv"].any()))
        elif op == abi.ZCRX_CTRL_ADD_AREA:
            self._add_area(task, ifq, ctrl)
        else:
            raise _misuse(f"zcrx ctrl op {op}", errno.EOPNOTSUPP)
        return 0, [ctrl.tobytes()]

    # -- IORING_REGISTER_QUERY ----------------------------------------------------------------

    @property
    def kernel_name(self) -> str:
        """The release this kernel acts as, ``"7.3"``."""
        return abi.kernel_version_name(self.kernel)

    def query_zcrx(self) -> np.ndarray:
        """The ``io_uring_query_zcrx`` this kernel reports (per release: ``nr_ctrl_opcodes``,
        ``features``, ``rq_hdr_size``)."""
        q = np.zeros(1, dtype=abi.io_uring_query_zcrx)
        q["register_flags"] = abi.ZCRX_REG_IMPORT | abi.ZCRX_REG_NODEV
        q["area_flags"] = 0
        q["nr_ctrl_opcodes"] = abi.zcrx_nr_ctrl_opcodes(self.kernel)
        q["features"] = abi.zcrx_features(self.kernel)
        q["rq_hdr_size"] = abi.zcrx_rq_hdr_size(self.kernel)
        q["rq_hdr_alignment"] = abi.ZCRX_RQ_HDR_ALIGNMENT
        return q

    def _query_one(self, task: Task, hdr: np.ndarray) -> None:
        op = int(hdr["query_op"][0])
        size = int(hdr["size"][0])
        payload: np.ndarray | None = None
        if op == abi.IO_URING_QUERY_ZCRX:
            payload = self.query_zcrx()
        elif op == abi.IO_URING_QUERY_ZCRX_NOTIF and self.kernel >= (7, 2):
            payload = np.zeros(1, dtype=abi.io_uring_query_zcrx_event)
            payload["event_flags"] = (1 << abi.ZCRX_EVENT_TYPE_LAST) - 1
            payload["stats_size"] = abi.zcrx_stats.itemsize
            payload["stats_off_alignment"] = 8
        elif op == abi.IO_URING_QUERY_SCQ:
            payload = np.zeros(1, dtype=abi.io_uring_query_scq)
            payload["hdr_size"] = abi.IO_RINGS_HDR_SIZE
            payload["hdr_alignment"] = abi.SMP_CACHE_BYTES
        if payload is None:
            hdr["result"] = -errno.EOPNOTSUPP
            return
        if hdr["__resv"].any() or int(hdr["result"][0]) or size == 0:
            hdr["result"] = -errno.EINVAL
            return
        raw = payload.view(np.uint8)
        n = min(size, len(raw))
        task.mm.resolve(int(hdr["query_data"][0]), n, write=True)[:] = raw[:n]
        hdr["result"] = 0
        hdr["size"] = n

    def _reg_query(self, ring: Ring | None, task: Task, nr_args: int,
                   blobs: list[bytes]) -> tuple[int, list[bytes]]:
        if nr_args != 0:
            raise _misuse("QUERY nr_args must be 0", errno.EINVAL)
        dt = abi.io_uring_query_hdr
        if not blobs or len(blobs[0]) != dt.itemsize:
            raise _misuse(f"query header must be {dt.itemsize} bytes", errno.EFAULT)
        hdr = np.frombuffer(blobs[0], dtype=dt).copy()
        self._query_one(task, hdr)
        nxt = int(hdr["next_entry"][0])
        for _ in range(_QUERY_CHAIN_LIMIT):
            if not nxt:
                break
            h2 = _read_user(task, nxt, dt)
            self._query_one(task, h2)
            _writable(task, nxt, dt)[:] = h2.view(np.uint8)
            nxt = int(h2["next_entry"][0])
        return 0, [hdr.tobytes()]

    # -- RECV_ZC prep ---------------------------------------------------------------------------

    def _prep_recvzc(self, ring: Ring, sqe: Sqe) -> Request | None:
        if sqe.addr or sqe.off or sqe.addr3:
            raise _misuse("recv_zc: addr/addr2/addr3 must be 0", errno.EINVAL)
        ifq = self.ring_ifqs(ring).get(sqe.file_index)
        if ifq is None:
            raise _misuse(f"recv_zc: no zcrx {sqe.file_index}", errno.EINVAL)
        if sqe.len == _U32:
            raise _misuse("recv_zc: len UINT_MAX", errno.EINVAL)
        if sqe.op_flags:
            raise _misuse("recv_zc: msg_flags must be 0", errno.EINVAL)
        if sqe.ioprio & ~_RECVZC_IOPRIO:
            raise _misuse(f"recv_zc: ioprio {sqe.ioprio:#x}", errno.EINVAL)
        if not sqe.ioprio & abi.IORING_RECV_MULTISHOT:
            raise _misuse("recv_zc: multishot is mandatory", errno.EINVAL)
        # Issue time (io_assign_file / sock_from_file): after prep, as on Linux.
        obj = ring.task.files.get(sqe.fd)
        if obj is None:
            raise _misuse(f"recv_zc: bad fd {sqe.fd}", errno.EBADF)
        if not isinstance(obj, SocketFile):
            raise _misuse(f"recv_zc: fd {sqe.fd} is not a socket", errno.ENOTSOCK)
        if getattr(obj, "protocol", 6) != 6:  # tcp_recvmsg only; every emulated socket is TCP
            raise _misuse("recv_zc: not a TCP socket", errno.EPROTONOSUPPORT)
        return RecvZcRequest(ring, sqe, obj, self, ifq)

    # -- the copy fallback ----------------------------------------------------------------------

    def _chunks(self, pieces: Pieces) -> tuple[NDArray[np.int64], ...]:
        """``(piece, src, buf, offset in buf, len, offset in the skb payload)`` of every
        segment overlap of ``pieces``, in stream order."""
        resolve = getattr(self.skbs, "resolve", None)
        n = pieces.npieces
        if resolve is None:
            return (np.arange(n, dtype=np.int64), np.full(n, LINEAR, dtype=np.int64),
                    np.full(n, -1, dtype=np.int64), np.zeros(n, dtype=np.int64),
                    pieces.lengths, pieces.offsets)
        ch = resolve(pieces.handles, pieces.offsets, pieces.lengths)
        ln = ch.length
        if len(ln) == n:  # one chunk per piece (every skb is one segment)
            return ch.piece, ch.src, ch.buf, ch.off, ln, pieces.offsets[ch.piece]
        cs = np.cumsum(ln) - ln
        first = np.searchsorted(ch.piece, ch.piece)
        skb_off = pieces.offsets[ch.piece] + cs - cs[first]
        return ch.piece, ch.src, ch.buf, ch.off, ln, skb_off

    def _copy_into(self, space: BufferSpace, ids: NDArray[np.int64],
                   handles: NDArray[np.int64], offs: NDArray[np.int64],
                   lens: NDArray[np.int64], src: NDArray[np.int64]) -> None:
        """Copy skb payload ranges into the start of niovs ``ids`` (``io_zcrx_copy_chunk``)."""
        total = int(lens.sum())
        k = len(ids)
        bl = space.buf_len
        first_len = int(lens[0])
        full_but_last = k == 1 or not np.count_nonzero(lens[:-1] != first_len)
        contiguous = k == 1 or (full_but_last and first_len == bl
                                and not np.count_nonzero(np.diff(ids) != 1))
        if contiguous:
            start = int(ids[0]) * bl
            self.skbs.copy_out(handles, offs, lens, space.flat[start:start + total])
        else:
            bounce = np.empty(total, dtype=np.uint8)
            self.skbs.copy_out(handles, offs, lens, bounce)
            if full_but_last:
                head = (k - 1) * first_len
                space.data[ids[:-1], :first_len] = bounce[:head].reshape(k - 1, first_len)
                space.data[ids[-1], :int(lens[-1])] = bounce[head:]
            else:
                pos = np.repeat(ids * bl - (np.cumsum(lens) - lens), lens)
                pos += np.arange(total, dtype=np.int64)
                space.flat[pos] = bounce
        lin = int(lens[src == LINEAR].sum()) if np.count_nonzero(src == LINEAR) else 0
        self.copy_read["linear"] += lin
        self.copy_read["kernel_pages"] += total - lin

    # -- teardown -----------------------------------------------------------------------------

    def _hook(self, ring: Ring) -> None:
        if self._ring_closing not in ring.teardown_hooks:
            ring.teardown_hooks.append(self._ring_closing)

    def _ring_closing(self, ring: Ring) -> None:
        """Ring teardown hook: its requests are already cancelled; drop its ifq holds."""
        table: dict[int, Ifq] = ring.extra.pop("zcrx", {}) or {}
        for zid, ifq in sorted(table.items()):
            if ifq.event_ring is ring:
                ifq.event_ring = None  # events have nowhere to go any more
            region = ring.mmap_regions.get(abi.zcrx_region_mmap_offset(zid))
            if region is not None and region is ifq.rq_region:
                del ring.mmap_regions[abi.zcrx_region_mmap_offset(zid)]  # unlinked by us
            self._drop_user(ifq, ring)
        self._requeued = [r for r in self._requeued if r.ring is not ring]

    def _drop_user(self, ifq: Ifq, user: object) -> None:
        ifq.users.discard(user)
        if not ifq.users and ifq.state == "live":
            self._terminate(ifq)

    def _terminate(self, ifq: Ifq) -> None:
        """The last user went: scrub, unbind the queue, then destroy once drained."""
        ifq.state = "closing"
        for area in ifq.areas:
            ifq.counters["scrubbed_refs"] += area.space.scrub()
        dev, prov = ifq.dev, ifq.provider
        if dev is not None and prov is not None:
            try:
                dev.mp_close_rxq(ifq.rxq, prov)  # nothing if the queue runs without it
            except ZcrxError as exc:
                self.counters["teardown_errors"] += 1
                log.warning("%s: queue restart at teardown failed: %s", ifq, exc)
        self._maybe_finish(ifq)

    def _maybe_finish(self, ifq: Ifq) -> bool:
        if ifq.state != "closing":
            return False
        if ifq.provider is not None and ifq.provider.pools:
            return False  # delayed destruction: niovs still in skbs
        self._finish(ifq)
        return True

    def _finish(self, ifq: Ifq) -> None:
        """Delayed destruction done: DMA-unmap, detach the area, unlink a kernel RQ region."""
        ifq.state = "dead"
        if ifq.rq is not None:
            ifq.rq.detach()
            ifq.rq = None
        ifq.rq_mem = None
        if ifq.rq_region is not None:
            ifq.rq_region.close()
        if ifq.dev is not None and self.bound.get((ifq.dev.ifindex, ifq.rxq)) is ifq:
            del self.bound[(ifq.dev.ifindex, ifq.rxq)]
        for area in ifq.areas:
            self._areas.pop(area.space.space_id, None)
            self._release_area(area, ifq.dev)
        if ifq in self.ifqs:
            self.ifqs.remove(ifq)
        self.retired.update(ifq.counters)
        self.counters["destroyed"] += 1

    def _requeue_req(self, req: RecvZcRequest) -> None:
        req.disarm()
        req.polled = True
        if not req.requeued:
            req.requeued = True
            self._requeued.append(req)

    def poll(self, now: float = 0.0) -> int:
        """Per-loop work (an IoUring poll hook): run requeued RECV_ZC passes, then reap.

        A requeued request goes to the back of the line and runs again in this same call
        (Linux re-adds it at the tail of the task-work list, which is run until empty), so
        several sockets take turns of :data:`SKBS_PER_PASS` skbs; at most
        :data:`REQUEUE_ROUNDS` rounds per call keep the kernel loop's latency bounded.
        """
        work = 0
        rounds = REQUEUE_ROUNDS
        ahead = self.batch_rounds
        while rounds > 0 and self._requeued:
            batch, self._requeued = self._requeued, []
            if ahead and rounds > 1 and len(batch) > 1:
                done, took = self._rounds(batch, rounds)
                if done:
                    rounds -= done
                    work += took
                    continue
                ahead = False  # not now: round by round for the rest of this call
            work += self._round(batch)
            rounds -= 1
        return work + self.reap()

    def _rounds(self, batch: list[RecvZcRequest], most: int) -> tuple[int, int]:
        """Several whole rounds of plain turns (:meth:`_plain_run`) as one numpy batch, when
        every request of ``batch`` takes a plain turn in each: member ``m`` walks
        :data:`SKBS_PER_PASS` skbs per round while it has more, the CQEs go out round by
        round in member order, a member still holding more skbs is requeued (in order) for
        the next round, one that emptied its queue re-arms.  Nothing else runs between the
        rounds of one :meth:`poll`, so this is what :meth:`_round` would do ``n`` times.

        ``n`` (at most ``most``) stops before the first round in which some turn would not be
        plain: a copy or a niov of another ifq, a CQ that cannot take the round's CQEs, a
        ``len`` budget the turn uses up, or a request that would fold (no other request of
        its ring with data left, nobody requeued yet in that round).  Returns ``(rounds
        taken, turns taken)``; ``(0, 0)`` when fewer than two rounds qualify (the caller then
        goes round by round)."""
        k = len(batch)
        conns: set[int] = set()
        for req in batch:
            conn = req.sock.conn
            if (not req.requeued or req.done or conn is None or id(conn) in conns
                    or not self._plain(req, conn, req.ring)):
                return 0, 0
            conns.add(id(conn))
        rings = {id(r.ring): r.ring for r in batch}
        # requests of each ring with data that are not in this batch: they stop any fold
        # (one reading a member's socket too: not taken here)
        others: dict[int, bool] = {}
        members = set(map(id, batch))
        for rid, rg in rings.items():
            others[rid] = False
            for o in rg.inflight:
                if not isinstance(o, RecvZcRequest) or id(o) in members:
                    continue
                c = o.sock.conn
                if c is None:
                    continue
                if id(c) in conns:
                    return 0, 0
                if c.rxq.nbytes:
                    others[rid] = True
        per = SKBS_PER_PASS
        pcs = []
        for req in batch:
            conn = req.sock.conn
            assert conn is not None
            pcs.append(conn.rxq.peek_head(per * most + 1))
        npc = np.fromiter((p.npieces for p in pcs), dtype=np.int64, count=k)
        # rounds member m takes part in (it had more than per * r skbs before round r)
        part = np.minimum(-(-npc // per), most)
        n = int(min(most, part.max()))
        m_ring = [id(r.ring) for r in batch]
        # folding: in round r, a member before the round's first requeued one folds when no
        # later member of the round shares its ring and no other request of it has data
        # (round 0 included: that is the state the batch starts from)
        part_l = part.tolist()
        npc_l = npc.tolist()
        by_ring: dict[int, list[int]] = {}
        for x, rid in enumerate(m_ring):
            by_ring.setdefault(rid, []).append(x)
        for r in range(n):
            stop = False
            for x in range(k):
                if part_l[x] <= r:
                    continue  # done before this round
                if not others[m_ring[x]] and not any(
                        z > x and part_l[z] > r for z in by_ring[m_ring[x]]):
                    stop = True
                    break
                if npc_l[x] > per * (r + 1):
                    break  # requeued: nobody after it in this round folds
            if stop:
                n = r
                break
        if n < 2:
            return 0, 0
        allp = Pieces(np.concatenate([p.handles for p in pcs]),
                      np.concatenate([p.offsets for p in pcs]),
                      np.concatenate([p.lengths for p in pcs]))
        starts = np.cumsum(npc) - npc
        pmem = np.repeat(np.arange(k, dtype=np.int64), npc)
        prnd = (np.arange(len(pmem), dtype=np.int64) - starts[pmem]) // per
        keep = prnd < n
        if not keep.all():
            allp = Pieces(allp.handles[keep], allp.offsets[keep], allp.lengths[keep])
            pmem, prnd = pmem[keep], prnd[keep]
        # len budgets: a member's budget must outlast every turn it takes
        kept = np.minimum(npc, per * n).tolist()
        first = 0
        for x, req in enumerate(batch):
            c = kept[x]
            if req.limit:
                # bytes walked by the end of each of its rounds (its pieces are contiguous)
                walked = np.cumsum(allp.lengths[first:first + c])
                ends = walked[np.minimum(np.arange(per - 1, c + per - 1, per), c - 1)]
                over = np.flatnonzero(ends >= req.left)
                if len(over):
                    n = min(n, int(over[0]))
            first += c
        if n < 2:
            return 0, 0
        piece, src, buf, boff, ln, _ = self._chunks(allp)
        mem = pmem[piece]
        rnd = prnd[piece]
        ifqs, c_ifq, area, at, zc = _own_areas(batch, mem, src)
        if not bool(zc.all()):
            n = min(n, int(rnd[~zc].min()))
        # CQ room: every round's CQEs of a ring, in order, must fit
        ring_ix = {rid: x for x, rid in enumerate(rings)}
        c_ring = np.fromiter((ring_ix[rid] for rid in m_ring), dtype=np.int64, count=k)[mem]
        for rid, rg in rings.items():
            sel = rnd[c_ring == ring_ix[rid]]
            per_round = np.bincount(sel, minlength=n)[:n]
            over = np.flatnonzero(np.cumsum(per_round) > rg.cq_room())
            if len(over):
                n = min(n, int(over[0]))
        if n < 2:
            return 0, 0
        # -- from here on state changes: take rounds 0 .. n-1 ---------------------------------
        sel = rnd < n
        if not sel.all():
            mem, rnd, buf, boff, ln, at, c_ifq, c_ring, piece = (
                x[sel] for x in (mem, rnd, buf, boff, ln, at, c_ifq, c_ring, piece))
        # CQE order: round by round, members in order, each member's chunks in stream order
        cq = np.argsort(rnd * k + mem, kind="stable")
        ar = area[at]
        key = buf | (ar << KEY_SHIFT)
        bl = np.fromiter((q.spaces.buf_len for q in ifqs), dtype=np.int64, count=len(ifqs))
        off = buf * bl[c_ifq]
        off += boff
        off |= ar << abi.IORING_ZCRX_AREA_SHIFT
        res = ln.astype(np.int64, copy=False)
        uds = np.fromiter((r.user_data for r in batch), dtype=np.uint64, count=k)
        for x, rg in enumerate(rings.values()):
            rows = cq if len(rings) == 1 else cq[c_ring[cq] == x]
            flags = np.full(len(rows), abi.IORING_CQE_F_MORE, dtype=np.int64)
            if rg.post_big_batch(uds[mem[rows]], res[rows], flags, off[rows]) != len(rows):
                raise InvariantBroken(f"{rg}: CQ room shrank under RECV_ZC rounds")
        _get_user_refs(ifqs, key, c_ifq)
        taken = np.minimum(part, n)
        tpieces = np.minimum(npc, taken * per)
        nbytes = np.bincount(pmem[prnd < n], weights=allp.lengths[prnd < n],
                             minlength=k).astype(np.int64).tolist()
        cnt_l = np.bincount(mem, minlength=k).tolist()
        taken_l = taken.tolist()
        more = (npc > tpieces).tolist()
        one_free = len(ifqs) == k and all(len(q.spaces) == 1 for q in ifqs)
        freed: list[NDArray[np.int64]] = []
        work = 0
        for x, req in enumerate(batch):
            conn = req.sock.conn
            assert conn is not None
            got = conn.rxq.consume(nbytes[x])
            if one_free:
                freed.append(got)
            else:
                self.sockets.free(got)
            st = req.ifq.counters
            st["zc_cqes"] += cnt_l[x]
            st["zc_bytes"] += nbytes[x]
            if req.limit:
                req.left -= nbytes[x]
            # every round it took ended by yielding but (maybe) the last
            t = taken_l[x]
            st["recv_requeues"] += t if more[x] else t - 1
            work += t
            req.requeued = False
            if more[x]:
                self._requeue_req(req)
            else:
                req.arm()
        if freed:
            self.sockets.free(np.concatenate(freed))
        self.batched_turns += work
        self.batched_rounds += n
        return n, work

    def _round(self, batch: list[RecvZcRequest]) -> int:
        """One round of requeued RECV_ZC requests, each taking its turn in order; returns
        the turns taken.  Runs of plain turns go through :meth:`_turns` as one numpy batch
        (the same CQEs, order, counters and requeues as turn by turn); any turn it cannot
        take that way is taken by the request itself (:meth:`RecvZcRequest.attempt`)."""
        work = 0
        i, n = 0, len(batch)
        batching = self.batch_rounds
        while i < n:
            if batching and n - i > 1:
                j, took, batching = self._turns(batch, i)
                work += took
                i = j
                if i >= n:
                    break
            req = batch[i]
            if req.requeued and not req.done:
                req.attempt(issue=False)
                work += 1
            i += 1
        return work

    @staticmethod
    def _plain(req: RecvZcRequest, conn: TcpReceiver, ring: Ring) -> bool:
        """What makes a turn plain whatever the other members (see :meth:`_plain_run`)."""
        return not (req.ifq.state != "live" or req.ifq.nodev
                    or ring.cqe_dtype is not abi.io_uring_cqe32 or ring.mixed
                    or bool(ring.overflow) or ring.closed
                    or conn.rxq.nbytes == 0 or conn.end_status() is not None)

    def _plain_run(self, batch: list[RecvZcRequest], i: int
                   ) -> tuple[list[RecvZcRequest], list[Pieces], list[bool], list[int], int]:
        """The run of requests from ``batch[i]`` whose turns are *plain*: each walks up to
        :data:`SKBS_PER_PASS` skbs of a socket no other member reads, then either yields
        (requeued) or empties the queue and re-arms; nothing ends the request (a ``len``
        budget that outlasts the turn, no pending EOF or error, a live ifq on a hardware
        queue), the ring takes
        32-byte CQEs with nothing overflowed and has a CQ slot for each piece walked, and no
        turn would fold (:meth:`RecvZcRequest._may_fold`: decided on the state before the
        run, so a member that could fold ends the run).  Returns ``(members, their pieces,
        whether each yields, their indices in batch, index past the run)``; entries that are
        no longer requeued (no-ops turn by turn too) are passed over."""
        members: list[RecvZcRequest] = []
        pieces: list[Pieces] = []
        cuts: list[bool] = []
        pos: list[int] = []
        conns: set[int] = set()
        room: dict[int, int] = {}
        fold_possible = not self._requeued
        j, n = i, len(batch)
        while j < n:
            req = batch[j]
            if not req.requeued or req.done:
                j += 1
                continue
            conn = req.sock.conn
            ring = req.ring
            if conn is None or id(conn) in conns or not self._plain(req, conn, ring):
                break
            # Nobody requeued yet this round: the first member decides whether it folds on
            # the real state; a later one would decide on a state the run changed.
            if fold_possible and (members or req._may_fold()):
                break
            pc = conn.rxq.peek_head(SKBS_PER_PASS + 1)
            cut = pc.npieces > SKBS_PER_PASS
            if cut:
                pc = Pieces(pc.handles[:SKBS_PER_PASS], pc.offsets[:SKBS_PER_PASS],
                            pc.lengths[:SKBS_PER_PASS])
            # A ``len`` budget the turn would use up ends the request: not plain.  One it
            # outlasts cuts nothing (peek within the budget gives these same pieces).
            if req.limit and req.left <= int(pc.lengths.sum()):
                break
            # every piece is at least one CQE: a member its ring's CQ cannot take ends the run
            left = room.get(id(ring))
            if left is None:
                left = ring.cq_room()
            left -= pc.npieces
            if left < 0:
                break
            room[id(ring)] = left
            if cut:
                fold_possible = False  # it is requeued: no later member folds
            members.append(req)
            pieces.append(pc)
            cuts.append(cut)
            pos.append(j)
            conns.add(id(conn))
            j += 1
        return members, pieces, cuts, pos, j

    def _turns(self, batch: list[RecvZcRequest], i: int) -> tuple[int, int, bool]:
        """Take the plain turns (:meth:`_plain_run`) from ``batch[i]`` as one numpy batch:
        the chunks of every member's skbs resolved together, one zero-copy check against
        every member's ifq areas, one CQ post per ring (the members' CQEs in turn order),
        then each member's references, receive queue, counters and requeue or re-arm, as
        :meth:`RecvZcRequest._pass` and :meth:`RecvZcRequest.attempt` do them.

        Only turns that hand over every chunk in place and fit their ring's CQ are taken:
        the run is cut before the first member with a copy, a niov of another ifq or too
        little CQ room (checked before anything changes), and that member takes its turn
        by itself.  Returns ``(index of the first entry not taken, turns taken, whether
        the rest of the round may be batched)``: after such a cut the round's other turns
        are taken one by one (rare: a round is not rebuilt once per member)."""
        members, pcs, cuts, pos, j = self._plain_run(batch, i)
        if len(members) < 2:
            return i, 0, True  # nothing to batch: batch[i] takes its turn by itself
        k = len(members)
        npc = np.fromiter((p.npieces for p in pcs), dtype=np.int64, count=k)
        allp = Pieces(np.concatenate([p.handles for p in pcs]),
                      np.concatenate([p.offsets for p in pcs]),
                      np.concatenate([p.lengths for p in pcs]))
        piece, src, buf, boff, ln, _ = self._chunks(allp)
        mem = np.repeat(np.arange(k, dtype=np.int64), npc)[piece]
        # the members' ifqs and their areas: which chunks are niovs of their own ifq
        ifqs, c_ifq, area, at, zc = _own_areas(members, mem, src)
        # one CQE per chunk; members taken: a prefix whose CQEs all fit and are all in place
        cnt = np.bincount(mem, minlength=k)
        take = k
        if not bool(zc.all()):
            take = int(mem[int(np.argmin(zc))])
        room: dict[int, int] = {}
        cnt_l = cnt.tolist()
        for x in range(take):
            ring = members[x].ring
            left = room.get(id(ring))
            if left is None:
                left = ring.cq_room()
            left -= cnt_l[x]
            if left < 0:
                take = x
                break
            room[id(ring)] = left
        if take < 2:
            return pos[0], 0, False  # the first member takes its turn by itself
        # -- from here on state changes: take the turns of members[:take] ----------------
        nrow = int(cnt[:take].sum())
        if nrow < len(mem):
            mem, buf, boff, ln, at, c_ifq = (
                x[:nrow] for x in (mem, buf, boff, ln, at, c_ifq))
        ar = area[at]
        key = buf | (ar << KEY_SHIFT)
        bl = np.fromiter((q.spaces.buf_len for q in ifqs), dtype=np.int64, count=len(ifqs))
        off = buf * bl[c_ifq]
        off += boff
        off |= ar << abi.IORING_ZCRX_AREA_SHIFT
        res = ln.astype(np.int64, copy=False)
        flags = np.full(nrow, abi.IORING_CQE_F_MORE, dtype=np.int64)
        uds = np.fromiter((r.user_data for r in members[:take]), dtype=np.uint64, count=take)
        rings = {id(r.ring): r.ring for r in members[:take]}
        parts: list[tuple[Ring, Any]]
        if len(rings) == 1:
            parts = [(next(iter(rings.values())), slice(None))]
        else:
            m_ring = np.fromiter((list(rings).index(id(r.ring)) for r in members[:take]),
                                 dtype=np.int64, count=take)[mem]
            parts = [(rg, np.flatnonzero(m_ring == x)) for x, rg in enumerate(rings.values())]
        for ring, rows in parts:
            want = nrow if isinstance(rows, slice) else len(rows)
            if ring.post_big_batch(uds[mem[rows]], res[rows], flags[rows], off[rows]) != want:
                raise InvariantBroken(f"{ring}: CQ room shrank under a RECV_ZC round")
        # a niov frag gains one page-pool and one user reference (io_zcrx_recv_frag)
        _get_user_refs(ifqs, key, c_ifq)
        # each member's receive queue, counters and next step, in turn order
        starts = np.cumsum(npc) - npc
        nbytes = np.add.reduceat(allp.lengths, starts[:take]).tolist()
        freed: list[NDArray[np.int64]] = []
        # one free for all when no two members share a pool (order within a pool kept)
        one_free = len(ifqs) == take and all(len(q.spaces) == 1 for q in ifqs)
        for x in range(take):
            req = members[x]
            conn = req.sock.conn
            assert conn is not None
            got = conn.rxq.consume(nbytes[x])
            if one_free:
                freed.append(got)
            else:
                self.sockets.free(got)
            st = req.ifq.counters
            st["zc_cqes"] += cnt_l[x]
            st["zc_bytes"] += nbytes[x]
            if req.limit:
                req.left -= nbytes[x]
            req.requeued = False
            if cuts[x]:
                st["recv_requeues"] += 1
                self._requeue_req(req)
            else:
                req.arm()  # the queue is empty and nothing ended: wait for readiness
        if freed:
            self.sockets.free(np.concatenate(freed))
        self.batched_turns += take
        return (pos[take], take, False) if take < k else (j, take, True)

    def reap(self) -> int:
        """Finish the delayed destructions whose niovs all came home; returns how many."""
        done = 0
        for ifq in [i for i in self.ifqs if i.state == "closing"]:
            done += self._maybe_finish(ifq)
        return done

    def shutdown(self) -> None:
        """Kernel exit: terminate every ifq and release it even if niovs are still out."""
        for ifq in list(self.ifqs):
            if ifq.state == "live":
                ifq.users.clear()
                self._terminate(ifq)
            if ifq.state == "closing":
                self._finish(ifq)

    # -- introspection ------------------------------------------------------------------------

    def ledger(self) -> dict[str, Any]:
        """Per-ifq ledgers and their sum (every state; each ifq's counts sum to its niovs)."""
        per = {str(ifq.serial): ifq.ledger() for ifq in self.ifqs}
        total: Counter[str] = Counter()
        for led in per.values():
            total.update(led)
        return {"ifqs": per, "total": dict(total),
                "niovs": sum(ifq.niovs for ifq in self.ifqs)}

    def check_ledger(self) -> dict[str, Any]:
        """Verify every ifq's ledger (raises InvariantBroken); returns :meth:`ledger`."""
        refs_by_space = getattr(self.skbs, "refs_by_space", None)
        skb_refs = refs_by_space() if refs_by_space is not None else None
        for ifq in self.ifqs:
            ifq.check_ledger(skb_refs)
        return self.ledger()

    def memory_traffic(self) -> dict[str, Any]:
        """Payload bytes the kernel copied, by region kind (DMA is the NIC's, app reads the
        app's).  ``read``: sources of skb copies (the linear arena, kernel pages, zcrx areas);
        ``written``: zcrx areas (copy fallback) and app buffers (RECV); ``napi_linear``: bytes
        NAPI copied from header slots into skbs; ``zero_copy``: bytes handed over in place."""
        by: Mapping[int, int] = getattr(self.skbs, "copied_by_src", {}) or {}
        read: Counter[str] = Counter({"linear": 0, "kernel_pages": 0, "zcrx_area": 0})
        for sid, n in by.items():
            kind = ("linear" if sid == LINEAR else
                    "zcrx_area" if sid in self._area_ids_seen else "kernel_pages")
            read[kind] += n
        stats: Mapping[str, int] = getattr(self.skbs, "stats", {}) or {}
        copied = sum(by.values()) if by else int(stats.get("copy_bytes", 0))
        area = self.retired["copy_bytes"] + sum(i.counters["copy_bytes"] for i in self.ifqs)
        zc = self.retired["zc_bytes"] + sum(i.counters["zc_bytes"] for i in self.ifqs)
        return {"read": dict(read),
                "written": {"zcrx_area": area, "app_buffer": max(0, copied - area)},
                "napi_linear": int(stats.get("linear_bytes", 0)),
                "zero_copy": zc,
                "zcrx_copy_read": dict(self.copy_read)}

    def status(self) -> list[dict[str, Any]]:
        return [ifq.status() for ifq in self.ifqs]

    def stats(self) -> dict[str, Any]:
        return {"ifqs": [ifq.stats_dict() for ifq in self.ifqs],
                "ledger": self.ledger(),
                "memory_traffic": self.memory_traffic(),
                "bound": {f"{i}.q{q}": ifq.serial for (i, q), ifq in self.bound.items()},
                "counters": dict(self.counters),
                "retired": dict(self.retired)}

