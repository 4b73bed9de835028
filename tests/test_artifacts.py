"""agentforge.artifacts: atomic files and directories, hashes, verified model directories."""

import json
import os

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from agentforge.artifacts import (
    MANIFEST,
    CorruptArtifact,
    atomic_directory,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    load_model_dir,
    read_metadata,
    recover_directory,
    save_model_dir,
    sha256_dir,
    sha256_file,
)
from train_worker_tiny import VOCAB, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def hidden_leftovers(directory):
    return sorted(name for name in os.listdir(directory) if name.startswith("."))


def tiny_tokenizer():
    vocab = {f"t{i}": i for i in range(VOCAB - 1)} | {"<unk>": VOCAB - 1}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="t0", pad_token="t1")


# ---------------------------------------------------------------------------------------------
# atomic files and directories


def test_atomic_writes_replace_content_and_leave_no_temp_files(tmp_path):
    atomic_write_bytes(tmp_path / "a.bin", b"\x00\x01")
    atomic_write_text(tmp_path / "a.txt", "old")
    atomic_write_text(tmp_path / "a.txt", "new ü")
    atomic_write_json(tmp_path / "sub" / "a.json", {"x": [1, 2.5]})
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "a.txt").read_text(encoding="utf-8") == "new ü"
    assert json.loads((tmp_path / "sub" / "a.json").read_text()) == {"x": [1, 2.5]}
    assert oct((tmp_path / "a.txt").stat().st_mode & 0o777) == oct(0o644)
    assert hidden_leftovers(tmp_path) == [] and hidden_leftovers(tmp_path / "sub") == []


def test_atomic_write_json_of_unserialisable_object_keeps_old_file(tmp_path):
    atomic_write_json(tmp_path / "a.json", {"ok": 1})
    with pytest.raises(TypeError):
        atomic_write_json(tmp_path / "a.json", {"bad": object()})
    assert json.loads((tmp_path / "a.json").read_text()) == {"ok": 1}
    assert hidden_leftovers(tmp_path) == []


def test_atomic_directory_creates_and_replaces(tmp_path):
    target = tmp_path / "art"
    with atomic_directory(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".art.tmp-") and not target.exists()
        (tmp / "a").write_text("1")
    assert sorted(os.listdir(target)) == ["a"]
    with atomic_directory(target) as tmp:
        (tmp / "b").write_text("2")
    assert sorted(os.listdir(target)) == ["b"]  # replaced whole, not merged
    assert hidden_leftovers(tmp_path) == []


def test_atomic_directory_exception_leaves_previous_version_and_no_partial_dir(tmp_path):
    target = tmp_path / "art"
    with atomic_directory(target) as tmp:
        (tmp / "a").write_text("complete")
    with pytest.raises(RuntimeError, match="crash"):
        with atomic_directory(target) as tmp:
            (tmp / "a").write_text("half")
            raise RuntimeError("crash while writing")
    assert (target / "a").read_text() == "complete"
    assert hidden_leftovers(tmp_path) == []
    with pytest.raises(KeyError):
        with atomic_directory(tmp_path / "never") as tmp:
            (tmp / "x").write_text("x")
            raise KeyError("no")
    assert os.listdir(tmp_path) == ["art"]


def test_recover_directory_after_crash_between_renames(tmp_path):
    # The writer moved the old version aside, then died before renaming the new one in.
    target, backup = tmp_path / "art", tmp_path / ".art.old"
    backup.mkdir()
    (backup / "a").write_text("previous")
    recover_directory(target)
    assert (target / "a").read_text() == "previous" and not backup.exists()
    # Died after renaming the new one in, before deleting the old: the new one stays.
    backup.mkdir()
    (backup / "a").write_text("stale")
    with atomic_directory(target) as tmp:
        (tmp / "a").write_text("next")
    assert (target / "a").read_text() == "next" and hidden_leftovers(tmp_path) == []


def test_temp_leftovers_of_dead_writers_are_removed_and_live_ones_kept(tmp_path):
    dead_pid = 2**22 + 12345  # above the default pid_max: no such process
    (tmp_path / f".art.tmp-{dead_pid}-abc").mkdir()
    (tmp_path / f".art.tmp-{os.getpid()}-def").mkdir()  # a live writer (this process)
    (tmp_path / f".f.json.tmp-{dead_pid}-ghi").write_text('{"half": ')
    recover_directory(tmp_path / "art")
    atomic_write_json(tmp_path / "f.json", {})
    assert hidden_leftovers(tmp_path) == [f".art.tmp-{os.getpid()}-def"]


def test_atomic_directory_refuses_a_file_target(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(NotADirectoryError, match="not a directory"):
        with atomic_directory(tmp_path / "f"):
            pass


def test_sha256_file_and_dir(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "b").write_bytes(b"abc")
    (tmp_path / "d" / "sub" / "a").write_bytes(b"")
    assert sha256_file(tmp_path / "d" / "b") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    hashes = sha256_dir(tmp_path / "d")
    assert list(hashes) == ["b", "sub/a"]
    assert hashes["sub/a"] == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


# ---------------------------------------------------------------------------------------------
# model directories


@pytest.mark.parametrize("tied", [False, True])
def test_model_dir_round_trip_gives_identical_logits(tmp_path, tied):
    model, tokenizer = tiny_model(seed=3, tie_word_embeddings=tied).eval(), tiny_tokenizer()
    metadata = {"phase": "cognate", "parents": [], "metrics": {"ppl": 12.5}}
    save_model_dir(model, tokenizer, tmp_path / "m", metadata)
    files = os.listdir(tmp_path / "m")
    assert "model.safetensors" in files and MANIFEST in files and not any(f.endswith((".bin", ".pt")) for f in files)
    loaded, loaded_tokenizer, loaded_metadata = load_model_dir(tmp_path / "m")
    assert loaded_metadata == metadata == read_metadata(tmp_path / "m")
    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    text = "t5 t9 t33"
    assert loaded_tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"] == [5, 9, 33]
    if tied:
        assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()


def test_model_dir_without_tokenizer(tmp_path):
    save_model_dir(tiny_model(), None, tmp_path / "m", {"phase": "p"})
    model, tokenizer, metadata = load_model_dir(tmp_path / "m")
    assert tokenizer is None and metadata == {"phase": "p"}


def test_model_dir_rejects_unserialisable_metadata_before_writing(tmp_path):
    with pytest.raises(TypeError):
        save_model_dir(tiny_model(), None, tmp_path / "m", {"bad": {1, 2}})
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: (d / "config.json").write_text((d / "config.json").read_text() + " "), "config.json has changed"),
        (lambda d: (d / "generation_config.json").unlink(), "generation_config.json is missing"),
        (lambda d: (d / "extra.bin").write_bytes(b"x"), "extra.bin was not part of it"),
        (lambda d: (d / MANIFEST).unlink(), f"{MANIFEST} is missing"),
        (lambda d: (d / MANIFEST).write_text("{trunc"), f"{MANIFEST} is unreadable"),
    ],
)
def test_load_model_dir_detects_corruption(tmp_path, damage, message):
    save_model_dir(tiny_model(), None, tmp_path / "m", {"phase": "p"})
    damage(tmp_path / "m")
    with pytest.raises(CorruptArtifact, match=message) as info:
        load_model_dir(tmp_path / "m")
    assert "re-run the phase that wrote it" in str(info.value) and "\n" not in str(info.value)


def test_load_model_dir_without_verify_skips_hashing(tmp_path):
    save_model_dir(tiny_model(), None, tmp_path / "m", {"phase": "p"})
    (tmp_path / "m" / "notes.txt").write_text("added by hand")
    load_model_dir(tmp_path / "m", verify=False)


# ---------------------------------------------------------------------------------------------
# refusing what must never be loaded, and a full disk


def test_a_pickle_file_is_refused_by_name_without_loading_it(tmp_path):
    save_model_dir(tiny_model(), None, tmp_path / "m", {})
    (tmp_path / "m" / "pytorch_model.bin").write_bytes(b"\x80\x04 never unpickled")
    with pytest.raises(
        CorruptArtifact,
        match=r"pytorch_model.bin is a pickle file, which can run code when loaded; "
        r"agentforge loads safetensors only",
    ):
        load_model_dir(tmp_path / "m", verify=False)


@pytest.mark.parametrize("key, value", [("num_hidden_layers", 10**6), ("vocab_size", 10**9), ("hidden_size", 4096)])
def test_a_config_larger_than_its_weights_is_refused_before_any_model_is_built(tmp_path, key, value):
    save_model_dir(tiny_model(), None, tmp_path / "m", {})
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, key: value}))
    with pytest.raises(CorruptArtifact, match=rf"config.json declares {key}={value}, more than its weights hold"):
        load_model_dir(tmp_path / "m", verify=False)


def test_a_full_disk_is_named_as_such(tmp_path, monkeypatch):
    import errno

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(
        OSError,
        match=r"^\[Errno 28\] the disk holding .* is full \(.* MiB free\) while writing "
        r".*a.json; free some space, then resume$",
    ):
        atomic_write_json(tmp_path / "a.json", {"x": 1})
    assert hidden_leftovers(tmp_path) == []
