"""Choosing a codec per tensor: encode with every candidate, measure real bits per weight (the
serialised bytes) and the layer-output error on calibration data, keep the least error that
fits the bits budget; ternary layers take their smallest lossless layout.

A matrix larger than ``trial_numel`` weights (a 28M-weight embedding) is scored on a sample of
evenly spaced rows instead: each candidate encodes the sample, and its layer-output error is
measured with only those rows replaced (scaled up by rows / sampled rows, an unbiased estimate of
the whole matrix's). Then only the candidates that some budget the phase asks about chooses are
encoded whole; the others keep their measurements without an encoding and are never chosen.

The rollback ladder raises one tensor's budget to the next rung (e.g. 4.25 -> 8.25 -> 16 -> 32
bits, i.e. int8, fp16, fp32) when the quality gate fails and that tensor is the most damaging.

A plan is kept on disk as a container of every trial's encoding (``save_plan``) and a JSON
record of the rest (``load_plan`` gives the choices back), so encoding is done once per model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.func import functional_call

from agentforge.artifacts import CorruptArtifact, atomic_write_bytes
from agentforge.compress import ternary
from agentforge.compress.calibration import Calibration, kl_loss
from agentforge.compress.codec import Codec, Encoded, Raw, RoundToNearest, decode
from agentforge.compress.container import Container, TensorRecord, parse, serialize
from agentforge.compress.hyper import Hyper
from agentforge.compress.seedlm import SeedLM
from agentforge.compress.tensors import TensorSlot
from agentforge.compress.vptq import VPTQ

CANDIDATES: dict[str, Codec] = {
    "fp32": Raw("float32"),
    "fp16": Raw("float16"),
    "int8": RoundToNearest(8),
    "rtn4": RoundToNearest(4),
    "rtn3": RoundToNearest(3),
    "rtn2": RoundToNearest(2),
    "seedlm4": SeedLM(8, 3),
    "seedlm3": SeedLM(12, 4),
    "vptq4": VPTQ(4, (256, 256)),
    "vptq3": VPTQ(4, (256, 16)),
    "vptq2": VPTQ(4, (256,)),
    "hyper4": Hyper(8, 1),
    "hyper3": Hyper(6, 1),
    "hyper2": Hyper(4, 0),
}
SMALL_TENSOR_CANDIDATES = ("fp16", "fp32")
SMALL_TENSOR_BUDGET = 16.0
TERNARY = "ternary"


@dataclass
class Trial:
    """One candidate codec on one tensor: what it stored, how many bits per weight, the relative
    layer-output error it causes and how long encoding took. ``sample_rows``: how many rows it was
    scored on when the tensor was sampled (its bits are then the whole tensor's when ``encoded``
    is the whole tensor, else the sample's); ``encoded`` is None for a sampled candidate that no
    asked budget chose, which can never be chosen."""

    codec: str
    encoded: Encoded | None
    bits: float
    error: float
    seconds: float
    sample_rows: int | None = None


@dataclass
class TensorChoice:
    """A tensor, every candidate tried on it, its current bits budget and the chosen candidate."""

    slot: TensorSlot
    trials: dict[str, Trial]
    budget: float
    choice: str = ""
    small: bool = False  # a norm, bias or other small tensor: fp16/fp32 only
    history: list[str] = field(default_factory=list)  # earlier choices the ladder dropped

    def __post_init__(self):
        if not self.choice:
            self.choice = best_within(self.trials, self.budget)

    @property
    def trial(self) -> Trial:
        return self.trials[self.choice]

    @property
    def lossy(self) -> bool:
        return self.choice not in (TERNARY, "fp32")


def best_within(trials: dict[str, Trial], budget: float) -> str:
    """The least-error encoded candidate whose measured bits fit ``budget`` (ties: fewer bits);
    the smallest one when none fits."""
    encoded = [t for t in trials.values() if t.encoded is not None]
    fitting = [t for t in encoded if t.bits <= budget + 1e-9]
    if not fitting:
        return min(encoded, key=lambda t: t.bits).codec
    return min(fitting, key=lambda t: (t.error, t.bits)).codec


def sample_rows(tensor: torch.Tensor, trial_numel: int | None) -> torch.Tensor | None:
    """Evenly spaced rows of a matrix of more than ``trial_numel`` weights, as many as hold at
    most that many (at least one); None when the whole matrix is scored."""
    if trial_numel is None or tensor.numel() <= trial_numel:
        return None
    rows = tensor.shape[0]
    count = min(rows, max(1, trial_numel // (tensor.numel() // rows)))
    return torch.arange(count) * rows // count


def try_codecs(
    slot: TensorSlot, calibration: Calibration, names, importance: torch.Tensor | None, rows: torch.Tensor | None = None
) -> dict[str, Trial]:
    """Encode ``slot`` (its ``rows`` only, when given) with each named candidate and measure it."""
    tensor = slot.tensor if rows is None else slot.tensor[rows]
    importance = importance if rows is None or importance is None else importance[rows]
    trials = {}
    for name in names:
        codec = CANDIDATES[name]
        started = time.perf_counter()
        encoded = codec.encode(tensor, importance)
        seconds = time.perf_counter() - started
        error = calibration.output_error(slot, codec.decode(encoded), rows)
        trials[name] = Trial(
            name, encoded, encoded.bits_per_weight, error, seconds, None if rows is None else len(rows)
        )
    return trials


def encode_chosen(slot: TensorSlot, trials: dict[str, Trial], budgets, importance: torch.Tensor | None) -> None:
    """Encode the whole of ``slot`` with every candidate that one of ``budgets`` chooses among
    ``trials`` (scored on a sample), again until the choices settle: a whole matrix's bits per
    weight differ a little from its sample's (codebooks and scales amortised over more weights).
    The candidates no budget chooses keep their measurements and lose their sample encoding."""
    whole: set[str] = set()
    while needed := {best_within(trials, b) for b in budgets} - whole:
        for name in sorted(needed):
            started = time.perf_counter()
            encoded = CANDIDATES[name].encode(slot.tensor, importance)
            trial = trials[name]
            trials[name] = dataclasses.replace(
                trial,
                encoded=encoded,
                bits=encoded.bits_per_weight,
                seconds=trial.seconds + time.perf_counter() - started,
            )
        whole |= needed
    for name in trials.keys() - whole:
        trials[name] = dataclasses.replace(trials[name], encoded=None)


def plan(
    slots: list[TensorSlot],
    calibration: Calibration,
    candidates,
    budget: float,
    min_numel: int,
    importance_floor: float,
    say=lambda _: None,
    *,
    budgets=(),
    trial_numel: int | None = None,
) -> list[TensorChoice]:
    """A TensorChoice for every slot: ternary layers lossless, small tensors among
    ``SMALL_TENSOR_CANDIDATES`` at 16 bits, matrices among ``candidates`` within ``budget``.
    A matrix of more than ``trial_numel`` weights is scored on a row sample, and encoded whole
    by the candidates that ``budget`` or one of ``budgets`` (every other budget that will be
    asked: the ladder's rungs, the sweep's) chooses."""
    choices = []
    for slot in slots:
        if slot.group == "ternary":
            started = time.perf_counter()
            encoded = ternary.smallest(slot.tensor, slot.per_channel)
            trials = {TERNARY: Trial(TERNARY, encoded, encoded.bits_per_weight, 0.0, time.perf_counter() - started)}
            choices.append(TensorChoice(slot, trials, budget=trials[TERNARY].bits))
            continue
        small = slot.tensor.numel() < min_numel or slot.tensor.dim() < 2
        # fp16 and fp32 are always tried: they are the ladder's top rungs
        names = SMALL_TENSOR_CANDIDATES if small else tuple(dict.fromkeys((*candidates, *SMALL_TENSOR_CANDIDATES)))
        rows = None if small else sample_rows(slot.tensor, trial_numel)
        if not small:
            sampled = "" if rows is None else f" on {len(rows)} of its rows"
            say(f"  {slot.name} {list(slot.tensor.shape)}: trying {', '.join(names)}{sampled}")
        importance = calibration.importance(slot, importance_floor)
        trials = try_codecs(slot, calibration, names, importance, rows)
        if rows is not None:
            encode_chosen(slot, trials, {budget, *budgets}, importance)
        choices.append(TensorChoice(slot, trials, budget=SMALL_TENSOR_BUDGET if small else budget, small=small))
    return choices


def save_plan(choices: list[TensorChoice], path: str | os.PathLike) -> dict:
    """Write every trial's encoding to the container at ``path`` (atomically); returns the JSON
    record that, with that file, gives the choices back (:func:`load_plan`): per tensor its name,
    budget, whether it is small and its trials (codec, bits, error, seconds, sample rows, whether
    it is encoded), and the file's sha256."""
    records = [
        TensorRecord([c.slot.name], c.slot.group, t.encoded)
        for c in choices
        for t in c.trials.values()
        if t.encoded is not None
    ]
    data, _ = serialize(Container(records))
    atomic_write_bytes(path, data)
    return {
        "sha256": hashlib.sha256(data).hexdigest(),
        "tensors": [
            {
                "name": c.slot.name,
                "budget": c.budget,
                "small": c.small,
                "trials": [
                    {
                        "codec": t.codec,
                        "bits": t.bits,
                        "error": t.error,
                        "seconds": t.seconds,
                        "sample_rows": t.sample_rows,
                        "encoded": t.encoded is not None,
                    }
                    for t in c.trials.values()
                ],
            }
            for c in choices
        ],
    }


def load_plan(record: dict, slots: list[TensorSlot], path: str | os.PathLike) -> list[TensorChoice]:
    """The choices :func:`save_plan` recorded, for ``slots`` (the same model's), each as first
    chosen. Raises ``CorruptArtifact`` when the file is not the one the record describes and
    ``ValueError`` when the record is not about these slots."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise CorruptArtifact(f"{path}: cannot read the codec plan ({e.strerror})") from None
    if hashlib.sha256(data).hexdigest() != record["sha256"]:
        raise CorruptArtifact(f"{path}: not the codec plan its record describes")
    if [entry["name"] for entry in record["tensors"]] != [slot.name for slot in slots]:
        raise ValueError("load_plan: the plan was made for other tensors")
    encodings = iter(parse(data, str(path)).tensors)  # in the order save_plan wrote them
    choices = []
    for slot, entry in zip(slots, record["tensors"]):
        trials = {
            t["codec"]: Trial(
                t["codec"],
                next(encodings).encoded if t["encoded"] else None,
                t["bits"],
                t["error"],
                t["seconds"],
                t["sample_rows"],
            )
            for t in entry["trials"]
        }
        choices.append(TensorChoice(slot, trials, entry["budget"], small=entry["small"]))
    return choices


def escalate(choice: TensorChoice, ladder: list[float]) -> bool:
    """Move ``choice`` to the next budget rung above its current bits where a different candidate
    wins; False when it is already lossless or no rung changes it."""
    if not choice.lossy:
        return False
    current = choice.trial.bits
    for rung in sorted(ladder):
        if rung > current + 1e-9 and best_within(choice.trials, rung) != choice.choice:
            choice.history.append(choice.choice)
            choice.budget, choice.choice = rung, best_within(choice.trials, rung)
            return True
    return False


@torch.no_grad()
def solo_damage(model, choice: TensorChoice, batches: list[dict], reference_logits: list[torch.Tensor]) -> float:
    """Mean logit KL(model ‖ model with only this tensor decoded) on ``batches``: how much this
    one codec choice costs end to end."""
    assert choice.trial.encoded is not None  # a chosen trial always holds its encoding
    tensor = decode(choice.trial.encoded).to(choice.slot.tensor.dtype)
    kls = [
        float(kl_loss(ref, functional_call(model, {choice.slot.name: tensor}, (), batch).logits))
        for batch, ref in zip(batches, reference_logits)
    ]
    return sum(kls) / len(kls)
