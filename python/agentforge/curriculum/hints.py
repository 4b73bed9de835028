"""Rule-based hints: diagnose why an answer failed, then escalate from a nudge about that
failure to the answer itself, in at most ``MAX_HINTS`` rungs.

    diagnose(item, "-17")  -> "sign"           (the answer is 17)
    hint(item, "sign", 1)  -> "hint: check the sign"
    hint(item, "sign", 2)  -> "hint: check the sign, positive, 2 digits"
    hint(item, "sign", 3)  -> "hint: check the sign, starts 1"
    hint(item, "sign", 4)  -> "hint: check the sign, starts 17"   (the first half, at least one char)
    hint(item, "sign", 5)  -> "hint: answer 17"                   (directive)

A hint goes in front of the question (``hinted("hint: ...", "24-7=")``), so the answer still
follows the ``=`` directly, as in training.
"""

from __future__ import annotations

import ast

from agentforge.curriculum.tasks import ARITHMETIC
from agentforge.data import TaskItem
from agentforge.tools import CalcError, calculate

MAX_HINTS = 5
NUDGES = {
    "empty": "write the answer",
    "format_number": "the answer is a number",
    "format_word": "the answer is one word",
    "sign": "check the sign",
    "off_by_one": "off by one",
    "operation": "check each operator",
    "other_key": "that is another key",
    "magnitude": "check the size",
    "partial": "not finished",
    "order": "check the order",
    "wrong": "try again",
}
FAILURES = tuple(NUDGES)


def _integer(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        return None


def other_operations(expression: str) -> set[int]:
    """Integer values of ``expression`` with one of its + - * operators swapped for another:
    what a model that used the wrong operation would answer."""
    try:
        tree = ast.parse(expression, mode="eval")
    except SyntaxError:
        return set()
    swaps = {ast.Add: (ast.Sub, ast.Mult), ast.Sub: (ast.Add, ast.Mult), ast.Mult: (ast.Add, ast.Sub)}
    nodes = [node for node in ast.walk(tree) if isinstance(node, ast.BinOp) and type(node.op) in swaps]
    values = set()
    for node in nodes:
        original = node.op
        for other in swaps[type(original)]:
            node.op = other()
            try:
                value = calculate(ast.unparse(tree))
            except (CalcError, ArithmeticError, ValueError):
                continue
            finally:
                node.op = original
            if _integer(value) is not None:
                values.add(int(value))
    return values


def _other_values(item: TaskItem) -> set[str]:
    """kv_recall: the values of the keys that were not asked for."""
    pairs = item.question.split()[:-1]
    asked = item.question.split()[-1].lstrip("?").rstrip("=")
    return {pair.split("=")[1] for pair in pairs if pair.split("=")[0] != asked}


def diagnose(item: TaskItem, prediction: str) -> str:
    """The failure kind of a wrong ``prediction`` (one of ``FAILURES``), from simple rules on the
    item's answer: format, sign, off-by-one, wrong operation, another key's value, size,
    an unfinished or reordered word, else "wrong"."""
    guess, answer = prediction.strip(), item.answer.strip()
    if not guess:
        return "empty"
    expected = _integer(answer)
    if expected is not None:
        value = _integer(guess)
        if value is None:
            return "format_number"
        if expected != 0 and value == -expected:
            return "sign"
        if abs(value - expected) == 1:
            return "off_by_one"
        if item.family in ARITHMETIC and value in other_operations(item.question.rstrip("=")):
            return "operation"
        if item.family == "kv_recall" and guess in _other_values(item):
            return "other_key"
        if len(str(abs(value))) != len(str(abs(expected))):
            return "magnitude"
        return "wrong"
    if not guess.isalpha():
        return "format_word"
    if answer.startswith(guess):
        return "partial"
    if sorted(guess) == sorted(answer):
        return "order"
    return "wrong"


def _shape(answer: str) -> str:
    value = _integer(answer)
    if value is None:
        return f"{len(answer)} letters"
    digits = len(str(abs(value)))
    return f"{'negative' if value < 0 else 'positive' if value > 0 else 'zero'}, {digits} digit{'s' * (digits > 1)}"


def hint(item: TaskItem, failure: str, rung: int) -> str:
    """Hint number ``rung`` (1..MAX_HINTS) for ``item`` after a failure of kind ``failure``:
    1 the nudge, 2 + the answer's shape, 3 + its first character, 4 + its first half, 5 the answer."""
    if failure not in NUDGES:
        raise ValueError(f"hint: unknown failure kind {failure!r}; known: {', '.join(FAILURES)}")
    if not isinstance(rung, int) or not 1 <= rung <= MAX_HINTS:
        raise ValueError(f"hint: rung must be an int in 1..{MAX_HINTS}, got {rung!r}")
    answer = item.answer.strip()
    head = 2 if answer.startswith("-") else 1  # a sign alone reveals nothing useful
    reveal = {
        1: "",
        2: _shape(answer),
        3: f"starts {answer[:head]}",
        4: f"starts {answer[: max(head, (len(answer) + 1) // 2)]}",
    }
    if rung == MAX_HINTS:
        return f"hint: answer {answer}"
    return f"hint: {NUDGES[failure]}" + (f", {reveal[rung]}" if reveal[rung] else "")


def hinted(hint_text: str, prompt: str) -> str:
    """The question with its hint in front (the answer still follows the prompt's ``=``)."""
    return f"{hint_text}; {prompt}" if hint_text else prompt
