"""Sliding-window inference (`inference.mode=slide`): the windows, their average, and the memory it holds."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from segx.core.errors import ConfigError
from segx.inference.predictor import Predictor, TestTimeAugmentation
from segx.inference.sliding import InferenceMode, SlidingWindow, window_starts
from segx.models.unet import UNet


def test_windows_step_by_the_stride_and_the_last_one_ends_at_the_border() -> None:
    assert window_starts(100, 32, 24) == [0, 24, 48, 68]  # 72 + 32 would pass 100: moved back to 68
    assert window_starts(96, 32, 32) == [0, 32, 64]
    assert window_starts(20, 32, 16) == [0]  # a side shorter than the crop: one window
    assert window_starts(33, 32, 21) == [0, 1]


def test_a_window_the_size_of_the_image_equals_the_whole_image_with_and_without_flip() -> None:
    torch.manual_seed(0)
    net = UNet(num_classes=4, encoder_widths=[4, 8], bottleneck_width=8).eval()
    image = torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8)
    for tta in (TestTimeAugmentation(), TestTimeAugmentation("flip")):
        predictor = Predictor(net, channels_last=False, tta=tta)
        whole = predictor.logits(image[None])[0].float()
        assert torch.equal(SlidingWindow(predictor, 64, 32).logits(image), whole)  # one window: the image
        assert torch.equal(SlidingWindow(predictor, 64, 32).labels(image), whole.argmax(0).to(torch.uint8))


def _covered_with_margin(height: int, width: int, crop: int, stride: int, margin: int) -> torch.Tensor:
    """Pixels every covering window holds at least `margin` pixels away from its edges (an image border aside)."""
    def one_side(length: int) -> torch.Tensor:
        ok = torch.ones(length, dtype=torch.bool)
        for start in window_starts(length, crop, stride):
            end = min(start + crop, length)
            low = start + (margin if start > 0 else 0)
            high = end - (margin if end < length else 0)
            inside = torch.zeros(length, dtype=torch.bool)
            inside[start:end] = True
            near = inside.clone()
            near[low:high] = False
            ok &= ~near
        return ok
    return one_side(height)[:, None] & one_side(width)[None, :]


def test_overlapping_windows_of_a_translation_equivariant_network_equal_the_whole_image_away_from_borders() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 5, 3, padding=1)).eval()
    predictor = Predictor(net, channels_last=False)
    image = torch.randint(0, 256, (3, 90, 130), dtype=torch.uint8)
    slider = SlidingWindow(predictor, 32, 20)
    windows = slider.logits(image)
    whole = predictor.logits(image[None])[0]
    exact = _covered_with_margin(90, 130, 32, 20, margin=2)  # two 3×3 convs see 2 pixels around
    assert exact.float().mean() > 0.5 and (~exact).any()
    assert torch.allclose(windows[:, exact], whole[:, exact], atol=1e-5)
    assert not torch.allclose(windows[:, ~exact], whole[:, ~exact], atol=1e-3)  # zero padding inside windows shows
    assert torch.equal(slider.labels(image), windows.argmax(0).to(torch.uint8))


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads the process' memory from /proc")
def test_labels_of_a_2000_by_1500_image_hold_one_band_of_logits_not_the_whole_image() -> None:
    torch.manual_seed(0)
    classes = 21
    net = nn.Conv2d(3, classes, 3, padding=1).eval()
    predictor = Predictor(net, channels_last=False, batch_size=8)
    image = torch.randint(0, 256, (3, 1500, 2000), dtype=torch.uint8)
    slider = SlidingWindow(predictor, 64, 48)
    rows = [band.shape[1] for _, band in slider.bands(image)]
    assert sum(rows) == 1500 and max(rows) <= 64  # a band at a time, never more rows than a window has
    whole_logits = classes * 1500 * 2000 * 4  # 252 MB of float32 logits for the whole image
    peak, done = [_rss_bytes()], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak.append(_rss_bytes())
            time.sleep(0.002)

    baseline = peak[0]
    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        labels = slider.labels(image)
    finally:
        done.set()
        sampler.join()
    assert labels.shape == (1500, 2000) and labels.dtype == torch.uint8
    assert max(peak) - baseline < whole_logits / 3, (max(peak) - baseline) / 1e6


def test_bad_window_settings_are_one_clear_message() -> None:
    with pytest.raises(ConfigError, match="inference.mode='tiles' is not a choice"):
        InferenceMode("tiles")
    with pytest.raises(ConfigError, match="inference.crop=0 must be a positive number"):
        InferenceMode("slide", crop=0)
    with pytest.raises(ConfigError, match="inference.stride=64 is larger than inference.crop=32"):
        InferenceMode("slide", crop=32, stride=64).window(128)
    assert InferenceMode("slide").window(128) == (128, 85)  # the training size, two thirds of it
    net = UNet(num_classes=3, encoder_widths=[4, 8], bottleneck_width=8)
    with pytest.raises(ConfigError, match=r"inference.crop=30 cannot be used with UNet: .* multiple of 4 .*"
                                          r"inference.crop=32"):
        SlidingWindow(Predictor(net), 30, 20)


def test_evaluate_and_predict_slide_over_each_image_at_its_own_size(trained_run: Path, shapes_root: Path,
                                                                    tmp_path: Path) -> None:
    """The shapes images are 48–80 px and the run trained at 32: windows of 32 every 16 pixels."""
    import json

    from PIL import Image

    from tests.conftest import run_in_process

    ckpt = trained_run / "checkpoints" / "best.ckpt"
    printed = run_in_process("evaluate.py", f"ckpt={ckpt}", "inference.mode=slide", "inference.crop=32",
                             "inference.stride=16", "inference.precision=32-true", "save_predictions=true",
                             f"hydra.run.dir={tmp_path / 'eval'}").stdout
    assert "val split, 16 images, full resolution, sliding windows" in printed  # the scores' title says how
    scores = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    # trained at 32 px on 48-80 px images: the windows see objects about twice the size training did
    scale = pytest.approx(1.94, abs=0.01)
    assert scores["inference"] == {"mode": "slide", "crop": 32, "stride": 16, "scale_ratio": scale}
    assert scores["full_res"] is True
    assert "objects are 1.94× the size this network saw" in (tmp_path / "eval" / "evaluate.log").read_text()
    assert scores["precision"] == "32-true" and scores["n_images"] == 16 and 0 < scores["miou"] <= 1
    voc = shapes_root / "VOCdevkit" / "VOC2012"
    for path in sorted((tmp_path / "eval" / "predictions").glob("*.png"))[:4]:
        assert Image.open(path).size == Image.open(voc / "SegmentationClass" / path.name).size
    images = sorted((voc / "JPEGImages").glob("*.jpg"))[:3]
    for image in images:
        (tmp_path / "in").mkdir(exist_ok=True)
        (tmp_path / "in" / image.name).write_bytes(image.read_bytes())
    result = run_in_process("segx.cli.predict", f"ckpt={ckpt}", f"input={tmp_path / 'in'}",
                            f"output={tmp_path / 'out'}", "inference.mode=slide", "progress=false")
    assert "Wrote 3 mask(s)" in result.stdout
    for image in images:
        assert Image.open(tmp_path / "out" / f"{image.stem}.png").size == Image.open(image).size
    refused = run_in_process("evaluate.py", f"ckpt={ckpt}", "inference.mode=slide", "inference.crop=30",
                             f"hydra.run.dir={tmp_path / 'bad'}", check=False)
    assert refused.returncode == 2 and "inference.crop=30 cannot be used with UNet" in refused.stdout + refused.stderr


def test_the_window_scale_is_how_much_larger_objects_look_than_in_training() -> None:
    from segx.inference.evaluate import window_scale

    camvid = torch.tensor([[360, 480]] * 3, dtype=torch.int32)
    assert window_scale(camvid, 128, "keep_ratio") == pytest.approx(3.75)  # 480 → 128, 360 → 96
    assert window_scale(camvid, 128, "square") == pytest.approx((360 / 128 * 480 / 128) ** 0.5)
    assert window_scale(torch.tensor([[128, 128], [64, 64], [256, 256]], dtype=torch.int32), 128, "square") == 1.0
