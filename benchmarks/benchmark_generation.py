"""
Throughput of the reference stage's sampling, as a ratio to a bare batched `model.generate` over the same prompts.

Builds a small Llama and a word-level tokenizer locally (nothing is downloaded), then alternates, after a warm-up:

- bare: `model.generate(do_sample=True, num_return_sequences=n)` over the prompts in dataset order, in batches of
  `batch_size` completions (left padding), the loop a user would write;
- stage: `precompute_rewards` on the same prompts with the same settings and a trivial reward function, into a fresh
  cache directory each time (tokenisation, model hashing, sorting by length, per-completion seeding, decoding,
  scoring, cache writes included);
- generation: the stage's `generate_completions` alone, on the same prompt token ids.

It prints the median throughput of each (generated tokens per second, EOS included) and the median over rounds of
their ratios to bare (each round runs the three back to back, so a ratio compares runs under the same machine load),
and writes them as JSON.

    python benchmarks/benchmark_generation.py [--json results.json]
"""

import argparse
import json
import os
import statistics
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from qrpo_trl import ReferenceConfig, precompute_rewards  # noqa: E402
from qrpo_trl.reference_stage import completion_seed, generate_completions  # noqa: E402

from benchmark import build_tokenizer  # noqa: E402  (the word-level tokenizer of benchmarks/benchmark.py, next to this script)


def build_model(tokenizer, hidden_size: int, num_layers: int) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=hidden_size // 64,
        num_key_value_heads=hidden_size // 64,
        max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def bare_generate(model, tokenizer, prompts, cli) -> int:
    """Generated tokens (up to EOS) of the plain batched loop."""
    prompts_per_batch = max(1, cli.batch_size // cli.num_generations)
    num_tokens = 0
    for start in range(0, len(prompts), prompts_per_batch):
        batch = prompts[start : start + prompts_per_batch]
        inputs = tokenizer(text=batch, return_tensors="pt", padding=True, padding_side="left")
        with torch.no_grad():
            sequences = model.generate(
                **inputs, do_sample=True, temperature=1.0, top_p=1.0, top_k=0, num_return_sequences=cli.num_generations,
                max_new_tokens=cli.max_completion_length, pad_token_id=tokenizer.pad_token_id,
            )
        completions = sequences[:, inputs["input_ids"].shape[1] :]
        is_eos = completions == tokenizer.eos_token_id
        lengths = torch.where(is_eos.any(dim=1), is_eos.int().argmax(dim=1) + 1, completions.shape[1])
        num_tokens += int(lengths.sum())
    return num_tokens


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num_prompts", type=int, default=16)
    parser.add_argument("--num_generations", type=int, default=4)
    parser.add_argument("--max_completion_length", type=int, default=16)
    parser.add_argument("--batch_size", type=int, default=16, help="Completions per generate call.")
    parser.add_argument("--min_prompt_length", type=int, default=8)
    parser.add_argument("--max_prompt_length", type=int, default=64)
    parser.add_argument("--hidden_size", type=int, default=128)
    parser.add_argument("--num_layers", type=int, default=2)
    parser.add_argument("--vocab_size", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=9, help="Timed rounds, after one warm-up round.")
    parser.add_argument(
        "--num_threads", type=int, default=1, help="Torch threads; 1 is the least sensitive to other load on the machine."
    )
    parser.add_argument("--json", default=None, help="Also write the results to this file.")
    cli = parser.parse_args()
    torch.set_num_threads(cli.num_threads)

    tokenizer = build_tokenizer(cli.vocab_size)
    model = build_model(tokenizer, cli.hidden_size, cli.num_layers)
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(cli.vocab_size - 4)]
    prompts = [
        " ".join(rng.choice(words, size=rng.integers(cli.min_prompt_length, cli.max_prompt_length + 1)))
        for _ in range(cli.num_prompts)
    ]
    dataset = Dataset.from_dict({"prompt": prompts})
    args = dict(
        num_generations=cli.num_generations, max_completion_length=cli.max_completion_length,
        generation_batch_size=cli.batch_size,
    )
    prompt_ids = [ids for ids in tokenizer(text=prompts)["input_ids"] for _ in range(cli.num_generations)]
    seeds = [completion_seed(0, ids, index % cli.num_generations) for index, ids in enumerate(prompt_ids)]

    def stage() -> int:
        with tempfile.TemporaryDirectory() as cache_dir:
            config = ReferenceConfig(reference_cache_dir=cache_dir, **args)
            result = precompute_rewards(
                dataset, model, lambda completions, **kwargs: [0.0] * len(completions), config,
                processing_class=tokenizer,
            )
        # A prompt-only dataset: one row per sampled completion. Its EOS, if it has one, was decoded away: a completion
        # shorter than the maximum ended with one.
        completions_ids = tokenizer(text=list(result["completion"]), add_special_tokens=False)["input_ids"]
        return sum(min(len(ids) + 1, cli.max_completion_length) for ids in completions_ids)

    def generation() -> int:
        completions = generate_completions(model, tokenizer, prompt_ids, seeds, ReferenceConfig(**args))
        return sum(map(len, completions))

    runners = {"bare": lambda: bare_generate(model, tokenizer, prompts, cli), "stage": stage, "generation": generation}
    throughputs = {name: [] for name in runners}
    for repeat in range(cli.repeats + 1):  # the first round warms up
        for name, run in runners.items():
            start = time.perf_counter()
            num_tokens = run()
            elapsed = time.perf_counter() - start
            if repeat:
                throughputs[name].append(num_tokens / elapsed)

    # Each round runs the three back to back, under about the same machine load: the ratios are taken per round
    ratios = {
        name: [value / bare for value, bare in zip(throughputs[name], throughputs["bare"], strict=True)]
        for name in ("stage", "generation")
    }
    results = {
        "settings": vars(cli),
        "tokens_per_second": {name: statistics.median(values) for name, values in throughputs.items()},
        "stage_vs_bare": statistics.median(ratios["stage"]),
        "generation_vs_bare": statistics.median(ratios["generation"]),
        "stage_vs_bare_per_round": ratios["stage"],
        "generation_vs_bare_per_round": ratios["generation"],
    }
    for name, value in results["tokens_per_second"].items():
        print(f"{name:>10}: {value:8.1f} generated tokens/s (median of {cli.repeats})")
    print(f"reference stage / bare generate: {results['stage_vs_bare']:.3f}x (median of the per-round ratios)")
    print(f"stage generation only / bare generate: {results['generation_vs_bare']:.3f}x")
    if cli.json:
        with open(cli.json, "w") as f:
            json.dump(results, f, indent=2)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
