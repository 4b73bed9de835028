"""Calibration of a ternary conversion from measured errors, before any weight changes.

For every ``nn.Linear`` that will become a BitLinear:

1. Its inputs on calibration rows are recorded (forward hooks; a layer called several times per
   forward, e.g. a weight-shared recursive block, contributes every call).
2. The layer's output error is measured on those inputs for both weight-scale schemes, as the
   relative squared error ``||y_q - y||² / ||y||²`` of ``y_q = act_q(x) · ternary(W)ᵀ`` against
   ``y = x Wᵀ`` (the same int8 activations and absmean ternary weights the layer will compute).
   Per-channel scales cost one fp32 per output row, so a layer takes them only when they cut its
   error by at least ``min_gain`` (relative); otherwise it keeps one scale per tensor (b1.58).
3. Sensitivity: the increase of the model's mean next-token NLL on the calibration rows when that
   layer alone is ternary (with its chosen scales). ``sensitivity="exact"`` measures it end to
   end, one forward pass per layer. ``"taylor"`` estimates every layer from one forward and one
   backward pass (:func:`taylor_increases`), then measures exactly the ``recheck`` share of
   layers the estimate ranks highest, and any layer about to be flagged that is not among them,
   so every flagged value is a measurement. ``"auto"`` (the default) is exact up to
   ``EXACT_MAX_LAYERS`` layers and Taylor above. The ``n_sensitive`` layers with the largest
   increase are flagged.

Why the recheck: the estimate ranks well on the whole (Spearman 0.7–0.99 against the exact values
on a micro and a tiny Cognate, a tiny Llama and all 210 layers of SmolLM2-135M) but misses
layers where one ternary layer is far outside the Taylor regime: SmolLM2's
``layers.11.mlp.down_proj`` adds 10.2 nats/token (the model collapses), estimated at 0.82, 10th
of 210. The true five largest all rank within the estimate's top 20 there
(``benchmarks/test_bench_calibration.py`` measures this).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from agentforge import ops

EXACT_MAX_LAYERS = 64  # "auto" measures up to this many layers exactly (a tiny Cognate's 27 take ~2 s)
RECHECK = 0.1  # share of layers, highest estimates first, that "taylor" measures exactly
IGNORE_INDEX = -100  # label of positions without loss, as in agentforge.data


@dataclass
class LayerCalibration:
    """What calibration measured for one layer and what it chose."""

    name: str
    out_features: int
    in_features: int
    error_per_tensor: float  # relative squared output error, one scale per tensor
    error_per_channel: float  # the same with one scale per output row
    per_channel: bool  # the scheme chosen
    loss_increase: float  # nats/token added when only this layer is ternary (see loss_increase_method)
    sensitive: bool = False
    loss_increase_method: str = "exact"  # "exact": measured end to end; "taylor": the estimate
    loss_increase_estimate: float | None = None  # the Taylor estimate, when one was made

    def to_dict(self) -> dict:
        return asdict(self)


def layer_inputs(
    model: nn.Module, names: list[str], batches: list[dict], max_tokens: int, seed: int = 0
) -> dict[str, torch.Tensor]:
    """The inputs each named ``nn.Linear`` sees while ``model`` reads ``batches`` (dicts of
    ``input_ids`` and optional ``attention_mask``; captured by ``agentforge.eval.capture``),
    flattened to ``[tokens, in_features]`` and subsampled (seeded, without replacement) to at most
    ``max_tokens`` rows per layer."""
    from agentforge.eval.capture import capture_calls

    seen = capture_calls(model, names, batches, device="cpu")
    generator = torch.Generator().manual_seed(seed)
    inputs = {}
    for name, calls in seen.items():
        if not calls:
            raise ValueError(f"calibration: layer {name!r} was never called on the calibration rows")
        x = torch.cat([args[0].reshape(-1, args[0].shape[-1]).float() for args in calls])
        if len(x) > max_tokens:
            x = x[torch.randperm(len(x), generator=generator)[:max_tokens]]
        inputs[name] = x
    return inputs


@torch.no_grad()
def output_error(x: torch.Tensor, linear: nn.Linear, per_channel: bool) -> float:
    """Relative squared error of the layer's ternary output on inputs ``x`` [T, K] (see module doc)."""
    weight = linear.weight.detach().float()
    bias = None if linear.bias is None else linear.bias.detach().float()
    exact = F.linear(x, weight, bias)
    ternary = F.linear(ops.act_fake_quant(x), ops.ternary_fake_quant(weight, per_channel), bias)
    return float((ternary - exact).pow(2).sum() / exact.pow(2).sum().clamp(min=1e-30))


def choose_per_channel(error_per_tensor: float, error_per_channel: float, min_gain: float) -> bool:
    """Per-channel scales only when they cut the error by at least the fraction ``min_gain``."""
    return error_per_channel < (1.0 - min_gain) * error_per_tensor


@torch.no_grad()
def loss_increase(model: nn.Module, name: str, per_channel: bool, mean_nll, base_nll: float) -> float:
    """``mean_nll(model)`` with layer ``name`` alone made ternary, minus ``base_nll``; the layer is
    restored afterwards (the BitLinear shares its Parameters, so nothing is copied)."""
    from agentforge.nn import BitLinear

    linear = cast(nn.Linear, model.get_submodule(name))
    model.set_submodule(name, BitLinear.from_linear(linear, per_channel))
    try:
        return mean_nll(model) - base_nll
    finally:
        model.set_submodule(name, linear)


def _target_count(batch: dict) -> int:
    labels = batch.get("labels", batch["input_ids"])
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def _row_chunks(batch: dict, pass_tokens: int):
    """``batch`` split along its rows into pieces of at most ``pass_tokens`` tokens (one row at
    least): rows of a causal LM are independent, so the pieces compute what the whole does."""
    rows, length = batch["input_ids"].shape
    step = max(1, pass_tokens // max(length, 1))
    for start in range(0, rows, step):
        yield {key: value[start : start + step] for key, value in batch.items()}


def _summed_nll(model: nn.Module, batch: dict) -> torch.Tensor:
    """The summed next-token cross-entropy of ``batch`` (its ``labels``, else its ``input_ids``;
    -100 ignored), computed from the logits in fp32 as ``agentforge.eval.perplexity`` does."""
    labels = batch.get("labels", batch["input_ids"])
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[:, :-1].float()
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def taylor_increases(
    model: nn.Module, names: list[str], batches: list[dict], perturbed_output, pass_tokens: int = 1024
) -> tuple[float, dict[str, tuple[float, float]]]:
    """One forward and one backward pass of ``model`` over ``batches``, estimating for every named
    layer the change of ``L`` (the mean next-token NLL over the ``N`` target tokens) when that
    layer's output alone moves from ``Y`` to ``perturbed_output(name, layer, x)``, ``x`` its input.

    ``ΔY`` is computed on the live input inside the forward pass; a tensor hook on the output gives
    ``G = ∂(N·L)/∂Y`` in the backward pass (both summed over every call of a layer used several
    times per forward). Per layer, the second-order Taylor expansion in ``Y``:

    * ``first = Σ_t ⟨G_t, ΔY_t⟩ / N``, the gradient term;
    * ``second = Σ_r (Σ_{t in row r} ⟨G_t, ΔY_t⟩)² / (2N)``: ``½ ΔYᵀ H ΔY`` with the Hessian
      replaced by the empirical Fisher of the rows' summed NLLs (rows are the independent samples;
      ``G`` restricted to a row is that row's gradient). Treating each token as a sample instead
      drops how ``ΔY`` at one token moves later tokens' losses, and ranked worse (Spearman 0.75
      against 0.92 on a tiny Cognate, 0.80 against 0.96 on a tiny Llama).

    Rows are the first dimension of a layer's output. Returns ``(L, {name: (first, second)})``.
    The model is left as it was: no parameter gets a gradient, ``requires_grad`` and training
    flags are restored. At most ``pass_tokens`` tokens run per pass: the ``ΔY`` of every layer are
    kept until the backward pass reaches them (0.6 MB a token for SmolLM2-135M)."""
    tokens = sum(_target_count(b) for b in batches)
    if tokens == 0:
        raise ValueError("calibrate: the calibration batches have no target tokens")
    first = dict.fromkeys(names, 0.0)
    second = dict.fromkeys(names, 0.0)
    row_dots: dict[str, torch.Tensor] = {}  # per layer, Σ ⟨G_t, ΔY_t⟩ over each row of the pass

    def hook(name: str):
        def on_output(module, args, output):
            with torch.no_grad():
                delta = (perturbed_output(name, module, args[0]) - output).float()

            def on_grad(grad):
                along = (grad.float() * delta).sum(-1, dtype=torch.float64)  # ⟨G_t, ΔY_t⟩ per token
                first[name] += float(along.sum()) / tokens
                per_row = along.reshape(along.shape[0], -1).sum(1) if along.dim() else along.reshape(1)
                row_dots[name] = row_dots[name] + per_row if name in row_dots else per_row

            if not output.requires_grad:  # no parameter requires grad here: outputs computed from
                output = output.detach().requires_grad_()  # inputs alone become leaves G reaches
            output.register_hook(on_grad)
            return output

        return on_output

    flags = {param: param.requires_grad for param in model.parameters()}
    was_training = {module: module.training for module in model.modules()}
    handles = [model.get_submodule(name).register_forward_hook(hook(name)) for name in names]
    total = 0.0
    try:
        for param in flags:
            param.requires_grad_(False)
        model.eval()
        with torch.enable_grad():
            for batch in batches:
                for chunk in _row_chunks(batch, pass_tokens):
                    row_dots.clear()
                    loss = _summed_nll(model, chunk)
                    total += float(loss.detach())
                    if loss.requires_grad:
                        loss.backward()
                    for name, dots in row_dots.items():
                        second[name] += float(dots.pow(2).sum()) / (2 * tokens)
    finally:
        for handle in handles:
            handle.remove()
        for param, flag in flags.items():
            param.requires_grad_(flag)
        for module, training in was_training.items():
            module.training = training
    return total / tokens, {name: (first[name], second[name]) for name in names}


def ternary_output(chosen: dict[str, bool]):
    """``perturbed_output`` for :func:`taylor_increases`: the layer's output as a BitLinear with
    the chosen scales computes it (int8 activations, absmean ternary weights)."""

    def output(name: str, linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        return ops.bitlinear(x, linear.weight, linear.bias, chosen[name])

    return output


def calibrate(
    model: nn.Module,
    names: list[str],
    batches: list[dict],
    mean_nll,
    *,
    min_gain: float,
    n_sensitive: int,
    max_tokens: int,
    seed: int = 0,
    sensitivity: str = "auto",
    recheck: float = RECHECK,
) -> list[LayerCalibration]:
    """Measure every named ``nn.Linear`` of ``model`` (a float model, left unchanged): output
    errors of both scale schemes on the calibration ``batches``, the chosen scheme, and the loss
    increase ``mean_nll(model with that layer ternary) - mean_nll(model)``, measured or estimated
    as ``sensitivity`` says (module doc); flag the ``n_sensitive`` layers with the largest
    increase. Returns one record per layer, in order.

    The Taylor estimate differentiates the next-token NLL of ``batches`` (their ``labels``, else
    their ``input_ids``), so it must be the loss ``mean_nll`` measures: the two are compared on
    the float model and a difference is an error. ``recheck``: the share of layers, highest
    estimates first, measured exactly under "taylor" (0: none, the estimate alone)."""
    if not names:
        raise ValueError("calibrate: no layers to calibrate")
    if not 0 <= min_gain < 1:
        raise ValueError(f"calibrate: min_gain must be in [0, 1), got {min_gain!r}")
    if sensitivity not in ("auto", "exact", "taylor"):
        raise ValueError(f"calibrate: sensitivity must be 'auto', 'exact' or 'taylor', got {sensitivity!r}")
    if not 0 <= recheck <= 1:
        raise ValueError(f"calibrate: recheck must be in [0, 1], got {recheck!r}")
    if sensitivity == "auto":
        sensitivity = "exact" if len(names) <= EXACT_MAX_LAYERS else "taylor"
    inputs = layer_inputs(model, names, batches, max_tokens, seed)
    base_nll = mean_nll(model)
    if not math.isfinite(base_nll):
        raise ValueError(f"calibrate: the float model's calibration NLL is {base_nll}")
    records = {}
    for name in names:
        linear = cast(nn.Linear, model.get_submodule(name))
        per_tensor = output_error(inputs[name], linear, per_channel=False)
        per_row = output_error(inputs[name], linear, per_channel=True)
        records[name] = LayerCalibration(
            name,
            linear.out_features,
            linear.in_features,
            per_tensor,
            per_row,
            choose_per_channel(per_tensor, per_row, min_gain),
            math.nan,
        )
    del inputs  # the Taylor pass needs the memory more

    def measure(name: str) -> None:
        record = records[name]
        record.loss_increase = loss_increase(model, name, record.per_channel, mean_nll, base_nll)
        record.loss_increase_method = "exact"

    if sensitivity == "exact":
        for name in names:
            measure(name)
    else:
        _estimate_taylor(model, records, batches, base_nll)
        ranked = sorted(names, key=lambda n: records[n].loss_increase, reverse=True)
        # at least twice the flags, so that the flags are chosen among more measured candidates
        count = max(2 * n_sensitive, math.ceil(recheck * len(names))) if recheck else 0
        for name in ranked[:count]:
            measure(name)
        while recheck:  # a layer only estimated can still rank among the flags: measure it too
            top = sorted(names, key=lambda n: records[n].loss_increase, reverse=True)[:n_sensitive]
            estimated = [n for n in top if records[n].loss_increase_method != "exact"]
            if not estimated:
                break
            for name in estimated:
                measure(name)
    ordered = [records[name] for name in names]
    for record in sorted(ordered, key=lambda r: r.loss_increase, reverse=True)[:n_sensitive]:
        record.sensitive = True
    return ordered


def _estimate_taylor(
    model: nn.Module, records: dict[str, LayerCalibration], batches: list[dict], base_nll: float
) -> None:
    """Set every record's Taylor estimate (and, for now, its ``loss_increase``) from one forward
    and one backward pass, after checking that the loss differentiated is ``base_nll``'s."""
    chosen = {name: record.per_channel for name, record in records.items()}
    loss, terms = taylor_increases(model, list(records), batches, ternary_output(chosen))
    if abs(loss - base_nll) > 1e-4 * max(1.0, abs(base_nll)):
        raise ValueError(
            f"calibrate: the next-token NLL of the batches ({loss:.6f}) is not what mean_nll measures "
            f"({base_nll:.6f}); pass the labels mean_nll scores in the batches, or sensitivity='exact'"
        )
    for name, (first, second) in terms.items():
        record = records[name]
        record.loss_increase = record.loss_increase_estimate = first + second
        record.loss_increase_method = "taylor"
