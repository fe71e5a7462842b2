"""
The reference stage: sample completions from the reference model, score completions with reward functions, and cache
the results on disk.

QRPO needs, per prompt, the rewards of completions sampled from the reference model (`ref_rewards`); both trainers need
the `reward` of their training completions; RPO can train on completions sampled from the reference model. The stage
runs as [`precompute_rewards`] on a `datasets.Dataset`, as `python -m qrpo_trl.scripts.precompute`, and from the
trainers when they are given `reward_funcs`.

It works in two cached passes, so that changing only the reward functions does not sample again:

1. sampling: `num_generations` completions per distinct (prompt, reward-function columns), keyed by the reference
   model's weights, the tokenizer, the prompts and the sampling settings;
2. scoring: every completion that needs a reward (the sampled ones and the dataset's own, if it has no rewards), keyed
   by the reward functions and what they are called with.

Each pass runs in chunks: every process samples or scores its share of a chunk, the shares are gathered, and the main
process writes the chunk to the cache atomically; the pass's result is written once every chunk is done. A rerun loads
the result, or resumes after the last completed chunk. Each completion is sampled from its own random stream (seeded by
the seed, the prompt's token ids and the completion's index), so results do not depend on batching, dataset order or
the number of processes.
"""

import functools
import hashlib
import inspect
import json
import math
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from accelerate import PartialState
from accelerate.logging import get_logger
from accelerate.utils import broadcast_object_list, gather_object, tqdm
from datasets import Dataset
from datasets.fingerprint import Hasher
from huggingface_hub.constants import HF_HOME
from torch import nn
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.utils import is_torch_cuda_available
from trl.data_utils import apply_chat_template, extract_prompt, is_conversational
from trl.import_utils import is_vllm_available
from trl.trainer.utils import create_model_from_path, get_callable_name, get_config_model_id, hash_module, pad

from .data_utils import PAIRED_COLUMNS, PAIRED_REWARD_COLUMNS, check_stage_columns, paired_reward_columns
from .reference_config import ReferenceConfig, ReferenceStageFields
from .tokenization import template_kwargs, tokenize_pairs, tokenize_prompts


logger = get_logger(__name__)

RewardFunc = str | PreTrainedModel | Callable[..., list]

# Columns the stage reads or writes; the others are passed to reward functions as keyword arguments
_STAGE_COLUMNS = {
    "prompt", "completion", "reward", "ref_rewards", "ref_completions", "quantile_reward", *PAIRED_COLUMNS,
    *(column for pair in PAIRED_REWARD_COLUMNS for column in pair),
}
_CACHE_FORMAT = "qrpo_trl-reference-v1"


def precompute_rewards(
    dataset: Dataset,
    model: str | PreTrainedModel,
    reward_funcs: RewardFunc | list[RewardFunc],
    args: ReferenceStageFields | None = None,
    processing_class: PreTrainedTokenizerBase | None = None,
    reward_processing_classes: PreTrainedTokenizerBase | list[PreTrainedTokenizerBase | None] | None = None,
    add_ref_rewards: bool = True,
    dataset_name: str = "train",
) -> Dataset:
    r"""
    Complete a dataset with rewards: sample reference completions and score them (`ref_rewards`, for QRPO), score the
    completions that have no reward, and turn a prompt-only dataset into sampled, scored completions.

    Under `accelerate launch` or `torchrun`, call it on every process with the same dataset: each process samples and
    scores its share, and every process gets the whole result, identical to a single-process run.

    Args:
        dataset ([`~datasets.Dataset`]):
            Standard text or conversational, one of:

            - prompt-only (`prompt`): each row becomes `num_generations` rows of completions sampled from the reference
              model, with their `reward` (on-policy data for the reference model, as RPO's
              `value_estimator="monte_carlo"` assumes);
            - pointwise (`prompt`, `completion`, optionally `reward`);
            - paired (`prompt`, `chosen`, `rejected`, optionally `chosen_reward`/`rejected_reward` or
              `score_chosen`/`score_rejected`).

            Existing reward columns are kept; missing ones are computed. Other columns are passed to the reward
            functions as keyword arguments, as in TRL's GRPO.
        model (`str` or [`~transformers.PreTrainedModel`]):
            The reference model (a causal LM, or an encoder-decoder LM such as T5), or its local path.
        reward_funcs (`str`, [`~transformers.PreTrainedModel`], callable, or a list of them):
            As in [`~trl.GRPOTrainer`]: a callable is called with `prompts=`, `completions=`, `completion_ids=` and
            the other dataset columns as keyword arguments, and returns one reward per completion; a string is the
            local path of a reward model, loaded with `AutoModelForSequenceClassification.from_pretrained(path,
            num_labels=1)`; a model is used as is. A reward model scores prompt + completion, formatted with its own
            chat template for conversational data. `args.reward_weights` weights their sum.
        args ([`ReferenceConfig`] or a trainer config, *optional*):
            Sampling, scoring and cache settings. Defaults to `ReferenceConfig()`.
        processing_class ([`~transformers.PreTrainedTokenizerBase`], *optional*):
            Tokenizer of the reference model. Loaded from the model's path if `None`.
        reward_processing_classes ([`~transformers.PreTrainedTokenizerBase`] or list, *optional*):
            Tokenizers of the reward models, in the order of `reward_funcs` (`None` for callables). Loaded from each
            reward model's path if `None`.
        add_ref_rewards (`bool`, *optional*, defaults to `True`):
            Whether to add `ref_rewards`: per row, the rewards of `num_generations` completions sampled from the
            reference model for the row's prompt (and `ref_completions` if `args.keep_ref_completions`). A dataset that
            already has `ref_rewards` keeps them. `False` for RPO, which only needs `reward`.
        dataset_name (`str`, *optional*, defaults to `"train"`):
            Name used in progress bars and error messages.

    Returns:
        [`~datasets.Dataset`]: the dataset with `reward` (or `chosen_reward`/`rejected_reward`) and, if asked,
        `ref_rewards` and `ref_completions`.
    """
    args = args if args is not None else ReferenceConfig()
    reward_functions = RewardFunctions(
        reward_funcs, reward_processing_classes, args.reward_weights, args.reward_model_trust_remote_code
    )
    if isinstance(model, str):
        model = create_model_from_path(model).to(PartialState().device)
    if processing_class is None:
        processing_class = AutoTokenizer.from_pretrained(get_config_model_id(model.config))
    if processing_class.pad_token is None:
        processing_class.pad_token = processing_class.eos_token
    return ReferenceStage(model, processing_class, reward_functions, args).run(dataset, add_ref_rewards, dataset_name)


# ----------------------------------------------------------------------------------------------------------------------
# Reward functions


class RewardFunctions:
    """
    Reward functions in TRL GRPO's convention (callables, reward-model paths, reward models), loaded once; a
    completion's reward is their weighted sum. Any reward that is not a finite number is an error naming the function
    and the row.
    """

    def __init__(
        self, reward_funcs, reward_processing_classes=None, reward_weights: list[float] | None = None,
        trust_remote_code: bool = False,
    ):
        funcs = list(reward_funcs) if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
        if not funcs:
            raise ValueError("`reward_funcs` is empty: give at least one reward function or reward model.")
        if reward_processing_classes is None or isinstance(reward_processing_classes, PreTrainedTokenizerBase):
            reward_processing_classes = [reward_processing_classes] * len(funcs)
        if len(reward_processing_classes) != len(funcs):
            raise ValueError(
                f"{len(reward_processing_classes)} reward processing classes for {len(funcs)} reward functions."
            )
        if reward_weights is not None and len(reward_weights) != len(funcs):
            raise ValueError(f"{len(reward_weights)} `reward_weights` for {len(funcs)} reward functions.")
        self.weights = list(reward_weights) if reward_weights is not None else [1.0] * len(funcs)
        self.funcs, self.names, self.processing_classes = [], [], []
        for func, reward_processing_class in zip(funcs, reward_processing_classes, strict=True):
            if isinstance(func, str):
                func = _load_reward_model(func, trust_remote_code)
            if isinstance(func, nn.Module):
                model_id = get_config_model_id(func.config)
                if reward_processing_class is None:
                    reward_processing_class = AutoTokenizer.from_pretrained(model_id, trust_remote_code=trust_remote_code)
                if reward_processing_class.pad_token_id is None:
                    reward_processing_class.pad_token = reward_processing_class.eos_token
                # The reward is read at the last non-padding token, found through the model's pad token id
                func.config.get_text_config().pad_token_id = reward_processing_class.pad_token_id
                self.names.append(model_id.rstrip("/").split("/")[-1])
            elif callable(func):
                self.names.append(get_callable_name(func))
            else:
                raise TypeError(
                    f"A reward function must be a callable, a reward model or its path, got {type(func).__name__}."
                )
            self.funcs.append(func)
            self.processing_classes.append(reward_processing_class)

    @functools.cached_property
    def fingerprint(self) -> str:
        identities = []
        for func, processing_class in zip(self.funcs, self.processing_classes, strict=True):
            if isinstance(func, nn.Module):
                identities.append(("model", hash_module(func), Hasher.hash(processing_class)))
            else:
                identities.append(("callable", _callable_fingerprint(func)))
        return Hasher.hash((identities, self.weights))

    def __call__(
        self, prompts: list, completions: list, completion_ids: list[list[int]], columns: dict[str, list],
        rows: list[int], dataset_name: str, batch_size: int,
    ) -> np.ndarray:
        """Weighted sum of the rewards of each completion; `rows` are the dataset rows, for error messages."""
        total = np.zeros(len(completions), dtype=np.float64)
        for func, name, processing_class, weight in zip(
            self.funcs, self.names, self.processing_classes, self.weights, strict=True
        ):
            if isinstance(func, nn.Module):
                rewards = list(_reward_model_scores(func, processing_class, prompts, completions, batch_size))
            else:
                rewards = self._call(func, name, prompts, completions, completion_ids, columns, rows, dataset_name)
            bad = [i for i, reward in enumerate(rewards) if reward is None or not math.isfinite(reward)]
            if bad:
                raise ValueError(
                    f"Reward function '{name}' returned {rewards[bad[0]]} for a completion of the prompt of row "
                    f"{rows[bad[0]]} of the {dataset_name} dataset ({_shorten(prompts[bad[0]])}): rewards must be "
                    f"finite numbers. {len(bad)} of {len(rewards)} rewards in this call are not."
                )
            total += weight * np.asarray(rewards, dtype=np.float64)
        return total

    @staticmethod
    def _call(func, name, prompts, completions, completion_ids, columns, rows, dataset_name) -> list[float | None]:
        where = f"rows {min(rows)} to {max(rows)} of the {dataset_name} dataset"
        try:
            output = func(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns)
        except Exception as error:
            raise RuntimeError(
                f"Reward function '{name}' raised {type(error).__name__} on the completions of {where}: {error}"
            ) from error
        output = list(output)
        if len(output) != len(completions):
            raise ValueError(
                f"Reward function '{name}' returned {len(output)} rewards for the {len(completions)} completions of "
                f"{where}: it must return one reward per completion."
            )
        try:
            return [None if reward is None else float(reward) for reward in output]
        except (TypeError, ValueError) as error:
            raise ValueError(
                f"Reward function '{name}' returned a reward that is not a number for the completions of {where}: "
                f"{error}"
            ) from error


def _load_reward_model(path: str, trust_remote_code: bool = False) -> PreTrainedModel:
    try:
        # Custom-code reward models (ArmoRM, the QRPO paper's) load through their `auto_map` with trust_remote_code
        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=1, trust_remote_code=trust_remote_code
        )
    except OSError as error:
        raise ValueError(
            f"Could not load the reward model {path!r}: {error}\nA reward model given as a string is loaded with "
            "`AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)`; without access to the Hugging "
            "Face Hub (HF_HUB_OFFLINE=1, no network) it must be a local path to a saved model, or pass a model "
            "instance."
        ) from error
    return model.to(PartialState().device).eval()


def _callable_fingerprint(func) -> str:
    """
    Qualified name, source (bytecode if it has none) and bound or captured values of a callable (values that cannot be
    pickled count by their `repr`). The globals it reads are not part of it.
    """
    if isinstance(func, functools.partial):
        return _hash((_callable_fingerprint(func.func), func.args, func.keywords))
    code_owner = func if inspect.isfunction(func) or inspect.ismethod(func) else type(func).__call__
    try:
        code = inspect.getsource(code_owner)
    except (OSError, TypeError):
        code = getattr(getattr(code_owner, "__code__", None), "co_code", b"")
    function = getattr(code_owner, "__func__", code_owner)
    captured = [cell.cell_contents for cell in getattr(function, "__closure__", None) or ()]
    instance = None if inspect.isfunction(func) else getattr(func, "__self__", func)  # a bound method's or a callable's
    qualname = getattr(func, "__qualname__", type(func).__qualname__)
    return _hash((getattr(func, "__module__", None), qualname, code, captured, getattr(instance, "__dict__", None)))


def _hash(value) -> str:
    try:
        return Hasher.hash(value)
    except Exception:  # not picklable
        return Hasher.hash(repr(value))


@torch.inference_mode()
def _reward_model_scores(model, processing_class, prompts, completions, batch_size) -> np.ndarray:
    if is_conversational({"prompt": prompts[0]}):
        texts = [
            apply_chat_template({"messages": prompt + completion}, processing_class)["text"]
            for prompt, completion in zip(prompts, completions, strict=True)
        ]
    else:
        texts = [prompt + completion for prompt, completion in zip(prompts, completions, strict=True)]
    rewards = np.empty(len(texts), dtype=np.float64)
    order = np.argsort([-len(text) for text in texts], kind="stable")  # similar lengths together: less padding
    was_training = model.training
    model.eval()
    for start in range(0, len(texts), batch_size):
        batch = order[start : start + batch_size]
        inputs = processing_class(
            text=[texts[i] for i in batch], return_tensors="pt", padding=True, padding_side="right",
            add_special_tokens=False,
        ).to(model.device)
        outputs = model(**inputs)
        # Custom-code reward models such as ArmoRM return their reward as `score` (and no `logits`)
        scores = outputs.score if getattr(outputs, "score", None) is not None else outputs.logits
        rewards[batch] = scores.reshape(len(batch), -1)[:, 0].double().cpu().numpy()
    model.train(was_training)
    return rewards


def _shorten(prompt, width: int = 80) -> str:
    text = prompt if isinstance(prompt, str) else json.dumps(prompt)
    return repr(text if len(text) <= width else text[: width - 3] + "...")


# ----------------------------------------------------------------------------------------------------------------------
# Sampling


class PerSequenceSampler(LogitsProcessor):
    """
    Samples each sequence of a batch from its own random stream, so that a completion depends on its seed only, not on
    the other sequences of its batch, nor on the process that generates it.

    It returns `softmax(scores) / E` with `E ~ Exp(1)` drawn per token from the sequence's generator: the argmax of that
    is a sample of `softmax(scores)` (exponential race, equivalent to the Gumbel-max trick), so it is used with greedy
    decoding (`do_sample=False`), after the temperature / top-k / top-p warpers. Tokens they filtered out have
    probability 0 and are never picked.
    """

    def __init__(self, seeds: list[int]):
        self.seeds = seeds
        self.generators = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.generators is None:
            self.generators = [torch.Generator(device=scores.device).manual_seed(seed) for seed in self.seeds]
        uniforms = torch.empty_like(scores, dtype=torch.float32)
        for row, generator in zip(uniforms, self.generators, strict=True):
            row.uniform_(generator=generator)
        # -log(u) ~ Exp(1) (faster than `exponential_`); u is in [0, 1), so it is > 0 and never NaN with p = 0
        return scores.float().softmax(dim=-1) / -uniforms.log()


def completion_seed(seed: int, prompt_ids: list[int], index: int) -> int:
    """Seed of the `index`-th completion of a prompt: a 63-bit hash of the seed, the prompt's ids and the index."""
    digest = hashlib.blake2b(f"{seed}:{index}:{prompt_ids}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _eos_token_ids(model, processing_class) -> list[int]:
    eos = model.generation_config.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    return sorted({*eos, processing_class.eos_token_id} - {None})


@torch.no_grad()
def generate_completions(
    model, processing_class, prompt_ids: list[list[int]], seeds: list[int], args: ReferenceStageFields,
    progress: Callable[[int, int], None] = lambda completions, tokens: None,
) -> list[list[int]]:
    """
    Sample one completion per prompt with `model.generate`: prompts sorted by length (less padding), batches of
    `args.generation_batch_size`, each sequence from its own seed (see [`PerSequenceSampler`]). A decoder-only model's
    prompts are padded on the left and continued; an encoder-decoder model's are its encoder inputs, padded on the
    right, and the completion is what its decoder generates after the decoder start token. Returns the completion token
    ids, up to and including the first EOS token.
    """
    is_encoder_decoder = model.config.is_encoder_decoder
    padding_side = "right" if is_encoder_decoder else "left"
    eos_ids = _eos_token_ids(model, processing_class)
    generation_config = GenerationConfig(
        max_new_tokens=args.max_completion_length,
        do_sample=False,  # sampling is done by PerSequenceSampler
        num_beams=1,
        repetition_penalty=1.0,  # overrides a model default: samples must come from the reference model itself
        pad_token_id=processing_class.pad_token_id,
        eos_token_id=eos_ids,
    )
    warpers = []
    if args.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(args.temperature))
    if args.top_k > 0:
        warpers.append(TopKLogitsWarper(args.top_k))
    if args.top_p < 1.0:
        warpers.append(TopPLogitsWarper(args.top_p))
    completions = [None] * len(prompt_ids)
    order = sorted(range(len(prompt_ids)), key=lambda i: -len(prompt_ids[i]))
    was_training = model.training
    model.eval()
    for start in range(0, len(order), args.generation_batch_size):
        batch = order[start : start + args.generation_batch_size]
        input_ids = pad(
            [torch.tensor(prompt_ids[i]) for i in batch], padding_value=processing_class.pad_token_id,
            padding_side=padding_side,
        )
        attention_mask = pad(
            [torch.ones(len(prompt_ids[i]), dtype=torch.long) for i in batch], 0, padding_side=padding_side
        )
        sequences = model.generate(
            input_ids=input_ids.to(model.device),
            attention_mask=attention_mask.to(model.device),
            generation_config=generation_config,
            logits_processor=LogitsProcessorList([*warpers, PerSequenceSampler([seeds[i] for i in batch])]),
        )
        # The decoder's output starts with its start token; a decoder-only model's with the (padded) prompt
        completion_start = 1 if is_encoder_decoder else input_ids.shape[1]
        num_tokens = 0
        for i, ids in zip(batch, sequences[:, completion_start:].tolist(), strict=True):
            end = next((position + 1 for position, token in enumerate(ids) if token in eos_ids), len(ids))
            completions[i] = ids[:end]
            num_tokens += end
        progress(len(batch), num_tokens)
    model.train(was_training)
    return completions


@functools.lru_cache(maxsize=1)
def _vllm_engine(model_path: str, gpu_memory_utilization: float):
    from trl.trainer.utils import ensure_master_addr_port
    from vllm import LLM

    # Every process runs its own engine (TRL's "colocate" mode), on the process group torchrun/accelerate set up
    state = PartialState()
    os.environ.setdefault("RANK", str(state.process_index))
    os.environ.setdefault("LOCAL_RANK", str(state.local_process_index))
    os.environ.setdefault("WORLD_SIZE", str(state.num_processes))
    ensure_master_addr_port()
    return LLM(
        model=model_path,
        gpu_memory_utilization=gpu_memory_utilization,
        distributed_executor_backend="external_launcher",
    )


def generate_completions_vllm(
    model, prompt_ids: list[list[int]], seeds: list[int], args: ReferenceStageFields,
    progress: Callable[[int, int], None] = lambda completions, tokens: None,
) -> list[list[int]]:
    """The vLLM counterpart of [`generate_completions`]: one request per completion, with its own seed."""
    if model.config.is_encoder_decoder:
        raise ValueError(
            "`use_vllm=True`: sampling with vLLM does not support encoder-decoder models such as T5 here; set "
            "`use_vllm=False` to sample with `model.generate`."
        )
    if not is_vllm_available():
        raise ImportError("`use_vllm=True` needs vLLM: `pip install vllm`.")
    if not is_torch_cuda_available():
        raise ValueError("`use_vllm=True` needs a CUDA GPU.")
    if hasattr(model, "peft_config"):
        raise ValueError("`use_vllm=True` loads the reference model from its path, which a PEFT model does not have.")
    from vllm import SamplingParams

    llm = _vllm_engine(get_config_model_id(model.config), args.vllm_gpu_memory_utilization)
    sampling_params = [
        SamplingParams(
            n=1, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k or -1,
            max_tokens=args.max_completion_length, seed=seed,
        )
        for seed in seeds
    ]
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], sampling_params, use_tqdm=False)
    completions = [list(output.outputs[0].token_ids) for output in outputs]
    progress(len(completions), sum(map(len, completions)))
    return completions


# ----------------------------------------------------------------------------------------------------------------------
# The stage


class ReferenceStage:
    """
    The reference stage for one reference model and one set of reward functions; see [`precompute_rewards`].

    `model` is used as given (on its device, with its adapters as they are): the trainers pass their reference model
    unwrapped for generation. `model_fingerprint` identifies its weights in the cache key; it is hashed if `None`.
    """

    def __init__(
        self, model, processing_class, reward_functions: RewardFunctions, args: ReferenceStageFields,
        model_fingerprint: str | None = None,
    ):
        self.model = model
        self.is_encoder_decoder = model.config.is_encoder_decoder
        self.processing_class = processing_class
        self.reward_functions = reward_functions
        self.args = args
        self._model_fingerprint = model_fingerprint
        self.state = PartialState()
        if self.state.num_processes == 1 and int(os.environ.get("WORLD_SIZE", 1)) > 1:
            # Each process would compute everything and write the same cache files
            raise RuntimeError(
                f"The launcher started {os.environ['WORLD_SIZE']} processes, but accelerate sees one: on a machine "
                "without GPU, create `PartialState(cpu=True)` first (a trainer config with `use_cpu=True` does)."
            )
        self.cache_root = args.reference_cache_dir or os.path.join(HF_HOME, "qrpo_trl")

    @property
    def model_fingerprint(self) -> str:
        if self._model_fingerprint is None:
            self._model_fingerprint = hash_module(self.model)
        return self._model_fingerprint

    def run(self, dataset: Dataset, add_ref_rewards: bool, dataset_name: str) -> Dataset:
        check_stage_columns(dataset, dataset_name)
        if "prompt" not in dataset.column_names:
            dataset = dataset.map(extract_prompt, desc=f"Extracting prompt from {dataset_name} dataset")
        columns = dataset.column_names
        prompt_only = "completion" not in columns and "chosen" not in columns
        sample = prompt_only or (add_ref_rewards and "ref_rewards" not in columns)
        if "completion" in columns:
            to_score = [] if "reward" in columns else [("completion", "reward")]
        elif "chosen" in columns and paired_reward_columns(columns) is None:
            to_score = [("chosen", "chosen_reward"), ("rejected", "rejected_reward")]
        else:
            to_score = []
        if not (sample or to_score):
            return dataset

        kwarg_columns = [column for column in columns if column not in _STAGE_COLUMNS]
        rows = dataset.select_columns(["prompt", *(column for column, _ in to_score), *kwarg_columns]).to_list()
        conversational = is_conversational({"prompt": rows[0]["prompt"]})
        templates_kwargs = template_kwargs({column: [row[column] for row in rows] for column in rows[0]})

        # Pass 1: sample completions per distinct (prompt, reward-function columns)
        groups, group_of_row, first_rows = {}, [], []
        for i, row in enumerate(rows):
            key = json.dumps([row["prompt"], {c: row[c] for c in kwarg_columns}], sort_keys=True, default=str)
            if key not in groups:
                groups[key] = len(first_rows)
                first_rows.append(i)
            group_of_row.append(groups[key])
        sampled_ids, sampled = [], []
        if sample:
            prompt_ids = tokenize_prompts(
                self.processing_class, [rows[i]["prompt"] for i in first_rows], self.is_encoder_decoder,
                [templates_kwargs[i] for i in first_rows],
            )
            sampled_ids = self._sample(prompt_ids, dataset_name)
            sampled = [self._decode(*pair, conversational) for pair in zip(prompt_ids, sampled_ids, strict=True)]

        # Pass 2: score the sampled completions, then the dataset's completions that have no reward
        items = [
            (first_rows[group], completion, ids)
            for group in range(len(sampled))
            for completion, ids in zip(sampled[group], sampled_ids[group], strict=True)
        ]
        for column, _ in to_score:
            completions = [row[column] for row in rows]
            pairs = tokenize_pairs(
                self.processing_class, [row["prompt"] for row in rows], completions, self.is_encoder_decoder,
                templates_kwargs,
            )
            items += [(i, completion, ids) for i, (completion, (_, ids)) in enumerate(zip(completions, pairs))]
        rewards = self._score(items, rows, kwarg_columns, dataset_name)
        num_sampled = len(sampled) * self.args.num_generations
        sampled_rewards = rewards[:num_sampled].reshape(len(sampled), self.args.num_generations).tolist()
        own_rewards = rewards[num_sampled:].reshape(len(to_score), len(rows))

        if prompt_only:
            return self._expand(dataset, group_of_row, sampled, sampled_rewards, add_ref_rewards, dataset_name)
        for (_, reward_column), values in zip(to_score, own_rewards, strict=True):
            dataset = dataset.add_column(reward_column, values.tolist())
        if sample:
            dataset = dataset.add_column("ref_rewards", [sampled_rewards[group] for group in group_of_row])
            if self.args.keep_ref_completions:
                dataset = dataset.add_column("ref_completions", [sampled[group] for group in group_of_row])
        return dataset

    def _expand(self, dataset, group_of_row, sampled, sampled_rewards, add_ref_rewards, dataset_name) -> Dataset:
        """Each row of a prompt-only dataset becomes one row per completion sampled for its prompt."""
        n = self.args.num_generations

        def expand(batch, indices):
            expanded = {column: [value for value in values for _ in range(n)] for column, values in batch.items()}
            groups = [group_of_row[i] for i in indices]
            expanded["completion"] = [completion for group in groups for completion in sampled[group]]
            expanded["reward"] = [reward for group in groups for reward in sampled_rewards[group]]
            if add_ref_rewards:
                expanded["ref_rewards"] = [sampled_rewards[group] for group in groups for _ in range(n)]
                if self.args.keep_ref_completions:
                    expanded["ref_completions"] = [sampled[group] for group in groups for _ in range(n)]
            return expanded

        return dataset.map(
            expand,
            batched=True,
            with_indices=True,
            # The results are in the closure: name the output from them rather than hashing the closure
            new_fingerprint=Hasher.hash((dataset._fingerprint, sampled, sampled_rewards, add_ref_rewards, n)),
            desc=f"Adding the sampled completions to the {dataset_name} dataset",
        )

    # ------------------------------------------------------------------------------------------------------------------
    # Decoding

    def _decode(self, prompt_ids: list[int], completions_ids: list[list[int]], conversational: bool) -> list:
        decode = functools.partial(self.processing_class.decode, skip_special_tokens=True)
        if conversational:
            return [[{"role": "assistant", "content": decode(ids)}] for ids in completions_ids]
        if self.is_encoder_decoder:  # the decoder target stands alone: the trainers tokenise it apart from the prompt
            return [decode(ids) for ids in completions_ids]
        # A decoder-only model's text completion continues its prompt: decoded alone, it would lose the leading space
        # that tokenizers such as SentencePiece fold into its first token, and prompt + completion would not be the
        # sampled text
        prompt = decode(prompt_ids)
        texts = [decode(prompt_ids + ids) for ids in completions_ids]
        return [
            text[len(prompt) :] if text.startswith(prompt) else decode(ids)
            for text, ids in zip(texts, completions_ids, strict=True)
        ]

    # ------------------------------------------------------------------------------------------------------------------
    # The two passes

    def _sample(self, prompt_ids: list[list[int]], dataset_name: str) -> list[list[list[int]]]:
        """`num_generations` completions (token ids) per prompt."""
        args = self.args
        n = args.num_generations
        units = [(ids, completion_seed(args.seed, ids, index)) for ids in prompt_ids for index in range(n)]
        settings = [
            getattr(args, name)
            for name in ("num_generations", "max_completion_length", "temperature", "top_p", "top_k", "seed", "use_vllm")
        ]
        eos_ids = _eos_token_ids(self.model, self.processing_class)
        fingerprint = Hasher.hash(
            (_CACHE_FORMAT, self.model_fingerprint, Hasher.hash(self.processing_class), eos_ids, settings, units)
        )

        def compute(shard, progress):
            prompt_ids, seeds = [ids for ids, _ in shard], [seed for _, seed in shard]
            if args.use_vllm:
                return generate_completions_vllm(self.model, prompt_ids, seeds, args, progress)
            return generate_completions(self.model, self.processing_class, prompt_ids, seeds, args, progress)

        # Chunks of whole prompts, so that a chunk's completions of one prompt are batched together
        chunk_size = max(1, args.reference_chunk_size // n) * n
        description = f"Sampling reference completions for {dataset_name} dataset"
        completions = self._run_in_chunks("sampling", fingerprint, units, chunk_size, compute, description)
        truncated = sum(1 for ids in completions if ids[-1:] and ids[-1] not in eos_ids)
        if truncated:
            logger.warning(
                f"{truncated} of {len(completions)} completions sampled for the {dataset_name} dataset reached "
                f"max_completion_length={args.max_completion_length} without an EOS token."
            )
        return [completions[start : start + n] for start in range(0, len(completions), n)]

    def _score(self, items: list[tuple[int, Any, list[int]]], rows: list[dict], kwarg_columns, dataset_name):
        """Reward of each (row, completion, completion_ids), called with the row's prompt and other columns."""
        if not items:
            return np.zeros(0)
        units = [
            (row, rows[row]["prompt"], completion, ids, {column: rows[row][column] for column in kwarg_columns})
            for row, completion, ids in items
        ]
        fingerprint = Hasher.hash((_CACHE_FORMAT, self.reward_functions.fingerprint, units))

        def compute(shard, progress):
            if not shard:
                return []
            rewards = self.reward_functions(
                prompts=[prompt for _, prompt, _, _, _ in shard],
                completions=[completion for _, _, completion, _, _ in shard],
                completion_ids=[ids for _, _, _, ids, _ in shard],
                columns={column: [unit[4][column] for unit in shard] for column in kwarg_columns},
                rows=[row for row, _, _, _, _ in shard],
                dataset_name=dataset_name,
                batch_size=self.args.generation_batch_size,
            )
            progress(len(shard), sum(len(ids) for _, _, _, ids, _ in shard))
            return rewards.tolist()

        return np.asarray(
            self._run_in_chunks(
                "scoring", fingerprint, units, self.args.reference_chunk_size, compute,
                f"Scoring completions of {dataset_name} dataset",
            ),
            dtype=np.float64,
        )

    def _run_in_chunks(self, kind: str, fingerprint: str, units: list, chunk_size: int, compute, description: str):
        """
        `compute(shard, progress)` over `units` in cached chunks: each process computes its share of a chunk, the shares
        are gathered in process order, and the main process writes the chunk (atomically), then the whole result once
        every chunk is done. Returns the results of all units, on every process.
        """
        cache = _ChunkCache(os.path.join(self.cache_root, f"{kind}-{fingerprint}"), self.state)
        result = cache.load_result()
        if result is not None:
            logger.info(f"{description}: loaded from the cache {cache.directory}.")
            return result
        ranges = [(start, min(start + chunk_size, len(units))) for start in range(0, len(units), chunk_size)]
        pending = cache.pending(ranges)
        total = sum(len(self._shard(units[start:stop])) for start, stop in pending)
        bar = tqdm(
            total=total, desc=description, unit="completion", main_process_only=True,
            disable=bool(os.environ.get("TQDM_DISABLE", "")),
        )
        start_time, num_tokens = time.perf_counter(), 0

        def progress(completions, tokens):
            nonlocal num_tokens
            num_tokens += tokens
            bar.update(completions)
            tokens_per_second = num_tokens / max(time.perf_counter() - start_time, 1e-9)
            bar.set_postfix_str(f"{tokens_per_second:.1f} tokens/s", refresh=False)

        for start, stop in pending:
            try:
                shard_result, failure = compute(self._shard(units[start:stop]), progress), None
            except Exception as error:
                if self.state.num_processes == 1:
                    raise
                shard_result, failure = None, error
            gathered = gather_object([(None if failure is None else str(failure), shard_result)])
            failures = [(rank, message) for rank, (message, _) in enumerate(gathered) if message is not None]
            if failure is not None:
                raise failure
            if failures:
                rank, message = failures[0]
                raise RuntimeError(f"The reference stage failed on process {rank}: {message}")
            cache.write_chunk(start, stop, [value for _, shard in gathered for value in shard])
        bar.close()
        return cache.finish(ranges)

    def _shard(self, chunk: list) -> list:
        with self.state.split_between_processes(chunk) as shard:
            return shard


class _ChunkCache:
    """
    A pass's cache directory: one `chunk-START-STOP.json` file per completed chunk (named by its range of units, so
    that a run resumed with another chunk size does not mix them up), then `result.json` once every chunk is done, and
    the chunk files are removed. Only the main process reads and writes; what it reads is broadcast. Writes go to a
    temporary file renamed into place, so that an interrupted run never leaves a partial file.
    """

    def __init__(self, directory: str, state: PartialState):
        self.directory = directory
        self.state = state

    def _path(self, name: str) -> str:
        return os.path.join(self.directory, name)

    @staticmethod
    def _chunk(start: int, stop: int) -> str:
        return f"chunk-{start:09d}-{stop:09d}.json"

    def _read(self, name: str):
        with open(self._path(name)) as file:
            return json.load(file)

    def _write(self, name: str, value) -> None:
        os.makedirs(self.directory, exist_ok=True)
        temporary = self._path(f".{name}.{os.getpid()}.tmp")
        with open(temporary, "w") as file:
            json.dump(value, file)
        os.replace(temporary, self._path(name))

    def _from_main(self, read: Callable[[], Any]):
        value = [read() if self.state.is_main_process else None]
        broadcast_object_list(value, from_process=0)
        return value[0]

    def load_result(self) -> list | None:
        return self._from_main(lambda: self._read("result.json") if os.path.exists(self._path("result.json")) else None)

    def pending(self, ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
        return self._from_main(lambda: [r for r in ranges if not os.path.exists(self._path(self._chunk(*r)))])

    def write_chunk(self, start: int, stop: int, values: list) -> None:
        if self.state.is_main_process:
            self._write(self._chunk(start, stop), values)

    def finish(self, ranges: list[tuple[int, int]]) -> list:
        def assemble():
            values = [value for start, stop in ranges for value in self._read(self._chunk(start, stop))]
            self._write("result.json", values)
            for name in os.listdir(self.directory):
                if name.startswith("chunk-"):
                    os.remove(self._path(name))
            return values

        return self._from_main(assemble)
