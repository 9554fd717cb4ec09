"""Helpers for end-to-end tests: a real run (NIC + kernel processes) driven by the CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from click.testing import CliRunner, Result

from launch.cli import main
from launch.run import Run
from launch.run import runs_dir as launch_runs_dir


def zcrx(*args: str, ok: bool = True) -> Result:
    """Run one `zcrx` command in-process, as a user would type it."""
    res = CliRunner().invoke(main, list(args), catch_exceptions=False)
    if ok:
        assert res.exit_code == 0, (f"zcrx {' '.join(args)} failed:\n{res.output}"
                                    f"{_run_logs(args)}")
    return res


def _run_logs(args: tuple[str, ...]) -> str:
    """The tails of the role logs of the run a failed command named (``--name N``), so a
    failure in CI says what the roles said."""
    if "--name" not in args:
        return ""
    name = args[args.index("--name") + 1]
    d = launch_runs_dir() / name
    logs = sorted(d.glob("*.log")) if d.is_dir() else []
    return "".join(f"\n--- {p.name} ---\n{p.read_text(errors='replace')[-1500:]}"
                   for p in logs)


@contextmanager
def runs_dir(mode: int = 0o700) -> Iterator[Path]:
    """A fresh, short ZCRX_RUNS_DIR (ipc socket paths must stay under 107 bytes); private
    unless ``mode`` says otherwise (0o755: apps under other uids reach their runs)."""
    base = Path(tempfile.mkdtemp(prefix="zr", dir="/tmp"))
    os.chmod(base, mode)
    old = os.environ.get("ZCRX_RUNS_DIR")
    os.environ["ZCRX_RUNS_DIR"] = str(base)
    try:
        yield base
    finally:
        if old is None:
            os.environ.pop("ZCRX_RUNS_DIR", None)
        else:
            os.environ["ZCRX_RUNS_DIR"] = old
        shutil.rmtree(base, ignore_errors=True)


@contextmanager
def topology(name: str, *up_args: str, runs_mode: int = 0o700) -> Iterator[Run]:
    """`zcrx up` a run; `zcrx down` it afterwards whatever happens (cleanup as fallback).
    ``runs_mode``: see :func:`runs_dir`."""
    with runs_dir(runs_mode):
        zcrx("up", "--name", name, *up_args)
        try:
            yield Run.open(name)
        finally:
            res = zcrx("down", "--name", name, ok=False)
            if res.exit_code != 0:
                zcrx("cleanup", "--name", name, ok=False)


def wait_app(name: str, role: str, timeout: float) -> None:
    """Wait until a detached app of the run has exited."""
    deadline = time.monotonic() + timeout
    while True:
        entry = Run.open(name).m.procs[role]
        if entry.process() is None:
            return
        if time.monotonic() > deadline:
            run = Run.open(name)
            logs = "\n".join(f"--- {r} ---\n{Path(e.log).read_text()[-2000:]}"
                             for r, e in run.m.procs.items() if e.log and Path(e.log).is_file())
            counters = zcrx("ethtool", "--name", name, "-S", "eth0", ok=False).output
            raise AssertionError(f"{role} still running after {timeout} s\n{logs}\n"
                                 f"{counters[-3000:]}")
        time.sleep(0.05)


def stats(name: str) -> dict[str, Any]:
    return json.loads(zcrx("stats", "--name", name, "--json").output)


def nic_stats(name: str, dev: str = "eth0") -> dict[str, int]:
    """The NIC's ethtool -S counters, parsed from the CLI output."""
    out = zcrx("ethtool", "--name", name, "-S", dev).output
    counters = {}
    for line in out.splitlines()[1:]:
        key, _, val = line.strip().partition(": ")
        if val.strip().lstrip("-").isdigit():
            counters[key] = int(val)
    return counters


def status(name: str) -> dict[str, Any]:
    """`zcrx status --json`, or {} while no kernel answers (one is being restarted)."""
    res = zcrx("status", "--name", name, "--json", ok=False)
    try:
        st = json.loads(res.output) if res.exit_code == 0 else {}
    except json.JSONDecodeError:
        return {}
    return st if isinstance(st, dict) else {}


def nic_reprobed(name: str) -> bool:
    """The run's kernel saw its NIC die and probed the new one (not just "up" from before)."""
    st = status(name)
    reprobes = st.get("nic_reprobes", 0)
    return st.get("nic") == "up" and isinstance(reprobes, int) and reprobes >= 1


@contextmanager
def foreground_up(name: str, *up_args: str) -> Iterator[subprocess.Popen[str]]:
    """`zcrx up --name NAME --foreground UP_ARGS` as a process, yielded once it said the
    run is up (its output: stdout); killed and the run cleaned up afterwards whatever
    happens.  Call inside :func:`runs_dir`."""
    up = subprocess.Popen(
        [sys.executable, "-m", "launch", "up", "--name", name, "--foreground", *up_args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        assert up.stdout is not None
        while "is up" not in (line := up.stdout.readline()):
            assert line, "zcrx up exited before the run was up"
        yield up
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
        if up.stdout is not None:
            up.stdout.close()
        zcrx("cleanup", "--name", name, ok=False)
