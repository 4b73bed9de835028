"""A small real phase for the pipeline tests (see pipeline_helpers.TEST_PHASES): it builds a tiny
Llama from a config and hands it over as ``model``, with the run's data spec as ``data`` (the
first phase of a pipeline records it). A test of the orchestration then takes a second."""

from dataclasses import dataclass

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from agentforge.data.spec import DATA_FILE, write_data_spec
from agentforge.runtime import Built, PhaseResult, PhaseRun, PhaseSpec, a_file, model_dir
from agentforge.settings import Checked, setting


@dataclass
class Settings(Checked):
    hidden_size: int = setting(16, "[2, 256]")
    layers: int = setting(1, "[1, 4]")


PRESETS = {
    "micro": Settings(),
    "tiny": Settings(hidden_size=32),
    "small": Settings(hidden_size=64, layers=2),
    "smol": Settings(),
}


def new_model(settings: Settings) -> LlamaForCausalLM:
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=settings.hidden_size,
            intermediate_size=32,
            num_hidden_layers=settings.layers,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=32,
        )
    )


def run(p: PhaseRun) -> PhaseResult:
    torch.manual_seed(p.seed)
    model = p.model_step("model", lambda: Built(new_model(p.settings), None, {"role": "seedling"}))
    p.say(f"{model.model.num_parameters()} parameters")
    data = write_data_spec(p.out_dir / DATA_FILE, p.data, p.seed) if p.is_main else p.out_dir / DATA_FILE
    return p.finish({"model": model.path, "data": data}, {"model/parameters": model.model.num_parameters()})


SPEC = PhaseSpec(
    number=1,
    name="seedling",
    summary="a tiny Llama from a config",
    settings=Settings,
    presets=PRESETS,
    run=run,
    provides={"model": model_dir, "data": a_file},
)
