"""
Rows of the same prompt kept together: the training sampler that shuffles whole prompt groups (`group_by_prompt`), and
the order in which the reference log-prob pass batches them, so that a batch's completions of one prompt can share it
(`share_prompt`).
"""

import numpy as np
from datasets import Dataset
from torch.utils.data import Sampler


def prompt_groups(dataset: Dataset) -> list[np.ndarray]:
    """The row indices of each distinct `prompt_ids` of a prepared dataset, groups in order of first appearance."""
    groups = {}
    for i, prompt in enumerate(dataset.with_format("arrow")["prompt_ids"].to_pylist()):
        groups.setdefault(tuple(prompt), []).append(i)
    return [np.asarray(rows) for rows in groups.values()]


def grouped_by_length(dataset: Dataset, lengths: np.ndarray) -> np.ndarray:
    """
    The rows of `dataset` in the order the reference pass batches them with shared prompts: each prompt's rows
    together, the groups longest first (an out-of-memory error shows at once), as the unshared pass orders rows.
    """
    groups = prompt_groups(dataset)
    groups = [group[np.argsort(-lengths[group], kind="stable")] for group in groups]
    longest = np.array([lengths[group[0]] for group in groups])
    return np.concatenate([groups[g] for g in np.argsort(-longest, kind="stable")]) if groups else np.array([], int)


class PromptGroupedSampler(Sampler[int]):
    """
    Samples the rows of a prepared pointwise dataset in a random order of whole prompt groups: the rows of one prompt
    (same `prompt_ids`) come one after the other, the groups shuffled by `seed` (and the epoch, `set_epoch`). Batches
    of consecutive rows then hold whole groups, as DPO's batches hold whole pairs, but for the groups that a batch
    boundary splits (a group larger than the batch, or sizes that do not tile it). The trainers use it for training
    with `group_by_prompt=True` (seeded by `args.seed`), so that the completions of a prompt that share a batch can
    share its computation (`share_prompt`).

    Example:

    ```python
    >>> from datasets import Dataset
    >>> from qrpo_trl import PromptGroupedSampler

    >>> # A prepared dataset (as `trainer.train_dataset`): three prompts, of 3, 2 and 1 completions
    >>> dataset = Dataset.from_dict({"prompt_ids": [[1, 2], [3, 4], [1, 2], [5], [3, 4], [1, 2]]})
    >>> sampler = PromptGroupedSampler(dataset, seed=42)
    >>> list(sampler)
    [3, 1, 4, 0, 2, 5]
    >>> sampler.set_epoch(1)
    >>> list(sampler)
    [0, 2, 5, 3, 1, 4]
    ```

    Args:
        dataset ([`~datasets.Dataset`]):
            A prepared (tokenised) pointwise dataset, with a `prompt_ids` column: rows with the same `prompt_ids` form
            one group, whatever their place in the dataset.
        seed (`int`, *optional*, defaults to `0`):
            Seed of the order of the groups, which also depends on the epoch given to `set_epoch` (0 until then): the
            same seed and epoch give the same order, and each epoch its own.
    """

    def __init__(self, dataset: Dataset, seed: int = 0):
        self.groups = prompt_groups(dataset)
        self.num_rows = len(dataset)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_rows

    def __iter__(self):
        order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.groups))
        for g in order:
            yield from self.groups[g].tolist()
