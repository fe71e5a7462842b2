"""The reference stage: sampling from the reference model, scoring with reward functions and models, the cache."""

import errno
import glob
import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest
import torch
from conftest import assert_loss_logged, assert_trained, build_tiny_llama, kill_after_two_chunks, logged, make_args, pointwise_rows, snapshot
from datasets import ClassLabel, Dataset, Features, Value, load_from_disk
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from qrpo_trl import QRPOConfig, QRPOTrainer, ReferenceConfig, RPOConfig, RPOTrainer, precompute_rewards
from qrpo_trl import cli
from qrpo_trl.reference_stage import RewardFunctions, storage


PROMPTS = ["what is the sky", "tell me about the sea", "hello", "tell me about the grass", "what is one two"]
# Calls of reward functions counted, and made to fail after some, by `count_reward_calls`: outside the functions, whose
# fingerprint (the cache key) covers the globals they read
FAILURE = {"after_calls": None}
CALLS = {"reward": 0, "generate": 0}


def length_reward(completions, **kwargs):
    return [float(len(completion.split())) for completion in completions]


flaky_length_reward = length_reward  # the reward function that tests make fail through FAILURE


@pytest.fixture(autouse=True)
def count_reward_calls(monkeypatch):
    FAILURE["after_calls"] = None
    CALLS.update(reward=0, generate=0)
    call = RewardFunctions._call

    def counted_call(func, *args):
        def counted(**kwargs):
            CALLS["reward"] += 1
            if FAILURE["after_calls"] is not None and CALLS["reward"] > FAILURE["after_calls"]:
                raise ConnectionError("judge unavailable")
            return func(**kwargs)

        return call(counted, *args)

    monkeypatch.setattr(RewardFunctions, "_call", staticmethod(counted_call))


def count_generate_calls(model):
    generate = model.generate

    def counted_generate(*args, **kwargs):
        CALLS["generate"] += 1
        return generate(*args, **kwargs)

    model.generate = counted_generate
    return model


@pytest.fixture
def model(tokenizer):
    """A tiny reference model whose `generate` calls are counted."""
    return count_generate_calls(build_tiny_llama(tokenizer))


def completions_dataset(num_rows=6):
    """Pointwise rows with a prompt and a completion but no reward."""
    rows = pointwise_rows()
    return Dataset.from_dict({"prompt": rows["prompt"][:num_rows], "completion": rows["completion"][:num_rows]})


def reference_args(tmp_path, **overrides):
    settings = dict(
        num_generations=3,
        max_completion_length=6,
        generation_batch_size=4,
        reference_chunk_size=6,
        reference_cache_dir=str(tmp_path / "cache"),
    )
    settings.update(overrides)
    return ReferenceConfig(**settings)


def chunk_files(directory):
    """The (start, stop) ranges of the chunk files in a pass's cache directory; fails on any other file."""
    names = sorted(os.listdir(directory))
    assert all(re.fullmatch(r"chunk-\d{9}-\d{9}-[0-9a-f]{32}\.arrow", name) for name in names), names
    return [(int(name.split("-")[1]), int(name.split("-")[2])) for name in names]


@torch.no_grad()
def reward_model_score(reward_model, tokenizer, text):
    inputs = tokenizer(text=text, return_tensors="pt", add_special_tokens=False)
    return reward_model(**inputs).logits[0, 0].item()


# ----------------------------------------------------------------------------------------------------------------------
# Scoring


def test_reward_functions_and_reward_model_are_weighted(model, tokenizer, tiny_reward_model_path, tmp_path):
    dataset = completions_dataset().add_column("bonus", [0.5 * i for i in range(6)])

    def bonus_reward(completions, bonus, **kwargs):  # another dataset column, as a keyword argument
        return bonus

    args = reference_args(tmp_path, reward_weights=[2.0, 0.5, 1.0], keep_ref_completions=True)
    result = precompute_rewards(
        dataset, model, [length_reward, tiny_reward_model_path, bonus_reward], args, processing_class=tokenizer
    )
    assert result.column_names == ["prompt", "completion", "bonus", "reward", "ref_rewards", "ref_completions"]

    reward_model = AutoModelForSequenceClassification.from_pretrained(tiny_reward_model_path)

    def expected(prompt, completion, bonus):
        return (
            2.0 * length_reward([completion])[0]
            + 0.5 * reward_model_score(reward_model, tokenizer, prompt + completion)
            + bonus
        )

    for row in result:
        assert row["reward"] == pytest.approx(expected(row["prompt"], row["completion"], row["bonus"]), rel=1e-5)
        assert len(row["ref_rewards"]) == len(row["ref_completions"]) == 3
        for ref_reward, ref_completion in zip(row["ref_rewards"], row["ref_completions"]):
            assert ref_reward == pytest.approx(expected(row["prompt"], ref_completion, row["bonus"]), rel=1e-5)
    # Rows 0 and 1 share their prompt: the same samples, scored with their own `bonus`
    assert result[0]["ref_completions"] == result[1]["ref_completions"] != result[4]["ref_completions"]
    assert result[0]["ref_rewards"] != result[1]["ref_rewards"]


def test_paired_conversational_dataset_gets_pair_rewards(model, tokenizer, tmp_path):
    dataset = Dataset.from_dict({
        "chosen": [[{"role": "user", "content": p}, {"role": "assistant", "content": "yes it is good"}] for p in PROMPTS],
        "rejected": [[{"role": "user", "content": p}, {"role": "assistant", "content": "no"}] for p in PROMPTS],
    })

    def content_length(completions, **kwargs):
        return [float(len(completion[0]["content"].split())) for completion in completions]

    result = precompute_rewards(dataset, model, content_length, reference_args(tmp_path), processing_class=tokenizer)
    assert result["chosen_reward"] == [4.0] * 5 and result["rejected_reward"] == [1.0] * 5
    assert result[0]["prompt"] == [{"role": "user", "content": PROMPTS[0]}]  # extracted from the pairs
    assert all(len(refs) == 3 for refs in result["ref_rewards"])


# ----------------------------------------------------------------------------------------------------------------------
# Sampling


def test_sampling_is_seeded_per_completion(model, tokenizer, tmp_path):
    dataset = Dataset.from_dict({"prompt": PROMPTS})

    def sample(name, data=dataset, **overrides):
        args = reference_args(tmp_path / name, keep_ref_completions=True, **overrides)
        result = precompute_rewards(data, model, length_reward, args, processing_class=tokenizer)
        return dict(zip(result["prompt"], result["ref_completions"]))

    reference = sample("reference")
    assert len({completion for completions in reference.values() for completion in completions}) > 5
    # Same seed: the same completions, whatever the batching, the chunking and the order of the prompts
    assert sample("batched", generation_batch_size=7, reference_chunk_size=100) == reference
    assert sample("reversed", data=dataset.select(range(4, -1, -1)), generation_batch_size=1) == reference
    assert sample("other-seed", seed=43) != reference


def test_prompt_only_dataset_becomes_sampled_completions(model, tokenizer, tmp_path):
    dataset = Dataset.from_dict({"prompt": PROMPTS[:2]})
    args = reference_args(tmp_path, keep_ref_completions=True)
    result = precompute_rewards(dataset, model, length_reward, args, processing_class=tokenizer)
    assert result["prompt"] == [PROMPTS[0]] * 3 + [PROMPTS[1]] * 3
    assert result["reward"] == length_reward(result["completion"])
    # The sampled completions are also the row's references
    assert result[0]["ref_completions"] == result["completion"][:3]
    assert result[0]["ref_rewards"] == result["reward"][:3]
    rpo = precompute_rewards(dataset, model, length_reward, args, processing_class=tokenizer, add_ref_rewards=False)
    assert rpo.column_names == ["prompt", "completion", "reward"] and rpo["completion"] == result["completion"]


def test_prompt_only_dataset_is_expanded_through_arrow(model, tokenizer, tmp_path):
    features = Features({"prompt": Value("string"), "topic": ClassLabel(names=["sky", "sea"])})
    full = Dataset.from_dict({"prompt": PROMPTS, "topic": [0, 1, 0, 1, 1]}, features=features)
    full.info.description = "five prompts"
    dataset = full.select([4, 2, 0])  # an indices mapping, out of order
    args = reference_args(tmp_path, keep_ref_completions=True)
    result = precompute_rewards(dataset, model, length_reward, args, processing_class=tokenizer)
    # Each row once per sampled completion, in order, its columns with their features
    assert result.features["topic"] == features["topic"] and result.info.description == "five prompts"
    assert result["prompt"] == [prompt for prompt in dataset["prompt"] for _ in range(3)]
    assert result["topic"] == [topic for topic in dataset["topic"] for _ in range(3)]
    for start in range(0, 9, 3):
        assert result["completion"][start : start + 3] == result[start]["ref_completions"]
        assert result["reward"][start : start + 3] == result[start + 2]["ref_rewards"]
    # Memory-mapped from the cache, not held in memory
    assert result.cache_files and all(
        entry["filename"].startswith(str(tmp_path / "cache")) for entry in result.cache_files
    )
    # The completions of a prompt do not depend on the rows around it
    everything = precompute_rewards(full, model, length_reward, args, processing_class=tokenizer)
    assert result["completion"][:3] == everything["completion"][12:15]


def test_conversational_prompts_use_the_chat_template(model, tokenizer, tmp_path):
    dataset = Dataset.from_dict({"prompt": [[{"role": "user", "content": p}] for p in PROMPTS[:2]]})
    seen = []

    def record(prompts, completions, completion_ids, **kwargs):
        seen.extend(zip(prompts, completions, completion_ids))
        return [0.0] * len(completions)

    args = reference_args(tmp_path, keep_ref_completions=True)
    result = precompute_rewards(dataset, model, record, args, processing_class=tokenizer)
    prompt, completion, completion_ids = seen[0]
    assert prompt == [{"role": "user", "content": PROMPTS[0]}]
    assert completion[0]["role"] == "assistant"
    assert completion[0]["content"] == tokenizer.decode(completion_ids, skip_special_tokens=True)
    assert 0 < len(completion_ids) <= 6
    # The expanded rows hold the completions as the reward function got them
    assert result["completion"] == [completion for _, completion, _ in seen]
    assert result[0]["ref_completions"] == result["completion"][:3]


# ----------------------------------------------------------------------------------------------------------------------
# Cache


def test_cache_reuses_results_and_recomputes_on_change(model, tokenizer, tmp_path):
    dataset = completions_dataset()

    def run(**overrides):
        CALLS.update(reward=0, generate=0)
        args = reference_args(tmp_path, **overrides)
        result = precompute_rewards(dataset, model, flaky_length_reward, args, processing_class=tokenizer)
        return result, dict(CALLS)

    first, calls = run()
    assert calls["generate"] > 0 and calls["reward"] > 0
    again, calls = run()
    assert calls == {"reward": 0, "generate": 0}  # loaded: nothing sampled or scored
    assert again.to_dict() == first.to_dict()
    # A sampling setting samples again; a reward setting only scores again
    _, calls = run(temperature=0.7)
    assert calls["generate"] > 0 and calls["reward"] > 0
    rescored, calls = run(reward_weights=[2.0])
    assert calls["generate"] == 0 and calls["reward"] > 0
    np.testing.assert_allclose(np.array(rescored["ref_rewards"]), 2 * np.array(first["ref_rewards"]))
    # So does another model
    other = count_generate_calls(build_tiny_llama(tokenizer, seed=1))
    CALLS.update(generate=0)
    precompute_rewards(dataset, other, flaky_length_reward, reference_args(tmp_path), processing_class=tokenizer)
    assert CALLS["generate"] > 0
    # And mixed precision (an autocast context) and back: its samples are not full precision's
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, calls = run()
    assert calls["generate"] > 0
    _, calls = run()
    assert calls == {"reward": 0, "generate": 0}


def test_interrupted_run_resumes_after_the_last_chunk(model, tokenizer, tmp_path):
    # 6 rows, 2 prompts: 6 sampled + 6 own completions to score, in chunks of 3: 4 scoring calls
    dataset = completions_dataset()
    args = reference_args(tmp_path, reference_chunk_size=3)
    FAILURE["after_calls"] = 2
    with pytest.raises(RuntimeError, match=r"Reward function 'length_reward' raised ConnectionError on the completions of rows \d+ to \d+ of the train dataset: judge unavailable"):
        precompute_rewards(dataset, model, flaky_length_reward, args, processing_class=tokenizer)
    scoring_dir = glob.glob(str(tmp_path / "cache" / "scoring-*"))[0]
    # The two completed chunks, no partial file
    assert chunk_files(scoring_dir) == [(0, 3), (3, 6)]
    sampling_calls = CALLS["generate"]

    FAILURE["after_calls"] = None
    CALLS.update(reward=0, generate=0)
    resumed = precompute_rewards(dataset, model, flaky_length_reward, args, processing_class=tokenizer)
    assert CALLS == {"reward": 2, "generate": 0}  # the two remaining chunks; the sampling pass was complete
    assert chunk_files(scoring_dir) == [(0, 3), (3, 6), (6, 9), (9, 12)]

    uninterrupted_args = reference_args(tmp_path / "fresh", reference_chunk_size=3)
    uninterrupted = precompute_rewards(dataset, model, flaky_length_reward, uninterrupted_args, processing_class=tokenizer)
    assert resumed.to_dict() == uninterrupted.to_dict()
    assert sampling_calls > 0


def test_interrupted_sampling_resumes(model, tokenizer, tmp_path):
    dataset = Dataset.from_dict({"prompt": PROMPTS})  # 5 prompts x 3 completions, 2 prompts per chunk: 3 chunks
    args = reference_args(tmp_path, generation_batch_size=6)
    generate = model.generate

    def generate_then_fail(*args, **kwargs):
        if CALLS["generate"] >= 2:
            raise KeyboardInterrupt
        return generate(*args, **kwargs)

    model.generate = generate_then_fail
    with pytest.raises(KeyboardInterrupt):
        precompute_rewards(dataset, model, length_reward, args, processing_class=tokenizer)
    model.generate = generate
    CALLS.update(generate=0)
    resumed = precompute_rewards(dataset, model, length_reward, args, processing_class=tokenizer)
    assert CALLS["generate"] == 1
    uninterrupted = precompute_rewards(dataset, model, length_reward, reference_args(tmp_path / "fresh"), processing_class=tokenizer)
    assert resumed.to_dict() == uninterrupted.to_dict()


RUN_SCRIPT = os.path.join(os.path.dirname(__file__), "workers", "reference_stage_run.py")


def test_killed_run_resumes_with_the_uninterrupted_result(tiny_llama_path, tmp_path):
    """A run killed with SIGKILL after some chunks, run again, computes only the others and gives the same result."""
    cache = tmp_path / "cache"

    def command(name, delay):
        return [
            sys.executable, RUN_SCRIPT, "--model", tiny_llama_path, "--cache_dir", str(cache),
            "--output", str(tmp_path / f"{name}.json"), "--generate_delay", str(delay),
        ]

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    sampling_dir, done = kill_after_two_chunks(command("killed", 0.5), cache, tmp_path / "killed.log", 300, env=env)
    assert not (tmp_path / "killed.json").exists()

    subprocess.run(command("resumed", 0.0), env=env, check=True, capture_output=True, timeout=300)
    resumed = json.loads((tmp_path / "resumed.json").read_text())
    assert resumed["generate_calls"] == 5 - done
    assert chunk_files(sampling_dir) == [(0, 3), (3, 6), (6, 9), (9, 12), (12, 15)]
    args = ReferenceConfig(
        num_generations=3, max_completion_length=6, generation_batch_size=4, reference_chunk_size=3,
        keep_ref_completions=True, reference_cache_dir=str(tmp_path / "fresh"),
    )
    uninterrupted = precompute_rewards(
        Dataset.from_dict({"prompt": PROMPTS}), AutoModelForCausalLM.from_pretrained(tiny_llama_path), length_reward,
        args, AutoTokenizer.from_pretrained(tiny_llama_path),
    )
    assert resumed["result"] == uninterrupted.to_dict()


def test_damaged_cache_files_are_recomputed(model, tokenizer, tmp_path, caplog):
    dataset = Dataset.from_dict({"prompt": PROMPTS})
    # One prompt per sampling chunk: 5 chunks, and 15 completions scored in 5 chunks
    args = reference_args(tmp_path, keep_ref_completions=True, reference_chunk_size=3)
    # Read before the damage: the result memory-maps the cache file that is overwritten below
    first = precompute_rewards(dataset, model, flaky_length_reward, args, processing_class=tokenizer).to_dict()
    sampling = sorted(glob.glob(str(tmp_path / "cache" / "sampling-*" / "chunk-*")))
    scoring = sorted(glob.glob(str(tmp_path / "cache" / "scoring-*" / "chunk-*")))
    (output,) = glob.glob(str(tmp_path / "cache" / "output-*" / "chunk-*"))
    assert len(sampling) == len(scoring) == 5
    # Cut short (killed while writing, on a file system without atomic rename; a full disk), or overwritten in place
    for path in (sampling[1], scoring[0]):
        os.truncate(path, os.path.getsize(path) // 2)
    with open(sampling[3], "r+b") as file:
        file.seek(os.path.getsize(sampling[3]) // 2)
        file.write(b"\0" * 8)
    with open(output, "wb") as file:
        file.write(b"not an arrow file")
    # What a run killed while writing leaves: the temporary file of a process that is gone
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    with open(storage.temporary_path(os.path.dirname(sampling[0]), pid=int(finished.stdout)), "wb") as file:
        file.write(b"\0" * 100)

    CALLS.update(reward=0, generate=0)
    again = precompute_rewards(dataset, model, flaky_length_reward, args, processing_class=tokenizer)
    # The two sampling chunks (sampled again as they were: their scores still hold) and the scoring chunk
    assert CALLS == {"generate": 2, "reward": 1}
    assert again.to_dict() == first
    for path in (sampling[1], sampling[3], scoring[0], output):
        assert f"cache file {path} is damaged" in caplog.text
    assert "do not match the digest in its name" in caplog.text
    assert len(chunk_files(os.path.dirname(sampling[0]))) == 5  # and the temporary file is gone


def test_full_disk_is_a_clear_error(model, tokenizer, tmp_path, monkeypatch):
    def full_disk(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(storage._HashingFile, "write", full_disk)
    args = reference_args(tmp_path)
    match = f"No space left to write the reference stage's cache in {re.escape(str(tmp_path / 'cache'))}/sampling-"
    with pytest.raises(OSError, match=match):
        precompute_rewards(completions_dataset(), model, length_reward, args, processing_class=tokenizer)
    # Nothing was left that a rerun could take for a result
    assert [name for _, _, names in os.walk(tmp_path / "cache") for name in names] == []
    monkeypatch.undo()
    result = precompute_rewards(completions_dataset(), model, length_reward, args, processing_class=tokenizer)
    assert len(result["ref_rewards"]) == 6


# ----------------------------------------------------------------------------------------------------------------------
# Trainers


def test_qrpo_trains_from_prompts_and_completions_with_reward_funcs(tiny_llama_path, tiny_reward_model_path, tmp_path):
    dataset = completions_dataset()
    args = make_args(
        QRPOConfig, tmp_path / "out", num_generations=4, max_completion_length=6, reference_cache_dir=str(tmp_path / "cache"),
        reward_weights=[1.0, 1.0],
    )
    trainer = QRPOTrainer(
        model=tiny_llama_path, args=args, train_dataset=dataset, eval_dataset=completions_dataset(3),
        reward_funcs=[length_reward, tiny_reward_model_path],
    )
    prepared = trainer.train_dataset
    assert all(len(refs) == 4 for refs in prepared["ref_rewards"])
    assert len({reward for refs in prepared["ref_rewards"] for reward in refs}) > 4
    assert all(0 <= quantile <= 1 for quantile in prepared["quantile"])
    assert len(trainer.eval_dataset) == 3 and "target" in trainer.eval_dataset.column_names
    before = snapshot(trainer.model)
    trainer.train()
    assert logged(trainer) and all(math.isfinite(loss) for loss in logged(trainer))
    assert_trained(trainer.model, before)


def test_rpo_trains_on_completions_sampled_for_prompts(architecture, tmp_path):
    args = make_args(
        RPOConfig, tmp_path / "out", num_generations=4, max_completion_length=6, value_estimator="monte_carlo",
        reference_cache_dir=str(tmp_path / "cache"),
    )
    trainer = RPOTrainer(
        model=architecture.path, args=args, train_dataset=Dataset.from_dict({"prompt": PROMPTS[:3]}),
        reward_funcs=length_reward,
    )
    prepared = trainer.train_dataset
    assert len(prepared) == 12 and prepared["reward"] == length_reward(prepared["completion"])
    eos = trainer.processing_class.eos_token_id
    assert all(ids.count(eos) == 1 and ids[-1] == eos for ids in prepared["completion_ids"])
    before = snapshot(trainer.model)
    trainer.train()
    assert_loss_logged(trainer)
    assert_trained(trainer.model, before)


def test_lora_policy_samples_from_its_base_model(architecture, tmp_path):
    """The reference of a LoRA policy is its base model: the stage samples with the adapters disabled."""
    args = make_args(
        QRPOConfig, tmp_path / "out", num_generations=3, max_completion_length=6, keep_ref_completions=True,
        reference_cache_dir=str(tmp_path / "cache"),
    )
    # Not a no-op
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=architecture.lora_modules, init_lora_weights=False)
    trainer = QRPOTrainer(
        model=architecture.path, args=args, train_dataset=completions_dataset(), reward_funcs=length_reward,
        peft_config=lora,
    )
    base = architecture.model_class.from_pretrained(architecture.path)
    expected = precompute_rewards(
        completions_dataset(), base, length_reward, reference_args(tmp_path / "base", keep_ref_completions=True),
        processing_class=architecture.tokenizer,
    )
    assert trainer.train_dataset["ref_completions"] == expected["ref_completions"]


def test_trainer_with_complete_dataset_does_not_run_the_stage(tiny_llama_path, tmp_path):
    args = make_args(QRPOConfig, tmp_path / "out", reference_cache_dir=str(tmp_path / "cache"))
    trainer = QRPOTrainer(
        model=tiny_llama_path, args=args, train_dataset=Dataset.from_dict(pointwise_rows()), reward_funcs=flaky_length_reward
    )
    assert CALLS["reward"] == 0 and not (tmp_path / "cache").exists()
    assert trainer.train_dataset["reward"] == pointwise_rows()["reward"]


# ----------------------------------------------------------------------------------------------------------------------
# The script


def test_script_completes_a_dataset_from_a_yaml_config(tiny_llama_path, tmp_path, monkeypatch):
    with open(tmp_path / "data.jsonl", "w") as f:
        for prompt in PROMPTS[:2]:
            f.write(json.dumps({"prompt": prompt, "completion": " blue"}) + "\n")
    (tmp_path / "my_rewards.py").write_text("def words(completions, **kwargs):\n    return [len(c.split()) for c in completions]\n")
    (tmp_path / "precompute.yaml").write_text(
        f"model_name_or_path: {tiny_llama_path}\n"
        "datasets:\n  - path: json\n    data_files: data.jsonl\n"
        "reward_funcs: [my_rewards.words]\n"
        "num_generations: 2\nmax_completion_length: 4\nkeep_ref_completions: true\n"
        "reference_cache_dir: cache\noutput_dir: completed\n"
    )
    monkeypatch.chdir(tmp_path)
    assert cli.main(["precompute", "--config", "precompute.yaml"]) == 0
    completed = load_from_disk("completed")["train"]
    assert completed["reward"] == [1.0, 1.0]
    assert [len(refs) for refs in completed["ref_rewards"]] == [2, 2]
    assert completed[0]["ref_rewards"] == [len(c.split()) for c in completed[0]["ref_completions"]]


# ----------------------------------------------------------------------------------------------------------------------
# Bad input


def returns_one(completions, **kwargs):
    return [1.0]


def returns_none_for_row_4(completions, prompt_index, **kwargs):
    return [None if index == 4 else 1.0 for index in prompt_index]


def returns_nan(completions, **kwargs):
    return [math.nan] * len(completions)


def raises(completions, **kwargs):
    return [1 / 0 for _ in completions]


@pytest.mark.parametrize(
    "reward_func, error, match",
    [
        (returns_one, ValueError, r"Reward function 'returns_one' returned 1 rewards for the \d+ completions of rows \d+ to \d+ of the train dataset: it must return one reward per completion"),
        (returns_none_for_row_4, ValueError, r"Reward function 'returns_none_for_row_4' returned None for a completion of the prompt of row 4 of the train dataset \('tell me about the sea'\): rewards must be finite numbers"),
        (returns_nan, ValueError, r"Reward function 'returns_nan' returned nan for a completion of the prompt of row 0 of the train dataset"),
        (raises, RuntimeError, r"Reward function 'raises' raised ZeroDivisionError on the completions of rows 0 to \d+ of the train dataset: division by zero"),
    ],
    ids=["wrong-length", "none", "nan", "raises"],
)
def test_bad_reward_function(model, tokenizer, tmp_path, reward_func, error, match):
    dataset = completions_dataset().add_column("prompt_index", list(range(6)))
    with pytest.raises(error, match=match):
        precompute_rewards(dataset, model, reward_func, reference_args(tmp_path, reference_chunk_size=100), processing_class=tokenizer)
    # The sampling pass is complete and cached; nothing of the failed scoring pass was written
    (sampling_dir,) = glob.glob(str(tmp_path / "cache" / "sampling-*"))
    assert chunk_files(sampling_dir) == [(0, 18)]  # 6 distinct (prompt, prompt_index) x 3
    assert glob.glob(str(tmp_path / "cache" / "*" / "*")) == glob.glob(os.path.join(sampling_dir, "*"))


def test_reward_model_id_that_cannot_be_loaded_offline(tiny_llama_path, tokenizer, tmp_path):
    match = r"Could not load the reward model 'my-org/missing-reward-model'.*must be a local path to a saved model, or pass a model instance"
    with pytest.raises(ValueError, match=f"(?s){match}"):
        precompute_rewards(completions_dataset(), tiny_llama_path, "my-org/missing-reward-model", reference_args(tmp_path))
    args = make_args(QRPOConfig, tmp_path / "out", reference_cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match=f"(?s){match}"):
        QRPOTrainer(model=tiny_llama_path, args=args, train_dataset=completions_dataset(), reward_funcs="my-org/missing-reward-model")
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


def test_bad_stage_settings(tiny_llama_path, tmp_path):
    with pytest.raises(ValueError, match=r"2 `reward_weights` for 1 reward functions"):
        precompute_rewards(completions_dataset(), tiny_llama_path, length_reward, reference_args(tmp_path, reward_weights=[1.0, 2.0]))
    with pytest.raises(ValueError, match=r"`temperature` must be > 0"):
        make_args(RPOConfig, tmp_path / "out", temperature=0.0)
    args = make_args(RPOConfig, tmp_path / "out", reference_cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match=r"(?s)match none of the formats the reference stage.*prompt-only: prompt"):
        RPOTrainer(model=tiny_llama_path, args=args, train_dataset=Dataset.from_dict({"text": ["hi"]}), reward_funcs=length_reward)


# ----------------------------------------------------------------------------------------------------------------------
# Several processes


SCRIPT = os.path.join(os.path.dirname(__file__), "workers", "reference_stage_tiny.py")


@pytest.mark.slow
def test_two_processes_match_one(tiny_llama_path, tiny_reward_model_path, tmp_path):
    def run(launcher, name, port):
        output = tmp_path / f"{name}.json"
        command = [
            *launcher, SCRIPT, "--model", tiny_llama_path, "--reward_model", tiny_reward_model_path,
            "--cache_dir", str(tmp_path / f"cache-{name}"), "--output", str(output),
        ]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(port)}
        completed = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
        assert completed.returncode == 0, completed.stderr[-4000:]
        return json.loads(output.read_text())

    single = run([sys.executable], "one", 29531)
    double = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"], "two", 29532)
    assert (single.pop("num_processes"), double.pop("num_processes")) == (1, 2)
    assert double["ref_completions"] == single["ref_completions"]
    assert double["completion"] == single["completion"]
    for key in ("reward", "ref_rewards", "trainer_ref_rewards", "trainer_reward", "trainer_losses"):
        np.testing.assert_allclose(double[key], single[key], rtol=1e-5, err_msg=key)
    # Each process wrote the chunks it computed (dealt round-robin) to the cache they share; the main process wrote the
    # joined columns. Nothing computed went through another process.
    for name, num_processes in (("one", 1), ("two", 2)):
        for kind in ("sampling", "scoring", "output"):
            (directory,) = glob.glob(str(tmp_path / f"cache-{name}" / "function" / f"{kind}-*"))
            writers = [
                pa.ipc.open_stream(pa.memory_map(os.path.join(directory, file))).schema.metadata
                for file in sorted(os.listdir(directory))
            ]
            assert {writer[b"num_processes"] for writer in writers} == {str(num_processes).encode()}
            expected = [0] if kind == "output" else [index % num_processes for index in range(len(writers))]
            assert [int(writer[b"process_index"]) for writer in writers] == expected, (name, kind)
            assert len(writers) > 2 or kind == "output"


@pytest.mark.slow
def test_failure_on_one_process_stops_every_process(tiny_llama_path, tiny_reward_model_path, tmp_path):
    """
    A reward function failing on process 1 stops the run with its error (no process left waiting), after process 0
    scored and kept its own chunks. (Each process raises; the launcher may stop process 0 before it prints its own.)
    """
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", SCRIPT,
        "--model", tiny_llama_path, "--reward_model", tiny_reward_model_path, "--cache_dir", str(tmp_path / "cache"),
        "--output", str(tmp_path / "out.json"), "--fail_on_process_1",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": "29533"}
    completed = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert completed.returncode != 0
    assert "Reward function 'judge_down_on_process_1' raised ConnectionError" in completed.stderr
    # 9 sampled and 12 own completions in chunks of 4: process 0 scores the 1st, 3rd and 5th
    (scoring_dir,) = glob.glob(str(tmp_path / "cache" / "function" / "scoring-*"))
    assert chunk_files(scoring_dir) == [(0, 4), (8, 12), (16, 20)]
