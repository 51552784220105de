"""Inputs read as they are meant and records that say what ran: 16-bit images, CPU precision, read-only data,
a failed download that leaves nothing behind."""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segx.core.errors import SegxError
from segx.data.cache import load_or_build
from segx.data.voc import VOCSource
from segx.inference.predict import load_rgb
from segx.training.runtime import precision_for
from tests.conftest import mounted_tmpfs, shapes_split_files


@pytest.mark.parametrize("mode, values, expected", [
    ("I;16", np.full((4, 6), 32896, np.uint16), 128),        # mid-grey of 16 bits, not clipped to white
    ("I", np.full((4, 6), 65535, np.int32), 255),            # a 16-bit PNG as PIL often opens it
    ("I", np.full((4, 6), 100, np.int32), 100),              # 8-bit values stored wide keep their value
    ("F", np.full((4, 6), 0.5, np.float32), 128),            # floats in 0..1
])
def test_high_bit_depth_greyscale_is_scaled_not_clipped(mode: str, values: np.ndarray, expected: int,
                                                        tmp_path: Path) -> None:
    path = tmp_path / "scan.tif"
    Image.fromarray(values).save(path)  # PIL picks the mode from the dtype
    assert Image.open(path).mode == mode
    rgb = np.asarray(load_rgb(path))
    assert rgb.shape == (4, 6, 3) and int(rgb[0, 0, 0]) == expected and (rgb == rgb[..., :1]).all()


def test_a_16_bit_png_ramp_keeps_its_gradient(tmp_path: Path) -> None:
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    grey = np.asarray(load_rgb(tmp_path / "ramp.png"))[..., 0]
    assert grey.min() == 0 and grey.max() == 255 and len(np.unique(grey)) > 200


def test_greyscale_with_alpha_drops_the_alpha(tmp_path: Path) -> None:
    Image.new("LA", (5, 3), (90, 10)).save(tmp_path / "la.png")
    assert np.asarray(load_rgb(tmp_path / "la.png")).tolist() == [[[90] * 3] * 5] * 3


def test_16_mixed_on_a_cpu_is_recorded_as_the_bf16_lightning_runs(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        assert precision_for("16-mixed", "cpu") == "bf16-mixed"
    assert "on a CPU Lightning runs bf16-mixed instead" in caplog.text
    assert precision_for("32-true", "cpu") == "32-true" and precision_for("auto", "cpu") == "32-true"


@pytest.fixture
def read_only_folder(tmp_path: Path) -> Iterator[Path]:
    """A read-only filesystem (tmpfs mounted ro): root ignores file permissions, not a read-only mount."""
    with mounted_tmpfs(tmp_path / "ro", "ro,size=1M") as folder:
        yield folder


def test_a_read_only_data_root_names_data_cache_dir(read_only_folder: Path, shapes_root: Path) -> None:
    files = shapes_split_files(shapes_root, "val", count=2)
    with pytest.raises(SegxError) as caught:
        load_or_build(read_only_folder / "segx-cache", "val", files, 32, num_classes=21)
    message = str(caught.value)
    assert f"The data cache cannot be written to {read_only_folder / 'segx-cache'}" in message
    assert "set data.cache_dir to a writable folder" in message


def _reaches(host: str) -> bool:
    try:
        socket.getaddrinfo(host, 80)
    except OSError:
        return False
    return True


@pytest.mark.skipif(_reaches("host.robots.ox.ac.uk"), reason="this machine reaches the VOC server: the test "
                                                              "would download 2 GB")
def test_a_failed_download_leaves_no_folder_and_no_lock_behind(tmp_path: Path) -> None:
    root = tmp_path / "voc"
    with pytest.raises(SegxError, match=r"Downloading Pascal VOC 2012 into data.root=.* failed"):
        VOCSource(root, download=True).prepare()
    assert not root.exists()
    root.mkdir()
    with pytest.raises(SegxError):
        VOCSource(root, download=True).prepare()
    assert list(root.iterdir()) == []  # a folder of the user's is kept, without a lock file in it
