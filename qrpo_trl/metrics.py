"""
DPOTrainer's pair metrics (`rewards/chosen`, `rewards/rejected`, `rewards/margins`, `rewards/accuracies`) for the
pointwise trainers, whose samples are single completions: the implicit reward of each evaluated sample is kept with its
pair, and the pairs are joined over the whole evaluation set, since batches (and processes) may split them.
"""

import numpy as np
import torch


def pair_metrics(pair_rewards: np.ndarray) -> dict[str, float]:
    """
    DPOTrainer's `rewards/chosen`, `rewards/rejected`, `rewards/margins` and `rewards/accuracies` from rows of
    (pair index, is chosen, implicit reward `beta * log-ratio`), over the pairs that have both completions.
    """
    pair_index, is_chosen, rewards = pair_rewards.T
    chosen, rejected = {}, {}
    for index, flag, reward in zip(pair_index.astype(np.int64), is_chosen, rewards, strict=True):
        (chosen if flag else rejected)[index] = reward  # a pair seen twice (padded last batch) keeps one value
    complete = sorted(chosen.keys() & rejected.keys())
    if not complete:
        return {}
    chosen_rewards = np.array([chosen[i] for i in complete])
    rejected_rewards = np.array([rejected[i] for i in complete])
    return {
        "rewards/chosen": float(chosen_rewards.mean()),
        "rewards/rejected": float(rejected_rewards.mean()),
        "rewards/margins": float((chosen_rewards - rejected_rewards).mean()),
        "rewards/accuracies": float((chosen_rewards > rejected_rewards).mean()),
    }


class PairMetricsMixin:
    """Keeps the evaluated samples' implicit rewards by pair and logs `pair_metrics` at the end of each evaluation."""

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"):
        self._eval_pair_rewards = []
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        if self._eval_pair_rewards:
            for key, value in pair_metrics(torch.cat(self._eval_pair_rewards).double().numpy()).items():
                self._metrics["eval"][key] = [value]  # logged (and returned by `evaluate`) with the eval_ prefix
        self._eval_pair_rewards = []
        return output

    def _record_pair_rewards(self, inputs: dict[str, torch.Tensor], implicit_rewards: torch.Tensor) -> None:
        """Keep (pair index, is chosen, implicit reward) of an evaluation batch's samples, from every process."""
        if "pair_index" in inputs:
            pairs = torch.stack([inputs["pair_index"], inputs["is_chosen"], implicit_rewards.detach().float()], dim=1)
            self._eval_pair_rewards.append(self.accelerator.gather_for_metrics(pairs).cpu())
