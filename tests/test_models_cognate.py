"""Cognate: strict causality with memory, recursion and ACT on; padding invariance; ACT
semantics; the neural memory carrying information past the attention window; HF round trips;
presets."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from agentforge.models import CognateConfig, CognateForCausalLM

MICRO = dict(
    vocab_size=61,
    hidden_size=32,
    num_heads=4,
    intermediate_size=48,
    num_prelude_layers=2,
    num_core_layers=1,
    window=8,
    max_position_embeddings=64,
    memory_dim=16,
    memory_hidden=24,
    memory_chunk=4,
    max_recursion=3,
    eos_token_id=0,
    pad_token_id=1,
)


def micro_model(**overrides) -> CognateForCausalLM:
    torch.manual_seed(0)
    model = CognateForCausalLM(CognateConfig(**{**MICRO, **overrides}))
    # Random halting weights, so tokens halt after different numbers of passes and the
    # frozen-state path of ACT is exercised (the default init halts nobody early).
    with torch.no_grad():
        model.model.halt_head.weight.normal_(0, 1.5)
        model.model.halt_head.bias.fill_(0.5)
    return model


def tokens(B=2, T=21, seed=1):
    return torch.randint(2, MICRO["vocab_size"], (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("t", [0, 5, 12, 20])
def test_strictly_causal(mode, t):
    model = micro_model()
    getattr(model, mode)()
    x = tokens()
    steps = model(x).mean_steps
    assert 1 < float(steps) < MICRO["max_recursion"]  # some tokens halt early, some do not
    changed = x.clone()
    changed[:, t] = (changed[:, t] + 7) % MICRO["vocab_size"]
    a, b = model(x).logits, model(changed).logits
    torch.testing.assert_close(a[:, :t], b[:, :t], rtol=0, atol=0)
    assert not torch.equal(a[:, t:], b[:, t:])


def test_memory_carries_information_past_the_attention_window():
    # window 2: position 17 cannot attend to position 1, so only the memory (or nothing) links them.
    x = tokens(B=1, T=18)
    changed = x.clone()
    changed[0, 1] = (changed[0, 1] + 5) % MICRO["vocab_size"]
    with_memory = micro_model(window=2, num_core_layers=1, max_recursion=1)
    assert not torch.equal(with_memory(x).logits[0, 17], with_memory(changed).logits[0, 17])
    without_memory = micro_model(window=2, max_recursion=1, memory_layers=[])
    # two prelude blocks + one core pass of window 2 reach back 3 tokens at most
    torch.testing.assert_close(without_memory(x).logits[0, 17], without_memory(changed).logits[0, 17], rtol=0, atol=0)


def test_left_padded_batch_equals_each_row_alone():
    model = micro_model().eval()
    rows = [tokens(1, 9, seed=2)[0], tokens(1, 14, seed=3)[0]]
    T = max(len(r) for r in rows)
    ids = torch.stack([torch.cat([torch.full((T - len(r),), 1), r]) for r in rows])
    mask = torch.stack([torch.cat([torch.zeros(T - len(r)), torch.ones(len(r))]) for r in rows]).long()
    batched = model(ids, attention_mask=mask).logits
    for i, r in enumerate(rows):
        torch.testing.assert_close(batched[i, T - len(r) :], model(r[None]).logits[0], rtol=1e-5, atol=1e-5)


def test_right_padding_is_refused():
    model = micro_model()
    with pytest.raises(ValueError, match="left padding"):
        model(tokens(1, 6), attention_mask=torch.tensor([[1, 1, 1, 0, 0, 0]]))


def test_act_weights_and_ponder_cost():
    model = micro_model()
    out = model(tokens(), labels=tokens())
    steps, ponder = float(out.mean_steps), float(out.ponder_cost)
    assert 1 <= steps <= MICRO["max_recursion"] and steps < ponder <= steps + 1  # ρ = N + R, 0 < R <= 1
    out.loss.backward()
    assert model.model.halt_head.bias.grad.abs() > 0  # the ponder cost reaches the halting head
    for p in model.model.prelude[0].memory.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0  # every memory parameter learns through the writes


def test_inference_stops_once_every_token_halted():
    model = micro_model().eval()
    with torch.no_grad():
        model.model.halt_head.weight.zero_()
        model.model.halt_head.bias.fill_(10.0)  # p ≈ 1: every token halts after one pass
    out = model(tokens())
    assert float(out.mean_steps) == 1.0 and float(out.ponder_cost) == pytest.approx(2.0, abs=1e-3)


def test_save_and_reload_round_trip(tmp_path):
    model = micro_model().eval()
    model.save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).model_type == "cognate"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(loaded, CognateForCausalLM)
    x = tokens()
    torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=0, atol=0)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()  # still tied


def test_generate_is_greedy_argmax_without_cache():
    model = micro_model().eval()
    prompt = tokens(1, 7)
    out = model.generate(prompt, max_new_tokens=6, do_sample=False, min_new_tokens=6)
    seq = prompt
    for _ in range(6):
        seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)


def test_batched_generation_with_left_padding_matches_single():
    model = micro_model().eval()
    short, long_ = tokens(1, 5, seed=4)[0], tokens(1, 9, seed=5)[0]
    ids = torch.stack([torch.cat([torch.ones(4, dtype=torch.long), short]), long_])
    mask = (ids != 1).long()
    mask[1] = 1
    out = model.generate(ids, attention_mask=mask, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=1)
    alone = model.generate(short[None], max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert torch.equal(out[0, -4:], alone[0, -4:])


def test_presets_parameter_counts():
    counts = {
        name: sum(p.numel() for p in CognateForCausalLM(CognateConfig.from_preset(name)).parameters())
        for name in ("tiny", "small")
    }
    print(f"\nCognate parameters: {counts}")
    assert 1_000_000 <= counts["tiny"] <= 3_000_000
    assert abs(counts["small"] - 25_000_000) <= 2_500_000


def test_small_preset_trains_a_few_steps_on_cpu():
    torch.manual_seed(0)
    model = CognateForCausalLM(CognateConfig.from_preset("small", max_position_embeddings=64))
    x = torch.randint(0, model.config.vocab_size, (2, 32))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(3):
        loss = model(x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
    assert losses[-1] < losses[0]


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(hidden_size=30), "heads of even size"),
        (dict(memory_layers=[5]), "not prelude blocks"),
        (dict(max_recursion=0), "max_recursion must be a positive integer"),
        (dict(halt_epsilon=1.5), "halt_epsilon"),
    ],
)
def test_bad_config_is_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        CognateConfig(**{**MICRO, **bad})


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        CognateConfig.from_preset("huge")


def test_import_agentforge_registers_cognate_lazily():
    import subprocess
    import sys

    code = (
        "import sys, agentforge; lazy = 'transformers' not in sys.modules; "
        "from transformers import AutoConfig; print(lazy, AutoConfig.for_model('cognate').model_type)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["True", "cognate"], out
