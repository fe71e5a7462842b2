from dataclasses import dataclass, field

from .pointwise_config import PointwiseConfig, check_choice
from .targets import MIN_REFERENCES, PARTITIONS, TIES, TRANSFORMS, check_partition


@dataclass
class QRPOConfig(PointwiseConfig):
    r"""
    Configuration class for the [`QRPOTrainer`], Quantile Reward Policy Optimization
    ([Matrenok, Moalla, Gulcehre 2025](https://huggingface.co/papers/2507.08068)).

    Each sample's reward becomes its quantile `q` among the rewards of completions sampled from the reference model for
    the same prompt (`ref_rewards`), and the policy regresses `beta * log(pi_theta / pi_ref)` onto
    `f(q) - beta * log Z_f`, where the partition function `Z_f` of the transformed quantile is known in closed form.

    Only the parameters specific to QRPO are listed here; see [`PointwiseConfig`] for those of every pointwise trainer
    (`beta`, `precompute_ref_log_probs`, `logps_normalization`, `regression_loss`, ...) and of the reference stage, and
    [`~trl.DPOConfig`] and [`~transformers.TrainingArguments`] for the rest.

    Example:

    ```python
    >>> from qrpo_trl import QRPOConfig

    >>> # The QRPO paper's LeetCode run (configs/qrpo_tulu3_8b_leetcode.yaml): the first 20 reference rewards of
    >>> # each prompt, identity transform, beta 1e-2
    >>> args = QRPOConfig(output_dir="Tulu-3-8B-QRPO", beta=0.01, num_ref_rewards=20, learning_rate=3e-7)
    ```

    Parameters:
        transform (`str`, *optional*, defaults to `"identity"`):
            Transform `f` applied to the quantile reward, which shapes the optimal policy. Possible values are:

                - `"identity"` (the paper's default): `f(q) = q`.
                - `"log"`: `f(q) = log q` (q clamped to `>= 1/n`); the optimum is Best-of-N with `N = 1 + 1/beta`.
                - `"square"`: `f(q) = q^2`.
                - `"sqrt"`: `f(q) = sqrt(q)`.
                - `"normal_icdf"`: `f(q) = Phi^-1(q)` (q clamped to `[1/n, (n-1)/n]`, needs `n >= 3`).
                - `"scaled_normal_icdf"`: `f(q) = sigma_x * Phi^-1(q)`, with `sigma_x` the row's reference-reward
                  standard deviation divided by its mean over the training rows, as the official code normalises it
                  (prompts with more rows weigh more; needs `n >= 3`).
        partition (`str`, *optional*, defaults to `"exact"`):
            How `beta * log Z_f` is computed. Possible values are:

                - `"exact"`: the closed form for a continuous uniform quantile, in stable float64.
                - `"finite_n"`: the exact value for a quantile computed against `n` references, which is
                  discrete-uniform on `{0, 1/n, ..., 1}` (a constant shift per `n`, largest for small `n`).
                - `"approx"`: the official README's `log Z = log(beta) + 1/beta` (identity only), to reproduce the
                  official code. It drops the term `log(1 - exp(-1/beta))` of `log Z`, so its `beta * log Z` is too
                  large by `-beta * log(1 - exp(-1/beta))`: 0.073 at beta=0.5 (0.145 in `log Z`), below 1e-8 for
                  beta <= 0.05.
        ties (`str`, *optional*, defaults to `"le"`):
            How reference rewards equal to the sample's reward count. `"le"` (the official code) counts them fully,
            which biases `q` upward with discrete rewards; `"mid"` (mid-rank) counts them as one half.
        num_ref_rewards (`int`, *optional*):
            Number of reference rewards to use per prompt: the first `num_ref_rewards` of `ref_rewards`, as the official
            code does. Every row must have at least that many. If `None`, all of them are used.
        exclude_self_from_ref (`bool`, *optional*, defaults to `False`):
            Whether to remove the sample's own reward from its `ref_rewards` (once) before computing its quantile, for
            training completions that are themselves reference samples. Each row's reward must then be among its
            `ref_rewards`.
        normalize_beta_by_length (`bool`, *optional*, defaults to `False`):
            Whether each sample uses `beta_i = beta / L_i`, with `L_i` its number of trained completion tokens (EOS
            included, after `max_length` truncation), in the regression and in the partition term: the target is
            `f(q) - beta_i * log Z_f(beta_i)` and the loss `(target - beta_i * log-ratio)^2`. This is the Apertus
            trainer's option for long chat completions, where a sequence log-ratio grows with the length; `beta` is
            then a per-token coefficient (Apertus uses 2 to 5).
    """

    transform: str = field(
        default="identity",
        metadata={"help": "Transform f of the quantile reward.", "choices": list(TRANSFORMS)},
    )
    partition: str = field(
        default="exact",
        metadata={
            "help": "How beta * log Z is computed: 'exact' (continuous closed form), 'finite_n' (exact for n "
            "references) or 'approx' (official README, identity only).",
            "choices": list(PARTITIONS),
        },
    )
    ties: str = field(
        default="le",
        metadata={"help": "Ties in the quantile: 'le' (official) or 'mid' (mid-rank).", "choices": list(TIES)},
    )
    num_ref_rewards: int | None = field(
        default=None,
        metadata={"help": "Use the first n reference rewards of each prompt. None uses all of them."},
    )
    exclude_self_from_ref: bool = field(
        default=False,
        metadata={"help": "Remove the sample's own reward from its reference rewards before computing its quantile."},
    )

    normalize_beta_by_length: bool = field(
        default=False,
        metadata={
            "help": "Use beta_i = beta / (completion tokens, EOS included) per sample, in the regression and in "
            "beta_i * log Z(beta_i)."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        if self.normalize_beta_by_length and self.logps_normalization == "mean":
            raise ValueError(
                "`normalize_beta_by_length=True` already divides by the completion length: use "
                "`logps_normalization='sum'` with it."
            )
        check_choice("transform", self.transform, TRANSFORMS)
        check_choice("partition", self.partition, PARTITIONS)
        check_choice("ties", self.ties, TIES)
        check_partition(self.transform, self.partition)
        minimum = MIN_REFERENCES.get(self.transform, 1)
        if self.num_ref_rewards is not None and self.num_ref_rewards < minimum:
            reason = (
                f": it clamps q to [1/n, (n-1)/n], which leaves a single value below 3 references and every target "
                "the same constant"
                if self.transform in MIN_REFERENCES
                else ""
            )
            raise ValueError(
                f"`num_ref_rewards` must be >= {minimum} or None with transform={self.transform!r}{reason}; got "
                f"{self.num_ref_rewards}."
            )
