"""One exception per cause, each carrying the Linux errno where Linux has one.

The emulated kernel answers a bad syscall with ``-errno`` exactly as Linux does;
inside Python the same condition travels as one of these exceptions, and
``exc.errno`` is the positive errno value (``None`` where Linux has no errno,
e.g. a broken internal invariant).  Callers pick the class to say *who* is at
fault:

* :class:`Misuse`          - the caller got the API wrong (bad argument, bad fd, ...).
* :class:`PeerMisbehaved`  - another process wrote something invalid into shared
  memory or onto the control plane.
* :class:`PeerGone`        - the process on the other side died or closed.
* :class:`RingFull`        - no room in a ring (a flow-control signal, not a bug).
* :class:`InvariantBroken` - our own bookkeeping is wrong; never expected.
"""

from __future__ import annotations

import errno as _errno
import os


class ZcrxError(Exception):
    """Base class.  ``errno`` is the positive Linux errno or ``None``."""

    default_errno: int | None = None

    def __init__(self, message: str = "", errno: int | None = None) -> None:
        self.errno: int | None = self.default_errno if errno is None else errno
        super().__init__(message or (os.strerror(self.errno) if self.errno else ""))

    @property
    def neg_errno(self) -> int:
        """The value a syscall returns for this error (``-errno``), or ``-EIO``."""
        return -(self.errno if self.errno is not None else _errno.EIO)

    def __str__(self) -> str:
        msg = super().__str__()
        if self.errno is not None:
            tag = f"[{_errno.errorcode.get(self.errno, str(self.errno))}]"
            # an error wrapping a peer's text that already ends with it says it once
            return msg if msg.endswith(tag) else f"{msg} {tag}"
        return msg


class Misuse(ZcrxError):
    """The caller passed something Linux would reject (default ``EINVAL``)."""

    default_errno = _errno.EINVAL


class PeerMisbehaved(ZcrxError):
    """A peer wrote invalid data into a ring, region or control message (``EBADMSG``)."""

    default_errno = _errno.EBADMSG


class PeerGone(ZcrxError):
    """The peer process is dead or has closed its end (``ECONNRESET``)."""

    default_errno = _errno.ECONNRESET


class RingFull(ZcrxError):
    """A ring has no room for the requested entries (``ENOSPC``)."""

    default_errno = _errno.ENOSPC


class InvariantBroken(ZcrxError):
    """Our own state is inconsistent (a bug, never caused by a peer)."""

    default_errno = None


class Timeout(ZcrxError):
    """A control-plane request got no answer in time (``ETIMEDOUT``)."""

    default_errno = _errno.ETIMEDOUT
