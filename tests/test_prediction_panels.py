"""The prediction panels (TensorBoard's grid, the report's figure) show images spread over the split, and nothing
where data.resize=keep_ratio padded an image."""

from __future__ import annotations

import torch

from segx.inference.visualize import blank_padding, example_indices


def test_examples_are_spread_over_the_split() -> None:
    assert example_indices(4, 100).tolist() == [0, 33, 66, 99]  # not four consecutive video frames
    assert example_indices(4, 3).tolist() == [0, 1, 2]
    assert example_indices(1, 50).tolist() == [0]


def test_the_keep_ratio_padding_is_blanked() -> None:
    preds = torch.ones(2, 32, 32, dtype=torch.long)
    sizes = torch.tensor([[40, 80], [80, 40]], dtype=torch.int32)  # 2:1 landscape, 1:2 portrait
    blanked = blank_padding(preds, sizes, "keep_ratio", 255)
    assert (blanked[0, :16] == 1).all() and (blanked[0, 16:] == 255).all()  # rows below the 16 the image covers
    assert (blanked[1, :, :16] == 1).all() and (blanked[1, :, 16:] == 255).all()
    assert torch.equal(blank_padding(preds, sizes, "square", 255), preds)  # a stretched image covers all of it
    assert (preds == 1).all()  # the caller's tensor is left alone


def test_the_void_colour_stands_apart_from_every_class_colour() -> None:
    import numpy as np

    from segx.data.folder import VOID_DISTANCE, full_palette
    from segx.data.palette import IGNORE_COLOUR, color_map

    assert tuple(full_palette(None, 21)[255]) == IGNORE_COLOUR  # VOC's cream where no class is near it
    camvid = [[128, 128, 128], [128, 0, 0], [192, 192, 128], [128, 64, 128], [60, 40, 222], [128, 128, 0],
              [192, 128, 128], [64, 64, 128], [64, 0, 128], [64, 64, 0], [0, 128, 192]]  # its pole is near cream
    palette = full_palette(camvid, 11, 11)
    void = palette[11].astype(float)
    assert tuple(palette[11]) != IGNORE_COLOUR
    assert np.linalg.norm(np.asarray(camvid, dtype=float) - void, axis=1).min() >= VOID_DISTANCE
    assert palette[:11].tolist() == camvid and (full_palette(None, 150)[:150] == color_map(150)).all()
