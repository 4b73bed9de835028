"""The ``[calc: EXPRESSION]`` tool: exact integer/decimal arithmetic (``+ - * / // % **`` and
parentheses) with fractions, by walking the parsed syntax tree, never ``eval``: it runs no
model-written code, so it needs no sandbox.

Results are exact: integers in full, terminating decimals of up to 12 places as they are (0.3,
not 0.30000000000000004), anything else rounded to 12 significant digits from the exact
fraction (so (1/7)**500 is 2.93...e-423, not a float that underflowed to 0).
"""

from __future__ import annotations

import ast
import operator
from fractions import Fraction
from typing import cast

__all__ = ["CalcError", "calculate"]

_MAX_BITS = 4096  # numbers beyond ~1200 digits are refused, not computed
_SIGNIFICANT = 12  # digits of a value with no short exact decimal


class CalcError(ValueError):
    """A calculator expression that is not allowed or cannot be evaluated."""


_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
}


def _bits(x: Fraction) -> int:
    return max(x.numerator.bit_length(), x.denominator.bit_length())


def _power(base: Fraction, exponent: Fraction) -> Fraction:
    if exponent.denominator != 1:
        raise CalcError("only whole-number exponents are supported")
    if _bits(base) * abs(exponent.numerator) > _MAX_BITS:
        raise CalcError("number too large")
    if base == 0 and exponent < 0:
        raise CalcError("division by zero")
    return base**exponent.numerator


def _evaluate(node: ast.AST) -> Fraction:
    if isinstance(node, ast.Expression):
        return _evaluate(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return Fraction(str(node.value)) if isinstance(node.value, float) else Fraction(cast(int, node.value))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        value = _evaluate(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and (type(node.op) in _BINARY or isinstance(node.op, ast.Pow)):
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow):
            result = _power(left, right)
        elif right == 0 and type(node.op) in (ast.Div, ast.FloorDiv, ast.Mod):
            raise CalcError("division by zero")
        else:
            result = Fraction(_BINARY[type(node.op)](left, right))
        if _bits(result) > _MAX_BITS:
            raise CalcError("number too large")
        return result
    raise CalcError(f"not allowed in a calculation: {ast.unparse(node)}")


def _significant(value: Fraction) -> str:
    """A non-zero ``value`` rounded (half to even) to ``_SIGNIFICANT`` significant digits, written
    as ``'%.12g'`` writes a float, but computed on the exact fraction: no float range to fall out of."""
    sign, value = ("-" if value < 0 else ""), abs(value)
    # the digit counts put value in [10**(exponent-1), 10**(exponent+1)): one comparison decides
    exponent = len(str(value.numerator)) - len(str(value.denominator))
    if value < Fraction(10) ** exponent:
        exponent -= 1
    mantissa = round(value * Fraction(10) ** (_SIGNIFICANT - 1 - exponent))
    if mantissa == 10**_SIGNIFICANT:  # rounded up to the next power of ten
        mantissa, exponent = mantissa // 10, exponent + 1
    digits = str(mantissa)
    if -4 <= exponent < _SIGNIFICANT:
        whole = digits[: exponent + 1] if exponent >= 0 else "0"
        fraction = (digits[exponent + 1 :] if exponent >= 0 else "0" * (-exponent - 1) + digits).rstrip("0")
        return f"{sign}{whole}.{fraction}" if fraction else f"{sign}{whole}"
    fraction = digits[1:].rstrip("0")
    return f"{sign}{digits[0]}{'.' + fraction if fraction else ''}e{exponent:+03d}"


def _format_number(value: Fraction) -> str:
    """An integer as itself, a decimal of up to 12 places exactly, anything else to 12
    significant digits."""
    if value.denominator == 1:
        return str(value.numerator)
    places = next((p for p in range(1, 13) if (value * 10**p).denominator == 1), None)
    if places is None:
        return _significant(value)
    digits = str(abs(value.numerator) * 10**places // value.denominator).rjust(places + 1, "0")
    return f"{'-' if value < 0 else ''}{digits[:-places]}.{digits[-places:]}"


def calculate(expression: str) -> str:
    """The exact value of an arithmetic ``expression``, formatted; raises ``CalcError``."""
    if not expression.strip():
        raise CalcError("empty expression")
    if len(expression) > 500:
        raise CalcError("expression longer than 500 characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError:
        raise CalcError(f"cannot parse {expression.strip()!r}") from None
    return _format_number(_evaluate(tree))
