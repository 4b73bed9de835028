"""The tool-call format shared by the curriculum and baking phases, and its parsing.

    prompt       37*48=
    model        [calc: 37*48]            generation stops right after the closing ']'
    runtime      [out: 1776]              the call is executed and its result appended
    model        1776<eos>                generation continues

``[calc: EXPRESSION]`` is exact arithmetic (``agentforge.tools.calculator``); ``[py: CODE]`` runs
a Python snippet in the sandbox (``agentforge.tools.sandbox``) and returns what it printed.
Errors come back as ``[out: error: MESSAGE]``; nothing a model writes can raise out of generation.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

TOOLS = ("calc", "py")
TOOL_PROMPT = (
    "Tools: [calc: EXPR] does arithmetic (+ - * / // % ** and parentheses); [py: CODE] runs Python "
    "and returns what it prints; each result comes back as [out: RESULT]."
)
OUTPUT_LIMIT = 200  # characters of a result fed back to the model
_OPENER = re.compile(r"\[([a-z_]{1,16}):[ ]?")


@dataclass(frozen=True)
class ToolCall:
    """One call: ``name`` ("calc" or "py"; other names give an error result) and its argument."""

    name: str
    argument: str


@dataclass(frozen=True)
class ToolResult:
    """What a call returned: ``output`` (the text inside ``[out: ...]``) and whether it succeeded."""

    output: str
    ok: bool


def _closing_bracket(text: str, start: int, name: str) -> int | None:
    """Index of the ']' that closes the call whose argument starts at ``start``, or None if the
    text ends first. Brackets inside Python string literals do not count."""
    depth, quote, i = 0, None, start
    while i < len(text):
        ch = text[i]
        if quote:
            if ch == "\\":
                i += 1
            elif ch == quote:
                quote = None
        elif name == "py" and ch in "'\"":
            quote = ch
        elif ch == "[":
            depth += 1
        elif ch == "]":
            if depth == 0:
                return i
            depth -= 1
        i += 1
    return None


def _blocks(text: str) -> tuple[list[tuple[int, int, str]], bool]:
    """Every closed ``[name: ...]`` block as ``(start, end, name)``, left to right, and whether
    the text ends inside an unclosed one."""
    blocks: list[tuple[int, int, str]] = []
    position = 0
    while match := _OPENER.search(text, position):
        close = _closing_bracket(text, match.end(), match.group(1))
        if close is None:
            return blocks, True
        blocks.append((match.start(), close + 1, match.group(1)))
        position = close + 1
    return blocks, False


def calls_in(text: str):
    """``(start, end, ToolCall)`` for every closed call in ``text`` (``end`` is one past its ']'),
    left to right; ``[out: ...]`` blocks are skipped over, never read as calls."""
    for start, end, name in _blocks(text)[0]:
        if name != "out":
            opener = _OPENER.match(text, start)
            assert opener is not None  # every block starts with its opener
            yield start, end, ToolCall(name, text[opener.end() : end - 1])


def parse_tool_call(text: str) -> ToolCall | None:
    """The call that ``text`` ends with (its closing ']' is the last character), else None.
    A malformed call (no colon, unclosed brackets) is None; an unknown tool name is returned
    as a call, and ``run_tool`` answers it with an error result."""
    if not isinstance(text, str) or not text.endswith("]"):
        return None
    last = None
    for _, end, call in calls_in(text):
        last = call if end == len(text) else None
    return last


def trace_segments(text: str) -> list[tuple[str, bool]]:
    """``text`` cut into ``(segment, is_result)`` pieces: the ``[out: ...]`` blocks (written by
    the runtime, so a model trained on a trace takes no loss on them) and the text around them."""
    pieces, position = [], 0
    for start, end, name in _blocks(text)[0]:
        if name != "out":
            continue
        if start > position:
            pieces.append((text[position:start], False))
        pieces.append((text[start:end], True))
        position = end
    if position < len(text):
        pieces.append((text[position:], False))
    return pieces


def follows_tool_format(text: str) -> bool:
    """True when ``text`` uses tools as specified: at least one call, every call names a known
    tool and is followed at once by its ``[out: ...]``, every ``[out: ...]`` follows a call, and a
    non-empty answer comes after the last result."""
    if not isinstance(text, str):
        return False
    blocks, unclosed = _blocks(text)
    if unclosed:
        return False
    if not blocks or blocks[-1][2] != "out" or not text[blocks[-1][1] :].strip():
        return False
    for i, (start, _end, name) in enumerate(blocks):
        if name == "out":
            previous = blocks[i - 1] if i else None
            if previous is None or previous[2] == "out" or previous[1] != start:
                return False
        elif name not in TOOLS or i + 1 == len(blocks) or blocks[i + 1][2] != "out":
            return False
    return True


def clip(text: str) -> str:
    """``text`` on one line (whitespace runs become one space), cut to ``OUTPUT_LIMIT``
    characters with a trailing "..." when longer."""
    text = " ".join(text.split())
    return text if len(text) <= OUTPUT_LIMIT else text[: OUTPUT_LIMIT - 3] + "..."


def balanced(text: str) -> str:
    """``text`` unchanged when its brackets balance, else with them turned into parentheses, so
    that the ``[out: ...]`` block around it always closes where it should."""
    depth = 0
    for ch in text:
        depth += (ch == "[") - (ch == "]")
        if depth < 0:
            break
    return text if depth == 0 else text.replace("[", "(").replace("]", ")")


def format_result(result: ToolResult) -> str:
    """The text the runtime appends after a call: ``[out: OUTPUT]``."""
    return f"[out: {result.output}]"
