"""IORING_OP_NOP (Linux ``io_uring/nop.c``).

A NOP completes inside its prep (:func:`prep_nop` posts the CQE and returns None): result 0,
or with ``IORING_NOP_INJECT_RESULT`` the signed value in ``sqe.len``; with
``IORING_NOP_CQE32`` a 32-byte CQE whose second half is ``(sqe.off, sqe.addr)`` (a ring with
``IORING_SETUP_CQE32`` or ``CQE_MIXED`` only).  ``IOSQE_CQE_SKIP_SUCCESS`` suppresses a
successful 16-byte CQE.  Other ``nop_flags`` are -EINVAL.  Here NOP is the only opcode
allowed on an IOPOLL ring and the only one that ignores ``IOSQE_FIXED_FILE`` (it takes no
file).

Shared memory: only the CQ, through :meth:`driver_proc.io_uring.Ring.post`.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from shared import abi
from shared.errors import Misuse

if TYPE_CHECKING:
    from driver_proc.io_uring import Request, Ring, Sqe

__all__ = ["prep_nop"]

_NOP_FLAGS = abi.IORING_NOP_INJECT_RESULT | abi.IORING_NOP_CQE32


def prep_nop(ring: Ring, sqe: Sqe) -> Request | None:
    """The NOP prep: validate, post the CQE, return None (done)."""
    nf = sqe.op_flags
    if nf & ~_NOP_FLAGS:
        raise Misuse(f"nop_flags {nf:#x}", errno.EINVAL)
    res = 0
    if nf & abi.IORING_NOP_INJECT_RESULT:
        res = sqe.len - (1 << 32) if sqe.len & 0x8000_0000 else sqe.len
    if nf & abi.IORING_NOP_CQE32:
        if not ring.flags & (abi.IORING_SETUP_CQE32 | abi.IORING_SETUP_CQE_MIXED):
            raise Misuse("IORING_NOP_CQE32 on a ring without big CQEs", errno.EINVAL)
        ring.post(sqe.user_data, res, 0, big=(sqe.off, sqe.addr))
        return None
    if not (res >= 0 and sqe.flags & abi.IOSQE_CQE_SKIP_SUCCESS):
        ring.post(sqe.user_data, res, 0)
    else:
        ring.stats.cqes_skipped += 1
    return None
