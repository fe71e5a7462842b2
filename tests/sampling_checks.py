"""
Checks shared by the samplers' tests (`generate` and vLLM): a tiny model with a peaked next-token distribution, the
exact probabilities of its short completions, a chi-square test of sampled frequencies against them, and what a
completion's end must look like.
"""

import math
from collections import Counter

import numpy as np
import torch
from conftest import tiny_decoder_settings
from scipy import stats
from transformers import LlamaConfig, LlamaForCausalLM

from qrpo_trl import ReferenceConfig
from qrpo_trl.reference_stage.sampling import completion_seeds, eos_token_ids


def build_peaked_llama(tokenizer, seed: int = 0) -> LlamaForCausalLM:
    """
    A tiny Llama that vLLM's CPU attention accepts (head_dim 64) whose next-token distributions are peaked: a few tokens
    carry most of the mass (large LM-head weights), EOS among them, so that thousands of samples test them precisely.
    """
    settings = {**tiny_decoder_settings(tokenizer), "num_attention_heads": 4, "num_key_value_heads": 4}
    config = LlamaConfig(hidden_size=256, intermediate_size=512, **settings)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 0.15)
        # EOS about as likely as the most likely token on average (not exactly: no ties): completions often end early
        probs = model(input_ids=torch.randint(len(tokenizer), (8, 6))).logits.softmax(-1).mean(dim=(0, 1))
        model.lm_head.weight[tokenizer.eos_token_id] = 0.97 * model.lm_head.weight[probs.argmax()]
    return model


def save_peaked_llama(path, tokenizer) -> str:
    """[`build_peaked_llama`] saved with its tokenizer at `path` (vLLM loads models by path)."""
    build_peaked_llama(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def filtered_probabilities(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """softmax(logits / T), then only the `top_k` most likely tokens, then the smallest set of mass >= `top_p`."""
    probs = (logits.double() / temperature).softmax(-1)
    if top_k > 0:
        kept = torch.zeros_like(probs, dtype=torch.bool)
        kept[probs.topk(top_k).indices] = True
        probs = torch.where(kept, probs, 0.0)
        probs = probs / probs.sum()
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        mass_before = sorted_probs.cumsum(-1) - sorted_probs
        # A token within 1e-6 of the threshold would make the test depend on rounding: choose settings away from it
        assert not ((mass_before - top_p).abs() < 1e-6).any()
        kept = torch.zeros_like(probs, dtype=torch.bool)
        kept[order[mass_before < top_p]] = True
        probs = torch.where(kept, probs, 0.0)
        probs = probs / probs.sum()
    return probs


@torch.no_grad()
def completion_probabilities(model, prompt_ids, eos_ids, temperature, top_k, top_p) -> dict[tuple, float]:
    """
    The exact probability of every completion of at most 2 tokens (ending early at an EOS token) that sampling with
    these settings can give, from forward passes of `model`.
    """
    def next_token(prefixes):
        logits = model(input_ids=torch.tensor(prefixes)).logits[:, -1]
        return [filtered_probabilities(row, temperature, top_k, top_p) for row in logits]

    (first,) = next_token([list(prompt_ids)])
    firsts = [token for token in first.nonzero().flatten().tolist()]
    result = {(token,): first[token].item() for token in firsts if token in eos_ids}
    continued = [token for token in firsts if token not in eos_ids]
    for token, second in zip(continued, next_token([list(prompt_ids) + [token] for token in continued]), strict=True):
        for next_id in second.nonzero().flatten().tolist():
            result[(token, next_id)] = first[token].item() * second[next_id].item()
    assert math.isclose(sum(result.values()), 1.0, rel_tol=1e-9)
    return result


def chi_square_p_value(samples: dict, expected: dict) -> float:
    """
    p-value of a chi-square test of sampled completions against exact probabilities, per prompt (`samples[prompt]` the
    sampled completions as tuples, `expected[prompt]` their probabilities): one bin per completion expected >= 5 times,
    the rest pooled. A completion of probability 0 fails at once.
    """
    observed_bins, expected_bins = [], []
    for prompt, completions in samples.items():
        counts, probabilities = Counter(completions), expected[prompt]
        impossible = set(counts) - set(probabilities)
        assert not impossible, f"sampled completions of probability 0: {sorted(impossible)[:5]}"
        rest_observed, rest_expected = 0, 0.0
        for completion, probability in probabilities.items():
            if probability * len(completions) >= 5:
                observed_bins.append(counts[completion])
                expected_bins.append(probability * len(completions))
            else:
                rest_observed += counts[completion]
                rest_expected += probability * len(completions)
        observed_bins.append(rest_observed)
        expected_bins.append(rest_expected)
    observed, expected_counts = np.array(observed_bins, dtype=float), np.array(expected_bins)
    statistic = ((observed - expected_counts) ** 2 / np.maximum(expected_counts, 1e-12)).sum()
    assert len(observed) > 3 * len(samples), "too few bins: the distribution is not resolved"
    return float(stats.chi2.sf(statistic, df=len(observed) - len(samples)))


def check_completion_ends(completions: list[list[int]], eos_ids: list[int], max_completion_length: int) -> None:
    """Each completion ends at its first EOS token (included), or has `max_completion_length` tokens and no EOS."""
    for ids in completions:
        positions = [i for i, token in enumerate(ids) if token in eos_ids]
        if positions:
            assert positions == [len(ids) - 1], ids
        else:
            assert len(ids) == max_completion_length, ids


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


def check_sampler_distribution(sample, model, tokenizer, name: str) -> None:
    """
    The chi-square test of `sample(prompt_ids, seeds, args)`'s completions of at most 2 tokens, with the settings
    `SETTINGS[name]`: it passes (p > 1e-3) when the sampler is given the settings of the exact probabilities, and
    rejects (p < 1e-6) when it is given another temperature.
    """
    settings, expected_settings = SETTINGS[name]
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
    p_value = chi_square_p_value(samples, expected)
    if settings == expected_settings:
        assert p_value > 1e-3, p_value
    else:
        assert p_value < 1e-6, p_value
