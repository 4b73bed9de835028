"""Hugging Face integration: save_pretrained/from_pretrained of BitLinear models (the acceptance
test), the agentforge_bitnet quantizer's error paths, and the transformers BitNet format converters."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.integrations import bitnet as hf_bitnet

from agentforge import ops  # importing agentforge registers the agentforge_bitnet quantizer
from agentforge.nn import (
    BitLinear,
    convert_to_bitnet,
    from_hf_bitnet,
    pack_bitnet,
    pack_hf_bitnet,
    to_hf_bitnet,
    unpack_hf_bitnet,
)
from agentforge.nn.hf_quantizer import AgentForgeBitNetConfig


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=128,
    )
    return LlamaForCausalLM(config)


def train(model, ids, steps=8):
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A converted tiny Llama trained a few steps, saved in training state and in packed state."""
    root = tmp_path_factory.mktemp("bitnet")
    torch.manual_seed(0)
    ids = torch.randint(0, 256, (8, 32))
    model = convert_to_bitnet(tiny_llama())
    losses = train(model, ids)
    model.eval()
    with torch.no_grad():
        latent_logits = model(input_ids=ids).logits
    model.save_pretrained(root / "latent")
    pack_bitnet(model)
    model.save_pretrained(root / "packed")
    return dict(root=root, ids=ids, losses=losses, model=model, latent_logits=latent_logits)


def load(path, **kwargs):
    return AutoModelForCausalLM.from_pretrained(path, **kwargs)


def test_acceptance_train_pack_save_reload_generate(saved):
    losses, ids, model = saved["losses"], saved["ids"], saved["model"]
    assert losses[-1] < losses[0] - 0.5, losses  # 5.5 -> ~3.9 in 8 steps
    config = json.loads((saved["root"] / "packed" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "agentforge_bitnet" and config["state"] == "packed"
    assert len(config["modules"]) == 14 and not any("lm_head" in m for m in config["modules"])

    reloaded = load(saved["root"] / "packed")
    layers = [m for m in reloaded.modules() if isinstance(m, BitLinear)]
    assert len(layers) == 14 and all(m.state == "packed" for m in layers)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected, rtol=0, atol=1e-5)
    prompt = ids[:2, :6]
    out = reloaded.generate(prompt, max_new_tokens=6, do_sample=False)
    assert out.shape == (2, 12)
    assert torch.equal(out, model.generate(prompt, max_new_tokens=6, do_sample=False))


def test_packed_checkpoint_holds_only_the_canonical_format(saved):
    tensors = load_file(saved["root"] / "packed" / "model.safetensors")
    q = "model.layers.0.self_attn.q_proj"
    assert tensors[f"{q}.weight_packed"].dtype == torch.uint8 and tensors[f"{q}.weight_packed"].shape == (64, 16)
    assert tensors[f"{q}.weight_scale"].dtype == torch.float32 and tensors[f"{q}.weight_scale"].shape == (1,)
    assert not any(k.endswith((f"{q}.weight", "w_prepacked", "w_scale")) for k in tensors)


def test_latent_checkpoint_round_trip_keeps_training(saved):
    reloaded = load(saved["root"] / "latent")
    layer = reloaded.model.layers[1].mlp.down_proj
    assert isinstance(layer, BitLinear) and layer.state == "training" and layer.weight.dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=saved["ids"]).logits, saved["latent_logits"], rtol=0, atol=1e-5)
    assert reloaded.hf_quantizer.is_trainable
    reloaded.train()
    losses = train(reloaded, saved["ids"], steps=2)
    assert losses[-1] < losses[0]


def test_packing_a_reloaded_latent_model_then_resaving(saved, tmp_path):
    model = pack_bitnet(load(saved["root"] / "latent"))
    assert model.config.quantization_config.state == "packed"
    model.save_pretrained(tmp_path)
    again = load(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(
            again(input_ids=saved["ids"]).logits, model(input_ids=saved["ids"]).logits, rtol=0, atol=1e-5
        )


def test_a_causal_lm_checkpoint_loads_as_its_base_model(saved):
    base = transformers.AutoModel.from_pretrained(saved["root"] / "packed")
    assert sum(isinstance(m, BitLinear) for m in base.modules()) == 14
    assert base.config.quantization_config.modules[0] == "layers.0.mlp.down_proj"
    with torch.no_grad():
        expected = saved["model"].model(input_ids=saved["ids"]).last_hidden_state
        torch.testing.assert_close(base(input_ids=saved["ids"]).last_hidden_state, expected, rtol=0, atol=1e-5)


def test_bfloat16_load_keeps_fp32_scales(saved):
    model = load(saved["root"] / "packed", dtype=torch.bfloat16)
    layer = model.model.layers[0].mlp.up_proj
    assert layer.w_scale.dtype == torch.float32
    assert torch.equal(layer.w_scale, saved["model"].model.layers[0].mlp.up_proj.w_scale)  # not rounded to bf16
    with torch.no_grad():
        assert model(input_ids=saved["ids"][:1]).logits.dtype == torch.bfloat16


def test_float_checkpoint_converts_on_load(tmp_path):
    base = tiny_llama(seed=3)
    base.save_pretrained(tmp_path)
    model = load(tmp_path, quantization_config=AgentForgeBitNetConfig(skip=["lm_head", "embed", "mlp"]))
    assert isinstance(model.model.layers[0].self_attn.q_proj, BitLinear)
    assert type(model.model.layers[0].mlp.up_proj) is torch.nn.Linear
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, base.model.layers[0].self_attn.q_proj.weight)
    assert len(model.config.quantization_config.modules) == 8
    with pytest.raises(ValueError, match="needs a packed checkpoint"):
        load(tmp_path, quantization_config=AgentForgeBitNetConfig(state="packed"))


def copy_checkpoint(saved, name, tmp_path):
    path = tmp_path / name
    shutil.copytree(saved["root"] / name, path)
    return path


def edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"].update(changes)
    (path / "config.json").write_text(json.dumps(config))


def edit_tensors(path, edit):
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


UP = "model.layers.1.mlp.up_proj"


def narrow_up_proj(tensors):
    """As if the checkpoint came from a model with a smaller hidden size."""
    tensors[f"{UP}.weight_packed"] = tensors[f"{UP}.weight_packed"][:, :8].contiguous()


@pytest.mark.parametrize(
    "name, corrupt, message",
    [
        ("latent", lambda p: edit_config(p, state="packed"), "no tensor .*weight_packed.* do not match"),
        ("packed", lambda p: edit_config(p, state="training"), "no tensor .*down_proj.weight'.* do not match"),
        ("packed", lambda p: edit_config(p, state="frozen"), "state must be 'training' or 'packed'"),
        ("packed", lambda p: edit_config(p, modules=["model.layers.7.mlp.up_proj"]), "no nn.Linear of that name"),
        ("packed", lambda p: (p / "model.safetensors").write_bytes(b"\0" * 64), "cannot read checkpoint"),
        ("packed", lambda p: edit_tensors(p, lambda t: t.pop(f"{UP}.weight_scale")), f"no tensor '{UP}.weight_scale'"),
        ("packed", lambda p: edit_tensors(p, narrow_up_proj), r"is U8 \[128, 8\].*needs U8 \[128, 16\]"),
        (
            "packed",
            lambda p: edit_tensors(p, lambda t: t[f"{UP}.weight_scale"].fill_(float("nan"))),
            "finite and positive",
        ),
        ("packed", lambda p: edit_tensors(p, lambda t: t[f"{UP}.weight_packed"].fill_(0xFF)), "invalid 2-bit code"),
    ],
)
def test_corrupt_or_mismatched_checkpoint_is_a_clear_one_line_error(saved, tmp_path, name, corrupt, message):
    path = copy_checkpoint(saved, name, tmp_path)
    corrupt(path)
    with pytest.raises(ValueError, match=message) as info:
        load(path)
    assert "\n" not in str(info.value)


def test_import_agentforge_stays_fast_and_registers_lazily():
    code = (
        "import time, sys, torch; t = time.perf_counter(); import agentforge; dt = time.perf_counter() - t; "
        "lazy = 'transformers' not in sys.modules; "
        "from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING as M; "
        "print(dt, lazy, 'agentforge_bitnet' in M)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert float(out[0]) < 0.5 and out[1:] == ["True", "True"], out


def test_quantizer_registers_at_once_when_transformers_was_imported_first(monkeypatch):
    from transformers.quantizers import auto

    from agentforge._import_hooks import after_import
    from agentforge.nn import _register_quantizer

    monkeypatch.delitem(auto.AUTO_QUANTIZER_MAPPING, "agentforge_bitnet")
    monkeypatch.delitem(auto.AUTO_QUANTIZATION_CONFIG_MAPPING, "agentforge_bitnet")
    after_import("transformers.quantizers.auto", _register_quantizer)
    assert auto.AUTO_QUANTIZER_MAPPING["agentforge_bitnet"].__name__ == "AgentForgeBitNetQuantizer"
    assert auto.AUTO_QUANTIZATION_CONFIG_MAPPING["agentforge_bitnet"] is AgentForgeBitNetConfig


# ---- converters to and from transformers' BitNet layout, checked against transformers' own code

HF_SHAPES = [(4, 1), (8, 7), (12, 33), (20, 130), (64, 64)]


@pytest.mark.parametrize("N,K", HF_SHAPES)
def test_hf_layout_matches_transformers_pack_and_unpack(N, K):
    codes = torch.randint(-1, 2, (N, K), dtype=torch.int8)
    theirs = hf_bitnet.pack_weights(codes.clone())  # pack_weights adds 1 to its argument in place
    assert torch.equal(pack_hf_bitnet(codes), theirs)
    assert torch.equal(unpack_hf_bitnet(theirs), codes)
    unpack = hf_bitnet.unpack_weights.__wrapped__  # the function under transformers' @torch.compile
    assert torch.equal(unpack(pack_hf_bitnet(codes), dtype=torch.float32), codes.float())


@pytest.mark.parametrize("linear_class", ["bitlinear", "autobitlinear"])
@pytest.mark.parametrize("N,K", HF_SHAPES)
def test_to_and_from_hf_bitnet_round_trip(N, K, linear_class):
    codes, scale = ops.quantize_ternary(torch.randn(N, K))
    packed = ops.pack_ternary(codes)
    hf_weight, hf_scale = to_hf_bitnet(packed, scale, K, linear_class)
    assert torch.equal(hf_weight, hf_bitnet.pack_weights(codes.clone()))
    expected_scale = 1 / scale if linear_class == "bitlinear" else scale
    torch.testing.assert_close(hf_scale, expected_scale)
    back_packed, back_scale = from_hf_bitnet(hf_weight, hf_scale, linear_class)
    assert torch.equal(back_packed, packed)
    torch.testing.assert_close(back_scale, scale, rtol=1e-6, atol=0)


@pytest.mark.parametrize("N,K", [(8, 7), (20, 130)])
def test_hf_layers_compute_what_our_packed_layer_computes(N, K):
    """Both HF scale conventions, run through transformers' own BitLinear and AutoBitLinear."""
    torch.manual_seed(0)
    codes, scale = ops.quantize_ternary(torch.randn(N, K))
    ours = BitLinear.from_packed(ops.pack_ternary(codes), scale, in_features=K)
    x = torch.randn(3, K)
    with torch.no_grad(), torch._dynamo.config.patch(disable=True):  # run HF's @torch.compile code eagerly
        hf = hf_bitnet.BitLinear(K, N, bias=False, dtype=torch.float32)
        hf.weight, hf.weight_scale = to_hf_bitnet(ours.state_dict()["weight_packed"], scale, K, "bitlinear")
        torch.testing.assert_close(hf(x), ours(x), rtol=1e-5, atol=1e-5)

        auto = hf_bitnet.AutoBitLinear(K, N, bias=False, dtype=torch.float32)
        hf_weight, auto.weight_scale = to_hf_bitnet(ours.state_dict()["weight_packed"], scale, K, "autobitlinear")
        auto.weight.copy_(hf_bitnet.unpack_weights.__wrapped__(hf_weight, dtype=torch.float32))
        torch.testing.assert_close(auto(x), ours(x), rtol=1e-5, atol=1e-5)


def test_hf_converters_reject_what_hf_cannot_hold():
    with pytest.raises(ValueError, match="divisible by 4; got 6"):
        pack_hf_bitnet(torch.zeros(6, 8, dtype=torch.int8))
    codes, scale = ops.quantize_ternary(torch.randn(8, 5), per_channel=True)
    with pytest.raises(ValueError, match="one weight scale per tensor"):
        to_hf_bitnet(ops.pack_ternary(codes), scale, 5)
    with pytest.raises(ValueError, match="linear_class must be one of"):
        from_hf_bitnet(torch.zeros(2, 5, dtype=torch.uint8), torch.ones(1), "bitnet")
    with pytest.raises(ValueError, match="uint8"):
        unpack_hf_bitnet(torch.zeros(2, 5))


# --- 1.6-bit (base-3) packed models -----------------------------------------------------------


def _packed_copy(saved, bits):
    model = convert_to_bitnet(tiny_llama())
    model.load_state_dict(load(saved["root"] / "latent").state_dict())
    return pack_bitnet(model.eval(), bits=bits)


def test_a_1_6_bit_model_round_trips_through_save_and_load(saved, tmp_path):
    model = _packed_copy(saved, 1.6)
    model.save_pretrained(tmp_path / "base3")
    config = json.loads((tmp_path / "base3" / "config.json").read_text())["quantization_config"]
    assert config["bits"] == 1.6
    tensors = load_file(tmp_path / "base3" / "model.safetensors")
    q = "model.layers.0.self_attn.q_proj"
    assert tensors[f"{q}.weight_packed"].shape == (64, 13)  # ceil(64 / 5) bytes per row
    reloaded = load(tmp_path / "base3")
    layers = [m for m in reloaded.modules() if isinstance(m, BitLinear)]
    assert all(m.bits == 1.6 and ops.prepacked_info(m.w_prepacked)["layout"] == "base3" for m in layers)
    ids = saved["ids"]
    with torch.no_grad():  # the same ternary codes as the 2-bit model: the same logits
        torch.testing.assert_close(
            reloaded(input_ids=ids).logits, saved["model"](input_ids=ids).logits, rtol=0, atol=1e-5
        )


def test_mixed_widths_are_recorded_per_layer(saved, tmp_path):
    model = convert_to_bitnet(tiny_llama())
    model.load_state_dict(load(saved["root"] / "latent").state_dict())
    for name, layer in model.named_modules():
        if isinstance(layer, BitLinear):
            layer.pack(1.6 if "mlp" in name else 2)
    from agentforge.nn.convert import record_in_config

    record_in_config(model)
    model.save_pretrained(tmp_path / "mixed")
    config = json.loads((tmp_path / "mixed" / "config.json").read_text())["quantization_config"]
    assert config["bits"] == sorted(n for n, m in model.named_modules() if isinstance(m, BitLinear) and "mlp" in n)
    reloaded = load(tmp_path / "mixed")
    assert {n: m.bits for n, m in reloaded.named_modules() if isinstance(m, BitLinear)} == {
        n: m.bits for n, m in model.named_modules() if isinstance(m, BitLinear)
    }


def test_auto_width_measures_only_models_that_do_not_fit_in_cache(saved, monkeypatch):
    assert {m.bits for m in _packed_copy(saved, "auto").modules() if isinstance(m, BitLinear)} == {2}
    calls = []
    monkeypatch.setattr(ops, "last_level_cache_bytes", lambda: 0)  # as if nothing fitted
    monkeypatch.setattr(ops, "cold_layout", lambda N, K: calls.append((N, K)) or ("base3" if N == 128 else "2bit"))
    model = _packed_copy(saved, "auto")
    assert set(calls) == {(64, 64), (32, 64), (128, 64), (64, 128)}
    assert all(m.bits == (1.6 if m.out_features == 128 else 2) for m in model.modules() if isinstance(m, BitLinear))


def test_a_checkpoint_saved_before_1_6_bits_loads_as_2_bits(saved, tmp_path):
    shutil.copytree(saved["root"] / "packed", tmp_path / "old")
    path = tmp_path / "old" / "config.json"
    config = json.loads(path.read_text())
    del config["quantization_config"]["bits"]
    path.write_text(json.dumps(config))
    assert all(m.bits == 2 for m in load(tmp_path / "old").modules() if isinstance(m, BitLinear))
