"""Ternary-conversion helpers of the BitNet phase (phase 4), usable by any BitLinear model:

* ``calibration``: per-layer output errors of per-tensor and per-channel scales, the choice,
  and end-to-end sensitivity;
* ``qat``: conversion as calibrated, the quantization warm-up λ, the STE gradient-flow check;
* ``accounting``: bytes on disk, bits per weight and sparsity of a packed model directory.

Speed and memory of a packed model against its float original: ``agentforge.eval.speed``.
"""

from agentforge.quant.accounting import safetensors_bytes, ternary_layer_stats, totals
from agentforge.quant.calibration import LayerCalibration, calibrate, choose_per_channel, layer_inputs, output_error
from agentforge.quant.qat import (
    bitlinear_layers,
    convert_as_calibrated,
    gradient_flow,
    require_state,
    set_lambda,
    warmup_lambda,
)

__all__ = [
    "LayerCalibration",
    "calibrate",
    "choose_per_channel",
    "layer_inputs",
    "output_error",
    "bitlinear_layers",
    "convert_as_calibrated",
    "gradient_flow",
    "require_state",
    "set_lambda",
    "warmup_lambda",
    "safetensors_bytes",
    "ternary_layer_stats",
    "totals",
]
