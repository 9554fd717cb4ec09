"""What every sample server does around its own loop: signals, attach, summary.

Both :mod:`app_proc.copy_server` and :mod:`app_proc.zcrx_server` are one object
with ``run() -> exit code``, an ``errors`` list and ``summary() -> dict``; this
module runs such an object the same way for both, so their ``main`` functions
are one call.

``-o FILE`` (both servers) writes each connection's stream as received: with ``-n 1`` to FILE
itself, otherwise one file per connection, ``FILE.N`` (or FILE with ``{n}`` replaced by N; N
counts connections from 1 in accept order).  ``-o -`` writes to stdout and needs ``-n 1`` (the
streams of several connections would interleave); the server's own lines then go to stderr,
as with ``--json -`` (the two cannot both be ``-``).  Bytes are written in stream order as
each batch is read, before its buffers go back (zcrx-server writes straight from the area).
"""

from __future__ import annotations

import argparse
import errno
import json
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import IO, Any, Protocol

from app_proc import liburing as L
from app_proc import syscall as S
from shared import abi, heap
from shared.errors import PeerGone, ZcrxError
from shared.msg import all_ok

EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_USAGE = 2  # no run to join (RunNotFound): what to set is in the message
EXIT_SETUP_FAILED = 3
STDOUT = "-"


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


@dataclass
class ServerOptions:
    """The options every sample server has (see :func:`add_common_args`)."""

    port: int = 8000
    addr: str = "0.0.0.0"
    verify: bool = False
    stream_id: int | None = None  # None: the peer's source port
    size: int = 0  # bytes per connection, checked at the end (0: not checked)
    connections: int = 0  # 0: until SIGTERM
    json_path: str | None = None
    seconds: float = 0.0  # give up after this long (0: never)
    quiet: bool = False
    hash: bool = True  # SHA-256 of every connection's bytes (--no-hash: off)
    output: str | None = None  # -o: where each connection's stream is written ('-': stdout)


def common_options(p: argparse.ArgumentParser, a: argparse.Namespace) -> dict[str, Any]:
    """The :class:`ServerOptions` fields from parsed :func:`add_common_args` options (and
    ``-s``), as keyword arguments for a server's own options class."""
    return {"port": a.port, "addr": a.addr, "verify": a.verify,
            "stream_id": parse_stream_id(p, a.stream_id), "size": a.size,
            "connections": a.connections, "json_path": a.json_path, "seconds": a.seconds,
            "quiet": a.quiet, "hash": a.hash, "output": check_output(p, a)}


def add_common_args(p: argparse.ArgumentParser, *, quiet_short: bool) -> None:
    """The options every sample server takes: where to listen, what to verify, when to stop,
    the summary, and the launcher's ones.  ``-q`` means ``--quiet`` only where it is free
    (zcrx-server uses it for the queue, as liburing's example does)."""
    p.add_argument("-p", "--port", type=int, default=8000, help="port to listen on (8000)")
    p.add_argument("-a", "--addr", default="0.0.0.0", help="address to bind (0.0.0.0)")
    p.add_argument("-v", "--verify", action="store_true",
                   help="check every byte against the pattern stream")
    p.add_argument("--stream-id", default="sport",
                   help="pattern stream id: a number, or 'sport' for the peer's source port "
                        "(what the NIC generator uses; default)")
    p.add_argument("--no-hash", dest="hash", action="store_false",
                   help="skip the per-connection SHA-256 (benchmarks: -v already reads "
                        "every byte; the hash would dominate the cost)")
    p.add_argument("-n", "--connections", type=int, default=0,
                   help="serve this many connections, then exit (0: until SIGTERM)")
    p.add_argument("--json", dest="json_path", help="write a JSON summary here ('-': stdout)")
    p.add_argument("-o", "--output", metavar="FILE",
                   help="write the stream received to FILE ('-': stdout); with -n 1 FILE "
                        "itself, else one file per connection: FILE.N, or FILE with '{n}' "
                        "replaced by N (N = 1, 2, ... in accept order); '-' needs -n 1")
    p.add_argument("--seconds", type=float, default=0.0, help="give up after this long")
    p.add_argument(*(("-q", "--quiet") if quiet_short else ("--quiet",)), action="store_true",
                   help="no per-connection lines")
    p.add_argument("--rundir", help=f"run directory (default ${S.ENV_RUNDIR}, else the run "
                                    f"named by ${S.ENV_RUN}, else the only run that is up)")
    p.add_argument("--run", help="run id, to skip reading it from the run directory's manifest")
    p.add_argument("--tag", default="", help="zcrx:<run_id>:<role> (set by the launcher)")


def check_output(p: argparse.ArgumentParser, a: argparse.Namespace) -> str | None:
    """``-o``: refuse stdout unless exactly one connection is served, and beside ``--json -``."""
    out: str | None = a.output
    if out == STDOUT:
        if a.connections != 1:
            p.error("-o - needs -n 1 (several streams would interleave on stdout); "
                    "use -o FILE for one file per connection")
        if a.json_path == STDOUT:
            p.error("-o - and --json - cannot both use stdout")
    elif out is not None and not out:
        p.error("-o needs a file name (or '-')")
    return out


def output_path(template: str, index: int, single: bool) -> str:
    """Where connection ``index`` (from 1) is written for ``-o template``."""
    if "{n}" in template:
        return template.replace("{n}", str(index))
    return template if single else f"{template}.{index}"


def open_output(template: str | None, index: int, connections: int) -> IO[bytes] | None:
    """The file connection ``index`` writes to (stdout's bytes for ``-``), or None."""
    if template is None:
        return None
    if template == STDOUT:
        return sys.stdout.buffer
    return open(output_path(template, index, connections == 1), "wb")


def close_output(f: IO[bytes] | None) -> None:
    """Close a connection's output (stdout is only flushed)."""
    if f is None:
        return
    if f is sys.stdout.buffer:
        f.flush()
    else:
        f.close()


def parse_stream_id(p: argparse.ArgumentParser, value: str) -> int | None:
    """``--stream-id``: None for 'sport' (the peer's source port), else a number >= 0."""
    if value == "sport":
        return None
    try:
        stream = int(value)
    except ValueError:
        p.error("--stream-id takes a number or 'sport'")
    if stream < 0:
        p.error("--stream-id must be >= 0")
    return stream


def serve(prog: str, make: Callable[[S.Kernel, threading.Event, IO[str] | None], Server], *,
          rundir: str | None, run: str | None, json_path: str | None,
          kernel: S.Kernel | None = None, stop: threading.Event | None = None,
          output: str | None = None) -> int:
    """Attach to the kernel, run the server until done or SIGTERM/SIGINT, write the
    summary, and return the exit code (2 when there is no run to join, with what to set;
    3 when the kernel cannot be reached or goes away: every later call would fail the
    same way).  ``make`` gets the log stream: stderr when the summary or the received
    stream goes to stdout (``--json -``, ``-o -``), else None (stdout)."""
    heap.tune()  # batch temporaries off mmap (shared/heap.py)
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        signal.signal(signal.SIGINT, lambda *_: stop.set())
    own = kernel is None
    try:
        k = kernel if kernel is not None else S.Kernel(rundir, run=run, name=prog)
        k.attach()
    except S.RunNotFound as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ZcrxError as exc:
        print(f"{prog}: cannot reach the kernel: {exc}", file=sys.stderr)
        return EXIT_SETUP_FAILED
    server = make(k, stop, sys.stderr if STDOUT in (json_path, output) else None)
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


# -- the accept side every sample server shares ------------------------------------------------

KIND_ACCEPT = 1
KIND_CLOSE = 3


def user_data(kind: int, fd: int) -> int:
    """Request tag in ``user_data``: the fd above the low byte, the request kind in it."""
    return (fd << 8) | kind


class AcceptingServer:
    """Multishot accept on ``lfd`` until ``opts.connections`` peers came, then stop listening.

    Subclasses set ``ring`` and ``lfd`` when they start, and implement
    :meth:`open_conn`, which receives each accepted socket (fd, peer, pattern stream id)
    and arms its receive.  ``opts`` needs ``connections``, ``stream_id`` and ``quiet``.
    """

    ring: L.Ring

    def __init__(self, kernel: S.Kernel, opts: Any, stop: threading.Event | None = None,
                 log: Any = None) -> None:
        self.k = kernel
        self.opts = opts
        self.stop = stop or threading.Event()
        self.log = log if log is not None else sys.stdout
        self.accepted = 0
        self.lfd = -1
        self.errors: list[str] = []

    def say(self, text: str) -> None:
        if not self.opts.quiet:
            print(text, file=self.log, flush=True)

    def _sqe(self) -> Any:
        sqe = L.io_uring_get_sqe(self.ring)
        if sqe is None:
            L.io_uring_submit(self.ring)
            sqe = L.io_uring_get_sqe(self.ring)
        assert sqe is not None
        return sqe

    def arm_accept(self) -> None:
        sqe = self._sqe()
        L.io_uring_prep_multishot_accept(sqe, self.lfd)
        L.io_uring_sqe_set_data64(sqe, user_data(KIND_ACCEPT, self.lfd))

    def open_conn(self, fd: int, peer: tuple[str, int], stream: int,
                  info: Sequence[dict[str, Any]] = ()) -> None:
        """Start serving accepted ``fd``; ``info``: the replies of :meth:`accept_calls`."""
        raise NotImplementedError

    def accepted_total(self) -> int:
        """Connections accepted towards ``-n``: this server's (a worker of several counts
        everyone's)."""
        return self.accepted

    def accept_calls(self, fd: int) -> list[tuple[str, dict[str, Any]]]:
        """Syscalls a new connection needs before :meth:`open_conn` (after its
        ``getpeername``); their replies come as ``info``."""
        return []

    def on_accept(self, res: int, flags: int) -> None:
        self.on_accepts([(res, flags)])

    def on_accepts(self, cqes: Sequence[tuple[int, int]]) -> None:
        """The ACCEPT completions ``(res, flags)`` of one CQ batch, in order.  The syscalls
        every new connection needs (``getpeername`` and :meth:`accept_calls`) go to the
        kernel in one pipelined round trip for the whole batch: 64 connections arriving
        together used to wait for two round trips each, one after the other, before any of
        them was armed."""
        fds = [r for r, _ in cqes if r >= 0]
        per = [[("getpeername", {"fd": fd}), *self.accept_calls(fd)] for fd in fds]
        flat = [c for calls in per for c in calls]
        it = iter([m.body for m in all_ok(self.k.syscall_many(flat))])
        infos = iter([[next(it) for _ in calls] for calls in per])
        rearm = False
        for res, flags in cqes:
            if not flags & abi.IORING_CQE_F_MORE:
                rearm = True
            if res < 0:
                # -ECANCELED, or any error once we closed the listener on purpose, is expected.
                if res != -errno.ECANCELED and self.lfd >= 0:
                    self.errors.append(f"accept: {errno.errorcode.get(-res, res)}")
                continue
            mine = next(infos)
            self.accepted += 1
            peer = (str(mine[0]["addr"]), int(mine[0]["port"]))
            stream = self.opts.stream_id if self.opts.stream_id is not None else peer[1]
            self.open_conn(res, peer, stream, mine[1:])
            n = self.opts.connections
            if n and self.accepted_total() >= n and self.lfd >= 0:
                self.k.close_fd(self.lfd)  # enough: stop listening (ends the multishot accept)
                self.lfd = -1
        if rearm and not self.stop.is_set() and self.lfd >= 0:
            self.arm_accept()
