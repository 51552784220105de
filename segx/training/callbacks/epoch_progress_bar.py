"""Lightning's rich progress bar, counting epochs from 1 as segx's log lines do ("Epoch 15/15", not "14/14")."""

from __future__ import annotations

from pytorch_lightning.callbacks import RichProgressBar


class EpochProgressBar(RichProgressBar):
    """RichProgressBar whose train bar reads `Epoch <n>/<max_epochs>`, the numbering of the log and the report."""

    def _get_train_description(self, current_epoch: int) -> str:  # the one method Lightning builds the text in
        description = f"Epoch {current_epoch + 1}"
        if self.trainer.max_epochs is not None and self.trainer.max_epochs > 0:
            description += f"/{self.trainer.max_epochs}"
        if len(self.validation_description) > len(description):  # as Lightning pads it: no flicker
            description = f"{description:{len(self.validation_description)}}"
        return description
