"""Quiet-STaR's machinery: the thought attention layout, thoughts computed in parallel equal the
same thoughts run as plain continuations, causality with the memory, Cognate's custom 4D mask and
the memory hooks that leave no trace, the counted compute, REINFORCE's sign, the mixing head, a
training step, generation with and without thoughts, save/load."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from agentforge.artifacts import save_model_dir
from agentforge.data import load_text, train_tokenizer
from agentforge.models import CognateConfig, CognateForCausalLM
from agentforge.quietstar import (
    END,
    START,
    Layout,
    MixingHead,
    ThinkingModel,
    ThoughtSettings,
    add_thought_tokens,
    choose_positions,
    hidden_states,
    plain_steps,
    reinforce_loss,
    row_compute,
    training_compute,
)

pytestmark = pytest.mark.usefixtures("one_thread")
V = 40


def llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=V,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
        )
    ).eval()


def cognate(**overrides):
    torch.manual_seed(0)
    return CognateForCausalLM(CognateConfig.from_preset("micro", vocab_size=V, memory_chunk=4, **overrides)).eval()


def test_layout_mask_and_positions_on_a_small_case():
    layout = Layout(parents=torch.tensor([[1, 3]]), valid=torch.tensor([[True, True]]), steps=2)
    parents, mask, positions = layout.for_steps(2, torch.arange(5)[None])
    # extras in step-major order: (step 0, t=1), (step 0, t=3), (step 1, t=1), (step 1, t=3)
    assert parents.tolist() == [[1, 3, 1, 3]]
    assert positions.tolist() == [[0, 1, 2, 3, 4, 2, 4, 3, 5]]
    #                real 0 1 2 3 4 | extras e0 e1 e2 e3
    expected = [
        [1, 1, 0, 0, 0, 1, 0, 0, 0],  # step 0 of t=1: x0, x1 and itself
        [1, 1, 1, 1, 0, 0, 1, 0, 0],  # step 0 of t=3: x0..x3 and itself
        [1, 1, 0, 0, 0, 1, 0, 1, 0],  # step 1 of t=1: x0, x1, its step 0, itself
        [1, 1, 1, 1, 0, 0, 1, 0, 1],
    ]  # step 1 of t=3
    assert mask[0].int().tolist() == expected
    assert layout.columns(5, 1).tolist() == [7, 8]


def test_choose_positions():
    labels = torch.tensor([[-100, -100, 7, 8, -100, 9], [-100, 5, -100, -100, -100, -100]])
    parents, valid = choose_positions(labels, "answers")
    assert parents.tolist() == [[1, 2, 4], [0, 0, 0]] and valid.tolist() == [[True] * 3, [True, False, False]]
    parents, valid = choose_positions(labels, "all")
    assert parents[0].tolist() == [0, 1, 2, 3, 4] and valid.all()


@pytest.mark.parametrize("make", [llama, lambda: cognate(memory_layers=[])], ids=["llama", "cognate"])
def test_parallel_thoughts_equal_plain_continuations(make):
    model = make()
    x = torch.randint(2, V, (1, 9), generator=torch.Generator().manual_seed(1))
    chains = {2: [11, 12, 13], 6: [14, 15, 16]}
    layout = Layout(torch.tensor([[2, 6]]), torch.tensor([[True, True]]), 3)
    extra_ids = torch.tensor([[chains[2][s] if p == 0 else chains[6][s] for s in range(3) for p in range(2)]])
    hidden = hidden_states(model, torch.cat((x, extra_ids), 1), None, layout.for_steps(3, torch.arange(9)[None]))
    plain = hidden_states(model, x, None)
    torch.testing.assert_close(hidden[:, :9], plain, rtol=1e-5, atol=1e-5)  # real tokens never see thoughts
    for p, t in enumerate((2, 6)):
        alone = hidden_states(model, torch.cat((x[:, : t + 1], torch.tensor([chains[t]])), 1), None)
        for s in range(3):
            torch.testing.assert_close(hidden[0, 9 + 2 * s + p], alone[0, t + 1 + s], rtol=1e-5, atol=1e-5)


def test_thoughts_never_see_the_future_with_the_memory_on():
    model = cognate()
    x = torch.randint(2, V, (1, 16), generator=torch.Generator().manual_seed(2))
    layout = Layout(torch.tensor([[5]]), torch.tensor([[True]]), 2)
    extra = layout.for_steps(2, torch.arange(16)[None])
    ids = torch.cat((x, torch.tensor([[11, 12]])), 1)
    changed = ids.clone()
    changed[0, 6:16] = (changed[0, 6:16] + 3) % V
    a, b = hidden_states(model, ids, None, extra), hidden_states(model, changed, None, extra)
    torch.testing.assert_close(a[:, 16:], b[:, 16:], rtol=0, atol=0)
    assert not torch.equal(a[:, 6:16], b[:, 6:16])


def test_cognate_takes_a_custom_4d_mask_and_the_memory_hooks_go_away():
    model = cognate()
    x = torch.randint(2, V, (2, 12), generator=torch.Generator().manual_seed(4))
    plain = model(x).logits
    causal = torch.tril(torch.ones(12, 12, dtype=torch.bool))[None, None].expand(2, -1, -1, -1)
    torch.testing.assert_close(model(x, attention_mask=causal).logits, plain, rtol=0, atol=0)
    additive = torch.zeros(causal.shape).masked_fill(~causal, torch.finfo(torch.float32).min)
    torch.testing.assert_close(model(x, attention_mask=additive).logits, plain, rtol=0, atol=0)
    layout = Layout(torch.tensor([[3], [7]]), torch.tensor([[True], [True]]), 2)
    hidden_states(
        model,
        torch.cat((x, torch.tensor([[11, 12], [13, 14]])), 1),
        None,
        layout.for_steps(2, torch.arange(12).expand(2, -1)),
    )
    memories = [m for m in model.modules() if m.__class__.__name__ == "NeuralMemory"]
    assert memories and not any(m._forward_hooks or m._forward_pre_hooks for m in memories)
    torch.testing.assert_close(model(x).logits, plain, rtol=0, atol=0)


def test_counted_compute_follows_the_formula():
    settings = ThoughtSettings(n_thoughts=2, thought_length=3, lookahead=2)  # S = 6 extra tokens per position
    labels = torch.full((2, 10), -100)
    labels[0, 4:7] = 5  # positions 3, 4, 5 think
    # n · ((L + 3)·T + (L(L+1)/2 + 3·S)·P) with T = 10
    assert row_compute(labels, settings).tolist() == [2 * (6 * 10 + (6 + 18) * 3), 2 * 6 * 10]
    every = row_compute(labels, ThoughtSettings(n_thoughts=2, thought_length=3, lookahead=2, positions="all"))
    assert every.tolist() == [2 * (6 * 10 + 24 * 9)] * 2
    # two steps of two rows from a schedule over these two rows: every row twice
    assert training_compute(labels, 2, 2, 0, settings) == 2 * int(row_compute(labels, settings).sum())
    assert plain_steps(3 * 4 * 10 * 7 + 1, 4, 10) == 7 and plain_steps(1, 4, 10) == 1


def test_reinforce_raises_the_probability_of_the_helpful_thought():
    # one position, two thoughts: thought 0 (token 3) made the true tokens likelier than thought 1 (token 7)
    logits = torch.zeros(2, 1, 10, requires_grad=True)
    tokens = torch.tensor([[3], [7]])
    logprob = torch.log_softmax(logits, -1).gather(-1, tokens[..., None]).squeeze(-1)
    reward = torch.tensor([[-1.0], [-3.0]])
    loss, advantage = reinforce_loss(reward, logprob, torch.ones(2, 1, dtype=torch.bool), n=2)
    assert advantage.tolist() == [[1.0], [-1.0]]
    loss.backward()
    assert logits.grad[0, 0, 3] < 0 and logits.grad[1, 0, 7] > 0  # descent raises token 3, lowers token 7
    clamped, advantage = reinforce_loss(reward, logprob.detach(), torch.ones(2, 1, dtype=torch.bool), 2, True)
    assert advantage.tolist() == [[1.0], [0.0]]


def test_mixing_weight_stays_in_the_open_unit_interval():
    head = MixingHead(8, 16)
    h = torch.randn(5, 8) * torch.tensor([1e-3, 1.0, 1e3, 1e6, -1e6])[:, None]
    w = head(h, -h)
    assert ((w >= 0) & (w <= 1)).all() and 0.05 < head(torch.zeros(1, 8), torch.zeros(1, 8)).item() < 0.2


@pytest.mark.parametrize("init", [0.01, 0.5, 0.9])
def test_mixing_head_starts_at_its_initial_weight(init):
    head = MixingHead(8, 16, init)
    torch.nn.init.zeros_(head.net[2].weight)  # the bias alone sets the start
    assert head(torch.randn(3, 8), torch.randn(3, 8)).tolist() == pytest.approx([init] * 3, abs=1e-6)
    with pytest.raises(ValueError, match="mixing_init"):
        ThoughtSettings(mixing_init=1.0)


@pytest.fixture(scope="module")
def thinker(tmp_path_factory):
    tokenizer = train_tokenizer(load_text("stdlib", max_docs=10), 300)
    torch.manual_seed(0)
    base = CognateForCausalLM(
        CognateConfig.from_preset(
            "micro",
            vocab_size=len(tokenizer),
            memory_chunk=4,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    tokens = add_thought_tokens(base, tokenizer)
    return ThinkingModel(base, ThoughtSettings(n_thoughts=2, thought_length=3, lookahead=2), tokens), tokenizer


def test_thought_tokens_are_added_and_initialised(thinker):
    model, tokenizer = thinker
    start, end = tokenizer.convert_tokens_to_ids([START, END])
    embedding = model.base.get_input_embeddings().weight
    assert embedding.shape[0] == len(tokenizer) and torch.equal(embedding[start], embedding[end])
    dashes = tokenizer("---", add_special_tokens=False)["input_ids"]
    torch.testing.assert_close(embedding[start], embedding[dashes].mean(0))


def test_a_training_step_reaches_every_part(thinker):
    model, tokenizer = thinker
    model.train()
    ids = torch.randint(2, 200, (2, 12), generator=torch.Generator().manual_seed(3))
    labels = torch.full_like(ids, -100)
    labels[:, 5:8] = ids[:, 5:8]
    out = model(ids, labels)
    assert torch.isfinite(out.loss) and set(out.metrics) >= {"mixed_nll", "base_nll", "policy_loss", "mixing_weight"}
    out.loss.backward()
    assert model.mixing_head.net[0].weight.grad.abs().sum() > 0
    assert model.base.model.prelude[0].attn.q_proj.weight.grad.abs().sum() > 0
    model.zero_grad()


def test_generation_with_and_without_thoughts(thinker):
    model, tokenizer = thinker
    ids = torch.tensor([tokenizer("3+4=", add_special_tokens=False)["input_ids"]] * 2)
    eos = tokenizer.eos_token_id
    plain = model.generate(ids, max_new_tokens=4, eos_token_id=eos, think=False)
    reference = model.base.generate(
        ids, max_new_tokens=4, do_sample=False, eos_token_id=eos, pad_token_id=eos, suppress_tokens=list(model.tokens)
    )
    assert torch.equal(plain, reference[:, ids.shape[1] : ids.shape[1] + plain.shape[1]])
    new, thoughts = model.generate(ids, max_new_tokens=3, eos_token_id=eos, return_thoughts=True)
    assert new.shape[0] == 2 and all(t.shape == (2, 3) for t in thoughts)
    assert not any(((t == model.tokens.start_id) | (t == model.tokens.end_id)).any() for t in thoughts)


def test_save_and_load_round_trip(thinker, tmp_path):
    model, tokenizer = thinker
    model.eval()
    save_model_dir(model.base, tokenizer, tmp_path / "m", {"phase": "quietstar"}, write_extra=model.save_extras)
    loaded, loaded_tokenizer = ThinkingModel.load(tmp_path / "m")
    assert loaded_tokenizer.convert_tokens_to_ids([START, END]) == list(model.tokens)
    ids = torch.tensor([loaded_tokenizer("12+7=", add_special_tokens=False)["input_ids"]])
    a, _ = model.next_token_logits(ids, greedy_thoughts=True)
    b, _ = loaded.next_token_logits(ids, greedy_thoughts=True)
    torch.testing.assert_close(a, b)
