"""R2M inside verl's (0.9.1) PPO/GRPO trainer.

- ``python -m r2m.integrations.verl.main_ppo <verl keys> r2m.reward_model_path=... r2m.<R2MConfig field>=...``:
  verl's ``ppo_trainer`` config plus an ``r2m`` block, run in the v1 trainer mode ``r2m_sync`` (`main_ppo`);
- `trainer.R2MPPOTrainer`: that mode (verl's sync trainer, R2M scoring after the old log-prob pass, an R2M update
  after the actor update, R2M state in verl's checkpoints);
- `worker.R2MActorRolloutRefWorker`: verl's actor worker with the states capture and the R2M methods;
- `settings`: the ``r2m`` block and the verl settings R2M refuses.

Modules importing verl are not imported here: ``import r2m.integrations.verl`` works without verl installed.
"""
