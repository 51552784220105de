"""Every config file composes, and the options it documents are the ones the code takes."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from hydra._internal.utils import _locate
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from omegaconf import OmegaConf
from pytorch_lightning.demos.boring_classes import BoringModel

from tests.conftest import ROOT

CHOICES = [(group.name, path.stem) for group in sorted((ROOT / "conf").iterdir()) if group.is_dir()
           for path in sorted(group.glob("*.yaml"))]


@pytest.mark.parametrize("group, choice", CHOICES, ids=[f"{g}={c}" for g, c in CHOICES])
def test_every_choice_composes_and_names_real_arguments(group: str, choice: str) -> None:
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"{group}={choice}"])
    node = cfg.get(group)
    if group == "experiment" or not node or "_target_" not in node:
        return
    target = _locate(node._target_)
    if not isinstance(target, type):  # a function, e.g. a learning-rate schedule
        parameters = inspect.signature(target).parameters
        assert set(node) - {"_target_", "_partial_"} <= set(parameters), (group, choice)
        return
    accepted: set[str] = set()
    for cls in target.__mro__:  # **kwargs passed up to a base class (ShapesDataModule → VOCDataModule)
        if "__init__" not in vars(cls):
            continue
        parameters = inspect.signature(cls.__init__).parameters
        accepted |= {n for n, p in parameters.items() if p.kind is not inspect.Parameter.VAR_KEYWORD}
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
            break
    else:
        return  # takes anything (e.g. smp architecture options)
    # `decay` and `keras_epsilon` are segx's, taken by build_optimizer
    own_keys = {"_target_", "_convert_", "_partial_", "decay", "keras_epsilon"}
    assert set(node) - own_keys <= accepted, (group, choice, sorted(set(node) - own_keys - accepted))


TRAINER_ARGUMENTS = set(inspect.signature(pl.Trainer.__init__).parameters) - {"self"}
SUPPLIED_BY_CODE = {"logger", "callbacks", "default_root_dir"}  # the logger/ and callbacks/ groups, the run dir
DOCUMENTED = {"accelerator", "strategy", "devices", "num_nodes", "precision", "fast_dev_run", "max_epochs", "max_steps",
              "max_time", "limit_train_batches", "limit_val_batches", "val_check_interval", "check_val_every_n_epoch",
              "num_sanity_val_steps", "log_every_n_steps", "enable_checkpointing", "enable_progress_bar",
              "enable_model_summary", "accumulate_grad_batches", "gradient_clip_val", "deterministic", "benchmark",
              "sync_batchnorm", "profiler", "enable_autolog_hparams"}


def _trainer_lines() -> dict[str, str]:
    """Each top-level key of conf/trainer/default.yaml with its line."""
    lines = (ROOT / "conf" / "trainer" / "default.yaml").read_text().splitlines()
    return {line.split(":", 1)[0]: line for line in lines if line and not line.startswith(("#", " "))}


def test_trainer_defaults_are_commented_real_trainer_arguments() -> None:
    """A Lightning release that renames or drops an argument fails here, not in a user's run."""
    lines = _trainer_lines()
    keys = set(lines) - {"_target_"}
    assert OmegaConf.load(ROOT / "conf" / "trainer" / "default.yaml")._target_ == "pytorch_lightning.Trainer"
    assert keys <= TRAINER_ARGUMENTS - SUPPLIED_BY_CODE, sorted(keys - TRAINER_ARGUMENTS)
    assert DOCUMENTED <= keys, sorted(DOCUMENTED - keys)
    assert [key for key in keys if "#" not in lines[key]] == []
    assert lines["benchmark"].split("#")[0].split(":")[1].strip() == "null"


def test_an_unlisted_trainer_argument_passes_through_with_plus(tmp_path: Path) -> None:
    seen: list[bool] = []

    class Probe(BoringModel):
        def training_step(self, batch: Any, batch_idx: int) -> Any:
            seen.append(torch.is_anomaly_enabled())
            return super().training_step(batch, batch_idx)

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["+trainer.detect_anomaly=true",
                                          "+trainer.reload_dataloaders_every_n_epochs=2",
                                          "trainer.accelerator=cpu", "trainer.max_steps=1"])
    assert "detect_anomaly" not in _trainer_lines()
    # The arguments train() supplies itself (segx.training.train.train), so the node is instantiated as a run does.
    trainer: pl.Trainer = instantiate(cfg.trainer, precision="32-true", logger=False, callbacks=[],
                                      enable_checkpointing=False, enable_progress_bar=False,
                                      enable_model_summary=False, default_root_dir=str(tmp_path))
    assert trainer.reload_dataloaders_every_n_epochs == 2
    trainer.fit(Probe())
    assert seen == [True]  # Lightning ran the training step under torch.autograd.set_detect_anomaly(True)


def test_an_unlisted_trainer_key_without_plus_is_refused_with_the_fix() -> None:
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"), \
            pytest.raises(ConfigCompositionException) as info:
        compose("train", overrides=["trainer.detect_anomaly=true"])
    assert "Could not override 'trainer.detect_anomaly'" in str(info.value)
    assert "+trainer.detect_anomaly=true" in str(info.value)
