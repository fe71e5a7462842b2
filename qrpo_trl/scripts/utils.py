"""What the training scripts share: their parser, dataset loading and the training run itself."""

import argparse
import importlib
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from trl import ScriptArguments


# Builders of `datasets.load_dataset` for local data files, by extension
DATA_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}


@dataclass
class RewardScriptArguments(ScriptArguments):
    """
    TRL's script arguments, plus the reward functions of the reference stage.

    Args:
        reward_funcs (`list[str]`, *optional*):
            Reward functions: each a reward-model path (a local directory, or a Hub id `org/name` when online) or the
            dotted import path of a reward function (`my_module.my_reward`), resolved from the working directory. For
            training, they complete a dataset that lacks rewards (or QRPO's `ref_rewards`) with the reference stage.
    """

    reward_funcs: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Reward functions: reward-model paths (a local directory, or a Hub id 'org/name' when online) or "
            "dotted import paths of reward functions ('my_module.my_reward')."
        },
    )

    def resolved_reward_funcs(self) -> list:
        return [resolve_reward_func(name) for name in self.reward_funcs]


def resolve_reward_func(name: str):
    """A reward-model path stays a string (loaded by the stage); a dotted import path becomes the function it names."""
    if "/" in name or os.path.isdir(name):
        return name
    module_name, _, attribute = name.rpartition(".")
    sys.path.insert(0, os.getcwd())
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError, ValueError) as error:
        raise ValueError(
            f"Reward function {name!r} is neither a reward-model directory nor an importable `module.function`: {error}"
        ) from error
    finally:
        sys.path.remove(os.getcwd())


def make_training_parser(
    command: str, config_class, help_text: str, subparsers: argparse._SubParsersAction | None = None, prog=None
):
    """The parser of a training script, over the same dataclasses as `trl dpo` with the trainer's config."""
    from trl import DatasetMixtureConfig, ModelConfig, TrlParser

    dataclass_types = (RewardScriptArguments, config_class, ModelConfig, DatasetMixtureConfig)
    if subparsers is not None:
        return subparsers.add_parser(command, help=help_text, dataclass_types=dataclass_types)
    return TrlParser(dataclass_types, prog=prog)


def _local_paths(dataclasses) -> list[str]:
    """The dataset paths of the parsed arguments that name local files or directories (not Hub ids)."""
    from trl import DatasetMixtureConfig

    candidates = []
    for arguments in dataclasses:
        if isinstance(arguments, ScriptArguments) and arguments.dataset_name:
            candidates.append(arguments.dataset_name)
        elif isinstance(arguments, DatasetMixtureConfig):
            for dataset in arguments.datasets:
                data_files = dataset.data_files
                if isinstance(data_files, dict):
                    data_files = list(data_files.values())
                candidates += [dataset.path, *([data_files] if isinstance(data_files, str) else data_files or [])]
    return [
        path
        for path in candidates
        if isinstance(path, str)
        and not any(char in path for char in "*?[")  # globs are for `load_dataset` to expand
        and (Path(path).suffix.lower() in DATA_FILE_BUILDERS or path.startswith(("/", "./", "../", "~")))
    ]


def check_local_datasets(dataclasses) -> None:
    """Raise an error naming the first local dataset path of the parsed arguments that does not exist, or is empty."""
    for path in _local_paths(dataclasses):
        if not os.path.exists(os.path.expanduser(path)):
            raise FileNotFoundError(f"dataset file not found: {path}")
        if os.path.isfile(os.path.expanduser(path)) and os.path.getsize(os.path.expanduser(path)) == 0:
            raise ValueError(f"dataset file {path} is empty: it has no rows.")


def load_datasets(script_args, dataset_args):
    """
    The dataset splits named by the arguments, as a `DatasetDict`: a mixture (`datasets`, TRL's `get_dataset`), or
    `dataset_name`: a local data file (json, jsonl, parquet, csv, arrow; globs allowed), a directory written by
    `save_to_disk`, or anything `load_dataset` takes (a local directory of data files, a Hub id).
    """
    from datasets import DatasetDict, load_dataset, load_from_disk
    from trl import get_dataset

    if dataset_args.datasets:
        return get_dataset(dataset_args)
    name = script_args.dataset_name
    if not name:
        raise ValueError("No dataset: set `dataset_name` (a data file, a directory or a Hub id) or `datasets`.")
    builder = DATA_FILE_BUILDERS.get(Path(name).suffix.lower())
    if builder is not None:
        return load_dataset(builder, data_files=os.path.expanduser(name))
    if any(os.path.isfile(os.path.join(name, f)) for f in ("state.json", "dataset_dict.json")):
        dataset = load_from_disk(name)
        return dataset if isinstance(dataset, DatasetDict) else DatasetDict({script_args.dataset_train_split: dataset})
    return load_dataset(name, name=script_args.dataset_config, streaming=script_args.dataset_streaming)


def build_trainer(trainer_class, script_args, training_args, model_args, dataset_args):
    """The trainer of a training script, built as `trl dpo` builds its DPOTrainer."""
    from trl import get_peft_config, get_quantization_config

    if not model_args.model_name_or_path:
        raise ValueError("No model: set `model_name_or_path` (a Hub id or a local directory).")
    model_init_kwargs = dict(
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
        attn_implementation=model_args.attn_implementation,
        dtype=model_args.dtype,
    )
    model_init_kwargs.update(training_args.model_init_kwargs or {})
    training_args.model_init_kwargs = model_init_kwargs

    # Every process loads the dataset; the first one of each machine prepares its cache for the others
    with training_args.main_process_first(desc="loading the dataset"):
        dataset = load_datasets(script_args, dataset_args)
    splits = [script_args.dataset_train_split]
    if training_args.eval_strategy != "no":
        splits.append(script_args.dataset_test_split)
    missing = [split for split in splits if split not in dataset]
    if missing:
        raise ValueError(
            f"The dataset has no split {missing[0]!r} (its splits: {list(dataset)}); set `dataset_train_split` / "
            "`dataset_test_split`, or `eval_strategy: no`."
        )
    return trainer_class(
        model=model_args.model_name_or_path,
        args=training_args,
        train_dataset=dataset[script_args.dataset_train_split],
        eval_dataset=dataset[script_args.dataset_test_split] if training_args.eval_strategy != "no" else None,
        quantization_config=get_quantization_config(model_args),
        peft_config=get_peft_config(model_args),
        reward_funcs=script_args.resolved_reward_funcs() or None,
    )


def train(trainer_class, script_args, training_args, model_args, dataset_args) -> None:
    """Build the trainer, train (resuming if asked), save the model (and push it if asked), as `trl dpo` does."""
    trainer = build_trainer(trainer_class, script_args, training_args, model_args, dataset_args)
    if script_args.ignore_bias_buffers:
        import torch

        # torch distributed hack (as in `trl dpo`)
        trainer.model._ddp_params_and_buffers_to_ignore = [
            name for name, buffer in trainer.model.named_buffers() if buffer.dtype == torch.bool
        ]
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(f"Model saved to {training_args.output_dir}.")
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
        trainer.accelerator.print(f"Model pushed to the Hub in https://huggingface.co/{trainer.hub_model_id}.")
    # Finish the trackers and destroy the process group
    trainer.end()
