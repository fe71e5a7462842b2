"""
The `generate` path samples the reference model's distribution: frequencies of thousands of short completions against
their exact probabilities (softmax of logits / T after top-k / top-p), by a chi-square test. QRPO's quantiles are uniform
only if the reference completions are samples of the reference model. (vLLM's path: tests/test_vllm_engine.py.)
"""

import pytest
from sampling_checks import SETTINGS, build_peaked_llama, check_sampler_distribution

from qrpo_trl.reference_stage import generate_completions


@pytest.fixture(scope="module")
def peaked_model(tokenizer):
    return build_peaked_llama(tokenizer)


@pytest.mark.parametrize("name", SETTINGS)
def test_generate_samples_the_reference_distribution(peaked_model, tokenizer, name):
    def sample(prompt_ids, seeds, args):
        return generate_completions(peaked_model, tokenizer, prompt_ids, seeds, args)

    check_sampler_distribution(sample, peaked_model, tokenizer, name)
