"""Honest accounting of a packed ternary model directory: bytes on disk, bits per weight of each
ternary layer (codes alone and with their scales) and the fraction of zero codes.

Everything is read from the safetensors files as written: header shapes and dtypes give each
tensor's stored bytes, and the zero fraction comes from the stored 2-bit codes themselves.
"""

from __future__ import annotations

import os
from pathlib import Path

from agentforge import ops

_DTYPE_BYTES = {"U8": 1, "I8": 1, "BOOL": 1, "F16": 2, "BF16": 2, "I16": 2, "F32": 4, "I32": 4, "F64": 8, "I64": 8}


def safetensors_bytes(model_dir: str | os.PathLike) -> int:
    """Bytes on disk of a model directory's weight files (``*.safetensors``, headers included)."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir} holds no .safetensors file")
    return sum(path.stat().st_size for path in files)


def _stored_bytes(tensor_slice) -> int:
    count = 1
    for size in tensor_slice.get_shape():
        count *= size
    return count * _DTYPE_BYTES[tensor_slice.get_dtype()]


def ternary_layer_stats(model_dir: str | os.PathLike, in_features: dict[str, int]) -> dict[str, dict]:
    """Per packed layer of a packed model directory: ``weights`` (N·K), ``code_bytes`` and
    ``scale_bytes`` as stored, ``bits_per_weight`` (codes only), ``bits_per_weight_with_scales``
    and ``sparsity`` (fraction of zero codes). ``in_features`` maps each layer name (as in
    config.json's quantization_config) to K, which the padded 2-bit rows do not record."""
    from safetensors import safe_open

    stats = {}
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(path, framework="pt") as fh:
            keys = set(fh.keys())
            for name, K in in_features.items():
                packed_key, scale_key = f"{name}.weight_packed", f"{name}.weight_scale"
                if packed_key not in keys:
                    continue
                packed = fh.get_tensor(packed_key)
                codes = ops.unpack_ternary(packed, K)
                weights = codes.numel()
                code_bytes = _stored_bytes(fh.get_slice(packed_key))
                scale_bytes = _stored_bytes(fh.get_slice(scale_key))
                stats[name] = {
                    "out_features": codes.shape[0],
                    "in_features": K,
                    "weights": weights,
                    "code_bytes": code_bytes,
                    "scale_bytes": scale_bytes,
                    "bits_per_weight": 8 * code_bytes / weights,
                    "bits_per_weight_with_scales": 8 * (code_bytes + scale_bytes) / weights,
                    "sparsity": float((codes == 0).sum()) / weights,
                }
    missing = sorted(set(in_features) - set(stats))
    if missing:
        raise ValueError(f"{model_dir}: no packed weights stored for layer(s) {missing}")
    return stats


def totals(stats: dict[str, dict]) -> dict[str, float]:
    """Weighted totals over the layers of :func:`ternary_layer_stats`."""
    weights = sum(s["weights"] for s in stats.values())
    code_bytes = sum(s["code_bytes"] for s in stats.values())
    scale_bytes = sum(s["scale_bytes"] for s in stats.values())
    return {
        "ternary_weights": weights,
        "ternary_code_bytes": code_bytes,
        "ternary_scale_bytes": scale_bytes,
        "bits_per_weight": 8 * code_bytes / weights,
        "bits_per_weight_with_scales": 8 * (code_bytes + scale_bytes) / weights,
        "sparsity": sum(s["sparsity"] * s["weights"] for s in stats.values()) / weights,
    }
