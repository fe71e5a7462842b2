"""
The reference stage as a script: complete a dataset with rewards and save it, ready for `QRPOTrainer`/`RPOTrainer`.

It samples `num_generations` completions per prompt from the reference model and scores them (`ref_rewards`, for
QRPO), scores the completions that have no reward, and turns a prompt-only dataset into sampled, scored completions.
Every split of the dataset is processed; the result is saved with `DatasetDict.save_to_disk(output_dir)`.

```bash
qrpo-trl precompute --config precompute.yaml
qrpo-trl precompute --config precompute.yaml --accelerate_config ddp --num_processes 8  # each process samples its share
```

with, for example:

```yaml
model_name_or_path: ./Qwen2.5-0.5B-Instruct
datasets:
  - path: json
    data_files: scored.jsonl
reward_funcs:
  - ./my-reward-model               # a reward model: a local path (or a Hub id, online)
  - my_rewards.length_penalty       # a reward function: a dotted import path, resolved from the working directory
reward_weights: [1.0, 0.1]
num_generations: 20
max_completion_length: 512
output_dir: scored-with-references
```
"""

import argparse
from dataclasses import dataclass, field

from qrpo_trl.scripts.utils import RewardScriptArguments


@dataclass
class PrecomputeScriptArguments(RewardScriptArguments):
    """
    Script arguments of the reference stage: the reward functions (see `RewardScriptArguments`), and

    Args:
        output_dir (`str`):
            Directory where the completed dataset (every split) is saved with `DatasetDict.save_to_disk`.
        add_ref_rewards (`bool`, *optional*, defaults to `True`):
            Whether to sample reference completions and add `ref_rewards` (QRPO). `False` only scores the completions
            that lack a reward, or samples the completions of a prompt-only dataset (RPO).
    """

    output_dir: str | None = field(
        default=None,
        metadata={"help": "Directory where the completed dataset (every split) is saved with `save_to_disk`."},
    )
    add_ref_rewards: bool = field(
        default=True,
        metadata={"help": "Sample reference completions and add `ref_rewards` (QRPO). False only adds rewards (RPO)."},
    )


def main(script_args, reference_args, model_args, dataset_args):
    from accelerate import PartialState
    from datasets import DatasetDict
    from transformers import AutoTokenizer
    from trl.trainer.utils import create_model_from_path

    from qrpo_trl.reference_stage import ReferenceStage, RewardFunctions
    from qrpo_trl.scripts.utils import load_datasets
    from qrpo_trl.tokenization import with_pad_token

    if not script_args.reward_funcs:
        raise ValueError("Give at least one reward function or reward model in `reward_funcs`.")
    if script_args.output_dir is None:
        raise ValueError("Give the `output_dir` where the completed dataset is saved.")

    state = PartialState()
    # Every process loads the dataset; the first one of each machine prepares its cache for the others
    with state.main_process_first():
        dataset = load_datasets(script_args, dataset_args)
    model = create_model_from_path(
        model_args.model_name_or_path,
        revision=model_args.model_revision,
        dtype=model_args.dtype,
        attn_implementation=model_args.attn_implementation,
    ).to(state.device)
    processing_class = with_pad_token(
        AutoTokenizer.from_pretrained(model_args.model_name_or_path, revision=model_args.model_revision)
    )
    reward_functions = RewardFunctions(
        script_args.resolved_reward_funcs(),
        reward_weights=reference_args.reward_weights,
        trust_remote_code=reference_args.reward_model_trust_remote_code,
    )
    stage = ReferenceStage(model, processing_class, reward_functions, reference_args)
    completed = DatasetDict(
        {split: stage.run(data, script_args.add_ref_rewards, split) for split, data in dataset.items()}
    )
    if state.is_main_process:
        completed.save_to_disk(script_args.output_dir)
    state.wait_for_everyone()
    state.print(f"Saved the completed dataset to {script_args.output_dir}: {completed}")


def make_parser(subparsers: argparse._SubParsersAction | None = None, prog: str | None = None):
    from trl import DatasetMixtureConfig, ModelConfig, TrlParser

    from qrpo_trl.reference_config import ReferenceConfig

    dataclass_types = (PrecomputeScriptArguments, ReferenceConfig, ModelConfig, DatasetMixtureConfig)
    if subparsers is not None:
        parser = subparsers.add_parser(
            "precompute", help="Sample reference completions and compute rewards", dataclass_types=dataclass_types
        )
    else:
        parser = TrlParser(dataclass_types, prog=prog)
    return parser


if __name__ == "__main__":
    parser = make_parser()
    script_args, reference_args, model_args, dataset_args = parser.parse_args_and_config(fail_with_unknown_args=False)
    main(script_args, reference_args, model_args, dataset_args)
