import os
import textwrap
from functools import cached_property

import numpy as np
import torch
from accelerate.utils import DistributedDataParallelKwargs
from safetensors.torch import load_file, save_file
from torch import nn

from .data_utils import float_column
from .docstrings import POINTWISE_TRAINER_ARGS, with_args_doc
from .dro_config import DROConfig
from .pointwise_trainer import PointwiseTrainer
from .rpo_trainer import RPOTrainer


# The value function is registered as this submodule of the policy, so that DDP and DeepSpeed synchronise, place and
# partition it with the policy; it is saved next to the policy, in its own file, not in the policy's weights
VALUE_MODULE = "dro_value"
VALUE_WEIGHTS_NAME = "value_model.safetensors"


class ValueHead(nn.Module):
    """`V(x)` from a pooled prompt representation: `Linear -> Tanh -> Linear` (`"mlp"`) or one `Linear`."""

    def __init__(self, hidden_size: int, kind: str = "mlp", width: int = 512):
        super().__init__()
        if kind == "mlp":
            self.layers = nn.Sequential(nn.Linear(hidden_size, width), nn.Tanh(), nn.Linear(width, 1))
        else:
            self.layers = nn.Linear(hidden_size, 1)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.layers(pooled).squeeze(-1)


def pool_prompt_states(
    hidden: torch.Tensor, prompt_mask: torch.Tensor, segments: torch.Tensor, num_segments: int, pooling: str
) -> torch.Tensor:
    """
    One vector per segment (sample) from the hidden states of its prompt positions: their mean, or the state of the last
    one. `hidden` is `(positions, hidden_size)`; `prompt_mask` and `segments` (the sample of each position) are
    `(positions,)`. A sample without prompt positions gets zeros.
    """
    positions = prompt_mask.nonzero().squeeze(-1)
    states, owners = hidden[positions], segments[positions]
    if pooling == "mean":
        sums = hidden.new_zeros(num_segments, hidden.size(-1)).index_add(0, owners, states)
        counts = torch.bincount(owners, minlength=num_segments).clamp(min=1)
        return sums / counts.unsqueeze(-1).to(sums.dtype)
    last = torch.full((num_segments,), -1, device=hidden.device).scatter_reduce(0, owners, positions, "amax")
    return torch.where((last >= 0).unsqueeze(-1), hidden[last.clamp(min=0)], hidden.new_zeros(()))


@with_args_doc(POINTWISE_TRAINER_ARGS)
class DROTrainer(PointwiseTrainer):
    """
    Trainer for Direct Reward Optimization (DRO), from the paper [Offline Regularised Reinforcement Learning for Large
    Language Models Alignment](https://huggingface.co/papers/2405.19107) (Richemond et al. 2024), the baseline of the
    RPO paper. A drop-in replacement for [`~trl.DPOTrainer`]: same constructor, and `isinstance(trainer, DPOTrainer)`
    holds. TRL has no DRO.

    DRO learns from single completions rated by a reward, with no pairs and no reference samples: it minimises
    `L = 0.5 * E[(r - V(x) - beta * log(pi_theta(y|x) / pi_ref(y|x)))^2]` jointly over the policy and a value `V(x)`
    learned during training, so its regression target `r - V(x)` moves (QRPO's and RPO's are fixed before training).
    The loss is `L` itself, the paper's objective, as the RPO authors' DRO code minimises it: the policy gets the
    gradient of `L` with `V` held fixed, `-beta * (r - V - beta * log-ratio) * grad log pi_theta` (`beta` times the
    paper's policy gradient, a constant factor that Adam's per-parameter scaling removes), and `V` the gradient of its
    regression onto `r - beta * log-ratio`, `-(r - V - beta * log-ratio) * grad V`. The map stage stores the reward
    (z-scored with `normalize_rewards`) as `target`; each step subtracts `V(x)`.

    The value is, by default, a head ([`ValueHead`], `args.value_head`) on the policy's own prompt representation, read
    from the policy's forward (no second forward): the mean (or, `value_pooling="last"`, the last) of its last hidden
    states over the prompt tokens, or of its encoder states for an encoder-decoder model. Its input is detached, so the
    value's loss does not train the policy. Or a user's `value_model` (see below). Either trains in its own optimizer
    parameter group (`value_learning_rate`), is saved with every checkpoint and with the model
    (`value_model.safetensors`, next to the policy's weights) and restored when resuming. Logged: `value` (the mean
    `V(x)`), `value_loss` (`L`, the value's regression loss, equal to the policy's squared loss) and `residual` (the mean
    `|r - V(x) - beta * log-ratio|`, 0 at the optimum).

    At the optimum, within a prompt, `log-ratio_i - log-ratio_j = (r_i - r_j) / beta`; with finitely many observed
    completions `V(x)` is only bounded below, by RPO's value `beta * log sum_j pi_ref(y_j|x) exp(r_j / beta)`.

    Example:

    ```python
    >>> from datasets import Dataset
    >>> from qrpo_trl import DROConfig, DROTrainer

    >>> dataset = Dataset.from_dict(
    ...     {
    ...         "prompt": ["The sky is", "The sky is", "The sea is", "The grass is"],
    ...         "completion": [" blue.", " green.", " deep.", " made of water."],
    ...         "reward": [1.0, 0.2, 0.8, 0.0],
    ...     }
    ... )
    >>> args = DROConfig(output_dir="Qwen2.5-0.5B-DRO", beta=1.0, normalize_rewards=True)
    >>> trainer = DROTrainer(model="Qwen/Qwen2.5-0.5B-Instruct", args=args, train_dataset=dataset)
    >>> trainer.train()
    ```

    Args:
        args ([`DROConfig`], *optional*):
            Configuration for this trainer. If `None`, a default configuration is used, with `output_dir` named after
            the model (`<model name>-DRO`).
        train_dataset ([`~datasets.Dataset`] or [`~datasets.IterableDataset`]):
            Dataset to use for training, [standard](dataset_formats#standard) (plain text) or
            [conversational](dataset_formats#conversational) (lists of `{"role", "content"}` messages), in one of the
            formats:

            - pointwise: `prompt`, `completion`, `reward`; a prompt may have a single completion (DRO needs no
              statistics of a prompt's completions);
            - paired with scores: `prompt`, `chosen`, `rejected`, `chosen_reward`/`rejected_reward` (or
              `score_chosen`/`score_rejected`, or `chosen_rewards`/`rejected_rewards`): each pair becomes two
              pointwise samples, or one of them (`args.paired_samples`).

            Reference log-probabilities given as `ref_logps` (pointwise) or `ref_chosen_logps`/`ref_rejected_logps`
            (paired) are used as they are. Given `reward_funcs`, the reference stage (see [`precompute_rewards`])
            scores the completions that have no reward, and turns a prompt-only dataset into `args.num_generations`
            completions per prompt sampled from the reference model.

            A streamed [`~datasets.IterableDataset`] is prepared batch by batch as it is read, with
            `args.precompute_ref_log_probs=False` (the reference log-probabilities are computed at every step) and
            `args.max_steps`. It cannot be used with `normalize_rewards=True` (the statistics are taken over the whole
            training dataset) nor completed by `reward_funcs`.
        value_model ([`~torch.nn.Module`], *optional*):
            The value function `V(x)`, in place of the head on the policy's states: any model that maps the prompt's
            `input_ids` and `attention_mask` (tokenised by the policy's `processing_class`) to `logits` of shape
            `(batch, 1)`, such as an `AutoModelForSequenceClassification` with `num_labels=1` (TRL's PPO takes its
            value model the same way). Keyword only. It is trained with the policy, and the fields that shape the head
            (`value_head`, `value_head_hidden_size`, `value_pooling`) must keep their defaults. Not with
            `padding_free=True` (it scores the prompts alone). A given `optimizers` must hold its parameters.
    """

    _config_class = DROConfig
    _metric_columns = ("value",)
    _tag_names = ["trl", "dro"]
    _name = "DRO"
    _paper = {
        "title": "Offline Regularised Reinforcement Learning for Large Language Models Alignment",
        "id": "2405.19107",
        # docstyle-ignore
        "citation": textwrap.dedent("""\
            @article{richemond2024offline,
                title        = {{Offline Regularised Reinforcement Learning for Large Language Models Alignment}},
                author       = {Pierre Harvey Richemond and Yunhao Tang and Daniel Guo and Daniele Calandriello and Mohammad Gheshlaghi Azar and Rafael Rafailov and Bernardo Avila Pires and Eugene Tarassov and Lucas Spangher and Will Ellsworth and Aliaksei Severyn and Jonathan Mallinson and Lior Shani and Gil Shani and Idan Szpektor and Abe Ittycheriah and Avinatan Hassidim and Yossi Matias and R{\\'e}mi Munos and Bilal Piot},
                year         = 2024,
                eprint       = {arXiv:2405.19107},
            }"""),
    }

    # DRO normalises the rewards as RPO does: the same check and statistics
    _check_dataset = RPOTrainer._check_reward_spread
    _target_statistics = RPOTrainer._target_statistics

    def __init__(self, model, ref_model=None, args: DROConfig | None = None, *positional, value_model=None, **kwargs):
        super().__init__(model, ref_model, args, *positional, **kwargs)
        args = self.args
        if value_model is not None:
            defaults = {"value_head": "mlp", "value_head_hidden_size": 512, "value_pooling": "mean"}
            changed = [name for name, default in defaults.items() if getattr(args, name) != default]
            if changed:
                raise ValueError(
                    f"{', '.join(f'`{name}`' for name in changed)} shape the value head on the policy's states, which a "
                    "given `value_model` replaces: leave them at their defaults."
                )
            if self._padding_free:
                raise ValueError(
                    "A `value_model` scores the prompts alone, which packed rows (`padding_free=True`) do not hold "
                    "apart: set `padding_free=False`, or use the value head on the policy's states (no `value_model`)."
                )
        else:
            hidden_size = self.accelerator.unwrap_model(self.model).config.get_text_config().hidden_size
            # Seeded on its own, so that its initial weights do not depend on what drew random numbers before
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(args.seed)
                value_model = ValueHead(hidden_size, args.value_head, args.value_head_hidden_size)
        self._is_value_head = isinstance(value_model, ValueHead)
        if not self.is_deepspeed_enabled:  # DeepSpeed places the policy, and with it the value, when it wraps it
            value_model.to(self.args.device)
        self.accelerator.unwrap_model(self.model).add_module(VALUE_MODULE, value_model)
        # The value function: the head on the policy's states, or the given `value_model` (the same module once the
        # policy is wrapped)
        self.value_model = value_model

    def _build_accelerator_args(self, **kwargs):
        accelerator_args = super()._build_accelerator_args(**kwargs)
        # The value function runs on the policy's states but is no part of the outputs of its forward, from which DDP's
        # search for unused parameters starts: DDP would mark its parameters unused, then ready a second time when the
        # backward reaches them. Every trainable parameter of DRO (the policy's and the value's) gets a gradient at
        # every step, so there is nothing to search for.
        if self.args.ddp_find_unused_parameters:
            raise ValueError(
                "DROTrainer needs `ddp_find_unused_parameters=False` (None sets it): its value function is trained "
                "outside the outputs of the policy's forward, which DDP's search for unused parameters cannot follow."
            )
        for handler in accelerator_args["kwargs_handlers"]:
            if isinstance(handler, DistributedDataParallelKwargs):
                handler.find_unused_parameters = False
        return accelerator_args

    def _check_streamable(self, args, dataset_name):
        if args.normalize_rewards:
            raise ValueError(
                f"DROTrainer cannot stream the {dataset_name} dataset (IterableDataset) with `normalize_rewards=True`: "
                "the mean and standard deviation of the rewards are taken over the whole training dataset before the "
                "first step. Use a map-style Dataset, or z-score the rewards beforehand."
            )

    def _regression_targets(self, dataset, ref_logps, statistics):
        # The part of DRO's target r - V(x) known before training; V(x) is subtracted at each step
        rewards = float_column(dataset, "reward", "prepared")
        if self.args.normalize_rewards:
            rewards = (rewards - statistics["reward_mean"]) / statistics["reward_std"]
        return {"target": rewards}

    def _loss_scale(self):
        return 0.5  # L = 0.5 * E[residual^2], the paper's objective

    # ----------------------------------------------------------------------------------------------------------------
    # The value function

    def _compute_loss(self, model, inputs, return_outputs):
        inputs = dict(inputs)
        if not self._is_value_head:
            self._set_values(inputs, self._value_model_values(inputs))
            result = super()._compute_loss(model, inputs, return_outputs)
        else:
            # The head reads the prompt states of the policy's forward, which runs inside the base's loss: a forward
            # hook computes V(x) from them as the forward runs, before the base reads `target`. The policy's forward
            # comes first; a reference forward through the same model (adapters disabled) may follow, and is skipped.
            def on_prompt_states(module, args, output):
                if "value" not in inputs:
                    self._set_values(inputs, self._head_values(output[0], inputs))

            handle = self._prompt_state_module.register_forward_hook(on_prompt_states)
            try:
                result = super()._compute_loss(model, inputs, return_outputs)
            finally:
                handle.remove()
        loss = result[0] if return_outputs else result
        mode = "train" if self.model.training else "eval"
        value_loss = self.accelerator.reduce(loss.detach(), "mean").item()
        if self.aux_loss_enabled:  # an MoE policy: the base added its weighted load-balancing loss (logged mean)
            value_loss -= self.router_aux_loss_coef * self._metrics[mode]["aux_loss"][-1]
        self._metrics[mode]["value_loss"].append(value_loss)
        return result

    @staticmethod
    def _set_values(inputs: dict, values: torch.Tensor) -> None:
        # With V(x) attached, the base's residual target - beta * log-ratio is DRO's r - V(x) - beta * log-ratio, and
        # its gradient reaches V
        inputs["value"] = values
        inputs["target"] = inputs["target"] - values

    @cached_property
    def _prompt_state_module(self) -> nn.Module:
        """The module whose output holds the prompt states: the encoder, or the decoder-only model's decoder stack."""
        model = self.accelerator.unwrap_model(self.model)
        if self._is_peft_policy:
            model = model.get_base_model()
        return model.get_encoder() if self.is_encoder_decoder else model.get_decoder()

    def _head_values(self, hidden: torch.Tensor, inputs: dict) -> torch.Tensor:
        """V(x) of each sample from the policy's last hidden states (detached: no gradient into the policy)."""
        hidden = hidden.detach()
        if self.is_encoder_decoder:
            prompt_mask = inputs["attention_mask"]
        else:
            completion_mask = inputs["completion_mask"]
            # Prompt-learning PEFT prepends virtual tokens to the states; keep the positions of the real tokens
            hidden = hidden[:, -completion_mask.size(1) :]
            if "sample_index" in inputs:  # one packed row (`padding_free`): the positions of each sample's prompt
                num_samples = inputs["sample_lengths"].size(0)
                in_samples = torch.arange(completion_mask.size(1), device=hidden.device) < inputs["sample_lengths"].sum()
                prompt_mask = (completion_mask[0] == 0) & in_samples
                pooled = pool_prompt_states(
                    hidden[0], prompt_mask, inputs["sample_index"][0], num_samples, self.args.value_pooling
                )
                return self.value_model(pooled.float())
            prompt_mask = inputs["attention_mask"] * (1 - completion_mask)
        batch_size, length = prompt_mask.shape
        rows = torch.arange(batch_size, device=hidden.device).repeat_interleave(length)
        pooled = pool_prompt_states(
            hidden.reshape(batch_size * length, -1), prompt_mask.reshape(-1) > 0, rows, batch_size,
            self.args.value_pooling,
        )
        return self.value_model(pooled.float())

    def _value_model_values(self, inputs: dict) -> torch.Tensor:
        """V(x) of each sample from the user's value model, given the prompt alone."""
        if self.is_encoder_decoder:  # the encoder's input is the prompt
            input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
        else:  # the prompt starts each right-padded row: its completion becomes padding
            attention_mask = inputs["attention_mask"] * (1 - inputs["completion_mask"])
            input_ids = inputs["input_ids"].masked_fill(attention_mask == 0, self.data_collator.pad_token_id)
        logits = self.value_model(input_ids=input_ids, attention_mask=attention_mask).logits
        if logits.dim() != 2 or logits.size(1) != 1:
            raise ValueError(
                f"The value model must return `logits` of shape (batch, 1), one value per prompt; got "
                f"{tuple(logits.shape)}. Use e.g. an AutoModelForSequenceClassification with num_labels=1."
            )
        return logits.squeeze(-1).float()

    def create_optimizer(self, model=None):
        """The base's optimizer, with the value function's parameters in a group of their own (`value_learning_rate`)."""
        value_parameters = {id(param) for param in self.value_model.parameters()}
        if self.optimizer is not None:  # given to the constructor
            given = {id(param) for group in self.optimizer.param_groups for param in group["params"]}
            if not value_parameters <= given:
                raise ValueError(
                    "The optimizer given to DROTrainer does not hold the value function's parameters "
                    "(`trainer.value_model.parameters()`), which DRO trains with the policy."
                )
            return self.optimizer
        optimizer = super().create_optimizer(model)
        for group in optimizer.param_groups:
            group["params"] = [param for param in group["params"] if id(param) not in value_parameters]
        learning_rate = self.args.value_learning_rate
        optimizer.add_param_group(
            {
                "params": [param for param in self.value_model.parameters() if param.requires_grad],
                "weight_decay": self.args.weight_decay,
                "lr": self.args.learning_rate if learning_rate is None else learning_rate,
            }
        )
        return optimizer

    def create_model_card(self, model_name=None, dataset_name=None, tags=None):
        super().create_model_card(model_name, dataset_name, tags)
        if not self.is_world_process_zero():
            return
        if self._is_value_head:
            value = (
                f"a {self.args.value_head} head ({ValueHead.__name__}) on the {self.args.value_pooling}-pooled "
                f"{'encoder' if self.is_encoder_decoder else 'last hidden'} states of the prompt"
            )
        else:
            value = f"a separate value model ({type(self.value_model).__name__}) given the prompt"
        with open(os.path.join(self.args.output_dir, "README.md"), "a") as card:
            card.write(
                f"\n## Value function\n\nDRO learns a value V(x) of each prompt with the policy: {value}, saved in "
                f"`{VALUE_WEIGHTS_NAME}` next to the policy's weights (`qrpo_trl.DROTrainer`, tau = beta = "
                f"{self.args.beta:g}).\n"
            )

    # ----------------------------------------------------------------------------------------------------------------
    # Saving and loading: the policy's weights without the value function, which gets its own file

    def _save(self, output_dir=None, state_dict=None):
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if state_dict is None:
            state_dict = self.accelerator.unwrap_model(self.model).state_dict()
        prefix = f"{VALUE_MODULE}."
        value_state = {key[len(prefix) :]: value for key, value in state_dict.items() if key.startswith(prefix)}
        policy_state = {key: value for key, value in state_dict.items() if not key.startswith(prefix)}
        super()._save(output_dir, state_dict=policy_state)
        if self.args.should_save:
            value_state = {key: value.detach().cpu().contiguous() for key, value in value_state.items()}
            save_file(value_state, os.path.join(output_dir, VALUE_WEIGHTS_NAME), metadata={"format": "pt"})

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        self._load_value_model(resume_from_checkpoint)

    def _load_best_model(self):
        super()._load_best_model()
        if not self.is_deepspeed_enabled:  # DeepSpeed's checkpoint restores the whole module, value included
            self._load_value_model(self.state.best_model_checkpoint)

    def _load_value_model(self, checkpoint: str) -> None:
        path = os.path.join(checkpoint, VALUE_WEIGHTS_NAME)
        if not os.path.isfile(path):
            raise ValueError(f"The checkpoint {checkpoint} has no {VALUE_WEIGHTS_NAME}: DRO's value function is missing.")
        self.value_model.load_state_dict(load_file(path, device=str(self.args.device)))

    def _issue_warnings_after_load(self, load_result):
        # The policy's weights file leaves the value function out, on purpose: not a missing key
        prefix = f"{VALUE_MODULE}."
        load_result.missing_keys[:] = [key for key in load_result.missing_keys if not key.startswith(prefix)]
        super()._issue_warnings_after_load(load_result)
