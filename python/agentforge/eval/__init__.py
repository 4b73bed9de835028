"""Measurements every phase reports against a control: held-out perplexity (vs a unigram
model), task accuracy from greedy generation, and throughput, size and peak memory."""

from agentforge.eval.lm import perplexity, unigram_perplexity
from agentforge.eval.speed import parameter_bytes, parameter_count, peak_memory_bytes, tokens_per_second
from agentforge.eval.suite import EvalSuite, HeldOut, answer_budget, spread
from agentforge.eval.tasks import TaskReport, exact_match, generate_answers, task_accuracy

__all__ = [
    "EvalSuite",
    "HeldOut",
    "answer_budget",
    "spread",
    "perplexity",
    "unigram_perplexity",
    "generate_answers",
    "task_accuracy",
    "exact_match",
    "TaskReport",
    "tokens_per_second",
    "parameter_count",
    "parameter_bytes",
    "peak_memory_bytes",
]
