"""The prompt-baking objective (Bhargava et al. 2024, arXiv:2409.13697) and its data.

Baking prompt ``u`` into weights θ′ minimises KL(P_θ(·|u, x) ‖ P_θ′(·|x)): the unprompted model
must predict, token by token, what the prompted original predicts. As in the reference code
(amanb2000/prompt_weight_equivalence) the KL is taken over the full vocabulary, on trajectories
``y`` that the *prompted* model samples itself, at every position of ``y``:

    teacher (prompted, frozen):  [pad][u + "\\n"][x][y]     logits before each y_t, computed once
    student (the model baked):         [pad][x][y]          logits before each y_t, trained

Rows are left-padded, so ``y`` always ends in the last column of both: the last ``len(y)``
predictions of the teacher and of the student line up column for column. A row stores the
teacher's log-probabilities ``[Y, vocab]`` (right-aligned like ``y``; ``Y`` = the longest
continuation) next to the student's ``input_ids``/``attention_mask``/``labels`` (``labels`` =
``y`` in its columns, -100 elsewhere), which is the row format ``agentforge.train.train`` feeds
to :func:`kl_loss`.

A prompt about tool use is baked on trajectories with the calls executed (``tools=True``):
``y`` then holds the runtime's ``[out: ...]`` results too, which stay in the context but carry
no label, so the KL is taken only where the model itself writes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from agentforge.eval._common import evaluation_mode, left_padded, model_device

IGNORE_INDEX = -100
SEPARATOR = "\n"  # between the baked prompt and the input it precedes


def token_kl(teacher_logprobs: torch.Tensor, student_logprobs: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) = Σ_v p(v) (log p(v) − log q(v)) over the last dimension, from log-probabilities
    ``[..., V]`` of the teacher p and the student q; computed in fp32, returns ``[...]``."""
    if teacher_logprobs.shape != student_logprobs.shape:
        raise ValueError(
            f"token_kl: teacher shape {tuple(teacher_logprobs.shape)} differs from student shape "
            f"{tuple(student_logprobs.shape)}"
        )
    return F.kl_div(student_logprobs.float(), teacher_logprobs.float(), log_target=True, reduction="none").sum(-1)


ROWS_PER_CHUNK = 64  # positions per slice of the vocabulary-wide KL: 12.6 MB of float32 at 49,152 tokens


class _LogitsKL(torch.autograd.Function):
    """KL(p ‖ softmax(z)) = Σ_v p_v (t_v − z_v) + logsumexp(z) Σ_v p_v, with ``t = log p``, for
    rows of teacher log-probabilities ``t`` and student logits ``z``. ``F.kl_div`` on
    ``log_softmax(z)`` holds several float32 copies of the vocabulary-wide tensor at once (the
    log-softmax, the float teacher, the elementwise KL, their gradients), the largest part of a
    bake's peak memory; this goes through a slice of positions at a time, keeps only its inputs
    for the backward, and writes one gradient, (Σp) softmax(z) − p, sliced the same way."""

    @staticmethod
    def forward(ctx, teacher: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(teacher, logits)
        out = torch.empty(logits.shape[:-1], dtype=_compute_dtype(logits), device=logits.device)
        for t, z, o in _slices(teacher, logits, out):
            p = t.exp()
            o.copy_((p * (t - z)).sum(-1) + z.logsumexp(-1) * p.sum(-1))
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        teacher, logits = ctx.saved_tensors
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        for t, z, g, gz in _slices(teacher, logits, grad_out, grad):
            p = t.exp()
            gz.copy_(g[:, None] * (z.softmax(-1) * p.sum(-1, keepdim=True) - p))
        return None, grad


def _compute_dtype(logits: torch.Tensor) -> torch.dtype:
    """float32, or float64 for float64 logits (what ``gradcheck`` differentiates)."""
    return torch.promote_types(logits.dtype, torch.float32)


def _slices(teacher: torch.Tensor, logits: torch.Tensor, *outputs: torch.Tensor):
    """``(teacher, logits)`` as float32 (float64) ``[positions, V]`` slices, with the matching
    slices of ``outputs`` (tensors of the logits' shape, or of that shape less its last
    dimension). The logits are sliced as views, never copied whole: they are often a slice of a
    model's output."""
    if logits.dim() < 2:
        yield from _slices(teacher[None], logits[None], *(o[None] for o in outputs))
        return
    columns, vocab = logits.shape[-2:]

    def batched(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1, columns, vocab) if x.dim() == logits.dim() else x.reshape(-1, columns)

    t3, z3, outs = batched(teacher), batched(logits), [batched(o) for o in outputs]
    compute = _compute_dtype(logits)
    for row in range(z3.shape[0]):
        for start in range(0, columns, ROWS_PER_CHUNK):
            cols = slice(start, start + ROWS_PER_CHUNK)
            yield (t3[row, cols].to(compute), z3[row, cols].to(compute), *(o[row, cols] for o in outs))


def logits_kl(teacher_logprobs: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """:func:`token_kl` of the student's *logits* (``[..., V]``, any float dtype; the teacher's
    log-probabilities may be float16), in fp32 (fp64 for fp64 logits), without the
    vocabulary-wide temporaries of ``log_softmax`` and ``F.kl_div`` (see ``_LogitsKL``).
    Differentiable in the logits only."""
    if teacher_logprobs.shape != student_logits.shape:
        raise ValueError(
            f"logits_kl: teacher shape {tuple(teacher_logprobs.shape)} differs from student shape "
            f"{tuple(student_logits.shape)}"
        )
    if teacher_logprobs.requires_grad:
        raise ValueError("logits_kl: the teacher's log-probabilities are a fixed target; detach them")
    return _LogitsKL.apply(teacher_logprobs.detach(), student_logits)


def forward_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Logits of a left-padded batch, with position ids counted from each row's first real token
    (what a row alone would get; Llama-family models do not derive them from the mask)."""
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions).logits


def kl_loss(model, batch: dict[str, torch.Tensor], anchor_weight: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean token KL(teacher ‖ model) over the continuation tokens of a batch of baking rows
    (the ``loss_fn`` of ``agentforge.train.train``; reports the tokens it averaged over).

    Rows that also carry a retention anchor (``anchor_ids``/``anchor_logprobs``, see
    :func:`anchor_rows`) add ``anchor_weight`` × the mean token KL(model before baking ‖ model)
    on that unrelated text, which keeps what the prompt has nothing to do with in place."""
    teacher = batch["teacher_logprobs"]
    span = teacher.shape[1]
    logits = forward_logits(model, batch["input_ids"], batch["attention_mask"])[:, -span - 1 : -1]
    targets = batch["labels"][:, -span:] != IGNORE_INDEX
    kl = logits_kl(teacher[targets], logits[targets]).mean()
    extras = {"kl_tokens": float(targets.sum())}
    if "anchor_ids" not in batch:
        return kl, extras
    anchor_logits = model(input_ids=batch["anchor_ids"]).logits[:, :-1]
    anchor_kl = logits_kl(batch["anchor_logprobs"], anchor_logits).mean()
    return kl + anchor_weight * anchor_kl, {
        **extras,
        "bake_kl": float(kl.detach()),
        "anchor_kl": float(anchor_kl.detach()),
    }


@torch.no_grad()
def anchor_rows(model, texts: Sequence[Sequence[int]], *, batch_size: int) -> list[dict[str, torch.Tensor]]:
    """The retention anchor: ``model``'s next-token log-probabilities at every position of some
    unrelated text rows (equal-length token id lists), taken before baking changes it. They are
    kept in float16: a full-vocabulary row per position is the largest thing a bake holds (32
    rows of 128 tokens over SmolLM2's 49,152 tokens: 0.8 GB in float32), and float16's relative
    rounding of 5e-4 on a log-probability is far below what the anchor's KL measures."""
    if not texts:
        raise ValueError("baking: the retention anchor needs at least one text row")
    ids = torch.tensor([list(t) for t in texts], dtype=torch.long)
    device = model_device(model)
    rows = []
    with evaluation_mode(model):
        for start in range(0, len(ids), batch_size):
            chunk = ids[start : start + batch_size]
            logprobs = model(input_ids=chunk.to(device)).logits[:, :-1].float().log_softmax(-1).half().cpu()
            rows += [{"anchor_ids": row, "anchor_logprobs": lp} for row, lp in zip(chunk, logprobs)]
    return rows


@dataclass
class BakingData:
    """Trajectories of the prompted model on some inputs, as training/evaluation rows.

    ``rows``: one dict of tensors per trajectory (see the module docstring); ``prompt`` the
    prompt that made them; ``continuations`` the sampled token ids (for inspection) and
    ``written`` which of them the model wrote (None: all; False marks tool results)."""

    prompt: str
    rows: list[dict[str, torch.Tensor]]
    continuations: list[list[int]]
    written: list[list[bool]] | None = None

    @property
    def tokens(self) -> int:
        """Continuation tokens the KL is measured on."""
        if self.written is None:
            return sum(len(c) for c in self.continuations)
        return sum(sum(w) for w in self.written)


def encode(tokenizer, prompt: str, inputs: Sequence[str]) -> tuple[list[int], list[list[int]]]:
    """Token ids of ``prompt + SEPARATOR`` and of each input, encoded separately and without
    special tokens, so the unprompted input is exactly the tail of the prompted one."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"baking: the prompt must be a non-empty string, got {prompt!r}")
    if isinstance(inputs, str) or not inputs:
        raise ValueError("baking: inputs must be a non-empty sequence of strings")
    prompt_ids = tokenizer(prompt + SEPARATOR, add_special_tokens=False)["input_ids"]
    input_ids = tokenizer(list(inputs), add_special_tokens=False)["input_ids"]
    empty = [text for text, ids in zip(inputs, input_ids) if not ids]
    if empty:
        raise ValueError(f"baking: input {empty[0]!r} encodes to no tokens")
    return prompt_ids, input_ids


def _special_ids(tokenizer) -> tuple[int, int]:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("baking: the tokenizer has no eos token (trajectories end at eos)")
    return eos, eos if tokenizer.pad_token_id is None else tokenizer.pad_token_id


def _until_eos(tokens: list[int], eos: int) -> list[int]:
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


def sample_continuations(
    model,
    contexts: list[list[int]],
    *,
    eos: int,
    pad: int,
    max_new_tokens: int,
    temperature: float,
    batch_size: int,
    seed: int,
) -> list[list[int]]:
    """One sampled continuation per context (plain ancestral sampling at ``temperature``, no top-k
    or top-p), each cut after its first eos. Seeded, and the caller's RNG stream is untouched."""
    from agentforge.train.checkpoint import preserved_rng

    device = model_device(model)
    out = []
    with evaluation_mode(model), preserved_rng():
        torch.manual_seed(seed)
        for start in range(0, len(contexts), batch_size):
            ids, mask = left_padded(contexts[start : start + batch_size], pad)
            generated = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                do_sample=True,
                temperature=temperature,
                top_k=0,
                top_p=1.0,
                max_new_tokens=max_new_tokens,
                eos_token_id=eos,
                pad_token_id=pad,
            )
            out += [_until_eos(row, eos) for row in generated[:, ids.shape[1] :].tolist()]
    return out


@torch.no_grad()
def teacher_rows(
    model,
    prompt_ids: list[int],
    inputs: list[list[int]],
    continuations: list[list[int]],
    *,
    pad: int,
    batch_size: int,
    written: list[list[bool]] | None = None,
) -> list[dict[str, torch.Tensor]]:
    """Baking rows: the prompted model's log-probabilities before every continuation token, next
    to the unprompted student's left-padded ids, mask and labels (same width for every row).
    ``written``: per continuation token, whether it gets a label (None: every one)."""
    span = max(len(c) for c in continuations)
    student_ids, student_mask = left_padded([x + y for x, y in zip(inputs, continuations)], pad)
    device = model_device(model)
    rows = []
    with evaluation_mode(model):
        for start in range(0, len(inputs), batch_size):
            chunk = range(start, min(start + batch_size, len(inputs)))
            ids, mask = left_padded([prompt_ids + inputs[i] + continuations[i] for i in chunk], pad)
            logprobs = forward_logits(model, ids.to(device), mask.to(device))[:, -span - 1 : -1].float().log_softmax(-1)
            for offset, i in enumerate(chunk):
                labels = torch.full_like(student_ids[i], IGNORE_INDEX)
                target = torch.tensor(continuations[i])
                if written is not None:
                    target[~torch.tensor(written[i], dtype=torch.bool)] = IGNORE_INDEX
                labels[len(labels) - len(continuations[i]) :] = target
                teacher = logprobs[offset].cpu()
                teacher[: span - len(continuations[i])] = 0.0  # columns before this row's continuation
                rows.append(
                    {
                        "input_ids": student_ids[i],
                        "attention_mask": student_mask[i],
                        "labels": labels,
                        "teacher_logprobs": teacher,
                    }
                )
    return rows


def prompted_trajectories(
    model,
    tokenizer,
    prompt: str,
    inputs: Sequence[str],
    *,
    samples_per_input: int = 1,
    max_new_tokens: int = 16,
    temperature: float = 1.0,
    batch_size: int = 32,
    seed: int = 0,
    tools: bool = False,
) -> BakingData:
    """Sample ``samples_per_input`` continuations of ``prompt + SEPARATOR + x`` for every input
    ``x`` from ``model`` and score them with the same prompted model: the data that bakes
    ``prompt`` into (a copy of) ``model``, or measures how far a model is from it. With
    ``tools`` the calls the model writes are executed as it samples (``agentforge.tools``) and
    ``max_new_tokens`` counts only the model's own tokens."""
    for name, value in (
        ("samples_per_input", samples_per_input),
        ("max_new_tokens", max_new_tokens),
        ("batch_size", batch_size),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"baking: {name} must be a positive int, got {value!r}")
    if not temperature > 0:
        raise ValueError(f"baking: temperature must be > 0, got {temperature!r}")
    eos, pad = _special_ids(tokenizer)
    prompt_ids, input_ids = encode(tokenizer, prompt, inputs)
    inputs_repeated = [ids for ids in input_ids for _ in range(samples_per_input)]
    contexts = [prompt_ids + x for x in inputs_repeated]
    written = None
    if tools:
        from agentforge.tools import tool_trajectories

        continuations, written = map(
            list,
            zip(
                *tool_trajectories(
                    model,
                    tokenizer,
                    contexts,
                    max_new_tokens=max_new_tokens,
                    temperature=temperature,
                    batch_size=batch_size,
                    seed=seed,
                )
            ),
        )
    else:
        continuations = sample_continuations(
            model,
            contexts,
            eos=eos,
            pad=pad,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            batch_size=batch_size,
            seed=seed,
        )
    rows = teacher_rows(
        model, prompt_ids, inputs_repeated, continuations, pad=pad, batch_size=batch_size, written=written
    )
    return BakingData(prompt=prompt, rows=rows, continuations=continuations, written=written)


@torch.no_grad()
def measured_kl(model, data: BakingData, *, batch_size: int = 32) -> float:
    """KL(prompted teacher ‖ ``model`` unprompted) in nats per continuation token, averaged over
    every token of ``data`` (token-weighted, independent of the batch size)."""
    sums, tokens = row_kl(model, data, batch_size=batch_size)
    return sum(sums) / sum(tokens)


def row_kl(model, data: BakingData, *, batch_size: int = 32) -> tuple[list[float], list[int]]:
    """Per trajectory: the summed token KL(prompted teacher ‖ ``model`` unprompted) and its number
    of continuation tokens (for a paired interval of the KL two models leave)."""
    sums, tokens = [], []
    device = model_device(model)
    with evaluation_mode(model):
        for start in range(0, len(data.rows), batch_size):
            batch = {
                k: torch.stack([r[k] for r in data.rows[start : start + batch_size]]).to(device) for k in data.rows[0]
            }
            teacher = batch["teacher_logprobs"]
            span = teacher.shape[1]
            logits = forward_logits(model, batch["input_ids"], batch["attention_mask"])[:, -span - 1 : -1]
            targets = batch["labels"][:, -span:] != IGNORE_INDEX
            per_token = logits_kl(teacher, logits)
            sums += torch.where(targets, per_token, 0.0).double().sum(1).tolist()  # padding can hold anything
            tokens += targets.sum(1).tolist()
    return sums, tokens
