"""``agentforge.load(path)``: any artifact of a run, ready to answer, with every part it holds.

    agent = agentforge.load("runs/tiny/08-compression/model.afz")   # or a phase dir, a model dir
    agent.complete(["12+7="], max_new_tokens=8)                      # -> ["19"]
    agent.chat([{"role": "user", "content": "What is 12+7?"}])      # chat template, when it has one
    agent.lm, agent.tokenizer                                        # the Hugging Face model itself

What it opens:

* ``model.afz`` (the compressed artifact): unpacked in memory, ternary layers on the kernels;
* a model directory (``agentforge.json``: hash-checked) or a plain Hugging Face directory;
* a phase directory of a run (``phase.json``): its model artifact (``artifact=`` picks one where
  a phase hands over several), hash-checked against the phase's record.

What it attaches: the experts and their router (two-pass adaptive inference: the router reads
the prompt with the base weights, the prompt's class's weights answer it), and the Quiet-STaR
thinking head (``think=True`` thinks before each token). A part that is present but cannot be
attached is an error, never a silent drop.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from agentforge.errors import ConfigError

# the artifact a phase directory opens as, when it hands over several
PREFERRED = ("model", "champion", "artifact", "packed", "trunk")


def _phase_artifact(phase_dir: Path, artifact: str | None) -> Path:
    """The model artifact of a phase directory, hash-checked against its ``phase.json``."""
    from agentforge import rundir
    from agentforge.data.spec import DATA_ARTIFACT

    record = rundir.read_record(phase_dir)
    if record is None:
        raise ConfigError(f"{phase_dir}: {rundir.PHASE_FILE} is missing or unreadable (the phase did not finish)")
    models, recorded_as = {}, {}  # a list artifact's models (Cognate's siblings) go by their directory names
    for key, value in rundir.absolute_artifacts(phase_dir, record).items():
        if key == DATA_ARTIFACT:
            continue
        for name, path in [(p.name, p) for p in value] if isinstance(value, list) else [(key, value)]:
            models[name], recorded_as[name] = path, key
    name = artifact or next((n for n in PREFERRED if n in models), None)
    if name not in models:
        listed = ", ".join(models) or "none"
        raise ConfigError(f"{phase_dir}: choose the artifact to load with artifact=... (it holds: {listed})")
    problems = rundir.verify(phase_dir, record, [recorded_as[name]])
    if problems:
        raise ConfigError(f"{phase_dir}: {name} does not match its record ({problems[0]}); re-run the phase")
    return models[name]


def resolve(path: str | os.PathLike, artifact: str | None = None) -> Path:
    """The model directory or ``.afz`` file that ``path`` names."""
    from agentforge.artifacts import MANIFEST
    from agentforge.rundir import PHASE_FILE

    path = Path(path)
    if path.is_file():
        return path
    if (path / PHASE_FILE).is_file():
        return _phase_artifact(path, artifact)
    if (path / MANIFEST).is_file() or (path / "config.json").is_file():
        return path
    raise ConfigError(f"{path}: not a model directory, a phase directory or a model.afz file")


class Agent(nn.Module):
    """A loaded model with what the pipeline trained around it.

    ``lm`` is the Hugging Face causal LM (its forward uses the base weights); ``thinker`` the
    Quiet-STaR thinking model on it, or None; ``experts`` the deployed or latent experts, or
    None. ``generate`` follows Hugging Face's ``generate`` (left-padded prompts in, prompts plus
    greedy new tokens out), so the evaluation code measures an Agent as it measures any model."""

    def __init__(self, lm, tokenizer, metadata: dict, *, thinker=None, experts=None, think: bool = False):
        super().__init__()
        self.lm, self.thinker = lm, thinker
        self.tokenizer, self.metadata, self.experts, self.think = tokenizer, metadata, experts, think
        self.config, self.generation_config = lm.config, lm.generation_config
        self.last_routes: list[str] = []
        self.eval()

    def forward(self, *args, **kwargs):
        """The base model's forward (perplexity reads the base weights; answers go through generate)."""
        return self.lm(*args, **kwargs)

    @property
    def parts(self) -> dict[str, bool]:
        """Which trained parts are attached."""
        return {"experts": self.experts is not None, "thinking": self.thinker is not None}

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        max_new_tokens: int = 32,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
        think: bool | None = None,
        on_token: Callable[[torch.Tensor], None] | None = None,
        **_,
    ) -> torch.Tensor:
        """Greedy decoding: pass one routes each row (with experts), pass two answers each class's
        rows under its weights, thinking before each token when ``think`` (default: the Agent's)."""
        eos = eos_token_id if eos_token_id is not None else self.tokenizer.eos_token_id
        pad = pad_token_id if pad_token_id is not None else (self.tokenizer.pad_token_id or eos)
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        think = self.think if think is None else think
        if think and self.thinker is None:
            raise ValueError("think=True: this model has no Quiet-STaR thinking head")
        routes = self.experts.route(input_ids, mask) if self.experts is not None else [""] * len(input_ids)
        self.last_routes = routes
        rows_of = {cls: [i for i, r in enumerate(routes) if r == cls] for cls in dict.fromkeys(routes)}
        new: dict[int, torch.Tensor] = {}
        for cls, rows in rows_of.items():
            with self._weights(cls):
                tokens = self._decode(input_ids[rows], mask[rows], max_new_tokens, eos, pad, think, on_token)
            new.update(zip(rows, tokens))
        width = max(t.numel() for t in new.values())
        out = torch.full((len(routes), width), pad, dtype=input_ids.dtype)
        for i, tokens in new.items():
            out[i, : tokens.numel()] = tokens
        return torch.cat((input_ids, out), dim=1)

    def _weights(self, cls: str):
        return self.experts.installed(cls) if self.experts is not None else contextlib.nullcontext()

    def _decode(self, ids, mask, max_new_tokens: int, eos: int, pad: int, think: bool, on_token) -> torch.Tensor:
        if self.thinker is not None:
            return self.thinker.generate(
                ids, mask, max_new_tokens=max_new_tokens, eos_token_id=eos, think=think, on_token=on_token
            )
        streamer = _Streamer(on_token) if on_token is not None else None
        out = self.lm.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            eos_token_id=eos,
            pad_token_id=pad,
            streamer=streamer,
        )
        return out[:, ids.shape[1] :]

    def complete(self, prompts: list[str] | str, *, max_new_tokens: int = 32, think: bool | None = None) -> list[str]:
        """Each prompt's greedy completion, up to the end-of-sequence token, as text."""
        from agentforge.eval import generate_answers

        prompts = [prompts] if isinstance(prompts, str) else prompts
        with self._thinking(think):
            return generate_answers(self, self.tokenizer, prompts, max_new_tokens=max_new_tokens)

    @contextlib.contextmanager
    def _thinking(self, think: bool | None):
        before = self.think
        self.think = before if think is None else think
        try:
            yield
        finally:
            self.think = before

    def chat_prompt(self, messages: list[dict]) -> str:
        """The messages in the tokenizer's chat template (the last user turn when it has none)."""
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return messages[-1]["content"]

    def chat(
        self,
        messages: list[dict],
        *,
        max_new_tokens: int = 128,
        think: bool | None = None,
        stream: Callable[[str], None] | None = None,
    ) -> str:
        """The assistant's reply to ``messages``; ``stream(text)`` receives it piece by piece."""
        ids = self.tokenizer(self.chat_prompt(messages), add_special_tokens=False, return_tensors="pt")["input_ids"]
        pieces = _TextPieces(self.tokenizer, stream) if stream is not None else None
        out = self.generate(
            ids, max_new_tokens=max_new_tokens, think=think, on_token=pieces.add if pieces is not None else None
        )
        tokens = out[0, ids.shape[1] :].tolist()
        eos = self.tokenizer.eos_token_id
        tokens = tokens[: tokens.index(eos)] if eos in tokens else tokens
        return self.tokenizer.decode(tokens, skip_special_tokens=True).strip()


class _Streamer:
    """The ``streamer`` Hugging Face's generate calls: hands each new token on (skipping the prompt)."""

    def __init__(self, on_token):
        self.on_token, self.prompt_seen = on_token, False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.on_token(value.reshape(-1))

    def end(self) -> None:
        pass


class _TextPieces:
    """Decodes a growing token sequence and hands on only the new text, stopping at eos."""

    def __init__(self, tokenizer, stream: Callable[[str], None]):
        self.tokenizer, self.stream, self.shown, self.done = tokenizer, stream, "", False
        self.tokens: list[int] = []

    def add(self, token: torch.Tensor) -> None:
        value = int(token.reshape(-1)[0])
        if self.done or value == self.tokenizer.eos_token_id:
            self.done = True
            return
        self.tokens.append(value)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if not text.endswith("\ufffd"):  # a multi-byte character still incomplete
            self.stream(text[len(self.shown) :])
            self.shown = text


def _attach(lm, tokenizer, metadata: dict, directory: Path, think: bool) -> Agent:
    """The Agent of a loaded model with the experts and thinking head ``directory`` holds."""
    from agentforge.artifacts import CorruptArtifact
    from agentforge.experts.adaptive import SPEC_FILE
    from agentforge.experts.deploy import DEPLOYED_FILE, DeployedExperts
    from agentforge.nn import BitLinear
    from agentforge.quietstar import MIXING_HEAD_FILE, SETTINGS_FILE, ThinkingModel

    experts: DeployedExperts | _LatentExperts | None = None
    thinker = None
    try:
        if (directory / SPEC_FILE).is_file():
            packed = any(isinstance(m, BitLinear) and m.state == "packed" for m in lm.modules())
            if packed or not any(isinstance(m, BitLinear) for m in lm.modules()):
                if not (directory / DEPLOYED_FILE).is_file():
                    raise CorruptArtifact(
                        f"{directory}: experts.json without {DEPLOYED_FILE}: the experts cannot be "
                        "attached to this model (re-run the experts phase)"
                    )
                experts = DeployedExperts.attach(lm, directory)
            else:
                experts = _LatentExperts.attach(lm, directory)
        if (directory / SETTINGS_FILE).is_file() or (directory / MIXING_HEAD_FILE).is_file():
            thinker = ThinkingModel.attach(lm, directory)
    except (OSError, KeyError, ValueError, RuntimeError) as e:
        raise CorruptArtifact(f"{directory}: a trained part cannot be attached ({type(e).__name__}: {e})") from None
    return Agent(lm, tokenizer, metadata, thinker=thinker, experts=experts, think=think)


class _LatentExperts:
    """The experts of a model that still holds its latent weights (the experts phase's own
    output): each class's mixture built from the z-vectors and installed in the latent weights."""

    def __init__(self, adaptive):
        self.adaptive = adaptive

    @classmethod
    def attach(cls, lm, directory: Path) -> _LatentExperts:
        from agentforge.experts.adaptive import adaptive_of

        return cls(adaptive_of(lm, directory))

    def route(self, input_ids, attention_mask=None) -> list[str]:
        return self.adaptive.route(input_ids, attention_mask)

    def installed(self, cls: str):
        from agentforge.experts.svf import installed

        return installed(self.adaptive.model, self.adaptive.adapted_weights(self.adaptive.mixtures[cls]))


def load(path: str | os.PathLike, *, artifact: str | None = None, think: bool = False, **model_kwargs: Any) -> Agent:
    """The model at ``path`` (a ``model.afz``, a model directory or a run's phase directory) as an
    ``Agent``, with its experts and thinking head attached; ``think`` turns thinking on by default."""
    from agentforge.artifacts import load_model_dir
    from agentforge.compress import unpack

    target = resolve(path, artifact)
    if target.is_file():
        with tempfile.TemporaryDirectory(prefix="agentforge-load-") as tmp:
            directory = unpack(target, Path(tmp) / "model")
            lm, tokenizer, metadata = load_model_dir(directory, **model_kwargs)
            metadata.pop("unpacked_from", None)
            return _attach(lm, tokenizer, metadata, directory, think)
    if not (target / "agentforge.json").is_file():
        return _attach(*_load_plain(target, **model_kwargs), target, think)
    lm, tokenizer, metadata = load_model_dir(target, **model_kwargs)
    return _attach(lm, tokenizer, metadata, target, think)


def _load_plain(directory: Path, **model_kwargs) -> tuple[Any, Any, dict]:
    """A Hugging Face directory without an agentforge manifest (e.g. an export): nothing to verify."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from agentforge.artifacts import check_loadable

    check_loadable(directory)
    lm = AutoModelForCausalLM.from_pretrained(directory, use_safetensors=True, **model_kwargs)
    tokenizer = AutoTokenizer.from_pretrained(directory) if (directory / "tokenizer_config.json").is_file() else None
    return lm, tokenizer, {}
