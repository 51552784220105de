"""How a job's metrics.json records its ending through `run_job`: Ctrl-C and SIGTERM (real signals to a real
Lightning fit), a scheduler's stop, the code's own `sys.exit()`; and the one reader of run directories, which the
end-of-sweep summary and the report share."""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from segx import report
from segx.runs.discovery import find_runs
from segx.runs.job import JobInfo, record_worker_death, run_job
from segx.runs.overrides import override_settings, split_override
from segx.runs.record import JobRecord, best_value, read_record
from segx.runs.status import COMPLETED, FAILED, STOPPED, StopRequested, interruption
from segx.runs.summary import SweepSummary
from segx.training.callbacks import RunSummary
from segx.training.callbacks.checkpoint_on_interrupt import CheckpointOnInterrupt

EPOCHS = 3
Action = Callable[[pl.Trainer], None]


class TinyModule(pl.LightningModule):
    """A linear regression whose validation logs a `val/miou` (higher is better) for the run summary."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.layer(x), y)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val/miou", 1 / (1 + torch.nn.functional.mse_loss(self.layer(x), y)))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class At(pl.Callback):
    """Runs `action` once, at a batch of epoch 1 (so epoch 0 is in metrics.json) or at that epoch's validation end."""

    def __init__(self, action: Action, hook: str = "batch") -> None:
        self.action, self.hook = action, hook

    def on_train_batch_end(self, trainer: pl.Trainer, *args: object) -> None:
        if self.hook == "batch" and trainer.current_epoch == 1 and trainer.global_step % 4 == 2:
            self.action(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.hook == "validation" and trainer.current_epoch == 1 and not trainer.sanity_checking:
            self.action(trainer)


def tiny_train(action: Action | None = None, hook: str = "batch") -> Callable[[DictConfig, JobInfo, JobRecord], float]:
    """A real training function: a Lightning fit with segx's run summary and checkpoint-on-interrupt callbacks."""

    def train(cfg: DictConfig, job: JobInfo, record: JobRecord) -> float:
        record.start(devices="cpu")
        data = TensorDataset(torch.randn(16, 4, generator=torch.Generator().manual_seed(0)), torch.zeros(16, 1))
        summary = RunSummary(job.run_dir / "metrics.json", parameters={"total": 5, "trainable": 5},
                             provenance=record.fields)
        # save_top_k=0: the only checkpoint a run leaves is the one CheckpointOnInterrupt writes
        checkpoint = ModelCheckpoint(dirpath=job.run_dir / "checkpoints", save_top_k=0, save_last=False)
        callbacks: list[pl.Callback] = [summary, checkpoint, CheckpointOnInterrupt()]
        trainer = pl.Trainer(max_epochs=EPOCHS, accelerator="cpu", logger=False, enable_progress_bar=False,
                             enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=job.run_dir,
                             callbacks=[*callbacks, *([At(action, hook)] if action else [])])
        trainer.fit(TinyModule(), DataLoader(data, batch_size=4), DataLoader(data, batch_size=8))
        return best_value(read_record(job.run_dir) or {})

    return train


@pytest.fixture(autouse=True)
def keep_signal_handlers() -> Iterator[None]:
    """Lightning ignores SIGINT after a Ctrl-C; the rest of the session keeps the handlers it had. Python's own
    Ctrl-C handling meanwhile, even where the session inherited SIGINT ignored (a shell's background job)."""
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    for signum, handler in handlers.items():
        signal.signal(signum, handler)


def config() -> DictConfig:
    return OmegaConf.create({"ckpt_path": None})


def single(run_dir: Path) -> JobInfo:
    return JobInfo(run_dir=run_dir)


def sweep_job(sweep_dir: Path, num: int, *overrides: str) -> JobInfo:
    return JobInfo(run_dir=sweep_dir / str(num), multirun=True, num=num, overrides=list(overrides))


def send(signum: int) -> Action:
    return lambda trainer: os.kill(os.getpid(), signum)


def sys_exit(code: int | None) -> Action:
    return lambda trainer: sys.exit(code)


def stop(trainer: pl.Trainer) -> None:
    raise StopRequested(trainer.current_epoch, by="ASHA")


def test_a_finished_run_is_completed_with_its_best_score(tmp_path: Path) -> None:
    value = run_job(config(), single(tmp_path), tiny_train())
    record = read_record(tmp_path)
    assert record["status"] == COMPLETED and "error" not in record and record["epochs"] == EPOCHS
    assert value == best_value(record) and value == value


@pytest.mark.parametrize("signum, name, code", [(signal.SIGINT, "Ctrl-C", 130), (signal.SIGTERM, "SIGTERM", 143)])
def test_a_signal_is_recorded_as_what_it_was_and_saves_last_ckpt(signum: int, name: str, code: int, tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        run_job(config(), single(tmp_path), tiny_train(send(signum)))
    assert exit_info.value.code == code
    record = read_record(tmp_path)
    assert record["status"] == FAILED and record["error"].startswith(f"interrupted by {name}: resume with")
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file() and f"{name}: saved epoch 1" in caplog.text
    assert [int(h["epoch"]) for h in record["history"]] == [0]


def test_ctrl_c_before_training_is_ctrl_c_too(tmp_path: Path) -> None:
    def train(cfg: DictConfig, job: JobInfo, record: JobRecord) -> float:
        record.start()
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as exit_info:
        run_job(config(), single(tmp_path), train)
    assert exit_info.value.code == 130 and read_record(tmp_path)["error"].startswith("interrupted by Ctrl-C")


@pytest.mark.parametrize("code, exit_code", [(3, 3), (0, 1), (None, 1)])
def test_the_codes_own_sys_exit_is_a_failure_with_its_code_not_an_interruption(code: int | None, exit_code: int,
                                                                               tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exit_info:
        run_job(config(), single(tmp_path), tiny_train(sys_exit(code)))
    assert exit_info.value.code == exit_code  # a run that did not finish never exits 0
    record = read_record(tmp_path)
    assert record["status"] == FAILED and "interrupted" not in record["error"]
    assert record["error"].startswith(f"exited with code {code or 0} (sys.exit)")
    assert not (tmp_path / "checkpoints" / "last.ckpt").exists()  # not an interruption: nothing saved for it


def test_a_sweep_jobs_sys_exit_fails_that_job_only(tmp_path: Path) -> None:
    value = run_job(config(), sweep_job(tmp_path, 0, "seed=1"), tiny_train(sys_exit(3)))
    assert value != value  # NaN: the sweep goes on
    assert read_record(tmp_path / "0")["error"].startswith("exited with code 3")


def test_a_schedulers_stop_is_recorded_as_stopped_with_the_epoch_and_skipped_on_a_rerun(tmp_path: Path) -> None:
    job = sweep_job(tmp_path, 0, "seed=1")
    value = run_job(config(), job, tiny_train(stop, hook="validation"))
    record = read_record(job.run_dir)
    assert record["status"] == STOPPED and "error" not in record
    assert (record["stopped_at_epoch"], record["stopped_by"]) == (1, "ASHA")
    assert value == best_value(record) and value == value  # its score so far is its result
    assert not (job.run_dir / "checkpoints" / "last.ckpt").exists()

    def must_not_run(cfg: DictConfig, job: JobInfo, record: JobRecord) -> float:
        raise AssertionError("a stopped job was run again")

    assert run_job(config(), job, must_not_run) == value


def test_interruption_tells_signals_from_other_exits() -> None:
    from pytorch_lightning.utilities.exceptions import SIGTERMException

    try:
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            sys.exit(1)  # what `trainer.fit` does after Ctrl-C
    except SystemExit as lightning_ctrl_c:
        assert interruption(lightning_ctrl_c) == "Ctrl-C"
    assert interruption(SIGTERMException()) == "SIGTERM" and interruption(KeyboardInterrupt()) == "Ctrl-C"
    assert interruption(SystemExit(1)) is None and interruption(SystemExit(0)) is None
    assert interruption(StopRequested(2)) is None and interruption(ValueError("x")) is None


def test_override_settings_drop_prefixes_and_keep_the_last_value() -> None:
    assert split_override("++optimizer.lr=1e-3") == ("optimizer.lr", "1e-3")
    assert split_override("~callbacks.prediction_grid") == ("callbacks.prediction_grid", "")
    overrides = ["model=unet", "data.root=/x", "hydra.sweep.dir=y", "seed=1", "+model=fcn", "optimizer.lr=a=b"]
    assert override_settings(overrides) == {"seed": "1", "model": "fcn", "optimizer.lr": "a=b"}


@pytest.fixture
def sweep_with_a_dead_worker(tmp_path: Path) -> Path:
    """Job 0 completed; job 1's worker died before Hydra wrote its `.hydra/`: the launcher left only metrics.json."""
    sweep_dir = tmp_path / "sweep"
    run_job(config(), sweep_job(sweep_dir, 0, "optimizer=sgd"), tiny_train())
    (sweep_dir / "0" / ".hydra").mkdir()
    (sweep_dir / "0" / ".hydra" / "overrides.yaml").write_text("- optimizer=sgd\n")
    record_worker_death(sweep_dir / "1", 1, ["optimizer=adam"], "gpus", "the worker died (killed by the OOM killer)")
    assert sorted(p.name for p in (sweep_dir / "1").iterdir()) == ["metrics.json"]
    return sweep_dir


def test_the_sweep_summary_fails_for_a_job_whose_worker_died_before_hydra(sweep_with_a_dead_worker: Path,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    sweep_dir = sweep_with_a_dead_worker
    caplog.set_level(logging.INFO)
    with pytest.raises(SystemExit) as exit_info:
        SweepSummary().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep_dir)}}}))
    assert exit_info.value.code == 1
    assert "2 jobs, 1 completed, 1 failed" in caplog.text
    assert f"{sweep_dir / '1'}: the worker died (killed by the OOM killer)" in caplog.text


def test_the_report_lists_the_same_dead_job(sweep_with_a_dead_worker: Path) -> None:
    sweep_dir = sweep_with_a_dead_worker
    assert [(r.run_dir.name, r.status) for r in find_runs([sweep_dir])] == [("0", COMPLETED), ("1", FAILED)]
    rows = report.main([str(sweep_dir)])
    assert [(r["setting"], r["runs"], r["failed"]) for r in rows] == [("optimizer=sgd", 1, 0), ("optimizer=adam", 0, 1)]
    text = (sweep_dir / "report.md").read_text()
    assert f"| 1 | failed | `{sweep_dir / '1'}` | the worker died (killed by the OOM killer) |" in text


def test_a_sweep_with_a_stopped_job_succeeds_and_says_so(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    run_job(config(), sweep_job(tmp_path, 0, "seed=1"), tiny_train())
    run_job(config(), sweep_job(tmp_path, 1, "seed=2"), tiny_train(stop, hook="validation"))
    caplog.set_level(logging.INFO)
    SweepSummary().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}}))
    assert "2 jobs, 1 completed, 0 failed, 1 stopped early by the scheduler" in caplog.text
    assert [r.reason for r in find_runs([tmp_path])] == ["", "stopped by ASHA at epoch 1"]


def test_a_job_s_attempts_keep_its_first_start_and_say_how_each_ended(tmp_path: Path) -> None:
    """A job whose worker is lost waits as `retrying`; its next attempt keeps the first `started_at` and adds itself
    to `attempts`; a failure after the retries keeps the start too (not the failure's time)."""
    from segx.runs.record import lost_attempts
    from segx.runs.retries import retry_line
    from segx.runs.status import RETRYING, RUNNING

    job = JobInfo(run_dir=tmp_path, multirun=True, num=3, overrides=["seed=1"], launcher="gpus")
    first = JobRecord(job)
    first.start(devices="0")
    first.note(history=[{"epoch": 0.0}, {"epoch": 1.0}])
    started = first.fields["started_at"]

    line = retry_line(3, tmp_path, "The node with node id abc has been marked dead", 1, 3, "max_retries")
    assert line.startswith(f"Job 3 lost its node, host {first.fields['host']}; Ray said: The node with node id abc")
    assert line.endswith("It is queued for retry 1 of 3 (max_retries): it will resume after epoch 2 from its "
                         "last.ckpt.")
    waiting = read_record(tmp_path)
    assert (waiting["status"], waiting["retry"], waiting["retries"]) == (RETRYING, 1, 3)
    assert waiting["attempts"][0]["ended"].startswith("lost its node: The node with node id abc")
    assert find_runs([tmp_path])[0].reason.startswith("waiting for retry 1 of 3 after its worker was lost")

    second = JobRecord(job, resumes=waiting)  # the retry, in another process
    second.start(devices="0")
    resumed = read_record(tmp_path)
    assert resumed["status"] == RUNNING and "retry" not in resumed and resumed["started_at"] == started
    assert [a.get("from_epoch") for a in resumed["attempts"]] == [0, 2] and "ended" not in resumed["attempts"][1]

    record_worker_death(tmp_path, 3, ["seed=1"], "gpus", "The Ray worker running job 3 died and was retried 3 "
                                                         "time(s)")
    failed = read_record(tmp_path)
    assert failed["status"] == FAILED and failed["started_at"] == started < failed["ended_at"]
    assert len(failed["attempts"]) == 2 and failed["attempts"][1]["ended"].startswith("failed: The Ray worker")
    assert lost_attempts(failed) == 1


def test_a_running_record_whose_process_is_gone_says_so(tmp_path: Path) -> None:
    """Killed with its driver (SIGKILL): the record still says running, the sweep's summary and the report say
    that its process has ended."""
    import json
    import socket
    import subprocess

    from segx.runs.ownership import OWNER_FILE

    JobRecord(JobInfo(run_dir=tmp_path, multirun=True, num=0, overrides=[])).start()
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(ended.stdout)  # a process that has ended: its pid is free (reused only after the range wraps)
    (tmp_path / OWNER_FILE).write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "since": "x"}))
    assert find_runs([tmp_path])[0].reason.startswith(f"status running, but its process (pid {pid} on this host) "
                                                      "has ended without recording how")
    (tmp_path / OWNER_FILE).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": "x"}))
    assert find_runs([tmp_path])[0].reason.startswith("status running: still training")


def test_an_attempt_ray_tune_ended_is_said_to_be_a_pause_or_a_stop_once_that_is_known(tmp_path: Path) -> None:
    """The trial's process cannot tell a pause from a stop at Tune's report: its resume says pause, the scheduler's
    verdict says stop."""
    from segx.runs.record import TUNE_ENDED, write_stop_verdict

    job = JobInfo(run_dir=tmp_path, multirun=True, num=0, overrides=[], launcher="tune")
    first = JobRecord(job)
    first.start()
    first.end_attempt(f"ended by Ray Tune after epoch 2: {TUNE_ENDED}")
    second = JobRecord(job, resumes=read_record(tmp_path))  # promoted: it was a pause
    assert second.fields["attempts"][0]["ended"] == "ended by Ray Tune after epoch 2: paused at a rung"
    second.start()
    second.end_attempt(f"ended by Ray Tune after epoch 4: {TUNE_ENDED}")
    write_stop_verdict(tmp_path, 4, "successive halving")
    record = read_record(tmp_path)
    assert record["status"] == STOPPED
    assert [a["ended"] for a in record["attempts"]] == ["ended by Ray Tune after epoch 2: paused at a rung",
                                                        "ended by Ray Tune after epoch 4: stopped by successive "
                                                        "halving"]
