"""Settings of the reference stage: sampling reference completions and scoring completions with reward functions."""

import math
from dataclasses import dataclass, field, fields


@dataclass(kw_only=True)
class ReferenceStageFields:
    """
    The reference-stage fields, shared by [`ReferenceConfig`] (standalone use) and [`PointwiseConfig`] (the trainers).
    Keyword-only, so that mixing them into a `TrainingArguments` subclass leaves its positional `output_dir` first. The
    seed is not among them: the trainers use `TrainingArguments.seed`, [`ReferenceConfig`] has its own. See
    [`ReferenceConfig`] for their documentation.
    """

    num_generations: int = field(
        default=8,
        metadata={
            "help": "Number of completions sampled from the reference model per prompt: the reference completions "
            "whose rewards make `ref_rewards` (QRPO), or the training completions of a prompt-only dataset."
        },
    )
    max_completion_length: int = field(
        default=512,
        metadata={"help": "Maximum number of tokens of a sampled completion."},
    )
    temperature: float = field(
        default=1.0,
        metadata={"help": "Sampling temperature. QRPO's quantile assumes samples from the reference model: keep 1."},
    )
    top_p: float = field(
        default=1.0,
        metadata={"help": "Nucleus sampling: keep the smallest set of tokens with this cumulative probability."},
    )
    top_k: int = field(
        default=0,
        metadata={"help": "Keep only the k most likely tokens when sampling. 0 keeps all."},
    )
    generation_batch_size: int = field(
        default=32,
        metadata={"help": "Number of completions generated (or scored by a reward model) per batch on each process."},
    )
    use_vllm: bool = field(
        default=False,
        metadata={
            "help": "Sample with vLLM instead of `model.generate()` (needs vLLM and a CUDA GPU). vLLM loads the "
            "reference model from its path and samples a different (equally seeded) stream than `generate`."
        },
    )
    vllm_gpu_memory_utilization: float = field(
        default=0.3,
        metadata={"help": "Fraction of the GPU memory vLLM may use, when `use_vllm=True`."},
    )
    reward_weights: list[float] | None = field(
        default=None,
        metadata={
            "help": "Weights of the reward functions: the reward is their weighted sum. Must match the number of "
            "reward functions. If `None`, every function has weight 1."
        },
    )
    reward_model_trust_remote_code: bool = field(
        default=False,
        metadata={
            "help": "Load reward models given by path with trust_remote_code=True: custom-code reward models such as "
            "ArmoRM (their reward is read from the output's `score`)."
        },
    )
    keep_ref_completions: bool = field(
        default=False,
        metadata={"help": "Keep the sampled reference completions as a `ref_completions` column."},
    )
    reference_cache_dir: str | None = field(
        default=None,
        metadata={
            "help": "Directory of the reference-stage cache. If `None`, `$HF_HOME/qrpo_trl` (by default "
            "`~/.cache/huggingface/qrpo_trl`). With several machines, a directory they all see."
        },
    )
    reference_chunk_size: int = field(
        default=1024,
        metadata={
            "help": "Number of completions per cached chunk (whole prompts when sampling), each computed and written "
            "by one process: an interrupted run computes only the missing chunks."
        },
    )

    def _check_reference_fields(self) -> None:
        check_finite_settings(self)
        for name in ("num_generations", "max_completion_length", "generation_batch_size", "reference_chunk_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be >= 1, got {getattr(self, name)}.")
        if not self.temperature > 0:
            raise ValueError(f"`temperature` must be > 0, got {self.temperature}.")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"`top_p` must be in (0, 1], got {self.top_p}.")
        if self.top_k < 0:
            raise ValueError(f"`top_k` must be >= 0, got {self.top_k}.")
        if not 0 < self.vllm_gpu_memory_utilization <= 1:
            raise ValueError(
                f"`vllm_gpu_memory_utilization` is a fraction of the GPU memory, in (0, 1]; got "
                f"{self.vllm_gpu_memory_utilization}."
            )


def check_finite_settings(config) -> None:
    """Every float setting of a config dataclass (its own and inherited ones, and the floats of list settings) must
    be a finite number: NaN or inf would make every target or weight NaN, not fail."""
    for field_ in fields(config):
        value = getattr(config, field_.name)
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(item, float) and not math.isfinite(item):
                raise ValueError(f"`{field_.name}` must be a finite number, got {value}.")


@dataclass
class ReferenceConfig(ReferenceStageFields):
    r"""
    Configuration of the reference stage ([`precompute_rewards`] and `python -m qrpo_trl.scripts.precompute`): sampling
    completions from the reference model and scoring completions with reward functions. The trainers take the same
    fields in their config ([`QRPOConfig`], [`RPOConfig`]), with `TrainingArguments.seed` as the seed. Field names
    follow [`~trl.GRPOConfig`] where the meaning is the same.

    Parameters:
        > Parameters that control the sampling

        num_generations (`int`, *optional*, defaults to `8`):
            Number of completions sampled from the reference model per prompt: the reference completions whose rewards
            make `ref_rewards` (QRPO; the trainer can use the first `num_ref_rewards` of them), or the training
            completions of a dataset that has only prompts.
        max_completion_length (`int`, *optional*, defaults to `512`):
            Maximum number of tokens of a sampled completion. Completions cut at this length are counted in a warning.
        temperature (`float`, *optional*, defaults to `1.0`):
            Sampling temperature. QRPO's quantile is uniform only for samples of the reference model itself: keep `1.0`
            (with `top_p=1.0` and `top_k=0`) for `ref_rewards`.
        top_p (`float`, *optional*, defaults to `1.0`):
            Nucleus sampling: sample among the smallest set of tokens whose cumulative probability exceeds `top_p`.
            `1.0` keeps every token.
        top_k (`int`, *optional*, defaults to `0`):
            Sample among the `top_k` most likely tokens only. `0` keeps every token.
        seed (`int`, *optional*, defaults to `42`):
            Seed of the sampling. Each completion has its own random stream, derived from the seed, the prompt's token
            ids and the completion's index, so a completion does not depend on the batch it is generated in, on the
            dataset order or on the number of processes.
        generation_batch_size (`int`, *optional*, defaults to `32`):
            Number of completions generated per `generate` call on each process (prompts are sorted by length first,
            to cut padding), and of texts per reward-model forward pass.
        use_vllm (`bool`, *optional*, defaults to `False`):
            Whether to sample with vLLM instead of `model.generate()`. Needs vLLM and a CUDA GPU. vLLM loads the
            reference model from its path (`model.name_or_path`), so it cannot sample from a PEFT model; its samples
            are seeded per completion too, but differ from those of `generate`.
        vllm_gpu_memory_utilization (`float`, *optional*, defaults to `0.3`):
            Fraction of the GPU memory that vLLM may use, when `use_vllm=True`.

        > Parameters that control the scoring

        reward_weights (`list[float]`, *optional*):
            Weights of the reward functions: a completion's reward is the weighted sum of their rewards. Must match the
            number of reward functions. If `None`, every function has weight `1.0`.
        reward_model_trust_remote_code (`bool`, *optional*, defaults to `False`):
            Whether reward models given by path are loaded with `trust_remote_code=True` (their code runs on this
            machine): custom-code reward models such as ArmoRM-Llama3-8B-v0.1, the QRPO paper's, whose output carries
            the reward in `score` rather than `logits`.

        > Parameters that control the output and the cache

        keep_ref_completions (`bool`, *optional*, defaults to `False`):
            Whether to keep the sampled reference completions as a `ref_completions` column (a list per row, aligned
            with `ref_rewards`).
        reference_cache_dir (`str`, *optional*):
            Directory where the stage caches its results, keyed by a fingerprint of the reference model's weights, the
            tokenizer (its vocabulary, template and settings, not its path), the prompts and the columns passed to the
            reward functions, the sampling settings and the reward functions (weights of reward models; code, captured
            values and the globals they read of callables, see `qrpo_trl.fingerprint`). If `None`,
            `$HF_HOME/qrpo_trl` (by default `~/.cache/huggingface/qrpo_trl`). Each process writes its results there
            for the others to read: with several machines, it must be on storage they all mount at the same path.
        reference_chunk_size (`int`, *optional*, defaults to `1024`):
            Number of completions per chunk, sampled or scored (a sampling chunk holds whole prompts: at least one, else
            `reference_chunk_size // num_generations`; chunks are smaller when there are fewer chunks than processes).
            Each chunk is computed by one process and written by it to the cache as soon as it is done, so an
            interrupted run (even killed) computes only the missing chunks. Memory and a rerun's lost work are bounded
            by a chunk.
    """

    seed: int = field(
        default=42,
        metadata={
            "help": "Seed of the sampling. Each completion's random stream is derived from it, the prompt and the "
            "completion's index, so results do not depend on batching or on the number of processes."
        },
    )

    def __post_init__(self):
        self._check_reference_fields()
