"""
Held-out evaluation of a policy against its reference model: rewards of sampled completions, a paired confidence
interval over prompts, the win rate, the KL to the reference scored on the sampled token ids, and the completion
lengths.

The reference and the policy sample with the same per-completion seeds (the reference stage's seed of the seed, the
prompt and the completion's index): where the policy has not moved, it draws the same completion as the reference,
so the paired difference carries less sampling noise.
"""

import contextlib

import numpy as np
import torch
from datasets import Dataset
from accelerate.utils import tqdm
from scipy import stats

from ..kernels import per_sample_attention
from ..pointwise_collator import DataCollatorForPointwise, model_inputs
from ..prompt_grouping import grouped_by_length
from ..reference_config import ReferenceConfig
from ..reference_stage import completion_seed, generate_completions
from ..reference_stage.decoding import decode_texts
from ..tokenization import tokenize_prompts
from ..utils import eval_mode
from .task import WORD, Rules, completion_text, constraint_reward, gate


def group_by_prompt(values, num_prompts: int) -> np.ndarray:
    """Values of a dataset expanded by the reference stage (each prompt's completions in a row) as (prompts, k)."""
    return np.asarray(values, dtype=np.float64).reshape(num_prompts, -1)


def paired_interval(differences: np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    """Student-t confidence interval of the mean of per-prompt paired differences."""
    half_width = stats.t.ppf(0.5 + confidence / 2, len(differences) - 1) * stats.sem(differences)
    mean = float(np.mean(differences))
    return float(mean - half_width), float(mean + half_width)


def win_rate(policy_rewards: np.ndarray, reference_rewards: np.ndarray) -> float:
    """
    Probability that a policy completion beats a reference completion of the same prompt, ties counted as half: over
    every (policy, reference) pair of completions of each prompt, averaged over prompts.
    """
    wins = policy_rewards[:, :, None] > reference_rewards[:, None, :]
    ties = policy_rewards[:, :, None] == reference_rewards[:, None, :]
    return float((wins + 0.5 * ties).mean())


def rule_scores(samples: Dataset) -> dict[str, float]:
    """Mean partial credit per rule, over the completions whose prompt has that rule, and the mean gate."""
    totals, counts = {}, {}
    for completion, rules in zip(samples["completion"], samples["rules"], strict=True):
        text = completion_text(completion)
        for name, score in {**Rules(**rules).scores(text), "gate": gate(text)}.items():
            totals[name] = totals.get(name, 0.0) + score
            counts[name] = counts.get(name, 0) + 1
    return {name: totals[name] / counts[name] for name in totals}


def sample_heldout(model, tokenizer, prompts: Dataset, num_generations: int, config, description: str) -> Dataset:
    """
    `num_generations` completions per prompt sampled from `model` (T=1, no top-k/top-p), scored by the task's reward:
    the prompt's columns, `completion` (conversational), the sampled `completion_ids` (EOS included when sampled) and
    `reward`, each prompt's completions in a row. Completion `i` of a prompt is drawn with the reference stage's seed
    for (seed, prompt, i), whatever the model, which pairs the policy's samples with the reference's.
    """
    prompt_ids = tokenize_prompts(tokenizer, prompts["prompt"], False, [{} for _ in range(len(prompts))])
    units = [(ids, completion_seed(config.seed, ids, index)) for ids in prompt_ids for index in range(num_generations)]
    args = ReferenceConfig(
        max_completion_length=config.max_completion_length, generation_batch_size=config.generation_batch_size
    )
    with tqdm(total=len(units), desc=description, unit="completion") as bar:
        completion_ids = generate_completions(
            model, tokenizer, [ids for ids, _ in units], [seed for _, seed in units], args,
            progress=lambda completions, tokens: bar.update(completions),
        )
    texts = decode_texts(tokenizer, completion_ids)
    samples = prompts.select([row for row in range(len(prompts)) for _ in range(num_generations)])
    samples = samples.add_column("prompt_ids", [ids for ids, _ in units])
    samples = samples.add_column("completion", [[{"role": "assistant", "content": text}] for text in texts])
    samples = samples.add_column("completion_ids", completion_ids)
    return samples.add_column("reward", constraint_reward(samples["completion"], samples["rules"]))


@torch.no_grad()
def kl_to_reference(
    model, samples: Dataset, pad_token_id: int, batch_size: int = 8, share_prompt: bool = True
) -> dict[str, np.ndarray]:
    """
    Per sample of the policy `model` (a PEFT model: the reference is the same model with its adapters disabled), from
    its sampled token ids (`prompt_ids`, `completion_ids`), never re-tokenised text:

    - `kl`: the sum over its completion tokens of the exact KL(pi_theta || pi_ref) of the next-token distributions at
      the sampled prefix. Its mean over samples of the policy is an unbiased estimate of the sequence-level KL, >= 0
      for every sample, and of lower variance than the log-ratio;
    - `log_ratio`: `log pi_theta(y|x) - log pi_ref(y|x)`, the plain Monte Carlo estimate of the same KL;
    - `num_tokens`: the completion's sampled tokens (its EOS included).

    With `share_prompt` (sdpa or eager attention), the samples of a batch that share a prompt (each prompt's samples
    are batched together) are packed after one copy of it (`DataCollatorForPointwise(share_prompt=True)`), so that
    the prompt is run once per batch rather than once per sample; otherwise in right-padded batches. Same values.
    """
    lengths = np.array([len(p) + len(c) for p, c in zip(samples["prompt_ids"], samples["completion_ids"], strict=True)])
    result = {"kl": np.zeros(len(samples)), "log_ratio": np.zeros(len(samples))}
    result["num_tokens"] = np.array([len(ids) for ids in samples["completion_ids"]], dtype=np.float64)
    collator = DataCollatorForPointwise(pad_token_id, padding_free=share_prompt, share_prompt=share_prompt)
    rows = samples.select_columns(["prompt_ids", "completion_ids"])
    order = grouped_by_length(rows, lengths) if share_prompt else np.argsort(-lengths, kind="stable")
    with eval_mode(model):
        for start in range(0, len(order), batch_size):
            batch_rows = order[start : start + batch_size]
            batch = collator([rows[int(i)] for i in batch_rows])
            # Position t predicts token t + 1: the mask selects the predictions of the sampled completion tokens
            predicts_completion = batch["completion_mask"][:, 1:].bool()
            if share_prompt:
                row_of_token = batch["sample_index"][:, 1:][predicts_completion]
            else:
                row_of_token = predicts_completion.nonzero()[:, 0]
            sampled = batch["input_ids"][:, 1:][predicts_completion]
            inputs = {
                key: value.to(model.device) if torch.is_tensor(value) else value
                for key, value in model_inputs(batch).items()
            }

            def next_token_logps():
                shared = per_sample_attention(model, shared_prompts=True) if share_prompt else contextlib.nullcontext()
                with shared:
                    logits = model(**inputs, use_cache=False).logits
                # float64: the KL of two nearly equal distributions is a small difference of large terms
                return logits[:, :-1][predicts_completion.to(model.device)].cpu().double().log_softmax(-1)

            policy_logps = next_token_logps()
            with model.disable_adapter():
                reference_logps = next_token_logps()
            token_kl = (policy_logps.exp() * (policy_logps - reference_logps)).sum(-1)
            token_log_ratio = (policy_logps - reference_logps).gather(-1, sampled[:, None])[:, 0]
            for key, values in (("kl", token_kl), ("log_ratio", token_log_ratio)):
                per_row = torch.zeros(len(batch_rows), dtype=torch.float64).index_add_(0, row_of_token, values)
                result[key][batch_rows] = per_row.numpy()
    return result


def summarize(samples: Dataset, num_prompts: int) -> dict:
    """Reward, length and per-rule scores of a model's held-out samples."""
    rewards = group_by_prompt(samples["reward"], num_prompts)
    words = [len(WORD.findall(completion_text(c))) for c in samples["completion"]]
    return {
        "mean_reward": float(rewards.mean()),
        "mean_words": float(np.mean(words)),
        "rule_scores": rule_scores(samples),
        "rewards": rewards.tolist(),
    }


def compare_to_reference(reference: dict, policy: dict, kl: dict[str, np.ndarray]) -> dict:
    """
    The policy's held-out figures against the reference's: paired reward difference (95% CI), win rate, and the KL
    estimates of [`kl_to_reference`] per sequence (`kl`, and `kl_log_ratio` by the plain log-ratio) and per token
    (`kl_per_token`: each prompt's summed KL over its sampled tokens), each with a 95% CI over prompts.
    """
    reference_rewards, policy_rewards = np.asarray(reference["rewards"]), np.asarray(policy["rewards"])
    differences = policy_rewards.mean(axis=1) - reference_rewards.mean(axis=1)
    num_prompts = len(differences)
    per_prompt = {
        "kl": group_by_prompt(kl["kl"], num_prompts).mean(axis=1),
        "kl_log_ratio": group_by_prompt(kl["log_ratio"], num_prompts).mean(axis=1),
        "kl_per_token": group_by_prompt(kl["kl"], num_prompts).sum(axis=1)
        / group_by_prompt(kl["num_tokens"], num_prompts).sum(axis=1),
    }
    figures = {
        **policy,
        "reward_difference": float(differences.mean()),
        "reward_difference_ci95": list(paired_interval(differences)),
        "win_rate": win_rate(policy_rewards, reference_rewards),
    }
    for name, values in per_prompt.items():
        figures[name] = float(values.mean())
        figures[f"{name}_ci95"] = list(paired_interval(values))
    return figures


def format_table(reference: dict, policies: dict[str, dict]) -> str:
    """Text table: one column for the reference, one per policy."""
    names = ["reference", *policies]
    columns = [reference, *policies.values()]

    def row(label, cell):
        return [label] + [cell(column) for column in columns]

    rules = sorted({rule for column in columns for rule in column["rule_scores"]}, key=_RULE_ORDER.index)
    rows = [
        row("mean reward", lambda c: f"{c['mean_reward']:.3f}"),
        row(
            "  difference [95% CI]",
            lambda c: f"{c['reward_difference']:+.3f} [{c['reward_difference_ci95'][0]:+.3f}, "
            f"{c['reward_difference_ci95'][1]:+.3f}]" if "kl" in c else "",
        ),
        row("win rate vs reference", lambda c: f"{c['win_rate']:.3f}" if "kl" in c else "0.500"),
        row("KL to reference (nats)", lambda c: _estimate(c, "kl", ".2f")),
        row("  per token", lambda c: _estimate(c, "kl_per_token", ".3f")),
        row("mean length (words)", lambda c: f"{c['mean_words']:.1f}"),
        *(
            row(f"  rule: {rule}", lambda c, rule=rule: f"{c['rule_scores'].get(rule, float('nan')):.3f}")
            for rule in rules
        ),
    ]
    header = ["held-out", *names]
    widths = [max(len(str(line[i])) for line in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in [header, *rows]
    ]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


def _estimate(column: dict, name: str, spec: str) -> str:
    """An estimate with its 95% CI; 0 for the reference."""
    if name not in column:
        return "0"
    low, high = column[f"{name}_ci95"]
    return f"{column[name]:{spec}} [{low:{spec}}, {high:{spec}}]"


_RULE_ORDER = ["keyword", "max_words", "no_commas", "lowercase", "bullets", "gate"]
