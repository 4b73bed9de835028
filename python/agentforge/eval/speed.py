"""Cost measurements, the one place they are taken: generation throughput, parameter count,
stored bytes and peak memory, and the side-by-side speed report of two models (a packed ternary
model and its float original: tokens/s at several batch sizes, the share of generation time in
the converted layers, resident tensor bytes, peak memory of a fresh process).

These report what was measured on this machine in this process; compare two models only with
numbers taken the same way in the same run. No result is ever selected on them.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import torch

from agentforge.eval._common import evaluation_mode, model_device, require_positive

T = TypeVar("T")

_CLEAR_REFS = "/proc/self/clear_refs"
_PROC_STATUS = "/proc/self/status"
_RESET_PEAK_RSS = "5"  # proc(5): writing 5 to clear_refs resets the peak RSS (VmHWM) to the current RSS


# --- throughput ------------------------------------------------------------------------------


def tokens_per_second(
    model: Any,
    *,
    prompt_len: int = 16,
    new_tokens: int = 32,
    batch_size: int = 1,
    repeats: int = 3,
    vocab_size: int | None = None,
) -> float:
    """Greedy generation throughput in new tokens per second (``batch_size * new_tokens`` per call).

    Prompts are random token ids (seeded, so every model sees the same prompts) of
    ``prompt_len`` tokens from ``vocab_size`` (default ``model.config.vocab_size``). Every call
    is forced to generate exactly ``new_tokens`` (eos suppressed through ``min_new_tokens``,
    and checked). One untimed warm-up call pays the one-off costs (lazy initialisation,
    allocator growth); the result is the median of ``repeats`` timed calls. Runs under
    ``torch.inference_mode``, so measure a model after training it, not between steps of a
    model that caches tensors lazily.
    """
    require_positive(
        "tokens_per_second", prompt_len=prompt_len, new_tokens=new_tokens, batch_size=batch_size, repeats=repeats
    )
    vocab_size = vocab_size or _config_vocab_size(model)
    device = model_device(model)
    prompts = torch.randint(vocab_size, (batch_size, prompt_len), generator=torch.Generator().manual_seed(0))
    prompts = prompts.to(device)

    def timed_generation() -> float:
        _synchronize(device)
        start = time.perf_counter()
        output = model.generate(
            input_ids=prompts,
            attention_mask=torch.ones_like(prompts),
            min_new_tokens=new_tokens,
            max_new_tokens=new_tokens,
            do_sample=False,
            num_beams=1,
            pad_token_id=_pad_token_id(model),
        )
        _synchronize(device)
        elapsed = time.perf_counter() - start
        if output.shape[1] != prompt_len + new_tokens:
            raise RuntimeError(
                f"tokens_per_second: generate returned {output.shape[1] - prompt_len} new tokens, "
                f"expected exactly {new_tokens}"
            )
        return elapsed

    with evaluation_mode(model), torch.inference_mode():
        timed_generation()  # warm-up
        seconds = statistics.median(timed_generation() for _ in range(repeats))
    return batch_size * new_tokens / seconds


def _config_vocab_size(model: Any) -> int:
    vocab_size = getattr(getattr(model, "config", None), "vocab_size", None)
    if not vocab_size:
        raise ValueError("tokens_per_second: the model has no config.vocab_size; pass vocab_size=")
    return vocab_size


def _pad_token_id(model: Any) -> int:
    # Every row is full length and none can finish early, so padding never happens; passing an
    # id only keeps generate from warning that it had to pick one.
    pad_id = getattr(getattr(model, "generation_config", None), "pad_token_id", None)
    return 0 if pad_id is None else pad_id


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- size ------------------------------------------------------------------------------------


def parameter_count(model: torch.nn.Module) -> int:
    """Number of parameter elements, each tensor counted once (tied weights count once).

    Counts ``nn.Parameter`` s only: weights held as buffers, such as packed ternary layers,
    are not parameters; :func:`parameter_bytes` measures those."""
    return sum(tensor.numel() for tensor in _unique_tensors(model.parameters()))


def parameter_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's tensors as stored: every tensor of ``model.state_dict()``
    (parameters and persistent buffers, plus what modules store instead, e.g. the canonical
    packed weights of a packed BitLinear) counted once, at its own dtype's element size.
    Non-persistent buffers (rotary tables, kernel-layout copies) are derived state and excluded.
    """
    return sum(
        tensor.numel() * tensor.element_size() for tensor in _unique_tensors(model.state_dict(keep_vars=True).values())
    )


def _unique_tensors(tensors: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """Drop repeats of a tensor: the same object, or another view of the same memory with the
    same layout (tied weights appear under two names in a state dict)."""
    unique, seen = [], set()
    for tensor in tensors:
        if tensor.device.type == "meta":  # no memory to compare; identity is all there is
            key: tuple = ("meta", id(tensor))
        else:
            key = (tensor.device, tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tuple(tensor.stride()))
        if key not in seen:
            seen.add(key)
            unique.append(tensor)
    return unique


# --- peak memory -----------------------------------------------------------------------------


def peak_memory_bytes(fn: Callable[[], T], *, device: torch.device | str | None = None) -> tuple[T, int]:
    """Run ``fn()`` and return ``(its result, peak memory in bytes during the call)``.

    ``device`` says which memory to watch (default: CUDA when available, else CPU); pass the
    model's device. The value is an absolute peak, including what was allocated before the
    call (the model's weights; on CPU also the interpreter and libraries).

    * CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` (tensor
      memory only, not the caching allocator's reserve).
    * CPU on Linux: the process's peak resident set size, ``VmHWM`` from ``/proc/self/status``,
      after resetting it to the current RSS by writing "5" to ``/proc/self/clear_refs``.
    * Fallback, where that reset is impossible (kernel without it, restricted ``/proc``, other
      Unix systems): the process's lifetime peak RSS, with a ``RuntimeWarning``. It equals the
      call's peak when the call sets a new high for the process, and is an upper bound otherwise.
    """
    device = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        return _cuda_peak(fn, device)
    if device.type != "cpu":
        raise ValueError(f"peak_memory_bytes: cannot measure memory on device type {device.type!r}")
    if _reset_peak_rss():
        result = fn()
        return result, _proc_status_bytes("VmHWM")
    warnings.warn(
        "peak_memory_bytes: cannot reset the peak RSS here; reporting the process's lifetime "
        "peak, an upper bound on the call's peak",
        RuntimeWarning,
        stacklevel=2,
    )
    result = fn()
    return result, _lifetime_peak_rss()


def _cuda_peak(fn: Callable[[], T], device: torch.device) -> tuple[T, int]:
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    result = fn()
    torch.cuda.synchronize(device)  # kernels still queued may allocate
    return result, torch.cuda.max_memory_allocated(device)


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS; False where this system does not allow it."""
    try:
        with open(_CLEAR_REFS, "w") as clear_refs:
            clear_refs.write(_RESET_PEAK_RSS)
        return True
    except OSError:
        return False


def _proc_status_bytes(field: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` in bytes."""
    with open(_PROC_STATUS) as status:
        match = re.search(rf"^{field}:\s+(\d+)\s+kB$", status.read(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"peak_memory_bytes: {_PROC_STATUS} has no {field} field")
    return int(match.group(1)) * 1024


def release_freed_memory() -> None:
    """Collect garbage and hand the C heap's free pages back to the OS (:func:`trim_c_heap`).

    A 135M-parameter model is a few hundred megabyte-sized tensors; glibc keeps freed ones of up
    to 32 MiB in its heap, so a process that builds and drops models one after another (merge
    candidates, phases in one run) grows by fragments it no longer uses."""
    import gc

    gc.collect()
    trim_c_heap()


def trim_c_heap() -> None:
    """glibc's ``malloc_trim(0)``: the free pages inside the C heap go back to the OS. Nothing
    without glibc (musl has no ``malloc_trim``; other systems have no such heap)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c") if sys.platform.startswith("linux") else None
    if name is None:
        return
    trim = getattr(ctypes.CDLL(name), "malloc_trim", None)
    if trim is not None:
        trim(0)


class PeakRss:
    """The process's peak resident set size over a ``with`` block, from a daemon thread that
    reads the current RSS every ``interval`` seconds: unlike ``VmHWM`` it survives code inside the
    block resetting the peak (``peak_memory_bytes`` does). Where the block could reset ``VmHWM`` on
    entry, each reading also takes it, so spikes shorter than the interval count too (sampling
    alone read the peaks of two SmolLM2 phases 0.2-0.3 GB low). Where /proc is missing it reports
    the process's lifetime peak."""

    def __init__(self, interval: float = 0.2):
        import threading

        self.interval, self._peak, self._stop = interval, 0, threading.Event()
        self._thread = threading.Thread(target=self._watch, name="agentforge-peak-rss", daemon=True)
        self._since_entry = False  # whether VmHWM counts from this block's start (or a later reset)

    def _sample(self) -> None:
        try:
            now = _proc_status_bytes("VmRSS")
            self._peak = max(self._peak, now, _proc_status_bytes("VmHWM") if self._since_entry else now)
        except OSError:
            self._peak = max(self._peak, _lifetime_peak_rss())

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> PeakRss:
        self._since_entry = _reset_peak_rss()
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    @property
    def peak(self) -> int:
        """Bytes: the highest RSS seen so far (now included)."""
        self._sample()
        return self._peak


def _lifetime_peak_rss() -> int:
    try:
        return _proc_status_bytes("VmHWM")
    except OSError:
        pass
    try:
        import resource  # Unix only
    except ImportError:
        raise RuntimeError(
            "peak_memory_bytes: cannot read CPU peak memory on this platform (no /proc and no resource module)"
        ) from None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS reports bytes, Linux and BSDs KiB


# --- a packed model against its float original -------------------------------------------------

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


def speed_report(
    models: dict,
    dirs: dict,
    layer_names: list[str],
    *,
    batch_sizes: list[int],
    prompt_len: int,
    new_tokens: int,
    memory: bool = True,
) -> dict:
    """Per model (e.g. ``{"fp": ..., "packed": ...}``, their directories under the same keys in
    ``dirs``): ``tokens_per_s_b{B}`` for each batch size B (the models alternate at each size, so
    both meet the same machine load), ``layer_time_share`` (batch 1) of the ``layer_names`` layers,
    ``resident_tensor_bytes``, and with ``memory`` the ``generation_memory`` of the largest batch."""
    report: dict[str, dict[str, Any]] = {
        name: {"resident_tensor_bytes": resident_tensor_bytes(model)} for name, model in models.items()
    }
    for batch_size in batch_sizes:
        for name, model in models.items():
            report[name][f"tokens_per_s_b{batch_size}"] = tokens_per_second(
                model, prompt_len=prompt_len, new_tokens=new_tokens, batch_size=batch_size
            )
    for name, model in models.items():
        report[name]["layer_time_share"] = layer_time_share(
            model, layer_names, prompt_len=prompt_len, new_tokens=new_tokens
        )
        if memory:
            report[name]["generation_memory"] = generation_memory(dirs[name], max(batch_sizes), prompt_len, new_tokens)
    return report


@torch.no_grad()
def layer_time_share(
    model: Any, layer_names: list[str], *, prompt_len: int, new_tokens: int, batch_size: int = 1
) -> float:
    """Fraction of one greedy generation's wall time (after an untimed warm-up call) spent inside
    the named layers, timed by forward hooks: how much of the end-to-end time a faster kernel
    for those layers can remove at most."""
    prompts = torch.randint(
        model.config.vocab_size, (batch_size, prompt_len), generator=torch.Generator().manual_seed(0)
    )
    spent, started = [0.0], {}

    def enter(module, args):
        started[module] = time.perf_counter()

    def leave(module, args, output):
        spent[0] += time.perf_counter() - started.pop(module)

    def generate():
        model.generate(
            input_ids=prompts,
            attention_mask=torch.ones_like(prompts),
            min_new_tokens=new_tokens,
            max_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
        )

    was_training = model.training
    model.eval()
    generate()
    handles = [
        h
        for name in layer_names
        for h in (
            model.get_submodule(name).register_forward_pre_hook(enter),
            model.get_submodule(name).register_forward_hook(leave),
        )
    ]
    try:
        began = time.perf_counter()
        generate()
        total = time.perf_counter() - began
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return spent[0] / total
