"""
The `generate` path samples the reference model's distribution: frequencies of thousands of short completions against
their exact probabilities (softmax of logits / T after top-k / top-p), by a chi-square test. QRPO's quantiles are uniform
only if the reference completions are samples of the reference model. (vLLM's path: tests/test_vllm_engine.py.)
"""

import pytest
from sampling_checks import build_peaked_llama, check_completion_ends, chi_square_p_value, completion_probabilities

from qrpo_trl import ReferenceConfig
from qrpo_trl.reference_stage import generate_completions
from qrpo_trl.reference_stage.sampling import completion_seeds, eos_token_ids


PROMPTS = ["what is the sky", "hello", "tell me about the sea"]
SAMPLES_PER_PROMPT = 2000
# (temperature, top_k, top_p) sampled, and those of the exact probabilities they are tested against
SETTINGS = {
    "T=1": ((1.0, 0, 1.0), (1.0, 0, 1.0)),
    "T=0.7, top-k 5": ((0.7, 5, 1.0), (0.7, 5, 1.0)),
    "top-p 0.8": ((1.0, 0, 0.8), (1.0, 0, 0.8)),
    # The negative case: samples at T=1 tested against T=0.7 must be rejected, or the test could not fail
    "wrong temperature": ((1.0, 5, 1.0), (0.7, 5, 1.0)),
}


@pytest.fixture(scope="module")
def peaked_model(tokenizer):
    return build_peaked_llama(tokenizer)


def sample_and_test(sample, model, tokenizer, settings, expected_settings):
    """p-value of the chi-square test of `sample(prompt_ids, seeds, args)`'s completions of at most 2 tokens."""
    temperature, top_k, top_p = settings
    args = ReferenceConfig(
        max_completion_length=2, temperature=temperature, top_k=top_k, top_p=top_p, generation_batch_size=1000
    )
    eos_ids = eos_token_ids(model, tokenizer)
    prompt_ids = [tokenizer(prompt)["input_ids"] for prompt in PROMPTS]
    unit_prompt_ids = [ids for ids in prompt_ids for _ in range(SAMPLES_PER_PROMPT)]
    seeds = [seed for ids in prompt_ids for seed in completion_seeds(args.seed, ids, SAMPLES_PER_PROMPT)]
    completions = sample(unit_prompt_ids, seeds, args)
    check_completion_ends(completions, eos_ids, args.max_completion_length)
    samples = {
        prompt: [tuple(ids) for ids in completions[i * SAMPLES_PER_PROMPT : (i + 1) * SAMPLES_PER_PROMPT]]
        for i, prompt in enumerate(PROMPTS)
    }
    expected = {
        prompt: completion_probabilities(model, ids, eos_ids, *expected_settings)
        for prompt, ids in zip(PROMPTS, prompt_ids, strict=True)
    }
    return chi_square_p_value(samples, expected)


@pytest.mark.parametrize("name", SETTINGS)
def test_generate_samples_the_reference_distribution(peaked_model, tokenizer, name):
    settings, expected_settings = SETTINGS[name]

    def sample(prompt_ids, seeds, args):
        return generate_completions(peaked_model, tokenizer, prompt_ids, seeds, args)

    p_value = sample_and_test(sample, peaked_model, tokenizer, settings, expected_settings)
    if settings == expected_settings:
        assert p_value > 1e-3, p_value
    else:
        assert p_value < 1e-6, p_value
