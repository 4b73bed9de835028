"""Phase 4, BitNet: ternary (b1.58) conversion, calibration, STE fine-tuning with a quantization
warm-up, and a packed model that runs on the ternary kernels.

Input ``model``: any HF causal LM directory with a tokenizer (in the pipeline, the Quiet-STaR
model). Steps:

1. Calibration (``agentforge.quant.calibration``) on training-split text rows: for every
   ``nn.Linear`` outside ``skip`` (embeddings and LM head by default), the layer's output error
   with one weight scale per tensor and per output row, the chosen scheme, and the loss increase
   when that layer alone is ternary; the most sensitive layers are flagged (and, only if asked,
   the top ``keep_sensitive_fp`` of them stay float).
2. Conversion (``convert_to_bitnet``); each layer gets its chosen scales, recorded per layer in
   config.json's ``quantization_config``.
3. STE fine-tuning through ``agentforge.train.train`` with MuGrokfast ("qat") on a mixture of
   training text and task rows, with the quantization warm-up of the Hugging Face 1.58-bit
   recipe: every BitLinear computes with ``w + λ·(q(w) − w)`` and ``x + λ·(q(x) − x)``, where
   ``λ = min(step / warm-up steps, 1)``, the linear schedule that recipe found best (WikiText
   ppl 12.2 against ≈13.5 for sigmoid and ≈15 for exponential schedules on Llama3-8B). λ
   reaches 1 well before the end, so the last steps train exactly the ternary forward pass.
   A copy of the float model is always fine-tuned alike (same rows, steps and optimizer): the
   control, so that the headline separates what ternary weights cost from what training gave.
4. Outputs, both HF model directories (``AutoModelForCausalLM.from_pretrained`` after
   ``import agentforge``): ``latent/`` (training-state BitLinear layers with latent weights,
   which phases 5–7 keep training through the STE) and ``packed/`` (2-bit codes and scales
   only, run by the ternary kernels). A gradient-flow check on the reloaded latent model
   requires a finite, non-zero gradient for every latent weight.
5. Measurements on held-out data the model never trained on (the test split of the documents
   and task prompts): perplexity, task accuracy and answer NLL of the float input, the ternary
   model before fine-tuning, the packed model after and the float control; the headline is the
   packed model against the control (perplexity ratio and accuracy, paired 95 % intervals);
   bytes on disk, bits per weight and sparsity per ternary layer; generation tokens/s at each
   batch size, the share of generation time spent in the converted layers, and peak memory,
   packed (kernels) against float (``F.linear``).

Outputs in the phase directory: ``latent/``, ``packed/``, ``train/ternary`` and
``train/fp_control`` (checkpoints and training metrics, λ included), ``metrics.jsonl`` and
``summary.json``.

Run alone: ``python -m agentforge.phases.bitnet --model DIR --preset tiny --out DIR``.
"""

from __future__ import annotations

import copy
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from agentforge.errors import ConfigError
from agentforge.quant import (
    bitlinear_layers,
    convert_as_calibrated,
    gradient_flow,
    require_state,
    set_lambda,
    warmup_lambda,
)
from agentforge.quietstar import head_files
from agentforge.runtime import Built, Effect, Input, PhaseResult, PhaseRun, PhaseSpec, model_dir, standalone_main
from agentforge.settings import Checked, check_micro_batch, micro_batch_setting, setting


@dataclass
class Settings(Checked):
    """How the phase converts, fine-tunes and measures (per-preset values in ``PRESETS``)."""

    skip: list[str] = setting(["lm_head", "embed"], doc="Linear name patterns that stay float")
    calibration_rows: int = setting(16, "[1, 100000]", doc="training-split text rows the calibration reads")
    calibration_tokens: int = setting(2048, "[1, 10000000]", doc="recorded inputs per layer (output error)")
    per_channel_min_gain: float = setting(0.05, "[0, 1)", doc="per-row scales must cut a layer's error by this")
    sensitive_layers: int = setting(3, "[0, 10000]", doc="layers flagged as the most sensitive")
    keep_sensitive_fp: int = setting(0, "[0, 10000]", doc="of those, how many stay float")
    steps: int = setting(100, "[1, 10000000]")
    batch_size: int = setting(32, "[1, 65536]")
    micro_batch_size: int = micro_batch_setting()
    lambda_warmup_fraction: float = setting(0.2, "[0, 1]", doc="λ rises linearly 0 -> 1 over this share of steps")
    text_weight: float = setting(0.4, "(0, 1)", doc="share of text rows in the fine-tuning mixture")
    train_items: int = setting(500, "[1, 1000000]", doc="training task items per family and level")
    checkpoint_every: int = setting(50, "[0, 10000000]")
    eval_items: int = setting(50, "[1, 100000]", doc="test items per family and level")
    eval_text_rows: int = setting(256, "[1, 1000000]")
    eval_batch_size: int = setting(64, "[1, 65536]")
    speed_batch_sizes: list[int] = setting([1, 8], "[1, 4096]", length="[1, 16]")
    speed_prompt_len: int = setting(16, "[1, 65536]")
    speed_new_tokens: int = setting(16, "[1, 65536]")
    measure_memory: bool = setting(True, doc="peak memory of each model in a fresh process (seconds each)")
    head_steps: int = setting(
        10,
        "[0, 100000]",
        doc="steps re-fitting a Quiet-STaR thinking head (if the input "
        "has one) to the ternary model; 0 carries it as it is",
    )
    head_items: int = setting(100, "[1, 100000]", doc="training items per family and level for the head")

    def check(self) -> None:
        if self.keep_sensitive_fp > self.sensitive_layers:
            self.fail("keep_sensitive_fp", f"must be at most sensitive_layers ({self.sensitive_layers})")
        if not all(self.skip):
            self.fail("skip", "must hold non-empty name patterns")
        check_micro_batch(self)


PRESETS: dict[str, Settings] = {
    "micro": Settings(
        calibration_rows=4,
        calibration_tokens=256,
        sensitive_layers=2,
        steps=6,
        batch_size=8,
        train_items=40,
        checkpoint_every=3,
        eval_items=4,
        eval_text_rows=16,
        eval_batch_size=32,
        speed_batch_sizes=[1, 2],
        speed_new_tokens=4,
        measure_memory=False,
        head_steps=2,
        head_items=8,
    ),
    "tiny": Settings(),
    "small": Settings(
        calibration_rows=64,
        calibration_tokens=8192,
        sensitive_layers=5,
        steps=2000,
        batch_size=64,
        train_items=5000,
        checkpoint_every=250,
        eval_items=100,
        eval_text_rows=512,
        speed_new_tokens=32,
    ),
    "smol": Settings(
        calibration_rows=8,
        calibration_tokens=1024,
        steps=40,
        batch_size=8,
        micro_batch_size=2,  # a whole batch's activations took the peak past 6 GB
        train_items=100,
        checkpoint_every=20,
        eval_items=8,
        eval_text_rows=32,
        eval_batch_size=8,
        speed_batch_sizes=[1],
        speed_new_tokens=8,
        head_steps=4,
        head_items=16,
    ),
}


# ---------------------------------------------------------------------------------------------
# data and measurements


@dataclass
class PhaseData:
    calibration: Any  # training-split text rows (Dataset)
    train_rows: Any  # the fine-tuning mixture of text and task rows
    held: Any  # HeldOut: test-split text rows and task items


def build_data(p: PhaseRun, tokenizer) -> PhaseData:
    """Calibration rows, the fine-tuning rows and the held-out test set."""
    settings, suite = p.settings, p.suite(tokenizer)
    train = suite.splits["train"]
    return PhaseData(
        calibration=train.shuffle(seed=p.seed).select(range(min(settings.calibration_rows, len(train)))),
        train_rows=suite.training_mixture(
            settings.train_items, settings.text_weight, settings.steps * settings.batch_size
        ),
        held=suite.held_out("test", settings.eval_items, settings.eval_text_rows),
    )


def measure(p: PhaseRun, model, tokenizer, data: PhaseData) -> dict:
    return p.suite(tokenizer).measure(model, data.held, batch_size=p.settings.eval_batch_size)


@torch.no_grad()
def max_logit_difference(a, b, rows) -> float:
    """Largest absolute difference between two models' logits on ``rows`` (a Dataset); both
    models are freshly loaded, so eval mode is already theirs."""
    ids = torch.tensor(rows["input_ids"])
    return float((a(input_ids=ids).logits - b(input_ids=ids).logits).abs().max())


# ---------------------------------------------------------------------------------------------
# conversion and fine-tuning


def finetune(p: PhaseRun, model, rows, stage: str):
    """STE fine-tuning with the λ warm-up, MuGrokfast "qat" and the shared trainer, in
    ``train/<stage>``. λ is read from the optimizer's own step count, which a resumed run
    restores; each logged row carries it. A model without BitLinear layers (the float control)
    trains the same way, without λ."""
    from agentforge.optim import MuGrokfast
    from agentforge.train import default_loss

    settings = p.settings
    layers = list(bitlinear_layers(model).values())
    optimizer = MuGrokfast.from_preset(model, "qat", total_steps=settings.steps)
    warmup_steps = round(settings.lambda_warmup_fraction * settings.steps)

    def loss_fn(wrapped, batch):
        if not layers:
            return default_loss(wrapped, batch)
        lam = warmup_lambda(optimizer.steps_done, warmup_steps)
        set_lambda(layers, lam)
        return default_loss(wrapped, batch), {"lambda": lam}

    try:
        return p.train(
            model,
            rows,
            stage,
            optimizer=optimizer,
            steps=settings.steps,
            batch_size=settings.batch_size,
            micro_batch_size=settings.micro_batch_size or None,
            loss_fn=loss_fn,
            checkpoint_every=settings.checkpoint_every,
            log_every=5,
        )
    finally:
        set_lambda(layers, 1.0)  # the model leaves fine-tuning fully ternary, as it is saved


def thinking_head(p: PhaseRun, student, fp):
    """The input's Quiet-STaR thinking head, when it has one, re-fitted to the ternary model: its
    mixing weights read hidden states that conversion and STE fine-tuning changed, so with the
    model frozen the head alone trains ``head_steps`` Quiet-STaR steps on training task rows.
    Returns the ``write_extra`` that saves it (None without a head)."""
    from agentforge.quietstar import ThinkingModel

    if not head_files(fp.path):
        return None
    thinker = ThinkingModel.attach(student, fp.path)
    if p.settings.head_steps:
        suite = p.suite(fp.tokenizer)
        rows = suite.rows(suite.items("train", p.settings.head_items))
        frozen = [param for param in student.parameters() if param.requires_grad]
        for param in frozen:
            param.requires_grad_(False)
        try:
            optimizer = torch.optim.AdamW(thinker.mixing_head.parameters(), lr=1e-3)
            p.train(
                thinker,
                rows,
                "thinking_head",
                optimizer=optimizer,
                steps=p.settings.head_steps,
                batch_size=p.settings.batch_size,
                micro_batch_size=p.settings.micro_batch_size or None,
                loss_fn=lambda model, batch: thinking_loss(model, batch),
            )
        finally:
            for param in frozen:
                param.requires_grad_(True)
    return thinker.save_extras


def thinking_loss(model, batch):
    out = model(input_ids=batch["input_ids"], labels=batch["labels"])
    return out.loss, out.metrics


def calibrate(p: PhaseRun, fp, data: PhaseData) -> list[dict]:
    from agentforge.eval import perplexity
    from agentforge.nn.convert import linear_names
    from agentforge.quant import calibrate as calibrate_layers

    settings = p.settings
    names = linear_names(fp, tuple(settings.skip))
    if not names:
        raise ConfigError(
            f"bitnet: {type(fp).__name__} has no nn.Linear layer outside the skip patterns {settings.skip}"
        )

    def mean_nll(model) -> float:
        return math.log(perplexity(model, data.calibration, batch_size=settings.eval_batch_size))

    rows, size = data.calibration, settings.eval_batch_size
    batches = [{"input_ids": torch.tensor(rows[i : i + size]["input_ids"])} for i in range(0, len(rows), size)]
    records = calibrate_layers(
        fp,
        names,
        batches,
        mean_nll,
        min_gain=settings.per_channel_min_gain,
        n_sensitive=settings.sensitive_layers,
        max_tokens=settings.calibration_tokens,
        seed=p.seed,
    )
    return [r.to_dict() for r in records]


# ---------------------------------------------------------------------------------------------
# the phase


def ternary_outputs(
    p: PhaseRun, fp, data: PhaseData, calibration: list[dict], reports: dict
) -> tuple[dict, Path, Path]:
    """Convert a copy of the input as calibrated, measure it, fine-tune it, save it (latent) and
    pack it in place (packed: no second copy). Returns the quantization record and both
    directories; the model itself is let go here, before the float control trains."""
    from agentforge.nn import pack_bitnet

    settings, tokenizer = p.settings, fp.tokenizer
    student = copy.deepcopy(fp.model)
    kept = convert_as_calibrated(student, calibration, settings.skip, settings.keep_sensitive_fp)
    quant = {
        "calibration": calibration,
        "kept_fp": kept,
        "skip": list(settings.skip),
        "lambda_warmup_steps": round(settings.lambda_warmup_fraction * settings.steps),
    }
    reports["ternary_before"] = p.step("measure_ternary_before", lambda: measure(p, student, tokenizer, data))

    def build_latent() -> Built:
        finetune(p, student, data.train_rows, "ternary")
        return Built(
            student,
            tokenizer,
            {"role": "latent", "quantization": quant, "parents": [fp.path]},
            write_extra=thinking_head(p, student, fp),
        )

    latent = p.model_step("latent", build_latent)
    packed = p.model_step(
        "packed",
        lambda: Built(
            pack_bitnet(latent.model),
            tokenizer,
            {"role": "packed", "quantization": quant, "parents": [fp.path]},
            carry=head_files(latent.path),
        ),
    )
    return quant, latent.path, packed.path


def run(p: PhaseRun) -> PhaseResult:
    """Calibrate, convert, fine-tune, pack, train the float control, verify and measure."""
    from agentforge.eval.speed import release_freed_memory

    torch.manual_seed(p.seed)
    fp = p.load("model")
    if fp.tokenizer is None:
        raise ConfigError(f"bitnet: {fp.path} has no tokenizer; the phase needs one to build its data")
    tokenizer, data = fp.tokenizer, build_data(p, fp.tokenizer)
    reports = {"fp": p.step("measure_fp", lambda: measure(p, fp.model, tokenizer, data))}
    calibration = p.step("calibrate", lambda: calibrate(p, fp.model, data))
    quant, latent_dir, packed_dir = ternary_outputs(p, fp, data, calibration, reports)
    release_freed_memory()  # the ternary model is on disk; the control's training state takes its place

    def control_report() -> dict:
        control = copy.deepcopy(fp.model)
        finetune(p, control, data.train_rows, "fp_control")
        return measure(p, control, tokenizer, data)

    reports["fp_control"] = p.step("fp_control", control_report, everywhere=True)
    summary = verify_and_measure(p, fp, latent_dir, packed_dir, data, reports, quant)
    return p.finish(
        {"packed": packed_dir, "latent": latent_dir},
        flat_metrics(summary),
        summary,
        rows={"layer": layer_rows(summary)},
        effects=effects(reports, p.seed),
    )


def effects(reports: dict, seed: int) -> list[Effect]:
    """The packed ternary model against the float control trained alike, on held-out data: the
    perplexity ratio and the accuracy difference (paired over rows and items, 95 % intervals)."""
    from agentforge.eval.stats import paired_difference, perplexity_ratio

    packed, control = reports["finetuned"], reports["fp_control"]
    ratio = perplexity_ratio(
        packed["text_rows"]["nll"], control["text_rows"]["nll"], packed["text_rows"]["tokens"], seed=seed
    )
    accuracy = paired_difference(all_scores(packed), all_scores(control), seed=seed)
    return [
        Effect.of(
            "text perplexity ratio, packed ternary",
            "the float model fine-tuned alike",
            ratio,
            better="lower",
            neutral=1.0,
        ),
        Effect.of("task accuracy, packed ternary", "the float model fine-tuned alike", accuracy),
    ]


def all_scores(report: dict) -> list[float]:
    """Every held-out item's score, domain after domain."""
    return [score for scores in report["scores"].values() for score in scores]


def verify_and_measure(
    p: PhaseRun, fp, latent_dir: Path, packed_dir: Path, data: PhaseData, reports: dict, quant: dict
) -> dict:
    """Reload both outputs as they will be consumed, check them, and measure everything the
    summary reports."""
    from agentforge.artifacts import load_model_dir
    from agentforge.eval import perplexity
    from agentforge.eval.speed import speed_report

    settings, tokenizer = p.settings, fp.tokenizer
    latent, packed = load_model_dir(latent_dir)[0], load_model_dir(packed_dir)[0]
    require_state(latent, "training", str(latent_dir))
    require_state(packed, "packed", str(packed_dir))
    grad = gradient_flow(latent, {k: torch.tensor(v) for k, v in data.train_rows[: settings.batch_size].items()})
    if not grad["ok"]:
        raise RuntimeError(
            f"bitnet: no finite, non-zero STE gradient reaches the latent weights of {grad['bad_layers']}"
        )
    reports["finetuned"] = p.step("measure_packed", lambda: measure(p, packed, tokenizer, data))
    latent_ppl = p.step(
        "measure_latent", lambda: perplexity(latent, data.held.text, batch_size=settings.eval_batch_size)
    )
    sizes = layer_sizes(fp.path, packed_dir, packed, latent)
    speed = p.step(
        "speed",
        lambda: speed_report(
            {"fp": fp.model, "packed": packed},
            {"fp": fp.path, "packed": packed_dir},
            list(sizes["layers"]),
            batch_sizes=settings.speed_batch_sizes,
            prompt_len=settings.speed_prompt_len,
            new_tokens=settings.speed_new_tokens,
            memory=settings.measure_memory,
        ),
    )
    return {
        "quantization": quant,
        "models": reports,
        "finetuned_latent_perplexity": latent_ppl,
        "latent_packed_max_logit_diff": max_logit_difference(
            latent, packed, data.held.text.select(range(min(8, len(data.held.text))))
        ),
        "targets": targets(reports),
        "gradient_flow": grad,
        "sizes": sizes,
        "speed": speed,
        "machine": {
            "device": "cpu",
            "threads": torch.get_num_threads(),
            "load_average": os.getloadavg(),
            "kv_cache": bool(getattr(fp.model.generation_config, "use_cache", True)),
        },
    }


def layer_sizes(source: Path, packed_dir: Path, packed, latent) -> dict:
    """Bytes on disk of the float input and the packed output, and per ternary layer its stored
    bits per weight and sparsity (with weighted totals)."""
    from agentforge.quant import safetensors_bytes, ternary_layer_stats, totals

    stats = ternary_layer_stats(packed_dir, {n: m.in_features for n, m in bitlinear_layers(packed).items()})
    sizes = {
        "fp_bytes": safetensors_bytes(source),
        "packed_bytes": safetensors_bytes(packed_dir),
        **totals(stats),
        "fp_ternary_layer_bytes": sum(
            m.weight.numel() * m.weight.element_size() for m in bitlinear_layers(latent).values()
        ),
        "layers": stats,
    }
    sizes["size_ratio"] = sizes["fp_bytes"] / sizes["packed_bytes"]
    return sizes


def retention(after: dict, reference: dict) -> float | None:
    """Mean task accuracy relative to the reference's; undefined (None) when the reference scores 0."""
    return after["accuracy_mean"] / reference["accuracy_mean"] if reference["accuracy_mean"] > 0 else None


def targets(reports: dict) -> dict:
    """The targets: perplexity after fine-tuning ≤ 1.3× the float model's, mean task accuracy
    ≥ 80 % of the float model's; and the same ratios against the float control trained alike."""
    fp, after = reports["fp"], reports["finetuned"]
    ratio, kept = after["perplexity"] / fp["perplexity"], retention(after, fp)
    out = {
        "perplexity_ratio": ratio,
        "perplexity_ratio_before": reports["ternary_before"]["perplexity"] / fp["perplexity"],
        "accuracy_retention": kept,
        "perplexity_target_met": ratio <= 1.3,
        "accuracy_target_met": None if kept is None else kept >= 0.8,
    }
    out["perplexity_ratio_vs_control"] = after["perplexity"] / reports["fp_control"]["perplexity"]
    out["accuracy_retention_vs_control"] = retention(after, reports["fp_control"])
    return out


def layer_rows(summary: dict) -> list[dict]:
    stats = summary["sizes"]["layers"]
    return [
        {
            **record,
            **{
                k: v
                for k, v in stats.get(record["name"], {}).items()
                if k in ("sparsity", "bits_per_weight", "bits_per_weight_with_scales")
            },
        }
        for record in summary["quantization"]["calibration"]
    ]


def flat_metrics(summary: dict) -> dict:
    """The headline numbers as one flat row (metrics.jsonl and the pipeline report)."""
    row = {}
    for name, report in summary["models"].items():
        row.update({f"{name}/{k}": v for k, v in report.items() if not isinstance(v, dict)})
        row.update({f"{name}/accuracy/{d}": v for d, v in report["accuracy"].items()})
    row.update({k: v for k, v in summary["targets"].items() if v is not None})
    sizes = summary["sizes"]
    row.update({k: v for k, v in sizes.items() if k != "layers"})
    for name, report in summary["speed"].items():
        row.update({f"{name}/{k}": v for k, v in report.items() if not isinstance(v, dict)})
        if "generation_memory" in report:
            row[f"{name}/generation_peak_bytes"] = report["generation_memory"]["peak_bytes"]
            row[f"{name}/generation_model_bytes"] = report["generation_memory"]["model_bytes"]
    fp_speed, packed_speed = summary["speed"]["fp"], summary["speed"]["packed"]
    for key in (k for k in fp_speed if k.startswith("tokens_per_s_b")):
        row[f"speedup_{key.removeprefix('tokens_per_s_')}"] = packed_speed[key] / fp_speed[key]
    calibration = summary["quantization"]["calibration"]
    row.update(
        {
            "finetuned/perplexity_latent": summary["finetuned_latent_perplexity"],
            "latent_packed_max_logit_diff": summary["latent_packed_max_logit_diff"],
            "ternary_layers": len(sizes["layers"]),
            "per_channel_layers": sum(r["per_channel"] for r in calibration),
            "kept_fp_layers": len(summary["quantization"]["kept_fp"]),
            "gradient_flow_ok": summary["gradient_flow"]["ok"],
            "min_latent_grad_norm": summary["gradient_flow"]["min_grad_norm"],
        }
    )
    return row


SPEC = PhaseSpec(
    number=4,
    name="bitnet",
    summary="ternary (b1.58) conversion, calibration, STE fine-tuning with λ warm-up",
    settings=Settings,
    presets=PRESETS,
    run=run,
    needs={"model": Input("quietstar.model", "input HF causal LM directory (with tokenizer)")},
    provides={"packed": model_dir, "latent": model_dir},
    figures="agentforge.figures.bitnet",
)


def main(argv: list[str] | None = None) -> int:
    return standalone_main(SPEC, argv)


if __name__ == "__main__":
    sys.exit(main())
