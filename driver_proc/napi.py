"""io_uring NAPI busy polling (Linux ``io_uring/napi.c``): ``IORING_(UN)REGISTER_NAPI``.

A ring with NAPI busy polling registered does not put a waiting ``io_uring_enter(GETEVENTS)``
to sleep at once: the kernel first polls the NAPI instances (RX queues) feeding the ring's
sockets for up to ``busy_poll_to`` microseconds, and returns as soon as enough CQEs are
there.  A busy app then gets its completions inside the syscall that asked for them instead
of waiting for the kernel loop's next pass and a deferred reply (a control-plane round trip).

Emulation: :func:`busy_poll` runs :attr:`driver_proc.setup.IoUring.napi_poll` (set by the
kernel: one NAPI pass over the queues with completions pending, their segments delivered to
TCP and the woken requests run) in a loop until the CQ holds ``min_complete`` CQEs or the
budget is spent; then the wait is deferred as before.  The kernel is single-threaded, so
the budget is time the whole kernel spends on this ring, as a Linux CPU spinning in the
syscall would.

Tracking: ``IO_URING_NAPI_TRACKING_DYNAMIC`` (Linux: the NAPI ids of the sockets the ring
issued requests on) and ``_STATIC`` (ids added with ``IO_URING_NAPI_STATIC_ADD_ID``) are both
accepted and kept.  Departure: sockets do not record their NAPI id here, so a busy poll
passes over every queue with completions pending (an idle queue costs one u32 load), in
either mode; a static list is kept for ``DEL_ID``'s errnos and the stats only.

Errnos as Linux: ``nr_args != 1`` -EINVAL; an argument that is not one 16-byte struct -EFAULT;
nonzero ``pad``/``resv`` -EINVAL; an unknown opcode or tracking strategy -EINVAL;
``ADD_ID``/``DEL_ID`` on a ring not in static mode -EINVAL; an id of 0 -EINVAL; adding an id
twice -EEXIST; deleting an unknown id -ENOENT.  Both calls write the settings in force before
the call back into the argument (``busy_poll_to``, ``prefer_busy_poll``, ``op_param`` = the
tracking mode); ``UNREGISTER`` may pass no argument.

Shared memory: none; the settings live on the ring (:attr:`driver_proc.io_uring.Ring.napi`).
"""

from __future__ import annotations

import errno
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from driver_proc.files import Task
from driver_proc.register import one_blob
from shared import abi
from shared.errors import Misuse

if TYPE_CHECKING:
    from driver_proc.io_uring import Ring
    from driver_proc.setup import IoUring

__all__ = ["RingNapi", "busy_poll", "register_napi", "unregister_napi"]

_TRACKING = (abi.IO_URING_NAPI_TRACKING_DYNAMIC, abi.IO_URING_NAPI_TRACKING_STATIC)


@dataclass
class RingNapi:
    """A ring's NAPI busy-poll settings and counters (owned by the kernel)."""

    busy_poll_to: int = 0  #: microseconds
    prefer_busy_poll: bool = False
    track_mode: int = abi.IO_URING_NAPI_TRACKING_INACTIVE
    ids: set[int] = field(default_factory=set)  #: the static list
    busy_polls: int = 0  #: waits that busy polled before sleeping
    busy_poll_hits: int = 0  #: of those, waits that got their CQEs while polling


def _settings(ring: Ring) -> RingNapi:
    if ring.napi is None:
        ring.napi = RingNapi()
    st: RingNapi = ring.napi
    return st


def _current(st: RingNapi) -> bytes:
    cur = np.zeros(1, dtype=abi.io_uring_napi)
    cur["busy_poll_to"] = st.busy_poll_to
    cur["prefer_busy_poll"] = int(st.prefer_busy_poll)
    cur["op_param"] = st.track_mode
    return cur.tobytes()


def register_napi(ring: Ring | None, task: Task, nr_args: int,
                  blobs: list[bytes]) -> tuple[int, list[bytes]]:
    """``IORING_REGISTER_NAPI``: set busy polling up or edit the static NAPI id list."""
    assert ring is not None
    arg = one_blob(nr_args, blobs, abi.io_uring_napi)[0]
    if int(arg["pad"][0]) or int(arg["pad"][1]) or int(arg["resv"]):
        raise Misuse("io_uring_napi pad/resv must be zero", errno.EINVAL)
    st = _settings(ring)
    back = [_current(st)]
    op, param = int(arg["opcode"]), int(arg["op_param"])
    if op == abi.IO_URING_NAPI_REGISTER_OP:
        if param not in _TRACKING:
            raise Misuse(f"napi tracking strategy {param}", errno.EINVAL)
        st.busy_poll_to = int(arg["busy_poll_to"])
        st.prefer_busy_poll = bool(arg["prefer_busy_poll"])
        st.track_mode = param
        return 0, back
    if op in (abi.IO_URING_NAPI_STATIC_ADD_ID, abi.IO_URING_NAPI_STATIC_DEL_ID):
        if st.track_mode != abi.IO_URING_NAPI_TRACKING_STATIC:
            raise Misuse("NAPI ids can be added/deleted in static tracking mode only",
                         errno.EINVAL)
        if param == 0:
            raise Misuse("NAPI id 0 is not valid", errno.EINVAL)
        if op == abi.IO_URING_NAPI_STATIC_ADD_ID:
            if param in st.ids:
                raise Misuse(f"NAPI id {param} is already listed", errno.EEXIST)
            st.ids.add(param)
        else:
            if param not in st.ids:
                raise Misuse(f"NAPI id {param} is not listed", errno.ENOENT)
            st.ids.discard(param)
        return 0, back
    raise Misuse(f"napi opcode {op}", errno.EINVAL)


def unregister_napi(ring: Ring | None, task: Task, nr_args: int,
                    blobs: list[bytes]) -> tuple[int, list[bytes]]:
    """``IORING_UNREGISTER_NAPI``: busy polling off; the old settings are written back when
    an argument is given."""
    assert ring is not None
    if nr_args != 1:
        raise Misuse(f"nr_args {nr_args}, expected 1", errno.EINVAL)
    back: list[bytes] = []
    st = _settings(ring)
    if blobs:
        if len(blobs[0]) != abi.io_uring_napi.itemsize:
            raise Misuse(f"argument must be {abi.io_uring_napi.itemsize} bytes", errno.EFAULT)
        back = [_current(st)]
    ring.napi = RingNapi(busy_polls=st.busy_polls, busy_poll_hits=st.busy_poll_hits)
    return 0, back


def busy_poll(uring: IoUring, ring: Ring, min_complete: int) -> bool:
    """Before a GETEVENTS wait sleeps: poll NAPI for up to the ring's ``busy_poll_to``.

    Returns True if the CQ reached ``min_complete`` (the syscall returns at once).  Does
    nothing (False) for a ring without busy polling or a kernel without a NAPI hook.
    """
    st: RingNapi | None = ring.napi
    poll = uring.napi_poll
    if st is None or poll is None or st.track_mode == abi.IO_URING_NAPI_TRACKING_INACTIVE:
        return False
    st.busy_polls += 1
    end = time.monotonic() + st.busy_poll_to / 1e6
    while True:
        poll()
        if ring.overflow:
            ring.flush_overflow()
        if ring.cq_ready() >= min_complete:
            st.busy_poll_hits += 1
            return True
        if ring.closed or time.monotonic() >= end:
            return False
