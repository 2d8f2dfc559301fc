"""The hex blocks of docs/protocol.md, for the tests that keep the document and the code in step.

A block is a fenced code block right after ``<!-- vector: NAME -->`` or ``<!-- trace: NAME -->``. Each line
holds hex bytes, then optionally ``# comment``; in a trace, a line that starts with a side's name
(``relay``, ``agent``) begins that side's next WebSocket message and indented lines continue it. Every
token must be two hex digits, so a typo in the document fails the tests instead of being skipped.
"""

from __future__ import annotations

import re
from pathlib import Path

PROTOCOL_MD = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"
_BLOCK = re.compile(r"<!-- (vector|trace): ([\w-]+) -->\s*```[^\n]*\n(.*?)```", re.DOTALL)
_HEX = re.compile(r"[0-9a-f]{2}")
SIDES = ("relay", "agent")


def blocks(kind: str) -> dict[str, str]:
    found: dict[str, str] = {}
    for match in _BLOCK.finditer(PROTOCOL_MD.read_text()):
        if match.group(1) == kind:
            assert match.group(2) not in found, f"two {kind} blocks named {match.group(2)}"
            found[match.group(2)] = match.group(3)
    return found


def _hex(tokens: list[str]) -> bytes:
    bad = [t for t in tokens if not _HEX.fullmatch(t)]
    assert not bad, f"not hex bytes in docs/protocol.md: {bad}"
    return bytes.fromhex("".join(tokens))


def vector(block: str) -> bytes:
    return b"".join(_hex(line.partition("#")[0].split()) for line in block.splitlines())


def trace(block: str) -> list[tuple[str, bytes]]:
    messages: list[tuple[str, bytearray]] = []
    for line in block.splitlines():
        tokens = line.partition("#")[0].split()
        if not tokens:
            continue
        if tokens[0] in SIDES:
            messages.append((tokens[0], bytearray()))
            tokens = tokens[1:]
        else:
            assert messages and line[:1].isspace(), f"a trace line must name its side or be indented: {line!r}"
        messages[-1][1].extend(_hex(tokens))
    return [(side, bytes(data)) for side, data in messages]
