"""
Train with RPO (Reward Partitioning Optimization), the way `trl dpo` trains with DPO.

```bash
qrpo-trl rpo \
    --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct \
    --dataset_name scored.jsonl \
    --beta 1.0 \
    --normalize_rewards \
    --learning_rate 1e-6 \
    --output_dir Qwen2.5-0.5B-RPO
```

The dataset needs `prompt`, `completion` and `reward`, with several completions per prompt (or a paired format, see
the README). Several GPUs: add `--accelerate_config ddp --num_processes 8`.
"""

import argparse


def main(script_args, training_args, model_args, dataset_args):
    from qrpo_trl import RPOTrainer
    from qrpo_trl.scripts.utils import train

    train(RPOTrainer, script_args, training_args, model_args, dataset_args)


def make_parser(subparsers: argparse._SubParsersAction | None = None, prog: str | None = None):
    from qrpo_trl import RPOConfig
    from qrpo_trl.scripts.utils import make_training_parser

    return make_training_parser("rpo", RPOConfig, "Train with RPO", subparsers, prog)


if __name__ == "__main__":
    parser = make_parser()
    script_args, training_args, model_args, dataset_args = parser.parse_args_and_config(fail_with_unknown_args=False)
    main(script_args, training_args, model_args, dataset_args)
