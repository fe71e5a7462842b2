"""
The demo, end to end through the package's public API: sample completions from the reference model and score them
(`precompute_rewards`), align with `QRPOTrainer` and LoRA, and evaluate on held-out prompts.
"""

import json
import math
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .. import QRPOConfig, QRPOTrainer, ReferenceConfig, data_utils, precompute_rewards
from ..tokenization import with_pad_token
from . import evaluation, plots
from .config import DemoConfig
from .models import default_cache_dir, smollm2_checkpoint, train_tiny_model
from .task import build_task, constraint_reward


class StageTimer:
    """Wall time of each stage, printed as it ends."""

    def __init__(self):
        self.seconds = {}

    @contextmanager
    def __call__(self, stage: str):
        print(f"\n=== {stage}", flush=True)
        start = time.perf_counter()
        yield
        self.seconds[stage] = time.perf_counter() - start
        print(f"=== {stage}: {self.seconds[stage]:.0f} s", flush=True)


def base_checkpoint(config: DemoConfig, train_prompts: Dataset, timer: StageTimer) -> str:
    """Path of the model to align: the given one, SmolLM2 (converted once), or (quick) the tiny model after its SFT."""
    if config.quick:
        with timer("SFT of the tiny model from scratch"):
            return train_tiny_model(train_prompts, os.path.join(config.output_dir, "tiny-sft"), config)
    if config.model_name_or_path is not None:
        return config.model_name_or_path
    with timer("SmolLM2-135M-Instruct checkpoint"):
        return smollm2_checkpoint(config.cache_dir)


def mixed_precision(config: DemoConfig):
    """bfloat16 autocast for sampling and scoring when `config.bf16`, as training gets from `bf16=True`."""
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.bf16)


def load_model(path: str):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = with_pad_token(AutoTokenizer.from_pretrained(path))
    return model, tokenizer


def reference_stage(model, tokenizer, train_prompts: Dataset, config: DemoConfig) -> Dataset:
    """`num_generations` completions per training prompt sampled from `model` (T=1), with their rewards and each
    other's as `ref_rewards` (cached)."""
    args = ReferenceConfig(
        num_generations=config.num_generations,
        max_completion_length=config.max_completion_length,
        generation_batch_size=config.generation_batch_size,
        seed=config.seed,
        reference_cache_dir=os.path.join(config.cache_dir or default_cache_dir(), "reference"),
    )
    return precompute_rewards(train_prompts, model, constraint_reward, args, processing_class=tokenizer)


def prompt_groups(train_data: Dataset) -> list[list[int]]:
    """Row indices of each prompt's completions, grouped as the trainers group them (RPO's `V(x)`)."""
    labels = data_utils.prompt_groups(train_data)
    return [np.flatnonzero(labels == label).tolist() for label in range(labels.max() + 1)]


def best_and_worst(train_data: Dataset) -> list[tuple[int, int]]:
    """Row indices of each prompt's best and worst completion (prompts without spread are left out)."""
    rewards = np.asarray(train_data["reward"])
    pairs = []
    for indices in prompt_groups(train_data):
        best, worst = indices[int(np.argmax(rewards[indices]))], indices[int(np.argmin(rewards[indices]))]
        if rewards[best] > rewards[worst]:
            pairs.append((best, worst))
    return pairs


def training_rows(train_data: Dataset, rows: str) -> Dataset:
    """
    The rows QRPO and RPO train on: `"all"` the sampled completions, or `"best_worst"` (the paper's recipe, as `qrpo-trl
    offpolicy --mode offpolicy2best`) each prompt's best and worst. Every row keeps `ref_rewards`, the rewards of all
    the prompt's samples: QRPO's quantiles and RPO's `V(x)` are taken over all of them either way.
    """
    if rows == "all":
        return train_data
    return train_data.select([row for pair in best_and_worst(train_data) for row in pair])


def step_budget(config: DemoConfig, train_data: Dataset) -> int:
    """Optimisation steps of every method: `num_train_epochs` passes over all the sampled completions, whatever rows a
    method trains on (on each prompt's best and worst, `num_generations / 2` times as many passes over them)."""
    return math.ceil(len(train_data) / config.per_device_train_batch_size * config.num_train_epochs)


def lora_config(config: DemoConfig, num_layers: int) -> LoraConfig:
    top_layers = None
    if config.lora_top_layers is not None:
        top_layers = list(range(max(0, num_layers - config.lora_top_layers), num_layers))
    return LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=0.0,
        target_modules=config.lora_target_modules,
        layers_to_transform=top_layers,
        task_type="CAUSAL_LM",
    )


def training_arguments(config: DemoConfig, output_dir: str) -> dict:
    """The `TrainingArguments` every method of the demo shares: same budget, CPU, logging at every step."""
    return dict(
        output_dir=output_dir,
        learning_rate=config.learning_rate,
        num_train_epochs=config.num_train_epochs,
        per_device_train_batch_size=config.per_device_train_batch_size,
        lr_scheduler_type="cosine",
        warmup_steps=config.warmup_ratio,
        max_grad_norm=1.0,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=config.bf16,
        seed=config.seed,
        gradient_checkpointing=False,
    )


def train_qrpo(model, tokenizer, train_data: Dataset, config: DemoConfig, output_dir: str, **overrides):
    """QRPO with LoRA on the reference model's own scored samples (or some of them), all of them references."""
    settings = dict(
        beta=config.beta,
        transform=config.transform,
        exclude_self_from_ref=config.exclude_self_from_ref,
        ties=config.ties,
        partition=config.partition,
        normalize_beta_by_length=config.normalize_beta_by_length,
    )
    args = QRPOConfig(**{**training_arguments(config, output_dir), **settings, **overrides})
    trainer = QRPOTrainer(
        model=model,
        args=args,
        train_dataset=train_data,
        processing_class=tokenizer,
        peft_config=lora_config(config, model.config.num_hidden_layers),
    )
    trainer.train()
    return trainer


def evaluate_policy(
    policy, tokenizer, heldout: Dataset, reference: dict, config: DemoConfig, timer: StageTimer, name: str
) -> dict:
    """The policy's held-out samples, scored, against the reference's; the samples are written to `output_dir`."""
    with timer(f"Held-out samples of the {name} policy"), mixed_precision(config):
        samples = evaluation.sample_heldout(
            policy, tokenizer, heldout, config.num_eval_generations, config,
            f"Sampling held-out completions of the {name} policy",
        )
        kl = evaluation.kl_to_reference(policy, samples, tokenizer.pad_token_id)
    samples = samples.add_column("kl", kl["kl"].tolist()).add_column("log_ratio", kl["log_ratio"].tolist())
    samples.to_json(os.path.join(config.output_dir, f"heldout_samples_{name}.jsonl"))
    return evaluation.compare_to_reference(reference, evaluation.summarize(samples, len(heldout)), kl)


@dataclass
class Setup:
    """What every run of the demo starts from: the model to align, its scored samples, the held-out reference."""

    path: str
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    train_data: Dataset
    heldout: Dataset
    reference: dict


def prepare(config: DemoConfig, timer: StageTimer) -> Setup:
    """The task, the model, and the reference stage: training samples and held-out samples of the reference model."""
    os.makedirs(config.output_dir, exist_ok=True)
    train_rows, heldout_rows = build_task(config.num_heldout_topics, config.rules_per_topic)
    train_prompts, heldout = Dataset.from_list(train_rows[: config.max_train_prompts]), Dataset.from_list(heldout_rows)
    path = base_checkpoint(config, train_prompts, timer)
    model, tokenizer = load_model(path)
    with (
        timer(f"Reference stage: {config.num_generations} samples for each of {len(train_prompts)} training prompts"),
        mixed_precision(config),
    ):
        train_data = reference_stage(model, tokenizer, train_prompts, config)
    with timer(f"Held-out samples of the reference model ({len(heldout)} prompts)"), mixed_precision(config):
        reference_samples = evaluation.sample_heldout(
            model, tokenizer, heldout, config.num_eval_generations, config,
            "Sampling held-out completions of the reference model",
        )
    reference_samples.to_json(os.path.join(config.output_dir, "heldout_samples_reference.jsonl"))
    reference = evaluation.summarize(reference_samples, len(heldout))
    return Setup(path, model, tokenizer, train_data, heldout, reference)


def run(config: DemoConfig) -> dict:
    """The demo: writes `results.json`, the plots and the held-out samples to `config.output_dir`; returns them."""
    start = time.perf_counter()
    timer = StageTimer()
    setup = prepare(config, timer)
    train_data = training_rows(setup.train_data, config.train_rows)
    max_steps = step_budget(config, setup.train_data)
    print(f"\nQRPO trains on {len(train_data)} of the {len(setup.train_data)} sampled completions ({config.train_rows}).")
    with timer("QRPO training (LoRA)"):
        trainer = train_qrpo(
            setup.model, setup.tokenizer, train_data, config, os.path.join(config.output_dir, "qrpo"),
            max_steps=max_steps,
        )
    trainer.save_model()
    policy = evaluate_policy(trainer.model, setup.tokenizer, setup.heldout, setup.reference, config, timer, "qrpo")

    results = {
        "model": setup.path,
        "config": vars(config),
        "num_train_prompts": len(setup.train_data) // config.num_generations,
        "num_train_rows": len(train_data),
        "num_heldout_prompts": len(setup.heldout),
        "train_reward_mean": float(np.mean(setup.train_data["reward"])),
        "reference": setup.reference,
        "qrpo": policy,
        "training_log": trainer.state.log_history,
        "stage_seconds": timer.seconds,
        "total_seconds": time.perf_counter() - start,
    }
    with open(os.path.join(config.output_dir, "results.json"), "w") as file:
        json.dump(results, file, indent=2)
    plots.reward_distributions(setup.reference, {"QRPO": policy}, os.path.join(config.output_dir, "rewards.png"))
    plots.training_curves(trainer.state.log_history, os.path.join(config.output_dir, "training.png"))
    print("\n" + evaluation.format_table(setup.reference, {"QRPO": policy}))
    print(f"\nTotal: {results['total_seconds']:.0f} s. Results, plots and samples in {config.output_dir}/")
    return results
