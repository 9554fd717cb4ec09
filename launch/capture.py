"""The launcher's side of pcap in and pcap out (``zcrx traffic --pcap``, ``zcrx capture``).

The NIC process reads and writes the capture files itself (DESIGN §1: the launcher only
passes paths over the control plane).  Here: checking a replay request before it is sent,
so that a bad file or filter gives one clear line, and running a capture: start it, wait
for its count (or Ctrl-C / SIGTERM), stop it; with ``-w -`` the NIC writes a file in the
run directory that is streamed to stdout as it grows, and removed afterwards.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from shared.errors import Misuse
from shared.nicif import MAX_SNAPLEN

__all__ = ["pcap_request", "run_capture"]

Call = Callable[[str, dict[str, Any]], dict[str, Any]]


def pcap_request(dev: str, path: str, dst: str | None, rewrite: bool,
                 speed: float) -> dict[str, Any]:
    """The ``nic.pcap`` body; :class:`Misuse` (EINVAL/ENOENT) for a file that cannot be a
    capture or a bad ``--dst``."""
    from nic_proc.pcap import parse_dst

    p = Path(path)
    if not p.exists():
        raise Misuse(f"{path}: no such file", 2)
    if not p.is_file():
        raise Misuse(f"{path}: not a regular file", 22)
    if p.stat().st_size == 0:
        raise Misuse(f"{path}: empty file, not a capture", 22)
    if not os.access(p, os.R_OK):
        raise Misuse(f"{path}: not readable", 13)
    if dst:
        parse_dst(dst)
    return {"dev": dev, "path": str(p.resolve()), "dst": dst or "", "rewrite": rewrite,
            "speed": float(speed)}


class _Stop(Exception):
    pass


def _on_term(signum: int, frame: Any) -> None:
    raise _Stop


def run_capture(call: Call, rundir: Path, dev: str, out: str, *, queue: int = -1,
                count: int = 0, snaplen: int = MAX_SNAPLEN, poll_s: float = 0.05) -> dict[str, Any]:
    """Capture until ``count`` frames (0: until SIGINT/SIGTERM or a closed stdout); the
    capture's last status."""
    stream = out == "-"
    path = (rundir / f"capture.{os.getpid()}.pcap") if stream else Path(out).resolve()
    old = signal.signal(signal.SIGTERM, _on_term)
    cid: int | None = None
    pos = 0
    sink = sys.stdout.buffer if stream else None
    status: dict[str, Any] = {"frames": 0}
    try:
        res = call("nic.capture_start", {"dev": dev, "path": str(path), "queue": queue,
                                         "count": count, "snaplen": snaplen})
        cid = int(res["capture"])
        while True:
            status = call("nic.capture_status", {"capture": cid})
            if sink is not None:
                pos = _pump(path, pos, sink)
            if status["done"]:
                break
            time.sleep(poll_s)
    except (KeyboardInterrupt, _Stop, BrokenPipeError):
        pass
    finally:
        signal.signal(signal.SIGTERM, old)
        if cid is not None:
            try:
                status = call("nic.capture_stop", {"capture": cid})
            except Exception:
                pass
        if sink is not None:
            try:
                _pump(path, pos, sink)
            except BrokenPipeError:
                pass
            path.unlink(missing_ok=True)
    return status


def _pump(path: Path, pos: int, sink: Any) -> int:
    """Copy what the capture file gained since ``pos`` to ``sink``; the new position."""
    try:
        with open(path, "rb") as f:
            f.seek(pos)
            data = f.read()
    except FileNotFoundError:
        return pos
    if data:
        sink.write(data)
        sink.flush()
    return pos + len(data)
