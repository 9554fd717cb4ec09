"""``io_uring_register`` (Linux ``io_uring/register.c``): the opcode dispatch and ENABLE_RINGS.

:func:`io_uring_register` looks the opcode up in ``IoUring.register_ops`` (filled by
:class:`driver_proc.setup.IoUring`: the buffer-ring opcodes of :mod:`driver_proc.kbuf`,
:func:`enable_rings`, and whatever other subsystems add through
:meth:`~driver_proc.setup.IoUring.register_register_op`, e.g. zcrx's ZCRX_IFQ, ZCRX_CTRL and
QUERY).  Each handler is a :data:`RegisterHandler`; :func:`one_blob` is the argument check
most of them share (Linux's ``copy_from_user`` of one fixed-size struct).

Shared memory: none here.  Arguments travel as blobs in the control message and the written
back structs go out in the reply (docs/design.md §4); the handlers own whatever regions they
create.

Departures: ``IORING_REGISTER_USE_REGISTERED_RING`` is refused with -EINVAL (registered ring
fds are not emulated).  ``fd == -1`` ("blind" opcodes, Linux's
``io_uring_register_blind``) is accepted only for the opcodes registered with ``blind=True``
(IORING_REGISTER_QUERY); any other opcode needs a ring.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from driver_proc.files import Task
from shared import abi
from shared.errors import Misuse

if TYPE_CHECKING:
    from driver_proc.io_uring import Ring
    from driver_proc.setup import IoUring

__all__ = [
    "RegisterHandler",
    "enable_rings",
    "io_uring_register",
    "one_blob",
]

RegisterHandler = Callable[["Ring | None", Task, int, list[bytes]], tuple[int, list[bytes]]]
"""``handler(ring, task, nr_args, blobs) -> (res, blobs written back)``; raise Misuse(errno).
``ring`` is None for the blind ``fd = -1`` register calls (IORING_REGISTER_QUERY)."""


def io_uring_register(uring: IoUring, task: Task, fd: int, opcode: int, nr_args: int,
                      blobs: list[bytes]) -> tuple[int, list[bytes]]:
    """``io_uring_register``: dispatch to the opcode's handler."""
    if opcode & abi.IORING_REGISTER_USE_REGISTERED_RING:
        raise Misuse("registered ring fds are not emulated", errno.EINVAL)
    handler = uring.register_ops.get(opcode)
    if fd == -1:
        if handler is None or opcode not in uring.blind_register_ops:
            raise Misuse(f"register opcode {opcode} needs a ring", errno.EINVAL)
        return handler(None, task, nr_args, blobs)
    ring = uring.get_ring(task, fd)
    if handler is None:
        raise Misuse(f"register opcode {opcode} not supported", errno.EINVAL)
    return handler(ring, task, nr_args, blobs)


def one_blob(nr_args: int, blobs: list[bytes], dtype: np.dtype[Any]) -> np.ndarray:
    """The single ``dtype`` argument of a register call, as a private copy."""
    if nr_args != 1:
        raise Misuse(f"nr_args {nr_args}, expected 1", errno.EINVAL)
    if not blobs or len(blobs[0]) != dtype.itemsize:
        raise Misuse(f"argument must be {dtype.itemsize} bytes", errno.EFAULT)
    return np.frombuffer(blobs[0], dtype=dtype).copy()


def enable_rings(ring: Ring | None, task: Task, nr_args: int,
                 blobs: list[bytes]) -> tuple[int, list[bytes]]:
    """``IORING_REGISTER_ENABLE_RINGS``: start a ring set up with ``IORING_SETUP_R_DISABLED``."""
    assert ring is not None
    if nr_args or blobs:
        raise Misuse("ENABLE_RINGS takes no argument", errno.EINVAL)
    if not ring.disabled:
        raise Misuse("ring is not disabled", errno.EBADFD)
    ring.disabled = False
    return 0, []
