"""The compressed-model container and its loader: exact round trips of real micro models (a
converted Cognate and a tiny Llama), byte accounting equal to the file, and clear refusals of
damaged files."""

import hashlib
import json
import lzma
import os
import struct
import time
import zlib

import pytest
import torch

from agentforge.artifacts import CorruptArtifact, load_model_dir, save_model_dir
from agentforge.compress import (
    VPTQ,
    Container,
    Raw,
    TensorRecord,
    carried_files,
    container,
    decode,
    load,
    model_tensors,
    read_container,
    serialize,
    unpack,
    write_container,
)
from agentforge.compress.ternary import smallest
from agentforge.eval import peak_memory_bytes
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
    config = LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
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
    config = LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    reference = LlamaForCausalLM(config) if storage is None else convert_to_bitnet(LlamaForCausalLM(config))
    save_model_dir(reference, None, tmp_path / "model", {"phase": "test", "parents": []})
    records = [
        TensorRecord(
            slot.names,
            slot.group,
            Raw("float32").encode(slot.tensor)
            if slot.group != "ternary"
            else Ternary(storage, slot.per_channel).encode(slot.tensor),
        )
        for slot in model_tensors(reference)
    ]
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
    assert accounting["total"] == (
        accounting["header"]
        + accounting["manifest"]
        + sum(accounting["tensors"])
        + accounting["files"]
        + accounting["trailer"]
    )
    manifest = json.loads(zlib.decompress(data[16 : 16 + accounting["manifest"]]))
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
    cases = {
        "truncated": data[:-100],
        "checksum": data[:5000] + bytes([data[5000] ^ 1]) + data[5001:],
        "not an agentforge": b"PK\x03\x04" + data[4:],
        "trailing bytes": data + b"\0",
        "shorter than any": data[:20],
    }
    for message, damaged in cases.items():
        path = tmp_path / f"{message.split()[0]}.afz"
        path.write_bytes(damaged)
        with pytest.raises(CorruptArtifact, match=message):
            load(path)
    with pytest.raises(CorruptArtifact, match="cannot read"):
        read_container(tmp_path / "missing.afz")


def test_container_refuses_a_manifest_that_lies(latent_dir):
    data, accounting = serialize(exact_container(latent_dir))
    manifest = json.loads(zlib.decompress(data[16 : 16 + accounting["manifest"]]))
    manifest["tensors"][0]["parts"][0][4] += 1  # one byte longer than its dtype and shape allow
    forged = zlib.compress(json.dumps(manifest).encode())
    body = container.HEADER.pack(container.MAGIC, 1, len(forged)) + forged + data[16 + accounting["manifest"] : -32]
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


# ---------------------------------------------------------------------------------------------
# hostile containers: decompression bombs and malformed manifests (a hostile writer computes the
# checksum too, so each is a well-formed container up to what it declares)


def zlib_zeros(mib: int) -> bytes:
    """A zlib stream of ``mib`` MiB of zeros, ~1 KB per MiB: one compressed MiB (byte-aligned by a
    full flush, so it needs nothing before it) repeated, an empty final block and the Adler-32."""
    compressor = zlib.compressobj(9)
    first = compressor.compress(bytes(1 << 20)) + compressor.flush(zlib.Z_FULL_FLUSH)
    again = compressor.compress(bytes(1 << 20)) + compressor.flush(zlib.Z_FULL_FLUSH)
    end = compressor.flush()[:-4]
    adler = (((mib << 20) % 65521) << 16) | 1  # all zeros: A stays 1, B grows by 1 a byte
    return first + again * (mib - 1) + end + struct.pack(">I", adler)


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    return bytes(out + bytes([n]))


def xz_zeros(mib: int, block_mib: int = 16) -> bytes:
    """An .xz stream of ``mib`` MiB of zeros, ~150 bytes per MiB: one LZMA2 block repeated (xz
    blocks are independent), with the index and footer that list them all."""
    crc = lambda data: struct.pack("<I", zlib.crc32(data))
    raw = lzma.compress(
        bytes(block_mib << 20), format=lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2, "preset": 0}]
    )
    flags = b"\0\0"  # no integrity check
    # block flags (one filter), LZMA2 with an 8 MiB dictionary, padding to a multiple of 4 bytes with the
    # size byte in front and the CRC32 behind; the size byte says (bytes / 4) - 1
    header = b"\0\x21\x01\x16\0\0\0"
    header = bytes([(1 + len(header) + 4) // 4 - 1]) + header
    header += crc(header)
    count = mib // block_mib
    index = b"\0" + _varint(count) + (_varint(len(header) + len(raw)) + _varint(block_mib << 20)) * count
    index += b"\0" * (-len(index) % 4)
    index += crc(index)
    backward = struct.pack("<I", len(index) // 4 - 1) + flags
    return (
        b"\xfd7zXZ\0"
        + flags
        + crc(flags)
        + (header + raw + b"\0" * (-len(raw) % 4)) * count
        + index
        + crc(backward)
        + backward
        + b"YZ"
    )


def test_bomb_builders_make_what_they_say():
    assert zlib.decompress(zlib_zeros(3)) == bytes(3 << 20)
    assert lzma.decompress(xz_zeros(4, block_mib=1)) == bytes(4 << 20)


def forged(manifest, payload: bytes = b"") -> bytes:
    """A container of ``manifest`` (JSON, or bytes taken as the compressed manifest) and ``payload``."""
    packed = manifest if isinstance(manifest, bytes) else zlib.compress(json.dumps(manifest).encode())
    body = container.HEADER.pack(container.MAGIC, 1, len(packed)) + packed + payload
    return body + hashlib.sha256(body).digest()


def manifest_of(payload: bytes, files=(), tensors=()) -> dict:
    return {
        "format": "agentforge.compress",
        "version": 1,
        "payload_bytes": len(payload),
        "tensors": list(tensors),
        "files": list(files),
        "metadata": {},
    }


def refused(data: bytes, match: str) -> str:
    """The one-line CorruptArtifact that parsing ``data`` raises, checked to come within a second
    and 64 MiB of memory."""

    def parse():
        with pytest.raises(CorruptArtifact, match=match) as refusal:
            container.parse(data, "m.afz")
        return str(refusal.value)

    _, idle = peak_memory_bytes(lambda: None, device="cpu")
    started = time.perf_counter()
    message, peak = peak_memory_bytes(parse, device="cpu")
    assert time.perf_counter() - started < 1.0
    assert peak - idle < 64 << 20
    assert "\n" not in message and message.startswith("m.afz: ")
    return message


def test_a_zlib_bomb_manifest_is_refused_at_its_cap():
    bomb = zlib_zeros(1024)  # 1 GiB of zeros in 1 MB
    assert len(bomb) < 1_100_000
    refused(forged(bomb), f"the manifest inflates to more than {container.MAX_MANIFEST_BYTES} bytes")


def test_an_lzma_bomb_file_is_refused_whatever_length_it_declares():
    bomb = xz_zeros(2048)  # 2 GiB of zeros in ~310 KB
    assert len(bomb) < 400_000
    honest = manifest_of(bomb, files=[["tokenizer.json", "lzma", 0, len(bomb), 2 << 30]])
    refused(forged(honest, bomb), f"declares {2 << 30} bytes stored in {len(bomb)}, more than 64x")
    lying = manifest_of(bomb, files=[["tokenizer.json", "lzma", 0, len(bomb), 1000]])
    refused(forged(lying, bomb), "file 'tokenizer.json' inflates to more than 1000 bytes")


def test_carried_files_sharing_one_span_cannot_add_up_to_a_bomb():
    stored = lzma.compress(bytes(60_000))
    each = container.MAX_INFLATION * len(stored)  # each file alone within the per-file bound
    entries = [[f"f{i}.bin", "lzma", 0, len(stored), each] for i in range(500)]
    refused(forged(manifest_of(stored, files=entries), stored), f"the carried files declare {500 * each} bytes")


def test_tensors_cannot_declare_more_weights_than_the_file_can_hold():
    huge = {
        "names": ["w"],
        "group": "rest",
        "codec": "raw",
        "params": {"dtype": "float16"},
        "shape": [1 << 20, 1 << 20],
        "parts": [],
    }
    refused(forged(manifest_of(b"", tensors=[huge])), "the tensors declare 1099511627776 weights")
    huge["shape"] = [-1, 4]
    refused(forged(manifest_of(b"", tensors=[huge])), r"shape \[-1, 4\], not a list of sizes")


@pytest.mark.parametrize(
    "manifest, message",
    [
        ([1, 2], "the manifest is a JSON list, not an object"),
        ({"payload_bytes": "0"}, "payload_bytes is '0', not a byte count"),
        (b"x\x9c\xcb", "the manifest is a truncated compressed stream"),
        (zlib.compress(b"[" * 100_000), "the manifest is unreadable"),
        (zlib.compress(b"\xff{}"), "the manifest is unreadable"),
    ],
)
def test_malformed_manifests_are_refused_in_one_line(manifest, message):
    refused(forged(manifest), message)


def test_a_file_too_compressible_for_a_reader_is_stored_raw():
    zeros = bytes(1 << 20)  # lzma would shrink it ~5000x, beyond what a reader accepts
    data, accounting = serialize(Container([], {"zeros.bin": zeros}, {}))
    assert accounting["file_bytes"]["zeros.bin"] == len(zeros)
    assert container.parse(data).files["zeros.bin"] == zeros


def test_a_carried_config_that_is_not_a_json_object_is_refused(tmp_path):
    write_container(tmp_path / "m.afz", Container([], {"config.json": b"[1, 2]"}, {}))
    with pytest.raises(CorruptArtifact, match="the carried config.json is a JSON list, not an object"):
        load(tmp_path / "m.afz")
