"""
Argument documentation shared by several public callables, written once and appended to their `Args:` section (by
`with_args_doc`), so that each docstring, as `help()` and the documentation show it, documents every argument.
"""

import re
import textwrap


# GRPOTrainer's convention for reward functions, as the reference stage applies it
_REWARD_FUNCTIONS = r"""
Reward functions, in [`~trl.GRPOTrainer`]'s convention; a completion's reward is their sum, weighted by
`args.reward_weights`. Each can be:

- a callable, called with `prompts=`, `completions=`, `completion_ids=` and the other dataset columns as
  keyword arguments (it must accept `**kwargs`), that returns one reward per completion. A reward that is
  not a finite number (`None`, NaN), a wrong number of rewards, or an exception stops with an error naming
  the function and the dataset rows;
- a string, the path of a reward model (a local directory when offline), loaded with
  `AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)`; custom-code models such as
  ArmoRM-Llama3-8B-v0.1 need `args.reward_model_trust_remote_code=True`, and their output's `score` is the
  reward;
- a [`~transformers.PreTrainedModel`] with one label, used as is.

A reward model scores prompt + completion, formatted with its own chat template for conversational data.
"""

_REWARD_PROCESSING_CLASSES = r"""
reward_processing_classes ([`~transformers.PreTrainedTokenizerBase`] or `list[PreTrainedTokenizerBase | None]`, *optional*):
    Tokenizers of the reward models, in the order of `reward_funcs` (`None` for callables). If `None`, or for a
    `None` entry, each reward model's tokenizer is loaded from its path.
"""

# `precompute_rewards`'s
REWARD_FUNCS_ARGS = (
    "reward_funcs (`str`, [`~transformers.PreTrainedModel`], `Callable`, or a `list` of them):\n"
    + textwrap.indent(_REWARD_FUNCTIONS.strip("\n"), "    ")
    + _REWARD_PROCESSING_CLASSES
)

POINTWISE_TRAINER_ARGS = r"""
model (`str`, [`~transformers.PreTrainedModel`] or [`~peft.PeftModel`]):
    Model to be trained: a causal language model, or an encoder-decoder one (`T5ForConditionalGeneration` and
    other `AutoModelForSeq2SeqLM` models). Can be either:

    - A string, the *model id* of a pretrained model on huggingface.co or the path of a directory saved with
      [`~transformers.PreTrainedModel.save_pretrained`]. The model is loaded with the keyword arguments in
      `args.model_init_kwargs`, as by [`~trl.DPOTrainer`].
    - A [`~transformers.PreTrainedModel`] or a [`~peft.PeftModel`] object.
ref_model ([`~transformers.PreTrainedModel`], *optional*):
    Reference model `pi_ref` of the log-ratio `log(pi_theta / pi_ref)`, and the model the reference stage
    samples from. If `None`, the reference is the initial `model` (with `peft_config` or a [`~peft.PeftModel`],
    the model with its adapters disabled: no second copy). With `args.precompute_ref_log_probs=True` (the
    default) the reference log-probabilities are computed once, before training, and no reference model is held
    during training.
data_collator ([`~transformers.DataCollator`], *optional*):
    Function that forms a batch from a list of elements of the prepared `train_dataset` or `eval_dataset`.
    Defaults to [`DataCollatorForPointwise`], which pads the samples, or packs them into one row with
    `args.padding_free`. Custom collators must truncate sequences to `args.max_length` themselves.
eval_dataset ([`~datasets.Dataset`], [`~datasets.IterableDataset`] or `dict[str, Dataset | IterableDataset]`, *optional*):
    Dataset(s) to use for evaluation, in the formats of `train_dataset`. Paired evaluation datasets keep both
    completions of every pair (whatever `args.paired_samples`), for DPO's pair metrics (`rewards/chosen`,
    `rewards/accuracies`, ...); the targets use the statistics of `train_dataset`.
processing_class ([`~transformers.PreTrainedTokenizerBase`], *optional*):
    Tokenizer used to process the data. If `None`, it is loaded from the model's name. If it has no padding
    token, `tokenizer.eos_token` is used. Vision-language datasets (`image` or `images` columns) are not
    supported.
compute_metrics (`Callable[[EvalPrediction], dict]`, *optional*):
    Function that computes metrics at evaluation, as in [`~trl.DPOTrainer`]: it takes a
    [`~transformers.EvalPrediction`] and returns a dictionary of metric values. The logits it receives are
    recomputed with an extra forward pass (with `args.padding_free`, those of the packed row).
callbacks (`list` of [`~transformers.TrainerCallback`], *optional*):
    Callbacks to customize the training loop, added to the default ones (see
    [callbacks](https://huggingface.co/docs/transformers/main_classes/callback)). Use
    [`~transformers.Trainer.remove_callback`] to remove a default one.
optimizers (`tuple[torch.optim.Optimizer | None, torch.optim.lr_scheduler.LambdaLR | None]`, *optional*, defaults to `(None, None)`):
    The optimizer and the scheduler to use. Default to `AdamW` on the model and a scheduler given by
    [`~transformers.get_linear_schedule_with_warmup`] controlled by `args`.
quantization_config ([`~transformers.BitsAndBytesConfig`], *optional*):
    Quantization configuration used when loading the model from a model identifier. Combine with `peft_config`
    for QLoRA training. Ignored if the model is already instantiated.
peft_config ([`~peft.PeftConfig`], *optional*):
    PEFT configuration used to wrap the model. If `None`, the model is not wrapped.
reward_funcs (`str`, [`~transformers.PreTrainedModel`], `Callable`, or a `list` of them, *optional*):
    Given, the reference stage (see [`precompute_rewards`]) completes a dataset that lacks rewards (or QRPO's
    `ref_rewards`) before the targets are made, with the sampling, scoring and cache settings of `args`.

""" + textwrap.indent(_REWARD_FUNCTIONS.strip("\n"), "    ") + _REWARD_PROCESSING_CLASSES


def with_args_doc(*fragments: str):
    """
    Decorator adding `fragments` (entries written as in a TRL `Args:` section, at no indentation) at the end of the
    `Args:` section of the decorated class's or function's docstring, at that section's indentation.
    """

    def decorate(documented):
        lines = documented.__doc__.splitlines()
        start = next(i for i, line in enumerate(lines) if line.strip() == "Args:")
        indent = _depth(lines[start])
        # The section ends before the next line indented no deeper than its header (`Returns:`, ...), or at the end
        ends = (i for i in range(start + 1, len(lines)) if lines[i].strip() and _depth(lines[i]) <= indent)
        end = next(ends, len(lines))
        while not lines[end - 1].strip():
            end -= 1
        entries = [textwrap.indent(fragment.strip("\n"), " " * (indent + 4)) for fragment in fragments]
        documented.__doc__ = "\n".join(lines[:end] + entries + lines[end:])
        return documented

    return decorate


def _depth(line: str) -> int:
    return len(line) - len(line.lstrip())
