"""Train the jobs of a JSON file in one process, each as `qrpo-trl` would, and dump what the distributed tests compare.

    python train_tiny.py JOBS_JSON OUTPUT_DIR                            # one process
    accelerate launch --config_file ... train_tiny.py JOBS_JSON OUTPUT_DIR  # several

JOBS_JSON maps a job name to the arguments of a `qrpo-trl` training command (`["qrpo", "--config", ...]`). Several jobs
share one launch, which is what costs on CPU. Every process writes `OUTPUT_DIR/rank<N>.json`: per job, the map stage's
columns as this process holds them, the rows it scored, the model hash keying the cache, and the logged metrics.
"""

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

from qrpo_trl import DROTrainer, PointwiseTrainer, QRPOTrainer, RPOTrainer  # noqa: E402
from qrpo_trl.cli import command_parser  # noqa: E402
from qrpo_trl.scripts.utils import build_trainer  # noqa: E402


TRAINERS = {"qrpo": QRPOTrainer, "rpo": RPOTrainer, "dro": DROTrainer}
LOGGED = (
    "loss", "target", "log_ratio", "logps/policy", "logps/ref", "quantile", "value", "value_loss", "residual", "num_tokens",
)


def count_scored_rows(rows: list[int]) -> None:
    """Record the size of every batch the reference model scores in this process."""
    compute_ref_log_probs = PointwiseTrainer.compute_ref_log_probs

    def counting(self, model, inputs):
        rows.append(len(inputs["sample_lengths"] if "sample_lengths" in inputs else inputs["input_ids"]))  # packed: 1 row
        return compute_ref_log_probs(self, model, inputs)

    PointwiseTrainer.compute_ref_log_probs = counting


def main():
    jobs_file, output_dir = sys.argv[1:]
    with open(jobs_file) as f:
        jobs = json.load(f)
    scored = []
    count_scored_rows(scored)
    results = {}
    for name, (command, *args) in jobs.items():
        *dataclasses, _ = command_parser(command).parse_command(args)
        scored.clear()
        trainer = build_trainer(TRAINERS[command], *dataclasses)
        rows_scored = sum(scored)
        trainer.train()
        prepared = trainer.train_dataset
        log = {}
        for entry in trainer.state.log_history:
            for key, value in entry.items():
                if key in LOGGED:
                    log.setdefault(key, []).append(value)
        results[name] = {
            "num_processes": trainer.accelerator.num_processes,
            "partitioned": any(hasattr(param, "ds_id") for param in trainer.model.parameters()),
            "model_hash": trainer._precompute_model_hash,
            "rows_scored": rows_scored,
            "cache_files": [os.path.basename(f["filename"]) for f in prepared.cache_files],
            "ref_logps": list(prepared["ref_logps"]),
            "target": list(prepared["target"]),
            "log": log,
        }
        trainer.accelerator.free_memory()
        del trainer
    rank = int(os.environ.get("RANK", 0))
    with open(os.path.join(output_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()
