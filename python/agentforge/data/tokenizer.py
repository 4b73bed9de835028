"""A byte-level BPE tokenizer trained locally, saved with every model.

Byte-level: every string encodes (no unknown token) and decodes back exactly. Digits are split
into single tokens before BPE so that numbers tokenize digit by digit and arithmetic stays
learnable. `<|endoftext|>` is eos and bos, `<|pad|>` pads; nothing is added automatically when
encoding, so `tokenizer(text)["input_ids"]` is exactly the text's tokens.

The result is a plain `PreTrainedTokenizerFast` (in transformers v5, `TokenizersBackend`):
`save_pretrained(dir)` writes tokenizer.json + tokenizer_config.json and
`AutoTokenizer.from_pretrained(dir)` reloads it with identical ids.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

__all__ = ["EOS_TOKEN", "PAD_TOKEN", "SPECIAL_TOKENS", "train_tokenizer"]

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = (EOS_TOKEN, PAD_TOKEN)  # ids 0 and 1
_MIN_VOCAB = len(pre_tokenizers.ByteLevel.alphabet()) + len(SPECIAL_TOKENS)


def _sample_documents(texts: Sequence[str], max_chars: int, seed: int) -> list[str]:
    """A seeded random subset of whole documents holding at most `max_chars` characters."""
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    chosen, total = [], 0
    for i in order:
        if total + len(texts[i]) <= max_chars:
            chosen.append(i)
            total += len(texts[i])
    return [texts[i] for i in sorted(chosen)]


def _bpe_tokenizer() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            # add_prefix_space=False: a leading space would not survive decode, breaking round trips
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def train_tokenizer(
    texts: Sequence[str], vocab_size: int, *, seed: int = 0, max_chars: int | None = None
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE of `vocab_size` tokens (specials included) on `texts`.

    Deterministic for fixed inputs. With `max_chars`, trains on a `seed`-chosen random subset of
    whole documents totalling at most that many characters (BPE training time grows with the
    corpus); without it, `seed` has no effect.
    """
    if isinstance(texts, str) or not texts:
        raise ValueError("texts must be a non-empty sequence of strings (documents)")
    if not isinstance(vocab_size, int) or vocab_size < _MIN_VOCAB:
        raise ValueError(
            f"vocab_size must be an int >= {_MIN_VOCAB} (256 bytes + 2 special tokens), got {vocab_size!r}"
        )
    if max_chars is not None:
        if max_chars < 1:
            raise ValueError(f"max_chars must be positive or None, got {max_chars!r}")
        texts = _sample_documents(texts, max_chars, seed)
        if not texts:
            raise ValueError(f"no document fits in max_chars={max_chars}; raise max_chars")

    tokenizer = _bpe_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        # the default cleanup rewrites " ." as "." on decode, which breaks exact round trips
        clean_up_tokenization_spaces=False,
    )
