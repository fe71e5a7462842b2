from dataclasses import dataclass, field

from .pointwise_config import PointwiseConfig, check_choice


VALUE_HEADS = ("mlp", "linear")
VALUE_POOLINGS = ("mean", "last")


@dataclass
class DROConfig(PointwiseConfig):
    r"""
    Configuration class for the [`DROTrainer`], Direct Reward Optimization (Richemond et al. 2024, arXiv 2405.19107).

    DRO minimises `L(pi, V) = 0.5 * E[(r - V(x) - beta * (log pi_theta(y|x) - log pi_ref(y|x)))^2]` jointly over the
    policy and a value `V(x)` learned during training. `beta` is the paper's temperature τ. By default `V(x)` is a small
    head on the policy's own prompt representation, the mean of its last hidden states over the prompt tokens (for an
    encoder-decoder model, of its encoder states), with gradients stopped into the policy, as the RPO authors' DRO
    baseline (b-faye/rpo, `dro/train_dro.py`: `Linear(hidden, 512) -> Tanh -> Linear(512, 1)` on mean-pooled encoder
    states).

    Only the parameters specific to DRO are listed here; see [`PointwiseConfig`] for `beta`, `precompute_ref_log_probs`
    and `logps_normalization` (the RPO authors' DRO code uses `"mean"`), and [`~trl.DPOConfig`] and
    [`~transformers.TrainingArguments`] for the rest. `regression_loss` must stay `"mse"`: DRO's value is the minimiser
    of the squared loss.

    Example:

    ```python
    >>> from qrpo_trl import DROConfig

    >>> # The RPO authors' DRO baseline (b-faye/rpo, dro/train_dro.py): tau = 1, z-scored rewards, per-token mean
    >>> # log-probabilities, and one learning rate of 1e-4 for the policy and the default MLP value head
    >>> args = DROConfig(
    ...     output_dir="Qwen2.5-0.5B-DRO", beta=1.0, normalize_rewards=True, logps_normalization="mean",
    ...     learning_rate=1e-4,
    ... )
    ```

    Parameters:
        value_head (`str`, *optional*, defaults to `"mlp"`):
            The value head on the pooled prompt representation: `"mlp"` (`Linear(hidden, value_head_hidden_size) ->
            Tanh -> Linear(value_head_hidden_size, 1)`, the RPO authors' DRO) or `"linear"` (`Linear(hidden, 1)`).
            Ignored, and must keep its default, when the trainer is given a `value_model`.
        value_head_hidden_size (`int`, *optional*, defaults to `512`):
            Width of the hidden layer of the `"mlp"` head (512 in the RPO authors' DRO, for every Flan-T5 size).
        value_pooling (`str`, *optional*, defaults to `"mean"`):
            How the prompt's last hidden states are reduced to one vector: `"mean"` over the prompt tokens (the RPO
            authors' DRO, over encoder states) or `"last"`, the state of the last prompt token (for a decoder-only
            model, the only one that has read the whole prompt).
        value_learning_rate (`float`, *optional*):
            Peak learning rate of the value head (or `value_model`), in its own optimizer parameter group that follows
            the same schedule. `None`: `learning_rate`, as the RPO authors' DRO trains both with one AdamW.
        normalize_rewards (`bool`, *optional*, defaults to `False`):
            Whether to z-score the rewards over the training dataset (mean 0, standard deviation 1), as the RPO authors'
            DRO does. Evaluation datasets use the training statistics.
    """

    value_head: str = field(
        default="mlp",
        metadata={"help": "Value head on the pooled prompt states: 'mlp' or 'linear'.", "choices": list(VALUE_HEADS)},
    )
    value_head_hidden_size: int = field(
        default=512, metadata={"help": "Width of the hidden layer of the 'mlp' value head."}
    )
    value_pooling: str = field(
        default="mean",
        metadata={
            "help": "Reduction of the prompt's last hidden states: 'mean' over the prompt tokens or 'last' prompt token.",
            "choices": list(VALUE_POOLINGS),
        },
    )
    value_learning_rate: float | None = field(
        default=None,
        metadata={"help": "Peak learning rate of the value head (same schedule). None: `learning_rate`."},
    )
    normalize_rewards: bool = field(
        default=False,
        metadata={"help": "Z-score the rewards over the training dataset."},
    )

    def __post_init__(self):
        super().__post_init__()
        check_choice("value_head", self.value_head, VALUE_HEADS)
        check_choice("value_pooling", self.value_pooling, VALUE_POOLINGS)
        if self.value_head_hidden_size < 1:
            raise ValueError(f"`value_head_hidden_size` must be >= 1, got {self.value_head_hidden_size}.")
        if self.value_learning_rate is not None and not self.value_learning_rate >= 0:
            raise ValueError(f"`value_learning_rate` must be >= 0 or None, got {self.value_learning_rate}.")
        if self.regression_loss != "mse":
            raise ValueError(
                f"DROConfig needs `regression_loss='mse'`, got {self.regression_loss!r}: DRO's value V(x) is learned as "
                "the minimiser of the squared loss (an absolute loss would make it a median, another method)."
            )
