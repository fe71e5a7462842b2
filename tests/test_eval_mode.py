"""Every pass that puts a model in eval mode gives each module its training flag back, also when the pass raises."""

import pytest
from conftest import build_tiny_llama, build_tiny_reward_model, make_args, pointwise_rows
from datasets import Dataset

from qrpo_trl import QRPOConfig, QRPOTrainer, ReferenceConfig
from qrpo_trl.demo.evaluation import kl_to_reference
from qrpo_trl.reference_stage import RewardFunctions, generate_completions


class Interrupted(Exception):
    pass


def training_model(tokenizer, build=build_tiny_llama):
    """A model in training mode, but for one module that its owner froze in eval mode."""
    model = build(tokenizer).train()
    model.model.embed_tokens.eval()
    return model


def flags(model):
    return {name: module.training for name, module in model.named_modules()}


def raise_in(model, method: str, seen: list):
    """Make `model.<method>` record whether the model is in eval mode, then raise."""

    def interrupted(*args, **kwargs):
        seen.append(model.training)
        raise Interrupted

    setattr(model, method, interrupted)


def test_sampling(tokenizer):
    model, seen = training_model(tokenizer), []
    before = flags(model)
    raise_in(model, "generate", seen)
    with pytest.raises(Interrupted):
        generate_completions(model, tokenizer, [[2, 7, 8]], [0], ReferenceConfig(max_completion_length=4))
    assert seen == [False] and flags(model) == before


def test_reward_model(tokenizer):
    reward_model, seen = training_model(tokenizer, build_tiny_reward_model), []
    before = flags(reward_model)
    raise_in(reward_model, "forward", seen)
    rewards = RewardFunctions(reward_model, tokenizer)
    with pytest.raises(Interrupted):
        rewards(["hi"], [" yes"], [[3]], {}, [0], "train", batch_size=2)
    assert seen == [False] and flags(reward_model) == before


def test_reference_log_prob_pass(tokenizer, tmp_path, monkeypatch):
    model, seen = training_model(tokenizer), []
    before = flags(model)

    def interrupted(self, model, inputs):
        seen.append(model.training)
        raise Interrupted

    monkeypatch.setattr(QRPOTrainer, "compute_ref_log_probs", interrupted)
    with pytest.raises(Interrupted):
        QRPOTrainer(model=model, args=make_args(QRPOConfig, tmp_path), train_dataset=Dataset.from_dict(pointwise_rows()), processing_class=tokenizer)
    assert seen == [False] and flags(model) == before


def test_padding_free_probe_in_the_trainer_init(tokenizer, tmp_path, monkeypatch):
    model, seen = training_model(tokenizer), []
    before = flags(model)

    def interrupted(self, model, inputs, output_router_logits=False):
        seen.append(model.training)
        raise Interrupted

    monkeypatch.setattr(QRPOTrainer, "_sequence_logps", interrupted)
    args = make_args(QRPOConfig, tmp_path, padding_free=True)
    with pytest.raises(Interrupted):
        QRPOTrainer(model=model, args=args, train_dataset=Dataset.from_dict(pointwise_rows()), processing_class=tokenizer)
    assert seen == [False] and flags(model) == before


def test_demo_kl_to_reference(tokenizer):
    model, seen = training_model(tokenizer), []
    before = flags(model)
    raise_in(model, "forward", seen)
    samples = Dataset.from_dict({"prompt_ids": [[2, 7]], "completion_ids": [[8, 3]]})
    with pytest.raises(Interrupted):
        kl_to_reference(model, samples, pad_token_id=tokenizer.pad_token_id)
    assert seen == [False] and flags(model) == before
