"""``agentforge export``: a plain Hugging Face directory that loads without agentforge (Llama with
transformers alone, Cognate with its shipped code), a llama.cpp GGUF whose ternary tensors read
back as the exact codes × scale, the parts a plain file cannot hold named, bad input refused.

How an export is compared with the packed model it came from: the packed model quantizes each
token's activations to int8 before a ternary matmul, a plain ``nn.Linear`` does not, and that
changes logits by about 1% of their range (more than bf16 rounding). So the tests check

* exactness where it holds: the exported weights are codes × scale, and the export with its
  linear layers turned back into packed BitLinear layers computes the packed model's logits;
* that a fresh interpreter without agentforge computes the same logits from the export as
  transformers does here, and a bf16 export those of a float32 one within bf16 precision;
* the packed model's logits within the activation quantization's share (``QUANTIZED``)."""

import json
import os
import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import agentforge
from agentforge import cli, ops
from agentforge.artifacts import save_model_dir
from agentforge.data import train_tokenizer
from agentforge.export import ternary_layers
from agentforge.models import CognateConfig, CognateForCausalLM
from agentforge.nn import BitLinear, convert_to_bitnet, pack_bitnet
from agentforge.quietstar.thinking import ThinkingModel, ThoughtSettings, add_thought_tokens

pytestmark = pytest.mark.usefixtures("one_thread")

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
TEXT = "def load(path):\n    return json.loads(open(path).read())  # 42"
# torch's default rtol for bf16 comparisons, and as atol the same fraction of the logits' range
BF16 = 1.6e-2
# int8 activations move these models' logits by up to 1.2% of their range (measured); a wrong
# scale, layer or permutation moves them by far more
QUANTIZED = 0.05

# Run in a fresh interpreter that cannot import agentforge: load each exported directory with
# transformers and save its logits on the ids; report what its tokenizer does.
PLAIN_LOAD = r"""
import json, sys
from pathlib import Path

# agentforge may sit in site-packages beside transformers: block its import rather than its path
sys.modules["agentforge"] = None
try:
    import agentforge  # noqa: F401
except ImportError:
    pass
else:
    raise AssertionError("agentforge is importable")

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

torch.set_num_threads(1)
job = json.loads(sys.argv[1])
result = {}
for directory in job["dirs"]:
    refusal = None
    if job["remote_code"]:
        try:
            AutoModelForCausalLM.from_pretrained(directory)
        except ValueError as e:
            refusal = str(e)
    model = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=job["remote_code"])
    with torch.no_grad():
        np.save(Path(directory) / "logits.npy", model(torch.tensor([job["ids"]])).logits.float().numpy())
    tokenizer = AutoTokenizer.from_pretrained(directory)
    result[directory] = {
        "dtype": str(model.dtype), "class": type(model).__module__, "ids": tokenizer(job["text"])["input_ids"],
        "chat": tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                              add_generation_prompt=True),
        "eos": tokenizer.eos_token_id, "pad": tokenizer.pad_token_id, "refusal": refusal}
assert not any(name.split(".")[0] == "agentforge" and module is not None for name, module in sys.modules.items())
print()  # transformers' "run the custom code? [y/N]" prompt ends without a newline
print(json.dumps(result))
"""


def run_cli(capsys, *args) -> tuple[int, str, str]:
    code = cli.main(["export", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def tokenizer():
    import argparse
    import json as json_module
    import re
    import string

    docs = [m.__doc__ for m in (argparse, json_module, os, re, string)]
    tok = train_tokenizer(docs, 320)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_llama(per_channel: bool, hidden: int = 256, intermediate: int = 512, layers: int = 2, extra_vocab: int = 16):
    """A packed ternary Llama and its tokenizer; ``extra_vocab`` pads the vocabulary past the
    tokenizer's, as models often have."""
    tok = tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tok) + extra_vocab,
        max_position_embeddings=128,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = pack_bitnet(convert_to_bitnet(LlamaForCausalLM(config), per_channel=per_channel)).eval()
    return model, tok


@pytest.fixture(scope="module")
def llamas(tmp_path_factory):
    """A tiny packed Llama with per-tensor scales and one with per-row scales, saved as artifacts."""
    root = tmp_path_factory.mktemp("llamas")
    made = {}
    for per_channel in (False, True):
        model, tok = tiny_llama(per_channel)
        made[per_channel] = save_model_dir(model, tok, root / f"llama-{per_channel}", {"test": "export"}), model, tok
    return made


@pytest.fixture(scope="module")
def cognate(tmp_path_factory):
    """A micro Cognate with thought tokens, packed, saved with a Quiet-STaR thinking head."""
    tok = tokenizer()
    torch.manual_seed(0)
    model = CognateForCausalLM(
        CognateConfig.from_preset(
            "micro", vocab_size=len(tok), eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
        )
    )
    thinking = ThinkingModel(model, ThoughtSettings(), add_thought_tokens(model, tok))
    pack_bitnet(convert_to_bitnet(model)).eval()
    path = save_model_dir(
        model, tok, tmp_path_factory.mktemp("cognate") / "cognate", {"test": "export"}, write_extra=thinking.save_extras
    )
    return path, model, tok


def plain_load(dirs, tok, remote_code=False) -> dict:
    """What a fresh interpreter without agentforge sees of each exported directory (its logits
    on TEXT land in ``logits.npy`` there)."""
    job = {"dirs": [str(d) for d in dirs], "ids": tok(TEXT)["input_ids"], "text": TEXT, "remote_code": remote_code}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(dirs[0].parent / "hf-home")}
    done = subprocess.run(
        [sys.executable, "-c", PLAIN_LOAD, json.dumps(job)], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def logits(model, tok) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([tok(TEXT)["input_ids"]])).logits.float()


def repacked(model, names, per_channel=False):
    """``model`` with each named ``nn.Linear`` turned back into a packed BitLinear: scale = the
    largest |weight| (of the tensor, or of each row), codes = weight / scale."""
    for name in names:
        linear = model.get_submodule(name)
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1) if per_channel else weight.abs().max().reshape(1)
        codes = torch.round(weight / (scale[:, None] if per_channel else scale)).to(torch.int8)
        model.set_submodule(name, BitLinear.from_packed(ops.pack_ternary(codes), scale, weight.shape[1], linear.bias))
    return model


def assert_bf16_close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=BF16, atol=BF16 * float(expected.abs().max()))


def test_hf_export_of_a_llama_loads_with_transformers_alone_and_holds_the_packed_weights(llamas, tmp_path, capsys):
    path, model, tok = llamas[False]
    bf16, fp32 = tmp_path / "bf16", tmp_path / "fp32"
    code, out, err = run_cli(capsys, path, "--to", "hf", bf16)
    assert code == 0, err
    assert "14 ternary layers as bfloat16 nn.Linear" in out and "not exported" not in out
    assert run_cli(capsys, path, "--to", "hf", fp32, "--dtype", "float32")[0] == 0
    assert {p.name for p in bf16.iterdir()} == {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
    }
    assert "quantization_config" not in json.loads((bf16 / "config.json").read_text())
    layers = ternary_layers(model)
    for directory, dtype in ((bf16, torch.bfloat16), (fp32, torch.float32)):
        weights = load_file(directory / "model.safetensors")
        for name, (codes, scale) in layers.items():
            assert torch.equal(weights[f"{name}.weight"], (codes.float() * scale).to(dtype)), name
    packed = logits(model, tok)
    here = AutoModelForCausalLM.from_pretrained(fp32)
    torch.testing.assert_close(
        logits(repacked(AutoModelForCausalLM.from_pretrained(fp32), layers), tok), packed, rtol=0, atol=1e-5
    )

    seen = plain_load([bf16, fp32], tok)
    plain = {d.name: torch.from_numpy(np.load(d / "logits.npy")) for d in (bf16, fp32)}
    torch.testing.assert_close(plain["fp32"], logits(here, tok), rtol=0, atol=1e-5)
    assert_bf16_close(plain["bf16"], plain["fp32"])
    torch.testing.assert_close(plain["bf16"], packed, rtol=0, atol=QUANTIZED * float(packed.abs().max()))
    for directory in (bf16, fp32):
        assert seen[str(directory)]["class"] == "transformers.models.llama.modeling_llama"
        assert seen[str(directory)]["ids"] == tok(TEXT)["input_ids"]
        assert (seen[str(directory)]["eos"], seen[str(directory)]["pad"]) == (tok.eos_token_id, tok.pad_token_id)
        assert seen[str(directory)]["chat"] == tok.apply_chat_template(
            [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
        )
    assert seen[str(bf16)]["dtype"] == "torch.bfloat16"


def llama_cpp_rows(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's Q/K row order (convert_hf_to_gguf.py, LlamaModel.permute), written out again here."""
    half = rows.shape[0] // heads // 2
    order = torch.arange(rows.shape[0]).reshape(heads, 2, half).transpose(1, 2).reshape(-1)
    return rows[order]


def field(reader: gguf.GGUFReader, key: str):
    return reader.fields[key].contents()


@pytest.mark.parametrize("per_channel,ternary", [(False, "tq2_0"), (False, "tq1_0"), (True, "tq2_0"), (True, "tq1_0")])
def test_gguf_export_holds_the_exact_ternary_codes_and_the_llama_metadata(
    llamas, tmp_path, capsys, per_channel, ternary
):
    path, model, tok = llamas[per_channel]
    dest = tmp_path / "tiny.gguf"
    code, out, err = run_cli(capsys, path, "--to", "gguf", dest, "--ternary", ternary)
    assert code == 0, err
    qtype = gguf.GGMLQuantizationType[ternary.upper()]
    assert f"14 {qtype.name}" in out
    reader = gguf.GGUFReader(dest)
    config = model.config
    tensors = {t.name: t for t in reader.tensors}

    names = {
        "token_embd.weight": "model.embed_tokens.weight",
        "output_norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight",
    }
    parts = {
        "attn_q": "self_attn.q_proj",
        "attn_k": "self_attn.k_proj",
        "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj",
        "ffn_gate": "mlp.gate_proj",
        "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
        "attn_norm": "input_layernorm",
        "ffn_norm": "post_attention_layernorm",
    }
    for i in range(config.num_hidden_layers):
        names.update({f"blk.{i}.{g}.weight": f"model.layers.{i}.{h}.weight" for g, h in parts.items()})
    assert set(tensors) == set(names)
    state = model.state_dict()
    layers = ternary_layers(model)
    heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}
    for name, hf_name in names.items():
        tensor, layer = tensors[name], hf_name.removesuffix(".weight")
        head_count = heads.get(name.split(".")[2]) if name.startswith("blk.") else None
        if layer in layers:
            codes, scale = layers[layer]
            assert tensor.tensor_type == qtype and list(tensor.shape) == [codes.shape[1], codes.shape[0]]
            expected = codes.float() * scale.half().float().reshape(-1, 1)  # the scale rounded to f16
            if head_count:
                expected = llama_cpp_rows(expected, head_count)
            values = torch.from_numpy(gguf.quants.dequantize(tensor.data, qtype))
            assert torch.equal(values, expected), name
            continue
        weight = state[hf_name]
        kind = gguf.GGMLQuantizationType.F32 if weight.dim() == 1 else gguf.GGMLQuantizationType.F16
        assert tensor.tensor_type == kind and list(tensor.shape) == list(reversed(weight.shape)), name
        assert torch.equal(
            torch.from_numpy(np.array(tensor.data)).reshape(weight.shape),
            weight.to(torch.float32 if weight.dim() == 1 else torch.float16),
        ), name

    arch = "llama"
    assert field(reader, "general.architecture") == arch
    assert field(reader, "general.file_type") == getattr(gguf.LlamaFileType, f"MOSTLY_{qtype.name}")
    assert field(reader, f"{arch}.context_length") == 128
    assert field(reader, f"{arch}.embedding_length") == 256
    assert field(reader, f"{arch}.feed_forward_length") == 512
    assert field(reader, f"{arch}.block_count") == 2
    assert field(reader, f"{arch}.attention.head_count") == 4
    assert field(reader, f"{arch}.attention.head_count_kv") == 2
    assert field(reader, f"{arch}.rope.dimension_count") == 64
    assert field(reader, f"{arch}.rope.freq_base") == 10000.0
    assert field(reader, f"{arch}.attention.layer_norm_rms_epsilon") == pytest.approx(1e-6)
    assert field(reader, f"{arch}.vocab_size") == config.vocab_size == len(tok) + 16
    tokens = field(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == config.vocab_size
    assert tokens[: len(tok)] == tok.convert_ids_to_tokens(list(range(len(tok))))
    assert tokens[len(tok)] == f"[PAD{len(tok)}]"
    types = field(reader, "tokenizer.ggml.token_type")
    assert types[tok.eos_token_id] == types[tok.pad_token_id] == gguf.TokenType.CONTROL
    assert types[len(tok) - 1] == gguf.TokenType.NORMAL and types[-1] == gguf.TokenType.UNUSED
    assert field(reader, "tokenizer.ggml.model") == "gpt2"
    assert field(reader, "tokenizer.ggml.pre") == "starcoder"  # digits one by one, then GPT-2's regex
    assert len(field(reader, "tokenizer.ggml.merges")) == len(
        json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    )
    assert field(reader, "tokenizer.ggml.bos_token_id") == tok.bos_token_id
    assert field(reader, "tokenizer.ggml.eos_token_id") == tok.eos_token_id
    assert field(reader, "tokenizer.ggml.padding_token_id") == tok.pad_token_id
    assert field(reader, "tokenizer.ggml.add_bos_token") is False
    assert field(reader, "tokenizer.chat_template") == CHAT_TEMPLATE


@pytest.mark.parametrize("per_channel", [False, True])
def test_gguf_rows_off_the_ternary_block_go_in_exactly_as_q4_0(tmp_path, capsys, per_channel):
    # K = 96 and 160: multiples of Q4_0's 32-weight block but not of the ternary types' 256, as
    # SmolLM2's 576 is not; the layers must still read back as codes x f16(scale), not as F16
    model, tok = tiny_llama(per_channel, hidden=96, intermediate=160, layers=1, extra_vocab=0)
    path = save_model_dir(model, tok, tmp_path / "llama", {"test": "export"})
    code, out, err = run_cli(capsys, path, "--to", "gguf", tmp_path / "odd.gguf")
    assert code == 0, err
    assert "7 Q4_0" in out and "as Q4_0: 7 ternary layers" in out and "TQ2_0" not in out
    reader = gguf.GGUFReader(tmp_path / "odd.gguf")
    assert field(reader, "general.file_type") == gguf.LlamaFileType.MOSTLY_Q4_0
    tensors = {t.name: t for t in reader.tensors}
    heads = {"q_proj": model.config.num_attention_heads, "k_proj": model.config.num_key_value_heads}
    gguf_names = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output"}
    gguf_names.update({"gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"})
    for layer, (codes, scale) in ternary_layers(model).items():
        part = layer.rsplit(".", 1)[1]
        tensor = tensors[f"blk.0.{gguf_names[part]}.weight"]
        expected = codes.float() * scale.half().float().reshape(-1, 1)
        if part in heads:
            expected = llama_cpp_rows(expected, heads[part])
        assert tensor.tensor_type == gguf.GGMLQuantizationType.Q4_0, layer
        assert torch.equal(torch.from_numpy(gguf.quants.dequantize(tensor.data, tensor.tensor_type)), expected), layer


def test_hf_export_of_cognate_ships_its_code_and_names_what_it_leaves_behind(cognate, tmp_path, capsys):
    path, model, tok = cognate
    dest = tmp_path / "cognate-hf"
    code, out, err = run_cli(capsys, path, "--to", "hf", dest, "--dtype", "float32")
    assert code == 0, err
    assert "trust_remote_code=True" in out
    assert out.strip().splitlines()[-1] == "not exported: thinking head; use agentforge.load for them"
    assert json.loads((dest / "config.json").read_text())["auto_map"] == {
        "AutoConfig": "configuration_cognate.CognateConfig",
        "AutoModelForCausalLM": "modeling_cognate.CognateForCausalLM",
    }
    for name in ("configuration_cognate.py", "modeling_cognate.py"):
        assert (
            "import agentforge" not in (dest / name).read_text() and "from agentforge" not in (dest / name).read_text()
        )

    layers = ternary_layers(model)
    assert any("memory_gate" in name for name in layers)  # a ternary layer with a bias
    # in this process transformers finds agentforge's registered Cognate; the shipped code is loaded
    # in a fresh interpreter without agentforge below (plain_load)
    here = AutoModelForCausalLM.from_pretrained(dest, trust_remote_code=True)
    packed = logits(model, tok)
    torch.testing.assert_close(
        logits(repacked(AutoModelForCausalLM.from_pretrained(dest, trust_remote_code=True), layers), tok),
        packed,
        rtol=0,
        atol=1e-5,
    )

    seen = plain_load([dest], tok, remote_code=True)[str(dest)]
    assert seen["class"].startswith("transformers_modules.") and seen["class"].endswith("modeling_cognate")
    assert "trust_remote_code=True" in seen["refusal"]
    assert seen["ids"] == tok(TEXT)["input_ids"] and seen["pad"] == tok.pad_token_id
    plain = torch.from_numpy(np.load(dest / "logits.npy"))
    torch.testing.assert_close(plain, logits(here, tok), rtol=0, atol=1e-5)
    torch.testing.assert_close(plain, packed, rtol=0, atol=QUANTIZED * float(packed.abs().max()))


def test_the_hf_export_loads_back_into_agentforge(llamas, tmp_path, capsys):
    path, model, tok = llamas[True]
    assert run_cli(capsys, path, "--to", "hf", tmp_path / "hf", "--dtype", "float32")[0] == 0
    agent = agentforge.load(tmp_path / "hf")
    assert agent.parts == {"experts": False, "thinking": False}
    assert agent.tokenizer.chat_template == CHAT_TEMPLATE
    layers = ternary_layers(model)
    state = agent.lm.state_dict()
    for name, (codes, scale) in layers.items():  # per-row scales
        assert torch.equal(state[f"{name}.weight"], codes.float() * scale.reshape(-1, 1)), name
    torch.testing.assert_close(
        logits(repacked(agent.lm, layers, per_channel=True), tok), logits(model, tok), rtol=0, atol=1e-5
    )


def test_bad_input_is_one_line_and_exit_code_2(llamas, cognate, tmp_path, capsys):
    llama, cognate_path = llamas[False][0], cognate[0]
    (tmp_path / "notes.txt").write_text("not a model")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    cases = {
        "unknown format": ([llama, "--to", "onnx", tmp_path / "out"], "--to onnx: unknown format"),
        "cognate to gguf": ([cognate_path, "--to", "gguf", tmp_path / "out.gguf"], "Llama-architecture"),
        "missing path": ([tmp_path / "nowhere", "--to", "hf", tmp_path / "out"], "no such file or directory"),
        "a text file": ([tmp_path / "notes.txt", "--to", "hf", tmp_path / "out"], "not a model artifact"),
        "a plain directory": ([tmp_path / "taken", "--to", "hf", tmp_path / "out"], "not a model directory"),
        "destination exists": ([llama, "--to", "hf", tmp_path / "taken"], "pass --force"),
        "option of the other format": (
            [llama, "--to", "hf", tmp_path / "out", "--ternary", "tq1_0"],
            "--ternary does not apply to --to hf",
        ),
        "unknown ternary type": ([llama, "--to", "gguf", tmp_path / "out.gguf", "--ternary", "q4_0"], "--ternary q4_0"),
    }
    for case, (args, message) in cases.items():
        code, out, err = run_cli(capsys, *args)
        assert code == 2, (case, err)
        assert len(err.strip().splitlines()) == 1 and message in err, (case, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "taken"]  # nothing written
    assert [p.name for p in (tmp_path / "taken").iterdir()] == ["keep.txt"]


@pytest.mark.slow
def test_llama_cpp_runs_the_gguf_as_agentforge_does(llamas, tmp_path, capsys):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    path, model, tok = llamas[False]
    dest = tmp_path / "tiny.gguf"
    assert run_cli(capsys, path, "--to", "gguf", dest)[0] == 0
    llm = llama_cpp.Llama(model_path=str(dest), n_ctx=128, n_threads=1, verbose=False)
    ids = tok(TEXT)["input_ids"]
    assert llm.tokenize(TEXT.encode(), add_bos=False, special=False) == ids
    tokens, expected = list(ids), list(ids)
    llm.eval(tokens)
    for _ in range(8):  # greedy on both sides, neither stopping at eos
        tokens.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval(tokens[-1:])
        with torch.no_grad():
            expected.append(int(model(torch.tensor([expected])).logits[0, -1].argmax()))
    assert tokens == expected
