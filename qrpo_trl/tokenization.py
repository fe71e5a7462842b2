"""
Tokenisation of prompts and completions for decoder-only and encoder-decoder models, shared by the trainers and the
reference stage: the reference model samples from the very prompt ids the policy is trained on, and reward functions
get the completion ids the trainers train on.

Decoder-only: a text completion gets EOS appended (as TRL's DPOTrainer does), a conversation is tokenised by the chat
template, and the completion is what prompt + completion adds to the prompt. Encoder-decoder: the prompt (the encoder
input) and the completion (the decoder target) are tokenised apart, each with the tokenizer's special tokens as such
models are trained (T5 appends EOS to both), conversations first rendered to text by the chat template; the completion
ends with EOS exactly once.
"""

import json
from collections.abc import Mapping

from accelerate.logging import get_logger
from transformers import PreTrainedTokenizerBase, ProcessorMixin
from trl.data_utils import _tokenize, apply_chat_template, common_prefix_length


logger = get_logger(__name__)


def with_pad_token(processing_class: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """The tokenizer, its EOS token made its pad token if it has none (batches need one; nothing attends to it)."""
    if processing_class.pad_token_id is None:
        processing_class.pad_token = processing_class.eos_token
    return processing_class


def template_kwargs(columns: Mapping[str, list]) -> list[dict]:
    """
    Chat-template arguments of each row of a batch of columns (with `prompt`): its `tools` (a list, or a JSON string)
    and `chat_template_kwargs`, where the dataset has them.
    """
    rows = range(len(columns["prompt"]))
    tools = columns["tools"] if "tools" in columns else [None for _ in rows]
    extra = columns["chat_template_kwargs"] if "chat_template_kwargs" in columns else [None for _ in rows]
    return [
        {"tools": json.loads(row_tools) if isinstance(row_tools, str) else row_tools, **(row_extra or {})}
        for row_tools, row_extra in zip(tools, extra, strict=True)
    ]


def tokenize_prompts(
    processing_class, prompts: list, is_encoder_decoder: bool, templates_kwargs: list[dict]
) -> list[list[int]]:
    """
    Token ids of prompts alone, as the model is given them to generate: the encoder input of an encoder-decoder model,
    the start of a decoder-only model's sequence; conversations with the generation prompt.
    """
    if is_encoder_decoder:
        texts = [
            prompt
            if isinstance(prompt, str)
            else apply_chat_template({"prompt": prompt}, processing_class, **kwargs)["prompt"]
            for prompt, kwargs in zip(prompts, templates_kwargs, strict=True)
        ]
        return processing_class(text=texts)["input_ids"]
    if isinstance(prompts[0], str):
        return processing_class(text=prompts)["input_ids"]
    return [
        _tokenize(processing_class, prompt, add_generation_prompt=True, **kwargs)["input_ids"]
        for prompt, kwargs in zip(prompts, templates_kwargs, strict=True)
    ]


def tokenize_pairs(
    processing_class, prompts: list, completions: list, is_encoder_decoder: bool, templates_kwargs: list[dict]
) -> list[tuple[list[int], list[int]]]:
    """`(prompt_ids, completion_ids)` of prompt-completion pairs, as the trainers train on them."""
    tokenizer = processing_class.tokenizer if isinstance(processing_class, ProcessorMixin) else processing_class
    if is_encoder_decoder:
        return _encoder_decoder_pairs(processing_class, tokenizer, prompts, completions, templates_kwargs)
    prompt_ids = tokenize_prompts(processing_class, prompts, is_encoder_decoder, templates_kwargs)
    if isinstance(prompts[0], str):
        eos_token = tokenizer.eos_token
        completions = [c if c.endswith(eos_token) else c + eos_token for c in completions]
        texts = [prompt + completion for prompt, completion in zip(prompts, completions, strict=True)]
        full_ids = processing_class(text=texts)["input_ids"]
    else:
        full_ids = [
            _tokenize(processing_class, prompt + completion, **kwargs)["input_ids"]
            for prompt, completion, kwargs in zip(prompts, completions, templates_kwargs, strict=True)
        ]
    return [_split_at_common_prefix(p, f) for p, f in zip(prompt_ids, full_ids, strict=True)]


def _split_at_common_prefix(prompt_ids: list[int], full_ids: list[int]) -> tuple[list[int], list[int]]:
    # The completion starts where the tokenised prompt and prompt+completion diverge (see
    # `trl.data_utils.common_prefix_length`), which is not always the end of the prompt.
    prompt_len = common_prefix_length(prompt_ids, full_ids)
    if prompt_len < len(prompt_ids):
        logger.warning_once(
            "The tokenized prompt is not a prefix of the tokenized prompt+completion (chat template or token merge at "
            "the boundary); the completion starts where they diverge."
        )
    return full_ids[:prompt_len], full_ids[prompt_len:]


def _encoder_decoder_pairs(
    processing_class, tokenizer: PreTrainedTokenizerBase, prompts: list, completions: list,
    templates_kwargs: list[dict],
) -> list[tuple[list[int], list[int]]]:
    if not isinstance(prompts[0], str):
        texts = [
            apply_chat_template({"prompt": prompt, "completion": completion}, processing_class, **kwargs)
            for prompt, completion, kwargs in zip(prompts, completions, templates_kwargs, strict=True)
        ]
        prompts, completions = [text["prompt"] for text in texts], [text["completion"] for text in texts]
    prompt_ids = processing_class(text=prompts)["input_ids"]
    completion_ids = processing_class(text_target=completions)["input_ids"]
    # T5 tokenizers append EOS themselves (a second one if the text already ends with it), others may not
    eos_token_id = tokenizer.eos_token_id
    for ids in completion_ids:
        while ids and ids[-1] == eos_token_id:
            ids.pop()
    return [(p, c + [eos_token_id]) for p, c in zip(prompt_ids, completion_ids, strict=True)]
