"""The public API's docstrings: every argument documented, and every `Example:` block runs (on the tiny Llama)."""

import dataclasses
import inspect
import re
from unittest import mock

import pytest

import qrpo_trl
from qrpo_trl.reference_config import ReferenceStageFields


# The public API (`qrpo_trl.__all__`), but for the collator: trainers and `precompute_rewards`, the sampler, configs
TRAINERS = [
    qrpo_trl.PointwiseTrainer, qrpo_trl.QRPOTrainer, qrpo_trl.RPOTrainer, qrpo_trl.DROTrainer, qrpo_trl.precompute_rewards
]
SAMPLERS = [qrpo_trl.PromptGroupedSampler]
CONFIGS = [
    qrpo_trl.PointwiseConfig, qrpo_trl.QRPOConfig, qrpo_trl.RPOConfig, qrpo_trl.DROConfig, qrpo_trl.ReferenceConfig
]
DOCUMENTED = TRAINERS + SAMPLERS + CONFIGS
EXAMPLE_MODEL = "Qwen/Qwen2.5-0.5B-Instruct"


def documented_names(documented) -> set[str]:
    """The names of the entries of the docstring's `Args:` or `Parameters:` section (`name (`type`, ...):`)."""
    return set(re.findall(r"^ {8}(\w+) \(", documented.__doc__, re.MULTILINE))


def accepted_arguments(documented) -> set[str]:
    """The parameters of its signature; a class's `*args` and `**kwargs`, passed on to its base, stand for the base's."""
    parameters = inspect.signature(documented).parameters
    variadic = {inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD}
    names = {name for name, parameter in parameters.items() if parameter.kind not in variadic} - {"self"}
    if inspect.isclass(documented) and len(names) < len(parameters):
        names |= accepted_arguments(documented.__mro__[1])
    return names


def examples(documented) -> list[str]:
    """The code of the docstring's ```python blocks, without the `>>> ` and `... ` prompts and the printed output."""
    blocks = re.findall(r"```python\n(.*?)```", inspect.cleandoc(documented.__doc__), re.DOTALL)
    return [
        "\n".join(line[4:] for line in block.splitlines() if line.startswith((">>>", "...")))
        for block in blocks
    ]


@pytest.mark.parametrize("documented", TRAINERS + SAMPLERS, ids=lambda d: d.__name__)
def test_every_argument_is_documented(documented):
    assert documented_names(documented) == accepted_arguments(documented)


@pytest.mark.parametrize("config_class", CONFIGS + [ReferenceStageFields], ids=lambda config: config.__name__)
def test_every_field_is_documented(config_class):
    """The fields a config adds to its bases (the trainers' configs: to DPOConfig and the reference-stage fields)."""
    bases = [base for base in config_class.__mro__[1:] if dataclasses.is_dataclass(base)]
    inherited = {field.name for base in bases for field in dataclasses.fields(base)}
    added = {field.name for field in dataclasses.fields(config_class)} - inherited
    assert added and added <= documented_names(config_class)


def test_the_public_api_has_examples():
    public = {getattr(qrpo_trl, name) for name in qrpo_trl.__all__}
    assert public - {qrpo_trl.DataCollatorForPointwise} == set(DOCUMENTED)
    assert [len(examples(documented)) for documented in DOCUMENTED] == [1] * len(DOCUMENTED)


@pytest.mark.parametrize("documented", DOCUMENTED, ids=lambda d: d.__name__)
def test_example_runs(documented, tiny_llama_path, tmp_path, monkeypatch):
    """
    The example as written, with the tiny Llama for the Hub model. Its configs keep DPOConfig's `bf16=True`, which
    needs a GPU: the check is patched, so that the same code runs on this CPU (in bfloat16 autocast).
    """
    (code,) = examples(documented)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    namespace = {}
    with mock.patch("transformers.training_args.is_torch_bf16_gpu_available", return_value=True):
        exec(code.replace(EXAMPLE_MODEL, tiny_llama_path), namespace)
    if "trainer" in namespace:
        assert namespace["trainer"].state.global_step > 0
    if documented is qrpo_trl.precompute_rewards:
        assert namespace["dataset"].column_names == ["prompt", "completion", "reward", "ref_rewards"]
    if documented is qrpo_trl.PromptGroupedSampler:  # a permutation of the rows, each prompt's rows consecutive
        order, prompts = list(namespace["sampler"]), namespace["dataset"]["prompt_ids"]
        assert sorted(order) == list(range(len(prompts)))
        runs = [tuple(prompts[i]) for k, i in enumerate(order) if k == 0 or prompts[i] != prompts[order[k - 1]]]
        assert len(runs) == len(set(runs))
