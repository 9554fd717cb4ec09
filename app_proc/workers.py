"""Worker processes of one server (``zcrx-server -w N``): fork, coordinate, wait, merge.

The parent parses its arguments, creates the coordination page, forks N workers and does
nothing else with the kernel: each worker is its own app process (own pid, pidfd, task,
SO_PEERCRED identity, regions, ring), exactly as if it had been started alone, and inherits
the launcher's CAP_NET_ADMIN grant as a descendant of the granted pid.

Coordination (:class:`Coord`): one anonymous shared page, created by the parent before the
fork and private to this server (not a ``/dev/shm`` segment, nothing to unlink): the listen
turn (worker w calls ``listen()`` only after worker w-1 did, so a worker's index in the
port's SO_REUSEPORT group is w, which is what the BPF program returns), each worker's count of
accepted and finished connections (``-n`` counts over all workers), and a flag the parent
raises when a worker died (the survivors then stop waiting for connections that would have
been its).  Each counter has one writer.

The parent waits for every worker, says it is ready (``$ZCRX_NOTIFY``) once all of them
listen, forwards SIGTERM/SIGINT to them, reads each worker's JSON summary (a file in a private
temporary directory, removed afterwards) and merges them (:func:`merge`).  Its exit status is
the worst of the workers' (a worker killed by a signal counts as a failed check: 1).  A worker
asks the OS for SIGTERM when the parent dies (``PR_SET_PDEATHSIG``), so no worker outlives it.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from shared.proc import NOTIFY_ENV, notify_ready

EXIT_CHECK_FAILED = 1
EXIT_SETUP_FAILED = 3
_PR_SET_PDEATHSIG = 1
_TURN, _DEAD, _HDR = 0, 1, 2


class Coord:
    """The workers' shared page: ``[turn, dead, accepted[N], finished[N]]`` (int64)."""

    def __init__(self, workers: int) -> None:
        self.n = workers
        self._map = mmap.mmap(-1, max(mmap.PAGESIZE, 8 * (_HDR + 2 * workers)))
        self.words: np.ndarray = np.frombuffer(self._map, dtype=np.int64)

    @property
    def turn(self) -> int:
        return int(self.words[_TURN])

    def pass_turn(self, worker: int) -> None:
        self.words[_TURN] = worker + 1

    @property
    def dead(self) -> bool:
        return bool(self.words[_DEAD])

    def set_dead(self) -> None:
        self.words[_DEAD] = 1

    def set_accepted(self, worker: int, n: int) -> None:
        self.words[_HDR + worker] = n

    def accepted(self) -> int:
        return int(self.words[_HDR:_HDR + self.n].sum())

    def wait_turn(self, worker: int, timeout: float) -> bool:
        """Until worker ``worker`` may listen (False: timed out, or a worker died)."""
        deadline = time.monotonic() + timeout
        delay = 0.0005
        while self.turn < worker:
            if self.dead or time.monotonic() > deadline:
                return False
            time.sleep(delay)
            delay = min(delay * 2, 0.02)
        return True


def _child_setup(parent: int) -> None:
    """In a worker right after the fork: default signals until the server installs its own,
    SIGTERM when the parent dies, never announce readiness (the parent does)."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    os.environ.pop(NOTIFY_ENV, None)
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the parent died before prctl
        os._exit(EXIT_SETUP_FAILED)


def run(n: int, work: Callable[[int, Coord, str], int], *, what: str, ready_timeout: float,
        json_path: str | None, log: Any = None) -> tuple[int, dict[str, Any]]:
    """Fork ``n`` workers running ``work(index, coord, json_path)`` (its return value is the
    worker's exit status), wait for them all and merge their summaries.  Returns the exit
    status and the merged summary (also written to ``json_path`` by the caller)."""
    log = log if log is not None else sys.stdout
    coord = Coord(n)
    tmp = Path(tempfile.mkdtemp(prefix="zcrx-workers."))
    pids: list[int] = []
    me = os.getpid()
    stopping: list[bool] = []

    def forward(signum: int, _frame: Any) -> None:
        stopping.append(True)
        coord.set_dead()  # a worker still waiting for its turn to listen gives up
        for pid in pids:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        for i in range(n):
            if stopping:
                break
            pid = os.fork()
            if pid == 0:  # the worker
                code = EXIT_SETUP_FAILED
                try:
                    _child_setup(me)
                    code = work(i, coord, str(tmp / f"w{i}.json"))
                finally:
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(code)
            pids.append(pid)
        status: dict[int, int] = {}  # pid -> exit status (-signal when killed)
        _wait_ready(coord, pids, status, ready_timeout, forward)
        if coord.turn >= n and not coord.dead:
            notify_ready(f"{what}; {n} workers")
            print(f"zcrx_server: {n} workers listening (pids "
                  f"{', '.join(map(str, pids))})", file=log, flush=True)
        while len(status) < len(pids):
            pid, st = os.waitpid(-1, 0)
            if pid in pids:
                _reaped(coord, status, pid, st)
        return _merge_all(tmp, pids, status)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        shutil.rmtree(tmp, ignore_errors=True)


def _reaped(coord: Coord, status: dict[int, int], pid: int, st: int) -> None:
    code = os.waitstatus_to_exitcode(st)
    status[pid] = code
    if code < 0 or code == EXIT_SETUP_FAILED:
        coord.set_dead()  # its connections will not come: the others stop waiting for them


def _wait_ready(coord: Coord, pids: list[int], status: dict[int, int], timeout: float,
                stop_all: Callable[[int, Any], None]) -> None:
    """Until every worker listens; a worker gone first, or the timeout, stops the rest."""
    deadline = time.monotonic() + timeout
    while coord.turn < len(pids) and not coord.dead:
        pid, st = os.waitpid(-1, os.WNOHANG)
        if pid in pids:
            _reaped(coord, status, pid, st)
            coord.set_dead()
            stop_all(signal.SIGTERM, None)
            return
        if time.monotonic() > deadline:
            coord.set_dead()
            stop_all(signal.SIGTERM, None)
            return
        time.sleep(0.005)


def _merge_all(tmp: Path, pids: list[int], status: dict[int, int]) -> tuple[int, dict[str, Any]]:
    reports: list[dict[str, Any] | None] = []
    for i in range(len(pids)):  # fewer than asked if SIGTERM came while forking
        try:
            reports.append(json.loads((tmp / f"w{i}.json").read_text()))
        except (OSError, ValueError):
            reports.append(None)
    codes = [status.get(pid, EXIT_SETUP_FAILED) for pid in pids]
    merged = merge(reports, pids, codes)
    worst = max(((c if c >= 0 else EXIT_CHECK_FAILED) for c in codes), default=0)
    return worst, merged


def merge(reports: list[dict[str, Any] | None], pids: list[int],
          codes: list[int]) -> dict[str, Any]:
    """One summary of several workers' (``None``: the worker left none, e.g. killed).

    Connections, errors and per-queue rows are concatenated (each tagged with its
    ``worker``), byte and CQE counts summed, ``first_ns``/``last_ns`` are the earliest and
    latest (CLOCK_MONOTONIC is one clock for every process), ``copy_fallback`` sums the
    kernel's counters; ``workers`` lists each worker's pid, queues, exit status and verdict.
    """
    conns: list[dict[str, Any]] = []
    errors: list[str] = []
    queues: list[dict[str, Any]] = []
    workers: list[dict[str, Any]] = []
    app = {"read_bytes": 0, "copy_bytes": 0, "data_cqes": 0, "batches": 0, "stray_chunks": 0,
           "hash_staged_bytes": 0}
    fb: dict[str, Any] | None = {"source": "kernel", "count": 0, "bytes": 0, "zc_cqes": 0,
                                 "zc_bytes": 0}
    firsts: list[int] = []
    lasts: list[int] = []
    for i, (rep, pid, code) in enumerate(zip(reports, pids, codes, strict=True)):
        why = (f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit {code}")
        row: dict[str, Any] = {"worker": i, "pid": pid, "exit": code, "ok": False,
                               "queues": [], "connections": 0}
        workers.append(row)
        if code != 0:
            errors.append(f"worker {i} (pid {pid}): {why}")
        if rep is None:
            errors.append(f"worker {i} (pid {pid}) left no summary")
            fb = None
            continue
        row["ok"] = bool(rep.get("ok")) and code == 0
        row["queues"] = [q["queue"] for q in rep.get("queues", [])]
        row["connections"] = len(rep.get("connections", []))
        row["zcrx"] = rep.get("zcrx")
        conns.extend({**c, "worker": i} for c in rep.get("connections", []))
        errors.extend(f"worker {i}: {e}" for e in rep.get("errors", []))
        queues.extend({**q, "worker": i} for q in rep.get("queues", []))
        for key in app:
            app[key] += int((rep.get("app") or {}).get(key, 0))
        if rep.get("first_ns") is not None:
            firsts.append(int(rep["first_ns"]))
        if rep.get("last_ns") is not None:
            lasts.append(int(rep["last_ns"]))
        f = rep.get("copy_fallback")
        if fb is not None and f is not None:
            for key in ("count", "bytes", "zc_cqes", "zc_bytes"):
                fb[key] += int(f[key])
        else:
            fb = None
    queues.sort(key=lambda q: q["queue"])
    total = sum(int(c["bytes"]) for c in conns)
    first = min(firsts) if firsts else None
    last = max(lasts) if lasts else None
    secs = (last - first) / 1e9 if first is not None and last is not None else 0.0
    return {
        "mode": "zcrx", "workers": workers, "connections": conns, "errors": errors,
        "bytes": total, "ok": not errors and all(c["ok"] for c in conns),
        "first_ns": first, "last_ns": last, "seconds": secs,
        "gbps": total / secs / 1e9 if secs > 0 else 0.0, "app": app,
        "zcrx": None, "copy_fallback": fb, "queues": queues,
    }
