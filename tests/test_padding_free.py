"""
`padding_free=True`: the samples of a batch packed into one row. Log-probs, loss and gradients equal the padded
batch's; a model or setting that cannot be packed is a ValueError.
"""

import numpy as np
import pytest
import torch
from conftest import assert_same_loss_and_gradients, build_tiny_llama, logged, make_args, sequence_logps, varied_pointwise_dataset
from datasets import Dataset
from peft import LoraConfig, PromptTuningConfig
from transformers import AttentionInterface, LlamaForCausalLM, MistralConfig, MistralForCausalLM
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

from qrpo_trl import DataCollatorForPointwise, QRPOConfig, QRPOTrainer, RPOConfig, RPOTrainer
from qrpo_trl.kernels.packed_attention import PER_SAMPLE_IMPLEMENTATIONS, per_sample_attention
from qrpo_trl.pointwise_collator import model_inputs


LORA = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])


@pytest.fixture
def varied_dataset():
    """Pointwise rows whose prompts and completions vary from 1 to ~12 words."""
    return varied_pointwise_dataset(12, 6, 12)


@pytest.mark.parametrize("max_length", [None, 7])
@pytest.mark.parametrize("truncation_mode", ["keep_start", "keep_end"])
@pytest.mark.parametrize("pad_to_multiple_of", [None, 8])
def test_packed_batch_holds_the_padded_batch_rows(max_length, truncation_mode, pad_to_multiple_of):
    rng = np.random.default_rng(1)
    examples = [
        {"prompt_ids": rng.integers(3, 50, size=int(rng.integers(1, 6))).tolist(),
         "completion_ids": rng.integers(3, 50, size=int(rng.integers(1, 9))).tolist(), "target": float(i)}
        for i in range(5)
    ]
    settings = dict(pad_token_id=0, max_length=max_length, truncation_mode=truncation_mode, pad_to_multiple_of=pad_to_multiple_of)
    padded = DataCollatorForPointwise(**settings)(examples)
    packed = DataCollatorForPointwise(**settings, padding_free=True)(examples)
    assert "attention_mask" not in packed
    lengths = padded["attention_mask"].sum(dim=1)
    assert packed["sample_lengths"].tolist() == lengths.tolist()
    total = int(lengths.sum())
    width = packed["input_ids"].size(1)
    assert width == (total if pad_to_multiple_of is None else -(-total // pad_to_multiple_of) * pad_to_multiple_of)
    # The rows of the padded batch, one after the other, positions restarting at each
    real = padded["attention_mask"].bool()
    assert packed["input_ids"][0, :total].tolist() == padded["input_ids"][real].tolist()
    assert packed["position_ids"][0, :total].tolist() == [p for n in lengths.tolist() for p in range(n)]
    assert packed["sample_index"][0, :total].tolist() == [i for i, n in enumerate(lengths.tolist()) for _ in range(n)]
    # The scored tokens are the padded batch's (a row's first token is never scored), none in the tail
    expected_mask = padded["completion_mask"].clone()
    expected_mask[:, 0] = 0
    assert packed["completion_mask"][0, :total].tolist() == expected_mask[real].tolist()
    assert packed["completion_mask"][0, total:].sum() == 0
    assert packed["target"].tolist() == padded["target"].tolist()


def _tiny_mistral(tokenizer, sliding_window):
    config = MistralConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=4, max_position_embeddings=128, sliding_window=sliding_window,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    return MistralForCausalLM(config)


def _spy(monkeypatch, mapping, key, calls):
    """Replace `mapping[key]` by a wrapper that records the attention mask of each call."""
    function = mapping[key]

    def spy(*args, **kwargs):
        calls.append(args[4] if len(args) > 4 else kwargs.get("attention_mask"))
        return function(*args, **kwargs)

    monkeypatch.setitem(mapping, key, spy)


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("architecture", ["llama-gqa", "mistral-sliding-window"])
def test_per_sample_attention_equals_dense_mask_and_builds_no_mask(tokenizer, monkeypatch, implementation, architecture):
    """
    A packed row through per-sample attention gives the logits of transformers' dense packed mask and of each sample
    alone; no mask is built for it, and the model's config says its own implementation again afterwards.
    """
    model = build_tiny_llama(tokenizer) if architecture == "llama-gqa" else _tiny_mistral(tokenizer, sliding_window=3)
    model.set_attn_implementation(implementation)
    samples = [[2, 8, 9, 10], [2, 11], [2, 12, 13, 14, 15, 16, 17]]  # the last longer than the sliding window
    packed = DataCollatorForPointwise(pad_token_id=0, padding_free=True)(
        [{"prompt_ids": s[:1], "completion_ids": s[1:]} for s in samples]
    )
    forward_inputs = model_inputs(packed)
    with torch.no_grad():
        # transformers' dense mask from `position_ids` (it detects the packing only without a cache)
        dense = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits[0]
        alone = torch.cat([model(input_ids=torch.tensor([s])).logits[0] for s in samples])
        attention_calls, mask_calls = [], []
        _spy(monkeypatch, AttentionInterface._global_mapping, PER_SAMPLE_IMPLEMENTATIONS[implementation], attention_calls)
        for name in ("sdpa", "eager"):
            _spy(monkeypatch, ALL_MASK_ATTENTION_FUNCTIONS._global_mapping, name, mask_calls)
        with per_sample_attention(model):
            assert model.config._attn_implementation == PER_SAMPLE_IMPLEMENTATIONS[implementation]
            per_sample = model(**forward_inputs, use_cache=False).logits[0]
    assert model.config._attn_implementation == implementation
    assert len(attention_calls) == model.config.num_hidden_layers and all(m is None for m in attention_calls)
    assert not mask_calls  # no (row x row) mask built
    torch.testing.assert_close(per_sample, dense, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(per_sample, alone, atol=1e-5, rtol=1e-5)


def _trainer(model_path, tmp_path, dataset, padding_free, trainer_class=QRPOTrainer, config_class=QRPOConfig, peft_config=None, **settings):
    args = make_args(config_class, tmp_path / f"packed-{padding_free}", padding_free=padding_free, **settings)
    return trainer_class(model=model_path, args=args, train_dataset=dataset, peft_config=peft_config)


def _loss_and_gradients(trainer, examples):
    trainer.model.train()
    trainer.model.zero_grad()
    batch = trainer._prepare_inputs(trainer.data_collator(examples))
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    gradients = {name: param.grad.clone() for name, param in trainer.model.named_parameters() if param.requires_grad}
    logps = trainer._sequence_logps(trainer.model, batch)[0].detach()
    return logps, loss.detach(), gradients


@pytest.mark.parametrize("peft_config", [None, LORA], ids=["full", "lora"])
@pytest.mark.parametrize("precompute", [True, False], ids=["precomputed", "on_the_fly"])
@pytest.mark.parametrize(
    "trainer_class,config_class,settings",
    [
        (QRPOTrainer, QRPOConfig, {}),
        (QRPOTrainer, QRPOConfig, {"normalize_beta_by_length": True, "max_length": 9}),
        (RPOTrainer, RPOConfig, {"logps_normalization": "mean", "truncation_mode": "keep_end", "max_length": 9}),
    ],
    ids=["qrpo", "qrpo-per-sample-beta", "rpo-mean"],
)
def test_packed_logps_loss_and_gradients_equal_padded(
    tiny_llama_path, varied_dataset, tmp_path, peft_config, precompute, trainer_class, config_class, settings
):
    results = []
    for padding_free in (False, True):
        trainer = _trainer(
            tiny_llama_path, tmp_path, varied_dataset, padding_free, trainer_class, config_class, peft_config,
            precompute_ref_log_probs=precompute, **settings,
        )
        if precompute:  # the reference pass packs too
            results.append(np.asarray(trainer.train_dataset["ref_logps"]))
        else:
            assert "ref_logps" not in trainer.train_dataset.column_names
        examples = list(trainer.train_dataset.select(range(6)))
        assert ("position_ids" in trainer.data_collator(examples)) == padding_free
        results.append(_loss_and_gradients(trainer, examples))
    if precompute:
        padded_ref, padded, packed_ref, packed = results
        np.testing.assert_allclose(packed_ref, padded_ref, rtol=1e-5, atol=1e-5)
        # Both equal an independent forward of each sample alone
        model = LlamaForCausalLM.from_pretrained(tiny_llama_path)
        if trainer_class is QRPOTrainer and "max_length" not in settings:
            expected = [sequence_logps(model, row["prompt_ids"], row["completion_ids"]) for row in trainer.train_dataset]
            np.testing.assert_allclose(packed_ref, expected, rtol=1e-5, atol=1e-5)
    else:
        padded, packed = results
    assert_same_loss_and_gradients(packed, padded)


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_packed_training_step_with_activation_checkpointing_equals_padded(
    tiny_llama_path, varied_dataset, tmp_path, monkeypatch, implementation
):
    """
    The training step (forward, and backward re-running the checkpointed layers) runs per-sample attention and gives
    the padded batch's loss and gradients; the model's config is its own again after the step.
    """
    results = []
    for padding_free in (False, True):
        trainer = _trainer(
            tiny_llama_path, tmp_path, varied_dataset, padding_free, gradient_checkpointing=True,
            model_init_kwargs={"attn_implementation": implementation},
        )
        calls = []
        _spy(monkeypatch, AttentionInterface._global_mapping, PER_SAMPLE_IMPLEMENTATIONS[implementation], calls)
        batch = trainer._prepare_inputs(trainer.data_collator(list(trainer.train_dataset.select(range(6)))))
        # As `train` sets up the model and the step
        trainer.model.gradient_checkpointing_enable(trainer.args.gradient_checkpointing_kwargs)
        trainer.current_gradient_accumulation_steps = 1
        trainer.model.train()
        trainer.model.zero_grad()
        loss = trainer.training_step(trainer.model, batch)
        assert trainer.model.config._attn_implementation == implementation
        num_layers = trainer.model.config.num_hidden_layers
        assert len(calls) == (2 * num_layers if padding_free else 0)  # forward, then recomputed in the backward
        gradients = {name: param.grad.clone() for name, param in trainer.model.named_parameters() if param.requires_grad}
        results.append((loss, gradients))
    (padded_loss, padded), (packed_loss, packed) = results
    torch.testing.assert_close(packed_loss, padded_loss, atol=1e-5, rtol=1e-5)
    for name in padded:
        torch.testing.assert_close(packed[name], padded[name], atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("peft_config", [None, LORA], ids=["full", "lora"])
def test_train_padding_free(tiny_llama_path, varied_dataset, tmp_path, peft_config):
    trainer = _trainer(tiny_llama_path, tmp_path, varied_dataset, True, peft_config=peft_config)
    assert trainer.padding_free and trainer.args.padding_free
    before = {name: param.clone() for name, param in trainer.model.named_parameters()}
    trainer.train()
    losses = logged(trainer)
    assert losses and all(np.isfinite(losses))
    for name, param in trainer.model.named_parameters():
        changed = not torch.equal(param, before[name])
        if peft_config is None or "lora_" in name:
            assert changed, name
        else:
            assert not changed, name  # LoRA: the base is unchanged
    # The logged token count is the packed rows' real tokens, as the padded batches' attention masks count them
    assert logged(trainer, "num_tokens")[-1] > 0


def test_padding_free_rejects_encoder_decoder(tiny_t5_path, tmp_path):
    rows = {"prompt": ["hello"], "completion": [" yes"], "reward": [1.0], "ref_rewards": [[0.0, 1.0]]}
    with pytest.raises(ValueError, match="encoder-decoder"):
        _trainer(tiny_t5_path, tmp_path, Dataset.from_dict(rows), True)


def test_padding_free_rejects_attention_that_cannot_confine(tiny_llama_path, varied_dataset, tmp_path):
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    # sdpa under a name transformers builds no mask for: causal over the whole packed row
    AttentionInterface.register("unmasked_sdpa", sdpa_attention_forward)
    with pytest.raises(ValueError, match="does not confine it"):
        _trainer(tiny_llama_path, tmp_path, varied_dataset, True, model_init_kwargs={"attn_implementation": "unmasked_sdpa"})


def test_padding_free_rejects_prompt_learning_peft(tiny_llama_path, varied_dataset, tmp_path):
    prompt_tuning = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2)
    with pytest.raises(ValueError, match="prompt-learning"):
        _trainer(tiny_llama_path, tmp_path, varied_dataset, True, peft_config=prompt_tuning)
