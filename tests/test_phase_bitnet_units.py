"""The BitNet phase's algorithms on small hand-checkable cases: the λ warm-up, calibration errors
and choices, sensitivity, conversion with per-layer scales (saved and reloaded), byte and
sparsity accounting, the gradient-flow check and settings."""

import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from torch.nn import functional as F
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from agentforge import ops
from agentforge.eval.speed import generation_memory, layer_time_share, resident_tensor_bytes
from agentforge.nn import BitLinear, convert_to_bitnet, pack_bitnet
from agentforge.phases import bitnet
from agentforge.quant import (
    bitlinear_layers,
    calibrate,
    calibration,
    choose_per_channel,
    convert_as_calibrated,
    gradient_flow,
    layer_inputs,
    output_error,
    require_state,
    ternary_layer_stats,
    totals,
    warmup_lambda,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_llama(seed=0, hidden=32, intermediate=64):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config)


def mean_nll_on(ids):
    def mean_nll(model):
        with torch.no_grad():
            return float(model(input_ids=ids, labels=ids).loss)

    return mean_nll


# --- λ warm-up -------------------------------------------------------------------------------


def test_warmup_lambda_is_linear_then_one():
    assert [warmup_lambda(s, 4) for s in (0, 1, 2, 4, 9)] == [0.0, 0.25, 0.5, 1.0, 1.0]
    assert warmup_lambda(0, 0) == 1.0  # no warm-up: fully ternary from the first step


# --- calibration -----------------------------------------------------------------------------


def linear(weight, bias=None):
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


def test_output_error_is_zero_when_weights_and_inputs_are_exactly_representable():
    layer = linear(0.5 * torch.tensor([[1.0, -1.0], [1.0, 1.0]]))  # |w| all equal: absmean codes are exact
    x = torch.tensor([[1.0, -1.0], [1.0, 0.0]])  # int8 absmax maps these exactly to ±127 and 0
    assert output_error(x, layer, per_channel=False) < 1e-8


def test_output_error_by_hand_for_rows_of_different_magnitude():
    layer = linear(torch.tensor([[1.0, -1.0], [0.01, -0.01]]))
    x = torch.tensor([[1.0, 0.0]])  # y = [1, 0.01]
    scale = (2 + 0.02) / 4  # per tensor: mean|W| (above the 1e-5 floor); row 2 rounds to all zeros
    expected = ((1 - scale) ** 2 + 0.01**2) / (1 + 0.01**2)
    assert output_error(x, layer, per_channel=False) == pytest.approx(expected, rel=1e-4)
    assert output_error(x, layer, per_channel=True) < 1e-6  # one scale per row represents both rows


def test_per_channel_is_chosen_only_for_a_large_enough_gain():
    assert choose_per_channel(1.0, 0.90, min_gain=0.05)
    assert not choose_per_channel(1.0, 0.97, min_gain=0.05)
    assert not choose_per_channel(1.0, 1.0, min_gain=0.0)


class CalledTwice(nn.Module):
    """A weight-shared layer applied twice per forward (like Cognate's recursive core)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.shared = nn.Linear(4, 4)

    def forward(self, input_ids):
        return self.shared(self.shared(self.embed(input_ids)))


def test_layer_inputs_records_every_call_and_subsamples():
    model = CalledTwice()
    ids = torch.randint(0, 10, (2, 3))
    inputs = layer_inputs(model, ["shared"], [{"input_ids": ids}], max_tokens=100)
    assert inputs["shared"].shape == (12, 4)  # 6 tokens x 2 calls
    first = model.embed(ids).reshape(-1, 4)
    torch.testing.assert_close(inputs["shared"][:6], first.detach())
    assert layer_inputs(model, ["shared"], [{"input_ids": ids}], max_tokens=5)["shared"].shape == (5, 4)
    assert not model.shared._forward_pre_hooks  # hooks removed


def test_calibrate_measures_chooses_flags_and_leaves_the_model_alone():
    model = tiny_llama().eval()
    ids = torch.randint(0, 64, (4, 16))
    names = [n for n, m in model.named_modules() if type(m) is nn.Linear and "lm_head" not in n]
    with torch.no_grad():
        before = model(input_ids=ids).logits
    records = calibrate(
        model, names, [{"input_ids": ids}], mean_nll_on(ids), min_gain=0.05, n_sensitive=2, max_tokens=64
    )
    assert [r.name for r in records] == names
    for r in records:
        assert r.per_channel == choose_per_channel(r.error_per_tensor, r.error_per_channel, 0.05)
        assert 0 < r.error_per_channel and 0 < r.error_per_tensor
    ranked = sorted(records, key=lambda r: r.loss_increase, reverse=True)
    assert [r.sensitive for r in ranked] == [True, True] + [False] * (len(records) - 2)
    assert all(type(model.get_submodule(n)) is nn.Linear for n in names)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=0, atol=0)


def test_loss_increase_is_the_loss_with_that_layer_ternary():
    model = tiny_llama().eval()
    ids = torch.randint(0, 64, (2, 16))
    name = "model.layers.0.mlp.down_proj"
    record = calibrate(
        model, [name], [{"input_ids": ids}], mean_nll_on(ids), min_gain=0.05, n_sensitive=1, max_tokens=64
    )[0]
    base = mean_nll_on(ids)(model)
    model.set_submodule(name, BitLinear.from_linear(model.get_submodule(name), record.per_channel))
    assert record.loss_increase == pytest.approx(mean_nll_on(ids)(model) - base, abs=1e-6)


def test_calibrate_rejects_bad_arguments():
    model = tiny_llama()
    with pytest.raises(ValueError, match="no layers"):
        calibrate(model, [], [], mean_nll_on(None), min_gain=0.05, n_sensitive=1, max_tokens=8)
    with pytest.raises(ValueError, match="min_gain"):
        calibrate(
            model, ["model.layers.0.mlp.up_proj"], [], mean_nll_on(None), min_gain=1.5, n_sensitive=1, max_tokens=8
        )
    with pytest.raises(ValueError, match="sensitivity"):
        calibrate(
            model,
            ["model.layers.0.mlp.up_proj"],
            [],
            mean_nll_on(None),
            min_gain=0.05,
            n_sensitive=1,
            max_tokens=8,
            sensitivity="first-order",
        )
    with pytest.raises(ValueError, match="recheck"):
        calibrate(
            model,
            ["model.layers.0.mlp.up_proj"],
            [],
            mean_nll_on(None),
            min_gain=0.05,
            n_sensitive=1,
            max_tokens=8,
            recheck=1.5,
        )


# --- Taylor sensitivity ----------------------------------------------------------------------


class SharedLM(nn.Module):
    """A tiny LM whose ``shared`` layer runs twice per forward, then a ``head`` (logits)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(16, 8)
        self.shared = nn.Linear(8, 8)
        self.head = nn.Linear(8, 16)

    def forward(self, input_ids, attention_mask=None):
        h = self.embed(input_ids)
        h = torch.tanh(self.shared(torch.tanh(self.shared(h)) + h.cumsum(1)))  # cumsum: tokens see earlier ones
        return SimpleNamespace(logits=self.head(h))


def doubled_output(name, layer, x):
    # ΔY = Y, so ⟨G, ΔY⟩ is the derivative of the loss along (W, b); functional, as calling the
    # layer would run the hook that asks for this again
    return 2 * F.linear(x, layer.weight, layer.bias)


def along_own_weights(model, names, ids):
    """Per layer, d/dε of the summed NLL of each row of ``ids`` when that layer's weight and bias
    are scaled by 1 + ε (every call of a shared layer included), by ordinary parameter gradients:
    ``⟨∂ℓ_r/∂W, W⟩ + ⟨∂ℓ_r/∂b, b⟩``. Returns {name: [per row]}."""
    out = {name: [] for name in names}
    for row in ids:
        model.zero_grad()
        calibration._summed_nll(model, {"input_ids": row[None]}).backward()
        for name in names:
            layer = model.get_submodule(name)
            along = (layer.weight.grad * layer.weight).sum()
            if layer.bias is not None:
                along = along + (layer.bias.grad * layer.bias).sum()
            out[name].append(float(along))
    model.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize(
    "make, names",
    [
        (SharedLM, ["shared", "head"]),
        (
            tiny_llama,
            ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj"],
        ),
    ],
)
@pytest.mark.parametrize("pass_tokens", [16, 4096])  # one row a pass, and all rows in one pass
def test_taylor_terms_equal_the_parameter_gradient_identities(make, names, pass_tokens):
    """With ΔY = Y the two terms have closed forms in ordinary parameter gradients: the first is
    Σ_r d_r / N, the second Σ_r d_r² / 2N, d_r the row's derivative along the layer's own weights."""
    model = make().eval()
    ids = torch.randint(0, 16, (3, 16), generator=torch.Generator().manual_seed(1))
    tokens = 3 * 15
    loss, terms = calibration.taylor_increases(model, names, [{"input_ids": ids}], doubled_output, pass_tokens)
    with torch.no_grad():
        assert loss == pytest.approx(float(calibration._summed_nll(model, {"input_ids": ids})) / tokens, rel=1e-6)
    rows = along_own_weights(model, names, ids)
    for name in names:
        first, second = terms[name]
        assert first == pytest.approx(sum(rows[name]) / tokens, rel=1e-4, abs=1e-7)
        assert second == pytest.approx(sum(d * d for d in rows[name]) / (2 * tokens), rel=1e-4, abs=1e-9)
        assert second > 0


def test_taylor_pass_leaves_the_model_as_it_was():
    model = tiny_llama().train()
    model.model.layers[0].mlp.up_proj.weight.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    ids = torch.randint(0, 64, (2, 16))
    names = [n for n, m in model.named_modules() if type(m) is nn.Linear and "lm_head" not in n]
    calibration.taylor_increases(model, names, [{"input_ids": ids}], doubled_output)
    assert model.training and all(m.training for m in model.modules())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    assert not any(m._forward_hooks for m in model.modules())


def test_taylor_estimate_of_a_small_change_matches_the_measured_change():
    """For ΔY = εY the expansion must agree with the loss actually measured to O(ε²)."""
    model = tiny_llama().double().eval()
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(2))
    name, eps = "model.layers.0.mlp.down_proj", 1e-3
    _, terms = calibration.taylor_increases(
        model, [name], [{"input_ids": ids}], lambda n, layer, x: (1 + eps) * F.linear(x, layer.weight, layer.bias)
    )

    @torch.no_grad()
    def nll() -> float:  # in float64 throughout (transformers' loss casts the logits to float32)
        logits = model(input_ids=ids).logits[:, :-1]
        return float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)))

    base = nll()
    with torch.no_grad():
        model.get_submodule(name).weight.mul_(1 + eps)
    measured = nll() - base
    assert sum(terms[name]) == pytest.approx(measured, rel=0.02)


def test_calibrate_taylor_flags_measured_layers_and_records_the_method():
    model = tiny_llama().eval()
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(3))
    names = [n for n, m in model.named_modules() if type(m) is nn.Linear and "lm_head" not in n]
    kwargs = dict(min_gain=0.05, n_sensitive=2, max_tokens=64)
    exact = calibrate(model, names, [{"input_ids": ids}], mean_nll_on(ids), sensitivity="exact", **kwargs)
    alone = calibrate(model, names, [{"input_ids": ids}], mean_nll_on(ids), sensitivity="taylor", recheck=0, **kwargs)
    assert all(r.loss_increase_method == "taylor" and r.loss_increase == r.loss_increase_estimate for r in alone)
    assert [r.sensitive for r in sorted(alone, key=lambda r: r.loss_increase, reverse=True)] == [True] * 2 + [False] * 5
    checked = calibrate(
        model, names, [{"input_ids": ids}], mean_nll_on(ids), sensitivity="taylor", recheck=0.1, **kwargs
    )
    by_name = {r.name: r for r in exact}
    measured = [r for r in checked if r.loss_increase_method == "exact"]
    assert len(measured) >= 4  # twice the flags
    for r in measured:
        assert r.loss_increase == pytest.approx(by_name[r.name].loss_increase, abs=1e-6)
    assert all(r.loss_increase_method == "exact" for r in checked if r.sensitive)
    assert {r.name for r in measured} >= {r.name for r in sorted(alone, key=lambda r: -r.loss_increase)[:4]}
    everything = calibrate(
        model, names, [{"input_ids": ids}], mean_nll_on(ids), sensitivity="taylor", recheck=1.0, **kwargs
    )
    assert [r.sensitive for r in everything] == [r.sensitive for r in exact]
    assert all(r.loss_increase_estimate is None for r in exact)


def test_auto_sensitivity_is_exact_for_small_models_and_taylor_above(monkeypatch):
    model = tiny_llama().eval()
    ids = torch.randint(0, 64, (2, 16))
    names = [n for n, m in model.named_modules() if type(m) is nn.Linear and "lm_head" not in n]
    kwargs = dict(min_gain=0.05, n_sensitive=1, max_tokens=64)
    assert {
        r.loss_increase_method for r in calibrate(model, names, [{"input_ids": ids}], mean_nll_on(ids), **kwargs)
    } == {"exact"}
    monkeypatch.setattr(calibration, "EXACT_MAX_LAYERS", len(names) - 1)
    records = calibrate(model, names, [{"input_ids": ids}], mean_nll_on(ids), **kwargs)
    assert {r.loss_increase_method for r in records} == {"exact", "taylor"}
    assert all(r.loss_increase_estimate is not None for r in records)


def test_taylor_refuses_batches_whose_loss_is_not_what_mean_nll_measures():
    model = tiny_llama().eval()
    ids = torch.randint(0, 64, (2, 16))
    labels = ids.clone()
    labels[:, :8] = -100  # the estimate would differentiate half the tokens mean_nll scores
    with pytest.raises(ValueError, match="not what mean_nll measures"):
        calibrate(
            model,
            ["model.layers.0.mlp.up_proj"],
            [{"input_ids": ids, "labels": labels}],
            mean_nll_on(ids),
            min_gain=0.05,
            n_sensitive=1,
            max_tokens=64,
            sensitivity="taylor",
        )


# --- conversion with per-layer scales --------------------------------------------------------


def calibration_for(model, per_channel_names, losses):
    names = [n for n, m in model.named_modules() if type(m) is nn.Linear and "lm_head" not in n]
    return [{"name": n, "per_channel": n in per_channel_names, "loss_increase": losses.get(n, 0.0)} for n in names]


def test_convert_applies_per_layer_scales_and_keeps_the_most_sensitive_float():
    model = tiny_llama()
    per_channel = {"model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj"}
    calibration = calibration_for(model, per_channel, {"model.layers.0.mlp.down_proj": 0.5})
    kept = convert_as_calibrated(model, calibration, skip=["lm_head", "embed"], keep_fp=1)
    assert kept == ["model.layers.0.mlp.down_proj"]
    assert type(model.model.layers[0].mlp.down_proj) is nn.Linear
    layers = bitlinear_layers(model)
    assert len(layers) == 6 and {n for n, m in layers.items() if m.per_channel} == per_channel
    config = model.config.quantization_config
    assert config.per_channel == sorted(per_channel) and "model.layers.0.mlp.down_proj" in config.skip


def test_mixed_per_channel_model_saves_and_reloads_in_both_states(tmp_path):
    model = tiny_llama()
    per_channel = {"model.layers.0.self_attn.v_proj", "model.layers.0.mlp.gate_proj"}
    convert_as_calibrated(model, calibration_for(model, per_channel, {}), skip=["lm_head", "embed"])
    ids = torch.randint(0, 64, (2, 8))
    model.save_pretrained(tmp_path / "latent")
    saved = json.loads((tmp_path / "latent" / "config.json").read_text())["quantization_config"]
    assert saved["per_channel"] == sorted(per_channel)
    latent = AutoModelForCausalLM.from_pretrained(tmp_path / "latent")
    assert {n for n, m in bitlinear_layers(latent).items() if m.per_channel} == per_channel
    pack_bitnet(model.eval())
    model.save_pretrained(tmp_path / "packed")
    packed = AutoModelForCausalLM.from_pretrained(tmp_path / "packed")
    scales = {n: m.w_scale.numel() for n, m in bitlinear_layers(packed).items()}
    assert all(scales[n] == (packed.get_submodule(n).out_features if n in per_channel else 1) for n in scales)
    with torch.no_grad():
        torch.testing.assert_close(packed(input_ids=ids).logits, latent(input_ids=ids).logits, rtol=0, atol=1e-5)


def test_a_per_channel_list_naming_an_unknown_layer_is_refused():
    from agentforge.nn.hf_quantizer import AgentForgeBitNetConfig

    with pytest.raises(ValueError, match="per_channel"):
        AgentForgeBitNetConfig(modules=["a.q_proj"], per_channel=["a.k_proj"])


# --- accounting ------------------------------------------------------------------------------


def test_bits_and_sparsity_come_from_the_stored_codes(tmp_path):
    a, b = nn.Linear(8, 4, bias=False), nn.Linear(6, 3, bias=False)  # K = 8 packs exactly, K = 6 pads
    codes = {
        name: ops.quantize_ternary(layer.weight.detach(), per_channel=pc)
        for name, layer, pc in (("a", a, False), ("b", b, True))
    }
    save_file(
        {f"{n}.weight_packed": ops.pack_ternary(c) for n, (c, _) in codes.items()}
        | {f"{n}.weight_scale": s for n, (_, s) in codes.items()},
        tmp_path / "model.safetensors",
    )
    stats = ternary_layer_stats(tmp_path, {"a": 8, "b": 6})
    assert stats["a"]["bits_per_weight"] == 2.0 and stats["a"]["scale_bytes"] == 4
    assert stats["b"]["bits_per_weight"] == pytest.approx(8 * 3 * 2 / 18) and stats["b"]["scale_bytes"] == 12
    for name, (c, _) in codes.items():
        assert stats[name]["sparsity"] == pytest.approx(float((c == 0).float().mean()))
    total = totals(stats)
    assert total["ternary_weights"] == 50
    assert total["bits_per_weight_with_scales"] == pytest.approx(8 * (8 + 6 + 16) / 50)
    with pytest.raises(ValueError, match="no packed weights"):
        ternary_layer_stats(tmp_path, {"a": 8, "missing": 4})


def test_resident_bytes_shrink_when_packed():
    model = tiny_llama(hidden=64, intermediate=128)
    float_bytes = resident_tensor_bytes(model)
    convert_to_bitnet(model)
    pack_bitnet(model)
    linear_weights = sum(m.in_features * m.out_features for m in bitlinear_layers(model).values())
    assert float_bytes - resident_tensor_bytes(model) >= linear_weights * 4 * 0.8  # fp32 -> ~2 bits each


def test_layer_time_share_is_a_fraction_that_grows_with_the_layers_timed():
    model = tiny_llama().eval()
    names = [n for n, m in model.named_modules() if type(m) is nn.Linear and "lm_head" not in n]
    some = layer_time_share(model, names[:1], prompt_len=4, new_tokens=3)
    every = layer_time_share(model, names, prompt_len=4, new_tokens=3)
    assert 0 < some < every < 1
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_generation_memory_of_a_fresh_process(tmp_path):
    tiny_llama().save_pretrained(tmp_path)
    report = generation_memory(tmp_path, batch_size=2, prompt_len=4, new_tokens=2)
    assert report["peak_bytes"] >= report["baseline_bytes"] > 0
    assert report["model_bytes"] == report["peak_bytes"] - report["baseline_bytes"]
    with pytest.raises(ValueError, match="not a model directory"):
        generation_memory(tmp_path / "missing", batch_size=1, prompt_len=4, new_tokens=2)


def test_require_state_refuses_a_model_that_lost_or_mixed_its_ternary_layers():
    model = tiny_llama()
    with pytest.raises(RuntimeError, match="found 0 BitLinear"):
        require_state(model, "training", "curriculum input")
    convert_to_bitnet(model)
    require_state(model, "training")
    model.model.layers[0].mlp.up_proj.pack()
    with pytest.raises(RuntimeError, match="1 are not"):
        require_state(model, "training")


# --- gradient flow ---------------------------------------------------------------------------


def test_gradient_flow_finds_every_latent_weight_or_names_the_one_without():
    model = convert_to_bitnet(tiny_llama())
    ids = torch.randint(0, 64, (2, 8))
    report = gradient_flow(model, {"input_ids": ids, "labels": ids})
    assert report["ok"] and report["layers"] == 7 and report["min_grad_norm"] > 0
    assert all(p.grad is None for p in model.parameters())  # the check leaves no gradients behind
    model.model.layers[0].mlp.up_proj.weight.requires_grad_(False)
    report = gradient_flow(model, {"input_ids": ids, "labels": ids})
    assert not report["ok"] and report["bad_layers"] == ["model.layers.0.mlp.up_proj"]


# --- settings --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("lambda_warmup_fraction", 1.5, "lambda_warmup_fraction"),
        ("keep_sensitive_fp", 4, "keep_sensitive_fp"),
        ("speed_batch_sizes", [1, 0], "speed_batch_sizes"),
        ("per_channel_min_gain", 1.0, "per_channel_min_gain"),
        ("text_weight", 0.0, "text_weight"),
        ("skip", [""], "skip"),
        ("steps", 0, "steps"),
        ("calibration_tokens", 1.5, "calibration_tokens"),
    ],
)
def test_bad_settings_are_one_line_errors(field, value, message):
    with pytest.raises(ValueError, match=message) as error:
        bitnet.Settings(**{field: value})
    assert "\n" not in str(error.value)


def test_missing_model_input_is_a_clear_error(tmp_path):
    from agentforge.errors import ConfigError
    from agentforge.runtime import run_alone

    with pytest.raises(ConfigError, match="input 'model' is missing"):
        run_alone(bitnet.SPEC, {"champion": tmp_path}, tmp_path, preset="micro", say=lambda _: None)
