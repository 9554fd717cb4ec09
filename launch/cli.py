"""The ``zcrx`` command line.

Exit codes: 0 success; 1 a check failed (data not verified, a target missed
with ``--check``); 2 usage error (click's own); 3 an operation failed (a clear
one-line reason is printed, never a traceback for a user mistake).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from shared.errors import ZcrxError
from shared.shm import list_all_runs, list_run_segments, remove_run_segments

EXIT_CHECK_FAILED = 1
EXIT_FAILED = 3

console = Console(stderr=False)
err_console = Console(stderr=True)


def fail(msg: str, code: int = EXIT_FAILED) -> None:
    err_console.print(f"zcrx: {msg}", highlight=False, markup=False)
    sys.exit(code)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="zcrx-emu", prog_name="zcrx")
def main() -> None:
    """zcrx-emu: an emulation of Linux io_uring zero-copy receive in separate processes.

    The NIC, the kernel and the applications run as separate processes that share
    data only through POSIX shared memory laid out as the io_uring zcrx uapi
    lays it out.
    """


# -- bench ------------------------------------------------------------------------------

@main.group()
def bench() -> None:
    """Benchmarks: each runs its baselines in the same run and reports ratios."""


def _ring_table(result: dict[str, Any]) -> Table:
    t = Table(title="zcrx bench ring (2 processes, one region)")
    for col in ("bench", "batch", "Mentries/s", "GB/s", "x copy", "verified"):
        t.add_column(col, justify="left" if col == "bench" else "right")
    for r in result["rows"]:
        vs = f"{r['vs_copy']:.2f}" if "vs_copy" in r else ""
        t.add_row(r["bench"], str(r["batch"]), f"{r['mpps']:.2f}", f"{r['gbps']:.2f}", vs,
                  "yes" if r["verified"] else "NO")
    t.add_row("numpy copy, 1 process", "", "", f"{result['copy_gbps']:.2f}", "1.00", "")
    return t


@bench.command("ring")
@click.option("--seconds", type=click.FloatRange(0.05, 60), default=0.8, show_default=True,
              help="How long the producer runs for each measurement.")
@click.option("--spin", type=click.IntRange(0), default=2000, show_default=True,
              help="Empty polls before a waiter yields the CPU (then it sleeps).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, writable=True),
              help="Also write the figures as JSON to this file ('-' for stdout).")
@click.option("--check", is_flag=True,
              help="Exit 1 if a target (batch 512 >= 50 Mpps; 4 KiB path >= 0.5 x copy) "
                   "is missed.")
def bench_ring(seconds: float, spin: int, json_path: str | None, check: bool) -> None:
    """Entries/s at batch 1, 64, 512 and the 4 KiB payload path vs numpy copy."""
    from launch.bench_ring import run_ring_bench

    with console.status("running") as status:
        result = run_ring_bench(seconds=seconds, spin=spin,
                                progress=lambda m: status.update(f"running: {m}"))
    if json_path != "-":
        console.print(_ring_table(result))
        for c in result["checks"]:
            mark = "ok" if c["ok"] else "MISSED"
            console.print(f"target {c['target']}: {c['value']:.2f} {mark}", highlight=False)
    if json_path:
        text = json.dumps(result, indent=2)
        if json_path == "-":
            click.echo(text)
        else:
            Path(json_path).write_text(text + "\n")
    if not result["all_verified"]:
        fail("a benchmark did not deliver what was sent (checksum mismatch)",
             EXIT_CHECK_FAILED)
    if check and not all(c["ok"] for c in result["checks"]):
        fail("a target was missed", EXIT_CHECK_FAILED)


# -- cleanup ----------------------------------------------------------------------------

@main.command()
@click.option("--name", "run", help="The run to clean up.")
@click.option("--all", "all_runs", is_flag=True, help="Clean up every run on this machine.")
def cleanup(run: str | None, all_runs: bool) -> None:
    """Remove every shared-memory segment of a run (idempotent, like `mn -c`)."""
    if bool(run) == all_runs:
        fail("give exactly one of --name RUN or --all", 2)
    runs = list_all_runs() if all_runs else [run or ""]
    removed: list[str] = []
    try:
        for r in runs:
            removed += remove_run_segments(r)
    except ZcrxError as e:
        fail(str(e))
    for name in removed:
        console.print(f"removed {name}", highlight=False)
    left = [n for r in runs for n in list_run_segments(r)]
    if left:
        fail(f"could not remove: {', '.join(left)}")
    console.print(f"cleaned {len(runs)} run(s), {len(removed)} segment(s)", highlight=False)


# -- demo -------------------------------------------------------------------------------

@main.command()
@click.option("--seconds", type=click.FloatRange(0.05, 60), default=0.5, show_default=True,
              help="Length of each measurement.")
def demo(seconds: float) -> None:
    """Show the emulator working end to end on this machine.

    Today: the shared ring carrying descriptors and 4 KiB payloads between two
    processes, verified by checksum, next to numpy's copy bandwidth.
    """
    from launch.bench_ring import run_ring_bench

    with console.status("running the ring between two processes") as status:
        result = run_ring_bench(seconds=seconds, batches=(64, 512), payload_batches=(64,),
                                progress=lambda m: status.update(f"running: {m}"))
    console.print(_ring_table(result))
    if not result["all_verified"]:
        fail("data was not delivered intact", EXIT_CHECK_FAILED)
    console.print("all data verified; no process or shared-memory segment left behind",
                  highlight=False)
