"""
vLLM's sampler on its own, one engine shared by the module's tests (start-up dominates): it samples the reference
model's distribution, ends completions as the `generate` path does, and draws each completion from its seed alone.
The stage with vLLM: tests/test_vllm_stage.py. Run by `make test-vllm`.
"""

from importlib.util import find_spec

import pytest
from sampling_checks import SETTINGS, check_completion_ends, check_sampler_distribution, save_peaked_llama
from transformers import AutoModelForCausalLM

from qrpo_trl import ReferenceConfig
from qrpo_trl.reference_stage import generate_completions
from qrpo_trl.reference_stage.sampling import completion_seeds, eos_token_ids
from qrpo_trl.reference_stage.vllm_sampling import VLLMSampler


pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(find_spec("vllm") is None, reason="vLLM is not installed (`make test-vllm` installs it)"),
]

# A small share of the memory (on CPU the KV cache is fixed instead: see conftest.py), and no compilation: a quick start
ENGINE = dict(vllm_gpu_memory_utilization=0.1, vllm_enforce_eager=True)
PROMPTS = ["what is the sky", "hello", "tell me about the sea", "what is one two"]


@pytest.fixture(scope="module")
def peaked_model(tmp_path_factory, tokenizer):
    return AutoModelForCausalLM.from_pretrained(save_peaked_llama(tmp_path_factory.mktemp("peaked"), tokenizer))


@pytest.fixture(scope="module")
def engine(peaked_model):
    with VLLMSampler(peaked_model, ReferenceConfig(**ENGINE)).running() as sampler:
        yield sampler


@pytest.mark.parametrize("name", SETTINGS)
def test_vllm_samples_the_reference_distribution(engine, peaked_model, tokenizer, name):
    eos_ids = eos_token_ids(peaked_model, tokenizer)

    def sample(prompt_ids, seeds, args):
        return engine.generate(prompt_ids, seeds, eos_ids, args)

    check_sampler_distribution(sample, peaked_model, tokenizer, name)


def seeded_prompts(tokenizer, num_per_prompt, seed=42):
    prompt_ids = [tokenizer(prompt)["input_ids"] for prompt in PROMPTS]
    seeds = [s for ids in prompt_ids for s in completion_seeds(seed, ids, num_per_prompt)]
    return [ids for ids in prompt_ids for _ in range(num_per_prompt)], seeds


def test_completions_end_as_on_the_generate_path(engine, peaked_model, tokenizer):
    """At the first EOS token (included), else after `max_completion_length` tokens: both happen, on both paths."""
    args = ReferenceConfig(max_completion_length=5, **ENGINE)
    eos_ids = eos_token_ids(peaked_model, tokenizer)
    prompt_ids, seeds = seeded_prompts(tokenizer, 50)
    for completions in (
        engine.generate(prompt_ids, seeds, eos_ids, args),
        generate_completions(peaked_model, tokenizer, prompt_ids, seeds, args),
    ):
        check_completion_ends(completions, eos_ids, args.max_completion_length)
        lengths = [len(ids) for ids in completions]
        assert min(lengths) < 5 and lengths.count(5) > 10 and any(ids[-1] in eos_ids for ids in completions)


def test_same_seeds_same_completions_whatever_the_batch(engine, peaked_model, tokenizer):
    args = ReferenceConfig(max_completion_length=6, **ENGINE)
    eos_ids = eos_token_ids(peaked_model, tokenizer)
    prompt_ids, seeds = seeded_prompts(tokenizer, 5)
    together = engine.generate(prompt_ids, seeds, eos_ids, args)
    assert len({tuple(ids) for ids in together}) > 10
    reversed_ = engine.generate(prompt_ids[::-1], seeds[::-1], eos_ids, args)
    assert reversed_[::-1] == together
    alone = [engine.generate([prompt_ids[i]], [seeds[i]], eos_ids, args)[0] for i in (0, 7, 19)]
    assert alone == [together[i] for i in (0, 7, 19)]
    _, other_seeds = seeded_prompts(tokenizer, 5, seed=43)
    assert engine.generate(prompt_ids, other_seeds, eos_ids, args) != together


def test_a_batch_beyond_the_engine_token_budget(engine, peaked_model, tokenizer):
    """
    Hundreds of long prompts, more tokens than vLLM processes in a step: on CPU, a prompt split over steps would fail in
    vLLM 0.32 ("CPU Generator does not use offset"), so each is processed whole; the seeds still decide alone.
    """
    args = ReferenceConfig(max_completion_length=4, **ENGINE)
    eos_ids = eos_token_ids(peaked_model, tokenizer)
    long_prompt = tokenizer(" ".join(["tell me about the sea and the sky"] * 12))["input_ids"]
    prompt_ids = [long_prompt[: 60 + i % 30] for i in range(400)]
    seeds = list(range(400))
    together = engine.generate(prompt_ids, seeds, eos_ids, args)
    assert [engine.generate([prompt_ids[i]], [seeds[i]], eos_ids, args)[0] for i in (0, 211, 399)] == [
        together[i] for i in (0, 211, 399)
    ]
