"""Where the curriculum's questions come from: the verifiable task families of ``agentforge.data``,
their ten difficulty levels, fresh variants, fixed held-out sets, and tool demonstrations.

Difficulty: ``FAMILIES[f].levels[k]`` maps level k (0 = easiest) onto the generator's settings
(terms, digits, word length, pairs, bits ...). The curriculum starts each family at its own
baseline level b (from the edge-of-chaos assessment) and curriculum level k trains data level
``min(b + k, 9)``.

Splits never meet: training questions and their variants come from the ``train`` split, the
assessment and the hard-wall check read the fixed ``validation`` items of a level, and the
before/after comparison reads the fixed ``test`` items (``make_split`` gives every prompt to
exactly one split).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from agentforge.data import NUM_LEVELS, TaskItem, make_split, rendered, score
from agentforge.tools import ToolCall, run_tool

# The tool that solves each family, as a function of the item: arithmetic goes to the
# calculator verbatim; bit counting and reversal are one line of Python.
ARITHMETIC = ("chain_sum", "basic_arithmetic", "add_small")


def tool_call_for(item: TaskItem) -> ToolCall | None:
    """The call that answers ``item``, or None for a family no tool helps (kv_recall)."""
    body = item.question[:-1] if item.question.endswith("=") else item.question
    if item.family in ARITHMETIC:
        return ToolCall("calc", body)
    if item.family == "count_bits":
        return ToolCall("py", f"print(bin({int(body.split()[1])}).count('1'))")
    if item.family == "spell_backward":
        return ToolCall("py", f"print({body.split()[1]!r}[::-1])")
    return None


@dataclass(frozen=True)
class Demonstration:
    """A tool-use trace for one item, made by executing the call: the model writes ``call``,
    the runtime appends ``result`` (``[out: ...]``), the model writes ``answer``."""

    item: TaskItem
    call: str
    result: str


def demonstrate(item: TaskItem) -> Demonstration | None:
    """The executed trace for ``item``; None when no tool applies or the tool's output does
    not score as the right answer (reasoning-gym rounds a few divisions its own way)."""
    from agentforge.tools import format_result

    call = tool_call_for(item)
    if call is None:
        return None
    result = run_tool(call)
    if not result.ok or score(item, result.output) < 1.0:
        return None
    return Demonstration(item, f"[{call.name}: {call.argument}]", format_result(result))


def level_of(baseline: int, k: int) -> int:
    """Data level of curriculum level ``k`` for a family whose baseline is ``baseline``."""
    return min(baseline + k, NUM_LEVELS - 1)


@dataclass
class VariantSource:
    """Fresh training items per (family, level): each call hands out items not handed out
    before in this run (a new question of the same family and difficulty), as long as the
    level has new prompts left; a level with a small prompt space (add_small level 0 has 200)
    repeats old ones rather than run dry."""

    seed: int
    chunk: int = 64
    render: Callable[[TaskItem], str] | None = None  # how an item becomes the model's prompt (a chat template)
    _pools: dict = field(default_factory=dict)

    def take(self, family: str, level: int, n: int = 1) -> list[TaskItem]:
        """``n`` new items of ``family`` at ``level`` from the train split."""
        pool = self._pools.setdefault((family, level), {"items": [], "seen": set(), "chunks": 0})
        stale = 0
        while len(pool["items"]) < n:
            # successive chunks come from distinct seed streams of the train split
            chunk = rendered(
                make_split(family, "train", self.chunk, seed=self.seed * 1000 + pool["chunks"], level=level),
                self.render,
            )
            pool["chunks"] += 1
            fresh = []
            for item in chunk:
                if item.prompt not in pool["seen"]:
                    pool["seen"].add(item.prompt)
                    fresh.append(item)
            stale = 0 if fresh else stale + 1
            pool["items"] += chunk if stale >= 3 else fresh
        items, pool["items"] = pool["items"][:n], pool["items"][n:]
        return items


class HeldOut(dict):
    """``{(family, level): fixed items}`` of a held-out split ("validation" or "test"); a key
    not asked for before is made on first use, always the same items for the same key."""

    def __init__(self, split: str, n: int, seed: int, render: Callable[[TaskItem], str] | None = None):
        if split not in ("validation", "test"):
            raise ValueError(f"held_out: split must be 'validation' or 'test', got {split!r}")
        super().__init__()
        self.split, self.n, self.seed, self.render = split, n, seed, render

    def __missing__(self, key: tuple[str, int]) -> list[TaskItem]:
        family, level = key
        self[key] = rendered(make_split(family, self.split, self.n, seed=self.seed, level=level), self.render)
        return self[key]


def held_out(families, split: str, n: int, seed: int, levels=range(NUM_LEVELS), render=None) -> HeldOut:
    """``HeldOut`` sets of ``split`` with ``n`` items per family and level, made for ``levels`` now."""
    sets = HeldOut(split, n, seed, render)
    for family in families:
        for level in levels:
            sets[(family, level)]
    return sets


def tool_budget(tokenizer, items, cap: int) -> int:
    """New model tokens that cover writing the call that answers each item, then its answer and
    eos (the ``[out: ...]`` the runtime appends is not counted), at most ``cap``."""

    def tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    calls = [(tool_call_for(item), item) for item in items]
    need = [tokens(f"[{call.name}: {call.argument}]") + tokens(item.answer) + 2 for call, item in calls if call]
    return min(cap, max(need, default=cap))


def answer_budget(tokenizer, items) -> int:
    """New tokens that cover the longest answer among ``items`` plus its eos."""
    return max(len(tokenizer(item.answer, add_special_tokens=False)["input_ids"]) for item in items) + 1
