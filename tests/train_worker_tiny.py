"""Train the tiny test model in a process of its own, for the tests that kill a run (kill -9) or
launch it under torchrun. Also the home of the tiny model and data every train test uses.

    python tests/train_worker_tiny.py OUT_DIR --steps 30 --checkpoint-every 5
    torchrun --standalone --nproc_per_node 2 tests/train_worker_tiny.py OUT_DIR --steps 6

Rank 0 writes OUT_DIR/result.json: {"step", "losses", "tokens"}."""

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import datasets
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from agentforge.artifacts import atomic_write_json
from agentforge.train import TrainConfig, default_loss, distributed, train

VOCAB, SEQ = 64, 16


def tiny_model(seed: int = 0, tie_word_embeddings: bool = False, attention_dropout: float = 0.0) -> LlamaForCausalLM:
    """A 2-layer, 32-wide Llama (about 25k parameters), identical for a given seed. Attention
    dropout makes training consume random numbers, so exact resume needs the RNG states."""
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=SEQ * 2,
        tie_word_embeddings=tie_word_embeddings,
        attention_dropout=attention_dropout,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def counting_dataset(rows: int = 64, seed: int = 0) -> datasets.Dataset:
    """Rows that count up from a random start by a random stride (mod VOCAB), labels = input_ids:
    random-looking tokens that a tiny model can learn to continue after seeing two of them."""
    generator = torch.Generator().manual_seed(seed)
    start = torch.randint(0, VOCAB, (rows, 1), generator=generator)
    stride = torch.randint(1, 4, (rows, 1), generator=generator)
    ids = ((start + stride * torch.arange(SEQ)) % VOCAB).tolist()
    return datasets.Dataset.from_dict({"input_ids": ids, "labels": ids})


def adamw(model: torch.nn.Module, lr: float = 1e-2) -> torch.optim.AdamW:
    return torch.optim.AdamW(model.parameters(), lr=lr)


def _slowed_loss(delay_s: float):
    # Stretches each step so a test can SIGKILL the run between checkpoints.
    def loss_fn(model, batch):
        time.sleep(delay_s)
        return default_loss(model, batch)

    return loss_fn


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir")
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--micro-batch-size", type=int, default=None)
    parser.add_argument("--checkpoint-every", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=1)
    parser.add_argument("--step-delay", type=float, default=0.0)
    parser.add_argument("--dropout", type=float, default=0.0)
    args = parser.parse_args()

    model = tiny_model(attention_dropout=args.dropout)
    cfg = TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        micro_batch_size=args.micro_batch_size,
        checkpoint_every=args.checkpoint_every,
        log_every=args.log_every,
        progress=False,
    )
    loss_fn = _slowed_loss(args.step_delay) if args.step_delay else None
    result = train(model, counting_dataset(), cfg, optimizer=adamw(model), out_dir=args.out_dir, loss_fn=loss_fn)
    if distributed.is_main():
        atomic_write_json(
            os.path.join(args.out_dir, "result.json"),
            {"step": result.step, "losses": result.losses, "tokens": result.tokens},
        )
    distributed.shutdown()


if __name__ == "__main__":
    main()
