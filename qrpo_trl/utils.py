"""Small helpers shared by the trainers, the reference stage and the demo."""

import contextlib
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
