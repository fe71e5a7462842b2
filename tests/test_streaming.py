"""
Streaming datasets (`IterableDataset`), as DPOTrainer takes them: QRPO trains and evaluates on them with
`precompute_ref_log_probs=False` (targets per batch of rows, reference log-probs per training batch); what cannot stream
is a ValueError saying why.
"""

import math

import numpy as np
import pytest
import torch
from conftest import assert_loss_logged, assert_trained, logged, make_args, pointwise_rows, snapshot
from datasets import Dataset, DatasetDict, IterableDatasetDict
from peft import LoraConfig
from transformers import AutoModelForCausalLM

from qrpo_trl import QRPOConfig, QRPOTrainer, RPOConfig, RPOTrainer


@pytest.fixture
def rows():
    return pointwise_rows()


def streamed(rows):
    return Dataset.from_dict(rows).to_iterable_dataset()


@pytest.mark.parametrize("settings", [{}, {"exclude_self_from_ref": True, "transform": "log", "partition": "finite_n"}])
def test_streamed_targets_and_losses_equal_the_map_style_ones(tiny_llama_path, tmp_path, rows, settings):
    if settings.get("exclude_self_from_ref"):
        rows["ref_rewards"] = [refs + [reward] for refs, reward in zip(rows["ref_rewards"], rows["reward"])]
    trainers = []
    for kind, dataset in (("map", Dataset.from_dict(rows)), ("stream", streamed(rows))):
        args = make_args(
            QRPOConfig, tmp_path / kind, precompute_ref_log_probs=False, train_sampling_strategy="sequential", **settings
        )
        trainer = QRPOTrainer(model=tiny_llama_path, args=args, train_dataset=dataset)
        before = snapshot(trainer.model)
        trainer.train()
        assert_loss_logged(trainer)
        assert_trained(trainer.model, before)
        trainers.append(trainer)
    prepared, stream = trainers[0].train_dataset, list(trainers[1].train_dataset)
    for column in ("prompt_ids", "completion_ids"):
        assert prepared[column] == [row[column] for row in stream]
    for column in ("target", "quantile"):
        np.testing.assert_allclose(prepared[column], [row[column] for row in stream], rtol=1e-12)
    # Same rows in the same order, the reference computed per batch in both: the same losses
    np.testing.assert_allclose(logged(trainers[0]), logged(trainers[1]), rtol=1e-5)


def test_streamed_paired_conversations(tiny_llama_path, tmp_path, tokenizer):
    user = lambda text: [{"role": "user", "content": text}]  # noqa: E731
    assistant = lambda text: [{"role": "assistant", "content": text}]  # noqa: E731
    rows = {
        "chosen": [user("hello") + assistant("hi"), user("what is the sky") + assistant("blue")] * 2,
        "rejected": [user("hello") + assistant("no"), user("what is the sky") + assistant("red")] * 2,
        "chosen_reward": [1.0, 0.5, 0.2, 0.9],
        "rejected_reward": [0.0, -1.0, 0.1, 0.3],
        "ref_rewards": [[0.0, 0.5, 2.0]] * 4,
    }
    args = make_args(QRPOConfig, tmp_path, precompute_ref_log_probs=False)
    trainer = QRPOTrainer(model=tiny_llama_path, args=args, train_dataset=streamed(rows))
    prepared = list(trainer.train_dataset)
    assert len(prepared) == 8 and prepared[0]["prompt"] == user("hello")
    assert [tokenizer.decode(row["completion_ids"]) for row in prepared[:2]] == ["hi </s>", "no </s>"]
    np.testing.assert_allclose([row["quantile"] for row in prepared[:4]], [2 / 3, 1 / 3, 2 / 3, 0])
    trainer.train()
    assert_loss_logged(trainer)


def test_streamed_reference_is_ref_model_or_disabled_adapters(tiny_llama_path, tmp_path, rows):
    ref_model = AutoModelForCausalLM.from_pretrained(tiny_llama_path)
    ref_before = snapshot(ref_model)
    args = make_args(QRPOConfig, tmp_path / "ref", precompute_ref_log_probs=False)
    trainer = QRPOTrainer(model=tiny_llama_path, ref_model=ref_model, args=args, train_dataset=streamed(rows))
    trainer.train()
    assert_loss_logged(trainer)
    assert all(torch.equal(param, ref_before[name]) for name, param in ref_model.named_parameters())

    args = make_args(QRPOConfig, tmp_path / "lora", precompute_ref_log_probs=False)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    trainer = QRPOTrainer(model=tiny_llama_path, args=args, train_dataset=streamed(rows), peft_config=lora)
    before = snapshot(trainer.model)
    trainer.train()
    assert_loss_logged(trainer)
    assert logged(trainer, "log_ratio")[0] == 0.0  # the first step: policy == reference (adapters disabled)
    assert_trained(trainer.model, before)


@pytest.mark.parametrize("precompute", [False, True], ids=["on_the_fly", "precompute"])
@pytest.mark.parametrize("eval_kind", ["iterable_dataset", "iterable_dataset_dict", "dict_of_iterable_dataset", "dataset_dict"])
def test_evaluate_with_eval_dataset(tiny_llama_path, tmp_path, rows, eval_kind, precompute):
    # DPOTrainer's scenario (a dict of map-style datasets is in test_trainers.py): `evaluate` takes a raw streamed
    # dataset, a dict of them, an IterableDatasetDict (precompute off) or a DatasetDict
    args = make_args(QRPOConfig, tmp_path, precompute_ref_log_probs=precompute)
    trainer = QRPOTrainer(model=tiny_llama_path, args=args, train_dataset=Dataset.from_dict(rows))
    split = streamed(rows) if "iterable" in eval_kind else Dataset.from_dict(rows)
    if eval_kind == "iterable_dataset":
        eval_dataset = split
    elif eval_kind.endswith("dataset_dict"):
        eval_dataset = (IterableDatasetDict if "iterable" in eval_kind else DatasetDict)({"data1": split, "data2": split})
    else:
        eval_dataset = {"data1": split, "data2": split}
    if precompute and "iterable" in eval_kind:
        with pytest.raises(ValueError, match="precompute_ref_log_probs.*not supported with IterableDataset"):
            trainer.evaluate(eval_dataset=eval_dataset)
        return
    metrics = trainer.evaluate(eval_dataset=eval_dataset)
    keys = ["eval_loss"] if eval_kind == "iterable_dataset" else ["eval_data1_loss", "eval_data2_loss"]
    assert all(math.isfinite(metrics[key]) for key in keys)
    assert math.isfinite(metrics["eval_quantile"])


@pytest.mark.parametrize("iterable_as", ["train", "eval", "eval_dict", "eval_iterable_dataset_dict"])
def test_precompute_ref_log_probs_raises_for_iterable_dataset(tiny_llama_path, tmp_path, rows, iterable_as):
    train_dataset, eval_dataset = Dataset.from_dict(rows), None
    if iterable_as == "train":
        train_dataset = streamed(rows)
    elif iterable_as == "eval":
        eval_dataset = streamed(rows)
    elif iterable_as == "eval_dict":
        eval_dataset = {"eval": streamed(rows)}
    else:
        eval_dataset = IterableDatasetDict({"eval": streamed(rows)})
    args = make_args(QRPOConfig, tmp_path, precompute_ref_log_probs=True)
    with pytest.raises(ValueError, match="precompute_ref_log_probs.*not supported with IterableDataset"):
        QRPOTrainer(model=tiny_llama_path, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset)


def test_what_cannot_stream_says_why(tiny_llama_path, tmp_path, rows):
    def build(trainer_class, config_class, dataset, **settings):
        args = make_args(config_class, tmp_path, precompute_ref_log_probs=False, **settings)
        return trainer_class(model=tiny_llama_path, args=args, train_dataset=dataset, **settings.pop("trainer", {}))

    with pytest.raises(ValueError, match=r"RPOTrainer cannot stream the train dataset.*V\(x\), a sum over every completion"):
        build(RPOTrainer, RPOConfig, streamed(rows))
    with pytest.raises(ValueError, match="scaled_normal_icdf' cannot stream the train dataset: its scale sigma_x"):
        build(QRPOTrainer, QRPOConfig, streamed(rows), transform="scaled_normal_icdf")
    no_refs = {key: values for key, values in rows.items() if key != "ref_rewards"}
    args = make_args(QRPOConfig, tmp_path, precompute_ref_log_probs=False)
    with pytest.raises(ValueError, match="the reference stage \\(`reward_funcs`\\) cannot stream"):
        QRPOTrainer(
            model=tiny_llama_path, args=args, train_dataset=streamed(no_refs), reward_funcs=lambda completions, **_: [0.0] * len(completions)
        )
    # A wrong format fails at once, from the first row
    with pytest.raises(ValueError, match="match none of the accepted formats"):
        build(QRPOTrainer, QRPOConfig, streamed(no_refs))


def test_bad_row_of_a_stream_is_named(tiny_llama_path, tmp_path, rows):
    rows["reward"][6] = float("nan")
    args = make_args(QRPOConfig, tmp_path, precompute_ref_log_probs=False)
    trainer = QRPOTrainer(model=tiny_llama_path, args=args, train_dataset=streamed(rows))
    with pytest.raises(ValueError, match=r"In rows 0 to 11 of the streamed train dataset .*Column 'reward' of the train dataset, row 6: expected a finite number, got nan"):
        trainer.train()
