"""
`share_prompt=True`: the completions of one prompt in a batch packed after one copy of it. Log-probs, loss and every
gradient equal the padded batch's; the reference pass shares too; `PromptGroupedSampler` keeps a prompt's rows together.
"""

import numpy as np
import pytest
import torch
from conftest import assert_same_loss_and_gradients, build_tiny_llama, logged, make_args, varied_pointwise_dataset
from datasets import Dataset
from test_padding_free import LORA, _loss_and_gradients, _spy, _tiny_mistral, _trainer
from transformers import AttentionInterface

from qrpo_trl import DataCollatorForPointwise, PromptGroupedSampler, QRPOConfig, QRPOTrainer, RPOConfig, RPOTrainer
from qrpo_trl.kernels.packed_attention import PER_SAMPLE_IMPLEMENTATIONS, per_sample_attention
from qrpo_trl.pointwise_collator import model_inputs
from qrpo_trl.prompt_grouping import grouped_by_length


def grouped_dataset(num_prompts: int = 4, per_prompt: int = 3) -> Dataset:
    """Varied-length rows, `per_prompt` completions per prompt (rows of a prompt adjacent); the first prompt is empty
    (its tokens: BOS alone, a prompt of length 1)."""
    rows = varied_pointwise_dataset(num_prompts * per_prompt, 6, 12)
    prompts = [""] + [rows[g * per_prompt]["prompt"] for g in range(1, num_prompts)]
    return rows.map(lambda row, i: {"prompt": prompts[i // per_prompt]}, with_indices=True)


def segment_positions(batch, sample: int, shared: int, length: int) -> torch.Tensor:
    """The row positions of a sample's own segment (its tokens after the `shared` ones of its prompt), `length` tokens
    in all: the shared part counts with the group's first sample, the padding tail (at position 0) with the last."""
    own = (batch["sample_index"][0] == sample) & (batch["position_ids"][0] >= shared)
    return own.nonzero().flatten()[: length - shared]


@pytest.fixture
def shared_dataset():
    return grouped_dataset()


def test_shared_row_holds_each_prompt_once():
    prompt, other = [2, 8, 9], [2, 30]
    examples = [
        {"prompt_ids": prompt, "completion_ids": [10, 11]},
        {"prompt_ids": other, "completion_ids": [12]},
        {"prompt_ids": prompt, "completion_ids": [13, 14, 15]},
        {"prompt_ids": [2], "completion_ids": [16]},  # a prompt of length 1: nothing shared but itself
        {"prompt_ids": [2], "completion_ids": [17, 18]},
    ]
    batch = DataCollatorForPointwise(pad_token_id=0, padding_free=True, share_prompt=True, pad_to_multiple_of=4)(examples)
    assert batch["input_ids"][0].tolist() == [2, 8, 9, 10, 11, 9, 13, 14, 15, 2, 30, 12, 2, 16, 2, 17, 18, 0, 0, 0]
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 2, 3, 4, 5, 0, 1, 2, 0, 1, 0, 1, 2, 0, 0, 0]
    assert batch["completion_mask"][0].tolist() == [0, 0, 0, 1, 1, 0, 1, 1, 1, 0, 0, 1, 0, 1, 0, 1, 1, 0, 0, 0]
    # The shared part counts with its group's first sample, the padding tail with the last sample
    assert batch["sample_index"][0].tolist() == [0] * 5 + [2] * 4 + [1] * 3 + [3] * 2 + [4] * 6
    # Each sample's real tokens, prompt included, as the padded batch counts them
    assert batch["sample_lengths"].tolist() == [5, 3, 6, 2, 3]
    # Segments: the shared [2, 8], two completions after it, the shared [2] and one after it, the two of the length-1
    # prompt (nothing shared), the padding tail
    assert batch["cu_seq_lens_q"].tolist() == [0, 2, 5, 9, 10, 12, 14, 17, 18, 19, 20]
    keys = batch["segment_key_index"].tolist()
    bounds = batch["cu_seq_lens_k"].tolist()
    segments = [keys[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    assert segments == [[0, 1], [0, 1, 2, 3, 4], [0, 1, 5, 6, 7, 8], [9], [9, 10, 11], [12, 13], [14, 15, 16], [17], [18], [19]]
    assert batch["max_length_q"] == 4 and batch["max_length_k"] == 6


def test_truncation_leaving_different_prompt_tokens_does_not_share():
    examples = [{"prompt_ids": [2, 8, 9, 10], "completion_ids": [11, 12]}, {"prompt_ids": [2, 8, 9, 10], "completion_ids": [13]}]
    collator = DataCollatorForPointwise(pad_token_id=0, max_length=4, truncation_mode="keep_end", padding_free=True, share_prompt=True)
    batch = collator(examples)
    # keep_end cuts 2 and 1 prompt tokens: [9, 10] + [11, 12] and [8, 9, 10] + [13], two groups
    assert batch["input_ids"][0].tolist() == [9, 10, 11, 12, 8, 9, 10, 13]
    assert batch["cu_seq_lens_k"].tolist() == [0, 1, 5, 7, 11]


def test_share_prompt_needs_padding_free(tmp_path):
    with pytest.raises(ValueError, match="needs `padding_free=True`"):
        make_args(QRPOConfig, tmp_path, share_prompt=True)
    with pytest.raises(ValueError, match="needs `padding_free=True`"):
        DataCollatorForPointwise(pad_token_id=0, share_prompt=True)
    with pytest.raises(ValueError, match="train_sampling_strategy"):
        make_args(QRPOConfig, tmp_path, group_by_prompt=True, train_sampling_strategy="group_by_length")


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("architecture", ["llama-gqa", "mistral-gqa", "mistral-sliding-window"])
def test_shared_prompt_attention_equals_each_sample_alone(tokenizer, implementation, architecture):
    """Logits of each completion (and of the shared prompt) in a shared row equal the sample's forward alone."""
    if architecture == "llama-gqa":
        model = build_tiny_llama(tokenizer)
    else:
        model = _tiny_mistral(tokenizer, sliding_window=3 if architecture == "mistral-sliding-window" else None)
    model.set_attn_implementation(implementation)
    prompt = [2, 8, 9, 10]
    examples = [{"prompt_ids": prompt, "completion_ids": [11, 12, 13, 14]}, {"prompt_ids": [2], "completion_ids": [15, 16]},
                {"prompt_ids": prompt, "completion_ids": [17]}, {"prompt_ids": [2], "completion_ids": [18, 19, 20]}]
    batch = DataCollatorForPointwise(pad_token_id=0, padding_free=True, share_prompt=True)(examples)
    with torch.no_grad():
        with per_sample_attention(model):
            logits = model(**model_inputs(batch), use_cache=False).logits[0]
        for i, example in enumerate(examples):
            alone = model(input_ids=torch.tensor([example["prompt_ids"] + example["completion_ids"]])).logits[0]
            shared = len(example["prompt_ids"]) - 1
            own = segment_positions(batch, i, shared, len(alone))
            torch.testing.assert_close(logits[own], alone[shared:], atol=1e-5, rtol=1e-5)
            if i < 2 and shared:  # the shared prompt, computed once
                torch.testing.assert_close(logits[:shared], alone[:shared], atol=1e-5, rtol=1e-5)


def _shared_trainer(model_path, tmp_path, dataset, share, trainer_class, config_class, peft_config, **settings):
    if share:
        settings.update(share_prompt=True)
    return _trainer(model_path, tmp_path / f"shared-{share}", dataset, share, trainer_class, config_class, peft_config, **settings)


@pytest.mark.parametrize("peft_config", [None, LORA], ids=["full", "lora"])
@pytest.mark.parametrize("precompute", [True, False], ids=["precomputed", "on_the_fly"])
@pytest.mark.parametrize(
    "trainer_class,config_class,settings",
    [(QRPOTrainer, QRPOConfig, {}), (RPOTrainer, RPOConfig, {"logps_normalization": "mean"})],
    ids=["qrpo", "rpo"],
)
@pytest.mark.parametrize("truncation_mode", ["keep_start", "keep_end"])
def test_shared_logps_loss_and_gradients_equal_padded(
    tiny_llama_path, shared_dataset, tmp_path, peft_config, precompute, trainer_class, config_class, settings,
    truncation_mode,
):
    results = []
    for share in (False, True):
        trainer = _shared_trainer(
            tiny_llama_path, tmp_path, shared_dataset, share, trainer_class, config_class, peft_config,
            precompute_ref_log_probs=precompute, max_length=9, truncation_mode=truncation_mode,
            precompute_ref_batch_size=5, **settings,
        )
        if precompute:  # the reference pass shares too
            results.append(np.asarray(trainer.train_dataset["ref_logps"]))
        examples = list(trainer.train_dataset.select(range(8)))
        batch = trainer.data_collator(examples)
        if share:  # prompts are shared: the row is shorter than the samples' tokens
            assert batch["input_ids"].size(1) < int(batch["sample_lengths"].sum())
        results.append(_loss_and_gradients(trainer, examples))
    if precompute:
        padded_ref, padded, shared_ref, shared = results
        np.testing.assert_allclose(shared_ref, padded_ref, rtol=1e-5, atol=1e-5)
    else:
        padded, shared = results
    assert_same_loss_and_gradients(shared, padded)


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_shared_training_step_with_activation_checkpointing_equals_padded(
    tiny_llama_path, shared_dataset, tmp_path, monkeypatch, implementation
):
    """The training step, its checkpointed backward re-running shared-prompt attention, gives the padded gradients."""
    results = []
    for share in (False, True):
        trainer = _shared_trainer(
            tiny_llama_path, tmp_path, shared_dataset, share, QRPOTrainer, QRPOConfig, None,
            gradient_checkpointing=True, model_init_kwargs={"attn_implementation": implementation},
        )
        calls = []
        _spy(monkeypatch, AttentionInterface._global_mapping, PER_SAMPLE_IMPLEMENTATIONS[implementation], calls)
        batch = trainer._prepare_inputs(trainer.data_collator(list(trainer.train_dataset.select(range(9)))))
        trainer.model.gradient_checkpointing_enable(trainer.args.gradient_checkpointing_kwargs)
        trainer.current_gradient_accumulation_steps = 1
        trainer.model.train()
        trainer.model.zero_grad()
        loss = trainer.training_step(trainer.model, batch)
        assert trainer.model.config._attn_implementation == implementation
        assert len(calls) == (2 * trainer.model.config.num_hidden_layers if share else 0)
        gradients = {name: param.grad.clone() for name, param in trainer.model.named_parameters() if param.requires_grad}
        results.append((loss, gradients))
    (padded_loss, padded), (shared_loss, shared) = results
    torch.testing.assert_close(shared_loss, padded_loss, atol=1e-5, rtol=1e-5)
    for name in padded:
        torch.testing.assert_close(shared[name], padded[name], atol=1e-5, rtol=1e-5, msg=name)


def test_prompt_grouped_sampler_keeps_groups_together_and_shuffles_them():
    prompts = [[2, 5], [2, 6], [2, 5], [2, 7], [2, 6], [2, 5], [2, 8]]
    dataset = Dataset.from_dict({"prompt_ids": prompts, "completion_ids": [[9]] * len(prompts)})
    sampler = PromptGroupedSampler(dataset, seed=3)
    orders = []
    for epoch in range(4):
        sampler.set_epoch(epoch)
        order = list(sampler)
        assert sorted(order) == list(range(len(prompts))) and len(sampler) == len(prompts)
        # Each prompt's rows consecutive, in dataset order
        runs = [tuple(prompts[i]) for k, i in enumerate(order) if k == 0 or prompts[order[k - 1]] != prompts[i]]
        assert len(runs) == len(set(runs)) == 4
        orders.append(order)
    assert list(PromptGroupedSampler(dataset, seed=3)) == orders[0]  # seeded
    assert len({tuple(order) for order in orders}) > 1  # reshuffled by epoch


def test_reference_pass_order_keeps_groups_longest_first():
    prompts = [[2, 5], [2, 6], [2, 5], [2, 7], [2, 6]]
    dataset = Dataset.from_dict({"prompt_ids": prompts, "completion_ids": [[9]] * 5})
    order = grouped_by_length(dataset, np.array([3, 9, 5, 4, 2]))
    assert order.tolist() == [1, 4, 2, 0, 3]


@pytest.mark.parametrize("peft_config", [None, LORA], ids=["full", "lora"])
def test_train_shared_prompt(tiny_llama_path, shared_dataset, tmp_path, peft_config):
    runs = {}
    for share in (False, True):
        trainer = _shared_trainer(
            tiny_llama_path, tmp_path, shared_dataset, share, QRPOTrainer, QRPOConfig, peft_config,
            group_by_prompt=True, per_device_train_batch_size=6, max_steps=2,
        )
        before = {name: param.clone() for name, param in trainer.model.named_parameters()}
        trainer.train()
        for name, param in trainer.model.named_parameters():
            changed = not torch.equal(param, before[name])
            assert changed == (peft_config is None or "lora_" in name), name
        runs[share] = trainer
    losses = logged(runs[True])
    assert losses and all(np.isfinite(losses))
    np.testing.assert_allclose(losses, logged(runs[False]), rtol=1e-4)
    # The token count logged is the samples' real tokens (prompt counted per sample), as the padded batches count them
    assert logged(runs[True], "num_tokens") == logged(runs[False], "num_tokens")


def test_group_by_prompt_refuses_a_streamed_dataset(tiny_llama_path, shared_dataset, tmp_path):
    with pytest.raises(ValueError, match="streamed dataset is read in its own order"):
        _trainer(
            tiny_llama_path, tmp_path, shared_dataset.to_iterable_dataset(), False, group_by_prompt=True,
            precompute_ref_log_probs=False, max_steps=1,
        )


def _varlen_reference(module, query, key, value, attention_mask, cu_seq_lens_q, cu_seq_lens_k, max_length_q,
                      max_length_k, **kwargs):
    """A stand-in for transformers' flash path (no GPU here): flash-attn's varlen semantics, causal aligned lower-right,
    on (1, heads, length, dim) inputs; (1, length, heads, dim) out."""
    assert module.config._attn_implementation == "flash_attention_2"  # its kernels are looked up by this name
    assert attention_mask is None
    key, value = (t.repeat_interleave(query.shape[1] // key.shape[1], dim=1) for t in (key, value))
    q_bounds, k_bounds = cu_seq_lens_q.tolist(), cu_seq_lens_k.tolist()
    assert max_length_q == max(np.diff(q_bounds)) and max_length_k == max(np.diff(k_bounds))
    outputs = []
    for j in range(len(q_bounds) - 1):
        q = query[:, :, q_bounds[j] : q_bounds[j + 1]]
        k, v = (t[:, :, k_bounds[j] : k_bounds[j + 1]] for t in (key, value))
        mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).tril(k.shape[2] - q.shape[2])
        outputs.append(torch.nn.functional.scaled_dot_product_attention(q, k, v, mask, scale=kwargs["scaling"]))
    return torch.cat(outputs, dim=2).transpose(1, 2), None


def test_shared_prompt_flash_path_gathers_each_segments_keys(tokenizer, monkeypatch):
    """
    The flash varlen path (not run here: no GPU) hands the kernel each segment's keys, its prompt's then its own, packed
    and bounded by `cu_seq_lens_k`: with a stand-in kernel of flash-attn's semantics, each sample's logits are its own.
    """
    from qrpo_trl.kernels import packed_attention

    monkeypatch.setattr(packed_attention, "flash_attention_forward", _varlen_reference)
    monkeypatch.setattr(packed_attention, "flash_attn_supports_top_left_mask", lambda: False)
    model = _tiny_mistral(tokenizer, sliding_window=None)
    examples = [{"prompt_ids": [2, 8, 9, 10], "completion_ids": [11, 12, 13]}, {"prompt_ids": [2, 8, 9, 10], "completion_ids": [14]},
                {"prompt_ids": [2], "completion_ids": [15, 16]}]
    batch = DataCollatorForPointwise(pad_token_id=0, padding_free=True, share_prompt=True, pad_to_multiple_of=8)(examples)
    with torch.no_grad():
        alone = [model(input_ids=torch.tensor([e["prompt_ids"] + e["completion_ids"]])).logits[0] for e in examples]
        model.config._attn_implementation_internal = "flash_attention_2"
        with per_sample_attention(model, shared_prompts=True):
            logits = model(**model_inputs(batch), use_cache=False).logits[0]
        assert model.config._attn_implementation == "flash_attention_2"
    for i, (example, expected) in enumerate(zip(examples, alone)):
        shared = len(example["prompt_ids"]) - 1
        own = segment_positions(batch, i, shared, len(expected))
        torch.testing.assert_close(logits[own], expected[shared:], atol=1e-5, rtol=1e-5)
