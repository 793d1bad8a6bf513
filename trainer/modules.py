"""Two small helpers over ``nn.Module`` that the loop, the attacks, the training modes and the
saliency methods all need (imports torch only, so every layer of ``trainer`` can use them)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DDP / DataParallel wrapper, or ``model`` itself.

    Checkpoints store the unwrapped model (no ``module.`` prefix), and attack iterations run
    on it: they need input gradients only, and going through the wrapper would arm its
    gradient-reduction hooks for nothing.
    """
    wrappers = (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)
    return model.module if isinstance(model, wrappers) else model


@contextlib.contextmanager
def module_mode(model: torch.nn.Module, training: bool) -> Iterator[None]:
    """Run a block with ``model.train(training)``, then give every submodule back its own
    previous mode (a blanket ``model.train()`` would unfreeze deliberately frozen layers)."""
    before = [(m, m.training) for m in model.modules()]
    model.train(training)
    try:
        yield
    finally:
        for m, was in before:
            m.training = was
