"""
The `qrpo-trl` command line, built like TRL's `trl dpo` on `TrlParser`:

    qrpo-trl qrpo --config recipe.yaml [--field value ...]
    qrpo-trl rpo --config recipe.yaml --accelerate_config zero3 --num_processes 8

Every field of the command's dataclasses can be set in the YAML config or on the command line (which wins). Without
launch options the command runs in this process; with them (`--accelerate_config`, `--num_processes`, ...) it
relaunches itself under `accelerate launch`. Bad input ends with a one-line error and a non-zero exit code; any other
error, with its traceback.
"""

import argparse
import importlib
import os
import subprocess
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from transformers import TrainingArguments
from trl import TrlParser

from .scripts.utils import check_local_datasets


# Each command is the module `qrpo_trl.scripts.<name>`, shaped like TRL's scripts: `make_parser()` returns a
# `TrlParser` over the command's dataclasses and `main(*dataclasses)` runs it.
COMMANDS = {
    "qrpo": "Train with QRPO (Quantile Reward Policy Optimization)",
    "rpo": "Train with RPO (Reward Partitioning Optimization)",
    "dro": "Train with DRO (Direct Reward Optimization, a learned value)",
    "precompute": "Sample reference completions and score them with reward functions (the reference stage)",
    "offpolicy": "Build the QRPO paper's off-policy pairs from a dataset's reference completions",
}

# Shipped accelerate configs (for GPUs; see `--use_cpu` for a CPU-only machine)
ACCELERATE_CONFIGS_DIR = Path(__file__).parent / "accelerate_configs"


@dataclass
class LaunchArguments:
    """
    How to launch the command. With any of these set, the command relaunches itself under `accelerate launch`; they can
    be set in the YAML config too.
    """

    accelerate_config: str | None = field(
        default=None,
        metadata={
            "help": "Run under `accelerate launch` with this accelerate config: a shipped one (ddp, zero2, zero3, "
            "fsdp2) or the path of a YAML file. Defaults to ddp when another launch option is set."
        },
    )
    num_processes: int | None = field(
        default=None, metadata={"help": "Total number of processes (over all machines); overrides the config's."}
    )
    num_machines: int | None = field(default=None, metadata={"help": "Number of machines (multi-node training)."})
    machine_rank: int | None = field(default=None, metadata={"help": "Rank of this machine (multi-node training)."})
    main_process_ip: str | None = field(
        default=None, metadata={"help": "Address of the machine of rank 0 (multi-node training)."}
    )
    main_process_port: int | None = field(
        default=None,
        metadata={"help": "Port of the main process; give each concurrent launch on a machine its own."},
    )


class CommandParser(TrlParser):
    """A `TrlParser` whose errors are one line and whose config-file values are typed like command-line values."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")

    def set_defaults_with_config(self, **config) -> list[str]:
        # TrlParser sets config values as argparse defaults, which argparse only converts when they are strings: a
        # YAML `per_device_train_batch_size: 2.5` would reach the dataclass as a float. Scalars (and lists of scalars)
        # go through the same conversion and choice checks as on the command line; mappings stay as they are.
        for key, value in config.items():
            action = next((a for a in self._actions if a.dest == key and a.nargs != 0 and a.type), None)
            if action is None or value is None:
                continue
            takes_list = isinstance(value, list) and action.nargs in ("+", "*")
            items = value if takes_list else [value]
            if not all(isinstance(item, (str, int, float)) for item in items):
                # Mappings and lists stay as they are for fields that accept them (`dict | str`, `list[str] | str`)
                if action.type is str or takes_list:
                    continue
                raise ValueError(f"config field `{key}`: expected a single value, got {value!r}")
            try:
                config[key] = self._get_values(action, [str(item) for item in items])
            except argparse.ArgumentError as error:
                raise ValueError(f"config field `{key}`: {error.message}") from None
        return super().set_defaults_with_config(**config)

    def parse_command(self, args: list[str]) -> tuple:
        """The dataclasses of `args` (a `--config` YAML file first, then the command line), or a one-line error."""
        try:
            *dataclasses, config_unknown, cli_unknown = self.parse_args_and_config(
                args, return_remaining_strings=True, separate_remaining_strings=True
            )
        except yaml.YAMLError as error:  # its message spans lines: where the file breaks, and how
            self.error(f"the config file is not valid YAML: {' '.join(str(error).split())}")
        except (ValueError, TypeError, OSError) as error:  # config file, dataclass validation (`__post_init__`)
            self.error(str(error) if isinstance(error, (ValueError, OSError)) else f"{type(error).__name__}: {error}")
        problems = []
        if config_unknown:
            problems.append(f"unknown config fields: {', '.join(s.removeprefix('--') for s in config_unknown[::2])}")
        if cli_unknown:
            problems.append(f"unrecognized arguments: {' '.join(cli_unknown)}")
        if problems:
            self.error(f"{'; '.join(problems)} (`{self.prog} --help` lists the fields)")
        return tuple(dataclasses)


def resolve_accelerate_config(name: str) -> str:
    """The path of an accelerate config given by name (shipped ones) or path."""
    if os.path.isfile(name):
        return name
    shipped = ACCELERATE_CONFIGS_DIR / f"{name}.yaml"
    if shipped.is_file():
        return str(shipped)
    names = sorted(path.stem for path in ACCELERATE_CONFIGS_DIR.glob("*.yaml"))
    raise ValueError(f"accelerate config {name!r} is neither a file nor one of the shipped configs {names}.")


def command_parser(command: str) -> CommandParser:
    """The parser of a command: the dataclasses of its script, then `LaunchArguments`."""
    module = importlib.import_module(f"qrpo_trl.scripts.{command}")
    dataclass_types = [*module.make_parser().dataclass_types, LaunchArguments]
    return CommandParser(dataclass_types, prog=f"qrpo-trl {command}", allow_abbrev=False)


def under_launcher() -> bool:
    """Whether this process was started by `accelerate launch` (which sets the precision of every process it starts) or
    `torchrun`: then the launch options were applied, or are ignored."""
    return "ACCELERATE_MIXED_PRECISION" in os.environ or "LOCAL_RANK" in os.environ


def check_cpu_launch(training_args: TrainingArguments, config_file: str) -> None:
    """Refuse the launches that accelerate gets silently wrong when the processes run on CPU."""
    if training_args.device.type != "cpu":
        return
    if not training_args.use_cpu:
        raise ValueError("no GPU here: set `use_cpu` (without it, every launched process would train alone).")
    with open(config_file) as f:
        if yaml.safe_load(f).get("distributed_type") == "FSDP":
            raise ValueError("FSDP needs GPUs (on CPU, accelerate runs DDP instead): use ddp, zero2 or zero3.")


def launch(command: str, args: list[str], launch_args: LaunchArguments, dataclasses: tuple) -> None:
    """Run `qrpo-trl <command> <args>` under `accelerate launch`."""
    from accelerate.commands.launch import launch_command, launch_command_parser

    # Without a config, `accelerate launch` on a machine without GPUs silently starts a single process
    config_file = resolve_accelerate_config(launch_args.accelerate_config or "ddp")
    options = ["--config_file", config_file]
    for arg in fields(LaunchArguments):
        value = getattr(launch_args, arg.name)
        if arg.name != "accelerate_config" and value is not None:
            options += [f"--{arg.name}", str(value)]
    training_args = next((d for d in dataclasses if isinstance(d, TrainingArguments)), None)
    if training_args is not None:
        check_cpu_launch(training_args, config_file)
        # The accelerate config's precision would apply to every process (bf16 in the shipped ones, also on CPU)
        # where TrainingArguments leave it unset: the recipe's `bf16`/`fp16` decide.
        precision = "bf16" if training_args.bf16 else "fp16" if training_args.fp16 else "no"
        options += ["--mixed_precision", precision]
    launch_command(launch_command_parser().parse_args([*options, "--module", "qrpo_trl.cli", command, *args]))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="qrpo-trl",
        description="QRPO, RPO and DRO alignment with TRL. `qrpo-trl COMMAND --help` lists the fields of a command.",
        allow_abbrev=False,
    )
    subparsers = parser.add_subparsers(title="commands", dest="command", metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        subparsers.add_parser(name, help=help_text, add_help=False)
    known, _ = parser.parse_known_args(argv[:1])
    if known.command is None:
        parser.print_help()
        return 0 if not argv else 2

    command, args = known.command, argv[1:]
    parser = command_parser(command)
    *dataclasses, launch_args = parser.parse_command(args)
    try:
        check_local_datasets(dataclasses)
        if any(getattr(launch_args, arg.name) is not None for arg in fields(LaunchArguments)) and not under_launcher():
            launch(command, args, launch_args, dataclasses)
        else:
            importlib.import_module(f"qrpo_trl.scripts.{command}").main(*dataclasses)
    except (ValueError, OSError) as error:
        # Bad input (data, paths, settings) found by the command: its message, not a traceback. Anything else (a
        # TypeError, a KeyError, ...) is not ours to explain in one line: its traceback says what and where.
        parser.exit(1, f"{parser.prog}: error: {error}\n")
    except (subprocess.CalledProcessError, ChildFailedError):  # the launched processes have printed why
        parser.exit(1, f"{parser.prog}: error: the launched processes failed (see their errors above)\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
