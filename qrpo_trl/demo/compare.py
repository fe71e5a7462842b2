"""
Comparison mode: the same scored completions of the reference model, the same LoRA, optimiser, steps, completions
per step and KL coefficient `beta`, for QRPO (identity and log transforms), RPO, TRL's DPOTrainer and TRL's
KTOTrainer; evaluated like the demo.

- QRPO: every completion, its quantile among the other completions of its prompt.
- RPO: every completion and its reward; `V(x)` by the Monte Carlo estimate, as the completions are samples of the
  reference model.
- DPO: one pair per prompt, its best completion (chosen) against its worst (rejected); half as many pairs per step, so
  that a step processes as many completions.
- KTO: every completion whose reward is above its prompt's median (desirable) or below it (undesirable); those at the
  median are left out.
"""

import json
import math
import os
import re
import time

import numpy as np
from datasets import Dataset
from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer

from .. import RPOConfig, RPOTrainer, data_utils
from . import evaluation, plots
from .config import DemoConfig
from .pipeline import StageTimer, evaluate_policy, load_model, lora_config, prepare, train_qrpo, training_arguments


def prompt_groups(train_data: Dataset) -> list[list[int]]:
    """Row indices of each prompt's completions, grouped as the trainers group them (RPO's `V(x)`)."""
    labels = data_utils.prompt_groups(train_data)
    return [np.flatnonzero(labels == label).tolist() for label in range(labels.max() + 1)]


def best_vs_worst_pairs(train_data: Dataset) -> Dataset:
    """DPO's data: per prompt, its best completion as `chosen` and its worst as `rejected` (prompts without spread are
    left out)."""
    rewards = np.asarray(train_data["reward"])
    rows = []
    for indices in prompt_groups(train_data):
        best, worst = indices[int(np.argmax(rewards[indices]))], indices[int(np.argmin(rewards[indices]))]
        if rewards[best] > rewards[worst]:
            row = train_data[best]
            rejected = train_data[worst]["completion"]
            rows.append({"prompt": row["prompt"], "chosen": row["completion"], "rejected": rejected})
    return Dataset.from_list(rows)


def above_below_median(train_data: Dataset) -> Dataset:
    """KTO's data: completions above their prompt's median reward (desirable) or below it (undesirable)."""
    rewards = np.asarray(train_data["reward"])
    rows = []
    for indices in prompt_groups(train_data):
        median = np.median(rewards[indices])
        for index in indices:
            if rewards[index] != median:
                row = train_data[index]
                desirable = bool(rewards[index] > median)
                rows.append({"prompt": row["prompt"], "completion": row["completion"], "label": desirable})
    return Dataset.from_list(rows)


def run_comparison(config: DemoConfig) -> dict:
    """Trains and evaluates every method; writes `comparison.json` and `reward_vs_kl.png` to `config.output_dir`."""
    start = time.perf_counter()
    timer = StageTimer()
    setup = prepare(config, timer)
    path, tokenizer, train_data = setup.path, setup.tokenizer, setup.train_data

    # The budget: QRPO's number of steps over all the completions, at `per_device_train_batch_size` completions a step
    batch_size = config.per_device_train_batch_size
    max_steps = math.ceil(len(train_data) / batch_size * config.num_train_epochs)

    def output_dir(name):
        return os.path.join(config.output_dir, name)

    def arguments(name):
        return {**training_arguments(config, output_dir(name)), "max_steps": max_steps}

    def train_trl(trainer_class, args, dataset):
        model, _ = load_model(path)  # a fresh copy of the reference model for each method
        trainer = trainer_class(
            model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
            peft_config=lora_config(config, model.config.num_hidden_layers),
        )
        trainer.train()
        return trainer

    def train_qrpo_with(name, **overrides):
        model, _ = load_model(path)
        return train_qrpo(model, tokenizer, train_data, config, output_dir(name), max_steps=max_steps, **overrides)

    methods = {
        "QRPO (identity)": lambda: train_qrpo_with("qrpo_identity", transform="identity"),
        "QRPO (log)": lambda: train_qrpo_with("qrpo_log", transform="log"),
        "RPO": lambda: train_trl(
            RPOTrainer,
            RPOConfig(**arguments("rpo"), beta=config.beta, value_estimator="monte_carlo"),
            train_data.remove_columns("ref_rewards"),
        ),
        "DPO (best vs worst)": lambda: train_trl(
            DPOTrainer,
            DPOConfig(
                **{**arguments("dpo"), "per_device_train_batch_size": max(1, batch_size // 2)}, beta=config.beta
            ),
            best_vs_worst_pairs(train_data),
        ),
        "KTO (vs median)": lambda: train_trl(
            KTOTrainer, KTOConfig(**arguments("kto"), beta=config.beta), above_below_median(train_data)
        ),
    }
    results, logs = {}, {}
    for name, train in methods.items():
        with timer(f"{name}: training, {max_steps} steps"):
            trainer = train()
        results[name] = evaluate_policy(
            trainer.model, tokenizer, setup.heldout, setup.reference, config, timer, _slug(name)
        )
        results[name]["train_seconds"] = timer.seconds[f"{name}: training, {max_steps} steps"]
        logs[name] = trainer.state.log_history

    table = evaluation.format_table(setup.reference, results)
    output = {
        "model": path,
        "config": vars(config),
        "max_steps": max_steps,
        "reference": setup.reference,
        "methods": results,
        "training_logs": logs,
        "stage_seconds": timer.seconds,
        "total_seconds": time.perf_counter() - start,
    }
    with open(os.path.join(config.output_dir, "comparison.json"), "w") as file:
        json.dump(output, file, indent=2)
    plots.reward_vs_kl(results, os.path.join(config.output_dir, "reward_vs_kl.png"))
    print("\n" + table)
    print(f"\nTotal: {output['total_seconds']:.0f} s. Results and plot in {config.output_dir}/")
    return output


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
