"""The map stage and training under two processes (DDP over gloo on CPU) on an in-memory dataset."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest


SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "train_tiny.py")
pytestmark = pytest.mark.slow


def run(command, output, env_port):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(env_port)}
    completed = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert completed.returncode == 0, completed.stderr[-4000:]
    with open(output) as f:
        return json.load(f)


@pytest.mark.parametrize("method", ["qrpo", "rpo"])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_two_processes_match_one(tiny_llama_path, tmp_path, method, lora):
    flags = ["--method", method, "--model", tiny_llama_path] + (["--lora"] if lora else [])
    single = run(
        [sys.executable, SCRIPT, *flags, "--output", str(tmp_path / "one.json"), "--per_device_train_batch_size", "4"],
        tmp_path / "one.json",
        29511,
    )
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    double = run(
        [*torchrun, SCRIPT, *flags, "--output", str(tmp_path / "two.json"), "--per_device_train_batch_size", "2"],
        tmp_path / "two.json",
        29512,
    )
    assert (single["num_processes"], double["num_processes"]) == (1, 2)
    # The map stage sees the whole dataset on every rank (RPO's V(x) needs every completion of a prompt)
    np.testing.assert_allclose(double["ref_logps"], single["ref_logps"], rtol=1e-6)
    np.testing.assert_allclose(double["target"], single["target"], rtol=1e-6, atol=1e-9)
    # Same global batch of 4: the same losses
    np.testing.assert_allclose(double["losses"], single["losses"], rtol=1e-4)
