"""R2M state saved with the trainer's checkpoints; resuming equals the uninterrupted run bit for bit."""

import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback
from trl import GRPOTrainer

import r2m
from r2m.integrations.trl import R2MReward

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
import trl_tiny


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def run(output_dir, resume=None, stop_at=None, reward_setup=None):
    policy, policy_tokenizer, reward_model, reward_tokenizer = trl_tiny.models_()
    reward = R2MReward(reward_model, reward_tokenizer, config=r2m.R2MConfig(lr=1e-2, attn_dim=16, seed=0))
    if reward_setup is not None:
        reward_setup(reward)
    callbacks = [reward] + ([StopAt(stop_at)] if stop_at else [])
    trainer = GRPOTrainer(model=policy, reward_funcs=[reward], callbacks=callbacks,
                          args=trl_tiny.args("grpo", str(output_dir), max_steps=4, save_strategy="steps",
                                             save_steps=2),
                          train_dataset=trl_tiny.dataset(), processing_class=policy_tokenizer)
    trainer.train(resume_from_checkpoint=resume)
    return trainer, reward


def r2m_state(reward):
    state = {f"fusion.{k}": v for k, v in reward.r2m.fusion.state_dict().items()}
    state.update({f"head.{k}": v for k, v in reward.r2m.head.state_dict().items()})
    for index, values in reward.r2m.optimizer.state_dict()["state"].items():
        state.update({f"optim.{index}.{k}": torch.as_tensor(v) for k, v in values.items()})
    return state


@pytest.mark.slow
def test_resume_equals_uninterrupted_run(tmp_path):
    reference_trainer, reference = run(tmp_path / "reference")
    interrupted_trainer, interrupted = run(tmp_path / "resumed", stop_at=2)
    assert len(trl_tiny.updates(interrupted_trainer)) == 2
    saved = load_file(str(tmp_path / "resumed" / "checkpoint-2" / "r2m" / "r2m_model.safetensors"))
    assert torch.equal(saved["head.weight"], interrupted.r2m.head.weight)

    resumed_trainer, resumed = run(tmp_path / "resumed", resume=True)
    resumed_updates = trl_tiny.updates(resumed_trainer, after_step=2)
    assert len(resumed_updates) == 2
    assert [u["loss"] for u in resumed_updates] == [u["loss"] for u in trl_tiny.updates(reference_trainer)[2:]]
    expected, got = r2m_state(reference), r2m_state(resumed)
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    assert resumed.r2m.total_steps == 4


@pytest.mark.slow
def test_resume_from_a_checkpoint_elsewhere(tmp_path):
    run(tmp_path / "first", stop_at=2)
    shutil.copytree(tmp_path / "first" / "checkpoint-2", tmp_path / "moved")
    shutil.rmtree(tmp_path / "first" / "checkpoint-2" / "r2m")
    with pytest.raises(FileNotFoundError, match="load_checkpoint"):
        run(tmp_path / "first", resume=str(tmp_path / "first" / "checkpoint-2"))
    resumed_trainer, _ = run(tmp_path / "other", resume=str(tmp_path / "moved"),
                             reward_setup=lambda reward: reward.load_checkpoint(tmp_path / "moved"))
    assert len(trl_tiny.updates(resumed_trainer, after_step=2)) == 2
