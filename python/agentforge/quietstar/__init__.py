"""Quiet-STaR (Zelikman et al. 2024): the model thinks before each token, for any causal LM.

Training forward, the paper's parallel ("diagonal") sampling without a KV cache. A sequence x of
T tokens gets, for each of P chosen positions t, a chain of S extra tokens appended as columns
T + s·P + p (step s, position index p):

    s = 0              <|startthought|>
    s = 1 .. L         L sampled thought tokens
    s = L + 1          <|endthought|>
    s = L + 2 .. L + k x[t+1] .. x[t+k-1], the true next tokens, teacher-forced

The extra token (s, p) has position id t + 1 + s and may attend to x[0..t] and to the extra
tokens of its own position at steps ≤ s, nothing else: every thought sees its prefix and its own
past, and one forward pass computes step s for all P positions. The real tokens never see the
extras, so the same pass gives the base (no-thought) predictions too. Sampling step s needs the
logits of step s − 1, so the L thought tokens take L passes without gradients; one pass with
gradients then scores everything.

The end token (step L+1) predicts x[t+1] after the thought, and step L+1+m (fed x[t+m]) predicts
x[t+1+m]. For each of these k targets, the mixing head (an MLP over the base hidden state at
column t+m and the post-thought hidden state) gives a weight w in (0, 1) and the prediction is
softmax(w · post-thought logits + (1 − w) · base logits).

Loss = mean NLL of the mixed predictions + base_loss_weight · the plain next-token NLL
     + reinforce_weight · REINFORCE: each thought's reward is the log-likelihood of its k true
       tokens minus the mean over the n thoughts sampled for the same position (the baseline),
       times the log-probability of the thought's tokens.

Modules: ``layout`` (where the extra tokens go), ``backbone`` (hidden states of any HF causal LM
with extra tokens: a custom 4D attention mask and position_ids, plus forward hooks for Cognate's
neural memory), ``thinking`` (settings, thought tokens, mixing head, the loss, the thinking model,
save/load), ``generation`` (decoding with hidden thoughts), ``compute`` (the counted compute of
training, which sizes the phase's equal-compute control).
"""

from agentforge.quietstar.backbone import hidden_states
from agentforge.quietstar.compute import plain_steps, row_compute, training_compute
from agentforge.quietstar.layout import IGNORE_INDEX, Layout, choose_positions
from agentforge.quietstar.thinking import (
    END,
    HEAD_FILES,
    MIXING_HEAD_FILE,
    SETTINGS_FILE,
    START,
    MixingHead,
    ThinkingModel,
    ThinkingOutput,
    ThoughtSettings,
    ThoughtTokens,
    add_thought_tokens,
    head_files,
    reinforce_loss,
)

__all__ = [
    "END",
    "HEAD_FILES",
    "IGNORE_INDEX",
    "MIXING_HEAD_FILE",
    "head_files",
    "SETTINGS_FILE",
    "START",
    "Layout",
    "MixingHead",
    "ThinkingModel",
    "ThinkingOutput",
    "ThoughtSettings",
    "ThoughtTokens",
    "add_thought_tokens",
    "choose_positions",
    "hidden_states",
    "plain_steps",
    "reinforce_loss",
    "row_compute",
    "training_compute",
]
