"""agentforge.train.train in one process: learning, micro-batching, logging, evaluation, exact
resume after a crash, and the refusals."""

import pytest
import torch
from transformers import LlamaForCausalLM

from agentforge.artifacts import CorruptArtifact
from agentforge.train import TrainConfig, default_loss, read_metrics, train
from train_worker_tiny import SEQ, adamw, counting_dataset, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def config(**overrides) -> TrainConfig:
    return TrainConfig(**{"steps": 6, "batch_size": 8, "log_every": 1, "progress": False, **overrides})


def run(out_dir, cfg=None, *, model=None, lr=1e-2, **kwargs):
    model = model or tiny_model()
    result = train(model, counting_dataset(), cfg or config(), optimizer=adamw(model, lr), out_dir=out_dir, **kwargs)
    return model, result


def test_loss_falls_on_a_learnable_pattern(tmp_path):
    cfg = config(steps=60, batch_size=16, log_every=10)
    model, result = run(tmp_path, cfg)
    assert result.step == 60 and len(result.losses) == 60
    assert result.losses[-1] < 0.3 * result.losses[0]
    assert result.tokens == 60 * 16 * SEQ and result.elapsed_s > 0
    assert model.training and not any(p.grad is not None for p in model.parameters())
    assert [r["step"] for r in read_metrics(tmp_path)] == [10, 20, 30, 40, 50, 60]


def test_micro_batching_gives_the_same_update(tmp_path):
    def trained(micro):
        model = tiny_model()
        result = train(
            model,
            counting_dataset(),
            config(steps=3, micro_batch_size=micro),
            optimizer=torch.optim.SGD(model.parameters(), lr=0.5),
            out_dir=tmp_path / str(micro),
        )
        return model, result.losses

    whole, whole_losses = trained(8)  # 1 x 8
    accumulated, accumulated_losses = trained(2)  # 4 x 2
    assert accumulated_losses == pytest.approx(whole_losses, abs=1e-6)
    for a, b in zip(whole.parameters(), accumulated.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_rows_eval_and_loss_metrics(tmp_path):
    seen = []

    def eval_fn(model):
        seen.append((model.training, torch.is_grad_enabled()))
        torch.rand(100)  # evaluation may draw random numbers without changing training
        return {"score": len(seen), "as_tensor": torch.tensor(0.25)}

    def loss_with_metrics(model, batch):
        loss = default_loss(model, batch)
        return loss, {"double": 2 * loss.detach()}

    cfg = config(steps=7, log_every=3, eval_every=2)
    model, result = run(
        tmp_path / "a", cfg, model=tiny_model(attention_dropout=0.2), eval_fn=eval_fn, loss_fn=loss_with_metrics
    )
    assert seen == [(False, False)] * 4 and model.training
    assert result.last_eval == {"score": 4.0, "as_tensor": 0.25}
    rows = read_metrics(tmp_path / "a", phase="train")
    assert [r["step"] for r in rows] == [2, 3, 4, 6, 7]  # eval steps 2 4 6 7, log steps 3 6 7
    assert [r.get("eval/score") for r in rows] == [1.0, None, 2.0, 3.0, 4.0]
    for row in rows:
        assert row["loss"] == result.losses[row["step"] - 1]
        assert row["double"] == pytest.approx(2 * row["loss"], rel=1e-6)
        assert row["lr"] == 1e-2 and row["grad_norm"] > 0 and row["tokens"] == row["step"] * 8 * SEQ
    _, without_eval = run(tmp_path / "b", cfg, model=tiny_model(attention_dropout=0.2), loss_fn=loss_with_metrics)
    assert without_eval.losses == result.losses


class Crash(Exception):
    pass


def crash_at_step(step: int, micro_batches_per_step: int = 1):
    calls = []

    def loss_fn(model, batch):
        calls.append(1)
        if len(calls) > (step - 1) * micro_batches_per_step:
            raise Crash(f"simulated crash in step {step}")
        return default_loss(model, batch)

    return loss_fn


def test_resume_after_crash_reproduces_the_uninterrupted_run_exactly(tmp_path):
    cfg = config(steps=12, checkpoint_every=4)
    _, reference = run(tmp_path / "ref", cfg, model=tiny_model(attention_dropout=0.2))
    with pytest.raises(Crash):
        run(tmp_path / "run", cfg, model=tiny_model(attention_dropout=0.2), loss_fn=crash_at_step(11))
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == list(range(1, 11))
    # A fresh process would rebuild model and optimizer from scratch: a different init proves the
    # weights come from the checkpoint.
    model, resumed = run(tmp_path / "run", cfg, model=tiny_model(seed=99, attention_dropout=0.2))
    assert resumed.losses == reference.losses and resumed.tokens == reference.tokens
    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == list(range(1, 13))  # rows 9 and 10 of the lost work dropped, redone once
    assert [r["loss"] for r in rows] == reference.losses


def test_finished_run_resumes_to_its_result_and_can_be_extended(tmp_path):
    _, four = run(tmp_path / "a", config(steps=4))
    model, again = run(tmp_path / "a", config(steps=4), model=tiny_model(seed=5), loss_fn=crash_at_step(1))
    assert again.losses == four.losses  # loaded, not retrained (the loss_fn would crash)
    _, six = run(tmp_path / "a", config(steps=6))
    _, straight = run(tmp_path / "b", config(steps=6))
    assert six.losses == straight.losses
    assert [r["step"] for r in read_metrics(tmp_path / "a")] == [1, 2, 3, 4, 5, 6]


def test_resume_refuses_a_changed_config(tmp_path):
    run(tmp_path, config(steps=2))
    with pytest.raises(ValueError, match=r"different config \(batch_size: 8 then, 4 now\)") as info:
        run(tmp_path, config(steps=2, batch_size=4))
    assert "resume=False" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(ValueError, match=r"optimizer_defaults.lr: 0.01 then, 0.001 now; optimizer_groups.0.lr"):
        run(tmp_path, config(steps=2), lr=1e-3)
    with pytest.raises(ValueError, match="beyond steps=1"):
        run(tmp_path, config(steps=1))
    _, fresh = run(tmp_path, config(steps=3, batch_size=4), resume=False)
    assert fresh.step == 3 and [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]


def test_corrupt_checkpoint_is_refused(tmp_path):
    run(tmp_path, config(steps=2))
    with open(tmp_path / "checkpoint" / "optimizer.pt", "r+b") as f:
        f.seek(100)
        f.write(b"\xff\xfe")
    with pytest.raises(CorruptArtifact, match="optimizer.pt has changed"):
        run(tmp_path, config(steps=3))


def test_checkpoint_of_another_model_is_refused(tmp_path):
    run(tmp_path, config(steps=2))
    llama_config = tiny_model().config
    llama_config.intermediate_size = 48  # same tensors and optimizer settings, other shapes
    other = LlamaForCausalLM(llama_config)
    with pytest.raises(ValueError, match="does not fit this model"):
        train(other, counting_dataset(), config(steps=3), optimizer=adamw(other), out_dir=tmp_path)


def test_diverging_loss_stops_training(tmp_path):
    with pytest.raises(FloatingPointError, match="loss is nan at step 1"):
        run(tmp_path, loss_fn=lambda model, batch: default_loss(model, batch) * float("nan"))


def test_bad_data_and_batching_are_refused_before_training(tmp_path):
    model = tiny_model()
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['labels'\]"):
        train(model, counting_dataset().remove_columns("labels"), config(), optimizer=adamw(model), out_dir=tmp_path)
    with pytest.raises(ValueError, match="multiple of micro_batch_size"):
        config(batch_size=8, micro_batch_size=3)
    assert not tmp_path.joinpath("metrics.jsonl").exists()


def test_resume_is_exact_with_mugrokfast(tmp_path):
    # An optimizer with its own state_dict, schedule and Grokfast EMA: all must come back exactly.
    optim = pytest.importorskip("agentforge.optim")

    def run_mugrokfast(out_dir, steps, seed=0):
        model = tiny_model(seed=seed)
        optimizer = optim.MuGrokfast.from_preset(model, "pretrain", total_steps=8)
        return train(
            model, counting_dataset(), config(steps=steps, checkpoint_every=2), optimizer=optimizer, out_dir=out_dir
        )

    reference = run_mugrokfast(tmp_path / "ref", 8)
    run_mugrokfast(tmp_path / "run", 5)
    resumed = run_mugrokfast(tmp_path / "run", 8, seed=7)
    assert resumed.losses == reference.losses
    lrs = [r["lr"] for r in read_metrics(tmp_path / "run")]
    assert lrs == [r["lr"] for r in read_metrics(tmp_path / "ref")] and lrs[0] != lrs[-1]  # scheduled
