"""
The QRPO paper's off-policy training sets as a script: pairs of reference completions, from a dataset that kept them
(`qrpo-trl precompute` with `keep_ref_completions: true`). Every split is processed and saved with
`DatasetDict.save_to_disk(output_dir)`; see `qrpo_trl.offpolicy_pairs` for the modes.

```bash
qrpo-trl offpolicy --dataset_name scored-with-references --mode offpolicy10random --output_dir offpolicy10random
```
"""

import argparse
from dataclasses import dataclass, field

from trl import ScriptArguments

from qrpo_trl.offpolicy_pairs import OFFPOLICY_MODES


@dataclass
class OffPolicyScriptArguments(ScriptArguments):
    """
    TRL's script arguments (the dataset), and

    Args:
        mode (`str`):
            Which pairs of reference completions make the training set: `offpolicy2best`, `offpolicy2random`,
            `offpolicy6random` or `offpolicy10random` (the official QRPO code's modes).
        output_dir (`str`):
            Directory where the paired dataset (every split) is saved with `DatasetDict.save_to_disk`.
    """

    mode: str | None = field(
        default=None,
        metadata={"help": "Pairs of reference completions to build.", "choices": list(OFFPOLICY_MODES)},
    )
    output_dir: str | None = field(
        default=None,
        metadata={"help": "Directory where the paired dataset (every split) is saved with `save_to_disk`."},
    )


def main(script_args, dataset_args):
    from datasets import DatasetDict

    from qrpo_trl.offpolicy_pairs import offpolicy_pairs
    from qrpo_trl.scripts.utils import load_datasets

    if script_args.mode is None or script_args.output_dir is None:
        raise ValueError("Give the off-policy `mode` and the `output_dir` where the paired dataset is saved.")
    dataset = load_datasets(script_args, dataset_args)
    paired = DatasetDict({split: offpolicy_pairs(data, script_args.mode, split) for split, data in dataset.items()})
    paired.save_to_disk(script_args.output_dir)
    print(f"Saved the {script_args.mode} dataset to {script_args.output_dir}: {paired}")


def make_parser(subparsers: argparse._SubParsersAction | None = None, prog: str | None = None):
    from trl import DatasetMixtureConfig, TrlParser

    dataclass_types = (OffPolicyScriptArguments, DatasetMixtureConfig)
    if subparsers is not None:
        return subparsers.add_parser("offpolicy", help="Build off-policy pairs", dataclass_types=dataclass_types)
    return TrlParser(dataclass_types, prog=prog)


if __name__ == "__main__":
    script_args, dataset_args = make_parser().parse_args_and_config()
    main(script_args, dataset_args)
