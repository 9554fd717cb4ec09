"""The `zcrx` command line, driven as a user drives it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from launch.cli import main
from shared.shm import PAGE_SIZE, Region, list_run_segments, region_name


def test_bench_ring_runs_and_verifies_every_entry(tmp_path: Path) -> None:
    """``--json`` prints JSON instead of the table; ``--json-out FILE`` also writes it."""
    path = tmp_path / "ring.json"
    res = CliRunner().invoke(main, ["bench", "ring", "--seconds", "0.05", "--json",
                                    "--json-out", str(path)])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert json.loads(path.read_text()) == out
    assert out["all_verified"]
    assert {(r["bench"], r["batch"]) for r in out["rows"]} == {
        ("descriptors 16 B", 1), ("descriptors 16 B", 64), ("descriptors 16 B", 512),
        ("payload 4096 B", 64), ("payload 4096 B", 512)}
    assert all(r["entries"] > 0 and r["verified"] for r in out["rows"])
    assert out["copy_gbps"] > 0


def test_cleanup_removes_a_runs_segments_and_is_idempotent(run_id: str) -> None:
    for obj in ("a", "b"):
        Region.create(region_name(run_id, "kernel", obj), PAGE_SIZE).detach()
    runner = CliRunner()
    res = runner.invoke(main, ["cleanup", "--name", run_id])
    assert res.exit_code == 0, res.output
    assert "2 segment(s)" in res.output
    assert list_run_segments(run_id) == []
    res = runner.invoke(main, ["cleanup", "--name", run_id])
    assert res.exit_code == 0 and "0 segment(s)" in res.output


def test_cleanup_usage_errors_are_one_line_not_tracebacks() -> None:
    runner = CliRunner()
    for args in (["cleanup"], ["cleanup", "--name", "x", "--all"], ["cleanup", "--name", "a.b"]):
        res = runner.invoke(main, args)
        assert res.exit_code != 0
        assert "Traceback" not in res.output
        assert res.exception is None or isinstance(res.exception, SystemExit)


def test_commands_without_a_run_fail_with_one_line(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZCRX_RUNS_DIR", str(tmp_path))
    runner = CliRunner()
    for args in (["status"], ["stats"], ["down"], ["ethtool", "-l", "eth0"],
                 ["traffic"], ["status", "--name", "nosuch"]):
        res = runner.invoke(main, args)
        assert res.exit_code == 3, (args, res.output)
        assert "Traceback" not in res.output
        assert len(res.output.strip().splitlines()) == 1, res.output


def test_ethtool_usage_errors_exit_2_before_touching_a_run() -> None:
    res = CliRunner().invoke(main, ["ethtool", "-N", "eth0", "flow-type", "sctp4"])
    assert res.exit_code == 2
    assert len(res.output.strip().splitlines()) == 1


@pytest.mark.timeout(180)
def test_demo_delivers_verified_traffic_on_every_path(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's demo: zero copy, copy path (and netcat when installed), all verified."""
    monkeypatch.setenv("ZCRX_RUNS_DIR", str(tmp_path))
    res = CliRunner().invoke(main, ["demo", "--json", "--flows", "2", "--mib", "4",
                                    "--zc-mib", "16"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["verified"]
    legs = {leg["leg"]: leg for leg in out["legs"]}
    zc = legs["generator -> q3 -> zero copy"]
    assert zc["bytes"] == zc["zero_copy"] == 16 << 20 and zc["copied"] == 0
    cp = legs["generator -> RSS -> copy"]
    assert cp["bytes"] == cp["copied"] == 2 * (4 << 20)
    assert out["bindings"][3] == "io-uring"
    assert out["zcrx"]["destroyed"] == out["zcrx"]["registered"] == 1
    # zcrx-server -E --grow: the events it saw and the areas it ended with (>= 1; more when
    # the queue starved and ALLOC_FAIL fired)
    z = out["zcrx"]
    assert z["areas"] >= 1 and z["area_bytes"] >= 4 << 20
    assert (z["areas"] > 1) == (z["events"].get("ALLOC_FAIL", 0) > 0)
    assert out["leftovers_removed"] == []
