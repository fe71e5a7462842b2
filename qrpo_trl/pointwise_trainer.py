"""
Shared plumbing of the pointwise trainers: data formats, tokenisation, the reference map stage and the loss.

`QRPOTrainer` and `RPOTrainer` subclass `PointwiseTrainer`, itself a `trl.DPOTrainer`, and only say how their
regression target is made. The loss is `scale * penalty(target - beta * (logp_theta - logp_ref))`, averaged over the
batch, with a squared (`regression_loss="mse"`) or absolute (`"mae"`) penalty.
"""

import contextlib
import dataclasses
import hashlib
import os
from dataclasses import dataclass
from functools import cached_property
from numbers import Number
from typing import Any

import numpy as np
import pyarrow.compute as pc
import torch
from accelerate.logging import get_logger
from accelerate.utils import broadcast_object_list, is_peft_model, tqdm
from datasets import Dataset, IterableDataset
from datasets.fingerprint import Hasher
from torch.utils.data import DataLoader
from transformers import AutoConfig
from transformers.data.data_collator import DataCollatorMixin
from trl import DPOTrainer
from trl.models import prepare_deepspeed
from trl.kernels import ChunkedLogProbFunction
from trl.kernels.chunked_logprob import TOKEN_CHUNK_SIZE
from trl.kernels.chunked_logprob import _use_triton as trl_use_triton
from trl.models.utils import disable_gradient_checkpointing, unwrap_model_for_generation
from trl.trainer import utils as trl_utils
from trl.trainer.dpo_trainer import DataCollatorForPreference
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling
from trl.trainer.utils import (
    add_fused_lm_head,
    get_config_model_id,
    global_then_local_main_first,
    selective_log_softmax,
    use_adapter,
)

from .data_utils import (
    check_columns,
    check_ref_logps,
    check_rewards,
    check_stage_columns,
    float_column,
    has_rewards,
    pointwise_batch,
    to_pointwise,
)
from .fingerprint import token_ids_fingerprint
from .non_finite import StopOnNonFiniteGradients
from .packed_attention import per_sample_attention
from .pointwise_config import PointwiseConfig
from .reference_stage import ReferenceStage, RewardFunctions
from .tokenization import template_kwargs, tokenize_pairs
from .utils import check_model_path, eval_mode


logger = get_logger(__name__)

# The decoder-only model inputs of a batch: `input_ids` and `attention_mask` when padded; when packed
# (`padding_free`), the positions restarting at each sample and the sequence boundaries of the varlen kernels, as
# TRL's `DataCollatorForLanguageModeling(padding_free=True)` makes them
MODEL_INPUT_KEYS = (
    "input_ids", "attention_mask", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k",
    "seq_idx",
)


def disable_float_dropout(model: torch.nn.Module) -> None:
    """
    Zero the dropout probabilities that modules keep as plain floats rather than in `nn.Dropout` modules (T5
    attention's `dropout`, the `attention_dropout` of many decoder-only attentions): TRL's `disable_dropout_in_model`
    only reaches the latter.
    """
    for module in model.modules():
        for name, value in list(vars(module).items()):
            if name.endswith("dropout") and isinstance(value, float):
                setattr(module, name, 0.0)


def sequence_lengths(dataset: Dataset, max_length: int | None = None) -> np.ndarray:
    """Tokens of each prepared sample (`prompt_ids` + `completion_ids`), capped at `max_length` as the collator cuts."""
    table = dataset.with_format("arrow")
    lengths = sum(pc.list_value_length(table[column]).to_numpy() for column in ("prompt_ids", "completion_ids"))
    return lengths if max_length is None else np.minimum(lengths, max_length)


def completion_lengths(dataset: Dataset, max_length: int | None, truncation_mode: str) -> np.ndarray:
    """Completion tokens of each prepared sample that the loss scores, after the collator's `max_length` truncation."""
    table = dataset.with_format("arrow")
    prompt, completion = (pc.list_value_length(table[c]).to_numpy() for c in ("prompt_ids", "completion_ids"))
    if max_length is None:
        return completion
    kept = np.minimum(prompt + completion, max_length)
    # keep_start keeps the window [0, kept), keep_end the window ending with the completion
    return np.maximum(kept - prompt, 0) if truncation_mode == "keep_start" else np.minimum(completion, kept)


@dataclass
class DataCollatorForPointwise(DataCollatorMixin):
    """
    Pads pointwise samples for a decoder-only or an encoder-decoder model.

    Each example holds `prompt_ids` and `completion_ids`. For a decoder-only model the batch gets `input_ids` (prompt +
    completion, right padded), `attention_mask` and `completion_mask`; for an encoder-decoder model, `input_ids` and
    `attention_mask` (the prompt, for the encoder) and `labels` (the completion, the decoder target, padded with -100).
    Numeric scalar fields (`ref_logps`, `target`, logged statistics) are stacked into float tensors; other fields are
    ignored.

    Args:
        pad_token_id (`int`):
            Token ID used for padding.
        max_length (`int`, *optional*):
            Sequences longer than this are truncated before padding, as in TRL's `DataCollatorForPreference`. For an
            encoder-decoder model it bounds prompt + completion together, truncated the same way, except that a
            completion cut at its end keeps its final EOS token in place of its last kept token.
        truncation_mode (`str`, *optional*, defaults to `"keep_start"`):
            `"keep_start"` or `"keep_end"`.
        pad_to_multiple_of (`int`, *optional*):
            If set, sequences are padded to a multiple of this value.
        is_encoder_decoder (`bool`, *optional*, defaults to `False`):
            Whether to build encoder inputs and decoder `labels` rather than one decoder-only sequence.
        padding_free (`bool`, *optional*, defaults to `False`):
            Decoder-only: pack the truncated samples into one row, as TRL's `DataCollatorForLanguageModeling` does with
            `padding_free=True`, with no `attention_mask` but `position_ids` restarting at each sample and the sequence
            boundaries (`cu_seq_lens_q`) at which flash attention's varlen path and the trainers' per-sample attention
            (`qrpo_trl.packed_attention`, for sdpa and eager) confine attention to each sample. The
            batch also gets `sample_lengths` (tokens of each sample) and `sample_index` (the sample of each position
            of the row, padding counted with the last sample), so that per-sample sums need no device sync.
    """

    pad_token_id: int
    max_length: int | None = None
    truncation_mode: str = "keep_start"
    pad_to_multiple_of: int | None = None
    is_encoder_decoder: bool = False
    padding_free: bool = False
    return_tensors: str = "pt"

    def __post_init__(self):
        if self.padding_free and self.is_encoder_decoder:
            raise ValueError(
                "`padding_free=True` packs the samples of a batch into one decoder-only sequence; it is not supported "
                "for encoder-decoder models. Set `padding_free=False`."
            )

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        prompt_lengths = np.array([len(example["prompt_ids"]) for example in examples])
        lengths = prompt_lengths + np.array([len(example["completion_ids"]) for example in examples])
        # Each sequence keeps a window of `kept` tokens from `start` on: keep_start cuts the end of the completion,
        # keep_end the start of the prompt (as TRL's DataCollatorForPreference slices them)
        kept, start = lengths, np.zeros_like(lengths)
        if self.max_length is not None:
            if self.truncation_mode not in ("keep_start", "keep_end"):
                raise ValueError(f"Unsupported truncation mode {self.truncation_mode!r}: 'keep_start' or 'keep_end'.")
            kept = np.minimum(lengths, self.max_length)
            if self.truncation_mode == "keep_end":
                start = lengths - kept
        kept_prompt = np.clip(prompt_lengths - start, 0, kept)
        windows = [
            (example["prompt_ids"] + example["completion_ids"])[begin : begin + length]
            for example, begin, length in zip(examples, start, kept, strict=True)
        ]

        if self.is_encoder_decoder:
            # Truncated like one sequence above, then split: the prompt feeds the encoder, the completion is the target
            input_ids = self._padded([w[:p] for w, p in zip(windows, kept_prompt, strict=True)], self.pad_token_id)
            targets = [w[p:] for w, p in zip(windows, kept_prompt, strict=True)]
            # A completion cut at its end keeps its last token (EOS), as the RPO paper's code truncates its targets: the
            # decoder is trained to end each target with EOS
            targets = [
                target[:-1] + example["completion_ids"][-1:]
                if 0 < len(target) < len(example["completion_ids"]) and self.truncation_mode == "keep_start"
                else target
                for target, example in zip(targets, examples, strict=True)
            ]
            batch = {
                "input_ids": input_ids,
                "attention_mask": self._span_mask(0, kept_prompt, input_ids.size(1)),
                "labels": self._padded(targets, -100),
            }
        elif self.padding_free:
            batch = self._packed(windows, kept_prompt)
        else:
            input_ids = self._padded(windows, self.pad_token_id)
            batch = {
                "input_ids": input_ids,
                "attention_mask": self._span_mask(0, kept, input_ids.size(1)),
                "completion_mask": self._span_mask(kept_prompt, kept, input_ids.size(1)),
            }
        for key, value in examples[0].items():
            if isinstance(value, Number) and key not in batch:
                batch[key] = torch.tensor([example[key] for example in examples], dtype=torch.float32)
        return batch

    def _packed(self, windows: list[list[int]], kept_prompt: np.ndarray) -> dict[str, torch.Tensor]:
        """One packed row, by TRL's padding-free collator; the completion tokens are its `labels`."""
        packer = DataCollatorForLanguageModeling(
            pad_token_id=self.pad_token_id, padding_free=True, pad_to_multiple_of=self.pad_to_multiple_of
        )
        packed = packer(
            [{"input_ids": w, "labels": [-100] * p + w[p:]} for w, p in zip(windows, kept_prompt, strict=True)]
        )
        # TRL masks each sample's first label: scored by the previous sample's last position, as a padded batch never
        # scores a row's first token
        completion_mask = (packed.pop("labels") != -100).long()
        sample_lengths = torch.tensor([len(w) for w in windows])
        sample_index = torch.full_like(completion_mask, len(windows) - 1)
        sample_index[0, : int(sample_lengths.sum())] = torch.repeat_interleave(torch.arange(len(windows)), sample_lengths)
        return {**packed, "completion_mask": completion_mask, "sample_lengths": sample_lengths, "sample_index": sample_index}

    def _padded(self, rows: list[list[int]], value: int) -> torch.Tensor:
        # Rows copied into one preallocated array: a tensor per row from its Python list, then padded, costs ~10x more
        width = max((len(row) for row in rows), default=0)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        padded = np.full((len(rows), width), value, dtype=np.int64)
        for i, row in enumerate(rows):
            padded[i, : len(row)] = row
        return torch.from_numpy(padded)

    @staticmethod
    def _span_mask(begin, end: np.ndarray, width: int) -> torch.Tensor:
        """A `(len(end), width)` mask, 1 where `begin[i] <= j < end[i]` in row i."""
        positions = np.arange(width)
        return torch.from_numpy((positions >= np.asarray(begin)[..., None]) & (positions < end[:, None])).long()


def _is_compilable_device(device: torch.device) -> bool:
    """XLA (Neuron) devices, for which TRL's fused LM head keeps fixed tile shapes."""
    return device.type in ("xla", "neuron")


class _InferenceLogProbs:
    """
    TRL's `ChunkedLogProbFunction` (its `apply`), which scores without autograd and without Triton (the reference
    pass) by projecting `TOKEN_CHUNK_SIZE * chunk_size / vocab` tokens at a time (the same logits memory as its tiles)
    into one fused log-softmax: its torch fallback folds each tile in ~6 elementwise passes and allocates a fresh
    `TOKEN_CHUNK_SIZE x chunk_size` buffer per call, ~2x the cost of the projection on CPU. Same values (float32).
    """

    @staticmethod
    def apply(hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping, logit_scale, outputs):
        device = hidden.device
        if torch.is_grad_enabled() or trl_use_triton(device) or _is_compilable_device(device) or outputs != ("log_probs",):
            return ChunkedLogProbFunction.apply(
                hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping, logit_scale, outputs
            )
        compute_dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else hidden.dtype
        weight = weight.to(compute_dtype)
        bias = None if bias is None else bias.to(compute_dtype)
        log_probs = torch.empty(hidden.size(0), device=device, dtype=torch.float32)
        rows = max(1, TOKEN_CHUNK_SIZE * chunk_size // weight.size(0))
        for start in range(0, hidden.size(0), rows):
            logits = torch.nn.functional.linear(hidden[start : start + rows].to(compute_dtype), weight, bias).float()
            # In place, in the order of TRL's `_torch_transform`
            if logit_scale != 1.0:
                logits.mul_(logit_scale)
            if final_logit_softcapping is not None:
                logits.div_(final_logit_softcapping).tanh_().mul_(final_logit_softcapping)
            if temperature != 1.0:
                logits.mul_(1 / temperature)
            chunk_targets = targets[start : start + rows, None]
            log_probs[start : start + rows] = logits.log_softmax(-1).gather(-1, chunk_targets).squeeze(-1)
        return log_probs, None, None, None, None


@contextlib.contextmanager
def compact_fused_lm_head():
    """
    Make TRL's fused LM head project only the scored (completion) positions on every device but XLA ones, as it does on
    Triton devices, and score without autograd through `_InferenceLogProbs` where Triton is not available. Elsewhere
    it projects every position, prompt and padding included, so that the tile shapes stay fixed for XLA (Neuron)
    compilers, which CPU does not need: there it would cost the reference pass ~40% against a bare forward. Its torch
    fallback folds the compact positions as its Triton kernel does; the values are the same.
    """
    use_triton, log_probs_function = trl_utils._use_triton, trl_utils._ChunkedLogProbFunction
    trl_utils._use_triton = lambda device: not _is_compilable_device(device)
    trl_utils._ChunkedLogProbFunction = _InferenceLogProbs
    try:
        yield
    finally:
        trl_utils._use_triton, trl_utils._ChunkedLogProbFunction = use_triton, log_probs_function


def hash_partitioned_module(module: torch.nn.Module) -> str:
    """
    TRL's `hash_module` (the same digest) of a module whose parameters DeepSpeed ZeRO-3 has partitioned, gathering one
    tensor at a time so that no process holds the whole model. Collective: every process must call it.
    """
    import deepspeed

    digest = hashlib.sha256()
    for _, tensor in sorted(module.state_dict(keep_vars=True).items()):
        with deepspeed.zero.GatheredParameters([tensor] if hasattr(tensor, "ds_id") else [], modifier_rank=None):
            tensor = tensor.detach().cpu()
            digest.update(str(tensor.dtype).encode())
            if tensor.dtype in (torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2):
                tensor = tensor.to(torch.float32)
            digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def pair_metrics(pair_rewards: np.ndarray) -> dict[str, float]:
    """
    DPOTrainer's `rewards/chosen`, `rewards/rejected`, `rewards/margins` and `rewards/accuracies` from rows of
    (pair index, is chosen, implicit reward `beta * log-ratio`), over the pairs that have both completions.
    """
    pair_index, is_chosen, rewards = pair_rewards.T
    chosen, rejected = {}, {}
    for index, flag, reward in zip(pair_index.astype(np.int64), is_chosen, rewards, strict=True):
        (chosen if flag else rejected)[index] = reward  # a pair seen twice (padded last batch) keeps one value
    complete = sorted(chosen.keys() & rejected.keys())
    if not complete:
        return {}
    chosen_rewards = np.array([chosen[i] for i in complete])
    rejected_rewards = np.array([rejected[i] for i in complete])
    return {
        "rewards/chosen": float(chosen_rewards.mean()),
        "rewards/rejected": float(rejected_rewards.mean()),
        "rewards/margins": float((chosen_rewards - rejected_rewards).mean()),
        "rewards/accuracies": float((chosen_rewards > rejected_rewards).mean()),
    }


def _paired_samples(args, dataset_name: str) -> str:
    """Which completions of each pair become samples: evaluation keeps both, for DPO's pair metrics."""
    return args.paired_samples if dataset_name == "train" else "both"


class PointwiseTrainer(DPOTrainer):
    """
    Base of the pointwise trainers: a `trl.DPOTrainer` whose dataset is made of single (prompt, completion, reward)
    samples and whose loss regresses `beta * log(pi_theta / pi_ref)` onto a per-sample target computed once, before
    training, in the reference map stage (`_precompute_ref_logps`).

    Subclasses set `_config_class` and say how the target is made:

    - `_reference_columns`: columns the dataset needs on top of the accepted formats (any one of them);
    - `_metric_columns`: per-sample columns of the map stage whose batch mean is logged;
    - `_target_needs_ref_logps`: whether the target depends on the reference log-probabilities;
    - `_check_dataset`: method-specific validation of the raw dataset;
    - `_target_statistics` / `_regression_targets`: the target columns, from dataset statistics of the training set;
    - `_loss_scale`: the factor in front of the penalty on the residual.

    The constructor takes the same arguments as `trl.DPOTrainer`, then (as `trl.GRPOTrainer` names them)
    `reward_funcs` and `reward_processing_classes`: with them, a dataset that lacks rewards (or QRPO's reference
    rewards) is completed by the reference stage (see `precompute_rewards`) before the map stage.
    """

    _config_class = PointwiseConfig
    _reference_columns: tuple[str, ...] = ()
    _metric_columns: tuple[str, ...] = ()
    _target_needs_ref_logps = False

    def __init__(
        self,
        model,
        ref_model=None,
        args: PointwiseConfig | None = None,
        data_collator=None,
        train_dataset: Dataset | IterableDataset | None = None,
        eval_dataset: Dataset | IterableDataset | dict[str, Dataset | IterableDataset] | None = None,
        processing_class=None,
        compute_metrics=None,
        callbacks=None,
        optimizers=(None, None),
        quantization_config=None,
        peft_config=None,
        reward_funcs=None,
        reward_processing_classes=None,
    ):
        if args is None:
            model_name = model if isinstance(model, str) else get_config_model_id(model.config)
            args = self._config_class(f"{model_name.split('/')[-1]}-{self._name}")
        elif not isinstance(args, self._config_class):
            raise TypeError(
                f"{type(self).__name__} needs a {self._config_class.__name__} as `args`, got {type(args).__name__}."
            )
        # A ValueError, as DPOTrainer's for a vision dataset and a text-only model
        first_row = next(iter(train_dataset), None) if isinstance(train_dataset, (Dataset, IterableDataset)) else {}
        if first_row is None:  # DPOTrainer.__init__ reads it: a bare StopIteration
            raise ValueError("The train dataset is empty: it has no rows.")
        if {"image", "images"} & set(first_row):
            raise ValueError(f"{type(self).__name__} does not support vision-language datasets ('image' or 'images').")
        self._train_statistics = None
        self._fused_lm_head_restricted = False
        self._padding_free_checked = False
        self._unwrapped_models = {}
        self._eval_pair_rewards = []
        # Loaded before anything else, so that a reward model that cannot be loaded fails first
        self._reward_functions = None
        if reward_funcs is not None:
            self._reward_functions = RewardFunctions(
                reward_funcs, reward_processing_classes, args.reward_weights, args.reward_model_trust_remote_code
            )
        # `_prepare_dataset` tokenises for the architecture, but runs before DPOTrainer has loaded and stored the model
        if isinstance(model, str):
            check_model_path(model, "model")
            revision = (args.model_init_kwargs or {}).get("revision")
            config = AutoConfig.from_pretrained(model, revision=revision, trust_remote_code=args.trust_remote_code)
        else:
            config = model.config
        self.is_encoder_decoder = config.is_encoder_decoder
        # Read by the collator setter during DPOTrainer.__init__, which itself disables `padding_free` with a warning
        # (its pairwise collator cannot pack since TRL's DPO refactor): the pointwise collator packs, so DPOTrainer is
        # shown `padding_free=False` while it builds, and the setting is restored after
        self._padding_free = args.padding_free
        args.padding_free = False
        try:
            super().__init__(
                model=model,
                ref_model=ref_model,
                args=args,
                data_collator=data_collator,
                train_dataset=train_dataset,
                eval_dataset=eval_dataset,
                processing_class=processing_class,
                compute_metrics=compute_metrics,
                callbacks=[*(callbacks or []), StopOnNonFiniteGradients()],
                optimizers=optimizers,
                quantization_config=quantization_config,
                peft_config=peft_config,
            )
        finally:
            args.padding_free = self._padding_free
        self.padding_free = self._padding_free
        if args.disable_dropout:
            # DPOTrainer's `disable_dropout_in_model` only reaches `nn.Dropout` modules, not the attention dropout T5
            # keeps in a float: training forwards and an on-the-fly reference (LoRA adapters off) would stay random
            for module in (self.model, self.ref_model):
                if module is not None:
                    disable_float_dropout(module)
        if not args.precompute_ref_log_probs:
            # DPOTrainer runs `_precompute_ref_logps` over its datasets (in `__init__` and `evaluate`) only when it
            # precomputes. Ours is the map stage that also builds the regression targets, so it must always run.
            self.precompute_ref_logps = True
            self.train_dataset = self._precompute_ref_logps(
                self.train_dataset, "train", args.precompute_ref_batch_size or args.per_device_train_batch_size
            )
            eval_batch_size = args.precompute_ref_batch_size or args.per_device_eval_batch_size
            if isinstance(self.eval_dataset, dict):
                self.eval_dataset = {
                    name: self._precompute_ref_logps(dataset, name, eval_batch_size)
                    for name, dataset in self.eval_dataset.items()
                }
            elif self.eval_dataset is not None:
                self.eval_dataset = self._precompute_ref_logps(self.eval_dataset, "eval", eval_batch_size)

    # DPOTrainer.__init__ builds its pairwise collator (with the pad token it resolved) when none is given, and uses it
    # before returning: the pointwise collator takes over its settings at assignment.
    @property
    def data_collator(self):
        return self._data_collator

    @data_collator.setter
    def data_collator(self, collator):
        if isinstance(collator, DataCollatorForPreference):
            collator = DataCollatorForPointwise(
                pad_token_id=collator.pad_token_id,
                max_length=collator.max_length,
                truncation_mode=collator.truncation_mode,
                pad_to_multiple_of=collator.pad_to_multiple_of,
                is_encoder_decoder=self.is_encoder_decoder,
                padding_free=self._padding_free,
            )
        self._data_collator = collator

    # DPOTrainer.__init__ sets this key of the precompute caches to `hash_module(ref_model or model)`. Under ZeRO-3 the
    # parameters are partitioned by then and that hash only sees empty tensors, the same for every model of an
    # architecture: hash the gathered parameters instead.
    @property
    def _precompute_model_hash(self):
        return self._reference_model_hash

    @_precompute_model_hash.setter
    def _precompute_model_hash(self, value):
        model = self.ref_model if self.ref_model is not None else self.model
        if value is not None and any(hasattr(param, "ds_id") for param in model.parameters()):
            value = hash_partitioned_module(model)
        self._reference_model_hash = value

    # ----------------------------------------------------------------------------------------------------------------
    # Hooks of the subclasses

    def _check_dataset(self, dataset: Dataset, args, dataset_name: str) -> None:
        """Method-specific validation of the raw dataset (before any map), raising a ValueError naming column and row.
        Runs before `Trainer.__init__`, hence `args` rather than `self.args`."""

    def _check_streamable(self, args, dataset_name: str) -> None:
        """Raise a ValueError saying why, if the method's targets cannot be made from each row of a streamed dataset
        alone (e.g. they need statistics of the whole dataset)."""

    def _target_statistics(self, dataset: Dataset, ref_logps: np.ndarray | None) -> dict:
        """Statistics of the training dataset that the targets of every dataset use (e.g. reward mean and std)."""
        return {}

    def _regression_targets(self, dataset: Dataset, ref_logps: np.ndarray | None, statistics: dict) -> dict:
        """Columns `target` and `_metric_columns`, as float64 arrays, for the prepared (pointwise, tokenised) dataset."""
        raise NotImplementedError

    def _loss_scale(self) -> float:
        return 1.0

    # ----------------------------------------------------------------------------------------------------------------
    # Data

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        if isinstance(dataset, IterableDataset):
            return self._prepare_streamed_dataset(dataset, processing_class, args, dataset_name)
        if not isinstance(dataset, Dataset):
            raise TypeError(
                f"{type(self).__name__} needs a `datasets.Dataset` or `datasets.IterableDataset` for the "
                f"{dataset_name} dataset, got {type(dataset).__name__}."
            )
        if "completion_ids" in dataset.column_names:  # already prepared, e.g. handed back to `evaluate()`
            return dataset
        if self._needs_reference_stage(dataset):
            # Completing the dataset needs the reference model on its device and the processes set up, which only
            # exist after `Trainer.__init__`: the reference stage runs first thing in the map stage
            # (`_precompute_ref_logps`), which then prepares the completed dataset here. Check what can be checked now.
            check_stage_columns(dataset, dataset_name)
            return dataset
        self._check_raw_dataset(dataset, args, dataset_name)
        map_kwargs = {"num_proc": args.dataset_num_proc}
        with global_then_local_main_first():
            dataset = to_pointwise(dataset, dataset_name, map_kwargs, _paired_samples(args, dataset_name), args.seed)
            return self._tokenize(dataset, processing_class, args, dataset_name, map_kwargs)

    def _check_raw_dataset(self, dataset: Dataset, args, dataset_name: str) -> None:
        check_columns(dataset, dataset_name, self._reference_columns)
        check_rewards(dataset, dataset_name)
        check_ref_logps(dataset, dataset_name)
        self._check_dataset(dataset, args, dataset_name)

    def _prepare_streamed_dataset(self, dataset: IterableDataset, processing_class, args, dataset_name: str):
        """
        A streamed dataset is prepared batch by batch as it is read, by the functions of the map-style path: each batch
        is checked, made pointwise, tokenised and given its targets, from its own rows alone. The reference
        log-probabilities are computed per training batch (`precompute_ref_log_probs=False`): from `ref_model`, or the
        policy with its adapters disabled.
        """
        if args.precompute_ref_log_probs:
            raise ValueError(
                "`precompute_ref_log_probs=True` is not supported with IterableDataset: the reference "
                f"log-probabilities of the whole {dataset_name} dataset are computed before training. Use a map-style "
                "Dataset or set `precompute_ref_log_probs=False`."
            )
        first = next(iter(dataset), None)
        if first is None:
            raise ValueError(f"The streamed {dataset_name} dataset is empty: it has no rows.")
        first_row = Dataset.from_list([first])
        if "completion_ids" in first_row.column_names:  # already prepared, e.g. handed back to `evaluate()`
            return dataset
        if self._needs_reference_stage(first_row):
            raise ValueError(
                f"The streamed {dataset_name} dataset lacks rewards (or QRPO's reference rewards), and the reference "
                "stage (`reward_funcs`) cannot stream: it samples and scores the whole dataset into cache files "
                "before training. Complete it first with `precompute_rewards`, or pass a map-style Dataset."
            )
        self._check_streamable(args, dataset_name)
        self._check_raw_dataset(first_row, args, dataset_name)  # a wrong format or setting fails now, not mid-training
        tokenize = self._batch_tokenizer(processing_class, args)

        def prepare(batch, indices):
            try:
                self._check_raw_dataset(Dataset.from_dict(batch), args, dataset_name)
            except ValueError as error:
                raise ValueError(
                    f"In rows {indices[0]} to {indices[-1]} of the streamed {dataset_name} dataset (row numbers below "
                    f"count from {indices[0]}): {error}"
                ) from None
            rows = tokenize(pointwise_batch(batch, indices, _paired_samples(args, dataset_name), args.seed))
            targets = self._regression_targets(Dataset.from_dict(rows), None, {})
            return {**rows, **{column: values.tolist() for column, values in targets.items()}}

        return dataset.map(prepare, batched=True, with_indices=True, remove_columns=first_row.column_names)

    def _tokenize(self, dataset: Dataset, processing_class, args, dataset_name: str, map_kwargs: dict) -> Dataset:
        """
        Add `prompt_ids` and `completion_ids`, tokenised by `tokenize_pairs` (as TRL's DPOTrainer does for decoder-only
        models, and as the reference stage tokenises; see `qrpo_trl.tokenization`). Like DPOTrainer, drop the samples
        whose prompt alone fills `max_length` (truncation would leave no completion token); unlike it, say how many were
        dropped or truncated.
        """
        tokenized = dataset.map(
            self._batch_tokenizer(processing_class, args),
            batched=True,
            remove_columns=dataset.column_names,
            desc=f"Tokenizing {dataset_name} dataset",
            **map_kwargs,
        )
        if len(tokenized) == 0:
            raise ValueError(
                f"Every sample of the {dataset_name} dataset has a prompt of max_length={args.max_length} tokens or "
                "more: truncation would leave no completion token. Raise `max_length`, or shorten the prompts."
            )
        if len(tokenized) < len(dataset):
            logger.warning(
                f"Dropped {len(dataset) - len(tokenized)} of {len(dataset)} samples of the {dataset_name} dataset whose "
                f"prompt alone has max_length={args.max_length} tokens or more: truncation would leave no completion "
                "token."
            )
        if args.max_length is not None:
            truncated = int(np.sum(sequence_lengths(tokenized) > args.max_length))
            if truncated:
                logger.warning(
                    f"{truncated} of {len(tokenized)} samples of the {dataset_name} dataset exceed max_length="
                    f"{args.max_length} tokens and are truncated ({args.truncation_mode})."
                )
        return tokenized

    def _batch_tokenizer(self, processing_class, args):
        """The function that adds `prompt_ids` and `completion_ids` to a batch of pointwise rows (see `_tokenize`)."""
        # The map function must not capture `self` (nor the whole config): `datasets` fingerprints it, and a closure
        # over the trainer would hash differently on every run, so no cache (tokens, reference log-probs) is reused
        is_encoder_decoder = self.is_encoder_decoder
        drop_long_prompts = args.max_length is not None and args.truncation_mode == "keep_start"
        # The map's cache fingerprint hashes what `tokenize` captures: the whole `args` would make any other setting
        # (output_dir, resume_from_checkpoint, ...) a cache miss, and a resumed run would tokenise and score anew
        max_length = args.max_length

        def tokenize(batch):
            pairs = tokenize_pairs(
                processing_class, batch["prompt"], batch["completion"], is_encoder_decoder, template_kwargs(batch)
            )
            # Rows are dropped inside the map rather than by a later filter, which would leave an indices mapping that
            # adding the target columns has to flatten (a cache write on every process).
            kept = [i for i, (p, _) in enumerate(pairs) if not drop_long_prompts or len(p) < max_length]
            rows = {key: [values[i] for i in kept] for key, values in batch.items()}
            rows["prompt_ids"] = [pairs[i][0] for i in kept]
            rows["completion_ids"] = [pairs[i][1] for i in kept]
            return rows

        return tokenize

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = [
                "prompt_ids", "completion_ids", "ref_logps", "target", "beta", "pair_index", "is_chosen",
                *self._metric_columns,
            ]

    # transformers' length-grouped samplers (`train_sampling_strategy="group_by_length"` or `"batch_rebalance"`) read the
    # lengths from a `length_column_name` column or measure an `input_ids` column, and a pointwise sample has neither:
    # they get the tokens of each sample as that column

    def _get_train_sampler(self, train_dataset=None):
        train_dataset = self.train_dataset if train_dataset is None else train_dataset
        return super()._get_train_sampler(self._with_length_column(train_dataset))

    def _get_eval_sampler(self, eval_dataset):
        return super()._get_eval_sampler(self._with_length_column(eval_dataset))

    def _with_length_column(self, dataset):
        column = self.args.length_column_name
        grouped = self.args.train_sampling_strategy in ("group_by_length", "batch_rebalance")
        if grouped and isinstance(dataset, Dataset) and column not in dataset.column_names:
            dataset = dataset.add_column(column, sequence_lengths(dataset, self.args.max_length))
        return dataset

    # ----------------------------------------------------------------------------------------------------------------
    # Reference map stage

    def _precompute_ref_logps(self, dataset: Dataset, name: str, batch_size: int) -> Dataset:
        """
        The reference map stage: adds the regression targets (and `_metric_columns`) and, when precomputing, the
        reference log-probabilities `ref_logps`, as columns of `dataset`.
        """
        self._restrict_fused_lm_head()
        self._check_padding_free()
        if isinstance(dataset, IterableDataset) or "target" in dataset.column_names:
            return dataset  # a streamed dataset gets its targets batch by batch (`_prepare_streamed_dataset`)
        if "completion_ids" not in dataset.column_names:  # left raw by `_prepare_dataset` for the reference stage
            dataset = self._prepare_dataset(
                self._run_reference_stage(dataset, name), self.processing_class, self.args, name
            )
        ref_logps = None
        if "ref_logps" in dataset.column_names:  # given with the data: used as they are, no reference pass
            ref_logps = float_column(dataset, "ref_logps", name)
        elif self.args.precompute_ref_log_probs or self._target_needs_ref_logps:
            ref_logps = self._reference_logps(dataset, name, batch_size)
        if self._train_statistics is None:
            self._train_statistics = self._target_statistics(dataset, ref_logps)
        columns = self._regression_targets(dataset, ref_logps, self._train_statistics)
        if self.args.precompute_ref_log_probs and "ref_logps" not in dataset.column_names:
            columns["ref_logps"] = ref_logps
        for column, values in columns.items():
            dataset = dataset.add_column(column, np.asarray(values, dtype=np.float64))
        return dataset

    def _restrict_fused_lm_head(self) -> None:
        """
        Make the policy's fused LM head compute the per-token log-probabilities only. DPOTrainer.__init__ patches it to
        also compute the entropy, mean logit and top-1 flag of every position for DPO's metrics, which the pointwise
        loss and metrics do not use: each is one more pass over the (positions x vocabulary) logit tiles, as costly as
        the softmax itself where Triton is not available. Done once, before the first forward: the map stage, which
        DPOTrainer.__init__ runs right after patching.
        """
        if self._fused_lm_head_restricted or self.is_encoder_decoder:  # no fused head for encoder-decoder models
            return
        # Patched over DPOTrainer's patch: forwards with `fused_lm_head=True` stop at this one, others pass through both
        temperature = self._logits_temperature
        add_fused_lm_head(
            self.model.get_base_model() if self._is_peft_policy else self.model,
            temperature=temperature,
            outputs=("log_probs",),
        )
        if self.ref_model is not None and temperature != 1.0:  # DPOTrainer patched it at temperature 1
            add_fused_lm_head(self.accelerator.unwrap_model(self.ref_model), temperature=temperature)
        self._fused_lm_head_restricted = True

    def _check_padding_free(self) -> None:
        """
        With `padding_free=True`, raise a ValueError for a model that cannot score a packed row sample by sample.

        Packed rows run each sample's own attention for `sdpa` and `eager` (`qrpo_trl.packed_attention`), flash
        attention's varlen path, and for `flex_attention` the masks transformers builds from `position_ids`; but a
        model's attention may not get the sequence boundaries, or not compute what its own padded forward computes, and
        custom implementations may ignore the positions. So each model that will score packed rows is probed once,
        before the first pass: a sample packed after another one must get the log-probability it gets alone in a
        padded batch, through the model's own attention (within 1e-5 relative, 1e-2 in half precision).
        """
        if not self._padding_free or self._padding_free_checked:
            return
        if self._is_peft_policy and self.accelerator.unwrap_model(self.model).active_peft_config.is_prompt_learning:
            raise ValueError(
                "`padding_free=True` is not supported with prompt-learning PEFT (prompt, prefix or p-tuning): its virtual "
                "tokens would be prepended once to the packed row rather than to each sample. Set `padding_free=False`."
            )
        # Under DeepSpeed the policy is not placed before `train`, and probing it would build an inference engine that
        # the map stage may not need: not probed there
        probes = [] if self.is_deepspeed_enabled else [("model", self.model)]
        if self.ref_model is not None:
            probes.append(("ref_model", self.ref_model))
        vocab_size = self.accelerator.unwrap_model(self.model).config.get_text_config().vocab_size
        tokens = [(7 * i + 3) % vocab_size for i in range(12)]
        probe, other = ({"prompt_ids": ids[:2], "completion_ids": ids[2:]} for ids in (tokens, tokens[::-1]))
        half_precision = self.args.bf16 or self.args.fp16
        tolerance = 1e-2 if half_precision else 1e-5
        for role, model in probes:
            scores = []
            with torch.no_grad(), self.accelerator.autocast(), eval_mode(model):
                # Alone in a padded batch (nothing to leak from), then packed after another sample
                padded_collator = dataclasses.replace(self.data_collator, padding_free=False)
                for collator, examples in ((padded_collator, [probe]), (self.data_collator, [other, probe])):
                    batch = collator(examples)
                    batch = {k: v.to(self.accelerator.device) if torch.is_tensor(v) else v for k, v in batch.items()}
                    scores.append(self._sequence_logps(model, batch)[0][-1].item())
            alone, packed = scores
            if abs(alone - packed) > tolerance * max(1.0, abs(alone)):
                implementation = self.accelerator.unwrap_model(model).config._attn_implementation
                raise ValueError(
                    f"`padding_free=True` needs attention confined to each packed sample, and the {role} "
                    f"({type(self.accelerator.unwrap_model(model)).__name__} with attn_implementation="
                    f"{implementation!r}) does not confine it: a sample scores {alone:.6g} alone and {packed:.6g} "
                    "packed after another one. Packed rows are confined for 'sdpa' and 'eager' in models that pass "
                    "the sequence boundaries to their attention, with flash attention, and for 'flex_attention' in "
                    "models that build their masks from `position_ids`. Set "
                    "`padding_free=False` or use another attention implementation."
                )
        self._padding_free_checked = True

    @property
    def _logits_temperature(self) -> float:
        """The temperature the logits are divided by before the log-softmax (policy and reference alike)."""
        return self.args.temperature if self.args.apply_temperature_in_training else 1.0

    def _reference_logps(self, dataset: Dataset, name: str, batch_size: int) -> np.ndarray:
        """
        Reference log-probabilities of every sample, in dataset order, identical on every process.

        Each process scores its shard and the results are all-gathered, so no file has to be shared between processes
        (DPOTrainer's precompute writes a per-process temporary file for in-memory datasets, which the other ranks
        cannot read). For a dataset backed by cache files, the result is also cached next to them, keyed by the
        dataset and reference-model fingerprints.
        """
        cache_file = None
        if dataset.cache_files and self._precompute_model_hash is not None:
            settings = (
                self.args.logps_normalization, self.args.max_length, self.args.truncation_mode, self._logits_temperature,
                self.accelerator.mixed_precision,
            )
            # By content: the dataset's fingerprint covers the tokenizer's path and loading options
            tokens = None
            if self.accelerator.is_main_process:
                tokens = token_ids_fingerprint(dataset, ["prompt_ids", "completion_ids"])
            fingerprint = [Hasher.hash((tokens, self._precompute_model_hash, settings))]
            broadcast_object_list(fingerprint, from_process=0)
            cache_dir = os.path.dirname(dataset.cache_files[0]["filename"])
            cache_file = os.path.join(cache_dir, f"qrpo_trl-ref_logps-{fingerprint[0]}.npy")
        cached = [np.load(cache_file) if cache_file and self.accelerator.is_main_process and os.path.exists(cache_file) else None]
        broadcast_object_list(cached, from_process=0)
        if cached[0] is not None:
            return cached[0]

        # Batched by length, longest first (an out-of-memory error shows at once), so that little is padded; the
        # log-probs are put back in dataset order below
        order = np.argsort(-sequence_lengths(dataset, self.args.max_length), kind="stable")
        dataloader = DataLoader(
            dataset.select_columns(["prompt_ids", "completion_ids"]).select(order),
            batch_size=batch_size,
            collate_fn=self.data_collator,
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory,
            shuffle=False,
        )
        dataloader = self.accelerator.prepare(dataloader)
        model = self._reference_inference_model()
        chunks = []
        batches = tqdm(
            iterable=dataloader,
            desc=f"Computing reference log-probs for {name} dataset",
            disable=bool(os.environ.get("TQDM_DISABLE", "")),
        )
        # The log-probs only leave as numbers: no version counters to keep. Activation checkpointing (nothing to
        # re-run without a backward) is switched off once here rather than per batch by `compute_ref_log_probs`
        with (
            torch.inference_mode(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs),
            eval_mode(model),
        ):
            for batch in batches:
                chunks.append(self.accelerator.gather_for_metrics(self.compute_ref_log_probs(model, batch)).cpu())
        ref_logps = np.empty(len(dataset))
        ref_logps[order] = torch.cat(chunks).double().numpy()
        if cache_file and self.accelerator.is_main_process:
            temporary = f"{cache_file}.{os.getpid()}.tmp.npy"
            np.save(temporary, ref_logps)
            os.replace(temporary, cache_file)
        return ref_logps

    def _reference_inference_model(self):
        """The model that runs the reference before training: `ref_model`, or the policy (adapters disabled by
        `_reference_adapter_context` for PEFT)."""
        # Before `train`, DeepSpeed parameters are still on CPU (ZeRO-1/2) or sharded (ZeRO-3): an inference engine
        # places and gathers them, built once and reused (as DPOTrainer does).
        if self.ref_model is None and self.is_deepspeed_enabled:
            if self._precompute_engine is None:
                self._precompute_engine = prepare_deepspeed(self.model, self.accelerator)
            return self._precompute_engine
        return self.ref_model if self.ref_model is not None else self.model

    @cached_property
    def _is_peft_policy(self) -> bool:
        # accelerate's `is_peft_model` reads package metadata at every call (milliseconds): asked once, not per batch
        return is_peft_model(self.model)

    def _reference_adapter_context(self):
        """Disables the policy's adapters (or switches to its "ref" adapter) when it is its own reference."""
        if self.ref_model is None and self._is_peft_policy:
            unwrapped_model = self.accelerator.unwrap_model(self.model)
            return use_adapter(unwrapped_model, adapter_name="ref" if "ref" in unwrapped_model.peft_config else None)
        return contextlib.nullcontext()

    # ----------------------------------------------------------------------------------------------------------------
    # Reference stage

    def _needs_reference_stage(self, dataset: Dataset) -> bool:
        """Whether `reward_funcs` were given and the dataset lacks rewards, or reference rewards the trainer needs."""
        if self._reward_functions is None:
            return False
        columns = dataset.column_names
        return not has_rewards(columns) or self._samples_ref_rewards(columns)

    def _samples_ref_rewards(self, columns: list[str]) -> bool:
        return "ref_rewards" in self._reference_columns and not any(c in columns for c in self._reference_columns)

    def _run_reference_stage(self, dataset: Dataset, name: str) -> Dataset:
        """Complete a raw dataset with the reference stage, sampling from the reference model on its device."""
        with (
            unwrap_model_for_generation(self._reference_inference_model(), self.accelerator) as model,
            self._reference_adapter_context(),
        ):
            stage = ReferenceStage(
                model, self.processing_class, self._reward_functions, self.args, self._precompute_model_hash
            )
            return stage.run(dataset, self._samples_ref_rewards(dataset.column_names), name)

    # ----------------------------------------------------------------------------------------------------------------
    # Log-probabilities and loss

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"):
        self._eval_pair_rewards = []
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        if self._eval_pair_rewards:
            for key, value in pair_metrics(torch.cat(self._eval_pair_rewards).double().numpy()).items():
                self._metrics["eval"][key] = [value]  # logged (and returned by `evaluate`) with the eval_ prefix
        self._eval_pair_rewards = []
        return output

    def _sequence_logps(
        self, model, inputs, output_router_logits: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """
        Sum (or per-token mean) of the completion-token log-probs: through TRL's fused LM head (no full logits) for a
        decoder-only model; for an encoder-decoder model, from the logits of a plain forward with the decoder target
        as `labels`, from which the model builds its decoder inputs, so that position t scores label t (no shift).

        Returns them with the MoE load-balancing loss of the forward when `output_router_logits` (the policy of an MoE
        model whose auxiliary loss is trained, as DPOTrainer's `aux_loss_enabled`), else None. Other forwards of an MoE
        model (the reference) are told not to compute router logits, whatever its config says.
        """
        if self.is_encoder_decoder:
            labels = inputs["labels"]
            logits = model(
                input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], labels=labels, use_cache=False
            ).logits / self._logits_temperature
            token_mask = labels != -100
            token_logps = selective_log_softmax(logits, labels.masked_fill(~token_mask, 0)).masked_fill(~token_mask, 0)
            aux_loss = None  # no encoder-decoder model declares `output_router_logits`, so none has aux_loss_enabled
        else:
            completion_mask = inputs["completion_mask"]
            labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
            router_kwargs = {"output_router_logits": output_router_logits} if self._is_moe_model else {}
            # A packed row (`padding_free`) has no attention mask: positions and sequence boundaries confine attention
            model_inputs = {key: inputs[key] for key in MODEL_INPUT_KEYS if key in inputs}
            with compact_fused_lm_head(), self._packed_attention(model, inputs):
                outputs = model(labels=labels, fused_lm_head=True, use_cache=False, **model_inputs, **router_kwargs)
            token_mask = completion_mask[:, 1:]
            # Prompt-learning PEFT prepends virtual tokens to the outputs; keep the positions of the real tokens
            token_logps = outputs.log_probs[:, -token_mask.size(1) :]
            aux_loss = outputs.aux_loss if output_router_logits else None
        if "sample_index" in inputs:  # one packed row (`padding_free`): sum each sample's segment, label t+1 scored at t
            sample_index = inputs["sample_index"][0, 1:]
            num_samples = inputs["sample_lengths"].size(0)
            logps = token_logps.new_zeros(num_samples).index_add(0, sample_index, token_logps[0])
            num_scored = token_mask.new_zeros(num_samples).index_add(0, sample_index, token_mask[0])
        else:
            logps, num_scored = token_logps.sum(dim=1), token_mask.sum(dim=1)
        if self.args.logps_normalization == "mean":
            logps = logps / num_scored.clamp(min=1)
        return logps, aux_loss

    def _packed_attention(self, model, inputs):
        """Per-sample attention (`qrpo_trl.packed_attention`) for the forwards of `model` over a packed row."""
        if "cu_seq_lens_q" not in inputs:
            return contextlib.nullcontext()
        # accelerate's `unwrap_model` reads package metadata at every call (milliseconds): once per model wrapper
        if model not in self._unwrapped_models:
            self._unwrapped_models[model] = self.accelerator.unwrap_model(model)
        return per_sample_attention(self._unwrapped_models[model])

    def training_step(self, model, inputs, num_items_in_batch=None):
        # The whole step, backward included: activation checkpointing re-runs the forwards there
        with self._packed_attention(model, inputs):
            return super().training_step(model, inputs, num_items_in_batch)

    @cached_property
    def _is_moe_model(self) -> bool:
        """Whether the model is a Mixture-of-Experts that can return router logits (DPOTrainer's test)."""
        return hasattr(self.model.config.get_text_config(), "output_router_logits")

    def compute_ref_log_probs(self, model, inputs) -> torch.Tensor:
        """Reference log-probabilities of a batch: `model` without gradients, PEFT adapters disabled if no ref_model."""
        with (
            torch.no_grad(),
            disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs),
            self._reference_adapter_context(),
            self.accelerator.autocast(),
        ):
            return self._sequence_logps(model, inputs)[0]

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        logps, aux_loss = self._sequence_logps(model, inputs, output_router_logits=self.aux_loss_enabled)
        if "ref_logps" in inputs:  # precomputed, or given with the data
            ref_logps = inputs["ref_logps"]
        else:
            ref_logps = self.compute_ref_log_probs(self.ref_model if self.ref_model is not None else model, inputs)
        log_ratios = logps - ref_logps
        beta = inputs["beta"] if "beta" in inputs else self.beta  # per sample with QRPO's normalize_beta_by_length
        implicit_rewards = beta * log_ratios
        residuals = inputs["target"] - implicit_rewards
        penalties = residuals.abs() if self.args.regression_loss == "mae" else residuals.pow(2)
        loss = self._loss_scale() * penalties.mean()
        if aux_loss is not None:  # an MoE policy: DPOTrainer's weighted load-balancing loss
            loss = loss + self.router_aux_loss_coef * aux_loss

        # One all-gather (and one device sync) for every logged per-sample statistic and the token count
        statistics = {
            "target": inputs["target"],
            "log_ratio": log_ratios,
            "residual": residuals.abs(),
            "rewards/implicit": implicit_rewards,
            "logps/policy": logps,
            "logps/ref": ref_logps,
            **{column: inputs[column] for column in self._metric_columns},
        }
        if aux_loss is not None:  # one value per process, gathered with the per-sample statistics
            statistics["aux_loss"] = aux_loss.expand_as(logps)
        num_tokens = inputs["sample_lengths"] if "sample_lengths" in inputs else inputs["attention_mask"].sum(dim=1)
        if self.is_encoder_decoder:  # the decoder's tokens too
            num_tokens = num_tokens + (inputs["labels"] != -100).sum(dim=1)
        stacked = torch.stack([value.detach().float() for value in (*statistics.values(), num_tokens)], dim=1)
        gathered = self.accelerator.gather(stacked).double()
        *means, batch_tokens = torch.cat([gathered[:, :-1].mean(dim=0), gathered[:, -1:].sum(dim=0)]).tolist()
        for key, value in zip(statistics, means, strict=True):
            self._metrics[mode][key].append(value)
        if mode == "eval" and "pair_index" in inputs:
            # DPO's pair metrics need both completions of a pair, which batches (and processes) may split: kept per
            # sample and joined over the whole evaluation set in `evaluation_loop`
            pairs = torch.stack([inputs["pair_index"], inputs["is_chosen"], implicit_rewards.detach().float()], dim=1)
            self._eval_pair_rewards.append(self.accelerator.gather_for_metrics(pairs).cpu())
        if mode == "train":
            self._total_train_tokens += int(batch_tokens) // self._tp_size
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]

        if return_outputs:  # `compute_metrics` needs logits, which the fused LM head does not build
            model_inputs = {key: inputs[key] for key in MODEL_INPUT_KEYS if key in inputs}
            if self.is_encoder_decoder:
                model_inputs["labels"] = inputs["labels"]  # the decoder target, from which its inputs are built
            # No cache: with one, transformers would not confine attention in a packed row
            with torch.no_grad(), self._packed_attention(model, inputs):
                outputs = model(**model_inputs, use_cache=False)
            return loss, outputs
        return loss
