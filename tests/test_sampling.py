"""
The `generate` path of the reference stage computes each distinct prompt once and copies it for its completions: the
completions are the same, token for token, as sampling each completion on its own, whatever the batching.
"""

import pytest
import torch
from conftest import build_t5_tokenizer, build_tiny_llama, build_tiny_t5, build_tokenizer
from transformers import (
    GenerationConfig,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from qrpo_trl import ReferenceConfig
from qrpo_trl.reference_stage import PerSequenceSampler, completion_seed, generate_completions


PROMPTS = [
    "", "hi", "what is the sky", "tell me about the sea please", "hello", "tell me about the grass one two three"
]
SAMPLING = {
    "T=1": dict(temperature=1.0),
    "T=0.7,top-k,top-p": dict(temperature=0.7, top_k=20, top_p=0.9),
}


@torch.no_grad()
def one_completion_at_a_time(model, tokenizer, prompt_ids, seeds, args) -> list[list[int]]:
    """Each completion from its own `generate` call on its unpadded prompt (the prompt computed once per completion)."""
    warpers = [TemperatureLogitsWarper(args.temperature)] if args.temperature != 1.0 else []
    warpers += [TopKLogitsWarper(args.top_k)] if args.top_k > 0 else []
    warpers += [TopPLogitsWarper(args.top_p)] if args.top_p < 1.0 else []
    config = GenerationConfig(
        max_new_tokens=args.max_completion_length, do_sample=False, num_beams=1, repetition_penalty=1.0,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    completions = []
    for ids, seed in zip(prompt_ids, seeds, strict=True):
        sequence = model.generate(
            input_ids=torch.tensor([ids]), generation_config=config,
            logits_processor=LogitsProcessorList([*warpers, PerSequenceSampler([seed])]),
        )[0].tolist()
        generated = sequence[1:] if model.config.is_encoder_decoder else sequence[len(ids) :]
        end = generated.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in generated else len(generated)
        completions.append(generated[:end])
    return completions


def tiny_model(kind):
    """A tiny model in eval mode whose EOS is about as likely as any token, so that completions end at both limits."""
    if kind == "llama":
        tokenizer = build_tokenizer()
        model = build_tiny_llama(tokenizer, hidden_size=32).eval()
    else:
        tokenizer = build_t5_tokenizer()
        model = build_tiny_t5(tokenizer).eval()
    with torch.no_grad():
        model.lm_head.weight[tokenizer.eos_token_id] *= 3
    return model, tokenizer


class PromptRows:
    """The prompt rows the model computes: encoder rows, or the rows of decoder calls that start without a cache."""

    def __init__(self, model):
        self.rows = 0
        module = model.get_encoder() if model.config.is_encoder_decoder else model.get_decoder()
        forward = module.forward

        def counted(*args, **kwargs):
            # `past_key_values` in the transformers releases before the rename (vLLM's CPU build pins one)
            if model.config.is_encoder_decoder or kwargs.get("cache", kwargs.get("past_key_values")) is None:
                self.rows += kwargs["input_ids"].shape[0]
            return forward(*args, **kwargs)

        module.forward = counted


@pytest.mark.parametrize("kind", ["llama", "t5"])
@pytest.mark.parametrize("sampling", SAMPLING, ids=list(SAMPLING))
def test_completions_are_those_of_sampling_each_alone(kind, sampling):
    model, tokenizer = tiny_model(kind)
    num_generations = 4
    distinct = tokenizer(text=PROMPTS)["input_ids"]
    prompt_ids = [ids for ids in distinct for _ in range(num_generations)]
    seeds = [completion_seed(0, ids, index % num_generations) for index, ids in enumerate(prompt_ids)]
    args = ReferenceConfig(max_completion_length=8, **SAMPLING[sampling])
    expected = one_completion_at_a_time(model, tokenizer, prompt_ids, seeds, args)
    assert len({tuple(ids) for ids in expected}) > len(PROMPTS)  # completions of a prompt differ
    ends = {ids[-1] == tokenizer.eos_token_id for ids in expected}
    assert ends == {True, False}  # some end with EOS, some at the length limit

    # Batches of one completion, of a prompt's completions split over batches, of several prompts, of all of them
    for batch_size in (1, 3, 8, 64):
        counter = PromptRows(model)
        args.generation_batch_size = batch_size
        assert generate_completions(model, tokenizer, prompt_ids, seeds, args) == expected, batch_size
        # Each prompt computed once, plus at most once more for each batch it continues into (a decoder-only model's
        # one-token prompt, alone in its batch, has nothing to compute before its last token)
        num_batches = -(-len(prompt_ids) // batch_size)
        computed = [ids for ids in distinct if model.config.is_encoder_decoder or len(ids) > 1]
        assert len(computed) <= counter.rows <= len(PROMPTS) + num_batches - 1, batch_size
        if batch_size == 64:
            assert counter.rows == len(PROMPTS)
    # The completions of a prompt given in any order, mixed with the other prompts' (the order of the results follows)
    order = list(range(len(prompt_ids)))[::-1]
    mixed = generate_completions(model, tokenizer, [prompt_ids[i] for i in order], [seeds[i] for i in order], args)
    assert mixed == [expected[i] for i in order]
