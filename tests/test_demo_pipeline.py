"""The demo end to end: the quick variant at tiny sizes (every stage, every output), comparison mode, the full demo."""

import json
import math
import os
from unittest import mock

import numpy as np
import pytest

from datasets import Dataset

from qrpo_trl.demo.__main__ import main, parse_config
from qrpo_trl.demo.compare import MethodTrainer, best_vs_worst_pairs
from qrpo_trl.demo.frontier import gain_at_kl
from qrpo_trl.demo.pipeline import Setup, best_and_worst, step_budget, training_rows


# The quick variant shrunk to seconds: a few SFT steps, 2 samples of 8 tokens per prompt, 8 training steps
TINY = [
    "--quick", "--sft_steps", "4", "--num_heldout_topics", "4", "--rules_per_topic", "1", "--max_train_prompts", "8",
    "--num_generations", "2", "--num_eval_generations", "2", "--max_completion_length", "8",
    "--per_device_train_batch_size", "4",
]  # fmt: skip
METHODS = ["QRPO (identity)", "QRPO (log)", "RPO", "DPO (best vs worst)", "KTO (vs median)"]


def run_tiny(tmp_path, *flags, output="out"):
    output_dir = str(tmp_path / output)
    return output_dir, main([*TINY, "--output_dir", output_dir, "--cache_dir", str(tmp_path / "cache"), *flags])


def read_json(directory, name):
    with open(os.path.join(directory, name)) as file:
        return json.load(file)


def assert_png(directory, name):
    with open(os.path.join(directory, name), "rb") as file:
        assert file.read(8) == b"\x89PNG\r\n\x1a\n"


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


@pytest.mark.parametrize("bf16", [False, True])
def test_quick_demo_runs_every_stage(tmp_path, bf16):
    output_dir, results = run_tiny(tmp_path, "--bf16", str(bf16))
    with open(os.path.join(output_dir, "results.json")) as file:
        written = json.load(file)
    assert written["config"]["bf16"] is bf16
    assert written["num_heldout_prompts"] == 4 and written["num_train_prompts"] == 8
    # The default trains on each prompt's best and worst of its 2 samples: the prompts whose 2 rewards differ
    assert written["config"]["train_rows"] == "best_worst" and written["num_train_rows"] <= 16
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
        assert_png(output_dir, name)
    for name in ["reference", "qrpo"]:
        with open(os.path.join(output_dir, f"heldout_samples_{name}.jsonl")) as file:
            assert len(file.readlines()) == 8
    assert os.path.exists(os.path.join(output_dir, "qrpo", "adapter_config.json"))


def test_compare_mode_trains_every_method_and_repeats_its_table(tmp_path):
    output_dir, _ = run_tiny(tmp_path, "--compare")
    written = read_json(output_dir, "comparison.json")
    assert list(written["methods"]) == METHODS
    for figures in written["methods"].values():
        check_policy_figures(figures, 4, 2)
    assert any(figures["kl"] > 0 for figures in written["methods"].values())  # the policies moved
    assert_png(output_dir, "reward_vs_kl.png")

    # Rerun (from the cached reference stage): the same figures
    rerun_dir, _ = run_tiny(tmp_path, "--compare", output="rerun")
    rerun = read_json(rerun_dir, "comparison.json")
    for name, figures in written["methods"].items():
        assert {k: v for k, v in rerun["methods"][name].items() if k != "train_seconds"} == {
            k: v for k, v in figures.items() if k != "train_seconds"
        }, name


def test_dro_is_a_method_of_the_frontier(tmp_path):
    output_dir, details = run_tiny(tmp_path, "--frontier", "--methods", "dro", "--dro_betas", "0.1", "1")
    (points,) = details["methods"].values()
    assert list(details["methods"]) == ["DRO"] and [point["beta"] for point in points] == [0.1, 1.0]
    for point in points:
        check_policy_figures(point, 4, 2)
    log = details["training_logs"]["DRO, beta 0.1"]
    assert all(key in entry for entry in log if "loss" in entry for key in ("value", "value_loss", "residual"))


def test_frontier_sweeps_betas_and_repeats_its_points(tmp_path):
    flags = [
        "--frontier", "--methods", "qrpo_log", "dpo", "qrpo_log_all_rows", "--qrpo_log_betas", "0.1", "1",
        "--dpo_betas", "0.1", "1", "--qrpo_log_all_rows_betas", "0.1", "1",
    ]  # fmt: skip
    output_dir, details = run_tiny(tmp_path, *flags)
    frontier = read_json(output_dir, "frontier.json")
    assert list(frontier) == ["methods"]
    assert list(frontier["methods"]) == ["QRPO (log)", "DPO (best vs worst)", "QRPO (log, all rows)"]
    for name, points in frontier["methods"].items():
        assert [point["beta"] for point in points] == [0.1, 1.0]
        for point in points:
            assert list(point) == ["beta", "kl", "reward_difference", "reward_difference_ci95", "win_rate"]
        for point in details["methods"][name]:
            check_policy_figures(point, 4, 2)
    # A larger beta keeps DPO closer to the reference
    dpo = frontier["methods"]["DPO (best vs worst)"]
    assert dpo[1]["kl"] < dpo[0]["kl"]
    assert_png(output_dir, "frontier.png")
    assert read_json(output_dir, "frontier_details.json")["gain_at_matched_kl"].keys() == frontier["methods"].keys()

    rerun_dir, _ = run_tiny(tmp_path, *flags, output="rerun")
    assert read_json(rerun_dir, "frontier.json") == frontier


def test_best_and_worst_rows_are_dpo_pairs():
    rows = [
        ("a", "a1", 0.2), ("b", "b1", 0.5), ("a", "a2", 0.9), ("b", "b2", 0.5), ("a", "a3", 0.1), ("c", "c1", 0.3),
        ("c", "c2", 0.7), ("c", "c3", 0.7),
    ]  # fmt: skip
    data = Dataset.from_dict({name: [row[i] for row in rows] for i, name in enumerate(["prompt", "completion", "reward"])})
    # Prompt b has no spread: left out; ties for the best keep the first
    assert best_and_worst(data) == [(2, 4), (6, 5)]
    assert best_vs_worst_pairs(data).to_list() == [
        {"prompt": "a", "chosen": "a2", "rejected": "a3"}, {"prompt": "c", "chosen": "c2", "rejected": "c1"}
    ]


def sampled_completions(rewards: list[list[float]]) -> Dataset:
    """The reference stage's output for the demo: every sample of a prompt has all the prompt's rewards as references."""
    rows = {"prompt": [], "completion": [], "reward": [], "ref_rewards": []}
    for p, prompt_rewards in enumerate(rewards):
        for c, reward in enumerate(prompt_rewards):
            rows["prompt"].append(f"prompt {p}")
            rows["completion"].append(" " + " ".join(["yes", "no", "maybe", "sure", "blue", "red"][: c + 1]))
            rows["reward"].append(reward)
            rows["ref_rewards"].append(list(prompt_rewards))
    return Dataset.from_dict(rows)


def test_default_trains_on_best_and_worst_rows_with_all_samples_as_references(tiny_llama_path, tmp_path):
    rewards = [[0.2, 0.9, 0.5, 0.1, 0.5], [0.4, 0.3, 0.8, 0.6, 0.8]]
    data = sampled_completions(rewards)
    config = parse_config(["--quick", "--per_device_train_batch_size", "4", "--output_dir", str(tmp_path)])
    # Each variant's default is the rows ahead at matched KL on its model: the recipe on the quick task, all on SmolLM2
    assert config.train_rows == "best_worst" and parse_config([]).train_rows == "all"
    assert training_rows(data, config.train_rows)["completion"] == [data[i]["completion"] for i in (1, 3, 7, 6)]
    assert training_rows(data, "all") is data
    methods = MethodTrainer(config, Setup(tiny_llama_path, None, None, data, None, None))
    # The budget is the same for every method: num_train_epochs (2) passes over all 10 samples at 4 a step
    assert methods.max_steps == step_budget(config, data) == 5

    # QRPO: the best and the worst of each prompt, each quantile among the prompt's 4 other samples (mid-rank ties)
    qrpo = methods.train("qrpo_log", 0.3, str(tmp_path / "qrpo")).train_dataset
    assert qrpo["completion"] == training_rows(data, "best_worst")["completion"]
    np.testing.assert_allclose(qrpo["quantile"], [1.0, 0.0, 0.875, 0.0])
    # RPO: V(x) is the Monte Carlo estimate over all 5 samples of the prompt, not over the 2 rows trained on
    rpo = methods.train("rpo", 0.3, str(tmp_path / "rpo")).train_dataset
    values = [0.3 * np.log(np.mean(np.exp(np.array(prompt_rewards) / 0.3))) for prompt_rewards in rewards]
    np.testing.assert_allclose(rpo["value"], [values[0]] * 2 + [values[1]] * 2, rtol=1e-12)
    # The former behaviour, all rows: the same V(x) on every sample
    rpo_all = methods.train("rpo_all_rows", 0.3, str(tmp_path / "rpo_all")).train_dataset
    np.testing.assert_allclose(rpo_all["value"], [values[0]] * 5 + [values[1]] * 5, rtol=1e-12)


def test_gain_at_matched_kl_interpolates_in_log_kl():
    points = [
        {"kl": 1.0, "reward_difference": 0.1},
        {"kl": 0.1, "reward_difference": 0.0},
        {"kl": 10.0, "reward_difference": 0.4},
    ]
    assert gain_at_kl(points, math.sqrt(0.1)) == pytest.approx(0.05)
    assert gain_at_kl(points, 10**0.25) == pytest.approx(0.175)
    assert gain_at_kl(points, 0.05) is None and gain_at_kl(points, 11.0) is None


def test_quick_defaults_and_overrides():
    assert parse_config([]).model_name_or_path is None and not parse_config([]).quick
    quick = parse_config(["--quick"])
    assert quick.quick and quick.output_dir == "outputs/demo-quick"
    assert parse_config(["--quick", "--beta", "0.7"]).beta == 0.7


@pytest.mark.parametrize("avx512_bf16, amx", [(False, False), (True, False), (False, True)], ids=["none", "avx512_bf16", "amx"])
def test_bf16_follows_the_cpu_unless_set(avx512_bf16, amx):
    """On where the CPU computes bfloat16 natively (AVX512-BF16 or AMX), off elsewhere; the quick variant in float32."""
    with (
        mock.patch("torch.cpu._is_avx512_bf16_supported", return_value=avx512_bf16),
        mock.patch("torch.cpu._is_amx_tile_supported", return_value=amx),
    ):
        assert parse_config([]).bf16 is (avx512_bf16 or amx)
        assert parse_config(["--bf16", str(not (avx512_bf16 or amx))]).bf16 is not (avx512_bf16 or amx)
        assert parse_config(["--quick"]).bf16 is False
        assert parse_config(["--quick", "--bf16", "true"]).bf16 is True


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--num_generations", "1"], "num_generations"),
        (["--num_eval_generations", "0"], "num_eval_generations"),
        (["--num_heldout_topics", "48"], "num_heldout_topics"),
        (["--max_train_prompts", "0"], "max_train_prompts"),
        (["--transform", "cube"], "transform"),
        (["--methods", "qrpo", "dpo"], "methods"),
        (["--compare", "--frontier"], "two modes"),
        (["--dpo_betas", "0.1", "0"], "dpo_betas"),
        (["--train_rows", "some"], "train_rows"),
        (["--frontier", "--train_rows", "all"], "qrpo_log_all_rows"),
        (["--quick", "--compare", "--train_rows", "best_worst"], "qrpo_log_all_rows"),
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
