"""
Encoder-decoder models on a tiny Flan-T5-like T5: tokenisation, batches, dropout, bad input, and reference completions
sampled from T5. Training and the reference pass, the same for both architectures, are tested on T5 too in
test_trainers.py (the `architecture` fixture).
"""

import glob
import logging

import pytest
import torch
from conftest import assert_loss_logged, assert_trained, build_tiny_t5, make_args, pointwise_rows, snapshot
from datasets import Dataset
from transformers import AutoModelForSeq2SeqLM, LogitsProcessorList
from trl.trainer.utils import disable_dropout_in_model

from qrpo_trl import (
    DataCollatorForPointwise,
    DROConfig,
    QRPOConfig,
    QRPOTrainer,
    ReferenceConfig,
    RPOConfig,
    RPOTrainer,
    precompute_rewards,
)
from qrpo_trl.pointwise_trainer import disable_float_dropout
from qrpo_trl.reference_stage import PerSequenceSampler, completion_seed


@pytest.fixture
def dataset():
    return Dataset.from_dict(pointwise_rows())


def test_prompt_is_the_encoder_input_and_the_completion_ends_with_one_eos(tiny_t5_path, t5_tokenizer, tmp_path):
    tokens = t5_tokenizer.convert_ids_to_tokens
    rows = {"prompt": ["what is the sky", "hello"], "completion": [" blue", " hi</s>"], "reward": [1.0, 0.0]}
    trainer = RPOTrainer(model=tiny_t5_path, args=make_args(RPOConfig, tmp_path), train_dataset=Dataset.from_dict(rows))
    assert trainer.is_encoder_decoder
    prepared = trainer.train_dataset
    # The prompt as Flan-T5 reads it, with the EOS its tokenizer appends; the completion with exactly one EOS
    assert prepared["prompt_ids"] == t5_tokenizer(rows["prompt"])["input_ids"]
    assert tokens(prepared["prompt_ids"][0]) == ["▁what", "▁is", "▁the", "▁sky", "</s>"]
    assert [tokens(ids) for ids in prepared["completion_ids"]] == [["▁blue", "</s>"], ["▁hi", "</s>"]]

    # A conversation is rendered by the chat template (whose turns end with EOS), then tokenised like text
    user = lambda text: [{"role": "user", "content": text}]  # noqa: E731
    assistant = lambda text: [{"role": "assistant", "content": text}]  # noqa: E731
    rows = {"prompt": [user("what is the sky")] * 2, "completion": [assistant("blue"), assistant("red")]}
    rows["reward"] = [1.0, 0.0]
    trainer = RPOTrainer(model=tiny_t5_path, args=make_args(RPOConfig, tmp_path), train_dataset=Dataset.from_dict(rows))
    row = trainer.train_dataset[0]
    assert tokens(row["prompt_ids"]) == ["<|user|>", "▁what", "▁is", "▁the", "▁sky", "</s>", "<|assistant|>", "</s>"]
    assert tokens(row["completion_ids"]) == ["▁blue", "</s>"]


def test_collator_splits_truncated_samples_into_encoder_inputs_and_labels():
    examples = [
        {"prompt_ids": [5, 6, 1], "completion_ids": [7, 1], "target": 0.5},
        {"prompt_ids": [5, 1], "completion_ids": [8, 9, 1], "target": -1.0},
    ]
    batch = DataCollatorForPointwise(pad_token_id=0, is_encoder_decoder=True)(examples)
    assert set(batch) == {"input_ids", "attention_mask", "labels", "target"}
    assert batch["input_ids"].tolist() == [[5, 6, 1], [5, 1, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [[7, 1, -100], [8, 9, 1]]
    assert batch["target"].tolist() == [0.5, -1.0]
    # `max_length` bounds prompt + completion as for a decoder-only model: keep_start cuts the completion's end, whose
    # EOS replaces the last kept token...
    batch = DataCollatorForPointwise(pad_token_id=0, max_length=4, is_encoder_decoder=True)(examples)
    assert batch["input_ids"].tolist() == [[5, 6, 1], [5, 1, 0]]
    assert batch["labels"].tolist() == [[1, -100], [8, 1]]
    # ... and keep_end the prompt's start
    collator = DataCollatorForPointwise(pad_token_id=0, max_length=4, truncation_mode="keep_end", is_encoder_decoder=True)
    batch = collator(examples)
    assert batch["input_ids"].tolist() == [[6, 1], [1, 0]]
    assert batch["labels"].tolist() == [[7, 1, -100], [8, 9, 1]]


def test_t5_attention_dropout_is_disabled(tiny_t5_path, t5_tokenizer, dataset, tmp_path):
    model = build_tiny_t5(t5_tokenizer).train()
    input_ids, labels = torch.randint(3, len(t5_tokenizer), (4, 6)), torch.randint(3, len(t5_tokenizer), (4, 3))

    def logits():
        return model(input_ids=input_ids, labels=labels).logits

    disable_dropout_in_model(model)  # TRL's: T5's attention dropout, a float, survives it
    assert not torch.equal(logits(), logits())
    disable_float_dropout(model)
    assert torch.equal(logits(), logits())

    # The trainers disable it (`disable_dropout=True` is the default): training forwards are deterministic
    for disable_dropout in (True, False):
        args = make_args(QRPOConfig, tmp_path, disable_dropout=disable_dropout)
        trainer = QRPOTrainer(model=tiny_t5_path, args=args, train_dataset=dataset)
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(dataset))])
        trainer.model.train()
        first, second = (trainer._sequence_logps(trainer.model, batch)[0] for _ in range(2))
        assert torch.equal(first, second) == disable_dropout


def test_bad_input(tiny_t5_path, tmp_path, caplog):
    rows = pointwise_rows()
    rows["reward"][5] = float("nan")
    with pytest.raises(ValueError, match="Column 'reward' of the train dataset, row 5: expected a finite number"):
        QRPOTrainer(model=tiny_t5_path, args=make_args(QRPOConfig, tmp_path / "out"), train_dataset=Dataset.from_dict(rows))
    assert not (tmp_path / "out").exists()

    # Prompts of 5, 6 and 2 tokens and completions of 2 to 5 tokens (each with its EOS)
    with caplog.at_level(logging.WARNING):
        args = make_args(QRPOConfig, tmp_path / "out", max_length=5)
        trainer = QRPOTrainer(model=tiny_t5_path, args=args, train_dataset=Dataset.from_dict(pointwise_rows()))
    assert "Dropped 8 of 12 samples of the train dataset whose prompt alone has max_length=5 tokens or more" in caplog.text
    assert "1 of 4 samples of the train dataset exceed max_length=5 tokens and are truncated (keep_start)" in caplog.text
    trainer.train()
    assert_loss_logged(trainer)


# ----------------------------------------------------------------------------------------------------------------------
# Reference stage: completions sampled from the T5 reference model


PROMPTS = ["what is the sky", "tell me about the sea", "hello", "tell me about the grass", "what is one two"]


def word_count(completions, **kwargs):
    return [float(len(completion.split())) for completion in completions]


class Recorder:
    """A T5 whose `generate` calls record their encoder inputs, and a reward function that records what it is given."""

    def __init__(self, model):
        self.encoder_inputs, self.scored = [], []
        self.model = model
        self.generate = model.generate
        model.generate = self.recorded_generate

    def recorded_generate(self, input_ids, attention_mask, **kwargs):
        self.encoder_inputs.append((input_ids.clone(), attention_mask.clone()))
        return self.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    def reward(self, prompts, completions, completion_ids, **kwargs):
        self.scored.extend(zip(prompts, completions, completion_ids, strict=True))
        return [float(len(ids)) for ids in completion_ids]

    def unpadded_encoder_inputs(self) -> list[list[int]]:
        return [ids[mask.bool()].tolist() for batch, masks in self.encoder_inputs for ids, mask in zip(batch, masks)]


def t5_reference_args(tmp_path, **overrides):
    settings = dict(
        num_generations=3, max_completion_length=6, generation_batch_size=4, reference_chunk_size=6,
        keep_ref_completions=True, reference_cache_dir=str(tmp_path / "cache"),
    )
    return ReferenceConfig(**{**settings, **overrides})


def test_t5_reference_completions_are_the_decoder_tokens_seeded_per_completion(t5_tokenizer, tmp_path):
    model = build_tiny_t5(t5_tokenizer).eval()  # eval: dropout off also for the unbatched `generate` below
    with torch.no_grad():  # a random T5 hardly ever samples EOS: make it as likely as the decoder start token
        decoder_start = model.generation_config.decoder_start_token_id
        model.lm_head.weight[t5_tokenizer.eos_token_id] = model.lm_head.weight[decoder_start]
    recorder = Recorder(model)
    dataset = Dataset.from_dict({"prompt": PROMPTS})
    args = t5_reference_args(tmp_path / "reference")
    result = precompute_rewards(dataset, recorder.model, recorder.reward, args, processing_class=t5_tokenizer)

    # The encoder inputs are the prompts as the trainers tokenise them (with the EOS T5's tokenizer appends), padded on
    # the right: a batch mixes prompt lengths
    prompt_ids = t5_tokenizer(PROMPTS)["input_ids"]
    assert sorted(recorder.unpadded_encoder_inputs()) == sorted(ids for ids in prompt_ids for _ in range(3))
    masks = [masks for _, masks in recorder.encoder_inputs]
    assert any((batch == 0).any() for batch in masks)
    assert all((batch[:, :-1] >= batch[:, 1:]).all() for batch in masks)

    # Each completion is what the decoder generated after its start token, up to its first EOS (or the length limit):
    # the same as an unbatched `generate` from the completion's own seed, decoded alone
    eos = t5_tokenizer.eos_token_id
    indices = {prompt: 0 for prompt in PROMPTS}
    for prompt, completion, ids in recorder.scored:
        assert 0 < len(ids) <= 6 and eos not in ids[:-1] and (ids[-1] == eos or len(ids) == 6)
        assert completion == t5_tokenizer.decode(ids, skip_special_tokens=True)
        encoder_ids = prompt_ids[PROMPTS.index(prompt)]
        seed = completion_seed(args.seed, encoder_ids, indices[prompt])
        indices[prompt] += 1
        alone = recorder.generate(
            input_ids=torch.tensor([encoder_ids]), max_new_tokens=6, do_sample=False, eos_token_id=eos,
            logits_processor=LogitsProcessorList([PerSequenceSampler([seed])]),
        )[0].tolist()
        assert alone == [decoder_start, *ids]
    assert indices == {prompt: 3 for prompt in PROMPTS}
    assert {ids[-1] == eos for _, _, ids in recorder.scored} == {True, False}  # both ends occur
    assert result["reward"] == [float(len(ids)) for _, _, ids in recorder.scored]

    def sampled(result):
        return {row["prompt"]: row["ref_completions"] for row in result}

    def sample(name, data=dataset, **overrides):
        args = t5_reference_args(tmp_path / name, **overrides)
        return sampled(precompute_rewards(data, recorder.model, word_count, args, processing_class=t5_tokenizer))

    reference = sampled(result)
    assert len({completion for completions in reference.values() for completion in completions}) > 5
    # Whatever the batches (and so the padding) and the order of the prompts; another seed samples others
    assert sample("reversed", data=dataset.select(range(4, -1, -1)), generation_batch_size=7) == reference
    assert sample("other-seed", seed=43, generation_batch_size=15) != reference


def test_t5_reference_stage_tokenises_as_the_trainer(tiny_t5_path, t5_tokenizer, tmp_path):
    """Conversations through the chat template: the prompt sampled from and the scored completion ids are the trainer's."""
    recorder = Recorder(AutoModelForSeq2SeqLM.from_pretrained(tiny_t5_path))
    dataset = Dataset.from_dict({
        "prompt": [[{"role": "user", "content": prompt}] for prompt in PROMPTS[:2]],
        "completion": [[{"role": "assistant", "content": "blue"}], [{"role": "assistant", "content": "green grass"}]],
    })
    args = t5_reference_args(tmp_path)
    completed = precompute_rewards(dataset, recorder.model, recorder.reward, args, processing_class=t5_tokenizer)
    sampled, own = recorder.scored[:6], recorder.scored[6:]
    for _, completion, ids in sampled:
        assert completion == [{"role": "assistant", "content": t5_tokenizer.decode(ids, skip_special_tokens=True)}]

    trainer = RPOTrainer(model=tiny_t5_path, args=make_args(RPOConfig, tmp_path / "out"), train_dataset=completed)
    prepared = trainer.train_dataset
    expected_encoder_inputs = [ids for ids in prepared["prompt_ids"] for _ in range(3)]
    assert sorted(recorder.unpadded_encoder_inputs()) == sorted(expected_encoder_inputs)
    assert [ids for _, _, ids in own] == prepared["completion_ids"]
    assert t5_tokenizer.convert_ids_to_tokens(own[1][2]) == ["▁green", "▁grass", "</s>"]


def test_qrpo_trains_on_t5_reference_completions_scored_by_a_reward_function(tiny_t5_path, tmp_path):
    rows = pointwise_rows()
    dataset = Dataset.from_dict({"prompt": rows["prompt"], "completion": rows["completion"]})
    args = make_args(
        QRPOConfig, tmp_path / "out", num_generations=4, max_completion_length=6, keep_ref_completions=True,
        reference_cache_dir=str(tmp_path / "cache"),
    )
    trainer = QRPOTrainer(model=tiny_t5_path, args=args, train_dataset=dataset, reward_funcs=word_count)
    prepared = trainer.train_dataset
    assert prepared["reward"] == word_count(rows["completion"])
    for refs, rewards in zip(prepared["ref_completions"], prepared["ref_rewards"], strict=True):
        assert len(refs) == 4 and rewards == word_count(refs)
    assert len({reward for rewards in prepared["ref_rewards"] for reward in rewards}) > 1
    assert all(0 <= quantile <= 1 for quantile in prepared["quantile"])
    before = snapshot(trainer.model)
    trainer.train()
    assert_loss_logged(trainer)
    assert_trained(trainer.model, before)


def test_vllm_sampling_of_an_encoder_decoder_model_is_an_error(t5_tokenizer, tmp_path):
    args = t5_reference_args(tmp_path, use_vllm=True)
    match = r"`use_vllm=True`: sampling with vLLM does not support encoder-decoder models such as T5.*`use_vllm=False`"
    with pytest.raises(ValueError, match=match):
        precompute_rewards(
            Dataset.from_dict({"prompt": PROMPTS[:1]}), build_tiny_t5(t5_tokenizer), word_count, args,
            processing_class=t5_tokenizer,
        )
    assert not glob.glob(str(tmp_path / "cache" / "*" / "*"))
