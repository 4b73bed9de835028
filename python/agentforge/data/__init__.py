"""Offline data: a locally trained tokenizer, text sources, verifiable task families, dataset builders.

    tok = train_tokenizer(load_text("stdlib", max_docs=200), vocab_size=2048)
    items = make_split("chain_sum", "train", 1000, seed=0, level=0)
    train = pack_tasks(tok, items, seq_len=64, seed=0)          # loss on answers only
    test = make_split("chain_sum", "test", 200, seed=0, level=0)
    accuracy = sum(score(item, generate(item.prompt)) for item in test) / len(test)

Nothing is downloaded; optional sources raise MissingDataPackage with their install command.

Names are imported on first use (PEP 562): the builders pull in `datasets` (~1.5 s) and the
tokenizer `transformers`, which task generation and scoring do not need.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the lazy names, for type checkers (re-exported: __all__ below is built from _MODULE_OF)
    from agentforge.data.builders import document_split, mixture, pack_tasks, pack_text, text_splits  # noqa: F401
    from agentforge.data.sources import SOURCES, MissingDataPackage, load_records, load_text, smollm2_gguf  # noqa: F401
    from agentforge.data.tasks import DOMAINS, FAMILIES, NUM_LEVELS, TaskFamily, TaskItem, make_split, rendered, score  # noqa: F401
    from agentforge.data.tokenizer import train_tokenizer  # noqa: F401

_MODULE_OF = {
    "train_tokenizer": "tokenizer",
    **dict.fromkeys(["SOURCES", "MissingDataPackage", "load_text", "load_records", "smollm2_gguf"], "sources"),
    **dict.fromkeys(
        ["TaskItem", "TaskFamily", "FAMILIES", "DOMAINS", "NUM_LEVELS", "make_split", "rendered", "score"], "tasks"
    ),
    **dict.fromkeys(["pack_text", "text_splits", "document_split", "pack_tasks", "mixture"], "builders"),
}
__all__ = list(_MODULE_OF)


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'agentforge.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"agentforge.data.{_MODULE_OF[name]}"), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
