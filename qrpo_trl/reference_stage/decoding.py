"""
Texts of many token sequences at once, the same as the tokenizer's `batch_decode(..., skip_special_tokens=True)`.
"""

from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast


def decode_texts(processing_class: PreTrainedTokenizerBase, sequences: list[list[int]]) -> list[str]:
    """
    The text of each sequence of token ids (plain lists of ints), special tokens skipped: what
    `processing_class.batch_decode(sequences, skip_special_tokens=True)` returns.

    A fast tokenizer decodes them all in one call of its Rust tokenizer's `decode_batch` (in parallel, with no per-id
    conversion in Python): `batch_decode` calls the same Rust decoding sequence by sequence. Otherwise this is
    `batch_decode` itself: for a Python tokenizer, one whose class decodes in its own way, or one that cleans up
    tokenization spaces (transformers applies its rules after the Rust decoding).
    """
    if not sequences:
        return []
    if _decodes_in_rust(processing_class):
        return processing_class.backend_tokenizer.decode_batch(sequences, skip_special_tokens=True)
    return processing_class.batch_decode(sequences, skip_special_tokens=True)


def _decodes_in_rust(processing_class: PreTrainedTokenizerBase) -> bool:
    """Whether `batch_decode` is the Rust decoding of each sequence and nothing else."""
    if not isinstance(processing_class, PreTrainedTokenizerFast) or processing_class.clean_up_tokenization_spaces:
        return False
    cls = type(processing_class)
    return all(
        getattr(cls, name) is getattr(PreTrainedTokenizerFast, name) for name in ("batch_decode", "decode", "_decode")
    )
