"""A small real phase for the pipeline tests (phase modules are found by name; see
pipeline_helpers.TEST_PHASES): it builds a tiny Llama from a config and hands it over as
``model``. A pipeline test of the orchestration then takes a second, not a Cognate run."""
from dataclasses import dataclass

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from agentforge.artifacts import save_model_dir
from agentforge.phases import PhaseContext, PhaseResult

NAME = "seedling"


@dataclass
class Settings:
    hidden_size: int = 16
    layers: int = 1


PRESETS = {"micro": Settings(), "tiny": Settings(hidden_size=32), "small": Settings(hidden_size=64, layers=2)}


def run(inputs: dict, settings: Settings, ctx: PhaseContext) -> PhaseResult:
    torch.manual_seed(ctx.seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=settings.hidden_size, intermediate_size=32,
                                         num_hidden_layers=settings.layers, num_attention_heads=2,
                                         num_key_value_heads=2, max_position_embeddings=32))
    path = ctx.out_dir / "model"
    ctx.say(f"{NAME}: {model.num_parameters()} parameters")
    if ctx.is_main:
        save_model_dir(model, None, path, {"phase": NAME, "parents": []})
    return PhaseResult(artifacts={"model": path}, metrics={"model/parameters": model.num_parameters()})
