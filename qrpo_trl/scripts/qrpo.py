"""
Train with QRPO (Quantile Reward Policy Optimization), the way `trl dpo` trains with DPO.

```bash
qrpo-trl qrpo --config configs/qrpo_tulu3_8b_ultrafeedback.yaml
```

or with every field on the command line (here one GPU, LoRA):

```bash
qrpo-trl qrpo \
    --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct \
    --dataset_name scored.jsonl \
    --beta 0.01 \
    --learning_rate 1e-5 \
    --use_peft \
    --lora_r 32 \
    --lora_alpha 16 \
    --output_dir Qwen2.5-0.5B-QRPO
```

The dataset needs `prompt`, `completion`, `reward` and `ref_rewards` (or a paired format, see the README); `qrpo-trl
precompute` makes the reference rewards. Several GPUs: add `--accelerate_config zero3 --num_processes 8`, or run
`accelerate launch --config_file configs/accelerate/zero3.yaml -m qrpo_trl.cli qrpo --config ...`.
"""

import argparse


def main(script_args, training_args, model_args, dataset_args):
    from qrpo_trl import QRPOTrainer
    from qrpo_trl.scripts.utils import train

    train(QRPOTrainer, script_args, training_args, model_args, dataset_args)


def make_parser(subparsers: argparse._SubParsersAction | None = None, prog: str | None = None):
    from qrpo_trl import QRPOConfig
    from qrpo_trl.scripts.utils import make_training_parser

    return make_training_parser("qrpo", QRPOConfig, "Train with QRPO", subparsers, prog)


if __name__ == "__main__":
    parser = make_parser()
    script_args, training_args, model_args, dataset_args = parser.parse_args_and_config(fail_with_unknown_args=False)
    main(script_args, training_args, model_args, dataset_args)
