"""Tool use: a calculator and a sandboxed Python runner that a model calls from its own text.

``format``: the ``[calc: ...]`` / ``[py: ...]`` / ``[out: ...]`` call format and its parsing;
``calculator``: exact arithmetic by walking the syntax tree; ``sandbox``: model-written Python
in a kernel-confined process (``run_python``, ``describe_isolation``) and the run's tool
settings; ``decoding``: running calls (``run_tool``) and generation that runs them as the model
writes them.

Names are imported on first use (PEP 562): the run config reads ``ToolSettings`` without
importing torch through the decoding module.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the lazy names, for type checkers (re-exported: __all__ below is built from _MODULE_OF)
    from agentforge.tools.calculator import CalcError, calculate  # noqa: F401
    from agentforge.tools.decoding import generate_with_tools, generate_with_tools_batch, run_tool, tool_trajectories  # noqa: F401
    from agentforge.tools.format import (  # noqa: F401
        OUTPUT_LIMIT,
        TOOL_PROMPT,
        TOOLS,
        ToolCall,
        ToolResult,
        follows_tool_format,
        format_result,
        parse_tool_call,
        trace_segments,
    )
    from agentforge.tools.sandbox import (  # noqa: F401
        ISOLATIONS,
        SandboxUnavailable,
        ToolSettings,
        describe_isolation,
        isolation,
        run_python,
    )

_MODULE_OF = {
    **dict.fromkeys(["CalcError", "calculate"], "calculator"),
    **dict.fromkeys(["generate_with_tools", "generate_with_tools_batch", "run_tool", "tool_trajectories"], "decoding"),
    **dict.fromkeys(
        [
            "OUTPUT_LIMIT",
            "TOOL_PROMPT",
            "TOOLS",
            "ToolCall",
            "ToolResult",
            "follows_tool_format",
            "format_result",
            "parse_tool_call",
            "trace_segments",
        ],
        "format",
    ),
    **dict.fromkeys(
        ["ISOLATIONS", "SandboxUnavailable", "ToolSettings", "describe_isolation", "isolation", "run_python"], "sandbox"
    ),
}
__all__ = list(_MODULE_OF)


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'agentforge.tools' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"agentforge.tools.{_MODULE_OF[name]}"), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
