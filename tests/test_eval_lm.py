"""agentforge.eval.lm: perplexity against hand-computed values, and the unigram control."""

import math
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset
from transformers import LlamaConfig, LlamaForCausalLM

from agentforge.eval import perplexity, unigram_perplexity

# A bigram model with known probabilities: row i is p(next token | current token i).
BIGRAM_PROBS = torch.tensor([[0.5, 0.25, 0.25], [0.25, 0.25, 0.5], [0.125, 0.75, 0.125]], dtype=torch.float64)


class BigramTable(torch.nn.Module):
    """``logits[b, t] = log p(. | input_ids[b, t])``: every probability it assigns is known."""

    def __init__(self, probs: torch.Tensor):
        super().__init__()
        self.register_buffer("log_probs", probs.log().float())

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.log_probs[input_ids])


pytestmark = pytest.mark.usefixtures("one_thread")


def lm_data(input_ids, labels):
    return Dataset.from_dict({"input_ids": input_ids, "labels": labels})


# Row 1 targets (labels shifted by one): 1|0 p=1/4, 2|1 p=1/2, 0|2 p=1/8; its first label (2) is
# never a target. Row 2: 1|2 p=3/4, the rest -100. Token-weighted: exp(mean of 4 nlls).
HAND_DATA = ([[0, 1, 2, 0], [2, 0, 0, 1]], [[2, 1, 2, 0], [-100, 1, -100, -100]])
HAND_PPL = (1 / (0.25 * 0.5 * 0.125 * 0.75)) ** (1 / 4)  # = (256/3) ** (1/4)
MEAN_OF_ROW_MEANS_PPL = math.exp((math.log(1 / (0.25 * 0.5 * 0.125)) / 3 + math.log(1 / 0.75)) / 2)


@pytest.mark.parametrize("batch_size", [1, 2, 3])
def test_perplexity_is_token_weighted_and_matches_hand_value(batch_size):
    ppl = perplexity(BigramTable(BIGRAM_PROBS), lm_data(*HAND_DATA), batch_size=batch_size)
    assert ppl == pytest.approx(HAND_PPL, rel=1e-6)
    assert ppl != pytest.approx(MEAN_OF_ROW_MEANS_PPL, rel=1e-3)  # the two definitions do differ here


def test_rows_without_targets_change_nothing():
    input_ids, labels = HAND_DATA
    padded = lm_data(input_ids + [[1, 1, 1, 1]], labels + [[0, -100, -100, -100]])  # label 0 is unshifted-only
    assert perplexity(BigramTable(BIGRAM_PROBS), padded, batch_size=2) == pytest.approx(HAND_PPL, rel=1e-6)


def test_perplexity_agrees_with_hf_loss_when_rows_have_equal_targets():
    torch.manual_seed(0)
    model = tiny_llama(vocab_size=16)
    input_ids = torch.randint(16, (4, 10))
    labels = input_ids.clone()
    labels[:, :3] = -100  # same number of targets per row, so HF's mean equals the token mean
    hf_ppl = math.exp(model(input_ids=input_ids, labels=labels).loss.item())
    ppl = perplexity(model, lm_data(input_ids.tolist(), labels.tolist()), batch_size=3)
    assert ppl == pytest.approx(hf_ppl, rel=1e-5)


def test_perplexity_restores_training_mode():
    model = tiny_llama(vocab_size=16)
    model.train()
    perplexity(model, lm_data([[1, 2, 3]], [[1, 2, 3]]))
    assert model.training and all(m.training for m in model.modules())


def test_perplexity_bad_input():
    model = BigramTable(BIGRAM_PROBS)
    with pytest.raises(ValueError, match="no 'labels' column"):
        perplexity(model, Dataset.from_dict({"input_ids": [[0, 1]]}))
    with pytest.raises(TypeError, match="datasets.Dataset"):
        perplexity(model, {"input_ids": [[0, 1]], "labels": [[0, 1]]})
    with pytest.raises(ValueError, match="no target tokens"):
        perplexity(model, lm_data([[0, 1, 2]], [[0, -100, -100]]))
    with pytest.raises(ValueError, match="fixed-length"):
        perplexity(model, lm_data([[0, 1, 2], [0, 1]], [[0, 1, 2], [0, 1]]))
    with pytest.raises(ValueError, match="batch_size"):
        perplexity(model, lm_data(*HAND_DATA), batch_size=0)


def test_unigram_perplexity_hand_value():
    # Train targets 0, 0, 1 (first label is never a target) -> counts [2, 1, 0], N = 3, V = 3:
    # add-one probabilities [3/6, 2/6, 1/6]. Eval targets 2 and 0 -> exp((ln 6 + ln 2) / 2) = sqrt(12).
    train = lm_data([[0, 0, 0, 0]], [[2, 0, 0, 1]])
    held_out = lm_data([[0, 0, 0, 0]], [[-100, 2, 0, -100]])
    assert unigram_perplexity(train, held_out, vocab_size=3) == pytest.approx(math.sqrt(12), rel=1e-9)


def test_unigram_perplexity_bad_input():
    train = lm_data([[0, 0, 0]], [[0, 1, 2]])
    with pytest.raises(ValueError, match=r"outside \[0, 2\)"):
        unigram_perplexity(train, train, vocab_size=2)
    with pytest.raises(ValueError, match="eval_data has no 'labels' column"):
        unigram_perplexity(train, Dataset.from_dict({"input_ids": [[0, 1]]}), vocab_size=3)
    with pytest.raises(ValueError, match="train_data has no target tokens"):
        unigram_perplexity(lm_data([[0, 0]], [[1, -100]]), train, vocab_size=3)


def tiny_llama(vocab_size: int) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    return LlamaForCausalLM(config)


def counting_rows(starts: torch.Tensor, vocab_size: int, length: int) -> Dataset:
    """Rows that count upwards modulo the vocabulary: token t + 1 = token t + 1."""
    rows = (starts[:, None] + torch.arange(length)) % vocab_size
    return lm_data(rows.tolist(), rows.tolist())


def test_trained_model_beats_unigram_control_on_its_pattern():
    torch.manual_seed(0)
    vocab_size, length = 16, 12
    train = counting_rows(torch.randint(vocab_size, (64,)), vocab_size, length)
    held_out = counting_rows(torch.arange(vocab_size), vocab_size, length)
    model = tiny_llama(vocab_size)
    untrained_ppl = perplexity(model, held_out)

    batch = torch.tensor(train["input_ids"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(60):
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    control = unigram_perplexity(train, held_out, vocab_size)
    trained_ppl = perplexity(model, held_out)
    assert control == pytest.approx(vocab_size, rel=0.1)  # counting rows use every token about equally
    assert trained_ppl < 2.0 < control / 4
    assert trained_ppl < untrained_ppl
