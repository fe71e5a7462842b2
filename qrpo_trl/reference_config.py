"""Settings of the reference stage: sampling reference completions and scoring completions with reward functions."""

import inspect
import math
import re
from dataclasses import dataclass, field, fields


def field_help(docstring: str) -> dict[str, str]:
    """
    The `Parameters:` entries of a config docstring written as TRL's are (`name (`type`, ...):` then indented text),
    each joined into one line: the `help` strings of the fields, so that each field is documented once.
    """
    helps, name = {}, None
    for line in inspect.cleandoc(docstring).splitlines():
        if entry := re.match(r"    (\w+) \(`", line):
            name = entry.group(1)
            helps[name] = ""
        elif name and line.startswith("        "):
            helps[name] = f"{helps[name]} {line.strip()}".strip()
        else:
            name = None
    return helps


@dataclass(kw_only=True)
class ReferenceStageFields:
    r"""
    The reference-stage fields, shared by [`ReferenceConfig`] (standalone use) and [`PointwiseConfig`] (the trainers,
    where they are used when the trainer is given `reward_funcs` and the dataset lacks rewards, or QRPO's `ref_rewards`).
    Keyword-only, so that mixing them into a `TrainingArguments` subclass leaves its positional `output_dir` first. The
    seed is not among them: the trainers use `TrainingArguments.seed`, [`ReferenceConfig`] has its own. Field names
    follow [`~trl.GRPOConfig`] where the meaning is the same. This docstring is their only documentation: the fields'
    `help` strings (the command line's `--help`) are read from it.

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
            (with `top_p=1.0` and `top_k=0`) for `ref_rewards`, or, in the trainers, set
            `apply_temperature_in_training=True` so that the reference model is the one at this temperature.
        top_p (`float`, *optional*, defaults to `1.0`):
            Nucleus sampling: sample among the smallest set of tokens whose cumulative probability exceeds `top_p`.
            `1.0` keeps every token.
        top_k (`int`, *optional*, defaults to `0`):
            Sample among the `top_k` most likely tokens only. `0` keeps every token.
        generation_batch_size (`int`, *optional*, defaults to `32`):
            Number of completions generated per `generate` call on each process (prompts are sorted by length first,
            to cut padding), and of texts per reward-model forward pass.
        use_vllm (`bool`, *optional*, defaults to `False`):
            Whether to sample with vLLM instead of `model.generate()`, on whatever device vLLM detects (a GPU, or the
            CPU with vLLM's CPU build; see docs/vllm.md). vLLM loads the reference model from its path
            (`model.name_or_path`), in the model's dtype, so it cannot sample from a PEFT model; its samples are
            seeded per completion too, but differ from those of `generate`. Each process runs its engine (or a group
            of `vllm_tensor_parallel_size` processes shares one), started for the sampling pass and shut down when it
            ends, before scoring and training. A script using it needs `if __name__ == "__main__":` (vLLM may spawn
            processes).
        vllm_gpu_memory_utilization (`float`, *optional*, defaults to `0.3`):
            Fraction of the GPU memory that vLLM may use (weights, activations and KV cache), when `use_vllm=True`.
            With vLLM's CPU build, the fraction of the machine's memory it reserves: vLLM refuses to start if that
            much is not free.
        vllm_tensor_parallel_size (`int`, *optional*, defaults to `1`):
            Number of processes per vLLM engine (GRPO's name): each group of that many consecutive processes runs one
            engine with the model split over their devices, and samples its share of the prompts. Must divide the
            number of processes. For reference models too large for one device.
        vllm_enforce_eager (`bool`, *optional*, defaults to `False`):
            Whether vLLM runs the model eagerly (vLLM's `enforce_eager`): no torch.compile nor CUDA graphs, a faster
            engine start-up for slower sampling. Worth it when there is little to sample.

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

    _help = field_help(__doc__)  # in the class body, `__doc__` is the docstring above

    num_generations: int = field(default=8, metadata={"help": _help["num_generations"]})
    max_completion_length: int = field(default=512, metadata={"help": _help["max_completion_length"]})
    temperature: float = field(default=1.0, metadata={"help": _help["temperature"]})
    top_p: float = field(default=1.0, metadata={"help": _help["top_p"]})
    top_k: int = field(default=0, metadata={"help": _help["top_k"]})
    generation_batch_size: int = field(default=32, metadata={"help": _help["generation_batch_size"]})
    use_vllm: bool = field(default=False, metadata={"help": _help["use_vllm"]})
    vllm_gpu_memory_utilization: float = field(default=0.3, metadata={"help": _help["vllm_gpu_memory_utilization"]})
    vllm_tensor_parallel_size: int = field(default=1, metadata={"help": _help["vllm_tensor_parallel_size"]})
    vllm_enforce_eager: bool = field(default=False, metadata={"help": _help["vllm_enforce_eager"]})
    reward_weights: list[float] | None = field(default=None, metadata={"help": _help["reward_weights"]})
    reward_model_trust_remote_code: bool = field(
        default=False, metadata={"help": _help["reward_model_trust_remote_code"]}
    )
    keep_ref_completions: bool = field(default=False, metadata={"help": _help["keep_ref_completions"]})
    reference_cache_dir: str | None = field(default=None, metadata={"help": _help["reference_cache_dir"]})
    reference_chunk_size: int = field(default=1024, metadata={"help": _help["reference_chunk_size"]})
    del _help

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
                f"`vllm_gpu_memory_utilization` must be in (0, 1], got {self.vllm_gpu_memory_utilization}."
            )
        if self.vllm_tensor_parallel_size < 1:
            raise ValueError(f"`vllm_tensor_parallel_size` must be >= 1, got {self.vllm_tensor_parallel_size}.")


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

    Example:

    ```python
    >>> from qrpo_trl import ReferenceConfig

    >>> # 50 reference completions of at most 2048 tokens per prompt, as the QRPO paper's pipeline sampled them
    >>> # (configs/precompute_tulu3_8b_ultrafeedback.yaml), cached on storage every machine mounts
    >>> args = ReferenceConfig(num_generations=50, max_completion_length=2048, reference_cache_dir="/shared/qrpo_cache")
    ```

    Parameters:
        seed (`int`, *optional*, defaults to `42`):
            Seed of the sampling. Each completion has its own random stream, derived from the seed, the prompt's token
            ids and the completion's index, so a completion does not depend on the batch it is generated in, on the
            dataset order or on the number of processes.

        The reference-stage fields: see [`ReferenceStageFields`].
    """

    seed: int = field(default=42, metadata={"help": field_help(__doc__)["seed"]})

    def __post_init__(self):
        self._check_reference_fields()
