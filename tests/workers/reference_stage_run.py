"""Run the reference stage on a prompt-only dataset, so that a test can kill it (SIGKILL) and run it again.

`--generate_delay` slows each `generate` call down, leaving time to kill the run between chunks. The output JSON has
the number of `generate` calls and the completed dataset. `--use_vllm` samples with vLLM (its `generate` calls counted).
"""

import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

from datasets import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from qrpo_trl import ReferenceConfig, precompute_rewards  # noqa: E402
from qrpo_trl.reference_stage.vllm_sampling import VLLMSampler  # noqa: E402


PROMPTS = ["what is the sky", "tell me about the sea", "hello", "tell me about the grass", "what is one two"]


def length_reward(completions, **kwargs):
    return [float(len(completion.split())) for completion in completions]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--cache_dir", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--generate_delay", type=float, default=0.0)
    parser.add_argument("--use_vllm", action="store_true")
    cli = parser.parse_args()

    model = AutoModelForCausalLM.from_pretrained(cli.model)
    sampler = VLLMSampler if cli.use_vllm else model
    generate, calls = sampler.generate, []

    def slow_generate(*args, **kwargs):
        calls.append(1)
        time.sleep(cli.generate_delay)
        return generate(*args, **kwargs)

    sampler.generate = slow_generate
    # One prompt (3 completions, one `generate` call) per chunk: 5 chunks
    args = ReferenceConfig(
        num_generations=3, max_completion_length=6, generation_batch_size=4, reference_chunk_size=3,
        keep_ref_completions=True, reference_cache_dir=cli.cache_dir, use_vllm=cli.use_vllm,
        **(dict(vllm_gpu_memory_utilization=0.1, vllm_enforce_eager=True) if cli.use_vllm else {}),
    )
    processing_class = AutoTokenizer.from_pretrained(cli.model)
    result = precompute_rewards(Dataset.from_dict({"prompt": PROMPTS}), model, length_reward, args, processing_class)
    with open(cli.output, "w") as f:
        json.dump({"generate_calls": len(calls), "result": result.to_dict()}, f)


if __name__ == "__main__":
    main()
