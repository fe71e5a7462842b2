from dataclasses import dataclass, field

from .pointwise_config import PointwiseConfig, check_choice
from .targets import VALUE_ESTIMATORS


@dataclass
class RPOConfig(PointwiseConfig):
    r"""
    Configuration class for the [`RPOTrainer`], Reward Partitioning Optimization (Faye, Azzag, Lebbah 2025).

    RPO regresses `log(pi_theta / pi_ref)` onto `(r - V(x)) / beta`, with the loss
    `0.5 * (log pi_theta - log pi_ref - (r - V(x)) / beta)^2`, where the value `V(x)` is estimated once, before training,
    from the reference log-probabilities and rewards of all the dataset's completions of prompt `x`. `beta` is the
    paper's temperature τ.

    This is not TRL's former `rpo_alpha` ("iterative reasoning preference optimization", a DPO + NLL mix removed in TRL
    0.29).

    Only the parameters specific to RPO are listed here; see [`PointwiseConfig`] for those of every pointwise trainer
    (`beta`, `precompute_ref_log_probs`, `logps_normalization` (the paper's code uses `"mean"`), `regression_loss`,
    ...) and of the reference stage, and [`~trl.DPOConfig`] and [`~transformers.TrainingArguments`] for the rest.

    Example:

    ```python
    >>> from qrpo_trl import RPOConfig

    >>> # The RPO paper's settings (configs/rpo_flan_t5.yaml): tau = 1, z-scored rewards, and per-token mean
    >>> # log-probabilities as its code computes them
    >>> args = RPOConfig(
    ...     output_dir="Qwen2.5-0.5B-RPO", beta=1.0, normalize_rewards=True, logps_normalization="mean"
    ... )
    ```

    Parameters:
        value_estimator (`str`, *optional*, defaults to `"ref_weighted"`):
            How `V(x)` is estimated from the completions `y_j` of `x`. Possible values are:

                - `"ref_weighted"` (the paper): `V(x) = beta * log sum_y pi_ref(y|x) exp(r_y / beta)` over the
                  distinct completions `y` of `x` (same completion tokens), which makes the trained policy a softmax
                  over them. A completion present in several rows counts once, and its rows regress onto the mean of
                  their rewards.
                - `"ref_weighted_rows"`: the same sum over rows, as the official code computes it, to reproduce it. A
                  completion present k times counts k times, so a prompt whose completions each appear twice trains
                  to a total probability of about 1/2 on them instead of 1.
                - `"monte_carlo"`: `V(x) = beta * log(1/n sum_j exp(r_j / beta))` over the n rows of `x`, the Monte
                  Carlo estimate of `beta * log E_ref[exp(r / beta)]`, suited to completions sampled from the
                  reference model: every row is an independent draw and counts, duplicates included. With a
                  `ref_rewards` column (rewards of reference-model samples of `x`, per row), the same estimate over
                  each row's `ref_rewards`: the rows may then be a subset of the samples (e.g. each prompt's best
                  and worst) while `V(x)` uses all of them.
        normalize_rewards (`bool`, *optional*, defaults to `False`):
            Whether to z-score the rewards over the training dataset (mean 0, standard deviation 1), as in the paper's
            experiments. Evaluation datasets use the training statistics.
    """

    value_estimator: str = field(
        default="ref_weighted",
        metadata={
            "help": "How V(x) is estimated: 'ref_weighted' (the paper, over distinct completions), "
            "'ref_weighted_rows' (the official code, over rows) or 'monte_carlo'.",
            "choices": list(VALUE_ESTIMATORS),
        },
    )
    normalize_rewards: bool = field(
        default=False,
        metadata={"help": "Z-score the rewards over the training dataset."},
    )

    def __post_init__(self):
        super().__post_init__()
        check_choice("value_estimator", self.value_estimator, VALUE_ESTIMATORS)
