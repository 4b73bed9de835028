"""Running the calls a model writes (``run_tool``) and generation that runs them as it goes.

After each token the new text is checked for a call that has just closed; the text is cut right
after its ']' (a token that ran past it is re-encoded), the call is run and ``[out: RESULT]``
appended as ids the model reads next, and generation continues until eos or ``max_new_tokens``
model tokens (tool results do not count).

A model whose ``generation_config.use_cache`` is true (Hugging Face models such as Llama) is
decoded incrementally with its KV cache (``_CachedBatch``); others (Cognate has no cache) get a
full forward over every sequence for every token. Both give the logits of a full forward over
each row's ids, so they pick the same tokens.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

from .calculator import CalcError, calculate
from .format import TOOLS, ToolCall, ToolResult, calls_in, clip, format_result
from .sandbox import ISOLATIONS, run_python

__all__ = ["generate_with_tools", "generate_with_tools_batch", "run_tool", "tool_trajectories"]


def run_tool(
    call: ToolCall, *, timeout_s: float = 2.0, memory_mb: int = 256, isolation: str | None = None
) -> ToolResult:
    """Execute ``call``; never raises for anything a model can write (unknown tools, bad
    expressions, failing code all give ``ToolResult(output="error: ...", ok=False)``). Python
    runs under ``isolation`` (see ``agentforge.tools.sandbox``), which raises
    ``SandboxUnavailable`` where it cannot be set up."""
    if isolation is not None and isolation not in ISOLATIONS:
        raise ValueError(f"run_tool: isolation must be one of {', '.join(ISOLATIONS)}, got {isolation!r}")
    if call.name == "calc":
        try:
            return ToolResult(clip(calculate(call.argument)), True)
        except CalcError as error:
            return ToolResult(clip(f"error: {error}"), False)
        except (ArithmeticError, RecursionError, ValueError) as error:  # deep nesting
            return ToolResult(clip(f"error: {type(error).__name__}"), False)
    if call.name == "py":
        return run_python(call.argument, timeout_s=timeout_s, memory_mb=memory_mb, isolation=isolation)
    return ToolResult(f"error: unknown tool {call.name!r}; tools: {', '.join(TOOLS)}", False)


def _first_new_call(text: str, after: int):
    """The first call in ``text`` whose closing ']' is at index ``after`` or later, as
    ``(end, ToolCall)``; None while no such call has closed."""
    for _, end, call in calls_in(text):
        if end > after:
            return end, call
    return None


@dataclass
class _Row:
    """One sequence being generated: its token ids, the text fixed so far (prompt excluded) and
    where the model's current, not yet fixed segment of ids starts."""

    ids: list
    segment_start: int
    done_text: str = ""
    calls: list = field(default_factory=list)
    new_tokens: int = 0
    finished: bool = False
    written: list = field(default_factory=list)  # per id after the prompt: True if the model wrote it
    ended_by_eos: bool = False


def _full_logits(model, rows: list[_Row], pad_id: int):
    """Next-token logits of each row from one forward pass over the left-padded batch."""
    import torch

    from agentforge.eval._common import model_device

    width = max(len(row.ids) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row.ids) :] = torch.tensor(row.ids)
        mask[i, width - len(row.ids) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    device = model_device(model)
    return (
        model(input_ids=input_ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device))
        .logits[:, -1]
        .float()
        .cpu()
    )


class _CachedBatch:
    """One batch of rows decoded with the model's KV cache.

    The cache holds one slot per id fed, all rows the same length (shorter inputs are
    left-padded in each step's block). Each step feeds every row the ids it has that its cache
    does not: one sampled token, or a call's cut segment and ``[out: ...]``. A re-encoded segment
    can change ids already fed; their slots are masked out for good rather than removed, and
    the ids after them get the positions a full forward gives, so the attention of each real
    token covers exactly the row's ids, as in ``_full_logits``. Finished rows leave the cache."""

    def __init__(self, model, rows: list[_Row], pad_id: int):
        import torch

        from agentforge.eval._common import model_device

        self.model, self.rows, self.pad_id, self.device = model, list(rows), pad_id, model_device(model)
        base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a peft model forwards it
        parameters = inspect.signature(base.forward).parameters
        # transformers 5 renamed the forward's and the output's past_key_values to cache
        self.keyword = "cache" if "cache" in parameters else "past_key_values"
        # the last position's logits only: a prefill's full logits are rows x prompt x vocabulary floats
        self.extra = {"logits_to_keep": 1} if "logits_to_keep" in parameters else {}
        self.cache: Any = None
        self.fed: list[list[int]] = [[] for _ in rows]  # per row: the ids its unmasked slots hold, in order
        self.slots: list[list[int]] = [[] for _ in rows]  # per row: the slot of each of those ids
        self.valid = torch.zeros((len(rows), 0), dtype=torch.long)

    def _drop_finished(self) -> None:
        import torch

        keep = [i for i, row in enumerate(self.rows) if not row.finished]
        if len(keep) < len(self.rows):
            index = torch.tensor(keep)
            self.cache.batch_select_indices(index.to(self.device))
            self.valid = self.valid[index]
            self.rows = [self.rows[i] for i in keep]
            self.fed = [self.fed[i] for i in keep]
            self.slots = [self.slots[i] for i in keep]

    def _unfed(self, i: int) -> list[int]:
        """Row ``i``'s ids that its cache lacks, after masking the slots whose ids it no longer has."""
        ids, fed = self.rows[i].ids, self.fed[i]
        if ids[: len(fed)] != fed:
            same = next((k for k, (a, b) in enumerate(zip(fed, ids)) if a != b), min(len(fed), len(ids)))
            self.valid[i, self.slots[i][same:]] = 0
            del fed[same:], self.slots[i][same:]
        return ids[len(fed) :]

    def logits(self):
        """Next-token logits of the unfinished rows, in order."""
        import torch

        self._drop_finished()
        new = [self._unfed(i) for i in range(len(self.rows))]
        width, length = max(map(len, new)), self.valid.shape[1]
        input_ids = torch.full((len(self.rows), width), self.pad_id, dtype=torch.long)
        mask, positions = torch.zeros_like(input_ids), torch.zeros_like(input_ids)
        for i, ids in enumerate(new):
            start = width - len(ids)
            input_ids[i, start:] = torch.tensor(ids)
            mask[i, start:] = 1
            positions[i, start:] = torch.arange(len(self.fed[i]), len(self.fed[i]) + len(ids))
            self.fed[i] += ids
            self.slots[i] += range(length + start, length + width)
        self.valid = torch.cat([self.valid, mask], 1)
        output = self.model(
            input_ids=input_ids.to(self.device),
            attention_mask=self.valid.to(self.device),
            position_ids=positions.to(self.device),
            use_cache=True,
            **{self.keyword: self.cache},
            **self.extra,
        )
        self.cache = getattr(output, self.keyword)
        return output.logits[:, -1].float().cpu()


def _uses_kv_cache(model) -> bool:
    return getattr(getattr(model, "generation_config", None), "use_cache", False) is True


def _pick(logits, temperature: float, generator) -> list[int]:
    """Greedy, or sampled at ``temperature`` > 0 with ``generator``."""
    import torch

    if temperature <= 0:
        return logits.argmax(-1).tolist()
    return torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=generator)[:, 0].tolist()


def _advance(row: _Row, token: int, tokenizer, max_calls: int, isolation: str | None) -> None:
    """Append ``token``; if it closes a call, cut the text after the ']', run the call and append
    its ``[out: ...]`` (as ids the model reads next)."""
    row.ids.append(token)
    row.written.append(True)
    row.new_tokens += 1
    text = row.done_text + tokenizer.decode(row.ids[row.segment_start :], skip_special_tokens=True)
    found = _first_new_call(text, len(row.done_text))
    if found is None:
        return
    end, call = found
    result = (
        run_tool(call, isolation=isolation)
        if len(row.calls) < max_calls
        else ToolResult(f"error: at most {max_calls} tool calls", False)
    )
    row.calls.append((call, result))
    # a token that ran past the ']' is re-encoded without its overhang
    prompt_length = len(row.ids) - len(row.written)
    segment = tokenizer(text[len(row.done_text) : end], add_special_tokens=False)["input_ids"]
    output = tokenizer(format_result(result), add_special_tokens=False)["input_ids"]
    row.ids[row.segment_start :] = segment + output
    row.written[row.segment_start - prompt_length :] = [True] * len(segment) + [False] * len(output)
    row.done_text = text[:end] + format_result(result)
    row.segment_start = len(row.ids)


def _check_generation_arguments(max_new_tokens, max_calls, batch_size, temperature, isolation) -> None:
    for name, value in (("max_new_tokens", max_new_tokens), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"generate_with_tools: {name} must be a positive int, got {value!r}")
    if isinstance(max_calls, bool) or not isinstance(max_calls, int) or max_calls < 0:
        raise ValueError(f"generate_with_tools: max_calls must be an int >= 0, got {max_calls!r}")
    if not temperature >= 0:
        raise ValueError(f"generate_with_tools: temperature must be >= 0 (0: greedy), got {temperature!r}")
    if isolation is not None and isolation not in ISOLATIONS:
        raise ValueError(f"generate_with_tools: isolation must be one of {', '.join(ISOLATIONS)}, got {isolation!r}")


def _eos_and_pad(tokenizer) -> tuple[int, int]:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("generate_with_tools: the tokenizer has no eos token")
    return eos, eos if tokenizer.pad_token_id is None else tokenizer.pad_token_id


def _generate_rows(
    model,
    tokenizer,
    rows: list[_Row],
    *,
    max_new_tokens: int,
    max_calls: int,
    batch_size: int,
    temperature: float,
    seed: int,
    isolation: str | None,
) -> None:
    """Advance every row until eos or ``max_new_tokens`` model tokens, running its calls."""
    import torch

    from agentforge.eval._common import evaluation_mode

    eos, pad = _eos_and_pad(tokenizer)
    generator = torch.Generator().manual_seed(seed)
    with evaluation_mode(model):
        for start in range(0, len(rows), batch_size):
            batch = rows[start : start + batch_size]
            cached = _CachedBatch(model, batch, pad) if _uses_kv_cache(model) else None
            while active := [row for row in batch if not row.finished]:
                logits = cached.logits() if cached else _full_logits(model, active, pad)
                for row, token in zip(active, _pick(logits, temperature, generator)):
                    if token == eos:
                        row.finished = row.ended_by_eos = True
                        continue
                    _advance(row, token, tokenizer, max_calls, isolation)
                    row.finished = row.new_tokens >= max_new_tokens


def generate_with_tools_batch(
    model,
    tokenizer,
    prompts,
    *,
    max_new_tokens: int,
    max_calls: int = 2,
    batch_size: int = 32,
    temperature: float = 0.0,
    seed: int = 0,
    isolation: str | None = None,
) -> list[tuple[str, list]]:
    """``generate_with_tools`` for many prompts at once (left-padded batches; every row runs its
    own calls), greedy or sampled at ``temperature`` (seeded by ``seed``). Returns one
    ``(completion_text, calls)`` per prompt, in order."""
    if isinstance(prompts, str):
        raise TypeError("generate_with_tools_batch: prompts must be a sequence of strings, not one string")
    _check_generation_arguments(max_new_tokens, max_calls, batch_size, temperature, isolation)
    rows = []
    for prompt in prompts:
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError(f"generate_with_tools: prompt {prompt!r} encodes to no tokens")
        rows.append(_Row(ids=list(ids), segment_start=len(ids)))
    _generate_rows(
        model,
        tokenizer,
        rows,
        max_new_tokens=max_new_tokens,
        max_calls=max_calls,
        batch_size=batch_size,
        temperature=temperature,
        seed=seed,
        isolation=isolation,
    )
    return [
        (row.done_text + tokenizer.decode(row.ids[row.segment_start :], skip_special_tokens=True), row.calls)
        for row in rows
    ]


def tool_trajectories(
    model,
    tokenizer,
    contexts: list[list[int]],
    *,
    max_new_tokens: int,
    max_calls: int = 2,
    batch_size: int = 32,
    temperature: float = 1.0,
    seed: int = 0,
    isolation: str | None = None,
) -> list[tuple[list, list]]:
    """Continuations of token-id ``contexts`` with the tool calls executed, as training data:
    per context ``(ids, written)``, the new ids (the model's tokens, each call's ``[out: ...]``
    and the eos that ended it, if one did) and for each whether the model wrote it (False for
    the tool results, which a model trained on the trajectory must not be taught to guess)."""
    _check_generation_arguments(max_new_tokens, max_calls, batch_size, temperature, isolation)
    if not contexts or any(not context for context in contexts):
        raise ValueError("tool_trajectories: contexts must be a non-empty list of non-empty token id lists")
    eos, _ = _eos_and_pad(tokenizer)
    rows = [_Row(ids=list(context), segment_start=len(context)) for context in contexts]
    _generate_rows(
        model,
        tokenizer,
        rows,
        max_new_tokens=max_new_tokens,
        max_calls=max_calls,
        batch_size=batch_size,
        temperature=temperature,
        seed=seed,
        isolation=isolation,
    )
    trajectories = []
    for row, context in zip(rows, contexts):
        ending = [eos] if row.ended_by_eos else []
        trajectories.append((row.ids[len(context) :] + ending, row.written + [True] * len(ending)))
    return trajectories


def generate_with_tools(
    model, tokenizer, prompt: str, *, max_new_tokens: int, max_calls: int = 2, isolation: str | None = None
):
    """Greedy generation from ``prompt`` that executes the tool calls the model writes (calls
    beyond ``max_calls`` get an error result). Returns ``(completion_text, [(ToolCall,
    ToolResult), ...])``."""
    if not isinstance(prompt, str):
        raise TypeError(f"generate_with_tools: prompt must be a string, got {type(prompt).__name__}")
    return generate_with_tools_batch(
        model, tokenizer, [prompt], max_new_tokens=max_new_tokens, max_calls=max_calls, isolation=isolation
    )[0]
