"""A micro Llama saved as an HF model directory: the stand-in for a user's pretrained base in the
default suite (SmolLM2 itself runs in the slow tests). Its tokenizer is a small BPE with a chat
template, so the chat-prompt path of an instruct model is exercised too."""

from pathlib import Path

import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def micro_llama_dir(path: Path, *, seed: int = 0) -> Path:
    """A randomly initialised two-layer Llama (tied embeddings, grouped-query attention) and a
    384-token BPE trained on task strings and a few stdlib documents, saved at ``path``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from agentforge.data import make_split, train_tokenizer
    from agentforge.data.sources import load_text

    texts = load_text("stdlib", 20) + [
        it.prompt + it.answer
        for family in ("chain_sum", "kv_recall", "add_small")
        for it in make_split(family, "train", 50, seed=seed, level=0)
    ]
    tokenizer = train_tokenizer(texts, 384, seed=seed)
    tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
