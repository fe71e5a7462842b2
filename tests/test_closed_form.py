"""
Trained to convergence on one prompt, the policy reaches the closed-form optimum the targets encode, for a decoder-only
(tiny Llama) and an encoder-decoder (tiny T5) model.
"""

import numpy as np
import pytest
from conftest import make_args
from datasets import Dataset

from qrpo_trl import QRPOConfig, QRPOTrainer, RPOConfig, RPOTrainer
from qrpo_trl.targets import beta_log_partition


COMPLETIONS = [" yes", " no", " maybe", " sure"]


# Enough steps at a rate each architecture converges at
TRAINING = {
    "llama": dict(max_steps=200, learning_rate=0.03, lr_scheduler_type="constant", logging_steps=100, per_device_train_batch_size=4),
    "t5": dict(max_steps=120, learning_rate=0.1, lr_scheduler_type="linear", logging_steps=120, per_device_train_batch_size=4),
}


def log_ratios(trainer, architecture):
    """log pi(y|x) of each training sample under the trained policy and under the reference, by independent forwards."""
    reference = architecture.model_class.from_pretrained(architecture.path)
    policy = trainer.model.eval()
    rows = list(trainer.train_dataset)
    trained = np.array([architecture.sequence_logps(policy, row["prompt_ids"], row["completion_ids"]) for row in rows])
    initial = np.array([architecture.sequence_logps(reference, row["prompt_ids"], row["completion_ids"]) for row in rows])
    return trained, initial


@pytest.mark.parametrize("transform", ["identity", "log"])
def test_qrpo_reaches_its_target_log_ratios(architecture, tmp_path, transform):
    beta = 1.0
    rows = {
        "prompt": ["hello"] * 4,
        "completion": COMPLETIONS,
        "reward": [0.5, 1.5, 2.5, 3.5],  # quantiles 0, 1/3, 2/3, 1 against the references below
        "ref_rewards": [[1.0, 2.0, 3.0]] * 4,
    }
    args = make_args(QRPOConfig, tmp_path, beta=beta, transform=transform, **TRAINING[architecture.name])
    trainer = QRPOTrainer(model=architecture.path, args=args, train_dataset=Dataset.from_dict(rows))
    trainer.train()
    trained, initial = log_ratios(trainer, architecture)
    q = np.array([0, 1 / 3, 2 / 3, 1])
    f = q if transform == "identity" else np.log(np.maximum(q, 1 / 3))
    expected = (f - beta_log_partition(transform, beta)) / beta
    np.testing.assert_allclose(trained - initial, expected, atol=0.1)


def test_rpo_reaches_a_softmax_over_the_completions(architecture, tmp_path):
    tau = 1.0
    rewards = np.array([0.0, 1.0, 2.0, 0.5])
    rows = {"prompt": ["hello"] * 4, "completion": COMPLETIONS, "reward": rewards.tolist()}
    args = make_args(RPOConfig, tmp_path, beta=tau, **TRAINING[architecture.name])
    trainer = RPOTrainer(model=architecture.path, args=args, train_dataset=Dataset.from_dict(rows))
    values = np.array(trainer.train_dataset["value"])
    trainer.train()
    trained, initial = log_ratios(trainer, architecture)
    np.testing.assert_allclose(trained - initial, (rewards - values) / tau, atol=0.1)
    # The optimum is a softmax over the observed completions: their probabilities sum to about 1
    assert np.exp(trained).sum() == pytest.approx(1.0, abs=0.05)
    np.testing.assert_allclose(np.exp(trained), np.exp(initial + rewards / tau) / np.exp(initial + rewards / tau).sum(), atol=0.02)


@pytest.mark.parametrize("architecture", ["llama"], indirect=True)  # the targets, not the architecture, are under test
def test_rpo_with_duplicated_rows_reaches_the_softmax_over_distinct_completions(architecture, tmp_path):
    # Every completion present twice; the copies of " sure" disagree on its reward (mean 1.0)
    tau = 1.0
    rewards = np.array([0.0, 1.0, 2.0, 0.5, 0.0, 1.0, 2.0, 1.5])
    rows = {"prompt": ["hello"] * 8, "completion": COMPLETIONS * 2, "reward": rewards.tolist()}
    args = make_args(RPOConfig, tmp_path, beta=tau, **TRAINING[architecture.name])
    trainer = RPOTrainer(model=architecture.path, args=args, train_dataset=Dataset.from_dict(rows))
    trainer.train()
    trained, initial = log_ratios(trainer, architecture)
    mean_rewards = (rewards[:4] + rewards[4:]) / 2
    # The optimum over the distinct completions: pi(y) = pi_ref(y) exp(mean r_y / tau) / sum_y' (...)
    optimum = initial[:4] + mean_rewards / tau
    optimum -= np.log(np.exp(optimum).sum())
    assert np.exp(trained[:4]).sum() == pytest.approx(1.0, abs=0.05)
    np.testing.assert_allclose(trained - initial, np.tile(optimum - initial[:4], 2), atol=0.1)
