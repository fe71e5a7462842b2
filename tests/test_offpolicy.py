"""The paper's off-policy training sets, built from the reference completions a dataset kept."""

import numpy as np
import pytest
from conftest import assert_loss_logged, make_args
from datasets import Dataset, DatasetDict, load_from_disk

from qrpo_trl import QRPOConfig, QRPOTrainer
from qrpo_trl.cli import main
from qrpo_trl.offpolicy_pairs import offpolicy_pairs


def with_references(num_refs=20, seed=0):
    """Pointwise rows as the reference stage writes them with keep_ref_completions: the second prompt has two rows."""
    rng = np.random.default_rng(seed)
    refs = [rng.permutation(num_refs).astype(float).tolist() for _ in range(2)]
    completions = [[f" answer {p}-{i}" for i in range(num_refs)] for p in range(2)]
    return Dataset.from_dict(
        {
            "prompt": ["what is the sky", "hello", "hello"],
            "completion": [" blue", " hi", " yo"],
            "reward": [1.0, 2.0, 3.0],
            "ref_rewards": [refs[0], refs[1], refs[1]],
            "ref_completions": [completions[0], completions[1], completions[1]],
            "source": ["a", "b", "c"],
        }
    )


def expected_pairs(dataset, index_pairs):
    rows = [dataset[0], dataset[1]]  # one row per prompt
    chosen, rejected = [], []
    for row in rows:
        for i, j in index_pairs(row["ref_rewards"]):
            better, worse = (i, j) if row["ref_rewards"][i] >= row["ref_rewards"][j] else (j, i)
            chosen.append((row["ref_completions"][better], row["ref_rewards"][better]))
            rejected.append((row["ref_completions"][worse], row["ref_rewards"][worse]))
    return chosen, rejected


@pytest.mark.parametrize(
    "mode, index_pairs",
    [
        ("offpolicy2best", lambda r: [(int(np.argmax(r[:6])), int(np.argmin(r[:6])))]),
        ("offpolicy2random", lambda r: [(0, 1)]),
        ("offpolicy6random", lambda r: [(0, 1), (2, 3), (4, 5)]),
        ("offpolicy10random", lambda r: [(2 * k, 2 * k + 1) for k in range(10)]),
    ],
)
def test_offpolicy_pairs(mode, index_pairs):
    dataset = with_references()
    paired = offpolicy_pairs(dataset, mode)
    chosen, rejected = expected_pairs(dataset, index_pairs)
    assert list(zip(paired["chosen"], paired["chosen_reward"])) == chosen
    assert list(zip(paired["rejected"], paired["rejected_reward"])) == rejected
    assert all(c > r for c, r in zip(paired["chosen_reward"], paired["rejected_reward"]))
    per_prompt = len(paired) // 2
    assert paired["prompt"] == ["what is the sky"] * per_prompt + ["hello"] * per_prompt
    assert paired["source"] == ["a"] * per_prompt + ["b"] * per_prompt  # the prompt's first row
    assert paired["ref_rewards"] == [dataset[0]["ref_rewards"]] * per_prompt + [dataset[1]["ref_rewards"]] * per_prompt
    assert not {"completion", "reward", "ref_completions"} & set(paired.column_names)


def test_offpolicy_pairs_ties_follow_the_official_code():
    dataset = Dataset.from_dict(
        {"prompt": ["hello"], "ref_rewards": [[1.0, 1.0, 0.0, 2.0, 2.0, 0.0]], "ref_completions": [list("abcdef")]}
    )
    best = offpolicy_pairs(dataset, "offpolicy2best")
    assert (best["chosen"], best["rejected"]) == (["d"], ["c"])  # the first maximum and the first minimum
    assert offpolicy_pairs(dataset, "offpolicy2random")["chosen"] == ["a"]  # equal rewards: the first one


def test_offpolicy_pairs_bad_input():
    with pytest.raises(ValueError, match="Unknown off-policy mode 'offpolicy4best'"):
        offpolicy_pairs(with_references(), "offpolicy4best")
    with pytest.raises(ValueError, match="lacks ref_completions: off-policy pairs are built"):
        offpolicy_pairs(with_references().remove_columns("ref_completions"), "offpolicy2random")
    with pytest.raises(ValueError, match="Row 0 of the train dataset .* has 6 reference completions .* needs at least 20"):
        offpolicy_pairs(with_references(num_refs=6), "offpolicy10random")


def test_offpolicy_command_output_trains(tiny_llama_path, tmp_path):
    DatasetDict({"train": with_references(), "test": with_references(seed=1)}).save_to_disk(tmp_path / "refs")
    main(["offpolicy", "--dataset_name", str(tmp_path / "refs"), "--mode", "offpolicy6random", "--output_dir", str(tmp_path / "out")])
    paired = load_from_disk(str(tmp_path / "out"))
    assert list(paired) == ["train", "test"] and len(paired["train"]) == 6
    assert paired["train"]["chosen"] == offpolicy_pairs(with_references(), "offpolicy6random")["chosen"]
    args = make_args(QRPOConfig, tmp_path / "train", num_ref_rewards=6, max_steps=1)
    trainer = QRPOTrainer(model=tiny_llama_path, args=args, train_dataset=paired["train"])
    trainer.train()
    assert_loss_logged(trainer)
