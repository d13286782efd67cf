import math

import pytest
import torch
import torch.nn as nn

from common.engine import TrainConfig, Trainer, index_batches, lr_at


def _problem():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 6, generator=g)
    y = (x[:, 0] > 0).long()
    return x, y


def _run(tmp_path, cfg, max_epochs=None, trainer=None):
    x, y = _problem()
    torch.manual_seed(123)
    model = nn.Sequential(nn.Linear(6, 8), nn.Dropout(0.3), nn.Linear(8, 2))  # dropout: RNG must resume too
    trainer = Trainer(model, cfg, out_dir=tmp_path)
    trainer.fit(lambda idx: nn.functional.cross_entropy(model(x[idx]), y[idx]),
                lambda ep: index_batches(len(x), 8, cfg.seed, ep), max_epochs=max_epochs)
    return model, trainer


def test_resume_after_kill_gives_identical_weights(tmp_path):
    cfg = TrainConfig(epochs=6, lr=0.1, optimizer="sgd", warmup_epochs=1, seed=3)
    ref, _ = _run(tmp_path / "full", cfg)
    _run(tmp_path / "killed", cfg, max_epochs=2)          # "killed" after epoch 2
    resumed, trainer = _run(tmp_path / "killed", cfg)      # a new process picks up the checkpoint
    assert len(trainer.history) == 6
    for a, b in zip(ref.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)


def test_resume_refuses_other_config(tmp_path):
    _run(tmp_path, TrainConfig(epochs=2, lr=0.1), max_epochs=1)
    with pytest.raises(ValueError, match="another config"):
        _run(tmp_path, TrainConfig(epochs=2, lr=0.2))


def test_loss_decreases_and_only_trainable_params_change(tmp_path):
    x, y = _problem()
    model = nn.Sequential(nn.Linear(6, 8), nn.Linear(8, 2))
    model[0].weight.requires_grad_(False)
    frozen = model[0].weight.clone()
    tr = Trainer(model, TrainConfig(epochs=8, lr=0.05, optimizer="adamw", warmup_epochs=0, weight_decay=0), tmp_path)
    hist = tr.fit(lambda idx: nn.functional.cross_entropy(model(x[idx]), y[idx]), lambda ep: index_batches(40, 10, 1, ep))
    assert hist[-1]["loss"] < hist[0]["loss"]
    assert torch.equal(model[0].weight, frozen)
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert "0.weight" not in ckpt["module"] and "1.weight" in ckpt["module"]


def test_dassl_constant_warmup_then_cosine():
    cfg = TrainConfig(epochs=10, lr=0.002, warmup_epochs=1, warmup_lr=1e-5)
    assert lr_at(cfg, 0) == 1e-5
    assert lr_at(cfg, 1) == pytest.approx(0.002)
    assert lr_at(cfg, 5) == pytest.approx(0.5 * 0.002 * (1 + math.cos(math.pi * 4 / 10)))
    assert lr_at(TrainConfig(epochs=4, lr=1.0, warmup_epochs=0, schedule="constant"), 3) == 1.0


def test_index_batches_deterministic_and_drop_rule():
    a, b = index_batches(10, 4, 1, 0), index_batches(10, 4, 1, 0)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert [len(t) for t in a] == [4, 4]                     # partial batch dropped
    assert [len(t) for t in index_batches(3, 32, 1, 0)] == [3]  # ...unless it is the only one
    assert not torch.equal(torch.cat(index_batches(10, 10, 1, 0)), torch.cat(index_batches(10, 10, 1, 1)))


def test_config_validation():
    with pytest.raises(ValueError, match="optimizer"):
        TrainConfig(optimizer="rmsprop")
    with pytest.raises(ValueError, match="unknown training options"):
        TrainConfig.from_dict({"lr": 0.1, "epoch": 3})
    with pytest.raises(ValueError, match="lr must be"):
        TrainConfig(lr=0)


def test_nan_loss_is_reported(tmp_path):
    p = nn.Parameter(torch.ones(1))
    tr = Trainer(nn.ParameterList([p]), TrainConfig(epochs=1, warmup_epochs=0), tmp_path)
    with pytest.raises(FloatingPointError, match="loss is nan"):
        tr.fit(lambda b: p.sum() * float("nan"), lambda ep: [0])


def test_nan_keeps_the_last_good_checkpoint_and_force_restarts(tmp_path, capsys):
    from common.engine.train import restarting
    from common.errors import TrainingDiverged, UserError
    w = nn.Parameter(torch.ones(1))
    module = nn.ParameterList([w])

    def step(epoch_of_nan):
        return lambda b: (w * 0 + float("nan")).sum() if b == epoch_of_nan else (w ** 2).sum()

    cfg = TrainConfig(epochs=3, warmup_epochs=0, lr=0.1)
    with pytest.raises(TrainingDiverged) as err:
        Trainer(module, cfg, tmp_path, desc="demo").fit(step(1), lambda ep: [ep])
    assert isinstance(err.value, UserError) and "--set force=true" in str(err.value)
    assert f"last good epoch is kept in {tmp_path / 'checkpoint.pt'}" in str(err.value)
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["epoch"] == 0  # epoch 1 survived
    # a plain rerun resumes (and says so); under force it starts from scratch instead
    tr = Trainer(module, cfg, tmp_path, desc="demo")
    assert tr.maybe_resume() and "demo: resumed from" in capsys.readouterr().err
    with restarting():
        tr = Trainer(module, cfg, tmp_path, desc="demo")
        hist = tr.fit(step(None), lambda ep: [ep])
    assert [h["epoch"] for h in hist] == [1, 2, 3]
    assert "force=true, so" in capsys.readouterr().err


def test_resumed_training_time_is_handed_to_the_run_record(tmp_path):
    from common.engine.train import take_resumed_seconds
    cfg = TrainConfig(epochs=4, lr=0.1, warmup_epochs=0)
    _run(tmp_path, cfg, max_epochs=2)
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    for h in ckpt["history"]:
        h["wall_s"] = 50.0  # as if the first two epochs had taken 100 s before the kill
    torch.save(ckpt, tmp_path / "checkpoint.pt")
    take_resumed_seconds()
    _run(tmp_path, cfg)
    assert take_resumed_seconds() == 100.0 and take_resumed_seconds() == 0.0
