"""
The reference stage sampling with vLLM (`use_vllm=True`), for real on this machine's CPU: results independent of
chunking and order, resumed after a kill, the engine's memory given back when sampling ends, chat-templated prompts
scored by a reward model through the trainer and the CLI, and several processes. Each stage run starts its engine
(eager, ~15-45 s here). vLLM's sampler alone: tests/test_vllm_engine.py. Run by `make test-vllm`.
"""

import gc
import glob
import json
import os
import subprocess
import sys
import threading
from importlib.util import find_spec

import numpy as np
import psutil
import pyarrow as pa
import pytest
import torch
from conftest import kill_after_two_chunks, make_args
from datasets import Dataset, load_from_disk
from sampling_checks import save_peaked_llama
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
from trl.data_utils import apply_chat_template

from qrpo_trl import QRPOConfig, QRPOTrainer, ReferenceConfig, cli, precompute_rewards


pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(find_spec("vllm") is None, reason="vLLM is not installed (`make test-vllm` installs it)"),
]

ENGINE = dict(use_vllm=True, vllm_gpu_memory_utilization=0.1, vllm_enforce_eager=True)
PROMPTS = ["what is the sky", "tell me about the sea", "hello", "tell me about the grass", "what is one two"]
SCRIPTS = os.path.join(os.path.dirname(__file__), "workers")


def length_reward(completions, **kwargs):
    return [float(len(completion.split())) for completion in completions]


@pytest.fixture(scope="module")
def peaked_path(tmp_path_factory, tokenizer):
    return save_peaked_llama(tmp_path_factory.mktemp("peaked"), tokenizer)


def vllm_args(tmp_path, **overrides):
    settings = dict(
        num_generations=3, max_completion_length=6, reference_chunk_size=3, keep_ref_completions=True,
        reference_cache_dir=str(tmp_path / "cache"), **ENGINE,
    )
    return ReferenceConfig(**{**settings, **overrides})


class PeakMemory:
    """The process's peak resident memory while the block runs, sampled every 10 ms."""

    def __enter__(self):
        self.peak, self._done = psutil.Process().memory_info().rss, threading.Event()
        self._thread = threading.Thread(target=self._sample)
        self._thread.start()
        return self

    def _sample(self):
        while not self._done.wait(0.01):
            self.peak = max(self.peak, psutil.Process().memory_info().rss)

    def __exit__(self, *exc):
        self._done.set()
        self._thread.join()


@pytest.fixture(scope="module")
def first_run(peaked_path, tmp_path_factory):
    """
    The stage with vLLM on 5 prompts (5 chunks), the first engine of the process (after `import vllm`), with what the
    process looks like before, during and after it.
    """
    import vllm  # noqa: F401  (its import's memory is not the engine's)

    model = AutoModelForCausalLM.from_pretrained(peaked_path)
    environment, threads = dict(os.environ), torch.get_num_threads()
    gc.collect()
    before = psutil.Process().memory_info().rss
    with PeakMemory() as during:
        result = precompute_rewards(
            Dataset.from_dict({"prompt": PROMPTS}), model, length_reward, vllm_args(tmp_path_factory.mktemp("first"))
        )
    gc.collect()
    after = psutil.Process().memory_info().rss
    return dict(
        result=result, model=model, before=before, peak=during.peak, after=after,
        environment_changes={
            name: (environment.get(name), os.environ.get(name))
            for name in set(environment) | set(os.environ) if environment.get(name) != os.environ.get(name)
        },
        threads=threads, live_engines=sum(isinstance(obj, vllm.LLM) for obj in gc.get_objects()),
        process_group=torch.distributed.is_initialized(),
    )


def test_the_engine_is_gone_when_the_stage_returns(first_run):
    """Its memory given back, no engine object or process group left, `torch.set_num_threads` working again."""
    before, peak, after = first_run["before"], first_run["peak"], first_run["after"]
    print(f"RSS before the stage {before / 2**20:.0f} MiB, peak {peak / 2**20:.0f}, after {after / 2**20:.0f}")
    assert after - before < (peak - before) / 3
    assert first_run["live_engines"] == 0 and not first_run["process_group"]
    assert torch.get_num_threads() == first_run["threads"]
    torch.set_num_threads(1)
    assert torch.get_num_threads() == 1
    torch.set_num_threads(first_run["threads"])
    assert first_run["environment_changes"] == {}


def test_same_completions_whatever_the_chunking_and_order(first_run, tmp_path):
    result = first_run["result"]
    reference = dict(zip(result["prompt"], result["ref_completions"]))
    assert len({completion for completions in reference.values() for completion in completions}) > 5
    assert result["ref_rewards"] == [length_reward(completions) for completions in result["ref_completions"]]
    reordered = precompute_rewards(
        Dataset.from_dict({"prompt": PROMPTS[::-1]}), first_run["model"], length_reward,
        vllm_args(tmp_path, reference_chunk_size=100),
    )
    assert dict(zip(reordered["prompt"], reordered["ref_completions"])) == reference


def test_killed_run_resumes_with_the_uninterrupted_result(first_run, peaked_path, tmp_path):
    """A vLLM run killed with SIGKILL after some chunks, run again, samples only the others: the same result."""
    cache = tmp_path / "cache"

    def command(name, delay):
        return [
            sys.executable, os.path.join(SCRIPTS, "reference_stage_run.py"), "--model", peaked_path, "--use_vllm",
            "--cache_dir", str(cache), "--output", str(tmp_path / f"{name}.json"), "--generate_delay", str(delay),
        ]

    sampling_dir, done = kill_after_two_chunks(command("killed", 2.0), cache, tmp_path / "killed.log", 600)
    assert not (tmp_path / "killed.json").exists()

    completed = subprocess.run(command("resumed", 0.0), capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    resumed = json.loads((tmp_path / "resumed.json").read_text())
    assert resumed["generate_calls"] == 5 - done
    assert resumed["result"] == first_run["result"].to_dict()  # the script's settings are `vllm_args`'s


@torch.no_grad()
def conversational_scores(reward_model_path, prompts, completions):
    """The reward model's scores of chat-templated conversations (prompt and completion messages), one forward each."""
    reward_model = AutoModelForSequenceClassification.from_pretrained(reward_model_path)
    tokenizer = AutoTokenizer.from_pretrained(reward_model_path)
    scores = []
    for prompt, completion in zip(prompts, completions, strict=True):
        text = apply_chat_template({"messages": prompt + completion}, tokenizer)
        inputs = tokenizer(text["text"], return_tensors="pt", add_special_tokens=False)
        scores.append(reward_model(**inputs).logits[0, 0].item())
    return scores


def test_chat_prompts_sampled_with_vllm_scored_by_a_reward_model(peaked_path, tiny_reward_model_path, tmp_path):
    """Through `QRPOTrainer(reward_funcs=...)`, which then trains, and through `qrpo-trl precompute`."""
    prompts = [[{"role": "user", "content": prompt}] for prompt in PROMPTS[:3]]
    dataset = Dataset.from_dict({
        "prompt": prompts, "completion": [[{"role": "assistant", "content": "blue"}]] * 3,
    })
    args = make_args(
        QRPOConfig, tmp_path / "out", num_generations=4, max_completion_length=6, keep_ref_completions=True,
        reference_cache_dir=str(tmp_path / "cache"), max_steps=2, **ENGINE,
    )
    trainer = QRPOTrainer(model=peaked_path, args=args, train_dataset=dataset, reward_funcs=tiny_reward_model_path)
    prepared = trainer.train_dataset
    for row in prepared:
        assert len(row["ref_completions"]) == 4 and row["ref_completions"][0][0]["role"] == "assistant"
        expected = conversational_scores(tiny_reward_model_path, [row["prompt"]] * 4, row["ref_completions"])
        np.testing.assert_allclose(row["ref_rewards"], expected, rtol=1e-5)
    trainer.train()
    assert all(np.isfinite(entry["loss"]) for entry in trainer.state.log_history if "loss" in entry)

    with open(tmp_path / "data.jsonl", "w") as f:
        for prompt in prompts:
            f.write(json.dumps({"prompt": prompt}) + "\n")
    (tmp_path / "precompute.yaml").write_text(
        f"model_name_or_path: {peaked_path}\n"
        "datasets:\n  - path: json\n    data_files: data.jsonl\n"
        f"reward_funcs: [{tiny_reward_model_path}]\n"
        "num_generations: 2\nmax_completion_length: 6\n"
        "use_vllm: true\nvllm_gpu_memory_utilization: 0.1\nvllm_enforce_eager: true\n"
        "reference_cache_dir: cache\noutput_dir: completed\n"
    )
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert cli.main(["precompute", "--config", "precompute.yaml"]) == 0
    finally:
        os.chdir(cwd)
    completed = load_from_disk(str(tmp_path / "completed"))["train"]
    assert len(completed) == 6  # a prompt-only dataset: 2 sampled completions per prompt
    np.testing.assert_allclose(
        completed["reward"],
        conversational_scores(tiny_reward_model_path, completed["prompt"], completed["completion"]),
        rtol=1e-5,
    )


def run_tiny_script(tmp_path, name, launcher, model, reward_model, *options, port):
    output = tmp_path / f"{name}.json"
    command = [
        *launcher, os.path.join(SCRIPTS, "reference_stage_tiny.py"), "--model", model, "--reward_model", reward_model,
        "--cache_dir", str(tmp_path / f"cache-{name}"), "--output", str(output), "--use_vllm", *options,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(port)}
    completed = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    assert completed.returncode == 0, completed.stderr[-4000:]
    return json.loads(output.read_text())


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


@pytest.fixture(scope="module")
def one_process(peaked_path, tiny_reward_model_path, tmp_path_factory):
    """The stage with vLLM, then QRPO training on what it computed, in one process."""
    return run_tiny_script(
        tmp_path_factory.mktemp("one"), "one", [sys.executable], peaked_path, tiny_reward_model_path, port=29571
    )


def assert_same_run(double, single):
    assert (single["num_processes"], double["num_processes"]) == (1, 2)
    assert double["ref_completions"] == single["ref_completions"]
    for key in ("reward", "ref_rewards", "trainer_ref_rewards", "trainer_reward", "trainer_losses"):
        np.testing.assert_allclose(double[key], single[key], rtol=1e-5, err_msg=key)


def sampling_writers(cache_dir):
    """The index of the process that wrote each sampling chunk file of the function's stage."""
    (directory,) = glob.glob(str(cache_dir / "function" / "sampling-*"))
    return [
        int(pa.ipc.open_stream(pa.memory_map(os.path.join(directory, name))).schema.metadata[b"process_index"])
        for name in sorted(os.listdir(directory))
    ]


@pytest.mark.slow
def test_two_processes_with_an_engine_each_match_one(one_process, peaked_path, tiny_reward_model_path, tmp_path):
    """Each process runs its engine and samples its chunks; the engines are shut down, and DDP training follows."""
    double = run_tiny_script(tmp_path, "two", TORCHRUN, peaked_path, tiny_reward_model_path, port=29572)
    assert_same_run(double, one_process)
    assert sampling_writers(tmp_path / "cache-two") == [0, 1, 0]  # chunks dealt round-robin to the engines


@pytest.mark.slow
def test_two_processes_sharing_a_tensor_parallel_engine_match_one(
    one_process, peaked_path, tiny_reward_model_path, tmp_path
):
    """`vllm_tensor_parallel_size=2`: the 2 processes run one engine, the model split over them, and sample together."""
    double = run_tiny_script(
        tmp_path, "tp", TORCHRUN, peaked_path, tiny_reward_model_path, "--vllm_tensor_parallel_size", "2", port=29573
    )
    assert_same_run(double, one_process)
    assert sampling_writers(tmp_path / "cache-tp") == [0, 0, 0]  # every chunk sampled by the group, written by its first
