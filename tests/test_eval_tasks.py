"""agentforge.eval.tasks: greedy batched generation and task accuracy.

Two models: a hand-built "copy" model (a Llama with no layers whose next token is a fixed
function of the current one, so every answer is known) and a 2-layer Llama trained for a few
seconds on ``prompt + answer + eos`` (attention, so left padding and the mask matter).
"""

import json
from dataclasses import dataclass

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from agentforge.eval import TaskReport, generate_answers, task_accuracy

LOWER, UPPER = list("abcdefghij"), list("ABCDEFGHIJ")
WORDS = ["<pad>", "<eos>", "<unk>", "up", "next", "="] + LOWER + UPPER
PAD, EOS = 0, 1
ID = {word: index for index, word in enumerate(WORDS)}


pytestmark = pytest.mark.usefixtures("one_thread")


@dataclass
class Item:
    family: str
    prompt: str
    answer: str


def make_tokenizer(eos_token="<eos>") -> PreTrainedTokenizerFast:
    """Word-level: one token per space-separated word (decoding joins tokens with spaces)."""
    tokenizer = Tokenizer(models.WordLevel(ID, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token=eos_token, pad_token="<pad>", unk_token="<unk>"
    )


def llama(num_hidden_layers: int, hidden_size: int = 32) -> LlamaForCausalLM:
    # No eos in the model's own config: only generate_answers' eos handling can stop it.
    config = LlamaConfig(
        vocab_size=len(WORDS),
        hidden_size=hidden_size,
        intermediate_size=64,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    return LlamaForCausalLM(config)


def copy_model() -> LlamaForCausalLM:
    """Next token = NEXT[current token]: lower-case x -> upper-case X -> eos -> "a" -> "A" -> eos ...
    With no layers the logits depend on the current token only (one-hot embedding, RMSNorm,
    permutation head), so the model is exact and deterministic; after an eos it would go on
    to "a A", which therefore shows up in any answer not cut at eos."""
    model = llama(num_hidden_layers=0)
    next_token = torch.arange(len(WORDS))
    for lower, upper in zip(LOWER, UPPER):
        next_token[ID[lower]], next_token[ID[upper]] = ID[upper], EOS
    next_token[EOS] = ID["a"]
    with torch.no_grad():
        model.model.embed_tokens.weight.zero_()
        model.model.embed_tokens.weight[:, : len(WORDS)] = torch.eye(len(WORDS))
        model.lm_head.weight.zero_()
        model.lm_head.weight[next_token, torch.arange(len(WORDS))] = 10.0
    return model


def copy_items() -> list[Item]:
    return [Item("up", f"up {lower}", upper) for lower, upper in zip(LOWER, UPPER)]


def test_copy_model_answers_only_new_tokens_and_stops_at_eos():
    tokenizer = make_tokenizer()
    prompts = ["up c", "d", "up up d e"]
    assert generate_answers(copy_model(), tokenizer, prompts, max_new_tokens=8) == ["C", "D", "E"]


class IgnoresEos(torch.nn.Module):
    """A model whose generate does not stop at eos (as a custom generate loop might not)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def generate(self, *, eos_token_id, **kwargs):
        return self.inner.generate(**kwargs)


def test_answer_is_cut_at_first_eos_even_if_generation_goes_on():
    answers = generate_answers(IgnoresEos(copy_model()), make_tokenizer(), ["up c", "b"], max_new_tokens=6)
    assert answers == ["C", "B"]


def test_answers_without_eos_run_to_max_new_tokens():
    # "<unk>" as eos: the copy model never emits it, so generation runs the full length and
    # "<eos>" is an ordinary word here.
    answers = generate_answers(copy_model(), make_tokenizer(eos_token="<unk>"), ["up c"], max_new_tokens=5)
    assert answers == ["C <eos> a A <eos>"]


def test_task_accuracy_per_family_and_examples():
    items = copy_items()[:4] + [Item("wrong", "up a", "B"), Item("wrong", "up b", "b")]
    report = task_accuracy(copy_model(), make_tokenizer(), items, n_examples=5)
    assert isinstance(report, TaskReport)
    assert report.n == 6
    assert report.accuracy == pytest.approx(4 / 6)
    assert report.per_family == {"up": 1.0, "wrong": 0.0}
    assert len(report.examples) == 5
    assert report.examples[0] == {"family": "up", "prompt": "up a", "answer": "A", "prediction": "A", "score": 1.0}
    assert json.loads(json.dumps(report.to_dict())) == report.to_dict()


def test_task_accuracy_custom_score():
    items = [Item("lower", f"up {lower}", lower) for lower in LOWER[:3]]
    model, tokenizer = copy_model(), make_tokenizer()
    assert task_accuracy(model, tokenizer, items).accuracy == 0.0
    case_blind = task_accuracy(
        model, tokenizer, items, score=lambda item, prediction: prediction.lower() == item.answer
    )
    assert case_blind.accuracy == 1.0 and case_blind.per_family == {"lower": 1.0}
    partial = task_accuracy(model, tokenizer, items, score=lambda item, prediction: 0.25)
    assert partial.accuracy == pytest.approx(0.25)
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        task_accuracy(model, tokenizer, items, score=lambda item, prediction: 2.0)


def test_bad_input():
    model, tokenizer = copy_model(), make_tokenizer()
    with pytest.raises(ValueError, match="no items"):
        task_accuracy(model, tokenizer, [])
    assert generate_answers(model, tokenizer, []) == []
    with pytest.raises(TypeError, match="not one string"):
        generate_answers(model, tokenizer, "up a")
    with pytest.raises(ValueError, match="encodes to no tokens"):
        generate_answers(model, tokenizer, ["up a", "   "])
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_answers(model, tokenizer, ["up a"], max_new_tokens=0)
    no_eos = make_tokenizer()
    no_eos.eos_token = None
    with pytest.raises(ValueError, match="no eos_token"):
        generate_answers(model, no_eos, ["up a"])


# --- a trained model ---------------------------------------------------------------------------


def task_items() -> list[Item]:
    """Two families with prompts of different lengths, so batches need padding."""
    up = [Item("up", f"up {lower} =", upper) for lower, upper in zip(LOWER, UPPER)]
    successor = [Item("next", f"{lower} next =", LOWER[(i + 1) % 10]) for i, lower in enumerate(LOWER)]
    long_up = [Item("up", f"up up {lower} =", upper) for lower, upper in zip(LOWER, UPPER)]
    return up + successor + long_up


def training_batch(tokenizer, items) -> tuple[torch.Tensor, torch.Tensor]:
    """``prompt + answer + eos``, prompt and answer encoded separately without special tokens,
    padded on the right; loss on the answer and eos only."""
    rows, targets = [], []
    for item in items:
        prompt = tokenizer(item.prompt, add_special_tokens=False)["input_ids"]
        answer = tokenizer(item.answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append(prompt + answer)
        targets.append([-100] * len(prompt) + answer)
    width = max(map(len, rows))
    input_ids = torch.tensor([row + [PAD] * (width - len(row)) for row in rows])
    labels = torch.tensor([row + [-100] * (width - len(row)) for row in targets])
    return input_ids, labels


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    tokenizer, model = make_tokenizer(), llama(num_hidden_layers=2)
    input_ids, labels = training_batch(tokenizer, task_items())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(60):
        loss = model(input_ids=input_ids, attention_mask=(input_ids != PAD).long(), labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model, tokenizer


def test_trained_model_is_accurate_and_untrained_is_not(trained):
    model, tokenizer = trained
    report = task_accuracy(model, tokenizer, task_items())
    assert report.accuracy >= 0.9, report.examples
    assert set(report.per_family) == {"up", "next"}
    torch.manual_seed(1)
    assert task_accuracy(llama(num_hidden_layers=2), tokenizer, task_items()).accuracy <= 0.1


@pytest.mark.parametrize("which", ["trained", "untrained"])
def test_batched_answers_equal_one_at_a_time(trained, which):
    torch.manual_seed(2)
    model, tokenizer = trained if which == "trained" else (llama(num_hidden_layers=2), make_tokenizer())
    # Prompt lengths 1 to 6, so most rows of a batch are left-padded.
    prompts = [item.prompt for item in task_items()] + ["a", "up", "b b b b b b", "= = j", "next next a b"]
    one_at_a_time = generate_answers(model, tokenizer, prompts, max_new_tokens=6, batch_size=1)
    assert generate_answers(model, tokenizer, prompts, max_new_tokens=6, batch_size=7) == one_at_a_time
    assert generate_answers(model, tokenizer, prompts, max_new_tokens=6, batch_size=64) == one_at_a_time
    assert len(set(one_at_a_time)) > 3  # the answers do depend on the prompt
