"""MuGrokfast: parameter split, the Grokfast filter by hand, exact reduction to torch's Muon + AdamW,
a schedule the inner optimizers really use, bit-identical resume, and learning on a tiny Llama."""

import copy
import io

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from agentforge.optim import MuGrokfast, Muon, split_parameters

HIDDEN_MATRICES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_llama(tie_word_embeddings: bool = False) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tie_word_embeddings,
    )
    return LlamaForCausalLM(config)


def arguments(**changes):
    base = dict(
        muon_lr=0.02,
        adamw_lr=3e-3,
        weight_decay=0.1,
        adamw_betas=(0.9, 0.95),
        momentum=0.95,
        grokfast_alpha=0.98,
        grokfast_lambda=0.2,
        warmup_steps=0,
        total_steps=100,
        min_lr_ratio=1.0,
    )
    base.update(changes)
    return base


def train_step(model, optimizer, batch):
    loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return loss.item()


def batches(count, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 64, (4, 12), generator=generator) for _ in range(count)]


# --- parameter split ------------------------------------------------------------------------


@pytest.mark.parametrize("tied", [True, False])
def test_llama_split(tied):
    model = tiny_llama(tie_word_embeddings=tied)
    muon, adamw = split_parameters(model)
    muon_names, adamw_names = [n for n, _ in muon], [n for n, _ in adamw]
    assert all(n.split(".")[-2] in HIDDEN_MATRICES for n in muon_names) and len(muon_names) == 2 * 7
    expected_adamw = {"model.embed_tokens.weight", "model.norm.weight"} | {
        f"model.layers.{i}.{norm}.weight" for i in range(2) for norm in ("input_layernorm", "post_attention_layernorm")
    }
    if not tied:
        expected_adamw.add("lm_head.weight")
    assert set(adamw_names) == expected_adamw
    # Every trainable parameter exactly once (a tied embedding/head weight is one parameter).
    split_ids = [id(p) for _, p in muon + adamw]
    assert len(split_ids) == len(set(split_ids))
    assert set(split_ids) == {id(p) for p in model.parameters()}
    if tied:
        assert any(p is model.lm_head.weight for _, p in adamw)


def test_plain_module_split_and_frozen_parameters():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 4), nn.LayerNorm(4), nn.Conv2d(1, 2, 3), nn.Linear(4, 4))
    model[4].requires_grad_(False)
    muon, adamw = split_parameters(model)
    assert [n for n, _ in muon] == ["1.weight"]
    assert [n for n, _ in adamw] == ["0.weight", "1.bias", "2.weight", "2.bias", "3.weight", "3.bias"]


# --- Grokfast ---------------------------------------------------------------------------------


def test_grokfast_filter_by_hand():
    # alpha 0.5, lambda 0.25; binary fractions, so every value below is exact in float32.
    # ema_1 = g_1 (the reference code starts the EMA at the first gradient), then
    # ema = 0.5*ema + 0.5*g and the filtered gradient is g + 0.25*ema (the slow part amplified).
    layer = nn.Linear(2, 2)  # weight -> Muon, bias -> AdamW
    optimizer = MuGrokfast(
        layer, **arguments(grokfast_alpha=0.5, grokfast_lambda=0.25, momentum=0.5, adamw_betas=(0.5, 0.5))
    )
    gradients = [[2.0, -4.0], [4.0, 0.0], [-2.0, 8.0]]
    emas = [[2.0, -4.0], [3.0, -2.0], [0.5, 3.0]]
    filtered = [[2.5, -5.0], [4.75, -0.5], [-1.875, 8.75]]
    for gradient, ema, expected in zip(gradients, emas, filtered):
        g = torch.tensor(gradient)
        layer.weight.grad, layer.bias.grad = torch.stack([g, -g]), g.clone()
        optimizer.step()
        assert torch.equal(layer.bias.grad, torch.tensor(expected))
        assert torch.equal(layer.weight.grad, torch.stack([torch.tensor(expected), -torch.tensor(expected)]))
        saved = optimizer.state_dict()["grokfast_ema"]
        assert torch.equal(saved[1], torch.tensor(ema))  # index 1: the bias, after Muon's weight
    # The inner optimizers consumed the filtered gradient: after step 1 both momenta held 0.5 * 2.5.
    one_step = MuGrokfast(
        layer, **arguments(grokfast_alpha=0.5, grokfast_lambda=0.25, momentum=0.5, adamw_betas=(0.5, 0.5))
    )
    layer.weight.grad, layer.bias.grad = torch.tensor([[2.0, -4.0], [-2.0, 4.0]]), torch.tensor([2.0, -4.0])
    one_step.step()
    assert torch.equal(
        one_step.inner["muon"].state[layer.weight]["momentum_buffer"], torch.tensor([[1.25, -2.5], [-1.25, 2.5]])
    )
    assert torch.equal(one_step.inner["adamw"].state[layer.bias]["exp_avg"], torch.tensor([1.25, -2.5]))


def reference_optimizers(model, settings):
    """Muon (torch's update, tested against torch in test_optim_muon.py) + torch's AdamW on the
    split spelled out by name (independent of split_parameters)."""
    named = list(model.named_parameters())
    is_embedding = lambda name: "embed_tokens" in name or "lm_head" in name
    muon = [p for n, p in named if p.ndim == 2 and not is_embedding(n)]
    decayed = [p for n, p in named if p.ndim == 2 and is_embedding(n)]
    not_decayed = [p for n, p in named if p.ndim == 1]
    return [
        Muon(
            muon,
            lr=settings["muon_lr"],
            weight_decay=settings["weight_decay"],
            momentum=settings["momentum"],
            adjust_lr_fn="original",
        ),
        torch.optim.AdamW(
            [{"params": decayed}, {"params": not_decayed, "weight_decay": 0.0}],
            lr=settings["adamw_lr"],
            betas=settings["adamw_betas"],
            weight_decay=settings["weight_decay"],
        ),
    ]


def test_lambda_zero_is_exactly_muon_plus_adamw():
    settings = arguments(grokfast_lambda=0.0)
    model = tiny_llama()
    reference_model = copy.deepcopy(model)
    optimizer = MuGrokfast(model, **settings)
    references = reference_optimizers(reference_model, settings)
    for batch in batches(4):
        train_step(model, optimizer, batch)
        reference_model(input_ids=batch, labels=batch).loss.backward()
        for reference in references:
            reference.step()
            reference.zero_grad()
    for (name, param), reference_param in zip(model.named_parameters(), reference_model.parameters()):
        assert torch.equal(param, reference_param), name
    assert not optimizer.state  # the filter is off: no EMA memory spent


def test_positive_lambda_changes_the_trajectory():
    plain, filtered = tiny_llama(), tiny_llama()
    filtered.load_state_dict(plain.state_dict())
    plain_optimizer = MuGrokfast(plain, **arguments(grokfast_lambda=0.0))
    filtered_optimizer = MuGrokfast(filtered, **arguments(grokfast_lambda=2.0))
    for batch in batches(3):
        train_step(plain, plain_optimizer, batch)
        train_step(filtered, filtered_optimizer, batch)
    assert not torch.equal(plain.model.layers[0].mlp.up_proj.weight, filtered.model.layers[0].mlp.up_proj.weight)
    assert not torch.equal(plain.model.norm.weight, filtered.model.norm.weight)


# --- schedule -----------------------------------------------------------------------------------

# warmup 4, total 12, floor 0.25: factor of update k.
HAND_FACTORS = {1: 0.25, 2: 0.5, 4: 1.0, 8: 0.625, 12: 0.25, 20: 0.25}


def test_inner_optimizers_hold_the_scheduled_lr():
    model = tiny_llama()
    optimizer = MuGrokfast(
        model, **arguments(muon_lr=0.02, adamw_lr=0.004, warmup_steps=4, total_steps=12, min_lr_ratio=0.25)
    )
    for _ in range(20):
        next_update = optimizer.steps_done + 1
        if next_update in HAND_FACTORS:
            factor = HAND_FACTORS[next_update]
            muon_lr = optimizer.inner["muon"].param_groups[0]["lr"]
            adamw_lrs = [group["lr"] for group in optimizer.inner["adamw"].param_groups]
            assert muon_lr == pytest.approx(0.02 * factor, rel=1e-12)
            assert adamw_lrs == pytest.approx([0.004 * factor] * 2, rel=1e-12)
            assert optimizer.current_lr() == {"muon": muon_lr, "adamw": adamw_lrs[0], "adamw_no_decay": adamw_lrs[1]}
        optimizer.step()  # no gradients: only the schedule moves


def test_update_size_follows_the_schedule():
    # A constant gradient makes AdamW's step exactly lr * sign(g) (bias-corrected moments) and
    # Muon's step lr times a fixed orthogonal matrix, so each update's size divided by its lr is constant.
    layer = nn.Linear(8, 8)
    optimizer = MuGrokfast(
        layer, **arguments(weight_decay=0.0, grokfast_lambda=0.0, warmup_steps=4, total_steps=12, min_lr_ratio=0.25)
    )
    weight_gradient, bias_gradient = torch.randn(8, 8), torch.randn(8)
    muon_ratios = []
    for _ in range(14):
        lrs = optimizer.current_lr()
        weight_before, bias_before = layer.weight.detach().clone(), layer.bias.detach().clone()
        layer.weight.grad, layer.bias.grad = weight_gradient.clone(), bias_gradient.clone()
        optimizer.step()
        bias_step = layer.bias.detach() - bias_before
        torch.testing.assert_close(bias_step, -lrs["adamw_no_decay"] * bias_gradient.sign(), rtol=1e-5, atol=0)
        muon_ratios.append((layer.weight.detach() - weight_before).norm().item() / lrs["muon"])
    # bf16 Newton-Schulz rounds a little differently as the momentum scale changes.
    assert muon_ratios == pytest.approx([muon_ratios[0]] * len(muon_ratios), rel=0.02)


def test_a_foreign_lr_change_is_an_error():
    optimizer = MuGrokfast(nn.Linear(4, 4), **arguments())
    torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5)
    with pytest.raises(RuntimeError, match="lr was changed .* outside MuGrokfast"):
        optimizer.step()


# --- checkpointing ------------------------------------------------------------------------------


def test_save_load_resumes_bit_identically():
    settings = arguments(grokfast_lambda=0.3, weight_decay=0.05, warmup_steps=3, total_steps=10, min_lr_ratio=0.1)
    data = batches(8)
    model = tiny_llama()
    start = copy.deepcopy(model.state_dict())
    optimizer = MuGrokfast(model, **settings)
    for batch in data:
        train_step(model, optimizer, batch)

    first = tiny_llama()
    first.load_state_dict(start)
    first_optimizer = MuGrokfast(first, **settings)
    for batch in data[:4]:
        train_step(first, first_optimizer, batch)
    model_file, optimizer_file = io.BytesIO(), io.BytesIO()
    torch.save(first.state_dict(), model_file)
    torch.save(first_optimizer.state_dict(), optimizer_file)
    model_file.seek(0), optimizer_file.seek(0)

    resumed = tiny_llama()
    resumed.load_state_dict(torch.load(model_file, weights_only=True))
    # Built with other settings on purpose: a checkpoint's hyperparameters win, as in torch.
    resumed_optimizer = MuGrokfast(resumed, **arguments(grokfast_lambda=0.0, total_steps=99))
    resumed_optimizer.load_state_dict(torch.load(optimizer_file, weights_only=True))
    assert resumed_optimizer.steps_done == 4 and resumed_optimizer.defaults == first_optimizer.defaults
    for batch in data[4:]:
        train_step(resumed, resumed_optimizer, batch)

    for (name, param), resumed_param in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(param, resumed_param), name
    assert resumed_optimizer.current_lr() == optimizer.current_lr()
    assert_equal_nested(resumed_optimizer.state_dict(), optimizer.state_dict())


def assert_equal_nested(a, b):
    if torch.is_tensor(a):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_equal_nested(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_equal_nested(x, y)
    else:
        assert a == b


def test_loading_another_models_state_is_refused():
    model = tiny_llama()
    optimizer = MuGrokfast(model, **arguments())
    train_step(model, optimizer, batches(1)[0])
    state = optimizer.state_dict()

    def llama_shaped(first_rows: int) -> nn.Module:
        """tiny_llama's group sizes (2 embeddings, 14 matrices, 5 gains), first matrix resizable."""
        matrices = [nn.Linear(32, first_rows, bias=False)] + [nn.Linear(32, 32, bias=False) for _ in range(13)]
        return nn.Sequential(nn.Embedding(64, 32), nn.Embedding(64, 32), *matrices, *[nn.RMSNorm(32) for _ in range(5)])

    with pytest.raises(ValueError, match=r"momentum_buffer' has shape \(32, 32\), the parameter \(48, 32\)"):
        MuGrokfast(llama_shaped(first_rows=48), **arguments()).load_state_dict(state)
    with pytest.raises(ValueError, match=r"muon groups hold \[14\] parameters, this model's \[1\]"):
        MuGrokfast(
            nn.Sequential(nn.Embedding(64, 32), nn.Linear(32, 32), nn.LayerNorm(32)), **arguments()
        ).load_state_dict(state)
    with pytest.raises(ValueError, match=r"optimizer sides \['adamw', 'muon'\], this model has \['muon'\]"):
        MuGrokfast(nn.Linear(4, 4, bias=False), **arguments()).load_state_dict(state)
    with pytest.raises(ValueError, match="not a MuGrokfast state dict"):
        optimizer.load_state_dict(optimizer.inner["muon"].state_dict())


# --- learning -----------------------------------------------------------------------------------


def test_pretrain_preset_fits_a_fixed_batch():
    model = tiny_llama()
    optimizer = MuGrokfast.from_preset(model, "pretrain", total_steps=50)
    batch = batches(1)[0]
    losses = [train_step(model, optimizer, batch) for _ in range(50)]
    assert losses[-1] < 0.6 * losses[0], losses
