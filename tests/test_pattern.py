"""The verifiable byte pattern: fill/verify agree everywhere, errors are located, streams differ."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared import pattern
from shared.pattern import PERIOD

P = PERIOD
offsets = st.one_of(
    st.integers(0, 3 * P),  # around the period wrap
    st.integers(P - 64, P + 64),
    st.integers(0, 2**63 - 1),
)
lengths = st.one_of(st.integers(0, 9000), st.integers(P - 8, P + 8), st.integers(0, 3 * P + 5))
streams = st.integers(0, 2**40)


def reference(stream: int, offset: int, length: int) -> np.ndarray:
    """Byte-by-byte definition: BASE[(o + phase(s)) % P]."""
    idx = (np.arange(length, dtype=np.int64) + (offset % P) + pattern.phase(stream)) % P
    return pattern.BASE[idx]


def test_base_is_pinned() -> None:
    """The pattern is part of the ABI: a change to BASE breaks every recorded stream."""
    assert pattern.BASE.shape == (P,)
    assert pattern.BASE.dtype == np.uint8
    # Not a degenerate table: every byte value appears, none dominates.
    counts = np.bincount(pattern.BASE, minlength=256)
    assert counts.min() > 0 and counts.max() < 2 * P // 256
    digest = hashlib.sha256(pattern.BASE.tobytes()).hexdigest()
    assert digest == pattern.expected_sha256(0, P)  # stream 0 has phase 0
    assert digest[:16] == BASE_SHA256_PREFIX


BASE_SHA256_PREFIX = "5440062464a19c9e"


@settings(max_examples=200, deadline=None)
@given(streams, offsets, lengths)
def test_fill_matches_reference_and_verifies(stream: int, offset: int, length: int) -> None:
    buf = np.empty(length, dtype=np.uint8)
    pattern.fill(stream, offset, buf)
    assert np.array_equal(buf, reference(stream, offset, length))
    assert pattern.verify(stream, offset, buf) == -1
    assert pattern.verify(stream, offset, buf.tobytes()) == -1


@settings(max_examples=200, deadline=None)
@given(streams, offsets, st.integers(1, 3 * P + 5), st.data())
def test_single_flipped_byte_is_located(
    stream: int, offset: int, length: int, data: st.DataObject
) -> None:
    buf = bytearray(length)
    pattern.fill(stream, offset, buf)
    i = data.draw(st.integers(0, length - 1))
    buf[i] ^= data.draw(st.integers(1, 255))
    assert pattern.verify(stream, offset, buf) == i


def test_first_of_several_mismatches_is_reported() -> None:
    buf = bytearray(pattern.pattern_bytes(7, 100, 3 * P))
    for i in (P + 5, 2 * P + 1, P + 4):
        buf[i] ^= 0x80
    assert pattern.verify(7, 100, buf) == P + 4


@settings(max_examples=100, deadline=None)
@given(streams, offsets, st.integers(0, 2 * P), st.integers(0, 2 * P))
def test_pattern_depends_only_on_stream_offset(stream: int, offset: int, a: int, b: int) -> None:
    """Any chunking of a stream gives the same bytes, so a chunk verifies on its own."""
    whole = pattern.pattern_bytes(stream, offset, a + b)
    parts = pattern.pattern_bytes(stream, offset, a) + pattern.pattern_bytes(stream, offset + a, b)
    assert parts == whole
    assert pattern.verify(stream, offset + a, whole[a:]) == -1


def test_wrong_offset_is_caught() -> None:
    data = pattern.pattern_bytes(3, 4096, 4096)
    for wrong in (0, 4095, 4097, 8192, 4096 + 65536, 4096 + 2**32):
        assert pattern.verify(3, wrong, data) != -1
    assert pattern.verify(3, 4096 + P, data) == -1  # the period itself


def test_streams_differ() -> None:
    n = 64
    chunks = np.stack([pattern.rows(s, 12345, 4096)[0] for s in range(n)])
    for s in range(n):
        same = (chunks == chunks[s]).mean(axis=1)
        same[s] = 0
        assert same.max() < 0.05  # random bytes agree ~1/256 of the time
    assert pattern.verify(1, 0, pattern.pattern_bytes(2, 0, 100)) != -1


def test_first_period_of_streams_have_distinct_phases() -> None:
    ph = pattern.phases(np.arange(P))
    assert np.unique(ph).shape[0] == P
    assert all(pattern.phase(s) == ph[s] for s in (0, 1, 2, 1000, P - 1))
    assert pattern.phase(P + 5) == pattern.phase(5)


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.tuples(streams, offsets), min_size=1, max_size=20),
    st.integers(0, P),
)
def test_rows_match_fill(pairs: list[tuple[int, int]], width: int) -> None:
    s = np.array([p[0] for p in pairs], dtype=np.int64)
    o = np.array([p[1] for p in pairs], dtype=np.uint64)
    got = pattern.rows(s, o, width)
    assert got.shape == (len(pairs), width)
    for i, (si, oi) in enumerate(pairs):
        assert pattern.verify(si, oi, got[i]) == -1
    out = np.zeros((len(pairs), width + 3), np.uint8)[:, 1 : width + 1]
    pattern.fill_rows(s, o, out)
    assert np.array_equal(out, got)
    pos = (o % np.uint64(P)) + pattern.phases(s).astype(np.uint64)  # unreduced, < 2P
    assert np.array_equal(pattern.rows_at(pos, width), got)


def test_rows_width_limit() -> None:
    with pytest.raises(ValueError):
        pattern.rows([0], [0], P + 1)


def test_fill_accepts_buffers_and_strided_views() -> None:
    ref = pattern.pattern_bytes(9, 77, 1000)
    ba = bytearray(1000)
    pattern.fill(9, 77, ba)
    assert bytes(ba) == ref
    mv = memoryview(bytearray(1000))
    pattern.fill(9, 77, mv)
    assert mv.tobytes() == ref
    strided = np.zeros(2000, np.uint8)[::2]
    pattern.fill(9, 77, strided)
    assert strided.tobytes() == ref
    assert pattern.verify(9, 77, strided) == -1
    assert pattern.verify(9, 77, memoryview(ref)) == -1
    assert pattern.verify(9, 77, b"") == -1


@pytest.mark.parametrize("total", [0, 1, 4096, P, P + 1, 3 * P + 17])
@pytest.mark.parametrize("chunk", [1000, P, 1 << 20])
def test_expected_sha256_streams(total: int, chunk: int) -> None:
    want = hashlib.sha256(pattern.pattern_bytes(5, 11, total)).hexdigest()
    assert pattern.expected_sha256(5, total, offset=11, chunk=chunk) == want
