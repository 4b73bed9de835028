"""The parts of agentforge.train that need no training run: config validation, data order,
RNG capture, metrics.jsonl handling."""

import json
import random

import numpy as np
import pytest
import torch

from agentforge.train import MetricsLogger, TrainConfig, distributed, read_metrics
from agentforge.train.batches import check_dataset, collate, epoch_permutation, global_batch, micro_batches, rank_share
from agentforge.train.checkpoint import capture_rng, preserved_rng, restore_rng
from train_worker_tiny import counting_dataset

# ---------------------------------------------------------------------------------------------
# TrainConfig


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"steps": 0}, "steps must be a positive int, got 0"),
        ({"steps": 2.0}, "steps must be a positive int"),
        ({"batch_size": True}, "batch_size must be a positive int"),
        ({"micro_batch_size": 0}, "micro_batch_size must be None or a positive int"),
        ({"batch_size": 8, "micro_batch_size": 3}, r"batch_size \(8\) must be a multiple of micro_batch_size \(3\)"),
        ({"seed": -1}, "seed must be an int >= 0"),
        ({"checkpoint_every": -5}, "checkpoint_every must be an int >= 0"),
        ({"log_every": None}, "log_every must be an int >= 0"),
        ({"grad_clip": float("nan")}, "grad_clip must be a finite number >= 0"),
        ({"grad_clip": -1.0}, "grad_clip must be a finite number >= 0"),
        ({"wandb_mode": "dryrun"}, "wandb_mode must be None or one of online/offline/disabled"),
        ({"wandb_project": ""}, "wandb_project must be a non-empty string"),
        ({"amp": "fp16"}, "amp must be one of auto/bf16/off"),
        ({"progress": "yes"}, "progress must be a bool"),
    ],
)
def test_config_rejects_bad_values_in_one_line(kwargs, message):
    with pytest.raises(ValueError, match=message) as info:
        TrainConfig(**{"steps": 1, "batch_size": 8, **kwargs})
    assert "\n" not in str(info.value)


def test_config_micro_batch_against_world_size():
    assert TrainConfig(steps=1, batch_size=8).micro_batch(1) == 8
    assert TrainConfig(steps=1, batch_size=8).micro_batch(2) == 4
    assert TrainConfig(steps=1, batch_size=8, micro_batch_size=2).micro_batch(2) == 2
    with pytest.raises(ValueError, match="divisible by the world size"):
        TrainConfig(steps=1, batch_size=6).micro_batch(4)
    with pytest.raises(ValueError, match=r"world size × micro_batch_size \(2 × 4 = 8\)"):
        TrainConfig(steps=1, batch_size=12, micro_batch_size=4).micro_batch(2)


def test_config_wandb_mode_from_environment(monkeypatch):
    cfg = TrainConfig(steps=1, batch_size=1)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert cfg.resolved_wandb_mode() == "disabled"
    monkeypatch.delenv("WANDB_MODE")
    assert cfg.resolved_wandb_mode() == "offline"
    assert TrainConfig(steps=1, batch_size=1, wandb_mode="online").resolved_wandb_mode() == "online"
    monkeypatch.setenv("WANDB_MODE", "bogus")
    with pytest.raises(ValueError, match="WANDB_MODE='bogus'"):
        cfg.resolved_wandb_mode()


# ---------------------------------------------------------------------------------------------
# data order


def test_global_batches_walk_seeded_permutations_across_epochs():
    n, batch, seed = 10, 4, 7
    stream = [
        i
        for epoch in range(3)
        for i in torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    ]
    for index in range(7):
        assert global_batch(index, n, batch, seed) == stream[index * batch : (index + 1) * batch]
    assert sorted(epoch_permutation(n, seed, 1)) == list(range(n))


def test_rank_shares_and_micro_batches_partition_the_global_batch():
    rows = list(range(100, 112))
    shares = [rank_share(rows, r, 3) for r in range(3)]
    assert shares == [rows[0:4], rows[4:8], rows[8:12]]
    assert micro_batches(shares[1], 2) == [[104, 105], [106, 107]]


def test_collate_from_dataset_and_from_list_of_rows():
    data = counting_dataset(rows=6).add_column("weight", [0.5] * 6)
    batch = collate(data, [4, 1], torch.device("cpu"))
    assert batch["input_ids"].shape == (2, 16) and batch["input_ids"].dtype == torch.int64
    assert torch.equal(batch["input_ids"][0], torch.tensor(data[4]["input_ids"]))
    assert batch["weight"].tolist() == [0.5, 0.5]
    as_rows = [data[i] for i in range(len(data))]
    assert all(torch.equal(collate(as_rows, [4, 1], torch.device("cpu"))[k], batch[k]) for k in batch)


def test_dataset_problems_are_clear():
    with pytest.raises(ValueError, match="lacks column"):
        check_dataset([{"input_ids": [1, 2]}])
    with pytest.raises(ValueError, match="empty"):
        check_dataset([])
    with pytest.raises(TypeError, match="rows must be dicts"):
        check_dataset([[1, 2]])
    text = counting_dataset(rows=2).add_column("text", ["a", "b"])
    with pytest.raises(ValueError, match=r"column 'text' is not a fixed-length numeric column.*remove_columns"):
        collate(text, [0, 1], torch.device("cpu"))


# ---------------------------------------------------------------------------------------------
# RNG


def draw():
    return torch.rand(3).tolist(), random.random(), float(np.random.rand())


def test_rng_capture_restore_and_preserve():
    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    state = capture_rng()
    first = draw()
    restore_rng(state)
    assert draw() == first
    restore_rng(state)
    with preserved_rng():
        draw()
    assert draw() == first


# ---------------------------------------------------------------------------------------------
# metrics.jsonl


def test_metrics_logger_writes_rows_and_truncates_lost_work(tmp_path):
    with MetricsLogger(tmp_path, phase="other") as other:
        other.log({"acc": 0.5}, step=9)
    with MetricsLogger(tmp_path, phase="p") as logger:
        for step in (1, 2, 3, 4):
            logger.log({"loss": 1.0 / step}, step=step)
        logger.log({"note": 1})  # a row without a step survives truncation
    MetricsLogger(tmp_path, phase="p").truncate_after(2)
    rows = read_metrics(tmp_path)
    assert [(r["phase"], r["step"]) for r in rows] == [("other", 9), ("p", 1), ("p", 2), ("p", None)]
    assert read_metrics(tmp_path / "metrics.jsonl", phase="p")[1] == {"phase": "p", "step": 2, "loss": 0.5}


def test_metrics_logger_repairs_a_row_cut_by_a_crash(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"phase": "p", "step": 1}) + '\n{"phase": "p", "st')
    assert len(read_metrics(tmp_path)) == 1  # the cut row is ignored when reading
    with MetricsLogger(tmp_path, phase="p") as logger:
        logger.log({"loss": 2.0}, step=2)
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]


def test_disabled_metrics_logger_writes_nothing(tmp_path):
    with MetricsLogger(tmp_path, phase="p", enabled=False) as logger:
        logger.log({"loss": 1.0}, step=1)
        logger.truncate_after(0)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow  # starts the wandb service (several seconds)
def test_metrics_logger_wandb_offline_run(tmp_path):
    with MetricsLogger(tmp_path, phase="p", wandb_mode="offline", config={"a": 1}) as logger:
        logger.log({"loss": 1.0}, step=1)
    assert list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert read_metrics(tmp_path) == [{"phase": "p", "step": 1, "loss": 1.0}]


# ---------------------------------------------------------------------------------------------
# process-group helpers outside torchrun


def test_distributed_helpers_answer_as_a_world_of_one(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.maybe_init() is False
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    distributed.barrier()
    assert distributed.all_gather({"a": 1}) == [{"a": 1}] and distributed.broadcast_from_main(3) == 3
    layer = torch.nn.Linear(2, 2)
    assert distributed.unwrap(layer) is layer
