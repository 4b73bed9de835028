"""Transformer²-style experts: singular-value fine-tuning, discovered and mixed by measurement.

    basis = SVDBasis.of(model)                                  # W = U diag(σ) Vᵀ, once per weight
    z, _ = train_expert(model, basis, tok, items, TrainSettings(), in_directory(out_dir))  # resumable
    with installed(model, basis.adapted(z)):                    # W′ = U diag(σ ⊙ z) Vᵀ
        ...
    adaptive, tok, meta = load_adaptive("runs/tiny/07-experts/model")
    generate_answers(adaptive, tok, ["a7=3 k2=9 ?k2="])         # route, mix, answer

Modules: ``svf`` (basis, adapted weights, composition, ternary re-quantization), ``training``
(cross-entropy and REINFORCE with a KL penalty, in stages a rerun resumes), ``discovery``
(capability, learning zone, gradient similarity, clustering), ``router`` (pass one), ``mixture``
(CMA-ES over α, Pareto front), ``adaptive`` (the two-pass model, save and load), ``evaluation``
(per-item scores, counted answer FLOPs, bootstrap).

Directory format (written by ``save_adaptive`` or ``adaptive_files``, read by ``load_adaptive``)
-----------------------------------------------------------------------------------------------
One ``agentforge.artifacts`` model directory; every file below is listed with its sha256 in
``agentforge.json``, so ``load_model_dir`` verifies the whole set.

* ``config.json``, ``model.safetensors``, ``generation_config.json``, tokenizer files: the *base*
  model, unchanged (z = 1). ``load_model_dir(dir)`` / ``AutoModelForCausalLM.from_pretrained(dir)``
  load it as the plain base model; BitLinear layers come back in training (latent) state.
* ``experts.safetensors``: ``z/<expert>`` — one flat fp32 vector per expert, the concatenation of
  the per-matrix z in the order of ``targets`` (lengths in ``sizes``); ``sigma/<module>`` — the
  singular values of each target weight, so a loader can check that its SVD of the base weights
  is the one the experts were trained against (the SVD is recomputed at load time: sign flips of
  a singular-vector pair leave U diag(σ ⊙ z) Vᵀ unchanged).
* ``router.safetensors``: ``linear.weight`` [classes, 2·hidden], ``linear.bias`` [classes],
  ``mean`` and ``scale`` [2·hidden] (feature standardisation). Features: the hidden state entering
  the LM head at the last prompt token, concatenated with its mean over the prompt's tokens, read
  with the base weights from a left-padded prompt encoded without special tokens.
* ``experts.json``: ``format`` (1), ``experts`` (names, the order of the α), ``targets`` (module
  names of the adapted weights), ``sizes`` (z length per target = min(N, K)), ``router``
  (``classes``, ``features``), ``mixtures`` ({router class: [α per expert]}; the class ``base``,
  when present, is for prompts no expert was trained on), and what the phase adds: ``units``
  ({expert: ["family@level", ...]}), ``parameter_counts``.

To run a class's mixture: z′ = 1 + Σₖ αₖ (z_k − 1), W′ = U diag(σ ⊙ z′) Vᵀ for each target. For
BitLinear targets W′ replaces the latent weight; quantize it to ternary (``ternary_weights``) to run
the packed kernels.
"""

from agentforge.experts.adaptive import AdaptiveModel, adaptive_files, load_adaptive, save_adaptive
from agentforge.experts.discovery import Discovery, Unit, discover
from agentforge.experts.evaluation import answer_flops, item_scores, paired_gain
from agentforge.experts.mixture import Measurement, MixtureSearch, SearchSettings, pareto_front
from agentforge.experts.router import Router, features_of, prompt_features
from agentforge.experts.svf import (
    SVDBasis,
    SVFExpert,
    adapted_forward,
    compose,
    installed,
    target_weights,
    ternary_weights,
)
from agentforge.experts.training import TrainSettings, in_directory, train_expert

__all__ = [
    "SVDBasis",
    "SVFExpert",
    "adapted_forward",
    "compose",
    "installed",
    "target_weights",
    "ternary_weights",
    "TrainSettings",
    "in_directory",
    "train_expert",
    "Unit",
    "Discovery",
    "discover",
    "Router",
    "features_of",
    "prompt_features",
    "Measurement",
    "MixtureSearch",
    "SearchSettings",
    "pareto_front",
    "AdaptiveModel",
    "adaptive_files",
    "save_adaptive",
    "load_adaptive",
    "item_scores",
    "answer_flops",
    "paired_gain",
]
