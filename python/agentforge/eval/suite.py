"""The run's held-out data and the one way every phase measures a model on it.

    suite = EvalSuite(spec, tokenizer, seed)          # spec: the run's DataSpec
    held = suite.held_out("test", n_items=100, n_text=256)
    report = suite.measure(model, held, batch_size=64)
    # {"perplexity", "accuracy": {domain}, "answer_nll": {domain}, "family_accuracy": {family},
    #  "accuracy_mean", "answer_nll_mean"}

Text: the Python stdlib sources and pydoc prose, split by whole documents (shuffled by the seed)
into train / validation / test and packed into rows of ``spec.seq_len`` tokens. Tasks: the
families of ``agentforge.data``, whose prompts are assigned to a split by their hash, so no
held-out prompt is ever trained on. Selection reads the validation split, reports the test split.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

from agentforge.data.spec import DataSpec


@dataclass
class HeldOut:
    """One evaluation set: text rows, task items per domain, and those items packed (answer-only
    labels) for the answer NLL."""

    text: Any
    items: dict[str, list]
    rows: dict[str, Any]


def spread(total: int, count: int) -> list[int]:
    """``count`` row indices spread evenly over ``total`` packed rows. Consecutive rows come from
    a few documents: the first 32 training rows of the tiny run are one odd document (perplexity
    304 against 5.6 elsewhere), so a sample of the first rows describes that document only."""
    count = min(count, total)
    return [(2 * i + 1) * total // (2 * count) for i in range(count)] if count else []


def answer_budget(tokenizer, items) -> int:
    """New tokens that cover the longest answer among ``items`` plus eos, and no more."""
    return max(len(tokenizer(it.answer, add_special_tokens=False)["input_ids"]) for it in items) + 1


@functools.lru_cache(maxsize=4)
def _documents(text_docs: int) -> tuple[str, ...]:
    from agentforge.data import load_text

    return tuple(load_text("stdlib", max_docs=text_docs) + load_text("pydoc"))


def documents(spec: DataSpec) -> list[str]:
    """The run's text documents (before any split): stdlib sources and pydoc prose."""
    return list(_documents(spec.text_docs))


def uses_chat(spec: DataSpec, tokenizer) -> bool:
    """Whether task prompts are rendered in ``tokenizer``'s chat template (see ``DataSpec.prompts``)."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if spec.prompts == "chat" and not has_template:
        raise ValueError("data.prompts=chat, but the tokenizer has no chat template")
    return spec.prompts == "chat" or (spec.prompts == "auto" and has_template)


def chat_renderer(tokenizer):
    """``render(item) -> prompt``: the family's instruction and the compact question as the user's
    turn of the tokenizer's chat template, ready for the assistant's answer (what an instruct model
    was trained to see)."""
    from agentforge.data.tasks import INSTRUCTIONS

    def render(item) -> str:
        question = f"{INSTRUCTIONS[item.family]}\n{item.question}" if item.family in INSTRUCTIONS else item.question
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
        )

    return render


class EvalSuite:
    """Text splits and task items of one run for one tokenizer (built on first use, then kept).
    ``render`` turns a task item into the prompt the model sees (None: its compact question)."""

    def __init__(self, spec: DataSpec, tokenizer, seed: int):
        self.spec, self.tokenizer, self.seed = spec, tokenizer, seed
        self.render = chat_renderer(tokenizer) if uses_chat(spec, tokenizer) else None

    @functools.cached_property
    def splits(self):
        """DatasetDict of packed text rows: train / validation / test (whole documents)."""
        from agentforge.data import text_splits

        return text_splits(self.tokenizer, documents(self.spec), self.spec.seq_len, seed=self.seed)

    def text(self, split: str, n: int | None = None, *, spread_rows: bool = False):
        """The first ``n`` packed rows of ``split`` (all without ``n``), or ``n`` rows spread over it."""
        rows = self.splits[split]
        if n is None:
            return rows
        return rows.select(spread(len(rows), n) if spread_rows else range(min(n, len(rows))))

    def items(self, split: str, n: int, families=None, levels=None) -> list:
        """``n`` items of ``split`` per family and level (all domain families and the spec's levels
        by default), family by family."""
        from agentforge.data import DOMAINS, make_split, rendered

        families = families if families is not None else [f for fams in DOMAINS.values() for f in fams]
        levels = levels if levels is not None else self.spec.task_levels
        return rendered(
            [
                item
                for family in families
                for level in levels
                for item in make_split(family, split, n, seed=self.seed, level=level)
            ],
            self.render,
        )

    def by_domain(self, split: str, n: int, levels=None) -> dict[str, list]:
        """``{domain: items}``: ``n`` items of ``split`` per family and level of each domain."""
        from agentforge.data import DOMAINS

        return {domain: self.items(split, n, families, levels) for domain, families in DOMAINS.items()}

    def rows(self, items, seq_len: int | None = None):
        """``items`` packed into rows (loss on answers and eos only)."""
        from agentforge.data import pack_tasks

        return pack_tasks(self.tokenizer, items, seq_len or self.spec.seq_len, seed=self.seed)

    def held_out(self, split: str, n_items: int, n_text: int) -> HeldOut:
        """``n_items`` per family and level and the first ``n_text`` text rows of ``split``."""
        items = self.by_domain(split, n_items)
        return HeldOut(self.text(split, n_text), items, {d: self.rows(its) for d, its in items.items()})

    def training_mixture(self, n_items: int, text_weight: float, n_rows: int, seed: int | None = None):
        """``n_rows`` training rows: text with weight ``text_weight``, the domains' task rows
        (``n_items`` per family and level) sharing the rest equally."""
        from agentforge.data import mixture

        domains = {d: self.rows(its) for d, its in self.by_domain("train", n_items).items()}
        share = (1 - text_weight) / len(domains)
        return mixture(
            {"text": self.splits["train"], **domains},
            {"text": text_weight, **dict.fromkeys(domains, share)},
            n_rows,
            seed=self.seed if seed is None else seed,
        )

    def measure(self, model, held: HeldOut, *, batch_size: int, answers: bool = False) -> dict:
        """Perplexity on the held-out text (and each row's summed NLL and token count, for a paired
        interval of two models' perplexity ratio); per domain the greedy-answer accuracy (reasoning-gym
        scorers), each item's score (``scores``: for paired intervals against another model) and
        the mean NLL of the answer tokens (graded where accuracy is still near 0); per family the
        accuracy; the means over domains; with ``answers`` the answers themselves."""
        from agentforge.data import score
        from agentforge.eval.lm import perplexity, row_nll
        from agentforge.eval.tasks import generate_answers

        text_nll, text_tokens = row_nll(model, held.text, batch_size=batch_size)
        report: dict[str, Any] = {
            "perplexity": math.exp(sum(text_nll) / max(sum(text_tokens), 1)),
            "text_rows": {"nll": text_nll, "tokens": text_tokens},
            "accuracy": {},
            "answer_nll": {},
            "family_accuracy": {},
            "scores": {},
        }
        given = {}
        for domain, items in held.items.items():
            predicted = generate_answers(
                model,
                self.tokenizer,
                [it.prompt for it in items],
                max_new_tokens=answer_budget(self.tokenizer, items),
                batch_size=batch_size,
            )
            scores = [score(it, a) for it, a in zip(items, predicted)]
            given[domain] = predicted
            report["scores"][domain] = scores
            report["accuracy"][domain] = sum(scores) / len(items)
            for family in dict.fromkeys(it.family for it in items):
                mine = [s for it, s in zip(items, scores) if it.family == family]
                report["family_accuracy"][family] = sum(mine) / len(mine)
            report["answer_nll"][domain] = math.log(perplexity(model, held.rows[domain], batch_size=batch_size))
        report["accuracy_mean"] = sum(report["accuracy"].values()) / len(report["accuracy"])
        report["answer_nll_mean"] = sum(report["answer_nll"].values()) / len(report["answer_nll"])
        if answers:
            report["answers"] = given
        return report
