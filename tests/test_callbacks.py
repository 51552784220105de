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


def test_the_progress_bar_counts_epochs_as_the_log_does() -> None:
    """EpochProgressBar overrides the one private method of RichProgressBar that builds the train bar's text."""
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import RichProgressBar

    from segx.training.callbacks import EpochProgressBar

    assert tuple(inspect.signature(RichProgressBar._get_train_description).parameters) == ("self", "current_epoch")
    bar = EpochProgressBar()
    trainer = pl.Trainer(max_epochs=15, logger=False, enable_checkpointing=False, callbacks=[bar],
                         enable_model_summary=False)
    bar.setup(trainer, pl.LightningModule(), stage="fit")  # where Lightning hands the bar its trainer
    assert bar._get_train_description(14).strip() == "Epoch 15/15"
    assert bar._get_train_description(0).strip() == "Epoch 1/15"
