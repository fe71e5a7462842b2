"""
Sampling from the reference model: each completion from its own random stream (seeded by the seed, the prompt's token
ids and the completion's index), with `model.generate` (vLLM's counterpart is in `vllm_sampling.py`).
"""

import hashlib
import inspect
from collections.abc import Callable

import numpy as np
import torch
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from trl.trainer.utils import pad

from ..reference_config import ReferenceStageFields
from ..utils import eval_mode


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
    return completion_seeds(seed, prompt_ids, index + 1)[index]


def completion_seeds(seed: int, prompt_ids: list[int], num_completions: int) -> list[int]:
    """The seeds of a prompt's first `num_completions` completions (its ids are formatted once, not once each)."""
    ids = str([int(token) for token in prompt_ids])  # the text of a list of Python ints, whatever the input
    return [
        int.from_bytes(hashlib.blake2b(f"{seed}:{index}:{ids}".encode(), digest_size=8).digest(), "little") >> 1
        for index in range(num_completions)
    ]


def eos_token_ids(model, processing_class) -> list[int]:
    eos = model.generation_config.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    return sorted({*eos, processing_class.eos_token_id} - {None})


def generate_completions(
    model, processing_class, prompt_ids: list[list[int]], seeds: list[int], args: ReferenceStageFields,
    progress: Callable[[int, int], None] = lambda completions, tokens: None,
) -> list[list[int]]:
    """
    Sample one completion per (prompt, seed) with `model.generate`, each from its own seed (see
    [`PerSequenceSampler`]): the completions of one prompt share its prefill. Prompts are sorted by length (less
    padding) and batched with their completions, `args.generation_batch_size` completions per batch; each distinct
    prompt of a batch is computed once (a decoder-only model's key/value cache, an encoder-decoder model's encoder
    output) and copied for each of its completions. A decoder-only model's prompts are padded on the left and
    continued; an encoder-decoder model's are its encoder inputs, padded on the right, and the completion is what its
    decoder generates after the decoder start token. Returns the completion token ids, up to and including the first
    EOS token; they do not depend on the batching.
    """
    completions = generate_completion_arrays(model, processing_class, prompt_ids, seeds, args, progress)
    return [ids.tolist() for ids in completions]


def generate_completion_arrays(
    model, processing_class, prompt_ids: list[list[int]], seeds: list[int], args: ReferenceStageFields,
    progress: Callable[[int, int], None] = lambda completions, tokens: None,
) -> list[np.ndarray]:
    """[`generate_completions`], each completion's ids as a NumPy array (no Python object per token)."""
    with eval_mode(model):
        return _generate_completion_arrays(model, processing_class, prompt_ids, seeds, args, progress)


@torch.no_grad()
def _generate_completion_arrays(model, processing_class, prompt_ids, seeds, args, progress) -> list[np.ndarray]:
    is_encoder_decoder = model.config.is_encoder_decoder
    padding_side = "right" if is_encoder_decoder else "left"
    eos_ids = eos_token_ids(model, processing_class)
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
    for batch in _shared_prompt_batches(prompt_ids, args.generation_batch_size):
        units = [i for shared in batch for i in shared]
        input_ids, attention_mask = _padded(
            [prompt_ids[shared[0]] for shared in batch], processing_class.pad_token_id, padding_side
        )
        input_ids, attention_mask = input_ids.to(model.device), attention_mask.to(model.device)
        # Row of each completion's prompt: a prompt's completions are consecutive
        rows = torch.repeat_interleave(torch.tensor([len(shared) for shared in batch], device=model.device))
        sequences = model.generate(
            input_ids=input_ids[rows],
            attention_mask=attention_mask[rows],
            generation_config=generation_config,
            logits_processor=LogitsProcessorList([*warpers, PerSequenceSampler([seeds[i] for i in units])]),
            **_computed_prompts(model, input_ids, attention_mask, rows),
        )
        # The decoder's output starts with its start token; a decoder-only model's with the (padded) prompt
        generated = sequences[:, 1 if is_encoder_decoder else input_ids.shape[1] :]
        is_eos = torch.isin(generated, torch.tensor(eos_ids, dtype=generated.dtype, device=generated.device))
        lengths = torch.where(is_eos.any(dim=1), is_eos.int().argmax(dim=1) + 1, generated.shape[1]).tolist()
        for i, ids, length in zip(units, generated.cpu().numpy(), lengths, strict=True):
            completions[i] = ids[:length]
        progress(len(units), sum(lengths))
    return completions


def _shared_prompt_batches(prompt_ids: list[list[int]], batch_size: int):
    """
    Batches of `batch_size` completions (indices into `prompt_ids`; the last batch may be smaller), each a list of
    runs of completions of one prompt: distinct prompts longest first, a prompt's completions together. A prompt whose
    completions do not fit in what is left of a batch continues in the next one.
    """
    completions_of = {}
    for i, ids in enumerate(prompt_ids):
        completions_of.setdefault(tuple(ids), []).append(i)
    batch, size = [], 0
    for units in sorted(completions_of.values(), key=lambda units: -len(prompt_ids[units[0]])):
        while units:
            room = batch_size - size
            batch.append(units[:room])
            size, units = size + len(batch[-1]), units[room:]
            if size == batch_size:
                yield batch
                batch, size = [], 0
    if batch:
        yield batch


def _computed_prompts(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, rows: torch.Tensor) -> dict:
    """
    `generate`'s keyword arguments that hand it each prompt computed once, copied to the rows of its completions: an
    encoder-decoder model's encoder output; a decoder-only model's key/value cache of all its tokens but the last
    (`generate` runs the uncached last token, whose logits draw the first completion token).
    """
    if model.config.is_encoder_decoder:
        encoder_outputs = model.get_encoder()(input_ids=input_ids, attention_mask=attention_mask, return_dict=True)
        encoder_outputs.last_hidden_state = encoder_outputs.last_hidden_state[rows]
        return {"encoder_outputs": encoder_outputs}
    if input_ids.shape[1] == 1:
        return {}  # nothing before the last token
    prefix_mask = attention_mask[:, :-1]
    # The positions `generate` gives a left-padded prompt: count of the tokens before, 0 on the padding
    position_ids = (prefix_mask.cumsum(-1) - 1).clamp(min=0)
    # The decoder stack alone: the prompt's logits are not needed (its last token's are `generate`'s first step)
    decoder = model.get_decoder()
    # transformers renamed `past_key_values` to `cache` (in forward, its outputs and `generate`) in 5.2x; vLLM's CPU
    # build pins an older release
    key = "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"
    cache = decoder(
        input_ids=input_ids[:, :-1], attention_mask=prefix_mask, position_ids=position_ids, use_cache=True
    )[key]
    cache.batch_select_indices(rows)
    return {key: cache}


def _padded(sequences: list[list[int]], pad_token_id: int, padding_side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Input ids and attention mask of token sequences padded to the longest, by TRL's `pad`."""
    input_ids = pad([torch.tensor(ids, dtype=torch.int64) for ids in sequences], pad_token_id, padding_side)
    attention_mask = pad([torch.ones(len(ids), dtype=torch.int64) for ids in sequences], 0, padding_side)
    return input_ids, attention_mask

