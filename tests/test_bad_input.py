"""Bad input fails before training and before any file is written, with a message naming column, row and expectation."""

import logging
import os

import pytest
from conftest import make_args, pointwise_rows
from datasets import Dataset, load_from_disk
from tokenizers import processors
from transformers import AutoTokenizer
from trl import DPOConfig

from qrpo_trl import QRPOConfig, QRPOTrainer, ReferenceConfig, RPOConfig, RPOTrainer, precompute_rewards
from qrpo_trl.reference_stage import ReferenceStage


def build(trainer_class, config_class, path, output_dir, rows, **settings):
    args = make_args(config_class, output_dir, **settings)
    return trainer_class(model=path, args=args, train_dataset=Dataset.from_dict(rows))


def expect_error(trainer_class, config_class, path, tmp_path, rows, match, **settings):
    output_dir = tmp_path / "out"
    with pytest.raises(ValueError, match=match):
        build(trainer_class, config_class, path, output_dir, rows, **settings)
    assert not output_dir.exists()


def test_missing_columns_list_the_accepted_formats(tiny_llama_path, tmp_path):
    rows = pointwise_rows()
    del rows["ref_rewards"]
    match = r"columns \['prompt', 'completion', 'reward'\].*pointwise: prompt, completion, reward \+ ref_rewards or quantile_reward.*paired with scores: prompt, chosen, rejected, chosen_reward/rejected_reward or score_chosen/score_rejected"
    with pytest.raises(ValueError, match=f"(?s){match}"):
        build(QRPOTrainer, QRPOConfig, tiny_llama_path, tmp_path / "out", rows)
    del rows["reward"]
    with pytest.raises(ValueError, match=r"(?s)match none of the accepted formats:.*pointwise: prompt, completion, reward\n"):
        build(RPOTrainer, RPOConfig, tiny_llama_path, tmp_path / "out", rows)
    paired = {"prompt": ["hi"], "chosen": [" yes"], "rejected": [" no"], "chosen_reward": [1.0]}
    with pytest.raises(ValueError, match="match none of the accepted formats"):
        build(RPOTrainer, RPOConfig, tiny_llama_path, tmp_path / "out", paired)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), None])
def test_non_finite_reward(tiny_llama_path, tmp_path, bad):
    rows = pointwise_rows()
    rows["reward"][5] = bad
    for trainer_class, config_class in ((QRPOTrainer, QRPOConfig), (RPOTrainer, RPOConfig)):
        expect_error(trainer_class, config_class, tiny_llama_path, tmp_path, rows, "Column 'reward' of the train dataset, row 5: expected a finite number")


def test_non_numeric_reward(tiny_llama_path, tmp_path):
    rows = pointwise_rows()
    rows["reward"] = [str(r) for r in rows["reward"]]
    expect_error(RPOTrainer, RPOConfig, tiny_llama_path, tmp_path, rows, "Column 'reward' of the train dataset must hold numbers, but its type is string")


def test_non_finite_paired_reward(tiny_llama_path, tmp_path):
    rows = {"prompt": ["hi", "yo"], "chosen": [" yes"] * 2, "rejected": [" no"] * 2, "score_chosen": [1.0, 2.0], "score_rejected": [0.0, float("nan")], "ref_rewards": [[1.0]] * 2}
    expect_error(QRPOTrainer, QRPOConfig, tiny_llama_path, tmp_path, rows, "Column 'score_rejected' of the train dataset, row 1")


def test_non_finite_reference_reward(tiny_llama_path, tmp_path):
    rows = pointwise_rows()
    rows["ref_rewards"][7] = [0.1, float("-inf"), 0.3, 0.2, 0.0]
    expect_error(QRPOTrainer, QRPOConfig, tiny_llama_path, tmp_path, rows, r"Column 'ref_rewards' of the train dataset, row 7: expected finite numbers, got \[0.1, -inf")


def test_empty_and_short_reference_rewards(tiny_llama_path, tmp_path):
    rows = pointwise_rows()
    rows["ref_rewards"][4] = []
    expect_error(QRPOTrainer, QRPOConfig, tiny_llama_path, tmp_path, rows, r"'ref_rewards' of the train dataset, row 4: has 0 reference rewards, but at least 1 are needed")
    rows = pointwise_rows()
    rows["ref_rewards"][9] = rows["ref_rewards"][9][:2]
    expect_error(QRPOTrainer, QRPOConfig, tiny_llama_path, tmp_path, rows, r"row 9: has 2 reference rewards, but at least 3 are needed \(num_ref_rewards=3\)", num_ref_rewards=3)
    expect_error(QRPOTrainer, QRPOConfig, tiny_llama_path, tmp_path, rows, r"row 9: has 2 reference rewards, but at least 3 are needed \(at least one reference; transform='normal_icdf' needs 3\)", transform="normal_icdf")
    expect_error(QRPOTrainer, QRPOConfig, tiny_llama_path, tmp_path, rows, r"row 9: .* at least 4 are needed .*exclude_self_from_ref=True removes one", transform="scaled_normal_icdf", exclude_self_from_ref=True)
    rows["ref_rewards"][9] = None
    expect_error(QRPOTrainer, QRPOConfig, tiny_llama_path, tmp_path, rows, "Column 'ref_rewards' of the train dataset, row 9: expected a list, got None")


def test_reward_missing_from_its_own_references(tiny_llama_path, tmp_path):
    rows = pointwise_rows()
    expect_error(QRPOTrainer, QRPOConfig, tiny_llama_path, tmp_path, rows, "Column 'reward' of the train dataset, row 0: exclude_self_from_ref=True but the reward .* is not among the row's ref_rewards", exclude_self_from_ref=True)


def test_bad_quantile_column(tiny_llama_path, tmp_path):
    rows = {"prompt": ["hi"] * 3, "completion": [" yes", " no", " sure"], "reward": [1.0, 0.0, 2.0], "quantile_reward": [0.5, 1.5, 0.0]}
    expect_error(QRPOTrainer, QRPOConfig, tiny_llama_path, tmp_path, rows, r"Column 'quantile_reward' of the train dataset, row 1: expected a quantile in \[0, 1\], got 1.5")
    rows["quantile_reward"] = [0.5, 1.0, 0.0]
    expect_error(QRPOTrainer, QRPOConfig, tiny_llama_path, tmp_path, rows, "needs the number of references n.*set `num_ref_rewards`", transform="log")
    expect_error(QRPOTrainer, QRPOConfig, tiny_llama_path, tmp_path, rows, "transform='scaled_normal_icdf' needs the reference rewards", transform="scaled_normal_icdf", num_ref_rewards=3)


@pytest.mark.parametrize(
    "settings, match",
    [
        ({"beta": 0.0}, r"`beta` must be > 0, got 0.0"),
        ({"beta": -0.1}, r"`beta` must be > 0, got -0.1"),
        ({"transform": "cube"}, r"Unknown `transform` 'cube'; expected one of 'identity', 'log'"),
        ({"partition": "guess"}, r"Unknown `partition` 'guess'; expected one of 'exact', 'finite_n', 'approx'"),
        ({"ties": "lt"}, r"Unknown `ties` 'lt'; expected one of 'le', 'mid'"),
        ({"partition": "approx", "transform": "log"}, r"only holds for `transform='identity'`, not 'log'"),
        ({"num_ref_rewards": 0}, r"`num_ref_rewards` must be >= 1"),
        # The normal transforms clamp q to [1/n, (n-1)/n]: below 3 references every target would be one constant
        ({"num_ref_rewards": 2, "transform": "normal_icdf"}, r"`num_ref_rewards` must be >= 3 or None with transform='normal_icdf'.*the same constant; got 2"),
        ({"num_ref_rewards": 1, "transform": "scaled_normal_icdf"}, r"`num_ref_rewards` must be >= 3 or None with transform='scaled_normal_icdf'"),
        ({"logps_normalization": "max"}, r"Unknown `logps_normalization` 'max'"),
        ({"loss_type": "ipo"}, r"does not use DPO's `loss_type`"),
    ],
)
def test_bad_qrpo_config(tmp_path, settings, match):
    with pytest.raises(ValueError, match=match):
        make_args(QRPOConfig, tmp_path, **settings)


def test_bad_rpo_config(tmp_path):
    with pytest.raises(ValueError, match=r"Unknown `value_estimator` 'learned'; expected one of 'ref_weighted', 'monte_carlo'"):
        make_args(RPOConfig, tmp_path, value_estimator="learned")
    with pytest.raises(ValueError, match="`beta` must be > 0"):
        make_args(RPOConfig, tmp_path, beta=0)


def test_vision_dataset_is_a_value_error(tiny_llama_path, tmp_path):
    rows = {**pointwise_rows(num_prompts=1, completions_per_prompt=1), "images": [[]]}
    expect_error(QRPOTrainer, QRPOConfig, tiny_llama_path, tmp_path, rows, "does not support vision-language datasets")


def test_wrong_config_class(tiny_llama_path, tmp_path):
    args = DPOConfig(str(tmp_path / "out"), use_cpu=True, bf16=False, report_to="none")
    with pytest.raises(TypeError, match="QRPOTrainer needs a QRPOConfig as `args`, got DPOConfig"):
        QRPOTrainer(model=tiny_llama_path, args=args, train_dataset=Dataset.from_dict(pointwise_rows()))


def test_constant_rewards_cannot_be_normalized(tiny_llama_path, tmp_path):
    rows = pointwise_rows()
    rows["reward"] = [1.0] * len(rows["reward"])
    expect_error(RPOTrainer, RPOConfig, tiny_llama_path, tmp_path, rows, "normalize_rewards=True, but every reward of the train dataset is the same", normalize_rewards=True)


def test_rpo_monte_carlo_needs_reference_rewards_in_every_row(tiny_llama_path, tmp_path):
    rows = pointwise_rows()
    rows["ref_rewards"][2] = []
    expect_error(
        RPOTrainer, RPOConfig, tiny_llama_path, tmp_path, rows,
        r"Column 'ref_rewards' of the train dataset, row 2: expected at least one reference reward for V\(x\)",
        value_estimator="monte_carlo",
    )


def test_bad_disk_backed_dataset_writes_nothing(tiny_llama_path, tmp_path):
    rows = pointwise_rows()
    rows["ref_rewards"][3] = []
    Dataset.from_dict(rows).save_to_disk(tmp_path / "data")
    dataset = load_from_disk(str(tmp_path / "data"))
    files = sorted(os.listdir(tmp_path / "data"))
    with pytest.raises(ValueError, match="row 3"):
        QRPOTrainer(model=tiny_llama_path, args=make_args(QRPOConfig, tmp_path / "out"), train_dataset=dataset)
    assert sorted(os.listdir(tmp_path / "data")) == files
    assert not (tmp_path / "out").exists()


def test_single_completion_prompts_are_counted(tiny_llama_path, tmp_path, caplog):
    rows = pointwise_rows(num_prompts=2)
    rows = {key: values + [values[0]] for key, values in rows.items()}
    rows["prompt"][-1] = "hello"
    with caplog.at_level(logging.WARNING):
        build(RPOTrainer, RPOConfig, tiny_llama_path, tmp_path / "out", rows)
    assert "1 of 3 prompts have a single completion" in caplog.text


def test_overlong_prompts_are_dropped_and_counted(tiny_llama_path, tmp_path, caplog):
    rows = pointwise_rows()  # prompts of 5, 6 and 2 tokens (with BOS), completions of 2 to 5 tokens (with EOS)
    with caplog.at_level(logging.WARNING):
        trainer = build(QRPOTrainer, QRPOConfig, tiny_llama_path, tmp_path / "out", rows, max_length=5)
    assert "Dropped 8 of 12 samples of the train dataset whose prompt alone has max_length=5 tokens or more" in caplog.text
    assert "1 of 4 samples of the train dataset exceed max_length=5 tokens and are truncated (keep_start)" in caplog.text
    assert set(trainer.train_dataset["prompt"]) == {"hello"}
    trainer.train()


# ----------------------------------------------------------------------------------------------------------------------
# Obscure errors made clear (issue 24): each a ValueError naming the column, row or setting, before anything is written


def test_empty_dataset(tiny_llama_path, tmp_path):
    rows = {key: [] for key in pointwise_rows()}
    expect_error(QRPOTrainer, QRPOConfig, tiny_llama_path, tmp_path, rows, "The train dataset is empty: it has no rows")
    with pytest.raises(ValueError, match="The train dataset is empty: it has no rows"):
        precompute_rewards(Dataset.from_dict({"prompt": []}), tiny_llama_path, length_reward, stage_args(tmp_path))


def test_every_row_dropped_by_max_length(tiny_llama_path, tmp_path):
    match = r"Every sample of the train dataset has a prompt of max_length=2 tokens or more: truncation would leave no completion token"
    expect_error(QRPOTrainer, QRPOConfig, tiny_llama_path, tmp_path, pointwise_rows(), match, max_length=2)


def test_conversational_prompt_with_text_completion(tiny_llama_path, tmp_path):
    rows = pointwise_rows()
    rows["prompt"] = [[{"role": "user", "content": prompt}] for prompt in rows["prompt"]]
    match = r"The train dataset mixes formats: 'prompt' is conversational \(lists of messages\), 'completion' is text"
    expect_error(QRPOTrainer, QRPOConfig, tiny_llama_path, tmp_path, rows, match)


@pytest.mark.parametrize("column", ["prompt", "completion"])
def test_none_prompt_or_completion(tiny_llama_path, tmp_path, column):
    rows = pointwise_rows()
    rows[column][6] = None
    match = f"Column '{column}' of the train dataset, row 6: expected a text or a list of messages, got None"
    expect_error(QRPOTrainer, QRPOConfig, tiny_llama_path, tmp_path, rows, match)
    with pytest.raises(ValueError, match=match):
        precompute_rewards(Dataset.from_dict(rows).remove_columns("reward"), tiny_llama_path, length_reward, stage_args(tmp_path))


def length_reward(completions, **kwargs):
    return [float(len(completion.split())) for completion in completions]


def returns_none(completions, **kwargs):
    return None


def returns_a_scalar(completions, **kwargs):
    return 1.0


def stage_args(tmp_path, **settings):
    return ReferenceConfig(num_generations=2, max_completion_length=3, reference_cache_dir=str(tmp_path / "cache"), **settings)


@pytest.mark.parametrize(
    "reward_func, returned", [(returns_none, r"None \(NoneType\)"), (returns_a_scalar, r"1.0 \(float\)")]
)
def test_reward_function_returning_none_or_a_scalar(tiny_llama_path, tmp_path, reward_func, returned):
    match = (
        f"Reward function '{reward_func.__name__}' returned {returned} for the 4 completions of rows 0 to 1 of the "
        "train dataset: it must return a list of one reward per completion"
    )
    with pytest.raises(ValueError, match=match):
        precompute_rewards(Dataset.from_dict({"prompt": ["hi", "hello"]}), tiny_llama_path, reward_func, stage_args(tmp_path))


@pytest.mark.parametrize("prompts", [["hi", "hello", ""], [""]], ids=["among-others", "alone"])
def test_empty_prompt_in_the_reference_stage(tiny_llama_path, tmp_path, prompts):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_path)
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(single="$A")  # no BOS: "" has no token
    assert tokenizer("")["input_ids"] == []
    dataset = Dataset.from_dict({"prompt": prompts})
    match = rf"Column 'prompt' of the train dataset, row {len(prompts) - 1}: the prompt is empty \('' has no token\)"
    with pytest.raises(ValueError, match=match):
        precompute_rewards(dataset, tiny_llama_path, length_reward, stage_args(tmp_path), processing_class=tokenizer)


def test_num_ref_rewards_above_num_generations_fails_before_the_stage(tiny_llama_path, tmp_path, monkeypatch):
    monkeypatch.setattr(ReferenceStage, "run", lambda *args: pytest.fail("the reference stage ran"))
    args = make_args(QRPOConfig, tmp_path / "out", num_generations=4, num_ref_rewards=6, reference_cache_dir=str(tmp_path / "cache"))
    match = (
        r"The reference stage samples num_generations=4 reference completions per prompt of the train dataset, but 6 "
        r"reference rewards are needed \(num_ref_rewards=6\): set `num_generations` to at least 6"
    )
    with pytest.raises(ValueError, match=match):
        QRPOTrainer(model=tiny_llama_path, args=args, train_dataset=Dataset.from_dict({"prompt": ["hi"]}), reward_funcs=length_reward)
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


def test_nonexistent_model_path(tmp_path):
    path = str(tmp_path / "no" / "such-model")
    match = f"`model` '{path}': no such directory. A model is a local directory"
    expect_error(QRPOTrainer, QRPOConfig, path, tmp_path, pointwise_rows(), match)
    with pytest.raises(ValueError, match=match):
        precompute_rewards(Dataset.from_dict({"prompt": ["hi"]}), path, length_reward, stage_args(tmp_path))
    with pytest.raises(ValueError, match=f"`reward_funcs` '{path}': no such directory"):
        precompute_rewards(Dataset.from_dict({"prompt": ["hi"]}), path, path, stage_args(tmp_path))
