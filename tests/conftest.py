"""Offline fixtures: word-level tokenizers with a chat template and tiny Llama and T5 checkpoints built in a temp dir."""

import glob
import math
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
# vLLM's CPU build sizes its KV cache as `gpu_memory_utilization` x the NUMA node's memory minus its worker's resident
# memory: on a node of 12 GiB, the tests' 0.1 is less than the engine worker of a test process holds, and the engine
# refuses to start. Its CPU setting for a fixed KV cache (GiB) starts it whatever the machine's memory layout.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import numpy as np
import pytest
import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    T5Config,
    T5ForConditionalGeneration,
    T5Tokenizer,
)


SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]
WORDS = (
    "hi hello yo what is the sky color sea grass blue green red yes no maybe good bad great fine ok sure answer "
    "question please tell me about a an it this that one two three four five six seven eight nine ten"
).split()
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|> {{ message['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def varied_pointwise_dataset(num_rows: int, max_prompt_words: int, max_completion_words: int) -> Dataset:
    """Pointwise rows (with 4 reference rewards) whose prompts and completions vary in length, from 1 word up."""
    rng = np.random.default_rng(0)

    def text(length):
        return " ".join(rng.choice(WORDS, size=length))

    rows = {"prompt": [], "completion": [], "reward": [], "ref_rewards": []}
    for _ in range(num_rows):
        rows["prompt"].append(text(int(rng.integers(1, max_prompt_words))))
        rows["completion"].append(" " + text(int(rng.integers(1, max_completion_words))))
        rows["reward"].append(float(rng.normal()))
        rows["ref_rewards"].append(rng.normal(size=4).tolist())
    return Dataset.from_dict(rows)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A Llama-like word-level tokenizer: BOS prepended, no EOS appended, one token per word."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=["<|user|>", "<|assistant|>", "<|system|>"],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_decoder_settings(tokenizer) -> dict:
    """The config settings every tiny decoder of the tests shares (Llama, the MoE models): size and special tokens."""
    return dict(
        vocab_size=len(tokenizer),
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def build_tiny_llama(tokenizer, seed: int = 0, hidden_size: int = 16) -> LlamaForCausalLM:
    settings = tiny_decoder_settings(tokenizer)
    config = LlamaConfig(hidden_size=hidden_size, intermediate_size=2 * hidden_size, **settings)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def build_t5_tokenizer() -> T5Tokenizer:
    """A Flan-T5-like tokenizer (the same class and post-processor: EOS appended to every text) over the words above."""
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)] + [("▁" + word, -1.0) for word in WORDS]
    tokenizer = T5Tokenizer(vocab=vocab, extra_ids=0, additional_special_tokens=SPECIAL_TOKENS[4:])
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny_t5(tokenizer, seed: int = 0) -> T5ForConditionalGeneration:
    """A tiny T5 configured like Flan-T5 (gated-GELU, `tie_word_embeddings=False`, dropout 0.1)."""
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=16,
        d_kv=8,
        d_ff=32,
        num_layers=2,
        num_heads=2,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        dropout_rate=0.1,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return T5ForConditionalGeneration(config)


def build_tiny_reward_model(tokenizer, seed: int = 1) -> LlamaForSequenceClassification:
    """A tiny Llama reward model (one label) with the same vocabulary."""
    config = build_tiny_llama(tokenizer).config
    config.num_labels = 1
    torch.manual_seed(seed)
    return LlamaForSequenceClassification(config)


def save_checkpoint(tmp_path_factory, name: str, model, tokenizer) -> str:
    """`model` saved with its tokenizer in a new temp dir, loadable by path like a Hub checkpoint."""
    path = tmp_path_factory.mktemp(name)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny_llama_path(tmp_path_factory, tokenizer):
    return save_checkpoint(tmp_path_factory, "tiny-llama", build_tiny_llama(tokenizer), tokenizer)


@pytest.fixture(scope="session")
def t5_tokenizer():
    return build_t5_tokenizer()


@pytest.fixture(scope="session")
def tiny_t5_path(tmp_path_factory, t5_tokenizer):
    return save_checkpoint(tmp_path_factory, "tiny-t5", build_tiny_t5(t5_tokenizer), t5_tokenizer)


@pytest.fixture(scope="session")
def tiny_reward_model_path(tmp_path_factory, tokenizer):
    return save_checkpoint(tmp_path_factory, "tiny-reward-model", build_tiny_reward_model(tokenizer), tokenizer)


@dataclass
class Architecture:
    """A tiny model of one architecture: its saved checkpoint and tokenizer, and how the tests build and check it."""

    name: str
    path: str
    tokenizer: PreTrainedTokenizerBase
    model_class: type
    build: Callable  # a fresh model from the tokenizer, in train mode (dropout on)
    sequence_logps: Callable  # log pi(completion | prompt) by an independent forward
    lora_modules: list[str]


@pytest.fixture(params=["llama", "t5"])
def architecture(request) -> Architecture:
    """The tiny Llama (decoder-only) and the tiny T5 (encoder-decoder), for what must hold for both."""
    if request.param == "llama":
        return Architecture(
            "llama", request.getfixturevalue("tiny_llama_path"), request.getfixturevalue("tokenizer"),
            AutoModelForCausalLM, build_tiny_llama, sequence_logps, ["q_proj", "v_proj"],
        )
    return Architecture(
        "t5", request.getfixturevalue("tiny_t5_path"), request.getfixturevalue("t5_tokenizer"),
        AutoModelForSeq2SeqLM, build_tiny_t5, seq2seq_sequence_logps, ["q", "v"],
    )


def make_args(config_class, output_dir, **overrides):
    """A CPU training config in TRL's test style: tiny batches, a large learning rate, no reporting, no saving."""
    settings = dict(
        output_dir=str(output_dir),
        use_cpu=True,
        bf16=False,
        report_to="none",
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        max_steps=3,
        learning_rate=0.1,
        logging_steps=1,
        save_strategy="no",
        gradient_checkpointing=False,
        seed=42,
    )
    settings.update(overrides)
    return config_class(**settings)


def pointwise_rows(num_prompts=3, completions_per_prompt=4, num_refs=5, seed=0):
    """Pointwise text rows: several scored completions per prompt, and reference rewards per prompt."""
    rng = np.random.default_rng(seed)
    prompts = ["what is the sky", "tell me about the sea", "hello"][:num_prompts]
    answers = ["blue", "green grass", "yes it is good", "no", "maybe red", "sure"]
    rows = {"prompt": [], "completion": [], "reward": [], "ref_rewards": []}
    for p, prompt in enumerate(prompts):
        refs = rng.normal(size=num_refs).round(3).tolist()
        for c in range(completions_per_prompt):
            rows["prompt"].append(prompt)
            rows["completion"].append(" " + answers[(p + c) % len(answers)])
            rows["reward"].append(round(float(rng.normal()), 3))
            rows["ref_rewards"].append(refs)
    return rows


@torch.no_grad()
def sequence_logps(model, prompt_ids, completion_ids, normalization="sum") -> float:
    """log pi(completion | prompt) by a plain forward and log-softmax: independent of the trainers' fused LM head."""
    input_ids = torch.tensor([list(prompt_ids) + list(completion_ids)])
    log_probs = model(input_ids=input_ids).logits[0].double().log_softmax(-1)
    start = len(prompt_ids) - 1
    total = sum(log_probs[start + i, token].item() for i, token in enumerate(completion_ids))
    return total / len(completion_ids) if normalization == "mean" else total


@torch.no_grad()
def seq2seq_sequence_logps(model, prompt_ids, completion_ids, normalization="sum") -> float:
    """log pi(completion | prompt) for an encoder-decoder model: a plain forward with the completion as `labels`."""
    labels = torch.tensor([list(completion_ids)])
    logits = model(input_ids=torch.tensor([list(prompt_ids)]), labels=labels).logits[0].double()
    total = logits.log_softmax(-1).gather(-1, labels[0].unsqueeze(-1)).sum().item()
    return total / len(completion_ids) if normalization == "mean" else total


def logged(trainer, key="loss"):
    """The values of `key` in the trainer's log history, in order."""
    return [entry[key] for entry in trainer.state.log_history if key in entry]


def assert_loss_logged(trainer):
    losses = logged(trainer)
    assert losses and all(math.isfinite(loss) for loss in losses)
    for key in ("target", "log_ratio", "rewards/implicit", "logps/policy", "logps/ref"):
        assert all(math.isfinite(value) for value in logged(trainer, key)), key


def snapshot(model):
    return {name: param.detach().clone() for name, param in model.named_parameters()}


def assert_trained(model, before) -> None:
    """
    TRL's check after training: every parameter changed since `before` (a `snapshot`); for a LoRA model, every adapter
    weight changed and no base weight did.
    """
    lora = any("lora_" in name for name, _ in model.named_parameters())
    for name, param in model.named_parameters():
        trained = "lora_" in name or not lora
        assert torch.equal(param, before[name]) != trained, f"{name} {'did not change' if trained else 'changed'}"


def assert_same_loss_and_gradients(result, expected) -> None:
    """Two `(log-probs, loss, gradients by name)` results equal within 1e-5 (packed or shared rows vs padded)."""
    torch.testing.assert_close(result[0], expected[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(result[1], expected[1], atol=1e-5, rtol=1e-5)
    assert result[2].keys() == expected[2].keys() and result[2]
    for name in expected[2]:
        torch.testing.assert_close(result[2][name], expected[2][name], atol=1e-5, rtol=1e-5, msg=name)


def kill_after_two_chunks(command: list[str], cache, log_path, timeout: float, **popen_kwargs) -> tuple[str, int]:
    """Run the reference stage's `command` and SIGKILL it once it has written 2 of its 5 sampling chunks; check that
    it was killed midway. Returns the sampling directory and the number of chunks it wrote."""
    with open(log_path, "w") as log:
        killed = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, **popen_kwargs)
        deadline = time.monotonic() + timeout
        while len(glob.glob(str(cache / "sampling-*" / "chunk-*"))) < 2:  # 5 chunks of one `generate` call each
            assert killed.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.02)
        os.kill(killed.pid, signal.SIGKILL)
        killed.wait()
    (sampling_dir,) = glob.glob(str(cache / "sampling-*"))
    done = len(glob.glob(os.path.join(sampling_dir, "chunk-*")))
    assert 2 <= done < 5
    return sampling_dir, done
