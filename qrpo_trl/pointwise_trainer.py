"""
`PointwiseTrainer`, the shared base of the pointwise trainers.

`QRPOTrainer` and `RPOTrainer` subclass it, itself a `trl.DPOTrainer`, and only say how their regression target is made.
The loss is `scale * penalty(target - beta * (logp_theta - logp_ref))`, averaged over the batch, with a squared
(`regression_loss="mse"`) or absolute (`"mae"`) penalty. What it is built from, one idea per module:

- `qrpo_trl.data_utils` and `qrpo_trl.tokenization`: dataset formats, checks, pointwise rows and their tokens;
- `qrpo_trl.pointwise_collator`: the batches (padded or packed) and their truncation;
- `qrpo_trl.kernels`: the log-prob forwards (compact fused LM head, per-sample attention for packed rows);
- `qrpo_trl.reference_stage`: sampling and scoring reference completions, for a dataset that lacks rewards;
- `qrpo_trl.reference_logps`: the reference log-prob pass and the regression targets, before training;
- `qrpo_trl.metrics`: DPO's pair metrics at evaluation.
"""

import contextlib
import dataclasses
from functools import cached_property

import numpy as np
import torch
from accelerate.logging import get_logger
from datasets import Dataset, IterableDataset
from transformers import AutoConfig
from trl import DPOTrainer
from trl.models.utils import unwrap_model_for_generation
from trl.trainer.dpo_trainer import DataCollatorForPreference
from trl.trainer.utils import add_fused_lm_head, get_config_model_id, global_then_local_main_first, selective_log_softmax

from .data_utils import (
    check_columns,
    check_ref_logps,
    check_rewards,
    check_stage_columns,
    has_rewards,
    pointwise_batch,
    to_pointwise,
)
from .docstrings import POINTWISE_TRAINER_ARGS, with_args_doc
from .kernels import compact_fused_lm_head, per_sample_attention
from .metrics import PairMetricsMixin
from .non_finite import StopOnNonFiniteGradients
from .pointwise_collator import DataCollatorForPointwise, model_inputs, sequence_lengths
from .pointwise_config import PointwiseConfig
from .prompt_grouping import PromptGroupedSampler
from .reference_logps import ReferenceLogProbsMixin
from .reference_stage import ReferenceStage, RewardFunctions
from .tokenization import template_kwargs, tokenize_pairs
from .utils import check_model_path, eval_mode


logger = get_logger(__name__)


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


def _paired_samples(args, dataset_name: str) -> str:
    """Which completions of each pair become samples: evaluation keeps both, for DPO's pair metrics."""
    return args.paired_samples if dataset_name == "train" else "both"


@with_args_doc(POINTWISE_TRAINER_ARGS)
class PointwiseTrainer(ReferenceLogProbsMixin, PairMetricsMixin, DPOTrainer):
    """
    Base of the pointwise trainers: a [`~trl.DPOTrainer`] whose dataset is made of single (prompt, completion, reward)
    samples and whose loss regresses `beta * log(pi_theta / pi_ref)` onto a per-sample target computed once, before
    training, by `_precompute_ref_logps` (with the reference log-prob pass when the target or `precompute_ref_log_probs`
    needs it; see `qrpo_trl.reference_logps`). The constructor takes [`~trl.DPOTrainer`]'s arguments, then (as
    [`~trl.GRPOTrainer`] names them) `reward_funcs` and `reward_processing_classes`: with them, a dataset that lacks
    rewards (or QRPO's reference rewards) is completed by the reference stage (see [`precompute_rewards`]) before the
    targets are made.

    A new method subclasses it, sets `_config_class` (a [`PointwiseConfig`] subclass) and `_name`, and says how its
    target is made by overriding these class attributes and hooks (defined in the "Hooks of the subclasses" section
    below):

    - `_reference_columns`: columns the dataset needs on top of the accepted formats (any one of them);
    - `_metric_columns`: per-sample columns of `_regression_targets` whose batch mean is logged;
    - `_target_needs_ref_logps`: whether the target depends on the reference log-probabilities;
    - `_check_dataset`: method-specific validation of the raw dataset;
    - `_check_streamable`: a ValueError if the targets cannot be made from each row of a streamed dataset alone;
    - `_target_statistics` / `_regression_targets`: the target columns, from dataset statistics of the training set;
    - `_loss_scale`: the factor in front of the penalty on the residual.

    Example:

    ```python
    >>> import numpy as np
    >>> from datasets import Dataset
    >>> from qrpo_trl import PointwiseConfig, PointwiseTrainer

    >>> class RewardRegressionTrainer(PointwiseTrainer):
    ...     # Regresses beta * log(pi_theta / pi_ref) onto the reward minus its mean over the training set
    ...     _config_class = PointwiseConfig
    ...     _name = "RewardRegression"
    ...
    ...     def _target_statistics(self, dataset, ref_logps):
    ...         return {"mean_reward": float(np.mean(dataset["reward"]))}
    ...
    ...     def _regression_targets(self, dataset, ref_logps, statistics):
    ...         return {"target": np.asarray(dataset["reward"], dtype=np.float64) - statistics["mean_reward"]}

    >>> dataset = Dataset.from_dict(
    ...     {
    ...         "prompt": ["The sky is", "The sky is", "The sea is"],
    ...         "completion": [" blue.", " green.", " blue."],
    ...         "reward": [1.0, 0.0, 1.0],
    ...     }
    ... )
    >>> trainer = RewardRegressionTrainer(model="Qwen/Qwen2.5-0.5B-Instruct", train_dataset=dataset)
    >>> trainer.train()
    ```

    Args:
        args ([`PointwiseConfig`], *optional*):
            Configuration for this trainer, an instance of the trainer's `_config_class`. If `None`, a default
            configuration is used, with `output_dir` named after the model (`<model name>-<_name>`).
        train_dataset ([`~datasets.Dataset`] or [`~datasets.IterableDataset`]):
            Dataset to use for training, [standard](dataset_formats#standard) (plain text) or
            [conversational](dataset_formats#conversational) (lists of `{"role", "content"}` messages), in one of the
            formats:

            - pointwise: `prompt`, `completion`, `reward`;
            - paired with scores: `prompt`, `chosen`, `rejected` and `chosen_reward`/`rejected_reward` (or
              `score_chosen`/`score_rejected`, or `chosen_rewards`/`rejected_rewards`): each pair becomes two
              pointwise samples, or one of them (`args.paired_samples`);

            plus one of the method's `_reference_columns`. Reference log-probabilities given as `ref_logps`
            (pointwise) or `ref_chosen_logps`/`ref_rejected_logps` (paired) are used as they are. Given
            `reward_funcs`, the reference stage fills in missing rewards, and a prompt-only dataset (`prompt`) becomes
            `args.num_generations` completions per prompt sampled from the reference model. A streamed
            [`~datasets.IterableDataset`] is prepared batch by batch as it is read; it needs
            `args.precompute_ref_log_probs=False` and `args.max_steps`, and a method whose targets can be made row by
            row (`_check_streamable`).
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
        args = self._config_or_default(model, args)
        self._refuse_vision_dataset(train_dataset)
        self._train_statistics = None
        self._fused_lm_head_restricted = False
        self._padding_free_checked = False
        self._unwrapped_models = {}
        self._eval_pair_rewards = []
        # Loaded before anything else, so that a reward model that cannot be loaded fails first
        self._reward_functions = self._load_reward_functions(reward_funcs, reward_processing_classes, args)
        # `_prepare_dataset` tokenises for the architecture, but runs before DPOTrainer has loaded and stored the model
        self.is_encoder_decoder = self._model_config(model, args).is_encoder_decoder
        self._share_prompt = args.share_prompt
        with self._padding_free_hidden_from_dpo(args):
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
        self.padding_free = self._padding_free
        if args.disable_dropout:
            self._disable_float_dropout()
        if not args.precompute_ref_log_probs:
            self._prepare_targets(args)

    # ----------------------------------------------------------------------------------------------------------------
    # Steps of the constructor

    def _config_or_default(self, model, args: PointwiseConfig | None) -> PointwiseConfig:
        """`args`, checked to be the trainer's config class, or that class's defaults named after the model."""
        if args is None:
            model_name = model if isinstance(model, str) else get_config_model_id(model.config)
            return self._config_class(f"{model_name.split('/')[-1]}-{self._name}")
        if not isinstance(args, self._config_class):
            raise TypeError(
                f"{type(self).__name__} needs a {self._config_class.__name__} as `args`, got {type(args).__name__}."
            )
        return args

    def _refuse_vision_dataset(self, train_dataset) -> None:
        # A ValueError, as DPOTrainer's for a vision dataset and a text-only model
        first_row = next(iter(train_dataset), None) if isinstance(train_dataset, (Dataset, IterableDataset)) else {}
        if first_row is None:  # DPOTrainer.__init__ reads it: a bare StopIteration
            raise ValueError("The train dataset is empty: it has no rows.")
        if {"image", "images"} & set(first_row):
            raise ValueError(f"{type(self).__name__} does not support vision-language datasets ('image' or 'images').")

    @staticmethod
    def _load_reward_functions(reward_funcs, reward_processing_classes, args) -> RewardFunctions | None:
        """The reference stage's reward functions, loaded (reward models included) when `reward_funcs` is given."""
        if reward_funcs is None:
            return None
        return RewardFunctions(
            reward_funcs, reward_processing_classes, args.reward_weights, args.reward_model_trust_remote_code
        )

    @staticmethod
    def _model_config(model, args):
        """The model's config, read without loading the model when it is given by name."""
        if isinstance(model, str):
            check_model_path(model, "model")
            revision = (args.model_init_kwargs or {}).get("revision")
            return AutoConfig.from_pretrained(model, revision=revision, trust_remote_code=args.trust_remote_code)
        return model.config

    @contextlib.contextmanager
    def _padding_free_hidden_from_dpo(self, args):
        """
        Show DPOTrainer.__init__ `padding_free=False`, then restore the setting. The collator setter reads it while
        DPOTrainer builds, and DPOTrainer itself disables `padding_free` with a warning (its pairwise collator cannot
        pack since TRL's DPO refactor): the pointwise collator packs.
        """
        self._padding_free = args.padding_free
        args.padding_free = False
        try:
            yield
        finally:
            args.padding_free = self._padding_free

    def _disable_float_dropout(self) -> None:
        # DPOTrainer's `disable_dropout_in_model` only reaches `nn.Dropout` modules, not the attention dropout T5
        # keeps in a float: training forwards and an on-the-fly reference (LoRA adapters off) would stay random
        for module in (self.model, self.ref_model):
            if module is not None:
                disable_float_dropout(module)

    def _prepare_targets(self, args) -> None:
        """
        Give every dataset its regression targets. DPOTrainer runs `_precompute_ref_logps` over its datasets (in
        `__init__` and `evaluate`) only when it precomputes the reference log-probs; ours also builds the regression
        targets, so it must always run.
        """
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
                share_prompt=self._share_prompt,
            )
        self._data_collator = collator

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
            # exist after `Trainer.__init__`: the reference stage runs first thing in `_precompute_ref_logps`, which
            # then prepares the completed dataset here. Check what can be checked now.
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
        if args.group_by_prompt and dataset_name == "train":
            raise ValueError(
                "`group_by_prompt=True` samples the prompt groups of the whole training dataset in a random order; a "
                "streamed dataset is read in its own order. Use a map-style Dataset, or stream the rows of each prompt "
                "one after the other and set `group_by_prompt=False`."
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
        if self.args.group_by_prompt and isinstance(train_dataset, Dataset):
            return PromptGroupedSampler(train_dataset, seed=self.args.seed)
        return super()._get_train_sampler(self._with_length_column(train_dataset))

    def _get_eval_sampler(self, eval_dataset):
        return super()._get_eval_sampler(self._with_length_column(eval_dataset))

    def _with_length_column(self, dataset):
        column = self.args.length_column_name
        grouped = self.args.train_sampling_strategy in ("group_by_length", "batch_rebalance")
        if grouped and isinstance(dataset, Dataset) and column not in dataset.column_names:
            dataset = dataset.add_column(
                column, sequence_lengths(dataset, self.args.max_length, self.args.truncation_mode)
            )
        return dataset

    # ----------------------------------------------------------------------------------------------------------------
    # Before the first forward

    def _restrict_fused_lm_head(self) -> None:
        """
        Make the policy's fused LM head compute the per-token log-probabilities only. DPOTrainer.__init__ patches it to
        also compute the entropy, mean logit and top-1 flag of every position for DPO's metrics, which the pointwise
        loss and metrics do not use: each is one more pass over the (positions x vocabulary) logit tiles, as costly as
        the softmax itself where Triton is not available. Done once, before the first forward: in
        `_precompute_ref_logps`, which DPOTrainer.__init__ runs right after patching.
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

        Packed rows run each sample's own attention for `sdpa` and `eager` (`qrpo_trl.kernels.packed_attention`), flash
        attention's varlen path, and for `flex_attention` the masks transformers builds from `position_ids`; but a
        model's attention may not get the sequence boundaries, or not compute what its own padded forward computes, and
        custom implementations may ignore the positions. So each model that will score packed rows is probed once,
        before the first pass: a sample packed after another one (with `share_prompt`, another completion of its prompt,
        sharing it) must get the log-probability it gets alone in a
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
        # the reference log-prob pass may not need: not probed there
        probes = [] if self.is_deepspeed_enabled else [("model", self.model)]
        if self.ref_model is not None:
            probes.append(("ref_model", self.ref_model))
        vocab_size = self.accelerator.unwrap_model(self.model).config.get_text_config().vocab_size
        tokens = [(7 * i + 3) % vocab_size for i in range(12)]
        # The same prompt, so that with `share_prompt` the probe is scored after the other's completion, sharing it
        probe, other = ({"prompt_ids": tokens[:2], "completion_ids": ids[2:]} for ids in (tokens, tokens[::-1]))
        half_precision = self.args.bf16 or self.args.fp16
        tolerance = 1e-2 if half_precision else 1e-5
        for role, model in probes:
            scores = []
            with torch.no_grad(), self.accelerator.autocast(), eval_mode(model):
                # Alone in a padded batch (nothing to leak from), then packed after another sample
                padded_collator = dataclasses.replace(self.data_collator, padding_free=False, share_prompt=False)
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

    # ----------------------------------------------------------------------------------------------------------------
    # Reference stage (sampling and scoring reference completions, when the dataset lacks rewards)

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
            with compact_fused_lm_head(), self._packed_attention(model, inputs):
                outputs = model(
                    labels=labels, fused_lm_head=True, use_cache=False, **model_inputs(inputs), **router_kwargs
                )
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
        """Per-sample attention (`qrpo_trl.kernels.packed_attention`) for the forwards of `model` over a packed row."""
        if "cu_seq_lens_q" not in inputs:
            return contextlib.nullcontext()
        # accelerate's `unwrap_model` reads package metadata at every call (milliseconds): once per model wrapper
        if model not in self._unwrapped_models:
            self._unwrapped_models[model] = self.accelerator.unwrap_model(model)
        return per_sample_attention(self._unwrapped_models[model], shared_prompts="segment_key_index" in inputs)

    def training_step(self, model, inputs, num_items_in_batch=None):
        # The whole step, backward included: activation checkpointing re-runs the forwards there
        with self._packed_attention(model, inputs):
            return super().training_step(model, inputs, num_items_in_batch)

    @cached_property
    def _is_moe_model(self) -> bool:
        """Whether the model is a Mixture-of-Experts that can return router logits (DPOTrainer's test)."""
        return hasattr(self.model.config.get_text_config(), "output_router_logits")

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
        loss = self._regression_loss(residuals, aux_loss)
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
        self._log_statistics(mode, inputs, statistics)
        if mode == "eval":
            # DPO's pair metrics need both completions of a pair, which batches (and processes) may split: kept per
            # sample and joined over the whole evaluation set in `evaluation_loop`
            self._record_pair_rewards(inputs, implicit_rewards)
        if return_outputs:  # `compute_metrics` needs logits, which the fused LM head does not build
            return loss, self._forward_with_logits(model, inputs)
        return loss

    def _regression_loss(self, residuals: torch.Tensor, aux_loss: torch.Tensor | None) -> torch.Tensor:
        """The batch mean of the penalty on the residuals, scaled, plus an MoE policy's load-balancing loss."""
        penalties = residuals.abs() if self.args.regression_loss == "mae" else residuals.pow(2)
        loss = self._loss_scale() * penalties.mean()
        if aux_loss is not None:  # an MoE policy: DPOTrainer's weighted load-balancing loss
            loss = loss + self.router_aux_loss_coef * aux_loss
        return loss

    def _log_statistics(self, mode: str, inputs, statistics: dict[str, torch.Tensor]) -> None:
        """Log the batch mean of each per-sample statistic over all processes, and the count of trained tokens."""
        # One all-gather (and one device sync) for every logged per-sample statistic and the token count
        num_tokens = inputs["sample_lengths"] if "sample_lengths" in inputs else inputs["attention_mask"].sum(dim=1)
        if self.is_encoder_decoder:  # the decoder's tokens too
            num_tokens = num_tokens + (inputs["labels"] != -100).sum(dim=1)
        stacked = torch.stack([value.detach().float() for value in (*statistics.values(), num_tokens)], dim=1)
        gathered = self.accelerator.gather(stacked).double()
        *means, batch_tokens = torch.cat([gathered[:, :-1].mean(dim=0), gathered[:, -1:].sum(dim=0)]).tolist()
        for key, value in zip(statistics, means, strict=True):
            self._metrics[mode][key].append(value)
        if mode == "train":
            self._total_train_tokens += int(batch_tokens) // self._tp_size
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]

    def _forward_with_logits(self, model, inputs):
        """A plain forward of the batch, for the logits that `compute_metrics` needs."""
        forward_inputs = model_inputs(inputs)
        if self.is_encoder_decoder:
            forward_inputs["labels"] = inputs["labels"]  # the decoder target, from which its inputs are built
        # No cache: with one, transformers would not confine attention in a packed row
        with torch.no_grad(), self._packed_attention(model, inputs):
            return model(**forward_inputs, use_cache=False)
