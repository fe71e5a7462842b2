"""The `qrpo-trl` command in this process: training, parsing, typing of config values, dataset loading, recipes and bad
input."""

import json
import sys
import tomllib
from importlib.metadata import entry_points
from pathlib import Path

import datasets
import pytest
import torch
import yaml
from accelerate.commands.config.config_args import load_config_from_file
from conftest import assert_trained, pointwise_rows, snapshot
from datasets import Dataset, DatasetDict
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from trl import DatasetMixtureConfig, ScriptArguments

from qrpo_trl.cli import COMMANDS, command_parser, main, resolve_accelerate_config
from qrpo_trl import DROTrainer, QRPOTrainer, RPOTrainer
from qrpo_trl.scripts.utils import build_trainer, load_datasets


ROOT = Path(__file__).parent.parent
TRAINERS = {"qrpo": QRPOTrainer, "rpo": RPOTrainer, "dro": DROTrainer}


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    """Keep what `load_dataset` caches out of the user's cache."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))


def write_jsonl(path: Path, rows: dict) -> Path:
    path.write_text("".join(json.dumps({k: v[i] for k, v in rows.items()}) + "\n" for i in range(len(rows["prompt"]))))
    return path


@pytest.fixture
def recipe(tmp_path, tiny_llama_path):
    """Write a tiny CPU recipe with `overrides`; return its path."""

    def write(**overrides) -> str:
        settings = {
            "model_name_or_path": tiny_llama_path,
            "dataset_name": str(write_jsonl(tmp_path / "data.jsonl", pointwise_rows())),
            "output_dir": str(tmp_path / "out"),
            "use_cpu": True,
            "bf16": False,
            "report_to": "none",
            "max_steps": 1,
            "save_strategy": "no",
        }
        settings.update(overrides)
        path = tmp_path / "recipe.yaml"
        path.write_text(yaml.safe_dump(settings))
        return str(path)

    return write


def fails(argv, capsys, code: int) -> str:
    """Run the command, which must exit with `code` after a one-line error on stderr, and return that line."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == code
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_console_script_runs_the_cli(monkeypatch, capsys):
    """The installed `qrpo-trl` script is the one pyproject.toml declares, and runs as the script does: `main()`."""
    with open(ROOT / "pyproject.toml", "rb") as f:
        declared = tomllib.load(f)["project"]["scripts"]
    installed = {script.name: script for script in entry_points(group="console_scripts") if script.dist.name == "qrpo-trl"}
    assert {name: script.value for name, script in installed.items()} == declared
    monkeypatch.setattr(sys, "argv", ["qrpo-trl", "qrpo", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        installed["qrpo-trl"].load()()
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith("usage: qrpo-trl qrpo [-h]")


def test_help(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert all(f"    {name}" in out for name in COMMANDS)
    with pytest.raises(SystemExit) as exit_info:
        main(["qrpo", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--beta" in out and "--accelerate_config" in out and "--num_ref_rewards" in out
    with pytest.raises(SystemExit) as exit_info:
        main(["dpo"])
    assert exit_info.value.code == 2


def test_command_trains_and_saves_a_model(recipe, tmp_path, tiny_llama_path, capsys):
    assert main(["qrpo", "--config", recipe(max_steps=2, learning_rate=0.1)]) == 0
    assert f"Model saved to {tmp_path / 'out'}" in capsys.readouterr().out
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    initial = AutoModelForCausalLM.from_pretrained(tiny_llama_path)
    assert_trained(trained, snapshot(initial))
    assert (tmp_path / "out" / "tokenizer_config.json").exists()


def test_dro_command_saves_the_policy_and_its_value_head(recipe, tmp_path):
    assert main(["dro", "--config", recipe(max_steps=2, learning_rate=0.1, value_head="linear")]) == 0
    AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert not any(key.startswith("dro_value") for key in load_file(tmp_path / "out" / "model.safetensors"))
    assert load_file(tmp_path / "out" / "value_model.safetensors").keys() == {"layers.weight", "layers.bias"}


def test_command_completes_the_dataset_with_reward_funcs(recipe, tmp_path, monkeypatch, capsys):
    """`reward_funcs` on the command line: the trainer's reference stage adds the missing `ref_rewards`."""
    rows = pointwise_rows()
    del rows["ref_rewards"]
    (tmp_path / "length_reward.py").write_text("def words(completions, **kwargs):\n    return [len(c.split()) for c in completions]\n")
    monkeypatch.chdir(tmp_path)
    config = recipe(
        dataset_name=str(write_jsonl(tmp_path / "no_refs.jsonl", rows)),
        reward_funcs=["length_reward.words"],
        num_generations=2,
        max_completion_length=3,
        reference_cache_dir=str(tmp_path / "cache"),
    )
    assert main(["qrpo", "--config", config]) == 0
    assert (tmp_path / "out" / "model.safetensors").exists()
    assert any((tmp_path / "cache").iterdir())
    assert "unknown reward function" not in capsys.readouterr().err
    assert "neither a reward-model directory" in fails(["qrpo", "--config", config, "--reward_funcs", "nowhere.nothing"], capsys, 1)


def test_config_values_are_typed_like_the_command_line(recipe):
    # YAML 1.1 reads 3e-7 as a string and 0 as an int
    path = recipe(learning_rate="3e-7", max_grad_norm=0, beta=1, num_ref_rewards=3, lora_target_modules=["q", "v"])
    script_args, training_args, model_args, _, launch_args = command_parser("qrpo").parse_command(
        ["--config", path, "--num_ref_rewards", "4", "--num_processes", "2"]
    )
    assert training_args.learning_rate == 3e-7 and training_args.max_grad_norm == 0.0 and training_args.beta == 1.0
    assert model_args.lora_target_modules == ["q", "v"]
    assert training_args.num_ref_rewards == 4  # the command line wins over the config
    assert launch_args.num_processes == 2 and launch_args.accelerate_config is None
    assert script_args.dataset_name.endswith("data.jsonl")


@pytest.mark.parametrize(
    "config, argv, message",
    [
        ({"foo_bar": 1}, [], "unknown config fields: foo_bar (`qrpo-trl qrpo --help` lists the fields)"),
        ({}, ["--foo", "3"], "unrecognized arguments: --foo 3 (`qrpo-trl qrpo --help` lists the fields)"),
        ({}, ["--learning_rat", "1"], "unrecognized arguments: --learning_rat 1"),  # no abbreviations
        ({"max_steps": 2.5}, [], "config field `max_steps`: invalid int value: '2.5'"),
        ({"learning_rate": [1, 2]}, [], "config field `learning_rate`: expected a single value, got [1, 2]"),
        ({"transform": "cube"}, [], "config field `transform`: invalid choice: 'cube'"),
        ({}, ["--learning_rate", "fast"], "argument --learning_rate/--learning-rate: invalid float value: 'fast'"),
        ({"beta": 0}, [], "`beta` must be > 0, got 0.0."),
    ],
)
def test_bad_fields(recipe, capsys, config, argv, message):
    line = fails(["qrpo", "--config", recipe(**config), *argv], capsys, code=2)
    assert line.startswith(f"qrpo-trl qrpo: error: {message}")


def test_missing_files(recipe, tmp_path, capsys):
    path = recipe()
    line = fails(["rpo", "--config", path, "--dataset_name", str(tmp_path / "nope.jsonl")], capsys, code=1)
    assert line == f"qrpo-trl rpo: error: dataset file not found: {tmp_path}/nope.jsonl"
    mixture = recipe(datasets=[{"path": "json", "data_files": str(tmp_path / "nope.parquet")}])
    line = fails(["rpo", "--config", mixture], capsys, code=1)
    assert line == f"qrpo-trl rpo: error: dataset file not found: {tmp_path}/nope.parquet"
    line = fails(["rpo", "--config", str(tmp_path / "nope.yaml")], capsys, code=2)
    assert line.startswith("qrpo-trl rpo: error: [Errno 2] No such file or directory")


def test_bad_data_fails_in_one_line(recipe, tmp_path, capsys):
    rows = pointwise_rows()
    rows["reward"][5] = None
    path = recipe(dataset_name=str(write_jsonl(tmp_path / "bad.jsonl", rows)))
    line = fails(["qrpo", "--config", path], capsys, code=1)
    assert line.startswith("qrpo-trl qrpo: error: Column 'reward' of the train dataset, row 5: expected a finite")
    assert not (tmp_path / "out").exists()


def test_launch_options_checked_before_launching(recipe, capsys):
    path = recipe()
    line = fails(["qrpo", "--config", path, "--accelerate_config", "zero9"], capsys, code=1)
    assert line == (
        "qrpo-trl qrpo: error: accelerate config 'zero9' is neither a file nor one of the shipped configs "
        "['ddp', 'fsdp2', 'zero2', 'zero3']."
    )
    line = fails(["qrpo", "--config", path, "--accelerate_config", "fsdp2", "--num_processes", "2"], capsys, code=1)
    assert line.endswith("FSDP needs GPUs (on CPU, accelerate runs DDP instead): use ddp, zero2 or zero3.")
    if not torch.cuda.is_available():
        line = fails(["qrpo", "--config", path, "--use_cpu", "false", "--num_processes", "2"], capsys, code=1)
        assert line.endswith("no GPU here: set `use_cpu` (without it, every launched process would train alone).")


@pytest.mark.parametrize("name", ["ddp", "zero2", "zero3", "fsdp2"])
def test_shipped_accelerate_configs(name):
    path = resolve_accelerate_config(name)
    assert Path(path).resolve() == (ROOT / "configs" / "accelerate" / f"{name}.yaml").resolve()
    config = load_config_from_file(path)
    assert config.num_processes == 8 and not config.use_cpu  # `use_cpu` would start a single process
    assert resolve_accelerate_config(path) == path


@pytest.mark.parametrize(
    "path", sorted(p.name for p in (ROOT / "configs").glob("*.yaml") if p.name.split("_")[0] in COMMANDS)
)
def test_recipes_build_their_trainers(path, tmp_path, tiny_llama_path, tiny_t5_path):
    """
    Each recipe, parsed by its command (which rejects unknown fields, see `test_bad_fields`), builds the command's
    trainer as the command does, with a tiny model of the recipe's architecture and a local dataset in place of the
    Hub's.
    """
    command = path.split("_")[0]
    if command == "precompute":  # no trainer: the reference stage's settings
        script_args, reference_args, *_ = command_parser(command).parse_command(["--config", str(ROOT / "configs" / path)])
        assert script_args.reward_funcs and reference_args.num_generations >= 3
        return
    # On a machine without GPU, bf16 needs `use_cpu`
    parsed = command_parser(command).parse_command(["--config", str(ROOT / "configs" / path), "--use_cpu"])
    script_args, training_args, model_args, dataset_args, launch_args = parsed
    if "tulu3" in path:  # the paper's global batch: 128 pairs, 256 completions
        processes = launch_args.num_processes or 1
        assert training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps * processes == 256
    encoder_decoder = "flan_t5" in path
    model_args.model_name_or_path = tiny_t5_path if encoder_decoder else tiny_llama_path
    splits = {script_args.dataset_train_split, script_args.dataset_test_split}
    rows = pointwise_rows(num_refs=20)  # as many reference rewards as a recipe uses
    DatasetDict({split: Dataset.from_dict(rows) for split in splits}).save_to_disk(tmp_path / "data")
    script_args.dataset_name, dataset_args.datasets = str(tmp_path / "data"), []
    training_args.output_dir = str(tmp_path / "out")
    trainer = build_trainer(TRAINERS[command], script_args, training_args, model_args, dataset_args)
    assert trainer.is_encoder_decoder == encoder_decoder
    assert trainer.model.dtype == getattr(torch, model_args.dtype or "float32")
    assert hasattr(trainer.model, "peft_config") == model_args.use_peft
    assert len(trainer.train_dataset) == 12 and (trainer.eval_dataset is None) == (training_args.eval_strategy == "no")


def test_load_datasets(tmp_path):
    rows = pointwise_rows()
    write_jsonl(tmp_path / "data.jsonl", rows)
    Dataset.from_dict(rows).to_parquet(tmp_path / "data.parquet")
    Dataset.from_dict(rows).save_to_disk(tmp_path / "saved")
    DatasetDict({"train": Dataset.from_dict(rows), "test": Dataset.from_dict(rows)}).save_to_disk(tmp_path / "splits")
    for name in ("data.jsonl", "data.parquet", "saved", "*.jsonl"):
        dataset = load_datasets(ScriptArguments(dataset_name=str(tmp_path / name)), DatasetMixtureConfig())
        assert list(dataset) == ["train"] and dataset["train"]["reward"] == rows["reward"], name
    assert list(load_datasets(ScriptArguments(dataset_name=str(tmp_path / "splits")), DatasetMixtureConfig())) == [
        "train",
        "test",
    ]
    mixture = DatasetMixtureConfig(datasets=[{"path": "json", "data_files": str(tmp_path / "data.jsonl")}] * 2)
    assert len(load_datasets(ScriptArguments(), mixture)["train"]) == 2 * len(rows["reward"])
    with pytest.raises(ValueError, match="No dataset: set `dataset_name`"):
        load_datasets(ScriptArguments(), DatasetMixtureConfig())


def test_broken_yaml_config_is_one_line(tmp_path, capsys):
    path = tmp_path / "broken.yaml"
    path.write_text("beta: 0.1\nlearning_rate: [1e-5\n  output_dir: x\n")
    line = fails(["qrpo", "--config", str(path)], capsys, code=2)
    assert line == (
        "qrpo-trl qrpo: error: the config file is not valid YAML: while parsing a flow sequence in "
        f"\"{path}\", line 2, column 16 expected ',' or ']', but got ':' in \"{path}\", line 3, column 13"
    )


def test_empty_data_file(recipe, tmp_path, capsys):
    (tmp_path / "empty.jsonl").write_text("")
    line = fails(["qrpo", "--config", recipe(dataset_name=str(tmp_path / "empty.jsonl"))], capsys, code=1)
    assert line == f"qrpo-trl qrpo: error: dataset file {tmp_path}/empty.jsonl is empty: it has no rows."


def test_nonexistent_model_path(recipe, tmp_path, capsys):
    path = str(tmp_path / "models" / "tiny")
    line = fails(["rpo", "--config", recipe(model_name_or_path=path)], capsys, code=1)
    assert line.startswith(f"qrpo-trl rpo: error: `model` '{path}': no such directory. A model is a local directory")


def test_errors_that_are_not_bad_input_keep_their_type_and_origin(recipe, monkeypatch):
    import qrpo_trl.scripts.qrpo

    def bug(*dataclasses):
        raise TypeError("unsupported operand type(s) for +: 'int' and 'str'")

    monkeypatch.setattr(qrpo_trl.scripts.qrpo, "main", bug)
    with pytest.raises(TypeError, match="unsupported operand"):  # its traceback, not one line without context
        main(["qrpo", "--config", recipe()])
