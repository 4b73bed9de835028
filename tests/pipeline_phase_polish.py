"""A small real phase for the pipeline tests: trains the model it is handed for a few steps with
agentforge.train (checkpoints included) and hands the result over as ``model``, naming its input
as the parent."""

from dataclasses import dataclass
from pathlib import Path

import torch

from agentforge.runtime import Built, Input, PhaseResult, PhaseRun, PhaseSpec, model_dir
from agentforge.settings import Checked, setting
from train_worker_tiny import counting_dataset


@dataclass
class Settings(Checked):
    steps: int = setting(4, "[1, 1000]")
    lr: float = setting(0.01, "(0, 1]")


PRESETS = {"micro": Settings(), "tiny": Settings(steps=8), "small": Settings(steps=16), "smol": Settings(steps=8)}


def run(p: PhaseRun) -> PhaseResult:
    source = p.load("model")

    def build() -> Built:
        result = p.train(
            source.model,
            counting_dataset(rows=32),
            "train",
            steps=p.settings.steps,
            batch_size=8,
            optimizer=torch.optim.AdamW(source.model.parameters(), lr=p.settings.lr),
            log_every=1,
            checkpoint_every=2,
        )
        return Built(source.model, None, {"parents": [source.path], "final_loss": result.losses[-1]})

    model = p.model_step("model", build)
    return p.finish({"model": model.path}, {"model/final_loss": model.metadata["final_loss"]})


def figures(phase_dir: Path) -> list:
    """One figure, drawn from the training metrics."""
    from matplotlib.figure import Figure

    from agentforge.train import read_metrics

    source = phase_dir / "train" / "train" / "metrics.jsonl"
    rows = read_metrics(source)
    fig = Figure(figsize=(4, 3))
    fig.add_subplot().plot([r["step"] for r in rows], [r["grad_norm"] for r in rows])
    return [("Gradient norm per step", fig, [source])]


SPEC = PhaseSpec(
    number=2,
    name="polish",
    summary="a few training steps",
    settings=Settings,
    presets=PRESETS,
    run=run,
    needs={"model": Input("seedling.model", "the model to train")},
    provides={"model": model_dir},
    figures="pipeline_phase_polish",
)
