"""
The reference stage's decoding (`ReferenceStage._decode`) before and after it went through the Rust tokenizer's
`decode_batch`, in one process, alternating: the texts of `--num_prompts` text prompts (32 to 64 tokens) x 50
completions of 400 random tokens, with the word-level tokenizer of `benchmarks/benchmark.py` and (with `--smollm2`) the
demo's SmolLM2 byte-level BPE tokenizer. "before" is the parent commit's `_decode`, verbatim below. Checks that both
give the same texts and prints milliseconds per completion and their ratio.

    python benchmarks/benchmark_decoding.py [--smollm2] [--repeats 3]
"""

import argparse
import functools
import os
import statistics
import time
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

from qrpo_trl.reference_stage import ReferenceStage  # noqa: E402

from benchmark import build_tokenizer  # noqa: E402  (the word-level tokenizer of benchmarks/benchmark.py)


def decode_before(self, prompt_ids, completions_ids, conversational):
    """`ReferenceStage._decode` before: `batch_decode` on NumPy arrays, one sequence at a time."""
    decode = functools.partial(self.processing_class.batch_decode, skip_special_tokens=True)
    if conversational or self.is_encoder_decoder:
        return decode(completions_ids)
    per_prompt = len(completions_ids) // len(prompt_ids)
    prompts = decode(prompt_ids)
    texts = decode([np.concatenate([prompt_ids[i // per_prompt], ids]) for i, ids in enumerate(completions_ids)])
    return [
        text[len(prompts[i // per_prompt]) :] if text.startswith(prompts[i // per_prompt]) else decode([ids])[0]
        for i, (text, ids) in enumerate(zip(texts, completions_ids, strict=True))
    ]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num_prompts", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--smollm2", action="store_true", help="Also the demo's SmolLM2 tokenizer (byte-level BPE).")
    cli = parser.parse_args()
    tokenizers = {"word-level": build_tokenizer(4096)}
    if cli.smollm2:
        from transformers import AutoTokenizer

        from qrpo_trl.demo.models import smollm2_checkpoint

        tokenizers["SmolLM2 byte-level BPE"] = AutoTokenizer.from_pretrained(smollm2_checkpoint())
    rng = np.random.default_rng(0)
    for name, tokenizer in tokenizers.items():
        stage = SimpleNamespace(processing_class=tokenizer, is_encoder_decoder=False)
        words = len(tokenizer) - 200  # ordinary tokens: past the special ones, below any added at the end
        prompts = [rng.integers(4, words, size=rng.integers(32, 65)) for _ in range(cli.num_prompts)]
        completions = [rng.integers(4, words, size=400) for _ in range(50 * cli.num_prompts)]
        seconds = {"before": [], "after": []}
        for _ in range(cli.repeats):
            texts = {}
            for label, decode in (("before", decode_before), ("after", ReferenceStage._decode)):
                start = time.perf_counter()
                texts[label] = decode(stage, prompts, completions, False)
                seconds[label].append(time.perf_counter() - start)
            assert texts["before"] == texts["after"], "the texts differ"
        ms = {label: 1e3 * statistics.median(values) / len(completions) for label, values in seconds.items()}
        print(
            f"{name}: {len(completions)} completions of 400 tokens: before {ms['before']:.3f} ms, after "
            f"{ms['after']:.3f} ms per completion ({ms['before'] / ms['after']:.2f}x), same texts; load average "
            f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}"
        )


if __name__ == "__main__":
    main()
