"""Bounds on what a WebDataset shard's tar headers and `source.path` brace ranges may cost.

A shard is untrusted input, and the standard library's `tarfile` reads an extension header (pax
`x` / `g` / `X`, GNU long name `L` / long link `K`) into memory whole, whatever size it declares
(a 200 MB header: +200 MB of memory). `check_headers` reads the raw 512-byte headers at an offset
before `tarfile` does and refuses:

- an extension header declaring more than `HEADER_LIMIT` bytes (never read);
- a pax header that is not a clean run of `"<length> <keyword>=<value>\\n"` records, or whose
  payload holds a run of more than `DIGIT_RUN_LIMIT` digits, or that describes a sparse file
  (`GNU.sparse.*`: its map is read from the data, unbounded).

Why the pax rules, and not "require a patched Python": on Pythons before 3.11.10 / 3.12.6
(CVE-2024-6232) `tarfile` parses pax headers with regular expressions that take quadratic time on
crafted input (64 KiB of digits: 18 s on 3.11.7). Refusing pax headers on those Pythons would
refuse the shards webdataset's own writer makes (a pax `mtime` record on every member), and
requiring a patched Python would refuse this project's own supported interpreters. Well-formed
records with short digit runs keep both of those expressions linear, on every Python, so the
check is the same everywhere.

`brace_count` counts what a brace pattern expands to without expanding it (`braceexpand` builds
every range in memory first: `{0..999999999}` is a billion strings).
"""

from __future__ import annotations

import re
import string
import tarfile
from typing import BinaryIO

BLOCK = 512
HEADER_LIMIT = 64 << 10  # bytes an extension header may declare (a path is at most 4 KiB)
DIGIT_RUN_LIMIT = 64  # longest run of digits in a pax header (an mtime has ~20)
EXTENSION_TYPES = {b"x", b"g", b"X", b"L", b"K"}
PAX_TYPES = {b"x", b"g", b"X"}
_PAX_RECORD = re.compile(rb"([1-9][0-9]{0,19}) ([^=\n]+)=")
_DIGIT_RUN = re.compile(rb"[0-9]{%d}" % (DIGIT_RUN_LIMIT + 1))
# braceexpand's own grammar for ranges (integers or single letters, optional step)
_INT_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)(?:\.\.-?(\d+))?$")
_LETTERS = string.ascii_uppercase + string.ascii_lowercase
_CHAR_RANGE = re.compile(r"^([A-Za-z])\.\.([A-Za-z])(?:\.\.-?(\d+))?$")


class UnsafeTar(ValueError):
    """A tar header sdflow will not hand to `tarfile`."""


def check_headers(raw: BinaryIO, offset: int) -> None:
    """Check the extension headers starting at `offset` (up to the next member's own header)."""
    while True:
        raw.seek(offset)
        block = raw.read(BLOCK)
        if len(block) < BLOCK or block[156:157] not in EXTENSION_TYPES:
            return  # end of the archive, or a member's header: tarfile's to judge
        try:
            size = tarfile.nti(block[124:136])
        except tarfile.HeaderError as exc:
            raise UnsafeTar(f"bad size field in the header at {offset}: {exc}") from None
        if not 0 <= size <= HEADER_LIMIT:
            raise UnsafeTar(
                f"an extension header at {offset} declares {size} bytes (at most {HEADER_LIMIT})"
            )
        if block[156:157] in PAX_TYPES:
            check_pax(raw.read(size), offset)
        offset += BLOCK + -(-size // BLOCK) * BLOCK


def check_pax(payload: bytes, offset: int) -> None:
    """Refuse a pax header that is not a clean run of records (see the module docstring)."""
    if _DIGIT_RUN.search(payload):
        raise UnsafeTar(f"the pax header at {offset} holds more than {DIGIT_RUN_LIMIT} digits")
    pos = 0
    while pos < len(payload):
        match = _PAX_RECORD.match(payload, pos)
        end = pos + int(match.group(1)) if match else -1
        if not match or end > len(payload) or match.end() > end or payload[end - 1] != 0x0A:
            raise UnsafeTar(f"the pax header at {offset} has a malformed record at byte {pos}")
        if match.group(2).startswith(b"GNU.sparse"):
            raise UnsafeTar(f"the pax header at {offset} describes a sparse file")
        pos = end


def brace_count(pattern: str) -> int:
    """How many strings `braceexpand(pattern)` yields, computed without expanding (a pattern
    whose braces do not balance counts 1; braceexpand itself refuses it)."""
    total, depth, start, pos = 1, 0, 0, 0
    while pos < len(pattern):
        char = pattern[pos]
        if char == "\\":
            pos += 2
            continue
        if char == "{":
            start = pos if depth == 0 else start
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                total *= _expression_count(pattern[start + 1 : pos])
        pos += 1
    return total


def _expression_count(expr: str) -> int:
    ranged = _INT_RANGE.match(expr) or _CHAR_RANGE.match(expr)
    if ranged:
        first, last, step = ranged.groups()
        if first.isalpha():  # braceexpand's letters run A..Z then a..z
            first, last = (_LETTERS.index(c) for c in (first, last))
        return abs(int(last) - int(first)) // (int(step or 1) or 1) + 1
    items = _top_level_items(expr)
    if items is None:  # not a sequence: literal braces around a pattern
        return brace_count(expr)
    return sum(brace_count(item) for item in items)


def _top_level_items(seq: str) -> list[str] | None:
    items, depth, start, pos = [], 0, 0, 0
    while pos < len(seq):
        char = seq[pos]
        if char == "\\":
            pos += 2
            continue
        depth += {"{": 1, "}": -1}.get(char, 0)
        if char == "," and depth == 0:
            items.append(seq[start:pos])
            start = pos + 1
        pos += 1
    if depth != 0 or not items:
        return None
    return [*items, seq[start:]]
