"""An epoch cut short (trainer.max_time, which stops at a batch end) is marked partial, with its batch count, in
metrics.json and the log line, and is left out of the seconds per epoch."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from segx.training.callbacks import RunSummary


class TinyModule(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.layer(batch[0]).pow(2).mean()
        self.log("train/loss", loss, on_step=False, on_epoch=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


class StopAt(pl.Callback):
    """Stops training after `batch` batches of epoch `epoch`, as trainer.max_time's Timer does at a batch end."""

    def __init__(self, epoch: int, batch: int) -> None:
        self.epoch, self.batch = epoch, batch

    def on_train_batch_end(self, trainer: pl.Trainer, *args: object) -> None:
        if trainer.current_epoch == self.epoch and args[-1] + 1 == self.batch:
            trainer.should_stop = True


def test_an_epoch_cut_short_is_marked_partial(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data = DataLoader(TensorDataset(torch.randn(40, 4)), batch_size=4)  # 10 batches an epoch
    summary = RunSummary(tmp_path / "metrics.json", parameters={"total": 5, "trainable": 5}, monitor="train/loss")
    trainer = pl.Trainer(max_epochs=5, callbacks=[summary, StopAt(epoch=2, batch=3)], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    with caplog.at_level(logging.INFO, logger="segx.training.callbacks.run_summary"):
        trainer.fit(TinyModule(), train_dataloaders=data)
    record = json.loads((tmp_path / "metrics.json").read_text())
    history = record["history"]
    assert [entry["train_batches"] for entry in history] == [10, 10, 3]
    assert [bool(entry.get("partial")) for entry in history] == [False, False, True]
    assert record["seconds_per_epoch"] == pytest.approx(sum(record["epoch_seconds"][:2]) / 2)  # whole epochs only
    assert len(record["epoch_seconds"]) == 3
    assert "Epoch 3/5 (partial: 3 of 10 batches)" in caplog.text


def test_the_run_report_marks_a_partial_epoch(tmp_path: Path) -> None:
    from segx.report import write_report
    from segx.report.runs import read_run

    run_dir = tmp_path / "run"
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "overrides.yaml").write_text("[]\n")
    whole = {"epoch": 0.0, "val/miou": 0.4, "train_batches": 10}
    partial = {"epoch": 1.0, "val/miou": 0.5, "train_batches": 1, "partial": True}
    (run_dir / "metrics.json").write_text(json.dumps({
        "status": "completed", "monitor": "val/miou", "history": [whole, partial], "best": partial, "final": partial,
        "epochs": 2}))
    write_report([read_run(run_dir)], tmp_path / "report")
    text = (tmp_path / "report" / "report.md").read_text()
    assert "| best (2, partial: 1 batch) |" in text and "| final (2, partial: 1 batch) |" in text


def test_the_sweep_report_names_jobs_whose_best_epoch_was_partial(tmp_path: Path) -> None:
    from segx.report import collect_runs, write_report

    for job, best in enumerate(({"epoch": 1.0, "val/miou": 0.5, "train_batches": 3, "partial": True},
                                {"epoch": 1.0, "val/miou": 0.4, "train_batches": 10})):
        run_dir = tmp_path / "sweep" / str(job)
        (run_dir / ".hydra").mkdir(parents=True)
        (run_dir / ".hydra" / "overrides.yaml").write_text(f"- seed={job}\n- optimizer.lr={0.1 * (job + 1)}\n")
        (run_dir / "metrics.json").write_text(json.dumps({
            "status": "completed", "monitor": "val/miou", "history": [best], "best": best, "final": best,
            "epochs": 2}))
    write_report(collect_runs(tmp_path / "sweep"), tmp_path / "report", roots=[tmp_path / "sweep"])
    text = (tmp_path / "report" / "report.md").read_text()
    assert "**Partial best epochs:** the best epoch of job 0 (3 batches) was cut short" in text
    assert "job 1" not in text.split("**Partial best epochs:**")[1].split("\n")[0]
