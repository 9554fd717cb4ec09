"""Test-wide guards.

Every test runs under two checks that a user of the emulator would make by hand:
no child process of the test runner survives the test, and no ``/dev/shm``
segment of the emulator (``zcrx.*``) created during the test is left behind.
A test that leaks fails, and the leak is then removed so that one failure does
not cascade into the next test.  Time bounds come from pytest-timeout (see
``[tool.pytest.ini_options]``); heavy tests set their own ``@pytest.mark.timeout``.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import secrets
import sys
import time
from collections.abc import Iterator
from typing import Any

import psutil
import pytest

SHM_DIR = "/dev/shm"
SHM_PREFIX = "zcrx."


def _zcrx_segments() -> set[str]:
    try:
        return {n for n in os.listdir(SHM_DIR) if n.startswith(SHM_PREFIX)}
    except FileNotFoundError:
        return set()


def _children() -> list[psutil.Process]:
    """Live descendants.  An exited child that is only waiting to be reaped (a zombie:
    the in-process CLI is its parent here, where a real `zcrx` would have exited and
    left it to init) is reaped, not counted: it holds no memory, segment or socket."""
    try:
        kids = psutil.Process().children(recursive=True)
    except psutil.Error:
        return []
    live = []
    for k in kids:
        try:
            if k.status() == psutil.STATUS_ZOMBIE:
                with contextlib.suppress(ChildProcessError, OSError):
                    os.waitpid(k.pid, os.WNOHANG)
                continue
        except psutil.Error:
            continue
        live.append(k)
    return live


@pytest.fixture(autouse=True)
def _stack_dump_near_own_timeout(request: pytest.FixtureRequest) -> None:
    """A test with its own, longer ``timeout`` mark gets its stack dump (ini
    ``faulthandler_timeout``) shortly before that timeout, not at the default point while it
    still runs: dumping every thread of a busy run (the 2-minute soak) at 100 s crashed the
    whole session once (faulthandler reads other threads' frames while they change)."""
    mark = request.node.get_closest_marker("timeout")
    dump_at = float(request.config.getini("faulthandler_timeout") or 0)
    if mark is None or not mark.args or not dump_at or float(mark.args[0]) <= dump_at:
        return
    # re-arming replaces pytest's timer; pytest cancels it after the test as usual
    faulthandler.dump_traceback_later(float(mark.args[0]) - 20, file=sys.__stderr__)


@pytest.fixture(autouse=True)
def no_leaks(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail the test if it leaves a child process or a zcrx shm segment behind."""
    before_shm = _zcrx_segments()
    before_pids = {p.pid for p in _children()}
    yield
    deadline = time.monotonic() + 5.0
    while True:
        kids = [p for p in _children() if p.pid not in before_pids]
        leaked_shm = _zcrx_segments() - before_shm
        if (not kids and not leaked_shm) or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    for k in kids:
        try:
            k.kill()
            k.wait(2)
        except psutil.Error:
            pass
    for name in leaked_shm:
        try:
            os.unlink(os.path.join(SHM_DIR, name))
        except FileNotFoundError:
            pass
    problems = []
    if kids:
        problems.append("child processes left running: "
                        + ", ".join(f"{k.pid}" for k in kids))
    if leaked_shm:
        problems.append("/dev/shm segments left behind: " + ", ".join(sorted(leaked_shm)))
    if problems:
        pytest.fail("leak check: " + "; ".join(problems), pytrace=False)


@pytest.fixture
def run_id() -> str:
    """A fresh run id, as the launcher would make one: ``<name>-<token>``."""
    return f"t-{secrets.token_hex(4)}"


@pytest.fixture
def kt(run_id: str, tmp_path: Any, request: pytest.FixtureRequest) -> Iterator[Any]:
    """A real kernel (fake NIC) serving syscalls in a thread (``test_zcrx.KernelThread``),
    acting as the Linux release of ``request.param`` when parametrized indirectly."""
    from test_zcrx import kernel_fixture

    from shared import abi

    yield from kernel_fixture(run_id, tmp_path, getattr(request, "param", abi.LINUX_VERSION))


@pytest.fixture
def app(kt: Any, run_id: str, tmp_path: Any) -> Iterator[Any]:
    """An app attached to ``kt`` with the launcher's CAP_NET_ADMIN grant, closed at the end."""
    from test_zcrx import app_fixture

    yield from app_fixture(run_id, tmp_path)
