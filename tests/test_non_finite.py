"""Non-finite settings are config errors; a step whose gradients are not finite stops training before the weights."""

import math

import pytest
import torch
from conftest import build_tiny_llama, make_args, pointwise_rows, snapshot
from datasets import Dataset

from qrpo_trl import QRPOConfig, QRPOTrainer, ReferenceConfig, RPOConfig


@pytest.mark.parametrize(
    "config_class, setting, value, match",
    [
        (QRPOConfig, "beta", math.inf, r"`beta` must be a finite number, got inf"),
        (RPOConfig, "beta", math.nan, r"`beta` must be a finite number, got nan"),
        (QRPOConfig, "learning_rate", math.inf, r"`learning_rate` must be a finite number, got inf"),
        (RPOConfig, "temperature", math.inf, r"`temperature` must be a finite number, got inf"),
        (QRPOConfig, "reward_weights", [1.0, math.nan], r"`reward_weights` must be a finite number, got \[1.0, nan\]"),
        (QRPOConfig, "vllm_gpu_memory_utilization", 2.0, r"`vllm_gpu_memory_utilization` must be in \(0, 1\], got 2.0"),
    ],
)
def test_non_finite_or_absurd_settings_are_config_errors(tmp_path, config_class, setting, value, match):
    with pytest.raises(ValueError, match=match):
        make_args(config_class, tmp_path, **{setting: value})


def test_reference_config_rejects_non_finite_settings():
    with pytest.raises(ValueError, match=r"`top_p` must be a finite number, got nan"):
        ReferenceConfig(top_p=math.nan)
    with pytest.raises(ValueError, match=r"`temperature` must be a finite number, got inf"):
        ReferenceConfig(temperature=math.inf)


def test_non_finite_gradients_stop_training_at_their_step(tokenizer, tmp_path, monkeypatch):
    model = build_tiny_llama(tokenizer)
    args = make_args(QRPOConfig, tmp_path / "out", max_steps=4)
    trainer = QRPOTrainer(model=model, args=args, train_dataset=Dataset.from_dict(pointwise_rows()), processing_class=tokenizer)
    compute_loss, snapshots = QRPOTrainer._compute_loss, []

    def overflowing_at_step_3(self, model, inputs, return_outputs):
        snapshots.append(snapshot(model))  # the weights before the step
        loss = compute_loss(self, model, inputs, return_outputs)
        return loss * math.inf if len(snapshots) == 3 else loss  # an overflow at the third step

    monkeypatch.setattr(QRPOTrainer, "_compute_loss", overflowing_at_step_3)
    with pytest.raises(FloatingPointError, match=r"Training step 3: the gradients hold NaN or inf values"):
        trainer.train()
    # The failing step wrote nothing: the weights are those it started from, finite
    assert all(torch.equal(param, snapshots[2][name]) for name, param in model.named_parameters())
    assert all(param.isfinite().all() for param in model.parameters())
    assert not all(torch.equal(snapshots[0][name], snapshots[2][name]) for name in snapshots[0])  # it had trained
