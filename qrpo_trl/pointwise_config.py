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

    Parameters:
        beta (`float`, *optional*, defaults to `0.1`):
            KL coefficient of the regularised objective `E[R] - beta * KL(pi || pi_ref)`. Higher β keeps the policy
            closer to the reference model. The regression fits `beta * (log pi_theta - log pi_ref)` to the target.
        precompute_ref_log_probs (`bool`, *optional*, defaults to `True`):
            Whether to compute the reference log-probabilities once, in the dataset map stage, so that training holds no
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

        > Parameters of the reference stage (see [`ReferenceConfig`]), used when the trainer is given `reward_funcs`
        > and the dataset lacks rewards, or QRPO's `ref_rewards`. Sampling is seeded by `seed`.

        num_generations (`int`, *optional*, defaults to `8`):
            Number of completions sampled from the reference model per prompt: QRPO's reference completions, or the
            training completions of a prompt-only dataset.
        max_completion_length (`int`, *optional*, defaults to `512`):
            Maximum number of tokens of a sampled completion.
        temperature (`float`, *optional*, defaults to `1.0`):
            Sampling temperature. QRPO's quantile assumes samples of the reference model itself: keep `1.0`, or set
            `apply_temperature_in_training=True` so that the reference model is the one at this temperature.
        top_p (`float`, *optional*, defaults to `1.0`):
            Nucleus sampling threshold; `1.0` keeps every token.
        top_k (`int`, *optional*, defaults to `0`):
            Sample among the `top_k` most likely tokens only; `0` keeps every token.
        generation_batch_size (`int`, *optional*, defaults to `32`):
            Number of completions generated (or texts scored by a reward model) per batch on each process.
        use_vllm (`bool`, *optional*, defaults to `False`):
            Whether to sample with vLLM instead of `model.generate()`, on a GPU or on the CPU with vLLM's CPU build
            (see docs/vllm.md). The engine is shut down before training.
        vllm_gpu_memory_utilization (`float`, *optional*, defaults to `0.3`):
            Fraction of the GPU memory that vLLM may use (on CPU: of the machine's memory).
        vllm_tensor_parallel_size (`int`, *optional*, defaults to `1`):
            Number of processes per vLLM engine; must divide the number of processes.
        vllm_enforce_eager (`bool`, *optional*, defaults to `False`):
            Whether vLLM runs the model eagerly: faster start-up, slower sampling.
        reward_weights (`list[float]`, *optional*):
            Weights of the reward functions: the reward is their weighted sum. If `None`, every weight is `1.0`.
        reward_model_trust_remote_code (`bool`, *optional*, defaults to `False`):
            Whether reward models given by path are loaded with `trust_remote_code=True`: custom-code reward models
            such as ArmoRM-Llama3-8B-v0.1 (the QRPO paper's), whose reward is read from the output's `score`.
        keep_ref_completions (`bool`, *optional*, defaults to `False`):
            Whether to keep the sampled reference completions as a `ref_completions` column.
        reference_cache_dir (`str`, *optional*):
            Directory of the reference-stage cache. If `None`, `$HF_HOME/qrpo_trl`.
        reference_chunk_size (`int`, *optional*, defaults to `1024`):
            Number of completions per cached chunk: an interrupted run resumes after the last completed chunk.
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
            "help": "Compute the reference log-probabilities once, in the dataset map stage, so that training holds no "
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

    def __post_init__(self):
        super().__post_init__()
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
                "a single squared regression onto a precomputed target, against a fixed reference model. Leave these "
                "fields at their defaults."
            )


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"Unknown `{name}` {value!r}; expected one of {', '.join(map(repr, choices))}.")
