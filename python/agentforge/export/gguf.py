"""``agentforge export ARTIFACT --to gguf FILE``: a llama.cpp GGUF of a Llama-architecture model.

Tensors, named as llama.cpp's Llama names them (``gguf.get_tensor_name_map``):

* each ternary (BitLinear) matrix as TQ2_0 (2 bits a weight, default) or TQ1_0 (1.69 bits),
  written from its exact codes and scale (``ternary_tensor`` explains how the scale maps); one
  whose rows are not a multiple of those types' 256-weight block (SmolLM2's K = 576) as Q4_0,
  still exact (``q4_0_tensor``), and only where rows are not a multiple of 32 either, as F16;
* embeddings, the output matrix and any other matrix as F16; norms, biases and RoPE factors
  (1-D) as F32, as llama.cpp's own converter writes them;
* the Q and K rows permuted from Hugging Face's rotate-half RoPE layout to llama.cpp's
  interleaved pairs, as convert_hf_to_gguf.py does for Llama.

Metadata: what convert_hf_to_gguf.py writes for a Llama (context length, sizes, head counts,
head size, RoPE base and scaling, RMS norm epsilon, vocabulary size) and the tokenizer:
byte-level BPE (llama.cpp's "gpt2" model) with its tokens, token types, merges, special token
ids, whether bos/eos are added, and the chat template. llama.cpp re-implements each known
pre-tokenizer by name, so the HF pre-tokenizer is matched to one (``PRE_TOKENIZERS``); any
other tokenizer is refused rather than written to tokenize differently.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections import Counter
from pathlib import Path

import gguf
import numpy as np
import torch

from agentforge.errors import ConfigError
from agentforge.export.source import dequantized, ternary_layers

LLAMA = "llama"
TERNARY_TYPES = {
    "tq2_0": (gguf.GGMLQuantizationType.TQ2_0, gguf.LlamaFileType.MOSTLY_TQ2_0),
    "tq1_0": (gguf.GGMLQuantizationType.TQ1_0, gguf.LlamaFileType.MOSTLY_TQ1_0),
}
SPECIAL_TOKENS = ("bos", "eos", "unk", "sep", "pad", "mask")

_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False}
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# HF pre-tokenizer (tokenizer.json, "trim_offsets" left out: it changes offsets, not tokens) ->
# llama.cpp's tokenizer.ggml.pre, the name of its own implementation of the same splitting.
PRE_TOKENIZERS = {
    # agentforge.data.train_tokenizer: each digit alone, then GPT-2's byte-level regex
    "starcoder": {
        "type": "Sequence",
        "pretokenizers": [{"type": "Digits", "individual_digits": True}, {**_BYTE_LEVEL, "use_regex": True}],
    },
    "gpt-2": {**_BYTE_LEVEL, "use_regex": True},
    "llama-bpe": {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": _LLAMA3_SPLIT}, "behavior": "Isolated", "invert": False},
            {**_BYTE_LEVEL, "use_regex": False},
        ],
    },
}


def _without_offsets(spec):
    if isinstance(spec, dict):
        return {k: _without_offsets(v) for k, v in spec.items() if k != "trim_offsets"}
    if isinstance(spec, list):
        return [_without_offsets(v) for v in spec]
    return spec


def pre_tokenizer_type(tokenizer) -> str:
    """llama.cpp's name for ``tokenizer``'s pre-tokenizer; ``ConfigError`` when llama.cpp has
    none that splits text the same way, or the tokenizer is not a byte-level BPE."""
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError(
            f"GGUF export needs a fast (tokenizer.json) tokenizer; this one is {type(tokenizer).__name__}"
        )
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    if (
        spec["model"].get("type") != "BPE"
        or (spec.get("decoder") or {}).get("type") != "ByteLevel"
        or spec.get("normalizer") is not None
    ):
        raise ConfigError(
            "GGUF export writes byte-level BPE tokenizers without a normalizer (agentforge's, GPT-2's, "
            f"Llama 3's); this one is {spec['model'].get('type')} with normalizer "
            f"{(spec.get('normalizer') or {}).get('type')}"
        )
    found = _without_offsets(spec.get("pre_tokenizer"))
    for name, known in PRE_TOKENIZERS.items():
        if found == known:
            return name
    raise ConfigError(
        f"GGUF export: llama.cpp has no pre-tokenizer that splits text like this one ({json.dumps(found)}), "
        "so it would tokenize differently; export with --to hf"
    )


def _added_specials(tokenizer) -> tuple[bool, bool]:
    """Whether encoding adds bos in front / eos at the end, as observed on a sample text."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    start = next((i for i in range(len(full) - len(plain) + 1) if full[i : i + len(plain)] == plain), None)
    prefix, suffix = (full[:start], full[start + len(plain) :]) if start is not None else (full, [])
    if start is None or prefix not in ([], [tokenizer.bos_token_id]) or suffix not in ([], [tokenizer.eos_token_id]):
        raise ConfigError(
            f"GGUF export: this tokenizer wraps a text as {full} (the text alone: {plain}); llama.cpp "
            "can only add a bos token in front and an eos token at the end"
        )
    return prefix != [], suffix != []


def write_tokenizer(writer: gguf.GGUFWriter, tokenizer, vocab_size: int) -> None:
    """The tokenizer's vocabulary, merges, special tokens and chat template, as llama.cpp reads them."""
    pre = pre_tokenizer_type(tokenizer)
    by_id = {i: token for token, i in tokenizer.get_vocab().items()}
    if max(by_id) >= vocab_size:
        raise ConfigError(
            f"GGUF export: the tokenizer has token id {max(by_id)}, the model only {vocab_size} embeddings"
        )
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:  # embedding rows no token uses (a vocabulary padded to a round size)
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(by_id[i])
        types.append(
            gguf.TokenType.NORMAL
            if i not in added
            else gguf.TokenType.CONTROL
            if added[i].special
            else gguf.TokenType.USER_DEFINED
        )
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    for kind in SPECIAL_TOKENS:
        token_id = getattr(tokenizer, f"{kind}_token_id", None)
        if token_id is not None:
            getattr(writer, f"add_{kind}_token_id")(token_id)
    add_bos, add_eos = _added_specials(tokenizer)
    writer.add_add_bos_token(add_bos)
    writer.add_add_eos_token(add_eos)
    if getattr(tokenizer, "chat_template", None):
        template = tokenizer.chat_template
        writer.add_chat_template(
            template if isinstance(template, str) else [{"name": k, "template": v} for k, v in template.items()]
        )


def write_hyperparameters(writer: gguf.GGUFWriter, config, name: str) -> torch.Tensor | None:
    """The Llama metadata llama.cpp needs; returns the RoPE frequency factors tensor for a
    ``llama3`` RoPE (llama.cpp reads it as ``rope_freqs.weight``), else None."""
    if getattr(config, "hidden_act", "silu") != "silu":
        raise ConfigError(f"GGUF export: llama.cpp's Llama uses SiLU, this model {config.hidden_act}")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope = dict(getattr(config, "rope_parameters", None) or {})
    theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    rope_type = rope.get("rope_type", "default")
    writer.add_name(name)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads or config.num_attention_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(theta)
    if head_dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    elif rope_type == "llama3":
        return llama3_rope_factors(rope, theta, head_dim, config)
    elif rope_type != "default":
        raise ConfigError(f"GGUF export: RoPE type {rope_type!r} is not supported (default, linear and llama3 are)")
    return None


def llama3_rope_factors(rope: dict, theta: float, head_dim: int, config) -> torch.Tensor:
    """Per-frequency divisors of Llama 3.1's RoPE scaling (as convert_hf_to_gguf.py computes them)."""
    factor, low, high = rope.get("factor", 8.0), rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_context = rope.get(
        "original_max_position_embeddings", getattr(config, "original_max_position_embeddings", 8192)
    )
    factors = []
    for freq in 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim):
        wavelength = 2 * math.pi / float(freq)
        if wavelength < old_context / high:
            factors.append(1.0)
        elif wavelength > old_context / low:
            factors.append(factor)
        else:
            smooth = (old_context / wavelength - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(factors, dtype=torch.float32)


def rope_permute(rows: torch.Tensor, n_head: int) -> torch.Tensor:
    """Q or K rows (weight, per-row scale or bias) from HF's rotate-half layout, where a head's
    rotated pairs are (j, j + d/2), to llama.cpp's, where they are (2j, 2j + 1)."""
    return rows.reshape(n_head, 2, rows.shape[0] // n_head // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def ternary_tensor(codes: np.ndarray, scale: np.ndarray, qtype: gguf.GGMLQuantizationType, name: str) -> np.ndarray:
    """The TQ2_0/TQ1_0 bytes of ``codes`` (int8 [N, K]) × ``scale`` (fp32 [1] or [N]).

    Both types cut a row into blocks of 256 weights, each with a ternary code per weight and
    one f16 multiplier ``d`` (value = code × d) in its last two bytes. A block never straddles
    two rows (K is a multiple of 256), so a per-tensor scale becomes ``d`` of every block and a
    per-row scale ``d`` of each block of its row: the values are codes × f16(scale). gguf's own
    packer lays out the codes: given the codes themselves it finds each block's largest
    magnitude to be 1 (0 for an all-zero block) and so stores every code exactly; ``d`` is then
    overwritten with the scale."""
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    N, K = codes.shape
    half = _f16_scale(scale, name, qtype)
    data = gguf.quants.quantize(codes.astype(np.float32), qtype)
    d = _block_multipliers(half, N, K // block)
    data.reshape(N, K // block, type_size)[..., -2:] = d
    return _read_back(data, codes, half, qtype, name)


def q4_0_tensor(codes: np.ndarray, scale: np.ndarray, name: str) -> np.ndarray:
    """The Q4_0 bytes of ``codes`` × ``scale``, for rows that are a multiple of 32 but not of 256.

    A Q4_0 block is 32 weights: an f16 multiplier ``d``, then 4-bit ``q`` (the first 16 weights in
    the low nibbles, the next 16 in the high ones) with value = d × (q − 8). With d = the scale
    and q = code + 8 every value is codes × f16(scale) exactly, at 4.5 bits a weight instead of
    F16's 16; llama.cpp runs Q4_0 on every backend."""
    qtype = gguf.GGMLQuantizationType.Q4_0
    N, K = codes.shape
    half = _f16_scale(scale, name, qtype)
    q = (codes.astype(np.int16) + 8).astype(np.uint8).reshape(N, K // 32, 32)
    nibbles = q[..., :16] | (q[..., 16:] << 4)
    data = np.concatenate((_block_multipliers(half, N, K // 32), nibbles), axis=-1).reshape(N, -1)
    return _read_back(data, codes, half, qtype, name)


def _f16_scale(scale: np.ndarray, name: str, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    half = scale.astype(np.float16)
    if not np.all(np.abs(half.astype(np.float32) - scale) <= np.abs(scale) * 2.0**-11):
        raise ConfigError(
            f"GGUF export: {name} has a scale ({scale.min():.3g}..{scale.max():.3g}) outside the f16 range "
            f"its {qtype.name} blocks store it in; export with --to hf"
        )
    return half


def _block_multipliers(half: np.ndarray, rows: int, blocks: int) -> np.ndarray:
    """Each block's f16 multiplier as its two bytes [rows, blocks, 2]: a per-tensor scale for every
    block, a per-row scale for each block of its row (a block never straddles two rows)."""
    d = np.ascontiguousarray(np.broadcast_to(half.reshape(-1, 1), (rows, blocks)))
    return d.view(np.uint8).reshape(rows, blocks, 2)


def _read_back(data: np.ndarray, codes: np.ndarray, half: np.ndarray, qtype, name: str) -> np.ndarray:
    expected = codes.astype(np.float32) * half.astype(np.float32).reshape(-1, 1)
    if not np.array_equal(gguf.quants.dequantize(data, qtype), expected):
        raise RuntimeError(f"GGUF export: {name} does not read back as codes × scale from {qtype.name}")
    return data


def _f16(name: str, values: torch.Tensor) -> np.ndarray:
    array = values.detach().float().numpy().astype(np.float16)
    if not np.isfinite(array).all():
        raise ConfigError(f"GGUF export: {name} has values outside the f16 range; export with --to hf")
    return array


def model_tensors(lm, qtype) -> tuple[dict[str, tuple[np.ndarray, gguf.GGMLQuantizationType]], dict[str, list[str]]]:
    """``{gguf name: (data, type)}`` of every weight of ``lm``, and the ternary matrices whose rows
    are not a multiple of 256 long (llama.cpp's ternary block), by the type they were written as
    instead: ``{"Q4_0": [...], "F16": [...]}``."""
    config = lm.config
    n_head, n_kv = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    ternary = ternary_layers(lm)
    state = dict(lm.state_dict())
    for layer in ternary:
        for suffix in ("weight", "weight_packed", "weight_scale"):
            state.pop(f"{layer}.{suffix}", None)
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # llama.cpp reads the embeddings when output.weight is absent
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    tensors: dict[str, tuple[np.ndarray, gguf.GGMLQuantizationType]] = {}
    instead: dict[str, list[str]] = {"Q4_0": [], "F16": []}
    for hf_name, value in [*((f"{layer}.weight", pair) for layer, pair in ternary.items()), *state.items()]:
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ConfigError(f"GGUF export: tensor {hf_name} has no place in llama.cpp's Llama model")
        heads = n_head if ".q_proj." in hf_name else n_kv if ".k_proj." in hf_name else None
        if isinstance(value, tuple):
            codes, scale = value
            if heads is not None:
                codes, scale = rope_permute(codes, heads), (rope_permute(scale, heads) if scale.numel() > 1 else scale)
            if codes.shape[1] % block == 0:
                tensors[name] = ternary_tensor(codes.numpy(), scale.numpy(), qtype, hf_name), qtype
                continue
            if codes.shape[1] % 32 == 0:
                instead["Q4_0"].append(hf_name)
                tensors[name] = q4_0_tensor(codes.numpy(), scale.numpy(), hf_name), gguf.GGMLQuantizationType.Q4_0
                continue
            instead["F16"].append(hf_name)
            value = dequantized(codes, scale)
        elif heads is not None:
            value = rope_permute(value, heads)
        tensors[name] = (
            (value.detach().float().numpy(), gguf.GGMLQuantizationType.F32)
            if value.dim() == 1
            else (_f16(hf_name, value), gguf.GGMLQuantizationType.F16)
        )
    return tensors, instead


def export_gguf(agent, dest, *, ternary: str = "tq2_0") -> dict:
    """Write ``agent``'s Llama model and tokenizer as the GGUF file ``dest`` (atomically).

    Returns ``{"types": {type name: tensor count}, "instead": {"Q4_0"/"F16": [ternary layers
    written as that type instead of the ternary one]}, "bytes"}``."""
    lm, tokenizer = agent.lm, agent.tokenizer
    if lm.config.model_type != LLAMA:
        raise ConfigError(
            f"GGUF export writes Llama-architecture models; this one is {lm.config.model_type!r} "
            "(export it with --to hf)"
        )
    if tokenizer is None:
        raise ConfigError("GGUF export: the model has no tokenizer, and llama.cpp needs one")
    if ternary not in TERNARY_TYPES:
        raise ConfigError(f"--ternary {ternary}: choose one of {', '.join(TERNARY_TYPES)}")
    qtype, file_type = TERNARY_TYPES[ternary]
    dest = Path(dest)
    writer = gguf.GGUFWriter(path=None, arch=LLAMA)
    rope_factors = write_hyperparameters(writer, lm.config, dest.stem)
    write_tokenizer(writer, tokenizer, lm.config.vocab_size)
    tensors, instead = model_tensors(lm, qtype)
    if rope_factors is not None:
        tensors[gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"] = (
            rope_factors.numpy(),
            gguf.GGMLQuantizationType.F32,
        )
    types = Counter(t.name for _, t in tensors.values())
    writer.add_file_type(
        file_type
        if types[qtype.name]
        else gguf.LlamaFileType.MOSTLY_Q4_0
        if instead["Q4_0"]
        else gguf.LlamaFileType.MOSTLY_F16
    )
    packed_types = (qtype, gguf.GGMLQuantizationType.Q4_0)  # bytes the writer takes as they are
    for name, (data, dtype) in tensors.items():
        writer.add_tensor(name, data, raw_dtype=dtype if dtype in packed_types else None)
    _write_atomically(writer, dest)
    return {"types": dict(types), "instead": instead, "bytes": dest.stat().st_size}


def _write_atomically(writer: gguf.GGUFWriter, dest: Path) -> None:
    """Write the file under a hidden temp name next to ``dest``, then rename it into place, so
    ``dest`` is the old file or the complete new one, never a part."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.tmp-{os.getpid()}-")
    os.close(fd)
    try:
        writer.write_header_to_file(path=Path(tmp))
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, dest)
    except BaseException:
        writer.close()
        Path(tmp).unlink(missing_ok=True)
        raise
