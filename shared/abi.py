"""The binary interface the emulator speaks: uapi structs as numpy dtypes, constants, layouts.

Every io_uring / zcrx struct below is a little-endian numpy structured dtype laid out byte for
byte as x86-64 Linux lays out the C struct, with the same field names as the uapi header.
Sources of truth are ``uapi-layouts.md`` (offsets and sizes compiled from liburing's vendored
``io_uring.h`` @27255f4, 2026-08) and ``zcrx-kernel.md`` in the team's reference folder;
``tests/test_abi.py`` re-checks this module against the former's facts, kept in the repo as
``tests/data/uapi_layouts.toml``.  Where the uapi changed over time, the *liburing 2026-08 /
kernel 7.3* shape is modelled (:data:`LINUX_VERSION`; e.g. ``io_uring_zcrx_ifq_reg`` has
``rx_buf_len`` at 68 and ``event_desc`` at 72).  The emulated kernel can act as any release of
:data:`KERNEL_VERSIONS` (``--kernel``); the per-release facts are the functions taking a
``kernel`` argument (:func:`zcrx_rq_layout`, :func:`zcrx_rq_hdr_size`,
:func:`zcrx_nr_ctrl_opcodes`, :func:`zcrx_features`).

Conventions
-----------
* Dtypes use numpy's dict form (``names``/``formats``/``offsets``/``itemsize``) so that every
  offset is explicit.  A C union is modelled as several names at the same offset, e.g. the SQE
  has ``off`` and ``addr2`` at 8, and ``splice_fd_in``/``file_index``/``zcrx_ifq_idx``/``optlen``
  at 44.  Because union members overlap, build records with ``np.zeros(n, dtype)`` and assign
  *by field name*; never build them from tuples (all members would be written, last one wins).
* Field names are the uapi spellings, including leading underscores (``__pad``, ``__resv``,
  ``__resv2``, ``__pad2``): numpy accepts them, so ``rec["__pad"]`` works.  Fixed-size C arrays
  (``__u64 __resv[2]``) are numpy sub-arrays.  Nested structs (``io_uring_params.sq_off``,
  ``io_uring_zcrx_ifq_reg.offsets``) are nested dtypes.
* Names that are *not* the uapi spelling, because the uapi reaches them through an anonymous
  struct or a named union member:

  ======================================  =================================================
  dtype field                             uapi expression
  ======================================  =================================================
  ``io_uring_cqe32.big_cqe``              ``cqe->big_cqe[0..1]`` (flexible array member)
  ``io_uring_cqe32.zcrx_off``             ``((struct io_uring_zcrx_cqe *)(cqe + 1))->off``
  ``io_uring_cqe32.zcrx_pad``             ``((struct io_uring_zcrx_cqe *)(cqe + 1))->__pad``
  ``zcrx_ctrl.flush_rq_resv``             ``ctrl.zc_flush.__resv[6]``
  ``zcrx_ctrl.export_zcrx_fd``            ``ctrl.zc_export.zcrx_fd``
  ``zcrx_ctrl.export_resv1``              ``ctrl.zc_export.__resv1[11]``
  ``io_uring_sqe128.cmd``                 ``sqe->cmd[80]`` (only exists on SQE128 rings)
  ======================================  =================================================

Who writes what (ownership in shared memory)
--------------------------------------------
"Kernel" means the emulated kernel (io_uring core + zcrx + driver), i.e. ``driver_proc``;
"app" is ``app_proc``; "NIC" is ``nic_proc``.

* **SQ ring + SQE array** (``io_uring_sqe``): the app writes SQEs, the SQ index array (unless
  ``IORING_SETUP_NO_SQARRAY``) and the SQ *tail*; the kernel reads them and writes the SQ
  *head*, ``sq_flags`` (``IORING_SQ_*``) and ``sq_dropped``.  An SQE slot belongs to the app
  again once the kernel has moved the head past it.
* **CQ ring** (``io_uring_cqe`` / ``io_uring_cqe32``): the kernel writes CQEs, the CQ *tail*
  and ``cq_overflow``; the app reads CQEs and writes the CQ *head*.  ``cq_flags`` is written by
  the app (``IORING_CQ_EVENTFD_DISABLED``).  Ring masks/entries are written once by the kernel.
* **zcrx refill queue (RQ)** (``io_uring_zcrx_rqe``): the app writes RQEs and the RQ *tail*;
  the kernel reads RQEs and writes the RQ *head*.  An RQE hands a buffer (``off``) back to the
  kernel; ``__pad`` must be 0 or the entry is skipped.
* **zcrx area** (the memory registered by ``io_uring_zcrx_area_reg``): the NIC writes packet
  payload into buffers the kernel posted to it; a buffer reported in a zcrx CQE (``zcrx_off``)
  is lent to the app, which may read it until it returns it through an RQE.  Free buffers
  belong to the kernel.
* **Provided buffer ring** (``io_uring_buf_ring`` / ``io_uring_buf``): the app writes entries
  and the u16 ``tail`` (in slot 0's ``resv``); the kernel keeps its head privately.
* **Registration / control structs** (``io_uring_params``, ``io_uring_zcrx_ifq_reg``,
  ``io_uring_zcrx_area_reg``, ``io_uring_region_desc``, ``io_uring_mem_region_reg``,
  ``zcrx_ctrl``, ``io_uring_query_hdr`` and query payloads, ``io_uring_buf_reg``): not shared
  memory; the app fills the inputs and passes them with a syscall, the kernel validates them
  (reserved fields must be 0) and copies the outputs back (``sq_off``/``cq_off``/``features``,
  ``rq_entries``/``offsets``/``zcrx_id``, ``rq_area_token``, ``mmap_offset``,
  ``export_zcrx_fd``, ``result`` and the query payload).
* **NIC rings** (``nic_rx_desc``, ``nic_rx_cqe``; emulator-only, not Linux): the driver writes
  rx descriptors, the NIC consumes them, DMA-writes the frame and writes an rx completion, the
  driver consumes completions.  See those dtypes.

The layout helpers (:func:`rings_layout`, :func:`sqes_size`, :func:`zcrx_rq_layout`,
:func:`zcrx_region_mmap_offset`, :func:`area_token`) are pure functions mirroring the kernel
code named in each docstring.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

# The Linux releases the emulated kernel can behave as (``driver_proc --kernel X.Y``), oldest
# first.  7.1: NODEV; 7.2: zcrx events; 7.3: several areas per ifq, the split RQ header, the
# refill cap (uapi-layouts.md §5b).
KERNEL_VERSIONS: tuple[tuple[int, int], ...] = ((7, 1), (7, 2), (7, 3))

# The newest Linux release whose uapi this module models (and the emulated kernel's default).
# tests/test_abi.py requires every fact of tests/data/uapi_layouts.toml up to this release and
# lets facts of later ones be absent; bump it when support for a newer uapi lands.
LINUX_VERSION = KERNEL_VERSIONS[-1]


def kernel_version_name(version: tuple[int, int]) -> str:
    """``(7, 3)`` -> ``"7.3"``."""
    return f"{version[0]}.{version[1]}"


def parse_kernel_version(text: str) -> tuple[int, int]:
    """``"7.3"`` -> ``(7, 3)``; ``ValueError`` unless it is one of :data:`KERNEL_VERSIONS`."""
    try:
        major, minor = (int(x) for x in text.strip().split("."))
    except ValueError:
        raise ValueError(f"kernel version {text!r} is not MAJOR.MINOR") from None
    if (major, minor) not in KERNEL_VERSIONS:
        known = ", ".join(kernel_version_name(v) for v in KERNEL_VERSIONS)
        raise ValueError(f"kernel {text} is not emulated (known: {known})")
    return major, minor

# --------------------------------------------------------------------------------------------
# Scalar formats (x86-64 is little-endian) and the dtype builder
# --------------------------------------------------------------------------------------------

U8 = "<u1"
U16 = "<u2"
U32 = "<u4"
U64 = "<u8"
S32 = "<i4"

_Field = tuple[str, Any, int]


def _struct(itemsize: int, fields: Sequence[_Field]) -> np.dtype[np.void]:
    """Build a structured dtype from ``(name, format, offset)`` triples with explicit offsets.

    Raises ``ValueError`` if a field runs past ``itemsize`` (a typo guard; unions may overlap).
    """
    names = [f[0] for f in fields]
    formats = [f[1] for f in fields]
    offsets = [f[2] for f in fields]
    dt: np.dtype[np.void] = np.dtype(
        {"names": names, "formats": formats, "offsets": offsets, "itemsize": itemsize}
    )
    for name in names:
        sub, off = dt.fields[name][:2]  # type: ignore[index]
        if off + sub.itemsize > itemsize:
            raise ValueError(f"field {name!r} at {off}+{sub.itemsize} exceeds {itemsize} bytes")
    return dt


def _arr(fmt: str, n: int) -> tuple[str, tuple[int]]:
    """A fixed-size C array ``fmt[n]`` as a numpy sub-array format."""
    return (fmt, (n,))


# --------------------------------------------------------------------------------------------
# Submission queue entry (uapi-layouts.md §1)
# --------------------------------------------------------------------------------------------

# The 32-bit "flags word" union at offset 28; all are __u32 except rw_flags (__kernel_rwf_t is
# int) and poll_events (__u16, overlaying the low half of poll32_events on little-endian).
_SQE_FLAG_WORDS: tuple[_Field, ...] = (
    ("rw_flags", S32, 28),
    ("fsync_flags", U32, 28),
    ("poll_events", U16, 28),
    ("poll32_events", U32, 28),
    ("sync_range_flags", U32, 28),
    ("msg_flags", U32, 28),
    ("timeout_flags", U32, 28),
    ("accept_flags", U32, 28),
    ("cancel_flags", U32, 28),
    ("open_flags", U32, 28),
    ("statx_flags", U32, 28),
    ("fadvise_advice", U32, 28),
    ("splice_flags", U32, 28),
    ("rename_flags", U32, 28),
    ("unlink_flags", U32, 28),
    ("hardlink_flags", U32, 28),
    ("xattr_flags", U32, 28),
    ("msg_ring_flags", U32, 28),
    ("uring_cmd_flags", U32, 28),
    ("waitid_flags", U32, 28),
    ("futex_flags", U32, 28),
    ("install_fd_flags", U32, 28),
    ("nop_flags", U32, 28),
    ("pipe_flags", U32, 28),
)

_SQE_FIELDS: tuple[_Field, ...] = (
    ("opcode", U8, 0),
    ("flags", U8, 1),  # IOSQE_*
    ("ioprio", U16, 2),  # recv/recv_zc/accept io_uring flags live here (IORING_RECV_*, ...)
    ("fd", S32, 4),
    ("off", U64, 8),
    ("addr2", U64, 8),
    ("cmd_op", U32, 8),
    ("__pad1", U32, 12),
    ("addr", U64, 16),
    ("splice_off_in", U64, 16),
    ("level", U32, 16),
    ("optname", U32, 20),
    ("len", U32, 24),
    *_SQE_FLAG_WORDS,
    ("user_data", U64, 32),
    ("buf_index", U16, 40),
    ("buf_group", U16, 40),
    ("personality", U16, 42),
    ("splice_fd_in", S32, 44),
    ("file_index", U32, 44),
    ("zcrx_ifq_idx", U32, 44),  # RECV_ZC: the zcrx_id returned by IORING_REGISTER_ZCRX_IFQ
    ("optlen", U32, 44),
    ("addr_len", U16, 44),
    ("__pad3", _arr(U16, 1), 46),
    ("addr3", U64, 48),
    ("attr_ptr", U64, 48),
    ("optval", U64, 48),
    ("__pad2", _arr(U64, 1), 56),
    ("attr_type_mask", U64, 56),
)

io_uring_sqe = _struct(64, _SQE_FIELDS)
"""``struct io_uring_sqe`` (64 B).  Written by the app, read by the kernel."""

io_uring_sqe128 = _struct(128, (*_SQE_FIELDS, ("cmd", _arr(U8, 80), 48)))
"""A 128-byte SQE slot of an ``IORING_SETUP_SQE128`` ring: the SQE plus ``cmd[80]`` at 48."""

# --------------------------------------------------------------------------------------------
# Completion queue entries (§2)
# --------------------------------------------------------------------------------------------

_CQE_FIELDS: tuple[_Field, ...] = (
    ("user_data", U64, 0),
    ("res", S32, 8),  # >= 0 result, or -errno
    ("flags", U32, 12),  # IORING_CQE_F_*; bits 16.. = buffer id with F_BUFFER
)

io_uring_cqe = _struct(16, _CQE_FIELDS)
"""``struct io_uring_cqe`` (16 B).  Written by the kernel, read by the app."""

io_uring_cqe32 = _struct(
    32,
    (
        *_CQE_FIELDS,
        ("big_cqe", _arr(U64, 2), 16),
        ("zcrx_off", U64, 16),  # io_uring_zcrx_cqe.off: (area_id << 48) | byte offset
        ("zcrx_pad", U64, 24),  # io_uring_zcrx_cqe.__pad: 0
    ),
)
"""A 32-byte CQE (``IORING_SETUP_CQE32`` slot, or an ``IORING_CQE_F_32`` CQE on a CQE_MIXED
ring).  For RECV_ZC the second half is a ``struct io_uring_zcrx_cqe``, exposed as ``zcrx_off``
and ``zcrx_pad``; ``big_cqe`` is the same 16 bytes as two u64."""

io_uring_zcrx_cqe = _struct(16, (("off", U64, 0), ("__pad", U64, 8)))
"""``struct io_uring_zcrx_cqe`` (16 B), the second half of a 32-byte RECV_ZC CQE."""

# --------------------------------------------------------------------------------------------
# zcrx (§5)
# --------------------------------------------------------------------------------------------

io_uring_zcrx_rqe = _struct(16, (("off", U64, 0), ("len", U32, 8), ("__pad", U32, 12)))
"""``struct io_uring_zcrx_rqe`` (16 B), a refill-queue entry.  Written by the app, read by the
kernel.  ``off`` is the value from the CQE (only it is parsed; ``len`` is ignored by the
kernel); ``__pad`` must be 0, otherwise the kernel skips the entry."""

io_uring_zcrx_offsets = _struct(
    32,
    (
        ("head", U32, 0),
        ("tail", U32, 4),
        ("rqes", U32, 8),
        ("__resv2", U32, 12),
        ("__resv", _arr(U64, 2), 16),
    ),
)
"""``struct io_uring_zcrx_offsets`` (32 B): RQ layout inside the region, kernel output."""

io_uring_zcrx_area_reg = _struct(
    48,
    (
        ("addr", U64, 0),
        ("len", U64, 8),
        ("rq_area_token", U64, 16),  # out: area_id << IORING_ZCRX_AREA_SHIFT; in: 0
        ("flags", U32, 24),  # IORING_ZCRX_AREA_DMABUF
        ("dmabuf_fd", U32, 28),
        ("__resv2", _arr(U64, 2), 32),
    ),
)
"""``struct io_uring_zcrx_area_reg`` (48 B), pointed to by ``ifq_reg.area_ptr``."""

io_uring_zcrx_ifq_reg = _struct(
    96,
    (
        ("if_idx", U32, 0),
        ("if_rxq", U32, 4),
        ("rq_entries", U32, 8),  # in/out, rounded up to a power of two
        ("flags", U32, 12),  # ZCRX_REG_*
        ("area_ptr", U64, 16),
        ("region_ptr", U64, 24),
        ("offsets", io_uring_zcrx_offsets, 32),  # out
        ("zcrx_id", U32, 64),  # out; input must be 0
        ("rx_buf_len", U32, 68),  # 7.0+ (was __resv2)
        ("event_desc", U64, 72),  # 7.2+: -> zcrx_event_desc (was __resv[0], must be 0)
        ("__resv", _arr(U64, 2), 80),
    ),
)
"""``struct io_uring_zcrx_ifq_reg`` (96 B, argument of ``IORING_REGISTER_ZCRX_IFQ``, nr_args =
1), the 7.2+ shape: ``event_desc`` at 72 was ``__resv[0]`` up to 7.1 (a 7.1 kernel refuses it
non-zero with ``-EINVAL``, as any reserved word)."""

zcrx_event_desc = _struct(
    96,
    (
        ("user_data", U64, 0),  # user_data of the event CQEs
        ("type_mask", U32, 8),  # 1 << ZCRX_EVENT_* for each type wanted
        ("flags", U32, 12),  # ZCRX_EVENT_DESC_FLAG_STATS
        ("stats_offset", U64, 16),  # zcrx_stats at this offset of the RQ region
        ("__resv2", _arr(U64, 9), 24),
    ),
)
"""``struct zcrx_event_desc`` (96 B, Linux 7.2), pointed to by ``ifq_reg.event_desc``: the app
fills it, the kernel only reads it."""

io_uring_region_desc = _struct(
    64,
    (
        ("user_addr", U64, 0),
        ("size", U64, 8),
        ("flags", U32, 16),  # IORING_MEM_REGION_TYPE_USER
        ("id", U32, 20),
        ("mmap_offset", U64, 24),  # out, when the kernel allocates the memory
        ("__resv", _arr(U64, 4), 32),
    ),
)
"""``struct io_uring_region_desc`` (64 B), pointed to by ``ifq_reg.region_ptr``."""

io_uring_mem_region_reg = _struct(
    32,
    (
        ("region_uptr", U64, 0),
        ("flags", U64, 8),  # IORING_MEM_REGION_REG_WAIT_ARG
        ("__resv", _arr(U64, 2), 16),
    ),
)
"""``struct io_uring_mem_region_reg`` (32 B), argument of ``IORING_REGISTER_MEM_REGION``."""

zcrx_ctrl = _struct(
    72,
    (
        ("zcrx_id", U32, 0),
        ("op", U32, 4),  # ZCRX_CTRL_*
        ("__resv", _arr(U64, 2), 8),
        # 48-byte union at 24:
        ("flush_rq_resv", _arr(U64, 6), 24),  # zc_flush.__resv[6]
        ("export_zcrx_fd", U32, 24),  # zc_export.zcrx_fd (out)
        ("export_resv1", _arr(U32, 11), 28),  # zc_export.__resv1[11]
        ("arm_event_type", U32, 24),  # zc_arm_event.event_type (7.2)
        ("arm_event_resv", _arr(U32, 11), 28),  # zc_arm_event.__resv[11]
        ("add_area_ptr", U64, 24),  # zc_area.area_ptr -> io_uring_zcrx_area_reg (7.3)
        ("add_area_resv", _arr(U64, 5), 32),  # zc_area.__resv[5]
    ),
)
"""``struct zcrx_ctrl`` (72 B), argument of ``IORING_REGISTER_ZCRX_CTRL`` (nr_args = 0).  The
union at 24 is exposed through its members (see the name table in the module docstring)."""

zcrx_stats = _struct(16, (("copy_count", U64, 0), ("copy_bytes", U64, 8)))
"""``struct zcrx_stats`` (16 B, Linux 7.2): copy-fallback counters.  They live in the RQ region at
``zcrx_event_desc.stats_offset``; the kernel writes them, the app reads them."""

# --------------------------------------------------------------------------------------------
# Ring setup (§3)
# --------------------------------------------------------------------------------------------

io_sqring_offsets = _struct(
    40,
    (
        ("head", U32, 0),
        ("tail", U32, 4),
        ("ring_mask", U32, 8),
        ("ring_entries", U32, 12),
        ("flags", U32, 16),
        ("dropped", U32, 20),
        ("array", U32, 24),
        ("resv1", U32, 28),
        ("user_addr", U64, 32),
    ),
)
"""``struct io_sqring_offsets`` (40 B), ``io_uring_params.sq_off``."""

io_cqring_offsets = _struct(
    40,
    (
        ("head", U32, 0),
        ("tail", U32, 4),
        ("ring_mask", U32, 8),
        ("ring_entries", U32, 12),
        ("overflow", U32, 16),
        ("cqes", U32, 20),
        ("flags", U32, 24),
        ("resv1", U32, 28),
        ("user_addr", U64, 32),
    ),
)
"""``struct io_cqring_offsets`` (40 B), ``io_uring_params.cq_off``."""

io_uring_params = _struct(
    120,
    (
        ("sq_entries", U32, 0),
        ("cq_entries", U32, 4),
        ("flags", U32, 8),  # IORING_SETUP_*
        ("sq_thread_cpu", U32, 12),
        ("sq_thread_idle", U32, 16),
        ("features", U32, 20),  # out: IORING_FEAT_*
        ("wq_fd", U32, 24),
        ("resv", _arr(U32, 3), 28),
        ("sq_off", io_sqring_offsets, 40),
        ("cq_off", io_cqring_offsets, 80),
    ),
)
"""``struct io_uring_params`` (120 B), argument of ``io_uring_setup``."""

io_uring_getevents_arg = _struct(
    24,
    (
        ("sigmask", U64, 0),
        ("sigmask_sz", U32, 8),
        ("min_wait_usec", U32, 12),
        ("ts", U64, 16),
    ),
)
"""``struct io_uring_getevents_arg`` (24 B), ``io_uring_enter`` with ``IORING_ENTER_EXT_ARG``."""

# --------------------------------------------------------------------------------------------
# Provided buffer rings (§6) - the copy-mode RECV baseline
# --------------------------------------------------------------------------------------------

io_uring_buf = _struct(
    16, (("addr", U64, 0), ("len", U32, 8), ("bid", U16, 12), ("resv", U16, 14))
)
"""``struct io_uring_buf`` (16 B), one provided-buffer ring entry (written by the app)."""

io_uring_buf_ring = _struct(
    16, (("resv1", U64, 0), ("resv2", U32, 8), ("resv3", U16, 12), ("tail", U16, 14))
)
"""The header view of ``struct io_uring_buf_ring``: it overlays ``bufs[0]``, whose ``resv``
(offset 14) is the ring's u16 ``tail``.  The ring itself is an array of ``io_uring_buf``."""

io_uring_buf_reg = _struct(
    40,
    (
        ("ring_addr", U64, 0),
        ("ring_entries", U32, 8),
        ("bgid", U16, 12),
        ("flags", U16, 14),  # IOU_PBUF_RING_*
        ("min_left", U32, 16),
        ("resv", _arr(U32, 5), 20),
    ),
)
"""``struct io_uring_buf_reg`` (40 B), argument of ``IORING_REGISTER_PBUF_RING``."""

io_uring_buf_status = _struct(
    40, (("buf_group", U32, 0), ("head", U32, 4), ("resv", _arr(U32, 8), 8))
)
"""``struct io_uring_buf_status`` (40 B), argument of ``IORING_REGISTER_PBUF_STATUS``."""

io_uring_napi = _struct(
    16,
    (
        ("busy_poll_to", U32, 0),  # microseconds
        ("prefer_busy_poll", U8, 4),
        ("opcode", U8, 5),  # IO_URING_NAPI_*_OP / _ID
        ("pad", _arr(U8, 2), 6),
        ("op_param", U32, 8),  # REGISTER_OP: a tracking strategy; ADD/DEL_ID: a NAPI id
        ("resv", U32, 12),
    ),
)
"""``struct io_uring_napi`` (16 B), argument of ``IORING_REGISTER_NAPI`` /
``IORING_UNREGISTER_NAPI`` (nr_args = 1); the kernel writes the previous settings back."""

# enum io_uring_napi_op
IO_URING_NAPI_REGISTER_OP = 0
IO_URING_NAPI_STATIC_ADD_ID = 1
IO_URING_NAPI_STATIC_DEL_ID = 2
# enum io_uring_napi_tracking_strategy
IO_URING_NAPI_TRACKING_DYNAMIC = 0
IO_URING_NAPI_TRACKING_STATIC = 1
IO_URING_NAPI_TRACKING_INACTIVE = 255

# --------------------------------------------------------------------------------------------
# IORING_REGISTER_QUERY (§5)
# --------------------------------------------------------------------------------------------

io_uring_query_hdr = _struct(
    40,
    (
        ("next_entry", U64, 0),
        ("query_data", U64, 8),
        ("query_op", U32, 16),  # IO_URING_QUERY_*
        ("size", U32, 20),
        ("result", S32, 24),
        ("__resv", _arr(U32, 3), 28),
    ),
)
"""``struct io_uring_query_hdr`` (40 B): one link of a query chain (no ring needed)."""

io_uring_query_zcrx = _struct(
    40,
    (
        ("register_flags", U64, 0),  # supported ZCRX_REG_*
        ("area_flags", U64, 8),  # supported IORING_ZCRX_AREA_*
        ("nr_ctrl_opcodes", U32, 16),  # __ZCRX_CTRL_LAST
        ("features", U32, 20),  # ZCRX_FEATURE_*
        ("rq_hdr_size", U32, 24),
        ("rq_hdr_alignment", U32, 28),
        ("__resv2", U64, 32),
    ),
)
"""``struct io_uring_query_zcrx`` (40 B), payload of ``IO_URING_QUERY_ZCRX``."""

io_uring_query_zcrx_event = _struct(
    48,
    (
        ("event_flags", U32, 0),  # supported event types, as a mask of 1 << ZCRX_EVENT_*
        ("stats_size", U32, 4),  # sizeof(struct zcrx_stats)
        ("stats_off_alignment", U32, 8),  # zcrx_event_desc.stats_offset alignment
        ("__resv1", U32, 12),
        ("__resv2", _arr(U64, 4), 16),
    ),
)
"""``struct io_uring_query_zcrx_event`` (48 B, Linux 7.2), payload of query op 3
(``IO_URING_QUERY_ZCRX_NOTIF``).  Read from a 7.3-era header (the reference says 40 bytes and
gives no table; an earlier ``_notif`` shape had ``__resv2[10]``)."""

io_uring_query_scq = _struct(16, (("hdr_size", U64, 0), ("hdr_alignment", U64, 8)))
"""``struct io_uring_query_scq`` (16 B), payload of ``IO_URING_QUERY_SCQ``."""

# --------------------------------------------------------------------------------------------
# Constants (§7)
# --------------------------------------------------------------------------------------------

# enum io_uring_op
IORING_OP_NOP = 0
IORING_OP_READV = 1
IORING_OP_WRITEV = 2
IORING_OP_FSYNC = 3
IORING_OP_READ_FIXED = 4
IORING_OP_WRITE_FIXED = 5
IORING_OP_POLL_ADD = 6
IORING_OP_POLL_REMOVE = 7
IORING_OP_SYNC_FILE_RANGE = 8
IORING_OP_SENDMSG = 9
IORING_OP_RECVMSG = 10
IORING_OP_TIMEOUT = 11
IORING_OP_TIMEOUT_REMOVE = 12
IORING_OP_ACCEPT = 13
IORING_OP_ASYNC_CANCEL = 14
IORING_OP_LINK_TIMEOUT = 15
IORING_OP_CONNECT = 16
IORING_OP_FALLOCATE = 17
IORING_OP_OPENAT = 18
IORING_OP_CLOSE = 19
IORING_OP_FILES_UPDATE = 20
IORING_OP_STATX = 21
IORING_OP_READ = 22
IORING_OP_WRITE = 23
IORING_OP_FADVISE = 24
IORING_OP_MADVISE = 25
IORING_OP_SEND = 26
IORING_OP_RECV = 27
IORING_OP_OPENAT2 = 28
IORING_OP_EPOLL_CTL = 29
IORING_OP_SPLICE = 30
IORING_OP_PROVIDE_BUFFERS = 31
IORING_OP_REMOVE_BUFFERS = 32
IORING_OP_TEE = 33
IORING_OP_SHUTDOWN = 34
IORING_OP_RENAMEAT = 35
IORING_OP_UNLINKAT = 36
IORING_OP_MKDIRAT = 37
IORING_OP_SYMLINKAT = 38
IORING_OP_LINKAT = 39
IORING_OP_MSG_RING = 40
IORING_OP_FSETXATTR = 41
IORING_OP_SETXATTR = 42
IORING_OP_FGETXATTR = 43
IORING_OP_GETXATTR = 44
IORING_OP_SOCKET = 45
IORING_OP_URING_CMD = 46
IORING_OP_SEND_ZC = 47
IORING_OP_SENDMSG_ZC = 48
IORING_OP_READ_MULTISHOT = 49
IORING_OP_WAITID = 50
IORING_OP_FUTEX_WAIT = 51
IORING_OP_FUTEX_WAKE = 52
IORING_OP_FUTEX_WAITV = 53
IORING_OP_FIXED_FD_INSTALL = 54
IORING_OP_FTRUNCATE = 55
IORING_OP_BIND = 56
IORING_OP_LISTEN = 57
IORING_OP_RECV_ZC = 58
IORING_OP_EPOLL_WAIT = 59
IORING_OP_READV_FIXED = 60
IORING_OP_WRITEV_FIXED = 61
IORING_OP_PIPE = 62
IORING_OP_NOP128 = 63
IORING_OP_URING_CMD128 = 64
IORING_OP_LAST = 65  # liburing 2026-08

# enum io_uring_register_op
IORING_REGISTER_BUFFERS = 0
IORING_UNREGISTER_BUFFERS = 1
IORING_REGISTER_FILES = 2
IORING_UNREGISTER_FILES = 3
IORING_REGISTER_EVENTFD = 4
IORING_UNREGISTER_EVENTFD = 5
IORING_REGISTER_FILES_UPDATE = 6
IORING_REGISTER_EVENTFD_ASYNC = 7
IORING_REGISTER_PROBE = 8
IORING_REGISTER_PERSONALITY = 9
IORING_UNREGISTER_PERSONALITY = 10
IORING_REGISTER_RESTRICTIONS = 11
IORING_REGISTER_ENABLE_RINGS = 12
IORING_REGISTER_FILES2 = 13
IORING_REGISTER_FILES_UPDATE2 = 14
IORING_REGISTER_BUFFERS2 = 15
IORING_REGISTER_BUFFERS_UPDATE = 16
IORING_REGISTER_IOWQ_AFF = 17
IORING_UNREGISTER_IOWQ_AFF = 18
IORING_REGISTER_IOWQ_MAX_WORKERS = 19
IORING_REGISTER_RING_FDS = 20
IORING_UNREGISTER_RING_FDS = 21
IORING_REGISTER_PBUF_RING = 22
IORING_UNREGISTER_PBUF_RING = 23
IORING_REGISTER_SYNC_CANCEL = 24
IORING_REGISTER_FILE_ALLOC_RANGE = 25
IORING_REGISTER_PBUF_STATUS = 26
IORING_REGISTER_NAPI = 27
IORING_UNREGISTER_NAPI = 28
IORING_REGISTER_CLOCK = 29
IORING_REGISTER_CLONE_BUFFERS = 30
IORING_REGISTER_SEND_MSG_RING = 31
IORING_REGISTER_ZCRX_IFQ = 32
IORING_REGISTER_RESIZE_RINGS = 33
IORING_REGISTER_MEM_REGION = 34
IORING_REGISTER_QUERY = 35
IORING_REGISTER_ZCRX_CTRL = 36
IORING_REGISTER_BPF_FILTER = 37
IORING_REGISTER_LAST = 38
IORING_REGISTER_USE_REGISTERED_RING = 1 << 31  # ORed into the opcode

# io_uring_params.flags
IORING_SETUP_IOPOLL = 1 << 0
IORING_SETUP_SQPOLL = 1 << 1
IORING_SETUP_SQ_AFF = 1 << 2
IORING_SETUP_CQSIZE = 1 << 3
IORING_SETUP_CLAMP = 1 << 4
IORING_SETUP_ATTACH_WQ = 1 << 5
IORING_SETUP_R_DISABLED = 1 << 6
IORING_SETUP_SUBMIT_ALL = 1 << 7
IORING_SETUP_COOP_TASKRUN = 1 << 8
IORING_SETUP_TASKRUN_FLAG = 1 << 9
IORING_SETUP_SQE128 = 1 << 10
IORING_SETUP_CQE32 = 1 << 11
IORING_SETUP_SINGLE_ISSUER = 1 << 12
IORING_SETUP_DEFER_TASKRUN = 1 << 13
IORING_SETUP_NO_MMAP = 1 << 14
IORING_SETUP_REGISTERED_FD_ONLY = 1 << 15
IORING_SETUP_NO_SQARRAY = 1 << 16
IORING_SETUP_HYBRID_IOPOLL = 1 << 17
IORING_SETUP_CQE_MIXED = 1 << 18  # 6.18
IORING_SETUP_SQE_MIXED = 1 << 19
IORING_SETUP_SQ_REWIND = 1 << 20  # 7.0

# io_uring_enter flags
IORING_ENTER_GETEVENTS = 1 << 0
IORING_ENTER_SQ_WAKEUP = 1 << 1
IORING_ENTER_SQ_WAIT = 1 << 2
IORING_ENTER_EXT_ARG = 1 << 3
IORING_ENTER_REGISTERED_RING = 1 << 4
IORING_ENTER_ABS_TIMER = 1 << 5
IORING_ENTER_EXT_ARG_REG = 1 << 6
IORING_ENTER_NO_IOWAIT = 1 << 7

# sq_flags (kernel-written) / cq_flags (app-written)
IORING_SQ_NEED_WAKEUP = 1 << 0
IORING_SQ_CQ_OVERFLOW = 1 << 1
IORING_SQ_TASKRUN = 1 << 2
IORING_CQ_EVENTFD_DISABLED = 1 << 0

# io_uring_cqe.flags
IORING_CQE_F_BUFFER = 1 << 0
IORING_CQE_F_MORE = 1 << 1
IORING_CQE_F_SOCK_NONEMPTY = 1 << 2
IORING_CQE_F_NOTIF = 1 << 3
IORING_CQE_F_BUF_MORE = 1 << 4
IORING_CQE_F_SKIP = 1 << 5
IORING_CQE_F_32 = 1 << 15
IORING_CQE_F_TSTAMP_HW = 1 << 16  # tx timestamps only; overlaps the buffer-id bits
IORING_CQE_BUFFER_SHIFT = 16

# sqe.ioprio flags for send/recv (IORING_RECV*/IORING_SEND*) and accept
IORING_RECVSEND_POLL_FIRST = 1 << 0
IORING_RECV_MULTISHOT = 1 << 1
IORING_RECVSEND_FIXED_BUF = 1 << 2
IORING_SEND_ZC_REPORT_USAGE = 1 << 3
IORING_RECVSEND_BUNDLE = 1 << 4
IORING_SEND_VECTORIZED = 1 << 5
IORING_ACCEPT_MULTISHOT = 1 << 0
IORING_ACCEPT_DONTWAIT = 1 << 1
IORING_ACCEPT_POLL_FIRST = 1 << 2
# sqe.nop_flags
IORING_NOP_INJECT_RESULT = 1 << 0
IORING_NOP_CQE32 = 1 << 5

# sqe.flags
IOSQE_FIXED_FILE = 1 << 0
IOSQE_IO_DRAIN = 1 << 1
IOSQE_IO_LINK = 1 << 2
IOSQE_IO_HARDLINK = 1 << 3
IOSQE_ASYNC = 1 << 4
IOSQE_BUFFER_SELECT = 1 << 5
IOSQE_CQE_SKIP_SUCCESS = 1 << 6

# io_uring_params.features
IORING_FEAT_SINGLE_MMAP = 1 << 0
IORING_FEAT_NODROP = 1 << 1
IORING_FEAT_SUBMIT_STABLE = 1 << 2
IORING_FEAT_RW_CUR_POS = 1 << 3
IORING_FEAT_CUR_PERSONALITY = 1 << 4
IORING_FEAT_FAST_POLL = 1 << 5
IORING_FEAT_POLL_32BITS = 1 << 6
IORING_FEAT_SQPOLL_NONFIXED = 1 << 7
IORING_FEAT_EXT_ARG = 1 << 8
IORING_FEAT_NATIVE_WORKERS = 1 << 9
IORING_FEAT_RSRC_TAGS = 1 << 10
IORING_FEAT_CQE_SKIP = 1 << 11
IORING_FEAT_LINKED_FILE = 1 << 12
IORING_FEAT_REG_REG_RING = 1 << 13
IORING_FEAT_RECVSEND_BUNDLE = 1 << 14
IORING_FEAT_MIN_TIMEOUT = 1 << 15
IORING_FEAT_RW_ATTR = 1 << 16
IORING_FEAT_NO_IOWAIT = 1 << 17

# mmap offsets (uapi) ...
IORING_OFF_SQ_RING = 0x0
IORING_OFF_CQ_RING = 0x8000000
IORING_OFF_SQES = 0x10000000
IORING_OFF_PBUF_RING = 0x80000000
IORING_OFF_PBUF_SHIFT = 16
IORING_OFF_MMAP_MASK = 0xF8000000
# ... and kernel-internal ones (io_uring/memmap.h); user space only sees them via mmap_offset
IORING_MAP_OFF_PARAM_REGION = 0x20000000
IORING_MAP_OFF_ZCRX_REGION = 0x30000000
IORING_OFF_ZCRX_SHIFT = 16

# zcrx
IORING_ZCRX_AREA_SHIFT = 48
IORING_ZCRX_AREA_MASK = ~((1 << IORING_ZCRX_AREA_SHIFT) - 1) & 0xFFFF_FFFF_FFFF_FFFF
IORING_ZCRX_AREA_DMABUF = 1  # io_uring_zcrx_area_reg.flags
ZCRX_REG_IMPORT = 1  # io_uring_zcrx_ifq_reg.flags (6.19)
ZCRX_REG_NODEV = 2  # (7.1)
ZCRX_FEATURE_RX_PAGE_SIZE = 1 << 0  # io_uring_query_zcrx.features (7.0)
ZCRX_CTRL_FLUSH_RQ = 0  # zcrx_ctrl.op
ZCRX_CTRL_EXPORT = 1
ZCRX_CTRL_ARM_EVENT = 2  # (7.2)
ZCRX_CTRL_ADD_AREA = 3  # (7.3)
ZCRX_CTRL_LAST = 4  # uapi name __ZCRX_CTRL_LAST (7.3; 3 in 7.2, 2 in 7.1 / liburing 2026-08)
ZCRX_FEATURE_EVENT = 1 << 1  # (7.2)
ZCRX_EVENT_ALLOC_FAIL = 0  # enum zcrx_event_type (7.2): the provider found no buffer
ZCRX_EVENT_COPY = 1  # the copy fallback ran
ZCRX_EVENT_TYPE_LAST = 2  # uapi name __ZCRX_EVENT_TYPE_LAST
ZCRX_EVENT_DESC_FLAG_STATS = 1  # zcrx_event_desc.flags: stats_offset is valid
ZCRX_MAX_AREAS = 1024  # areas per ifq (7.3; one before)
IORING_MEM_REGION_TYPE_USER = 1  # io_uring_region_desc.flags
IORING_MEM_REGION_REG_WAIT_ARG = 1  # io_uring_mem_region_reg.flags
IO_URING_QUERY_OPCODES = 0  # io_uring_query_hdr.query_op
IO_URING_QUERY_ZCRX = 1
IO_URING_QUERY_SCQ = 2
IO_URING_QUERY_ZCRX_NOTIF = 3  # (7.2) renamed during 7.2-rc; the reference's name
IO_URING_QUERY_ZCRX_EVENT = IO_URING_QUERY_ZCRX_NOTIF  # the post-rename name (inferred)
IORING_FILE_INDEX_ALLOC = 0xFFFFFFFF
IOU_PBUF_RING_MMAP = 1  # io_uring_buf_reg.flags
IOU_PBUF_RING_INC = 2

# Limits and machine constants (x86-64, SMP)
IORING_MAX_ENTRIES = 32768
IORING_MAX_CQ_ENTRIES = 65536
IO_RQ_MAX_ENTRIES = 32768
IO_SKBS_PER_CALL_LIMIT = 20
PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
SMP_CACHE_BYTES = 64
L1_CACHE_BYTES = 64
IO_RINGS_HDR_SIZE = 64  # sizeof(struct io_rings) on >= 6.6 (compact heads/tails)

# zcrx refill-queue header: 6.18 - 7.2 the kernel-internal `struct io_uring {u32 head, tail}`
# (8 bytes); 7.3 `struct zcrx_rq_hdr` with head and tail on cache lines of their own (128).
ZCRX_RQ_HDR_SIZE = 128  # io_uring_query_zcrx.rq_hdr_size of LINUX_VERSION (7.3)
ZCRX_RQ_HDR_SIZE_OLD = 8  # ... of 6.18 - 7.2
ZCRX_RQ_HDR_ALIGNMENT = 64  # io_uring_query_zcrx.rq_hdr_alignment (L1_CACHE_BYTES)

# --------------------------------------------------------------------------------------------
# Layout helpers
# --------------------------------------------------------------------------------------------

_U64_MAX = (1 << 64) - 1


def _align(value: int, alignment: int) -> int:
    """Round ``value`` up to a multiple of ``alignment`` (a power of two), like ``ALIGN()``."""
    return (value + alignment - 1) & ~(alignment - 1)


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


# struct io_rings field offsets on >= 6.6 (uapi-layouts.md §4), published via sq_off / cq_off.
_SQ_OFF_FIXED = {
    "head": 0, "tail": 4, "ring_mask": 16, "ring_entries": 24, "dropped": 32, "flags": 36,
}
_CQ_OFF_FIXED = {
    "head": 8, "tail": 12, "ring_mask": 20, "ring_entries": 28, "flags": 40, "overflow": 44,
    "cqes": IO_RINGS_HDR_SIZE,
}


def rings_layout(
    sq_entries: int, cq_entries: int, setup_flags: int
) -> tuple[dict[str, int], dict[str, int], int]:
    """Offsets the kernel reports in ``sq_off``/``cq_off`` and the size of the rings region.

    Mirrors ``rings_size()`` in io_uring/io_uring.c (``io_rings_layout`` after the 2026
    refactor) together with the code in ``io_uring_create()`` that fills ``p->sq_off`` /
    ``p->cq_off`` with ``offsetof(struct io_rings, ...)``, for the compact >= 6.6 layout
    (head/tail words not cache-line separated; ``sizeof(struct io_rings)`` = 64):

    * CQEs start at 64; ``off = 64 + cq_entries * 16``, doubled as a whole with
      ``IORING_SETUP_CQE32``, then aligned up to ``SMP_CACHE_BYTES``.
    * Without ``IORING_SETUP_NO_SQARRAY`` the u32 SQ index array sits at ``off`` and the region
      is ``off + 4 * sq_entries`` bytes; with it, ``sq_off.array`` is 0 and the region is
      ``off`` bytes.

    ``sq_entries``/``cq_entries`` are the final (rounded, power-of-two) values.  The returned
    dicts have every field of ``io_sqring_offsets`` / ``io_cqring_offsets``; ``resv1`` and
    ``user_addr`` are 0 (the kernel zeroes ``user_addr`` on output unless ``NO_MMAP``).
    """
    if not _is_pow2(sq_entries) or not _is_pow2(cq_entries):
        raise ValueError(f"entries must be powers of two, got sq={sq_entries} cq={cq_entries}")
    off = IO_RINGS_HDR_SIZE + cq_entries * io_uring_cqe.itemsize
    if setup_flags & IORING_SETUP_CQE32:
        off *= 2
    off = _align(off, SMP_CACHE_BYTES)
    if setup_flags & IORING_SETUP_NO_SQARRAY:
        array, size = 0, off
    else:
        array, size = off, off + 4 * sq_entries
    sq_off = {name: 0 for name in io_sqring_offsets.names or ()}
    sq_off.update(_SQ_OFF_FIXED, array=array)
    cq_off = {name: 0 for name in io_cqring_offsets.names or ()}
    cq_off.update(_CQ_OFF_FIXED)
    return sq_off, cq_off, size


def sqes_size(sq_entries: int, setup_flags: int) -> int:
    """Bytes of the SQE array (mmap offset ``IORING_OFF_SQES``): 64 per entry, 128 with SQE128.

    Mirrors the SQE-array sizing in ``io_allocate_scq_urings()`` (``array_size(sizeof(struct
    io_uring_sqe), sq_entries)``, doubled for ``IORING_SETUP_SQE128``).
    """
    if sq_entries <= 0:
        raise ValueError(f"sq_entries must be positive, got {sq_entries}")
    per = io_uring_sqe128.itemsize if setup_flags & IORING_SETUP_SQE128 else io_uring_sqe.itemsize
    return sq_entries * per


def zcrx_rq_hdr_size(kernel: tuple[int, int] = LINUX_VERSION) -> int:
    """``io_uring_query_zcrx.rq_hdr_size`` of release ``kernel``: 8 up to 7.2, 128 from 7.3."""
    return ZCRX_RQ_HDR_SIZE if kernel >= (7, 3) else ZCRX_RQ_HDR_SIZE_OLD


def zcrx_nr_ctrl_opcodes(kernel: tuple[int, int] = LINUX_VERSION) -> int:
    """``__ZCRX_CTRL_LAST`` of release ``kernel`` (query ``nr_ctrl_opcodes``): 2, 3 or 4."""
    if kernel >= (7, 3):
        return ZCRX_CTRL_LAST
    return ZCRX_CTRL_ARM_EVENT + 1 if kernel >= (7, 2) else ZCRX_CTRL_EXPORT + 1


def zcrx_features(kernel: tuple[int, int] = LINUX_VERSION) -> int:
    """``io_uring_query_zcrx.features`` of release ``kernel``."""
    return ZCRX_FEATURE_RX_PAGE_SIZE | (ZCRX_FEATURE_EVENT if kernel >= (7, 2) else 0)


def zcrx_rq_layout(rq_entries: int, kernel: tuple[int, int] = LINUX_VERSION
                   ) -> tuple[int, int, int, int]:
    """``(head, tail, rqes, region_bytes)`` of a zcrx refill queue on release ``kernel``.

    Mirrors ``io_allocate_rbuf_ring()`` / ``io_fill_zcrx_offsets()`` in io_uring/zcrx.c.  Up to
    7.2 the region starts with ``struct io_uring {u32 head; u32 tail;}`` (head @0, tail @4) and
    the RQE array starts on the next cache line, ``ALIGN(8, L1_CACHE_BYTES)`` = 64.  From 7.3
    the header gives head and tail a cache line each (head @0, tail @64) and the RQEs follow at
    128.  The region must hold ``rqes + 16 * rq_entries`` bytes (the kernel rejects smaller
    regions).
    """
    if rq_entries <= 0:
        raise ValueError(f"rq_entries must be positive, got {rq_entries}")
    hdr = zcrx_rq_hdr_size(kernel)
    tail = L1_CACHE_BYTES if kernel >= (7, 3) else 4
    rqes = _align(hdr, ZCRX_RQ_HDR_ALIGNMENT)
    return 0, tail, rqes, rqes + io_uring_zcrx_rqe.itemsize * rq_entries


# The largest id whose region offset still decodes under IORING_OFF_MMAP_MASK.
_ZCRX_MAX_MMAP_ID = (((~IORING_OFF_MMAP_MASK & 0xFFFFFFFF) + 1) >> IORING_OFF_ZCRX_SHIFT) - 1


def zcrx_region_mmap_offset(zcrx_id: int) -> int:
    """``region.mmap_offset`` for a kernel-allocated RQ region of ifq ``zcrx_id``.

    Mirrors the ``mmap_offset`` computation in zcrx.c (``IORING_MAP_OFF_ZCRX_REGION +
    (id << IORING_OFF_ZCRX_SHIFT)``).  Raises ``ValueError`` for ids whose offset would spill
    into the bits of ``IORING_OFF_MMAP_MASK`` (the mmap handler could not decode them).
    """
    if not 0 <= zcrx_id <= _ZCRX_MAX_MMAP_ID:
        raise ValueError(f"zcrx_id {zcrx_id} out of range 0..{_ZCRX_MAX_MMAP_ID}")
    return IORING_MAP_OFF_ZCRX_REGION + (zcrx_id << IORING_OFF_ZCRX_SHIFT)


def zcrx_id_from_mmap_offset(offset: int) -> int:
    """Inverse of :func:`zcrx_region_mmap_offset` (the kernel's mmap-offset decode).

    Raises ``ValueError`` if ``offset`` is not a zcrx region offset.
    """
    in_zcrx_window = offset & IORING_OFF_MMAP_MASK == IORING_MAP_OFF_ZCRX_REGION
    low_bits = offset & ((1 << IORING_OFF_ZCRX_SHIFT) - 1)
    if not in_zcrx_window or low_bits or offset > 0xFFFFFFFF:
        raise ValueError(f"{offset:#x} is not a zcrx region mmap offset")
    return (offset & ~IORING_OFF_MMAP_MASK) >> IORING_OFF_ZCRX_SHIFT


def area_token(area_id: int) -> int:
    """``rq_area_token`` for area ``area_id``: ``area_id << IORING_ZCRX_AREA_SHIFT``.

    Mirrors the token written back by ``io_zcrx_create_area()`` (area_id is 0 in every merged
    kernel).  A buffer's CQE/RQE ``off`` is ``area_token(area_id) | byte_offset``.
    """
    if not 0 <= area_id < 1 << (64 - IORING_ZCRX_AREA_SHIFT):
        raise ValueError(f"area_id {area_id} does not fit in 16 bits")
    return area_id << IORING_ZCRX_AREA_SHIFT


def zcrx_off(area_id: int, byte_offset: int) -> int:
    """Encode a CQE/RQE ``off``: ``area_token(area_id) | byte_offset``."""
    if not 0 <= byte_offset < 1 << IORING_ZCRX_AREA_SHIFT:
        raise ValueError(f"byte offset {byte_offset} does not fit in 48 bits")
    return area_token(area_id) | byte_offset


def zcrx_off_area_id(off: int) -> int:
    """The area id in a CQE/RQE ``off`` (its top 16 bits)."""
    return (off & IORING_ZCRX_AREA_MASK) >> IORING_ZCRX_AREA_SHIFT


def zcrx_off_offset(off: int) -> int:
    """The byte offset inside the area of a CQE/RQE ``off`` (its low 48 bits)."""
    return off & ~IORING_ZCRX_AREA_MASK & _U64_MAX


# --------------------------------------------------------------------------------------------
# The emulator's own NIC interface (NOT Linux)
# --------------------------------------------------------------------------------------------

NIC_IOVA_SHIFT = 40
_NIC_IOVA_OFF_MASK = (1 << NIC_IOVA_SHIFT) - 1
_NIC_MAX_MAP_ID = (1 << (64 - NIC_IOVA_SHIFT)) - 1


def make_iova(map_id: int, off: int) -> int:
    """An emulated DMA address: ``(map_id << NIC_IOVA_SHIFT) | off``.

    ``map_id`` names a DMA mapping (a shared-memory segment the driver mapped for the NIC,
    0 .. 2**24-1) and ``off`` is the byte offset inside it (< 2**40).
    """
    if not 0 <= map_id <= _NIC_MAX_MAP_ID:
        raise ValueError(f"map id {map_id} out of range 0..{_NIC_MAX_MAP_ID}")
    if not 0 <= off <= _NIC_IOVA_OFF_MASK:
        raise ValueError(f"offset {off} does not fit in {NIC_IOVA_SHIFT} bits")
    return (map_id << NIC_IOVA_SHIFT) | off


def iova_map_id(iova: int) -> int:
    """The DMA mapping id of an emulated iova (see :func:`make_iova`)."""
    return (iova & _U64_MAX) >> NIC_IOVA_SHIFT


def iova_offset(iova: int) -> int:
    """The byte offset inside its mapping of an emulated iova (see :func:`make_iova`)."""
    return iova & _NIC_IOVA_OFF_MASK


nic_rx_desc = _struct(16, (("iova", U64, 0), ("len", U32, 8), ("buf_id", U32, 12)))
"""Emulator-only (not a Linux struct): an rx buffer descriptor the driver posts to the NIC.

Written by the driver into a queue's rx descriptor ring, read and consumed by the NIC.
``iova`` (see :func:`make_iova`) and ``len`` describe the buffer; ``buf_id`` is the driver's
own handle, echoed nowhere by the NIC but kept with the descriptor so the driver can find its
buffer state.  Posting a descriptor lends the buffer to the NIC until the NIC reports the
frame that used it (in order of posting) in a ``nic_rx_cqe``, or the queue is reset."""

nic_rx_cqe = _struct(
    40,
    (
        ("hdr_slot", U32, 0),
        ("hdr_len", U16, 4),
        ("flags", U16, 6),
        ("data_len", U32, 8),
        ("nr_frags", U16, 12),
        ("queue", U16, 14),
        ("rss_hash", U32, 16),
        ("payload_off", U16, 20),
        ("status", U16, 22),
        ("tstamp_ns", U64, 24),
        ("gso_segs", U16, 32),
        ("gso_size", U16, 34),
        ("_resv", U32, 36),
    ),
)
"""Emulator-only (not a Linux struct): an rx completion for one received frame (or, with
``NIC_CQE_F_GRO``, one HW-GRO session of several).

Written by the NIC into a queue's rx completion ring after it has DMA-written the frame, read
and consumed by the driver.

* ``hdr_slot``: index of the header-buffer slot the NIC wrote into.
* ``hdr_len``: bytes written to that slot (headers with ``NIC_CQE_F_SPLIT``, the whole frame
  with ``NIC_CQE_F_LINEAR``).
* ``flags``: ``NIC_CQE_F_*``.
* ``data_len``: payload bytes written into data buffers (0 for a LINEAR frame).
* ``nr_frags``: number of posted ``nic_rx_desc`` buffers the payload used, in posting order.
* ``queue``: rx queue index; ``rss_hash``: Toeplitz hash of the flow.
* ``payload_off``: offset of the L4 payload from the start of the frame (the L2..L4 header
  length).
* ``status``: ``NIC_STATUS_*``; ``tstamp_ns``: receive timestamp in ns (0 = none).
* ``gso_segs``, ``gso_size``: with ``NIC_CQE_F_GRO`` only (0 otherwise): how many wire
  segments the NIC coalesced into this completion and the payload length of the first
  (every one but the last has that length), what the driver writes into the skb's
  ``skb_shinfo()->gso_segs``/``gso_size`` (mlx5 reports the count as ``lro_num_seg``).
  The header slot then holds the first segment's headers with the IP length fields
  covering the whole session (the IPv4 checksum recomputed) and the PSH flag of the last
  segment; the payloads follow each other in the data buffers.  ``_resv`` is 0."""

NIC_CQE_F_SPLIT = 1 << 0  # headers in the header slot, payload in data buffers
NIC_CQE_F_LINEAR = 1 << 1  # whole frame in the header slot, no data buffer used
NIC_CQE_F_L4_OK = 1 << 2  # L4 checksum verified
NIC_CQE_F_GRO = 1 << 3  # HW-GRO: several TCP segments coalesced (gso_segs, gso_size)

NIC_STATUS_OK = 0
NIC_STATUS_TRUNCATED = 1  # the frame did not fit in the posted buffers; the tail was cut
NIC_STATUS_BAD_HDR = 2  # headers could not be parsed (so could not be split)
NIC_STATUS_OVERSIZE = 3  # frame longer than the maximum frame size
NIC_STATUS_DMA_FAULT = 4  # a buffer or header slot outside the IOMMU mapping; frame dropped


# --------------------------------------------------------------------------------------------
# Import-time size guard
# --------------------------------------------------------------------------------------------


def _check_sizes() -> None:
    """Fail the import if a dtype's size drifted from the C struct size."""
    expected = {
        "io_uring_sqe": (io_uring_sqe, 64),
        "io_uring_sqe128": (io_uring_sqe128, 128),
        "io_uring_cqe": (io_uring_cqe, 16),
        "io_uring_cqe32": (io_uring_cqe32, 32),
        "io_uring_zcrx_cqe": (io_uring_zcrx_cqe, 16),
        "io_uring_zcrx_rqe": (io_uring_zcrx_rqe, 16),
        "io_uring_zcrx_offsets": (io_uring_zcrx_offsets, 32),
        "io_uring_zcrx_area_reg": (io_uring_zcrx_area_reg, 48),
        "io_uring_zcrx_ifq_reg": (io_uring_zcrx_ifq_reg, 96),
        "io_uring_region_desc": (io_uring_region_desc, 64),
        "io_uring_mem_region_reg": (io_uring_mem_region_reg, 32),
        "zcrx_ctrl": (zcrx_ctrl, 72),
        "zcrx_stats": (zcrx_stats, 16),
        "zcrx_event_desc": (zcrx_event_desc, 96),
        "io_sqring_offsets": (io_sqring_offsets, 40),
        "io_cqring_offsets": (io_cqring_offsets, 40),
        "io_uring_params": (io_uring_params, 120),
        "io_uring_getevents_arg": (io_uring_getevents_arg, 24),
        "io_uring_buf": (io_uring_buf, 16),
        "io_uring_buf_ring": (io_uring_buf_ring, 16),
        "io_uring_buf_reg": (io_uring_buf_reg, 40),
        "io_uring_buf_status": (io_uring_buf_status, 40),
        "io_uring_query_hdr": (io_uring_query_hdr, 40),
        "io_uring_query_zcrx": (io_uring_query_zcrx, 40),
        "io_uring_query_scq": (io_uring_query_scq, 16),
        "io_uring_query_zcrx_event": (io_uring_query_zcrx_event, 48),
        "nic_rx_desc": (nic_rx_desc, 16),
        "nic_rx_cqe": (nic_rx_cqe, 40),
    }
    for name, (dt, size) in expected.items():
        if dt.itemsize != size:
            raise ImportError(f"shared.abi: {name} is {dt.itemsize} bytes, expected {size}")


_check_sizes()
