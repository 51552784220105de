"""What segx's callbacks rely on in Lightning: RunCheckpoint's private ModelCheckpoint methods, and typed links."""

from __future__ import annotations

import inspect

import pytest
from pytorch_lightning.callbacks import ModelCheckpoint

from segx.training.callbacks import RunCheckpoint
from segx.training.callbacks.run_checkpoint import LIGHTNING_PRIVATE_METHODS


@pytest.mark.parametrize("name, parameters", LIGHTNING_PRIVATE_METHODS.items())
def test_lightning_still_has_the_private_methods_run_checkpoint_calls(name: str, parameters: tuple[str, ...]) -> None:
    method = getattr(ModelCheckpoint, name, None)
    assert callable(method), f"this Lightning release has no ModelCheckpoint.{name}: RunCheckpoint must be updated"
    assert tuple(inspect.signature(method).parameters)[1:] == parameters, \
        f"ModelCheckpoint.{name} changed its parameters: RunCheckpoint must be updated"


def test_run_checkpoint_calls_no_other_private_lightning_method() -> None:
    source = inspect.getsource(RunCheckpoint)
    private = {name for name in dir(ModelCheckpoint) if name.startswith("_") and not name.startswith("__")}
    used = {name for name in private if f"self.{name}(" in source or f"super().{name}(" in source}
    assert used == set(LIGHTNING_PRIVATE_METHODS), "list each private Lightning method it uses there"
