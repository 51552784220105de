"""Lightning callbacks, one file each; the names here are the `_target_`s of conf/callbacks/."""

from segx.training.callbacks.checkpoint_on_interrupt import CheckpointOnInterrupt
from segx.training.callbacks.collective_timeout import CollectiveTimeout
from segx.training.callbacks.end_with_job import EndWithJob
from segx.training.callbacks.epoch_progress_bar import EpochProgressBar
from segx.training.callbacks.exact_resume import ExactResume
from segx.training.callbacks.prediction_grid import PredictionGridLogger
from segx.training.callbacks.run_checkpoint import RunCheckpoint
from segx.training.callbacks.run_summary import RunSummary
from segx.training.callbacks.stop_on_nonfinite_loss import NonFiniteLossError, StopOnNonFiniteLoss
from segx.training.callbacks.tune_report import TuneReport

__all__ = [
    "CheckpointOnInterrupt", "CollectiveTimeout", "EndWithJob", "EpochProgressBar", "ExactResume", "NonFiniteLossError",
    "PredictionGridLogger", "RunCheckpoint", "RunSummary", "StopOnNonFiniteLoss", "TuneReport",
]
