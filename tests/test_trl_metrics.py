"""R2M's metrics in TRL: the one table of names and meanings, the one place that touches TRL internals (pinned here
against trl 1.16: a TRL upgrade that moves them breaks this test, not a run), and r2m/update_size against the
weights before and after each update."""

import sys
from pathlib import Path

import pytest
import torch
import trl
from transformers import TrainerCallback
from trl import GRPOTrainer

import r2m
from r2m.integrations.trl import R2MReward
from r2m.integrations.trl.metrics import METRICS, TrainerMetrics

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
import trl_tiny


class Weights(TrainerCallback):
    """The R2M fusion and head weights at each step end, taken before (listed ahead of the reward in callbacks) or
    after (listed behind it) the update R2MReward runs there."""

    def __init__(self, reward):
        self.reward, self.seen = reward, {}

    def on_step_end(self, args, state, control, **kwargs):
        model = self.reward.r2m_model
        self.seen[state.global_step] = torch.cat([p.detach().double().flatten().clone()
                                                  for p in [*model.fusion.parameters(), *model.head.parameters()]])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    policy, policy_tokenizer, reward_model, reward_tokenizer = trl_tiny.models_()
    reward = R2MReward(reward_model, reward_tokenizer, config=r2m.R2MConfig(lr=1e-2, attn_dim=16, seed=0))
    links = []
    call = reward.__call__

    class Spy(R2MReward):
        def __call__(self, *args, **kwargs):
            links.append(kwargs["log_metric"])
            return call(*args, **kwargs)

    reward.__class__ = Spy
    before, after = Weights(reward), Weights(reward)
    trainer = GRPOTrainer(model=policy, reward_funcs=[reward], callbacks=[before, reward, after],
                          args=trl_tiny.args("grpo", str(tmp_path_factory.mktemp("metrics")), max_steps=2),
                          train_dataset=trl_tiny.dataset(), processing_class=policy_tokenizer)
    trainer.train()
    return trainer, reward, links, before.seen, after.seen


def test_trl_internals_r2m_relies_on(run):
    """trl 1.16: the log_metric a reward function gets is a bound method of the trainer, which keeps its coming
    log's metrics in ``_metrics["train"]`` (name -> list of values)."""
    trainer, _, links, _, _ = run
    assert trl.__version__.startswith("1.16"), "re-check the TRL internals TrainerMetrics reads (this test pins them)"
    assert links and all(getattr(link, "__self__", None) is trainer for link in links)
    metrics = TrainerMetrics()
    metrics.bind(links[0])
    assert metrics.trainer is trainer
    store = trainer._metrics["train"]
    store.clear()
    metrics.log_update({"r2m/loss": 0.5})
    assert store["r2m/loss"] == [0.5]


def test_every_metric_logged_is_in_the_table_and_the_docstring(run):
    trainer, _, _, _, _ = run
    logged = {key for entry in trainer.state.log_history for key in entry if key.startswith("r2m/")}
    names = {metric.name for metric in METRICS}
    assert logged <= names and {"r2m/loss", "r2m/update_size", "r2m/reward_mean", "r2m/groups_used"} <= logged
    assert all(f"``{name}``" in R2MReward.__doc__ for name in names)
    assert all(metric.when in ("call", "update") and metric.meaning for metric in METRICS)
    with pytest.raises(KeyError, match="not in r2m.integrations.trl.metrics.METRICS"):
        TrainerMetrics().log_update({"r2m/unlisted": 1.0})


def test_update_size_is_the_relative_change_of_the_weights(run):
    trainer, _, _, before, after = run
    updates = {entry["step"]: entry["r2m/update_size"] for entry in trainer.state.log_history
               if "r2m/update_size" in entry}
    assert sorted(updates) == [1, 2]
    for step, logged in updates.items():
        expected = float((after[step] - before[step]).norm() / before[step].norm())
        assert expected > 0 and logged == pytest.approx(expected, rel=1e-6)


def test_call_metrics_go_through_log_metric_and_update_metrics_need_the_trainer_store(caplog):
    class Trainer:
        def __init__(self):
            self.logged = []

        def log_metric(self, name, value):
            self.logged.append((name, value))

    trainer, metrics = Trainer(), TrainerMetrics()
    metrics.bind(trainer.log_metric)
    metrics.log_call({"r2m/omega": 0.5}, trainer.log_metric)
    assert metrics.trainer is trainer and trainer.logged == [("r2m/omega", 0.5)]
    with caplog.at_level("WARNING"):
        metrics.log_update({"r2m/loss": 1.0})
        metrics.log_update({"r2m/loss": 2.0})
    assert [r.message for r in caplog.records].count(caplog.records[0].message) == 1
    assert "keeps no `_metrics['train']`" in caplog.records[0].message
