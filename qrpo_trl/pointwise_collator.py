"""
The pointwise collator: pads (or packs) single (prompt, completion) samples for the trainers' forwards, and the
truncation arithmetic it applies, which the trainers also use to count the tokens of a prepared dataset without
collating it.
"""

from dataclasses import dataclass
from numbers import Number
from typing import Any

import numpy as np
import pyarrow.compute as pc
import torch
from datasets import Dataset
from transformers.data.data_collator import DataCollatorMixin
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling


# The decoder-only model inputs of a batch: `input_ids` and `attention_mask` when padded; when packed
# (`padding_free`), the positions restarting at each sample and the sequence boundaries of the varlen kernels, as
# TRL's `DataCollatorForLanguageModeling(padding_free=True)` makes them
MODEL_INPUT_KEYS = (
    "input_ids", "attention_mask", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k",
    "seq_idx",
)


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The `MODEL_INPUT_KEYS` of a collated batch (the others are targets, statistics and bookkeeping)."""
    return {key: batch[key] for key in MODEL_INPUT_KEYS if key in batch}


def truncation_windows(
    prompt_lengths: np.ndarray, completion_lengths: np.ndarray, max_length: int | None, truncation_mode: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """
    Where `max_length` truncation cuts each prompt + completion sequence: the window of `kept` tokens from `start` on,
    and the `kept_prompt` tokens of the prompt in it. keep_start cuts the end of the completion, keep_end the start of
    the prompt (as TRL's DataCollatorForPreference slices them).
    """
    lengths = prompt_lengths + completion_lengths
    kept, start = lengths, np.zeros_like(lengths)
    if max_length is not None:
        if truncation_mode not in ("keep_start", "keep_end"):
            raise ValueError(f"Unsupported truncation mode {truncation_mode!r}: 'keep_start' or 'keep_end'.")
        kept = np.minimum(lengths, max_length)
        if truncation_mode == "keep_end":
            start = lengths - kept
    kept_prompt = np.clip(prompt_lengths - start, 0, kept)
    return start, kept, kept_prompt


def _token_counts(dataset: Dataset) -> tuple[np.ndarray, np.ndarray]:
    """Tokens of each prepared sample's `prompt_ids` and `completion_ids`, read from the Arrow table (no rows decoded)."""
    table = dataset.with_format("arrow")
    return tuple(pc.list_value_length(table[column]).to_numpy() for column in ("prompt_ids", "completion_ids"))


def sequence_lengths(dataset: Dataset, max_length: int | None = None, truncation_mode: str = "keep_start") -> np.ndarray:
    """Tokens of each prepared sample (`prompt_ids` + `completion_ids`) that the collator keeps after truncation."""
    return truncation_windows(*_token_counts(dataset), max_length, truncation_mode)[1]


def completion_lengths(dataset: Dataset, max_length: int | None, truncation_mode: str) -> np.ndarray:
    """Completion tokens of each prepared sample that the loss scores, after the collator's `max_length` truncation."""
    _, kept, kept_prompt = truncation_windows(*_token_counts(dataset), max_length, truncation_mode)
    return kept - kept_prompt


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
            (`qrpo_trl.kernels.packed_attention`, for sdpa and eager) confine attention to each sample. The
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
        start, kept, kept_prompt = truncation_windows(
            np.array([len(example["prompt_ids"]) for example in examples]),
            np.array([len(example["completion_ids"]) for example in examples]),
            self.max_length,
            self.truncation_mode,
        )
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
        # Rows copied into one preallocated array rather than by TRL's `pad`: a tensor per row from its Python list,
        # then padded, costs ~10x more
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
