"""`python -m tests.pause_trial OUT_DIR`: a Ray Tune experiment whose two function trials are each paused once
(PAUSE at their first report) while their training thread goes on with native work, as Tune's asynchronous
reports let it; their cleanup is the tune sweeper's (segx.search.trial.end_the_run_first). Each trial's teardown,
after Tune's stop reaches it, writes a marker file in OUT_DIR."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path


def train(config: dict) -> None:
    import torch
    from ray import tune

    x = torch.randn(400, 400)
    for epoch in range(1, 3):
        started = time.monotonic()
        while time.monotonic() - started < 1.0:  # an epoch of native work
            x = (x @ x).tanh()
        try:
            tune.report({"epoch": epoch, "score": float(x.mean())})
        except SystemExit:  # Tune's stop: a teardown with native work and a file written, as Lightning's
            started = time.monotonic()
            while time.monotonic() - started < 1.0:
                x = (x @ x).tanh()
            (Path(config["out"]) / f"teardown-{config['i']}-{os.getpid()}").write_text("done")
            raise


def main(out: Path) -> None:
    import ray
    from ray import tune
    from ray.tune.schedulers import FIFOScheduler, TrialScheduler
    from ray.tune.trainable.function_trainable import wrap_function

    from segx.search.trial import end_the_run_first

    class PauseOnce(FIFOScheduler):
        def __init__(self) -> None:
            super().__init__()
            self.paused: set[str] = set()

        def on_trial_result(self, tune_controller: object, trial: object, result: dict) -> str:
            if trial.trial_id in self.paused:
                return TrialScheduler.CONTINUE
            self.paused.add(trial.trial_id)
            return TrialScheduler.PAUSE

    class Trial(wrap_function(train)):  # type: ignore[misc]
        def cleanup(self) -> None:  # as hydra_plugins/segx_tune_sweeper's trainable
            end_the_run_first()
            super().cleanup()

    os.environ["RAY_CHDIR_TO_TRIAL_DIR"] = "0"
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=78643200)
    try:
        tune.Tuner(Trial, param_space={"i": tune.grid_search([0, 1]), "out": str(out)},
                   tune_config=tune.TuneConfig(scheduler=PauseOnce(), metric="score", mode="max", reuse_actors=False),
                   run_config=tune.RunConfig(storage_path=str(out / "tune"), name="pause", verbose=0)).fit()
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
