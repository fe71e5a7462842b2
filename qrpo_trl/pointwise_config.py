"""Configuration shared by QRPOConfig and RPOConfig: the DPOConfig fields that apply to a pointwise regression."""

import dataclasses
from dataclasses import dataclass, field

from trl import DPOConfig

from .data_utils import PAIRED_SAMPLES
from .reference_config import ReferenceStageFields
from .targets import LOGPS_NORMALIZATIONS


REGRESSION_LOSSES = ("mse", "mae")


# DPOConfig fields that shape DPO's pairwise loss or move its reference model: a pointwise trainer has one loss and a
# fixed reference, so a non-default value would be silently ignored.
_DPO_ONLY_FIELDS = (
    "loss_type",
    "loss_weights",
    "ld_alpha",
    "f_divergence_type",
    "f_alpha_divergence_coef",
    "label_smoothing",
    "use_weighting",
    "discopop_tau",
    "sync_ref_model",
)


@dataclass
class PointwiseConfig(DPOConfig, ReferenceStageFields):
    r"""
    Base configuration of the pointwise trainers ([`QRPOConfig`], [`RPOConfig`]). It subclasses [`~trl.DPOConfig`], so
    every DPO field that is not about the pairwise loss (data preprocessing, `max_length`, `model_init_kwargs`, ...)
    works as in DPO. DPO's loss fields (`loss_type`, `loss_weights`, `ld_alpha`, `f_divergence_type`,
    `f_alpha_divergence_coef`, `label_smoothing`, `use_weighting`, `discopop_tau`) and `sync_ref_model` must keep their
    defaults.

    Example:

    ```python
    >>> from dataclasses import dataclass, field
    >>> from qrpo_trl import PointwiseConfig

    >>> @dataclass
    ... class RewardRegressionConfig(PointwiseConfig):
    ...     reward_scale: float = field(default=1.0, metadata={"help": "Factor of the rewards in the targets."})

    >>> args = RewardRegressionConfig(output_dir="Qwen2.5-0.5B-RewardRegression", beta=0.05, reward_scale=2.0)
    ```

    Parameters:
        beta (`float`, *optional*, defaults to `0.1`):
            KL coefficient of the regularised objective `E[R] - beta * KL(pi || pi_ref)`. Higher β keeps the policy
            closer to the reference model. The regression fits `beta * (log pi_theta - log pi_ref)` to the target.
        precompute_ref_log_probs (`bool`, *optional*, defaults to `True`):
            Whether to compute the reference log-probabilities once, before training, so that training holds no
            reference model. If `False`, they are recomputed on the fly at every step, with `ref_model`, the adapters
            disabled (PEFT), or a reference loaded from the model path; the loss is the same.
        logps_normalization (`str`, *optional*, defaults to `"sum"`):
            How the completion-token log-probabilities of a sequence are aggregated, for the policy and the reference
            alike: `"sum"` (the sequence log-probability of the papers' math) or `"mean"` (per-token mean, as in the
            RPO paper's code).
        regression_loss (`str`, *optional*, defaults to `"mse"`):
            Penalty on the residual `target - beta * log-ratio`: `"mse"` (squared, the papers' loss) or `"mae"`
            (absolute value, the official QRPO code's `qrpo_loss_type="mae"`).
        paired_samples (`str`, *optional*, defaults to `"both"`):
            Which completions of a paired training dataset become training samples (the official QRPO code's
            `qrpo_sample_selector`): `"both"` (two samples per pair), `"chosen"`, `"rejected"`, or `"random"` (one of
            the two per pair, drawn once, seeded by `seed`). Evaluation datasets keep both, for the pair metrics.
        apply_temperature_in_training (`bool`, *optional*, defaults to `False`):
            Whether the policy and reference log-probabilities are those of the logits divided by `temperature` (the
            official QRPO code's option of the same name): when the reference completions were sampled at a
            temperature T != 1, the quantile's reference distribution is then the one the regression uses.
        padding_free (`bool`, *optional*, defaults to `False`):
            Whether to pack the samples of each batch into one row, without padding (DPOTrainer disables this field,
            its pairwise collator cannot pack; a pointwise sample has no partner). Attention stays within each sample,
            and log-probabilities, loss and gradients equal those of the padded batch; the reference pass packs too.
            Not for encoder-decoder models nor prompt-learning PEFT (a `ValueError`).
        share_prompt (`bool`, *optional*, defaults to `False`):
            With `padding_free=True`: the completions of one prompt that fall in the same batch are packed after one
            copy of it, which is computed once and receives the gradients of all of them (training and the reference
            log-prob pass). Same log-probs, loss and gradients as the padded batch. Pays with several completions per
            prompt in a batch: see `group_by_prompt`.
        group_by_prompt (`bool`, *optional*, defaults to `False`):
            Sample the training rows in a random order of whole prompt groups (`PromptGroupedSampler`, shuffled by
            `seed`), so that a batch holds all the completions of its prompts, as DPO's batches hold whole pairs,
            rather than TRL's random order of rows. A batch then holds fewer prompts. Replaces
            `train_sampling_strategy`, which must stay `"random"`.

        > Parameters of the reference stage, used when the trainer is given `reward_funcs` and the dataset lacks
        > rewards, or QRPO's `ref_rewards`: the fields of [`ReferenceStageFields`], documented there. Sampling is
        > seeded by `seed`.
    """

    beta: float = field(
        default=0.1,
        metadata={
            "help": "KL coefficient of the regularised objective E[R] - beta * KL(pi || pi_ref). Higher beta keeps the "
            "policy closer to the reference model."
        },
    )
    precompute_ref_log_probs: bool = field(
        default=True,
        metadata={
            "help": "Compute the reference log-probabilities once, before training, so that training holds no "
            "reference model. If False, they are recomputed on the fly at every step."
        },
    )
    logps_normalization: str = field(
        default="sum",
        metadata={
            "help": "How completion-token log-probabilities are aggregated: 'sum' (sequence log-probability) or 'mean' "
            "(per-token mean).",
            "choices": list(LOGPS_NORMALIZATIONS),
        },
    )

    regression_loss: str = field(
        default="mse",
        metadata={
            "help": "Penalty on the residual target - beta * log-ratio: 'mse' (squared) or 'mae' (absolute).",
            "choices": list(REGRESSION_LOSSES),
        },
    )
    paired_samples: str = field(
        default="both",
        metadata={
            "help": "Completions of a paired training dataset used as samples: 'both', 'chosen', 'rejected' or "
            "'random' (one per pair, seeded).",
            "choices": list(PAIRED_SAMPLES),
        },
    )
    apply_temperature_in_training: bool = field(
        default=False,
        metadata={
            "help": "Compute policy and reference log-probabilities from logits / temperature, the temperature the "
            "reference completions were sampled at."
        },
    )

    share_prompt: bool = field(
        default=False,
        metadata={
            "help": "With padding_free=True, pack the completions of one prompt in a batch after one copy of it, "
            "computed once (training and the reference log-prob pass)."
        },
    )
    group_by_prompt: bool = field(
        default=False,
        metadata={
            "help": "Sample training rows in a random order of whole prompt groups (seeded), so that a batch holds all "
            "the completions of its prompts."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        if self.share_prompt and not self.padding_free:
            raise ValueError(
                "`share_prompt=True` packs the completions of a prompt after one copy of it in a packed row: it needs "
                "`padding_free=True`."
            )
        if self.group_by_prompt and self.train_sampling_strategy != "random":
            raise ValueError(
                "`group_by_prompt=True` sets the training order (whole prompt groups, shuffled); it cannot be combined "
                f"with `train_sampling_strategy={self.train_sampling_strategy!r}`. Leave the latter at 'random'."
            )
        self._check_reference_fields()  # TrainingArguments.__post_init__ does not chain to the mixin
        if not self.beta > 0:
            raise ValueError(f"`beta` must be > 0, got {self.beta}.")
        check_choice("logps_normalization", self.logps_normalization, LOGPS_NORMALIZATIONS)
        check_choice("regression_loss", self.regression_loss, REGRESSION_LOSSES)
        check_choice("paired_samples", self.paired_samples, PAIRED_SAMPLES)
        defaults = {f.name: f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
                    for f in dataclasses.fields(DPOConfig) if f.name in _DPO_ONLY_FIELDS}
        changed = [name for name, default in defaults.items() if getattr(self, name) != default]
        if changed:
            raise ValueError(
                f"{type(self).__name__} does not use DPO's {', '.join(f'`{name}`' for name in changed)}: the loss is "
                "one pointwise regression (`regression_loss`) onto a per-sample target, against a fixed reference "
                "model. Leave these fields at their defaults."
            )


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"Unknown `{name}` {value!r}; expected one of {', '.join(map(repr, choices))}.")
