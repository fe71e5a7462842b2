"""DROTrainer: its gradients against the formulas, its optimum, training on Llama and T5, the value function's own
learning rate, checkpoints, packed rows and a user's value model."""

import math

import numpy as np
import pytest
import torch
import trl
from conftest import assert_loss_logged, build_tiny_reward_model, logged, make_args, pointwise_rows, sequence_logps, snapshot
from datasets import Dataset
from peft import LoraConfig
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from qrpo_trl import DROConfig, DROTrainer
from qrpo_trl.data_utils import completion_groups, prompt_groups
from qrpo_trl.dro_trainer import VALUE_MODULE, VALUE_WEIGHTS_NAME
from qrpo_trl.targets import rpo_values

import test_distributed


LORA = {
    "llama": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "t5": LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"], task_type="SEQ_2_SEQ_LM"),
}
ARCHITECTURES = pytest.mark.parametrize("architecture", ["llama", "t5"])
METRICS = ("value", "value_loss", "residual")


@pytest.fixture
def model_path(request, architecture):
    return request.getfixturevalue(f"tiny_{architecture}_path")


@pytest.fixture
def dataset():
    return Dataset.from_dict(pointwise_rows())


def assert_dro_metrics_logged(trainer):
    assert_loss_logged(trainer)
    for key in METRICS:
        values = logged(trainer, key)
        assert values and all(math.isfinite(value) for value in values), key
    # Without an MoE auxiliary loss, the value's regression loss is the loss itself
    np.testing.assert_allclose(logged(trainer, "value_loss"), logged(trainer), rtol=1e-3)


def independent_logps_and_states(trainer, batch):
    """Sequence log-probs (with gradients) and the prompt states, by plain forwards: not through the trainer's fused
    LM head nor its hook."""
    model = trainer.model
    if trainer.is_encoder_decoder:
        states = model.get_encoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        labels = batch["labels"]
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).logits
        mask = labels != -100
        token_logps = logits.log_softmax(-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        prompt_mask = batch["attention_mask"]
    else:
        states = model.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        logits = model.lm_head(states)[:, :-1]
        mask = batch["completion_mask"][:, 1:].bool()
        token_logps = logits.log_softmax(-1).gather(-1, batch["input_ids"][:, 1:].unsqueeze(-1)).squeeze(-1)
        prompt_mask = batch["attention_mask"] * (1 - batch["completion_mask"])
    logps = (token_logps * mask).sum(dim=1)
    pooled = (states * prompt_mask.unsqueeze(-1)).sum(dim=1) / prompt_mask.sum(dim=1, keepdim=True)
    return logps, pooled


@ARCHITECTURES
def test_gradients_equal_the_formulas(model_path, dataset, tmp_path):
    """The policy's gradient is that of 0.5 * mean((r - sg V - tau * log-ratio)^2), i.e. tau times that of the
    paper's -(logp * (r - sg V) - tau/2 * log-ratio^2); the value's is that of its regression onto
    r - tau * sg(log-ratio); none of the value's reaches the policy."""
    tau = 0.7
    args = make_args(DROConfig, tmp_path, beta=tau, per_device_train_batch_size=len(dataset), max_steps=2, learning_rate=0.01)
    trainer = DROTrainer(model=model_path, args=args, train_dataset=dataset)
    trainer.train()  # two steps, so that the policy and the value have moved from the reference and from 0
    model = trainer.model
    model.zero_grad()
    batch = next(iter(trainer.get_train_dataloader()))
    loss = trainer.compute_loss(model, batch)
    loss.backward()
    computed = {name: param.grad.clone() for name, param in model.named_parameters()}

    logps, pooled = independent_logps_and_states(trainer, batch)
    values = trainer.value_model(pooled.detach())
    log_ratios = logps - batch["ref_logps"]
    rewards = batch["target"]
    residuals = rewards - values - tau * log_ratios
    assert loss.item() == pytest.approx(0.5 * residuals.pow(2).mean().item(), rel=1e-5)
    assert residuals.abs().max() > 0.1  # away from the optimum, so the gradients are not all 0

    policy = {name: param for name, param in model.named_parameters() if not name.startswith(VALUE_MODULE)}
    value = {name: param for name, param in model.named_parameters() if name.startswith(VALUE_MODULE)}
    assert policy and value
    batch_size = len(rewards)
    squared_with_v_stopped = 0.5 * (rewards - values.detach() - tau * log_ratios).pow(2).mean()
    paper_policy_loss = -(logps * (rewards - values.detach()) - tau / 2 * log_ratios.pow(2)).mean()
    value_regression = 0.5 * (rewards - tau * log_ratios.detach() - values).pow(2).mean()
    for expected_loss, params, factor in [
        (squared_with_v_stopped, policy, 1.0),
        (paper_policy_loss, policy, tau),
        (value_regression, value, 1.0),
    ]:
        expected = torch.autograd.grad(expected_loss, list(params.values()), retain_graph=True, allow_unused=True)
        for (name, param), gradient in zip(params.items(), expected, strict=True):
            gradient = torch.zeros_like(param) if gradient is None else gradient
            expected_gradient = factor * gradient
            # float32: entries far below the tensor's scale carry its rounding
            atol = 1e-5 * expected_gradient.abs().max().item()
            torch.testing.assert_close(computed[name], expected_gradient, rtol=1e-4, atol=atol, msg=lambda m: f"{name} (x{factor}): {m}")
    # By hand: the value head's gradient is -(1/B) * sum_i residual_i * dV_i
    manual = torch.autograd.grad(-(residuals.detach() * values).sum() / batch_size, list(value.values()))
    for (name, _), gradient in zip(value.items(), manual, strict=True):
        torch.testing.assert_close(computed[name], gradient, rtol=1e-4, atol=1e-7, msg=name)


def test_training_reaches_the_optimum(tiny_llama_path, tmp_path):
    """Within a prompt, log-ratio differences reach (r_i - r_j) / tau, the residual goes to 0, and V(x) ends at or
    above RPO's value tau * log sum_j pi_ref(y_j|x) exp(r_j / tau) (the observed completions' probabilities sum to at
    most 1)."""
    tau = 1.0
    rows = {
        "prompt": ["what is the sky"] * 3 + ["hello"] * 3,
        "completion": [" blue", " green grass", " no", " hi", " yes it is good", " maybe red"],
        "reward": [0.5, -0.3, 0.1, 1.0, 0.2, -0.5],
    }
    args = make_args(
        DROConfig, tmp_path, beta=tau, per_device_train_batch_size=6, max_steps=300, learning_rate=1e-2,
        lr_scheduler_type="constant", logging_steps=10,
    )
    trainer = DROTrainer(model=tiny_llama_path, args=args, train_dataset=Dataset.from_dict(rows))
    trainer.train()
    assert logged(trainer, "residual")[-1] < 0.02

    prepared = trainer.train_dataset
    reference = AutoModelForCausalLM.from_pretrained(tiny_llama_path)
    pairs = list(zip(prepared["prompt_ids"], prepared["completion_ids"], strict=True))
    log_ratios = np.array([sequence_logps(trainer.model, *pair) - sequence_logps(reference, *pair) for pair in pairs])
    ref_logps = np.array(prepared["ref_logps"])
    rewards = np.array(prepared["reward"])
    groups = prompt_groups(prepared)
    for group in range(groups.max() + 1):
        rows_of = np.flatnonzero(groups == group)
        for i in rows_of:
            for j in rows_of:
                assert abs((log_ratios[i] - log_ratios[j]) - (rewards[i] - rewards[j]) / tau) < 0.1

    # The learned V(x), by the head on an independent forward's mean-pooled prompt states
    with torch.no_grad():
        states = [trainer.model.get_decoder()(input_ids=torch.tensor([prompt])).last_hidden_state[0].mean(0) for prompt, _ in pairs]
        values = trainer.value_model(torch.stack(states)).double().numpy()
    np.testing.assert_allclose(log_ratios, (rewards - values) / tau, atol=0.05)  # residual 0, sample by sample
    rpo = rpo_values(groups, rewards, ref_logps, tau, "ref_weighted", completions=completion_groups(prepared, groups))
    assert (values >= rpo - 0.05).all(), (values, rpo)


@ARCHITECTURES
def test_train_changes_every_parameter(model_path, dataset, tmp_path):
    trainer = DROTrainer(model=model_path, args=make_args(DROConfig, tmp_path), train_dataset=dataset)
    assert isinstance(trainer, trl.DPOTrainer)
    assert trainer.ref_model is None
    before = snapshot(trainer.model)
    assert any(name.startswith(VALUE_MODULE) for name in before)
    trainer.train()
    assert_dro_metrics_logged(trainer)
    for name, param in trainer.model.named_parameters():
        assert not torch.equal(param, before[name]), f"{name} did not change"


@ARCHITECTURES
def test_train_lora_changes_only_adapters_and_value(model_path, architecture, dataset, tmp_path):
    args = make_args(DROConfig, tmp_path, value_head="linear")
    trainer = DROTrainer(model=model_path, args=args, train_dataset=dataset, peft_config=LORA[architecture])
    before = snapshot(trainer.model)
    trainer.train()
    assert_dro_metrics_logged(trainer)
    for name, param in trainer.model.named_parameters():
        if "lora_" in name or name.startswith(VALUE_MODULE):
            assert not torch.equal(param, before[name]), f"{name} did not change"
        else:
            assert torch.equal(param, before[name]), f"base parameter {name} changed"


def test_value_learning_rate_is_its_own(tiny_llama_path, dataset, tmp_path):
    args = make_args(DROConfig, tmp_path, learning_rate=0.1, value_learning_rate=0.0, lr_scheduler_type="constant")
    trainer = DROTrainer(model=tiny_llama_path, args=args, train_dataset=dataset)
    before = snapshot(trainer.value_model)
    trainer.train()
    assert [group["lr"] for group in trainer.optimizer.param_groups] == [0.1, 0.1, 0.0]
    for name, param in trainer.value_model.named_parameters():
        assert torch.equal(param, before[name]), f"value parameter {name} changed at learning rate 0"
    assert logged(trainer, "value")[0] != 0.0


@pytest.mark.parametrize("peft_config", [None, LORA["llama"]], ids=["full", "lora"])
def test_resume_gives_the_same_losses(tiny_llama_path, dataset, tmp_path, peft_config):
    """The value function is saved with each checkpoint (in its own file, not in the policy's) and restored."""
    settings = dict(max_steps=6, learning_rate=0.01, save_strategy="steps", save_steps=3)
    args = make_args(DROConfig, tmp_path / "first", **settings)
    first = DROTrainer(model=tiny_llama_path, args=args, train_dataset=dataset, peft_config=peft_config)
    first.train()
    checkpoint = tmp_path / "first" / "checkpoint-3"
    value_state = load_file(checkpoint / VALUE_WEIGHTS_NAME)
    assert value_state.keys() == first.value_model.state_dict().keys()
    if peft_config is None:
        assert not any(VALUE_MODULE in key for key in load_file(checkpoint / "model.safetensors"))
    first.create_model_card()
    card = (tmp_path / "first" / "README.md").read_text()
    assert "2405.19107" in card and "## Value function" in card and VALUE_WEIGHTS_NAME in card

    args = make_args(DROConfig, tmp_path / "resumed", **settings)
    resumed = DROTrainer(model=tiny_llama_path, args=args, train_dataset=dataset, peft_config=peft_config)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    for key in ("loss", *METRICS):
        np.testing.assert_allclose(logged(resumed, key)[-3:], logged(first, key)[3:], rtol=1e-5, err_msg=key)
    for name, param in first.value_model.state_dict().items():
        torch.testing.assert_close(resumed.value_model.state_dict()[name], param)


def test_padding_free_matches_padded(tiny_llama_path, dataset, tmp_path):
    """Packed rows: each sample's prompt states are pooled from its own segment, so the value and the loss are those
    of padded batches."""
    logs = []
    for pooling in ("mean", "last"):
        for padding_free in (False, True):
            args = make_args(
                DROConfig, tmp_path / f"{pooling}{padding_free}", padding_free=padding_free, value_pooling=pooling,
                learning_rate=0.01,
            )
            trainer = DROTrainer(model=tiny_llama_path, args=args, train_dataset=dataset)
            trainer.train()
            logs.append({key: logged(trainer, key) for key in ("loss", *METRICS)})
    for padded, packed in (logs[:2], logs[2:]):
        for key in padded:
            # float32 rounding of the packed and padded attention, carried through 3 steps
            np.testing.assert_allclose(packed[key], padded[key], rtol=1e-3, atol=1e-5, err_msg=key)
    assert logs[0]["value"] != logs[2]["value"]  # the two poolings differ


def test_user_value_model(tiny_llama_path, tokenizer, dataset, tmp_path):
    value_model = build_tiny_reward_model(tokenizer)
    before = snapshot(value_model)
    args = make_args(DROConfig, tmp_path, save_strategy="steps", save_steps=3)
    trainer = DROTrainer(model=tiny_llama_path, args=args, train_dataset=dataset, value_model=value_model)
    assert trainer.value_model is value_model
    trainer.train()
    assert_dro_metrics_logged(trainer)
    for name, param in value_model.named_parameters():
        assert not torch.equal(param, before[name]), f"value model parameter {name} did not change"
    assert load_file(tmp_path / "checkpoint-3" / VALUE_WEIGHTS_NAME).keys() == value_model.state_dict().keys()


def test_streamed_dataset_trains_as_the_map_style_one(tiny_llama_path, dataset, tmp_path):
    """DRO's target needs no statistics of a prompt's completions: it streams, with the same losses."""
    logs = []
    for kind, train_dataset in (("map", dataset), ("stream", dataset.to_iterable_dataset())):
        args = make_args(
            DROConfig, tmp_path / kind, precompute_ref_log_probs=False, train_sampling_strategy="sequential"
        )
        trainer = DROTrainer(model=tiny_llama_path, args=args, train_dataset=train_dataset)
        trainer.train()
        assert_dro_metrics_logged(trainer)
        logs.append({key: logged(trainer, key) for key in ("loss", *METRICS)})
    for key in logs[0]:
        np.testing.assert_allclose(logs[1][key], logs[0][key], rtol=1e-5, err_msg=key)


def test_bad_settings(tiny_llama_path, tokenizer, dataset, tmp_path):
    with pytest.raises(ValueError, match="regression_loss='mse'"):
        make_args(DROConfig, tmp_path, regression_loss="mae")
    with pytest.raises(ValueError, match="`value_head` shape the value head"):
        args = make_args(DROConfig, tmp_path, value_head="linear")
        DROTrainer(model=tiny_llama_path, args=args, train_dataset=dataset, value_model=build_tiny_reward_model(tokenizer))
    with pytest.raises(ValueError, match="normalize_rewards=True"):
        args = make_args(DROConfig, tmp_path, normalize_rewards=True, precompute_ref_log_probs=False)
        DROTrainer(model=tiny_llama_path, args=args, train_dataset=dataset.to_iterable_dataset())


@pytest.mark.slow
def test_two_processes_match_one(tiny_llama_path, tmp_path, monkeypatch):
    """DDP over 2 CPU processes (as tests/test_distributed.py launches them) against one process with the same global
    batch: the value head starts equal on both ranks and its gradients are synchronised with the policy's, so every
    logged figure, the value's included, is the one process's."""
    monkeypatch.setitem(test_distributed.JOBS, "dro", ["dro", "--value_learning_rate", "0.05"])
    workspace = test_distributed.Workspace(tmp_path, tiny_llama_path)
    (one,) = workspace.train("one", ["dro"], test_distributed.GLOBAL_BATCH)
    launch = ["--config_file", str(test_distributed.ROOT / "configs" / "accelerate" / "ddp.yaml"), "--num_processes", "2"]
    launch += ["--mixed_precision", "no", "--main_process_port", str(test_distributed.free_port())]
    ranks = workspace.train("ddp", ["dro"], test_distributed.GLOBAL_BATCH // 2, launch)
    assert len(ranks) == 2
    expected = one["dro"]["log"]
    assert {"loss", *METRICS} <= expected.keys() and len(expected["loss"]) == 6
    for rank in ranks:
        log = rank["dro"]["log"]
        assert rank["dro"]["num_processes"] == 2 and log.keys() == expected.keys()
        for key in expected:
            np.testing.assert_allclose(log[key], expected[key], rtol=1e-4, atol=1e-6, err_msg=key)
