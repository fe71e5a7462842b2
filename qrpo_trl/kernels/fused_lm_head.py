"""
A patch of TRL's fused LM head for the pointwise trainers' forwards.

TRL's fused LM head (`fused_lm_head=True`) scores the labels without building the full logits. Off Triton devices it
projects every position (prompt and padding included) to keep tile shapes fixed for XLA compilers, and scores through
an autograd function even without gradients. `compact_fused_lm_head` makes it project only the scored positions
everywhere but on XLA, and score an inference pass (the reference log-probs) with one fused log-softmax per chunk:
the same values, at a fraction of the cost on CPU.
"""

import contextlib

import torch
from trl.kernels import ChunkedLogProbFunction
from trl.kernels.chunked_logprob import TOKEN_CHUNK_SIZE
from trl.kernels.chunked_logprob import _use_triton as trl_use_triton
from trl.trainer import utils as trl_utils


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
