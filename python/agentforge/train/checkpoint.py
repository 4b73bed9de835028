"""Training checkpoints that survive `kill -9` at any moment and resume bit for bit.

Layout of ``out_dir/checkpoint/`` (written through ``atomic_directory``, by rank 0 only):

    model.safetensors    weights of the unwrapped model (tied weights stored once)
    optimizer.pt         optimizer.state_dict(), read back with weights_only=True
    rng.pt               per-rank RNG states: torch CPU, CUDA, python `random`, numpy
    trainer_state.json   step, seed, world size, config hash and fingerprint, the loss of every
                         step so far, tokens, elapsed seconds, last eval, sha256 of the files above

The data position needs no storage: the batch of step ``s`` is a pure function of ``s``.
"""

import contextlib
import hashlib
import json
import random
from collections.abc import Iterable
from pathlib import Path
from typing import Any, cast

import numpy as np
import safetensors.torch
import torch

from agentforge.artifacts import CorruptArtifact, atomic_directory, sha256_dir, verify_hashes

CHECKPOINT_DIR = "checkpoint"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
RNG_FILE = "rng.pt"
STATE_FILE = "trainer_state.json"
STATE_FORMAT = 1
# Optimizer options that pick an implementation, not the math; they may differ between machines.
_IMPLEMENTATION_OPTIONS = {"foreach", "fused", "capturable", "differentiable"}


# ---------------------------------------------------------------------------------------------
# random number generators


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), python ``random`` and numpy."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture_rng() -> dict:
    """This process's RNG states, in a form ``torch.load(weights_only=True)`` accepts."""
    # numpy types get_state() as this tuple or the dict that get_state(legacy=False) gives
    state = cast(tuple[str, np.ndarray, int, int, float], np.random.get_state())
    name, keys, position, has_gauss, cached_gauss = state
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached_gauss),
    }


def restore_rng(state: dict) -> None:
    """Inverse of ``capture_rng``."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, position, has_gauss, cached_gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached_gauss))


@contextlib.contextmanager
def preserved_rng():
    """Run a block (evaluation, sampling) without changing the RNG stream training continues with."""
    state = capture_rng()
    try:
        yield
    finally:
        restore_rng(state)


# ---------------------------------------------------------------------------------------------
# config fingerprint


def _hyperparameters(options: dict) -> dict:
    return {k: v for k, v in options.items() if k != "params" and k not in _IMPLEMENTATION_OPTIONS}


def run_fingerprint(cfg, phase: str, n_rows: int, optimizer: torch.optim.Optimizer) -> dict:
    """What must not change between a checkpoint and the run that resumes it (JSON-normalised).
    Taken before the checkpoint is loaded, so the optimizer's groups are as the caller built them."""
    groups = [{**_hyperparameters(group), "n_params": len(group["params"])} for group in optimizer.param_groups]
    fingerprint = {
        "phase": phase,
        "rows": n_rows,
        **cfg.trajectory(),
        "optimizer": type(optimizer).__name__,
        "optimizer_defaults": _hyperparameters(optimizer.defaults),
        "optimizer_groups": groups,
    }
    return json.loads(json.dumps(fingerprint, sort_keys=True, default=repr))


def config_hash(fingerprint: dict) -> str:
    """Short stable hash of a fingerprint."""
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]


def _flatten(value, prefix: str = "") -> dict:
    """``{"a": [{"b": 1}]}`` -> ``{"a.0.b": 1}`` (dicts and lists of dicts), so a difference names its field."""
    items: Iterable[tuple[Any, Any]]
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        items = enumerate(value)
    else:
        return {prefix: value}
    flat = {}
    for key, item in items:
        flat.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _differences(old: dict, new: dict, shown: int = 3) -> str:
    old, new = _flatten(old), _flatten(new)
    diffs = [
        f"{k}: {_short(old.get(k))} then, {_short(new.get(k))} now"
        for k in sorted(set(old) | set(new))
        if old.get(k) != new.get(k)
    ]
    more = f"; {len(diffs) - shown} more" if len(diffs) > shown else ""
    return "; ".join(diffs[:shown]) + more


# ---------------------------------------------------------------------------------------------
# save / load


def save_checkpoint(
    path: str | Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict, rng_states: list[dict]
) -> None:
    """Write a checkpoint directory atomically: a crash leaves the previous checkpoint whole."""
    with atomic_directory(path) as tmp:
        safetensors.torch.save_model(model, str(tmp / MODEL_FILE))
        torch.save(optimizer.state_dict(), tmp / OPTIMIZER_FILE)
        torch.save(rng_states, tmp / RNG_FILE)
        state = {"format": STATE_FORMAT, **state, "files": sha256_dir(tmp)}
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=1) + "\n")


def _read_state(path: Path) -> dict:
    remedy = "delete the directory or pass resume=False"
    try:
        return json.loads((path / STATE_FILE).read_text())
    except FileNotFoundError:
        raise CorruptArtifact(f"{path}: {STATE_FILE} is missing; {remedy}") from None
    except ValueError as e:
        raise CorruptArtifact(f"{path}: {STATE_FILE} is unreadable ({e}); {remedy}") from None


def _check_resumable(path: Path, state: dict, fingerprint: dict, steps: int) -> None:
    if state.get("format") != STATE_FORMAT:
        raise CorruptArtifact(f"{path}: checkpoint format {state.get('format')!r}, expected {STATE_FORMAT}")
    if state["config_hash"] != config_hash(fingerprint):
        raise ValueError(
            f"{path} was written with a different config ({_differences(state['config'], fingerprint)}); "
            "resume with the same config, or start over with resume=False or another out_dir"
        )
    if state["step"] > steps:
        raise ValueError(
            f"{path} is at step {state['step']}, beyond steps={steps}; "
            "raise steps, or start over with resume=False or another out_dir"
        )


def _load_weights(path: Path, model: torch.nn.Module) -> None:
    device = next(model.parameters()).device
    try:
        safetensors.torch.load_model(model, str(path / MODEL_FILE), strict=True, device=str(device))
    except RuntimeError as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        detail = lines[1] if len(lines) > 1 else lines[0]  # torch's first line is a bare header
        raise ValueError(f"{path}: the checkpoint does not fit this model ({detail})") from None


def load_checkpoint(
    path: str | Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer, fingerprint: dict, steps: int
) -> dict | None:
    """Load the checkpoint at ``path`` into ``model`` and ``optimizer`` and return its trainer state
    (with ``"rng"``: the list of per-rank RNG states); None when there is no checkpoint.

    Raises ``CorruptArtifact`` when a file is missing or changed, ``ValueError`` when the
    checkpoint belongs to a different config or model."""
    path = Path(path)
    if not path.exists():
        return None
    state = _read_state(path)
    verify_hashes(path, state.get("files", {}), ignore=(STATE_FILE,))
    _check_resumable(path, state, fingerprint, steps)
    _load_weights(path, model)
    optimizer.load_state_dict(torch.load(path / OPTIMIZER_FILE, map_location="cpu", weights_only=True))
    state["rng"] = torch.load(path / RNG_FILE, weights_only=True)
    return state
