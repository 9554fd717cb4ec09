"""Check ``shared/abi.py`` against the team's reference ``uapi-layouts.md``, by parsing it.

The reference is a markdown file outside the repository (``<team>/shared/reference``, next to
the clone).  Its struct tables (columns off / size / type / field), inline layouts
(```name` u64 @0, ...``, ``{ u64 a; u64 b; }``), constant tables (``| name | value |``) and
inline constant lists (``IOSQE_FIXED_FILE 1<<0, ...``, ``BUFFERS 0, ... ZCRX_IFQ 32``) are
parsed and every number is compared with the dtypes and constants.  Every parser asserts a
minimum number of rows, so a parser broken by an edit of the markdown fails loudly instead of
checking nothing.

Where our dtype deliberately spells a field differently from the uapi text, or does not model
it as a separate field, the per-table ``aliases`` say so explicitly.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared import abi

REFERENCE = (
    Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "uapi-layouts.md"
)


@pytest.fixture(scope="module")
def md() -> str:
    """The reference markdown, or skip if the team folder is not beside the clone."""
    if not REFERENCE.is_file():
        pytest.skip(f"reference {REFERENCE} not found (team folder must sit beside the clone)")
    return REFERENCE.read_text(encoding="utf-8")


# ============================================================================================
# Markdown parsing helpers
# ============================================================================================

_CTYPE = re.compile(r"(?<![A-Za-z0-9])(?:__)?([us])(8|16|32|64)(?![0-9])")


def _ctype(text: str) -> np.dtype | None:
    """The first C scalar type named in ``text`` (``__u32``, ``u64[2]``, ``s32``) as numpy."""
    if "__kernel_rwf_t" in text:
        return np.dtype("<i4")
    m = _CTYPE.search(text)
    if m is None:
        return None
    kind = "u" if m.group(1) == "u" else "i"
    return np.dtype(f"<{kind}{int(m.group(2)) // 8}")


def _eval(expr: str) -> int:
    """Evaluate a constant as written in the reference: ``1<<n``, hex, decimal, or ``X = Y``."""
    expr = re.sub(r"\([^()]*\)\s*$", "", expr).strip()  # trailing "(7.0)" style notes
    if "=" in expr:  # "1<<0 = 0x1", "~((1<<48)-1) = 0xFFFF000000000000": the last form wins
        parts = [p.strip() for p in expr.split("=")]
        values = {_eval(p) for p in parts if not p.startswith("~")}
        assert len(values) == 1, f"inconsistent constant expression {expr!r}"
        return values.pop()
    expr = expr.replace("**", "").replace("`", "").strip()
    m = re.fullmatch(r"(\d+)\s*<<\s*(\d+)", expr)
    if m:
        return int(m.group(1)) << int(m.group(2))
    return int(expr, 0)


def _split_row(line: str) -> list[str]:
    """Cells of a markdown table row (escaped ``\\|`` does not split)."""
    body = line.strip()
    body = body.removeprefix("|").removesuffix("|")
    return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", body)]


def _table_after(md: str, anchor: str) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the first markdown table after the regex ``anchor``."""
    m = re.search(anchor, md, re.M)
    assert m, f"anchor {anchor!r} not found in the reference"
    lines = md[m.end():].splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.lstrip().startswith("|"))
    block = []
    for ln in lines[start:]:
        if not ln.lstrip().startswith("|"):
            break
        block.append(ln)
    header = _split_row(block[0])
    rows = [_split_row(ln) for ln in block[1:] if not re.fullmatch(r"[\s|:-]+", ln)]
    return header, rows


def _field_names(cell: str) -> list[tuple[str, np.dtype | None]]:
    """Backticked field names in a field cell, each with its ``(type)`` annotation if any.

    Text inside parentheses is commentary (``(out)``, ``(7.0+; before that `__resv2`)``) and is
    skipped, except that a parenthesised C type right after a name annotates that name.
    """
    s = cell.replace("**", "")
    out: list[tuple[str, np.dtype | None]] = []
    i, last_name_end = 0, -1
    while i < len(s):
        c = s[i]
        if c == "`":
            j = s.index("`", i + 1)
            out.append((s[i + 1:j], None))
            last_name_end = i = j + 1
            continue
        if c == "(":
            depth, j = 0, i
            while j < len(s):
                depth += {"(": 1, ")": -1}.get(s[j], 0)
                if depth == 0:
                    break
                j += 1
            group = s[i + 1:j].replace("`", "").strip()
            is_type = re.fullmatch(r"(?:__)?[us](?:8|16|32|64)|__kernel_rwf_t", group)
            if out and is_type and s[last_name_end:i].strip() == "":
                out[-1] = (out[-1][0], _ctype(group))
            i = j + 1
            continue
        i += 1
    return out


def _find_col(header: list[str], wanted: str) -> int:
    """Index of the column named ``wanted`` (exact match preferred, else a prefix match)."""
    for i, h in enumerate(header):
        if h == wanted:
            return i
    for i, h in enumerate(header):
        if h.startswith(wanted):
            return i
    raise AssertionError(f"column {wanted!r} not in table header {header}")


@dataclass
class Entry:
    """One documented field: where the reference says it lives."""

    name: str
    off: int
    sizes: set[int]
    ctype: np.dtype | None  # element type if the reference states one
    source: str  # for messages


def _struct_table(md: str, anchor: str, field_col: str) -> list[Entry]:
    header, rows = _table_after(md, anchor)
    c_off, c_size = _find_col(header, "off"), _find_col(header, "size")
    c_type = next((i for i, h in enumerate(header) if h.endswith("type")), None)
    c_field = _find_col(header, field_col)
    entries = []
    for r in rows:
        off = int(r[c_off].replace("*", ""))
        sizes_txt = r[c_size].replace("*", "")
        if not re.fullmatch(r"\d+(/\d+)*", sizes_txt):
            sizes: set[int] = set()  # e.g. "16·n": unbounded array, checked via aliases
        else:
            sizes = {int(x) for x in sizes_txt.split("/")}
        row_type = None if c_type is None else r[c_type]
        row_ctype = None
        if row_type is not None and (
            row_type.startswith("union of") or not row_type.startswith(("struct", "union"))
        ):
            row_ctype = _ctype(row_type)  # "union of `__u32` flag words" still names a type
        names = _field_names(r[c_field])
        if not names and row_type is not None:
            # e.g. `__u64 big_cqe[]`: the name sits in the type cell, the field cell is prose.
            m = re.search(r"`(?:__)?[us](?:8|16|32|64) (\w+)(?:\[\d*\])?`", row_type)
            names = [(m.group(1), None)] if m else []
        for name, annot in names:
            # A per-name annotation such as `poll_events`(u16) overrides the row's size/type.
            own_sizes = {annot.itemsize} if annot is not None else sizes
            entries.append(Entry(name, off, own_sizes, annot or row_ctype, f"row @{off}: {r}"))
    return entries


_INLINE_NAME_TYPE = re.compile(
    r"`(\w+)`\s+([us](?:8|16|32|64))(?:\[(\d+)\])?(?:\s*@(\d+))?"
)
_INLINE_C_DECL = re.compile(r"([us](?:8|16|32|64))\s+(\w+)(?:\[(\d+)\])?(?:\s*@(\d+))?\s*;")


def _inline_struct(md: str, anchor: str, end: str) -> tuple[int | None, list[Entry]]:
    """Fields of a struct described in prose (```a` u64 @0, ...`` or ``{ u64 a; u64 b; }``).

    Returns the size captured by group 1 of ``anchor`` (if any) and the fields; missing
    offsets are computed sequentially with natural alignment.
    """
    m = re.search(anchor, md, re.S)
    assert m, f"anchor {anchor!r} not found in the reference"
    size = int(m.group(1)) if m.re.groups >= 1 and m.group(1) else None
    text = md[m.start():]
    text = text[: text.index(end) + 1]
    hits = []
    for mm in _INLINE_NAME_TYPE.finditer(text):
        hits.append((mm.group(1), mm.group(2), mm.group(3), mm.group(4)))
    if not hits:
        for mm in _INLINE_C_DECL.finditer(text):
            hits.append((mm.group(2), mm.group(1), mm.group(3), mm.group(4)))
    entries, pos = [], 0
    for name, t, count, off_txt in hits:
        ct = _ctype(t)
        assert ct is not None
        n = int(count) if count else 1
        off = int(off_txt) if off_txt else -(-pos // ct.itemsize) * ct.itemsize
        entries.append(Entry(name, off, {ct.itemsize * n}, ct, f"inline {anchor!r}"))
        pos = off + ct.itemsize * n
    return size, entries


# ============================================================================================
# Struct specifications: which reference text describes which dtype
# ============================================================================================

# An alias value is either our field name in the same dtype, (dtype name, field name) for a
# field checked in another dtype, or None for a documented name we deliberately do not model
# as a separate field (with the reason next to it).
Alias = str | tuple[str, str] | None


@dataclass
class TableSpec:
    dtype: str
    anchor: str
    field_col: str = "field"
    min_entries: int = 1
    aliases: dict[str, Alias] = field(default_factory=dict)


@dataclass
class InlineSpec:
    dtype: str
    anchor: str
    end: str
    min_entries: int = 1
    aliases: dict[str, Alias] = field(default_factory=dict)
    base: int = 0  # the described struct sits at this offset inside our dtype


def _struct_anchor(name: str) -> str:
    """A line that starts (after an optional heading) with ```struct NAME``` and a size."""
    return rf"^(?:#+ [\d.]+ )?`struct {name}`[^\n]*?(\d+) bytes"


TABLES = [
    TableSpec(
        "io_uring_sqe", _struct_anchor("io_uring_sqe"), "field(s)", 45,
        aliases={
            "__pad2[1]": "__pad2",  # C declaration `__u64 __pad2[1]`, not an index
            "cmd[0]": None,  # start of cmd[]: checked as the 80-byte `cmd` row (SQE128)
            "cmd": ("io_uring_sqe128", "cmd"),
        },
    ),
    TableSpec(
        "io_uring_cqe", _struct_anchor("io_uring_cqe"), "field", 4,
        aliases={"big_cqe": ("io_uring_cqe32", "big_cqe")},  # present only in 32-byte CQEs
    ),
    TableSpec(
        "io_uring_cqe32", r"^32-byte CQE for RECV_ZC", "field", 5,
        aliases={"zcrx_cqe.off": "zcrx_off", "zcrx_cqe.__pad": "zcrx_pad"},
    ),
    TableSpec("io_sqring_offsets", _struct_anchor("io_sqring_offsets"), "field", 9),
    TableSpec("io_cqring_offsets", _struct_anchor("io_cqring_offsets"), "field", 9),
    TableSpec("io_uring_params", _struct_anchor("io_uring_params"), "field", 10),
    TableSpec("io_uring_zcrx_rqe", _struct_anchor("io_uring_zcrx_rqe"), "field", 3),
    TableSpec("io_uring_zcrx_offsets", _struct_anchor("io_uring_zcrx_offsets"), "field", 5),
    TableSpec("io_uring_zcrx_area_reg", _struct_anchor("io_uring_zcrx_area_reg"), "field", 6),
    TableSpec(
        "io_uring_zcrx_ifq_reg", _struct_anchor("io_uring_zcrx_ifq_reg"),
        "liburing 2026-08", 11,
    ),
    TableSpec("io_uring_region_desc", _struct_anchor("io_uring_region_desc"), "field", 6),
    TableSpec(
        "zcrx_ctrl", _struct_anchor("zcrx_ctrl"), "field", 6,
        aliases={
            # The anonymous 48-byte union: exposed through its members (InlineSpecs below).
            "zc_export": None, "zc_flush": None,
            "zc_arm_event": None,  # post-7.1 mainline only, not modelled
        },
    ),
    TableSpec("io_uring_query_zcrx", _struct_anchor("io_uring_query_zcrx"), "field", 7),
    TableSpec("io_uring_buf", _struct_anchor("io_uring_buf"), "field", 4),
    TableSpec(
        "io_uring_buf_ring", r"^`struct io_uring_buf_ring`", "field", 5,
        aliases={"bufs": None},  # the ring is simply an array of io_uring_buf
    ),
    TableSpec("io_uring_buf_reg", _struct_anchor("io_uring_buf_reg"), "current liburing", 6),
]

INLINES = [
    InlineSpec("io_uring_zcrx_cqe", r"`struct io_uring_zcrx_cqe`: (\d+) bytes", ".", 2),
    InlineSpec(
        "io_uring_mem_region_reg", r"`struct io_uring_mem_region_reg`[^:]*: (\d+) bytes", ".", 3
    ),
    InlineSpec("io_uring_query_hdr", r"`struct io_uring_query_hdr`: (\d+) bytes", ".", 6),
    InlineSpec(
        "zcrx_ctrl", r"`zcrx_ctrl_flush_rq \{", "}", 1,
        aliases={"__resv": "flush_rq_resv"}, base=24,
    ),
    InlineSpec(
        "zcrx_ctrl", r"`zcrx_ctrl_export \{", "}", 2,
        aliases={"zcrx_fd": "export_zcrx_fd", "__resv1": "export_resv1"}, base=24,
    ),
    InlineSpec("io_uring_query_scq", r"`io_uring_query_scq \{[^}]*\}`, (\d+) bytes", "}", 2),
    InlineSpec("zcrx_stats", r"`struct zcrx_stats \{[^}]*\}`\s*is (\d+) bytes", "}", 2),
    InlineSpec("io_uring_buf_status", r"`struct io_uring_buf_status` is (\d+) bytes", ")", 3),
    InlineSpec(
        "io_uring_getevents_arg", r"`struct io_uring_getevents_arg` is (\d+) bytes", ")", 4
    ),
]


def _dtype(name: str) -> np.dtype:
    dt = getattr(abi, name)
    assert isinstance(dt, np.dtype), f"abi.{name} is not a dtype"
    return dt


def _resolve(dtype_name: str, entry: Entry, aliases: dict[str, Alias]) -> Iterator[
    tuple[str, str, int, int]
]:
    """Yield (dtype, field, element offset, size or -1) for one documented name.

    The element offset is 0 unless the name indexes an array field (`__resv[1..2]`), in which
    case it is the byte offset of the first named element inside the field.
    """
    name = entry.name
    target: Alias = aliases.get(name, name)
    if target is None:
        return
    dt_name, fname = (dtype_name, target) if isinstance(target, str) else target
    # Indexed names such as `__resv[0]` or `__resv[1..2]` address elements of an array field.
    m = re.fullmatch(r"(\w+)\[(\d+)(?:\.\.(\d+))?\]", fname)
    if m:
        base_name, lo = m.group(1), int(m.group(2))
        hi = int(m.group(3)) if m.group(3) else lo
        fields = _dtype(dt_name).fields
        assert fields is not None and base_name in fields, f"{dt_name} has no {base_name!r}"
        elem = fields[base_name][0].base.itemsize
        yield dt_name, base_name, lo * elem, (hi - lo + 1) * elem
        return
    yield dt_name, fname, 0, -1


def _check_entry(dtype_name: str, entry: Entry, aliases: dict[str, Alias], base: int) -> None:
    for dt_name, fname, elem_off, index_size in _resolve(dtype_name, entry, aliases):
        dt = _dtype(dt_name)
        assert dt.fields is not None and fname in dt.fields, (
            f"{dt_name} has no field {fname!r} (reference {entry.source})"
        )
        sub, foff = dt.fields[fname][:2]
        where = f"{dt_name}.{fname} (reference {entry.name!r}, {entry.source})"
        assert foff + elem_off == entry.off + base, (
            f"{where}: offset {foff + elem_off} != {entry.off + base}"
        )
        size = index_size if index_size >= 0 else sub.itemsize
        if entry.sizes:
            assert size in entry.sizes, f"{where}: size {size} not in {sorted(entry.sizes)}"
        if entry.ctype is not None and sub.names is None:
            assert sub.base == entry.ctype, f"{where}: type {sub.base} != {entry.ctype}"


@pytest.mark.parametrize("spec", TABLES, ids=[f"{s.dtype}" for s in TABLES])
def test_struct_table(md: str, spec: TableSpec) -> None:
    """Every field of a reference struct table sits at the documented offset/size/type."""
    entries = _struct_table(md, spec.anchor, spec.field_col)
    assert len(entries) >= spec.min_entries, (
        f"parsed only {len(entries)} fields for {spec.dtype}; the table parser is broken"
    )
    m = re.search(spec.anchor, md, re.M)
    assert m is not None
    if m.re.groups >= 1 and m.group(1):
        assert _dtype(spec.dtype).itemsize == int(m.group(1))
    for e in entries:
        _check_entry(spec.dtype, e, spec.aliases, 0)
    # Reverse direction: every field of our dtype is documented by this table.
    documented = set()
    for e in entries:
        for dt_name, fname, _, _ in _resolve(spec.dtype, e, spec.aliases):
            if dt_name == spec.dtype:
                documented.add(fname)
    undocumented = set(_dtype(spec.dtype).names or ()) - documented
    allowed = {
        # the zcrx_ctrl union members are documented inline (test_inline_struct)
        "zcrx_ctrl": {"flush_rq_resv", "export_zcrx_fd", "export_resv1"},
        # big_cqe is in the io_uring_cqe table (size 0/16)
        "io_uring_cqe32": {"big_cqe"},
    }.get(spec.dtype, set())
    assert undocumented <= allowed, f"{spec.dtype} fields not in the reference: {undocumented}"


@pytest.mark.parametrize("spec", INLINES, ids=[f"{s.dtype}:{s.anchor[:24]}" for s in INLINES])
def test_inline_struct(md: str, spec: InlineSpec) -> None:
    """Structs the reference describes in prose have the documented layout."""
    size, entries = _inline_struct(md, spec.anchor, spec.end)
    assert len(entries) >= spec.min_entries, (
        f"parsed only {len(entries)} fields for {spec.dtype}; the inline parser is broken"
    )
    if size is not None:
        assert _dtype(spec.dtype).itemsize == size
    for e in entries:
        _check_entry(spec.dtype, e, spec.aliases, spec.base)
    if spec.base == 0:
        names = {spec.aliases.get(e.name, e.name) for e in entries}
        assert set(_dtype(spec.dtype).names or ()) == names


def test_struct_sizes_in_headings(md: str) -> None:
    """Sizes stated in the reference's prose match the dtypes (incl. SQE128 and CQE32)."""
    assert re.search(r"`struct io_uring_sqe`: 64 bytes \(128 with `IORING_SETUP_SQE128`\)", md)
    assert abi.io_uring_sqe128.itemsize == 128
    m = re.search(r"`struct io_uring_cqe`: (\d+) bytes, or (\d+) with CQE32", md)
    assert m is not None
    assert (abi.io_uring_cqe.itemsize, abi.io_uring_cqe32.itemsize) == (
        int(m.group(1)), int(m.group(2))
    )
    m = re.search(r"`struct zcrx_ctrl`[^\n]*?(\d+) bytes", md)
    assert m is not None and abi.zcrx_ctrl.itemsize == int(m.group(1))
    m = re.search(r"Union members, each (\d+) bytes", md)
    assert m is not None
    assert abi.zcrx_ctrl.fields is not None
    assert abi.zcrx_ctrl.fields["flush_rq_resv"][0].itemsize == int(m.group(1))
    assert abi.zcrx_ctrl.itemsize - 24 == int(m.group(1))
    assert abi.io_uring_params.fields is not None
    assert abi.io_uring_params.fields["sq_off"][0] == abi.io_sqring_offsets
    assert abi.io_uring_params.fields["cq_off"][0] == abi.io_cqring_offsets
    assert abi.io_uring_zcrx_ifq_reg.fields is not None
    assert abi.io_uring_zcrx_ifq_reg.fields["offsets"][0] == abi.io_uring_zcrx_offsets


def test_all_dtypes_little_endian_and_sized() -> None:
    """Every scalar in every dtype is explicitly little-endian (or a single byte)."""

    def scalars(dt: np.dtype) -> Iterator[np.dtype]:
        if dt.names is None:
            yield dt.base
            return
        assert dt.fields is not None
        for name in dt.names:
            yield from scalars(dt.fields[name][0])

    dtypes = [v for k, v in vars(abi).items() if isinstance(v, np.dtype) and not k.startswith("_")]
    assert len(dtypes) >= 25
    for dt in dtypes:
        for s in scalars(dt):
            assert s.str[0] in ("<", "|"), (dt, s)


# ============================================================================================
# Ring layout (§4) and RQ layout (§5a)
# ============================================================================================


def test_io_rings_offsets_table(md: str) -> None:
    """The >= 6.6 column of the io_rings table matches rings_layout()."""
    header, rows = _table_after(md, r"^## 4\. ")
    col = _find_col(header, "≥ 6.6")
    sq_off, cq_off, _ = abi.rings_layout(8, 16, 0)
    checked = 0
    for r in rows:
        value = int(r[col].replace("*", ""))
        m = re.search(r"`(sq_off|cq_off)\.(\w+)`", r[0])
        if m:
            got = (sq_off if m.group(1) == "sq_off" else cq_off)[m.group(2)]
            assert got == value, f"{m.group(1)}.{m.group(2)} = {got}, reference {value}"
            checked += 1
        elif r[0].startswith("sizeof(struct io_rings)"):
            assert value == abi.IO_RINGS_HDR_SIZE
            checked += 1
    assert checked >= 14, f"only {checked} io_rings rows parsed"


def test_rings_layout_worked_example(md: str) -> None:
    """§4 worked example: 8 entries -> array at 320, size 352; CQE32 -> array at 640."""
    m = re.search(r"`sq_off.array` = (\d+)\s+and the ring size is (\d+)", md)
    assert m is not None, "worked example not found"
    sq_off, cq_off, size = abi.rings_layout(8, 16, 0)
    assert (sq_off["array"], size) == (int(m.group(1)), int(m.group(2))) == (320, 352)
    assert cq_off["cqes"] == 64
    m = re.search(r"With CQE32: \(64 \+ 256\) × 2 = (\d+) → array at (\d+)", md)
    assert m is not None
    sq_off, _, size = abi.rings_layout(8, 16, abi.IORING_SETUP_CQE32)
    assert sq_off["array"] == int(m.group(2)) == 640
    assert size == 640 + 4 * 8


def test_rings_layout_variants() -> None:
    sq_off, _, size = abi.rings_layout(8, 16, abi.IORING_SETUP_NO_SQARRAY)
    assert sq_off["array"] == 0 and size == 320
    # Alignment kicks in when the CQE array does not end on a cache line.
    sq_off, _, size = abi.rings_layout(1, 2, 0)
    assert sq_off["array"] == 128 and size == 132
    _, _, size = abi.rings_layout(1, 2, abi.IORING_SETUP_NO_SQARRAY)
    assert size == 128
    # CQE_MIXED keeps 16-byte slots.
    assert abi.rings_layout(8, 16, abi.IORING_SETUP_CQE_MIXED) == abi.rings_layout(8, 16, 0)
    sq_off, cq_off, _ = abi.rings_layout(4096, 8192, 0)
    assert set(sq_off) == set(abi.io_sqring_offsets.names or ())
    assert set(cq_off) == set(abi.io_cqring_offsets.names or ())
    assert sq_off["user_addr"] == cq_off["user_addr"] == 0
    with pytest.raises(ValueError):
        abi.rings_layout(3, 8, 0)
    with pytest.raises(ValueError):
        abi.rings_layout(8, 0, 0)


def test_sqes_size() -> None:
    assert abi.sqes_size(8, 0) == 512
    assert abi.sqes_size(8, abi.IORING_SETUP_SQE128) == 1024
    with pytest.raises(ValueError):
        abi.sqes_size(0, 0)


def test_zcrx_rq_layout(md: str) -> None:
    """§5a: the 6.18+ row (head 0, tail 4, rqes 64, rq_hdr_size 8)."""
    header, rows = _table_after(md, r"^### 5a\. ")
    row = next(r for r in rows if r[0].startswith("6.18"))
    cols = {h: _find_col(header, h) for h in ("head", "tail", "rqes", "rq_hdr_size")}
    head, tail, rqes, hdr = (int(row[cols[h]].replace("*", "").split()[0]) for h in cols)
    assert abi.zcrx_rq_layout(16)[:3] == (head, tail, rqes) == (0, 4, 64)
    assert abi.ZCRX_RQ_HDR_SIZE == hdr == 8
    for n in (1, 16, 4096, abi.IO_RQ_MAX_ENTRIES):
        aligned = -(-abi.ZCRX_RQ_HDR_SIZE // abi.ZCRX_RQ_HDR_ALIGNMENT) * abi.ZCRX_RQ_HDR_ALIGNMENT
        assert abi.zcrx_rq_layout(n)[3] == aligned + 16 * n == 64 + 16 * n
    with pytest.raises(ValueError):
        abi.zcrx_rq_layout(0)


def test_zcrx_region_mmap_offset(md: str) -> None:
    assert re.search(r"`IORING_MAP_OFF_ZCRX_REGION \(0x30000000\) \+ \(zcrx_id << 16\)`", md)
    assert abi.zcrx_region_mmap_offset(0) == 0x30000000
    assert abi.zcrx_region_mmap_offset(5) == 0x30000000 + (5 << 16)
    for zid in (0, 1, 7, 2047):
        off = abi.zcrx_region_mmap_offset(zid)
        assert off & abi.IORING_OFF_MMAP_MASK == abi.IORING_MAP_OFF_ZCRX_REGION
        assert abi.zcrx_id_from_mmap_offset(off) == zid
    for bad in (-1, 2048):
        with pytest.raises(ValueError):
            abi.zcrx_region_mmap_offset(bad)
    for bad_off in (abi.IORING_MAP_OFF_PARAM_REGION, abi.IORING_OFF_SQES, 0x30000001):
        with pytest.raises(ValueError):
            abi.zcrx_id_from_mmap_offset(bad_off)


@given(area=st.integers(0, 0xFFFF), off=st.integers(0, (1 << 48) - 1))
def test_area_token_and_zcrx_off(area: int, off: int) -> None:
    assert abi.area_token(area) == area << 48
    v = abi.zcrx_off(area, off)
    assert v == abi.area_token(area) | off
    assert abi.zcrx_off_area_id(v) == area and abi.zcrx_off_offset(v) == off


def test_area_token_range() -> None:
    assert abi.area_token(0) == 0
    for bad in (-1, 1 << 16):
        with pytest.raises(ValueError):
            abi.area_token(bad)
    with pytest.raises(ValueError):
        abi.zcrx_off(0, 1 << 48)


# ============================================================================================
# Constants (§7 and inline "NAME = value" statements anywhere)
# ============================================================================================

# §7 subsection title -> prefix that the subsection's short names get.
_SECTION_PREFIX = {
    "Opcodes": "IORING_OP_",
    "Register opcodes": "IORING_REGISTER_",
    "Setup flags": "IORING_SETUP_",
    "Enter flags": "IORING_ENTER_",
    "SQ ring flags": "",
    "CQE flags": "IORING_CQE_",
    "ioprio flags": "",
    "SQE flags": "",
    "Features": "IORING_FEAT_",
    "mmap offsets": "",
    "zcrx constants": "",
}
# Minimum number of constants each subsection must yield.
_SECTION_MIN = {
    "Opcodes": 32, "Register opcodes": 40, "Setup flags": 21, "Enter flags": 8,
    "SQ ring flags": 4, "CQE flags": 8, "ioprio flags": 11, "SQE flags": 7, "Features": 18,
    "mmap offsets": 9, "zcrx constants": 22,
}
_FULL_PREFIXES = ("IORING_", "IOSQE_", "IO_URING_", "ZCRX_", "IOU_")

# Constants the reference lists that we deliberately do not define (post-7.1 mainline only:
# our ifq_reg is the kernel <= 7.1 shape without event_desc).
NOT_MODELLED = {
    "ZCRX_FEATURE_EVENT", "ZCRX_CTRL_ARM_EVENT", "ZCRX_EVENT_ALLOC_FAIL", "ZCRX_EVENT_COPY",
    "ZCRX_EVENT_DESC_FLAG_STATS", "IO_URING_QUERY_ZCRX_NOTIF",
}

# A constant's value: hex, "1<<n" or decimal, not followed by more of a number or version
# ("1<<7." at the end of a sentence is fine; "6.18" and "2026-08" are not values).
_VALUE = r"(0x[0-9a-fA-F]+|\d+\s*<<\s*\d+|\d+)(?!\w|<|\.\d|-\d)"
_INLINE_CONST = re.compile(r"(?<![\w`])`?([A-Z][A-Z0-9_]*[A-Z0-9])`?\s*(?:=\s*)?" + _VALUE)


def _prefixed(name: str, prefix: str) -> str:
    """The full uapi name of a constant listed as ``name`` in a section using ``prefix``."""
    if not prefix or name.startswith(("IORING_", "IO_URING_", "IOSQE_")):
        return name
    if prefix == "IORING_REGISTER_" and name.startswith("UNREGISTER_"):
        return "IORING_" + name  # IORING_UNREGISTER_BUFFERS etc.
    return prefix + name


def _inline_constants(text: str, prefix: str) -> Iterator[tuple[str, int]]:
    text = text.replace("**", "")
    for m in _INLINE_CONST.finditer(text):
        yield _prefixed(m.group(1), prefix), _eval(m.group(2))


def _strip_parens(s: str) -> str:
    while True:
        t = re.sub(r"\([^()]*\)", "", s)
        if t == s:
            return t.strip()
        s = t


def _table_constants(cells: list[str], prefix: str) -> Iterator[tuple[str, int]]:
    """name/value pairs of one constant-table row (one or two pairs per row)."""
    for i in range(0, len(cells) - 1, 3):
        name_cell, value_cell = cells[i].replace("**", ""), cells[i + 1].replace("**", "")
        names = [n.strip() for n in _strip_parens(name_cell).split(" / ")]
        if not name_cell:
            continue
        if not all(re.fullmatch(r"[A-Z][A-Z0-9_]*", n) for n in names) or not value_cell:
            yield from _inline_constants(name_cell, prefix)  # e.g. "SQE_MIXED 1<<19; ..."
            continue
        values = [v.strip() for v in _strip_parens(value_cell).split(" / ")]
        assert len(values) == len(names), f"row {cells}"
        first = _prefixed(names[0], prefix)
        family = first.rsplit("_", 1)[0] + "_"  # IO_URING_QUERY_OPCODES -> IO_URING_QUERY_
        for k, (n, v) in enumerate(zip(names, values, strict=True)):
            full = first if k == 0 else (n if n.startswith(first.split("_")[0] + "_") else
                                         family + n)
            yield full, _eval(v)
        # Constants mentioned in a value's parentheses, e.g. "1<<0 (IORING_NOP_CQE32 1<<5)".
        for paren in re.findall(r"\(([^()]*)\)", value_cell):
            yield from _inline_constants(paren, prefix)


def _section7(md: str) -> dict[str, list[tuple[str, int]]]:
    body = md[md.index("## 7. Constants"):md.index("## 8. ")]
    out: dict[str, list[tuple[str, int]]] = {}
    for chunk in body.split("\n### ")[1:]:
        title, _, text = chunk.partition("\n")
        key = next((k for k in _SECTION_PREFIX if title.startswith(k)), None)
        assert key is not None, f"unknown constants subsection {title!r}"
        prefix = _SECTION_PREFIX[key]
        found: list[tuple[str, int]] = []
        for line in text.splitlines():
            if line.lstrip().startswith("|"):
                cells = _split_row(line)
                if re.fullmatch(r"[\s|:-]+", line) or cells[0] in ("name", "flag"):
                    continue
                found.extend(_table_constants(cells, prefix))
            else:
                found.extend(_inline_constants(line, prefix))
        out[key] = found
    return out


def _check_constant(name: str, value: int, where: str) -> bool:
    """Compare one documented constant; return True if it was compared."""
    if name in NOT_MODELLED:
        assert not hasattr(abi, name), f"{name} is listed as not modelled but abi defines it"
        return False
    assert hasattr(abi, name), f"abi lacks {name} = {value:#x} ({where})"
    got = getattr(abi, name)
    assert got == value, f"abi.{name} = {got:#x}, reference says {value:#x} ({where})"
    return True


def test_section7_constants(md: str) -> None:
    """Every constant in §7 (tables and inline lists) equals the abi constant."""
    sections = _section7(md)
    assert set(sections) == set(_SECTION_PREFIX), f"subsections found: {sorted(sections)}"
    total = 0
    for key, found in sections.items():
        names = [n for n, _ in found]
        assert len(set(names)) >= _SECTION_MIN[key], (
            f"{key}: parsed {len(set(names))} constants, expected >= {_SECTION_MIN[key]}: {names}"
        )
        for name, value in found:
            total += _check_constant(name, value, f"§7 {key}")
    assert total >= 170


def test_inline_assignments(md: str) -> None:
    """``NAME = value`` statements anywhere in the reference agree with the abi."""
    hits = re.findall(
        r"(?<![\w`])`?([A-Z][A-Z0-9_]*[A-Z0-9])`?\s*=\s*" + _VALUE, md.replace("**", "")
    )
    # Prose that uses a short name for a constant ("... post-7.1 ZCRX_NOTIF = 3").
    short_names = {"ZCRX_NOTIF": "IO_URING_QUERY_ZCRX_NOTIF"}
    checked = 0
    for short, value in hits:
        name = short_names.get(short, short)
        if name.startswith(_FULL_PREFIXES) or hasattr(abi, name):
            checked += _check_constant(name, _eval(value), "inline assignment")
    for needed in ("IORING_MAX_ENTRIES", "IORING_MAX_CQ_ENTRIES", "IORING_FILE_INDEX_ALLOC",
                   "IORING_MEM_REGION_TYPE_USER", "IORING_OFF_ZCRX_SHIFT", "L1_CACHE_BYTES"):
        assert needed in {n for n, _ in hits}, f"{needed} = ... not found in the reference"
    assert checked >= 10


def test_opcode_enum_is_dense() -> None:
    """Opcode and register-opcode enums have no gaps or duplicates below *_LAST."""
    ops = {
        k: v for k, v in vars(abi).items() if k.startswith("IORING_OP_") and k != "IORING_OP_LAST"
    }
    assert sorted(ops.values()) == list(range(abi.IORING_OP_LAST))
    regs = {
        k: v for k, v in vars(abi).items()
        if re.match(r"IORING_(UN)?REGISTER_", k)
        and k not in ("IORING_REGISTER_LAST", "IORING_REGISTER_USE_REGISTERED_RING")
    }
    assert sorted(regs.values()) == list(range(abi.IORING_REGISTER_LAST))


def test_misc_constants() -> None:
    assert abi.IORING_ZCRX_AREA_MASK == 0xFFFF_0000_0000_0000
    assert abi.IORING_ZCRX_AREA_MASK == ~((1 << abi.IORING_ZCRX_AREA_SHIFT) - 1) & (2**64 - 1)
    assert abi.IO_RQ_MAX_ENTRIES == 32768 and abi.IO_SKBS_PER_CALL_LIMIT == 20
    assert abi.PAGE_SIZE == 4096 and abi.SMP_CACHE_BYTES == abi.L1_CACHE_BYTES == 64
    assert abi.ZCRX_RQ_HDR_ALIGNMENT == abi.L1_CACHE_BYTES
    assert abi.ZCRX_CTRL_LAST == 2
    # Buffer ids live above the flag bits that carry meaning on buffer CQEs.
    low = [
        v for k, v in vars(abi).items()
        if k.startswith("IORING_CQE_F_") and k != "IORING_CQE_F_TSTAMP_HW"
    ]
    assert max(low) < 1 << abi.IORING_CQE_BUFFER_SHIFT


# ============================================================================================
# NIC dtypes (emulator-only)
# ============================================================================================


def test_nic_dtypes() -> None:
    assert abi.nic_rx_desc.itemsize == 16
    assert abi.nic_rx_cqe.itemsize == 32
    want_desc = {"iova": (0, 8), "len": (8, 4), "buf_id": (12, 4)}
    want_cqe = {
        "hdr_slot": (0, 4), "hdr_len": (4, 2), "flags": (6, 2), "data_len": (8, 4),
        "nr_frags": (12, 2), "queue": (14, 2), "rss_hash": (16, 4), "payload_off": (20, 2),
        "status": (22, 2), "tstamp_ns": (24, 8),
    }
    for dt, want in ((abi.nic_rx_desc, want_desc), (abi.nic_rx_cqe, want_cqe)):
        assert dt.fields is not None
        got = {n: (dt.fields[n][1], dt.fields[n][0].itemsize) for n in dt.names or ()}
        assert got == want
    flags = [abi.NIC_CQE_F_SPLIT, abi.NIC_CQE_F_LINEAR, abi.NIC_CQE_F_L4_OK]
    assert len(set(flags)) == 3 and all(f & (f - 1) == 0 for f in flags)
    statuses = [abi.NIC_STATUS_OK, abi.NIC_STATUS_TRUNCATED, abi.NIC_STATUS_BAD_HDR,
                abi.NIC_STATUS_OVERSIZE]
    assert abi.NIC_STATUS_OK == 0 and len(set(statuses)) == 4


@given(map_id=st.integers(0, (1 << 24) - 1), off=st.integers(0, (1 << 40) - 1))
def test_iova_round_trip(map_id: int, off: int) -> None:
    iova = abi.make_iova(map_id, off)
    assert iova == (map_id << abi.NIC_IOVA_SHIFT) | off
    assert 0 <= iova < 1 << 64
    assert (abi.iova_map_id(iova), abi.iova_offset(iova)) == (map_id, off)
    rec = np.zeros(1, abi.nic_rx_desc)
    rec["iova"] = iova
    assert int(rec["iova"][0]) == iova


def test_iova_range() -> None:
    with pytest.raises(ValueError):
        abi.make_iova(1 << 24, 0)
    with pytest.raises(ValueError):
        abi.make_iova(0, 1 << 40)
    with pytest.raises(ValueError):
        abi.make_iova(-1, 0)


# ============================================================================================
# Round trip through raw bytes at the documented offsets
# ============================================================================================

_STRUCT_FMT = {np.dtype("<u1"): "B", np.dtype("<u2"): "H", np.dtype("<u4"): "I",
               np.dtype("<u8"): "Q", np.dtype("<i4"): "i"}


_Slot = tuple[tuple[str, ...], int, int, str, int]  # (field path, first elem, off, fmt, count)


def _documented_ifq_layout(md: str) -> list[_Slot]:
    """Every scalar slot of ``io_uring_zcrx_ifq_reg`` as the reference documents it.

    Each slot is (dtype field path, first array element, byte offset, struct format, count);
    ``__resv[1..2]`` becomes (("__resv",), 1, 80, "Q", 2).
    """
    sub_rows = _struct_table(md, _struct_anchor("io_uring_zcrx_offsets"), "field")
    out: list[_Slot] = []
    for e in _struct_table(md, _struct_anchor("io_uring_zcrx_ifq_reg"), "liburing 2026-08"):
        if e.name == "offsets":
            for sub in sub_rows:
                assert sub.ctype is not None
                n = min(sub.sizes) // sub.ctype.itemsize
                out.append((("offsets", sub.name), 0, e.off + sub.off, _STRUCT_FMT[sub.ctype], n))
            continue
        assert e.ctype is not None, e
        m = re.fullmatch(r"(\w+)(?:\[(\d+)(?:\.\.\d+)?\])?", e.name)
        assert m is not None, e
        first = int(m.group(2)) if m.group(2) else 0
        n = min(e.sizes) // e.ctype.itemsize
        out.append(((m.group(1),), first, e.off, _STRUCT_FMT[e.ctype], n))
    return out


@pytest.fixture(scope="module")
def ifq_layout(md: str) -> list[_Slot]:
    layout = _documented_ifq_layout(md)
    assert len(layout) >= 15, "ifq_reg table parsed too few rows"
    assert sum(struct.calcsize("<" + f) * n for *_, f, n in layout) == 96
    return layout


_u32 = st.integers(0, 2**32 - 1)
_u64 = st.integers(0, 2**64 - 1)


@given(data=st.data())
def test_ifq_reg_bytes_match_documented_offsets(
    ifq_layout: list[_Slot], data: st.DataObject
) -> None:
    """Encode random values into an ifq_reg record by field name; ``struct.unpack_from`` at the
    documented offsets reads back the same values, and the bytes decode back to the record."""
    rec = np.zeros(1, abi.io_uring_zcrx_ifq_reg)
    expected: dict[int, list[int]] = {}
    for path, first, off, fmt, n in ifq_layout:
        values = [data.draw(_u32 if fmt == "I" else _u64) for _ in range(n)]
        expected[off] = values
        target = rec
        for p in path:
            target = target[p]
        for k, value in enumerate(values):
            if target.ndim == 1:
                target[0] = value
            else:
                target[0, first + k] = value
    raw = rec.tobytes()
    assert len(raw) == 96
    for path, _, off, fmt, n in ifq_layout:
        got = struct.unpack_from(f"<{n}{fmt}", raw, off)
        assert list(got) == expected[off], path
    back = np.frombuffer(bytearray(raw), dtype=abi.io_uring_zcrx_ifq_reg)
    assert back.tobytes() == raw
    assert int(back["zcrx_id"][0]) == expected[64][0]
    assert int(back["offsets"]["rqes"][0]) == expected[40][0]
    assert int(back["__resv"][0, 2]) == expected[80][1]


@given(
    user_data=_u64, res=st.integers(-(2**31), 2**31 - 1), flags=_u32, off=_u64,
)
def test_cqe32_and_sqe_raw_bytes(user_data: int, res: int, flags: int, off: int) -> None:
    cqe = np.zeros(1, abi.io_uring_cqe32)
    cqe["user_data"], cqe["res"], cqe["flags"], cqe["zcrx_off"] = user_data, res, flags, off
    assert struct.unpack("<QiIQQ", cqe.tobytes()) == (user_data, res, flags, off, 0)
    assert int(cqe["big_cqe"][0][0]) == off
    sqe = np.zeros(1, abi.io_uring_sqe)
    sqe["opcode"] = abi.IORING_OP_RECV_ZC
    sqe["ioprio"] = abi.IORING_RECV_MULTISHOT
    sqe["zcrx_ifq_idx"] = flags
    sqe["user_data"] = user_data
    raw = sqe.tobytes()
    assert raw[0] == 58
    assert struct.unpack_from("<H", raw, 2)[0] == abi.IORING_RECV_MULTISHOT
    assert struct.unpack_from("<I", raw, 44)[0] == flags
    assert struct.unpack_from("<Q", raw, 32)[0] == user_data
    assert int(sqe["file_index"][0]) == flags  # same union word
