"""
Reward functions in TRL GRPO's convention (callables, reward-model paths, reward models): loading, identity for the
cache key, and scoring with errors that name the function and the dataset rows.
"""

import functools
import json
import math
import uuid
from collections.abc import Callable

import numpy as np
import torch
from accelerate import PartialState
from accelerate.logging import get_logger
from accelerate.utils import broadcast_object_list
from datasets.fingerprint import Hasher
from torch import nn
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from trl.data_utils import apply_chat_template, is_conversational
from trl.trainer.utils import get_callable_name, get_config_model_id, hash_module

from ..fingerprint import UnreliableFingerprint, callable_fingerprint, tokenizer_fingerprint
from ..tokenization import with_pad_token
from ..utils import check_model_path, eval_mode


logger = get_logger(__name__)


RewardFunc = str | PreTrainedModel | Callable[..., list]


class RewardFunctions:
    """
    Reward functions in TRL GRPO's convention (callables, reward-model paths, reward models), loaded once; a
    completion's reward is their weighted sum. Any reward that is not a finite number is an error naming the function
    and the row.
    """

    def __init__(
        self, reward_funcs, reward_processing_classes=None, reward_weights: list[float] | None = None,
        trust_remote_code: bool = False,
    ):
        funcs = list(reward_funcs) if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
        if not funcs:
            raise ValueError("`reward_funcs` is empty: give at least one reward function or reward model.")
        if reward_processing_classes is None or isinstance(reward_processing_classes, PreTrainedTokenizerBase):
            reward_processing_classes = [reward_processing_classes] * len(funcs)
        if len(reward_processing_classes) != len(funcs):
            raise ValueError(
                f"{len(reward_processing_classes)} reward processing classes for {len(funcs)} reward functions."
            )
        if reward_weights is not None and len(reward_weights) != len(funcs):
            raise ValueError(f"{len(reward_weights)} `reward_weights` for {len(funcs)} reward functions.")
        self.weights = list(reward_weights) if reward_weights is not None else [1.0] * len(funcs)
        self.funcs, self.names, self.processing_classes = [], [], []
        for func, reward_processing_class in zip(funcs, reward_processing_classes, strict=True):
            if isinstance(func, str):
                func = _load_reward_model(func, trust_remote_code)
            if isinstance(func, nn.Module):
                model_id = get_config_model_id(func.config)
                if reward_processing_class is None:
                    reward_processing_class = AutoTokenizer.from_pretrained(model_id, trust_remote_code=trust_remote_code)
                with_pad_token(reward_processing_class)
                # The reward is read at the last non-padding token, found through the model's pad token id
                func.config.get_text_config().pad_token_id = reward_processing_class.pad_token_id
                self.names.append(model_id.rstrip("/").split("/")[-1])
            elif callable(func):
                self.names.append(get_callable_name(func))
            else:
                raise TypeError(
                    f"A reward function must be a callable, a reward model or its path, got {type(func).__name__}."
                )
            self.funcs.append(func)
            self.processing_classes.append(reward_processing_class)

    @functools.cached_property
    def fingerprint(self) -> str:
        """
        The reward functions' part of the cache key: reward models by their weights and tokenizer, callables by
        `callable_fingerprint`. A callable whose fingerprint cannot be trusted gets a key of its own for this run, the
        same on every process: its rewards are computed again, never taken from an earlier run.
        """
        identities = []
        for func, name, processing_class in zip(self.funcs, self.names, self.processing_classes, strict=True):
            if isinstance(func, nn.Module):
                identities.append(("model", hash_module(func), tokenizer_fingerprint(processing_class)))
                continue
            try:
                identities.append(("callable", callable_fingerprint(func)))
            except UnreliableFingerprint as error:
                logger.warning(
                    f"The reward function '{name}' cannot be fingerprinted reliably ({error}): its rewards are computed "
                    "again on every run rather than read from the cache."
                )
                run_token = [uuid.uuid4().hex]
                broadcast_object_list(run_token, from_process=0)
                identities.append(("this run only", run_token[0]))
        return Hasher.hash((identities, self.weights))

    def __call__(
        self, prompts: list, completions: list, completion_ids: list[list[int]], columns: dict[str, list],
        rows: list[int], dataset_name: str, batch_size: int,
    ) -> np.ndarray:
        """Weighted sum of the rewards of each completion; `rows` are the dataset rows, for error messages."""
        total = np.zeros(len(completions), dtype=np.float64)
        for func, name, processing_class, weight in zip(
            self.funcs, self.names, self.processing_classes, self.weights, strict=True
        ):
            if isinstance(func, nn.Module):
                rewards = list(_reward_model_scores(func, processing_class, prompts, completions, batch_size))
            else:
                rewards = self._call(func, name, prompts, completions, completion_ids, columns, rows, dataset_name)
            bad = [i for i, reward in enumerate(rewards) if reward is None or not math.isfinite(reward)]
            if bad:
                raise ValueError(
                    f"Reward function '{name}' returned {rewards[bad[0]]} for a completion of the prompt of row "
                    f"{rows[bad[0]]} of the {dataset_name} dataset ({_shorten(prompts[bad[0]])}): rewards must be "
                    f"finite numbers. {len(bad)} of {len(rewards)} rewards in this call are not."
                )
            total += weight * np.asarray(rewards, dtype=np.float64)
        return total

    @staticmethod
    def _call(func, name, prompts, completions, completion_ids, columns, rows, dataset_name) -> list[float | None]:
        where = f"rows {min(rows)} to {max(rows)} of the {dataset_name} dataset"
        try:
            output = func(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns)
        except Exception as error:
            raise RuntimeError(
                f"Reward function '{name}' raised {type(error).__name__} on the completions of {where}: {error}"
            ) from error
        if output is None or isinstance(output, (str, bytes, dict)) or not hasattr(output, "__len__"):
            raise ValueError(
                f"Reward function '{name}' returned {repr(output)[:80]} ({type(output).__name__}) for the "
                f"{len(completions)} completions of {where}: it must return a list of one reward per completion."
            )
        output = list(output)
        if len(output) != len(completions):
            raise ValueError(
                f"Reward function '{name}' returned {len(output)} rewards for the {len(completions)} completions of "
                f"{where}: it must return one reward per completion."
            )
        try:
            return [None if reward is None else float(reward) for reward in output]
        except (TypeError, ValueError) as error:
            raise ValueError(
                f"Reward function '{name}' returned a reward that is not a number for the completions of {where}: "
                f"{error}"
            ) from error


def _load_reward_model(path: str, trust_remote_code: bool = False) -> PreTrainedModel:
    check_model_path(path, "reward_funcs")
    try:
        # Custom-code reward models (ArmoRM, the QRPO paper's) load through their `auto_map` with trust_remote_code
        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=1, trust_remote_code=trust_remote_code
        )
    except OSError as error:
        raise ValueError(
            f"Could not load the reward model {path!r}: {error}\nA reward model given as a string is loaded with "
            "`AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)`; without access to the Hugging "
            "Face Hub (HF_HUB_OFFLINE=1, no network) it must be a local path to a saved model, or pass a model "
            "instance."
        ) from error
    return model.to(PartialState().device).eval()


@torch.inference_mode()
def _reward_model_scores(model, processing_class, prompts, completions, batch_size) -> np.ndarray:
    if is_conversational({"prompt": prompts[0]}):
        texts = [
            apply_chat_template({"messages": prompt + completion}, processing_class)["text"]
            for prompt, completion in zip(prompts, completions, strict=True)
        ]
    else:
        texts = [prompt + completion for prompt, completion in zip(prompts, completions, strict=True)]
    rewards = np.empty(len(texts), dtype=np.float64)
    order = np.argsort([-len(text) for text in texts], kind="stable")  # similar lengths together: less padding
    with eval_mode(model):
        for start in range(0, len(texts), batch_size):
            batch = order[start : start + batch_size]
            inputs = processing_class(
                text=[texts[i] for i in batch], return_tensors="pt", padding=True, padding_side="right",
                add_special_tokens=False,
            ).to(model.device)
            outputs = model(**inputs)
            # Custom-code reward models such as ArmoRM return their reward as `score` (and no `logits`)
            scores = outputs.score if getattr(outputs, "score", None) is not None else outputs.logits
            rewards[batch] = scores.reshape(len(batch), -1)[:, 0].double().cpu().numpy()
    return rewards


def _shorten(prompt, width: int = 80) -> str:
    text = prompt if isinstance(prompt, str) else json.dumps(prompt)
    return repr(text if len(text) <= width else text[: width - 3] + "...")

