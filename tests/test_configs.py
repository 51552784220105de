"""Every config file composes, and the options it documents are the ones the code takes."""

from __future__ import annotations

import inspect

import pytest
import pytorch_lightning as pl
from hydra import compose, initialize_config_dir
from hydra._internal.utils import _locate

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
    own_keys = {"_target_", "_convert_", "_partial_", "decay"}  # `decay` is segx's, taken by build_optimizer
    assert set(node) - own_keys <= accepted, (group, choice, sorted(set(node) - own_keys - accepted))


def test_every_trainer_argument_is_settable_from_the_command_line() -> None:
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train")
    supplied_by_code = {"self", "logger", "callbacks", "default_root_dir"}
    arguments = set(inspect.signature(pl.Trainer.__init__).parameters) - supplied_by_code
    assert arguments <= set(cfg.trainer), sorted(arguments - set(cfg.trainer))
