"""
Per-sample attention for packed rows (`padding_free=True`) where flash attention's varlen path is not used.

For `sdpa` and `eager`, transformers confines attention in a packed row with a dense (row x row) mask built from
`position_ids`: one attention over the whole row, quadratic in its length and without sdpa's causal fast path. Here the
row is split at the sequence boundaries the collator passes (`cu_seq_lens_q`, as TRL's padding-free collator makes them
for the varlen kernels) and each sample runs its own causal attention, through the model's own attention function:
transformers' sdpa (GQA, scaling, dropout, its refusal of softcapping) or the model's eager one (softcapping, sinks).
Registered in transformers' `AttentionInterface` only, so that no mask is built for it (what transformers does for
custom attention without a mask function); `per_sample_attention` switches a model to it for the forwards it wraps.

Rows with shared prompts (the collator's `share_prompt`) also give each segment its keys (`segment_key_index`,
`cu_seq_lens_k`): a completion's queries attend to its prompt's keys and causally to its own (lower-right causal), in
sdpa and eager as above, and through flash attention's varlen kernel with the keys gathered into one packed key/value.
"""

import contextlib
import functools
import sys

import torch
from transformers import AttentionInterface
from transformers.integrations.flash_attention import flash_attention_forward
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_flash_attention_utils import flash_attn_supports_top_left_mask


PER_SAMPLE_IMPLEMENTATIONS = {"sdpa": "qrpo_trl_per_sample_sdpa", "eager": "qrpo_trl_per_sample_eager"}
# Flash attention keeps its own varlen path for packed rows; rows with shared prompts need their keys gathered first
SHARED_PROMPT_FLASH_IMPLEMENTATIONS = {
    "flash_attention_2": "qrpo_trl_shared_prompt_flash_attention_2",
    "flash_attention_3": "qrpo_trl_shared_prompt_flash_attention_3",
}


def _segment_mask(query_length: int, key_length: int, sliding_window: int | None, device: torch.device) -> torch.Tensor:
    """
    A segment's causal mask (True where attended), aligned lower-right: its queries are the last `query_length` of its
    `key_length` keys (a completion after its shared prompt), within `sliding_window` as transformers'
    `sliding_window_overlay`.
    """
    offsets = torch.arange(key_length - query_length, key_length, device=device)[:, None] - torch.arange(
        key_length, device=device
    )
    allowed = offsets >= 0
    if sliding_window is not None:
        allowed &= offsets < sliding_window
    return allowed[None, None]


def _per_sample_forward(
    attention, module, query, key, value, attention_mask, cu_seq_lens_q=None, cu_seq_lens_k=None,
    segment_key_index=None, **kwargs,
):
    """
    `attention` run on each packed segment of a (1, heads, row, dim) query/key/value; (1, row, heads, dim) out.

    Without shared prompts a segment attends causally to its own keys. With them (`segment_key_index`, from the
    collator's `share_prompt`), segment j's keys are `segment_key_index[cu_seq_lens_k[j]:cu_seq_lens_k[j + 1]]`: the
    positions of its shared prompt, if any, then its own; its queries are the last of them (lower-right causal).
    """
    if attention_mask is not None or cu_seq_lens_q is None or query.shape[0] != 1 or query.shape[2] != key.shape[2]:
        raise ValueError(
            "Per-sample attention runs on one packed row without cache or attention mask, split at `cu_seq_lens_q`; got "
            f"query {tuple(query.shape)}, key {tuple(key.shape)}, mask "
            f"{None if attention_mask is None else tuple(attention_mask.shape)}, cu_seq_lens_q {cu_seq_lens_q}."
        )
    sliding_window = kwargs.get("sliding_window")
    boundaries = cu_seq_lens_q.tolist()
    key_boundaries = boundaries if segment_key_index is None else cu_seq_lens_k.tolist()
    outputs = []
    for j, (start, end) in enumerate(zip(boundaries[:-1], boundaries[1:], strict=True)):
        query_length, key_length = end - start, key_boundaries[j + 1] - key_boundaries[j]
        if key_length == query_length:
            segment_key, segment_value = key[:, :, start:end], value[:, :, start:end]
        else:  # a completion after its shared prompt: the prompt's keys, then its own
            index = segment_key_index[key_boundaries[j] : key_boundaries[j + 1]]
            segment_key, segment_value = key.index_select(2, index), value.index_select(2, index)
        mask = None
        window_cuts = sliding_window is not None and key_length > sliding_window
        if attention is not sdpa_attention_forward or window_cuts or key_length != query_length:
            mask = _segment_mask(query_length, key_length, sliding_window, query.device)
            if attention is not sdpa_attention_forward:  # eager attention adds a float mask
                mask = torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill(
                    ~mask, torch.finfo(query.dtype).min
                )
        output, _ = attention(module, query[:, :, start:end], segment_key, segment_value, mask, **kwargs)
        outputs.append(output)
    return torch.cat(outputs, dim=1), None  # attention weights differ in shape per sample: not returned


def per_sample_sdpa_forward(module, query, key, value, attention_mask, **kwargs):
    """transformers' sdpa attention, causal within each packed sample (`is_causal`, no mask, unless sliding)."""
    return _per_sample_forward(sdpa_attention_forward, module, query, key, value, attention_mask, **kwargs)


def per_sample_eager_forward(module, query, key, value, attention_mask, **kwargs):
    """The model's eager attention (`eager_attention_forward` of its modeling module), with each sample's causal mask."""
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if eager is None:
        raise ValueError(
            f"{type(module).__name__} has no `eager_attention_forward` in its module: per-sample attention cannot run "
            "its eager attention. Set `padding_free=False`."
        )
    return _per_sample_forward(eager, module, query, key, value, attention_mask, **kwargs)


def _shared_prompt_flash_forward(
    implementation, module, query, key, value, attention_mask, cu_seq_lens_k=None, segment_key_index=None, **kwargs
):
    """
    Flash attention's varlen kernel over a packed row with shared prompts: each segment's keys (its shared prompt's,
    then its own, `segment_key_index`) gathered into one packed key/value, bounded by `cu_seq_lens_k` while the queries
    stay bounded by `cu_seq_lens_q`; flash attention (>= 2.1) aligns a causal mask lower-right when a segment has more
    keys than queries, which is what a completion after its prompt needs. Run in this project's tests with a stand-in
    kernel only (no GPU).
    """
    if flash_attn_supports_top_left_mask():
        raise ValueError(
            "`share_prompt=True` needs flash attention >= 2.1, whose causal mask is aligned lower-right when a segment "
            "has more keys than queries; the installed flash-attn aligns it top-left. Upgrade flash-attn or use sdpa."
        )
    if attention_mask is not None or segment_key_index is None:
        raise ValueError("Shared-prompt flash attention runs on one packed row with `segment_key_index`, no mask.")
    key, value = key.index_select(2, segment_key_index), value.index_select(2, segment_key_index)
    # transformers' flash path loads its kernels by the config's implementation name: the flash one for this call
    config = module.config
    switched = config._attn_implementation_internal
    config._attn_implementation_internal = implementation
    try:
        return flash_attention_forward(module, query, key, value, None, cu_seq_lens_k=cu_seq_lens_k, **kwargs)
    finally:
        config._attn_implementation_internal = switched


AttentionInterface.register(PER_SAMPLE_IMPLEMENTATIONS["sdpa"], per_sample_sdpa_forward)
AttentionInterface.register(PER_SAMPLE_IMPLEMENTATIONS["eager"], per_sample_eager_forward)
for _flash, _name in SHARED_PROMPT_FLASH_IMPLEMENTATIONS.items():
    AttentionInterface.register(_name, functools.partial(_shared_prompt_flash_forward, _flash))


def _configs(config):
    yield config
    for key in config.sub_configs:
        if (sub_config := getattr(config, key, None)) is not None:
            yield from _configs(sub_config)


@contextlib.contextmanager
def per_sample_attention(model: torch.nn.Module, shared_prompts: bool = False):
    """
    Run the forwards (and the backward, whose activation checkpointing re-runs them) of the unwrapped `model` inside
    the block with per-sample attention, where its implementation is `sdpa` or `eager`; flash attention keeps its
    varlen path, unless the rows share prompts (`shared_prompts`, the collator's `share_prompt`): then it gathers each
    segment's keys first. Other implementations keep their own. The config is restored on exit. Re-entrant.
    """
    implementations = {**PER_SAMPLE_IMPLEMENTATIONS, **(SHARED_PROMPT_FLASH_IMPLEMENTATIONS if shared_prompts else {})}
    switched = [
        (config, config._attn_implementation_internal)
        for config in _configs(model.config)
        if config._attn_implementation_internal in implementations
    ]
    # Set on each config itself: the property's setter would also overwrite sub-configs with other implementations
    for config, implementation in switched:
        config._attn_implementation_internal = implementations[implementation]
    try:
        yield
    finally:
        for config, implementation in switched:
            config._attn_implementation_internal = implementation
