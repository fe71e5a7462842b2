"""
Comparison mode: the same scored completions of the reference model, the same LoRA, optimiser, steps, completions
per step and KL coefficient `beta`, for QRPO (identity and log transforms), RPO, DRO, TRL's DPOTrainer and TRL's
KTOTrainer; evaluated like the demo.

- QRPO (the paper's recipe): each prompt's best and worst completion (DPO's rows), their quantiles among all the other
  completions of the prompt. `qrpo_*_all_rows`: every completion, its quantile among the others.
- RPO (the paper's recipe): each prompt's best and worst completion and its reward; `V(x)` by the Monte Carlo estimate
  over all the prompt's completions (samples of the reference model, its `ref_rewards`). `rpo_all_rows`: every
  completion.
- DRO: every completion and its reward (single-trajectory data, as in the RPO paper); `V(x)` learned during training
  by the default value head (an MLP on the policy's mean-pooled prompt states) at the same learning rate, as the RPO
  authors' DRO.
- DPO: one pair per prompt, its best completion (chosen) against its worst (rejected); half as many pairs per step, so
  that a step processes as many completions.
- KTO: every completion whose reward is above its prompt's median (desirable) or below it (undesirable); those at the
  median are left out.
"""

import json
import os
import time

import numpy as np
from datasets import Dataset
from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer

from .. import DROConfig, DROTrainer, RPOConfig, RPOTrainer
from . import evaluation, plots
from .config import METHODS, DemoConfig
from .pipeline import (
    Setup, StageTimer, best_and_worst, evaluate_policy, load_model, lora_config, prepare, prompt_groups, step_budget,
    train_qrpo, training_arguments, training_rows,
)


def best_vs_worst_pairs(train_data: Dataset) -> Dataset:
    """DPO's data: per prompt, its best completion as `chosen` and its worst as `rejected`."""
    rows = []
    for best, worst in best_and_worst(train_data):
        row = train_data[best]
        rows.append({"prompt": row["prompt"], "chosen": row["completion"], "rejected": train_data[worst]["completion"]})
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


class MethodTrainer:
    """Trains any method of the comparison at any `beta` from the same setup: data, LoRA, optimiser and budget."""

    def __init__(self, config: DemoConfig, setup: Setup):
        self.config, self.setup = config, setup
        self.max_steps = step_budget(config, setup.train_data)
        best_worst = training_rows(setup.train_data, "best_worst")
        self.datasets = {
            "qrpo_identity": best_worst,
            "qrpo_log": best_worst,
            "rpo": best_worst,
            "qrpo_identity_all_rows": setup.train_data,
            "qrpo_log_all_rows": setup.train_data,
            "rpo_all_rows": setup.train_data,
            "dro": setup.train_data.remove_columns("ref_rewards"),
            "dpo": best_vs_worst_pairs(setup.train_data),
            "kto": above_below_median(setup.train_data),
        }

    def train(self, method: str, beta: float, output_dir: str):
        """A fresh copy of the reference model trained by `method` (a key of `config.METHODS`); returns its trainer."""
        config = self.config
        model, tokenizer = load_model(self.setup.path)
        if method.startswith("qrpo_"):
            return train_qrpo(
                model, tokenizer, self.datasets[method], config, output_dir, max_steps=self.max_steps, beta=beta,
                transform="identity" if method.startswith("qrpo_identity") else "log",
            )
        arguments = {**training_arguments(config, output_dir), "max_steps": self.max_steps, "beta": beta}
        if method.startswith("rpo"):
            # The completions are samples of the reference model; V(x) over each row's `ref_rewards`: all of them
            args = RPOConfig(**arguments, value_estimator="monte_carlo")
            trainer_class = RPOTrainer
        elif method == "dro":
            args = DROConfig(**arguments)
            trainer_class = DROTrainer
        elif method == "dpo":
            # Half as many pairs per step, so that a step processes as many completions
            args = DPOConfig(
                **arguments | {"per_device_train_batch_size": max(1, config.per_device_train_batch_size // 2)}
            )
            trainer_class = DPOTrainer
        else:
            args = KTOConfig(**arguments)
            trainer_class = KTOTrainer
        trainer = trainer_class(
            model=model, args=args, train_dataset=self.datasets[method], processing_class=tokenizer,
            peft_config=lora_config(config, model.config.num_hidden_layers),
        )
        trainer.train()
        return trainer

    def train_and_evaluate(self, method: str, beta: float, name: str, timer: StageTimer) -> tuple[dict, list[dict]]:
        """Held-out figures (as `evaluate_policy`, with the training time) and training log of `method` at `beta`."""
        stage = f"{name}: training, {self.max_steps} steps"
        with timer(stage):
            trainer = self.train(method, beta, os.path.join(self.config.output_dir, name))
        figures = evaluate_policy(
            trainer.model, self.setup.tokenizer, self.setup.heldout, self.setup.reference, self.config, timer, name
        )
        return {**figures, "train_seconds": timer.seconds[stage]}, trainer.state.log_history


def run_comparison(config: DemoConfig) -> dict:
    """Trains and evaluates every method at `config.beta`; writes `comparison.json` and `reward_vs_kl.png`."""
    start = time.perf_counter()
    timer = StageTimer()
    setup = prepare(config, timer)
    methods = MethodTrainer(config, setup)
    results, logs = {}, {}
    for method in config.methods:
        name = METHODS[method]
        results[name], logs[name] = methods.train_and_evaluate(method, config.beta, method, timer)

    table = evaluation.format_table(setup.reference, results)
    output = {
        "model": setup.path,
        "config": vars(config),
        "max_steps": methods.max_steps,
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
