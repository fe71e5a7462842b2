"""
The columns the reference stage adds to a dataset, joined with Arrow: each row's references are taken from the pass
results by index (`group * num_generations + k`) and written, a batch of rows at a time, to one Arrow file that the
result memory-maps. No Python object per completion, and memory bounded by a batch (and the chunk files it reads).
"""

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from datasets import Dataset, Features, concatenate_datasets

from .storage import ChunkStore


@dataclass
class StageResults:
    """What the passes computed, for the join."""

    group_of_row: np.ndarray  # the group (distinct prompt and reward-function columns) of each dataset row
    num_generations: int
    sampled_rewards: np.ndarray | None  # the rewards of the sampled completions, group-major; None without sampling
    own_rewards: dict[str, np.ndarray]  # reward column -> the reward of each row's own completion
    sampling: ChunkStore | None  # the sampled completions (their `completion` text, for the output), if sampled
    conversational: bool


def write_columns(
    dataset: Dataset, results: StageResults, prompt_only: bool, add_ref_rewards: bool, keep_ref_completions: bool,
    store: ChunkStore, rows_per_batch: int,
) -> None:
    """
    Write the stage's columns for `dataset` as `store`'s single file, a batch of rows at a time (the main process
    writes; the others wait for it): the new columns, or for prompt-only data the whole expanded rows, each row once
    per sampled completion.
    """
    (chunk,) = store.ranges

    def batch(start, stop):
        return _batch(dataset, results, prompt_only, add_ref_rewards, keep_ref_completions, start, stop)

    failure = None
    if store.state.is_main_process:
        try:
            own, added = batch(0, 1)
            features = Features.from_arrow_schema(added.schema)
            if prompt_only:  # the file holds the whole expanded rows: the dataset's columns keep their features
                features = Features({**dataset.features, **features})
            schema = features.arrow_schema
            with store.writer(chunk, schema) as stream:
                for start in range(0, len(dataset), rows_per_batch):
                    own, added = batch(start, min(start + rows_per_batch, len(dataset)))
                    arrays = (own.columns if own is not None else []) + added.columns
                    stream.write_table(pa.Table.from_arrays(arrays, schema=schema))
        except Exception as error:
            if store.state.num_processes == 1:
                raise
            failure = error  # raised on every process by `finish`, rather than leaving them waiting
    store.finish(failure)


def open_columns(dataset: Dataset, store: ChunkStore, prompt_only: bool) -> Dataset:
    """`dataset` completed with the columns of `store`'s file, memory-mapped."""
    (chunk,) = store.ranges
    if not prompt_only:
        return concatenate_datasets([dataset, Dataset.from_file(store.path(chunk))], axis=1)
    info = dataset.info.copy()
    info.features = None  # the expanded rows' features are in the file
    return Dataset.from_file(store.path(chunk), info=info, split=dataset.split)


def _batch(
    dataset: Dataset, results: StageResults, prompt_only: bool, add_ref_rewards: bool, keep_ref_completions: bool,
    start: int, stop: int,
) -> tuple[pa.Table | None, pa.Table]:
    """
    The output rows of dataset rows `start` to `stop`: the dataset's own columns (repeated, for prompt-only data; else
    `None`: they stay where they are) and the new columns.
    """
    n = results.num_generations
    groups = results.group_of_row[start:stop]
    own, columns = None, {}
    if prompt_only:
        # One row per sampled completion: the row repeated, with its group's k-th completion and reward
        own = dataset.with_format("arrow")[start:stop].take(np.repeat(np.arange(stop - start), n))
        units = _units(groups, n)
        columns["completion"] = _completions(results.sampling.take(units, "completion"), results.conversational)
        columns["reward"] = pa.array(results.sampled_rewards[units])
        groups = np.repeat(groups, n)
    for column, rewards in results.own_rewards.items():
        columns[column] = pa.array(rewards[start:stop])
    if results.sampled_rewards is not None and add_ref_rewards:
        units = _units(groups, n)
        columns["ref_rewards"] = _lists(pa.array(results.sampled_rewards[units]), n)
        if keep_ref_completions:
            columns["ref_completions"] = _lists(
                _completions(results.sampling.take(units, "completion"), results.conversational), n
            )
    return own, pa.table(columns)


def _units(groups: np.ndarray, n: int) -> np.ndarray:
    """The indices of the sampled completions of each group, group after group."""
    return (groups[:, None] * n + np.arange(n)).ravel()


def _lists(values: pa.Array, n: int) -> pa.ListArray:
    return pa.ListArray.from_arrays(np.arange(0, len(values) + 1, n, dtype=np.int32), values)


def _completions(texts: pa.Array, conversational: bool) -> pa.Array:
    """Completions as the stage returns them: texts, or one assistant message each for conversational data."""
    if not conversational:
        return texts
    messages = pa.StructArray.from_arrays([pa.repeat("assistant", len(texts)), texts], names=["role", "content"])
    return _lists(messages, 1)
