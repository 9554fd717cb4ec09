"""Interrupt coalescing: ``ethtool -c/-C`` grammar, the NIC's settings, and the effect.

The rule (nic_proc.dma): with the interrupt armed, the NIC raises it once ``rx-frames``
completions are pending or ``rx-usecs`` have passed since the first; ``rx-usecs 0`` (the
default) raises it at once.  The end-to-end test sends the same slow trickle twice through
a real NIC, kernel and zcrx-server and reads the interrupt count from ``ethtool -S``.
"""

from __future__ import annotations

import errno
from typing import Any

import pytest

from launch.ethtool import EthtoolUsageError, format_error, format_reply, parse
from nic_proc.device import Nic
from shared.errors import Misuse
from shared.nicif import NetdevSpec
from tests.e2e import nic_stats, topology, wait_app, zcrx


@pytest.mark.parametrize("opt", ["-c", "--show-coalesce"])
def test_show_coalesce_grammar(opt: str) -> None:
    assert parse([opt, "eth0"]) == {"cmd": "coalesce-get", "dev": "eth0"}


@pytest.mark.parametrize("opt", ["-C", "--coalesce"])
def test_set_coalesce_grammar(opt: str) -> None:
    req = parse([opt, "eth0", "rx-usecs", "50", "rx-frames", "0x40", "adaptive-rx", "off"])
    assert req == {"cmd": "coalesce-set", "dev": "eth0", "rx_usecs": 50, "rx_frames": 64,
                   "adaptive_rx": False}
    with pytest.raises(EthtoolUsageError, match="unknown parameter 'rx-bogus'"):
        parse([opt, "eth0", "rx-bogus", "1"])
    with pytest.raises(EthtoolUsageError, match="invalid value 'maybe'"):
        parse([opt, "eth0", "adaptive-rx", "maybe"])


def test_format_coalesce() -> None:
    text = format_reply({"cmd": "coalesce-get", "dev": "eth0"},
                        {"rx_usecs": 50, "rx_frames": 64, "adaptive_rx": True})
    lines = text.splitlines()
    assert lines[:2] == ["Coalesce parameters for eth0:", "Adaptive RX: on  TX: n/a"]
    assert "rx-usecs:\t50" in lines and "rx-frames:\t64" in lines
    assert "tx-usecs:\tn/a" in lines
    assert format_reply({"cmd": "coalesce-set", "dev": "eth0"}, {}) == ""
    assert format_error({"cmd": "coalesce-set", "dev": "eth0"}, errno.EOPNOTSUPP) \
        .endswith("netlink error: Operation not supported\n")


def test_nic_coalesce_settings_and_errnos() -> None:
    nic = Nic([NetdevSpec()])

    def eth(**req: Any) -> dict[str, Any]:
        return nic.ethtool("eth0", {"dev": "eth0", **req})

    assert eth(cmd="coalesce-get") == {"rx_usecs": 0, "rx_frames": 1, "adaptive_rx": False}
    assert eth(cmd="coalesce-set", rx_usecs=100, rx_frames=32) == {}
    assert eth(cmd="coalesce-get") == {"rx_usecs": 100, "rx_frames": 32, "adaptive_rx": False}
    eth(cmd="coalesce-set", adaptive_rx=True)
    assert eth(cmd="coalesce-get")["adaptive_rx"] is True
    assert nic.netdevs["eth0"].coal.rx_usecs == 100  # untouched by the other keys
    for bad, code in (({"tx_usecs": 5}, errno.EOPNOTSUPP), ({"adaptive_tx": True},
                      errno.EOPNOTSUPP), ({"rx_usecs": -1}, errno.EINVAL),
                      ({"rx_frames": 1 << 20}, errno.EINVAL), ({"rx_usecs": True}, errno.EINVAL)):
        with pytest.raises(Misuse) as ei:
            eth(cmd="coalesce-set", **bad)
        assert ei.value.errno == code, bad
    assert eth(cmd="coalesce-get") == {"rx_usecs": 100, "rx_frames": 32, "adaptive_rx": True}


PORT = 8000
TRICKLE = 192 << 10  # 48 segments of 4 KiB ...
RATE = 64 << 10  # ... one every ~64 ms: the kernel sleeps between them


@pytest.mark.timeout(180)
def test_ethtool_C_changes_the_interrupt_count_for_the_same_traffic() -> None:
    name = "coal"

    def trickle(app: int) -> int:
        """Send the trickle to a fresh zcrx-server; the interrupts queue 1 raised for it."""
        before = nic_stats(name)["rx-1.irq"]
        zcrx("app", "run", "--name", name, "--detach", "--cap-net-admin", "zcrx-server", "--",
             "-p", str(PORT),
             "-i", "eth0", "-q", "1", "-v", "-n", "1", "-s", str(TRICKLE))
        zcrx("traffic", "--name", name, "--port", str(PORT), "--bytes", str(TRICKLE),
             "--rate", str(RATE))
        wait_app(name, f"app:{app}", 60)
        st = nic_stats(name)
        assert st["rx-1.packets"] >= TRICKLE // 4096
        return st["rx-1.irq"] - before

    with topology(name, "--netdev", "eth0:queues=2"):
        zcrx("ethtool", "--name", name, "-N", "eth0", "flow-type", "tcp4", "dst-port",
             str(PORT), "action", "1")
        shown = zcrx("ethtool", "--name", name, "-c", "eth0").output
        assert "rx-usecs:\t0" in shown and "rx-frames:\t1" in shown
        at_once = trickle(0)
        # coalesce: wait for 16 completions or a second; the kernel's own timer tick
        # polls the queue first, so the NIC has nothing left to signal
        zcrx("ethtool", "--name", name, "-C", "eth0", "rx-usecs", "1000000", "rx-frames", "16")
        shown = zcrx("ethtool", "--name", name, "-c", "eth0").output
        assert "rx-usecs:\t1000000" in shown and "rx-frames:\t16" in shown
        coalesced = trickle(1)
        res = zcrx("ethtool", "--name", name, "-C", "eth0", "tx-usecs", "5", ok=False)
        assert res.exit_code != 0 and "tx-usecs" in res.output, res.output  # EOPNOTSUPP
        shown = zcrx("ethtool", "--name", name, "-c", "eth0").output  # and nothing changed
        assert "rx-usecs:\t1000000" in shown and "rx-frames:\t16" in shown
    # one interrupt per segment or so without coalescing, a few at most with it
    assert at_once >= 16, at_once
    assert coalesced <= at_once // 4, (at_once, coalesced)
