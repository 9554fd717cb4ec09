"""The opcode table (Linux ``io_uring/opdef.c``, ``io_issue_defs``).

:class:`OpDef` is one opcode's entry; :func:`io_issue_defs` builds the table of the opcodes
io_uring itself emulates, which :class:`driver_proc.setup.IoUring` starts from.  Other
subsystems add theirs with :meth:`driver_proc.setup.IoUring.register_opcode` (zcrx:
``IORING_OP_RECV_ZC``).  :meth:`driver_proc.io_uring.Ring._init_req` (Linux ``io_init_req``)
checks an SQE against its entry, then calls its ``prep``.

Shared memory: none (the preps reach the CQ and app memory through the ring).

Opcodes
-------
* NOP (:mod:`driver_proc.nop`), RECV, SEND, SHUTDOWN and ACCEPT (:mod:`driver_proc.net`),
  CLOSE
  (:mod:`driver_proc.openclose`), plus whatever other subsystems registered.
* Other opcodes below ``IORING_OP_LAST`` complete with ``-EOPNOTSUPP`` (not emulated);
  opcodes at or past ``IORING_OP_LAST`` are ``-EINVAL``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from driver_proc.io_uring import Request, Ring, Sqe
from driver_proc.net import prep_accept, prep_recv, prep_send, prep_shutdown
from driver_proc.nop import prep_nop
from driver_proc.openclose import prep_close
from shared import abi

__all__ = ["OpDef", "io_issue_defs"]


@dataclass(frozen=True)
class OpDef:
    """One opcode's table entry (Linux ``struct io_issue_def``).

    ``prep(ring, sqe)`` validates the SQE and returns a :class:`Request` to issue, or None when
    it completed synchronously (it posted its CQE itself); it raises ``Misuse(errno)`` for a
    bad SQE.  ``ioprio``: the opcode reads ``sqe.ioprio`` (else it must be 0);
    ``buffer_select``: ``IOSQE_BUFFER_SELECT`` is allowed; ``iopoll``: allowed on an IOPOLL
    ring; ``needs_file``: ``sqe.fd`` must name an open file (and ``IOSQE_FIXED_FILE``, with no
    registered file table, is -EBADF).
    """

    name: str
    prep: Callable[[Ring, Sqe], Request | None]
    ioprio: bool = False
    buffer_select: bool = False
    iopoll: bool = False
    needs_file: bool = False


def io_issue_defs() -> dict[int, OpDef]:
    """A fresh table of the opcodes io_uring emulates itself, by opcode."""
    return {
        abi.IORING_OP_NOP: OpDef("NOP", prep_nop, iopoll=True),
        abi.IORING_OP_RECV: OpDef("RECV", prep_recv, ioprio=True, buffer_select=True,
                                  needs_file=True),
        abi.IORING_OP_SEND: OpDef("SEND", prep_send, ioprio=True, needs_file=True),
        abi.IORING_OP_SHUTDOWN: OpDef("SHUTDOWN", prep_shutdown, needs_file=True),
        abi.IORING_OP_ACCEPT: OpDef("ACCEPT", prep_accept, ioprio=True, needs_file=True),
        abi.IORING_OP_CLOSE: OpDef("CLOSE", prep_close),
    }
