"""`segx-export ckpt=... format=onnx output=model.onnx`: the network as ONNX, checked against PyTorch."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from segx.core.config_dir import CONF_DIR
from segx.core.errors import exit_on_user_error
from segx.inference.export import export_checkpoint


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="export")
def main(cfg: DictConfig) -> None:
    """`segx-export ckpt=... format=onnx output=model.onnx` (Hydra overrides)."""
    with exit_on_user_error():
        report = export_checkpoint(cfg.ckpt, cfg.output, format=cfg.format, opset=cfg.opset,
                                   tolerance=cfg.tolerance)
    for shape, difference in report.differences:
        print(f"onnxruntime vs PyTorch at {list(shape)}: max abs difference {difference:.3g}")
    print(f"max abs difference {report.max_abs_difference:.3g} (tolerance {cfg.tolerance:g})")
    sizes = "any height and width" if report.input_multiple == 1 else f"height and width multiples of " \
        f"{report.input_multiple}"
    print(f"Wrote {report.path} (opset {report.opset}; dynamic batch, {sizes}; {report.seconds:.1f} s).")


if __name__ == "__main__":
    main()
