"""
The reference stage's own cost per sampled completion, at two sizes, extrapolated to the paper's 3.05M completions.

QRPO's paper samples 50 references per prompt (61k UltraFeedback prompts, ~400 tokens each). This runs
`precompute_rewards` on pointwise rows (prompt + completion, no reward) with `add_ref_rewards=True`,
`num_generations=50`, `max_completion_length=400` and one cheap reward function, with `model.generate` replaced by an
instant stand-in that returns 400 random tokens (no EOS) per completion, so that only the stage's own work shows:
tokenisation, seeding, decoding, cache files, cache keys, joining the columns. Each size runs in a fresh process
(`--size`), into a fresh cache directory, and reports

- overhead: wall time of `precompute_rewards` minus the time spent in generation (the stand-in `generate` and the
  model's forward passes, which compute the prompts once for their completions) and in the reward function;
- decoding: the time in `ReferenceStage._decode` (token ids to texts), and its share of the overhead;
- memory: the growth of the process's peak resident set size (`ru_maxrss`, anonymous and file-backed pages it
  touched) from just before the stage to its end, the result dataset still alive.

It prints both per sampled completion at each size, the slope between the two sizes (what a further completion costs,
free of fixed costs such as imports and model hashing) and the extrapolation to 3.05M completions.

    python benchmarks/benchmark_reference_stage.py [--sizes 200 1000] [--keep_ref_completions] [--prompt_only]
        [--json results.json]
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

PAPER_COMPLETIONS = 61_000 * 50


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def run_size(cli) -> dict:
    """One size, in this process: the stage's wall time, the stand-ins' time and the peak-RSS growth."""
    import numpy as np
    import torch
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM

    from qrpo_trl import ReferenceConfig, precompute_rewards
    from qrpo_trl.reference_stage import ReferenceStage

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from benchmark import build_tokenizer  # the word-level tokenizer of benchmarks/benchmark.py: one token per word

    torch.set_num_threads(1)
    tokenizer = build_tokenizer(cli.vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=1,
        num_key_value_heads=1, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    rng = np.random.default_rng(0)

    def words(length):
        return " ".join(f"w{i}" for i in rng.integers(len(tokenizer) - 4, size=length))

    dataset = Dataset.from_dict({
        "prompt": [words(rng.integers(32, 65)) for _ in range(cli.size)],
        "completion": [" " + words(rng.integers(16, 33)) for _ in range(cli.size)],
    })
    if cli.prompt_only:
        dataset = dataset.remove_columns("completion")
    timers = {"generate": 0.0, "reward": 0.0, "decode": 0.0}
    first_word_id = 4  # after the special tokens: no EOS, so every completion has max_completion_length tokens

    def timed(function, timer):
        def timed_function(*args, **kwargs):
            start = time.perf_counter()
            result = function(*args, **kwargs)
            timers[timer] += time.perf_counter() - start
            return result

        return timed_function

    def instant_generate(input_ids, generation_config, **kwargs):
        start = time.perf_counter()
        new = torch.randint(first_word_id, len(tokenizer), (input_ids.shape[0], generation_config.max_new_tokens))
        sequences = torch.cat([input_ids, new.to(input_ids.device)], dim=1)
        timers["generate"] += time.perf_counter() - start
        return sequences

    model.generate = instant_generate
    # Generation computes each prompt once with the decoder's forward pass (a real one, of this 1-layer model)
    model.model.forward = timed(model.model.forward, "generate")
    ReferenceStage._decode = timed(ReferenceStage._decode, "decode")

    def num_words(completions, **kwargs):
        start = time.perf_counter()
        rewards = [float(completion.count(" ")) for completion in completions]
        timers["reward"] += time.perf_counter() - start
        return rewards

    with tempfile.TemporaryDirectory(dir=cli.tmp_dir) as cache_dir:
        args = ReferenceConfig(
            num_generations=cli.num_generations, max_completion_length=cli.max_completion_length,
            generation_batch_size=cli.batch_size, reference_cache_dir=cache_dir,
            keep_ref_completions=cli.keep_ref_completions,
        )
        rss_before = peak_rss_bytes()
        start = time.perf_counter()
        result = precompute_rewards(dataset, model, num_words, args, processing_class=tokenizer)
        wall = time.perf_counter() - start
        rss_after = peak_rss_bytes()
        assert len(result) == cli.size * (cli.num_generations if cli.prompt_only else 1)
        assert len(result[0]["ref_rewards"]) == cli.num_generations
        cache_bytes = sum(
            os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(cache_dir) for name in names
        )
    return {
        "prompts": cli.size,
        "completions": cli.size * cli.num_generations,
        "wall_s": wall,
        "generate_s": timers["generate"],
        "reward_s": timers["reward"],
        "decode_s": timers["decode"],
        "overhead_s": wall - timers["generate"] - timers["reward"],
        "peak_rss_growth_bytes": rss_after - rss_before,
        "cache_bytes": cache_bytes,
        "load_average": os.getloadavg(),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs=2, default=[200, 1000], help="Numbers of prompts of the two runs.")
    parser.add_argument("--num_generations", type=int, default=50)
    parser.add_argument("--max_completion_length", type=int, default=400)
    parser.add_argument("--batch_size", type=int, default=32, help="`generation_batch_size`.")
    parser.add_argument("--vocab_size", type=int, default=4096)
    parser.add_argument(
        "--keep_ref_completions", action="store_true", help="Also join the sampled texts (`ref_completions`)."
    )
    parser.add_argument(
        "--prompt_only", action="store_true", help="Prompts only: each row becomes one row per sampled completion."
    )
    parser.add_argument("--tmp_dir", default=None, help="Where the cache directories are made (default: the system's).")
    parser.add_argument("--json", default=None, help="Also write the results to this file.")
    parser.add_argument("--size", type=int, default=None, help=argparse.SUPPRESS)  # one run, in a child process
    cli = parser.parse_args()
    if cli.size is not None:
        print(json.dumps(run_size(cli)))
        return

    runs = []
    for size in cli.sizes:
        command = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--size", str(size)]
        completed = subprocess.run(command, capture_output=True, text=True, check=False)
        if completed.returncode:
            sys.exit(f"the run with {size} prompts failed:\n{completed.stderr[-4000:]}")
        runs.append(json.loads(completed.stdout.strip().splitlines()[-1]))
    for run in runs:
        n = run["completions"]
        print(
            f"{n:>8} completions: wall {run['wall_s']:7.2f} s (generation {run['generate_s']:.2f} s, reward "
            f"{run['reward_s']:.2f} s), overhead {1e3 * run['overhead_s'] / n:.3f} ms (decoding "
            f"{100 * run['decode_s'] / run['overhead_s']:.0f}% of it) and peak RSS growth "
            f"{run['peak_rss_growth_bytes'] / 1024 / n:.3f} KiB per completion; cache {run['cache_bytes'] / n:.0f} "
            f"bytes per completion; load average {' '.join(f'{x:.2f}' for x in run['load_average'])}"
        )
    small, large = runs
    added = large["completions"] - small["completions"]
    slope_s = (large["overhead_s"] - small["overhead_s"]) / added
    slope_bytes = (large["peak_rss_growth_bytes"] - small["peak_rss_growth_bytes"]) / added
    slope_decode_s = (large["decode_s"] - small["decode_s"]) / added
    print(
        f"slope between the two sizes: {1e3 * slope_s:.3f} ms and {slope_bytes / 1024:.3f} KiB per sampled completion "
        f"(goal: <= 0.2 ms, <= 0.25 KiB), of which decoding {1e3 * slope_decode_s:.3f} ms "
        f"({100 * slope_decode_s / slope_s:.0f}%)"
    )
    print(
        f"extrapolated to {PAPER_COMPLETIONS:,} completions: {slope_s * PAPER_COMPLETIONS / 60:.1f} min of overhead, "
        f"{slope_bytes * PAPER_COMPLETIONS / 2**30:.2f} GiB of peak memory on the main process (beyond fixed costs)"
    )
    results = {
        "settings": vars(cli),
        "runs": runs,
        "slope_ms_per_completion": 1e3 * slope_s,
        "slope_kib_per_completion": slope_bytes / 1024,
        "slope_decode_ms_per_completion": 1e3 * slope_decode_s,
        "paper_overhead_minutes": slope_s * PAPER_COMPLETIONS / 60,
        "paper_peak_memory_gib": slope_bytes * PAPER_COMPLETIONS / 2**30,
    }
    if cli.json:
        with open(cli.json, "w") as f:
            json.dump(results, f, indent=2)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
