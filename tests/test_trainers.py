"""
Training, TRL style (the loss is logged and finite and the right parameters change), on a tiny Llama, and on a tiny T5
where the architecture matters.
"""

import math

import numpy as np
import pytest
import torch
import trl
from conftest import assert_loss_logged, assert_trained, logged, make_args, pointwise_rows, sequence_logps, snapshot
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM

from qrpo_trl import QRPOConfig, QRPOTrainer, RPOConfig, RPOTrainer
from qrpo_trl.targets import beta_log_partition


METHODS = pytest.mark.parametrize(
    "trainer_class, config_class", [(QRPOTrainer, QRPOConfig), (RPOTrainer, RPOConfig)], ids=["qrpo", "rpo"]
)
LORA = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])


@pytest.fixture
def dataset():
    return Dataset.from_dict(pointwise_rows())


def lora(architecture):
    return LoraConfig(r=4, lora_alpha=8, target_modules=architecture.lora_modules)


@METHODS
@pytest.mark.parametrize("peft", [False, True], ids=["full", "lora"])
def test_train(architecture, dataset, tmp_path, trainer_class, config_class, peft):
    # The model by path, and for LoRA as an instance (fresh from its config: in train mode, with dropout)
    trainer = trainer_class(
        model=architecture.build(architecture.tokenizer) if peft else architecture.path,
        args=make_args(config_class, tmp_path),
        train_dataset=dataset,
        eval_dataset=dataset,
        processing_class=architecture.tokenizer,
        peft_config=lora(architecture) if peft else None,
    )
    assert isinstance(trainer, trl.DPOTrainer)
    assert trainer.ref_model is None  # reference log-probs are precomputed: no reference model during training
    before = snapshot(trainer.model)
    trainer.train()
    assert_loss_logged(trainer)
    metric = "quantile" if trainer_class is QRPOTrainer else "value"
    assert all(math.isfinite(value) for value in logged(trainer, metric))
    assert_trained(trainer.model, before)
    assert math.isfinite(trainer.evaluate()["eval_loss"])


@METHODS
def test_explicit_ref_model_is_unchanged(tiny_llama_path, dataset, tmp_path, trainer_class, config_class):
    ref_model = AutoModelForCausalLM.from_pretrained(tiny_llama_path)
    before = snapshot(ref_model)
    args = make_args(config_class, tmp_path, precompute_ref_log_probs=False)
    trainer = trainer_class(model=tiny_llama_path, ref_model=ref_model, args=args, train_dataset=dataset)
    trainer.train()
    assert_loss_logged(trainer)
    for name, param in ref_model.named_parameters():
        assert torch.equal(param, before[name]), f"reference parameter {name} changed"


@METHODS
@pytest.mark.parametrize(
    "architecture, reference",
    [("llama", "checkpoint"), ("llama", "lora"), ("t5", "checkpoint"), ("t5", "ref_model"), ("t5", "lora")],
    indirect=["architecture"],
)
def test_precompute_on_and_off_give_the_same_loss(architecture, dataset, tmp_path, trainer_class, config_class, reference):
    """
    Off, the reference is reloaded from the checkpoint path, given (built in train mode, with dropout: T5 keeps its
    attention dropout in a float), or LoRA's.
    """
    first_losses = []
    for precompute in (True, False):
        args = make_args(config_class, tmp_path / str(precompute), max_steps=2, precompute_ref_log_probs=precompute)
        kwargs = {"ref_model": architecture.build(architecture.tokenizer)} if reference == "ref_model" else {}
        peft_config = lora(architecture) if reference == "lora" else None
        trainer = trainer_class(model=architecture.path, args=args, train_dataset=dataset, peft_config=peft_config, **kwargs)
        assert ("ref_logps" in trainer.train_dataset.column_names) == precompute
        trainer.train()
        first_losses.append(logged(trainer)[:2])
    np.testing.assert_allclose(first_losses[0], first_losses[1], rtol=1e-5)


@pytest.mark.parametrize("normalization", ["sum", "mean"])
@pytest.mark.parametrize("peft", [False, True], ids=["full", "lora"])
def test_reference_logps_match_an_independent_forward(architecture, dataset, tmp_path, normalization, peft):
    # Batches of 3 mix prompts and completions of different lengths: padding (T5: on both sides)
    args = make_args(QRPOConfig, tmp_path, logps_normalization=normalization, precompute_ref_batch_size=3)
    peft_config = lora(architecture) if peft else None
    trainer = QRPOTrainer(model=architecture.path, args=args, train_dataset=dataset, peft_config=peft_config)
    reference = architecture.model_class.from_pretrained(architecture.path)
    prepared = trainer.train_dataset
    expected = [
        architecture.sequence_logps(reference, row["prompt_ids"], row["completion_ids"], normalization)
        for row in prepared
    ]
    np.testing.assert_allclose(prepared["ref_logps"], expected, rtol=1e-5)


def test_qrpo_first_loss_equals_the_official_formula(tiny_llama_path, dataset, tmp_path):
    """At step 1 the policy is the reference, so the loss is mean((q - beta log Z)^2) of the official README."""
    beta = 0.3
    args = make_args(QRPOConfig, tmp_path, beta=beta, partition="approx", per_device_train_batch_size=len(dataset), max_steps=1)
    trainer = QRPOTrainer(model=tiny_llama_path, args=args, train_dataset=dataset)
    trainer.train()
    rewards = np.array(dataset["reward"])
    quantiles = (np.array(dataset["ref_rewards"]) <= rewards[:, None]).mean(axis=1)
    log_z = math.log(beta) + 1 / beta
    assert logged(trainer)[0] == pytest.approx(np.mean((quantiles - beta * log_z) ** 2), rel=1e-5)
    assert logged(trainer, "quantile")[0] == pytest.approx(quantiles.mean(), rel=1e-6)


def test_rpo_first_loss_equals_the_paper_formula(tiny_llama_path, dataset, tmp_path):
    tau = 0.7
    args = make_args(RPOConfig, tmp_path, beta=tau, per_device_train_batch_size=len(dataset), max_steps=1)
    trainer = RPOTrainer(model=tiny_llama_path, args=args, train_dataset=dataset)
    trainer.train()
    reference = AutoModelForCausalLM.from_pretrained(tiny_llama_path)
    prepared = trainer.train_dataset
    ref_logps = np.array([sequence_logps(reference, row["prompt_ids"], row["completion_ids"]) for row in prepared])
    rewards, prompts = np.array(prepared["reward"]), np.array(prepared["prompt"])
    values = np.array([tau * np.log(np.sum(np.exp(ref_logps[prompts == p] + rewards[prompts == p] / tau))) for p in prompts])
    np.testing.assert_allclose(prepared["value"], values, rtol=1e-5)
    assert logged(trainer)[0] == pytest.approx(np.mean(0.5 * ((rewards - values) / tau) ** 2), rel=1e-5)


@pytest.mark.parametrize("normalize_rewards", [False, True])
def test_rpo_monte_carlo_value_from_reference_rewards(tiny_llama_path, tmp_path, normalize_rewards):
    # Two rows of a prompt trained on, V(x) over the prompt's 5 reference rewards (z-scored as the rewards are)
    rows = pointwise_rows(completions_per_prompt=2)
    tau = 0.5
    args = make_args(RPOConfig, tmp_path, beta=tau, value_estimator="monte_carlo", normalize_rewards=normalize_rewards)
    prepared = RPOTrainer(model=tiny_llama_path, args=args, train_dataset=Dataset.from_dict(rows)).train_dataset
    rewards, references = np.array(rows["reward"]), np.array(rows["ref_rewards"])
    if normalize_rewards:
        rewards, references = (rewards - rewards.mean()) / rewards.std(), (references - rewards.mean()) / rewards.std()
    values = tau * np.log(np.mean(np.exp(references / tau), axis=1))
    np.testing.assert_allclose(prepared["value"], values, rtol=1e-12)
    np.testing.assert_allclose(prepared["target"], rewards - values, rtol=1e-12)


@METHODS
@pytest.mark.parametrize(
    "reward_columns",
    [("chosen_reward", "rejected_reward"), ("score_chosen", "score_rejected"), ("chosen_rewards", "rejected_rewards")],
)
def test_paired_dataset_is_unpaired(tiny_llama_path, tmp_path, trainer_class, config_class, reward_columns):
    paired = Dataset.from_dict(
        {
            "prompt": ["what is the sky", "hello"],
            "chosen": [" blue", " hi"],
            "rejected": [" green", " no"],
            reward_columns[0]: [2.0, 1.5],
            reward_columns[1]: [-1.0, 0.5],
            "ref_rewards": [[0.0, 1.0, 3.0], [1.0, 1.0, 2.0]],
        }
    )
    trainer = trainer_class(model=tiny_llama_path, args=make_args(config_class, tmp_path), train_dataset=paired)
    prepared = trainer.train_dataset
    assert prepared["completion"] == [" blue", " green", " hi", " no"]
    assert prepared["reward"] == [2.0, -1.0, 1.5, 0.5]
    assert prepared["prompt"] == ["what is the sky", "what is the sky", "hello", "hello"]
    if trainer_class is QRPOTrainer:
        np.testing.assert_allclose(prepared["quantile"], [2 / 3, 0, 2 / 3, 0])
    trainer.train()
    assert_loss_logged(trainer)


@METHODS
def test_conversational_datasets(tiny_llama_path, tokenizer, tmp_path, trainer_class, config_class):
    user = lambda text: [{"role": "user", "content": text}]  # noqa: E731
    assistant = lambda text: [{"role": "assistant", "content": text}]  # noqa: E731
    pointwise = Dataset.from_dict(
        {
            "prompt": [user("what is the sky"), user("what is the sky"), user("hello")],
            "completion": [assistant("blue"), assistant("red"), assistant("hi")],
            "reward": [1.0, 0.0, 0.5],
            "ref_rewards": [[0.0, 0.5, 2.0]] * 3,
        }
    )
    trainer = trainer_class(model=tiny_llama_path, args=make_args(config_class, tmp_path), train_dataset=pointwise)
    row = trainer.train_dataset[0]
    expected_prompt = tokenizer.apply_chat_template(user("what is the sky"), add_generation_prompt=True, return_dict=True)
    assert row["prompt_ids"] == expected_prompt["input_ids"]
    assert tokenizer.convert_ids_to_tokens(row["completion_ids"]) == ["blue", "</s>"]
    trainer.train()
    assert_loss_logged(trainer)

    # Paired conversations with the prompt left implicit in `chosen` and `rejected`
    implicit = Dataset.from_dict(
        {
            "chosen": [user("hello") + assistant("hi")],
            "rejected": [user("hello") + assistant("no")],
            "chosen_reward": [1.0],
            "rejected_reward": [0.0],
            "ref_rewards": [[0.0, 0.5, 2.0]],
        }
    )
    trainer = trainer_class(model=tiny_llama_path, args=make_args(config_class, tmp_path), train_dataset=implicit)
    assert trainer.train_dataset["prompt"] == [user("hello")] * 2
    assert [tokenizer.decode(ids) for ids in trainer.train_dataset["completion_ids"]] == ["hi </s>", "no </s>"]


@METHODS
def test_evaluate(tiny_llama_path, dataset, tmp_path, trainer_class, config_class):
    args = make_args(config_class, tmp_path, eval_strategy="steps", eval_steps=2)
    trainer = trainer_class(model=tiny_llama_path, args=args, train_dataset=dataset, eval_dataset={"a": dataset, "b": dataset})
    trainer.train()
    metric = "quantile" if trainer_class is QRPOTrainer else "value"
    assert math.isfinite(logged(trainer, "eval_a_loss")[0])
    assert math.isfinite(logged(trainer, "eval_b_loss")[0])
    assert math.isfinite(logged(trainer, f"eval_{metric}")[0])  # TRL's `_metrics` convention: one `eval_` prefix
    # A dataset handed to `evaluate()` goes through the same map stage; with LoRA its reference is still available
    lora = trainer_class(model=tiny_llama_path, args=make_args(config_class, tmp_path / "lora"), train_dataset=dataset, peft_config=LORA)
    lora.train()
    metrics = lora.evaluate(Dataset.from_dict(pointwise_rows(seed=1)))
    assert math.isfinite(metrics["eval_loss"]) and math.isfinite(metrics[f"eval_{metric}"])


def test_qrpo_settings_shape_the_targets(tiny_llama_path, tmp_path):
    rows = {"prompt": ["hello"] * 4, "completion": [" yes", " no", " maybe", " sure"], "reward": [0.0, 1.0, 2.0, 9.0]}
    rows["ref_rewards"] = [[1.0, 1.0, 2.0, 3.0, 9.0, 9.0]] * 4
    dataset = Dataset.from_dict(rows)

    def targets(**settings):
        trainer = QRPOTrainer(model=tiny_llama_path, args=make_args(QRPOConfig, tmp_path, **settings), train_dataset=dataset)
        return np.array(trainer.train_dataset["quantile"]), np.array(trainer.train_dataset["target"])

    q, target = targets(beta=0.5)
    np.testing.assert_allclose(q, [0, 2 / 6, 3 / 6, 1])
    np.testing.assert_allclose(target, q - beta_log_partition("identity", 0.5))
    q, _ = targets(ties="mid")
    np.testing.assert_allclose(q, [0, 1 / 6, 2.5 / 6, 5 / 6])
    q, target = targets(num_ref_rewards=3, transform="log", partition="finite_n", beta=0.2)
    np.testing.assert_allclose(q, [0, 2 / 3, 1, 1])
    np.testing.assert_allclose(target, np.log(np.maximum(q, 1 / 3)) - beta_log_partition("log", 0.2, "finite_n", n=3))


def test_qrpo_excludes_the_sample_own_reward(tiny_llama_path, tmp_path):
    rows = {"prompt": ["hello"] * 4, "completion": [" yes", " no", " maybe", " sure"], "reward": [1.0, 2.0, 3.0, 9.0]}
    rows["ref_rewards"] = [[1.0, 1.0, 2.0, 3.0, 9.0, 9.0]] * 4
    args = make_args(QRPOConfig, tmp_path, exclude_self_from_ref=True, num_ref_rewards=4)
    trainer = QRPOTrainer(model=tiny_llama_path, args=args, train_dataset=Dataset.from_dict(rows))
    # One copy of the own reward is removed, then the first 4 remaining references are used
    np.testing.assert_allclose(trainer.train_dataset["quantile"], [1 / 4, 2 / 4, 3 / 4, 1])
    # The reference equal to the reward is removed, not a merely close one listed before it
    rows = {"prompt": ["hello"], "completion": [" yes"], "reward": [0.5], "ref_rewards": [[0.5000001, 0.5, 0.2, 0.9]]}
    args = make_args(QRPOConfig, tmp_path, exclude_self_from_ref=True)
    trainer = QRPOTrainer(model=tiny_llama_path, args=args, train_dataset=Dataset.from_dict(rows))
    np.testing.assert_allclose(trainer.train_dataset["quantile"], [1 / 3])


def test_qrpo_precomputed_quantile_column(tiny_llama_path, tmp_path):
    dataset = Dataset.from_dict({"prompt": ["hello"] * 2, "completion": [" yes", " no"], "reward": [1.0, 0.0], "quantile_reward": [0.75, 0.25]})
    args = make_args(QRPOConfig, tmp_path, beta=0.5, transform="sqrt")
    trainer = QRPOTrainer(model=tiny_llama_path, args=args, train_dataset=dataset)
    np.testing.assert_allclose(trainer.train_dataset["target"], np.sqrt([0.75, 0.25]) - beta_log_partition("sqrt", 0.5))
    trainer.train()
    assert_loss_logged(trainer)


@METHODS
def test_model_card_cites_the_method_paper(tiny_llama_path, dataset, tmp_path, trainer_class, config_class):
    trainer = trainer_class(model=tiny_llama_path, args=make_args(config_class, tmp_path), train_dataset=dataset)
    trainer.create_model_card()
    card = (tmp_path / "README.md").read_text()
    arxiv_id = {QRPOTrainer: "2507.08068", RPOTrainer: "2506.13702"}[trainer_class]
    assert f"https://huggingface.co/papers/{arxiv_id}" in card
    assert f"eprint       = {{arXiv:{arxiv_id}}}" in card
