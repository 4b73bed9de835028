"""Phase 1, Cognate: three sibling models with a shared ancestor.

With ``base_model`` (``agentforge run --base``) the ancestor is a pretrained causal LM instead of
a model trained here: its tokenizer (chat template and special tokens included) is the run's,
the base itself is the trunk, and each sibling is a short fine-tune of it on a mixture dominated by
its domain (LoRA merged back into the weights, or all weights), so that EvoMerge gets a shared
ancestor and three task vectors. The steps below describe the from-scratch path.

1. Data: a byte-level BPE tokenizer trained on the training split of the Python stdlib sources and
   pydoc prose, plus the training task strings;
   packed text rows; packed task rows per domain (reasoning, memory, speed; answer-only loss).
   The run's data spec (``data.json``) is recorded here and handed to every later phase.
2. Trunk: a Cognate model trained from scratch on a mixture of text and all three domains
   (MuGrokfast, "pretrain" preset, a low ponder cost so that it learns to use its recursion).
3. Siblings: three copies of the trunk, each trained further (at half the trunk's rates) on a
   mixture dominated by its own domain and given its own recursion/halting/memory behaviour
   (config fields that change no parameter shape, so the siblings stay mergeable):
       reasoning: up to 4 passes, late halting, almost no ponder cost
       memory:    memory writes every 8 tokens (not 16) at twice the write rate
       speed:     at most 2 passes, early halting, a higher ponder cost
4. Evaluation on held-out data the training never saw: text perplexity against a unigram
   control; per domain, task accuracy (greedy generation, reasoning-gym scorers) and the mean NLL
   of the answer tokens (graded where accuracy is still near zero); mean ACT passes; forward
   and generation tokens/s; parameter counts.

Outputs: ``trunk/`` and ``reasoning/``, ``memory/``, ``speed/`` (HF model directories with
tokenizer and ``agentforge.json``), ``data.json``, ``train/<stage>/`` (checkpoints and training
metrics), ``metrics.jsonl`` and ``summary.json``.

Run alone: ``python -m agentforge.phases.cognate --preset tiny --out DIR``.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from agentforge.errors import HandoffError
from agentforge.runtime import Built, Effect, PhaseResult, PhaseRun, PhaseSpec, a_file, model_dir, standalone_main
from agentforge.settings import Checked, setting

# The trunk keeps its ponder cost low, so that it learns to use its recursion before the speed
# sibling is taught to skip it (at 0.01 the trunk halted after ~1.1 passes and kept no depth).
TRUNK_BEHAVIOUR = {"ponder_weight": 0.001}
SIBLINGS: dict[str, tuple[str, dict]] = {
    "reasoning": ("reasoning", {"max_recursion": 4, "halt_epsilon": 0.001, "ponder_weight": 0.0002}),
    "memory": ("memory", {"memory_chunk": 8, "memory_max_lr": 0.2}),
    "speed": ("speed", {"max_recursion": 2, "halt_epsilon": 0.2, "ponder_weight": 0.02}),
}


@dataclass
class Settings(Checked):
    """What the phase trains on and for how long (per-preset values in ``PRESETS``)."""

    model_preset: str = setting("tiny", choices=("micro", "tiny", "small"), doc="CognateConfig preset")
    vocab_size: int = setting(2048, "[258, 65536]", doc="BPE tokens, specials included")
    train_items: int = setting(2000, "[1, 1000000]", doc="training items per family and level")
    eval_items: int = setting(100, "[1, 100000]", doc="held-out test items per family and level")
    eval_text_rows: int = setting(256, "[1, 1000000]", doc="held-out text rows: perplexity, ACT passes, throughput")
    batch_size: int = setting(32, "[1, 65536]")
    trunk_steps: int = setting(180, "[1, 10000000]")
    sibling_steps: int = setting(50, "[1, 10000000]")
    text_weight: float = setting(0.2, "(0, 1)", doc="share of text rows in the trunk mixture")
    own_domain_weight: float = setting(0.6, "(0, 1)", doc="a sibling's own domain in its mixture")
    sibling_lr_scale: float = setting(0.5, "(0, 10]", doc="sibling learning rates relative to the trunk's")
    checkpoint_every: int = setting(50, "[0, 10000000]")
    eval_batch_size: int = setting(64, "[1, 65536]")
    base_model: str | None = setting(
        None,
        doc="a pretrained causal LM to start from: an HF model directory, a "
        ".gguf file or 'smollm2' (None: train a Cognate model from scratch)",
    )
    sibling_method: str = setting(
        "lora",
        choices=("lora", "full"),
        doc="how siblings are tuned from a base: LoRA adapters merged back, or all weights",
    )
    lora_rank: int = setting(16, "[1, 1024]", doc="LoRA rank of a base's siblings")
    sibling_lr: float = setting(2e-4, "(0, 1]", doc="AdamW learning rate of a base's siblings")

    def check(self) -> None:
        # a path must exist; a packaged name is checked to be installed when the phase loads it, so
        # that the presets naming it can be built (and listed) where its package is absent
        from agentforge.models.base import PACKAGED, base_path

        if self.base_model is not None and self.base_model not in PACKAGED:
            base_path(self.base_model)


PRESETS: dict[str, Settings] = {
    "micro": Settings(
        model_preset="micro",
        vocab_size=384,
        train_items=200,
        eval_items=8,
        eval_text_rows=32,
        batch_size=8,
        trunk_steps=12,
        sibling_steps=6,
        checkpoint_every=6,
        eval_batch_size=32,
    ),
    "tiny": Settings(),
    "small": Settings(
        model_preset="small",
        vocab_size=8192,
        train_items=10000,
        eval_items=100,
        batch_size=64,
        trunk_steps=4000,
        sibling_steps=1000,
        checkpoint_every=250,
    ),
    # LoRA: full fine-tuning costs the same ~7 s a step here but needs ~1.5 GB more for AdamW
    "smol": Settings(
        base_model="smollm2",
        sibling_method="lora",
        lora_rank=16,
        sibling_lr=5e-4,
        train_items=200,
        eval_items=16,
        eval_text_rows=32,
        batch_size=8,
        sibling_steps=20,
        checkpoint_every=10,
        eval_batch_size=8,
    ),
}


# ---------------------------------------------------------------------------------------------
# data


@dataclass
class PhaseData:
    text: Any  # DatasetDict: train / validation / test packed text rows
    domains: dict  # domain -> packed training task rows
    test_items: dict  # domain -> held-out TaskItems
    test_rows: dict  # domain -> the held-out items packed (answer-only labels), for answer NLL


def new_tokenizer(p: PhaseRun, settings: Settings):
    """A byte-level BPE trained on the run's training documents and training task strings only:
    a tokenizer fitted to the test documents would lower their perplexity for free."""
    from agentforge.data import document_split, train_tokenizer
    from agentforge.eval.suite import EvalSuite, documents

    texts = documents(p.data)
    train_docs = [texts[i] for i in sorted(document_split(len(texts), seed=p.seed)["train"])]
    train_items = EvalSuite(p.data, None, p.seed).items("train", settings.train_items)
    return train_tokenizer(train_docs + [it.prompt + it.answer for it in train_items], settings.vocab_size, seed=p.seed)


def build_data(p: PhaseRun, settings: Settings, tokenizer) -> PhaseData:
    suite = p.suite(tokenizer)
    test_items = suite.by_domain("test", settings.eval_items)
    return PhaseData(
        text=suite.splits,
        domains={d: suite.rows(its) for d, its in suite.by_domain("train", settings.train_items).items()},
        test_items=test_items,
        test_rows={d: suite.rows(its) for d, its in test_items.items()},
    )


def mixture(data: PhaseData, rows: int, seed: int, weights: dict[str, float]):
    from agentforge.data import mixture as mix

    return mix({"text": data.text["train"], **data.domains}, weights, rows, seed=seed)


def trunk_weights(data: PhaseData, settings: Settings) -> dict[str, float]:
    share = (1 - settings.text_weight) / len(data.domains)
    return {"text": settings.text_weight, **{d: share for d in data.domains}}


def sibling_weights(data: PhaseData, settings: Settings, domain: str) -> dict[str, float]:
    rest = (1 - settings.own_domain_weight) / len(data.domains)  # text and each other domain
    return {"text": rest, **{d: settings.own_domain_weight if d == domain else rest for d in data.domains}}


# ---------------------------------------------------------------------------------------------
# models and training


def train_stage(p: PhaseRun, model, rows, steps: int, lr_scale: float, stage: str):
    from agentforge.optim import PRESETS as OPTIMIZER_PRESETS
    from agentforge.optim import MuGrokfast

    settings = p.settings
    rates = {key: OPTIMIZER_PRESETS["pretrain"][key] * lr_scale for key in ("muon_lr", "adamw_lr")}
    optimizer = MuGrokfast.from_preset(model, "pretrain", total_steps=steps, **rates)
    return p.train(
        model,
        rows,
        stage,
        optimizer=optimizer,
        steps=steps,
        batch_size=settings.batch_size,
        checkpoint_every=settings.checkpoint_every,
    )


def new_trunk_model(settings: Settings, tokenizer):
    from agentforge.models import CognateConfig, CognateForCausalLM

    config = CognateConfig.from_preset(
        settings.model_preset,
        vocab_size=len(tokenizer),
        **TRUNK_BEHAVIOUR,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CognateForCausalLM(config)


def tuned_from_base(p: PhaseRun, base, rows, stage: str):
    """A copy of the pretrained ``base`` fine-tuned on ``rows`` (AdamW; LoRA adapters on every
    Linear layer merged back into the weights, or all weights), as a plain model of the base's class."""
    import copy

    settings = p.settings
    model = copy.deepcopy(base)
    if settings.sibling_method == "lora":
        import warnings

        from peft import LoraConfig, get_peft_model

        with warnings.catch_warnings():  # peft asks transformers a deprecated question; not ours to fix
            warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
            model = get_peft_model(
                model,
                LoraConfig(
                    r=settings.lora_rank,
                    lora_alpha=2 * settings.lora_rank,
                    lora_dropout=0.0,
                    target_modules="all-linear",
                ),
            )
    optimizer = torch.optim.AdamW(
        [w for w in model.parameters() if w.requires_grad], lr=settings.sibling_lr, weight_decay=0.0
    )
    p.train(
        model,
        rows,
        stage,
        optimizer=optimizer,
        steps=settings.sibling_steps,
        batch_size=settings.batch_size,
        checkpoint_every=settings.checkpoint_every,
    )
    return (model.merge_and_unload() if settings.sibling_method == "lora" else model).eval()


def sibling_from(trunk, overrides: dict):
    """A copy of ``trunk`` with its behaviour fields changed (no parameter changes shape)."""
    from agentforge.models import CognateConfig, CognateForCausalLM

    config = CognateConfig(**{**trunk.config.to_dict(), **overrides})
    sibling = CognateForCausalLM(config)
    sibling.load_state_dict(trunk.state_dict())
    return sibling


# ---------------------------------------------------------------------------------------------
# evaluation


@torch.no_grad()
def act_passes_and_throughput(model, rows, batch_size: int) -> tuple[float, float]:
    """Mean core passes per token (ACT's N) and forward tokens/s over ``rows``, in eval mode: the
    fewer passes a model's tokens take, the faster it reads a sequence."""
    was_training = model.training
    model.eval()
    passes, tokens, seconds = 0.0, 0, 0.0
    for start in range(0, len(rows), batch_size):
        ids = torch.tensor(rows[start : start + batch_size]["input_ids"])
        began = time.perf_counter()
        steps = float(model(ids).mean_steps)
        seconds += time.perf_counter() - began
        passes += steps * ids.numel()
        tokens += ids.numel()
    model.train(was_training)
    return passes / max(tokens, 1), tokens / max(seconds, 1e-9)


def evaluate_model(model, suite, held, settings: Settings) -> dict:
    """Held-out perplexity, per-domain accuracy and answer NLL, per-family accuracy, ACT passes
    and tokens/s."""
    from agentforge.eval import parameter_count, tokens_per_second

    report = suite.measure(model, held, batch_size=settings.eval_batch_size)
    report.update(
        tokens_per_s=tokens_per_second(model, prompt_len=16, new_tokens=16), parameters=parameter_count(model)
    )
    if settings.base_model is None:  # a Cognate model: ACT's passes per token
        report["act_steps"], report["forward_tokens_per_s"] = act_passes_and_throughput(
            model, held.text, settings.eval_batch_size
        )
    return report


def specialisation(reports: dict[str, dict]) -> dict[str, dict]:
    """For each sibling, on its own domain: its accuracy and answer NLL against the best other
    sibling's (``gap`` > 0 and ``nll_gap`` > 0 mean it is the best sibling there)."""
    out = {}
    for name, (domain, _) in SIBLINGS.items():
        others = [o for o in SIBLINGS if o != name]
        rival = max(others, key=lambda o: reports[o]["accuracy"][domain])
        nll_rival = min(others, key=lambda o: reports[o]["answer_nll"][domain])
        own, own_nll = reports[name]["accuracy"][domain], reports[name]["answer_nll"][domain]
        out[name] = {
            "domain": domain,
            "accuracy": own,
            "best_other": rival,
            "best_other_accuracy": reports[rival]["accuracy"][domain],
            "gap": own - reports[rival]["accuracy"][domain],
            "answer_nll": own_nll,
            "best_other_nll": reports[nll_rival]["answer_nll"][domain],
            "nll_gap": reports[nll_rival]["answer_nll"][domain] - own_nll,
        }
    return out


def flat_metrics(summary: dict) -> dict:
    """The headline numbers as one flat row (metrics.jsonl and the pipeline report)."""
    row = {"unigram_perplexity": summary["unigram_perplexity"]}
    for name, report in summary["models"].items():
        for key in ("perplexity", "act_steps", "tokens_per_s", "forward_tokens_per_s"):
            if key in report:
                row[f"{name}/{key}"] = report[key]
        row.update({f"{name}/accuracy/{d}": acc for d, acc in report["accuracy"].items()})
        row.update({f"{name}/answer_nll/{d}": nll for d, nll in report["answer_nll"].items()})
    for name, s in summary["specialisation"].items():
        row[f"{name}/specialisation_gap"] = s["gap"]
        row[f"{name}/specialisation_nll_gap"] = s["nll_gap"]
    return row


# ---------------------------------------------------------------------------------------------
# the phase


def run(p: PhaseRun) -> PhaseResult:
    """Tokenizer and data, the trunk, the three siblings, held-out evaluation, the data spec."""
    from agentforge.data.spec import DATA_FILE, write_data_spec
    from agentforge.eval import unigram_perplexity

    settings = p.settings
    torch.manual_seed(p.seed)
    trunk, tokenizer, data = make_trunk(p, settings)
    paths = {"trunk": trunk.path}  # models are read back one at a time: four 135M models do not fit 6 GB
    for name, (domain, overrides) in SIBLINGS.items():

        def build_sibling(domain=domain, overrides=overrides, name=name) -> Built:
            rows = mixture(
                data, settings.sibling_steps * settings.batch_size, p.seed + 1, sibling_weights(data, settings, domain)
            )
            if settings.base_model is not None:
                sibling, behaviour = tuned_from_base(p, trunk.model, rows, name), {}
            else:
                sibling, behaviour = sibling_from(trunk.model, overrides), overrides
                train_stage(p, sibling, rows, settings.sibling_steps, settings.sibling_lr_scale, name)
            return Built(
                sibling,
                tokenizer,
                {"role": "sibling", "domain": domain, "behaviour": behaviour, "parents": [trunk.path]},
            )

        paths[name] = p.model_step(name, build_sibling, key=trunk.metadata["step_key"]).path

    suite = p.suite(tokenizer)
    held = suite.held_out("test", settings.eval_items, settings.eval_text_rows)

    def evaluate_all() -> dict:
        from agentforge.artifacts import load_model_dir

        reports = {}
        for i, (name, path) in enumerate(paths.items(), start=1):
            p.say(f"evaluating {name} ({i}/{len(paths)}) on {sum(map(len, held.items.values()))} test items")
            model = trunk.model if name == "trunk" else load_model_dir(path, verify=False)[0]
            reports[name] = evaluate_model(model, suite, held, settings)
        return reports

    reports = p.step("evaluate", evaluate_all, key=trunk.metadata["step_key"])
    summary = {
        "unigram_perplexity": p.step(
            "unigram", lambda: unigram_perplexity(data.text["train"], held.text, len(tokenizer))
        ),
        "models": reports,
        "specialisation": specialisation(reports),
        "identical_shapes": identical_shapes([paths[n] for n in SIBLINGS]),
    }
    data_file = write_data_spec(p.out_dir / DATA_FILE, p.data, p.seed) if p.is_main else p.out_dir / DATA_FILE
    return p.finish(
        {"trunk": trunk.path, "siblings": [paths[n] for n in SIBLINGS], "data": data_file},
        flat_metrics(summary),
        summary,
        effects=effects(reports, p.seed),
    )


def make_trunk(p: PhaseRun, settings: Settings):
    """``(trunk, tokenizer, data)``: the base model as it is, or a Cognate model trained from
    scratch with a tokenizer trained here."""
    if settings.base_model is not None:
        from agentforge.models.base import base_digest, load_base

        base_model = settings.base_model
        digest = base_digest(base_model)

        def take_base() -> Built:
            model, tokenizer = load_base(base_model)
            return Built(model, tokenizer, {"role": "trunk", "base": base_model, "base_sha256": digest})

        trunk = p.model_step("trunk", take_base, key=digest)
        return trunk, trunk.tokenizer, build_data(p, settings, trunk.tokenizer)

    done = p.finished("trunk")
    tokenizer = done.tokenizer if done else new_tokenizer(p, settings)
    data = build_data(p, settings, tokenizer)

    def build_trunk() -> Built:
        trunk = new_trunk_model(settings, tokenizer)
        rows = mixture(data, settings.trunk_steps * settings.batch_size, p.seed, trunk_weights(data, settings))
        train_stage(p, trunk, rows, settings.trunk_steps, 1.0, "trunk")
        return Built(trunk, tokenizer, {"role": "trunk"})

    return p.model_step("trunk", build_trunk), tokenizer, data


def effects(reports: dict, seed: int) -> list[Effect]:
    """Each sibling's held-out accuracy on its own domain against the trunk's (paired over items)."""
    from agentforge.eval.stats import paired_difference

    return [
        Effect.of(
            f"{domain} accuracy, {name} sibling",
            "the trunk",
            paired_difference(reports[name]["scores"][domain], reports["trunk"]["scores"][domain], seed=seed),
        )
        for name, (domain, _) in SIBLINGS.items()
    ]


def identical_shapes(paths) -> bool:
    """Whether the model directories at ``paths`` hold one set of parameter names and shapes."""
    from agentforge.artifacts import tensor_shapes

    shapes = [tensor_shapes(Path(path)) for path in paths]
    return all(s == shapes[0] for s in shapes)


def check_siblings(siblings) -> None:
    """Cognate's guarantee: exactly three sibling model directories with one set of parameter
    names and shapes (so they can be merged), each naming the same parent (the trunk)."""
    from agentforge.artifacts import read_metadata, tensor_shapes

    if not isinstance(siblings, (list, tuple)) or len(siblings) != 3:
        count = len(siblings) if isinstance(siblings, (list, tuple)) else "not a list of"
        raise HandoffError(f"siblings: expected exactly 3 sibling models, got {count}")
    for sibling in siblings:
        model_dir(sibling)
    shapes = tensor_shapes(Path(siblings[0]))
    parents = set()
    for sibling in map(Path, siblings):
        theirs = tensor_shapes(sibling)
        if theirs.keys() != shapes.keys():
            odd = sorted(theirs.keys() ^ shapes.keys())[0]
            raise HandoffError(f"siblings/{sibling.name}: parameter {odd} is in only some of the siblings")
        for key, shape in shapes.items():
            if theirs[key] != shape:
                raise HandoffError(
                    f"siblings/{sibling.name}: parameter {key} has shape {list(theirs[key])}, "
                    f"{Path(siblings[0]).name}'s has {list(shape)}"
                )
        recorded = read_metadata(sibling).get("parents", [])
        parents |= {(sibling / p["path"]).resolve() for p in recorded if isinstance(p, dict)}
    if len(parents) != 1:
        raise HandoffError(f"siblings: they must name one common parent (the trunk), they name {len(parents)}")


def disk_needed(settings: Settings, input_bytes: int) -> int:
    """Four models (trunk, three siblings), each also in its checkpoint with two optimizer
    states of its size, plus the tokenizer, data and metrics."""
    from agentforge.models import CognateConfig
    from agentforge.runtime import DEFAULT_DISK

    if settings.base_model is not None:
        from agentforge.models.base import base_parameter_count

        parameters = base_parameter_count(settings.base_model)
    else:
        config = CognateConfig.from_preset(settings.model_preset, vocab_size=settings.vocab_size)
        with torch.device("meta"):
            from agentforge.models import CognateForCausalLM

            parameters = sum(p.numel() for p in CognateForCausalLM(config).parameters())
    return DEFAULT_DISK + 4 * 4 * 4 * parameters


SPEC = PhaseSpec(
    number=1,
    name="cognate",
    summary="a shared trunk, then three siblings (reasoning, memory, speed)",
    settings=Settings,
    presets=PRESETS,
    run=run,
    provides={"trunk": model_dir, "siblings": check_siblings, "data": a_file},
    figures="agentforge.figures.cognate",
    disk_needed=disk_needed,
)


def main(argv: list[str] | None = None) -> int:
    return standalone_main(SPEC, argv)


if __name__ == "__main__":
    sys.exit(main())
