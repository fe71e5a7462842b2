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
# TRL's `DataCollatorForLanguageModeling(padding_free=True)` makes them; with shared prompts (`share_prompt`), the keys
# of each segment (`segment_key_index`, see `DataCollatorForPointwise`)
MODEL_INPUT_KEYS = (
    "input_ids", "attention_mask", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k",
    "seq_idx", "segment_key_index",
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
        share_prompt (`bool`, *optional*, defaults to `False`):
            With `padding_free`: the samples of the batch whose kept prompt tokens are the same (after truncation) share
            one copy of the prompt. For a prompt P and completions c_1..c_k the row holds `P[:-1]`, then for each
            completion `[P[-1]] + c_i`, its positions continuing from the prompt's: P's last token is repeated once per
            completion, so that the standard label shift scores each completion from it. The segments are bounded by
            `cu_seq_lens_q`; each segment's keys, its shared prompt's (`P[:-1]`) then its own, are the row positions
            `segment_key_index[cu_seq_lens_k[j]:cu_seq_lens_k[j + 1]]`, to which the per-sample attention confines
            it (lower-right causal). `sample_lengths` stays each sample's kept tokens (prompt included), as padded;
            the shared part's positions count in `sample_index` with their group's first sample (their labels are
            prompt labels, never scored).
    """

    pad_token_id: int
    max_length: int | None = None
    truncation_mode: str = "keep_start"
    pad_to_multiple_of: int | None = None
    is_encoder_decoder: bool = False
    padding_free: bool = False
    share_prompt: bool = False
    return_tensors: str = "pt"

    def __post_init__(self):
        if self.share_prompt and not self.padding_free:
            raise ValueError(
                "`share_prompt=True` packs the completions of a prompt after one copy of it in a packed row: it needs "
                "`padding_free=True`."
            )
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
        elif self.share_prompt:
            batch = self._shared_prompt_packed(windows, kept_prompt)
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

    def _shared_prompt_packed(self, windows: list[list[int]], kept_prompt: np.ndarray) -> dict[str, torch.Tensor]:
        """One packed row whose samples with the same kept prompt share it (see `share_prompt` in the class docs)."""
        groups = {}
        for i, (window, prompt_length) in enumerate(zip(windows, kept_prompt, strict=True)):
            # A sample left without prompt tokens by keep_end truncation shares nothing
            key = tuple(window[:prompt_length]) if prompt_length else ("alone", i)
            groups.setdefault(key, []).append(i)
        input_ids, position_ids, scored, sample_index, key_index = [], [], [], [], []
        query_lengths, key_lengths = [], []
        for members in groups.values():
            shared = max(int(kept_prompt[members[0]]) - 1, 0)  # the prompt but its last token
            shared_keys = list(range(len(input_ids), len(input_ids) + shared))
            if shared:
                input_ids += windows[members[0]][:shared]
                position_ids += range(shared)
                scored += [0] * shared
                sample_index += [members[0]] * shared
                key_index += shared_keys
                query_lengths.append(shared)
                key_lengths.append(shared)
            for i in members:
                segment = windows[i][shared:]
                key_index += shared_keys + list(range(len(input_ids), len(input_ids) + len(segment)))
                input_ids += segment
                positions = range(shared, shared + len(segment))
                position_ids += positions
                # A completion token is scored, but never the row's first (nothing predicts it), as TRL's packing does
                scored += [int(0 < t and t >= kept_prompt[i]) for t in positions]
                sample_index += [i] * len(segment)
                query_lengths.append(len(segment))
                key_lengths.append(shared + len(segment))
        length = len(input_ids)
        width = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of if self.pad_to_multiple_of else length
        # The padding tail as TRL's padding-free collator makes it: one-token segments at position 0, never scored
        tail = width - length
        input_ids += [self.pad_token_id] * tail
        position_ids += [0] * tail
        scored += [0] * tail
        sample_index += [len(windows) - 1] * tail
        key_index += range(length, width)
        query_lengths += [1] * tail
        key_lengths += [1] * tail

        def row(values):
            return torch.tensor([values], dtype=torch.long)

        def boundaries(lengths):
            return torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int32)

        return {
            "input_ids": row(input_ids),
            "position_ids": row(position_ids),
            "cu_seq_lens_q": boundaries(query_lengths),
            "cu_seq_lens_k": boundaries(key_lengths),
            "max_length_q": max(query_lengths),
            "max_length_k": max(key_lengths),
            "segment_key_index": torch.tensor(key_index, dtype=torch.long),
            "completion_mask": row(scored),
            "sample_lengths": torch.tensor([len(window) for window in windows]),
            "sample_index": row(sample_index),
        }

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
