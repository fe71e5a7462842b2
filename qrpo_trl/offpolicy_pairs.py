"""
The QRPO paper's off-policy training sets, built from the reference completions a dataset kept (`ref_completions`
and `ref_rewards`, as the reference stage writes them with `keep_ref_completions=True`).

The paper trains on pairs of reference completions, scored by the same reward model as the references, beside the
dataset's own (offline) pairs. The modes are the official code's (`prepare_offpolicy_dataset.py`), with its names:

| mode | pairs per prompt | completions used |
|---|---|---|
| `offpolicy2best` | 1 | the best (chosen) and the worst (rejected) of references 0-5 |
| `offpolicy2random` | 1 | references 0 and 1, the better one chosen |
| `offpolicy6random` | 3 | references (0, 1), (2, 3), (4, 5) |
| `offpolicy10random` | 10 | references (0, 1), ..., (18, 19): 20 references, as in the official code |

Ties go as in the official code: the first best and first worst index for `offpolicy2best`; the first reference of a
pair is chosen when both rewards are equal.
"""

import numpy as np
from datasets import Dataset

from .data_utils import PAIRED_COLUMNS, PAIRED_REF_LOGPS_COLUMNS, PAIRED_REWARD_COLUMNS, prompt_groups, ragged_float_column


# mode: (selection, number of pairs per prompt)
OFFPOLICY_MODES = {
    "offpolicy2best": ("best_worst", 1),
    "offpolicy2random": ("pairs", 1),
    "offpolicy6random": ("pairs", 3),
    "offpolicy10random": ("pairs", 10),
}
BEST_WORST_CANDIDATES = 6
# Columns of the input that describe its own completions, which the off-policy pairs replace
_REPLACED_COLUMNS = (
    "completion", "reward", "quantile_reward", "ref_logps", "ref_completions", *PAIRED_COLUMNS,
    *PAIRED_REF_LOGPS_COLUMNS, *(column for pair in PAIRED_REWARD_COLUMNS for column in pair),
)


def offpolicy_pairs(dataset: Dataset, mode: str, dataset_name: str = "train") -> Dataset:
    """
    A paired dataset (`prompt`, `chosen`, `rejected`, `chosen_reward`, `rejected_reward`, `ref_rewards` and the other
    columns of the prompt's first row) of reference completions, one or several pairs per prompt (see the module
    docstring). The input has one or more rows per prompt with `prompt`, `ref_completions` and `ref_rewards`; rows of
    the same prompt share their references, so only the first row of each prompt is used. The dataset's own
    completions and their rewards are dropped, and `ref_completions` too; `ref_rewards` is kept whole.
    """
    if mode not in OFFPOLICY_MODES:
        raise ValueError(f"Unknown off-policy mode {mode!r}; expected one of {', '.join(map(repr, OFFPOLICY_MODES))}.")
    missing = [column for column in ("prompt", "ref_completions", "ref_rewards") if column not in dataset.column_names]
    if missing:
        raise ValueError(
            f"The {dataset_name} dataset lacks {', '.join(missing)}: off-policy pairs are built from the reference "
            "completions and their rewards (the reference stage keeps them with `keep_ref_completions=True`)."
        )
    selection, num_pairs = OFFPOLICY_MODES[mode]
    _, first_rows = np.unique(prompt_groups(dataset), return_index=True)
    dataset = dataset.select(np.sort(first_rows))
    rewards = ragged_float_column(dataset, "ref_rewards", dataset_name)
    needed = BEST_WORST_CANDIDATES if selection == "best_worst" else 2 * num_pairs
    num_completions = [len(completions) for completions in dataset["ref_completions"]]
    for row, (row_rewards, count) in enumerate(zip(rewards, num_completions, strict=True)):
        if count != len(row_rewards) or count < needed:
            raise ValueError(
                f"Row {row} of the {dataset_name} dataset (after keeping one row per prompt) has {count} reference "
                f"completions and {len(row_rewards)} reference rewards: {mode} needs at least {needed} of each, "
                "aligned."
            )

    # (chosen, rejected) reference indices of each output pair, row after row
    if selection == "best_worst":
        candidates = np.stack([row_rewards[:BEST_WORST_CANDIDATES] for row_rewards in rewards])
        indices = np.stack([candidates.argmax(axis=1), candidates.argmin(axis=1)], axis=1)[:, None, :]
    else:
        pairs = np.arange(2 * num_pairs).reshape(num_pairs, 2)
        first = np.stack([row_rewards[pairs[:, 0]] for row_rewards in rewards])
        second = np.stack([row_rewards[pairs[:, 1]] for row_rewards in rewards])
        first_chosen = (first >= second)[..., None]
        indices = np.where(first_chosen, pairs, pairs[:, ::-1])  # (rows, pairs, 2)

    def build(batch, row_indices, indices):
        kept = [key for key in batch if key not in _REPLACED_COLUMNS]
        out = {key: [value for value in batch[key] for _ in range(num_pairs)] for key in kept}
        out["chosen"], out["rejected"], out["chosen_reward"], out["rejected_reward"] = [], [], [], []
        for completions, row_rewards, row in zip(batch["ref_completions"], batch["ref_rewards"], row_indices, strict=True):
            for chosen, rejected in indices[row]:
                out["chosen"].append(completions[chosen])
                out["rejected"].append(completions[rejected])
                out["chosen_reward"].append(row_rewards[chosen])
                out["rejected_reward"].append(row_rewards[rejected])
        return out

    return dataset.map(
        build,
        batched=True,
        with_indices=True,
        fn_kwargs={"indices": indices},
        remove_columns=dataset.column_names,
        desc=f"Building {mode} pairs of the {dataset_name} dataset",
    )
