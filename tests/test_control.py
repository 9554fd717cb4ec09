"""The control plane: schema, codec, and the server/client transport over real zmq sockets.

Malformed requests are sent as raw frames from a plain DEALER to a server running in a thread;
each must get an ``error`` reply with the right errno, and the server must answer a valid request
right after it.
"""

from __future__ import annotations

import errno as E
import json
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import hypothesis.strategies as st
import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings

from shared import control as C
from shared import msg as M
from shared.control import (
    DEFER,
    ControlClient,
    ControlServer,
    EventReceiver,
    EventSender,
    Reply,
    ipc_endpoint,
)
from shared.errors import Misuse, Timeout
from shared.msg import (
    MAGIC_VERSION,
    MAX_BLOBS,
    MAX_FRAMES,
    MAX_HEADER_BYTES,
    MAX_MESSAGE_BYTES,
    BadMessage,
    ControlError,
    Message,
    Registry,
    Schema,
    all_ok,
    decode,
    encode,
    register_type,
)

# Types used only by these tests (registering the same declaration again is a no-op).
STRUCT = register_type(
    "test.struct", {"n": int, "name": str}, {"flag": (bool, False), "ratio": (float, 1.0)},
    blobs=1, blob_sizes=(96,), reply=Schema.make({"n": int}, blobs=1, blob_sizes=(96,)))
register_type("test.fail", {"errno": int})
register_type("test.slow")
register_type("test.bug")
register_type("test.badreply")
register_type("test.surrogate")
register_type("test.defer", {"x": int})
register_type("test.nohandler")
register_type("test.big", {"n": int}, reply=Schema.make(open=True))
register_type("test.event", {"seq": int})

STRUCT_BLOB = bytes(range(96))


def hdr(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def struct_frames(body: Mapping[str, Any] | None = None, blobs: list[bytes] | None = None,
                  msg_id: int = 7) -> list[bytes]:
    """Raw frames of a test.struct request, valid unless told otherwise."""
    b = {"n": 3, "name": "x"} if body is None else body
    return [MAGIC_VERSION, hdr({"t": "test.struct", "id": msg_id, "b": b}),
            *([STRUCT_BLOB] if blobs is None else blobs)]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def ctx() -> Iterator[zmq.Context[Any]]:
    context: zmq.Context[Any] = zmq.Context()
    yield context
    context.destroy(linger=0)


@pytest.fixture
def endpoint(tmp_path: Path) -> str:
    return ipc_endpoint(tmp_path, "ctl")


def _h_struct(msg: Message, peer: bytes) -> Reply:
    return Reply({"n": msg.body["n"] + 1}, [msg.blobs[0][::-1]])


def _h_fail(msg: Message, peer: bytes) -> None:
    raise Misuse("told to fail", msg.body["errno"])


def _h_bug(msg: Message, peer: bytes) -> None:
    raise KeyError("handler bug")


def _h_surrogate(msg: Message, peer: bytes) -> None:
    raise Misuse("bad name \ud800", E.ENOENT)


def _h_badreply(msg: Message, peer: bytes) -> dict[str, Any]:
    return {"value": np.int64(1)}  # not JSON: a server-side bug


class ServerThread:
    """A ControlServer answering in a background thread until stopped."""

    def __init__(self, server: ControlServer) -> None:
        self.server = server
        self.errors: list[BaseException] = []
        self.release = threading.Event()
        self._stop = threading.Event()
        server.handlers.setdefault("test.slow", self._h_slow)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _h_slow(self, msg: Message, peer: bytes) -> None:
        self.release.wait(10)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.server.poll_once(20)
            except Exception as exc:  # handler bugs are re-raised by design; keep serving
                self.errors.append(exc)

    def stop(self) -> None:
        self.release.set()
        self._stop.set()
        self._thread.join(10)
        assert not self._thread.is_alive()
        self.server.close()


@pytest.fixture
def start_server(ctx: zmq.Context[Any]) -> Iterator[Callable[..., ServerThread]]:
    started: list[ServerThread] = []

    def start(ep: str, handlers: Mapping[str, C.Handler] | None = None) -> ServerThread:
        all_handlers: dict[str, C.Handler] = {
            "test.struct": _h_struct, "test.fail": _h_fail, "test.bug": _h_bug,
            "test.badreply": _h_badreply, "test.surrogate": _h_surrogate}
        all_handlers.update(handlers or {})
        st_ = ServerThread(ControlServer(ep, all_handlers, role="kernel", context=ctx))
        started.append(st_)
        return st_

    yield start
    for s in started:
        s.stop()


@pytest.fixture
def served(start_server: Callable[..., ServerThread], endpoint: str) -> ServerThread:
    return start_server(endpoint)


@pytest.fixture
def client(ctx: zmq.Context[Any], endpoint: str) -> Iterator[ControlClient]:
    c = ControlClient(endpoint, timeout_ms=5000, context=ctx)
    yield c
    c.close()


@pytest.fixture
def raw(ctx: zmq.Context[Any], endpoint: str) -> Iterator[zmq.Socket[bytes]]:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    yield sock
    sock.close(0)


def exchange(sock: zmq.Socket[bytes], frames: list[bytes], timeout_ms: int = 5000) -> Message:
    sock.send_multipart(frames)
    assert sock.poll(timeout_ms, zmq.POLLIN), "no reply"
    return decode(sock.recv_multipart())


def assert_serving(sock: zmq.Socket[bytes], msg_id: int = 1000) -> None:
    reply = exchange(sock, encode("ping", msg_id))
    assert (reply.type, reply.id) == ("ok", msg_id)


# --------------------------------------------------------------------------- codec

BUILTIN_SAMPLES = [
    ("ok", {}, []),
    ("ok", {"a": 1, "nested": {"l": [1, -2.5, None, True, "s"]}}, [b"", b"\x00" * 96]),
    ("error", {"errno": E.EINVAL, "msg": "bad"}, []),
    ("hello", {"role": "app", "pid": 1234, "version": M.PROTOCOL_VERSION}, []),
    ("ping", {}, []),
    ("eos", {}, []),
    ("bye", {}, []),
]


@pytest.mark.parametrize(("type_", "body", "blobs"), BUILTIN_SAMPLES)
def test_builtin_types_round_trip(type_: str, body: dict[str, Any], blobs: list[bytes]) -> None:
    frames = encode(type_, 42, body, blobs)
    assert frames[0] == b"ZCRX\x01"
    assert decode(frames) == Message(type_, 42, body, tuple(blobs))


def test_optional_defaults_filled_and_int_widens_to_float() -> None:
    msg = decode(struct_frames({"n": 1, "name": "a", "ratio": 2}))
    assert msg.body == {"n": 1, "name": "a", "flag": False, "ratio": 2.0}
    assert isinstance(msg.body["ratio"], float)


@pytest.mark.parametrize(("kwargs", "errno"), [
    ({"type_": "no.such"}, E.ENOSYS),
    ({"body": {"n": True, "name": "a"}}, E.EINVAL),
    ({"body": {"n": np.int64(1), "name": "a"}}, E.EINVAL),
    ({"body": {"n": 1 << 64, "name": "a"}}, E.EINVAL),
    ({"body": {"n": 1, "name": "a", "ratio": float("nan")}}, E.EINVAL),
    ({"body": {"n": 1}}, E.EINVAL),
    ({"body": {"n": 1, "name": "a", "extra": 0}}, E.EINVAL),
    ({"blobs": [b"x" * 95]}, E.EINVAL),
    ({"blobs": [STRUCT_BLOB] * (MAX_BLOBS + 1)}, E.EMSGSIZE),
    ({"type_": "ok", "body": {"big": "x" * MAX_HEADER_BYTES}}, E.EMSGSIZE),
    ({"type_": "ok", "blobs": [b"x" * MAX_MESSAGE_BYTES]}, E.EMSGSIZE),
    ({"msg_id": -1}, E.EINVAL),
    ({"msg_id": True}, E.EINVAL),
])
def test_encode_rejects_with_misuse(kwargs: dict[str, Any], errno: int) -> None:
    args: dict[str, Any] = {"type_": "test.struct", "msg_id": 1,
                            "body": {"n": 1, "name": "a"}, "blobs": [STRUCT_BLOB]}
    args.update(kwargs)
    with pytest.raises(Misuse) as info:
        encode(args["type_"], args["msg_id"], args["body"], args["blobs"])
    assert info.value.errno == errno


def test_registry_rules() -> None:
    reg = Registry()
    t = register_type("a.b", {"x": int}, registry=reg)
    assert register_type("a.b", {"x": int}, registry=reg) is t
    with pytest.raises(Misuse) as info:
        register_type("a.b", {"x": str}, registry=reg)
    assert info.value.errno == E.EEXIST
    for bad in ({"required": {"x": bytes}}, {"optional": {"x": (int, "no")}},
                {"optional": {"x": int}}, {"blobs": MAX_BLOBS + 1},
                {"blobs": 1, "blob_sizes": (1, 2)}, {"required": {"x": int},
                                                     "optional": {"x": (int, 0)}}):
        with pytest.raises(Misuse):
            register_type("c.d", registry=reg, **bad)
    for name in ("", "Upper", "1x", "a b", "x" * 65):
        with pytest.raises(Misuse):
            register_type(name, registry=reg)
    assert "c.d" not in reg
    assert decode(encode("a.b", 1, {"x": 2}, registry=reg), reg).body == {"x": 2}
    with pytest.raises(BadMessage) as binfo:
        decode(encode("a.b", 1, {"x": 2}, registry=reg))  # not in the global registry
    assert binfo.value.errno == E.ENOSYS


def test_validator_rejects_with_einval() -> None:
    with pytest.raises(BadMessage) as info:
        decode([MAGIC_VERSION, hdr({"t": "error", "id": 1, "b": {"errno": 0, "msg": ""}})])
    assert info.value.errno == E.EINVAL


# --------------------------------------------------------------------------- malformed input

DEEP_OK: dict[str, Any] = {"x": 0}
for _ in range(M.MAX_DEPTH + 2):
    DEEP_OK = {"x": DEEP_OK}

# (case id, frames, expected errno, expected reply id: the request's when readable, else 0)
MALFORMED: list[tuple[str, list[bytes], int, int]] = [
    ("empty-frame", [b""], E.EPROTO, 0),
    ("truncated-magic", [b"ZCR"], E.EPROTO, 0),
    ("truncated-no-header", [MAGIC_VERSION], E.EBADMSG, 0),
    ("bad-magic", [b"HTTP/", hdr({"t": "ping", "id": 7})], E.EPROTO, 7),
    ("wrong-version", [b"ZCRX\x02", hdr({"t": "ping", "id": 7})], E.EPROTO, 7),
    ("version-zero", [b"ZCRX\x00"], E.EPROTO, 0),
    ("garbage-json", [MAGIC_VERSION, b"{not json"], E.EBADMSG, 0),
    ("empty-header", [MAGIC_VERSION, b""], E.EBADMSG, 0),
    ("not-utf8", [MAGIC_VERSION, b'{"t":"ping","id":7,"b":{"s":"\xff"}}'], E.EBADMSG, 0),
    ("header-array", [MAGIC_VERSION, b"[1,2]"], E.EBADMSG, 0),
    ("no-id", [MAGIC_VERSION, hdr({"t": "ping"})], E.EBADMSG, 0),
    ("bool-id", [MAGIC_VERSION, hdr({"t": "ping", "id": True})], E.EBADMSG, 0),
    ("negative-id", [MAGIC_VERSION, hdr({"t": "ping", "id": -1})], E.EBADMSG, 0),
    ("huge-id", [MAGIC_VERSION, hdr({"t": "ping", "id": 1 << 64})], E.EBADMSG, 0),
    ("no-type", [MAGIC_VERSION, hdr({"id": 7})], E.EBADMSG, 7),
    ("type-not-str", [MAGIC_VERSION, hdr({"t": 5, "id": 7})], E.EBADMSG, 7),
    ("extra-header-key", [MAGIC_VERSION, hdr({"t": "ping", "id": 7, "z": 1})], E.EBADMSG, 7),
    ("nan", [MAGIC_VERSION, b'{"t":"ping","id":7,"b":{"x":NaN}}'], E.EBADMSG, 0),
    ("duplicate-key", [MAGIC_VERSION, b'{"t":"ping","id":7,"id":8}'], E.EBADMSG, 0),
    ("json-recursion", [MAGIC_VERSION, b"[" * 60000], E.EBADMSG, 0),
    ("unknown-type", [MAGIC_VERSION, hdr({"t": "no.such", "id": 7})], E.ENOSYS, 7),
    ("body-not-object", [MAGIC_VERSION, hdr({"t": "ping", "id": 7, "b": []})], E.EINVAL, 7),
    ("extra-field", [MAGIC_VERSION, hdr({"t": "ping", "id": 7, "b": {"x": 1}})], E.EINVAL, 7),
    ("missing-field", struct_frames({"n": 1}), E.EINVAL, 7),
    ("str-as-int", struct_frames({"n": "3", "name": "x"}), E.EINVAL, 7),
    ("float-as-int", struct_frames({"n": 3.0, "name": "x"}), E.EINVAL, 7),
    ("bool-as-int", struct_frames({"n": True, "name": "x"}), E.EINVAL, 7),
    ("int-as-bool", struct_frames({"n": 3, "name": "x", "flag": 1}), E.EINVAL, 7),
    ("int-too-big", struct_frames({"n": 1 << 64, "name": "x"}), E.EINVAL, 7),
    ("int-too-small", struct_frames({"n": -(1 << 63) - 1, "name": "x"}), E.EINVAL, 7),
    ("float-overflow", [MAGIC_VERSION, b'{"t":"test.struct","id":7,'
                        b'"b":{"n":1,"name":"x","ratio":1e999}}', STRUCT_BLOB], E.EINVAL, 7),
    ("lone-surrogate", [MAGIC_VERSION, b'{"t":"test.struct","id":7,'
                        b'"b":{"n":1,"name":"\\ud800"}}', STRUCT_BLOB], E.EINVAL, 7),
    ("huge-int-as-float", struct_frames({"n": 1, "name": "x", "ratio": 10**400}), E.EINVAL, 7),
    ("null-field", struct_frames({"n": None, "name": "x"}), E.EINVAL, 7),
    ("blob-too-short", struct_frames(blobs=[STRUCT_BLOB[:95]]), E.EINVAL, 7),
    ("blob-too-long", struct_frames(blobs=[STRUCT_BLOB + b"\x00"]), E.EINVAL, 7),
    ("blob-missing", struct_frames(blobs=[]), E.EINVAL, 7),
    ("blob-extra", struct_frames(blobs=[STRUCT_BLOB, b""]), E.EINVAL, 7),
    ("too-deep", [MAGIC_VERSION, hdr({"t": "ok", "id": 7, "b": DEEP_OK})], E.EINVAL, 7),
    ("errno-zero", [MAGIC_VERSION, hdr({"t": "error", "id": 7, "b": {"errno": 0, "msg": ""}})],
     E.EINVAL, 7),
    ("oversize-blob", struct_frames(blobs=[b"x" * (MAX_MESSAGE_BYTES + 1)]), E.EMSGSIZE, 7),
    ("oversize-total", [MAGIC_VERSION, hdr({"t": "ok", "id": 7}),
                        *[b"x" * (MAX_MESSAGE_BYTES // 4)] * 4], E.EMSGSIZE, 7),
    ("too-many-frames", [MAGIC_VERSION, hdr({"t": "ok", "id": 7}),
                         *[b""] * (MAX_FRAMES - 1)], E.EMSGSIZE, 7),
    ("oversize-header", [MAGIC_VERSION, hdr({"t": "ok", "id": 7,
                                             "b": {"s": "x" * MAX_HEADER_BYTES}})],
     E.EMSGSIZE, 0),
]


@pytest.mark.parametrize(("frames", "errno", "reply_id"),
                         [pytest.param(f, e, i, id=n) for n, f, e, i in MALFORMED])
def test_malformed_request_gets_error_reply_and_server_keeps_serving(
        served: ServerThread, raw: zmq.Socket[bytes], frames: list[bytes], errno: int,
        reply_id: int) -> None:
    with pytest.raises(BadMessage) as info:
        decode(frames)
    assert info.value.errno == errno  # the codec alone agrees with what the server says
    reply = exchange(raw, frames)
    assert reply.type == "error"
    assert reply.body["errno"] == errno, reply.body["msg"]
    assert reply.id == reply_id
    assert_serving(raw)
    assert served.server.stats.rejected[errno] == 1
    assert served.server.stats.requests == 1  # only the ping
    assert not served.errors


def test_malformed_burst_then_valid_requests(served: ServerThread, raw: zmq.Socket[bytes],
                                             client: ControlClient) -> None:
    for _, frames, _, _ in MALFORMED:
        raw.send_multipart(frames)
    replies: list[Message] = []
    while len(replies) < len(MALFORMED):
        assert raw.poll(5000, zmq.POLLIN)
        replies.append(decode(raw.recv_multipart()))
    assert [r.body["errno"] for r in replies] == [e for _, _, e, _ in MALFORMED]
    assert client.call("test.struct", {"n": 1, "name": "ok"}, [STRUCT_BLOB])["n"] == 2
    assert sum(served.server.stats.rejected.values()) == len(MALFORMED)
    assert served.server.stats.as_dict()["rejected"]["EINVAL"] > 0


# --------------------------------------------------------------------------- request/reply


def test_builtin_requests_over_the_server(served: ServerThread, client: ControlClient) -> None:
    client.ping()
    hello = client.hello("app")
    assert hello == {"role": "kernel", "pid": hello["pid"], "version": M.PROTOCOL_VERSION}
    assert client.call("bye") == {}
    reply = client.request("test.struct", {"n": 41, "name": "s"}, [STRUCT_BLOB])
    assert reply.type == "ok"
    assert reply.body == {"n": 42}
    assert reply.blobs == (STRUCT_BLOB[::-1],)
    client.end_stream()
    assert served.server.stats.ok == 5


def test_wrapped_errors_name_their_errno_once() -> None:
    inner = Misuse("queue 5 out of range")                 # the NIC's
    remote = ControlError("nic.ethtool", E.EINVAL, str(inner))  # the kernel's view of it
    assert str(inner) == "queue 5 out of range [EINVAL]"
    assert str(remote) == "nic.ethtool: queue 5 out of range [EINVAL]"
    assert str(Misuse(f"up: {remote}")) == "up: nic.ethtool: queue 5 out of range [EINVAL]"
    assert str(Misuse(f"({remote})")).endswith("[EINVAL]) [EINVAL]")
    assert str(Misuse("x [ENOENT]")) == "x [ENOENT] [EINVAL]"  # another errno is kept


def test_pipelined_requests_answer_in_place(served: ServerThread,
                                            client: ControlClient) -> None:
    """request_many: every reply (or error) in the place of its request; the server saw
    them one by one, in order; the client is usable afterwards."""
    reqs: list[tuple[str, dict[str, Any] | None]] = [
        ("ping", None), ("test.fail", {"errno": E.EEXIST}), ("ping", None),
        ("test.fail", {"errno": E.ERANGE}), ("bye", None)]
    out = client.request_many(reqs)
    assert [type(o).__name__ for o in out] == ["Message", "ControlError", "Message",
                                               "ControlError", "Message"]
    assert [o.errno for o in out if isinstance(o, ControlError)] == [E.EEXIST, E.ERANGE]
    assert all(o.type == "ok" for o in out if not isinstance(o, ControlError))
    assert client.call_many([("ping", None)] * 3) == [{}, {}, {}]
    assert served.server.stats.ok == 6 and served.server.stats.errors == 2
    # more than the sockets' high-water mark: sent in batches, every reply in its place
    many = client.call_many([("test.fail", {"errno": 1 + i % 100}) if i % 7 == 0
                             else ("ping", None) for i in range(1500)])
    assert [r.errno if isinstance(r, ControlError) else r for r in many] == [
        1 + i % 100 if i % 7 == 0 else {} for i in range(1500)]
    assert client.request_many([]) == []
    client.ping()
    assert client.stale_replies == 0


def test_pipelined_bad_request_sends_nothing(served: ServerThread,
                                             client: ControlClient) -> None:
    with pytest.raises(Misuse):
        client.request_many([("ping", None), ("no.such.type", None)])
    client.ping()
    assert served.server.stats.ok == 1


def test_pipelined_timeout_then_client_usable(served: ServerThread, ctx: zmq.Context[Any],
                                              endpoint: str) -> None:
    c = ControlClient(endpoint, timeout_ms=200, context=ctx)
    try:
        with pytest.raises(Timeout) as info:
            c.request_many([("ping", None), ("test.slow", None), ("ping", None)])
        assert "test.slow" in str(info.value)
        served.release.set()
        assert c.call_many([("ping", None)] * 2, timeout_ms=10_000) == [{}, {}]
    finally:
        c.close()


def test_hello_with_other_version_is_eproto(served: ServerThread, client: ControlClient) -> None:
    with pytest.raises(ControlError) as info:
        client.call("hello", {"role": "app", "pid": 1, "version": 99})
    assert info.value.errno == E.EPROTO


@pytest.mark.parametrize("errno", [E.ENODEV, E.EEXIST, E.EPERM, E.ERANGE])
def test_handler_error_becomes_error_reply(served: ServerThread, client: ControlClient,
                                           errno: int) -> None:
    with pytest.raises(ControlError) as info:
        client.call("test.fail", {"errno": errno})
    assert info.value.errno == errno
    assert info.value.request_type == "test.fail"
    assert "told to fail" in info.value.remote_msg
    client.ping()
    assert served.server.stats.errors == 1
    assert not served.errors


def test_all_ok_raises_the_first_refusal_of_a_batch() -> None:
    e1, e2 = ControlError("a", E.EPERM, "no"), ControlError("b", E.EIO, "broken")
    assert all_ok([{"x": 1}, {"x": 2}]) == [{"x": 1}, {"x": 2}] and all_ok([]) == []
    with pytest.raises(ControlError) as info:
        all_ok([{"x": 1}, e1, e2])
    assert info.value is e1


def test_large_reply_reaches_the_client(
        start_server: Callable[..., ServerThread], endpoint: str,
        client: ControlClient) -> None:
    """A 64-queue host's `stats` is ~100 KB of JSON: a reply's header may be as large as a
    message (a request's stays bounded: "oversize-header" above)."""
    def big(msg: Message, peer: bytes) -> dict[str, Any]:
        return {"rows": ["q" * 100] * msg.body["n"]}

    st_ = start_server(endpoint, {"test.big": big})
    n = 3 * MAX_HEADER_BYTES // 100
    assert len(client.call("test.big", {"n": n})["rows"]) == n
    with pytest.raises(ControlError) as info:  # too big even for a reply: an error, no hang
        client.call("test.big", {"n": MAX_MESSAGE_BYTES // 100})
    assert info.value.errno == E.EIO
    client.ping()
    assert st_.server.stats.handler_bugs == 1


def test_handler_without_errno_is_eio_and_reraised(served: ServerThread,
                                                   client: ControlClient) -> None:
    for kind in ("test.bug", "test.badreply"):
        with pytest.raises(ControlError) as info:
            client.call(kind)
        assert info.value.errno == E.EIO
    client.ping()
    assert [type(e) for e in served.errors] == [KeyError, Misuse]
    assert served.server.stats.handler_bugs == 2


def test_handler_error_text_that_is_not_unicode(served: ServerThread,
                                                client: ControlClient) -> None:
    with pytest.raises(ControlError) as info:
        client.call("test.surrogate")
    assert info.value.errno == E.ENOENT
    assert "\\ud800" in info.value.remote_msg
    assert not served.errors


def test_type_without_handler_is_enosys(served: ServerThread, client: ControlClient) -> None:
    with pytest.raises(ControlError) as info:
        client.call("test.nohandler")
    assert info.value.errno == E.ENOSYS


def test_reply_to_reply_type_request_is_enosys(served: ServerThread,
                                               raw: zmq.Socket[bytes]) -> None:
    reply = exchange(raw, encode("ok", 5, {"x": 1}))
    assert (reply.type, reply.id, reply.body["errno"]) == ("error", 5, E.ENOSYS)


def test_client_rejects_bad_request_locally(served: ServerThread, client: ControlClient) -> None:
    with pytest.raises(Misuse) as info:
        client.call("test.struct", {"n": True, "name": "x"}, [STRUCT_BLOB])
    assert info.value.errno == E.EINVAL
    assert served.server.stats.requests == 0


def test_eos_is_acked_and_ends_the_stream(served: ServerThread, client: ControlClient,
                                          raw: zmq.Socket[bytes]) -> None:
    client.end_stream()
    assert len(served.server.ended) == 1
    with pytest.raises(Misuse) as info:
        client.ping()
    assert info.value.errno == E.EPIPE
    # A peer that keeps talking after its own eos is refused by the server too.
    assert exchange(raw, encode("eos", 1)).type == "ok"
    reply = exchange(raw, encode("ping", 2))
    assert (reply.type, reply.body["errno"]) == ("error", E.EPIPE)
    assert exchange(raw, encode("eos", 3)).type == "ok"


def test_eos_acks_after_everything_before_it(served: ServerThread, client: ControlClient) -> None:
    seen: list[int] = []
    served.server.handlers["test.defer"] = lambda m, p: seen.append(m.body["x"])
    for i in range(200):
        client.call("test.defer", {"x": i})
    client.end_stream()
    assert seen == list(range(200))


def test_timeout_without_server_then_server_appears(
        ctx: zmq.Context[Any], endpoint: str, start_server: Callable[..., ServerThread]) -> None:
    c = ControlClient(endpoint, timeout_ms=200, context=ctx)
    try:
        t0 = time.monotonic()
        with pytest.raises(Timeout) as info:
            c.ping()
        elapsed = time.monotonic() - t0
        assert 0.19 <= elapsed < 2.0
        assert info.value.errno == E.ETIMEDOUT
        assert c.timeouts == 1
        start_server(endpoint)
        c.ping(timeout_ms=10_000)
        assert c.hello("app")["role"] == "kernel"
    finally:
        c.close()


def test_late_reply_after_timeout_does_not_confuse_the_next_request(
        served: ServerThread, ctx: zmq.Context[Any], endpoint: str) -> None:
    c = ControlClient(endpoint, timeout_ms=200, context=ctx)
    try:
        with pytest.raises(Timeout):
            c.call("test.slow")
        served.release.set()  # the server now answers the abandoned request
        assert c.call("test.struct", {"n": 1, "name": "a"}, [STRUCT_BLOB],
                      timeout_ms=10_000) == {"n": 2}
        c.ping(timeout_ms=10_000)
    finally:
        c.close()


@pytest.fixture
def fake_router(ctx: zmq.Context[Any], endpoint: str) -> Iterator[zmq.Socket[bytes]]:
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(endpoint)
    yield sock
    sock.close(0)


def _answer_with(router: zmq.Socket[bytes], make: Callable[[int], list[list[bytes]]]) -> None:
    """Take one request from ``router`` and send the replies ``make(request id)``."""
    assert router.poll(5000, zmq.POLLIN)
    peer, *frames = router.recv_multipart()
    for reply in make(decode(frames).id):
        router.send_multipart([peer, *reply])


def _in_thread(fn: Callable[[], None]) -> tuple[threading.Thread, list[BaseException]]:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            fn()
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, errors


def test_stale_reply_is_discarded(ctx: zmq.Context[Any], endpoint: str,
                                  fake_router: zmq.Socket[bytes]) -> None:
    c = ControlClient(endpoint, timeout_ms=5000, context=ctx)
    result: list[dict[str, Any]] = []
    try:
        t, errors = _in_thread(lambda: result.append(c.call("ping")))
        _answer_with(fake_router, lambda rid: [
            encode("ok", rid + 1000),
            encode("error", rid - 1, {"errno": E.EIO, "msg": "old"}),
            [MAGIC_VERSION, hdr({"t": "no.such", "id": rid + 5})],  # malformed and stale
            encode("ok", rid)])
        t.join(10)
        assert not errors
        assert result == [{}]
        assert c.stale_replies == 3
    finally:
        c.close()


@pytest.mark.parametrize(("make", "errno"), [
    (lambda rid: [[MAGIC_VERSION, b"{garbage"]], E.EBADMSG),
    (lambda rid: [encode("hello", rid, {"role": "x", "pid": 1, "version": 1})], E.EPROTO),
    (lambda rid: [encode("ok", rid, {"surprise": 1})], E.EINVAL),  # ping replies are empty
])
def test_malformed_reply_raises_bad_message(ctx: zmq.Context[Any], endpoint: str,
                                            fake_router: zmq.Socket[bytes],
                                            make: Callable[[int], list[list[bytes]]],
                                            errno: int) -> None:
    c = ControlClient(endpoint, timeout_ms=5000, context=ctx)
    try:
        t, errors = _in_thread(c.ping)
        _answer_with(fake_router, make)
        t.join(10)
        assert [type(e) for e in errors] == [BadMessage]
        assert errors[0].errno == errno  # type: ignore[attr-defined]
    finally:
        c.close()


def test_closed_client_refuses(ctx: zmq.Context[Any], endpoint: str) -> None:
    c = ControlClient(endpoint, context=ctx)
    c.close()
    c.close()
    with pytest.raises(Misuse) as info:
        c.ping()
    assert info.value.errno == E.EBADF


def test_deferred_reply(ctx: zmq.Context[Any], endpoint: str, raw: zmq.Socket[bytes]) -> None:
    pending: list[tuple[Message, bytes]] = []

    def defer(msg: Message, peer: bytes) -> C.HandlerResult:
        pending.append((msg, peer))
        return DEFER

    with ControlServer(endpoint, {"test.defer": defer}, context=ctx) as server:
        raw.send_multipart(encode("test.defer", 1, {"x": 1}))
        raw.send_multipart(encode("test.defer", 2, {"x": 2}))
        while len(pending) < 2:
            assert server.poll_once(5000)
        assert not raw.poll(0, zmq.POLLIN)
        (m1, p1), (m2, p2) = pending
        assert server.reply_error(p2, m2, E.EAGAIN)
        assert server.reply(p1, m1, {"done": True})
        replies = [decode(raw.recv_multipart()) for _ in range(2)]
        assert [(r.id, r.type) for r in replies] == [(2, "error"), (1, "ok")]
        assert replies[1].body == {"done": True}
        with pytest.raises(Misuse):
            server.reply_error(p1, m1, 0)


def test_server_polled_with_other_sockets(ctx: zmq.Context[Any], endpoint: str,
                                          raw: zmq.Socket[bytes]) -> None:
    other = ctx.socket(zmq.PAIR)
    other.setsockopt(zmq.LINGER, 0)
    other.bind("inproc://other")
    peer = ctx.socket(zmq.PAIR)
    peer.setsockopt(zmq.LINGER, 0)
    peer.connect("inproc://other")
    try:
        with ControlServer(endpoint, context=ctx) as server:
            poller = zmq.Poller()
            poller.register(server.socket, zmq.POLLIN)
            poller.register(other, zmq.POLLIN)
            for i in range(5):
                raw.send_multipart(encode("ping", i))
            peer.send(b"wake")
            answered, woken = 0, 0
            while answered < 5 or not woken:
                events = dict(poller.poll(5000))
                assert events
                if server.socket in events:
                    answered += server.process_pending()
                if other in events:
                    woken += len(other.recv())
            assert [decode(raw.recv_multipart()).id for _ in range(5)] == list(range(5))
    finally:
        other.close(0)
        peer.close(0)


def test_reply_to_departed_peer_is_counted_not_raised(ctx: zmq.Context[Any],
                                                      endpoint: str) -> None:
    with ControlServer(endpoint, context=ctx) as server:
        assert not server._send(b"\x00nobody", encode("ok", 1))
        assert server.stats.undeliverable == 1


# --------------------------------------------------------------------------- endpoints


def test_ipc_endpoint(tmp_path: Path) -> None:
    ep = ipc_endpoint(tmp_path, "driver")
    assert ep == f"ipc://{tmp_path.absolute()}/driver.sock"
    for bad in ("", "a/b", "../x", ".hidden", "sp ace"):
        with pytest.raises(Misuse) as info:
            ipc_endpoint(tmp_path, bad)
        assert info.value.errno == E.EINVAL
    deep = tmp_path / ("d" * 120)
    with pytest.raises(Misuse) as info:
        ipc_endpoint(deep, "x")
    assert info.value.errno == E.ENAMETOOLONG
    assert "107" in str(info.value)
    # Exactly at the limit still works as a real socket address.
    room = 107 - len(str(tmp_path.absolute()) + "/") - len(".sock")
    ep = ipc_endpoint(tmp_path, "n" * room)
    assert len(ep) - len("ipc://") == 107


def test_ipc_endpoint_at_the_limit_serves(ctx: zmq.Context[Any], tmp_path: Path,
                                          start_server: Callable[..., ServerThread]) -> None:
    room = 107 - len(str(tmp_path.absolute()) + "/") - len(".sock")
    ep = ipc_endpoint(tmp_path, "n" * room)
    start_server(ep)
    with ControlClient(ep, context=ctx) as c:
        c.ping()


def test_tcp_loopback_endpoint(ctx: zmq.Context[Any]) -> None:
    with ControlServer("tcp://127.0.0.1:*", context=ctx) as server:
        assert server.endpoint.startswith("tcp://127.0.0.1:")
        t = ServerThread(server)
        try:
            with ControlClient(server.endpoint, context=ctx) as c:
                c.ping()
        finally:
            t.stop()


@pytest.mark.parametrize("ep", ["tcp://0.0.0.0:5555", "tcp://*:5555", "udp://127.0.0.1:1",
                                "/tmp/x"])
def test_refuses_non_loopback_or_unknown_endpoints(ctx: zmq.Context[Any], ep: str) -> None:
    with pytest.raises(Misuse):
        ControlServer(ep, context=ctx)


# --------------------------------------------------------------------------- events


def test_events_round_trip_and_malformed_dropped(ctx: zmq.Context[Any], tmp_path: Path) -> None:
    ep = ipc_endpoint(tmp_path, "ev")
    rx = EventReceiver(ep, context=ctx)
    tx = EventSender(ep, context=ctx)
    junk = ctx.socket(zmq.PUSH)
    junk.setsockopt(zmq.LINGER, 0)
    junk.connect(ep)
    try:
        for i in range(3):
            assert tx.send("test.event", {"seq": i})
        junk.send_multipart([MAGIC_VERSION, b"{bad"])
        with pytest.raises(Misuse):
            tx.send("test.event", {"seq": "x"})
        got: list[Message] = []
        deadline = time.monotonic() + 5
        while (len(got) < 3 or not rx.rejected) and time.monotonic() < deadline:
            msg = rx.recv(50)
            if msg is not None:
                got.append(msg)
        assert [m.body["seq"] for m in got] == [0, 1, 2]
        assert rx.rejected[E.EBADMSG] == 1
        assert rx.recv(0) is None
        assert tx.sent == 3
    finally:
        junk.close(0)
        tx.close()
        rx.close()


def test_event_sender_drops_when_queue_full(ctx: zmq.Context[Any], tmp_path: Path) -> None:
    tx = EventSender(ipc_endpoint(tmp_path, "nobody"), context=ctx, hwm=4)
    try:
        results = [tx.send("test.event", {"seq": i}) for i in range(50)]
        assert results[0] and not results[-1]
        assert tx.dropped == results.count(False) > 0
    finally:
        tx.close()


# --------------------------------------------------------------------------- properties

frame_lists = st.lists(st.binary(max_size=64), max_size=6)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=4), children, max_size=4),
    max_leaves=12)
header_objs = st.fixed_dictionaries(
    {}, optional={"t": st.sampled_from(["ping", "ok", "error", "hello", "test.struct", "zz"])
                  | st.text(max_size=6) | json_values,
                  "id": st.integers(-5, 1 << 65) | json_values, "b": json_values
                  | st.dictionaries(st.sampled_from(["n", "name", "flag", "ratio", "errno",
                                                     "msg", "role", "pid", "version"]),
                                    json_values, max_size=5),
                  "x": json_values})

NO_FIXTURE_RESET = settings(suppress_health_check=[HealthCheck.function_scoped_fixture],
                            deadline=None)


def _decode_or_badmessage(frames: list[bytes]) -> None:
    try:
        msg = decode(frames)
    except BadMessage as exc:
        assert exc.errno in {E.EBADMSG, E.EPROTO, E.ENOSYS, E.EINVAL, E.EMSGSIZE}
        return
    assert isinstance(msg, Message)
    # Anything decode accepts, encode reproduces and decode accepts again unchanged.
    assert decode(encode(msg.type, msg.id, msg.body, msg.blobs)) == msg


@NO_FIXTURE_RESET
@given(frames=frame_lists)
def test_random_frames_never_crash_decode(frames: list[bytes]) -> None:
    _decode_or_badmessage(frames)


@NO_FIXTURE_RESET
@given(magic=st.sampled_from([MAGIC_VERSION, b"ZCRX\x02", b"ZCRX"]), header=header_objs,
       raw_header=st.none() | st.binary(max_size=40),
       blobs=st.lists(st.binary(max_size=100) | st.just(STRUCT_BLOB), max_size=3))
def test_random_headers_never_crash_decode(magic: bytes, header: dict[str, Any],
                                           raw_header: bytes | None,
                                           blobs: list[bytes]) -> None:
    try:
        text = json.dumps(header).encode()
    except (ValueError, UnicodeEncodeError):
        return
    _decode_or_badmessage([magic, text if raw_header is None else raw_header, *blobs])


@NO_FIXTURE_RESET
@given(body=st.dictionaries(st.text(max_size=6), json_values, max_size=5),
       msg_id=st.integers(0, (1 << 64) - 1),
       blobs=st.lists(st.binary(max_size=64), max_size=4))
def test_ok_bodies_round_trip_or_are_refused(body: dict[str, Any], msg_id: int,
                                             blobs: list[bytes]) -> None:
    try:
        frames = encode("ok", msg_id, body, blobs)
    except Misuse as exc:
        assert exc.errno == E.EINVAL  # NaN/inf, out-of-range ints, lone surrogates
        return
    assert decode(frames) == Message("ok", msg_id, body, tuple(blobs))


def test_client_keeps_its_identity_across_a_timeout(
        start_server: Callable[..., ServerThread], ctx: zmq.Context[Any], endpoint: str) -> None:
    """The kernel knows a task by its peer identity: a lazy-pirate reconnect must keep it."""
    peers: list[bytes] = []

    def who(msg: Message, peer: bytes) -> dict[str, Any]:
        peers.append(peer)
        return {}

    served = start_server(endpoint, {"test.who": who})
    register_type("test.who")
    c = ControlClient(endpoint, timeout_ms=300, context=ctx)
    try:
        c.call("test.who")
        with pytest.raises(Timeout):
            c.call("test.slow")  # the server holds it past our timeout
        served.release.set()
        c.call("test.who")
    finally:
        c.close()
    assert len(peers) == 2 and peers[0] == peers[1] == c.identity
