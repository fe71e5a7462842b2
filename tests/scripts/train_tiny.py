"""Train a QRPO or RPO model on an in-memory dataset and dump what the tests compare across launch modes.

Run as `python train_tiny.py ...` (one process) or under `torchrun`/`accelerate launch` (several). The main process
writes a JSON with the map stage's columns and the logged losses.
"""

import argparse
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from conftest import make_args, pointwise_rows  # noqa: E402
from datasets import Dataset  # noqa: E402
from peft import LoraConfig  # noqa: E402

from qrpo_trl import QRPOConfig, QRPOTrainer, RPOConfig, RPOTrainer  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--method", choices=["qrpo", "rpo"], required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--per_device_train_batch_size", type=int, default=4)
    parser.add_argument("--max_steps", type=int, default=3)
    parser.add_argument("--lora", action="store_true")
    cli = parser.parse_args()

    trainer_class, config_class = {"qrpo": (QRPOTrainer, QRPOConfig), "rpo": (RPOTrainer, RPOConfig)}[cli.method]
    args = make_args(
        config_class,
        os.path.join(os.path.dirname(cli.output), "run"),
        per_device_train_batch_size=cli.per_device_train_batch_size,
        max_steps=cli.max_steps,
        learning_rate=0.01,
        precompute_ref_batch_size=3,
    )
    peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]) if cli.lora else None
    trainer = trainer_class(
        model=cli.model,
        args=args,
        train_dataset=Dataset.from_dict(pointwise_rows()),  # in memory: no cache file the processes could share
        peft_config=peft_config,
    )
    trainer.train()
    if trainer.accelerator.is_main_process:
        prepared = trainer.train_dataset
        result = {
            "num_processes": trainer.accelerator.num_processes,
            "ref_logps": list(prepared["ref_logps"]),
            "target": list(prepared["target"]),
            "losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
        }
        with open(cli.output, "w") as f:
            json.dump(result, f)


if __name__ == "__main__":
    main()
