"""Speed and memory of a packed ternary model against its float original, measured the same way
in the same run: greedy generation tokens/s at several batch sizes, the tensor bytes each model
holds, and the peak memory of loading and generating in a fresh process."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

# A fresh interpreter imports the model's code (by building it on the meta device, which
# allocates nothing), takes its RSS as the baseline, then loads the weights and generates; the
# peak minus the baseline is what the model costs. (In a process that already held other
# models, freed memory would be reused and hide it.)
_MEMORY_PROBE = """
import json, sys, torch
import agentforge
from transformers import AutoConfig, AutoModelForCausalLM
from agentforge.eval import peak_memory_bytes, tokens_per_second
path, batch, prompt_len, new_tokens, threads = sys.argv[1], *map(int, sys.argv[2:])
torch.set_num_threads(threads)
with torch.device("meta"):
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
_, baseline = peak_memory_bytes(lambda: None, device="cpu")
def load_and_generate():
    model = AutoModelForCausalLM.from_pretrained(path)
    tokens_per_second(model, prompt_len=prompt_len, new_tokens=new_tokens, batch_size=batch, repeats=1)
_, peak = peak_memory_bytes(load_and_generate, device="cpu")
print(json.dumps({"baseline_bytes": baseline, "peak_bytes": peak}))
"""


def generation_memory(model_dir: str | os.PathLike, batch_size: int, prompt_len: int, new_tokens: int) -> dict:
    """Peak RSS of a fresh CPU process that loads ``model_dir`` and generates ``batch_size`` rows:
    ``baseline_bytes`` (after the imports), ``peak_bytes``, and ``model_bytes`` = their difference
    (weights, activations and whatever generation imports lazily, alike for every model)."""
    if not (Path(model_dir) / "config.json").is_file():
        raise ValueError(f"generation_memory: {model_dir} is not a model directory (no config.json)")
    args = [str(model_dir), str(batch_size), str(prompt_len), str(new_tokens), str(torch.get_num_threads())]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, *args], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"generation_memory: the probe for {model_dir} failed: {last}")
    report = json.loads(done.stdout.strip().splitlines()[-1])
    return {**report, "model_bytes": report["peak_bytes"] - report["baseline_bytes"]}


def resident_tensor_bytes(model: torch.nn.Module) -> int:
    """Bytes of every parameter and buffer the model holds in memory (the kernel-layout copies of
    packed weights included), each storage counted once."""
    seen, total = set(), 0
    for tensor in (*model.parameters(), *model.buffers()):
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            total += tensor.numel() * tensor.element_size()
    return total


def speed_report(models: dict, dirs: dict, layer_names: list[str], *, batch_sizes: list[int], prompt_len: int,
                 new_tokens: int, memory: bool = True) -> dict:
    """Per model (e.g. ``{"fp": ..., "packed": ...}``, their directories under the same keys in
    ``dirs``): ``tokens_per_s_b{B}`` for each batch size B (the models alternate at each size, so
    both meet the same machine load), ``layer_time_share`` (batch 1) of the ``layer_names`` layers,
    ``resident_tensor_bytes``, and with ``memory`` the ``generation_memory`` of the largest batch."""
    from agentforge.eval import tokens_per_second

    report = {name: {"resident_tensor_bytes": resident_tensor_bytes(model)} for name, model in models.items()}
    for batch_size in batch_sizes:
        for name, model in models.items():
            report[name][f"tokens_per_s_b{batch_size}"] = tokens_per_second(
                model, prompt_len=prompt_len, new_tokens=new_tokens, batch_size=batch_size)
    for name, model in models.items():
        report[name]["layer_time_share"] = layer_time_share(model, layer_names, prompt_len=prompt_len,
                                                            new_tokens=new_tokens)
        if memory:
            report[name]["generation_memory"] = generation_memory(dirs[name], max(batch_sizes), prompt_len, new_tokens)
    return report


@torch.no_grad()
def layer_time_share(model: torch.nn.Module, layer_names: list[str], *, prompt_len: int, new_tokens: int,
                     batch_size: int = 1) -> float:
    """Fraction of one greedy generation's wall time (after an untimed warm-up call) spent inside
    the named layers, timed by forward hooks: how much of the end-to-end time a faster kernel
    for those layers can remove at most."""
    prompts = torch.randint(model.config.vocab_size, (batch_size, prompt_len),
                            generator=torch.Generator().manual_seed(0))
    spent, started = [0.0], {}

    def enter(module, args):
        started[module] = time.perf_counter()

    def leave(module, args, output):
        spent[0] += time.perf_counter() - started.pop(module)

    def generate():
        model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), min_new_tokens=new_tokens,
                       max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)

    was_training = model.training
    model.eval()
    generate()
    handles = [h for name in layer_names for h in (model.get_submodule(name).register_forward_pre_hook(enter),
                                                   model.get_submodule(name).register_forward_hook(leave))]
    try:
        began = time.perf_counter()
        generate()
        total = time.perf_counter() - began
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return spent[0] / total
