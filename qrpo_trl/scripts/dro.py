"""
Train with DRO (Direct Reward Optimization, Richemond et al. 2024), the way `trl dpo` trains with DPO.

```bash
qrpo-trl dro \
    --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct \
    --dataset_name scored.jsonl \
    --beta 1.0 \
    --normalize_rewards \
    --learning_rate 1e-6 \
    --value_learning_rate 1e-4 \
    --output_dir Qwen2.5-0.5B-DRO
```

The dataset needs `prompt`, `completion` and `reward` (one or several completions per prompt), or a paired format (see
the README). The value head is saved next to the model (`value_model.safetensors`). Several GPUs: add
`--accelerate_config ddp --num_processes 8`.
"""

import argparse


def main(script_args, training_args, model_args, dataset_args):
    from qrpo_trl import DROTrainer
    from qrpo_trl.scripts.utils import train

    train(DROTrainer, script_args, training_args, model_args, dataset_args)


def make_parser(subparsers: argparse._SubParsersAction | None = None, prog: str | None = None):
    from qrpo_trl import DROConfig
    from qrpo_trl.scripts.utils import make_training_parser

    return make_training_parser("dro", DROConfig, "Train with DRO", subparsers, prog)


if __name__ == "__main__":
    parser = make_parser()
    script_args, training_args, model_args, dataset_args = parser.parse_args_and_config(fail_with_unknown_args=False)
    main(script_args, training_args, model_args, dataset_args)
