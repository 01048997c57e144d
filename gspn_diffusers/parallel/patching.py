"""Replace a module's ``forward`` for the duration of patch parallelism and put it back exactly."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn
from torch.utils.hooks import RemovableHandle


class Patches:
    """Instance-level ``forward`` overrides and hooks, undone in reverse order by :meth:`restore`.

    An override is an instance attribute, so the class and every other instance are untouched; one the module
    already had (an accelerate offload hook) is kept underneath and put back.
    """

    def __init__(self) -> None:
        self._forwards: list[tuple[nn.Module, bool, object]] = []
        self._hooks: list[RemovableHandle] = []

    def forward(self, module: nn.Module, make: Callable[[Callable], Callable]) -> None:
        """``module.forward = make(current_forward)``."""
        had = "forward" in module.__dict__
        self._forwards.append((module, had, module.__dict__.get("forward")))
        module.forward = make(module.forward)

    def attribute(self, owner: object, name: str, make: Callable[[Callable], Callable]) -> None:
        """Any bound method of an object (a pipeline's helper), overridden on the instance."""
        had = name in vars(owner)
        self._forwards.append((owner, had, vars(owner).get(name), name))
        setattr(owner, name, make(getattr(owner, name)))

    def hook(self, handle: RemovableHandle) -> None:
        self._hooks.append(handle)

    def restore(self) -> None:
        for handle in reversed(self._hooks):
            handle.remove()
        for entry in reversed(self._forwards):
            owner, had, old = entry[:3]
            name = entry[3] if len(entry) > 3 else "forward"
            if had:
                setattr(owner, name, old)
            else:
                delattr(owner, name)
        self._hooks.clear()
        self._forwards.clear()
