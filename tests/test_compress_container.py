"""The compressed-model container and its loader: exact round trips of real micro models (a
converted Cognate and a tiny Llama), byte accounting equal to the file, and clear refusals of
damaged files."""
import hashlib
import json
import os
import zlib

import pytest
import torch

from agentforge.artifacts import CorruptArtifact, load_model_dir, save_model_dir
from agentforge.compress import (Container, Raw, TensorRecord, VPTQ, carried_files, container, decode, load,
                                 model_tensors, read_container, serialize, unpack, write_container)
from agentforge.compress.ternary import smallest
from agentforge.nn import BitLinear, convert_to_bitnet, pack_bitnet

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def latent_dir(cognate_micro, tmp_path_factory):
    """The micro Cognate trunk converted to BitNet (latent, training state), with an extra file."""
    model, tokenizer, metadata = load_model_dir(cognate_micro[1].artifacts["trunk"])
    convert_to_bitnet(model)
    path = tmp_path_factory.mktemp("latent") / "model"
    save_model_dir(model, tokenizer, path, {"phase": "test", "parents": []})
    return path


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A tiny Llama with an untied LM head, converted to BitNet; no tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    model = convert_to_bitnet(LlamaForCausalLM(config))
    path = tmp_path_factory.mktemp("llama") / "model"
    save_model_dir(model, None, path, {"phase": "test", "parents": []})
    return path


def exact_container(model_dir, lossy_embedding=False) -> Container:
    model = load_model_dir(model_dir)[0]
    records = []
    for slot in model_tensors(model):
        if slot.group == "ternary":
            encoded = smallest(slot.tensor, slot.per_channel)
        elif lossy_embedding and slot.group == "embedding":
            encoded = VPTQ(4, (16,), iterations=4).encode(slot.tensor)
        else:
            encoded = Raw("float32").encode(slot.tensor)
        records.append(TensorRecord(slot.names, slot.group, encoded))
    return Container(records, carried_files(model_dir), {"phase": "compression"})


def logits(model, vocab: int) -> torch.Tensor:
    ids = torch.randint(vocab, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("which", ["latent_dir", "llama_dir"])
def test_lossless_container_reproduces_the_model_on_the_kernels(which, request, tmp_path):
    model_dir = request.getfixturevalue(which)
    reference = load_model_dir(model_dir)[0]
    write_container(tmp_path / "m.afz", exact_container(model_dir))
    model, _, metadata = load(tmp_path / "m.afz")
    assert metadata["phase"] == "compression"
    layers = [m for m in model.modules() if isinstance(m, BitLinear)]
    assert layers and all(m.state == "packed" for m in layers)
    vocab = reference.config.vocab_size
    assert torch.allclose(logits(model, vocab), logits(reference, vocab), atol=1e-5)


@pytest.mark.parametrize("storage", ["base3", None])
def test_container_without_a_rans_coded_layer_loads(storage, tmp_path):
    """Float only (no ternary layer at all), or ternary layers in base 3 only: no rANS stream to decode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from agentforge.compress import Ternary

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2)
    reference = LlamaForCausalLM(config) if storage is None else convert_to_bitnet(LlamaForCausalLM(config))
    save_model_dir(reference, None, tmp_path / "model", {"phase": "test", "parents": []})
    records = [TensorRecord(slot.names, slot.group, Raw("float32").encode(slot.tensor) if slot.group != "ternary"
                            else Ternary(storage, slot.per_channel).encode(slot.tensor))
               for slot in model_tensors(reference)]
    write_container(tmp_path / "m.afz", Container(records, carried_files(tmp_path / "model"), {}))
    model = load(tmp_path / "m.afz")[0]
    assert torch.allclose(logits(model, 96), logits(reference.eval(), 96), atol=1e-5)


def test_lossy_tensor_loads_as_its_decoded_value(latent_dir, tmp_path):
    from torch.func import functional_call

    reference = load_model_dir(latent_dir)[0]
    box = exact_container(latent_dir, lossy_embedding=True)
    write_container(tmp_path / "m.afz", box)
    embedding = next(r for r in box.tensors if r.group == "embedding")
    decoded = decode(embedding.encoded)
    assert not torch.equal(decoded, reference.model.embed_tokens.weight)
    vocab = reference.config.vocab_size
    ids = torch.randint(vocab, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = functional_call(reference, {"model.embed_tokens.weight": decoded}, (), {"input_ids": ids}).logits
    assert torch.allclose(logits(load(tmp_path / "m.afz")[0], vocab), expected, atol=1e-5)


def test_tied_embedding_and_lm_head_are_stored_once(latent_dir, llama_dir):
    cognate = {tuple(r.names): r.group for r in exact_container(latent_dir).tensors}
    assert cognate[("model.embed_tokens.weight", "lm_head.weight")] == "embedding"
    llama = {r.names[0]: r.group for r in exact_container(llama_dir).tensors}
    assert llama["model.embed_tokens.weight"] == "embedding" and llama["lm_head.weight"] == "lm_head"


def test_byte_accounting_equals_the_file(latent_dir, tmp_path):
    box = exact_container(latent_dir)
    accounting = write_container(tmp_path / "m.afz", box)
    data = (tmp_path / "m.afz").read_bytes()
    assert accounting["total"] == len(data) == os.path.getsize(tmp_path / "m.afz")
    assert accounting["total"] == (accounting["header"] + accounting["manifest"] + sum(accounting["tensors"])
                                   + accounting["files"] + accounting["trailer"])
    manifest = json.loads(zlib.decompress(data[16:16 + accounting["manifest"]]))
    for record, entry, nbytes in zip(box.tensors, manifest["tensors"], accounting["tensors"]):
        assert sum(part[4] for part in entry["parts"]) == record.encoded.nbytes == nbytes


def test_carried_files_and_extra_files_survive_unpacking(latent_dir, tmp_path):
    box = exact_container(latent_dir)
    box.files["experts/router.json"] = b'{"experts": 2}'
    write_container(tmp_path / "m.afz", box)
    out = unpack(tmp_path / "m.afz", tmp_path / "unpacked")
    assert (out / "experts" / "router.json").read_bytes() == b'{"experts": 2}'
    assert json.loads((out / "config.json").read_text())["quantization_config"]["state"] == "packed"
    model, tokenizer, _ = load_model_dir(out)  # a verified model directory
    assert tokenizer is not None and tokenizer.decode(tokenizer("def f():")["input_ids"]).endswith("def f():")


def test_loader_refuses_damaged_files(latent_dir, tmp_path):
    data, _ = serialize(exact_container(latent_dir))
    cases = {"truncated": data[:-100], "checksum": data[:5000] + bytes([data[5000] ^ 1]) + data[5001:],
             "not an agentforge": b"PK\x03\x04" + data[4:], "trailing bytes": data + b"\0",
             "shorter than any": data[:20]}
    for message, damaged in cases.items():
        path = tmp_path / f"{message.split()[0]}.afz"
        path.write_bytes(damaged)
        with pytest.raises(CorruptArtifact, match=message):
            load(path)
    with pytest.raises(CorruptArtifact, match="cannot read"):
        read_container(tmp_path / "missing.afz")


def test_container_refuses_a_manifest_that_lies(latent_dir):
    data, accounting = serialize(exact_container(latent_dir))
    manifest = json.loads(zlib.decompress(data[16:16 + accounting["manifest"]]))
    manifest["tensors"][0]["parts"][0][4] += 1  # one byte longer than its dtype and shape allow
    forged = zlib.compress(json.dumps(manifest).encode())
    body = container.HEADER.pack(container.MAGIC, 1, len(forged)) + forged + data[16 + accounting["manifest"]:-32]
    with pytest.raises(CorruptArtifact, match="bytes,"):
        container.parse(body + hashlib.sha256(body).digest())


def test_model_tensors_needs_the_latent_model(latent_dir):
    model = pack_bitnet(load_model_dir(latent_dir)[0])
    with pytest.raises(ValueError, match="is packed"):
        model_tensors(model)


def test_ternary_records_must_use_the_ternary_codec(latent_dir, tmp_path):
    box = exact_container(latent_dir)
    record = next(r for r in box.tensors if r.group == "ternary")
    record.encoded = Raw("float32").encode(torch.zeros(record.encoded.shape))
    write_container(tmp_path / "m.afz", box)
    with pytest.raises(CorruptArtifact, match="stored with codec 'raw'"):
        load(tmp_path / "m.afz")


def test_carried_file_names_cannot_leave_the_model_directory():
    data, _ = serialize(Container([], {"../evil.json": b"{}"}, {}))
    with pytest.raises(CorruptArtifact, match="outside the model directory"):
        container.parse(data)
