"""What every sample server does around its own loop: signals, attach, summary.

Both :mod:`app_proc.copy_server` and :mod:`app_proc.zcrx_server` are one object
with ``run() -> exit code``, an ``errors`` list and ``summary() -> dict``; this
module runs such an object the same way for both, so their ``main`` functions
are one call.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any, Protocol

from app_proc import liburing as L
from shared.errors import PeerGone, ZcrxError

EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_SETUP_FAILED = 3


class Server(Protocol):
    errors: list[str]

    def run(self) -> int: ...

    def summary(self) -> dict[str, Any]: ...


def write_json(path: str, summary: dict[str, Any]) -> None:
    """The summary as JSON, to a file or (``-``) to stdout."""
    text = json.dumps(summary, indent=2)
    if path == "-":
        print(text, flush=True)
    else:
        with open(path, "w") as f:
            f.write(text + "\n")


def serve(prog: str, make: Callable[[L.Kernel, threading.Event], Server], *,
          rundir: str | None, run: str | None, json_path: str | None,
          kernel: L.Kernel | None = None, stop: threading.Event | None = None) -> int:
    """Attach to the kernel, run the server until done or SIGTERM/SIGINT, write the
    summary, and return the exit code (3 when the kernel cannot be reached or goes
    away: every later call would fail the same way)."""
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        signal.signal(signal.SIGINT, lambda *_: stop.set())
    own = kernel is None
    try:
        k = kernel if kernel is not None else L.Kernel(rundir, run=run, name=prog)
        k.attach()
    except ZcrxError as exc:
        print(f"{prog}: cannot reach the kernel: {exc}", file=sys.stderr)
        return EXIT_SETUP_FAILED
    server = make(k, stop)
    try:
        code = server.run()
    except PeerGone as exc:
        server.errors.append(f"kernel gone: {exc}")
        code = EXIT_SETUP_FAILED
    except ZcrxError as exc:
        server.errors.append(str(exc))
        code = EXIT_SETUP_FAILED
    finally:
        if own:
            k.close()
    if json_path:
        write_json(json_path, server.summary())
    for e in server.errors:
        print(f"{prog}: {e}", file=sys.stderr)
    return code
