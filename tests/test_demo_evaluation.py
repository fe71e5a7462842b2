"""The demo's held-out KL, scored on the sampled token ids: exactly 0 for an unchanged policy, and a known KL found."""

import math

import numpy as np
import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model

from qrpo_trl.demo import evaluation
from qrpo_trl.demo.config import DemoConfig
from qrpo_trl.demo.task import build_task

from conftest import build_tiny_llama, build_tokenizer


def heldout_prompts(num_prompts: int) -> Dataset:
    _, heldout = build_task(num_heldout_topics=num_prompts, rules_per_topic=1)
    return Dataset.from_list(heldout[:num_prompts])


def sample(policy, tokenizer, num_prompts, num_generations, max_completion_length):
    config = DemoConfig(max_completion_length=max_completion_length, generation_batch_size=64)
    samples = evaluation.sample_heldout(
        policy, tokenizer, heldout_prompts(num_prompts), num_generations, config, "test samples"
    )
    return samples, evaluation.kl_to_reference(policy, samples, tokenizer.pad_token_id)


def test_policy_equal_to_its_reference_has_kl_exactly_zero():
    tokenizer = build_tokenizer()
    # LoRA starts with B = 0: the policy computes exactly what the reference (adapters disabled) computes
    policy = get_peft_model(build_tiny_llama(tokenizer), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    samples, kl = sample(policy, tokenizer, num_prompts=3, num_generations=4, max_completion_length=6)
    assert np.all(kl["kl"] == 0) and np.all(kl["log_ratio"] == 0)
    assert np.all(kl["num_tokens"] == [len(ids) for ids in samples["completion_ids"]])
    assert np.all(kl["num_tokens"] >= 1)


def context_free_policy(tokenizer, reference_logits: torch.Tensor, logit_shift: torch.Tensor):
    """
    A tiny Llama whose next-token distribution is `softmax(reference_logits)` whatever the context, and a LoRA policy
    on it whose distribution is `softmax(reference_logits + logit_shift)`: every embedding is the same vector and the
    layers add nothing to the residual stream (zero output projections), so the last hidden state is one vector `c`;
    the LM head maps it to the reference logits, and the rank-1 LoRA of the head to the shift.
    """
    model = build_tiny_llama(tokenizer, hidden_size=16)
    model.config.tie_word_embeddings = False
    with torch.no_grad():
        model.lm_head.weight = torch.nn.Parameter(torch.empty(len(tokenizer), 16))
        embedding = torch.randn(16)
        model.model.embed_tokens.weight.copy_(embedding.expand_as(model.model.embed_tokens.weight))
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        hidden = model.model.norm(embedding)
        model.lm_head.weight.copy_(torch.outer(reference_logits, hidden) / hidden.dot(hidden))
    policy = get_peft_model(model, LoraConfig(r=1, lora_alpha=1, target_modules=["lm_head"]))
    lora = policy.base_model.model.lm_head
    with torch.no_grad():
        lora.lora_A["default"].weight.copy_(hidden[None] / hidden.dot(hidden))
        lora.lora_B["default"].weight.copy_(logit_shift[:, None])
    return policy


@pytest.mark.parametrize("shift_scale", [0.5, 2.0])
def test_known_kl_is_found_within_its_interval(shift_scale):
    tokenizer = build_tokenizer()
    generator = torch.Generator().manual_seed(0)
    reference_logits = torch.randn(len(tokenizer), generator=generator)
    shift = shift_scale * torch.randn(len(tokenizer), generator=generator)
    reference_logits[tokenizer.eos_token_id] = shift[tokenizer.eos_token_id] = 2.0  # ends a completion now and then
    policy = context_free_policy(tokenizer, reference_logits, shift)

    # Per token, every step is the same pair of distributions; a completion stops at EOS or after L tokens
    p, q = (reference_logits + shift).double().softmax(-1), reference_logits.double().softmax(-1)
    token_kl = float((p * (p.log() - q.log())).sum())
    length = 8
    keep_going = 1 - float(p[tokenizer.eos_token_id])
    sequence_kl = token_kl * (1 - keep_going**length) / (1 - keep_going)

    samples, kl = sample(policy, tokenizer, num_prompts=8, num_generations=32, max_completion_length=length)
    num_prompts = 8
    figures = evaluation.compare_to_reference(
        {"rewards": evaluation.group_by_prompt(samples["reward"], num_prompts).tolist()},
        evaluation.summarize(samples, num_prompts),
        kl,
    )
    # The exact next-token KL summed over each sample's tokens: exactly the per-token KL times its length
    np.testing.assert_allclose(kl["kl"], token_kl * kl["num_tokens"], rtol=1e-6)
    assert figures["kl_per_token"] == pytest.approx(token_kl, rel=1e-6)
    for name in ["kl", "kl_log_ratio"]:
        low, high = figures[f"{name}_ci95"]
        assert low <= sequence_kl <= high, (name, figures[name], figures[f"{name}_ci95"], sequence_kl)
        # An interval that says something: narrower than the KL itself
        assert high - low < sequence_kl
    assert math.isclose(figures["reward_difference"], 0.0, abs_tol=1e-12)


def test_shared_prompt_scoring_equals_padded_batches():
    """Prompts packed once for all their samples give the KL and log-ratio of right-padded batches of each sample."""
    tokenizer = build_tokenizer()
    policy = get_peft_model(build_tiny_llama(tokenizer), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(1)
    with torch.no_grad():  # a policy that has moved: LoRA's B away from 0
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)
    config = DemoConfig(max_completion_length=6, generation_batch_size=64)
    samples = evaluation.sample_heldout(policy, tokenizer, heldout_prompts(3), 4, config, "test samples")
    padded = evaluation.kl_to_reference(policy, samples, tokenizer.pad_token_id, batch_size=5, share_prompt=False)
    shared = evaluation.kl_to_reference(policy, samples, tokenizer.pad_token_id, batch_size=5)
    assert np.all(padded["kl"] > 0)
    for key in ("kl", "log_ratio", "num_tokens"):
        np.testing.assert_allclose(shared[key], padded[key], rtol=1e-5, atol=1e-7, err_msg=key)
