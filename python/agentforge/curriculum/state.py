"""The per-level question state machine, independent of any model.

Each question stands for a *concept*: a (family, level) slot whose current item changes as
variants replace it. After every attempt:

    unaided success   streak + 1; at ``mastery`` (3) in a row the concept is mastered and
                      leaves the set, otherwise a fresh variant (same family and level) replaces it
    hinted success    "hint-corrected": a fresh variant without hints replaces it (to test
                      transfer); the streak restarts, since the concept needed help
    failure           streak 0; the next rung of the hint ladder is attached (keyed on the
                      diagnosed failure); a failure with the last rung already shown skips it

Successes and hint-corrected answers are what the level trains on (``Attempt.train_prompts``).
The streak survives variant replacement: that is what lets a concept be mastered at all (the
original reset it with every variant, so nothing was ever mastered).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from agentforge.curriculum import hints as hint_rules
from agentforge.data import TaskItem

ACTIVE, MASTERED, SKIPPED = "active", "mastered", "skipped"
VARIANT, CORRECTED, HINT, SKIP, MASTER = "variant", "corrected", "hint", "skip", "mastered"


@dataclass
class Question:
    """One concept of a level: its current item, the hints attached to it and its history."""

    qid: int
    item: TaskItem
    streak: int = 0
    hints: list = field(default_factory=list)
    attempts: int = 0
    variants: int = 0
    status: str = ACTIVE

    @property
    def prompt(self) -> str:
        """The question as shown: the latest (strongest) hint in front of the item's prompt."""
        return hint_rules.hinted(self.hints[-1] if self.hints else "", self.item.prompt)


@dataclass(frozen=True)
class Attempt:
    """What one attempt did: the event, and the prompts (shown and plain) to train on."""

    qid: int
    event: str
    failure: str | None
    train_prompts: tuple[str, ...]
    item: TaskItem


class LevelState:
    """The questions of one level and the rules above. ``variant(item)`` returns a fresh item of
    the same family and level; ``mastery`` successes in a row master a concept; ``max_hints``
    rungs are shown before a question is skipped."""

    def __init__(
        self,
        items: list[TaskItem],
        variant: Callable[[TaskItem], TaskItem],
        *,
        mastery: int = 3,
        max_hints: int = hint_rules.MAX_HINTS,
    ):
        if not items:
            raise ValueError("LevelState: a level needs at least one question")
        if mastery < 1 or not 0 <= max_hints <= hint_rules.MAX_HINTS:
            raise ValueError(
                f"LevelState: need mastery >= 1 and 0 <= max_hints <= {hint_rules.MAX_HINTS}, "
                f"got {mastery} and {max_hints}"
            )
        self.questions = [Question(i, item) for i, item in enumerate(items)]
        self.variant, self.mastery, self.max_hints = variant, mastery, max_hints
        self.counts = {VARIANT: 0, CORRECTED: 0, HINT: 0, SKIP: 0, MASTER: 0}

    @property
    def active(self) -> list[Question]:
        """The questions still in the set."""
        return [q for q in self.questions if q.status == ACTIVE]

    @property
    def remaining(self) -> int:
        return len(self.active)

    def record(self, question: Question, prediction: str, success: bool) -> Attempt:
        """Apply one attempt's outcome to ``question``; returns what happened."""
        if question.status != ACTIVE:
            raise ValueError(f"LevelState.record: question {question.qid} is {question.status}, not active")
        question.attempts += 1
        item, shown = question.item, question.prompt
        if success:
            return self._success(question, item, shown)
        question.streak = 0
        failure = hint_rules.diagnose(item, prediction)
        if len(question.hints) >= self.max_hints:
            question.status = SKIPPED
            return self._event(question, SKIP, failure, (), item)
        question.hints.append(hint_rules.hint(item, failure, len(question.hints) + 1))
        return self._event(question, HINT, failure, (), item)

    def _success(self, question: Question, item: TaskItem, shown: str) -> Attempt:
        hinted = bool(question.hints)
        # a hint-corrected answer trains both ways: as answered (with the hint, which teaches
        # the model to use hints) and as if unaided (the hint removed, as in STaR rationalisation)
        prompts = (shown, item.prompt) if hinted else (item.prompt,)
        question.streak = 0 if hinted else question.streak + 1
        if question.streak >= self.mastery:
            question.status = MASTERED
            return self._event(question, MASTER, None, prompts, item)
        question.item, question.hints = self.variant(item), []
        question.variants += 1
        return self._event(question, CORRECTED if hinted else VARIANT, None, prompts, item)

    def _event(self, question, event, failure, prompts, item) -> Attempt:
        self.counts[event] += 1
        return Attempt(question.qid, event, failure, prompts, item)
