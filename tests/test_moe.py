"""
Mixture-of-Experts policies (tiny Qwen3-MoE and GPT-OSS built from a config): like DPOTrainer, the weighted router
load-balancing loss is added to the loss, in training and evaluation, and logged as `aux_loss`; the reference adds none.
"""

import math

import pytest
import torch
from conftest import (
    assert_loss_logged,
    assert_trained,
    logged,
    make_args,
    pointwise_rows,
    snapshot,
    tiny_decoder_settings,
)
from datasets import Dataset
from peft import LoraConfig
from transformers import GptOssConfig, GptOssForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

from qrpo_trl import QRPOConfig, QRPOTrainer, RPOConfig, RPOTrainer


METHODS = pytest.mark.parametrize(
    "trainer_class, config_class", [(QRPOTrainer, QRPOConfig), (RPOTrainer, RPOConfig)], ids=["qrpo", "rpo"]
)


def tiny_config(architecture, tokenizer):
    shared = dict(hidden_size=16, head_dim=8, num_experts_per_tok=2, **tiny_decoder_settings(tokenizer))
    if architecture == "qwen3_moe":
        return Qwen3MoeConfig(intermediate_size=32, moe_intermediate_size=16, num_experts=4, **shared)
    return GptOssConfig(
        intermediate_size=16,
        num_local_experts=4,
        layer_types=["sliding_attention", "full_attention"],
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        **shared,
    )


@pytest.fixture(scope="module", params=["qwen3_moe", "gpt_oss"])
def tiny_moe_path(request, tmp_path_factory, tokenizer):
    """A saved tiny MoE checkpoint with its tokenizer, loadable by path like a Hub model."""
    path = tmp_path_factory.mktemp(request.param)
    model_class = Qwen3MoeForCausalLM if request.param == "qwen3_moe" else GptOssForCausalLM
    torch.manual_seed(0)
    model_class(tiny_config(request.param, tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@METHODS
def test_train_moe_logs_aux_loss_and_changes_every_parameter(tiny_moe_path, tmp_path, trainer_class, config_class):
    args = make_args(config_class, tmp_path, eval_strategy="steps", eval_steps=3)
    dataset = Dataset.from_dict(pointwise_rows())
    trainer = trainer_class(model=tiny_moe_path, args=args, train_dataset=dataset, eval_dataset=dataset)
    assert trainer.aux_loss_enabled and trainer.router_aux_loss_coef == 0.001  # the architecture's own coefficient
    before = snapshot(trainer.model)
    trainer.train()
    assert_loss_logged(trainer)
    assert logged(trainer, "aux_loss") and all(math.isfinite(value) for value in logged(trainer, "aux_loss"))
    assert math.isfinite(logged(trainer, "eval_aux_loss")[0])
    assert_trained(trainer.model, before)


@pytest.mark.parametrize("precompute", [True, False], ids=["precomputed", "on_the_fly"])
def test_router_aux_loss_coef_weights_the_aux_loss(tiny_moe_path, tmp_path, precompute):
    dataset = Dataset.from_dict(pointwise_rows())
    first = {}
    for coef in (0.001, 10.0):
        args = make_args(
            QRPOConfig, tmp_path / str(coef), max_steps=1, router_aux_loss_coef=coef, precompute_ref_log_probs=precompute
        )
        trainer = QRPOTrainer(model=tiny_moe_path, args=args, train_dataset=dataset, eval_dataset=dataset)
        trainer.train()
        first[coef] = logged(trainer, "loss")[0], logged(trainer, "aux_loss")[0], trainer.evaluate()
    (loss_low, aux, eval_low), (loss_high, aux_high, eval_high) = first[0.001], first[10.0]
    assert aux == pytest.approx(aux_high, rel=1e-5)  # same model, same first batch
    # The loss is the regression plus coef * aux_loss; the reference forward adds nothing
    assert loss_high - loss_low == pytest.approx((10.0 - 0.001) * aux, rel=1e-3)
    assert eval_high["eval_loss"] > eval_low["eval_loss"] + 10.0 * eval_high["eval_aux_loss"] / 2


def test_no_aux_loss_when_disabled(tiny_moe_path, tmp_path):
    args = make_args(QRPOConfig, tmp_path, max_steps=1, router_aux_loss_coef=0.0)
    trainer = QRPOTrainer(model=tiny_moe_path, args=args, train_dataset=Dataset.from_dict(pointwise_rows()))
    trainer.train()
    assert not trainer.aux_loss_enabled and not logged(trainer, "aux_loss")


def test_train_moe_lora_reference_adds_no_aux_loss(tiny_moe_path, tmp_path):
    # With LoRA the reference is the policy with adapters disabled: the same forward, which must not add the term.
    # GPT-OSS adapts its fused expert weights, as DPOTrainer's MoE LoRA test does.
    dataset = Dataset.from_dict(pointwise_rows())
    if "gpt_oss" in tiny_moe_path:
        targets = dict(target_modules=[], target_parameters=["mlp.experts.down_proj", "mlp.experts.gate_up_proj"])
    else:
        targets = dict(target_modules=["q_proj", "v_proj"])
    losses = []
    for precompute in (True, False):
        args = make_args(QRPOConfig, tmp_path / str(precompute), max_steps=2, precompute_ref_log_probs=precompute)
        lora = LoraConfig(r=4, lora_alpha=8, **targets)
        trainer = QRPOTrainer(model=tiny_moe_path, args=args, train_dataset=dataset, peft_config=lora)
        before = snapshot(trainer.model)
        trainer.train()
        assert logged(trainer, "aux_loss")
        losses.append(logged(trainer)[:2])
        assert_trained(trainer.model, before)
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_padding_free_moe_loss_and_aux_loss_equal_padded(tiny_moe_path, tmp_path):
    """Packed (`padding_free`), the router loss counts the same tokens as the padded batch's attention mask. GPT-OSS
    (eager, attention sinks) builds its masks without `position_ids`, which transformers' dense masks would need: the
    per-sample attention confines it, through its own eager attention."""
    dataset = Dataset.from_dict(pointwise_rows())
    results = []
    for padding_free in (False, True):
        args = make_args(QRPOConfig, tmp_path / str(padding_free), padding_free=padding_free, router_aux_loss_coef=10.0)
        trainer = QRPOTrainer(model=tiny_moe_path, args=args, train_dataset=dataset)
        batch = trainer._prepare_inputs(trainer.data_collator(list(trainer.train_dataset.select(range(6)))))
        assert ("attention_mask" in batch) != padding_free
        trainer.model.train()
        loss = trainer.compute_loss(trainer.model, batch)
        results.append((loss.item(), trainer._metrics["train"]["aux_loss"][-1], trainer.train_dataset["ref_logps"]))
    (padded_loss, padded_aux, padded_ref), (packed_loss, packed_aux, packed_ref) = results
    assert packed_aux == pytest.approx(padded_aux, rel=1e-5)
    assert packed_loss == pytest.approx(padded_loss, rel=1e-5)
    assert packed_ref == pytest.approx(padded_ref, rel=1e-5, abs=1e-5)
