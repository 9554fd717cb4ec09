"""SQPOLL (Linux ``io_uring/sqpoll.c``): the kernel loop plays the SQ thread.

There is no thread: :meth:`driver_proc.setup.IoUring.poll` runs :func:`sq_thread_pass` over
every SQPOLL ring each kernel-loop iteration, and ``io_uring_enter`` runs one pass too
(:func:`sq_thread_enter`, which first wakes the thread on ``IORING_ENTER_SQ_WAKEUP``).
The SQ thread's state lives on the ring: ``sqpoll``, ``sq_idle`` (seconds),
``sq_last_active``, ``sq_sleeping``.

Shared memory: the pass reads the app-written SQ tail (through the ring's untrusted SQ view)
and sets or clears ``IORING_SQ_NEED_WAKEUP`` in ``sq_flags`` of the rings region (kernel
written, app read).

Semantics and departures
------------------------
* After ``sq_thread_idle`` ms (default :data:`DEFAULT_SQ_IDLE_MS`) without work the pass sets
  ``IORING_SQ_NEED_WAKEUP``, then re-checks the SQ (an SQE published meanwhile is consumed
  and the flag cleared), and stops polling that ring until an ``io_uring_enter`` with
  ``IORING_ENTER_SQ_WAKEUP``.
* ``IORING_SETUP_SQ_AFF`` is validated (``sq_thread_cpu`` in range) but pins nothing;
  ``IORING_ENTER_SQ_WAIT`` returns at once.  One SQ "thread" serves all rings (no
  ``IORING_SETUP_ATTACH_WQ``: refused at setup).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from shared import abi

if TYPE_CHECKING:
    from driver_proc.io_uring import Ring

__all__ = ["DEFAULT_SQ_IDLE_MS", "sq_thread_enter", "sq_thread_pass"]

#: ``sq_thread_idle`` when the app leaves it 0 (Linux: one second).
DEFAULT_SQ_IDLE_MS = 1000


def sq_thread_enter(ring: Ring, flags: int, now: float) -> None:
    """``io_uring_enter`` on an SQPOLL ring: wake the SQ thread if the app asked
    (``IORING_ENTER_SQ_WAKEUP`` while it sleeps), count the call as activity and run one
    pass (the SQEs it consumes are not the caller's count: enter reports ``to_submit``)."""
    if flags & abi.IORING_ENTER_SQ_WAKEUP and ring.sq_sleeping:
        ring.sq_sleeping = False
        ring.clear_sq_flag(abi.IORING_SQ_NEED_WAKEUP)
    ring.sq_last_active = now
    sq_thread_pass(ring, now)


def sq_thread_pass(ring: Ring, now: float) -> int:
    """One pass of the emulated SQ thread over ``ring``; return the SQEs consumed."""
    if ring.sq_sleeping or ring.disabled or ring.closed:
        return 0
    n = ring.sq_ready()
    if n:
        ring.sq_last_active = now
        return ring.submit(n)
    if now - ring.sq_last_active >= ring.sq_idle:
        ring.set_sq_flag(abi.IORING_SQ_NEED_WAKEUP)
        n = ring.sq_ready()  # re-check after publishing the flag
        if n:
            ring.clear_sq_flag(abi.IORING_SQ_NEED_WAKEUP)
            ring.sq_last_active = now
            return ring.submit(n)
        ring.sq_sleeping = True
    return 0
