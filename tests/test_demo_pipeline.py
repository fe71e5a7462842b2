"""The demo end to end: the quick variant at tiny sizes (every stage, every output), comparison mode, the full demo."""

import json
import math
import os

import pytest

from qrpo_trl.demo.__main__ import main, parse_config


# The quick variant shrunk to seconds: a few SFT steps, 2 samples of 8 tokens per prompt, a few QRPO steps
TINY = [
    "--quick", "--sft_steps", "4", "--num_heldout_topics", "4", "--rules_per_topic", "1", "--max_train_prompts", "8",
    "--num_generations", "2", "--num_eval_generations", "2", "--max_completion_length", "8",
]  # fmt: skip


def run_tiny(tmp_path, *flags):
    output_dir = str(tmp_path / "out")
    return output_dir, main([*TINY, "--output_dir", output_dir, "--cache_dir", str(tmp_path / "cache"), *flags])


def check_policy_figures(figures: dict, num_prompts: int, num_samples: int):
    assert len(figures["rewards"]) == num_prompts and all(len(row) == num_samples for row in figures["rewards"])
    assert all(0 <= reward <= 1 for row in figures["rewards"] for reward in row)
    low, high = figures["reward_difference_ci95"]
    assert low <= figures["reward_difference"] <= high
    assert 0 <= figures["win_rate"] <= 1
    assert figures["mean_words"] >= 0
    # The KL estimates: the exact next-token KL is >= 0 per sample; no estimate is below 0 beyond its interval
    assert figures["kl"] >= 0 and figures["kl_per_token"] >= 0
    for name in ["kl", "kl_log_ratio", "kl_per_token"]:
        low, high = figures[f"{name}_ci95"]
        assert math.isfinite(figures[name]) and low <= figures[name] <= high and high >= 0, (name, figures)
    assert set(figures["rule_scores"]) >= {"keyword", "max_words", "gate"}


def test_quick_demo_runs_every_stage(tmp_path):
    output_dir, results = run_tiny(tmp_path)
    with open(os.path.join(output_dir, "results.json")) as file:
        written = json.load(file)
    assert written["num_heldout_prompts"] == 4 and written["num_train_prompts"] == 8
    assert set(written["stage_seconds"]) == {
        "SFT of the tiny model from scratch",
        "Reference stage: 2 samples for each of 8 training prompts",
        "Held-out samples of the reference model (4 prompts)",
        "QRPO training (LoRA)",
        "Held-out samples of the qrpo policy",
    }
    check_policy_figures(written["qrpo"], 4, 2)
    assert len(written["reference"]["rewards"]) == 4
    assert any("loss" in entry and "quantile" in entry for entry in written["training_log"])
    assert written["qrpo"] == json.loads(json.dumps(results["qrpo"]))
    for name in ["rewards.png", "training.png"]:
        with open(os.path.join(output_dir, name), "rb") as file:
            assert file.read(8) == b"\x89PNG\r\n\x1a\n"
    for name in ["reference", "qrpo"]:
        with open(os.path.join(output_dir, f"heldout_samples_{name}.jsonl")) as file:
            assert len(file.readlines()) == 8
    assert os.path.exists(os.path.join(output_dir, "qrpo", "adapter_config.json"))


def test_compare_mode_trains_every_method(tmp_path):
    output_dir, results = run_tiny(tmp_path, "--compare")
    with open(os.path.join(output_dir, "comparison.json")) as file:
        written = json.load(file)
    methods = ["QRPO (identity)", "QRPO (log)", "RPO", "DPO (best vs worst)", "KTO (vs median)"]
    assert list(written["methods"]) == methods
    for figures in written["methods"].values():
        check_policy_figures(figures, 4, 2)
    with open(os.path.join(output_dir, "reward_vs_kl.png"), "rb") as file:
        assert file.read(8) == b"\x89PNG\r\n\x1a\n"


def test_quick_defaults_and_overrides():
    assert parse_config([]).model_name_or_path is None and not parse_config([]).quick
    quick = parse_config(["--quick"])
    assert quick.quick and quick.output_dir == "outputs/demo-quick"
    assert parse_config(["--quick", "--beta", "0.7"]).beta == 0.7


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--num_generations", "1"], "num_generations"),
        (["--num_eval_generations", "0"], "num_eval_generations"),
        (["--num_heldout_topics", "48"], "num_heldout_topics"),
        (["--max_train_prompts", "0"], "max_train_prompts"),
        (["--transform", "cube"], "transform"),
    ],
)
def test_bad_settings_are_refused(flags, message):
    with pytest.raises(ValueError, match=message):
        parse_config(flags)


@pytest.mark.demo
def test_full_demo_improves_the_heldout_reward(tmp_path):
    results = main(["--output_dir", str(tmp_path)])
    low, _ = results["qrpo"]["reward_difference_ci95"]
    assert low > 0, results["qrpo"]
