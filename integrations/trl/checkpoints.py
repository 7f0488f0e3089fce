"""Where R2M's state lives inside a TRL trainer's checkpoints."""

from __future__ import annotations

import os
from pathlib import Path

from transformers import TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

CHECKPOINT_SUBDIR = "r2m"


def r2m_checkpoint_dir(args: TrainingArguments, step: int) -> Path:
    """``<output_dir>/checkpoint-<step>/r2m``: R2M's state saved beside the trainer's checkpoint."""
    return Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{step}" / CHECKPOINT_SUBDIR


def given_checkpoint(path: str | os.PathLike) -> Path:
    """A trainer checkpoint directory's R2M state (or ``path`` itself when it is that state)."""
    path = Path(path)
    return path / CHECKPOINT_SUBDIR if (path / CHECKPOINT_SUBDIR).is_dir() else path


def find_checkpoint(args: TrainingArguments, state: TrainerState) -> Path:
    """The R2M state saved with the checkpoint the trainer resumed from (its step must match)."""
    candidates = [Path(p) for p in (args.resume_from_checkpoint,) if isinstance(p, (str, os.PathLike))]
    candidates.append(r2m_checkpoint_dir(args, state.global_step).parent)
    for candidate in candidates:
        trainer_state = candidate / "trainer_state.json"
        if (candidate / CHECKPOINT_SUBDIR).is_dir() and trainer_state.is_file() and \
                TrainerState.load_from_json(str(trainer_state)).global_step == state.global_step:
            return candidate / CHECKPOINT_SUBDIR
    raise FileNotFoundError(f"training resumes at step {state.global_step} but no R2M state for that step was found "
                            f"in {[str(c) for c in candidates]}; call r2m_reward.load_checkpoint(<checkpoint dir>) "
                            f"before trainer.train(resume_from_checkpoint=...)")
