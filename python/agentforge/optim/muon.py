"""torch's Muon with the Newton–Schulz orthogonalisation in a precision that suits the device.

``torch.optim.Muon`` always orthogonalises in bfloat16: right on GPUs and on CPUs with bf16 matrix
instructions (AVX512-BF16, AMX), but a CPU without them multiplies bf16 matrices an order of
magnitude slower than fp32 (``benchmarks/test_bench_muon.py``), and on such a 2-core machine
Newton–Schulz became a third of every tiny-Cognate training step. This subclass keeps torch's
update, state and hyperparameters and only chooses the dtype of the iteration: bf16 where the
hardware multiplies it natively, fp32 elsewhere (or what ``ns_dtype`` says).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def newton_schulz(
    grad: Tensor, coefficients: tuple[float, float, float], steps: int, eps: float, dtype: torch.dtype
) -> Tensor:
    """The quintic Newton–Schulz iteration of Muon (Keller Jordan): ``grad`` [m, n] mapped to
    roughly U S' Vᵀ with S' near 1, computed in ``dtype`` on the wide orientation of the matrix."""
    a, b, c = coefficients
    x = grad.to(dtype)
    tall = grad.size(0) > grad.size(1)
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=eps)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


def adjusted_lr(lr: float, adjust_lr_fn: str | None, shape: torch.Size) -> float:
    """Muon's shape scaling of the learning rate, as torch defines it."""
    rows, cols = shape[:2]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        ratio = math.sqrt(max(1, rows / cols))
    elif adjust_lr_fn == "match_rms_adamw":
        ratio = 0.2 * math.sqrt(max(rows, cols))
    else:
        raise ValueError(f"Muon: unknown adjust_lr_fn {adjust_lr_fn!r}")
    return lr * ratio


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (AVX512-BF16 or AMX tiles)."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)


def default_ns_dtype(device: torch.device) -> torch.dtype:
    """bf16 on CUDA and on CPUs with native bf16 matrix instructions, fp32 everywhere else."""
    if device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16()):
        return torch.bfloat16
    return torch.float32


class Muon(torch.optim.Muon):
    """``torch.optim.Muon`` whose Newton–Schulz runs in ``ns_dtype`` (None: per parameter device,
    see :func:`default_ns_dtype`). With ``ns_dtype=torch.bfloat16`` it steps exactly as torch's."""

    def __init__(self, params, *args, ns_dtype: torch.dtype | None = None, **kwargs):
        super().__init__(params, *args, **kwargs)
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, buffers = [], [], []
            self._init_group(group, params, grads, buffers)
            for param, grad, buffer in zip(params, grads, buffers):
                self._update(param, grad, buffer, group)
        return loss

    def _update(self, param: Tensor, grad: Tensor, buffer: Tensor, group: dict) -> None:
        momentum = group["momentum"]
        buffer.lerp_(grad, 1 - momentum)
        update = grad.lerp(buffer, momentum) if group["nesterov"] else buffer
        dtype = self.ns_dtype or default_ns_dtype(param.device)
        update = newton_schulz(update, group["ns_coefficients"], group["ns_steps"], group["eps"], dtype)
        lr = float(group["lr"])
        param.mul_(1 - lr * group["weight_decay"])
        param.add_(update, alpha=-adjusted_lr(lr, group["adjust_lr_fn"], param.shape))
