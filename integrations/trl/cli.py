"""`r2m grpo ...` / `r2m rloo ...`: train a local policy against an R2M-wrapped local reward model with TRL.

Every GRPOConfig / RLOOConfig flag and TRL's model flags (``--model_name_or_path``, ``--dtype``, ``--use_peft``,
LoRA flags ...) are accepted as in TRL's own CLI (``--config file.yaml`` too), plus the script flags below and one
``--r2m_<field>`` flag per `r2m.R2MConfig` field.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from datasets import Dataset, DatasetDict, load_dataset, load_from_disk
from trl import GRPOConfig, GRPOTrainer, ModelConfig, RLOOConfig, RLOOTrainer, TrlParser, get_peft_config

from r2m.config import R2MConfig, config_flags
from r2m.integrations.trl.reward import R2MReward

TRAINERS = {"grpo": (GRPOConfig, GRPOTrainer), "rloo": (RLOOConfig, RLOOTrainer)}
DATA_FILE_TYPES = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


@dataclass
class R2MScriptArguments:
    """Where the reward model and the data are (local paths only)."""

    reward_model_path: str = field(metadata={"help": "Local directory of a Hugging Face *ForSequenceClassification "
                                                     "reward model (num_labels=1), loaded with "
                                                     "AutoModelForSequenceClassification."})
    dataset_path: str = field(metadata={"help": "Local dataset with a `prompt` column: a .json/.jsonl/.parquet/.csv "
                                                "file, a directory saved with `datasets.save_to_disk`, or a "
                                                "directory of data files."})
    reward_tokenizer_path: str | None = field(default=None, metadata={
        "help": "Local tokenizer directory for the reward model (default: --reward_model_path)."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on."})
    dataset_test_split: str = field(default="test", metadata={"help": "Split to evaluate on (with --eval_strategy)."})
    reward_funcs: list[str] | None = field(default=None, metadata={
        "help": "More reward functions mixed with R2M, as dotted import paths (e.g. `my_rewards.length_reward`)."})


FLAG_NOTES = {"total_steps": "None here: the trainer's max_steps.",
              "seed": "It also seeds the fusion's initialisation; None here: the trainer's --seed."}


def arguments_class(config_class: type = R2MConfig) -> type:
    """A dataclass with one ``r2m_<field>`` field per field of ``config_class`` (its type, default, help and
    choices), for TRL's `TrlParser` / HfArgumentParser; ``to_config()`` builds the config from the parsed values."""

    def to_config(self) -> R2MConfig:
        return config_class(**{f.name.removeprefix("r2m_"): getattr(self, f.name) for f in dataclasses.fields(self)})

    fields = []
    for flag in config_flags(config_class, FLAG_NOTES):
        metadata = {"help": flag.help} if flag.choices is None else {"help": flag.help, "choices": list(flag.choices)}
        fields.append((f"r2m_{flag.name}", flag.hint, field(default=flag.default, metadata=metadata)))
    return dataclasses.make_dataclass("R2MArguments", fields, namespace={
        "__module__": __name__, "__doc__": f"R2M hyper-parameters: one flag per `{config_class.__name__}` field.",
        "_argument_group_name": "R2M (real-time aligned reward model)", "to_config": to_config})


R2MArguments = arguments_class()


def make_parser(kind: str) -> TrlParser:
    config_class, _ = TRAINERS[kind]
    parser = TrlParser((R2MScriptArguments, R2MArguments, config_class, ModelConfig), prog=f"r2m {kind}",
                       description=__doc__)
    optional = {f"r2m_{flag.name}": flag for flag in config_flags(R2MConfig) if flag.optional}
    for action in parser._actions:  # HfArgumentParser strips Optional: let `--r2m_<field> None` through
        if action.dest in optional:
            action.type = optional[action.dest].parse
    return parser


def load_local_dataset(path: str) -> DatasetDict:
    """A local file or directory as a DatasetDict (a single split becomes ``train``)."""
    source = Path(path)
    if not source.exists():
        raise FileNotFoundError(f"--dataset_path {path!r} does not exist (only local datasets are supported)")
    if source.is_dir() and any((source / name).is_file() for name in ("dataset_dict.json", "dataset_info.json")):
        data = load_from_disk(str(source))
    elif source.is_dir():
        data = load_dataset(str(source))
    elif source.suffix in DATA_FILE_TYPES:
        data = load_dataset(DATA_FILE_TYPES[source.suffix], data_files=str(source))
    else:
        raise ValueError(f"--dataset_path {path!r}: expected a directory or one of {sorted(DATA_FILE_TYPES)}")
    return DatasetDict({"train": data}) if isinstance(data, Dataset) else data


def import_reward_func(dotted: str):
    module_path, _, name = dotted.rpartition(".")
    if not module_path:
        raise ValueError(f"--reward_funcs {dotted!r} is not a dotted import path (module.function)")
    sys.path.insert(0, os.getcwd())
    return getattr(importlib.import_module(module_path), name)


def main(argv: list[str]) -> int:
    """``argv[0]`` is ``grpo`` or ``rloo``; the rest are flags."""
    if not argv or argv[0] not in TRAINERS:
        print(f"usage: r2m {{{','.join(TRAINERS)}}} [flags]  (r2m grpo --help lists them)", file=sys.stderr)
        return 2
    kind = argv[0]
    script, r2m_args, training_args, model_args = make_parser(kind).parse_args_and_config(argv[1:])
    if model_args.model_name_or_path is None:
        raise SystemExit(f"r2m {kind}: --model_name_or_path (a local policy directory) is required")
    dataset = load_local_dataset(script.dataset_path)
    if script.dataset_train_split not in dataset:
        raise SystemExit(f"r2m {kind}: split {script.dataset_train_split!r} not in the dataset ({list(dataset)})")
    init_kwargs = {"dtype": model_args.dtype, "attn_implementation": model_args.attn_implementation,
                   "revision": model_args.model_revision, "trust_remote_code": training_args.trust_remote_code}
    training_args.model_init_kwargs = {**init_kwargs, **(training_args.model_init_kwargs or {})}
    reward_tokenizer = None
    if script.reward_tokenizer_path is not None:
        from transformers import AutoTokenizer

        reward_tokenizer = AutoTokenizer.from_pretrained(script.reward_tokenizer_path)
    reward = R2MReward(script.reward_model_path, reward_tokenizer, config=r2m_args.to_config(),
                       model_init_kwargs={"trust_remote_code": training_args.trust_remote_code})
    extra = [import_reward_func(name) for name in script.reward_funcs or []]
    evaluate = training_args.eval_strategy != "no"
    _, trainer_class = TRAINERS[kind]
    trainer = trainer_class(model=model_args.model_name_or_path, reward_funcs=[reward, *extra], callbacks=[reward],
                            args=training_args, train_dataset=dataset[script.dataset_train_split],
                            eval_dataset=dataset[script.dataset_test_split] if evaluate else None,
                            peft_config=get_peft_config(model_args))
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    if trainer.args.should_save:
        reward.r2m.save_pretrained(Path(training_args.output_dir) / "r2m")
    trainer.accelerator.print(f"saved the policy and the R2M state (r2m/) to {training_args.output_dir}")
    return 0
