"""A small real phase for the pipeline tests: trains the model it is handed for a few steps with
agentforge.train (checkpoints included) and hands the result over as ``model``, naming its input
as the parent."""
from dataclasses import dataclass
from pathlib import Path

import torch

from agentforge.artifacts import load_model_dir, save_model_dir
from agentforge.phases import PhaseContext, PhaseResult
from agentforge.train import TrainConfig, train
from train_worker_tiny import counting_dataset

NAME = "polish"


@dataclass
class Settings:
    steps: int = 4
    lr: float = 0.01


PRESETS = {"micro": Settings(), "tiny": Settings(steps=8), "small": Settings(steps=16)}


def run(inputs: dict, settings: Settings, ctx: PhaseContext) -> PhaseResult:
    model, _, _ = load_model_dir(inputs["model"])
    result = train(model, counting_dataset(rows=32), TrainConfig(steps=settings.steps, batch_size=8, log_every=1,
                                                                 checkpoint_every=2, seed=ctx.seed, progress=False),
                   optimizer=torch.optim.AdamW(model.parameters(), lr=settings.lr), out_dir=ctx.out_dir / "train",
                   phase=f"{NAME}/train")
    path = ctx.out_dir / "model"
    if ctx.is_main:
        save_model_dir(model, None, path, {"phase": NAME, "parents": [str(Path(inputs["model"]))]})
    return PhaseResult(artifacts={"model": path}, metrics={"model/final_loss": result.losses[-1]})


def figures(phase_dir: Path) -> list:
    """One figure, drawn from the training metrics."""
    from matplotlib.figure import Figure

    from agentforge.train import read_metrics

    source = phase_dir / "train" / "metrics.jsonl"
    rows = read_metrics(source)
    fig = Figure(figsize=(4, 3))
    fig.add_subplot().plot([r["step"] for r in rows], [r["grad_norm"] for r in rows])
    return [("Gradient norm per step", fig, [source])]
