"""Run the reference stage (as a function, then inside QRPOTrainer) on tiny models and dump what the tests compare.

Run as `python reference_stage_tiny.py ...` (one process) or under `torchrun`/`accelerate launch` (several). The main
process writes a JSON with the stage's columns and the trainer's losses.
"""

import argparse
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from accelerate import PartialState  # noqa: E402
from conftest import make_args, pointwise_rows  # noqa: E402
from datasets import Dataset  # noqa: E402

from qrpo_trl import QRPOConfig, QRPOTrainer, ReferenceConfig, precompute_rewards  # noqa: E402


def length_reward(completions, **kwargs):
    return [float(len(completion.split())) for completion in completions]


def judge_down_on_process_1(completions, **kwargs):
    if PartialState().process_index == 1:
        raise ConnectionError("judge unavailable")
    return length_reward(completions)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--reward_model", required=True)
    parser.add_argument("--cache_dir", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--fail_on_process_1", action="store_true", help="Only the stage, with a judge failing there.")
    parser.add_argument("--use_vllm", action="store_true", help="Sample with vLLM (a small share of memory, eager).")
    parser.add_argument("--vllm_tensor_parallel_size", type=int, default=1)
    cli = parser.parse_args()

    state = PartialState(cpu=True)  # without it, accelerate sees a single process under torchrun on a CPU machine
    rows = pointwise_rows()
    dataset = Dataset.from_dict({"prompt": rows["prompt"], "completion": rows["completion"]})
    reward_funcs = [length_reward, cli.reward_model]
    # Small batches and chunks: each process gets a different share of each chunk and batches it differently
    settings = dict(
        num_generations=3, max_completion_length=6, generation_batch_size=2, reference_chunk_size=4,
        reward_weights=[1.0, 2.0], reference_cache_dir=os.path.join(cli.cache_dir, "function"),
    )
    if cli.use_vllm:
        settings.update(
            use_vllm=True, vllm_gpu_memory_utilization=0.1, vllm_enforce_eager=True,
            vllm_tensor_parallel_size=cli.vllm_tensor_parallel_size,
        )
    config = ReferenceConfig(keep_ref_completions=True, **settings)
    if cli.fail_on_process_1:
        precompute_rewards(dataset, cli.model, [judge_down_on_process_1, cli.reward_model], config)
        return
    completed = precompute_rewards(dataset, cli.model, reward_funcs, config)

    settings["reference_cache_dir"] = os.path.join(cli.cache_dir, "trainer")
    args = make_args(
        QRPOConfig, os.path.join(os.path.dirname(cli.output), "run"), learning_rate=0.01, max_steps=2,
        per_device_train_batch_size=4 // state.num_processes, **settings,
    )
    trainer = QRPOTrainer(model=cli.model, args=args, train_dataset=dataset, reward_funcs=reward_funcs)
    trainer.train()
    if state.is_main_process:
        result = {
            "num_processes": state.num_processes,
            "completion": list(completed["completion"]),
            "reward": list(completed["reward"]),
            "ref_rewards": list(completed["ref_rewards"]),
            "ref_completions": list(completed["ref_completions"]),
            "trainer_reward": list(trainer.train_dataset["reward"]),
            "trainer_ref_rewards": list(trainer.train_dataset["ref_rewards"]),
            "trainer_losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
        }
        with open(cli.output, "w") as f:
            json.dump(result, f)


if __name__ == "__main__":
    main()
