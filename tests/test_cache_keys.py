"""Cache keys by content: a changed reward function is never served stale rewards; a moved model reuses its cache."""

import importlib
import logging
import os
import shutil
import sqlite3
import sys

import numpy as np
import pytest
from conftest import build_tiny_llama, make_args, pointwise_rows
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from qrpo_trl import QRPOConfig, QRPOTrainer, ReferenceConfig, precompute_rewards
from qrpo_trl.reference_stage import RewardFunctions


def stage_args(tmp_path):
    return ReferenceConfig(
        num_generations=2, max_completion_length=4, generation_batch_size=4, reference_cache_dir=str(tmp_path / "cache")
    )


def prompts():
    return Dataset.from_dict({"prompt": ["what is the sky", "hello"], "completion": [" blue", " yes"]})


# Two reward functions defined on one line: the same source line, different code
ones, twos = (lambda completions, **kwargs: [1.0] * len(completions)), (lambda completions, **kwargs: [2.0] * len(completions))  # fmt: skip


def test_two_lambdas_on_one_line_are_two_reward_functions(tokenizer, tmp_path):
    model = build_tiny_llama(tokenizer)
    first = precompute_rewards(prompts(), model, ones, stage_args(tmp_path), processing_class=tokenizer)
    second = precompute_rewards(prompts(), model, twos, stage_args(tmp_path), processing_class=tokenizer)
    assert first["reward"] == [1.0, 1.0] and np.all(np.array(first["ref_rewards"]) == 1.0)
    assert second["reward"] == [2.0, 2.0] and np.all(np.array(second["ref_rewards"]) == 2.0)


SCALE = 1.0


def scaled(completion):
    return SCALE * len(completion.split())


def scaled_length_reward(completions, **kwargs):
    return [scaled(completion) for completion in completions]


def fingerprint(func):
    return RewardFunctions(func).fingerprint


def test_an_edited_global_or_helper_changes_the_key(monkeypatch, tmp_path):
    before = fingerprint(scaled_length_reward)
    assert fingerprint(scaled_length_reward) == before  # stable
    monkeypatch.setattr(sys.modules[__name__], "SCALE", 2.0)  # a global that the helper reads
    assert fingerprint(scaled_length_reward) != before

    # A helper in a module of the user's, edited between runs (dill alone would record its name only)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    (tmp_path / "judge_helpers.py").write_text("def score(text):\n    return len(text)\n")
    helpers = importlib.import_module("judge_helpers")

    def module_reward(completions, **kwargs):
        return [float(helpers.score(completion)) for completion in completions]

    before = fingerprint(module_reward)
    (tmp_path / "judge_helpers.py").write_text("def score(text):\n    return 2 * len(text)\n")
    importlib.reload(helpers)
    assert fingerprint(module_reward) != before


def test_a_callable_that_cannot_be_fingerprinted_is_recomputed_with_a_warning(tokenizer, tmp_path, caplog):
    database = sqlite3.connect(":memory:")  # a judge's state, which cannot be hashed
    database.execute("create table calls (n)")

    def judged_reward(completions, **kwargs):
        database.execute("insert into calls values (1)")
        return [1.0] * len(completions)

    def calls():
        return database.execute("select count(*) from calls").fetchone()[0]

    model = build_tiny_llama(tokenizer)
    with caplog.at_level(logging.WARNING):
        precompute_rewards(prompts(), model, judged_reward, stage_args(tmp_path), processing_class=tokenizer)
        scored = calls()
        precompute_rewards(prompts(), model, judged_reward, stage_args(tmp_path), processing_class=tokenizer)
    assert scored > 0 and calls() == 2 * scored  # scored again, not read from the cache
    assert "The reward function 'judged_reward' cannot be fingerprinted reliably (the variable 'database'" in caplog.text


def length_reward(completions, **kwargs):
    return [float(len(completion.split())) for completion in completions]


def test_a_copied_model_directory_reuses_the_cache(tiny_llama_path, tmp_path, monkeypatch, caplog):
    copy = shutil.copytree(tiny_llama_path, tmp_path / "copy")

    def run(path, **tokenizer_kwargs):
        model = AutoModelForCausalLM.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path, **tokenizer_kwargs)
        caplog.clear()
        with caplog.at_level(logging.INFO):
            result = precompute_rewards(prompts(), model, length_reward, stage_args(tmp_path), processing_class=tokenizer)
        return result, "loaded from the cache" in caplog.text

    first, loaded = run(tiny_llama_path)
    assert not loaded
    again, loaded = run(str(copy))
    assert loaded and again.to_dict() == first.to_dict()
    # Offline mode switched on after import, or the loading option it sets, is not part of the key
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _, loaded = run(str(copy), local_files_only=False)
    assert loaded


def test_trainer_reference_log_probs_of_a_copied_model_are_reused(tiny_llama_path, tmp_path, monkeypatch):
    copy = shutil.copytree(tiny_llama_path, tmp_path / "copy")
    dataset = Dataset.from_dict(pointwise_rows())
    dataset = dataset.map(lambda row: row, cache_file_name=str(tmp_path / "data" / "rows.arrow"))  # backed by a file

    def reference_passes(path):
        calls = []
        original = QRPOTrainer.compute_ref_log_probs
        monkeypatch.setattr(QRPOTrainer, "compute_ref_log_probs", lambda self, *a: calls.append(1) or original(self, *a))
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=path == tiny_llama_path)
        QRPOTrainer(model=path, args=make_args(QRPOConfig, tmp_path / "out"), train_dataset=dataset, processing_class=tokenizer)
        return len(calls)

    assert reference_passes(tiny_llama_path) > 0
    assert reference_passes(str(copy)) == 0  # read from the cache next to the dataset's files
