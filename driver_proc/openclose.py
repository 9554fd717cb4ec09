"""IORING_OP_CLOSE (Linux ``io_uring/openclose.c``).

:func:`prep_close` closes the fd at once through :meth:`driver_proc.setup.IoUring.close_fd`
(the same path as the ``close`` syscall) and posts the CQE itself.  An io_uring fd cannot be
closed this way (-EBADF, as Linux refuses io_uring files here).  A direct descriptor
(``file_index``) finds no registered file table: -ENXIO.  ``IOSQE_CQE_SKIP_SUCCESS``
suppresses the CQE.

Shared memory: only the CQ, through :meth:`driver_proc.io_uring.Ring.post`.
"""

from __future__ import annotations

import errno

from driver_proc.io_uring import Request, Ring, Sqe
from shared import abi
from shared.errors import Misuse

__all__ = ["prep_close"]


def prep_close(ring: Ring, sqe: Sqe) -> Request | None:
    """The CLOSE prep: validate, close the fd, post the CQE, return None (done)."""
    if sqe.off or sqe.addr or sqe.len or sqe.op_flags or sqe.buf_index:
        raise Misuse("close: off/addr/len/rw_flags/buf_index must be 0", errno.EINVAL)
    if sqe.file_index:
        if sqe.fd:
            raise Misuse("close: both fd and file_index", errno.EINVAL)
        raise Misuse("no registered file table", errno.ENXIO)
    obj = ring.task.files.get(sqe.fd)
    if obj is None or isinstance(obj, Ring):
        raise Misuse(f"close: fd {sqe.fd}", errno.EBADF)
    ring.uring.close_fd(ring.task, sqe.fd)
    if not sqe.flags & abi.IOSQE_CQE_SKIP_SUCCESS:
        ring.post(sqe.user_data, 0, 0)
    else:
        ring.stats.cqes_skipped += 1
    return None
