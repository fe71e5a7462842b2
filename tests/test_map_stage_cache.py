"""The map stage's caches, for a dataset backed by files: keyed by what the columns depend on, and nothing else."""

import json
from pathlib import Path

import datasets
import pytest
from conftest import make_args, pointwise_rows
from datasets import load_dataset

from qrpo_trl import QRPOConfig, QRPOTrainer, RPOConfig, RPOTrainer


@pytest.fixture
def data_file(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    rows = pointwise_rows()
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps({k: v[i] for k, v in rows.items()}) + "\n" for i in range(len(rows["prompt"]))))
    return str(path)


def map_stage_caches(trainer_class, config_class, model, data_file, output_dir, **settings):
    """The files the map stage reads: the tokenised dataset's, and the cached reference log-probs of that dataset."""
    dataset = load_dataset("json", data_files=data_file, split="train")
    trainer = trainer_class(model=model, args=make_args(config_class, output_dir, **settings), train_dataset=dataset)
    tokenized = {f["filename"] for f in trainer.train_dataset.cache_files}
    cached_ref_logps = Path(datasets.config.HF_DATASETS_CACHE).rglob("qrpo_trl-ref_logps-*")
    return tokenized, sorted(path.name for path in cached_ref_logps)


def test_a_resumed_run_reuses_the_caches(tiny_llama_path, data_file, tmp_path):
    first = map_stage_caches(QRPOTrainer, QRPOConfig, tiny_llama_path, data_file, tmp_path / "a")
    assert len(first[1]) == 1
    # Another method, output directory, learning rate, or a resumed run: the same tokenised data and reference
    resumed = map_stage_caches(
        RPOTrainer,
        RPOConfig,
        tiny_llama_path,
        data_file,
        tmp_path / "b",
        learning_rate=0.5,
        resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-3"),
    )
    assert resumed == first
    # A setting the log-probabilities depend on: new ones
    _, ref_caches = map_stage_caches(
        QRPOTrainer, QRPOConfig, tiny_llama_path, data_file, tmp_path / "c", logps_normalization="mean"
    )
    assert len(ref_caches) == 2
