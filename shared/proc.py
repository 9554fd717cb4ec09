"""Process lifecycle shared by every role: arguments, signals, parent watch, logging.

Not part of the data ABI, but every role process needs the same few rules, and
roles may not import each other:

* every role is started as ``python -m <package> --tag zcrx:<run_id>:<role> ...``
  so ``ps`` shows which run it belongs to and cleanup can find it;
* SIGTERM and SIGINT ask the loop to stop (:attr:`Lifecycle.stopping`); the loop
  finishes its batch, tears down what it owns, and exits 0;
* a role exits by itself when the process that started it dies, unless it was
  started ``--detached`` (``zcrx up --detach``), so a killed launcher leaves no
  orphans;
* logs go to stderr, which the launcher points at ``<rundir>/<role>.log``.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from types import FrameType


class Lifecycle:
    """Signal-driven stop flag plus an optional watch on the parent process."""

    def __init__(self, watch_parent: bool) -> None:
        self.stopping = False
        self.reason = ""
        self._parent = os.getppid() if watch_parent else None
        self._next_check = 0.0
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.stopping = True
        self.reason = signal.Signals(signum).name

    def should_stop(self) -> bool:
        """True once asked to stop, or once the parent we were started by is gone."""
        if self.stopping:
            return True
        if self._parent is not None:
            now = time.monotonic()
            if now >= self._next_check:
                self._next_check = now + 0.2
                if os.getppid() != self._parent:
                    self.stopping = True
                    self.reason = "parent exited"
        return self.stopping


#: Environment variable naming the file a process creates once it is ready.
NOTIFY_ENV = "ZCRX_NOTIFY"


def notify_ready(detail: str = "ready") -> None:
    """Tell whoever started us that we are ready (like ``sd_notify("READY=1")``).

    The launcher sets ``$ZCRX_NOTIFY`` to a path and waits for that file; a
    process started any other way has no variable and this does nothing.  An app
    calls it once it listens, so traffic started right after ``zcrx app run``
    finds the socket (our senders do not retransmit a SYN).
    """
    path = os.environ.get(NOTIFY_ENV)
    if not path:
        return
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(detail + "\n")
    os.replace(tmp, path)


def base_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """The arguments every role takes."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--tag", default="", help="zcrx:<run_id>:<role> (set by the launcher)")
    p.add_argument("--run", default=os.environ.get("ZCRX_RUN", ""),
                   help="run id (default: $ZCRX_RUN)")
    p.add_argument("--rundir", default=os.environ.get("ZCRX_RUNDIR", ""),
                   help="run directory (default: $ZCRX_RUNDIR)")
    p.add_argument("--detached", action="store_true",
                   help="keep running when the process that started us exits "
                        "(zcrx up --detach); by default a role exits with its parent")
    p.add_argument("-q", "--quiet", action="store_true", help="log warnings only")
    return p


def setup_logging(role: str, quiet: bool = False) -> logging.Logger:
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING if quiet else logging.INFO,
                        format=f"%(asctime)s {role}[%(process)d] %(levelname)s %(message)s")
    return logging.getLogger(role)
