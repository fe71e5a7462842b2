"""
Two processes on CPU with the shipped accelerate configs (DDP, ZeRO-2, ZeRO-3 over gloo) against one process with the
same global batch, and the `qrpo-trl` command relaunching itself under `accelerate launch`: resuming under ZeRO-3, and
failing cleanly.

Launches are what costs here (each process imports torch, transformers and TRL), so each launch trains several jobs
(`workers/train_tiny.py`), the one-process baseline is shared, and the resume test resumes the ZeRO-3 launch's run.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import pointwise_rows
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM


pytestmark = pytest.mark.slow

ROOT = Path(__file__).parent.parent
DRIVER = Path(__file__).parent / "workers" / "train_tiny.py"
LORA = ["--use_peft", "--lora_r", "4", "--lora_alpha", "8", "--lora_target_modules", "q_proj", "v_proj"]
# RPO with the per-token mean (its paper's code) keys another cache than QRPO, so that each job scores its data
# QRPO packed (`padding_free`): a `max_length` no row reaches keys another cache, so that it scores its data itself
JOBS = {
    "qrpo": ["qrpo"],
    "rpo": ["rpo", "--logps_normalization", "mean"],
    "qrpo_lora": ["qrpo", *LORA],
    "qrpo_packed": ["qrpo", "--padding_free", "true", "--max_length", "512"],
    # Shared prompts, and padded batches of the same prompt groups to compare them with
    "qrpo_shared": [
        "qrpo", "--padding_free", "true", "--share_prompt", "true", "--group_by_prompt", "true", "--max_length", "511"
    ],
    "qrpo_grouped": ["qrpo", "--group_by_prompt", "true", "--max_length", "510"],
}
# The jobs each shipped config trains with 2 processes; ZeRO-3's QRPO run saves the checkpoint the resume test uses
TWO_PROCESS_JOBS = {
    "ddp": ["qrpo", "rpo", "qrpo_lora", "qrpo_packed", "qrpo_shared"], "zero2": ["qrpo", "rpo"], "zero3": ["qrpo", "rpo"]
}
GLOBAL_BATCH = 4


def free_port() -> int:
    """A port for `main_process_port`: concurrent launches on this machine must not share one."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Workspace:
    """A jsonl dataset, a tiny recipe and a datasets cache per launch group, in one temporary directory."""

    def __init__(self, root: Path, model_path: str):
        self.root = root
        self.data = root / "data.jsonl"
        rows = pointwise_rows()
        with open(self.data, "w") as f:
            for i in range(len(rows["prompt"])):
                f.write(json.dumps({key: values[i] for key, values in rows.items()}) + "\n")
        self.model_path = model_path
        self.recipe = root / "tiny.yaml"
        recipe = {
            "model_name_or_path": model_path,
            "dataset_name": str(self.data),
            "use_cpu": True,
            "bf16": False,
            "report_to": "none",
            "max_steps": 6,  # two epochs of 3 steps of the global batch
            "learning_rate": 0.01,
            "logging_steps": 1,
            "save_strategy": "no",
            "gradient_checkpointing": False,
            "seed": 42,
            "precompute_ref_batch_size": 3,
        }
        self.recipe.write_text(yaml.safe_dump(recipe))

    def env(self, cache: str) -> dict:
        # Each launch group gets its own datasets cache, so that each computes its reference log-probs itself
        return {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1",
            "TQDM_DISABLE": "1",
            "HF_DATASETS_CACHE": str(self.root / f"cache-{cache}"),
        }

    def run(self, command: list[str], cache: str, check=True) -> subprocess.CompletedProcess:
        completed = subprocess.run(command, capture_output=True, text=True, env=self.env(cache), timeout=600)
        if check:
            assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-5000:]
        return completed

    def train(self, name: str, jobs: list[str], per_device_batch: int, launch: list[str] = ()) -> list[dict]:
        """Run the driver over `jobs` (one process, or under `accelerate launch` options); the results of each rank."""
        output = self.root / name
        output.mkdir()
        specs = {}
        for job in jobs:
            command, *extra = JOBS[job]
            args = ["--config", str(self.recipe), "--output_dir", str(output / job)]
            args += ["--per_device_train_batch_size", str(per_device_batch), *extra]
            if (name, job) == ("zero3", "qrpo"):
                args += ["--save_strategy", "steps", "--save_steps", "3"]
            specs[job] = [command, *args]
        (output / "jobs.json").write_text(json.dumps(specs))
        launcher = [sys.executable, "-m", "accelerate.commands.launch", *launch] if launch else [sys.executable]
        self.run([*launcher, str(DRIVER), str(output / "jobs.json"), str(output)], cache=name)
        return [json.loads(path.read_text()) for path in sorted(output.glob("rank*.json"))]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_llama_path):
    return Workspace(tmp_path_factory.mktemp("distributed"), tiny_llama_path)


@pytest.fixture(scope="module")
def baseline(workspace):
    """Every job in one process with the whole global batch."""
    (results,) = workspace.train("one", list(JOBS), GLOBAL_BATCH)
    return results


@pytest.fixture(scope="module")
def two_processes(workspace):
    """The results of each rank of the 2-process launch of a shipped accelerate config, launched once per module."""
    runs = {}

    def launched(config: str) -> list[dict]:
        if config not in runs:
            launch = ["--config_file", str(ROOT / "configs" / "accelerate" / f"{config}.yaml"), "--num_processes", "2"]
            launch += ["--mixed_precision", "no", "--main_process_port", str(free_port())]
            runs[config] = workspace.train(config, TWO_PROCESS_JOBS[config], GLOBAL_BATCH // 2, launch)
        return runs[config]

    return launched


@pytest.mark.parametrize("config", list(TWO_PROCESS_JOBS))
def test_two_processes_match_one(config, baseline, two_processes):
    ranks = two_processes(config)
    assert len(ranks) == 2
    for job in TWO_PROCESS_JOBS[config]:
        one = baseline[job]
        assert one["rows_scored"] == len(one["ref_logps"])
        for rank in ranks:
            result = rank[job]
            assert result["num_processes"] == 2
            # ZeRO-3 really partitions the parameters, and the cache key still hashes the whole reference model
            assert result["partitioned"] == (config == "zero3")
            assert result["model_hash"] == one["model_hash"]
            # The map stage leaves the whole columns on every process (RPO's V(x) needs every completion of a prompt)
            np.testing.assert_allclose(result["ref_logps"], one["ref_logps"], rtol=1e-5)
            np.testing.assert_allclose(result["target"], one["target"], rtol=1e-5, atol=1e-7)
        # ... computed once: each process scored its half, from the tokenised dataset cached once for both
        assert [rank[job]["rows_scored"] * 2 for rank in ranks] == [one["rows_scored"]] * 2
        assert ranks[0][job]["cache_files"] == ranks[1][job]["cache_files"]

        # Same global batch, so the same loss at every step; metrics are averaged over both processes
        log, expected = ranks[0][job]["log"], one["log"]
        assert log.keys() == expected.keys() and len(log["loss"]) == 6
        np.testing.assert_allclose(log["loss"], expected["loss"], rtol=1e-4)
        for key in log:
            np.testing.assert_allclose(log[key], expected[key], rtol=1e-4, atol=1e-6, err_msg=key)


def test_packed_training_matches_padded(baseline):
    """One process, the same global batches: packed (`padding_free`) logs what padded batches log."""
    packed, padded = baseline["qrpo_packed"], baseline["qrpo"]
    np.testing.assert_allclose(packed["ref_logps"], padded["ref_logps"], rtol=1e-5, atol=1e-5)
    assert packed["log"].keys() == padded["log"].keys()
    for key in padded["log"]:
        np.testing.assert_allclose(packed["log"][key], padded["log"][key], rtol=1e-4, atol=1e-6, err_msg=key)


def test_command_resumes_under_zero3(workspace, two_processes):
    """Relaunched by `qrpo-trl` under the shipped ZeRO-3 config, a run resumed from the checkpoint of step 3 of the
    uninterrupted ZeRO-3 run continues its loss curve, ends with its weights, and reuses its cached reference
    log-probs."""
    uninterrupted = two_processes("zero3")[0]["qrpo"]
    first_run = workspace.root / "zero3" / "qrpo"
    cache = workspace.root / "cache-zero3"

    def cached_ref_logps() -> dict:
        return {path: path.stat().st_mtime_ns for path in cache.rglob("qrpo_trl-ref_logps-*")}

    cached = cached_ref_logps()
    assert len(cached) == 2  # the launch's QRPO and RPO runs
    output = workspace.root / "resumed"
    command = [sys.executable, "-m", "qrpo_trl.cli", "qrpo", "--config", str(workspace.recipe)]
    command += ["--output_dir", str(output), "--per_device_train_batch_size", str(GLOBAL_BATCH // 2)]
    command += ["--save_strategy", "steps", "--save_steps", "3"]
    command += ["--resume_from_checkpoint", str(first_run / "checkpoint-3")]
    command += ["--accelerate_config", "zero3", "--num_processes", "2", "--main_process_port", str(free_port())]
    workspace.run(command, cache="zero3")

    state = json.loads((output / "checkpoint-6" / "trainer_state.json").read_text())
    losses = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
    assert len(losses) == 6  # steps 1-3 restored from the checkpoint, 4-6 trained after resuming
    np.testing.assert_allclose(losses[3:], uninterrupted["log"]["loss"][3:], rtol=1e-5)
    # Not recomputed: no cache file rewritten, none added
    assert cached_ref_logps() == cached
    # The 16-bit weights ZeRO-3 gathers at save load back, equal to the uninterrupted run's at step 6
    resumed = AutoModelForCausalLM.from_pretrained(output).state_dict()
    expected = load_file(first_run / "checkpoint-6" / "model.safetensors")
    assert expected.keys() <= resumed.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=1e-5, atol=1e-6, msg=name)


def test_launched_command_fails_in_one_line(workspace, tmp_path):
    """Bad input found inside the launched processes: their one-line errors, then the command's, and no traceback."""
    command = [sys.executable, "-m", "qrpo_trl.cli", "qrpo", "--config", str(workspace.recipe)]
    rows = pointwise_rows()
    rows["reward"][5] = None
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps({k: v[i] for k, v in rows.items()}) + "\n" for i in range(len(rows["prompt"]))))
    launch = ["--accelerate_config", "ddp", "--num_processes", "2", "--main_process_port", str(free_port())]
    failed = workspace.run([*command, "--dataset_name", str(bad), *launch], cache="errors", check=False)
    assert failed.returncode == 1
    lines = failed.stderr.strip().splitlines()
    expected = "qrpo-trl qrpo: error: Column 'reward' of the train dataset, row 5: expected a finite number, got None"
    assert sum(line.startswith(expected) for line in lines) == 2  # one per process
    assert lines[-1] == "qrpo-trl qrpo: error: the launched processes failed (see their errors above)"
    assert "Traceback" not in failed.stderr


def test_shared_prompt_training_matches_padded(baseline):
    """One process, the same global batches of whole prompt groups: shared prompts log what padded batches log."""
    shared, padded = baseline["qrpo_shared"], baseline["qrpo_grouped"]
    np.testing.assert_allclose(shared["ref_logps"], padded["ref_logps"], rtol=1e-5, atol=1e-5)
    assert shared["log"].keys() == padded["log"].keys()
    for key in padded["log"]:
        np.testing.assert_allclose(shared["log"][key], padded["log"][key], rtol=1e-4, atol=1e-6, err_msg=key)
