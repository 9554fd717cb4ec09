"""How an app finds its run: one variable, or the only run that is up; else one clear line.

Runs are faked here as run directories with a manifest, as the launcher writes them; a run is
"up" when its manifest's kernel entry is a live process (this test process stands in for it).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import psutil
import pytest

from app_proc import syscall as S
from shared.rundir import list_runs, live_process, read_run, start_ticks


def fake_run(base: Path, name: str, *, up: bool = True) -> tuple[Path, str]:
    """A run directory ``base/name`` whose manifest says the run id and the kernel's pid."""
    rundir = base / name
    rundir.mkdir(parents=True)
    run_id = f"{name}-c0ffee"
    me = psutil.Process()
    kernel = {"role": "kernel", "pid": me.pid if up else 2 ** 22 + 1,
              "start_ticks": start_ticks(me.pid), "argv": [], "log": ""}
    manifest = {"name": name, "run_id": run_id, "rundir": str(rundir), "created": 0.0,
                "launcher_pid": me.pid, "config": {}, "procs": {"kernel": kernel}}
    (rundir / "manifest.json").write_text(json.dumps(manifest))
    return rundir, run_id


class Nowhere:
    """A transport that must not be used (the tests only look at what Kernel found)."""

    def request(self, *a: Any, **k: Any) -> Any:
        raise AssertionError("no syscall expected")

    def close(self) -> None:
        pass


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty runs directory and no run variable set."""
    base = tmp_path / "runs"
    base.mkdir()
    monkeypatch.setenv("ZCRX_RUNS_DIR", str(base))
    monkeypatch.delenv("ZCRX_RUN", raising=False)
    monkeypatch.delenv("ZCRX_RUNDIR", raising=False)
    return base


def one_line(exc: pytest.ExceptionInfo[S.RunNotFound]) -> str:
    text = str(exc.value)
    assert "\n" not in text and "[E" not in text  # one line, no errno puzzle
    return text


def test_the_run_id_comes_from_the_manifest_not_the_directory_name(env: Path,
                                                                    monkeypatch) -> None:
    rundir, run_id = fake_run(env, "lab")
    monkeypatch.setenv("ZCRX_RUNDIR", str(rundir))
    assert S.locate_run() == (rundir, run_id)
    k = S.Kernel(transport=Nowhere())
    assert k.run == run_id != rundir.name and k.rundir == rundir
    k.close()


def test_zcrx_run_names_a_run_under_the_runs_dir(env: Path, monkeypatch) -> None:
    fake_run(env, "other")
    rundir, run_id = fake_run(env, "lab")
    monkeypatch.setenv("ZCRX_RUN", "lab")
    assert S.locate_run() == (rundir, run_id)
    monkeypatch.setenv("ZCRX_RUN", run_id)  # a run id (what the launcher exported) too
    assert S.locate_run() == (rundir, run_id)
    monkeypatch.setenv("ZCRX_RUN", "nope")
    with pytest.raises(S.RunNotFound) as e:
        S.locate_run()
    assert "ZCRX_RUN=nope: no such run" in one_line(e) and "runs up: lab, other" in str(e.value)


def test_with_no_variable_the_only_run_up_is_used(env: Path) -> None:
    with pytest.raises(S.RunNotFound) as e:
        S.locate_run()
    assert "no run is up" in one_line(e) and "ZCRX_RUNDIR" in str(e.value)
    fake_run(env, "down", up=False)
    rundir, run_id = fake_run(env, "lab")
    assert S.locate_run() == (rundir, run_id)
    fake_run(env, "lab2")
    with pytest.raises(S.RunNotFound) as e:
        S.locate_run()
    assert "2 runs are up (lab, lab2): set ZCRX_RUN" in one_line(e)
    assert [r.name for r in list_runs(env)] == ["down", "lab", "lab2"]


def test_a_wrong_or_stopped_run_says_what_to_set(env: Path, monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ZCRX_RUNDIR", str(tmp_path / "missing"))
    with pytest.raises(S.RunNotFound) as e:
        S.Kernel(transport=Nowhere())
    assert f"ZCRX_RUNDIR={tmp_path / 'missing'}: no such directory; set ZCRX_RUNDIR" \
        in one_line(e)
    monkeypatch.setenv("ZCRX_RUNDIR", str(tmp_path))  # a directory, but not a run's
    with pytest.raises(S.RunNotFound) as e:
        S.locate_run()
    assert "no run manifest there" in one_line(e)
    rundir, _ = fake_run(env, "old", up=False)
    monkeypatch.setenv("ZCRX_RUNDIR", str(rundir))
    with pytest.raises(S.RunNotFound) as e:
        S.locate_run()
    assert "run 'old'" in one_line(e) and "is not up" in str(e.value)
    assert "zcrx up --name old" in str(e.value)
    rundir, _ = fake_run(env, "lab")
    monkeypatch.setenv("ZCRX_RUNDIR", str(rundir))
    monkeypatch.setenv("ZCRX_RUN", "old")  # two variables naming two runs
    with pytest.raises(S.RunNotFound) as e:
        S.locate_run()
    assert "ZCRX_RUN=old is not the run in ZCRX_RUNDIR" in one_line(e)


def test_explicit_run_id_and_rundir_skip_the_manifest(env: Path, tmp_path: Path) -> None:
    k = S.Kernel(tmp_path, run="t-1234", transport=Nowhere())
    assert (k.run, k.rundir) == ("t-1234", tmp_path)
    k.close()
    with pytest.raises(S.RunNotFound, match="no run directory for run 't-1234'"):
        S.Kernel(run="t-1234")


def test_read_run_tolerates_damaged_manifests(tmp_path: Path) -> None:
    assert read_run(tmp_path / "none") is None
    (tmp_path / "manifest.json").write_text("{not json")
    assert read_run(tmp_path) is None
    (tmp_path / "manifest.json").write_text(json.dumps({"name": "x"}))
    assert read_run(tmp_path) is None
    (tmp_path / "manifest.json").write_text(json.dumps({"run_id": "x-1", "procs": {
        "kernel": {"pid": os.getpid(), "start_ticks": 0}}}))
    info = read_run(tmp_path)
    assert info is not None and info.run_id == "x-1" and info.name == tmp_path.name
    assert not info.up  # the pid is alive, but it started at another time: not the kernel


def test_a_process_is_named_by_its_start_in_ticks_not_by_the_wall_clock(
        tmp_path: Path, monkeypatch) -> None:
    """CI once saw a live kernel taken for dead (and left running by the teardown that
    believed it): psutil's create_time adds the boot time, which /proc/stat gives in whole
    seconds from the wall clock, so a slewed clock moved every start by a second.  A run's
    processes are named by pid and start ticks, which no clock change moves."""
    import psutil._pslinux as pl

    rundir, _ = fake_run(tmp_path, "clock")
    info = read_run(rundir)
    assert info is not None and info.up
    real = pl.boot_time
    monkeypatch.setattr(pl, "boot_time", lambda: real() + 1.0)  # btime ticked over
    assert info.up
    me = os.getpid()
    assert live_process(me, start_ticks(me)) is not None
    assert live_process(me, start_ticks(me) + 1) is None  # another start: a reused pid


def test_start_ticks_reads_past_a_command_name_with_spaces_and_parens(tmp_path: Path) -> None:
    import subprocess
    import sys

    prog = tmp_path / "a) b (c"
    prog.symlink_to(sys.executable)
    p = subprocess.Popen([str(prog), "-c", "import sys; sys.stdin.read()"],
                         stdin=subprocess.PIPE)
    try:
        ticks = start_ticks(p.pid)
        assert ticks == start_ticks(p.pid) and ticks >= start_ticks(os.getpid())
        assert live_process(p.pid, ticks) is not None
    finally:
        p.communicate(b"", timeout=10)
    assert live_process(p.pid, ticks) is None  # exited and reaped
    with pytest.raises(ProcessLookupError):
        start_ticks(p.pid)
