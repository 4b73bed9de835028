"""Ternary-conversion helpers of the BitNet phase (phase 4), usable by any BitLinear model:

* ``calibration``: per-layer output errors of per-tensor and per-channel scales, the choice,
  and end-to-end sensitivity;
* ``qat``: conversion as calibrated, the quantization warm-up λ, the STE gradient-flow check;
* ``accounting``: bytes on disk, bits per weight and sparsity of a packed model directory;
* ``benchmark``: generation speed, time share of the ternary layers and memory, packed vs float.
"""
from agentforge.quant.accounting import safetensors_bytes, ternary_layer_stats, totals
from agentforge.quant.benchmark import generation_memory, layer_time_share, resident_tensor_bytes, speed_report
from agentforge.quant.calibration import LayerCalibration, calibrate, choose_per_channel, layer_inputs, output_error
from agentforge.quant.qat import (bitlinear_layers, convert_as_calibrated, gradient_flow, require_state, set_lambda,
                                 warmup_lambda)

__all__ = ["LayerCalibration", "calibrate", "choose_per_channel", "layer_inputs", "output_error",
           "bitlinear_layers", "convert_as_calibrated", "gradient_flow", "require_state", "set_lambda", "warmup_lambda",
           "safetensors_bytes", "ternary_layer_stats", "totals",
           "generation_memory", "layer_time_share", "resident_tensor_bytes", "speed_report"]
