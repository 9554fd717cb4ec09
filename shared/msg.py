"""Control-plane messages: the schema, the registry of message types, and the codec.

ZeroMQ carries control only (setup "syscalls", configuration, wake-ups, death notices, stats);
no payload ever crosses it (DESIGN.md §1, §4).  This module says what a message is and checks
it; :mod:`shared.control` carries messages over zmq sockets.  Neither knows io_uring semantics:
other modules declare their messages with :func:`register_type` in the one :data:`REGISTRY`
(each process registers the same declarations by importing the same modules).

Wire format
-----------
One message is one zmq multipart message::

    frame 0   b"ZCRX" + one version byte          (MAGIC_VERSION, PROTOCOL_VERSION = 1)
    frame 1   compact JSON object {"t": type, "id": request id, "b": {body fields}}
    frame 2.. binary blobs, e.g. the exact 96-byte io_uring_zcrx_ifq_reg a register call carries

A reply carries the request's ``id`` and is either ``"ok"`` (body and blobs free-form, or checked
against the request type's *reply* schema) or ``"error"`` ``{errno, msg}``.

Validation and errnos
---------------------
:func:`decode` returns a :class:`Message` or raises :class:`BadMessage` (a
:class:`~shared.errors.PeerMisbehaved`), checking in this order:

============================================================  =========
condition                                                     errno
============================================================  =========
more than MAX_FRAMES frames or MAX_MESSAGE_BYTES in all       EMSGSIZE
frame 0 is not b"ZCRX" + 1 byte, or the version byte differs  EPROTO
header frame over MAX_HEADER_BYTES                            EMSGSIZE
no frames, no header frame, header not UTF-8 JSON, NaN /      EBADMSG
Infinity literals, duplicate keys, header not an object with
exactly "t" (str), "id" (int in [0, 2**64)) and optional "b"
type name not registered                                      ENOSYS
body not an object; missing, extra or wrongly typed field     EINVAL
(a bool is never an int; ints must fit s64/u64; floats must be
finite; nesting deeper than MAX_DEPTH); wrong number or size
of blobs; a type-specific validator rejects the body
============================================================  =========

:func:`encode` runs the same checks on outgoing messages but raises
:class:`~shared.errors.Misuse` with the same errno: a bad outgoing message is the caller's bug,
a bad incoming one is the peer's.

"""

from __future__ import annotations

import copy
import errno as E
import json
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

from shared.errors import Misuse, PeerMisbehaved, ZcrxError

__all__ = [
    "MAGIC",
    "MAGIC_VERSION",
    "MAX_BLOBS",
    "MAX_DEPTH",
    "MAX_ERRNO",
    "MAX_FRAMES",
    "MAX_HEADER_BYTES",
    "MAX_MESSAGE_BYTES",
    "MAX_REPLY_HEADER_BYTES",
    "PROTOCOL_VERSION",
    "REGISTRY",
    "U64_MAX",
    "BadMessage",
    "ControlError",
    "Message",
    "MessageType",
    "Registry",
    "Schema",
    "SchemaError",
    "all_ok",
    "decode",
    "encode",
    "error_frames",
    "peek_id",
    "register_type",
]

# --------------------------------------------------------------------------- constants

MAGIC: Final = b"ZCRX"
PROTOCOL_VERSION: Final = 1
MAGIC_VERSION: Final = MAGIC + bytes([PROTOCOL_VERSION])

MAX_MESSAGE_BYTES: Final = 1 << 20
"""Largest message (sum of all frames) accepted or sent."""
MAX_HEADER_BYTES: Final = 64 << 10
"""Largest JSON header frame of a request or event: what a server parses from a peer it does
not trust stays cheap."""
MAX_REPLY_HEADER_BYTES: Final = MAX_MESSAGE_BYTES
"""Largest JSON header frame of a reply, which only a client parses, from the server it asked
(the kernel's ``stats`` and ``status`` of a 64-queue host are about 100 KB)."""
MAX_BLOBS: Final = 16
MAX_FRAMES: Final = MAX_BLOBS + 2
MAX_DEPTH: Final = 16
"""Deepest nesting of lists/objects inside a body value."""
MAX_TYPE_NAME: Final = 64
MAX_ERROR_TEXT: Final = 1024
"""Longer ``msg`` strings in error replies are truncated by the server."""

S64_MIN: Final = -(1 << 63)
U64_MAX: Final = (1 << 64) - 1
MAX_ERRNO: Final = 4095

_TYPE_NAME_RE = re.compile(r"[a-z][a-z0-9_.]*\Z")
_FIELD_TYPES: Final = (int, bool, str, float, list, dict, type(None))


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------- errors


class BadMessage(PeerMisbehaved):
    """A received message failed validation; ``errno`` says how (see the module table).

    ``msg_id`` is the request id when it could be read, so an error reply can carry it.
    """

    def __init__(self, errno: int, text: str, *, msg_id: int | None = None) -> None:
        super().__init__(text, errno)
        self.text = text
        self.msg_id = msg_id


class ControlError(ZcrxError):
    """The remote side answered a request with an ``error`` reply; ``errno`` is its errno."""

    default_errno = E.EIO

    def __init__(self, request_type: str, errno: int, remote_msg: str) -> None:
        super().__init__(f"{request_type}: {remote_msg}", errno)
        self.request_type = request_type
        self.remote_msg = remote_msg


_T = TypeVar("_T")


def all_ok(replies: Iterable[_T | ControlError]) -> list[_T]:
    """The answers of a pipelined batch (``request_many``, ``call_many``, ``syscall_many``)
    for a caller with nothing to undo request by request: the first :class:`ControlError`
    is raised (every answer is in by then), else the answers in order."""
    out: list[_T] = []
    for r in replies:
        if isinstance(r, ControlError):
            raise r
        out.append(r)
    return out


class SchemaError(Exception):
    """A body or its blobs do not fit a :class:`Schema` (raised by :meth:`Schema.check`).

    Not an error anyone sees: whoever checks turns it into :class:`BadMessage` (the peer's
    fault) or :class:`~shared.errors.Misuse` (the caller's), keeping ``errno``.
    """

    def __init__(self, text: str, errno: int = E.EINVAL) -> None:
        super().__init__(text)
        self.errno = errno
        self.text = text


# --------------------------------------------------------------------------- schema

FieldType = type | tuple[type, ...] | None


def _norm_ftype(name: str, ftype: FieldType) -> tuple[type, ...]:
    types = ftype if isinstance(ftype, tuple) else (ftype,)
    out = tuple(type(None) if t is None else t for t in types)
    if not out or any(t not in _FIELD_TYPES for t in out):
        raise Misuse(f"field {name!r}: types must be among int, bool, str, float, list, dict, "
                     f"None; got {ftype!r}")
    return out


def _type_names(types: tuple[type, ...]) -> str:
    return "|".join("null" if t is type(None) else t.__name__ for t in types)


def _check_json(where: str, value: Any, depth: int) -> Any:
    """Check a nested JSON value: bounded ints, finite floats, valid str, str keys, depth."""
    if depth > MAX_DEPTH:
        raise SchemaError(f"{where}: nested deeper than {MAX_DEPTH}")
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        if not S64_MIN <= value <= U64_MAX:
            raise SchemaError(f"{where}: integer out of s64/u64 range")
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise SchemaError(f"{where}: float is not finite")
        return value
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise SchemaError(f"{where}: string is not valid Unicode") from None
        return value
    if isinstance(value, list):
        return [_check_json(f"{where}[{i}]", v, depth + 1) for i, v in enumerate(value)]
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise SchemaError(f"{where}: object key {_short(k)} is not a string")
            _check_json(f"{where} key", k, depth + 1)
            out[k] = _check_json(f"{where}.{k}", v, depth + 1)
        return out
    raise SchemaError(f"{where}: {type(value).__name__} is not a JSON value")


def _kind(value: Any) -> type:
    """The schema type of a value: bool is its own kind, never an int."""
    if value is None:
        return type(None)
    for t in (bool, int, float, str, list, dict):
        if isinstance(value, t):
            return t
    return type(value)


def _check_field(name: str, value: Any, types: tuple[type, ...]) -> Any:
    kind = _kind(value)
    if kind not in types:
        if kind is int and float in types:  # JSON does not distinguish 1 from 1.0
            value = float(_check_json(f"field {name!r}", value, 0))
        else:
            raise SchemaError(f"field {name!r}: expected {_type_names(types)}, "
                           f"got {kind.__name__} {_short(value)}")
    return _check_json(f"field {name!r}", value, 0)


Validator = Callable[[dict[str, Any], tuple[bytes, ...]], None]
"""Extra check on a body already type-checked: raise ValueError to reject (EINVAL)."""


@dataclass(frozen=True)
class Schema:
    """The shape of a body plus its blobs.

    Build with :meth:`make`; ``required`` maps field name to type(s), ``optional`` maps name to
    ``(type(s), default)``.  ``blobs`` is an exact count or a ``(min, max)`` range;
    ``blob_sizes[i]`` is the exact size of blob ``i`` (``None``: any size up to
    ``max_blob_size``).  An ``open`` schema accepts extra fields holding any JSON value.
    """

    required: Mapping[str, tuple[type, ...]]
    optional: Mapping[str, tuple[tuple[type, ...], Any]]
    min_blobs: int = 0
    max_blobs: int = 0
    blob_sizes: tuple[int | None, ...] = ()
    max_blob_size: int = MAX_MESSAGE_BYTES
    open: bool = False
    validator: Validator | None = None

    @classmethod
    def make(cls, required: Mapping[str, FieldType] | None = None,
             optional: Mapping[str, tuple[FieldType, Any]] | None = None, *,
             blobs: int | tuple[int, int] = 0, blob_sizes: Sequence[int | None] = (),
             max_blob_size: int | None = None, open: bool = False,
             validator: Validator | None = None) -> Schema:
        """Build a schema, checking the declaration itself (raises :class:`Misuse`)."""
        req = {n: _norm_ftype(n, t) for n, t in (required or {}).items()}
        opt: dict[str, tuple[tuple[type, ...], Any]] = {}
        for n, spec in (optional or {}).items():
            if not (isinstance(spec, tuple) and len(spec) == 2):
                raise Misuse(f"optional field {n!r}: give (type, default)")
            types = _norm_ftype(n, spec[0])
            try:
                default = _check_field(n, spec[1], types)
            except SchemaError as exc:
                raise Misuse(f"optional field {n!r}: bad default: {exc.text}") from None
            opt[n] = (types, default)
        for n in (*req, *opt):
            if not isinstance(n, str) or not n:
                raise Misuse(f"field name {n!r} must be a non-empty str")
        if set(req) & set(opt):
            raise Misuse(f"fields both required and optional: {sorted(set(req) & set(opt))}")
        lo, hi = (blobs, blobs) if isinstance(blobs, int) else blobs
        if not 0 <= lo <= hi <= MAX_BLOBS:
            raise Misuse(f"blob count {blobs!r} must be within 0..{MAX_BLOBS}")
        sizes = tuple(blob_sizes)
        if len(sizes) > hi or any(s is not None and not 0 <= s <= MAX_MESSAGE_BYTES
                                  for s in sizes):
            raise Misuse(f"blob_sizes {sizes!r} do not fit {hi} blobs of at most "
                         f"{MAX_MESSAGE_BYTES} bytes")
        mbs = MAX_MESSAGE_BYTES if max_blob_size is None else max_blob_size
        if not 0 <= mbs <= MAX_MESSAGE_BYTES:
            raise Misuse(f"max_blob_size {mbs} out of range")
        return cls(req, opt, lo, hi, sizes, mbs, open, validator)

    def check(self, body: Any, blobs: Sequence[bytes]) -> dict[str, Any]:
        """Validate ``body`` and ``blobs``; return the body with defaults filled in."""
        if not isinstance(body, dict):
            raise SchemaError(f"body is {type(body).__name__}, not an object")
        out: dict[str, Any] = {}
        for name, types in self.required.items():
            if name not in body:
                raise SchemaError(f"missing field {name!r}")
            out[name] = _check_field(name, body[name], types)
        for name, (types, default) in self.optional.items():
            if name in body:
                out[name] = _check_field(name, body[name], types)
            else:
                out[name] = copy.deepcopy(default)
        for name in body:
            if name in out:
                continue
            if not self.open:
                raise SchemaError(f"unexpected field {_short(name)}")
            if not isinstance(name, str):
                raise SchemaError(f"field name {_short(name)} is not a string")
            _check_json("field name", name, 0)
            out[name] = _check_json(f"field {name!r}", body[name], 0)
        n = len(blobs)
        if not self.min_blobs <= n <= self.max_blobs:
            want = (str(self.min_blobs) if self.min_blobs == self.max_blobs
                    else f"{self.min_blobs}..{self.max_blobs}")
            raise SchemaError(f"expected {want} blob(s), got {n}")
        for i, blob in enumerate(blobs):
            size = len(blob)
            exact = self.blob_sizes[i] if i < len(self.blob_sizes) else None
            if exact is not None and size != exact:
                raise SchemaError(f"blob {i} is {size} bytes, expected exactly {exact}")
            if size > self.max_blob_size:
                raise SchemaError(f"blob {i} is {size} bytes, more than {self.max_blob_size}")
        if self.validator is not None:
            try:
                self.validator(out, tuple(blobs))
            except ValueError as exc:
                raise SchemaError(str(exc) or "rejected by validator") from None
        return out


@dataclass(frozen=True)
class MessageType:
    """A registered message: its name, request schema, and optional ok-reply schema."""

    name: str
    schema: Schema
    reply: Schema | None = None
    doc: str = ""


class Registry:
    """Message types by name.  The module-level :data:`REGISTRY` is the one everyone uses."""

    def __init__(self) -> None:
        self._types: dict[str, MessageType] = {}

    def register(self, mtype: MessageType) -> MessageType:
        """Add ``mtype``; registering an identical type again is a no-op.

        Raises :class:`Misuse` (EEXIST) when the name is taken by a different declaration,
        (EINVAL) when the name is not ``[a-z][a-z0-9_.]*`` of at most MAX_TYPE_NAME chars.
        """
        if not (_TYPE_NAME_RE.match(mtype.name) and len(mtype.name) <= MAX_TYPE_NAME):
            raise Misuse(f"bad message type name {mtype.name!r}")
        old = self._types.get(mtype.name)
        if old is not None:
            if old == mtype:
                return old
            raise Misuse(f"message type {mtype.name!r} already registered differently",
                         E.EEXIST)
        self._types[mtype.name] = mtype
        return mtype

    def get(self, name: str) -> MessageType | None:
        """The type called ``name``, or None."""
        return self._types.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._types

    def names(self) -> list[str]:
        """All registered names, sorted."""
        return sorted(self._types)

    def copy(self) -> Registry:
        """An independent registry with the same types (handy in tests)."""
        new = Registry()
        new._types = dict(self._types)
        return new


REGISTRY: Final = Registry()


def register_type(name: str, required: Mapping[str, FieldType] | None = None,
                  optional: Mapping[str, tuple[FieldType, Any]] | None = None, *,
                  blobs: int | tuple[int, int] = 0, blob_sizes: Sequence[int | None] = (),
                  max_blob_size: int | None = None, open: bool = False,
                  validator: Validator | None = None, reply: Schema | None = None,
                  doc: str = "", registry: Registry | None = None) -> MessageType:
    """Declare a message type (see :class:`Schema` for the arguments) and return it.

    ``reply`` is the schema of the body/blobs of the ``ok`` reply to this request; clients check
    replies against it and servers check what handlers return.  Example::

        IFQ_REG = register_type("zcrx_ifq_reg", {"ring_fd": int}, blobs=1, blob_sizes=(96,),
                                reply=Schema.make(blobs=1, blob_sizes=(96,)))
    """
    schema = Schema.make(required, optional, blobs=blobs, blob_sizes=blob_sizes,
                         max_blob_size=max_blob_size, open=open, validator=validator)
    reg = REGISTRY if registry is None else registry
    return reg.register(MessageType(name, schema, reply, doc))


def _check_error_body(body: dict[str, Any], _blobs: tuple[bytes, ...]) -> None:
    if not 1 <= body["errno"] <= MAX_ERRNO:
        raise ValueError(f"errno {body['errno']} not in 1..{MAX_ERRNO}")


OK: Final = register_type("ok", open=True, blobs=(0, MAX_BLOBS),
                          doc="Success reply; body and blobs depend on the request.")
ERROR: Final = register_type("error", {"errno": int, "msg": str}, validator=_check_error_body,
                             doc="Failure reply: positive Linux errno and a text.")
HELLO: Final = register_type(
    "hello", {"role": str, "pid": int, "version": int},
    reply=Schema.make({"role": str, "pid": int, "version": int}),
    doc="Introduce the caller; the reply introduces the server.  Version must match.")
PING: Final = register_type("ping", reply=Schema.make(), doc="Liveness check.")
EOS: Final = register_type("eos", reply=Schema.make(),
                           doc="End of stream: the sender will send nothing more; acked with ok.")
BYE: Final = register_type("bye", reply=Schema.make(), doc="The sender is going away.")


# --------------------------------------------------------------------------- codec


@dataclass(frozen=True, slots=True)
class Message:
    """One decoded, validated message.  ``body`` has every declared field (defaults filled)."""

    type: str
    id: int
    body: dict[str, Any] = field(default_factory=dict)
    blobs: tuple[bytes, ...] = ()


def _valid_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= U64_MAX


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("duplicate key in object")
    return out


def _parse_json(raw: bytes) -> Any:
    """Strict JSON: UTF-8 only, no NaN/Infinity, no duplicate keys.  Raises ValueError."""
    try:
        text = bytes(raw).decode("utf-8")
        return json.loads(text, parse_constant=_reject_constant,
                          object_pairs_hook=_no_duplicate_keys)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def peek_id(frames: Sequence[bytes]) -> int | None:
    """Best-effort request id of a possibly malformed message, for addressing an error reply."""
    try:
        if len(frames) < 2 or len(frames[1]) > MAX_HEADER_BYTES:
            return None
        header = _parse_json(frames[1])
        if isinstance(header, dict) and _valid_id(header.get("id")):
            return int(header["id"])
    except Exception:
        return None
    return None


def decode(frames: Sequence[bytes], registry: Registry | None = None, *,
           max_header: int = MAX_HEADER_BYTES) -> Message:
    """Parse and validate one message (the frames after any routing identity).

    ``max_header`` bounds the JSON header frame (:data:`MAX_REPLY_HEADER_BYTES` for a client
    reading its replies).

    Returns a :class:`Message`; raises :class:`BadMessage` with the errno of the module table.
    Never raises anything else for any input of byte strings.
    """
    reg = REGISTRY if registry is None else registry
    n = len(frames)
    if n == 0:
        raise BadMessage(E.EBADMSG, "empty message")
    if n > MAX_FRAMES:
        raise BadMessage(E.EMSGSIZE, f"{n} frames, at most {MAX_FRAMES} allowed",
                         msg_id=peek_id(frames))
    total = sum(len(f) for f in frames)
    if total > MAX_MESSAGE_BYTES:
        raise BadMessage(E.EMSGSIZE, f"{total} bytes, at most {MAX_MESSAGE_BYTES} allowed",
                         msg_id=peek_id(frames))
    head = bytes(frames[0])
    if len(head) != len(MAGIC_VERSION) or head[: len(MAGIC)] != MAGIC:
        raise BadMessage(E.EPROTO, f"bad magic {_short(head[:16])}", msg_id=peek_id(frames))
    if head[-1] != PROTOCOL_VERSION:
        raise BadMessage(E.EPROTO, f"protocol version {head[-1]}, expected {PROTOCOL_VERSION}",
                         msg_id=peek_id(frames))
    if n < 2:
        raise BadMessage(E.EBADMSG, "truncated: no header frame")
    if len(frames[1]) > max_header:
        raise BadMessage(E.EMSGSIZE, f"header of {len(frames[1])} bytes, at most "
                                     f"{max_header} allowed")
    try:
        header = _parse_json(frames[1])
    except ValueError as exc:
        raise BadMessage(E.EBADMSG, f"undecodable header: {exc}") from None
    if not isinstance(header, dict):
        raise BadMessage(E.EBADMSG, "header is not a JSON object")
    msg_id = header.get("id")
    if not _valid_id(msg_id):
        raise BadMessage(E.EBADMSG, f"header id {_short(msg_id)} is not an int in [0, 2**64)")
    assert isinstance(msg_id, int)
    extra = set(header) - {"t", "id", "b"}
    if extra:
        raise BadMessage(E.EBADMSG, f"unknown header keys {sorted(extra)}", msg_id=msg_id)
    name = header.get("t")
    if not isinstance(name, str) or not name:
        raise BadMessage(E.EBADMSG, f"header type {_short(name)} is not a string",
                         msg_id=msg_id)
    mtype = reg.get(name)
    if mtype is None:
        raise BadMessage(E.ENOSYS, f"unknown message type {_short(name)}", msg_id=msg_id)
    blobs = tuple(bytes(f) for f in frames[2:])
    try:
        body = mtype.schema.check(header.get("b", {}), blobs)
    except SchemaError as exc:
        raise BadMessage(exc.errno, f"{name}: {exc.text}", msg_id=msg_id) from None
    return Message(name, msg_id, body, blobs)


def encode(type: str, msg_id: int, body: Mapping[str, Any] | None = None,
           blobs: Iterable[bytes | bytearray | memoryview] = (),
           registry: Registry | None = None, *,
           max_header: int = MAX_HEADER_BYTES) -> list[bytes]:
    """Validate and serialize one message into frames (``max_header``: as :func:`decode`).

    Raises :class:`Misuse` with the errno :func:`decode` would give the peer (ENOSYS, EINVAL,
    EMSGSIZE), so a bad message never leaves this process.
    """
    reg = REGISTRY if registry is None else registry
    mtype = reg.get(type)
    if mtype is None:
        raise Misuse(f"unknown message type {type!r}", E.ENOSYS)
    if not _valid_id(msg_id):
        raise Misuse(f"message id {msg_id!r} is not an int in [0, 2**64)")
    blob_list = [bytes(b) for b in blobs]
    if len(blob_list) + 2 > MAX_FRAMES:
        raise Misuse(f"{len(blob_list)} blobs, at most {MAX_BLOBS}", E.EMSGSIZE)
    try:
        checked = mtype.schema.check(dict(body or {}), blob_list)
    except SchemaError as exc:
        raise Misuse(f"{type}: {exc.text}", exc.errno) from None
    header = json.dumps({"t": type, "id": msg_id, "b": checked}, separators=(",", ":"),
                        allow_nan=False).encode("ascii")
    if len(header) > max_header:
        raise Misuse(f"{type}: header of {len(header)} bytes, at most {max_header}",
                     E.EMSGSIZE)
    frames = [MAGIC_VERSION, header, *blob_list]
    total = sum(len(f) for f in frames)
    if total > MAX_MESSAGE_BYTES:
        raise Misuse(f"{type}: {total} bytes, at most {MAX_MESSAGE_BYTES}", E.EMSGSIZE)
    return frames


def error_frames(msg_id: int, errno: int, text: str) -> list[bytes]:
    """An ``error`` reply; never raises for errno in 1..MAX_ERRNO, whatever the text."""
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")  # lone surrogates
    if len(text) > MAX_ERROR_TEXT:
        text = text[: MAX_ERROR_TEXT - 3] + "..."
    return encode("error", msg_id, {"errno": errno, "msg": text})
