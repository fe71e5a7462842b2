"""
Benchmark of `QRPOTrainer` against what users would otherwise run, measured side by side in one process.

Every figure is a ratio of contenders run interleaved on the same model, tokens and batch sizes: each repeat runs every
contender once, in an order rotated from one repeat to the next; the first `warmup` repeats are discarded and the median
of the others is kept. On CPU the seconds are the process's CPU time (one torch thread by default), which other jobs on
a shared machine do not inflate as they inflate wall time; on CUDA, wall time. The JSON keeps every repeat, and each
ratio's spread (min and max of the per-repeat ratios).

1. Training time per completion: QRPO on N pointwise completions vs TRL's DPOTrainer on the N/2 pairs they come from,
   with the same number of sequences per step, reference log-probs precomputed for both; DPO also with its reference
   model in memory (`precompute_ref_log_probs=False`). QRPO runs with the default random sampler, with
   `train_sampling_strategy="group_by_length"`, and with `padding_free=True` (each batch packed into one row).
   Target: <= 0.9 (padding-free: <= 0.5 against DPO with precomputed reference log-probs).
2. Throughput of the reference map stage's forward pass (`_reference_logps`: batching, collation, fused LM head, gather,
   dataset order restored) vs a bare `torch.inference_mode()` forward of the same model over the same batches. Target:
   >= 0.9. Also vs the bare forward over batches in dataset order, as a plain loop over the dataset would run it; and
   the padding-free reference pass vs a bare forward over the same packed rows.
3. Peak memory of a QRPO training step (forward + backward), padded and packed (`padding_free`), vs an SFT step of
   TRL's SFTTrainer (completion-only loss) on the same rows, target <= 1.1; and vs a bare `model(..., labels=...)`
   loss, which builds the full logits. On CPU it is the peak of the bytes held by live tensors while the step runs,
   weights and gradients included, counted op by op by torch's `MemTracker` (a dispatch mode: tensor allocations only,
   like tracemalloc, so the allocator's caching and fragmentation and the Python heap do not count); on CUDA,
   `torch.cuda.max_memory_allocated`.
4. Padding waste: the fraction of padded positions in the batches each contender builds (0 when packed).
5. Shared prompts (`share_prompt=True`, with `padding_free` and `group_by_prompt`), on data whose prompt and completion
   lengths are log-normal with the same median (`completion_length`): training time per completion against DPOTrainer
   with precomputed reference log-probs at 2 completions per prompt (target <= 0.4) and against unshared `padding_free`
   QRPO at 8 per prompt (target <= 0.6); the reference pass and the demo's held-out KL scoring
   (`qrpo_trl.demo.evaluation.kl_to_reference`) shared against unshared at 8 per prompt; peak memory of a shared step
   against an SFT step on the same rows (target <= 1.1).

With `--device cuda` the table also gives tokens/s and MFU: FLOPs are 6 * N * tokens for a training step (8 * N * tokens
with DPO's reference forward) and 2 * N * tokens for the reference pass, where N counts the weights used in matmuls
(all but the input embedding table) and tokens the non-padding ones, against `--peak_tflops`.

    python benchmarks/benchmark.py                  # CPU defaults: a few minutes on 2 cores
    python benchmarks/benchmark.py --quick          # a smoke run
    python benchmarks/benchmark.py --sections shared_prompts --hidden_size 768 --num_completions 96  # section 5 only
    python benchmarks/benchmark.py --device cuda --hidden_size 2048 --num_layers 16 --vocab_size 32000 \
        --max_length 1024 --prompt_length 128 --completion_length 256 --num_completions 1024 --batch_size 32
"""

import gc
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers, processors  # noqa: E402
from torch.distributed._tools.mem_tracker import MemTracker  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    HfArgumentParser,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    PrinterCallback,
    TrainerCallback,
)
from transformers.utils import logging as transformers_logging  # noqa: E402
from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer  # noqa: E402

from qrpo_trl import QRPOConfig, QRPOTrainer  # noqa: E402
from qrpo_trl.pointwise_collator import MODEL_INPUT_KEYS  # noqa: E402


SECTIONS = ("training", "reference_pass", "memory", "shared_prompts")


@dataclass
class BenchmarkArguments:
    device: str = field(default="cpu", metadata={"help": "'cpu' or 'cuda'.", "choices": ["cpu", "cuda"]})
    vocab_size: int = field(default=2048, metadata={"help": "Vocabulary of the word-level tokenizer and the model."})
    hidden_size: int = field(default=128, metadata={"help": "Hidden size of the Llama model (head dim 64)."})
    num_layers: int = field(default=2, metadata={"help": "Number of decoder layers."})
    num_completions: int = field(default=192, metadata={"help": "Completions (N), i.e. N/2 DPO pairs."})
    prompt_length: int = field(default=12, metadata={"help": "Median prompt length in tokens (log-normal)."})
    completion_length: int = field(default=36, metadata={"help": "Median completion length in tokens (log-normal)."})
    length_sigma: float = field(default=0.6, metadata={"help": "Sigma of the log-normal length distributions."})
    max_length: int = field(default=256, metadata={"help": "`max_length` of every trainer (prompt + completion)."})
    batch_size: int = field(default=8, metadata={"help": "Sequences per step: QRPO completions, DPO gets half as pairs."})
    repeats: int = field(default=3, metadata={"help": "Measured training epochs of each contender (median kept)."})
    reference_repeats: int = field(default=5, metadata={"help": "Measured reference passes of each contender."})
    warmup: int = field(default=1, metadata={"help": "Repeats run first and discarded, in each section."})
    gradient_checkpointing: bool = field(default=True, metadata={"help": "As in TRL's configs (default True)."})
    peak_tflops: float = field(default=989.0, metadata={"help": "Peak TFLOP/s for MFU (H100 SXM, dense bf16)."})
    num_threads: int | None = field(
        default=None,
        metadata={
            "help": "torch CPU threads. Default: 1 on CPU, where threads on a machine shared with other jobs wait on "
            "each other and make the timings erratic (CPU time adds up the threads); torch's choice with --device cuda."
        },
    )
    seed: int = field(default=0)
    sections: list[str] = field(
        default_factory=lambda: list(SECTIONS),
        metadata={"help": f"Sections to run, among {', '.join(SECTIONS)}.", "choices": list(SECTIONS)},
    )
    quick: bool = field(default=False, metadata={"help": "A tiny smoke configuration (overrides sizes and repeats)."})
    output: str = field(default="benchmark.json", metadata={"help": "Where to write the JSON results."})

    def __post_init__(self):
        if self.quick:
            self.vocab_size, self.hidden_size, self.num_layers, self.num_completions = 512, 64, 1, 16
            self.prompt_length, self.completion_length, self.max_length, self.batch_size = 8, 16, 64, 4
            self.repeats, self.reference_repeats, self.warmup = 1, 1, 0
        if self.batch_size % 2:
            raise ValueError("`batch_size` must be even: DPO takes batch_size / 2 pairs.")


# ---------------------------------------------------------------------------------------------------------------------
# Data and model


def build_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A word-level tokenizer (one token per word `w<i>`, BOS prepended), so that lengths are exact."""
    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    vocab = {token: i for i, token in enumerate(specials + [f"w{i}" for i in range(vocab_size - len(specials))])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def build_dataset(args: BenchmarkArguments) -> Dataset:
    """Scored pairs (QRPO unpairs them into pointwise samples) with log-normal prompt and completion lengths."""
    rng = np.random.default_rng(args.seed)
    num_words = args.vocab_size - 4

    def text(median):
        length = int(np.clip(round(rng.lognormal(math.log(median), args.length_sigma)), 1, args.max_length))
        return " ".join(f"w{i}" for i in rng.integers(num_words, size=length))

    num_pairs = args.num_completions // 2
    return Dataset.from_dict(
        {
            "prompt": [text(args.prompt_length) for _ in range(num_pairs)],
            "chosen": [" " + text(args.completion_length) for _ in range(num_pairs)],
            "rejected": [" " + text(args.completion_length) for _ in range(num_pairs)],
            "chosen_reward": rng.normal(size=num_pairs).tolist(),
            "rejected_reward": rng.normal(size=num_pairs).tolist(),
            "ref_rewards": rng.normal(size=(num_pairs, 8)).tolist(),
        }
    )


def save_model(args: BenchmarkArguments, tokenizer, path: str) -> None:
    """A Llama with random weights, saved with its tokenizer so that every trainer loads the same one by path."""
    num_heads = max(1, args.hidden_size // 64)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden_size,
        intermediate_size=256 * math.ceil(8 * args.hidden_size / 3 / 256),
        num_hidden_layers=args.num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=args.max_length,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(args.seed)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)


def matmul_parameters(model) -> int:
    """N in the FLOP count: the weights used in matmuls, i.e. all but the input embedding table (a lookup)."""
    return sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()


# ---------------------------------------------------------------------------------------------------------------------
# Measurement


def clock(device: torch.device) -> float:
    """
    Seconds to time with: on CUDA, wall time once the queued kernels are done; on CPU, the CPU time of this process,
    which other jobs on a shared machine do not inflate the way they inflate wall time.
    """
    if device.type == "cuda":
        torch.cuda.synchronize()
        return time.perf_counter()
    return time.process_time()


class TrainTimer(TrainerCallback):
    """Seconds of `Trainer.train` from the start of the training loop to its end (model loading excluded)."""

    def __init__(self, device):
        self.device, self.start, self.seconds = device, None, None

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = clock(self.device)

    def on_train_end(self, args, state, control, **kwargs):
        self.seconds = clock(self.device) - self.start


def timed(function, device: torch.device) -> float:
    start = clock(device)
    function()
    return clock(device) - start


def interleaved(contenders: dict, warmup: int, repeats: int) -> dict[str, list[float]]:
    """
    Seconds of each contender (a callable returning the seconds it measured), per measured repeat. Every repeat runs
    all of them, in an order rotated from one repeat to the next.
    """
    names = list(contenders)
    seconds = {name: [] for name in names}
    for repeat in range(warmup + repeats):
        measured = {}
        for name in names[repeat % len(names) :] + names[: repeat % len(names)]:
            gc.collect()
            measured[name] = contenders[name]()
            if repeat >= warmup:
                seconds[name].append(measured[name])
        kind = "warm-up" if repeat < warmup else "repeat"
        progress(f"  {kind} {repeat + 1}: " + ", ".join(f"{name} {value:.2f} s" for name, value in measured.items()))
    return seconds


def ratio(numerator: list[float], denominator: list[float]) -> dict:
    """Median ratio, and the spread of the per-repeat ratios (repeat r of one over repeat r of the other)."""
    per_repeat = [a / b for a, b in zip(numerator, denominator, strict=True)]
    return {
        "ratio": statistics.median(numerator) / statistics.median(denominator),
        "min": min(per_repeat),
        "max": max(per_repeat),
    }


def peak_memory(device: torch.device, step, *tracked) -> int:
    """Peak bytes of live tensors on `device` while `step()` runs, `tracked` (weights, inputs) included."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    tracker = MemTracker()
    tracker.track_external(*tracked)
    with tracker:
        step()
    return tracker.get_tracker_snapshot("peak")[device]["Total"]


def batch_tokens(batch) -> int:
    """Real (non-padding) tokens of a padded batch (its `attention_mask`) or a packed one (its `sample_lengths`)."""
    return int(batch["sample_lengths"].sum() if "sample_lengths" in batch else batch["attention_mask"].sum())


def padding_waste(batches) -> float:
    """Fraction of the positions of `batches` (padded with an `attention_mask`, or packed) that are padding."""
    positions = sum(batch.get("attention_mask", batch.get("input_ids")).numel() for batch in batches)
    return 1 - sum(batch_tokens(batch) for batch in batches) / positions


# ---------------------------------------------------------------------------------------------------------------------
# The benchmark


def trainer_args(config_class, args: BenchmarkArguments, output_dir: str, **overrides):
    on_cpu = args.device == "cpu"
    settings = dict(
        output_dir=output_dir,
        use_cpu=on_cpu,
        bf16=not on_cpu,
        model_init_kwargs={"dtype": "float32" if on_cpu else "bfloat16"},
        per_device_train_batch_size=args.batch_size,
        num_train_epochs=1,
        learning_rate=1e-6,
        lr_scheduler_type="constant",
        max_length=args.max_length,
        gradient_checkpointing=args.gradient_checkpointing,
        logging_strategy="no",
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=args.seed,
    )
    return config_class(**{**settings, **overrides})


def train_seconds(trainers: dict, args, device) -> dict[str, list[float]]:
    """Seconds of one training epoch of each trainer, per measured repeat, interleaved."""
    timers = {}
    for name, trainer in trainers.items():
        timers[name] = TrainTimer(device)
        trainer.add_callback(timers[name])
        trainer.remove_callback(PrinterCallback)  # `train` prints its summary even with `logging_strategy="no"`

    def run(name):
        trainers[name].train()
        return timers[name].seconds

    return interleaved({name: (lambda name=name: run(name)) for name in trainers}, args.warmup, args.repeats)


def benchmark_training(args, device, model_path, dataset, workdir) -> tuple[dict, dict, dict, QRPOTrainer]:
    trainers = {
        "QRPO": QRPOTrainer(
            model=model_path, args=trainer_args(QRPOConfig, args, workdir), train_dataset=dataset
        ),
        "QRPO, group_by_length": QRPOTrainer(
            model=model_path,
            args=trainer_args(QRPOConfig, args, workdir, train_sampling_strategy="group_by_length"),
            train_dataset=dataset,
        ),
        "QRPO, padding_free": QRPOTrainer(
            model=model_path, args=trainer_args(QRPOConfig, args, workdir, padding_free=True), train_dataset=dataset
        ),
        "DPO, precomputed reference": DPOTrainer(
            model=model_path,
            args=trainer_args(
                DPOConfig, args, workdir, per_device_train_batch_size=args.batch_size // 2, precompute_ref_log_probs=True
            ),
            train_dataset=dataset,
        ),
        "DPO, reference model": DPOTrainer(
            model=model_path,
            args=trainer_args(DPOConfig, args, workdir, per_device_train_batch_size=args.batch_size // 2),
            train_dataset=dataset,
        ),
    }
    unsupported = {}
    batches = {}
    for name, trainer in list(trainers.items()):
        try:  # the batches of one epoch, for the padding figures; fails where the trainer lacks the sampler
            batches[name] = list(trainer.get_train_dataloader())
        except ValueError as error:
            unsupported[name] = str(error)
            del trainers[name]
    seconds = train_seconds(trainers, args, device)
    num_completions = len(trainers["QRPO"].train_dataset)
    tokens = sum(batch_tokens(batch) for batch in batches["QRPO"])
    dpo_tokens = sum(batch_tokens(batch) for batch in batches["DPO, precomputed reference"])
    n = matmul_parameters(trainers["QRPO"].model)
    results = {"num_completions": num_completions, "tokens": tokens, "same_tokens_as_dpo": tokens == dpo_tokens}
    for name, values in seconds.items():
        median = statistics.median(values)
        flops_per_token = 8 * n if name == "DPO, reference model" else 6 * n
        results[name] = {
            "seconds": values,
            "seconds_per_completion": median / num_completions,
            "tokens_per_second": tokens / median,
            "mfu": flops_per_token * tokens / median / (args.peak_tflops * 1e12),
        }
    for name, error in unsupported.items():
        results[name] = {"unsupported": error}
    ratios = {
        f"{qrpo} / {dpo}": ratio(seconds[qrpo], seconds[dpo])
        for qrpo in ("QRPO", "QRPO, group_by_length", "QRPO, padding_free")
        for dpo in ("DPO, precomputed reference", "DPO, reference model")
        if qrpo in seconds
    }
    waste = {name: padding_waste(contender_batches) for name, contender_batches in batches.items()}
    return results, ratios, waste, trainers["QRPO"], trainers["QRPO, padding_free"]


def recorded_batches(trainer, dataset, batch_size) -> list[dict]:
    """The model inputs of the batches the map stage's reference pass builds, recorded over one pass."""
    recorded = []
    compute_ref_log_probs = trainer.compute_ref_log_probs

    def recording(model, inputs):
        recorded.append({key: value for key, value in inputs.items() if key in MODEL_INPUT_KEYS + ("sample_lengths",)})
        return compute_ref_log_probs(model, inputs)

    trainer.compute_ref_log_probs = recording
    trainer._reference_logps(dataset, "benchmark", batch_size)
    del trainer.compute_ref_log_probs
    return recorded


def benchmark_reference_pass(args, device, trainer, packing_trainer) -> tuple[dict, dict, dict]:
    """
    The map stage's forward (`_reference_logps`) vs a bare forward over the batches it builds and in dataset order; and
    packed (`padding_free`) vs a bare forward over the same packed rows.
    """
    dataset = trainer.train_dataset.select_columns(["prompt_ids", "completion_ids"])
    batch_size = trainer.args.precompute_ref_batch_size or trainer.args.per_device_train_batch_size
    model = trainer.model
    recorded = recorded_batches(trainer, dataset, batch_size)
    packed = recorded_batches(packing_trainer, dataset, batch_size)
    in_order = [
        trainer.data_collator([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        for start in range(0, len(dataset), batch_size)
    ]
    in_order = [{key: batch[key].to(device) for key in ("input_ids", "attention_mask")} for batch in in_order]

    def bare(batches, model=model):
        model.eval()
        with torch.inference_mode():
            for batch in batches:
                model(**{key: value for key, value in batch.items() if key != "sample_lengths"}, use_cache=False)
        model.train()

    seconds = interleaved(
        {
            "reference pass": lambda: timed(lambda: trainer._reference_logps(dataset, "benchmark", batch_size), device),
            "bare forward, same batches": lambda: timed(lambda: bare(recorded), device),
            "bare forward, dataset order": lambda: timed(lambda: bare(in_order), device),
            "reference pass, padding_free": lambda: timed(
                lambda: packing_trainer._reference_logps(dataset, "benchmark", batch_size), device
            ),
            "bare forward, same packed rows": lambda: timed(lambda: bare(packed, packing_trainer.model), device),
        },
        args.warmup,
        args.reference_repeats,
    )
    tokens = sum(batch_tokens(batch) for batch in recorded)
    n = matmul_parameters(model)
    results = {"num_completions": len(dataset), "tokens": tokens}
    for name, values in seconds.items():
        median = statistics.median(values)
        results[name] = {
            "seconds": values,
            "completions_per_second": len(dataset) / median,
            "tokens_per_second": tokens / median,
            "mfu": 2 * n * tokens / median / (args.peak_tflops * 1e12),
        }
    # Throughput ratios: time of the bare forward over time of the reference pass
    ratios = {
        f"reference pass / {name}": ratio(seconds[name], seconds["reference pass"])
        for name in ("bare forward, same batches", "bare forward, dataset order")
    }
    ratios["reference pass, padding_free / bare forward, same packed rows"] = ratio(
        seconds["bare forward, same packed rows"], seconds["reference pass, padding_free"]
    )
    ratios["reference pass, padding_free / reference pass"] = ratio(
        seconds["reference pass"], seconds["reference pass, padding_free"]
    )
    waste = {
        "reference pass": padding_waste(recorded),
        "reference pass, dataset order": padding_waste(in_order),
        "reference pass, padding_free": padding_waste(packed),
    }
    return results, ratios, waste


def sft_trainer_on(rows: Dataset, args, model_path: str, workdir: str) -> tuple[SFTTrainer, dict]:
    """TRL's SFTTrainer (completion-only loss) on the prepared pointwise `rows`, set up by one step, and their batch."""
    sft_rows = Dataset.from_dict(
        {
            "input_ids": [p + c for p, c in zip(rows["prompt_ids"], rows["completion_ids"], strict=True)],
            "completion_mask": [[0] * len(p) + [1] * len(c) for p, c in zip(rows["prompt_ids"], rows["completion_ids"], strict=True)],
        }
    )
    sft = SFTTrainer(
        model=model_path,
        args=trainer_args(SFTConfig, args, workdir, completion_only_loss=True, per_device_train_batch_size=len(rows)),
        train_dataset=sft_rows,
    )
    sft.remove_callback(PrinterCallback)
    sft.train()  # one step, like the QRPO trainer's: the model set up for training as `train` does it
    return sft, sft.data_collator(list(sft.train_dataset))


def step_peaks(device, steps: dict) -> dict:
    """Peak memory of each `(model, step, batch)` of `steps`, after a warm-up step."""
    results = {}
    for name, (model, step, batch) in steps.items():
        model.train()
        step()  # warm-up: lazily built state (autocast caches, kernels) is not the step's memory
        model.zero_grad(set_to_none=True)
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        peak = peak_memory(device, step, model, *[v for v in batch.values() if isinstance(v, torch.Tensor)])
        model.zero_grad(set_to_none=True)
        results[name] = {
            "peak_bytes": peak,
            "peak_bytes_above_weights": peak - weights,
            "activation_checkpointing": model.is_activation_checkpointing,
        }
    return results


def benchmark_memory(args, device, model_path, qrpo, packing_qrpo, workdir) -> tuple[dict, dict]:
    """
    One forward + backward on the same rows: QRPO padded and packed (`padding_free`), TRL's SFTTrainer, and a bare loss
    over the full logits.
    """
    rows = qrpo.train_dataset.shuffle(seed=args.seed).select(range(args.batch_size))
    qrpo_batch = qrpo.data_collator(list(rows))
    packed_batch = packing_qrpo.data_collator(list(rows))
    sft, sft_batch = sft_trainer_on(rows, args, model_path, workdir)
    bare_model = AutoModelForCausalLM.from_pretrained(model_path, dtype=qrpo.model.dtype).to(device)
    if args.gradient_checkpointing:
        bare_model.activation_checkpointing_enable()
    bare_batch = {
        "input_ids": qrpo_batch["input_ids"].to(device),
        "attention_mask": qrpo_batch["attention_mask"].to(device),
        "labels": qrpo_batch["input_ids"].masked_fill(qrpo_batch["completion_mask"] == 0, -100).to(device),
    }

    def bare_step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = bare_model(**bare_batch, use_cache=False).loss
        loss.backward()

    steps = {
        "QRPO": (qrpo.model, lambda: qrpo.training_step(qrpo.model, qrpo_batch), qrpo_batch),
        "QRPO, padding_free": (
            packing_qrpo.model, lambda: packing_qrpo.training_step(packing_qrpo.model, packed_batch), packed_batch
        ),
        "SFTTrainer": (sft.model, lambda: sft.training_step(sft.model, sft_batch), sft_batch),
        "bare loss (full logits)": (bare_model, bare_step, bare_batch),
    }
    results = {"batch_tokens": int(qrpo_batch["attention_mask"].sum()), "batch_shape": list(qrpo_batch["input_ids"].shape)}
    results.update(step_peaks(device, steps))
    ratios = {
        f"{qrpo_name} / {name}": {"ratio": results[qrpo_name]["peak_bytes"] / results[name]["peak_bytes"]}
        for qrpo_name in ("QRPO", "QRPO, padding_free")
        for name in ("SFTTrainer", "bare loss (full logits)")
    }
    return results, ratios


def build_grouped_dataset(args: BenchmarkArguments, per_prompt: int) -> Dataset:
    """
    `num_completions` scored completions, `per_prompt` per prompt, with log-normal prompt and completion lengths of the
    same median (`completion_length`): as pairs (chosen, rejected) for 2 per prompt, else pointwise rows.
    """
    rng = np.random.default_rng(args.seed + per_prompt)
    num_words = args.vocab_size - 4

    def text(median):
        length = int(np.clip(round(rng.lognormal(math.log(median), args.length_sigma)), 1, args.max_length // 2))
        return " ".join(f"w{i}" for i in rng.integers(num_words, size=length))

    num_prompts = args.num_completions // per_prompt
    prompts = [text(args.completion_length) for _ in range(num_prompts)]
    if per_prompt == 2:
        return Dataset.from_dict(
            {
                "prompt": prompts,
                "chosen": [" " + text(args.completion_length) for _ in prompts],
                "rejected": [" " + text(args.completion_length) for _ in prompts],
                "chosen_reward": rng.normal(size=num_prompts).tolist(),
                "rejected_reward": rng.normal(size=num_prompts).tolist(),
                "ref_rewards": rng.normal(size=(num_prompts, 8)).tolist(),
            }
        )
    rows = [(prompt, rng.normal(size=8).tolist()) for prompt in prompts for _ in range(per_prompt)]
    return Dataset.from_dict(
        {
            "prompt": [prompt for prompt, _ in rows],
            "completion": [" " + text(args.completion_length) for _ in rows],
            "reward": rng.normal(size=len(rows)).tolist(),
            "ref_rewards": [refs for _, refs in rows],
        }
    )


def benchmark_shared_prompts(args, device, model_path, workdir) -> tuple[dict, dict]:
    """
    `share_prompt=True` (with `padding_free` and `group_by_prompt`): training time per completion against DPOTrainer
    with precomputed reference log-probs at 2 completions per prompt, and against unshared `padding_free` QRPO at 8;
    the reference pass and the demo's held-out KL scoring with and without sharing at 8; peak memory of a shared step
    against an SFT step on the same rows.
    """
    from peft import LoraConfig, get_peft_model

    from qrpo_trl.demo.evaluation import kl_to_reference

    grouped = dict(padding_free=True, group_by_prompt=True)
    results, ratios = {}, {}
    trainers = {}
    for per_prompt in (2, 8):
        dataset = build_grouped_dataset(args, per_prompt)
        contenders = {
            f"{per_prompt} per prompt: QRPO, padding_free": trainer_args(QRPOConfig, args, workdir, **grouped),
            f"{per_prompt} per prompt: QRPO, share_prompt": trainer_args(
                QRPOConfig, args, workdir, share_prompt=True, **grouped
            ),
        }
        trainers[per_prompt] = {
            name: QRPOTrainer(model=model_path, args=config, train_dataset=dataset) for name, config in contenders.items()
        }
        if per_prompt == 2:
            trainers[2]["2 per prompt: DPO, precomputed reference"] = DPOTrainer(
                model=model_path,
                args=trainer_args(
                    DPOConfig, args, workdir, per_device_train_batch_size=args.batch_size // 2,
                    precompute_ref_log_probs=True,
                ),
                train_dataset=dataset,
            )
        progress(f"  shared prompts, {per_prompt} per prompt: training")
        seconds = train_seconds(trainers[per_prompt], args, device)
        shared_trainer = trainers[per_prompt][f"{per_prompt} per prompt: QRPO, share_prompt"]
        num_completions = len(shared_trainer.train_dataset)
        batches = list(shared_trainer.get_train_dataloader())
        results[f"{per_prompt} per prompt"] = {
            "num_completions": num_completions,
            "tokens": sum(batch_tokens(batch) for batch in batches),
            "positions_shared": sum(batch["input_ids"].numel() for batch in batches),
            **{name: {"seconds": values, "seconds_per_completion": statistics.median(values) / num_completions}
               for name, values in seconds.items()},
        }
        shared = seconds[f"{per_prompt} per prompt: QRPO, share_prompt"]
        for other in seconds:
            if other != f"{per_prompt} per prompt: QRPO, share_prompt":
                ratios[f"{per_prompt} per prompt: QRPO, share_prompt / {other.split(': ')[1]}"] = ratio(shared, seconds[other])

    # The reference pass and the demo's KL scoring, 8 per prompt
    unshared, shared = (trainers[8][f"8 per prompt: QRPO, {kind}"] for kind in ("padding_free", "share_prompt"))
    rows = shared.train_dataset.select_columns(["prompt_ids", "completion_ids"])
    batch_size = args.batch_size
    policy = get_peft_model(
        AutoModelForCausalLM.from_pretrained(model_path, dtype=shared.model.dtype).to(device),
        LoraConfig(r=8, target_modules=["q_proj", "v_proj"]),
    )
    progress("  shared prompts, 8 per prompt: reference pass and KL scoring")
    seconds = interleaved(
        {
            "reference pass, padding_free": lambda: timed(lambda: unshared._reference_logps(rows, "benchmark", batch_size), device),
            "reference pass, share_prompt": lambda: timed(lambda: shared._reference_logps(rows, "benchmark", batch_size), device),
            "demo KL scoring, padded": lambda: timed(lambda: kl_to_reference(policy, rows, 0, share_prompt=False), device),
            "demo KL scoring, share_prompt": lambda: timed(lambda: kl_to_reference(policy, rows, 0), device),
        },
        args.warmup,
        args.reference_repeats,
    )
    results["8 per prompt"].update({name: {"seconds": values} for name, values in seconds.items()})
    ratios["8 per prompt: reference pass, share_prompt / padding_free"] = ratio(
        seconds["reference pass, share_prompt"], seconds["reference pass, padding_free"]
    )
    ratios["8 per prompt: demo KL scoring, share_prompt / padded"] = ratio(
        seconds["demo KL scoring, share_prompt"], seconds["demo KL scoring, padded"]
    )

    # Peak memory of a shared step against an SFT step, the same rows (a batch of whole groups, 2 per prompt)
    qrpo = trainers[2]["2 per prompt: QRPO, share_prompt"]
    batch_rows = qrpo.train_dataset.select(range(args.batch_size))
    batch = qrpo.data_collator(list(batch_rows))
    sft, sft_batch = sft_trainer_on(batch_rows, args, model_path, workdir)
    peaks = step_peaks(
        device,
        {
            "QRPO, share_prompt": (qrpo.model, lambda: qrpo.training_step(qrpo.model, batch), batch),
            "SFTTrainer": (sft.model, lambda: sft.training_step(sft.model, sft_batch), sft_batch),
        },
    )
    results["memory"] = peaks
    ratios["peak memory: QRPO, share_prompt / SFTTrainer"] = {
        "ratio": peaks["QRPO, share_prompt"]["peak_bytes"] / peaks["SFTTrainer"]["peak_bytes"]
    }
    for per_prompt in (2, 8):  # what sharing leaves to compute
        counts = results[f"{per_prompt} per prompt"]
        ratios[f"{per_prompt} per prompt: positions of the shared rows / tokens of the samples"] = {
            "ratio": counts["positions_shared"] / counts["tokens"]
        }
    return results, ratios


TARGETS = {
    "training": ("<=", 0.9),
    "QRPO, padding_free / DPO, precomputed reference": ("<=", 0.5),
    "reference pass / bare forward, same batches": (">=", 0.9),
    "reference pass, padding_free / bare forward, same packed rows": (">=", 0.9),
    "QRPO / SFTTrainer": ("<=", 1.1),
    "QRPO, padding_free / SFTTrainer": ("<=", 1.1),
    "2 per prompt: QRPO, share_prompt / DPO, precomputed reference": ("<=", 0.4),
    "8 per prompt: QRPO, share_prompt / QRPO, padding_free": ("<=", 0.6),
    "peak memory: QRPO, share_prompt / SFTTrainer": ("<=", 1.1),
}


def meets(name, value):
    for key, (sense, bound) in TARGETS.items():
        if name == key or (key == "training" and name.startswith("QRPO") and " / DPO" in name and name not in TARGETS):
            return value <= bound if sense == "<=" else value >= bound
    return None


def print_table(results: dict) -> None:
    print(f"\n{'ratio':<64} {'median':>8} {'spread':>17} {'target':>8}")
    for section in SECTIONS:
        for name, value in results.get(section, {"ratios": {}})["ratios"].items():
            spread = f"{value['min']:.3f}-{value['max']:.3f}" if "min" in value else ""
            met = meets(name, value["ratio"])
            target = "" if met is None else ("met" if met else "MISSED")
            print(f"{name:<64} {value['ratio']:>8.3f} {spread:>17} {target:>8}")
    print(f"\n{'padding waste (fraction of padded positions)':<64} {'':>8}")
    for name, value in results["padding_waste"].items():
        print(f"{name:<64} {value:>8.3f}")
    if results["config"]["device"] == "cuda":
        print(f"\n{'throughput':<64} {'tokens/s':>10} {'MFU':>8}")
        for section in ("training", "reference_pass"):
            for name, value in results.get(section, {"contenders": {}})["contenders"].items():
                if isinstance(value, dict) and "mfu" in value:
                    print(f"{name:<64} {value['tokens_per_second']:>10.0f} {value['mfu']:>8.1%}")


def progress(message: str) -> None:
    print(f"[benchmark] {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> dict:
    (args,) = HfArgumentParser(BenchmarkArguments).parse_args_into_dataclasses(args=argv)
    transformers_logging.set_verbosity_error()
    if args.num_threads is not None or args.device == "cpu":
        torch.set_num_threads(args.num_threads or 1)
    device = torch.device(args.device)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as workdir:
        model_path = os.path.join(workdir, "model")
        tokenizer = build_tokenizer(args.vocab_size)
        save_model(args, tokenizer, model_path)
        dataset = build_dataset(args)
        sections, waste = {}, {}
        if {"training", "reference_pass", "memory"} & set(args.sections):
            progress("training")
            training, training_ratios, training_waste, qrpo, packing_qrpo = benchmark_training(
                args, device, model_path, dataset, workdir
            )
            sections["training"] = {"contenders": training, "ratios": training_ratios}
            waste.update({f"training: {k}": v for k, v in training_waste.items()})
        if "reference_pass" in args.sections:
            progress(f"reference pass ({time.perf_counter() - start:.0f} s)")
            reference, reference_ratios, reference_waste = benchmark_reference_pass(args, device, qrpo, packing_qrpo)
            sections["reference_pass"] = {"contenders": reference, "ratios": reference_ratios}
            waste.update(reference_waste)
        if "memory" in args.sections:
            progress(f"memory ({time.perf_counter() - start:.0f} s)")
            memory, memory_ratios = benchmark_memory(args, device, model_path, qrpo, packing_qrpo, workdir)
            sections["memory"] = {"contenders": memory, "ratios": memory_ratios}
        if "shared_prompts" in args.sections:
            progress(f"shared prompts ({time.perf_counter() - start:.0f} s)")
            shared, shared_ratios = benchmark_shared_prompts(args, device, model_path, workdir)
            sections["shared_prompts"] = {"contenders": shared, "ratios": shared_ratios}
    results = {
        "config": asdict(args),
        "machine": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
            "load_average": os.getloadavg(),
        },
        "versions": {"torch": torch.__version__, "trl": __import__("trl").__version__},
        **sections,
        "padding_waste": waste,
        "seconds": time.perf_counter() - start,
    }
    print_table(results)
    print(f"\n{results['seconds']:.0f} s; results written to {args.output}")
    with open(args.output, "w") as f:
        json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
