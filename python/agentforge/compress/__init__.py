"""Final compression: codecs with exact byte counts, one container file, and its loader.

Codecs (``encode(weight, importance) -> Encoded``, ``decode``, ``Encoded.nbytes``, and a
trainable view for distillation):

* :class:`Ternary` — BitNet codes in 2-bit, base-3 (1.6-bit) or rANS entropy-coded layouts;
* :class:`Raw` — float32 / float16; :class:`RoundToNearest` — per-row int2..int8 (the baseline);
* :class:`SeedLM` — LFSR-seeded pseudo-random bases times 4-bit coefficients (3-4 bits/weight);
* :class:`VPTQ` — importance-weighted k-means vector quantisation with residual codebooks;
* :class:`Hyper` — hyper-compression: indices into an ergodic trajectory (irrational winding).

The container (``container.py`` documents the byte layout) holds every tensor's parts, the
carried files (config, tokenizer, extras) and the metadata; ``load(path)`` rebuilds a runnable
model with the ternary layers packed on the kernels; a damaged or truncated file raises
``agentforge.artifacts.CorruptArtifact``.
"""

from agentforge.compress.codec import REGISTRY, Codec, Encoded, Raw, RoundToNearest, TrainableDecode, codec_of, decode
from agentforge.compress.container import Container, TensorRecord, read_container, serialize, write_container
from agentforge.compress.hyper import Hyper
from agentforge.compress.loader import carried_files, decoded_state_dict, load, unpack
from agentforge.compress.seedlm import SeedLM
from agentforge.compress.tensors import TensorSlot, model_tensors
from agentforge.compress.ternary import Ternary
from agentforge.compress.vptq import VPTQ

__all__ = [
    "Codec",
    "Encoded",
    "TrainableDecode",
    "REGISTRY",
    "codec_of",
    "decode",
    "Raw",
    "RoundToNearest",
    "Ternary",
    "SeedLM",
    "VPTQ",
    "Hyper",
    "Container",
    "TensorRecord",
    "serialize",
    "write_container",
    "read_container",
    "load",
    "unpack",
    "carried_files",
    "decoded_state_dict",
    "TensorSlot",
    "model_tensors",
]
