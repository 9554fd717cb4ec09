#!/usr/bin/env python3
"""Extract the uapi facts that ``tests/test_abi.py`` checks from the team's ``uapi-layouts.md``.

The team reference (``shared/reference/uapi-layouts.md`` in the team folder) is a markdown note
outside the repository.  Its struct tables (columns off / size / type / field), inline layouts
(```name` u64 @0, ...``, ``{ u64 a; u64 b; }``), constant tables (``| name | value |``),
inline constant lists (``IOSQE_FIXED_FILE 1<<0, ...``, ``BUFFERS 0, ... ZCRX_IFQ 32``) and
``NAME = value`` statements are parsed here into ``tests/data/uapi_layouts.toml``, which is
reviewed and committed; the tests read only that file, so they run on any clone.

    python tests/tools/extract_uapi.py [REFERENCE] > tests/data/uapi_layouts.toml
    python tests/tools/extract_uapi.py --check [REFERENCE]    # diff against the data file

``REFERENCE`` defaults to ``../shared/reference/uapi-layouts.md`` beside the clone.  ``--check``
prints a unified diff and exits 1 when the data file is stale.

Every parser asserts a minimum number of rows, so a parser broken by an edit of the markdown
fails loudly instead of writing an empty data file.  Release markers come from the text: a
version note attached to a name or value (``(7.0+; ...)``, ``(6.18)``, ``(post-7.1)``, a
value-specific ``(3: post-7.1)``), a whole paragraph that starts ``Post-7.1 ... only``, or the
release bullet of the §5b update; "post-7.1 mainline" is the 7.2 merge window (§5b).
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEFAULT_REFERENCE = REPO.parent / "shared" / "reference" / "uapi-layouts.md"
DEFAULT_DATA = REPO / "tests" / "data" / "uapi_layouts.toml"

# The release range the reference's uapi header (liburing 2026-08) corresponds to.
DEFAULT_LINUX = "6.18-7.1"

# What the reference says each section's numbers were checked against (its "How every number
# here was checked" list): short ids, spelt out once in the data file's [sources] table.
SOURCES = {
    "liburing": "liburing src/include/liburing/io_uring.h and io_uring/query.h @27255f4 "
                "(2026-08-19): offsetof/sizeof/values compiled with gcc on x86-64",
    "kernel": "kernel code read per release: include/linux/io_uring_types.h (struct io_rings), "
              "io_uring.c rings_size(), zcrx.c io_allocate_rbuf_ring() / io_fill_zcrx_offsets(), "
              "io_uring/memmap.h; compiled with 64-byte cache-line alignment",
    "mainline": "torvalds/linux include/uapi/linux/io_uring/zcrx.h @146cc263 (post-7.1 mainline)",
    "update-2026-12": "io_uring pull merges for 7.2 and 7.3, read for the reference's Dec 2026 "
                      "update (values it calls inferred are marked so there)",
}
SECTION_SOURCE = {
    "§1": "liburing", "§2": "liburing", "§3": "liburing", "§4": "kernel", "§5": "liburing",
    "§5a": "kernel", "§5b": "update-2026-12", "§6": "liburing", "§7": "liburing",
    "§8": "liburing",
}


# ============================================================================================
# Markdown parsing helpers
# ============================================================================================

_CTYPE = re.compile(r"(?<![A-Za-z0-9])(?:__)?([us])(8|16|32|64)(?![0-9])")


def _ctype(text: str) -> str | None:
    """The first C scalar type named in ``text`` (``__u32``, ``u64[2]``, ``s32``): ``"u32"``."""
    if "__kernel_rwf_t" in text:
        return "s32"  # typedef int __kernel_rwf_t
    m = _CTYPE.search(text)
    if m is None:
        return None
    return f"{m.group(1)}{m.group(2)}"


def _itemsize(ctype: str) -> int:
    return int(ctype[1:]) // 8


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


def _since_of(note: str) -> str | None:
    """The first release a version note names: ``7.0+; ...`` -> 7.0, ``post-7.1`` -> 7.2."""
    note = note.replace("`", "").strip()
    m = re.search(r"\bpost-(\d+)\.(\d+)", note, re.I)
    if m:
        return f"{m.group(1)}.{int(m.group(2)) + 1}"
    m = re.fullmatch(r"(\d+\.\d+)\+?(?:[;,].*)?", note, re.S)
    return m.group(1) if m else None


def _section_at(md: str, pos: int) -> str:
    """The reference section (``§5a``) that the text at ``pos`` belongs to."""
    section = "preamble"
    for m in re.finditer(r"^(#{2,3}) ([^\n]*)$", md[:pos], re.M):
        num = re.match(r"(\d+[a-z]?)\.", m.group(2))
        if num:
            section = "§" + num.group(1)
        elif m.group(1) == "##":
            section = m.group(2)
    return section


def _paragraph_start(md: str, pos: int) -> str:
    """The first line of the paragraph holding ``pos``."""
    start = md.rfind("\n\n", 0, pos)
    return md[start + 2 if start >= 0 else 0:].split("\n", 1)[0]


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


@dataclass
class _Name:
    name: str
    ctype: str | None = None  # a ``(u16)`` annotation right after the name
    since: str | None = None  # a version note right after the name


def _field_names(cell: str) -> list[_Name]:
    """Backticked field names in a field cell, each with its ``(type)`` or version note.

    Text inside parentheses is commentary (``(out)``, ``(7.0+; before that `__resv2`)``) and is
    skipped, except that a parenthesised C type or release right after a name annotates it.
    """
    s = cell.replace("**", "")
    out: list[_Name] = []
    i, last_name_end = 0, -1
    while i < len(s):
        c = s[i]
        if c == "`":
            j = s.index("`", i + 1)
            out.append(_Name(s[i + 1:j]))
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
            if out and s[last_name_end:i].strip() == "":
                if re.fullmatch(r"(?:__)?[us](?:8|16|32|64)|__kernel_rwf_t", group):
                    out[-1].ctype = _ctype(group)
                elif (since := _since_of(group)) is not None:
                    out[-1].since = since
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
    sizes: list[int]  # every size the reference allows; [] = an n-element array
    ctype: str | None  # element type if the reference states one
    since: str | None = None


@dataclass
class Struct:
    """One documented struct (or one table/paragraph describing part of one)."""

    key: str
    title: str
    section: str
    form: str  # "table" or "prose"
    size: int | None
    entries: list[Entry]
    since: str | None = None
    source: str | None = None


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
            sizes: list[int] = []  # e.g. "16·n": unbounded array
        else:
            sizes = sorted({int(x) for x in sizes_txt.split("/")})
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
            names = [_Name(m.group(1))] if m else []
        for n in names:
            # A per-name annotation such as `poll_events`(u16) overrides the row's size/type.
            own_sizes = [_itemsize(n.ctype)] if n.ctype is not None else sizes
            entries.append(Entry(n.name, off, own_sizes, n.ctype or row_ctype, n.since))
    return entries


_INLINE_NAME_TYPE = re.compile(
    r"`(\w+)`\s+([us](?:8|16|32|64))(?:\[(\d+)\])?(?:\s*@(\d+))?"
)
_INLINE_C_DECL = re.compile(r"([us](?:8|16|32|64))\s+(\w+)(?:\[(\d+)\])?(?:\s*@(\d+))?\s*;")


def _inline_struct(md: str, anchor: str, end: str) -> tuple[int | None, list[Entry], str | None]:
    """Fields of a struct described in prose (```a` u64 @0, ...`` or ``{ u64 a; u64 b; }``).

    Returns the size captured by group 1 of ``anchor`` (if any), the fields (missing offsets
    are computed sequentially with natural alignment) and the release the paragraph is limited
    to, if it starts with ``Post-X.Y ... only``.
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
        item = _itemsize(ct)
        n = int(count) if count else 1
        off = int(off_txt) if off_txt else -(-pos // item) * item
        entries.append(Entry(name, off, [item * n], ct))
        pos = off + item * n
    lead = re.match(r"(Post-\d+\.\d+)\b[^:]*\bonly:", _paragraph_start(md, m.start()))
    return size, entries, _since_of(lead.group(1)) if lead else None


# ============================================================================================
# Which reference text describes which struct
# ============================================================================================


@dataclass
class TableSpec:
    key: str
    anchor: str
    field_col: str = "field"
    min_entries: int = 1
    title: str = ""
    since: str | None = None  # the column describes a release from this one on
    source: str | None = None


@dataclass
class InlineSpec:
    key: str
    anchor: str
    end: str
    min_entries: int = 1
    source: str | None = None
    since: str | None = None  # when the paragraph does not say it (a §5b bullet)


def _struct_anchor(name: str) -> str:
    """A line that starts (after an optional heading) with ```struct NAME``` and a size."""
    return rf"^(?:#+ [\d.]+ )?`struct {name}`[^\n]*?(\d+) bytes"


TABLES = [
    TableSpec("io_uring_sqe", _struct_anchor("io_uring_sqe"), "field(s)", 45),
    TableSpec("io_uring_cqe", _struct_anchor("io_uring_cqe"), "field", 4),
    TableSpec(
        "io_uring_cqe32", r"^32-byte CQE for RECV_ZC", "field", 5,
        "32-byte CQE for RECV_ZC: struct io_uring_cqe + struct io_uring_zcrx_cqe",
    ),
    TableSpec("io_sqring_offsets", _struct_anchor("io_sqring_offsets"), "field", 9),
    TableSpec("io_cqring_offsets", _struct_anchor("io_cqring_offsets"), "field", 9),
    TableSpec("io_uring_params", _struct_anchor("io_uring_params"), "field", 10),
    TableSpec("io_uring_zcrx_rqe", _struct_anchor("io_uring_zcrx_rqe"), "field", 3),
    TableSpec("io_uring_zcrx_offsets", _struct_anchor("io_uring_zcrx_offsets"), "field", 5),
    TableSpec("io_uring_zcrx_area_reg", _struct_anchor("io_uring_zcrx_area_reg"), "field", 6),
    TableSpec(
        "io_uring_zcrx_ifq_reg", _struct_anchor("io_uring_zcrx_ifq_reg"), "liburing 2026-08", 11,
        "struct io_uring_zcrx_ifq_reg (liburing 2026-08 / kernel <= 7.1 column)",
    ),
    TableSpec(
        "io_uring_zcrx_ifq_reg_7_2", _struct_anchor("io_uring_zcrx_ifq_reg"),
        "mainline post-7.1", 2,
        "struct io_uring_zcrx_ifq_reg (mainline post-7.1 column: the rows not 'same')",
        since="7.2", source="mainline",
    ),
    TableSpec("io_uring_region_desc", _struct_anchor("io_uring_region_desc"), "field", 6),
    TableSpec("zcrx_ctrl", _struct_anchor("zcrx_ctrl"), "field", 6),
    TableSpec("io_uring_query_zcrx", _struct_anchor("io_uring_query_zcrx"), "field", 7),
    TableSpec("io_uring_buf", _struct_anchor("io_uring_buf"), "field", 4),
    TableSpec("io_uring_buf_ring", r"^`struct io_uring_buf_ring`", "field", 5),
    TableSpec(
        "io_uring_buf_reg", _struct_anchor("io_uring_buf_reg"), "current liburing", 6,
        "struct io_uring_buf_reg (current liburing column)",
    ),
]

INLINES = [
    InlineSpec("io_uring_zcrx_cqe", r"`struct io_uring_zcrx_cqe`: (\d+) bytes", ".", 2),
    InlineSpec(
        "io_uring_mem_region_reg", r"`struct io_uring_mem_region_reg`[^:]*: (\d+) bytes", ".", 3
    ),
    InlineSpec("io_uring_query_hdr", r"`struct io_uring_query_hdr`: (\d+) bytes", ".", 6),
    InlineSpec("zcrx_ctrl_flush_rq", r"`zcrx_ctrl_flush_rq \{", "}", 1),
    InlineSpec("zcrx_ctrl_export", r"`zcrx_ctrl_export \{", "}", 2),
    InlineSpec("io_uring_query_scq", r"`io_uring_query_scq \{[^}]*\}`, (\d+) bytes", "}", 2),
    InlineSpec(
        "zcrx_stats", r"`struct zcrx_stats \{[^}]*\}`\s*is (\d+) bytes", "}", 2, "mainline"
    ),
    InlineSpec(
        "zcrx_event_desc", r"`struct zcrx_event_desc` is (\d+) bytes", ".", 5, "mainline"
    ),
    InlineSpec("zcrx_ctrl_arm_event", r"`zcrx_ctrl_arm_event \{", "}", 2, "mainline", "7.2"),
    InlineSpec(
        "zcrx_ctrl_add_area", r"`zcrx_ctrl_add_area \{", "}", 2, "update-2026-12", "7.3"
    ),
    InlineSpec("io_uring_buf_status", r"`struct io_uring_buf_status` is (\d+) bytes", ")", 3),
    InlineSpec(
        "io_uring_getevents_arg", r"`struct io_uring_getevents_arg` is (\d+) bytes", ")", 4
    ),
]


def structs(md: str) -> list[Struct]:
    out = []
    for t in TABLES:
        entries = _struct_table(md, t.anchor, t.field_col)
        assert len(entries) >= t.min_entries, (
            f"parsed only {len(entries)} fields for {t.key}; the table parser is broken"
        )
        m = re.search(t.anchor, md, re.M)
        assert m is not None
        size = int(m.group(1)) if m.re.groups >= 1 and m.group(1) else None
        out.append(Struct(t.key, t.title or f"struct {t.key}", _section_at(md, m.end()),
                          "table", size, entries, t.since, t.source))
    for s in INLINES:
        size, entries, since = _inline_struct(md, s.anchor, s.end)
        assert len(entries) >= s.min_entries, (
            f"parsed only {len(entries)} fields for {s.key}; the inline parser is broken"
        )
        m = re.search(s.anchor, md, re.S)
        assert m is not None
        out.append(Struct(s.key, f"struct {s.key}", _section_at(md, m.end()), "prose", size,
                          entries, since or s.since, s.source))
    return out


def prose_sizes(md: str) -> dict[str, int]:
    """Struct sizes stated in headings and prose (incl. SQE128, CQE32 and the ctrl union)."""
    m = re.search(r"`struct io_uring_sqe`: (\d+) bytes \((\d+) with `IORING_SETUP_SQE128`\)", md)
    assert m is not None, "SQE sizes not found"
    out = {"io_uring_sqe": int(m.group(1)), "io_uring_sqe128": int(m.group(2))}
    m = re.search(r"`struct io_uring_cqe`: (\d+) bytes, or (\d+) with CQE32", md)
    assert m is not None, "CQE sizes not found"
    out |= {"io_uring_cqe": int(m.group(1)), "io_uring_cqe32": int(m.group(2))}
    m = re.search(r"`struct zcrx_ctrl`[^\n]*?(\d+) bytes", md)
    assert m is not None, "zcrx_ctrl size not found"
    out["zcrx_ctrl"] = int(m.group(1))
    m = re.search(r"Union members, each (\d+) bytes", md)
    assert m is not None, "zcrx_ctrl union size not found"
    out["zcrx_ctrl_union"] = int(m.group(1))
    return out


# ============================================================================================
# Ring layout (§4), RQ layout (§5a), zcrx region mmap offset (§5a)
# ============================================================================================


def _release_range(text: str) -> tuple[str | None, str | None]:
    """``≥ 6.6`` / ``6.18 – 7.2`` / ``7.3+`` / ``≤ 6.5`` as (since, until)."""
    text = text.replace("*", "")
    m = re.match(r"\s*(\d+\.\d+)\s*[–-]\s*(\d+\.\d+)", text)
    if m:
        return m.group(1), m.group(2)
    m = re.match(r"\s*(?:≥\s*(\d+\.\d+)|(\d+\.\d+)\+)", text)
    if m:
        return m.group(1) or m.group(2), None
    m = re.match(r"\s*≤\s*(\d+\.\d+)", text)
    if m:
        return None, m.group(1)
    raise AssertionError(f"no release range in {text!r}")


def io_rings(md: str) -> list[dict[str, object]]:
    """The io_rings offsets table, one layout per release column."""
    header, rows = _table_after(md, r"^## 4\. ")
    layouts: list[dict[str, object]] = []
    for col, h in enumerate(header):
        if "offset" not in h:
            continue
        since, until = _release_range(h)
        sq_off: dict[str, int] = {}
        cq_off: dict[str, int] = {}
        sizeof = None
        for r in rows:
            value = int(r[col].replace("*", ""))
            m = re.search(r"`(sq_off|cq_off)\.(\w+)`", r[0])
            if m:
                (sq_off if m.group(1) == "sq_off" else cq_off)[m.group(2)] = value
            elif r[0].startswith("sizeof(struct io_rings)"):
                sizeof = value
        assert len(sq_off) + len(cq_off) >= 13 and sizeof is not None, (
            f"only {len(sq_off) + len(cq_off)} io_rings rows parsed for {h!r}"
        )
        layouts.append({"since": since, "until": until, "sizeof": sizeof,
                        "sq_off": sq_off, "cq_off": cq_off})
    assert len(layouts) >= 2, f"io_rings columns: {header}"
    return layouts


def rings_example(md: str) -> dict[str, int]:
    """§4 worked example: entries 8 -> array at 320, ring size 352; CQE32 -> array at 640."""
    m = re.search(r"entries=(\d+) → cq_entries=(\d+)", md)
    assert m is not None, "worked example entries not found"
    out = {"sq_entries": int(m.group(1)), "cq_entries": int(m.group(2))}
    m = re.search(r"`sq_off.array` = (\d+)\s+and the ring size is (\d+)", md)
    assert m is not None, "worked example not found"
    out |= {"sq_array": int(m.group(1)), "ring_size": int(m.group(2))}
    m = re.search(r"With CQE32: \(64 \+ 256\) × 2 = (\d+) → array at (\d+)", md)
    assert m is not None, "CQE32 worked example not found"
    out["cqe32_sq_array"] = int(m.group(2))
    return out


def zcrx_rq(md: str) -> list[dict[str, object]]:
    """§5a: one RQ header layout per release range."""
    header, rows = _table_after(md, r"^### 5a\. ")
    cols = {h: _find_col(header, h) for h in ("head", "tail", "rqes", "rq_hdr_size")}
    out = []
    for r in rows:
        since, until = _release_range(r[0])
        row: dict[str, object] = {"since": since, "until": until}
        for h, c in cols.items():
            word = r[c].replace("*", "").split()[0]
            if word.isdigit():  # rq_hdr_size is "n/a" before the query existed
                row[h] = int(word)
        assert {"head", "tail", "rqes"} <= set(row), f"RQ row {r}"
        out.append(row)
    assert len(out) >= 3, f"only {len(out)} RQ layout rows"
    return out


def zcrx_region_mmap(md: str) -> dict[str, int]:
    m = re.search(
        r"`IORING_MAP_OFF_ZCRX_REGION \((0x[0-9a-fA-F]+)\) \+ \(zcrx_id << (\d+)\)`", md
    )
    assert m is not None, "zcrx region mmap offset not found"
    return {"base": int(m.group(1), 16), "id_shift": int(m.group(2))}


# ============================================================================================
# Constants (§7 and inline "NAME = value" statements anywhere)
# ============================================================================================

# §7 subsection title -> (data key, prefix that the subsection's short names get).
SECTION_PREFIX = {
    "Opcodes": ("opcodes", "IORING_OP_"),
    "Register opcodes": ("register_opcodes", "IORING_REGISTER_"),
    "Setup flags": ("setup_flags", "IORING_SETUP_"),
    "Enter flags": ("enter_flags", "IORING_ENTER_"),
    "SQ ring flags": ("ring_flags", ""),
    "CQE flags": ("cqe_flags", "IORING_CQE_"),
    "ioprio flags": ("ioprio_flags", ""),
    "SQE flags": ("sqe_flags", ""),
    "Features": ("features", "IORING_FEAT_"),
    "mmap offsets": ("mmap_offsets", ""),
    "zcrx constants": ("zcrx", ""),
}
# Minimum number of constants each subsection must yield.
SECTION_MIN = {
    "Opcodes": 32, "Register opcodes": 40, "Setup flags": 21, "Enter flags": 8,
    "SQ ring flags": 4, "CQE flags": 8, "ioprio flags": 11, "SQE flags": 7, "Features": 18,
    "mmap offsets": 9, "zcrx constants": 22,
}

# A constant's value: hex, "1<<n" or decimal, not followed by more of a number or version
# ("1<<7." at the end of a sentence is fine; "6.18" and "2026-08" are not values).
_VALUE = r"(0x[0-9a-fA-F]+|\d+\s*<<\s*\d+|\d+)(?!\w|<|\.\d|-\d)"
_INLINE_CONST = re.compile(r"(?<![\w`])`?([A-Z][A-Z0-9_]*[A-Z0-9])`?\s*(?:=\s*)?" + _VALUE)
_ASSIGNMENT = re.compile(r"(?<![\w`])`?([A-Z][A-Z0-9_]*[A-Z0-9])`?\s*=\s*" + _VALUE)
_NOTE_AFTER = re.compile(r"\s*\(([^()]*)\)")

# Prose that uses a short name for a constant ("Other query ops: OPCODES = 0, ZCRX = 1, SCQ = 2,
# and in mainline post-7.1 ZCRX_NOTIF = 3"; "x86-64, L1 = 64").
SHORT_NAMES = {
    "OPCODES": "IO_URING_QUERY_OPCODES", "ZCRX": "IO_URING_QUERY_ZCRX",
    "SCQ": "IO_URING_QUERY_SCQ", "ZCRX_NOTIF": "IO_URING_QUERY_ZCRX_NOTIF",
    "L1": "L1_CACHE_BYTES",
}
# Assignments the inline scan must find (a guard against a broken scan).
NEEDED_ASSIGNMENTS = (
    "IORING_MAX_ENTRIES", "IORING_MAX_CQ_ENTRIES", "IORING_FILE_INDEX_ALLOC",
    "IORING_MEM_REGION_TYPE_USER", "IORING_OFF_ZCRX_SHIFT", "L1_CACHE_BYTES",
)


@dataclass
class Constant:
    name: str
    value: int
    hexa: bool  # written as hex or a shift in the reference
    since: str | None = None
    section: str | None = None  # only for inline assignments: where the statement is


def _const(name: str, expr: str, since: str | None = None) -> Constant:
    return Constant(name, _eval(expr), bool(re.search(r"0x|<<", expr)), since)


def _prefixed(name: str, prefix: str) -> str:
    """The full uapi name of a constant listed as ``name`` in a section using ``prefix``."""
    if not prefix or name.startswith(("IORING_", "IO_URING_", "IOSQE_")):
        return name
    if prefix == "IORING_REGISTER_" and name.startswith("UNREGISTER_"):
        return "IORING_" + name  # IORING_UNREGISTER_BUFFERS etc.
    return prefix + name


def _inline_constants(text: str, prefix: str) -> Iterator[Constant]:
    text = text.replace("**", "")
    for m in _INLINE_CONST.finditer(text):
        note = _NOTE_AFTER.match(text, m.end())
        since = _since_of(note.group(1)) if note else None
        yield _const(_prefixed(m.group(1), prefix), m.group(2), since)


def _strip_parens(s: str) -> str:
    while True:
        t = re.sub(r"\([^()]*\)", "", s)
        if t == s:
            return t.strip()
        s = t


def _table_constants(cells: list[str], prefix: str) -> Iterator[Constant]:
    """Constants of one constant-table row (one or two name/value pairs per row)."""
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
        # Release notes in the value's parentheses: "(6.18)", "(post-7.1)" for the whole row,
        # "(3: post-7.1)" for the value 3 only.
        notes = re.findall(r"\(([^()]*)\)", value_cell)
        row_since, value_since = None, {}
        for n in notes:
            m = re.fullmatch(r"(\w+):\s*(.*)", n.strip(), re.S)
            if m and m.group(1) in values:
                if (s := _since_of(m.group(2))) is not None:
                    value_since[m.group(1)] = s
            elif row_since is None:
                row_since = _since_of(n)
        first = _prefixed(names[0], prefix)
        family = first.rsplit("_", 1)[0] + "_"  # IO_URING_QUERY_OPCODES -> IO_URING_QUERY_
        for k, (n, v) in enumerate(zip(names, values, strict=True)):
            full = first if k == 0 else (n if n.startswith(first.split("_")[0] + "_") else
                                         family + n)
            yield _const(full, v, value_since.get(v, row_since))
        # Constants mentioned in a value's parentheses, e.g. "1<<0 (IORING_NOP_CQE32 1<<5)".
        for paren in notes:
            yield from _inline_constants(paren, prefix)


def section7(md: str) -> dict[str, tuple[str, list[Constant]]]:
    """§7 constants by subsection: data key -> (subsection title, constants)."""
    body = md[md.index("## 7. Constants"):md.index("## 8. ")]
    out: dict[str, tuple[str, list[Constant]]] = {}
    for chunk in body.split("\n### ")[1:]:
        title, _, text = chunk.partition("\n")
        key = next((k for k in SECTION_PREFIX if title.startswith(k)), None)
        assert key is not None, f"unknown constants subsection {title!r}"
        data_key, prefix = SECTION_PREFIX[key]
        found: list[Constant] = []
        for line in text.splitlines():
            if line.lstrip().startswith("|"):
                cells = _split_row(line)
                if re.fullmatch(r"[\s|:-]+", line) or cells[0] in ("name", "flag"):
                    continue
                found.extend(_table_constants(cells, prefix))
            else:
                found.extend(_inline_constants(line, prefix))
        n_names = len({c.name for c in found})
        assert n_names >= SECTION_MIN[key], (
            f"{key}: parsed {n_names} constants, expected >= {SECTION_MIN[key]}"
        )
        out[data_key] = (title.strip(), found)
    assert {k for k, _ in SECTION_PREFIX.values()} == set(out), f"subsections: {sorted(out)}"
    return out


def _assignment_since(md: str, m: re.Match[str]) -> str | None:
    """The release an inline ``NAME = value`` belongs to, from its surroundings."""
    if _section_at(md, m.start()) == "§5b":
        # The update is a list of top-level bullets, one per release: "- **7.3 (for-7.3 ...".
        start = md.index("### 5b.")
        heads = re.findall(r"^- (?:\*\*)?([^\s*:]+)", md[start:m.start()], re.M)
        return heads[-1] if heads and re.fullmatch(r"\d+\.\d+", heads[-1]) else None
    note = _NOTE_AFTER.match(md, m.end())
    if note and (since := _since_of(note.group(1))) is not None:
        return since
    # The clause leading up to the name: "..., and in mainline post-7.1 ZCRX_NOTIF = 3".
    clause = re.split(r"[,;:(]|\.\s|\n\n", md[max(0, m.start() - 200):m.start()])[-1]
    m2 = re.search(r"\bpost-\d+\.\d+", clause, re.I)
    return _since_of(m2.group(0)) if m2 else None


def assignments(md: str) -> list[Constant]:
    """``NAME = value`` statements anywhere in the reference (first occurrence of each)."""
    text = md.replace("**", "")
    out: list[Constant] = []
    seen = set()
    for m in _ASSIGNMENT.finditer(text):
        name = SHORT_NAMES.get(m.group(1), m.group(1))
        c = _const(name, m.group(2), _assignment_since(text, m))
        if (c.name, c.value) in seen:
            continue
        seen.add((c.name, c.value))
        c.section = _section_at(text, m.start())
        out.append(c)
    names = {c.name for c in out}
    for needed in NEEDED_ASSIGNMENTS:
        assert needed in names, f"{needed} = ... not found in the reference"
    assert len(out) >= 10, f"only {len(out)} inline assignments"
    return out


# ============================================================================================
# TOML output (tomllib only reads; the format written here is deliberately simple)
# ============================================================================================

HEADER = """\
# Linux uapi facts that tests/test_abi.py checks shared/abi.py against.
#
# Read from the team reference uapi-layouts.md (shared/reference/ in the team folder) by
# tests/tools/extract_uapi.py.  This file is source, not run output: it was generated once,
# reviewed and committed, and is regenerated (then reviewed again) only when the reference
# changes; do not edit it by hand:
#   python tests/tools/extract_uapi.py /path/to/uapi-layouts.md > tests/data/uapi_layouts.toml
#   python tests/tools/extract_uapi.py --check /path/to/uapi-layouts.md   # diff; exit 1 if stale
#
# Offsets and sizes are bytes on x86-64 (little-endian).  Types are C scalar types (u8 .. u64,
# s32); `sizes` lists every size the reference allows for a field ([] = an n-element array).
# A fact holds for the releases in meta.linux unless it says `since` (first release that has
# it) and/or `until` (last release that has it); tests require facts up to abi.LINUX_VERSION
# and let newer ones be absent.  `section` is the reference section (§N) a fact was read from,
# `source` what the reference checked it against.
"""


def _str(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)


def _val(v: object, hexa: bool = False) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return f"{v:#x}" if hexa else str(v)
    if isinstance(v, str):
        return _str(v)
    if isinstance(v, list):
        return "[" + ", ".join(_val(x) for x in v) + "]"
    if isinstance(v, dict):
        return _inline(v)
    raise TypeError(v)


def _inline(d: dict[str, object]) -> str:
    return "{ " + ", ".join(f"{k} = {_val(v)}" for k, v in d.items() if v is not None) + " }"


def _entry(e: Entry) -> str:
    d: dict[str, object] = {"name": e.name, "off": e.off, "sizes": e.sizes, "type": e.ctype,
                            "since": e.since}
    return _inline(d)


def _constant(c: Constant) -> str:
    parts = [f"name = {_str(c.name)}", f"value = {_val(c.value, c.hexa)}"]
    if c.since:
        parts.append(f"since = {_str(c.since)}")
    if c.section:
        parts.append(f"section = {_str(c.section)}")
    return "{ " + ", ".join(parts) + " }"


def _array(key: str, items: list[str]) -> list[str]:
    """``key = [`` one item per line ``]``: small diffs when the reference changes."""
    return [f"{key} = [", *(f"  {it}," for it in items), "]"]


def render(md: str) -> str:
    out = [HEADER]
    out += ["[meta]", f"reference = {_str('uapi-layouts.md')}",
            f"linux = {_str(DEFAULT_LINUX)}", f"source = {_str('liburing')}", ""]
    out += ["[sources]"] + [f"{k} = {_str(v)}" for k, v in SOURCES.items()] + [""]

    out += ["# Struct sizes stated in headings and prose (§1, §2, §5).", "[sizes]"]
    out += [f"{k} = {v}" for k, v in prose_sizes(md).items()] + [""]

    for s in structs(md):
        out.append(f"[struct.{s.key}]")
        out.append(f"title = {_str(s.title)}")
        out.append(f"section = {_str(s.section)}")
        out.append(f"source = {_str(s.source or SECTION_SOURCE[s.section])}")
        out.append(f"form = {_str(s.form)}")
        if s.size is not None:
            out.append(f"size = {s.size}")
        if s.since is not None:
            out.append(f"since = {_str(s.since)}")
        out += [*_array("fields", [_entry(e) for e in s.entries]), ""]

    out.append("# struct io_rings: the offsets the kernel reports in sq_off / cq_off, per release.")
    for lay in io_rings(md):
        out += ["[[io_rings]]", f"section = {_str('§4')}", f"source = {_str('kernel')}"]
        out += [f"{k} = {_val(lay[k])}" for k in ("since", "until") if lay[k] is not None]
        out += [f"sizeof = {lay['sizeof']}", f"sq_off = {_val(lay['sq_off'])}",
                f"cq_off = {_val(lay['cq_off'])}", ""]

    out += ["# rings_size() worked example (no flags; cqe32_sq_array: with IORING_SETUP_CQE32).",
            "[rings_example]", f"section = {_str('§4')}", f"source = {_str('kernel')}"]
    out += [f"{k} = {v}" for k, v in rings_example(md).items()] + [""]

    out.append("# zcrx refill-queue (RQ) region header, per release.")
    for row in zcrx_rq(md):
        out += ["[[zcrx_rq]]", f"section = {_str('§5a')}", f"source = {_str('kernel')}"]
        out += [f"{k} = {_val(v)}" for k, v in row.items() if v is not None] + [""]

    out += ["# mmap offset of a kernel-allocated zcrx RQ region: base + (zcrx_id << id_shift).",
            "[zcrx_region_mmap]", f"section = {_str('§5a')}", f"source = {_str('kernel')}"]
    mm = zcrx_region_mmap(md)
    out += [f"base = {mm['base']:#x}", f"id_shift = {mm['id_shift']}", ""]

    for key, (title, found) in section7(md).items():
        out += [f"[constants.{key}]", f"section = {_str('§7 ' + title)}",
                f"source = {_str('liburing')}"]
        out += [*_array("entries", [_constant(c) for c in found]), ""]

    out += ["# NAME = value statements anywhere in the reference; each says its section, whose",
            "# source applies.", "[constants.inline]", f"section = {_str('anywhere')}"]
    out += _array("entries", [_constant(c) for c in assignments(md)])
    text = "\n".join(out) + "\n"
    tomllib.loads(text)  # what we write must read back
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("reference", nargs="?", type=Path, default=DEFAULT_REFERENCE,
                    help=f"uapi-layouts.md (default {DEFAULT_REFERENCE})")
    ap.add_argument("--check", action="store_true",
                    help="compare with the data file instead of printing; exit 1 if it differs")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA,
                    help=f"data file for --check (default {DEFAULT_DATA})")
    args = ap.parse_args(argv)
    if not args.reference.is_file():
        ap.error(f"reference {args.reference} not found; pass the path of uapi-layouts.md")
    text = render(args.reference.read_text(encoding="utf-8"))
    if not args.check:
        sys.stdout.write(text)
        return 0
    old = args.data.read_text(encoding="utf-8") if args.data.is_file() else ""
    if old == text:
        print(f"{args.data}: up to date with {args.reference}")
        return 0
    sys.stdout.writelines(difflib.unified_diff(
        old.splitlines(keepends=True), text.splitlines(keepends=True),
        str(args.data), f"extracted from {args.reference}",
    ))
    return 1


if __name__ == "__main__":
    sys.exit(main())
