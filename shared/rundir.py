"""Reading a run directory without the launcher: where runs live, a manifest, who is up.

The launcher (``launch/``) owns the run directory ``$ZCRX_RUNS_DIR/<name>/`` and writes its
``manifest.json`` (the run's name, its run id, its processes); every other process only reads
it.  Roles never import each other, so an app that must find its run (``app_proc.syscall``)
reads the manifest through this module.  Nothing here writes anything.

The run id (``<name>-<token>``, in the manifest) names every shm segment of the run
(``/zcrx.<run_id>.*``); it is NOT the run directory's base name (that is the run's name).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

#: Environment variable naming the directory that holds every run (one sub-directory each).
ENV_RUNS_DIR = "ZCRX_RUNS_DIR"
DEFAULT_RUNS_DIR = "/tmp/zcrx-runs"
MANIFEST = "manifest.json"

__all__ = [
    "DEFAULT_RUNS_DIR",
    "ENV_RUNS_DIR",
    "MANIFEST",
    "RunInfo",
    "list_runs",
    "live_process",
    "read_run",
    "runs_dir",
    "start_ticks",
]


def runs_dir() -> Path:
    """``$ZCRX_RUNS_DIR``, else ``/tmp/zcrx-runs``."""
    return Path(os.environ.get(ENV_RUNS_DIR) or DEFAULT_RUNS_DIR)


def start_ticks(pid: int) -> int:
    """When ``pid`` started, in clock ticks after boot (``starttime``, field 22 of
    ``/proc/<pid>/stat``).  With the pid it names one process for the life of the boot: unlike
    a wall-clock start time (psutil's ``create_time``, boot time read from ``/proc/stat`` in
    whole seconds plus this), it does not move when the clock is stepped or slewed.  Raises
    ProcessLookupError when there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        raise ProcessLookupError(pid) from None
    # comm (field 2) may hold spaces and parentheses: count fields after its last ')'
    return int(stat[stat.rindex(b")") + 2:].split()[19])


def live_process(pid: int, ticks: int) -> psutil.Process | None:
    """The process ``pid`` if it is the one that started at ``ticks`` (:func:`start_ticks`)
    and has not exited (a zombie has); None otherwise: a pid reused by another process does
    not count."""
    try:
        if start_ticks(pid) != ticks:
            return None
        p = psutil.Process(pid)
        return None if p.status() == psutil.STATUS_ZOMBIE else p
    except (ProcessLookupError, psutil.Error, ValueError, IndexError):
        return None


@dataclass(frozen=True)
class RunInfo:
    """What a reader needs from a run's manifest."""

    name: str
    run_id: str
    rundir: Path
    procs: dict[str, dict[str, Any]]

    def alive(self, role: str) -> bool:
        """True when ``role``'s recorded process still runs (same pid, same start time, not a
        zombie): a pid reused by another process does not count."""
        entry = self.procs.get(role)
        if not isinstance(entry, dict):
            return False
        try:
            return live_process(int(entry["pid"]), int(entry["start_ticks"])) is not None
        except (KeyError, TypeError, ValueError):
            return False

    @property
    def up(self) -> bool:
        """The run can serve syscalls: its kernel process is running."""
        return self.alive("kernel")


def read_run(rundir: str | Path) -> RunInfo | None:
    """The run described by ``<rundir>/manifest.json``; None when there is no readable
    manifest with a run id (no such directory, not a run directory, a damaged file)."""
    path = Path(rundir) / MANIFEST
    try:
        d = json.loads(path.read_text())
        run_id = d["run_id"]
        name = d.get("name") or Path(rundir).name
        procs = d.get("procs") or {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    if not isinstance(run_id, str) or not run_id or not isinstance(procs, dict):
        return None
    return RunInfo(name=str(name), run_id=run_id, rundir=Path(rundir), procs=procs)


def list_runs(base: Path | None = None) -> list[RunInfo]:
    """Every run with a readable manifest under ``base`` (default :func:`runs_dir`), by name."""
    base = runs_dir() if base is None else base
    try:
        dirs = sorted(p for p in base.iterdir() if p.is_dir())
    except OSError:
        return []
    return [r for r in (read_run(d) for d in dirs) if r is not None]
