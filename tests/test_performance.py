"""What the speed-ups must not change: batches, values and their order, samples seen per epoch. No timed assertions."""

import importlib.util
import json
import os
import statistics
from unittest import mock

import numpy as np
import pytest
import torch
from conftest import logged, make_args, sequence_logps, varied_pointwise_dataset
from peft import LoraConfig
from trl.kernels import ChunkedLogProbFunction
from trl.trainer.dpo_trainer import DataCollatorForPreference

from qrpo_trl import DataCollatorForPointwise, QRPOConfig, QRPOTrainer
from qrpo_trl.kernels.fused_lm_head import _InferenceLogProbs


BENCHMARK = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "benchmark.py")


@pytest.fixture
def varied_dataset():
    """
    Pointwise text rows whose prompts and completions vary from 1 to ~20 words, in no particular length order. 32 rows,
    so that transformers' `group_by_length`, which sorts mega-batches of `len // (4 * batch_size)` batches, regroups.
    """
    return varied_pointwise_dataset(32, 8, 20)


@pytest.mark.parametrize("max_length", [None, 6])
@pytest.mark.parametrize("truncation_mode", ["keep_start", "keep_end"])
@pytest.mark.parametrize("pad_to_multiple_of", [None, 4])
def test_collator_builds_dpo_collator_batches(max_length, truncation_mode, pad_to_multiple_of):
    """Decoder-only batches equal TRL's DataCollatorForPreference's, whose batch is the chosen then the rejected rows."""
    rng = np.random.default_rng(1)
    pairs = [
        {key: rng.integers(3, 50, size=int(rng.integers(low, 9))).tolist() for key, low in (("prompt_ids", 1), ("chosen_ids", 1), ("rejected_ids", 1))}
        for _ in range(5)
    ]
    settings = dict(pad_token_id=0, max_length=max_length, truncation_mode=truncation_mode, pad_to_multiple_of=pad_to_multiple_of)
    expected = DataCollatorForPreference(**settings)(pairs)
    pointwise = [{"prompt_ids": p["prompt_ids"], "completion_ids": p[key], "target": 1.0} for key in ("chosen_ids", "rejected_ids") for p in pairs]
    batch = DataCollatorForPointwise(**settings)(pointwise)
    assert set(batch) == {"input_ids", "attention_mask", "completion_mask", "target"}
    for key in ("input_ids", "attention_mask", "completion_mask"):
        assert batch[key].dtype == torch.long
        assert batch[key].tolist() == expected[key].tolist(), key


def test_reference_pass_is_length_grouped_and_in_dataset_order(tiny_llama_path, varied_dataset, tmp_path):
    trainer = QRPOTrainer(
        model=tiny_llama_path, args=make_args(QRPOConfig, tmp_path, precompute_ref_batch_size=4), train_dataset=varied_dataset
    )
    prepared = trainer.train_dataset
    lengths = [len(row["prompt_ids"]) + len(row["completion_ids"]) for row in prepared]
    assert lengths != sorted(lengths, reverse=True)  # the dataset is not already in length order

    # Values in dataset order: each sample alone (no padding) through an independent forward
    reference = trainer.model  # not trained yet: still the reference
    expected = [sequence_logps(reference, row["prompt_ids"], row["completion_ids"]) for row in prepared]
    np.testing.assert_allclose(prepared["ref_logps"], expected, rtol=1e-5)

    # The batches it builds: longest first, and less padding than batches in dataset order
    widths, padded = [], []
    compute_ref_log_probs = trainer.compute_ref_log_probs

    def recording(model, inputs):
        widths.append(inputs["input_ids"].size(1))
        padded.append(int((inputs["attention_mask"] == 0).sum()))
        return compute_ref_log_probs(model, inputs)

    trainer.compute_ref_log_probs = recording
    again = trainer._reference_logps(prepared, "train", 4)
    np.testing.assert_array_equal(again, prepared["ref_logps"])
    assert widths == sorted(widths, reverse=True)
    in_order = [trainer.data_collator(list(prepared.select(range(i, min(i + 4, len(prepared)))))) for i in range(0, len(prepared), 4)]
    assert sum(padded) < sum(int((batch["attention_mask"] == 0).sum()) for batch in in_order)


@pytest.mark.parametrize("strategy", ["group_by_length", "batch_rebalance"])
def test_length_grouped_training_sees_every_sample_once_per_epoch(tiny_llama_path, varied_dataset, tmp_path, strategy):
    args = make_args(QRPOConfig, tmp_path, train_sampling_strategy=strategy, max_steps=-1, num_train_epochs=1)
    trainer = QRPOTrainer(model=tiny_llama_path, args=args, train_dataset=varied_dataset)
    batches = list(trainer.get_train_dataloader())
    # The reference log-probs identify the samples (all distinct)
    seen = sorted(value for batch in batches for value in batch["ref_logps"].tolist())
    np.testing.assert_allclose(seen, sorted(trainer.train_dataset["ref_logps"]), rtol=1e-6)
    trainer.train()
    # Every token of the epoch was counted once
    total = sum(len(row["prompt_ids"]) + len(row["completion_ids"]) for row in trainer.train_dataset)
    assert logged(trainer, "num_tokens")[-1] == total


def test_group_by_length_pads_less_than_random_batches(tiny_llama_path, varied_dataset, tmp_path):
    def padding(strategy):
        args = make_args(QRPOConfig, tmp_path / strategy, train_sampling_strategy=strategy)
        trainer = QRPOTrainer(model=tiny_llama_path, args=args, train_dataset=varied_dataset)
        return sum(int((batch["attention_mask"] == 0).sum()) for batch in trainer.get_train_dataloader())

    assert padding("group_by_length") < padding("random")


@pytest.mark.parametrize("peft_config", [None, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])], ids=["full", "lora"])
def test_fused_lm_head_computes_only_log_probs(tiny_llama_path, varied_dataset, tmp_path, peft_config):
    trainer = QRPOTrainer(model=tiny_llama_path, args=make_args(QRPOConfig, tmp_path), train_dataset=varied_dataset, peft_config=peft_config)
    batch = trainer.data_collator(list(trainer.train_dataset.select(range(4))))
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    outputs = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels, fused_lm_head=True)
    assert outputs.log_probs is not None
    assert outputs.entropy is None and outputs.mean_logits is None and outputs.is_top1 is None
    # A plain forward still reaches the model's own
    assert trainer.model(input_ids=batch["input_ids"]).logits.shape[-1] == trainer.model.config.vocab_size


@pytest.mark.parametrize(
    "bias,temperature,softcap,logit_scale", [(False, 1.0, None, 1.0), (True, 0.7, 5.0, 0.5)], ids=["plain", "scaled"]
)
def test_inference_log_probs_equal_trl_chunked_function(bias, temperature, softcap, logit_scale):
    """
    The reference pass's fused LM head (`_InferenceLogProbs`, no autograd, no Triton) gives TRL's log-probs, with the
    model's logit scaling, softcapping and temperature, over several row chunks; with autograd it is TRL's function.
    """
    generator = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(37, 8, generator=generator), torch.randn(50, 8, generator=generator)
    arguments = (
        hidden, weight, torch.randn(50, generator=generator) if bias else None,
        torch.randint(0, 50, (37,), generator=generator), temperature, 8, softcap, logit_scale, ("log_probs",),
    )
    expected = ChunkedLogProbFunction.apply(*arguments)[0]
    with torch.no_grad(), mock.patch("qrpo_trl.kernels.fused_lm_head.TOKEN_CHUNK_SIZE", 64):  # 64 * 8 // 50: 10 rows a chunk
        log_probs, *others = _InferenceLogProbs.apply(*arguments)
    assert others == [None] * 4
    torch.testing.assert_close(log_probs, expected, atol=1e-6, rtol=1e-6)
    weight.requires_grad_(True)
    assert _InferenceLogProbs.apply(*arguments[:1], weight, *arguments[2:])[0].grad_fn is not None


def load_benchmark():
    spec = importlib.util.spec_from_file_location("benchmark", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_padding_waste_counts_padded_positions():
    benchmark = load_benchmark()
    batches = [{"attention_mask": torch.tensor([[1, 1, 0], [1, 1, 1]])}, {"attention_mask": torch.tensor([[1, 0, 0, 0]])}]
    assert benchmark.padding_waste(batches) == pytest.approx(4 / 10)
    packed = DataCollatorForPointwise(pad_token_id=0, padding_free=True, pad_to_multiple_of=8)(
        [{"prompt_ids": [1, 2], "completion_ids": [3]}, {"prompt_ids": [4], "completion_ids": [5, 6]}]
    )
    assert benchmark.padding_waste([packed]) == pytest.approx(2 / 8)


def sample_lengths(benchmark, args) -> list[int]:
    """
    Tokens of each pointwise sample of the benchmark's dataset, counted from its words (its tokenizer has one token per
    word, BOS prepended, EOS appended to completions), in dataset order: chosen then rejected per pair; a sample whose
    prompt alone has `max_length` tokens or more dropped, the others truncated to `max_length`.
    """
    lengths = []
    for row in benchmark.build_dataset(args):
        prompt = 1 + len(row["prompt"].split())
        if prompt < args.max_length:
            lengths += [min(prompt + len(row[key].split()) + 1, args.max_length) for key in ("chosen", "rejected")]
    return lengths


def padding_of_batches(lengths: list[int], batch_size: int) -> float:
    """Padding fraction of right-padded batches of `batch_size` consecutive samples of these lengths."""
    batches = [lengths[start : start + batch_size] for start in range(0, len(lengths), batch_size)]
    return 1 - sum(lengths) / sum(len(batch) * max(batch) for batch in batches)


@pytest.mark.slow
def test_benchmark_quick_run_measures_what_it_says(tmp_path):
    """The benchmark's counts against counts made here from its dataset's words, and its ratios from its timings."""
    benchmark = load_benchmark()
    results = benchmark.main(["--quick", "--output", str(tmp_path / "benchmark.json")])
    assert json.loads((tmp_path / "benchmark.json").read_text()) == json.loads(json.dumps(results))
    args = benchmark.BenchmarkArguments(**results["config"])
    lengths = sample_lengths(benchmark, args)
    training, reference = results["training"]["contenders"], results["reference_pass"]["contenders"]
    assert training["num_completions"] == reference["num_completions"] == len(lengths)
    assert training["tokens"] == reference["tokens"] == sum(lengths) and training["same_tokens_as_dpo"]
    # Padding: batches in dataset order, and the reference pass's batches of samples sorted longest first
    waste = results["padding_waste"]
    assert waste["reference pass, dataset order"] == pytest.approx(padding_of_batches(lengths, args.batch_size))
    assert waste["reference pass"] == pytest.approx(padding_of_batches(sorted(lengths, reverse=True), args.batch_size))
    assert waste["training: QRPO, padding_free"] == waste["reference pass, padding_free"] == 0
    # Each ratio is the ratio of the medians of the timings it names: QRPO's training time over DPO's
    for name, value in results["training"]["ratios"].items():
        qrpo, dpo = name.split(" / ")
        expected = statistics.median(training[qrpo]["seconds"]) / statistics.median(training[dpo]["seconds"])
        assert value["ratio"] == pytest.approx(expected)
    assert set(results["training"]["ratios"]) == {
        f"{q} / {d}"
        for q in ("QRPO", "QRPO, group_by_length", "QRPO, padding_free")
        for d in ("DPO, precomputed reference", "DPO, reference model")
    }
    memory = results["memory"]["contenders"]
    for name, value in results["memory"]["ratios"].items():
        qrpo, other = name.split(" / ")
        assert value["ratio"] == pytest.approx(memory[qrpo]["peak_bytes"] / memory[other]["peak_bytes"])
    # Sharing prompts: each ratio from its timings' medians, and fewer positions computed than the samples' tokens
    shared = results["shared_prompts"]["ratios"]
    assert {name for name in shared if "positions" not in name} == {
        "2 per prompt: QRPO, share_prompt / QRPO, padding_free",
        "2 per prompt: QRPO, share_prompt / DPO, precomputed reference",
        "8 per prompt: QRPO, share_prompt / QRPO, padding_free",
        "8 per prompt: reference pass, share_prompt / padding_free",
        "8 per prompt: demo KL scoring, share_prompt / padded",
        "peak memory: QRPO, share_prompt / SFTTrainer",
    }
    for per_prompt in (2, 8):
        assert shared[f"{per_prompt} per prompt: positions of the shared rows / tokens of the samples"]["ratio"] < 1
