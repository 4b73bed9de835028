"""What the baking cycles score and the Baking phase reports: a model's behaviour with a prompt
in context (as baking trains it) or unprompted.

* tools: greedy generation with the tools of ``agentforge.tools`` executed; the share of
  completions in the tool-call format and the accuracy of their final answers.
* persona: greedy task accuracy and the probability of the right answer tokens.

Each measure's ``score`` (the mean of its two figures) is what the cycles select on.
"""

from __future__ import annotations

import dataclasses

from agentforge.baking.kl import SEPARATOR


def in_context(prompt: str | None, text: str) -> str:
    """``text`` preceded by ``prompt`` (as baking trains it), or alone when ``prompt`` is None."""
    return text if prompt is None else prompt + SEPARATOR + text


def final_answer(completion: str, used_tools: bool) -> str:
    """The answer in a completion: after the last ``[out: ...]`` when tools were called."""
    return completion.rsplit("]", 1)[-1].strip() if used_tools else completion.strip()


def tool_behaviour(model, tokenizer, prompt: str | None, items, *, max_new_tokens: int, batch_size: int) -> dict:
    """Greedy generation of up to ``max_new_tokens`` model tokens with the tools executed: the
    share of completions in the tool-call format, the accuracy of their final answers, and
    ``score`` = the mean of the two."""
    from agentforge.data import score
    from agentforge.tools import follows_tool_format, generate_with_tools_batch

    outputs = generate_with_tools_batch(
        model,
        tokenizer,
        [in_context(prompt, it.prompt) for it in items],
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
    )
    formatted = [follows_tool_format(text) for text, _ in outputs]
    correct = [score(it, final_answer(text, bool(calls))) for it, (text, calls) in zip(items, outputs)]
    report = {
        "format": sum(formatted) / len(items),
        "accuracy": sum(correct) / len(items),
        "calls": sum(len(calls) for _, calls in outputs) / len(items),
    }
    return {
        **report,
        "score": (report["format"] + report["accuracy"]) / 2,
        "examples": [text for text, _ in outputs[:3]],
        "items": {"format": [float(f) for f in formatted], "accuracy": [float(c) for c in correct]},
    }


def answer_rows(tokenizer, prompt: str | None, items):
    """One right-padded row per item, ``prompt + item prompt + answer + eos``, loss on answer and
    eos: a causal model's answer NLL on a row is exactly what it is on the item alone."""
    from datasets import Dataset

    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    pairs = [
        (
            tokenizer(in_context(prompt, it.prompt), add_special_tokens=False)["input_ids"],
            tokenizer(it.answer, add_special_tokens=False)["input_ids"] + [eos],
        )
        for it in items
    ]
    width = max(len(p) + len(a) for p, a in pairs)
    ids = [p + a + [pad] * (width - len(p) - len(a)) for p, a in pairs]
    labels = [[-100] * len(p) + a + [-100] * (width - len(p) - len(a)) for p, a in pairs]
    return Dataset.from_dict({"input_ids": ids, "labels": labels})


def answer_probability(model, tokenizer, prompt: str | None, items, *, batch_size: int) -> float:
    """The geometric-mean probability of the right answer tokens (and eos) of ``items``."""
    from agentforge.eval import perplexity

    return 1.0 / perplexity(model, answer_rows(tokenizer, prompt, items), batch_size=batch_size)


def persona_behaviour(model, tokenizer, prompt: str | None, items, *, batch_size: int) -> dict:
    """Greedy task accuracy and the (geometric-mean) probability of the right answer tokens;
    ``score`` = their mean, graded even where accuracy is still zero."""
    from agentforge.data import score
    from agentforge.eval import task_accuracy
    from agentforge.eval.suite import answer_budget

    shown = [dataclasses.replace(it, prompt=in_context(prompt, it.prompt)) for it in items]
    # the scorers read the answer and the generator's entry, which the prompt does not change
    accuracy = task_accuracy(
        model, tokenizer, shown, score=score, max_new_tokens=answer_budget(tokenizer, items), batch_size=batch_size
    ).accuracy
    probability = answer_probability(model, tokenizer, prompt, items, batch_size=batch_size)
    return {"accuracy": accuracy, "answer_probability": probability, "score": (accuracy + probability) / 2}


def behaviour(
    cycle: str, model, tokenizer, prompt: str | None, items, *, tool_new_tokens: int, batch_size: int
) -> dict:
    """The ``cycle``'s behaviour of ``model`` with ``prompt`` in context (None: unprompted);
    tool use is generated with ``tool_new_tokens`` model tokens."""
    if cycle == "tools":
        return tool_behaviour(model, tokenizer, prompt, items, max_new_tokens=tool_new_tokens, batch_size=batch_size)
    return persona_behaviour(model, tokenizer, prompt, items, batch_size=batch_size)
