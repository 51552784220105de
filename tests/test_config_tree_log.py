"""The composed config as a plain-text tree, and a real run logging it into its train.log."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from segx.core.console import GROUPS, config_tree, log_config_tree
from tests.conftest import QUIET, ROOT, TINY_MODEL, TINY_SHAPES, run_in_process


def _compose(*overrides: str) -> str:
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return config_tree(compose("train", overrides=list(overrides)))


def _stripped(tree: str) -> list[str]:
    """Each line without the tree guides, e.g. '│   ├── lr: 0.001' → 'lr: 0.001'."""
    return [line.lstrip("│├└─ ") for line in tree.splitlines()]


def test_tree_shows_groups_as_branches_and_overrides_as_leaves() -> None:
    tree = _compose("model=unet", "optimizer=sgd", "optimizer.lr=0.0042", "data=shapes")
    lines = _stripped(tree)
    assert lines[0] == "config"
    assert [line for line in lines if line in GROUPS] == list(GROUPS)  # branches, in reading order
    assert "_target_: segx.models.UNet" in lines
    assert "lr: 0.0042" in lines and "_target_: torch.optim.SGD" in lines
    assert "num_classes: 21" in lines  # `${oc.select:data.num_classes,21}` resolved
    assert "seed: 0" in lines
    assert "├── model" in tree and "│   ├── _target_: segx.models.UNet" in tree
    assert "\x1b" not in tree  # no ANSI escape codes


def test_unresolvable_values_show_as_written() -> None:
    cfg = OmegaConf.create({"model": {"name": "${hydra:job.name}", "width": "${nowhere}", "size": "???",
                                      "sizes": [1, "${nowhere}"]}, "empty": "", "off": None})
    lines = _stripped(config_tree(cfg))
    assert "name: ${hydra:job.name}" in lines and "width: ${nowhere}" in lines and "size: ???" in lines
    assert 'sizes: [1, "${nowhere}"]' in lines
    assert 'empty: ""' in lines and "off: null" in lines


def test_markup_in_values_is_kept_literally() -> None:
    lines = _stripped(config_tree(OmegaConf.create({"note": "[bold]x[/bold]"})))
    assert "note: [bold]x[/bold]" in lines


def test_log_config_tree_is_one_info_message(caplog: pytest.LogCaptureFixture) -> None:
    cfg = OmegaConf.create({"data": {"image_size": 32}})
    with caplog.at_level(logging.INFO, logger="segx.test"):
        log_config_tree(cfg, logging.getLogger("segx.test"))
    [record] = caplog.records
    assert record.levelno == logging.INFO
    assert record.getMessage().startswith("Config:\nconfig\n") and "image_size: 32" in record.getMessage()


@pytest.mark.slow
def test_a_training_run_logs_its_composed_config(shapes_root: Path, tmp_path: Path) -> None:
    run_in_process("train.py", *TINY_MODEL, *TINY_SHAPES, *QUIET, f"data.root={shapes_root}", "optimizer.lr=0.0123",
                    "trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
                    "trainer.num_sanity_val_steps=0", "trainer.accelerator=cpu", "logger=none",
                    "callbacks.prediction_grid=null", f"hydra.run.dir={tmp_path}")
    log = (tmp_path / "train.log").read_text()
    assert log.count("Config:") == 1
    config = log[log.index("Config:"):]
    lines = _stripped(config)
    assert "_target_: segx.models.UNet" in lines and "lr: 0.0123" in lines
    assert "image_size: 32" in lines and "encoder_widths: [16, 32]" in lines and "max_epochs: 1" in lines
    assert log.index("Config:") < log.index("Job ")  # logged before the run starts
    assert "\x1b" not in log


def test_integer_keys_show_in_the_tree() -> None:
    """`+data.label_map={11:255}` (Hydra's own suggestion) and data=cityscapes' label ids are int keys, which a
    struct config does not find under their text."""
    lines = _stripped(_compose("data=cityscapes", "data.label_map={11: 255, 7: 0}"))
    assert "label_map" in lines and "11: 255" in lines and "7: 0" in lines


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(p.stem for p in (ROOT / "conf" / "data").glob("*.yaml") if p.stem != "shapes"))
def test_every_data_preset_starts_up_to_the_missing_dataset_message(name: str, tmp_path: Path) -> None:
    """Each file of conf/data/ composes, logs its config and gets as far as looking for its files (shapes makes
    its own and so always starts: the suite trains on it)."""
    result = run_in_process("train.py", f"data={name}", f"data.root={tmp_path / 'missing'}", *QUIET,
                            f"hydra.run.dir={tmp_path / 'run'}", check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "Traceback" not in output and "Error in call" not in output, output[-3000:]
    assert str(tmp_path / "missing") in output  # the message names where it looked
    assert "Config:" in (tmp_path / "run" / "train.log").read_text()
