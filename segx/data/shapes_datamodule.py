"""`ShapesDataModule`: the embedded dataset, generated on first use and then read exactly like VOC."""

from __future__ import annotations

from typing import Any

from segx.data.datamodule import VOCDataModule
from segx.data.shapes import write_shapes_dataset


class ShapesDataModule(VOCDataModule):
    """Writes a small VOC-layout tree of coloured shapes under `root`, then behaves as `VOCDataModule`.

    Going through the same VOCSegmentation reader and cache means the demo and the tests exercise the
    exact code path a real VOC run takes.
    """

    def __init__(
        self,
        root: str = "data/shapes",
        num_train: int = 200,
        num_val: int = 50,
        shapes_seed: int = 0,
        min_size: int = 96,
        max_size: int = 160,
        **kwargs: Any,
    ) -> None:
        kwargs.pop("download", None)  # nothing to download: the tree is generated
        super().__init__(root=root, download=False, **kwargs)
        self.shapes_args = {
            "num_train": int(num_train), "num_val": int(num_val), "seed": int(shapes_seed),
            "min_size": int(min_size), "max_size": int(max_size),
        }

    def prepare_source(self) -> None:
        write_shapes_dataset(self.root, **self.shapes_args)
