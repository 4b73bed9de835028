"""The locally trained byte-level BPE: exact round trips, digit splitting, save/reload, determinism."""

import pytest
from transformers import AutoTokenizer

from agentforge.data import load_text, train_tokenizer
from agentforge.data.tokenizer import EOS_TOKEN, PAD_TOKEN

VOCAB = 800
SAMPLES = [
    "def f(x):\n\treturn x + 12345  # tab, newline, digits",
    "class A:\r\n    pass\r\n",  # CRLF line ends
    "The quick brown fox jumps over the lazy dog. It's 3.14159, isn't it?",
    "4-1-7=",
    "a7=3 k2=9 q1=4 ?k2=9",
    "rev canroyer=reyornac",
    "count l in free the witness=1",
    "   leading and trailing spaces   ",
    "unicode: é ß 漢字 🙂 \u200b \x00 \x7f",
    "literal <|endoftext|> inside text",
    "",
]


@pytest.fixture(scope="module")
def corpus():
    return load_text("stdlib", max_docs=40) + load_text("pydoc", max_docs=20)


@pytest.fixture(scope="module")
def tokenizer(corpus):
    return train_tokenizer(corpus, VOCAB, max_chars=300_000)


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip_is_exact(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text


def test_learned_merges_compress_text(tokenizer):
    assert len(tokenizer) == VOCAB
    text = "def __init__(self):\n        return self"
    assert len(tokenizer(text)["input_ids"]) < len(text) / 2


def test_digits_are_single_tokens(tokenizer):
    tokens = tokenizer.convert_ids_to_tokens(tokenizer("12345+678=90")["input_ids"])
    assert tokens[:6] == ["1", "2", "3", "4", "5", "+"]
    # no merge anywhere in the vocabulary may join two digits
    for token in tokenizer.get_vocab():
        assert sum(c.isdigit() for c in tokenizer.convert_tokens_to_string([token])) <= 1, token


def test_special_tokens_and_no_automatic_bos(tokenizer):
    assert tokenizer.eos_token == tokenizer.bos_token == EOS_TOKEN
    assert tokenizer.pad_token == PAD_TOKEN
    assert tokenizer.eos_token_id != tokenizer.pad_token_id
    ids = tokenizer("abc")["input_ids"]
    assert ids == tokenizer("abc", add_special_tokens=False)["input_ids"]
    assert tokenizer.eos_token_id not in ids and tokenizer.pad_token_id not in ids
    assert tokenizer.decode([tokenizer.eos_token_id]) == EOS_TOKEN


def test_save_and_reload_gives_identical_ids(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded.get_vocab() == tokenizer.get_vocab()
    assert (reloaded.eos_token_id, reloaded.bos_token_id, reloaded.pad_token_id) == (
        tokenizer.eos_token_id,
        tokenizer.bos_token_id,
        tokenizer.pad_token_id,
    )
    for text in SAMPLES:
        ids = tokenizer(text)["input_ids"]
        assert reloaded(text)["input_ids"] == ids
        assert reloaded.decode(ids) == text


def test_training_is_deterministic(corpus, tokenizer):
    again = train_tokenizer(corpus, VOCAB, max_chars=300_000)
    assert again.backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()


def test_seed_chooses_the_max_chars_subset(corpus, tokenizer):
    other = train_tokenizer(corpus, VOCAB, seed=1, max_chars=300_000)
    assert other.get_vocab() != tokenizer.get_vocab()


@pytest.mark.parametrize(
    "texts, vocab_size, kwargs, match",
    [
        ([], VOCAB, {}, "non-empty"),
        ("a plain string", VOCAB, {}, "non-empty"),
        (["text"], 100, {}, "vocab_size"),
        (["text"], VOCAB, {"max_chars": 0}, "max_chars"),
        (["a long document"], VOCAB, {"max_chars": 3}, "no document fits"),
    ],
)
def test_bad_arguments_raise(texts, vocab_size, kwargs, match):
    with pytest.raises(ValueError, match=match):
        train_tokenizer(texts, vocab_size, **kwargs)
