"""Make a real TCP capture: netcat over a veth pair between two network namespaces.

The sender namespace sends a file with ``nc`` to a listener in the receiver namespace
over a veth pair at MTU 1500 (segmentation offloads off, so every frame is a real
MTU-sized segment); ``tcpdump`` on the receiver's veth writes the capture.  Needs root,
``ip``, ``nc``, ``tcpdump`` (and ``ethtool`` for the offloads); :func:`why_not` says
what is missing.  Only addresses inside the namespaces this module creates are used
(TEST-NET-2 198.51.100.0/24 and the documentation prefix 2001:db8::/64).

Run as a script to refresh the capture kept in ``tests/data/``::

    python tests/netns_capture.py tests/data/nc-ipv4.pcap 65536
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

PORT = 45004
ADDR4 = ("198.51.100.1", "198.51.100.2")
ADDR6 = ("2001:db8::1", "2001:db8::2")


def why_not() -> str | None:
    """None if a capture can be made here, else the reason."""
    if os.geteuid() != 0:
        return "making a capture needs root (network namespaces, veth, tcpdump)"
    for tool in ("ip", "ss", "nc", "tcpdump", "ethtool"):
        if shutil.which(tool) is None:
            return f"making a capture needs {tool} (not installed)"
    r = subprocess.run(["ip", "netns", "add", f"zcrxprobe{os.getpid()}"], capture_output=True)
    if r.returncode != 0:
        return "cannot create a network namespace here: " + r.stderr.decode().strip()
    subprocess.run(["ip", "netns", "del", f"zcrxprobe{os.getpid()}"], capture_output=True)
    return None


def _settled(path: Path, timeout: float = 5.0) -> None:
    """Until ``path`` stops growing (unchanged over 0.1 s), or ``timeout``."""
    deadline = time.monotonic() + timeout
    last = -1
    while time.monotonic() < deadline:
        size = path.stat().st_size if path.exists() else 0
        if size == last:
            return
        last = size
        time.sleep(0.1)


def _sh(*args: str) -> None:
    subprocess.run(list(args), check=True, capture_output=True, timeout=20)


def make_capture(out: Path, size: int, ipv6: bool = False, seed: int = 1) -> str:
    """Send ``size`` random bytes with nc, capture the receiver side into ``out``; the sha256
    of what was sent."""
    tag = f"{os.getpid()}{'6' if ipv6 else '4'}"
    ns_s, ns_r = f"zcrxsnd{tag}", f"zcrxrcv{tag}"
    va, vb = f"zs{tag}", f"zr{tag}"
    data = hashlib.shake_256(seed.to_bytes(8, "little")).digest(size)
    src_file = out.with_suffix(".sent")
    src_file.write_bytes(data)
    a_s, a_r = ADDR6 if ipv6 else ADDR4
    plen = "/64" if ipv6 else "/24"
    procs: list[subprocess.Popen[bytes]] = []
    try:
        _sh("ip", "netns", "add", ns_s)
        _sh("ip", "netns", "add", ns_r)
        _sh("ip", "link", "add", va, "netns", ns_s, "type", "veth", "peer", "name", vb,
            "netns", ns_r)
        for ns, dev, addr in ((ns_s, va, a_s), (ns_r, vb, a_r)):
            ex = ("ip", "netns", "exec", ns)
            _sh(*ex, "ip", "link", "set", dev, "mtu", "1500")
            _sh(*ex, "ethtool", "-K", dev, "tso", "off", "gso", "off", "gro", "off")
            _sh(*ex, "ip", "addr", "add", addr + plen, "dev", dev, *(("nodad",) if ipv6 else ()))
            _sh(*ex, "ip", "link", "set", dev, "up")
            _sh(*ex, "ip", "link", "set", "lo", "up")
        ex_r = ("ip", "netns", "exec", ns_r)
        # -Z root: write into the caller's private directory; immediate mode: no packet
        # waits in the kernel's buffer when tcpdump is stopped.
        dump = subprocess.Popen([*ex_r, "tcpdump", "-Z", "root", "-i", vb, "--immediate-mode",
                                 "-U", "-s", "0", "-w", str(out), "tcp", "port", str(PORT)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        procs.append(dump)
        assert dump.stderr is not None
        deadline = time.monotonic() + 10
        while b"listening" not in (dump.stderr.read1(4096) if hasattr(dump.stderr, "read1")
                                   else b"listening"):
            if time.monotonic() > deadline or dump.poll() is not None:
                raise RuntimeError("tcpdump did not start")
        sink = subprocess.Popen([*ex_r, "nc", "-l", "-s", a_r, "-p", str(PORT)],
                                stdout=subprocess.DEVNULL)
        procs.append(sink)
        deadline = time.monotonic() + 10  # until nc listens in the receiver's namespace
        while f":{PORT} " not in subprocess.run([*ex_r, "ss", "-Hltn"], capture_output=True,
                                                text=True).stdout + " ":
            if time.monotonic() > deadline or sink.poll() is not None:
                raise RuntimeError("nc did not start listening")
            time.sleep(0.02)
        with open(src_file, "rb") as f:
            subprocess.run(["ip", "netns", "exec", ns_s, "nc", "-N", "-w", "5", a_r, str(PORT)],
                           stdin=f, check=True, timeout=30, capture_output=True)
        sink.wait(timeout=10)
        _settled(out)  # tcpdump (-U, immediate mode) has written the last packets
        dump.terminate()
        dump.wait(timeout=10)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for ns in (ns_s, ns_r):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        src_file.unlink(missing_ok=True)
    return hashlib.sha256(data).hexdigest()


if __name__ == "__main__":
    print(make_capture(Path(sys.argv[1]), int(sys.argv[2]), ipv6="-6" in sys.argv[3:]))
