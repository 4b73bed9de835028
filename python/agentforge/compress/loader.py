"""From a container back to a runnable model: ternary layers as packed ``BitLinear`` (the
kernels), every other tensor decoded by its codec, the carried files (config, tokenizer,
generation config, any extra files such as expert vectors) restored next to them.

    model, tokenizer, metadata = agentforge.compress.load("model.afz")
    agentforge.compress.unpack("model.afz", "unpacked/")   # an HF model directory (packed state)
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

from agentforge import ops
from agentforge.artifacts import MANIFEST, CorruptArtifact, atomic_directory, sha256_dir
from agentforge.compress.codec import codec_of
from agentforge.compress.container import Container, read_container
from agentforge.compress.ternary import Ternary, codes_and_scales

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
# Written afresh from the encoded tensors (weights) or the container's metadata (manifest).
NOT_CARRIED = (WEIGHTS, "model.safetensors.index.json", MANIFEST)


def carried_files(model_dir: str | os.PathLike) -> dict[str, bytes]:
    """Every file of a model directory except its weights and agentforge.json, by relative path."""
    root = Path(model_dir)
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in files
        if p.name not in NOT_CARRIED and not (p.name.startswith("model-") and p.suffix == ".safetensors")
    }


def decoded_state_dict(container: Container, where: str = "container") -> dict[str, torch.Tensor]:
    """The state dict of the packed model: ``<layer>.weight_packed`` / ``<layer>.weight_scale`` for
    every ternary layer, the decoded fp32 tensor under each name of every other record."""
    ternary = [r for r in container.tensors if r.group == "ternary"]
    state = {}
    try:
        for record in ternary:
            if record.encoded.kind != Ternary.kind:
                raise ValueError(f"ternary layer {record.names[0]} stored with codec {record.encoded.kind!r}")
        for record, (codes, scale) in zip(ternary, codes_and_scales([r.encoded for r in ternary])):
            for name in record.names:
                layer = name.removesuffix(".weight")
                state[f"{layer}.weight_packed"] = ops.pack_ternary(codes)
                state[f"{layer}.weight_scale"] = scale.clone()
        for record in container.tensors:
            if record.group != "ternary":
                tensor = codec_of(record.encoded).decode(record.encoded).contiguous()
                state.update({name: tensor.clone() for name in record.names})
    except (ValueError, RuntimeError, KeyError, TypeError, IndexError) as e:
        raise CorruptArtifact(f"{where}: a tensor does not decode ({type(e).__name__}: {e})") from None
    return state


def _packed_config(container: Container, where: str) -> bytes:
    """config.json with the BitLinear layers described in packed state (their stored form)."""
    if CONFIG not in container.files:
        raise CorruptArtifact(f"{where}: no {CONFIG} among the carried files")
    try:
        config = json.loads(container.files[CONFIG])
    except (ValueError, RecursionError) as e:
        raise CorruptArtifact(f"{where}: the carried {CONFIG} is unreadable ({type(e).__name__}: {e})") from None
    if not isinstance(config, dict):
        raise CorruptArtifact(f"{where}: the carried {CONFIG} is a JSON {type(config).__name__}, not an object")
    if any(record.group == "ternary" for record in container.tensors):
        quantization = config.get("quantization_config")
        if not isinstance(quantization, dict):
            raise CorruptArtifact(f"{where}: ternary layers are stored but {CONFIG} has no quantization_config")
        quantization["state"] = "packed"
    return (json.dumps(config, indent=2) + "\n").encode()


def unpack(path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write the model stored at ``path`` as a Hugging Face model directory at ``out_dir``
    (atomically; with an ``agentforge.json`` so that ``load_model_dir`` verifies it)."""
    from safetensors.torch import save_file

    container = read_container(path)
    state = decoded_state_dict(container, str(path))
    with atomic_directory(out_dir) as tmp:
        for name, data in container.files.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_bytes(data)
        (tmp / CONFIG).write_bytes(_packed_config(container, str(path)))
        save_file(state, tmp / WEIGHTS, metadata={"format": "pt"})
        manifest = {
            "format": 1,
            "metadata": {**container.metadata, "unpacked_from": str(path)},
            "files": sha256_dir(tmp),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return Path(out_dir)


def load(path: str | os.PathLike, **model_kwargs):
    """``(model, tokenizer or None, metadata)`` from a compressed model: the ternary layers
    packed on the kernels, the rest decoded. Raises ``CorruptArtifact`` for a damaged file."""
    from agentforge.artifacts import load_model_dir

    with tempfile.TemporaryDirectory(prefix="agentforge-unpack-") as tmp:
        model, tokenizer, metadata = load_model_dir(unpack(path, Path(tmp) / "model"), **model_kwargs)
    metadata.pop("unpacked_from", None)
    return model, tokenizer, metadata
