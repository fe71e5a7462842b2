"""
The reference log-prob pass: `log pi_ref(completion | prompt)` of every sample, before training.

Not to be confused with the reference stage (`qrpo_trl.reference_stage`), which samples and scores reference
completions to complete a dataset's rewards. DPOTrainer runs its `_precompute_ref_logps` over its datasets; the pointwise
trainers override it with the pass below, which also builds the regression targets (and so always runs), is safe with
in-memory datasets on several processes (all-gathered, no per-process file) and is cached next to the dataset's cache
files. `ReferenceLogProbsMixin` holds it, for `PointwiseTrainer`.
"""

import contextlib
import hashlib
import os
from functools import cached_property

import numpy as np
import torch
from accelerate.utils import broadcast_object_list, is_peft_model, tqdm
from datasets import Dataset, IterableDataset
from datasets.fingerprint import Hasher
from torch.utils.data import DataLoader
from trl.models import prepare_deepspeed
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import use_adapter

from .data_utils import float_column
from .fingerprint import token_ids_fingerprint
from .pointwise_collator import sequence_lengths
from .prompt_grouping import grouped_by_length
from .utils import eval_mode


def hash_partitioned_module(module: torch.nn.Module) -> str:
    """
    TRL's `hash_module` (the same digest) of a module whose parameters DeepSpeed ZeRO-3 has partitioned, gathering one
    tensor at a time so that no process holds the whole model (TRL's reads the local, empty partitions). Collective:
    every process must call it.
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


class ReferenceLogProbsMixin:
    """
    The reference log-prob pass of `PointwiseTrainer` (a `trl.DPOTrainer`): `_precompute_ref_logps` (DPOTrainer's
    hook, run over each dataset) and what it needs: the cached, all-gathered pass (`_reference_logps`), the model that
    runs it and the adapter context of a PEFT policy that is its own reference. TRL writes the latter two inline in
    `DPOTrainer._precompute_ref_logps` and `compute_ref_log_probs`; here they are shared with the reference stage.
    """

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

    def _precompute_ref_logps(self, dataset: Dataset, name: str, batch_size: int) -> Dataset:
        """
        Adds the regression targets (and `_metric_columns`) and, when precomputing, the reference log-probabilities
        `ref_logps`, as columns of `dataset`: first, if the dataset lacks rewards, the reference stage completes it;
        then the reference log-prob pass runs if the targets need it or `precompute_ref_log_probs` is set.
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

        # Batched by length, longest first (an out-of-memory error shows at once), so that little is padded, or with
        # shared prompts each prompt's rows together; the log-probs are put back in dataset order below
        lengths = sequence_lengths(dataset, self.args.max_length, self.args.truncation_mode)
        order = grouped_by_length(dataset, lengths) if self.args.share_prompt else np.argsort(-lengths, kind="stable")
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

    def compute_ref_log_probs(self, model, inputs) -> torch.Tensor:
        """Reference log-probabilities of a batch: `model` without gradients, PEFT adapters disabled if no ref_model."""
        with (
            torch.no_grad(),
            disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs),
            self._reference_adapter_context(),
            self.accelerator.autocast(),
        ):
            return self._sequence_logps(model, inputs)[0]
