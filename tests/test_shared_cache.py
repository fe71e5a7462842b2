"""Runs sharing a reference-stage cache directory: a run's start-up scan removes only what runs that are over left."""

import os
import socket
import subprocess
import sys
import time

import pytest
from accelerate import PartialState

from qrpo_trl.reference_stage import storage
from qrpo_trl.reference_stage.storage import STALE_TEMPORARY_SECONDS, ChunkStore

SCRIPT = os.path.join(os.path.dirname(__file__), "workers", "cache_writer.py")


def temporary_files(directory):
    return sorted(name for name in os.listdir(directory) if name.startswith(".tmp-"))


@pytest.mark.slow
def test_a_second_run_does_not_remove_the_file_the_first_is_writing(tmp_path):
    directory, ready, go = tmp_path / "cache", tmp_path / "ready", tmp_path / "go"
    writer = subprocess.Popen(
        [sys.executable, SCRIPT, "write", str(directory), str(ready), str(go)], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not ready.exists() and writer.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert ready.exists(), writer.communicate()
        (in_progress,) = temporary_files(directory)
        scan = subprocess.run([sys.executable, SCRIPT, "scan", str(directory)], capture_output=True, text=True)
        assert scan.returncode == 0, scan.stderr
        assert "missing: [(0, 2)]" in scan.stdout
        assert temporary_files(directory) == [in_progress]  # the first run's file in progress is kept
    finally:
        go.touch()
        stdout, stderr = writer.communicate(timeout=120)
    assert writer.returncode == 0, stderr
    assert "written: {(0, 2): 'chunk-000000000-000000002-" in stdout
    assert temporary_files(directory) == []


def test_leftover_temporary_files_are_removed_only_when_their_run_is_over(tmp_path):
    directory = tmp_path / "cache"
    directory.mkdir()
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(finished.stdout)
    files = {
        "this machine, process gone": storage.temporary_path(str(directory), pid=dead_pid),
        "this machine, process alive": storage.temporary_path(str(directory)),
        "another machine, recent": storage.temporary_path(str(directory), pid=dead_pid, host="other-" + socket.gethostname()),
        "another machine, stale": storage.temporary_path(str(directory), pid=os.getpid(), host="node-7.cluster"),
        "unknown writer, stale": str(directory / ".tmp-0123"),
    }
    for path in files.values():
        open(path, "wb").close()
    stale = time.time() - STALE_TEMPORARY_SECONDS - 60
    for name in ("another machine, stale", "unknown writer, stale"):
        os.utime(files[name], (stale, stale))
    ChunkStore(str(directory), [(0, 1)], ["x"], PartialState(cpu=True)).missing()
    kept = {name for name, path in files.items() if os.path.exists(path)}
    assert kept == {"this machine, process alive", "another machine, recent"}
