"""Small helpers shared by the trainers, the reference stage and the demo."""

import contextlib
import os
from collections.abc import Iterator

from torch import nn


@contextlib.contextmanager
def eval_mode(*models: nn.Module) -> Iterator[None]:
    """
    Put `models` in eval mode for the block, and give every module of them back its own training flag afterwards, even
    when the block raises (a model left in eval mode would then train without dropout, silently).
    """
    flags = [(module, module.training) for model in models for module in model.modules()]
    try:
        for model in models:
            model.eval()
        yield
    finally:
        for module, training in flags:
            module.training = training


def check_model_path(name: str, setting: str) -> None:
    """
    Raise a ValueError if `name` is written as a local path (absolute, relative with `./` or `~`, or deeper than a Hub
    id's `namespace/name`) but no such directory exists: `from_pretrained` would take it for a malformed Hub id.
    """
    path = os.path.expanduser(name)
    looks_local = os.path.isabs(path) or name.startswith((".", "~")) or name.count("/") > 1
    if looks_local and not os.path.isdir(path):
        what = "a file, not a model directory" if os.path.exists(path) else "no such directory"
        raise ValueError(
            f"`{setting}` {name!r}: {what}. A model is a local directory (as written by `save_pretrained`) or a Hub id "
            "'name' or 'namespace/name'."
        )
