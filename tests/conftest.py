"""Offline fixtures: a word-level tokenizer with a chat template and tiny Llama checkpoints built in a temp dir."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification, PreTrainedTokenizerFast


SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]
WORDS = (
    "hi hello yo what is the sky color sea grass blue green red yes no maybe good bad great fine ok sure answer "
    "question please tell me about a an it this that one two three four five six seven eight nine ten"
).split()
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|> {{ message['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


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


def build_tiny_llama(tokenizer, seed: int = 0, hidden_size: int = 16) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def build_tiny_reward_model(tokenizer, seed: int = 1) -> LlamaForSequenceClassification:
    """A tiny Llama reward model (one label) with the same vocabulary."""
    config = build_tiny_llama(tokenizer).config
    config.num_labels = 1
    torch.manual_seed(seed)
    return LlamaForSequenceClassification(config)


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny_llama_path(tmp_path_factory, tokenizer):
    """A saved tiny Llama checkpoint with its tokenizer, loadable by path like a Hub model."""
    path = tmp_path_factory.mktemp("tiny-llama")
    build_tiny_llama(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_reward_model_path(tmp_path_factory, tokenizer):
    """A saved tiny Llama reward model with its tokenizer, loadable by path like a Hub reward model."""
    path = tmp_path_factory.mktemp("tiny-reward-model")
    build_tiny_reward_model(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


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


def logged(trainer, key="loss"):
    """The values of `key` in the trainer's log history, in order."""
    return [entry[key] for entry in trainer.state.log_history if key in entry]
