"""The data spec of a run: which documents and task levels every phase trains and evaluates on.

One per run, in the run config (``data:``), recorded by the first phase as its ``data`` artifact
(``data.json``) and handed to every later phase, so no phase re-derives it or overrides it.
Together with the run's seed it fixes the text splits (whole documents, shuffled by the seed)
and the task items of every split (see ``agentforge.eval.EvalSuite``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from agentforge.errors import ConfigError
from agentforge.settings import Checked, from_dict, setting, to_dict

DATA_FILE = "data.json"
DATA_ARTIFACT = "data"  # the first phase hands the spec over under this name; it is not a model


@dataclass
class DataSpec(Checked):
    seq_len: int = setting(64, "[8, 8192]", doc="tokens per packed text and task row")
    text_docs: int = setting(300, "[10, 100000]", doc="Python stdlib source files (pydoc prose is always added)")
    task_levels: list[int] = setting([0, 1], "[0, 9]", length="[1, 10]", doc="task difficulty levels")
    prompts: str = setting(
        "auto",
        choices=("auto", "plain", "chat"),
        doc="task prompts as compact questions (plain) or in the tokenizer's chat template "
        "(chat); auto: chat when the tokenizer has a template (an instruct model)",
    )


PRESETS: dict[str, DataSpec] = {
    "micro": DataSpec(seq_len=48, text_docs=20, task_levels=[0]),
    "tiny": DataSpec(),
    "small": DataSpec(seq_len=256, text_docs=1500, task_levels=[0, 1, 2, 3]),
    # a pretrained 135M instruct model (SmolLM2): rows hold a chat-templated task or two
    "smol": DataSpec(seq_len=128, text_docs=200, task_levels=[0, 1]),
}


def write_data_spec(path: str | Path, spec: DataSpec, seed: int) -> Path:
    """``data.json``: the spec and the seed that split the data."""
    from agentforge.artifacts import atomic_write_json

    atomic_write_json(path, {"spec": to_dict(spec), "seed": seed})
    return Path(path)


def read_data_spec(path: str | Path) -> tuple[DataSpec, int]:
    """``(spec, seed)`` from a ``data.json``; a malformed one is a ``ConfigError``."""
    path = Path(path)
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: not a readable data spec ({e})") from None
    if not isinstance(record, dict) or not isinstance(record.get("seed"), int):
        raise ConfigError(f"{path}: expected {{'spec': {{...}}, 'seed': int}}")
    return from_dict(DataSpec, record.get("spec"), str(path)), record["seed"]
