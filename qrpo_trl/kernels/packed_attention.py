"""
Per-sample attention for packed rows (`padding_free=True`) where flash attention's varlen path is not used.

For `sdpa` and `eager`, transformers confines attention in a packed row with a dense (row x row) mask built from
`position_ids`: one attention over the whole row, quadratic in its length and without sdpa's causal fast path. Here the
row is split at the sequence boundaries the collator passes (`cu_seq_lens_q`, as TRL's padding-free collator makes them
for the varlen kernels) and each sample runs its own causal attention, through the model's own attention function:
transformers' sdpa (GQA, scaling, dropout, its refusal of softcapping) or the model's eager one (softcapping, sinks).
Registered in transformers' `AttentionInterface` only, so that no mask is built for it (what transformers does for
custom attention without a mask function); `per_sample_attention` switches a model to it for the forwards it wraps.
"""

import contextlib
import sys

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward


PER_SAMPLE_IMPLEMENTATIONS = {"sdpa": "qrpo_trl_per_sample_sdpa", "eager": "qrpo_trl_per_sample_eager"}


def _segment_mask(length: int, sliding_window: int | None, device: torch.device) -> torch.Tensor:
    """A sample's causal mask (True where attended), within `sliding_window` as transformers' `sliding_window_overlay`."""
    positions = torch.arange(length, device=device)
    offsets = positions[:, None] - positions[None, :]
    allowed = offsets >= 0
    if sliding_window is not None:
        allowed &= offsets < sliding_window
    return allowed[None, None]


def _per_sample_forward(attention, module, query, key, value, attention_mask, cu_seq_lens_q=None, **kwargs):
    """`attention` run on each packed sample of a (1, heads, row, dim) query/key/value; (1, row, heads, dim) out."""
    if attention_mask is not None or cu_seq_lens_q is None or query.shape[0] != 1 or query.shape[2] != key.shape[2]:
        raise ValueError(
            "Per-sample attention runs on one packed row without cache or attention mask, split at `cu_seq_lens_q`; got "
            f"query {tuple(query.shape)}, key {tuple(key.shape)}, mask "
            f"{None if attention_mask is None else tuple(attention_mask.shape)}, cu_seq_lens_q {cu_seq_lens_q}."
        )
    sliding_window = kwargs.get("sliding_window")
    boundaries = cu_seq_lens_q.tolist()
    outputs = []
    for start, end in zip(boundaries[:-1], boundaries[1:], strict=True):
        length = end - start
        mask = None
        if attention is not sdpa_attention_forward or (sliding_window is not None and length > sliding_window):
            mask = _segment_mask(length, sliding_window, query.device)
            if attention is not sdpa_attention_forward:  # eager attention adds a float mask
                mask = torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill(
                    ~mask, torch.finfo(query.dtype).min
                )
        segment = slice(start, end)
        output, _ = attention(module, query[:, :, segment], key[:, :, segment], value[:, :, segment], mask, **kwargs)
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


AttentionInterface.register(PER_SAMPLE_IMPLEMENTATIONS["sdpa"], per_sample_sdpa_forward)
AttentionInterface.register(PER_SAMPLE_IMPLEMENTATIONS["eager"], per_sample_eager_forward)


def _configs(config):
    yield config
    for key in config.sub_configs:
        if (sub_config := getattr(config, key, None)) is not None:
            yield from _configs(sub_config)


@contextlib.contextmanager
def per_sample_attention(model: torch.nn.Module):
    """
    Run the forwards (and the backward, whose activation checkpointing re-runs them) of the unwrapped `model` inside
    the block with per-sample attention, where its implementation is `sdpa` or `eager`; flash attention keeps its
    varlen path, other implementations their own. The config is restored on exit. Re-entrant.
    """
    switched = [
        (config, config._attn_implementation_internal)
        for config in _configs(model.config)
        if config._attn_implementation_internal in PER_SAMPLE_IMPLEMENTATIONS
    ]
    # Set on each config itself: the property's setter would also overwrite sub-configs with other implementations
    for config, implementation in switched:
        config._attn_implementation_internal = PER_SAMPLE_IMPLEMENTATIONS[implementation]
    try:
        yield
    finally:
        for config, implementation in switched:
            config._attn_implementation_internal = implementation
