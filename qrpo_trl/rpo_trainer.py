import textwrap

import numpy as np
from accelerate.logging import get_logger

from .data_utils import completion_groups, float_column, prompt_groups, ragged_float_column, reward_columns
from .docstrings import POINTWISE_TRAINER_ARGS, with_args_doc
from .pointwise_trainer import PointwiseTrainer
from .rpo_config import RPOConfig
from .targets import label_means, monte_carlo_values, pad_ragged, rpo_values


logger = get_logger(__name__)


@with_args_doc(POINTWISE_TRAINER_ARGS)
class RPOTrainer(PointwiseTrainer):
    """
    Trainer for Reward Partitioning Optimization (RPO), from the paper "Value-Free Policy Optimization via Reward
    Partitioning" (Faye, Azzag, Lebbah 2025). A drop-in replacement for [`~trl.DPOTrainer`]: same constructor, and
    `isinstance(trainer, DPOTrainer)` holds. Not TRL's former `rpo_alpha` (a DPO + NLL mix removed in TRL 0.29).

    The value of each prompt, `V(x) = beta * log sum_y pi_ref(y|x) exp(r_y / beta)` over the dataset's distinct
    completions `y` of `x` (a completion present in several rows counts once, with the mean of their rewards), is
    computed once from the reference model before training; the policy then minimises
    `0.5 * (log pi_theta(y|x) - log pi_ref(y|x) - (r - V(x)) / beta)^2`. At the optimum the policy is a softmax over
    the observed completions of each prompt, so a prompt with a single completion degenerates to maximising its
    likelihood.

    With `value_estimator="monte_carlo"` and a `ref_rewards` column (a list of floats per row: the rewards of
    completions sampled from the reference model for the row's prompt, as QRPO's), `V(x)` is the Monte Carlo estimate
    over each row's `ref_rewards` instead of over the dataset's rows of `x`: the dataset may then train on some of the
    samples only (e.g. each prompt's best and worst, or `qrpo-trl offpolicy` pairs) with `V(x)` over all of them.

    Example:

    ```python
    >>> from datasets import Dataset
    >>> from qrpo_trl import RPOConfig, RPOTrainer

    >>> dataset = Dataset.from_dict(
    ...     {
    ...         "prompt": ["The sky is", "The sky is", "The sea is", "The sea is"],
    ...         "completion": [" blue.", " green.", " deep.", " made of grass."],
    ...         "reward": [1.0, 0.2, 0.8, 0.0],
    ...     }
    ... )
    >>> args = RPOConfig(output_dir="Qwen2.5-0.5B-RPO", beta=0.5, normalize_rewards=True)
    >>> trainer = RPOTrainer(model="Qwen/Qwen2.5-0.5B-Instruct", args=args, train_dataset=dataset)
    >>> trainer.train()
    ```

    Args:
        args ([`RPOConfig`], *optional*):
            Configuration for this trainer. If `None`, a default configuration is used, with `output_dir` named after
            the model (`<model name>-RPO`).
        train_dataset ([`~datasets.Dataset`]):
            Dataset to use for training, [standard](dataset_formats#standard) (plain text) or
            [conversational](dataset_formats#conversational) (lists of `{"role", "content"}` messages), in one of the
            formats:

            - pointwise: `prompt`, `completion`, `reward`, with several completions per prompt;
            - paired with scores: `prompt`, `chosen`, `rejected`, `chosen_reward`/`rejected_reward` (or
              `score_chosen`/`score_rejected`, or `chosen_rewards`/`rejected_rewards`): each pair becomes two
              pointwise samples, or one of them (`args.paired_samples`).

            Reference log-probabilities given as `ref_logps` (pointwise) or `ref_chosen_logps`/`ref_rejected_logps`
            (paired) are used as they are. Not a streamed [`~datasets.IterableDataset`]: `V(x)` needs every
            completion of the prompt before training. Given `reward_funcs`, the reference stage (see
            [`precompute_rewards`]) scores the completions that have no reward, and turns a prompt-only dataset into
            `args.num_generations` completions per prompt sampled from the reference model: data on-policy for the
            reference model, which is what `value_estimator="monte_carlo"` assumes.
    """

    _config_class = RPOConfig
    _metric_columns = ("value",)
    _tag_names = ["trl", "rpo"]
    _name = "RPO"
    _paper = {
        "title": "Value-Free Policy Optimization via Reward Partitioning",
        "id": "2506.13702",
        # docstyle-ignore
        "citation": textwrap.dedent("""\
            @article{faye2025rpo,
                title        = {{Value-Free Policy Optimization via Reward Partitioning}},
                author       = {Bilal Faye and Hanane Azzag and Mustapha Lebbah},
                year         = 2025,
                eprint       = {arXiv:2506.13702},
            }"""),
    }

    @property
    def _target_needs_ref_logps(self):
        return self.args.value_estimator != "monte_carlo"

    def _loss_scale(self):
        # 0.5 * (log-ratio - (r - V) / beta)^2 == 0.5 / beta^2 * ((r - V) - beta * log-ratio)^2, and with
        # regression_loss="mae", 0.5 * |log-ratio - (r - V) / beta| == 0.5 / beta * |(r - V) - beta * log-ratio|
        return 0.5 / self.beta ** (2 if self.args.regression_loss == "mse" else 1)

    def _check_streamable(self, args, dataset_name):
        raise ValueError(
            f"RPOTrainer cannot stream the {dataset_name} dataset (IterableDataset): each target r - V(x) needs the "
            "value V(x), a sum over every completion of the prompt x in the dataset, before the first training step. "
            "Use a map-style Dataset."
        )

    def _check_dataset(self, dataset, args, dataset_name):
        if "ref_rewards" in dataset.column_names:
            if args.value_estimator != "monte_carlo":
                logger.warning(
                    f"The {dataset_name} dataset's `ref_rewards` are not used by value_estimator="
                    f"{args.value_estimator!r}, which sums over the dataset's own completions of each prompt: "
                    "value_estimator='monte_carlo' estimates V(x) from them."
                )
            else:
                references = ragged_float_column(dataset, "ref_rewards", dataset_name)
                empty = [row for row, refs in enumerate(references) if not len(refs)]
                if empty:
                    raise ValueError(
                        f"Column 'ref_rewards' of the {dataset_name} dataset, row {empty[0]}: expected at least one "
                        f"reference reward for V(x), got none ({len(empty)} such rows)."
                    )
        self._check_reward_spread(dataset, args, dataset_name)

    def _check_reward_spread(self, dataset, args, dataset_name):
        """`normalize_rewards` divides by the rewards' standard deviation: they must not all be equal."""
        if args.normalize_rewards and dataset_name == "train":
            rewards = np.concatenate([float_column(dataset, column, dataset_name) for column in reward_columns(dataset.column_names)])
            if not rewards.std() > 0:
                raise ValueError(f"normalize_rewards=True, but every reward of the {dataset_name} dataset is the same.")

    def _target_statistics(self, dataset, ref_logps):
        if not self.args.normalize_rewards:
            return {}
        rewards = float_column(dataset, "reward", "train")
        return {"reward_mean": float(rewards.mean()), "reward_std": float(rewards.std())}

    def _regression_targets(self, dataset, ref_logps, statistics):
        rewards = float_column(dataset, "reward", "prepared")
        if self.args.normalize_rewards:
            rewards = (rewards - statistics["reward_mean"]) / statistics["reward_std"]
        estimator = self.args.value_estimator
        if estimator == "monte_carlo" and "ref_rewards" in dataset.column_names:
            references = pad_ragged(ragged_float_column(dataset, "ref_rewards", "prepared"))
            if self.args.normalize_rewards:
                references = (references - statistics["reward_mean"]) / statistics["reward_std"]
            values = monte_carlo_values(references, self.beta)
            return {"target": rewards - values, "value": values}
        groups = prompt_groups(dataset)
        sizes = np.bincount(groups)
        if (sizes == 1).any():
            logger.warning(
                f"{int((sizes == 1).sum())} of {sizes.size} prompts have a single completion: RPO's target for it is "
                "-beta * log pi_ref(y|x), so its loss degenerates to maximising that completion's likelihood."
            )
        if estimator == "ref_weighted":
            # V(x) sums over the distinct completions, each with its mean reward; every row of a completion regresses
            # onto that mean, which is the optimum of the completion (and the loss is 0 there)
            completions = completion_groups(dataset, groups)
            values = rpo_values(groups, rewards, ref_logps, self.beta, estimator, completions=completions)
            rewards = label_means(completions, rewards)
        else:
            values = rpo_values(groups, rewards, ref_logps, self.beta, estimator)
        return {"target": rewards - values, "value": values}
