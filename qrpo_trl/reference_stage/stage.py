"""
`ReferenceStage.run`, behind [`precompute_rewards`]: the dataset's rows grouped by distinct prompt, the two cached
passes (sampling, scoring) run in chunks over every process, and the join of their results into the dataset.
"""

import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import numpy as np
import pyarrow as pa
import torch
from accelerate import PartialState
from accelerate.logging import get_logger
from accelerate.utils import tqdm
from datasets import Dataset
from datasets.fingerprint import Hasher
from huggingface_hub.constants import HF_HOME
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from trl.data_utils import extract_prompt, is_conversational
from trl.trainer.utils import create_model_from_path, get_config_model_id, hash_module

from ..data_utils import PAIRED_COLUMNS, PAIRED_REWARD_COLUMNS, check_stage_columns, paired_reward_columns
from ..docstrings import REWARD_FUNCS_ARGS, with_args_doc
from ..fingerprint import tokenizer_fingerprint
from ..reference_config import ReferenceConfig, ReferenceStageFields
from ..tokenization import template_kwargs, tokenize_pairs, tokenize_prompts, with_pad_token
from ..utils import check_model_path
from .columns import StageResults, open_columns, write_columns
from .decoding import decode_texts
from .storage import ChunkStore, check_shared, schema_metadata
from .rewards import RewardFunc, RewardFunctions
from .sampling import completion_seeds, eos_token_ids, generate_completion_arrays
from .vllm_sampling import VLLMSampler, check_vllm_sampling


logger = get_logger(__name__)

# Columns the stage reads or writes; the others are passed to reward functions as keyword arguments
_STAGE_COLUMNS = {
    "prompt", "completion", "reward", "ref_rewards", "ref_completions", "quantile_reward", *PAIRED_COLUMNS,
    *(column for pair in PAIRED_REWARD_COLUMNS for column in pair),
}
_CACHE_FORMAT = "qrpo_trl-reference-v2"
# Dataset rows read (and hashed) at a time
_ROWS_PER_BATCH = 1024


@with_args_doc(REWARD_FUNCS_ARGS)
def precompute_rewards(
    dataset: Dataset,
    model: str | PreTrainedModel,
    reward_funcs: RewardFunc | list[RewardFunc],
    args: ReferenceStageFields | None = None,
    processing_class: PreTrainedTokenizerBase | None = None,
    reward_processing_classes: PreTrainedTokenizerBase | list[PreTrainedTokenizerBase | None] | None = None,
    add_ref_rewards: bool = True,
    dataset_name: str = "train",
) -> Dataset:
    r"""
    Complete a dataset with rewards: sample reference completions and score them (`ref_rewards`, for QRPO), score the
    completions that have no reward, and turn a prompt-only dataset into sampled, scored completions.

    Under `accelerate launch` or `torchrun`, call it on every process with the same dataset: each process samples and
    scores its share, and every process gets the whole result, identical to a single-process run.

    Example:

    ```python
    >>> from datasets import Dataset
    >>> from qrpo_trl import ReferenceConfig, precompute_rewards

    >>> def brevity(completions, **kwargs):
    ...     return [-float(len(completion.split())) for completion in completions]

    >>> dataset = Dataset.from_dict({"prompt": ["The sky is", "The sea is"], "completion": [" blue.", " very deep."]})
    >>> args = ReferenceConfig(num_generations=4, max_completion_length=32)
    >>> dataset = precompute_rewards(dataset, "Qwen/Qwen2.5-0.5B-Instruct", brevity, args)
    >>> dataset.column_names
    ['prompt', 'completion', 'reward', 'ref_rewards']
    ```

    Args:
        dataset ([`~datasets.Dataset`]):
            Standard text or conversational, one of:

            - prompt-only (`prompt`): each row becomes `num_generations` rows of completions sampled from the reference
              model, with their `reward` (on-policy data for the reference model, as RPO's
              `value_estimator="monte_carlo"` assumes);
            - pointwise (`prompt`, `completion`, optionally `reward`);
            - paired (`prompt`, `chosen`, `rejected`, optionally `chosen_reward`/`rejected_reward` or
              `score_chosen`/`score_rejected`).

            Existing reward columns are kept; missing ones are computed. Other columns are passed to the reward
            functions as keyword arguments, as in TRL's GRPO.
        model (`str` or [`~transformers.PreTrainedModel`]):
            The reference model (a causal LM, or an encoder-decoder LM such as T5), or its local path.
        args ([`ReferenceConfig`] or a trainer config, *optional*):
            Sampling, scoring and cache settings. Defaults to `ReferenceConfig()`.
        processing_class ([`~transformers.PreTrainedTokenizerBase`], *optional*):
            Tokenizer of the reference model. Loaded from the model's path if `None`.
        add_ref_rewards (`bool`, *optional*, defaults to `True`):
            Whether to add `ref_rewards`: per row, the rewards of `num_generations` completions sampled from the
            reference model for the row's prompt (and `ref_completions` if `args.keep_ref_completions`). A dataset that
            already has `ref_rewards` keeps them. RPO only needs `reward`, but with `value_estimator="monte_carlo"` it
            estimates `V(x)` from `ref_rewards` when given them.
        dataset_name (`str`, *optional*, defaults to `"train"`):
            Name used in progress bars and error messages.

    Returns:
        [`~datasets.Dataset`]: the dataset with `reward` (or `chosen_reward`/`rejected_reward`) and, if asked,
        `ref_rewards` and `ref_completions`.
    """
    args = args if args is not None else ReferenceConfig()
    reward_functions = RewardFunctions(
        reward_funcs, reward_processing_classes, args.reward_weights, args.reward_model_trust_remote_code
    )
    if isinstance(model, str):
        check_model_path(model, "model")
        model = create_model_from_path(model).to(PartialState().device)
    if processing_class is None:
        processing_class = AutoTokenizer.from_pretrained(get_config_model_id(model.config))
    with_pad_token(processing_class)
    return ReferenceStage(model, processing_class, reward_functions, args).run(dataset, add_ref_rewards, dataset_name)


class ReferenceStage:
    """
    The reference stage for one reference model and one set of reward functions; see [`precompute_rewards`].

    `model` is used as given (on its device, with its adapters as they are): the trainers pass their reference model
    unwrapped for generation. `model_fingerprint` identifies its weights in the cache key; it is hashed if `None`.
    """

    def __init__(
        self, model, processing_class, reward_functions: RewardFunctions, args: ReferenceStageFields,
        model_fingerprint: str | None = None,
    ):
        self.model = model
        self.is_encoder_decoder = model.config.is_encoder_decoder
        self.processing_class = processing_class
        self.reward_functions = reward_functions
        self.args = args
        self._model_fingerprint = model_fingerprint
        self.state = PartialState()
        if self.state.num_processes == 1 and int(os.environ.get("WORLD_SIZE", 1)) > 1:
            # Each process would compute everything and write the same cache files
            raise RuntimeError(
                f"The launcher started {os.environ['WORLD_SIZE']} processes, but accelerate sees one: on a machine "
                "without GPU, create `PartialState(cpu=True)` first (a trainer config with `use_cpu=True` does)."
            )
        self.cache_root = args.reference_cache_dir or os.path.join(HF_HOME, "qrpo_trl")

    @property
    def model_fingerprint(self) -> str:
        if self._model_fingerprint is None:
            self._model_fingerprint = hash_module(self.model)
        return self._model_fingerprint

    def run(self, dataset: Dataset, add_ref_rewards: bool, dataset_name: str) -> Dataset:
        check_stage_columns(dataset, dataset_name)
        if "prompt" not in dataset.column_names:
            dataset = dataset.map(extract_prompt, desc=f"Extracting prompt from {dataset_name} dataset")
        columns = dataset.column_names
        prompt_only = "completion" not in columns and "chosen" not in columns
        sample = prompt_only or (add_ref_rewards and "ref_rewards" not in columns)
        if "completion" in columns:
            to_score = [] if "reward" in columns else [("completion", "reward")]
        elif "chosen" in columns and paired_reward_columns(columns) is None:
            to_score = [("chosen", "chosen_reward"), ("rejected", "rejected_reward")]
        else:
            to_score = []
        if not (sample or to_score):
            return dataset

        check_shared(self.cache_root, self.state)
        kwarg_columns = [column for column in columns if column not in _STAGE_COLUMNS]
        rows = dataset.select_columns(["prompt", *(column for column, _ in to_score), *kwarg_columns])
        conversational = is_conversational({"prompt": rows[0]["prompt"]})
        groups = _Groups.scan(self, rows, to_score, kwarg_columns, sample, conversational, dataset_name)
        # From the data, not `dataset._fingerprint`, which can differ between processes: they must share the file
        output_key = _key(
            groups.scoring_key, Hasher.hash(dataset.features), prompt_only, sample and add_ref_rewards,
            self.args.keep_ref_completions,
        )
        output = ChunkStore(
            os.path.join(self.cache_root, f"output-{output_key}"),
            [(0, len(dataset) * (self.args.num_generations if prompt_only else 1))], [], self.state,
        )
        if not output.missing()[0]:
            logger.info(f"Reference stage of the {dataset_name} dataset: loaded from the cache {output.directory}.")
            return open_columns(dataset, output, prompt_only)

        sampling = self._sample(groups, conversational, dataset_name) if sample else None
        rewards = self._score(rows, groups, sampling, to_score, kwarg_columns, conversational, dataset_name)
        num_sampled = len(groups.first_rows) * self.args.num_generations if sample else 0
        results = StageResults(
            group_of_row=groups.of_row,
            num_generations=self.args.num_generations,
            sampled_rewards=rewards[:num_sampled] if sample else None,
            own_rewards={
                reward_column: rewards[num_sampled + i * len(dataset) : num_sampled + (i + 1) * len(dataset)]
                for i, (_, reward_column) in enumerate(to_score)
            },
            sampling=sampling,
            conversational=conversational,
        )
        # About 8 chunks' worth of completions per batch of the output: a prompt-only row expands to n rows of n
        # references each
        n = self.args.num_generations
        completions_per_row = (n if prompt_only else 1) * (n if sample and add_ref_rewards else 1)
        rows_per_batch = max(1, 8 * self.args.reference_chunk_size // completions_per_row)
        write_columns(
            dataset, results, prompt_only, add_ref_rewards, self.args.keep_ref_completions, output, rows_per_batch
        )
        return open_columns(dataset, output, prompt_only)

    # ------------------------------------------------------------------------------------------------------------------
    # The two passes

    def _sample(self, groups: "_Groups", conversational: bool, dataset_name: str) -> ChunkStore:
        """`num_generations` completions per group: their token ids, and their text, decoded in the chunk."""
        args = self.args
        n = args.num_generations
        eos_ids = eos_token_ids(self.model, self.processing_class)
        if args.use_vllm:
            check_vllm_sampling(self.model, args, self.state.num_processes)
            vllm = VLLMSampler(self.model, args)

        def compute(start: int, stop: int, progress) -> pa.Table:
            prompt_ids = [groups.prompt_ids(group) for group in range(start // n, stop // n)]
            seeds = [seed for ids in prompt_ids for seed in completion_seeds(args.seed, ids, n)]
            unit_prompt_ids = [ids for ids in prompt_ids for _ in range(n)]
            if args.use_vllm:
                completions = vllm.generate(unit_prompt_ids, seeds, eos_ids, args, progress)
                completions = [np.asarray(ids, dtype=np.int64) for ids in completions]
            else:
                completions = generate_completion_arrays(
                    self.model, self.processing_class, unit_prompt_ids, seeds, args, progress
                )
            lengths = np.fromiter(map(len, completions), dtype=np.int32, count=len(completions))
            offsets = np.zeros(len(completions) + 1, dtype=np.int32)
            np.cumsum(lengths, out=offsets[1:])
            values = np.concatenate(completions).astype(np.int32) if len(completions) else np.zeros(0, np.int32)
            last_tokens = values[offsets[1:][lengths > 0] - 1]
            truncated = int(np.count_nonzero(~np.isin(last_tokens, eos_ids)))
            prompt_arrays = [groups.prompt_array(group) for group in range(start // n, stop // n)]
            texts = self._decode(prompt_arrays, completions, conversational)
            table = pa.table({
                "completion_ids": pa.ListArray.from_arrays(offsets, values),
                "completion": pa.array(texts, type=pa.string()),
            })
            return table.replace_schema_metadata({"num_truncated": str(truncated)})

        # Chunks of whole prompts, so that a chunk's completions of one prompt are batched together
        ranges = self._ranges(len(groups.first_rows) * n, n)
        # vLLM's engine runs while chunks are sampled: its memory is given back before scoring and training
        engine = dict(around=vllm.running, group_size=args.vllm_tensor_parallel_size) if args.use_vllm else {}
        store, metadata = self._run_pass(
            "sampling", groups.sampling_key, ranges, ["completion_ids", "completion"], compute,
            f"Sampling reference completions for {dataset_name} dataset", **engine,
        )
        truncated = sum(int(entry.get("num_truncated", 0)) for entry in metadata)
        if truncated:
            logger.warning(
                f"{truncated} of {ranges[-1][1]} completions sampled for the {dataset_name} dataset reached "
                f"max_completion_length={args.max_completion_length} without an EOS token."
            )
        return store

    def _score(
        self, rows: Dataset, groups: "_Groups", sampling: ChunkStore | None, to_score: list[tuple[str, str]],
        kwarg_columns: list[str], conversational: bool, dataset_name: str,
    ) -> np.ndarray:
        """
        The reward of every completion that needs one: the sampled ones (group after group), then the dataset's own
        completions of each column of `to_score` (row after row), each called with its row's prompt and other columns.
        """
        n, num_rows = self.args.num_generations, len(rows)
        num_sampled = len(groups.first_rows) * n if sampling is not None else 0
        prompts_and_columns = rows.select_columns(["prompt", *kwarg_columns])

        def compute(start: int, stop: int, progress) -> pa.Table:
            completions, completion_ids, unit_rows = [], [], []
            if start < num_sampled:
                sampled = sampling.read_units(start, min(stop, num_sampled), ["completion_ids", "completion"])
                texts = sampled["completion"].to_pylist()
                completions += [[{"role": "assistant", "content": text}] for text in texts] if conversational else texts
                completion_ids += _id_lists(sampled["completion_ids"])
                unit_rows += groups.first_rows[np.arange(start, min(stop, num_sampled)) // n].tolist()
            for i, (column, _) in enumerate(to_score):
                first = num_sampled + i * num_rows
                row_start, row_stop = max(start, first) - first, min(stop, first + num_rows) - first
                if row_start >= row_stop:
                    continue
                own = rows[row_start:row_stop]
                pairs = tokenize_pairs(
                    self.processing_class, own["prompt"], own[column], self.is_encoder_decoder, template_kwargs(own)
                )
                completions += own[column]
                completion_ids += [ids for _, ids in pairs]
                unit_rows += range(row_start, row_stop)
            distinct = sorted(set(unit_rows))
            position = {row: i for i, row in enumerate(distinct)}
            fetched = prompts_and_columns[distinct]
            rewards = self.reward_functions(
                prompts=[fetched["prompt"][position[row]] for row in unit_rows],
                completions=completions,
                completion_ids=completion_ids,
                columns={c: [fetched[c][position[row]] for row in unit_rows] for c in kwarg_columns},
                rows=unit_rows,
                dataset_name=dataset_name,
                batch_size=self.args.generation_batch_size,
            )
            progress(len(unit_rows), sum(map(len, completion_ids)))
            return pa.table({"reward": pa.array(rewards, type=pa.float64())})

        ranges = self._ranges(num_sampled + len(to_score) * num_rows, 1)
        store, _ = self._run_pass(
            "scoring", groups.scoring_key, ranges, ["reward"], compute, f"Scoring completions of {dataset_name} dataset"
        )
        return np.concatenate([store.read(chunk, ["reward"])["reward"].to_numpy() for chunk in ranges])

    def _ranges(self, num_units: int, multiple: int) -> list[tuple[int, int]]:
        """
        Chunks of `reference_chunk_size` units (a multiple of `multiple`, at least one), smaller when there are too
        few units for every process to get a chunk: each chunk is computed by one process.
        """
        per_process = math.ceil(num_units / multiple / self.state.num_processes) * multiple
        size = max(multiple, min(self.args.reference_chunk_size // multiple * multiple, per_process))
        return [(start, min(start + size, num_units)) for start in range(0, num_units, size)]

    def _run_pass(
        self, kind: str, key: str, ranges: list[tuple[int, int]], columns: list[str],
        compute: Callable[..., pa.Table], description: str,
        around: Callable[[], AbstractContextManager] = nullcontext, group_size: int = 1,
    ) -> tuple[ChunkStore, list[dict]]:
        """
        `compute(start, stop, progress)` over the chunks `ranges` that the pass's cache does not have, each chunk
        computed and written by one process (the missing chunks dealt round-robin), inside `around()`, entered by every
        process when a chunk is missing. With `group_size` > 1 (vLLM's tensor parallelism), each group of `group_size`
        consecutive processes computes its chunks together, and the group's first process writes them. Returns the
        store, once every process is done, and the metadata of every chunk file.
        """
        store = ChunkStore(os.path.join(self.cache_root, f"{kind}-{key}"), ranges, columns, self.state)
        missing, metadata = store.missing()
        if not missing:
            logger.info(f"{description}: loaded from the cache {store.directory}.")
            return store, metadata
        group, rank_in_group = divmod(self.state.process_index, group_size)
        mine = missing[group :: self.state.num_processes // group_size]
        bar = tqdm(
            total=sum(stop - start for start, stop in mine), desc=description, unit="completion",
            main_process_only=True, disable=bool(os.environ.get("TQDM_DISABLE", "")),
        )
        start_time, num_tokens = time.perf_counter(), 0

        def progress(completions, tokens):
            nonlocal num_tokens
            num_tokens += tokens
            bar.update(completions)
            tokens_per_second = num_tokens / max(time.perf_counter() - start_time, 1e-9)
            bar.set_postfix_str(f"{tokens_per_second:.1f} tokens/s", refresh=False)

        failure, written = None, []
        with around():
            for chunk in mine:
                try:
                    table = compute(*chunk, progress)
                    if rank_in_group == 0:
                        store.write(chunk, table)
                except Exception as error:
                    if self.state.num_processes == 1:
                        raise
                    failure = error  # the others finish their chunks (kept in the cache), then every process raises
                    break
                if rank_in_group == 0:
                    written.append(schema_metadata(table.schema))
        bar.close()
        return store, metadata + store.finish(failure, written)

    # ------------------------------------------------------------------------------------------------------------------
    # Decoding

    def _decode(
        self, prompt_ids: list[np.ndarray], completions_ids: list[np.ndarray], conversational: bool
    ) -> list[str]:
        """
        The text of the completions of a chunk (`len(completions_ids) // len(prompt_ids)` per prompt, prompt after
        prompt); for conversational prompts, the content of the assistant's message. The ids go to the tokenizer as
        plain lists (`tolist` converts an array at once), decoded in batches (see [`decode_texts`]).
        """
        completions = [ids.tolist() for ids in completions_ids]
        if conversational or self.is_encoder_decoder:
            # An encoder-decoder model's decoder target stands alone: the trainers tokenise it apart from the prompt
            return decode_texts(self.processing_class, completions)
        # A decoder-only model's text completion continues its prompt: decoded alone, it would lose the leading space
        # that tokenizers such as SentencePiece fold into its first token, and prompt + completion would not be the
        # sampled text
        per_prompt = len(completions) // len(prompt_ids)
        prompts = [ids.tolist() for ids in prompt_ids]
        prompt_texts = decode_texts(self.processing_class, prompts)
        whole = [prompts[i // per_prompt] + ids for i, ids in enumerate(completions)]
        texts = decode_texts(self.processing_class, whole)
        # Where the prompt's text is not a prefix of the whole text, the completion decoded alone
        alone = [i for i, text in enumerate(texts) if not text.startswith(prompt_texts[i // per_prompt])]
        texts = [text[len(prompt_texts[i // per_prompt]) :] for i, text in enumerate(texts)]
        for i, text in zip(alone, decode_texts(self.processing_class, [completions[i] for i in alone]), strict=True):
            texts[i] = text
        return texts


class _Groups:
    """
    The dataset's distinct (prompt, reward-function columns), in order of first appearance, and the cache keys of the
    passes, found in one pass over the rows (a batch at a time): a row's group (`of_row`), a group's first row
    (`first_rows`) and, when sampling, a group's prompt token ids (one flat array).

    The keys are running hashes: sampling's over the reference model, the tokenizer, the settings and every group's
    prompt ids; scoring's over the reward functions, sampling's key and every row's prompt, reward-function columns
    and completions to score.
    """

    def __init__(self, of_row, first_rows, prompt_values, prompt_offsets, sampling_key, scoring_key):
        self.of_row = of_row
        self.first_rows = first_rows
        self._prompt_values = prompt_values
        self._prompt_offsets = prompt_offsets
        self.sampling_key = sampling_key
        self.scoring_key = scoring_key

    def prompt_array(self, group: int) -> np.ndarray:
        return self._prompt_values[self._prompt_offsets[group] : self._prompt_offsets[group + 1]]

    def prompt_ids(self, group: int) -> list[int]:
        return self.prompt_array(group).tolist()

    @classmethod
    def scan(
        cls, stage: "ReferenceStage", rows: Dataset, to_score, kwarg_columns, sample: bool, conversational: bool,
        dataset_name: str,
    ):
        args = stage.args
        tokenizer_hash = tokenizer_fingerprint(stage.processing_class)
        names = ["num_generations", "max_completion_length", "temperature", "top_p", "top_k", "seed", "use_vllm"]
        # vLLM's kernels differ with tensor parallelism and compilation (other sums, other samples)
        names += ["vllm_tensor_parallel_size", "vllm_enforce_eager"] if args.use_vllm else []
        settings = [getattr(args, name) for name in names]
        sampling_hash = _hasher(
            _CACHE_FORMAT, stage.model_fingerprint if sample else None, tokenizer_hash,
            eos_token_ids(stage.model, stage.processing_class), settings, conversational,
            _autocast_dtype(stage.model) if sample else None,
        )
        scored_columns = [column for column, _ in to_score]
        rows_hash = _hasher(_CACHE_FORMAT, scored_columns, kwarg_columns)
        index_of_key, of_row, first_rows = {}, np.empty(len(rows), dtype=np.int64), []
        prompt_values, prompt_lengths = [], []
        for start in range(0, len(rows), _ROWS_PER_BATCH):
            batch = rows[start : start + _ROWS_PER_BATCH]
            new_rows = []
            for i, prompt in enumerate(batch["prompt"]):
                group_key = json.dumps(
                    [prompt, {column: batch[column][i] for column in kwarg_columns}], sort_keys=True, default=str
                ).encode()
                digest = hashlib.blake2b(group_key, digest_size=16).digest()
                group = index_of_key.setdefault(digest, len(first_rows))
                if group == len(first_rows):
                    first_rows.append(start + i)
                    new_rows.append(i)
                of_row[start + i] = group
                rows_hash.update(digest)
                if scored_columns:
                    _update(rows_hash, json.dumps([batch[column][i] for column in scored_columns], default=str))
            if sample and new_rows:
                kwargs = template_kwargs(batch)
                ids = tokenize_prompts(
                    stage.processing_class, [batch["prompt"][i] for i in new_rows], stage.is_encoder_decoder,
                    [kwargs[i] for i in new_rows],
                )
                for row, prompt_ids in zip(new_rows, ids, strict=True):
                    if not prompt_ids:
                        raise ValueError(
                            f"Column 'prompt' of the {dataset_name} dataset, row {start + row}: the prompt is "
                            f"empty ({batch['prompt'][row]!r} has no token), and the reference model needs at least one "
                            "token to sample a completion from."
                        )
                    values = np.asarray(prompt_ids, dtype=np.int64)
                    _update(sampling_hash, values.tobytes())
                    prompt_values.append(values)
                    prompt_lengths.append(len(values))
        sampling_key = sampling_hash.hexdigest() if sample else None
        scoring_key = _hasher(
            rows_hash.hexdigest(), sampling_key, stage.reward_functions.fingerprint, tokenizer_hash,
            args.num_generations if sample else None,
        ).hexdigest()
        offsets = np.zeros(len(prompt_lengths) + 1, dtype=np.int64)
        np.cumsum(prompt_lengths, out=offsets[1:])
        values = np.concatenate(prompt_values) if prompt_values else np.zeros(0, dtype=np.int64)
        return cls(of_row, np.asarray(first_rows, dtype=np.int64), values, offsets, sampling_key, scoring_key)


def _id_lists(column: pa.ChunkedArray) -> list[list[int]]:
    """A list column of token ids as Python lists, a row at a time through NumPy (Arrow's `to_pylist` converts each id
    on its own)."""
    lists = []
    for chunk in column.chunks:
        values, offsets = chunk.values.to_numpy(), chunk.offsets.to_numpy()  # both ignore the chunk's slicing offset
        lists += [values[start:stop].tolist() for start, stop in zip(offsets[:-1], offsets[1:], strict=True)]
    return lists


def _update(hasher, data: str | bytes) -> None:
    """Add `data` to a running hash, length first, so that consecutive values cannot run into each other."""
    data = data.encode() if isinstance(data, str) else data
    hasher.update(len(data).to_bytes(8, "little"))
    hasher.update(data)


def _autocast_dtype(model) -> str | None:
    """The dtype of the autocast context sampling runs in (mixed precision draws other completions), else None."""
    if not isinstance(model, torch.nn.Module):  # vLLM samples with its own dtype, in the model's identity
        return None
    device = model.device.type
    return str(torch.get_autocast_dtype(device)) if torch.is_autocast_enabled(device) else None


def _hasher(*values):
    hasher = hashlib.sha256()
    _update(hasher, json.dumps(values, default=str))
    return hasher


def _key(*values) -> str:
    return _hasher(*values).hexdigest()[:32]
