"""`r2m grpo ...` / `r2m rloo ...`: train a local policy against an R2M-wrapped local reward model with TRL.

Every GRPOConfig / RLOOConfig flag and TRL's model flags (``--model_name_or_path``, ``--dtype``, ``--use_peft``,
LoRA flags ...) are accepted as in TRL's own CLI (``--config file.yaml`` too), plus the script flags below and one
``--r2m_<field>`` flag per `r2m.R2MConfig` field.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from datasets import Dataset, DatasetDict, load_dataset, load_from_disk
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
)
from transformers.utils import is_torch_bf16_gpu_available
from trl import GRPOConfig, GRPOTrainer, ModelConfig, RLOOConfig, RLOOTrainer, TrlParser, get_peft_config

from r2m.config import R2MConfig, config_flags, flag_message
from r2m.integrations.trl.reward import R2MReward

TRAINERS = {"grpo": (GRPOConfig, GRPOTrainer), "rloo": (RLOOConfig, RLOOTrainer)}
DATA_FILE_TYPES = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
CAUSAL_LMS = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
SEQUENCE_CLASSIFIERS = set(MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES.values())


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


class UsageError(Exception):
    """A mistake in the command line or its config file: reported in one line naming the flag, exit status 2."""


def hardware_defaults() -> dict[str, bool]:
    """Training precision from the hardware found: TRL's configs default to bf16, which refuses to start where no
    accelerator supports it (a CPU machine). A value given on the command line or in ``--config`` wins."""
    return {} if is_torch_bf16_gpu_available() else {"bf16": False}


def close_flag(flag: str, known: Sequence[str]) -> str:
    """`` (did you mean --x?)`` for the nearest known flag, or nothing."""
    match = difflib.get_close_matches(flag, known, n=1, cutoff=0.75)
    return f" (did you mean {match[0]}?)" if match else ""


def unknown_flags_error(strings: Sequence[str], known: Sequence[str], source: str) -> UsageError:
    flags = [s for s in strings if s.startswith("-")] or list(strings)
    described = "; ".join(f"{flag}{close_flag(flag, known)}" for flag in flags)
    return UsageError(f"unknown {'flag' if len(flags) == 1 else 'flags'} {source}: {described}")


def parse_arguments(kind: str, args: list[str]):
    """(script, r2m, training, model) arguments and the R2MConfig, or a `UsageError` naming the flag at fault."""
    parser = make_parser(kind)
    parser.set_defaults(**hardware_defaults())
    if "--config" in args:
        position = args.index("--config") + 1
        if position == len(args) or not Path(args[position]).is_file():
            given = repr(args[position]) if position < len(args) else "nothing"
            raise UsageError(f"--config expects a YAML file of flags, got {given}")
    known = [option for action in parser._actions for option in action.option_strings]
    try:
        *parsed, config_unknown, cli_unknown = parser.parse_args_and_config(
            args, return_remaining_strings=True, separate_remaining_strings=True)
    except ValueError as error:  # TRL's and transformers' config checks, a malformed --config file
        raise UsageError(str(error)) from None
    if cli_unknown:
        raise unknown_flags_error(cli_unknown, known, "on the command line")
    if config_unknown:
        keys = [s.removeprefix("--") for s in config_unknown if s.startswith("--")]
        raise unknown_flags_error(keys, [o.removeprefix("--") for o in known], "in the --config file")
    script, r2m_args, training_args, model_args = parsed
    try:
        r2m_config = r2m_args.to_config()
    except (TypeError, ValueError) as error:
        raise UsageError(flag_message(str(error))) from None
    return script, r2m_args, training_args, model_args, r2m_config


def local_config(flag: str, path: str | None) -> PretrainedConfig | None:
    """The config of a local checkpoint (None for a PEFT adapter), or a `UsageError` naming ``flag``."""
    if path is None:
        raise UsageError(f"{flag} (a local directory) is required")
    folder = Path(path)
    if not folder.is_dir():
        raise UsageError(f"{flag} {path!r} does not exist (expected a local model directory)")
    if (folder / "adapter_config.json").is_file() and not (folder / "config.json").is_file():
        return None
    if not (folder / "config.json").is_file():
        raise UsageError(f"{flag} {path!r} holds no config.json (expected a directory written by save_pretrained)")
    return AutoConfig.from_pretrained(folder)


def architectures(config: PretrainedConfig) -> list[str]:
    """The model classes a config names (a config without them: the causal LM of its model type)."""
    return list(config.architectures or []) or [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type, "")]


def require_tokenizer(flag: str, path: str, hint: str) -> None:
    if not any((Path(path) / name).is_file() for name in TOKENIZER_FILES):
        raise UsageError(f"{flag} {path!r} holds no tokenizer ({' or '.join(TOKENIZER_FILES)}){hint}")


def check_models(script: R2MScriptArguments, model_args: ModelConfig) -> None:
    """Refuse, before anything is loaded, a policy or reward model that is missing or of the wrong kind."""
    policy_config = local_config("--model_name_or_path", model_args.model_name_or_path)
    if policy_config is not None:
        policy = architectures(policy_config)
        if not set(policy) & CAUSAL_LMS:
            found = "a reward model" if set(policy) & SEQUENCE_CLASSIFIERS else "a model"
            raise UsageError(f"--model_name_or_path {model_args.model_name_or_path!r} holds {found} "
                             f"({', '.join(policy)}); expected a causal LM policy (*ForCausalLM)")
        require_tokenizer("--model_name_or_path", model_args.model_name_or_path, "")
    reward_config = local_config("--reward_model_path", script.reward_model_path)
    reward = architectures(reward_config) if reward_config is not None else []
    if not set(reward) & SEQUENCE_CLASSIFIERS:
        raise UsageError(f"--reward_model_path {script.reward_model_path!r} holds "
                         f"{', '.join(reward) if reward else 'a PEFT adapter'}; expected a *ForSequenceClassification "
                         "reward model with num_labels=1")
    if reward_config.num_labels != 1:
        raise UsageError(f"--reward_model_path {script.reward_model_path!r} has num_labels="
                         f"{reward_config.num_labels}; a reward model scores with one logit (num_labels=1)")
    if script.reward_tokenizer_path is None:
        require_tokenizer("--reward_model_path", script.reward_model_path, "; pass --reward_tokenizer_path")
    elif not Path(script.reward_tokenizer_path).is_dir():
        raise UsageError(f"--reward_tokenizer_path {script.reward_tokenizer_path!r} does not exist")
    else:
        require_tokenizer("--reward_tokenizer_path", script.reward_tokenizer_path, "")


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


def training_splits(script: R2MScriptArguments, evaluate: bool) -> tuple[Dataset, Dataset | None]:
    """The train (and eval) split, each checked for the ``prompt`` column the trainers read."""
    try:
        dataset = load_local_dataset(script.dataset_path)
    except (OSError, ValueError) as error:
        raise UsageError(str(error)) from None
    splits = [("--dataset_train_split", script.dataset_train_split)]
    splits += [("--dataset_test_split", script.dataset_test_split)] if evaluate else []
    for flag, split in splits:
        if split not in dataset:
            raise UsageError(f"{flag} {split!r} is not a split of --dataset_path {script.dataset_path!r} "
                             f"(it has {list(dataset)})")
        if "prompt" not in dataset[split].column_names:
            raise UsageError(f"--dataset_path {script.dataset_path!r}: split {split!r} has columns "
                             f"{dataset[split].column_names}; the trainer needs a 'prompt' column")
    return dataset[script.dataset_train_split], dataset[script.dataset_test_split] if evaluate else None


def import_reward_func(dotted: str):
    module_path, _, name = dotted.rpartition(".")
    if not module_path:
        raise UsageError(f"--reward_funcs {dotted!r} is not a dotted import path (module.function)")
    sys.path.insert(0, os.getcwd())
    try:
        function = getattr(importlib.import_module(module_path), name)
    except (ImportError, AttributeError) as error:
        raise UsageError(f"--reward_funcs {dotted!r} cannot be imported: {error}") from None
    if not callable(function):
        raise UsageError(f"--reward_funcs {dotted!r} is not callable")
    return function


def main(argv: list[str]) -> int:
    """``argv[0]`` is ``grpo`` or ``rloo``; the rest are flags. A usage mistake exits with status 2 and one line
    naming the flag, before any model is loaded."""
    if not argv or argv[0] not in TRAINERS:
        print(f"usage: r2m {{{','.join(TRAINERS)}}} [flags]  (r2m grpo --help lists them)", file=sys.stderr)
        return 2
    kind = argv[0]
    try:
        script, _, training_args, model_args, r2m_config = parse_arguments(kind, argv[1:])
        check_models(script, model_args)
        train_split, eval_split = training_splits(script, evaluate=training_args.eval_strategy != "no")
        extra = [import_reward_func(name) for name in script.reward_funcs or []]
    except UsageError as error:
        print(f"r2m {kind}: {error}", file=sys.stderr)
        return 2
    init_kwargs = {"dtype": model_args.dtype, "attn_implementation": model_args.attn_implementation,
                   "revision": model_args.model_revision, "trust_remote_code": training_args.trust_remote_code}
    training_args.model_init_kwargs = {**init_kwargs, **(training_args.model_init_kwargs or {})}
    reward_tokenizer = None
    if script.reward_tokenizer_path is not None:
        reward_tokenizer = AutoTokenizer.from_pretrained(script.reward_tokenizer_path)
    reward = R2MReward(script.reward_model_path, reward_tokenizer, config=r2m_config,
                       model_init_kwargs={"trust_remote_code": training_args.trust_remote_code})
    _, trainer_class = TRAINERS[kind]
    trainer = trainer_class(model=model_args.model_name_or_path, reward_funcs=[reward, *extra], callbacks=[reward],
                            args=training_args, train_dataset=train_split, eval_dataset=eval_split,
                            peft_config=get_peft_config(model_args))
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    if trainer.args.should_save:
        reward.r2m.save_pretrained(Path(training_args.output_dir) / "r2m")
    trainer.accelerator.print(f"saved the policy and the R2M state (r2m/) to {training_args.output_dir}")
    return 0
