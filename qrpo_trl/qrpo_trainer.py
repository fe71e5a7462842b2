import textwrap

import numpy as np
from datasets import Dataset

from .data_utils import float_column, ragged_float_column, reward_columns
from .docstrings import POINTWISE_TRAINER_ARGS, with_args_doc
from .pointwise_collator import completion_lengths
from .pointwise_trainer import PointwiseTrainer
from .qrpo_config import QRPOConfig
from .targets import (
    MIN_REFERENCES,
    TRANSFORMS_NEEDING_N,
    beta_log_partition,
    own_reward_index,
    pad_ragged,
    quantile_rewards,
    reference_stds,
    transform_quantiles,
)


@with_args_doc(POINTWISE_TRAINER_ARGS)
class QRPOTrainer(PointwiseTrainer):
    """
    Trainer for Quantile Reward Policy Optimization (QRPO), from the paper [Quantile Reward Policy Optimization:
    Alignment with Pointwise Regression and Exact Partition
    Functions](https://huggingface.co/papers/2507.08068). A drop-in replacement for [`~trl.DPOTrainer`]: same
    constructor, and `isinstance(trainer, DPOTrainer)` holds.

    Each sample's reward `r` becomes its quantile `q` among `ref_rewards`, the rewards of completions sampled from the
    reference model for the same prompt; the policy then regresses `beta * log(pi_theta(y|x) / pi_ref(y|x))` onto
    `f(q) - beta * log Z_f` with a squared loss, where `Z_f` is known in closed form (see [`QRPOConfig`]). Targets and
    reference log-probabilities are computed once, before training.

    Example:

    ```python
    >>> from datasets import Dataset
    >>> from qrpo_trl import QRPOTrainer

    >>> dataset = Dataset.from_dict(
    ...     {
    ...         "prompt": ["The sky is", "The sea is"],
    ...         "completion": [" blue.", " made of grass."],
    ...         "reward": [0.9, 0.1],
    ...         "ref_rewards": [[0.2, 0.5, 0.7, 0.95], [0.3, 0.4, 0.6, 0.8]],
    ...     }
    ... )
    >>> trainer = QRPOTrainer(model="Qwen/Qwen2.5-0.5B-Instruct", train_dataset=dataset)
    >>> trainer.train()
    ```

    Args:
        args ([`QRPOConfig`], *optional*):
            Configuration for this trainer. If `None`, a default configuration is used, with `output_dir` named after
            the model (`<model name>-QRPO`).
        train_dataset ([`~datasets.Dataset`] or [`~datasets.IterableDataset`]):
            Dataset to use for training, [standard](dataset_formats#standard) (plain text) or
            [conversational](dataset_formats#conversational) (lists of `{"role", "content"}` messages), in one of the
            formats:

            - pointwise: `prompt`, `completion`, `reward`, and `ref_rewards` (a list of floats per row) or a
              precomputed `quantile_reward` in [0, 1]; if both are present, the quantile is computed from
              `ref_rewards`;
            - paired with scores: `prompt`, `chosen`, `rejected`, `chosen_reward`/`rejected_reward` (or
              `score_chosen`/`score_rejected`, or `chosen_rewards`/`rejected_rewards`) and `ref_rewards`: each pair
              becomes two pointwise samples, or one of them (`args.paired_samples`).

            Reference log-probabilities given as `ref_logps` (pointwise) or `ref_chosen_logps`/`ref_rejected_logps`
            (paired) are used as they are. Given `reward_funcs`, the reference stage (see [`precompute_rewards`])
            completes a dataset that lacks them: it samples `args.num_generations` completions per prompt from the
            reference model and scores them (`ref_rewards`), and scores the completions that have no `reward`. A
            prompt-only dataset is trained on completions sampled from the reference model, whose `ref_rewards` then
            include the sample itself: set `exclude_self_from_ref=True`.

            A streamed [`~datasets.IterableDataset`] is prepared batch by batch as it is read, with
            `args.precompute_ref_log_probs=False` (the reference log-probabilities are computed at every step) and
            `args.max_steps`. It cannot be used with `transform="scaled_normal_icdf"` (its scale is a mean over all
            training prompts) nor completed by `reward_funcs`.
    """

    _config_class = QRPOConfig
    _reference_columns = ("ref_rewards", "quantile_reward")
    _metric_columns = ("quantile", "beta_log_partition")
    _tag_names = ["trl", "qrpo"]
    _name = "QRPO"
    _paper = {
        "title": "Quantile Reward Policy Optimization: Alignment with Pointwise Regression and Exact Partition Functions",
        "id": "2507.08068",
        # docstyle-ignore
        "citation": textwrap.dedent("""\
            @article{matrenok2025qrpo,
                title        = {{Quantile Reward Policy Optimization: Alignment with Pointwise Regression and Exact Partition Functions}},
                author       = {Simon Matrenok and Skander Moalla and Caglar Gulcehre},
                year         = 2025,
                eprint       = {arXiv:2507.08068},
            }"""),
    }

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        raw = isinstance(dataset, Dataset) and "completion_ids" not in dataset.column_names
        if raw and self._needs_reference_stage(dataset) and self._samples_ref_rewards(dataset.column_names):
            # Checked now, not on the sampled `ref_rewards` once the whole reference stage has run
            needed, reasons = self._references_needed(args)
            if args.num_generations < needed:
                raise ValueError(
                    f"The reference stage samples num_generations={args.num_generations} reference completions per "
                    f"prompt of the {dataset_name} dataset, but {needed} reference rewards are needed "
                    f"({'; '.join(reasons)}): set `num_generations` to at least {needed}."
                )
        return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

    @staticmethod
    def _references_needed(args) -> tuple[int, list[str]]:
        """How many reference rewards each row needs, and why."""
        reasons = [f"num_ref_rewards={args.num_ref_rewards}" if args.num_ref_rewards else "at least one reference"]
        if args.transform in MIN_REFERENCES:
            reasons.append(f"transform={args.transform!r} needs {MIN_REFERENCES[args.transform]}")
        if args.exclude_self_from_ref:
            reasons.append("exclude_self_from_ref=True removes one")
        needed = max(args.num_ref_rewards or 1, MIN_REFERENCES.get(args.transform, 1)) + args.exclude_self_from_ref
        return needed, reasons

    def _check_streamable(self, args, dataset_name):
        if args.transform == "scaled_normal_icdf":
            raise ValueError(
                f"transform='scaled_normal_icdf' cannot stream the {dataset_name} dataset: its scale sigma_x is "
                "divided by the mean over every training prompt of the reference-reward standard deviation, which "
                "needs the whole train dataset before the first target. Use a map-style Dataset or another transform."
            )

    def _check_dataset(self, dataset, args, dataset_name):
        if "ref_rewards" not in dataset.column_names:
            self._check_quantile_column(dataset, args, dataset_name)
            return
        ref_rewards = ragged_float_column(dataset, "ref_rewards", dataset_name)
        needed, reasons = self._references_needed(args)
        lengths = np.array([len(refs) for refs in ref_rewards])
        short = np.flatnonzero(lengths < needed)
        if short.size:
            raise ValueError(
                f"Column 'ref_rewards' of the {dataset_name} dataset, row {short[0]}: has {lengths[short[0]]} reference "
                f"rewards, but at least {needed} are needed ({'; '.join(reasons)}). {short.size} rows are short."
            )
        if args.exclude_self_from_ref:
            for column in reward_columns(dataset.column_names):
                rewards = float_column(dataset, column, dataset_name)
                for row, (reward, refs) in enumerate(zip(rewards, ref_rewards, strict=True)):
                    if own_reward_index(refs, reward) is None:
                        raise ValueError(
                            f"Column '{column}' of the {dataset_name} dataset, row {row}: exclude_self_from_ref=True "
                            f"but the reward {reward} is not among the row's ref_rewards."
                        )

    @staticmethod
    def _check_quantile_column(dataset, args, dataset_name):
        if "completion" not in dataset.column_names:
            raise ValueError(
                f"The {dataset_name} dataset is paired, and its single `quantile_reward` column cannot belong to both "
                "the chosen and the rejected completion: give `ref_rewards` instead."
            )
        quantiles = float_column(dataset, "quantile_reward", dataset_name)
        outside = np.flatnonzero((quantiles < 0) | (quantiles > 1))
        if outside.size:
            raise ValueError(
                f"Column 'quantile_reward' of the {dataset_name} dataset, row {outside[0]}: expected a quantile in "
                f"[0, 1], got {quantiles[outside[0]]}."
            )
        if args.transform == "scaled_normal_icdf" or args.exclude_self_from_ref:
            setting = "exclude_self_from_ref=True" if args.exclude_self_from_ref else "transform='scaled_normal_icdf'"
            raise ValueError(f"{setting} needs the reference rewards: the {dataset_name} dataset has only `quantile_reward`.")
        if (args.transform in TRANSFORMS_NEEDING_N or args.partition == "finite_n") and args.num_ref_rewards is None:
            raise ValueError(
                f"transform={args.transform!r} with partition={args.partition!r} needs the number of references n, "
                f"which the {dataset_name} dataset's `quantile_reward` column does not carry: set `num_ref_rewards` to "
                "the number of references the quantiles were computed against."
            )

    def _references(self, dataset, dataset_name) -> list[np.ndarray]:
        """Each row's reference rewards as used: own reward removed (if asked), then the first `num_ref_rewards`."""
        ref_rewards = ragged_float_column(dataset, "ref_rewards", dataset_name)
        if self.args.exclude_self_from_ref:
            rewards = float_column(dataset, "reward", dataset_name)
            ref_rewards = [
                np.delete(refs, own_reward_index(refs, reward))
                for refs, reward in zip(ref_rewards, rewards, strict=True)
            ]
        return [refs[: self.args.num_ref_rewards] for refs in ref_rewards]

    def _target_statistics(self, dataset, ref_logps):
        if self.args.transform != "scaled_normal_icdf":
            return {}
        # sigma_x is normalised by the mean over the training rows of the reference-reward standard deviation, as the
        # official code does (its rows are pairs: a pair's two samples share their references, so the mean is the same)
        mean_std = float(reference_stds(pad_ragged(self._references(dataset, "train"))).mean())
        if not mean_std > 0:
            raise ValueError(
                "transform='scaled_normal_icdf' scales by the reference-reward standard deviation, which is 0 for every "
                "prompt of the train dataset."
            )
        return {"mean_ref_std": mean_std}

    def _regression_targets(self, dataset, ref_logps, statistics):
        args = self.args
        scale = None
        if "ref_rewards" in dataset.column_names:
            references = pad_ragged(self._references(dataset, "prepared"))
            num_references = np.sum(~np.isnan(references), axis=1)
            quantiles = quantile_rewards(float_column(dataset, "reward", "prepared"), references, args.ties)
            if args.transform == "scaled_normal_icdf":
                scale = reference_stds(references) / statistics["mean_ref_std"]
        else:
            num_references = args.num_ref_rewards
            quantiles = float_column(dataset, "quantile_reward", "prepared")
        transformed = transform_quantiles(quantiles, args.transform, n=num_references, scale=scale)
        columns = {"quantile": quantiles}
        beta = args.beta
        if args.normalize_beta_by_length:
            beta = args.beta / completion_lengths(dataset, args.max_length, args.truncation_mode)
            columns["beta"] = beta
        log_partition = beta_log_partition(args.transform, beta, args.partition, n=num_references, scale=scale)
        columns["beta_log_partition"] = np.broadcast_to(log_partition, quantiles.shape)
        columns["target"] = transformed - log_partition
        return columns
