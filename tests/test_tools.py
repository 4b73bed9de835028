"""agentforge.tools: the calculator, the call format and its parsing, and ``run_tool``'s
dispatch (the sandbox is tests/test_tools_sandbox.py and tests/test_sandbox_escapes.py,
generation tests/test_tools_decoding.py)."""

import random
from fractions import Fraction

import pytest

from agentforge.tools import (
    OUTPUT_LIMIT,
    TOOL_PROMPT,
    ToolCall,
    ToolResult,
    calculate,
    follows_tool_format,
    parse_tool_call,
    run_tool,
    trace_segments,
)

# ---------------------------------------------------------------------------------------------
# the calculator


@pytest.mark.parametrize(
    "expression, value",
    [
        ("37*48", "1776"),
        ("0.1+0.2", "0.3"),
        ("7/2", "3.5"),
        ("1/3", "0.333333333333"),
        ("-7//2", "-4"),
        ("-7%3", "2"),
        ("2**-2", "0.25"),
        ("(1+2)*-3", "-9"),
        ("-2--5", "3"),
        ("1.5e3*2", "3000"),
        ("6/3", "2"),
        (" 12 + 7 ", "19"),
        ("-(54--89)*35*28+-13", "-140153"),
        ("100/7", "14.2857142857"),
        ("1/1024", "0.0009765625"),
        ("1/7000", "0.000142857142857"),
        ("1/70000", "1.42857142857e-05"),
        ("10**20/3", "3.33333333333e+19"),
    ],
)
def test_calc_is_exact_arithmetic(expression, value):
    assert run_tool(ToolCall("calc", expression)) == ToolResult(value, True)


@pytest.mark.parametrize(
    "expression, value",
    [
        ("(1/7)**500", "2.82474984102e-423"),  # a float underflows to 0 here
        ("-(1/3)**700", "-1.03543227066e-334"),  # ... and to -0 here
        ("(10**400)/3", "3.33333333333e+399"),  # ... and overflows here
        ("-2/3*10**-320", "-6.66666666667e-321"),
    ],
)
def test_calc_keeps_values_a_float_cannot_hold(expression, value):
    assert run_tool(ToolCall("calc", expression)) == ToolResult(value, True)


def test_calc_rounds_to_twelve_significant_digits_of_the_exact_value():
    generator = random.Random(0)
    for _ in range(2000):
        exact = Fraction(
            generator.randrange(1, 10 ** generator.randint(1, 40)),
            generator.randrange(1, 10 ** generator.randint(1, 40)),
        ) * generator.choice((1, -1))
        shown = calculate(f"{exact.numerator}/{exact.denominator}")
        assert abs(Fraction(shown) - exact) <= abs(exact) * Fraction(5, 10**12), (exact, shown)
        if (exact * 10**12).denominator != 1:  # not a short decimal: 12 significant digits
            assert len(shown.lstrip("-0.").split("e")[0].replace(".", "").rstrip("0")) <= 12, shown


def test_long_results_are_clipped_like_every_result():
    result = run_tool(ToolCall("calc", "2**1000"))
    assert result.ok and len(result.output) == OUTPUT_LIMIT and result.output.endswith("...")
    assert result.output[:-3] == str(2**1000)[: OUTPUT_LIMIT - 3]
    assert calculate("2**1000") == str(2**1000)  # the calculator itself stays exact (curriculum hints)


@pytest.mark.parametrize(
    "expression, message",
    [
        ("__import__('os').system('true')", "not allowed"),
        ("x + 1", "not allowed"),
        ("abs(-1)", "not allowed"),
        ("'a' * 3", "not allowed"),
        ("(1).__class__", "not allowed"),
        ("2**100000", "too large"),
        ("(10**300)**20", "too large"),
        ("1/0", "division by zero"),
        ("5 % 0", "division by zero"),
        ("0**-1", "division by zero"),
        ("2**0.5", "whole-number exponents"),
        ("", "empty"),
        ("(1+2", "cannot parse"),
        ("1" * 600, "longer than 500"),
        ("[].__class__.__base__.__subclasses__()", "not allowed"),
        ("(lambda: 1)()", "not allowed"),
    ],
)
def test_calc_refuses_what_is_not_arithmetic(expression, message):
    result = run_tool(ToolCall("calc", expression))
    assert not result.ok and result.output.startswith("error: ") and message in result.output


def test_run_tool_refuses_an_unknown_isolation():
    with pytest.raises(ValueError, match="isolation must be one of os, unsafe-inprocess"):
        run_tool(ToolCall("calc", "1+1"), isolation="none")


# ---------------------------------------------------------------------------------------------
# parsing


@pytest.mark.parametrize(
    "text, call",
    [
        ("37*48=[calc: 37*48]", ToolCall("calc", "37*48")),
        ("[calc:1+1]", ToolCall("calc", "1+1")),
        ("x=[py: print([1, [2]][1])]", ToolCall("py", "print([1, [2]][1])")),
        ("[py: print(']')]", ToolCall("py", "print(']')")),
        ("[calc: 1][out: 1]then [calc: 2*3]", ToolCall("calc", "2*3")),
        ("[search: cats]", ToolCall("search", "cats")),  # unknown tools parse; run_tool answers with an error
    ],
)
def test_parse_finds_the_call_the_text_ends_with(text, call):
    assert parse_tool_call(text) == call


@pytest.mark.parametrize(
    "text",
    [
        "",
        "17",
        "[calc: 1+1",
        "[calc 1+1]",
        "calc: 1+1]",
        "[calc: 1+1] ",
        "[calc: 1+1]5",
        "[out: 2]",
        "[calc: 1][out: 1]",
        "[CALC: 1]",
        "[py: print(']')",
        "]",
        "[]",
        "[: 1]",
        None,
        17,
    ],
)
def test_parse_returns_none_for_text_that_does_not_end_with_a_call(text):
    assert parse_tool_call(text) is None


def test_unknown_tool_gets_an_error_result():
    result = run_tool(ToolCall("search", "cats"))
    assert result == ToolResult("error: unknown tool 'search'; tools: calc, py", False)


@pytest.mark.parametrize(
    "text, ok",
    [
        ("[calc: 37*48][out: 1776]1776", True),
        ("[py: print(2)][out: 2]then [calc: 2*3][out: 6]6", True),
        ("[calc: 1/0][out: error: division by zero]none", True),
        ("1776", False),  # no call
        ("[calc: 37*48]1776", False),  # no result after the call
        ("[calc: 37*48][out: 1776]", False),  # no answer after the result
        ("[out: 5]5", False),  # a result nobody asked for
        ("[calc: 1][out: 1][out: 1]1", False),
        ("[search: x][out: y]z", False),  # unknown tool
        ("[calc: 1+1][out: 2", False),  # unclosed
    ],
)
def test_follows_tool_format(text, ok):
    assert follows_tool_format(text) is ok


def test_trace_segments_mark_the_runtime_results():
    assert trace_segments("q=[calc: 1+1][out: 2]2") == [("q=[calc: 1+1]", False), ("[out: 2]", True), ("2", False)]


def test_tool_prompt_describes_both_tools_and_the_result_format():
    for part in ("[calc:", "[py:", "[out:", "+ - * / // % **"):
        assert part in TOOL_PROMPT
