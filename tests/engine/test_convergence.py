"""The budget rule's arithmetic: studied budgets, the chosen learning rate and the justified budget."""
import pytest
import torch

from common.engine import TrainConfig, convergence
from common.engine.convergence import budgets, chosen_factor, justified, with_schedule


def test_budgets_are_fractions_of_the_official_count():
    assert budgets(200) == [25, 50, 100, 200]
    assert budgets(4) == [1, 2, 4]          # at least one epoch, no repeats


def test_the_official_rate_is_kept_unless_beaten_by_more_than_a_point():
    assert chosen_factor({"1": 60.0, "3": 60.9, "10": 55.0}) == 1.0
    assert chosen_factor({"1": 58.7, "3": 58.9, "10": 60.9}) == 10.0
    assert chosen_factor({"1": 40.0, "100": 65.6, "30": 59.4}) == 100.0


def test_justified_budget_is_the_smallest_within_a_point_of_the_longest():
    rec = {"mean_val": {"25": 50.9, "50": 59.6, "100": 57.7, "200": 60.9}}
    assert justified(rec) == 200                       # 59.6 is 1.3 below: the official count stays
    rec = {"mean_val": {"25": 62.5, "50": 65.5, "100": 68.3, "200": 68.3}}
    assert justified(rec) == 100


def test_a_study_overrides_epochs_and_lr_per_run():
    class T:
        extra = {"schedule": {"epochs": 3, "lr": 0.5}}
    cfg = with_schedule(TrainConfig(epochs=200, lr=0.002, warmup_epochs=5), T())
    assert (cfg.epochs, cfg.lr, cfg.warmup_epochs) == (3, 0.5, 3)
    T.extra = {}
    assert with_schedule(TrainConfig(epochs=7), T()).epochs == 7


def test_one_by_one_seeds_each_fit_with_its_task_seed():
    """A run's random initialisation must not depend on the runs trained before it in a study."""
    from types import SimpleNamespace
    fit_many = convergence.one_by_one(lambda t: torch.randn(3))
    a, b, c = fit_many([SimpleNamespace(seed=1), SimpleNamespace(seed=2), SimpleNamespace(seed=1)])
    assert torch.equal(a, c) and not torch.equal(a, b)


def test_one_by_one_keeps_a_diverged_run_and_goes_on():
    from types import SimpleNamespace
    from common.errors import TrainingDiverged

    def fit(t):
        if t.lr > 1:
            raise TrainingDiverged("loss is nan at epoch 5")
        return t.lr
    out = convergence.one_by_one(fit)([SimpleNamespace(seed=1, lr=10), SimpleNamespace(seed=1, lr=0.1)])
    assert isinstance(out[0], convergence.Diverged) and "nan" in out[0].reason and out[1] == 0.1
