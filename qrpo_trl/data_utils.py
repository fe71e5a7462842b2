"""Dataset formats accepted by the pointwise trainers: validation, and conversion of paired data to pointwise rows.

Accepted formats (standard text or conversational, like TRL):

- pointwise: `prompt`, `completion`, `reward`;
- paired with scores: `prompt`, `chosen`, `rejected` with `chosen_reward`/`rejected_reward` (or UltraFeedback's
  `score_chosen`/`score_rejected`, or the official QRPO datasets' `chosen_rewards`/`rejected_rewards`); each pair
  becomes two pointwise rows, as in the official QRPO code, or one of them (`paired_samples`). Conversational pairs
  without a `prompt` column get it extracted from the shared start of `chosen` and `rejected`.

A trainer may need reference columns on top (QRPO: `ref_rewards` or `quantile_reward`). Reference log-probabilities
may come with the data: `ref_logps` (pointwise) or `ref_chosen_logps`/`ref_rejected_logps` (paired, DPOTrainer's names).

Validation reads the raw columns before anything is mapped, so a bad dataset fails before any cache file is written.
"""

import hashlib
import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasets import Dataset
from trl.data_utils import extract_prompt


POINTWISE_COLUMNS = ("prompt", "completion", "reward")
PAIRED_SAMPLES = ("both", "chosen", "rejected", "random")
PAIRED_REF_LOGPS_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")
PAIRED_COLUMNS = ("chosen", "rejected")
TEXT_COLUMNS = ("prompt", "completion", "chosen", "rejected")
# The reward columns of paired data: ours, UltraFeedback's, and the official QRPO datasets'
PAIRED_REWARD_COLUMNS = (
    ("chosen_reward", "rejected_reward"),
    ("score_chosen", "score_rejected"),
    ("chosen_rewards", "rejected_rewards"),
)


def describe_formats(reference_columns: tuple[str, ...] = ()) -> str:
    """The accepted formats, for error messages. `reference_columns` are alternatives the trainer needs on top."""
    extra = f" + {' or '.join(reference_columns)}" if reference_columns else ""
    pair_rewards = " or ".join("/".join(pair) for pair in PAIRED_REWARD_COLUMNS)
    return (
        f"  - pointwise: {', '.join(POINTWISE_COLUMNS)}{extra}\n"
        f"  - paired with scores: prompt, chosen, rejected, {pair_rewards}{extra}"
    )


def paired_reward_columns(column_names: list[str]) -> tuple[str, str] | None:
    """The (chosen, rejected) reward columns of a paired dataset, or None if it has none of the accepted pairs."""
    for pair in PAIRED_REWARD_COLUMNS:
        if all(column in column_names for column in pair):
            return pair
    return None


def check_texts(dataset: Dataset, dataset_name: str) -> None:
    """
    Raise a ValueError naming the column (and row) if the dataset is empty, a prompt or completion is None, or prompts
    and completions mix formats (text and conversational): TRL formats them together, which would fail deep inside.
    """
    if len(dataset) == 0:
        raise ValueError(f"The {dataset_name} dataset is empty: it has no rows.")
    columns = [column for column in TEXT_COLUMNS if column in dataset.column_names]
    table = dataset.with_format("arrow")
    for column in columns:
        nulls = np.flatnonzero(table[column].is_null().to_numpy(zero_copy_only=False))
        if nulls.size:
            raise ValueError(
                f"Column '{column}' of the {dataset_name} dataset, row {nulls[0]}: expected a text or a list of "
                f"messages, got None. {nulls.size} rows are None."
            )
    formats = {column: "text" if pa.types.is_string(table[column].type) or pa.types.is_large_string(table[column].type)
               else "conversational (lists of messages)" for column in columns}
    if len(set(formats.values())) > 1:
        described = ", ".join(f"'{column}' is {kind}" for column, kind in formats.items())
        raise ValueError(
            f"The {dataset_name} dataset mixes formats: {described}. Prompts and completions must all be text, or all "
            "conversational (a completion is then a list holding the assistant's message)."
        )


def check_columns(dataset: Dataset, dataset_name: str, reference_columns: tuple[str, ...] = ()) -> None:
    """Raise a ValueError listing the accepted formats if `dataset` matches none of them, or if its texts are bad."""
    check_texts(dataset, dataset_name)
    columns = dataset.column_names
    has_reference = not reference_columns or any(column in columns for column in reference_columns)
    pointwise = all(column in columns for column in POINTWISE_COLUMNS)
    paired = all(column in columns for column in PAIRED_COLUMNS) and paired_reward_columns(columns) is not None
    if (pointwise or paired) and has_reference:
        return
    raise ValueError(
        f"The {dataset_name} dataset has columns {columns}, which match none of the accepted formats:\n"
        f"{describe_formats(reference_columns)}"
    )


def has_rewards(column_names: list[str]) -> bool:
    """Whether a pointwise (`completion`) or paired (`chosen`, `rejected`) dataset has its reward columns."""
    if "completion" in column_names:
        return "reward" in column_names
    return all(column in column_names for column in PAIRED_COLUMNS) and paired_reward_columns(column_names) is not None


def check_stage_columns(dataset: Dataset, dataset_name: str) -> None:
    """
    Raise a ValueError listing the formats the reference stage accepts if `dataset` matches none of them, and check the
    reward columns it already has.
    """
    columns = dataset.column_names
    num_paired = sum(column in columns for column in PAIRED_COLUMNS)
    if ("prompt" in columns or num_paired == 2) and num_paired != 1:
        check_texts(dataset, dataset_name)
        if has_rewards(columns):
            check_rewards(dataset, dataset_name)
        return
    raise ValueError(
        f"The {dataset_name} dataset has columns {columns}, which match none of the formats the reference stage "
        "(`reward_funcs`) accepts:\n"
        "  - prompt-only: prompt (completions are sampled from the reference model)\n"
        "  - pointwise: prompt, completion, and reward if it is not to be computed\n"
        "  - paired: prompt, chosen, rejected, and their rewards if they are not to be computed"
    )


def float_column(dataset: Dataset, column: str, dataset_name: str) -> np.ndarray:
    """The column as float64, raising a ValueError naming the first row that is not a finite number."""
    array = dataset.with_format("arrow")[column]
    if not (pa.types.is_floating(array.type) or pa.types.is_integer(array.type) or pa.types.is_null(array.type)):
        raise ValueError(
            f"Column '{column}' of the {dataset_name} dataset must hold numbers, but its type is {array.type}."
        )
    values = np.asarray(array.cast(pa.float64()).to_numpy(zero_copy_only=False), dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
        raise ValueError(
            f"Column '{column}' of the {dataset_name} dataset, row {bad[0]}: expected a finite number, got "
            f"{array[int(bad[0])].as_py()} ({bad.size} such rows in all)."
        )
    return values


def ragged_float_column(dataset: Dataset, column: str, dataset_name: str) -> list[np.ndarray]:
    """A column of lists of numbers as one float64 array per row, raising a ValueError naming the first bad row."""
    array = dataset.with_format("arrow")[column].combine_chunks()
    if not (pa.types.is_list(array.type) or pa.types.is_large_list(array.type)):
        raise ValueError(
            f"Column '{column}' of the {dataset_name} dataset must hold lists of numbers, but its type is "
            f"{array.type}."
        )
    null_rows = np.flatnonzero(array.is_null().to_numpy(zero_copy_only=False))
    if null_rows.size:
        raise ValueError(f"Column '{column}' of the {dataset_name} dataset, row {null_rows[0]}: expected a list, got None.")
    lengths = pc.list_value_length(array).to_numpy(zero_copy_only=False).astype(np.int64)
    flat = pc.list_flatten(array)
    if not (pa.types.is_floating(flat.type) or pa.types.is_integer(flat.type) or pa.types.is_null(flat.type)):
        raise ValueError(
            f"Column '{column}' of the {dataset_name} dataset must hold lists of numbers, but its type is "
            f"{array.type}."
        )
    values = np.asarray(flat.cast(pa.float64()).to_numpy(zero_copy_only=False), dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
        row = int(np.searchsorted(np.cumsum(lengths), bad[0], side="right"))
        raise ValueError(
            f"Column '{column}' of the {dataset_name} dataset, row {row}: expected finite numbers, got "
            f"{array[row].as_py()}."
        )
    return np.split(values, np.cumsum(lengths)[:-1])


def reward_columns(column_names: list[str]) -> tuple[str, ...]:
    """The reward column of a pointwise dataset, or the (chosen, rejected) reward columns of a paired one."""
    if "completion" in column_names:
        return ("reward",)
    return paired_reward_columns(column_names) or ()


def check_rewards(dataset: Dataset, dataset_name: str) -> None:
    """Every reward column of a pointwise or paired dataset holds finite numbers."""
    for column in reward_columns(dataset.column_names):
        float_column(dataset, column, dataset_name)


def first_appearance_labels(keys) -> np.ndarray:
    """An integer label per key, equal for equal keys, numbered in order of first appearance."""
    labels = {}
    return np.array([labels.setdefault(key, len(labels)) for key in keys], dtype=np.int64)


def prompt_groups(dataset: Dataset) -> np.ndarray:
    """An integer label per row, equal for rows with the same prompt (text, or conversation compared as JSON)."""
    keys = (prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True) for prompt in dataset["prompt"])
    return first_appearance_labels(keys)


def check_ref_logps(dataset: Dataset, dataset_name: str) -> None:
    """Reference log-probabilities given with the data (`ref_logps`, or both paired columns) are finite numbers."""
    columns = dataset.column_names
    paired = [column for column in PAIRED_REF_LOGPS_COLUMNS if column in columns]
    if "completion" not in columns and "ref_logps" in columns:
        raise ValueError(
            f"The {dataset_name} dataset is paired and has a single 'ref_logps' column, which cannot belong to both "
            "completions of a pair: give 'ref_chosen_logps' and 'ref_rejected_logps'."
        )
    if "completion" not in columns and len(paired) == 1:
        raise ValueError(
            f"The {dataset_name} dataset has '{paired[0]}' but not "
            f"'{(set(PAIRED_REF_LOGPS_COLUMNS) - set(paired)).pop()}': give the reference log-probabilities of both "
            "completions of each pair, or neither."
        )
    for column in ("ref_logps",) if "completion" in columns else paired:
        if column in columns:
            float_column(dataset, column, dataset_name)


def completion_groups(dataset: Dataset, groups: np.ndarray) -> np.ndarray:
    """A label per row of a tokenised dataset, equal for rows with the same prompt group and completion tokens."""
    keys = zip(groups.tolist(), map(tuple, dataset.with_format("arrow")["completion_ids"].to_pylist()), strict=True)
    return first_appearance_labels(keys)


def to_pointwise(
    dataset: Dataset, dataset_name: str, map_kwargs: dict, paired_samples: str = "both", seed: int = 0
) -> Dataset:
    """
    Pointwise rows (`prompt`, `completion`, `reward` and the other columns) from a pointwise or paired dataset.

    A pair becomes two consecutive rows (chosen, then rejected) that share the pair's other columns, or only one of them
    with `paired_samples="chosen"`, `"rejected"` or `"random"` (drawn per pair from `seed` and the pair's index). Each
    row keeps the index of its pair (`pair_index`) and whether it is the chosen completion (`is_chosen`), from which
    evaluation reports DPO's pair metrics; the loss does not use the pairing. `ref_chosen_logps`/`ref_rejected_logps`
    become `ref_logps`.
    """
    if paired_samples not in PAIRED_SAMPLES:
        choices = ", ".join(map(repr, PAIRED_SAMPLES))
        raise ValueError(f"Unknown `paired_samples` {paired_samples!r}; expected one of {choices}.")
    if "completion" in dataset.column_names:
        if paired_samples != "both":
            raise ValueError(
                f"paired_samples={paired_samples!r} selects completions of pairs, but the {dataset_name} dataset is "
                "pointwise (it has a `completion` column): leave `paired_samples='both'`."
            )
        return dataset
    return dataset.map(
        pointwise_batch,
        batched=True,
        with_indices=True,
        fn_kwargs={"paired_samples": paired_samples, "seed": seed},
        remove_columns=dataset.column_names,
        desc=f"Unpairing {dataset_name} dataset into pointwise samples",
        **map_kwargs,
    )


def pointwise_batch(batch: dict[str, list], indices: list[int], paired_samples: str = "both", seed: int = 0):
    """`to_pointwise` for one batch (a dict of columns) of rows `indices`; also used on a streamed dataset's batches."""
    if "completion" in batch:
        return batch
    if "prompt" not in batch:  # conversational pairs: the prompt is the shared start of chosen and rejected
        pairs = zip(batch["chosen"], batch["rejected"], strict=True)
        examples = [extract_prompt({"chosen": chosen, "rejected": rejected}) for chosen, rejected in pairs]
        batch = {**batch, **{key: [example[key] for example in examples] for key in ("prompt", "chosen", "rejected")}}
    per_completion = {"completion": PAIRED_COLUMNS, "reward": paired_reward_columns(list(batch))}
    if all(column in batch for column in PAIRED_REF_LOGPS_COLUMNS):
        per_completion["ref_logps"] = PAIRED_REF_LOGPS_COLUMNS
    paired = {column for pair in per_completion.values() for column in pair}
    # Per pair, whether each kept completion is the chosen one
    flags = [_kept_completions(paired_samples, seed, index) for index in indices]
    rows = {
        key: [value for value, kept in zip(values, flags, strict=True) for _ in kept]
        for key, values in batch.items()
        if key not in paired
    }
    for column, (chosen_column, rejected_column) in per_completion.items():
        rows[column] = [
            chosen if is_chosen else rejected
            for chosen, rejected, kept in zip(batch[chosen_column], batch[rejected_column], flags, strict=True)
            for is_chosen in kept
        ]
    rows["pair_index"] = [index for index, kept in zip(indices, flags, strict=True) for _ in kept]
    rows["is_chosen"] = [int(is_chosen) for kept in flags for is_chosen in kept]
    return rows


def _kept_completions(paired_samples: str, seed: int, index: int) -> tuple[bool, ...]:
    if paired_samples == "both":
        return (True, False)
    if paired_samples == "random":  # a hash of (seed, pair): the same draw whatever the batching or the streaming
        return (bool(hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=1).digest()[0] & 1),)
    return (paired_samples == "chosen",)
