"""
Held-out evaluation of a policy against its reference model: rewards of sampled completions, a paired confidence
interval over prompts, the win rate, a KL estimate and the completion lengths.

The reference and the policy sample with the same per-completion seeds (the reference stage seeds each completion by
the seed, the prompt and its index): where the policy has not moved, it draws the same completion as the reference,
so the paired difference carries less sampling noise.
"""

import numpy as np
import torch
from datasets import Dataset
from scipy import stats
from trl.trainer.utils import pad

from .task import WORD, Rules, completion_text, gate


def group_by_prompt(values, num_prompts: int) -> np.ndarray:
    """Values of a dataset expanded by the reference stage (each prompt's completions in a row) as (prompts, k)."""
    return np.asarray(values, dtype=np.float64).reshape(num_prompts, -1)


def paired_interval(differences: np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    """Student-t confidence interval of the mean of per-prompt paired differences."""
    half_width = stats.t.ppf(0.5 + confidence / 2, len(differences) - 1) * stats.sem(differences)
    mean = float(np.mean(differences))
    return mean - half_width, mean + half_width


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


@torch.no_grad()
def log_ratios(model, tokenizer, samples: Dataset, max_completion_length: int, batch_size: int = 16) -> np.ndarray:
    """
    `log pi_theta(y|x) - log pi_ref(y|x)` of each sampled completion, with the policy's LoRA adapters on, then off (the
    reference is the same model with adapters disabled). The sum runs over the sampled tokens: the completion and its
    EOS token, not the EOS that the chat template appends to a completion cut at `max_completion_length`, nor what the
    template adds after the EOS.
    """
    sequences = []
    for prompt, completion in zip(samples["prompt"], samples["completion"], strict=True):
        prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        full_text = tokenizer.apply_chat_template(prompt + completion, tokenize=False)
        prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
        full_ids = tokenizer(full_text, add_special_tokens=False)["input_ids"]
        end = full_ids.index(tokenizer.eos_token_id, len(prompt_ids))
        sampled_end = end if end - len(prompt_ids) >= max_completion_length else end + 1
        sequences.append((full_ids[:sampled_end], len(prompt_ids)))
    was_training = model.training
    model.eval()
    result = np.empty(len(sequences))
    order = np.argsort([-len(ids) for ids, _ in sequences], kind="stable")
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        input_ids = pad([torch.tensor(sequences[i][0]) for i in batch], tokenizer.pad_token_id, padding_side="right")
        attention_mask = pad([torch.ones(len(sequences[i][0]), dtype=torch.long) for i in batch], 0, "right")
        # Position t predicts token t + 1: the mask selects the predictions of completion tokens
        completion_mask = torch.zeros(input_ids.shape[0], input_ids.shape[1] - 1)
        for row, i in enumerate(batch):
            completion_mask[row, sequences[i][1] - 1 : len(sequences[i][0]) - 1] = 1

        def sequence_logps():
            logits = model(input_ids=input_ids.to(model.device), attention_mask=attention_mask.to(model.device)).logits
            token_logps = logits[:, :-1].float().log_softmax(-1).gather(-1, input_ids[:, 1:, None].to(model.device))
            return (token_logps[..., 0].cpu().double() * completion_mask).sum(dim=1)

        policy_logps = sequence_logps()
        with model.disable_adapter():
            reference_logps = sequence_logps()
        result[batch] = (policy_logps - reference_logps).numpy()
    model.train(was_training)
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


def compare_to_reference(reference: dict, policy: dict, kl: np.ndarray) -> dict:
    """The policy's held-out figures against the reference's: paired reward difference (95% CI), win rate, KL."""
    reference_rewards, policy_rewards = np.asarray(reference["rewards"]), np.asarray(policy["rewards"])
    differences = policy_rewards.mean(axis=1) - reference_rewards.mean(axis=1)
    low, high = paired_interval(differences)
    return {
        **policy,
        "reward_difference": float(differences.mean()),
        "reward_difference_ci95": [low, high],
        "win_rate": win_rate(policy_rewards, reference_rewards),
        "kl": float(kl.mean()),
        "kl_ci95": list(paired_interval(group_by_prompt(kl, len(differences)).mean(axis=1))),
    }


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
        row("KL to reference (nats)", lambda c: f"{c['kl']:.2f}" if "kl" in c else "0"),
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


_RULE_ORDER = ["keyword", "max_words", "no_commas", "lowercase", "bullets", "gate"]
