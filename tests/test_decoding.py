"""
The reference stage decodes its completions in batches through the Rust tokenizer: the same texts as the tokenizer's
`batch_decode(..., skip_special_tokens=True)`, on special tokens, unicode, byte-level BPE and SentencePiece-like
tokenizers; Python tokenizers and tokenizers that clean up spaces keep `batch_decode`.
"""

from types import SimpleNamespace

import numpy as np
import pytest
from conftest import build_t5_tokenizer, build_tokenizer
from tokenizers import ByteLevelBPETokenizer, Tokenizer, models, pre_tokenizers
from transformers import ByT5Tokenizer, PreTrainedTokenizerFast

from qrpo_trl.reference_stage.decoding import _decodes_in_rust, decode_texts
from qrpo_trl.reference_stage.stage import ReferenceStage


UNICODE_TEXTS = [
    "Hello, world! Ça va ? Très bien.",
    "naïve café — 東京 and 北京, emoji 🙂🚀 and ñ",
    "  leading spaces, tabs\tand\nnew lines  ",
    "über straße déjà vu 😀 москва",
]


def byte_level_bpe(clean_up_tokenization_spaces=False) -> PreTrainedTokenizerFast:
    """A GPT-2-like byte-level BPE trained here on a few unicode texts, with special tokens."""
    backend = ByteLevelBPETokenizer()
    backend.train_from_iterator(UNICODE_TEXTS * 20, vocab_size=400, min_frequency=1, special_tokens=["<|endoftext|>"])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend._tokenizer, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        clean_up_tokenization_spaces=clean_up_tokenization_spaces,
    )
    return tokenizer


TOKENIZERS = {
    "word-level": build_tokenizer,
    "sentencepiece-like": build_t5_tokenizer,  # T5's class: a Unigram model with Metaspace ("▁") pre-tokenization
    "byte-level-bpe": byte_level_bpe,
    "byte-level-bpe-clean-up": lambda: byte_level_bpe(clean_up_tokenization_spaces=True),
    "python-byt5": ByT5Tokenizer,
}


def random_sequences(tokenizer, num_sequences=200, seed=0) -> list[list[int]]:
    """Encoded unicode texts with special tokens around them, cut anywhere (mid-character for byte-level), and random
    ids over the whole vocabulary (special ones included), of every length from 0."""
    rng = np.random.default_rng(seed)
    special = tokenizer.all_special_ids
    encoded = [tokenizer(text=text, add_special_tokens=False)["input_ids"] for text in UNICODE_TEXTS]
    sequences = [[]]
    for _ in range(num_sequences):
        ids = encoded[rng.integers(len(encoded))]
        start, stop = sorted(rng.integers(0, len(ids) + 1, size=2))
        sequences.append([*rng.choice(special, size=rng.integers(0, 3)).tolist(), *ids[start:stop], *special[:1]])
        sequences.append(rng.integers(0, len(tokenizer), size=rng.integers(0, 30)).tolist())
    return sequences


@pytest.mark.parametrize("name", TOKENIZERS)
def test_texts_are_those_of_batch_decode(name):
    tokenizer = TOKENIZERS[name]()
    sequences = random_sequences(tokenizer)
    expected = tokenizer.batch_decode(sequences, skip_special_tokens=True)
    assert decode_texts(tokenizer, sequences) == expected
    assert any(text != tokenizer.decode(ids) for text, ids in zip(expected, sequences))  # special tokens were skipped
    assert _decodes_in_rust(tokenizer) == (name in ("word-level", "sentencepiece-like", "byte-level-bpe"))


def test_clean_up_is_applied_where_the_tokenizer_asks_for_it():
    # Word-level: decoding joins tokens with spaces, which the clean-up removes before punctuation
    vocab = {token: i for i, token in enumerate(["<unk>", "hi", "what", "is", "it", ",", "?"])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", clean_up_tokenization_spaces=True)
    ids = tokenizer(text="hi, what is it?")["input_ids"]
    expected = tokenizer.batch_decode([ids], skip_special_tokens=True)
    assert decode_texts(tokenizer, [ids]) == expected == ["hi, what is it?"]


@pytest.mark.parametrize("name", ["word-level", "sentencepiece-like", "byte-level-bpe", "python-byt5"])
@pytest.mark.parametrize("conversational", [False, True])
def test_stage_texts_are_those_of_batch_decode(name, conversational):
    """The stage's completion texts: a text completion is the whole text minus the prompt's (decoded alone if the
    prompt's text is not a prefix); a conversational one is decoded alone."""
    tokenizer = TOKENIZERS[name]()
    sequences = random_sequences(tokenizer, num_sequences=60)
    prompts = [np.asarray(ids, dtype=np.int64) for ids in sequences[1:21:2]]  # 10 prompts, 12 completions each
    completions = [np.asarray(ids, dtype=np.int64) for ids in sequences[1:121]]
    stage = SimpleNamespace(processing_class=tokenizer, is_encoder_decoder=False)
    texts = ReferenceStage._decode(stage, prompts, completions, conversational)

    def decode(ids):
        return tokenizer.batch_decode([ids], skip_special_tokens=True)[0]

    expected = []
    for i, ids in enumerate(completions):
        if conversational:
            expected.append(decode(ids.tolist()))
            continue
        prompt_text = decode(prompts[i // 12].tolist())
        whole = decode(prompts[i // 12].tolist() + ids.tolist())
        expected.append(whole[len(prompt_text) :] if whole.startswith(prompt_text) else decode(ids.tolist()))
    assert texts == expected
