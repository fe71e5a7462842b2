"""
The reference stage: sample completions from the reference model, score completions with reward functions, and cache
the results on disk.

QRPO needs, per prompt, the rewards of completions sampled from the reference model (`ref_rewards`); both trainers need
the `reward` of their training completions; RPO can train on completions sampled from the reference model. The stage
runs as [`precompute_rewards`] on a `datasets.Dataset`, as `python -m qrpo_trl.scripts.precompute`, and from the
trainers when they are given `reward_funcs`.

It works in two cached passes, so that changing only the reward functions does not sample again:

1. sampling (`sampling.py`): `num_generations` completions per distinct (prompt, reward-function columns), keyed by the
   reference model's weights, the tokenizer, the prompts and the sampling settings;
2. scoring (`rewards.py`): every completion that needs a reward (the sampled ones and the dataset's own, if it has no
   rewards), keyed by the reward functions and what they are called with.

Each pass runs in chunks, each computed by one process and written by it to the cache as an Arrow file (`storage.py`);
only which chunks are missing and which failed is communicated. A rerun computes only the missing (or damaged) chunks.
The results are joined into the dataset with Arrow, a batch of rows at a time, into a file the returned dataset
memory-maps (`columns.py`): memory stays bounded by a chunk, whatever the number of completions. Each completion is
sampled from its own random stream (seeded by the seed, the prompt's token ids and the completion's index), so results
do not depend on batching, chunking, dataset order or the number of processes (`stage.py` puts it together).
"""

from .rewards import RewardFunc, RewardFunctions
from .sampling import PerSequenceSampler, completion_seed, generate_completions
from .stage import ReferenceStage, precompute_rewards


__all__ = [
    "PerSequenceSampler",
    "ReferenceStage",
    "RewardFunc",
    "RewardFunctions",
    "completion_seed",
    "generate_completions",
    "precompute_rewards",
]
