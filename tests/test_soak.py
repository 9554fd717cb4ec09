"""``zcrx soak`` (issue 11): minutes of mixed traffic with apps coming and going and random app
kills, and whether the NIC's and the kernel's RSS, fds and segments stay flat.

The verdict is checked on synthetic samples; the CI soak is the real thing for 2 minutes
(about 40 rounds here: 80 app starts, a dozen kills).  Its RSS bound is looser than the
command's default (1 MiB/min): a 2-minute soak is mostly the kernel's heap warming up (the
30-minute figures are in the README's Faults section); fds and segments must be exactly flat
and no app may leave a task, process or segment behind at idle.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from launch.soak import BOUNDS, plot, slope_per_min, verdict
from tests.e2e import runs_dir, zcrx


def _samples(rss_nic: list[float], fds: list[int] | None = None,
             app_segments: int = 0) -> list[dict[str, Any]]:
    out = []
    for i, r in enumerate(rss_nic):
        role = {"rss": int(r * 2**20), "fds": (fds or [24] * len(rss_nic))[i],
                "segments": 1, "procs": 1}
        out.append({"t_s": 30.0 * i, "phase": "idle", "round": i, "nic": role,
                    "kernel": dict(role), "tasks": 0,
                    "apps": {"rss": 0, "fds": 0, "segments": app_segments, "procs": 0}})
        out.append({"t_s": 30.0 * i + 10, "phase": "busy", "round": i, "nic": role,
                    "kernel": dict(role), "tasks": 2,
                    "apps": {"rss": 150 * 2**20, "fds": 60, "segments": 5, "procs": 2}})
    return out


def test_slope_and_verdict() -> None:
    assert slope_per_min([0, 60, 120], [10, 11, 12]) == pytest.approx(1.0)
    assert slope_per_min([5], [1]) == 0.0
    flat = verdict(_samples([50, 50.2, 50.1, 50.2, 50.1, 50.2, 50.2, 50.1]), 4)
    assert flat["flat"], flat
    assert flat["warmup_s"] == 60 and flat["samples_used"] == 6
    assert flat["growth"]["apps"]["rss_per_app_mib_first"] == 75.0
    grows = verdict(_samples([50, 52, 54, 56, 58, 60, 62, 64]), 4)
    assert not grows["flat"]
    assert grows["growth"]["nic"]["rss_mib_per_min"] == pytest.approx(4.0)
    assert any("nic RSS grows" in p for p in grows["problems"])
    assert verdict(_samples([50] * 8), 4, {**BOUNDS, "rss_mib_per_min": 5})["flat"]
    assert verdict(_samples([50] * 8, [30, 31, 24, 25, 26, 24, 25, 26]), 4)["flat"]  # +2
    fds = verdict(_samples([50] * 8, [24, 24, 24, 24, 25, 26, 27, 28]), 4)
    assert any("nic fds 24 -> 28" in p for p in fds["problems"]), fds["problems"]
    left = verdict(_samples([50] * 8, app_segments=1), 4)
    assert any("left" in p for p in left["problems"])


def test_plot_writes_a_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "soak.png"
    res = {"samples": _samples([50, 51, 50, 51]), "rounds": 4, "seed": 0,
           "verdict": {"flat": True}}
    plot(res, str(out))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


#: RSS growth per minute the 2-minute soak tolerates.  Two minutes cannot tell a leak from
#: the kernel heap settling: with 30 s of warm-up this soak measured 3.7 MiB/min (before the
#: TX path) and 4.2-4.4 (after), while 30-minute soaks of both measured +0.1 to +0.3 MiB/min
#: after their warm-up (README).  The bound catches a gross leak; flatness is the long soak's.
SHORT_SOAK_MAX_GROWTH = "6"


@pytest.mark.timeout(330)
def test_a_two_minute_soak_is_flat(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    with runs_dir():
        res = zcrx("soak", "--minutes", "2", "--seed", "3", "--check", "--max-rss-growth",
                   SHORT_SOAK_MAX_GROWTH, "--json-out", str(out), ok=False)
    print(res.output)
    rep = json.loads(out.read_text())
    assert res.exit_code == 0, res.output
    assert rep["violations"] == [] and rep["verdict"]["flat"], rep["verdict"]
    assert rep["rounds"] >= 10 and rep["kills"] >= 3, (rep["rounds"], rep["kills"])
    g = rep["verdict"]["growth"]
    for role in ("nic", "kernel"):
        assert g[role]["segments_first"] == g[role]["segments_last"], g
    assert g["apps"]["idle_samples_with_leftovers"] == 0
    idle = [s for s in rep["samples"] if s["phase"] == "idle"]
    assert all(s["tasks"] == 0 and s["apps"]["procs"] == 0 for s in idle)
    assert "nic: RSS" in res.output and "kernel: RSS" in res.output
