"""zcrx-server --iperf3 without processes: the control protocol as the server's generator
sees it, the refusals, stream numbering and the command line.

The generator (:meth:`app_proc.iperf3.Iperf3Server._control`) yields what it waits for
(``_Recv(n)``, ``_Send(bytes)``, stream connections, stream bytes); the test plays an
iperf3 client byte for byte (states and 4-byte-length JSON, as esnet/iperf's
``iperf_api.c`` frames them).  tests/test_iperf3_e2e.py runs the real client.
"""

from __future__ import annotations

import hashlib
import json
import struct
import sys
from typing import Any

import pytest

from app_proc import iperf3 as I
from app_proc.zcrx_server import Conn, parse_args


def server() -> I.Iperf3Server:
    opts, _ = parse_args(["--iperf3", "-q", "1", "--quiet"])
    s = I.Iperf3Server.__new__(I.Iperf3Server)
    s.opts = opts
    s.errors = []
    s.log = sys.stderr
    return s


def json_msg(obj: Any) -> tuple[bytes, bytes]:
    body = json.dumps(obj).encode()
    return struct.pack("!I", len(body)), body


def step(gen: Any, value: bytes | None) -> Any:
    return gen.send(value)


def test_stream_ids_are_iperf3s() -> None:
    assert [I.stream_id(k) for k in range(4)] == [1, 3, 4, 5]


@pytest.mark.parametrize(("params", "why"), [
    ({"tcp": True, "parallel": 2}, None),
    ({"udp": True}, "UDP"),
    ({"sctp": True}, "SCTP"),
    ({"tcp": True, "reverse": True}, "-R"),
    ({"tcp": True, "bidirectional": True}, "--bidir"),
    ({"tcp": True, "parallel": 0}, "parallel"),
    ({"tcp": True, "omit": 2}, "-O"),
    ({}, "only TCP"),
])
def test_refusals(params: dict[str, Any], why: str | None) -> None:
    got = I.refuse_reason(params)
    assert (got is None) if why is None else (got is not None and why in got)


def test_a_whole_test_as_the_client_sees_it() -> None:
    s = server()
    t = I.Test(fd=5, cookie=b"c" * 36 + b"\0", index=1)
    gen = s._control(t)
    assert step(gen, None) == I._Send(bytes([I.PARAM_EXCHANGE]))
    assert step(gen, None) == I._Recv(4)
    n, body = json_msg({"tcp": True, "omit": 0, "time": 0, "num": 1 << 20,
                        "parallel": 2, "len": 131072})
    assert step(gen, n) == I._Recv(len(body))
    assert step(gen, body) == I._Send(bytes([I.CREATE_STREAMS]))
    assert t.nstreams == 2
    assert isinstance(step(gen, None), I._WaitStreams)
    for k, fd in enumerate((6, 7)):
        c = Conn(fd, k, ("10.0.0.2", 40000 + k), I.stream_id(k))
        c.nbytes, c.first_ns, c.last_ns = 1 << 19, 0, 10**9
        c.sha = hashlib.sha256()
        t.stream_conns.append(c)
    assert step(gen, None) == I._Send(bytes([I.TEST_START, I.TEST_RUNNING]))
    assert step(gen, None) == I._Recv(1)
    assert step(gen, bytes([I.TEST_END])) == I._Send(bytes([I.EXCHANGE_RESULTS]))
    assert step(gen, None) == I._Recv(4)
    theirs = {"cpu_util_total": 1, "cpu_util_user": 1, "cpu_util_system": 0,
              "sender_has_retransmits": 1,
              "streams": [{"id": 1, "bytes": 1 << 19, "retransmits": 0, "jitter": 0,
                           "errors": 0, "packets": 0, "start_time": 0, "end_time": 1},
                          {"id": 3, "bytes": 1 << 19, "retransmits": 0, "jitter": 0,
                           "errors": 0, "packets": 0, "start_time": 0, "end_time": 1}]}
    n, body = json_msg(theirs)
    step(gen, n)
    assert isinstance(step(gen, body), I._WaitBytes)
    assert t.client_sent == {1: 1 << 19, 3: 1 << 19} and not s.errors
    out = step(gen, None)
    assert isinstance(out, I._Send)
    (length,) = struct.unpack("!I", out.data[:4])
    assert out.data[4 + length:] == bytes([I.DISPLAY_RESULTS])
    ours = json.loads(out.data[4:4 + length])
    # every field iperf3's get_results insists on
    for key in ("cpu_util_total", "cpu_util_user", "cpu_util_system",
                "sender_has_retransmits", "streams"):
        assert key in ours
    assert [(x["id"], x["bytes"]) for x in ours["streams"]] == [(1, 1 << 19), (3, 1 << 19)]
    for x in ours["streams"]:
        assert {"retransmits", "jitter", "errors", "packets", "start_time",
                "end_time"} <= set(x)
    assert step(gen, None) == I._Recv(1)
    with pytest.raises(StopIteration) as done:
        step(gen, bytes([I.IPERF_DONE]))
    assert done.value.value == "done"


def test_a_reverse_test_is_refused_with_iperf3s_not_implemented_error() -> None:
    s = server()
    t = I.Test(fd=5, cookie=b"c" * 37, index=1)
    gen = s._control(t)
    step(gen, None)
    step(gen, None)
    n, body = json_msg({"tcp": True, "reverse": True, "parallel": 1})
    step(gen, n)
    out = step(gen, body)
    assert out == I._Send(struct.pack("!bii", I.SERVER_ERROR, I.IEUNIMP, 0))
    with pytest.raises(StopIteration) as done:
        step(gen, None)
    assert done.value.value == "refused" and "-R" in (t.error or "")


def test_a_client_that_terminates_or_sends_garbage_ends_the_test() -> None:
    s = server()
    t = I.Test(fd=5, cookie=b"c" * 37, index=1)
    gen = s._control(t)
    step(gen, None)
    step(gen, None)
    with pytest.raises(I.ControlClosed):
        step(gen, struct.pack("!I", I.MAX_JSON + 1))
    gen = s._control(I.Test(fd=5, cookie=b"c" * 37, index=2))
    step(gen, None)
    step(gen, None)
    step(gen, struct.pack("!I", 3))
    with pytest.raises(I.ControlClosed):
        step(gen, b"{x]")


@pytest.mark.parametrize("bad", [["-v"], ["-o", "f"], ["-s", "1M"], ["-w", "2"]])
def test_iperf3_mode_refuses_options_it_cannot_honour(bad: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_args(["--iperf3", "-q", "1,2", *bad])
    assert exc.value.code == 2


def test_n_counts_tests_in_iperf3_mode() -> None:
    opts, _ = parse_args(["--iperf3", "-q", "1", "-n", "3"])
    assert opts.iperf3 and opts.iperf3_tests == 3 and opts.connections == 0
